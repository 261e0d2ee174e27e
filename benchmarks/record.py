"""Record a benchmark's latest result, with the machine it ran on, in benchmarks/RESULTS.md.

    from record import record, table       # the scripts run as `python benchmarks/NAME.py`
    record(1, "Input pipeline", command="python benchmarks/input_pipeline.py", body=table(...))

Each benchmark owns one section of RESULTS.md, between `<!-- benchmark N -->` markers, and
replaces it on every run; the other sections are kept as they are.
"""
from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
LOAD_AT_START = os.getloadavg()[0]  # other sessions share this machine: say how busy it was
HEADER = """# Benchmark results

Each section is written by its script (`benchmarks/*.py`, one README command each) on its
latest run: the machine, the command and size it ran with, the table, and the ratio measured side
by side in that run. These ran on a 2-core machine shared with other sessions (the load average
says how busy it was: 2.0 means both cores taken by others): wall-clock timings are noisy and a
pipeline using both cores gets less of them than it would alone, so where it matters the tables
also give CPU time per image, which the load does not change.
"""


def machine() -> str:
    """CPU model, the CPUs this process may use, memory, GPUs, and the software versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory = float("nan")
    import tensorflow as tf

    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    return (f"{cpu}, {cores} CPUs usable, {memory:.0f} GiB RAM, "
            f"{', '.join(gpus) if gpus else 'no GPU'}; {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, TensorFlow {tf.__version__}; load average "
            f"{LOAD_AT_START:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")


def record(number: int, title: str, command: str, body: str) -> None:
    """Replace benchmark `number`'s section of RESULTS.md (sections kept in number order)."""
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    sections = dict(re.findall(r"<!-- benchmark (\d+) -->\n(.*?)<!-- /benchmark \1 -->\n", text, re.S))
    sections[str(number)] = (f"## {number}. {title}\n\n"
                             f"{time.strftime('%Y-%m-%d %H:%M')}, `{command}`\n\n"
                             f"Machine: {machine()}\n\n{body.strip()}\n\n")
    parts = [HEADER]
    for key in sorted(sections, key=int):
        parts.append(f"<!-- benchmark {key} -->\n{sections[key]}<!-- /benchmark {key} -->\n")
    RESULTS.write_text("\n".join(parts))
    print(f"recorded in {RESULTS}")


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; floats rounded to about 3 significant digits (enough for noisy timings)."""
    def cell(value):
        if not isinstance(value, float):
            return str(value)
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
