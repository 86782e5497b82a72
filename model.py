"""The CODER model (spec §2–§5, §8): the encoders of encoders.py wired into the instance and
concept branches, momentum encoders, key queues (queues.py), online clustering
(prototypes.py), and the training-step losses (loss.py).

Layout follows MoCo: online (query) encoders get gradients; `self.momentum` holds a frozen copy
of every module that produces a key; keys of each batch are gathered across processes and used
as negatives. A training forward writes nothing: it records its keys and codes, and
`after_optimizer_step()` then moves the momentum copies towards the online modules, the
prototypes towards the batch, and pushes the keys into the queues, so that the loss reads the
queues in place instead of copying them every step.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from encoders import BertTextEncoder, ConceptGCN, ConceptQuery, GRUTextEncoder, ImageEncoder, l2norm
from loss import (concept_kl_loss, dcl_loss, loss_terms, pseudo_label_diagnostics, pseudo_label_loss, sinkhorn_kernel,
                  sinkhorn_knopp, total_loss, triplet_loss)
from options import check_values
from prototypes import Prototypes, QueueKernel
from queues import KeyQueues
from utils import CoderError


@dataclass
class ModelConfig:
    """Every model and loss hyperparameter; the defaults are the train scripts' (`ModelConfig()`
    is the model they train; `options.PRESETS["spec"]` restores the spec's beta and query).

    Fields marked [R] are reconstructions (spec: the abstract names the part, its exact form
    is not public); each is a plain value so that a user with the paper can switch it. The
    allowed values are the train options' (`options.TRAIN_RULES`, `options.CHOICES`).
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
    # [R] how the concept query sees the instance embedding x: "detach" = BN(W_x x) on a
    # detached x (the concept losses train the concept branch only); "bn" = the same with
    # gradient into the encoders (CVSE, spec); "no_bn" = tanh(W_x x) without BN, with gradient
    concept_query_input: str = "detach"
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
    beta: float = 0.0  # DCL weight sharpness [R] (spec: 10); 0 = plain momentum InfoNCE
    # the readings of DCL's adaptive weights [R] (loss.dcl_loss): β grows linearly over the
    # first N epochs from 0; β divided by the batch's spread of negative similarities; batch and
    # queue weighted apart ("separate") or together ("joint"); negatives whose key is more
    # similar than t to the positive's key dropped as likely false negatives (0 = off)
    beta_warmup_epochs: int = 0
    beta_adaptive: bool = False
    dcl_weight_groups: str = "joint"
    false_negative_threshold: float = 0.0
    margin: float = 0.2  # triplet margin [S]
    # triplet only: the first N epochs sum the hinge over every in-batch negative (VSE∞'s
    # warm-up, "VSE0"), then the hardest negative; 0 = hardest from the start (VSE++)
    triplet_all_negatives_epochs: int = 0
    # training only: each region is left out of the pooling with this probability (VSE∞'s
    # size augmentation; an image keeps at least one); 0 = every region (spec)
    region_drop: float = 0.0
    lambda_concept: float = 1.0  # λ_c [R]
    lambda_pseudo: float = 1.0  # λ_p [R]
    # weight of a DCL term on the fused similarity (1−μ)·s(v,t) + μ·s(v_c,t_c) (CVSE trains its
    # fused embedding with weight 3 against instance 5); 0 = off (spec)
    lambda_fused: float = 0.0
    # weight of KL(caption ‖ image) between the pair's concept-score distributions (CVSE's
    # regulariser, weight 2 against instance 5); 0 = off (spec)
    lambda_kl: float = 0.0
    pseudo_label_loss: bool = True  # [R] concept descriptors predict the pair's pseudo label
    tau_pseudo: float = 0.1  # τ_p [R]
    mu: float = 0.15  # inference weight of the concept similarity [R]
    # how the two embeddings of a sample make the one S ranks by (`fuse`): "concat" =
    # (1−μ)·s(v,t) + μ·s(v_c,t_c) (spec §5); "weighted_sum" = the cosine of
    # l2norm((1−μ)·x + μ·x_c) (CVSE's fused embedding, 0.85/0.15 at μ = 0.15)
    fusion: str = "concat"

    def __post_init__(self) -> None:
        check_values(asdict(self), owner="model config")
        if self.image_dim < 1:
            raise CoderError(f"model config: image_dim must be positive, got {self.image_dim}")


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


