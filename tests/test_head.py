"""The classifier head and the arithmetic around it: labels, the stratified split, streaming feature statistics,
class weights, metrics, and the Keras head itself (normalisation inside, stable layer names)."""

from __future__ import annotations

import numpy as np
import pytest

from cnnbatch.head import (
    EXCLUDED,
    TRAIN,
    VALIDATION,
    EvaluationAccumulator,
    HeadSpec,
    LabelCodes,
    RunningMoments,
    build_head,
    class_weights,
    confusion_matrix,
    encode_labels,
    is_unlabelled,
    key_hashes,
    make_optimizer,
    per_class_scores,
    stratified_split,
    validation_quota,
)

# --- labels, split, statistics (moved here from the train tests) -----------------------------------------

def test_label_encoding_sorts_classes_and_excludes_unknown() -> None:
    names, classes = encode_labels(["fox", None, "cat", "", "fox", "  ", "dog"])
    assert names == ("cat", "dog", "fox")
    assert classes.tolist() == [2, -1, 0, -1, 2, -1, 1]


def test_label_codes_are_stable_across_batches() -> None:
    codes = LabelCodes()
    first = codes.encode(["b", "a", None], np.array([0, 1, 2, -1]))
    second = codes.encode(["c", "a"], np.array([1, 0]))
    labels, remap = codes.finish()
    assert labels == ("a", "b", "c")
    assert remap[first[first >= 0]].tolist() == [1, 0]
    assert remap[second].tolist() == [0, 2]
    assert first[-2:].tolist() == [-1, -1]


def test_split_is_stratified_exact_and_order_free() -> None:
    sizes = {0: 50, 1: 30, 2: 5, 3: 1}
    classes = np.concatenate([np.full(n, c, np.int32) for c, n in sizes.items()] + [np.full(4, -1, np.int32)])
    keys = [f"k{i}" for i in range(len(classes))]
    split = stratified_split(classes, key_hashes(keys, seed=3), 0.2)
    for cls, n in sizes.items():
        assert (split[classes == cls] == VALIDATION).sum() == validation_quota(n, 0.2)
    assert [validation_quota(n, 0.2) for n in sizes.values()] == [10, 6, 1, 0]
    assert (split[classes == -1] == EXCLUDED).all() and (split[classes >= 0] != EXCLUDED).all()
    # The same rows in another order get the same split; another seed gives another split.
    order = np.random.default_rng(0).permutation(len(classes))
    shuffled = stratified_split(classes[order], key_hashes([keys[i] for i in order], seed=3), 0.2)
    assert (shuffled == split[order]).all()
    assert (stratified_split(classes, key_hashes(keys, seed=4), 0.2) != split).any()


def test_running_moments_match_numpy_over_uneven_batches() -> None:
    rng = np.random.default_rng(1)
    x = (rng.normal(1000, 3, (257, 6))).astype(np.float32)
    x[:, 5] = 0.0  # a dead channel
    moments = RunningMoments(6)
    for chunk in np.array_split(x, [1, 2, 100, 101, 200]):
        moments.update(chunk)
    assert moments.count == 257
    np.testing.assert_allclose(moments.mean, x.astype(np.float64).mean(0), rtol=1e-9)
    np.testing.assert_allclose(moments.variance[:5], x[:, :5].astype(np.float64).var(0), rtol=1e-6)
    assert moments.variance[5] == 1.0


def test_balanced_class_weights() -> None:
    assert class_weights(np.array([10, 30]), "none") is None
    assert class_weights(np.array([10, 30]), "balanced") == {0: 2.0, 1: 40 / 60}


# --- the head ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, hidden", [("mlp", 16), ("linear", None)])
def test_head_construction(kind: str, hidden: int | None) -> None:
    mean, variance = np.arange(8, dtype=np.float32), np.full(8, 4.0, np.float32)
    head = build_head(HeadSpec(kind, hidden_units=16), 8, 3, mean, variance, seed=0)
    names = [layer.name for layer in head.layers]
    assert names[:2] == ["embedding", "normalize"] and names[-1] == "probabilities"
    assert ("hidden" in names) == (kind == "mlp") and ("dropout" in names) == (kind == "mlp")
    dense = [layer for layer in head.layers if layer.name in ("hidden", "probabilities")]
    assert [layer.units for layer in dense] == ([hidden, 3] if hidden else [3])
    probabilities = np.asarray(head(np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)))
    assert probabilities.shape == (5, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_normalisation_is_inside_the_head() -> None:
    import keras

    mean, variance = np.linspace(-5, 5, 4).astype(np.float32), np.array([1, 4, 9, 0.25], np.float32)
    head = build_head(HeadSpec("linear"), 4, 2, mean, variance, seed=0)
    normalize = keras.Model(head.input, head.get_layer("normalize").output)
    x = np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(normalize(x)), (x - mean) / np.sqrt(variance), rtol=1e-5, atol=1e-5)




