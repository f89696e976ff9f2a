"""The train job: feature Parquet -> a classifier head in a model folder, fitted on one Ray worker.

The driver (possibly a CPU-only head node) only reads Parquet footers (featuresets.py): every feature set was made
by the same backbone, weights and image size, and ``--output`` may receive a model. The fit runs as one Ray task
that holds a GPU when the cluster has one (cluster.run_on_worker), streaming the features from storage
(featurestream.py), and writes the model folder (modelio.py) with its metrics and figures.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import storage
from .cluster import default_gpus, run_on_worker
from .config import log_config, option, require, to_dict
from .featuresets import FeatureError, FeatureSource, check_same_features, describe_source
from .featurestream import FeatureReader, Loaded, RowIndex, features_pass, index_rows, streamed_dataset
from .figures import confusion_figure, curve_figure
from .fitting import EVAL_BATCH_ROWS, best_epoch, compiled_predict, evaluate_batches, fit_callbacks, rounded_history
from .head import EXCLUDED, HEADS, OPTIMIZERS, TRAIN, VALIDATION, HeadSpec, build_head, class_weights, make_optimizer
from .modelio import CONFUSION_FILE, CURVE_FILE, ModelError, ModelInfo, check_output, write_model_folder
from .shards import InputError
from .tfruntime import keras_module, placement, tensorflow
from .weights import WeightsRef

log = logging.getLogger(__name__)

__all__ = ["FeatureError", "TrainConfig", "TrainPlan", "TrainSummary", "execute_plan", "plan_training", "run_train"]


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
    views: str = option("all: train on the plain vector and every augmented view of each training image (features "
                        "extracted with --augment-views); none: plain vectors only. Validation is always plain",
                        "all", choices=("all", "none"))

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


def plan_training(config: TrainConfig) -> TrainPlan:
    """Everything the driver checks before a worker is started (reads footers only)."""
    sources = tuple(describe_source(uri) for uri in config.features)
    check_same_features([(storage.redact(s.uri), s.metadata) for s in sources])
    check_output(config.output, config.overwrite)
    plan = TrainPlan(config, sources)
    if plan.rows == 0:
        raise FeatureError(f"the feature sets hold no rows: {', '.join(storage.redact(u) for u in config.features)}")
    return plan


@dataclass
class TrainSummary:
    """What one training did; ``line()`` is the CLI's report."""

    output: str
    labels: tuple[str, ...] = ()
    rows_train: int = 0
    rows_from_views: int = 0  # training vectors that are augmented views of the training rows
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
        views = f" + {self.rows_from_views} augmented views" if self.rows_from_views else ""
        return (f"{len(self.labels)} classes, {self.rows_train} training{views} / {self.rows_validation} validation "
                f"rows ({self.rows_unlabelled} unlabelled excluded); validation accuracy "
                f"{self.validation_accuracy:.4f}, loss {self.validation_loss:.4f} (train accuracy "
                f"{self.train_accuracy:.4f}) at epoch {self.best_epoch} of {self.epochs_run}; fit on "
                f"{self.hostname} [{self.device}] in "
                f"{self.seconds:.1f}s -> {storage.redact(self.output)}")


