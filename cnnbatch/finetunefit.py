"""The fine-tuning model and its fit: backbone + head as one Keras model, the top blocks trainable, BatchNorm in
inference mode, the head's normalisation guarded, data-parallel over one node's devices, checkpointed each epoch.

- The backbone is called with ``training=False`` and its BatchNormalization layers are frozen, as Keras'
  transfer-learning guide requires: their moving statistics never change.
- The head's first layer divides each feature by its training standard deviation; channels whose frozen-feature
  variance is (near) zero would divide the moving backbone's features by epsilon, so their variance is floored
  (:func:`floored_variance`) before the fit.
- :class:`EpochState` keeps the best epoch (the starting model is epoch 0: an epoch must beat it on the validation
  loss to replace it), stops the fit on a non-finite loss, and writes a checkpoint (weights and optimizer state)
  each epoch under the output, so a worker that dies resumes from its last epoch when Ray retries the task.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import storage
from .backbones import Backbone
from .modelinfo import CHECKPOINT_DIR
from .tfruntime import keras_module, tensorflow

log = logging.getLogger(__name__)

VARIANCE_FLOOR_RELATIVE = 1e-4  # of the median feature variance
VARIANCE_FLOOR_ABSOLUTE = 1e-6


class FitError(RuntimeError):
    """A fit that cannot go on (a non-finite loss), with a one-line reason and the remedy."""


def floored_variance(variance: np.ndarray) -> np.ndarray:
    """Each feature's variance, at least a small share of the median variance, so that a channel (near) constant
    in the frozen features cannot blow up once the backbone moves."""
    floor = max(VARIANCE_FLOOR_ABSOLUTE, VARIANCE_FLOOR_RELATIVE * float(np.median(variance)))
    return np.maximum(variance, floor).astype(np.float32)


def guard_normalization(head: Any) -> tuple[Any, int]:
    """The head with the variance of its ``normalize`` layer floored (a clone: the same weights, the floored
    statistics in its config, so head.keras keeps them); and how many channels were raised."""
    keras = keras_module()
    raised = [0]

    def clone(layer: Any) -> Any:
        config = layer.get_config()
        if layer.name == "normalize" and config.get("variance") is not None:
            variance = np.asarray(config["variance"], dtype=np.float64).reshape(-1)
            guarded = floored_variance(variance)
            raised[0] = int((guarded > variance).sum())
            config["variance"] = guarded.tolist()
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(head, clone_function=clone)
    copy.set_weights(head.get_weights())
    return copy, raised[0]


def set_trainable(backbone: Any, spec: Backbone, trainable_from: str | None) -> tuple[str, int]:
    """Freeze the backbone below ``trainable_from`` and every BatchNormalization layer; returns the first trained
    layer's name and how many layers have trainable weights."""
    keras = keras_module()
    names = [layer.name for layer in backbone.layers]
    start = spec.trainable_start(names, trainable_from)
    trained = 0
    for index, layer in enumerate(backbone.layers):
        layer.trainable = index >= start and not isinstance(layer, keras.layers.BatchNormalization)
        trained += bool(layer.trainable and layer.weights)
    return names[start], trained


def fine_tune_model(backbone: Any, head: Any, image_size: int) -> Any:
    """Preprocessed float32 images -> probabilities: the backbone (inference mode) and the head."""
    keras = keras_module()
    inputs = keras.Input((image_size, image_size, 3), dtype="float32", name="pixels")
    features = backbone(inputs, training=False)
    outputs = head(keras.ops.cast(features, "float32"), training=False)
    return keras.Model(inputs, outputs, name="cnnbatch_finetune")


def make_strategy(gpus: int, cpu_replicas: int) -> Any:
    """MirroredStrategy over this node's GPUs, or over ``cpu_replicas`` logical CPU devices (the same
    data-parallel code path, for machines without GPUs); the default strategy for one device."""
    tf = tensorflow()
    if gpus >= 1:
        devices = [device.name for device in tf.config.list_logical_devices("GPU")][:gpus]
        return tf.distribute.MirroredStrategy(devices) if len(devices) > 1 else tf.distribute.get_strategy()
    if cpu_replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas)
        except RuntimeError:  # the runtime started already in this process: its devices stand
            pass
        devices = [device.name for device in tf.config.list_logical_devices("CPU")][:cpu_replicas]
        if len(devices) < cpu_replicas:
            raise FitError(f"--cpu-replicas {cpu_replicas}: this process has {len(devices)} CPU device(s) (the "
                           "split must happen before TensorFlow starts)")
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.get_strategy()


def replica_values(variable: Any) -> list[np.ndarray]:
    """A (mirrored) variable's value on each replica: one array without a distribution strategy."""
    value = getattr(variable, "value", variable)
    parts = getattr(value, "values", None)
    return [np.asarray(part.numpy()) for part in parts] if parts else [np.asarray(variable.numpy())]


