"""The generated image sets: deterministic, one folder per class, every fifth image a PNG, photo-like JPEGs."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnbatch.sample import CLASSES, jpeg_bytes, main, photo_like, texture, write_photo_folder, write_sample


def digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_sample_has_class_folders_both_formats_and_a_holdout(tmp_path: Path) -> None:
    root = write_sample(tmp_path / "s", per_class=5, size=24, holdout_per_class=2)
    files = digests(root)
    assert len(files) == 3 * 5 + 3 * 2
    for label in CLASSES:
        names = sorted(p.name for p in (root / "train" / label).iterdir())
        assert names == [f"{label}-{i:04d}.{'png' if i == 4 else 'jpg'}" for i in range(5)]
        assert len(list((root / "holdout" / label).iterdir())) == 2
    with Image.open(root / "train" / "dots" / "dots-0004.png") as png:
        assert png.format == "PNG" and png.size == (24, 24) and png.mode == "RGB"
    with Image.open(root / "train" / "dots" / "dots-0000.jpg") as jpg:
        assert jpg.format == "JPEG"


def test_the_sample_is_deterministic_and_keeps_existing_files(tmp_path: Path) -> None:
    first = digests(write_sample(tmp_path / "a", per_class=3, size=16))
    assert digests(write_sample(tmp_path / "b", per_class=3, size=16)) == first
    assert digests(write_sample(tmp_path / "c", per_class=3, size=16, seed=1)) != first
    kept = tmp_path / "a" / "train" / "checks" / "checks-0000.jpg"
    kept.write_bytes(b"mine")
    write_sample(tmp_path / "a", per_class=3, size=16)
    assert kept.read_bytes() == b"mine"


def test_textures_lean_to_their_class_colour() -> None:
    rng = np.random.default_rng(0)
    for label, channel in (("checks", 0), ("dots", 1), ("stripes", 2)):  # red, green, blue families
        images = np.stack([texture(label, 32, rng) for _ in range(10)])
        assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8
        assert int(np.argmax(images.reshape(-1, 3).mean(axis=0))) == channel, label
    with pytest.raises(ValueError, match="unknown class 'zigzag': expected one of checks, dots, stripes"):
        texture("zigzag", 8, rng)


def test_photo_folders_are_jpegs_of_the_asked_size_extended_not_rewritten(tmp_path: Path) -> None:
    root = write_photo_folder(tmp_path / "p", 6, size=(40, 30), classes=2)
    files = digests(root)
    assert sorted(files) == [f"class-{i % 2}/img-{i:06d}.jpg" for i in sorted(range(6), key=lambda i: (i % 2, i))]
    with Image.open(root / "class-0" / "img-000000.jpg") as photo:
        assert photo.format == "JPEG" and photo.size == (40, 30)
    bigger = digests(write_photo_folder(tmp_path / "p", 8, size=(40, 30), classes=2))
    assert {k: v for k, v in bigger.items() if k in files} == files and len(bigger) == 8


def test_photo_like_pixels_and_jpeg_bytes() -> None:
    pixels = photo_like(50, 20, seed=3)
    assert pixels.shape == (20, 50, 3) and pixels.dtype == np.uint8 and pixels.std() > 10
    assert np.array_equal(photo_like(50, 20, seed=3), pixels)
    data = jpeg_bytes(pixels, quality=80)
    assert data[:2] == b"\xff\xd8"
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (50, 20)


def test_the_command_writes_the_demo_sample(tmp_path: Path) -> None:
    assert main([str(tmp_path / "s"), "--per-class", "2", "--holdout-per-class", "1", "--size", "16"]) == 0
    assert len(digests(tmp_path / "s")) == 3 * 2 + 3 * 1
