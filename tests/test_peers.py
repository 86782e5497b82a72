"""The options behind the VSE∞ and CVSE rows of bench/bench_flickr8k.py (docs/method.md, "The
peers"), each against a direct computation on tiny data, and both rows trained end to end
through the real train script."""

import json
import math
import re
import sys

import pytest
import torch

import data
import encoders as E
import evaluation
import model as M
from checkpoint import load_checkpoint, load_for_inference, model_config_from
from conftest import ROOT, TINY_TRAIN_ARGS, run_script, tiny_demo_args
from loss import concept_kl_loss, triplet_loss
from test_evaluation import naive_metrics
from test_model import build, make_batch, small_config

sys.path.insert(0, str(ROOT / "bench"))
import bench_flickr8k as B  # noqa: E402


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(
        torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1
    )


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b))


# -- VSE∞: the all-negatives warm-up and region dropping ------------------------------------


def test_triplet_over_all_negatives_matches_loops():
    img, cap = unit(5, 4, seed=1), unit(5, 4, seed=2)
    ids = torch.tensor([0, 0, 1, 2, 3])
    margin, total = 0.2, 0.0
    for i in range(5):
        positive = dot(img[i], cap[i])
        for j in range(5):
            if ids[j] != ids[i]:
                total += max(0.0, margin + dot(img[i], cap[j]) - positive)  # image i -> caption j
                total += max(0.0, margin + dot(img[j], cap[i]) - positive)  # caption i -> image j
    got = triplet_loss(img, cap, ids, margin, hardest=False).item()
    assert got == pytest.approx(total / 5, abs=1e-9)
    assert got > triplet_loss(img, cap, ids, margin, hardest=True).item()  # the hardest negative alone is less


def test_triplet_warm_up_switches_to_the_hardest_negative_at_its_epoch():
    model = build(
        small_config(
            loss="triplet",
            concept_branch=False,
            queue_size=0,
            batch_norm=False,
            margin=0.2,
            triplet_all_negatives_epochs=2,
        )
    )
    batch = make_batch()
    img, _ = model.encode_images(batch["images"])
    cap, _ = model.encode_captions(batch)
    every = triplet_loss(img, cap, batch["image_ids"], 0.2, hardest=False).item()
    hardest = triplet_loss(img, cap, batch["image_ids"], 0.2, hardest=True).item()
    for epoch, want in ((0, every), (1, every), (2, hardest), (5, hardest)):
        model.set_epoch(epoch)
        assert model(batch)["triplet_instance"].item() == pytest.approx(want, abs=1e-6), epoch


def test_kept_regions_rate_seed_and_at_least_one():
    torch.manual_seed(3)
    kept = E.kept_regions(2000, 36, 0.2, torch.device("cpu"))
    assert kept.float().mean().item() == pytest.approx(0.8, abs=0.01)
    torch.manual_seed(3)
    assert torch.equal(E.kept_regions(2000, 36, 0.2, torch.device("cpu")), kept)
    everything_dropped = E.kept_regions(50, 4, 1.0, torch.device("cpu"))
    assert everything_dropped.sum(1).tolist() == [1] * 50
    assert E.kept_regions(50, 4, 0.0, torch.device("cpu")).all()


@pytest.mark.parametrize("pooling", ["gpo", "mean"])
def test_region_drop_pools_the_kept_regions_only_and_only_in_training(pooling):
    torch.manual_seed(0)
    encoder = E.ImageEncoder(6, 8, pooling, batch_norm=False, l2norm_items=False, region_drop=0.5)
    images = torch.randn(7, 5, 6)
    torch.manual_seed(11)
    dropped = encoder.train()(images)
    torch.manual_seed(11)
    kept = E.kept_regions(7, 5, 0.5, images.device)
    assert not kept.all() and kept.any(1).all()
    encoder.eval()
    with torch.no_grad():
        for i in range(7):
            alone = encoder(images[i : i + 1, kept[i]])  # this image's kept regions, nothing dropped
            assert torch.allclose(dropped[i], alone[0], atol=1e-6), i
        full = E.ImageEncoder(6, 8, pooling, batch_norm=False, l2norm_items=False, region_drop=0.0)
        full.load_state_dict(encoder.state_dict())
        assert torch.equal(encoder(images), full.eval()(images))  # evaluation pools every region


