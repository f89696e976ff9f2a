"""worker.process_shard's threads: reads and decodes on the decode threads, running ahead of the model.
No Ray, no TensorFlow: the model is a numpy stand-in; the tests synchronise on the decodes, never on time."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from cnnbatch import worker
from cnnbatch.decode import decode_image
from cnnbatch.extract import embeddings_table, feature_schema
from cnnbatch.output import OutputDataset
from cnnbatch.sample import write_photo_folder
from cnnbatch.shards import list_shards


class Task:
    image_size, batch_size, views = 16, 4, 1

    def variants(self, key, pixels):
        return worker.plain_variant(pixels)

    def make_table(self, model, keys, labels, outputs):
        return embeddings_table(keys, labels, outputs["embedding"][:, 0], feature_schema(3, {}))


@pytest.fixture()
def shard(tmp_path: Path):
    folder = write_photo_folder(tmp_path / "in", 20, size=(40, 30), classes=2)
    return next(iter(list_shards(str(folder), shard_size=100)))


class HeldModel:
    """Each image's mean RGB; its first call waits (at most 60 s) until the decode threads have decoded
    ``ahead`` images, and records whether they did while it waited."""

    def __init__(self, ahead: int, decoded: threading.Semaphore):
        self.ahead, self.decoded = ahead, decoded
        self.calls = 0
        self.ran_ahead: bool | None = None

    def __call__(self, batch: dict) -> dict:
        self.calls += 1
        if self.calls == 1:
            self.ran_ahead = all(self.decoded.acquire(timeout=60) for _ in range(self.ahead))
        images = batch["image"]
        return {"embedding": images.reshape(len(images), -1, 3).mean(axis=1).astype("float32")}


class CountingDecode:
    """decode_image, releasing a semaphore per image decoded."""

    def __init__(self) -> None:
        self.decoded = threading.Semaphore(0)
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self, data: bytes, size: int) -> np.ndarray:
        pixels = decode_image(data, size)
        with self._lock:
            self.count += 1
        self.decoded.release()
        return pixels


def test_decoding_runs_ahead_while_the_model_computes(shard, tmp_path: Path) -> None:
    """The model's first batch (4 images) holds until 8 images are decoded: the next batch's images are decoded
    while the model is still busy with the first, synchronised on the decodes themselves (no timing)."""
    output, decode = OutputDataset(str(tmp_path / "out")), CountingDecode()
    model = HeldModel(ahead=2 * Task.batch_size, decoded=decode.decoded)
    stats = worker.process_shard(shard, Task(), model, output, "f", decode_threads=2, batches_in_flight=2,
                                 decode=decode)
    assert stats.rows == 20 and stats.errors == 0
    assert model.calls == 5
    assert decode.count == 20  # the decode given was the one used
    assert model.ran_ahead, "the decode threads did not get ahead of a model that was still computing"


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
    stats = worker.process_shard(shard, Task(), MeanColour(), output, "f", decode_threads=2,
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
    stats = worker.process_shard(shard, Task(), MeanColour(), output, "f")
    assert stats.rows == 19 and stats.errors == 1
    import pyarrow.parquet as pq

    errors = pq.read_table(str(tmp_path / "out" / "_errors" / f"part-{shard.shard_id}.parquet")).to_pylist()
    assert len(errors) == 1 and errors[0]["error"] == "cannot read: OSError: connection reset"


def test_a_task_whose_batch_size_is_undecided_is_refused(shard, tmp_path: Path) -> None:
    class Undecided(Task):
        batch_size = None

    with pytest.raises(ValueError, match="batch size must be decided"):
        worker.process_shard(shard, Undecided(), MeanColour(), OutputDataset(str(tmp_path / "o")), "f")


# --- batches in flight: the same rows whatever the depth, one long-lived model thread -------------------------

class MeanColour:
    """A stand-in model (numpy, no TensorFlow): each image's mean RGB, so outputs can be checked exactly."""

    def __init__(self, fail_on_call: int | None = None):
        self.calls, self.fail_on_call, self.threads = 0, fail_on_call, set()

    def __call__(self, batch: dict) -> dict:
        import threading

        self.calls += 1
        self.threads.add(threading.get_ident())
        if self.calls == self.fail_on_call:
            raise RuntimeError("model failed")
        return {"embedding": batch["image"].reshape(len(batch["image"]), -1, 3).mean(axis=1).astype("float32")}


class MeanColourTask:
    image_size, batch_size, views = 16, 4, 1

    def variants(self, key, pixels):
        return pixels[None]

    def make_model(self) -> MeanColour:
        return MeanColour()

    def make_table(self, model, keys, labels, outputs):
        from cnnbatch.extract import embeddings_table, feature_schema

        return embeddings_table(keys, labels, outputs["embedding"][:, 0], feature_schema(3, {}))


