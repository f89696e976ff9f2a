"""``cnnbatch plan``: a dry run before spending money — what a job would read, compute, write, and how long it takes.

Lists the input's shards and counts their images without decoding any (folder listings; tar headers; Parquet
footers), walks the backbone's layers at the chosen size with each one's output volume (W2 = (W1 - F + 2P)/S + 1,
from the layer's own kernel, stride and padding, checked against Keras' shapes) and FLOPs, and turns the measured
throughput of a device (docs/benchmarks.md) into hours for a number of devices.
"""

from __future__ import annotations

import logging
import math
import tarfile
from dataclasses import dataclass, field
from typing import Any

from . import storage
from .backbones import BACKBONES, get_backbone
from .config import log_config, option, require
from .precision import PRECISIONS
from .shards import Shard, list_shards
from .tarfiles import count_tar_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Measured:
    """A device's measured throughput for one backbone (docs/benchmarks.md, ``make bench``)."""

    device: str  # what it was measured on, in words
    image_size: int
    precision: str
    model_images_per_second: float  # the bare compiled backbone at image_size
    decode_images_per_second: float  # JPEG decoding on all the device's CPUs (500x375 ImageNet-sized photos)
    shares_cores: bool  # True on a CPU: decoding and the model take turns on the same cores
    efficiency: float = 1.0  # measured end-to-end images/s over what model and decoding alone would allow


# From docs/benchmarks.md. CPU: this project's 2-core AMD EPYC with AVX512-BF16 (no AMX), TensorFlow, bfloat16, one
# actor, at 160 px; decoding: 1,304 images/s on one core, so 2,608 on both; efficiency = the job's steady state
# (47.6 images/s) over 1/(1/49.8 + 1/2608). H100: Keras on PyTorch's
# cuDNN (the analogue of TensorFlow's GPU kernels, which could not run there), mixed float16, fed by its 16 CPUs
# decoding in processes (as several actors per GPU do).
_CPU = "2-core AMD EPYC (AVX512-BF16), TensorFlow, bfloat16"
_H100 = "NVIDIA H100 80GB HBM3 + 16 CPUs, Keras/cuDNN, float16"
MEASURED: dict[str, dict[str, Measured]] = {
    "cpu": {
        "vgg16": Measured(_CPU, 160, "bfloat16", 49.8, 2608.0, True, 0.973),
        "inceptionv3": Measured(_CPU, 160, "bfloat16", 175.8, 2608.0, True, 0.973),
    },
    "h100": {
        "vgg16": Measured(_H100, 224, "float16", 5907.0, 2756.0, False),
        "inceptionv3": Measured(_H100, 299, "float16", 2788.0, 2568.0, False),
    },
}
# Parquet bytes per vector over raw float32 (zstd + byte_stream_split, parts of 400-2000 rows), measured on
# random-weight VGG16 features; float16: those float32 features rounded to float16 and written the same way.
MEASURED_BYTES_RATIO = {"float32": 0.79, "bfloat16": 0.29, "float16": 0.39}
# Layers that only rescale or reshape each value keep the volume: listed with --all-layers only.
ELEMENTWISE = frozenset({"BatchNormalization", "Activation", "ReLU", "Rescaling", "Normalization", "Dropout"})


@dataclass(frozen=True)
class PlanConfig:
    input: str = option("images: a folder tree, .tar shards or .parquet files (any fsspec URL)", metavar="URI")
    backbone: str = option("the CNN", "vgg16", choices=tuple(BACKBONES))
    image_size: int | None = option("input size in pixels (default: the backbone's, 224 or 299)", None, metavar="N")
    shard_size: int = option("images per shard for a folder input", 1000, metavar="N")
    device: str = option("whose measured throughput to assume (docs/benchmarks.md)", "cpu", choices=tuple(MEASURED))
    images_per_second_per_device: float | None = option(
        "throughput of one device, instead of the measured one", None, metavar="F")
    devices: int = option("devices (actors) the job would run on", 1, metavar="N")
    precision: str = option("the precision the job would use (for the output size)", "auto", choices=PRECISIONS)
    all_layers: bool = option("also list the layers that keep the volume (batch norm, activations)", False)
    augment_views: int = option("augmented views per image the job would extract (K + 1 model passes per image)", 0,
                                metavar="K")

    def __post_init__(self) -> None:
        backbone = get_backbone(self.backbone)
        require(self.shard_size >= 1, f"--shard-size must be at least 1, got {self.shard_size}")
        require(self.devices >= 1, f"--devices must be at least 1, got {self.devices}")
        require(self.augment_views >= 0, f"--augment-views must be 0 or more, got {self.augment_views}")
        require(self.images_per_second_per_device is None or self.images_per_second_per_device > 0,
                f"--images-per-second-per-device must be above 0, got {self.images_per_second_per_device}")
        if self.image_size is not None:
            backbone.check_size(self.image_size)


