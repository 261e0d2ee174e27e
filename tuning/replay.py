"""A trial that trains nothing: the real trial's protocol (`tuning.trainable`) with each epoch's
validation MAE read from a recorded learning curve or a formula. For tests that need ASHA's
decisions to be deterministic, and for searches of 1,000 trials that measure the search itself.

    tune:
      retrain: false               # required: replayed trials leave no model to retrain
      replay:
        curves: formula            # or a curve CSV; "" (the default) = real training
        seconds_per_epoch: 0.2     # each epoch sleeps this long
        checkpoint_mib: 1          # the payload written into each checkpoint
        noise: 0.5                 # formula only: std of its seeded noise, months

    python -m tuning.search --config configs/demo.yaml --set tune.replay.curves=formula \
        --set tune.replay.seconds_per_epoch=0.2 --set tune.retrain=false

Like a real trial, a replayed one reports per epoch val_mae, epoch, best_val_mae, best_epoch,
diverged, ended, node_id and the rest of `ReportToTune`'s keys (train_mae and loss repeat
val_mae; tensorflow_gpus is 0); checkpoints every `tune.checkpoint_every` epochs (state.json as a
real checkpoint's, with `replay.bin` of `checkpoint_mib` in place of the model) and resumes
from one; diverges (reports inf and stops), stops early after `train.early_stopping_patience`
epochs without a better one, or completes at `train.epochs`. It imports no TensorFlow, reads no
images and skips the node check (`tuning.nodecheck`), which is about images, weights and storage
it does not use.

Curve CSV: `config_id, seed, epoch, val_mae, seconds`, then one column per `tune.space`
parameter, named as there (one row per epoch; `inf` = diverged there, the curve's last row). A
trial replays the curve of the recorded configuration nearest to its own: each parameter scaled
to [0, 1] over its range in `tune.space` (log scale for loguniform and logint), a `choice` 0 when
equal and 1 when not, Euclidean distance, the first in the file on a tie; of that
configuration's seeds, the one `train.seed` and the parameters pick (a stable hash).

The formula, with d = log10(learning_rate / 1e-3) decades from the notebook's rate and u each other
searched parameter's position in [0, 1] (as above; a choice its index over the count - 1):

    floor  = 12 + 4 d^2 + sum(2 u^2)                    months, the best at 1e-3 and low ends
    speed  = 0.6 * 10^min(d, 0)                         a rate 10x too slow learns 10x slower
    val_mae(epoch) = max(0.5, floor + (33.5 - floor) exp(-speed epoch) + noise N(0, noise^2))
    a learning rate above 0.3 diverges at its second epoch (reports inf there and stops)

The noise is drawn from a generator seeded by `train.seed` and the parameters, so a
configuration always gives the same curve and ASHA the same decisions.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import random
import socket
import tempfile
import time
from pathlib import Path

from ray import tune

from boneage.errors import InputError
from tuning.trainable import CHECKPOINT_STATE  # (that module imports TensorFlow only inside its functions)

PAYLOAD = "replay.bin"
COLUMNS = ("config_id", "seed", "epoch", "val_mae", "seconds")
MEAN_PREDICTOR, BEST_RATE, DIVERGING_RATE = 33.5, 1e-3, 0.3


# --- where a configuration sits in the space --------------------------------------------------

def axes(cfg) -> dict:
    """{name: ("choice", [values]) or ("range", low, high, log)} from `tune.space` (checked by
    tuning.space.parse_space when the config was loaded)."""
    found = {}
    for name, spec in cfg.tune.space.items():
        kind, bounds = next(iter(spec.items()))
        found[name] = ("choice", list(bounds)) if kind == "choice" else \
            ("range", float(bounds[0]), float(bounds[1]), kind in ("loguniform", "logint"))
    return found


def position(value, axis) -> float:
    """A numeric value's place in [0, 1] on its axis (log scale for a log range); a choice's index."""
    if axis[0] == "choice":
        names = [str(c) for c in axis[1]]
        return names.index(str(value)) / max(len(names) - 1, 1) if str(value) in names else 1.0
    _, low, high, log = axis
    f = math.log if log else float
    return (f(float(value)) - f(low)) / (f(high) - f(low)) if high > low else 0.5


def distance(a: dict, b: dict, space: dict) -> float:
    total = 0.0
    for name, axis in space.items():
        if axis[0] == "choice":
            total += str(a[name]) != str(b[name])
        else:
            total += (position(a[name], axis) - position(b[name], axis)) ** 2
    return math.sqrt(total)


def _stable_int(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big")


# --- the curves ---------------------------------------------------------------------------------

def load_curves(path, cfg) -> list[dict]:
    """The curve CSV as [{config_id, params, curves: {seed: [val_mae per epoch]}}], checked:
    InputError naming the file and row (or key) of the first problem."""
    path, space = Path(path), axes(cfg)
    where = "tune.replay.curves"
    if not path.is_file():
        raise InputError(f"{where}: no file {path} (a curve CSV, or 'formula')")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in (*COLUMNS, *space) if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path}: missing column(s) {', '.join(missing)} (needs {', '.join(COLUMNS)} and one "
                             f"per tune.space parameter)")
        configs: dict[str, dict] = {}
        for row_number, row in enumerate(reader, start=2):
            try:
                seed, epoch = int(row["seed"]), int(row["epoch"])
                mae, seconds = float(row["val_mae"]), float(row["seconds"])
                params = {n: row[n] if a[0] == "choice" else float(row[n]) for n, a in space.items()}
            except (TypeError, ValueError) as err:
                raise InputError(f"{path}: row {row_number}: not a number where one is needed ({err})") from None
            bad = [n for n, a in space.items() if a[0] == "range" and (not math.isfinite(params[n])
                                                                       or (a[3] and params[n] <= 0))]
            if math.isnan(mae) or mae < 0 or seconds < 0 or epoch < 1 or bad:
                raise InputError(f"{path}: row {row_number}: " + (f"{bad[0]} must be a finite number (above 0 on "
                                 f"a log scale)" if bad else "needs epoch >= 1, val_mae >= 0 or inf, seconds >= 0"))
            entry = configs.setdefault(row["config_id"], {"config_id": row["config_id"], "params": params,
                                                          "curves": {}})
            if entry["params"] != params:
                raise InputError(f"{path}: row {row_number}: config_id {row['config_id']} has other parameters "
                                 f"than on its first row")
            curve = entry["curves"].setdefault(seed, [])
            if epoch != len(curve) + 1 or (curve and math.isinf(curve[-1])):
                raise InputError(f"{path}: row {row_number}: config_id {row['config_id']} seed {seed}: epoch {epoch} "
                                 f"after {len(curve)} (epochs run 1, 2, ... and end at a diverged one)")
            curve.append(mae)
    if not configs:
        raise InputError(f"{path}: no curves")
    for entry in configs.values():
        for seed, curve in entry["curves"].items():
            if len(curve) < cfg.train.epochs and not math.isinf(curve[-1]):
                raise InputError(f"{path}: config_id {entry['config_id']} seed {seed} has {len(curve)} epochs, "
                                 f"train.epochs is {cfg.train.epochs}")
    return list(configs.values())


def recorded_curve(cfg, params: dict, table: list[dict]) -> list[float]:
    """The nearest recorded configuration's curve, of the seed `train.seed` picks."""
    space = axes(cfg)
    nearest = min(table, key=lambda entry: distance(params, entry["params"], space))
    seeds = sorted(nearest["curves"])
    seed = seeds[_stable_int(cfg.train.seed, sorted(params.items())) % len(seeds)]
    return nearest["curves"][seed][:cfg.train.epochs]


