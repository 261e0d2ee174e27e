"""Split-conformal prediction intervals for bone age, from residuals on a calibration split.

    intervals = calibrate(y_true, y_pred, coverage=0.9, by_age=True, calibration="...")
    lower, upper = intervals.bounds(predicted_months)
    print(intervals.describe(predicted_months[0]))   # "10.4 years (90% interval 9.6-11.2)"
    intervals.save(export_dir / "intervals.json"); load_intervals(export_dir)

Split conformal needs only residuals of the final model on images it never trained on: with n
of them, the interval prediction +- (the ceil((n+1) * coverage)-th smallest absolute residual)
covers the true age of a new image with probability at least `coverage`, whatever the model,
as long as the new image is exchangeable with the calibration images. crepes
(`ConformalRegressor`) does that computation; this module chooses the calibration bands and
stores the resulting half-widths so that `predict` and the SavedModel need neither crepes nor
the residuals.

Errors grow with age, so by default the intervals are Mondrian: one half-width per band of the
PREDICTED age (the true age is unknown when predicting), which keeps coverage per band, not
only on average. A band with fewer than `min_per_band` calibration images is merged with its
neighbour, so each band's half-width rests on enough residuals to be finite and stable.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

INTERVALS_FILE = "intervals.json"
BAND_EDGES_MONTHS = (24.0, 72.0, 120.0, 168.0)  # boneage.evaluate.AGE_BANDS_YEARS, in months
MAX_AGE_MONTHS = 240.0


@dataclass
class Intervals:
    coverage: float  # nominal, e.g. 0.9
    edges: list[float]  # inner edges of the predicted-age bands (months); [] = one band
    half_widths: list[float]  # per band (months): the interval is prediction +- this
    counts: list[int]  # calibration images per band
    calibration: str = ""  # what the calibration images were, for the model card
    method: str = "split conformal (crepes ConformalRegressor), Mondrian by predicted age band"

    def band(self, predicted) -> np.ndarray:
        return np.searchsorted(np.asarray(self.edges, float), np.asarray(predicted, float), side="right")

    def bounds(self, predicted) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) in months, clipped to the possible ages 0..240."""
        predicted = np.asarray(predicted, float)
        half = np.asarray(self.half_widths, float)[self.band(predicted)]
        return np.clip(predicted - half, 0.0, MAX_AGE_MONTHS), np.clip(predicted + half, 0.0, MAX_AGE_MONTHS)

    def band_labels(self) -> list[str]:
        cuts = [0.0, *self.edges, MAX_AGE_MONTHS]
        return [f"{lo / 12:g}-{hi / 12:g}y" for lo, hi in zip(cuts[:-1], cuts[1:])]

    def describe(self, predicted_months: float) -> str:
        lower, upper = self.bounds([predicted_months])
        return (f"{predicted_months / 12:.1f} years ({self.coverage:.0%} interval "
                f"{lower[0] / 12:.1f}-{upper[0] / 12:.1f})")

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path) -> None:
        from boneage.config import write_atomic

        write_atomic(path, json.dumps(self.to_dict(), indent=2))


def _merge_small_bands(edges: list[float], band: np.ndarray, min_per_band: int) -> list[float]:
    """Drop inner edges until every band holds at least `min_per_band` calibration images,
    always merging the smallest band into its smaller neighbour."""
    edges = list(edges)
    counts = list(np.bincount(band, minlength=len(edges) + 1))
    while len(counts) > 1 and min(counts) < min_per_band:
        i = int(np.argmin(counts))
        j = i - 1 if i == len(counts) - 1 or (i > 0 and counts[i - 1] <= counts[i + 1]) else i + 1
        lo = min(i, j)
        counts[lo:lo + 2] = [counts[lo] + counts[lo + 1]]
        del edges[lo]  # the edge between bands lo and lo + 1
    return edges


