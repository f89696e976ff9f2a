"""The extract job: images -> a Parquet dataset of backbone feature vectors (one part file per input shard)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa

from . import storage
from .backbones import BACKBONES, get_backbone
from .batching import auto_batch_size
from .cluster import default_gpus, resolve_precision_for_workers
from .config import log_config, option, require, to_dict
from .decode import DECODE_VERSION
from .embed import Embedder, ModelSpec
from .parquetio import with_metadata
from .pipeline import JobSummary, ShardedJob, fingerprint_of, run_sharded_job
from .pool import PoolOptions
from .precision import PRECISIONS
from .versions import library_versions
from .weights import DEFAULT_RANDOM_SEED, WeightsRef, resolve_weights
from .worker import plain_variant

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractConfig:
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
    workers: int = option("Ray actors, each holding one model", 1, metavar="N")
    gpus_per_worker: float | None = option(
        "GPUs per actor (default: 1 when the cluster has GPUs, else 0)", None, metavar="F")
    precision: str = option("compute precision; auto: bfloat16 on CPUs with AVX512-BF16/AMX, float16 on GPUs with "
                            "tensor cores, else float32 (features within cosine 0.999 of float32)", "auto",
                            choices=PRECISIONS)
    seed: int = option("seed for --weights random", DEFAULT_RANDOM_SEED, metavar="N")
    overwrite: bool = option("discard what the output holds and redo every shard", False)

    def __post_init__(self) -> None:
        get_backbone(self.backbone)
        require(self.batch_size is None or self.batch_size >= 1,
                f"--batch-size must be at least 1, got {self.batch_size}")
        require(self.shard_size >= 1, f"--shard-size must be at least 1, got {self.shard_size}")
        require(self.workers >= 1, f"--workers must be at least 1, got {self.workers}")
        require(self.gpus_per_worker is None or self.gpus_per_worker >= 0,
                f"--gpus-per-worker must be 0 or more, got {self.gpus_per_worker}")
        if self.image_size is not None:
            get_backbone(self.backbone).check_size(self.image_size)


def feature_schema(dim: int, metadata: dict[str, Any]) -> pa.Schema:
    """The feature dataset's columns: ``key``, ``label``, ``embedding`` (``fixed_size_list<float32>[dim]``)."""
    return with_metadata([("key", pa.string()), ("label", pa.string()), ("embedding", pa.list_(pa.float32(), dim))],
                         metadata)


def embeddings_table(keys: list[str], labels: list[str | None], embeddings: np.ndarray,
                     schema: pa.Schema) -> pa.Table:
    dim = schema.field("embedding").type.list_size
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1), type=pa.float32())
    vectors = pa.FixedSizeListArray.from_arrays(flat, dim)
    return pa.Table.from_arrays([pa.array(keys, pa.string()), pa.array(labels, pa.string()), vectors], schema=schema)


@dataclass(frozen=True)
class ExtractTask:
    """Extraction as a :class:`~cnnbatch.worker.ShardTask`: the embedder plus the feature table layout."""

    model: ModelSpec
    batch_size: int | None  # None: each actor sizes it to its device (batching.auto_batch_size)
    metadata: dict[str, Any]

    @property
    def image_size(self) -> int:
        return self.model.image_size

    @property
    def views(self) -> int:
        return 1

    def make_model(self) -> Embedder:
        return Embedder(self.model)

    def with_batch_size_for(self, model: Embedder, gpu_share: float) -> ExtractTask:
        if self.batch_size is not None:
            return self
        return replace(self, batch_size=auto_batch_size(model.model, self.model.precision, gpu_share))

    def variants(self, key: str, pixels: np.ndarray) -> np.ndarray:
        return plain_variant(pixels)

    def make_table(self, model: Embedder, keys: list[str], labels: list[str | None],
                   outputs: dict[str, np.ndarray]) -> pa.Table:
        metadata = dict(self.metadata)
        metadata["weights"] = {**metadata["weights"], "sha256": model.weights_sha256}
        schema = feature_schema(model.feature_dim, metadata)
        embeddings = outputs.get("embedding", np.zeros((0, 1, model.feature_dim), np.float32))
        return embeddings_table(keys, labels, embeddings[:, 0], schema)


def feature_metadata(model: ModelSpec) -> dict[str, Any]:
    """What every feature part records about how its vectors were made (CONTRACT.md: schema metadata)."""
    backbone = model.backbone_spec
    return {
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


def extraction_fingerprint(model: ModelSpec) -> str:
    return fingerprint_of({"kind": "features", "backbone": model.backbone, "weights": model.weights.identity,
                           "image_size": model.image_size, "preprocessing": model.backbone_spec.preprocessing,
                           "decode": DECODE_VERSION, "precision": model.precision})


def prepare_extract(config: ExtractConfig) -> ShardedJob:
    """Check what the driver can check (backbone, size, input reachable, weights) and describe the job."""
    log_config(config)
    backbone = get_backbone(config.backbone)
    size = backbone.check_size(config.image_size)
    storage.ensure_reachable(config.input, must_exist=True)
    weights: WeightsRef = resolve_weights(config.weights, backbone, seed=config.seed)
    gpus = default_gpus(config.gpus_per_worker)
    model = ModelSpec(backbone.name, size, weights, resolve_precision_for_workers(config.precision, gpus))
    recorded = to_dict(config) | {"weights_identity": weights.identity, "image_size": size,
                                  "precision": model.precision}
    return ShardedJob(input_uri=config.input, shard_size=config.shard_size, output_uri=config.output,
                      task=ExtractTask(model, config.batch_size, feature_metadata(model)),
                      fingerprint=extraction_fingerprint(model), config=recorded,
                      pool=PoolOptions(workers=config.workers, gpus_per_worker=gpus), overwrite=config.overwrite)


def run_extract(config: ExtractConfig) -> JobSummary:
    return run_sharded_job(prepare_extract(config))
