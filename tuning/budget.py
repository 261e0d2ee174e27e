"""A Ray Tune stopper that ends the whole search once it has used its GPU-hours.

GPU-hours are counted as each trial's running time times the GPUs it holds, which is what a
cloud bill counts; `tune.time_budget_s` is the wall-clock budget beside it.
"""
from __future__ import annotations

from ray import tune


class GpuHourBudget(tune.Stopper):
    def __init__(self, budget_hours: float, gpus_per_trial: float):
        self.budget_hours, self.gpus_per_trial = budget_hours, gpus_per_trial
        self.seconds_by_trial: dict[str, float] = {}

    def used_hours(self) -> float:
        return sum(self.seconds_by_trial.values()) * self.gpus_per_trial / 3600.0

    def __call__(self, trial_id, result) -> bool:
        self.seconds_by_trial[trial_id] = float(result.get("time_total_s", 0.0))
        return False

    def stop_all(self) -> bool:
        return self.used_hours() >= self.budget_hours
