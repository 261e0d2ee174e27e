"""The Ray Tune trainable: one trial = one `boneage.train.train` run in a fresh process.

`run_trial(params, base, splits)` is what `tuning.search` hands to the Tuner. Each epoch a
Keras callback reports the validation MAE in months (ASHA's signal) with `ray.tune.report`, and
every `tune.checkpoint_every` epochs a checkpoint (the full .keras model with its optimizer
state, the trial's best-so-far and, when its best epoch came earlier, that epoch's weights in
best.weights.npz); a retried or resumed trial continues from it and still ends with its best
weights. Each report says whether the trial `diverged` (its loss or validation MAE stopped
being finite: it stops there, reporting val_mae inf) and, in its last report, why it `ended`
when the trial itself knows (completed, early_stopping, diverged; "" while it runs or when Ray
stopped it).

TensorFlow is set up once, by `setup_process`, before it first touches a device: its thread
pools (and tf.data's) sized from the trial's Ray CPU share, and its GPU either in memory-growth
mode or, for a fractional GPU (`resources.gpu: 0.5`), capped at that fraction of the card's
memory so the trials sharing it all fit (`boneage.runtime.configure_share`). Those settings are
fixed once TensorFlow has started, which is why every trial gets a fresh worker process
(`reuse_actors=False`). The trial's log says what it got.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import tempfile
from pathlib import Path

from ray import tune

CHECKPOINT_MODEL = "model.keras"
CHECKPOINT_STATE = "state.json"


def _assigned(resource: str) -> float:
    import ray

    return float(ray.get_runtime_context().get_assigned_resources().get(resource, 0.0))


def setup_process(cfg, cpus: int, gpu_share: float, gpu_ids, what: str = "trial"):
    """Configure TensorFlow for a Ray trial or task holding `cpus` CPUs and `gpu_share` GPUs.

    Refuses to go on without a GPU TensorFlow can use when Ray gave it one and
    `tune.require_gpu` is on: a CPU-only TensorFlow on a GPU node would otherwise run the whole
    search on CPU unnoticed.
    """
    from boneage import runtime

    setup = runtime.configure_share(cpus, gpu_share, cfg.train.mixed_precision)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)")
    print(f"{what} resources: {cpus} CPU(s), GPU share {gpu_share:g} of GPU(s) {','.join(map(str, gpu_ids)) or '-'} "
          f"(CUDA_VISIBLE_DEVICES={visible}); {setup.describe()}", flush=True)
    if gpu_share > 0 and not setup.gpus and cfg.tune.require_gpu:
        raise RuntimeError(f"Ray gave this {what} GPU(s) {gpu_ids} but TensorFlow sees no GPU (CUDA_VISIBLE_DEVICES="
                           f"{visible}): install the GPU build (pip install 'boneage-tune[gpu]') on every GPU node, "
                           f"or set tune.require_gpu: false to train on CPU anyway")
    return setup


def _make_reporter(every: int, progress, extra: dict):
    """The Keras callback that reports each epoch to Ray Tune. It runs after `progress` (the
    run's `boneage.progress.Progress`), whose best epoch, divergence and end it reports."""
    import keras

    class ReportToTune(keras.callbacks.Callback):
        """Per epoch: metrics to Ray Tune, with a checkpoint every `every` epochs (and none of a
        diverged epoch: its weights are useless, and the trial ends there anyway)."""

        def on_epoch_end(self, epoch, logs=None):
            logs = {k: float(v) for k, v in (logs or {}).items()}
            val_mae = logs.get("val_mae", math.nan)
            if not math.isfinite(val_mae) or progress.diverged:  # a diverged trial is the worst, not
                val_mae = math.inf                                 # incomparable: ASHA cannot rank NaN
            metrics = {"val_mae": val_mae, "train_mae": logs.get("mae"), "loss": logs.get("loss"),
                       "epoch": epoch + 1, "best_val_mae": progress.best_val_mae, "best_epoch": progress.best_epoch,
                       "diverged": progress.diverged, "ended": progress.ended or "",
                       "learning_rate": logs.get("learning_rate"), "host": socket.gethostname(), **extra}
            if progress.diverged or (epoch + 1) % every:
                tune.report(metrics)
                return
            with tempfile.TemporaryDirectory() as folder:
                self.model.save(Path(folder) / CHECKPOINT_MODEL)
                state = {"epoch": epoch + 1, "best_val_mae": progress.best_val_mae, "best_epoch": progress.best_epoch,
                         "best_weights": progress.save_best(folder), "history": progress.history,
                         "node_id": extra.get("node_id")}
                (Path(folder) / CHECKPOINT_STATE).write_text(json.dumps(state))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    return ReportToTune()


def resume_from(folder: Path):
    """The `boneage.train.Resume` of a trial checkpoint copied into `folder`."""
    from boneage.train import Resume

    state = json.loads((folder / CHECKPOINT_STATE).read_text())
    best = state.get("best_weights")  # None: the best epoch is the checkpoint's own (or none yet)
    return Resume(str(folder / CHECKPOINT_MODEL), state["epoch"], state["best_val_mae"], state["best_epoch"],
                  state["history"], str(folder / best) if best else None)


def run_trial(params: dict, base: dict, splits, expected) -> None:
    """Train the base config with this trial's `params`; Ray calls it in the worker process,
    after checking that this node has what the driver expects (`tuning.nodecheck`)."""
    import ray

    from boneage.config import from_dict
    from boneage.splits import here
    from tuning.config import SearchConfig
    from tuning.nodecheck import check_node
    from tuning.space import apply_params

    cpus = max(1, int(_assigned("CPU")))
    gpu_share = _assigned("GPU")
    gpu_ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
    cfg = apply_params(from_dict(SearchConfig, base), params)
    cfg.train.intra_op_threads, cfg.train.inter_op_threads = cpus, min(2, cpus)
    cfg.train.verbose = 0  # Ray's trial table is the progress display
    check_node(expected, cfg, splits)
    splits = here(splits, cfg.data)  # the driver's splits, with this node's image paths
    setup = setup_process(cfg, cpus, gpu_share, gpu_ids)
    if cfg.data.cache == "prepared":
        from tuning.prepared_store import PreparedStore, prepare_here

        store = PreparedStore.of(cfg)
        if store is not None:  # a node that joined late: the storage's copy, not a decode on the GPU's time
            prepare_here(cfg.data, splits.all(), [cfg.model.image_size], store, threads=cpus)

    from boneage.progress import Progress
    from boneage.train import train

    resume, local = None, None
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        local = Path(tempfile.mkdtemp(prefix="boneage-resume-"))
        with checkpoint.as_directory() as folder:
            shutil.copytree(folder, local, dirs_exist_ok=True)
        resume = resume_from(local)
    extra = {"node_id": ray.get_runtime_context().get_node_id(), "gpu_share": gpu_share, "gpu_ids": ",".join(map(str, gpu_ids)),
             "gpu_memory_cap_mib": setup.memory_limit_mb or 0, "tensorflow_gpus": setup.gpus}
    progress = Progress(resume)
    try:
        train(cfg, splits, callbacks=[_make_reporter(cfg.tune.checkpoint_every, progress, extra)], resume=resume,
              progress=progress)
    finally:
        if local:
            shutil.rmtree(local, ignore_errors=True)
