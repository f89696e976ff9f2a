"""The driver's bookkeeping without Ray: which shards are pending (listed lazily, done ones skipped and counted),
the job summary and its report line, and the configuration fingerprint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cnnbatch.extract import embeddings_table, feature_schema
from cnnbatch.output import OutputDataset
from cnnbatch.pipeline import JobSummary, fingerprint_of, pending_shards
from cnnbatch.shards import Shard, list_shards
from cnnbatch.shardstats import ShardStats


def folder_input(root: Path, images: int) -> Path:
    for index in range(images):
        path = root / "in" / ("cats" if index % 2 else "dogs") / f"{index:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return root / "in"


def finish(output: OutputDataset, shard: Shard, fingerprint: str) -> ShardStats:
    schema = feature_schema(2, {})
    keys = list(shard.paths)
    table = embeddings_table(keys, [None] * len(keys), np.zeros((len(keys), 2), np.float32), schema)
    return output.write_shard(ShardStats(shard.shard_id, shard.signature, fingerprint), table, [])


def test_pending_shards_skips_the_done_ones_and_counts_every_shard(tmp_path: Path) -> None:
    source = folder_input(tmp_path, 10)
    output = OutputDataset(str(tmp_path / "out"))
    output.prepare("fp", {}, overwrite=False)
    shards = list(list_shards(str(source), shard_size=3))  # 4 shards: 3 + 3 + 3 + 1
    finish(output, shards[0], "fp")
    finish(output, shards[2], "fp")
    finish(output, shards[3], "another-fingerprint")  # done, but for another configuration

    summary, done, seen = JobSummary(output=output.uri), {}, {}
    pending = list(pending_shards(iter(shards), output, "fp", summary, done, seen))
    assert [s.shard_id for s in pending] == ["000001", "000003"]
    assert (summary.shards_total, summary.shards_skipped) == (4, 2)
    assert set(done) == {"000000", "000002"} and done["000000"].rows == 3
    assert seen == {s.shard_id: "folder" for s in shards}
    assert summary.stage_seconds["list"] >= 0


def test_pending_shards_is_lazy(tmp_path: Path) -> None:
    """The listing is consumed one shard at a time, as actors become free: never read ahead whole."""
    output = OutputDataset(str(tmp_path / "out"))
    taken: list[str] = []

    def listing():
        for index in range(1000):
            taken.append(f"{index:06d}")
            yield Shard(f"{index:06d}", "folder", str(tmp_path), (f"{index}.jpg",), "sig")

    pending = pending_shards(listing(), output, "fp", JobSummary(output=output.uri), {}, {})
    assert [next(pending).shard_id for _ in range(2)] == ["000000", "000001"]
    assert taken == ["000000", "000001"]


def test_summary_line_reports_counts_rates_stages_and_failures() -> None:
    stats = [ShardStats("a", "s", "f", rows=90, errors=10, worker="w", started_at=0.0, first_batch_at=2.0,
                        first_batch_images=20, finished_at=10.0)]
    summary = JobSummary(output="s3://key:secret@bucket/out", shards_total=3, shards_skipped=1, shards_done=1,
                         images=100, rows=90, errors=10, seconds=20.0, stage_seconds={"read": 1.5, "infer": 7.25},
                         done_here=stats)
    assert summary.ok and summary.images_per_second == 5.0
    assert summary.steady_images_per_second == pytest.approx(80 / 8)
    line = summary.line()
    assert "100 images (90 rows, 10 errors) in 1 shards [1 already done]" in line
    assert "5.0 images/s" in line and "10.0 images/s after start-up" in line
    assert "infer 7.2s, read 1.5s" in line  # stages sorted by name
    assert "secret" not in line and "s3://***@bucket/out" in line
    assert "FAILED" not in line

    summary.failed = {"b": "worker died", "a": "ReadError"}
    assert not summary.ok and summary.line().endswith("FAILED shards: a, b")


def test_an_empty_run_reports_zero_rates() -> None:
    summary = JobSummary(output="out")
    assert summary.images_per_second == 0.0 and summary.steady_images_per_second is None
    assert "0 images (0 rows, 0 errors) in 0 shards [0 already done]" in summary.line()


def test_fingerprint_is_stable_short_and_order_free() -> None:
    a = fingerprint_of({"backbone": "vgg16", "image_size": 32, "weights": "random:seed=1"})
    b = fingerprint_of({"weights": "random:seed=1", "image_size": 32, "backbone": "vgg16"})
    assert a == b and len(a) == 24 and int(a, 16) >= 0
    assert fingerprint_of({"backbone": "vgg16", "image_size": 64, "weights": "random:seed=1"}) != a
