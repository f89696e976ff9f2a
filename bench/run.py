"""``make bench``: every CPU figure of docs/benchmarks.md, measured side by side in one run, then the report.

Order of work: generate the JPEGs (cached), P3 and D1 decoding in this process, then the measured programs, each in a
fresh process whose tree is sampled (bench.monitor): the bare backbone, cnnbatch extraction at N and 10N images
(bfloat16) and at N and 4N (float32), and the plain Keras script at N and 4N. Repeats are interleaved and the best
of each is kept, so that a busy neighbour disturbs every side alike. Steady-state images/s come from the
difference of two runs (start-up cancels out). Results go to ``--results`` (JSON) and, through bench.report, to
docs/benchmarks.md and its chart.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import decoding, report
from bench.images import MEGAPIXEL_SIZE, folder_subset, write_folder, write_small_pngs
from bench.monitor import REPO, RunResult, psutil_module, python_argv, run_measured
from cnnbatch.backbones import get_backbone
from cnnbatch.extract import ExtractConfig

log = logging.getLogger("bench")


@dataclass(frozen=True)
class BenchConfig:
    image_size: int = 160  # VGG16; small enough for a 2-core CPU, large enough that compute dominates
    default_size: int = 224  # P1 again at VGG16's own size
    batch_size: int = 32
    shard_size: int = ExtractConfig.shard_size  # what users get: P1 counts the per-shard costs at that size
    n: int = 200  # P4's small run; the big one (P1's) holds memory_scale x n images, two shards
    memory_scale: int = 10
    p2_images: int = 400  # P2's runs (cnnbatch and the plain Keras script), the 224 px run, the worker A/B
    repeats: int = 2
    bare_seconds: float = 10.0  # bare runs that no goal divides by (float32, XLA, InceptionV3)
    # The bare runs P1 divides by span about as long as the job's steady state they are compared with (~70 s for
    # the 10N job, ~28 s for the 224 px one): the best of two 10 s windows of the same model ranged 28.5-29.6
    # images/s here, so short windows flattered the denominator by up to ~2% against a job's 70 s average.
    p1_bare_seconds: float = 45.0
    default_size_bare_seconds: float = 30.0
    big_images: int = 24  # 3 MP JPEGs for P3 (and a third as many 12 MP ones)
    decode_sizes: tuple[int, ...] = (160, 224)  # the first is P3's headline: the size every other figure uses
    d1_images: int = 300  # D1: the ImageNet-sized JPEGs decoded per round, by cnnbatch, Keras' recipe and bare libjpeg
    d1_rounds: int = 5
    small_images: int = 4000  # P1 where the model is cheap: small PNGs to 32 px
    small_size: int = 32
    small_bare_seconds: float = 20.0
    learning: bool = True  # A1, A2, F1, F2 (bench/learning.py)


QUICK = BenchConfig(image_size=32, default_size=48, batch_size=8, shard_size=8, n=8, memory_scale=3, p2_images=16,
                    repeats=1, bare_seconds=1.0, p1_bare_seconds=1.0, default_size_bare_seconds=1.0, big_images=3,
                    decode_sizes=(32,), d1_images=8, d1_rounds=1, small_images=64, small_bare_seconds=1.0,
                    learning=False)
PHONE_SIZE = (4032, 3024)  # 12 MP: a phone camera's photo


def difference_rate(small: RunResult, big: RunResult, n_small: int, n_big: int) -> dict[str, float]:
    """images/s from the difference of two runs' wall times (a cross-check of the in-job figure: Ray's and
    TensorFlow's start-up vary by seconds from run to run on a shared machine, so this one is noisier)."""
    rate = (n_big - n_small) / max(big.seconds - small.seconds, 1e-9)
    return {"images_per_second": rate, "startup_seconds": small.seconds - n_small / rate,
            "seconds_small": small.seconds, "seconds_big": big.seconds}


