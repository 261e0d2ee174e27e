"""A trial knows why it ended and keeps its best weights through a resume; a diverging run stops
at once and is never chosen.

`boneage.progress.Progress` is checked on a small Keras model (early stopping, completion, NaN or
inf in a batch or in validation) and on the real Xception (a learning rate that diverges). A real
search of two trials (the CLI, Ray Tune, Optuna) then shows it end to end: a trial whose best
epoch came before its last checkpoint stores that epoch's weights with the checkpoint, and a run
resumed from it returns exactly them; a trial that diverges after a good epoch is marked
diverged, reported with val_mae inf, and not chosen."""
import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import tiny_overrides

keras = pytest.importorskip("keras")


# --- Progress on a small model: why a run ended -------------------------------------------------

class BatchCount(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1


def small_fit(x, y, val, epochs, learning_rate, patience=0):
    """Fit a one-layer model as `boneage.train.train` wires Progress: after EarlyStopping."""
    from boneage.progress import Progress

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(learning_rate), "mae", metrics=[keras.metrics.MeanAbsoluteError(name="mae")])
    progress, count, callbacks = Progress(), BatchCount(), []
    progress.final_epoch = epochs
    if patience:
        progress.early_stopping = keras.callbacks.EarlyStopping("val_mae", patience=patience)
        callbacks.append(progress.early_stopping)
    model.fit(x, y, validation_data=val, epochs=epochs, batch_size=4, shuffle=False, verbose=0,
              callbacks=callbacks + [progress, count])
    return progress, count.batches


def small_data(n=16):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 2)).astype("float32")
    return x, (x @ np.array([2.0, -1.0]) + 3.0).astype("float32")


def test_progress_says_why_a_run_ended():
    x, y = small_data()
    done, _ = small_fit(x, y, (x, y), epochs=3, learning_rate=0.01)
    assert (done.ended, done.epoch, done.diverged) == ("completed", 3, False)
    # a learning rate of 0: the validation MAE never improves, patience 1 stops it after epoch 2
    stopped, _ = small_fit(x, y, (x, y), epochs=5, learning_rate=0.0, patience=1)
    assert (stopped.ended, stopped.epoch, len(stopped.history["loss"])) == ("early_stopping", 2, 2)


def test_progress_stops_at_the_first_batch_that_is_not_finite():
    x, y = small_data()
    y[9] = np.inf  # in the third batch of four
    diverged, batches = small_fit(x, y, (x[:8], y[:8]), epochs=3, learning_rate=0.01)
    assert diverged.diverged and diverged.ended == "diverged"
    assert batches == 3 and diverged.epoch == 1  # not one batch more
    # nothing before it was better than this epoch: no best to keep from a diverged epoch
    assert diverged.best_weights is None and diverged.best_epoch == 0
    val_y = y[:8].copy()
    y[9], val_y[0] = 1.0, np.nan  # a validation MAE that is NaN stops it too, after that epoch
    diverged, batches = small_fit(x, y, (x[:8], val_y), epochs=3, learning_rate=0.01)
    assert (diverged.ended, diverged.epoch, batches) == ("diverged", 1, 4)


def resumed_small_fit(tmp_path, best_epoch, best_file=False):
    """Save a small model as a checkpoint of epoch 2 whose recorded best MAE (0) no later epoch
    can beat, resume it for two epochs that change the weights, and end as `train` does."""
    from boneage.progress import BEST_WEIGHTS, Progress
    from boneage.train import Resume

    x, y = small_data()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(0.1), "mae", metrics=[keras.metrics.MeanAbsoluteError(name="mae")])
    model.fit(x, y, epochs=2, verbose=0)  # a checkpoint holds a trained optimizer
    model.save(tmp_path / "model.keras")
    stored = None
    if best_file:  # the best epoch's weights, as Progress.save_best writes them beside the checkpoint
        writer = Progress()
        writer.best_weights = stored = [w + 1.0 for w in model.get_weights()]
        writer.best_epoch, writer.epoch = 1, 2
        assert writer.save_best(tmp_path) == BEST_WEIGHTS
    resume = Resume(str(tmp_path / "model.keras"), 2, 0.0, best_epoch,
                    best_weights_path=str(tmp_path / BEST_WEIGHTS) if best_file else None)
    checkpoint = keras.models.load_model(resume.model_path)
    progress = Progress(resume)
    progress.final_epoch = 4
    progress.restore(checkpoint)
    checkpoint.fit(x, y, validation_data=(x, y), epochs=4, initial_epoch=2, verbose=0, callbacks=[progress])
    if progress.best_weights is not None:
        checkpoint.set_weights(progress.best_weights)
    return progress, checkpoint, model.get_weights() if stored is None else stored


