"""Recorded learning curves: the table the lab (`tuning.lab`) replays searches against.

    python -m tuning.curves record --config configs/demo.yaml --n 64 --seeds 1 --out curves.csv
    python -m tuning.curves harvest experiments/demo-20261201-101500 ... --out curves.csv

`record` trains, each to `train.epochs` with early stopping off, N configurations drawn by a
scrambled Sobol design (seed `--design-seed`) over `tune.space` (a log range is drawn in log
space), the config's `points_to_evaluate`, and the recipe (the config's own values, no space
applied) with `--recipe-seeds` seeds (default 5) to measure the seed noise. They run through the
real trial code, `tuning.trainable.run_trial` under Ray Tune with no scheduler: a trial's
start-up (a fresh worker process, TensorFlow's import, the model build, the node check) is part
of what a search pays for and exists only on that path; `boneage.train.train` called directly
would share one warm process and hide it. Each finished (config_id, seed) is written at once
(the whole table rewritten through a temp file), so a killed recording keeps every finished
trial and the next run skips it; a trial that crashed is run again.

`harvest` turns the trials of finished searches that ran to `train.epochs` (their trials.csv,
and each trial's result.json for the seconds) into the same rows, so a first search feeds the lab.

The table, one row per trial and epoch: config_id, seed, epoch, val_mae, seconds (since the
trial started, start-up included), one column per `tune.space` parameter, and startup_s (the
trial's start-up: its first report's seconds less a typical epoch). A column rather than a
header comment: it is measured per trial, and every CSV tool keeps it.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from ray import tune

from boneage.config import write_atomic
from boneage.errors import EXIT_BAD_INPUT, InputError

FIXED = ["config_id", "seed", "epoch", "val_mae", "seconds"]
STARTUP = "startup_s"
RECIPE = "recipe"


# --- the table ------------------------------------------------------------------------------

def read_curves(path) -> pd.DataFrame:
    """The table at `path`; InputError naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such curve table")
    try:
        table = pd.read_csv(path, dtype={"config_id": str}, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not a curve table ({err})") from None
    missing = [c for c in [*FIXED, STARTUP] if c not in table]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} (expected {', '.join(FIXED)}, "
                         f"one per hyperparameter, {STARTUP})")
    for column in ("seed", "epoch", "val_mae", "seconds"):
        values = pd.to_numeric(table[column], errors="coerce")
        bad = table.index[values.isna()]
        if len(bad):
            raise InputError(f"{path}: row {bad[0] + 2}: {column} {table[column][bad[0]]!r} is not a number")
        table[column] = values
    table["seed"], table["epoch"] = table["seed"].astype(int), table["epoch"].astype(int)
    return table


def param_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table if c not in (*FIXED, STARTUP)]


def write_curves(table: pd.DataFrame, path) -> None:
    columns = [*FIXED, *param_columns(table), STARTUP]
    table = table.sort_values(["config_id", "seed", "epoch"], kind="stable")[columns]
    write_atomic(path, table.to_csv(index=False, float_format="%.6g"))


def trial_rows(config_id, seed, params: dict, val_mae, seconds, startup_s: float) -> pd.DataFrame:
    rows = [{"config_id": config_id, "seed": int(seed), "epoch": e + 1, "val_mae": float(v),
             "seconds": float(s), **params, STARTUP: float(startup_s)}
            for e, (v, s) in enumerate(zip(val_mae, seconds))]
    return pd.DataFrame(rows)


def startup_of(seconds) -> float:
    """Start-up: the first report's seconds less a typical (median later) epoch."""
    seconds = np.asarray(seconds, float)
    if len(seconds) < 2:
        return math.nan
    return max(0.0, float(seconds[0] - np.median(np.diff(seconds))))


# --- record ---------------------------------------------------------------------------------

def unit_to_value(distribution, u: float):
    """A point of [0, 1) onto an Optuna distribution (log ranges in log space)."""
    import optuna.distributions as od

    if isinstance(distribution, od.CategoricalDistribution):
        return distribution.choices[min(int(u * len(distribution.choices)), len(distribution.choices) - 1)]
    low, high = distribution.low, distribution.high
    if isinstance(distribution, od.IntDistribution):
        low, high = low, high + 1  # every integer its equal share
    value = math.exp(math.log(low) + u * (math.log(high) - math.log(low))) if distribution.log else low + u * (high - low)
    if isinstance(distribution, od.IntDistribution):
        return int(min(math.floor(value), distribution.high))
    return float(value)


