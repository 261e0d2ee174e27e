"""Grad-CAM (boneage.explain), ensembles (boneage.ensemble) and TTA views (boneage.tta) on the
shared small trained run."""
import numpy as np
import pandas as pd
import pytest

tf = pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def exported(trained_run):
    from boneage import data
    from boneage.export import load_exported

    out, cfg, _ = trained_run
    test = pd.read_csv(out / "split_test.csv", dtype={"id": str})
    image_dir = data.find_image_dir(cfg.data.root, "training")
    test["path"] = [str(image_dir / f"{i}.png") for i in test["id"]]
    return load_exported(out / "export"), test


def test_grad_cam_of_the_exported_model(exported):
    from boneage.evaluate import predict_table
    from boneage.explain import _last_conv_layer, grad_cam, load_image

    model, test = exported
    assert _last_conv_layer(model.get_layer("xception")).name == "block14_sepconv2_act"
    row = test.iloc[0]
    heat, months = grad_cam(model, load_image(row["path"], 71), row["male"])
    assert heat.shape == (71, 71) and heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    assert months == pytest.approx(predict_table(model, test.iloc[:1])[0], abs=0.05)


def test_ensemble_averages_its_members_and_their_maps(exported, trained_run):
    from boneage.ensemble import build_ensemble, members_of
    from boneage.evaluate import predict_table
    from boneage.explain import GradCam, load_image
    from boneage.export import load_exported
    from boneage.model import target_scaling

    model, test = exported
    twin = load_exported(trained_run[0] / "export")
    ensemble = build_ensemble([model, twin])
    assert len(members_of(ensemble)) == 2 and target_scaling(ensemble) == target_scaling(model)
    np.testing.assert_allclose(predict_table(ensemble, test), predict_table(model, test), atol=1e-3)
    image = load_image(test["path"][1], 71)
    single_heat, single_months = GradCam(model)(image, True)
    heat, months = GradCam(ensemble)(image, True)
    np.testing.assert_allclose(heat, single_heat, atol=1e-4)
    assert months == pytest.approx(single_months, abs=1e-3)


def test_tta_views_move_the_image_as_named():
    from boneage.tta import VIEWS, view

    image = np.zeros((1, 50, 50, 1), np.float32)
    image[0, 20, 10] = 255.0
    by_name = {name: view(tf.constant(image), *spec).numpy() for name, *spec in VIEWS}
    np.testing.assert_array_equal(by_name["identity"], image)
    assert np.unravel_index(by_name["mirror"][0, ..., 0].argmax(), (50, 50)) == (20, 39)
    assert np.unravel_index(by_name["shift +4%"][0, ..., 0].argmax(), (50, 50)) == (22, 12)  # 2 px down, right
    assert np.unravel_index(by_name["shift -4%"][0, ..., 0].argmax(), (50, 50)) == (18, 8)
    for name in ("rotate +5", "rotate -5"):  # about the centre: the dot stays at its distance from it
        y, x = np.unravel_index(by_name[name][0, ..., 0].argmax(), (50, 50))
        assert abs(np.hypot(y - 24.5, x - 24.5) - np.hypot(20 - 24.5, 10 - 24.5)) < 1.5 and (y, x) != (20, 10)
