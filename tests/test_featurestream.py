"""Streaming feature rows for a fit, on small Parquet files written here: the labels pass and its split, row groups
read (ahead, in order, or shuffled), fixed-size batches holding every row of a split exactly once, the features
pass (statistics, in memory or not), augmented views for training rows only."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cnnbatch.extract import embeddings_table, feature_schema
from cnnbatch.featuresets import FeatureError, describe_source
from cnnbatch.featurestream import (
    FeatureReader,
    embeddings_of,
    features_pass,
    index_rows,
    read_ahead,
    streamed_dataset,
    units_of,
)
from cnnbatch.head import EXCLUDED, TRAIN, VALIDATION, validation_quota

from .conftest import CLASSES, feature_metadata, write_features

ROWS = 60  # 20 per class, plus 4 unlabelled


def numbered(rows: int, dim: int = 3) -> np.ndarray:
    """Row i's features are (i, i, ...): every vector read back names its row."""
    return np.repeat(np.arange(rows, dtype=np.float32)[:, None], dim, axis=1)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    labels = [CLASSES[i % 3] for i in range(ROWS)] + [None] * 4
    root = write_features(tmp_path_factory.mktemp("stream") / "f", numbered(ROWS + 4), labels, parts=3,
                          row_group_rows=7)
    return describe_source(str(root)), labels


@pytest.fixture(scope="module")
def index(source):
    return index_rows([source[0]], seed=3, validation_split=0.25)


def test_the_labels_pass_splits_each_class_exactly(source, index) -> None:
    _, labels = source
    assert index.labels == CLASSES
    assert index.counts(VALIDATION).tolist() == [validation_quota(20, 0.25)] * 3 == [5, 5, 5]
    assert index.counts(TRAIN).tolist() == [15, 15, 15]
    assert index.rows(EXCLUDED) == 4 and index.rows(TRAIN) == 45 and index.rows(VALIDATION) == 15
    classes = np.concatenate(index.classes[0])
    assert classes.tolist() == [CLASSES.index(lb) if lb else -1 for lb in labels]
    again = index_rows([source[0]], seed=3, validation_split=0.25)
    assert all((a == b).all() for a, b in zip(again.splits[0], index.splits[0]))  # decided by key and seed


def test_units_are_the_row_groups_of_every_file(source) -> None:
    units = units_of([source[0]])
    groups = [g for f in source[0].files for g in f.row_groups]
    assert [u.rows for u in units] == groups and sum(groups) == ROWS + 4
    first_file = [u for u in units if u.file == 0]
    assert [u.start for u in first_file] == list(np.cumsum([0] + [u.rows for u in first_file])[:-1])


def rows_of(x: np.ndarray) -> list[int]:
    return x[:, 0].astype(int).tolist()


def test_batches_hold_every_row_of_a_split_once(source, index) -> None:
    reader = FeatureReader([source[0]], 3, index)
    split = np.concatenate(index.splits[0])
    for which in (TRAIN, VALIDATION):
        expected = np.flatnonzero(split == which).tolist()
        batches = list(reader.batches(which, 4))
        assert all(len(y) == 4 for _, y in batches[:-1]) and 0 < len(batches[-1][1]) <= 4
        x = np.concatenate([b[0] for b in batches])
        assert rows_of(x) == expected  # in order without a generator
        classes = np.concatenate(index.classes[0])
        assert np.concatenate([b[1] for b in batches]).tolist() == classes[expected].tolist()


def test_shuffled_batches_are_a_seeded_permutation(source, index) -> None:
    reader = FeatureReader([source[0]], 3, index)
    first = rows_of(np.concatenate([x for x, _ in reader.batches(TRAIN, 8, np.random.default_rng(1),
                                                                 buffer_rows=16)]))
    again = rows_of(np.concatenate([x for x, _ in reader.batches(TRAIN, 8, np.random.default_rng(1),
                                                                 buffer_rows=16)]))
    other = rows_of(np.concatenate([x for x, _ in reader.batches(TRAIN, 8, np.random.default_rng(2),
                                                                 buffer_rows=16)]))
    in_order = rows_of(np.concatenate([x for x, _ in reader.batches(TRAIN, 8)]))
    assert sorted(first) == in_order and first == again and first != other and first != in_order


