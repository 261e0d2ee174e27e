"""report.html on known inputs, rendered in headless Chromium: sections, images, sortable table."""
import json
import re

import numpy as np
import pandas as pd
import pytest

from boneage.conformal import calibrate, evaluate_intervals
from tests.browser import assert_rendered_page, dump_dom, images_loaded, screenshot, table_column
from tests.test_report import make_study, make_summary, make_trials
from tuning.html_report import write_html_report
from tuning.plots import draw_plots

SECTIONS = ["summary", "final-model", "predictions", "variants", "gallery", "search", "trials", "config"]


def final_outputs(tmp_path, summary):
    """What tuning.assess leaves in final/: test_intervals.csv, a gallery, variants."""
    from boneage.explain import save_overlay

    final = tmp_path / "final"
    rng = np.random.default_rng(1)
    predictions = pd.read_csv(summary["predictions_csv"])
    cal_true = rng.uniform(6, 220, 80)
    intervals = calibrate(cal_true, cal_true + rng.normal(0, 8, 80), 0.9, calibration="80 held-out images")
    lower, upper = intervals.bounds(predictions["predicted"])
    table = predictions.assign(lower=lower, upper=upper)
    final.mkdir()
    table.to_csv(final / "test_intervals.csv", index=False)
    worst = table.assign(error=(table["predicted"] - table["boneage"]).abs()).nlargest(3, "error")
    gallery = []
    yy, xx = np.mgrid[0:72, 0:72]
    for rank, (_, row) in enumerate(worst.iterrows(), start=1):
        image = ((xx + yy) * 1.7 % 255)[..., None]
        heat = np.exp(-((xx - 20 * rank) ** 2 + (yy - 36) ** 2) / 200.0)
        save_overlay(image, heat, final / "gallery" / f"worst_{rank:02d}.png", f"#{rank}")
        gallery.append({"file": f"gallery/worst_{rank:02d}.png", "id": str(row["id"]), "male": bool(row["male"]),
                        "true": row["boneage"], "predicted": row["predicted"], "error": row["error"],
                        "lower": row["lower"], "upper": row["upper"]})
    variants = [{"name": name, "members": k, "tta": tta, "n": 60, "mae": mae, "mae_ci95": [mae - 1, mae + 1],
                 "rmse": mae * 1.25, "coverage": 0.9, "mean_width": 30.0}
                for name, k, tta, mae in [("single", 1, False, 7.0), ("single + TTA", 1, True, 6.8),
                                          ("ensemble of 3", 3, False, 6.5), ("ensemble of 3 + TTA", 3, True, 6.4)]]
    return summary | {"final_dir": str(final), "intervals": intervals.to_dict(), "gallery": gallery,
                      "test_intervals": evaluate_intervals(intervals, table["boneage"], table["predicted"]),
                      "variants": variants, "members": ["a1b2c_00000", "a1b2c_00002"], "exported": "single",
                      "reproduce": "python -m tuning.search --config exp/search_config.yaml --name demo-again",
                      "split_sizes": {"train": 200, "val": 60, "test": 60}}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("html")
    exp = tmp_path / "exp"
    trials = make_trials().assign(ended=lambda t: np.where(t["status"] == "error", "error: CUDA out of memory",
                                                           "ran all 6 epochs"))
    summary = final_outputs(tmp_path, make_summary(tmp_path))
    study = make_study()
    path = write_html_report(exp, trials, study, summary, draw_plots(exp, trials, study, summary))
    return path, trials, summary


def test_report_is_one_self_contained_file(rendered):
    path, _, _ = rendered
    text = path.read_text()
    assert not re.search(r'(src|href)="(?!data:|#)', text)  # nothing loaded from beside it or the web
    for section in SECTIONS:
        assert f'id="{section}"' in text
    assert "python -m tuning.search --config exp/search_config.yaml" in text
    assert "tensorboard --logdir" in text and "optuna-dashboard sqlite:///" in text
    assert "ensemble of 3 + TTA" in text and "CUDA out of memory" in text
    assert "not available" not in text


def test_browser_shows_sections_images_and_sorts_the_table(rendered):
    path, trials, summary = rendered
    dom = dump_dom(path.as_uri() + "#sort=-best_val_mae")
    for section in SECTIONS:
        assert f'id="{section}"' in dom
    # 4 search plots + predictions + intervals + variants + 3 Grad-CAM overlays
    assert images_loaded(dom) == (10, 10)
    assert 'aria-sort="descending"' in dom
    values = [float(v) for v in table_column(dom, "trials-table", "best_val_mae")]
    assert [v for v in values if np.isfinite(v)] == sorted(trials["best_val_mae"].dropna(), reverse=True)
    assert len(values) == len(trials) and np.isnan(values[-1])  # the trial that failed sorts last

def test_screenshot_is_a_rendered_page(rendered, tmp_path):
    path, _, _ = rendered
    png = tmp_path / "report.png"
    screenshot(path.as_uri(), png, 1280, 900)
    assert_rendered_page(png, 1280, 900)