def design(cfg, n: int, seeds: int, recipe_seeds: int, design_seed: int = 0) -> list[dict]:
    """[{config_id, seed, params}]: the recipe's seeds, points_to_evaluate, then N Sobol points."""
    from scipy.stats import qmc

    from tuning.space import config_key, parse_space

    space = parse_space(cfg)
    recipe = {}
    for name in space:
        section, _, key = config_key(cfg, name).partition(".")
        recipe[name] = getattr(getattr(cfg, section), key)
    base = cfg.train.seed
    jobs = [{"config_id": RECIPE, "seed": base + s, "params": recipe} for s in range(recipe_seeds)]
    points = [("point%d" % i, dict(p)) for i, p in enumerate(cfg.tune.points_to_evaluate)]
    if n and space:
        with warnings.catch_warnings():  # Sobol prefers powers of two; any prefix is still balanced
            warnings.simplefilter("ignore")
            units = qmc.Sobol(len(space), scramble=True, seed=design_seed).random(n)
        points += [("q%03d" % i, {name: unit_to_value(d, u) for (name, d), u in zip(space.items(), row)})
                   for i, row in enumerate(units)]
    for config_id, params in points:
        jobs += [{"config_id": config_id, "seed": base + s, "params": params} for s in range(seeds)]
    return jobs


def check_same_design(table: pd.DataFrame, jobs: list[dict], path) -> None:
    """A resumed table must hold the configurations this design names, else it mixes two designs."""
    names = param_columns(table)
    wanted = {j["config_id"]: j["params"] for j in jobs}
    if set(names) != set(next(iter(wanted.values()), {})):
        raise InputError(f"{path}: its hyperparameter columns ({', '.join(names)}) are not the config's "
                         f"tune.space ({', '.join(next(iter(wanted.values()), {}))}); record into a new --out")
    for config_id, row in table.drop_duplicates("config_id").set_index("config_id").iterrows():
        params = wanted.get(config_id)
        if params is None:
            continue
        if any(str(row[k]) != str(v) and not _close(row[k], v) for k, v in params.items()):
            raise InputError(f"{path}: {config_id} was recorded with other values than this design's "
                             f"({dict(row[names])} vs {params}): same --config and --design-seed, or a new --out")


def _close(a, b) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-5)
    except (TypeError, ValueError):
        return False


def recorded_trial(config: dict, base: dict, splits, expected) -> None:
    """`run_trial` with the bookkeeping keys taken out of the trial's config."""
    from tuning.trainable import run_trial

    job = config["job"]
    params = {k: v for k, v in job.items() if k not in ("config_id", "seed")}
    params["train.seed"] = job["seed"]
    run_trial(params, base, splits, expected)


def record(cfg, out, n: int, seeds: int = 1, recipe_seeds: int = 5, design_seed: int = 0, name: str | None = None):
    """Record what is missing from `out`; returns the number of trials run in this call."""
    import ray

    from tuning.nodecheck import NodeExpectations, code_version
    from tuning.prepare import prepare_on_every_node
    from tuning.search import prepare

    out = Path(out)
    jobs = design(cfg, n, seeds, recipe_seeds, design_seed)
    table = read_curves(out) if out.exists() else pd.DataFrame(columns=[*FIXED, *jobs[0]["params"], STARTUP])
    check_same_design(table, jobs, out)
    done = set(zip(table["config_id"], table["seed"].astype(int)))
    todo = [j for j in jobs if (j["config_id"], j["seed"]) not in done]
    print(f"record: {len(jobs)} trials in the design, {len(jobs) - len(todo)} already in {out}, {len(todo)} to run",
          flush=True)
    if not todo:
        return 0
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, early_stopping_patience=0))
    name = name or f"curves-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    cfg, exp, splits, _ = prepare(cfg, name, None, False)
    prepare_on_every_node(cfg, splits)
    exp.local_dir.mkdir(parents=True, exist_ok=True)
    expected = NodeExpectations(exp.uri, exp.mark_storage(), splits.fingerprint, code_version())
    recorder = Recorder(out, table, len(todo), cfg.train.epochs)
    trainable = tune.with_resources(
        tune.with_parameters(recorded_trial, base=dataclasses.asdict(cfg), splits=splits, expected=expected),
        {"cpu": cfg.tune.resources.cpu, "gpu": cfg.tune.resources.gpu})
    points = [{"config_id": j["config_id"], "seed": j["seed"], **j["params"]} for j in todo]
    print(f"record: trials run in experiment {exp.local_dir} (Ray's files; the table is {out})", flush=True)
    try:
        tune.Tuner(trainable, param_space={"job": tune.grid_search(points)},
                   tune_config=tune.TuneConfig(max_concurrent_trials=cfg.tune.max_concurrent_trials or None,
                                               reuse_actors=False),
                   run_config=tune.RunConfig(name=exp.name, storage_path=exp.storage_path, callbacks=[recorder],
                                             checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=0)).fit()
    finally:
        ray.shutdown()
    return recorder.finished


