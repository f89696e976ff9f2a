"""``make demo`` without running its jobs: the held-out accuracy read from a predictions dataset, and the order of
the stages (each job's entry point stands in here; tests/integration runs the real ones)."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cnnbatch import demo
from cnnbatch.demo import DEMO_IMAGE_SIZE, holdout_accuracy
from cnnbatch.pipeline import JobSummary
from cnnbatch.train import TrainSummary


@pytest.fixture(autouse=True)
def _drop_the_log_handler():
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_cnnbatch", False)]:
        root.removeHandler(handler)


def write_predictions(root: Path, rows: list[tuple[str, str]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    table = pa.table({"key": [k for k, _ in rows], "predicted_label": [p for _, p in rows],
                      "probability": pa.array([0.9] * len(rows), pa.float32())})
    pq.write_table(table, root / "part-000000.parquet")
    (root / "_errors").mkdir()  # bookkeeping is not read
    return root


def test_holdout_accuracy_takes_the_truth_from_the_class_folder(tmp_path: Path) -> None:
    predictions = write_predictions(tmp_path / "p", [("dots/1.jpg", "dots"), ("dots/2.jpg", "checks"),
                                                     ("stripes/3.png", "stripes"), ("loose.jpg", "dots")])
    assert holdout_accuracy(predictions) == (2, 4)


class Stages:
    """The three jobs' entry points, recording the configs they were given."""

    def __init__(self, root: Path, extraction_ok: bool = True):
        self.root, self.extraction_ok, self.configs = root, extraction_ok, {}

    def extract(self, config):
        self.configs["extract"] = config
        return JobSummary(output=config.output, failed={} if self.extraction_ok else {"000000": "ReadError"})

    def train(self, config):
        self.configs["train"] = config
        return TrainSummary(output=config.output, labels=("checks", "dots", "stripes"), validation_accuracy=1.0)

    def predict(self, config):
        self.configs["predict"] = config
        holdout = Path(config.input)
        rows = [(p.relative_to(holdout).as_posix(), p.parent.name) for p in sorted(holdout.rglob("*")) if p.is_file()]
        write_predictions(Path(config.output), rows)
        return JobSummary(output=config.output, shards_done=1, images=len(rows), rows=len(rows))


def run_demo(monkeypatch: pytest.MonkeyPatch, stages: Stages) -> int:
    monkeypatch.setattr(demo, "run_extract", stages.extract)
    monkeypatch.setattr(demo, "run_train", stages.train)
    monkeypatch.setattr(demo, "run_predict", stages.predict)
    return demo.main(["--root", str(stages.root)])


def test_the_demo_runs_extract_train_predict_on_its_own_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    stages = Stages(tmp_path / "data")
    assert run_demo(monkeypatch, stages) == 0
    extract, train, predict = stages.configs["extract"], stages.configs["train"], stages.configs["predict"]
    assert extract.input == str(tmp_path / "data" / "sample" / "train") and extract.weights == "random"
    assert extract.image_size == DEMO_IMAGE_SIZE and extract.precision == "float32"
    assert train.features == (extract.output,) and train.overwrite  # a rerun retrains on the resumed features
    assert predict.model == train.output and predict.input == str(tmp_path / "data" / "sample" / "holdout")
    assert predict.overwrite and predict.top_k == 2
    assert len(list((tmp_path / "data" / "sample" / "holdout").rglob("*.*"))) == 45
    out = capsys.readouterr().out
    assert "(45/45 images)" in out and str(train.output) in out  # where the outputs are, and how good they are


def test_a_failed_extraction_stops_the_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    stages = Stages(tmp_path / "data", extraction_ok=False)
    assert run_demo(monkeypatch, stages) == 1
    assert set(stages.configs) == {"extract"}
    assert "demo: extraction failed" in capsys.readouterr().err
