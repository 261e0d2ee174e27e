"""tf.data input pipeline: PNG files -> batches of ({"image", "male"}, age in months).

    ds = make_dataset(frame, image_size=96, batch_size=32, training=True, augment_strength=0.5)

`frame` is the table from `boneage.data` (id, path, boneage, male). Images leave the pipeline as
raw grey levels (float32 0..255, one channel); scaling and grey-to-RGB happen inside the model,
so an exported model takes raw images. `prepare_image` is the one decode used everywhere: here,
in `predict`, and in the exported SavedModel's serving signature.
"""
from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE
READ_BATCH = 64  # rows gathered from a prepared cache per call into numpy


def prepare_image(png_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
    """Encoded PNG -> uint8 [size, size, 1]: one channel, aspect ratio kept, centred on black.

    Any PNG works: 8- or 16-bit grey, palette, RGB, RGBA. Decoding at 16 bits and stretching by
    the image's own maximum keeps 12-bit detector data (stored in 16-bit files) from coming out
    nearly black; 8-bit images whose brightest pixel is already white are unchanged.
    """
    image = tf.io.decode_png(png_bytes, channels=1, dtype=tf.uint16)
    image = tf.cast(image, tf.float32)
    image = image * (255.0 / tf.maximum(tf.reduce_max(image), 1.0))
    height = tf.cast(tf.shape(image)[0], tf.float32)
    width = tf.cast(tf.shape(image)[1], tf.float32)
    scale = float(image_size) / tf.maximum(height, width)
    new_h = tf.clip_by_value(tf.cast(tf.round(height * scale), tf.int32), 1, image_size)
    new_w = tf.clip_by_value(tf.cast(tf.round(width * scale), tf.int32), 1, image_size)
    # Antialiasing matters: real radiographs shrink 20x (2080 -> 96 px) and would alias badly.
    image = tf.image.resize(image, [new_h, new_w], method="area", antialias=True)
    image = tf.image.pad_to_bounding_box(
        image, (image_size - new_h) // 2, (image_size - new_w) // 2, image_size, image_size)
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def augment(image: tf.Tensor, strength: float, seed: tf.Tensor) -> tf.Tensor:
    """Random flip, rotation, shift, zoom, brightness and contrast, all scaled by `strength`.

    One projective transform does rotation, shift and zoom together, so the image is resampled
    once. `seed` is a stateless seed pair, so the same epoch and element give the same result.
    """
    size = tf.cast(tf.shape(image)[0], tf.float32)
    seeds = tf.random.experimental.stateless_split(seed, 6)
    uniform = lambda i, bound: tf.random.stateless_uniform([], seeds[i], -bound, bound)
    angle = uniform(0, strength * math.radians(15.0))
    zoom = 1.0 + uniform(1, strength * 0.15)
    shift_y, shift_x = uniform(2, strength * 0.1) * size, uniform(3, strength * 0.1) * size
    flip = tf.random.stateless_uniform([], seeds[4]) < 0.5 * strength
    image = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
    # Inverse map (output -> input pixel), rotating and zooming about the image centre.
    cos, sin, centre = tf.cos(angle) / zoom, tf.sin(angle) / zoom, (size - 1.0) / 2.0
    a0, a1, b0, b1 = cos, -sin, sin, cos
    a2 = centre - a0 * centre - a1 * centre - shift_x
    b2 = centre - b0 * centre - b1 * centre - shift_y
    transform = tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0])[None]
    image = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=transform, output_shape=tf.shape(image)[:2],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")[0]
    photometric = tf.random.stateless_uniform([2], seeds[5], -1.0, 1.0)
    contrast = 1.0 + 0.3 * strength * photometric[0]
    brightness = 0.15 * 255.0 * strength * photometric[1]
    mean = tf.reduce_mean(image)
    return tf.clip_by_value((image - mean) * contrast + mean + brightness, 0.0, 255.0)