def formula_curve(cfg, params: dict, noise: float) -> list[float]:
    """The module docstring's closed form, epochs 1..train.epochs (ending at inf if it diverges)."""
    space = axes(cfg)
    rate = cfg.train.learning_rate
    d = math.log10(rate / BEST_RATE)
    floor = 12 + 4 * d * d + sum(2 * position(params[n], a) ** 2 for n, a in space.items() if n not in
                                 ("learning_rate", "train.learning_rate"))
    speed = 0.6 * 10 ** min(d, 0.0)
    rng = random.Random(_stable_int(cfg.train.seed, sorted(params.items())))
    curve = [max(0.5, floor + (MEAN_PREDICTOR - floor) * math.exp(-speed * e) + rng.gauss(0.0, noise))
             for e in range(1, cfg.train.epochs + 1)]
    if rate > DIVERGING_RATE and len(curve) >= 2:
        curve = curve[:1] + [math.inf]
    return curve


# --- the trial ----------------------------------------------------------------------------------

def epochs_from(curve: list[float], state: dict | None, epochs: int, patience: int):
    """The epochs a trial replays after its checkpoint `state` (None: from the start), as a real
    trial's `boneage.progress.Progress` sees them: yields (epoch, val_mae, best_val_mae,
    best_epoch, diverged, ended) and stops after the epoch that ends it."""
    state = state or {"epoch": 0, "best_val_mae": math.inf, "best_epoch": 0}
    best, best_epoch = state["best_val_mae"], state["best_epoch"]
    for epoch in range(state["epoch"] + 1, epochs + 1):
        val_mae = curve[epoch - 1]
        diverged = not math.isfinite(val_mae)
        if not diverged and val_mae < best:
            best, best_epoch = val_mae, epoch
        ended = ("diverged" if diverged else "completed" if epoch >= epochs else
                 "early_stopping" if patience and epoch - best_epoch >= patience else "")
        yield epoch, val_mae, best, best_epoch, diverged, ended
        if ended:
            return


