"""The library versions recorded in every output's metadata and every model folder (without importing them)."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from . import __version__

RECORDED = ("pyarrow", "numpy", "pillow", "fsspec", "tensorflow", "keras")


def library_versions() -> dict[str, str]:
    """cnnbatch's, Python's and the main libraries' versions, read from package metadata (TensorFlow is not
    imported: the driver stays light)."""
    versions = {"cnnbatch": __version__, "python": platform.python_version()}
    for name in RECORDED:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:  # a missing distribution only loses a metadata field
            continue
    return versions
