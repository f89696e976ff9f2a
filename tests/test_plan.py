"""``cnnbatch plan``: image counts without decoding (folder, tar, Parquet, S3), layer volumes and FLOPs, the
estimate."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cnnbatch.plan import (
    MEASURED,
    Measured,
    PlanConfig,
    backbone_layers,
    count_input,
    estimated_images_per_second,
    run_plan,
    window_output,
)

from .conftest import TEST_IMAGE_SIZE


@pytest.mark.parametrize("size, kernel, stride, padding, expected", [
    (224, 3, 1, "same", (224, 1.0)),  # VGG16's convolutions keep the size
    (224, 2, 2, "valid", (112, 0.0)),  # its pooling halves it
    (299, 3, 2, "valid", (149, 0.0)),  # InceptionV3's stem: (299 - 3)/2 + 1
    (35, 3, 2, "valid", (17, 0.0)),
    (17, 3, 2, "same", (9, 1.0)),  # 'same' with stride 2 rounds up: ceil(17/2)
    (8, 1, 1, "same", (8, 0.0)),
])
def test_output_width_follows_w2_equals_w1_minus_f_plus_2p_over_s_plus_1(size, kernel, stride, padding,
                                                                         expected) -> None:
    assert window_output(size, kernel, stride, padding) == expected


@pytest.mark.parametrize("backbone, size, published_gflops", [("vgg16", 224, 30.7), ("inceptionv3", 299, 11.4)])
def test_flops_per_image_match_the_published_figures(backbone: str, size: int, published_gflops: float) -> None:
    rows = backbone_layers(backbone, size)  # each row's volume is also checked against Keras' own shape
    assert sum(r.flops for r in rows) / 1e9 == pytest.approx(published_gflops, rel=0.005)
    assert rows[-1].output == ({"vgg16": 512, "inceptionv3": 2048}[backbone],)


def test_vgg16_layer_volumes_halve_per_block() -> None:
    rows = {r.name: r for r in backbone_layers("vgg16", 64)}
    assert rows["block1_conv1"].output == (64, 64, 64) and rows["block1_conv1"].window == "3x3/1/1"
    assert rows["block1_pool"].output == (32, 32, 64) and rows["block1_pool"].window == "2x2/2/0"
    assert rows["block5_pool"].output == (2, 2, 512)
    assert rows["block1_conv1"].params == 3 * 3 * 3 * 64 + 64


def test_estimate_combines_model_and_decoding() -> None:
    cpu = Measured("cpu", 100, "bfloat16", model_images_per_second=40, decode_images_per_second=400,
                   shares_cores=True)
    # Twice the FLOPs: half the model rate (20/s); decoding takes turns with it on the same cores.
    assert estimated_images_per_second(cpu, 2, 1) == pytest.approx(1 / (1 / 20 + 1 / 400))
    gpu = Measured("gpu", 100, "float16", model_images_per_second=5000, decode_images_per_second=2000,
                   shares_cores=False)
    assert estimated_images_per_second(gpu, 1, 1) == 2000  # the slower of the two sets the pace


@pytest.fixture(scope="module")
def tar_and_parquet(tmp_path_factory, sample_root: Path) -> Path:
    """Two tar shards (5 records, one of them without an image) and a Parquet shard of 4 rows."""
    root = tmp_path_factory.mktemp("shards")
    png = next((sample_root / "train" / "dots").iterdir()).read_bytes()
    tars = root / "tars"
    tars.mkdir()
    members = {"a.tar": [("x/1.png", png), ("x/1.cls", b"dots"), ("x/2.png", png), ("x/3.txt", b"no image")],
               "b.tar": [("4.png", png), ("5.png", png), ("._junk.png", png)]}
    for name, files in members.items():
        with tarfile.open(tars / name, "w") as archive:
            for member, data in files:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    parquet = root / "parquet"
    parquet.mkdir()
    pq.write_table(pa.table({"image": [png] * 4, "key": [f"k{i}" for i in range(4)]}), parquet / "p.parquet")
    return root


def test_counts_without_decoding_folder_tar_and_parquet(sample_root: Path, tar_and_parquet: Path) -> None:
    folder = count_input(str(sample_root / "train"), shard_size=5)
    files = [p for p in (sample_root / "train").rglob("*") if p.is_file()]
    assert folder.images == len(files) and folder.shards == -(-len(files) // 5) and folder.kinds == {
        "folder": folder.shards}
    tars = count_input(str(tar_and_parquet / "tars"), shard_size=1000)
    assert (tars.shards, tars.images) == (2, 5)  # x/1, x/2, x/3 (an _errors row later), 4, 5
    parquet = count_input(str(tar_and_parquet / "parquet"), shard_size=1000)
    assert (parquet.shards, parquet.images, parquet.kinds) == (1, 4, {"parquet": 1})


def test_plan_default_throughput_is_the_measured_one(sample_root: Path) -> None:
    report = run_plan(PlanConfig(input=str(sample_root / "train"), backbone="vgg16", image_size=TEST_IMAGE_SIZE,
                                 device="h100", devices=4))
    measured = MEASURED["h100"]["vgg16"]
    # At 32 px the model is far faster than decoding: the machine's decoding sets the pace.
    assert report.images_per_second_per_device == measured.decode_images_per_second
    assert "measured on NVIDIA H100" in report.line()
    assert report.hours == pytest.approx(report.count.images / (measured.decode_images_per_second * 4) / 3600)
    assert report.output_bytes_raw == report.count.images * 512 * 4


def test_plan_counts_a_bucket(s3_env, sample_root: Path, tar_and_parquet: Path) -> None:
    import s3fs

    bucket = s3_env.new_bucket()
    fs = s3fs.S3FileSystem()
    fs.put(str(sample_root / "train"), f"{bucket}/images", recursive=True)
    fs.put(str(tar_and_parquet / "tars"), f"{bucket}/tars", recursive=True)
    local = [p for p in (sample_root / "train").rglob("*") if p.is_file()]
    report = run_plan(PlanConfig(input=f"s3://{bucket}/images", image_size=TEST_IMAGE_SIZE, shard_size=7,
                                 images_per_second_per_device=1.0))
    assert (report.count.images, report.count.shards) == (len(local), -(-len(local) // 7))
    tars = run_plan(PlanConfig(input=f"s3://{bucket}/tars", image_size=TEST_IMAGE_SIZE,
                               images_per_second_per_device=1.0))
    assert (tars.count.shards, tars.count.images) == (2, 5)


def test_augmented_views_count_k_plus_1_model_passes_per_image(sample_root: Path) -> None:
    base = dict(input=str(sample_root / "train"), backbone="vgg16", image_size=TEST_IMAGE_SIZE,
                images_per_second_per_device=120.0)
    plain, views = run_plan(PlanConfig(**base)), run_plan(PlanConfig(**base, augment_views=5))
    assert views.passes == 6 and plain.passes == 1
    assert views.flops_per_image == 6 * plain.flops_per_image
    assert views.images_per_second_per_device == pytest.approx(20.0) and views.hours == pytest.approx(6 * plain.hours)
    assert views.output_bytes_raw == 6 * plain.output_bytes_raw
    assert "6 model passes per image (the plain image and 5 augmented views)" in views.line()
    with pytest.raises(ValueError, match="--augment-views must be 0 or more, got -1"):
        PlanConfig(**base, augment_views=-1)
