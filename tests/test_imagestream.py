"""imagestream: the held-out split is train's rule on the same keys, labels must match the model's classes, and the
epoch streams give every image once per pass, views drawn afresh per epoch and the same on a rerun. No Ray."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from cnnbatch.augment import CLASSIC
from cnnbatch.head import VALIDATION, encode_labels, key_hashes, stratified_split
from cnnbatch.imagestream import DecodedImages, ImageSetError, ImageStream, check_labels, split_images
from cnnbatch.sample import write_sample
from cnnbatch.shards import iter_records, list_shards

LABELS = ("checks", "dots", "stripes")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = write_sample(tmp_path_factory.mktemp("stream"), per_class=7, size=40) / "train"
    (root / "dots" / "broken.jpg").write_bytes(b"not an image")  # labelled, undecodable: left out of the fit
    return root


def test_the_split_is_trains_rule_on_the_same_keys(images: Path) -> None:
    split = split_images(str(images), 5, LABELS, seed=3, validation_split=0.25)
    keys, labels = [], []
    for shard in list_shards(str(images), 5):
        for record in iter_records(shard):
            keys.append(record.key)
            labels.append(record.label)
    _, classes = encode_labels(labels)
    expected = {key for key, where in zip(keys, stratified_split(classes, key_hashes(keys, 3), 0.25))
                if where == VALIDATION}
    assert split.validation_keys == expected
    assert split.validation_counts == (2, 2, 2) and split.train_counts == (5, 6, 5) and split.unlabelled == 0
    assert split_images(str(images), 1000, LABELS, 3, 0.25).validation_keys == expected  # shard size plays no part


def test_labels_must_be_the_models_classes() -> None:
    check_labels(LABELS, ["dots", "checks", "stripes", "dots"])
    with pytest.raises(ImageSetError, match="labels the model does not know: zigzags"):
        check_labels(LABELS, ["dots", "checks", "stripes", "zigzags"])
    with pytest.raises(ImageSetError, match="no images of the model's classes stripes: its labels do not cover"):
        check_labels(LABELS, ["dots", "checks"])


def test_each_pass_gives_every_image_once(images: Path) -> None:
    split = split_images(str(images), 5, LABELS, seed=3, validation_split=0.25)
    stream = ImageStream(str(images), 5, split, image_size=32)
    train = list(stream.batches(False, 4, epoch=0, recipe=CLASSIC, seed=3))
    held_out = list(stream.batches(True, 4))
    broken_held_out = "dots/broken.jpg" in split.validation_keys  # the undecodable image is left out either way
    assert sum(len(y) for _, y in train) == split.train_rows - (not broken_held_out)
    assert sum(len(y) for _, y in held_out) == split.validation_rows - broken_held_out
    assert all(x.dtype == np.uint8 and x.shape[1:] == (32, 32, 3) for x, _ in train + held_out)
    assert all(len(y) == 4 for _, y in train[:-1])
    counts = np.bincount(np.concatenate([y for _, y in held_out]), minlength=3)
    assert counts.tolist() == [2, 2 - broken_held_out, 2]
    total = sum(len(y) for _, y in train)
    cut = list(stream.batches(False, 5, epoch=0, recipe=CLASSIC, seed=3, multiple=2))  # two replicas
    assert sum(len(y) for _, y in cut) == total - total % 5 % 2
    assert all(len(y) == 5 or len(y) % 2 == 0 for _, y in cut)


def test_views_are_fresh_each_epoch_and_the_same_on_a_rerun(images: Path) -> None:
    split = split_images(str(images), 100, LABELS, seed=3, validation_split=0.25)
    stream = ImageStream(str(images), 100, split, image_size=32)

    def epoch(number: int) -> dict[bytes, int]:
        # keyed by pixels: the shuffle order differs per epoch, the multiset of images is what is compared
        return {x.tobytes(): int(y) for xs, ys in stream.batches(False, 5, epoch=number, recipe=CLASSIC, seed=3)
                for x, y in zip(xs, ys, strict=True)}

    first, again, second = epoch(0), epoch(0), epoch(1)
    images_in_a_pass = sum(len(y) for _, y in stream.batches(False, 5))
    assert first == again and len(first) == images_in_a_pass
    assert not set(first) & set(second)  # every image is another view in another epoch
    plain = {x.tobytes() for xs, _ in stream.batches(False, 5) for x in xs}
    assert not set(first) & plain and len(plain) == images_in_a_pass


def _passes(stream: ImageStream, epochs: int) -> list[list[tuple[bytes, bytes]]]:
    """Every batch of ``epochs`` training passes (with views) and a held-out pass, as bytes, in order."""
    out = [[(x.tobytes(), y.tobytes()) for x, y in stream.batches(False, 4, epoch=e, recipe=CLASSIC, seed=3)]
           for e in range(epochs)]
    return out + [[(x.tobytes(), y.tobytes()) for x, y in stream.batches(True, 4)]]


def test_cached_epochs_are_the_same_batches_and_read_nothing(images: Path, tmp_path: Path) -> None:
    root = tmp_path / "images"
    shutil.copytree(images, root)
    split = split_images(str(root), 5, LABELS, seed=3, validation_split=0.25)
    expected = _passes(ImageStream(str(root), 5, split, image_size=32), 3)
    cache = DecodedImages(2**20)
    cached = ImageStream(str(root), 5, split, image_size=32, cache=cache)
    assert _passes(cached, 3) == expected  # the passes that fill the cache
    decodable = split.train_rows + split.validation_rows - 1
    assert len(cache) == decodable and cache.used_bytes == decodable * 32 * 32 * 3
    assert cache.failed("dots/broken.jpg")
    for path in root.rglob("*.*"):  # from now on every file is unreadable as an image
        path.write_bytes(b"gone")
    assert _passes(cached, 3) == expected  # the same order, the same views, from memory
    assert sum(len(batch) for batch in _passes(ImageStream(str(root), 5, split, image_size=32), 1)) == 0


def test_a_cache_over_its_budget_keeps_what_fits_and_decodes_the_rest(images: Path) -> None:
    split = split_images(str(images), 5, LABELS, seed=3, validation_split=0.25)
    expected = _passes(ImageStream(str(images), 5, split, image_size=32), 2)
    cache = DecodedImages(5 * 32 * 32 * 3 + 100)
    stream = ImageStream(str(images), 5, split, image_size=32, cache=cache)
    assert _passes(stream, 2) == expected and _passes(stream, 2) == expected
    assert len(cache) == 5 and cache.used_bytes == 5 * 32 * 32 * 3
    kept = next(iter(cache._images.values()))
    with pytest.raises(ValueError):  # cached pixels are read-only: a view never changes them
        kept[0, 0, 0] = 1
    assert len(DecodedImages(0)) == 0 and not DecodedImages(0).put("k", np.zeros((2, 2, 3), np.uint8))
