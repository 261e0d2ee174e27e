"""The Optuna study behind a search: where it lives, how Ray's searcher talks to it, and how a
crash is cleaned up.

    url = study_url(cfg, local_dir)              # the config's URL, or SQLite in the experiment
    storage = open_storage(url)                  # the password comes from BONEAGE_OPTUNA_PASSWORD
    searcher = StudySearch(study_url=url, space=..., ...)

The URL a user writes never holds a password: `BONEAGE_OPTUNA_PASSWORD` (or the file that
`BONEAGE_OPTUNA_PASSWORD_FILE` names) supplies it when the database is opened, in memory only. Ray pickles the searcher into the experiment (`tuner.pkl`,
`searcher-state-*.pkl`), so `StudySearch` pickles without its storage (a database engine holding
the password) and reopens it on unpickling; no file the project writes holds the password.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

from ray import tune
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from boneage.errors import InputError

STUDY_DB = "optuna.db"
PASSWORD_ENV = "BONEAGE_OPTUNA_PASSWORD"
PASSWORD_FILE_ENV = "BONEAGE_OPTUNA_PASSWORD_FILE"  # a file, so no command line or job record holds it
# what PostgreSQL's libpq and MySQL say when the password is wrong or missing
REFUSED_PASSWORD = ("password authentication failed", "no password supplied", "Access denied for user")


def study_url(cfg, local_dir: Path) -> str:
    """The study's URL without a password: `tune.optuna_storage`, else SQLite in local_dir."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    url = cfg.tune.optuna_storage or f"sqlite:///{Path(local_dir) / STUDY_DB}"
    try:
        parsed = make_url(url)
    except ArgumentError as err:
        raise InputError(f"tune.optuna_storage: {url!r} is not a database URL ({err})") from None
    if parsed.password is not None:
        raise InputError(f"tune.optuna_storage: {parsed.render_as_string(hide_password=True)} holds a password; "
                         f"remove it from the URL and set {PASSWORD_ENV} (or {PASSWORD_FILE_ENV}) instead "
                         f"(it is then never written to any file)")
    return url


def study_password() -> str | None:
    """BONEAGE_OPTUNA_PASSWORD, else the first line of the file BONEAGE_OPTUNA_PASSWORD_FILE names."""
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    path = os.environ.get(PASSWORD_FILE_ENV)
    if not path:
        return None
    try:
        lines = Path(path).expanduser().read_text().splitlines()
    except OSError as err:
        raise InputError(f"{PASSWORD_FILE_ENV}: cannot read {path} ({err.strerror})") from None
    return lines[0] if lines and lines[0] else None


def open_storage(url: str):
    """The Optuna storage. A URL that cannot name a usable database, or a password the server
    refuses, is bad input (status 2); a database that is there but fails (locked, unreachable, a
    newer schema) raises as it is."""
    import optuna
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, OperationalError

    parsed = make_url(url)
    shown = parsed.render_as_string(hide_password=True)  # never print a password
    password = study_password()
    if password:
        parsed = parsed.set(password=password)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        folder = Path(parsed.database).expanduser().absolute().parent
        if not folder.is_dir():
            raise InputError(f"tune.optuna_storage: {shown}: folder {folder} does not exist")
    try:
        return optuna.storages.RDBStorage(parsed.render_as_string(hide_password=False), heartbeat_interval=None)
    except ArgumentError as err:  # e.g. NoSuchModuleError: an unknown kind of database
        raise InputError(f"tune.optuna_storage: cannot use {shown}: {err}") from None
    except ImportError as err:  # Optuna: this kind of database has no driver installed here
        raise InputError(f"tune.optuna_storage: {shown}: {err} (for PostgreSQL: pip install "
                         f"psycopg2-binary; for MySQL: pip install pymysql)") from None
    except OperationalError as err:  # a refused password is the user's to fix; a server down is not
        if not any(sign in str(err) for sign in REFUSED_PASSWORD):
            raise
        given = "a wrong password" if password else "no password"
        raise InputError(f"tune.optuna_storage: {shown}: the server refused {given} for user "
                         f"{parsed.username!r}; set {PASSWORD_ENV} (or {PASSWORD_FILE_ENV}, a file) to that "
                         f"user's password") from None