def execute_plan(plan: TrainPlan) -> TrainSummary:
    """The whole fit, on the worker that runs it: index, statistics, fit, evaluate, write the model folder."""
    started = time.perf_counter()
    config = plan.config
    tensorflow()
    keras = keras_module()

    index = index_rows(plan.sources, config.seed, config.validation_split)
    counts_train, counts_validation = index.counts(TRAIN), index.counts(VALIDATION)
    unlabelled = index.rows(EXCLUDED)
    check_classes(index.labels, counts_train, counts_validation, unlabelled, plan.rows)
    reader = FeatureReader(plan.sources, plan.dim, index, use_views=config.views == "all")
    loaded = features_pass(reader, index, config.cache_mb * 2**20)
    from_views = reader.vectors(TRAIN) - index.rows(TRAIN)

    keras.utils.set_random_seed(config.seed)
    spec = config.head_spec
    model = build_head(spec, plan.dim, len(index.labels), loaded.moments.mean, loaded.moments.variance, config.seed)
    model.compile(optimizer=make_optimizer(config.optimizer, config.learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    callbacks = fit_callbacks(config.patience, config.epochs, config.learning_rate)
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
    best = best_epoch(history.history)
    log.info("fit: %d epochs in %.1fs, best validation objective %.4f (cross-entropy + L2 penalty) at epoch %d",
             len(history.epoch), fit_seconds, min(losses) if losses else float("nan"), best)

    # Every reported metric is on plain vectors: the training rows' views are for the fit only.
    plain = FeatureReader(plan.sources, plan.dim, index, use_views=False)
    evaluations = {split_name: evaluate(model, plain, loaded if not from_views or split == VALIDATION else None,
                                        split)
                   for split_name, split in (("train", TRAIN), ("validation", VALIDATION))}
    where = placement()
    seconds = time.perf_counter() - started
    metrics = build_metrics(plan, index, evaluations, history.history, best, counts_train, counts_validation,
                            unlabelled, where, seconds, fit_seconds, streamed=loaded.arrays is None)
    if any(source.views for source in plan.sources):  # features with views: how many training vectors they gave
        metrics["rows"]["train_from_views"] = from_views
    figures = {CONFUSION_FILE: confusion_figure(index.labels, evaluations["validation"]),
               CURVE_FILE: curve_figure(history.history, best)}
    export = build_head(spec, plan.dim, len(index.labels), loaded.moments.mean, loaded.moments.variance)
    export.set_weights(model.get_weights())  # an uncompiled copy: no optimizer state in the shipped head
    write_model_folder(config.output, export, model_info(plan, index.labels, trained_on_views=bool(from_views)),
                       metrics, figures, overwrite=config.overwrite)
    return TrainSummary(
        output=config.output, labels=index.labels, rows_train=int(counts_train.sum()), rows_from_views=from_views,
        rows_validation=int(counts_validation.sum()), rows_unlabelled=unlabelled,
        train_accuracy=evaluations["train"]["accuracy"], validation_accuracy=evaluations["validation"]["accuracy"],
        validation_loss=evaluations["validation"]["loss"], epochs_run=len(history.epoch), best_epoch=best,
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


def evaluate(model: Any, reader: FeatureReader, loaded: Loaded | None, split: int) -> dict[str, Any]:
    """Loss, accuracy, per-class precision/recall and the confusion matrix of the final (best) head, from the
    arrays in memory when ``loaded`` holds them, else read from storage."""
    if loaded is not None and loaded.arrays is not None:
        x, y = loaded.arrays[split]
        batches: Iterable[tuple[np.ndarray, np.ndarray]] = (
            (x[i:i + EVAL_BATCH_ROWS], y[i:i + EVAL_BATCH_ROWS]) for i in range(0, len(y), EVAL_BATCH_ROWS))
    else:
        batches = reader.batches(split, EVAL_BATCH_ROWS)
    return evaluate_batches(compiled_predict(model, (reader.dim,)), batches, reader.index.labels)


def model_info(plan: TrainPlan, labels: tuple[str, ...], trained_on_views: bool = False) -> ModelInfo:
    """The manifest of the trained head; with views, the recipe they were made with (predict --tta's default)."""
    meta = plan.metadata
    augment = next((s.metadata.get("augment") for s in plan.sources if s.views), None) if trained_on_views else None
    return ModelInfo(backbone=str(meta["backbone"]), image_size=int(meta["image_size"]),
                     weights=WeightsRef.from_dict(meta["weights"]), feature_dim=plan.dim, labels=labels,
                     head=plan.config.head, precision=str(meta.get("precision", "float32")),
                     preprocessing=str(meta.get("preprocessing", "")), decode=str(meta.get("decode", "")),
                     augment=augment)


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
        "history": rounded_history(history),
        "epochs_run": len(next(iter(history.values()), [])),
        "best_epoch": best_epoch,
        "fit": {**where, "seconds": round(seconds, 3), "fit_seconds": round(fit_seconds, 3),
                "features": "streamed from storage" if streamed else "held in memory"},
        "features": [{"uri": storage.redact(s.uri), "files": len(s.files), "rows": s.rows, "complete": s.complete}
                     for s in plan.sources],
        "config": to_dict(plan.config),
    }


def run_train(config: TrainConfig) -> TrainSummary:
    """Validate on the driver, then fit on one Ray worker (holding a GPU when the cluster has one)."""
    log_config(config)
    plan = plan_training(config)
    log.info("training on %d rows from %d feature set(s): %s %s, %d dims", plan.rows, len(plan.sources),
             plan.metadata["backbone"], WeightsRef.from_dict(plan.metadata["weights"]).identity, plan.dim)
    gpus = default_gpus(config.gpus)
    return run_on_worker(execute_plan, plan, gpus=gpus,
                         errors=(InputError, ModelError, storage.StorageError, ValueError))
