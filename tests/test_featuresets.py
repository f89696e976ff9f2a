"""Feature datasets as the train driver sees them, from Parquet footers only: the files (bookkeeping names
skipped), rows per row group, the metadata checks, one kind of features across sets, completeness."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cnnbatch.extract import embeddings_table, feature_schema
from cnnbatch.featuresets import (
    FeatureError,
    check_same_features,
    check_schema,
    describe_source,
    feature_paths,
    identity_of,
    read_footer,
)

from .conftest import feature_metadata, learnable, write_features


def test_feature_paths_are_sorted_parquet_files_without_bookkeeping(tmp_path: Path) -> None:
    x, labels = learnable(4, 8)
    root = write_features(tmp_path / "f", x, labels, parts=3)
    (root / "_errors").mkdir()
    (root / "_errors" / "part-000000.parquet").write_bytes(b"")
    (root / ".part-000009.parquet.0a1b2c3d.tmp").write_bytes(b"")
    (root / "notes.txt").write_text("x")
    (root / "nested").mkdir()
    (root / "nested" / "part-x.parquet").write_bytes((root / "part-000000.parquet").read_bytes())
    _, found_root, paths = feature_paths(str(root))
    assert found_root == str(root)
    assert [p[len(str(root)) + 1:] for p in paths] == ["nested/part-x.parquet", "part-000000.parquet",
                                                        "part-000001.parquet", "part-000002.parquet"]
    _, _, single = feature_paths(str(root / "part-000001.parquet"))
    assert single == [str(root / "part-000001.parquet")]


def test_no_feature_files_or_no_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty" / "_stats").mkdir(parents=True)
    with pytest.raises(FeatureError, match="no feature files"):
        feature_paths(str(tmp_path / "empty"))
    with pytest.raises(Exception, match="does not exist"):
        feature_paths(str(tmp_path / "missing"))


def test_footers_give_rows_and_row_groups_without_reading_data(tmp_path: Path) -> None:
    x, labels = learnable(10, 4)
    root = write_features(tmp_path / "f", x, labels, parts=1, row_group_rows=8)
    fs, _, (path,) = feature_paths(str(root))
    schema, info = read_footer(fs, path)
    assert info.rows == 30 and info.row_groups == (8, 8, 8, 6)
    assert check_schema(schema, path)["dim"] == 4


def schema_of(dim: int, metadata: dict | None, fields: list | None = None) -> pa.Schema:
    schema = feature_schema(dim, metadata if metadata is not None else {})
    if metadata is None:
        schema = schema.remove_metadata()
    return pa.schema(fields).with_metadata(schema.metadata) if fields else schema


def test_schema_checks_name_what_is_wrong() -> None:
    good = feature_metadata(4)
    assert check_schema(schema_of(4, good), "f") == good
    with pytest.raises(FeatureError, match="f has no cnnbatch feature metadata"):
        check_schema(schema_of(4, None), "f")
    with pytest.raises(FeatureError, match="no cnnbatch feature metadata"):
        check_schema(schema_of(4, {**good, "kind": "predictions"}), "f")
    with pytest.raises(FeatureError, match="lacks column\\(s\\) label: expected key, label, embedding"):
        check_schema(schema_of(4, good, [("key", pa.string()), ("embedding", pa.list_(pa.float32(), 4))]), "f")
    with pytest.raises(FeatureError, match="embedding is list<item: double>, expected fixed_size_list<float32>"):
        check_schema(schema_of(4, good, [("key", pa.string()), ("label", pa.string()),
                                         ("embedding", pa.list_(pa.float64()))]), "f")
    with pytest.raises(FeatureError, match="embedding has 4 values, metadata says dim 8"):
        check_schema(schema_of(4, {**good, "dim": 8}), "f")


def test_views_must_match_their_metadata() -> None:
    good = {**feature_metadata(4), "augment": {"views": 2, "recipe": {}, "seed": 1}}
    assert check_schema(feature_schema(4, good, views=2), "f")["augment"]["views"] == 2
    with pytest.raises(FeatureError, match="holds 3 views, its metadata says 2"):
        check_schema(feature_schema(4, good, views=3), "f")
    with pytest.raises(FeatureError, match="holds 0 views, its metadata says 2"):
        check_schema(feature_schema(4, good), "f")


def test_identity_is_what_makes_features_comparable() -> None:
    a = feature_metadata(4)
    moved = {**a, "weights": {"kind": "file", "uri": "s3://b/w.h5", "sha256": "f" * 64, "seed": None}}
    copied = {**moved, "weights": {**moved["weights"], "uri": "gs://other/w.h5"}}
    assert identity_of(moved) == identity_of(copied)  # the same file elsewhere: the same weights
    assert identity_of(a) != identity_of(moved)
    assert identity_of({**a, "precision": "bfloat16", "decode": "other"}) == identity_of(a)


def test_mixed_sets_are_refused_and_soft_differences_warned(caplog: pytest.LogCaptureFixture) -> None:
    a = feature_metadata(4)
    with pytest.raises(FeatureError, match="feature sets differ in image_size: one has 32, two has 64"):
        check_same_features([("one", a), ("two", {**a, "image_size": 64})])
    with caplog.at_level(logging.WARNING, logger="cnnbatch.featuresets"):
        check_same_features([("one", a), ("two", {**a, "precision": "bfloat16"})])
    assert "feature sets differ in precision" in caplog.text


def test_a_source_is_complete_with_success_or_as_a_single_file(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    x, labels = learnable(4, 8)
    done = describe_source(str(write_features(tmp_path / "done", x, labels, parts=2)))
    assert done.complete and done.rows == 12 and len(done.files) == 2 and done.views == 0
    assert done.metadata["backbone"] == "vgg16"
    with caplog.at_level(logging.WARNING, logger="cnnbatch.featuresets"):
        partial = describe_source(str(write_features(tmp_path / "partial", x, labels, success=False)))
    assert not partial.complete and "its extraction is unfinished" in caplog.text
    single = describe_source(str(tmp_path / "partial" / "part-000000.parquet"))
    assert single.complete and single.rows == 4


def test_a_source_mixing_plain_and_viewed_files_is_refused(tmp_path: Path) -> None:
    metadata = {**feature_metadata(4), "augment": {"views": 1, "recipe": {}, "seed": 1}}
    root = tmp_path / "mixed"
    root.mkdir()
    for name, meta, views in (("part-0.parquet", feature_metadata(4), 0), ("part-1.parquet", metadata, 1)):
        schema = feature_schema(4, meta, views=views)
        augmented = np.zeros((1, 1, 4), np.float32) if views else None
        pq.write_table(embeddings_table(["k"], ["a"], np.zeros((1, 4), np.float32), schema, augmented), root / name)
    with pytest.raises(FeatureError, match="mixes files with 0 and 1 augmented views"):
        describe_source(str(root))
