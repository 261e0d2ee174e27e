"""What a search remembers across a resume: its time and GPU-hour budgets and ASHA's rungs, and
the concurrency cap on restored trials (unit level; tests/test_faults.py does it for real)."""
import json
import pickle
from types import SimpleNamespace

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher

from tuning.experiment import Experiment
from tuning.progress import STATE_FILE, Limiter, Scheduler, SearchProgress


def experiment(tmp_path) -> Experiment:
    return Experiment("exp", str(tmp_path), tmp_path / "exp")


class trial(SimpleNamespace):
    def __init__(self, trial_id, status=Trial.RUNNING):
        super().__init__(trial_id=trial_id, status=status)

    def set_status(self, status):
        self.status = status


def test_gpu_hour_budget_counts_each_trials_latest_time(tmp_path):
    progress = SearchProgress(experiment(tmp_path), 0, 1.0, 0.5)
    assert progress("a", {"time_total_s": 3600.0}) is False  # never stops a single trial
    assert not progress.stop_all()  # 0.5 GPU-hours so far
    progress("b", {"time_total_s": 3000.0})
    progress("a", {"time_total_s": 4000.0})  # a trial's time is its latest total, not a sum
    assert progress.gpu_hours() == pytest.approx((4000 + 3000) * 0.5 / 3600)
    assert not progress.stop_all()
    progress("c", {"time_total_s": 500.0})
    assert progress.stop_all() and progress.state["budget_stop"] == "gpu_hour_budget"


def test_budgets_count_earlier_sessions(tmp_path):
    exp = experiment(tmp_path)
    first = SearchProgress(exp, time_budget_s=100, gpu_hours_budget=0, gpus_per_trial=0)
    first.state["elapsed_s"] = 90.0  # as if this session had run 90 s
    first.end_session()
    assert json.loads((exp.local_dir / STATE_FILE).read_text())["elapsed_s"] >= 90.0
    resumed = pickle.loads(pickle.dumps(first))  # what Tuner.restore does to it
    assert resumed.elapsed_s() >= 90.0 and not resumed.stop_all()
    resumed.state["elapsed_s"] = 101.0
    assert resumed.stop_all() and resumed.state["budget_stop"] == "time_budget"


def feed(scheduler, results):
    return [scheduler.on_trial_result(None, trial(t), {"epoch": epoch, "val_mae": mae}) for t, epoch, mae in results]


def test_asha_rungs_survive_a_resume(tmp_path):
    exp = experiment(tmp_path)
    asha = dict(time_attr="epoch", metric="val_mae", mode="min", max_t=9, grace_period=1, reduction_factor=3)
    progress = SearchProgress(exp, 0, 0, 0)
    scheduler = Scheduler(progress, **asha)
    for t in "abcd":
        scheduler.on_trial_add(None, trial(t))
    assert feed(scheduler, [("c", 1, 12.0), ("b", 1, 11.0), ("a", 1, 10.0)]) == [TrialScheduler.CONTINUE] * 3
    assert feed(scheduler, [("d", 1, 30.0)]) == [TrialScheduler.STOP]  # worse than the rung's cutoff
    progress.save()
    assert progress.state["asha_stopped"] == ["d"]

    # a resume unpickles both from the experiment; the rungs come back from search_state.json
    restored_progress, restored = pickle.loads(pickle.dumps((progress, scheduler)))
    assert restored_progress.state["rungs"][0]["1"] == {"a": -10.0, "b": -11.0, "c": -12.0, "d": -30.0}
    restored.on_trial_add(None, trial("e"))
    assert feed(restored, [("e", 1, 40.0)]) == [TrialScheduler.STOP]
    # Ray's own ASHA, restored, has empty rungs: it lets the same trial go on
    plain = pickle.loads(pickle.dumps(ASHAScheduler(**asha)))
    plain.on_trial_add(None, trial("e"))
    assert plain.on_trial_result(None, trial("e"), {"epoch": 1, "val_mae": 40.0}) == TrialScheduler.CONTINUE


