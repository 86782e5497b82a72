"""Search your own photos with a trained checkpoint: a local web app.

    python serve.py --checkpoint runs/x/best.pt --images DIR [--captions FILE] [--port 8000]

Type a sentence to see the photos it finds; click a photo (or upload one) to see the captions
it finds in --captions and its nearest photos. On first start the photos are embedded (region
features with the backbone of extract_features.py, then the checkpoint's image encoder) and
cached under data_cache/photo_index; a restart reads the cache and embeds only new or changed
photos ("Rescan folder" does the same while running). The server binds to 127.0.0.1, answers
only requests addressed to this machine's names (Host header) and, apart from loading the page,
only its own page (no other site's page may read, embed, frame or post to it), serves only the
indexed photos (by an id made from the name, never by path, opened anew on every request
without following a link swapped in) and never writes into the photo folder. The threat model
is in docs/search_app.md.

JSON API: GET /api/status, GET /api/search?q=TEXT&k=N, GET /api/photos/{id}/neighbours?k=N,
POST /api/upload (multipart field "file"), POST /api/refresh; images at /photos/{id} and
/thumbs/{id}.
"""

import hashlib
import io
import os
import socket
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

from utils import CoderError, cli_entry

PAGE = Path(__file__).resolve().parent / "web" / "index.html"
THUMB_SIZE = 256
MAX_K = 200  # results per request, for --k and the API alike
MULTIPART_OVERHEAD = 64 << 10  # form boundaries and part headers allowed on top of the upload limit
# The names a browser on this machine uses for the server; a request with another Host header
# comes from a page that rebound its own domain name to this address (DNS rebinding).
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")
# On every response: no page may frame the app (X-Frame-Options, frame-ancestors), a browser never
# reads a response as another type than the one sent (nosniff), and no other origin's page may
# embed a response (CORP) or keep a handle on the app's window (COOP).
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}
CROSS_SITE_REFUSAL = "cross-site request refused: only this app's own page may read its photos or change its state"
MAX_UPLOADS_AT_ONCE = 4  # bodies held in memory at once: at most this many times --max_upload_mb
THUMBNAILS_AT_ONCE = 2  # thumbnails decoded at once (each may hold a whole PNG or WebP)
THUMB_CACHE_ENTRIES = 4096  # 15 KB each on average (100 Flickr8k photos): about 60 MB
MEDIA_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
    ".webp": "image/webp",
}


def allowed_hosts(bind_host: str, extra: Sequence[str] = ()) -> list[str]:
    """Host header values to answer: localhost names, the bound address (unless a wildcard)
    and `extra` (--allow_host)."""
    hosts = [*LOCAL_HOSTS, *extra]
    if bind_host not in WILDCARD_ADDRESSES:
        hosts.append(f"[{bind_host}]" if ":" in bind_host else bind_host)
    return sorted({h.lower() for h in hosts})


def _netloc(url: str) -> str | None:
    try:
        return urlsplit(url).netloc.lower()
    except ValueError:  # a malformed URL: nobody's own page
        return None


def cross_site(headers: Any) -> bool:
    """Whether a browser sent this request from another site's page: its Sec-Fetch-Site says
    so, or its Origin or Referer names another host (browsers without fetch metadata send
    those). A typed URL or a bookmark (Sec-Fetch-Site: none) and requests with none of these
    headers (curl, scripts) are not cross-site."""
    site, host = headers.get("sec-fetch-site"), (headers.get("host") or "").lower()
    return site not in (None, "same-origin", "none") or any(
        value is not None and _netloc(value) != host for value in (headers.get("origin"), headers.get("referer"))
    )


