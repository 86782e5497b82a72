"""train_photos.py's side of the way from a Flickr8k download to the search app: the folder
layout it accepts, the fixed split it makes without split files, and its refusals before any
work. (The training itself is the Flickr8k benchmark's, tested in test_bench_flickr8k.py.)"""
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
        "train": str(tmp_path / "data" / "train.txt"), "dev": str(tmp_path / "data" / "dev.txt")}


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
    assert command == "python serve.py --checkpoint 'runs/a b/best.pt' --images '/data/my photos' --captions /data/c.txt"
