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


def held(job, gate: Path, key: str | None = None):
    """``job`` (a pipeline.ShardedJob of extract) whose actor holds on a record, synchronising a test with it:
    the first time ``key`` (or, without one, any record) is made into model inputs on the decode threads, the actor
    writes its pid to ``gate/held`` and waits until ``gate/release`` exists (the test may kill it there instead);
    every later time it passes. Outputs and fingerprint are the plain job's."""
    import dataclasses
    import os
    import time

    from cnnbatch.extract import ExtractTask

    @dataclasses.dataclass(frozen=True)
    class Held(ExtractTask):  # defined in a function: pickled by value to the actors
        gate: str = ""
        key: str | None = None

        def variants(self, record_key, pixels):
            holder, release = Path(self.gate) / "held", Path(self.gate) / "release"
            if (self.key is None or record_key == self.key) and not holder.exists():
                holder.write_text(str(os.getpid()))
                deadline = time.monotonic() + 120
                while not release.exists():
                    if time.monotonic() > deadline:
                        raise RuntimeError("the held actor was neither released nor killed")
                    time.sleep(0.05)
            return super().variants(record_key, pixels)

    fields = {f.name: getattr(job.task, f.name) for f in dataclasses.fields(ExtractTask)}
    return dataclasses.replace(job, task=Held(**fields, gate=str(gate), key=key))


def wait_until_held(gate: Path, running, timeout: float = 180) -> int:
    """The held actor's pid, once it holds (``running``: the job's future, which must not have ended)."""
    import time

    deadline = time.monotonic() + timeout
    while not (gate / "held").exists():
        assert time.monotonic() < deadline and not running.done(), "the actor never held"
        time.sleep(0.05)
    return int((gate / "held").read_text())
