"""The CODER model (spec §2–§5, §8): the encoders of encoders.py wired into the instance and
concept branches, momentum encoders and queues, online clustering, and the training-step losses.

Layout follows MoCo: online (query) encoders get gradients; `self.momentum` holds a frozen copy
of every module that produces a key; keys of each batch are gathered across processes and used
as negatives. `after_optimizer_step()` then moves the momentum copies towards the online
modules, the prototypes towards the batch, and pushes the keys into FIFO queues (registered
buffers, so checkpoints hold them). Deferring the queue writes until after the backward lets
the loss read the queues in place instead of copying them every step.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from encoders import BertTextEncoder, ConceptGCN, ConceptQuery, GRUTextEncoder, ImageEncoder, l2norm, load_word_vectors
from loss import dcl_loss, loss_terms, pseudo_label_loss, sinkhorn_kernel, sinkhorn_knopp, total_loss, triplet_loss
from utils import CoderError


@dataclass
class ModelConfig:
    """Every model and loss hyperparameter, with the spec's defaults.

    Fields marked [R] are reconstructions (spec: the abstract names the part, its exact form
    is not public); each is a plain value so that a user with the paper can switch it.
    """

    embed_dim: int = 1024  # d, joint embedding size
    image_dim: int = 2048  # D, region feature size (set from the data)
    image_pooling: str = "attn"  # "attn" (CVSE guided attention, [V]), "mean", "gpo" (VSE∞)
    text_pooling: str = "attn"  # same choices; [V] for bigru; [R] for bert (spec: "pooling over non-pad tokens")
    text_encoder: str = "bigru"  # "bigru" or "bert"
    vocab_size: int = 0  # bigru only: size of the vocabulary
    word_dim: int = 300  # bigru only: word embedding size (50 for the GloVe-50 package)
    word_vectors: str = ""  # bigru only: "" (random), a GloVe-format text file, or "glove-package"
    bert_path: str = "bert-base-uncased"  # bert only: hub name or local directory
    # bert only, compute only: BERT runs over this many groups of captions of similar length,
    # each padded to its own longest caption instead of the batch's; the same outputs (up to
    # rounding; in training, dropout draws differ), fewer padded tokens, which pays on CPUs;
    # 1 = one call over the padded batch
    bert_length_groups: int = 1
    # bert only: BERT's embeddings and first N layers stay frozen (eval mode, no dropout); their
    # output may then be precomputed once per caption (text_cache.py). 0 = fine-tune all (spec)
    bert_frozen_layers: int = 0
    # L2-normalise each projected region / token state before pooling, as CVSE does (spec §4a)
    l2norm_before_pooling: bool = False
    concept_branch: bool = True  # False: instance branch only (also turns the pseudo-label loss off)
    gcn_hidden: int = 512  # GCN hidden size [V]
    concept_score_scale: float = 10.0  # softmax sharpness of the concept scores and labels [V]
    # [R] how the concept query sees the instance embedding x: "bn" = BN(W_x x) with gradient
    # into the encoders (CVSE, spec); "detach" = the same on a detached x (the concept losses
    # train the concept branch only); "no_bn" = tanh(W_x x) without BN, with gradient
    concept_query_input: str = "bn"
    label_mix_ratio: float = 0.35  # r of the text-side label mix (0.35 F30K, 0.4 COCO) [V]
    # [R] concept keys use E from a momentum copy of the GCN (False: the online E, without gradient)
    momentum_gcn: bool = True
    batch_norm: bool = True  # False: no BatchNorm anywhere (for the CPU DDP equivalence test, spec §8)
    momentum: float = 0.995  # m of the momentum encoders' EMA [R]
    queue_size: int = 8192  # K of every queue [R]; 0 = in-batch negatives only
    num_prototypes: int = 1000  # K_p [R]
    sinkhorn_epsilon: float = 0.05  # [R]
    sinkhorn_iterations: int = 3  # [R]
    sinkhorn_with_queue: bool = True  # [R] Sinkhorn over batch + instance queues, batch rows kept
    # [R] EMA rate of each prototype towards the mean of the batch embeddings whose code peaks at it
    prototype_momentum: float = 0.99
    # [R] "random" unit vectors, or "keys": K_p distinct momentum instance keys (batch and queue)
    # drawn at the first step that has K_p of them; the pseudo-label loss waits until then
    prototype_init: str = "random"
    # [R] "ema": prototypes move by prototype_momentum (a buffer); "learned": a parameter
    # trained by the pseudo-label loss and re-normalised after each step (SwAV)
    prototype_update: str = "ema"
    loss: str = "dcl"  # "dcl" or "triplet" (VSE++ hardest negative baseline, in-batch, per process)
    tau: float = 0.05  # DCL temperature [R]
    beta: float = 10.0  # DCL weight sharpness [R]; 0 = plain momentum InfoNCE
    margin: float = 0.2  # triplet margin [S]
    lambda_concept: float = 1.0  # λ_c [R]
    lambda_pseudo: float = 1.0  # λ_p [R]
    # weight of a DCL term on the fused similarity (1−μ)·s(v,t) + μ·s(v_c,t_c) (CVSE trains its
    # fused embedding with weight 3 against instance 5); 0 = off (spec)
    lambda_fused: float = 0.0
    pseudo_label_loss: bool = True  # [R] concept descriptors predict the pair's pseudo label
    tau_pseudo: float = 0.1  # τ_p [R]
    mu: float = 0.15  # inference weight of the concept similarity [R]

    def __post_init__(self) -> None:
        choices = {
            "image_pooling": ("attn", "mean", "gpo"),
            "text_pooling": ("attn", "mean", "gpo"),
            "text_encoder": ("bigru", "bert"),
            "loss": ("dcl", "triplet"),
            "concept_query_input": ("bn", "detach", "no_bn"),
            "prototype_init": ("random", "keys"),
            "prototype_update": ("ema", "learned"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise CoderError(f"model config: {name}={getattr(self, name)!r}, expected one of {allowed}")
        for name in ("embed_dim", "image_dim", "word_dim", "gcn_hidden", "num_prototypes", "sinkhorn_iterations",
                     "bert_length_groups"):
            if getattr(self, name) < 1:
                raise CoderError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.bert_frozen_layers < 0:
            raise CoderError(f"model config: bert_frozen_layers must be >= 0, got {self.bert_frozen_layers}")
        for name in ("lambda_concept", "lambda_pseudo", "lambda_fused"):
            if not getattr(self, name) >= 0:
                raise CoderError(f"model config: {name} must be >= 0, got {getattr(self, name)}")
        if self.queue_size < 0:
            raise CoderError(f"model config: queue_size must be >= 0, got {self.queue_size}")
        for name in ("sinkhorn_epsilon", "tau", "tau_pseudo"):
            if getattr(self, name) <= 0:
                raise CoderError(f"model config: {name} must be positive, got {getattr(self, name)}")
        for name in ("momentum", "prototype_momentum", "label_mix_ratio", "mu"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise CoderError(f"model config: {name} must lie in [0, 1], got {getattr(self, name)}")


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def gather_from_all(t: Tensor) -> Tensor:
    """Rows of `t` from every process, in rank order (identity without torch.distributed).

    Every process must pass the same shape (DistributedSampler gives equal batch sizes).
    No gradient: only keys (momentum outputs) and ids are gathered.
    """
    _, world = _rank_and_world()
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def fuse(instance: Tensor, concept: Tensor | None, mu: float) -> Tensor:
    """[√(1−μ)·x, √μ·x_c]: fuse(v, v_c)·fuse(t, t_c) = (1−μ)·s(v,t) + μ·s(v_c,t_c), the
    inference similarity S (spec §5), as one dot product. Without a concept part: x."""
    if concept is None:
        return instance
    return torch.cat([math.sqrt(1 - mu) * instance, math.sqrt(mu) * concept], 1)


def _mean_pairwise_cosine(x: Tensor) -> Tensor:
    """Mean cosine between distinct rows of unit-norm x (B,d): near 1 when the rows are
    nearly collinear, i.e. carry little about which sample they came from."""
    with torch.no_grad():
        n = x.shape[0]
        total = x.sum(0)
        return ((total @ total - (x * x).sum()) / max(n * (n - 1), 1)).detach()


# ---------------------------------------------------------------------------------------------


class CODER(nn.Module):
    """CODER: instance branch + concept branch, DCL over momentum queues, online clustering.

    `concept_adjacency` (N_c,N_c) is the fixed normalised Â and `concept_vectors` (N_c,w) the
    GCN input, both from the data layer (needed when cfg.concept_branch); they are stored as
    buffers, so a checkpoint's state dict holds them. Building the model reads no file but a
    BERT directory: GloVe initialisation of the bigru embedding is `init_word_embeddings`.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        concept_adjacency: Tensor | None = None,
        concept_vectors: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.image_encoder = ImageEncoder(cfg.image_dim, d, cfg.image_pooling, cfg.batch_norm,
                                          cfg.l2norm_before_pooling)
        self.text_encoder = self._build_text_encoder()

        self.use_pseudo = cfg.concept_branch and cfg.pseudo_label_loss
        self.use_concept_keys = cfg.concept_branch and cfg.loss == "dcl"
        self.online_names = ["image_encoder", "text_encoder"]
        if cfg.concept_branch:
            if concept_adjacency is None or concept_vectors is None:
                raise CoderError("concept_branch=True needs the concept graph (adjacency and word vectors)")
            n = concept_adjacency.shape[0]
            if concept_adjacency.shape != (n, n) or concept_vectors.shape[0] != n:
                raise CoderError(
                    f"concept graph shapes differ: adjacency {tuple(concept_adjacency.shape)}, "
                    f"word vectors {tuple(concept_vectors.shape)}"
                )
            self.register_buffer("concept_adjacency", concept_adjacency.detach().float().clone())
            self.register_buffer("concept_vectors", concept_vectors.detach().float().clone())
            self.gcn = ConceptGCN(concept_vectors.shape[1], cfg.gcn_hidden, d)
            self.image_query = ConceptQuery(d, cfg.batch_norm, cfg.concept_score_scale, cfg.concept_query_input)
            self.text_query = ConceptQuery(d, cfg.batch_norm, cfg.concept_score_scale, cfg.concept_query_input)
            self.online_names += ["gcn", "image_query", "text_query"]

        # Key encoders: instance keys for DCL and for the pseudo labels; concept keys for DCL.
        self.key_names: list[str] = []
        if cfg.loss == "dcl" or self.use_pseudo:
            self.key_names += ["image", "text"]
        if self.use_concept_keys:
            self.key_names += ["image_concept", "text_concept"]
        momentum_modules = []
        if self.key_names:
            momentum_modules += ["image_encoder", "text_encoder"]
        if self.use_concept_keys:
            momentum_modules += (["gcn"] if cfg.momentum_gcn else []) + ["image_query", "text_query"]
        self.momentum = nn.ModuleDict({name: copy.deepcopy(getattr(self, name)) for name in momentum_modules})
        for p in self.momentum.parameters():
            p.requires_grad_(False)

        queued = self.key_names if cfg.loss == "dcl" or cfg.sinkhorn_with_queue else []
        self.queue_names = queued if cfg.queue_size > 0 else []
        for name in self.queue_names:
            self.register_buffer(f"{name}_queue", torch.zeros(cfg.queue_size, d))
        # The queues advance in lockstep (one enqueue per batch), so one id row labels the
        # same entry of every queue.
        id_slots = cfg.queue_size if self.queue_names else 0
        self.register_buffer("queue_ids", torch.full((id_slots,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))
        if self.use_pseudo:
            prototypes = l2norm(torch.randn(cfg.num_prototypes, d))
            if cfg.prototype_update == "learned":
                self.prototypes = nn.Parameter(prototypes)
            else:
                self.register_buffer("prototypes", prototypes)
            # False until prototype_init="keys" has drawn the prototypes from keys
            self.register_buffer("prototypes_ready", torch.tensor(cfg.prototype_init == "random"))
        # Sinkhorn's kernel rows of the instance queues' entries (image rows, then text rows, by
        # queue slot), kept current as entries arrive and prototypes move: a step computes only
        # the new rows and the columns of the prototypes that moved instead of all 2K x K_p.
        # A buffer, so that a resumed run reads the same values.
        self.cache_queue_kernel = self.use_pseudo and cfg.sinkhorn_with_queue and bool(self.queue_names)
        if self.cache_queue_kernel:
            self.register_buffer("queue_kernel", torch.zeros(2 * cfg.queue_size, cfg.num_prototypes))
        # Keys, codes and embeddings of training forwards whose queue and prototype updates wait
        # for after_optimizer_step() (in order; several with gradient accumulation).
        self._pending_updates: list[dict[str, Any]] = []

    def _build_text_encoder(self) -> nn.Module:
        cfg = self.cfg
        if cfg.text_encoder == "bert":
            return BertTextEncoder(cfg.bert_path, cfg.embed_dim, cfg.text_pooling, cfg.bert_length_groups,
                                   cfg.bert_frozen_layers, cfg.l2norm_before_pooling)
        if cfg.bert_frozen_layers:
            raise CoderError("bert_frozen_layers needs text_encoder='bert'")
        if cfg.vocab_size < 1:
            raise CoderError("model config: vocab_size must be set from the vocabulary for the bigru text encoder")
        return GRUTextEncoder(cfg.vocab_size, cfg.word_dim, cfg.embed_dim, cfg.text_pooling,
                              cfg.l2norm_before_pooling)

    @torch.no_grad()
    def init_word_embeddings(self, vocab_words: list[str]) -> float:
        """Initialise the bigru word embedding (and its momentum copy) from cfg.word_vectors.

        Call once on a fresh model before training (a checkpoint holds the trained embedding).
        `vocab_words` are the vocabulary in id order; <pad> (id 0) stays zero and words without
        a vector keep their random initialisation. Returns the coverage: the fraction of
        vocabulary words that got a vector.
        """
        cfg = self.cfg
        if cfg.text_encoder != "bigru" or not cfg.word_vectors:
            raise CoderError("init_word_embeddings needs text_encoder='bigru' and a word_vectors source")
        if len(vocab_words) != cfg.vocab_size:
            raise CoderError(f"{len(vocab_words)} vocabulary words but vocab_size={cfg.vocab_size}")
        vectors, found = load_word_vectors(vocab_words, cfg.word_vectors)
        if vectors.shape[1] != cfg.word_dim:
            raise CoderError(
                f"{cfg.word_vectors}: {vectors.shape[1]}-d word vectors but word_dim={cfg.word_dim}; "
                f"set word_dim={vectors.shape[1]}"
            )
        found[0] = False  # <pad>
        rows, values = torch.from_numpy(found), torch.from_numpy(vectors[found])
        for encoder in [self.text_encoder, self.momentum["text_encoder"]] if self.momentum else [self.text_encoder]:
            encoder.embed.weight[rows] = values.to(encoder.embed.weight)
        return float(found.sum()) / len(vocab_words)

    def set_text_backbone_frozen(self, frozen: bool) -> None:
        """Freeze (or release) BERT's weights, e.g. for the first epochs (spec §6); the linear
        layer and pooling on top keep training. No-op for the bigru encoder. Under DDP, a
        frozen phase needs find_unused_parameters=True (frozen weights get no gradient)."""
        if isinstance(self.text_encoder, BertTextEncoder):
            self.text_encoder.set_frozen(frozen)

    # -- embeddings --------------------------------------------------------------------------

    def _modules_of(self, momentum: bool) -> Mapping[str, nn.Module]:
        """The momentum copies, or the online modules under the same names."""
        return self.momentum if momentum else {name: getattr(self, name) for name in self.online_names}

    def _concepts(self, momentum: bool = False) -> Tensor:
        """E (N_c, d) from the online GCN or its momentum copy; computed once per step each."""
        return self._modules_of(momentum)["gcn"](self.concept_adjacency, self.concept_vectors)

    @staticmethod
    def _descriptor(alpha: Tensor, concepts: Tensor) -> Tensor:
        return l2norm(alpha @ concepts)

    def _embed_images(
        self, images: Tensor, concepts: Tensor | None, momentum: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        modules = self._modules_of(momentum)
        instance = modules["image_encoder"](images)
        if concepts is None:
            return instance, None
        return instance, self._descriptor(modules["image_query"](instance, concepts), concepts)

    def _embed_captions(
        self,
        tokens: Tensor,
        lengths: Tensor,
        attention_mask: Tensor | None,
        concept_labels: Tensor | None,
        concepts: Tensor | None,
        momentum: bool = False,
        text_states: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        modules = self._modules_of(momentum)
        if attention_mask is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            attention_mask = positions[None, :] < lengths.to(tokens.device)[:, None]
        instance = modules["text_encoder"](tokens, lengths, attention_mask, text_states)
        if concepts is None:
            return instance, None
        if concept_labels is None:
            raise CoderError("the concept branch needs the captions' concept_labels (load a concept graph)")
        alpha = modules["text_query"](instance, concepts)
        r = self.cfg.label_mix_ratio
        label_alpha = torch.softmax(self.cfg.concept_score_scale * concept_labels.to(alpha.dtype), 1)
        alpha = r * label_alpha + (1 - r) * alpha
        return instance, self._descriptor(alpha, concepts)

    def encode_images(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Online (query) encoders: L2-normalised (instance (B,d), concept (B,d) or None)."""
        concepts = self._concepts() if self.cfg.concept_branch else None
        return self._embed_images(images, concepts)

    def encode_captions(
        self, tokens: Tensor, lengths: Tensor, attention_mask: Tensor | None, concept_labels: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """Online (query) encoders: L2-normalised (instance (B,d), concept (B,d) or None).
        A caption's concept attention uses its own labels only (never its image's other captions)."""
        concepts = self._concepts() if self.cfg.concept_branch else None
        return self._embed_captions(tokens, lengths, attention_mask, concept_labels, concepts)

    def similarity(
        self,
        img_inst: Tensor,
        img_con: Tensor | None,
        cap_inst: Tensor,
        cap_con: Tensor | None,
        mu: float | None = None,
    ) -> Tensor:
        """S = (1−μ)·s(v,t) + μ·s(v_c,t_c) (N_img, N_cap), spec §5; μ defaults to cfg.mu;
        instance similarity only when there is no concept branch."""
        mu = self.cfg.mu if mu is None else mu
        sims = img_inst @ cap_inst.t()
        if img_con is None or cap_con is None:
            return sims
        return (1 - mu) * sims + mu * (img_con @ cap_con.t())

    # -- training step -------------------------------------------------------------------------

    def forward(self, batch: Mapping[str, Tensor], return_terms: bool = False) -> Any:
        """One training step's losses: "loss", each term (see loss.total_loss) and cheap
        diagnostics ("diag_*", see `_diagnostics`); with `return_terms`, also the weighted terms
        with their graphs (for per-term gradient norms), as a second value.

        Keys come from the momentum encoders without gradient and are gathered from all
        processes; each process computes the loss of its local queries against them (spec §8),
        so DDP's gradient averaging gives the global-batch gradient. The triplet loss uses
        in-batch online embeddings and stays per process. A batch may carry `text_states`, the
        frozen BERT bottom's output (text_cache.py), for both text encoders. Forward writes no
        buffer: in training mode it records the keys and codes for `after_optimizer_step()`,
        which must follow every training-mode forward (record nothing with model.eval()).
        """
        cfg = self.cfg
        image_ids = batch["image_ids"]
        labels = batch.get("concept_labels")
        concepts = self._concepts() if cfg.concept_branch else None
        img, img_c = self._embed_images(batch["images"], concepts)
        cap, cap_c = self._embed_captions(batch["tokens"], batch["lengths"], batch.get("attention_mask"), labels,
                                          concepts, text_states=batch.get("text_states"))
        keys = self._keys(batch, concepts) if self.key_names else {}
        with torch.autocast(img.device.type, enabled=False):
            img, cap = img.float(), cap.float()
            img_c = img_c.float() if img_c is not None else None
            cap_c = cap_c.float() if cap_c is not None else None
            # Views, not copies: the queues change only in after_optimizer_step(), after backward.
            filled = self._filled()
            queues = {name: getattr(self, f"{name}_queue")[:filled] for name in self.queue_names}
            queue_ids = self.queue_ids[:filled]
            concept = fused = None
            if cfg.loss == "triplet":
                instance = triplet_loss(img, cap, image_ids, cfg.margin)
                if img_c is not None:
                    concept = triplet_loss(img_c, cap_c, image_ids, cfg.margin)
            else:
                instance = self._dcl(img, cap, "image", "text", keys, queues, queue_ids, image_ids)
                if img_c is not None:
                    concept = self._dcl(img_c, cap_c, "image_concept", "text_concept", keys, queues, queue_ids,
                                        image_ids)
                if img_c is not None and cfg.lambda_fused > 0:
                    fused = self._fused_dcl(img, img_c, cap, cap_c, keys, queues, queue_ids, image_ids)
            pseudo, pending, diagnostics = None, {}, {}
            if self.use_pseudo:
                targets, codes, embeddings = self._pseudo_labels(keys, img.shape[0])
                pending.update(embeddings=embeddings, codes=codes)
                if bool(self.prototypes_ready):
                    prototypes = self.prototypes if cfg.prototype_update == "learned" else self.prototypes.detach()
                    pseudo = (pseudo_label_loss(img_c, targets, prototypes, cfg.tau_pseudo)
                              + pseudo_label_loss(cap_c, targets, prototypes, cfg.tau_pseudo)) / 2
                    diagnostics = self._pseudo_diagnostics(targets, codes, pseudo)
            if img_c is not None:
                diagnostics.update(diag_concept_cos_image=_mean_pairwise_cosine(img_c),
                                   diag_concept_cos_text=_mean_pairwise_cosine(cap_c))
            if self.queue_names:
                pending.update(keys={name: keys[name] for name in self.queue_names}, ids=keys["ids"])
            if self.training and pending:
                self._pending_updates.append(pending)
        lambdas = {"lambda_concept": cfg.lambda_concept, "lambda_pseudo": cfg.lambda_pseudo,
                   "lambda_fused": cfg.lambda_fused}
        losses = {**total_loss(instance, concept, pseudo, name=cfg.loss, fused=fused, **lambdas), **diagnostics}
        if not return_terms:
            return losses
        terms = loss_terms(instance, concept, pseudo, fused, name=cfg.loss, **lambdas)
        return losses, {key: weight * term for key, term, weight in terms}

    @torch.no_grad()
    def _pseudo_diagnostics(self, targets: Tensor, codes: Tensor, pseudo: Tensor) -> dict[str, Tensor]:
        """What the pseudo-label loss can learn: the targets' entropy (its floor), the loss
        minus that floor (the mean KL from targets to predictions), and the fraction of the
        prototypes that some gathered batch embedding's code peaks at."""
        entropy = -(targets * targets.clamp_min(1e-12).log()).sum(1).mean()
        used = torch.zeros(codes.shape[1], dtype=torch.bool, device=codes.device)
        used[codes.argmax(1)] = True
        return {"diag_target_entropy": entropy, "diag_pseudo_excess": pseudo.detach() - entropy,
                "diag_prototypes_used": used.float().mean()}

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Call after each optimizer.step(): the EMA update of the momentum encoders, then, for
        each training forward since the last call, the prototype update and the enqueue of its
        keys. Every process holds the same queues and prototypes afterwards (the updates use
        gathered data; the prototypes are also broadcast from rank 0). With several forwards
        per step (gradient accumulation) all are queued in order, but a later forward does not
        see an earlier one's keys as queue negatives."""
        self.momentum_update()
        if self.use_pseudo and self.cfg.prototype_update == "learned" and bool(self.prototypes_ready):
            self.prototypes.copy_(l2norm(self.prototypes))  # the optimizer moved every prototype
            self.refresh_queue_kernel()
        for pending in self._pending_updates:
            if "codes" in pending:
                if not bool(self.prototypes_ready):
                    self._init_prototypes_from_keys(pending["embeddings"])
                elif self.cfg.prototype_update == "ema":
                    self._update_prototypes(pending["embeddings"], pending["codes"])
            if "keys" in pending:
                self._enqueue(pending["keys"], pending["ids"])
        self._pending_updates.clear()

    @torch.no_grad()
    def _init_prototypes_from_keys(self, embeddings: Tensor) -> None:
        """[R] prototype_init="keys": once the batch's momentum instance keys and the instance
        queues hold K_p entries, the prototypes become K_p of them drawn at random (rank 0's
        draw on every process); until then the pseudo-label loss is off (without queues, K_p
        must not exceed the global batch's 2B keys, or it never starts)."""
        filled = self._filled() if "image" in self.queue_names else 0
        pool = embeddings
        if filled:
            pool = torch.cat([embeddings, self.image_queue[:filled], self.text_queue[:filled]])
        count = self.prototypes.shape[0]
        if pool.shape[0] < count:
            return
        chosen = pool[torch.randperm(pool.shape[0])[:count].to(pool.device)]
        self.prototypes.copy_(l2norm(chosen))
        if _rank_and_world()[1] > 1:
            dist.broadcast(self.prototypes.data, src=0)
        self.prototypes_ready.fill_(True)
        self.refresh_queue_kernel()

    @torch.no_grad()
    def _keys(self, batch: Mapping[str, Tensor], concepts: Tensor | None) -> dict[str, Tensor]:
        """Momentum-encoder keys of the local batch, gathered from all processes, with "ids"."""
        key_concepts = None
        if self.use_concept_keys:
            key_concepts = self._concepts(momentum=True) if "gcn" in self.momentum else concepts.detach()
        image, image_c = self._embed_images(batch["images"], key_concepts, momentum=True)
        text, text_c = self._embed_captions(batch["tokens"], batch["lengths"], batch.get("attention_mask"),
                                            batch.get("concept_labels"), key_concepts, momentum=True,
                                            text_states=batch.get("text_states"))
        keys = {"image": image, "text": text, "image_concept": image_c, "text_concept": text_c}
        gathered = {name: gather_from_all(keys[name].float()) for name in self.key_names}
        gathered["ids"] = gather_from_all(batch["image_ids"])
        return gathered

    def _local_rows(self, batch_size: int, device: torch.device) -> Tensor:
        """Where this process's batch sits in the gathered keys (rank-major, equal sizes)."""
        rank, _ = _rank_and_world()
        return rank * batch_size + torch.arange(batch_size, device=device)

    def _dcl(
        self,
        img: Tensor,
        cap: Tensor,
        image_key: str,
        text_key: str,
        keys: Mapping[str, Tensor],
        queues: Mapping[str, Tensor],
        queue_ids: Tensor,
        image_ids: Tensor,
    ) -> Tensor:
        """L_DCL = mean of image→text and text→image, local queries against gathered keys."""
        cfg = self.cfg
        rows = self._local_rows(img.shape[0], img.device)
        empty = img.new_zeros(0, img.shape[1])
        i2t = dcl_loss(img, keys[text_key], queues.get(text_key, empty), image_ids, queue_ids, cfg.tau, cfg.beta,
                       k_ids=keys["ids"], pos_index=rows)
        t2i = dcl_loss(cap, keys[image_key], queues.get(image_key, empty), image_ids, queue_ids, cfg.tau, cfg.beta,
                       k_ids=keys["ids"], pos_index=rows)
        return (i2t + t2i) / 2

    def _fused_dcl(
        self,
        img: Tensor,
        img_c: Tensor,
        cap: Tensor,
        cap_c: Tensor,
        keys: Mapping[str, Tensor],
        queues: Mapping[str, Tensor],
        queue_ids: Tensor,
        image_ids: Tensor,
    ) -> Tensor:
        """DCL on the inference similarity S = (1−μ)·s(v,t) + μ·s(v_c,t_c) (CVSE trains its fused
        embedding so): queries, keys and queue entries are their `fuse`d vectors."""
        mu = self.cfg.mu
        fused_keys = {"image": fuse(keys["image"], keys["image_concept"], mu),
                      "text": fuse(keys["text"], keys["text_concept"], mu), "ids": keys["ids"]}
        fused_queues = {}
        if "image" in queues:
            fused_queues = {"image": fuse(queues["image"], queues["image_concept"], mu),
                            "text": fuse(queues["text"], queues["text_concept"], mu)}
        return self._dcl(fuse(img, img_c, mu), fuse(cap, cap_c, mu), "image", "text", fused_keys, fused_queues,
                         queue_ids, image_ids)

    @torch.no_grad()
    def _pseudo_labels(self, keys: Mapping[str, Tensor], local_size: int) -> tuple[Tensor, Tensor, Tensor]:
        """Sinkhorn codes of the gathered momentum instance embeddings (with the instance queues'
        entries when cfg.sinkhorn_with_queue, batch rows kept). Returns the local pairs' pseudo
        labels (mean of image and caption codes), the batch codes and the batch embeddings."""
        embeddings = torch.cat([keys["image"], keys["text"]])
        kernel = [sinkhorn_kernel(embeddings @ self.prototypes.t(), self.cfg.sinkhorn_epsilon)]
        if self.cache_queue_kernel:
            filled, size = self._filled(), self.cfg.queue_size
            kernel += [self.queue_kernel[:filled], self.queue_kernel[size : size + filled]]
        codes = sinkhorn_knopp(kernel, self.cfg.sinkhorn_iterations, num_rows=embeddings.shape[0])
        batch = keys["image"].shape[0]
        rows = self._local_rows(local_size, embeddings.device)
        return (codes[rows] + codes[batch + rows]) / 2, codes, embeddings

    @torch.no_grad()
    def _update_prototypes(self, embeddings: Tensor, codes: Tensor) -> None:
        """[R] Each prototype moves towards the mean of the batch embeddings whose Sinkhorn code
        peaks at it: c ← l2norm(ρ·c + (1−ρ)·mean), ρ = cfg.prototype_momentum; prototypes with no
        assigned embedding stay. Gathered data only, so every process computes the same update;
        CUDA's index_add_ sums in a non-deterministic order, so rank 0's result is broadcast
        before the cached queue kernel columns of the moved prototypes are recomputed."""
        assigned = codes.argmax(1)
        sums = torch.zeros_like(self.prototypes).index_add_(0, assigned, embeddings)
        counts = torch.bincount(assigned, minlength=self.prototypes.shape[0])
        hit = counts > 0
        rho = self.cfg.prototype_momentum
        self.prototypes[hit] = l2norm(rho * self.prototypes[hit] + (1 - rho) * sums[hit] / counts[hit, None])
        if _rank_and_world()[1] > 1:  # rank 0's prototypes and moved columns, exactly
            moved_mask = hit.to(torch.uint8)
            dist.broadcast(self.prototypes, src=0)
            dist.broadcast(moved_mask, src=0)
            hit = moved_mask.bool()
        if self.cache_queue_kernel:
            filled, size = self._filled(), self.cfg.queue_size
            columns = hit.nonzero().squeeze(1)
            moved = self.prototypes[columns].t()
            for start, queue in ((0, self.image_queue), (size, self.text_queue)):
                self.queue_kernel[start : start + filled, columns] = self._kernel(queue[:filled] @ moved)

    def _kernel(self, scores: Tensor) -> Tensor:
        return sinkhorn_kernel(scores, self.cfg.sinkhorn_epsilon)

    @torch.no_grad()
    def refresh_queue_kernel(self) -> None:
        """Recompute the whole cached queue kernel, after the queues or prototypes were written
        directly (the training step keeps the cache current by itself)."""
        if self.cache_queue_kernel:
            size = self.cfg.queue_size
            self.queue_kernel[:size] = self._kernel(self.image_queue @ self.prototypes.t())
            self.queue_kernel[size:] = self._kernel(self.text_queue @ self.prototypes.t())

    def _filled(self) -> int:
        return int(self.queue_count) if self.queue_names else 0

    @torch.no_grad()
    def _enqueue(self, keys: Mapping[str, Tensor], ids: Tensor) -> None:
        """FIFO push with wrap-around of keys already gathered by `gather_from_all` (so every
        process holds the same queues); of a batch longer than the queue only its last rows stay."""
        size = self.cfg.queue_size
        total = ids.shape[0]
        kept = min(total, size)
        ptr = int(self.queue_ptr)
        slots = (ptr + total - kept + torch.arange(kept, device=ids.device)) % size
        for name, value in keys.items():
            getattr(self, f"{name}_queue")[slots] = value[total - kept :].to(self.queue_ids.device, torch.float32)
        self.queue_ids[slots] = ids[total - kept :]
        if self.cache_queue_kernel:
            prototypes = self.prototypes.t()
            self.queue_kernel[slots] = self._kernel(self.image_queue[slots] @ prototypes)
            self.queue_kernel[size + slots] = self._kernel(self.text_queue[slots] @ prototypes)
        self.queue_ptr.fill_((ptr + total) % size)
        self.queue_count.fill_(min(int(self.queue_count) + total, size))

    def queue_fill(self) -> float:
        """Fraction of the queues filled (0.0 without queues)."""
        return self._filled() / self.cfg.queue_size if self.queue_names else 0.0

    @torch.no_grad()
    def momentum_update(self) -> None:
        """θ_k ← m·θ_k + (1−m)·θ_q for every key module (part of after_optimizer_step)."""
        key_params, params = [], []
        for name, key_module in self.momentum.items():
            key_params += list(key_module.parameters())
            params += [p.detach() for p in getattr(self, name).parameters()]
        if key_params:
            torch._foreach_lerp_(key_params, params, 1 - self.cfg.momentum)  # = m·θ_k + (1−m)·θ_q

    # -- optimizer -----------------------------------------------------------------------------

    def param_groups(self, lr: float, weight_decay: float, bert_lr_scale: float = 0.1) -> list[dict[str, Any]]:
        """AdamW groups of the online parameters: "main" at lr and, with the bert text encoder,
        "bert" at lr·bert_lr_scale (frozen BERT weights included: they simply get no gradient).
        Momentum copies are never included."""
        main, bert = [], []
        for name, p in self.named_parameters():
            if name.startswith("momentum."):
                continue
            (bert if name.startswith("text_encoder.bert.") else main).append(p)
        groups = [{"name": "main", "params": main, "lr": lr, "weight_decay": weight_decay}]
        if bert:
            groups.append({"name": "bert", "params": bert, "lr": lr * bert_lr_scale, "weight_decay": weight_decay})
        return groups

    def parameter_branches(self) -> dict[str, list[nn.Parameter]]:
        """The online parameters by branch: "instance" (the two encoders), "concept" (GCN and
        queries) and, when learned, "prototypes" (see grad_clip_scope in trainer.clip_gradients)."""
        branches: dict[str, list[nn.Parameter]] = {"instance": [], "concept": [], "prototypes": []}
        for name, p in self.named_parameters():
            if name.startswith("momentum."):
                continue
            if name.startswith(("image_encoder.", "text_encoder.")):
                branches["instance"].append(p)
            elif name == "prototypes":
                branches["prototypes"].append(p)
            else:
                branches["concept"].append(p)
        return {k: v for k, v in branches.items() if v}

    def parameter_counts(self) -> dict[str, int]:
        """Trainable (online) and momentum parameter counts, for logs and the benchmark."""
        return {
            "trainable": sum(p.numel() for p in self.parameters() if p.requires_grad),
            "momentum": sum(p.numel() for p in self.momentum.parameters()),
        }
