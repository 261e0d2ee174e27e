"""Before a search's first trial: every node that can run a trial prepares the images once.

    prepare_on_every_node(cfg, splits)     # called by tuning.search after Ray has started

Each node runs one Ray task holding all its CPUs, which calls `boneage.prepare.ensure_prepared`
for every resolution the search uses; a node whose cache is already there (or that shares it
with the others through `data.prepared_dir` on shared storage) just opens it. Without this each
node's first trial would build it on its own CPU share while the node's other trials wait.
"""
from __future__ import annotations

from boneage.errors import InputError
from tuning.config import SearchConfig


def prepare_on_every_node(cfg: SearchConfig, splits) -> None:
    """The search's `model.image_size` and any `choice` of it in `tune.space` are prepared;
    sizes from a numeric range are left to the first trial that needs each."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from tuning.space import config_key

    if cfg.data.cache != "prepared":
        return
    sizes = {cfg.model.image_size}
    for name, spec in cfg.tune.space.items():
        if config_key(cfg, name) == "model.image_size" and "choice" in spec:
            sizes |= {int(v) for v in spec["choice"]}
    need = cfg.tune.resources
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= max(need.cpu, 1)
             and n["Resources"].get("GPU", 0) >= need.gpu]
    build = ray.remote(max_calls=1)(_prepare_on_node)  # max_calls: the worker exits, TF's memory with it
    tasks = [build.options(num_cpus=n["Resources"]["CPU"], scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(cfg.data, splits.all(), sorted(sizes), int(n["Resources"]["CPU"]))
        for n in nodes]
    try:
        ray.get(tasks)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, InputError):  # e.g. an image that cannot be decoded: one message
            raise InputError(str(err.cause)) from None
        raise


def _prepare_on_node(data_cfg, frame, sizes, cpus) -> None:
    from boneage.prepare import ensure_prepared, prepared_dir

    for size in sizes:
        ensure_prepared(frame, size, prepared_dir(data_cfg), threads=cpus)
