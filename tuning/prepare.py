"""Before a search's first trial: the data decided once, then every node prepares the images.

    splits = splits_from_a_node(cfg)       # a head holding only the label CSV, after Ray started
    prepare_on_every_node(cfg, splits)     # called by tuning.search after Ray has started

A driver that holds the images checks them itself (`boneage.splits.load_splits`), and with
`data.drop_invalid` decides which rows go. One that holds only the label CSV asks the first node
that can run a trial to check the images of its rows (`boneage.splits.check_here`) and, with
`data.drop_invalid`, to decide; the driver splits what that node kept, and that node's image
bytes make the fingerprint every node's check compares with (`tuning.nodecheck`). Without such a
node (an autoscaled cluster before its first worker) `drop_invalid` is refused.

Then each node runs one Ray task holding all its CPUs, which calls
`boneage.prepare.ensure_prepared` for every resolution the search uses, on the splits with its
own image paths (`boneage.splits.here`); a node whose cache is already there (or that shares it
with the others through `data.prepared_dir` on shared storage) just opens it. Without this each
node's first trial would build it on its own CPU share while the node's other trials wait.
"""
from __future__ import annotations

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


def prepare_on_every_node(cfg: SearchConfig, splits) -> None:
    """The search's `model.image_size` and any `choice` of it in `tune.space` are prepared;
    sizes from a numeric range are left to the first trial that needs each."""
    import ray

    from tuning.space import config_key

    if cfg.data.cache != "prepared":
        return
    sizes = {cfg.model.image_size}
    for name, spec in cfg.tune.space.items():
        if config_key(cfg, name) == "model.image_size" and "choice" in spec:
            sizes |= {int(v) for v in spec["choice"]}
    build = ray.remote(max_calls=1)(_prepare_on_node)  # max_calls: the worker exits, TF's memory with it
    _get([build.options(**_on(n, num_cpus=n["Resources"]["CPU"])).remote(
        cfg.data, splits, sorted(sizes), int(n["Resources"]["CPU"])) for n in _trial_nodes(cfg)])


def _prepare_on_node(data_cfg, splits, sizes, cpus) -> None:
    from boneage.prepare import ensure_prepared, prepared_dir
    from boneage.splits import here

    frame = here(splits, data_cfg).all()
    for size in sizes:
        ensure_prepared(frame, size, prepared_dir(data_cfg), threads=cpus)
