"""The driver's view of feature datasets: their files, row groups and metadata, read from Parquet footers only.

``train`` (possibly on a CPU-only head node) checks here, before any worker starts, that every feature file was
made by the same backbone, weights, image size and preprocessing, and how many rows each row group holds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .output import SUCCESS_FILE
from .parquetio import read_metadata
from .shards import InputError
from .weights import WeightsRef

log = logging.getLogger(__name__)

AUGMENTED_COLUMN = "augmented_embeddings"  # as extract writes it (extract.AUGMENTED_COLUMN)
# Metadata that must agree across every feature file: features of different networks are not comparable.
IDENTITY_FIELDS = ("backbone", "dim", "weights", "image_size", "preprocessing")
# Metadata that may differ (same network, other rounding): a warning, and the first file's value is recorded.
SOFT_FIELDS = ("decode", "precision")


class FeatureError(InputError):
    """Feature sets that cannot be trained on (mixed, malformed, unlabelled), with a one-line reason."""


@dataclass(frozen=True)
class FeatureFile:
    path: str  # on the source's filesystem
    rows: int
    row_groups: tuple[int, ...]  # rows per row group


@dataclass(frozen=True)
class FeatureSource:
    """One ``--features`` dataset: its files (sorted) and the metadata they share."""

    uri: str
    files: tuple[FeatureFile, ...]
    metadata: dict[str, Any]
    complete: bool  # the extraction wrote _SUCCESS
    views: int = 0  # augmented views per row (the augmented_embeddings column), 0 without

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)


def feature_paths(uri: str) -> tuple[Any, str, list[str]]:
    """``(fs, root, files)`` of a feature dataset (a folder, or one ``.parquet`` file), skipping ``_``/``.`` names."""
    fs, root = storage.ensure_reachable(uri, must_exist=True)
    root = root.rstrip("/")
    if fs.isfile(root):
        return fs, root, [root]
    found = storage.with_retries(lambda: fs.find(root), f"list {storage.redact(uri)}")
    paths = []
    for path in found:
        relative = path[len(root):].strip("/")
        if relative.endswith(".parquet") and not any(p.startswith(("_", ".")) for p in relative.split("/")):
            paths.append(path)
    if not paths:
        raise FeatureError(f"no feature files (*.parquet) under {storage.redact(uri)}")
    return fs, root, sorted(paths)


def read_footer(fs: Any, path: str) -> tuple[pa.Schema, FeatureFile]:
    def read() -> pq.FileMetaData:
        with fs.open(path, "rb") as handle:
            return pq.ParquetFile(handle).metadata

    meta = storage.with_retries(read, f"read footer {path}")
    groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    return meta.schema.to_arrow_schema(), FeatureFile(path, meta.num_rows, groups)


def check_schema(schema: pa.Schema, where: str) -> dict[str, Any]:
    """The cnnbatch feature metadata of one file, after checking its columns; FeatureError otherwise."""
    metadata = read_metadata(schema)
    if metadata.get("kind", "features") != "features" or "backbone" not in metadata:
        raise FeatureError(f"{where} has no cnnbatch feature metadata: expected Parquet written by cnnbatch extract")
    missing = [c for c in ("key", "label", "embedding") if c not in schema.names]
    if missing:
        raise FeatureError(f"{where} lacks column(s) {', '.join(missing)}: expected key, label, embedding")
    embedding = schema.field("embedding").type
    if not (pa.types.is_fixed_size_list(embedding) and pa.types.is_float32(embedding.value_type)):
        raise FeatureError(f"{where}: embedding is {embedding}, expected fixed_size_list<float32>")
    if embedding.list_size != int(metadata.get("dim", -1)):
        raise FeatureError(f"{where}: embedding has {embedding.list_size} values, metadata says dim "
                           f"{metadata.get('dim')}")
    views = views_of(schema, where, embedding.list_size)
    recorded = int((metadata.get("augment") or {}).get("views", 0))
    if views != recorded:
        raise FeatureError(f"{where}: {AUGMENTED_COLUMN} holds {views} views, its metadata says {recorded}")
    return metadata


def views_of(schema: pa.Schema, where: str, dim: int) -> int:
    """How many augmented views a feature file holds per row (0 without the column); FeatureError if malformed."""
    if AUGMENTED_COLUMN not in schema.names:
        return 0
    typ = schema.field(AUGMENTED_COLUMN).type
    inner = typ.value_type if pa.types.is_fixed_size_list(typ) else None
    if inner is None or not (pa.types.is_fixed_size_list(inner) and pa.types.is_float32(inner.value_type)
                             and inner.list_size == dim):
        raise FeatureError(f"{where}: {AUGMENTED_COLUMN} is {typ}, expected "
                           f"fixed_size_list<fixed_size_list<float32>[{dim}]>[K]")
    return int(typ.list_size)


def identity_of(metadata: dict[str, Any]) -> dict[str, Any]:
    identity = {name: metadata.get(name) for name in IDENTITY_FIELDS}
    identity["weights"] = WeightsRef.from_dict(metadata.get("weights") or {}).identity
    return identity


def check_same_features(described: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """Refuse feature files made by different backbones, weights, image sizes or dimensions, naming the field."""
    first_where, first = described[0]
    reference = identity_of(first)
    for where, metadata in described[1:]:
        identity = identity_of(metadata)
        for name in IDENTITY_FIELDS:
            if identity[name] != reference[name]:
                raise FeatureError(
                    f"feature sets differ in {name}: {first_where} has {reference[name]!r}, {where} has "
                    f"{identity[name]!r}; train on features of one backbone, weights and image size")
        for name in SOFT_FIELDS:
            if metadata.get(name) != first.get(name):
                log.warning("feature sets differ in %s (%s: %r, %s: %r); the model records %r", name, first_where,
                            first.get(name), where, metadata.get(name), first.get(name))


def describe_source(uri: str) -> FeatureSource:
    fs, root, paths = feature_paths(uri)
    with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
        footers = list(pool.map(lambda p: read_footer(fs, p), paths))
    described = []
    views = set()
    for path, (schema, _) in zip(paths, footers):
        where = storage.redact(storage.unstrip(fs, path))
        metadata = check_schema(schema, where)
        described.append((where, metadata))
        views.add(int((metadata.get("augment") or {}).get("views", 0)))
    check_same_features(described)
    if len(views) > 1:
        raise FeatureError(f"{storage.redact(uri)} mixes files with {' and '.join(map(str, sorted(views)))} "
                           "augmented views per image: one extraction writes one kind")
    # A single file is whole by itself; a dataset folder is complete once its extraction wrote _SUCCESS.
    complete = paths == [root] or fs.exists(storage.join(root, SUCCESS_FILE))
    if not complete:
        log.warning("%s has no %s: its extraction is unfinished; training on the %d files present",
                    storage.redact(uri), SUCCESS_FILE, len(paths))
    return FeatureSource(uri, tuple(f for _, f in footers), described[0][1], complete, views.pop())