@pytest.mark.parametrize("best_file", [False, True], ids=["best-is-the-checkpoint", "best-before-the-checkpoint"])
def test_a_resumed_run_ends_with_its_best_weights(tmp_path, best_file):
    progress, model, expected = resumed_small_fit(tmp_path, best_epoch=1 if best_file else 2, best_file=best_file)
    assert progress.best_val_mae == 0.0 and progress.best_epoch == (1 if best_file else 2)
    assert len(progress.history["loss"]) == 2 and progress.ended == "completed"
    for kept, stored in zip(model.get_weights(), expected, strict=True):
        np.testing.assert_array_equal(kept, stored)


def test_a_checkpoint_without_its_best_weights_forgets_that_epoch(tmp_path, capsys):
    progress, model, _ = resumed_small_fit(tmp_path, best_epoch=1)  # as checkpoints were before
    assert "no weights of its best epoch (1" in capsys.readouterr().out
    assert progress.best_epoch == 4 and progress.best_val_mae > 0  # what it returns is what it reports
    np.testing.assert_array_equal(model.get_weights()[0], progress.best_weights[0])


def test_a_diverging_xception_run_stops_at_once(phantom_root):
    from boneage.config import load_config
    from boneage.splits import load_splits
    from boneage.train import train

    # Adam at 10 on the squared z-score: the validation loss overflows in the first epoch
    cfg = load_config(None, tiny_overrides(phantom_root) + ["train.epochs=3", "train.learning_rate=10",
                                                            "train.loss=mse"])
    metrics, _ = train(cfg, load_splits(cfg.data, report=lambda m: None))
    assert metrics["diverged"] and metrics["ended"] == "diverged"
    assert metrics["epochs_run"] == 1 and metrics["best_epoch"] == 0
    assert not math.isfinite(metrics["history"]["val_loss"][0])


def test_best_config_never_chooses_a_diverged_trial():
    from tuning.config import load_search_config
    from tuning.outcome import best_config

    cfg = load_search_config(None, ["train.epochs=4", "tune.space={learning_rate: {loguniform: [1.0e-4, 10]}}"])
    trials = pd.DataFrame([  # the diverged trial had the best epoch of all before it diverged
        {"trial_id": "a", "status": "diverged", "best_val_mae": 10.0, "best_epoch": 1, "epochs": 2,
         "param.learning_rate": 5.0},
        {"trial_id": "b", "status": "completed", "best_val_mae": 20.0, "best_epoch": 4, "epochs": 4,
         "param.learning_rate": 1e-3},
        {"trial_id": "c", "status": "error", "best_val_mae": math.nan, "best_epoch": 0, "epochs": 0,
         "param.learning_rate": 1e-2}])
    tuned, best = best_config(cfg, trials)
    assert best["trial_id"] == "b" and tuned.train.learning_rate == 1e-3 and tuned.train.epochs == 4
    from boneage.errors import InputError

    with pytest.raises(InputError, match="without diverging"):
        best_config(cfg, trials[trials["trial_id"] != "b"])


def _trials(*rows):
    """A trials table as collect_trials writes it: (id, status, ended, best MAE, best epoch, epochs)."""
    return pd.DataFrame([{"trial_id": t, "status": status, "ended": ended, "best_val_mae": mae, "best_epoch": best,
                          "epochs": epochs, "param.learning_rate": 10.0 ** -(i + 2)}
                         for i, (t, status, ended, mae, best, epochs) in enumerate(rows)])


CUT_BY_TIME = "stopped after epoch 2: the search's time budget (420 s) was spent"