def fuse(instance: Tensor, concept: Tensor | None, mu: float, fusion: str = "concat") -> Tensor:
    """One unit vector per sample whose dot products are the inference similarity S:
    "concat" [√(1−μ)·x, √μ·x_c], so that fuse(v, v_c)·fuse(t, t_c) = (1−μ)·s(v,t) + μ·s(v_c,t_c)
    (spec §5); "weighted_sum" l2norm((1−μ)·x + μ·x_c) (CVSE). Without a concept part: x."""
    if concept is None:
        return instance
    if fusion == "weighted_sum":
        return l2norm((1 - mu) * instance + mu * concept)
    return torch.cat([math.sqrt(1 - mu) * instance, math.sqrt(mu) * concept], 1)


def fused_similarity(images: Tensor, images_concept: Tensor | None, captions: Tensor,
                     captions_concept: Tensor | None, mu: float, fusion: str = "concat") -> Tensor:
    """S (N_img, N_cap) = `fuse`(images)·`fuse`(captions), the similarity that training's fused
    term, evaluation and the search app all rank by; s(v,t) alone when either side has no
    concept part."""
    if images_concept is None or captions_concept is None:
        return images @ captions.t()
    return fuse(images, images_concept, mu, fusion) @ fuse(captions, captions_concept, mu, fusion).t()


def _mean_pairwise_cosine(x: Tensor) -> Tensor:
    """Mean cosine between distinct rows of unit-norm x (B,d): near 1 when the rows are
    nearly collinear, i.e. carry little about which sample they came from."""
    with torch.no_grad():
        n = x.shape[0]
        total = x.sum(0)
        return ((total @ total - (x * x).sum()) / max(n * (n - 1), 1)).detach()


def local_rows(batch_size: int, device: torch.device, rank: int) -> Tensor:
    """Where process `rank`'s batch sits in the gathered keys (rank-major, equal sizes)."""
    return rank * batch_size + torch.arange(batch_size, device=device)


def symmetric_dcl(img: Tensor, cap: Tensor, image_keys: Tensor, text_keys: Tensor, key_ids: Tensor,
                  image_queue: Tensor | None, text_queue: Tensor | None, queue_ids: Tensor, image_ids: Tensor,
                  tau: float, beta: float, rank: int, stats: dict[str, Tensor] | None = None,
                  **weighting: Any) -> Tensor:
    """L_DCL = mean of image→text and text→image: process `rank`'s queries against the gathered
    keys (`key_ids` their image ids) and the queue entries (None: no queue). `weighting` is the
    reading of DCL's weights (see loss.dcl_loss); a dict `stats` gets their diagnostics, the
    mean of both directions."""
    rows = local_rows(img.shape[0], img.device, rank)
    empty = img.new_zeros(0, img.shape[1])
    directions = [{} if stats is not None else None for _ in range(2)]
    i2t = dcl_loss(img, text_keys, empty if text_queue is None else text_queue, image_ids, queue_ids, tau, beta,
                   k_ids=key_ids, pos_index=rows, stats=directions[0], **weighting)
    t2i = dcl_loss(cap, image_keys, empty if image_queue is None else image_queue, image_ids, queue_ids, tau, beta,
                   k_ids=key_ids, pos_index=rows, stats=directions[1], **weighting)
    if stats is not None:
        stats.update({key: (directions[0][key] + directions[1][key]) / 2 for key in directions[0]})
    return (i2t + t2i) / 2


def fused_dcl(img: Tensor, img_c: Tensor, cap: Tensor, cap_c: Tensor, keys: Mapping[str, Tensor],
              queues: Mapping[str, Tensor], mu: float, fusion: str, queue_ids: Tensor, image_ids: Tensor,
              tau: float, beta: float, rank: int, **weighting: Any) -> Tensor:
    """`symmetric_dcl` on the inference similarity S (CVSE trains its fused embedding so):
    queries, keys and queue entries (by name, as the model's) are their `fuse`d vectors."""
    image_queue = text_queue = None
    if "image" in queues:
        image_queue = fuse(queues["image"], queues["image_concept"], mu, fusion)
        text_queue = fuse(queues["text"], queues["text_concept"], mu, fusion)
    return symmetric_dcl(fuse(img, img_c, mu, fusion), fuse(cap, cap_c, mu, fusion),
                         fuse(keys["image"], keys["image_concept"], mu, fusion),
                         fuse(keys["text"], keys["text_concept"], mu, fusion), keys["ids"], image_queue, text_queue,
                         queue_ids, image_ids, tau, beta, rank, **weighting)


