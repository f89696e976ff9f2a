"""cnnbatch.augment against Keras' own ImageDataGenerator (legacy module): the same transform parameters give the
same pixels, each parameter alone and all together, in every fill mode; views are a function of (seed, key, view)."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest

from cnnbatch.augment import (
    CLASSIC,
    FILL_MODES,
    Recipe,
    RecipeOptions,
    Transform,
    draw_transform,
    extended_indices,
    make_views,
    view_rng,
    warp,
    with_views,
)
from cnnbatch.config import add_arguments, from_namespace
from cnnbatch.sample import photo_like

IMAGE = photo_like(48, 40, seed=3)[:40, :40]  # square, photo-like: smooth fields plus texture and noise
CASES = {
    "rotation": Transform(theta=25.0),
    "height shift": Transform(tx=6.3),
    "width shift": Transform(ty=-5.1),
    "shear": Transform(shear=15.0),
    "zoom": Transform(zx=0.85, zy=1.17),
    "flip": Transform(flip_horizontal=True),
    "all together": Transform(theta=-21.0, tx=4.2, ty=-6.6, shear=11.0, zx=1.12, zy=0.9, flip_horizontal=True),
}


@pytest.fixture(scope="module")
def keras_generator():
    pytest.importorskip("scipy", reason="Keras' ImageDataGenerator needs scipy (a test dependency)")
    from cnnbatch.tfruntime import keras_module

    keras_module()
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    return lambda fill_mode: ImageDataGenerator(fill_mode=fill_mode, cval=0.0)


@pytest.mark.parametrize("fill_mode", ["nearest", "constant", "reflect"])
@pytest.mark.parametrize("case", list(CASES))
def test_warp_matches_image_data_generator(keras_generator, fill_mode: str, case: str) -> None:
    transform = CASES[case]
    reference = keras_generator(fill_mode).apply_transform(IMAGE.astype(np.float32), transform.as_keras())
    ours = warp(IMAGE, transform, fill_mode)
    assert ours.dtype == np.uint8 and ours.shape == IMAGE.shape
    difference = np.abs(ours.astype(np.float32) - reference)
    # Keras computes in float; ours rounds to uint8 once: at most one level apart, anywhere in the image.
    assert difference.max() <= 1.0, (case, fill_mode, float(difference.max()))
    assert difference.mean() < 0.6


@pytest.mark.parametrize("case", list(CASES))
def test_wrap_matches_image_data_generator_away_from_the_seams(keras_generator, case: str) -> None:
    """scipy's wrap interpolates across the seam it makes at the last pixel (coordinates past n - 1 jump back to
    0): the padded image Pillow samples reproduces it everywhere but the one-pixel band at each seam."""
    transform, image = CASES[case], photo_like(96, 96, seed=4)
    reference = keras_generator("wrap").apply_transform(image.astype(np.float32), transform.as_keras())
    difference = np.abs(warp(image, transform, "wrap").astype(np.float32) - reference)
    assert (difference <= 1.0).mean() >= 0.96, (case, float((difference <= 1.0).mean()))


def test_extended_indices_read_outside_the_image_as_scipy_does() -> None:
    assert extended_indices(6, 3, "nearest").tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 5, 5, 5, 5]
    assert extended_indices(6, 3, "reflect").tolist() == [2, 1, 0, 0, 1, 2, 3, 4, 5, 5, 4, 3]
    assert extended_indices(6, 3, "wrap").tolist() == [2, 3, 4, 0, 1, 2, 3, 4, 5, 1, 2, 3]  # period n - 1


def test_identity_and_flip_only_copy_pixels() -> None:
    assert np.array_equal(warp(IMAGE, Transform()), IMAGE)
    assert np.array_equal(warp(IMAGE, Transform(flip_horizontal=True)), IMAGE[:, ::-1])


def test_draws_follow_the_recipe_ranges() -> None:
    recipe = Recipe(rotation_range=30, width_shift_range=0.2, height_shift_range=0.1, shear_range=5,
                    zoom_range=0.25, horizontal_flip=True)
    draws = [draw_transform(recipe, 100, 50, np.random.default_rng(i)) for i in range(400)]
    assert all(abs(d.theta) <= 30 and abs(d.shear) <= 5 for d in draws)
    assert all(abs(d.tx) <= 0.1 * 100 and abs(d.ty) <= 0.2 * 50 for d in draws)  # shifts in pixels of each axis
    assert all(0.75 <= d.zx <= 1.25 and 0.75 <= d.zy <= 1.25 and d.zx != d.zy for d in draws)
    assert 0.35 < np.mean([d.flip_horizontal for d in draws]) < 0.65
    still = Recipe(0, 0, 0, 0, 0, horizontal_flip=False)
    assert all(draw_transform(still, 64, 64, np.random.default_rng(i)) == Transform() for i in range(20))


def test_views_are_a_function_of_seed_key_and_view() -> None:
    first = make_views(IMAGE, CLASSIC, 4, seed=7, key="cats/001.jpg")
    assert first.shape == (4, *IMAGE.shape) and first.dtype == np.uint8
    assert np.array_equal(first, make_views(IMAGE, CLASSIC, 4, seed=7, key="cats/001.jpg"))
    assert not np.array_equal(first, make_views(IMAGE, CLASSIC, 4, seed=8, key="cats/001.jpg"))
    assert not np.array_equal(first, make_views(IMAGE, CLASSIC, 4, seed=7, key="cats/002.jpg"))
    assert len({view.tobytes() for view in first}) == 4  # every view its own transform
    # view v does not depend on how many views are asked for
    assert np.array_equal(make_views(IMAGE, CLASSIC, 2, seed=7, key="cats/001.jpg"), first[:2])
    a, b = view_rng(1, "k", 0).random(3), view_rng(1, "k", 0).random(3)
    assert np.array_equal(a, b) and not np.array_equal(a, view_rng(1, "k", 1).random(3))


def test_with_views_puts_the_plain_image_first() -> None:
    stacked = with_views(IMAGE, CLASSIC, 3, seed=0, key="x")
    assert stacked.shape == (4, *IMAGE.shape) and np.array_equal(stacked[0], IMAGE)
    assert with_views(IMAGE, CLASSIC, 0, seed=0, key="x").shape == (1, *IMAGE.shape)
    assert with_views(IMAGE, None, 3, seed=0, key="x").shape == (1, *IMAGE.shape)


@pytest.mark.parametrize("field, value, message", [
    ("rotation_range", -1.0, "--rotation-range must be in [0, 180] degrees, got -1.0"),
    ("shear_range", 400.0, "--shear-range must be in [0, 180] degrees, got 400.0"),
    ("width_shift_range", 1.5, "--width-shift-range must be a fraction in [0, 1), got 1.5"),
    ("zoom_range", 1.0, "--zoom-range must be a fraction in [0, 1), got 1.0"),
    ("fill_mode", "mirror", "--fill-mode must be one of nearest, constant, reflect, wrap, got 'mirror'"),
])
def test_a_bad_recipe_is_refused_naming_the_flag(field: str, value, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        Recipe(**{field: value})
    assert str(raised.value) == message


def test_recipe_defaults_are_the_classic_recipe_and_round_trip() -> None:
    assert CLASSIC == Recipe(rotation_range=30, width_shift_range=0.2, height_shift_range=0.2, shear_range=0.2,
                             zoom_range=0.2, horizontal_flip=True, fill_mode="nearest")
    assert Recipe.from_dict(CLASSIC.to_dict()) == CLASSIC
    assert set(FILL_MODES) == {"nearest", "constant", "reflect", "wrap"}


@dataclasses.dataclass(frozen=True)
class _Job(RecipeOptions):
    name: str = "x"


def test_recipe_flags_parse_like_image_data_generator_arguments() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, _Job)
    given = from_namespace(_Job, parser.parse_args(
        ["--rotation-range", "10", "--shear-range", "12.5", "--no-horizontal-flip", "--fill-mode", "reflect"]))
    assert given.recipe() == Recipe(rotation_range=10, shear_range=12.5, horizontal_flip=False, fill_mode="reflect")
    plain = from_namespace(_Job, parser.parse_args([]))
    assert plain.recipe() == CLASSIC
    trained_with = Recipe(rotation_range=5, zoom_range=0.1)
    assert plain.recipe(trained_with) == trained_with  # flags left out take the base recipe's values
    assert from_namespace(_Job, parser.parse_args(["--horizontal-flip"])).recipe(Recipe(horizontal_flip=False)) \
        == Recipe()
    with pytest.raises(SystemExit):
        parser.parse_args(["--fill-mode", "mirror"])