def test_every_brackets_rungs_and_each_trials_bracket_survive_a_resume(tmp_path):
    """Hyperband-style ASHA (2 brackets): a resume brings back both brackets' rungs, and a restored
    trial rejoins the bracket it was drawn into (Ray would draw it again at random)."""
    import numpy as np

    exp = experiment(tmp_path)
    asha = dict(time_attr="epoch", metric="val_mae", mode="min", max_t=9, grace_period=1, reduction_factor=3,
                brackets=2)  # bracket 0: rungs at epochs 1 and 3; bracket 1: at epoch 3
    progress = SearchProgress(exp, 0, 0, 0)
    scheduler = Scheduler(progress, **asha)
    at_start = pickle.dumps((progress, scheduler))  # as tuner.pkl holds them: empty rungs
    np.random.seed(4)  # draws 3 of the 8 trials into the second bracket
    for t in "abcdefgh":
        scheduler.on_trial_add(None, trial(t))
    home = {t: scheduler._brackets.index(b) for t, b in scheduler._trial_info.items()}
    second = [t for t in "abcdefgh" if home[t] == 1]
    assert len(second) >= 2 and 0 in home.values(), home  # both brackets hold trials
    late = second[-1]  # still short of epoch 3 when the search stops
    feed(scheduler, [(t, 1, 10.0 + i) for i, t in enumerate("abcdefgh")])
    feed(scheduler, [(t, 3, 5.0 + i) for i, t in enumerate("abcdefgh") if t != late])
    rungs = [{m: dict(r) for m, r in b._rungs} for b in scheduler._brackets]
    assert all(any(r for r in bracket.values()) for bracket in rungs)  # values in both brackets
    progress.save()

    restored_progress, restored = pickle.loads(at_start)  # a resume; the state comes from search_state.json
    np.random.seed(1)  # Ray draws brackets again for the trials a resume restores (all into the first)
    for t in "abcdefgh":
        restored.on_trial_add(None, trial(t))
    assert {t: restored._brackets.index(b) for t, b in restored._trial_info.items()} == home
    assert [{m: dict(r) for m, r in b._rungs} for b in restored._brackets] == rungs
    # the second bracket's restored rung decides: worse than its epoch-3 values, the trial stops
    assert feed(restored, [(late, 3, 50.0)]) == [TrialScheduler.STOP]


def test_a_state_saved_before_brackets_were_kept_restores_the_first_bracket(tmp_path):
    exp = experiment(tmp_path)
    exp.local_dir.mkdir(parents=True)
    (exp.local_dir / STATE_FILE).write_text(json.dumps({"rungs": {"1": {"a": -10.0, "b": -11.0}}}))
    progress = pickle.loads(pickle.dumps(SearchProgress(exp, 0, 0, 0)))
    scheduler = Scheduler(progress, time_attr="epoch", metric="val_mae", mode="min", max_t=9, grace_period=1,
                          reduction_factor=3)
    scheduler.on_trial_add(None, trial("c"))
    assert dict(scheduler._brackets[0]._rungs[-1][1]) == {"a": -10.0, "b": -11.0}
    assert feed(scheduler, [("c", 1, 30.0)]) == [TrialScheduler.STOP]


class OneAtATime(Searcher):
    def suggest(self, trial_id):
        return {"x": 1}

    def on_trial_complete(self, trial_id, result=None, error=False):
        pass


def test_restored_trials_count_toward_max_running_and_wait_their_turn(tmp_path):
    """Ray restores every unfinished and errored trial as PENDING and starts all PENDING trials
    whatever the scheduler says; the scheduler must hold all but max_running of them PAUSED and
    count them in the limiter, or they run side by side and with new suggestions."""
    progress = SearchProgress(experiment(tmp_path), 0, 0, 0)
    scheduler = Scheduler(progress, max_running=1, time_attr="epoch", metric="val_mae", mode="min", max_t=3)
    limiter = Limiter(OneAtATime(), max_concurrent=1)
    limiter.suggest("cut")  # suggested in the first session, running when the driver died
    trials = []
    controller = SimpleNamespace(get_trials=lambda: trials, search_alg=SimpleNamespace(searcher=limiter))
    for trial_id in ("cut", "errored"):  # both come back PENDING, as _requeue_restored_trials does
        trials.append(trial(trial_id, Trial.PENDING))
        scheduler.on_trial_add(controller, trials[-1])
    assert [t.status for t in trials] == [Trial.PENDING, Trial.PAUSED]
    assert limiter.live_trials == {"cut", "errored"} and limiter.suggest("new") is None
    assert scheduler.choose_trial_to_run(controller) is None  # "cut" is about to run
    trials[0].status = Trial.RUNNING
    assert scheduler.choose_trial_to_run(controller) is None
    trials[0].status = Trial.TERMINATED
    limiter.on_trial_complete("cut", {"val_mae": 1.0})
    assert scheduler.choose_trial_to_run(controller).trial_id == "errored"
    assert limiter.suggest("new") is None  # "errored" still holds the one slot