def replay_trial(params: dict, base: dict, table: list[dict] | None) -> None:
    """Ray's trial function for a replay search (`tuning.search` hands it over when
    `tune.replay.curves` is set); `table` is `load_curves`' result, None for the formula."""
    import ray

    from boneage.config import from_dict
    from tuning.config import SearchConfig
    from tuning.space import apply_params

    cfg = apply_params(from_dict(SearchConfig, base), params)
    replay = cfg.tune.replay
    curve = recorded_curve(cfg, params, table) if table else formula_curve(cfg, params, replay.noise)
    state, checkpoint = None, tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = json.loads((Path(folder) / CHECKPOINT_STATE).read_text())
    history = state["history"] if state else {"val_mae": []}
    node_id = ray.get_runtime_context().get_node_id()
    extra = {"host": socket.gethostname(), "node_id": node_id, "gpu_share": 0.0, "gpu_ids": "",
             "gpu_memory_cap_mib": 0, "tensorflow_gpus": 0}
    payload = b"\0" * int(replay.checkpoint_mib * 2 ** 20)
    for epoch, val_mae, best, best_epoch, diverged, ended in epochs_from(
            curve, state, cfg.train.epochs, cfg.train.early_stopping_patience):
        time.sleep(replay.seconds_per_epoch)
        history["val_mae"].append(val_mae)
        metrics = {"val_mae": val_mae, "train_mae": val_mae, "loss": val_mae, "epoch": epoch, "best_val_mae": best,
                   "best_epoch": best_epoch, "diverged": diverged, "ended": ended,
                   "learning_rate": cfg.train.learning_rate, **extra}
        if diverged or epoch % cfg.tune.checkpoint_every:
            tune.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / PAYLOAD).write_bytes(payload)
            (Path(folder) / CHECKPOINT_STATE).write_text(json.dumps(
                {"epoch": epoch, "best_val_mae": best, "best_epoch": best_epoch, "best_weights": None,
                 "history": history, "node_id": node_id}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
