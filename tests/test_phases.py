"""Two-phase fine-tuning: the head alone first, then the unfrozen model; and the retrain of a
trial whose best epoch fell in its head-only phase repeats that phase, not the full recipe."""
import keras
import numpy as np
import pandas as pd
import pytest

from tests.conftest import tiny_overrides


def test_plan_phases_cuts_the_head_phase_short_rather_than_skipping_it():
    from boneage.config import TrainConfig
    from boneage.train import Phase, plan_phases

    t = TrainConfig(epochs=5, head_epochs=2, learning_rate=1e-4, head_learning_rate=1e-3)
    assert plan_phases(t, 3) == [Phase(0, 2, 14, 1e-3), Phase(2, 5, 3, 1e-4)]
    t.epochs = 1  # a retrain of a trial whose best epoch was its first: the head alone
    assert plan_phases(t, 3) == [Phase(0, 1, 14, 1e-3)]
    t.epochs, t.head_epochs = 3, 0
    assert plan_phases(t, 0) == [Phase(0, 3, 0, 1e-4)]


def test_best_epoch_in_the_head_phase_retrains_the_head_phase():
    from boneage.train import plan_phases
    from tuning.config import load_search_config
    from tuning.outcome import best_config

    cfg = load_search_config(None, ["train.head_epochs=2", "train.epochs=6", "model.frozen_layers=0",
                                    "tune.space={learning_rate: {loguniform: [1.0e-4, 1.0e-2]}}"])
    trials = pd.DataFrame([
        {"trial_id": "a", "best_val_mae": 20.0, "best_epoch": 2, "epochs": 6, "param.learning_rate": 1e-3},
        {"trial_id": "b", "best_val_mae": 25.0, "best_epoch": 5, "epochs": 6, "param.learning_rate": 1e-4}])
    tuned, best = best_config(cfg, trials)
    assert best["trial_id"] == "a" and tuned.train.epochs == 2
    assert [(p.first, p.last, p.frozen_layers) for p in plan_phases(tuned.train, tuned.model.frozen_layers)] == [(0, 2, 14)]


class _BackboneWatch(keras.callbacks.Callback):
    """The first backbone kernel at the start and after every epoch."""

    def __init__(self):
        super().__init__()
        self.snapshots = []

    def _kernel(self):
        return np.array(self.model.get_layer("xception").get_layer("block1_conv1").kernel)

    def on_train_begin(self, logs=None):
        if not self.snapshots:
            self.snapshots.append(self._kernel())

    def on_epoch_end(self, epoch, logs=None):
        self.snapshots.append(self._kernel())


@pytest.mark.slow
def test_head_epochs_train_the_head_alone_then_the_backbone(phantom_root):
    from boneage.config import load_config
    from boneage.splits import load_splits
    from boneage.train import train

    cfg = load_config(None, tiny_overrides(phantom_root) + ["train.epochs=2", "train.head_epochs=1"])
    watch = _BackboneWatch()
    metrics, model = train(cfg, load_splits(cfg.data, report=lambda m: None), callbacks=[watch])
    start, after_head, after_main = watch.snapshots
    np.testing.assert_array_equal(start, after_head)  # epoch 1: only the head moved
    assert not np.array_equal(after_head, after_main)  # epoch 2: the backbone trains
    assert [p["frozen_layers"] for p in metrics["phases"]] == [14, 0] and metrics["epochs_run"] == 2
    assert model.get_layer("xception").get_layer("block1_conv1").trainable
