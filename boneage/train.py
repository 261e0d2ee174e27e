"""Train one bone-age model from a config: `train(cfg, splits, callbacks) -> (metrics, model)`.

    python -m boneage train --config configs/small.yaml --out runs/small

A plain function, so a Ray trial can call it with its own Keras callback (reporting each
epoch's validation MAE and a checkpoint) and resume it from that checkpoint. The best model is
chosen by MAE in months on the whole validation set; with no validation set (retraining on
train + validation) the last epoch's model is kept. A run whose loss or validation MAE stops
being finite has diverged: it stops there and keeps the best weights it had
(`boneage.progress`).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras
import numpy as np
from keras import ops

from boneage import runtime
from boneage.config import Config, TrainConfig
from boneage.errors import InputError
from boneage.model import build_model, set_frozen_blocks
from boneage.pipeline import make_dataset, to_device
from boneage.progress import Progress
from boneage.splits import Splits


@keras.saving.register_keras_serializable("boneage")
class ZScoreLoss(keras.losses.Loss):
    """The training loss on z-scores (error / std of the target), so its scale and the useful
    learning rates don't depend on the unit of the target, while the model outputs months."""

    def __init__(self, kind: str = "mae", age_std: float = 1.0, **kwargs):
        kwargs.pop("name", None)
        super().__init__(name=f"{kind}_z", **kwargs)
        self.kind, self.age_std = kind, age_std

    def call(self, y_true, y_pred):
        y_pred = ops.cast(y_pred, "float32")
        error = (y_pred - ops.reshape(ops.cast(y_true, "float32"), ops.shape(y_pred))) / self.age_std
        if self.kind == "mse":
            return ops.mean(ops.square(error), axis=-1)
        if self.kind == "huber":
            absolute = ops.abs(error)
            return ops.mean(ops.where(absolute < 1.0, 0.5 * ops.square(error), absolute - 0.5), axis=-1)
        return ops.mean(ops.abs(error), axis=-1)

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "age_std": self.age_std}


def _compile(model, cfg: Config, learning_rate, age_std: float) -> None:
    t = cfg.train
    jit_compile = _xla_by_default() if t.jit_compile is None else t.jit_compile
    if t.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=t.weight_decay or 0.0)
    else:
        optimizer = keras.optimizers.Adam(learning_rate=learning_rate, weight_decay=t.weight_decay or None)
    model.compile(optimizer=optimizer, loss=ZScoreLoss(t.loss, age_std),
                  metrics=[keras.metrics.MeanAbsoluteError(name="mae")], jit_compile=jit_compile)


def _xla_by_default() -> bool:
    """XLA when this process computes on one GPU. Keras' "auto" looks at the physical devices, so
    it compiles for a GPU that TensorFlow listed but could not start (a CPU run that then spends
    minutes compiling Xception); the logical devices say where the work really runs. Like Keras,
    not under a multi-replica strategy (XLA there needs every op supported on every replica)."""
    import tensorflow as tf

    return bool(tf.config.list_logical_devices("GPU")) and tf.distribute.get_strategy().num_replicas_in_sync == 1


@dataclass
class Resume:
    """Where a resumed run picks up: a full .keras checkpoint saved after `epoch` epochs, and
    the weights of its best epoch so far (`best_weights_path`, written by
    `boneage.progress.Progress.save_best`;
    None when the best epoch is the checkpoint's own or there is none)."""
    model_path: str
    epoch: int
    best_val_mae: float = math.inf
    best_epoch: int = 0
    history: dict = field(default_factory=dict)
    best_weights_path: str | None = None


@dataclass(frozen=True)
class Phase:
    first: int  # epochs already done when it starts
    last: int  # epochs done when it ends
    frozen_layers: int  # Xception blocks frozen (14 = only the head trains)
    learning_rate: float


def plan_phases(t: TrainConfig, frozen_layers: int) -> list[Phase]:
    """The head alone for `head_epochs` (at `head_learning_rate`), then the model with
    `frozen_layers` frozen. Fewer epochs than `head_epochs` cut the head phase short rather than
    skip it: a retrain of a trial whose best epoch fell in its head phase repeats exactly that."""
    head_end = min(t.head_epochs, t.epochs)
    phases = [Phase(0, head_end, 14, t.head_learning_rate)] if head_end else []
    if t.epochs > head_end:
        phases.append(Phase(head_end, t.epochs, frozen_layers, t.learning_rate))
    return phases


def replica_learning_rate(learning_rate: float, replicas: int) -> float:
    """The learning rate for `replicas` mirrored copies, each with the searched batch size.

    The global batch is batch_size x replicas. For Adam and AdamW we scale the learning rate by
    the square root of that factor (the square-root rule: Krizhevsky 2014; Malladi et al. 2022
    derive it for adaptive optimizers), keeping the number of epochs: the linear rule of Goyal
    et al. 2017 is for SGD and overshoots with Adam.
    """
    return learning_rate * math.sqrt(replicas)


