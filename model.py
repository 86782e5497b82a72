"""The CODER model: the encoders of encoders.py wired into an instance and a concept branch,
MoCo's momentum encoders and key queues (queues.py), online clustering (prototypes.py), and
the training loss of loss.py.

`CODER.forward` is one training step's loss (docs/method.md has each part's equation):

    L = L_DCL(v, t) + λ_c·L_DCL(v_c, t_c) + λ_p·L_pseudo

v and t are the online embeddings of the batch's images and captions, v_c and t_c their
concept descriptors. As in MoCo, a training-mode forward is the whole step for the model: it
first moves the momentum encoders towards the weights the last optimizer step left, and after
the loss it pushes the batch's keys into the queues and moves the prototypes.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from encoders import BertTextEncoder, ConceptGCN, ConceptQuery, GRUTextEncoder, ImageEncoder, l2norm
from loss import (
    Pairs,
    concept_kl_loss,
    pseudo_label_loss,
    sinkhorn_kernel,
    sinkhorn_knopp,
    symmetric_dcl,
    triplet_loss,
)
from options import check_values
from prototypes import Prototypes
from queues import KeyQueues
from utils import CoderError


@dataclass
class ModelConfig:
    """Every model and loss hyperparameter. The values come from a train script's block
    (train_f30k.py, train_coco.py), which says what each does; docs/method.md has the
    equations. The allowed values are options.TRAIN_RULES and options.CHOICES."""

    embed_dim: int  # d, the joint embedding size
    image_dim: int  # D, the region feature size (from the data)
    image_pooling: str
    text_pooling: str
    text_encoder: str
    vocab_size: int  # bigru: the vocabulary's size (from the data)
    word_dim: int  # bigru
    word_vectors: str  # bigru: "" (random), a GloVe text file, or "glove-package"
    bert_path: str  # bert: a hub name or a folder
    bert_length_groups: int  # bert, compute only: BERT over groups of captions of similar length
    bert_frozen_layers: int  # bert: the embeddings and the first N layers stay frozen
    l2norm_before_pooling: bool
    concept_branch: bool  # False also turns the pseudo-label loss off
    gcn_hidden: int
    concept_score_scale: float
    concept_query_input: str  # how the concept query sees the instance embedding
    label_mix_ratio: float  # r, the share of a caption's own concept labels in its scores
    momentum_gcn: bool  # concept keys from a momentum copy of the GCN
    batch_norm: bool
    momentum: float  # m of the momentum encoders' EMA
    queue_size: int  # K; 0: in-batch negatives only
    num_prototypes: int  # K_p
    sinkhorn_epsilon: float
    sinkhorn_iterations: int
    sinkhorn_with_queue: bool  # Sinkhorn over the batch and the instance queues
    prototype_momentum: float
    prototype_init: str
    prototype_update: str
    loss: str  # "dcl", or the "triplet" baseline
    tau: float  # τ of DCL
    beta: float  # β of DCL's negative weights; 0: momentum InfoNCE
    beta_warmup_epochs: int
    beta_adaptive: bool
    dcl_weight_groups: str
    false_negative_threshold: float
    margin: float  # triplet
    triplet_all_negatives_epochs: int
    region_drop: float
    lambda_concept: float  # λ_c
    lambda_pseudo: float  # λ_p
    lambda_fused: float  # λ_f of CVSE's term on the fused similarity
    lambda_kl: float  # λ_kl of CVSE's KL between the concept scores
    pseudo_label_loss: bool
    tau_pseudo: float  # τ_p
    mu: float  # μ, the concept similarity's weight in S
    fusion: str  # how S fuses the instance and concept similarities

    def __post_init__(self) -> None:
        check_values(asdict(self), owner="model config")
        if self.image_dim < 1:
            raise CoderError(f"model config: image_dim must be positive, got {self.image_dim}")

    def loss_weights(self) -> dict[str, float]:
        """The weight λ of each term of L by its log name (the instance term's is 1)."""
        return {
            f"{self.loss}_instance": 1.0,
            f"{self.loss}_concept": self.lambda_concept,
            "pseudo": self.lambda_pseudo,
            f"{self.loss}_fused": self.lambda_fused,
            "concept_kl": self.lambda_kl,
        }

    def dcl_weighting(self) -> dict[str, Any]:
        """The reading of DCL's negative weights, as loss.dcl_loss's keyword arguments."""
        return {
            "beta_adaptive": self.beta_adaptive,
            "weight_groups": self.dcl_weight_groups,
            "false_negative_threshold": self.false_negative_threshold,
        }


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def gather_from_all(t: Tensor) -> Tensor:
    """Rows of `t` from every process, in rank order (identity without torch.distributed).
    Every process passes the same shape; no gradient: only keys and ids are gathered."""
    _, world = _rank_and_world()
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def local_rows(batch_size: int, device: torch.device) -> Tensor:
    """Where this process's batch sits among the gathered keys (rank-major, equal sizes)."""
    return _rank_and_world()[0] * batch_size + torch.arange(batch_size, device=device)


def fuse(instance: Tensor, concept: Tensor | None, mu: float, fusion: str) -> Tensor:
    """One unit vector per sample whose dot products are the similarity S: "concat"
    [√(1−μ)·x, √μ·x_c], so that S = (1−μ)·s(v,t) + μ·s(v_c,t_c); "weighted_sum"
    l2norm((1−μ)·x + μ·x_c), CVSE's fused embedding. Without a concept part: x."""
    if concept is None:
        return instance
    if fusion == "weighted_sum":
        return l2norm((1 - mu) * instance + mu * concept)
    return torch.cat([math.sqrt(1 - mu) * instance, math.sqrt(mu) * concept], 1)


def fused_similarity(
    images: Tensor,
    images_concept: Tensor | None,
    captions: Tensor,
    captions_concept: Tensor | None,
    mu: float,
    fusion: str,
) -> Tensor:
    """S (N_img, N_cap), the similarity that training's fused term, evaluation and the search
    app rank by; s(v,t) alone when either side has no concept part."""
    if images_concept is None or captions_concept is None:
        return images @ captions.t()
    return fuse(images, images_concept, mu, fusion) @ fuse(captions, captions_concept, mu, fusion).t()


def parameter_counts(model: CODER) -> dict[str, int]:
    """Trainable (online) and momentum parameter counts, for logs and the benchmarks."""
    return {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "momentum": sum(p.numel() for p in model.momentum.parameters()),
    }


def build_text_encoder(cfg: ModelConfig, bert_config: Any) -> nn.Module:
    """The text encoder of cfg: BERT (from cfg.bert_path, or built from `bert_config`) or the Bi-GRU."""
    if cfg.text_encoder == "bert":
        return BertTextEncoder(
            cfg.bert_path,
            cfg.embed_dim,
            cfg.text_pooling,
            cfg.bert_length_groups,
            cfg.bert_frozen_layers,
            cfg.l2norm_before_pooling,
            bert_config,
        )
    if cfg.bert_frozen_layers:
        raise CoderError("bert_frozen_layers needs text_encoder='bert'")
    if cfg.vocab_size < 1:
        raise CoderError("model config: vocab_size must be set from the vocabulary for the bigru text encoder")
    return GRUTextEncoder(cfg.vocab_size, cfg.word_dim, cfg.embed_dim, cfg.text_pooling, cfg.l2norm_before_pooling)


@torch.no_grad()
def sinkhorn_pseudo_labels(
    keys: Mapping[str, Tensor],
    queue_entries: list[Tensor],
    prototypes: Tensor,
    epsilon: float,
    iterations: int,
    rows: Tensor,
) -> tuple[Tensor, Tensor]:
    """Sinkhorn codes of the gathered instance keys, "image" then "text" (2·world·B, K_p),
    computed together with the `queue_entries` (whose codes are not kept), and the pseudo
    labels of the local pairs at `rows`: the mean of the image's and the caption's codes (B, K_p)."""
    embeddings = torch.cat([keys["image"], keys["text"]])
    kernel = [sinkhorn_kernel(x @ prototypes.t(), epsilon) for x in [embeddings, *queue_entries]]
    codes = sinkhorn_knopp(kernel, iterations, num_rows=embeddings.shape[0])
    return (codes[rows] + codes[keys["image"].shape[0] + rows]) / 2, codes


def embed_images(
    modules: Mapping[str, nn.Module], images: Tensor, concepts: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(v, v_c, α) by `modules` (online or momentum): instance (B, d), concept descriptor
    l2norm(α·E) (B, d) and concept scores α (B, N_c); the last two None without concepts E."""
    instance = modules["image_encoder"](images)
    if concepts is None:
        return instance, None, None
    alpha = modules["image_query"](instance, concepts)
    return instance, l2norm(alpha @ concepts), alpha


def embed_captions(
    modules: Mapping[str, nn.Module], batch: Mapping[str, Tensor], concepts: Tensor | None, cfg: ModelConfig
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(t, t_c, α) of the batch's captions; α mixes the query's scores with the caption's own
    labels, r·softmax(scale·labels) + (1−r)·α. A batch may carry `text_states`, the frozen
    BERT bottom's output (text_cache.py)."""
    tokens, lengths, mask = batch["tokens"], batch["lengths"], batch.get("attention_mask")
    if mask is None:
        mask = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths.to(tokens.device)[:, None]
    instance = modules["text_encoder"](tokens, lengths, mask, batch.get("text_states"))
    if concepts is None:
        return instance, None, None
    if batch.get("concept_labels") is None:
        raise CoderError("the concept branch needs the captions' concept_labels (load a concept graph)")
    alpha = modules["text_query"](instance, concepts)
    labels = torch.softmax(cfg.concept_score_scale * batch["concept_labels"].to(alpha.dtype), 1)
    alpha = cfg.label_mix_ratio * labels + (1 - cfg.label_mix_ratio) * alpha
    return instance, l2norm(alpha @ concepts), alpha


def embed_batch(
    modules: Mapping[str, nn.Module], batch: Mapping[str, Tensor], concepts: Tensor | None, cfg: ModelConfig
) -> tuple[dict[str, Tensor | None], tuple[Tensor, Tensor] | None]:
    """`embed_images` and `embed_captions` of a batch by name ("image", "text" and their
    "_concept" parts, None without concepts E), and the (image, caption) concept scores α."""
    image, image_c, image_scores = embed_images(modules, batch["images"], concepts)
    text, text_c, text_scores = embed_captions(modules, batch, concepts, cfg)
    named = {"image": image, "image_concept": image_c, "text": text, "text_concept": text_c}
    return named, None if image_scores is None else (image_scores, text_scores)


def check_concept_graph(adjacency: Tensor | None, vectors: Tensor | None) -> None:
    """The concept branch's graph: given, and Â (N_c, N_c) matching the word vectors (N_c, w)."""
    if adjacency is None or vectors is None:
        raise CoderError("concept_branch=True needs the concept graph (adjacency and word vectors)")
    n = adjacency.shape[0]
    if adjacency.shape != (n, n) or vectors.shape[0] != n:
        raise CoderError(
            f"concept graph shapes differ: adjacency {tuple(adjacency.shape)}, word vectors {tuple(vectors.shape)}"
        )


def instance_part(x: Tensor, x_c: Tensor | None) -> Tensor:
    """The view of a sample's (instance, concept) embeddings that the instance term compares."""
    return x


def concept_part(x: Tensor, x_c: Tensor | None) -> Tensor:
    """The view that the concept term compares."""
    return x_c


def in_view(view: Callable, embeddings: Mapping[str, Tensor | None]) -> Pairs:
    """Embeddings by name ("image", "text", their "_concept" parts) and their image "ids" as the
    `Pairs` that `view(x, x_c)` makes of them."""
    image = view(embeddings["image"], embeddings.get("image_concept"))
    text = view(embeddings["text"], embeddings.get("text_concept"))
    return Pairs(image, text, embeddings["ids"])


class StepEmbeddings(NamedTuple):
    """What a training step's contrastive terms compare, each by name ("image", "text" and their
    "_concept" parts) with the image "ids" of its rows: the local batch's online queries (B, d),
    the global batch's momentum keys (world·B, d) and the queues' entries (K, d); {} where the
    model has no keys or no queues."""

    queries: Mapping[str, Tensor | None]
    keys: Mapping[str, Tensor]
    queues: Mapping[str, Tensor]


class CODER(nn.Module):
    """CODER: instance branch + concept branch, DCL over momentum queues, online clustering.

    `concept_adjacency` Â (N_c, N_c) and `concept_vectors` (N_c, w), the GCN's input, come from
    the data layer; they are buffers, so a checkpoint holds them. `with_keys=False` builds the
    online encoders only, for inference. `bert_config`: BERT built from that `transformers`
    config (its weights a checkpoint's) instead of loaded from cfg.bert_path.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        concept_adjacency: Tensor | None = None,
        concept_vectors: Tensor | None = None,
        with_keys: bool = True,
        bert_config: Any = None,
    ) -> None:
        super().__init__()
        self.cfg, self.epoch = cfg, 0  # the training epoch (set_epoch): the warm-ups read it
        self.image_encoder = ImageEncoder(
            cfg.image_dim, cfg.embed_dim, cfg.image_pooling, cfg.batch_norm, cfg.l2norm_before_pooling, cfg.region_drop
        )
        self.text_encoder = build_text_encoder(cfg, bert_config)
        self.online_names = ["image_encoder", "text_encoder"]
        if cfg.concept_branch:
            self._build_concept_branch(concept_adjacency, concept_vectors)
        # Keys: instance keys for DCL and the pseudo labels, concept keys for the concept DCL.
        use_pseudo = cfg.concept_branch and cfg.pseudo_label_loss
        self.key_names = ["image", "text"] if with_keys and (cfg.loss == "dcl" or use_pseudo) else []
        if self.key_names and cfg.concept_branch and cfg.loss == "dcl":
            self.key_names += ["image_concept", "text_concept"]
        self.momentum = self._build_momentum()
        queued = self.key_names if cfg.loss == "dcl" or cfg.sinkhorn_with_queue else []
        self.queues = KeyQueues(queued, cfg.queue_size, cfg.embed_dim) if with_keys else None
        self.prototypes = None
        if with_keys and use_pseudo:
            self.prototypes = Prototypes(
                cfg.num_prototypes, cfg.embed_dim, cfg.prototype_init, cfg.prototype_update, cfg.prototype_momentum
            )

    def _build_concept_branch(self, adjacency: Tensor | None, vectors: Tensor | None) -> None:
        cfg = self.cfg
        check_concept_graph(adjacency, vectors)
        self.register_buffer("concept_adjacency", adjacency.detach().float().clone())
        self.register_buffer("concept_vectors", vectors.detach().float().clone())
        self.gcn = ConceptGCN(vectors.shape[1], cfg.gcn_hidden, cfg.embed_dim)
        self.image_query = ConceptQuery(cfg.embed_dim, cfg.batch_norm, cfg.concept_score_scale, cfg.concept_query_input)
        self.text_query = ConceptQuery(cfg.embed_dim, cfg.batch_norm, cfg.concept_score_scale, cfg.concept_query_input)
        self.online_names += ["gcn", "image_query", "text_query"]

    def _build_momentum(self) -> nn.ModuleDict:
        """Frozen copies of every module that produces a key (MoCo's key encoders)."""
        names = ["image_encoder", "text_encoder"] if self.key_names else []
        if "image_concept" in self.key_names:
            names += (["gcn"] if self.cfg.momentum_gcn else []) + ["image_query", "text_query"]
        momentum = nn.ModuleDict({name: copy.deepcopy(getattr(self, name)) for name in names})
        momentum.requires_grad_(False)
        return momentum

    @torch.no_grad()
    def init_word_embeddings(self, vocab_words: list[str]) -> float:
        """The bigru word embedding from cfg.word_vectors, and its momentum copy, on a fresh
        model; returns the share of the vocabulary the vectors cover."""
        if self.cfg.text_encoder != "bigru" or not self.cfg.word_vectors:
            raise CoderError("init_word_embeddings needs text_encoder='bigru' and a word_vectors source")
        coverage = self.text_encoder.init_embedding(vocab_words, self.cfg.word_vectors)
        if "text_encoder" in self.momentum:
            self.momentum["text_encoder"].embed.weight.copy_(self.text_encoder.embed.weight)
        return coverage

    def set_text_backbone_frozen(self, frozen: bool) -> None:
        """Freeze (or release) BERT's weights; the layer and pooling on top keep training."""
        if isinstance(self.text_encoder, BertTextEncoder):
            self.text_encoder.set_frozen(frozen)

    def set_epoch(self, epoch: int) -> None:
        """The trainer's epoch (0-based), at the start of each epoch and on resume."""
        self.epoch = epoch

    def current_beta(self) -> float:
        """β of this epoch: cfg.beta · min(1, epoch / cfg.beta_warmup_epochs), or cfg.beta."""
        warmup = self.cfg.beta_warmup_epochs
        return self.cfg.beta * min(1.0, self.epoch / warmup) if warmup else self.cfg.beta

    def _encoders(self, momentum: bool) -> Mapping[str, nn.Module]:
        """The momentum copies, or the online modules under the same names."""
        return self.momentum if momentum else {name: getattr(self, name) for name in self.online_names}

    def concepts(self, momentum: bool = False) -> Tensor:
        """E (N_c, d): the concept embeddings from the online GCN or its momentum copy."""
        return self._encoders(momentum)["gcn"](self.concept_adjacency, self.concept_vectors)

    def encode_images(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Online encoders: (v (B, d), v_c (B, d) or None), L2-normalised."""
        return embed_images(self._encoders(False), images, self.concepts() if self.cfg.concept_branch else None)[:2]

    def encode_captions(self, captions: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """Online encoders: (t (B, d), t_c (B, d) or None), L2-normalised, of a caption batch as
        data.collate makes it: "tokens", "lengths", and where given "attention_mask",
        "concept_labels" and "text_states". A caption's concept scores read its own labels
        only, never its image's other captions."""
        concepts = self.concepts() if self.cfg.concept_branch else None
        return embed_captions(self._encoders(False), captions, concepts, self.cfg)[:2]

    def similarity(
        self, img: Tensor, img_c: Tensor | None, cap: Tensor, cap_c: Tensor | None, mu: float | None = None
    ) -> Tensor:
        """`fused_similarity` (N_img, N_cap) by cfg.fusion, μ = cfg.mu unless given."""
        return fused_similarity(img, img_c, cap, cap_c, self.cfg.mu if mu is None else mu, self.cfg.fusion)

    def fuse(self, instance: Tensor, concept: Tensor | None, mu: float | None = None) -> Tensor:
        """`fuse` by cfg.fusion, μ = cfg.mu unless given: the vectors a search index holds."""
        return fuse(instance, concept, self.cfg.mu if mu is None else mu, self.cfg.fusion)

    @property
    def fused_dim(self) -> int:
        """The width of `fuse`'s vectors."""
        return self.cfg.embed_dim * (2 if self.cfg.concept_branch and self.cfg.fusion == "concat" else 1)

    # -- the training step -----------------------------------------------------------------------

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The loss L of a batch ("loss") and each of its terms, unweighted, by log name.

        Keys come from the momentum encoders, gathered from every process (each process
        takes its own queries against the global batch's keys, so DDP's averaged gradient is
        the global batch's). In training mode, the momentum encoders first move towards the
        online ones, and after the loss the batch's keys enter the queues and the prototypes
        move: the loss reads the queues and prototypes as they were before this batch.
        """
        cfg = self.cfg
        if self.training:
            self._momentum_update()
        concepts = self.concepts() if cfg.concept_branch else None  # E (N_c, d)
        queries, scores = self.queries(batch, concepts)  # (B, d) by name, "ids" (B,)
        keys = self.momentum_keys(batch, concepts)  # (world·B, d) by name, "ids" (world·B,)
        queues = self.queue_entries(copied=self.training and cfg.loss == "dcl")  # (K, d) by name, "ids" (K,)
        step = StepEmbeddings(queries, keys, queues)
        targets = codes = None
        if self.prototypes is not None:
            targets, codes = self.pseudo_labels(keys, queries["ids"].shape[0])  # (B, K_p), (2·world·B, K_p)
        with torch.autocast(queries["image"].device.type, enabled=False):  # the losses in float32
            terms = {f"{cfg.loss}_instance": self.contrast(instance_part, step)}  # L_DCL(v, t)
            if cfg.concept_branch:  # L_DCL(v_c, t_c)
                terms[f"{cfg.loss}_concept"] = self.contrast(concept_part, step)
            if self.prototypes is not None and self.prototypes.is_ready:
                terms["pseudo"] = self.pseudo_label_term(queries, targets)  # L_pseudo
            if cfg.concept_branch and cfg.lambda_fused > 0:  # CVSE's term on S
                terms[f"{cfg.loss}_fused"] = self.contrast(self.fuse, step)
            if cfg.concept_branch and cfg.lambda_kl > 0:  # CVSE's KL(caption ‖ image) of the concept scores
                terms["concept_kl"] = concept_kl_loss(*scores)
        weights = cfg.loss_weights()
        # L = L_DCL(v, t) + λ_c·L_DCL(v_c, t_c) + λ_p·L_pseudo (+ λ_f·L_fused + λ_kl·L_KL, off by default)
        loss = sum(weights[name] * term for name, term in terms.items())
        if self.training:
            self._update_queues_and_prototypes(keys, codes)
        return {"loss": loss, **terms}

    def queries(self, batch: Mapping[str, Tensor], concepts: Tensor | None) -> tuple[dict, tuple | None]:
        """The online embeddings by name, as the keys have them ("image", "text" and their
        "_concept" parts, None without the concept branch) with the batch's image "ids", and the
        (image, caption) concept scores α (None without); all in float32."""
        named, scores = embed_batch(self._encoders(False), batch, concepts, self.cfg)
        queries = {name: None if x is None else x.float() for name, x in named.items()}
        scores = None if scores is None else (scores[0].float(), scores[1].float())
        return {**queries, "ids": batch["image_ids"]}, scores

    @torch.no_grad()
    def momentum_keys(self, batch: Mapping[str, Tensor], online_concepts: Tensor | None) -> dict[str, Tensor]:
        """The momentum encoders' keys of the batch by name and their image "ids", gathered from
        every process ({} without keys); concept keys use the momentum GCN's E or, without one,
        `online_concepts`."""
        if not self.key_names:
            return {}
        concepts = None
        if "image_concept" in self.key_names:
            concepts = self.concepts(momentum=True) if "gcn" in self.momentum else online_concepts.detach()
        keys, _ = embed_batch(self.momentum, batch, concepts, self.cfg)
        gathered = {name: gather_from_all(keys[name].float()) for name in self.key_names}
        return {**gathered, "ids": gather_from_all(batch["image_ids"])}

    def queue_entries(self, copied: bool) -> dict[str, Tensor]:
        """The queues' filled entries (K, d) by name, and "ids" (K,); {} without queues.
        `copied`: copies, that the loss keeps for its backward while the queues move on."""
        if self.queues is None or not self.queues.names:
            return {}
        entries = {name: self.queues.entries(name) for name in self.queues.names}
        return {**{name: x.clone() if copied else x for name, x in entries.items()}, "ids": self.queues.filled_ids()}

    def contrast(self, view: Callable, step: StepEmbeddings, stats: dict[str, Tensor] | None = None) -> Tensor:
        """DCL (or the triplet baseline) on one view of the step's embeddings: `view(x, x_c)` is
        x (`instance_part`), x_c (`concept_part`) or the fused vector of S (`self.fuse`).
        `stats`: see loss.dcl_loss."""
        cfg, batch = self.cfg, in_view(view, step.queries)  # (B, ·)
        if cfg.loss == "triplet":
            hardest = self.epoch >= cfg.triplet_all_negatives_epochs
            return triplet_loss(batch.image, batch.text, batch.ids, cfg.margin, hardest)
        keys = in_view(view, step.keys)  # (world·B, ·)
        queue = in_view(view, step.queues) if step.queues else None  # (K, ·)
        rows = local_rows(batch.image.shape[0], batch.image.device)
        return symmetric_dcl(batch, keys, queue, rows, cfg.tau, self.current_beta(), stats=stats, **cfg.dcl_weighting())

    def pseudo_labels(self, keys: Mapping[str, Tensor], local_size: int) -> tuple[Tensor, Tensor]:
        """`sinkhorn_pseudo_labels` of the keys, with the instance queues' entries when
        cfg.sinkhorn_with_queue: the local pairs' targets (B, K_p) and the batch's codes."""
        cfg, prototypes, rows = self.cfg, self.prototypes.weight, local_rows(local_size, keys["image"].device)
        names = [n for n in ("image", "text") if cfg.sinkhorn_with_queue and n in self.queues.names]
        queued = [self.queues.entries(name) for name in names]
        return sinkhorn_pseudo_labels(keys, queued, prototypes, cfg.sinkhorn_epsilon, cfg.sinkhorn_iterations, rows)

    def pseudo_label_term(self, queries: Mapping[str, Tensor], targets: Tensor) -> Tensor:
        """L_pseudo: the concept descriptors of both modalities predict the pair's pseudo label."""
        prototypes, tau = self.prototypes.for_loss(), self.cfg.tau_pseudo
        image = pseudo_label_loss(queries["image_concept"], targets, prototypes, tau)
        text = pseudo_label_loss(queries["text_concept"], targets, prototypes, tau)
        return (image + text) / 2

    @torch.no_grad()
    def _momentum_update(self) -> None:
        """θ_k ← m·θ_k + (1−m)·θ_q for every key module, with the online weights the last
        optimizer step left; learned prototypes back onto the unit sphere."""
        key_params, params = [], []
        for name, key_module in self.momentum.items():
            key_params += list(key_module.parameters())
            params += [p.detach() for p in getattr(self, name).parameters()]
        if key_params:
            torch._foreach_lerp_(key_params, params, 1 - self.cfg.momentum)
        if self.prototypes is not None and self.prototypes.learned and self.prototypes.is_ready:
            self.prototypes.renormalise()

    @torch.no_grad()
    def _update_queues_and_prototypes(self, keys: Mapping[str, Tensor], codes: Tensor | None) -> None:
        """After the loss: the prototypes move towards the batch's embeddings (or, with init
        "keys", are drawn once the batch and the queues hold K_p keys), and the batch's keys
        enter the queues. Every process computes the same update from gathered data."""
        if codes is not None:
            embeddings = torch.cat([keys["image"], keys["text"]])
            if not self.prototypes.is_ready:
                pool = [embeddings] + [self.queues.entries(n) for n in ("image", "text") if n in self.queues.names]
                self.prototypes.draw_from(torch.cat(pool))
            elif not self.prototypes.learned:
                self.prototypes.ema_step(embeddings, codes)
        if self.queues.names:
            self.queues.push({name: keys[name] for name in self.queues.names}, keys["ids"])
