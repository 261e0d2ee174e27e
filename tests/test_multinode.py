"""A search across nodes, for real on one machine: a Ray cluster of a head and two worker nodes
(each advertising 2 CPUs and 1 logical GPU) with their own disks (`tests.nodes`: a mount
namespace each, their own HOME, caches and copy of the data, the driver's paths hidden), every
node on 127.0.0.1, the experiment in s3:// storage served by a local S3 server (moto, on
127.0.0.1). The second worker joins once the search runs, as an autoscaler's would, and is
killed (SIGKILL of all its processes) while its trial runs.

Why its own cluster: no other test starts nodes that do not share the driver's disk. Cost: about
4-5 minutes on two busy xdist workers (the search, a worker joining then lost, the retrain,
--retrain-only).

Checks: each worker sees neither the driver's experiment folder, nor its caches, nor its data
(it sees its own copy there), and what it writes at the driver's paths stays on its own disk.
The prepared images: the first worker decoded them before the first trial and published them
into the storage; the worker that joined fetched them from there (its cache's manifest names the
storage, with the same content key), and nothing decoded them again. Trials ran on both workers
(Ray node ids in trials.csv), half-GPU trials at most two to a node, the trial on the lost node
went on from its checkpoint on the other node (its epochs continue, never restart), the search
finished with every trial accounted for, and every output (study, report, retrained model) is
in the storage; `--retrain-only` then works from the storage alone, as on a fresh head,
rewriting the test metrics and leaving trials.csv as it was."""
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import HEAD_ONLY
from tests.nodes import LOOPBACK, WorkerNode, driver_paths, look, skip_unless_mount_namespaces, wait_for_workers
from tests.s3 import BUCKET, s3_env, s3_files, s3_mtime, s3_read  # noqa: F401  (s3_env: a fixture)

pytestmark = pytest.mark.slow
REPO = Path(__file__).parent.parent
RATES = [1e-3, 2e-3, 5e-4, 1.5e-3]
EPOCHS = 3


@pytest.fixture(scope="module")
def three_nodes(s3_env, phantom_root, tmp_path_factory):
    """Head (no CPUs: trials never land there) + a worker with 2 CPUs and 1 logical GPU, and
    `join()` to start a second one like it later (an autoscaler's): each with its own disk and
    its own copy of the data, mounted at the driver's data path."""
    from ray.cluster_utils import Cluster

    skip_unless_mount_namespaces()
    disks = tmp_path_factory.mktemp("nodes")
    for i in range(2):
        copy = shutil.copytree(phantom_root, disks / f"node{i}-data")
        (Path(copy) / f"node{i}.txt").write_text("this node's own copy")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": LOOPBACK})
    workers = []

    def join() -> WorkerNode:
        i = len(workers)
        workers.append(WorkerNode.start(cluster, disks / f"node{i}", hide=driver_paths(),
                                        data={phantom_root: disks / f"node{i}-data"}))
        wait_for_workers(cluster, workers[-1:])
        assert {n["NodeManagerAddress"] for n in cluster.global_state.node_table()} == {LOOPBACK}
        return workers[-1]

    try:
        join()
        yield cluster, workers, join
    finally:
        for worker in workers:
            worker.stop()
        cluster.shutdown()


def check_own_disk(cluster, worker: WorkerNode, data_root: Path) -> None:
    """The driver's files are not on the worker, its own data copy is at the driver's data path,
    and what it writes at the driver's paths stays on its own disk."""
    mine = [Path.home() / "boneage-experiments" / f".driver-only-{os.getpid()}",
            Path(os.environ["XDG_CACHE_HOME"]) / f"driver-only-{os.getpid()}", data_root / "driver-only.txt"]
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("the driver's")
    written = Path.home() / "boneage-experiments" / f".from-a-worker-{os.getpid()}"
    try:
        seen = look(cluster.address, worker.node_id, [str(p) for p in mine], str(data_root), str(written))
        assert seen["seen"] == [] and seen["home"] == str(worker.folder / "home"), seen
        assert seen["data"] == [f"{worker.folder.name}.txt"], seen  # its own copy at the driver's data path
        assert not written.exists()  # it wrote on its own disk
    finally:
        for path in mine:
            path.unlink(missing_ok=True)


