"""A test double that makes TensorFlow believe GPUs exist, while its own rules stay in force.

On PYTHONPATH, Python runs this at start-up in every process (Ray's workers too). When
`BONEAGE_FAKE_GPUS` is set, TensorFlow's physical-device list gains one fake GPU per entry of
CUDA_VISIBLE_DEVICES (or that many GPUs when it is unset). Only the list is faked: the
configuration calls (`set_memory_growth`, `set_logical_device_configuration`, thread settings)
run TensorFlow's real code in `tensorflow/python/eager/context.py`, which raises exactly as on a
GPU machine: ValueError for memory growth on a card with virtual devices, RuntimeError for any
change after the runtime has started. The runtime itself starts on the CPU (it finds no CUDA
device), so training runs, on the CPU.

Each call is appended as a JSON line to `$BONEAGE_FAKE_GPU_LOG/<pid>.jsonl`, for tests to read.
"""
import json
import os
import runpy
import time

_TARGET = "tensorflow.python.eager.context"


def _log(record: dict) -> None:
    folder = os.environ.get("BONEAGE_FAKE_GPU_LOG")
    if folder:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{os.getpid()}.jsonl"), "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "time": time.time(), **record}) + "\n")


def _fake_gpu_names() -> list:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    count = len([e for e in visible.split(",") if e.strip()]) if visible is not None else int(os.environ["BONEAGE_FAKE_GPUS"])
    return [f"/physical_device:GPU:{i}".encode() for i in range(count)]


def _patch(context) -> None:
    real = context.pywrap_tfe

    class Shim:
        def __getattr__(self, name):
            return getattr(real, name)

        def TF_ListPhysicalDevices(self):  # noqa: N802 - TensorFlow's name
            return real.TF_ListPhysicalDevices() + _fake_gpu_names()

    context.pywrap_tfe = Shim()
    cls = context.Context

    def recorded(name, describe):
        method = getattr(cls, name)

        def wrapper(self, *args):
            entry = {"call": name, **describe(*args)}
            try:
                result = method(self, *args)
            except Exception as err:
                _log({**entry, "error": f"{type(err).__name__}: {err}"})
                raise
            _log(entry)
            return result

        setattr(cls, name, wrapper)

    recorded("set_memory_growth", lambda dev, enable: {"device": dev.name, "enable": enable})
    recorded("set_logical_device_configuration",
             lambda dev, virtual: {"device": dev.name, "memory_limit": [v.memory_limit for v in virtual]})
    _log({"call": "start", "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
          "fake_gpus": len(_fake_gpu_names())})


if os.environ.get("BONEAGE_FAKE_GPUS"):  # the hook lives in tests/patch_on_import.py
    runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "patch_on_import.py"))["patch_on_import"](_TARGET, _patch)
