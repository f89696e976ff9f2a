"""The model folder written by ``train`` and read by ``predict``: everything needed to rebuild backbone + head.

Layout (README, "Train": the model folder)::

    head.keras             the head: raw backbone features -> class probabilities (normalisation included)
    labels.txt             the class names, one per line, in output order
    metrics.json           train/validation loss and accuracy, per-class precision/recall, rows, where it ran
    confusion_matrix.png   validation confusion matrix
    training_curve.png     loss and accuracy per epoch
    backbone.weights.h5    a fine-tuned backbone (finetune only): predict uses it in place of the weights reference
    model.json             the manifest: format, backbone reference, labels, and the sha256 of every file above

``model.json`` is written last and is what makes a folder a model: on a local filesystem the folder is built under
a hidden sibling name and renamed into place; on object stores every file is written first and the manifest last,
so a crash never leaves a folder that looks complete. Loading verifies every checksum and loads the head with
``safe_mode=True``, which refuses Lambda layers and unregistered custom code, and checks labels.txt against the
manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

from . import storage
from .modelinfo import (
    BACKBONE_FILE,
    CONFUSION_FILE,
    CURVE_FILE,
    HEAD_FILE,
    LABELS_FILE,
    LEGACY_HEAD_SUFFIXES,
    MANIFEST_FILE,
    METRICS_FILE,
    MODEL_FILES,
    MODEL_FORMAT,
    READABLE_FORMATS,
    ModelError,
    ModelInfo,
)
from .tfruntime import keras_module
from .versions import library_versions
from .weights import WeightsRef, cache_dir

log = logging.getLogger(__name__)

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- writing ---------------------------------------------------------------------------------------------------

def check_output(uri: str, overwrite: bool) -> None:
    """Refuse an ``--output`` that holds a model (unless ``overwrite``) or files cnnbatch did not write.

    Called by the driver before a fit, so a long training never ends on "output exists".
    """
    fs, path = storage.filesystem(uri)
    names = _list_names(fs, path)
    if names is None:
        return
    foreign = sorted(n for n in names if n not in MODEL_FILES and not n.startswith("."))
    if foreign:
        raise ModelError(f"--output {storage.redact(uri)} holds files that are not part of a cnnbatch model "
                         f"({', '.join(foreign[:3])}); use an empty or new folder")
    if MANIFEST_FILE in names and not overwrite:
        raise ModelError(f"--output {storage.redact(uri)} already holds a model; use --overwrite to replace it "
                         "or choose another folder")


def _list_names(fs: Any, path: str) -> list[str] | None:
    """Names directly under ``path``, or None when there is nothing there."""
    try:
        if fs.isfile(path):
            raise ModelError(f"--output {storage.unstrip(fs, path)} is a file; a model is a folder")
        entries = storage.with_retries(lambda: fs.ls(path, detail=False), f"list {path}")
    except FileNotFoundError:
        return None
    names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
    return [n for n in names if n and n != path.rstrip("/").rsplit("/", 1)[-1]] or None


def keras_bytes(model: Any) -> bytes:
    """The ``.keras`` archive of ``model`` (Keras saves to a path only, so through a private temp folder)."""
    with tempfile.TemporaryDirectory(prefix="cnnbatch-head-") as tmp:
        path = os.path.join(tmp, HEAD_FILE)
        model.save(path)
        with open(path, "rb") as handle:
            return handle.read()


def write_model_folder(uri: str, head_model: Any, info: ModelInfo, metrics: Mapping[str, Any],
                       figures: Mapping[str, bytes], overwrite: bool = False,
                       backbone_weights: bytes | None = None) -> ModelInfo:
    """Write the model folder at ``uri`` atomically; return ``info`` with the checksums of its files.

    ``backbone_weights``: a fine-tuned backbone's ``.weights.h5`` bytes (``BACKBONE_FILE``), which predict then
    uses in place of ``info.weights``."""
    unknown = sorted(set(figures) - {CONFUSION_FILE, CURVE_FILE})
    if unknown:
        raise ModelError(f"unexpected figure names {unknown}; expected {CONFUSION_FILE} and {CURVE_FILE}")
    if any("\n" in label or "\r" in label for label in info.labels):
        raise ModelError("class labels may not contain line breaks (labels.txt holds one per line)")
    check_output(uri, overwrite)
    files: dict[str, bytes] = {
        HEAD_FILE: keras_bytes(head_model),
        LABELS_FILE: "".join(f"{label}\n" for label in info.labels).encode(),
        METRICS_FILE: json.dumps(metrics, indent=1, sort_keys=True, default=_json_default).encode(),
        **figures,
    }
    if backbone_weights is not None:
        files[BACKBONE_FILE] = backbone_weights
    info = replace(info, files={name: sha256_bytes(data) for name, data in files.items()})
    manifest = {"format": MODEL_FORMAT, **info.to_dict(),
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": library_versions()}
    files[MANIFEST_FILE] = json.dumps(manifest, indent=1, sort_keys=True).encode()
    fs, path = storage.filesystem(uri)
    if storage.has_rename(fs):
        _write_local(path.rstrip("/"), files)
    else:
        _write_object_store(fs, path.rstrip("/"), files)
    log.info("model written to %s (%d classes, head %s)", storage.redact(uri), len(info.labels), info.head)
    return info


def _write_local(path: str, files: Mapping[str, bytes]) -> None:
    """Build the folder under a hidden sibling name, then rename it into place (replacing an old model)."""
    parent, _, name = path.rpartition("/")
    parent = parent or "/"
    os.makedirs(parent, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    tmp, old = os.path.join(parent, f".{name}.{token}.tmp"), os.path.join(parent, f".{name}.{token}.old")
    os.mkdir(tmp)
    try:
        for file_name, data in files.items():
            with open(os.path.join(tmp, file_name), "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        if os.path.exists(path):
            os.rename(path, old)  # the old folder is out of the way; renaming tmp in is the commit
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.exists(old) and not os.path.exists(path):
            os.rename(old, path)  # put the previous model back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_object_store(fs: Any, path: str, files: Mapping[str, bytes]) -> None:
    """Manifest off first (the folder stops looking complete), then every file, then the manifest."""
    manifest_path = storage.join(path, MANIFEST_FILE)
    if fs.exists(manifest_path):
        fs.rm_file(manifest_path)
    for name, data in files.items():
        if name != MANIFEST_FILE:
            storage.write_bytes_atomic(fs, storage.join(path, name), data)
    storage.write_bytes_atomic(fs, manifest_path, files[MANIFEST_FILE])


def _json_default(value: Any) -> Any:
    """NumPy scalars and arrays in metrics become plain JSON numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# --- reading ---------------------------------------------------------------------------------------------------

