"""Before a search's first trial: the data decided once, then every node prepares the images.

    splits = splits_from_a_node(cfg)       # a head holding only the label CSV, after Ray started
    prepare_on_every_node(cfg, splits)     # called by tuning.search after Ray has started

A driver that holds the images checks them itself (`boneage.splits.load_splits`), and with
`data.drop_invalid` decides which rows go. One that holds only the label CSV asks the first node
that can run a trial to check the images of its rows (`boneage.splits.check_here`) and, with
`data.drop_invalid`, to decide; the driver splits what that node kept, and that node's image
bytes make the fingerprint every node's check compares with (`tuning.nodecheck`). Without such a
node (an autoscaled cluster before its first worker) `drop_invalid` is refused.

Then each node runs one CPU-only Ray task holding all its CPUs (`tuning.prepared_store.
prepare_here`) for every resolution the search uses, on the splits with its own image paths
(`boneage.splits.here`): a node whose cache is already there (or that shares it with the others
through `data.prepared_dir` on shared storage) just opens it; with s3:// storage the first node
decodes and publishes the cache into the storage, then the others fetch it instead of decoding.
Nodes that join later (an autoscaled cluster) get the same task from `PrepareOnJoin` as they
join, and their trials fetch before training if it has not run. Without this each node's first
trial would decode on its own CPU share, holding its GPU, while the node's other trials wait.
The driver waits at most `tune.prepare_timeout_s`, then stops naming the nodes not done.
"""
from __future__ import annotations

import time

from ray import tune

from boneage.errors import InputError
from tuning.config import SearchConfig


def _trial_nodes(cfg: SearchConfig) -> list:
    """The live Ray nodes that can run one of the search's trials."""
    import ray

    need = cfg.tune.resources
    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= max(need.cpu, 1)
            and n["Resources"].get("GPU", 0) >= need.gpu]


def _on(node, **options):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node["NodeID"], soft=False), **options}


def _get(tasks):
    import ray

    try:
        return ray.get(tasks)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, InputError):  # e.g. an image that cannot be decoded: one message
            raise InputError(str(err.cause)) from None
        raise


def splits_from_a_node(cfg: SearchConfig):
    """The search's splits when the driver holds only the label CSV (Ray started)."""
    import ray

    from boneage.splits import make_splits, read_table

    root, table = read_table(cfg.data, images=False)
    nodes = _trial_nodes(cfg)
    if not nodes:
        if cfg.data.drop_invalid:
            raise InputError(
                f"data.drop_invalid: true needs a node holding the images to decide which rows to drop, and "
                f"none is here: {root} holds only the label CSV and no node that can run a trial is up yet "
                "(an autoscaled cluster). Put the images on the head too, or start the workers first, "
                "or fix the rows and set data.drop_invalid: false")
        print("data: no node holds the images yet: each node checks its own before its first trial")
        return make_splits(cfg.data, root, table)
    task = ray.remote(_check_on_node).options(**_on(nodes[0], num_cpus=1))
    kept, sizes, messages = _get(task.remote(cfg.data, table.drop(columns="path")))
    for message in messages:
        print(f"data (node {nodes[0]['NodeManagerAddress']}): {message}")
    return make_splits(cfg.data, root, table[table["id"].isin(kept)], sizes)


def _check_on_node(data_cfg, frame):
    """(kept ids, {id: bytes}, report lines) of the driver's rows, checked on this node."""
    from boneage.splits import check_here

    messages = []
    kept, sizes = check_here(frame, data_cfg, data_cfg.drop_invalid, report=messages.append)
    return set(kept["id"]), sizes, messages


def prepare_on_every_node(cfg: SearchConfig, splits) -> set | None:
    """The search's `model.image_size` and any `choice` of it in `tune.space` are prepared;
    sizes from a numeric range are left to the first trial that needs each. With a store in the
    storage (`tuning.prepared_store`), one node decodes and publishes, then the others fetch."""
    from tuning.prepared_store import PreparedStore

    sizes = prepared_sizes(cfg)
    if not sizes:
        return None
    nodes, store = _trial_nodes(cfg), PreparedStore.of(cfg)
    if not nodes:
        print("prepared images: no node can run a trial yet (an autoscaled start): each node "
              + ("fetches them from the storage" if store else "prepares them") + " before its first trial")
        return set()
    deadline = time.time() + cfg.tune.prepare_timeout_s
    first, rest = (nodes[:1], nodes[1:]) if store else (nodes, [])
    for group in (first, rest):
        _wait(cfg, [(n, _start(cfg, splits, sizes, n, store)) for n in group], deadline)
    return {n["NodeID"] for n in nodes}


