"""Ray worker nodes with their own disks, on one machine: each is a Ray node process (what `ray
start --address ... --block` runs) in a mount namespace of its own (`unshare --mount`, as
root), with its own HOME and XDG_CACHE_HOME, empty folders mounted over the driver's paths that a node on another host would
not have (the experiment folder, the caches, the data), and the node's own copy of the data
mounted at the data's path. The Python installation and Ray's session folder stay shared. A node
that reads or writes another node's path then fails, as it would across hosts.

Every node binds 127.0.0.1. Not through `ray start` itself: for a worker node it turns
`--node-ip-address 127.0.0.1` (and an --address of 127.0.0.1) into the machine's outward
address, and refuses to run where Ray is told it is no cluster (tests/conftest.py). So the node's
process starts it as `ray start --block` does, through Ray's Node API with the node's parameters
(as `ray.cluster_utils.Cluster.add_node` does in-process), then blocks until it is stopped.
Drivers join at the head's 127.0.0.1 address as it is (tests/conftest.py).

    head = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": LOOPBACK})
    node = WorkerNode.start(head, tmp_path / "node1", hide=[...], data={"/driver/data": copy})
    wait_for_workers(head, [node]); node.node_id ... node.kill()   # SIGKILL of every process of the node
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

LOOPBACK = "127.0.0.1"
LABEL = "boneage-test-node"  # a Ray node label: which WorkerNode a Ray node is


def skip_unless_mount_namespaces() -> None:
    """Skip (with the reason) where this user may not make mount namespaces (not root, or a
    container without CAP_SYS_ADMIN)."""
    try:
        probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("nodes with their own disks need unshare (util-linux)")
    if probe.returncode:
        pytest.skip(f"nodes with their own disks need `unshare --mount` (run as root): {probe.stderr.strip()}")


def driver_paths() -> list[Path]:
    """What a worker host would not have of the driver's: its experiments and caches."""
    home = Path.home()
    paths = [home / "boneage-experiments", home / ".cache" / "boneage-tune", home / ".cache" / "boneage"]
    if os.environ.get("XDG_CACHE_HOME"):
        paths.append(Path(os.environ["XDG_CACHE_HOME"]))
    return paths


@dataclass
class WorkerNode:
    folder: Path  # this node's disk: home/, cache/, its data copies, and its log
    process: subprocess.Popen
    node_id: str = ""

    @classmethod
    def start(cls, head, folder: Path, hide, data: dict, cpus: int = 2, gpus: int = 1) -> "WorkerNode":
        """`hide`: driver paths that get an empty folder mounted over them; `data`: {path on the
        driver: this node's copy} mounted there (a node holding its data its own way)."""
        folder.mkdir(parents=True)
        home, cache = folder / "home", folder / "home" / ".cache"
        cache.mkdir(parents=True)
        mounts = []
        for i, path in enumerate(hide):
            empty = folder / "empty" / str(i)
            empty.mkdir(parents=True)
            Path(path).mkdir(parents=True, exist_ok=True)  # a mount point must exist
            mounts.append(f"mount --bind {shlex.quote(str(empty))} {shlex.quote(str(path))}")
        for path, copy in data.items():
            mounts.append(f"mount --bind {shlex.quote(str(copy))} {shlex.quote(str(path))}")
        start = [sys.executable, "-m", "tests.nodes", head.address, folder.name, str(cpus), str(gpus)]
        script = " && ".join(mounts + ["exec " + shlex.join(start)])
        env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(cache)}
        token = Path.home() / ".ray" / "auth_token"  # the cluster's token, where this HOME has none
        if token.is_file() and "RAY_AUTH_TOKEN" not in env:
            env["RAY_AUTH_TOKEN_PATH"] = str(token)
        log = open(folder / "node.log", "w")
        # private propagation: the node's mounts stay in its namespace, the driver never sees them
        process = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
                                   env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   cwd=Path(__file__).parent.parent)
        return cls(folder, process)

    def kill(self) -> None:
        """Every process of the node at once (its raylet, its workers): a machine lost."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=60)

    def stop(self) -> None:
        """The node's process ends its Ray processes on SIGTERM; whatever is left is killed."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    @property
    def cache(self) -> Path:
        return self.folder / "home" / ".cache"


def wait_for_workers(head, nodes: list[WorkerNode], timeout: float = 180) -> None:
    """Until every node has joined `head`'s cluster (read from its GCS, no driver needed); sets
    each node's Ray node id."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for node in nodes:
            if node.process.poll() is not None:
                raise RuntimeError(f"a worker node exited: {(node.folder / 'node.log').read_text()[-3000:]}")
        joined = {n["Labels"].get(LABEL): n["NodeID"] for n in head.global_state.node_table()
                  if n["Alive"] and n.get("Labels", {}).get(LABEL)}
        if all(node.folder.name in joined for node in nodes):
            for node in nodes:
                node.node_id = joined[node.folder.name]
            return
        time.sleep(1)
    raise TimeoutError(f"{len(nodes)} worker nodes did not join in {timeout:.0f} s")


def look(address: str, node_id: str, files: list[str], data_root: str, written: str) -> dict:
    """Run on Ray node `node_id` (this process joins the cluster at `address` as a driver, and
    leaves): which of `files` it sees, its HOME, the .txt files of its data folder; it writes
    `written`."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def there():
        Path(written).parent.mkdir(parents=True, exist_ok=True)
        Path(written).write_text("written on a worker")
        return {"seen": [f for f in files if os.path.exists(f)], "home": str(Path.home()),
                "data": sorted(p.name for p in Path(data_root).glob("*.txt"))}

    ray.init(address=address, include_dashboard=False)
    try:
        on_node = NodeAffinitySchedulingStrategy(node_id, soft=False)
        task = ray.remote(num_cpus=0)(there).options(scheduling_strategy=on_node)
        return ray.get(task.remote(), timeout=120)
    finally:
        ray.shutdown()


def run_node(gcs_address: str, name: str, cpus: int, gpus: int) -> None:
    """A worker node's process: the Ray node (raylet, object store, agents) joined to the head at
    `gcs_address`, on 127.0.0.1, labelled `name`; its processes end with this one."""
    import ray._private.node
    import ray._private.parameter

    params = ray._private.parameter.RayParams(
        gcs_address=gcs_address, node_ip_address=LOOPBACK, num_cpus=cpus, num_gpus=gpus,
        object_store_memory=150 * 2**20, min_worker_port=0, max_worker_port=0, labels={LABEL: name})
    ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    print(f"node {name} joined {gcs_address} on {LOOPBACK}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # exit runs Node's shutdown_at_exit hook
    while True:
        signal.pause()


if __name__ == "__main__":  # python -m tests.nodes GCS_ADDRESS NAME CPUS GPUS (WorkerNode.start runs it)
    run_node(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