def test_what_holds_every_trial_is_written_at_ray_snapshots_never_per_result_or_trial(tmp_path):
    """search_state.json and the study copy each hold every trial: written per result or per
    trial, a search of n trials cost O(n^2) (issue 17, benchmarks/scale.py). 2,000 trials' starts,
    results and ends here write neither, locally or into the storage; Ray's snapshot (get_state)
    writes both. Milliseconds; no Ray."""
    import optuna

    from tuning.config import load_search_config
    from tuning.progress import StudySync
    from tuning.space import parse_space
    from tuning.study import make_searcher
    from tuning.study_storage import STUDY_DB, study_url

    exp = Experiment("exp", f"file://{tmp_path}/bucket", tmp_path / "local" / "exp")
    exp.local_dir.mkdir(parents=True)
    stored = tmp_path / "bucket" / "exp"
    cfg = load_search_config(None, ["train.epochs=3", "tune.space={learning_rate: {loguniform: [1.0e-5, 1.0]}}"])
    searcher = make_searcher(cfg, parse_space(cfg), study_url(cfg, exp.local_dir), "exp", "val_mae", "min", exp=exp)
    progress, sync = SearchProgress(exp, 0, 0, 1.0), StudySync(exp, study_url(cfg, exp.local_dir))
    scheduler = Scheduler(progress, time_attr="epoch", metric="val_mae", mode="min", max_t=9, grace_period=1)
    progress.get_state(), sync.get_state()  # Ray's first snapshot, at the start

    def written():
        files = (exp.local_dir / STATE_FILE, stored / STATE_FILE, stored / STUDY_DB)  # (the study itself: here)
        return {str(path): path.stat().st_mtime_ns for path in files if path.exists()}

    before = written()
    assert len(before) == 3, before
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for i in range(2000):
        t, result = trial(f"t{i}"), {"time_total_s": 1.0, "epoch": 1, "val_mae": 30.0}
        searcher.suggest(t.trial_id) if i < 5 else None  # (TPE's time is benchmark 8's)
        scheduler.on_trial_add(None, t)
        scheduler.on_trial_result(None, t, result)
        for callback in (progress, sync):
            callback.on_trial_start(0, [], t)
            callback.on_trial_result(0, [], t, result)
            callback.on_trial_complete(0, [], t)
            callback.on_trial_error(0, [], t)
    assert written() == before
    assert len(progress.state["trial_seconds"]) == 2000  # counted in memory
    assert not any(progress.state["rungs"][0].values())  # the rungs (every trial) not copied per result
    progress.get_state(), sync.get_state()  # Ray's next snapshot writes both, here and stored
    after = written()
    assert all(after[name] != before[name] for name in before), (before, after)
    saved = json.loads((stored / STATE_FILE).read_text())
    assert len(saved["trial_seconds"]) == 2000 and len(saved["rungs"][0]["1"]) == 2000


def test_ray_forces_no_snapshot_per_checkpoint(tmp_path):
    """CheckpointConfig(num_to_keep) makes Ray snapshot the whole experiment whenever a trial has
    checkpointed that many times: O(trials) per checkpoint (issue 17). The tuner is built, not run."""
    from tuning.config import load_search_config
    from tuning.search import make_tuner

    cfg = load_search_config(None, ["tune.replay.curves=formula", "tune.retrain=false",
                                    "tune.space={learning_rate: {loguniform: [1.0e-5, 1.0]}}"])
    exp = experiment(tmp_path)
    exp.local_dir.mkdir()
    tuner = make_tuner(cfg, exp, None, None, resume=False)
    assert tuner._local_tuner.get_run_config().checkpoint_config.num_to_keep is None