class Recorder(tune.Callback):
    """On the driver: times each trial from its start, and writes its rows into the table when it
    finishes, through a temp file. A diverged trial (it stops at its first non-finite epoch) is
    a whole curve: inf up to train.epochs, as a search would see it."""

    def __init__(self, out, table, total, epochs):
        self.out, self.table, self.total, self.epochs = Path(out), table, total, epochs
        self.started, self.curves, self.finished = {}, {}, 0

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started[trial.trial_id] = time.time()
        self.curves[trial.trial_id] = []

    def on_trial_result(self, iteration, trials, trial, result, **info):
        seconds = time.time() - self.started.get(trial.trial_id, time.time())
        self.curves[trial.trial_id].append((float(result["val_mae"]), seconds))

    def on_trial_complete(self, iteration, trials, trial, **info):
        curve, config = self.curves.get(trial.trial_id, []), trial.config["job"]
        diverged = any(math.isinf(v) for v, _ in curve)
        if not curve or (len(curve) < self.epochs and not diverged):
            print(f"record: {config['config_id']} seed {config['seed']} ended after {len(curve)} of "
                  f"{self.epochs} epochs: not recorded", flush=True)
            return
        values, seconds = map(list, zip(*curve))
        startup = startup_of(seconds)
        values += [math.inf] * (self.epochs - len(values))
        seconds += [seconds[-1]] * (self.epochs - len(seconds))
        params = {k: v for k, v in config.items() if k not in ("config_id", "seed")}
        rows = trial_rows(config["config_id"], config["seed"], params, values, seconds, startup)
        self.table = pd.concat([self.table, rows], ignore_index=True) if len(self.table) else rows
        write_curves(self.table, self.out)
        self.finished += 1
        print(f"record: {self.finished}/{self.total} {config['config_id']} seed {config['seed']}: best val MAE "
              f"{min(values):.2f} in {seconds[-1]:.0f} s (start-up {startup:.1f} s)", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        job = trial.config["job"]
        print(f"record: {job['config_id']} seed {job['seed']} failed: not recorded, "
              f"run again next time", flush=True)


# --- harvest --------------------------------------------------------------------------------

def harvest(experiments) -> pd.DataFrame:
    """The rows of every trial of these finished searches that ran to `train.epochs`."""
    from tuning.config import load_search_config
    from tuning.experiment import SEARCH_CONFIG
    from tuning.trials_csv import LIST_COLUMN, PARAM, read_trials_csv

    tables = []
    for folder in map(Path, experiments):
        if not (folder / "trials.csv").is_file() or not (folder / SEARCH_CONFIG).is_file():
            raise InputError(f"{folder}: not a finished search (needs trials.csv and {SEARCH_CONFIG})")
        cfg = load_search_config(folder / SEARCH_CONFIG)
        trials = read_trials_csv(folder / "trials.csv")
        needed = ["trial_id", "epochs", "time_s", LIST_COLUMN, *(PARAM + k for k in cfg.tune.space)]
        missing = [c for c in needed if c not in trials]
        if missing:
            raise InputError(f"{folder / 'trials.csv'}: missing column(s) {', '.join(missing)}")
        timings = _result_seconds(folder)
        for _, trial in trials.iterrows():
            curve = trial[LIST_COLUMN]
            if len(curve) < cfg.train.epochs:
                continue  # stopped early, cut by a budget or failed: not a whole curve
            curve = curve[:cfg.train.epochs]
            seconds = timings.get(trial["trial_id"]) or list(np.arange(1, len(curve) + 1) * trial["time_s"] / len(curve))
            params = {k: trial[PARAM + k] for k in cfg.tune.space}
            tables.append(trial_rows(f"{folder.name}:{trial['trial_id']}", cfg.train.seed, params, curve,
                                     seconds[:len(curve)], startup_of(seconds)))
    if not tables:
        raise InputError("harvest: no trial of these searches ran to train.epochs")
    return pd.concat(tables, ignore_index=True)


def _result_seconds(folder: Path) -> dict:
    """{trial_id: [time_total_s per epoch]} from the trials' result.json files, where present."""
    import json

    seconds = {}
    for path in folder.glob("*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows and "trial_id" in rows[0]:
            seconds[rows[0]["trial_id"]] = [float(r.get("time_total_s", math.nan)) for r in rows]
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuning.curves", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("record", help="train a design of configurations to train.epochs")
    rec.add_argument("--config", required=True)
    rec.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    rec.add_argument("--n", type=int, default=64, help="Sobol configurations (besides points and the recipe)")
    rec.add_argument("--seeds", type=int, default=1, help="seeds of each configuration")
    rec.add_argument("--recipe-seeds", type=int, default=5, help="seeds of the recipe (the seed noise)")
    rec.add_argument("--design-seed", type=int, default=0)
    rec.add_argument("--out", required=True)
    har = commands.add_parser("harvest", help="whole curves of finished searches")
    har.add_argument("experiments", nargs="+")
    har.add_argument("--out", required=True)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        return int(exit.code or 0) and EXIT_BAD_INPUT
    try:
        if args.command == "record":
            from tuning.config import load_search_config

            if min(args.n, args.seeds, args.recipe_seeds) < 0:
                raise InputError("--n, --seeds and --recipe-seeds must be 0 or more")
            record(load_search_config(args.config, args.overrides), args.out, args.n, args.seeds,
                   args.recipe_seeds, args.design_seed)
        else:
            table = harvest(args.experiments)
            write_curves(table, args.out)
            print(f"harvest: {table.groupby(['config_id', 'seed']).ngroups} whole curves into {args.out}")
        return 0
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
