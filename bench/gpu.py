"""GPU figures on a lent NVIDIA machine: bare and end-to-end images/s, model FLOP utilisation, CPU decode rate.

The lent machine has PyTorch and JAX but no TensorFlow, and nothing can be installed there beyond a few small
wheels (TensorFlow with CUDA is far over the limit), so the backbones run under Keras 3 on its PyTorch backend
(eager cuDNN: float32, TF32, mixed float16) and on its JAX backend (XLA-compiled: TF32, mixed float16). The
end-to-end figure is cnnbatch's own ``worker.process_shard`` (read -> decode threads -> model -> Parquet write)
with such a model, over generated ImageNet-sized JPEGs on the local disk; Ray is not there either, so the actor
around it is absent (one shard, one process: the actor adds nothing per image).

Run on the device machine from the repo root (keras, namex and optree carried as wheels)::

    python3 -m bench.gpu --out $OUT/gpu.json --variants torch:float32,torch:tf32,torch:float16

Each variant runs in its own process (a Keras backend is fixed at import) under a time limit; results are
appended to ``--out`` as they come, so a cut-off call still returns what it measured.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench.gpu")
DEFAULT_SIZES = "vgg16=224,inceptionv3=299"
ALL_VARIANTS = ("torch:float16", "jax:float16", "torch:tf32", "jax:tf32", "torch:float32")  # most telling first
E2E_VARIANTS = ("torch:tf32", "torch:float16", "jax:float16")
SMALL_BATCH = 64


# --- the variant process --------------------------------------------------------------------------------------

def configure_backend(backend: str, mode: str) -> Any:
    """Import Keras on ``backend`` with ``mode``'s arithmetic; returns the keras module."""
    os.environ["KERAS_BACKEND"] = backend
    if backend == "torch":
        import torch

        torch.backends.cudnn.benchmark = True  # pick the fastest convolution algorithms for these shapes
        torch.backends.cuda.matmul.allow_tf32 = mode != "float32"
        torch.backends.cudnn.allow_tf32 = mode != "float32"
    else:
        import jax

        jax.config.update("jax_default_matmul_precision", "float32" if mode == "float32" else "tensorfloat32")
    import keras

    if backend == "torch":  # cuDNN wants NCHW: Keras' torch backend would transpose around every convolution
        keras.config.set_image_data_format("channels_first")
    keras.mixed_precision.set_global_policy("mixed_float16" if mode == "float16" else "float32")
    return keras


def build(keras: Any, name: str, size: int) -> tuple[Any, Any]:
    """(backbone on preprocessed float input in Keras' data format, wrapper taking NHWC uint8 like cnnbatch)."""
    from cnnbatch.backbones import get_backbone

    spec = get_backbone(name)
    module = importlib.import_module(f"keras.applications.{spec.module}")
    channels_first = keras.config.image_data_format() == "channels_first"
    shape = (3, size, size) if channels_first else (size, size, 3)
    keras.utils.set_random_seed(1337)
    net = getattr(module, spec.constructor)(include_top=False, weights=None, input_shape=shape, pooling="avg")

    class ToModelInput(keras.layers.Layer):
        """uint8 NHWC -> preprocessed float32 in the model's layout, inside the compiled call (as cnnbatch)."""

        def call(self, images: Any) -> Any:
            pixels = module.preprocess_input(keras.ops.cast(images, "float32"), data_format="channels_last")
            return keras.ops.transpose(pixels, (0, 3, 1, 2)) if channels_first else pixels

    images = keras.Input((size, size, 3), dtype="uint8")
    wrapper = keras.Model(images, net(ToModelInput(dtype="float32")(images)))
    return net, wrapper


def bare_rate(keras: Any, net: Any, size: int, batch: int, seconds: float) -> dict[str, float]:
    """images/s of the backbone alone on a device-resident, preprocessed batch."""
    channels_first = keras.config.image_data_format() == "channels_first"
    shape = (batch, 3, size, size) if channels_first else (batch, size, size, 3)
    inputs = keras.ops.convert_to_tensor(np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32))
    compile_started = time.perf_counter()
    for _ in range(3):  # compilation (XLA) or algorithm search (cuDNN) stays out of the figure
        net.predict_on_batch(inputs)
    warmup = time.perf_counter() - compile_started
    calls, started = 0, time.perf_counter()
    while calls < 5 or time.perf_counter() - started < seconds:
        out = net.predict_on_batch(inputs)  # returns host numpy: a full device sync per call
        calls += 1
    elapsed = time.perf_counter() - started
    assert np.isfinite(np.asarray(out, np.float32)).all(), "non-finite features"
    return {"batch": batch, "images_per_second": calls * batch / elapsed, "warmup_seconds": warmup}


