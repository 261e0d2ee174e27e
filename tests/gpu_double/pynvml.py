"""A stand-in for NVIDIA's `pynvml` (nvidia-ml-py) describing the cards in `BONEAGE_FAKE_NVML`.

    BONEAGE_FAKE_NVML='[{"uuid": "GPU-aaaa...", "name": "NVIDIA A10G", "memory_mib": 23028,
                         "mig": [{"uuid": "MIG-bbbb...", "memory_mib": 9856, "gi": 1}]}]'

Only the calls `boneage.gpu_memory` makes, with the real module's names, return types and
errors (NVMLError with NVML's codes; a MIG slot that holds no device raises "not found").
Without the variable, nvmlInit fails as it does on a machine without the NVIDIA driver.
"""
import json
import os

NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_NOT_SUPPORTED = 3
NVML_DEVICE_MIG_ENABLE = 1
NVML_DEVICE_MIG_DISABLE = 0


class NVMLError(Exception):
    _messages = {NVML_ERROR_NOT_FOUND: "Not Found", NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
                 NVML_ERROR_NOT_SUPPORTED: "Not Supported"}

    def __init__(self, value):
        super().__init__(value)
        self.value = value

    def __str__(self):
        return self._messages.get(self.value, f"NVML Error with code {self.value}")


class _Memory:
    def __init__(self, mib):
        self.total = mib << 20
        self.free = self.total
        self.used = 0


class _Handle:
    def __init__(self, spec, parent=None):
        self.spec, self.parent = spec, parent


_cards = None


def nvmlInit():
    global _cards
    if "BONEAGE_FAKE_NVML" not in os.environ:
        raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
    _cards = [_Handle(spec) for spec in json.loads(os.environ["BONEAGE_FAKE_NVML"])]


def nvmlShutdown():
    pass


def nvmlDeviceGetCount():
    return len(_cards)


def nvmlDeviceGetHandleByIndex(index):
    if not 0 <= index < len(_cards):
        raise NVMLError(NVML_ERROR_NOT_FOUND)
    return _cards[index]


def nvmlDeviceGetUUID(handle):
    return handle.spec["uuid"]


def nvmlDeviceGetName(handle):
    return handle.spec.get("name", "NVIDIA MIG device" if handle.parent else "NVIDIA GPU")


def nvmlDeviceGetMemoryInfo(handle, version=None):
    return _Memory(handle.spec["memory_mib"])


def nvmlDeviceGetMigMode(handle):
    if "mig" not in handle.spec:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    mode = NVML_DEVICE_MIG_ENABLE if handle.spec["mig"] else NVML_DEVICE_MIG_DISABLE
    return [mode, mode]


def nvmlDeviceGetMaxMigDeviceCount(handle):
    return 7 if handle.spec.get("mig") else 0


def nvmlDeviceGetMigDeviceHandleByIndex(handle, index):
    devices = handle.spec.get("mig") or []
    if index >= len(devices):
        raise NVMLError(NVML_ERROR_NOT_FOUND)
    return _Handle(devices[index], handle)


def nvmlDeviceGetGpuInstanceId(handle):
    return handle.spec["gi"]
