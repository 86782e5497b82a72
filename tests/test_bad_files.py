"""Generated bad files: for each kind of file the project reads, a valid file from a tiny demo
world is damaged in every way that kind can be (empty, a folder in its place, truncated, junk
bytes, absurd .npy headers, other encodings, NUL bytes, U+2028 and other line breaks inside a
line, duplicated rows, values of the wrong type, missing keys, NaN) and handed to every entry
point that reads that kind. Each must end non-zero with one line that names the damaged file,
without a traceback, leaving every file that was there before as it was.

The entry points run in this process through their `main` (the same `cli_entry` boundary as on
the command line); any exception other than SystemExit fails the case. Hypothesis drives the
properties at the end (any bytes in a caption file, any truncation of a feature file).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ONE_EPOCH_ARGS, ROOT, tiny_demo_args

sys.path.insert(0, str(ROOT / "bench"))

import bench_flickr8k  # noqa: E402
import concepts  # noqa: E402
import evaluation  # noqa: E402
import extract_features  # noqa: E402
import retrieve  # noqa: E402
import train_f30k  # noqa: E402
import trainer  # noqa: E402
import vocab  # noqa: E402
from data import load_split  # noqa: E402
from options import script_config  # noqa: E402
from utils import CoderError, cli_entry  # noqa: E402

TINY = [*ONE_EPOCH_ARGS, "--checkpoint_every_steps", "0"]
METRICS = {k: 10.0 for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")}


# --------------------------------------------------------------------------- the world


def _train(argv: list[str]) -> None:
    cli_entry(trainer.run)(script_config(vars(train_f30k)), argv, "f30k")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """Valid files of every kind: a tiny precomp folder with its vocabulary and concept folder, a
    CVSE-format copy of the concepts, a trained checkpoint, raw captions (CSV, split lists,
    Karpathy JSON) and a finished benchmark result."""
    root = tmp_path_factory.mktemp("world")
    demo = tiny_demo_args(root / "demo", seed=3, num_train=16, num_eval=8)
    shutil.move(demo[1], root / "data")
    shutil.move(demo[5], root / "concepts")
    shutil.rmtree(root / "demo")
    _train(_data_args(root) + TINY + ["--run_dir", str(root / "run")])
    _write_cvse(root)
    raw = root / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "captions.csv").write_text(
        "image,caption\n" + "".join(f"{n}.jpg,a dog number {i}\n" for n in "ab" for i in range(5))
    )
    (raw / "train.txt").write_text("a.jpg\nb.jpg\n")
    (raw / "concepts.txt").write_text("bird\npizza\nsnow\ngirl\n")
    (raw / "glove.txt").write_text("".join(f"{w} {i} 0.5 -1.25\n" for i, w in enumerate(["girl", "bird", "snow"])))
    images = [
        {"filename": f"{n}.jpg", "split": "train", "sentences": [{"raw": f"a cat {i}"} for i in range(5)]} for n in "ab"
    ]
    (raw / "karpathy.json").write_text(json.dumps({"images": images}))
    result = {
        "config": "infonce",
        "seed": 0,
        "best": METRICS,
        "best_epoch": 1,
        "wall_seconds": 5.0,
        "validations": [{"epoch": 1, **METRICS}],
        "epoch_seconds": [5.0],
        "train_seconds": [4.0],
    }
    (root / "bench" / "runs" / "infonce_s0").mkdir(parents=True)
    (root / "bench" / "runs" / "infonce_s0" / "result.json").write_text(json.dumps(result))
    return root


def _data_args(w: Path) -> list[str]:
    return [
        "--data_path",
        str(w / "data"),
        "--vocab_path",
        str(w / "data" / "vocab.json"),
        "--concept_path",
        str(w / "concepts"),
    ]


def _write_cvse(root: Path) -> None:
    graph = concepts.load_concepts(root / "concepts")
    cvse = root / "cvse"
    cvse.mkdir()
    (cvse / "category_concepts.json").write_text(json.dumps({w: i for i, w in enumerate(graph.words)}))
    with open(cvse / "x_adj_concepts.pkl", "wb") as f:
        pickle.dump({"nums": graph.counts, "adj_all": graph.cooccurrence}, f)
    with open(cvse / "x_concepts_glove_word2vec.pkl", "wb") as f:
        pickle.dump(graph.word_vectors, f)


@pytest.fixture
def world(pristine, tmp_path) -> Path:
    copy = tmp_path / "w"
    shutil.copytree(pristine, copy, symlinks=True)
    return copy


# --------------------------------------------------------------------------- entry points
# Each takes the world folder and returns the command line of one entry point reading its files.


def _train_resume(w: Path) -> list[str]:
    """Resume the finished one-epoch run: every check runs, no epoch is trained."""
    return ["--resume", str(w / "run" / "last.pt"), "--epochs", "1", "--progress", "false"]


ENTRY_POINTS: dict[str, tuple[Callable, Callable[[Path], list[str]]]] = {
    "train": (_train, lambda w: _data_args(w) + TINY + ["--run_dir", str(w / "new_run")]),
    "train --resume": (_train, _train_resume),
    "eval": (
        lambda argv: cli_entry(evaluation.main)(argv, "f30k"),
        lambda w: [
            "--checkpoint",
            str(w / "run" / "best.pt"),
            "--data_path",
            str(w / "data"),
            "--workers",
            "0",
            "--device",
            "cpu",
            "--json",
            str(w / "m.json"),
        ],
    ),
    "retrieve": (
        retrieve.main,
        lambda w: [
            "--checkpoint",
            str(w / "run" / "best.pt"),
            "--data_path",
            str(w / "data"),
            "--query",
            "a dog",
            "--device",
            "cpu",
        ],
    ),
    "vocab build": (vocab.main, lambda w: ["build", str(w / "data" / "train_caps.txt"), "--out", str(w / "v.json")]),
    "vocab stats": (
        vocab.main,
        lambda w: ["stats", "--vocab", str(w / "data" / "vocab.json"), str(w / "data" / "train_caps.txt")],
    ),
    "concepts stats": (concepts.main, lambda w: ["stats", str(w / "concepts")]),
    "concepts stats cvse": (concepts.main, lambda w: ["stats", str(w / "cvse")]),
    "concepts label": (concepts.main, lambda w: ["label", str(w / "concepts"), str(w / "data" / "train_caps.txt")]),
    "concepts build": (
        concepts.main,
        lambda w: ["build", "--captions", str(w / "data" / "train_caps.txt"), "--out", str(w / "c2")],
    ),
    "concepts build list": (
        concepts.main,
        lambda w: [
            "build",
            "--captions",
            str(w / "data" / "train_caps.txt"),
            "--concept-list",
            str(w / "raw" / "concepts.txt"),
            "--word-vectors",
            str(w / "raw" / "glove.txt"),
            "--out",
            str(w / "c2"),
        ],
    ),
    "extract csv": (
        extract_features.main,
        lambda w: [
            "--images",
            str(w / "raw" / "images"),
            "--captions",
            str(w / "raw" / "captions.csv"),
            "--split",
            f"train={w / 'raw' / 'train.txt'}",
            "--out",
            str(w / "x"),
            "--device",
            "cpu",
        ],
    ),
    "extract json": (
        extract_features.main,
        lambda w: [
            "--images",
            str(w / "raw" / "images"),
            "--captions",
            str(w / "raw" / "karpathy.json"),
            "--out",
            str(w / "x"),
            "--device",
            "cpu",
        ],
    ),
    "bench report": (
        bench_flickr8k.main,
        lambda w: ["--report", "--out", str(w / "bench"), "--configs", "infonce", "--no_probe"],
    ),
}


# --------------------------------------------------------------------------- damage


def _insert_in_line(path: Path, text: bytes, line: int = 1) -> None:
    lines = path.read_bytes().split(b"\n")
    middle = len(lines[line]) // 2
    lines[line] = lines[line][:middle] + text + lines[line][middle:]
    path.write_bytes(b"\n".join(lines))


def _folder(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "inside.txt").write_text("x")


def _rewrite_json(change: Callable[[object], object]) -> Callable[[Path], None]:
    return lambda p: p.write_text(json.dumps(change(json.loads(p.read_text()))))


def _rewrite_npy(change: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    return lambda p: np.save(p, change(np.load(p)), allow_pickle=False)


def _absurd_header(path: Path) -> None:
    """A valid header whose shape claims a terabyte, over the file's real data."""
    array = np.load(path)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f,
            {
                "descr": np.lib.format.dtype_to_descr(array.dtype),
                "fortran_order": False,
                "shape": (10**12, *array.shape[1:]),
            },
        )
        f.write(array.tobytes())


