"""One shard, start to end, inside one process: read -> decode (threads) -> variants -> model (batches) -> write.

Shared by extraction and prediction: a :class:`ShardTask` says how to build the model (once per actor), which
model inputs each decoded record becomes, and how to turn the outputs into the shard's table. Decoding runs in a
thread pool ahead of the model, with a bounded number of records in flight, so the model does not wait on JPEG
decoding and memory stays bounded. With ``batches_in_flight`` > 1 the model runs in its own thread while the next
batches are stacked, so an accelerator is handed its next batch as soon as it finishes one.

Each decode thread reads its image, then decodes it: separate read threads and decodes that wait while the model
computes were measured and not kept (docs/benchmarks.md, "The fast path").
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import numpy as np
import pyarrow as pa

from . import storage
from .decode import DecodeError, decode_image
from .output import OutputDataset
from .shards import Record, Shard, iter_records
from .shardstats import ShardStats

log = logging.getLogger(__name__)
# Batches handed to the model thread before the oldest result is collected: 1 runs the model inline between
# batches; 2 lets the next batch be stacked (and an accelerator fed) while one runs. Chosen by measurement.
DEFAULT_BATCHES_IN_FLIGHT = 2
T = TypeVar("T")
R = TypeVar("R")


class ShardTask(Protocol):
    """What a job does with decoded images. Must be picklable: it travels to every actor.

    Each record (image) becomes ``views`` model inputs (its variants: the plain image, augmented views...), made
    by :meth:`variants` on the decode threads; the outputs of one record's inputs are handed back together, so a
    record is in the table with all of its outputs or in ``_errors``, never partly."""

    @property
    def image_size(self) -> int: ...

    @property
    def batch_size(self) -> int | None:  # model inputs per call; None until the actor sizes it to its device
        ...

    @property
    def views(self) -> int:  # model inputs per record (at least 1)
        ...

    def make_model(self) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
        """Build the model (called once per actor)."""
        ...

    def with_batch_size_for(self, model: Any, gpu_share: float) -> ShardTask:
        """This task with its batch size decided for the device the actor holds (itself if already set)."""
        ...

    def variants(self, key: str, pixels: np.ndarray) -> np.ndarray:
        """The record's ``(views, S, S, 3)`` uint8 model inputs from its decoded ``(S, S, 3)`` pixels."""
        ...

    def make_table(self, model: Any, keys: list[str], labels: list[str | None],
                   outputs: dict[str, np.ndarray]) -> pa.Table:
        """The shard's table; ``outputs[name]`` is ``(records, views, ...)``, in the order of ``keys``."""
        ...


def task_counts(task: ShardTask, labels: list[str | None], outputs: dict[str, np.ndarray]) -> dict[str, int]:
    """A task's own counts for the job summary (predict: labelled and correct records), summed over shards. A
    task may define ``counts(labels, outputs)``; one that does not counts nothing."""
    counts = getattr(task, "counts", None)
    return dict(counts(labels, outputs)) if callable(counts) else {}


def record_bytes(record: Record) -> int:
    """Bytes a record holds in memory before it is decoded (tar members, Parquet cells; 0 for lazy reads)."""
    return int(getattr(record, "nbytes", 0))


def plain_variant(pixels: np.ndarray) -> np.ndarray:
    """One model input per record: the decoded image itself."""
    return pixels[np.newaxis]


# Bytes of records already in memory (tar members, Parquet cells) submitted to the decode threads at once: with
# the per-record and per-decode limits (readers.MAX_RECORD_BYTES, decode.MAX_DECODED_MB) this bounds an actor's
# working set whatever the input holds.
IN_FLIGHT_BYTES = 256 * 2**20