# -- CVSE: the concept KL, the weighted-sum fusion, the fused triplet -----------------------


def test_concept_kl_matches_the_sum_by_hand():
    gen = torch.Generator().manual_seed(4)
    image = torch.softmax(torch.randn(3, 5, generator=gen, dtype=torch.float64), 1)
    caption = torch.softmax(torch.randn(3, 5, generator=gen, dtype=torch.float64), 1)
    by_hand = (
        sum(
            float(caption[b, j]) * math.log(float(caption[b, j]) / float(image[b, j]))
            for b in range(3)
            for j in range(5)
        )
        / 3
    )
    assert concept_kl_loss(image, caption).item() == pytest.approx(by_hand, abs=1e-12)
    assert concept_kl_loss(caption, caption).item() == pytest.approx(0.0, abs=1e-12)
    zero = caption.clone()
    zero[0] = torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64)  # a caption score of 0 adds 0
    assert math.isfinite(concept_kl_loss(image, zero).item())


def weighted_sum_by_hand(v, v_c, t, t_c, mu):
    out = torch.empty(len(v), len(t), dtype=torch.float64)
    for i in range(len(v)):
        a = [(1 - mu) * float(x) + mu * float(y) for x, y in zip(v[i], v_c[i])]
        for j in range(len(t)):
            b = [(1 - mu) * float(x) + mu * float(y) for x, y in zip(t[j], t_c[j])]
            out[i, j] = sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
    return out


def test_weighted_sum_fusion_is_the_cosine_of_the_weighted_sums():
    v, v_c, t, t_c = unit(3, 4, 5), unit(3, 4, 6), unit(6, 4, 7), unit(6, 4, 8)
    want = weighted_sum_by_hand(v, v_c, t, t_c, 0.15)
    assert torch.allclose(M.fused_similarity(v, v_c, t, t_c, 0.15, "weighted_sum"), want, atol=1e-12)
    assert torch.allclose(M.fused_similarity(v, v_c, t, t_c, 0.0, "weighted_sum"), v @ t.T, atol=1e-12)
    concat = (1 - 0.15) * (v @ t.T) + 0.15 * (v_c @ t_c.T)
    assert torch.allclose(M.fused_similarity(v, v_c, t, t_c, 0.15, "concat"), concat, atol=1e-12)
    emb = evaluation.Embeddings(
        v.float(), v_c.float(), t.float(), t_c.float(), captions_per_image=2, fusion="weighted_sum"
    )
    assert torch.allclose(evaluation.similarity_matrix(emb, 0.15), want.float(), atol=1e-6)


def test_a_weighted_sum_model_ranks_searches_and_trains_by_it():
    model = build(small_config(fusion="weighted_sum", batch_norm=False)).eval()
    batch = make_batch()
    with torch.no_grad():
        v, v_c = model.encode_images(batch["images"])
        t, t_c = model.encode_captions(batch)
    want = weighted_sum_by_hand(v.double(), v_c.double(), t.double(), t_c.double(), model.cfg.mu)
    assert torch.allclose(model.similarity(v, v_c, t, t_c).double(), want, atol=1e-5)
    index_vectors = model.fuse(v, v_c), model.fuse(t, t_c)  # what photo_index stores
    assert index_vectors[0].shape[1] == model.fused_dim == model.cfg.embed_dim
    assert torch.allclose((index_vectors[0] @ index_vectors[1].T).double(), want, atol=1e-5)
    assert build(small_config(fusion="concat")).fused_dim == 2 * model.cfg.embed_dim


