"""Every command-line value checked where it is parsed, before any work starts.

One table of rules for the train scripts' options (`check_train_config`), and argparse types and
output checks for the other scripts (eval, extraction, vocabulary, concepts, retrieval). Each
failure is a CoderError of one line that names the option and what is wrong with it.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, NoReturn

from utils import CoderError, path_problem

PROJECT_ROOT = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------- value rules

Check = Callable[[Any], bool]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _at_most(high: float) -> str:
    return f" and at most {high:g}" if math.isfinite(high) else ""


def at_least(low: float, high: float = math.inf) -> tuple[Check, str]:
    return (lambda v: _finite(v) and low <= v <= high), f"must be at least {low:g}{_at_most(high)}"


def above(low: float, high: float = math.inf) -> tuple[Check, str]:
    return (lambda v: _finite(v) and low < v <= high), f"must be greater than {low:g}{_at_most(high)}"


def within(low: float, high: float) -> tuple[Check, str]:
    return (lambda v: _finite(v) and low <= v <= high), f"must lie in [{low:g}, {high:g}]"


def one_of(*choices: str) -> tuple[Check, str]:
    return (lambda v: v in choices), f"must be one of {', '.join(choices)}"


FINITE = (_finite, "must be a finite number")

# The options with a fixed set of values, read by every check of them (TRAIN_RULES below,
# model.ModelConfig, the trainer's autocast, distributed.Dist).
CHOICES: dict[str, tuple[str, ...]] = {
    "image_pooling": ("attn", "mean", "gpo"),
    "text_pooling": ("attn", "mean", "gpo"),
    "text_encoder": ("bigru", "bert"),
    "concept_query_input": ("bn", "detach", "no_bn"),
    "prototype_init": ("random", "keys"),
    "prototype_update": ("ema", "learned"),
    "loss": ("dcl", "triplet"),
    "fusion": ("concat", "weighted_sum"),
    "dcl_weight_groups": ("joint", "separate"),
    "grad_clip_scope": ("global", "branch"),
    "device": ("auto", "cuda", "cpu"),
    "amp": ("auto", "bf16", "fp16", "off"),
}

# The train scripts' options (train_f30k.py, train_coco.py). Options not listed are free
# strings (paths are checked by `check_train_config`) or booleans (checked when parsed).
TRAIN_RULES: dict[str, tuple[Check, str]] = {
    "val_max_images": (
        lambda v: v == 0 or v >= 2,
        "must be 0 (every image) or at least 2 (among one image every recall is 100%)",
    ),
    "embed_dim": (
        at_least(2)[0],
        "must be at least 2 (unit vectors of one dimension are +1 or -1: every similarity would be +1 or -1)",
    ),
    "image_pooling": one_of(*CHOICES["image_pooling"]),
    "text_pooling": one_of(*CHOICES["text_pooling"]),
    "text_encoder": one_of(*CHOICES["text_encoder"]),
    "word_dim": at_least(1),
    "bert_length_groups": at_least(1),
    "bert_frozen_layers": at_least(0),
    "concept_threshold": within(0.0, 1.0),
    "gcn_hidden": at_least(1),
    "concept_score_scale": above(0.0, 1000.0),
    "label_mix_ratio": within(0.0, 1.0),
    "concept_query_input": one_of(*CHOICES["concept_query_input"]),
    "momentum": within(0.0, 1.0),
    "queue_size": at_least(0),
    "num_prototypes": (
        at_least(2)[0],
        "must be at least 2 (with one prototype every embedding gets the same pseudo label: no signal)",
    ),
    "sinkhorn_epsilon": at_least(0.01, 10.0),  # below ~0.02 rows underflow (loss.sinkhorn_kernel)
    "sinkhorn_iterations": at_least(1, 1000),
    "prototype_momentum": within(0.0, 1.0),
    "prototype_init": one_of(*CHOICES["prototype_init"]),
    "prototype_update": one_of(*CHOICES["prototype_update"]),
    "loss": one_of(*CHOICES["loss"]),
    "tau": at_least(1e-3, 100.0),  # logits are cosines / tau: 1e-30 gives infinite gradients
    "beta": within(-1000.0, 1000.0),
    "beta_warmup_epochs": at_least(0),
    "dcl_weight_groups": one_of(*CHOICES["dcl_weight_groups"]),
    "false_negative_threshold": within(0.0, 1.0),
    "margin": at_least(0.0, 2.0),  # cosine similarities differ by at most 2
    "triplet_all_negatives_epochs": at_least(0),
    "region_drop": within(0.0, 1.0),  # 1: one region per image (one is always kept)
    "lambda_concept": at_least(0.0, 1000.0),
    "lambda_pseudo": at_least(0.0, 1000.0),
    "lambda_fused": at_least(0.0, 1000.0),
    "lambda_kl": at_least(0.0, 1000.0),
    "tau_pseudo": at_least(1e-3, 100.0),
    "mu": within(0.0, 1.0),
    "fusion": one_of(*CHOICES["fusion"]),
    "epochs": at_least(1, 100000),
    "batch_size": (
        at_least(2)[0],
        "must be at least 2 (a caption's negatives start with the batch's other images; BatchNorm needs 2)",
    ),
    "lr": above(0.0, 10.0),
    "bert_lr_scale": at_least(0.0, 100.0),
    "weight_decay": at_least(0.0, 10.0),
    "warmup_epochs": at_least(0),
    "lr_decay_epoch": at_least(0),
    "lr_decay_factor": above(0.0, 1.0),
    "grad_clip": above(0.0),
    "grad_clip_scope": one_of(*CHOICES["grad_clip_scope"]),
    "freeze_bert_epochs": at_least(0),
    "seed": at_least(0, 2**32 - 1),  # numpy's seed range
    "device": one_of(*CHOICES["device"]),
    "amp": one_of(*CHOICES["amp"]),
    "dist_timeout": above(0.0, 10080.0),  # minutes: at most a week
    "workers": at_least(0, 256),
    "eval_batch_size": at_least(1),
    "log_every": at_least(1),
    "diag_every": at_least(0),
    "val_every_steps": at_least(0),
    "checkpoint_every_steps": at_least(0),
}


# Names other code bases use for some options.
ALIASES = {
    "learning_rate": "lr",
    "num_epochs": "epochs",
    "max_epochs": "epochs",
    "bs": "batch_size",
    "wd": "weight_decay",
    "output_dir": "run_dir",
    "out_dir": "run_dir",
    "checkpoint": "resume",
    "num_workers": "workers",
    "temperature": "tau",
    "embed_size": "embed_dim",
    "queue_length": "queue_size",
}


def closest(name: str, valid: Iterable[str], n: int = 3) -> list[str]:
    """Up to n valid names that look like `name` (for 'did you mean')."""
    valid = list(valid)
    alias = [ALIASES[name]] if ALIASES.get(name) in valid else []
    return (alias + [m for m in difflib.get_close_matches(name, valid, n=n, cutoff=0.6) if m not in alias])[:n]


def unknown_option(name: str, valid: Iterable[str]) -> CoderError:
    near = closest(name, valid)
    hint = (
        f"; did you mean {' or '.join('--' + n for n in near)}?"
        if near
        else "; see the variables at the top of the script"
    )
    return CoderError(f"unknown option --{name}{hint}")


def check_values(config: dict[str, Any], owner: str = "") -> None:
    """Each option's type-independent rule (range, choices); the first failure is raised, named
    as an option, or as `owner: name=value` (e.g. owner "model config")."""
    for name, (check, text) in TRAIN_RULES.items():
        if name in config and not check(config[name]):
            named = f"{owner}: {name}={config[name]!r}" if owner else f"--{name} {config[name]}:"
            raise CoderError(f"{named} {text}")


def _split_files(root: Path, split: str) -> list[Path]:
    return [root / f"{split}_ims.npy", root / f"{split}_caps.txt"]


def check_train_config(config: dict[str, Any], resuming: bool) -> None:
    """Every value and every named file of a train config, before any work starts."""
    check_values(config)
    if config["run_dir"]:
        check_writable_dir(config["run_dir"], "--run_dir")
    root = Path(config["data_path"])
    if problem := path_problem(root, True, "data folder"):
        raise CoderError(f"--data_path {root}: {problem}")
    splits = [("train_split", config["train_split"]), ("val_split", config["val_split"])]
    if config["test_split"]:
        splits.append(("test_split", config["test_split"]))
    for option, split in splits:
        folder = next((p for p in _split_files(root, split) if p.is_dir()), None)
        if folder is not None:
            raise CoderError(f"--{option} {split}: {folder} is a folder, expected a file")
        missing = [p.name for p in _split_files(root, split) if not p.is_file()]
        if missing:
            have = sorted({p.name[: -len("_ims.npy")] for p in root.glob("*_ims.npy")})
            near = closest(split, have)
            hint = f"; did you mean '{near[0]}'?" if near else f" (splits there: {', '.join(have) or 'none'})"
            raise CoderError(f"--{option} {split}: {root} has no {' or '.join(missing)}{hint}")
    if (
        config["text_encoder"] == "bigru"
        and not resuming
        and (problem := path_problem(config["vocab_path"], False, "vocabulary file"))
    ):
        raise CoderError(
            f"--vocab_path {config['vocab_path']}: {problem} (the bigru text encoder needs one; "
            f"build it with vocab.py build)"
        )
    if (
        config["concept_branch"]
        and not resuming
        and (problem := path_problem(config["concept_path"], True, "concept folder"))
    ):
        raise CoderError(f"--concept_path {config['concept_path']}: {problem} (or pass --concept_branch false)")
    if config["word_vectors"] not in ("", "glove-package") and (
        problem := path_problem(config["word_vectors"], False, "word-vector file")
    ):
        raise CoderError(f"--word_vectors {config['word_vectors']}: {problem} (a GloVe text file, or glove-package)")
    if config["text_encoder"] == "bigru" and config["bert_frozen_layers"]:
        raise CoderError("--bert_frozen_layers needs --text_encoder bert")
    if config["freeze_bert_epochs"] and config["text_encoder"] != "bert":
        raise CoderError("--freeze_bert_epochs needs --text_encoder bert")
    if config["text_encoder"] == "bert" and config["bert_frozen_layers"] and config["text_state_cache"] != "off":
        from text_cache import cache_dir

        folder = cache_dir(config["text_state_cache"], root)
        shown = f"auto ({folder})" if config["text_state_cache"] == "auto" else None
        check_writable_dir(folder, "--text_state_cache", shown)
    if config["resume"] and (problem := path_problem(config["resume"], False, "checkpoint file")):
        raise CoderError(f"--resume {config['resume']}: {problem}")
    if config["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CoderError("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")


def training_memory(config: dict[str, Any], regions: int, feature_dim: int, vocab_size: int) -> dict[str, int]:
    """Rough bytes of a run's largest allocations, by the option that sizes each (float32;
    weights counted five times: themselves, gradients, two Adam moments, the momentum copy)."""
    dim, word, floats = config["embed_dim"], config["word_dim"], 4
    weights = (
        feature_dim * dim
        + vocab_size * word
        + 6 * (word + dim) * dim
        + config["num_prototypes"] * dim
        + word * config["gcn_hidden"]
        + config["gcn_hidden"] * dim
    )
    queue = config["queue_size"]
    widest = max(dim, feature_dim)
    return {
        "embed_dim": 5 * floats * weights,
        # the queues, their prototype kernel, and the batch's logits against them
        "queue_size": floats * queue * (4 * dim + 2 * config["num_prototypes"] + 12 * config["batch_size"]),
        "batch_size": floats * config["batch_size"] * (16 * regions * widest + 12 * config["batch_size"]),
        "eval_batch_size": floats * 4 * config["eval_batch_size"] * regions * widest,
    }


def check_training_memory(
    config: dict[str, Any], regions: int, feature_dim: int, vocab_size: int, available: int, where: str
) -> None:
    """Refuse, before anything is allocated, a run whose estimate exceeds the memory `where`
    has (a queue of 10^11 entries would otherwise end in an allocator traceback)."""
    parts = training_memory(config, regions, feature_dim, vocab_size)
    total = sum(parts.values())
    if total > available:
        option = max(parts, key=parts.get)
        raise CoderError(
            f"--{option} {config[option]}: the run needs about {total / 2**30:,.1f} GiB "
            f"({option}: {parts[option] / 2**30:,.1f} GiB), more than the {available / 2**30:,.1f} GiB "
            f"of {where}; lower it"
        )


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


# Named sets of values for `--preset NAME`, applied before the command line's other options
# (which may still change any of them). "spec": the first reconstruction where the scripts'
# defaults differ from it (DCL sharpness 10, the BN concept query, one global gradient clip;
# docs/method.md).
# DCL's weights as one softmax over every negative, no warm-up, no negative dropped.
_PLAIN_DCL = {
    "beta_warmup_epochs": 0,
    "beta_adaptive": False,
    "dcl_weight_groups": "joint",
    "false_negative_threshold": 0.0,
}
PRESETS: dict[str, dict[str, Any]] = {
    # the reconstruction's first reading: beta 10, the concept query with gradient, one clip
    "spec": {"beta": 10.0, **_PLAIN_DCL, "concept_query_input": "bn", "grad_clip_scope": "global"},
    # momentum InfoNCE (DCL's weights off) with the concept branch as an inference-time re-ranker
    "infonce_reranker": {"beta": 0.0, **_PLAIN_DCL, "concept_query_input": "detach"},
}


def parse_overrides(defaults: dict[str, Any], argv: list[str]) -> tuple[dict[str, Any], bool, set[str]]:
    """Apply `--preset NAME` (see PRESETS), then the `--name value` (or `--name=value`)
    overrides; returns (config, demo flag, the names the command line set, the preset's among them).

    Values take the type of the default (booleans accept true/false/1/0/yes/no). An unknown
    name is an error that lists the valid ones.
    """
    given: dict[str, Any] = {}
    demo, preset = False, {}
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
        if name not in defaults and name != "preset":
            raise unknown_option(name, [*defaults, "demo", "preset"])
        if not value:
            if not args:
                raise CoderError(f"option --{name} needs a value")
            value = args.pop(0)
        if name == "preset":
            if value not in PRESETS:
                raise CoderError(f"--preset {value}: unknown preset; choose one of {', '.join(PRESETS)}")
            preset = PRESETS[value]
        else:
            given[name] = _convert(name, value, defaults[name])
    config = {**defaults, **{k: v for k, v in preset.items() if k in defaults}, **given}
    explicit = set(given) | (set(preset) & set(defaults))
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


# Settings a resumed run may change; everything else must stay as the checkpoint has it
# (bert_path: a moved BERT folder, read only for a checkpoint without its text encoder's files).
RESUME_MAY_CHANGE = (
    "resume",
    "run_dir",
    "overwrite",
    "epochs",
    "device",
    "workers",
    "progress",
    "log_every",
    "eval_batch_size",
    "val_every_steps",
    "checkpoint_every_steps",
    "test_split",
    "dist_timeout",
    "bert_length_groups",
    "text_state_cache",
    "diag_every",
    "data_path",
    "bert_path",
)


def script_default(name: str, script: str = "train_f30k.py") -> Any:
    """The value a training script's block gives `name`, read from its source (tools outside
    training use the scripts' defaults without importing the trainer)."""
    import ast

    tree = ast.parse((Path(__file__).parent / script).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise KeyError(f"{script} sets no '{name}'")


def script_help(defaults: dict[str, Any], script: str | Path) -> str:
    """`--help` of a training script: its docstring, then each option as the script's own line
    (`name = default  # what it is`), the presets and --demo."""
    import ast

    source = Path(script).read_text(encoding="utf-8")
    tree = ast.parse(source)
    lines = source.splitlines()
    options = [
        lines[node.lineno - 1]
        for node in tree.body
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in defaults for t in node.targets)
    ]
    return "\n".join(
        [
            (ast.get_docstring(tree) or "").strip(),
            "",
            "Options: --name value (or --name=value) for any variable below; the value is its default.",
            *(f"  {line}" for line in options),
            f"  --preset NAME: set several at once; NAME is one of {', '.join(PRESETS)} (docs/method.md)",
            "  --demo: train on generated data in data/demo (a couple of minutes on a CPU)",
        ]
    )


def script_config(variables: dict[str, Any]) -> dict[str, Any]:
    """The config a training script declares: its public top-level bool, int, float and str
    variables (pass the script's `globals()` or `vars(module)`)."""
    return {k: v for k, v in variables.items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))}


