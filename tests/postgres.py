"""A real PostgreSQL server for the tests, started once per session (Debian's `postgresql`
package; `.ci/run` installs it where `initdb` is missing).

    from tests.postgres import postgres  # noqa: F401  (the fixture)
    def test_x(postgres): postgres.url, postgres.password

`initdb` makes a cluster in a new folder under /tmp (PostgreSQL refuses to run as root, so as
root it runs as the `postgres` user through `runuser`, owning that folder); the server listens
on 127.0.0.1 only, on a free port, plus a unix socket in that folder, and asks every client for
a password (scram-sha-256). A role and a database are made for the tests; the fixture yields the
URL without the password, and the password, and stops the server (`pg_ctl stop -m fast`) at
the end of the session. It skips, saying why, where the binaries or `runuser` are missing.
Start-up costs about 5 s.
"""
from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROLE, DATABASE = "boneage", "optuna"


@dataclass(frozen=True)
class Postgres:
    url: str  # postgresql+psycopg2://boneage@127.0.0.1:PORT/optuna: no password, as a config holds it
    password: str
    superuser_password: str
    port: int


def server_bin() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    return Path(folders[-1]) if folders and Path(folders[-1], "initdb").exists() else None


def _as_user() -> tuple[list[str], str | None]:
    """The command prefix that runs the server unprivileged, and why it cannot (or None)."""
    if os.geteuid() != 0:
        return [], None
    runuser = shutil.which("runuser")
    if not runuser:
        return [], "running as root and runuser is missing (PostgreSQL will not run as root)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return [], "running as root and there is no postgres user to run the server as"
    prefix = [runuser, "-u", "postgres", "--"]
    probe = subprocess.run(prefix + ["true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return [], f"runuser -u postgres is not permitted here: {probe.stderr.strip()}"
    return prefix, None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres():
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2-binary (the dev extra) is not installed")
    bin_dir = server_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql")
    prefix, why_not = _as_user()
    if why_not:
        pytest.skip(why_not)

    # /tmp, not pytest's tmp_path: that is private to root, and the socket path must stay short
    folder = Path(tempfile.mkdtemp(prefix="boneage-pg-"))
    data = folder / "data"
    superuser_password, password, port = secrets.token_hex(16), secrets.token_hex(16), _free_port()
    pwfile = folder / "pwfile"
    pwfile.write_text(superuser_password + "\n")
    if prefix:
        owner = pwd.getpwnam("postgres")
        for path in (folder, pwfile):
            os.chown(path, owner.pw_uid, owner.pw_gid)

    def run(*args):
        proc = subprocess.run(prefix + [str(bin_dir / args[0]), *args[1:]], capture_output=True, text=True,
                              timeout=120)
        log = folder / "server.log"
        assert proc.returncode == 0, (f"{args[0]} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
                                      + (log.read_text()[-2000:] if log.exists() else ""))

    run("initdb", "-D", str(data), "-U", "postgres", f"--pwfile={pwfile}", "--auth=scram-sha-256",
        "--encoding=UTF8", "--no-instructions")
    pwfile.unlink()
    # written into the files initdb made, which keeps them the server user's
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{folder}'\n"
                   "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")  # a throw-away cluster
    (data / "pg_hba.conf").write_text("local all all scram-sha-256\nhost all all 127.0.0.1/32 scram-sha-256\n")
    run("pg_ctl", "start", "-D", str(data), "-l", str(folder / "server.log"), "-w", "-t", "60")
    try:
        admin = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", password=superuser_password,
                                 dbname="postgres")
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD %s", (password,))
            cur.execute(f"CREATE DATABASE {DATABASE} OWNER {ROLE}")
        admin.close()
        yield Postgres(f"postgresql+psycopg2://{ROLE}@127.0.0.1:{port}/{DATABASE}", password,
                       superuser_password, port)
    finally:
        run("pg_ctl", "stop", "-D", str(data), "-m", "fast", "-w")
        shutil.rmtree(folder, ignore_errors=True)
