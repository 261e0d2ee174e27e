"""A head that dies: a replay search (`tuning.replay`, no TensorFlow) with its experiment in s3://
storage on a local S3 server (moto, 127.0.0.1), the default SQLite study and MLflow on, stopped
while a trial is in flight and resumed with `--resume`:

- Ctrl-C (SIGINT) on the driver, then `--resume` on the same head (in this process, one Ray);
- SIGKILL of the driver's whole process group (its `ray.init(address="local")` head dies with it),
  then `--resume` on a new head: another HOME and XDG_CACHE_HOME, the old local folder deleted,
  everything fetched from the storage.

Both must end with status 0 and: the trials finished before the stop kept (their results
untouched, not run again), the trial in flight continued from its checkpoint (its epochs go on),
the study holding one COMPLETE or PRUNED entry per Ray trial with that trial's own configuration
(no configuration run twice), the crash's FAIL entries listed in the report, and search_state.json,
mlflow.db (one run per Ray trial), report.html and the rest in the storage.

Cost: about 75 s on 2 busy cores (measured: see the end of this docstring), most of it Ray's
start-up: two Ray starts, one in this process, shared by the SIGINT case's two sessions and by the
new head's session (its driver has its own HOME; replayed trials never read theirs), and one by
the killed head's subprocess; 3 trials of 3 epochs of 1 s; MLflow only where the head is lost.
It cannot share tests/test_study_truth.py's `truth_search` (a folder storage, resumed on the same
head, budget-cut) nor tests/test_multinode.py's cluster (real training, 6 minutes, a worker lost,
not the head). The pieces (a remote experiment unpickled on a new head, publish and fetch, the
error naming the study, a searcher mapped to a WAITING entry) are tested without Ray: milliseconds.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.s3 import BUCKET, s3_bytes, s3_env, s3_files, s3_read  # noqa: F401  (s3_env: a fixture)
from tests.test_study_truth import assert_study_agrees, interrupt_when, no_tensorflow

optuna = pytest.importorskip("optuna")

EPOCHS, SAMPLES = 3, 3
POINTS = [1.0e-3, 1.0e-5, 3.0e-4]  # one trial each: a third running the second's again is the bug


def write_config(tmp_path, phantom_root, name: str, mlflow: bool) -> Path:
    cfg = {"data": {"source": "rsna", "root": str(phantom_root), "val_fraction": 0.25, "test_fraction": 0.2},
           "model": {"image_size": 71, "weights": "none"},
           "train": {"epochs": EPOCHS, "early_stopping_patience": 0},
           "tune": {"storage_path": f"s3://{BUCKET}/{name}", "num_samples": SAMPLES, "max_concurrent_trials": 1,
                    "n_startup_trials": SAMPLES, "grace_period": EPOCHS, "resources": {"cpu": 1, "gpu": 0},
                    "retrain": False, "mlflow": mlflow,
                    "space": {"learning_rate": {"loguniform": [1.0e-5, 1.0e-2]}},
                    "points_to_evaluate": [{"learning_rate": rate} for rate in POINTS],
                    "replay": {"curves": "formula", "seconds_per_epoch": 1.0, "checkpoint_mib": 0.01}}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def stored_results(experiment: str) -> dict[str, list[dict]]:
    """{trial folder: its result.json lines} as the storage holds them now."""
    found = {}
    for path in (p for p in s3_files(experiment) if p.endswith("/result.json")):
        try:
            lines = [json.loads(line) for line in s3_read(f"{experiment}/{path}").splitlines() if line.strip()]
        except (OSError, ValueError):  # an upload in flight
            continue
        if lines:  # (a trial that has not reported yet: nothing to keep or continue)
            found[path.split("/")[0]] = lines
    return found


def mid_search(experiment: str) -> bool:
    """A trial has finished, and another is in flight with its last epoch's checkpoint in the
    storage and in the experiment state there: a stop now must keep the one and continue the
    other. The storage lags the trials by up to Ray's snapshot period (1 s here): epochs of 1 s
    leave the one in flight two more epochs. (A head killed before the state that knows a trial
    reached the storage loses that trial, which a resume then cannot continue. A snapshot torn by
    the kill, its searcher state older or newer than its trials, is survived: see the tests of
    the pieces below.)"""
    files, results = s3_files(experiment), stored_results(experiment)
    states = []
    for path in (f for f in files if f.startswith("experiment_state") and f.endswith(".json")):
        try:
            states.append(s3_read(f"{experiment}/{path}"))
        except OSError:  # an upload in flight
            continue
    done = [t for t, lines in results.items() if lines and lines[-1]["epoch"] == EPOCHS]
    flying = [t for t, lines in results.items() if lines and lines[-1]["epoch"] < EPOCHS
              and f"{t}/checkpoint_{lines[-1]['epoch'] - 1:06d}/state.json" in files
              and any(lines[-1]["trial_id"] in state for state in states)]
    return bool(done and flying)


def check_resumed(tmp_path, name: str, before: dict[str, list[dict]], with_mlflow: bool) -> None:
    """What a resumed search must leave in the storage (see the module docstring)."""
    experiment = f"{name}/{name}"
    after = stored_results(experiment)
    assert len(after) == SAMPLES, sorted(after)
    finished = {t for t, lines in before.items() if lines[-1]["epoch"] == EPOCHS}
    flying = set(before) - finished
    assert finished and flying, before
    for trial in finished:  # kept as they were, not run again
        assert after[trial] == before[trial], trial
    for trial in flying:  # went on from its checkpoint: no epoch restarted from 1
        epochs = [r["epoch"] for r in after[trial]]
        resumed = epochs[len(before[trial]):] if epochs[:len(before[trial])] == [r["epoch"] for r in before[trial]] \
            else epochs
        assert resumed and resumed[0] > 1 and resumed == sorted(set(resumed)) and resumed[-1] == EPOCHS, \
            (trial, [r["epoch"] for r in before[trial]], epochs)

    # the search over, each trial keeps only its last checkpoint (tuning.search.trim_checkpoints)
    files = s3_files(experiment)
    for trial in after:
        kept = {p.split("/")[1] for p in files if p.startswith(f"{trial}/checkpoint_")}
        assert kept == {f"checkpoint_{after[trial][-1]['epoch'] - 1:06d}"}, (trial, kept)

    # the study, trials.csv, the report, the search state and MLflow, all from the storage
    local = tmp_path / f"{name}-stored"
    local.mkdir()
    for file in ("optuna.db", "trials.csv", "search_state.json", "report.html", "summary.json") + \
            (("mlflow.db",) if with_mlflow else ()):
        (local / file).write_bytes(s3_bytes(f"{experiment}/{file}"))
    assert_study_agrees(local, name)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{local / 'optuna.db'}")
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.WAITING not in states and optuna.trial.TrialState.RUNNING not in states, states
    ended = [t for t in study.trials if t.state != optuna.trial.TrialState.FAIL]
    rates = [t.params["learning_rate"] for t in ended]
    assert len(ended) == SAMPLES and len(set(rates)) == SAMPLES, rates  # no configuration run twice
    assert set(POINTS) <= set(rates), rates
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == len(flying), [(t.number, t.state) for t in study.trials]  # the crash's, closed
    report = (local / "report.html").read_text()
    for entry in failed:
        assert f"#{entry.number}" in report and entry.user_attrs["ray_trial_id"] in report, entry.number
    state = json.loads((local / "search_state.json").read_text())
    trial_ids = {lines[-1]["trial_id"] for lines in after.values()}
    assert set(state["trial_seconds"]) == trial_ids and state["elapsed_s"] > 0, state
    assert json.loads((local / "summary.json").read_text())["storage"] == f"s3://{BUCKET}/{experiment}"
    if not with_mlflow:
        return
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{local / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    names = sorted(r.data.tags["trial_name"] for r in runs)
    assert len(names) == SAMPLES and len(set(names)) == SAMPLES, names  # one run per Ray trial
    assert all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]


@pytest.fixture(scope="module")
def replay_env(tmp_path_factory):
    """TensorFlow unimportable for drivers and Ray's workers, Ray's experiment state synced into
    the storage every second (as on a long search); the Ray this process starts is shared by the
    tests' in-process sessions (Ray's start-up is most of their cost)."""
    import ray

    if ray.is_initialized():  # another test's Ray: this one's workers must start without TensorFlow
        ray.shutdown()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", no_tensorflow(tmp_path_factory.mktemp("head-loss")))
        patch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "1")
        yield
    ray.shutdown()
    # Ray caches its auth token in the process, read from ~/.ray/auth_token under the HOME of
    # these tests' heads; the next module's Ray reads the real HOME's, which would not match
    from ray._private.authentication_test_utils import reset_auth_token_state

    reset_auth_token_state()


@pytest.fixture
def clean_env(replay_env, tmp_path, monkeypatch):
    """HOME and XDG_CACHE_HOME of a first head."""
    monkeypatch.setenv("HOME", str(tmp_path / "home1"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home1" / ".cache"))
    return tmp_path


@pytest.mark.slow
def test_ctrl_c_then_resume_on_the_same_head(s3_env, clean_env, phantom_root):
    from tuning.search import main

    tmp_path, name = clean_env, "ctrlc"
    argv = ["--config", str(write_config(tmp_path, phantom_root, name, mlflow=False)), "--name", name]
    done = threading.Event()
    watcher = interrupt_when(lambda: mid_search(f"{name}/{name}"), done, every=0.3)
    try:
        code = main(argv)
    finally:
        done.set()
        watcher.join()
    assert code == 130, "the search ended before it could be interrupted"
    before = stored_results(f"{name}/{name}")
    assert main(argv + ["--resume"]) == 0
    check_resumed(tmp_path, name, before, with_mlflow=False)


@pytest.mark.slow
def test_a_killed_head_resumes_on_a_new_one(s3_env, clean_env, phantom_root, monkeypatch):
    pytest.importorskip("mlflow")
    from tuning.search import main

    tmp_path, name = clean_env, "headloss"
    argv = ["--config", str(write_config(tmp_path, phantom_root, name, mlflow=True)), "--name", name]
    log = open(tmp_path / "first-head.log", "w")
    driver = subprocess.Popen([sys.executable, "-m", "tuning.search", *argv], stdout=log, stderr=subprocess.STDOUT,
                              cwd=tmp_path, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and driver.poll() is None and not mid_search(f"{name}/{name}"):
            time.sleep(0.3)
        assert driver.poll() is None, (tmp_path / "first-head.log").read_text()[-3000:]
        os.killpg(driver.pid, signal.SIGKILL)  # the driver, and the Ray head it started
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        log.close()
    before = stored_results(f"{name}/{name}")
    # a new head: another HOME, nothing local
    shutil.rmtree(tmp_path / "home1" / "boneage-experiments" / name)
    monkeypatch.setenv("HOME", str(tmp_path / "home2"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home2" / ".cache"))
    assert main(argv + ["--resume"]) == 0
    assert not (tmp_path / "home1" / "boneage-experiments" / name).exists()  # nothing of the first head's used
    check_resumed(tmp_path, name, before, with_mlflow=True)


# --- the pieces, without Ray (milliseconds) -------------------------------------------------------

def test_a_remote_experiment_unpickles_with_this_heads_folder(tmp_path, monkeypatch):
    import pickle

    from tuning.experiment import Experiment
    from tuning.progress import StudySync
    from tuning.study_storage import default_study_url

    monkeypatch.setenv("HOME", str(tmp_path / "home1"))
    remote = Experiment("e", f"file://{tmp_path}/bucket", tmp_path / "home1" / "boneage-experiments" / "e")
    folder = Experiment("e", str(tmp_path / "shared"), tmp_path / "shared" / "e")
    sync = StudySync(remote, default_study_url(remote.local_dir))
    monkeypatch.setenv("HOME", str(tmp_path / "home2"))  # a new head
    assert pickle.loads(pickle.dumps(remote)).local_dir == tmp_path / "home2" / "boneage-experiments" / "e"
    assert pickle.loads(pickle.dumps(folder)) == folder  # a shared folder is the same on every head
    home2 = tmp_path / "home2" / "boneage-experiments" / "e"
    assert pickle.loads(pickle.dumps(sync)).study_url() == default_study_url(home2)


def test_publish_replaces_a_folder_without_removing_it_first_and_fetch_keeps_newer_local_files(
        tmp_path, monkeypatch):
    import os

    from tuning.experiment import Experiment

    exp = Experiment("e", f"file://{tmp_path}/bucket", tmp_path / "local")
    stored = tmp_path / "bucket" / "e"
    (exp.local_dir / "model").mkdir(parents=True)
    (exp.local_dir / "model" / "old.bin").write_text("old")
    (exp.local_dir / "model" / "card.json").write_text("1")
    exp.publish(["model"])
    (exp.local_dir / "model" / "old.bin").unlink()
    (exp.local_dir / "model" / "card.json").write_text("2")
    (exp.local_dir / "model" / "new.bin").write_text("new")
    real_fs, seen_at_delete = exp._fs()[0], []

    class Watched:  # the storage, noting what the folder holds whenever a file is deleted
        def __getattr__(self, name):
            return getattr(real_fs, name)

        def delete_file(self, path):
            seen_at_delete.append(sorted(p.name for p in (stored / "model").iterdir()))
            real_fs.delete_file(path)

    monkeypatch.setattr(Experiment, "_fs", lambda self: (Watched(), f"{tmp_path}/bucket/e"))
    exp.publish(["model"])
    assert seen_at_delete == [["card.json", "new.bin", "old.bin"]]  # the new content in before the old went
    assert sorted(p.name for p in (stored / "model").iterdir()) == ["card.json", "new.bin"]
    assert (stored / "model" / "card.json").read_text() == "2"

    # the storage's copy is older than the local file: kept; newer: fetched
    (exp.local_dir / "study.db").write_text("local, newer")
    (stored / "study.db").write_text("stored")
    os.utime(stored / "study.db", (1, 1))
    assert exp.fetch("study.db") and (exp.local_dir / "study.db").read_text() == "local, newer"
    os.utime(exp.local_dir / "study.db", (1, 1))
    os.utime(stored / "study.db", None)
    assert exp.fetch("study.db") and (exp.local_dir / "study.db").read_text() == "stored"


def test_the_default_study_is_not_blamed_on_tune_optuna_storage(tmp_path):
    from boneage.errors import InputError
    from tuning.config import load_search_config
    from tuning.study_storage import open_storage, study_key

    cfg = load_search_config(None, [])
    with pytest.raises(InputError, match=r"^the experiment's study \(optuna.db\): .*does not exist"):
        open_storage(f"sqlite:///{tmp_path}/gone/optuna.db", study_key(cfg))
    cfg = load_search_config(None, [f"tune.optuna_storage=sqlite:///{tmp_path}/gone/optuna.db"])
    with pytest.raises(InputError, match=r"^tune.optuna_storage: .*does not exist"):
        open_storage(cfg.tune.optuna_storage, study_key(cfg))


def test_a_searcher_mapped_to_a_waiting_entry_raises(tmp_path):
    """What a study copy older than the searcher's state looked like (Why, item 1): the trial's
    entry still WAITING. Its end cannot be told: an error, never a log line."""
    from tuning.config import load_search_config
    from tuning.space import parse_space
    from tuning.study import make_searcher
    from tuning.study_storage import study_url

    cfg = load_search_config(None, ["train.epochs=2", "tune.space={learning_rate: {loguniform: [1.0e-5, 1.0]}}",
                                    "tune.points_to_evaluate=[{learning_rate: 0.001}, {learning_rate: 0.0001}]"])
    search = make_searcher(cfg, parse_space(cfg), study_url(cfg, tmp_path), "stale", "val_mae", "min")
    search.suggest("a")
    waiting = next(t for t in search._ot_study.get_trials(deepcopy=False) if t.state.name == "WAITING")
    search._ot_trials["b"] = optuna.Trial(search._ot_study, waiting._trial_id)  # as unpickled from a stale copy
    with pytest.raises(RuntimeError, match="is WAITING"):
        search.on_trial_complete("b", {"epoch": 2, "val_mae": 30.0, "ended": "completed", "best_val_mae": 30.0})


def test_a_trial_the_restored_searcher_never_suggested_is_adopted(tmp_path):
    """What CI met once: the head killed while Ray uploaded a snapshot left an experiment state
    newer than the searcher state, so a restored trial reported to a searcher that never suggested
    it (KeyError). It is mapped to the study entry that names it, or, if the study lacks one too,
    given a new entry from its configuration; either way its end is told like any other's."""
    from tuning.config import load_search_config
    from tuning.space import parse_space
    from tuning.study import RAY_TRIAL, make_searcher
    from tuning.study_storage import fail_running_trials, study_url

    cfg = load_search_config(None, ["train.epochs=2", "tune.space={learning_rate: {loguniform: [1.0e-5, 1.0]}}",
                                    "tune.points_to_evaluate=[]", "tune.n_startup_trials=5"])
    search = make_searcher(cfg, parse_space(cfg), study_url(cfg, tmp_path), "adopt", "val_mae", "min")
    rate_a = search.suggest("a")["learning_rate"]
    fail_running_trials(search._ot_study._storage, "adopt")  # the crash: "a"'s entry closed
    del search._ot_trials["a"]  # a searcher state from before "a" was suggested
    search.on_trial_result("a", {"epoch": 1, "val_mae": 31.0, "config/learning_rate": rate_a})
    search.on_trial_complete("a", {"epoch": 2, "val_mae": 30.0, "ended": "completed", "best_val_mae": 30.0,
                                   "config": {"learning_rate": rate_a}})
    # a trial neither the searcher nor the study knew: a new entry with its own rate
    search.on_trial_result("b", {"epoch": 1, "val_mae": 33.0, "config/learning_rate": 0.02})
    search.on_trial_complete("b", {"epoch": 1, "val_mae": 33.0, "ended": "", "config": {"learning_rate": 0.02}})
    search.on_trial_complete("c", None, error=True)  # an error with no result: nothing to learn, no crash
    entries = [(t.state.name, t.user_attrs.get(RAY_TRIAL), t.params["learning_rate"], t.value,
                dict(t.intermediate_values)) for t in search._ot_study.get_trials(deepcopy=False)]
    assert entries == [("FAIL", "a", rate_a, None, {}),
                       ("COMPLETE", "a", rate_a, 30.0, {1: 31.0, 2: 30.0}),
                       ("PRUNED", "b", 0.02, 33.0, {1: 33.0})], entries


