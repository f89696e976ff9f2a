"""Stage 2: bytes -> a uint8 RGB array of the backbone's exact input size.

The result must match the plain Keras recipe (``keras.utils.load_img(target_size, interpolation="bilinear")``:
Pillow decodes, converts to RGB, resizes with its antialiased bilinear filter) in what the model sees: features
within cosine 0.9995 of the recipe's (tests/test_decode.py checks it on real photos). On top of the recipe we do
what real buckets need: EXIF orientation, every Pillow mode, the first frame of animations, one memory limit, and
errors that never escape as anything but :class:`DecodeError`.

Two paths, one result:

- **JPEG fast path** (baseline or progressive, 8-bit, grey or YCbCr/RGB: nearly every photo). Our own walk over
  the JPEG markers reads the size, the EXIF and XMP blocks and the scan layout without Pillow; libjpeg-turbo
  (``simplejpeg``) decodes straight into a numpy array (a buffer kept per thread), scaled in the DCT domain by 1/2,
  1/4 or 1/8 as long as both sides stay at least the target and ``DRAFT_MIN_SIDE``; fast_image_resize
  (``cykooz_resizer``, SIMD, ~4x Pillow's speed here) applies the same antialiased bilinear filter as Pillow, within
  1 of its pixel values. Only the power-of-two scales are used: libjpeg-turbo's 3/8..7/8 IDCTs have no SIMD and
  decode a 500x375 JPEG slower than no scaling at all. At full size the decoded pixels are Pillow's own (same
  libjpeg-turbo, same accurate IDCT and upsampling).
- **Pillow path** for everything else (PNG, GIF, BMP, WebP, TIFF, CMYK or arithmetic-coded JPEGs, and any JPEG
  the fast path's libjpeg-turbo refuses in strict mode: Pillow then decides, as the recipe would). Pillow's own
  ``draft()`` gives JPEGs the same power-of-two DCT scaling; the resize is Pillow's, as in the recipe.

Hostile input (README, "Limits (decoding)"):

- ``MAX_DECODED_MB`` per image, counted before any pixel is decoded as what the decoder will hold: width x height x
  bands x bytes per band of the mode at the scale that will actually be decoded (a big baseline JPEG decoded at
  1/8 counts 1/64 of its full size), plus libjpeg's whole-image coefficient buffer for progressive and multi-scan
  JPEGs, which no DCT scaling shrinks. Only the first frame of an animation is decoded, so only it counts. One
  limit, one message; Pillow's own pixel-count refusal (``Image.MAX_IMAGE_PIXELS``) is not left to speak first.
  Under it, one decode peaks at about twice the count (measured peak RSS growth: a 5000x5000 RGBA PNG 2.0x,
  Pillow premultiplying a copy to resize; 5700x5700 RGB 1.4x, Pillow holding RGB in 4 bytes; 7000x7000 16-bit
  grey 1.0x, where the decoder before issue 16 took 12x).
- Only JPEG (and MPO), PNG, GIF, BMP, WebP and TIFF are opened: the formats cnnbatch reads, not every Pillow plugin
  (some run external programs or are seldom exercised by anyone).
- EXIF (or XMP) orientation is applied after the resize, on the small array. An EXIF block that cannot be read
  (malformed tags, bad offsets, wrong types: Pillow raises anything from ``struct.error`` to ``ValueError``) counts
  as absent: the image is decoded as stored, as the Keras recipe always does, rather than lost.
- Any exception while turning one record's bytes into pixels, ``MemoryError`` included, becomes a ``DecodeError``
  naming what failed: one record's bytes never take its shard down.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image

from .decoderules import (
    _BYTES_PER_BAND,
    _FORMAT_NAMES,
    _HIGH_BIT_MODES,
    _ORIENTATION_TAG,
    DEFAULT_MAX_PIXELS,
    DRAFT_MIN_SIDE,
    DRAFT_OVERSAMPLE,
    FORMATS,
    LIBJPEG_FAST,
    MAX_DECODED_BYTES,
    MAX_DECODED_MB,
    DecodeError,
    _check_limit,
    _describe,
    _orient,
    _orientation,
    _over_limit,
    _pillow_pixels,
)
from .jpegfast import _decode_jpeg, draft_scale, draft_target, jpeg_header  # noqa: F401 - public names

# Bump when decoding changes what pixels reach the model: old outputs then no longer count as done.
DECODE_VERSION = (f"turbo{'-fast' if LIBJPEG_FAST else ''}-dct{DRAFT_OVERSAMPLE:g}-min{DRAFT_MIN_SIDE}"
                  "-bilinear-exif-v2")
__all__ = ["DECODE_VERSION", "DEFAULT_MAX_PIXELS", "DRAFT_MIN_SIDE", "DRAFT_OVERSAMPLE", "MAX_DECODED_BYTES",
           "MAX_DECODED_MB", "DecodeError", "decode_image", "draft_scale", "jpeg_header", "to_rgb"]


def decode_image(data: bytes, size: int, max_bytes: int = MAX_DECODED_BYTES, use_draft: bool = True) -> np.ndarray:
    """Decode ``data`` to a ``(size, size, 3)`` uint8 RGB array, or raise :class:`DecodeError`.

    ``max_bytes`` caps what decoding the image holds in memory (see the module docstring), checked before any pixel
    is decoded. ``use_draft=False`` decodes JPEGs at full size before the resize (the recipe's pixels, slower).
    Orientation from EXIF (or XMP) is applied; an unreadable EXIF block counts as absent. Any exception raised while
    decoding, ``MemoryError`` included, is turned into a ``DecodeError``; only ``KeyboardInterrupt``-like
    ``BaseException``\\s pass through.
    """
    if not data:
        raise DecodeError("empty file")
    try:
        decoded = _decode_jpeg(data, size, max_bytes, use_draft)
        if decoded is None:
            decoded = _decode_pillow(data, size, max_bytes, use_draft)
        pixels, orientation = decoded
        pixels = _orient(pixels, orientation)
    except DecodeError:
        raise
    except MemoryError:
        raise DecodeError("cannot decode image: out of memory") from None
    except Image.DecompressionBombError as exc:  # a frame or tile Pillow checks itself, beyond the image's size
        raise DecodeError(_over_limit(_pillow_pixels(exc), max_bytes)) from None
    except Image.UnidentifiedImageError:
        raise DecodeError(f"cannot decode image: not a {_FORMAT_NAMES} image") from None
    except Exception as exc:  # noqa: BLE001 - whatever one record's bytes make a decoder raise is that record's error
        raise DecodeError(f"cannot decode image: {_describe(exc)}") from None
    if pixels.shape != (size, size, 3) or pixels.dtype != np.uint8:
        raise DecodeError(f"decoded to {pixels.dtype} {pixels.shape}, expected uint8 ({size}, {size}, 3)")
    return pixels


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB; transparency is composited on white, 16-bit greys are scaled, CMYK converted."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _HIGH_BIT_MODES:
        return _grey_to_rgb(image, image.getextrema())
    if mode == "P":
        # Palette images with a transparent index only become correct through RGBA.
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV



# --- the Pillow path ----------------------------------------------------------------------------------------------

def _decode_pillow(data: bytes, size: int, max_bytes: int, use_draft: bool) -> tuple[np.ndarray, int]:
    image = _open(data)
    width, height = image.size
    coefficients = 0
    if image.format in ("JPEG", "MPO"):
        header = jpeg_header(data)
        coefficients = header.coefficient_bytes if header else 0
        if use_draft:
            wanted = draft_target(size)
            image.draft(image.mode, (wanted, wanted))
    decoded = image.size[0] * image.size[1] * Image.getmodebands(image.mode) * _BYTES_PER_BAND.get(image.mode, 1)
    _check_limit(width, height, image.mode, width // image.size[0], decoded + coefficients, max_bytes)
    # Only now: a PNG's getexif() decodes the whole image (its eXIf chunk may follow the pixels).
    orientation = _orientation(lambda: image.getexif().get(_ORIENTATION_TAG),
                               image.info.get("xmp") or image.info.get("XML:com.adobe.xmp"))
    return np.asarray(_small_rgb(image, size), dtype=np.uint8), orientation


def _open(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        # Pillow refuses more than 2 x MAX_IMAGE_PIXELS before the mode or the DCT scaling is known; identify the
        # image again without that check so that our limit, which counts them, decides and says why.
        image = _open_unchecked(data)
        if image is None:
            raise
        return image


def _open_unchecked(data: bytes) -> Image.Image | None:
    """``Image.open``'s identification loop over ``FORMATS`` (the plugins' registered openers) without its pixel
    check: only the header is read here; decode_image's limit runs before any pixel is decoded."""
    Image.init()
    prefix = data[:16]
    for name in FORMATS:
        if name not in Image.OPEN:
            continue
        factory, accept = Image.OPEN[name]
        verdict = accept(prefix) if accept else True
        if not verdict or isinstance(verdict, str):
            continue
        try:
            return factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, struct.error):  # what Image.open skips a plugin on
            continue
    return None


