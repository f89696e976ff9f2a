"""The decoder's rules, shared by its two paths (decode.py, jpegfast.py): the one memory limit, the formats, the
DCT-scaling bounds, EXIF orientation, and errors that never escape as anything but :class:`DecodeError`."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable

import numpy as np
from PIL import Image

# One limit on the memory an image may take to decode (decimal MB: 10^6 bytes). 100 MB holds an 8K RGB frame
# (7680x4320) or a 33 MP RGB PNG decoded whole, and any baseline JPEG a camera makes once DCT scaling applies.
MAX_DECODED_MB = 100
MAX_DECODED_BYTES = MAX_DECODED_MB * 1_000_000
# The same limit in 8-bit RGB pixels, for callers that size things in pixels; decode_image counts bytes.
DEFAULT_MAX_PIXELS = MAX_DECODED_BYTES // 3
# libjpeg's DCT scaling keeps both sides at least DRAFT_OVERSAMPLE x the target and at least DRAFT_MIN_SIDE px:
# the smallest power-of-two scale that still downsizes on the way to the target, and the final bilinear resize
# does the antialiasing; below ~100 px the DC-only 1/8 and 1/4 scales lose the recipe's features (the floor; the
# cosines are in docs/benchmarks.md, "Decoding", and tests/test_decode.py checks them).
DRAFT_OVERSAMPLE = 1.0
DRAFT_MIN_SIDE = 112
# libjpeg-turbo's fast integer IDCT and merged chroma upsampling: weighed and left off (a few % faster, pixels
# moved by 1-9 levels; docs/benchmarks.md, "Decoding"). Off, a full-size decode is Pillow's own pixels.
LIBJPEG_FAST = False

# What Image.open may identify: the formats cnnbatch reads (README), each with its Pillow plugin.
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")  # JPEG's opener also returns MPO files
_FORMAT_NAMES = "JPEG, PNG, GIF, BMP, WebP or TIFF"
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_BYTES_PER_BAND = {"I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "I": 4, "F": 4}
_ORIENTATION_TAG = 0x0112
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')

# Pillow warns about odd EXIF, palettes, truncated TIFF tags and big images on untrusted files we handle anyway.
# Filters, once, by category and module (warnings.catch_warnings per call is not thread-safe: concurrent decode
# threads restore each other's filter lists).
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)



class DecodeError(ValueError):
    """An image that cannot become model input; the message becomes the ``_errors`` row."""


def _check_limit(width: int, height: int, mode: str, scale: int, decoded: int, max_bytes: int) -> None:
    if decoded > max_bytes:
        scaled = f" at 1/{scale} scale" if scale > 1 else ""
        raise DecodeError(_over_limit(f"{width}x{height} {mode} ({_mb(decoded)} MB decoded{scaled})", max_bytes))


def _over_limit(what: str, max_bytes: int) -> str:
    return f"image is {what}, over the limit of {_mb(max_bytes)} MB per image"


def _pillow_pixels(exc: Exception) -> str:
    """What Pillow's own refusal says the image holds, in our message's terms (at least one byte per pixel)."""
    match = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = int(match.group(1)) if match else 2 * (Image.MAX_IMAGE_PIXELS or 0)
    return f"{pixels:,} pixels (at least {_mb(pixels)} MB decoded)"


def _mb(count: int) -> str:
    return f"{count / 1e6:,.1f}".removesuffix(".0")


# EXIF orientation -> the numpy transform that displays it (Pillow's ImageOps.exif_transpose, on the small array).
_ORIENTATIONS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # transposed
    6: lambda a: np.rot90(a, -1),  # rotated 90 clockwise to display
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # transversed
    8: lambda a: np.rot90(a, 1),  # rotated 90 counter-clockwise to display
}


def _orientation(read_exif: Callable[[], object], xmp: object) -> int:
    """The orientation tag's value when it is one of 2..8 (Pillow's lookup, so 6.0 counts as 6), else 1. An EXIF
    block that raises while read counts as absent; XMP's ``tiff:Orientation`` is used when EXIF has none."""
    try:
        value = read_exif()
    except Exception:  # noqa: BLE001 - unreadable EXIF is absent EXIF: the image is decoded as stored
        value = None
    if value is None and isinstance(xmp, (bytes, str)):
        match = _XMP_ORIENTATION.search(xmp.encode("utf-8", "replace") if isinstance(xmp, str) else xmp)
        value = int(match.group(2)) if match else None
    try:
        return next(key for key in _ORIENTATIONS if key == value)
    except (StopIteration, TypeError, ValueError):
        return 1


def _orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    transform = _ORIENTATIONS.get(orientation)
    return np.ascontiguousarray(transform(pixels)) if transform else pixels


def _describe(exc: BaseException) -> str:
    """One line: the message of the plain errors decoders raise for bad data, else the exception's type and message
    (``struct.error: unpack requires ...``: what broke stays visible in ``_errors``); object reprs lose their
    memory addresses, so that reruns write the same row."""
    text = str(exc).strip()
    message = _ADDRESS.sub("", text.splitlines()[0]) if text else ""
    if type(exc) in (OSError, ValueError, SyntaxError, EOFError) and message:
        return message
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return f"{name}: {message}" if message else name


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
