"""Shared fixtures: small phantom datasets in tmp folders and tiny configs that train in seconds."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Every Ray of the tests on the loopback: by default Ray binds the machine's outward address, and
# turns 127.0.0.1 given as a node's or a cluster's address into it. With this (Ray's own switch,
# read when ray is imported; on Linux it does nothing else) a local Ray, and a driver joining a
# test cluster at 127.0.0.1, stay on 127.0.0.1. Test clusters' heads are started on 127.0.0.1;
# their `ray start` workers set it back (tests/nodes.py), as `ray start` requires.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

SAMPLE_DATA = os.environ.get("BONEAGE_SAMPLE_DATA")
needs_sample = pytest.mark.skipif(not SAMPLE_DATA, reason="set BONEAGE_SAMPLE_DATA to an RSNA-layout folder")


# The costliest modules first (quiet 2-core figures in tests/README.md): the README's command
# runs two pytest-xdist workers, each taking a whole module at a time (`--dist loadfile`, in this
# order with `--no-loadscope-reorder`), so the long ones start at once and the short ones fill in
# behind them; a module's fixtures are then built by one worker only. Unlisted modules come last.
COSTLIEST_FIRST = ["test_learning", "test_search", "test_multinode", "test_faults", "test_postgres", "test_scale",
                   "test_trial_reliability", "test_ray_gpus", "test_mirrored", "test_reliability", "test_gpu_setup",
                   "test_head_loss", "test_phases", "test_train_export", "test_retrain_resume", "test_lab",
                   "test_prepared_store", "test_study_truth", "test_prepare", "test_phantom", "test_bad_input", "test_no_surprises"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(COSTLIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: a module's own order stays


def pytest_configure(config):
    """Before any worker starts: the Ray auth token that every local Ray of this user reads
    (~/.ray/auth_token). Ray writes it on its first start when it is missing; two xdist workers
    starting their first Ray at once would each write their own, and one would then hold the
    other's token."""
    if os.environ.get("PYTEST_XDIST_WORKER") or (Path.home() / ".ray" / "auth_token").exists():
        return
    from ray._private.authentication.authentication_token_setup import generate_and_save_token

    generate_and_save_token()


@pytest.fixture(scope="session", autouse=True)
def prepared_cache_home(tmp_path_factory) -> Path:
    """Prepared images (boneage.prepare) of this session go to its own folder, not ~/.cache;
    subprocesses (the search CLI, Ray workers) inherit it."""
    home = tmp_path_factory.mktemp("cache-home")
    os.environ["XDG_CACHE_HOME"] = str(home)
    return home / "boneage" / "prepared"


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """60 training + 8 test phantom radiographs in the RSNA layout."""
    from boneage import phantom

    return phantom.generate(tmp_path_factory.mktemp("data") / "phantom", n=60, seed=1, n_test=8)


@pytest.fixture(scope="session")
def sample_root() -> Path:
    if not SAMPLE_DATA:
        pytest.skip("set BONEAGE_SAMPLE_DATA to an RSNA-layout folder")
    return Path(SAMPLE_DATA)


# Xception with all 14 blocks frozen: the real network and the real code paths, but Keras traces
# its training step in about a quarter of the CPU time (measured: ~10 s against ~38 s on these
# CPUs) and a checkpoint drops Adam's moments of the backbone (85 MB against 250 MB). For tests of
# orchestration (resume, GPUs, retrain checkpoints), where what the network learns is not asserted.
HEAD_ONLY = 14


def tiny_overrides(root) -> list[str]:
    """A config that trains one epoch at Xception's minimum size."""
    return [f"data.root={root}", "data.source=rsna", "data.val_fraction=0.2", "data.test_fraction=0.2",
            "model.image_size=71", "model.weights=none", "train.epochs=1", "train.batch_size=16",
            "train.verbose=0", "train.early_stopping_patience=0"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, phantom_root):
    """One small train -> evaluate -> export run, shared by the tests that inspect it."""
    from boneage.config import load_config
    from boneage.train import run

    out = tmp_path_factory.mktemp("run") / "small"
    cfg = load_config(None, tiny_overrides(phantom_root) + [f"model.frozen_layers={HEAD_ONLY}"])
    results = run(cfg, out, report=lambda message: None)
    return out, cfg, results
