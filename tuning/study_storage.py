"""Where a search's Optuna study lives, and how it is opened: the URL (the config's
`tune.optuna_storage`, else SQLite in the experiment folder), the password (from the environment,
never from a file the project writes), and the clean-up of entries a crash left RUNNING.

    url = study_url(cfg, local_dir)              # the config's URL, or SQLite in the experiment
    storage = open_storage(url)                  # the password comes from BONEAGE_OPTUNA_PASSWORD
    fail_running_trials(storage, study_name)     # after a crash: RUNNING entries become FAIL

The URL a user writes never holds a password: `BONEAGE_OPTUNA_PASSWORD` (or the file that
`BONEAGE_OPTUNA_PASSWORD_FILE` names) supplies it when the database is opened, in memory only.
A bad URL or a refused password is bad input (status 2) naming the key.
"""
from __future__ import annotations

import os
from pathlib import Path

from boneage.errors import InputError

STUDY_DB = "optuna.db"
PASSWORD_ENV = "BONEAGE_OPTUNA_PASSWORD"
DEFAULT_KEY = "the experiment's study (optuna.db)"  # what an error names when tune.optuna_storage is unset
PASSWORD_FILE_ENV = "BONEAGE_OPTUNA_PASSWORD_FILE"  # a file, so no command line or job record holds it
# what PostgreSQL's libpq and MySQL say when the password is wrong or missing
REFUSED_PASSWORD = ("password authentication failed", "no password supplied", "Access denied for user")


def study_url(cfg, local_dir: Path) -> str:
    """The study's URL without a password: `tune.optuna_storage`, else SQLite in local_dir."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    url = cfg.tune.optuna_storage or default_study_url(local_dir)
    try:
        parsed = make_url(url)
    except ArgumentError as err:
        raise InputError(f"tune.optuna_storage: {url!r} is not a database URL ({err})") from None
    if parsed.password is not None:
        raise InputError(f"tune.optuna_storage: {parsed.render_as_string(hide_password=True)} holds a password; "
                         f"remove it from the URL and set {PASSWORD_ENV} (or {PASSWORD_FILE_ENV}) instead "
                         f"(it is then never written to any file)")
    return url


def study_key(cfg) -> str:
    """What an error about the study names: the user's `tune.optuna_storage`, or the default."""
    return "tune.optuna_storage" if cfg.tune.optuna_storage else DEFAULT_KEY


def default_study_url(local_dir: Path) -> str:
    """SQLite in the experiment's local folder: the study when `tune.optuna_storage` is unset."""
    return f"sqlite:///{Path(local_dir) / STUDY_DB}"


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


def open_storage(url: str, key: str = "tune.optuna_storage"):
    """The Optuna storage. A URL that cannot name a usable database, or a password the server
    refuses, is bad input (status 2), named by `key` (the experiment's own SQLite study is not
    the user's `tune.optuna_storage`); a database that is there but fails (locked, unreachable,
    a newer schema) raises as it is."""
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
            raise InputError(f"{key}: {shown}: folder {folder} does not exist")
    try:
        return optuna.storages.RDBStorage(parsed.render_as_string(hide_password=False), heartbeat_interval=None)
    except ArgumentError as err:  # e.g. NoSuchModuleError: an unknown kind of database
        raise InputError(f"{key}: cannot use {shown}: {err}") from None
    except ImportError as err:  # Optuna: this kind of database has no driver installed here
        raise InputError(f"{key}: {shown}: {err} (for PostgreSQL: pip install "
                         f"psycopg2-binary; for MySQL: pip install pymysql)") from None
    except OperationalError as err:  # a refused password is the user's to fix; a server down is not
        if not any(sign in str(err) for sign in REFUSED_PASSWORD):
            raise
        given = "a wrong password" if password else "no password"
        raise InputError(f"{key}: {shown}: the server refused {given} for user "
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
