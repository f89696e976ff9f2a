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
import math
import re
import struct
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import simplejpeg
from cykooz_resizer import FilterType, ImageData, PixelType, ResizeAlg, ResizeOptions, Resizer
from PIL import Image

# One limit on the memory an image may take to decode (decimal MB: 10^6 bytes). 100 MB holds an 8K RGB frame
# (7680x4320) or a 33 MP RGB PNG decoded whole, and any baseline JPEG a camera makes once DCT scaling applies.
MAX_DECODED_MB = 100
MAX_DECODED_BYTES = MAX_DECODED_MB * 1_000_000
# The same limit in 8-bit RGB pixels, for callers that size things in pixels; decode_image counts bytes.
DEFAULT_MAX_PIXELS = MAX_DECODED_BYTES // 3
# libjpeg's DCT scaling keeps both sides at least DRAFT_OVERSAMPLE x the target and at least DRAFT_MIN_SIDE px:
# the smallest power-of-two scale that still downsizes on the way to the target, and the final bilinear resize
# does the antialiasing. Measured on real photos through a seeded random VGG16 (tests/test_decode.py), each scale
# at its worst case (decoded side = target): features within cosine 0.99993 of the recipe's full decode at
# 112-224 px targets; below ~100 px the DC-only 1/8 and 1/4 scales fell to 0.9989-0.9993, hence the floor (0.99984
# at 32-96 px with it).
DRAFT_OVERSAMPLE = 1.0
DRAFT_MIN_SIDE = 112
# libjpeg-turbo's fast integer IDCT and merged (non-fancy) chroma upsampling: weighed and left off. They only change
# full-size decodes (scaled IDCTs are exact and need no upsampling) and gain ~5% each of a bare 500x375 decode
# (to 224 px, interleaved: decode_image 2% faster with the fast IDCT alone, the whole decode + resize 5-8% with
# both), but the fast IDCT moves pixels by ~1 level on average and the merged upsampling by 5-9 on chroma-rich
# 4:2:0 content. Off, a full-size decode is Pillow's own pixels (the same libjpeg-turbo, accurate IDCT, fancy
# upsampling).
LIBJPEG_FAST = False
# Bump when decoding changes what pixels reach the model: old outputs then no longer count as done.
DECODE_VERSION = (f"turbo{'-fast' if LIBJPEG_FAST else ''}-dct{DRAFT_OVERSAMPLE:g}-min{DRAFT_MIN_SIDE}"
                  "-bilinear-exif-v2")

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


# --- the JPEG fast path -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class JpegHeader:
    """What the markers before the first scan say (``jpeg_header``)."""

    width: int
    height: int
    components: int
    sof: int  # the frame marker's second byte: 0xC0 baseline, 0xC1 extended, 0xC2 progressive, ...
    precision: int
    sampling: tuple[tuple[int, int], ...]  # (horizontal, vertical) sampling factor per component
    scan_components: int  # components in the first scan: fewer than the frame's means several scans, buffered
    exif: bytes | None  # the APP1 "Exif" payload (Pillow's info["exif"]: later segments appended)
    xmp: bytes | None  # the APP1 XMP packet (Pillow's info["xmp"])

    @property
    def fast(self) -> bool:
        """Whether libjpeg-turbo decodes it straight to RGB/grey: Huffman-coded, 8-bit, 1 or 3 components."""
        return self.sof in (0xC0, 0xC1, 0xC2) and self.precision == 8 and self.components in (1, 3)

    @property
    def coefficient_bytes(self) -> int:
        """libjpeg's whole-image coefficient buffer (progressive or multi-scan files; 0 for one interleaved scan):
        64 two-byte coefficients per 8x8 block of every component, at full size whatever the DCT scaling."""
        if self.sof not in (0xC2, 0xC6, 0xCA, 0xCE) and self.scan_components >= self.components:
            return 0
        h_max = max(h for h, _ in self.sampling)
        v_max = max(v for _, v in self.sampling)
        blocks = sum(math.ceil(math.ceil(self.width * h / h_max) / 8)
                     * math.ceil(math.ceil(self.height * v / v_max) / 8) for h, v in self.sampling)
        return blocks * 128


