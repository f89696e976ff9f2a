"""Photo-like JPEG folders for the benchmarks (cnnbatch.sample makes them), and exact-size subsets of them."""

from __future__ import annotations

from pathlib import Path

from cnnbatch.sample import IMAGENET_SIZE, MEGAPIXEL_SIZE, jpeg_bytes, photo_like
from cnnbatch.sample import write_photo_folder as write_folder

__all__ = ["IMAGENET_SIZE", "MEGAPIXEL_SIZE", "folder_subset", "jpeg_bytes", "photo_like", "write_folder"]


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


def write_small_pngs(root: Path, count: int, size: int = 48, classes: int = 4) -> Path:
    """``root/class-<k>/img-<i>.png``: small photo-like PNGs, where the model is cheap and the rest of the job shows."""
    from PIL import Image

    for index in range(count):
        path = root / f"class-{index % classes}" / f"img-{index:06d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(photo_like(size, size, 500_000 + index)).save(path)
    return root
