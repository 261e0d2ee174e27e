"""What the search's trials came to: their table (one row per Ray trial: status, why it ended,
epochs, curve, parameters), the best configuration, and how many epochs to retrain it for.

    trials = collect_trials(results, cfg, progress)           # -> trials.csv (tuning.trials_csv)
    tuned, best = best_config(cfg, trials)                    # a diverged trial is never the best
    epochs, rule = retrain_epochs(cfg, candidates(trials), best)

Used by `tuning.retrain` after a search (and by `--retrain-only`); no Ray, no TensorFlow.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from boneage.errors import InputError
from tuning.config import SearchConfig


def collect_trials(results, cfg: SearchConfig, progress: dict | None = None) -> pd.DataFrame:
    """One row per trial from a Ray ResultGrid: parameters, per-epoch val MAE, status, time, node."""
    rows = []
    for result in results:
        history = result.metrics_dataframe
        curve = [] if history is None or "val_mae" not in history else [float(v) for v in history["val_mae"]]
        if curve and "epoch" in history and history["epoch"].notna().all():
            # one value an epoch: a trial resumed from a checkpoint older than its last result
            # runs that epoch again, and its later run is the one its weights went on from
            by_epoch = dict(zip(history["epoch"].astype(int), curve))
            curve = [by_epoch[e] for e in sorted(by_epoch)]
        epochs = int(result.metrics.get("epoch", len(curve)) or 0)
        own = str(result.metrics.get("ended") or "")  # why the trial ended, when it knows itself
        status = ("error" if result.error else "diverged" if result.metrics.get("diverged") else
                  "completed" if own == "completed" or epochs >= cfg.train.epochs else "stopped_early")
        row = {"trial_id": str(result.metrics.get("trial_id", Path(result.path).name)), "status": status,
               "epochs": epochs, "best_val_mae": min(curve) if curve else math.nan,
               "last_val_mae": curve[-1] if curve else math.nan, "val_mae_per_epoch": curve,
               "time_s": float(result.metrics.get("time_total_s", 0.0) or 0.0),
               "node_id": str(result.metrics.get("node_id", "")), "host": str(result.metrics.get("host", ""))}
        params = {k: v for k, v in (result.config or {}).items() if k in cfg.tune.space}
        row.update({f"param.{k}": v for k, v in params.items()})
        row["best_epoch"] = int(result.metrics.get("best_epoch", 0) or 0)
        row["ended"] = own_end_reason(own, status, epochs, cfg) or end_reason(result, status, epochs, cfg, progress or {})
        rows.append(row)
    if not rows:
        raise InputError("the search produced no trials")
    return pd.DataFrame(rows).sort_values("trial_id").reset_index(drop=True)


def own_end_reason(own: str, status: str, epochs: int, cfg: SearchConfig) -> str | None:
    """Why a trial ended as it reported it itself (boneage.progress.Progress), or None when Ray
    stopped it (ASHA, a budget) or it failed: `end_reason` tells those."""
    if status == "diverged":
        return f"diverged at epoch {epochs}: loss or validation MAE not finite"
    if status == "error":
        return None
    if own == "early_stopping":
        return (f"{EARLY_STOPPING} {epochs}: validation MAE not better for "
                f"{cfg.train.early_stopping_patience} epochs")
    return None


def end_reason(result, status: str, epochs: int, cfg: SearchConfig, progress: dict) -> str:
    """Why Ray ended a trial, for the report: its error, all epochs, or which stop it met. ASHA's
    stops and the budget that ended the search come from tuning.progress's saved state."""
    if status == "error":
        lines = str(result.error).strip().splitlines() or ["unknown error"]
        return "error: " + lines[-1][:160]
    if status == "completed":
        return f"ran all {epochs} epochs"
    trial_id = str(result.metrics.get("trial_id", ""))
    if trial_id in progress.get("asha_stopped", []):
        return f"stopped by ASHA at the epoch-{epochs} rung"
    if progress.get("budget_stop") == "time_budget":
        return f"stopped after epoch {epochs}: the search's time budget ({cfg.tune.time_budget_s:g} s) was spent"
    if progress.get("budget_stop") == "gpu_hour_budget":
        return f"stopped after epoch {epochs}: the search's GPU-hour budget ({cfg.tune.gpu_hours_budget:g}) was spent"
    return f"stopped after epoch {epochs}: the search was stopped"