def test_a_resumed_limiter_forgets_trials_ray_does_not_know():
    """The other half of a torn snapshot: a searcher state newer than the experiment state. The
    limiter's ghost trial would hold a slot forever; the scheduler drops it once, after a resume."""
    import pickle
    from types import SimpleNamespace

    from ray.tune.search import Searcher

    from tuning.progress import Limiter, Scheduler

    limiter = Limiter(Searcher(metric="val_mae", mode="min"), max_concurrent=1)
    limiter.live_trials, limiter.num_unfinished_live_trials = {"ghost", "known"}, 2
    controller = SimpleNamespace(search_alg=SimpleNamespace(searcher=limiter),
                                 get_trials=lambda: [SimpleNamespace(trial_id="known", status="RUNNING")])
    fresh = Scheduler(SimpleNamespace(), max_running=0, metric="val_mae", mode="min", time_attr="epoch", max_t=2)
    fresh._forget_ghosts(controller)  # a search that was not resumed: left alone
    assert limiter.live_trials == {"ghost", "known"}
    resumed = pickle.loads(pickle.dumps(fresh))
    resumed._forget_ghosts(controller)
    assert limiter.live_trials == {"known"} and limiter.num_unfinished_live_trials == 1

    # the count of trials created, from the trials Ray restored (tags "1_...", "3_..."), up or down
    for saved in (1, 5):
        generator = SimpleNamespace(_counter=saved)
        again = pickle.loads(pickle.dumps(fresh))
        for tag in ("3_lr=0.1", "1_learning_rate=0.001", ""):  # restored in any order
            again._count_restored(SimpleNamespace(search_alg=generator), SimpleNamespace(experiment_tag=tag))
        assert generator._counter == 3, saved
