"""The Optuna study in a real PostgreSQL server (tests/postgres.py), as on a cluster: the search
gets the password from BONEAGE_OPTUNA_PASSWORD, runs concurrent trials against the server, is
interrupted, and resumes on a new head (another HOME and cache, nothing of the first head's
left, the experiment in a folder both heads share, as on NFS); no file either head wrote holds
the password. And a password the server refuses (none, or a wrong one) is one message and
status 2; the password may come from a file (BONEAGE_OPTUNA_PASSWORD_FILE).

The storage is a shared folder, not s3://: through the local S3 server (moto, in the test's
process) every epoch's checkpoint (~250 MB with Adam's state) made a 71 px trial take over 200 s.

    python -m pytest -q tests/test_postgres.py
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import HEAD_ONLY
from tests.postgres import postgres  # noqa: F401  (the fixture)
from tests.test_search import search_config

RATES = [1.0e-3, 5.0e-4, 2.0e-3]


def _finished_trial_results(experiment: Path, epochs: int) -> dict:
    done = {}
    for result in experiment.glob("run_trial_*/result.json"):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if lines and lines[-1].get("epoch") == epochs:
            done[result] = result.stat().st_mtime_ns
    return done


def head(tmp_path, name: str, postgres, ray_tmp: str) -> dict:
    """The environment of a head of its own: its own HOME and cache, the study's password."""
    home = tmp_path / name
    (home / ".cache").mkdir(parents=True)
    return {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "RAY_TMPDIR": ray_tmp,
            "BONEAGE_OPTUNA_PASSWORD": postgres.password, "PYTHONUNBUFFERED": "1"}