def test_cvse_loss_is_its_four_weighted_terms():
    cfg = small_config(
        loss="triplet",
        queue_size=0,
        pseudo_label_loss=False,
        fusion="weighted_sum",
        batch_norm=False,
        triplet_all_negatives_epochs=0,
        lambda_fused=0.6,
        lambda_concept=0.2,
        lambda_kl=0.4,
        concept_query_input="bn",
    )
    model = build(cfg)
    assert not model.momentum and not model.queues.names  # no momentum encoders, no queues
    batch = make_batch()
    losses = model(batch)
    assert set(losses) == {"triplet_instance", "triplet_concept", "triplet_fused", "concept_kl", "loss"}
    queries, (image_scores, caption_scores) = model.queries(batch, model.concepts())
    v, v_c, t, t_c = (queries[name] for name in ("image", "image_concept", "text", "text_concept"))
    ids = batch["image_ids"]
    assert losses["triplet_fused"].item() == pytest.approx(
        triplet_loss(model.fuse(v, v_c), model.fuse(t, t_c), ids, cfg.margin, hardest=True).item(), abs=1e-6
    )
    assert losses["concept_kl"].item() == pytest.approx(concept_kl_loss(image_scores, caption_scores).item(), abs=1e-6)
    r, scale = cfg.label_mix_ratio, cfg.concept_score_scale  # the caption's scores carry its label prior
    predicted = model.text_query(t, model.concepts())
    mixed = r * torch.softmax(scale * batch["concept_labels"], 1) + (1 - r) * predicted
    assert torch.allclose(caption_scores, mixed, atol=1e-6)
    total = (
        losses["triplet_instance"]
        + 0.2 * losses["triplet_concept"]
        + 0.6 * losses["triplet_fused"]
        + 0.4 * losses["concept_kl"]
    )
    assert losses["loss"].item() == pytest.approx(total.item(), abs=1e-6)
    losses["loss"].backward()
    assert model.image_encoder.fc.weight.grad is not None


def test_a_cached_run_from_before_the_options_is_still_reused(tmp_path):
    wanted = {**B.script_defaults(), **B.run_settings("coder", "full", "cpu", None)}
    new = ("triplet_all_negatives_epochs", "region_drop", "lambda_kl", "fusion")
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps({k: v for k, v in wanted.items() if k not in new}))
    assert B.same_settings(saved, wanted)
    assert not B.same_settings(saved, {**wanted, "fusion": "weighted_sum"})


def test_bad_values_of_the_new_options_are_one_line_errors():
    for name, value, text in (
        ("fusion", "product", "must be one of concat, weighted_sum"),
        ("region_drop", 1.5, "must lie in [0, 1]"),
        ("lambda_kl", -1.0, "must be at least 0"),
        ("triplet_all_negatives_epochs", -1, "must be at least 0"),
    ):
        with pytest.raises(M.CoderError, match=f"model config: {name}=.* {re.escape(text)}"):
            small_config(**{name: value})


# -- the rows ---------------------------------------------------------------------------------


def test_peer_rows_are_default_rows_with_the_common_budget():
    assert {"vse_infty", "cvse"} <= set(B.DEFAULT_CONFIGS)
    vsepp = B.run_settings("vsepp", "full", "cpu", None)
    for name, own in (("vse_infty", B.VSE_INFTY), ("cvse", B.CVSE)):
        settings = B.run_settings(name, "full", "cpu", None)
        changed = {k for k in set(vsepp) | set(settings) if vsepp.get(k) != settings.get(k)}
        assert changed <= set(own), (name, changed - set(own))
        for key in ("epochs", "lr", "warmup_epochs", "lr_decay_epoch", "batch_size", "bert_frozen_layers"):
            assert settings.get(key) == vsepp.get(key), (name, key)  # absent in both: the script's value
        model_config_from({**B.script_defaults(), **settings}, image_dim=8, vocab_size=0)  # values the model takes
    cvse, long = (B.run_settings(name, "full", "cpu", None) for name in ("cvse", "cvse_long"))
    assert {k for k in set(cvse) | set(long) if cvse.get(k) != long.get(k)} == {"epochs", "lr_decay_epoch"}
    assert (long["epochs"], long["lr_decay_epoch"]) == (2 * cvse["epochs"], 2 * cvse["lr_decay_epoch"])


