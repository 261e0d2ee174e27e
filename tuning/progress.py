"""What a search has done so far, kept beside it so that a resumed search goes on where it was.

    progress = SearchProgress(exp, cfg)          # a Tune callback and a stopper
    scheduler = Scheduler(progress, ...)         # ASHA that remembers its rungs
    searcher = Limiter(searcher, max_concurrent=2)   # passes on trials restored by a resume
    StudySync(exp, url)                          # a SQLite study (and mlflow.db) copied into remote storage

What is saved is saved when Ray snapshots the experiment (Ray calls every callback's `get_state`
then, just after it wrote the trials' states and the searcher's) and when the search stops,
never per result or per trial: each of these files holds every trial, so writing one per result
made a search of n trials cost O(n^2) (issue 17; benchmarks/scale.py). Ray spaces its snapshots
so that they take at most 5% of the time (`TUNE_GLOBAL_CHECKPOINT_S`, default "auto": every
10 s or more), which bounds our writes the same way. A crash loses what happened since the last
snapshot, and so does Ray's own state: both come back from the same moment, so a resumed trial's
rungs, seconds and study entry agree with the trial Ray restores.

Ray restores trials and the searcher after a crash, but not the scheduler's rungs, nor the time
spent: after `--resume`, ASHA would start with empty rungs (its next decisions compare trials
with nothing) and `tune.time_budget_s` and `tune.gpu_hours_budget` would start again from zero,
the cost guard of a multi-day run on rented GPUs. So `search_state.json` in the experiment folder
keeps: the seconds the search has run in earlier sessions, each trial's running seconds, ASHA's
rungs (every bracket's) and each trial's bracket, the trials it stopped, and which budget (if any)
ended the search. It is written, and copied into the storage, at each of Ray's experiment
snapshots and when the search stops; `--resume` fetches it back (never over a newer local copy).

The scheduler also enforces `tune.max_concurrent_trials` on every trial it starts, including
trials restored by a resume (Ray's concurrency limiter counts only the trials it suggested
itself, so resumed and new trials would otherwise run side by side).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter

from boneage.config import write_atomic

STATE_FILE = "search_state.json"


def load_state(exp) -> dict:
    path = exp.local_dir / STATE_FILE
    state = json.loads(path.read_text()) if path.is_file() else {}
    return {"elapsed_s": 0.0, "trial_seconds": {}, "rungs": [], "trial_brackets": {}, "asha_stopped": [],
            "budget_stop": None, **state}


class SearchProgress(tune.Callback, tune.Stopper):
    """Counts the search's time and GPU-seconds across sessions, stops it at its budgets, and
    saves what the scheduler knows. A callback (results, trial ends) and a stopper at once."""

    def __init__(self, exp, time_budget_s: float, gpu_hours_budget: float, gpus_per_trial: float):
        self.exp = exp
        self.time_budget_s, self.gpu_hours_budget, self.gpus_per_trial = time_budget_s, gpu_hours_budget, gpus_per_trial
        self.state = load_state(exp)
        self.session_start = time.time()

    def __setstate__(self, state):  # unpickled by a resume: start from the saved file
        self.__dict__.update(state)
        self.__dict__.pop("_trial_seconds_total", None)  # counted again from the saved file
        self.state = load_state(self.exp)
        self.session_start = time.time()

    def elapsed_s(self) -> float:
        return self.state["elapsed_s"] + time.time() - self.session_start

    def gpu_hours(self) -> float:
        # a running total (the stopper asks at every step of Ray's loop: no sum over every trial)
        if "_trial_seconds_total" not in self.__dict__:
            self._trial_seconds_total = sum(self.state["trial_seconds"].values())
        return self._trial_seconds_total * self.gpus_per_trial / 3600.0

    def save(self, publish: bool = False) -> None:
        for record in self.__dict__.get("recorders", ()):  # the scheduler's rungs, copied only now
            record()
        state = {**self.state, "elapsed_s": self.elapsed_s()}
        self.exp.local_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.exp.local_dir / STATE_FILE, json.dumps(state, separators=(",", ":")))
        if publish:
            self.exp.publish([STATE_FILE])

    def end_session(self) -> None:
        """Fold this session's time into the saved total (the search ended or was stopped)."""
        self.save(publish=True)
        self.state["elapsed_s"] = self.elapsed_s()
        self.session_start = time.time()

    # --- the stopper -----------------------------------------------------------------------

    def __call__(self, trial_id, result) -> bool:
        seconds, before = float(result.get("time_total_s", 0.0) or 0.0), self.state["trial_seconds"].get(trial_id, 0.0)
        self.state["trial_seconds"][trial_id] = seconds
        if "_trial_seconds_total" in self.__dict__:
            self._trial_seconds_total += seconds - before
        return False

    def stop_all(self) -> bool:
        if self.state["budget_stop"]:
            return True
        if self.time_budget_s and self.elapsed_s() >= self.time_budget_s:
            self.state["budget_stop"] = "time_budget"
        elif self.gpu_hours_budget and self.gpu_hours() >= self.gpu_hours_budget:
            self.state["budget_stop"] = "gpu_hour_budget"
        if self.state["budget_stop"]:
            self.save(publish=True)
        return bool(self.state["budget_stop"])

    # --- the callback ----------------------------------------------------------------------

    # After `--resume`, Ray's controller unpickles its own copy of the stopper from its saved
    # state, apart from this callback (and the scheduler's progress): the copy decides the stops,
    # this instance saves. So the callback keeps the trial seconds too, and at the end records a
    # budget that the copy met, or search_state.json would forget both.
    def on_trial_result(self, iteration, trials, trial, result, **info):
        self(trial.trial_id, result)  # in memory: saved at Ray's next snapshot

    def get_state(self):
        """Ray's experiment snapshot: save beside it. None: Ray keeps no state file of ours."""
        self.save(publish=True)
        return None

    def on_experiment_end(self, trials, **info):
        self.stop_all()
        self.save(publish=True)


