"""What a finished search found: report.md with its plots, and the terminal summary.

    path = write_report(exp_dir, trials, study, summary)   # exp_dir/report.md + PNGs next to it
    print(format_summary(summary))

(trials.csv: tuning.trials_csv; the PNGs: tuning.plots.)

`trials`: trial_id, status (completed, stopped_early, diverged, error, running), ended, epochs, best_val_mae,
last_val_mae, val_mae_per_epoch (a list), time_s, node_id (Ray's), host, and `param.<name>` per searched parameter.
`study`: the Optuna study or None. `summary`: name, best {trial_id, val_mae, params, epochs},
test_metrics (boneage.evaluate's dict) or None, retrain_epochs, retrain_epochs_rule (why that many),
budget_stop (which budget cut the search, or None), predictions_csv, wall_time_s,
gpu_hours, num_trials, storage. A plot that cannot be drawn is "not available: <reason>" in the
report, never an error. Needs pandas, numpy and matplotlib; Optuna only for parameter importance.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from boneage.config import write_atomic
from boneage.evaluate import format_metrics
from tuning.plots import draw_plots
from tuning.story import story_lines
from tuning.trials_csv import PARAM

TOP_TRIALS = 20


# --- report.md and the terminal summary -------------------------------------------------------

def _fmt(value, spec=".4g") -> str:
    """A table cell: floats as `spec`, missing as '-'."""
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return "-"
    return format(value, spec) if isinstance(value, (float, np.floating)) else str(value).replace("|", "\\|")


def _months(value) -> str:
    return _fmt(value, ".2f")


def _table(header, rows) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows] + [""]


def _duration(seconds) -> str:
    s = int(round(seconds or 0))
    return f"{s // 3600} h {s % 3600 // 60:02d} min" if s >= 3600 else f"{s // 60} min {s % 60:02d} s"


FAILED_NOTE = ("The Optuna study's entries closed as FAIL: a trial that was running when the search was stopped "
               "or its head lost (its trial went on from its checkpoint, and its end is a later entry), or a trial "
               "whose error spent its retries.")


def failed_entries(study) -> list[tuple[str, str, str]]:
    """(#number, Ray trial id, parameters) of the study's FAIL entries."""
    import optuna

    if study is None:
        return []
    return [(f"#{t.number}", t.user_attrs.get("ray_trial_id", "-"),
             ", ".join(f"{k}={_fmt(v)}" for k, v in t.params.items()))
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))]


def write_report(experiment_dir, trials: pd.DataFrame, study, summary: dict, plots=None) -> Path:
    """report.md; `plots` from draw_plots, drawn here when not given."""
    out = Path(experiment_dir)
    plots = draw_plots(out, trials, study, summary) if plots is None else plots
    best, test = summary.get("best") or {}, summary.get("test_metrics")
    statuses = ", ".join(f"{k} {v}" for k, v in trials["status"].value_counts().items())
    test_mae = "-" if not test else (f"{test['mae']:.2f} months (95% CI {test['mae_ci95'][0]:.2f}-"
                                      f"{test['mae_ci95'][1]:.2f}, n={test['n']})")
    lines = [f"# Hyperparameter search: {summary.get('name', out.name)}", "",
             "The full report, with prediction intervals, ensemble and TTA and the worst predictions "
             "explained by Grad-CAM, is the self-contained [report.html](report.html).", ""]
    lines += _table(["", ""], [
        ("best trial", f"`{best.get('trial_id', '-')}`"),
        ("validation MAE (best trial)", f"{_months(best.get('val_mae'))} months, {_fmt(best.get('epochs'))} epochs"),
        (f"test MAE (retrained {_fmt(summary.get('retrain_epochs'))} epochs)", test_mae),
        ("retrain epochs chosen by", summary.get("retrain_epochs_rule") or "-"),
        ("budget", summary.get("budget_stop") or "not reached"),
        ("the search", " ".join(story_lines(summary["search_story"])) if summary.get("search_story") else "-"),
        ("test MAE of the mean predictor", f"{test['mean_predictor_mae']:.2f} months" if test else "-"),
        ("trials", f"{len(trials)} ({statuses})"),
        ("wall time", _duration(summary.get("wall_time_s"))),
        ("GPU-hours", f"{summary.get('gpu_hours') or 0:.2f}"),
        ("results", summary.get("storage", "-")),
    ])
    lines += ["## Best configuration", ""] + _table(["parameter", "value"], (best.get("params") or {}).items())
    lines += ["## Test set", ""]
    if test:
        lines += [f"RMSE {test['rmse']:.2f}, median absolute error {test['median_ae']:.2f} months.", ""]
        lines += _table(["sex", "MAE (months)"], [(k, _months(v)) for k, v in test["by_sex"].items()])
        lines += _table(["age band", "MAE (months)", "n"],
                        [(band, _months(v["mae"]), v["n"]) for band, v in test["by_age_band"].items()])
    else:
        lines += ["Not evaluated on the test split (no retrain).", ""]
    lines += ["## Plots", ""]
    for name, title, reason in plots:
        lines += [f"### {title}", "", f"![{title}]({name})" if reason is None else f"_not available: {reason}_", ""]
    params = [c for c in trials if c.startswith(PARAM)]
    top = trials.sort_values("best_val_mae", na_position="last", kind="stable").head(TOP_TRIALS)
    lines += [f"## Trials (top {min(TOP_TRIALS, len(trials))} of {len(trials)} by best validation MAE)", ""]
    lines += _table(["trial", "status", "epochs", "best val MAE", "last val MAE", "time (s)"]
                    + [p[len(PARAM):] for p in params],
                    [(r[0], r[1], r[2], _months(r[3]), _months(r[4]), _fmt(r[5], ".0f"), *r[6:]) for r in
                     top[["trial_id", "status", "epochs", "best_val_mae", "last_val_mae", "time_s", *params]]
                     .itertuples(index=False)])
    if (out / "trials.csv").exists():
        lines += ["All trials, with per-epoch validation MAE: [trials.csv](trials.csv)", ""]
    failed = failed_entries(study)
    if failed:
        lines += ["## Failed study entries", "", FAILED_NOTE, ""] + _table(["entry", "Ray trial", "parameters"], failed)
    path = out / "report.md"
    write_atomic(path, "\n".join(lines))
    return path


def format_summary(summary: dict) -> str:
    best, test = summary.get("best") or {}, summary.get("test_metrics")
    lines = [f"Search {summary.get('name', '')}: {summary.get('num_trials', '?')} trials in "
             f"{_duration(summary.get('wall_time_s'))}, {summary.get('gpu_hours') or 0:.2f} GPU-hours"]
    if best.get("val_mae") is None:
        lines.append("No trial reported a validation MAE.")
    else:
        lines.append(f"Best trial {best.get('trial_id')}: validation MAE {best['val_mae']:.2f} months, "
                     f"{best.get('epochs')} epochs")
        lines += [f"  {k} = {_fmt(v)}" for k, v in (best.get("params") or {}).items()]
    if summary.get("search_story"):
        lines += story_lines(summary["search_story"])
    if summary.get("budget_stop"):
        lines.append(f"Budget: {summary['budget_stop']}.")
    if summary.get("retrain_epochs_rule"):
        lines.append(f"Retrain epochs: {summary['retrain_epochs_rule']}")
    if test:
        lines.append(f"Test set (best config retrained for {summary.get('retrain_epochs')} epochs):")
        lines += ["  " + line for line in format_metrics(test).splitlines()]
    else:
        lines.append("Test set: not evaluated (no retrain).")
    lines.append(f"Results: {summary.get('storage', '-')}")
    return "\n".join(lines)
