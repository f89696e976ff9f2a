"""The library versions every output and model folder records, read from package metadata."""

from __future__ import annotations

import platform
import sys
from importlib.metadata import version

import cnnbatch
from cnnbatch import versions
from cnnbatch.versions import RECORDED, library_versions


def test_versions_name_cnnbatch_python_and_each_recorded_library() -> None:
    found = library_versions()
    assert set(found) == {"cnnbatch", "python", *RECORDED}  # every recorded library is installed here
    assert found["cnnbatch"] == cnnbatch.__version__
    assert found["python"] == platform.python_version()
    for name in RECORDED:
        assert found[name] == version(name)
    assert all(isinstance(v, str) and v[:1].isdigit() for v in found.values()), found


def test_reading_versions_imports_none_of_the_libraries() -> None:
    """The driver stays light: versions come from metadata, TensorFlow and Keras are not imported to ask them."""
    import subprocess

    script = ("import sys; from cnnbatch.versions import library_versions; library_versions(); "
              "print(sorted(m for m in ('tensorflow', 'keras', 'pyarrow') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_missing_distribution_only_loses_its_field(monkeypatch) -> None:
    monkeypatch.setattr(versions, "RECORDED", ("numpy", "no-such-distribution-cnnbatch"))
    found = versions.library_versions()
    assert set(found) == {"cnnbatch", "python", "numpy"}
