"""A small, deterministic, labelled image set for the demo and the tests, generated offline.

Three texture classes (stripes, checks, dots), each leaning to its own colour family, drawn with random phases,
scales, backgrounds and noise, so that the classes are learnable from CNN features (even a seeded random
backbone's) yet no two images are alike.
"""

from __future__ import annotations

import argparse
import logging
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
