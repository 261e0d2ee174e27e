"""Benchmark 1, input pipeline: images per second delivered at 256 px (decode, resize, augment,
batch) by the notebook's approach, by our pipeline decoding PNGs, and by our pipeline from the
prepared cache, side by side in one run on the real full-size radiographs.

    pip install -c constraints.txt -e ".[bench]"      # tf_keras, for the notebook's generator
    BONEAGE_SAMPLE_DATA=/path/to/rsna-sample python benchmarks/input_pipeline.py [--passes 3]

The notebook: `tf_keras` `ImageDataGenerator(rescale=1/255, horizontal_flip=True)
.flow_from_dataframe(..., target_size=(256, 256), batch_size=32)` (PIL decode, squash to
256x256, one thread). Ours: `boneage.pipeline.make_dataset` at augmentation strength 0.5
(rotation, shift, zoom, flip, brightness, contrast: more work than a flip), batch 32, first
with every image decoded from its PNG (what a first epoch costs), then from the memory-mapped
cache of `boneage.prepare`. The 40 images are listed `--repeat` times so each pass is long
enough to time. Targets: cache >= 20x the notebook; decoding >= 1.5x on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from record import record, table

SIZE, BATCH = 256, 32


class Meter:
    """Wall and CPU time (all threads of this process) over the passes of one pipeline."""

    def __init__(self, batches):
        self.batches, self.images, self.wall, self.cpu = batches, 0, 0.0, 0.0

    def one_pass(self) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        for batch in self.batches():
            self.images += len(batch[1])
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu

    def row(self, name, base=None) -> list:
        rate = self.images / self.wall
        return [name, rate, rate / (base.images / base.wall) if base else 1.0, 1000 * self.cpu / self.images]


def notebook(frame):
    from tf_keras.preprocessing.image import ImageDataGenerator

    generator = ImageDataGenerator(rescale=1.0 / 255, horizontal_flip=True)
    flow = generator.flow_from_dataframe(frame, x_col="path", y_col="boneage", target_size=(SIZE, SIZE),
                                         color_mode="rgb", class_mode="raw", batch_size=BATCH, shuffle=True,
                                         seed=0, validate_filenames=False)

    def one_pass():
        for i in range(len(flow)):
            yield flow[i]
        flow.on_epoch_end()

    return Meter(one_pass)


def ours(frame, prepared=None):
    from boneage.pipeline import make_dataset

    ds = make_dataset(frame, SIZE, BATCH, training=True, augment_strength=0.5, cache="none", prepared=prepared)
    return Meter(lambda: ds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=os.environ.get("BONEAGE_SAMPLE_DATA"),
                        help="RSNA-layout folder of full-size images (default $BONEAGE_SAMPLE_DATA)")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=4, help="times each image is listed per pass")
    parser.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    if not args.root:
        sys.exit("set BONEAGE_SAMPLE_DATA (or --root) to the rsna-sample folder of full-size radiographs")
    from boneage import data
    from boneage.prepare import ensure_prepared

    table_ = data.load_table(Path(args.root), "training", report=lambda m: None)
    frame = pd.concat([table_] * args.repeat, ignore_index=True)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        prepared = ensure_prepared(table_, SIZE, folder, report=lambda m: None)
        prepare_s = time.perf_counter() - started
        ours(frame.iloc[:BATCH], prepared).one_pass()  # TensorFlow's one-off start-up, not the pipeline's
        meters = {"notebook (tf_keras ImageDataGenerator)": notebook(frame), "ours, decoding PNGs": ours(frame),
                  "ours, from the prepared cache": ours(frame, prepared)}
        for _ in range(args.passes):  # interleaved: a change in the machine's load hits all three alike
            for meter in meters.values():
                meter.one_pass()
    base = meters["notebook (tf_keras ImageDataGenerator)"]
    rows = [meter.row(name, base) for name, meter in meters.items()]
    decode_x, cache_x = rows[1][2], rows[2][2]
    body = "\n".join([
        f"{len(table_)} full-size radiographs ({args.root}), listed {args.repeat}x, {args.passes} passes, "
        f"{SIZE} px, batch {BATCH}; ours with augmentation strength 0.5. Preparing the cache once took "
        f"{prepare_s:.1f} s ({len(table_) / prepare_s:.0f} images/s).", "",
        table(["pipeline", "images/s", "x notebook", "CPU ms per image"], rows), "",
        "CPU ms per image: the process's CPU time (all threads) per image delivered, which the load of "
        "other processes on the machine does not change; the notebook's generator uses one thread, ours all.", "",
        f"Cache vs notebook: **{cache_x:.0f}x** (target 20x: {'met' if cache_x >= 20 else 'missed'}). "
        f"Decoding vs notebook: **{decode_x:.2f}x** (target 1.5x: {'met' if decode_x >= 1.5 else 'missed'})."])
    print(body)
    if not args.no_record:
        record(1, "Input pipeline at 256 px", "python benchmarks/input_pipeline.py", body)


if __name__ == "__main__":
    main()