def prepared_sizes(cfg: SearchConfig) -> list[int]:
    """The resolutions a search prepares before its trials (none without `data.cache: prepared`)."""
    from tuning.space import config_key

    if cfg.data.cache != "prepared":
        return []
    sizes = {cfg.model.image_size}
    for name, spec in cfg.tune.space.items():
        if config_key(cfg, name) == "model.image_size" and "choice" in spec:
            sizes |= {int(v) for v in spec["choice"]}
    return sorted(sizes)


def _start(cfg, splits, sizes, node, store, cpus=None):
    """The CPU-only task preparing (or fetching) the images on `node`, with `cpus` of its CPUs
    (default all: before the first trial nothing else wants them)."""
    import ray

    cpus = cpus or node["Resources"]["CPU"]
    build = ray.remote(max_calls=1)(_prepare_on_node)  # max_calls: the worker exits, TF's memory with it
    return build.options(**_on(node, num_cpus=cpus)).remote(cfg.data, splits, sizes, int(cpus), store)


def _wait(cfg, started, deadline) -> None:
    """Print each node's report; ClusterError naming the nodes not done by `deadline`."""
    import ray

    from tuning.cluster import ClusterError

    pending = {ref: node for node, ref in started}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.time()))
        if not done:
            names = ", ".join(f"{n['NodeManagerAddress']} ({n['NodeID'][:12]})" for n in pending.values())
            for ref in pending:
                ray.cancel(ref, force=True)
            raise ClusterError(
                f"preparing the images did not finish within tune.prepare_timeout_s ({cfg.tune.prepare_timeout_s:g} s) "
                f"on {names}: no CPU of that node came free for the task (another job holding them?) or it is "
                f"still decoding; free the node or raise tune.prepare_timeout_s")
        node = pending.pop(done[0])
        for line in _get(done[0]):
            print(f"prepared images (node {node['NodeManagerAddress']} {node['NodeID'][:12]}): {line.strip()}")


def _prepare_on_node(data_cfg, splits, sizes, cpus, store) -> list[str]:
    from boneage.splits import here
    from tuning.prepared_store import prepare_here

    lines = []
    prepare_here(data_cfg, here(splits, data_cfg).all(), sizes, store, threads=cpus, report=lines.append)
    return lines


class PrepareOnJoin(tune.Callback):
    """A Tune callback on the driver: each node that can run a trial and joined after the start
    (an autoscaled cluster) gets the prepare task on one CPU as it joins, so its images are
    fetched (or decoded) beside the node's first trial rather than inside it, on its GPU's time.
    The trial waits for it on the cache's file lock (`boneage.prepare`)."""

    CHECK_EVERY_S = 10.0

    def __init__(self, cfg: SearchConfig, splits, known: set):
        self.cfg, self.splits, self.known, self.running, self.checked = cfg, splits, set(known), {}, 0.0

    def __getstate__(self):  # saved with the experiment: task handles are this driver's only
        return {**self.__dict__, "running": {}, "checked": 0.0}

    def on_step_begin(self, iteration, trials, **info):
        import ray

        from tuning.prepared_store import PreparedStore

        if time.time() - self.checked < self.CHECK_EVERY_S:
            return
        self.checked = time.time()
        for node in _trial_nodes(self.cfg):
            if node["NodeID"] not in self.known:
                self.known.add(node["NodeID"])
                ref = _start(self.cfg, self.splits, prepared_sizes(self.cfg), node, PreparedStore.of(self.cfg), cpus=1)
                self.running[ref] = node
        done, _ = ray.wait(list(self.running), num_returns=len(self.running), timeout=0) if self.running else ([], [])
        for ref in done:
            node = self.running.pop(ref)
            try:
                lines = _get(ref)
            except Exception as err:  # noqa: BLE001  the node's trials meet it too, and report it
                lines = [f"failed: {str(err).splitlines()[0]}"]
            for line in lines:
                print(f"prepared images (node {node['NodeManagerAddress']} {node['NodeID'][:12]}, joined): {line}")
