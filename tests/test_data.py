"""Precomp splits (memory-mapped, validated), datasets, collate, DataLoader/DistributedSampler use."""

import functools
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import data
from concepts import ConceptGraph
from utils import CoderError
from vocab import Vocabulary

N_IMG, R, D, K = 4, 3, 5, 2
CAPTIONS = [
    "a red dog runs .",
    "the dog is red",
    "a cat sleeps",
    "a small cat on a mat .",
    "two birds fly",
    "birds in the sky",
    "a man's t-shirt",
    "a man in a red t-shirt .",
]


@pytest.fixture
def precomp(tmp_path):
    feats = np.arange(N_IMG * R * D, dtype=np.float32).reshape(N_IMG, R, D)
    np.save(tmp_path / "train_ims.npy", feats)
    (tmp_path / "train_caps.txt").write_text("\n".join(CAPTIONS) + "\n")
    (tmp_path / "train_ids.txt").write_text("".join(f"img{i}\n" for i in range(N_IMG)))
    return tmp_path


@pytest.fixture
def tok():
    return Vocabulary.from_words("a the dog cat red runs is".split())


# CAPTIONS' labels over the graph's words dog, cat, red, t-shirt, by hand ("man's" is "man 's").
CONCEPT_LABELS = [
    [1, 0, 1, 0],
    [1, 0, 1, 0],
    [0, 1, 0, 0],
    [0, 1, 0, 0],
    [0, 0, 0, 0],
    [0, 0, 0, 0],
    [0, 0, 0, 1],
    [0, 0, 1, 1],
]


@pytest.fixture
def graph():
    words = ["dog", "cat", "red", "t-shirt"]
    return ConceptGraph(words, np.ones(4), np.zeros((4, 4)), np.zeros((4, 3)))


def test_load_split_is_memory_mapped_and_inferred(precomp):
    split = data.load_split(precomp, "train")
    assert isinstance(split.images, np.memmap)
    assert (split.num_images, split.region_count, split.feature_dim) == (N_IMG, R, D)
    assert split.num_captions == 8 and split.captions_per_image == K
    assert split.ids == [f"img{i}" for i in range(N_IMG)]
    assert split.images_path == precomp / "train_ims.npy" and split.captions_path == precomp / "train_caps.txt"
    expected = np.load(precomp / "train_ims.npy")
    for i in range(N_IMG):
        out = split.read_image(i)
        assert out.dtype == np.float32 and out.flags.writeable
        np.testing.assert_array_equal(out, expected[i])
    with pytest.raises(IndexError):
        split.read_image(N_IMG)


def test_max_images_keeps_first_images_and_their_captions(precomp):
    split = data.load_split(precomp, "train", max_images=3)
    assert split.num_images == 3 and split.captions == CAPTIONS[:6] and split.ids == ["img0", "img1", "img2"]
    assert data.load_split(precomp, "train", max_images=100).num_images == N_IMG
    (precomp / "train_ids.txt").write_text("".join(f"cap{i}\n" for i in range(8)))  # per-caption ids
    assert data.load_split(precomp, "train", max_images=1).ids == ["cap0", "cap1"]


def test_other_split_names_and_float16(tmp_path):
    np.save(tmp_path / "testall_ims.npy", np.ones((2, 3, 4), dtype=np.float16))
    (tmp_path / "testall_caps.txt").write_text("a\nb\nc\nd\ne\nf\n")
    split = data.load_split(tmp_path, "testall")
    assert split.captions_per_image == 3 and split.ids is None
    assert split.read_image(1).dtype == np.float32


def test_pickling_reopens_the_map_instead_of_copying(tmp_path):
    np.save(tmp_path / "train_ims.npy", np.random.default_rng(0).random((100, 10, 100), dtype=np.float32))
    (tmp_path / "train_caps.txt").write_text("a caption\n" * 100)
    split = data.load_split(tmp_path, "train", max_images=60)
    split.read_image(0)  # opens a file descriptor, which must not travel
    blob = pickle.dumps(split)
    assert len(blob) < 10_000  # the 400 kB of features stay in the file
    clone = pickle.loads(blob)
    assert isinstance(clone.images, np.memmap) and clone.num_images == 60
    np.testing.assert_array_equal(clone.read_image(59), split.read_image(59))


