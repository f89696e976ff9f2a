"""finetunefit: the guarded normalisation, which layers train, the epoch bookkeeping (the starting model is the
best until an epoch beats it, a non-finite loss stops the fit), and checkpoints that only their own run resumes.
No Ray; small seeded models."""

from __future__ import annotations

import numpy as np
import pytest

from cnnbatch.backbones import get_backbone
from cnnbatch.finetunefit import (
    VARIANCE_FLOOR_ABSOLUTE,
    Checkpoints,
    EpochState,
    FitError,
    check_finite,
    floored_variance,
    guard_normalization,
    replica_values,
    set_trainable,
)
from cnnbatch.head import HeadSpec, build_head
from cnnbatch.tfruntime import keras_module


def test_floored_variance_raises_only_the_near_constant_channels() -> None:
    variance = np.array([4.0, 1.0, 2.0, 1e-12, 0.0, 1e-3])  # median ~0.5: the floor is 5e-5
    floored = floored_variance(variance)
    floor = max(VARIANCE_FLOOR_ABSOLUTE, 1e-4 * np.median(variance))
    assert np.array_equal(floored[:3], variance[:3]) and floored[5] == pytest.approx(1e-3)
    assert floored[3] == floored[4] == pytest.approx(floor) and floored.dtype == np.float32


def test_guard_normalization_keeps_the_weights_and_floors_the_statistics() -> None:
    variance = np.array([1.0, 2.0, 1e-14, 3.0], np.float32)
    head = build_head(HeadSpec("mlp", 8, 0.0, 0.0), 4, 3, np.zeros(4), variance, seed=1)
    guarded, raised = guard_normalization(head)
    assert raised == 1
    config = guarded.get_layer("normalize").get_config()
    assert np.asarray(config["variance"]).reshape(-1)[2] >= VARIANCE_FLOOR_ABSOLUTE
    for old, new in zip(head.get_weights(), guarded.get_weights(), strict=True):
        assert np.array_equal(old, new)
    x = np.array([[0.5, 0.5, 1e-3, 0.5]], np.float32)
    # the tiny channel no longer dominates: the unguarded head sees 1e-3 / 1e-7 = 1e4 there
    assert np.isfinite(np.asarray(guarded(x))).all()


@pytest.mark.parametrize("name, size, layer, expected_first", [
    ("vgg16", 32, None, "block5_conv1"),
    ("vgg16", 32, "block4_conv1", "block4_conv1"),
    ("inceptionv3", 75, None, None),  # mixed9: the layer after mixed8, index 249 (the recipe's 249 frozen)
])
def test_set_trainable_freezes_below_the_start_and_every_batchnorm(name: str, size: int, layer: str | None,
                                                                   expected_first: str | None) -> None:
    keras = keras_module()
    spec = get_backbone(name)
    backbone = spec.build(size, weights=None)
    first, trained = set_trainable(backbone, spec, layer)
    names = [item.name for item in backbone.layers]
    start = names.index(first)
    if expected_first:
        assert first == expected_first
    else:
        assert start == 249 and names[248] == "mixed8"
    for index, item in enumerate(backbone.layers):
        if isinstance(item, keras.layers.BatchNormalization) or index < start:
            assert not item.trainable, item.name
        elif item.weights:
            assert item.trainable, item.name
    assert trained == sum(1 for item in backbone.layers if item.trainable and item.weights) > 0


def test_an_unknown_layer_is_refused_listing_the_valid_ones() -> None:
    spec = get_backbone("vgg16")
    backbone = spec.build(32, weights=None)
    with pytest.raises(ValueError, match=r"--trainable-from must name a layer of vgg16: one of block1_conv1, .*"
                                         r"block5_conv3; got 'block9'"):
        set_trainable(backbone, spec, "block9")
    inception = get_backbone("inceptionv3")
    with pytest.raises(ValueError, match="one of mixed1, mixed2, .* mixed10; got 'conv2d_x'"):
        inception.trainable_start(["input", "mixed0", "mixed1"], "conv2d_x")
    names = ["input", "a", "mixed0", "b", "mixed1", "c", "mixed2"]
    assert inception.trainable_start(names, "mixed2") == 5  # the block after mixed1
    assert inception.trainable_start(names, "b") == 3  # a plain layer name: that layer


