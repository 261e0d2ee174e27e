"""Predict bone age from radiographs with an exported model.

    python -m boneage predict runs/small/export hand1.png hand2.png --sex M [--format csv|json]
    python -m boneage predict runs/small/export hand.png --sex F --explain hand_gradcam.png
    python -m boneage predict runs/small/export --csv boneage-test-dataset.csv \
        --images boneage-test-dataset/ --out predictions.csv [--labels boneage-test-labels.csv]

Images are decoded by the same function as in training (`boneage.pipeline.prepare_image`).
An export with prediction intervals (`boneage.conformal`) prints each estimate with its
interval, e.g. `10.4 years (90% interval 9.6-11.2)`; `--explain OUT.png` writes the Grad-CAM
overlay of one image (`boneage.explain`).
With `--labels`, the predictions are also scored against that labelled set (e.g. the
challenge's test set) and the MAE is printed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from boneage.errors import InputError


def check_files(paths) -> None:
    """InputError naming every file that is not a usable PNG (missing, broken, too small or large)."""
    from boneage import data

    bad = [(p, data.check_image_file(str(p))) for p in paths]
    bad = [f"{p}: {reason}" for p, reason in bad if reason]
    if bad:
        raise InputError("cannot read image(s):\n  " + "\n  ".join(bad))


def predict_files(model, paths, male: bool) -> np.ndarray:
    """Months for each image file; a file that is not a readable PNG is an InputError naming it."""
    from boneage.evaluate import predict_table

    check_files(paths)
    frame = pd.DataFrame({"id": [Path(p).stem for p in paths], "path": [str(Path(p).resolve()) for p in paths],
                          "boneage": np.nan, "male": male})
    return predict_table(model, frame)


def format_rows(rows: list[dict], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    frame = pd.DataFrame(rows)
    if fmt == "csv":
        return frame.to_csv(index=False).rstrip("\n")
    return frame.to_string(index=False)


def main(args) -> int:
    from boneage.config import write_atomic
    from boneage.export import load_exported

    if bool(args.images_csv) == bool(args.image):
        raise InputError("give either image files or --csv (with --images), not both or neither")
    if args.image and args.sex is None:
        raise InputError("--sex M or --sex F is required with image files")
    explain = getattr(args, "explain", None)
    if explain and len(args.image or []) != 1:
        raise InputError("--explain needs exactly one image file")
    if args.images_csv and not args.images:
        raise InputError("--csv needs --images, the folder holding {Case ID}.png")
    from boneage import data

    if args.image:
        check_files(args.image)  # bad input is refused before the slow model load
    else:
        frame = data.load_test_csv(args.images_csv, args.images, labels_csv=args.labels,
                                   report=lambda message: print(message, file=sys.stderr))
    model = load_exported(args.model)
    if args.image:
        from boneage.conformal import load_intervals

        months = predict_files(model, args.image, male=args.sex.upper() == "M")
        rows = [{"image": str(p), "sex": args.sex.upper(), "months": round(float(m), 1),
                 "years": round(float(m) / 12, 2)} for p, m in zip(args.image, months)]
        intervals = load_intervals(args.model)
        if intervals is not None:
            lower, upper = intervals.bounds(months)
            for row, m, lo, hi in zip(rows, months, lower, upper):
                row.update({"lower_months": round(float(lo), 1), "upper_months": round(float(hi), 1),
                            "estimate": intervals.describe(float(m))})
        print(format_rows(rows, args.format))
        if explain:
            from boneage.explain import explain_file

            try:
                explain_file(model, args.image[0], args.sex.upper() == "M", explain)
            except OSError as err:
                raise InputError(f"--explain {explain}: cannot write there ({err.strerror or err})") from None
            print(f"Grad-CAM overlay written to {explain}", file=sys.stderr)
        return 0

    from boneage.evaluate import error_metrics, format_metrics, predict_table

    months = predict_table(model, frame)
    out = pd.DataFrame({"Case ID": frame["id"], "Sex": np.where(frame["male"], "M", "F"),
                        "boneage": np.round(months, 2)})
    text = out.to_csv(index=False)
    if args.out:
        write_atomic(args.out, text)
        print(f"wrote {len(out)} predictions to {args.out}", file=sys.stderr)
    else:
        print(text, end="")
    if args.labels:
        from boneage.model import target_scaling

        metrics = error_metrics(frame["boneage"], months, frame["male"], target_scaling(model)[0])
        print(f"on {args.labels}: " + format_metrics(metrics), file=sys.stderr)
    return 0