@dataclass(frozen=True)
class KerasShardTask:
    """A :class:`cnnbatch.worker.ShardTask` around a Keras wrapper model (not pickled: one process)."""

    image_size: int
    batch_size: int
    wrapper: Any
    dim: int
    views: int = 1

    def variants(self, key: str, pixels: np.ndarray) -> np.ndarray:
        return pixels[np.newaxis]

    def make_model(self) -> Any:
        def embed(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"embedding": np.asarray(self.wrapper.predict_on_batch(batch["image"]), np.float32)}

        return embed

    def make_table(self, model: Any, keys: list[str], labels: list[str | None],
                   outputs: dict[str, np.ndarray]) -> Any:
        from cnnbatch.extract import embeddings_table, feature_schema

        return embeddings_table(keys, labels, outputs["embedding"][:, 0], feature_schema(self.dim, {"bench": "gpu"}))


def e2e_rate(wrapper: Any, name: str, size: int, batch: int, folder: Path, work: Path,
             in_flight: int) -> dict[str, Any]:
    """cnnbatch's worker over the JPEG folder as one shard: read, decode threads, model, Parquet write."""
    from cnnbatch.backbones import get_backbone
    from cnnbatch.output import OutputDataset
    from cnnbatch.shards import list_shards
    from cnnbatch.worker import decode_threads_for, process_shard

    task = KerasShardTask(size, batch, wrapper, get_backbone(name).feature_dim)
    model = task.make_model()
    model({"image": np.zeros((batch, size, size, 3), np.uint8)})  # compile before the clock starts
    shard = next(iter(list_shards(str(folder), shard_size=10**9)))
    threads = decode_threads_for(os.cpu_count())
    output = OutputDataset(str(work / f"out-{name}-{in_flight}"))
    stats = process_shard(shard, task, model, output, "bench", decode_threads=threads, batches_in_flight=in_flight)
    return {"images": stats.rows, "errors": stats.errors, "decode_threads": threads, "batches_in_flight": in_flight,
            "images_per_second": stats.rows / stats.seconds["total"], "seconds": stats.seconds}


def parse_sizes(text: str) -> list[tuple[str, int]]:
    """``vgg16=224,inceptionv3=299`` -> [("vgg16", 224), ("inceptionv3", 299)]."""
    return [(name, int(size)) for name, size in (item.split("=") for item in text.split(","))]


def run_variant(variant: str, folder: Path, work: Path, seconds: float, batch: int,
                sizes: list[tuple[str, int]]) -> list[dict[str, Any]]:
    backend, mode = variant.split(":")
    keras = configure_backend(backend, mode)
    rows = []
    for name, size in sizes:
        net, wrapper = build(keras, name, size)
        row: dict[str, Any] = {"variant": variant, "backend": backend, "mode": mode, "backbone": name,
                               "image_size": size, "xla": backend == "jax"}
        row["bare"] = bare_rate(keras, net, size, batch, seconds)
        if mode == "float16" and batch > SMALL_BATCH:
            row["bare_small_batch"] = bare_rate(keras, net, size, SMALL_BATCH, seconds / 2)
        if variant in E2E_VARIANTS:
            row["e2e"] = [e2e_rate(wrapper, name, size, batch, folder, work, depth) for depth in (1, 2)]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


# --- several processes sharing the GPU (Ray's fractional --gpus-per-worker) --------------------------------

