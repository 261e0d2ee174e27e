"""No silent surprises: a search refused for bad input says why, with status 2, and leaves
nothing behind; --resume runs what was started or refuses; --dry-run starts nothing; an
unwritable or full output location is refused before the data is read; a killed export leaves no
folder that `predict` loads. Faults are real: a path below a regular file, a full tmpfs, a
read-only bind mount (CI runs as root, which ignores permissions but not a read-only mount), a
SIGKILL."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tuning.search import main

STEM = "nosurprise"


def search_config(tmp_path, root, storage=None, **data) -> Path:
    cfg = {"data": {"source": "rsna", "root": str(root), "val_fraction": 0.25, "test_fraction": 0.2, **data},
           "model": {"image_size": 71, "weights": "none"},
           "train": {"epochs": 2, "batch_size": 16},
           "tune": {"storage_path": str(storage or tmp_path / "experiments"), "num_samples": 3,
                    "max_concurrent_trials": 1, "grace_period": 1, "resources": {"cpu": 1, "gpu": 0},
                    "space": {"learning_rate": {"loguniform": [1.0e-4, 1.0e-2]}}}}
    path = tmp_path / f"{STEM}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def started_experiment(config: Path, name: str) -> Path:
    """An experiment folder as a search leaves it once started: its resolved config saved."""
    from boneage.config import save_config
    from tuning.config import load_search_config
    from tuning.experiment import SEARCH_CONFIG

    cfg = load_search_config(config)
    folder = Path(cfg.tune.storage_path) / name
    folder.mkdir(parents=True)
    save_config(cfg, folder / SEARCH_CONFIG)
    return folder


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}


def refused(capsys, *argv) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_resume_with_another_config_is_refused_and_shows_the_difference(tmp_path, phantom_root, capsys):
    config = search_config(tmp_path, phantom_root)
    folder = started_experiment(config, "started")
    before = tree(folder)
    err = refused(capsys, "--config", str(config), "--name", "started", "--resume",
                  "--set", "train.epochs=3", "--set", "tune.num_samples=5")
    assert "train.epochs: 2 -> 3" in err and "tune.num_samples: 3 -> 5" in err
    assert tree(folder) == before


def test_reusing_a_name_without_resume_is_refused(tmp_path, phantom_root, capsys):
    config = search_config(tmp_path, phantom_root)
    folder = started_experiment(config, "taken")
    before = tree(folder)
    err = refused(capsys, "--config", str(config), "--name", "taken")
    assert "already exists" in err and "--resume" in err
    assert tree(folder) == before


def test_a_refused_search_leaves_nothing_behind(tmp_path, phantom_root, capsys):
    storage = tmp_path / "experiments"
    missing = search_config(tmp_path, tmp_path / "no-such-data")
    err = refused(capsys, "--config", str(missing), "--name", "first")
    assert "data.root" in err and str(tmp_path / "no-such-data") in err
    # the demo's phantom is not generated, nor the splits written, for a search that is refused
    phantom = search_config(tmp_path, tmp_path / "phantom", source="phantom", phantom_n=40)
    err = refused(capsys, "--config", str(phantom), "--name", "never-started", "--resume")
    assert "never-started" in err
    assert not storage.exists() and not (tmp_path / "phantom").exists()
    # an empty folder (another tool's, an old crash) is never taken for the newest experiment
    started_experiment(phantom, f"{STEM}-20260101-000000")
    (storage / f"{STEM}-29990101-000000").mkdir()
    from tuning.config import load_search_config
    from tuning.search import default_name

    args = type("Args", (), {"config": str(phantom), "resume": True})
    assert default_name(args, load_search_config(phantom)) == f"{STEM}-20260101-000000"


def test_dry_run_prints_the_plan_and_starts_nothing(tmp_path, phantom_root):
    config = search_config(tmp_path, phantom_root)
    proc = subprocess.run([sys.executable, "-m", "tuning.search", "--config", str(config), "--name", "dry",
                           "--dry-run"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "dry run" in out and "nothing was started" in out
    assert "trials: 3" in out and "trial-epochs: at most 6" in out and "GPU-hours: none" in out
    assert not (tmp_path / "experiments").exists()


def test_storage_below_a_regular_file_is_refused_before_the_data_is_read(tmp_path, phantom_root, capsys):
    (tmp_path / "a-file").write_text("not a folder")
    config = search_config(tmp_path, tmp_path / "no-such-data", storage=tmp_path / "a-file" / "experiments")
    err = refused(capsys, "--config", str(config), "--name", "x")
    assert "is a file, not a folder" in err and "data.root" not in err  # the storage is checked first


@pytest.fixture
def mounted(tmp_path):
    """mount(8) as the test needs it, skipped where mounting is not permitted; always unmounted."""
    mounts = []

    def mount(*args):
        target = Path(args[-1])
        target.mkdir(exist_ok=True)
        proc = subprocess.run(["mount", *args], capture_output=True, text=True)
        if proc.returncode:
            pytest.skip(f"cannot mount here: {proc.stderr.strip()}")
        mounts.append(target)
        return target

    yield mount
    for target in reversed(mounts):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_a_full_disk_is_refused_before_anything_is_written(tmp_path, phantom_root, capsys, mounted):
    disk = mounted("-t", "tmpfs", "-o", "size=8m", "tmpfs", str(tmp_path / "disk"))
    with open(disk / "filler", "wb") as f:  # fill it for real
        try:
            while True:
                f.write(b"\0" * 2**20)
        except OSError:
            pass
    config = search_config(tmp_path, phantom_root, storage=disk / "experiments")
    err = refused(capsys, "--config", str(config), "--name", "x")
    assert str(disk) in err and ("MiB free" in err or "No space left" in err)
    assert not (disk / "experiments").exists()


def test_a_read_only_mount_is_refused_before_anything_is_written(tmp_path, phantom_root, capsys, mounted):
    (tmp_path / "source").mkdir()
    read_only = mounted("--bind", str(tmp_path / "source"), str(tmp_path / "read-only"))
    mounted("-o", "remount,ro,bind", str(read_only))
    config = search_config(tmp_path, phantom_root, storage=read_only / "experiments")
    err = refused(capsys, "--config", str(config), "--name", "x")
    assert "cannot write" in err and "Read-only file system" in err
    assert list((tmp_path / "source").iterdir()) == []


def test_an_export_killed_half_way_leaves_nothing_predict_loads(tmp_path, trained_run, phantom_root):
    run_dir, _, _ = trained_run
    out = tmp_path / "export"
    export = subprocess.Popen([sys.executable, "-m", "boneage", "export", str(run_dir / "best.keras"),
                               "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and export.poll() is None and not list(tmp_path.glob(".export.tmp-*/model.keras")):
        time.sleep(0.05)
    assert export.poll() is None, "the export ended before it could be killed"
    export.send_signal(signal.SIGKILL)  # the Keras file is written, the SavedModel not yet
    export.wait()
    assert not out.exists() and list(tmp_path.glob(".export.tmp-*"))
    image = next((Path(phantom_root) / "boneage-test-dataset").glob("*.png"))
    predict = subprocess.run([sys.executable, "-m", "boneage", "predict", str(out), str(image), "--sex", "M"],
                             capture_output=True, text=True, timeout=300)
    assert predict.returncode == 2 and f"no model at {out}" in predict.stderr, predict.stderr[-2000:]
    # the next export finishes and clears what the killed one left
    again = subprocess.run([sys.executable, "-m", "boneage", "export", str(run_dir / "best.keras"), "--out", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "saved_model").is_dir() and not list(tmp_path.glob(".export.tmp-*"))
    assert os.listdir(tmp_path) == ["export"]