def row_args(name: str, bert_path: str) -> list[str]:
    """The row's own options on the tiny model: the row without the benchmark's common sizes."""
    overrides = {k: v for k, v in B.CONFIGS[name][1].items() if k != "BERT"}
    return [*B.train_args(overrides), "--text_encoder", "bert", "--bert_path", bert_path]


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    return tiny_demo_args(tmp_path_factory.mktemp("demo"), seed=2, num_train=40, num_eval=12)


TINY = [*TINY_TRAIN_ARGS, "--batch_size", "32", "--warmup_epochs", "0", "--log_every", "1", "--diag_every", "0"]


@pytest.mark.parametrize("name", ["vse_infty", "cvse"])
def test_each_peer_row_trains_end_to_end(name, tiny_demo, tiny_bert, tmp_path):
    run_dir = tmp_path / name
    run_script(
        "train_f30k.py", *tiny_demo, *TINY, *row_args(name, tiny_bert), "--epochs", "2", "--run_dir", str(run_dir)
    )
    log = (run_dir / "train.log").read_text()
    terms = {
        "vse_infty": ["triplet_instance"],
        "cvse": ["triplet_instance", "triplet_concept", "triplet_fused", "concept_kl"],
    }[name]
    for term in terms:
        assert f"loss/{term}=" in log, term
    model, tokenizer, graph, config = load_for_inference(run_dir / "best.pt")
    split = data.load_split(tiny_demo[1], "test")
    emb = evaluation.encode_split(model, split, tokenizer, graph, "cpu")
    if name == "cvse":
        assert emb.fusion == "weighted_sum"
        sims = weighted_sum_by_hand(
            emb.image_instance, emb.image_concept, emb.caption_instance, emb.caption_concept, config["mu"]
        )
    else:
        assert emb.image_concept is None
        sims = emb.image_instance.double() @ emb.caption_instance.double().T
    want = naive_metrics(sims.numpy(), split.captions_per_image)
    tested = json.loads((run_dir / "test_metrics.json").read_text())
    tested.pop("instance_rsum", None)  # a concept-branch row also reports its instance embeddings alone
    assert tested == pytest.approx(want, abs=1e-6)


def test_warm_up_and_region_drop_resume_exactly(tiny_demo, tmp_path):
    """Epoch 2 of a run resumed after epoch 1 is epoch 2 of the straight run (hardest negatives,
    the same region masks); a run still warming up in epoch 2 differs."""
    args = [*tiny_demo, *TINY, "--test_split", "", *B.train_args(B.VSE_INFTY)]
    run_script("train_f30k.py", *args, "--epochs", "2", "--run_dir", str(tmp_path / "straight"))
    run_script("train_f30k.py", *args, "--epochs", "1", "--run_dir", str(tmp_path / "resumed"))
    run_script("train_f30k.py", "--resume", str(tmp_path / "resumed" / "last.pt"), "--epochs", "2")
    run_script(
        "train_f30k.py",
        *args,
        "--epochs",
        "2",
        "--triplet_all_negatives_epochs",
        "2",
        "--run_dir",
        str(tmp_path / "warming"),
    )
    weights = {run: load_checkpoint(tmp_path / run / "last.pt")["model"] for run in ("straight", "resumed", "warming")}
    for key, value in weights["straight"].items():
        assert torch.equal(value, weights["resumed"][key]), key
    fc = "image_encoder.fc.weight"
    assert not torch.equal(weights["straight"][fc], weights["warming"][fc])  # epoch 2 still over all negatives
