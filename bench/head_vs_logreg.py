"""Held-out accuracy of ``cnnbatch train``'s default head against a standardised logistic regression.

For each feature set a stratified 20% test split is put aside (by key hash, never seen by either model). The head
is trained by the real train stage with its defaults on the remaining 80% (which it splits again for early
stopping); the baseline is scikit-learn's default ``LogisticRegression`` (multinomial, L2, C=1, L-BFGS, standardised
inputs) re-implemented in NumPy and fitted on all of the same 80%. Both are scored on the test split.

    .venv/bin/python bench/head_vs_logreg.py                      # synthetic sets + the demo sample's features
    .venv/bin/python bench/head_vs_logreg.py --features URI ...   # any feature set written by cnnbatch extract

Results go to bench/results/head_vs_logreg.json (and a table on stdout).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.dataset as ds

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cnnbatch.head import TRAIN, VALIDATION, encode_labels, key_hashes, stratified_split  # noqa: E402
from cnnbatch.extract import embeddings_table, feature_schema
from cnnbatch.output import SUCCESS_FILE
from cnnbatch.parquetio import table_to_parquet_bytes  # noqa: E402

log = logging.getLogger("bench")
TEST_FRACTION = 0.2
TEST_SEED = 20240601  # the test split's own seed: independent of the head's validation split


# --- the baseline: multinomial logistic regression, L2 (C=1), L-BFGS, as scikit-learn's default ------------------

def _loss_and_gradient(params: np.ndarray, x: np.ndarray, onehot: np.ndarray, c: float) -> tuple[float, np.ndarray]:
    n_features, n_classes = x.shape[1], onehot.shape[1]
    weights = params[:n_features * n_classes].reshape(n_features, n_classes)
    bias = params[n_features * n_classes:]
    logits = x @ weights + bias
    logits -= logits.max(axis=1, keepdims=True)
    log_probabilities = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    n = len(x)  # scikit-learn's scaling: mean loss + ||W||^2 / (2 C n); the same minimiser as the summed form
    loss = -(onehot * log_probabilities).sum() / n + 0.5 / (c * n) * (weights**2).sum()
    residual = (np.exp(log_probabilities) - onehot) / n
    gradient = np.concatenate([(x.T @ residual + weights / (c * n)).ravel(), residual.sum(axis=0)])
    return float(loss), gradient


def lbfgs(fn: Callable[[np.ndarray], tuple[float, np.ndarray]], start: np.ndarray, iterations: int = 2000,
          memory: int = 10, tolerance: float = 1e-6) -> np.ndarray:
    """Limited-memory BFGS with a backtracking (Armijo) line search."""
    x = start.copy()
    f, g = fn(x)
    s_list: list[np.ndarray] = []
    y_list: list[np.ndarray] = []
    for _ in range(iterations):
        if np.abs(g).max() <= tolerance:
            break
        q = g.copy()
        alphas = []
        for s, y in reversed(list(zip(s_list, y_list))):
            alpha = s @ q / (y @ s)
            alphas.append(alpha)
            q -= alpha * y
        if s_list:
            q *= (s_list[-1] @ y_list[-1]) / (y_list[-1] @ y_list[-1])
        for (s, y), alpha in zip(zip(s_list, y_list), reversed(alphas)):
            q += (alpha - (y @ q) / (y @ s)) * s
        direction = -q
        slope = g @ direction
        if slope >= 0:  # not a descent direction: restart from steepest descent
            s_list.clear()
            y_list.clear()
            direction, slope = -g, -(g @ g)
        step = 1.0
        while True:
            candidate = x + step * direction
            f_new, g_new = fn(candidate)
            if f_new <= f + 1e-4 * step * slope or step < 1e-12:
                break
            step *= 0.5
        s, y = candidate - x, g_new - g
        if s @ y > 1e-10:
            s_list.append(s)
            y_list.append(y)
            if len(s_list) > memory:
                s_list.pop(0)
                y_list.pop(0)
        converged = abs(f - f_new) <= 1e-12 * max(1.0, abs(f))
        x, f, g = candidate, f_new, g_new
        if converged:
            break
    return x


def logistic_regression_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                                 n_classes: int, c: float = 1.0) -> float:
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[std < 1e-6] = 1.0  # as StandardScaler: constant features are only centred
    z_train, z_test = (x_train - mean) / std, (x_test - mean) / std
    onehot = np.eye(n_classes)[y_train]
    params = lbfgs(lambda p: _loss_and_gradient(p, z_train.astype(np.float64), onehot, c),
                   np.zeros(x_train.shape[1] * n_classes + n_classes))
    weights = params[:x_train.shape[1] * n_classes].reshape(x_train.shape[1], n_classes)
    predicted = (z_test @ weights + params[x_train.shape[1] * n_classes:]).argmax(axis=1)
    return float((predicted == y_test).mean())


# --- feature sets ---------------------------------------------------------------------------------------------

def gaussian_blobs(rng: np.random.Generator, classes: int = 10, per_class: int = 300, dim: int = 512):
    """Linear classes (shared covariance): the case logistic regression is made for."""
    centres = rng.normal(0, 0.12, (classes, dim))
    mixing = rng.normal(0, 1 / np.sqrt(dim), (dim, dim))
    x = np.concatenate([centres[c] + rng.normal(0, 1, (per_class, dim)) @ mixing for c in range(classes)])
    return x, np.repeat(np.arange(classes), per_class)


def relu_clusters(rng: np.random.Generator, classes: int = 10, per_class: int = 300, dim: int = 512,
                  modes: int = 4, latent: int = 32, sizes: np.ndarray | None = None, noise: float = 1.0):
    """Each class a union of ``modes`` clusters in a latent space, seen through a random ReLU layer (non-negative,
    sparse, correlated: shaped like globally pooled CNN features). The classes are not linearly separable."""
    projection = rng.normal(0, 1 / np.sqrt(latent), (latent, dim))
    bias = rng.normal(-0.5, 0.3, dim)
    centres = rng.normal(0, 1.0, (classes, modes, latent))
    counts = sizes if sizes is not None else np.full(classes, per_class)
    xs, ys = [], []
    for c, n in enumerate(counts):
        mode = rng.integers(0, modes, n)
        z = centres[c, mode] + rng.normal(0, noise, (n, latent))
        xs.append(np.maximum(z @ projection + bias, 0) * rng.uniform(0.5, 2.0, (n, 1)))
        ys.append(np.full(n, c))
    return np.concatenate(xs), np.concatenate(ys)


def synthetic_sets(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    imbalanced = np.maximum(30, (600 * 0.7 ** np.arange(10)).astype(int))
    return {
        "gaussian-blobs (linear)": gaussian_blobs(rng),
        "relu-clusters (non-linear)": relu_clusters(rng),
        "relu-clusters imbalanced": relu_clusters(rng, sizes=imbalanced),
    }


def sample_features(root: Path, per_class: int) -> Path:
    """The demo's pipeline on its generated sample: random VGG16 at 64 px (offline, near chance by design)."""
    from cnnbatch.extract import ExtractConfig, run_extract
    from cnnbatch.sample import write_sample

    sample = write_sample(root / "sample", per_class=per_class, size=96)
    output = root / "sample-features"
    summary = run_extract(ExtractConfig(input=str(sample / "train"), output=str(output), weights="random",
                                        image_size=64, shard_size=200, workers=1, precision="float32"))
    if not summary.ok:
        raise SystemExit(f"extraction failed: {summary.line()}")
    return output


