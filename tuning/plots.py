"""The report's plots, drawn from trials.csv's DataFrame and the Optuna study into PNGs.

    plots = draw_plots(exp_dir, trials, study, summary)   # [(file name, title, None or why not)]

Optimisation history, parameter importance (PED-ANOVA), parallel coordinates, learning curves
and the test predictions. A plot that cannot be drawn is returned with the reason ("not
available: <reason>" in the reports), never an error. Needs matplotlib; Optuna only for the
importance.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from boneage.evaluate import plot_predictions
from tuning.trials_csv import LIST_COLUMN, PARAM, curve_of

# plots draw the best this many trials in colour and the rest as one grey collection: a line
# artist per trial made the report's time grow with the trials and 1,000 lines unreadable
COLOURED = 50
# PED-ANOVA: how far each parameter's values in the best 10% of trials stray from its values in all
IMPORTANCE_LABEL = "importance (PED-ANOVA: best 10% of trials vs all; sums to 1)"


class Unavailable(Exception):
    """A plot that has nothing to show; the message says why."""


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _draw(out_dir: Path, name: str, draw) -> str | None:
    """draw(tmp_png) returns a figure (or writes tmp_png itself); renamed into place. None, or why not."""
    path, tmp = out_dir / name, out_dir / f".tmp-{name}"
    try:
        fig = draw(tmp)
        if fig is not None:
            fig.tight_layout()
            fig.savefig(tmp, format="png", dpi=100)
            _pyplot().close(fig)
        os.replace(tmp, path)
        return None
    except Exception as err:  # one broken plot must not cost the whole report
        tmp.unlink(missing_ok=True)
        path.unlink(missing_ok=True)  # no stale plot from an earlier report
        _pyplot().close("all")
        if isinstance(err, Unavailable):  # nothing to draw (e.g. no retrain): not a fault
            return str(err)
        # a real failure: skipped in the report, and also said where the user is looking now
        print(f"warning: plot {name} could not be drawn, skipped in the report: "
              f"{type(err).__name__}: {err}", file=sys.stderr)
        return f"{type(err).__name__}: {err}"


def _key(value) -> str:
    """Parameter values compared across the CSV, the DataFrame and the study."""
    if isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_)):
        return f"{float(value):.10g}"
    return str(value)


def _in_trial_order(trials: pd.DataFrame, study) -> pd.DataFrame:
    """Rows by Optuna trial number (matched on parameters), unmatched ones after by trial_id."""
    rows = trials.sort_values("trial_id", kind="stable")
    if study is None:
        return rows
    names = [c[len(PARAM):] for c in rows if c.startswith(PARAM)]
    numbers: dict[tuple, list[int]] = {}
    for t in study.get_trials(deepcopy=False):
        numbers.setdefault(tuple(_key(t.params.get(n)) for n in names), []).append(t.number)
    found = [numbers.get(tuple(_key(r[PARAM + n]) for n in names), []) for _, r in rows.iterrows()]
    order = [f.pop(0) if f else math.inf for f in found]
    return rows.iloc[np.argsort(order, kind="stable")]


def _plot_history(trials: pd.DataFrame, study):
    rows = _in_trial_order(trials, study)
    y, status = rows["best_val_mae"].to_numpy(float), rows["status"].to_numpy(str)
    x, ok = np.arange(1, len(rows) + 1), np.isfinite(rows["best_val_mae"].to_numpy(float))
    if not ok.any():
        raise Unavailable("no trial reported a validation MAE")
    fig, ax = _pyplot().subplots(figsize=(8, 4.5))
    early = status == "stopped_early"
    ax.scatter(x[ok & ~early], y[ok & ~early], c="tab:blue", label="completed", zorder=3)
    ax.scatter(x[ok & early], y[ok & early], c="tab:orange", marker="x", label="stopped early (ASHA)", zorder=3)
    ax.step(x[ok], np.minimum.accumulate(y[ok]), where="post", c="tab:green", label="best so far")
    ax.set(xlabel="trial (in start order)", ylabel="best validation MAE (months)", title="Optimisation history")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if 0 < 5 * y[ok].min() < y[ok].max():  # a few diverged trials should not flatten the good ones
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter("{x:g}")
        ax.yaxis.set_minor_formatter("{x:g}")
    ax.legend(loc="upper right", framealpha=0.9)
    return fig


def _plot_importance(study):
    if study is None:
        raise Unavailable("no Optuna study")
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(done) < 2:
        raise Unavailable(f"needs at least 2 finished trials, the study has {len(done)}")
    names = set.intersection(*(set(t.params) for t in done))
    varying = sorted(n for n in names if len({_key(t.params[n]) for t in done}) > 1)
    if not varying:
        raise Unavailable("no searched parameter varies across the finished trials")
    # named, not left to Optuna's default (PED-ANOVA in Optuna 5, fANOVA before), so the label holds
    evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    importances = optuna.importance.get_param_importances(study, evaluator=evaluator, params=varying)
    fig, ax = _pyplot().subplots(figsize=(7, 0.5 * len(importances) + 1.5))
    ax.barh(list(importances)[::-1], list(importances.values())[::-1], color="tab:blue")
    ax.set(xlabel=IMPORTANCE_LABEL, title="Parameter importance for validation MAE")
    return fig


def _axis(name: str, values: pd.Series, dist):
    """Positions in [0, 1] for one parameter, the (position, label) ticks and the axis name."""
    numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    choices = getattr(dist, "choices", None)
    if choices is not None or not numeric:
        labels = [_key(c) for c in (choices or sorted(values.unique(), key=_key))]
        labels += sorted({_key(v) for v in values} - set(labels))
        spot = {c: i / max(len(labels) - 1, 1) for i, c in enumerate(labels)}
        return np.array([spot[_key(v)] for v in values]), [(p, c) for c, p in spot.items()], name
    v = values.to_numpy(float)
    log = dist.log if dist is not None else any(w in name for w in ("learning_rate", "weight_decay"))
    log = log and bool(np.nanmin(v) > 0)
    lo, hi = (dist.low, dist.high) if dist is not None else (np.nanmin(v), np.nanmax(v))
    f = np.log10 if log else (lambda a: np.asarray(a, float))
    span = f(hi) - f(lo)
    pos = (f(v) - f(lo)) / span if span > 0 else np.full(len(v), 0.5)
    ticks = [(0.0, f"{lo:.3g}"), (1.0, f"{hi:.3g}")] if span > 0 else [(0.5, f"{lo:.3g}")]
    return pos, ticks, name + (" (log)" if log else "")


def _plot_parallel(trials: pd.DataFrame, study):
    columns = [c for c in trials if c.startswith(PARAM)]
    rows = trials[np.isfinite(trials["best_val_mae"].to_numpy(float))].sort_values("best_val_mae", ascending=False)
    if not columns or rows.empty:
        raise Unavailable("no searched parameters" if not columns else "no trial reported a validation MAE")
    dists = {k: d for t in (study.get_trials(deepcopy=False) if study else []) for k, d in t.distributions.items()}
    axes = [_axis(c[len(PARAM):], rows[c], dists.get(c[len(PARAM):])) for c in columns]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(columns) + 2), 5))
    mae = rows["best_val_mae"].to_numpy(float)
    top = min(mae.max(), 2 * np.median(mae))  # the colours resolve the good trials; the rest are pale
    norm = plt.Normalize(mae.min(), top if top > mae.min() else mae.min() + 1)
    cmap = plt.get_cmap("viridis")  # best dark, worst pale
    lines = np.column_stack([pos for pos, _, _ in axes])
    rest = len(mae) - COLOURED
    if rest > 0:  # the others in grey, one artist
        from matplotlib.collections import LineCollection

        xs = np.arange(len(columns))
        ax.add_collection(LineCollection([np.column_stack([xs, line]) for line in lines[:rest]], colors="0.75",
                                         linewidths=0.6, alpha=0.5))
    for i, (line, value) in enumerate(zip(lines, mae)):  # worst first, so the best lie on top
        if i >= rest:
            ax.plot(range(len(columns)), line, c=cmap(norm(value)), alpha=0.85,
                    lw=2.5 if i == len(mae) - 1 else 1.3, marker="o", ms=3)
    for i, (_, ticks, _) in enumerate(axes):
        ax.axvline(i, c="0.5", lw=0.8)
        for pos, label in ticks:
            ax.text(i + 0.03, pos, label, fontsize=8, va="center", color="0.25")
    ax.set_xticks(range(len(columns)), [label for _, _, label in axes], rotation=20)
    title = "Trials across the search space" + (f" (the best {COLOURED} of {len(mae)} in colour)" if rest > 0 else "")
    ax.set(yticks=[], ylim=(-0.05, 1.05), xlim=(-0.2, len(columns) - 0.6), title=title)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="best validation MAE (months)",
                 extend="max" if top < mae.max() else "neither")
    return fig


def _plot_curves(trials: pd.DataFrame, best_id):
    curves = {t: np.asarray(curve_of(c), float) for t, c in zip(trials["trial_id"], trials[LIST_COLUMN])}
    curves = {t: c for t, c in curves.items() if np.isfinite(c).any()}
    if not curves:
        raise Unavailable("no trial reported a per-epoch validation MAE")
    fig, ax = _pyplot().subplots(figsize=(8, 4.5))
    best = dict(zip(trials["trial_id"], trials["best_val_mae"].to_numpy(float)))
    ranked = sorted(curves, key=lambda t: best[t] if np.isfinite(best[t]) else np.inf)
    coloured = set(ranked[:COLOURED])
    if len(ranked) > COLOURED:  # the others in grey, one artist
        from matplotlib.collections import LineCollection

        ax.add_collection(LineCollection([np.column_stack([np.arange(1, len(curves[t]) + 1),
                                                           np.where(np.isfinite(curves[t]), curves[t], np.nan)])
                                          for t in ranked[COLOURED:]], colors="0.75", linewidths=0.6, alpha=0.5))
    for trial_id in ranked:
        if trial_id in coloured and trial_id != best_id:
            c = curves[trial_id]
            ax.plot(np.arange(1, len(c) + 1), c, c="tab:blue", alpha=0.35, lw=1, marker="o", ms=3)
    if best_id in curves:
        c = curves[best_id]
        ax.plot(np.arange(1, len(c) + 1), c, c="tab:red", lw=2.5, marker="o", ms=4, label=f"best: {best_id}")
        ax.legend()
    values = np.concatenate(list(curves.values()))
    values = values[np.isfinite(values)]
    ax.set_ylim(0, 1.05 * min(values.max(), 3 * np.percentile(values, 50)))  # first epochs can be huge
    ax.xaxis.get_major_locator().set_params(integer=True)
    shown = f"{len(curves)} trials" + (f"; the best {COLOURED} in blue" if len(curves) > COLOURED else "")
    ax.set(xlabel="epoch", ylabel="validation MAE (months)", title=f"Learning curves ({shown})")
    return fig


def _plot_test(path, predictions_csv):
    if not predictions_csv:
        raise Unavailable("no test predictions (no retrain)")
    frame = pd.read_csv(predictions_csv)
    male = frame["male"].astype(str).str.lower().isin(["1", "1.0", "true"])  # bool or 0/1 column
    mae = (frame["predicted"] - frame["boneage"]).abs().mean()
    plot_predictions(frame["boneage"], frame["predicted"], male, path, title=f"test: MAE {mae:.2f} months")


def draw_plots(experiment_dir, trials: pd.DataFrame, study, summary: dict) -> list[tuple[str, str, str | None]]:
    """Draw the report's PNGs into experiment_dir: [(file name, title, None or why not)]."""
    out = Path(experiment_dir)
    out.mkdir(parents=True, exist_ok=True)
    best = summary.get("best") or {}
    plots = [
        ("optimization_history.png", "Optimisation history", lambda p: _plot_history(trials, study)),
        ("param_importance.png", "Parameter importance", lambda p: _plot_importance(study)),
        ("parallel_coordinates.png", "Parallel coordinates", lambda p: _plot_parallel(trials, study)),
        ("learning_curves.png", "Learning curves", lambda p: _plot_curves(trials, best.get("trial_id"))),
        ("test_predictions.png", "Test predictions", lambda p: _plot_test(p, summary.get("predictions_csv"))),
    ]
    return [(name, title, _draw(out, name, draw)) for name, title, draw in plots]
