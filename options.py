"""Every command-line value checked where it is parsed, before any work starts.

One table of rules for the train scripts' options (`check_train_config`), and argparse types and
output checks for the other scripts (eval, extraction, vocabulary, concepts, retrieval). Each
failure is a CoderError of one line that names the option and what is wrong with it.
"""
from __future__ import annotations

import argparse
import difflib
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, NoReturn

from utils import CoderError

PROJECT_ROOT = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------- value rules

Check = Callable[[Any], bool]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def at_least(low: float) -> tuple[Check, str]:
    return (lambda v: _finite(v) and v >= low), f"must be at least {low:g}"


def above(low: float) -> tuple[Check, str]:
    return (lambda v: _finite(v) and v > low), f"must be greater than {low:g}"


def within(low: float, high: float) -> tuple[Check, str]:
    return (lambda v: _finite(v) and low <= v <= high), f"must lie in [{low:g}, {high:g}]"


def one_of(*choices: str) -> tuple[Check, str]:
    return (lambda v: v in choices), f"must be one of {', '.join(choices)}"


FINITE = (_finite, "must be a finite number")

# The train scripts' options (train_f30k.py, train_coco.py). Options not listed are free
# strings (paths are checked by `check_train_config`) or booleans (checked when parsed).
TRAIN_RULES: dict[str, tuple[Check, str]] = {
    "val_max_images": at_least(0),
    "embed_dim": at_least(1),
    "image_pooling": one_of("attn", "mean", "gpo"),
    "text_pooling": one_of("attn", "mean", "gpo"),
    "text_encoder": one_of("bigru", "bert"),
    "word_dim": at_least(1),
    "bert_length_groups": at_least(1),
    "bert_frozen_layers": at_least(0),
    "concept_threshold": within(0.0, 1.0),
    "gcn_hidden": at_least(1),
    "concept_score_scale": above(0.0),
    "label_mix_ratio": within(0.0, 1.0),
    "concept_query_input": one_of("bn", "detach", "no_bn"),
    "momentum": within(0.0, 1.0),
    "queue_size": at_least(0),
    "num_prototypes": at_least(1),
    "sinkhorn_epsilon": above(0.0),
    "sinkhorn_iterations": at_least(1),
    "prototype_momentum": within(0.0, 1.0),
    "prototype_init": one_of("random", "keys"),
    "prototype_update": one_of("ema", "learned"),
    "loss": one_of("dcl", "triplet"),
    "tau": above(0.0),
    "beta": FINITE,
    "margin": at_least(0.0),
    "lambda_concept": at_least(0.0),
    "lambda_pseudo": at_least(0.0),
    "lambda_fused": at_least(0.0),
    "tau_pseudo": above(0.0),
    "mu": within(0.0, 1.0),
    "epochs": at_least(1),
    "batch_size": at_least(1),
    "lr": above(0.0),
    "bert_lr_scale": at_least(0.0),
    "weight_decay": at_least(0.0),
    "warmup_epochs": at_least(0),
    "lr_decay_epoch": at_least(0),
    "lr_decay_factor": above(0.0),
    "grad_clip": above(0.0),
    "grad_clip_scope": one_of("global", "branch"),
    "freeze_bert_epochs": at_least(0),
    "seed": at_least(0),
    "device": one_of("auto", "cuda", "cpu"),
    "amp": one_of("auto", "bf16", "fp16", "off"),
    "dist_timeout": above(0.0),
    "workers": at_least(0),
    "eval_batch_size": at_least(1),
    "log_every": at_least(1),
    "diag_every": at_least(0),
    "val_every_steps": at_least(0),
    "checkpoint_every_steps": at_least(0),
}


# Names other code bases use for some options.
ALIASES = {"learning_rate": "lr", "num_epochs": "epochs", "max_epochs": "epochs", "bs": "batch_size",
           "wd": "weight_decay", "output_dir": "run_dir", "out_dir": "run_dir", "checkpoint": "resume",
           "num_workers": "workers", "temperature": "tau", "embed_size": "embed_dim", "queue_length": "queue_size"}


def closest(name: str, valid: Iterable[str], n: int = 3) -> list[str]:
    """Up to n valid names that look like `name` (for 'did you mean')."""
    valid = list(valid)
    alias = [ALIASES[name]] if ALIASES.get(name) in valid else []
    return (alias + [m for m in difflib.get_close_matches(name, valid, n=n, cutoff=0.6) if m not in alias])[:n]


