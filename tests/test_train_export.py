"""Train -> evaluate -> export -> predict round trip on a small phantom set, and on real radiographs."""
import json
import re

import numpy as np
import pandas as pd
import pytest

from tests.conftest import HEAD_ONLY, SAMPLE_DATA, needs_sample, tiny_overrides

tf = pytest.importorskip("tensorflow")


def test_run_writes_everything(trained_run):
    out, cfg, results = trained_run
    for name in ["config.yaml", "split_train.csv", "split_val.csv", "split_test.csv", "history.csv",
                 "learning_curves.png", "best.keras", "test_predictions.csv", "test_predictions.png",
                 "metrics.json", "export/model.keras", "export/saved_model", "export/model_card.json"]:
        assert (out / name).exists(), name
    test = results["test"]
    assert test["n"] == len(pd.read_csv(out / "split_test.csv"))
    assert test["mae_ci95"][0] <= test["mae"] <= test["mae_ci95"][1]
    assert set(test["by_sex"]) == {"male", "female"} and len(test["by_age_band"]) == 5
    card = json.loads((out / "export" / "model_card.json").read_text())
    assert card["split_sizes"]["train"] == results["train"]["n_train"]
    assert card["data_fingerprint"] and card["packages"]["tensorflow"] == tf.__version__
    assert card["config"]["model"]["image_size"] == 71
    # intervals calibrated on the validation split, saved with the export, checked on the test split
    assert card["intervals"]["coverage"] == 0.9 and "validation split" in card["intervals"]["calibration"]
    assert sum(card["intervals"]["counts"]) == results["train"]["n_val"]
    assert results["test_intervals"]["n"] == test["n"] and 0 <= results["test_intervals"]["coverage"] <= 1


def test_reloaded_export_predicts_like_the_trained_model(trained_run):
    from boneage.evaluate import predict_table
    from boneage.export import load_exported

    out, _, _ = trained_run
    frame = pd.read_csv(out / "test_predictions.csv")
    reloaded = predict_table(load_exported(out / "export"), _with_paths(out, frame))
    np.testing.assert_allclose(reloaded, frame["predicted"], atol=0.02)  # the CSV keeps 2 decimals


def _with_paths(out, frame):
    split = pd.read_csv(out / "split_test.csv", dtype={"id": str})
    from boneage import data

    root = json.loads((out / "export" / "model_card.json").read_text())["config"]["data"]["root"]
    image_dir = data.find_image_dir(root, "training")
    split["path"] = [str(image_dir / f"{i}.png") for i in split["id"]]
    split = split.set_index("id").loc[frame["id"].astype(str)].reset_index()
    split["predicted"] = frame["predicted"].to_numpy()
    return split


def serve(export_dir, paths, male):
    loaded = tf.saved_model.load(str(export_dir / "saved_model"))
    signature = loaded.signatures["serving_default"]
    png = tf.constant([open(p, "rb").read() for p in paths])
    return signature(png=png, male=tf.constant(male, tf.float32))["months"].numpy()


def test_saved_model_signature_takes_png_bytes(trained_run):
    from boneage.evaluate import predict_table
    from boneage.export import load_exported

    out, _, _ = trained_run
    frame = _with_paths(out, pd.read_csv(out / "test_predictions.csv"))
    served = serve(out / "export", frame["path"], frame["male"].astype(float))
    expected = predict_table(load_exported(out / "export"), frame)
    np.testing.assert_allclose(served, expected, atol=0.5)


def test_predict_cli_and_bad_image(trained_run, tmp_path, capsys):
    """The CLI's own entry point, in this process (a subprocess would spend ~10 s of CPU importing
    TensorFlow again to run the same code)."""
    from boneage.cli import main

    out, _, _ = trained_run
    frame = _with_paths(out, pd.read_csv(out / "test_predictions.csv"))
    path = frame["path"][0]
    capsys.readouterr()
    status = main(["predict", str(out / "export"), path, "--sex", "M" if frame["male"][0] else "F",
                   "--format", "json"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    row = json.loads(captured.out)[0]
    assert abs(row["months"] - frame["predicted"][0]) < 0.5 and abs(row["years"] - row["months"] / 12) < 0.01
    assert row["lower_months"] <= row["months"] <= row["upper_months"]
    assert re.fullmatch(r"\d+\.\d years \(90% interval \d+\.\d-\d+\.\d\)", row["estimate"]), row
    broken = tmp_path / "broken.png"
    broken.write_bytes(open(path, "rb").read()[:200])
    status = main(["predict", str(out / "export"), str(broken), "--sex", "F"])
    stderr = capsys.readouterr().err
    assert status == 2 and "broken.png" in stderr and "Traceback" not in stderr


@needs_sample
def test_train_export_predict_on_real_radiographs(tmp_path, sample_root, capsys):
    """Real 1600x2080 PNGs (3 palette): train, export, then the serving signature on the PNG
    bytes agrees with the model on the pipeline-prepared image, and predict --csv scores the
    labelled test set."""
    from boneage.config import load_config
    from boneage.evaluate import predict_table
    from boneage.train import run

    out = tmp_path / "real"
    cfg = load_config(None, tiny_overrides(sample_root) + [f"model.frozen_layers={HEAD_ONLY}", "data.max_images=24",
                                                           f"data.test_root={sample_root}"])
    results = run(cfg, out, report=lambda m: None)
    assert results["external_test"]["n"] == 20
    from boneage import data
    from boneage.export import load_exported

    test = data.load_table(sample_root, "test")
    served = serve(out / "export", test["path"], test["male"].astype(float))
    expected = predict_table(load_exported(out / "export"), test)
    assert np.abs(served - expected).max() < 0.5
    from boneage.cli import main

    predictions = tmp_path / "predictions.csv"
    capsys.readouterr()
    status = main(["predict", str(out / "export"), "--csv", str(sample_root / "boneage-test-dataset.csv"),
                   "--images", str(data.find_image_dir(sample_root, "test")),
                   "--labels", str(sample_root / "boneage-test-labels.csv"), "--out", str(predictions)])
    stderr = capsys.readouterr().err
    assert status == 0, stderr
    written = pd.read_csv(predictions)
    assert list(written.columns) == ["Case ID", "Sex", "boneage"] and len(written) == 20
    np.testing.assert_allclose(written["boneage"], expected, atol=0.5)
    assert "MAE" in stderr
