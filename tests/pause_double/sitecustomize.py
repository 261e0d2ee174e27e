"""A test double that holds a trial for a while after it reports chosen epochs, so a fault test
can act between a report and the next epoch however fast the machine trains.

On PYTHONPATH, Python runs this at start-up in every process (Ray's workers too). When
`BONEAGE_PAUSE_AFTER_REPORT` is set (`"1,2:3"`: after reporting epoch 1 or 2, sleep 3 s),
`ray.tune.report` is wrapped as soon as `ray.tune` is imported: the report (and its checkpoint)
reaches Ray first, then the trial's process sleeps. Only the timing changes: what the trial
reports, saves and resumes from is the real code's.
"""
import os
import runpy
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


if os.environ.get("BONEAGE_PAUSE_AFTER_REPORT"):  # the hook lives in tests/patch_on_import.py
    runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "patch_on_import.py"))["patch_on_import"](_TARGET, _patch)
