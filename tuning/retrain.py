"""After the search: retrain the best config (chosen by tuning.outcome), test it, export, report.

    python -m tuning.search --retrain-only experiments/demo-20261201-101500

The retrain uses train + validation for as many epochs as the best trial needed to reach its
best validation MAE, counted only on trials that ran their course (`retrain_epochs`: a trial cut by
ASHA or a budget has not shown how many it needs), with a cosine schedule (it has no validation
set to watch), then is tested
once on the held-out test split. It runs as a Ray task holding the GPUs it needs, so on a
cluster it lands on a GPU worker, with every GPU of that node (MirroredStrategy) by default.
It checkpoints every epoch into the experiment's storage (`tuning.retrain_checkpoint`), so a
retrain that was killed continues from its last epoch when it runs again. A diverged trial
(`diverged` in its reports) is never the one retrained, nor an ensemble member.
A stratified part of the validation split (`tune.calibration_fraction`) is held out of that
retrain to calibrate split-conformal prediction intervals, and the retrained model is compared
with the top-k ensemble and test-time augmentation (`tuning.assess`).
Writes into the experiment folder: trials.csv, best_config.yaml, test_metrics.json, model/
(the export, with intervals), final/ (history, predictions, variants, Grad-CAM gallery),
report.md with its plots and the self-contained report.html.
"""
from __future__ import annotations

import dataclasses
import json
import socket
import time
from pathlib import Path

import numpy as np
import pandas as pd

from boneage.config import from_dict, save_config, write_atomic
from boneage.errors import InputError
from tuning.config import SearchConfig
from tuning.outcome import best_config, budget_note, candidates, collect_trials, retrain_epochs


def retrain_best(cfg_dict: dict, splits, exp, checkpoints=()) -> dict:
    """Runs inside a Ray task, on any node: set TensorFlow up for the task's resources, then
    retrain_and_export into the experiment's storage (final/ and model/). `checkpoints`:
    [(trial_id, Checkpoint)] of the next-best trials, the ensemble's other members."""
    import ray

    from boneage.splits import here
    from tuning.trainable import setup_process

    cfg = from_dict(SearchConfig, cfg_dict)
    splits = here(splits, cfg.data)  # the driver's splits, with this node's image paths
    context = ray.get_runtime_context()
    assigned = context.get_assigned_resources()
    gpu_ids = context.get_accelerator_ids().get("GPU", [])
    setup = setup_process(cfg, max(1, int(assigned.get("CPU", 1))), float(assigned.get("GPU", 0.0)), gpu_ids,
                          what="retrain")
    results = retrain_into(exp, cfg, splits, checkpoints)
    return {**results, "node": socket.gethostname(), "node_id": context.get_node_id(), "gpus": len(gpu_ids),
            "tensorflow_gpus": setup.gpus}


def retrain_into(exp, cfg: SearchConfig, splits, checkpoints=()) -> dict:
    """retrain_and_export into the experiment's storage (final/ and model/), with a checkpoint
    every epoch in the storage (`tuning.retrain_checkpoint`): a retrain of the same config that
    was killed continues from its last epoch. The checkpoint goes once the export is stored."""
    from tuning.retrain_checkpoint import RetrainCheckpoint

    saver = RetrainCheckpoint(exp, cfg, splits.fingerprint)
    try:
        with exp.writer("final", "model") as folder:
            results = retrain_and_export(cfg, splits, folder, checkpoints, saver)
        saver.clear()
    finally:
        saver.close()
    return results


