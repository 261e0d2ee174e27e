"""How a search went, in a few lines of its summary and reports: who suggested each trial (the
config's `points_to_evaluate`, TPE's random start-up, or TPE's model) and what ASHA decided.

    story = search_story(study, trials, cfg.tune.n_startup_trials)   # from the study and trials.csv
    print("\n".join(story_lines(story)))

A search that never got past its start-up trials, or in which ASHA never stopped a trial, was a
random search run to the end: the summary says so, so that a budget too small to search is seen
(the demo is sized so that both happen). Who suggested a trial is read from the study: an
enqueued point carries Optuna's `fixed_params`; otherwise TPE samples from its model once as many
trials as `n_startup_trials` have ended COMPLETE or PRUNED (`optuna/samplers/_tpe/sampler.py`),
which the entries' start and end times tell.
"""
from __future__ import annotations

import bisect

import pandas as pd

from tuning.study import RAY_TRIAL

POINT, STARTUP, MODEL = "points_to_evaluate", "TPE start-up (random)", "TPE's model"


def suggested_by(study, n_startup: int) -> dict[str, str]:
    """{Ray trial id: POINT, STARTUP or MODEL} for every study entry that names its Ray trial
    (an entry added anew after a crash keeps its first entry's origin)."""
    import optuna

    entries = sorted(study.get_trials(deepcopy=False), key=lambda e: e.number)
    ended = sorted(e.datetime_complete for e in entries if e.datetime_complete is not None
                   and e.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    origins: dict[str, str] = {}
    for entry in entries:
        trial_id = entry.user_attrs.get(RAY_TRIAL)
        if trial_id is None or trial_id in origins or entry.datetime_start is None:
            continue
        if "fixed_params" in entry.system_attrs:
            origins[trial_id] = POINT
        else:
            before = bisect.bisect_right(ended, entry.datetime_start)  # ended is sorted: O(log n) an entry
            origins[trial_id] = MODEL if before >= n_startup else STARTUP
    return origins


def search_story(study, trials: pd.DataFrame, n_startup: int) -> dict:
    """Counts for the summary: trials by who suggested them, and ASHA's stops by rung epoch."""
    origins = suggested_by(study, n_startup)
    by = {name: sum(origins.get(str(t)) == name for t in trials["trial_id"]) for name in (POINT, STARTUP, MODEL)}
    ended = trials["ended"].fillna("").astype(str) if "ended" in trials else pd.Series("", index=trials.index)
    stopped = trials[ended.str.startswith("stopped by ASHA")]
    return {"suggested_by": by, "asha_stopped": int(len(stopped)),
            "asha_rung_epochs": sorted({int(e) for e in stopped["epochs"]}) if len(stopped) else []}


def story_lines(story: dict) -> list[str]:
    by = story.get("suggested_by") or {}
    shown = ", ".join(f"{n} from {name}" for name, n in by.items() if n)
    lines = [f"Trials suggested: {shown or 'none'}."]
    if not by.get(MODEL):
        lines.append("TPE never suggested a trial from its model: the search ended within its start-up trials "
                     "(raise tune.num_samples, or lower tune.n_startup_trials).")
    rungs = story.get("asha_rung_epochs") or []
    if story.get("asha_stopped"):
        lines.append(f"ASHA stopped {story['asha_stopped']} trial(s) at its rung(s) (epoch "
                     f"{', '.join(map(str, rungs))}).")
    else:
        lines.append("ASHA stopped no trial: every trial ran until it ended or the search stopped.")
    return lines