def test_the_retrain_never_takes_its_epochs_from_a_trial_cut_short():
    """Issue 15 item 7: a trial cut by ASHA or a budget has not shown how many epochs it needs."""
    from tuning.config import load_search_config
    from tuning.outcome import best_config, retrain_epochs

    cfg = load_search_config(None, ["train.epochs=8", "tune.space={learning_rate: {loguniform: [1.0e-6, 1]}}"])
    # the demo's second run: every trial cut by the time budget, the best at epoch 2 -> train.epochs
    cut = _trials(("a", "stopped_early", CUT_BY_TIME, 26.7, 2, 2), ("b", "stopped_early", CUT_BY_TIME, 30.0, 2, 2),
                  ("c", "stopped_early", "stopped by ASHA at the epoch-1 rung", 35.0, 1, 1))
    tuned, best = best_config(cfg, cut)
    assert best["trial_id"] == "a" and tuned.train.epochs == 8
    assert retrain_epochs(cfg, cut, best)[1].startswith("train.epochs (8): no trial ran its course")
    # the best was cut; two ran their course (all epochs; its own early stopping): the better one's best epoch
    mixed = pd.concat([cut, _trials(("d", "completed", "ran all 8 epochs", 28.0, 6, 8),
                                    ("e", "stopped_early", "early stopping after epoch 5: validation MAE not "
                                     "better for 2 epochs", 27.0, 3, 5),
                                    ("f", "diverged", "diverged at epoch 2", 5.0, 1, 2))], ignore_index=True)
    tuned, best = best_config(cfg, mixed)
    epochs, rule = retrain_epochs(cfg, mixed[mixed["status"] != "diverged"], best)
    assert best["trial_id"] == "a" and tuned.train.epochs == epochs == 3 and "(e)" in rule and "cut short" in rule
    # the cut trial's own best epoch is a lower bound: it has shown that that many help
    later = mixed.assign(best_epoch=np.where(mixed["trial_id"] == "a", 4, mixed["best_epoch"]),
                         epochs=np.where(mixed["trial_id"] == "a", 4, mixed["epochs"]))
    assert best_config(cfg, later)[0].train.epochs == 4
    # the best trial ran its course: its own best epoch, whatever the others did
    done = mixed.assign(best_val_mae=np.where(mixed["trial_id"] == "d", 20.0, mixed["best_val_mae"]))
    tuned, best = best_config(cfg, done)
    assert best["trial_id"] == "d" and tuned.train.epochs == 6
    assert "ran its course" in retrain_epochs(cfg, done, best)[1]


# --- a real search: best weights in the trial checkpoint, a diverged trial ----------------------

KEEPS_BEST = {"learning_rate": 3.0, "loss": "mae"}  # epoch 2 wrecks what the head learned in epoch 1
DIVERGES = {"learning_rate": 10.0, "loss": "mse"}  # epoch 2's validation loss overflows


