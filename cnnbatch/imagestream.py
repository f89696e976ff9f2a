"""Images for a fit (``finetune``): the labels pass over an input's records, the same held-out split as ``train``,
and per-epoch streams of decoded (and, for training, freshly augmented) images in bounded memory.

The listing, reading and decoding are extract's (shards.py, decode.py, the worker's bounded thread pool): the same
keys, labels and pixels. The split is ``train``'s rule (head.stratified_split over seeded key hashes, exact per
class), so the images held out are the ones the head was validated on when every image decodes. Between epochs
the held-out keys stay in memory, and the decoded images (before any view is drawn) as far as a byte budget
allows (``DecodedImages``): the rest stream from storage every epoch. Cached or not, an epoch's batches are the
same: the order and the views depend only on the seed, the epoch and the listing.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .augment import Recipe, draw_transform, view_rng, warp
from .decode import DecodeError, decode_image
from .head import VALIDATION, encode_labels, is_unlabelled, key_hashes, stratified_split
from .shards import Record, Shard, iter_records, list_shards
from .tfruntime import tensorflow
from .worker import bounded_map, thread_pool

log = logging.getLogger(__name__)

SHUFFLE_IMAGES = 256  # decoded training images mixed together (on top of shuffling the shard order)


class ImageSetError(ValueError):
    """An input that cannot be fine-tuned on (labels that do not match the model's), with a one-line reason."""


@dataclass(frozen=True)
class ImageSplit:
    """What the labels pass found: every labelled key's class is known again when it streams by; only the
    held-out keys are kept."""

    labels: tuple[str, ...]  # the model's classes, in output order
    validation_keys: frozenset[str]
    train_counts: tuple[int, ...]  # per class
    validation_counts: tuple[int, ...]
    unlabelled: int

    @property
    def train_rows(self) -> int:
        return sum(self.train_counts)

    @property
    def validation_rows(self) -> int:
        return sum(self.validation_counts)


def split_images(input_uri: str, shard_size: int, labels: Sequence[str], seed: int,
                 validation_split: float) -> ImageSplit:
    """Read every record's key and label (no image is decoded) and hold out each class's share as train does."""
    keys: list[str] = []
    found: list[str | None] = []
    for shard in list_shards(input_uri, shard_size):
        for record in iter_records(shard):
            keys.append(record.key)
            found.append(None if is_unlabelled(record.label) else record.label)
    check_labels(labels, [label for label in found if label is not None])
    names, classes = encode_labels(found)
    hashes = key_hashes(keys, seed)
    split = stratified_split(classes, hashes, validation_split)
    index = {name: labels.index(name) for name in names}
    train_counts, validation_counts = [0] * len(labels), [0] * len(labels)
    for cls, where in zip(classes, split):
        if cls >= 0:
            counts = validation_counts if where == VALIDATION else train_counts
            counts[index[names[cls]]] += 1
    held_out = frozenset(key for key, where in zip(keys, split) if where == VALIDATION)
    return ImageSplit(tuple(labels), held_out, tuple(train_counts), tuple(validation_counts),
                      sum(label is None for label in found))


def check_labels(model_labels: Sequence[str], found: Sequence[str]) -> None:
    """The input's labels must be the model's classes: no class the head cannot output, none it would not see."""
    present, expected = set(found), set(model_labels)
    unknown, missing = sorted(present - expected), sorted(expected - present)
    if unknown:
        raise ImageSetError(f"the input has labels the model does not know: {', '.join(unknown[:10])} (the model's "
                            f"classes: {', '.join(sorted(expected)[:10])}); fine-tune on images of its classes, or "
                            "train a new head on features of these images first")
    if missing:
        raise ImageSetError(f"the input has no images of the model's classes {', '.join(missing[:10])}: its labels "
                            f"do not cover the model's {len(expected)} classes; give an input with every class")


class DecodedImages:
    """Decoded images kept between epochs, first come first kept, while their bytes fit ``budget_bytes``; and
    the keys that did not decode (left out every epoch, reported once)."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = max(0, int(budget_bytes))
        self.used_bytes = 0
        self._images: dict[str, np.ndarray] = {}
        self._failed: set[str] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._images)

    def get(self, key: str) -> np.ndarray | None:
        return self._images.get(key)

    def failed(self, key: str) -> bool:
        return key in self._failed

    def put(self, key: str, pixels: np.ndarray) -> bool:
        """Keep ``pixels`` (read-only from now on) if they fit the budget; whether they were kept."""
        with self._lock:
            if key in self._images or self.used_bytes + pixels.nbytes > self.budget_bytes:
                return False
            pixels.setflags(write=False)
            self._images[key] = pixels
            self.used_bytes += pixels.nbytes
            return True

    def put_failed(self, key: str) -> None:
        with self._lock:
            self._failed.add(key)

    def figures(self) -> dict[str, Any]:
        """What the cache holds, for a fit's metrics."""
        return {"images": len(self._images), "mib": round(self.used_bytes / 2**20, 1),
                "budget_mib": round(self.budget_bytes / 2**20, 1)}


@dataclass(frozen=True)
class ImageStream:
    """Batches of ``(uint8 images (N, S, S, 3), classes (N,))`` of one split, re-read from storage every epoch."""

    input_uri: str
    shard_size: int
    split: ImageSplit
    image_size: int
    threads: int = 2
    # decoded images kept between epochs (the default keeps none: every image is decoded every epoch)
    cache: DecodedImages = field(default_factory=lambda: DecodedImages(0))

    def batches(self, validation: bool, batch_size: int, epoch: int | None = None, recipe: Recipe | None = None,
                seed: int = 0, multiple: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """One pass over the training images (``validation=False``) or the held-out ones. With ``epoch`` the
        shard order and the images are shuffled (seeded by seed and epoch) and, with ``recipe``, each training
        image is one augmented view drawn afresh for that epoch (view index = epoch). ``multiple``: the last,
        short batch is cut to a multiple of it (the replicas of a data-parallel fit each need a share)."""
        rng = np.random.default_rng([seed, epoch]) if epoch is not None else None
        shards: list[Shard] = list(list_shards(self.input_uri, self.shard_size))
        if rng is not None:
            shards = [shards[i] for i in rng.permutation(len(shards))]
        index = {label: i for i, label in enumerate(self.split.labels)}

        def wanted(record: Record) -> bool:
            return record.label in index and (record.key in self.split.validation_keys) == validation

        cache = self.cache

        def load(record: Record) -> tuple[np.ndarray | None, int]:
            pixels = cache.get(record.key)
            if pixels is None:
                if cache.failed(record.key):
                    return None, -1
                try:
                    pixels = decode_image(record.load(), self.image_size)
                except (DecodeError, OSError) as exc:
                    log.warning("%s is left out of the fit: %s", record.key, exc)
                    if isinstance(exc, DecodeError):  # a failed read is tried again
                        cache.put_failed(record.key)
                    return None, -1
                cache.put(record.key, pixels)
            if recipe is not None and epoch is not None and not validation:
                transform = draw_transform(recipe, self.image_size, self.image_size,
                                           view_rng(seed, record.key, epoch))
                pixels = warp(pixels, transform, recipe.fill_mode, recipe.cval)
            return pixels, index[str(record.label)]

        records = (record for shard in shards for record in iter_records(shard) if not record.error and wanted(record))
        pool = thread_pool("fit-decode", self.threads)
        buffer: list[tuple[np.ndarray, int]] = []
        limit = SHUFFLE_IMAGES if rng is not None else batch_size
        for pixels, cls in bounded_map(pool, load, records, in_flight=2 * self.threads + batch_size):
            if pixels is None:
                continue
            buffer.append((pixels, cls))
            if len(buffer) >= max(limit, batch_size):
                yield from _drain(buffer, batch_size, rng, keep_partial=True)
        if multiple > 1:
            del buffer[len(buffer) - len(buffer) % batch_size % multiple:]
        yield from _drain(buffer, batch_size, rng, keep_partial=False)

    def dataset(self, validation: bool, batch_size: int, recipe: Recipe | None = None, seed: int = 0,
                shuffle: bool = True, preprocess: Any = None, first_epoch: int = 0, multiple: int = 1) -> Any:
        """A ``tf.data.Dataset`` of float32 preprocessed batches, one pass per epoch: with ``shuffle``, pass ``n``
        is epoch ``first_epoch + n`` (its own shuffle and views, so a resumed fit sees what it would have)."""
        tf = tensorflow()
        epochs = itertools.count(first_epoch)
        size = self.image_size

        def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            epoch = next(epochs) if shuffle else None
            yield from self.batches(validation, batch_size, epoch, recipe if shuffle else None, seed, multiple)

        signature = (tf.TensorSpec((None, size, size, 3), tf.uint8), tf.TensorSpec((None,), tf.int32))
        dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
        if preprocess is not None:
            dataset = dataset.map(lambda x, y: (preprocess(tf.cast(x, tf.float32)), y), num_parallel_calls=2)
        return dataset.prefetch(2)


def _drain(buffer: list[tuple[np.ndarray, int]], batch_size: int, rng: np.random.Generator | None,
           keep_partial: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Full batches out of ``buffer`` (shuffled with ``rng``); the remainder stays unless this is the end."""
    if rng is not None:
        order = rng.permutation(len(buffer))
        buffer[:] = [buffer[i] for i in order]
    while len(buffer) >= batch_size or (buffer and not keep_partial):
        taken, buffer[:] = buffer[:batch_size], buffer[batch_size:]
        yield (np.stack([pixels for pixels, _ in taken]), np.asarray([cls for _, cls in taken], dtype=np.int32))
