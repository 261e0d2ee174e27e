"""tuning.report, tuning.plots and tuning.trials_csv: trials.csv round trip, report.md with its plots, the terminal summary."""
import re

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from boneage.evaluate import error_metrics
from tuning.report import format_summary, write_report
from tuning.trials_csv import read_trials_csv, write_trials_csv

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = {
    "learning_rate": FloatDistribution(1e-5, 1e-2, log=True),
    "dropout": FloatDistribution(0.0, 0.5),
    "frozen_layers": IntDistribution(0, 14),
    "loss": CategoricalDistribution(["mae", "huber"]),
}
PARAMS = [
    {"learning_rate": 1e-3, "dropout": 0.1, "frozen_layers": 0, "loss": "mae"},
    {"learning_rate": 3e-4, "dropout": 0.3, "frozen_layers": 4, "loss": "huber"},
    {"learning_rate": 5e-3, "dropout": 0.2, "frozen_layers": 10, "loss": "mae"},
    {"learning_rate": 2e-5, "dropout": 0.45, "frozen_layers": 2, "loss": "huber"},
    {"learning_rate": 8e-4, "dropout": 0.05, "frozen_layers": 7, "loss": "huber"},
]
CURVES = [
    [40.125, 22.5, 15.25, 12.0, 10.5, 9.75],
    [45.0, 30.25, 25.5],
    [38.5, 18.0, 13.5, 11.25, 11.0, 10.875],
    [60.0],
    [41.0, 20.0, 12.5, 9.5, 8.25, 7.875],
]
STATUS = ["completed", "stopped_early", "completed", "error", "completed"]


def make_study(n=len(PARAMS)):
    study = optuna.create_study(direction="minimize")
    for params, curve, status in list(zip(PARAMS, CURVES, STATUS))[:n]:
        state = TrialState.PRUNED if status == "stopped_early" else TrialState.FAIL if status == "error" \
            else TrialState.COMPLETE
        value = min(curve) if state == TrialState.COMPLETE else None
        study.add_trial(create_trial(params=params, distributions=SPACE, value=value, state=state))
    return study


def make_trials(n=len(PARAMS)):
    rows = []
    for i, (params, curve, status) in enumerate(list(zip(PARAMS, CURVES, STATUS))[:n]):
        error = status == "error"
        rows.append({
            "trial_id": f"a1b2c_{i:05d}", "status": status, "epochs": 0 if error else len(curve),
            "best_val_mae": np.nan if error else min(curve), "last_val_mae": np.nan if error else curve[-1],
            "val_mae_per_epoch": [] if error else curve, "time_s": 10.5 * (i + 1),
            "node_id": "" if error else "a1b2c3d4e5f6", "host": "" if error else "10.0.0.1",
            **{f"param.{k}": v for k, v in params.items()},
        })
    return pd.DataFrame(rows[::-1])  # unsorted on purpose


def make_summary(tmp_path, with_test=True):
    predictions = None
    metrics = None
    if with_test:
        rng = np.random.default_rng(0)
        true = rng.uniform(6, 220, 60).round(1)
        male = rng.random(60) < 0.5
        pred = (true + rng.normal(0, 8, 60)).round(2)
        predictions = tmp_path / "test_predictions.csv"
        pd.DataFrame({"id": range(60), "boneage": true, "male": male, "predicted": pred}).to_csv(predictions, index=False)
        metrics = error_metrics(true, pred, male, mean_prediction=float(true.mean()))
    return {
        "name": "demo", "storage": str(tmp_path),
        "best": {"trial_id": "a1b2c_00004", "val_mae": 7.875, "params": PARAMS[4], "epochs": 6},
        "test_metrics": metrics, "retrain_epochs": 6 if with_test else None,
        "predictions_csv": str(predictions) if predictions else None,
        "wall_time_s": 4000.0, "gpu_hours": 1.25, "num_trials": len(PARAMS),
    }


def test_trials_csv_round_trips(tmp_path):
    trials = make_trials()
    write_trials_csv(trials, tmp_path / "trials.csv")
    text = (tmp_path / "trials.csv").read_text()
    assert "40.125;22.500;15.250" in text
    back = read_trials_csv(tmp_path / "trials.csv")
    expected = trials.sort_values("trial_id").reset_index(drop=True)
    assert list(back["val_mae_per_epoch"]) == list(expected["val_mae_per_epoch"])
    pd.testing.assert_frame_equal(back, expected, check_dtype=False)
    assert list(back["trial_id"]) == sorted(trials["trial_id"])
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def _png_ok(path):
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 2000, path