def read_model_info(uri: str) -> ModelInfo:
    """The manifest of a complete model folder, without loading Keras (for drivers and validation)."""
    fs, path = storage.filesystem(uri)
    path = path.rstrip("/")
    shown = storage.redact(uri)
    try:
        raw = storage.read_bytes(fs, storage.join(path, MANIFEST_FILE))
    except FileNotFoundError:
        legacy = _legacy_heads(fs, path)
        if legacy:
            raise ModelError(f"model {shown} has a legacy HDF5 head ({legacy[0]}), which is refused: retrain it with "
                             f"cnnbatch train (writes {HEAD_FILE} and {MANIFEST_FILE})") from None
        raise ModelError(f"{shown} is not a complete cnnbatch model folder: no {MANIFEST_FILE} "
                         "(an unfinished training never writes it)") from None
    except Exception as exc:  # noqa: BLE001 - storage failures end the same way for the user
        raise storage.StorageError(f"cannot read model {shown}: {storage.describe_error(exc)}") from None
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise ModelError(f"{MANIFEST_FILE} of {shown} is not valid JSON") from None
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found not in READABLE_FORMATS:
        raise ModelError(f"model {shown} has format {found!r}; this cnnbatch reads "
                         f"{', '.join(sorted(READABLE_FORMATS))}")
    info = ModelInfo.from_dict(manifest)
    head_files = [n for n in info.files if n.endswith(LEGACY_HEAD_SUFFIXES) and n != BACKBONE_FILE]
    if head_files or HEAD_FILE not in info.files:
        raise ModelError(f"model {shown} has no {HEAD_FILE} head"
                         + (f" but a legacy HDF5 one ({head_files[0]}), which is refused" if head_files else ""))
    return info


def _legacy_heads(fs: Any, path: str) -> list[str]:
    names = _list_names(fs, path) or []
    return sorted(n for n in names if n.endswith(LEGACY_HEAD_SUFFIXES) and n != BACKBONE_FILE)


def read_verified(uri: str, info: ModelInfo, name: str) -> bytes:
    """One file of the model folder, checked against the manifest's sha256."""
    fs, path = storage.filesystem(uri)
    expected = info.files.get(name)
    if expected is None:
        raise ModelError(f"{name} is not listed in {MANIFEST_FILE} of {storage.redact(uri)}")
    try:
        data = storage.read_bytes(fs, storage.join(path.rstrip("/"), name))
    except FileNotFoundError:
        raise ModelError(f"model {storage.redact(uri)} is missing {name}, which {MANIFEST_FILE} lists") from None
    got = sha256_bytes(data)
    if got != expected:
        raise ModelError(f"{name} of model {storage.redact(uri)} does not match {MANIFEST_FILE} "
                         f"(sha256 {got[:12]}..., expected {expected[:12]}...): the folder was modified or is torn")
    return data


