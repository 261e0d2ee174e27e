"""The curve tables (tuning.curves) and the lab that replays searches on them (tuning.lab,
tuning.simulator), on small tables made here. Everything but the one `slow` recording runs in
process without Ray workers or TensorFlow, in a few seconds."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from boneage.config import save_config
from boneage.errors import EXIT_BAD_INPUT, InputError
from tests.conftest import HEAD_ONLY
from tuning import curves as tc
from tuning.config import load_search_config
from tuning.lab import main as lab_main
from tuning.lab import make_methods, run_lab
from tuning.simulator import Method, Surrogate, simulate
from tuning.space import parse_space

EPOCHS = 4
SPACE = {"learning_rate": {"loguniform": [1.0e-5, 1.0e-1]}, "dropout": {"uniform": [0.0, 0.5]}}


def write_config(tmp_path, **tune) -> "Path":
    cfg = {"data": {"source": "phantom", "root": str(tmp_path / "phantom")},
           "model": {"image_size": 72, "weights": "none"}, "train": {"epochs": EPOCHS, "learning_rate": 1.0e-3},
           "tune": {"grace_period": 1, "reduction_factor": 3, "n_startup_trials": 4, "space": SPACE, **tune}}
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def final_mae(lr: float, dropout: float) -> float:
    """One clearly better region: learning rates near 1e-3 with little dropout."""
    return 10.0 + 8.0 * (math.log10(lr) + 3.0) ** 2 + 12.0 * dropout


def synthetic_table(n: int = 49, noise: float = 0.5, seed: int = 0) -> pd.DataFrame:
    """A grid of n configurations with one seed each, and the recipe (1e-3, 0.2) with 5 seeds."""
    rng = np.random.default_rng(seed)
    side = int(round(math.sqrt(n)))
    grid = [(10 ** (-5 + 4 * (i + 0.5) / side), 0.5 * (j + 0.5) / side) for i in range(side) for j in range(side)]
    runs = [("recipe", s, 1.0e-3, 0.2) for s in range(5)] + [(f"q{k:03d}", 0, lr, d) for k, (lr, d) in enumerate(grid)]
    tables = []
    for config_id, s, lr, d in runs:
        end = final_mae(lr, d)
        values = [end + (40.0 - end) * math.exp(-e) + rng.normal(0, noise) for e in range(1, EPOCHS + 1)]
        seconds = [30.0 + 10.0 * e for e in range(1, EPOCHS + 1)]
        tables.append(tc.trial_rows(config_id, s, {"learning_rate": lr, "dropout": d}, values, seconds, 20.0))
    return pd.concat(tables, ignore_index=True)


@pytest.fixture
def lab_setup(tmp_path):
    cfg = load_search_config(write_config(tmp_path))
    return cfg, Surrogate(synthetic_table(), parse_space(cfg), EPOCHS)


# --- the table --------------------------------------------------------------------------------

def test_curve_table_round_trips(tmp_path):
    table = pd.concat([tc.trial_rows("a", 0, {"loss": "mse", "use_sex": True, "lr": 1.5e-4}, [30.5, math.inf],
                                     [12.0, 20.0], 4.0),
                       tc.trial_rows("b", 3, {"loss": "huber", "use_sex": False, "lr": 2e-3}, [28.0, 25.25],
                                     [11.0, 19.5], math.nan)], ignore_index=True)
    tc.write_curves(table, tmp_path / "c.csv")
    back = tc.read_curves(tmp_path / "c.csv")
    assert list(back.columns) == [*tc.FIXED, "loss", "use_sex", "lr", tc.STARTUP]
    assert back["val_mae"].tolist() == [30.5, math.inf, 28.0, 25.25]
    assert back["loss"].tolist() == ["mse", "mse", "huber", "huber"] and back["lr"].tolist()[2] == 2e-3
    assert [str(v) for v in back["use_sex"]] == ["True", "True", "False", "False"]
    assert back[tc.STARTUP].iloc[0] == 4.0 and math.isnan(back[tc.STARTUP].iloc[2])


def test_bad_tables_and_flags_are_one_message(tmp_path, capsys):
    (tmp_path / "bad.csv").write_text("config_id,seed,epoch\nq0,0,1\n")
    config = write_config(tmp_path)
    assert lab_main(["--config", str(config), "--curves", str(tmp_path / "bad.csv")]) == EXIT_BAD_INPUT
    assert "missing column(s) val_mae, seconds, startup_s" in capsys.readouterr().err
    (tmp_path / "typo.csv").write_text("config_id,seed,epoch,val_mae,seconds,startup_s\nq0,0,one,3,4,5\n")
    with pytest.raises(InputError, match="row 2: epoch 'one'"):
        tc.read_curves(tmp_path / "typo.csv")
    assert tc.main(["record", "--config", str(tmp_path / "none.yaml"), "--out", "x.csv"]) == EXIT_BAD_INPUT
    assert tc.main(["record", "--bogus"]) == EXIT_BAD_INPUT
    assert lab_main(["--config", str(config), "--curves", "x.csv", "--workers", "0"]) == EXIT_BAD_INPUT
    assert "Traceback" not in capsys.readouterr().err


# --- record's bookkeeping ---------------------------------------------------------------------

def test_design_is_seeded_and_grows_by_appending(tmp_path):
    cfg = load_search_config(write_config(tmp_path, points_to_evaluate=[{"learning_rate": 1e-4, "dropout": 0.1}]))
    small, large = tc.design(cfg, 3, 1, 2), tc.design(cfg, 5, 1, 2)
    assert [(j["config_id"], j["seed"]) for j in small] == [("recipe", 0), ("recipe", 1), ("point0", 0),
                                                            ("q000", 0), ("q001", 0), ("q002", 0)]
    assert large[:len(small)] == small and small == tc.design(cfg, 3, 1, 2)
    assert small[0]["params"] == {"learning_rate": 1e-3, "dropout": 0.2}  # the config's own values
    rates = [j["params"]["learning_rate"] for j in large[3:]]
    assert all(1e-5 <= r <= 1e-1 for r in rates) and min(rates) < 1e-3 < max(rates)


def _trial(job):
    return SimpleNamespace(trial_id=f"{job['config_id']}-{job['seed']}", config={"job": job})


def test_recorder_writes_each_finished_trial_and_a_resume_skips_it(tmp_path, capsys):
    cfg = load_search_config(write_config(tmp_path))
    jobs = tc.design(cfg, 2, 1, 1)
    out = tmp_path / "curves.csv"
    flat = [{"config_id": j["config_id"], "seed": j["seed"], **j["params"]} for j in jobs]
    recorder = tc.Recorder(out, pd.DataFrame(), len(jobs), EPOCHS)
    for job, values in zip(flat, ([30.0, 28.0, 27.0, 26.5], [31.0, math.inf], [30.0, 29.0])):
        trial = _trial(job)
        recorder.on_trial_start(0, [], trial)
        for v in values:
            recorder.on_trial_result(0, [], trial, {"val_mae": v})
        recorder.on_trial_complete(0, [], trial)
    table = tc.read_curves(out)  # the third ended short (a budget, a crash): not a whole curve
    assert sorted(set(table["config_id"])) == ["q000", "recipe"] and len(table) == 2 * EPOCHS
    assert table[table["config_id"] == "q000"]["val_mae"].tolist() == [31.0, math.inf, math.inf, math.inf]
    assert "q001 seed 0 ended after 2 of 4 epochs: not recorded" in capsys.readouterr().out
    # a resumed recording runs only what is missing; with nothing missing it starts nothing
    done = set(zip(table["config_id"], table["seed"]))
    assert [j["config_id"] for j in jobs if (j["config_id"], j["seed"]) not in done] == ["q001"]
    tc.write_curves(pd.concat([table, tc.trial_rows("q001", 0, jobs[2]["params"], [1.0] * EPOCHS,
                                                    [1.0] * EPOCHS, 0.0)]), out)
    assert tc.record(cfg, out, 2, 1, 1) == 0
    with pytest.raises(InputError, match="was recorded with other values"):
        tc.record(cfg, out, 2, 1, 1, design_seed=1)


@pytest.mark.slow
def test_a_real_recording_resumes(tmp_path, phantom_root):
    """The real trial code under Ray: 1 trial of 1 epoch at 71 px (about 60-200 s on a loaded 2-core
    machine: Ray's start, the worker's TensorFlow import). The recipe's row is there already."""
    config = {"data": {"source": "rsna", "root": str(phantom_root), "val_fraction": 0.25, "test_fraction": 0.2},
              "model": {"image_size": 71, "weights": "none", "frozen_layers": HEAD_ONLY},
              "train": {"epochs": 1, "batch_size": 16},
              "tune": {"storage_path": str(tmp_path / "experiments"), "resources": {"cpu": 1, "gpu": 0},
                       "space": {"learning_rate": {"loguniform": [1e-4, 1e-2]}}}}
    (tmp_path / "rec.yaml").write_text(yaml.safe_dump(config))
    cfg = load_search_config(tmp_path / "rec.yaml")
    out = tmp_path / "curves.csv"
    tc.write_curves(tc.trial_rows("recipe", 0, {"learning_rate": 1e-3}, [99.0], [5.0], 1.0), out)
    assert tc.record(cfg, out, 1, 1, 1) == 1
    table = tc.read_curves(out)
    assert table.set_index("config_id")["val_mae"]["recipe"] == 99.0  # kept, not run again
    q = table[table["config_id"] == "q000"].iloc[0]
    assert math.isfinite(q["val_mae"]) and q["seconds"] > 0 and q["learning_rate"] == pytest.approx(
        tc.design(cfg, 1, 1, 1)[1]["params"]["learning_rate"], rel=1e-5)


