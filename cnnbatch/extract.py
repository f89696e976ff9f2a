"""The extract job: images -> a Parquet dataset of backbone feature vectors (one part file per input shard)."""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa

from . import __version__, storage
from .batching import auto_batch_size
from .backbones import BACKBONES, get_backbone
from .config import log_config, option, require, to_dict
from .decode import DRAFT_OVERSAMPLE
from .embed import PRECISIONS, Embedder, ModelSpec, resolve_precision_for_workers
from .output import OutputDataset, embeddings_table, feature_schema
from .pipeline import JobSummary, PoolOptions, fingerprint_of, run_sharded_job
from .weights import DEFAULT_RANDOM_SEED, WeightsRef, resolve_weights

log = logging.getLogger(__name__)

# Bump when decoding changes what pixels reach the model: old outputs then no longer count as done.
DECODE_VERSION = f"pillow-bilinear-exif-draft{DRAFT_OVERSAMPLE}-v1"


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


@dataclass(frozen=True)
class ExtractTask:
    """Extraction as a :class:`~cnnbatch.worker.ShardTask`: the embedder plus the feature table layout."""

    model: ModelSpec
    batch_size: int | None  # None: each actor sizes it to its device (batching.auto_batch_size)
    metadata: dict[str, Any]

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def make_model(self) -> Embedder:
        return Embedder(self.model)

    def with_batch_size_for(self, model: Embedder, gpu_share: float) -> ExtractTask:
        if self.batch_size is not None:
            return self
        return replace(self, batch_size=auto_batch_size(model.model, self.model.precision, gpu_share))

    def make_table(self, model: Embedder, keys: list[str], labels: list[str | None],
                   outputs: dict[str, np.ndarray]) -> pa.Table:
        metadata = dict(self.metadata)
        metadata["weights"] = {**metadata["weights"], "sha256": model.weights_sha256}
        schema = feature_schema(model.feature_dim, metadata)
        embeddings = outputs.get("embedding", np.zeros((0, model.feature_dim), np.float32))
        return embeddings_table(keys, labels, embeddings, schema)


def library_versions() -> dict[str, str]:
    import fsspec
    import PIL

    versions = {"cnnbatch": __version__, "python": platform.python_version(), "pyarrow": pa.__version__,
                "numpy": np.__version__, "pillow": PIL.__version__, "fsspec": fsspec.__version__}
    try:  # recorded without importing TensorFlow in the driver
        from importlib.metadata import version

        versions["tensorflow"] = version("tensorflow")
        versions["keras"] = version("keras")
    except Exception:  # noqa: BLE001 - a missing distribution only loses a metadata field
        pass
    return versions


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


def default_gpus_per_worker(requested: float | None) -> float:
    """An explicit value wins; otherwise one GPU per actor when the cluster has any."""
    if requested is not None:
        return requested
    import ray

    from .pipeline import init_ray

    init_ray()
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def run_extract(config: ExtractConfig) -> JobSummary:
    log_config(config)
    backbone = get_backbone(config.backbone)
    size = backbone.check_size(config.image_size)
    storage.ensure_reachable(config.input, must_exist=True)
    weights: WeightsRef = resolve_weights(config.weights, backbone, seed=config.seed)
    gpus = default_gpus_per_worker(config.gpus_per_worker)
    model = ModelSpec(backbone.name, size, weights, resolve_requested_precision(config.precision, gpus))
    task = ExtractTask(model, config.batch_size, feature_metadata(model))
    recorded = to_dict(config) | {"weights_identity": weights.identity, "image_size": size,
                                  "precision": model.precision}
    output = OutputDataset(config.output)
    return run_sharded_job(
        input_uri=config.input, shard_size=config.shard_size, output=output, task=task,
        fingerprint=extraction_fingerprint(model), config=recorded,
        pool=PoolOptions(workers=config.workers, gpus_per_worker=gpus), overwrite=config.overwrite,
    )


def resolve_requested_precision(requested: str, gpus_per_worker: float) -> str:
    """Resolve ``auto`` on a node where the actors run (see embed.resolve_precision_for_workers)."""
    return resolve_precision_for_workers(requested, gpus_per_worker)
