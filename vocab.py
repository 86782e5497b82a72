"""Caption tokenizer and word vocabulary for the GRU text encoder, plus a BERT tokenizer wrapper.

The tokenizer reproduces, offline, the splits of NLTK's `word_tokenize` (sentence split, then
the Penn Treebank rules) that SCAN-family code used to build its vocabularies, so that SCAN's
published vocabulary files see the tokens they were built from. Any text tokenizer used by the
data layer is an object with `.encode(caption) -> list[int]` and `.pad_id`.

CLI:
    python vocab.py build CAPTION_FILE... --min-count 4 --out vocab.json
    python vocab.py stats --vocab VOCAB.json CAPTION_FILE...
"""

from __future__ import annotations

import argparse
import json
import numbers
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

from utils import (
    CoderError,
    atomic_write,
    cli_entry,
    load_pickle_restricted,
    load_pretrained,
    read_json,
    read_text_lines,
)

SPECIAL_TOKENS = ("<pad>", "<start>", "<end>", "<unk>")
PAD, START, END, UNK = range(4)

# --- Sentence split -------------------------------------------------------------------------
# word_tokenize first splits text into sentences, and the Treebank rules detach a period only at
# the end of a sentence. A word ending in one period followed by more text ends a sentence unless
# it is an abbreviation: a single letter ("j."), a dotted acronym ("u.s."), or a common title.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr vs etc inc co corp ltd mt ft ave blvd rd no jan feb mar apr jun jul "
    "aug sep sept oct nov dec prof gen capt sgt lt col rev".split()
)
_SENTENCE_END = re.compile(r"(\S*[^.\s]\.)(?=\s+\S)")


def _split_sentences(text: str) -> list[str]:
    pieces, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        stem = match.group(1)[:-1].lstrip("\"'`([{<")
        if (len(stem) == 1 and stem.isalpha()) or "." in stem or stem in _ABBREVIATIONS:
            continue
        pieces.append(text[start : match.end()])
        start = match.end()
    pieces.append(text[start:])
    return pieces