# --- harvest ----------------------------------------------------------------------------------

def test_harvest_takes_whole_curves_of_a_finished_search(tmp_path):
    from tuning.trials_csv import write_trials_csv

    cfg = load_search_config(write_config(tmp_path))
    folder = tmp_path / "demo-20261201-101500"
    folder.mkdir()
    save_config(cfg, folder / "search_config.yaml")
    write_trials_csv(pd.DataFrame([
        {"trial_id": "a1", "status": "completed", "epochs": 4, "val_mae_per_epoch": [30, 25, 22, 21],
         "time_s": 40.0, "param.learning_rate": 1e-3, "param.dropout": 0.1},
        {"trial_id": "a2", "status": "stopped_early", "epochs": 1, "val_mae_per_epoch": [33],
         "time_s": 9.0, "param.learning_rate": 1e-5, "param.dropout": 0.3},
        {"trial_id": "a3", "status": "completed", "epochs": 4, "val_mae_per_epoch": [31, 27, 24, 23],
         "time_s": 80.0, "param.learning_rate": 3e-3, "param.dropout": 0.0}]), folder / "trials.csv")
    (folder / "run_a3").mkdir()
    (folder / "run_a3" / "result.json").write_text("\n".join(
        json.dumps({"trial_id": "a3", "epoch": e, "time_total_s": t}) for e, t in enumerate([35, 50, 65, 80], 1)))
    out = tmp_path / "harvested.csv"
    assert tc.main(["harvest", str(folder), "--out", str(out)]) == 0
    table = tc.read_curves(out)
    assert sorted(set(table["config_id"])) == [f"{folder.name}:a1", f"{folder.name}:a3"]
    a1, a3 = (table[table["config_id"] == f"{folder.name}:{t}"] for t in ("a1", "a3"))
    assert a1["seconds"].tolist() == [10, 20, 30, 40] and a3["seconds"].tolist() == [35, 50, 65, 80]
    assert a3[tc.STARTUP].iloc[0] == 20 and a3["learning_rate"].iloc[0] == 3e-3
    Surrogate(table, parse_space(cfg), EPOCHS)  # the lab reads it
    assert tc.main(["harvest", str(tmp_path / "nothing"), "--out", str(out)]) == EXIT_BAD_INPUT


