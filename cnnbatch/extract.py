"""The extract job: images -> a Parquet dataset of backbone feature vectors (one part file per input shard)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa

from . import storage
from .augment import RECIPE_FLAGS, VIEWS_VERSION, Recipe, RecipeOptions, with_views
from .backbones import BACKBONES, get_backbone
from .batching import auto_batch_size
from .cluster import resolve_precision_for_workers
from .config import log_config, option, require, to_dict
from .decode import DECODE_VERSION
from .embed import Embedder, ModelSpec
from .parquetio import with_metadata
from .pipeline import JobSummary, ShardedJob, fingerprint_of, run_sharded_job
from .pool import pool_options
from .precision import PRECISIONS
from .versions import library_versions
from .weights import DEFAULT_RANDOM_SEED, WeightsRef, check_weights_arg, resolve_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractConfig(RecipeOptions):
    input: str = option("images: a folder tree, .tar shards or .parquet files (any fsspec URL)", metavar="URI")
    output: str = option("where the feature Parquet dataset goes (any fsspec URL)", metavar="URI")
    backbone: str = option("the CNN", "vgg16", choices=tuple(BACKBONES))
    weights: str = option("imagenet, random (seeded), or the URL of a notop weights file", "imagenet",
                          metavar="imagenet|random|URI")
    image_size: int | None = option("input size in pixels (default: the backbone's, 224 or 299)", None, metavar="N")
    batch_size: int | None = option("images per model call (default: 32 on CPUs; on a GPU the largest power of "
                                    "two up to 256 whose activations fit half the actor's share of its memory)",
                                    None, metavar="N")
    shard_size: int = option("images per shard for a folder input", 1000, metavar="N")
    workers: int | None = option("Ray actors, each holding one model (default: fill the cluster: 4 per GPU, "
                                 "else one per node with its CPUs; more join as nodes do)", None, metavar="N")
    gpus_per_worker: float | None = option(
        "GPUs per actor (default: 1 with --workers, else 0.25 when the cluster has GPUs; 0 without)", None,
        metavar="F")
    precision: str = option("compute precision; auto: bfloat16 on CPUs with AVX512-BF16/AMX, float16 on GPUs with "
                            "tensor cores, else float32 (features within cosine 0.999 of float32)", "auto",
                            choices=PRECISIONS)
    seed: int = option("seed for --weights random and for the augmented views", DEFAULT_RANDOM_SEED, metavar="N")
    overwrite: bool = option("discard what the output holds and redo every shard", False)
    augment_views: int = option("also extract K augmented views of every image (the recipe below) into the "
                                "augmented_embeddings column; 0: none", 0, metavar="K")

    def __post_init__(self) -> None:
        get_backbone(self.backbone)
        check_weights_arg(self.weights)
        require(self.augment_views >= 0, f"--augment-views must be 0 or more, got {self.augment_views}")
        self.check_recipe()
        require(self.batch_size is None or self.batch_size >= 1,
                f"--batch-size must be at least 1, got {self.batch_size}")
        require(self.shard_size >= 1, f"--shard-size must be at least 1, got {self.shard_size}")
        require(self.workers is None or self.workers >= 1, f"--workers must be at least 1, got {self.workers}")
        require(self.gpus_per_worker is None or self.gpus_per_worker >= 0,
                f"--gpus-per-worker must be 0 or more, got {self.gpus_per_worker}")
        if self.image_size is not None:
            get_backbone(self.backbone).check_size(self.image_size)


AUGMENTED_COLUMN = "augmented_embeddings"


def feature_schema(dim: int, metadata: dict[str, Any], views: int = 0) -> pa.Schema:
    """The feature dataset's columns: ``key``, ``label``, ``embedding`` (``fixed_size_list<float32>[dim]``) and,
    with augmented views, ``augmented_embeddings`` (``fixed_size_list<fixed_size_list<float32>[dim]>[views]``)."""
    fields = [("key", pa.string()), ("label", pa.string()), ("embedding", pa.list_(pa.float32(), dim))]
    if views:
        fields.append((AUGMENTED_COLUMN, pa.list_(pa.list_(pa.float32(), dim), views)))
    return with_metadata(fields, metadata)


def _vectors(values: np.ndarray, *sizes: int) -> pa.Array:
    """A float32 array as nested fixed-size lists, innermost size last."""
    array: pa.Array = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1), type=pa.float32())
    for size in reversed(sizes):
        array = pa.FixedSizeListArray.from_arrays(array, size)
    return array


def embeddings_table(keys: list[str], labels: list[str | None], embeddings: np.ndarray,
                     schema: pa.Schema, augmented: np.ndarray | None = None) -> pa.Table:
    """The feature table: ``embeddings`` ``(N, D)``; ``augmented`` ``(N, K, D)`` when the schema has views."""
    dim = schema.field("embedding").type.list_size
    columns = [pa.array(keys, pa.string()), pa.array(labels, pa.string()), _vectors(embeddings, dim)]
    if AUGMENTED_COLUMN in schema.names:
        views = schema.field(AUGMENTED_COLUMN).type.list_size
        if augmented is None or augmented.shape[1:] != (views, dim):
            raise ValueError(f"expected augmented vectors of shape (N, {views}, {dim}), got "
                             f"{None if augmented is None else augmented.shape}")
        columns.append(_vectors(augmented, views, dim))
    return pa.Table.from_arrays(columns, schema=schema)


@dataclass(frozen=True)
class ExtractTask:
    """Extraction as a :class:`~cnnbatch.worker.ShardTask`: the embedder plus the feature table layout."""

    model: ModelSpec
    batch_size: int | None  # None: each actor sizes it to its device (batching.auto_batch_size)
    metadata: dict[str, Any]
    augment_views: int = 0
    recipe: Recipe | None = None
    seed: int = DEFAULT_RANDOM_SEED  # of the views: view v of an image is drawn from (seed, key, v)

    @property
    def image_size(self) -> int:
        return self.model.image_size

    @property
    def views(self) -> int:
        return 1 + self.augment_views

    def make_model(self) -> Embedder:
        return Embedder(self.model)

    def with_batch_size_for(self, model: Embedder, gpu_share: float) -> ExtractTask:
        if self.batch_size is not None:
            return self
        return replace(self, batch_size=auto_batch_size(model.model, self.model.precision, gpu_share))

    def variants(self, key: str, pixels: np.ndarray) -> np.ndarray:
        """The plain image, then its augmented views (made here, on the decode threads)."""
        return with_views(pixels, self.recipe, self.augment_views, self.seed, key)

    def make_table(self, model: Embedder, keys: list[str], labels: list[str | None],
                   outputs: dict[str, np.ndarray]) -> pa.Table:
        metadata = dict(self.metadata)
        metadata["weights"] = {**metadata["weights"], "sha256": model.weights_sha256}
        schema = feature_schema(model.feature_dim, metadata, self.augment_views)
        embeddings = outputs.get("embedding", np.zeros((0, self.views, model.feature_dim), np.float32))
        return embeddings_table(keys, labels, embeddings[:, 0], schema,
                                embeddings[:, 1:] if self.augment_views else None)


def augment_metadata(views: int, recipe: Recipe, seed: int) -> dict[str, Any]:
    """How the augmented views were made: recorded in the metadata and the fingerprint (absent without views)."""
    return {"views": views, "recipe": recipe.to_dict(), "seed": seed, "version": VIEWS_VERSION}


def feature_metadata(model: ModelSpec, augment: dict[str, Any] | None = None) -> dict[str, Any]:
    """What every feature part records about how its vectors were made (README, "The feature dataset")."""
    backbone = model.backbone_spec
    extra = {"augment": augment} if augment else {}
    return extra | {
        "kind": "features",
        "backbone": backbone.name,
        "dim": backbone.feature_dim,
        "weights": {k: (storage.redact(v) if isinstance(v, str) else v) for k, v in model.weights.to_dict().items()},
        "image_size": model.image_size,
        "preprocessing": backbone.preprocessing,
        "decode": DECODE_VERSION,
        "precision": model.precision,
        "versions": library_versions(),
    }


def extraction_fingerprint(model: ModelSpec, augment: dict[str, Any] | None = None) -> str:
    extra = {"augment": augment} if augment else {}
    return fingerprint_of(extra | {"kind": "features", "backbone": model.backbone, "weights": model.weights.identity,
                                   "image_size": model.image_size, "preprocessing": model.backbone_spec.preprocessing,
                                   "decode": DECODE_VERSION, "precision": model.precision})


def prepare_extract(config: ExtractConfig) -> ShardedJob:
    """Check what the driver can check (backbone, size, input reachable, weights) and describe the job."""
    log_config(config)
    backbone = get_backbone(config.backbone)
    size = backbone.check_size(config.image_size)
    storage.ensure_reachable(config.input, must_exist=True)
    weights: WeightsRef = resolve_weights(config.weights, backbone, seed=config.seed)
    pool = pool_options(config.workers, config.gpus_per_worker)
    gpus = pool.gpus_per_worker
    model = ModelSpec(backbone.name, size, weights, resolve_precision_for_workers(config.precision, gpus))
    recipe = config.recipe() if config.augment_views else None
    augment = augment_metadata(config.augment_views, recipe, config.seed) if recipe else None
    recorded = to_dict(config) | {"weights_identity": weights.identity, "image_size": size,
                                  "precision": model.precision}
    if augment:
        log.info("%d augmented views per image (%d model passes per image): %s", config.augment_views,
                 1 + config.augment_views, recipe)
    else:  # no views: the recorded configuration is what it was before views existed
        recorded = {k: v for k, v in recorded.items() if k not in RECIPE_FLAGS and k != "augment_views"}
    task = ExtractTask(model, config.batch_size, feature_metadata(model, augment), config.augment_views, recipe,
                       config.seed)
    return ShardedJob(input_uri=config.input, shard_size=config.shard_size, output_uri=config.output,
                      task=task, fingerprint=extraction_fingerprint(model, augment), config=recorded,
                      pool=pool, overwrite=config.overwrite)


def run_extract(config: ExtractConfig) -> JobSummary:
    return run_sharded_job(prepare_extract(config))
