"""Replaying one search in simulated time against a recorded curve table (`tuning.curves`).

    lab = Surrogate(read_curves("curves.csv"), parse_space(cfg), epochs=cfg.train.epochs)
    events = simulate(method, cfg, lab, workers=4, budget=16, seed=0)   # [(charged, val_mae)]

`tuning.lab` runs this for every method, seed and worker count. Why not Syne Tune: 0.16.0 (the
newest, checked with `pip download --no-deps`) needs xgboost, statsmodels, dill and
sortedcontainers, none of which the project installs, and its wrapper of Ray Tune schedulers
(`ray_scheduler.py`) is no longer in the wheel; its simulator would drive its own schedulers,
not our `tuning.progress.Scheduler`. So this is a small event loop with simulated time that
drives the real decision code: Optuna's TPE from `tuning.study.make_sampler` through ask/tell
(reporting every epoch as Ray's OptunaSearch does), and ASHA/Hyperband as `tuning.progress.
Scheduler` wraps Ray's `ASHAScheduler`, with stand-ins for what they are handed (a trial with a
trial_id, a controller they never call, the search's saved state as a dict).

The surrogate: a configuration is replayed from its nearest recorded neighbour in normalized
hyperparameter space (each range mapped to [0, 1], in log space for log ranges; a different
choice counts as a whole range). Nearest neighbour rather than a fitted model because tables
hold 24-64 configurations in up to 9 dimensions, too few to fit curves well, and a neighbour
replays a real curve, divergence and plateaus included; its cost: a search can never find
better than the table's best curve. Seed noise: a configuration recorded with k seeds replays
their mean plus a recipe residual (its seeds' deviation from their mean, whole curves, so the
noise of successive epochs stays correlated) scaled to keep one run's variance; for the recipe
itself that is exactly one of its recorded seeds, and a configuration recorded once replays as
recorded (its noise is in it already).

Cost, in epoch-units: every epoch costs 1 and every new trial its start-up (the table's median
start-up over its median epoch), charged when it starts. Every configuration's epoch costs the
same, as the issue's trial-epoch budgets count them; where the space varies image_size or
batch_size, real epochs differ (the `seconds` column has them) and the lab does not see it. A budget B is B full trials, B x
(train.epochs + start-up) units summed over workers. A charge that does not fit ends the
search (trials in flight finish their charged epoch), so the run at the largest budget holds
every smaller budget's run as a prefix: the best at budget b is the best of the epochs charged
up to b.
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from boneage.errors import InputError


@dataclass(frozen=True)
class Method:
    name: str
    searcher: str = "tpe"  # "tpe", "random" or "recipe"
    grace_period: int = 0  # 0: no early stopping
    reduction_factor: float = 3.0
    brackets: int = 1
    truthful: bool = True  # stopped trials told PRUNED (False: COMPLETE, as Ray 2.60 tells them)
    multivariate: bool | None = None  # TPE's tune.multivariate; None: the config's
    points: tuple = ()  # enqueued first, in order


class Surrogate:
    """Curves of a recorded table, looked up by nearest neighbour, with seed noise."""

    def __init__(self, table, space: dict, epochs: int):
        from tuning.curves import RECIPE, STARTUP

        self.space, self.epochs = space, epochs
        missing = [name for name in space if name not in table]
        if missing:
            raise InputError(f"curve table: no column for tune.space parameter(s) {', '.join(missing)}")
        if table["epoch"].max() != epochs:
            raise InputError(f"curve table: curves run to epoch {table['epoch'].max()}, the config's "
                             f"train.epochs is {epochs}")
        runs = {key: g.sort_values("epoch") for key, g in table.groupby(["config_id", "seed"], sort=True)}
        short = [f"{c} seed {s} has {len(g)} rows" for (c, s), g in runs.items() if len(g) != epochs]
        if short:
            raise InputError(f"curve table: {short[0]}, not one per epoch 1..{epochs}")
        by_config: dict = {}
        for (config_id, _), g in runs.items():
            by_config.setdefault(config_id, []).append(g)
        self.ids = list(by_config)
        curves = [np.array([g["val_mae"].to_numpy(float) for g in gs]) for gs in by_config.values()]
        self.means = np.array([c.mean(axis=0) for c in curves])
        self.counts = np.array([len(c) for c in curves])
        self.params = [{k: gs[0][k].iloc[0] for k in space} for gs in by_config.values()]
        self.points = np.array([self.encode(p) for p in self.params])
        recipe = curves[self.ids.index(RECIPE)] if RECIPE in by_config else None
        if recipe is not None and len(recipe) > 1:  # unbiased residuals: their variance is one run's
            residuals = (recipe - recipe.mean(axis=0)) * math.sqrt(len(recipe) / (len(recipe) - 1))
            self.residuals = np.nan_to_num(residuals, nan=0.0, posinf=0.0, neginf=0.0)
        else:
            self.residuals = np.zeros((1, epochs))
        self.recipe = self.params[self.ids.index(RECIPE)] if recipe is not None else None
        epoch_s = np.median(np.concatenate([np.diff(g["seconds"].to_numpy(float)) for g in runs.values()])) \
            if epochs > 1 else math.nan
        startup_s = np.nanmedian(table[STARTUP].to_numpy(float)) if table[STARTUP].notna().any() else 0.0
        self.startup = float(startup_s / epoch_s) if epoch_s > 0 and math.isfinite(startup_s) else 0.0
        self.recipe_sd = float(np.std([np.min(c) for c in recipe], ddof=1)) if recipe is not None and len(recipe) > 1 \
            else math.nan

    def encode(self, params: dict) -> np.ndarray:
        import optuna.distributions as od

        parts = []
        for name, d in self.space.items():
            value = params[name]
            if isinstance(d, od.CategoricalDistribution):
                parts += [float(str(value) == str(c)) / math.sqrt(2) for c in d.choices]
            else:
                f = (lambda x: math.log(x)) if d.log else float
                span = f(d.high) - f(d.low)
                parts.append((f(float(value)) - f(d.low)) / span if span else 0.0)
        return np.array(parts)

    def curve(self, params: dict, rng) -> np.ndarray:
        i = int(np.argmin(((self.points - self.encode(params)) ** 2).sum(axis=1)))
        scale = math.sqrt(1.0 - 1.0 / self.counts[i])
        return self.means[i] + scale * self.residuals[rng.integers(len(self.residuals))]

    def full_trial(self) -> float:
        return self.epochs + self.startup


def tell(study, ot_trial, values: list, ended: str, truthful: bool) -> None:
    """How a finished trial reaches TPE (its epochs were reported as they came, as Ray does).
    ended: "completed", "stopped" (by ASHA or the budget) or "diverged". Truthful: the search's
    own rule, `tuning.study.verdict`, on the result the trial's last report would hold."""
    import optuna

    from tuning.study import verdict

    state = optuna.trial.TrialState
    if not truthful:  # Ray 2.60's OptunaSearch: COMPLETE with the last result; a failed tell is only logged
        try:
            study.tell(ot_trial, values[-1], state=state.COMPLETE)
        except (ValueError, RuntimeError):
            pass
        return
    finite = [v for v in values if math.isfinite(v)]
    last = {"epoch": len(values), "val_mae": values[-1], "diverged": ended == "diverged",
            "ended": ended if ended in ("completed", "diverged") else "",
            "best_val_mae": min(finite) if finite else None}
    told = verdict(last, {epoch: v for epoch, v in enumerate(values, start=1)})
    study.tell(ot_trial, told.value if told.state == state.COMPLETE else None, state=told.state)