def bounded_map(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], in_flight: int,
                size: Callable[[T], int] | None = None, max_bytes: int = IN_FLIGHT_BYTES) -> Iterator[R]:
    """``pool.map`` in order that keeps at most ``in_flight`` items submitted (``Executor.map`` submits
    everything) and, with ``size``, at most ``max_bytes`` of them (but always at least one)."""
    pending: collections.deque[tuple[Future[R], int]] = collections.deque()
    held = 0
    try:
        for item in items:
            nbytes = size(item) if size is not None else 0
            while pending and (len(pending) >= in_flight or held + nbytes > max_bytes):
                future, done_bytes = pending.popleft()
                held -= done_bytes
                yield future.result()
            pending.append((pool.submit(fn, item), nbytes))
            held += nbytes
        while pending:
            yield pending.popleft()[0].result()
    finally:  # a failed shard leaves nothing queued on the (long-lived) pool
        for future, _ in pending:
            future.cancel()


_POOLS: dict[tuple[str, int], ThreadPoolExecutor] = {}


def thread_pool(name: str, threads: int) -> ThreadPoolExecutor:
    """One pool per purpose and size for the life of the process: threads made per shard would each leave
    native allocator arenas behind, and an actor's RSS would creep up shard after shard (docs/benchmarks.md, P4).
    Safe because an actor runs one shard at a time."""
    key = (name, threads)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix=name)
    return _POOLS[key]


def decode_threads_for(cpus: float | None) -> int:
    """Decode threads sized to the CPUs this actor holds (at least 2, so reads overlap decoding)."""
    available = os.cpu_count() or 2
    return max(2, min(available, int(cpus) if cpus else available))


class _Loaded:
    __slots__ = ("key", "label", "images", "error", "read_s", "decode_s", "views_s")

    def __init__(self, key: str, label: str | None, images: np.ndarray | None, error: str | None,
                 read_s: float = 0.0, decode_s: float = 0.0, views_s: float = 0.0):
        self.key, self.label, self.images, self.error = key, label, images, error
        self.read_s, self.decode_s, self.views_s = read_s, decode_s, views_s