class Bench:
    def __init__(self, config: BenchConfig, work: Path):
        self.config, self.work = config, work
        self.runs: dict[str, list[RunResult]] = {}

    def measure(self, name: str, argv: list[str]) -> RunResult:
        result = run_measured(argv)
        self.runs.setdefault(name, []).append(result)
        log.info("%-22s %6.1fs  rss %s  foreign cpu %.2f", name, result.seconds, result.peak_rss_mb,
                 result.foreign_cpu)
        return result

    def best(self, name: str) -> RunResult:
        return min(self.runs[name], key=lambda r: r.seconds)

    def bare(self, name: str, precision: str, *extra: str, backbone: str = "vgg16", size: int | None = None,
             seconds: float | None = None) -> None:
        c = self.config
        size = get_backbone(backbone).check_size(max(size or c.image_size, get_backbone(backbone).min_input_size))
        self.measure(name, python_argv("bench.bare", "--backbone", backbone, "--image-size", str(size),
                                       "--batch-size", str(c.batch_size), "--precision", precision,
                                       "--seconds", str(seconds or c.bare_seconds), *extra))

    def job(self, name: str, folder: Path, precision: str, size: int | None = None) -> None:
        c = self.config
        self.measure(name, python_argv("bench.job", "--input", str(folder), "--output", str(self.work / f"out-{name}"),
                                       "--image-size", str(size or c.image_size), "--batch-size", str(c.batch_size),
                                       "--shard-size", str(c.shard_size), "--precision", precision))

    def steady(self, name: str) -> float:
        """The best in-job steady-state images/s of a cnnbatch or plain-script run."""
        return max(r.result["steady_images_per_second"] for r in self.runs[name])

    def script(self, name: str, folder: Path) -> None:
        c = self.config
        self.measure(name, [sys.executable, str(REPO / "bench" / "keras_script.py"), "--input", str(folder),
                            "--image-size", str(c.image_size), "--batch-size", str(c.batch_size)])

    def bare_rate(self, name: str) -> float:
        return max(r.result["images_per_second"] for r in self.runs[name])