def make_study(method: Method, cfg, seed: int):
    import optuna

    from tuning.study import make_sampler

    if method.searcher == "tpe":
        tune = dataclasses.replace(cfg.tune, seed=seed)
        if method.multivariate is not None:
            tune.multivariate = method.multivariate
        sampler = make_sampler(dataclasses.replace(cfg, tune=tune))
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    for point in method.points:
        study.enqueue_trial(dict(point), skip_if_exists=False)
    return study


def make_scheduler(method: Method, epochs: int):
    from tuning.progress import Scheduler

    if not method.grace_period:
        return None
    state = SimpleNamespace(state={"rungs": [], "trial_brackets": {}, "asha_stopped": []})  # what SearchProgress would save
    return Scheduler(state, max_running=0, time_attr="epoch", metric="val_mae", mode="min", max_t=epochs,
                     grace_period=method.grace_period, reduction_factor=method.reduction_factor,
                     brackets=method.brackets)


def simulate(method: Method, cfg, lab: Surrogate, workers: int, budget: float, seed: int):
    """One search. Returns .events: [(units charged when this epoch was charged, its val_mae,
    trial number, epoch)] in the order they were seen; .charged, .trials, .epochs: its costs."""
    from ray.tune.schedulers import TrialScheduler

    rng, np_state = np.random.default_rng([seed, 7]), np.random.get_state()
    np.random.seed(seed)  # ASHA draws each trial's bracket from numpy's global generator
    try:
        study = make_study(method, cfg, seed) if method.searcher != "recipe" else None
        scheduler = make_scheduler(method, lab.epochs)
        limit, charged, events, ended = budget * lab.full_trial(), 0.0, [], False
        queue, order, ids = [], itertools.count(), itertools.count()
        controller = SimpleNamespace(get_trials=lambda: [], search_alg=None)

        def charge(units: float) -> bool:
            nonlocal charged, ended
            if ended or charged + units > limit + 1e-9:
                ended = True
                return False
            charged += units
            return True

        def start(now: float) -> None:
            if not charge(lab.startup + 1):
                return
            if study is None:
                ot_trial, params = None, lab.recipe
            else:
                ot_trial = study.ask(lab.space)
                params = ot_trial.params
            trial = SimpleNamespace(number=next(ids), status="RUNNING", ot=ot_trial,
                                    curve=lab.curve(params, rng), values=[], mark=charged)
            trial.trial_id = f"t{trial.number}"
            if scheduler:
                scheduler.on_trial_add(controller, trial)
            heapq.heappush(queue, (now + lab.startup + 1, next(order), trial))

        def finish(trial, how: str) -> None:
            if study is not None:
                tell(study, trial.ot, trial.values, how, method.truthful)

        for _ in range(workers):
            start(0.0)
        while queue:
            now, _, trial = heapq.heappop(queue)
            epoch = len(trial.values) + 1
            value = float(trial.curve[epoch - 1])
            trial.values.append(value)
            events.append((trial.mark, value, trial.number, epoch))
            if trial.ot is not None:
                trial.ot.report(value, epoch)
            result = {"epoch": epoch, "val_mae": value}
            action = scheduler.on_trial_result(controller, trial, result) if scheduler else TrialScheduler.CONTINUE
            if not math.isfinite(value):
                how = "diverged"  # the trial stops itself there (tuning.trainable)
            elif epoch >= lab.epochs:
                how = "completed"
            elif action == TrialScheduler.STOP:
                how = "stopped"
            elif charge(1):
                trial.mark = charged
                heapq.heappush(queue, (now + 1, next(order), trial))
                continue
            else:
                how = "stopped"  # the budget
            if scheduler:  # as Ray's controller does for every trial that ends
                scheduler.on_trial_complete(controller, trial, result)
            finish(trial, how)
            start(now)
        trials = next(ids)
        return SimpleNamespace(events=events, charged=charged, trials=trials, epochs=len(events))
    finally:
        np.random.set_state(np_state)