class Scheduler(ASHAScheduler):
    """ASHA on validation MAE (Hyperband-style with `brackets` > 1), whose rungs survive a resume,
    which records the trials it stops, and which never runs more than `max_running` trials at once
    (0 = no limit).

    The saved state holds every bracket's rungs ("rungs": one {milestone: {trial: value}} per
    bracket; a dict is a state saved before brackets were kept: the first bracket's) and each
    trial's bracket ("trial_brackets"): Ray draws a trial's bracket at random when the trial is
    added, which a resume does again for the trials it restores, so a restored trial is put back
    into the bracket whose rungs hold its earlier epochs."""

    def __init__(self, progress: SearchProgress, max_running: int = 0, **asha):
        super().__init__(**asha)
        self.progress, self.max_running = progress, max_running
        self._restored = False
        self._stopped: set[str] = set()
        # the rungs hold every trial: copied into the state when it is saved, not per result
        progress.recorders = [*progress.__dict__.get("recorders", ()), self._record]

    def __setstate__(self, state):  # unpickled by a resume: rebuild the rungs on first use
        self.__dict__.update(state)
        self._restored = False
        # until the first choice of a trial to run, the trials added are the ones Ray restored
        self._resuming, self._restored_most = True, 0

    def _restore(self) -> None:
        """Fill every bracket's rungs from the saved state, once."""
        if self._restored:
            return
        self._restored = True
        saved = self.progress.state.get("rungs") or []
        saved = [saved] if isinstance(saved, dict) else saved
        for bracket, rungs in zip(self._brackets, saved):
            for milestone, recorded in bracket._rungs:
                recorded.update(rungs.get(f"{milestone:g}", {}))

    def _record(self) -> None:
        stopped = self.__dict__.get("_stopped")
        if stopped:
            self.progress.state["asha_stopped"] = sorted({*self.progress.state["asha_stopped"], *stopped})
        self.progress.state["rungs"] = [{f"{milestone:g}": dict(recorded) for milestone, recorded in bracket._rungs}
                                        for bracket in self._brackets]

    def on_trial_add(self, tune_controller, trial):
        self._restore()
        super().on_trial_add(tune_controller, trial)
        brackets = self.progress.state.setdefault("trial_brackets", {})
        if trial.trial_id in brackets and brackets[trial.trial_id] < len(self._brackets):
            self._trial_info[trial.trial_id] = self._brackets[brackets[trial.trial_id]]  # a restored trial
        else:
            brackets[trial.trial_id] = self._brackets.index(self._trial_info[trial.trial_id])
        if self.__dict__.get("_resuming"):  # a trial a resume restored
            self._count_restored(tune_controller, trial)
        if self.max_running and trial.status == Trial.PENDING:
            self._hold_restored(tune_controller, trial)

    def _count_restored(self, tune_controller, trial) -> None:
        """The search's trial count (how many it has created, against `num_samples`) as the
        trials Ray restored say, not as the saved count says: a snapshot torn by a killed head
        can hold a count older or newer than its trials (one file each), and the search would
        then run more trials than asked, or fewer. A trial's tag starts with its number; the
        count is the largest number restored so far (one look per trial: linear in trials)."""
        generator = getattr(tune_controller, "search_alg", None)
        number = (getattr(trial, "experiment_tag", "") or "").split("_")[0]
        if generator is None or not number.isdigit() or not hasattr(generator, "_counter"):
            return
        self._restored_most = max(self.__dict__.get("_restored_most", 0), int(number))
        generator._counter = self._restored_most

    def _hold_restored(self, tune_controller, trial) -> None:
        """A trial that `--resume` brings back (running or errored when the search stopped) was
        not suggested in this session, so the concurrency limiter does not count it and Ray starts
        every restored trial at once. Count it in the limiter (no new suggestion while it is
        live) and keep it PAUSED while `max_running` trials already wait: `choose_trial_to_run`
        starts it when a slot is free. The controller files the trial by its status after this
        hook returns, so setting the status here is enough."""
        limiter = getattr(tune_controller.search_alg, "searcher", None)
        live = getattr(limiter, "live_trials", None)
        if live is not None and trial.trial_id not in live:
            live.add(trial.trial_id)
            limiter.num_unfinished_live_trials += 1
        waiting = sum(t.status == Trial.PENDING for t in tune_controller.get_trials() if t is not trial)
        if waiting >= self.max_running:
            trial.set_status(Trial.PAUSED)

    def _forget_ghosts(self, tune_controller) -> None:
        """Once after a resume, when every restored trial is back: the limiter's live trials that
        Ray does not know. A head killed while it uploaded a snapshot can leave a searcher state
        newer than the experiment state (Ray uploads a snapshot's files one by one): a trial
        suggested just before the kill is then live for the limiter and never ends, and with
        `max_concurrent_trials` such ghosts would hold the search's slots forever."""
        if not self.__dict__.get("_resuming"):
            return
        self._resuming = False
        limiter = getattr(getattr(tune_controller, "search_alg", None), "searcher", None)
        live = getattr(limiter, "live_trials", None)
        if live:
            ghosts = live - {t.trial_id for t in tune_controller.get_trials()}
            live -= ghosts
            limiter.num_unfinished_live_trials -= len(ghosts)

    def on_trial_result(self, tune_controller, trial, result):
        self._restore()
        action = super().on_trial_result(tune_controller, trial, result)
        if action == self.STOP and result.get(self._time_attr, 0) < self._max_t:
            self.__dict__.setdefault("_stopped", set()).add(trial.trial_id)
        return action

    def on_trial_error(self, tune_controller, trial):
        """Ray 2.60 sets a trial whose process died to ERROR without marking it for the experiment
        state when its actor is already gone (`_schedule_trial_stop` returns first), so the saved
        state kept it RUNNING: the search then looked interrupted (exit 130) and `--resume` ran a
        failed trial again. Ray calls this hook with the controller itself, just before it sets
        ERROR; marking the trial here makes the next save write its final status."""
        super().on_trial_error(tune_controller, trial)
        mark = getattr(tune_controller, "_mark_trial_to_checkpoint", None)
        if mark is not None:
            mark(trial)

    def choose_trial_to_run(self, tune_controller):
        self._restore()
        self._forget_ghosts(tune_controller)
        if self.max_running:
            if hasattr(tune_controller, "_running_trials"):  # Ray's controller keeps these sets: no scan per step
                running = len(tune_controller._running_trials) + len(tune_controller._pending_trials)
            else:  # the lab's stand-in controller
                running = sum(t.status in (Trial.RUNNING, Trial.PENDING) for t in tune_controller.get_trials())
            if running >= self.max_running:
                return None
        return super().choose_trial_to_run(tune_controller)


