"""GPU set-up proven without a GPU: NVML stood in for by `tests/gpu_double/pynvml.py`, and
TensorFlow made to list GPUs by `tests/gpu_double/sitecustomize.py` while its own rules (no memory
growth on a card with a memory cap, no change once the runtime has started) stay in force.

The trial set-up, the retrain set-up and the CLI each configure TensorFlow once, through the
double, and then train; the calls they made are read back from the double's log.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import HEAD_ONLY, tiny_overrides

GPU_DOUBLE = Path(__file__).parent / "gpu_double"
REPO = Path(__file__).parent.parent
A10G_MIB = 24576
A100_MIB = 81920
TWO_A10G = [{"uuid": "GPU-0a0a0a0a-1111-2222-3333-444444444444", "name": "NVIDIA A10G", "memory_mib": A10G_MIB},
            {"uuid": "GPU-0b0b0b0b-1111-2222-3333-444444444444", "name": "NVIDIA A10G", "memory_mib": A10G_MIB}]
MIXED = [TWO_A10G[0], {"uuid": "GPU-0c0c0c0c-5555-6666-7777-888888888888", "name": "NVIDIA A100-SXM4-80GB",
                       "memory_mib": A100_MIB}]
MIG_CARD = {"uuid": "GPU-0d0d0d0d-9999-aaaa-bbbb-cccccccccccc", "name": "NVIDIA A100-SXM4-80GB",
            "memory_mib": A100_MIB, "mig": [
                {"uuid": "MIG-1e1e1e1e-0000-0000-0000-000000000001", "memory_mib": 40192, "gi": 1},
                {"uuid": "MIG-2f2f2f2f-0000-0000-0000-000000000002", "memory_mib": 19968, "gi": 5}]}


# --- the card and the cap, with the stub NVML --------------------------------------------------

@pytest.fixture
def nvml(monkeypatch):
    """Use the stub pynvml with the given cards."""
    monkeypatch.syspath_prepend(str(GPU_DOUBLE))
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)

    def use(cards):
        monkeypatch.setenv("BONEAGE_FAKE_NVML", json.dumps(cards))

    yield use
    sys.modules.pop("pynvml", None)


@pytest.mark.parametrize("share, expected", [(0.5, A10G_MIB // 2 - 1024), (0.25, A10G_MIB // 4 - 1024)])
def test_cap_is_the_share_of_the_card_less_the_cuda_context(nvml, share, expected):
    from boneage.gpu_memory import memory_cap_mib, visible_card

    nvml(TWO_A10G)
    card = visible_card("1")
    assert card.memory_mib == A10G_MIB and "all 2 cards are the same" in card.note
    assert memory_cap_mib(card.memory_mib, share) == expected
    # n processes at 1/n each, plus their CUDA contexts, take exactly the card
    assert int(1 / share) * (expected + 1024) == A10G_MIB


def test_index_on_mixed_cards_follows_cuda_device_order(nvml):
    from boneage.gpu_memory import visible_card

    nvml(MIXED)
    assert visible_card("1", "PCI_BUS_ID").memory_mib == A100_MIB
    assert visible_card("0", "PCI_BUS_ID").memory_mib == A10G_MIB
    unsure = visible_card("1")  # CUDA's default order (fastest first) need not be NVML's
    assert unsure.memory_mib == A10G_MIB and "smallest card" in unsure.note and "differ" in unsure.note


def test_uuids_and_mig_devices_are_matched_through_nvml(nvml):
    from boneage.gpu_memory import visible_card

    nvml(MIXED + [MIG_CARD])
    assert visible_card(MIXED[1]["uuid"] + ",0").memory_mib == A100_MIB
    assert visible_card("GPU-0c0c0c0c").memory_mib == A100_MIB  # a unique prefix, as CUDA accepts
    assert visible_card("GPU-0").memory_mib is None  # matches every card: refused, not guessed
    assert visible_card("MIG-2f2f2f2f-0000-0000-0000-000000000002").memory_mib == 19968
    assert visible_card(f"MIG-{MIG_CARD['uuid']}/1/0").memory_mib == 40192  # the older form
    whole = visible_card("2", "PCI_BUS_ID")  # an index on a card split into MIG devices
    assert whole.memory_mib == 19968 and "MIG is on" in whole.note
    assert visible_card("MIG-ffffffff").memory_mib is None


def test_no_cap_without_nvml_or_visible_card(nvml, monkeypatch):
    from boneage.gpu_memory import visible_card

    monkeypatch.delenv("BONEAGE_FAKE_NVML", raising=False)
    assert "NVML is not available" in visible_card("0").note
    nvml(TWO_A10G)
    assert visible_card("-1").memory_mib is None and visible_card("7").memory_mib is None


# --- the trial, the retrain and the CLI, through TensorFlow with fake GPUs -------------------

def run_with_fake_gpus(tmp_path, args, gpus: int, visible: str | None, cards=TWO_A10G, timeout=600):
    """Run python `args` with `gpus` fake GPUs; returns (process, calls the double logged)."""
    log = tmp_path / "calls"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(GPU_DOUBLE), str(REPO)]),
           "BONEAGE_FAKE_GPUS": str(gpus), "BONEAGE_FAKE_GPU_LOG": str(log),
           "BONEAGE_FAKE_NVML": json.dumps(cards), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=tmp_path)
    calls = [json.loads(line) for f in sorted(log.glob("*.jsonl")) for line in f.read_text().splitlines()]
    return proc, [c for c in calls if c["call"] != "start"]


TRIAL = """
import json, sys
import tensorflow as tf
from tuning.config import load_search_config
from tuning.trainable import setup_process
from boneage.splits import load_splits
from boneage.train import train
cfg = load_search_config(None, json.loads(sys.argv[1]))
setup = setup_process(cfg, 2, 0.5, ["1"])
metrics, _ = train(cfg, load_splits(cfg.data, report=lambda m: None))
print("EPOCHS", metrics["epochs_run"], "GPUS", setup.gpus, "CAP", setup.memory_limit_mb)
try:  # what broke fractional trials before: memory growth on the capped card
    tf.config.experimental.set_memory_growth(tf.config.list_physical_devices("GPU")[0], True)
