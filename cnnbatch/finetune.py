"""The finetune job: a model folder written by ``train`` + the images -> a model folder whose backbone's top blocks
were trained with the head, on augmented images (the second half of the transfer-learning recipe).

The driver checks the starting model (checksums, safe loading) and the output, and decides the GPUs: all of one
node's (Keras 3 cannot ``fit`` across nodes: MultiWorkerMirroredStrategy, keras-team/keras#20585). The fit runs as
one Ray task in a process of its own (cluster.run_on_worker), data-parallel over that node's GPUs with
MirroredStrategy: the images stream from the input (imagestream.py; decoded ones kept between epochs within
--cache-mb) with the recipe's views drawn afresh, the model is checkpointed each epoch (finetunefit.py), and the
model folder is written once, at the end.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from . import storage
from .augment import CLASSIC, Recipe, RecipeOptions
from .backbones import get_backbone
from .cluster import ClusterError, one_node_gpus, run_on_worker
from .config import log_config, option, require, to_dict
from .embed import ModelSpec, build_model
from .figures import confusion_figure, curve_figure
from .finetunefit import (
    Checkpoints,
    EpochState,
    FitError,
    check_finite,
    compiled_images_predict,
    fine_tune_model,
    finetune_optimizer,
    guard_normalization,
    make_strategy,
    plain_copy,
    replica_values,
    set_trainable,
)
from .fitting import evaluate_batches, rounded_history
from .head import OPTIMIZERS
from .imagestream import DecodedImages, ImageSetError, ImageSplit, ImageStream, split_images
from .modelinfo import BACKBONE_FILE, CONFUSION_FILE, CURVE_FILE, METRICS_FILE, ModelError, ModelInfo
from .modelio import (
    backbone_weights,
    check_output,
    load_model_folder,
    read_model_info,
    read_verified,
    sha256_bytes,
    write_model_folder,
)
from .pipeline import fingerprint_of
from .shards import InputError
from .tfruntime import keras_module, placement, tensorflow
from .weights import WeightsRef

log = logging.getLogger(__name__)
# Settings that change how fast a fit runs, not what it computes: a run resumes its checkpoints across them
RUN_INDEPENDENT = ("cache_mb",)


@dataclass(frozen=True)
class FinetuneConfig(RecipeOptions):
    input: str = option("the labelled images: a folder tree, .tar shards or .parquet files (any fsspec URL)",
                        metavar="URI")
    model: str = option("the model folder written by cnnbatch train (the starting head and backbone)", metavar="URI")
    output: str = option("where the fine-tuned model folder goes", metavar="URI")
    trainable_from: str | None = option("the first backbone layer to train, by Keras layer name (default: the "
                                        "last conv block: vgg16 block5_conv1, inceptionv3 mixed9)", None,
                                        metavar="LAYER")
    epochs: int = option("most passes over the training images (early stopping may end sooner)", 10, metavar="N")
    learning_rate: float = option("learning rate (low: the backbone's pretrained weights move slowly)", 1e-4,
                                  metavar="F")
    optimizer: str = option("optimizer", "sgd", choices=OPTIMIZERS)
    momentum: float = option("momentum of sgd and rmsprop", 0.9, metavar="F")
    batch_size: int = option("images per gradient step, over all replicas", 32, metavar="N")
    patience: int = option("epochs without a lower validation loss before stopping (the best epoch is kept)", 3,
                           metavar="N")
    validation_split: float | None = option("share of every class held out (default: the starting model's, so "
                                            "the same images are held out)", None, metavar="F")
    seed: int | None = option("seed of the split, the shuffling and the views (default: the starting model's)",
                              None, metavar="N")
    shard_size: int = option("images per shard for a folder input", 1000, metavar="N")
    gpus: int | None = option("GPUs of one node for the fit, data-parallel (default: all of the largest GPU "
                              "node's; 0 on a CPU-only cluster)", None, metavar="N")
    cpu_replicas: int = option("without GPUs: split the CPU into N devices and fit data-parallel over them (the "
                               "code path several GPUs take)", 1, metavar="N")
    cache_mb: int = option("decoded images kept in memory between epochs, in MiB, so that later epochs only draw "
                           "their views (0: read and decode every image every epoch)", 1024, metavar="N")
    overwrite: bool = option("replace a model already at --output", False)

    def __post_init__(self) -> None:
        require(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        require(self.learning_rate > 0, f"--learning-rate must be positive, got {self.learning_rate}")
        require(0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}")
        require(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        require(self.patience >= 0, f"--patience must be 0 or more, got {self.patience}")
        require(self.validation_split is None or 0 < self.validation_split < 1,
                f"--validation-split must be between 0 and 1, got {self.validation_split}")
        require(self.shard_size >= 1, f"--shard-size must be at least 1, got {self.shard_size}")
        require(self.gpus is None or self.gpus >= 0, f"--gpus must be 0 or more, got {self.gpus}")
        require(self.cpu_replicas >= 1, f"--cpu-replicas must be at least 1, got {self.cpu_replicas}")
        require(self.cache_mb >= 0, f"--cache-mb must be 0 or more, got {self.cache_mb}")
        require(self.batch_size >= self.cpu_replicas, f"--batch-size {self.batch_size} is smaller than "
                f"--cpu-replicas {self.cpu_replicas}: every replica needs images")
        self.check_recipe()


@dataclass(frozen=True)
class FinetunePlan:
    """What the driver decided, pickled to the worker."""

    config: FinetuneConfig
    info: ModelInfo
    digest: str  # sha256 of the starting model's manifest
    seed: int
    validation_split: float
    recipe: Recipe
    gpus: int
    run_id: str


@dataclass
class FinetuneSummary:
    """What one fine-tuning did; ``line()`` is the CLI's report."""

    output: str
    labels: tuple[str, ...] = ()
    trainable_from: str = ""
    rows_train: int = 0
    rows_validation: int = 0
    start_accuracy: float = 0.0
    validation_accuracy: float = 0.0
    validation_loss: float = 0.0
    epochs_run: int = 0
    best_epoch: int = 0
    replicas: int = 1
    device: str = ""
    seconds: float = 0.0
    failed: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        gain = self.validation_accuracy - self.start_accuracy
        best = f"epoch {self.best_epoch}" if self.best_epoch else "the starting model (no epoch beat it)"
        return (f"{len(self.labels)} classes, {self.rows_train} training / {self.rows_validation} validation images; "
                f"validation accuracy {self.validation_accuracy:.4f} (starting model {self.start_accuracy:.4f}, "
                f"{gain:+.4f}), loss {self.validation_loss:.4f}, kept {best} of {self.epochs_run}; layers from "
                f"{self.trainable_from} trained on {self.replicas} replica(s) [{self.device}] in {self.seconds:.1f}s "
                f"-> {storage.redact(self.output)}")


