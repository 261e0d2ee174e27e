"""Reliability of the library and CLIs: genuine faults are not disguised as bad input, unsafe models
are refused, a skipped plot is warned about, the split says when it stratifies more coarsely, and
the same seed and config give the same split, trial configurations and (on CPU) metrics."""
import json
import sqlite3
import subprocess
import sys
import time
import zipfile

import numpy as np
import pandas as pd
import pytest

from boneage.errors import InputError
from tests.conftest import tiny_overrides

keras = pytest.importorskip("keras")


def tiny_keras_model(path, lambda_layer=False):
    inputs = keras.Input((4,))
    layer = keras.layers.Lambda(lambda x: x * 2.0) if lambda_layer else keras.layers.Dense(1)
    keras.Model(inputs, layer(inputs)).save(path)
    return path


def with_class_renamed(source, target, old, new):
    """A copy of a .keras archive whose config names a layer class this Keras does not have,
    as a model saved by a newer Keras would."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for name in zin.namelist():
            body = zin.read(name)
            if name == "config.json":
                body = body.replace(f'"class_name": "{old}"'.encode(), f'"class_name": "{new}"'.encode())
            zout.writestr(name, body)
    return target


# --- exit status 2 is bad input, nothing else --------------------------------------------------

def test_a_model_keras_cannot_read_shows_its_traceback_not_status_2(tmp_path, phantom_root):
    model = with_class_renamed(tiny_keras_model(tmp_path / "dense.keras"), tmp_path / "newer.keras",
                               "Dense", "DenseFromAFutureKeras")
    image = sorted((phantom_root / "boneage-training-dataset").glob("*.png"))[0]
    proc = subprocess.run([sys.executable, "-m", "boneage", "predict", str(model), str(image), "--sex", "F"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" in proc.stderr and "DenseFromAFutureKeras" in proc.stderr
    assert "error: could not load" not in proc.stderr  # not passed off as the user's input error


def test_a_lambda_layer_is_refused_by_safe_mode(tmp_path, phantom_root, capsys):
    from boneage.cli import main

    model = tiny_keras_model(tmp_path / "lambda.keras", lambda_layer=True)
    image = sorted((phantom_root / "boneage-training-dataset").glob("*.png"))[0]
    capsys.readouterr()
    assert main(["predict", str(model), str(image), "--sex", "F"]) == 2
    err = capsys.readouterr().err
    assert f"refused to load model {model}" in err and "safe mode" in err and "Lambda" in err
    assert "safe_mode=False" not in err  # no advice to switch the protection off


def test_optuna_storage_input_errors_and_real_faults(tmp_path):
    from tuning.config import load_search_config
    from tuning.study_storage import open_storage, study_url

    def storage(url=None):
        cfg = load_search_config(None, [f"tune.optuna_storage={url}"] if url else [])
        return open_storage(study_url(cfg, tmp_path))

    for url, message in [("not a url", "is not a database URL"), ("nosuchdb://host/x", "cannot use nosuchdb://"),
                         (f"sqlite:///{tmp_path}/missing/optuna.db", f"folder {tmp_path}/missing does not exist")]:
        with pytest.raises(InputError, match=message):
            storage(url)
    with pytest.raises(InputError, match="BONEAGE_OPTUNA_PASSWORD") as err:  # never a password in a config
        storage("postgresql://boneage:s3cret@db.example:5432/optuna")
    assert "s3cret" not in str(err.value) and "***" in str(err.value)
    try:
        import psycopg2  # noqa: F401
    except ImportError:  # no PostgreSQL driver here: a config this install cannot use, said clearly
        with pytest.raises(InputError, match="psycopg2"):
            storage("postgresql://boneage@db.example:5432/optuna")

    storage()  # the default: SQLite in the experiment folder, created
    db = tmp_path / "optuna.db"
    # a study database written by a newer Optuna: a version mismatch, not bad input
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'v9.0.0.a'")
        conn.execute("UPDATE version_info SET library_version = '9.0.0'")
    with pytest.raises(RuntimeError, match="set up by optuna 9.0.0") as err:
        storage()
    assert not isinstance(err.value, InputError)


def test_a_locked_study_database_is_not_bad_input(tmp_path):
    import sqlalchemy.exc

    from tuning.config import load_search_config
    from tuning.study_storage import open_storage, study_url

    cfg = load_search_config(None)
    study_storage = lambda cfg, folder: open_storage(study_url(cfg, folder))  # noqa: E731
    study_storage(cfg, tmp_path)
    holder = sqlite3.connect(tmp_path / "optuna.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process holds the database
    try:
        started = time.time()
        with pytest.raises(sqlalchemy.exc.OperationalError, match="database is locked"):
            study_storage(cfg, tmp_path)
        assert time.time() - started < 60
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_a_plot_that_fails_is_skipped_and_warned_about(tmp_path, capsys):
    from tests.test_report import make_study, make_summary, make_trials
    from tuning.report import write_report

    summary = make_summary(tmp_path)
    summary["predictions_csv"] = str(tmp_path / "missing.csv")
    capsys.readouterr()
    report = write_report(tmp_path / "exp", make_trials(), None, summary).read_text()
    err = capsys.readouterr().err
    assert "not available: FileNotFoundError" in report and "not available: no Optuna study" in report
    assert "warning: plot test_predictions.png could not be drawn" in err and "missing.csv" in err
    assert "param_importance" not in err  # nothing to draw without a study is no fault: no warning


# --- the split says when it stratifies more coarsely --------------------------------------------

def ages_and_sexes(n, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"id": [str(i) for i in range(n)], "path": [f"/x/{i}.png" for i in range(n)],
                         "boneage": rng.integers(1, 229, n).astype(float), "male": rng.random(n) < 0.5})


def test_split_reports_coarser_strata():
    from boneage.splits import split_table

    said = []
    split_table(ages_and_sexes(400), 0.15, 0.15, seed=0, report=said.append)
    assert said == []  # 5 age bins x sex fit
    split_table(ages_and_sexes(20), 0.2, 0.2, seed=0, report=said.append)
    assert said == ["split: the test split (4 of 20 images) is stratified by 2 age bins x sex: "
                    "too few images for every stratum of 5 age bins x sex",
                    "split: the validation split (4 of 16 images) is stratified by 2 age bins x sex: "
                    "too few images for every stratum of 5 age bins x sex"]
    said.clear()
    split_table(ages_and_sexes(10), 0.2, 0.2, seed=0, report=said.append)
    assert len(said) == 2 and all("stratified by sex only:" in s for s in said)
    said.clear()
    split_table(ages_and_sexes(30).assign(male=[True] * 29 + [False]), 0.2, 0.2, seed=0, report=said.append)
    assert said[0] == ("split: the test split (6 of 30 images) is stratified by 5 age bins x sex "
                       "(5 strata after merging 1 too small): too few images for every stratum of "
                       "5 age bins x sex")
    said.clear()
    split_table(ages_and_sexes(5).assign(male=[True, True, True, False, False]), 0.2, 0.2, seed=0,
                report=said.append)
    assert said[0] == ("split: the test split (1 of 5 images) is not stratified (a random split): "
                       "too few images for every stratum of 5 age bins x sex")


# --- determinism --------------------------------------------------------------------------------

def test_same_seed_same_split(phantom_root):
    from boneage.config import load_config
    from boneage.splits import load_splits

    def ids(seed):
        cfg = load_config(None, tiny_overrides(phantom_root) + [f"data.split_seed={seed}"])
        splits = load_splits(cfg.data, report=None)
        return [list(part["id"]) for part in (splits.train, splits.val, splits.test)]

    assert ids(3) == ids(3)
    assert ids(3) != ids(4)


SPACE = ["tune.space={learning_rate: {loguniform: [1.0e-5, 1.0e-2]}, frozen_layers: {int: [0, 14]}, "
         "loss: {choice: [mae, mse, huber]}}",
         "tune.points_to_evaluate=[{learning_rate: 1.0e-3, frozen_layers: 0, loss: mae}]",
         "tune.n_startup_trials=3"]


def searcher_for(tmp_path, overrides, name="study"):
    """The search's own OptunaSearch (tuning.study.make_searcher) on a fresh SQLite study."""
    from tuning.config import load_search_config
    from tuning.space import parse_space
    from tuning.study import make_searcher
    from tuning.study_storage import study_url

    cfg = load_search_config(None, overrides)
    tmp_path.mkdir(parents=True, exist_ok=True)
    return make_searcher(cfg, parse_space(cfg), study_url(cfg, tmp_path), name, "val_mae", "min")


