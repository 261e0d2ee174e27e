"""Evaluate a bone-age model on a labelled table: MAE in months, and where it goes wrong.

    python -m boneage evaluate runs/small/export --config configs/small.yaml [--tta]
    python -m boneage evaluate runs/small/export --data ../rsna --part test   # external labelled set

Reports MAE overall with a bootstrap 95% interval, by sex and by age band, RMSE, median
absolute error, and the MAE of the mean predictor (the training mean) on the same images; writes
predicted-vs-true and residual-by-age plots.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

AGE_BANDS_YEARS = [(0, 2), (2, 6), (6, 10), (10, 14), (14, 19)]


def predict_table(model, frame, batch_size: int = 32, tta: bool = False, cache: str = "none") -> np.ndarray:
    """Predicted months for every row of `frame`, in order. TTA averages over the views of
    `boneage.tta` (mirror, small rotations and shifts)."""
    from boneage.pipeline import make_dataset
    from boneage.prepare import opened

    image_size = int(model.inputs[0].shape[1])
    include_sex = len(model.inputs) > 1
    ds = make_dataset(frame, image_size, batch_size, training=False, include_sex=include_sex,
                      cache=cache, with_labels=False, prepared=opened(frame, image_size))
    features = ds.map(lambda x, y: x)
    if tta:
        from boneage.tta import predict_views

        return predict_views(model, features)
    return model.predict(features, verbose=0).reshape(-1).astype(np.float64)


def error_metrics(y_true, y_pred, male, mean_prediction: float, seed: int = 0, n_boot: int = 1000) -> dict:
    y_true, y_pred, male = np.asarray(y_true, float), np.asarray(y_pred, float), np.asarray(male, bool)
    errors = np.abs(y_pred - y_true)
    rng = np.random.default_rng(seed)
    boot = errors[rng.integers(0, len(errors), size=(n_boot, len(errors)))].mean(axis=1)
    by_sex = {name: _mae(errors[mask]) for name, mask in (("male", male), ("female", ~male))}
    by_band = {}
    for lo, hi in AGE_BANDS_YEARS:
        mask = (y_true >= 12 * lo) & (y_true < 12 * hi) if hi < 19 else (y_true >= 12 * lo)
        by_band[f"{lo}-{hi}y"] = {"mae": _mae(errors[mask]), "n": int(mask.sum())}
    return {
        "n": int(len(errors)),
        "mae": float(errors.mean()),
        "mae_ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "rmse": float(np.sqrt(np.mean((y_pred - y_true) ** 2))),
        "median_ae": float(np.median(errors)),
        "mean_predictor_mae": float(np.abs(y_true - mean_prediction).mean()),
        "by_sex": by_sex,
        "by_age_band": by_band,
    }


def _mae(errors) -> float | None:
    return float(errors.mean()) if len(errors) else None


def evaluate(model, frame, train_mean: float, batch_size: int = 32, tta: bool = False,
             out_dir=None, name: str = "test") -> dict:
    """Metrics on a labelled table; with out_dir, also `{name}_predictions.csv` and plots."""
    predictions = predict_table(model, frame, batch_size, tta)
    metrics = error_metrics(frame["boneage"], predictions, frame["male"], train_mean)
    if out_dir:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        table = frame[["id", "boneage", "male"]].assign(predicted=np.round(predictions, 2))
        table.to_csv(out_dir / f"{name}_predictions.csv", index=False)
        plot_predictions(frame["boneage"], predictions, frame["male"], out_dir / f"{name}_predictions.png",
                         title=f"{name}: MAE {metrics['mae']:.1f} months (mean predictor {metrics['mean_predictor_mae']:.1f})")
    return metrics


def plot_predictions(y_true, y_pred, male, path, title: str = "") -> None:
    """Predicted vs true, and residual by age, side by side in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y_true, y_pred, male = np.asarray(y_true, float), np.asarray(y_pred, float), np.asarray(male, bool)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for mask, label, colour in ((male, "male", "tab:blue"), (~male, "female", "tab:red")):
        left.scatter(y_true[mask], y_pred[mask], s=10, alpha=0.6, label=label, c=colour)
        right.scatter(y_true[mask], y_pred[mask] - y_true[mask], s=10, alpha=0.6, label=label, c=colour)
    lim = [0, max(240.0, float(np.nanmax(np.r_[y_true, y_pred])))]
    left.plot(lim, lim, "k--", lw=1)
    left.set(xlim=lim, ylim=lim, xlabel="true bone age (months)", ylabel="predicted (months)")
    right.axhline(0, color="k", lw=1)
    right.set(xlabel="true bone age (months)", ylabel="predicted - true (months)")
    left.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_metrics(metrics: dict) -> str:
    lo, hi = metrics["mae_ci95"]
    lines = [f"MAE {metrics['mae']:.2f} months (95% CI {lo:.2f}-{hi:.2f}, n={metrics['n']}); "
             f"RMSE {metrics['rmse']:.2f}; median AE {metrics['median_ae']:.2f}; "
             f"mean predictor MAE {metrics['mean_predictor_mae']:.2f}"]
    lines.append("  by sex: " + ", ".join(f"{k} {_fmt(v)}" for k, v in metrics["by_sex"].items()))
    lines.append("  by age band: " + ", ".join(
        f"{k} {_fmt(v['mae'])} (n={v['n']})" for k, v in metrics["by_age_band"].items()))
    return "\n".join(lines)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"
