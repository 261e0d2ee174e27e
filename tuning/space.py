"""The search space, read from the `tune.space` section of the YAML config.

    tune:
      space:
        learning_rate: {loguniform: [1.0e-5, 1.0e-2]}
        frozen_layers: {int: [0, 14]}          # Xception blocks
        augment_strength: {uniform: [0, 1]}
        loss: {choice: [mae, huber]}
      points_to_evaluate:                      # tried first, in order
        - {learning_rate: 1.0e-3, frozen_layers: 0, augment_strength: 0.0, loss: mse}

A parameter is the name of a `model` or `train` key (`learning_rate`), or a dotted key
(`train.learning_rate`). Distributions: `uniform`, `loguniform`, `int`, `logint`, `choice`.
Both ends of every range must be valid config values: `frozen_layers: {int: [0, 20]}` is an
error naming the key, before any trial starts.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from boneage.config import as_number, from_dict
from boneage.errors import InputError

KINDS = ("uniform", "loguniform", "int", "logint", "choice")
SEARCHABLE_SECTIONS = ("model", "train")


def config_key(cfg, name: str) -> str:
    """'learning_rate' -> 'train.learning_rate'; dotted names are checked as they are."""
    if "." in name:
        section, _, key = name.partition(".")
        if section in SEARCHABLE_SECTIONS and key in _fields(getattr(cfg, section)):
            return name
    else:
        owners = [s for s in SEARCHABLE_SECTIONS if name in _fields(getattr(cfg, s))]
        if len(owners) == 1:
            return f"{owners[0]}.{name}"
    known = ", ".join(f for s in SEARCHABLE_SECTIONS for f in _fields(getattr(cfg, s)))
    raise InputError(f"tune.space.{name}: not a searchable parameter (known: {known})")


def _fields(section) -> list[str]:
    return [f.name for f in dataclasses.fields(section)]


def apply_params(cfg, params: dict[str, Any]):
    """A copy of `cfg` with the searched values set, validated like a config file."""
    tree = dataclasses.asdict(cfg)
    for name, value in params.items():
        section, _, key = config_key(cfg, name).partition(".")
        tree[section][key] = value.item() if hasattr(value, "item") else value
    return from_dict(type(cfg), tree)


def parse_space(cfg) -> dict:
    """{param: optuna distribution} from cfg.tune.space; InputError naming the bad entry."""
    import optuna.distributions as od

    space = {}
    for name, spec in cfg.tune.space.items():
        where = f"tune.space.{name}"
        config_key(cfg, name)
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise InputError(f"{where}: expected one of {{{': [...]}, {'.join(KINDS)}: [...]}}, got {spec!r}")
        kind, bounds = next(iter(spec.items()))
        if kind == "choice":
            if not isinstance(bounds, list) or not bounds:
                raise InputError(f"{where}: choice needs a non-empty list of values")
            values = bounds
            distribution = od.CategoricalDistribution(bounds)
        else:
            bounds = [as_number(b) for b in bounds] if isinstance(bounds, list) else bounds
            if (not isinstance(bounds, list) or len(bounds) != 2
                    or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)):
                raise InputError(f"{where}: {kind} needs [low, high] numbers, got {bounds!r}")
            low, high = bounds
            if not all(math.isfinite(b) for b in bounds):
                raise InputError(f"{where}: {kind} needs finite [low, high], got {bounds!r}")
            if low > high:
                raise InputError(f"{where}: low {low} is greater than high {high}")
            log = kind in ("loguniform", "logint")
            if log and low <= 0:
                raise InputError(f"{where}: a log range must be above 0, got low {low}")
            if kind in ("int", "logint"):
                if low != int(low) or high != int(high):
                    raise InputError(f"{where}: int bounds must be whole numbers, got {bounds}")
                distribution = od.IntDistribution(int(low), int(high), log=log)
                values = [int(low), int(high)]
            else:
                distribution = od.FloatDistribution(float(low), float(high), log=log)
                values = [float(low), float(high)]
        for value in values:  # every end of the range must make a valid config
            try:
                apply_params(cfg, {name: value})
            except InputError as err:
                raise InputError(f"{where}: {value!r} is not a valid value ({err})") from None
        space[name] = distribution
    for i, point in enumerate(cfg.tune.points_to_evaluate):
        if not isinstance(point, dict) or set(point) != set(space):
            raise InputError(f"tune.points_to_evaluate[{i}]: must set exactly the searched parameters "
                             f"({', '.join(space)}), got {point!r}")
        for name, value in point.items():
            if not space[name]._contains(space[name].to_internal_repr(value)):
                raise InputError(f"tune.points_to_evaluate[{i}].{name}: {value!r} is outside the space")
    return space
