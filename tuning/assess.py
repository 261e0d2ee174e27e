"""After the retrain: prediction intervals, single vs ensemble vs TTA, the worst cases explained.

    rest, calibration = split_calibration(splits.val, cfg.tune.calibration_fraction, seed)
    members = load_members(checkpoints, image_size)      # Ray checkpoints of the next-best trials
    result = assess(cfg, retrained_model, members, calibration, splits.test, final_dir)

`tuning.retrain.retrain_best` calls this inside its Ray task, where TensorFlow runs; nothing
here uses Ray itself. The variants compared on the same test split are the retrained best
config alone, with test-time augmentation (`boneage.tta`), the ensemble of the top
`tune.ensemble_top_k` trials (the retrained model plus the last checkpoints of the next-best
trials, averaged) and the ensemble with TTA. Each gets its MAE with a bootstrap 95% interval and,
calibrated on its own predictions, split-conformal intervals with their test coverage and width.

Calibration: a stratified part (`tune.calibration_fraction`) of the validation split, held out
of the retrain. No model here trained on it: the retrained model trained on train + the rest of
validation, the checkpoints on train only. Like all of validation it did rank the trials, which
can make the intervals slightly optimistic.

Writes into `out_dir` (final/): variants.json, test_intervals.csv and gallery/ (Grad-CAM
overlays of the worst test predictions of the exported model, and gallery.json).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from boneage.config import write_atomic
from boneage.errors import InputError

GALLERY = "gallery"


def split_calibration(val: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rest of val, calibration part), stratified by age and sex; no calibration when off."""
    from boneage.splits import split_table

    if not fraction or len(val) < 2:
        return val, val.iloc[:0]
    try:
        rest, calibration, _ = split_table(val, fraction, 0.0, seed)
    except InputError:  # too few images to leave any in the rest
        return val, val.iloc[:0]
    return rest, calibration


def load_members(checkpoints, image_size: int, report=print) -> list[tuple[str, object]]:
    """[(trial_id, model)] from Ray checkpoints [(trial_id, Checkpoint)] of the same image size,
    each with the weights of its trial's best epoch (the epoch that ranked it)."""
    from boneage.ensemble import image_size as size_of
    from boneage.export import load_exported
    from boneage.progress import BEST_WEIGHTS, load_weights_file
    from tuning.trainable import CHECKPOINT_MODEL

    members = []
    for trial_id, checkpoint in checkpoints:
        try:
            with checkpoint.as_directory() as folder:
                model = load_exported(Path(folder) / CHECKPOINT_MODEL)
                if (Path(folder) / BEST_WEIGHTS).is_file():  # its best epoch came before this checkpoint
                    model.set_weights(load_weights_file(Path(folder) / BEST_WEIGHTS))
        except (InputError, OSError) as err:
            report(f"ensemble: skipping trial {trial_id}: {err}")
            continue
        if size_of(model) != image_size:
            report(f"ensemble: skipping trial {trial_id}: image size {size_of(model)}, not {image_size}")
            continue
        members.append((trial_id, model))
    return members


def _variant(name, count, tta, y_true, male, predicted, mean_prediction, intervals, coverage_eval) -> dict:
    from boneage.evaluate import error_metrics

    metrics = error_metrics(y_true, predicted, male, mean_prediction)
    row = {"name": name, "members": count, "tta": tta, "n": metrics["n"], "mae": metrics["mae"],
           "mae_ci95": metrics["mae_ci95"], "rmse": metrics["rmse"]}
    if intervals is not None:
        row.update(coverage=coverage_eval["coverage"], mean_width=coverage_eval["mean_width"],
                   nominal=intervals.coverage)
    return row


