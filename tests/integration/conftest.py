"""Integration tests: real Ray clusters, the CLI in fresh processes, whole jobs end to end (``make test``; not in
``make test-fast``). Every test collected here is marked ``integration``; the shared fixtures (sample images, the
weights file, moto's S3 server, ``run_cli``) come from ``tests/conftest.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

# The shared names, so that ``from .conftest import ...`` reads the same here as in tests/ (fixtures themselves
# come from tests/conftest.py, which pytest applies to this folder too).
from ..conftest import (  # noqa: F401
    CLASSES,
    FAKE_AWS_KEY_ID,
    FAKE_AWS_SECRET,
    REPO,
    SHARED,
    TEST_IMAGE_SIZE,
    S3Server,
    feature_metadata,
    learnable,
    run_cli,
    write_features,
)

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.path)).resolve().is_relative_to(HERE):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="module")
def ray_cluster():
    """One real local Ray cluster per test module (two CPUs, as on this machine)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
             configure_logging=False)
    yield ray
    ray.shutdown()