# --- more of the same module -------------------------------------------------------------------------------------

def test_blank_and_null_labels_mean_unknown() -> None:
    assert is_unlabelled(None) and is_unlabelled("") and is_unlabelled(" \t")
    assert not is_unlabelled("0") and not is_unlabelled("cat")


def test_key_hashes_depend_on_key_and_seed_only() -> None:
    first = key_hashes(["a", "b", "c"], seed=1)
    assert first.dtype == np.uint64 and len(set(first.tolist())) == 3
    assert key_hashes(["c", "a"], seed=1).tolist() == [first[2], first[0]]
    assert (key_hashes(["a", "b", "c"], seed=2) != first).all()


def test_split_without_labelled_rows_excludes_everything() -> None:
    split = stratified_split(np.full(4, -1, np.int32), key_hashes(list("abcd"), seed=0), 0.5)
    assert (split == EXCLUDED).all()
    classes = np.array([0, 0, 1], np.int32)
    assert (stratified_split(classes, key_hashes(list("abc"), 0), 0.0) == TRAIN).all()


def test_running_moments_of_nothing_are_zero_mean_unit_variance() -> None:
    moments = RunningMoments(3)
    moments.update(np.zeros((0, 3), np.float32))
    assert moments.count == 0 and moments.mean.tolist() == [0, 0, 0] and moments.variance.tolist() == [1, 1, 1]


def test_class_weights_refuse_unknown_modes_and_give_absent_classes_zero() -> None:
    with pytest.raises(ValueError, match="--class-weight must be balanced or none, got 'log'"):
        class_weights(np.array([1, 2]), "log")
    assert class_weights(np.array([4, 0, 4]), "balanced") == {0: 1.0, 1: 0.0, 2: 1.0}


def test_confusion_matrix_and_per_class_scores() -> None:
    matrix = confusion_matrix(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 1]), 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 2, 0], [0, 1, 0]]
    scores = per_class_scores(matrix, ("a", "b", "c"))
    assert scores["a"] == {"precision": 1.0, "recall": 0.5, "support": 2}
    assert scores["b"] == {"precision": 0.5, "recall": 1.0, "support": 2}
    assert scores["c"] == {"precision": 0.0, "recall": 0.0, "support": 1}  # never predicted: 0, as zero_division=0


def test_evaluation_accumulates_over_batches() -> None:
    accumulator = EvaluationAccumulator(2)
    accumulator.update(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 0]))
    accumulator.update(np.zeros((0, 2)), np.zeros(0, np.int64))
    accumulator.update(np.array([[0.0, 1.0]]), np.array([1]))
    summary = accumulator.summary(("x", "y"))
    assert summary["rows"] == 3 and summary["accuracy"] == pytest.approx(2 / 3, abs=1e-6)
    assert summary["loss"] == pytest.approx((-np.log(0.9) - np.log(0.2) - np.log(1.0)) / 3, abs=1e-6)
    assert summary["confusion_matrix"] == [[1, 1], [0, 1]]


def test_head_spec_and_optimizers_refuse_unknown_names() -> None:
    with pytest.raises(ValueError, match="--head must be one of mlp, linear, got 'transformer'"):
        HeadSpec("transformer")
    with pytest.raises(ValueError, match="--optimizer must be one of rmsprop, adam, sgd, got 'lbfgs'"):
        make_optimizer("lbfgs", 0.1)
    sgd = make_optimizer("sgd", 0.01)
    assert type(sgd).__name__ == "SGD" and sgd.nesterov and float(sgd.momentum) == pytest.approx(0.9)
    assert type(make_optimizer("adam", 0.01)).__name__ == "Adam"


def test_a_head_needs_two_classes() -> None:
    with pytest.raises(ValueError, match="at least 2 classes, got 1"):
        build_head(HeadSpec("linear"), 4, 1, np.zeros(4), np.ones(4))


def test_seeded_heads_start_from_the_same_weights() -> None:
    first = build_head(HeadSpec("mlp", hidden_units=8), 4, 2, np.zeros(4), np.ones(4), seed=3)
    second = build_head(HeadSpec("mlp", hidden_units=8), 4, 2, np.zeros(4), np.ones(4), seed=3)
    for a, b in zip(first.get_weights(), second.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [layer.name for layer in first.layers] == ["embedding", "normalize", "hidden", "dropout", "probabilities"]
