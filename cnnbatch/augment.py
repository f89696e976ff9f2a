"""The classic transfer-learning recipe's random views: rotation, shift, shear, zoom and flip, as Keras'
``ImageDataGenerator`` reads its arguments (its legacy module is the reference for what they mean).

Each view's transform is drawn from a generator seeded by (seed, key, view index), so the same image gives the
same views on any node, after any crash and rerun. It is applied to the decoded uint8 image as one affine warp
(rotation, shift, shear and zoom composed about the centre, as ``ImageDataGenerator.apply_transform`` composes
them), then the flip: OpenCV's SIMD bilinear warp for nearest, reflect and constant, Pillow's bilinear affine
transform on the image padded as scipy's ``wrap`` reads it; both release the GIL and run on the decode threads,
at a fraction of the model's cost per view.

Shear is in degrees, as ``ImageDataGenerator`` reads ``shear_range`` (``keras.layers.RandomShear`` takes a
fraction instead). The fill modes read outside the image exactly as scipy.ndimage (which ImageDataGenerator calls)
does: ``nearest`` repeats the edge, ``reflect`` mirrors about the edge (d c b a | a b c d), ``wrap`` repeats with
period n - 1 (scipy's ``wrap``, not ``grid-wrap``), ``constant`` is ``cval`` wherever the sampled point falls
outside the image (no blending across the edge).
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from .config import option

FILL_MODES = ("nearest", "constant", "reflect", "wrap")
# Bump when the views' pixels change for the same recipe and seed: recorded with them (an output's fingerprint).
VIEWS_VERSION = "opencv-pillow-bilinear-v1"
# The fill modes OpenCV's borders give as scipy reads them (scipy's wrap has period n - 1: Pillow on a padded image)
CV2_BORDERS = {"nearest": "BORDER_REPLICATE", "reflect": "BORDER_REFLECT", "constant": "BORDER_REPLICATE"}
RECIPE_GROUP = "augmentation recipe (Keras ImageDataGenerator's arguments)"
RECIPE_FLAGS = ("rotation_range", "width_shift_range", "height_shift_range", "shear_range", "zoom_range",
                "horizontal_flip", "fill_mode")


@dataclass(frozen=True)
class Recipe:
    """ImageDataGenerator's augmentation arguments; the defaults are the classic transfer-learning recipe."""

    rotation_range: float = 30.0  # degrees, drawn from [-r, r]
    width_shift_range: float = 0.2  # fraction of the width, drawn from [-w, w]
    height_shift_range: float = 0.2  # fraction of the height
    shear_range: float = 0.2  # degrees, drawn from [-s, s]
    zoom_range: float = 0.2  # scale drawn from [1 - z, 1 + z] per axis
    horizontal_flip: bool = True  # half of the views are mirrored
    fill_mode: str = "nearest"  # what the warp reads outside the image
    cval: float = 0.0  # the value outside the image for fill_mode "constant"

    def __post_init__(self) -> None:
        for name in ("rotation_range", "shear_range"):
            value = getattr(self, name)
            if not (0 <= value <= 180):
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 180] degrees, got {value}")
        for name in ("width_shift_range", "height_shift_range", "zoom_range"):
            value = getattr(self, name)
            if not (0 <= value < 1):
                raise ValueError(f"--{name.replace('_', '-')} must be a fraction in [0, 1), got {value}")
        if self.fill_mode not in FILL_MODES:
            raise ValueError(f"--fill-mode must be one of {', '.join(FILL_MODES)}, got {self.fill_mode!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)


CLASSIC = Recipe()


@dataclass(frozen=True)
class Transform:
    """One view's parameters, with ImageDataGenerator.get_random_transform's names and meanings."""

    theta: float = 0.0  # rotation, degrees
    tx: float = 0.0  # shift drawn from height_shift_range, in pixels
    ty: float = 0.0  # shift drawn from width_shift_range, in pixels
    shear: float = 0.0  # degrees
    zx: float = 1.0
    zy: float = 1.0
    flip_horizontal: bool = False

    def as_keras(self) -> dict[str, Any]:
        """The dict ``ImageDataGenerator.apply_transform`` takes."""
        return {"theta": self.theta, "tx": self.tx, "ty": self.ty, "shear": self.shear, "zx": self.zx,
                "zy": self.zy, "flip_horizontal": self.flip_horizontal}


def view_rng(seed: int, key: str, view: int) -> np.random.Generator:
    """The generator of one view: a function of (seed, key, view) only, the same on every node and rerun."""
    digest = hashlib.blake2b(key.encode(), digest_size=16, person=b"cnnbatch-views").digest()
    words = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, *words, view]))