# What a run did before an option existed: a checkpoint without the option resumes (and is
# read) with this value, not today's default.
BEFORE_THE_OPTION = {
    "grad_clip_scope": "global",
    "concept_query_input": "bn",
    "beta_warmup_epochs": 0,
    "beta_adaptive": False,
    "dcl_weight_groups": "joint",
    "false_negative_threshold": 0.0,
}


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
            raise argparse.ArgumentTypeError(
                f"'{value}' is not {'an integer' if kind is int else 'a number'}"
            ) from None
        if not check(number):
            raise argparse.ArgumentTypeError(f"{value} {text}")
        return number

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def int_range(low: int, high: int) -> Callable[[str], int]:
    """An argparse type for an integer in [low, high] (an upper bound for legal but absurd sizes)."""
    return _typed(int, at_least(low, high))


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


def check_output_file(
    path: str | os.PathLike,
    option: str,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
    suffixes: Iterable[str] = (),
) -> Path:
    """An output file the command may write: not one of its inputs, not a folder, not an
    existing file unless `overwrite`, with one of `suffixes` (when given: the formats the
    writer knows), in a folder that exists or can be made and is writable, under a name the
    file system takes (tried now, see `check_writable_dir`)."""
    path = Path(path)
    suffixes = list(suffixes)
    if suffixes and path.suffix.lower() not in suffixes:
        raise CoderError(
            f"{option} {path}: cannot write a '{path.suffix or 'no extension'}' file; name it with one "
            f"of {', '.join(suffixes)}"
        )
    exists = os.path.exists(path)  # False, not an error, for a name too long
    for source in inputs:
        if Path(source).exists() and exists and path.resolve() == Path(source).resolve():
            raise CoderError(f"{option} {path}: is also an input of this command; write elsewhere")
    if os.path.isdir(path):
        raise CoderError(f"{option} {path}: is a folder; give a file name")
    if exists and not overwrite:
        raise CoderError(f"{option} {path}: exists; choose another name, or pass --overwrite to replace it")
    check_writable_dir(path.parent, option, path, file_name=None if exists else path.name)
    return path