class Guard:
    """The app's outermost layer: SECURITY_HEADERS on every response, refusals included, and
    every request but loading the page refused (403) when `cross_site`. It runs before routing,
    so another site's page learns nothing from the answer, not even whether an id exists."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        from starlette.datastructures import Headers, MutableHeaders
        from starlette.responses import JSONResponse, PlainTextResponse

        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = False

        async def send_secured(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message.setdefault("headers", [])
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        page_load = scope["path"] == "/" and scope["method"] in ("GET", "HEAD")
        if not page_load and cross_site(Headers(scope=scope)):
            await JSONResponse({"detail": CROSS_SITE_REFUSAL}, 403)(scope, receive, send_secured)
            return
        try:
            await self.app(scope, receive, send_secured)
        except Exception:  # Starlette's own 500 is sent outside this layer: send it here, headers on
            if not started:
                await PlainTextResponse("Internal Server Error", 500)(scope, receive, send_secured)
            raise


async def read_capped_body(request: Any, limit: int) -> bytes:
    """The request body, refused (413) by its declared Content-Length before anything is read,
    and otherwise read only up to `limit` bytes: memory and disk never hold more."""
    from fastapi import HTTPException

    too_large = HTTPException(413, f"upload larger than the {limit - MULTIPART_OVERHEAD >> 20} MB limit")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise HTTPException(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def multipart_file(content_type: str, body: bytes, field: str = "file") -> tuple[str | None, bytes]:
    """(file name, bytes) of the form field `field` of a multipart/form-data body, parsed in
    memory (400 when there is none)."""
    from fastapi import HTTPException
    from python_multipart import FormParser
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import parse_options_header

    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data" or b"boundary" not in params:
        raise HTTPException(400, f"send the photo as multipart/form-data in a field named '{field}'")
    files: dict[bytes, Any] = {}
    parser = FormParser(
        "multipart/form-data",
        lambda _: None,
        lambda f: files.setdefault(f.field_name, f),
        boundary=params[b"boundary"],
        config={"MAX_MEMORY_FILE_SIZE": len(body) + 1},
    )
    try:
        parser.write(body)
        parser.finalize()
    except FormParserError as err:
        raise HTTPException(400, f"malformed multipart body ({type(err).__name__})") from None
    upload = files.get(field.encode())
    if upload is None:
        raise HTTPException(400, f"no file in the form field '{field}'")
    upload.file_object.seek(0)
    name = Path(upload.file_name.decode("utf-8", "replace")).name if upload.file_name else None
    return name or None, upload.file_object.read()


def photo_entry(gallery: Any, position: int, score: float | None = None) -> dict[str, Any]:
    """What the page shows of the photo at `position` of `gallery`: its id, its name as text
    (`shown_name`) and its image URLs."""
    from photo_index import shown_name

    photo_id = gallery.ids[position]
    entry = {
        "id": photo_id,
        "name": shown_name(gallery.photos[position]["name"]),
        "thumb": f"/thumbs/{photo_id}",
        "url": f"/photos/{photo_id}",
    }
    return entry if score is None else {**entry, "score": round(score, 4)}


def caption_entries(captions: Any, vector: Any, k: int, own_photo: str | None) -> list[dict[str, Any]]:
    """The top k captions of a CaptionSet for one fused vector, marked `own` where the caption
    file gives them to `own_photo` (none without a caption set)."""
    if captions is None:
        return []
    return [
        {
            "text": captions.texts[i],
            "score": round(s, 4),
            "photo": captions.images[i],
            "own": own_photo is not None and captions.images[i] == own_photo,
        }
        for i, s in captions.index.ranked(vector, k)[0]
    ]


def create_app(
    photos: Any,
    captions: Any = None,
    max_upload_bytes: int = 10 << 20,
    default_k: int = 12,
    hosts: Sequence[str] = LOCAL_HOSTS,
) -> Any:
    """The FastAPI app over a PhotoIndex and an optional CaptionSet (photo_index.py), answering
    requests whose Host is one of `hosts` (see `allowed_hosts`) that are not `cross_site`."""
    from fastapi import FastAPI, Query
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    if not 1 <= default_k <= MAX_K:
        raise CoderError(f"--k {default_k}: must be between 1 and {MAX_K}")
    app = FastAPI(title="CODER photo search", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(hosts), www_redirect=False)
    app.add_middleware(Guard)  # added last: the outermost layer, so its headers reach every response
    k_query = Query(default_k, ge=1, le=MAX_K)
    add_search_routes(app, photos, captions, default_k, k_query)
    add_state_changing_routes(app, photos, captions, max_upload_bytes, k_query)
    add_image_routes(app, photos)
    return app


def add_search_routes(app: Any, photos: Any, captions: Any, default_k: int, k_query: Any) -> None:
    """The page, the status, text search and a photo's neighbours (GET; read only)."""
    from fastapi import HTTPException, Query
    from fastapi.responses import HTMLResponse

    embedder = photos.embedder

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.get("/api/status")
    def status() -> dict[str, Any]:
        return {
            "photos": len(photos.gallery.photos),
            "captions": len(captions.texts) if captions else 0,
            "mu": embedder.mu,
            "default_k": default_k,
            "max_k": MAX_K,
            "search": "approximate (faiss)" if photos.approximate else "exact",
        }

    @app.get("/api/search")
    def search(q: str = Query(..., max_length=1000), k: int = k_query) -> dict[str, Any]:
        if not q.strip():
            raise HTTPException(400, "an empty query matches nothing; type some words")
        start = time.perf_counter()
        gallery = photos.gallery  # one state for the ids and the names, whatever a rescan does meanwhile
        ranked = gallery.search(embedder.texts([q]), k)[0]
        return {
            "query": q,
            "results": [photo_entry(gallery, i, s) for i, s in ranked],
            "milliseconds": round(1000 * (time.perf_counter() - start), 1),
        }

    @app.get("/api/photos/{photo_id}/neighbours")
    def neighbours(photo_id: str, k: int = k_query) -> dict[str, Any]:
        gallery = photos.gallery
        position = gallery.positions.get(photo_id)
        if position is None:
            raise HTTPException(404, "no photo with this id (the folder may have been rescanned; search again)")
        vector = gallery.vectors[position : position + 1]
        ranked = [(i, s) for i, s in gallery.search(vector, k + 1)[0] if i != position][:k]
        return {
            "photo": photo_entry(gallery, position),
            "captions": caption_entries(captions, vector, k, gallery.photos[position]["name"]),
            "photos": [photo_entry(gallery, i, s) for i, s in ranked],
        }