def draw_transform(recipe: Recipe, height: int, width: int, rng: np.random.Generator) -> Transform:
    """One view's parameters, drawn in ImageDataGenerator.get_random_transform's order."""
    theta = rng.uniform(-recipe.rotation_range, recipe.rotation_range) if recipe.rotation_range else 0.0
    tx = rng.uniform(-recipe.height_shift_range, recipe.height_shift_range) * height \
        if recipe.height_shift_range else 0.0
    ty = rng.uniform(-recipe.width_shift_range, recipe.width_shift_range) * width \
        if recipe.width_shift_range else 0.0
    shear = rng.uniform(-recipe.shear_range, recipe.shear_range) if recipe.shear_range else 0.0
    if recipe.zoom_range:
        zx, zy = rng.uniform(1 - recipe.zoom_range, 1 + recipe.zoom_range, 2)
    else:
        zx, zy = 1.0, 1.0
    flip = bool(rng.random() < 0.5) and recipe.horizontal_flip
    return Transform(float(theta), float(tx), float(ty), float(shear), float(zx), float(zy), flip)


def index_matrix(transform: Transform, height: int, width: int) -> np.ndarray:
    """The 3x3 matrix mapping an output pixel's (row, col) index to the input's, as ImageDataGenerator builds it:
    rotation @ shift @ shear @ zoom about the image centre, in its (x, y) order swapped to numpy's (row, col)."""
    matrix = np.eye(3)
    if transform.theta:
        theta = np.deg2rad(transform.theta)
        matrix = matrix @ np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0],
                                    [0, 0, 1]])
    if transform.tx or transform.ty:
        matrix = matrix @ np.array([[1, 0, transform.tx], [0, 1, transform.ty], [0, 0, 1]])
    if transform.shear:
        shear = np.deg2rad(transform.shear)
        matrix = matrix @ np.array([[1, -np.sin(shear), 0], [0, np.cos(shear), 0], [0, 0, 1]])
    if transform.zx != 1 or transform.zy != 1:
        matrix = matrix @ np.array([[transform.zx, 0, 0], [0, transform.zy, 0], [0, 0, 1]])
    o_x, o_y = height / 2 - 0.5, width / 2 - 0.5
    matrix = np.array([[1, 0, o_x], [0, 1, o_y], [0, 0, 1]]) @ matrix @ np.array([[1, 0, -o_x], [0, 1, -o_y],
                                                                                  [0, 0, 1]])
    swap = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]])
    return swap @ matrix @ swap


def extended_indices(length: int, margin: int, fill_mode: str, after: int | None = None) -> np.ndarray:
    """For each of ``margin + length + after`` padded positions (``after`` defaults to ``margin``), the image index
    scipy.ndimage reads there."""
    index = np.arange(-margin, length + (margin if after is None else after))
    if fill_mode == "reflect":  # half-sample symmetric: -1 -> 0, n -> n - 1
        period = 2 * length
        folded = np.mod(index, period)
        return np.where(folded < length, folded, period - 1 - folded)
    if fill_mode == "wrap" and length > 1:  # scipy's wrap: period n - 1 outside the image, the image as it is
        return np.where((index < 0) | (index > length - 1), np.mod(index, length - 1), index)
    return np.clip(index, 0, length - 1)  # nearest, and constant (its outside is masked after the warp)