def test_pair_dataset_items(precomp, tok, graph):
    split = data.load_split(precomp, "train")
    ds = data.PairDataset(split, tok, graph)
    assert len(ds) == 8
    feats = np.load(precomp / "train_ims.npy")
    for i in range(8):
        item = ds[i]
        assert item["image_id"] == i // K and item["caption_id"] == i
        np.testing.assert_array_equal(item["image"].numpy(), feats[i // K])
        assert item["tokens"].tolist() == tok.encode(CAPTIONS[i])
        assert item["concept_labels"].tolist() == CONCEPT_LABELS[i]
    with pytest.raises(IndexError):
        ds[8]
    assert "concept_labels" not in data.PairDataset(split, tok, None)[0]


def test_image_and_caption_datasets(precomp, tok, graph):
    split = data.load_split(precomp, "train")
    images = data.ImageDataset(split)
    assert len(images) == N_IMG and images[3]["image_id"] == 3 and images[3]["image"].shape == (R, D)
    caps = data.CaptionDataset(split, tok, graph)
    assert len(caps) == 8 and set(caps[5]) == {"tokens", "concept_labels", "image_id", "caption_id"}
    assert caps[5]["image_id"] == 2


def test_collate_pads_and_masks(precomp, tok, graph):
    split = data.load_split(precomp, "train")
    items = [data.PairDataset(split, tok, graph)[i] for i in (0, 2, 7)]
    batch = data.collate(items, pad_id=9)
    lengths = [len(it["tokens"]) for it in items]
    assert batch["lengths"].tolist() == lengths
    assert batch["tokens"].shape == (3, max(lengths)) and batch["tokens"].dtype == torch.long
    for row, it in enumerate(items):
        n = lengths[row]
        assert batch["tokens"][row, :n].tolist() == it["tokens"].tolist()
        assert batch["tokens"][row, n:].tolist() == [9] * (max(lengths) - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
    assert batch["images"].shape == (3, R, D) and batch["images"].dtype == torch.float32
    assert batch["concept_labels"].shape == (3, 4)
    assert batch["image_ids"].tolist() == [0, 1, 3] and batch["caption_ids"].tolist() == [0, 2, 7]
    only_images = data.collate([data.ImageDataset(split)[i] for i in range(2)])
    assert set(only_images) == {"images", "image_ids"}


def test_dataloader_with_distributed_sampler_and_worker(precomp, tok, graph):
    split = data.load_split(precomp, "train")
    ds = data.PairDataset(split, tok, graph)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        loader = DataLoader(
            ds,
            batch_size=3,
            sampler=sampler,
            num_workers=rank,  # rank 1 via a worker
            collate_fn=functools.partial(data.collate, pad_id=tok.pad_id),
        )
        for batch in loader:
            seen += batch["caption_ids"].tolist()
            assert (batch["image_ids"] == batch["caption_ids"] // K).all()
    assert sorted(seen) == list(range(8))


def test_caption_count_not_a_multiple_names_both_files(precomp):
    (precomp / "train_caps.txt").write_text("\n".join(CAPTIONS[:7]) + "\n")
    with pytest.raises(CoderError) as exc:
        data.load_split(precomp, "train")
    msg = str(exc.value)
    assert "train_caps.txt" in msg and "train_ims.npy" in msg and "7 captions" in msg and "4 images" in msg


def test_expected_captions_per_image_is_checked(precomp):
    with pytest.raises(CoderError, match="2 per image, expected 5"):
        data.load_split(precomp, "train", captions_per_image=5)


def test_bad_inputs_give_one_clear_error(precomp):
    (precomp / "train_caps.txt").write_text("")
    with pytest.raises(CoderError, match=r"train_caps\.txt: caption file is empty"):
        data.load_split(precomp, "train")
    with pytest.raises(CoderError, match=r"dev_ims\.npy: image feature file not found"):
        data.load_split(precomp, "dev")
    (precomp / "bad_ims.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(CoderError, match=r"bad_ims\.npy: not a readable \.npy"):
        data.load_split(precomp, "bad")
    np.save(precomp / "flat_ims.npy", np.zeros((4, 5), dtype=np.float32))
    with pytest.raises(CoderError, match=r"flat_ims\.npy: expected a float array \(images, regions, dim\)"):
        data.load_split(precomp, "flat")
    np.save(precomp / "int_ims.npy", np.zeros((4, 2, 5), dtype=np.int32))
    with pytest.raises(CoderError, match=r"int_ims\.npy: expected a float array"):
        data.load_split(precomp, "int")
    full = np.zeros((4, 3, 5), dtype=np.float32)
    np.save(precomp / "short_ims.npy", full)
    raw = (precomp / "short_ims.npy").read_bytes()
    (precomp / "short_ims.npy").write_bytes(raw[:-20])  # truncated download
    with pytest.raises(CoderError, match=r"short_ims\.npy"):
        data.load_split(precomp, "short")
    with pytest.raises(CoderError, match="data folder not found"):
        data.load_split(precomp / "nope", "train")


def test_ids_file_with_wrong_count(precomp):
    (precomp / "train_ids.txt").write_text("a\nb\nc\n")
    with pytest.raises(CoderError, match=r"train_ids\.txt has 3 lines, expected 4 \(images\) or 8"):
        data.load_split(precomp, "train")


def test_to_device_moves_all_but_the_lengths_packing_reads_on_the_host():
    batch = {
        "tokens": torch.ones(2, 3, dtype=torch.long),
        "lengths": torch.tensor([3, 2]),
        "images": torch.zeros(2, 4, 5),
    }
    moved = data.to_device(batch, "meta")  # a device that is not the host
    assert moved["tokens"].device.type == "meta" and moved["images"].device.type == "meta"
    assert moved["lengths"] is batch["lengths"]