def run_part(variant: str, folder: Path, work: Path, batch: int, name: str, size: int, part: int,
             parts: int) -> dict[str, Any]:
    """One of ``parts`` processes: build and warm the model, say ready, wait for the go file, do its shard."""
    from cnnbatch.backbones import get_backbone
    from cnnbatch.output import OutputDataset
    from cnnbatch.shards import list_shards
    from cnnbatch.worker import decode_threads_for, process_shard

    backend, mode = variant.split(":")
    keras = configure_backend(backend, mode)
    _, wrapper = build(keras, name, size)
    task = KerasShardTask(size, batch, wrapper, get_backbone(name).feature_dim)
    model = task.make_model()
    model({"image": np.zeros((batch, size, size, 3), np.uint8)})
    total = len(list(folder.rglob("*.jpg")))
    shard = list(list_shards(str(folder), shard_size=total // parts))[part]
    threads = decode_threads_for((os.cpu_count() or 2) / parts)
    (work / f"ready-{part}").touch()
    while not (work / "go").exists():
        time.sleep(0.01)
    started = time.time()
    stats = process_shard(shard, task, model, OutputDataset(str(work / f"multi-{part}")), "bench",
                          decode_threads=threads, batches_in_flight=2)
    return {"part": part, "images": stats.rows, "started": started, "ended": time.time(), "decode_threads": threads,
            "seconds": stats.seconds}


def run_multi(variant: str, name: str, size: int, parts: int, args: argparse.Namespace) -> dict[str, Any]:
    """``parts`` processes over the JPEG folder at once; images/s from the first start to the last end."""
    work = Path(args.work) / f"multi-{variant.replace(':', '-')}-{parts}"
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # several JAX processes share one GPU
    procs = [subprocess.Popen([sys.executable, "-m", "bench.gpu", "--out", "-", "--work", args.work, "--batch",
                               str(args.batch), "--sizes", f"{name}={size}", "--variant", variant,
                               "--part", f"{part}/{parts}", "--part-dir", str(work)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for part in range(parts)]
    deadline = time.time() + args.variant_timeout
    while not all((work / f"ready-{i}").exists() for i in range(parts)):
        if time.time() > deadline or any(p.poll() not in (None, 0) for p in procs):
            for proc in procs:
                proc.kill()
            raise RuntimeError(f"{parts} processes of {variant} did not get ready: "
                               f"{procs[0].communicate()[1][-800:]}")
        time.sleep(0.1)
    (work / "go").touch()
    rows = []
    for proc in procs:
        out, err = proc.communicate(timeout=max(1.0, deadline - time.time()))
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if proc.returncode or not lines:
            raise RuntimeError(f"a process of {variant} failed: {err[-800:]}")
        rows.append(json.loads(lines[-1]))
    images = sum(r["images"] for r in rows)
    elapsed = max(r["ended"] for r in rows) - min(r["started"] for r in rows)
    return {"variant": variant, "backbone": name, "image_size": size, "processes": parts, "images": images,
            "decode_threads_each": rows[0]["decode_threads"], "images_per_second": images / elapsed,
            "infer_seconds": sum(r["seconds"].get("infer", 0.0) for r in rows)}


# --- the machine's CPU decode rate ----------------------------------------------------------------------------

def _decode_all(blobs: list[bytes], size: int) -> int:
    from cnnbatch.decode import decode_image

    for blob in blobs:
        decode_image(blob, size)
    return len(blobs)


def cpu_decode_rates(folder: Path, sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    """JPEG bytes in memory -> decode_image at each size: one thread, all CPUs as threads, all CPUs as processes."""
    from cnnbatch.decode import decode_image

    blobs = [p.read_bytes() for p in sorted(folder.rglob("*.jpg"))]
    cpus = os.cpu_count() or 1
    rows = []
    for size in sizes:
        started = time.perf_counter()
        one = _decode_all(blobs[:512], size) / (time.perf_counter() - started)
        with ThreadPoolExecutor(cpus) as pool:
            started = time.perf_counter()
            list(pool.map(lambda blob, size=size: decode_image(blob, size), blobs))
            threads = len(blobs) / (time.perf_counter() - started)
        chunks = [blobs[i::cpus] for i in range(cpus)]
        with ProcessPoolExecutor(cpus) as pool:
            list(pool.map(_decode_all, chunks[:1], [size]))  # start the processes first
            started = time.perf_counter()
            done = sum(pool.map(_decode_all, chunks, [size] * cpus))
            processes = done / (time.perf_counter() - started)
        rows.append({"image_size": size, "one_thread": one, "threads": threads, "processes": processes,
                     "cpus": cpus, "source": "500x375 JPEG q90"})
    return rows


# --- the orchestrator -----------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    def query(*args: str) -> str:
        try:
            return subprocess.run(args, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    versions = {}
    for name in ("keras", "torch", "jax", "numpy", "pillow", "pyarrow"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:  # noqa: BLE001 - a missing package is simply not listed
            pass
    return {"gpu": query("nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                         "--format=csv,noheader"),
            "cpus": os.cpu_count(), "cpu": platform.processor() or query("sh", "-c", "grep -m1 'model name' "
                                                                              "/proc/cpuinfo"),
            "python": platform.python_version(), "versions": versions}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file the results go to")
    parser.add_argument("--work", default="/tmp/cnnbatch-gpu-bench")
    parser.add_argument("--images", type=int, default=8192, help="JPEGs for the end-to-end runs")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="backbone=size,...")
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per bare figure")
    parser.add_argument("--variants", default=",".join(ALL_VARIANTS))
    parser.add_argument("--variant-timeout", type=float, default=200.0)
    parser.add_argument("--no-decode", action="store_true", help="skip the CPU decode figures")
    parser.add_argument("--multi", default="", help="variant:backbone=size:P1/P2/..., processes sharing the GPU")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: i/P, one process of a --multi run
    parser.add_argument("--part-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    work, folder = Path(args.work), Path(args.work) / "jpegs"
    if args.part:
        part, parts = (int(x) for x in args.part.split("/"))
        (name, size), = parse_sizes(args.sizes)
        print(json.dumps(run_part(args.variant, folder, Path(args.part_dir), args.batch, name, size, part, parts)))
        return 0
    if args.variant:
        run_variant(args.variant, folder, work, args.seconds, args.batch, parse_sizes(args.sizes))
        return 0

    from bench.images import write_folder

    if args.images % args.batch:
        parser.error(f"--images must be a multiple of --batch {args.batch} (a partial batch would recompile), "
                     f"got {args.images}")
    out = Path(args.out)
    results: dict[str, Any] = {"machine": machine(), "batch": args.batch, "images": args.images, "variants": [],
                               "failures": {}}

    def save() -> None:
        out.write_text(json.dumps(results, indent=1))

    started = time.perf_counter()
    write_folder(folder, args.images, threads=os.cpu_count() or 2)
    log.info("%d JPEGs ready in %.1fs", args.images, time.perf_counter() - started)
    if not args.no_decode:
        results["decode"] = cpu_decode_rates(folder, tuple(size for _, size in parse_sizes(args.sizes)))
        log.info("decode: %s", results["decode"])
    save()
    for spec in filter(None, args.multi.split(",")):
        backend, mode, sized, counts = spec.split(":")
        (name, size), = parse_sizes(sized)
        for parts in (int(c) for c in counts.split("/")):
            try:
                row = run_multi(f"{backend}:{mode}", name, size, parts, args)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                results["failures"][f"{spec}:{parts}"] = str(exc)[-1500:]
                continue
            results.setdefault("multi", []).append(row)
            log.info("multi: %s", row)
            save()
    for variant in filter(None, args.variants.split(",")):
        started = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--out", str(out), "--work", str(work),
                                   "--seconds", str(args.seconds), "--batch", str(args.batch), "--sizes",
                                   args.sizes, "--variant", variant],
                                  capture_output=True, text=True, timeout=args.variant_timeout)
        except subprocess.TimeoutExpired as exc:
            rows, error = [], f"timed out after {args.variant_timeout:.0f}s"
            stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        else:
            rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
            error = "" if proc.returncode == 0 else proc.stderr[-1500:]
        results["variants"].extend(rows)
        if error:
            results["failures"][variant] = error
        log.info("%s: %d rows in %.0fs %s", variant, len(rows), time.perf_counter() - started, error[-300:])
        save()
    for row in results["variants"]:
        e2e = " ".join(f"e2e[{r['batches_in_flight']}]={r['images_per_second']:.0f}" for r in row.get("e2e", []))
        print(f"{row['variant']:14s} {row['backbone']:12s} bare={row['bare']['images_per_second']:.0f}/s {e2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