def test_report_references_every_plot(tmp_path):
    exp = tmp_path / "exp"
    trials = make_trials()
    write_trials_csv(trials, exp / "trials.csv")
    path = write_report(exp, trials, make_study(), make_summary(tmp_path))
    report = path.read_text()
    assert path == exp / "report.md"
    assert report.startswith("# Hyperparameter search: demo")
    pngs = sorted(p.name for p in exp.glob("*.png"))
    assert pngs == sorted(["optimization_history.png", "param_importance.png", "parallel_coordinates.png",
                           "learning_curves.png", "test_predictions.png"])
    linked = set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report))
    assert linked == set(pngs)
    for name in pngs:
        _png_ok(exp / name)
    assert "not available" not in report
    assert "a1b2c_00004" in report and "| 7.88 |" in report and "huber" in report
    assert "| 0-2y |" in report and "| female |" in report
    assert "3 completed" not in report and "completed 3" in report and "stopped_early 1" in report
    assert "1 h 06 min" in report and "1.25" in report
    assert not list(exp.glob(".*"))


def test_report_without_study_or_test(tmp_path):
    trials = make_trials()
    path = write_report(tmp_path / "exp", trials, None, make_summary(tmp_path, with_test=False))
    report = path.read_text()
    assert "not available: no Optuna study" in report
    assert "not available: no test predictions" in report
    assert (tmp_path / "exp" / "parallel_coordinates.png").exists()  # parameter ranges from the data
    assert (tmp_path / "exp" / "optimization_history.png").exists()
    assert not (tmp_path / "exp" / "param_importance.png").exists()


def test_one_trial_still_gives_a_report(tmp_path):
    exp = tmp_path / "exp"
    (exp).mkdir()
    (exp / "param_importance.png").write_bytes(b"stale")  # from an earlier report
    trials = make_trials(1)
    path = write_report(exp, trials, make_study(1), make_summary(tmp_path))
    report = path.read_text()
    assert "Parameter importance" in report
    assert "not available: needs at least 2 finished trials, the study has 1" in report
    assert not (exp / "param_importance.png").exists()
    for png in exp.glob("*.png"):
        assert f"]({png.name})" in report
        _png_ok(png)


def test_broken_plot_is_reported_not_raised(tmp_path):
    summary = make_summary(tmp_path)
    summary["predictions_csv"] = str(tmp_path / "missing.csv")
    report = write_report(tmp_path / "exp", make_trials(), make_study(), summary).read_text()
    assert re.search(r"_not available: FileNotFoundError: .*missing\.csv", report)


def test_format_summary(tmp_path):
    summary = make_summary(tmp_path)
    text = format_summary(summary)
    metrics = summary["test_metrics"]
    assert "a1b2c_00004" in text and "7.88" in text
    assert f"{metrics['mae']:.2f}" in text
    assert f"male {metrics['by_sex']['male']:.2f}" in text
    assert "0-2y" in text and "1 h 06 min" in text and "1.25 GPU-hours" in text
    assert "learning_rate = 0.0008" in text
    no_test = format_summary(make_summary(tmp_path, with_test=False))
    assert "not evaluated" in no_test


def test_summary_and_reports_say_which_budget_cut_the_search_and_how_the_epochs_were_chosen(tmp_path):
    from tuning.html_report import write_html_report

    from tuning.config import load_search_config
    from tuning.outcome import budget_note

    cfg = load_search_config(None, ["tune.time_budget_s=420"])
    budget = budget_note(cfg, {"budget_stop": "time_budget"})  # what finish() puts in the summary
    assert "tune.time_budget_s: 420 s" in budget and budget_note(cfg, {"budget_stop": None}) is None
    rule = "train.epochs (8): no trial ran its course"
    summary = make_summary(tmp_path) | {"budget_stop": budget, "retrain_epochs_rule": rule}
    text = format_summary(summary)
    assert budget in text and rule in text
    report = write_report(tmp_path / "exp", make_trials(), None, summary).read_text()
    assert budget in report and rule in report
    page = write_html_report(tmp_path / "exp", make_trials(), None, summary, []).read_text()
    assert "420 s" in page and "no trial ran its course" in page
    plain = format_summary(make_summary(tmp_path))  # no budget met: nothing said about one
    assert "Budget" not in plain


