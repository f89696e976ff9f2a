"""The train job: feature Parquet -> a classifier head in a model folder, fitted on one Ray worker.

The driver (possibly a CPU-only head node) only reads Parquet footers: it checks that every feature set was made
by the same backbone, weights and image size, and that ``--output`` may receive a model. The fit runs as one Ray
task that holds a GPU when the cluster has one, streaming the features from storage:

1. a labels pass reads only the ``key`` and ``label`` columns (a few bytes per row): class counts, and the
   stratified split decided per row by a seeded hash of its key (exact per-class quota, no row order involved);
2. a features pass computes the training split's mean and variance (they become the head's Normalization layer)
   and, when the set fits in ``--cache-mb``, keeps it in memory for the epochs;
3. otherwise every epoch streams row groups from storage (several read ahead in threads, shuffled by row group
   and within a buffer), so a feature set larger than memory trains without being loaded whole.

Per row only its class and split stay in memory (5 bytes), never its features.
"""

from __future__ import annotations

import io
import itertools
import logging
import socket
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .config import log_config, option, require, to_dict
from .head import (EXCLUDED, HEADS, OPTIMIZERS, TRAIN, VALIDATION, EvaluationAccumulator, HeadSpec, LabelCodes,
                   RunningMoments, build_head, class_weights, key_hashes, make_optimizer, stratified_split)
from .modelio import CONFUSION_FILE, CURVE_FILE, ModelError, ModelInfo, check_output, write_model_folder
from .output import SUCCESS_FILE, read_metadata
from .shards import InputError
from .weights import WeightsRef

log = logging.getLogger(__name__)

# Metadata that must agree across every feature file: features of different networks are not comparable.
IDENTITY_FIELDS = ("backbone", "dim", "weights", "image_size", "preprocessing")
# Metadata that may differ (same network, other rounding): a warning, and the first file's value is recorded.
SOFT_FIELDS = ("decode", "precision")
READ_AHEAD = 4  # row groups read concurrently ahead of the fit (storage latency hides behind compute)
SHUFFLE_ROWS = 16384  # rows mixed together when streaming (on top of shuffling the row-group order)
LABEL_BATCH_ROWS = 65536
EVAL_BATCH_ROWS = 4096


class FeatureError(InputError):
    """Feature sets that cannot be trained on (mixed, malformed, unlabelled), with a one-line reason."""


