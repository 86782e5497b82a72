"""The frozen BERT bottom's output for every caption of a split, computed once and cached on disk.

With `bert_frozen_layers` = k, BERT's embeddings and first k layers never train and run without
dropout, so their output is a fixed function of a caption's tokens. Reading it from this cache
leaves a training step only BERT's top layers to run (forward and backward of the online copy,
forward of the momentum copy): the CPU recipe of bench/bench_flickr8k.py. The file name is a
hash of the frozen weights, k and every caption's token ids, so any change makes a new file.

The states of a split are as large as its features (COCO train with BERT-base: 24 GB), so
neither building nor reading them holds the array in memory: batches of states are written
with positioned writes into a temporary .npy file that is renamed in place when complete, and
captions are read back with positioned reads (bench/bench_text_states.py measures both).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np
import torch

from utils import CoderError, atomic_write

FOLDER_NAME = "text_states"  # `text_state_cache auto`: this folder inside the data folder
STATE_DTYPE = np.dtype("<f4")


class TokenStates:
    """Hidden states of N captions in one (T, h) float32 array, in RAM or a memory-mapped .npy
    file: caption i owns rows offsets[i]:offsets[i+1]. Rows of a file are read with positioned
    reads (a fresh array each, the map itself never touched), so an epoch over the file does not
    hold it in memory. Pickling (DataLoader workers under spawn) re-opens the file."""

    def __init__(self, states: np.ndarray, offsets: np.ndarray) -> None:
        self.states, self.offsets = states, offsets
        self._fd: int | None = None
        self._fd_pid: int | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        start, stop = int(self.offsets[index]), int(self.offsets[index + 1])
        states = self.states
        if not isinstance(states, np.memmap) or not hasattr(os, "preadv"):
            return np.array(states[start:stop], dtype=np.float32)
        if self._fd is None or self._fd_pid != os.getpid():  # each DataLoader worker opens its own
            self._fd, self._fd_pid = os.open(states.filename, os.O_RDONLY), os.getpid()
        out = np.empty((stop - start, states.shape[1]), STATE_DTYPE)
        if os.preadv(self._fd, [out], states.offset + start * states.strides[0]) != out.nbytes:
            raise CoderError(f"{states.filename}: file is shorter than its header says (caption {index})")
        return out

    def __getstate__(self) -> dict[str, Any]:
        if isinstance(self.states, np.memmap):
            return {"path": self.states.filename, "offsets": self.offsets}
        return {"states": self.states, "offsets": self.offsets}

    def __setstate__(self, state: dict[str, Any]) -> None:
        states = np.load(state["path"], mmap_mode="r") if "path" in state else state["states"]
        self.__init__(states, state["offsets"])

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._fd_pid == os.getpid():
            os.close(self._fd)


def cache_dir(setting: str, data_path: str | os.PathLike) -> Path | None:
    """The cache folder of the `text_state_cache` option: "auto" (`text_states` inside the data
    folder, next to the features the states belong with), "off" (None: the bottom runs at every
    step), or a folder."""
    if setting == "off":
        return None
    return Path(data_path) / FOLDER_NAME if setting == "auto" else Path(setting)


def _key(encoder: torch.nn.Module, token_ids: Sequence[Sequence[int]]) -> str:
    digest = hashlib.sha256(f"frozen_layers={encoder.frozen_layers}".encode())
    bottom = {name: p for name, p in encoder.bert.named_parameters() if encoder.in_bottom(name)}
    for name in sorted(bottom):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(bottom[name].detach().float().cpu().numpy()))  # no copy of the weights
    lengths = np.array([len(ids) for ids in token_ids], np.int64)
    digest.update(lengths.tobytes())
    digest.update(np.concatenate([np.asarray(ids, np.int64) for ids in token_ids]).tobytes())
    return digest.hexdigest()[:24]


def _load(path: Path, rows: int, hidden: int) -> np.memmap | None:
    """The cached (rows, hidden) float32 file, memory-mapped; None where it is missing or
    damaged (unreadable header, other shape or type, a file cut short or too long)."""
    if not path.is_file():
        return None
    try:
        states = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if (
        not isinstance(states, np.memmap)
        or states.shape != (rows, hidden)
        or states.dtype != STATE_DTYPE
        or path.stat().st_size != states.offset + states.nbytes
    ):
        return None
    return states


def _batches(
    encoder: torch.nn.Module,
    token_ids: Sequence[Sequence[int]],
    lengths: np.ndarray,
    device: torch.device | str,
    batch_size: int,
    progress: bool,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(caption indices, their bottom states (B, L, h)) for batches of captions of similar length."""
    from tqdm import tqdm

    order = np.argsort(-lengths, kind="stable")
    for start in tqdm(range(0, len(order), batch_size), desc="frozen BERT layers", disable=not progress, unit="batch"):
        rows = order[start : start + batch_size]
        width = int(lengths[rows].max())
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, : lengths[row]] = torch.as_tensor(token_ids[row])
            mask[i, : lengths[row]] = 1
        yield rows, encoder.bottom_states(tokens.to(device), mask.to(device)).float().cpu().numpy()


