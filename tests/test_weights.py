"""Backbone weights references: resolved once on the driver (seeded random, a notop file hashed), validated when
read back from data, fetched once per node into a content-addressed cache, handed to Keras as it expects."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cnnbatch.backbones import get_backbone
from cnnbatch.weights import (
    DEFAULT_RANDOM_SEED,
    WeightsError,
    WeightsRef,
    keras_weights_arg,
    local_weights_file,
    resolve_weights,
    sha256_file,
    validate_weights_ref,
)


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CNNBATCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def weights_file(tmp_path: Path, data: bytes = b"\x89HDF\r\n\x1a\n pretend weights") -> tuple[Path, str]:
    path = tmp_path / "vgg16_notop.weights.h5"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def test_identity_names_what_makes_two_runs_weights_the_same() -> None:
    assert WeightsRef("random", seed=3).identity == "random:seed=3"
    a = WeightsRef("file", uri="s3://a/w.weights.h5", sha256="1" * 64)
    b = WeightsRef("file", uri="gs://b/copy.weights.h5", sha256="1" * 64)
    assert a.identity == b.identity == "file:sha256=" + "1" * 64
    assert WeightsRef.from_dict(a.to_dict()) == a
    with pytest.raises(WeightsError, match="must be a mapping, got list"):
        WeightsRef.from_dict([])  # type: ignore[arg-type]


def test_random_and_file_weights_resolve_without_loading_a_model(tmp_path: Path) -> None:
    vgg16 = get_backbone("vgg16")
    assert resolve_weights("random", vgg16) == WeightsRef("random", seed=DEFAULT_RANDOM_SEED)
    assert resolve_weights("random", vgg16, seed=9).seed == 9
    path, digest = weights_file(tmp_path)
    assert resolve_weights(str(path), vgg16) == WeightsRef("file", uri=str(path), sha256=digest)
    assert sha256_file(path) == digest


@pytest.mark.parametrize("spec, message", [
    ("weights.bin", r"--weights must be imagenet, random, or a notop weights file \(.weights.h5, .h5, .hdf5\); "
                    r"got 'weights.bin'"),
    ("https://example.com/w.weights.h5", "--weights: "),
])
def test_unusable_weight_arguments_are_one_line(spec: str, message: str) -> None:
    with pytest.raises(WeightsError, match=message):
        resolve_weights(spec, get_backbone("vgg16"))


def test_a_missing_weights_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"weights file .*missing.weights.h5 does not exist"):
        resolve_weights(str(tmp_path / "missing.weights.h5"), get_backbone("vgg16"))


@pytest.mark.parametrize("ref, message", [
    (WeightsRef("pretrained"), "kind must be one of imagenet, random, file"),  # type: ignore[arg-type]
    (WeightsRef("random"), "random weights need an integer seed; got None"),
    (WeightsRef("random", seed=True), "random weights need an integer seed; got True"),
    (WeightsRef("file", uri="s3://b/w.weights.h5", sha256="XYZ"), "sha256 must be 64 lower-case hex digits"),
    (WeightsRef("file", uri="s3://b/w.pkl", sha256="a" * 64), "a weights file's URI must end in .weights.h5"),
    (WeightsRef("imagenet", sha256="short"), "sha256 must be 64 lower-case hex digits"),
])
def test_references_read_back_from_data_are_validated(ref: WeightsRef, message: str) -> None:
    with pytest.raises(WeightsError, match=f"model.json weights: {message}"):
        validate_weights_ref(ref, "model.json weights")


def test_valid_references_pass_as_they_are() -> None:
    for ref in (WeightsRef("random", seed=0), WeightsRef("imagenet", sha256="b" * 64), WeightsRef("imagenet"),
                WeightsRef("file", uri="s3://bucket/w.weights.h5", sha256="c" * 64)):
        assert validate_weights_ref(ref) is ref and ref.checked() is ref


def test_a_file_is_fetched_once_into_the_cache_under_its_sha256(tmp_path: Path, cache: Path) -> None:
    path, digest = weights_file(tmp_path)
    ref = WeightsRef("file", uri=str(path), sha256=digest)
    local = local_weights_file(ref)
    assert Path(local) == cache / "weights" / f"{digest}.weights.h5" and Path(local).read_bytes() == path.read_bytes()
    path.unlink()  # the cache answers from now on
    assert local_weights_file(ref) == local
    assert [p.name for p in (cache / "weights").iterdir()] == [f"{digest}.weights.h5"]  # no temporary left


def test_a_file_that_changed_since_the_driver_hashed_it_is_refused(tmp_path: Path, cache: Path) -> None:
    path, digest = weights_file(tmp_path)
    path.write_bytes(b"other bytes")
    with pytest.raises(WeightsError, match=f"changed during the run: sha256 .*, expected {digest}"):
        local_weights_file(WeightsRef("file", uri=str(path), sha256=digest))
    assert not any((cache / "weights").iterdir())  # its temporary copy removed


def test_keras_gets_none_imagenet_or_a_local_path(tmp_path: Path, cache: Path) -> None:
    assert keras_weights_arg(WeightsRef("random", seed=1)) is None
    assert keras_weights_arg(WeightsRef("imagenet", sha256="d" * 64)) == "imagenet"
    path, digest = weights_file(tmp_path)
    assert keras_weights_arg(WeightsRef("file", uri=str(path), sha256=digest)).startswith(str(cache))
    with pytest.raises(WeightsError, match="random weights are not a file"):
        local_weights_file(WeightsRef("random", seed=1))
