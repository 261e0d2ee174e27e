"""What the Optuna study is told (tuning.study.verdict) and the replay trial (tuning.replay).

One real search of replayed trials (Ray Tune, OptunaSearch, ASHA; the formula's curves at 0.8 s
an epoch (the interrupted trial's last three epochs are the window in which Ctrl-C must land:
1.2 s was too short beside another test worker), 1 CPU a trial, the worker process reused), interrupted with SIGINT while its fourth
trial runs, then resumed with its time budget spent, is shared by the tests that inspect it: one
trial completes, ASHA stops one at its rung, one diverges, and the interrupted one is closed in
the study, then cut by the budget and added anew. It runs in this process, as the CLI would,
with Ray's workers given a `tensorflow` and a `keras` that fail on import: no trial of a replay
search may import TensorFlow. It costs 40-65 s on 2 busy cores, most of it Ray's start-up; it
cannot share tests/test_search.py's `finished_search`, which trains for real and is neither
interrupted nor cut by a budget. The path where a closed trial runs to its end after a resume is
tested on the searcher itself (real Optuna, no Ray), as are the verdict, the replay's curves and
its resume from a checkpoint: milliseconds.
"""
import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402

from tuning.study import RAY_TRIAL, verdict  # noqa: E402

NAME, BUDGET_S = "truth", 300
POINTS = [1.0e-3, 1.0e-5, 0.9, 5.0e-5]  # completes; ASHA stops it at epoch 2; diverges at 2; interrupted


# --- the pure verdict -----------------------------------------------------------------------------

def result(epoch, val_mae, ended="", diverged=False, best=None):
    return {"epoch": epoch, "val_mae": val_mae, "ended": ended, "diverged": diverged,
            "best_val_mae": best if best is not None else val_mae}


def test_verdict_for_every_way_a_trial_ends():
    curve = {1: 30.0, 2: 25.0, 3: 27.0}
    # ran its course: COMPLETE with the best epoch's value (the retrain trains to that epoch)
    assert verdict(result(4, 26.0, "completed", best=25.0), curve, 4) == (TrialState.COMPLETE, 25.0)
    assert verdict(result(3, 27.0, "early_stopping", best=25.0), curve, 10) == (TrialState.COMPLETE, 25.0)
    assert verdict(result(4, 26.0, "", best=25.0), curve, 4).state == TrialState.COMPLETE  # reached max_epochs
    # stopped by ASHA or a budget: PRUNED, the value its last epoch's, the last result's epoch added
    assert verdict(result(3, 27.0), {1: 30.0, 2: 25.0}, 4) == (TrialState.PRUNED, 27.0)
    assert verdict(None, {}, 4) == (TrialState.PRUNED, None)  # stopped before its first epoch
    # diverged: PRUNED at the epoch it diverged, however good an epoch before was
    assert verdict(result(2, math.inf, "diverged", True, best=30.0), {1: 30.0}, 4) == (TrialState.PRUNED, math.inf)
    assert verdict(result(2, 30.0), {1: 30.0}, 4, error=True) == (TrialState.FAIL, None)


def searcher(tmp_path):
    from tuning.config import load_search_config
    from tuning.space import parse_space
    from tuning.study import make_searcher
    from tuning.study_storage import study_url

    cfg = load_search_config(None, ["train.epochs=4", "tune.space={learning_rate: {loguniform: [1.0e-5, 1.0]}}"])
    return make_searcher(cfg, parse_space(cfg), study_url(cfg, tmp_path), "unit", "val_mae", "min")


