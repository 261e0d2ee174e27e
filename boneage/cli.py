"""Command line: `python -m boneage {phantom,prepare,train,evaluate,export,predict} --help`.

    python -m boneage phantom --out data/phantom --n 2000 --seed 0
    python -m boneage prepare --config configs/small.yaml [--size 96 --size 128]
    python -m boneage train --config configs/small.yaml --set train.epochs=3 --out runs/small
    python -m boneage evaluate runs/small/export --config configs/small.yaml
    python -m boneage export runs/small/best.keras --out runs/small/export2
    python -m boneage predict runs/small/export hand.png --sex F [--explain hand_gradcam.png]

Heavy imports (TensorFlow) happen inside each command, so `--help` and config errors are
instant. Bad input of any kind prints one message and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from boneage.config import Config
from boneage.errors import EXIT_BAD_INPUT, InputError


def _config_args(parser) -> None:
    parser.add_argument("--config", help="YAML config (defaults apply to anything it leaves out)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. train.learning_rate=3e-4 (repeatable)")


def cmd_phantom(args) -> int:
    from boneage import phantom

    def progress(done, total):
        if done == total or done % max(1, total // 10) == 0:
            print(f"  {done}/{total} images", file=sys.stderr)

    out = phantom.generate(Path(args.out), args.n, seed=args.seed, n_test=args.n_test,
                           width=args.width, height=args.height, progress=progress)
    print(f"phantom dataset in {out}")
    return 0


@dataclass
class AnyRunConfig(Config):
    """A training config, or a search config: its `tune` section is read and ignored."""
    tune: dict[str, Any] = field(default_factory=dict)


def cmd_prepare(args) -> int:
    from boneage.config import load_config
    from boneage.prepare import ensure_prepared, prepared_dir
    from boneage.splits import load_splits

    cfg = load_config(args.config, args.overrides, config_class=AnyRunConfig)
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads {args.threads}: must be at least 1")
    for size in args.size or []:
        if size < 8:
            raise InputError(f"--size {size}: too small (at least 8 px)")
    frame = load_splits(cfg.data).all()
    for size in args.size or [cfg.model.image_size]:
        images = ensure_prepared(frame, size, prepared_dir(cfg.data), threads=args.threads)
        print(f"{len(frame)} images at {size} px ready in {images.manifest_path.parent}")
    return 0


def cmd_train(args) -> int:
    from boneage.config import load_config

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out or f"runs/{Path(args.config).stem if args.config else 'default'}")
    from boneage import runtime
    from boneage.train import run

    # the first TensorFlow work of a CLI process, so this sets it up; called in a process that
    # already set TensorFlow up (the tests call the CLI in-process), it keeps that setup
    print(runtime.ensure_configured(cfg.train.intra_op_threads, cfg.train.inter_op_threads,
                                    cfg.train.mixed_precision).describe())
    results = run(cfg, out)
    if "test" in results:
        print(f"test MAE {results['test']['mae']:.2f} months "
              f"(mean predictor {results['test']['mean_predictor_mae']:.2f}); outputs in {out.resolve()}")
    return 0


def cmd_evaluate(args) -> int:
    from boneage import data
    from boneage.config import load_config, write_atomic
    from boneage.evaluate import evaluate, format_metrics
    from boneage.export import load_exported
    from boneage.model import target_scaling

    if args.data:
        frame = data.load_table(Path(args.data), args.part)
        if frame["boneage"].isna().any():
            raise InputError(f"{args.data}: the {args.part} set has no labels to evaluate against")
    else:
        from boneage.splits import load_splits

        cfg = load_config(args.config, args.overrides)
        frame = getattr(load_splits(cfg.data), args.split)
    model = load_exported(args.model)
    out = Path(args.out) if args.out else None
    metrics = evaluate(model, frame, target_scaling(model)[0], tta=args.tta, out_dir=out, name=args.split)
    print(format_metrics(metrics))
    if out:
        write_atomic(out / f"{args.split}_metrics.json", json.dumps(metrics, indent=2))
    return 0


def cmd_export(args) -> int:
    from boneage.export import export_model, load_exported

    model = load_exported(args.checkpoint)
    card = {}
    run_dir = Path(args.checkpoint).parent
    if (run_dir / "metrics.json").is_file():
        card["metrics"] = json.loads((run_dir / "metrics.json").read_text())
    print(f"exported to {export_model(model, args.out, card)}")
    return 0


def cmd_predict(args) -> int:
    from boneage.predict import main

    return main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m boneage", description="Bone-age model library.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write a synthetic phantom dataset in the RSNA layout")
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument("--n", type=int, default=2000, help="training images (default 2000)")
    p.add_argument("--n-test", type=int, default=None, help="test images (default n/10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--height", type=int, default=160)
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("prepare", help="decode and resize every image once into a memory-mapped cache")
    _config_args(p)
    p.add_argument("--size", type=int, action="append", metavar="PX",
                   help="resolution to prepare (repeatable; default the config's model.image_size)")
    p.add_argument("--threads", type=int, help="decoding threads (default: every CPU this process may use)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train, evaluate on the test split and export one model")
    _config_args(p)
    p.add_argument("--out", help="run folder (default runs/<config name>)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="MAE of a model on a labelled set, with plots")
    p.add_argument("model", help="export folder or .keras file")
    _config_args(p)
    p.add_argument("--split", choices=["train", "val", "test"], default="test",
                   help="which split of the config's data to use (default test)")
    p.add_argument("--data", help="instead: an RSNA-layout folder with a labelled part")
    p.add_argument("--part", choices=["training", "test"], default="test", help="with --data")
    p.add_argument("--tta", action="store_true", help="average over mirrored, rotated and shifted views")
    p.add_argument("--out", help="folder for predictions, plots and metrics")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="export a .keras checkpoint as .keras + SavedModel + model card")
    p.add_argument("checkpoint", help="a .keras file, e.g. runs/NAME/best.keras")
    p.add_argument("--out", required=True, help="export folder to create or replace")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="bone age of radiographs (PNG)")
    p.add_argument("model", help="export folder or .keras file")
    p.add_argument("image", nargs="*", help="PNG files")
    p.add_argument("--sex", choices=["M", "F", "m", "f"], help="sex of the patient(s) in the images")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--csv", dest="images_csv", help="a Kaggle test CSV (Case ID,Sex) instead of files")
    p.add_argument("--images", help="with --csv: the folder of {Case ID}.png")
    p.add_argument("--labels", help="with --csv: labels CSV (id,boneage,male) to report MAE against")
    p.add_argument("--out", help="with --csv: predictions CSV to write (default stdout)")
    p.add_argument("--explain", metavar="OUT.png", help="write the Grad-CAM overlay of the (one) image")
    p.set_defaults(func=cmd_predict)
    for sub_parser in sub.choices.values():  # so main() can report a stray flag with its command
        sub_parser.set_defaults(parser=sub_parser)
    return parser


def main(argv=None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # argparse would blame the top-level parser, with a usage line that does not help
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)} "
                          f"(see {args.parser.prog} --help)")
    try:
        return args.func(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
