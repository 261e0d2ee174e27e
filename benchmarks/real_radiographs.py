"""Benchmark 6, real radiographs (report only, never a CI gate): a small search then retrain
against the notebook's recipe on rsna-100px, with equal wall-clock budgets, side by side in one
run: validation MAE per epoch beside the mean predictor, and the test MAE of each final model.

    BONEAGE_RSNA_100PX=/path/to/rsna-100px python benchmarks/real_radiographs.py   # about an hour on 2 cores
    BONEAGE_RSNA_100PX=/path/to/rsna-100px python benchmarks/real_radiographs.py --small   # about 15 minutes

Both arms: the same seeded subsample and split (70/15/15), Xception from scratch (no ImageNet
weights offline) at 96 px. The search: `python -m tuning.search` (TPE + ASHA over learning
rate, augmentation, dropout; the recipe as its first point) for `--search-minutes`, then its
retrain of the best on train + validation. The recipe (Adam 1e-3, no augmentation, no sex
input, plateau schedule) trains for as long as the search arm took in all, at least 5 epochs.
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


def search_arm(cfg: dict, tmp: Path, minutes: float) -> dict:
    from tuning.trials_csv import read_trials_csv

    cfg = {**cfg, "tune": {
        "storage_path": str(tmp / "experiments"), "num_samples": 40, "max_concurrent_trials": 2,
        "n_startup_trials": 3, "grace_period": 2, "reduction_factor": 3, "time_budget_s": 60 * minutes,
        "resources": {"cpu": 1, "gpu": 0},
        "space": {"learning_rate": {"loguniform": [1.0e-4, 3.0e-3]}, "augment_strength": {"uniform": [0.0, 0.5]},
                  "dropout": {"uniform": [0.0, 0.4]}},
        "points_to_evaluate": [{"learning_rate": 1.0e-3, "augment_strength": 0.0, "dropout": 0.2}]}}
    path = tmp / "search.yaml"
    path.write_text(yaml.safe_dump(cfg))
    started = time.time()
    out = subprocess.run([sys.executable, "-m", "tuning.search", "--config", str(path), "--name", "real"],
                         capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"})
    if out.returncode:
        sys.exit(out.stdout[-3000:] + out.stderr[-3000:])
    experiment = tmp / "experiments" / "real"
    trials = read_trials_csv(experiment / "trials.csv")
    best = trials.loc[trials["best_val_mae"].idxmin()]
    return {"wall": time.time() - started, "curve": best["val_mae_per_epoch"],
            "trials": len(trials), "test": json.loads((experiment / "test_metrics.json").read_text()),
            "best": {k[6:]: (best[k].item() if hasattr(best[k], "item") else best[k]) for k in trials.columns if k.startswith("param.")}}


def recipe_arm(cfg: dict, seconds: float, min_epochs: int) -> dict:
    import keras

    from boneage.config import Config, from_dict
    from boneage.evaluate import evaluate
    from boneage.splits import load_splits
    from boneage.train import train

    cfg = from_dict(Config, cfg)
    cfg.model.use_sex, cfg.train.learning_rate, cfg.train.augment_strength = False, 1.0e-3, 0.0
    cfg.train.schedule, cfg.train.epochs, cfg.train.early_stopping_patience = "plateau", 1000, 0
    started = time.time()

    class WallClock(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 >= min_epochs and time.time() - started > seconds:
                self.model.stop_training = True

    splits = load_splits(cfg.data, report=lambda m: None)
    metrics, model = train(cfg, splits, callbacks=[WallClock()])
    test = evaluate(model, splits.test, metrics["age_mean"], cfg.train.batch_size)
    mean = float(np.abs(splits.val["boneage"] - splits.train["boneage"].mean()).mean())
    return {"wall": time.time() - started, "curve": metrics["history"]["val_mae"], "test": test, "mean_val": mean}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="seeded subsample of the 12,611")
    parser.add_argument("--search-minutes", type=float, default=20.0)
    parser.add_argument("--small", action="store_true", help="600 images, a 4-minute search")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if args.small:
        args.images, args.search_minutes = 600, 4.0
    root = os.environ.get("BONEAGE_RSNA_100PX")
    if not root:
        sys.exit("set BONEAGE_RSNA_100PX to the rsna-100px folder")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = {"data": {"source": "rsna", "root": root, "max_images": args.images, "val_fraction": 0.15,
                        "test_fraction": 0.15, "prepared_dir": str(tmp / "prepared")},
               "model": {"image_size": 96, "weights": "none"},
               "train": {"epochs": 6, "batch_size": 16, "loss": "mae", "schedule": "cosine",
                         "early_stopping_patience": 0, "verbose": 0}}
        print("search arm ...", flush=True)
        searched = search_arm(cfg, tmp, args.search_minutes)
        print(f"  {searched['wall']:.0f} s; recipe arm for as long ...", flush=True)
        recipe = recipe_arm(cfg, searched["wall"], min_epochs=5)
    epochs = max(len(recipe["curve"]), len(searched["curve"]))
    cell = lambda curve, i: float(curve[i]) if i < len(curve) else "-"  # noqa: E731
    rows = [[i + 1, cell(recipe["curve"], i), cell(searched["curve"], i), recipe["mean_val"]] for i in range(epochs)]
    plot(recipe, searched, ROOT / "benchmarks" / "real_radiographs.png")
    body = "\n".join([
        f"rsna-100px, {args.images} images (70/15/15), 96 px, from scratch; search {args.search_minutes:g} min "
        f"({searched['trials']} trials, best {searched['best']}) then retrain: {searched['wall']:.0f} s in all; "
        f"recipe: {recipe['wall']:.0f} s.{' (--small)' if args.small else ''}", "",
        table(["epoch", "recipe val MAE", "search's best trial val MAE", "mean predictor"], rows), "",
        table(["final model", "test MAE (months)", "95% CI", "mean predictor"], [
            ["notebook recipe", recipe["test"]["mae"], "{:.1f}-{:.1f}".format(*recipe["test"]["mae_ci95"]),
             recipe["test"]["mean_predictor_mae"]],
            ["search + retrain", searched["test"]["mae"], "{:.1f}-{:.1f}".format(*searched["test"]["mae_ci95"]),
             searched["test"]["mean_predictor_mae"]]]), "",
        "Curves: `benchmarks/real_radiographs.png`. Report only: not a target."])
    print(body)
    if not args.no_record:
        record(6, "Real radiographs: search + retrain vs the notebook's recipe",
               "python benchmarks/real_radiographs.py" + (" --small" if args.small else ""), body)


def plot(recipe, searched, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(np.arange(1, len(recipe["curve"]) + 1), recipe["curve"], "o-", label="notebook recipe")
    ax.plot(np.arange(1, len(searched["curve"]) + 1), searched["curve"], "o-", label="search's best trial")
    ax.axhline(recipe["mean_val"], color="grey", ls="--", label="mean predictor")
    ax.set(xlabel="epoch", ylabel="validation MAE (months)", title="rsna-100px, equal wall-clock budget")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
