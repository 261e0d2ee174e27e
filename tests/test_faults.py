"""Faults injected for real into real searches: the driver killed with SIGKILL mid-search and
resumed, a trial process killed until its retries run out. Each test waits for a condition
(a trial with a checkpoint in the experiment), never a fixed sleep, then checks what happened by
trial ids and epochs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import HEAD_ONLY
from tests.test_search import run_search, search_config

pytestmark = pytest.mark.slow
SYNC_FAST = {"TUNE_GLOBAL_CHECKPOINT_S": "1"}  # Ray syncs results to the experiment every second
# Each trial sleeps 3 s after reporting these epochs (tests/pause_double): on a fast machine an
# epoch of the phantom takes under a second, less than a poll and Ray's sync (CI once saw a whole
# search of 4 trials end between two polls). The pause is the window a test acts in.
PAUSE_DOUBLE = Path(__file__).parent / "pause_double"


def trial_results(experiment: Path) -> dict[str, list[dict]]:
    """Each trial folder's reported results, in order."""
    found = {}
    for path in experiment.glob("run_trial_*/result.json"):
        try:
            found[path.parent.name] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except ValueError:  # being written
            continue
    return found


def has_checkpoint(experiment: Path, trial: str, epoch: int) -> bool:
    return (experiment / trial / f"checkpoint_{epoch - 1:06d}" / "state.json").is_file()


def wait_for(condition, process, what: str, timeout: float = 900):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        assert process.poll() is None, f"the search ended before {what}:\n{process.stdout.read()[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def running_at_epoch(experiment: Path, epoch: int, exclude=()) -> str | None:
    """A trial whose last result is `epoch` (< its last) with that epoch's checkpoint on disk."""
    for trial, results in trial_results(experiment).items():
        if trial not in exclude and results and results[-1]["epoch"] == epoch and has_checkpoint(experiment, trial, epoch):
            return trial
    return None


def start(config, name, pause_after: str):
    """The search CLI; its Ray (and so its trials) inherit a marker naming this test's config,
    and the pause after reporting the epochs in `pause_after` ("1,2")."""
    path = os.pathsep.join(filter(None, [str(PAUSE_DOUBLE), os.environ.get("PYTHONPATH")]))
    return subprocess.Popen([sys.executable, "-m", "tuning.search", "--config", str(config), "--name", name],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "BONEAGE_FAULT_TEST": str(config),
                                 "PYTHONPATH": path, "BONEAGE_PAUSE_AFTER_REPORT": f"{pause_after}:3", **SYNC_FAST})


def kill_group(process) -> None:
    """SIGKILL the driver first, as a crash would, then whatever of its Ray is left."""
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def study_states(experiment: Path, name: str) -> list[str]:
    import optuna

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{experiment / 'optuna.db'}")
    return [t.state.name for t in study.trials]