def check_writable_dir(
    folder: str | os.PathLike, option: str, shown: str | os.PathLike | None = None, file_name: str | None = None
) -> None:
    """The folder exists, or can be made, and a file can be made in it (named `file_name`,
    when given): tried now, and what the try made removed again, so that a folder or name the
    file system refuses (a name too long, a link to nowhere on the way, a read-only or full
    disk) stops the command before its work, not when it writes its results."""
    folder = Path(folder).absolute()
    existing, missing = folder, []
    while not os.path.lexists(existing):
        existing, missing = existing.parent, [existing, *missing]
    named = f"{option} {shown or folder}:"
    if os.path.islink(existing) and not existing.exists():
        raise CoderError(f"{named} {existing} is a link to nowhere ({os.readlink(existing)})")
    if not existing.is_dir():
        raise CoderError(f"{named} {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CoderError(f"{named} {existing} is not writable")
    for attempt in range(3):
        made: list[Path] = []
        try:
            for part in missing:
                try:
                    part.mkdir()
                    made.append(part)
                except FileExistsError:
                    if not part.is_dir():
                        raise
            probe = folder / file_name if file_name else None
            if probe is None:
                handle, probe_name = tempfile.mkstemp(prefix=".coder-probe-", dir=folder)
                probe = Path(probe_name)
            else:
                handle = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(handle)
            probe.unlink()
            return
        except FileNotFoundError:
            # Another process making the same check (every rank of a torchrun) removed its own
            # trial folder between our steps: try again, and give up only if it keeps vanishing.
            if attempt == 2:
                raise CoderError(f"{named} cannot be written (a folder on the way keeps vanishing)") from None
        except OSError as err:
            raise CoderError(f"{named} cannot be written ({err.strerror or err})") from None
        finally:
            for part in reversed(made):
                with contextlib.suppress(OSError):  # another process has put something there since
                    part.rmdir()