def _with_nan(array: np.ndarray) -> np.ndarray:
    array = array.astype(np.float32)
    array.flat[array.size // 2] = np.nan
    return array


def _rewrite_checkpoint(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        state = torch.load(path, weights_only=True)
        change(state)
        torch.save(state, path)

    return damage


def _nan_weight(state: dict) -> None:
    tensor = next(t for t in state["model"].values() if t.is_floating_point() and t.numel() > 1)
    tensor[(0,) * tensor.dim()] = float("nan")


class _Unsafe:
    def __reduce__(self):
        return (os.system, ("true",))


ANY_FILE = {
    "empty": lambda p: p.write_bytes(b""),
    "folder": _folder,
    "junk": lambda p: p.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8))),
}
TEXT_LINES = {
    "NUL byte": lambda p: _insert_in_line(p, b"\x00"),
    "UTF-16 without a BOM": lambda p: p.write_bytes(p.read_text().encode("utf-16-le")),
    "latin-1": lambda p: _insert_in_line(p, "\xe9".encode("latin-1")),
    **{
        f"{name} in a line": (lambda p, c=char: _insert_in_line(p, c.encode("utf-8")))
        for name, char in (("U+2028", "\u2028"), ("U+0085", "\x85"), ("\\x0b", "\x0b"), ("lone \\r", "\r"))
    },
}
TRUNCATED = {"truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])}
# JSON's escape of half a character (a program that cut a string between two UTF-16 units)
LONE_SURROGATE = {"a lone surrogate": lambda p: p.write_text(p.read_text().replace('"', '"\\ud83d', 1))}
NPY = {
    **ANY_FILE,
    **TRUNCATED,
    "absurd header": _absurd_header,
    "text in a .npy": lambda p: p.write_text("1 2 3\n"),
    "strings": _rewrite_npy(lambda a: np.array(["a"] * a.shape[0])),
}
CHECKPOINT = {
    **ANY_FILE,
    **TRUNCATED,
    "text": lambda p: p.write_text("not a checkpoint\n"),
    **{f"no '{key}'": _rewrite_checkpoint(lambda s, k=key: s.pop(k)) for key in ("config", "model", "image_dim")},
    "image_dim a float": _rewrite_checkpoint(lambda s: s.update(image_dim=24.0)),
    "config a list": _rewrite_checkpoint(lambda s: s.update(config=[1, 2])),
    "config without mu": _rewrite_checkpoint(lambda s: s["config"].pop("mu")),
    "mu out of range": _rewrite_checkpoint(lambda s: s["config"].update(mu=5.0)),
    "NaN weights": _rewrite_checkpoint(_nan_weight),
}

# (file, its variants, the entry points that read it)
CAPTION_READERS = ["train", "vocab build", "vocab stats", "concepts label", "concepts build"]
KINDS: list[tuple[str, dict[str, Callable[[Path], None]], list[str]]] = [
    (
        "data/train_caps.txt",
        {**ANY_FILE, **TEXT_LINES, "blank line": lambda p: _insert_in_line(p, b"\n\n")},
        CAPTION_READERS,
    ),
    ("data/test_caps.txt", {**ANY_FILE, **TEXT_LINES, **TRUNCATED}, ["eval", "retrieve"]),
    ("data/train_caps.txt", TRUNCATED, ["train"]),
    (
        "data/test_ids.txt",
        {
            **ANY_FILE,
            **TEXT_LINES,
            **TRUNCATED,
            "duplicated row": lambda p: p.write_text(
                "\n".join([p.read_text().split()[0]] + p.read_text().split()[:-1]) + "\n"
            ),
        },
        ["eval", "retrieve"],
    ),
    ("data/train_ims.npy", {**NPY, "NaN": _rewrite_npy(_with_nan)}, ["train"]),
    (
        "data/test_ims.npy",
        {**NPY, "NaN": _rewrite_npy(_with_nan), "2-D": _rewrite_npy(lambda a: a[:, 0])},
        ["eval", "retrieve"],
    ),
    (
        "data/vocab.json",
        {
            **ANY_FILE,
            **TRUNCATED,
            **LONE_SURROGATE,
            "NUL byte": lambda p: _insert_in_line(p, b"\x00", 0),
            "UTF-16 without a BOM": TEXT_LINES["UTF-16 without a BOM"],
            "float id": _rewrite_json(lambda d: {**d, "word2idx": {**d["word2idx"], "<pad>": 0.0}}),
            "string id": _rewrite_json(lambda d: {**d, "word2idx": {**d["word2idx"], "<pad>": "0"}}),
            "no word2idx": _rewrite_json(lambda d: {"idx": d["idx"]}),
            "mixed words": _rewrite_json(lambda d: {"words": ["<pad>", "<start>", "<end>", "<unk>", 7]}),
        },
        ["train", "vocab stats"],
    ),
    (
        "concepts/concepts.json",
        {
            **ANY_FILE,
            **TRUNCATED,
            **LONE_SURROGATE,
            "number as a word": _rewrite_json(lambda d: {**d, "words": [1] + d["words"][1:]}),
            "no words": _rewrite_json(lambda d: {"format": d["format"]}),
            "word listed twice": _rewrite_json(lambda d: {**d, "words": [d["words"][1]] + d["words"][1:]}),
        },
        ["train", "concepts stats"],
    ),
    ("concepts/counts.npy", {**NPY, "fractional counts": _rewrite_npy(lambda a: a + 0.5)}, ["train", "concepts stats"]),
    ("concepts/cooccurrence.npy", NPY, ["concepts stats"]),
    ("concepts/word_vectors.npy", {**NPY, "NaN": _rewrite_npy(_with_nan)}, ["train", "concepts stats"]),
    (
        "cvse/category_concepts.json",
        {
            **ANY_FILE,
            **TRUNCATED,
            "float index": _rewrite_json(lambda d: {**d, next(iter(d)): 0.0}),
            "boolean index": _rewrite_json(lambda d: {**d, next(iter(d)): False}),
        },
        ["concepts stats cvse"],
    ),
    (
        "cvse/x_adj_concepts.pkl",
        {**ANY_FILE, **TRUNCATED, "unsafe pickle": lambda p: p.write_bytes(pickle.dumps(_Unsafe()))},
        ["concepts stats cvse"],
    ),
    (
        "cvse/x_concepts_glove_word2vec.pkl",
        {
            **ANY_FILE,
            **TRUNCATED,
            "NaN": lambda p: p.write_bytes(pickle.dumps(_with_nan(pickle.loads(p.read_bytes())))),
        },
        ["concepts stats cvse"],
    ),
    ("run/best.pt", CHECKPOINT, ["eval", "retrieve"]),
    ("run/last.pt", CHECKPOINT, ["train --resume"]),
    (
        "raw/captions.csv",
        {
            **ANY_FILE,
            **{k: TEXT_LINES[k] for k in ("NUL byte", "UTF-16 without a BOM", "latin-1")},
            "no header": lambda p: p.write_text("a.jpg,a dog\n"),
            "extra field": lambda p: _insert_in_line(p, b",x"),
        },
        ["extract csv"],
    ),
    (
        "raw/train.txt",
        {
            **ANY_FILE,
            **TEXT_LINES,
            "duplicated row": lambda p: p.write_text("a.jpg\na.jpg\n"),
            "unknown image": lambda p: p.write_text("a.jpg\nzzz.jpg\n"),
        },
        ["extract csv"],
    ),
    ("raw/concepts.txt", {**ANY_FILE, **TEXT_LINES}, ["concepts build list"]),
    (
        "raw/glove.txt",
        {**ANY_FILE, "NUL byte": TEXT_LINES["NUL byte"], "UTF-16 without a BOM": TEXT_LINES["UTF-16 without a BOM"]},
        ["concepts build list"],
    ),
    (
        "raw/karpathy.json",
        {
            **ANY_FILE,
            **TRUNCATED,
            **LONE_SURROGATE,
            "number as a name": _rewrite_json(lambda d: {"images": [{**d["images"][0], "filename": 7}]}),
            "number as a caption": _rewrite_json(
                lambda d: {"images": [{**d["images"][0], "sentences": [{"raw": 3}] * 5}]}
            ),
            "image listed twice": _rewrite_json(lambda d: {"images": d["images"][:1] * 2}),
            "a caption cut mid-emoji": _rewrite_json(
                lambda d: {"images": [{**d["images"][0], "sentences": [{"raw": "a cat \ud83d"}] * 5}]}
            ),
            "a name cut mid-character": _rewrite_json(
                lambda d: {"images": [{**d["images"][0], "filename": "c\udcff.jpg"}]}
            ),
            "no images": _rewrite_json(lambda d: {"imgs": d["images"]}),
        },
        ["extract json"],
    ),
    (
        "bench/runs/infonce_s0/result.json",
        {
            **ANY_FILE,
            **TRUNCATED,
            **LONE_SURROGATE,
            "rsum a string": _rewrite_json(lambda d: {**d, "best": {**d["best"], "rsum": "10"}}),
            "no validations": _rewrite_json(lambda d: {k: v for k, v in d.items() if k != "validations"}),
            "a list": lambda p: p.write_text("[1, 2]"),
        },
        ["bench report"],
    ),
]

CASES = [
    (file, variant, damage, reader)
    for file, variants, readers in KINDS
    for variant, damage in variants.items()
    for reader in readers
]


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run_entry(reader: str, world: Path, capsys) -> tuple[int, list[str], str]:
    """(exit status, non-blank stderr lines, all stderr) of one entry point run in this process."""
    main, argv = ENTRY_POINTS[reader]
    capsys.readouterr()
    code = 0
    try:
        main(argv(world))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")], err


@pytest.mark.parametrize(
    "file, variant, damage, reader", CASES, ids=[f"{reader}: {file} {variant}" for file, variant, _, reader in CASES]
)
def test_a_damaged_file_gives_one_line_naming_it_and_changes_nothing(
    world, file, variant, damage, reader, capsys, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    damage(world / file)
    before = _digests(world)
    code, lines, err = run_entry(reader, world, capsys)
    assert code != 0, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert Path(file).name in lines[0], err
    after = _digests(world)
    assert {name: after.get(name) for name in before} == before, "an input or earlier output changed"
    new = set(after) - set(before)
    assert all(name.startswith("new_run/") for name in new), new  # only a run that started training leaves a log


@pytest.mark.parametrize(
    "reader", [r for r in ENTRY_POINTS if r not in ("train", "train --resume", "extract csv", "extract json")]
)
def test_every_entry_point_reads_the_valid_world(world, reader, capsys):
    """The undamaged files pass, so each refusal above is the damage's doing."""
    code, _, err = run_entry(reader, world, capsys)
    assert code == 0, err


def test_valid_raw_captions_pass(pristine):
    import caption_sources

    raw = pristine / "raw"
    csv_entries = caption_sources.build_split_entries(raw / "captions.csv", {"train": raw / "train.txt"})
    assert [name for name, _ in csv_entries["train"]] == ["a.jpg", "b.jpg"]
    json_entries = caption_sources.build_split_entries(raw / "karpathy.json", None)
    assert len(json_entries["train"]) == 2 and json_entries["train"][0][1][0] == "a cat 0"


# --------------------------------------------------------------------------- properties

LINE_BREAKS = "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_CAPTION = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\x00"), min_size=1, max_size=20
).filter(lambda line: line.strip() and not line.endswith("\r"))  # that is a CRLF


