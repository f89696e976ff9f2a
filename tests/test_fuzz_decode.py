"""Fuzzing the decoder: seeded, deterministic mutations of small JPEG, PNG, GIF, TIFF, WebP and BMP files and of their
EXIF blocks. Every case must come back as a ``(size, size, 3)`` uint8 array or a one-line ``DecodeError`` — never
any other exception. ``python -m bench.fuzz_decode --cases N`` runs the same engine longer; what it finds goes,
minimised, into tests/data/decode-crashers/, which ``test_recorded_crashers_decode_or_raise_decode_errors`` replays.
"""

from __future__ import annotations

import io
import random
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnbatch.decode import DecodeError, decode_image

CRASHERS = Path(__file__).parent / "data" / "decode-crashers"
SIZE = 24
# Small enough that a mutated header claiming a big image is refused before it is decoded: cases stay fast.
FUZZ_MAX_BYTES = 2_000_000


# --- seeds --------------------------------------------------------------------------------------------------------

def exif_block(orientation: int = 6, extra: bool = True, big_endian: bool = False) -> bytes:
    """A TIFF-structured EXIF block: IFD0 with Orientation and a few more tags (SHORT, ASCII, RATIONAL, LONG), and
    an Exif sub-IFD, so that the mutator finds types, counts and offsets to break."""
    end = ">" if big_endian else "<"
    entries: list[tuple[int, int, int, bytes]] = [(0x0112, 3, 1, struct.pack(end + "H", orientation) + b"\0\0")]
    if extra:
        entries += [(0x0128, 3, 1, struct.pack(end + "H", 2) + b"\0\0"),  # ResolutionUnit
                    (0x010F, 2, 4, b"Cam\0"),  # Make
                    (0x011A, 5, 1, b""),  # XResolution: RATIONAL, value placed after the IFD
                    (0x8769, 4, 1, b"")]  # ExifIFD pointer
    count = len(entries)
    ifd_size = 2 + 12 * count + 4
    data_offset = 8 + ifd_size
    out = (b"MM\x00*" if big_endian else b"II*\x00") + struct.pack(end + "I", 8) + struct.pack(end + "H", count)
    tail = b""
    for tag, kind, n, value in entries:
        if tag == 0x011A:
            value = struct.pack(end + "I", data_offset + len(tail))
            tail += struct.pack(end + "II", 72, 1)
        elif tag == 0x8769:
            value = struct.pack(end + "I", data_offset + len(tail))
            tail += struct.pack(end + "H", 1) + struct.pack(end + "HHI", 0x9003, 2, 4) + b"2026" + b"\0\0\0\0"
        out += struct.pack(end + "HHI", tag, kind, n) + value.ljust(4, b"\0")
    return b"Exif\x00\x00" + out + struct.pack(end + "I", 0) + tail


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def seed_images() -> dict[str, bytes]:
    """Small valid files of every format and several modes, most with an EXIF orientation block."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:30, 0:40]
    rgb = Image.fromarray(np.stack([x * 6, y * 8, (x + y) * 3], -1).astype(np.uint8)
                          + rng.integers(0, 20, (30, 40, 3), dtype=np.uint8))
    exif = exif_block()
    frames = [Image.new("RGB", (16, 12), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=10, loop=0)
    tiff_pages = io.BytesIO()
    rgb.save(tiff_pages, format="TIFF", save_all=True, append_images=[rgb.convert("L")], exif=exif)
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    return {
        "jpeg": _encode(rgb, "JPEG", quality=85, exif=exif),
        "jpeg-big-endian-exif": _encode(rgb, "JPEG", quality=85, exif=exif_block(8, big_endian=True)),
        "jpeg-progressive": _encode(rgb, "JPEG", quality=85, progressive=True, exif=exif),
        "jpeg-grey": _encode(rgb.convert("L"), "JPEG", quality=85),
        "jpeg-444": _encode(rgb, "JPEG", quality=95, subsampling=0),
        "jpeg-cmyk": _encode(rgb.convert("CMYK"), "JPEG", quality=85),
        "png": _encode(rgb, "PNG", exif=exif),
        "png-palette-transparent": _encode(palette, "PNG"),
        "png-16bit": _encode(Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257), "PNG"),
        "png-rgba": _encode(rgb.convert("RGBA"), "PNG"),
        "gif-animated": gif.getvalue(),
        "tiff": _encode(rgb, "TIFF", exif=exif),
        "tiff-pages": tiff_pages.getvalue(),
        "tiff-deflate": _encode(rgb, "TIFF", compression="tiff_adobe_deflate"),
        "webp": _encode(rgb, "WEBP", quality=80, exif=exif),
        "webp-lossless": _encode(rgb.convert("RGBA"), "WEBP", lossless=True),
        "bmp": _encode(rgb, "BMP"),
    }


# --- mutations ----------------------------------------------------------------------------------------------------

INTERESTING_16 = (0, 1, 2, 3, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF)
INTERESTING_32 = (0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x10000, 0xFFFF)


def _jpeg_segments(data: bytes) -> list[tuple[int, int]]:
    """(offset of the marker, length field) of each segment before the first scan."""
    out, pos = [], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker in (0xD8, 0xD9) or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        out.append((pos, length))
        if marker == 0xDA or length < 2:
            break
        pos += 2 + length
    return out


def _png_chunks(data: bytes) -> list[tuple[int, int]]:
    """(offset of the length field, length) of each PNG chunk."""
    out, pos = [], 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        out.append((pos, length))
        pos += 12 + length
    return out


def _tiff_ifds(data: bytes) -> list[tuple[int, str]]:
    """(offset of the entry count, byte order) of every TIFF-structured IFD0 found (EXIF blocks, TIFF files)."""
    found = []
    for magic, order in ((b"II*\x00", "<"), (b"MM\x00*", ">")):
        start = data.find(magic)
        while start != -1 and start + 8 <= len(data):
            offset = struct.unpack(order + "I", data[start + 4:start + 8])[0]
            if start + offset + 2 <= len(data):
                found.append((start, order))
            start = data.find(magic, start + 1)
    return found


def mutate_bits(data: bytearray, rng: random.Random) -> None:
    for _ in range(rng.randint(1, 8)):
        index = rng.randrange(len(data))
        data[index] ^= 1 << rng.randrange(8)


def mutate_bytes(data: bytearray, rng: random.Random) -> None:
    # Headers hold what matters: bias towards the first few hundred bytes.
    for _ in range(rng.randint(1, 4)):
        index = rng.randrange(min(len(data), 400) if rng.random() < 0.7 else len(data))
        data[index] = rng.choice((0, 1, 0x7F, 0x80, 0xFE, 0xFF, rng.randrange(256)))


def mutate_truncate(data: bytearray, rng: random.Random) -> None:
    if len(data) > 1:
        del data[rng.randrange(1, len(data)):]


def mutate_splice(data: bytearray, rng: random.Random) -> None:
    start = rng.randrange(len(data))
    length = rng.randint(1, 64)
    choice = rng.random()
    if choice < 0.4:
        del data[start:start + length]
    elif choice < 0.7:
        data[start:start] = data[start:start + length]  # duplicate a run (segments, chunks, entries)
    else:
        data[start:start] = bytes(rng.randrange(256) for _ in range(length))


def mutate_lengths(data: bytearray, rng: random.Random) -> None:
    """Length and size fields of the container: JPEG segment lengths and frame sizes, PNG chunk lengths and
    IHDR, GIF screen and frame sizes, RIFF/WebP chunk sizes and canvas, BMP header sizes."""
    raw = bytes(data)
    if raw.startswith(b"\xff\xd8"):
        segments = _jpeg_segments(raw)
        if not segments:
            return
        pos, length = rng.choice(segments)
        if rng.random() < 0.5 or data[pos + 1] not in range(0xC0, 0xD0):
            value = rng.choice((*INTERESTING_16, length + 1, max(length - 1, 0))) & 0xFFFF
            data[pos + 2:pos + 4] = value.to_bytes(2, "big")
        else:  # a frame's height, width or component count
            field = rng.choice((5, 7, 9))
            width = 1 if field == 9 else 2
            value = rng.choice(INTERESTING_16) & (0xFF if width == 1 else 0xFFFF)
            data[pos + field:pos + field + width] = value.to_bytes(width, "big")
    elif raw.startswith(b"\x89PNG"):
        chunks = _png_chunks(raw)
        if not chunks:
            return
        pos, length = rng.choice(chunks)
        if raw[pos + 4:pos + 8] == b"IHDR" and rng.random() < 0.6:
            field = pos + 8 + rng.choice((0, 4))
            data[field:field + 4] = rng.choice(INTERESTING_32).to_bytes(4, "big")
        else:
            value = rng.choice((*INTERESTING_32, length + 1, max(length - 1, 0))) & 0xFFFFFFFF
            data[pos:pos + 4] = value.to_bytes(4, "big")
    elif raw.startswith(b"GIF"):
        field = rng.choice((6, 8) + tuple(i + 5 for i in range(len(raw) - 9) if raw[i] == 0x2C)[:6])
        data[field:field + 2] = rng.choice(INTERESTING_16).to_bytes(2, "little")
    elif raw.startswith(b"RIFF"):
        positions = [4] + [i + 4 for i in range(12, len(raw) - 8) if raw[i:i + 3] in (b"VP8", b"EXI", b"ALP")]
        field = rng.choice(positions)
        data[field:field + 4] = rng.choice(INTERESTING_32).to_bytes(4, "little")
        if raw[12:16] == b"VP8X" and rng.random() < 0.3:  # the canvas size, 24-bit fields
            data[24:30] = bytes(rng.choice((0, 0xFF)) for _ in range(6))
    elif raw.startswith(b"BM"):
        field = rng.choice((2, 10, 14, 18, 22, 28, 30, 34, 46))
        data[field:field + 4] = rng.choice(INTERESTING_32).to_bytes(4, "little")
    else:
        mutate_ifd(data, rng)


def mutate_ifd(data: bytearray, rng: random.Random) -> None:
    """A TIFF-structured directory (an EXIF block, or a TIFF file itself): entry count, tag ids, types, counts,
    values and offsets — the malformed-EXIF shapes (an ASCII value in a SHORT tag...) that broke Pillow."""
    ifds = _tiff_ifds(bytes(data))
    if not ifds:
        mutate_bytes(data, rng)
        return
    start, order = rng.choice(ifds)
    first = start + struct.unpack(order + "I", bytes(data[start + 4:start + 8]))[0]
    if first + 2 > len(data):
        return
    entries = struct.unpack(order + "H", bytes(data[first:first + 2]))[0]
    if entries == 0 or rng.random() < 0.1:
        data[first:first + 2] = struct.pack(order + "H", rng.choice(INTERESTING_16))
        return
    entry = first + 2 + 12 * rng.randrange(min(entries, 64))
    if entry + 12 > len(data):
        return
    what = rng.random()
    if what < 0.35:  # the type: ASCII in a SHORT tag, RATIONAL in a LONG one, unknown types...
        data[entry + 2:entry + 4] = struct.pack(order + "H", rng.randrange(0, 14))
    elif what < 0.55:  # the count
        data[entry + 4:entry + 8] = struct.pack(order + "I", rng.choice(INTERESTING_32 + (2, 3, 4, 5)))
    elif what < 0.75:  # the value or offset
        data[entry + 8:entry + 12] = struct.pack(order + "I", rng.choice(INTERESTING_32 + (rng.randrange(256),)))
    elif what < 0.9:  # the tag: orientation, or tags Pillow knows the type of
        data[entry:entry + 2] = struct.pack(order + "H", rng.choice((0x0112, 0x0128, 0x011A, 0x8769, 0x8825,
                                                                      0xA005, 0x0100, 0x0101, 0x0102, 0x0103)))
    else:  # the next-IFD offset of the chain
        after = first + 2 + 12 * entries
        if after + 4 <= len(data):
            data[after:after + 4] = struct.pack(order + "I", rng.choice((8, first - start, 0xFFFFFFFF, 1)))


MUTATORS: tuple[Callable[[bytearray, random.Random], None], ...] = (
    mutate_bits, mutate_bytes, mutate_truncate, mutate_splice, mutate_lengths, mutate_ifd, mutate_ifd)


def mutated_cases(count: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """``count`` deterministic (name, bytes) cases: a seed image and one to three mutations of it."""
    seeds = seed_images()
    names = sorted(seeds)
    cases = []
    for index in range(count):
        rng = random.Random(seed * 1_000_003 + index)
        name = names[index % len(names)]
        data = bytearray(seeds[name])
        steps = []
        for _ in range(rng.choice((1, 1, 2, 3))):
            if not data:
                break
            mutator = rng.choice(MUTATORS)
            mutator(data, rng)
            steps.append(mutator.__name__.removeprefix("mutate_"))
        cases.append((f"{name}/{'+'.join(steps)}/{seed}-{index}", bytes(data)))
    return cases


def check_case(data: bytes, max_bytes: int = FUZZ_MAX_BYTES) -> str:
    """'ok' or 'DecodeError'; raises AssertionError for anything else a decoder contract forbids."""
    try:
        pixels = decode_image(data, SIZE, max_bytes=max_bytes)
    except DecodeError as exc:
        message = str(exc)
        assert message and "\n" not in message, f"expected a one-line DecodeError message, got {message!r}"
        return "DecodeError"
    assert isinstance(pixels, np.ndarray), f"expected a numpy array, got {type(pixels)}"
    assert pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == np.uint8, \
        f"expected uint8 ({SIZE}, {SIZE}, 3), got {pixels.dtype} {pixels.shape}"
    return "ok"


# --- tests --------------------------------------------------------------------------------------------------------

def test_every_seed_decodes() -> None:
    """The seeds are valid images of what they say: the fuzz starts from files the decoder takes."""
    for name, data in seed_images().items():
        assert check_case(data) == "ok", f"seed {name} should decode"


def test_mutated_images_decode_or_raise_decode_errors() -> None:
    outcomes: dict[str, int] = {}
    failures = []
    for name, data in mutated_cases(5000, seed=0):
        try:
            outcome = check_case(data)
        except Exception as exc:  # noqa: BLE001 - collect every violation before failing
            failures.append(f"{name}: {type(exc).__module__}.{type(exc).__name__}: {exc}")
            continue
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert not failures, f"{len(failures)} cases escaped as something else than an array or DecodeError:\n" + \
        "\n".join(failures[:20])
    # The fuzz must exercise both outcomes substantially, else it tests nothing.
    assert outcomes.get("ok", 0) > 300 and outcomes.get("DecodeError", 0) > 300, outcomes


def test_mutations_are_deterministic() -> None:
    assert mutated_cases(50, seed=3) == mutated_cases(50, seed=3)
    assert mutated_cases(50, seed=3) != mutated_cases(50, seed=4)


def _crashers() -> list[Path]:
    return sorted(p for p in CRASHERS.glob("*") if p.suffix in (".jpg", ".png", ".gif", ".tif", ".webp", ".bmp",
                                                                 ".bin"))


def test_the_crasher_corpus_is_there() -> None:
    assert len(_crashers()) >= 3, f"expected the recorded crashers under {CRASHERS}"


@pytest.mark.parametrize("path", _crashers(), ids=lambda p: p.name)
def test_recorded_crashers_decode_or_raise_decode_errors(path: Path) -> None:
    """Inputs that once escaped as something else than a DecodeError (README of the folder says what each did)."""
    for max_bytes in (FUZZ_MAX_BYTES, 100_000_000):
        check_case(path.read_bytes(), max_bytes)