def best_at(events: list, budgets_units) -> np.ndarray:
    """Best val_mae among the epochs charged up to each budget (inf where none)."""
    marks = np.array([e[0] for e in events]) if events else np.zeros(0)
    values = np.array([e[1] for e in events]) if events else np.zeros(0)
    return np.array([values[marks <= b + 1e-9].min() if (marks <= b + 1e-9).any() else math.inf
                     for b in budgets_units])


def one_epoch_top_k(cfg, lab: Surrogate, budgets, seed: int) -> np.ndarray:
    """Egele et al.'s baseline, at each budget: half of it on one-epoch trials of random
    configurations, the rest continuing the best of them, each from its checkpoint (so it pays a
    start-up again, not its first epoch). The best val_mae seen, per budget. The configurations
    are drawn once for the largest budget: a smaller one uses the first of them, as its own run would."""
    import optuna

    rng = np.random.default_rng([seed, 7])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    limits = np.asarray(budgets, float) * lab.full_trial()
    counts = [max(1, int(limit / 2 // (lab.startup + 1))) for limit in limits]
    curves = np.array([lab.curve(study.ask(lab.space).params, rng) for _ in range(max(counts))])
    bests = []
    for limit, n in zip(limits, counts):
        spent = n * (lab.startup + 1)
        if spent > limit + 1e-9:
            bests.append(math.inf)
            continue
        k = int((limit - spent) // (lab.startup + lab.epochs - 1)) if lab.epochs > 1 else 0
        probes = curves[:n]
        chosen = probes[np.argsort(probes[:, 0], kind="stable")[:k]]
        chosen = chosen[np.isfinite(chosen[:, 0])]
        bests.append(float(min(probes[:, 0].min(), chosen.min() if len(chosen) else math.inf)))
    return np.array(bests)