def add_state_changing_routes(app: Any, photos: Any, captions: Any, max_upload_bytes: int, k_query: Any) -> None:
    """Upload and rescan (POST; `Guard` refuses them from other sites' pages): an upload's body
    read with a bound, at most MAX_UPLOADS_AT_ONCE at a time, its decoding and embedding run off
    the event loop."""
    from fastapi import HTTPException, Request
    from starlette.concurrency import run_in_threadpool

    from photo_index import shown_name

    uploads = 0  # being read or embedded; changed on the event loop's thread only

    def answer_upload(name: str | None, data: bytes, k: int) -> dict[str, Any]:
        try:
            vector = photos.embedder.image_bytes(data).unsqueeze(0)
        except CoderError as err:
            raise HTTPException(400, f"{name or 'upload'}: {err}") from None
        gallery = photos.gallery
        return {
            "name": name,
            "captions": caption_entries(captions, vector, k, name),
            "photos": [photo_entry(gallery, i, s) for i, s in gallery.search(vector, k)[0]],
        }

    @app.post("/api/upload")
    async def upload(request: Request, k: int = k_query) -> dict[str, Any]:
        nonlocal uploads
        if uploads >= MAX_UPLOADS_AT_ONCE:  # refused before a byte of the body is read
            raise HTTPException(
                503, f"{MAX_UPLOADS_AT_ONCE} uploads are already being handled; try again", headers={"Retry-After": "2"}
            )
        uploads += 1
        try:
            body = await read_capped_body(request, max_upload_bytes + MULTIPART_OVERHEAD)
            name, data = multipart_file(request.headers.get("content-type", ""), body)
            del body
            if len(data) > max_upload_bytes:
                raise HTTPException(413, f"upload larger than the {max_upload_bytes >> 20} MB limit")
            return await run_in_threadpool(answer_upload, name, data, k)
        finally:
            uploads -= 1

    @app.post("/api/refresh")
    def refresh() -> dict[str, Any]:
        counts = photos.refresh()
        # names only (the errors hold paths), as text even where a name is not UTF-8
        return {**counts, "unreadable": sorted(shown_name(name) for name in counts["unreadable"])}


