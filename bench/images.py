"""Photo-like JPEGs for the benchmarks, generated offline and deterministically.

Smooth colour fields (what most of a photo is) plus mid-frequency texture and sensor-like noise, saved as
quality-90 baseline JPEGs with 4:2:0 chroma: the decoder does the same work per pixel as on a camera JPEG, and the
files land near ImageNet's typical size (500x375, ~100 KB).
"""

from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)
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


def write_folder(root: Path, count: int, size: tuple[int, int] = IMAGENET_SIZE, classes: int = 4,
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


def folder_subset(source: Path, target: Path, count: int) -> Path:
    """A folder with exactly the first ``count`` images of ``source`` (hard links: no copies, same bytes); links
    left from an earlier, different subset are removed, so the folder holds what its name says."""
    files = sorted(p for p in source.rglob("*.jpg"))[:count]
    if len(files) < count:
        raise ValueError(f"{source} holds {len(files)} images, expected at least {count}")
    wanted = {path.relative_to(source) for path in files}
    if target.exists():
        for stale in [p for p in target.rglob("*.jpg") if p.relative_to(target) not in wanted]:
            stale.unlink()
    for path in files:
        link = target / path.relative_to(source)
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.hardlink_to(path)
    return target