def _write_states(
    file: BinaryIO, batches: Iterator[tuple[np.ndarray, np.ndarray]], offsets: np.ndarray, hidden: int
) -> None:
    """A .npy file of shape (offsets[-1], hidden), each caption's rows written where they belong
    as its batch arrives (the same bytes as np.save of the whole array)."""
    header = {"descr": STATE_DTYPE.str, "fortran_order": False, "shape": (int(offsets[-1]), hidden)}
    np.lib.format.write_array_header_1_0(file, header)
    file.flush()
    start = file.tell()
    row_bytes = hidden * STATE_DTYPE.itemsize
    file.truncate(start + int(offsets[-1]) * row_bytes)
    for rows, out in batches:
        for i, row in enumerate(rows):
            caption = np.ascontiguousarray(out[i, : offsets[row + 1] - offsets[row]], STATE_DTYPE)
            if os.pwrite(file.fileno(), caption.data, start + int(offsets[row]) * row_bytes) != caption.nbytes:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a short write: the disk filled up


@torch.no_grad()
def frozen_text_states(
    encoder: torch.nn.Module,
    token_ids: Sequence[Sequence[int]],
    folder: str | os.PathLike,
    device: torch.device | str = "cpu",
    *,
    batch_size: int,
    progress: bool = False,
) -> TokenStates:
    """The bottom states of `encoder` (a BertTextEncoder with frozen layers) for every caption,
    given as token ids, memory-mapped from `folder`; computed there first (captions batched by
    length) when missing or damaged."""
    if getattr(encoder, "frozen_layers", 0) < 1:
        raise CoderError("text_state_cache needs the bert text encoder with bert_frozen_layers > 0")
    folder = Path(folder)
    path = folder / f"{_key(encoder, token_ids)}.states.npy"
    lengths = np.array([len(ids) for ids in token_ids], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    hidden = encoder.bert.config.hidden_size
    states = _load(path, int(offsets[-1]), hidden)
    if states is not None:
        return TokenStates(states, offsets)
    _check_space(folder, int(offsets[-1]) * hidden * STATE_DTYPE.itemsize)
    was_training = encoder.training
    encoder.eval()
    try:
        batches = _batches(encoder, token_ids, lengths, device, batch_size, progress)
        atomic_write(path, lambda file: _write_states(file, batches, offsets, hidden))
    except CoderError as err:  # a failed write, naming the file
        raise CoderError(f"{err}; --text_state_cache may name another folder, or off") from None
    finally:
        encoder.train(was_training)
    states = _load(path, int(offsets[-1]), hidden)
    if states is None:  # written a moment ago: only another process could have damaged it
        raise CoderError(f"{path}: the text states just written cannot be read back; is another run writing there?")
    return TokenStates(states, offsets)


def _check_space(folder: Path, nbytes: int) -> None:
    """Refuse before computing anything when the folder's disk cannot hold the file."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < nbytes:
        raise CoderError(
            f"{folder}: the text state cache needs {nbytes / 1e9:.1f} GB, the disk has "
            f"{free / 1e9:.1f} GB free; set --text_state_cache to a folder on a larger disk or off"
        )
