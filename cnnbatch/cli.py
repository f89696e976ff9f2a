"""The ``cnnbatch`` command and the ``python -m jobs.<job>`` entrypoints: one parser per job, built from its
config dataclass (config.py), so both parse the same flags.

Exit status: 0 when every shard is done; 1 when the job ran but something failed (shards, storage, weights);
2 for bad arguments. Errors are one line on stderr, naming what was expected and what was found.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .config import add_arguments, from_namespace
from .logs import setup_logging

log = logging.getLogger("cnnbatch")

DESCRIPTION = """CNN features for buckets of images on a Ray cluster: extract VGG16 / InceptionV3 feature vectors
into Parquet, train a classifier head on them, fine-tune the backbone, and label new images in bulk or one at a
time. Start with `cnnbatch plan --input URI` (what a run would cost), then `cnnbatch extract --input URI --output
URI`; `cnnbatch JOB --help` lists a job's flags. Without RAY_ADDRESS each job starts a local Ray."""
EPILOG = "Exit status: 0 success, 1 the job failed (storage, weights, shards), 2 bad arguments. See README.md."


@dataclass(frozen=True)
class Job:
    """A subcommand: its config class and runner live in ``module`` (imported only when the job runs)."""

    name: str
    module: str
    config: str
    runner: str
    help: str


JOBS: dict[str, Job] = {
    job.name: job
    for job in (
        Job("extract", "cnnbatch.extract", "ExtractConfig", "run_extract",
            "extract CNN feature vectors from images into Parquet"),
        Job("train", "cnnbatch.train", "TrainConfig", "run_train",
            "train a classifier head on feature Parquet into a model folder"),
        Job("finetune", "cnnbatch.finetune", "FinetuneConfig", "run_finetune",
            "fine-tune the backbone's top blocks with the head on augmented images into a model folder"),
        Job("predict", "cnnbatch.predict", "PredictConfig", "run_predict",
            "label images with backbone + trained head: in bulk into Parquet, or one image at a terminal"),
        Job("plan", "cnnbatch.plan", "PlanConfig", "run_plan", "dry run: count images, list layers, estimate hours"),
    )
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cnnbatch", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING")
    sub = parser.add_subparsers(dest="job", required=True, metavar="JOB")
    for job in JOBS.values():
        module = importlib.import_module(job.module)
        job_parser = sub.add_parser(job.name, help=job.help, description=job.help)
        add_arguments(job_parser, getattr(module, job.config))
        job_parser.add_argument("--log-level", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _known_errors() -> tuple[type[BaseException], ...]:
    from .decode import DecodeError
    from .finetunefit import FitError
    from .imagestream import ImageSetError
    from .modelio import ModelError
    from .output import OutputError
    from .pool import WorkerStartError
    from .shards import InputError
    from .storage import StorageError
    from .weights import WeightsError

    return (StorageError, OutputError, InputError, WeightsError, WorkerStartError, ModelError, ImageSetError, FitError,
            DecodeError)


def run_job(job: Job, namespace: argparse.Namespace) -> Any:
    module = importlib.import_module(job.module)
    config = from_namespace(getattr(module, job.config), namespace)
    runner: Callable[[Any], Any] = getattr(module, job.runner)
    return runner(config)


def _ray_is_up() -> bool:
    ray = sys.modules.get("ray")  # never imports Ray for a job that did not use it
    return ray is not None and ray.is_initialized()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    namespace = parser.parse_args(argv)
    setup_logging(namespace.log_level)
    job = JOBS[namespace.job]
    prefix = f"cnnbatch {job.name}: error:"
    from .storage import redact

    ray_was_up = _ray_is_up()
    try:
        try:
            result = run_job(job, namespace)
        finally:
            # Disconnect from the Ray this run started before the last lines: Ray prints actors' output (a remote
            # traceback, say) from a background thread, which could otherwise land after the one-line error.
            if not ray_was_up and _ray_is_up():
                sys.modules["ray"].shutdown()
    except _known_errors() as exc:  # the job could not run: storage, weights, input or output state
        print(f"{prefix} {redact(str(exc))}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a config that fails validation: bad arguments
        print(f"{prefix} {redact(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prefix} interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return report(job, result)


def report(job: Job, result: Any) -> int:
    """Print the job's summary line to stdout; non-zero when anything failed."""
    line = result.line() if hasattr(result, "line") else str(result)
    # A "bare" result is the answer itself (e.g. predict --image --json): printed without the prefix.
    print(line if getattr(result, "bare", False) else f"cnnbatch {job.name}: {line}")
    failed = getattr(result, "failed", None)
    if failed:
        for shard_id, reason in sorted(failed.items()):
            print(f"cnnbatch {job.name}: shard {shard_id} failed: {reason}", file=sys.stderr)
        print(f"cnnbatch {job.name}: error: {len(failed)} shards failed; rerun the same command to retry them",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
