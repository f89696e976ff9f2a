"""Small, deterministic image sets for the demo, the tests and the benchmarks, generated offline.

- :func:`write_sample`: three texture classes (stripes, checks, dots), each leaning to its own colour family,
  drawn with random phases, scales, backgrounds and noise, so that the classes are learnable from CNN features
  (even a seeded random backbone's) yet no two images are alike.
- :func:`write_photo_folder`: photo-like JPEGs (smooth colour fields plus mid-frequency texture and sensor-like
  noise, quality 90, 4:2:0 chroma): the decoder does the same work per pixel as on a camera JPEG, and at
  500x375 the files land near ImageNet's typical size (~100 KB).
"""

from __future__ import annotations

import argparse
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)
CLASSES = ("checks", "dots", "stripes")
CLASS_COLOURS = {"checks": (220, 70, 40), "dots": (60, 190, 70), "stripes": (50, 90, 220)}


def texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One ``(size, size, 3)`` uint8 image of the given texture class."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(size / 10, size / 4)
    angle = rng.uniform(0, np.pi)
    u = x * np.cos(angle) + y * np.sin(angle) + rng.uniform(0, period)
    v = -x * np.sin(angle) + y * np.cos(angle) + rng.uniform(0, period)
    if kind == "stripes":
        mask = (np.floor(u / period) % 2) == 0
    elif kind == "checks":
        mask = ((np.floor(u / period) + np.floor(v / period)) % 2) == 0
    elif kind == "dots":
        cu, cv = (u % period) - period / 2, (v % period) - period / 2
        mask = cu**2 + cv**2 < (period * rng.uniform(0.2, 0.35)) ** 2
    else:
        raise ValueError(f"unknown class {kind!r}: expected one of {', '.join(CLASSES)}")
    # Each class leans to its own colour family, as real classes do (sky, grass, fur), with wide jitter; it gives
    # even a seeded random backbone's pooled features something learnable.
    foreground = np.clip(np.asarray(CLASS_COLOURS[kind], np.float64) + rng.normal(0, 25, 3), 0, 255)
    background = np.full(3, rng.uniform(0, 255))  # a neutral grey: the colour family is the foreground's
    image = np.where(mask[..., None], foreground, background)
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_sample(root: str | Path, per_class: int = 20, size: int = 96, seed: int = 0,
                 holdout_per_class: int = 0) -> Path:
    """Write ``root/train/<class>/*.jpg`` (and ``root/holdout/<class>/*`` if asked); return ``root``.

    Every fifth image is a PNG so that both decoders run. Existing files are kept (the set is deterministic).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    splits = [("train", per_class)] + ([("holdout", holdout_per_class)] if holdout_per_class else [])
    for split, count in splits:
        for label in CLASSES:
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = texture(label, size, rng)
                ext = "png" if index % 5 == 4 else "jpg"
                path = folder / f"{label}-{index:04d}.{ext}"
                if not path.exists():
                    if ext == "jpg":
                        Image.fromarray(pixels).save(path, quality=90)
                    else:
                        Image.fromarray(pixels).save(path)
    log.info("sample images under %s", root)
    return root


IMAGENET_SIZE = (500, 375)  # the most common ImageNet train image size (width, height)
MEGAPIXEL_SIZE = (2048, 1536)  # 3.1 MP: a phone photo scaled down once


def photo_like(width: int, height: int, seed: int) -> np.ndarray:
    """One ``(height, width, 3)`` uint8 image: low-frequency colour + texture + noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (max(2, height // 64), max(2, width // 64), 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32)
    mid = rng.normal(0, 1, (max(2, height // 8), max(2, width // 8), 1)).astype(np.float32)
    mid_img = Image.fromarray(np.clip(mid[..., 0] * 40 + 128, 0, 255).astype(np.uint8))
    texture = np.asarray(mid_img.resize((width, height), Image.Resampling.BILINEAR), np.float32)[..., None] - 128
    noise = rng.normal(0, 6, (height, width, 1)).astype(np.float32)
    return np.clip(base + texture + noise, 0, 255).astype(np.uint8)


def jpeg_bytes(pixels: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_photo_folder(root: Path, count: int, size: tuple[int, int] = IMAGENET_SIZE, classes: int = 4,
                 seed: int = 0, threads: int = 2) -> Path:
    """``root/class-<k>/img-<i>.jpg`` for ``i < count`` (class folders give labels, as in a real train set).

    Files already there are kept, so a bigger folder extends a smaller one and reruns are cheap.
    """
    root.mkdir(parents=True, exist_ok=True)

    def write(index: int) -> None:
        path = root / f"class-{index % classes}" / f"img-{index:06d}.jpg"
        if path.exists():
            return
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(jpeg_bytes(photo_like(size[0], size[1], seed * 1_000_003 + index)))
        tmp.rename(path)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, range(count)))
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write the demo's sample images")
    parser.add_argument("root")
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--holdout-per-class", type=int, default=15)
    parser.add_argument("--size", type=int, default=96)
    args = parser.parse_args(argv)
    write_sample(args.root, args.per_class, args.size, holdout_per_class=args.holdout_per_class)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
