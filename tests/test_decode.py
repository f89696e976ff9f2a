"""Decoding: every Pillow mode to RGB, EXIF orientation, animations, the JPEG fast path and its Pillow fallback, the
one memory limit, clean errors for anything, and features that stay the Keras recipe's (D2, on real photos)."""

from __future__ import annotations

import io
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

import cnnbatch.decode as decode_module  # noqa: F401
from cnnbatch import jpegfast
from cnnbatch.decode import (
    DRAFT_MIN_SIDE,
    MAX_DECODED_MB,
    DecodeError,
    decode_image,
    draft_scale,
    jpeg_header,
    to_rgb,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # Pillow's notes on the odd files made here
CRASHERS = Path(__file__).parent / "data" / "decode-crashers"


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def gradient(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                     np.full_like(x, 128)], axis=-1).astype(np.uint8)


def asymmetric(width: int, height: int) -> np.ndarray:
    """A gradient with a bright block in one corner: every flip and rotation of it is far from the others."""
    pixels = gradient(width, height)
    pixels[: height // 3, : width // 4] = (250, 250, 20)
    return pixels


def png_header_only(width: int, height: int, bit_depth: int, colour_type: int) -> bytes:
    """A PNG whose IHDR claims the size, with one tiny IDAT: opens like the real thing, holds no pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def exif_with(*entries: tuple[int, int, int, bytes]) -> bytes:
    """A little-endian EXIF block with IFD0 holding ``entries`` (tag, type, count, 4-byte value)."""
    out = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        out += struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\0")
    return b"Exif\x00\x00" + out + struct.pack("<I", 0)


def force_pillow_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """libjpeg-turbo refuses everything: decode_image must fall back to Pillow for every JPEG."""
    def refuse(*args, **kwargs):
        raise ValueError("refused for the test")
    monkeypatch.setattr(jpegfast.simplejpeg, "decode_jpeg", refuse)


# --- modes, formats, frames ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("RGB", "PNG"), ("RGB", "JPEG"), ("L", "JPEG"), ("L", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"), ("P", "PNG"),
     ("CMYK", "JPEG"), ("I;16", "PNG"), ("I", "TIFF"), ("F", "TIFF"), ("1", "BMP"), ("RGB", "WEBP"),
     ("RGBA", "WEBP"), ("RGB", "TIFF"), ("RGB", "GIF")],
)
def test_every_mode_decodes_to_rgb_of_the_exact_size(mode: str, fmt: str) -> None:
    if mode == "I;16":
        image = Image.fromarray(gradient(40, 30)[..., 0].astype(np.uint16) * 257)
        assert image.mode.startswith("I;16")
    elif mode in ("I", "F"):
        image = Image.fromarray(gradient(40, 30)[..., 0].astype(np.int32 if mode == "I" else np.float32) * 1000)
        assert image.mode == mode
    else:
        image = Image.fromarray(gradient(40, 30)).convert(mode)
    pixels = decode_image(encode(image, fmt), 32)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    assert pixels.std() > 10  # content survived, not a blank frame


def test_palette_transparency_is_composited_on_white() -> None:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0] + [255, 0, 0] * 255)
    image.info["transparency"] = 0
    pixels = np.asarray(to_rgb(image))
    assert (pixels == 255).all()  # the transparent black index became white, not black
    assert (decode_image(encode(image, "PNG"), 16) == 255).all()


def test_rgba_transparent_pixels_become_white() -> None:
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert (np.asarray(to_rgb(image)) == 255).all()


def test_resized_alpha_is_composited_as_a_full_size_composite_would_be() -> None:
    # decode_image resizes RGBA (premultiplied) before compositing on white: the same sums, up to rounding.
    rgba = np.dstack([gradient(60, 40), np.tile(np.linspace(0, 255, 60, dtype=np.uint8), (40, 1))])
    image = Image.fromarray(rgba, "RGBA")
    expected = np.asarray(to_rgb(image).resize((24, 24), Image.Resampling.BILINEAR), np.int16)
    got = decode_image(encode(image, "PNG"), 24).astype(np.int16)
    assert np.abs(got - expected).max() <= 2, f"max difference {np.abs(got - expected).max()}, expected <= 2"


def test_sixteen_bit_grey_keeps_its_range() -> None:
    values = np.array([[0, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    rgb = np.asarray(to_rgb(image))
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, 1].tolist() == [255, 255, 255]


def test_high_bit_depth_greys_are_scaled_like_the_full_size_image() -> None:
    # Resized in their own mode, then scaled by the full image's range: within rounding of scaling first.
    values = (np.linspace(0, 1, 80)[None, :] * np.linspace(0.2, 1, 60)[:, None] * 65535).astype(np.uint16)
    for image in (Image.fromarray(values), Image.fromarray(values.astype(np.int32) * 3)):
        expected = np.asarray(to_rgb(image).resize((32, 32), Image.Resampling.BILINEAR), np.int16)
        got = decode_image(encode(image, "TIFF" if image.mode == "I" else "PNG"), 32).astype(np.int16)
        assert np.abs(got - expected).max() <= 1, f"{image.mode}: max difference {np.abs(got - expected).max()}"


def test_sixteen_bit_decode_makes_no_full_size_float_copy() -> None:
    # The 16-bit path once converted the whole image to float64 (an 8000x8000 PNG took 1.66 GB); numpy's
    # allocations are traced, so the peak shows any full-size copy (3000x2000 x 8 bytes would be 48 MB).
    import tracemalloc

    data = encode(Image.fromarray(np.full((2000, 3000), 30000, np.uint16)), "PNG")
    tracemalloc.start()
    try:
        decode_image(data, 64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000, f"decoding a 3000x2000 16-bit PNG allocated {peak / 1e6:.1f} MB in Python, expected < 4"


def test_animated_images_use_the_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    for fmt in ("GIF", "WEBP", "PNG"):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=10)
        assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2, f"the {fmt} should be animated"
        pixels = decode_image(data, 32)
        assert pixels[..., 0].mean() > 200 and pixels[..., 2].mean() < 50, f"{fmt}: not the first (red) frame"


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "TGA", "PCX"])
def test_formats_cnnbatch_does_not_read_are_refused_by_name(fmt: str) -> None:
    data = encode(Image.fromarray(gradient(16, 16)), fmt)
    with pytest.raises(DecodeError, match=r"not a JPEG, PNG, GIF, BMP, WebP or TIFF image") as info:
        decode_image(data, 16)
    assert "0x" not in str(info.value)  # no object address: reruns write the same _errors row


# --- orientation --------------------------------------------------------------------------------------------------

def test_exif_orientation_is_applied() -> None:
    # A landscape image whose EXIF says "rotate 90": decoded it must be portrait (left half red -> top red).
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = (255, 0, 0)
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    data = encode(image, "JPEG", exif=exif.tobytes(), quality=95)
    pixels = decode_image(data, 32)
    red_top = pixels[:8, :, 0].mean() > 200 or pixels[-8:, :, 0].mean() > 200
    red_left = pixels[:, :8, 0].mean() > 200
    assert red_top and not red_left


def _displayed(data: bytes, size: int) -> np.ndarray:
    """Pillow's own recipe for what the file shows: exif_transpose, RGB, bilinear resize."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), np.int16)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_every_exif_orientation_matches_pillows_own_transpose(orientation: int, fmt: str) -> None:
    # decode_image transposes the small resized array; the pixels are those of transposing first, up to the
    # rounding of the resize (and the JPEG decoder's), and far from every other orientation's.
    image = Image.fromarray(asymmetric(48, 30))
    exif = image.getexif()
    exif[0x0112] = orientation
    data = encode(image, fmt, exif=exif.tobytes(), **({"lossless": True} if fmt == "WEBP" else {}))
    got = decode_image(data, 24).astype(np.int16)
    distances = {}
    for other in range(1, 9):
        exif[0x0112] = other
        distances[other] = np.abs(got - _displayed(encode(image, fmt, exif=exif.tobytes(),
                                                          **({"lossless": True} if fmt == "WEBP" else {})),
                                                   24)).mean()
    assert distances[orientation] <= 1.0, f"mean difference {distances[orientation]:.2f} from Pillow's transpose"
    wrong = {o: round(d, 1) for o, d in distances.items() if o != orientation and d < 15}
    assert not wrong, f"orientation {orientation} decoded too close to {wrong}"


def test_xmp_orientation_is_read_when_exif_has_none() -> None:
    image = Image.fromarray(asymmetric(48, 30))
    xmp = b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    data = encode(image, "JPEG", quality=95, xmp=xmp)
    assert jpeg_header(data) is not None and jpeg_header(data).xmp  # type: ignore[union-attr]
    got = decode_image(data, 24).astype(np.int16)
    assert np.abs(got - _displayed(data, 24)).mean() <= 1.5
    assert np.abs(got - np.asarray(Image.fromarray(asymmetric(48, 30)).resize((24, 24)), np.int16)).mean() > 10


def test_an_orientation_beside_a_malformed_tag_still_rotates() -> None:
    # Found by fuzzing: Orientation plus an ASCII value in a SHORT tag (ResolutionUnit) made the old decoder's
    # in-place exif_transpose raise struct.error while writing the EXIF back, killing the shard. Only reading the
    # tag, the orientation is still applied; through the Pillow path too.
    image = Image.fromarray(asymmetric(48, 30))
    exif = exif_with((0x0112, 3, 1, struct.pack("<H", 6)), (0x0128, 2, 1, b"A"))
    for fmt in ("JPEG", "PNG", "WEBP"):
        options = {"lossless": True} if fmt == "WEBP" else {}
        as_stored = decode_image(encode(image, fmt, **options), 24)
        got = decode_image(encode(image, fmt, exif=exif, **options), 24)
        np.testing.assert_array_equal(got, np.rot90(as_stored, -1), err_msg=f"{fmt}: not rotated 90 degrees")


def test_unreadable_exif_counts_as_absent() -> None:
    # An EXIF block that is no TIFF structure at all: Pillow raises SyntaxError reading it (the old decoder lost
    # such PNGs and WebPs as errors). Decoded as stored, as the Keras recipe would.
    image = Image.fromarray(asymmetric(48, 30))
    for fmt in ("JPEG", "PNG", "WEBP"):
        options = {"lossless": True} if fmt == "WEBP" else {"quality": 95} if fmt == "JPEG" else {}
        plain = decode_image(encode(image, fmt, **options), 24)
        broken = decode_image(encode(image, fmt, exif=b"Exif\x00\x00XX*\x00garbage", **options), 24)
        np.testing.assert_array_equal(broken, plain, err_msg=f"{fmt}: an unreadable EXIF changed the pixels")


def test_orientation_values_outside_one_to_eight_are_ignored() -> None:
    image = Image.fromarray(asymmetric(48, 30))
    plain = decode_image(encode(image, "JPEG", quality=95), 24)
    for entry in [(0x0112, 3, 1, struct.pack("<H", 9)), (0x0112, 3, 1, struct.pack("<H", 0)),
                  (0x0112, 2, 2, b"6\0"), (0x0112, 5, 1, b"")]:  # 9, 0, the text "6", a RATIONAL at offset 0
        data = encode(image, "JPEG", quality=95, exif=exif_with(entry))
        np.testing.assert_array_equal(decode_image(data, 24), plain, err_msg=f"entry {entry} rotated the image")


# --- the JPEG fast path and the Pillow path -----------------------------------------------------------------------

def test_jpeg_header_walk_agrees_with_pillow() -> None:
    image = Image.fromarray(asymmetric(50, 31))
    exif = image.getexif()
    exif[0x0112] = 8
    for data in (encode(image, "JPEG", exif=exif.tobytes()), encode(image, "JPEG", progressive=True),
                 encode(image.convert("L"), "JPEG"), encode(image, "JPEG", subsampling=0),
                 encode(image.convert("CMYK"), "JPEG")):
        header = jpeg_header(data)
        opened = Image.open(io.BytesIO(data))
        assert header is not None and (header.width, header.height) == opened.size
        assert header.exif == opened.info.get("exif")
        assert header.fast == (opened.mode in ("RGB", "L"))
        assert (header.coefficient_bytes > 0) == bool(opened.info.get("progressive"))


def test_fast_path_and_pillow_path_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    base = np.kron(rng.integers(0, 255, (24, 32, 3)), np.ones((20, 20, 1))).astype(np.uint8)  # 640x480
    images = [encode(Image.fromarray(base), "JPEG", quality=90),
              encode(Image.fromarray(base).convert("L"), "JPEG", quality=90),
              encode(Image.fromarray(base), "JPEG", quality=90, progressive=True)]
    sizes = (224, 112, 48)  # libjpeg scales 1/1, 1/4 and 1/4 (the 112 px floor)
    fast = [[decode_image(data, size).astype(np.int16) for size in sizes] for data in images]
    force_pillow_path(monkeypatch)
    for data, expected in zip(images, fast):
        for size, pixels in zip(sizes, expected):
            difference = np.abs(decode_image(data, size).astype(np.int16) - pixels).mean()
            assert difference <= 1.0, f"{size} px: the two paths differ by {difference:.2f} on average"


def test_large_jpeg_takes_the_draft_path_and_stays_close_to_full_decode() -> None:
    rng = np.random.default_rng(0)
    base = np.kron(rng.integers(0, 255, (30, 40, 3)), np.ones((40, 40, 1))).astype(np.uint8)  # 1600x1200
    data = encode(Image.fromarray(base), "JPEG", quality=92)
    assert draft_scale(1600, 1200, 64) == 8 and draft_scale(1600, 1200, 224) == 4
    assert draft_scale(500, 375, 160) == 2 and draft_scale(500, 375, 224) == 1
    assert draft_scale(640, 427, 48) == 2  # the DRAFT_MIN_SIDE floor: 1/8 and 1/4 would keep under 112 px
    assert DRAFT_MIN_SIDE == 112
    fast = decode_image(data, 64, use_draft=True).astype(np.float64)
    full = decode_image(data, 64, use_draft=False).astype(np.float64)
    cosine = (fast * full).sum() / np.linalg.norm(fast) / np.linalg.norm(full)
    assert cosine > 0.999
    assert np.abs(fast - full).mean() < 6


def test_a_jpeg_libjpeg_turbo_only_warns_about_is_decoded_by_pillow() -> None:
    # Junk between the scan and EOI: libjpeg warns ("extraneous bytes"), which simplejpeg's strict mode refuses;
    # Pillow decodes it, as the Keras recipe would.
    clean = encode(Image.fromarray(gradient(40, 30)), "JPEG", quality=90)
    data = clean[:-2] + b"\x00\x00\x00" + clean[-2:]
    with pytest.raises(ValueError):
        jpegfast.simplejpeg.decode_jpeg(data)
    np.testing.assert_array_equal(decode_image(data, 24), np.asarray(
        Image.open(io.BytesIO(data)).convert("RGB").resize((24, 24), Image.Resampling.BILINEAR)))


def test_a_decode_at_the_exact_size_is_not_handed_out_twice() -> None:
    # The fast path decodes into a buffer kept per thread; an image needing no resize must still be a copy.
    first_source = np.full((32, 32, 3), 40, np.uint8)
    first = decode_image(encode(Image.fromarray(first_source), "JPEG", quality=95), 32)
    kept = first.copy()
    decode_image(encode(Image.fromarray(np.full((32, 32, 3), 200, np.uint8)), "JPEG", quality=95), 32)
    np.testing.assert_array_equal(first, kept)


def test_decoding_in_threads_gives_the_sequential_pixels() -> None:
    blobs = [encode(Image.fromarray(np.roll(asymmetric(90, 60), i * 7, axis=1)), "JPEG", quality=90)
             for i in range(12)] + [encode(Image.fromarray(gradient(70, 50 + i)), "PNG") for i in range(4)]
    expected = [decode_image(b, 40) for b in blobs]
    results: dict[tuple[int, int], np.ndarray] = {}

    def work(worker: int) -> None:
        for _ in range(5):
            for index, blob in enumerate(blobs):
                results[(worker, index)] = decode_image(blob, 40)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for (worker, index), pixels in results.items():
        np.testing.assert_array_equal(pixels, expected[index], err_msg=f"thread {worker}, image {index}")


# --- the limit ----------------------------------------------------------------------------------------------------

def test_the_16_bit_png_bomb_is_refused_with_one_message() -> None:
    data = (CRASHERS / "png-16bit-8000x8000.png").read_bytes()  # 124 KB; decoded it once took 1.66 GB
    with pytest.raises(DecodeError) as info:
        decode_image(data, 224)
    assert str(info.value) == (f"image is 8000x8000 I;16 (128 MB decoded), over the limit of {MAX_DECODED_MB} MB "
                               "per image")


def test_the_limit_is_checked_before_any_pixel_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import ImageFile

    loads: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def recorded_load(self):
        loads.append(self.size)
        return real_load(self)
    monkeypatch.setattr(ImageFile.ImageFile, "load", recorded_load)
    with pytest.raises(DecodeError, match=r"image is 5000x4000 RGBA \(80 MB decoded\), over the limit of 50 MB"):
        decode_image(png_header_only(5000, 4000, 8, 6), 32, max_bytes=50_000_000)
    with pytest.raises(DecodeError, match=r"image is 8000x8000 I;16 \(128 MB decoded\)"):
        decode_image((CRASHERS / "png-16bit-8000x8000.png").read_bytes(), 32)
    assert not loads, f"pixels were decoded before the limit refused the image: {loads}"
    # (and an image under the limit does get loaded through the same hook)
    decode_image(encode(Image.fromarray(gradient(40, 30)), "PNG"), 16)
    assert loads and set(loads) == {(40, 30)}


def test_pillows_own_pixel_limit_does_not_speak_first() -> None:
    # 20000x10000 is over Pillow's 2 x MAX_IMAGE_PIXELS, which Image.open refuses in its own words and numbers;
    # the message is ours, with the mode and the bytes.
    assert 20000 * 10000 > 2 * (Image.MAX_IMAGE_PIXELS or 0)
    with pytest.raises(DecodeError) as info:
        decode_image(png_header_only(20000, 10000, 8, 0), 32)
    assert str(info.value) == "image is 20000x10000 L (200 MB decoded), over the limit of 100 MB per image"


def test_the_limit_counts_what_the_dct_scaling_decodes() -> None:
    photo = Image.fromarray(np.kron(np.random.default_rng(1).integers(0, 255, (24, 32, 3)),
                                    np.ones((64, 64, 1))).astype(np.uint8))  # 2048x1536
    baseline = encode(photo, "JPEG", quality=85)
    assert decode_image(baseline, 224, max_bytes=1_000_000).shape == (224, 224, 3)  # 1/4: 512x384 RGB, 0.6 MB
    with pytest.raises(DecodeError, match=r"image is 2048x1536 RGB \(9\.4 MB decoded\), over the limit of 1 MB"):
        decode_image(baseline, 224, max_bytes=1_000_000, use_draft=False)
    # A progressive file holds every DCT coefficient of the full image whatever the scale: 2048x1536 x (1 + 2/4
    # chroma) x 2 bytes.
    progressive = encode(photo, "JPEG", quality=85, progressive=True)
    with pytest.raises(DecodeError, match=r"image is 2048x1536 RGB \(10 MB decoded at 1/4 scale\)"):
        decode_image(progressive, 224, max_bytes=5_000_000)
    # The Pillow path (a CMYK JPEG) counts its draft() scale the same way.
    cmyk = encode(photo.convert("CMYK"), "JPEG", quality=85)
    assert decode_image(cmyk, 224, max_bytes=1_000_000).shape == (224, 224, 3)  # 512x384 CMYK: 0.8 MB
    with pytest.raises(DecodeError, match=r"image is 2048x1536 CMYK \(12\.6 MB decoded\)"):
        decode_image(cmyk, 224, max_bytes=1_000_000, use_draft=False)


# --- errors -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("data", "reason"), [(b"", "empty"), (b"not an image at all", "not a JPEG"),
                                              (encode(Image.new("RGB", (64, 64)), "JPEG")[:200], "(?i)truncated"),
                                              (encode(Image.new("RGB", (64, 64)), "PNG")[:60], "cannot decode")])
