"""The Xception regressor: sizes, block-wise freezing, weights from a local file, months out."""
import numpy as np
import pytest

keras = pytest.importorskip("keras")

from boneage.model import XCEPTION_BLOCKS, block_of_layers, build_model, set_frozen_blocks, target_scaling  # noqa: E402


def trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.fixture(scope="module")
def model():
    return build_model(71, weights="none", frozen_layers=0, age_mean=120.0, age_std=40.0)


@pytest.mark.parametrize("size", [71, 96])
def test_builds_and_outputs_months(size):
    m = build_model(size, weights="none", use_sex=True, age_mean=100.0, age_std=30.0)
    out = m.predict({"image": np.zeros((2, size, size, 1), np.float32), "male": np.ones((2, 1), np.float32)}, verbose=0)
    assert out.shape == (2, 1)
    assert target_scaling(m) == (100.0, 30.0)
    no_sex = build_model(size, weights="none", use_sex=False)
    assert [i.name for i in no_sex.inputs] == ["image"]


def test_residual_shortcuts_stay_in_their_block(model):
    backbone = model.get_layer("xception")
    blocks = block_of_layers(backbone)
    shortcuts = {layer.filters: blocks[layer.name] for layer in backbone.layers
                 if isinstance(layer, keras.layers.Conv2D) and not layer.name.startswith("block")}
    assert shortcuts == {128: 2, 256: 3, 728: 4, 1024: 13}
    for layer in backbone.layers:  # every BatchNorm shares its block with the conv before it
        if layer.name.endswith("_bn"):
            assert blocks[layer.name] == blocks[layer.name[:-3]]
    assert max(blocks.values()) == XCEPTION_BLOCKS


def test_frozen_layers_freeze_whole_blocks(model):
    counts = []
    for frozen in (0, 1, 4, 12, 14):
        set_frozen_blocks(model, frozen)
        counts.append(trainable_count(model))
        backbone = model.get_layer("xception")
        for name, block in block_of_layers(backbone).items():
            layer = backbone.get_layer(name)
            if layer.weights:
                assert layer.trainable == (block > frozen), (frozen, name)
    assert counts == sorted(counts, reverse=True) and len(set(counts)) == len(counts)
    # 14 = head only: what stays trainable is the sex embedding and the output layer
    head = sum(int(np.prod(w.shape)) for name in ("sex_embedding", "z_score") for w in model.get_layer(name).weights)
    assert counts[-1] == head


def test_frozen_batchnorm_runs_in_inference_mode(model):
    set_frozen_blocks(model, 14)
    bn = model.get_layer("xception").get_layer("block1_conv1_bn")
    before = [w.numpy().copy() for w in bn.non_trainable_weights]
    x = {"image": np.random.default_rng(0).uniform(0, 255, (4, 71, 71, 1)).astype(np.float32),
         "male": np.ones((4, 1), np.float32)}
    model(x, training=True)
    for old, new in zip(before, bn.non_trainable_weights):
        np.testing.assert_array_equal(old, new.numpy())  # moving statistics untouched
    set_frozen_blocks(model, 0)


def test_weights_load_from_a_local_file(tmp_path):
    source = keras.applications.Xception(include_top=False, weights=None, input_shape=(71, 71, 3))
    path = tmp_path / "xception_notop.weights.h5"
    source.save_weights(path)
    model = build_model(71, weights=str(path))
    loaded = model.get_layer("xception")
    for a, b in zip(source.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