# --- the lab ----------------------------------------------------------------------------------

def test_tpe_finds_the_good_region_more_often_than_random(lab_setup):
    cfg, lab = lab_setup
    good = 12.0  # only the two recorded configurations nearest (1e-3, 0) reach it
    found = {}
    for name, searcher in (("random", "random"), ("tpe", "tpe")):
        bests = [min(e[1] for e in simulate(Method(name, searcher), cfg, lab, 1, 16, s).events) for s in range(12)]
        found[name] = sum(b < good for b in bests)
    assert found["tpe"] > found["random"], found


def test_asha_stops_the_trials_below_its_cutoff(lab_setup):
    """ASHA with reduction factor 3, grace period 1, one worker: a trial goes on past epoch 1
    only if it is the first there or in the best third of the epoch-1 values before it."""
    cfg, lab = lab_setup
    run = simulate(Method("asha", "random", grace_period=1, reduction_factor=3), cfg, lab, 1, 5, 3)
    ran: dict = {}
    for _, value, number, epoch in run.events:
        ran.setdefault(number, []).append(value)
    seen, stopped = [], 0
    for number in sorted(ran)[:-1]:  # the last may be cut by the budget
        first = -ran[number][0]
        cutoff = np.nanpercentile(seen, (1 - 1 / 3) * 100) if seen else None
        should_stop = cutoff is not None and first < cutoff
        assert (len(ran[number]) == 1) == should_stop, (number, ran[number], seen)
        stopped += should_stop
        seen.append(first)
    assert 0 < stopped < len(ran) - 1


def test_budget_is_never_exceeded_and_start_up_is_charged(lab_setup):
    cfg, lab = lab_setup
    assert lab.startup == pytest.approx(2.0)  # 20 s of start-up over 10 s epochs
    for method in make_methods(cfg, lab.recipe):
        if method.name == "one-epoch top-k":
            continue
        for workers in (1, 3):
            run = simulate(method, cfg, lab, workers, 2.5, 0)
            assert run.charged == pytest.approx(run.epochs + run.trials * lab.startup)
            assert run.charged <= 2.5 * lab.full_trial() + 1e-9 and run.epochs <= 2.5 * EPOCHS
            assert max(e[0] for e in run.events) <= run.charged


