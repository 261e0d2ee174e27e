"""The multi-GPU retrain's code path for real, on CPU: the CPU split into two logical devices
stands in for two GPUs, so MirroredStrategy really runs two replicas of the model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow
REPO = Path(__file__).parent.parent

SCRIPT = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from pathlib import Path
import pandas as pd
from tuning.config import load_search_config
from tuning.retrain import retrain_and_export
from boneage.splits import load_splits
from boneage.export import load_exported
from boneage.evaluate import predict_table
cfg = load_search_config(None, json.loads(sys.argv[1]))
splits = load_splits(cfg.data, report=lambda m: None)
result = retrain_and_export(cfg, splits, Path("out"))
saved = pd.read_csv("out/final/test_predictions.csv")
again = predict_table(load_exported("out/model"), splits.test)
card = json.loads(Path("out/model/model_card.json").read_text())
print("RESULT", json.dumps({"replicas": result["replicas"], "global_batch_size": result["global_batch_size"],
      "phases": result["phases"], "n_test": len(splits.test), "card": card["training"],
      "max_diff": float(abs(again - saved["predicted"].to_numpy()).max()), "mae": result["test_metrics"]["mae"]}))
"""


def test_retrain_mirrors_two_replicas_and_exports(tmp_path, phantom_root):
    overrides = tiny_overrides(phantom_root) + ["train.batch_size=8", "train.epochs=2", "train.head_epochs=1",
                                                "train.head_learning_rate=2e-3", "train.schedule=cosine"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(overrides)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result["replicas"] == 2 and result["global_batch_size"] == 16  # 8 per replica
    head, main = result["phases"]
    assert (head["first"], head["last"], head["frozen_layers"]) == (0, 1, 14)
    assert head["replica_learning_rate"] == pytest.approx(2e-3 * 2 ** 0.5)  # the square-root rule
    assert main["replica_learning_rate"] == pytest.approx(1e-3 * 2 ** 0.5)
    assert result["card"]["replicas"] == 2
    assert result["max_diff"] < 0.02  # the reloaded export predicts as the trained model did
    assert result["n_test"] > 0 and result["mae"] > 0
