"""The training loader's batched fetch: a batch's images are read straight into the rows of
one tensor (in a worker, in shared memory) that collation takes without a copy, and the
batches are those of item-by-item reading and stacking."""

import numpy as np
import pytest
import torch

import data
import distributed
import trainer
from concepts import ConceptGraph
from vocab import Vocabulary

N_IMG, R, D, K = 6, 3, 5, 2


@pytest.fixture
def dataset(tmp_path):
    feats = np.random.default_rng(0).standard_normal((N_IMG, R, D)).astype(np.float32)
    np.save(tmp_path / "train_ims.npy", feats)
    captions = [f"a {w} dog runs" if i % 2 else f"the {w} cat" for i, w in enumerate("red blue big old".split() * 3)]
    (tmp_path / "train_caps.txt").write_text("\n".join(captions) + "\n")
    graph = ConceptGraph(["dog", "cat", "red"], np.ones(3), np.zeros((3, 3)), np.zeros((3, 2)))
    return data.PairDataset(
        data.load_split(tmp_path, "train"), Vocabulary.from_words("a the dog cat".split()), graph
    ), feats


def item_by_item(ds, indices):
    """The batch as the dataset's items one by one, stacked by torch.stack (the reference)."""
    items = [ds[i] for i in indices]
    return {
        "images": torch.stack([it["image"] for it in items]),
        **{k: v for k, v in data.collate(items, pad_id=0).items() if k != "images"},
    }


def test_a_batched_fetch_reads_into_one_tensor_that_collation_takes_as_is(dataset):
    ds, feats = dataset
    indices = [7, 0, 11, 4, 4]
    items = ds.__getitems__(indices)
    batch = data.collate(items, pad_id=0)
    assert batch["images"].data_ptr() == items[0]["image"].data_ptr()  # no copy
    assert torch.equal(batch["images"], torch.from_numpy(feats[[i // K for i in indices]]))
    want = item_by_item(ds, indices)
    assert set(batch) == set(want) and all(torch.equal(batch[k], want[k]) for k in want)


def test_rows_of_another_tensor_are_stacked_not_taken(dataset):
    """Only the consecutive rows of one whole tensor are taken as the batch."""
    block = torch.arange(24.0).view(4, 2, 3).clone()
    for rows in ([block[0], block[1], block[2]], [block[1], block[0], block[2], block[3]]):
        out = data.stack(rows)
        assert torch.equal(out, torch.stack(rows)) and out.data_ptr() != block.data_ptr()
    assert data.stack(list(block)).data_ptr() == block.data_ptr()


def test_in_a_worker_the_batch_is_built_in_shared_memory(dataset, monkeypatch):
    ds, _ = dataset
    assert not data.collate(ds.__getitems__([0, 1]))["images"].is_shared()
    monkeypatch.setattr(data, "get_worker_info", lambda: object())
    assert data.collate(ds.__getitems__([0, 1]))["images"].is_shared()
    assert data.collate([ds[0], ds[1]])["images"].is_shared()


@pytest.mark.parametrize("workers", [0, 2])
def test_the_trainers_loader_gives_the_item_by_item_batches(dataset, workers):
    ds, _ = dataset
    sampler = distributed.ResumableSampler(len(ds), 1, 0, seed=3, batch_size=4)
    loader = trainer.make_train_loader(ds, sampler, {"workers": workers, "seed": 0}, pad_id=0)
    batches = list(loader)
    order = list(sampler)
    assert len(batches) == 3
    for t, batch in enumerate(batches):
        want = item_by_item(ds, order[4 * t : 4 * t + 4])
        assert all(torch.equal(batch[k], want[k]) for k in want)


def test_read_into_converts_another_dtype_and_checks_values(tmp_path):
    feats = np.random.default_rng(1).standard_normal((3, R, D)).astype(np.float16)
    np.save(tmp_path / "train_ims.npy", feats)
    (tmp_path / "train_caps.txt").write_text("a\nb\nc\n")
    split = data.load_split(tmp_path, "train")
    out = np.zeros((R, D), np.float32)
    assert split.read_image(2, out=out) is out and np.array_equal(out, feats[2].astype(np.float32))
    feats[1, 0, 0] = np.nan
    np.save(tmp_path / "train_ims.npy", feats)
    with pytest.raises(data.CoderError, match="non-finite values.*image 1"):
        data.load_split(tmp_path, "train").read_image(1, out=out)


def test_stack_keeps_torch_stack_semantics_for_single_items():
    one = [torch.ones(2, 3)]
    assert torch.equal(data.stack(one), torch.ones(1, 2, 3))


def test_the_bert_tokenizer_gives_the_transformers_call_ids(tiny_bert):
    """`encode` runs the fast tokenizer's Rust tokenizer: the ids of the transformers call,
    truncation included, for captions, odd text and a caption longer than max_length."""
    import vocab

    tok = vocab.BertTokenizer(tiny_bert, max_length=12)
    assert tok._rust is not None
    for caption in ["a dog on the cat.", "A DOG, 42 Zebras!", "", "  ünïcode  dog  ", "a dog " * 20]:
        want = tok.tokenizer(caption, truncation=True, max_length=12)["input_ids"]
        assert tok.encode(caption) == list(want)
    assert len(tok.encode("a dog " * 20)) == 12
