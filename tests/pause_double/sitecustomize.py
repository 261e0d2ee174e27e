"""A test double that holds a trial for a while after it reports chosen epochs, so a fault test
can act between a report and the next epoch however fast the machine trains.

On PYTHONPATH, Python runs this at start-up in every process (Ray's workers too). When
`BONEAGE_PAUSE_AFTER_REPORT` is set (`"1,2:3"`: after reporting epoch 1 or 2, sleep 3 s),
`ray.tune.report` is wrapped as soon as `ray.tune` is imported: the report (and its checkpoint)
reaches Ray first, then the trial's process sleeps. Only the timing changes: what the trial
reports, saves and resumes from is the real code's.
"""
import importlib.abc
import importlib.util
import os
import sys
import time

_TARGET = "ray.tune"


def _pause_plan() -> tuple[set[int], float]:
    epochs, seconds = os.environ["BONEAGE_PAUSE_AFTER_REPORT"].split(":")
    return {int(e) for e in epochs.split(",")}, float(seconds)


def _patch(tune) -> None:
    real = tune.report
    epochs, seconds = _pause_plan()

    def report(metrics, *args, **kwargs):
        result = real(metrics, *args, **kwargs)
        if metrics.get("epoch") in epochs:
            time.sleep(seconds)
        return result

    tune.report = report


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches `ray.tune` as soon as it is imported (importing Ray here, at start-up, would slow
    every Python process that has this on its path)."""

    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        sys.meta_path.insert(0, self)
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        loader.exec_module = exec_and_patch
        return spec


if os.environ.get("BONEAGE_PAUSE_AFTER_REPORT"):
    sys.meta_path.insert(0, _PatchOnImport())
