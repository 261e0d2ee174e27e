"""Search Xception fine-tuning hyperparameters, retrain the best, report its test MAE, export it.

    python -m tuning.search --config configs/demo.yaml               # CPU demo, ~10 minutes
    python -m tuning.search --config configs/local.yaml              # one GPU, shared by trials
    python -m tuning.search --config configs/cluster.yaml --address auto   # a `ray up` cluster
    python -m tuning.search --config configs/demo.yaml --resume --name demo-20261201-101500
    python -m tuning.search --retrain-only experiments/demo-20261201-101500   # or s3://.../NAME

Ray Tune runs the trials (`tuning.trainable`), Optuna's TPE picks their hyperparameters from
`tune.space` (`tuning.space`) and is told how each trial ended (`tuning.study.verdict`: COMPLETE,
or PRUNED when ASHA, a budget or a divergence stopped it), and ASHA stops the weak ones early on
validation MAE. With `tune.replay.curves` set, trials replay learning curves instead of training
(`tuning.replay`: no TensorFlow, no image preparation, worker processes reused). The
experiment lives in `tune.storage_path` (a folder, a shared file system or s3://; see
`tuning.experiment`), the Optuna study in SQLite inside it (copied into s3:// storage at each of
Ray's experiment snapshots and when the search stops) or at `tune.optuna_storage` (see
`tuning.study`), so a resumed search continues it, on a new head too. `tensorboard --logdir
EXPERIMENT` shows every trial's curves, and `tune.mlflow: true` logs the trials to MLflow too
(`tuning.tracking`). The driver validates the config, the data and the cluster, has every node
prepare the images once (`tuning.prepare`; with s3:// storage, once per cluster: the first node
publishes them, the others fetch), then leaves all TensorFlow work to Ray workers; on a
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


def make_tuner(cfg: SearchConfig, exp: Experiment, splits, expected, resume: bool, prepared_nodes=None):
    from ray import tune

    from tuning.nodecheck import NodeCheckWatch
    from tuning.progress import Limiter, Scheduler, SearchProgress, StudySync
    from tuning.space import parse_space
    from tuning.study import make_searcher
    from tuning.study_storage import fail_running_trials, open_storage, study_key, study_url
    from tuning.tracking import tracking_callbacks

    trainable = tune.with_resources(trial_function(cfg, splits, expected),
                                    {"cpu": cfg.tune.resources.cpu, "gpu": cfg.tune.resources.gpu})
    url = study_url(cfg, exp.local_dir)
    if resume:
        if not tune.Tuner.can_restore(exp.uri):
            raise InputError(f"--resume: no experiment to resume at {exp.uri}")
        failed = fail_running_trials(open_storage(url, study_key(cfg)), exp.name)
        if failed:
            print(f"marked {failed} trial(s) left running in the Optuna study as failed")
        # the scheduler, the budgets and the callbacks come back from the experiment, with the
        # classes of today's code and the state of tuning.progress's search_state.json
        return tune.Tuner.restore(exp.uri, trainable, resume_unfinished=True, resume_errored=True)
    progress = SearchProgress(exp, cfg.tune.time_budget_s, cfg.tune.gpu_hours_budget, cfg.tune.resources.gpu)
    scheduler = Scheduler(progress, max_running=cfg.tune.max_concurrent_trials, time_attr="epoch",
                          max_t=cfg.train.epochs, grace_period=cfg.tune.grace_period,
                          reduction_factor=cfg.tune.reduction_factor, brackets=cfg.tune.brackets)
    searcher = make_searcher(cfg, parse_space(cfg), url, exp.name, METRIC, MODE, exp=exp)
    if cfg.tune.max_concurrent_trials:
        searcher = Limiter(searcher, max_concurrent=cfg.tune.max_concurrent_trials)
    watch = NodeCheckWatch()
    joining = []
    if prepared_nodes is not None:  # nodes joining later prepare (or fetch) as they join
        from tuning.prepare import PrepareOnJoin

        joining = [PrepareOnJoin(cfg, splits, prepared_nodes)]
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=METRIC, mode=MODE, search_alg=searcher, scheduler=scheduler,
            num_samples=cfg.tune.num_samples,
            # a replayed trial has no TensorFlow to set up: it always reuses (benchmark 4 for real ones)
            reuse_actors=cfg.tune.reuse_actors or bool(cfg.tune.replay.curves)),
        run_config=tune.RunConfig(
            name=exp.name, storage_path=exp.storage_path, stop=tune.stopper.CombinedStopper(watch, progress),
            # StudySync last: it copies mlflow.db after the MLflow callback has written a trial's run
            callbacks=[watch, progress] + joining + tracking_callbacks(cfg, exp)
            + ([StudySync(exp, url)] if exp.remote else []),
            # no num_to_keep: with it Ray forces an experiment snapshot (every trial's state, the
            # whole experiment folder uploaded again) whenever a trial has checkpointed that many
            # times, O(trials) per checkpoint; every checkpoint is kept while the search runs and
            # `trim_checkpoints` keeps each trial's last once it has ended (issue 17)
            checkpoint_config=tune.CheckpointConfig(),
            failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures)))


def trial_function(cfg: SearchConfig, splits, expected):
    """The real trial (`tuning.trainable`), or with `tune.replay.curves` set one that replays a
    curve and imports no TensorFlow (`tuning.replay`)."""
    from ray import tune

    replay = cfg.tune.replay.curves
    if not replay:
        from tuning.trainable import run_trial

        return tune.with_parameters(run_trial, base=dataclasses.asdict(cfg), splits=splits, expected=expected)
    from tuning.replay import load_curves, replay_trial

    table = None if replay == "formula" else load_curves(replay, cfg)
    return tune.with_parameters(replay_trial, base=dataclasses.asdict(cfg), table=table)


def trim_checkpoints(results) -> int:
    """Delete every checkpoint but each trial's last (the one a resume, the report and the
    ensemble use), once the search has ended: while it runs Ray keeps them all (see make_tuner),
    as its saved state may name any of them. Returns how many it deleted."""
    deleted = 0
    for result in results:
        last = result.checkpoint.path if result.checkpoint else None
        for checkpoint, _ in result.best_checkpoints or []:
            if checkpoint.path != last:
                try:
                    checkpoint.filesystem.delete_dir(checkpoint.path)
                    deleted += 1
                except FileNotFoundError:  # deleted by an earlier --retrain-only or resume
                    pass
    return deleted


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

    if ray.is_initialized():  # a second search from one Python process (the tests): the same Ray
        return
    quiet = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore"}
    os.environ.update(quiet)  # local workers inherit the driver's environment
    runtime_env = {"env_vars": quiet}
    if address:
        runtime_env["py_modules"] = [str(Path(boneage.__file__).parent), str(Path(tuning.__file__).parent)]
    # "local": a new Ray of our own, never one that `ray start` left running on this machine
    ray.init(address=address or "local", runtime_env=runtime_env, log_to_driver=True,
             include_dashboard=False, configure_logging=False)


def images_here(cfg: SearchConfig, address: str | None) -> bool:
    """Whether the driver checks the images itself: always, except on a cluster whose head
    holds only the label CSV (images staged on the workers: the first node checks them, see
    tuning.prepare.splits_from_a_node). A head that kept only its prepared cache holds them."""
    from boneage.splits import image_dir_here

    if not address or cfg.data.source == "phantom":
        return True
    try:
        image_dir_here(cfg.data, Path(cfg.data.root))
        return True
    except InputError:
        print(f"data: no images under {cfg.data.root} here: checking the labels here, the images on a node")
        return False


def config_changes(saved: SearchConfig, given: SearchConfig) -> list[str]:
    """'key: saved -> given' for every config value that differs."""
    def flat(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict) and key not in ("space", "resources"):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    before, after = dict(flat(dataclasses.asdict(saved))), dict(flat(dataclasses.asdict(given)))
    return [f"{key}: {before.get(key)!r} -> {after.get(key)!r}" for key in sorted(before.keys() | after.keys())
            if before.get(key) != after.get(key)]


def prepare(cfg: SearchConfig, name: str, address: str | None, resume: bool):
    """Everything checked before anything is written: the experiment (new, or the one to
    resume, unchanged), the data, the cluster and the storage. Returns (cfg, exp, splits, shapes)."""
    from boneage.splits import load_splits
    from tuning.progress import STATE_FILE
    from tuning.study_storage import STUDY_DB, open_storage, study_url
    from tuning.tracking import MLFLOW_DB

    resolve_paths(cfg)
    exp = Experiment.create(cfg, name)
    if resume:  # resume exactly what was started; a fresh head fetches it from the storage
        if not exp.fetch(SEARCH_CONFIG):
            raise InputError(f"--resume: no experiment {name} in {cfg.tune.storage_path}")
        saved = load_search_config(exp.local_dir / SEARCH_CONFIG)
        changes = config_changes(saved, cfg)
        if changes:
            raise InputError(f"--resume: the config differs from the one experiment {name} was started with "
                             f"(a resumed search runs what it started):\n  " + "\n  ".join(changes)
                             + "\nResume with the same --config and --set values, or start a new --name.")
        cfg = saved
        exp.fetch(STUDY_DB)  # (a fetch keeps a newer local copy: a search stopped on this head)
        exp.fetch(STATE_FILE)
        if cfg.tune.mlflow and not cfg.tune.mlflow_tracking_uri:
            exp.fetch(MLFLOW_DB)
    elif exp.exists():
        raise InputError(f"experiment {name} already exists in {exp.storage_path}: continue it with --resume, "
                         f"or give another --name")
    exp.check_writable()  # a full disk or a read-only mount, before the data is even read
    if cfg.tune.optuna_storage:
        open_storage(study_url(cfg, exp.local_dir))  # a database server answers before any trial
    if cfg.tune.replay.curves not in ("", "formula"):
        from tuning.replay import load_curves

        load_curves(cfg.tune.replay.curves, cfg)  # a bad curve file is refused before anything is written
    here = images_here(cfg, address)
    splits = load_splits(cfg.data) if here else None  # bad data is refused before Ray starts
    start_ray(address)
    if splits is None:  # a head holding only the label CSV: a node checks the images
        from tuning.prepare import splits_from_a_node

        splits = splits_from_a_node(cfg)
    shapes = cluster.node_shapes()
    cluster.check_fits(cfg, shapes)
    return cfg, exp, splits, shapes


ASSUMED_IMAGES_PER_S = 250.0  # one A10G-class GPU, Xception at 256 px, mixed precision: a planning figure


def expected_trial_epochs(cfg: SearchConfig) -> float:
    """Epochs per trial if ASHA stops all but 1/reduction_factor of the trials at each rung."""
    epochs, rung, survivors, done = 0.0, float(cfg.tune.grace_period), 1.0, 0.0
    while rung < cfg.train.epochs:
        epochs += survivors * (rung - done)
        done, survivors, rung = rung, survivors / cfg.tune.reduction_factor, rung * cfg.tune.reduction_factor
    return epochs + survivors * (cfg.train.epochs - done)


def plan(cfg: SearchConfig, splits, shapes) -> str:
    """What a search would do: trials, trial-epochs, GPU-hours at a stated throughput, caps."""
    t = cfg.tune
    per_trial = expected_trial_epochs(cfg)
    images = len(splits.train) + len(splits.val)  # each epoch trains on train and evaluates val
    seconds_per_epoch = images / ASSUMED_IMAGES_PER_S * (cfg.model.image_size / 256) ** 2
    gpu_hours = t.num_samples * per_trial * seconds_per_epoch * t.resources.gpu / 3600
    gpus, cpus = cluster.retrain_resources(cfg, shapes)
    lines = [
        "dry run: the config, the data, the storage and the cluster are fine; nothing was started.",
        f"  data: {splits.sizes()} images at {cfg.model.image_size} px",
        f"  trials: {t.num_samples}, each on {t.resources.cpu:g} CPU(s) and {t.resources.gpu:g} GPU(s), at most "
        f"{t.max_concurrent_trials or 'as many as fit'} at once; searched: {', '.join(t.space) or 'nothing'}",
        f"  trial-epochs: at most {t.num_samples * cfg.train.epochs}; about {t.num_samples * per_trial:.0f} if ASHA "
        f"stops all but 1/{t.reduction_factor:g} at each rung (grace period {t.grace_period})",
        f"  GPU-hours: about {gpu_hours:.2f} at an assumed {ASSUMED_IMAGES_PER_S:g} images/s per GPU at 256 px "
        f"(scaled by image area), before the retrain" if t.resources.gpu else "  GPU-hours: none (CPU trials)",
        f"  caps: time {t.time_budget_s or 'none'} s, GPU-hours {t.gpu_hours_budget or 'none'}",
        f"  retrain: {'yes' if t.retrain else 'no'}, on {gpus} GPU(s) and {cpus:g} CPU(s) of one node",
        f"  nodes: {cluster.describe(shapes)}",
    ]
    return "\n".join(lines)


def search(cfg: SearchConfig, name: str, address: str | None = None, resume: bool = False,
           dry_run: bool = False) -> dict:
    """Run (or resume) the search, then retrain, test, export and report. Returns the summary.
    A search refused for bad input leaves nothing behind."""
    from boneage.config import save_config
    from tuning.nodecheck import MARK, NodeExpectations, code_version
    from tuning.retrain import finish

    cfg, exp, splits, shapes = prepare(cfg, name, address, resume)
    if dry_run:
        print(plan(cfg, splits, shapes))
        return {}
    started = time.time()
    from tuning.prepare import prepare_on_every_node

    prepared_nodes = None
    if not cfg.tune.replay.curves:  # replayed trials read no images
        prepared_nodes = prepare_on_every_node(cfg, splits)  # a bad image is refused here, before anything is written
    try:
        token = exp.mark_storage()
        cluster.check_storage(exp, token, shapes)
    except InputError:
        if not resume:
            exp.remove()
        raise
    exp.local_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, exp.local_dir / SEARCH_CONFIG)
    splits.save(exp.local_dir)
    exp.publish([SEARCH_CONFIG, "split_train.csv", "split_val.csv", "split_test.csv"])
    print(f"experiment {name}: results in {exp.local_dir}" + (f" and {exp.uri}" if exp.remote else ""))
    print(f"data: {splits.sizes()} images from {splits.root}")
    expected = NodeExpectations(exp.uri, token, splits.fingerprint, code_version())
    results = make_tuner(cfg, exp, splits, expected, resume, prepared_nodes).fit()
    node_failures = [str(r.error) for r in results if r.error and MARK in str(r.error)]
    if node_failures:
        message = node_failures[0][node_failures[0].index(MARK):].splitlines()[0]
        raise InputError(f"{message}\nThe search stopped; fix the node, then continue with --resume --name {name}")
    if unfinished_trials(results):
        raise SearchInterrupted(f"search {name} was interrupted; its state is saved. Continue it with:\n"
                                f"  python -m tuning.search --config CONFIG --resume --name {name}")
    from tuning.study import settle
    from tuning.study_storage import open_storage, study_key, study_url

    settle(open_storage(study_url(cfg, exp.local_dir), study_key(cfg)), exp.name, results, cfg.train.epochs)
    trim_checkpoints(results)
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
                        help="redo the retrain/test/export/report step of a finished search (folder or URI)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config, data, storage and cluster, print the plan, start nothing")
    args = parser.parse_args(argv)
    try:
        if args.retrain_only:
            from tuning.retrain import retrain_only

            retrain_only(args.retrain_only, args.address)
            return 0
        if not args.config:
            raise InputError("--config is required (e.g. --config configs/demo.yaml)")
        cfg = load_search_config(args.config, args.overrides)
        name = args.name or default_name(args, cfg)
        if args.dry_run:
            search(cfg, name, args.address, args.resume, dry_run=True)
        else:
            search(cfg, name, args.address, args.resume)
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