def calibrate(y_true, y_pred, coverage: float = 0.9, by_age: bool = True, min_per_band: int = 30,
              calibration: str = "") -> Intervals:
    """Intervals from a model's predictions `y_pred` on calibration images of true age `y_true`."""
    from crepes import ConformalRegressor

    from boneage.errors import InputError

    y_true, y_pred = np.asarray(y_true, float), np.asarray(y_pred, float)
    if not 0 < coverage < 1:
        raise InputError(f"interval coverage must be between 0 and 1, got {coverage}")
    needed = math.ceil(1 / (1 - coverage)) - 1  # fewer residuals than this give an infinite interval
    if len(y_true) < needed:
        raise InputError(f"{len(y_true)} calibration images are too few for {coverage:.0%} intervals "
                         f"(at least {needed} are needed)")
    if not (np.isfinite(y_true).all() and np.isfinite(y_pred).all()):
        raise InputError("calibration ages and predictions must be finite numbers")
    edges = list(BAND_EDGES_MONTHS) if by_age else []
    edges = _merge_small_bands(edges, np.searchsorted(edges, y_pred, side="right"), max(min_per_band, needed))
    band = np.searchsorted(edges, y_pred, side="right")
    regressor = ConformalRegressor().fit(residuals=y_true - y_pred, bins=band)
    labels = np.arange(len(edges) + 1)
    # The half-width of each band is what crepes gives around a prediction of 0 in that band.
    half_widths = regressor.predict_int(np.zeros(len(labels)), bins=labels, confidence=coverage)[:, 1]
    method = Intervals.method if edges else "split conformal (crepes ConformalRegressor), one band"
    return Intervals(coverage=float(coverage), edges=[float(e) for e in edges],
                     half_widths=[float(h) for h in half_widths],
                     counts=[int(c) for c in np.bincount(band, minlength=len(labels))],
                     calibration=calibration, method=method)


def evaluate_intervals(intervals: Intervals, y_true, y_pred) -> dict:
    """Empirical coverage and mean width on labelled images (e.g. the test split), overall and
    per band of predicted age."""
    y_true, y_pred = np.asarray(y_true, float), np.asarray(y_pred, float)
    lower, upper = intervals.bounds(y_pred)
    inside = (y_true >= lower) & (y_true <= upper)
    band = intervals.band(y_pred)
    by_band = {}
    for i, label in enumerate(intervals.band_labels()):
        mask = band == i
        by_band[label] = {"n": int(mask.sum()), "coverage": float(inside[mask].mean()) if mask.any() else None,
                          "half_width": intervals.half_widths[i]}
    return {"nominal": intervals.coverage, "n": int(len(y_true)),
            "coverage": float(inside.mean()) if len(y_true) else None,
            "mean_width": float((upper - lower).mean()) if len(y_true) else None, "by_band": by_band}


def calibrate_model(model, frame, cfg, calibration: str, batch_size: int = 32, tta: bool = False,
                    report=print) -> Intervals | None:
    """Intervals for `model` from its predictions on the labelled `frame`, per the config's
    `intervals` section; None (and one line saying why) when off or too few images."""
    from boneage.errors import InputError
    from boneage.evaluate import predict_table

    if not cfg.intervals.coverage or frame is None or not len(frame):
        return None
    predicted = predict_table(model, frame, batch_size, tta)
    try:
        return calibrate(frame["boneage"], predicted, cfg.intervals.coverage, cfg.intervals.by_age,
                         cfg.intervals.min_per_band, calibration)
    except InputError as err:
        report(f"no prediction intervals: {err}")
        return None


def from_dict(raw: dict) -> Intervals:
    known = {f for f in Intervals.__dataclass_fields__}
    return Intervals(**{k: v for k, v in raw.items() if k in known})


def load_intervals(export_dir) -> Intervals | None:
    """The intervals saved with an export folder, or None (an export made without them)."""
    from boneage.errors import InputError

    path = Path(export_dir) / INTERVALS_FILE
    if not Path(export_dir).is_dir() or not path.is_file():
        return None
    try:
        return from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        raise InputError(f"{path}: not a valid intervals file ({err})") from None
