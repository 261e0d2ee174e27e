"""Train one bone-age model from a config: `train(cfg, splits, callbacks) -> (metrics, model)`.

    python -m boneage train --config configs/small.yaml --out runs/small

A plain function, so a Ray trial can call it with its own Keras callback (reporting each
epoch's validation MAE and a checkpoint) and resume it from that checkpoint. The best model is
chosen by MAE in months on the whole validation set; with no validation set (retraining on
train + validation) the last epoch's model is kept.
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

from boneage.config import Config
from boneage.errors import InputError
from boneage.model import build_model, set_frozen_blocks
from boneage.pipeline import make_dataset, to_device
from boneage.splits import Splits


def configure_tensorflow(intra_op_threads: int = 0, inter_op_threads: int = 0,
                         gpu_memory_limit_mb: int | None = None, mixed_precision: bool = True):
    """Settings TensorFlow accepts only before it starts: call first thing in a process.

    Returns the list of visible GPUs. Memory growth (or a hard per-process limit, for several
    trials sharing one GPU) keeps one process from taking the whole card.
    """
    import tensorflow as tf

    try:
        if intra_op_threads:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
        if inter_op_threads:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
    except RuntimeError:
        pass  # TensorFlow already started in this process; keep its settings
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            if gpu_memory_limit_mb:
                tf.config.set_logical_device_configuration(
                    gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=gpu_memory_limit_mb)])
            else:
                tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass
    keras.mixed_precision.set_global_policy("mixed_float16" if gpus and mixed_precision else "float32")
    return gpus


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
    jit_compile = "auto" if t.jit_compile is None else t.jit_compile  # Keras' auto: XLA on GPU
    if t.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=t.weight_decay or 0.0)
    else:
        optimizer = keras.optimizers.Adam(learning_rate=learning_rate, weight_decay=t.weight_decay or None)
    model.compile(optimizer=optimizer, loss=ZScoreLoss(t.loss, age_std),
                  metrics=[keras.metrics.MeanAbsoluteError(name="mae")], jit_compile=jit_compile)


@dataclass
class Resume:
    """Where a resumed run picks up: a full .keras checkpoint saved after `epoch` epochs."""
    model_path: str
    epoch: int
    best_val_mae: float = math.inf
    best_epoch: int = 0
    history: dict = field(default_factory=dict)


def train(cfg: Config, splits: Splits, callbacks=(), out_dir=None, resume: Resume | None = None):
    """Train, keep the best model, return (metrics, model). `out_dir` gets best.keras, history.csv."""
    configure_tensorflow(cfg.train.intra_op_threads, cfg.train.inter_op_threads,
                         mixed_precision=cfg.train.mixed_precision)
    keras.utils.set_random_seed(cfg.train.seed)
    t, m = cfg.train, cfg.model
    if len(splits.train) == 0:
        raise InputError("the training split is empty")
    age_mean = float(splits.train["boneage"].mean())
    age_std = float(max(splits.train["boneage"].std(ddof=0), 1.0))
    common = dict(image_size=m.image_size, batch_size=t.batch_size, include_sex=m.use_sex, cache=cfg.data.cache,
                  prepared=_prepared(cfg, splits))
    train_ds = make_dataset(splits.train, training=True, augment_strength=t.augment_strength, seed=t.seed, **common)
    has_val = len(splits.val) > 0
    val_ds = make_dataset(splits.val, training=False, **common) if has_val else None
    train_ds, val_ds = _onto_device(t.prefetch_to_device, train_ds, val_ds)
    out_dir = Path(out_dir) if out_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)

    # Several GPUs in this process (a retrain on a whole node): mirror the model across them.
    with _distribution_strategy().scope():
        if resume:
            model = keras.models.load_model(resume.model_path)
        else:
            if m.weights not in ("imagenet", "none") and not Path(m.weights).is_file():
                raise InputError(f"config key model.weights: weights file not found: {m.weights}")
            try:
                model = build_model(m.image_size, m.weights, m.frozen_layers, m.use_sex, m.dropout,
                                    m.head_units, m.bn_momentum, age_mean, age_std)
            except (ValueError, OSError) as err:
                raise InputError(f"config key model.weights: could not load {m.weights}: {err}") from None

        steps_per_epoch = math.ceil(len(splits.train) / t.batch_size)
        tracker = _BestTracker(resume)
        history: dict[str, list] = {k: list(v) for k, v in (resume.history if resume else {}).items()}
        own = [tracker, keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: _append(history, e, logs))]
        if out_dir:
            own.append(keras.callbacks.CSVLogger(str(out_dir / "history.csv"), append=resume is not None))
        if has_val and t.early_stopping_patience:
            own.append(keras.callbacks.EarlyStopping("val_mae", patience=t.early_stopping_patience))

        start, started = (resume.epoch if resume else 0), time.time()
        phases = []  # (first epoch, last epoch, frozen blocks, learning rate)
        if t.head_epochs and t.head_epochs < t.epochs:
            phases.append((0, t.head_epochs, 14, t.head_learning_rate))
        phases.append((phases[-1][1] if phases else 0, t.epochs, m.frozen_layers, t.learning_rate))
        for first, last, frozen, lr in phases:
            if start >= last:
                continue
            phase_callbacks = list(own)
            if t.schedule == "cosine":
                lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=steps_per_epoch * (last - first))
            elif t.schedule == "plateau" and has_val:
                phase_callbacks.append(keras.callbacks.ReduceLROnPlateau(
                    "val_mae", factor=t.plateau_factor, patience=t.plateau_patience, min_lr=lr * 1e-3))
            if not (resume and start > first):  # a resumed phase keeps its optimizer state
                set_frozen_blocks(model, frozen)
                _compile(model, cfg, lr, age_std)
            model.fit(train_ds, validation_data=val_ds, epochs=last, initial_epoch=max(start, first),
                      callbacks=phase_callbacks + list(callbacks), verbose=t.verbose,
                      shuffle=False)  # the dataset shuffles itself
            start = last
            if model.stop_training:
                break

    if tracker.best_weights is not None:
        model.set_weights(tracker.best_weights)
    if out_dir:
        model.save(out_dir / "best.keras")
    epochs_run = len(history.get("loss", []))
    metrics = {
        "best_val_mae": tracker.best_val_mae if has_val else None,
        "best_epoch": tracker.best_epoch if has_val else epochs_run,
        "epochs_run": epochs_run,
        "train_seconds": round(time.time() - started, 1),
        "age_mean": age_mean, "age_std": age_std,
        "n_train": len(splits.train), "n_val": len(splits.val),
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


def _distribution_strategy():
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()


def _append(history: dict, epoch: int, logs: dict) -> None:
    for key, value in (logs or {}).items():
        history.setdefault(key, []).append(float(np.asarray(value)))


class _BestTracker(keras.callbacks.Callback):
    """Keeps the weights of the epoch with the lowest validation MAE in memory (no second copy
    on disk; checkpoints for resuming are the caller's business)."""

    def __init__(self, resume: Resume | None):
        super().__init__()
        self.best_val_mae = resume.best_val_mae if resume else math.inf
        self.best_epoch = resume.best_epoch if resume else 0
        self.best_weights = None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get("val_mae")
        if value is not None and float(value) < self.best_val_mae:
            self.best_val_mae, self.best_epoch = float(value), epoch + 1
            self.best_weights = self.model.get_weights()


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
    from boneage.evaluate import evaluate, format_metrics
    from boneage.export import export_model
    from boneage.splits import load_external_test, load_splits

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    splits = load_splits(cfg.data, report)
    external = load_external_test(cfg.data, report)
    splits.save(out_dir)
    report(f"training on {splits.sizes()} images at {cfg.model.image_size} px -> {out_dir}")
    metrics, model = train(cfg, splits, out_dir=out_dir)
    plot_history(metrics["history"], out_dir / "learning_curves.png", title=str(out_dir.name))
    results = {"train": {k: v for k, v in metrics.items() if k != "history"}}
    for name, frame in (("test", splits.test), ("external_test", external)):
        if frame is not None and len(frame):
            results[name] = evaluate(model, frame, metrics["age_mean"], cfg.train.batch_size,
                                     cfg.train.tta, out_dir, name)
            report(f"{name}: " + format_metrics(results[name]))
    export_dir = export_model(model, out_dir / "export", {
        "config": asdict(cfg), "data_fingerprint": splits.fingerprint,
        "split_sizes": splits.sizes(), "metrics": results})
    write_atomic(out_dir / "metrics.json", json.dumps(results, indent=2))
    report(f"exported to {export_dir}")
    return results