class _Model:
    """Enough of a Keras model for Checkpoints: weights saved and loaded as a file."""

    def __init__(self, value: float):
        self.value = value

    def save_weights(self, path: str) -> None:
        with open(path, "w") as handle:
            handle.write(str(self.value))

    def load_weights(self, path: str) -> None:
        with open(path) as handle:
            self.value = float(handle.read())


def test_checkpoints_resume_only_their_own_run(tmp_path) -> None:
    checkpoints = Checkpoints(str(tmp_path / "out"), "run-a")
    assert checkpoints.state() is None
    checkpoints.save(_Model(1.5), {"epoch": 1}, best=True)
    checkpoints.save(_Model(2.5), {"epoch": 2}, best=False)
    state = checkpoints.state()
    assert state is not None and state["epoch"] == 2 and state["run_id"] == "run-a" and state["pid"] > 0
    model = _Model(0.0)
    checkpoints.load(model, "last.weights.h5")
    assert model.value == 2.5
    checkpoints.load(model, "best.weights.h5")
    assert model.value == 1.5
    assert Checkpoints(str(tmp_path / "out"), "run-b").state() is None  # another configuration starts over
    (tmp_path / "out" / ".checkpoints" / "state.json").write_text('{"epoch": 3, "run_')
    assert checkpoints.state() is None  # a torn state starts over
    checkpoints.remove()
    assert not (tmp_path / "out" / ".checkpoints").exists()


def test_the_starting_model_stays_best_until_an_epoch_beats_it(tmp_path) -> None:
    checkpoints = Checkpoints(str(tmp_path / "out"), "run")
    losses = iter([0.9, 0.8, 0.85, 0.7])
    state = EpochState(checkpoints, start_loss=0.75, patience=5, history={}, extra={"start": {"loss": 0.75}},
                       validate=lambda: {"loss": next(losses), "accuracy": 0.5})
    for epoch in (1, 2, 3):
        state.end_epoch(_Model(epoch), epoch, {"loss": 1.0})
        assert state.best_epoch == 0 and state.bad_epochs == epoch
    state.end_epoch(_Model(4), 4, {"loss": 1.0})
    assert state.best_epoch == 4 and state.best_loss == 0.7 and state.bad_epochs == 0
    assert state.history["val_loss"] == [0.9, 0.8, 0.85, 0.7]
    saved = checkpoints.state()
    assert saved is not None and saved["best_epoch"] == 4 and saved["start"] == {"loss": 0.75}
    model = _Model(0)
    checkpoints.load(model, "best.weights.h5")
    assert model.value == 4


def test_a_non_finite_loss_stops_without_a_checkpoint(tmp_path) -> None:
    checkpoints = Checkpoints(str(tmp_path / "out"), "run")
    state = EpochState(checkpoints, start_loss=1.0, patience=2, history={},
                       validate=lambda: {"loss": float("nan"), "accuracy": 0.0})
    state.end_epoch(_Model(1), 1, {"loss": float("nan")})
    assert state.non_finite == "the loss became non-finite in epoch 1" and checkpoints.state() is None


def test_non_finite_weights_are_refused() -> None:
    keras = keras_module()
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    check_finite(model, lambda: "unused")
    kernel, bias = model.get_weights()
    kernel[0, 0] = np.nan
    model.set_weights([kernel, bias])
    with pytest.raises(FitError, match="not finite here"):
        check_finite(model, lambda: "not finite here")
    assert len(replica_values(model.weights[0])) == 1  # no strategy: one replica