def test_broken_inputs_raise_one_line_decode_errors(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason) as info:
        decode_image(data, 32)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("error", "message"), [
    (struct.error("unpack requires a buffer of 4 bytes"), "cannot decode image: struct.error: unpack requires"),
    (KeyError(65535), "cannot decode image: KeyError: 65535"),
    (RuntimeError("boom"), "cannot decode image: RuntimeError: boom"),
    (OSError("broken data stream"), "cannot decode image: broken data stream"),
    (MemoryError(), "cannot decode image: out of memory"),
])
def test_any_exception_while_decoding_is_that_images_decode_error(monkeypatch: pytest.MonkeyPatch,
                                                                   error: Exception, message: str) -> None:
    def fail(*args, **kwargs):
        raise error
    data = {"JPEG": encode(Image.fromarray(gradient(40, 30)), "JPEG"),
            "PNG": encode(Image.fromarray(gradient(40, 30)), "PNG")}
    monkeypatch.setattr(jpegfast, "_resize_array", fail)  # the JPEG fast path
    monkeypatch.setattr(decode_module, "_small_rgb", fail)  # the Pillow path
    for fmt, blob in data.items():
        with pytest.raises(DecodeError) as info:
            decode_image(blob, 24)
        assert str(info.value).startswith(message), f"{fmt}: {info.value}"


