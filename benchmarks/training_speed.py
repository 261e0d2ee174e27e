"""Benchmark 3, training speed: images per second of `boneage.train.train` (prepared cache,
tf.data pipeline) against plain `model.fit` on in-memory numpy arrays, with the same model,
optimizer and loss and augmentation off in both, side by side in one run. Also the speed-up
from freezing the backbone and the cost of augmentation at strength 1.

    python benchmarks/training_speed.py [--images 384 --size 96 --epochs 3]

The timed figure is the mean over epochs 2 and later (epoch 1 traces the graph). Data: a phantom
set generated in a temporary folder. Target: ours >= 0.95x plain fit (the input pipeline never
starves the model).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from record import record, table


def epoch_timer():
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.started)

    return EpochTimer()


def config(root, folder, args, **train):
    from boneage.config import load_config

    overrides = [f"data.root={root}", "data.source=rsna", f"data.prepared_dir={folder}",
                 f"model.image_size={args.size}", "model.weights=none", f"train.epochs={args.epochs}",
                 f"train.batch_size={args.batch}", "train.early_stopping_patience=0", "train.verbose=0",
                 "train.schedule=constant", "data.val_fraction=0.01", "data.test_fraction=0"]
    return load_config(None, overrides + [f"{k.replace('__', '.')}={v}" for k, v in train.items()])


def ours(splits, cfg) -> float:
    from boneage.train import train

    timer = epoch_timer()
    train(cfg, splits, callbacks=[timer])
    return len(splits.train) / float(np.mean(timer.seconds[1:]))


def plain_fit(splits, cfg) -> float:
    """The same model, optimizer and loss, fed numpy arrays by Keras (no tf.data of ours)."""
    import keras
    import tensorflow as tf

    from boneage.model import build_model
    from boneage.pipeline import prepare_image
    from boneage.train import ZScoreLoss

    images = np.stack([prepare_image(tf.io.read_file(p), cfg.model.image_size).numpy()
                       for p in splits.train["path"]]).astype(np.float32)
    male = splits.train["male"].to_numpy(np.float32)[:, None]
    ages = splits.train["boneage"].to_numpy(np.float32)
    mean, std = float(ages.mean()), float(max(ages.std(), 1.0))
    keras.utils.set_random_seed(0)
    model = build_model(cfg.model.image_size, "none", age_mean=mean, age_std=std, dropout=cfg.model.dropout)
    model.compile(optimizer=keras.optimizers.Adam(cfg.train.learning_rate), loss=ZScoreLoss("mae", std),
                  metrics=[keras.metrics.MeanAbsoluteError(name="mae")])
    timer = epoch_timer()
    model.fit({"image": images, "male": male}, ages, batch_size=cfg.train.batch_size, epochs=cfg.train.epochs,
              shuffle=True, verbose=0, callbacks=[timer])
    return len(images) / float(np.mean(timer.seconds[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=384, help="training images")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="per run; the first is not timed")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    from boneage import phantom
    from boneage.splits import Splits, load_splits

    with tempfile.TemporaryDirectory() as tmp:
        root = phantom.generate(Path(tmp) / "phantom", round(args.images / 0.99) + 1, seed=0)
        base = config(root, Path(tmp) / "prepared", args)
        loaded = load_splits(base.data, report=lambda m: None)
        splits = Splits(loaded.train.iloc[:args.images], loaded.val.iloc[:0], loaded.test.iloc[:0],
                        loaded.fingerprint, loaded.root)
        rates = {
            "plain model.fit on numpy arrays": plain_fit(splits, base),
            "boneage.train (prepared cache)": ours(splits, base),
            "boneage.train, backbone frozen (frozen_layers 14)": ours(splits, config(
                root, Path(tmp) / "prepared", args, model__frozen_layers=14)),
            "boneage.train, augment_strength 1": ours(splits, config(
                root, Path(tmp) / "prepared", args, train__augment_strength=1.0)),
        }
    plain, full = rates["plain model.fit on numpy arrays"], rates["boneage.train (prepared cache)"]
    rows = [[name, r, r / plain, r / full] for name, r in rates.items()]
    ratio = full / plain
    frozen = rates["boneage.train, backbone frozen (frozen_layers 14)"] / full
    augment = 1 - rates["boneage.train, augment_strength 1"] / full
    body = "\n".join([
        f"{args.images} phantom images at {args.size} px, batch {args.batch}, Xception from scratch, Adam, "
        f"{args.epochs} epochs per run (mean of epochs 2+).", "",
        table(["training", "images/s", "x plain fit", "x boneage.train"], rows), "",
        f"boneage.train vs plain fit: **{ratio:.2f}x** (target 0.95: {'met' if ratio >= 0.95 else 'missed'}). "
        f"Freezing the backbone: {frozen:.1f}x faster. Augmentation at strength 1 costs {100 * augment:.0f}%."])
    print(body)
    if not args.no_record:
        record(3, "Training speed", "python benchmarks/training_speed.py", body)


if __name__ == "__main__":
    main()