# --- counting the input --------------------------------------------------------------------------------------

def count_images(shard: Shard) -> int:
    """Images (records) in a shard without decoding: the listing, a Parquet footer, or tar headers only."""
    if shard.kind == "folder":
        return shard.num_files
    fs, root = storage.filesystem(shard.root)
    path = storage.join(root.rstrip("/"), shard.paths[0])
    with storage.with_retries(lambda: fs.open(path, "rb"), f"open {path}") as handle:
        if shard.kind == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(handle).metadata.num_rows
        return count_tar_records(handle)


def count_tar_records(handle: Any) -> int:
    """Rows (features and ``_errors``) a WebDataset tar gives, as the reader counts them, from its headers alone
    (``r:*`` seeks past the data)."""
    with tarfile.open(fileobj=handle, mode="r:*") as archive:
        return count_tar_rows(archive)


@dataclass
class InputCount:
    shards: int = 0
    images: int = 0
    kinds: dict[str, int] = field(default_factory=dict)


def count_input(uri: str, shard_size: int) -> InputCount:
    count = InputCount()
    for shard in list_shards(uri, shard_size):
        count.shards += 1
        count.images += count_images(shard)
        count.kinds[shard.kind] = count.kinds.get(shard.kind, 0) + 1
    return count


# --- the backbone's layers -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str
    window: str  # "F/S/P" for convolutions and pooling, "" otherwise
    output: tuple[int, ...]  # (H, W, C) or (C,)
    params: int
    flops: int  # 2 x multiply-adds of convolutions and dense layers

    @property
    def volume(self) -> int:
        return math.prod(self.output)


