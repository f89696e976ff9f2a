"""Decoding: every Pillow mode to RGB, EXIF orientation, animations, the draft path, limits and clean errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cnnbatch.decode import DecodeError, decode_image, to_rgb


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def gradient(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                     np.full_like(x, 128)], axis=-1).astype(np.uint8)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("RGB", "PNG"), ("RGB", "JPEG"), ("L", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"), ("P", "PNG"),
     ("CMYK", "JPEG"), ("I;16", "PNG"), ("1", "BMP"), ("RGB", "WEBP"), ("RGB", "TIFF"), ("RGB", "GIF")],
)
def test_every_mode_decodes_to_rgb_of_the_exact_size(mode: str, fmt: str) -> None:
    if mode == "I;16":
        image = Image.fromarray(gradient(40, 30)[..., 0].astype(np.uint16) * 257)
        assert image.mode.startswith("I;16")
    else:
        image = Image.fromarray(gradient(40, 30)).convert(mode)
    pixels = decode_image(encode(image, fmt), 32)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    assert pixels.std() > 10  # content survived, not a blank frame


def test_palette_transparency_is_composited_on_white() -> None:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0] + [255, 0, 0] * 255)
    image.info["transparency"] = 0
    pixels = np.asarray(to_rgb(image))
    assert (pixels == 255).all()  # the transparent black index became white, not black


def test_rgba_transparent_pixels_become_white() -> None:
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert (np.asarray(to_rgb(image)) == 255).all()


def test_sixteen_bit_grey_keeps_its_range() -> None:
    values = np.array([[0, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    rgb = np.asarray(to_rgb(image))
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, 1].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied() -> None:
    # A landscape image whose EXIF says "rotate 90": decoded it must be portrait (left half red -> top red).
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = (255, 0, 0)
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    data = encode(image, "JPEG", exif=exif.tobytes(), quality=95)
    pixels = decode_image(data, 32)
    red_top = pixels[:8, :, 0].mean() > 200 or pixels[-8:, :, 0].mean() > 200
    red_left = pixels[:, :8, 0].mean() > 200
    assert red_top and not red_left


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_every_exif_orientation_matches_pillows_own_transpose(orientation: int, fmt: str) -> None:
    # decode_image transposes in place (no copy); the pixels must be exactly those of the copying recipe.
    from PIL import ImageOps

    image = Image.fromarray(gradient(48, 30))
    exif = image.getexif()
    exif[0x0112] = orientation
    data = encode(image, fmt, exif=exif.tobytes())
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    expected = np.asarray(expected.resize((24, 24), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(decode_image(data, 24), expected)


def test_animated_image_uses_the_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=10)
    pixels = decode_image(buffer.getvalue(), 32)
    assert pixels[..., 0].mean() > 200 and pixels[..., 2].mean() < 50


def test_large_jpeg_takes_the_draft_path_and_matches_full_decode() -> None:
    rng = np.random.default_rng(0)
    base = np.kron(rng.integers(0, 255, (30, 40, 3)), np.ones((40, 40, 1))).astype(np.uint8)  # 1200x1600
    data = encode(Image.fromarray(base), "JPEG", quality=92)
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (64, 64))
    assert image.size[0] < 1600  # libjpeg really scales in the DCT domain for this file
    fast = decode_image(data, 32, use_draft=True).astype(np.float64)
    full = decode_image(data, 32, use_draft=False).astype(np.float64)
    cosine = (fast * full).sum() / np.linalg.norm(fast) / np.linalg.norm(full)
    assert cosine > 0.999
    assert np.abs(fast - full).mean() < 6


def test_decompression_bomb_is_refused_with_its_size() -> None:
    data = encode(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(DecodeError, match="3000x3000"):
        decode_image(data, 32, max_pixels=1_000_000)


@pytest.mark.parametrize(("data", "reason"), [(b"", "empty"), (b"not an image at all", "cannot decode"),
                                              (encode(Image.new("RGB", (64, 64)), "JPEG")[:200], "cannot decode")])
def test_broken_inputs_raise_one_line_decode_errors(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason) as info:
        decode_image(data, 32)
    assert "\n" not in str(info.value)


def test_matches_keras_load_img_bilinear(tmp_path) -> None:
    """The decode of an ordinary JPEG is exactly Keras' recipe (load_img with bilinear resize)."""
    keras = pytest.importorskip("keras")
    rng = np.random.default_rng(1)
    path = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(path, quality=90)
    ours = decode_image(path.read_bytes(), 64)
    recipe = np.asarray(keras.utils.load_img(path, target_size=(64, 64), interpolation="bilinear"))
    assert np.array_equal(ours, recipe)