def test_driver_killed_then_resumed_finishes_every_trial_once(tmp_path, phantom_root):
    rates = [1.0e-3, 5.0e-4, 2.0e-3, 1.5e-3]
    config = search_config(tmp_path, phantom_root, rates, epochs=3, max_concurrent_trials=1, grace_period=3,
                           max_failures=0, time_budget_s=3000, frozen_layers=HEAD_ONLY)
    experiment = tmp_path / "experiments" / "killed"
    driver = start(config, "killed", pause_after="1")  # each kill lands in epoch 1's pause
    try:
        # 1. one trial finished; the next has a checkpoint: kill its process (it errors, no retries)
        first = wait_for(lambda: next((t for t, r in trial_results(experiment).items() if r and r[-1]["epoch"] == 3), None),
                         driver, "a finished trial")
        errored = wait_for(lambda: running_at_epoch(experiment, 1, {first}), driver, "a second trial's checkpoint")
        os.kill(trial_results(experiment)[errored][-1]["pid"], signal.SIGKILL)
        # 2. the one after it has a checkpoint too: kill the driver
        cut = wait_for(lambda: running_at_epoch(experiment, 1, {first, errored}), driver, "a third trial's checkpoint")
        kill_group(driver)
    finally:
        if driver.poll() is None:
            kill_group(driver)
    before = trial_results(experiment)
    finished_file = experiment / first / "result.json"
    finished_stat = (finished_file.stat().st_mtime_ns, finished_file.read_text())
    first_session = before[cut][-1]["timestamp"] - before[first][0]["timestamp"]
    assert not (experiment / "trials.csv").exists()  # the killed search never reached its end
    assert [r["epoch"] for r in before[errored]] == [1] and [r["epoch"] for r in before[cut]] == [1]
    assert before[first][1]["timestamp"] - before[first][0]["timestamp"] >= 3  # the pause double held epoch 1

    resumed_at = time.time()
    resumed = run_search("--config", str(config), "--name", "killed", "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = trial_results(experiment)

    # every planned trial accounted for, the finished one untouched, the others went on
    assert len(after) == len(rates)
    assert (finished_file.stat().st_mtime_ns, finished_file.read_text()) == finished_stat
    for trial in (errored, cut):  # from the checkpoint's epoch + 1, not from epoch 1
        assert [r["epoch"] for r in after[trial]] == [1, 2, 3], trial
    assert all(r[-1]["epoch"] == 3 for r in after.values())
    # the study: 4 finished trials; the two cut off were closed as failed and added anew
    states = study_states(experiment, "killed")
    assert states.count("COMPLETE") == len(rates) and states.count("FAIL") == 2

    # max_concurrent_trials 1 held for the restored trials too: no two ran at once
    spans = sorted((r["timestamp"] - r["time_this_iter_s"], r["timestamp"])
                   for results in after.values() for r in results if r["timestamp"] >= resumed_at)
    for (_, end), (start_next, _) in zip(spans, spans[1:]):
        assert start_next >= end - 1, spans  # timestamps are whole seconds

    # the time budget counts both sessions; the retrain and export ran once
    state = json.loads((experiment / "search_state.json").read_text())
    assert state["elapsed_s"] > first_session
    assert (experiment / "trials.csv").is_file() and (experiment / "model" / "model.keras").is_file()
    assert resumed.stdout.count("retraining the best config") == 1


def test_a_trial_killed_until_its_retries_run_out_is_failed_and_the_search_completes(tmp_path, phantom_root):
    # 4 epochs: the retried trial is killed after epoch 2 while epochs 3-4 run (a window of two
    # epochs); grace period 4: no ASHA rung, so the other trial runs its course whatever it learns
    config = search_config(tmp_path, phantom_root, [1.0e-3, 5.0e-4], epochs=4, max_concurrent_trials=1,
                           grace_period=4, max_failures=1, frozen_layers=HEAD_ONLY)
    experiment = tmp_path / "experiments" / "retried"
    driver = start(config, "retried", pause_after="1,2,3")
    try:
        victim = wait_for(lambda: running_at_epoch(experiment, 1), driver, "a checkpoint at epoch 1")
        first_pid = trial_results(experiment)[victim][-1]["pid"]
        os.kill(first_pid, signal.SIGKILL)
        # on a busy machine the process may have finished epoch 2 before the kill landed (CI saw
        # it once): the epochs each process reported are compared once the search is over

        def retried():  # the retry's own report, with its checkpoint, before the last epoch
            last = trial_results(experiment)[victim][-1]
            return (last["pid"] != first_pid and last["epoch"] < 4
                    and has_checkpoint(experiment, victim, last["epoch"]) and last)
        # Ray retries it from its last checkpoint in a new process, whose first report is the
        # next epoch; kill that one too once it has its checkpoint: max_failures 1 is then spent
        second = wait_for(retried, driver, "the retried trial's first checkpoint")
        os.kill(second["pid"], signal.SIGKILL)
        out, _ = driver.communicate(timeout=900)
    finally:
        if driver.poll() is None:
            kill_group(driver)
    assert driver.returncode == 0, out[-3000:]
    results = trial_results(experiment)
    # killed at epoch 1 (or 2); the retry went on from its checkpoint (not epoch 1 again) and was
    # killed before its last epoch (a kill can land an epoch after the poll that saw it)
    epochs = [r["epoch"] for r in results[victim]]
    first = [r["epoch"] for r in results[victim] if r["pid"] == first_pid]
    assert epochs == list(range(1, len(epochs) + 1)) and second["epoch"] <= len(epochs) < 4, results[victim]  # no epoch twice, never its last
    assert first == list(range(1, len(first) + 1)) and 0 < len(first) < len(epochs), results[victim]
    import pandas as pd

    trials = pd.read_csv(experiment / "trials.csv", dtype=str)
    row = trials[trials["trial_id"] == results[victim][0]["trial_id"]].iloc[0]
    assert row["status"] == "error" and row["ended"].startswith("error:")
    other = trials[trials["trial_id"] != row["trial_id"]].iloc[0]
    assert other["status"] == "completed"
    assert sorted(study_states(experiment, "retried")) == ["COMPLETE", "FAIL"]
    assert row["trial_id"] in (experiment / "report.html").read_text()
    assert (experiment / "model" / "model.keras").is_file()


def trial_processes(config) -> list[int]:
    """Pids of the Ray processes running a trial (titled `ray::ImplicitFunc...`) of the search
    started with `config` (their environment holds its marker)."""
    marker = f"BONEAGE_FAULT_TEST={config}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::ImplicitFunc") and \
                        marker in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids
