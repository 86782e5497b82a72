"""Tokenizer, vocabulary (SCAN JSON / restricted pickle), build and stats CLI, BERT wrapper."""

import json
import os
import pickle
from collections import Counter
from pathlib import Path

import pytest

import vocab
from utils import CoderError
from vocab import SPECIAL_TOKENS, Vocabulary, build_vocab, tokenize


@pytest.mark.parametrize(
    "text, tokens",
    [
        ("A man's T-shirt.", ["a", "man", "'s", "t-shirt", "."]),
        ("Two young, White males are outside.", ["two", "young", ",", "white", "males", "are", "outside", "."]),
        (
            "The dog isn't here; it cannot swim!",
            ["the", "dog", "is", "n't", "here", ";", "it", "can", "not", "swim", "!"],
        ),
        ('A sign reads " Green Jungle . "', ["a", "sign", "reads", "``", "green", "jungle", ".", "``"]),
        ("A `` book bus '' parked", ["a", "``", "book", "bus", "``", "parked"]),
        ('He said "hi"', ["he", "said", "``", "hi", "''"]),
        (
            "The 'stop' sign, 3,000 people: (yes)",
            ["the", "'stop", "'", "sign", ",", "3,000", "people", ":", "(", "yes", ")"],
        ),
        ("About 4' tall -- really?", ["about", "4", "'", "tall", "--", "really", "?"]),
        ("Wait... a banana together..", ["wait", "...", "a", "banana", "together.."]),
        ("A man. A dog runs.", ["a", "man", ".", "a", "dog", "runs", "."]),
        (
            "Mr. Smith at St. Mary's in the U.S. today",
            ["mr.", "smith", "at", "st.", "mary", "'s", "in", "the", "u.s.", "today"],
        ),
        ("we're gonna eat $5 fish & chips", ["we", "'re", "gon", "na", "eat", "$", "5", "fish", "&", "chips"]),
    ],
)
def test_tokenize_follows_penn_treebank(text, tokens):
    assert tokenize(text) == tokens


def test_vocabulary_encode_and_lookup():
    v = Vocabulary.from_words(["dog", "a", "dog", "runs"])
    assert v.idx2word == [*SPECIAL_TOKENS, "dog", "a", "runs"]
    assert len(v) == 7 and v.pad_id == 0
    assert v("dog") == 4 and v("zebra") == 3
    assert v.encode("A dog flies.") == [1, 5, 4, 3, 3, 2]  # <start> a dog <unk> <unk>(.) <end>


def test_save_load_round_trip_in_scan_format(tmp_path):
    v = Vocabulary.from_words(["b", "a"])
    path = tmp_path / "v.json"
    v.save(path)
    raw = json.loads(path.read_text())
    assert raw == {
        "word2idx": {w: i for i, w in enumerate([*SPECIAL_TOKENS, "b", "a"])},
        "idx2word": {str(i): w for i, w in enumerate([*SPECIAL_TOKENS, "b", "a"])},
        "idx": 6,
    }
    assert Vocabulary.load(path).idx2word == v.idx2word


def test_load_real_scan_vocab_and_tokenizer_agrees_with_it(shared_data):
    for name in ("f30k", "coco"):
        v = Vocabulary.load(shared_data / "scan_text" / f"{name}_precomp_vocab.json")
        raw = json.loads((shared_data / "scan_text" / f"{name}_precomp_vocab.json").read_text())
        assert len(v) == raw["idx"] and all(v(w) == i for w, i in raw["word2idx"].items())
        # Every vocabulary word came out of word_tokenize, so it must survive our tokenizer intact
        # (mid-sentence for abbreviations, whose final period is split only at a sentence end).
        for word in v.idx2word[4:]:
            if word.endswith("."):
                assert tokenize(f"{word} x")[0] == word, word
            else:
                assert tokenize(word) == [word], word


@pytest.mark.parametrize("name, low, high", [("f30k", 0.005, 0.015), ("coco", 0.002, 0.008)])
def test_oov_rate_on_real_scan_dev_captions(shared_data, capsys, name, low, high):
    vocab.main(
        [
            "stats",
            "--vocab",
            str(shared_data / "scan_text" / f"{name}_precomp_vocab.json"),
            str(shared_data / "scan_text" / f"{name}_dev_caps.txt"),
        ]
    )
    stats = json.loads(capsys.readouterr().out)
    assert stats["captions"] == (5070 if name == "f30k" else 5000)
    assert low < stats["oov_rate"] < high, stats
    assert stats["oov_rate"] == pytest.approx(stats["oov_tokens"] / stats["tokens"])


