"""``make demo``: the whole pipeline on a generated sample, offline, on the CPU.

Writes ``<root>/sample`` (deterministic texture images with class folders) if it is absent, then runs each stage
through the same entry points a user runs and prints where every output is and how to read it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .extract import ExtractConfig, run_extract
from .logs import setup_logging
from .pipeline import JobSummary
from .predict import PredictConfig, run_predict
from .sample import write_sample
from .shards import folder_label
from .train import TrainConfig, run_train

log = logging.getLogger(__name__)
DEMO_IMAGE_SIZE = 64  # small enough for a 2-core CPU; VGG16 accepts down to 32 px


def holdout_accuracy(predictions: Path) -> tuple[int, int]:
    """(correct, total) of a prediction dataset over a folder input: the true label is the key's class folder."""
    import pyarrow.dataset as ds

    table = ds.dataset(str(predictions)).to_table(columns=["key", "predicted_label"])
    pairs = [(folder_label(key), predicted) for key, predicted in
             zip(table.column("key").to_pylist(), table.column("predicted_label").to_pylist())]
    return sum(truth == predicted for truth, predicted in pairs), len(pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data", help="where the sample and the outputs go (default: data)")
    parser.add_argument("--weights", default="random",
                        help="backbone weights: random (offline, default), imagenet, or a notop file URI")
    args = parser.parse_args(argv)
    setup_logging()

    root = Path(args.root)
    sample = write_sample(root / "sample", per_class=40, size=96, holdout_per_class=15)
    features = root / "features"

    extract = ExtractConfig(input=str(sample / "train"), output=str(features), backbone="vgg16",
                            weights=args.weights, image_size=DEMO_IMAGE_SIZE, batch_size=32, shard_size=40,
                            workers=1, precision="float32", overwrite=True)  # features of an older version: redo
    summary = run_extract(extract)
    if not summary.ok:
        print(f"demo: extraction failed: {summary.line()}", file=sys.stderr)
        return 1
    model = root / "model"
    # overwrite: a rerun of the demo retrains on the (resumed, unchanged) features rather than refusing
    trained = run_train(TrainConfig(features=(str(features),), output=str(model), overwrite=True))
    predictions = root / "predictions"
    # overwrite: each demo run trains a new model, which is a new configuration for the predictions folder
    predicted = run_predict(PredictConfig(model=str(model), input=str(sample / "holdout"), output=str(predictions),
                                          top_k=2, batch_size=32, workers=1, overwrite=True))
    if not isinstance(predicted, JobSummary) or not predicted.ok:
        print(f"demo: prediction failed: {predicted.line()}", file=sys.stderr)
        return 1
    correct, total = holdout_accuracy(predictions)

    print()
    print("== cnnbatch demo ==")
    print(f"features: {summary.line()}")
    print(f"  read them: python -c \"import pyarrow.dataset as ds; print(ds.dataset('{features}').to_table())\"")
    print(f"  or in DuckDB: SELECT key, label FROM read_parquet('{features}/*.parquet')")
    print(f"model: {trained.line()}")
    print(f"  metrics: {model / 'metrics.json'}, figures: {model / 'confusion_matrix.png'}, "
          f"{model / 'training_curve.png'}")
    print(f"predictions of the held-out images: {predicted.line()}")
    print(f"  held-out accuracy {correct / max(total, 1):.4f} ({correct}/{total} images); the head's validation "
          f"accuracy was {trained.validation_accuracy:.4f}")
    print(f"  confusion matrix (validation): {model / 'confusion_matrix.png'}")
    print(f"  read them: SELECT key, predicted_label, probability, top_k_labels "
          f"FROM read_parquet('{predictions}/*.parquet')")
    example = sorted((sample / "holdout").rglob("*.jpg"))[0]
    print(f"  one image: cnnbatch predict --image {example} --model {model} [--json]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
