"""Export a trained model: `.keras`, a TF SavedModel for TF Serving, and `model_card.json`.

    python -m boneage export runs/small/best.keras --out runs/small/export [--config ...]

The folder is built under a temporary name and renamed into place, so a reader (or a crash)
never sees half an export. The SavedModel's default signature takes encoded PNG bytes and sex
(1.0 male, 0.0 female) and returns months, so a TF Serving client does no preprocessing. An
export made with prediction intervals (`boneage.conformal`) keeps them in `intervals.json` and
the model card, and its signature also returns `lower` and `upper` (months):

    saved_model_cli run --dir EXPORT/saved_model --tag_set serve --signature_def serving_default ...
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path

from boneage.conformal import INTERVALS_FILE

MODEL_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
CARD_FILE = "model_card.json"
MAX_AGE = 240.0  # months: interval bounds are clipped to the possible ages
PACKAGES = ("boneage-tune", "tensorflow", "keras", "numpy", "pandas", "scikit-learn", "ray", "optuna")


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def serving_function(model, intervals=None):
    """PNG bytes [N] + sex [N] -> {"months": [N]} (+ "lower", "upper" with intervals), decoding
    with the pipeline's own function."""
    import tensorflow as tf

    from boneage.pipeline import prepare_image

    image_size = int(model.inputs[0].shape[1])
    include_sex = len(model.inputs) > 1

    def serve(png, male):
        images = tf.map_fn(lambda b: prepare_image(b, image_size), png, fn_output_signature=tf.uint8)
        features = {"image": tf.cast(images, tf.float32)}
        if include_sex:
            features["male"] = tf.reshape(tf.cast(male, tf.float32), [-1, 1])
        months = tf.reshape(tf.cast(model(features, training=False), tf.float32), [-1])
        if intervals is None:
            return {"months": months}
        # The same bands and half-widths as boneage.conformal.Intervals.bounds, in graph ops.
        band = (tf.searchsorted(tf.constant(intervals.edges, tf.float32), months, side="right")
                if intervals.edges else tf.zeros_like(months, tf.int32))
        half = tf.gather(tf.constant(intervals.half_widths, tf.float32), band)
        return {"months": months, "lower": tf.clip_by_value(months - half, 0.0, MAX_AGE),
                "upper": tf.clip_by_value(months + half, 0.0, MAX_AGE)}

    signature = [tf.TensorSpec([None], tf.string, name="png"), tf.TensorSpec([None], tf.float32, name="male")]
    return serve, signature


def mixed_layers(model) -> list[str]:
    """Names of the layers that compute in a precision other than float32. (Input layers and
    nested models compute nothing; they take whatever policy is global when a model is loaded.)"""
    import keras

    return [layer.name for layer in model._flatten_layers(include_self=False)
            if not isinstance(layer, (keras.layers.InputLayer, keras.Model))
            and layer.dtype_policy.compute_dtype != "float32"]


def float32_model(model):
    """The same model computing in float32: a copy of a mixed-precision model, else itself.

    A model trained under `mixed_float16` keeps that policy in every layer when saved, so
    serving it on a CPU would run float16 arithmetic (slow there, and its predictions differ from
    float32 ones by rounding). The weights are float32 either way, so the copy is exact.
    """
    import keras

    if not mixed_layers(model):
        return model

    def as_float32(node):
        if isinstance(node, dict):
            if node.get("class_name") in ("DTypePolicy", "FloatDTypePolicy"):
                return {**node, "config": {**node["config"], "name": "float32"}}
            return {key: as_float32(value) for key, value in node.items()}
        if isinstance(node, list):
            return [as_float32(value) for value in node]
        return node

    config = as_float32(keras.saving.serialize_keras_object(model))
    copy = keras.saving.deserialize_keras_object(config)
    copy.set_weights(model.get_weights())
    return copy


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def export_model(model, out_dir, card: dict, intervals=None) -> Path:
    """Write out_dir/{model.keras, saved_model/, model_card.json} atomically; returns out_dir.
    `intervals` (boneage.conformal.Intervals): also intervals.json and lower/upper outputs.

    The export always computes in float32 (see float32_model)."""
    import keras

    model = float32_model(model)
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):  # left by an export that was killed
        if stale == staging or not _alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)
    staging.mkdir()
    try:
        model.save(staging / MODEL_FILE)
        archive = keras.export.ExportArchive()
        archive.track(model)
        serve, signature = serving_function(model, intervals)
        archive.add_endpoint(name="serve", fn=serve, input_signature=signature)
        archive.write_out(str(staging / SAVED_MODEL_DIR), verbose=False)
        card = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "inputs": {"image": f"grey {model.inputs[0].shape[1]}x{model.inputs[0].shape[1]}, raw 0-255",
                       "male": "1.0 male / 0.0 female" if len(model.inputs) > 1 else "ignored"},
            "output": "bone age in months",
            "serving_signature": "serving_default(png: string[N], male: float32[N]) -> months: float32[N]",
            "packages": package_versions(),
            **card,
        }
        if intervals is not None:
            intervals.save(staging / INTERVALS_FILE)
            card["intervals"] = intervals.to_dict()
            card["serving_signature"] = ("serving_default(png: string[N], male: float32[N]) -> months, lower, "
                                         f"upper: float32[N] ({intervals.coverage:.0%} prediction interval)")
        (staging / CARD_FILE).write_text(json.dumps(card, indent=2, default=str))
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
            os.replace(staging, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def load_exported(path):
    """A .keras file, or an export folder holding one. Keras' safe_mode stays on: a model whose
    config carries Python code (a Lambda layer) is refused as bad input. A file that is a .keras
    archive but still fails to load (e.g. saved by a newer Keras) is not the user's input error:
    its exception and traceback go through unchanged."""
    import zipfile

    from boneage.errors import InputError

    path = Path(path)
    model_file = path / MODEL_FILE if path.is_dir() else path
    if not model_file.is_file():
        raise InputError(f"no model at {path} (expected a .keras file or an export folder with {MODEL_FILE})")
    if not zipfile.is_zipfile(model_file):
        raise InputError(f"could not load model {model_file}: not a .keras file (not a zip archive; truncated?)")
    try:
        with zipfile.ZipFile(model_file) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile as err:
        raise InputError(f"could not load model {model_file}: a damaged .keras file ({err})") from None
    if "config.json" not in names:
        raise InputError(f"could not load model {model_file}: not a .keras file (no config.json inside)")
    import keras

    from boneage import runtime

    runtime.ensure_configured(mixed_precision=False)  # inference in a process nobody set up: float32

    try:
        return keras.models.load_model(model_file, compile=False, safe_mode=True)
    except ValueError as err:
        if "safe_mode" not in str(err):
            raise
        refused = str(err).split(". ")[0]  # Keras goes on to suggest safe_mode=False: not for a CLI user
        raise InputError(f"refused to load model {model_file}: it holds Python code that Keras' safe mode "
                         f"does not run ({refused}). Models exported by this project never do; "
                         f"load only models from sources you trust.") from None
