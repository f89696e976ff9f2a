"""P3: ``draft()`` decoding (libjpeg's DCT-domain downscaling) against a full decode + resize, in this process.

Both through cnnbatch's own ``decode_image`` (``use_draft`` on and off), one thread, JPEG bytes already in memory,
interleaved and best-of-``repeats`` so that a busy neighbour disturbs both sides alike.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cnnbatch.decode import decode_image


def decode_seconds(blobs: list[bytes], size: int, use_draft: bool) -> float:
    started = time.perf_counter()
    for blob in blobs:
        decode_image(blob, size, use_draft=use_draft)
    return time.perf_counter() - started


def draft_speedup(folder: Path, size: int, repeats: int = 3) -> dict[str, Any]:
    paths = sorted(folder.rglob("*.jpg"))
    blobs = [p.read_bytes() for p in paths]
    best = {True: float("inf"), False: float("inf")}
    for _ in range(repeats):
        for use_draft in (True, False):
            best[use_draft] = min(best[use_draft], decode_seconds(blobs, size, use_draft))
    from PIL import Image

    from cnnbatch.decode import DRAFT_OVERSAMPLE

    image = Image.open(paths[0])
    width, height = image.size
    image.draft("RGB", (size * DRAFT_OVERSAMPLE, size * DRAFT_OVERSAMPLE))  # what decode_image asks libjpeg for
    return {"image_size": size, "images": len(blobs), "source": f"{width}x{height}",
            "megapixels": round(width * height / 1e6, 2), "draft_decodes_to": "x".join(map(str, image.size)),
            "draft_images_per_second": len(blobs) / best[True], "full_images_per_second": len(blobs) / best[False],
            "ratio": best[False] / best[True]}


def single_thread_rate(folder: Path, size: int, limit: int = 300, repeats: int = 2) -> dict[str, Any]:
    """images/s of one thread decoding the ImageNet-sized folder to ``size`` (the default, draft where it can)."""
    blobs = [p.read_bytes() for p in sorted(folder.rglob("*.jpg"))[:limit]]
    seconds = min(decode_seconds(blobs, size, use_draft=True) for _ in range(repeats))
    return {"image_size": size, "images": len(blobs), "images_per_second": len(blobs) / seconds}
