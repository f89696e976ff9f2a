"""``cnnbatch plan`` as a user runs it: a fresh process, its report on stdout, bad arguments as one line."""

from __future__ import annotations

from pathlib import Path

from ..conftest import TEST_IMAGE_SIZE, run_cli


def test_plan_cli_prints_layers_flops_output_and_hours(sample_root: Path) -> None:
    folder = sample_root / "train"
    images = sum(1 for p in folder.rglob("*") if p.is_file())
    result = run_cli("plan", "--input", str(folder), "--image-size", str(TEST_IMAGE_SIZE),
                     "--images-per-second-per-device", "0.01", "--devices", "2", "--shard-size", "10")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"{images} images in {-(-images // 10)} shards" in out
    assert "block1_conv1" in out and "32 x 32 x 64" in out and "1 x 1 x 512" in out
    assert "batch_normalization" not in out
    hours = images / (0.01 * 2) / 3600
    assert f"estimate: {hours:.2f} hours" in out and "as given" in out
    assert "0.63 GFLOPs per image" in out  # VGG16 at 32 px: 30.69 GFLOPs x (32/224)^2


def test_plan_rejects_bad_arguments_with_expected_and_got(sample_root: Path) -> None:
    result = run_cli("plan", "--input", str(sample_root / "train"), "--devices", "0")
    assert result.returncode == 2 and "--devices must be at least 1, got 0" in result.stderr
    result = run_cli("plan", "--input", str(sample_root / "nowhere"))
    assert result.returncode == 1 and "nowhere" in result.stderr
