"""Benchmark 5, search efficiency on the phantom: the demo's search (TPE + ASHA, its points
first) against random search without early stopping and against the notebook's fixed recipe, at
equal budgets of trial-epochs, over several seeds, all through `python -m tuning.search` with the
README demo's settings; and the lab (`tuning.lab`, benchmark 7) against these real runs.

    python benchmarks/search_efficiency.py               # 5 seeds, budget 20: about 50 min on 2 cores
    python benchmarks/search_efficiency.py --small       # 1 seed, budget 10: about 8 minutes
    python benchmarks/search_efficiency.py --work DIR    # keep the searches; a rerun goes on where it stopped

- TPE + ASHA: configs/demo.yaml as it is (its space, points, grace period, reduction factor, its
  num_samples unless the budget needs more trials); its epochs are counted in the order they
  finished and the count is cut at the budget.
- Random search, no early stopping: the same space, every trial a random draw (TPE's start-up
  phase, `n_startup_trials` = all) and ASHA's grace period at `train.epochs` (it never stops one):
  budget / epochs trials.
- The notebook's recipe (Adam at 1e-3, no augmentation, no sex input, the demo's dropout),
  trained budget / epochs times with different seeds: what a fixed recipe buys with the budget.
Each gets the same budget of trial-epochs per seed. Reported: the best validation MAE within
the budget, and the budget at which TPE + ASHA first reaches random search's final best.
Targets: TPE + ASHA at least as good as random search on every seed (issue 15).

The lab against reality (issue 15, item 5): the lab's interquartile mean for the same three
methods ("default", "random", "recipe" on benchmarks/curves/demo-phantom.csv, 2 workers, budget
/ epochs full trials, 30 replays) must fall inside the real runs' min-max.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from record import record, table

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"


def run_search(name: str, storage: Path, overrides: list[str]) -> list[tuple[float, float]]:
    """Run one search (unless --work already holds it finished); return (finish time, validation
    MAE) of every trial-epoch it ran."""
    if (storage / name / "trials.csv").exists():  # finished in an earlier run of this benchmark
        print(f"  {name}: finished earlier, read from {storage / name}", flush=True)
        return read_epochs(storage / name)
    args = [sys.executable, "-m", "tuning.search", "--config", str(DEMO), "--name", name,
            "--set", f"tune.storage_path={storage}", "--set", "tune.retrain=false",
            "--set", "tune.time_budget_s=0"] + [a for o in overrides for a in ("--set", o)]
    started = time.time()
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"})
    if out.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    print(f"  {name}: in {time.time() - started:.0f} s", flush=True)
    return read_epochs(storage / name)


def read_epochs(folder: Path) -> list[tuple[float, float]]:
    epochs = []
    for result in folder.glob("run_trial_*/result.json"):
        for line in result.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                epochs.append((float(row["timestamp"]), float(row["val_mae"])))
    return sorted(epochs)


def best_so_far(epochs, budget: int) -> np.ndarray:
    """Best validation MAE after 1, 2, ... budget trial-epochs (NaN where none was run)."""
    values = np.minimum.accumulate([v for _, v in epochs[:budget]]) if epochs else np.array([])
    return np.concatenate([values, np.full(budget - len(values), np.nan)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=20, help="trial-epochs per method and seed")
    parser.add_argument("--small", action="store_true", help="1 seed, budget 10 (about 8 minutes)")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--work", help="keep the searches here (default: a temporary folder); a rerun with the "
                                       "same folder skips the searches that finished")
    args = parser.parse_args()
    if args.small:
        args.seeds, args.budget = 1, 10
    demo = yaml.safe_load(DEMO.read_text())
    max_t = demo["train"]["epochs"]
    tune = demo["tune"]
    # the demo's own trial count, or enough trials to spend the budget if ASHA stopped every one at its rung
    asha_trials = max(tune["num_samples"], -(-args.budget // tune["grace_period"]))
    curves = {"TPE + ASHA": [], "random, no early stopping": [], "notebook recipe": []}
    with tempfile.TemporaryDirectory() as tmp:
        storage = Path(args.work or tmp)
        storage.mkdir(parents=True, exist_ok=True)
        for seed in range(args.seeds):
            print(f"seed {seed}", flush=True)
            common = [f"tune.seed={seed}", f"train.seed={seed}", "tune.max_concurrent_trials=2"]
            curves["TPE + ASHA"].append(best_so_far(run_search(f"tpe-asha-{seed}", storage, common + [
                f"tune.num_samples={asha_trials}"]), args.budget))
            n = max(1, args.budget // max_t)
            curves["random, no early stopping"].append(best_so_far(run_search(f"random-{seed}", storage, common + [
                f"tune.num_samples={n}", f"tune.n_startup_trials={n}", f"tune.grace_period={max_t}",
                "tune.points_to_evaluate=[]"]), args.budget))
            curves["notebook recipe"].append(best_so_far(run_search(f"recipe-{seed}", storage, common + [
                f"tune.num_samples={n}", f"tune.n_startup_trials={n}", f"tune.grace_period={max_t}",
                "train.learning_rate=1.0e-3", "train.augment_strength=0.0", "model.use_sex=false",
                "tune.space={seed: {int: [0, 100000]}}", "tune.points_to_evaluate=[]"]), args.budget))
    final = {k: np.array([c[-1] if not np.isnan(c[-1]) else np.nanmin(c) for c in v]) for k, v in curves.items()}
    tpe, random = np.array(curves["TPE + ASHA"]), final["random, no early stopping"]
    reach = []
    for curve, target in zip(tpe, random):
        hit = np.where(curve <= target)[0]
        reach.append(int(hit[0]) + 1 if len(hit) else None)
    rows = [[name, *[float(x) for x in values], float(values.mean())] for name, values in final.items()]
    reached = [r for r in reach if r is not None]
    every_seed = bool(np.all(final["TPE + ASHA"] <= final["random, no early stopping"]))
    half = len(reached) == len(reach) and max(reached) <= args.budget / 2
    plot(curves, args.budget, ROOT / "benchmarks" / "search_efficiency.png")
    body = "\n".join([
        f"configs/demo.yaml's settings ({max_t} epochs per trial at most), budget {args.budget} trial-epochs per "
        f"method and seed, {args.seeds} seed(s){' (--small)' if args.small else ''}. Best validation MAE "
        f"(months) within the budget:", "",
        table(["method", *[f"seed {s}" for s in range(args.seeds)], "mean"], rows), "",
        f"TPE + ASHA reached random search's final best after "
        f"{', '.join('never' if r is None else f'{r}' for r in reach)} of {args.budget} trial-epochs.", "",
        f"TPE + ASHA at least as good as random search on every seed: **{'yes' if every_seed else 'no'}**; "
        f"random's final best within half the budget: **{'yes' if half else 'no'}**. Best-so-far curves: "
        f"`benchmarks/search_efficiency.png`."])
    body += "\n\n" + lab_against_reality(final, args.budget / max_t)
    print(body)
    if not args.no_record:
        record(5, "Search efficiency on the phantom", "python benchmarks/search_efficiency.py"
               + (" --small" if args.small else ""), body)


LAB_NAMES = {"TPE + ASHA": "default", "random, no early stopping": "random", "notebook recipe": "recipe"}


def lab_against_reality(final: dict, budget: float) -> str:
    """The lab's IQM (30 replays of the demo's recorded curves, 2 workers) for each method beside
    the real runs' min-max at the same budget."""
    import optuna

    from tuning.config import load_search_config
    from tuning.curves import read_curves
    from tuning.lab import make_methods, run_lab, summarize
    from tuning.simulator import Surrogate
    from tuning.space import parse_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = load_search_config(DEMO)
    lab = Surrogate(read_curves(ROOT / "benchmarks" / "curves" / "demo-phantom.csv"), parse_space(cfg), cfg.train.epochs)
    methods = [m for m in make_methods(cfg, lab.recipe) if m.name in LAB_NAMES.values()]
    rows = summarize(run_lab(cfg, lab, methods, 30, [2], [budget], report=lambda m: None), [2], [budget])
    lab_iqm = {r["method"]: r["iqm"] for r in rows}
    table_rows, inside = [], []
    for name, values in final.items():
        value = lab_iqm[LAB_NAMES[name]]
        inside.append(values.min() <= value <= values.max())
        table_rows.append([name, LAB_NAMES[name], f"{value:.1f}", f"{values.min():.1f}-{values.max():.1f}",
                           "yes" if inside[-1] else "**no**"])
    return "\n".join([f"The lab against these runs (benchmarks/curves/demo-phantom.csv, 2 workers, {budget:g} full "
                      f"trials, IQM of 30 replays):", "",
                      table(["method", "lab method", "lab IQM", "real min-max", "inside"], table_rows), "",
                      f"The lab inside the real runs' range for every method: **{'yes' if all(inside) else 'no'}**."])


def plot(curves, budget, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, runs), color in zip(curves.items(), ("C0", "C1", "C2")):
        for i, curve in enumerate(runs):
            ax.plot(np.arange(1, budget + 1), curve, color=color, alpha=0.8, label=name if i == 0 else None)
    ax.set(xlabel="trial-epochs spent", ylabel="best validation MAE so far (months)",
           title="Search efficiency on the phantom (one line per seed)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