def test_the_searcher_tells_the_truth_and_a_closed_trial_comes_back_whole(tmp_path):
    import pickle

    from tuning.study_storage import fail_running_trials, open_storage

    search = searcher(tmp_path)
    for trial_id in ("done", "cut", "crashed", "errored"):
        search.suggest(trial_id)
        search.on_trial_result(trial_id, result(1, 30.0))
    search.on_trial_result("done", result(2, 28.0))
    search.on_trial_complete("done", result(4, 26.0, "completed", best=25.0))  # Ray never passed epochs 3-4 on
    search.on_trial_complete("done", result(4, 26.0, "completed", best=25.0))  # told once only
    search.on_trial_complete("cut", result(2, 29.0))  # ASHA's stop: its epoch-2 result goes only here
    search.on_trial_complete("errored", error=True)  # its retries spent
    # a crash: the study closes what was running; Ray resumes the pickled searcher and both trials
    assert fail_running_trials(open_storage(search._study_url), "unit") == 1
    search = pickle.loads(pickle.dumps(search))
    search.on_trial_result("crashed", result(2, 27.0))
    search.on_trial_complete("crashed", result(3, 26.5, "early_stopping", best=26.5))
    search.on_trial_result("errored", result(2, 31.0))
    search.on_trial_complete("errored", result(3, 32.0))  # stopped by ASHA this time
    search.on_trial_complete("errored", result(3, 32.0))  # added anew once only

    done, cut, crashed, errored, *added = sorted(search._ot_study.get_trials(), key=lambda t: t.number)
    assert (done.state, done.value, sorted(done.intermediate_values)) == (TrialState.COMPLETE, 25.0, [1, 2, 4])
    assert (cut.state, cut.value, cut.intermediate_values) == (TrialState.PRUNED, 29.0, {1: 30.0, 2: 29.0})
    assert crashed.state == errored.state == TrialState.FAIL and len(added) == 2
    by_trial = {t.user_attrs[RAY_TRIAL]: t for t in added}
    again = by_trial["crashed"]
    assert (again.state, again.value, again.params) == (TrialState.COMPLETE, 26.5, crashed.params)
    assert again.intermediate_values == {1: 30.0, 2: 27.0, 3: 26.5}
    again = by_trial["errored"]
    assert (again.state, again.value, again.params) == (TrialState.PRUNED, 32.0, errored.params)
    assert again.intermediate_values == {1: 30.0, 2: 31.0, 3: 32.0}


def test_a_tell_the_study_refuses_is_an_error(tmp_path):
    from tuning.study import tell
    from tuning.study_storage import fail_running_trials, open_storage

    search = searcher(tmp_path)
    search.suggest("a")
    fail_running_trials(open_storage(search._study_url), "unit")
    with pytest.raises(ValueError, match="Cannot tell a FAIL trial"):
        tell(search._ot_study, search._ot_trials["a"], {}, TrialState.COMPLETE, 30.0)  # Ray's only logged it
    with pytest.raises(RuntimeError, match="already finished"):
        tell(search._ot_study, search._ot_trials["a"], {1: 30.0}, TrialState.PRUNED, None)


# --- the replay trial's curves --------------------------------------------------------------------