def test_build_vocab_min_count_matches_counter(tmp_path):
    lines = ["a dog runs .", "a cat runs .", "a dog sleeps", "the dog , a cat"]
    (tmp_path / "c1.txt").write_text("\n".join(lines[:2]) + "\n")
    (tmp_path / "c2.txt").write_text("\n".join(lines[2:]) + "\n")
    counts = Counter(w for line in lines for w in line.split())
    v = build_vocab([tmp_path / "c1.txt", tmp_path / "c2.txt"], min_count=2)
    assert set(v.idx2word[4:]) == {w for w, c in counts.items() if c >= 2}
    assert v.idx2word[4:6] == ["a", "dog"]  # most frequent first


def test_cli_build_then_stats(tmp_path, capsys):
    caps = tmp_path / "caps.txt"
    caps.write_text("a dog runs\na dog sits\na cat\n")
    out = tmp_path / "v.json"
    vocab.main(["build", str(caps), "--min-count", "2", "--out", str(out)])
    capsys.readouterr()
    assert Vocabulary.load(out).idx2word[4:] == ["a", "dog"]
    vocab.main(["stats", "--vocab", str(out), str(caps)])
    stats = json.loads(capsys.readouterr().out)
    assert stats["tokens"] == 8 and stats["oov_tokens"] == 3 and stats["oov_rate"] == pytest.approx(3 / 8)


def test_load_dict_pickle_with_restricted_unpickler(tmp_path):
    path = tmp_path / "v.pkl"
    path.write_bytes(pickle.dumps({"word2idx": {w: i for i, w in enumerate([*SPECIAL_TOKENS, "dog"])}}))
    assert Vocabulary.load(path)("dog") == 4


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned_marker",))


def test_malicious_pickle_vocab_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"word2idx": _Payload()}))
    with pytest.raises(CoderError, match="evil.pkl"):
        Vocabulary.load(path)
    assert not (tmp_path / "pwned_marker").exists()


def test_bad_vocab_files_give_one_clear_error(tmp_path):
    no_specials = tmp_path / "nospecial.json"
    no_specials.write_text(json.dumps({"word2idx": {"a": 0, "dog": 1}, "idx2word": {}, "idx": 2}))
    with pytest.raises(CoderError, match=r"nospecial\.json.*special tokens"):
        Vocabulary.load(no_specials)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(CoderError, match="broken.json"):
        Vocabulary.load(broken)
    with pytest.raises(CoderError, match="not found"):
        Vocabulary.load(tmp_path / "missing.json")
    gaps = tmp_path / "gaps.json"
    gaps.write_text(json.dumps({"word2idx": {w: i for i, w in enumerate(SPECIAL_TOKENS)} | {"x": 9}}))
    with pytest.raises(CoderError, match="without gaps"):
        Vocabulary.load(gaps)


def test_empty_caption_file_is_an_error(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(SystemExit) as exc:
        vocab.main(["build", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "v.json")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "empty.txt" in err and "empty" in err and "\n" not in err


def test_bert_tokenizer_lower_cases_splits_word_pieces_and_truncates(tiny_bert):
    tok = vocab.BertTokenizer(tiny_bert, max_length=8)
    words = (Path(tiny_bert) / "vocab.txt").read_text().split()
    pieces = ["[CLS]", "a", "dog", "r", "##u", "##n", "##s", "[SEP]"]  # 8 ids at most: the "." is cut
    assert [words[i] for i in tok.encode("A dog runs.")] == pieces
    assert [words[i] for i in tok.encode("The cat.")] == ["[CLS]", "the", "cat", ".", "[SEP]"]
    assert len(tok.encode("word " * 50)) == 8
    assert tok.pad_id == words.index("[PAD]") == 0 and len(tok) == len(words)


def test_bert_tokenizer_missing_directory(tmp_path):
    with pytest.raises(CoderError, match="does not exist"):
        vocab.BertTokenizer(str(tmp_path / "nope"))