@dataclass(frozen=True)
class TrainConfig:
    features: tuple[str, ...] = option("feature datasets written by cnnbatch extract (one or more fsspec URLs)",
                                       metavar="URI", nargs="+")
    output: str = option("where the model folder goes (any fsspec URL)", metavar="URI")
    head: str = option("mlp: Dense relu + dropout + softmax; linear: softmax regression", "mlp", choices=HEADS)
    epochs: int = option("most passes over the training split (early stopping may end sooner)", 100, metavar="N")
    validation_split: float = option("share of every class held out for validation", 0.1, metavar="F")
    learning_rate: float = option("optimizer learning rate", 1e-3, metavar="F")
    batch_size: int = option("rows per gradient step", 64, metavar="N")
    optimizer: str = option("optimizer", "rmsprop", choices=OPTIMIZERS)
    class_weight: str = option("balanced: weight classes by inverse frequency; none", "none",
                               choices=("balanced", "none"))
    patience: int = option("epochs without a lower validation loss before stopping (best epoch restored); the "
                           "learning rate drops 0.3x after patience/2-1 such epochs", 8, metavar="N")
    hidden_units: int = option("width of the mlp head's hidden layer", 1024, metavar="N")
    dropout: float = option("dropout after the mlp head's hidden layer", 0.5, metavar="F")
    l2: float = option("L2 penalty on the head's weights", 1e-3, metavar="F")
    seed: int = option("seed of the split, the initial weights and the shuffling", 0, metavar="N")
    cache_mb: int = option("keep the features in memory when they take at most this many MiB; larger sets "
                           "stream from storage every epoch", 2048, metavar="N")
    gpus: float | None = option("GPUs for the fit (default: 1 when the cluster has a GPU, else 0)", None,
                                metavar="F")
    overwrite: bool = option("replace a model already at --output", False)

    def __post_init__(self) -> None:
        if isinstance(self.features, str):  # one URI given from Python rather than the command line
            object.__setattr__(self, "features", (self.features,))
        require(len(self.features) >= 1, "--features needs at least one feature dataset")
        require(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        require(0 < self.validation_split < 1,
                f"--validation-split must be between 0 and 1, got {self.validation_split}")
        require(self.learning_rate > 0, f"--learning-rate must be positive, got {self.learning_rate}")
        require(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        require(self.patience >= 0, f"--patience must be 0 or more, got {self.patience}")
        require(self.hidden_units >= 1, f"--hidden-units must be at least 1, got {self.hidden_units}")
        require(0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}")
        require(self.l2 >= 0, f"--l2 must be 0 or more, got {self.l2}")
        require(self.cache_mb >= 0, f"--cache-mb must be 0 or more, got {self.cache_mb}")
        require(self.gpus is None or self.gpus >= 0, f"--gpus must be 0 or more, got {self.gpus}")

    @property
    def head_spec(self) -> HeadSpec:
        return HeadSpec(self.head, self.hidden_units, self.dropout, self.l2)


# --- the driver's part: find and validate the feature files ----------------------------------------------------

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

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)


@dataclass(frozen=True)
class TrainPlan:
    """What the Ray task needs: the config and the validated sources (plain data, pickled to the worker)."""

    config: TrainConfig
    sources: tuple[FeatureSource, ...]

    @property
    def metadata(self) -> dict[str, Any]:
        return self.sources[0].metadata

    @property
    def dim(self) -> int:
        return int(self.metadata["dim"])

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.sources)


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
    return metadata


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
    for path, (schema, _) in zip(paths, footers):
        where = storage.redact(storage.unstrip(fs, path))
        described.append((where, check_schema(schema, where)))
    check_same_features(described)
    # A single file is whole by itself; a dataset folder is complete once its extraction wrote _SUCCESS.
    complete = paths == [root] or fs.exists(storage.join(root, SUCCESS_FILE))
    if not complete:
        log.warning("%s has no %s: its extraction is unfinished; training on the %d files present",
                    storage.redact(uri), SUCCESS_FILE, len(paths))
    return FeatureSource(uri, tuple(f for _, f in footers), described[0][1], complete)


def plan_training(config: TrainConfig) -> TrainPlan:
    """Everything the driver checks before a worker is started (reads footers only)."""
    sources = tuple(describe_source(uri) for uri in config.features)
    check_same_features([(storage.redact(s.uri), s.metadata) for s in sources])
    check_output(config.output, config.overwrite)
    plan = TrainPlan(config, sources)
    if plan.rows == 0:
        raise FeatureError(f"the feature sets hold no rows: {', '.join(storage.redact(u) for u in config.features)}")
    return plan


# --- the worker's part: labels pass, split, statistics, streaming -----------------------------------------------

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


def units_of(sources: Sequence[FeatureSource]) -> list[Unit]:
    units = []
    for s, source in enumerate(sources):
        for f, feature_file in enumerate(source.files):
            start = 0
            for g, rows in enumerate(feature_file.row_groups):
                units.append(Unit(s, f, g, start, rows))
                start += rows
    return units


def index_rows(plan: TrainPlan) -> RowIndex:
    """The labels pass: only ``key`` and ``label`` are read; the split is decided here, once."""
    codes = LabelCodes()
    provisional: list[list[np.ndarray]] = []
    hashes: list[list[np.ndarray]] = []
    for source in plan.sources:
        fs, _ = storage.filesystem(source.uri)
        provisional.append([])
        hashes.append([])
        for feature_file in source.files:
            file_codes, file_hashes = _label_pass_file(fs, feature_file, codes, plan.config.seed)
            provisional[-1].append(file_codes)
            hashes[-1].append(file_hashes)
    labels, remap = codes.finish()
    flat_codes = np.concatenate([c for per_file in provisional for c in per_file])
    classes = np.where(flat_codes >= 0, remap[np.maximum(flat_codes, 0)] if len(remap) else -1, -1).astype(np.int32)
    split = stratified_split(classes, np.concatenate([h for per_file in hashes for h in per_file]),
                             plan.config.validation_split)
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
    file_codes, file_hashes = [], []

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
    """A ``fixed_size_list<float32>`` column as an (n, dim) float32 array, zero-copy when it has no nulls."""
    if column.null_count:
        raise FeatureError(f"{column.null_count} rows have a null embedding")
    values = column.flatten()  # honours the array's offset; a slice, not a copy
    return values.to_numpy(zero_copy_only=values.null_count == 0).reshape(-1, dim)


