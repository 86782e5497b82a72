"""evaluation.py against straightforward references: per-query Python loops for the ranks,
the textbook similarity formula, per-fold metrics for COCO 1K, and per-item encoding."""

from __future__ import annotations

import statistics
import sys
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluation
from evaluation import Embeddings
from utils import CoderError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# --------------------------------------------------------------------------- references


def naive_ranks(sims: np.ndarray, cpi: int) -> tuple[list[int], list[int]]:
    """Per-query loops over Python floats: rank = wrong items scored at least as high as the
    ground truth (ties count against the model); an image takes its best own caption."""
    rows = np.asarray(sims).tolist()
    n_img, n_cap = len(rows), len(rows[0])
    image_ranks = []
    for i in range(n_img):
        own = range(i * cpi, (i + 1) * cpi)
        best = max(rows[i][c] for c in own)
        image_ranks.append(sum(1 for k in range(n_cap) if k not in own and rows[i][k] >= best))
    caption_ranks = [
        sum(1 for k in range(n_img) if k != j // cpi and rows[k][j] >= rows[j // cpi][j]) for j in range(n_cap)
    ]
    return image_ranks, caption_ranks


def naive_metrics(sims: np.ndarray, cpi: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for prefix, ranks in zip(("i2t", "t2i"), naive_ranks(sims, cpi)):
        for k in (1, 5, 10):
            out[f"{prefix}_r{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
        out[f"{prefix}_medr"] = float(int(statistics.median(ranks)) + 1)
        out[f"{prefix}_meanr"] = statistics.fmean(ranks) + 1
    out["rsum"] = sum(out[f"{p}_r{k}"] for p in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def scan_argsort_ranks(sims: np.ndarray, cpi: int) -> tuple[list[int], list[int]]:
    """SCAN/VSE++-style ranks by sorting; agrees with the strict rule only without ties."""
    image_ranks = [
        min(int(np.where(np.argsort(row)[::-1] == c)[0][0]) for c in range(i * cpi, (i + 1) * cpi))
        for i, row in enumerate(sims)
    ]
    caption_ranks = [int(np.where(np.argsort(sims[:, j])[::-1] == j // cpi)[0][0]) for j in range(sims.shape[1])]
    return image_ranks, caption_ranks


def assert_metrics_close(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


def random_sims(n_img: int, cpi: int, ties: bool, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if ties:  # four distinct values: most comparisons involve ties
        return rng.integers(0, 4, size=(n_img, n_img * cpi)).astype(np.float32)
    sims = rng.normal(size=(n_img, n_img * cpi))
    sims[np.arange(n_img * cpi) // cpi, np.arange(n_img * cpi)] += 1.5  # a model better than chance
    return sims


# --------------------------------------------------------------------------- recall_metrics


@pytest.mark.parametrize("cpi", [5, 1])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_recall_metrics_matches_naive_loops(cpi: int, ties: bool, kind: str) -> None:
    sims = random_sims(23 if cpi == 5 else 60, cpi, ties, seed=cpi + 10 * ties)
    given = sims if kind == "numpy" else torch.from_numpy(sims)
    assert_metrics_close(evaluation.recall_metrics(given, cpi), naive_metrics(sims, cpi))


@pytest.mark.parametrize("cpi", [5, 1])
def test_ranks_agree_with_scan_argsort_without_ties(cpi: int) -> None:
    sims = random_sims(20, cpi, ties=False, seed=3)
    image_ranks, caption_ranks = evaluation.retrieval_ranks(sims, cpi)
    want_img, want_cap = scan_argsort_ranks(sims, cpi)
    assert image_ranks.tolist() == want_img
    assert caption_ranks.tolist() == want_cap


def test_ties_count_against_the_model() -> None:
    # Image 0's caption ties with image 1's caption; caption 1 ties between both images.
    sims = np.array([[1.0, 1.0], [0.0, 1.0]])
    image_ranks, caption_ranks = evaluation.retrieval_ranks(sims, 1)
    assert image_ranks.tolist() == [1, 0]
    assert caption_ranks.tolist() == [0, 1]
    # An image's own captions tying with each other are no competitors.
    own_ties = np.array([[2.0, 2.0, 1.0, 1.0], [0.0, 0.0, 3.0, 3.0]])
    assert evaluation.retrieval_ranks(own_ties, 2)[0].tolist() == [0, 0]


@pytest.mark.parametrize("n_img,cpi", [(3, 2), (40, 5), (1000, 5)])
def test_a_collapsed_model_scores_no_better_than_chance(n_img: int, cpi: int) -> None:
    """All scores equal (a collapsed model): every ground truth ranks last, rsum 0 — below the
    expected rsum of random scores, so the trainer can never keep it as its best."""
    constant = np.full((n_img, n_img * cpi), 0.7, dtype=np.float32)
    image_ranks, caption_ranks = evaluation.retrieval_ranks(constant, cpi)
    assert image_ranks.tolist() == [n_img * cpi - cpi] * n_img  # every wrong caption ranks above
    assert caption_ranks.tolist() == [n_img - 1] * (n_img * cpi)
    metrics = evaluation.recall_metrics(constant, cpi)
    if n_img * cpi - cpi >= 10:  # more than 10 wrong items each way: nothing is within R@10
        assert metrics["rsum"] == 0.0
    assert metrics["i2t_medr"] == n_img * cpi - cpi + 1 and metrics["t2i_medr"] == n_img
    assert evaluation.constant_scores(constant) and not evaluation.constant_scores(random_sims(3, cpi, False))


@pytest.mark.parametrize("device", DEVICES)
def test_chunking_and_device_do_not_change_ranks(device: str) -> None:
    sims = torch.from_numpy(random_sims(17, 5, ties=True, seed=7)).to(device)
    want = evaluation.retrieval_ranks(sims.cpu(), 5)
    for rows in (1, 4, 17, 1000):
        got = evaluation.retrieval_ranks(sims, 5, chunk_rows=rows)
        assert got[0].device.type == device
        assert got[0].cpu().tolist() == want[0].tolist()
        assert got[1].cpu().tolist() == want[1].tolist()


def test_non_contiguous_read_only_and_integer_inputs(tmp_path) -> None:
    sims = random_sims(12, 5, ties=True, seed=5)
    want = naive_metrics(sims, 5)
    np.save(tmp_path / "sims_t.npy", np.ascontiguousarray(sims.T))
    read_only_transposed = np.load(tmp_path / "sims_t.npy", mmap_mode="r").T
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_metrics_close(evaluation.recall_metrics(read_only_transposed, 5), want)
    flipped = np.flip(np.flip(sims, 0), 0)  # negative strides
    assert_metrics_close(evaluation.recall_metrics(flipped, 5), want)
    assert_metrics_close(evaluation.recall_metrics(sims.astype(np.int64), 5), want)
    assert_metrics_close(evaluation.recall_metrics(torch.from_numpy(sims).half(), 5), want)


def test_perfect_diagonal_gives_600() -> None:
    for cpi in (5, 1):
        sims = np.repeat(np.eye(9), cpi, axis=1)
        metrics = evaluation.recall_metrics(sims, cpi)
        assert metrics["rsum"] == 600.0
        assert all(metrics[f"{d}_r{k}"] == 100.0 for d in ("i2t", "t2i") for k in (1, 5, 10))
        assert metrics["i2t_medr"] == metrics["t2i_medr"] == 1.0
        assert metrics["i2t_meanr"] == metrics["t2i_meanr"] == 1.0


def test_worst_case_ranks() -> None:
    # Every ground truth scored below everything else: i2t rank = 5 other-image captions.
    sims = 1.0 - np.repeat(np.eye(2), 5, axis=1)
    metrics = evaluation.recall_metrics(sims, 5)
    assert metrics["i2t_r1"] == metrics["i2t_r5"] == 0.0 and metrics["i2t_r10"] == 100.0
    assert metrics["i2t_medr"] == metrics["i2t_meanr"] == 6.0
    assert metrics["t2i_r1"] == 0.0 and metrics["t2i_medr"] == 2.0


def test_shape_and_value_errors_name_the_counts() -> None:
    with pytest.raises(CoderError, match=r"19 captions for 4 images.*expected 20"):
        evaluation.recall_metrics(np.zeros((4, 19)), 5)
    with pytest.raises(CoderError, match="2-D"):
        evaluation.recall_metrics(np.zeros(20), 5)
    with pytest.raises(CoderError, match="captions_per_image"):
        evaluation.recall_metrics(np.zeros((4, 20)), 0)
    with pytest.raises(CoderError, match="no images"):
        evaluation.recall_metrics(np.zeros((0, 0)), 5)
    huge = np.full((4, 20), 3e38, dtype=np.float32)  # finite, but its sum overflows float32
    assert evaluation.recall_metrics(huge, 5)["rsum"] == 200.0  # all tied: each ranks last of 4 (R@5, R@10 hit)
    for bad_value in (np.nan, np.inf):
        bad = huge.copy()
        bad[2, 3] = bad_value
        with pytest.raises(CoderError, match="non-finite"):
            evaluation.recall_metrics(bad, 5)


# --------------------------------------------------------------------------- similarities


def random_embeddings(n_img: int, cpi: int, concepts: bool, seed: int) -> Embeddings:
    gen = torch.Generator().manual_seed(seed)

    def unit(n: int, d: int) -> torch.Tensor:
        return F.normalize(torch.randn(n, d, generator=gen), dim=1)

    return Embeddings(
        unit(n_img, 8),
        unit(n_img, 6) if concepts else None,
        unit(n_img * cpi, 8),
        unit(n_img * cpi, 6) if concepts else None,
        "concat",
        captions_per_image=cpi,
    )


def direct_similarity(emb: Embeddings, mu: float) -> torch.Tensor:
    v, t = emb.image_instance.double(), emb.caption_instance.double()
    if emb.image_concept is None:
        return v @ t.T
    return (1 - mu) * (v @ t.T) + mu * (emb.image_concept.double() @ emb.caption_concept.double().T)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("concepts", [True, False])
def test_similarity_matrix_chunked_equals_direct(device: str, concepts: bool) -> None:
    emb = random_embeddings(13, 5, concepts, seed=1)
    want = direct_similarity(emb, 0.3).float()
    for chunk in (1, 4, 13, 1024):
        got = evaluation.similarity_matrix(emb, 0.3, device, chunk_size=chunk)
        assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == (13, 65)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_similarity_matrix_score_fn_and_mu_check() -> None:
    emb = random_embeddings(4, 5, True, seed=2)
    calls = []

    def score_fn(v, v_c, t, t_c, mu):
        calls.append(len(v))
        return mu * (v @ t.T)

    got = evaluation.similarity_matrix(emb, 0.5, chunk_size=3, score_fn=score_fn)
    torch.testing.assert_close(got, 0.5 * emb.image_instance @ emb.caption_instance.T)
    assert calls == [3, 1]
    with pytest.raises(CoderError, match="mu"):
        evaluation.similarity_matrix(emb, 1.5)


def test_ensemble_similarity_is_the_mean() -> None:
    a, b = random_embeddings(6, 5, True, seed=3), random_embeddings(6, 5, False, seed=4)
    got = evaluation.ensemble_similarity([a, b], [0.2, 0.0])
    want = (direct_similarity(a, 0.2) + direct_similarity(b, 0.0)) / 2
    torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=0)
    with pytest.raises(CoderError, match="different splits"):
        evaluation.ensemble_similarity([a, random_embeddings(5, 5, True, seed=5)], 0.2)


def test_embeddings_validate_counts() -> None:
    emb = random_embeddings(3, 5, True, seed=6)
    with pytest.raises(CoderError, match="14 captions for 3 images"):
        Embeddings(emb.image_instance, None, emb.caption_instance[:14], None, "concat")
    with pytest.raises(CoderError, match="both"):
        Embeddings(emb.image_instance, emb.image_concept, emb.caption_instance, None, "concat")


# --------------------------------------------------------------------------- protocols


def test_coco_metrics_is_the_fold_mean() -> None:
    sims = random_sims(30, 5, ties=True, seed=8)
    got = evaluation.coco_metrics(sims, 5, fold_size=10)
    folds = [naive_metrics(sims[f : f + 10, 5 * f : 5 * (f + 10)], 5) for f in (0, 10, 20)]
    assert_metrics_close(got["1k"], {key: statistics.fmean(fold[key] for fold in folds) for key in folds[0]})
    assert_metrics_close(got["5k"], naive_metrics(sims, 5))
    with pytest.raises(CoderError, match="multiple of 1000 images, got 30"):
        evaluation.coco_metrics(sims, 5)


def test_coco_default_folds_of_1000_images() -> None:
    rng = np.random.default_rng(9)
    sims = rng.random((2000, 10000), dtype=np.float32)
    got = evaluation.coco_metrics(sims, 5)
    folds = [evaluation.recall_metrics(sims[f : f + 1000, 5 * f : 5 * (f + 1000)], 5) for f in (0, 1000)]
    assert got["1k"]["rsum"] == pytest.approx((folds[0]["rsum"] + folds[1]["rsum"]) / 2)
    assert got["5k"] == evaluation.recall_metrics(sims, 5)


def test_protocol_dispatch_and_table() -> None:
    sims = np.repeat(np.eye(4), 5, axis=1)
    assert evaluation.protocol_metrics(sims, "f30k")["rsum"] == 600.0
    with pytest.raises(CoderError, match="unknown evaluation protocol 'x'"):
        evaluation.protocol_metrics(sims, "x")
    table = evaluation.format_table(evaluation.recall_metrics(sims, 5))
    assert "R@1" in table and "image->text" in table and "text->image" in table and "600.00" in table
    nested = evaluation.format_table(
        {"1k": evaluation.recall_metrics(sims, 5), "5k": evaluation.recall_metrics(sims, 5)}
    )
    assert "[1k] image->text" in nested and "[5k] rsum" in nested


# --------------------------------------------------------------------------- sweep_mu


def informative(n_img: int, cpi: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image/caption embeddings that match perfectly (own captions identical to the image)."""
    images = F.normalize(torch.randn(n_img, 16, generator=torch.Generator().manual_seed(seed)), dim=1)
    return images, images.repeat_interleave(cpi, dim=0)


def test_sweep_mu_picks_the_informative_branch() -> None:
    noise = random_embeddings(20, 5, True, seed=10)
    img, cap = informative(20, 5, seed=11)
    concept_good = Embeddings(noise.image_instance, img, noise.caption_instance, cap, "concat")
    best, table = evaluation.sweep_mu(concept_good, [0.0, 0.3, 1.0])
    assert best == 1.0 and table[1.0] == 600.0 and table[0.0] < 300
    instance_good = Embeddings(img, noise.image_concept, cap, noise.caption_concept, "concat")
    best, table = evaluation.sweep_mu([instance_good], [1.0, 0.0])
    assert best == 0.0 and table[0.0] == 600.0


def test_sweep_mu_table_matches_direct_metrics() -> None:
    members = [random_embeddings(10, 5, True, seed=12), random_embeddings(10, 5, True, seed=13)]
    mus = [0.0, 0.15, 0.5, 0.9]
    best, table = evaluation.sweep_mu(members, mus)
    for mu in mus:
        sims = (direct_similarity(members[0], mu) + direct_similarity(members[1], mu)) / 2
        assert table[mu] == pytest.approx(naive_metrics(sims.numpy(), 5)["rsum"])
    assert table[best] == max(table.values()) and best == next(m for m in mus if table[m] == table[best])
    with pytest.raises(CoderError, match="no model has a concept branch"):
        evaluation.sweep_mu(random_embeddings(4, 5, False, seed=14), mus)


# --------------------------------------------------------------------------- encode_split


VOCAB_SIZE, REGIONS, FEAT, N_CONCEPTS = 30, 3, 5, 4


class TinyModel(torch.nn.Module):
    """Contract-shaped model: dropout makes train/eval mode visible in the outputs."""

    def __init__(self, concepts: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.concepts = concepts
        self.cfg = types.SimpleNamespace(fusion="concat")  # S as the concat fusion: (1-mu)s + mu s_c
        self.image_proj = torch.nn.Linear(FEAT, 6)
        self.words = torch.nn.Embedding(VOCAB_SIZE, 6, padding_idx=0)
        self.image_concept = torch.nn.Linear(FEAT, 3)
        self.text_concept = torch.nn.Linear(N_CONCEPTS, 3)
        self.dropout = torch.nn.Dropout(0.5)
        self.image_rows = 0
        self.modes: set[tuple[bool, bool]] = set()

    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.modes.add((self.training, torch.is_grad_enabled()))
        self.image_rows += len(images)
        pooled = self.dropout(images.mean(dim=1))
        concept = F.normalize(self.image_concept(pooled), dim=1) if self.concepts else None
        return F.normalize(self.image_proj(pooled), dim=1), concept

    def encode_captions(self, captions: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.modes.add((self.training, torch.is_grad_enabled()))
        tokens, lengths, mask = captions["tokens"], captions["lengths"], captions["attention_mask"]
        summed = (self.words(tokens) * mask[..., None]).sum(dim=1) / lengths[:, None]
        concept = F.normalize(self.text_concept(captions["concept_labels"]), dim=1) if self.concepts else None
        return F.normalize(self.dropout(summed), dim=1), concept


class FakeTokenizer:
    pad_id = 0

    def encode(self, caption: str) -> list[int]:
        return [1 + sum(map(ord, word)) % (VOCAB_SIZE - 1) for word in caption.split()]


class FakeGraph:
    words = ["dog", "cat", "man", "ball"]

    def multi_hot(self, tokens: list[str]) -> np.ndarray:
        return np.array([w in tokens for w in self.words], dtype=np.float32)


def fake_data_module() -> types.ModuleType:
    """The data.py contract (datasets + collate) in a few lines: evaluation checked apart from data.py."""
    module = types.ModuleType("data")

    class ImageDataset(torch.utils.data.Dataset):
        def __init__(self, split):
            self.split = split

        def __len__(self):
            return len(self.split.images)

        def __getitem__(self, i):
            return {"image": torch.from_numpy(np.array(self.split.images[i])), "image_id": i}

    class CaptionDataset(torch.utils.data.Dataset):
        def __init__(self, split, tokenizer, graph, text_states=None):
            self.split, self.tokenizer, self.graph = split, tokenizer, graph

        def __len__(self):
            return len(self.split.captions)

        def __getitem__(self, j):
            text = self.split.captions[j]
            item = {
                "tokens": torch.tensor(self.tokenizer.encode(text)),
                "caption_id": j,
                "image_id": j // self.split.captions_per_image,
            }
            if self.graph is not None:
                item["concept_labels"] = torch.from_numpy(self.graph.multi_hot(text.split()))
            return item

    def collate(items, pad_id=0):
        out = {}
        if "image" in items[0]:
            out["images"] = torch.stack([it["image"] for it in items])
        if "tokens" in items[0]:
            lengths = torch.tensor([len(it["tokens"]) for it in items])
            out["tokens"] = torch.nn.utils.rnn.pad_sequence([it["tokens"] for it in items], True, pad_id)
            out["lengths"] = lengths
            out["attention_mask"] = (torch.arange(out["tokens"].shape[1])[None] < lengths[:, None]).long()
            out["caption_ids"] = torch.tensor([it["caption_id"] for it in items])
        if "concept_labels" in items[0]:
            out["concept_labels"] = torch.stack([it["concept_labels"] for it in items])
        out["image_ids"] = torch.tensor([it["image_id"] for it in items])
        return out

    module.ImageDataset, module.CaptionDataset, module.collate = ImageDataset, CaptionDataset, collate
    return module


WORDS = ["dog", "cat", "man", "ball", "a", "runs", "on", "grass", "red"]


def fake_split(n_img: int, cpi: int) -> types.SimpleNamespace:
    rng = np.random.default_rng(0)
    captions = [" ".join(rng.choice(WORDS, size=rng.integers(2, 7))) for _ in range(n_img * cpi)]
    return types.SimpleNamespace(
        images=rng.normal(size=(n_img, REGIONS, FEAT)).astype(np.float32), captions=captions, captions_per_image=cpi
    )


def per_item_embeddings(model: TinyModel, split, tokenizer, graph) -> tuple[torch.Tensor, ...]:
    """Reference: every image and caption encoded alone (no padding, no batching)."""
    model.eval()
    with torch.no_grad():
        images = [model.encode_images(torch.from_numpy(img)[None]) for img in split.images]
        captions = []
        for text in split.captions:
            tokens = torch.tensor([tokenizer.encode(text)])
            labels = torch.from_numpy(graph.multi_hot(text.split()))[None] if graph else None
            mask = torch.ones_like(tokens)
            batch = {"tokens": tokens, "lengths": torch.tensor([tokens.shape[1]]), "attention_mask": mask}
            captions.append(model.encode_captions({**batch, "concept_labels": labels}))
    model.image_rows, model.modes = 0, set()

    def cat(parts: list, k: int) -> torch.Tensor | None:
        return None if parts[0][k] is None else torch.cat([p[k] for p in parts])

    return cat(images, 0), cat(images, 1), cat(captions, 0), cat(captions, 1)


@pytest.mark.parametrize("concepts", [True, False])
def test_encode_split_with_fake_data_module(monkeypatch: pytest.MonkeyPatch, concepts: bool) -> None:
    monkeypatch.setitem(sys.modules, "data", fake_data_module())
    split, tokenizer = fake_split(7, 5), FakeTokenizer()
    graph = FakeGraph() if concepts else None
    model = TinyModel(concepts)
    want = per_item_embeddings(model, split, tokenizer, graph)
    model.train()
    emb = evaluation.encode_split(model, split, tokenizer, graph, "cpu", batch_size=4, progress=False)
    assert model.training, "training mode must be restored"
    assert model.modes == {(False, False)}, "encoders must run in eval mode under no_grad"
    assert model.image_rows == 7, "each image is encoded exactly once"
    got = (emb.image_instance, emb.image_concept, emb.caption_instance, emb.caption_concept)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            assert g.dtype == torch.float32 and not g.requires_grad
            torch.testing.assert_close(g, w, atol=1e-6, rtol=0)
    assert emb.captions_per_image == 5 and emb.has_concepts == concepts
    model.eval()
    evaluation.encode_split(model, split, tokenizer, graph, "cpu", batch_size=64, progress=False)
    assert not model.training


def test_evaluate_ensemble_with_fake_data_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "data", fake_data_module())
    split, tokenizer, graph = fake_split(6, 5), FakeTokenizer(), FakeGraph()
    models = [TinyModel(True), TinyModel(False)]
    torch.nn.init.normal_(models[1].image_proj.weight, generator=torch.Generator().manual_seed(1))
    embs = [
        Embeddings(*per_item_embeddings(m, split, tokenizer, graph if m.concepts else None), "concat") for m in models
    ]
    sims = (direct_similarity(embs[0], 0.2) + direct_similarity(embs[1], 0.2)) / 2
    got = evaluation.evaluate(models, split, tokenizer, [graph, None], "cpu", mu=0.2, batch_size=4, progress=False)
    assert_metrics_close(got, naive_metrics(sims.float().numpy(), 5))
    with pytest.raises(CoderError, match="1 tokenizers for 2 models"):
        evaluation.evaluate(models, split, [tokenizer], graph, "cpu", mu=0.2, progress=False)


def test_encode_split_with_real_data_module(tmp_path) -> None:
    """The same check through data.load_split / ImageDataset / CaptionDataset / collate."""
    import data
    from concepts import ConceptGraph
    from vocab import Vocabulary

    rng = np.random.default_rng(1)
    n_img, cpi = 5, 5
    np.save(tmp_path / "dev_ims.npy", rng.normal(size=(n_img, REGIONS, FEAT)).astype(np.float32))
    captions = [" ".join(rng.choice(WORDS, size=rng.integers(2, 7))) + " ." for _ in range(n_img * cpi)]
    (tmp_path / "dev_caps.txt").write_text("\n".join(captions) + "\n")
    split = data.load_split(tmp_path, "dev")
    tokenizer = Vocabulary.from_words(WORDS + ["."])
    assert len(tokenizer) <= VOCAB_SIZE
    n = len(FakeGraph.words)
    graph = ConceptGraph(list(FakeGraph.words), np.ones(n), np.eye(n), np.zeros((n, 2), np.float32))
    model = TinyModel(concepts=True)
    plain = types.SimpleNamespace(images=np.load(tmp_path / "dev_ims.npy"), captions=captions, captions_per_image=cpi)
    want = per_item_embeddings(model, plain, tokenizer, graph)
    model.train()
    emb = evaluation.encode_split(model, split, tokenizer, graph, "cpu", batch_size=3, progress=False)
    assert model.training and model.image_rows == n_img and model.modes == {(False, False)}
    got = (emb.image_instance, emb.image_concept, emb.caption_instance, emb.caption_concept)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=0)