def verify_model_folder(uri: str, info: ModelInfo | None = None) -> ModelInfo:
    """Check every file listed in the manifest; return the manifest."""
    info = info or read_model_info(uri)
    for name in sorted(info.files):
        read_verified(uri, info, name)
    return info


def _lambda_layers(node: Any) -> Iterator[str]:
    """Names of the Lambda layers anywhere in a Keras config (nested models included)."""
    if isinstance(node, dict):
        if node.get("class_name") == "Lambda":
            yield str((node.get("config") or {}).get("name", "?"))
        for value in node.values():
            yield from _lambda_layers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _lambda_layers(value)


def refuse_lambda_layers(data: bytes, what: str = "head") -> None:
    """safe_mode only refuses a Lambda's Python bytecode: a Lambda naming any Keras function still loads and runs
    it. A head never needs one, so any Lambda layer is refused before Keras deserialises anything."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, ValueError):
        return  # not a .keras archive: load_model says why
    found = sorted(set(_lambda_layers(config)))
    if found:
        raise ModelError(f"the {what} has Lambda layers ({', '.join(found)}), which can run arbitrary code: refused "
                         "before loading with safe_mode=True")


def load_head_bytes(data: bytes, what: str = "head") -> Any:
    """A Keras model from ``.keras`` bytes with ``safe_mode=True`` (no Lambda layers, no custom code)."""
    keras = keras_module()

    refuse_lambda_layers(data, what)
    with tempfile.TemporaryDirectory(prefix="cnnbatch-head-") as tmp:
        path = os.path.join(tmp, HEAD_FILE)
        with open(path, "wb") as handle:
            handle.write(data)
        try:
            return keras.saving.load_model(path, compile=False, safe_mode=True)
        except Exception as exc:  # noqa: BLE001 - any failure means the head cannot be trusted or used
            raise ModelError(f"cannot load the {what} with safe_mode=True (Lambda layers and unregistered custom "
                             f"code are refused): {storage.describe_error(exc)}") from None


def load_model_folder(uri: str) -> tuple[ModelInfo, Any]:
    """Verify a model folder and load its head; the head's shapes must match the manifest."""
    info = verify_model_folder(uri)
    head = load_head_bytes(read_verified(uri, info, HEAD_FILE), f"head of {storage.redact(uri)}")
    inputs, outputs = head.input_shape, head.output_shape
    if tuple(inputs)[-1] != info.feature_dim or tuple(outputs)[-1] != len(info.labels):
        raise ModelError(f"the head of {storage.redact(uri)} maps {inputs} -> {outputs}, but {MANIFEST_FILE} says "
                         f"{info.feature_dim} features -> {len(info.labels)} classes")
    check_labels_file(uri, info)
    return info, head


def check_labels_file(uri: str, info: ModelInfo) -> None:
    """labels.txt must list exactly the manifest's labels, in order (a shortened file would mislabel)."""
    if LABELS_FILE not in info.files:
        raise ModelError(f"model {storage.redact(uri)} lists no {LABELS_FILE} in {MANIFEST_FILE}")
    text = read_verified(uri, info, LABELS_FILE).decode("utf-8", "replace")
    found = tuple(text.split("\n")[:-1]) if text.endswith("\n") else tuple(text.split("\n"))
    if found != info.labels:
        raise ModelError(f"{LABELS_FILE} of model {storage.redact(uri)} lists {len(found)} labels "
                         f"({', '.join(found[:5])}{'...' if len(found) > 5 else ''}), {MANIFEST_FILE} "
                         f"{len(info.labels)} ({', '.join(info.labels[:5])}{'...' if len(info.labels) > 5 else ''}): "
                         "the folder was modified; retrain or restore it")


def backbone_weights(uri: str, info: ModelInfo) -> WeightsRef:
    """The weights the model's backbone runs with: its own fine-tuned ``BACKBONE_FILE`` (verified against the
    manifest and cached on this node under its sha256), or the reference the training features were made with."""
    if not info.has_backbone_file:
        return info.weights
    sha256 = info.files[BACKBONE_FILE]
    target = cache_dir() / "weights" / f"{sha256}.weights.h5"
    if not target.exists():
        data = read_verified(uri, info, BACKBONE_FILE)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return WeightsRef("file", uri=str(target), sha256=sha256)
