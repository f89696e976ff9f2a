"""Streaming feature rows for a fit: the labels pass and split, row groups read ahead, shuffled batches.

Per row only its class and split stay in memory (5 bytes), never its features:

1. a labels pass reads only the ``key`` and ``label`` columns: class counts, and the stratified split decided per
   row by a seeded hash of its key (exact per-class quota, no row order involved);
2. a features pass computes the training split's mean and variance (they become the head's Normalization layer)
   and, when the set fits the cache, keeps it in memory for the epochs;
3. otherwise every epoch streams row groups from storage (several read ahead in threads, shuffled by row group
   and within a buffer), so a feature set larger than memory trains without being loaded whole.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .featuresets import AUGMENTED_COLUMN, FeatureError, FeatureFile, FeatureSource
from .head import TRAIN, VALIDATION, LabelCodes, RunningMoments, key_hashes, stratified_split
from .tfruntime import tensorflow

log = logging.getLogger(__name__)

READ_AHEAD = 4  # row groups read concurrently ahead of the fit (storage latency hides behind compute)
SHUFFLE_ROWS = 16384  # rows mixed together when streaming (on top of shuffling the row-group order)
LABEL_BATCH_ROWS = 65536


@dataclass(frozen=True)
class Unit:
    """One row group: the unit of reading, shuffling and read-ahead."""

    source: int
    file: int
    group: int
    start: int  # first row of the group within its file
    rows: int


@dataclass
class RowIndex:
    """Per feature file: each row's class (-1: no label) and split, in file order."""

    labels: tuple[str, ...]
    classes: list[list[np.ndarray]]  # [source][file]
    splits: list[list[np.ndarray]]

    def counts(self, split: int) -> np.ndarray:
        total = np.zeros(len(self.labels), dtype=np.int64)
        for per_file_classes, per_file_splits in zip(self.classes, self.splits):
            for classes, splits in zip(per_file_classes, per_file_splits):
                total += np.bincount(classes[splits == split], minlength=len(self.labels))
        return total

    def rows(self, split: int) -> int:
        return int(sum(int((s == split).sum()) for per_file in self.splits for s in per_file))

    def source_rows(self, source: int, split: int) -> int:
        return int(sum(int((s == split).sum()) for s in self.splits[source]))


def units_of(sources: Sequence[FeatureSource]) -> list[Unit]:
    units = []
    for s, source in enumerate(sources):
        for f, feature_file in enumerate(source.files):
            start = 0
            for g, rows in enumerate(feature_file.row_groups):
                units.append(Unit(s, f, g, start, rows))
                start += rows
    return units


def index_rows(sources: Sequence[FeatureSource], seed: int, validation_split: float) -> RowIndex:
    """The labels pass: only ``key`` and ``label`` are read; the split is decided here, once."""
    codes = LabelCodes()
    provisional: list[list[np.ndarray]] = []
    hashes: list[list[np.ndarray]] = []
    for source in sources:
        fs, _ = storage.filesystem(source.uri)
        provisional.append([])
        hashes.append([])
        for feature_file in source.files:
            file_codes, file_hashes = _label_pass_file(fs, feature_file, codes, seed)
            provisional[-1].append(file_codes)
            hashes[-1].append(file_hashes)
    labels, remap = codes.finish()
    flat_codes = np.concatenate([c for per_file in provisional for c in per_file])
    classes = np.where(flat_codes >= 0, remap[np.maximum(flat_codes, 0)] if len(remap) else -1, -1).astype(np.int32)
    split = stratified_split(classes, np.concatenate([h for per_file in hashes for h in per_file]),
                             validation_split)
    index = RowIndex(labels, [], [])
    offset = 0
    for per_file in provisional:
        index.classes.append([])
        index.splits.append([])
        for file_codes in per_file:
            index.classes[-1].append(classes[offset:offset + len(file_codes)])
            index.splits[-1].append(split[offset:offset + len(file_codes)])
            offset += len(file_codes)
    return index