def unknown_option(name: str, valid: Iterable[str]) -> CoderError:
    near = closest(name, valid)
    hint = f"; did you mean {' or '.join('--' + n for n in near)}?" if near else "; see the variables at the top of the script"
    return CoderError(f"unknown option --{name}{hint}")


def check_values(config: dict[str, Any]) -> None:
    """Each option's type-independent rule (range, choices); the first failure is raised."""
    for name, (check, text) in TRAIN_RULES.items():
        if name in config and not check(config[name]):
            raise CoderError(f"--{name} {config[name]}: {text}")


def _split_files(root: Path, split: str) -> list[Path]:
    return [root / f"{split}_ims.npy", root / f"{split}_caps.txt"]


def check_train_config(config: dict[str, Any], resuming: bool) -> None:
    """Every value and every named file of a train config, before any work starts."""
    check_values(config)
    root = Path(config["data_path"])
    if not root.is_dir():
        raise CoderError(f"--data_path {root}: data folder not found")
    splits = [("train_split", config["train_split"]), ("val_split", config["val_split"])]
    if config["test_split"]:
        splits.append(("test_split", config["test_split"]))
    for option, split in splits:
        missing = [p.name for p in _split_files(root, split) if not p.is_file()]
        if missing:
            have = sorted({p.name[: -len("_ims.npy")] for p in root.glob("*_ims.npy")})
            near = closest(split, have)
            hint = f"; did you mean '{near[0]}'?" if near else f" (splits there: {', '.join(have) or 'none'})"
            raise CoderError(f"--{option} {split}: {root} has no {' or '.join(missing)}{hint}")
    if config["text_encoder"] == "bigru" and not resuming and not Path(config["vocab_path"]).is_file():
        raise CoderError(f"--vocab_path {config['vocab_path']}: vocabulary file not found (the bigru text encoder "
                         f"needs one; build it with vocab.py build)")
    if config["concept_branch"] and not resuming and not Path(config["concept_path"]).is_dir():
        raise CoderError(f"--concept_path {config['concept_path']}: concept folder not found (or pass "
                         f"--concept_branch false)")
    if config["word_vectors"] not in ("", "glove-package") and not Path(config["word_vectors"]).is_file():
        raise CoderError(f"--word_vectors {config['word_vectors']}: file not found (a GloVe text file, or glove-package)")
    if config["text_encoder"] == "bigru" and config["bert_frozen_layers"]:
        raise CoderError("--bert_frozen_layers needs --text_encoder bert")
    if config["freeze_bert_epochs"] and config["text_encoder"] != "bert":
        raise CoderError("--freeze_bert_epochs needs --text_encoder bert")
    if config["resume"] and not Path(config["resume"]).is_file():
        raise CoderError(f"--resume {config['resume']}: checkpoint file not found")
    if config["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CoderError("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")


# ----------------------------------------------------------------------------- train scripts

# The --demo configuration: the synthetic dataset (generated once, cached) and a model small
# enough to train in a couple of minutes on two CPU cores.
DEMO_OVERRIDES: dict[str, Any] = {
    "data_path": str(PROJECT_ROOT / "data_cache" / "demo" / "demo_precomp"),
    "vocab_path": str(PROJECT_ROOT / "data_cache" / "demo" / "demo_precomp" / "vocab.json"),
    "concept_path": str(PROJECT_ROOT / "data_cache" / "demo" / "demo_concepts"),
    "text_encoder": "bigru",
    "embed_dim": 256,
    "word_dim": 128,
    "gcn_hidden": 128,
    "queue_size": 1024,
    "num_prototypes": 64,
    "epochs": 6,
    "warmup_epochs": 1,
    "lr_decay_epoch": 5,
    "batch_size": 128,
    "lr": 5e-4,
    "val_max_images": 0,
    "test_split": "test",
    "workers": 0,
}


def parse_overrides(defaults: dict[str, Any], argv: list[str]) -> tuple[dict[str, Any], bool, set[str]]:
    """Apply `--name value` (or `--name=value`) overrides; returns (config, demo flag, the
    names given on the command line).

    Values take the type of the default (booleans accept true/false/1/0/yes/no). An unknown
    name is an error that lists the valid ones.
    """
    config = dict(defaults)
    demo = False
    explicit = set()
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise CoderError(f"unexpected argument '{arg}': options look like --name value")
        name, _, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if name == "demo" and not value:
            demo = True
            continue
        if name not in config:
            raise unknown_option(name, [*config, "demo"])
        if not value:
            if not args:
                raise CoderError(f"option --{name} needs a value")
            value = args.pop(0)
        config[name] = _convert(name, value, defaults[name])
        explicit.add(name)
    if demo:
        config.update({k: v for k, v in DEMO_OVERRIDES.items() if k in config and k not in explicit})
    return config, demo, explicit


def _convert(name: str, value: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            lowered = value.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return lowered in ("true", "1", "yes")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise CoderError(f"--{name}: cannot read '{value}' as {type(default).__name__}") from None
    return value


# Settings a resumed run may change; everything else must stay as the checkpoint has it.
RESUME_MAY_CHANGE = ("resume", "run_dir", "overwrite", "epochs", "device", "workers", "progress", "log_every",
                     "eval_batch_size", "val_every_steps", "checkpoint_every_steps", "test_split", "dist_timeout",
                     "bert_length_groups", "text_state_cache", "diag_every", "data_path")


def script_config(variables: dict[str, Any]) -> dict[str, Any]:
    """The config a training script declares: its public top-level bool, int, float and str
    variables (pass the script's `globals()` or `vars(module)`)."""
    return {k: v for k, v in variables.items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))}


