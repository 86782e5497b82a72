"""The frozen BERT bottom's output for every caption of a split, computed once and cached on disk.

With `bert_frozen_layers` = k, BERT's embeddings and first k layers never train and run without
dropout, so their output is a fixed function of a caption's tokens. Reading it from this cache
leaves a training step only BERT's top layers to run (forward and backward of the online copy,
forward of the momentum copy): the CPU recipe of bench/bench_flickr8k.py. The file name is a
hash of the frozen weights, k and every caption's token ids, so any change makes a new file;
files are written atomically and memory-mapped when read.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from utils import CoderError, atomic_write

DEFAULT_DIR = Path(__file__).resolve().parent / "data_cache" / "text_states"


class TokenStates:
    """Hidden states of N captions in one (T, h) array: caption i owns rows offsets[i]:offsets[i+1]."""

    def __init__(self, states: np.ndarray, offsets: np.ndarray) -> None:
        self.states, self.offsets = states, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        return self.states[self.offsets[index]:self.offsets[index + 1]]


def cache_dir(setting: str) -> Path | None:
    """The cache folder of the `text_state_cache` option: "auto" (data_cache/text_states of
    the project), "off" (None: the bottom runs at every step), or a folder."""
    if setting == "off":
        return None
    return DEFAULT_DIR if setting == "auto" else Path(setting)


def _key(encoder: torch.nn.Module, token_ids: Sequence[Sequence[int]]) -> str:
    digest = hashlib.sha256(f"frozen_layers={encoder.frozen_layers}".encode())
    bottom = {name: p for name, p in encoder.bert.named_parameters() if encoder.in_bottom(name)}
    for name in sorted(bottom):
        digest.update(name.encode())
        digest.update(bottom[name].detach().float().cpu().numpy().tobytes())
    lengths = np.array([len(ids) for ids in token_ids], np.int64)
    digest.update(lengths.tobytes())
    digest.update(np.concatenate([np.asarray(ids, np.int64) for ids in token_ids]).tobytes())
    return digest.hexdigest()[:24]


def _load(states_path: Path, offsets_path: Path, lengths: np.ndarray, hidden: int) -> TokenStates | None:
    """The cached arrays if both files exist and fit the captions; None to recompute them."""
    if not (states_path.is_file() and offsets_path.is_file()):
        return None
    try:
        states = np.load(states_path, mmap_mode="r", allow_pickle=False)
        offsets = np.load(offsets_path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    expected = np.concatenate([[0], np.cumsum(lengths)])
    if states.shape != (int(expected[-1]), hidden) or not np.array_equal(offsets, expected):
        return None
    return TokenStates(states, offsets)


@torch.no_grad()
def frozen_text_states(encoder: torch.nn.Module, token_ids: Sequence[Sequence[int]], folder: str | os.PathLike,
                       device: torch.device | str = "cpu", batch_size: int = 256,
                       progress: bool = False) -> TokenStates:
    """The bottom states of `encoder` (a BertTextEncoder with frozen layers) for every caption,
    given as token ids, from `folder` or computed (captions batched by length) and saved there."""
    if getattr(encoder, "frozen_layers", 0) < 1:
        raise CoderError("text_state_cache needs the bert text encoder with bert_frozen_layers > 0")
    folder = Path(folder)
    key = _key(encoder, token_ids)
    states_path, offsets_path = folder / f"{key}.states.npy", folder / f"{key}.offsets.npy"
    lengths = np.array([len(ids) for ids in token_ids], np.int64)
    hidden = encoder.bert.config.hidden_size
    cached = _load(states_path, offsets_path, lengths, hidden)
    if cached is not None:
        return cached
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    states = np.zeros((int(offsets[-1]), hidden), np.float32)
    order = np.argsort(-lengths, kind="stable")
    was_training = encoder.training
    encoder.eval()
    from tqdm import tqdm

    for start in tqdm(range(0, len(order), batch_size), desc="frozen BERT layers", disable=not progress,
                      unit="batch"):
        rows = order[start:start + batch_size]
        width = int(lengths[rows].max())
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, :lengths[row]] = torch.as_tensor(token_ids[row])
            mask[i, :lengths[row]] = 1
        out = encoder.bottom_states(tokens.to(device), mask.to(device)).float().cpu().numpy()
        for i, row in enumerate(rows):
            states[offsets[row]:offsets[row + 1]] = out[i, :lengths[row]]
    encoder.train(was_training)
    try:
        atomic_write(states_path, lambda f: np.save(f, states))
        atomic_write(offsets_path, lambda f: np.save(f, offsets))
    except OSError as err:
        raise CoderError(f"{folder}: cannot write the text state cache ({err.strerror or err}); "
                         f"set --text_state_cache to a writable folder or off") from None
    return TokenStates(states, offsets)
