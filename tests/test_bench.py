"""The bench harness on tiny sizes: measured-process sampling, steady-state arithmetic, P3 decode, the report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench import decoding, report
from bench.images import MEGAPIXEL_SIZE, folder_subset, write_folder
from bench.monitor import RunResult, run_measured
from bench.run import difference_rate, output_figures

REPO = Path(__file__).resolve().parents[1]


def test_jpeg_folders_are_deterministic_and_extend(tmp_path: Path) -> None:
    small = write_folder(tmp_path / "a", 3, size=(64, 48), classes=2)
    first = {p.relative_to(small): p.read_bytes() for p in small.rglob("*.jpg")}
    write_folder(tmp_path / "a", 5, size=(64, 48), classes=2)
    again = {p.relative_to(small): p.read_bytes() for p in small.rglob("*.jpg")}
    assert len(again) == 5 and all(again[k] == v for k, v in first.items())
    assert sorted(str(k) for k in first) == ["class-0/img-000000.jpg", "class-0/img-000002.jpg",
                                             "class-1/img-000001.jpg"]
    other = write_folder(tmp_path / "b", 3, size=(64, 48), classes=2)
    assert {p.relative_to(other): p.read_bytes() for p in other.rglob("*.jpg")} == first
    subset = folder_subset(small, tmp_path / "sub", 2)
    assert len(list(subset.rglob("*.jpg"))) == 2
    stale = subset / "class-0" / "img-000099.jpg"  # left by an earlier subset of another source
    stale.write_bytes(b"old")
    assert sorted(p.name for p in folder_subset(small, subset, 2).rglob("*.jpg")) == ["img-000000.jpg",
                                                                                       "img-000002.jpg"]
    with pytest.raises(ValueError, match="holds 5 images, expected at least 9"):
        folder_subset(small, tmp_path / "sub9", 9)


def test_run_measured_samples_peak_rss_and_parses_the_json_line() -> None:
    program = ("import json, time; block = bytearray(300 * 2**20); block[::4096] = b'x' * len(block[::4096]); "
               "time.sleep(1.0); print('noise'); print(json.dumps({'images': 3}))")
    result = run_measured([sys.executable, "-c", program], interval=0.05)
    assert result.result == {"images": 3} and result.returncode == 0
    assert result.seconds >= 1.0
    assert result.peak_rss_mb["driver"] >= 300
    assert result.peak_rss_mb["worker"] == 0.0  # no Ray actor in this tree
    with pytest.raises(RuntimeError, match=r"benchmark command failed \(exit 3\)"):
        run_measured([sys.executable, "-c", "import sys; sys.exit(3)"])


def test_difference_rate_cancels_start_up() -> None:
    # 10 s of start-up, then 4 images/s: 100 images -> 35 s, 1000 images -> 260 s.
    small = RunResult(argv=[], seconds=35.0, returncode=0)
    big = RunResult(argv=[], seconds=260.0, returncode=0)
    steady = difference_rate(small, big, 100, 1000)
    assert steady["images_per_second"] == pytest.approx(4.0)
    assert steady["startup_seconds"] == pytest.approx(10.0)


def _shard(shard_id: str, rows: int, write: float, part_bytes: int) -> dict:
    return {"shard_id": shard_id, "rows": rows, "part_bytes": part_bytes, "seconds": {"write": write}}


def _features_output(folder: Path, values) -> Path:
    from cnnbatch.extract import embeddings_table, feature_schema
    from cnnbatch.output import OutputDataset
    from cnnbatch.shardstats import ShardStats

    table = embeddings_table([f"k{i}" for i in range(len(values))], [None] * len(values), values,
                             feature_schema(values.shape[1], {}))
    OutputDataset(str(folder)).write_shard(ShardStats("000000", "s", "f"), table, [])
    return folder


def test_output_figures_and_the_entropy_bound_of_float32_bytes(tmp_path: Path) -> None:
    import numpy as np

    job = {"seconds": 40.0, "shards": [_shard("000001", 100, 0.1, 1000 * 100), _shard("000000", 100, 0.1, 1000 * 100)]}
    fp32 = {"seconds": 10.0, "shards": [_shard("000000", 10, 0.0, 2048 * 10)]}
    # Values in [1, 2): uniform random mantissas, one exponent. The two low bytes carry 8 bits each, the third 7
    # (its top bit is the exponent's lowest), the top byte (sign, exponent) almost none: about 23/32 of raw.
    values = np.random.default_rng(0).uniform(1.0, 2.0, (512, 64)).astype(np.float32)
    values[:, 0] = 0.0
    figures = output_figures(job, fp32, _features_output(tmp_path / "fp32", values))
    assert figures["write_fraction"] == pytest.approx(0.2 / 40.0)
    assert figures["bf16_ratio"] == pytest.approx(1000 / 2048) and figures["fp32_ratio"] == pytest.approx(1.0)
    entropy = figures["fp32_entropy"]
    assert entropy["zero_fraction"] == pytest.approx(1 / 64)
    assert [round(b) for b in entropy["bits_per_byte"][:3]] == [8, 8, 7]  # mantissa bytes: noise
    assert entropy["bits_per_byte"][3] < 0.2  # sign and exponent: (almost) constant
    assert 0.70 < entropy["mantissa_floor_ratio"] < 0.73  # (8 + 8 + 7) / 32, a little less for the zeros


def test_draft_decoding_beats_full_decoding_on_megapixel_jpegs(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "big", 2, size=MEGAPIXEL_SIZE)
    row = decoding.draft_speedup(folder, 64, repeats=2)
    assert row["source"] == "2048x1536" and row["megapixels"] == pytest.approx(3.15)
    assert row["ratio"] > 1.2, row  # libjpeg decodes at 1/8 scale: several times less work


def synthetic_results() -> dict:
    """A results record with the shape bench.run writes (numbers made up: only the report is under test)."""
    return {
        "config": {"image_size": 160, "default_size": 224, "batch_size": 32, "n": 200, "memory_scale": 10,
                   "p2_images": 400, "shard_size": 1000, "repeats": 2, "bare_seconds": 10.0, "p1_bare_seconds": 45.0,
                   "default_size_bare_seconds": 30.0},
        "machine": {"cpu": "AMD EPYC", "cores": 2, "memory_gb": 23.5, "bf16": ["avx512_bf16"], "os": "Linux",
                    "versions": {"tensorflow": "2.21.0"}, "load_average_at_start": [1.0, 1.0, 1.0],
                    "load_average_at_end": [2.0, 1.0, 1.0]},
        "date": "today", "bench_seconds": 600.0, "auto_precision": "bfloat16",
        "p3": [{"image_size": 224, "images": 24, "source": "2048x1536", "megapixels": 3.15,
                "draft_images_per_second": 90.0, "full_images_per_second": 30.0, "ratio": 3.0}],
        "decode_one_thread": {"image_size": 160, "images": 300, "images_per_second": 400.0},
        "steady": {"cnnbatch_bf16": 30.0, "cnnbatch_bf16_p2": 29.5, "cnnbatch_fp32_p2": 15.0, "keras_fp32_p2": 13.0},
        "difference": {"images_per_second": 29.0, "startup_seconds": 12.0, "seconds_small": 19.0,
                       "seconds_big": 81.0},
        "bare": {"vgg16_bf16": 31.0, "vgg16_fp32": 15.5, "vgg16_bf16_xla": 9.0, "inceptionv3_bf16": 60.0},
        "p1": {"ratio": 30 / 31, "difference_ratio": 29 / 31, "fp32_ratio": 0.97},
        "p2": {"bf16_ratio": 29.5 / 13, "fp32_ratio": 15 / 13},
        "p4": {"n": 200, "big_n": 2000, "driver": {"small_mb": 160.0, "big_mb": 161.0, "ratio": 161 / 160},
               "worker": {"small_mb": 900.0, "big_mb": 950.0, "ratio": 950 / 900},
               "ray": {"small_mb": 1700.0, "big_mb": 1700.0, "ratio": 1.0}},
        "p6": {"write_seconds": 0.3, "job_seconds": 45.0, "write_fraction": 0.3 / 45, "raw_bytes_per_vector": 2048,
               "bf16_bytes_per_vector": 650.0, "bf16_ratio": 650 / 2048, "fp32_bytes_per_vector": 1900.0,
               "fp32_ratio": 1900 / 2048,
               "fp32_entropy": {"bits_per_byte": [7.9, 7.9, 7.8, 2.3], "mantissa_floor_ratio": 23.6 / 32,
                                "zero_fraction": 0.04}},
        "stages": {"decode": 3.0, "infer": 30.0, "list": 0.01, "read": 0.2, "total": 33.5, "wait_input": 0.3,
                   "write": 0.3},
        "job_seconds": 45.0,
        "worker_in_flight": {"images": 400, "decode_threads": 2,
                             "images_per_second": {"bare": 31.5, "1": 30.0, "2": 30.3}, "ratio": 1.01,
                             "worker_over_bare": 30.3 / 31.5, "predecoded_over_bare": 0.995,
                             "bare_over_backbone": 0.998},
        "cpu_seconds_10n": {"driver": 1.5, "worker": 80.0, "ray": 6.0, "wall": 45.0},
        "cores_busy": {"cnnbatch-bf16": 1.9, "cnnbatch-fp32": 1.9, "keras-fp32": 1.3},
        "p1_default_size": {"image_size": 224, "bare": 15.0, "images_per_second": 14.4, "ratio": 0.96},
        "foreign_cpu": {"mean": 0.1, "max": 0.3},
        "runs": {"bare-bf16": [{"seconds": 52.0, "foreign_cpu": 0.02, "result": {"images_per_second": 30.9,
                                                                                 "seconds": 45.1}},
                               {"seconds": 53.5, "foreign_cpu": 0.4, "result": {"images_per_second": 31.0,
                                                                                "seconds": 45.4}}]},
    }


def test_report_has_every_goal_the_machine_the_gpu_and_a_chart(tmp_path: Path) -> None:
    results = synthetic_results()
    gpu = json.loads((REPO / "bench" / "gpu_results.json").read_text())
    doc, chart = tmp_path / "benchmarks.md", tmp_path / "benchmarks.png"
    report.write(results, gpu, doc, chart)
    text = doc.read_text()
    for ident in ("P1", "P2", "P3", "P4", "P6"):
        assert f"| {ident} |" in text
    assert "| P1 | pipeline efficiency" in text and "**0.968** | met" in text
    assert ("| P6 | bytes per vector / raw float32, the default job (`--precision auto`: bfloat16 here) | <= 75% | "
            "**32%** | met |") in text
    assert "writes 93% of raw" in text and "entropy alone is 74% of raw" in text  # float32: reported, with why
    assert "| cnnbatch extract, bfloat16, 2000 images (2 shards) | 30.0 |" in text
    assert "--weights random" in text and "AMD EPYC" in text and "NVIDIA H100" in text
    assert "| vgg16 224 | JAX (XLA) | float16 |" in text and "MFU" in text
    assert "| bare-bf16 | 52.0, 53.5 | 0.02, 0.40 |" in text
    assert "| bare compiled backbone, bfloat16 (best of 30.9, 31.0 over 45 s) | 31.0 |" in text
    assert "measure 45 s (160 px) and 30 s (224 px)" in text
    assert "and 0.995 when its images are decoded ahead" in text and "the Embedder runs at 0.998" in text
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 10_000
    assert "NOT MET" not in report.summary(results) and "P1" in report.summary(results)
    results["p1"]["ratio"] = 0.9
    assert "NOT MET" in report.summary(results) and "**P1 is not met in this run** at 160 px (0.900; at 224 px 0.960)" in report.markdown(results, gpu, "c")


# --- the fast path the bench measures: worker.process_shard with batches in flight ---------------------------

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

    folder = write_folder(tmp_path / "in", 10, size=(40, 30), classes=2)
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

    folder = write_folder(tmp_path / "in", 12, size=(40, 30), classes=1)
    shard = next(iter(list_shards(str(folder), shard_size=100)))
    output = OutputDataset(str(tmp_path / "out"))
    with pytest.raises(RuntimeError, match="model failed"):
        process_shard(shard, MeanColourTask(), MeanColour(fail_on_call=2), output, "f", 2, 2)
    assert process_shard(shard, MeanColourTask(), MeanColour(), output, "f", 2, 2).rows == 12
