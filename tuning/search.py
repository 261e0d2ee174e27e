"""Search Xception fine-tuning hyperparameters, retrain the best, report its test MAE, export it.

    python -m tuning.search --config configs/demo.yaml               # CPU demo, ~10 minutes
    python -m tuning.search --config configs/local.yaml              # one GPU, shared by trials
    python -m tuning.search --config configs/default.yaml --address auto   # a `ray up` cluster
    python -m tuning.search --config configs/demo.yaml --resume --name demo-20261201-101500
    python -m tuning.search --retrain-only experiments/demo-20261201-101500

Ray Tune runs the trials (`tuning.trainable`), Optuna's TPE picks their hyperparameters from
`tune.space` (`tuning.space`), and ASHA stops the weak ones early on validation MAE. The Optuna
study lives in SQLite inside the experiment folder (or at `tune.optuna_storage`, e.g.
PostgreSQL on a cluster), so `optuna-dashboard sqlite:///EXPERIMENT/optuna.db` shows it and a
resumed search continues it. The driver validates the config and the data, has every node
prepare the images once (`boneage.prepare`), then leaves all TensorFlow work to Ray workers.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from boneage.errors import EXIT_BAD_INPUT, InputError
from tuning.config import SearchConfig, load_search_config

METRIC, MODE = "val_mae", "min"
EXIT_INTERRUPTED = 130
STUDY_DB = "optuna.db"
SEARCH_CONFIG = "search_config.yaml"


class SearchInterrupted(Exception):
    """Ray Tune stopped on Ctrl-C (or SIGINT) with trials unfinished; the state is saved."""


def experiment_paths(cfg: SearchConfig, name: str) -> tuple[str, Path]:
    """(Ray storage path, local experiment folder). For `s3://` storage, results that are
    not Ray's (report, study, model) are made in a local folder and uploaded at the end."""
    storage = cfg.tune.storage_path
    if "://" in storage:
        return storage, Path.home() / "boneage-experiments" / name
    storage = str(Path(storage).expanduser().resolve())
    return storage, Path(storage) / name


def study_storage(cfg: SearchConfig, local_dir: Path):
    import optuna

    url = cfg.tune.optuna_storage or f"sqlite:///{local_dir / STUDY_DB}"
    try:
        return optuna.storages.RDBStorage(url, heartbeat_interval=None)
    except Exception as err:  # SQLAlchemy raises many kinds for a bad URL
        raise InputError(f"tune.optuna_storage: cannot open {url}: {err}") from None


def fail_running_trials(storage, study_name: str) -> int:
    """After a crash the study still says RUNNING for the trials that were in flight: mark
    them failed, so TPE does not wait on them and the dashboard tells the truth."""
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return 0
    running = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    for trial in running:
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
    return len(running)


def make_searcher(cfg: SearchConfig, space: dict, storage, study_name: str):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    class StudySearch(OptunaSearch):
        """OptunaSearch that copes with a trial whose study entry was closed meanwhile (marked
        failed after a crash, then resumed from its checkpoint by Ray): its epochs are not
        reported to the closed entry, and its final result is added as a new finished trial."""

        def _closed(self, trial_id) -> bool:
            ot_trial = self._ot_trials.get(trial_id)
            return ot_trial is not None and self._ot_study._storage.get_trial(
                ot_trial._trial_id).state.is_finished()

        def on_trial_result(self, trial_id, result):
            if not self._closed(trial_id):
                super().on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id, result=None, error=False):
            value = (result or {}).get(self.metric)
            if self._closed(trial_id) and trial_id not in self._completed_trials:
                if value is not None and not error:
                    ot_trial = self._ot_trials[trial_id]
                    self._ot_study.add_trial(optuna.trial.create_trial(
                        params=ot_trial.params, distributions=ot_trial.distributions, value=value))
                self._completed_trials.add(trial_id)
                return
            super().on_trial_complete(trial_id, result=result, error=error)

    sampler = optuna.samplers.TPESampler(seed=cfg.tune.seed, n_startup_trials=cfg.tune.n_startup_trials)
    return StudySearch(space=space, metric=METRIC, mode=MODE, sampler=sampler, study_name=study_name,
                       storage=storage, points_to_evaluate=list(cfg.tune.points_to_evaluate) or None)