def fail_running_trials(storage, study_name: str) -> int:
    """After a crash the study still says RUNNING for the trials that were in flight: mark
    them failed, so TPE does not wait on them and the dashboard tells the truth."""
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return 0
    running = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    for trial in running:
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
    return len(running)


class StudySearch(OptunaSearch):
    """Ray's OptunaSearch on our study, with two changes.

    A trial whose study entry was closed meanwhile (marked failed after a crash, then resumed
    from its checkpoint by Ray) reports no epochs to the closed entry; its final result is added
    as a new finished trial. And it pickles without its storage, which it reopens from the
    password-free URL when unpickled (a resumed search).
    """

    def __init__(self, *, study_url: str, **kwargs):
        self._study_url = study_url
        super().__init__(storage=open_storage(study_url), **kwargs)

    def _closed(self, trial_id) -> bool:
        ot_trial = self._ot_trials.get(trial_id)
        return ot_trial is not None and self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished()

    def on_trial_result(self, trial_id, result):
        if not self._closed(trial_id):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id, result=None, error=False):
        import optuna

        if not self._closed(trial_id):
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        # closed: failed by a crash or an error, then resumed by Ray; its result is a new entry
        value = (result or {}).get(self.metric)
        readded = self.__dict__.setdefault("_readded", set())
        if value is not None and not error and trial_id not in readded:
            ot_trial = self._ot_trials[trial_id]
            self._ot_study.add_trial(optuna.trial.create_trial(
                params=ot_trial.params, distributions=ot_trial.distributions, value=value))
            readded.add(trial_id)
        self._completed_trials.add(trial_id)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_storage"] = state["_ot_study"] = None
        state["_ot_trials"] = {tid: trial._trial_id for tid, trial in self._ot_trials.items()}
        return state

    def __setstate__(self, state):
        import optuna

        self.__dict__.update(state)
        self._storage = open_storage(self._study_url)
        self._ot_study = optuna.load_study(study_name=self._study_name, storage=self._storage,
                                           sampler=self._sampler)
        self._ot_trials = {tid: optuna.Trial(self._ot_study, number) for tid, number in state["_ot_trials"].items()}

    # Ray saves and restores searcher state through these, not through pickle's protocol
    def save(self, checkpoint_path: str):
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str):
        with open(checkpoint_path, "rb") as f:
            self.__setstate__(pickle.load(f))


def make_searcher(cfg, space: dict, url: str, study_name: str, metric: str, mode: str) -> StudySearch:
    import optuna

    # constant_liar: trials still running count as bad results, so concurrent trials do not all
    # get the same suggestion (Optuna 5 defaults to it; set here so an older Optuna does too).
    sampler = optuna.samplers.TPESampler(seed=cfg.tune.seed, n_startup_trials=cfg.tune.n_startup_trials,
                                         constant_liar=True)
    return StudySearch(study_url=url, space=space, metric=metric, mode=mode, sampler=sampler,
                       study_name=study_name, points_to_evaluate=list(cfg.tune.points_to_evaluate) or None)


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
    """On the driver, for a SQLite study and an s3:// (or other remote) storage: copy the study
    into the storage after every trial that ends, so a lost head loses at most one trial's
    entry of it, and `--resume` on a fresh head starts from the copy."""

    def __init__(self, exp, url: str):
        self.exp, self.url = exp, url

    def sync(self) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            if backup_sqlite(self.url, Path(folder) / STUDY_DB):
                self.exp.publish([STUDY_DB], Path(folder))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.sync()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.sync()


class Limiter(ConcurrencyLimiter):
    """Ray's ConcurrencyLimiter (TPE suggests a trial only when a slot is free, so it learns from
    the results so far), except that it passes on the end of a trial it did not suggest in this
    session (an errored trial that `--resume` restarted) instead of dropping it."""

    def on_trial_complete(self, trial_id, result=None, error=False):
        if trial_id not in self.live_trials:
            self.searcher.on_trial_complete(trial_id, result=result, error=error)
            return
        super().on_trial_complete(trial_id, result=result, error=error)