def reach(matrix: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
    """How far outside the image (top, bottom, left, right, in pixels) a warp reads: the input index of each
    output corner bounds it, plus two for the bilinear neighbours."""
    corners = np.array([[r, c, 1.0] for r in (0, height - 1) for c in (0, width - 1)]) @ matrix.T
    top, left = (int(math.ceil(max(0.0, -corners[:, axis].min()))) + 2 for axis in (0, 1))
    bottom = int(math.ceil(max(0.0, corners[:, 0].max() - (height - 1)))) + 2
    right = int(math.ceil(max(0.0, corners[:, 1].max() - (width - 1)))) + 2
    return top, bottom, left, right


def padded_image(pixels: np.ndarray, margins: tuple[int, int, int, int], fill_mode: str) -> Image.Image:
    """The image with ``margins`` (top, bottom, left, right) filled as the fill mode reads outside it (two 1-D
    takes: several times cheaper than one 2-D gather), as a Pillow image."""
    top, bottom, left, right = margins
    height, width = pixels.shape[:2]
    rows = extended_indices(height, top, fill_mode, bottom)
    cols = extended_indices(width, left, fill_mode, right)
    return Image.fromarray(np.ascontiguousarray(np.take(np.take(pixels, rows, axis=0), cols, axis=1)))


@functools.cache
def _cv2() -> Any:
    import cv2

    cv2.setNumThreads(1)  # views are made on the decode threads already: no thread pool of its own
    return cv2


def _is_identity(matrix: np.ndarray) -> bool:
    """``np.allclose(matrix, eye(3))`` (its default tolerances), without its overhead: once per view."""
    return bool((np.abs(matrix - _EYE) <= 1e-8 + 1e-5 * _EYE).all())


_EYE = np.eye(3)


def warp(pixels: np.ndarray, transform: Transform, fill_mode: str = "nearest", cval: float = 0.0,
         padded: tuple[Image.Image, tuple[int, int, int, int]] | None = None) -> np.ndarray:
    """``(H, W, 3)`` uint8 -> the same shape: the affine warp (bilinear), then the horizontal flip. ``padded``:
    the image already padded (by at least this warp's reach) and its margins, shared by a record's views (the
    ``wrap`` path; the other fill modes are OpenCV's borders and need no padding)."""
    height, width = pixels.shape[:2]
    out = pixels
    matrix = index_matrix(transform, height, width)
    identity = _is_identity(matrix)
    if not identity and fill_mode in CV2_BORDERS:
        # OpenCV's SIMD warp (src = M @ dst in (x = col, y = row), bilinear): scipy's nearest/reflect are its
        # replicate/reflect borders; constant blends across the edge there, so the outside is masked after.
        cv2 = _cv2()
        (a_rr, a_rc, o_r), (a_cr, a_cc, o_c) = matrix[0], matrix[1]
        forward = np.array([[a_cc, a_cr, o_c], [a_rc, a_rr, o_r]], dtype=np.float64)
        out = cv2.warpAffine(np.ascontiguousarray(pixels), forward, (width, height),
                             flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                             borderMode=getattr(cv2, CV2_BORDERS[fill_mode]), borderValue=0)
        if fill_mode == "constant":
            out = _mask_outside(out, matrix, cval)
    elif not identity:
        if padded is None:
            margins = reach(matrix, height, width)
            padded = (padded_image(pixels, margins, fill_mode), margins)
        image, (top, _, left, _) = padded
        # Pillow maps output pixel centres (x + 0.5, y + 0.5) to input coordinates, x = column: convert the index
        # matrix (row, col) into that convention, shifted by the margins.
        (a_rr, a_rc, o_r), (a_cr, a_cc, o_c) = matrix[0], matrix[1]
        coefficients = (a_cc, a_cr, o_c + 0.5 - 0.5 * (a_cc + a_cr) + left,
                        a_rc, a_rr, o_r + 0.5 - 0.5 * (a_rc + a_rr) + top)
        warped = image.transform((width, height), Image.Transform.AFFINE, coefficients,
                                 resample=Image.Resampling.BILINEAR)
        out = np.asarray(warped, dtype=np.uint8)
        if fill_mode == "constant":
            out = _mask_outside(out, matrix, cval)
    if transform.flip_horizontal:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def _mask_outside(out: np.ndarray, matrix: np.ndarray, cval: float) -> np.ndarray:
    """``cval`` where the sampled input point lies outside the image, as scipy's ``constant`` mode has it."""
    height, width = out.shape[:2]
    r, c = np.mgrid[0:height, 0:width].astype(np.float64)
    r_in = matrix[0, 0] * r + matrix[0, 1] * c + matrix[0, 2]
    c_in = matrix[1, 0] * r + matrix[1, 1] * c + matrix[1, 2]
    eps = 1e-9
    outside = (r_in < -eps) | (r_in > height - 1 + eps) | (c_in < -eps) | (c_in > width - 1 + eps)
    if outside.any():
        out = out.copy()
        out[outside] = max(0, min(255, int(round(cval))))
    return out


def make_views(pixels: np.ndarray, recipe: Recipe, views: int, seed: int, key: str) -> np.ndarray:
    """``(views, H, W, 3)`` uint8: the record's augmented views, view ``v`` drawn from ``view_rng(seed, key, v)``."""
    height, width = pixels.shape[:2]
    transforms = [draw_transform(recipe, height, width, view_rng(seed, key, view)) for view in range(views)]
    padded = None  # OpenCV reads outside the image itself
    if recipe.fill_mode not in CV2_BORDERS:  # Pillow: one padded image for all of the record's views
        reaches = [reach(index_matrix(t, height, width), height, width) for t in transforms]
        margins = (max(r[0] for r in reaches), max(r[1] for r in reaches), max(r[2] for r in reaches),
                   max(r[3] for r in reaches))
        padded = (padded_image(pixels, margins, recipe.fill_mode), margins)
    out = np.empty((views, *pixels.shape), dtype=np.uint8)
    for view, transform in enumerate(transforms):
        out[view] = warp(pixels, transform, recipe.fill_mode, recipe.cval, padded)
    return out


def with_views(pixels: np.ndarray, recipe: Recipe | None, views: int, seed: int, key: str) -> np.ndarray:
    """The plain image followed by its ``views`` augmented views: ``(1 + views, H, W, 3)`` uint8."""
    if not views or recipe is None:
        return pixels[np.newaxis]
    return np.concatenate([pixels[np.newaxis], make_views(pixels, recipe, views, seed, key)])


@dataclass(frozen=True, kw_only=True)
class RecipeOptions:
    """The recipe's flags, shared by every job that makes views (extract, predict --tta, finetune). A flag left
    out is None and takes its value from a base recipe: the classic one, or what a model was trained with."""

    rotation_range: float | None = option("rotation in degrees, drawn from [-r, r] (default 30)", None,
                                          metavar="DEG", group=RECIPE_GROUP)
    width_shift_range: float | None = option("horizontal shift, a fraction of the width (default 0.2)", None,
                                             metavar="F", group=RECIPE_GROUP)
    height_shift_range: float | None = option("vertical shift, a fraction of the height (default 0.2)", None,
                                              metavar="F", group=RECIPE_GROUP)
    shear_range: float | None = option("shear in degrees, as ImageDataGenerator reads it (default 0.2)", None,
                                       metavar="DEG", group=RECIPE_GROUP)
    zoom_range: float | None = option("zoom: each axis scaled by a factor drawn from [1 - z, 1 + z] (default 0.2)",
                                      None, metavar="Z", group=RECIPE_GROUP)
    horizontal_flip: bool | None = option("mirror half of the views (default on)", None, group=RECIPE_GROUP)
    fill_mode: str | None = option("what the warp reads outside the image (default nearest)", None,
                                   choices=FILL_MODES, group=RECIPE_GROUP)

    def recipe(self, base: Recipe = CLASSIC) -> Recipe:
        """``base`` with every flag that was given in place of its value (validated)."""
        given = {name: getattr(self, name) for name in RECIPE_FLAGS if getattr(self, name) is not None}
        return replace(base, **given)

    def check_recipe(self) -> None:
        self.recipe()  # raises ValueError naming the flag and the value received