def _small_rgb(image: Image.Image, size: int) -> Image.Image:
    """The decoded image as ``(size, size)`` RGB. Resizes before converting where that is the same arithmetic
    (grey, alpha, high bit depths), so that the full-size image is converted at most once; converts first where
    the recipe does and the order matters (palettes, CMYK...)."""
    target = (size, size)
    mode = image.mode
    if mode in _HIGH_BIT_MODES:
        extrema = image.getextrema()  # of the full image, in C: no full-size float copy (a 16-bit bomb took GBs)
        small = image.resize(target, Image.Resampling.BILINEAR) if image.size != target else image
        return _grey_to_rgb(small, extrema)
    if mode == "1":
        image = image.convert("L")
    elif mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode == "PA":
        image = image.convert("RGBA")
    elif mode not in ("RGB", "L", "RGBA", "LA", "RGBa", "La"):
        image = image.convert("RGB")  # CMYK, YCbCr, LAB, HSV: the conversion is not linear, so before the resize
    if image.size != target:
        # Pillow resizes RGBA and LA premultiplied by alpha, so compositing on white afterwards is the same sum.
        image = image.resize(target, Image.Resampling.BILINEAR)
    return to_rgb(image)


def _grey_to_rgb(image: Image.Image, extrema: object) -> Image.Image:
    """16-bit, 32-bit integer and float greys to 8 bits: 16-bit by its full range, the others by the extrema of the
    full image (passed in: ``image`` may be its resized copy)."""
    mode = image.mode
    values = np.asarray(image).astype(np.float64)
    if mode.startswith("I;16"):
        grey = values / 65535.0 * 255.0 + 0.5
    else:
        low, high = (float(v) for v in extrema)  # type: ignore[attr-defined]
        if mode == "I":
            grey = values / max(high, 1.0) * 255.0 + 0.5
        else:
            grey = (np.nan_to_num(values, nan=low) - low) / max(high - low, 1e-12) * 255.0 + 0.5
    grey = np.clip(np.nan_to_num(grey, nan=0.0, posinf=255.0, neginf=0.0), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


