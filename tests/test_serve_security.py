"""The search app against an attacker: another site's page in the user's browser, files placed
in the photo folder, a second server on the same cache, a kill at any moment.

Each test builds its own photo folder (generated photos) and runs the app with the tiny
checkpoint and backbone of test_serve.py; each was seen failing with its defence removed.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import backbones
import test_serve
from test_serve import HOST, LiveServer

fake = test_serve.fake  # the fixture: a demo-data checkpoint, and the tiny backbone registered

pytest.importorskip("fastapi")
pytest.importorskip("python_multipart")

NAMES = ["a.png", "b.png", "c.jpg", "sub/d.png", "sub/e.png"]
REFUSAL = "not a JPEG, PNG, GIF, BMP or WebP image (other formats are never decoded)"
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n"


@pytest.fixture(scope="module")
def embedder(fake):
    from photo_index import Embedder

    return Embedder(fake["checkpoint"], "cpu", "tiny-test")


def make_photo(path: Path, seed: int) -> None:
    """A 40 x 32 photo of 8 x 8 random colour blocks; a PNG is stored uncompressed, so every
    PNG photo has the same size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blocks = np.random.default_rng(seed).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    image = Image.fromarray(blocks).resize((40, 32), Image.NEAREST)
    image.save(path, compress_level=0) if path.suffix == ".png" else image.save(path)


def photo_folder(root: Path, names=NAMES, seed: int = 0) -> Path:
    """A folder of generated photos."""
    for i, name in enumerate(names):
        make_photo(root / name, seed + i)
    return root


def index(embedder, folder: Path, cache: Path):
    from photo_index import PhotoIndex

    photos = PhotoIndex(embedder, folder, cache)
    photos.refresh()
    return photos


def client_of(photos, raise_server_exceptions: bool = True):
    from fastapi.testclient import TestClient

    import serve

    return TestClient(serve.create_app(photos), base_url=HOST, raise_server_exceptions=raise_server_exceptions)


def true_vectors(embedder, folder: Path, names) -> dict[str, torch.Tensor]:
    """Each photo's vector, computed here from its file."""
    vectors, errors = embedder.photos([folder / name for name in names])
    assert not errors
    return dict(zip(names, vectors))


def ids_by_name(client) -> dict[str, str]:
    """name -> id, as the API gives them (every photo found by one search)."""
    results = client.get("/api/search", params={"q": "a photo", "k": 200}).json()["results"]
    return {r["name"]: r["id"] for r in results}


# ---------------------------------------------------------------- another site's page


FOREIGN = [
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},  # e.g. a page on 127.0.0.1:9000
    {"Referer": "http://evil.example/page.html"},
    {"Origin": "http://evil.example"},  # no fetch metadata
    {"Origin": "null"},
    {"Referer": "http://["},
]
OWN = [
    {},
    {"Sec-Fetch-Site": "none"},  # curl; a typed URL or a bookmark
    {"Sec-Fetch-Site": "same-origin", "Referer": f"{HOST}/"},
    {"Referer": f"{HOST}/"},
]