def replay_cfg(tmp_path, **replay):
    from tuning.config import load_search_config

    cfg = {"train": {"epochs": 3}, "tune": {"space": {"learning_rate": {"loguniform": [1.0e-5, 1.0]},
                                                       "loss": {"choice": ["mae", "mse"]}},
                                             "retrain": False, "replay": {"curves": "formula", **replay}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    return load_search_config(tmp_path / "c.yaml")


def test_formula_is_seeded_and_ranks_rates(tmp_path):
    from tuning.replay import formula_curve
    from tuning.space import apply_params

    cfg = replay_cfg(tmp_path)

    def curve(rate, loss="mae", seed=0):
        params = {"learning_rate": rate, "loss": loss}
        tuned = apply_params(cfg, params)
        tuned.train.seed = seed
        return formula_curve(tuned, params, noise=0.5)

    assert curve(1e-3) == curve(1e-3) and curve(1e-3) != curve(1e-3, seed=1)  # seeded noise
    assert curve(1e-3)[-1] < curve(1e-4)[-1] < curve(1e-5)[-1]
    assert curve(1e-3, "mse")[-1] > curve(1e-3)[-1]  # a choice's later value costs 2 months
    assert len(curve(0.9)) == 2 and curve(0.9)[1] == math.inf  # diverges at its second epoch


def test_replayed_epochs_end_as_a_real_trial_and_resume_where_they_were():
    from tuning.replay import epochs_from

    def run(curve, patience=0, state=None, epochs=5):
        return [(e, best, best_epoch, ended) for e, _, best, best_epoch, _, ended in
                epochs_from(curve, state, epochs, patience)]

    curve = [30.0, 25.0, 26.0, 27.0, 24.0]
    assert run(curve)[-1] == (5, 24.0, 5, "completed")
    assert run(curve, patience=2)[-1] == (4, 25.0, 2, "early_stopping")  # two epochs without a better one
    assert run([30.0, math.inf, 20.0])[-1] == (2, 30.0, 1, "diverged")
    # resumed from the checkpoint after epoch 2: the same epochs 3.. as without the interruption
    checkpoint = {"epoch": 2, "best_val_mae": 25.0, "best_epoch": 2, "history": {"val_mae": curve[:2]}}
    assert run(curve, patience=2, state=checkpoint) == run(curve, patience=2)[2:]
    assert run(curve, state=checkpoint) == run(curve)[2:]


def test_curve_table_nearest_neighbour_and_bad_rows(tmp_path):
    from boneage.errors import InputError
    from tuning.replay import load_curves, recorded_curve

    cfg = replay_cfg(tmp_path)
    rows = ["config_id,seed,epoch,val_mae,seconds,learning_rate,loss"]
    for cid, rate, loss, base in [("a", 1e-3, "mae", 20), ("b", 1e-5, "mae", 30), ("c", 1e-3, "mse", 25)]:
        rows += [f"{cid},0,{e},{base - e},1.5,{rate},{loss}" for e in (1, 2, 3)]
    rows += ["d,0,1,40,1.5,0.5,mae", "d,0,2,inf,1.5,0.5,mae"]  # diverged at epoch 2: a shorter curve is fine
    path = tmp_path / "curves.csv"
    path.write_text("\n".join(rows) + "\n")
    table = load_curves(path, cfg)
    # 3e-5 is nearer to 1e-5 than to 1e-3 on the log scale; the loss must match before anything else
    assert recorded_curve(cfg, {"learning_rate": 3e-5, "loss": "mae"}, table) == [29, 28, 27]
    assert recorded_curve(cfg, {"learning_rate": 2e-4, "loss": "mse"}, table) == [24, 23, 22]
    assert recorded_curve(cfg, {"learning_rate": 0.8, "loss": "mae"}, table) == [40, math.inf]
    for bad, message in [("a,0,5,10,1,0.001,mae", "row 13: config_id a seed 0: epoch 5 after 3"),
                         ("e,0,1,x,1,0.001,mae", "row 13: not a number"),
                         ("e,0,1,nan,1,0.001,mae", "row 13: needs epoch >= 1"),
                         ("a,1,1,10,1,0.002,mae", "row 13: config_id a has other parameters"),
                         ("e,0,1,9,1,0.001,huber\ne,0,2,8,1,0.001,huber\ne,0,3,7,1,0.001,huber", None)]:
        # (an unrecorded choice is merely far from every other, not an error)
        path.write_text("\n".join(rows + [bad]) + "\n")
        if message is None:
            load_curves(path, cfg)
            continue
        with pytest.raises(InputError, match=message):
            load_curves(path, cfg)
    path.write_text("\n".join(rows[:4]).replace("val_mae", "mae") + "\n")
    with pytest.raises(InputError, match="missing column.*val_mae"):
        load_curves(path, cfg)
    path.write_text("\n".join(rows[:3]) + "\n")
    with pytest.raises(InputError, match="config_id a seed 0 has 2 epochs, train.epochs is 3"):
        load_curves(path, cfg)


# --- the real search ------------------------------------------------------------------------------

def results_by_rate(experiment: Path) -> dict[float, list[dict]]:
    found = {}
    for path in experiment.glob("replay_trial_*/result.json"):
        try:
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except ValueError:  # being written
            continue
        if lines:
            found[lines[0]["config"]["learning_rate"]] = lines
    return found


def no_tensorflow(tmp_path) -> str:
    """A PYTHONPATH on which `import tensorflow` and `import keras` fail."""
    for package in ("tensorflow", "keras"):
        (tmp_path / "no-tf" / package).mkdir(parents=True)
        (tmp_path / "no-tf" / package / "__init__.py").write_text(
            f"raise ImportError('a replay trial imported {package}')\n")
    return os.pathsep.join([str(tmp_path / "no-tf"), os.environ.get("PYTHONPATH", ""), str(Path.cwd())])


def interrupt_when(condition, done: threading.Event, every: float = 0.05) -> threading.Thread:
    """SIGINT to this process (Ray Tune's handler stops the search as Ctrl-C would) once
    `condition()` holds; nothing if `done` is set first (the search ended on its own)."""
    def watch():
        while not done.is_set():
            if condition():
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(every)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher


@pytest.fixture(scope="module")
def truth_search(tmp_path_factory, phantom_root):
    """In this process (Ray started once, for both sessions, with TensorFlow unimportable in its
    workers), as `python -m tuning.search` would run it."""
    import ray

    from tuning.search import main

    tmp_path = tmp_path_factory.mktemp("truth")
    cfg = {"data": {"source": "rsna", "root": str(phantom_root), "val_fraction": 0.25, "test_fraction": 0.2},
           "model": {"image_size": 71, "weights": "none"},
           "train": {"epochs": 4, "early_stopping_patience": 0},
           "tune": {"storage_path": str(tmp_path / "experiments"), "num_samples": 20, "max_concurrent_trials": 1,
                    "n_startup_trials": 2, "grace_period": 2, "reduction_factor": 2, "time_budget_s": BUDGET_S,
                    "resources": {"cpu": 1, "gpu": 0}, "retrain": False,
                    "space": {"learning_rate": {"loguniform": [1.0e-5, 1.0]}},
                    "points_to_evaluate": [{"learning_rate": rate} for rate in POINTS],
                    "replay": {"curves": "formula", "seconds_per_epoch": 0.8, "checkpoint_mib": 0.05, "noise": 0.3}}}
    config = tmp_path / "truth.yaml"
    config.write_text(yaml.safe_dump(cfg))
    experiment, argv = tmp_path / "experiments" / NAME, ["--config", str(config), "--name", NAME]
    if ray.is_initialized():  # a Ray of another test's: this one's workers must start without TensorFlow
        ray.shutdown()
    saved, done = os.environ.get("PYTHONPATH"), threading.Event()
    os.environ["PYTHONPATH"] = no_tensorflow(tmp_path)  # Ray's workers inherit it from here
    try:
        # interrupted while the last point's trial runs, after its first epoch (and checkpoint)
        watcher = interrupt_when(lambda: POINTS[-1] in results_by_rate(experiment), done)
        code = main(argv)
        done.set()
        watcher.join()
        assert code == 130, "the search ended before it could be interrupted"
        # as if the first session had spent the whole time budget: the resumed one stops the restored
        # trial at once (without a word to the searcher: tuning.study.settle tells the study)
        state_file = experiment / "search_state.json"
        state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "elapsed_s": BUDGET_S}))
        assert main(argv + ["--resume"]) == 0
        with pytest.raises(ray.exceptions.RayTaskError, match="a replay trial imported tensorflow"):
            ray.get(ray.remote(lambda: __import__("tensorflow")).remote())  # so the trials could not have
    finally:
        done.set()
        os.environ.pop("PYTHONPATH") if saved is None else os.environ.update(PYTHONPATH=saved)
        ray.shutdown()
    return experiment