def cpu_times() -> list[int]:
    """The machine's CPU time counters (/proc/stat's first line: user, nice, system, idle, iowait, irq, softirq,
    steal, ...), in ticks; empty where there is no /proc/stat."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return []


def steal_share(start: list[int], end: list[int]) -> float | None:
    """The share of CPU time the hypervisor gave to other guests between two readings (a virtual machine on a busy
    host runs slower by about that much, whatever its own load); None where unknown."""
    if len(start) < 8 or len(end) < 8:
        return None
    total = sum(end[:8]) - sum(start[:8])
    return (end[7] - start[7]) / total if total > 0 else None


def machine() -> dict[str, Any]:
    psutil = psutil_module()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    from cnnbatch.versions import library_versions

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "bf16": [f for f in ("avx512_bf16", "amx_bf16") if f in flags.split()],
            "os": platform.platform(), "versions": library_versions(),
            "load_average_at_start": os.getloadavg(), "cpu_times_at_start": cpu_times()}


def run(config: BenchConfig, work: Path) -> dict[str, Any]:
    c = config
    started = time.perf_counter()
    results: dict[str, Any] = {"config": asdict(c), "machine": machine(),
                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    big_n = c.n * c.memory_scale
    source = write_folder(work / "jpegs", max(big_n, c.p2_images))
    folders = {n: folder_subset(source, work / f"jpegs-{n}", n) for n in sorted({c.n, c.p2_images, big_n})}
    megapixel = write_folder(work / "jpegs-3mp", c.big_images, size=MEGAPIXEL_SIZE)
    phone = write_folder(work / "jpegs-12mp", max(1, c.big_images // 3), size=PHONE_SIZE)
    log.info("JPEGs ready in %.0fs", time.perf_counter() - started)

    results["p3"] = [decoding.draft_speedup(megapixel, size, repeats=5) for size in c.decode_sizes]
    results["p3"].append(decoding.draft_speedup(phone, c.decode_sizes[-1], repeats=5))
    results["decode_one_thread"] = decoding.single_thread_rate(source, c.image_size)
    log.info("P3 %s", [round(r["ratio"], 2) for r in results["p3"]])
    results["d1"] = decoding.d1(source, (c.default_size, c.image_size), c.d1_images, c.d1_rounds)
    log.info("D1 %s", [round(r["vs_keras"], 2) for r in results["d1"]])

    bench = Bench(c, work)
    for _ in range(c.repeats):  # interleaved: each repeat measures every side once
        bench.bare("bare-bf16", "bfloat16", seconds=c.p1_bare_seconds)
        bench.job("cnnbatch-bf16-N", folders[c.n], "bfloat16")
        bench.job("cnnbatch-bf16-10N", folders[big_n], "bfloat16")
        bench.script("keras-p2", folders[c.p2_images])
        bench.job("cnnbatch-bf16-p2", folders[c.p2_images], "bfloat16")
        bench.job("cnnbatch-fp32-p2", folders[c.p2_images], "float32")
        bench.bare("bare-fp32", "float32")
    bench.job("cnnbatch-auto-N", folders[c.n], "auto")
    bench.bare("bare-bf16-default-size", "bfloat16", size=c.default_size, seconds=c.default_size_bare_seconds)
    bench.job("cnnbatch-bf16-default-size", folders[c.p2_images], "bfloat16", size=c.default_size)
    bench.bare("bare-bf16-xla", "bfloat16", "--xla")
    bench.bare("bare-inceptionv3-bf16", "bfloat16", backbone="inceptionv3")
    small = write_small_pngs(work / "pngs-small", c.small_images)
    results["small_stage_costs"] = decoding.stage_costs(small, c.small_size)
    bench.bare("bare-bf16-small", "bfloat16", size=c.small_size, seconds=c.small_bare_seconds)
    bench.job("cnnbatch-bf16-small", small, "bfloat16", size=c.small_size)
    if c.learning:
        bench.measure("learning", python_argv("bench.learning", "--work", str(work / "learning"),
                                              "--views-size", str(c.image_size)))
    bench.measure("worker-in-flight", python_argv("bench.worker_ab", "--input", str(folders[c.p2_images]),
                                                  "--image-size", str(c.image_size), "--batch-size",
                                                  str(c.batch_size), "--repeats", "1"))

    bare = {"vgg16_bf16": bench.bare_rate("bare-bf16"), "vgg16_fp32": bench.bare_rate("bare-fp32"),
            "vgg16_bf16_xla": bench.bare_rate("bare-bf16-xla"),
            "inceptionv3_bf16": bench.bare_rate("bare-inceptionv3-bf16")}
    results["bare"] = bare
    results["steady"] = {"cnnbatch_bf16": bench.steady("cnnbatch-bf16-10N"),
                         "cnnbatch_bf16_p2": bench.steady("cnnbatch-bf16-p2"),
                         "cnnbatch_fp32_p2": bench.steady("cnnbatch-fp32-p2"),
                         "keras_fp32_p2": bench.steady("keras-p2")}
    results["difference"] = difference_rate(bench.best("cnnbatch-bf16-N"), bench.best("cnnbatch-bf16-10N"), c.n,
                                            big_n)
    results["auto_precision"] = bench.runs["cnnbatch-auto-N"][0].result["precision"]
    big_job = bench.best("cnnbatch-bf16-10N").result
    steady = results["steady"]
    results["p1"] = {"ratio": steady["cnnbatch_bf16"] / bare["vgg16_bf16"],
                     "difference_ratio": results["difference"]["images_per_second"] / bare["vgg16_bf16"],
                     "fp32_ratio": steady["cnnbatch_fp32_p2"] / bare["vgg16_fp32"]}
    results["p1_default_size"] = {"image_size": c.default_size, "bare": bench.bare_rate("bare-bf16-default-size"),
                                  "images_per_second": bench.steady("cnnbatch-bf16-default-size")}
    results["p1_default_size"]["ratio"] = (results["p1_default_size"]["images_per_second"]
                                           / results["p1_default_size"]["bare"])
    small_job = bench.best("cnnbatch-bf16-small").result
    results["p1_small"] = {"image_size": c.small_size, "images": c.small_images,
                           "bare": bench.bare_rate("bare-bf16-small"),
                           "images_per_second": bench.steady("cnnbatch-bf16-small"),
                           "ms_per_image": {stage: 1000 * seconds / max(1, small_job["images"])
                                            for stage, seconds in small_job["stage_seconds"].items()}}
    results["p1_small"]["ratio"] = results["p1_small"]["images_per_second"] / results["p1_small"]["bare"]
    if c.learning:
        learning = bench.runs["learning"][0].result
        learning["views_cost"]["model_seconds_per_view"] = 1 / bare["vgg16_bf16"]
        learning["views_cost"]["ratio"] = (learning["views_cost"]["seconds_per_view"]
                                           / learning["views_cost"]["model_seconds_per_view"])
        results["learning"] = learning
    results["p2"] = {"bf16_ratio": steady["cnnbatch_bf16_p2"] / steady["keras_fp32_p2"],
                     "fp32_ratio": steady["cnnbatch_fp32_p2"] / steady["keras_fp32_p2"]}
    results["p4"] = memory_figures(bench, c.n, big_n)
    results["p6"] = output_figures(big_job, bench.best("cnnbatch-fp32-p2").result,
                                   work / "out-cnnbatch-fp32-p2")
    best_big = bench.best("cnnbatch-bf16-10N")
    results["cpu_seconds_10n"] = best_big.cpu_seconds | {"wall": best_big.seconds}
    results["cores_busy"] = {name: sum(run.cpu_seconds.values()) / run.seconds for name, run in
                             (("cnnbatch-bf16", best_big), ("cnnbatch-fp32", bench.best("cnnbatch-fp32-p2")),
                              ("keras-fp32", bench.best("keras-p2")))}
    results["stages"] = big_job["stage_seconds"]
    results["job_seconds"] = big_job["seconds"]
    results["worker_in_flight"] = bench.runs["worker-in-flight"][0].result
    results["runs"] = {name: [r.to_dict() | {"stderr_tail": ""} for r in rs] for name, rs in bench.runs.items()}
    results["foreign_cpu"] = {"mean": sum(r.foreign_cpu for rs in bench.runs.values() for r in rs)
                              / sum(len(rs) for rs in bench.runs.values()),
                              "max": max(r.foreign_cpu for rs in bench.runs.values() for r in rs)}
    results["machine"]["load_average_at_end"] = os.getloadavg()
    results["machine"]["steal_share"] = steal_share(results["machine"]["cpu_times_at_start"], cpu_times())
    results["bench_seconds"] = time.perf_counter() - started
    return results


def memory_figures(bench: Bench, n: int, big_n: int) -> dict[str, Any]:
    small = [r.peak_rss_mb for r in bench.runs["cnnbatch-bf16-N"]]
    big = [r.peak_rss_mb for r in bench.runs["cnnbatch-bf16-10N"]]
    figures: dict[str, Any] = {"n": n, "big_n": big_n}
    for role in ("driver", "worker", "ray"):
        low, high = max(p[role] for p in small), max(p[role] for p in big)
        figures[role] = {"small_mb": low, "big_mb": high, "ratio": high / low if low else float("nan")}
    return figures


def output_figures(bf16_job: dict[str, Any], fp32_job: dict[str, Any], fp32_output: Path) -> dict[str, Any]:
    def bytes_per_vector(job: dict[str, Any]) -> float:
        return sum(s["part_bytes"] for s in job["shards"]) / max(1, sum(s["rows"] for s in job["shards"]))

    raw = 512 * 4
    write = sum(s["seconds"].get("write", 0.0) for s in bf16_job["shards"])
    return {"write_seconds": write, "job_seconds": bf16_job["seconds"], "write_fraction": write / bf16_job["seconds"],
            "raw_bytes_per_vector": raw,
            "bf16_bytes_per_vector": bytes_per_vector(bf16_job), "bf16_ratio": bytes_per_vector(bf16_job) / raw,
            "fp32_bytes_per_vector": bytes_per_vector(fp32_job), "fp32_ratio": bytes_per_vector(fp32_job) / raw,
            "fp32_entropy": byte_stream_entropy(fp32_output)}


def byte_stream_entropy(output: Path) -> dict[str, Any]:
    """Order-0 entropy of each byte of the float32 embedding values (the four streams byte_stream_split makes):
    what any coder of independent bytes needs at least, so how far below raw a lossless layout could get."""
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(sorted(output.glob("part-*.parquet")), columns=["embedding"])
    values = table.column("embedding").combine_chunks().flatten().to_numpy().astype("<f4")
    streams = values.view(np.uint8).reshape(-1, 4)

    def entropy(stream: np.ndarray) -> float:
        counts = np.bincount(stream, minlength=256)
        p = counts[counts > 0] / stream.size
        return float(-(p * np.log2(p)).sum())

    bits = [entropy(streams[:, i]) for i in range(4)]  # least significant mantissa byte first
    # The three low bytes are mantissa noise with nothing for a coder to exploit beyond their order-0 entropy;
    # the top byte (sign, exponent) has structure that zstd's matches use, so it is left out of the floor.
    return {"bits_per_byte": bits, "mantissa_floor_ratio": sum(bits[:3]) / 32,
            "zero_fraction": float((values == 0).mean())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(REPO / "bench" / "results" / "work"), help="JPEGs and outputs")
    parser.add_argument("--results", default=str(REPO / "bench" / "results" / "cpu.json"))
    parser.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    parser.add_argument("--chart", default=str(REPO / "docs" / "benchmarks.png"))
    parser.add_argument("--gpu-results", default=str(REPO / "bench" / "gpu_results.json"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness, measures nothing")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from --results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    results_path = Path(args.results)
    if args.report_only:
        results = json.loads(results_path.read_text())
    else:
        config = QUICK if args.quick else BenchConfig()
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        results = run(config, work)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1, default=str))
    gpu_path = Path(args.gpu_results)
    gpu = json.loads(gpu_path.read_text()) if gpu_path.exists() else None
    report.write(results, gpu, Path(args.doc), Path(args.chart))
    print(report.summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
