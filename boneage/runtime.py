"""TensorFlow's process-wide settings, made once, by whoever starts the work.

    from boneage import runtime
    setup = runtime.configure(threads=4, gpu_memory_limit_mb=10490, mixed_precision=True)
    print(setup.describe())

A Ray trial, the retrain task and each CLI command call `configure` first thing, before
TensorFlow touches a device; `train()` only calls `ensure_configured`, which keeps what is there.
TensorFlow accepts these settings only before its runtime starts, and refuses memory growth on a
card that already has a memory cap ("Cannot set memory growth on device when virtual devices
configured"), so setting them in two places is what broke fractional-GPU trials. Here:

- GPUs: a hard memory cap (a fractional GPU share; see `boneage.gpu_memory`), else memory growth,
  so no process takes a whole card it does not need;
- threads: TensorFlow's intra- and inter-op pools, and (through `make_dataset(threads=...)`)
  tf.data's, sized to the CPUs the process was given rather than to the whole node;
- precision: `mixed_float16` only when a GPU is present and the config asks for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

_SETUP: "Setup | None" = None
_REQUESTED: tuple | None = None  # the arguments _SETUP was made from


@dataclass(frozen=True)
class Setup:
    gpus: int  # physical GPUs TensorFlow sees
    memory_limit_mb: int | None  # the per-card cap, or None (memory growth, or no GPU)
    intra_op_threads: int  # 0 = TensorFlow's default (all cores)
    inter_op_threads: int
    mixed_precision: bool  # the global Keras policy is mixed_float16
    notes: tuple = field(default=())  # anything a user should know, e.g. why there is no cap

    def describe(self) -> str:
        threads = f"{self.intra_op_threads} threads" if self.intra_op_threads else "all cores"
        if not self.gpus:
            gpu = "no GPU"
        elif self.memory_limit_mb:
            gpu = f"{self.gpus} GPU(s), memory capped at {self.memory_limit_mb} MiB each"
        else:
            gpu = f"{self.gpus} GPU(s), memory growth"
        policy = "mixed_float16" if self.mixed_precision else "float32"
        return "; ".join([f"TensorFlow: {gpu}, {threads}, {policy}", *self.notes])


def configure_share(cpus: int, gpu_share: float, mixed_precision: bool = True, env=None) -> Setup:
    """Configure a process that holds `cpus` CPUs and `gpu_share` GPUs (Ray's numbers).

    A fraction of a GPU gets a memory cap from the card it sees (`boneage.gpu_memory`); whole
    GPUs get memory growth. Where no cap can be found, the Setup's notes say why.
    """
    import os

    from boneage import gpu_memory
    from boneage.errors import InputError

    env = os.environ if env is None else env
    cap, notes = None, []
    if 0 < gpu_share < 1:
        card = gpu_memory.visible_card(env.get("CUDA_VISIBLE_DEVICES"), env.get("CUDA_DEVICE_ORDER"))
        if card.memory_mib is None:
            notes.append(f"no GPU memory cap ({card.note}): memory growth instead, so processes sharing "
                         f"the card can still run it out of memory")
        else:
            cap = gpu_memory.memory_cap_mib(card.memory_mib, gpu_share)
            if cap < gpu_memory.MIN_CAP_MIB:
                raise InputError(f"a GPU share of {gpu_share} of a {card.memory_mib} MiB card leaves {cap} MiB "
                                 f"after {gpu_memory.CONTEXT_RESERVE_MIB} MiB for the CUDA context; give each "
                                 f"process at least {gpu_memory.MIN_CAP_MIB} MiB (a larger GPU share)")
            notes.append(f"GPU memory cap {cap} MiB = {gpu_share:g} x {card.memory_mib} MiB of {card.note}, "
                         f"less {gpu_memory.CONTEXT_RESERVE_MIB} MiB for the CUDA context")
    threads = max(1, int(cpus))
    return configure(threads, min(2, threads), cap, mixed_precision, notes)


def configure(intra_op_threads: int = 0, inter_op_threads: int = 0, gpu_memory_limit_mb: int | None = None,
              mixed_precision: bool = True, notes=()) -> Setup:
    """Set TensorFlow up for this process; call once, before any TensorFlow work.

    Calling again with the same settings returns the same Setup; different settings raise
    RuntimeError, since TensorFlow cannot change them once it has started.
    """
    global _SETUP, _REQUESTED
    wanted = (intra_op_threads, inter_op_threads, gpu_memory_limit_mb, mixed_precision)
    if _SETUP is not None:
        if wanted != _REQUESTED:
            raise RuntimeError(f"TensorFlow is already configured in this process ({_SETUP.describe()}); "
                               f"it cannot be configured again differently")
        return _SETUP
    import keras
    import tensorflow as tf

    if intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
    if inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        if gpu_memory_limit_mb:
            tf.config.set_logical_device_configuration(
                gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=gpu_memory_limit_mb)])
        else:
            tf.config.experimental.set_memory_growth(gpu, True)
    mixed = bool(gpus) and mixed_precision
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    _SETUP = Setup(len(gpus), gpu_memory_limit_mb if gpus else None, intra_op_threads, inter_op_threads,
                   mixed, tuple(notes))
    _REQUESTED = wanted
    return _SETUP


def ensure_configured(intra_op_threads: int = 0, inter_op_threads: int = 0,
                      mixed_precision: bool = True) -> Setup:
    """The process's Setup; for a library caller who configured nothing, the defaults.

    If TensorFlow already started before anyone configured it (a notebook that ran TensorFlow
    code first), its settings are kept as they are and the Setup says so.
    """
    if _SETUP is not None:
        return _SETUP
    try:
        return configure(intra_op_threads, inter_op_threads, None, mixed_precision)
    except RuntimeError as err:  # TensorFlow's "cannot be modified after being initialized"
        return _adopt_running(f"TensorFlow had already started; its settings were kept ({err})")


def _adopt_running(note: str) -> Setup:
    global _SETUP
    import keras
    import tensorflow as tf

    _SETUP = Setup(len(tf.config.list_physical_devices("GPU")), None,
                   tf.config.threading.get_intra_op_parallelism_threads(),
                   tf.config.threading.get_inter_op_parallelism_threads(),
                   keras.mixed_precision.global_policy().name == "mixed_float16", (note,))
    return _SETUP


def current() -> Setup | None:
    """The Setup made in this process, or None."""
    return _SETUP


def replica_devices() -> list[str]:
    """The devices to mirror training across: every logical GPU when there are several, else
    every logical CPU when a caller split the CPU into several (tests do, to run the multi-GPU
    code path without GPUs), else none (one device: no strategy needed)."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    devices = gpus or tf.config.list_logical_devices("CPU")
    return [d.name for d in devices] if len(devices) > 1 else []