def read_features(uri: str) -> tuple[np.ndarray, list[str | None], list[str], dict]:
    dataset = ds.dataset(uri, format="parquet")
    table = dataset.to_table()
    dim = table.schema.field("embedding").type.list_size
    x = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    from cnnbatch.parquetio import read_metadata

    return x, table.column("label").to_pylist(), table.column("key").to_pylist(), read_metadata(dataset.schema)


def write_pool(root: Path, x: np.ndarray, labels: list[str], keys: list[str], metadata: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    schema = feature_schema(x.shape[1], metadata)
    for part, rows in enumerate(np.array_split(np.arange(len(keys)), 4)):
        table = embeddings_table([keys[i] for i in rows], [labels[i] for i in rows], x[rows], schema)
        (root / f"part-{part:06d}.parquet").write_bytes(table_to_parquet_bytes(table))
    (root / SUCCESS_FILE).write_text("{}")
    return root


def synthetic_metadata(dim: int) -> dict:
    return {"kind": "features", "backbone": "vgg16", "dim": dim,
            "weights": {"kind": "random", "uri": None, "sha256": None, "seed": 0}, "image_size": 224,
            "preprocessing": "synthetic", "decode": "synthetic", "precision": "float32"}


# --- the comparison -------------------------------------------------------------------------------------------

def compare(name: str, x: np.ndarray, labels: list[str | None], keys: list[str], metadata: dict, work: Path,
            heads: list[str]) -> dict:
    from cnnbatch.modelio import load_model_folder
    from cnnbatch.train import TrainConfig, execute_plan, plan_training

    names, classes = encode_labels(labels)
    keep = classes >= 0
    x, classes, keys = x[keep], classes[keep], [k for k, m in zip(keys, keep) if m]
    split = stratified_split(classes, key_hashes(keys, TEST_SEED), TEST_FRACTION)
    pool, test = split == TRAIN, split == VALIDATION
    slug = "".join(ch if ch.isalnum() else "-" for ch in name)
    features = write_pool(work / slug / "features", x[pool], [names[c] for c in classes[pool]],
                          [k for k, m in zip(keys, pool) if m], metadata)
    row = {"set": name, "rows": int(len(classes)), "classes": len(names), "dim": int(x.shape[1]),
           "test_rows": int(test.sum())}
    started = time.perf_counter()
    row["logreg"] = logistic_regression_accuracy(x[pool], classes[pool], x[test], classes[test], len(names))
    row["logreg_seconds"] = round(time.perf_counter() - started, 1)
    # The same regression on exactly the rows the head trains on (the head holds out its validation split).
    defaults = TrainConfig(features=("-",), output="-")
    pool_keys = [k for k, m in zip(keys, pool) if m]
    inner = stratified_split(classes[pool], key_hashes(pool_keys, defaults.seed), defaults.validation_split) == TRAIN
    row["logreg_head_rows"] = logistic_regression_accuracy(x[pool][inner], classes[pool][inner], x[test],
                                                           classes[test], len(names))
    for head in heads:
        output = work / slug / f"model-{head}"
        started = time.perf_counter()
        summary = execute_plan(plan_training(TrainConfig(features=(str(features),), output=str(output), head=head)))
        info, model = load_model_folder(str(output))
        probabilities = np.asarray(model.predict(x[test].astype(np.float32), batch_size=1024, verbose=0))
        index = {label: i for i, label in enumerate(info.labels)}
        true = np.array([index[names[c]] for c in classes[test]])
        row[head] = float((probabilities.argmax(axis=1) == true).mean())
        row[f"{head}_epochs"] = f"{summary.best_epoch}/{summary.epochs_run}"
        row[f"{head}_seconds"] = round(time.perf_counter() - started, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", nargs="*", default=[], help="feature datasets to compare on (any fsspec URL)")
    parser.add_argument("--no-synthetic", action="store_true", help="skip the synthetic feature sets")
    parser.add_argument("--no-sample", action="store_true", help="skip extracting the demo sample")
    parser.add_argument("--heads", nargs="+", default=["mlp", "linear"], choices=["mlp", "linear"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the synthetic sets")
    parser.add_argument("--sample-per-class", type=int, default=300, help="demo sample images per class")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "head_vs_logreg.json"))
    args = parser.parse_args(argv)
    from cnnbatch.logs import setup_logging

    setup_logging("WARNING")
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # one predict per model retraces by design here; the warning is noise
    rows = []
    with tempfile.TemporaryDirectory(prefix="cnnbatch-bench-") as tmp:
        work = Path(tmp)
        sets: list[tuple[str, Callable[[], tuple]]] = []
        for seed in [] if args.no_synthetic else args.seeds:
            for name, (x, y) in synthetic_sets(seed).items():
                keys = [f"{name}/{i:06d}" for i in range(len(y))]
                sets.append((f"{name} seed {seed}", lambda x=x, y=y, keys=keys: (
                    x.astype(np.float32), [f"class{c:02d}" for c in y], keys, synthetic_metadata(x.shape[1]))))
        uris = list(args.features)
        if not args.no_sample:
            uris.append(str(sample_features(work, args.sample_per_class)))
        for uri in uris:
            sets.append((uri if uri in args.features else "demo sample, random VGG16 64px",
                         lambda uri=uri: read_features(uri)))
        for name, load in sets:
            x, labels, keys, metadata = load()
            row = compare(name, x, labels, keys, metadata, work, args.heads)
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(rows, indent=1))
    print(f"\n| feature set | rows | classes | dim | test rows | logreg | logreg, head's rows | " +
          " | ".join(f"{h} head" for h in args.heads) + " |")
    print("| --- " * (6 + len(args.heads)) + "|")
    for row in rows:
        print(f"| {row['set']} | {row['rows']} | {row['classes']} | {row['dim']} | {row['test_rows']} | "
              f"{row['logreg']:.4f} | {row['logreg_head_rows']:.4f} | " +
              " | ".join(f"{row[h]:.4f} ({row[h + '_epochs']})" for h in args.heads) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