def starting_fit_config(uri: str, info: ModelInfo) -> dict[str, Any]:
    """The starting model's training configuration (metrics.json): its seed and validation split."""
    try:
        metrics = json.loads(read_verified(uri, info, METRICS_FILE))
    except (ModelError, ValueError):
        return {}
    config = metrics.get("config") if isinstance(metrics, dict) else None
    return config if isinstance(config, dict) else {}


def plan_finetune(config: FinetuneConfig) -> FinetunePlan:
    """Everything the driver checks before a worker starts: input, starting model, output, GPUs of one node."""
    storage.ensure_reachable(config.input, must_exist=True)
    info = read_model_info(config.model)
    load_model_folder(config.model)  # every checksum, labels.txt, the head with safe_mode=True
    digest = sha256_bytes(storage.read_bytes(*_manifest(config.model)))
    check_output(config.output, config.overwrite)
    get_backbone(info.backbone).trainable_start(_layer_names(info), config.trainable_from)
    started = starting_fit_config(config.model, info)
    seed = config.seed if config.seed is not None else int(started.get("seed", 0))
    split = config.validation_split if config.validation_split is not None else \
        float(started.get("validation_split", 0.1))
    augment = dict(info.augment or {})
    base = Recipe.from_dict(augment["recipe"]) if isinstance(augment.get("recipe"), dict) else CLASSIC
    gpus = one_node_gpus(config.gpus)
    if gpus == 0 and config.gpus is None:
        log.info("no GPU in the cluster: fine-tuning on the CPU (%d replica(s))", config.cpu_replicas)
    fitted = {name: value for name, value in to_dict(config).items() if name not in RUN_INDEPENDENT}
    run_id = fingerprint_of({"kind": "finetune", "config": fitted, "start": digest, "seed": seed,
                             "validation_split": split})
    return FinetunePlan(config, info, digest, seed, split, config.recipe(base), gpus, run_id)


def _manifest(uri: str) -> tuple[Any, str]:
    fs, path = storage.filesystem(uri)
    return fs, storage.join(path.rstrip("/"), "model.json")


def _layer_names(info: ModelInfo) -> list[str]:
    """The backbone's layer names at the model's size, built without weights (nothing is downloaded)."""
    return [layer.name for layer in get_backbone(info.backbone).build(info.image_size, weights=None).layers]