@pytest.fixture(scope="module")
def two_trial_search(tmp_path_factory, phantom_root):
    """Two trials of two epochs, the first the head alone at a sane rate: both have a good epoch 1."""
    tmp_path = tmp_path_factory.mktemp("two-trials")
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"source": "rsna", "root": str(phantom_root), "val_fraction": 0.25, "test_fraction": 0.2},
        "model": {"image_size": 71, "weights": "none"},
        "train": {"epochs": 2, "batch_size": 16, "early_stopping_patience": 0, "head_epochs": 1,
                  "head_learning_rate": 1.0e-3},
        "tune": {"storage_path": str(tmp_path / "experiments"), "num_samples": 2, "max_concurrent_trials": 2,
                 "n_startup_trials": 1, "grace_period": 2, "resources": {"cpu": 1, "gpu": 0}, "retrain": False,
                 "space": {"learning_rate": {"loguniform": [1.0e-4, 10.0]}, "loss": {"choice": ["mae", "mse"]}},
                 "points_to_evaluate": [KEEPS_BEST, DIVERGES]}}))
    proc = subprocess.run([sys.executable, "-m", "tuning.search", "--config", str(config), "--name", "two"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    experiment = tmp_path / "experiments" / "two"
    trials = pd.read_csv(experiment / "trials.csv")
    by_rate = {rate: trials[trials["param.learning_rate"] == rate].iloc[0] for rate in (3.0, 10.0)}
    return experiment, by_rate


def results_of(experiment, trial_id) -> list[dict]:
    path = next(p for p in experiment.glob("run_trial_*/result.json") if json.loads(
        p.read_text().splitlines()[0])["trial_id"] == trial_id)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_checkpoint(experiment, trial_id):
    folder = next(p.parent for p in experiment.glob("run_trial_*/result.json") if json.loads(
        p.read_text().splitlines()[0])["trial_id"] == trial_id)
    return sorted(folder.glob("checkpoint_*"))[-1]


@pytest.mark.slow
def test_a_diverging_trial_is_stopped_marked_and_never_chosen(two_trial_search):
    import optuna

    experiment, trial = two_trial_search
    bad, good = trial[10.0], trial[3.0]
    reports = results_of(experiment, bad["trial_id"])
    assert [r["epoch"] for r in reports] == [1, 2]
    assert [r["diverged"] for r in reports] == [False, True] and [r["ended"] for r in reports] == ["", "diverged"]
    assert math.isfinite(reports[0]["val_mae"]) and reports[1]["val_mae"] == math.inf  # ASHA ranks it last
    assert bad["status"] == "diverged" and bad["ended"].startswith("diverged at epoch 2")
    # its good first epoch is in the table, but the diverged weights never became its checkpoint
    assert bad["best_val_mae"] == pytest.approx(reports[0]["val_mae"], abs=1e-3)
    assert json.loads((last_checkpoint(experiment, bad["trial_id"]) / "state.json").read_text())["epoch"] == 1
    assert good["status"] == "completed" and good["ended"] == "ran all 2 epochs"
    assert [r["ended"] for r in results_of(experiment, good["trial_id"])] == ["", "completed"]
    chosen = yaml.safe_load((experiment / "best_config.yaml").read_text())["train"]
    assert (chosen["learning_rate"], chosen["loss"], chosen["epochs"]) == (3.0, "mae", 1)
    study = optuna.load_study(study_name="two", storage=f"sqlite:///{experiment / 'optuna.db'}")
    values = {t.params["learning_rate"]: t.value for t in study.trials}
    assert values[10.0] == math.inf and math.isfinite(values[3.0])


@pytest.mark.slow
def test_the_trial_checkpoint_keeps_the_best_weights_and_a_resume_returns_them(two_trial_search):
    from boneage.config import load_config
    from boneage.pipeline import make_dataset
    from boneage.splits import load_splits
    from boneage.progress import BEST_WEIGHTS, load_weights_file
    from boneage.train import train
    from tuning.trainable import resume_from

    experiment, trial = two_trial_search
    good = trial[3.0]
    reports = results_of(experiment, good["trial_id"])
    assert [r["best_epoch"] for r in reports] == [1, 1] and reports[1]["val_mae"] > 100 * reports[0]["val_mae"]
    folder = last_checkpoint(experiment, good["trial_id"])
    state = json.loads((folder / "state.json").read_text())
    assert (state["epoch"], state["best_epoch"], state["best_weights"]) == (2, 1, BEST_WEIGHTS)

    # the stored weights are epoch 1's: they give the validation MAE reported for epoch 1
    root = yaml.safe_load((experiment / "search_config.yaml").read_text())["data"]["root"]
    cfg = load_config(None, tiny_overrides(root) + ["data.val_fraction=0.25", "train.head_epochs=1",
                                                    "train.learning_rate=3.0", "train.epochs=3"])
    splits = load_splits(cfg.data, report=lambda m: None)
    assert splits.val["id"].astype(str).tolist() == pd.read_csv(experiment / "split_val.csv")["id"].astype(str).tolist()
    stored = load_weights_file(folder / BEST_WEIGHTS)
    model = keras.models.load_model(folder / "model.keras")
    model.set_weights(stored)
    val = make_dataset(splits.val, training=False, image_size=71, batch_size=16, include_sex=True, cache="none")
    assert model.evaluate(val, verbose=0, return_dict=True)["mae"] == pytest.approx(reports[0]["val_mae"], rel=1e-4)

    # resumed for one more epoch at the wrecking rate: it returns exactly the stored weights
    metrics, resumed = train(cfg, splits, resume=resume_from(folder))
    assert metrics["resumed_from"] == 2 and metrics["epochs_run"] == 3 and metrics["best_epoch"] == 1
    assert metrics["best_val_mae"] == pytest.approx(reports[0]["val_mae"])
    for kept, expected in zip(resumed.get_weights(), stored, strict=True):
        np.testing.assert_array_equal(kept, expected)
