"""Ray with logical GPUs: a local Ray cluster whose node advertises 2 GPUs, every process of it
running with the GPU double (TensorFlow lists one fake GPU per CUDA_VISIBLE_DEVICES entry, NVML
describes two 24 GiB cards). A real search at `resources.gpu: 0.5` then shares each "GPU"
between two trials, each trial caps its memory at its share, and the retrain holds the GPUs the
config asks for. Requests no node can meet are refused before any trial starts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import HEAD_ONLY
from tests.test_gpu_setup import A10G_MIB, GPU_DOUBLE, REPO, TWO_A10G

pytestmark = pytest.mark.slow
RATES = [1e-3, 2e-3, 5e-4, 3e-3, 7e-4, 1.5e-3]


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory):
    """A one-node Ray cluster with 4 CPUs and 2 logical GPUs, its processes under the GPU double."""
    from ray.cluster_utils import Cluster

    log = tmp_path_factory.mktemp("gpu-calls")
    double = {"PYTHONPATH": os.pathsep.join([str(GPU_DOUBLE), str(REPO)]), "BONEAGE_FAKE_GPUS": "2",
              "BONEAGE_FAKE_GPU_LOG": str(log), "BONEAGE_FAKE_NVML": json.dumps(TWO_A10G)}
    saved = {k: os.environ.get(k) for k in double}
    os.environ.update(double)  # the raylet, and so every worker, inherits these
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 2,
                                                                 "node_ip_address": "127.0.0.1"})
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    yield cluster, log
    cluster.shutdown()


def write_config(tmp_path, phantom_root, **tune) -> Path:
    cfg = {
        "data": {"source": "rsna", "root": str(phantom_root), "val_fraction": 0.25, "test_fraction": 0.2},
        "model": {"image_size": 71, "weights": "none", "frozen_layers": HEAD_ONLY},
        "train": {"epochs": 1, "batch_size": 16, "early_stopping_patience": 0, "mixed_precision": False},
        "tune": {"storage_path": str(tmp_path / "experiments"), "num_samples": len(RATES),
                 "max_concurrent_trials": 8, "n_startup_trials": 1, "resources": {"cpu": 1, "gpu": 0.5},
                 "retrain_gpus": 2, "space": {"learning_rate": {"loguniform": [1.0e-4, 1.0e-2]}},
                 "ensemble_top_k": 1, "gallery_size": 0,  # the report's extras are tested in test_search
                 "points_to_evaluate": [{"learning_rate": lr} for lr in RATES], **tune},
    }
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def search(cluster, config, name, timeout=900):
    return subprocess.run([sys.executable, "-m", "tuning.search", "--config", str(config), "--name", name,
                           "--address", cluster.address], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _results(experiment: Path) -> list[list[dict]]:
    return [[json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            for f in sorted(experiment.glob("run_trial_*/result.json"))]


def _most_at_once(intervals) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                    key=lambda e: (e[0], e[1]))
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def test_half_gpu_trials_share_the_cards_with_a_cap_each(gpu_cluster, tmp_path, phantom_root):
    cluster, log = gpu_cluster
    proc = search(cluster, write_config(tmp_path, phantom_root), "shared")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    experiment = tmp_path / "experiments" / "shared"
    results = _results(experiment)
    assert len(results) == len(RATES) and len(pd.read_csv(experiment / "trials.csv")) == len(RATES)
    cap = A10G_MIB // 2 - 1024
    for trial in results:
        last = trial[-1]
        assert (last["gpu_share"], last["gpu_memory_cap_mib"], last["tensorflow_gpus"]) == (0.5, cap, 1)
        assert last["gpu_ids"] in ("0", "1")

    # Each trial process capped its one card, and nothing else touched the GPU settings.
    calls = {}
    for f in log.glob("*.jsonl"):
        lines = [json.loads(line) for line in f.read_text().splitlines()]
        calls[lines[0]["pid"]] = lines
    trial_calls = {pid: c for pid, c in calls.items() if pid in {t[-1]["pid"] for t in results}}
    assert len(trial_calls) == len(RATES)
    for pid, lines in trial_calls.items():
        configured = [c for c in lines if c["call"] != "start"]
        assert [(c["call"], c["memory_limit"], "error" in c) for c in configured] == [
            ("set_logical_device_configuration", [cap], False)]

    # At most 4 at once (2 GPUs / 0.5), and the cards really were shared
    intervals = [(calls[t[-1]["pid"]][0]["time"], t[-1]["timestamp"] + 1) for t in results]
    assert 2 <= _most_at_once(intervals) <= 4

    # Every trial's own log says what it got
    logs = Path(cluster.head_node.get_logs_dir_path())
    said = [f for f in logs.glob("worker-*.out") if "GPU share 0.5 of GPU(s)" in f.read_text(errors="replace")]
    assert len(said) >= len(RATES)

    # The retrain held the 2 GPUs the config asks for
    summary = json.loads((experiment / "summary.json").read_text())
    assert summary["retrain"]["gpus"] == 2 and summary["retrain"]["tensorflow_gpus"] == 2
    assert (experiment / "model" / "model.keras").is_file()


@pytest.mark.parametrize("tune, message", [
    ({"retrain_gpus": 4}, "no node of this cluster has 4 GPU(s)"),
    ({"resources": {"cpu": 1, "gpu": 3}}, "no node of this cluster can run a trial"),
    ({"retrain_gpus": 0}, "would retrain on CPU"),
])
def test_requests_no_node_can_meet_are_refused_up_front(gpu_cluster, tmp_path, phantom_root, tune, message):
    cluster, _ = gpu_cluster
    proc = search(cluster, write_config(tmp_path, phantom_root, **tune), "refused", timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not list((tmp_path / "experiments" / "refused").glob("run_trial_*"))


def test_retrain_waits_for_a_gpu_node_then_gives_up(gpu_cluster):
    import ray

    from tuning import cluster as cluster_module

    cluster, _ = gpu_cluster
    ray.init(address=cluster.address)
    try:
        shapes = cluster_module.node_shapes(env={"BONEAGE_NODE_TYPES": json.dumps({"g5.12xlarge": {"CPU": 48, "GPU": 4}})})
        assert any(s.gpus == 4 and not s.alive for s in shapes)  # the autoscaler could start one
        with pytest.raises(cluster_module.ClusterError, match="no node with 4 GPU.* within 3 s"):
            cluster_module.reserve(4, 2, wait_s=3, shapes=shapes)
        group = cluster_module.reserve(2, 1, wait_s=30, shapes=shapes)  # what exists is reserved at once
        ray.util.remove_placement_group(group)
    finally:
        ray.shutdown()
