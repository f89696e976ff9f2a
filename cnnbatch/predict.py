"""The predict job: images -> class labels with backbone + trained head, in bulk over shards or for one image.

Bulk prediction is extraction's machinery with another :class:`~cnnbatch.worker.ShardTask`: the same shard
listing, decoding, Ray actor pool, ``_errors``, atomic parts, resume and ``_SUCCESS``; each actor holds one
:class:`Predictor` (the backbone rebuilt from the model folder's weights reference, fused with the head into one
compiled function from uint8 pixels to probabilities). The resume fingerprint covers the model folder's manifest
digest, so a changed model is a new configuration, while a bucket that gained shards only has the new ones done.

One-image prediction builds the same :class:`Predictor` in-process (no Ray) and feeds it the same decoding, so
both paths give the same label and probability for the same image.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from . import storage
from .augment import CLASSIC, RECIPE_FLAGS, Recipe, RecipeOptions, with_views
from .cluster import resolve_precision_for_workers
from .config import log_config, option, require, to_dict
from .decode import DECODE_VERSION, DecodeError, decode_image
from .fetch import SCHEMES, FetchPolicy, fetch_url
from .modelio import MANIFEST_FILE, ModelError, ModelInfo, backbone_weights, load_model_folder
from .pipeline import JobSummary, ShardedJob, run_sharded_job
from .pool import pool_options
from .precision import PRECISIONS
from .predictor import Predictor, top_k
from .predicttask import (
    PredictTask,
    prediction_fingerprint,
    prediction_metadata,
    prediction_schema,
    prediction_table,
    tta_metadata,
)
from .tfruntime import resolve_precision
from .weights import DEFAULT_RANDOM_SEED

log = logging.getLogger(__name__)

# The job's public names, the prediction table's layout among them (it lives with the task, in predicttask.py).
__all__ = ["ImagePrediction", "PredictConfig", "manifest_sha256", "open_model", "predict_bulk", "predict_image",
           "prediction_schema", "prediction_table", "run_predict", "top_k"]


@dataclass(frozen=True)
class PredictConfig(RecipeOptions):
    model: str = option("the model folder written by cnnbatch train (any fsspec URL)", metavar="URI")
    input: str | None = option("bulk: images as a folder tree, .tar shards or .parquet files (any fsspec URL)",
                               None, metavar="URI")
    output: str | None = option("bulk: where the prediction Parquet dataset goes (any fsspec URL)", None,
                                metavar="URI")
    image: str | None = option("one image: a path or any fsspec URL (http(s) goes through the --image-url checks)",
                               None, metavar="PATH_OR_URI")
    image_url: str | None = option("one image fetched over http(s)", None, metavar="URL")
    top_k: int = option("also give the K most likely labels", 1, metavar="K")
    json: bool = option("one image: print the result as JSON", False)
    allow_private_urls: bool = option(
        "let --image-url reach loopback, private and link-local addresses (cloud metadata stays refused)", False)
    batch_size: int | None = option("bulk: images per model call (default: 32 on CPUs; on a GPU the largest power "
                                    "of two up to 256 whose activations fit half the actor's share of its memory)",
                                    None, metavar="N")
    shard_size: int = option("bulk: images per shard for a folder input", 1000, metavar="N")
    workers: int | None = option("bulk: Ray actors, each holding one model (default: fill the cluster: 4 per "
                                 "GPU, else one per node with its CPUs; more join as nodes do)", None, metavar="N")
    gpus_per_worker: float | None = option(
        "bulk: GPUs per actor (default: 1 with --workers, else 0.25 when the cluster has GPUs; 0 without)", None,
        metavar="F")
    precision: str | None = option(
        "compute precision (default: the one the model's training features were extracted with)", None,
        choices=PRECISIONS)
    overwrite: bool = option("bulk: discard what the output holds and redo every shard", False)
    tta: int = option("test-time augmentation: average the probability over the plain image and K seeded views "
                      "(the recipe below; default: the recipe of the features the model was trained on)", 0,
                      metavar="K")

    def __post_init__(self) -> None:
        require(self.tta >= 0, f"--tta must be 0 or more, got {self.tta}")
        self.check_recipe()
        bulk = self.input is not None or self.output is not None
        one = self.image is not None or self.image_url is not None
        require(bulk or one, "give --input and --output to predict in bulk, or --image / --image-url for one image")
        require(not (bulk and one), "give either --input/--output (bulk) or --image/--image-url (one image), not both")
        if bulk:
            require(self.input is not None, "bulk prediction needs --input URI as well as --output")
            require(self.output is not None, "bulk prediction needs --output URI as well as --input")
            require(not self.json, "--json is for one-image prediction; bulk results go to --output as Parquet")
        else:
            require(self.image is None or self.image_url is None, "give --image or --image-url, not both")
            if self.image is not None and urlsplit(self.image).scheme.lower() not in SCHEMES:
                try:  # a refused protocol (ftp://, a chained simplecache::http://...) is a bad argument
                    storage.check_uri(self.image)
                except storage.StorageError as exc:
                    raise ValueError(str(exc)) from None
            if self.image_url is not None:
                scheme = urlsplit(self.image_url).scheme.lower()
                require(scheme in SCHEMES, f"--image-url takes an http or https URL, got {scheme or 'no'} scheme "
                                           f"in {storage.redact(self.image_url)!r}; use --image for files and buckets")
        require(self.top_k >= 1, f"--top-k must be at least 1, got {self.top_k}")
        require(self.batch_size is None or self.batch_size >= 1,
                f"--batch-size must be at least 1, got {self.batch_size}")
        require(self.shard_size >= 1, f"--shard-size must be at least 1, got {self.shard_size}")
        require(self.workers is None or self.workers >= 1, f"--workers must be at least 1, got {self.workers}")
        require(self.gpus_per_worker is None or self.gpus_per_worker >= 0,
                f"--gpus-per-worker must be 0 or more, got {self.gpus_per_worker}")

    @property
    def one_image(self) -> bool:
        return self.image is not None or self.image_url is not None


# --- the model folder ------------------------------------------------------------------------------------------

def manifest_sha256(model_uri: str) -> str:
    """sha256 of the model folder's ``model.json``: it lists every file's checksum, so it identifies the model."""
    fs, path = storage.filesystem(model_uri)
    try:
        return hashlib.sha256(storage.read_bytes(fs, storage.join(path.rstrip("/"), MANIFEST_FILE))).hexdigest()
    except FileNotFoundError:
        return ""  # load_model_folder says what the folder lacks (e.g. a legacy .h5 head)


def open_model(model_uri: str, k: int) -> tuple[ModelInfo, Any, str]:
    """Load and check the model folder (checksums, safe loading, head shape): ``(info, head, manifest sha256)``."""
    digest = manifest_sha256(model_uri)
    info, head = load_model_folder(model_uri)
    if manifest_sha256(model_uri) != digest:
        raise ModelError(f"model {storage.redact(model_uri)} changed while it was being loaded; try again")
    if k > len(info.labels):
        raise ValueError(f"--top-k must be at most the model's {len(info.labels)} classes, got {k}")
    if info.decode != DECODE_VERSION:
        log.warning("the model was trained on features decoded as %s; this version decodes as %s (predictions "
                    "may differ slightly from what training saw)", info.decode, DECODE_VERSION)
    return info, head, digest


# --- running ---------------------------------------------------------------------------------------------------

def run_predict(config: PredictConfig) -> JobSummary | ImagePrediction:
    return predict_image(config) if config.one_image else predict_bulk(config)


def prepare_predict(config: PredictConfig) -> ShardedJob:
    """Check the input and the model folder on the driver, and describe the bulk job."""
    assert config.input is not None and config.output is not None
    log_config(config)
    storage.ensure_reachable(config.input, must_exist=True)
    info, _, digest = open_model(config.model, config.top_k)
    pool = pool_options(config.workers, config.gpus_per_worker)
    gpus = pool.gpus_per_worker
    precision = resolve_precision_for_workers(config.precision or info.precision, gpus)
    recipe, seed = tta_recipe(config, info)
    tta = tta_metadata(config.tta, recipe, seed) if config.tta else None
    task = PredictTask(config.model, info, precision, config.top_k, config.batch_size,
                       prediction_metadata(config.model, digest, info, precision, config.top_k, tta), config.tta,
                       recipe if config.tta else None, seed)
    recorded = to_dict(config) | {"model_sha256": digest, "precision": precision}
    if not config.tta:  # the recorded configuration is what it was before test-time augmentation existed
        recorded = {k: v for k, v in recorded.items() if k not in RECIPE_FLAGS and k != "tta"}
    return ShardedJob(input_uri=config.input, shard_size=config.shard_size, output_uri=config.output, task=task,
                      fingerprint=prediction_fingerprint(digest, config.top_k, precision, tta), config=recorded,
                      pool=pool, overwrite=config.overwrite)


def tta_recipe(config: PredictConfig, info: ModelInfo) -> tuple[Recipe, int]:
    """The views' recipe and seed: the recipe flags given, over the recipe the model's training features were
    made with (recorded in its folder), over the classic recipe."""
    augment = dict(info.augment or {})
    base = Recipe.from_dict(augment["recipe"]) if isinstance(augment.get("recipe"), dict) else CLASSIC
    return config.recipe(base), int(augment.get("seed", DEFAULT_RANDOM_SEED))


def predict_bulk(config: PredictConfig) -> JobSummary:
    return run_sharded_job(prepare_predict(config))


@dataclass
class ImagePrediction:
    """One image's answer; ``line()`` is what the terminal shows (JSON with ``--json``)."""

    image: str
    model: str
    model_sha256: str
    labels: list[str]
    probabilities: list[float]
    as_json: bool = False
    failed: dict[str, str] = field(default_factory=dict)
    bare = True  # cli.report prints line() as is: --json output must be nothing but JSON

    @property
    def label(self) -> str:
        return self.labels[0]

    @property
    def probability(self) -> float:
        return self.probabilities[0]

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "label": self.label, "probability": self.probability,
                "top_k": [{"label": lb, "probability": p} for lb, p in zip(self.labels, self.probabilities)],
                "model": self.model, "model_sha256": self.model_sha256}

    def line(self) -> str:
        if self.as_json:
            return json.dumps(self.to_dict())
        return "\n".join(f"{label} {probability:.6f}" for label, probability in zip(self.labels, self.probabilities))


