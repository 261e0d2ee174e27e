"""Test-time augmentation: a prediction averaged over fixed views of each image.

    months = predict_views(model, features)       # features: a tf.data batch stream of model inputs

The views are the identity, the mirror image, small rotations (+-5 degrees) and small shifts
(+-4% of the side, diagonally): changes the model saw in training with augmentation and that
leave the bone age unchanged. Each view is one projective resampling, like
`boneage.pipeline.augment`, with empty borders filled black as the padded images are.
"""
from __future__ import annotations

import math

import numpy as np

# (name, mirror, rotation in degrees, shift as a fraction of the side)
VIEWS = (
    ("identity", False, 0.0, 0.0),
    ("mirror", True, 0.0, 0.0),
    ("rotate +5", False, 5.0, 0.0),
    ("rotate -5", False, -5.0, 0.0),
    ("shift +4%", False, 0.0, 0.04),
    ("shift -4%", False, 0.0, -0.04),
)


def view(images, mirror: bool, degrees: float, shift: float):
    """One view of a batch of images [N, H, W, C] (float32)."""
    import tensorflow as tf

    if mirror:
        images = tf.image.flip_left_right(images)
    if not degrees and not shift:
        return images
    size = tf.cast(tf.shape(images)[1], tf.float32)
    angle = math.radians(degrees)
    cos, sin, centre = math.cos(angle), math.sin(angle), (size - 1.0) / 2.0
    # Inverse map (output pixel -> input pixel), rotating about the centre, then shifting.
    a2 = centre - cos * centre + sin * centre - shift * size
    b2 = centre - sin * centre - cos * centre - shift * size
    transform = tf.stack([cos, -sin, a2, sin, cos, b2, 0.0, 0.0])[None]
    transform = tf.tile(transform, [tf.shape(images)[0], 1])
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transform, output_shape=tf.shape(images)[1:3],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")


def predict_views(model, features, views=VIEWS) -> np.ndarray:
    """The model's prediction averaged over `views`; `features` yields dicts with an "image"."""
    total = None
    for _, mirror, degrees, shift in views:
        viewed = features.map(lambda x, m=mirror, d=degrees, s=shift: {**x, "image": view(x["image"], m, d, s)})
        predicted = model.predict(viewed, verbose=0).reshape(-1).astype(np.float64)
        total = predicted if total is None else total + predicted
    return total / len(views)