def test_other_sites_pages_cannot_read_photos_thumbnails_or_the_api(embedder, tmp_path):
    """An <img> or fetch() of another site's page (or of another app on this machine) gets a
    403 from every read route, the same whether the id exists or not; the app's own page, a
    typed URL and curl get the answers. A link from another site still opens the page."""
    import serve

    client = client_of(index(embedder, photo_folder(tmp_path / "photos"), tmp_path / "cache"))
    some = next(iter(ids_by_name(client).values()))
    reads = [
        f"/photos/{some}",
        f"/thumbs/{some}",
        "/photos/0",
        "/api/status",
        "/api/search?q=dog",
        f"/api/photos/{some}/neighbours",
    ]
    for url in reads:
        for headers in FOREIGN:
            response = client.get(url, headers=headers)
            assert (response.status_code, response.json()) == (403, {"detail": serve.CROSS_SITE_REFUSAL}), (
                url,
                headers,
            )
        for headers in OWN:
            assert client.get(url, headers=headers).status_code == (404 if url == "/photos/0" else 200), (url, headers)
    assert client.get("/", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200


def test_every_response_carries_the_security_headers(embedder, tmp_path, monkeypatch):
    """No framing, no type sniffing, no embedding by another origin: on pages, JSON, images,
    revalidations and every refusal alike."""
    from fastapi.testclient import TestClient

    import serve

    photos = index(embedder, photo_folder(tmp_path / "photos"), tmp_path / "cache")
    client = client_of(photos)
    some = next(iter(ids_by_name(client).values()))
    tag = client.get(f"/thumbs/{some}").headers["etag"]
    responses = [
        client.get("/"),
        client.get("/api/status"),
        client.get(f"/photos/{some}"),
        client.get(f"/thumbs/{some}"),
        client.get(f"/thumbs/{some}", headers={"If-None-Match": tag}),
        client.get("/photos/nothing"),
        client.get("/api/search", params={"q": "x", "k": 0}),
        client.get("/api/status", headers={"Sec-Fetch-Site": "cross-site"}),
        client.delete("/"),
        TestClient(serve.create_app(photos), base_url="http://evil.example").get("/"),
    ]
    monkeypatch.setattr(embedder, "texts", lambda texts: 1 / 0)  # an error in a route: the server's 500
    responses.append(client_of(photos, raise_server_exceptions=False).get("/api/search", params={"q": "x"}))
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 304, 404, 422, 403, 405, 400, 500]
    for response in responses:
        assert {k: response.headers.get(k) for k in serve.SECURITY_HEADERS} == serve.SECURITY_HEADERS, response


# ---------------------------------------------------------------- decoders


