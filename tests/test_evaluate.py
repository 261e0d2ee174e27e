"""Error metrics: MAE with a bootstrap interval, by sex and age band, beside the mean predictor."""
import numpy as np
import pytest

from boneage.evaluate import error_metrics, format_metrics


def test_metrics_on_known_errors():
    y_true = np.array([12.0, 30.0, 100.0, 150.0, 200.0, 220.0])
    y_pred = y_true + np.array([2.0, -4.0, 6.0, -8.0, 10.0, 0.0])
    male = np.array([True, False, True, False, True, False])
    m = error_metrics(y_true, y_pred, male, mean_prediction=120.0, n_boot=500)
    assert m["mae"] == pytest.approx(5.0)
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean(np.array([2, 4, 6, 8, 10, 0]) ** 2)))
    assert m["median_ae"] == pytest.approx(5.0)
    assert m["mean_predictor_mae"] == pytest.approx(np.mean(np.abs(y_true - 120.0)))
    assert m["by_sex"] == {"male": pytest.approx(6.0), "female": pytest.approx(4.0)}
    bands = m["by_age_band"]
    assert bands["0-2y"] == {"mae": pytest.approx(2.0), "n": 1}  # 12 months
    assert bands["2-6y"] == {"mae": pytest.approx(4.0), "n": 1}  # 30 months
    assert bands["6-10y"] == {"mae": pytest.approx(6.0), "n": 1}  # 100 months
    assert bands["10-14y"]["n"] == 1 and bands["14-19y"]["n"] == 2  # 150; 200 and 220
    lo, hi = m["mae_ci95"]
    assert 0 <= lo <= 5.0 <= hi <= 10.0
    text = format_metrics(m)
    assert "MAE 5.00" in text and "female 4.00" in text


def test_empty_groups_are_none_not_nan():
    m = error_metrics([100.0, 110.0], [100.0, 100.0], [True, True], mean_prediction=105.0, n_boot=10)
    assert m["by_sex"]["female"] is None and m["by_age_band"]["0-2y"] == {"mae": None, "n": 0}
    assert "female -" in format_metrics(m)