except ValueError as err:
    print("REFUSED", err)
"""


@pytest.mark.slow
def test_fractional_trial_sets_one_cap_and_trains(tmp_path, phantom_root):
    overrides = tiny_overrides(phantom_root) + [f"model.frozen_layers={HEAD_ONLY}", "train.mixed_precision=false"]
    proc, calls = run_with_fake_gpus(tmp_path, ["-c", TRIAL, json.dumps(overrides)], gpus=2, visible="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = A10G_MIB // 2 - 1024
    assert f"EPOCHS 1 GPUS 1 CAP {expected}" in proc.stdout
    assert "GPU share 0.5 of GPU(s) 1 (CUDA_VISIBLE_DEVICES=1)" in proc.stdout
    assert f"memory capped at {expected} MiB" in proc.stdout
    # the set-up capped the one card it sees, once; train() configured nothing more
    assert calls[0] == {**calls[0], "call": "set_logical_device_configuration",
                        "device": "/physical_device:GPU:0", "memory_limit": [expected]}
    assert "error" not in calls[0]
    assert len(calls) == 2 and calls[1]["call"] == "set_memory_growth"
    assert "Cannot set memory growth on device when virtual devices configured" in calls[1]["error"]
    assert "REFUSED" in proc.stdout


RETRAIN = """
import json, sys
from pathlib import Path
import keras
from tuning.config import load_search_config
from tuning.trainable import setup_process
from tuning.retrain import retrain_and_export
from boneage.splits import load_splits
from boneage.export import load_exported, mixed_layers
from boneage.evaluate import predict_table
cfg = load_search_config(None, json.loads(sys.argv[1]))
setup = setup_process(cfg, 2, 2.0, ["0", "1"], what="retrain")
print("POLICY", keras.mixed_precision.global_policy().name)
splits = load_splits(cfg.data, report=lambda m: None)
result = retrain_and_export(cfg, splits, Path("out"))
exported = load_exported("out/model")
print("TRAINED_MIXED", len(mixed_layers(keras.models.load_model("out/final/best.keras"))) > 0)
print("EXPORT_MIXED", mixed_layers(exported))
import pandas as pd
saved = pd.read_csv("out/final/test_predictions.csv")
again = predict_table(exported, splits.test)
print("MAX_DIFF", float(abs(again - saved["predicted"].to_numpy()).max()))
"""


@pytest.mark.slow
def test_retrain_on_two_gpus_uses_memory_growth_and_exports_float32(tmp_path, phantom_root):
    overrides = tiny_overrides(phantom_root) + [f"model.frozen_layers={HEAD_ONLY}", "train.mixed_precision=true",
                                                "train.schedule=cosine"]
    proc, calls = run_with_fake_gpus(tmp_path, ["-c", RETRAIN, json.dumps(overrides)], gpus=2, visible="0,1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(c["call"], c["device"], c.get("enable")) for c in calls] == [
        ("set_memory_growth", "/physical_device:GPU:0", True), ("set_memory_growth", "/physical_device:GPU:1", True)]
    assert not any("error" in c for c in calls)
    assert "POLICY mixed_float16" in proc.stdout and "2 GPU(s), memory growth" in proc.stdout
    assert "TRAINED_MIXED True" in proc.stdout and "EXPORT_MIXED []" in proc.stdout
    # trained and tested in float16 arithmetic, served in float32: the same predictions
    max_diff = float(proc.stdout.split("MAX_DIFF")[1].split()[0])
    assert max_diff < 0.5


@pytest.mark.slow
def test_cli_train_configures_once_through_the_double(tmp_path, phantom_root):
    args = ["-m", "boneage", "train", "--out", "run"]
    for override in tiny_overrides(phantom_root) + [f"model.frozen_layers={HEAD_ONLY}", "train.mixed_precision=false"]:
        args += ["--set", override]
    proc, calls = run_with_fake_gpus(tmp_path, args, gpus=1, visible=None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(c["call"], c["device"], c.get("enable"), "error" in c) for c in calls] == [
        ("set_memory_growth", "/physical_device:GPU:0", True, False)]
    assert "TensorFlow: 1 GPU(s), memory growth" in proc.stdout
    assert (tmp_path / "run" / "export" / "model.keras").is_file()
