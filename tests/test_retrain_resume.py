"""The retrain can be resumed: it checkpoints every epoch into the experiment's storage, keyed by
the tuned config, and a retrain killed with SIGKILL continues from its last checkpoint when it is
run again, then exports once and drops the checkpoint.

The storage side (whole checkpoints only, the previous epoch's files deleted, a cut-off state
file skipped, nothing left in the driver's folder) runs on a small model through a file:// URI,
which takes the remote-storage path of `tuning.experiment.Experiment` (fetch, publish, delete)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import HEAD_ONLY, tiny_overrides

keras = pytest.importorskip("keras")


def small_model():
    import numpy as np

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(0.1), "mae")
    model.fit(np.ones((4, 2)), np.ones(4), verbose=0)  # a checkpoint holds a trained optimizer
    return model


def test_the_key_follows_the_tuned_config_and_the_data(tmp_path):
    from boneage.config import save_config
    from tuning.config import load_search_config
    from tuning.retrain_checkpoint import checkpoint_key

    cfg = load_search_config("configs/demo.yaml")
    save_config(cfg, tmp_path / "saved.yaml")  # the driver keys it before, --retrain-only after a round trip
    assert checkpoint_key(load_search_config(tmp_path / "saved.yaml"), "data") == checkpoint_key(cfg, "data")
    other = load_search_config("configs/demo.yaml", ["train.learning_rate=0.002"])
    assert checkpoint_key(other, "data") != checkpoint_key(cfg, "data")
    assert checkpoint_key(cfg, "other data") != checkpoint_key(cfg, "data")


def test_checkpoints_in_a_remote_storage(tmp_path, monkeypatch):
    from tuning.config import load_search_config
    from tuning.experiment import Experiment
    from tuning.retrain_checkpoint import RETRAIN_CHECKPOINT, RetrainCheckpoint

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # a remote experiment's local folder
    cfg = load_search_config(None, [f"tune.storage_path=file://{tmp_path}/bucket"])
    exp = Experiment.create(cfg, "remote")
    assert exp.remote
    saver = RetrainCheckpoint(exp, cfg, "data")
    assert saver.latest() is None
    model = small_model()
    for epoch in (1, 2):
        saver.save(model, epoch, {"loss": [0.5] * epoch})
    stored = tmp_path / "bucket" / "remote" / saver.folder
    assert sorted(p.name for p in stored.iterdir()) == ["model-0002.keras", "state-0002.json"]
    (stored / "state-0003.json").write_text('{"epoch": 3, "mod')  # a state cut off by a kill

    again = RetrainCheckpoint(exp, cfg, "data")
    resume = again.latest()
    assert resume.epoch == 2 and resume.history == {"loss": [0.5, 0.5]}
    assert not (exp.local_dir / RETRAIN_CHECKPOINT).exists()  # the driver would publish it back
    assert keras.models.load_model(resume.model_path).get_weights()[0].shape == (2, 1)
    assert RetrainCheckpoint(exp, load_search_config(None, ["train.epochs=3"]), "data").latest() is None
    again.save(model, 3, {"loss": [0.5] * 3})
    assert sorted(p.name for p in stored.iterdir()) == ["model-0003.keras", "state-0003.json"]
    again.clear()
    again.close()
    assert not (tmp_path / "bucket" / "remote" / RETRAIN_CHECKPOINT).exists()
    assert not Path(resume.model_path).exists()


RETRAIN = """
import json, sys
from boneage.splits import load_splits
from tuning.config import load_search_config
from tuning.experiment import Experiment
from tuning.retrain import retrain_into

cfg = load_search_config(None, sys.argv[1:])
results = retrain_into(Experiment.create(cfg, "retrain"), cfg, load_splits(cfg.data, report=lambda m: None))
print("RESULT", json.dumps({k: results[k] for k in ("epochs", "resumed_from", "test_metrics")}))
"""


def newest_checkpoint(folder: Path):
    """(epoch, history) of the newest whole checkpoint in a retrain checkpoint folder, or None."""
    for state in sorted(folder.glob("*/state-*.json"), reverse=True):
        try:
            found = json.loads(state.read_text())
        except ValueError:
            continue
        if (state.parent / found["model"]).is_file():
            return found["epoch"], found["history"]
    return None


@pytest.mark.slow
def test_a_killed_retrain_continues_from_its_checkpoint(tmp_path, phantom_root):
    epochs = 3
    args = tiny_overrides(phantom_root) + [
        f"model.frozen_layers={HEAD_ONLY}", f"train.epochs={epochs}", "train.schedule=cosine", "data.val_fraction=0.25",
        f"tune.storage_path={tmp_path}", "tune.gallery_size=0", "tune.ensemble_top_k=1", "intervals.coverage=0.8"]
    command = [sys.executable, "-c", RETRAIN, *args]
    experiment = tmp_path / "retrain"
    checkpoints = experiment / "retrain_checkpoint"
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 600
        while time.time() < deadline and first.poll() is None and newest_checkpoint(checkpoints) is None:
            time.sleep(0.1)
        assert first.poll() is None, "the retrain ended before its first checkpoint was seen:\n" + log.read_text()[-3000:]
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == -signal.SIGKILL
    assert not (experiment / "model").exists()  # killed before its export
    epoch, history = newest_checkpoint(checkpoints)
    assert 1 <= epoch < epochs

    second = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"continuing from its checkpoint after epoch {epoch} of {epochs}" in second.stdout
    result = json.loads(second.stdout.split("RESULT ", 1)[1])
    assert result["resumed_from"] == epoch and result["epochs"] == epochs
    rows = pd.read_csv(experiment / "final" / "history.csv")
    assert rows["epoch"].tolist() == list(range(epochs))  # epochs 1..3 once each, in order
    # the epochs before the kill are the killed run's own, the rest were trained by the rerun
    assert rows["loss"].tolist()[:epoch] == pytest.approx(history["loss"], rel=1e-6)
    assert (experiment / "model" / "model.keras").is_file() and result["test_metrics"]["n"] > 0
    assert not checkpoints.exists()  # done: the checkpoint is gone, a later retrain starts afresh