def expected_state(row) -> TrialState:
    """The study state that trials.csv's status and `ended` call for."""
    if row["status"] == "error":
        return TrialState.FAIL
    if row["status"] == "completed" or row["ended"].startswith("early stopping"):
        return TrialState.COMPLETE
    return TrialState.PRUNED  # stopped by ASHA or a budget, or diverged


def assert_study_agrees(experiment: Path, name: str) -> None:
    """Row by row: each trial's latest study entry has the state trials.csv's "why it ended" calls
    for, its value (COMPLETE: the best epoch's; PRUNED: the last epoch's, inf if it diverged) and
    every epoch of its curve; earlier entries of the trial were closed as FAIL; no entry without a
    trial."""
    from tuning.trials_csv import read_trials_csv

    trials = read_trials_csv(experiment / "trials.csv")
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{experiment / 'optuna.db'}")
    entries = {}
    for entry in study.get_trials(deepcopy=False):
        if entry.state != TrialState.WAITING:
            entries.setdefault(entry.user_attrs.get(RAY_TRIAL), []).append(entry)
    assert set(entries) == set(trials["trial_id"]), "a study entry without a trial, or a trial without an entry"
    for _, row in trials.iterrows():
        *closed, latest = sorted(entries[row["trial_id"]], key=lambda e: e.number)
        what = f"{row['trial_id']} ({row['status']}: {row['ended']})"
        assert [e.state for e in closed] == [TrialState.FAIL] * len(closed), what
        assert latest.state == expected_state(row), what
        curve = row["val_mae_per_epoch"]
        if latest.state == TrialState.FAIL:
            continue
        assert sorted(latest.intermediate_values) == list(range(1, len(curve) + 1)), what
        assert [latest.intermediate_values[e] for e in sorted(latest.intermediate_values)] == \
            pytest.approx(curve, abs=1e-3), what
        if latest.state == TrialState.COMPLETE:
            assert latest.value == pytest.approx(row["best_val_mae"], abs=1e-3), what
        elif curve:
            assert latest.value == pytest.approx(curve[-1], abs=1e-3), what


