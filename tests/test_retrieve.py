"""retrieve.py on a tiny trained checkpoint: its printed top-k agrees with a direct computation
of the similarity S (docs/method.md), and --grid draws one row of thumbnails per text query."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import data
import evaluation
import retrieve
from checkpoint import load_for_inference
from demo_data import make_demo_dataset
from test_evaluation import direct_similarity

ROOT = Path(__file__).resolve().parent.parent

TINY = [
    "--embed_dim",
    "32",
    "--word_dim",
    "16",
    "--gcn_hidden",
    "16",
    "--queue_size",
    "96",
    "--num_prototypes",
    "8",
    "--batch_size",
    "32",
    "--lr",
    "1e-3",
    "--warmup_epochs",
    "1",
    "--lr_decay_epoch",
    "2",
    "--workers",
    "0",
    "--eval_batch_size",
    "64",
    "--progress",
    "false",
    "--log_every",
    "5",
    "--val_max_images",
    "0",
    "--device",
    "cpu",
    "--epochs",
    "1",
    "--test_split",
    "",
]

ROW = re.compile(r"^\s+(\d+)\. (-?\d+\.\d+)  (.*?)(  \*)?$")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint from one tiny epoch of the real training script (a few seconds)."""
    root = tmp_path_factory.mktemp("retrieve")
    paths = make_demo_dataset(root, seed=2, num_train=160, num_dev=30, num_test=30, regions=6, dim=24)
    run_dir = root / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train_f30k.py"),
            "--data_path",
            paths["data_path"],
            "--vocab_path",
            paths["vocab_path"],
            "--concept_path",
            paths["concept_dir"],
            *TINY,
            "--run_dir",
            str(run_dir),
        ],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"checkpoint": str(run_dir / "best.pt"), "data_path": paths["data_path"]}


@pytest.fixture(scope="module")
def direct(trained):
    """The test split's embeddings, and their similarity matrix by S's formula written out
    (not the model's own fused similarity, which retrieve.py uses)."""
    model, tokenizer, graph, config = load_for_inference(trained["checkpoint"])
    assert graph is not None  # the concept branch is part of what is checked
    split = data.load_split(trained["data_path"], "test")
    emb = evaluation.encode_split(model, split, tokenizer, graph, "cpu")
    return {"split": split, "sims": direct_similarity(emb, config["mu"])}


def parse_blocks(out: str) -> dict[str, list[tuple[float, str, bool]]]:
    """{header line: [(score, rest of the row, starred)]} from retrieve.py's output."""
    blocks: dict[str, list] = {}
    header = None
    for line in out.splitlines():
        if line.startswith(("query: ", "image [")):
            header = line
            blocks[header] = []
        elif header and (m := ROW.match(line)):
            assert int(m.group(1)) == len(blocks[header]) + 1
            blocks[header].append((float(m.group(2)), m.group(3), bool(m.group(4))))
    return blocks