def test_the_features_pass_gives_the_same_statistics_held_or_streamed(source, index) -> None:
    reader = FeatureReader([source[0]], 3, index)
    held = features_pass(reader, index, cache_bytes=1 << 20)
    streamed = features_pass(reader, index, cache_bytes=0)
    assert held.arrays is not None and streamed.arrays is None
    x_train, y_train = held.arrays[TRAIN]
    assert x_train.shape == (45, 3) and len(y_train) == 45 and held.arrays[VALIDATION][0].shape == (15, 3)
    np.testing.assert_allclose(held.moments.mean, x_train.mean(axis=0))
    np.testing.assert_allclose(streamed.moments.mean, held.moments.mean)
    np.testing.assert_allclose(streamed.moments.variance, held.moments.variance)


def test_the_streamed_dataset_knows_its_batch_count(source, index) -> None:
    reader = FeatureReader([source[0]], 3, index)
    dataset = streamed_dataset(reader, TRAIN, 10, seed=0)
    assert int(dataset.cardinality()) == 5  # 45 rows in batches of 10
    epoch_one = sorted(int(v) for x, _ in dataset for v in x.numpy()[:, 0])
    epoch_two = sorted(int(v) for x, _ in dataset for v in x.numpy()[:, 0])
    assert epoch_one == epoch_two == sorted(rows_of(np.concatenate([x for x, _ in reader.batches(TRAIN, 10)])))


def test_training_rows_bring_their_views_and_validation_does_not(tmp_path: Path) -> None:
    metadata = {**feature_metadata(2), "augment": {"views": 2, "recipe": {}, "seed": 1}}
    schema = feature_schema(2, metadata, views=2)
    keys = [f"k{i:02d}" for i in range(12)]
    labels = [CLASSES[i % 2] for i in range(12)]
    plain = numbered(12, 2)
    views = np.stack([plain + 100, plain + 200], axis=1)  # view v of row i: (i + 100 v)
    (tmp_path / "f").mkdir()
    pq.write_table(embeddings_table(keys, labels, plain, schema, views), tmp_path / "f" / "part-0.parquet")
    features = describe_source(str(tmp_path / "f"))
    index = index_rows([features], seed=0, validation_split=0.25)
    reader = FeatureReader([features], 2, index)
    train_rows = np.flatnonzero(index.splits[0][0] == TRAIN).tolist()
    x, y = reader.read(units_of([features])[0], TRAIN)
    # the plain rows first, then each row's views in turn
    assert rows_of(x) == train_rows + [r + offset for r in train_rows for offset in (100, 200)]
    assert reader.vectors(TRAIN) == 3 * len(train_rows) and len(y) == len(x)
    x_val, _ = reader.read(units_of([features])[0], VALIDATION)
    assert max(rows_of(x_val)) < 12  # plain vectors only
    plain_only = FeatureReader([features], 2, index, use_views=False)
    assert rows_of(plain_only.read(units_of([features])[0], TRAIN)[0]) == train_rows


def test_embeddings_are_read_zero_copy_and_nulls_refused() -> None:
    column = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(6, dtype=np.float32)), 3)
    np.testing.assert_array_equal(embeddings_of(column.slice(1), 3), [[3, 4, 5]])
    with_null = pa.array([[1.0, 2.0], None], pa.list_(pa.float32(), 2))
    with pytest.raises(FeatureError, match="1 rows have a null embedding"):
        embeddings_of(with_null, 2)


def test_non_finite_features_are_refused(tmp_path: Path) -> None:
    x = numbered(6, 2)
    x[2, 1] = np.nan
    root = write_features(tmp_path / "f", x, [CLASSES[i % 2] for i in range(6)], parts=1)
    features = describe_source(str(root))
    index = index_rows([features], seed=0, validation_split=0.25)
    reader = FeatureReader([features], 2, index)
    with pytest.raises(FeatureError, match="non-finite feature values"):
        [list(reader.chunks(split)) for split in (TRAIN, VALIDATION)]  # row 2 is in one of them


def test_read_ahead_keeps_the_order_with_calls_running_ahead() -> None:
    started = threading.Semaphore(0)
    release = threading.Event()

    def work(item: int) -> int:
        started.release()
        if item == 0:  # the first call waits until the next two have started: they run ahead of it
            assert all(started.acquire(timeout=30) for _ in range(3)), "no call ran ahead of the first"
            release.set()
        return item * 10

    assert list(read_ahead(work, range(6), depth=3)) == [0, 10, 20, 30, 40, 50]
    assert release.is_set()
    assert list(read_ahead(work, [], depth=2)) == []