@pytest.fixture
def stand_in_gs(tmp_path, monkeypatch):
    """A `gs` first on PATH that only records that it ran; Pillow looks for it afresh."""
    from PIL import EpsImagePlugin

    folder, marker = tmp_path / "bin", tmp_path / "gs_ran"
    folder.mkdir()
    (folder / "gs").write_text(f"#!/bin/sh\necho \"$@\" > '{marker}'\n")
    (folder / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    return marker


def test_ghostscript_is_never_run_for_a_postscript_file_named_jpg(embedder, tmp_path, stand_in_gs):
    """Pillow left to pick the decoder runs `gs` on an EPS file (the control, first); the app
    never does: not when indexing, uploading, thumbnailing or extracting features, and each
    refuses it with the same line."""
    eps = tmp_path / "holiday.jpg"
    eps.write_bytes(EPS)
    with pytest.raises(OSError), Image.open(eps) as image:
        image.load()
    assert stand_in_gs.exists(), "the stand-in gs was not reached: this test would prove nothing"
    stand_in_gs.unlink()

    folder = photo_folder(tmp_path / "photos")
    shutil.copy(eps, folder / "holiday.jpg")
    photos = index(embedder, folder, tmp_path / "cache")
    client = client_of(photos)
    assert client.post("/api/refresh").json()["unreadable"] == ["holiday.jpg"]
    assert "holiday.jpg" not in ids_by_name(client) and not stand_in_gs.exists(), "indexing ran gs"
    response = client.post("/api/upload", files={"file": ("holiday.jpg", EPS, "image/jpeg")})
    assert not stand_in_gs.exists(), "an upload ran gs"
    assert (response.status_code, response.json()["detail"]) == (400, f"holiday.jpg: {REFUSAL}")
    prep = backbones.CenterCropNormalize(size=24, resize=28, mean=(0.0,) * 3, std=(1.0,) * 3)
    error = backbones.ImageFiles([eps], prep, 0)[0][2]  # extract_features.py's reader
    assert not stand_in_gs.exists(), "feature extraction ran gs"
    assert error == f"{eps}: {REFUSAL}"
    some = ids_by_name(client)["a.png"]
    (folder / "a.png").write_bytes(EPS)  # swapped after indexing
    assert client.get(f"/thumbs/{some}").status_code == 404
    assert not stand_in_gs.exists(), "a thumbnail ran gs"


def test_the_refusal_is_one_line_naming_the_file_at_indexing(embedder, tmp_path):
    """A TIFF named .png is left out of the index with the refusal."""
    folder = photo_folder(tmp_path / "photos", NAMES[:2])
    Image.new("RGB", (30, 30), "red").save(folder / "scan.png", "TIFF")
    from photo_index import PhotoIndex

    counts = PhotoIndex(embedder, folder, tmp_path / "cache").refresh()
    assert counts["unreadable"] == {"scan.png": f"{folder / 'scan.png'}: {REFUSAL}"} and counts["added"] == 2


# ---------------------------------------------------------------- ids and caching


def test_ids_stay_with_their_photos_across_rescans(embedder, tmp_path):
    """Delete a photo and add one, rescan: every other photo keeps its id, the removed one's id
    answers 404 everywhere (never another photo), and each id serves its own file."""
    folder = photo_folder(tmp_path / "photos")
    client = client_of(index(embedder, folder, tmp_path / "cache"))
    before = ids_by_name(client)
    (folder / "a.png").unlink()
    make_photo(folder / "0.png", 50)  # sorts first
    assert client.post("/api/refresh").status_code == 200
    after = ids_by_name(client)
    assert sorted(after) == sorted(NAMES[1:] + ["0.png"])
    assert {name: after[name] for name in NAMES[1:]} == {name: before[name] for name in NAMES[1:]}
    gone = before["a.png"]
    for url in (f"/photos/{gone}", f"/thumbs/{gone}", f"/api/photos/{gone}/neighbours"):
        assert client.get(url).status_code == 404, url
    for name, photo_id in after.items():
        assert client.get(f"/photos/{photo_id}").content == (folder / name).read_bytes(), name


def replace_keeping_size_and_time(path: Path, seed: int) -> None:
    """Put another photo at `path` with the same size and modification time (what `cp -p` of a
    same-size file, or a careful attacker, leaves)."""
    stat = path.stat()
    replacement = path.with_name("replacement.png")
    make_photo(replacement, seed)
    assert replacement.stat().st_size == stat.st_size
    replacement.replace(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)


def pixels(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), np.float32)


def test_a_replaced_photo_never_shows_its_old_thumbnail_or_vector(embedder, tmp_path):
    """Thumbnails must be revalidated (ETag, no-cache); a photo replaced by another of the same
    size and modification time gets a new ETag and thumbnail at once and its own vector at
    the next rescan."""
    folder = photo_folder(tmp_path / "photos")
    photos = index(embedder, folder, tmp_path / "cache")
    client = client_of(photos)
    photo_id = ids_by_name(client)["b.png"]
    first = client.get(f"/thumbs/{photo_id}")
    assert "no-cache" in first.headers["cache-control"] and "max-age" not in first.headers["cache-control"]
    tag = first.headers["etag"]
    assert client.get(f"/thumbs/{photo_id}", headers={"If-None-Match": tag}).status_code == 304
    assert client.get(f"/photos/{photo_id}").headers["etag"]
    old = np.asarray(Image.open(folder / "b.png").convert("RGB"), np.float32)

    replace_keeping_size_and_time(folder / "b.png", seed=77)
    new = np.asarray(Image.open(folder / "b.png").convert("RGB"), np.float32)
    second = client.get(f"/thumbs/{photo_id}", headers={"If-None-Match": tag})
    assert second.status_code == 200 and second.headers["etag"] != tag
    assert np.abs(pixels(second.content) - new).mean() < 8 < np.abs(pixels(second.content) - old).mean()
    assert client.post("/api/refresh").json()["added"] == 1
    gallery = photos.gallery
    stored = gallery.vectors[gallery.positions[photo_id]]
    assert torch.allclose(stored, true_vectors(embedder, folder, ["b.png"])["b.png"], atol=1e-5)


