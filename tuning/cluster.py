"""What the Ray cluster can run: its node shapes, and whether the trials and the retrain fit.

    shapes = node_shapes()                          # after ray.init
    check_fits(cfg, shapes)                         # InputError before any trial starts
    gpus, cpus = retrain_resources(cfg, shapes)
    pg = reserve(gpus, cpus, cfg.tune.retrain_wait_s)   # or ClusterError after the wait
    check_fits(cfg, type_shapes(launcher_node_types("cluster.yaml")))   # offline, against a launcher file

A shape is one alive node, or one node type an autoscaler may start: those of `ray up`
(`~/ray_bootstrap_config.yaml` on the head, where the launcher puts it) and those listed in
`BONEAGE_NODE_TYPES` (JSON `{"name": {"CPU": 8, "GPU": 1}}`, for KubeRay, whose worker groups
the head cannot read). A request larger than every shape can never be met: Ray would keep it
pending forever, so it is refused up front. A request that fits a node type but no alive node
(an autoscaler removed the idle GPU workers during a long search) waits for one, for at most
`tune.retrain_wait_s`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from boneage.errors import InputError

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
NODE_TYPES_ENV = "BONEAGE_NODE_TYPES"
EXIT_CLUSTER = 3  # the cluster could not provide what the search needs (not bad input)


class ClusterError(Exception):
    """The cluster cannot run what was asked, now or within the wait; the message says why."""


@dataclass(frozen=True)
class Shape:
    name: str  # node id (alive) or node type name
    cpus: float
    gpus: float
    alive: bool


def launcher_node_types(path) -> dict[str, dict]:
    """{node type: resources} of a `ray up` launcher file (`cluster.yaml`, or the copy `ray up`
    puts on the head); {} when there is no such file."""
    path = Path(path).expanduser()
    if not path.is_file():
        return {}
    launcher = yaml.safe_load(path.read_text()) or {}
    return {name: spec.get("resources") or {} for name, spec in (launcher.get("available_node_types") or {}).items()}


def type_shapes(types: dict) -> list[Shape]:
    """Shapes of node types an autoscaler may start, from {name: {"CPU": n, "GPU": m}}."""
    return [Shape(name, float(r.get("CPU", 0)), float(r.get("GPU", 0)), False) for name, r in types.items()]


def node_shapes(bootstrap=BOOTSTRAP_CONFIG, env=None) -> list[Shape]:
    """Alive nodes, then the node types an autoscaler may start."""
    import ray

    env = os.environ if env is None else env
    shapes = [Shape(n["NodeID"][:12], n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0), True)
              for n in ray.nodes() if n["Alive"]]
    types = launcher_node_types(bootstrap)
    if env.get(NODE_TYPES_ENV):
        try:
            types.update(json.loads(env[NODE_TYPES_ENV]))
        except (ValueError, AttributeError) as err:
            raise InputError(f"{NODE_TYPES_ENV} is not a JSON object of node types: {err}") from None
    return shapes + type_shapes(types)


def describe(shapes) -> str:
    return ", ".join(f"{s.name} ({s.cpus:g} CPU, {s.gpus:g} GPU{'' if s.alive else ', node type'})"
                     for s in shapes) or "none"


def retrain_resources(cfg, shapes) -> tuple[int, float]:
    """(GPUs, CPUs) for the retrain: `tune.retrain_gpus` (-1 = every GPU of the biggest GPU
    node), and `tune.retrain_cpus` (0 = every CPU of the node it lands on, since the retrain is
    the only work left and its input pipeline and TensorFlow threads use them all)."""
    gpus = cfg.tune.retrain_gpus
    if gpus < 0:
        alive_gpus = [s.gpus for s in shapes if s.alive and s.gpus]
        gpus = int(max(alive_gpus or [s.gpus for s in shapes] or [0]))
    candidates = [s for s in shapes if s.gpus >= gpus]
    cpus = cfg.tune.retrain_cpus or min([s.cpus for s in candidates if s.cpus > 0] or [1.0])
    return gpus, cpus


def check_fits(cfg, shapes) -> None:
    """InputError, before any trial starts, when no node or node type can run a trial or the
    retrain, or when a GPU search would retrain on CPU."""
    trial = cfg.tune.resources
    if not any(s.cpus >= trial.cpu and s.gpus >= trial.gpu for s in shapes):
        raise InputError(f"tune.resources {{cpu: {trial.cpu:g}, gpu: {trial.gpu:g}}}: no node of this cluster "
                         f"can run a trial; its nodes: {describe(shapes)}")
    if not cfg.tune.retrain:
        return
    gpus, cpus = retrain_resources(cfg, shapes)
    if not any(s.gpus >= gpus and s.cpus >= cpus for s in shapes):
        raise InputError(f"tune.retrain_gpus {cfg.tune.retrain_gpus} / tune.retrain_cpus {cfg.tune.retrain_cpus:g}: "
                         f"no node of this cluster has {gpus} GPU(s) and {cpus:g} CPU(s); its nodes: "
                         f"{describe(shapes)} (retrain_gpus: -1 takes every GPU of the biggest node)")
    if trial.gpu > 0 and gpus == 0:
        raise InputError(f"trials use GPUs but tune.retrain_gpus {cfg.tune.retrain_gpus} would retrain on CPU "
                         f"(no node has a GPU: {describe(shapes)})")


def reserve(gpus: int, cpus: float, wait_s: float, shapes=()):
    """A placement group holding `gpus` GPUs and `cpus` CPUs on one node, once one is up.

    Waits up to `wait_s` for the autoscaler to start such a node; ClusterError after that.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    if not any(s.alive and s.gpus >= gpus and s.cpus >= cpus for s in shapes):
        print(f"no node up has {gpus} GPU(s) and {cpus:g} CPU(s) free (an autoscaler may have removed idle "
              f"workers); waiting up to {wait_s:g} s for one ...", flush=True)
    group = placement_group([bundle], strategy="STRICT_PACK")
    ready, _ = ray.wait([group.ready()], timeout=wait_s)
    if not ready:
        remove_placement_group(group)
        raise ClusterError(f"no node with {gpus} GPU(s) and {cpus:g} CPU(s) became available within {wait_s:g} s "
                           f"(tune.retrain_wait_s); nodes: {describe(node_shapes())}. The search's results are "
                           f"saved: retrain later with --retrain-only")
    return group


def check_storage(exp, token: str, shapes) -> None:
    """InputError before any trial starts when an alive node on another host cannot read the
    experiment's storage (a local folder on a cluster of several hosts). Nodes that join later
    check it before their first trial (tuning.nodecheck)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"]]
    if exp.remote or len({n["NodeManagerAddress"] for n in nodes}) < 2:
        return  # s3:// is reachable from anywhere; one host shares its disk

    def problem(_):
        return exp.storage_problem(token)

    probe = ray.remote(num_cpus=0)(problem)
    answers = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                       .remote(None) for n in nodes])
    unreachable = [f"{n['NodeManagerAddress']} ({why})" for n, why in zip(nodes, answers) if why]
    if unreachable:
        raise InputError(f"tune.storage_path {exp.storage_path}: not shared with every node of this cluster: "
                         f"{'; '.join(unreachable)}. Use s3://bucket/path (or a file system mounted at the "
                         f"same path on every node)")