def fake_mae(config) -> float:
    """A deterministic validation MAE for a suggested configuration."""
    return abs(np.log10(config["learning_rate"]) + 3.5) + config["frozen_layers"] / 7 + (config["loss"] != "mae")


def ran(value: float) -> dict:
    """The last result of a trial that ran its course (tuning.trainable's protocol), which the
    searcher tells the study as COMPLETE with its best value."""
    return {"val_mae": value, "epoch": 1, "best_val_mae": value, "ended": "completed", "diverged": False}


def first_trials(searcher, n=7):
    configs = []
    for i in range(n):
        config = searcher.suggest(f"trial_{i}")
        configs.append(config)
        searcher.on_trial_complete(f"trial_{i}", ran(fake_mae(config)))
    return configs


def test_same_seed_same_first_trial_configurations(tmp_path):
    a = first_trials(searcher_for(tmp_path / "a", SPACE + ["tune.seed=5"]))
    b = first_trials(searcher_for(tmp_path / "b", SPACE + ["tune.seed=5"]))
    assert a == b  # the warm-start point, 3 random startup trials, then TPE
    assert a[0] == {"learning_rate": 1.0e-3, "frozen_layers": 0, "loss": "mae"}
    other = first_trials(searcher_for(tmp_path / "c", SPACE + ["tune.seed=6"]))
    assert other[0] == a[0] and other[1:] != a[1:]