def make_dataset(frame, image_size: int, batch_size: int, training: bool,
                 augment_strength: float = 0.0, include_sex: bool = True, seed: int = 0,
                 cache: str = "memory", with_labels: bool = True, prepared=None,
                 threads: int = 0) -> tf.data.Dataset:
    """The whole input pipeline, in a fixed order that each step depends on:

    1. list files   : (path, male, age) rows, in the frame's order.
    2. decode       : read + decode + resize in parallel; the slow step, so it runs once...
    3. cache        : ...because the cache keeps the decoded uint8 images (`cache: memory`), or
                      `prepared` (a `boneage.prepare.PreparedImages`) already holds them all:
                      then rows are read from its memory-mapped file instead of steps 1-3,
                      whole batches at a time when nothing is augmented.
    4. shuffle      : training only, the whole set, reshuffled every epoch (after the cache,
                      or every epoch would see the same order).
    5. augment      : training only and strength > 0; after the shuffle so each epoch differs.
    6. batch        : validation and test sets are batched whole, never truncated.
    7. prefetch     : overlap the input pipeline with the training step.

    `threads` > 0 gives the whole pipeline a private pool of that many threads, so a process
    holding a share of a node's CPUs (a Ray trial) does not run tf.data on every core.
    """
    male = frame["male"].astype(np.float32).to_numpy()[:, None]
    ages = frame["boneage"].astype(np.float32).to_numpy() if with_labels else np.zeros(len(frame), np.float32)
    augmenting = training and augment_strength > 0

    def as_features(x, m, y):
        return ({"image": x, "male": m} if include_sex else {"image": x}), y

    if prepared is not None:
        if prepared.array.shape[1:] != (image_size, image_size):
            raise ValueError(f"prepared images are {prepared.array.shape[1]} px, not {image_size}")
        ds = tf.data.Dataset.from_tensor_slices((prepared.rows(frame), male, ages))
        if training:  # the same permutation as shuffling decoded images with this seed
            ds = ds.shuffle(len(frame), seed=seed, reshuffle_each_iteration=True)
        if not augmenting:  # whole batches straight from the file: no per-image steps at all
            ds = ds.batch(batch_size, drop_remainder=False).map(
                lambda r, m, y: as_features(tf.cast(_read_rows(prepared.array, r), tf.float32), m, y))
            return _finish(ds, threads)
        ds = ds.batch(READ_BATCH).map(lambda r, m, y: (_read_rows(prepared.array, r), m, y)).unbatch()
        ds = ds.apply(tf.data.experimental.assert_cardinality(len(frame)))  # Keras counts steps
    else:
        paths = frame["path"].astype(str).to_numpy()
        ds = tf.data.Dataset.from_tensor_slices((paths, male, ages))
        ds = ds.map(lambda p, m, y: (prepare_image(tf.io.read_file(p), image_size), m, y),
                    num_parallel_calls=AUTOTUNE, deterministic=True)
        if cache == "memory":
            ds = ds.cache()
        if training:
            ds = ds.shuffle(len(frame), seed=seed, reshuffle_each_iteration=True)
    if augmenting:
        # A seeded random stream, redrawn each epoch, gives every element its own stateless
        # seed: reproducible runs, yet a new augmentation of each image every epoch.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip(ds, seeds).map(
            lambda el, s: (augment(tf.cast(el[0], tf.float32), augment_strength, s), el[1], el[2]),
            num_parallel_calls=AUTOTUNE)
    else:
        ds = ds.map(lambda x, m, y: (tf.cast(x, tf.float32), m, y))
    ds = ds.map(as_features).batch(batch_size, drop_remainder=False)
    return _finish(ds, threads)


def _finish(ds: tf.data.Dataset, threads: int) -> tf.data.Dataset:
    """Prefetch (overlap the pipeline with the training step), on a private pool of `threads`."""
    ds = ds.prefetch(AUTOTUNE)
    if threads:
        options = tf.data.Options()
        options.threading.private_threadpool_size = threads
        ds = ds.with_options(options)
    return ds


def _read_rows(array: np.ndarray, rows: tf.Tensor) -> tf.Tensor:
    """Rows of a memory-mapped (N, size, size) uint8 array as [n, size, size, 1]: only those
    pages are read, so processes sharing the file share its pages instead of copying it."""
    size = array.shape[1]
    images = tf.numpy_function(lambda r: array[np.asarray(r)], [rows], tf.uint8, stateful=False)
    return tf.reshape(images, [-1, size, size, 1])


def to_device(ds: tf.data.Dataset, device: str) -> tf.data.Dataset:
    """Copy batches ahead onto `device` (e.g. "/gpu:0"), overlapping the host-to-GPU copy with
    the previous step. It must be the dataset's last transformation."""
    return ds.apply(tf.data.experimental.prefetch_to_device(device, buffer_size=2))
