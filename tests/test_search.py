"""The tuning system end to end: a real Ray Tune search with OptunaSearch and ASHA on a tiny
phantom set (one search, shared by the tests that inspect it, run from prepared images whose
PNGs are then gone or garbage), then an interrupted search resumed without re-running its
finished trials. Each search runs as the real CLI would."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import needs_sample

pytestmark = pytest.mark.slow
GOOD_RATES = [1.0e-3, 5.0e-4, 2.0e-3]
BAD_RATE = 3.0  # Adam at this rate throws the output layer around: it cannot learn


def search_config(tmp_path, phantom_root, points, **tune):
    cfg = {
        "data": {"source": "rsna", "root": str(phantom_root), "val_fraction": 0.25, "test_fraction": 0.2},
        "model": {"image_size": 71, "weights": "none"},
        "train": {"epochs": 2, "batch_size": 16, "early_stopping_patience": 0},
        "tune": {"storage_path": str(tmp_path / "experiments"), "num_samples": len(points),
                 "max_concurrent_trials": 2, "n_startup_trials": 1, "grace_period": 1,
                 "reduction_factor": 2, "resources": {"cpu": 1, "gpu": 0},
                 "space": {"learning_rate": {"loguniform": [1.0e-4, 3.0]}},
                 "points_to_evaluate": [{"learning_rate": lr} for lr in points], **tune},
    }
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_search(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "tuning.search", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def prepare_then_spoil(root, config) -> dict:
    """`python -m boneage prepare`, then half the training PNGs moved away and half overwritten
    with garbage of the same size and time (only a decode would notice): what follows must run
    from the prepared images alone. Returns the cache's manifest."""
    proc = subprocess.run([sys.executable, "-m", "boneage", "prepare", "--config", str(config)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ready in" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    manifest = _manifest_of(root)
    away = root.parent / "moved-away"
    away.mkdir()
    for i, png in enumerate(sorted((root / "boneage-training-dataset").glob("*.png"))):
        if i % 2:
            png.rename(away / png.name)
        else:
            stat = png.stat()
            png.write_bytes(os.urandom(stat.st_size))
            os.utime(png, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return manifest


def _manifest_of(root) -> dict:
    """The manifest of the (only) prepared cache of root's images, in this session's cache home."""
    folder = Path(os.environ["XDG_CACHE_HOME"]) / "boneage" / "prepared"
    manifests = [json.loads(p.read_text()) for p in folder.glob("*.json")]
    (manifest,) = [m for m in manifests if m["images"][0][0].startswith(f"{root}{os.sep}")]
    return manifest


@pytest.fixture(scope="session")
def finished_search(tmp_path_factory, phantom_root):
    import shutil

    tmp_path = tmp_path_factory.mktemp("search")
    root = Path(shutil.copytree(phantom_root, tmp_path / "data"))
    config = search_config(tmp_path, root, GOOD_RATES + [BAD_RATE])
    manifest = prepare_then_spoil(root, config)
    proc = run_search("--config", str(config), "--name", "tiny")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "preparing" not in proc.stdout  # neither the driver nor a trial decoded anything
    assert _manifest_of(root)["data_file"] == manifest["data_file"]  # the very cache prepared above
    return tmp_path / "experiments" / "tiny", proc.stdout


def test_search_writes_every_output(finished_search):
    experiment, stdout = finished_search
    for name in ["trials.csv", "best_config.yaml", "test_metrics.json", "report.md", "optuna.db",
                 "search_config.yaml", "summary.json", "model/model.keras", "model/saved_model",
                 "model/model_card.json", "split_test.csv"]:
        assert (experiment / name).exists(), name
    assert "validation MAE" in stdout and "GPU-hours" in stdout and "Test" in stdout
    metrics = json.loads((experiment / "test_metrics.json").read_text())
    assert metrics["n"] == len(pd.read_csv(experiment / "split_test.csv"))
    assert set(metrics["by_sex"]) == {"male", "female"} and len(metrics["by_age_band"]) == 5


def test_trials_csv_and_optuna_study_agree(finished_search):
    import optuna

    from tuning.report import read_trials_csv

    experiment, _ = finished_search
    trials = read_trials_csv(experiment / "trials.csv")
    assert len(trials) == 4
    rates = sorted(trials["param.learning_rate"])
    assert rates == pytest.approx(sorted(GOOD_RATES + [BAD_RATE]))  # the warm-start points ran
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{experiment / 'optuna.db'}")
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 4
    # ASHA-stopped trials reach the study with their last result, so TPE learns from them too
    assert all(t.value is not None for t in finished)
    assert sorted(t.params["learning_rate"] for t in finished) == pytest.approx(rates)


def test_best_config_is_the_lowest_reported_mae(finished_search):
    from tuning.report import read_trials_csv

    experiment, _ = finished_search
    trials = read_trials_csv(experiment / "trials.csv")
    best = trials.loc[trials["best_val_mae"].idxmin()]
    assert best["best_val_mae"] == pytest.approx(min(min(c) for c in trials["val_mae_per_epoch"]), abs=1e-3)
    chosen = yaml.safe_load((experiment / "best_config.yaml").read_text())
    assert chosen["train"]["learning_rate"] == pytest.approx(best["param.learning_rate"])
    assert 1 <= chosen["train"]["epochs"] <= 2 and chosen["train"]["schedule"] == "cosine"


def test_asha_stops_the_trial_that_cannot_learn(finished_search):
    from tuning.report import read_trials_csv

    experiment, _ = finished_search
    trials = read_trials_csv(experiment / "trials.csv")
    bad = trials[trials["param.learning_rate"] > 1.0].iloc[0]
    assert bad["status"] == "stopped_early" and bad["epochs"] == 1
    assert bad["best_val_mae"] == trials["best_val_mae"].max()
    assert (trials["status"] == "completed").any()


@needs_sample
def test_exported_model_predicts_on_a_real_radiograph(finished_search, sample_root):
    experiment, _ = finished_search
    image = sorted((sample_root / "boneage-training-dataset").glob("*.png"))[0]
    proc = subprocess.run([sys.executable, "-m", "boneage", "predict", str(experiment / "model"),
                           str(image), "--sex", "F", "--format", "json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    months = json.loads(proc.stdout)[0]["months"]
    assert math.isfinite(months)


def test_retrain_only_redoes_the_last_step(finished_search):
    experiment, _ = finished_search
    before = (experiment / "test_metrics.json").stat().st_mtime_ns
    trials_before = pd.read_csv(experiment / "trials.csv")
    proc = run_search("--retrain-only", str(experiment))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (experiment / "test_metrics.json").stat().st_mtime_ns > before
    pd.testing.assert_frame_equal(pd.read_csv(experiment / "trials.csv"), trials_before)
    assert run_search("--retrain-only", str(experiment / "nope")).returncode == 2


def _finished_trial_results(experiment: Path, epochs: int) -> dict:
    done = {}
    for result in experiment.glob("run_trial_*/result.json"):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if lines and lines[-1].get("epoch") == epochs:
            done[result] = result.stat().st_mtime_ns
    return done


def test_resume_finishes_without_rerunning_finished_trials(tmp_path, phantom_root):
    config = search_config(tmp_path, phantom_root, [1.0e-3, 5.0e-4, 2.0e-3], max_concurrent_trials=1,
                           grace_period=2)
    experiment = tmp_path / "experiments" / "interrupted"
    proc = subprocess.Popen([sys.executable, "-m", "tuning.search", "--config", str(config), "--name", "interrupted"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not _finished_trial_results(experiment, 2):
        time.sleep(2)
    assert proc.poll() is None, "the search ended before it could be interrupted"
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "--resume" in out, out[-3000:]
    before = _finished_trial_results(experiment, 2)
    assert 1 <= len(before) < 3
    assert not (experiment / "trials.csv").exists()

    resumed = run_search("--config", str(config), "--name", "interrupted", "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = _finished_trial_results(experiment, 2)
    for path, mtime in before.items():
        assert after[path] == mtime, f"{path} was run again"
    trials = pd.read_csv(experiment / "trials.csv")
    assert len(trials) == 3 and (experiment / "model" / "model.keras").exists()
    import optuna

    study = optuna.load_study(study_name="interrupted", storage=f"sqlite:///{experiment / 'optuna.db'}")
    states = [t.state for t in study.trials]
    # the trial cut off by Ctrl-C was marked failed on resume; its resumed result was added anew
    assert states.count(optuna.trial.TrialState.FAIL) == 1
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3