def _label_pass_file(fs: Any, feature_file: FeatureFile, codes: LabelCodes, seed: int) -> tuple[np.ndarray, np.ndarray]:
    file_codes: list[np.ndarray] = []
    file_hashes: list[np.ndarray] = []

    def read() -> None:
        file_codes.clear()
        file_hashes.clear()
        with fs.open(feature_file.path, "rb") as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=LABEL_BATCH_ROWS, columns=["key", "label"]):
                labels = batch.column("label").dictionary_encode()
                indices = labels.indices.fill_null(-1).to_numpy(zero_copy_only=False)
                file_codes.append(codes.encode(labels.dictionary.to_pylist(), indices))
                file_hashes.append(key_hashes(batch.column("key").to_pylist(), seed))

    storage.with_retries(read, f"read labels of {feature_file.path}")
    rows = sum(len(c) for c in file_codes)
    if rows != feature_file.rows:
        raise FeatureError(f"{feature_file.path} changed during training: {rows} rows, its footer said "
                           f"{feature_file.rows}")
    if not file_codes:
        return np.zeros(0, np.int32), np.zeros(0, np.uint64)
    return np.concatenate(file_codes), np.concatenate(file_hashes)


def embeddings_of(column: pa.Array, dim: int) -> np.ndarray:
    """A ``fixed_size_list<float32>`` column (nested any number of times: the augmented views) as an (n, dim)
    float32 array, zero-copy when it has no nulls."""
    if column.null_count:
        raise FeatureError(f"{column.null_count} rows have a null embedding")
    values = column.flatten()  # honours the array's offset; a slice, not a copy
    while pa.types.is_fixed_size_list(values.type):
        if values.null_count:
            raise FeatureError(f"{values.null_count} augmented views are null")
        values = values.flatten()
    return values.to_numpy(zero_copy_only=values.null_count == 0).reshape(-1, dim)