def window_output(size: int, kernel: int, stride: int, padding: str) -> tuple[int, float]:
    """``(W2, P)`` with W2 = (W1 - F + 2P)/S + 1 (rounded down); 'same' pads to ceil(W1/S), split over two sides."""
    if padding == "valid":
        return (size - kernel) // stride + 1, 0.0
    out = math.ceil(size / stride)
    pad = max((out - 1) * stride + kernel - size, 0) / 2
    return int((size - kernel + 2 * pad) // stride + 1), pad


def _shape(tensor: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in tensor.shape[1:])


def layer_row(layer: Any) -> LayerRow:
    """A layer's row, its output volume computed from its config and checked against Keras' own shape."""
    kind = type(layer).__name__
    config = layer.get_config()
    inputs = layer.input if isinstance(layer.input, (list, tuple)) else [layer.input]
    in_shape = _shape(inputs[0])
    keras_out = _shape(layer.output)
    window, flops, out = "", 0, keras_out
    if kind in ("Conv2D", "MaxPooling2D", "AveragePooling2D"):
        kernel = config.get("kernel_size") or config.get("pool_size")
        strides = config.get("strides") or kernel
        dims = [window_output(in_shape[i], kernel[i], strides[i], config["padding"]) for i in (0, 1)]
        channels = config["filters"] if kind == "Conv2D" else in_shape[2]
        out = (dims[0][0], dims[1][0], channels)
        window = f"{kernel[0]}x{kernel[1]}/{strides[0]}/{dims[0][1]:g}"
        if kind == "Conv2D":
            flops = 2 * out[0] * out[1] * channels * kernel[0] * kernel[1] * in_shape[2] // config.get("groups", 1)
    elif kind == "Dense":
        flops = 2 * in_shape[-1] * config["units"]
    if out != keras_out:
        raise ValueError(f"layer {layer.name} ({kind}): computed output {out}, Keras says {keras_out}")
    return LayerRow(layer.name, kind, window, out, int(layer.count_params()), flops)


def backbone_layers(backbone: str, image_size: int) -> list[LayerRow]:
    """Every layer of the pooled backbone at ``image_size`` (built without weights: nothing is downloaded)."""
    model = get_backbone(backbone).build(image_size, weights=None)
    return [layer_row(layer) for layer in model.layers if type(layer).__name__ != "InputLayer"]


# --- the estimate --------------------------------------------------------------------------------------------

def estimated_images_per_second(measured: Measured, flops_at_size: int, flops_at_measured: int) -> float:
    """The model's rate scaled by FLOPs to the chosen size, combined with decoding: on a CPU both take turns on
    the same cores (1/(1/m + 1/d)); on a GPU they overlap and the slower one sets the pace. Times the measured
    efficiency of the rest of the job (Ray, reads, writes)."""
    model = measured.model_images_per_second * flops_at_measured / flops_at_size
    if measured.shares_cores:
        return measured.efficiency / (1.0 / model + 1.0 / measured.decode_images_per_second)
    return measured.efficiency * min(model, measured.decode_images_per_second)


@dataclass
class PlanReport:
    """What ``cnnbatch plan`` prints (``line()``); also the data, for tests and scripts."""

    config: PlanConfig
    image_size: int
    count: InputCount
    layers: list[LayerRow]
    images_per_second_per_device: float
    throughput_source: str
    output_bytes: int
    output_bytes_raw: int
    bare = True  # the report is the answer: printed without the "cnnbatch plan:" prefix

    @property
    def passes(self) -> int:
        """Model passes per image: the plain image and each augmented view."""
        return 1 + self.config.augment_views

    @property
    def flops_per_image(self) -> int:
        return sum(row.flops for row in self.layers) * self.passes

    @property
    def hours(self) -> float:
        return self.count.images / (self.images_per_second_per_device * self.config.devices) / 3600

    def line(self) -> str:
        c = self.config
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.count.kinds.items()))
        lines = [f"input: {storage.redact(c.input)}: {self.count.images} images in {self.count.shards} shards "
                 f"({kinds}; counted without decoding)",
                 f"backbone: {c.backbone} at {self.image_size}x{self.image_size}, "
                 f"{self.flops_per_image / self.passes / 1e9:.2f} GFLOPs per image (2 x multiply-adds of "
                 f"conv/dense layers); {self.passes} model pass{'es' if self.passes > 1 else ''} per image"
                 + (f" (the plain image and {c.augment_views} augmented views)" if c.augment_views else ""),
                 "",
                 f"  {'layer':<24} {'type':<22} {'F/S/P':<11} {'output (H x W x C)':<20} {'params':>10} "
                 f"{'MFLOPs':>9}"]
        for row in self.layers:
            if row.kind in ELEMENTWISE and not c.all_layers:
                continue
            shape = " x ".join(str(d) for d in row.output)
            lines.append(f"  {row.name:<24} {row.kind:<22} {row.window:<11} {shape:<20} {row.params:>10} "
                         f"{row.flops / 1e6:>9.1f}")
        total_params = sum(row.params for row in self.layers)
        lines += ["",
                  f"compute: {self.flops_per_image * self.count.images / 1e15:.3f} PFLOP for the input; "
                  f"{total_params / 1e6:.1f} M parameters",
                  f"output: ~{_bytes(self.output_bytes)} of Parquet ({_bytes(self.output_bytes_raw)} as raw "
                  f"float32 vectors)",
                  f"throughput: {self.images_per_second_per_device:.1f} images/s per device ({self.throughput_source})",
                  f"estimate: {self.hours:.2f} hours ({self.hours * 60:.1f} minutes) on {c.devices} device(s), "
                  f"{self.hours * c.devices:.2f} device-hours"]
        return "\n".join(lines)


def _bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1000
    raise AssertionError("unreachable")


def output_precision(config: PlanConfig) -> str:
    if config.precision != "auto":
        return config.precision
    return MEASURED[config.device][config.backbone].precision


def run_plan(config: PlanConfig) -> PlanReport:
    log_config(config)
    backbone = get_backbone(config.backbone)
    size = backbone.check_size(config.image_size)
    count = count_input(config.input, config.shard_size)
    layers = backbone_layers(backbone.name, size)
    flops = sum(row.flops for row in layers)
    passes = 1 + config.augment_views
    if config.images_per_second_per_device is not None:
        rate, source = config.images_per_second_per_device / passes, "as given"
        if passes > 1:
            source += f", divided by {passes} model passes per image"
    else:
        measured = MEASURED[config.device][backbone.name]
        at_measured = sum(row.flops for row in backbone_layers(backbone.name, measured.image_size))
        rate = estimated_images_per_second(measured, flops * passes, at_measured)
        source = (f"measured on {measured.device}: model {measured.model_images_per_second:g} images/s at "
                  f"{measured.image_size} px scaled by FLOPs, decoding {measured.decode_images_per_second:g} "
                  f"images/s, job efficiency {measured.efficiency:g}; see docs/benchmarks.md")
    raw = count.images * backbone.feature_dim * 4 * passes
    key_bytes = count.images * 16  # keys and labels compress to a few bytes each: a small allowance
    ratio = MEASURED_BYTES_RATIO[output_precision(config)]
    return PlanReport(config, size, count, layers, rate, source, int(raw * ratio) + key_bytes, raw)