def backup_sqlite(url: str, target: Path) -> bool:
    """A consistent copy of a SQLite study (sqlite3's online backup, safe while in use) at
    target; False for any other database, which needs no copying."""
    import sqlite3

    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or not Path(parsed.database).is_file():
        return False
    source, copy = sqlite3.connect(parsed.database), sqlite3.connect(target)
    try:
        source.backup(copy)
    finally:
        source.close()
        copy.close()
    return True


class StudySync(tune.Callback):
    """On the driver, for an s3:// (or other remote) storage: copy the SQLite study and the
    default MLflow database (`mlflow.db`) into the storage at each of Ray's experiment snapshots
    and when the search stops, so `--resume` on a fresh head starts from copies of the moment of
    Ray's own saved state. Ray calls `get_state` after it wrote its searcher's state and before it
    uploads it, so the copy in the storage always knows every study entry that the searcher's
    saved state maps a trial to (the searcher copied it at every suggestion before: one copy of
    the whole study per trial, O(n^2) over a search). The study's URL is the experiment
    folder's unless `url` names another SQLite file; computed on the head that runs, as the
    experiment's folder is."""

    def __init__(self, exp, url: str | None = None):
        from tuning.study_storage import default_study_url

        self.exp = exp
        self.url = None if url == default_study_url(exp.local_dir) else url

    def study_url(self) -> str:
        from tuning.study_storage import default_study_url

        return self.url or default_study_url(self.exp.local_dir)

    def sync(self, study: bool = True, mlflow: bool = False) -> None:
        import tempfile

        from tuning.study_storage import STUDY_DB
        from tuning.tracking import MLFLOW_DB

        copies = ([(self.study_url(), STUDY_DB)] if study else []) + \
                 ([(f"sqlite:///{self.exp.local_dir / MLFLOW_DB}", MLFLOW_DB)] if mlflow else [])
        with tempfile.TemporaryDirectory() as folder:
            made = [name for url, name in copies if backup_sqlite(url, Path(folder) / name)]
            self.exp.publish(made, Path(folder))

    def get_state(self):
        """Ray's experiment snapshot (the MLflow runs of the trials it saves are in mlflow.db:
        a resume finds them, not a second one). None: Ray keeps no state file of ours."""
        self.sync(mlflow=True)
        return None

    def on_experiment_end(self, trials, **info):
        self.sync(mlflow=True)


class Limiter(ConcurrencyLimiter):
    """Ray's ConcurrencyLimiter (TPE suggests a trial only when a slot is free, so it learns from
    the results so far), except that it passes on the end of a trial it did not suggest in this
    session (an errored trial that `--resume` restarted) instead of dropping it."""

    def on_trial_complete(self, trial_id, result=None, error=False):
        if trial_id not in self.live_trials:
            self.searcher.on_trial_complete(trial_id, result=result, error=error)
            return
        super().on_trial_complete(trial_id, result=result, error=error)
