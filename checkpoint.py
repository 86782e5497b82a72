"""Checkpoints: atomic writes, safe loading (weights_only), strict state restoring, and
rebuilding a model with its tokenizer and concept graph for inference."""
from __future__ import annotations

import os
import pickle
import subprocess
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils import CoderError, atomic_write

CHECKPOINT_FORMAT = "coder-checkpoint-v1"


def code_version() -> str:
    """The git commit of the code (with '+dirty' for uncommitted changes), or 'unknown'."""
    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
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
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # torch.save writes a zip archive
        raise CoderError(f"{path}: not a checkpoint (not a PyTorch zip archive; an empty, text or foreign file)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's message would suggest weights_only=False, i.e. running the file's code: never.
        raise CoderError(f"{path}: holds objects other than tensors and plain containers; refusing to load it "
                         f"(this project's checkpoints never do)") from None
    except Exception as err:  # torch raises many types for truncated or corrupt archives
        raise CoderError(f"{path}: truncated or corrupt checkpoint ({type(err).__name__}); use another "
                         f"checkpoint, e.g. best.pt or last.pt of the same run") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CoderError(f"{path}: not a CODER checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    return state


# Buffers newer than some checkpoints: a checkpoint written before one existed loads with the
# fresh model's value, then the named method (if any) recomputes it from the rest of the state.
# (prototypes_ready: such checkpoints had random prototypes, for which the fresh value is True.)
DERIVED_BUFFERS = {"queue_kernel": "refresh_queue_kernel", "prototypes_ready": None}


def load_state_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """`load_state_dict` that names every missing, unexpected or mis-shaped key in one error
    (a missing derived buffer is recomputed instead)."""
    own = module.state_dict()
    derived = [k for k in DERIVED_BUFFERS if k in own and k not in state_dict]
    state_dict = {**state_dict, **{k: own[k] for k in derived}}
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
    for key in derived:
        if DERIVED_BUFFERS[key]:
            getattr(module, DERIVED_BUFFERS[key])()


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

    return ConceptGraph(words=list(state["words"]), counts=state["counts"].numpy(),
                        cooccurrence=state["cooccurrence"].numpy(),
                        word_vectors=state["word_vectors"].numpy())


def model_config_from(config: dict[str, Any], **overrides: Any) -> Any:
    """The model's dataclass config from the flat run config (keys with the same names)."""
    from model import ModelConfig

    values = {f.name: config[f.name] for f in fields(ModelConfig) if f.name in config}
    values.update(overrides)
    return ModelConfig(**values)


def build_model(config: dict[str, Any], image_dim: int, vocab_size: int, graph: Any) -> torch.nn.Module:
    """A fresh CODER model for a run config; `graph` may be None when the concept branch is off."""
    from model import CODER

    model_cfg = model_config_from(config, image_dim=image_dim, vocab_size=vocab_size)
    if model_cfg.concept_branch and graph is None:
        raise CoderError("concept_branch is on but no concept folder was given (set concept_path)")
    adjacency = vectors = None
    if model_cfg.concept_branch:
        adjacency = torch.as_tensor(graph.adjacency(config.get("concept_threshold", 0.3)))
        vectors = torch.as_tensor(np.asarray(graph.word_vectors, dtype=np.float32))
    return CODER(model_cfg, adjacency, vectors)


def make_tokenizer(config: dict[str, Any], vocab_words: list[str] | None) -> Any:
    """The text tokenizer a run used: its saved GRU vocabulary, or the BERT tokenizer."""
    import vocab

    if config["text_encoder"] == "bert":
        return vocab.BertTokenizer(config["bert_path"])
    if not vocab_words:
        raise CoderError("a bigru model needs a vocabulary, and this checkpoint has none")
    return vocab.Vocabulary.from_words(vocab_words)


def load_for_inference(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[
        torch.nn.Module, Any, Any, dict[str, Any]]:
    """(model in eval mode, tokenizer, concept graph, run config) from a checkpoint file."""
    state = load_checkpoint(path)
    config = state["config"]
    graph = concept_graph_from_state(state.get("concept_graph"))
    tokenizer = make_tokenizer(config, state.get("vocab_words"))
    model = build_model(config, state["image_dim"], len(state["vocab_words"] or []), graph)
    load_state_strict(model, state["model"], str(path))
    return model.to(device).eval(), tokenizer, graph, config
