"""Ray worker nodes with their own disks, on one machine: each is `ray start --address ... --block`
in a mount namespace of its own (`unshare --mount`, as root), with its own HOME and
XDG_CACHE_HOME, empty folders mounted over the driver's paths that a node on another host would
not have (the experiment folder, the caches, the data), and the node's own copy of the data
mounted at the data's path. The Python installation and Ray's session folder stay shared. A node
that reads or writes another node's path then fails, as it would across hosts.

Every node binds 127.0.0.1. Ray turns an address of 127.0.0.1 or localhost given to `ray start`
or `ray.init` into the machine's outward address (where the head does not listen), so the nodes
and the drivers reach the head by a name, HEAD_NAME, that their own /etc/hosts (mounted in their
namespace, never the machine's) gives 127.0.0.1: `connected(cmd, folder)` runs a driver so.

    head = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": LOOPBACK})
    node = WorkerNode.start(head, tmp_path / "node1", hide=[...], data={"/driver/data": copy})
    wait_for_workers(head, [node]); node.node_id ... node.kill()   # SIGKILL of every process of the node
    subprocess.run(connected([sys.executable, "-m", "tuning.search", "--address", head_address(head)], tmp_path))
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
HEAD_NAME = "boneage-test-head"  # the head's name in the nodes' and drivers' own /etc/hosts
LABEL = "boneage-test-node"  # a Ray node label: which WorkerNode a Ray node is


def head_address(head) -> str:
    """The head's address by its name (see the module's docstring)."""
    host, _, port = head.address.rpartition(":")
    assert host == LOOPBACK, f"the head must listen on {LOOPBACK}, not {host}"
    return f"{HEAD_NAME}:{port}"


def hosts_file(folder: Path) -> Path:
    """A copy of /etc/hosts that also names the head, for a namespace's /etc/hosts."""
    hosts = Path(folder) / "hosts"
    if not hosts.exists():
        hosts.write_text(Path("/etc/hosts").read_text() + f"\n{LOOPBACK} {HEAD_NAME}\n")
    return hosts


def connected(cmd: list[str], folder: Path) -> list[str]:
    """`cmd` run in a mount namespace of its own whose /etc/hosts names the head (a driver)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"',
            str(hosts_file(folder)), *cmd]


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
        mounts.append(f"mount --bind {shlex.quote(str(hosts_file(folder)))} /etc/hosts")  # the head's name
        ray = Path(sys.executable).parent / "ray"
        start = [str(ray), "start", "--address", head_address(head), "--labels", f"{LABEL}={folder.name}", "--node-ip-address", LOOPBACK, "--num-cpus", str(cpus),
                 "--num-gpus", str(gpus), "--object-store-memory", str(150 * 2**20), "--min-worker-port", "0",
                 "--max-worker-port", "0", "--disable-usage-stats", "--block"]
        script = " && ".join(mounts + ["exec " + shlex.join(start)])
        env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(cache)}
        token = Path.home() / ".ray" / "auth_token"  # the cluster's token, where this HOME has none
        if token.is_file() and "RAY_AUTH_TOKEN" not in env:
            env["RAY_AUTH_TOKEN_PATH"] = str(token)
        log = open(folder / "ray-start.log", "w")
        # private propagation: the node's mounts stay in its namespace, the driver never sees them
        process = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
                                   env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return cls(folder, process)

    def kill(self) -> None:
        """Every process of the node at once (its raylet, its workers): a machine lost."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=60)

    def stop(self) -> None:
        """`ray start --block` ends its node's processes on SIGTERM; whatever is left is killed."""
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
                raise RuntimeError(f"a worker node exited: {(node.folder / 'ray-start.log').read_text()[-3000:]}")
        joined = {n["Labels"].get(LABEL): n["NodeID"] for n in head.global_state.node_table()
                  if n["Alive"] and n.get("Labels", {}).get(LABEL)}
        if all(node.folder.name in joined for node in nodes):
            for node in nodes:
                node.node_id = joined[node.folder.name]
            return
        time.sleep(1)
    raise TimeoutError(f"{len(nodes)} worker nodes did not join in {timeout:.0f} s")


def look(address: str, node_id: str, files: list[str], data_root: str, written: str) -> dict:
    """Run on Ray node `node_id` (this process joins the cluster as a driver): which of `files`
    it sees, its HOME, the .txt files of its data folder; it writes `written`."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def there():
        Path(written).parent.mkdir(parents=True, exist_ok=True)
        Path(written).write_text("written on a worker")
        return {"seen": [f for f in files if os.path.exists(f)], "home": str(Path.home()),
                "data": sorted(p.name for p in Path(data_root).glob("*.txt"))}

    ray.init(address=address, include_dashboard=False)
    try:
        task = ray.remote(num_cpus=0)(there).options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
        return ray.get(task.remote(), timeout=120)
    finally:
        ray.shutdown()


if __name__ == "__main__":  # python -m tests.nodes look ADDRESS '{"node_id": ..., ...}': prints JSON
    import json

    print(json.dumps(look(sys.argv[2], **json.loads(sys.argv[3]))))
