"""One experiment's home: its name, its storage (a folder, a shared file system or s3://), the
driver's local folder, and moving files between them. The search, the retrain and `--resume`
all go through it.

    exp = Experiment.create(cfg, "demo-20261201-101500")
    exp.uri                      # where Ray writes trials and checkpoints: storage_path/name
    exp.local_dir                # where the driver writes; for a folder storage, the same place
    exp.publish(["trials.csv"])  # copy local files into the storage (no-op for a folder)
    with exp.writer("model") as folder: ...   # write on any node, land in the storage

For a folder storage everything is written in place: on a cluster that folder must be shared by
every node (checked before trials start and on every node before its first trial). For s3://
(or any pyarrow URI) the driver works in `~/boneage-experiments/<name>` and publishes into the
storage: the search config and splits at the start, the Optuna study and the search state when a
trial is suggested, reports or ends and when the search stops, mlflow.db as trials start and end,
the outputs at the end; `--resume` on a fresh head fetches them back first (never over a newer
local copy). Pickled (Ray keeps the experiment in its saved state), a remote experiment's local
folder is recomputed on the head that unpickles it.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from boneage.errors import InputError

SEARCH_CONFIG = "search_config.yaml"
STORAGE_MARKER = ".boneage-storage"  # written by the driver; every node must see it
MIN_FREE_MIB = 64  # below this a folder storage is full for our purposes (a checkpoint is ~100 MiB)


@dataclass(frozen=True)
class Experiment:
    name: str
    storage_path: str  # Ray's storage_path: an absolute folder, or a URI such as s3://bucket/path
    local_dir: Path

    @classmethod
    def create(cls, cfg, name: str) -> "Experiment":
        storage = cfg.tune.storage_path
        if is_uri(storage):
            return cls(name, storage.rstrip("/"), head_dir(name))
        storage = str(Path(storage).expanduser().resolve())
        return cls(name, storage, Path(storage) / name)

    @classmethod
    def at(cls, location: str) -> "Experiment":
        """The experiment at a folder or URI such as s3://bucket/path/NAME (for --retrain-only)."""
        location = location.rstrip("/")
        if is_uri(location):
            parent, _, name = location.rpartition("/")
            return cls(name, parent, head_dir(name))
        folder = Path(location).expanduser().resolve()
        return cls(folder.name, str(folder.parent), folder)

    def __reduce__(self):
        # Ray pickles the experiment into its state (the callbacks, the searcher): unpickled on
        # another head (a resume after the first was lost), a remote experiment's local folder
        # is that head's own, never the first head's path
        return _unpickle, (self.name, self.storage_path, None if self.remote else str(self.local_dir))

    @property
    def remote(self) -> bool:
        return is_uri(self.storage_path)

    @property
    def uri(self) -> str:
        return f"{self.storage_path}/{self.name}"

    def _fs(self):
        import pyarrow.fs

        try:
            return pyarrow.fs.FileSystem.from_uri(self.uri)
        except (ValueError, OSError) as err:
            raise InputError(f"tune.storage_path {self.storage_path}: cannot open it ({err})") from None

    # --- moving files -------------------------------------------------------------------------

    def publish(self, names, folder: Path | None = None) -> None:
        """Copy files or folders of `folder` (local_dir) into the storage, replacing what is
        there; a folder storage holds local_dir's already."""
        folder = self.local_dir if folder is None else Path(folder)
        if not self.remote and folder == self.local_dir:
            return
        import pyarrow.fs

        for name in names:
            source = folder / name
            if not source.exists():
                continue
            stale = self._files(name) if source.is_dir() else set()
            fs, base = self._fs()
            if fs.type_name == "local":  # (object stores have no folders to make)
                fs.create_dir(f"{base}/{name}" if source.is_dir() else str(Path(f"{base}/{name}").parent))
            pyarrow.fs.copy_files(str(source), f"{self.uri}/{name}")
            # the old files go only after the new ones are in: no moment without a model/ or final/
            for path in stale - {p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()}:
                fs.delete_file(f"{base}/{name}/{path}")

    def _files(self, name: str) -> set[str]:
        """The files under the storage's folder `name`, relative to it."""
        import pyarrow.fs

        fs, base = self._fs()
        infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{base}/{name}", recursive=True, allow_not_found=True))
        return {i.path[len(f"{base}/{name}/"):] for i in infos if i.type == pyarrow.fs.FileType.File}

    def fetch(self, name: str) -> bool:
        """Copy a file or folder of the storage into local_dir; False if the storage has none. A
        local file newer than the storage's copy is kept: the driver wrote it after its last
        publish (a search stopped on this head), and the copy would lose what it wrote since."""
        if not self.remote:
            return (self.local_dir / name).exists()
        import pyarrow.fs

        fs, base = self._fs()
        info = fs.get_file_info(f"{base}/{name}")
        if info.type == pyarrow.fs.FileType.NotFound:
            return False
        target = self.local_dir / name
        if info.type == pyarrow.fs.FileType.File and target.is_file() and info.mtime is not None \
                and target.stat().st_mtime >= info.mtime.timestamp():
            return True
        target.parent.mkdir(parents=True, exist_ok=True)
        if info.type == pyarrow.fs.FileType.Directory:
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)  # pyarrow copies into it, but makes no local folders
        pyarrow.fs.copy_files(f"{self.uri}/{name}", str(target))
        return True

    def delete(self, name: str) -> None:
        import pyarrow.fs

        fs, base = self._fs()
        info = fs.get_file_info(f"{base}/{name}".rstrip("/"))
        if info.type == pyarrow.fs.FileType.Directory:
            fs.delete_dir(info.path)
        elif info.type == pyarrow.fs.FileType.File:
            fs.delete_file(info.path)

    def exists(self) -> bool:
        """Whether the storage holds this experiment already (a search was started under its name)."""
        import pyarrow.fs

        fs, base = self._fs()
        return fs.get_file_info(f"{base}/{SEARCH_CONFIG}").type == pyarrow.fs.FileType.File

    @contextlib.contextmanager
    def writer(self, *names: str):
        """A folder to write `names` into, on whichever node this runs: the experiment folder
        itself for a folder storage (which every node shares), else a temporary folder whose
        `names` are published into the storage when the block ends without error."""
        if not self.remote:
            self.local_dir.mkdir(parents=True, exist_ok=True)
            yield self.local_dir
            return
        scratch = Path(tempfile.mkdtemp(prefix=f"boneage-{self.name}-"))
        try:
            yield scratch
            self.publish(names, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def remove(self) -> None:
        """Delete what this experiment wrote (a search refused before its first trial)."""
        shutil.rmtree(self.local_dir, ignore_errors=True)
        if self.remote:
            self.delete("")

    def check_writable(self) -> None:
        """InputError unless the storage takes files: a folder whose nearest existing parent is a
        folder we can write in, with room left (or a URI we can write an object to)."""
        if self.remote:
            probe = f"{STORAGE_MARKER}.write-check-{uuid.uuid4().hex}"
            try:
                fs, base = self._fs()
                with fs.open_output_stream(f"{base}/{probe}") as f:
                    f.write(b"ok")
                fs.delete_file(f"{base}/{probe}")
            except OSError as err:
                raise InputError(f"tune.storage_path {self.storage_path}: cannot write there ({err})") from None
            return
        folder = self.local_dir
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir():
            raise InputError(f"tune.storage_path {self.storage_path}: {folder} is a file, not a folder")
        try:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".boneage-write-check-"):
                pass
            stats = os.statvfs(folder)
        except OSError as err:
            raise InputError(f"tune.storage_path {self.storage_path}: cannot write in {folder} ({err})") from None
        free_mib = stats.f_bavail * stats.f_frsize / 2**20
        if free_mib < MIN_FREE_MIB:
            raise InputError(f"tune.storage_path {self.storage_path}: {folder} has {free_mib:.1f} MiB free; a search "
                             f"needs at least {MIN_FREE_MIB} MiB for its checkpoints and model")

    # --- a storage every node can reach ---------------------------------------------------------

    def mark_storage(self) -> str:
        """Write a marker with a fresh token into the storage; nodes check they can read it."""
        token = uuid.uuid4().hex
        if self.remote:
            fs, base = self._fs()
            fs.create_dir(base, recursive=True)
            with fs.open_output_stream(f"{base}/{STORAGE_MARKER}") as f:
                f.write(token.encode())
        else:
            self.local_dir.mkdir(parents=True, exist_ok=True)
            (self.local_dir / STORAGE_MARKER).write_text(token)
        return token

    def storage_problem(self, token: str) -> str | None:
        """Why this process cannot use the experiment's storage, or None."""
        try:
            if self.remote:
                fs, base = self._fs()
                with fs.open_input_stream(f"{base}/{STORAGE_MARKER}") as f:
                    seen = f.read().decode()
            else:
                seen = (self.local_dir / STORAGE_MARKER).read_text()
        except (OSError, InputError) as err:
            return f"cannot read {self.uri}/{STORAGE_MARKER} ({err})"
        if seen != token:
            return f"{self.uri} is not the driver's storage (another folder of the same name)"
        return None


