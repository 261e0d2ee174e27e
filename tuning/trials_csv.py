"""trials.csv: one row per Ray Tune trial of a finished search, written and read back.

    write_trials_csv(trials, exp_dir / "trials.csv")
    trials = read_trials_csv(exp_dir / "trials.csv")   # the same DataFrame (curves as lists)

Columns: trial_id, status (completed, stopped_early, diverged, error, running), ended, epochs,
best_val_mae, last_val_mae, val_mae_per_epoch (a list; ";"-joined in the file), time_s, node_id
(Ray's), host, and `param.<name>` per searched parameter.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from boneage.config import write_atomic

PARAM = "param."
LIST_COLUMN = "val_mae_per_epoch"
TEXT_COLUMNS = ("trial_id", "status", "node_id", "host", "ended")


def write_trials_csv(trials: pd.DataFrame, path) -> None:
    table = trials.sort_values("trial_id", kind="stable").reset_index(drop=True)
    table[LIST_COLUMN] = [";".join(f"{float(v):.3f}" for v in curve_of(c)) for c in table[LIST_COLUMN]]
    write_atomic(path, table.to_csv(index=False))


def read_trials_csv(path) -> pd.DataFrame:
    text_types = {c: str for c in (*TEXT_COLUMNS, LIST_COLUMN)}
    table = pd.read_csv(path, dtype=text_types, keep_default_na=False, na_values=[""])
    for column in (c for c in TEXT_COLUMNS if c in table):
        table[column] = table[column].fillna("")
    table[LIST_COLUMN] = [[float(v) for v in s.split(";")] if isinstance(s, str) and s else []
                          for s in table[LIST_COLUMN]]
    return table


def curve_of(value) -> list:
    return list(value) if isinstance(value, (list, tuple, np.ndarray)) else []