@pytest.mark.parametrize("status", ["running", "error"])
def test_no_finished_trial(tmp_path, status):
    trials = make_trials(1).assign(status=status, best_val_mae=np.nan, last_val_mae=np.nan,
                                   val_mae_per_epoch=[[]])
    summary = make_summary(tmp_path, with_test=False) | {"best": None}
    report = write_report(tmp_path / "exp", trials, None, summary).read_text()
    assert report.count("not available") == 5
    assert "No trial reported" in format_summary(summary)


def test_history_follows_study_trial_numbers():
    from tuning.plots import _in_trial_order

    study = optuna.create_study()
    for params in PARAMS[::-1]:  # Optuna saw them in the opposite order from the trial ids
        study.add_trial(create_trial(params=params, distributions=SPACE, value=1.0))
    trials = make_trials()
    assert list(_in_trial_order(trials, study)["trial_id"]) == sorted(trials["trial_id"], reverse=True)
    assert list(_in_trial_order(trials, None)["trial_id"]) == sorted(trials["trial_id"])


def test_importance_is_drawn_with_the_evaluator_its_label_names():
    """Optuna 5's default evaluator is PED-ANOVA, not fANOVA: the bars are PED-ANOVA's values and
    the axis says so (fANOVA's differ on this study, so a mislabelled plot would fail here)."""
    from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator, get_param_importances

    from tuning.plots import _plot_importance

    study = make_study()
    fig = _plot_importance(study)
    ax = fig.axes[0]
    drawn = {label.get_text(): bar.get_width() for label, bar in zip(ax.get_yticklabels(), ax.patches)}
    params = sorted(drawn)
    ped = get_param_importances(study, evaluator=PedAnovaImportanceEvaluator(), params=params)
    fanova = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0), params=params)
    assert drawn == pytest.approx(ped)
    assert drawn != pytest.approx(fanova)
    assert "PED-ANOVA" in ax.get_xlabel() and "fANOVA" not in ax.get_xlabel()


@pytest.mark.parametrize("url, command", [
    ("postgresql+psycopg2://boneage@db.example:5432/optuna",
     'PGPASSWORD="$BONEAGE_OPTUNA_PASSWORD" optuna-dashboard postgresql+psycopg2://boneage@db.example:5432/optuna'),
    ("sqlite:////data/exp/optuna.db", "optuna-dashboard sqlite:////data/exp/optuna.db"),
    (None, "optuna-dashboard sqlite:///{exp}/optuna.db"),  # a summary written before it named its study
])
def test_report_html_shows_the_dashboard_command_of_the_study_it_used(tmp_path, url, command):
    from tuning.html_report import write_html_report

    exp = tmp_path / "exp"
    summary = make_summary(tmp_path) | ({"study": url} if url else {})
    page = write_html_report(exp, make_trials(), None, summary, []).read_text()
    assert command.format(exp=exp) in page.replace("&quot;", '"')
    assert page.count("optuna-dashboard") == 1


def test_plots_of_many_trials_colour_the_best_and_draw_the_rest_as_one_grey_artist():
    """At 1,000 trials a line per trial made the plots slow and unreadable (issue 17): the best
    COLOURED trials are lines, the rest one collection, and the title says so. About a second."""
    from tuning.plots import COLOURED, _plot_curves, _plot_parallel, _pyplot

    rng = np.random.default_rng(0)
    n = COLOURED + 70
    curves = [list(20 + 10 * rng.random() + np.arange(rng.integers(1, 6))[::-1]) for _ in range(n)]
    trials = pd.DataFrame({"trial_id": [f"t{i:03d}" for i in range(n)], "val_mae_per_epoch": curves,
                           "best_val_mae": [min(c) for c in curves], "param.dropout": rng.random(n),
                           "param.learning_rate": 10 ** rng.uniform(-5, -2, n)})
    best = trials.loc[trials["best_val_mae"].idxmin(), "trial_id"]
    for fig in (_plot_curves(trials, best), _plot_parallel(trials, None)):
        ax = fig.axes[0]
        assert len(ax.collections) == 1 and len(ax.collections[0].get_segments()) == n - COLOURED
        trial_lines = [line for line in ax.lines if line.get_marker() == "o"]  # (not the axes drawn)
        assert len(trial_lines) == COLOURED and f"best {COLOURED}" in ax.get_title(), ax.get_title()
        _pyplot().close(fig)
