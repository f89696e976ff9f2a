"""What every fit shares: the restored epoch, the rounded history, the callbacks, and the evaluation of a model
over a stream of batches (a numpy stand-in for the model here)."""

from __future__ import annotations

import numpy as np
import pytest

from cnnbatch.fitting import best_epoch, compiled_predict, evaluate_batches, fit_callbacks, rounded_history


def test_best_epoch_is_the_lowest_validation_loss_one_based() -> None:
    assert best_epoch({"loss": [3, 2, 1, 0.5], "val_loss": [1.0, 0.4, 0.6, 0.45]}) == 2
    assert best_epoch({"loss": [3, 2, 1], "val_loss": [0.5, 0.5, 0.7]}) == 1  # a tie: the first
    assert best_epoch({"loss": [3, 2, 1]}) == 3  # no validation: the last epoch
    assert best_epoch({}) == 0


def test_rounded_history_is_plain_floats() -> None:
    rounded = rounded_history({"loss": [np.float32(0.123456789), 1], "val_loss": []})
    assert rounded == {"loss": [0.123457, 1.0], "val_loss": []}
    assert all(type(v) is float for v in rounded["loss"])


def one_hot_model(x: np.ndarray) -> np.ndarray:
    """'Predicts' the class written in the first column, with probability 0.8 (0.1 for each other class)."""
    probabilities = np.full((len(x), 3), 0.1, np.float32)
    probabilities[np.arange(len(x)), x[:, 0].astype(int)] = 0.8
    return probabilities


def test_evaluation_over_batches_gives_loss_accuracy_scores_and_the_confusion_matrix() -> None:
    predicted = np.array([0, 1, 2, 2, 0, 1])
    truth = np.array([0, 1, 2, 1, 1, 1])
    x = predicted[:, None].astype(np.float32)
    batches = [(x[:4], truth[:4]), (x[4:4], truth[4:4]), (x[4:], truth[4:])]  # an empty batch in between
    result = evaluate_batches(one_hot_model, batches, ("a", "b", "c"))
    assert result["rows"] == 6 and result["accuracy"] == pytest.approx(4 / 6, abs=1e-6)
    # right answers cost -log 0.8, wrong ones -log 0.1
    assert result["loss"] == pytest.approx((4 * -np.log(0.8) + 2 * -np.log(0.1)) / 6, abs=1e-5)
    assert result["confusion_matrix"] == [[1, 0, 0], [1, 2, 1], [0, 0, 1]]
    assert result["per_class"]["b"] == {"precision": 1.0, "recall": 0.5, "support": 4}
    assert result["per_class"]["c"] == {"precision": 0.5, "recall": 1.0, "support": 1}


def test_evaluation_of_nothing_says_so() -> None:
    assert evaluate_batches(one_hot_model, [], ("a", "b")) == {"rows": 0, "loss": None, "accuracy": None}


def test_callbacks_stop_early_restore_the_best_and_lower_the_rate() -> None:
    stop, plateau = fit_callbacks(patience=8, epochs=100, learning_rate=1e-3)
    assert type(stop).__name__ == "EarlyStopping" and stop.monitor == "val_loss"
    assert stop.patience == 8 and stop.restore_best_weights
    assert type(plateau).__name__ == "ReduceLROnPlateau" and plateau.patience == 3
    assert plateau.factor == pytest.approx(0.3) and plateau.min_lr == pytest.approx(1e-6)
    stop, plateau = fit_callbacks(patience=0, epochs=5, learning_rate=1e-2)  # 0: wait the whole fit
    assert stop.patience == 5 and plateau.patience == 1


def test_compiled_predict_runs_the_model_in_inference_mode_for_any_batch_size() -> None:
    import keras

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dropout(0.99, seed=0)(inputs))  # inference mode: dropout off
    predict = compiled_predict(model, (4,))
    for rows in (1, 7):
        x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
        np.testing.assert_array_equal(np.asarray(predict(x)), x)
