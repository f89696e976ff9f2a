"""A shard's stats record (its done marker) and the steady throughput computed from many of them."""

from __future__ import annotations

import json

import pytest

from cnnbatch.shardstats import ShardStats, steady_images_per_second


def test_steady_images_per_second_leaves_out_each_workers_start_up() -> None:
    def shard(worker: str, started: float, first_batch: float, finished: float, rows: int, **kw) -> ShardStats:
        return ShardStats(f"{worker}{started}", "sig", "fp", rows=rows, worker=worker, started_at=started,
                          first_batch_at=first_batch, first_batch_images=10, finished_at=finished, **kw)

    # Worker a: warm-up until t=20, then 90 + 100 images by t=39 (gaps included): 190 / 19 = 10 images/s.
    # Worker b, side by side: 40 images after its first batch in 8 s = 5 images/s. The failed shard does not count.
    shards = [shard("a", 0.0, 20.0, 29.0, 100), shard("a", 29.5, 30.0, 39.0, 100),
              shard("b", 1.0, 22.0, 26.0, 30), shard("b", 26.0, 26.5, 30.0, 20),
              shard("b", 30.0, 31.0, 90.0, 500, failed="worker died")]
    assert steady_images_per_second(shards) == pytest.approx(10.0 + 5.0)
    assert steady_images_per_second([shard("c", 0.0, 5.0, 5.0, 10)]) is None  # only the warm-up batch
    assert steady_images_per_second([ShardStats("x", "s", "f", rows=5)]) is None  # stats from before timestamps


def test_one_worker_steady_rate_counts_from_its_first_batch_to_its_last_marker() -> None:
    # 10 images in the warm-up batch (done at t=4), then 50 more by t=9: 50 images / 5 s.
    stats = [ShardStats("0", "s", "f", rows=30, worker="w", started_at=0.0, first_batch_at=4.0,
                        first_batch_images=10, finished_at=6.0),
             ShardStats("1", "s", "f", rows=28, errors=2, worker="w", started_at=6.0, first_batch_at=7.0,
                        first_batch_images=10, finished_at=9.0)]
    assert steady_images_per_second(stats) == pytest.approx(50 / 5)
    assert steady_images_per_second(reversed(stats)) == pytest.approx(50 / 5)  # order of the records is free
    assert steady_images_per_second([]) is None


def test_images_count_rows_and_errors_and_the_json_is_the_record() -> None:
    stats = ShardStats("000007", "sig", "fp", rows=9, errors=2, seconds={"read": 0.5}, worker="host:1")
    assert stats.images == 11
    data = json.loads(stats.to_json())
    assert data["shard_id"] == "000007" and data["rows"] == 9 and data["seconds"] == {"read": 0.5}
    assert ShardStats(**data) == stats
