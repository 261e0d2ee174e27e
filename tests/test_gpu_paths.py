"""The GPU speed switches (XLA, prefetch to the device, mixed precision) on by default with a GPU:
forced on here, on the CPU, they must run and predict what the plain float32 path predicts."""
import numpy as np
import pytest

from tests.conftest import tiny_overrides

tf = pytest.importorskip("tensorflow")
pytestmark = pytest.mark.slow


def test_xla_device_prefetch_and_mixed_precision_match_the_plain_path(phantom_root):
    import keras

    from boneage.config import load_config
    from boneage.evaluate import predict_table
    from boneage.model import build_model
    from boneage.splits import load_splits
    from boneage.train import _onto_device, train

    # The backbone frozen: XLA compiles Xception's whole training step for ~45 s on 2 cores, the
    # head's in a few; the switches are the same.
    cfg = load_config(None, tiny_overrides(phantom_root) + [
        "train.jit_compile=true", "train.prefetch_to_device=true", "data.max_images=40",
        "model.frozen_layers=14", "train.learning_rate=0.05"])
    splits = load_splits(cfg.data, report=lambda m: None)
    metrics, model = train(cfg, splits)
    assert model.jit_compile is True and np.isfinite(metrics["history"]["loss"]).all()

    # Batches prefetched onto the device are the batches themselves.
    from boneage.pipeline import make_dataset

    plain = make_dataset(splits.val, 71, 4, training=False, cache="none")
    (moved,) = _onto_device(True, plain)
    for (xa, ya), (xb, yb) in zip(plain, moved):
        np.testing.assert_array_equal(xa["image"].numpy(), xb["image"].numpy())
        np.testing.assert_array_equal(ya.numpy(), yb.numpy())

    frame = splits.val
    compiled = predict_table(model, frame)  # the model as compiled by train: XLA
    model.compile(loss="mae", jit_compile=False)
    reference = predict_table(model, frame)
    assert np.ptp(reference) > 0.01  # trained: not one constant
    np.testing.assert_allclose(compiled, reference, atol=0.05)

    m = cfg.model
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        half = build_model(m.image_size, "none", m.frozen_layers, m.use_sex, m.dropout, m.head_units,
                           0.9, metrics["age_mean"], metrics["age_std"])
        half.set_weights(model.get_weights())
        assert half.get_layer("xception").compute_dtype == "float16"
        halved = predict_table(half, frame)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    # float16 keeps ~3 significant digits through 36 layers: within a fraction of a month
    np.testing.assert_allclose(halved, reference, atol=0.02 * metrics["age_std"])