@settings(max_examples=100, deadline=None)
@given(st.lists(_CAPTION, min_size=1, max_size=6), st.booleans())
def test_a_caption_file_has_the_lines_wc_counts_or_names_the_line_with_a_break(tmp_path_factory, lines, crlf):
    """Any non-blank caption lines (any characters but \\n and NUL, \\r\\n endings or not):
    read_captions returns exactly the `wc -l` lines, stripped, unless a line holds a character
    that other readers take for a line break; then the error names that line."""
    path = tmp_path_factory.mktemp("caps") / "caps.txt"
    path.write_bytes(("\r\n" if crlf else "\n").join(lines).encode("utf-8") + b"\n")
    first_break = next((i for i, line in enumerate(lines) if set(line) & set(LINE_BREAKS)), None)
    if first_break is None:
        captions = vocab.read_captions(path)
        assert captions == [line.strip() for line in lines]
        assert len(captions) == path.read_bytes().count(b"\n")
    else:
        with pytest.raises(CoderError, match=f"^{path}:{first_break + 1}: U\\+"):
            vocab.read_captions(path)


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["train", "test"]))
def test_any_truncation_of_a_feature_file_is_refused_before_it_is_read(pristine, tmp_path_factory, cut, split):
    folder = tmp_path_factory.mktemp("trunc")
    for name in (f"{split}_ims.npy", f"{split}_caps.txt"):
        shutil.copy(pristine / "data" / name, folder / name)
    data = (folder / f"{split}_ims.npy").read_bytes()
    cut = cut % len(data)
    (folder / f"{split}_ims.npy").write_bytes(data[:cut])
    with pytest.raises(CoderError, match=f"{split}_ims.npy: "):
        load_split(folder, split)


