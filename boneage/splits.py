"""From a `data` config section to train/validation/test tables, split by age bin and sex.

    splits = load_splits(cfg.data, report=print)
    splits.save(run_dir)          # split_train.csv, split_val.csv, split_test.csv

For `source: phantom` the dataset is generated at `data.root` on first use (see
`boneage.phantom`), so a fresh machine with no network runs the demo. `max_images` takes a
seeded subsample before splitting, for quick runs. When the data is too small for 5 age bins x
sex, the split uses fewer bins, sex only, or no strata, and says so through `report`.

On a cluster the splits travel from the driver to each node, which reads them with its own
paths (`here`: Kaggle's flat or nested folder, or only the prepared cache) and checks its
images against them (`check_here`); `fingerprint` covers ids, labels and image sizes in bytes,
never node-local paths or mtimes.
"""
from __future__ import annotations

import hashlib
import numbers
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from boneage import data
from boneage.config import DataConfig, write_atomic
from boneage.errors import InputError, summarize


@dataclass
class Splits:
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    fingerprint: str  # of ids, labels and image sizes ("" when no node holding the images checked them)
    root: str
    labels_fingerprint: str = ""  # of the labels alone

    def save(self, out_dir) -> None:
        save_split({"train": self.train, "val": self.val, "test": self.test}, out_dir)

    def sizes(self) -> dict:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def all(self) -> pd.DataFrame:
        """The three parts in one table (what `boneage.prepare` caches)."""
        return pd.concat([f for f in (self.train, self.val, self.test) if len(f)], ignore_index=True)


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


def _cached_folders(cfg: DataConfig) -> set:
    if cfg.cache != "prepared":
        return set()
    from boneage.prepare import cached_folders, prepared_dir

    return cached_folders(prepared_dir(cfg))


def _trusted(cfg: DataConfig, image_dir) -> dict:
    """{path: bytes} of the images in image_dir that this node's prepared cache holds."""
    if cfg.cache != "prepared":
        return {}
    from boneage.prepare import prepared_dir, trusted_images

    return trusted_images(prepared_dir(cfg), image_dir)


def image_dir_here(cfg: DataConfig, root=None) -> Path:
    """This node's training image folder under data.root: flat, nested, or (cache: prepared) the
    one whose images only the prepared cache still holds. Paths are resolved on the node that
    reads them: a cluster's nodes may each hold Kaggle's layout their own way."""
    root = Path(root) if root is not None else resolve_root(cfg, report=lambda m: None)
    return data.find_image_dir(root, "training", _cached_folders(cfg))


def read_table(cfg: DataConfig, report=print, images: bool = True) -> tuple[Path, pd.DataFrame]:
    """(root, every checked row). images=False reads and checks the labels alone (the images
    are elsewhere, and checked there)."""
    root = resolve_root(cfg, report)
    trusted, cached = {}, set()
    if images:  # images already prepared were checked then, and may be gone since
        cached = _cached_folders(cfg)
        trusted = _trusted(cfg, data.find_image_dir(root, "training", cached))
    table = data.load_table(root, "training", drop_invalid=cfg.drop_invalid,
                            check_images=cfg.check_images if images else None, report=report,
                            trusted=trusted, cached=cached)
    return root, table


def _subsample(cfg: DataConfig, table):
    if cfg.max_images and cfg.max_images < len(table):
        return table.sample(n=cfg.max_images, random_state=cfg.split_seed).reset_index(drop=True)
    return table


def load_splits(cfg: DataConfig, report=print, images: bool = True) -> Splits:
    root, table = read_table(cfg, report, images)
    return make_splits(cfg, root, table, image_sizes(table, cfg) if images else None, report)


def make_splits(cfg: DataConfig, root, table, sizes=None, report=print) -> Splits:
    """Splits of the checked `table`, subsampled to `max_images`. `sizes` ({id: bytes} of the
    images, from the node that checked them) makes the fingerprint; None leaves it ""."""
    table = _subsample(cfg, table)
    train, val, test = split_table(table, cfg.val_fraction, cfg.test_fraction, cfg.split_seed,
                                   report=report)
    return Splits(train, val, test, fingerprint(table, sizes) if sizes is not None else "", str(root),
                  labels_fingerprint(table))


