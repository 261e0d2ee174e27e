"""An ensemble of bone-age models as one Keras model: the mean of its members' months.

    ensemble = build_ensemble([best_model, load_exported("trial_3/model.keras"), ...])

The ensemble has the members' inputs ("image", and "male" when any member uses sex), so it is
evaluated, exported (SavedModel signature included), explained (Grad-CAM averages its members)
and loaded like a single model. Members must share the input image size: each model's
pipeline pads and resizes the radiograph to its own size, and an ensemble takes one image.
"""
from __future__ import annotations

import keras
from keras import layers

ENSEMBLE_NAME = "boneage_ensemble"


def image_size(model) -> int:
    return int(model.inputs[0].shape[1])


def build_ensemble(members: list) -> keras.Model:
    """One model averaging `members` (at least one; all with the same image size)."""
    if not members:
        raise ValueError("an ensemble needs at least one member")
    size = image_size(members[0])
    if any(image_size(m) != size for m in members):
        raise ValueError(f"ensemble members must share one image size, got {[image_size(m) for m in members]}")
    image = keras.Input((size, size, 1), name="image")
    uses_sex = any(len(m.inputs) > 1 for m in members)
    male = keras.Input((1,), name="male") if uses_sex else None
    outputs = []
    for i, member in enumerate(members):
        if getattr(member, "optimizer", None) is not None:
            # A freshly trained model: nest a plain copy, so the ensemble file carries neither
            # optimizer state nor the training loss (which a bare `load_model` cannot rebuild).
            plain = member.__class__.from_config(member.get_config())  # clone_model would compile it
            plain.set_weights(member.get_weights())
            member = plain
        member.name = f"member_{i}"  # loaded members all carry the same name
        features = {"image": image, "male": male} if len(member.inputs) > 1 else {"image": image}
        outputs.append(member(features))
    months = layers.Average(name="ensemble_mean")(outputs) if len(outputs) > 1 else outputs[0]
    return keras.Model([image, male] if uses_sex else [image], months, name=ENSEMBLE_NAME)


def members_of(model) -> list:
    """The member models of an ensemble, or [model] for a single model."""
    if model.name != ENSEMBLE_NAME:
        return [model]
    return [layer for layer in model.layers if isinstance(layer, keras.Model)]