def train(cfg: Config, splits: Splits, callbacks=(), out_dir=None, resume: Resume | None = None,
          progress: Progress | None = None):
    """Train, keep the best model, return (metrics, model). `out_dir` gets best.keras, history.csv.

    `progress`: the run's `Progress`, for a caller whose callbacks report or checkpoint it (they
    run after it each epoch); made here from `resume` when not given.

    TensorFlow is used as the caller configured it (`boneage.runtime.configure`); a caller who
    did not gets the defaults. With several GPUs (or several logical CPUs) in the process the
    model is mirrored across them: each replica gets the searched `batch_size`, so the global
    batch is batch_size x replicas and the learning rate follows `replica_learning_rate`.
    BatchNorm is not synchronised across replicas: each normalises over the searched batch size,
    as every trial of the search did (syncing would make the statistics cover the global batch,
    a different recipe, at the cost of an all-reduce per BatchNorm layer per step).
    """
    runtime.ensure_configured(cfg.train.intra_op_threads, cfg.train.inter_op_threads, cfg.train.mixed_precision)
    keras.utils.set_random_seed(cfg.train.seed)
    t, m = cfg.train, cfg.model
    if len(splits.train) == 0:
        raise InputError("the training split is empty")
    import tensorflow as tf

    devices = runtime.replica_devices()
    strategy = tf.distribute.MirroredStrategy(devices) if devices else tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    batch_size = t.batch_size * replicas
    age_mean = float(splits.train["boneage"].mean())
    age_std = float(max(splits.train["boneage"].std(ddof=0), 1.0))
    common = dict(image_size=m.image_size, batch_size=batch_size, include_sex=m.use_sex, cache=cfg.data.cache,
                  threads=t.intra_op_threads, prepared=_prepared(cfg, splits))
    train_ds = make_dataset(splits.train, training=True, augment_strength=t.augment_strength, seed=t.seed, **common)
    has_val = len(splits.val) > 0
    val_ds = make_dataset(splits.val, training=False, **common) if has_val else None
    train_ds, val_ds = _onto_device(t.prefetch_to_device, train_ds, val_ds)
    out_dir = Path(out_dir) if out_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)

    progress = progress or Progress(resume)
    progress.final_epoch = t.epochs
    with strategy.scope():
        if resume:
            model = keras.models.load_model(resume.model_path)
            progress.restore(model)
        else:
            if m.weights not in ("imagenet", "none") and not Path(m.weights).is_file():
                raise InputError(f"config key model.weights: weights file not found: {m.weights}")
            try:
                model = build_model(m.image_size, m.weights, m.frozen_layers, m.use_sex, m.dropout,
                                    m.head_units, m.bn_momentum, age_mean, age_std)
            except (ValueError, OSError) as err:
                raise InputError(f"config key model.weights: could not load {m.weights}: {err}") from None

        steps_per_epoch = math.ceil(len(splits.train) / batch_size)
        own = []
        if has_val and t.early_stopping_patience:
            progress.early_stopping = keras.callbacks.EarlyStopping("val_mae", patience=t.early_stopping_patience)
            own.append(progress.early_stopping)
        own.append(progress)  # after EarlyStopping, so it knows when that stopped the run
        if out_dir:  # the whole history each epoch: a resumed run's file starts at epoch 1 too
            own.append(keras.callbacks.LambdaCallback(
                on_epoch_end=lambda e, logs: _write_history(progress.history, out_dir / "history.csv")))

        start, started = (resume.epoch if resume else 0), time.time()
        phases = [{**asdict(p), "replica_learning_rate": replica_learning_rate(p.learning_rate, replicas)}
                  for p in plan_phases(t, m.frozen_layers)]
        for phase in plan_phases(t, m.frozen_layers):
            if start >= phase.last:
                continue
            lr = replica_learning_rate(phase.learning_rate, replicas)
            phase_callbacks = list(own)
            if t.schedule == "cosine":
                lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=steps_per_epoch * (phase.last - phase.first))
            elif t.schedule == "plateau" and has_val:
                phase_callbacks.append(keras.callbacks.ReduceLROnPlateau(
                    "val_mae", factor=t.plateau_factor, patience=t.plateau_patience, min_lr=lr * 1e-3))
            if not (resume and start > phase.first):  # a resumed phase keeps its optimizer state
                set_frozen_blocks(model, phase.frozen_layers)
                _compile(model, cfg, lr, age_std)
            model.fit(train_ds, validation_data=val_ds, epochs=phase.last, initial_epoch=max(start, phase.first),
                      callbacks=phase_callbacks + list(callbacks), verbose=t.verbose,
                      shuffle=False)  # the dataset shuffles itself
            start = phase.last
            if model.stop_training:
                break

    if progress.best_weights is not None:
        model.set_weights(progress.best_weights)
    if out_dir:
        model.save(out_dir / "best.keras")
    history = progress.history
    epochs_run = len(history.get("loss", []))
    metrics = {
        "best_val_mae": progress.best_val_mae if has_val else None,
        "best_epoch": progress.best_epoch if has_val else epochs_run,
        "epochs_run": epochs_run,
        "diverged": progress.diverged, "ended": progress.ended,
        "resumed_from": resume.epoch if resume else 0,
        "train_seconds": round(time.time() - started, 1),
        "age_mean": age_mean, "age_std": age_std,
        "n_train": len(splits.train), "n_val": len(splits.val),
        "replicas": replicas, "global_batch_size": batch_size,
        "phases": phases,
        "history": history,
    }
    return metrics, model