def test_text_and_image_queries_match_direct_scores(trained, direct, capsys):
    split, sims = direct["split"], direct["sims"]
    caption_index = 7  # a caption of image 1, used verbatim as the query
    query = split.captions[caption_index]
    retrieve.main(
        [
            "--checkpoint",
            trained["checkpoint"],
            "--data_path",
            trained["data_path"],
            "--split",
            "test",
            "--query",
            query,
            "--query",
            "a dog on the grass",
            "--image",
            "3",
            "--k",
            "4",
            "--device",
            "cpu",
        ]
    )
    blocks = parse_blocks(capsys.readouterr().out)
    assert list(blocks) == [f"query: {query}", "query: a dog on the grass", f"image [3] {split.ids[3]}"]

    # the query, encoded from free text, scores the images exactly as its own caption does
    rows = blocks[f"query: {query}"]
    top = sims[:, caption_index].topk(4)
    assert [r[1] for r in rows] == [f"[{i}] {split.ids[i]}" for i in top.indices.tolist()]
    np.testing.assert_allclose([r[0] for r in rows], top.values.numpy(), atol=1.5e-3)
    assert [r[2] for r in rows] == [i == caption_index // 5 for i in top.indices.tolist()]
    scores = [r[0] for r in blocks["query: a dog on the grass"]]
    assert len(scores) == 4 and scores == sorted(scores, reverse=True)

    rows = blocks[f"image [3] {split.ids[3]}"]
    top = sims[3].topk(4)
    assert [r[1] for r in rows] == [split.captions[c] for c in top.indices.tolist()]
    np.testing.assert_allclose([r[0] for r in rows], top.values.numpy(), atol=1.5e-3)
    assert [r[2] for r in rows] == [c // 5 == 3 for c in top.indices.tolist()]


def test_grid_png_has_a_row_per_query(trained, direct, tmp_path, capsys):
    from PIL import Image

    split = direct["split"]
    # a copy of the precomp folder whose ids name image files, as extract_features writes them
    data_path = tmp_path / "precomp"
    data_path.mkdir()
    for suffix in ("ims.npy", "caps.txt"):
        shutil.copy(Path(trained["data_path"]) / f"test_{suffix}", data_path / f"test_{suffix}")
    names = [f"photo_{i:03d}.png" for i in range(split.num_images)]
    (data_path / "test_ids.txt").write_text("\n".join(names) + "\n")
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    for i, name in enumerate(names):
        Image.new("RGB", (48 + i, 32), (8 * i % 256, 80, 160)).save(images_dir / name)

    grid = tmp_path / "out" / "grid.png"
    queries = [split.captions[0], split.captions[11]]
    retrieve.main(
        [
            "--checkpoint",
            trained["checkpoint"],
            "--data_path",
            str(data_path),
            "--split",
            "test",
            "--query",
            queries[0],
            "--query",
            queries[1],
            "--k",
            "3",
            "--images_dir",
            str(images_dir),
            "--grid",
            str(grid),
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr().out
    assert f"wrote {grid}" in out
    top = direct["sims"][:, [0, 11]].t().topk(3, dim=1).indices
    blocks = parse_blocks(out)
    for query, indices in zip(queries, top.tolist()):
        assert [r[1] for r in blocks[f"query: {query}"]] == [f"[{i}] {names[i]}" for i in indices]

    with Image.open(grid) as img:
        width, height = img.size
        pixels = np.asarray(img.convert("RGB"))
    thumb, text_h, pad = 160, 22, 6
    assert (width, height) == (3 * (thumb + pad) + pad, 2 * (thumb + text_h + pad) + pad)
    for r, indices in enumerate(top.tolist()):
        for c, index in enumerate(indices):
            # the centre of each cell shows the retrieved image's own colour
            y = pad + r * (thumb + text_h + pad) + text_h + thumb // 2
            x = pad + c * (thumb + pad) + thumb // 2
            assert tuple(pixels[y, x]) == (8 * index % 256, 80, 160)
            # a green frame marks the image the query caption belongs to
            frame = tuple(pixels[y, x - thumb // 2 + 1])
            assert frame == ((0x2E, 0x9E, 0x44) if index == [0, 2][r] else (0xDD, 0xDD, 0xDD))


def test_grid_reports_missing_images(trained, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        retrieve.main(
            [
                "--checkpoint",
                trained["checkpoint"],
                "--data_path",
                trained["data_path"],
                "--split",
                "test",
                "--query",
                "a dog",
                "--images_dir",
                str(tmp_path),
                "--grid",
                str(tmp_path / "g.png"),
                "--device",
                "cpu",
            ]
        )
    assert exc.value.code == 2
    assert "image file not found" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


def test_image_names_from_per_caption_ids():
    class Split:
        num_images, captions_per_image = 2, 3

        def __init__(self, ids):
            self.ids = ids

    assert retrieve.image_names(Split(["a", "a", "a", "b", "b", "b"])) == ["a", "b"]
    assert retrieve.image_names(Split(["a", "b"])) == ["a", "b"]
    assert retrieve.image_names(Split(None)) == ["image 0", "image 1"]


def test_flickr8k_benchmark_reads_the_training_log(trained):
    """bench/bench_flickr8k.py reads its numbers from train.log: the format must not drift."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_flickr8k
    from checkpoint import load_checkpoint

    log = (Path(trained["checkpoint"]).parent / "train.log").read_text()
    parsed = bench_flickr8k.parse_log(log)
    assert len(parsed["validations"]) == 1 and len(parsed["epoch_seconds"]) == 1
    assert len(parsed["train_seconds"]) == 1 and 0 <= parsed["train_seconds"][0] <= parsed["epoch_seconds"][0]
    best = bench_flickr8k.best_validation(parsed["validations"])
    assert best["epoch"] == 1 and set(bench_flickr8k.METRICS) <= set(best)
    assert best["rsum"] == pytest.approx(load_checkpoint(trained["checkpoint"])["best_rsum"], abs=0.01)