def test_concurrent_trials_get_different_suggestions(tmp_path):
    """Two trials running at once: TPE with constant_liar counts the first as a bad result while it
    runs, so the second is steered elsewhere. On a 3-value choice after 10 results, TPE without it
    (the control) gave both trials the same value in 16 of 16 seeds, with it in 2 of 16 (measured):
    on so small a space a repeat stays possible, so the test allows 2 of 6."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from tuning.search import METRIC, MODE

    loss_only = ["tune.space={loss: {choice: [mae, mse, huber]}}", "tune.n_startup_trials=5"]
    mae = {"mae": 1.0, "mse": 2.0, "huber": 3.0}

    def pair(searcher):
        for i in range(10):
            config = searcher.suggest(f"done_{i}")
            searcher.on_trial_complete(f"done_{i}", ran(mae[config["loss"]]))
        return searcher.suggest("running_1"), searcher.suggest("running_2")

    ours = control = 0
    for seed in range(6):
        first, second = pair(searcher_for(tmp_path / f"s{seed}", loss_only + [f"tune.seed={seed}"]))
        ours += first == second
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, constant_liar=False)
        no_liar = OptunaSearch(space={"loss": optuna.distributions.CategoricalDistribution(list(mae))},
                               metric=METRIC, mode=MODE, sampler=sampler)
        first, second = pair(no_liar)
        control += first == second
    assert control >= 5, "the control no longer shows the effect: rethink this test"
    assert ours <= 2, f"{ours} of 6 pairs of running trials got the same suggestion"
    # with a continuous parameter in the space they always differ
    searcher = searcher_for(tmp_path / "mixed", SPACE)
    first_trials(searcher, 6)
    assert searcher.suggest("running_1") != searcher.suggest("running_2")


def test_same_seed_same_metrics_on_cpu(phantom_root):
    """Two real trainings (2 epochs, augmentation and dropout on) with one config: the same
    per-epoch losses and MAEs and the same weights, to float tolerance."""
    from boneage.config import load_config
    from boneage.splits import load_splits
    from boneage.train import train

    cfg = load_config(None, tiny_overrides(phantom_root) + [
        "data.max_images=24", "train.epochs=2", "train.batch_size=8", "train.augment_strength=0.5",
        "model.dropout=0.3", "train.seed=3"])
    runs = [train(cfg, load_splits(cfg.data, report=None)) for _ in range(2)]
    (first, model_a), (second, model_b) = runs
    assert set(first["history"]) >= {"loss", "mae", "val_loss", "val_mae"}
    for key, values in first["history"].items():
        assert len(values) == 2 and np.allclose(values, second["history"][key], rtol=1e-5, atol=1e-4), key
    assert first["best_val_mae"] == pytest.approx(second["best_val_mae"], rel=1e-5)
    for wa, wb in zip(model_a.get_weights(), model_b.get_weights()):
        np.testing.assert_allclose(wa, wb, rtol=1e-4, atol=1e-5)