def test_the_study_agrees_with_trials_csv_row_by_row_after_a_resume(truth_search):
    from tuning.trials_csv import read_trials_csv

    assert_study_agrees(truth_search, NAME)
    trials = read_trials_csv(truth_search / "trials.csv")
    ended = list(trials["ended"])
    assert "error" not in set(trials["status"]), ended  # no trial needed TensorFlow
    for what in ("ran all 4 epochs", "stopped by ASHA at the epoch-2 rung", "diverged at epoch 2",
                 "the search's time budget"):
        assert any(what in e for e in ended), (what, ended)
    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{truth_search / 'optuna.db'}")
    assert any(t.state == TrialState.FAIL for t in study.trials)  # the interrupted trial's closed entry


def test_stopped_and_diverged_trials_are_pruned_with_their_epochs(truth_search):
    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{truth_search / 'optuna.db'}")
    by_rate = {t.params["learning_rate"]: t for t in study.trials if t.state != TrialState.FAIL}
    reports = results_by_rate(truth_search)
    good, slow, wild = (by_rate[rate] for rate in POINTS[:3])
    assert good.state == TrialState.COMPLETE and len(good.intermediate_values) == 4
    assert good.value == pytest.approx(min(r["val_mae"] for r in reports[POINTS[0]]))
    # ASHA stopped the slow one at its epoch-2 rung: TPE sees a trial that reached epoch 2, not a finished one
    assert slow.state == TrialState.PRUNED and sorted(slow.intermediate_values) == [1, 2]
    assert slow.value == pytest.approx(reports[POINTS[1]][-1]["val_mae"])
    assert wild.state == TrialState.PRUNED and wild.intermediate_values[2] == math.inf
    assert math.isfinite(wild.intermediate_values[1]) and wild.value == math.inf


def test_a_bad_curve_file_is_refused_before_anything_is_written(tmp_path, phantom_root, capsys):
    from tuning.search import main

    (tmp_path / "curves.csv").write_text("config_id,seed,epoch\n")
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"root": str(phantom_root)}, "model": {"weights": "none"},
        "tune": {"storage_path": str(tmp_path / "experiments"), "retrain": False,
                 "space": {"learning_rate": {"loguniform": [1.0e-5, 1.0]}},
                 "replay": {"curves": str(tmp_path / "curves.csv")}}}))
    assert main(["--config", str(config), "--name", "bad"]) == 2
    assert "missing column(s) val_mae, seconds, learning_rate" in capsys.readouterr().err
    assert not (tmp_path / "experiments" / "bad").exists()
    assert main(["--config", str(config), "--name", "bad", "--set", "tune.retrain=true"]) == 2
    assert "replayed trials train no model, so there is none to retrain" in capsys.readouterr().err