# State-dict keys of checkpoints written before the queues and prototypes had their modules.
RENAMED_KEYS = {"image_queue": "queues.image", "text_queue": "queues.text",
                "image_concept_queue": "queues.image_concept", "text_concept_queue": "queues.text_concept",
                "queue_ids": "queues.ids", "queue_ptr": "queues.pointer", "queue_count": "queues.count",
                "prototypes": "prototypes.weight", "prototypes_ready": "prototypes.ready",
                "queue_kernel": "queue_kernel.rows"}


@torch.no_grad()
def upgrade_state_dict(state: Mapping[str, Tensor], own: Mapping[str, Tensor], epsilon: float,
                       note: Callable[[str], None]) -> dict[str, Tensor]:
    """`state`, of a model of an earlier layout, in the layout of `own` (a state dict of this
    code): queue and prototype buffers under their modules' names (RENAMED_KEYS); the attention
    pooling's score biases (before a softmax: no output depended on them) dropped, with a
    `note`; buffers newer than the checkpoint derived from the rest (the queue kernel from the
    queues and prototypes; the readiness flag True, as such checkpoints had random prototypes)."""
    state = {RENAMED_KEYS.get(k, k): v for k, v in state.items()}
    biases = [k for k in state if k.endswith("pool.score.bias") and k not in own]
    if biases:
        note(f"note: dropped the attention pooling's score bias ({len(biases)} tensors): it preceded a "
             f"softmax, so no output depended on it")
        state = {k: v for k, v in state.items() if k not in biases}
    if "prototypes.ready" in own and "prototypes.ready" not in state:
        state["prototypes.ready"] = torch.tensor(True)
    sources = ("queues.image", "queues.text", "prototypes.weight")
    if "queue_kernel.rows" in own and "queue_kernel.rows" not in state and all(
            k in state and state[k].shape == own[k].shape for k in sources):
        entries = torch.cat([state["queues.image"], state["queues.text"]])
        state["queue_kernel.rows"] = sinkhorn_kernel(entries @ state["prototypes.weight"].t(), epsilon)
    return state


# What only training reads: momentum encoders, queues, prototypes, the queue kernel (and their
# names of earlier layouts).
TRAINING_ONLY = ("momentum.", "queues.", "prototypes.", "queue_kernel.")