# ---------------------------------------------------------------- the embedding cache


class Killed(BaseException):
    """The process dies here."""


def assert_cache_pairs_every_vector_with_its_photo(embedder, folder: Path, cache: Path) -> None:
    """A new server on the cache, after a rescan: every photo's vector is its own."""
    photos = index(embedder, folder, cache)
    names = [p["name"] for p in photos.gallery.photos]
    truth = true_vectors(embedder, folder, names)
    for name, vector in zip(names, photos.gallery.vectors):
        assert torch.allclose(vector, truth[name], atol=1e-5), name


@pytest.mark.parametrize("kill_at", [0, 1, 2])
def test_a_kill_at_any_cache_write_never_pairs_a_vector_with_another_photo(embedder, tmp_path, monkeypatch, kill_at):
    """A photo removed and one added (the count stays), and the rescan killed at its first,
    second or third file write: what a new server loads pairs every vector rightly."""
    import photo_index

    folder, cache = photo_folder(tmp_path / "photos", NAMES[:3]), tmp_path / "cache"
    index(embedder, folder, cache)
    (folder / "b.png").unlink()
    make_photo(folder / "z.png", 40)
    writes, write = [], photo_index.atomic_write

    def dying_write(*args, **kwargs):
        if len(writes) == kill_at:
            raise Killed
        writes.append(args[0])
        return write(*args, **kwargs)

    monkeypatch.setattr(photo_index, "atomic_write", dying_write)
    try:
        photo_index.PhotoIndex(embedder, folder, cache).refresh()
    except Killed:
        pass
    monkeypatch.setattr(photo_index, "atomic_write", write)
    assert_cache_pairs_every_vector_with_its_photo(embedder, folder, cache)


def test_the_cache_of_names_and_vectors_is_readable_by_its_owner_only(embedder, tmp_path):
    """Another user of the machine must not list the photos' names from the cache, whatever
    the umask: the cache folder is 0700, its files 0600 (a file there before is replaced)."""
    cache = tmp_path / "cache"
    previous = os.umask(0o022)
    try:
        photos = index(embedder, photo_folder(tmp_path / "photos"), cache)
        make_photo(tmp_path / "photos" / "f.png", seed=9)
        photos.refresh()
    finally:
        os.umask(previous)
    written = [photos.cache, *photos.cache.iterdir()]
    assert len(written) > 1 and all(path.stat().st_mode & 0o077 == 0 for path in written), [
        oct(p.stat().st_mode) for p in written
    ]


def test_two_servers_saving_one_cache_at_once_never_pair_a_vector_with_another_photo(embedder, tmp_path, monkeypatch):
    """Server A saves its rescan while server B, on the same folder and cache, rescans a later
    state of the folder and saves in the middle of A's save."""
    import photo_index

    folder, cache = photo_folder(tmp_path / "photos", NAMES[:3]), tmp_path / "cache"
    index(embedder, folder, cache)
    server_a, server_b = (
        photo_index.PhotoIndex(embedder, folder, cache),
        photo_index.PhotoIndex(embedder, folder, cache),
    )
    write, a_wrote, b_done = photo_index.atomic_write, threading.Event(), threading.Event()

    def interleaved_write(*args, **kwargs):
        write(*args, **kwargs)
        if threading.current_thread().name == "server A" and not a_wrote.is_set():
            a_wrote.set()
            assert b_done.wait(60)

    monkeypatch.setattr(photo_index, "atomic_write", interleaved_write)
    (folder / "b.png").unlink()
    make_photo(folder / "y.png", 41)
    thread = threading.Thread(target=server_a.refresh, name="server A")
    thread.start()
    assert a_wrote.wait(60)
    (folder / "c.jpg").unlink()
    make_photo(folder / "z.png", 42)
    server_b.refresh()
    b_done.set()
    thread.join()
    monkeypatch.setattr(photo_index, "atomic_write", write)
    assert_cache_pairs_every_vector_with_its_photo(embedder, folder, cache)