def here(splits: Splits, cfg: DataConfig) -> Splits:
    """The same splits with the paths of this node's images (see image_dir_here)."""
    root = resolve_root(cfg, report=lambda m: None)
    image_dir = image_dir_here(cfg, root)
    parts = [_with_paths(f, image_dir) for f in (splits.train, splits.val, splits.test)]
    return Splits(*parts, splits.fingerprint, str(root), splits.labels_fingerprint)


def _with_paths(frame, image_dir: Path):
    frame = frame.copy()
    frame["path"] = pd.Series([str(image_dir / f"{i}.png") for i in frame["id"]], index=frame.index, dtype=str)
    return frame


def image_sizes(frame, cfg: DataConfig) -> dict:
    """{id: bytes} of each row's image: from the file, or from the prepared cache holding it
    when the file is gone (the same bytes were prepared). Rows with neither are left out."""
    trusted = {}
    for folder in {os.path.dirname(p) for p in frame["path"].astype(str)}:
        trusted.update(_trusted(cfg, folder))
    sizes = {}
    for id_, path in zip(frame["id"].astype(str), frame["path"].astype(str)):
        try:
            sizes[id_] = os.path.getsize(path)
        except FileNotFoundError:
            if path in trusted:
                sizes[id_] = trusted[path]
    return sizes


def check_here(frame, cfg: DataConfig, drop_invalid: bool = False, report=print) -> tuple:
    """(the rows of `frame` whose images this node holds and that pass data.check_images, with
    this node's paths; {id: bytes} of their images). `frame` carries the ids and labels (the
    driver's); a bad image raises one InputError naming them, or with drop_invalid is dropped
    and reported."""
    image_dir = image_dir_here(cfg)
    table = _with_paths(frame.reset_index(drop=True), image_dir)
    bad = data.image_problems(table["path"], cfg.check_images, _trusted(cfg, image_dir), report)
    if bad:
        reasons = Counter(why for why, _ in bad.values())
        listing = "; ".join(f"{why} ({n} file{'s' if n > 1 else ''}): "
                            + summarize(f"{Path(p).name} {note}".rstrip() for p, (w, note) in bad.items() if w == why)
                            for why, n in reasons.items())
        what = f"{image_dir}: {len(bad)} of {len(table)} images cannot be used here: {listing}"
        if not drop_invalid:
            raise InputError(f"{what}\nFix them or set data.drop_invalid: true to skip them.")
        report(f"{what}; dropped, {len(table) - len(bad)} left.")
        table = table[~table["path"].isin(bad.keys())].reset_index(drop=True)
        if table.empty:
            raise InputError(f"{image_dir}: no usable images left")
    return table, image_sizes(table, cfg)


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


