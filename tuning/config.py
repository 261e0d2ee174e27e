"""The search config: the library's `Config` plus a `tune` section.

    cfg = load_search_config("configs/demo.yaml", ["tune.num_samples=4"])

Everything a trial trains with comes from `data`, `model` and `train`; `tune.space` says which of
those values the search varies (see `tuning.space`). `train.epochs` is each trial's maximum
number of epochs, and ASHA's `max_t`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from boneage.config import Config, _range, load_config


@dataclass
class ResourcesConfig:
    cpu: float = field(default=1.0, metadata=_range(0.0))
    gpu: float = field(default=0.0, metadata=_range(0.0))  # fractions share a GPU: 0.5 = two trials


@dataclass
class ReplayConfig:
    """Trials that train nothing (tuning.replay): for tests and for measuring the search itself."""
    curves: str = ""  # "" = real training (the default); "formula"; or a curve CSV (tuning.replay)
    seconds_per_epoch: float = field(default=1.0, metadata=_range(0.0))  # each epoch sleeps this long
    checkpoint_mib: float = field(default=1.0, metadata=_range(0.0))  # size of each checkpoint's payload
    noise: float = field(default=0.5, metadata=_range(0.0))  # formula: std of its seeded noise (months)


@dataclass
class TuneConfig:
    storage_path: str = "experiments"  # local folder, shared file system, or s3://bucket/path
    optuna_storage: Optional[str] = None  # Optuna storage URL; None = SQLite in the experiment folder
    num_samples: int = field(default=8, metadata=_range(1))
    max_concurrent_trials: int = field(default=2, metadata=_range(0))  # 0 = as many as the resources fit
    n_startup_trials: int = field(default=3, metadata=_range(0))  # random trials before TPE
    # TPE models the parameters jointly (multivariate TPE); true is what Optuna 5 ran by default
    multivariate: bool = True
    seed: int = 0
    grace_period: int = field(default=1, metadata=_range(1))  # epochs before ASHA may stop a trial
    reduction_factor: float = field(default=2.0, metadata=_range(1.01))
    brackets: int = field(default=1, metadata=_range(1))  # ASHA's brackets; more = Hyperband-style
    time_budget_s: float = field(default=0.0, metadata=_range(0.0))  # 0 = none
    gpu_hours_budget: float = field(default=0.0, metadata=_range(0.0))  # 0 = none
    checkpoint_every: int = field(default=1, metadata=_range(1))  # epochs between trial checkpoints
    max_failures: int = field(default=1, metadata=_range(0))  # retries of a crashed trial
    # true: a trial may run in the process of an ended one (Ray's reuse_actors), skipping TensorFlow's
    # import; false: a fresh process per trial (benchmark 4 measured both)
    reuse_actors: bool = False
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    space: dict[str, Any] = field(default_factory=dict)
    points_to_evaluate: list[Any] = field(default_factory=list)
    retrain: bool = True  # retrain the best config on train + val, test and export it
    retrain_gpus: int = field(default=-1, metadata=_range(-1))  # -1 = all GPUs of one node
    retrain_cpus: float = field(default=0.0, metadata=_range(0.0))  # 0 = every CPU of its node
    retrain_wait_s: float = field(default=900.0, metadata=_range(0.0))  # for a node with the retrain's GPUs
    # the most a search waits for its nodes to prepare (or fetch) the images before the first
    # trial; past it the search stops naming the nodes (their CPUs may be held by another job)
    prepare_timeout_s: float = field(default=1800.0, metadata=_range(1.0))
    require_gpu: bool = True  # a trial given a GPU by Ray fails if TensorFlow sees none
    # Share of the validation split held out of the retrain to calibrate prediction intervals
    # (no model trains on it); 0 = retrain on all of train + val, no intervals.
    calibration_fraction: float = field(default=0.5, metadata=_range(0.0, 0.9))
    ensemble_top_k: int = field(default=3, metadata=_range(1))  # best trials averaged (1 = none)
    export_ensemble: bool = False  # export the ensemble instead of the single retrained model
    gallery_size: int = field(default=8, metadata=_range(0))  # worst test predictions, with Grad-CAM
    mlflow: bool = False  # also log every trial to MLflow (Ray's MLflowLoggerCallback)
    mlflow_tracking_uri: Optional[str] = None  # None = sqlite:///<experiment>/mlflow.db (offline)
    replay: ReplayConfig = field(default_factory=ReplayConfig)  # curves set: replayed trials, no training


@dataclass
class SearchConfig(Config):
    tune: TuneConfig = field(default_factory=TuneConfig)


def load_search_config(path=None, overrides=()) -> SearchConfig:
    from tuning.space import parse_space

    from boneage.errors import InputError

    cfg = load_config(path, overrides, config_class=SearchConfig)
    if cfg.tune.gpu_hours_budget and not cfg.tune.resources.gpu:
        raise InputError("tune.gpu_hours_budget is set but trials use no GPU (tune.resources.gpu: 0); "
                         "use tune.time_budget_s instead")
    if cfg.tune.replay.curves and cfg.tune.retrain:
        raise InputError("tune.replay.curves is set: replayed trials train no model, so there is none to retrain; "
                         "set tune.retrain: false")
    if cfg.tune.grace_period > cfg.train.epochs:  # ASHA's max_t is train.epochs; Ray would assert
        raise InputError(f"tune.grace_period ({cfg.tune.grace_period}) is more than train.epochs "
                         f"({cfg.train.epochs}), the most epochs a trial trains: lower tune.grace_period "
                         f"or raise train.epochs")
    most = max_brackets(cfg.tune.grace_period, cfg.train.epochs, cfg.tune.reduction_factor)
    if cfg.tune.brackets > most:
        raise InputError(f"tune.brackets ({cfg.tune.brackets}) is more than ASHA can use: from tune.grace_period "
                         f"({cfg.tune.grace_period}) at tune.reduction_factor {cfg.tune.reduction_factor:g} it has "
                         f"{most - 1} rung(s) before train.epochs ({cfg.train.epochs}), so at most {most} bracket(s) "
                         f"(the last stops nothing); lower tune.brackets")
    parse_space(cfg)  # a bad space is an error now, not after Ray has started
    return cfg


def max_brackets(grace_period: int, max_t: int, reduction_factor: float) -> int:
    """The most brackets Ray's ASHAScheduler can use: its first bracket's rungs before max_t (at
    grace_period x reduction_factor^k), plus one. Bracket s starts s rungs later, so the last of
    these has no rung before max_t (it stops nothing, as Hyperband's last bracket); more would repeat it."""
    rungs, milestone = 0, float(grace_period)
    while milestone < max_t:
        rungs, milestone = rungs + 1, milestone * reduction_factor
    return rungs + 1