def assess(cfg, model, members: list, calibration: pd.DataFrame, test: pd.DataFrame, out_dir,
           mean_prediction: float, report=print) -> dict:
    """Compare the variants, choose the export, calibrate its intervals, explain its worst cases."""
    from boneage.conformal import calibrate, evaluate_intervals
    from boneage.ensemble import build_ensemble
    from boneage.evaluate import predict_table

    out_dir = Path(out_dir)
    models = [model] + [m for _, m in members]
    groups = [("single", 1)] + ([(f"ensemble of {len(models)}", len(models))] if len(models) > 1 else [])
    export_name = groups[-1][0] if cfg.tune.export_ensemble else "single"
    use_intervals = bool(cfg.intervals.coverage and len(calibration))
    batch = cfg.train.batch_size
    variants, chosen = [], {}
    for tta in (False, True):
        report(f"assessing {len(models)} model(s) on the calibration and test images"
               + (" with test-time augmentation" if tta else "") + " ...")
        on_test = np.array([predict_table(m, test, batch, tta) for m in models])
        on_cal = np.array([predict_table(m, calibration, batch, tta) for m in models]) if use_intervals else None
        for name, count in groups:
            predicted = on_test[:count].mean(axis=0)
            intervals, coverage = None, None
            if use_intervals:
                try:
                    intervals = calibrate(calibration["boneage"], on_cal[:count].mean(axis=0), cfg.intervals.coverage,
                                          cfg.intervals.by_age, cfg.intervals.min_per_band,
                                          calibration=f"{len(calibration)} validation images held out of the "
                                                      "retrain (no model trained on them)")
                    coverage = evaluate_intervals(intervals, test["boneage"], predicted)
                except InputError as err:
                    report(f"no prediction intervals: {err}")
                    use_intervals = False
            label = name + (" + TTA" if tta else "")
            variants.append(_variant(label, count, tta, test["boneage"], test["male"], predicted,
                                     mean_prediction, intervals, coverage))
            if not tta and name == export_name:
                chosen = {"predicted": predicted, "intervals": intervals, "coverage": coverage}
    variants.sort(key=lambda v: (v["members"], v["tta"]))
    write_atomic(out_dir / "variants.json", json.dumps(variants, indent=2))

    exported = build_ensemble(models) if export_name != "single" else model
    intervals, predicted = chosen["intervals"], chosen["predicted"]
    table = test[["id", "boneage", "male"]].assign(predicted=np.round(predicted, 2))
    if intervals is not None:
        lower, upper = intervals.bounds(predicted)
        table = table.assign(lower=np.round(lower, 2), upper=np.round(upper, 2))
    write_atomic(out_dir / "test_intervals.csv", table.to_csv(index=False))
    gallery = write_gallery(exported, test, predicted, intervals, out_dir / GALLERY, cfg.tune.gallery_size)
    return {"variants": variants, "exported": export_name, "export_model": exported, "intervals": intervals,
            "test_intervals": chosen["coverage"], "members": [trial_id for trial_id, _ in members],
            "gallery": gallery}


def write_gallery(model, test: pd.DataFrame, predicted, intervals, out_dir, count: int) -> list[dict]:
    """Grad-CAM overlays of the `count` test images with the largest absolute error."""
    from boneage.ensemble import image_size
    from boneage.explain import GradCam, load_image, save_overlay
    from boneage.prepare import opened

    if not count or not len(test):
        return []
    prepared = opened(test, image_size(model))  # the images as trained on, even if the PNGs are gone
    out_dir = Path(out_dir)
    errors = np.abs(np.asarray(predicted) - test["boneage"].to_numpy(float))
    explain = GradCam(model)
    entries = []
    for rank, row in enumerate(np.argsort(-errors, kind="stable")[:count], start=1):
        case = test.iloc[row]
        image = (prepared.array[prepared.rows(test.iloc[[row]])[0]][..., None] if prepared is not None
                 else load_image(case["path"], image_size(model)))
        heat, months = explain(image, bool(case["male"]))
        name = f"worst_{rank:02d}.png"
        entry = {"file": f"{GALLERY}/{name}", "id": str(case["id"]), "male": bool(case["male"]),
                 "true": float(case["boneage"]), "predicted": float(predicted[row]), "error": float(errors[row])}
        if intervals is not None:
            lower, upper = intervals.bounds([predicted[row]])
            entry.update(lower=float(lower[0]), upper=float(upper[0]))
        save_overlay(image, heat, out_dir / name,
                     f"#{rank} {case['id']} ({'M' if case['male'] else 'F'}): true {case['boneage'] / 12:.1f} y,"
                     f"\npredicted {predicted[row] / 12:.1f} y" + (f" [{entry['lower'] / 12:.1f}-{entry['upper'] / 12:.1f}]"
                                                                    if intervals is not None else ""))
        entries.append(entry)
    write_atomic(out_dir / "gallery.json", json.dumps(entries, indent=2))
    return entries
