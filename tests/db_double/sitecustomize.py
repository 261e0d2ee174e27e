"""A test double for a database that needs a password (PostgreSQL, say), where none can run.

On PYTHONPATH, Python runs this at start-up in every process. It registers the SQLAlchemy dialect
`sqlitepw`: SQLite underneath, but like a database server it refuses a connection unless the URL
it is finally given carries the password in `BONEAGE_TEST_DB_PASSWORD`. A search whose study
lives at `sqlitepw://user@localhost//path/study.db` therefore works only if the password reached
the connection (from BONEAGE_OPTUNA_PASSWORD), and a test can then look for it in every file.
"""
import os

try:
    from sqlalchemy.dialects import registry
    from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
except ImportError:  # a process without SQLAlchemy never opens the study
    pass
else:
    class PasswordSQLite(SQLiteDialect_pysqlite):
        def create_connect_args(self, url):
            if url.password != os.environ.get("BONEAGE_TEST_DB_PASSWORD"):
                raise PermissionError(f'password authentication failed for user "{url.username}"')
            return super().create_connect_args(url._replace(username=None, password=None, host=None))  # set() ignores None

    registry.register("sqlitepw", "sitecustomize", "PasswordSQLite")