def run_finetune(config: FinetuneConfig) -> FinetuneSummary:
    """Validate on the driver, then fine-tune on one Ray worker with the GPUs of one node."""
    log_config(config)
    plan = plan_finetune(config)
    log.info("fine-tuning %s (%s, %d classes) on %s with %d GPU(s)", storage.redact(config.model),
             plan.info.backbone, len(plan.info.labels), storage.redact(config.input), plan.gpus)
    return run_on_worker(execute_finetune, plan, gpus=float(plan.gpus), fresh_process=True,
                         errors=(InputError, ModelError, ImageSetError, FitError, ClusterError,
                                 storage.StorageError, ValueError))


# --- the worker's part -----------------------------------------------------------------------------------------

def execute_finetune(plan: FinetunePlan) -> FinetuneSummary:
    """The whole fine-tuning, on the worker: split, model, fit (resuming a checkpoint), evaluate, write."""
    started = time.perf_counter()
    config, info = plan.config, plan.info
    done = _already_written(plan)
    if done is not None:  # Ray retried a task that had finished writing: the model is there, exactly once
        return done
    tensorflow()
    strategy = make_strategy(plan.gpus, config.cpu_replicas)  # before anything starts TensorFlow's runtime
    keras = keras_module()
    split = split_images(config.input, config.shard_size, info.labels, plan.seed, plan.validation_split)
    if split.train_rows == 0 or split.validation_rows == 0:
        raise ImageSetError(f"fine-tuning needs training and validation images: found {split.train_rows} and "
                            f"{split.validation_rows} labelled ones in {storage.redact(config.input)}")
    log.info("images: %d training, %d validation (%d unlabelled left out)", split.train_rows, split.validation_rows,
             split.unlabelled)
    stream = ImageStream(config.input, config.shard_size, split, info.image_size, threads=max(2, os.cpu_count() or 2),
                         cache=DecodedImages(config.cache_mb * 2**20))
    spec = get_backbone(info.backbone)
    preprocess = spec.preprocess_fn()
    with strategy.scope():
        keras.utils.set_random_seed(plan.seed)
        backbone = build_model(ModelSpec(info.backbone, info.image_size, backbone_weights(config.model, info)))
        _, head = load_model_folder(config.model)
        head, raised = guard_normalization(head)
        first, trained = set_trainable(backbone, spec, config.trainable_from)
        model = fine_tune_model(backbone, head, info.image_size)
        optimizer = finetune_optimizer(config.optimizer, config.learning_rate, config.momentum)
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        model.optimizer.build(model.trainable_variables)
    log.info("training %d layers of %s from %s on, with the head; %d replica(s); %d normalisation channels "
             "floored", trained, info.backbone, first, strategy.num_replicas_in_sync, raised)

    predict = compiled_images_predict(model, preprocess, info.image_size)

    def validate() -> dict[str, Any]:
        """Cross-entropy and accuracy on the held-out images, plain, in one process (not distributed: a replica
        count need not divide the validation set)."""
        return evaluate_batches(predict, stream.batches(True, config.batch_size), info.labels)

    checkpoints = Checkpoints(config.output, plan.run_id)
    state = checkpoints.state()
    if state is None:  # epoch 0 is the starting model: the best until an epoch beats it
        measured = validate()
        start_loss, start_accuracy = float(measured["loss"]), float(measured["accuracy"])
        state = {"epoch": 0, "best_epoch": 0, "best_loss": start_loss, "bad_epochs": 0, "history": {},
                 "start": {"loss": start_loss, "accuracy": start_accuracy}}
        checkpoints.save(model, state, best=True)
    else:
        checkpoints.load(model, "last.weights.h5")
        log.info("resuming after epoch %d from %s", state["epoch"], storage.redact(checkpoints.root))
    resumed_from = state["epoch"]
    epochs = EpochState(checkpoints, state["start"]["loss"], config.patience, dict(state["history"]),
                        state["best_epoch"], state["best_loss"], state["bad_epochs"], extra={"start": state["start"]},
                        validate=validate)
    if state["epoch"] < config.epochs and epochs.bad_epochs <= config.patience:
        train_data = stream.dataset(False, config.batch_size, plan.recipe, plan.seed, True, preprocess,
                                    first_epoch=state["epoch"], multiple=strategy.num_replicas_in_sync)
        with warnings.catch_warnings():
            # The image streams' length is known only once read (undecodable images are left out): Keras says so.
            warnings.filterwarnings("ignore", message="Your input ran out of data")
            model.fit(train_data, epochs=config.epochs, initial_epoch=state["epoch"], shuffle=False,
                      callbacks=[epochs.callback(model)], verbose=0)
    if epochs.non_finite:
        raise FitError(f"{epochs.non_finite}: fine-tuning stopped and no model was written; lower --learning-rate "
                       f"(now {config.learning_rate:g}) or train fewer layers (--trainable-from a later block)")
    checkpoints.load(model, "best.weights.h5")
    check_finite(model, lambda: "the fine-tuned weights are not finite; no model was written")
    differences = [float(np.max(np.abs(values[0] - other))) for variable in model.trainable_variables
                   if len(values := replica_values(variable)) > 1 for other in values[1:]]
    divergence = max(differences, default=0.0)
    if divergence > 0:  # keras-team/keras#21061: replicas that drift apart under MirroredStrategy
        raise FitError(f"the {strategy.num_replicas_in_sync} replicas' weights differ by up to {divergence:g} after "
                       "the fit; no model was written (fit on one device with --gpus 1 or --cpu-replicas 1)")
    state["resumed_from_epoch"] = resumed_from
    return _finish(plan, split, stream, model, backbone, head, epochs, state, first, started, strategy)