def trials_on(node_id: str, experiment: str) -> list[dict]:
    """Trials whose last result the driver has recorded (and synced into the storage) came
    from `node_id`, with a checkpoint of that epoch in the storage: killing the node now must
    cost at most the epoch in progress."""
    found = []
    files = s3_files(experiment)
    for path in (p for p in files if p.endswith("/result.json")):
        trial = path.split("/")[0]
        try:
            last = json.loads(s3_read(f"{experiment}/{path}").strip().splitlines()[-1])
        except (OSError, ValueError, IndexError):  # not there yet, or an upload in flight
            continue
        checkpoint = f"{trial}/checkpoint_{last['epoch'] - 1:06d}/state.json"
        if last.get("node_id") == node_id and last["epoch"] < EPOCHS and checkpoint in files:
            found.append({"trial": trial, "epoch": last["epoch"]})
    return found


def test_search_across_nodes_survives_losing_one(three_nodes, tmp_path, phantom_root):
    cluster, workers, join = three_nodes
    name = "multinode"
    experiment = f"experiments/{name}"

    # separate disks: the driver's files are not on the worker, nor the other way round
    check_own_disk(cluster, workers[0], Path(phantom_root))
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"source": "rsna", "root": str(phantom_root), "val_fraction": 0.25, "test_fraction": 0.2},
        "model": {"image_size": 71, "weights": "none", "frozen_layers": HEAD_ONLY},
        "train": {"epochs": EPOCHS, "batch_size": 16, "early_stopping_patience": 0, "schedule": "cosine"},
        "tune": {"storage_path": f"s3://{BUCKET}/experiments", "num_samples": len(RATES),
                 "max_concurrent_trials": 0, "n_startup_trials": 1, "grace_period": EPOCHS, "max_failures": 2,
                 "resources": {"cpu": 1, "gpu": 0.5}, "require_gpu": False,  # logical GPUs: TF sees none
                 "ensemble_top_k": 1, "gallery_size": 0,  # the retrain's extras are tested in test_search
                 "space": {"learning_rate": {"loguniform": [1.0e-4, 1.0e-2]}},
                 "points_to_evaluate": [{"learning_rate": lr} for lr in RATES]}}))
    driver = subprocess.Popen([sys.executable, "-m", "tuning.search", "--config", str(config), "--name", name,
                               "--address", cluster.address], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=tmp_path,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", "TUNE_GLOBAL_CHECKPOINT_S": "1"})
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(driver.stdout), daemon=True)
    reader.start()
    try:
        # the second worker joins once the search runs (its images prepared on the first alone)
        deadline = time.time() + 600
        while time.time() < deadline and driver.poll() is None and not any("results in" in x for x in lines):
            time.sleep(0.5)
        assert driver.poll() is None, "".join(lines)[-4000:]
        lost = join()
        check_own_disk(cluster, lost, Path(phantom_root))
        deadline = time.time() + 900
        while time.time() < deadline and driver.poll() is None:
            running = trials_on(lost.node_id, experiment)
            if running:
                break
            time.sleep(1)
        assert driver.poll() is None, "the search ended before a trial on the second worker checkpointed"
        assert running, "no trial checkpointed on the second worker in time"
        lost.kill()
        driver.wait(timeout=1200)
    finally:
        if driver.poll() is None:
            driver.kill()
        reader.join(timeout=60)
    out = "".join(lines)
    assert driver.returncode == 0, out[-4000:]

    # the prepared images: decoded by the first worker before the first trial and published; the
    # worker that joined later fetched them (as it joined, or in its first trial), never decoding
    (first,), (second,) = ([json.loads(p.read_text()) for p in (w.cache / "boneage" / "prepared").glob("*.json")]
                           for w in workers)
    store = f"s3://{BUCKET}/experiments/prepared-images"
    assert "fetched" not in first and second.get("fetched") == store, (first.get("fetched"), second.get("fetched"))
    key = first["content_key"]
    assert second["content_key"] == key and f"{key}.json" in s3_files("experiments/prepared-images")
    assert f"fetched prepared images {key}" in out, out[-4000:]
    assert len(re.findall(r"(?<!process )preparing \d+ images at", out)) == 1, out[-4000:]  # one decode in all

    # every planned trial is accounted for, and finished all its epochs
    trials = pd.read_csv(pd.io.common.StringIO(s3_read(f"{experiment}/trials.csv")), dtype={"node_id": str})
    assert len(trials) == len(RATES) and (trials["epochs"] == EPOCHS).all()
    results = {t: [json.loads(line) for line in s3_read(f"{experiment}/{t}/result.json").splitlines() if line.strip()]
               for t in {p.split("/")[0] for p in s3_files(experiment) if p.endswith("/result.json")}}
    nodes_used = {r["node_id"] for lines in results.values() for r in lines}
    seen = {t[:18]: [(r["epoch"], r["node_id"][:6]) for r in lines] for t, lines in results.items()}
    assert {w.node_id for w in workers} <= nodes_used, (seen, [w.node_id[:6] for w in workers], running)

    # the trial on the lost node went on from its checkpoint elsewhere: epochs continue
    moved = results[running[0]["trial"]]
    epochs = [r["epoch"] for r in moved]
    assert epochs == sorted(set(epochs)) and epochs[-1] == EPOCHS, epochs
    assert moved[0]["node_id"] == lost.node_id and moved[-1]["node_id"] != lost.node_id

    # half-GPU trials: at most two on a node at once. Ray's timestamps are whole seconds (cut
    # down), so a span computed from them starts up to 1 s early: count the trials running 1 s
    # after each start, when that trial has surely started and the others' start is sure too.
    for node in nodes_used:
        spans = [(r[0]["timestamp"] - r[0]["time_this_iter_s"], r[-1]["timestamp"])
                 for r in ([x for x in lines if x["node_id"] == node] for lines in results.values()) if r]
        most = max(sum(1 for s, e in spans if s + 1 <= t + 1 < e) for t, _ in spans)
        assert most <= 2, (node[:6], sorted(spans))

    # every output is in the storage
    stored = set(s3_files(experiment))
    for needed in ["search_config.yaml", "split_train.csv", "trials.csv", "best_config.yaml", "test_metrics.json",
                   "summary.json", "optuna.db", "model/model.keras", "model/model_card.json",
                   "final/test_predictions.csv"]:
        assert needed in stored, needed
    assert any(p.startswith("model/saved_model/") for p in stored)
    summary = json.loads(s3_read(f"{experiment}/summary.json"))
    assert summary["storage"] == f"s3://{BUCKET}/{experiment}"

    # a fresh head: nothing local, everything from the storage; --retrain-only redoes the last
    # step alone (the test metrics written anew, trials.csv as it was), and refuses what is not
    # an experiment with status 2
    trials_before, metrics_before = s3_read(f"{experiment}/trials.csv"), s3_mtime(f"{experiment}/test_metrics.json")
    shutil.rmtree(Path.home() / "boneage-experiments" / name)
    again = subprocess.run([sys.executable, "-m", "tuning.search", "--retrain-only", f"s3://{BUCKET}/{experiment}",
                            "--address", cluster.address], capture_output=True, text=True, timeout=900,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert json.loads(s3_read(f"{experiment}/summary.json"))["best"] == summary["best"]
    assert s3_mtime(f"{experiment}/test_metrics.json") > metrics_before
    assert s3_read(f"{experiment}/trials.csv") == trials_before
    from tuning.search import main
    assert main(["--retrain-only", f"s3://{BUCKET}/experiments/nope"]) == 2
