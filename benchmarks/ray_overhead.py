"""Benchmark 4, Ray overhead: the same N trials of about a minute each run through
`python -m tuning.search` (Ray Tune, a fresh worker process per trial, a checkpoint per epoch)
and one after another in one process with `boneage.train.train` and no Ray, side by side in one
run; the wall-time ratio, and what a trial's start-up costs (process, TensorFlow import, model
build, data ready). A third run is the search with `tune.reuse_actors: true` (a trial may run in
the process of an ended one): its wall time beside the others, the processes it used and each
trial's peak resident memory in its process (sampled from /proc), to decide `reuse_actors`.

    python benchmarks/ray_overhead.py [--trials 4 --images 1000 --epochs 2]

Both run the same configurations (fixed learning rates, all epochs: the search's ASHA cannot
stop a trial before `train.epochs`), one trial at a time with every CPU, on a phantom set whose
images were prepared beforehand (both read the same cache). Ray's time is the search's own
(Ray start-up, every trial and checkpoint; not the config check before it nor the report after
it); the plain loop's is its whole process, TensorFlow's import included. Target: <= 1.15.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from record import record, table

RATES = [1.0e-3, 5.0e-4, 2.0e-3, 3.0e-4, 1.5e-3, 7.0e-4, 2.5e-3, 4.0e-4]

STARTUP = r"""
import json, sys, time
t0 = time.perf_counter()
import tensorflow as tf
t1 = time.perf_counter()
from boneage.config import load_config
from boneage.model import build_model
from boneage.pipeline import make_dataset
from boneage.prepare import ensure_prepared
from boneage.splits import load_splits
cfg = load_config(sys.argv[1])
splits = load_splits(cfg.data, report=lambda m: None)
t2 = time.perf_counter()
model = build_model(cfg.model.image_size, "none")
t3 = time.perf_counter()
images = ensure_prepared(splits.all(), cfg.model.image_size, cfg.data.prepared_dir, report=lambda m: None)
next(iter(make_dataset(splits.train, cfg.model.image_size, cfg.train.batch_size, True, prepared=images)))
t4 = time.perf_counter()
print(json.dumps({"import TensorFlow": t1 - t0, "import boneage, read splits": t2 - t1,
                  "build the model": t3 - t2, "data ready (open cache, first batch)": t4 - t3}))
"""

PLAIN = r"""
import json, sys, time
started = float(sys.argv[2])
import keras
from boneage.config import load_config
from boneage.splits import load_splits
from boneage.train import train
from tuning.config import SearchConfig
from tuning.space import apply_params
cfg = load_config(sys.argv[1], config_class=SearchConfig)
splits = load_splits(cfg.data, report=lambda m: None)
seconds = []
for point in cfg.tune.points_to_evaluate:
    t = time.time()
    keras.backend.clear_session()
    train(apply_params(cfg, point), splits)
    seconds.append(time.time() - t)
print(json.dumps({"wall": time.time() - started, "trials": seconds}))
"""


class TrialMemory(threading.Thread):
    """Samples the resident memory of every Ray trial process (titled `ray::ImplicitFunc...`)
    four times a second: {pid: [(time, MiB), ...]}."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: dict[int, list] = {}
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(0.25):
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    if not (entry / "cmdline").read_bytes().startswith(b"ray::ImplicitFunc"):
                        continue
                    status = (entry / "status").read_text()
                except OSError:
                    continue
                rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
                self.samples.setdefault(int(entry.name), []).append((time.time(), rss / 1024))

    def per_trial(self, experiment: Path) -> list[tuple]:
        """(trial, pid, its place in the process: 1 = first, peak MiB while it ran), by start."""
        spans = []
        for path in experiment.glob("run_trial_*/result.json"):
            results = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            start = results[0]["timestamp"] - results[0]["time_total_s"] - 1  # whole seconds
            spans.append((start, results[-1]["timestamp"] + 1, results[0]["trial_id"], results[0]["pid"]))
        rows, seen = [], {}
        for start, end, trial, pid in sorted(spans):
            seen[pid] = seen.get(pid, 0) + 1
            peak = max((mib for t, mib in self.samples.get(pid, []) if start <= t <= end), default=float("nan"))
            rows.append((trial, pid, seen[pid], peak))
        return rows


