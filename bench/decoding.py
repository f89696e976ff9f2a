"""Decoding benchmarks, in this process, one thread, JPEG bytes already in memory.

- **D1**: cnnbatch's ``decode_image`` against the plain Keras recipe (``keras.utils.load_img(target_size,
  interpolation="bilinear")``) on the same ImageNet-sized JPEGs, and against libjpeg-turbo's bare decode at the DCT
  scale decode_image uses (the physical floor: no resize, no header walk, no EXIF). ``--levers`` adds the variants
  weighed on the way (Pillow's ``reducing_gap``, DCT scaling closer to the target, libjpeg-turbo through simplejpeg,
  the SIMD resizer, libjpeg's fast IDCT and upsampling).
- **P3**: ``draft()`` decoding (DCT-domain downscaling) against a full decode + resize of bigger photos, both through
  ``decode_image`` (``use_draft`` on and off).

Every variant runs once per round over the same images, rounds interleave the variants, and ratios are taken within
a round then the median over rounds: a busy neighbour on a shared machine disturbs every side alike.

    python -m bench.decoding --images 300 --rounds 7 --levers      # D1 at 224 and 160 px, ~1 minute
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cnnbatch.decode import decode_image

Variant = Callable[[bytes], Any]


def decode_seconds(blobs: list[bytes], size: int, use_draft: bool) -> float:
    """Seconds for decode_image over ``blobs``, on a thread other than the main one (see :func:`interleaved`)."""
    def run() -> float:
        started = time.perf_counter()
        for blob in blobs:
            decode_image(blob, size, use_draft=use_draft)
        return time.perf_counter() - started

    return on_thread(run)


def on_thread(run: Callable[[], Any]) -> Any:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="bench-decode") as pool:
        return pool.submit(run).result()


def draft_speedup(folder: Path, size: int, repeats: int = 3) -> dict[str, Any]:
    """P3: decode_image with and without DCT scaling on one folder of (big) JPEGs, best of ``repeats``."""
    from PIL import Image

    from cnnbatch.jpegfast import draft_scale

    paths = sorted(folder.rglob("*.jpg"))
    blobs = [p.read_bytes() for p in paths]
    best = {True: float("inf"), False: float("inf")}
    for _ in range(repeats):
        for use_draft in (True, False):
            best[use_draft] = min(best[use_draft], decode_seconds(blobs, size, use_draft))
    width, height = Image.open(paths[0]).size
    scale = draft_scale(width, height, size)  # what decode_image asks libjpeg for
    return {"image_size": size, "images": len(blobs), "source": f"{width}x{height}",
            "megapixels": round(width * height / 1e6, 2),
            "draft_decodes_to": f"{-(-width // scale)}x{-(-height // scale)}",
            "draft_images_per_second": len(blobs) / best[True], "full_images_per_second": len(blobs) / best[False],
            "ratio": best[False] / best[True]}


def single_thread_rate(folder: Path, size: int, limit: int = 300, repeats: int = 2) -> dict[str, Any]:
    """images/s of one thread decoding the ImageNet-sized folder to ``size`` (the default, draft where it can)."""
    blobs = [p.read_bytes() for p in sorted(folder.rglob("*.jpg"))[:limit]]
    seconds = min(decode_seconds(blobs, size, use_draft=True) for _ in range(repeats))
    return {"image_size": size, "images": len(blobs), "images_per_second": len(blobs) / seconds}


def stage_costs(folder: Path, size: int, limit: int = 1000, repeats: int = 3) -> dict[str, Any]:
    """ms per image of each stage outside the model, one thread, the cores otherwise idle: the worker's listing
    (shards.iter_records: every file checked), reading (Record.load) and decoding (decode_image); best of
    ``repeats``. What a small image costs the CPU apart from the model (in a job these run beside it)."""
    from cnnbatch.shards import iter_records, list_shards

    shard = next(iter(list_shards(str(folder), shard_size=limit)))
    best = {"list": math.inf, "read": math.inf, "decode": math.inf}
    for _ in range(repeats):
        started = time.perf_counter()
        records = list(iter_records(shard))
        listed = time.perf_counter()
        blobs = [record.load() for record in records]
        read = time.perf_counter()
        for blob in blobs:
            decode_image(blob, size)
        decoded = time.perf_counter()
        for stage, seconds in (("list", listed - started), ("read", read - listed), ("decode", decoded - read)):
            best[stage] = min(best[stage], 1000 * seconds / len(records))
    return {"images": shard.num_files, "image_size": size, "ms_per_image": best}


# --- D1 -----------------------------------------------------------------------------------------------------------

def keras_recipe(size: int) -> Variant:
    """The plain Keras recipe: load_img (Image.open -> RGB -> bilinear resize), as uint8 pixels."""
    from cnnbatch.tfruntime import keras_module

    keras = keras_module()

    def run(blob: bytes) -> np.ndarray:
        return np.asarray(keras.utils.load_img(io.BytesIO(blob), target_size=(size, size),
                                               interpolation="bilinear"))
    return run


def bare_libjpeg(size: int, scaled: bool = True, fast: bool | None = None) -> Variant:
    """libjpeg-turbo alone at decode_image's DCT scale (or at full size) and, by default, with its IDCT and
    upsampling settings: the floor under any decoder of these."""
    import simplejpeg

    from cnnbatch.decode import LIBJPEG_FAST, draft_scale

    fast = LIBJPEG_FAST if fast is None else fast

    def run(blob: bytes) -> np.ndarray:
        height, width = simplejpeg.decode_jpeg_header(blob)[:2]
        scale = draft_scale(width, height, size) if scaled else 1
        return simplejpeg.decode_jpeg(blob, min_height=-(-height // scale), min_width=-(-width // scale),
                                      fastdct=fast, fastupsample=fast)
    return run


def lever_variants(size: int) -> dict[str, Variant]:
    """The variants weighed for issue 17, each a whole decode + resize to ``size`` (no EXIF handling)."""
    from PIL import Image

    from cnnbatch.decode import _resize_array

    bilinear = Image.Resampling.BILINEAR

    def pillow(oversample: float, reducing_gap: float | None = None) -> Variant:
        def run(blob: bytes) -> np.ndarray:
            image = Image.open(io.BytesIO(blob))
            if oversample:
                wanted = math.ceil(size * oversample)
                if image.size[0] >= 2 * wanted and image.size[1] >= 2 * wanted:  # the old decoder's condition
                    image.draft("RGB", (wanted, wanted))
            return np.asarray(image.convert("RGB").resize((size, size), bilinear, reducing_gap=reducing_gap))
        return run

    def turbo(scaled: bool, resize: str, fast: bool = False) -> Variant:  # accurate libjpeg unless fast
        bare = bare_libjpeg(size, scaled, fast)

        def run(blob: bytes) -> np.ndarray:
            pixels = bare(blob)
            if resize == "pillow":
                return np.asarray(Image.fromarray(pixels).resize((size, size), bilinear))
            return _resize_array(pixels, size)
        return run

    return {
        "Pillow, draft >= 2x target (the decoder before issue 17, less EXIF)": pillow(2.0),
        "Pillow, no draft, resize reducing_gap=2": pillow(0.0, reducing_gap=2.0),
        "Pillow, draft >= 1x target": pillow(1.0),
        "libjpeg-turbo full size + Pillow resize": turbo(False, "pillow"),
        "libjpeg-turbo DCT-scaled + Pillow resize": turbo(True, "pillow"),
        "libjpeg-turbo full size + SIMD resize": turbo(False, "simd"),
        "libjpeg-turbo DCT-scaled + SIMD resize": turbo(True, "simd"),
        "libjpeg-turbo DCT-scaled, fast IDCT + merged upsampling, + SIMD resize": turbo(True, "simd", fast=True),
    }


def interleaved(variants: dict[str, Variant], blobs: list[bytes], rounds: int) -> dict[str, list[float]]:
    """Seconds per image of every variant in every round, the variants taking turns within each round, on one
    thread that is not the main one, as the worker's decode threads are: glibc's main arena hands freed memory back
    to the system at once, so there every large allocation of the next image pays its page faults again (measured
    here: 380 minor faults per 500x375 image decoded to 224 px on the main thread, under 1 on another)."""
    result: dict[str, list[float]] = on_thread(lambda: _interleaved(variants, blobs, rounds))
    return result


def _interleaved(variants: dict[str, Variant], blobs: list[bytes], rounds: int) -> dict[str, list[float]]:
    for run in variants.values():  # warm-up: imports, thread-local resizers, libjpeg tables
        for blob in blobs[:5]:
            run(blob)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            started = time.perf_counter()
            for blob in blobs:
                run(blob)
            seconds[name].append((time.perf_counter() - started) / len(blobs))
    return seconds


def d1(folder: Path, sizes: tuple[int, ...] = (224, 160), images: int = 300, rounds: int = 5,
       levers: bool = False) -> list[dict[str, Any]]:
    """D1 per target size: images/s per core of cnnbatch, the Keras recipe and bare libjpeg at the DCT scale
    used, the ratios (median over rounds of the within-round ratio), and the levers if asked."""
    from PIL import Image

    from cnnbatch.jpegfast import draft_scale

    paths = sorted(folder.rglob("*.jpg"))[:images]
    if not paths:
        raise ValueError(f"no .jpg under {folder}")
    blobs = [p.read_bytes() for p in paths]
    width, height = Image.open(paths[0]).size
    rows = []
    for size in sizes:
        variants: dict[str, Variant] = {"cnnbatch": lambda blob, s=size: decode_image(blob, s),
                                        "keras": keras_recipe(size), "libjpeg": bare_libjpeg(size)}
        extra = lever_variants(size) if levers else {}
        seconds = interleaved(variants | extra, blobs, rounds)

        def rate(name: str, seconds: dict[str, list[float]] = seconds) -> float:
            return 1.0 / statistics.median(seconds[name])

        def ratio(slow: str, fast: str, seconds: dict[str, list[float]] = seconds) -> float:
            return statistics.median(s / f for s, f in zip(seconds[slow], seconds[fast]))

        scale = draft_scale(width, height, size)
        rows.append({
            "image_size": size, "images": len(blobs), "rounds": rounds, "source": f"{width}x{height}",
            "mean_kb": round(sum(map(len, blobs)) / len(blobs) / 1e3, 1),
            "dct_scale": f"1/{scale}", "decodes_to": f"{-(-width // scale)}x{-(-height // scale)}",
            "cnnbatch_images_per_second": rate("cnnbatch"), "keras_images_per_second": rate("keras"),
            "libjpeg_images_per_second": rate("libjpeg"),
            "vs_keras": ratio("keras", "cnnbatch"), "of_libjpeg": ratio("cnnbatch", "libjpeg") ** -1,
            "levers": {name: {"images_per_second": rate(name), "vs_keras": ratio("keras", name)} for name in extra},
        })
    return rows


def format_d1(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        lines.append(f"D1 {row['images']} x {row['source']} JPEGs ({row['mean_kb']} KB) -> {row['image_size']} px, "
                     f"{row['rounds']} rounds, libjpeg DCT scale {row['dct_scale']} ({row['decodes_to']}):")
        lines.append(f"  cnnbatch {row['cnnbatch_images_per_second']:7.0f} images/s per core   "
                     f"{row['vs_keras']:.2f}x the Keras recipe, {row['of_libjpeg']:.2f} of bare libjpeg")
        lines.append(f"  keras    {row['keras_images_per_second']:7.0f} images/s per core")
        lines.append(f"  libjpeg  {row['libjpeg_images_per_second']:7.0f} images/s per core (bare decode at the scale)")
        for name, lever in row["levers"].items():
            lines.append(f"    {lever['images_per_second']:7.0f} images/s  {lever['vs_keras']:.2f}x keras  {name}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from bench.images import write_folder
    from bench.monitor import REPO

    parser = argparse.ArgumentParser(description="D1: decode + resize images/s per core against the Keras recipe")
    parser.add_argument("--work", default=str(REPO / "bench" / "results" / "work" / "jpegs"),
                        help="folder of 500x375 JPEGs (generated there if missing)")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 160])
    parser.add_argument("--levers", action="store_true", help="also the variants weighed for issue 17")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    folder = write_folder(Path(args.work), args.images)
    rows = d1(folder, tuple(args.sizes), args.images, args.rounds, args.levers)
    print(format_d1(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