class FeatureReader:
    """Reads row groups of the feature files as (features, class) arrays of one split."""

    def __init__(self, plan: TrainPlan, index: RowIndex):
        self.plan, self.index = plan, index
        self.filesystems = [storage.filesystem(s.uri)[0] for s in plan.sources]
        self.units = units_of(plan.sources)
        self.dim = plan.dim

    def read(self, unit: Unit, split: int) -> tuple[np.ndarray, np.ndarray]:
        wanted = self.index.splits[unit.source][unit.file][unit.start:unit.start + unit.rows] == split
        classes = self.index.classes[unit.source][unit.file][unit.start:unit.start + unit.rows]
        if not wanted.any():
            return np.zeros((0, self.dim), np.float32), np.zeros(0, np.int32)
        feature_file = self.plan.sources[unit.source].files[unit.file]
        fs = self.filesystems[unit.source]

        def read_group() -> pa.Table:
            with fs.open(feature_file.path, "rb") as handle:
                return pq.ParquetFile(handle).read_row_group(unit.group, columns=["embedding"])

        table = storage.with_retries(read_group, f"read {feature_file.path}")
        if table.num_rows != unit.rows:
            raise FeatureError(f"{feature_file.path} changed during training: row group {unit.group} has "
                               f"{table.num_rows} rows, expected {unit.rows}")
        features = embeddings_of(table.column("embedding").combine_chunks(), self.dim)
        x = features if wanted.all() else features[wanted]  # a read-only view of Arrow's buffer, or a copy
        if not np.isfinite(x).all():
            raise FeatureError(f"{feature_file.path} holds non-finite feature values (NaN or inf): re-extract it "
                               "(e.g. with --precision float32)")
        return x, classes[wanted]

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
    sizes = {split: index.rows(split) for split in (TRAIN, VALIDATION)}
    needed = sum(sizes.values()) * reader.dim * 4
    cache = needed <= cache_bytes
    log.info("features: %d training and %d validation rows x %d dims (%.1f MiB): %s", sizes[TRAIN],
             sizes[VALIDATION], reader.dim, needed / 2**20,
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


# --- the fit ---------------------------------------------------------------------------------------------------

@dataclass
class TrainSummary:
    """What one training did; ``line()`` is the CLI's report."""

    output: str
    labels: tuple[str, ...] = ()
    rows_train: int = 0
    rows_validation: int = 0
    rows_unlabelled: int = 0
    train_accuracy: float = 0.0
    validation_accuracy: float = 0.0
    validation_loss: float = 0.0
    epochs_run: int = 0
    best_epoch: int = 0
    seconds: float = 0.0
    node_id: str = ""
    hostname: str = ""
    device: str = ""
    streamed: bool = False
    failed: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        return (f"{len(self.labels)} classes, {self.rows_train} training / {self.rows_validation} validation rows "
                f"({self.rows_unlabelled} unlabelled excluded); validation accuracy {self.validation_accuracy:.4f}, "
                f"loss {self.validation_loss:.4f} (train accuracy {self.train_accuracy:.4f}) at epoch "
                f"{self.best_epoch} of {self.epochs_run}; fit on {self.hostname} [{self.device}] in "
                f"{self.seconds:.1f}s -> {storage.redact(self.output)}")


def placement() -> dict[str, str]:
    """Where this process runs: Ray node id (when inside Ray), hostname and the device TensorFlow uses."""
    import tensorflow as tf

    node_id = ""
    try:
        import ray

        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray there is no node id to record
        node_id = ""
    gpus = tf.config.list_physical_devices("GPU")
    device = "CPU"
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        device = f"GPU ({details.get('device_name', gpus[0].name)})"
    return {"node_id": node_id, "hostname": socket.gethostname(), "device": device}


def _allow_gpu_memory_growth() -> None:
    """The head is small: take GPU memory as needed rather than all of it (other actors may share the GPU)."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised in this process
            pass


def execute_plan(plan: TrainPlan, secrets: storage.SecretEnv | None = None) -> TrainSummary:
    """The whole fit, on the worker that runs it: index, statistics, fit, evaluate, write the model folder.

    ``secrets``: the driver's storage credentials, passed as an argument (never in a runtime_env, which Ray logs).
    """
    from .cli import setup_logging

    if secrets:
        secrets.apply()  # before any filesystem is built in this process
    setup_logging()
    started = time.perf_counter()
    config = plan.config
    _allow_gpu_memory_growth()
    import keras

    index = index_rows(plan)
    counts_train, counts_validation = index.counts(TRAIN), index.counts(VALIDATION)
    unlabelled = index.rows(EXCLUDED)
    check_classes(index.labels, counts_train, counts_validation, unlabelled, plan.rows)
    reader = FeatureReader(plan, index)
    loaded = features_pass(reader, index, config.cache_mb * 2**20)

    keras.utils.set_random_seed(config.seed)
    spec = config.head_spec
    model = build_head(spec, plan.dim, len(index.labels), loaded.moments.mean, loaded.moments.variance, config.seed)
    model.compile(optimizer=make_optimizer(config.optimizer, config.learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    patience = config.patience or config.epochs
    callbacks = [keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True),
                 # A smaller step once the validation loss stalls: the fit settles instead of bouncing around the
                 # minimum (measured in bench/head_vs_logreg.py: it closes most of the gap to a converged logreg).
                 keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.3, patience=max(1, patience // 2 - 1),
                                                   min_lr=config.learning_rate / 1000)]
    weights = class_weights(counts_train, config.class_weight)
    fit_started = time.perf_counter()
    if loaded.arrays is not None:
        (x_train, y_train), validation = loaded.arrays[TRAIN], loaded.arrays[VALIDATION]
        history = model.fit(x_train, y_train, validation_data=validation, batch_size=config.batch_size,
                            epochs=config.epochs, shuffle=True, class_weight=weights, callbacks=callbacks, verbose=0)
    else:
        train_data = streamed_dataset(reader, TRAIN, config.batch_size, config.seed)
        validation_data = streamed_dataset(reader, VALIDATION, EVAL_BATCH_ROWS, None)
        # shuffle=False: the stream shuffles row groups and rows itself (Keras cannot shuffle a tf.data stream)
        history = model.fit(train_data, validation_data=validation_data, epochs=config.epochs, shuffle=False,
                            class_weight=weights, callbacks=callbacks, verbose=0)
    fit_seconds = time.perf_counter() - fit_started
    losses = history.history.get("val_loss", [])
    best_epoch = int(np.argmin(losses)) + 1 if losses else len(history.epoch)
    log.info("fit: %d epochs in %.1fs, best validation objective %.4f (cross-entropy + L2 penalty) at epoch %d",
             len(history.epoch), fit_seconds, min(losses) if losses else float("nan"), best_epoch)

    evaluations = {split_name: evaluate(model, reader, loaded, split, len(index.labels))
                   for split_name, split in (("train", TRAIN), ("validation", VALIDATION))}
    where = placement()
    seconds = time.perf_counter() - started
    metrics = build_metrics(plan, index, evaluations, history.history, best_epoch, counts_train, counts_validation,
                            unlabelled, where, seconds, fit_seconds, streamed=loaded.arrays is None)
    figures = {CONFUSION_FILE: confusion_figure(index.labels, evaluations["validation"]),
               CURVE_FILE: curve_figure(history.history, best_epoch)}
    export = build_head(spec, plan.dim, len(index.labels), loaded.moments.mean, loaded.moments.variance)
    export.set_weights(model.get_weights())  # an uncompiled copy: no optimizer state in the shipped head
    write_model_folder(config.output, export, model_info(plan, index.labels), metrics, figures,
                       overwrite=config.overwrite)
    return TrainSummary(
        output=config.output, labels=index.labels, rows_train=int(counts_train.sum()),
        rows_validation=int(counts_validation.sum()), rows_unlabelled=unlabelled,
        train_accuracy=evaluations["train"]["accuracy"], validation_accuracy=evaluations["validation"]["accuracy"],
        validation_loss=evaluations["validation"]["loss"], epochs_run=len(history.epoch), best_epoch=best_epoch,
        seconds=time.perf_counter() - started, node_id=where["node_id"], hostname=where["hostname"],
        device=where["device"], streamed=loaded.arrays is None)


def check_classes(labels: Sequence[str], train: np.ndarray, validation: np.ndarray, unlabelled: int,
                  total: int) -> None:
    if len(labels) < 2:
        found = f"only {labels[0]!r}" if labels else "none"
        raise FeatureError(f"training needs at least two classes; found {found} among {total - unlabelled} labelled "
                           f"rows ({unlabelled} of {total} rows have no label)")
    if unlabelled:
        log.warning("%d of %d rows have no label and are excluded", unlabelled, total)
    lonely = [label for label, n in zip(labels, validation) if n == 0]
    if lonely:
        log.warning("%d classes have a single row and no validation rows: %s", len(lonely), ", ".join(lonely[:10]))
    log.info("classes: %s", ", ".join(f"{label} ({int(t)}+{int(v)})" for label, t, v in
                                      zip(labels[:20], train, validation)))


def streamed_dataset(reader: FeatureReader, split: int, batch_size: int, seed: int | None) -> Any:
    """A ``tf.data.Dataset`` re-reading the split from storage on every pass (a new shuffle each epoch)."""
    import tensorflow as tf

    epochs = itertools.count()

    def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        rng = np.random.default_rng([seed, next(epochs)]) if seed is not None else None
        yield from reader.batches(split, batch_size, rng)

    signature = (tf.TensorSpec((None, reader.dim), tf.float32), tf.TensorSpec((None,), tf.int32))
    # Every batch but the last is full, so the count is known: Keras then shows progress and does not warn that
    # the input "ran out of data" after the first epoch.
    batches = -(-reader.index.rows(split) // batch_size)
    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
    return dataset.apply(tf.data.experimental.assert_cardinality(batches)).prefetch(2)


def evaluate(model: Any, reader: FeatureReader, loaded: Loaded, split: int, num_classes: int) -> dict[str, Any]:
    """Loss, accuracy, per-class precision/recall and the confusion matrix of the final (best) head."""
    import tensorflow as tf

    # One trace for every batch size (predict_on_batch would retrace for each new shape).
    predict = tf.function(lambda x: model(x, training=False),
                          input_signature=[tf.TensorSpec((None, reader.dim), tf.float32)])
    accumulator = EvaluationAccumulator(num_classes)
    if loaded.arrays is not None:
        x, y = loaded.arrays[split]
        batches: Iterable[tuple[np.ndarray, np.ndarray]] = (
            (x[i:i + EVAL_BATCH_ROWS], y[i:i + EVAL_BATCH_ROWS]) for i in range(0, len(y), EVAL_BATCH_ROWS))
    else:
        batches = reader.batches(split, EVAL_BATCH_ROWS)
    for x_batch, y_batch in batches:
        accumulator.update(np.asarray(predict(x_batch)), y_batch)
    return accumulator.summary(reader.index.labels)


def model_info(plan: TrainPlan, labels: tuple[str, ...]) -> ModelInfo:
    meta = plan.metadata
    return ModelInfo(backbone=str(meta["backbone"]), image_size=int(meta["image_size"]),
                     weights=WeightsRef.from_dict(meta["weights"]), feature_dim=plan.dim, labels=labels,
                     head=plan.config.head, precision=str(meta.get("precision", "float32")),
                     preprocessing=str(meta.get("preprocessing", "")), decode=str(meta.get("decode", "")))


def build_metrics(plan: TrainPlan, index: RowIndex, evaluations: dict[str, dict[str, Any]],
                  history: dict[str, list[float]], best_epoch: int, counts_train: np.ndarray,
                  counts_validation: np.ndarray, unlabelled: int, where: dict[str, str], seconds: float,
                  fit_seconds: float, streamed: bool) -> dict[str, Any]:
    return {
        "train": evaluations["train"],
        "validation": evaluations["validation"],
        "rows": {"total": plan.rows, "train": int(counts_train.sum()), "validation": int(counts_validation.sum()),
                 "excluded_unlabelled": unlabelled},
        "classes": {label: {"train": int(t), "validation": int(v)}
                    for label, t, v in zip(index.labels, counts_train, counts_validation)},
        "history": {name: [round(float(v), 6) for v in values] for name, values in history.items()},
        "epochs_run": len(next(iter(history.values()), [])),
        "best_epoch": best_epoch,
        "fit": {**where, "seconds": round(seconds, 3), "fit_seconds": round(fit_seconds, 3),
                "features": "streamed from storage" if streamed else "held in memory"},
        "features": [{"uri": storage.redact(s.uri), "files": len(s.files), "rows": s.rows, "complete": s.complete}
                     for s in plan.sources],
        "config": to_dict(plan.config),
    }


# --- figures ---------------------------------------------------------------------------------------------------

def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return buffer.getvalue()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless workers have no display
    import matplotlib.pyplot as plt

    return plt


def confusion_figure(labels: Sequence[str], evaluation: dict[str, Any]) -> bytes:
    """The validation confusion matrix as a PNG (counts written in the cells while there is room)."""
    plt = _pyplot()
    matrix = np.asarray(evaluation.get("confusion_matrix") or np.zeros((len(labels), len(labels))), dtype=np.int64)
    side = min(24.0, 3.0 + 0.45 * len(labels))
    figure, axes = plt.subplots(figsize=(side, side))
    axes.imshow(matrix, cmap="Blues")
    ticks = np.arange(len(labels))
    if len(labels) <= 60:
        axes.set_xticks(ticks, labels=labels, rotation=90)
        axes.set_yticks(ticks, labels=labels)
    if len(labels) <= 30:
        limit = matrix.max() / 2 if matrix.size else 0
        for (row, col), count in np.ndenumerate(matrix):
            axes.text(col, row, str(count), ha="center", va="center",
                      color="white" if count > limit else "black", fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    accuracy = evaluation.get("accuracy")
    axes.set_title(f"validation confusion matrix ({evaluation.get('rows', 0)} rows, accuracy "
                   f"{accuracy if accuracy is not None else float('nan'):.3f})")
    return _png(figure)


def curve_figure(history: dict[str, list[float]], best_epoch: int) -> bytes:
    """Training and validation loss and accuracy per epoch, the restored epoch marked."""
    plt = _pyplot()
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for axes, metric in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
        for prefix, name in (("", "train"), ("val_", "validation")):
            values = history.get(prefix + metric, [])
            axes.plot(range(1, len(values) + 1), values, label=name)
        axes.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best epoch {best_epoch}")
        axes.set_xlabel("epoch")
        axes.set_ylabel(metric)
        axes.legend()
    figure.suptitle("training curve")
    return _png(figure)


# --- the job ---------------------------------------------------------------------------------------------------

def default_gpus(requested: float | None) -> float:
    """An explicit value wins; otherwise one GPU when the cluster has any."""
    if requested is not None:
        return requested
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def run_train(config: TrainConfig) -> TrainSummary:
    """Validate on the driver, then fit on one Ray worker (holding a GPU when the cluster has one)."""
    import ray
    from ray.exceptions import RayTaskError

    from .pipeline import PoolOptions, actor_env, init_ray

    log_config(config)
    plan = plan_training(config)
    log.info("training on %d rows from %d feature set(s): %s %s, %d dims", plan.rows, len(plan.sources),
             plan.metadata["backbone"], WeightsRef.from_dict(plan.metadata["weights"]).identity, plan.dim)
    init_ray()
    gpus = default_gpus(config.gpus)
    task = ray.remote(execute_plan).options(
        num_cpus=1, num_gpus=gpus, max_retries=2, retry_exceptions=False,
        runtime_env={"env_vars": actor_env(PoolOptions(gpus_per_worker=gpus))})
    try:
        return ray.get(task.remote(plan, storage.SecretEnv.from_environ()))
    except RayTaskError as exc:
        # The worker's own error (bad features, unwritable output) is reported as itself, in one line.
        cause = getattr(exc, "cause", None)
        if isinstance(cause, (InputError, ModelError, storage.StorageError, ValueError)):
            raise cause from None
        raise
