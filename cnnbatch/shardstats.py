"""A shard's record of what its processing did (its ``_stats/<shard>.json`` done marker), and throughput from them."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field


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
    counts: dict[str, int] = field(default_factory=dict)  # the task's own counts (predict: labelled, correct)

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
