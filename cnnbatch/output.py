"""Stage 4: the output dataset — part files, ``_errors``, per-shard stats, the lock, and the ``_SUCCESS`` manifest.

Layout of an output (features or predictions)::

    part-<shard>.parquet         one per input shard, written atomically at a deterministic name
    _errors/part-<shard>.parquet key + error for every input that could not be processed (possibly zero rows)
    _stats/<shard>.json          written last for a shard: its "done" marker (fingerprint, counts, timings)
    _cnnbatch.json               the configuration fingerprint the dataset was started with
    _LOCK                        held by the run writing to the output (owner, heartbeat; lock.py)
    _SUCCESS                     manifest written when every shard is done
    _FAILED                      written instead when shards failed (shard -> reason); removed by a full success

A shard is done exactly when its stats record exists, names the current fingerprint and input signature, and
its part file has the recorded size: a crash between the part and its stats leaves the shard to be redone.
Names starting with ``_`` or ``.`` are ignored by pyarrow.dataset and by DuckDB globs over ``*.parquet``.
What the part files hold is each job's own business (its task's schema); this module only places them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from . import storage
from .lock import LockHeld, OutputLock
from .parquetio import errors_table, table_to_parquet_bytes
from .shardstats import ShardStats

log = logging.getLogger(__name__)

CONFIG_FILE = "_cnnbatch.json"
SUCCESS_FILE = "_SUCCESS"
FAILED_FILE = "_FAILED"
LOCK_FILE = "_LOCK"
ERRORS_DIR = "_errors"
STATS_DIR = "_stats"
# What write_bytes_atomic leaves behind when killed between writing and renaming (rename filesystems only).
TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")


class OutputError(RuntimeError):
    """An output that cannot be used for this run (another configuration, foreign files, locked)."""


def part_name(shard_id: str) -> str:
    return f"part-{shard_id}.parquet"


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

    def prepare(self, fingerprint: str, config: dict[str, Any], overwrite: bool) -> bool:
        """Check that this output may receive this configuration, then record it; returns whether this call wrote
        the configuration stamp (a new output), so that a run that then writes no shard can take it back.

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
        return existing is None

    def remove_config(self) -> None:
        """Take the configuration stamp back (a run that wrote no shard leaves none)."""
        if self.fs.exists(self._p(CONFIG_FILE)):
            self.fs.rm_file(self._p(CONFIG_FILE))

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

    def acquire_lock(self, wait_seconds: float = 0.0) -> OutputLock:
        lock = OutputLock(self.fs, self._p(LOCK_FILE))
        try:
            lock.acquire(self.uri, wait_seconds)
        except LockHeld as exc:
            raise OutputError(str(exc)) from None
        except (OSError, ValueError) as exc:  # a file where the folder should be, no permission, a read-only store
            raise OutputError(f"cannot write to --output {storage.redact(self.uri)}: {storage.describe_error(exc)}; "
                              "give a folder this run may create and write") from None
        return lock


def redact_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with credentials in URLs and secret environment values removed, for files we write."""
    return {k: storage.redact(v) if isinstance(v, str) else v for k, v in config.items()}


def describe_differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not keys:
        return "fingerprint differs"
    return "; ".join(f"{k}: existing {old.get(k)!r}, now {new.get(k)!r}" for k in keys[:4])