def jpeg_header(data: bytes) -> JpegHeader | None:
    """Walk the markers of a JPEG up to its first scan; None when ``data`` is not a JPEG this walk understands
    (truncated, garbage between markers, no frame before the scan...): Pillow then decides."""
    if not data.startswith(b"\xff\xd8"):
        return None
    end, pos = len(data), 2
    exif: bytes | None = None
    xmp: bytes | None = None
    frame: tuple[int, int, int, int, int, tuple[tuple[int, int], ...]] | None = None
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers: no length
            pos += 2
            continue
        if marker in (0xD8, 0xD9):  # a second SOI, or EOI before any scan
            return None
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2 or pos + 2 + length > end:
            return None
        payload = data[pos + 4:pos + 2 + length]
        if marker == 0xE1:
            if payload.startswith(b"Exif\x00\x00"):
                exif = payload if exif is None else exif + payload[6:]
            elif payload.startswith(b"http://ns.adobe.com/xap/1.0/\x00"):
                xmp = payload.split(b"\x00", 1)[1]
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame (SOFn), not DHT/JPG/DAC
            if frame is not None or len(payload) < 6:
                return None
            components = payload[5]
            if components == 0 or len(payload) < 6 + 3 * components:
                return None
            sampling = tuple((payload[7 + 3 * i] >> 4, payload[7 + 3 * i] & 15) for i in range(components))
            if any(not (1 <= h <= 4 and 1 <= v <= 4) for h, v in sampling):
                return None
            frame = (marker, payload[0], int.from_bytes(payload[1:3], "big"), int.from_bytes(payload[3:5], "big"),
                     components, sampling)
        elif marker == 0xDA:  # start of scan: the header is over
            if frame is None or not payload:
                return None
            sof, precision, height, width, components, sampling = frame
            if not width or not height:  # height 0: defined later by a DNL marker
                return None
            return JpegHeader(width, height, components, sof, precision, sampling, payload[0], exif, xmp)
        pos += 2 + length
    return None


def draft_target(size: int) -> int:
    """The side both DCT-scaled sides keep at least, for a ``size`` px target."""
    return max(1, math.ceil(size * DRAFT_OVERSAMPLE), DRAFT_MIN_SIDE)


def draft_scale(width: int, height: int, size: int) -> int:
    """The power-of-two DCT scale (1, 2, 4, 8) both libjpeg paths decode at: Pillow's ``draft()`` rule, each side
    at least :func:`draft_target` after scaling."""
    wanted = draft_target(size)
    ratio = min(width // wanted, height // wanted)
    return next(s for s in (8, 4, 2, 1) if ratio >= s or s == 1)


def _decode_jpeg(data: bytes, size: int, max_bytes: int, use_draft: bool) -> tuple[np.ndarray, int] | None:
    header = jpeg_header(data)
    if header is None or not header.fast:
        return None
    scale = draft_scale(header.width, header.height, size) if use_draft else 1
    width, height = -(-header.width // scale), -(-header.height // scale)
    mode = "L" if header.components == 1 else "RGB"
    _check_limit(header.width, header.height, mode, scale, width * height * len(mode) + header.coefficient_bytes,
                 max_bytes)
    try:
        # min_height/min_width pick libjpeg-turbo's smallest scaling factor with sides at least these: exactly 1/scale.
        pixels = simplejpeg.decode_jpeg(data, colorspace="GRAY" if mode == "L" else "RGB", min_height=height,
                                        min_width=width, fastdct=LIBJPEG_FAST, fastupsample=LIBJPEG_FAST,
                                        buffer=_decode_buffer(width * height * len(mode)))
    except Exception:  # noqa: BLE001 - libjpeg-turbo refused (corrupt data, or a warning in strict mode): Pillow decides
        return None
    orientation = _orientation(lambda: _exif_orientation(header.exif), header.xmp)
    resized = _resize_array(pixels, size)
    return (resized.copy() if resized is pixels else resized), orientation  # never hand out the reused buffer


def _exif_orientation(exif: bytes | None) -> object:
    if not exif:
        return None
    block = Image.Exif()
    block.load(exif)
    return block.get(_ORIENTATION_TAG)


def _resizer() -> tuple[Resizer, ResizeOptions]:
    # One per thread: a Resizer holds a mutex around every resize, so sharing one would serialise decode threads.
    state: tuple[Resizer, ResizeOptions] | None = getattr(_local, "resizer", None)
    if state is None:
        options = ResizeOptions()
        options.resize_alg = ResizeAlg.convolution(FilterType.bilinear)
        state = _local.resizer = (Resizer(), options)
    return state


_local = threading.local()
# Decodes up to this size go into one buffer per thread, kept between images: a fresh 0.5 MB array per 500x375
# image costs page faults whenever the allocator has returned the previous one to the system.
REUSED_BUFFER_BYTES = 8_000_000


def _decode_buffer(nbytes: int) -> bytearray | None:
    if nbytes > REUSED_BUFFER_BYTES:
        return None
    buffer: bytearray | None = getattr(_local, "buffer", None)
    if buffer is None or len(buffer) < nbytes:
        buffer = _local.buffer = bytearray(nbytes)
    return buffer


def _resize_array(pixels: np.ndarray, size: int) -> np.ndarray:
    """``(h, w, 1 or 3)`` uint8 -> ``(size, size, 3)``: Pillow's antialiased bilinear filter, SIMD."""
    height, width, bands = pixels.shape
    if (height, width) != (size, size):
        resizer, options = _resizer()
        kind = PixelType.U8x3 if bands == 3 else PixelType.U8
        source, target = ImageData(width, height, kind, pixels.tobytes()), ImageData(size, size, kind)
        resizer.resize(source, target, options)
        pixels = np.frombuffer(target.get_buffer(), np.uint8).reshape(size, size, bands)
    return np.repeat(pixels, 3, axis=2) if bands == 1 else pixels


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


# --- shared -------------------------------------------------------------------------------------------------------

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