def online_weights(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A checkpoint's state dict without what only training reads: the weights of a model
    built with `with_keys=False`."""
    return {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY) and k not in RENAMED_KEYS}


# ---------------------------------------------------------------------------------------------


class CODER(nn.Module):
    """CODER: instance branch + concept branch, DCL over momentum queues, online clustering.

    `concept_adjacency` (N_c,N_c) is the fixed normalised Â and `concept_vectors` (N_c,w) the
    GCN input, both from the data layer (needed when cfg.concept_branch); they are stored as
    buffers, so a checkpoint's state dict holds them. Building the model reads no file but a
    BERT directory: GloVe initialisation of the bigru embedding is `init_word_embeddings`.
    `cache_queue_kernel` (compute only) keeps Sinkhorn's kernel rows of the queue entries
    between steps (prototypes.QueueKernel) instead of recomputing them every step.
    `with_keys=False` builds the online encoders only, for inference: no momentum encoders,
    queues, prototypes or kernel (`online_weights` leaves a checkpoint's out). `bert_config`
    builds BERT from that `transformers` config instead of loading cfg.bert_path (its weights
    are then a checkpoint's).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        concept_adjacency: Tensor | None = None,
        concept_vectors: Tensor | None = None,
        cache_queue_kernel: bool = True,
        with_keys: bool = True,
        bert_config: Any = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_encoder = ImageEncoder(cfg.image_dim, cfg.embed_dim, cfg.image_pooling, cfg.batch_norm,
                                          cfg.l2norm_before_pooling, cfg.region_drop)
        self.epoch = 0  # the training epoch (set_epoch), read by the triplet warm-up
        self.text_encoder = self._build_text_encoder(bert_config)
        self.use_pseudo = cfg.concept_branch and cfg.pseudo_label_loss
        self.use_concept_keys = cfg.concept_branch and cfg.loss == "dcl"
        self.online_names = ["image_encoder", "text_encoder"]
        if cfg.concept_branch:
            self._build_concept_branch(concept_adjacency, concept_vectors)
        # Key encoders: instance keys for DCL and for the pseudo labels; concept keys for DCL.
        self.key_names: list[str] = []
        if not with_keys:
            self.momentum, self.queues, self.prototypes, self.queue_kernel = nn.ModuleDict(), None, None, None
            self.sinkhorn_queues, self._pending_updates = False, []
            return
        if cfg.loss == "dcl" or self.use_pseudo:
            self.key_names += ["image", "text"]
        if self.use_concept_keys:
            self.key_names += ["image_concept", "text_concept"]
        self.momentum = self._build_momentum()
        queued = self.key_names if cfg.loss == "dcl" or cfg.sinkhorn_with_queue else []
        self.queues = KeyQueues(queued, cfg.queue_size, cfg.embed_dim)
        self.prototypes = self.queue_kernel = None
        if self.use_pseudo:
            self.prototypes = Prototypes(cfg.num_prototypes, cfg.embed_dim, cfg.prototype_init,
                                         cfg.prototype_update, cfg.prototype_momentum)
        self.sinkhorn_queues = self.use_pseudo and cfg.sinkhorn_with_queue and bool(self.queues.names)
        if self.sinkhorn_queues and cache_queue_kernel:
            self.queue_kernel = QueueKernel(cfg.queue_size, cfg.num_prototypes, cfg.sinkhorn_epsilon)
        # Keys, codes and embeddings of training forwards whose queue and prototype updates wait
        # for after_optimizer_step() (in order; several with gradient accumulation).
        self._pending_updates: list[dict[str, Any]] = []

    def _build_concept_branch(self, adjacency: Tensor | None, vectors: Tensor | None) -> None:
        cfg = self.cfg
        if adjacency is None or vectors is None:
            raise CoderError("concept_branch=True needs the concept graph (adjacency and word vectors)")
        n = adjacency.shape[0]
        if adjacency.shape != (n, n) or vectors.shape[0] != n:
            raise CoderError(f"concept graph shapes differ: adjacency {tuple(adjacency.shape)}, "
                             f"word vectors {tuple(vectors.shape)}")
        self.register_buffer("concept_adjacency", adjacency.detach().float().clone())
        self.register_buffer("concept_vectors", vectors.detach().float().clone())
        self.gcn = ConceptGCN(vectors.shape[1], cfg.gcn_hidden, cfg.embed_dim)
        self.image_query = ConceptQuery(cfg.embed_dim, cfg.batch_norm, cfg.concept_score_scale, cfg.concept_query_input)
        self.text_query = ConceptQuery(cfg.embed_dim, cfg.batch_norm, cfg.concept_score_scale, cfg.concept_query_input)
        self.online_names += ["gcn", "image_query", "text_query"]

    def _build_momentum(self) -> nn.ModuleDict:
        """Frozen copies of every module that produces a key (MoCo's key encoders)."""
        names = []
        if self.key_names:
            names += ["image_encoder", "text_encoder"]
        if self.use_concept_keys:
            names += (["gcn"] if self.cfg.momentum_gcn else []) + ["image_query", "text_query"]
        momentum = nn.ModuleDict({name: copy.deepcopy(getattr(self, name)) for name in names})
        for p in momentum.parameters():
            p.requires_grad_(False)
        return momentum

    def _build_text_encoder(self, bert_config: Any = None) -> nn.Module:
        cfg = self.cfg
        if cfg.text_encoder == "bert":
            return BertTextEncoder(cfg.bert_path, cfg.embed_dim, cfg.text_pooling, cfg.bert_length_groups,
                                   cfg.bert_frozen_layers, cfg.l2norm_before_pooling, bert_config)
        if cfg.bert_frozen_layers:
            raise CoderError("bert_frozen_layers needs text_encoder='bert'")
        if cfg.vocab_size < 1:
            raise CoderError("model config: vocab_size must be set from the vocabulary for the bigru text encoder")
        return GRUTextEncoder(cfg.vocab_size, cfg.word_dim, cfg.embed_dim, cfg.text_pooling,
                              cfg.l2norm_before_pooling)

    @torch.no_grad()
    def init_word_embeddings(self, vocab_words: list[str]) -> float:
        """Initialise the bigru word embedding from cfg.word_vectors (`GRUTextEncoder.init_embedding`)
        and copy it into the momentum text encoder. Call once on a fresh model before training (a
        checkpoint holds the trained embedding). Returns the vocabulary's coverage."""
        if self.cfg.text_encoder != "bigru" or not self.cfg.word_vectors:
            raise CoderError("init_word_embeddings needs text_encoder='bigru' and a word_vectors source")
        coverage = self.text_encoder.init_embedding(vocab_words, self.cfg.word_vectors)
        if "text_encoder" in self.momentum:
            self.momentum["text_encoder"].embed.weight.copy_(self.text_encoder.embed.weight)
        return coverage

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
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(instance, concept descriptor, concept scores α); the last two None without concepts."""
        modules = self._modules_of(momentum)
        instance = modules["image_encoder"](images)
        if concepts is None:
            return instance, None, None
        alpha = modules["image_query"](instance, concepts)
        return instance, self._descriptor(alpha, concepts), alpha

    def _embed_captions(self, tokens: Tensor, lengths: Tensor, attention_mask: Tensor | None,
                        concept_labels: Tensor | None, concepts: Tensor | None, momentum: bool = False,
                        text_states: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(instance, concept descriptor, concept scores: the query's mixed with the caption's
        own labels); the last two None without concepts."""
        modules = self._modules_of(momentum)
        if attention_mask is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            attention_mask = positions[None, :] < lengths.to(tokens.device)[:, None]
        instance = modules["text_encoder"](tokens, lengths, attention_mask, text_states)
        if concepts is None:
            return instance, None, None
        if concept_labels is None:
            raise CoderError("the concept branch needs the captions' concept_labels (load a concept graph)")
        alpha = modules["text_query"](instance, concepts)
        r = self.cfg.label_mix_ratio
        label_alpha = torch.softmax(self.cfg.concept_score_scale * concept_labels.to(alpha.dtype), 1)
        alpha = r * label_alpha + (1 - r) * alpha
        return instance, self._descriptor(alpha, concepts), alpha

    def encode_images(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Online (query) encoders: L2-normalised (instance (B,d), concept (B,d) or None)."""
        concepts = self._concepts() if self.cfg.concept_branch else None
        return self._embed_images(images, concepts)[:2]

    def encode_captions(
        self, tokens: Tensor, lengths: Tensor, attention_mask: Tensor | None, concept_labels: Tensor | None,
        text_states: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Online (query) encoders: L2-normalised (instance (B,d), concept (B,d) or None).
        A caption's concept attention uses its own labels only (never its image's other captions).
        `text_states`: the frozen BERT bottom's output for these tokens (text_cache.py)."""
        concepts = self._concepts() if self.cfg.concept_branch else None
        return self._embed_captions(tokens, lengths, attention_mask, concept_labels, concepts,
                                    text_states=text_states)[:2]

    def similarity(self, img_inst: Tensor, img_con: Tensor | None, cap_inst: Tensor, cap_con: Tensor | None,
                   mu: float | None = None) -> Tensor:
        """`fused_similarity` (N_img, N_cap) with μ defaulting to cfg.mu, by cfg.fusion."""
        return fused_similarity(img_inst, img_con, cap_inst, cap_con, self.cfg.mu if mu is None else mu,
                                self.cfg.fusion)

    def fuse(self, instance: Tensor, concept: Tensor | None, mu: float | None = None) -> Tensor:
        """`fuse` by cfg.fusion (μ defaulting to cfg.mu): the vectors a search index holds."""
        return fuse(instance, concept, self.cfg.mu if mu is None else mu, self.cfg.fusion)

    @property
    def fused_dim(self) -> int:
        """The width of `fuse`'s vectors."""
        concat = self.cfg.concept_branch and self.cfg.fusion == "concat"
        return self.cfg.embed_dim * (2 if concat else 1)

    def set_epoch(self, epoch: int) -> None:
        """The trainer's epoch (0-based), at the start of each epoch and on resume: the triplet
        warm-up (cfg.triplet_all_negatives_epochs) and β's warm-up depend on it."""
        self.epoch = epoch

    def current_beta(self) -> float:
        """DCL's β in this epoch: cfg.beta · min(1, epoch / cfg.beta_warmup_epochs), so that a
        warm-up trains with plain InfoNCE weights first (β = cfg.beta without warm-up)."""
        warmup = self.cfg.beta_warmup_epochs
        return self.cfg.beta * min(1.0, self.epoch / warmup) if warmup else self.cfg.beta

    # -- training step -------------------------------------------------------------------------

    def forward(self, batch: Mapping[str, Tensor], return_terms: bool = False) -> Any:
        """One training step's losses: "loss", each term (see loss.total_loss) and cheap
        diagnostics ("diag_*"); with `return_terms`, also the weighted terms with their graphs
        (for per-term gradient norms), as a second value.

        Encode the batch with the online encoders; its keys with the momentum encoders, without
        gradient, gathered from all processes (each process's loss takes its local queries
        against them, spec §8, so DDP's gradient averaging gives the global-batch gradient);
        the losses; and, in training mode, a record of the keys and codes for
        `after_optimizer_step()`, which must follow every training-mode forward. A batch may
        carry `text_states`, the frozen BERT bottom's output (text_cache.py).
        """
        cfg = self.cfg
        concepts = self._concepts() if cfg.concept_branch else None
        queries, scores = self._queries(batch, concepts)
        keys = self._keys(batch, concepts) if self.key_names else {}
        with torch.autocast(queries[0].device.type, enabled=False):
            dcl_stats = {} if return_terms and cfg.loss == "dcl" else None
            (instance, concept, fused), diagnostics = self._contrastive_terms(*queries, keys, batch["image_ids"],
                                                                              dcl_stats)
            diagnostics.update({f"diag_dcl_{key}": value for key, value in (dcl_stats or {}).items()})
            kl = concept_kl_loss(*scores) if scores is not None and cfg.lambda_kl > 0 else None
            pseudo, clusters, pseudo_diagnostics = None, {}, {}
            if self.use_pseudo:
                pseudo, clusters, pseudo_diagnostics = self._pseudo_term(queries[1], queries[3], keys)
        if self.training:
            self._record(keys, clusters)
        lambdas = {"lambda_concept": cfg.lambda_concept, "lambda_pseudo": cfg.lambda_pseudo,
                   "lambda_fused": cfg.lambda_fused, "lambda_kl": cfg.lambda_kl}
        losses = {**total_loss(instance, concept, pseudo, name=cfg.loss, fused=fused, kl=kl, **lambdas),
                  **pseudo_diagnostics, **diagnostics}
        if not return_terms:
            return losses
        terms = loss_terms(instance, concept, pseudo, fused, kl, name=cfg.loss, **lambdas)
        return losses, {key: weight * term for key, term, weight in terms}

    def _queries(self, batch: Mapping[str, Tensor], concepts: Tensor | None) -> tuple[
            list[Tensor | None], tuple[Tensor, Tensor] | None]:
        """Online embeddings [v, v_c, t, t_c] of the batch in float32 (concept parts None
        without the concept branch), and the (image, caption) concept scores (None without)."""
        img, img_c, img_scores = self._embed_images(batch["images"], concepts)
        cap, cap_c, cap_scores = self._embed_captions(batch["tokens"], batch["lengths"], batch.get("attention_mask"),
                                                      batch.get("concept_labels"), concepts,
                                                      text_states=batch.get("text_states"))
        scores = None if img_scores is None else (img_scores.float(), cap_scores.float())
        return [None if x is None else x.float() for x in (img, img_c, cap, cap_c)], scores

    def _contrastive_terms(self, img: Tensor, img_c: Tensor | None, cap: Tensor, cap_c: Tensor | None,
                           keys: Mapping[str, Tensor], image_ids: Tensor, dcl_stats: dict[str, Tensor] | None = None
                           ) -> tuple[tuple, dict[str, Tensor]]:
        """(instance, concept, fused) terms (None where absent) and the concept diagnostics; a
        dict `dcl_stats` gets the instance DCL's weight diagnostics. The fused term ranks by
        the inference similarity (`fuse` by cfg.fusion). DCL reads the queues in place: they
        change only in after_optimizer_step()."""
        cfg = self.cfg
        concept = fused = None
        if cfg.loss == "triplet":
            hardest = self.epoch >= cfg.triplet_all_negatives_epochs
            instance = triplet_loss(img, cap, image_ids, cfg.margin, hardest)
            if img_c is not None:
                concept = triplet_loss(img_c, cap_c, image_ids, cfg.margin, hardest)
            if img_c is not None and cfg.lambda_fused > 0:
                fused = triplet_loss(self.fuse(img, img_c), self.fuse(cap, cap_c), image_ids, cfg.margin, hardest)
        else:
            queues = {name: self.queues.entries(name) for name in self.queues.names}
            queue_ids = self.queues.filled_ids()
            dcl = dict(queue_ids=queue_ids, image_ids=image_ids, tau=cfg.tau, beta=self.current_beta(),
                       rank=_rank_and_world()[0], beta_adaptive=cfg.beta_adaptive, weight_groups=cfg.dcl_weight_groups,
                       false_negative_threshold=cfg.false_negative_threshold)
            instance = symmetric_dcl(img, cap, keys["image"], keys["text"], keys["ids"], queues.get("image"),
                                     queues.get("text"), stats=dcl_stats, **dcl)
            if img_c is not None:
                concept = symmetric_dcl(img_c, cap_c, keys["image_concept"], keys["text_concept"], keys["ids"],
                                        queues.get("image_concept"), queues.get("text_concept"), **dcl)
            if img_c is not None and cfg.lambda_fused > 0:
                fused = fused_dcl(img, img_c, cap, cap_c, keys, queues, cfg.mu, cfg.fusion, **dcl)
        diagnostics = {}
        if img_c is not None:
            diagnostics = {"diag_concept_cos_image": _mean_pairwise_cosine(img_c),
                           "diag_concept_cos_text": _mean_pairwise_cosine(cap_c)}
        return (instance, concept, fused), diagnostics

    def _pseudo_term(self, img_c: Tensor, cap_c: Tensor, keys: Mapping[str, Tensor]) -> tuple[
            Tensor | None, dict[str, Tensor], dict[str, Tensor]]:
        """The pseudo-label loss (None until the prototypes are ready), the batch's codes and
        embeddings for the prototype update, and the loss's diagnostics."""
        targets, codes, embeddings = self._pseudo_labels(keys, img_c.shape[0])
        clusters = {"embeddings": embeddings, "codes": codes}
        if not self.prototypes.is_ready:
            return None, clusters, {}
        prototypes, tau = self.prototypes.for_loss(), self.cfg.tau_pseudo
        pseudo = (pseudo_label_loss(img_c, targets, prototypes, tau)
                  + pseudo_label_loss(cap_c, targets, prototypes, tau)) / 2
        return pseudo, clusters, pseudo_label_diagnostics(targets, codes, pseudo)

    def _record(self, keys: Mapping[str, Tensor], clusters: dict[str, Tensor]) -> None:
        """Keep what after_optimizer_step() writes: the codes, and the keys for the queues."""
        pending = dict(clusters)
        if self.queues.names:
            pending.update(keys={name: keys[name] for name in self.queues.names}, ids=keys["ids"])
        if pending:
            self._pending_updates.append(pending)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Call after each optimizer.step(): the EMA update of the momentum encoders, then, for
        each training forward since the last call, the prototype update and the push of its
        keys. Every process holds the same queues and prototypes afterwards (the updates use
        gathered data). With several forwards per step (gradient accumulation) all are queued
        in order, but a later forward does not see an earlier one's keys as queue negatives."""
        self.momentum_update()
        if self.prototypes is not None and self.prototypes.learned and self.prototypes.is_ready:
            self.prototypes.renormalise()  # the optimizer moved every prototype
            self._refresh_queue_kernel()
        for pending in self._pending_updates:
            if "codes" in pending:
                self._update_prototypes(pending["embeddings"], pending["codes"])
            if "keys" in pending:
                slots = self.queues.push(pending["keys"], pending["ids"])
                if self.queue_kernel is not None:
                    self.queue_kernel.write_slots(slots, self.queues.image, self.queues.text, self.prototypes.weight)
        self._pending_updates.clear()

    @torch.no_grad()
    def _update_prototypes(self, embeddings: Tensor, codes: Tensor) -> None:
        """Init "keys": draw the prototypes once the batch's instance keys and the instance
        queues hold K_p (without queues, K_p must not exceed the global batch's 2B keys, or the
        pseudo-label loss never starts). Update "ema": move them, and the kernel's columns."""
        if not self.prototypes.is_ready:
            pool = embeddings
            if self.queues.filled and "image" in self.queues.names:
                pool = torch.cat([embeddings, self.queues.entries("image"), self.queues.entries("text")])
            if self.prototypes.draw_from(pool):
                self._refresh_queue_kernel()
        elif not self.prototypes.learned:
            moved = self.prototypes.ema_step(embeddings, codes)
            if self.queue_kernel is not None:
                self.queue_kernel.write_columns(moved, self.queues.entries("image"), self.queues.entries("text"),
                                                self.prototypes.weight, at_most=embeddings.shape[0])

    def _refresh_queue_kernel(self) -> None:
        if self.queue_kernel is not None:
            self.queue_kernel.refresh(self.queues.image, self.queues.text, self.prototypes.weight)

    @torch.no_grad()
    def _keys(self, batch: Mapping[str, Tensor], concepts: Tensor | None) -> dict[str, Tensor]:
        """Momentum-encoder keys of the local batch, gathered from all processes, with "ids"."""
        key_concepts = None
        if self.use_concept_keys:
            key_concepts = self._concepts(momentum=True) if "gcn" in self.momentum else concepts.detach()
        image, image_c, _ = self._embed_images(batch["images"], key_concepts, momentum=True)
        text, text_c, _ = self._embed_captions(batch["tokens"], batch["lengths"], batch.get("attention_mask"),
                                            batch.get("concept_labels"), key_concepts, momentum=True,
                                            text_states=batch.get("text_states"))
        keys = {"image": image, "text": text, "image_concept": image_c, "text_concept": text_c}
        gathered = {name: gather_from_all(keys[name].float()) for name in self.key_names}
        gathered["ids"] = gather_from_all(batch["image_ids"])
        return gathered

    @torch.no_grad()
    def _pseudo_labels(self, keys: Mapping[str, Tensor], local_size: int) -> tuple[Tensor, Tensor, Tensor]:
        """Sinkhorn codes of the gathered momentum instance embeddings (with the instance queues'
        entries when cfg.sinkhorn_with_queue, batch rows kept). Returns the local pairs' pseudo
        labels (mean of image and caption codes), the batch codes and the batch embeddings."""
        embeddings = torch.cat([keys["image"], keys["text"]])
        prototypes, epsilon = self.prototypes.weight, self.cfg.sinkhorn_epsilon
        kernel = [sinkhorn_kernel(embeddings @ prototypes.t(), epsilon)]
        if self.queue_kernel is not None:
            kernel += self.queue_kernel.blocks(self.queues.filled)
        elif self.sinkhorn_queues:
            kernel += [sinkhorn_kernel(self.queues.entries(name) @ prototypes.t(), epsilon)
                       for name in ("image", "text")]
        codes = sinkhorn_knopp(kernel, self.cfg.sinkhorn_iterations, num_rows=embeddings.shape[0])
        batch = keys["image"].shape[0]
        rows = local_rows(local_size, embeddings.device, _rank_and_world()[0])
        return (codes[rows] + codes[batch + rows]) / 2, codes, embeddings

    @torch.no_grad()
    def momentum_update(self) -> None:
        """θ_k ← m·θ_k + (1−m)·θ_q for every key module (part of after_optimizer_step)."""
        key_params, params = [], []
        for name, key_module in self.momentum.items():
            key_params += list(key_module.parameters())
            params += [p.detach() for p in getattr(self, name).parameters()]
        if key_params:
            torch._foreach_lerp_(key_params, params, 1 - self.cfg.momentum)  # = m·θ_k + (1−m)·θ_q

    # -- checkpoints of earlier layouts --------------------------------------------------------

    def upgrade_state_dict(self, state: Mapping[str, Tensor], note: Callable[[str], None]) -> dict[str, Tensor]:
        """A state dict of an earlier layout in this one (see `upgrade_state_dict`)."""
        return upgrade_state_dict(state, self.state_dict(), self.cfg.sinkhorn_epsilon, note)


# -- optimizer-facing views of a model --------------------------------------------------------


def _online_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The named parameters without the momentum copies (they never get an optimizer)."""
    return [(name, p) for name, p in model.named_parameters() if not name.startswith("momentum.")]


def param_groups(model: CODER, lr: float, weight_decay: float, bert_lr_scale: float = 0.1) -> list[dict[str, Any]]:
    """AdamW groups of the online parameters: "main" at lr and, with the bert text encoder,
    "bert" at lr·bert_lr_scale (frozen BERT weights included: they simply get no gradient)."""
    main, bert = [], []
    for name, p in _online_parameters(model):
        (bert if name.startswith("text_encoder.bert.") else main).append(p)
    groups = [{"name": "main", "params": main, "lr": lr, "weight_decay": weight_decay}]
    if bert:
        groups.append({"name": "bert", "params": bert, "lr": lr * bert_lr_scale, "weight_decay": weight_decay})
    return groups


def parameter_branches(model: CODER) -> dict[str, list[nn.Parameter]]:
    """The online parameters by branch: "instance" (the two encoders), "concept" (GCN and
    queries) and, when learned, "prototypes" (see grad_clip_scope in trainer.clip_gradients)."""
    branches: dict[str, list[nn.Parameter]] = {"instance": [], "concept": [], "prototypes": []}
    for name, p in _online_parameters(model):
        if name.startswith(("image_encoder.", "text_encoder.")):
            branches["instance"].append(p)
        elif name.startswith("prototypes."):
            branches["prototypes"].append(p)
        else:
            branches["concept"].append(p)
    return {k: v for k, v in branches.items() if v}


def parameter_counts(model: CODER) -> dict[str, int]:
    """Trainable (online) and momentum parameter counts, for logs and the benchmark."""
    return {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "momentum": sum(p.numel() for p in model.momentum.parameters()),
    }
