"""``make demo``: the whole pipeline on a generated sample, offline, on the CPU.

Writes ``<root>/sample`` (deterministic texture images with class folders) if it is absent, then runs each stage
through the same entry points a user runs and prints where every output is and how to read it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .cli import setup_logging
from .extract import ExtractConfig, run_extract
from .sample import write_sample
from .train import TrainConfig, run_train

log = logging.getLogger(__name__)
DEMO_IMAGE_SIZE = 64  # small enough for a 2-core CPU; VGG16 accepts down to 32 px


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
                            workers=1, precision="float32")
    summary = run_extract(extract)
    if not summary.ok:
        print(f"demo: extraction failed: {summary.line()}", file=sys.stderr)
        return 1
    model = root / "model"
    # overwrite: a rerun of the demo retrains on the (resumed, unchanged) features rather than refusing
    trained = run_train(TrainConfig(features=(str(features),), output=str(model), overwrite=True))

    print()
    print("== cnnbatch demo ==")
    print(f"features: {summary.line()}")
    print(f"  read them: python -c \"import pyarrow.dataset as ds; print(ds.dataset('{features}').to_table())\"")
    print(f"  or in DuckDB: SELECT key, label FROM read_parquet('{features}/*.parquet')")
    print(f"model: {trained.line()}")
    print(f"  metrics: {model / 'metrics.json'}, figures: {model / 'confusion_matrix.png'}, "
          f"{model / 'training_curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
