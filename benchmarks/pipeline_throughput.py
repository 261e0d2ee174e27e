"""Input pipeline throughput: decoding PNGs every epoch vs the in-memory cache.

    python benchmarks/pipeline_throughput.py [RSNA_ROOT] [--size 96] [--epochs 3]

Without RSNA_ROOT it generates 600 phantom radiographs in a temporary folder. Prints images/s
per epoch for `cache: none` and `cache: memory`, measured side by side in one run, and the
ratio (the second and later epochs are what the cache buys; the first epoch pays the decode).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def epoch_rates(frame, size: int, epochs: int, cache: str) -> list[float]:
    from boneage.pipeline import make_dataset

    ds = make_dataset(frame, size, batch_size=64, training=True, cache=cache)
    rates = []
    for _ in range(epochs):
        started, n = time.perf_counter(), 0
        for _, y in ds:
            n += int(y.shape[0])
        rates.append(n / (time.perf_counter() - started))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", nargs="?", help="RSNA-layout folder (default: a phantom set)")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    from boneage import data, phantom

    root = Path(args.root) if args.root else phantom.generate(Path(tempfile.mkdtemp()) / "phantom", 600)
    frame = data.load_table(root, "training", report=lambda m: None)
    results = {cache: epoch_rates(frame, args.size, args.epochs, cache) for cache in ("none", "memory")}
    print(f"{len(frame)} images from {root} at {args.size} px (images/s)")
    print(f"{'cache':8}" + "".join(f"{'epoch ' + str(i + 1):>10}" for i in range(args.epochs)))
    for cache, rates in results.items():
        print(f"{cache:8}" + "".join(f"{r:10.0f}" for r in rates))
    later = lambda rates: sum(rates[1:]) / max(1, len(rates) - 1)
    print(f"memory / none, epochs 2+: {later(results['memory']) / later(results['none']):.1f}x")


if __name__ == "__main__":
    main()
