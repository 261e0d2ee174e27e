"""The bone-age regressor: raw grey image (+ sex) -> bone age in months.

    model = build_model(image_size=96, weights="none", frozen_layers=4, age_mean=127, age_std=41)

Layout: raw 0..255 grey -> scale to [-1, 1] -> grey to 3 channels -> Keras Xception backbone
-> global average pooling -> (+ a small embedding of sex) -> dropout -> dense -> z-score
-> months. The last layer turns the z-score back into months: the only place the target is
de-normalised, so training (loss on z-scores), evaluation and exports all agree. Knows no
files, datasets or Ray.
"""
from __future__ import annotations

import re

import keras
from keras import layers

XCEPTION_BLOCKS = 14  # entry flow 1-4, middle flow 5-12, exit flow 13-14


def block_of_layers(backbone: keras.Model) -> dict[str, int]:
    """Xception block (1-14) of every backbone layer; 0 for the input.

    Named layers carry their block (`block7_sepconv2_bn`). The four unnamed residual shortcut
    convolutions and their BatchNorms sit, in layer order, right after layers of the block they
    belong to, so each inherits the block of the last named layer before it. That keeps every
    convolution in the same block as its BatchNorm, so a freeze boundary never splits them.
    """
    blocks, current = {}, 0
    for layer in backbone.layers:
        match = re.match(r"block(\d+)_", layer.name)
        if match:
            current = int(match.group(1))
        blocks[layer.name] = current
    return blocks


def set_frozen_blocks(model: keras.Model, frozen_layers: int) -> None:
    """Freeze Xception blocks 1..frozen_layers (0 = all trainable, 14 = head only).

    A frozen BatchNorm (trainable=False) runs in inference mode in Keras 3, keeping its
    pretrained statistics. Recompile the model after calling this.
    """
    backbone = model.get_layer("xception")
    backbone.trainable = True
    for name, block in block_of_layers(backbone).items():
        backbone.get_layer(name).trainable = block > frozen_layers


def build_model(image_size: int, weights: str = "imagenet", frozen_layers: int = 0,
                use_sex: bool = True, dropout: float = 0.2, head_units: int = 0,
                bn_momentum: float | None = None, age_mean: float = 127.0,
                age_std: float = 41.0) -> keras.Model:
    """`weights`: "imagenet" (Keras downloads them once), "none", or a local weights file.

    `bn_momentum` None keeps Keras' 0.99 for pretrained weights and uses 0.9 from scratch:
    with 0.99 the moving statistics of a short from-scratch run stay far from the batch
    statistics, and the model predicts about the mean in inference mode.
    """
    image = keras.Input((image_size, image_size, 1), name="image")
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale")(image)  # Xception's own range
    x = layers.Concatenate(name="grey_to_rgb")([x, x, x])
    backbone = keras.applications.Xception(
        include_top=False, weights=None if weights == "none" else weights,
        input_shape=(image_size, image_size, 3), name="xception")
    if bn_momentum is None:
        bn_momentum = 0.9 if weights == "none" else 0.99
    for layer in backbone.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = bn_momentum
    x = layers.GlobalAveragePooling2D(name="pool")(backbone(x))
    inputs = [image]
    if use_sex:
        male = keras.Input((1,), name="male")
        inputs.append(male)
        x = layers.Concatenate(name="with_sex")([x, layers.Dense(16, activation="relu", name="sex_embedding")(male)])
    x = layers.Dropout(dropout, name="dropout")(x)
    if head_units:
        x = layers.Dense(head_units, activation="relu", name="head_dense")(x)
        x = layers.Dropout(dropout, name="head_dropout")(x)
    z = layers.Dense(1, dtype="float32", name="z_score")(x)
    months = layers.Rescaling(age_std, offset=age_mean, dtype="float32", name="months")(z)
    model = keras.Model(inputs, months, name="boneage_xception")
    set_frozen_blocks(model, frozen_layers)
    return model


def target_scaling(model: keras.Model) -> tuple[float, float]:
    """(mean, std) of the target, as built into the model's last layer (for an ensemble, into
    its first member's)."""
    if "months" not in {layer.name for layer in model.layers}:
        model = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    months = model.get_layer("months")
    return float(months.offset), float(months.scale)