# What a run did before an option existed, where the option's default has changed since: a
# checkpoint without the option resumes with this value, not today's default.
BEFORE_THE_OPTION = {"grad_clip_scope": "global", "concept_query_input": "bn"}


def resumed_config(config: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    """The checkpoint's config, with the command line's changes to `RESUME_MAY_CHANGE` only
    (options newer than the checkpoint take the value that keeps its behaviour, else the
    script's default)."""
    from checkpoint import load_checkpoint

    saved = load_checkpoint(config["resume"])["config"]
    saved = {**{k: v for k, v in BEFORE_THE_OPTION.items() if k not in saved}, **saved}
    refused = sorted(k for k in explicit if k not in RESUME_MAY_CHANGE and config[k] != saved.get(k, config[k]))
    if refused:
        raise CoderError(f"{config['resume']}: a resumed run keeps its configuration; cannot change "
                         f"{', '.join('--' + k for k in refused)} (allowed: "
                         f"{', '.join('--' + k for k in RESUME_MAY_CHANGE[1:])})")
    return {**config, **saved, **{k: config[k] for k in explicit if k in RESUME_MAY_CHANGE},
            "resume": config["resume"]}


# ----------------------------------------------------------------------------- argparse types


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: prog: message (see --help)`, status 2, instead of
    the usage block followed by the message."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")



def _typed(kind: type, rule: tuple[Check, str]) -> Callable[[str], Any]:
    check, text = rule

    def parse(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{value}' is not {'an integer' if kind is int else 'a number'}") from None
        if not check(number):
            raise argparse.ArgumentTypeError(f"{value} {text}")
        return number

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _typed(int, at_least(1))
non_negative_int = _typed(int, at_least(0))
fraction = _typed(float, within(0.0, 1.0))
positive_float = _typed(float, above(0.0))


def torch_device(value: str) -> str:
    """A device argparse type: cpu, cuda or cuda:N, refused when CUDA is asked for and absent."""
    import torch

    if value != "cpu" and not value.startswith("cuda"):
        raise argparse.ArgumentTypeError(f"'{value}': expected cpu, cuda or cuda:N")
    try:
        device = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"'{value}': expected cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{value}: CUDA is not available on this machine (use cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{value}: this machine has {torch.cuda.device_count()} GPU(s)")
    return value


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- outputs


def check_output_file(path: str | os.PathLike, option: str, overwrite: bool = False,
                      inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """An output file the command may write: not one of its inputs, not a folder, not an
    existing file unless `overwrite`, in a folder that exists or can be made and is writable."""
    path = Path(path)
    for source in inputs:
        if Path(source).exists() and path.exists() and path.resolve() == Path(source).resolve():
            raise CoderError(f"{option} {path}: is also an input of this command; write elsewhere")
    if path.is_dir():
        raise CoderError(f"{option} {path}: is a folder; give a file name")
    if path.exists() and not overwrite:
        raise CoderError(f"{option} {path}: exists; choose another name, or pass --overwrite to replace it")
    check_writable_dir(path.parent, option, path)
    return path


def check_writable_dir(folder: str | os.PathLike, option: str, shown: str | os.PathLike | None = None) -> None:
    """The folder exists and is writable, or its nearest existing ancestor is (so it can be made)."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CoderError(f"{option} {shown or folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CoderError(f"{option} {shown or folder}: {existing} is not writable")
