"""The Ray Tune trainable: one trial = one `boneage.train.train` run in a fresh process.

`run_trial(params, base, splits)` is what `tuning.search` hands to the Tuner. Each epoch a
Keras callback reports the validation MAE in months (ASHA's signal) with `ray.tune.report`, and
every `tune.checkpoint_every` epochs a checkpoint (the full .keras model with its optimizer
state, plus the trial's best-so-far); a retried or resumed trial continues from it.

TensorFlow is set up before it first touches a device: its thread pools sized from the trial's
Ray CPU share, and its GPU either in memory-growth mode or, for a fractional GPU
(`resources.gpu: 0.5`), capped at that fraction of the card's memory so the trials sharing it
all fit. Those settings are fixed once TensorFlow has started, which is why every trial gets a
fresh worker process (`reuse_actors=False`).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from ray import tune

CHECKPOINT_MODEL = "model.keras"
CHECKPOINT_STATE = "state.json"


def _assigned(resource: str) -> float:
    import ray

    return float(ray.get_runtime_context().get_assigned_resources().get(resource, 0.0))


def gpu_memory_limit_mb(gpu_share: float) -> int | None:
    """For a fractional GPU, that fraction of the card's memory (less 5% headroom), else None."""
    if not 0 < gpu_share < 1:
        return None
    try:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits",
                              "-i", visible], capture_output=True, text=True, timeout=20, check=True)
        return int(float(out.stdout.strip().splitlines()[0]) * gpu_share * 0.95)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None  # no nvidia-smi: fall back to memory growth


def _make_reporter(every: int, resume):
    import keras

    class ReportToTune(keras.callbacks.Callback):
        """Per epoch: metrics to Ray Tune, with a checkpoint every `every` epochs."""

        def __init__(self):
            super().__init__()
            self.best = resume.best_val_mae if resume else math.inf
            self.best_epoch = resume.best_epoch if resume else 0
            self.history = {k: list(v) for k, v in (resume.history if resume else {}).items()}

        def on_epoch_end(self, epoch, logs=None):
            logs = {k: float(v) for k, v in (logs or {}).items()}
            for key, value in logs.items():
                self.history.setdefault(key, []).append(value)
            val_mae = logs.get("val_mae", math.nan)
            if not math.isfinite(val_mae):  # a diverged trial is the worst, not incomparable:
                val_mae = math.inf          # ASHA cannot rank NaN and would let it run on
            if val_mae < self.best:
                self.best, self.best_epoch = val_mae, epoch + 1
            metrics = {"val_mae": val_mae, "train_mae": logs.get("mae"), "loss": logs.get("loss"),
                       "epoch": epoch + 1, "best_val_mae": self.best, "best_epoch": self.best_epoch,
                       "learning_rate": logs.get("learning_rate"), "node": socket.gethostname()}
            if (epoch + 1) % every:
                tune.report(metrics)
                return
            with tempfile.TemporaryDirectory() as folder:
                self.model.save(Path(folder) / CHECKPOINT_MODEL)
                state = {"epoch": epoch + 1, "best_val_mae": self.best, "best_epoch": self.best_epoch,
                         "history": self.history}
                (Path(folder) / CHECKPOINT_STATE).write_text(json.dumps(state))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    return ReportToTune()


def run_trial(params: dict, base: dict, splits) -> None:
    """Train the base config with this trial's `params`; Ray calls it in the worker process."""
    from boneage.config import from_dict
    from tuning.config import SearchConfig
    from tuning.space import apply_params

    cpus = max(1, int(_assigned("CPU")))
    cfg = apply_params(from_dict(SearchConfig, base), params)
    cfg.train.intra_op_threads, cfg.train.inter_op_threads = cpus, min(2, cpus)
    cfg.train.verbose = 0  # Ray's trial table is the progress display

    from boneage.train import Resume, configure_tensorflow, train

    configure_tensorflow(cpus, min(2, cpus), gpu_memory_limit_mb(_assigned("GPU")), cfg.train.mixed_precision)
    resume, local = None, None
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        local = Path(tempfile.mkdtemp(prefix="boneage-resume-"))
        with checkpoint.as_directory() as folder:
            shutil.copytree(folder, local, dirs_exist_ok=True)
        state = json.loads((local / CHECKPOINT_STATE).read_text())
        resume = Resume(str(local / CHECKPOINT_MODEL), state["epoch"], state["best_val_mae"],
                        state["best_epoch"], state["history"])
    try:
        train(cfg, splits, callbacks=[_make_reporter(cfg.tune.checkpoint_every, resume)], resume=resume)
    finally:
        if local:
            shutil.rmtree(local, ignore_errors=True)