def retrain_and_export(cfg: SearchConfig, splits, local_dir: Path, checkpoints=(), saver=None) -> dict:
    """Train on train + val less the calibration part (mirrored over every GPU of the process),
    compare with the ensemble and TTA and calibrate the intervals (tuning.assess), test, export
    to local_dir/model; history, test predictions, variants and the gallery in local_dir/final.
    `saver`: a RetrainCheckpoint to continue from and to save every epoch into."""
    from boneage.evaluate import evaluate
    from boneage.export import export_model
    from boneage.progress import Progress
    from boneage.splits import Splits
    from boneage.train import train
    from tuning.assess import assess, load_members, split_calibration

    val_rest, calibration = split_calibration(splits.val, cfg.tune.calibration_fraction, cfg.data.split_seed)
    combined = Splits(pd.concat([splits.train, val_rest], ignore_index=True), splits.val.iloc[:0],
                      splits.test, splits.fingerprint, splits.root, splits.labels_fingerprint)
    final_dir = local_dir / "final"
    started = time.time()
    resume = saver.latest() if saver else None
    if resume:
        print(f"retrain: continuing from its checkpoint after epoch {resume.epoch} of {cfg.train.epochs}", flush=True)
    progress = Progress(resume)
    metrics, model = train(cfg, combined, out_dir=final_dir, resume=resume, progress=progress,
                           callbacks=[saver.callback(progress)] if saver else [])
    if metrics["diverged"]:  # no validation set, so no earlier epoch to fall back on
        raise RuntimeError(f"the retrain diverged at epoch {metrics['epochs_run']} (its training loss is not "
                           "finite) though its trial did not; nothing was exported. Search a lower learning rate")
    members = load_members(checkpoints, int(model.inputs[0].shape[1]))
    assessed = assess(cfg, model, members, calibration, splits.test, final_dir, metrics["age_mean"]) \
        if len(splits.test) else {"export_model": model, "intervals": None, "exported": "single"}
    exported = assessed.pop("export_model")
    test = evaluate(exported, splits.test, metrics["age_mean"], cfg.train.batch_size, cfg.train.tta,
                    final_dir, "test") if len(splits.test) else None
    trained_on = f"train + val ({len(combined.train)} images)" + (
        f", {len(calibration)} validation images held out to calibrate the intervals" if len(calibration) else "")
    export_model(exported, local_dir / "model", {
        "config": dataclasses.asdict(cfg), "data_fingerprint": splits.fingerprint, "split_sizes": splits.sizes(),
        "trained_on": trained_on, "model": assessed["exported"], "ensemble_members": assessed.get("members"),
        "metrics": {"test": test, "test_intervals": assessed.get("test_intervals"),
                    "variants": assessed.get("variants")},
        "training": {k: metrics[k] for k in ("replicas", "global_batch_size", "phases", "epochs_run")}},
        assessed["intervals"])
    assessed["intervals"] = assessed["intervals"] and assessed["intervals"].to_dict()
    return {"test_metrics": test, "epochs": metrics["epochs_run"], "resumed_from": metrics["resumed_from"],
            "replicas": metrics["replicas"],
            "global_batch_size": metrics["global_batch_size"], "phases": metrics["phases"],
            "seconds": time.time() - started, "calibration_images": len(calibration),
            "trained_on": trained_on, **assessed}


def member_checkpoints(results, trials: pd.DataFrame, best_id: str, k: int) -> list:
    """[(trial_id, Checkpoint)] of the k-1 best trials after `best_id` that left a checkpoint,
    leaving out diverged trials and any whose validation MAE is over twice the best's (they
    would spoil the average rather than help it)."""
    by_id = {str(r.metrics.get("trial_id", Path(r.path).name)): r for r in results}
    finished = trials[np.isfinite(trials["best_val_mae"].to_numpy(float)) & (trials["status"] != "diverged")]
    finished = finished[finished["best_val_mae"] <= 2 * finished["best_val_mae"].min()]
    ranked = finished.sort_values("best_val_mae", kind="stable")["trial_id"]
    found = [(t, by_id[t].checkpoint) for t in ranked if t != best_id and t in by_id and by_id[t].checkpoint]
    return found[:max(k - 1, 0)]


def run_retrain(tuned: SearchConfig, splits, exp, checkpoints=()) -> dict:
    """The retrain as a Ray task on one node holding its GPUs (waiting for such a node if an
    autoscaler must start one first)."""
    import ray
    from ray.util.placement_group import remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from tuning import cluster

    shapes = cluster.node_shapes()
    gpus, cpus = cluster.retrain_resources(tuned, shapes)
    group = cluster.reserve(gpus, cpus, tuned.tune.retrain_wait_s, shapes)
    try:
        task = ray.remote(num_cpus=cpus, num_gpus=gpus)(retrain_best).options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0))
        return ray.get(task.remote(dataclasses.asdict(tuned), splits, exp, list(checkpoints)))
    finally:
        remove_placement_group(group)


