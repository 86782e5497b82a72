"""Demo dataset: layout, determinism, caching, and that its structure is learnable."""

import json

import numpy as np
import pytest

import data
import demo_data
from concepts import load_concepts
from vocab import Vocabulary, tokenize


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The default-size demo dataset, generated once for the module."""
    return demo_data.make_demo_dataset(tmp_path_factory.mktemp("demo"), seed=0)


def test_layout_and_sizes(demo):
    sizes = {"train": 2000, "dev": 200, "test": 200}
    for split_name, n in sizes.items():
        split = data.load_split(demo["data_path"], split_name, captions_per_image=5)
        assert split.images.shape == (n, 16, 64) and split.images.dtype == np.float32
        assert split.num_captions == 5 * n and len(split.ids) == n
    vocab = Vocabulary.load(demo["vocab_path"])
    assert set(demo_data.OBJECTS) | set(demo_data.ATTRIBUTES) | set(demo_data.ACTIONS) <= set(vocab.idx2word)
    test_caps = data.load_split(demo["data_path"], "test").captions
    assert all(vocab(w) != 3 for c in test_caps for w in tokenize(c))  # no <unk> in test captions
    graph = load_concepts(demo["concept_dir"])
    assert graph.words[: len(demo_data.OBJECTS)] == demo_data.OBJECTS and graph.word_dim == 50
    assert graph.stats(0.3)["edges"] > 50  # objects' habits make concepts co-occur
    manifest = json.loads(open(demo["manifest"]).read())
    assert manifest["params"]["seed"] == 0 and manifest["splits"] == sizes


def test_captions_name_the_scene(demo):
    """Every caption names an object, and the captions are varied."""
    split = data.load_split(demo["data_path"], "dev")
    objects = set(demo_data.OBJECTS)
    for caption in split.captions:
        assert objects & set(tokenize(caption)), caption
    assert len(set(split.captions)) > 0.9 * split.num_captions


def test_deterministic_and_cached(tmp_path):
    small = dict(num_train=20, num_dev=4, num_test=4)
    a = demo_data.make_demo_dataset(tmp_path / "a", seed=5, **small)
    demo_data.make_demo_dataset(tmp_path / "b", seed=5, **small)
    c = demo_data.make_demo_dataset(tmp_path / "c", seed=6, **small)
    names = ["train_ims.npy", "train_caps.txt", "test_ims.npy", "vocab.json"]
    for name in names:
        assert (tmp_path / "a/demo_precomp" / name).read_bytes() == (tmp_path / "b/demo_precomp" / name).read_bytes()
    assert (tmp_path / "a/demo_precomp/train_ims.npy").read_bytes() != (
        tmp_path / "c/demo_precomp/train_ims.npy"
    ).read_bytes()
    ims = tmp_path / "a/demo_precomp/train_ims.npy"
    stamp = ims.stat().st_mtime_ns
    assert demo_data.make_demo_dataset(tmp_path / "a", seed=5, **small) == a
    assert ims.stat().st_mtime_ns == stamp  # complete: nothing rewritten
    (tmp_path / "a/demo_manifest.json").unlink()  # an interrupted run has no manifest
    demo_data.make_demo_dataset(tmp_path / "a", seed=5, **small)
    assert (
        ims.stat().st_mtime_ns != stamp and ims.read_bytes() == (tmp_path / "b/demo_precomp/train_ims.npy").read_bytes()
    )
    demo_data.make_demo_dataset(tmp_path / "a", seed=6, **small)  # other parameters: regenerated
    assert ims.read_bytes() == (tmp_path / "c/demo_precomp/train_ims.npy").read_bytes()
    assert c["data_path"].endswith("demo_precomp")


def _retrieval(sims):
    """t2i R@1 and i2t R@1 (percent) for an (images, 5*images) similarity matrix."""
    n = sims.shape[0]
    own = np.arange(5 * n) // 5
    t2i = (sims.T > sims.T[np.arange(5 * n), own][:, None]).sum(1)
    i2t = np.array([(sims[i] > sims[i, 5 * i : 5 * i + 5].max()).sum() for i in range(n)])
    return 100 * (t2i < 1).mean(), 100 * (i2t < 1).mean()


def test_structure_is_learnable_by_a_linear_model(demo):
    """Ridge regression from bag of words to mean-pooled regions retrieves far above chance (0.5%)."""
    vocab = Vocabulary.load(demo["vocab_path"])

    def bag(split):
        x = np.zeros((split.num_captions, len(vocab)))
        for i, caption in enumerate(split.captions):
            x[i, vocab.encode(caption)[1:-1]] = 1
        return x

    train = data.load_split(demo["data_path"], "train")
    test = data.load_split(demo["data_path"], "test")
    x = bag(train)
    y = np.asarray(train.images).mean(1)[np.arange(train.num_captions) // 5]
    w = np.linalg.solve(x.T @ x + np.eye(len(vocab)), x.T @ y)
    text = bag(test) @ w
    image = np.asarray(test.images).mean(1)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    t2i_r1, i2t_r1 = _retrieval(image @ text.T)
    assert t2i_r1 > 30 and i2t_r1 > 30
    # Shuffled training pairs carry no signal: chance level.
    rng = np.random.default_rng(0)
    w_null = np.linalg.solve(x.T @ x + np.eye(len(vocab)), x.T @ y[rng.permutation(len(y))])
    text_null = bag(test) @ w_null
    text_null /= np.linalg.norm(text_null, axis=1, keepdims=True)
    assert max(_retrieval(image @ text_null.T)) < 10