@dataclass
class Checkpoints:
    """Per-epoch state of a fit under ``<output>/.checkpoints`` (hidden: never part of the model folder):
    ``last.weights.h5`` (weights and optimizer state after the last finished epoch), ``best.weights.h5`` and
    ``state.json``. A run id ties them to one configuration, so another run never resumes from them."""

    output: str
    run_id: str
    fs: Any = field(init=False)
    root: str = field(init=False)

    def __post_init__(self) -> None:
        self.fs, path = storage.filesystem(self.output)
        self.root = storage.join(path.rstrip("/"), CHECKPOINT_DIR)

    def _path(self, name: str) -> str:
        return storage.join(self.root, name)

    def state(self) -> dict[str, Any] | None:
        try:
            state = json.loads(storage.read_bytes(self.fs, self._path("state.json")))
        except FileNotFoundError:
            return None
        except ValueError:  # a torn state: start over
            return None
        return state if isinstance(state, dict) and state.get("run_id") == self.run_id else None

    def save(self, model: Any, state: dict[str, Any], best: bool) -> None:
        names = ["last.weights.h5"] + (["best.weights.h5"] if best else [])
        with tempfile.TemporaryDirectory(prefix="cnnbatch-ckpt-") as tmp:
            local = os.path.join(tmp, "m.weights.h5")
            model.save_weights(local)
            with open(local, "rb") as handle:
                data = handle.read()
        for name in names:
            storage.write_bytes_atomic(self.fs, self._path(name), data)
        body = json.dumps({**state, "run_id": self.run_id, "pid": os.getpid()}, sort_keys=True).encode()
        storage.write_bytes_atomic(self.fs, self._path("state.json"), body)  # last: names the files above

    def load(self, model: Any, name: str) -> None:
        with tempfile.TemporaryDirectory(prefix="cnnbatch-ckpt-") as tmp:
            local = os.path.join(tmp, name)
            with open(local, "wb") as handle:
                handle.write(storage.read_bytes(self.fs, self._path(name)))
            model.load_weights(local)

    def has(self, name: str) -> bool:
        return bool(self.fs.exists(self._path(name)))

    def remove(self) -> None:
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)


class EpochState:
    """The fit's bookkeeping as a Keras callback: the best validation loss (the starting model's until an epoch
    beats it), early stopping, a checkpoint each epoch, and a stop on a non-finite loss."""

    def __init__(self, checkpoints: Checkpoints, start_loss: float, patience: int, history: dict[str, list[float]],
                 best_epoch: int = 0, best_loss: float | None = None, bad_epochs: int = 0,
                 extra: dict[str, Any] | None = None, validate: Callable[[], dict[str, Any]] | None = None):
        self.checkpoints = checkpoints
        self.validate = validate  # the held-out loss and accuracy after an epoch (else Keras' val_ logs)
        self.extra = dict(extra or {})  # recorded in every checkpoint's state (the starting model's figures)
        self.best_loss = start_loss if best_loss is None else best_loss
        self.best_epoch, self.patience, self.bad_epochs = best_epoch, patience, bad_epochs
        self.history = history
        self.non_finite: str | None = None
        self.epoch_started = 0.0
        self.train_seconds: list[float] = []  # per epoch run in this process (a resumed fit counts its own)

    def callback(self, model: Any) -> Any:
        keras = keras_module()
        state = self

        class _Callback(keras.callbacks.Callback):  # type: ignore[name-defined]
            def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
                state.epoch_started = time.perf_counter()

            def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
                loss = (logs or {}).get("loss")
                if loss is not None and not math.isfinite(float(loss)):
                    state.non_finite = f"the training loss became {float(loss)} at batch {batch + 1}"
                    self.model.stop_training = True

            def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
                # the epoch's training time: its batches, before the validation pass
                state.train_seconds.append(time.perf_counter() - state.epoch_started)
                state.end_epoch(model, epoch + 1, dict(logs or {}))
                if state.non_finite or state.bad_epochs > state.patience:
                    self.model.stop_training = True

        return _Callback()

    def end_epoch(self, model: Any, epoch: int, logs: dict[str, Any]) -> None:
        if self.validate is not None:
            measured = self.validate()
            logs = {**logs, "val_loss": measured["loss"], "val_accuracy": measured["accuracy"]}
        val_loss = float(logs.get("val_loss", math.inf))
        if not math.isfinite(val_loss) or not math.isfinite(float(logs.get("loss", 0.0))):
            self.non_finite = self.non_finite or f"the loss became non-finite in epoch {epoch}"
            return  # no checkpoint of a broken epoch
        for name, value in logs.items():
            self.history.setdefault(name, []).append(float(value))
        improved = val_loss < self.best_loss
        if improved:
            self.best_loss, self.best_epoch, self.bad_epochs = val_loss, epoch, 0
        else:
            self.bad_epochs += 1
        log.info("epoch %d: loss %.4f, validation loss %.4f, accuracy %.4f%s", epoch, float(logs.get("loss", 0)),
                 val_loss, float(logs.get("val_accuracy", 0)), " (best so far)" if improved else "")
        state = {**self.extra, "epoch": epoch, "best_epoch": self.best_epoch, "best_loss": self.best_loss,
                 "bad_epochs": self.bad_epochs, "history": self.history}
        self.checkpoints.save(model, state, best=improved)


def check_finite(model: Any, what: Callable[[], str]) -> None:
    """Refuse to go on with weights that are not finite (a model is never written with NaN in it)."""
    for weight in model.weights:
        if not np.isfinite(np.asarray(weight.numpy())).all():
            raise FitError(what())


def compiled_images_predict(model: Any, preprocess: Any, size: int) -> Any:
    """uint8 ``(N, S, S, 3)`` -> probabilities: preprocess and the model in inference mode, one compiled call."""
    tf = tensorflow()
    return tf.function(lambda x: model(preprocess(tf.cast(x, tf.float32)), training=False), autograph=False,
                       input_signature=[tf.TensorSpec((None, size, size, 3), tf.uint8)])


def finetune_optimizer(name: str, learning_rate: float, momentum: float) -> Any:
    """finetune's optimizers: ``momentum`` for sgd and rmsprop (head.make_optimizer is train's, with Nesterov)."""
    keras = keras_module()
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=learning_rate, momentum=momentum)
    return keras.optimizers.Adam(learning_rate=learning_rate)


def plain_copy(head: Any) -> Any:
    """The head rebuilt outside any distribution strategy with the fine-tuned weights (what head.keras holds)."""
    keras = keras_module()
    copy = keras.models.clone_model(head)
    copy.set_weights([np.asarray(w) for w in head.get_weights()])
    return copy