class Thumbnails:
    """Thumbnails in memory, keyed by what identifies a file's content (device, inode, size,
    modification and change times: any write or replacement changes the key), the least
    recently used dropped beyond `entries`. Safe from many threads."""

    def __init__(self, entries: int) -> None:
        self.entries, self.items, self.lock = entries, OrderedDict(), threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
            return self.items.get(key)

    def put(self, key: tuple, data: bytes) -> None:
        with self.lock:
            self.items[key] = data
            while len(self.items) > self.entries:
                self.items.popitem(last=False)


def content_key(info: os.stat_result) -> tuple[int, ...]:
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


def add_image_routes(app: Any, photos: Any) -> None:
    """A photo's file and its thumbnail, by id, read from the file opened anew on every request
    (`PhotoIndex.open`). Each answer carries an ETag of the file's content key and must be
    revalidated before use (Cache-Control: no-cache), so a browser never shows a stale photo."""
    from fastapi import HTTPException, Request
    from fastapi.responses import Response, StreamingResponse

    from backbones import UnreadablePhoto, open_photo
    from photo_index import PhotoNotServed, shown_name

    thumbnails = Thumbnails(THUMB_CACHE_ENTRIES)
    decoding = threading.BoundedSemaphore(THUMBNAILS_AT_ONCE)

    def opened(photo_id: str) -> tuple[Any, os.stat_result, str]:
        """The photo's open file, its fstat and its name (404 when it is not served)."""
        gallery = photos.gallery
        try:
            file = photos.open(gallery, photo_id)
        except PhotoNotServed as err:
            raise HTTPException(404, str(err)) from None
        return file, os.fstat(file.fileno()), gallery.photos[gallery.positions[photo_id]]["name"]

    def validators(info: os.stat_result) -> dict[str, str]:
        tag = hashlib.sha256(repr(content_key(info)).encode()).hexdigest()[:32]
        return {"ETag": f'"{tag}"', "Cache-Control": "private, no-cache"}

    def unchanged(request: Request, headers: dict[str, str]) -> bool:
        sent = request.headers.get("if-none-match", "")
        return headers["ETag"] in (tag.strip().removeprefix("W/") for tag in sent.split(","))

    def thumbnail(file: Any) -> bytes:
        with decoding:
            image = open_photo(file, THUMB_SIZE)
        image.thumbnail((THUMB_SIZE, THUMB_SIZE))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        return out.getvalue()

    @app.get("/photos/{photo_id}")
    def photo(photo_id: str, request: Request) -> Response:
        file, info, name = opened(photo_id)
        headers = validators(info)
        if unchanged(request, headers):
            file.close()
            return Response(status_code=304, headers=headers)

        def chunks() -> Any:
            with file:
                left = info.st_size
                while left > 0 and (chunk := file.read(min(left, 1 << 20))):
                    left -= len(chunk)
                    yield chunk

        return StreamingResponse(
            chunks(),
            media_type=MEDIA_TYPES.get(Path(name).suffix.lower()),
            headers={**headers, "Content-Length": str(info.st_size)},
        )

    @app.get("/thumbs/{photo_id}")
    def thumb(photo_id: str, request: Request) -> Response:
        file, info, name = opened(photo_id)
        with file:
            headers = validators(info)
            if unchanged(request, headers):
                return Response(status_code=304, headers=headers)
            data = thumbnails.get(content_key(info))
            if data is None:
                try:
                    data = thumbnail(file)
                except UnreadablePhoto:  # damaged, or another format, since it was indexed
                    raise HTTPException(404, f"photo {shown_name(name)} can no longer be read; rescan") from None
                thumbnails.put(content_key(info), data)
        return Response(data, media_type="image/jpeg", headers=headers)