def budget_note(cfg: SearchConfig, progress: dict) -> str | None:
    """Which budget cut the search short, for the summary and the reports; None if none did."""
    if progress.get("budget_stop") == "time_budget":
        return (f"the time budget (tune.time_budget_s: {cfg.tune.time_budget_s:g} s) cut the search short: "
                f"its running trials were stopped and no new trial started")
    if progress.get("budget_stop") == "gpu_hour_budget":
        return (f"the GPU-hour budget (tune.gpu_hours_budget: {cfg.tune.gpu_hours_budget:g}) cut the search "
                f"short: its running trials were stopped and no new trial started")
    return None


def candidates(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials the retrain may follow: each reported a validation MAE and did not diverge (a
    diverged trial is never chosen, however good an epoch before looked)."""
    finished = trials[trials["best_val_mae"].notna()]
    return finished[finished["status"] != "diverged"] if "status" in finished else finished


def best_config(cfg: SearchConfig, trials: pd.DataFrame) -> tuple[SearchConfig, pd.Series]:
    """The best trial's config, set up for retraining without a validation set."""
    from tuning.space import apply_params

    finished = candidates(trials)
    if finished.empty:
        raise InputError("no trial reported a validation MAE without diverging; see trials.csv and the "
                         "trials' error.txt files")
    best = finished.loc[finished["best_val_mae"].idxmin()]
    params = {k[len("param."):]: v for k, v in best.items() if k.startswith("param.")}
    params = {k: (v.item() if hasattr(v, "item") else v) for k, v in params.items()}
    tuned = apply_params(cfg, params)
    tuned.train.epochs = retrain_epochs(cfg, finished, best)[0]
    tuned.train.schedule = "cosine"  # no validation set to reduce on plateau or stop early with
    return tuned, best


EARLY_STOPPING = "early stopping after epoch"  # how `own_end_reason` starts a trial's early stop


def ran_its_course(trials: pd.DataFrame, max_epochs: int) -> pd.Series:
    """Which trials ended on their own: all epochs, or their own early stopping. Not a trial that
    ASHA, a budget or Ray stopped, nor a diverged or failed one. (A table without a status column,
    made by hand: the trials that ran max_epochs.)"""
    if "status" not in trials:
        return trials["epochs"].astype(int) >= max_epochs
    ended = trials["ended"].fillna("").astype(str) if "ended" in trials else pd.Series("", index=trials.index)
    return (trials["status"] == "completed") | ((trials["status"] == "stopped_early")
                                                 & ended.str.startswith(EARLY_STOPPING))


def retrain_epochs(cfg: SearchConfig, finished: pd.DataFrame, best: pd.Series) -> tuple[int, str]:
    """How many epochs the retrain trains, and the rule that chose them (for the report).

    Only a trial that ran its course has shown how many epochs it needs: a trial cut by ASHA or a
    budget was still learning, so its best epoch so far is only a lower bound. The rule:
    1. the best trial ran its course: its best epoch;
    2. it was cut short, and other trials (not diverged) ran their course: the best epoch of the
       best of those (the nearest in quality to the best trial), or the best trial's own best
       epoch if that is more (it has shown at least that many help);
    3. none ran its course: train.epochs, every epoch a trial may train. The retrain has no
       validation split to stop early on (the calibration part is kept for the intervals alone),
       so this is the trials' full length with a cosine schedule.
    """
    own = max(1, int(best.get("best_epoch", 0) or 0) or int(best["epochs"]))
    whole = finished[ran_its_course(finished, cfg.train.epochs)]
    if best.name in whole.index:
        return own, f"the best trial's best epoch ({own}): it ran its course"
    if len(whole):
        model = whole.loc[whole["best_val_mae"].idxmin()]
        theirs = max(1, int(model.get("best_epoch", 0) or 0) or int(model["epochs"]))
        epochs = max(theirs, own)
        return epochs, (f"{epochs} epochs: the best trial was cut short at epoch {int(best['epochs'])}, so "
                        f"the best epoch ({theirs}) of the best trial that ran its course ({model['trial_id']})"
                        + (f", raised to the best trial's own best epoch ({own})" if own > theirs else ""))
    return cfg.train.epochs, (f"train.epochs ({cfg.train.epochs}): no trial ran its course (ASHA or a budget "
                              f"cut them all), so none has shown how many epochs it needs")