def search(config, env, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tuning.search", "--config", str(config), "--name", "pg", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


@pytest.mark.slow
def test_a_search_with_its_study_in_postgresql_resumes_on_a_new_head(tmp_path, phantom_root, postgres, monkeypatch):
    """Also the suite's test of an interrupted search resumed without re-running its finished
    trials (it was tests/test_search.py's own search until issue 14 folded the two into one).
    Costs two rounds of two one-epoch trials at 71 px, head-only (tests/conftest.py's HEAD_ONLY),
    two Ray starts and a small retrain (no ensemble, no gallery), plus the server's start (5 s,
    once per session); see tests/README.md for its measured time. It cannot share
    `finished_search` (tests/test_search.py): that study is SQLite in the experiment, and this one
    must be interrupted and resumed on another head."""
    import optuna
    from sqlalchemy.engine import make_url

    from tuning.study import RAY_TRIAL

    config = search_config(tmp_path, phantom_root, RATES, epochs=1, grace_period=1, max_concurrent_trials=2,
                           frozen_layers=HEAD_ONLY, optuna_storage=postgres.url)
    assert postgres.password not in config.read_text()
    experiment = tmp_path / "experiments" / "pg"
    ray_tmp = tempfile.mkdtemp(prefix="ray-pg-")  # short: Ray's socket paths live in it
    with_password = make_url(postgres.url).set(password=postgres.password).render_as_string(hide_password=False)
    storage = optuna.storages.RDBStorage(with_password)
    first = second = None
    try:
        # the first head: watch the study on the server; Ctrl-C once a trial is done and another runs
        first = search(config, head(tmp_path, "head1", postgres, ray_tmp))
        most_running, states = 0, []
        deadline = time.time() + 400
        while time.time() < deadline and first.poll() is None:
            try:
                states = [t.state.name for t in optuna.load_study(study_name="pg", storage=storage).trials]
            except KeyError:  # not created yet
                states = []
            most_running = max(most_running, states.count("RUNNING"))
            if "COMPLETE" in states and "RUNNING" in states:
                break
            time.sleep(0.5)
        assert first.poll() is None, "the search ended before it could be interrupted"
        first.send_signal(signal.SIGINT)
        out1, _ = first.communicate(timeout=300)
        assert first.returncode != 0 and "--resume" in out1, out1[-3000:]
        assert most_running == 2, states  # two trials at once, both in the server's study
        cut_off = [t for t in optuna.load_study(study_name="pg", storage=storage).trials if t.state.name == "RUNNING"]
        assert cut_off, "no trial was left running by the interrupt"
        # finished = told COMPLETE before the interrupt (Ray's last snapshot has it terminated); a trial
        # that reported its last epoch as the interrupt landed was still running for Ray, which may
        # run it again on resume (CI saw it once): that one counts as cut off, not finished
        completed = {t.user_attrs.get(RAY_TRIAL) for t in optuna.load_study(study_name="pg", storage=storage).trials
                     if t.state.name == "COMPLETE"}
        before = {path: mtime for path, mtime in _finished_trial_results(experiment, 1).items()
                  if path.parent.name.split("_")[2] in completed}
        assert 1 <= len(before) < len(RATES)
        assert not (experiment / "trials.csv").exists()  # the interrupted search did not reach its end

        # a new head: another HOME, nothing of the first head's left, the same server and storage
        shutil.rmtree(tmp_path / "head1")
        second = search(config, head(tmp_path, "head2", postgres, ray_tmp), "--resume")
        out2, _ = second.communicate(timeout=600)
        assert second.returncode == 0, out2[-4000:]
        after = _finished_trial_results(experiment, 1)
        for path, mtime in before.items():  # finished trials were not run again
            assert after[path] == mtime, f"{path} was run again"
        assert out2.count("retraining the best config") == 1 and (experiment / "model" / "model.keras").exists()

        trials = pd.read_csv(experiment / "trials.csv")
        assert len(trials) == len(RATES) and (trials["status"] == "completed").all()
        study = optuna.load_study(study_name="pg", storage=storage)
        done = [t for t in study.trials if t.state.name == "COMPLETE"]
        failed = [t for t in study.trials if t.state.name == "FAIL"]
        # one finished entry per Ray trial, each with its own configuration; the cut-off ones failed
        assert sorted(t.params["learning_rate"] for t in done) == pytest.approx(sorted(RATES))
        assert sorted(t.number for t in failed) == sorted(t.number for t in cut_off)
        assert len(study.trials) == len(RATES) + len(cut_off)
        assert not list(tmp_path.rglob("optuna.db"))  # the study is on the server only

        # the report's dashboard command opens the study, its password from PGPASSWORD (libpq)
        page = (experiment / "report.html").read_text().replace("&quot;", '"')
        assert f'PGPASSWORD="$BONEAGE_OPTUNA_PASSWORD" optuna-dashboard {postgres.url}' in page
        monkeypatch.setenv("PGPASSWORD", postgres.password)
        assert len(optuna.load_study(study_name="pg", storage=postgres.url).trials) == len(study.trials)

        # no file either head wrote holds the password: the experiment (Ray's tuner.pkl and pickled
        # searcher, the checkpoints), both HOMEs and caches, Ray's session files, the output
        files = [p for folder in (tmp_path, Path(ray_tmp)) for p in folder.rglob("*") if p.is_file()]
        names = {p.name for p in files}
        assert {"tuner.pkl", "report.html", "search_config.yaml"} <= names
        assert any(n.startswith("searcher-state") for n in names)
        secret = postgres.password.encode()
        assert [str(p) for p in files if secret in p.read_bytes()] == []
        assert postgres.password not in out1 + out2
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.parametrize("password", [None, "not-the-password"])
def test_a_password_the_server_refuses_is_one_message_and_status_2(tmp_path, phantom_root, postgres, password,
                                                                  monkeypatch, capsys):
    """In this process, no Ray: the search stops at its first look at the study, before it writes."""
    from tuning.search import main

    config = search_config(tmp_path, phantom_root, RATES, optuna_storage=postgres.url)
    if password:
        monkeypatch.setenv("BONEAGE_OPTUNA_PASSWORD", password)
    else:
        monkeypatch.delenv("BONEAGE_OPTUNA_PASSWORD", raising=False)
    assert main(["--config", str(config), "--name", "refused"]) == 2
    err = capsys.readouterr().err
    given = "a wrong password" if password else "no password"
    assert f"tune.optuna_storage: {postgres.url}: the server refused {given} for user 'boneage'" in err
    assert "BONEAGE_OPTUNA_PASSWORD" in err and "Traceback" not in err
    assert not (tmp_path / "experiments").exists()


def test_the_password_can_come_from_a_file(tmp_path, postgres, monkeypatch):
    """BONEAGE_OPTUNA_PASSWORD_FILE: for a job whose command line and record must not hold it."""
    from boneage.errors import InputError
    from tuning.study_storage import open_storage

    monkeypatch.delenv("BONEAGE_OPTUNA_PASSWORD", raising=False)
    secret = tmp_path / "optuna-db.pw"
    secret.write_text(postgres.password + "\n")
    monkeypatch.setenv("BONEAGE_OPTUNA_PASSWORD_FILE", str(secret))
    assert isinstance(open_storage(postgres.url).get_all_studies(), list)  # connected with it
    secret.unlink()
    with pytest.raises(InputError, match=f"BONEAGE_OPTUNA_PASSWORD_FILE: cannot read {secret}"):
        open_storage(postgres.url)
