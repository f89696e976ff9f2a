"""worker.process_shard's threads: reads and decodes on the decode threads, running ahead of the model.
No Ray, no TensorFlow: the model is a numpy stand-in that takes measurable time."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bench.images import write_folder
from cnnbatch import worker
from cnnbatch.decode import decode_image
from cnnbatch.extract import embeddings_table, feature_schema
from cnnbatch.output import OutputDataset
from cnnbatch.shards import list_shards


class SlowMeanColour:
    """Each image's mean RGB, after ``seconds`` of 'compute'; records when it ran."""

    def __init__(self, seconds: float, clock: list[tuple[str, float, float]]):
        self.seconds, self.clock = seconds, clock

    def __call__(self, batch: dict) -> dict:
        started = time.perf_counter()
        time.sleep(self.seconds)
        images = batch["image"]
        result = {"embedding": images.reshape(len(images), -1, 3).mean(axis=1).astype("float32")}
        self.clock.append(("model", started, time.perf_counter()))
        return result


class Task:
    image_size, batch_size, views = 16, 4, 1

    def variants(self, key, pixels):
        return worker.plain_variant(pixels)

    def make_table(self, model, keys, labels, outputs):
        return embeddings_table(keys, labels, outputs["embedding"][:, 0], feature_schema(3, {}))


@pytest.fixture()
def shard(tmp_path: Path):
    folder = write_folder(tmp_path / "in", 20, size=(40, 30), classes=2)
    return next(iter(list_shards(str(folder), shard_size=100)))


class TimedDecode:
    """decode_image, made to take 5 ms so that overlaps would show, recording each interval on a shared clock."""

    def __init__(self) -> None:
        self.clock: list[tuple[str, float, float]] = []

    def __call__(self, data: bytes, size: int) -> np.ndarray:
        started = time.perf_counter()
        time.sleep(0.005)
        pixels = decode_image(data, size)
        self.clock.append(("decode", started, time.perf_counter()))
        return pixels


def overlaps(clock: list[tuple[str, float, float]]) -> int:
    model = [(a, b) for kind, a, b in clock if kind == "model"]
    decodes = [(a, b) for kind, a, b in clock if kind == "decode"]
    return sum(1 for a, b in decodes for m_a, m_b in model if a < m_b and m_a < b)


def test_decoding_runs_ahead_while_the_model_computes(shard, tmp_path: Path) -> None:
    output, decode = OutputDataset(str(tmp_path / "out")), TimedDecode()
    stats = worker.process_shard(shard, Task(), SlowMeanColour(0.05, decode.clock), output, "f",
                                 decode_threads=2, batches_in_flight=2, decode=decode)
    assert stats.rows == 20 and stats.errors == 0
    assert sum(1 for kind, *_ in decode.clock if kind == "model") == 5
    assert sum(1 for kind, *_ in decode.clock if kind == "decode") == 20  # the decode given was the one used
    assert overlaps(decode.clock) > 0  # 50 ms batches while 5 ms decodes fill a window of 3 batches


def test_reads_and_decodes_run_on_the_decode_threads(shard, monkeypatch, tmp_path: Path) -> None:
    threads: dict[str, set[str]] = {"read": set(), "decode": set()}
    plain_records = worker.iter_records

    def records(shard_):
        for record in plain_records(shard_):
            load = record.load

            def traced_load(load=load) -> bytes:
                threads["read"].add(threading.current_thread().name)
                return load()

            record.load = traced_load
            yield record

    def decode(data: bytes, size: int) -> np.ndarray:
        threads["decode"].add(threading.current_thread().name)
        return decode_image(data, size)

    monkeypatch.setattr(worker, "iter_records", records)
    output = OutputDataset(str(tmp_path / "out"))
    stats = worker.process_shard(shard, Task(), SlowMeanColour(0.0, []), output, "f", decode_threads=2,
                                 decode=decode)
    assert stats.rows == 20 and stats.seconds["read"] > 0 and stats.seconds["decode"] > 0
    assert threads["read"] and all(name.startswith("decode") for name in threads["read"] | threads["decode"])


def test_an_unreadable_image_is_an_error_row_and_the_rest_go_on(shard, monkeypatch, tmp_path: Path) -> None:
    plain_records = worker.iter_records

    def records(shard_):
        for index, record in enumerate(plain_records(shard_)):
            if index == 3:
                def broken() -> bytes:
                    raise OSError("connection reset")
                record.load = broken
            yield record

    monkeypatch.setattr(worker, "iter_records", records)
    output = OutputDataset(str(tmp_path / "out"))
    stats = worker.process_shard(shard, Task(), SlowMeanColour(0.0, []), output, "f")
    assert stats.rows == 19 and stats.errors == 1
    import pyarrow.parquet as pq

    errors = pq.read_table(str(tmp_path / "out" / "_errors" / f"part-{shard.shard_id}.parquet")).to_pylist()
    assert len(errors) == 1 and errors[0]["error"] == "cannot read: OSError: connection reset"


def test_a_task_whose_batch_size_is_undecided_is_refused(shard, tmp_path: Path) -> None:
    class Undecided(Task):
        batch_size = None

    with pytest.raises(ValueError, match="batch size must be decided"):
        worker.process_shard(shard, Undecided(), SlowMeanColour(0.0, []), OutputDataset(str(tmp_path / "o")), "f")
