"""Backbone weights: ``imagenet`` (Keras' cache), ``random`` (seeded) or a notop weights file at any fsspec URL.

The driver resolves ``--weights`` to a :class:`WeightsRef` once (hashing a file, checking it is readable) so bad
weights fail before any actor starts; each node then fetches a file at most once into a content-addressed cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from . import storage
from .backbones import Backbone

log = logging.getLogger(__name__)

WeightsKind = Literal["imagenet", "random", "file"]
WEIGHT_SUFFIXES = (".weights.h5", ".h5", ".hdf5")
DEFAULT_RANDOM_SEED = 1337


class WeightsError(ValueError):
    """Weights that cannot be used, with a message naming what was expected."""


@dataclass(frozen=True)
class WeightsRef:
    """What the backbone's weights are; recorded in every output and in the resume fingerprint."""

    kind: WeightsKind
    uri: str | None = None  # the file's URL (kind "file")
    sha256: str | None = None  # of the weights file (imagenet, file); None for random
    seed: int | None = None  # kind "random"

    @property
    def identity(self) -> str:
        """What makes two runs' weights the same, for the resume fingerprint."""
        if self.kind == "random":
            return f"random:seed={self.seed}"
        return f"{self.kind}:sha256={self.sha256}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WeightsRef":
        return cls(**{k: data.get(k) for k in ("kind", "uri", "sha256", "seed")})


def cache_dir() -> Path:
    return Path(os.environ.get("CNNBATCH_CACHE", Path.home() / ".cache" / "cnnbatch"))


def resolve_weights(spec: str, backbone: Backbone, seed: int = DEFAULT_RANDOM_SEED) -> WeightsRef:
    """Turn the ``--weights`` argument into a :class:`WeightsRef`, failing fast with a clear message."""
    if spec == "random":
        return WeightsRef("random", seed=seed)
    if spec == "imagenet":
        return WeightsRef("imagenet", sha256=_imagenet_sha256(backbone))
    if not spec.endswith(WEIGHT_SUFFIXES):
        raise WeightsError(
            f"--weights must be imagenet, random, or a notop weights file ({', '.join(WEIGHT_SUFFIXES)}); got {spec!r}"
        )
    fs, path = storage.filesystem(spec)
    digest = hashlib.sha256()
    try:
        with fs.open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        raise WeightsError(f"weights file {storage.redact(spec)} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - any read failure means unusable weights
        raise WeightsError(f"cannot read weights file {storage.redact(spec)}: {storage.describe_error(exc)}") from None
    return WeightsRef("file", uri=spec, sha256=digest.hexdigest())


def _imagenet_sha256(backbone: Backbone) -> str:
    """Fetch (or find in Keras' cache) the ImageNet notop file the backbone will load, and hash it."""
    path = imagenet_path(backbone)
    return sha256_file(path)


def imagenet_path(backbone: Backbone) -> str:
    """Local path of the ImageNet notop weights through Keras' own download and cache."""
    import keras

    origin, file_hash = _IMAGENET_NOTOP[backbone.name]
    name = origin.rsplit("/", 1)[-1]
    try:
        return keras.utils.get_file(name, origin, cache_subdir="models", file_hash=file_hash)
    except Exception as exc:  # noqa: BLE001 - offline, proxy, disk: all end the same way for the user
        raise WeightsError(
            f"cannot get ImageNet weights for {backbone.name} ({storage.describe_error(exc)}); "
            "offline, pass --weights URI of a mirrored notop file (e.g. s3://bucket/" + name + ") "
            "or --weights random"
        ) from None


# The notop files keras.applications downloads (origin, md5 that Keras checks).
_KERAS_WEIGHTS = "https://storage.googleapis.com/tensorflow/keras-applications"
_IMAGENET_NOTOP: dict[str, tuple[str, str]] = {
    "vgg16": (f"{_KERAS_WEIGHTS}/vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
              "6d6bbae143d832006294945121d1f1fc"),
    "inceptionv3": (f"{_KERAS_WEIGHTS}/inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
                    "bcbd6486424b2319ff4ef7d526e38f63"),
}


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def local_weights_file(ref: WeightsRef) -> str:
    """A local copy of a ``file`` weights reference, fetched once per node into a content-addressed cache."""
    assert ref.kind == "file" and ref.uri and ref.sha256
    suffix = next(s for s in WEIGHT_SUFFIXES if ref.uri.endswith(s))
    target = cache_dir() / "weights" / f"{ref.sha256}{suffix}"
    if target.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fs, path = storage.filesystem(ref.uri)
    # Several actors on one node may race here: each downloads to its own temporary name, renames atomically.
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    storage.with_retries(lambda: fs.get_file(path, str(tmp)), f"download {storage.redact(ref.uri)}")
    got = sha256_file(tmp)
    if got != ref.sha256:
        tmp.unlink(missing_ok=True)
        raise WeightsError(f"weights file {storage.redact(ref.uri)} changed during the run: sha256 {got}, expected {ref.sha256}")
    os.replace(tmp, target)
    log.info("cached weights %s at %s", storage.redact(ref.uri), target)
    return str(target)


def keras_weights_arg(ref: WeightsRef) -> str | None:
    """What to pass as ``weights=`` to the keras.applications constructor on this node."""
    if ref.kind == "random":
        return None
    if ref.kind == "imagenet":
        return "imagenet"
    return local_weights_file(ref)
