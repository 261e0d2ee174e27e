"""The lab: which search settings pay for themselves, replayed on recorded learning curves.

    python -m tuning.lab --config configs/demo.yaml --curves curves.csv --seeds 30 \\
        --workers 1 4 16 --budgets 1 2 4 8 16 --json lab.json --plot lab.png

Every method runs `--seeds` times per worker count in simulated time (`tuning.simulator`: the
real TPE sampler and ASHA scheduler, curves from the table, each new trial charged the recorded
start-up) against the table of `tuning.curves`. `--config` is the config the table was recorded
with: its `tune.space`, `train.epochs`, and the shipped `grace_period`, `reduction_factor`,
`brackets`, `multivariate`, `n_startup_trials` and `points_to_evaluate` that the methods vary
around. A budget of B is B
full trials (B x (train.epochs + start-up) epoch-units, all workers together).

For each method, worker count and budget it prints and writes the interquartile mean (IQM) over
seeds of the best validation MAE the search saw, with a bootstrap 95% interval of that IQM, and
the budget at which the method's IQM first reaches random search's IQM at the largest budget
("reaches random"; "-" = never within the largest budget). The recipe's standard deviation over
its seeds (of each seed's best epoch) is printed as the noise yardstick. The same arguments give
the same numbers: every run is seeded by its seed index (0 .. seeds-1), the same for every
method (common random numbers), whatever `--jobs`.

Cost (measured on a table shaped like configs/default.yaml's: 50 configurations, 9 parameters,
30 epochs; 30 seeds, workers 1 4 16, budgets up to 16 full trials): about 250 s of CPU in all,
each TPE + ASHA variant 20-30 s of it, random search 3 s. TPE is not the bottleneck: a
TPE + ASHA run costs about twice a random + ASHA run, the rest being Optuna's in-memory
storage (it deep-copies trials on every tell) and ASHA. `--jobs 2` spreads the runs over two
processes for the two cores of a small machine.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

from boneage.config import write_atomic
from boneage.errors import EXIT_BAD_INPUT, InputError
from tuning.config import max_brackets
from tuning.simulator import Method, Surrogate, best_at, one_epoch_top_k, simulate

TOP_K = "one-epoch top-k"
STEPS = 8  # points per full trial of the best-so-far curves


def make_methods(cfg, recipe: dict | None) -> list[Method]:
    """The methods compared: grace period, reduction factor, brackets and TPE's multivariate
    around the config's own (`tune.*`, the keys a search runs with); "default" is the config as
    shipped (its brackets, its TPE, its points_to_evaluate first, led by the recipe unless the
    recipe is one of them already)."""
    t, epochs = cfg.tune, cfg.train.epochs
    gp, rf = t.grace_period, t.reduction_factor
    methods = [Method("random", "random"), Method("tpe"),
               Method("random+asha", "random", gp, rf),
               Method("tpe+asha complete", grace_period=gp, reduction_factor=rf, truthful=False),
               Method("tpe+asha truthful", grace_period=gp, reduction_factor=rf)]
    for g in sorted({max(1, gp - 1), gp + 1} - {gp}):
        if g < epochs:
            methods.append(Method(f"tpe+asha grace {g}", grace_period=g, reduction_factor=rf))
    for r in sorted({2.0, 4.0} - {float(rf)}):
        methods.append(Method(f"tpe+asha rf {r:g}", grace_period=gp, reduction_factor=r))
    most = max_brackets(gp, epochs, rf)  # as tune.brackets is checked: more would repeat the last
    methods += [Method(f"hyperband {b}", grace_period=gp, reduction_factor=rf, brackets=b)
                for b in sorted({2, 3, t.brackets} - {1}) if b <= most]
    methods.append(Method(f"tpe+asha {'independent' if t.multivariate else 'multivariate'}", grace_period=gp,
                          reduction_factor=rf, multivariate=not t.multivariate))
    methods.append(Method(TOP_K, "random"))
    if recipe is not None:
        methods.append(Method("recipe", "recipe"))
        points = [dict(p) for p in t.points_to_evaluate]
        if not any(_same_point(recipe, p) for p in points):  # a search runs a point once
            points.insert(0, recipe)
        methods.append(Method("default", grace_period=gp, reduction_factor=rf, brackets=t.brackets,
                              points=tuple(points)))
    return methods


def _same_point(recipe: dict, point: dict) -> bool:
    """The recipe is one of the config's points_to_evaluate (the demo's first point is)."""
    def same(a, b):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9)
        except (TypeError, ValueError):
            return str(a) == str(b)
    return recipe.keys() <= point.keys() and all(same(v, point[k]) for k, v in recipe.items())


def iqm(values) -> float:
    from scipy.stats import trim_mean

    return float(trim_mean(np.asarray(values, float), 0.25))


def bootstrap_iqm(values, seed: int = 0, n: int = 2000) -> tuple[float, float]:
    from scipy.stats import trim_mean

    values = np.asarray(values, float)
    draws = np.random.default_rng(seed).integers(len(values), size=(n, len(values)))
    with np.errstate(invalid="ignore"):
        means = trim_mean(values[draws], 0.25, axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def _simulated(method: Method, cfg, lab: Surrogate, workers: int, seeds: int, grid) -> tuple:
    started = time.process_time()
    rows = np.array([best_at(simulate(method, cfg, lab, workers, grid[-1], s).events, grid * lab.full_trial())
                     for s in range(seeds)])
    return rows, time.process_time() - started


def _top_k(cfg, lab: Surrogate, seeds: int, grid) -> tuple:
    started = time.process_time()  # its split depends on the budget (one run per budget), not on workers
    rows = np.array([one_epoch_top_k(cfg, lab, grid, s) for s in range(seeds)])
    return rows, time.process_time() - started


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def run_lab(cfg, lab: Surrogate, methods, seeds: int, workers, budgets, jobs: int = 1, report=print) -> dict:
    """{"grid": budgets in full trials, "curves": {method: {workers: best-so-far (seeds, grid)}},
    "cpu_seconds": {method: s}}. `jobs` processes share the runs; every run is seeded on its
    own, so the numbers do not depend on `jobs`."""
    from concurrent.futures import Future, ProcessPoolExecutor

    grid = np.arange(1, int(max(budgets) * STEPS) + 1) / STEPS
    pool = ProcessPoolExecutor(jobs, initializer=_quiet_optuna) if jobs > 1 else None

    def submit(fn, *args):
        if pool:
            return pool.submit(fn, *args)
        future = Future()
        future.set_result(fn(*args))
        return future

    tasks = {m.name: ({w: submit(_top_k, cfg, lab, seeds, grid) for w in workers[:1]} if m.name == TOP_K else
                      {w: submit(_simulated, m, cfg, lab, w, seeds, grid) for w in workers}) for m in methods}
    curves, seconds = {}, {}
    try:
        for name, by_workers in tasks.items():
            done = {w: f.result() for w, f in by_workers.items()}
            curves[name] = {w: done[w if w in done else workers[0]][0] for w in workers}
            seconds[name] = sum(cpu for _, cpu in done.values())
            report(f"lab: {name}: {seeds} seeds x {len(workers)} worker counts, {seconds[name]:.1f} s CPU")
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    return {"grid": grid, "curves": curves, "cpu_seconds": seconds}


def summarize(run: dict, workers, budgets) -> list[dict]:
    grid, rows = run["grid"], []
    for w in workers:
        target = iqm(run["curves"]["random"][w][:, -1]) if "random" in run["curves"] else math.nan
        for name, by_workers in run["curves"].items():
            table = by_workers[w]
            iqms = np.array([iqm(table[:, j]) for j in range(len(grid))])
            reached = np.nonzero(iqms <= target + 1e-12)[0]
            for b in budgets:
                j = int(np.argmin(np.abs(grid - b)))
                low, high = bootstrap_iqm(table[:, j])
                rows.append({"method": name, "workers": w, "budget": b, "iqm": iqms[j], "ci95": [low, high],
                             "reaches_random_at": float(grid[reached[0]]) if len(reached) else None})
    return rows


def _finite(value):
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value if not isinstance(value, float) or math.isfinite(value) else None


def format_table(rows, workers, budgets, recipe_sd: float) -> str:
    lines = [f"best validation MAE: IQM over seeds [bootstrap 95%]; budget in full trials; "
             f"recipe's SD over its seeds: {recipe_sd:.2f}"]
    for w in workers:
        mine = [r for r in rows if r["workers"] == w]
        names = list(dict.fromkeys(r["method"] for r in mine))
        lines.append(f"\n{w} worker(s)")
        lines.append(f"{'method':<20}" + "".join(f"{f'budget {b:g}':>22}" for b in budgets) + "   reaches random")
        for name in names:
            cells = {r["budget"]: r for r in mine if r["method"] == name}
            text = "".join(f"{cells[b]['iqm']:>8.2f} [{cells[b]['ci95'][0]:.2f}, {cells[b]['ci95'][1]:.2f}]"
                           .rjust(22) for b in budgets)
            reach = cells[budgets[0]]["reaches_random_at"]
            lines.append(f"{name:<20}{text}   {'-' if reach is None else f'{reach:g}'}")
    return "\n".join(lines)


def plot(run: dict, rows, workers, path) -> None:
    import os

    from tuning.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(workers), figsize=(5 * len(workers), 4.5), squeeze=False, sharey=True)
    for ax, w in zip(axes[0], workers):
        for i, (name, by_workers) in enumerate(run["curves"].items()):
            iqms = [iqm(by_workers[w][:, j]) for j in range(len(run["grid"]))]
            ax.plot(run["grid"], iqms, label=name, color=plt.cm.tab20(i % 20), ls=("-", "--", ":")[i % 3],
                    lw=2.5 if name in ("default", "random") else 1.2)
        ax.set(xscale="log", xlabel="budget (full trials)", title=f"{w} worker(s)")
    axes[0][0].set_ylabel("best validation MAE (IQM over seeds)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuning.lab", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="the config the curves were recorded with")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--curves", required=True, help="a table from python -m tuning.curves")
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--budgets", type=float, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--methods", nargs="+", help="only these methods (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="processes (the numbers do not depend on it)")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        return int(exit.code or 0) and EXIT_BAD_INPUT
    try:
        import optuna

        from tuning.config import load_search_config
        from tuning.curves import read_curves
        from tuning.space import parse_space

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if args.seeds < 2 or min(args.workers) < 1 or min(args.budgets) <= 0 or args.jobs < 1:
            raise InputError("--seeds must be 2 or more, --workers and --jobs 1 or more, --budgets above 0")
        cfg = load_search_config(args.config, args.overrides)
        lab = Surrogate(read_curves(args.curves), parse_space(cfg), cfg.train.epochs)
        methods = make_methods(cfg, lab.recipe)
        if args.methods:
            unknown = set(args.methods) - {m.name for m in methods}
            if unknown:
                raise InputError(f"--methods: unknown {', '.join(sorted(unknown))} (known: "
                                 f"{', '.join(m.name for m in methods)})")
            methods = [m for m in methods if m.name in args.methods]
        budgets = sorted(set(args.budgets))
        print(f"lab: {len(lab.ids)} configurations, start-up {lab.startup:.2f} epochs, a full trial "
              f"{lab.full_trial():.2f} epoch-units", flush=True)
        started = time.time()
        run = run_lab(cfg, lab, methods, args.seeds, args.workers, budgets, args.jobs,
                      report=lambda m: print(m, flush=True))
        rows = summarize(run, args.workers, budgets)
        print(format_table(rows, args.workers, budgets, lab.recipe_sd))
        print(f"lab: {time.time() - started:.0f} s in all ({sum(run['cpu_seconds'].values()):.0f} s CPU in the runs)")
        if args.json:
            result = {"curves": args.curves, "config": args.config, "seeds": args.seeds, "workers": args.workers,
                      "budgets": budgets, "startup_epochs": lab.startup, "recipe_sd": _finite(lab.recipe_sd),
                      "cpu_seconds": run["cpu_seconds"],
                      "rows": [{k: _finite(v) for k, v in r.items()} for r in rows]}
            write_atomic(args.json, json.dumps(result, indent=1))
        if args.plot:
            plot(run, rows, args.workers, args.plot)
        return 0
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