# ---------------------------------------------------------------- swapped links


@pytest.mark.parametrize("swapped", ["folder", "file"])
def test_a_path_swapped_for_a_link_after_the_check_is_not_followed(embedder, tmp_path, monkeypatch, swapped):
    """Right after the app resolves and checks a photo's path, its folder (or the file itself)
    becomes a link to a place outside the photo folder holding a secret of the same name: the
    app answers 404, never the secret."""
    folder = photo_folder(tmp_path / "photos")
    client = client_of(index(embedder, folder, tmp_path / "cache"))
    photo_id = ids_by_name(client)["sub/d.png"]
    outside = tmp_path / "outside"
    make_photo(outside / "d.png", 99)
    secret = (outside / "d.png").read_bytes()
    resolve, armed = Path.resolve, []

    def resolve_then_swap(path: Path, *args, **kwargs) -> Path:
        result = resolve(path, *args, **kwargs)
        if armed and result.name == "d.png" and result.parent.name == "sub":
            armed.clear()
            if swapped == "folder":
                (folder / "sub").rename(tmp_path / "sub.moved")
                (folder / "sub").symlink_to(outside, target_is_directory=True)
            else:
                (folder / "sub" / "d.png").unlink()
                (folder / "sub" / "d.png").symlink_to(outside / "d.png")
        return result

    monkeypatch.setattr(Path, "resolve", resolve_then_swap)
    for url in (f"/photos/{photo_id}", f"/thumbs/{photo_id}"):
        armed.append(True)
        response = client.get(url)
        assert response.status_code == 404 and response.content != secret, url
        assert "changed while it was opened" in response.json()["detail"], url
        if swapped == "folder":
            (folder / "sub").unlink()
            (tmp_path / "sub.moved").rename(folder / "sub")
        else:
            (folder / "sub" / "d.png").unlink()
            make_photo(folder / "sub" / "d.png", 3)
        assert client.get(url).status_code == 200, url


# ---------------------------------------------------------------- bounds on concurrent work


def multipart(name: str, data: bytes) -> tuple[bytes, bytes]:
    """(content type, body) of a form with one file field."""
    body = (
        b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="'
        + name.encode()
        + b'"\r\nContent-Type: image/png\r\n\r\n'
        + data
        + b"\r\n--xyz--\r\n"
    )
    return b"multipart/form-data; boundary=xyz", body


def test_concurrent_uploads_are_bounded_in_total(embedder, tmp_path):
    """MAX_UPLOADS_AT_ONCE uploads whose bodies are still arriving: the next one is answered
    503 before a byte of its body is read; once they finish, uploads are taken again."""
    import serve

    folder = photo_folder(tmp_path / "photos")
    app = serve.create_app(index(embedder, folder, tmp_path / "cache"))
    content_type, body = multipart("a.png", (folder / "a.png").read_bytes())

    async def upload(release: asyncio.Event | None, read: list) -> tuple[int, dict]:
        status, headers = [], {}

        async def receive():
            if release is not None:
                await release.wait()
            read.append(len(body))
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
                headers.update((k.decode(), v.decode()) for k, v in message["headers"])

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/api/upload",
            "raw_path": b"/api/upload",
            "query_string": b"",
            "root_path": "",
            "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 8000),
            "headers": [
                (b"host", b"127.0.0.1:8000"),
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
            ],
        }
        await app(scope, receive, send)
        return status[0], headers

    async def scenario() -> None:
        release, read = asyncio.Event(), []
        held = [asyncio.create_task(upload(release, read)) for _ in range(serve.MAX_UPLOADS_AT_ONCE)]
        await asyncio.sleep(0.2)
        extra_read = []
        status, headers = await asyncio.wait_for(upload(None, extra_read), 10)
        assert (status, extra_read, headers.get("retry-after")) == (503, [], "2")
        release.set()
        assert [(await task)[0] for task in held] == [200] * serve.MAX_UPLOADS_AT_ONCE
        assert (await upload(None, []))[0] == 200

    asyncio.run(scenario())


