"""Search Xception fine-tuning hyperparameters, retrain the best, report its test MAE, export it.

    python -m tuning.search --config configs/demo.yaml               # CPU demo, ~10 minutes
    python -m tuning.search --config configs/local.yaml              # one GPU, shared by trials
    python -m tuning.search --config configs/cluster.yaml --address auto   # a `ray up` cluster
    python -m tuning.search --config configs/demo.yaml --resume --name demo-20261201-101500
    python -m tuning.search --retrain-only experiments/demo-20261201-101500   # or s3://.../NAME

Ray Tune runs the trials (`tuning.trainable`), Optuna's TPE picks their hyperparameters from
`tune.space` (`tuning.space`), and ASHA stops the weak ones early on validation MAE. The
experiment lives in `tune.storage_path` (a folder, a shared file system or s3://; see
`tuning.experiment`), the Optuna study in SQLite inside it (copied into s3:// storage after
every trial) or at `tune.optuna_storage` (see `tuning.study`), so a resumed search continues it,
on a fresh head too. `tensorboard --logdir EXPERIMENT` shows every trial's curves, and
`tune.mlflow: true` logs the trials to MLflow too (`tuning.tracking`). The driver validates
the config, the data and the cluster, then leaves all TensorFlow work to Ray workers; on a
cluster, Ray ships the driver's code to them.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import boneage
import tuning
from boneage.errors import EXIT_BAD_INPUT, InputError
from tuning import cluster
from tuning.config import SearchConfig, load_search_config
from tuning.experiment import SEARCH_CONFIG, Experiment, experiment_names, resolve_paths

METRIC, MODE = "val_mae", "min"
EXIT_INTERRUPTED = 130


class SearchInterrupted(Exception):
    """Ray Tune stopped on Ctrl-C (or SIGINT) with trials unfinished; the state is saved."""


def make_tuner(cfg: SearchConfig, exp: Experiment, splits, expected, resume: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from tuning.budget import GpuHourBudget
    from tuning.nodecheck import NodeCheckWatch
    from tuning.space import parse_space
    from tuning.study import StudySync, fail_running_trials, make_searcher, open_storage, study_url
    from tuning.tracking import tracking_callbacks
    from tuning.trainable import run_trial

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=dataclasses.asdict(cfg), splits=splits, expected=expected),
        {"cpu": cfg.tune.resources.cpu, "gpu": cfg.tune.resources.gpu})
    url = study_url(cfg, exp.local_dir)
    if resume:
        if not tune.Tuner.can_restore(exp.uri):
            raise InputError(f"--resume: no experiment to resume at {exp.uri}")
        failed = fail_running_trials(open_storage(url), exp.name)
        if failed:
            print(f"marked {failed} trial(s) left running in the Optuna study as failed")
        return tune.Tuner.restore(exp.uri, trainable, resume_unfinished=True, resume_errored=True)
    scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs, grace_period=cfg.tune.grace_period,
                              reduction_factor=cfg.tune.reduction_factor)
    searcher = make_searcher(cfg, parse_space(cfg), url, exp.name, METRIC, MODE)
    stoppers = [NodeCheckWatch()]
    if cfg.tune.gpu_hours_budget:
        stoppers.append(GpuHourBudget(cfg.tune.gpu_hours_budget, cfg.tune.resources.gpu))
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=METRIC, mode=MODE, search_alg=searcher, scheduler=scheduler,
            num_samples=cfg.tune.num_samples, max_concurrent_trials=cfg.tune.max_concurrent_trials or None,
            time_budget_s=cfg.tune.time_budget_s or None, reuse_actors=False),
        run_config=tune.RunConfig(
            name=exp.name, storage_path=exp.storage_path, stop=tune.stopper.CombinedStopper(*stoppers),
            callbacks=stoppers[:1] + ([StudySync(exp, url)] if exp.remote else [])
                      + tracking_callbacks(cfg, exp.name, exp.local_dir),
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
    names = experiment_names(cfg, stem)  # --resume without --name: the newest of this config
    if not names:
        raise InputError(f"--resume: no experiment named {stem}-* in {cfg.tune.storage_path}; pass --name")
    return names[-1]


def start_ray(address: str | None) -> None:
    """Start Ray here, or join the cluster at `address`. On a cluster every worker runs the
    driver's `boneage` and `tuning` (shipped as runtime_env py_modules), not whatever version
    its image holds."""
    import ray

    quiet = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore"}
    os.environ.update(quiet)  # local workers inherit the driver's environment
    # Checkpointing every epoch with num_to_keep=1 is deliberate; Tune warns about it each time.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    runtime_env = {"env_vars": quiet}
    if address:
        runtime_env["py_modules"] = [str(Path(boneage.__file__).parent), str(Path(tuning.__file__).parent)]
    # "local": a new Ray of our own, never one that `ray start` left running on this machine
    ray.init(address=address or "local", runtime_env=runtime_env, log_to_driver=True,
             include_dashboard=False, configure_logging=False)


def images_here(cfg: SearchConfig, address: str | None) -> bool:
    """Whether the driver checks the images itself: always, except on a cluster whose head
    holds only the label CSV (images staged on the workers, which check them)."""
    from boneage import data

    if not address or cfg.data.source == "phantom":
        return True
    try:
        data.find_image_dir(Path(cfg.data.root), "training")
        return True
    except InputError:
        print(f"data: no images under {cfg.data.root} here: checking the labels here, the images on each node")
        return False


def search(cfg: SearchConfig, name: str, address: str | None = None, resume: bool = False) -> dict:
    """Run (or resume) the search, then retrain, test, export and report. Returns the summary."""
    from boneage.config import save_config
    from boneage.splits import load_splits
    from tuning.nodecheck import MARK, NodeExpectations, code_version
    from tuning.retrain import finish
    from tuning.study import STUDY_DB

    resolve_paths(cfg)
    exp = Experiment.create(cfg, name)
    if resume:  # resume exactly what was started; a fresh head fetches it from the storage
        if not exp.fetch(SEARCH_CONFIG):
            raise InputError(f"--resume: no experiment {name} in {cfg.tune.storage_path}")
        exp.fetch(STUDY_DB)
        cfg = load_search_config(exp.local_dir / SEARCH_CONFIG)
    splits = load_splits(cfg.data, images=images_here(cfg, address))
    exp.local_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, exp.local_dir / SEARCH_CONFIG)
    splits.save(exp.local_dir)
    print(f"experiment {name}: results in {exp.local_dir}" + (f" and {exp.uri}" if exp.remote else ""))
    print(f"data: {splits.sizes()} images from {splits.root}")
    started = time.time()
    start_ray(address)
    shapes = cluster.node_shapes()
    cluster.check_fits(cfg, shapes)
    token = exp.mark_storage()
    exp.publish([SEARCH_CONFIG, "split_train.csv", "split_val.csv", "split_test.csv"])
    cluster.check_storage(exp, token, shapes)
    expected = NodeExpectations(exp.uri, token, splits.fingerprint, splits.labels_fingerprint, code_version())
    results = make_tuner(cfg, exp, splits, expected, resume).fit()
    node_failures = [str(r.error) for r in results if r.error and MARK in str(r.error)]
    if node_failures:
        message = node_failures[0][node_failures[0].index(MARK):].splitlines()[0]
        raise InputError(f"{message}\nThe search stopped; fix the node, then continue with --resume --name {name}")
    if unfinished_trials(results):
        raise SearchInterrupted(f"search {name} was interrupted; its state is saved. Continue it with:\n"
                                f"  python -m tuning.search --config CONFIG --resume --name {name}")
    return finish(cfg, exp, results, splits, started)


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

            retrain_only(args.retrain_only, args.address)
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
    except cluster.ClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return cluster.EXIT_CLUSTER


if __name__ == "__main__":
    sys.exit(main())
