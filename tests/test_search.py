"""The tuning system end to end: a real Ray Tune search with OptunaSearch and ASHA on a tiny
phantom set (one search, shared by the tests that inspect it, run from prepared images whose
PNGs are then gone or garbage). Each search runs as the real CLI would. An interrupted search
resumed without re-running its finished trials is in tests/test_postgres.py (on a new head),
`--retrain-only` in tests/test_multinode.py (from s3:// storage alone)."""
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.browser import assert_rendered_page, dump_dom, images_loaded, screenshot, table_column
from tests.conftest import HEAD_ONLY, needs_sample
from tests.test_study_truth import assert_study_agrees

pytestmark = pytest.mark.slow
GOOD_RATES = [1.0e-3, 5.0e-4, 2.0e-3]
BAD_RATE = 3.0  # Adam at this rate throws the output layer around: it cannot learn


def search_config(tmp_path, phantom_root, points, *, epochs=2, frozen_layers=0, **tune):
    cfg = {
        "data": {"source": "rsna", "root": str(phantom_root), "val_fraction": 0.25, "test_fraction": 0.2},
        "model": {"image_size": 71, "weights": "none", "frozen_layers": frozen_layers},
        "train": {"epochs": epochs, "batch_size": 16, "early_stopping_patience": 0},
        "intervals": {"coverage": 0.8},  # the ~8 held-out calibration images allow 80%, not 90%
        "tune": {"storage_path": str(tmp_path / "experiments"), "num_samples": len(points),
                 "max_concurrent_trials": 2, "n_startup_trials": 1, "grace_period": 1,
                 "reduction_factor": 2, "resources": {"cpu": 1, "gpu": 0},
                 "space": {"learning_rate": {"loguniform": [1.0e-4, 3.0]}},
                 "points_to_evaluate": [{"learning_rate": lr} for lr in points],
                 # the retrain's ensemble, TTA variants and Grad-CAM gallery cost minutes of CPU:
                 # only the shared search (finished_search) asks for them, and its tests inspect them
                 "ensemble_top_k": 1, "gallery_size": 0, **tune},
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
    config = search_config(tmp_path, root, GOOD_RATES + [BAD_RATE], export_ensemble=True, ensemble_top_k=3,
                           gallery_size=4, mlflow=True, frozen_layers=HEAD_ONLY)
    manifest = prepare_then_spoil(root, config)
    proc = run_search("--config", str(config), "--name", "tiny")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "preparing" not in proc.stdout  # neither the driver nor a trial decoded anything
    assert _manifest_of(root)["data_file"] == manifest["data_file"]  # the very cache prepared above
    return tmp_path / "experiments" / "tiny", proc.stdout


def test_search_writes_every_output(finished_search):
    experiment, stdout = finished_search
    for name in ["trials.csv", "best_config.yaml", "test_metrics.json", "report.md", "report.html", "optuna.db",
                 "search_config.yaml", "summary.json", "model/model.keras", "model/saved_model",
                 "model/model_card.json", "model/intervals.json", "mlflow.db", "split_test.csv"]:
        assert (experiment / name).exists(), name
    assert "validation MAE" in stdout and "GPU-hours" in stdout and "Test" in stdout
    metrics = json.loads((experiment / "test_metrics.json").read_text())
    assert metrics["n"] == len(pd.read_csv(experiment / "split_test.csv"))
    assert set(metrics["by_sex"]) == {"male", "female"} and len(metrics["by_age_band"]) == 5


def test_trials_csv_and_optuna_study_agree(finished_search):
    import optuna

    from tuning.trials_csv import read_trials_csv

    experiment, _ = finished_search
    trials = read_trials_csv(experiment / "trials.csv")
    assert len(trials) == 4
    rates = sorted(trials["param.learning_rate"])
    assert rates == pytest.approx(sorted(GOOD_RATES + [BAD_RATE]))  # the warm-start points ran
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{experiment / 'optuna.db'}")
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 4
    # ASHA-stopped trials reach the study as PRUNED with their epochs, so TPE learns from them too
    assert all(t.value is not None for t in finished)
    assert sorted(t.params["learning_rate"] for t in finished) == pytest.approx(rates)
    assert_study_agrees(experiment, "tiny")  # each trial's state as trials.csv's "why it ended" says
    # all four were warm-start points, and the summary says TPE never got to suggest
    story = json.loads((experiment / "summary.json").read_text())["search_story"]
    assert story["suggested_by"] == {"points_to_evaluate": 4, "TPE start-up (random)": 0, "TPE's model": 0}, story
    assert "TPE never suggested a trial from its model" in (experiment / "report.md").read_text()


def test_best_config_is_the_lowest_reported_mae(finished_search):
    from tuning.trials_csv import read_trials_csv

    experiment, _ = finished_search
    trials = read_trials_csv(experiment / "trials.csv")
    best = trials.loc[trials["best_val_mae"].idxmin()]
    assert best["best_val_mae"] == pytest.approx(min(min(c) for c in trials["val_mae_per_epoch"]), abs=1e-3)
    chosen = yaml.safe_load((experiment / "best_config.yaml").read_text())
    assert chosen["train"]["learning_rate"] == pytest.approx(best["param.learning_rate"])
    assert 1 <= chosen["train"]["epochs"] <= 2 and chosen["train"]["schedule"] == "cosine"


def test_asha_stops_the_trial_that_cannot_learn(finished_search):
    from tuning.trials_csv import read_trials_csv

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


def test_html_report_in_a_browser(finished_search, tmp_path):
    from tuning.trials_csv import read_trials_csv

    experiment, _ = finished_search
    report = experiment / "report.html"
    dom = dump_dom(report.as_uri() + "#sort=-best_val_mae")
    for section in ["summary", "final-model", "predictions", "variants", "gallery", "search", "trials", "config"]:
        assert f'id="{section}"' in dom, section
    # 4 search plots, predictions, intervals, variants and the 4 Grad-CAM overlays, all decoded;
    # parameter importance weighs trials that ran their course (COMPLETE), so it needs two of them
    completed = int((read_trials_csv(experiment / "trials.csv")["status"] == "completed").sum())
    plots = 11 if completed >= 2 else 10
    assert images_loaded(dom) == (plots, plots)
    assert dom.count("<figure>") == 4 and ("not available" not in dom) == (completed >= 2)
    maes = [float(v) for v in table_column(dom, "trials-table", "best_val_mae")]
    assert len(maes) == 4 and maes == sorted(maes, reverse=True)
    ended = table_column(dom, "trials-table", "ended")
    assert ended[0] == "stopped by ASHA at the epoch-1 rung"  # the rate that cannot learn
    assert ended.count("ran all 2 epochs") >= 1
    for variant in ["single", "single + TTA", "ensemble of 3", "ensemble of 3 + TTA"]:
        assert f"<td>{variant}</td>" in dom
    assert f"--config {experiment / 'search_config.yaml'}" in dom
    png = tmp_path / "report.png"
    screenshot(report.as_uri(), png, 1280, 900)
    assert_rendered_page(png, 1280, 900)


def test_variants_intervals_and_gallery(finished_search):
    experiment, _ = finished_search
    summary = json.loads((experiment / "summary.json").read_text())
    test = pd.read_csv(experiment / "split_test.csv")
    variants = {v["name"]: v for v in summary["variants"]}
    assert list(variants) == ["single", "single + TTA", "ensemble of 3", "ensemble of 3 + TTA"]
    assert all(v["n"] == len(test) and v["nominal"] == 0.8 and 0 <= v["coverage"] <= 1 for v in variants.values())
    assert summary["exported"] == "ensemble of 3" and len(summary["members"]) == 2
    assert summary["best"]["trial_id"] not in summary["members"]
    table = pd.read_csv(experiment / "final" / "test_intervals.csv")
    assert len(table) == len(test) and (table["lower"] <= table["predicted"] + 0.01).all()
    assert (table["predicted"] <= table["upper"] + 0.01).all()
    inside = ((table["boneage"] >= table["lower"]) & (table["boneage"] <= table["upper"])).mean()
    assert inside == pytest.approx(summary["test_intervals"]["coverage"], abs=0.01)
    assert summary["calibration_images"] == summary["intervals"]["counts"][0] >= 4
    errors = [g["error"] for g in summary["gallery"]]
    assert len(errors) == 4 and errors == sorted(errors, reverse=True)
    assert errors[0] == pytest.approx((table["predicted"] - table["boneage"]).abs().max(), abs=0.01)


def test_exported_ensemble_serves_intervals_and_explains(finished_search, phantom_root, tmp_path):
    import tensorflow as tf

    from boneage import data

    experiment, _ = finished_search
    export = experiment / "model"
    card = json.loads((export / "model_card.json").read_text())
    intervals = json.loads((export / "intervals.json").read_text())
    assert card["intervals"] == intervals and card["model"] == "ensemble of 3"
    image_dir = data.find_image_dir(phantom_root, "training")
    test = pd.read_csv(experiment / "split_test.csv", dtype={"id": str})
    paths = [str(image_dir / f"{i}.png") for i in test["id"][:3]]
    served = tf.saved_model.load(str(export / "saved_model")).signatures["serving_default"](
        png=tf.constant([open(p, "rb").read() for p in paths]), male=tf.constant([1.0, 0.0, 1.0]))
    months, half = served["months"].numpy(), intervals["half_widths"][0]
    np.testing.assert_allclose(served["lower"].numpy(), np.clip(months - half, 0, 240), atol=1e-3)
    np.testing.assert_allclose(served["upper"].numpy(), np.clip(months + half, 0, 240), atol=1e-3)
    overlay = tmp_path / "explained.png"
    proc = subprocess.run([sys.executable, "-m", "boneage", "predict", str(export), paths[0], "--sex", "M",
                           "--explain", str(overlay)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"\d+\.\d years \(80% interval \d+\.\d-\d+\.\d\)", proc.stdout), proc.stdout
    assert overlay.read_bytes().startswith(b"\x89PNG") and overlay.stat().st_size > 5000


def test_tensorboard_and_mlflow_see_every_trial(finished_search):
    import mlflow

    experiment, _ = finished_search
    trial_dirs = sorted(experiment.glob("run_trial_*"))
    assert len(trial_dirs) == 4 and all(list(d.glob("events.out.tfevents.*")) for d in trial_dirs)
    mlflow.set_tracking_uri(f"sqlite:///{experiment / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["tiny"])
    assert len(runs) == 4
    assert sorted(runs["params.learning_rate"].astype(float)) == pytest.approx(sorted(GOOD_RATES + [BAD_RATE]))
    assert runs["metrics.val_mae"].notna().all()


def test_optuna_dashboard_serves_the_study(finished_search):
    import shutil
    import urllib.request

    experiment, _ = finished_search
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([shutil.which("optuna-dashboard"), f"sqlite:///{experiment / 'optuna.db'}",
                               "--host", "127.0.0.1", "--port", str(port), "--quiet"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, page = time.time() + 60, None
        while time.time() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/dashboard/", timeout=5) as response:
                    page = response.read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert page and "<html" in page.lower(), server.stderr.read().decode()[-2000:] if server.poll() else page
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=10) as response:
            studies = json.loads(response.read())["study_summaries"]
        assert [s["study_name"] for s in studies] == ["tiny"]
    finally:
        server.terminate()
        server.wait(timeout=30)