class FeatureReader:
    """Reads row groups of the feature files as (features, class) arrays of one split. Training rows bring their
    augmented views too (``use_views``, when a source has them); validation is always the plain vectors."""

    def __init__(self, sources: Sequence[FeatureSource], dim: int, index: RowIndex, use_views: bool = True):
        self.sources, self.index = tuple(sources), index
        self.filesystems = [storage.filesystem(s.uri)[0] for s in self.sources]
        self.units = units_of(self.sources)
        self.dim = dim
        self.use_views = use_views

    def views_of(self, source: int, split: int) -> int:
        """Augmented vectors each row of ``source`` adds to ``split``."""
        return self.sources[source].views if self.use_views and split == TRAIN else 0

    def vectors(self, split: int) -> int:
        """Vectors one pass over ``split`` yields: rows, plus their views for training."""
        return sum(self.index.source_rows(s, split) * (1 + self.views_of(s, split)) for s in range(len(self.sources)))

    def read(self, unit: Unit, split: int) -> tuple[np.ndarray, np.ndarray]:
        wanted = self.index.splits[unit.source][unit.file][unit.start:unit.start + unit.rows] == split
        classes = self.index.classes[unit.source][unit.file][unit.start:unit.start + unit.rows]
        if not wanted.any():
            return np.zeros((0, self.dim), np.float32), np.zeros(0, np.int32)
        feature_file = self.sources[unit.source].files[unit.file]
        fs = self.filesystems[unit.source]

        views = self.views_of(unit.source, split)
        columns = ["embedding", AUGMENTED_COLUMN] if views else ["embedding"]

        def read_group() -> pa.Table:
            with fs.open(feature_file.path, "rb") as handle:
                return pq.ParquetFile(handle).read_row_group(unit.group, columns=columns)

        table = storage.with_retries(read_group, f"read {feature_file.path}")
        if table.num_rows != unit.rows:
            raise FeatureError(f"{feature_file.path} changed during training: row group {unit.group} has "
                               f"{table.num_rows} rows, expected {unit.rows}")
        features = embeddings_of(table.column("embedding").combine_chunks(), self.dim)
        x = features if wanted.all() else features[wanted]  # a read-only view of Arrow's buffer, or a copy
        y = classes[wanted]
        if views:  # the plain rows, then each row's views (the batches mix them)
            augmented = embeddings_of(table.column(AUGMENTED_COLUMN).combine_chunks(), self.dim)
            augmented = augmented.reshape(unit.rows, views, self.dim)[wanted].reshape(-1, self.dim)
            x, y = np.concatenate([x, augmented]), np.concatenate([y, np.repeat(y, views)])
        if not np.isfinite(x).all():
            raise FeatureError(f"{feature_file.path} holds non-finite feature values (NaN or inf): re-extract it "
                               "(e.g. with --precision float32)")
        return x, y

    def chunks(self, split: int, rng: np.random.Generator | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every row group's rows of ``split``; ``rng`` shuffles the row-group order. Reads run ahead in threads."""
        units = [u for u in self.units if self._has(u, split)]
        if rng is not None:
            units = [units[i] for i in rng.permutation(len(units))]
        yield from read_ahead(lambda u: self.read(u, split), units, READ_AHEAD)

    def _has(self, unit: Unit, split: int) -> bool:
        return bool((self.index.splits[unit.source][unit.file][unit.start:unit.start + unit.rows] == split).any())

    def batches(self, split: int, batch_size: int, rng: np.random.Generator | None = None,
                buffer_rows: int = SHUFFLE_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Fixed-size batches of one split (the last may be short); with ``rng``, rows are mixed within a buffer
        of ``buffer_rows`` drawn from several row groups."""
        pending_x: list[np.ndarray] = []
        pending_y: list[np.ndarray] = []
        pending = 0
        threshold = max(buffer_rows, batch_size) if rng is not None else batch_size
        for x, y in self.chunks(split, rng):
            pending_x.append(x)
            pending_y.append(y)
            pending += len(y)
            if pending >= threshold:
                xs, ys = _mix(pending_x, pending_y, rng)
                full = (len(ys) // batch_size) * batch_size
                for start in range(0, full, batch_size):
                    yield xs[start:start + batch_size], ys[start:start + batch_size]
                pending_x, pending_y, pending = [xs[full:]], [ys[full:]], len(ys) - full
        if pending:
            xs, ys = _mix(pending_x, pending_y, rng)
            for start in range(0, len(ys), batch_size):
                yield xs[start:start + batch_size], ys[start:start + batch_size]


def _mix(xs: list[np.ndarray], ys: list[np.ndarray], rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.concatenate(xs), np.concatenate(ys)
    if rng is None:
        return x, y
    order = rng.permutation(len(y))
    return x[order], y[order]


def read_ahead(fn: Callable[[Any], Any], items: Iterable[Any], depth: int) -> Iterator[Any]:
    """``map(fn, items)`` in order, with up to ``depth`` calls running ahead in threads (pyarrow and fsspec
    release the GIL while reading and decoding)."""
    with ThreadPoolExecutor(max_workers=depth) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@dataclass
class Loaded:
    """The features pass: training statistics and, when the set fits the cache, the arrays themselves."""

    moments: RunningMoments
    arrays: dict[int, tuple[np.ndarray, np.ndarray]] | None  # split -> (x, y)


def features_pass(reader: FeatureReader, index: RowIndex, cache_bytes: int) -> Loaded:
    sizes = {split: reader.vectors(split) for split in (TRAIN, VALIDATION)}
    needed = sum(sizes.values()) * reader.dim * 4
    cache = needed <= cache_bytes
    log.info("features: %d training vectors (%d rows, %d from augmented views) and %d validation rows x %d dims "
             "(%.1f MiB): %s", sizes[TRAIN], index.rows(TRAIN), sizes[TRAIN] - index.rows(TRAIN), sizes[VALIDATION],
             reader.dim, needed / 2**20,
             "held in memory" if cache else "streamed from storage every epoch (over --cache-mb)")
    moments = RunningMoments(reader.dim)
    arrays = None
    if cache:
        arrays = {split: (np.empty((n, reader.dim), np.float32), np.empty(n, np.int32)) for split, n in sizes.items()}
        for split in (TRAIN, VALIDATION):
            x_all, y_all = arrays[split]
            filled = 0
            for x, y in reader.chunks(split):
                x_all[filled:filled + len(y)] = x
                y_all[filled:filled + len(y)] = y
                filled += len(y)
                if split == TRAIN:
                    moments.update(x)
    else:
        for x, _ in reader.chunks(TRAIN):
            moments.update(x)
    return Loaded(moments, arrays)


def streamed_dataset(reader: FeatureReader, split: int, batch_size: int, seed: int | None) -> Any:
    """A ``tf.data.Dataset`` re-reading the split from storage on every pass (a new shuffle each epoch)."""
    tf = tensorflow()
    epochs = itertools.count()

    def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        rng = np.random.default_rng([seed, next(epochs)]) if seed is not None else None
        yield from reader.batches(split, batch_size, rng)

    signature = (tf.TensorSpec((None, reader.dim), tf.float32), tf.TensorSpec((None,), tf.int32))
    # Every batch but the last is full, so the count is known: Keras then shows progress and does not warn that
    # the input "ran out of data" after the first epoch.
    batches = -(-reader.vectors(split) // batch_size)
    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
    return dataset.apply(tf.data.experimental.assert_cardinality(batches)).prefetch(2)