def _prepared(cfg: Config, splits: Splits):
    """With `data.cache: prepared`, the images of all three splits from the node's prepared
    cache (built here, once per node, if no process built it yet)."""
    if cfg.data.cache != "prepared":
        return None
    from boneage.prepare import ensure_prepared, prepared_dir

    return ensure_prepared(splits.all(), cfg.model.image_size, prepared_dir(cfg.data),
                           threads=cfg.train.intra_op_threads or None)


def _onto_device(flag, *datasets):
    """Prefetch batches to the GPU: `flag` None = when this process has exactly one GPU (with
    several, MirroredStrategy feeds them itself); True forces it (onto the CPU without a GPU)."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if flag is False or (flag is None and len(gpus) != 1):
        return datasets
    # The copy hides the datasets' length from Keras, which then warns at the end of the first
    # epoch that the data "ran out": it did, at the end of the epoch, as it should.
    warnings.filterwarnings("ignore", message="Your input ran out of data", category=UserWarning)
    device = gpus[0].name if gpus else "/cpu:0"
    return tuple(ds if ds is None else to_device(ds, device) for ds in datasets)


def _write_history(history: dict, path: Path) -> None:
    """history.csv as Keras's CSVLogger writes it (epoch from 0, then the logs' keys sorted)."""
    import pandas as pd

    from boneage.config import write_atomic

    columns = sorted(history)
    table = pd.DataFrame({k: pd.Series(history[k], dtype=float) for k in columns})
    table.insert(0, "epoch", range(len(table)))
    write_atomic(path, table.to_csv(index=False))


def plot_history(history: dict, path, title: str = "") -> None:
    """Training loss and validation MAE per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    left.plot(epochs, history.get("loss", []), label="train loss (z-score)")
    left.set(xlabel="epoch", ylabel="loss")
    right.plot(epochs, history.get("mae", []), label="train MAE")
    if "val_mae" in history:
        right.plot(epochs, history["val_mae"], label="validation MAE")
    right.set(xlabel="epoch", ylabel="months")
    for ax in (left, right):
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(cfg: Config, out_dir, report=print) -> dict:
    """The whole job: split, train, evaluate on the held-out test split, export.

    Writes into out_dir: config.yaml, split_*.csv, history.csv, learning_curves.png, best.keras,
    test_predictions.{csv,png}, metrics.json and export/ (see boneage.export).
    """
    import json

    from boneage.config import save_config, write_atomic
    from boneage.evaluate import evaluate, format_metrics, predict_table
    from boneage.export import export_model
    from boneage.splits import load_external_test, load_splits

    splits = load_splits(cfg.data, report)  # bad data is refused before the run folder exists
    external = load_external_test(cfg.data, report)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    splits.save(out_dir)
    report(f"training on {splits.sizes()} images at {cfg.model.image_size} px -> {out_dir}")
    metrics, model = train(cfg, splits, out_dir=out_dir)
    if metrics["diverged"]:
        kept = f"kept epoch {metrics['best_epoch']}" if metrics["best_epoch"] else "no epoch to keep"
        report(f"warning: training diverged at epoch {metrics['epochs_run']} (loss or validation MAE not "
               f"finite; lower train.learning_rate); {kept}")
    plot_history(metrics["history"], out_dir / "learning_curves.png", title=str(out_dir.name))
    results = {"train": {k: v for k, v in metrics.items() if k != "history"}}
    for name, frame in (("test", splits.test), ("external_test", external)):
        if frame is not None and len(frame):
            results[name] = evaluate(model, frame, metrics["age_mean"], cfg.train.batch_size,
                                     cfg.train.tta, out_dir, name)
            report(f"{name}: " + format_metrics(results[name]))
    # Intervals from the validation split: never trained on (it only chose the best epoch).
    from boneage.conformal import calibrate_model, evaluate_intervals

    intervals = calibrate_model(model, splits.val, cfg, f"the validation split ({len(splits.val)} images; "
                                "not trained on, it chose the best epoch)", cfg.train.batch_size, report=report)
    if intervals is not None and len(splits.test):  # as served: without test-time augmentation
        results["test_intervals"] = evaluate_intervals(
            intervals, splits.test["boneage"], predict_table(model, splits.test, cfg.train.batch_size))
    export_dir = export_model(model, out_dir / "export", {
        "config": asdict(cfg), "data_fingerprint": splits.fingerprint,
        "split_sizes": splits.sizes(), "metrics": results}, intervals)
    write_atomic(out_dir / "metrics.json", json.dumps(results, indent=2))
    report(f"exported to {export_dir}")
    return results
