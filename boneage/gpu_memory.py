"""How much GPU memory this process may take when it shares a card: read the card with NVML.

    card = visible_card(os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("CUDA_DEVICE_ORDER"))
    cap = memory_cap_mib(card.memory_mib, share=0.5)     # for tf's LogicalDeviceConfiguration

Several trials share one card (`tune.resources.gpu: 0.5`), so each caps TensorFlow's memory pool
at its share of the card. The card is the one CUDA calls device 0 in this process: the first
entry of `CUDA_VISIBLE_DEVICES`, which Ray sets to the ids it assigned. An entry is an index, a
GPU UUID (`GPU-8932f937-...`, or a unique prefix of one, as CUDA accepts) or a MIG device
(`MIG-<uuid>`, or the older `MIG-GPU-<uuid>/<gi>/<ci>`). UUIDs are matched through NVIDIA's own
bindings (nvidia-ml-py, the `gpu` extra), never by parsing nvidia-smi. An index names NVML's
card of that index only when CUDA orders cards as NVML does (`CUDA_DEVICE_ORDER=PCI_BUS_ID`)
or when every card is the same model and size (then any of them has the right size); otherwise
the smallest card is taken and the note says so.

The headroom: TensorFlow's `memory_limit` bounds only its own allocator (tensors and cuDNN /
cuBLAS workspaces, which it allocates through that pool). Outside it every process also holds a
CUDA context and the device code of the CUDA, cuBLAS and cuDNN kernels it loads: about
300-500 MiB for the context with lazy module loading (CUDA >= 11.7, which TensorFlow turns on)
plus a few hundred MiB of cuDNN and cuBLAS kernels, as nvidia-smi shows beside the pool. We
keep CONTEXT_RESERVE_MIB = 1024 per process for that, so n processes sharing a card at 1/n
each take at most the card: n * (card/n - 1024 + 1024) = card.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

CONTEXT_RESERVE_MIB = 1024  # CUDA context + loaded kernels per process, outside TF's pool
MIN_CAP_MIB = 1024  # below this a share cannot hold Xception at any useful size
MIB = 1 << 20


@dataclass(frozen=True)
class Card:
    memory_mib: int | None  # None: unknown, see note
    note: str  # how the card was found, or why it could not be


def memory_cap_mib(card_mib: int, share: float) -> int:
    """TensorFlow's pool for a process holding `share` (0 < share < 1) of a `card_mib` card."""
    return int(card_mib * share) - CONTEXT_RESERVE_MIB


def visible_card(cuda_visible_devices: str | None, cuda_device_order: str | None = None) -> Card:
    """The memory of the card CUDA calls device 0 here, found with NVML."""
    try:
        import pynvml
    except ImportError:
        return Card(None, "nvidia-ml-py is not installed (pip install 'boneage-tune[gpu]')")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        return Card(None, f"NVML is not available ({err})")
    try:
        return _find(pynvml, cuda_visible_devices, (cuda_device_order or "").upper())
    except pynvml.NVMLError as err:
        return Card(None, f"NVML could not read the card ({err})")
    finally:
        pynvml.nvmlShutdown()


def _find(nvml, visible: str | None, order: str) -> Card:
    entry = "0" if visible is None else visible.split(",")[0].strip()
    if not entry or entry in ("-1", "none", "NoDevFiles"):
        return Card(None, f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU")
    cards = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    if not cards:
        return Card(None, "NVML lists no GPU")
    if entry.startswith("MIG-"):
        return _mig(nvml, cards, entry)
    if entry.startswith("GPU-"):
        matches = [c for c in cards if _uuid(nvml, c).startswith(entry)]
        if len(matches) != 1:
            return Card(None, f"{entry} matches {len(matches)} of the cards NVML lists")
        return _whole_card(nvml, matches[0], f"card {entry} (by UUID)")
    if not entry.isdigit():
        return Card(None, f"cannot read CUDA_VISIBLE_DEVICES entry {entry!r}")
    index = int(entry)
    if index >= len(cards):
        return Card(None, f"CUDA_VISIBLE_DEVICES names card {index}, NVML lists {len(cards)}")
    kinds = {(_name(nvml, c), _total_mib(nvml, c)) for c in cards}
    if order == "PCI_BUS_ID":
        return _whole_card(nvml, cards[index], f"card {index} (CUDA_DEVICE_ORDER=PCI_BUS_ID, as NVML orders)")
    if len(kinds) == 1:
        return _whole_card(nvml, cards[index], f"card {index} (all {len(cards)} cards are the same)")
    smallest = min(cards, key=lambda c: _total_mib(nvml, c))
    card = _whole_card(nvml, smallest, "")
    return Card(card.memory_mib, f"the smallest card, {_uuid(nvml, smallest)}: the cards differ and CUDA's "
                                 f"default order need not be NVML's (set CUDA_DEVICE_ORDER=PCI_BUS_ID, or "
                                 f"start Ray with GPU UUIDs in CUDA_VISIBLE_DEVICES)")


def _whole_card(nvml, handle, how: str) -> Card:
    """A card that is not split into MIG devices; with MIG on, CUDA sees one of its devices."""
    if _mig_enabled(nvml, handle):
        devices = list(_mig_devices(nvml, handle))
        if not devices:
            return Card(None, f"{how}: MIG is on but the card has no MIG device")
        return Card(min(_total_mib(nvml, d) for d in devices),
                    f"{how}: MIG is on, so the smallest of its {len(devices)} MIG devices")
    return Card(_total_mib(nvml, handle), how)


def _mig(nvml, cards, entry: str) -> Card:
    old_style = re.fullmatch(r"MIG-(GPU-[0-9a-fA-F-]+)/(\d+)/(\d+)", entry)
    for card in cards:
        if not _mig_enabled(nvml, card):
            continue
        for device in _mig_devices(nvml, card):
            if old_style:
                found = (_uuid(nvml, card) == old_style.group(1)
                         and nvml.nvmlDeviceGetGpuInstanceId(device) == int(old_style.group(2)))
            else:
                found = _uuid(nvml, device).startswith(entry)
            if found:
                return Card(_total_mib(nvml, device), f"MIG device {entry}")
    return Card(None, f"no MIG device {entry} among the cards NVML lists")


def _mig_enabled(nvml, handle) -> bool:
    try:
        return nvml.nvmlDeviceGetMigMode(handle)[0] == nvml.NVML_DEVICE_MIG_ENABLE
    except nvml.NVMLError:  # cards without MIG support answer "not supported"
        return False


def _mig_devices(nvml, card):
    for i in range(nvml.nvmlDeviceGetMaxMigDeviceCount(card)):
        try:
            yield nvml.nvmlDeviceGetMigDeviceHandleByIndex(card, i)
        except nvml.NVMLError:  # an empty slot
            continue


def _uuid(nvml, handle) -> str:
    value = nvml.nvmlDeviceGetUUID(handle)
    return value.decode() if isinstance(value, bytes) else value


def _name(nvml, handle) -> str:
    value = nvml.nvmlDeviceGetName(handle)
    return value.decode() if isinstance(value, bytes) else value


def _total_mib(nvml, handle) -> int:
    return int(nvml.nvmlDeviceGetMemoryInfo(handle).total) // MIB
