"""Split-conformal intervals (boneage.conformal): coverage on 1000 phantom radiographs, bands,
agreement with crepes, and the saved form that predict and the SavedModel use."""
import numpy as np
import pandas as pd
import pytest

from boneage.conformal import Intervals, calibrate, evaluate_intervals, from_dict, load_intervals
from boneage.errors import InputError

NOMINAL = 0.9


@pytest.fixture(scope="module")
def phantom_predictions(tmp_path_factory):
    """True ages and a cheap model's predictions for 1000 phantom radiographs: ridge regression
    on 12x12 thumbnails of the images as the project's pipeline decodes them. Split conformal
    holds for any model, however weak (the phantom hides age from such simple features)."""
    import tensorflow as tf
    from sklearn.linear_model import Ridge

    from boneage import data, phantom
    from boneage.pipeline import make_dataset

    root = phantom.generate(tmp_path_factory.mktemp("cover") / "p", n=1000, seed=7, n_test=1, width=64, height=80)
    frame = data.load_table(root, "training", check_images=False)
    ds = make_dataset(frame, 72, 100, training=False, include_sex=False, cache="none")
    thumbs = np.concatenate([tf.image.resize(x["image"], (12, 12), method="area").numpy().reshape(len(y), -1)
                             for x, y in ds])
    features = np.c_[thumbs / 255.0, frame["male"].to_numpy(float)]
    ages = frame["boneage"].to_numpy(float)
    order = np.random.default_rng(0).permutation(len(frame))
    fit = order[:300]
    model = Ridge(alpha=1.0).fit(features[fit], ages[fit])
    rest = order[300:]
    return ages[rest], model.predict(features[rest])


def test_coverage_on_phantom_images_is_nominal(phantom_predictions):
    ages, predicted = phantom_predictions
    cal, test = slice(0, 300), slice(300, None)
    intervals = calibrate(ages[cal], predicted[cal], NOMINAL, by_age=True)
    result = evaluate_intervals(intervals, ages[test], predicted[test])
    assert result["n"] == 400
    assert abs(result["coverage"] - NOMINAL) <= 0.05, result
    mean_predictor_width = 2 * np.quantile(np.abs(ages - ages.mean()), NOMINAL)
    assert result["mean_width"] < mean_predictor_width  # narrower than around the mean age
    # Over many random calibration/test splits of the same 700 images, the mean coverage is
    # what split conformal promises: at least nominal, and not much above it.
    rng = np.random.default_rng(1)
    coverages = []
    for _ in range(100):
        order = rng.permutation(len(ages))
        iv = calibrate(ages[order[:300]], predicted[order[:300]], NOMINAL, by_age=True)
        coverages.append(evaluate_intervals(iv, ages[order[300:]], predicted[order[300:]])["coverage"])
    assert NOMINAL - 0.01 <= np.mean(coverages) <= NOMINAL + 0.03, np.mean(coverages)


def test_bands_follow_the_errors(phantom_predictions):
    ages, predicted = phantom_predictions
    intervals = calibrate(ages[:300], predicted[:300], NOMINAL, by_age=True, min_per_band=30)
    assert len(intervals.half_widths) == len(intervals.edges) + 1 >= 2
    assert min(intervals.counts) >= 30 and sum(intervals.counts) == 300
    single = calibrate(ages[:300], predicted[:300], NOMINAL, by_age=False)
    assert single.edges == [] and single.counts == [300]
    assert min(intervals.half_widths) < single.half_widths[0] < max(intervals.half_widths)


def test_half_widths_are_crepes_split_conformal_quantiles():
    from crepes import ConformalRegressor

    rng = np.random.default_rng(0)
    true = rng.uniform(0, 228, 200)
    pred = true + rng.normal(0, 3 + true / 15)
    intervals = calibrate(true, pred, 0.8, by_age=True, min_per_band=40)
    band = intervals.band(pred)
    for b, half in enumerate(intervals.half_widths):
        residuals = np.sort(np.abs(true - pred)[band == b])
        n = len(residuals)
        rank = int(np.ceil((n + 1) * 0.8))  # the textbook rank; crepes computes it as
        # int((1 - c) * (n + 1)) from the top, which rounding of 1 - 0.8 can make one more
        assert half in (residuals[rank - 1], residuals[min(rank, n - 1)])
    new = np.array([10.0, 80.0, 130.0, 200.0])
    direct = ConformalRegressor().fit(true - pred, bins=band).predict_int(
        new, bins=intervals.band(new), confidence=0.8, y_min=0, y_max=240)
    lower, upper = intervals.bounds(new)
    np.testing.assert_allclose(np.c_[lower, upper], direct)


def test_small_bands_merge_and_too_few_images_is_an_error():
    rng = np.random.default_rng(0)
    true = np.r_[rng.uniform(0, 20, 3), rng.uniform(80, 200, 60)]
    intervals = calibrate(true, true + rng.normal(0, 5, len(true)), NOMINAL, min_per_band=20)
    assert min(intervals.counts) >= 20 and np.isfinite(intervals.half_widths).all()
    with pytest.raises(InputError, match="too few"):
        calibrate(true[:5], true[:5], NOMINAL)


def test_saved_intervals_round_trip_and_describe(tmp_path):
    intervals = Intervals(coverage=0.9, edges=[120.0], half_widths=[6.0, 9.6], counts=[40, 40])
    intervals.save(tmp_path / "intervals.json")
    loaded = load_intervals(tmp_path)
    assert loaded == intervals and from_dict(intervals.to_dict()) == intervals
    assert loaded.describe(124.8) == "10.4 years (90% interval 9.6-11.2)"
    lower, upper = loaded.bounds([3.0, 100.0, 236.0])
    np.testing.assert_allclose(lower, [0.0, 94.0, 226.4])  # clipped at age 0
    np.testing.assert_allclose(upper, [9.0, 106.0, 240.0])  # and at 240 months
    assert load_intervals(tmp_path / "nothing") is None
    (tmp_path / "intervals.json").write_text("{not json")
    with pytest.raises(InputError, match="intervals.json"):
        load_intervals(tmp_path)


def test_group_table_of_a_frame():
    """evaluate_intervals per band on a frame as the report reads it."""
    frame = pd.DataFrame({"boneage": [10.0, 50.0, 150.0], "predicted": [12.0, 70.0, 149.0]})
    intervals = Intervals(coverage=0.9, edges=[24.0], half_widths=[5.0, 10.0], counts=[30, 30])
    result = evaluate_intervals(intervals, frame["boneage"], frame["predicted"])
    assert result["coverage"] == pytest.approx(2 / 3)
    assert result["by_band"]["0-2y"] == {"n": 1, "coverage": 1.0, "half_width": 5.0}
    assert result["by_band"]["2-20y"]["coverage"] == pytest.approx(0.5)