def _already_written(plan: FinetunePlan) -> FinetuneSummary | None:
    try:
        info = read_model_info(plan.config.output)
    except (ModelError, storage.StorageError):
        return None
    if (info.fine_tuned or {}).get("run_id") != plan.run_id:
        return None
    metrics = json.loads(read_verified(plan.config.output, info, METRICS_FILE))
    return FinetuneSummary(**metrics["summary"])


def _finish(plan: FinetunePlan, split: ImageSplit, stream: ImageStream, model: Any, backbone: Any, head: Any,
            epochs: EpochState, state: dict[str, Any], first: str, started: float, strategy: Any) -> FinetuneSummary:
    config, info, start = plan.config, plan.info, state["start"]
    predict = compiled_images_predict(model, get_backbone(info.backbone).preprocess_fn(), info.image_size)
    evaluations = {name: evaluate_batches(predict, stream.batches(validation, config.batch_size), info.labels)
                   for name, validation in (("train", False), ("validation", True))}
    where = placement()
    log.info("decoded images kept between epochs: %d (%.1f of %.0f MiB; --cache-mb)", len(stream.cache),
             stream.cache.used_bytes / 2**20, stream.cache.budget_bytes / 2**20)
    with tempfile.TemporaryDirectory(prefix="cnnbatch-backbone-") as tmp:
        path = os.path.join(tmp, BACKBONE_FILE)
        backbone.save_weights(path)
        with open(path, "rb") as handle:
            weights_bytes = handle.read()
    summary = FinetuneSummary(
        output=config.output, labels=info.labels, trainable_from=first, rows_train=split.train_rows,
        rows_validation=split.validation_rows, start_accuracy=round(start["accuracy"], 6),
        validation_accuracy=evaluations["validation"]["accuracy"], validation_loss=evaluations["validation"]["loss"],
        epochs_run=len(epochs.history.get("loss", [])), best_epoch=epochs.best_epoch,
        replicas=strategy.num_replicas_in_sync, device=where["device"], seconds=time.perf_counter() - started)
    metrics = {
        "train": evaluations["train"], "validation": evaluations["validation"],
        "starting_model": {"validation": {"loss": round(start["loss"], 6),
                                          "accuracy": round(start["accuracy"], 6)}},
        "gain": {"validation_accuracy": round(summary.validation_accuracy - summary.start_accuracy, 6)},
        "rows": {"train": split.train_rows, "validation": split.validation_rows,
                 "excluded_unlabelled": split.unlabelled},
        "history": rounded_history(epochs.history), "epochs_run": summary.epochs_run, "best_epoch": epochs.best_epoch,
        "fit": {**where, "replicas": summary.replicas, "trainable_from": first, "seconds": round(summary.seconds, 3),
                "resumed_from_epoch": state["resumed_from_epoch"], "replica_max_difference": 0.0,
                "epoch_train_seconds": [round(t, 3) for t in epochs.train_seconds],
                "decoded_images_cached": stream.cache.figures(),
                "train_images_per_second": round(split.train_rows / min(epochs.train_seconds), 2)
                if epochs.train_seconds else None},
        "config": to_dict(config), "recipe": plan.recipe.to_dict(), "summary": asdict(summary),
    }
    figures = {CONFUSION_FILE: confusion_figure(info.labels, evaluations["validation"]),
               CURVE_FILE: curve_figure(epochs.history, max(1, epochs.best_epoch))}
    fine_tuned = {"run_id": plan.run_id, "from": storage.redact(config.model), "from_sha256": plan.digest,
                  "start_weights": info.weights.to_dict(), "trainable_from": first}
    tuned = replace(info, weights=WeightsRef("file", uri=BACKBONE_FILE, sha256=sha256_bytes(weights_bytes)),
                    fine_tuned=fine_tuned, files={})
    head_export = plain_copy(head)
    write_model_folder(config.output, head_export, tuned, metrics, figures, overwrite=config.overwrite,
                       backbone_weights=weights_bytes)
    Checkpoints(config.output, plan.run_id).remove()
    return summary