def test_batches_in_flight_give_the_same_rows_on_long_lived_threads(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from cnnbatch.output import OutputDataset
    from cnnbatch.shards import list_shards
    from cnnbatch.worker import process_shard

    folder = write_photo_folder(tmp_path / "in", 10, size=(40, 30), classes=2)
    shard = next(iter(list_shards(str(folder), shard_size=100)))
    tables, model = {}, MeanColour()
    for depth in (1, 2, 3):
        output = OutputDataset(str(tmp_path / f"out-{depth}"))
        stats = process_shard(shard, MeanColourTask(), model, output, "f", decode_threads=2, batches_in_flight=depth)
        assert stats.rows == 10 and stats.errors == 0
        assert 0 < stats.started_at <= stats.first_batch_at <= stats.finished_at and stats.first_batch_images == 4
        assert output.read_stats(shard.shard_id) == stats  # the timeline is in the done marker
        tables[depth] = pq.read_table(output.part_path(shard.shard_id))
    assert tables[1].equals(tables[2]) and tables[1].equals(tables[3])  # same rows, same order
    assert len(model.threads) == 1  # one model thread, kept from shard to shard
    with pytest.raises(ValueError, match="batches_in_flight must be at least 1, got 0"):
        process_shard(shard, MeanColourTask(), model, OutputDataset(str(tmp_path / "x")), "f", 2, 0)


def test_a_failing_batch_fails_the_shard_and_the_next_shard_still_runs(tmp_path: Path) -> None:
    from cnnbatch.output import OutputDataset
    from cnnbatch.shards import list_shards
    from cnnbatch.worker import process_shard

    folder = write_photo_folder(tmp_path / "in", 12, size=(40, 30), classes=1)
    shard = next(iter(list_shards(str(folder), shard_size=100)))
    output = OutputDataset(str(tmp_path / "out"))
    with pytest.raises(RuntimeError, match="model failed"):
        process_shard(shard, MeanColourTask(), MeanColour(fail_on_call=2), output, "f", 2, 2)
    assert process_shard(shard, MeanColourTask(), MeanColour(), output, "f", 2, 2).rows == 12


class ViewsTask(Task):
    """Three model inputs per record (the image, its mirror, its negative); the record named ``broken`` cannot
    make them."""

    views, batch_size = 3, 4

    def __init__(self, broken: str = "", wrong_shape: str = ""):
        self.broken, self.wrong_shape = broken, wrong_shape

    def variants(self, key, pixels):
        if key == self.broken:
            raise RuntimeError("no views for this one")
        if key == self.wrong_shape:
            return pixels[None]
        return np.stack([pixels, pixels[:, ::-1], 255 - pixels])

    def make_table(self, model, keys, labels, outputs):
        assert outputs["embedding"].shape == (len(keys), 3, 3)  # every record with all of its views
        mirrored = outputs["embedding"][:, 0]
        assert np.allclose(outputs["embedding"][:, 1], mirrored, atol=1e-4)  # a mirror has the same mean colour
        assert np.allclose(outputs["embedding"][:, 2], 255 - mirrored, atol=1e-3)
        return embeddings_table(keys, labels, mirrored, feature_schema(3, {}))


def test_a_record_that_cannot_make_its_views_is_an_error_row_never_a_partial_row(shard, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    keys = list(shard.paths)
    output = OutputDataset(str(tmp_path / "out"))
    stats = worker.process_shard(shard, ViewsTask(broken=keys[3], wrong_shape=keys[7]), MeanColour(), output, "f")
    assert stats.rows == 18 and stats.errors == 2
    errors = {e["key"]: e["error"] for e in pq.read_table(output.path + "/_errors").to_pylist()}
    assert errors[keys[3]] == "cannot make its views: RuntimeError: no views for this one"
    assert errors[keys[7]].startswith("cannot make its views: ValueError: made uint8 (1, 16, 16, 3), expected")
    rows = pq.read_table(output.part_path(shard.shard_id)).column("key").to_pylist()
    assert keys[3] not in rows and keys[7] not in rows and len(rows) == 18


def test_bounded_map_holds_at_most_its_byte_budget_of_records_in_memory() -> None:
    """Records already in memory (tar members, Parquet cells) are submitted only while the bytes submitted and not
    yet consumed fit the budget (one alone may exceed it): the decode threads' working set is bounded whatever
    the input holds."""
    from concurrent.futures import Future

    sizes = [60, 30, 60, 10, 10, 200, 5]
    submitted: list[int] = []
    consumed: list[int] = []
    in_flight_at_submit: list[int] = []

    class RecordingPool:
        def submit(self, fn, item):
            in_flight_at_submit.append(sum(sizes[i] for i in submitted if i not in consumed) + sizes[item])
            submitted.append(item)
            future: Future = Future()
            future.set_result(fn(item))
            return future

    for value in worker.bounded_map(RecordingPool(), lambda i: i, range(len(sizes)), in_flight=10,
                                    size=lambda i: sizes[i], max_bytes=100):
        consumed.append(value)
    assert consumed == list(range(len(sizes)))  # in order, every item
    assert in_flight_at_submit == [60, 90, 90, 100, 80, 200, 5]  # 200 goes alone, over the budget
    assert max(b for b, i in zip(in_flight_at_submit, range(len(sizes)), strict=True) if sizes[i] <= 100) <= 100
