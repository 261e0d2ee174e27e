"""From a `data` config section to train/validation/test tables.

    splits = load_splits(cfg.data, report=print)
    splits.save(run_dir)          # split_train.csv, split_val.csv, split_test.csv

For `source: phantom` the dataset is generated at `data.root` on first use (see
`boneage.phantom`), so a fresh machine with no network runs the demo. `max_images` takes a
seeded subsample before splitting, for quick runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from boneage import data
from boneage.config import DataConfig
from boneage.errors import InputError


@dataclass
class Splits:
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    fingerprint: str
    root: str

    def save(self, out_dir) -> None:
        data.save_split({"train": self.train, "val": self.val, "test": self.test}, out_dir)

    def sizes(self) -> dict:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def resolve_root(cfg: DataConfig, report=print) -> Path:
    if not cfg.root:
        raise InputError("config key data.root is empty: set it to an RSNA-layout folder")
    root = Path(cfg.root).expanduser().resolve()
    if cfg.source == "phantom":
        from boneage import phantom

        if not (root / "phantom.json").exists():
            report(f"generating {cfg.phantom_n} phantom radiographs in {root} (first use) ...")
        phantom.generate(root, cfg.phantom_n, seed=cfg.phantom_seed,
                         progress=_progress_printer(report, "phantom"))
    elif not root.is_dir():
        raise InputError(f"config key data.root: folder not found: {root}")
    return root


def load_splits(cfg: DataConfig, report=print) -> Splits:
    root = resolve_root(cfg, report)
    table = data.load_table(root, "training", drop_invalid=cfg.drop_invalid,
                            check_images=cfg.check_images, report=report)
    if cfg.max_images and cfg.max_images < len(table):
        table = table.sample(n=cfg.max_images, random_state=cfg.split_seed).reset_index(drop=True)
    train, val, test = data.split_table(table, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    return Splits(train, val, test, data.fingerprint(table), str(root))


def load_external_test(cfg: DataConfig, report=print) -> pd.DataFrame | None:
    """The labelled external test set of `data.test_root` (e.g. the challenge test set)."""
    if not cfg.test_root:
        return None
    frame = data.load_table(Path(cfg.test_root).expanduser().resolve(), "test",
                            drop_invalid=cfg.drop_invalid, check_images=cfg.check_images, report=report)
    if frame["boneage"].isna().any():
        raise InputError(f"data.test_root {cfg.test_root}: the test set has no labels "
                         "(boneage-test-labels.csv), so it cannot be evaluated")
    return frame


def _progress_printer(report, what: str):
    last = [-1]

    def progress(done: int, total: int) -> None:
        step = int(10 * done / max(total, 1))
        if step != last[0]:
            last[0] = step
            report(f"  {what}: {done}/{total}")

    return progress