def build_parser() -> Any:
    from options import ArgumentParser, default_device, int_range, non_negative_int, positive_int, torch_device

    parser = ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True, help="a trained checkpoint (best.pt)")
    parser.add_argument("--images", required=True, help="folder of photos to search (read only)")
    parser.add_argument("--captions", default="", help="captions to search: CSV image,caption or one per line")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int_range(1, 65535), default=8000)
    parser.add_argument(
        "--allow_host",
        action="append",
        default=[],
        metavar="NAME",
        help="another Host name to answer besides localhost and --host (repeatable), "
        "e.g. this machine's LAN name when --host is 0.0.0.0",
    )
    parser.add_argument("--k", type=int_range(1, MAX_K), default=12, help=f"results per query (at most {MAX_K})")
    parser.add_argument(
        "--index",
        choices=("exact", "faiss"),
        default="exact",
        help="exact search, or an approximate faiss index for very large folders",
    )
    parser.add_argument(
        "--include_hidden", action="store_true", help="also index hidden files and folders (names starting with '.')"
    )
    parser.add_argument("--backbone", default="efficientnet-lite0", help="region backbone of the training features")
    parser.add_argument("--cache_dir", default="", help="embedding cache (default data_cache/photo_index)")
    parser.add_argument("--max_upload_mb", type=int_range(1, 1024), default=10)
    parser.add_argument("--batch_size", type=positive_int, default=32)
    parser.add_argument("--workers", type=non_negative_int, default=0)
    parser.add_argument("--device", type=torch_device, default=default_device())
    parser.add_argument(
        "--bert_path",
        default=None,
        help="a bert checkpoint's BERT folder, if the checkpoint does not hold its config and vocabulary",
    )
    return parser


def check_args(args: Any) -> None:
    """Every input and option that argparse cannot check, before anything is loaded or indexed."""
    from backbones import BACKBONES
    from options import check_writable_dir
    from utils import path_problem

    for value, option, folder, what in (
        (args.checkpoint, "--checkpoint", False, "checkpoint"),
        (args.images, "--images", True, "photo folder"),
        (args.captions, "--captions", False, "caption file"),
    ):
        problem = value and path_problem(value, folder, what)
        if problem:
            raise CoderError(f"{option} {value}: {problem}")
    if args.backbone not in BACKBONES:
        raise CoderError(f"--backbone {args.backbone}: unknown (choose from: {', '.join(sorted(BACKBONES))})")
    if args.cache_dir:
        check_writable_dir(args.cache_dir, "--cache_dir")
    if args.captions:
        from photo_index import read_caption_file

        read_caption_file(Path(args.captions))  # a bad caption file is refused before the photos are indexed
    try:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((args.host, args.port))
    except OSError as err:
        raise CoderError(
            f"--host {args.host} --port {args.port}: cannot listen there ({err.strerror or err})"
        ) from None


def build_index(args: Any) -> tuple[Any, Any]:
    """The photo index (refreshed) and the caption set of a command line."""
    from photo_index import IMAGE_SUFFIXES, CaptionSet, Embedder, PhotoIndex

    embedder = Embedder(
        args.checkpoint, args.device, args.backbone, args.batch_size, args.workers, bert_path=args.bert_path
    )
    photos = PhotoIndex(
        embedder,
        args.images,
        args.cache_dir or None,
        approximate=args.index == "faiss",
        include_hidden=args.include_hidden,
    )
    start = time.perf_counter()
    counts = photos.refresh(progress=sys.stderr.isatty())
    print(
        f"{len(photos.gallery.photos)} photos indexed ({counts['added']} new, {counts['removed']} removed) in "
        f"{time.perf_counter() - start:.0f} s",
        flush=True,
    )
    for name, err in counts["unreadable"].items():
        print(f"skipped {name}: {err}", file=sys.stderr)
    if not photos.gallery.photos:
        raise CoderError(f"--images {args.images}: no readable photos ({', '.join(sorted(IMAGE_SUFFIXES))})")
    caption_set = CaptionSet(embedder, args.captions, args.cache_dir or None, progress=True) if args.captions else None
    return photos, caption_set


@cli_entry
def main(argv: Sequence[str] | None = None) -> None:
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn
    except ImportError:
        raise CoderError("serve.py needs its web packages: pip install fastapi uvicorn python-multipart") from None
    args = build_parser().parse_args(argv)
    check_args(args)
    photos, caption_set = build_index(args)
    app = create_app(photos, caption_set, args.max_upload_mb << 20, args.k, allowed_hosts(args.host, args.allow_host))
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"open http://{'127.0.0.1' if args.host in WILDCARD_ADDRESSES else shown}:{args.port}/  "
        f"(Ctrl-C stops the server)",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