def read_image(config: PredictConfig) -> tuple[str, bytes]:
    """``(what to call it, its bytes)``: http(s) through the safe fetcher, anything else through fsspec."""
    source = config.image_url or config.image
    assert source is not None
    if urlsplit(source).scheme.lower() in SCHEMES:
        return storage.redact(source), fetch_url(source, FetchPolicy(allow_private=config.allow_private_urls)).data
    fs, path = storage.filesystem(source)
    try:
        return storage.redact(source), storage.read_bytes(fs, path)
    except FileNotFoundError:
        raise storage.StorageError(f"image {storage.redact(source)} does not exist") from None
    except IsADirectoryError:
        raise storage.StorageError(f"--image {storage.redact(source)} is a folder; use --input/--output for "
                                   "bulk prediction") from None
    except Exception as exc:  # noqa: BLE001 - any read failure is reported the same way
        raise storage.StorageError(f"cannot read image {storage.redact(source)}: "
                                   f"{storage.describe_error(exc)}") from None


def predict_image(config: PredictConfig) -> ImagePrediction:
    """One image, in this process: the same decoding and fused model as the bulk path."""
    info, head, digest = open_model(config.model, config.top_k)
    source, data = read_image(config)
    try:
        pixels = decode_image(data, info.image_size)
    except DecodeError as exc:
        raise DecodeError(f"{source}: {exc}") from None
    predictor = Predictor(info, head, resolve_precision(config.precision or info.precision),
                          backbone_weights(config.model, info))
    recipe, seed = tta_recipe(config, info)
    images = with_views(pixels, recipe, config.tta, seed, source)
    probabilities = predictor.probabilities(images).mean(axis=0, keepdims=True)
    indices, best = top_k(probabilities, config.top_k)
    return ImagePrediction(source, storage.redact(config.model), digest,
                           [info.labels[i] for i in indices[0]], [float(p) for p in best[0]], config.json)