def process_shard(shard: Shard, task: ShardTask, model: Any, output: OutputDataset, fingerprint: str,
                  decode_threads: int = 2, batches_in_flight: int = DEFAULT_BATCHES_IN_FLIGHT,
                  decode: Callable[[bytes, int], np.ndarray] = decode_image) -> ShardStats:
    """Process one shard and write its part, errors and stats. Raises only for whole-shard failures.

    ``decode`` turns an image's bytes into its ``(size, size, 3)`` uint8 pixels or raises :class:`DecodeError`
    (bench/worker_ab.py swaps in a lookup of pixels decoded ahead, to weigh decoding's share of the run)."""
    if batches_in_flight < 1:
        raise ValueError(f"batches_in_flight must be at least 1, got {batches_in_flight}")
    if task.batch_size is None or task.batch_size < 1:
        raise ValueError(f"the task's batch size must be decided (at least 1) before a shard runs, "
                         f"got {task.batch_size}")
    batch_size, views = task.batch_size, task.views
    if views < 1:
        raise ValueError(f"a task makes at least one model input per record, got views={views}")
    started, started_at = time.perf_counter(), time.time()
    first_batch: list[float] = []  # [Unix time, images] once the first batch is through the model
    size = task.image_size

    def load(record: Record) -> _Loaded:
        if record.error:
            return _Loaded(record.key, record.label, None, record.error)
        t0 = time.perf_counter()
        try:
            data = record.load()
        except Exception as exc:  # noqa: BLE001 - an unreadable object is that image's error, not the shard's
            return _Loaded(record.key, record.label, None, f"cannot read: {storage.describe_error(exc)}",
                           time.perf_counter() - t0)
        t1 = time.perf_counter()
        try:
            pixels = decode(data, size)
        except DecodeError as exc:
            return _Loaded(record.key, record.label, None, str(exc), t1 - t0, time.perf_counter() - t1)
        t2 = time.perf_counter()
        try:
            images = task.variants(record.key, pixels)
            if images.shape != (views, size, size, 3) or images.dtype != np.uint8:
                raise ValueError(f"made {images.dtype} {images.shape}, expected uint8 ({views}, {size}, {size}, 3)")
        except Exception as exc:  # noqa: BLE001 - a record without all its inputs is that record's error
            return _Loaded(record.key, record.label, None, f"cannot make its views: {storage.describe_error(exc)}",
                           t1 - t0, t2 - t1, time.perf_counter() - t2)
        return _Loaded(record.key, record.label, images, None, t1 - t0, t2 - t1, time.perf_counter() - t2)

    keys: list[str] = []
    labels: list[str | None] = []
    # Two streams of model inputs: the records' plain images (stream 0) and their other views (stream 1), each
    # batched on its own, so the plain images go through the model in exactly the batches a run without views
    # makes (identical outputs), and the views follow in batches of their own.
    chunks: list[dict[str, list[np.ndarray]]] = [collections.defaultdict(list), collections.defaultdict(list)]
    errors: list[tuple[str, str]] = []
    timing: dict[str, float] = collections.defaultdict(float)
    batches: list[list[np.ndarray]] = [[], []]
    pending: collections.deque[tuple[int, Future[dict[str, Any]]]] = collections.deque()

    def infer(images: np.ndarray) -> dict[str, Any]:
        t0 = time.perf_counter()
        result = model({"image": images})
        timing["infer"] += time.perf_counter() - t0  # one model thread: no concurrent updates
        if not first_batch:
            first_batch.extend((time.time(), len(images)))
        return result

    def collect(stream: int, future: Future[dict[str, Any]]) -> None:
        for name, value in future.result().items():
            chunks[stream][name].append(np.asarray(value))

    def submit_batch(model_pool: ThreadPoolExecutor, stream: int) -> None:
        pending.append((stream, model_pool.submit(infer, np.stack(batches[stream]))))
        batches[stream].clear()
        while len(pending) >= batches_in_flight:
            collect(*pending.popleft())

    read_start = time.perf_counter()
    # Records in flight: enough to fill the batches on the model thread and the one being stacked, plus one per
    # decode thread; a record holds `views` images.
    in_flight = max(1, (1 + batches_in_flight) * batch_size // views) + decode_threads
    pool, model_pool = thread_pool("decode", decode_threads), thread_pool("model", 1)
    try:
        for item in bounded_map(pool, load, iter_records(shard), in_flight=in_flight, size=record_bytes):
            timing["read"] += item.read_s
            timing["decode"] += item.decode_s
            if views > 1:
                timing["views"] += item.views_s
            if item.error is not None or item.images is None:
                errors.append((item.key, item.error or "no image"))
                continue
            keys.append(item.key)
            labels.append(item.label)
            for index, image in enumerate(item.images):
                stream = min(index, 1)
                batches[stream].append(image)
                if len(batches[stream]) == batch_size:
                    submit_batch(model_pool, stream)
        for stream in (0, 1):
            if batches[stream]:
                submit_batch(model_pool, stream)
        while pending:
            collect(*pending.popleft())
    finally:  # a failed shard: let its batches on the model thread finish before the next shard's
        for _, future in pending:
            future.cancel()
        for _, future in pending:
            if not future.cancelled():
                future.exception()
    # Wall time the model waited on input: everything in the loop that was not inference.
    timing["wait_input"] = max(0.0, time.perf_counter() - read_start - timing["infer"])

    outputs = {}
    for name, parts in chunks[0].items():
        plain = np.concatenate(parts)[:, np.newaxis]
        if views > 1:
            rest = np.concatenate(chunks[1][name]).reshape(len(keys), views - 1, *parts[0].shape[1:])
            plain = np.concatenate([plain, rest], axis=1)
        outputs[name] = plain
    table = task.make_table(model, keys, labels, outputs)
    stats = ShardStats(shard_id=shard.shard_id, signature=shard.signature, fingerprint=fingerprint,
                       worker=f"{socket.gethostname()}:{os.getpid()}", counts=task_counts(task, labels, outputs))
    stats.started_at = started_at
    if first_batch:
        stats.first_batch_at, stats.first_batch_images = first_batch[0], int(first_batch[1])
    stats.seconds = {k: round(v, 4) for k, v in timing.items()}
    stats.seconds["total"] = round(time.perf_counter() - started, 4)  # write_shard adds its own time
    return output.write_shard(stats, table, errors)
