"""Search your own photos with a trained checkpoint: a local web app.

    python serve.py --checkpoint runs/x/best.pt --images DIR [--captions FILE] [--port 8000]

Type a sentence to see the photos it finds; click a photo (or upload one) to see the captions
it finds in --captions and its nearest photos. On first start the photos are embedded (region
features with the backbone of extract_features.py, then the checkpoint's image encoder) and
cached under data_cache/photo_index; a restart reads the cache and embeds only new or changed
photos ("Rescan folder" does the same while running). The server binds to 127.0.0.1, serves
only the indexed photos (by id, never by path), and never writes into the photo folder.

JSON API: GET /api/status, GET /api/search?q=TEXT&k=N, GET /api/photos/{id}/neighbours?k=N,
POST /api/upload (multipart field "file"), POST /api/refresh; images at /photos/{id} and
/thumbs/{id}.
"""

import io
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from utils import CoderError, cli_entry

PAGE = Path(__file__).resolve().parent / "web" / "index.html"
THUMB_SIZE = 256


def create_app(photos: Any, captions: Any = None, max_upload_bytes: int = 10 << 20, default_k: int = 12) -> Any:
    """The FastAPI app over a PhotoIndex and an optional CaptionSet (photo_index.py)."""
    from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
    from fastapi.responses import FileResponse, HTMLResponse, Response

    app = FastAPI(title="CODER photo search", docs_url=None, redoc_url=None)
    embedder = photos.embedder

    def photo_entry(photo_id: int, score: float | None = None) -> dict[str, Any]:
        entry = {"id": photo_id, "name": photos.photos[photo_id]["name"], "thumb": f"/thumbs/{photo_id}",
                 "url": f"/photos/{photo_id}"}
        return entry if score is None else {**entry, "score": round(score, 4)}

    def caption_entries(vector: Any, k: int, own_photo: str | None) -> list[dict[str, Any]]:
        if captions is None:
            return []
        return [{"text": captions.texts[i], "score": round(s, 4), "photo": captions.images[i],
                 "own": own_photo is not None and captions.images[i] == own_photo}
                for i, s in captions.index.ranked(vector, k)[0]]

    def checked_photo(photo_id: int) -> Path:
        try:
            return photos.path(photo_id)
        except KeyError:
            raise HTTPException(404, f"no photo {photo_id} (the index has {len(photos.photos)})") from None

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.get("/api/status")
    def status() -> dict[str, Any]:
        return {"photos": len(photos.photos), "captions": len(captions.texts) if captions else 0,
                "checkpoint": str(embedder.checkpoint), "mu": embedder.mu, "default_k": default_k,
                "search": "approximate (faiss)" if photos.approximate else "exact"}

    @app.get("/api/search")
    def search(q: str = Query(..., max_length=1000), k: int = Query(default_k, ge=1, le=200)) -> dict[str, Any]:
        if not q.strip():
            raise HTTPException(400, "an empty query matches nothing; type some words")
        start = time.perf_counter()
        ranked = photos.search(embedder.texts([q]), k)[0]
        return {"query": q, "results": [photo_entry(i, s) for i, s in ranked],
                "milliseconds": round(1000 * (time.perf_counter() - start), 1)}

    @app.get("/api/photos/{photo_id}/neighbours")
    def neighbours(photo_id: int, k: int = Query(default_k, ge=1, le=200)) -> dict[str, Any]:
        checked_photo(photo_id)
        vector = photos.vectors[photo_id:photo_id + 1]
        name = photos.photos[photo_id]["name"]
        ranked = [(i, s) for i, s in photos.search(vector, k + 1)[0] if i != photo_id][:k]
        return {"photo": photo_entry(photo_id), "captions": caption_entries(vector, k, name),
                "photos": [photo_entry(i, s) for i, s in ranked]}

    @app.post("/api/upload")
    async def upload(request: Request, file: UploadFile = File(...), k: int = Query(default_k, ge=1, le=200)
                     ) -> dict[str, Any]:
        declared = int(request.headers.get("content-length") or 0)
        data = await file.read(max_upload_bytes + 1)
        if declared > max_upload_bytes + 65536 or len(data) > max_upload_bytes:
            raise HTTPException(413, f"upload larger than {max_upload_bytes >> 20} MB")
        try:
            vector = embedder.image_bytes(data).unsqueeze(0)
        except CoderError as err:
            raise HTTPException(400, f"{file.filename}: {err}") from None
        own = Path(file.filename or "").name or None
        return {"name": own, "captions": caption_entries(vector, k, own),
                "photos": [photo_entry(i, s) for i, s in photos.search(vector, k)[0]]}

    @app.post("/api/refresh")
    def refresh() -> dict[str, Any]:
        return photos.refresh()

    @app.get("/photos/{photo_id}")
    def photo(photo_id: int) -> FileResponse:
        return FileResponse(checked_photo(photo_id))

    @lru_cache(maxsize=4096)
    def thumbnail(path: Path, mtime: int) -> bytes:
        from PIL import Image

        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMB_SIZE, THUMB_SIZE))
            out = io.BytesIO()
            image.save(out, "JPEG", quality=85)
        return out.getvalue()

    @app.get("/thumbs/{photo_id}")
    def thumb(photo_id: int) -> Response:
        path = checked_photo(photo_id)
        return Response(thumbnail(path, photos.photos[photo_id]["mtime"]), media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=3600"})

    return app


def build_parser() -> Any:
    from options import ArgumentParser, default_device, non_negative_int, positive_int, torch_device

    parser = ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True, help="a trained checkpoint (best.pt)")
    parser.add_argument("--images", required=True, help="folder of photos to search (read only)")
    parser.add_argument("--captions", default="", help="captions to search: CSV image,caption or one per line")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=positive_int, default=8000)
    parser.add_argument("--k", type=positive_int, default=12, help="results per query")
    parser.add_argument("--index", choices=("exact", "faiss"), default="exact",
                        help="exact search, or an approximate faiss index for very large folders")
    parser.add_argument("--backbone", default="efficientnet-lite0", help="region backbone of the training features")
    parser.add_argument("--cache_dir", default="", help="embedding cache (default data_cache/photo_index)")
    parser.add_argument("--max_upload_mb", type=positive_int, default=10)
    parser.add_argument("--batch_size", type=positive_int, default=32)
    parser.add_argument("--workers", type=non_negative_int, default=0)
    parser.add_argument("--device", type=torch_device, default=default_device())
    return parser