def test_interrupts_are_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(jpegfast, "_resize_array", interrupt)
    with pytest.raises(KeyboardInterrupt):
        decode_image(encode(Image.fromarray(gradient(40, 30)), "JPEG"), 24)


# --- D2: the features stay the Keras recipe's ---------------------------------------------------------------------

def real_photos() -> dict[str, bytes]:
    """Real JPEG photos (scikit-learn's china.jpg and flower.jpg, 640x427) made into several sizes, aspect ratios,
    encodings and EXIF orientations; mosaics of them at native resolution for the 1/4 and 1/8 DCT scales."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    folder = Path(sklearn_datasets.__file__).parent / "images"
    cases: dict[str, bytes] = {}
    tiles = []
    for name in ("china.jpg", "flower.jpg"):
        raw = (folder / name).read_bytes()
        photo = Image.open(io.BytesIO(raw)).convert("RGB")
        assert photo.size == (640, 427), f"{name}: expected a 640x427 photo, got {photo.size}"
        tiles.append(photo)
        cases[f"{name} as shipped"] = raw
        cases[f"{name} 500x333"] = encode(photo.resize((500, 333), Image.Resampling.LANCZOS), "JPEG", quality=90)
        cases[f"{name} panorama 640x213"] = encode(photo.crop((0, 100, 640, 313)), "JPEG", quality=90)
        cases[f"{name} portrait 300x427"] = encode(photo.crop((170, 0, 470, 427)), "JPEG", quality=90)
        cases[f"{name} progressive"] = encode(photo, "JPEG", quality=90, progressive=True)
        cases[f"{name} 4:4:4 q95"] = encode(photo, "JPEG", quality=95, subsampling=0)
        cases[f"{name} grey"] = encode(photo.convert("L"), "JPEG", quality=90)
        for orientation, stored in ((3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_90),
                                    (8, Image.Transpose.ROTATE_270)):
            exif = Image.Exif()
            exif[0x0112] = orientation
            cases[f"{name} EXIF orientation {orientation}"] = encode(photo.transpose(stored), "JPEG", quality=90,
                                                                     exif=exif.tobytes())
    for index, (width, height) in enumerate(((960, 450), (1400, 900))):  # 1/4 and 1/8 at 112 px, decoded ~112
        mosaic = Image.new("RGB", (width, height))
        for y in range(0, height, 427):
            for x in range(0, width, 640):
                mosaic.paste(tiles[(x // 640 + y // 427 + index) % 2], (x, y))
        cases[f"mosaic {width}x{height}"] = encode(mosaic, "JPEG", quality=90)
    return cases


def keras_recipe_input(data: bytes) -> io.BytesIO:
    """The file the recipe is given: the photo as displayed (load_img ignores EXIF, so an EXIF-oriented file is
    given to it transposed, losslessly, from the same decoded pixels)."""
    image = Image.open(io.BytesIO(data))
    if image.getexif().get(0x0112, 1) != 1:
        return io.BytesIO(encode(ImageOps.exif_transpose(image), "PNG"))
    return io.BytesIO(data)


@pytest.mark.parametrize("size", [48, 112, 160])
def test_features_stay_within_cosine_0_9995_of_the_keras_recipe(size: int) -> None:
    """keras.utils.load_img(target_size, bilinear) -> preprocess_input -> VGG16 against decode_image -> the same
    seeded random VGG16, per image, on real photos: DCT scaling, the SIMD resize, libjpeg-turbo's fast IDCT and
    EXIF orientation together keep what the model sees."""
    from cnnbatch.backbones import get_backbone
    from cnnbatch.tfruntime import keras_module

    keras = keras_module()
    photos = real_photos()
    scales = {draft_scale(*Image.open(io.BytesIO(d)).size, size) for d in photos.values()}
    expected_scales = {48: {1, 2, 4, 8}, 112: {1, 2, 4, 8}, 160: {1, 2, 4}}[size]
    assert scales == expected_scales, f"the photos cover DCT scales {scales}, expected {expected_scales}"
    backbone = get_backbone("vgg16")
    keras.utils.set_random_seed(0)
    model = backbone.build(size, weights=None)
    preprocess = backbone.preprocess_fn()
    recipe = np.stack([np.asarray(keras.utils.load_img(keras_recipe_input(d), target_size=(size, size),
                                                       interpolation="bilinear"), np.float32)
                       for d in photos.values()])
    ours = np.stack([decode_image(d, size) for d in photos.values()]).astype(np.float32)
    expected = model.predict(preprocess(recipe), verbose=0, batch_size=8)
    got = model.predict(preprocess(ours), verbose=0, batch_size=8)
    cosines = (expected * got).sum(1) / np.linalg.norm(expected, axis=1) / np.linalg.norm(got, axis=1)
    worst = {name: round(float(c), 6) for name, c in zip(photos, cosines) if c < 0.9995}
    assert not worst, f"{size} px: features below cosine 0.9995 of the recipe's: {worst}"


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "GIF-grey"])
def test_non_jpeg_images_are_the_keras_recipe_exactly(tmp_path: Path, fmt: str) -> None:
    """The Pillow path is load_img's own arithmetic for RGB and grey files (grey resized before being replicated
    into three channels: the same numbers)."""
    keras = pytest.importorskip("keras")
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert("L") if fmt == "GIF-grey" else Image.fromarray(pixels)
    path = tmp_path / f"photo.{fmt.split('-')[0].lower()}"
    image.save(path)
    ours = decode_image(path.read_bytes(), 64)
    recipe = np.asarray(keras.utils.load_img(path, target_size=(64, 64), interpolation="bilinear"))
    np.testing.assert_array_equal(ours, recipe)


def test_an_ordinary_jpeg_is_the_keras_recipe_within_rounding(tmp_path: Path) -> None:
    keras = pytest.importorskip("keras")
    rng = np.random.default_rng(1)
    path = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(path, quality=90)
    ours = decode_image(path.read_bytes(), 64).astype(np.int16)
    recipe = np.asarray(keras.utils.load_img(path, target_size=(64, 64), interpolation="bilinear"), np.int16)
    assert np.abs(ours - recipe).mean() < 1.0 and np.abs(ours - recipe).max() <= 8