def _strata(frame, bins: int) -> tuple[list, int]:
    """(a stratum label per row, how many strata were merged): age quantile bin x sex, strata
    with < 2 rows merged into a neighbour (same sex and nearest age bin first) so that
    stratified splitting can work."""
    age = frame["boneage"].to_numpy(dtype=float)
    labelled = ~np.isnan(age)
    age_bin = np.full(len(age), -1)  # unlabelled rows get their own bin
    n = int(labelled.sum())
    if n:
        ranks = pd.Series(age[labelled]).rank(method="first").to_numpy()
        age_bin[labelled] = ((ranks - 1) * min(bins, n) // n).astype(int)
    keys = list(zip(age_bin.tolist(), frame["male"].astype(bool).tolist()))
    counts, merged = Counter(keys), 0
    while len(counts) > 1:
        small = min(counts, key=lambda k: (counts[k], k))
        if counts[small] >= 2:
            break
        target = min((k for k in counts if k != small),
                     key=lambda k: (k[1] != small[1], abs(k[0] - small[0]), k))
        keys = [target if k == small else k for k in keys]
        counts, merged = Counter(keys), merged + 1
    return [f"{b}{'m' if m else 'f'}" for b, m in keys], merged


def _split_off(frame, count: int, seed: int, age_bins: int, name: str, report):
    """(rest, part) with `count` rows in part, stratified as finely as the data allows;
    anything coarser than age_bins x sex is reported, naming the part."""
    if count == 0:
        return frame, frame.iloc[:0].copy()
    rows = np.arange(len(frame))
    for bins in range(max(age_bins, 1), 0, -1):  # bins=1: by sex only
        labels, merged = _strata(frame, bins)
        try:
            rest, part = train_test_split(rows, test_size=count, random_state=seed, stratify=labels)
        except ValueError:  # too few rows for this many strata
            continue
        bins, strata = min(bins, len(frame)), len(set(labels))
        used = f"stratified by {bins} age bins x sex" if bins > 1 else "stratified by sex only"
        if merged:
            used += f" ({strata} strata after merging {merged} too small)"
        if strata == 1:
            used = "not stratified (a random split)"
        coarser = bins < age_bins or merged
        break
    else:
        rest, part = train_test_split(rows, test_size=count, random_state=seed)
        used, coarser = "not stratified (a random split)", True
    if report and coarser:
        report(f"split: the {name} split ({count} of {len(frame)} images) is {used}: "
               f"too few images for every stratum of {age_bins} age bins x sex")
    return (frame.iloc[np.sort(rest)].reset_index(drop=True),
            frame.iloc[np.sort(part)].reset_index(drop=True))


def split_table(frame, val_fraction: float, test_fraction: float, seed: int,
                age_bins: int = 5, report=None) -> tuple:
    """(train, val, test), stratified jointly by age quantile bin and sex, deterministic by seed.
    Rows keep their order within each part; a part with fraction 0 is an empty frame. A coarser
    stratification (too few images for age_bins x sex) is said through `report`."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value < 1:
            raise InputError(f"{name} must be a number in [0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1:
        raise InputError(f"val_fraction {val_fraction} + test_fraction {test_fraction} must be below 1")
    n = len(frame)
    n_test = max(1, round(test_fraction * n)) if test_fraction > 0 else 0
    n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
    if n - n_test - n_val < 1:
        raise InputError(f"{n} images are too few for val_fraction {val_fraction} and "
                         f"test_fraction {test_fraction}: no images would be left to train on")
    frame = frame.reset_index(drop=True)
    rest, test = _split_off(frame, n_test, seed, age_bins, "test", report)
    train, val = _split_off(rest, n_val, seed, age_bins, "validation", report)
    return train, val, test


def fingerprint(frame, sizes=None) -> str:
    """sha256 hex[:16] of the sorted (id, boneage, male, image size in bytes) rows: what a trial
    trains on, equal on every node holding the same images however it holds them. `sizes` is
    {id: bytes} (image_sizes: a node that kept only its prepared cache); default: the files'."""
    digest = hashlib.sha256()
    for id_, age, male, path in sorted(zip(frame["id"].astype(str), frame["boneage"],
                                           frame["male"], frame["path"]), key=lambda r: r[0]):
        if sizes is not None and id_ in sizes:
            size = sizes[id_]
        elif sizes is None and os.path.exists(path):
            size = os.path.getsize(path)
        else:
            raise InputError(f"{path}: image not found (nor in a prepared cache), so it cannot be fingerprinted")
        digest.update(f"{id_},{float(age)!r},{bool(male)},{size}\n".encode())
    return digest.hexdigest()[:16]


def labels_fingerprint(frame) -> str:
    """sha256 hex[:16] of the sorted (id, boneage, male) rows: equal wherever the labels are."""
    digest = hashlib.sha256()
    for id_, age, male in sorted(zip(frame["id"].astype(str), frame["boneage"], frame["male"])):
        digest.update(f"{id_},{float(age)!r},{bool(male)}\n".encode())
    return digest.hexdigest()[:16]


def save_split(parts: dict, out_dir) -> None:
    """Write out_dir/split_{name}.csv (id,boneage,male) for each part, atomically."""
    for name, part in parts.items():
        write_atomic(Path(out_dir) / f"split_{name}.csv", part.loc[:, ["id", "boneage", "male"]].to_csv(index=False))