def head_dir(name: str) -> Path:
    """The driver's local folder of an experiment in remote storage, on the head that runs it."""
    return Path.home() / "boneage-experiments" / name


def _unpickle(name: str, storage_path: str, local_dir: str | None) -> Experiment:
    return Experiment(name, storage_path, Path(local_dir) if local_dir else head_dir(name))


def is_uri(path: str) -> bool:
    return "://" in path


def resolve_paths(cfg) -> None:
    """Relative paths in the config become absolute, against the directory the search was
    started in: trials run in their own folders, on other machines."""
    data, model = cfg.data, cfg.model
    if data.root:
        data.root = str(Path(data.root).expanduser().absolute())
    if data.test_root:
        data.test_root = str(Path(data.test_root).expanduser().absolute())
    replay = getattr(getattr(cfg, "tune", None), "replay", None)
    if replay and replay.curves not in ("", "formula"):
        replay.curves = str(Path(replay.curves).expanduser().absolute())
    if model.weights not in ("imagenet", "none"):
        model.weights = str(Path(model.weights).expanduser().absolute())
        if not Path(model.weights).is_file():
            raise InputError(f"config key model.weights: weights file not found: {model.weights}")


def experiment_names(cfg, stem: str) -> list[str]:
    """Names of the experiments `stem-YYYYmmdd-HHMMSS` in the storage, oldest first (for --resume
    without --name): exactly the stem, so `demo` never picks a `demo-small-...` experiment."""
    import pyarrow.fs

    probe = Experiment.create(cfg, "probe")
    try:
        fs, base = pyarrow.fs.FileSystem.from_uri(probe.storage_path if probe.remote else f"file://{probe.storage_path}")
        infos = fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))
    except (ValueError, OSError) as err:
        raise InputError(f"tune.storage_path {probe.storage_path}: cannot list it ({err})") from None
    pattern = re.compile(re.escape(stem) + r"-\d{8}-\d{6}")  # the default name of tuning.search
    names = sorted(os.path.basename(i.path) for i in infos
                   if i.type == pyarrow.fs.FileType.Directory and pattern.fullmatch(os.path.basename(i.path)))
    # only real experiments: a folder without its search config was never started
    return [n for n in names if fs.get_file_info(f"{base}/{n}/{SEARCH_CONFIG}").type == pyarrow.fs.FileType.File]
