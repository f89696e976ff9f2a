"""Stage 4: the output dataset — part files, ``_errors``, per-shard stats, the lock, and the ``_SUCCESS`` manifest.

Layout of an output (features or predictions)::

    part-<shard>.parquet         one per input shard, written atomically at a deterministic name
    _errors/part-<shard>.parquet key + error for every input that could not be processed (possibly zero rows)
    _stats/<shard>.json          written last for a shard: its "done" marker (fingerprint, counts, timings)
    _cnnbatch.json               the configuration fingerprint the dataset was started with
    _LOCK                        held by the run writing to the output (owner, heartbeat)
    _SUCCESS                     manifest written when every shard is done
    _FAILED                      written instead when shards failed (shard -> reason); removed by a full success

A shard is done exactly when its stats record exists, names the current fingerprint and input signature, and
its part file has the recorded size: a crash between the part and its stats leaves the shard to be redone.
Names starting with ``_`` or ``.`` are ignored by pyarrow.dataset and by DuckDB globs over ``*.parquet``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage

log = logging.getLogger(__name__)

CONFIG_FILE = "_cnnbatch.json"
SUCCESS_FILE = "_SUCCESS"
FAILED_FILE = "_FAILED"
LOCK_FILE = "_LOCK"
ERRORS_DIR = "_errors"
STATS_DIR = "_stats"
METADATA_KEY = b"cnnbatch"
ERRORS_SCHEMA = pa.schema([("key", pa.string()), ("error", pa.string())])
# A lock not refreshed for this long belongs to a dead run and may be taken over; the holder refreshes it from a
# background thread every LOCK_HEARTBEAT_SECONDS, so only a dead (or frozen) driver lets it go stale.
LOCK_STALE_SECONDS = 300
LOCK_HEARTBEAT_SECONDS = 30
# What write_bytes_atomic leaves behind when killed between writing and renaming (rename filesystems only).
TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")


class OutputError(RuntimeError):
    """An output that cannot be used for this run (another configuration, foreign files, locked)."""


def part_name(shard_id: str) -> str:
    return f"part-{shard_id}.parquet"


def feature_schema(dim: int, metadata: dict[str, Any]) -> pa.Schema:
    return pa.schema(
        [("key", pa.string()), ("label", pa.string()), ("embedding", pa.list_(pa.float32(), dim))],
        metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()},
    )


def read_metadata(schema: pa.Schema) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    """zstd, no dictionary for floats, byte_stream_split on float columns (they compress ~15% better)."""
    float_columns = []  # Parquet leaf paths: a list column's values live at "<name>.list.element"
    for name, typ in zip(table.schema.names, table.schema.types):
        if pa.types.is_floating(typ):
            float_columns.append(name)
        elif (pa.types.is_fixed_size_list(typ) or pa.types.is_list(typ)) and pa.types.is_floating(typ.value_type):
            float_columns.append(f"{name}.list.element")
    string_columns = [n for n, t in zip(table.schema.names, table.schema.types) if pa.types.is_string(t)]
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        compression="zstd",
        use_dictionary=[c for c in string_columns if c != "key"],
        use_byte_stream_split=float_columns or False,
        write_statistics=["key"],
    )
    return sink.getvalue().to_pybytes()


def embeddings_table(keys: list[str], labels: list[str | None], embeddings: np.ndarray,
                     schema: pa.Schema) -> pa.Table:
    dim = schema.field("embedding").type.list_size
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1), type=pa.float32())
    vectors = pa.FixedSizeListArray.from_arrays(flat, dim)
    return pa.Table.from_arrays([pa.array(keys, pa.string()), pa.array(labels, pa.string()), vectors], schema=schema)


def errors_table(errors: list[tuple[str, str]]) -> pa.Table:
    return pa.Table.from_pylist([{"key": k, "error": e} for k, e in errors], schema=ERRORS_SCHEMA)


@dataclass
class ShardStats:
    """What one shard's processing did; the JSON of this record is the shard's done marker."""

    shard_id: str
    signature: str
    fingerprint: str
    rows: int = 0
    errors: int = 0
    part_bytes: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # per stage: read, decode, infer, write, total
    worker: str = ""
    node: str = ""  # the Ray node id of the actor that wrote the shard
    cuda_visible_devices: str | None = None  # as that actor saw it ("" for CPU-only actors)
    failed: str | None = None  # set when the whole shard failed (not written as done)
    # Unix times, for throughput over time: the shard's start, the end of its first model batch (with how many
    # images that batch held; a worker's first batch carries its warm-up), and the stats write (done).
    started_at: float = 0.0
    first_batch_at: float = 0.0
    first_batch_images: int = 0
    finished_at: float = 0.0

    @property
    def images(self) -> int:
        return self.rows + self.errors

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True, indent=1).encode()


def steady_images_per_second(shards: Iterable[ShardStats]) -> float | None:
    """Throughput with start-up left out: per worker, the images after its first model batch over the time from
    that batch to its last shard's done marker (gaps between shards, writes and small last batches count);
    summed over workers, which run side by side. None when no worker got past its first batch."""
    by_worker: dict[str, list[ShardStats]] = {}
    for stats in shards:
        if not stats.failed and stats.first_batch_at > 0 and stats.finished_at > 0:
            by_worker.setdefault(stats.worker, []).append(stats)
    rates = []
    for own in by_worker.values():
        own.sort(key=lambda s: s.started_at)
        images = sum(s.images for s in own) - own[0].first_batch_images
        span = max(s.finished_at for s in own) - own[0].first_batch_at
        if images > 0 and span > 0:
            rates.append(images / span)
    return sum(rates) if rates else None


class OutputDataset:
    """The output folder of one job, on any fsspec filesystem."""

    def __init__(self, uri: str, node: str = ""):
        self.uri = uri.rstrip("/")
        self.fs, self.path = storage.filesystem(self.uri)
        self.path = self.path.rstrip("/")
        self.node = node  # stamped into the stats of shards written through this object (an actor's node)

    def _p(self, *parts: str) -> str:
        return storage.join(self.path, *parts)

    def part_path(self, shard_id: str) -> str:
        return self._p(part_name(shard_id))

    # --- configuration -----------------------------------------------------------------------------------------

    def read_config(self) -> dict[str, Any] | None:
        try:
            return json.loads(storage.read_bytes(self.fs, self._p(CONFIG_FILE)))
        except FileNotFoundError:
            return None

    def prepare(self, fingerprint: str, config: dict[str, Any], overwrite: bool) -> None:
        """Check that this output may receive this configuration, then record it.

        Refuses an output started with another configuration (never mixes two) or holding part files that
        cnnbatch did not write; ``overwrite`` clears cnnbatch's own files first.
        """
        existing = self.read_config()
        if overwrite:
            self.clear()
            existing = None
        if existing is not None and existing.get("fingerprint") != fingerprint:
            differences = describe_differences(existing.get("config", {}), config)
            raise OutputError(
                f"output {storage.redact(self.uri)} holds results of another configuration ({differences}); "
                "use another --output, or --overwrite to replace them"
            )
        if existing is None:
            foreign = self.list_parts()
            if foreign:
                raise OutputError(
                    f"output {storage.redact(self.uri)} already holds {len(foreign)} part files not written by "
                    f"cnnbatch (e.g. {foreign[0]}); use an empty folder or --overwrite"
                )
            body = json.dumps({"fingerprint": fingerprint, "config": redact_config(config)}, sort_keys=True,
                              indent=1).encode()
            storage.write_bytes_atomic(self.fs, self._p(CONFIG_FILE), body)
        removed = self.remove_temp_files()
        if removed:
            log.info("removed %d temporary files left by an interrupted run", removed)

    def remove_temp_files(self) -> int:
        """Delete ``.<name>.<hex>.tmp`` leftovers of a run killed mid-write (only rename filesystems make them;
        readers never see them, this only reclaims space). Safe under the lock: no other run writes here."""
        if not storage.has_rename(self.fs):
            return 0
        removed = 0
        for folder in (self.path, self._p(ERRORS_DIR), self._p(STATS_DIR)):
            try:
                names = os.listdir(folder)
            except FileNotFoundError:
                continue
            for name in names:
                if TEMP_NAME.match(name):
                    try:
                        os.unlink(os.path.join(folder, name))
                        removed += 1
                    except FileNotFoundError:
                        pass
        return removed

    def clear(self) -> None:
        """Delete what cnnbatch wrote here (and nothing else)."""
        for name in self.list_parts():
            self.fs.rm_file(self._p(name))
        for sub in (ERRORS_DIR, STATS_DIR):
            if self.fs.exists(self._p(sub)):
                self.fs.rm(self._p(sub), recursive=True)
        for name in (SUCCESS_FILE, FAILED_FILE, CONFIG_FILE):
            if self.fs.exists(self._p(name)):
                self.fs.rm_file(self._p(name))

    def list_parts(self) -> list[str]:
        try:
            names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False)]
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.startswith("part-") and n.endswith(".parquet"))

    # --- per-shard state ---------------------------------------------------------------------------------------

    def read_stats(self, shard_id: str) -> ShardStats | None:
        try:
            data = json.loads(storage.read_bytes(self.fs, self._p(STATS_DIR, f"{shard_id}.json")))
            return ShardStats(**data)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):  # a torn or foreign stats file is simply "not done"
            return None

    def done_stats(self, shard_id: str, signature: str, fingerprint: str) -> ShardStats | None:
        """The stats of a shard already completed for this fingerprint and input, else None."""
        stats = self.read_stats(shard_id)
        if stats is None or stats.fingerprint != fingerprint or stats.signature != signature:
            return None
        try:
            size = self.fs.size(self.part_path(shard_id))
        except FileNotFoundError:
            return None
        return stats if size == stats.part_bytes else None

    def write_shard(self, stats: ShardStats, table: pa.Table, errors: list[tuple[str, str]]) -> ShardStats:
        """Write part, errors, then stats (the done marker), each atomically."""
        started = time.perf_counter()
        stats.node = stats.node or self.node
        stats.cuda_visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
        data = table_to_parquet_bytes(table)
        storage.write_bytes_atomic(self.fs, self.part_path(stats.shard_id), data)
        storage.write_bytes_atomic(self.fs, self._p(ERRORS_DIR, part_name(stats.shard_id)),
                                   table_to_parquet_bytes(errors_table(errors)))
        stats.seconds["write"] = round(time.perf_counter() - started, 4)
        stats.seconds["total"] = round(stats.seconds.get("total", 0.0) + stats.seconds["write"], 4)
        stats.part_bytes = len(data)
        stats.rows = table.num_rows
        stats.errors = len(errors)
        stats.finished_at = time.time()
        storage.write_bytes_atomic(self.fs, self._p(STATS_DIR, f"{stats.shard_id}.json"), stats.to_json())
        return stats

    # --- job-level files ---------------------------------------------------------------------------------------

    def read_success(self) -> dict[str, Any] | None:
        try:
            return json.loads(storage.read_bytes(self.fs, self._p(SUCCESS_FILE)))
        except FileNotFoundError:
            return None

    def remove_success(self) -> None:
        if self.fs.exists(self._p(SUCCESS_FILE)):
            self.fs.rm_file(self._p(SUCCESS_FILE))

    def read_failures(self) -> dict[str, Any] | None:
        try:
            return json.loads(storage.read_bytes(self.fs, self._p(FAILED_FILE)))
        except FileNotFoundError:
            return None

    def write_failures(self, fingerprint: str, failed: dict[str, str]) -> None:
        """Record the shards that kept failing and why (the next run retries them)."""
        body = {"fingerprint": fingerprint, "failed": dict(sorted(failed.items())),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        storage.write_bytes_atomic(self.fs, self._p(FAILED_FILE), json.dumps(body, sort_keys=True, indent=1).encode())

    def remove_failures(self) -> None:
        if self.fs.exists(self._p(FAILED_FILE)):
            self.fs.rm_file(self._p(FAILED_FILE))

    def write_success(self, fingerprint: str, config: dict[str, Any], shards: Iterable[ShardStats]) -> dict[str, Any]:
        shard_list = sorted(shards, key=lambda s: s.shard_id)
        manifest = {
            "fingerprint": fingerprint,
            "config": redact_config(config),
            "shards": {s.shard_id: {"rows": s.rows, "errors": s.errors, "part_bytes": s.part_bytes}
                       for s in shard_list},
            "totals": {
                "shards": len(shard_list),
                "rows": sum(s.rows for s in shard_list),
                "errors": sum(s.errors for s in shard_list),
            },
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        storage.write_bytes_atomic(self.fs, self._p(SUCCESS_FILE),
                                   json.dumps(manifest, sort_keys=True, indent=1).encode())
        return manifest

    def remove_stale_parts(self, current_ids: set[str]) -> list[str]:
        """Delete folder-shard outputs whose shard no longer exists (the folder shrank); return their ids."""
        stale = [name[len("part-"):-len(".parquet")] for name in self.list_parts()]
        stale = [shard_id for shard_id in stale if shard_id not in current_ids]
        for shard_id in stale:
            for path in (self._p(STATS_DIR, f"{shard_id}.json"), self.part_path(shard_id),
                         self._p(ERRORS_DIR, part_name(shard_id))):
                if self.fs.exists(path):
                    self.fs.rm_file(path)
        return stale

    # --- the lock ----------------------------------------------------------------------------------------------

    def acquire_lock(self, wait_seconds: float = 0.0) -> "OutputLock":
        lock = OutputLock(self.fs, self._p(LOCK_FILE))
        lock.acquire(self.uri, wait_seconds)
        return lock


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _process_started(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot, Linux), to tell a live owner from a reused pid; None if the
    process does not exist, "" when it exists but this platform cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            # Field 22 is the start time; the command name (field 2) may hold spaces, so split after its ")".
            return handle.read().rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        return None
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return ""


class OutputLock:
    """One writer per output: an exclusively created ``_LOCK`` with its owner and a heartbeat time.

    The owner refreshes the heartbeat from a daemon thread. Another run takes the lock over when the heartbeat
    is older than ``LOCK_STALE_SECONDS``, or at once when the owner ran on the same machine and its process is
    gone (a driver killed with SIGKILL). Object stores cannot delete conditionally, so two runs taking over the
    same stale lock at the same instant could both believe they hold it: each beat re-reads the lock, and a run
    that finds another owner there sets :attr:`lost`, and the pipeline stops handing out shards.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, heartbeat_seconds: float = LOCK_HEARTBEAT_SECONDS):
        self.fs, self.path = fs, path
        self.host = socket.gethostname()
        self.machine = f"{self.host}/{_boot_id()}"
        self.pid = os.getpid()
        self.owner = f"{self.host}:{self.pid}:{uuid.uuid4().hex[:12]}"
        self.heartbeat_seconds = heartbeat_seconds
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "machine": self.machine, "pid": self.pid,
                           "pid_started": _process_started(self.pid), "heartbeat": time.time()}).encode()

    def acquire(self, uri: str, wait_seconds: float) -> None:
        deadline = time.monotonic() + wait_seconds
        while True:
            if storage.create_exclusive(self.fs, self.path, self._body()):
                self._start_heartbeat()
                return
            holder = self._read()
            if holder is None:  # released between our attempt and this read: try again
                continue
            reason = self.stale_reason(holder)
            if reason:
                log.warning("taking over the lock on %s: %s", storage.redact(uri), reason)
                self._remove_if_unchanged(holder)
                continue
            if time.monotonic() >= deadline:
                age = time.time() - float(holder.get("heartbeat", 0))
                raise OutputError(
                    f"output {storage.redact(uri)} is being written by another run ({holder.get('owner', '?')}, "
                    f"heartbeat {age:.0f}s ago); wait for it to finish or use another --output (a lock whose run "
                    f"died is taken over after {LOCK_STALE_SECONDS}s without heartbeat, at once on its own machine)"
                )
            time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))

    def stale_reason(self, holder: dict[str, Any]) -> str | None:
        """Why ``holder``'s lock may be taken over, or None while its run may be alive."""
        age = time.time() - float(holder.get("heartbeat", 0) or 0)
        if age > LOCK_STALE_SECONDS:
            return f"last heartbeat {age:.0f}s ago"
        pid = holder.get("pid")
        if holder.get("machine") == self.machine and isinstance(pid, int):
            started = _process_started(pid)
            if started is None:
                return f"its process {pid} on this machine is gone"
            if started and holder.get("pid_started") and started != holder["pid_started"]:
                return f"its process {pid} on this machine is gone (the pid now belongs to another process)"
        return None

    def _remove_if_unchanged(self, holder: dict[str, Any]) -> None:
        current = self._read()
        if current is not None and current.get("owner") == holder.get("owner") \
                and current.get("heartbeat") == holder.get("heartbeat"):
            try:
                self.fs.rm_file(self.path)
            except FileNotFoundError:
                pass

    def _read(self) -> dict[str, Any] | None:
        """The lock's content; None when there is no lock; {} for an unreadable one (treated as stale)."""
        try:
            data = json.loads(storage.read_bytes(self.fs, self.path))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat_forever, name="cnnbatch-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat_forever(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                self.heartbeat()
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried at the next one
                log.warning("could not refresh the output lock: %s", storage.describe_error(exc))

    def heartbeat(self) -> None:
        holder = self._read()
        if holder is not None and holder.get("owner") == self.owner:
            storage.write_bytes_atomic(self.fs, self.path, self._body())
        elif not self.lost:
            self.lost = True
            log.error("the lock on this output is now held by %s; this run stops handing out shards",
                      (holder or {}).get("owner", "nobody"))

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        holder = self._read()
        if holder is not None and holder.get("owner") == self.owner:
            try:
                self.fs.rm_file(self.path)
            except FileNotFoundError:
                pass


def redact_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with credentials in URLs and secret environment values removed, for files we write."""
    return {k: storage.redact(v) if isinstance(v, str) else v for k, v in config.items()}


def describe_differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not keys:
        return "fingerprint differs"
    return "; ".join(f"{k}: existing {old.get(k)!r}, now {new.get(k)!r}" for k in keys[:4])
