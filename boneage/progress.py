"""What a training run knows about itself after each epoch (a Keras callback): its history, its
best epoch and that epoch's weights, whether it diverged, and why it ended.

    progress = Progress(resume)           # resume: a boneage.train.Resume or None
    train(cfg, splits, callbacks=[reporter], resume=resume, progress=progress)
    progress.ended                        # completed | early_stopping | diverged

`boneage.train.train` runs it after Keras's EarlyStopping and before the caller's callbacks (a
Ray trial's reporter, the retrain's checkpoint), which read it: a checkpoint stores the best
weights with `save_best` when they are not its own model's, and a resumed run gets them back
through `Resume.best_weights_path`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import keras
import numpy as np

if TYPE_CHECKING:
    from boneage.train import Resume

BEST_WEIGHTS = "best.weights.npz"
COMPLETED, EARLY_STOPPING, DIVERGED = "completed", "early_stopping", "diverged"


class Progress(keras.callbacks.Callback):
    """What a run knows about itself after each epoch, for `train` and for the caller's callbacks
    that report or checkpoint it (they run after this one):

    - `history`: every epoch's logs, the resumed run's included;
    - the best epoch by validation MAE (`best_val_mae`, `best_epoch`) and its weights in memory;
      `save_best` writes them beside a checkpoint, and `Resume.best_weights_path` brings them
      back, so a resumed run still returns its best weights when no later epoch beats them;
    - `diverged`: a loss that is NaN or infinite after any batch, or a validation loss or MAE
      that is not finite at an epoch's end. Training stops there (that epoch is still
      validated and reported) and the run keeps the best weights it had before;
    - `ended`, set at the epoch the run ends: completed, early_stopping or diverged.
    """

    def __init__(self, resume: Resume | None = None):
        super().__init__()
        self.resume = resume
        self.history = {k: list(v) for k, v in (resume.history if resume else {}).items()}
        self.best_val_mae = resume.best_val_mae if resume else math.inf
        self.best_epoch = resume.best_epoch if resume else 0
        self.best_weights = None
        self.epoch = resume.epoch if resume else 0
        self.final_epoch = 0  # set by train: the epochs the run is planned for
        self.early_stopping = None  # set by train when it uses Keras's EarlyStopping
        self.diverged, self.ended = False, None

    def restore(self, model) -> None:
        """The resumed run's best weights, once its checkpoint `model` is loaded."""
        resume = self.resume
        if resume.best_weights_path:
            weights = load_weights_file(resume.best_weights_path)
            expected = [w.shape for w in model.get_weights()]
            if [w.shape for w in weights] != expected:
                raise ValueError(f"{resume.best_weights_path}: best weights do not fit the checkpoint's model")
            self.best_weights = weights
        elif resume.best_epoch and resume.best_epoch == resume.epoch:
            self.best_weights = model.get_weights()  # the checkpoint's model is the best one
        elif resume.best_epoch:  # a checkpoint from before best weights were kept with it
            print(f"the checkpoint has no weights of its best epoch ({resume.best_epoch}, validation MAE "
                  f"{resume.best_val_mae:.2f}); that epoch is forgotten, the best is chosen from epoch "
                  f"{resume.epoch + 1} on", flush=True)
            self.best_val_mae, self.best_epoch = math.inf, 0

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(np.asarray(loss))):
            self.diverged = True
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(np.asarray(v)) for k, v in (logs or {}).items()}
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)
        self.epoch = epoch + 1
        if any(not math.isfinite(logs[k]) for k in ("loss", "val_loss", "val_mae") if k in logs):
            self.diverged = True
        value = logs.get("val_mae")
        if not self.diverged and value is not None and value < self.best_val_mae:
            self.best_val_mae, self.best_epoch = value, epoch + 1
            self.best_weights = self.model.get_weights()
        if self.diverged:
            self.model.stop_training = True
            self.ended = DIVERGED
        elif self.epoch >= self.final_epoch:
            self.ended = COMPLETED
        elif self.early_stopping is not None and self.model.stop_training \
                and self.early_stopping.stopped_epoch == epoch:
            self.ended = EARLY_STOPPING

    def save_best(self, folder) -> str | None:
        """Write the best weights into `folder` for a checkpoint of this epoch; returns the file
        name, or None when there is nothing to add (no best yet, or this epoch is the best, so
        the checkpoint's own model holds them)."""
        if self.best_weights is None or self.best_epoch == self.epoch:
            return None
        with open(Path(folder) / BEST_WEIGHTS, "wb") as f:
            np.savez(f, *self.best_weights)
        return BEST_WEIGHTS


def load_weights_file(path) -> list:
    """The weights `Progress.save_best` wrote, in `model.get_weights()` order."""
    with np.load(path) as stored:
        return [stored[f"arr_{i}"] for i in range(len(stored.files))]