def search(config: Path, name: str, env: dict, *overrides: str) -> tuple[dict, "object", list]:
    """`python -m tuning.search` with the trial processes' memory sampled: (summary, trials.csv, per trial)."""
    import pandas as pd

    memory = TrialMemory()
    memory.start()
    out = subprocess.run([sys.executable, "-m", "tuning.search", "--config", str(config), "--name", name,
                          *[a for o in overrides for a in ("--set", o)]], env=env, capture_output=True, text=True)
    memory.done.set()
    if out.returncode:
        sys.exit(out.stdout[-3000:] + out.stderr[-3000:])
    experiment = config.parent / "experiments" / name
    return (json.loads((experiment / "summary.json").read_text()), pd.read_csv(experiment / "trials.csv"),
            memory.per_trial(experiment))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--images", type=int, default=1000, help="phantom images (70%% train, 15%% val)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--size", type=int, default=72)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        points = [{"learning_rate": lr} for lr in RATES[:args.trials]]
        cfg = {
            "data": {"source": "phantom", "root": str(tmp / "phantom"), "phantom_n": args.images,
                     "val_fraction": 0.15, "test_fraction": 0.15, "prepared_dir": str(tmp / "prepared")},
            "model": {"image_size": args.size, "weights": "none"},
            "train": {"epochs": args.epochs, "batch_size": 16, "loss": "mse", "schedule": "cosine",
                      "early_stopping_patience": 0, "verbose": 0,
                      "intra_op_threads": cpus, "inter_op_threads": min(2, cpus)},
            "tune": {"storage_path": str(tmp / "experiments"), "num_samples": args.trials,
                     "max_concurrent_trials": 1, "grace_period": args.epochs, "retrain": False,
                     "resources": {"cpu": cpus, "gpu": 0}, "n_startup_trials": args.trials,
                     "space": {"learning_rate": {"loguniform": [1.0e-4, 1.0e-2]}}, "points_to_evaluate": points},
        }
        config = tmp / "search.yaml"
        config.write_text(yaml.safe_dump(cfg))
        train_config = tmp / "train.yaml"
        train_config.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "tune"}))
        subprocess.run([sys.executable, "-m", "boneage", "prepare", "--config", str(config)],
                       check=True, env=env, capture_output=True)  # both read the same, ready cache

        started = time.time()
        out = subprocess.run([sys.executable, "-c", PLAIN, str(config), str(started)], env=env,
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        plain = json.loads(out.stdout.strip().splitlines()[-1])

        summary, trials, fresh = search(config, "ray", env)
        reused_summary, reused_trials, reused = search(config, "ray-reuse", env, "tune.reuse_actors=true")

        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
        interpreter = time.perf_counter() - started
        out = subprocess.run([sys.executable, "-c", STARTUP, str(train_config)], env=env,
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        startup = {"start a Python process": interpreter, **json.loads(out.stdout.strip().splitlines()[-1])}

    ray_wall, plain_wall, reuse_wall = summary["search_time_s"], plain["wall"], reused_summary["search_time_s"]
    ratio = ray_wall / plain_wall
    per_trial = (ray_wall - plain_wall) / args.trials
    rows = [["one process, no Ray (boneage.train.train in a loop)", plain_wall, plain_wall / args.trials, 1.0],
            ["tuning.search (Ray Tune, ASHA never stopping)", ray_wall, ray_wall / args.trials, ratio],
            ["the same with tune.reuse_actors: true", reuse_wall, reuse_wall / args.trials, reuse_wall / plain_wall]]
    processes = len({pid for _, pid, _, _ in reused})
    memory_rows = [[i + 1, a[2], a[3], b[2], b[3]] for i, (a, b) in enumerate(zip(fresh, reused))]
    body = "\n".join([
        f"{args.trials} trials, {args.epochs} epochs each, {round(0.7 * args.images)} phantom training images at "
        f"{args.size} px, one trial at a time on {cpus} CPUs. Trial times in Ray (Tune's own count, from the "
        f"trainable's start): {', '.join(f'{s:.0f}' for s in trials['time_s'])} s; in the plain loop: "
        f"{', '.join(f'{s:.0f}' for s in plain['trials'])} s; with reused processes: "
        f"{', '.join(f'{s:.0f}' for s in reused_trials['time_s'])} s.", "",
        table(["run", "wall seconds", "seconds per trial", "x plain"], rows), "",
        f"Ray vs plain: **{ratio:.2f}x** (target 1.15: {'met' if ratio <= 1.15 else 'missed'}), "
        f"{per_trial:.1f} s more per trial. Reusing processes saves {(ray_wall - reuse_wall) / args.trials:.1f} s per "
        f"trial against a fresh process each; {processes} process(es) ran the {args.trials} trials.", "",
        "Each trial's peak resident memory in its process (sampled four times a second; the place "
        "is the trial's turn in its process, 1 = a fresh process):", "",
        table(["trial", "fresh: place", "fresh: peak MiB", "reused: place", "reused: peak MiB"], memory_rows), "",
        "What a fresh trial process pays before its first step (measured in a fresh process):", "",
        table(["start-up step", "seconds"], [[k, v] for k, v in startup.items()])])
    print(body)
    if not args.no_record:
        record(4, "Ray overhead", "python benchmarks/ray_overhead.py", body)


if __name__ == "__main__":
    main()
