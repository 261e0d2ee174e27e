"""Decode a dataset's images into one uint8 array file, in parallel, with a progress bar: the
build step of `boneage.prepare` (which owns the cache: its keys, manifests, lock and commit).

    progress = decode_into(partial_path, paths, image_size=96, threads=4, report=print)
    progress.finish("prepared in ...")     # the caller says where the file went

The pixels are exactly `boneage.pipeline.prepare_image`'s. A file TensorFlow cannot decode
stops the build with an `InputError` that names it (and why, when PIL can tell).
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from boneage.errors import InputError

DECODE_BATCH = 64  # images per write into the array


def available_threads() -> int:
    """The CPUs this process may run on (a container's or taskset's share, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def decode_into(path, paths, image_size: int, threads: int | None, report) -> "Progress":
    """Write every image of `paths`, in order, to `path` as an (N, size, size) uint8 .npy.
    Returns the progress bar, still open, for the caller to finish."""
    import tensorflow as tf

    from boneage.pipeline import prepare_image

    threads = threads or available_threads()
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(len(paths), image_size, image_size))
    ds = tf.data.Dataset.from_tensor_slices(paths).map(
        lambda p: prepare_image(tf.io.read_file(p), image_size),
        num_parallel_calls=threads, deterministic=True).batch(DECODE_BATCH).prefetch(2)
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads  # the CPUs we were given, no more
    ds = ds.with_options(options)
    progress = Progress(f"preparing {len(paths)} images at {image_size} px on {threads} CPUs", len(paths), report)
    done = 0
    iterator = iter(ds)
    while done < len(paths):
        try:
            batch = next(iterator)
        except tf.errors.OpError:
            raise InputError(_decode_failure(paths[done:done + DECODE_BATCH])) from None
        array[done:done + len(batch)] = batch.numpy()[..., 0]
        done += len(batch)
        progress.update(done)
    array.flush()
    del array
    return progress


def _decode_failure(paths) -> str:
    """Which of these images TensorFlow cannot decode, for the error message."""
    from boneage.data import check_image_file

    bad = [f"{p} ({check_image_file(p) or 'cannot be decoded'})" for p in paths if check_image_file(p)]
    if not bad:  # PIL accepts them all: name what TensorFlow chokes on one by one
        import tensorflow as tf

        from boneage.pipeline import prepare_image

        for p in paths:
            try:
                prepare_image(tf.io.read_file(p), 8)
            except tf.errors.OpError as err:
                bad.append(f"{p} ({err.message.splitlines()[0]})")
    return "cannot prepare images: " + "; ".join(bad or paths[:1])


class Progress:
    """A text progress bar: redrawn in place on a terminal, a line per 10% otherwise (logs)."""

    def __init__(self, title: str, total: int, report=print, stream=None):
        self.title, self.total, self.report = title, max(total, 1), report
        self.stream = stream or sys.stderr
        self.tty = report is print and self.stream.isatty()
        self.started, self.last_step, self.last_draw = time.time(), -1, 0.0
        self.report(f"{title} ...")

    def update(self, done: int) -> None:
        now, step = time.time(), 10 * done // self.total
        if self.tty and (now - self.last_draw > 0.2 or done == self.total):
            self.last_draw = now
            self.stream.write(f"\r  {self._line(done)}")
            self.stream.flush()
        elif not self.tty and step != self.last_step:
            self.last_step = step
            self.report(f"  {self._line(done)}")

    def _line(self, done: int) -> str:
        elapsed = max(time.time() - self.started, 1e-6)
        rate = done / elapsed
        eta = (self.total - done) / rate if rate else 0.0
        bar = "#" * (30 * done // self.total)
        return f"[{bar:30}] {done}/{self.total} {rate:6.0f} img/s, {elapsed:4.0f} s, {eta:4.0f} s left"

    def finish(self, message: str) -> None:
        if self.tty:
            self.stream.write("\n")
        self.report(f"  {message} in {time.time() - self.started:.1f} s")