@settings(max_examples=20, deadline=None)
@given(st.integers(min_value=0, max_value=10**7))
def test_any_truncation_of_a_checkpoint_is_refused(pristine, tmp_path_factory, cut):
    from checkpoint import load_for_inference

    data = (pristine / "run" / "best.pt").read_bytes()
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    path.write_bytes(data[: cut % len(data)])
    with pytest.raises(CoderError, match="best.pt: "):
        load_for_inference(path)


# --------------------------------------------------------------------------- a full disk


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize(
    "reader, output", [("vocab build", "v.json"), ("eval", "m.json"), ("concepts build", "c2/counts.npy")]
)
def test_a_full_disk_names_the_file_and_keeps_the_earlier_one(world, reader, output, capsys, monkeypatch):
    """ENOSPC while writing (faked at the fsync every atomic write makes): one line naming the
    output, the earlier file of that name intact, no temporary file left."""
    (world / output).parent.mkdir(exist_ok=True)
    (world / output).write_text("earlier\n")
    main, argv = ENTRY_POINTS[reader]
    extra = ["--overwrite"]
    monkeypatch.setattr(os, "fsync", _disk_full)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv(world) + extra)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_.value.code != 0 and len(lines) == 1 and "Traceback" not in err, err
    assert "No space left on device" in lines[0] and Path(output).name in lines[0], err
    assert (world / output).read_text() == "earlier\n"
    assert not [p for p in (world / output).parent.iterdir() if p.name.endswith(".tmp")]


def test_a_full_disk_while_training_names_the_file_and_keeps_the_checkpoint(world, capsys, monkeypatch):
    checkpoint = world / "run" / "last.pt"
    before = checkpoint.read_bytes()
    monkeypatch.setattr(os, "fsync", _disk_full)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        _train(_train_resume(world))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_.value.code != 0 and len(lines) == 1 and "No space left on device" in lines[0], err
    assert checkpoint.read_bytes() == before


# --------------------------------------------------------------------------- resume