# --- Penn Treebank word rules (as in the NLTK 3.2 releases SCAN used) -------------------------
_QUOTES_OPEN = [
    (re.compile(r'^"'), "``"),
    (re.compile(r"(``)"), r" \1 "),
    (re.compile(r"([ (\[{<])(\"|'')"), r"\1 `` "),
]
_PUNCTUATION = [
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.\.\."), " ... "),
    (re.compile(r"[;@#$%&]"), r" \g<0> "),
    (re.compile(r"([^.])(\.)([\])}>\"']*)\s*$"), r"\1 \2\3 "),  # only the sentence-final period
    (re.compile(r"[?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
    (re.compile(r"[\][(){}<>]"), r" \g<0> "),
    (re.compile(r"--"), " -- "),
]
_QUOTES_CLOSE = [
    (re.compile(r'"'), " '' "),
    (re.compile(r"(\S)('')"), r"\1 \2 "),
    (re.compile(r"([^' ])('[sSmMdD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
]
_CONTRACTIONS = [
    re.compile(p)
    for p in (
        r"(?i)\b(can)(not)\b",
        r"(?i)\b(d)('ye)\b",
        r"(?i)\b(gim)(me)\b",
        r"(?i)\b(gon)(na)\b",
        r"(?i)\b(got)(ta)\b",
        r"(?i)\b(lem)(me)\b",
        r"(?i)\b(mor)('n)\b",
        r"(?i)\b(wan)(na)\s",
        r"(?i) ('t)(is)\b",
        r"(?i) ('t)(was)\b",
    )
]


def _treebank_words(sentence: str) -> list[str]:
    for pattern, repl in _QUOTES_OPEN + _PUNCTUATION:
        sentence = pattern.sub(repl, sentence)
    sentence = f" {sentence} "
    for pattern, repl in _QUOTES_CLOSE:
        sentence = pattern.sub(repl, sentence)
    for pattern in _CONTRACTIONS:
        sentence = pattern.sub(r" \1 \2 ", sentence)
    return sentence.split()


def tokenize(text: str) -> list[str]:
    """Lower-case and split a caption into PTB word and punctuation tokens (`man's` -> `man 's`)."""
    return [w for s in _split_sentences(text.lower()) for w in _treebank_words(s)]


# --- Vocabulary -------------------------------------------------------------------------------
class Vocabulary:
    """Word <-> id mapping with SCAN's four special tokens at ids 0..3."""

    def __init__(self, idx2word: Sequence[str], source: str = "<memory>") -> None:
        self.idx2word = list(idx2word)
        if tuple(self.idx2word[:4]) != SPECIAL_TOKENS:
            raise CoderError(
                f"{source}: vocabulary must start with the special tokens "
                f"{', '.join(SPECIAL_TOKENS)} at ids 0-3, found {self.idx2word[:4]}"
            )
        self.word2idx = {w: i for i, w in enumerate(self.idx2word)}
        if len(self.word2idx) != len(self.idx2word):
            dup = [w for w, c in Counter(self.idx2word).items() if c > 1][:5]
            raise CoderError(f"{source}: vocabulary lists words twice: {dup}")

    @classmethod
    def from_words(cls, words: Iterable[str]) -> "Vocabulary":
        """Special tokens followed by `words` in the given order (duplicates dropped)."""
        seen = dict.fromkeys(SPECIAL_TOKENS)
        seen.update(dict.fromkeys(w for w in words if w not in seen))
        return cls(list(seen))

    def __len__(self) -> int:
        return len(self.idx2word)

    def __call__(self, word: str) -> int:
        return self.word2idx.get(word, UNK)

    @property
    def pad_id(self) -> int:
        return PAD

    @property
    def special_ids(self) -> set[int]:
        return {PAD, START, END, UNK}

    def encode_words(self, words: Sequence[str]) -> list[int]:
        """`<start>` + ids of already tokenized words + `<end>`."""
        return [START, *(self.word2idx.get(w, UNK) for w in words), END]

    def encode(self, caption: str) -> list[int]:
        """`<start>` + ids of tokenize(caption) + `<end>`, unknown words as `<unk>`."""
        return self.encode_words(tokenize(caption))

    def save(self, path: str | Path) -> None:
        """Write SCAN's JSON format (`word2idx`, `idx2word` with string keys, `idx`)."""
        data = {
            "word2idx": self.word2idx,
            "idx2word": {str(i): w for i, w in enumerate(self.idx2word)},
            "idx": len(self.idx2word),
        }
        atomic_write(path, lambda f: json.dump(data, f), mode="w")

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        """Read SCAN's JSON vocabulary or a pickled dict vocabulary (restricted unpickler)."""
        path = Path(path)
        data = load_pickle_restricted(path) if path.suffix == ".pkl" else read_json(path, "vocabulary file")
        return cls(_words_from_mapping(data, path), source=str(path))


def _words_from_mapping(data: object, path: Path) -> list[str]:
    """Words in id order from a `word2idx` dict (SCAN/CVSE) or a `words` list; ids must be
    integers 0..n-1 (not floats, strings or booleans) and words strings."""
    if isinstance(data, dict) and isinstance(data.get("word2idx"), dict):
        word2idx = data["word2idx"]
        wrong = next(
            (
                (w, i)
                for w, i in word2idx.items()
                if not isinstance(w, str) or not isinstance(i, numbers.Integral) or isinstance(i, bool)
            ),
            None,
        )
        if wrong is not None:
            raise CoderError(
                f"{path}: word2idx maps {wrong[0]!r} to {wrong[1]!r} ({type(wrong[1]).__name__}); "
                f"words must be strings and ids integers"
            )
        ids = sorted((int(i), w) for w, i in word2idx.items())
        if [i for i, _ in ids] != list(range(len(ids))):
            raise CoderError(f"{path}: word2idx ids are not 0..{len(ids) - 1} without gaps")
        return [w for _, w in ids]
    if isinstance(data, dict) and isinstance(data.get("words"), list):
        wrong = next((w for w in data["words"] if not isinstance(w, str)), None)
        if wrong is not None:
            raise CoderError(f"{path}: 'words' holds {wrong!r} ({type(wrong).__name__}); every word must be a string")
        return list(data["words"])
    raise CoderError(f"{path}: not a vocabulary (expected a dict with 'word2idx' or 'words')")


def read_captions(path: str | Path, what: str = "caption file") -> list[str]:
    """Captions of a file, one per line as `wc -l` counts them (surrounding whitespace
    stripped). Trailing blank lines are dropped; an empty file, a blank line among the captions,
    and the problems `utils.read_text_lines` refuses (not UTF-8, NUL bytes, U+2028 and other
    line-break characters inside a line) are errors that name the line."""
    lines = [line.strip() for line in read_text_lines(path, what)]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise CoderError(f"{path}: {what} is empty")
    blank = next((i for i, line in enumerate(lines) if not line), None)
    if blank is not None:
        raise CoderError(f"{path}:{blank + 1}: blank line; every line must hold one caption")
    return lines


def count_words(caption_files: Iterable[str | Path]) -> Counter:
    """Token counts over every caption of the files."""
    counter: Counter = Counter()
    for path in caption_files:
        for caption in read_captions(path):
            counter.update(tokenize(caption))
    return counter


def build_vocab(caption_files: Iterable[str | Path], min_count: int = 4) -> Vocabulary:
    """Vocabulary of the words seen at least `min_count` times, most frequent first; refused
    when no word is (see `require_words`)."""
    caption_files = list(caption_files)
    counter = count_words(caption_files)
    kept = sorted((w for w, c in counter.items() if c >= min_count), key=lambda w: (-counter[w], w))
    if not kept:
        raise CoderError(
            f"{', '.join(map(str, caption_files))}: no word occurs {min_count} times or more, and a "
            f"vocabulary of the special tokens alone makes every word <unk>; lower --min-count"
        )
    return Vocabulary.from_words(kept)


def require_words(vocabulary: Vocabulary, source: str | Path) -> Vocabulary:
    """`vocabulary`, unless it holds only the special tokens: every caption would then encode
    as <start> <unk>... <end>, and no model trained on it could tell two captions apart."""
    if len(vocabulary) <= len(SPECIAL_TOKENS):
        raise CoderError(
            f"{source}: the vocabulary holds only the special tokens {', '.join(SPECIAL_TOKENS)}, so "
            f"every word would be <unk>; build it from the training captions with vocab.py build"
        )
    return vocabulary


def require_known_words(tokenizer: Any, captions: Sequence[str], source: str | Path, sample: int = 1000) -> None:
    """Refuse a tokenizer that knows no word of the training captions (checked on the first
    `sample`): every caption would encode as special tokens alone, all alike to the model."""
    if not any(set(tokenizer.encode(c)) - tokenizer.special_ids for c in captions[:sample]):
        raise CoderError(
            f"{source}: none of the first {min(sample, len(captions))} training captions has a word this "
            f"vocabulary knows (each would be <unk> alone); use the vocabulary made for these captions"
        )


def oov_stats(vocab: Vocabulary, caption_files: Iterable[str | Path]) -> dict:
    """Token and `<unk>` counts over caption words (without `<start>`/`<end>`)."""
    tokens = unknown = captions = 0
    for path in caption_files:
        for caption in read_captions(path):
            words = tokenize(caption)
            captions += 1
            tokens += len(words)
            unknown += sum(w not in vocab.word2idx for w in words)
    return {
        "captions": captions,
        "tokens": tokens,
        "oov_tokens": unknown,
        "oov_rate": unknown / tokens if tokens else 0.0,
        "vocab_size": len(vocab),
    }


# --- BERT -------------------------------------------------------------------------------------
class BertTokenizer:
    """A `transformers` tokenizer (hub name or local directory) behind the `.encode` interface."""

    def __init__(self, name_or_dir: str, max_length: int = 128) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = load_pretrained(AutoTokenizer, name_or_dir, "BERT tokenizer")
        self.max_length = max_length
        # A fast tokenizer's own Rust tokenizer, truncating as the call below does: the same ids
        # in less than half the time per caption (the training loader tokenises every caption).
        self._rust = None
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers import Tokenizer

            self._rust = Tokenizer.from_str(backend.to_str())
            self._rust.enable_truncation(max_length)
            self._rust.no_padding()

    def encode(self, caption: str) -> list[int]:
        """[CLS] word pieces [SEP], truncated to `max_length` ids."""
        if self._rust is not None:
            return self._rust.encode(caption).ids
        return list(self.tokenizer(caption, truncation=True, max_length=self.max_length)["input_ids"])

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id or 0)

    @property
    def special_ids(self) -> set[int]:
        return set(self.tokenizer.all_special_ids)

    def __len__(self) -> int:
        return len(self.tokenizer)


# --- CLI --------------------------------------------------------------------------------------
@cli_entry
def main(argv: Sequence[str] | None = None) -> None:
    from options import ArgumentParser, check_output_file, positive_int

    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build a SCAN-format JSON vocabulary from caption files")
    build.add_argument("captions", nargs="+", help="caption files, one caption per line")
    build.add_argument("--min-count", type=positive_int, default=4, help="keep words seen this often (default 4)")
    build.add_argument("--out", required=True, help="output vocabulary JSON")
    build.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    stats = sub.add_parser("stats", help="print token count and OOV rate of captions as one JSON line")
    stats.add_argument("--vocab", required=True, help="SCAN JSON vocabulary (or dict .pkl)")
    stats.add_argument("captions", nargs="+", help="caption files, one caption per line")
    args = parser.parse_args(argv)

    if args.command == "build":
        check_output_file(args.out, "--out", args.overwrite, inputs=args.captions)
        vocab = build_vocab(args.captions, args.min_count)
        vocab.save(args.out)
        print(json.dumps({"vocab": args.out, "words": len(vocab), "min_count": args.min_count}))
    else:
        print(json.dumps(oov_stats(Vocabulary.load(args.vocab), args.captions)))


if __name__ == "__main__":
    main(sys.argv[1:])
