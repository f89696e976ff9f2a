"""The decoder's JPEG fast path: our own walk over the markers (size, EXIF, XMP, scan layout), libjpeg-turbo
(``simplejpeg``) decoding straight into numpy with power-of-two DCT scaling, and a SIMD resize with Pillow's
bilinear filter (``cykooz_resizer``). decode.py falls back to Pillow for anything this path does not take."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
import simplejpeg
from cykooz_resizer import FilterType, ImageData, PixelType, ResizeAlg, ResizeOptions, Resizer
from PIL import Image

from .decoderules import (
    _ORIENTATION_TAG,
    DRAFT_MIN_SIDE,
    DRAFT_OVERSAMPLE,
    LIBJPEG_FAST,
    _check_limit,
    _orientation,
)


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