def make_tuner(cfg: SearchConfig, name: str, splits, resume: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from tuning.budget import GpuHourBudget
    from tuning.space import parse_space
    from tuning.trainable import run_trial

    storage_path, local_dir = experiment_paths(cfg, name)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=dataclasses.asdict(cfg), splits=splits),
        {"cpu": cfg.tune.resources.cpu, "gpu": cfg.tune.resources.gpu})
    if resume:
        path = f"{storage_path.rstrip('/')}/{name}"
        if not tune.Tuner.can_restore(path):
            raise InputError(f"--resume: no experiment to resume at {path}")
        failed = fail_running_trials(study_storage(cfg, local_dir), name)
        if failed:
            print(f"marked {failed} trial(s) left running in the Optuna study as failed")
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs, grace_period=cfg.tune.grace_period,
                              reduction_factor=cfg.tune.reduction_factor)
    searcher = make_searcher(cfg, parse_space(cfg), study_storage(cfg, local_dir), name)
    stoppers = GpuHourBudget(cfg.tune.gpu_hours_budget, cfg.tune.resources.gpu) if cfg.tune.gpu_hours_budget else None
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=METRIC, mode=MODE, search_alg=searcher, scheduler=scheduler,
            num_samples=cfg.tune.num_samples, max_concurrent_trials=cfg.tune.max_concurrent_trials,
            time_budget_s=cfg.tune.time_budget_s or None, reuse_actors=False),
        run_config=tune.RunConfig(
            name=name, storage_path=storage_path, stop=stoppers,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures)))


def unfinished_trials(results) -> int:
    """Trials the saved experiment state still lists as running or pending: after Ctrl-C, Ray
    saves them that way (to resume them) even though the in-memory ResultGrid says otherwise."""
    from ray import tune

    saved = tune.ExperimentAnalysis(results.experiment_path, storage_filesystem=results.filesystem)
    return sum(trial.status not in ("TERMINATED", "ERROR") for trial in saved.trials)


def default_name(args, cfg: SearchConfig) -> str:
    stem = Path(args.config).stem if args.config else "search"
    if not args.resume:
        return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    # --resume without --name: the newest experiment of this config
    root = Path(experiment_paths(cfg, stem)[1]).parent
    candidates = sorted(root.glob(f"{stem}-*"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not candidates:
        raise InputError(f"--resume: no experiment named {stem}-* in {root}; pass --name")
    return candidates[-1].name


def start_ray(address: str | None) -> None:
    import ray

    quiet = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore"}
    os.environ.update(quiet)  # local workers inherit the driver's environment
    # Checkpointing every epoch with num_to_keep=1 is deliberate; Tune warns about it each time.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # No --address: a Ray of our own ("local"), never whatever other cluster runs on this machine
    # (Ray's default would join the newest one it finds, and its owner's trials with it).
    ray.init(address=address or "local", runtime_env={"env_vars": quiet}, log_to_driver=True,
             include_dashboard=False, configure_logging=False)


def search(cfg: SearchConfig, name: str, address: str | None = None, resume: bool = False) -> dict:
    """Run (or resume) the search, then retrain, test, export and report. Returns the summary."""
    from boneage.config import save_config
    from boneage.splits import load_splits
    from tuning.retrain import finish

    storage_path, local_dir = experiment_paths(cfg, name)
    local_dir.mkdir(parents=True, exist_ok=True)
    if resume and (local_dir / SEARCH_CONFIG).is_file():
        cfg = load_search_config(local_dir / SEARCH_CONFIG)  # resume exactly what was started
    save_config(cfg, local_dir / SEARCH_CONFIG)
    print(f"experiment {name}: results in {local_dir}" + (f" and {storage_path}/{name}" if "://" in storage_path else ""))
    splits = load_splits(cfg.data)
    splits.save(local_dir)
    print(f"data: {splits.sizes()} images from {splits.root}")
    started = time.time()
    start_ray(address)
    from tuning.prepare import prepare_on_every_node

    prepare_on_every_node(cfg, splits)
    results = make_tuner(cfg, name, splits, resume).fit()
    if unfinished_trials(results):
        raise SearchInterrupted(f"search {name} was interrupted; its state is saved. Continue it with:\n"
                                f"  python -m tuning.search --config CONFIG --resume --name {name}")
    return finish(cfg, name, local_dir, storage_path, results, splits, started)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuning.search", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="search config YAML (e.g. configs/demo.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. tune.num_samples=16 (repeatable)")
    parser.add_argument("--address", help="Ray cluster address ('auto' on a `ray up` cluster)")
    parser.add_argument("--name", help="experiment name (default <config>-<date>-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted experiment")
    parser.add_argument("--retrain-only", metavar="EXPERIMENT",
                        help="redo the retrain/test/export/report step of a finished search")
    args = parser.parse_args(argv)
    try:
        if args.retrain_only:
            from tuning.retrain import retrain_only

            retrain_only(Path(args.retrain_only), args.address)
            return 0
        if not args.config:
            raise InputError("--config is required (e.g. --config configs/demo.yaml)")
        cfg = load_search_config(args.config, args.overrides)
        search(cfg, args.name or default_name(args, cfg), args.address, args.resume)
        return 0
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SearchInterrupted as err:
        print(str(err))
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