def build_index(args: Any) -> tuple[Any, Any]:
    """The photo index (refreshed) and the caption set of a command line."""
    from photo_index import IMAGE_SUFFIXES, CaptionSet, Embedder, PhotoIndex

    embedder = Embedder(args.checkpoint, args.device, args.backbone, args.batch_size, args.workers)
    photos = PhotoIndex(embedder, args.images, args.cache_dir or None, approximate=args.index == "faiss")
    start = time.perf_counter()
    counts = photos.refresh(progress=sys.stderr.isatty())
    print(f"{len(photos.photos)} photos indexed ({counts['added']} new, {counts['removed']} removed) in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    for name, err in counts["unreadable"].items():
        print(f"skipped {name}: {err}", file=sys.stderr)
    if not photos.photos:
        raise CoderError(f"--images {args.images}: no readable photos ({', '.join(sorted(IMAGE_SUFFIXES))})")
    caption_set = CaptionSet(embedder, args.captions, args.cache_dir or None, progress=True) if args.captions else None
    return photos, caption_set


@cli_entry
def main(argv: Sequence[str] | None = None) -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise CoderError("serve.py needs its web packages: pip install fastapi uvicorn python-multipart") from None
    args = build_parser().parse_args(argv)
    photos, caption_set = build_index(args)
    app = create_app(photos, caption_set, args.max_upload_mb << 20, args.k)
    print(f"open http://{args.host}:{args.port}/  (Ctrl-C stops the server)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
