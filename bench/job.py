"""One cnnbatch extraction, run as its own program, printing its JobSummary and per-shard stats as one JSON line.

The same ``run_extract`` the CLI calls; the bench needs the summary as data rather than the CLI's report line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cnnbatch.extract import ExtractConfig, run_extract
from cnnbatch.logs import setup_logging


def shard_stats(output: str) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((Path(output) / "_stats").glob("*.json"))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=ExtractConfig.shard_size)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    setup_logging("WARNING")
    config = ExtractConfig(input=args.input, output=args.output, backbone="vgg16", weights="random",
                           image_size=args.image_size, batch_size=args.batch_size, shard_size=args.shard_size,
                           workers=1, gpus_per_worker=0, precision=args.precision, overwrite=True)
    summary = run_extract(config)
    body = {name: getattr(summary, name) for name in ("images", "rows", "errors", "seconds", "stage_seconds",
                                                       "failed", "shards_done")}
    body["steady_images_per_second"] = summary.steady_images_per_second
    body["shards"] = shard_stats(args.output)
    recorded = json.loads((Path(args.output) / "_cnnbatch.json").read_text())
    body["precision"] = recorded["config"]["precision"]  # what "auto" resolved to
    print(json.dumps(body, default=str))
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
