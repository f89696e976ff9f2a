"""Backbone weights: ``imagenet`` (Keras' cache), ``random`` (seeded) or a notop weights file on storage.

The driver resolves ``--weights`` to a :class:`WeightsRef` once (hashing a file, checking it is readable) so bad
weights fail before any actor starts; each node then fetches a file at most once into a content-addressed cache.
A reference read back from data (a model's ``model.json``, a features dataset's metadata) is untrusted: it is
validated (:func:`validate_weights_ref`) before anything is fetched, so that a manifest cannot point the predictor
at an http server, a chained URL or a file that is no weights file, and every download is checked against the
reference's sha256.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, cast

from . import storage
from .backbones import Backbone

log = logging.getLogger(__name__)

WeightsKind = Literal["imagenet", "random", "file"]
WEIGHTS_KINDS = ("imagenet", "random", "file")
WEIGHT_SUFFIXES = (".weights.h5", ".h5", ".hdf5")
DEFAULT_RANDOM_SEED = 1337
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


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
    def from_dict(cls, data: Mapping[str, Any]) -> WeightsRef:
        """The reference as recorded (not validated: see :meth:`checked`)."""
        if not isinstance(data, Mapping):
            raise WeightsError(f"a weights reference must be a mapping, got {type(data).__name__}")
        return cls(kind=cast(WeightsKind, data.get("kind")), uri=data.get("uri"), sha256=data.get("sha256"),
                   seed=data.get("seed"))

    def checked(self, where: str = "weights reference") -> WeightsRef:
        """This reference, once :func:`validate_weights_ref` found it usable."""
        return validate_weights_ref(self, where)


def _shown(value: object) -> str:
    """A value from untrusted data, quoted, on one line, short and without credentials."""
    text = repr(value)
    return storage.redact(text if len(text) <= 120 else text[:117] + "...")


def validate_weights_ref(ref: WeightsRef, where: str = "weights reference") -> WeightsRef:
    """``ref`` when it can be used as it says; :class:`WeightsError` (one line, starting with ``where``) if not.

    The kind is imagenet, random or file; random needs an integer seed; a file needs the URI of a weights file
    (``.weights.h5``, ``.h5``, ``.hdf5``) on storage that :func:`cnnbatch.storage.filesystem` opens (never http(s)
    or a chained URL) and the 64 hex digits of its sha256, which the download is checked against.
    """
    if ref.kind not in WEIGHTS_KINDS:
        raise WeightsError(f"{where}: kind must be one of {', '.join(WEIGHTS_KINDS)}; got {_shown(ref.kind)}")
    if ref.kind == "random":
        if not isinstance(ref.seed, int) or isinstance(ref.seed, bool):
            raise WeightsError(f"{where}: random weights need an integer seed; got {_shown(ref.seed)}")
        return ref
    if ref.sha256 is not None or ref.kind == "file":
        if not isinstance(ref.sha256, str) or not SHA256_HEX.fullmatch(ref.sha256):
            raise WeightsError(f"{where}: sha256 must be 64 lower-case hex digits; got {_shown(ref.sha256)}")
    if ref.kind == "file":
        if not isinstance(ref.uri, str) or not ref.uri.endswith(WEIGHT_SUFFIXES):
            raise WeightsError(f"{where}: a weights file's URI must end in {', '.join(WEIGHT_SUFFIXES)}; "
                               f"got {_shown(ref.uri)}")
        try:
            storage.check_uri(ref.uri)
        except storage.StorageError as exc:
            raise WeightsError(f"{where}: {exc}") from None
    return ref


def cache_dir() -> Path:
    return Path(os.environ.get("CNNBATCH_CACHE", Path.home() / ".cache" / "cnnbatch"))


def check_weights_arg(spec: str) -> str:
    """The ``--weights`` value's form, checked where the flags are parsed (a bad value is a bad argument, exit
    2): imagenet, random, or a storage URI of a file with a weights suffix. Whether it can be read is decided
    later (:func:`resolve_weights`)."""
    if spec in ("imagenet", "random"):
        return spec
    if not spec.endswith(WEIGHT_SUFFIXES):
        raise ValueError(f"--weights must be imagenet, random, or a notop weights file "
                         f"({', '.join(WEIGHT_SUFFIXES)}); got {_shown(spec)}")
    try:
        storage.check_uri(spec)
    except storage.StorageError as exc:
        raise ValueError(f"--weights: {exc}") from None
    return spec


def resolve_weights(spec: str, backbone: Backbone, seed: int = DEFAULT_RANDOM_SEED) -> WeightsRef:
    """Turn the ``--weights`` argument into a :class:`WeightsRef`, failing fast with a clear message."""
    if spec == "random":
        return WeightsRef("random", seed=seed)
    if spec == "imagenet":
        return WeightsRef("imagenet", sha256=_imagenet_sha256(backbone))
    if not spec.endswith(WEIGHT_SUFFIXES):
        raise WeightsError(
            f"--weights must be imagenet, random, or a notop weights file ({', '.join(WEIGHT_SUFFIXES)}); "
            f"got {_shown(spec)}"
        )
    try:
        fs, path = storage.filesystem(spec)
    except storage.StorageError as exc:
        raise WeightsError(f"--weights: {exc}") from None
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
    validate_weights_ref(ref)
    if ref.kind != "file" or ref.uri is None or ref.sha256 is None:
        raise WeightsError(f"weights reference: {ref.kind} weights are not a file")
    suffix = next(s for s in WEIGHT_SUFFIXES if ref.uri.endswith(s))
    target = cache_dir() / "weights" / f"{ref.sha256}{suffix}"
    if target.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fs, path = storage.filesystem(ref.uri)
    # Several actors on one node may race here: each downloads to its own temporary name, renames atomically.
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        storage.with_retries(lambda: fs.get_file(path, str(tmp)), f"download {storage.redact(ref.uri)}")
        got = sha256_file(tmp)
    except Exception as exc:  # noqa: BLE001 - missing or unreadable: unusable weights either way, in one line
        _remove(tmp)
        if isinstance(exc, FileNotFoundError):
            raise WeightsError(f"weights file {storage.redact(ref.uri)} does not exist") from None
        raise WeightsError(f"cannot read weights file {storage.redact(ref.uri)}: "
                           f"{storage.describe_error(exc)}") from None
    if got != ref.sha256:
        _remove(tmp)
        raise WeightsError(f"weights file {storage.redact(ref.uri)} changed during the run: sha256 {got}, "
                           f"expected {ref.sha256}")
    os.replace(tmp, target)
    log.info("cached weights %s at %s", storage.redact(ref.uri), target)
    return str(target)


def _remove(path: Path) -> None:
    """Remove a download's temporary copy (a folder, when the reference named one)."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def keras_weights_arg(ref: WeightsRef) -> str | None:
    """What to pass as ``weights=`` to the keras.applications constructor on this node."""
    validate_weights_ref(ref)
    if ref.kind == "random":
        return None
    if ref.kind == "imagenet":
        return "imagenet"
    return local_weights_file(ref)
