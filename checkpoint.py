"""Checkpoints: atomic writes, safe loading (weights_only), strict state restoring, and
rebuilding a model with its tokenizer and concept graph for inference."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from options import BEFORE_THE_OPTION, RESUME_MAY_CHANGE
from utils import CoderError, atomic_write, load_pretrained, open_input

CHECKPOINT_FORMAT = "coder-checkpoint-v1"

RECORD_DIR = "bench/results"


def code_version(root: str | os.PathLike | None = None) -> str:
    """The git commit of the code (with '+dirty' for uncommitted changes), or 'unknown'. The
    benchmark record (RECORD_DIR) is not code: a benchmark rewriting its table between runs
    leaves the next run's version clean. `root` is the checkout (this file's folder by default)."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", f":(exclude){RECORD_DIR}"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write `state` atomically: a crash mid-write leaves the previous checkpoint intact."""
    state = {"format": CHECKPOINT_FORMAT, **state}
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without executing pickled code (`weights_only=True`)."""
    path = Path(path)
    if path.is_dir():
        raise CoderError(f"{path}: is a folder; give the checkpoint file (best.pt or last.pt)")
    if not path.is_file():
        raise CoderError(f"{path}: checkpoint file not found")
    with open_input(path, "checkpoint file") as f:  # unreadable or empty: one line
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # torch.save writes a zip archive
        raise CoderError(f"{path}: not a checkpoint (not a PyTorch zip archive; an empty, text or foreign file)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's message would suggest weights_only=False, i.e. running the file's code: never.
        raise CoderError(
            f"{path}: holds objects other than tensors and plain containers; refusing to load it "
            f"(this project's checkpoints never do)"
        ) from None
    except Exception as err:  # torch raises many types for truncated or corrupt archives
        raise CoderError(
            f"{path}: truncated or corrupt checkpoint ({type(err).__name__}); use another "
            f"checkpoint, e.g. best.pt or last.pt of the same run"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CoderError(f"{path}: not a CODER checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    return state


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_graph(v: Any) -> bool:
    return v is None or (
        isinstance(v, dict)
        and isinstance(v.get("words"), list)
        and all(isinstance(v.get(k), torch.Tensor) for k in ("counts", "cooccurrence", "word_vectors"))
    )


# What every checkpoint holds, and what a resume needs besides (training writes them all).
CHECKPOINT_KEYS: dict[str, tuple[Any, str]] = {
    "config": (lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v), "a dict of options"),
    "model": (
        lambda v: isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values()),
        "a dict of tensors",
    ),
    "image_dim": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "vocab_words": (
        lambda v: v is None or (isinstance(v, list) and all(isinstance(w, str) for w in v)),
        "a list of words or None",
    ),
    "concept_graph": (_is_graph, "a dict with words, counts, cooccurrence, word_vectors, or None"),
}
RESUME_KEYS: dict[str, tuple[Any, str]] = {
    "optimizer": (lambda v: isinstance(v, dict) and "state" in v and "param_groups" in v, "an optimizer state"),
    "scaler": (lambda v: isinstance(v, dict), "a dict"),
    "rng": (lambda v: isinstance(v, list) and len(v) > 0, "a list of random states"),
    "epoch": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "step_in_epoch": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "global_step": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "best_rsum": (lambda v: isinstance(v, (int, float)), "a number"),
}


def _check_keys(path: str | os.PathLike, state: dict[str, Any], keys: dict[str, tuple[Any, str]]) -> None:
    for key, (check, text) in keys.items():
        if key not in state:
            raise CoderError(f"{path}: checkpoint has no '{key}' (written by another program, or damaged)")
        if not check(state[key]):
            raise CoderError(f"{path}: checkpoint's '{key}' is not {text} (found {type(state[key]).__name__})")


# Options every use of a checkpoint reads (others fall back to the model's defaults).
REQUIRED_OPTIONS = ("text_encoder", "mu", "data_path")

# The BERT folder's files but the weights (config, tokenizer), by file name, as bytes: what
# rebuilds a checkpoint's text encoder and tokenizer wherever the folder went. Plain names only,
# as they are written into a folder again.
TEXT_ENCODER_FILES = "text_encoder_files"
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _is_file_dict(v: Any) -> bool:
    return (
        isinstance(v, dict)
        and "config.json" in v
        and all(
            isinstance(k, str)
            and _PLAIN_NAME.fullmatch(k)
            and isinstance(t, torch.Tensor)
            and t.dtype == torch.uint8
            and t.dim() == 1
            for k, t in v.items()
        )
    )


def check_checkpoint_contents(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Each key a checkpoint must hold, of the right type; the saved options present and
    within their ranges; finite weights. One line naming the file and the first problem."""
    _check_keys(path, state, CHECKPOINT_KEYS)
    if state.get(TEXT_ENCODER_FILES) is not None and not _is_file_dict(state[TEXT_ENCODER_FILES]):
        raise CoderError(
            f"{path}: checkpoint's '{TEXT_ENCODER_FILES}' is not a dict of plain file names (with "
            f"config.json) to byte tensors (written by another program, or damaged)"
        )
    _check_saved_options(path, state["config"])
    bad = next((k for k, t in state["model"].items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise CoderError(f"{path}: non-finite values (NaN or inf) in the weights ({bad}); use an earlier checkpoint")


def _check_saved_options(path: str | os.PathLike, config: dict[str, Any]) -> None:
    """The options every use reads are there, and each saved value within its range."""
    from options import check_values

    missing = [k for k in REQUIRED_OPTIONS if k not in config]
    if missing:
        raise CoderError(
            f"{path}: the checkpoint's config lacks {', '.join(missing)} (written by another program, or damaged)"
        )
    try:
        check_values(config)
    except CoderError as err:
        raise CoderError(f"{path}: the checkpoint's config is invalid: {err}") from None


def check_resume_contents(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """What resuming reads besides the weights: optimizer, scaler, random states, position."""
    _check_keys(path, state, RESUME_KEYS)


def load_state_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """`load_state_dict` that names every missing, unexpected or mis-shaped key in one error."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mis_shaped = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or mis_shaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mis_shaped)):
            if keys:
                shown = ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
                parts.append(f"{label}: {shown}")
        raise CoderError(f"{source}: checkpoint does not match this model configuration; " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)


def saved_config(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's run config, with the value that keeps its behaviour for each option
    newer than it (`options.BEFORE_THE_OPTION`)."""
    return {**{k: v for k, v in BEFORE_THE_OPTION.items() if k not in state["config"]}, **state["config"]}


def resumed_config(config: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    """The config of `--resume`'s checkpoint, with the command line's changes to
    `options.RESUME_MAY_CHANGE` only (`explicit`: the names the command line set)."""
    state = load_checkpoint(config["resume"])
    _check_keys(config["resume"], state, {"config": CHECKPOINT_KEYS["config"]})
    _check_saved_options(config["resume"], state["config"])
    saved = saved_config(state)
    refused = sorted(k for k in explicit if k not in RESUME_MAY_CHANGE and config[k] != saved.get(k, config[k]))
    if refused:
        raise CoderError(
            f"{config['resume']}: a resumed run keeps its configuration; cannot change "
            f"{', '.join('--' + k for k in refused)} (allowed: "
            f"{', '.join('--' + k for k in RESUME_MAY_CHANGE[1:])})"
        )
    # The run continues where its checkpoint now is, not in the folder it was written in.
    return {
        **config,
        **saved,
        **{k: config[k] for k in explicit if k in RESUME_MAY_CHANGE},
        "resume": config["resume"],
        "run_dir": config["run_dir"] if "run_dir" in explicit else "",
    }


def concept_graph_state(graph: Any) -> dict[str, Any] | None:
    """The concept graph as plain tensors and lists, so a checkpoint is self-contained."""
    if graph is None:
        return None
    return {
        "words": list(graph.words),
        "counts": torch.as_tensor(np.asarray(graph.counts)),
        "cooccurrence": torch.as_tensor(np.asarray(graph.cooccurrence)),
        "word_vectors": torch.as_tensor(np.asarray(graph.word_vectors, dtype=np.float32)),
    }


def concept_graph_from_state(state: dict[str, Any] | None) -> Any:
    if state is None:
        return None
    from concepts import ConceptGraph

    graph = ConceptGraph(
        words=list(state["words"]),
        counts=state["counts"].numpy(),
        cooccurrence=state["cooccurrence"].numpy(),
        word_vectors=state["word_vectors"].numpy(),
        source="the checkpoint's concept graph",
    )
    if not np.isfinite(graph.word_vectors).all():
        raise CoderError("the checkpoint's concept graph: non-finite values (NaN or inf) in its word vectors")
    return graph


def model_config_from(config: dict[str, Any], **overrides: Any) -> Any:
    """The model's dataclass config from the flat run config (keys with the same names)."""
    from model import ModelConfig

    values = {f.name: config[f.name] for f in fields(ModelConfig) if f.name in config}
    values.update(overrides)
    missing = [f.name for f in fields(ModelConfig) if f.name not in values]
    if missing:
        raise CoderError(
            f"the run's config has no {', '.join(missing)} (written by another program, or by a "
            f"version of this code before these options)"
        )
    return ModelConfig(**values)


def build_model(
    config: dict[str, Any], image_dim: int, vocab_size: int, graph: Any, **model_kwargs: Any
) -> torch.nn.Module:
    """A fresh CODER model for a run config; `graph` may be None when the concept branch is off.
    `model_kwargs` go to CODER (`with_keys`, `bert_config`)."""
    from model import CODER

    model_cfg = model_config_from(config, image_dim=image_dim, vocab_size=vocab_size)
    if model_cfg.concept_branch and graph is None:
        raise CoderError("concept_branch is on but no concept folder was given (set concept_path)")
    adjacency = vectors = None
    if model_cfg.concept_branch:
        adjacency = torch.as_tensor(graph.adjacency(config["concept_threshold"]))
        vectors = torch.as_tensor(np.asarray(graph.word_vectors, dtype=np.float32))
    return CODER(model_cfg, adjacency, vectors, **model_kwargs)


def text_encoder_files(tokenizer: Any, bert_config: Any) -> dict[str, torch.Tensor]:
    """The files of a BERT folder but its weights, as `TEXT_ENCODER_FILES` holds them: what
    the `transformers` tokenizer and config write with `save_pretrained`."""
    with tempfile.TemporaryDirectory(prefix="coder-text-encoder-") as tmp:
        bert_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return {
            p.name: torch.from_numpy(np.frombuffer(p.read_bytes(), dtype=np.uint8).copy())
            for p in sorted(Path(tmp).iterdir())
            if p.is_file()
        }


def text_encoder_parts(state: dict[str, Any], config: dict[str, Any], source: str | os.PathLike) -> tuple[Any, Any]:
    """(tokenizer, `transformers` config) of a bert checkpoint's text encoder: from the files it
    holds, or, for a checkpoint without them, from the folder `config["bert_path"]`."""
    from transformers import AutoConfig

    import vocab

    files = state.get(TEXT_ENCODER_FILES)
    if files:
        with tempfile.TemporaryDirectory(prefix="coder-text-encoder-") as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data.numpy().tobytes())
            try:
                return vocab.BertTokenizer(tmp), load_pretrained(AutoConfig, tmp, "BERT config")
            except CoderError as err:
                raise CoderError(f"{source}: its text encoder's files do not load ({err})") from None
    folder = config["bert_path"]
    try:
        return vocab.BertTokenizer(folder), load_pretrained(AutoConfig, folder, "BERT config")
    except CoderError as err:
        raise CoderError(
            f"{source}: holds no copy of its text encoder's config and vocabulary, and {err}; pass "
            f"--bert_path DIR, the BERT folder it was trained with, wherever that is now"
        ) from None


def make_tokenizer(config: dict[str, Any], vocab_words: list[str] | None) -> Any:
    """The GRU tokenizer of a run: its saved vocabulary (a bert run's is `text_encoder_parts`)."""
    import vocab

    if not vocab_words:
        raise CoderError("a bigru model needs a vocabulary, and this checkpoint has none")
    return vocab.Vocabulary.from_words(vocab_words)


# State-dict prefixes of the parts that only training reads.
TRAINING_ONLY = ("momentum.", "queues.", "prototypes.")


def online_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict without what only training reads: the weights of a model
    built with `with_keys=False`."""
    return {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY)}


def load_for_inference(
    path: str | os.PathLike, device: str | torch.device = "cpu", bert_path: str | None = None
) -> tuple[torch.nn.Module, Any, Any, dict[str, Any]]:
    """(model in eval mode, tokenizer, concept graph, run config) from a checkpoint file. Only
    the online encoders are built: no momentum encoders, queues or prototypes. A bert
    model needs no folder when the checkpoint holds its text encoder's files; `bert_path`
    names the folder for one that does not."""
    state = load_checkpoint(path)
    check_checkpoint_contents(path, state)
    config = saved_config(state)
    if bert_path:
        config["bert_path"] = bert_path
    graph = concept_graph_from_state(state.get("concept_graph"))
    bert_config = None
    if config["text_encoder"] == "bert":
        tokenizer, bert_config = text_encoder_parts(state, config, path)
    else:
        tokenizer = make_tokenizer(config, state.get("vocab_words"))
    model = build_model(
        config, state["image_dim"], len(state["vocab_words"] or []), graph, with_keys=False, bert_config=bert_config
    )
    load_state_strict(model, online_weights(state["model"]), str(path))
    return model.to(device).eval(), tokenizer, graph, config