def test_lab_is_deterministic_for_a_seed_and_writes_its_outputs(tmp_path, lab_setup, capsys):
    cfg, lab = lab_setup
    methods = [m for m in make_methods(cfg, lab.recipe) if m.name in ("tpe+asha truthful", "hyperband 2", "default")]
    first, again = (run_lab(cfg, lab, methods, 3, [1, 2], [1, 2], jobs, report=lambda m: None) for jobs in (1, 2))
    for name in first["curves"]:
        for w in (1, 2):
            assert np.array_equal(first["curves"][name][w], again["curves"][name][w])
    tc.write_curves(synthetic_table(n=16), tmp_path / "c.csv")
    args = ["--config", str(write_config(tmp_path)), "--curves", str(tmp_path / "c.csv"), "--seeds", "3",
            "--workers", "1", "2", "--budgets", "1", "2", "--json", str(tmp_path / "lab.json"),
            "--plot", str(tmp_path / "lab.png")]
    assert lab_main(args) == 0
    result = json.loads((tmp_path / "lab.json").read_text())
    names = {r["method"] for r in result["rows"]}
    assert {"random", "tpe", "random+asha", "tpe+asha complete", "tpe+asha truthful", "hyperband 3",
            "one-epoch top-k", "recipe", "default"} <= names
    assert len(result["rows"]) == len(names) * 2 * 2
    assert (tmp_path / "lab.png").stat().st_size > 1000 and "reaches random" in capsys.readouterr().out


def test_methods_vary_the_configs_own_brackets_and_tpe(tmp_path):
    """The lab builds its methods from the keys a search runs with (tune.brackets, tune.multivariate)."""
    from tuning.simulator import make_scheduler, make_study

    recipe = {"learning_rate": 1e-3, "dropout": 0.2}
    # 4 epochs, grace 1, rf 3: rungs at epochs 1 and 3, so at most 3 brackets
    cfg = load_search_config(write_config(tmp_path, brackets=2, multivariate=False))
    methods = {m.name: m for m in make_methods(cfg, recipe)}
    assert methods["default"].brackets == 2 and len(make_scheduler(methods["default"], EPOCHS)._brackets) == 2
    assert {"hyperband 2", "hyperband 3"} <= set(methods) and "hyperband 4" not in methods
    assert make_study(methods["default"], cfg, 0).sampler._multivariate is False  # the config's TPE
    assert make_study(methods["tpe+asha multivariate"], cfg, 0).sampler._multivariate is True
    shipped = {m.name: m for m in make_methods(load_search_config(write_config(tmp_path)), recipe)}
    assert shipped["default"].brackets == 1 and "tpe+asha independent" in shipped


def test_stopped_trials_are_told_as_shipped_or_as_the_truth():
    import optuna

    from tuning.simulator import tell

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    distributions = {"x": optuna.distributions.FloatDistribution(0, 1)}
    told = []
    for truthful, ended in ((False, "stopped"), (True, "stopped"), (True, "diverged"), (True, "completed")):
        trial = study.ask(distributions)
        values = [30.0, 20.0, 25.0] if ended != "diverged" else [30.0, math.inf]
        for step, value in enumerate(values, 1):
            trial.report(value, step)
        tell(study, trial, values, ended, truthful)
        frozen = study.trials[-1]
        told.append((frozen.state.name, frozen.value, dict(frozen.intermediate_values)))
    assert told[0][:2] == ("COMPLETE", 25.0)  # Ray 2.60: the last result, as if the trial had finished
    assert told[1][0] == "PRUNED" and told[1][2] == {1: 30.0, 2: 20.0, 3: 25.0}  # kept for TPE's ranking
    assert told[2][0] == "PRUNED" and told[3][:2] == ("COMPLETE", 20.0)  # completed: its best epoch


def test_replay_reads_the_nearest_recorded_curve_with_the_recipes_noise(lab_setup):
    _, lab = lab_setup
    table, rng = synthetic_table(), np.random.default_rng(0)
    recipe = [g["val_mae"].to_numpy() for _, g in table[table["config_id"] == "recipe"].groupby("seed")]
    draws = [lab.curve({"learning_rate": 1.1e-3, "dropout": 0.19}, rng) for _ in range(20)]
    assert all(any(np.allclose(d, r) for r in recipe) for d in draws)  # exactly one of its seeds
    assert len({tuple(np.round(d, 6)) for d in draws}) > 1  # and not always the same one
    q = table[table["config_id"] == "q010"]
    near = {"learning_rate": q["learning_rate"].iloc[0] * 1.05, "dropout": q["dropout"].iloc[0] + 0.01}
    assert np.allclose(lab.curve(near, rng), q["val_mae"].to_numpy())  # recorded once: replayed as recorded