def finish(cfg: SearchConfig, exp, results, splits, started: float) -> dict:
    """Collect the trials, retrain the best, write the reports, publish it all into the storage."""
    import optuna

    from tuning.experiment import SEARCH_CONFIG
    from tuning.html_report import dashboard_command, write_html_report
    from tuning.plots import draw_plots
    from tuning.report import format_summary, write_report
    from tuning.trials_csv import write_trials_csv
    from tuning.progress import StudySync
    from tuning.study_storage import STUDY_DB, open_storage, study_key, study_url

    from tuning.progress import load_state
    from tuning.story import search_story
    from tuning.tracking import MLFLOW_DB

    local_dir = exp.local_dir
    search_seconds = time.time() - started
    progress = load_state(exp)
    trials = collect_trials(results, cfg, progress)
    write_trials_csv(trials, local_dir / "trials.csv")
    tuned, best = best_config(cfg, trials)
    epochs_rule = retrain_epochs(cfg, candidates(trials), best)[1]
    save_config(tuned, local_dir / "best_config.yaml")
    gpu_seconds = float(trials["time_s"].sum()) * cfg.tune.resources.gpu
    retrained = None
    if cfg.tune.retrain:
        print(f"retraining the best config ({best['trial_id']}, val MAE {best['best_val_mae']:.2f}) "
              f"for {tuned.train.epochs} epochs on train + val ({epochs_rule}) ...")
        members = member_checkpoints(results, trials, best["trial_id"], cfg.tune.ensemble_top_k)
        retrained = run_retrain(tuned, splits, exp, members)
        print(f"retrained on {retrained['node']} with {retrained['gpus']} GPU(s), {retrained['replicas']} "
              f"replica(s), global batch {retrained['global_batch_size']}")
        exp.fetch("final")  # written on the retrain's node, into the storage
        write_atomic(local_dir / "test_metrics.json", json.dumps(retrained["test_metrics"], indent=2))
        gpu_seconds += retrained["seconds"] * retrained["gpus"]
    url = study_url(cfg, local_dir)
    study = optuna.load_study(study_name=exp.name, storage=open_storage(url, study_key(cfg)))
    summary = {
        "name": exp.name, "num_trials": len(trials), "storage": exp.uri, "study": url,  # password-free
        "best": {"trial_id": best["trial_id"], "val_mae": float(best["best_val_mae"]),
                 "params": {k[6:]: best[k] for k in trials.columns if k.startswith("param.")},
                 "epochs": int(best["epochs"])},
        "test_metrics": retrained and retrained["test_metrics"],
        "retrain_epochs": retrained and retrained["epochs"], "retrain_epochs_rule": epochs_rule,
        "budget_stop": budget_note(cfg, progress),
        "search_story": search_story(study, trials, cfg.tune.n_startup_trials),
        "retrain": retrained and {k: v for k, v in retrained.items() if k != "test_metrics"},
        "predictions_csv": str(local_dir / "final" / "test_predictions.csv") if retrained else None,
        "wall_time_s": time.time() - started, "search_time_s": max(search_seconds, progress["elapsed_s"]),
        "gpu_hours": gpu_seconds / 3600.0,
        "reproduce": f"python -m tuning.search --config {local_dir / SEARCH_CONFIG} --name {exp.name}-again",
        "split_sizes": splits.sizes(), "final_dir": str(local_dir / "final") if retrained else None,
        **{k: retrained.get(k) for k in ("variants", "intervals", "test_intervals", "gallery", "exported",
                                          "members", "trained_on", "calibration_images") if retrained},
    }
    plots = draw_plots(local_dir, trials, study, summary)
    write_report(local_dir, trials, study, summary, plots)
    write_html_report(local_dir, trials, study, summary, plots)
    write_atomic(local_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    if exp.remote:
        StudySync(exp, url).sync(mlflow=True)
        kept = (STUDY_DB, MLFLOW_DB, "final", "model")  # published by StudySync, or written by the retrain
        exp.publish(sorted(p.name for p in local_dir.iterdir() if p.name not in kept))
    print(format_summary(summary))
    if summary.get("test_intervals"):
        cover = summary["test_intervals"]
        print(f"Prediction intervals ({cover['nominal']:.0%}): {cover['coverage']:.0%} of the test ages inside, "
              f"mean width {cover['mean_width']:.1f} months")
    for variant in summary.get("variants") or []:
        print(f"  {variant['name']:<22} test MAE {variant['mae']:.2f} "
              f"({variant['mae_ci95'][0]:.2f}-{variant['mae_ci95'][1]:.2f})")
    print(f"Report: {local_dir / 'report.html'}")
    print(f"Optuna dashboard: {dashboard_command(url)}")
    print(f"TensorBoard: tensorboard --logdir {local_dir}")
    return summary


def retrain_only(location: str, address: str | None = None) -> dict:
    """Redo the retrain, test, export and report of the experiment at a folder or URI."""
    from boneage.splits import load_splits
    from tuning.config import load_search_config
    from tuning.experiment import SEARCH_CONFIG, Experiment
    from tuning.nodecheck import NodeExpectations, code_version
    from tuning.search import images_here, make_tuner, start_ray
    from tuning.study_storage import STUDY_DB

    exp = Experiment.at(location)
    try:
        found = exp.fetch(SEARCH_CONFIG)
    except InputError:
        found = False
    if not found:
        raise InputError(f"--retrain-only: {location} is not an experiment (no {SEARCH_CONFIG})")
    exp.fetch(STUDY_DB)
    cfg = load_search_config(exp.local_dir / SEARCH_CONFIG)
    here = images_here(cfg, address)
    splits = load_splits(cfg.data) if here else None
    start_ray(address)
    if splits is None:  # the search's splits, decided the same way (tuning.prepare)
        from tuning.prepare import splits_from_a_node

        splits = splits_from_a_node(cfg)
    expected = NodeExpectations(exp.uri, exp.mark_storage(), splits.fingerprint, code_version())
    results = make_tuner(cfg, exp, splits, expected, resume=True).get_results()
    return finish(cfg, exp, results, splits, time.time())
