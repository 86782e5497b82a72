"""The on-disk cache of frozen-BERT states (text_cache.py) with a tiny random BERT: the file
holds what the bottom computes caption by caption, it is reused only for the same weights and
tokens, a damaged or half-written file is never trusted, and its folder is checked up front."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import encoders as E
import options
import text_cache
import train_f30k
from utils import CoderError

HIDDEN = 16


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=120,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    folder = tmp_path_factory.mktemp("tiny_bert")
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    return str(folder)


def encoder(bert_dir: str, frozen_layers: int = 1) -> E.BertTextEncoder:
    torch.manual_seed(0)
    return E.BertTextEncoder(bert_dir, 8, "mean", length_groups=1, frozen_layers=frozen_layers, l2norm_items=False)


def token_ids(count: int = 37, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 120, size=int(n)).tolist() for n in rng.integers(1, 13, size=count)]


def one_by_one(enc: E.BertTextEncoder, ids: list[list[int]]) -> np.ndarray:
    """The reference: each caption through the bottom alone, unpadded, rows concatenated."""
    enc.eval()
    rows = [enc.bottom_states(torch.tensor([c]), torch.ones(1, len(c), dtype=torch.long))[0] for c in ids]
    return torch.cat(rows).numpy()


def count_bottom_calls(enc: E.BertTextEncoder, monkeypatch, fail_at: int | None = None) -> list[int]:
    calls = []
    bottom = enc.bottom_states

    def counted(tokens, mask):
        calls.append(len(tokens))
        if len(calls) == fail_at:
            raise OSError(28, "No space left on device")
        return bottom(tokens, mask)

    monkeypatch.setattr(enc, "bottom_states", counted)
    return calls


def test_file_holds_each_captions_states_where_the_offsets_say(bert_dir, tmp_path):
    enc, ids = encoder(bert_dir), token_ids()
    reference = one_by_one(enc, ids)
    states = text_cache.frozen_text_states(enc, ids, tmp_path, batch_size=5)  # 8 batches, longest first
    assert isinstance(states.states, np.memmap) and states.states.shape == reference.shape
    assert np.allclose(np.asarray(states.states), reference, atol=1e-5)
    start = 0
    for i, caption in enumerate(ids):
        assert np.array_equal(states[i], np.asarray(states.states[start : start + len(caption)]))
        start += len(caption)
    (path,) = tmp_path.iterdir()
    np.save(tmp_path / "reference.npy", reference)
    assert path.read_bytes()[:128] == (tmp_path / "reference.npy").read_bytes()[:128]  # np.save's header
    assert path.stat().st_size == (tmp_path / "reference.npy").stat().st_size


def test_cache_is_reused_for_the_same_weights_and_tokens_only(bert_dir, tmp_path, monkeypatch):
    enc, ids = encoder(bert_dir), token_ids()
    first = np.asarray(text_cache.frozen_text_states(enc, ids, tmp_path, batch_size=256).states).copy()
    calls = count_bottom_calls(enc, monkeypatch)
    again = text_cache.frozen_text_states(enc, ids, tmp_path, batch_size=256)  # a resumed or second run
    assert calls == [] and np.array_equal(np.asarray(again.states), first)
    text_cache.frozen_text_states(enc, [*ids[:-1], ids[-1][:-1]], tmp_path, batch_size=256)  # other tokens
    with torch.no_grad():
        enc.bert.encoder.layer[0].output.dense.weight.add_(0.01)  # other frozen weights
    text_cache.frozen_text_states(enc, ids, tmp_path, batch_size=256)
    text_cache.frozen_text_states(encoder(bert_dir, 2), ids, tmp_path, batch_size=256)  # other cut
    assert len(calls) == 2  # one batch of 256 each for other tokens and other weights
    assert len(list(tmp_path.iterdir())) == 4


@pytest.mark.parametrize("damage", ["cut short", "too long", "not an array", "other shape"])
def test_a_damaged_file_is_recomputed(bert_dir, tmp_path, monkeypatch, damage):
    enc, ids = encoder(bert_dir), token_ids()
    first = np.asarray(text_cache.frozen_text_states(enc, ids, tmp_path, batch_size=256).states).copy()
    (path,) = tmp_path.iterdir()
    data = path.read_bytes()
    path.write_bytes(
        {
            "cut short": data[:-4],
            "too long": data + bytes(64),
            "not an array": b"not an array",
            "other shape": data.replace(f"({len(first)}, ".encode(), f"({len(first) - 1}, ".encode()),
        }[damage]
    )
    calls = count_bottom_calls(enc, monkeypatch)
    again = text_cache.frozen_text_states(enc, ids, tmp_path, batch_size=256)
    assert calls and np.array_equal(np.asarray(again.states), first)
    assert path.read_bytes() == data


def test_an_interrupted_build_leaves_nothing_behind(bert_dir, tmp_path, monkeypatch):
    enc, ids = encoder(bert_dir), token_ids()
    count_bottom_calls(enc, monkeypatch, fail_at=3)
    with pytest.raises(CoderError, match=r"states.npy: cannot write \(No space left on device\).*--text_state_cache"):
        text_cache.frozen_text_states(enc, ids, tmp_path, batch_size=5)
    assert list(tmp_path.iterdir()) == [] and enc.training


def test_a_disk_too_small_is_refused_before_any_work(bert_dir, tmp_path, monkeypatch):
    enc, ids = encoder(bert_dir), token_ids()
    calls = count_bottom_calls(enc, monkeypatch)
    monkeypatch.setattr(text_cache.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    needed = sum(map(len, ids)) * HIDDEN * 4
    with pytest.raises(CoderError, match=f"needs {needed / 1e9:.1f} GB, the disk has 0.0 GB free"):
        text_cache.frozen_text_states(enc, ids, tmp_path / "new", batch_size=256)
    assert calls == [] and not (tmp_path / "new").exists()


def mapped_kb(path) -> int:
    """Resident kB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if "-" in line.split(" ", 1)[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_reading_every_caption_leaves_the_map_untouched(bert_dir, tmp_path):
    """Positioned reads: an epoch over a 24 GB file must not fault its pages into the process."""
    states = text_cache.frozen_text_states(encoder(bert_dir), token_ids(200), tmp_path, batch_size=256)
    rows = [states[i] for i in range(len(states))]
    assert mapped_kb(states.states.filename) == 0
    assert np.array_equal(np.concatenate(rows), np.asarray(states.states))
    assert mapped_kb(states.states.filename) > 0  # the check sees a touched map


def test_pickled_states_reopen_the_file(bert_dir, tmp_path):
    states = text_cache.frozen_text_states(encoder(bert_dir), token_ids(), tmp_path, batch_size=256)
    payload = pickle.dumps(states)
    assert len(payload) < states.states.nbytes  # the path and offsets, not the array
    copy = pickle.loads(payload)
    assert all(np.array_equal(copy[i], states[i]) for i in range(len(states)))


def test_the_option_names_a_folder_next_to_the_data_or_its_own(tmp_path):
    assert text_cache.cache_dir("off", tmp_path) is None
    assert text_cache.cache_dir("auto", tmp_path / "f30k") == tmp_path / "f30k" / "text_states"
    assert text_cache.cache_dir(str(tmp_path / "states"), tmp_path / "f30k") == tmp_path / "states"


def test_an_unwritable_cache_folder_is_refused_before_work_starts(tmp_path):
    from demo_data import make_demo_dataset

    paths = make_demo_dataset(tmp_path / "demo", seed=0, num_train=4, num_dev=2, num_test=2, regions=3, dim=8)
    (tmp_path / "afile").write_text("")
    config = {
        **options.script_config(vars(train_f30k)),
        "data_path": paths["data_path"],
        "text_encoder": "bert",
        "concept_branch": False,
        "bert_frozen_layers": 1,
        "text_state_cache": str(tmp_path / "afile" / "x"),
    }
    with pytest.raises(CoderError, match=r"^--text_state_cache .*afile/x: .*afile is a file, not a folder$"):
        options.check_train_config(config, resuming=False)
    options.check_train_config({**config, "text_state_cache": "off"}, resuming=False)
    options.check_train_config({**config, "bert_frozen_layers": 0}, resuming=False)
    options.check_train_config({**config, "text_state_cache": "auto"}, resuming=False)
    (tmp_path / "demo" / "demo_precomp" / "text_states").write_text("")
    with pytest.raises(CoderError, match=r"^--text_state_cache auto \(.*demo_precomp/text_states\): .*is a file"):
        options.check_train_config({**config, "text_state_cache": "auto"}, resuming=False)


def test_a_training_run_keeps_the_states_in_its_data_folder(bert_dir, tmp_path):
    """trainer._text_states with `auto`: the file lands in <data_path>/text_states, holds the
    bottom's states of the split's captions; `off` computes nothing."""
    import types

    import trainer
    import vocab
    from distributed import Dist

    tokenizer = vocab.Vocabulary.from_words(["a", "dog", "runs", "on", "grass", "red", "ball"])
    split = types.SimpleNamespace(
        split="train", captions=["a dog runs", "a red ball on grass", "dog", "grass grass a dog runs"]
    )
    config = {
        "text_encoder": "bert",
        "bert_frozen_layers": 1,
        "text_state_cache": "auto",
        "data_path": str(tmp_path),
        "eval_batch_size": 2,
        "progress": False,
    }
    enc, world = encoder(bert_dir), Dist("cpu", timeout_minutes=2)
    states = trainer._text_states(enc, split, tokenizer, config, world, trainer.RunLog(None))
    ids = [tokenizer.encode(c) for c in split.captions]
    assert Path(states.states.filename).parent == tmp_path / "text_states"
    assert np.allclose(np.asarray(states.states), one_by_one(enc, ids), atol=1e-5)
    assert (
        trainer._text_states(enc, split, tokenizer, {**config, "text_state_cache": "off"}, world, trainer.RunLog(None))
        is None
    )