class Overlap:
    """Wraps a function and records the most calls that ran at once (each made to last a while)."""

    def __init__(self, function, seconds: float = 0.03) -> None:
        self.function, self.seconds, self.running, self.most, self.lock = function, seconds, 0, 0, threading.Lock()

    def __call__(self, *args, **kwargs):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(self.seconds)
            return self.function(*args, **kwargs)
        finally:
            with self.lock:
                self.running -= 1


def test_a_rescan_and_uploads_run_the_image_encoder_one_batch_at_a_time(fake, tmp_path):
    from photo_index import Embedder, PhotoIndex

    embedder = Embedder(fake["checkpoint"], "cpu", "tiny-test", batch_size=1)
    encoder = embedder._images = Overlap(embedder._images)
    folder = photo_folder(tmp_path / "photos")
    data = (folder / "a.png").read_bytes()
    uploads = [threading.Thread(target=lambda: [embedder.image_bytes(data) for _ in range(5)]) for _ in range(3)]
    rescan = threading.Thread(target=PhotoIndex(embedder, folder, tmp_path / "cache").refresh)
    for thread in [rescan, *uploads]:
        thread.start()
    for thread in [rescan, *uploads]:
        thread.join()
    assert encoder.most == 1


def test_thumbnails_are_decoded_a_few_at_a_time(embedder, tmp_path, monkeypatch):
    """12 thumbnails asked for at once (a page of results): at most THUMBNAILS_AT_ONCE decode
    together, as each may hold a whole PNG or WebP in memory."""
    import httpx

    import serve

    folder = photo_folder(tmp_path / "photos", [f"p{i:02d}.png" for i in range(12)])
    photos = index(embedder, folder, tmp_path / "cache")
    decoder = Overlap(backbones.open_photo, seconds=0.1)
    monkeypatch.setattr(backbones, "open_photo", decoder)
    statuses = []
    with LiveServer(serve.create_app(photos)) as url:

        def fetch(photo_id: str) -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                statuses.append(http.get(f"/thumbs/{photo_id}").status_code)

        threads = [threading.Thread(target=fetch, args=(i,)) for i in photos.gallery.ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert statuses == [200] * 12 and decoder.most == serve.THUMBNAILS_AT_ONCE


# ---------------------------------------------------------------- names that are not UTF-8


def test_file_names_that_are_not_utf8_are_listed_served_or_skipped_with_a_note(embedder, tmp_path):
    """On Linux a file name is any bytes: a photo folder (itself so named) holding such photos,
    a sub-folder and an unreadable file. Every route answers (no 500); the names show with
    U+FFFD, the photos are served by their bytes on disk and the unreadable file is named in
    the rescan's note."""
    root = Path(os.fsdecode(bytes(tmp_path) + b"/ph\xf6tos"))
    good = [os.fsdecode(b"caf\xe9.png"), os.fsdecode(b"d\xe9/x.png"), "plain.png"]
    photo_folder(root, good)
    photos = index(embedder, root, tmp_path / "cache")
    Path(root / os.fsdecode(b"bad\xff.jpg")).write_bytes(b"junk")
    client = client_of(photos, raise_server_exceptions=False)
    refresh = client.post("/api/refresh")
    assert refresh.status_code == 200 and refresh.json()["unreadable"] == ["bad\ufffd.jpg"]
    ids = ids_by_name(client)
    assert sorted(ids) == sorted(["caf\ufffd.png", "d\ufffd/x.png", "plain.png"])
    for name, shown in zip(good, ["caf\ufffd.png", "d\ufffd/x.png", "plain.png"]):
        photo_id = ids[shown]
        assert client.get(f"/photos/{photo_id}").content == (root / name).read_bytes()
        assert client.get(f"/thumbs/{photo_id}").status_code == 200
        detail = client.get(f"/api/photos/{photo_id}/neighbours").json()
        assert detail["photo"]["name"] == shown
