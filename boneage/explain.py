"""Grad-CAM: which parts of a radiograph drive the model's bone-age estimate.

    python -m boneage predict runs/small/export hand.png --sex F --explain hand_gradcam.png

    heat, months = grad_cam(model, image, male)       # image: uint8/float [S, S, 1] as the pipeline makes it
    save_overlay(image, heat, "out.png", title="...")

The model nests the Keras Xception backbone as a layer named "xception". Grad-CAM needs the
activations of its last convolutional stage and the gradient of the output with respect to
them; the outer model is therefore re-traced (`keras.models.clone_model` with a `call_function`,
sharing every layer and weight) so that the backbone call also returns those activations.

A regression has no class score, so the target explained is the estimate's distance from the
training mean age, s * months with s = sign(months - mean): the map ReLU(sum_k w_k A_k), with w_k
the mean gradient over channel k, shows the regions whose features make this hand look older
(or, below the mean, younger) than average. It is upsampled to the input and scaled to 0..1;
should no region push that way, the absolute map is shown instead. For an ensemble export
(several nested bone-age models averaged), the map is the average of its members' maps.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

BACKBONE = "xception"


def _last_conv_layer(backbone):
    """The backbone's last layer with a spatial (4-D) output: block14_sepconv2_act in Xception."""
    for layer in reversed(backbone.layers):
        shape = getattr(layer, "output", None) is not None and layer.output.shape
        if shape is not None and len(shape) == 4:
            return layer
    raise ValueError(f"backbone {backbone.name} has no convolutional layer")


def _members(model) -> list:
    """The bone-age models inside `model`: itself, or the members of an ensemble."""
    names = {layer.name for layer in model.layers}
    if BACKBONE in names:
        return [model]
    members = [layer for layer in model.layers if hasattr(layer, "layers")
               and BACKBONE in {inner.name for inner in layer.layers}]
    if not members:
        raise ValueError(f"model {model.name} has no nested '{BACKBONE}' backbone to explain")
    return members


def _cam_model(member):
    """A model with the member's inputs and outputs [last conv activations, months]."""
    import keras

    backbone = member.get_layer(BACKBONE)
    conv = _last_conv_layer(backbone)
    tapped = keras.Model(backbone.inputs, [conv.output, backbone.output], name=f"{BACKBONE}_tapped")
    taps = []

    def call(layer, *args, **kwargs):
        if layer is backbone:
            activations, features = tapped(*args, **kwargs)
            taps.append(activations)
            return features
        return layer(*args, **kwargs)

    traced = keras.models.clone_model(member, clone_function=lambda layer: layer, call_function=call)
    return keras.Model(traced.inputs, [taps[-1], traced.outputs[0]])


class GradCam:
    """Grad-CAM for one model (or ensemble); build once, call per image."""

    def __init__(self, model):
        from boneage.model import target_scaling

        self.members = [(member, _cam_model(member), target_scaling(member)[0]) for member in _members(model)]

    def __call__(self, image, male: bool | float = 0.0) -> tuple[np.ndarray, float]:
        """(heat map [S, S] in 0..1, predicted months) for one image [S, S, 1] of raw grey levels."""
        import tensorflow as tf

        image = np.asarray(image, np.float32)
        size = image.shape[0]
        maps, months = [], []
        for member, cam_model, mean_age in self.members:
            pixels = tf.constant(image[None])
            features = {"image": pixels}
            if len(member.inputs) > 1:
                features["male"] = tf.constant([[float(male)]], tf.float32)
            with tf.GradientTape() as tape:
                tape.watch(pixels)  # records every op, also through frozen (non-trainable) layers
                activations, predicted = cam_model(features, training=False)
                months_now = tf.reduce_sum(tf.cast(predicted, tf.float32))
                target = months_now if float(months_now) >= mean_age else -months_now
            grads = tape.gradient(target, activations)
            if grads is None:
                raise ValueError("no gradient reaches the backbone's last convolution")
            grads, activations = tf.cast(grads, tf.float32), tf.cast(activations, tf.float32)
            weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
            weighted = tf.reduce_sum(weights * activations, axis=-1)[0]
            cam = tf.nn.relu(weighted)
            if not float(tf.reduce_max(cam)) > 0:
                cam = tf.abs(weighted)
            cam = tf.image.resize(cam[..., None], (size, size), method="bilinear")[..., 0]
            maps.append(cam.numpy())
            months.append(float(predicted.numpy().reshape(-1)[0]))
        heat = np.mean(maps, axis=0)
        peak = float(heat.max())
        return (heat / peak if peak > 0 else heat), float(np.mean(months))


def grad_cam(model, image, male: bool | float = 0.0) -> tuple[np.ndarray, float]:
    """(heat map [S, S] in 0..1, predicted months) for one image [S, S, 1] of raw grey levels."""
    return GradCam(model)(image, male)


def save_overlay(image, heat, path, title: str = "", alpha: float = 0.45) -> Path:
    """The radiograph in grey with the heat map over it (jet, transparent where cold), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grey = np.asarray(image, float).reshape(heat.shape)
    fig, ax = plt.subplots(figsize=(3.2, 3.5 if title else 3.2))
    ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
    ax.imshow(heat, cmap="jet", alpha=alpha * np.clip(heat, 0, 1) ** 0.5, vmin=0, vmax=1)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def load_image(png_path, image_size: int) -> np.ndarray:
    """A PNG as the model sees it: `boneage.pipeline.prepare_image`, uint8 [S, S, 1]."""
    import tensorflow as tf

    from boneage.pipeline import prepare_image

    return prepare_image(tf.io.read_file(str(png_path)), image_size).numpy()


def explain_file(model, png_path, male: bool, out_png, title: str | None = None) -> float:
    """Write the Grad-CAM overlay of one radiograph to `out_png`; returns the predicted months."""
    image = load_image(png_path, int(model.inputs[0].shape[1]))
    heat, months = grad_cam(model, image, male)
    save_overlay(image, heat, out_png, title if title is not None else
                 f"{Path(png_path).name}: {months:.1f} months ({months / 12:.1f} y)")
    return months
