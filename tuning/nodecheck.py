"""Before a node runs its first trial of an experiment: does it have what the driver has?

    expected = NodeExpectations.of(cfg, exp, token, splits.fingerprint)   # on the driver
    check_node(expected, cfg, splits)                                    # first thing in every trial

Autoscaled nodes join during a search, so this cannot be a one-off at the start: the first
trial of an experiment on each node checks that the node sees the experiment's storage, has
the weights file, runs the driver's code, and holds what the trial will train on: every image
of the driver's splits under `data.root` (flat, nested or only in the prepared cache, see
`boneage.splits.here`), passing the data checks here, with the sizes the search's fingerprint
says (of ids, labels and image sizes, from the driver, or for a head that holds only the label
CSV from the node that checked them: `tuning.prepare.splits_from_a_node`). It leaves a marker
in the node's cache, under a file lock, so trials that start together on one node check once. A mismatch raises
NodeCheckFailed naming the node; the driver's `NodeCheckWatch` then stops the search with that
message (exit status 2) instead of letting every trial fail the same way.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from ray import tune

NODE_CACHE = Path("~/.cache/boneage-tune/node-checks")
MARK = "boneage node check failed"


class NodeCheckFailed(RuntimeError):
    """This node cannot run the experiment's trials; the message names the node and says why."""


@dataclass(frozen=True)
class NodeExpectations:
    experiment: str  # the storage URI of the experiment
    storage_token: str  # written by the driver into the storage
    fingerprint: str  # of the splits (boneage.splits.fingerprint); "" = no node checked the images
    code_version: str

    @classmethod
    def of(cls, cfg, exp, token: str, fingerprint: str) -> "NodeExpectations":
        return cls(exp.uri, token, fingerprint, code_version())


def code_version() -> str:
    """A hash of this process's boneage and tuning sources: equal on every node running the
    driver's code (Ray ships it to the workers of a cluster, see tuning.search.start_ray)."""
    import boneage
    import tuning

    digest = hashlib.sha256()
    for package in (boneage, tuning):
        root = Path(package.__file__).parent
        for path in sorted(root.glob("*.py")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def node_label() -> str:
    import ray

    return f"node {ray.get_runtime_context().get_node_id()[:12]} ({socket.gethostname()})"


def check_node(expected: NodeExpectations, cfg, splits) -> None:
    """Check this node once per experiment run; NodeCheckFailed if it cannot run trials."""
    key = hashlib.sha256(f"{expected.experiment}\0{expected.storage_token}".encode()).hexdigest()[:16]
    folder = NODE_CACHE.expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / f"{key}.json"
    with open(folder / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # trials starting together on this node check once
        if done.is_file():
            return
        problems = _problems(expected, cfg, splits)
        if problems:
            raise NodeCheckFailed(f"{MARK}: {node_label()}: " + "; ".join(problems))
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(expected)))
        os.replace(tmp, done)


def _problems(expected: NodeExpectations, cfg, splits) -> list[str]:
    from tuning.experiment import Experiment

    problems = []
    storage = Experiment.at(expected.experiment).storage_problem(expected.storage_token)
    if storage:
        problems.append(f"the experiment's storage: {storage} (use s3:// or a file system shared by every node)")
    if expected.code_version != code_version():
        problems.append(f"code version {code_version()} differs from the driver's {expected.code_version}")
    weights = cfg.model.weights
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        problems.append(f"model.weights: no file {weights}")
    return problems + data_problems(expected.fingerprint, cfg, splits)


def data_problems(expected_fingerprint: str, cfg, splits) -> list[str]:
    """Whether this node holds what the trial trains on: every image of `splits` (the driver's
    ids and labels) usable here, with the bytes of `expected_fingerprint` ("" = not known)."""
    from boneage.errors import InputError
    from boneage.splits import check_here, fingerprint

    try:
        table, sizes = check_here(splits.all(), cfg.data, report=lambda m: None)
    except InputError as err:
        return [f"data.root {cfg.data.root}: {str(err).splitlines()[0]}"]
    found = fingerprint(table, sizes)
    if expected_fingerprint and found != expected_fingerprint:
        return [f"data.root {cfg.data.root} holds other images than the search's "
                f"(fingerprint {found}, search {expected_fingerprint})"]
    return []


class NodeCheckWatch(tune.Callback, tune.Stopper):
    """On the driver: a trial that failed its node check stops the whole search."""

    def __init__(self):
        self.failure: str | None = None

    def on_trial_error(self, iteration, trials, trial, **info):
        text = str(trial.get_error() or "")
        if MARK in text and self.failure is None:
            self.failure = text[text.index(MARK):].splitlines()[0]

    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.failure is not None