def _resume(world: Path, capsys, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    code = 0
    try:
        _train(_train_resume(world) + list(extra))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    return code, capsys.readouterr().err


def _edit_last(world: Path, change: Callable[[dict], None]) -> None:
    _rewrite_checkpoint(change)(world / "run" / "last.pt")


def test_resume_on_other_data_of_the_same_shapes_is_refused(world, capsys):
    other = world / "other"
    shutil.copytree(world / "data", other)
    captions = (other / "train_caps.txt").read_text().replace("dog", "cat", 1)
    (other / "train_caps.txt").write_text(captions)
    before = _digests(world / "run")
    code, err = _resume(world, capsys, "--data_path", str(other))
    assert code != 0 and "trained on other data" in err and "Traceback" not in err, err
    after = _digests(world / "run")
    assert {name: after.get(name) for name in before} == before


def test_resume_on_moved_data_continues_with_a_note(pristine, world, capsys):
    moved = world / "moved"
    shutil.copytree(world / "data", moved)
    code, err = _resume(world, capsys, "--data_path", str(moved))
    assert code == 0, err
    log = (world / "run" / "train.log").read_text()
    assert f"the training data moved from {pristine / 'data'} to {moved} (same content)" in log
    assert "resumed from" in log


def test_a_moved_run_folder_resumes_where_the_checkpoint_now_is(pristine, world, capsys):
    """`world` is a copy of the run written in `pristine`: resuming the copy trains into the copy
    and says so; the original folder is left as it was."""
    original = _digests(pristine / "run")
    code, err = _resume(world, capsys, "--epochs", "2")
    assert code == 0, err
    assert (
        f"the run folder moved from {pristine / 'run'}; the run continues in {world / 'run'}"
        in (world / "run" / "train.log").read_text()
    )
    assert _digests(pristine / "run") == original
    assert torch.load(world / "run" / "last.pt", weights_only=True)["epoch"] == 2


def test_an_old_checkpoint_without_a_fingerprint_resumes_with_a_note(world, capsys):
    _edit_last(world, lambda s: s.pop("data_fingerprint"))
    code, err = _resume(world, capsys)
    assert code == 0, err
    assert "predates data fingerprints" in (world / "run" / "train.log").read_text()


def test_a_mid_epoch_checkpoint_past_the_end_of_an_epoch_is_refused(world, capsys):
    """An old checkpoint (no fingerprint) written at step 40 of an epoch, on data whose epoch
    has fewer steps: refused, instead of reporting "step 40 of 1" and training nothing."""
    _edit_last(world, lambda s: (s.pop("data_fingerprint"), s.update(epoch=0, step_in_epoch=40)))
    steps = len((world / "data" / "train_caps.txt").read_text().splitlines()) // 16  # captions / batch
    code, err = _resume(world, capsys)
    assert code != 0 and "written at step 40 of an epoch" in err and f"has {steps} steps" in err, err


def test_an_error_in_a_data_loader_worker_is_still_one_line(world, capsys):
    """A CoderError raised in a DataLoader worker reaches the main process wrapped in the
    worker's traceback text; the boundary prints only the original message."""
    _rewrite_npy(_with_nan)(world / "data" / "test_ims.npy")
    main, argv = ENTRY_POINTS["eval"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(argv(world) + ["--workers", "1"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err and "test_ims.npy: non-finite values" in lines[0], err


def test_a_full_disk_outside_the_atomic_writes_still_names_the_file(capsys):
    """A write that is not an atomic_write (a log line, a library's own file) fills the disk:
    the boundary prints the file in one line; any other OSError stays a traceback (a bug)."""

    def fill(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    with pytest.raises(SystemExit) as exit_:
        cli_entry(fill)("/data/out.bin")
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: /data/out.bin: No space left on device\n"

    def deny(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    with pytest.raises(PermissionError):
        cli_entry(deny)("/data/out.bin")


# --------------------------------------------------------------------------- text as other programs save it


def _saved_as(encode: Callable[[str], bytes], crlf: bool = False) -> Callable[[Path], None]:
    """Save a text file again as another program would: JSON indented (so that it has lines),
    `\\r\\n` line ends when `crlf`, then encoded by `encode`."""

    def save(path: Path) -> None:
        text = path.read_bytes().decode("utf-8")
        if path.suffix == ".json":
            text = json.dumps(json.loads(text), indent=1, ensure_ascii=False) + "\n"
        path.write_bytes(encode(text.replace("\n", "\r\n") if crlf else text))

    return save


SAVED_AS = {
    "UTF-8 with a BOM": _saved_as(lambda t: t.encode("utf-8-sig")),
    "CRLF line ends": _saved_as(str.encode, crlf=True),
    "UTF-16 LE with a BOM": _saved_as(lambda t: b"\xff\xfe" + t.encode("utf-16-le")),
    "UTF-16 BE with a BOM": _saved_as(lambda t: b"\xfe\xff" + t.encode("utf-16-be")),
    "UTF-16 with a BOM and CRLF (Notepad)": _saved_as(lambda t: t.encode("utf-16"), crlf=True),
    "UTF-8 with a BOM and CRLF (Excel's CSV UTF-8)": _saved_as(lambda t: t.encode("utf-8-sig"), crlf=True),
}
# Every text file an entry point reads, and the entry points that read it.
TEXT_INPUTS = [
    ("data/train_caps.txt", ["train", "vocab build", "vocab stats", "concepts label", "concepts build"]),
    ("data/test_caps.txt", ["eval", "retrieve", "serve captions"]),
    ("data/test_ids.txt", ["eval", "retrieve"]),
    ("data/vocab.json", ["train", "vocab stats"]),
    ("concepts/concepts.json", ["train", "concepts stats"]),
    ("cvse/category_concepts.json", ["concepts stats cvse"]),
    ("raw/concepts.txt", ["concepts build list"]),
    ("raw/glove.txt", ["concepts build list"]),
    ("raw/captions.csv", ["extract csv", "serve captions csv"]),
    ("raw/train.txt", ["extract csv"]),
    ("raw/karpathy.json", ["extract json"]),
    ("bench/runs/infonce_s0/result.json", ["bench report"]),
]
OUTPUT_FILES = {"vocab build": ["v.json"], "eval": ["m.json"], "concepts build": ["c2"], "concepts build list": ["c2"]}


def outcome(reader: str, world: Path, capsys) -> object:
    """What an entry point made of the world, with the world's own path taken out: the split
    entries of an extraction (its photos are not there), a trained run's data fingerprint,
    vocabulary and concept words, else its output and files. It must succeed."""
    if reader.startswith("extract"):
        import caption_sources

        argv = ENTRY_POINTS[reader][1](world)
        captions, splits = argv[argv.index("--captions") + 1], [a for a in argv if "=" in a]
        return caption_sources.build_split_entries(captions, dict(s.split("=", 1) for s in splits) or None)
    if reader.startswith("serve captions"):  # serve.py --captions: a CSV or one caption per line
        from photo_index import read_caption_file

        return read_caption_file(world / ("raw/captions.csv" if reader.endswith("csv") else "data/test_caps.txt"))
    code, _, err = run_entry(reader, world, capsys)
    out = capsys.readouterr().out
    assert code == 0, err
    if reader == "train":
        state = torch.load(world / "new_run" / "last.pt", weights_only=True)
        return state["data_fingerprint"], state["vocab_words"], state["concept_graph"]["words"]
    files = {
        str(p.relative_to(world)): p.read_bytes().replace(str(world).encode(), b"<world>")
        for output in OUTPUT_FILES.get(reader, [])
        for p in [world / output, *sorted((world / output).glob("*"))]
        if p.is_file()
    }
    return out.replace(str(world), "<world>"), files


@pytest.fixture(scope="module")
def clean_outcome(pristine, tmp_path_factory) -> Callable:
    """`outcome` of each entry point on an undamaged copy of the world (each computed once)."""
    cache: dict[str, object] = {}

    def of(reader: str, capsys) -> object:
        if reader not in cache:
            copy = tmp_path_factory.mktemp("clean") / "w"
            shutil.copytree(pristine, copy, symlinks=True)
            cache[reader] = outcome(reader, copy, capsys)
        return cache[reader]

    return of


TEXT_CASES = [(file, saving, reader) for file, readers in TEXT_INPUTS for saving in SAVED_AS for reader in readers]


@pytest.mark.parametrize(
    "file, saving, reader", TEXT_CASES, ids=[f"{reader}: {file} {saving}" for file, saving, reader in TEXT_CASES]
)
def test_a_text_file_saved_by_another_program_reads_the_same(
    world, clean_outcome, file, saving, reader, capsys, monkeypatch
):
    """Every text input, saved with a byte-order mark (UTF-8, UTF-16 either way round) or
    Windows line ends, gives each entry point that reads it the same result as the plain file."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    SAVED_AS[saving](world / file)
    assert outcome(reader, world, capsys) == clean_outcome(reader, capsys)


PICKLES = ["cvse/x_adj_concepts.pkl", "cvse/x_concepts_glove_word2vec.pkl"]


def _as_lists(value: object) -> object:
    """What `.tolist()` makes of every array in a pickle's contents."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _as_lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_as_lists(v) for v in value)
    return value


@pytest.mark.parametrize("file", PICKLES)
def test_a_concept_pickle_saved_with_lists_for_arrays_reads_the_same(world, clean_outcome, file, capsys):
    path = world / file
    path.write_bytes(pickle.dumps(_as_lists(pickle.loads(path.read_bytes()))))
    assert outcome("concepts stats cvse", world, capsys) == clean_outcome("concepts stats cvse", capsys)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("file", PICKLES)
def test_a_concept_pickle_saved_with_any_protocol_reads_the_same(world, clean_outcome, file, protocol, capsys):
    """CVSE's pickles loaded and saved again with pickle protocol 0 to 5 (numpy arrays then
    come as `_codecs.encode` text or `_frombuffer` buffers) pass the restricted unpickler."""
    path = world / file
    path.write_bytes(pickle.dumps(pickle.loads(path.read_bytes()), protocol=protocol))
    assert outcome("concepts stats cvse", world, capsys) == clean_outcome("concepts stats cvse", capsys)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_a_vocabulary_pickle_with_numpy_ids_reads_the_same_with_any_protocol(world, protocol):
    words = vocab.Vocabulary.load(world / "data" / "vocab.json").idx2word
    path = world / "vocab.pkl"
    path.write_bytes(pickle.dumps({"word2idx": {w: np.int64(i) for i, w in enumerate(words)}}, protocol=protocol))
    assert vocab.Vocabulary.load(path).idx2word == words


def test_the_restricted_unpickler_still_refuses_other_codecs_and_buffers_of_objects(tmp_path):
    """The stand-ins for `_codecs.encode`, numpy's `_frombuffer` and `bytes` decode latin-1 text,
    numeric buffers and empty bytes only: another codec, an object dtype or `bytes(10**12)` is
    refused, never run."""
    from utils import load_pickle_restricted

    def global_call(module: str, name: str, *args: bytes) -> bytes:
        return (
            b"\x80\x02c"
            + f"{module}\n{name}\n".encode()
            + b"".join(args)
            + b"\x85"[: len(args) == 1]
            + b"\x86"[: len(args) == 2]
            + b"R."
        )

    rot13 = global_call("_codecs", "encode", b"X\x05\x00\x00\x00hello", b"X\x05\x00\x00\x00rot13")
    objects = global_call("numpy._core.numeric", "_frombuffer", b"C\x08" + bytes(8), b"X\x02\x00\x00\x00|O")
    terabyte = global_call("__builtin__", "bytes", b"\x8a\x06" + (10**12).to_bytes(6, "little"))
    for name, data in (("rot13.pkl", rot13), ("objects.pkl", objects), ("terabyte.pkl", terabyte)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CoderError, match=name):
            load_pickle_restricted(tmp_path / name)


# --------------------------------------------------------------------------- repeated captions


@pytest.mark.parametrize("source", ["csv", "json"])
def test_a_repeated_caption_never_pushes_out_a_distinct_one(tmp_path, source):
    """An image listed with more than k captions, one of them twice, keeps k distinct captions in
    file order (the repeat gives way); an image whose k captions hold a repeat keeps all k, as
    Flickr8k's own captions.txt has 9 such images."""
    import caption_sources

    listed = {
        "a.jpg": ["c0", "c0", "c1", "c2", "c3", "c4"],
        "b.jpg": ["d0", "d1", "d1", "d2", "d3"],
        "c.jpg": ["e0", "e1", "e0", "e2", "e3", "e4", "e5"],
    }
    if source == "csv":
        captions = tmp_path / "captions.csv"
        captions.write_text("image,caption\n" + "".join(f"{n},{c}\n" for n, caps in listed.items() for c in caps))
        (tmp_path / "train.txt").write_text("".join(f"{n}\n" for n in listed))
        splits = {"train": tmp_path / "train.txt"}
    else:
        captions = tmp_path / "karpathy.json"
        captions.write_text(
            json.dumps(
                {
                    "images": [
                        {"filename": n, "split": "train", "sentences": [{"raw": c} for c in caps]}
                        for n, caps in listed.items()
                    ]
                }
            )
        )
        splits = None
    entries = caption_sources.build_split_entries(captions, splits)["train"]
    assert entries == [
        ("a.jpg", ["c0", "c1", "c2", "c3", "c4"]),
        ("b.jpg", ["d0", "d1", "d1", "d2", "d3"]),
        ("c.jpg", ["e0", "e1", "e2", "e3", "e4"]),
    ]


# --------------------------------------------------------------------------- names that are not UTF-8


def _not_utf8(name: str) -> str:
    """`name` and a byte that is not UTF-8, as Linux allows in a file name (Python holds the
    byte as a lone surrogate, which a strict UTF-8 stream cannot write)."""
    return os.fsdecode(name.encode() + b"\xff")


# Every folder an entry point lists or writes into.
LISTED_FOLDERS = ["data", "concepts", "cvse", "run", "raw", "raw/images", "bench", "bench/runs"]


@pytest.fixture
def foreign_world(pristine, tmp_path) -> Path:
    """The world under a folder whose name is not UTF-8, with a file of such a name in every
    folder an entry point lists, and photos to extract."""
    from PIL import Image

    world = tmp_path / _not_utf8("w")
    shutil.copytree(pristine, world, symlinks=True)
    for folder in LISTED_FOLDERS:
        (world / folder / _not_utf8("stray")).write_bytes(b"x")
    for i, name in enumerate(["a.jpg", "b.jpg"]):
        Image.new("RGB", (12, 10), (40 * i, 90, 200)).save(world / "raw" / "images" / name)
    return world


def run_on_a_terminal(main: Callable, argv: list[str], monkeypatch) -> tuple[int, str, str]:
    """(status, stdout, stderr) of an entry point run with the streams Python opens on a UTF-8
    terminal: stdout refuses what it cannot encode, stderr escapes it (pytest's capture would
    accept either)."""
    out = io.TextIOWrapper(io.BytesIO(), "utf-8", "strict", write_through=True)
    err = io.TextIOWrapper(io.BytesIO(), "utf-8", "backslashreplace", write_through=True)
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    code = 0
    try:
        main(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        monkeypatch.undo()
    return code, out.buffer.getvalue().decode("utf-8"), err.buffer.getvalue().decode("utf-8")


def _tiny_backbone(monkeypatch) -> None:
    """extract_features' default backbone replaced by test_extract_features' 8x8 random conv."""
    import backbones
    from test_extract_features import TinyBackbone

    monkeypatch.setitem(backbones.BACKBONES, "efficientnet-lite0", lambda device: TinyBackbone())


@pytest.mark.parametrize("reader", list(ENTRY_POINTS))
def test_every_entry_point_works_where_names_are_not_utf8(foreign_world, reader, monkeypatch):
    """Each entry point, its inputs and outputs in a folder whose name is not UTF-8 and beside
    files of such names, does its work and prints every name (escaped where it is not text)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _tiny_backbone(monkeypatch)
    main, argv = ENTRY_POINTS[reader]
    argv = argv(foreign_world) + (["--workers", "0"] if reader.startswith("extract") else [])
    if reader == "train --resume":
        argv += ["--epochs", "2"]
    code, out, err = run_on_a_terminal(main, argv, monkeypatch)
    assert code == 0 and "Traceback" not in err, err


@pytest.mark.parametrize("case", ["a split named in a folder listing", "a second CVSE pickle", "a run folder's file"])
def test_a_refusal_that_lists_names_that_are_not_utf8_is_one_line(foreign_world, case, monkeypatch):
    w = foreign_world
    if case == "a split named in a folder listing":
        shutil.copy(w / "data" / "test_ims.npy", w / "data" / f"{_not_utf8('test')}_ims.npy")
        reader, extra = "train", ["--test_split", "tset"]
    elif case == "a second CVSE pickle":
        shutil.copy(w / "cvse" / "x_adj_concepts.pkl", w / "cvse" / f"{_not_utf8('y')}_adj_concepts.pkl")
        reader, extra = "concepts stats cvse", []
    else:
        (w / "new_run").mkdir()
        (w / "new_run" / f"{_not_utf8('model')}.pt").write_bytes(b"x")
        reader, extra = "train", []
    main, argv = ENTRY_POINTS[reader]
    code, out, err = run_on_a_terminal(main, argv(w) + extra, monkeypatch)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "\\udcff" in lines[0], err


# --------------------------------------------------------------------------- a disk that fills up under a memory map

# Extraction with a backbone of 4 regions x 65,536 floats: 1 MiB of features per photo.
WIDE_EXTRACTION = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import torch
import backbones, extract_features
from test_extract_features import TinyBackbone, cli_args, make_dataset

class Wide(TinyBackbone):
    feature_dim = 65536

    def regions(self, batch):
        return torch.ones(len(batch), 4, self.feature_dim)

backbones.BACKBONES["efficientnet-lite0"] = lambda device: Wide()
data, out = map(__import__("pathlib").Path, sys.argv[1:3])
data.mkdir()
make_dataset(data)
extract_features.main(cli_args(data, out, "--workers", "0", "--batch-size", "1", "--device", "cpu"))
"""


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 300 KiB tmpfs (root only: skipped elsewhere)."""
    import subprocess

    disk = tmp_path / "small_disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)  # busy if a failed run still held a file there


def test_features_that_fill_the_disk_end_with_one_line_not_sigbus(tmp_path, small_disk):
    """Features memory-mapped onto a disk too small for them: one line naming the file and the
    full disk, status 2, no partial file left (a write into a mapped page that finds no room
    would kill the process with SIGBUS, without a word)."""
    import subprocess

    script = WIDE_EXTRACTION.format(root=str(ROOT), tests=str(ROOT / "tests"))
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "data"), str(small_disk / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr)
    assert "train_ims.npy.partial" in lines[0] and "No space left on device" in lines[0], proc.stderr
    assert not (small_disk / "out" / "train_ims.npy.partial").exists()


def test_a_disk_that_fills_while_training_ends_with_one_line(world, small_disk, capsys):
    """A real full disk (the faked ones are above): the first checkpoint that does not fit ends
    the run with one line naming it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        _train(_data_args(world) + TINY + ["--epochs", "2", "--run_dir", str(small_disk / "run")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(lines) == 1 and "No space left on device" in lines[0], lines
    assert ".pt: cannot write" in lines[0], lines


def test_a_full_disk_met_when_features_are_reserved_is_one_line(tmp_path, capsys, monkeypatch):
    """The same on any machine: the space reservation made before mapping fails (faked)."""
    from test_extract_features import cli_args, make_dataset

    make_dataset(tmp_path)
    _tiny_backbone(monkeypatch)
    monkeypatch.setattr(os, "posix_fallocate", _disk_full)
    with pytest.raises(SystemExit) as exit_:
        extract_features.main(cli_args(tmp_path, tmp_path / "out", "--workers", "0", "--device", "cpu"))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(lines) == 1, lines
    assert "train_ims.npy.partial" in lines[0] and "No space left on device" in lines[0], lines
    assert not (tmp_path / "out" / "train_ims.npy.partial").exists()


# --------------------------------------------------------------------------- outputs that cannot be made


def _with_output(reader: str, option: str, path: Path) -> Callable[[Path], list[str]]:
    """The reader's command line with `option` set to `path` (added where it has none)."""

    def argv(w: Path) -> list[str]:
        args = ENTRY_POINTS[reader][1](w)
        if option in args:
            args[args.index(option) + 1] = str(path)
            return args
        return args + [option, str(path)]

    return argv


# Outputs no file system can make: a name longer than 255 bytes, a link to nowhere or a file on the way.
UNMAKEABLE: dict[str, dict[str, Callable[[Path], Path]]] = {
    "a name too long": {"file": lambda w: w / ("n" * 300 + ".json"), "folder": lambda w: w / ("n" * 300) / "out"},
    "a link to nowhere on the way": {
        "file": lambda w: w / "nowhere" / "out.json",
        "folder": lambda w: w / "nowhere" / "out",
    },
    "a file on the way": {"file": lambda w: w / "afile" / "out.json", "folder": lambda w: w / "afile" / "out"},
}
OUTPUTS = [
    ("eval", "--json", "file"),
    ("vocab build", "--out", "file"),
    ("concepts build", "--out", "folder"),
    ("extract csv", "--out", "folder"),
    ("train", "--run_dir", "folder"),
    ("bench report", "--out", "folder"),
]
UNMAKEABLE_CASES = [
    (reader, option, how, paths[kind])
    for reader, option, kind in OUTPUTS
    for how, paths in UNMAKEABLE.items()
    if kind in paths
]


@pytest.mark.parametrize(
    "reader, option, how, path",
    UNMAKEABLE_CASES,
    ids=[f"{reader} {option}: {how}" for reader, option, how, _ in UNMAKEABLE_CASES],
)
def test_an_output_that_cannot_be_made_is_refused_before_the_work(
    world, reader, option, how, path, capsys, monkeypatch
):
    """The output is tried before the work starts (what the try makes is removed again): one
    line naming the option, not a failure once the results are computed."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (world / "nowhere").symlink_to(world / "no such folder")
    (world / "afile").write_text("a file, not a folder\n")
    before = _digests(world), sorted(os.listdir(world))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        ENTRY_POINTS[reader][0](_with_output(reader, option, path(world))(world))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {option} "), err
    assert (_digests(world), sorted(os.listdir(world))) == before


@pytest.mark.parametrize("reader", ["eval", "vocab build"])
def test_an_output_name_at_the_file_system_limit_is_written(world, reader, capsys, monkeypatch):
    """A 255-byte name fits; the atomic write's temporary sibling must fit too."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = world / ("n" * 250 + ".json")
    capsys.readouterr()
    ENTRY_POINTS[reader][0](_with_output(reader, "--json" if reader == "eval" else "--out", path)(world))
    assert json.loads(path.read_text()), capsys.readouterr().err


# --------------------------------------------------------------------------- a run's state and its inputs


def _dev_row_changed(world: Path) -> None:
    path = world / "data" / "dev_ims.npy"
    features = np.load(path)
    features[1] += 1.0  # neither the first, the middle nor the last row
    np.save(path, features)


def _three_row_fingerprint(state: dict) -> None:
    """The dev fingerprint as checkpoints wrote it when it hashed three feature rows."""
    import data

    state["val_fingerprint"] = data.data_fingerprint(data.load_split(state["config"]["data_path"], "dev"))


# how the world changes after the checkpoint, and whether its dev data then differ
DEV_DATA: dict[str, tuple[Callable[[Path], None], bool]] = {
    "captions changed": (
        lambda w: (w / "data" / "dev_caps.txt").write_text(
            (w / "data" / "dev_caps.txt").read_text().replace("a", "the", 1)
        ),
        True,
    ),
    "one feature row changed": (_dev_row_changed, True),
    "unchanged": (lambda w: None, False),
    "unchanged, checkpoint hashed three rows": (lambda w: _edit_last(w, _three_row_fingerprint), False),
}


@pytest.mark.parametrize("dev_data", DEV_DATA)
def test_a_resume_on_changed_dev_data_starts_a_fresh_best(world, dev_data, capsys):
    """The best dev score of a checkpoint is comparable only on the dev data it was measured on:
    when the dev captions or any feature row changed, the resumed run's next validation makes
    the new best.pt whatever it scores (here below a recorded best of 600, more than any rsum);
    unchanged dev data keeps the recorded best."""
    _edit_last(world, lambda s: s.update(best_rsum=600.0))
    change, changed = DEV_DATA[dev_data]
    change(world)
    code, err = _resume(world, capsys, "--epochs", "2", "--data_path", str(world / "data"))
    assert code == 0, err
    log = (world / "run" / "train.log").read_text()
    last = torch.load(world / "run" / "last.pt", weights_only=True)
    rsum = float(log.rsplit("validation at step", 1)[1].split("rsum=", 1)[1].split()[0])
    if changed:
        assert "the validation data changed" in log
        assert last["best_rsum"] == pytest.approx(rsum, abs=0.01)
        assert torch.load(world / "run" / "best.pt", weights_only=True)["epoch"] == 2
    else:
        assert "the validation data changed" not in log and last["best_rsum"] == 600.0


def _only_special_tokens(w: Path) -> list[str]:
    (w / "data" / "vocab.json").write_text(json.dumps({"words": list(vocab.SPECIAL_TOKENS)}))
    return []


def _no_cooccurrence(w: Path) -> list[str]:
    path = w / "concepts" / "cooccurrence.npy"
    np.save(path, np.zeros_like(np.load(path)))
    return []


def _words_never_in_the_captions(w: Path) -> list[str]:
    (w / "data" / "vocab.json").write_text(json.dumps({"words": [*vocab.SPECIAL_TOKENS, "zzzz", "qqqq"]}))
    return []


def _concepts_never_in_the_captions(w: Path) -> list[str]:
    path = w / "concepts" / "concepts.json"
    meta = json.loads(path.read_text())
    meta["words"] = [f"zz{i}" for i in range(len(meta["words"]))]
    path.write_text(json.dumps(meta))
    return []


def _captions_written_twice(w: Path) -> list[str]:
    path = w / "data" / "train_caps.txt"
    path.write_text(path.read_text() * 2)
    return []


def _each_caption_twice(w: Path) -> list[str]:
    path = w / "data" / "train_caps.txt"
    path.write_text("".join(line + "\n" + line + "\n" for line in path.read_text().splitlines()))
    return []


# (how the world or the command line is changed, what the refusal names)
DEGENERATE: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "a 1-d embedding": (lambda w: ["--embed_dim", "1"], "--embed_dim 1"),
    "a vocabulary of special tokens only": (_only_special_tokens, "vocab.json"),
    "a vocabulary that knows no word of the captions": (_words_never_in_the_captions, "vocab.json"),
    "a concept graph without an edge": (_no_cooccurrence, "concepts"),
    "a concept graph without an edge, at threshold 0": (
        lambda w: [*_no_cooccurrence(w), "--concept_threshold", "0"],
        "concepts",
    ),
    "concepts that never occur in the captions": (_concepts_never_in_the_captions, "concepts"),
    "a caption file written twice": (_captions_written_twice, "train_caps.txt"),
    "a caption file with each line twice": (_each_caption_twice, "train_caps.txt"),
    "a batch of one": (lambda w: ["--batch_size", "1"], "--batch_size 1"),
    "one prototype": (lambda w: ["--num_prototypes", "1"], "--num_prototypes 1"),
    "validation on one image": (lambda w: ["--val_max_images", "1"], "--val_max_images 1"),
}


@pytest.mark.parametrize("setting", DEGENERATE)
def test_a_degenerate_setting_is_refused_in_one_line(world, setting, capsys):
    """Settings under which training cannot mean anything: every similarity of 1-d unit
    vectors is +1 or -1; every caption of a vocabulary without words is <unk>; a graph
    without edges leaves the concept branch's GCN nothing to propagate."""
    extra, named = DEGENERATE[setting]
    argv = ENTRY_POINTS["train"][1](world) + extra(world)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        _train(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(lines) == 1 and named in lines[0], err
    assert not (world / "new_run").exists()


def test_a_vocabulary_build_that_keeps_no_word_is_refused(world, capsys):
    main, argv = ENTRY_POINTS["vocab build"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv(world) + ["--min-count", "100000"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(lines) == 1 and "--min-count" in lines[0], lines
    assert not (world / "v.json").exists()


def test_a_concept_graph_built_without_an_edge_is_written_with_a_warning(world, capsys):
    """One concept: no edge at any threshold. The graph is written (a folder of concepts is
    still a valid input elsewhere), and a warning says that training refuses it."""
    (world / "raw" / "concepts.txt").write_text("bird\n")
    main, argv = ENTRY_POINTS["concepts build list"]
    capsys.readouterr()
    main(argv(world))
    err = capsys.readouterr().err
    assert "warning: " in err and "no edge" in err, err
    assert concepts.load_concepts(world / "c2").words == ["bird"]


def test_a_run_folder_is_held_by_one_process_and_freed_when_it_dies(world, capsys):
    """While a run trains, a resume of it and a new run told to overwrite its folder are
    refused in one line naming the training process; once that process is killed (SIGKILL:
    no clean-up of its own), the folder is free and the resume trains."""
    import subprocess
    import time

    run_dir = world / "held"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train_f30k.py"),
            *_data_args(world),
            *TINY,
            "--epochs",
            "1000",
            "--checkpoint_every_steps",
            "1",
            "--run_dir",
            str(run_dir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.time() + 120
        while not (run_dir / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read().decode()
        # each would train one epoch at most, were it let in
        epoch = torch.load(run_dir / "last.pt", weights_only=True)["epoch"]
        resume = ["--resume", str(run_dir / "last.pt"), "--epochs", str(epoch + 1), "--progress", "false"]
        for argv in (resume, _data_args(world) + TINY + ["--run_dir", str(run_dir), "--overwrite", "true"]):
            capsys.readouterr()
            with pytest.raises(SystemExit) as exit_:
                _train(argv)
            lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
            assert exit_.value.code == 2 and len(lines) == 1 and f"pid {proc.pid}" in lines[0], lines
    finally:
        proc.kill()
        proc.wait()
    epoch = torch.load(run_dir / "last.pt", weights_only=True)["epoch"]
    capsys.readouterr()
    _train(["--resume", str(run_dir / "last.pt"), "--epochs", str(epoch + 1), "--progress", "false"])
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == epoch + 1


# --------------------------------------------------------------------------- properties of text and pickles

_ENCODINGS = {
    "UTF-8": lambda t: t.encode("utf-8"),
    "UTF-8 with a BOM": lambda t: t.encode("utf-8-sig"),
    "UTF-16 LE with a BOM": lambda t: b"\xff\xfe" + t.encode("utf-16-le"),
    "UTF-16 BE with a BOM": lambda t: b"\xfe\xff" + t.encode("utf-16-be"),
}
# (U+FEFF is left out: at the start of a file it is the byte-order mark, whatever follows)
_PLAIN_CAPTION = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="\x85\ufeff"),
    min_size=1,
    max_size=20,
).filter(str.strip)


@settings(max_examples=100, deadline=None)
@given(st.lists(_PLAIN_CAPTION, min_size=1, max_size=6), st.sampled_from(sorted(_ENCODINGS)), st.booleans())
def test_any_captions_read_the_same_in_any_encoding_other_programs_save(tmp_path_factory, lines, encoding, crlf):
    """Any caption lines (any characters, astral ones included), saved as UTF-8 with or without
    a BOM or as UTF-16 with one, with \\n or \\r\\n line ends: read_captions gives the lines."""
    path = tmp_path_factory.mktemp("enc") / "caps.txt"
    path.write_bytes(_ENCODINGS[encoding](("\r\n" if crlf else "\n").join(lines) + "\n"))
    assert vocab.read_captions(path) == [line.strip() for line in lines]


_ARRAYS = st.sampled_from(["<i8", "<i4", "<f4", "<f8", ">f4", "|u1", "|b1"]).flatmap(
    lambda dtype: st.lists(st.integers(0, 4), min_size=0, max_size=3).map(
        lambda shape: (
            np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
            if dtype != "|b1"
            else (np.arange(int(np.prod(shape))) % 2).astype(bool).reshape(shape)
        )
    )
)


@settings(max_examples=60, deadline=None)
@given(_ARRAYS, st.integers(0, pickle.HIGHEST_PROTOCOL), st.booleans())
def test_any_numeric_array_pickled_with_any_protocol_loads_through_the_restricted_unpickler(
    tmp_path_factory, array, protocol, fortran
):
    """Arrays of any numeric dtype, byte order, shape (empty and 0-d included) and memory order,
    in a dict as CVSE's pickles hold them, load under every pickle protocol as the unrestricted
    unpickler loads them (which, before protocol 5, gives big-endian data in native order)."""
    from utils import load_pickle_restricted

    array = np.asfortranarray(array) if fortran else array
    data = pickle.dumps({"nums": array, "n": np.int64(3), "x": np.float32(0.5)}, protocol=protocol)
    path = tmp_path_factory.mktemp("pkl") / "x.pkl"
    path.write_bytes(data)
    loaded, expected = load_pickle_restricted(path), pickle.loads(data)
    assert loaded["nums"].dtype == expected["nums"].dtype and np.array_equal(loaded["nums"], array)
    assert loaded["n"] == 3 and loaded["x"] == np.float32(0.5)
