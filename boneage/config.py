"""One typed config for a training run, read from YAML.

    cfg = load_config("configs/small.yaml", overrides=["train.learning_rate=3e-4"])
    save_config(cfg, run_dir / "config.yaml")        # every run writes its resolved config

Sections: `data` (where the images are and how they are split), `model` (the Xception
regressor), `train` (optimisation). Unknown keys, wrong types and out-of-range values raise
`InputError` naming the dotted key. Overrides are `key.sub=value` strings whose value is parsed
as YAML (`3e-4`, `true`, `[1, 2]`). The tuning layer extends `Config` with its own section
through `load_config(..., config_class=...)`; this module knows nothing about it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from boneage.errors import InputError


def _range(lo=None, hi=None):
    return {"min": lo, "max": hi}


@dataclass
class DataConfig:
    source: Literal["rsna", "phantom"] = "rsna"
    root: str = ""  # RSNA-layout folder; for source=phantom it is generated there on first use
    phantom_n: int = field(default=2000, metadata=_range(8))
    phantom_seed: int = 0
    test_root: Optional[str] = None  # an external labelled test set (e.g. the challenge test set)
    val_fraction: float = field(default=0.15, metadata=_range(0.01, 0.9))
    test_fraction: float = field(default=0.15, metadata=_range(0.0, 0.9))
    split_seed: int = 0
    max_images: int = field(default=0, metadata=_range(0))  # 0 = all; else a seeded subsample
    drop_invalid: bool = False
    check_images: bool = True
    # "prepared": every image decoded once per resolution into a memory-mapped file that all
    # trials share (boneage.prepare); "memory": decoded in each run's first epoch and kept in its
    # memory; "none": decoded every epoch. (A file prefix is no longer accepted: train and
    # validation wrote the same file.)
    cache: Literal["prepared", "memory", "none"] = "prepared"
    prepared_dir: str = ""  # where prepared images live; "" = $XDG_CACHE_HOME/boneage/prepared


@dataclass
class ModelConfig:
    image_size: int = field(default=256, metadata=_range(71, 1024))
    weights: str = "imagenet"  # "imagenet", "none", or a path to a .weights.h5 file
    frozen_layers: int = field(default=0, metadata=_range(0, 14))  # Xception blocks, from the input
    use_sex: bool = True
    dropout: float = field(default=0.2, metadata=_range(0.0, 0.9))
    head_units: int = field(default=0, metadata=_range(0))  # 0 = pooled features straight to the output
    bn_momentum: Optional[float] = field(default=None, metadata=_range(0.0, 1.0))  # None = auto


@dataclass
class TrainConfig:
    epochs: int = field(default=20, metadata=_range(1))
    batch_size: int = field(default=32, metadata=_range(1))
    optimizer: Literal["adam", "adamw"] = "adam"
    learning_rate: float = field(default=1e-3, metadata=_range(1e-8, 10.0))
    weight_decay: float = field(default=0.0, metadata=_range(0.0, 1.0))
    loss: Literal["mae", "mse", "huber"] = "mae"
    schedule: Literal["plateau", "cosine", "constant"] = "plateau"
    plateau_patience: int = field(default=2, metadata=_range(1))
    plateau_factor: float = field(default=0.5, metadata=_range(0.01, 0.99))
    early_stopping_patience: int = field(default=5, metadata=_range(0))  # 0 = off
    head_epochs: int = field(default=0, metadata=_range(0))  # >0: train the head alone first
    head_learning_rate: float = field(default=1e-3, metadata=_range(1e-8, 10.0))
    augment_strength: float = field(default=0.0, metadata=_range(0.0, 1.0))
    mixed_precision: bool = True  # only ever used when a GPU is present
    seed: int = 0
    intra_op_threads: int = field(default=0, metadata=_range(0))  # 0 = TensorFlow's default
    inter_op_threads: int = field(default=0, metadata=_range(0))
    tta: bool = False  # test-time augmentation at evaluation (boneage.tta: mirror, rotations, shifts)
    verbose: int = field(default=2, metadata=_range(0, 2))  # Keras fit verbosity
    jit_compile: Optional[bool] = None  # XLA-compile the train step; None = with a GPU only
    prefetch_to_device: Optional[bool] = None  # batches copied ahead to the GPU; None = with one GPU


@dataclass
class IntervalsConfig:
    """Split-conformal prediction intervals (boneage.conformal), saved with the export."""
    coverage: float = field(default=0.9, metadata=_range(0.0, 0.99))  # 0 = no intervals
    by_age: bool = True  # one half-width per band of predicted age (errors grow with age)
    min_per_band: int = field(default=30, metadata=_range(1))  # smaller bands merge with a neighbour


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    intervals: IntervalsConfig = field(default_factory=IntervalsConfig)


def as_number(value: Any) -> Any:
    """YAML 1.1 reads `3e-4` (no dot) as a string; users mean the number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


# --- reading --------------------------------------------------------------------------------

def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widened to float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise InputError(f"config key {key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is Any:
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise InputError(f"config key {key}: expected a mapping, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise InputError(f"config key {key}: expected a list, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise InputError(f"config key {key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"config key {key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        value = as_number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"config key {key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # NaN passes every range check, so refuse it here
            raise InputError(f"config key {key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise InputError(f"config key {key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def from_dict(cls, raw: Any, where: str = ""):
    """Build dataclass `cls` from a mapping, rejecting unknown keys and bad values by name."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InputError(f"config section {where or '(top level)'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        names = ", ".join(f"{where}.{k}" if where else str(k) for k in unknown)
        raise InputError(f"unknown config key {names} (known here: {', '.join(fields)})")
    values = {}
    for name, value in raw.items():
        key = f"{where}.{name}" if where else name
        value = _coerce(value, hints[name], key)
        lo, hi = fields[name].metadata.get("min"), fields[name].metadata.get("max")
        if value is not None and ((lo is not None and value < lo) or (hi is not None and value > hi)):
            bounds = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
            raise InputError(f"config key {key}: {value!r} is out of range (must be {bounds})")
        values[name] = value
    return cls(**values)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for depth, part in enumerate(parents):
        if node.get(part) is None:  # absent, or a heading the YAML left empty (`train:`)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            prefix = ".".join(parents[:depth + 1])
            raise InputError(f"override {dotted}: {prefix} is a value ({node!r}), not a section")
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.learning_rate=3e-4' -> ('train.learning_rate', 0.0003)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise InputError(f"override {text!r}: expected key.sub=value, e.g. train.learning_rate=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise InputError(f"override {text!r}: value is not valid YAML ({err})") from None
    return key.strip(), value


def load_config(path=None, overrides=(), config_class=Config):
    """Read YAML (or start from defaults when path is None), apply overrides, validate."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise InputError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise InputError(f"config file {path}: expected a mapping at the top level")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
    try:
        return from_dict(config_class, raw)
    except InputError as err:
        raise InputError(f"{path}: {err}" if path else str(err)) from None


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def write_atomic(path, text: str) -> None:
    """Write text to path through a temp file in the same folder, so readers never see half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_config(cfg, path) -> None:
    write_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
