"""tf.data pipeline: one decode for every PNG kind, aspect kept, eager == graph, augmentation."""
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

tf = pytest.importorskip("tensorflow")

from boneage.pipeline import augment, make_dataset, prepare_image  # noqa: E402


def hand(width=60, height=90):
    """A bright rectangle on black, taller than wide, like a hand radiograph."""
    image = np.zeros((height, width), np.uint8)
    image[10:80, 15:45] = 200
    image[20:30, 20:40] = 255
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


FORMATS = {
    "L": lambda a: Image.fromarray(a),
    "I;16": lambda a: Image.fromarray(a.astype(np.uint16) * 257),
    "I;16 12-bit": lambda a: Image.fromarray((a.astype(np.uint16) * 16)),
    "P": lambda a: Image.fromarray(a).convert("P"),
    "RGB": lambda a: Image.fromarray(np.stack([a] * 3, -1)),
    "RGBA": lambda a: Image.fromarray(np.stack([a] * 3 + [np.full_like(a, 255)], -1)),
}


@pytest.mark.parametrize("kind", FORMATS)
def test_every_png_kind_decodes_to_the_same_grey_image(kind):
    reference = prepare_image(png_bytes(FORMATS["L"](hand())), 72).numpy()
    image = prepare_image(png_bytes(FORMATS[kind](hand())), 72).numpy()
    assert image.shape == (72, 72, 1) and image.dtype == np.uint8
    assert np.abs(image.astype(int) - reference.astype(int)).max() <= 2


def test_aspect_ratio_is_kept_by_padding():
    image = prepare_image(png_bytes(Image.fromarray(hand())), 90).numpy()[..., 0]
    # 60x90 -> 60x90 in a 90x90 square: 15 black columns each side, rows all used
    assert (image[:, :14] == 0).all() and (image[:, -14:] == 0).all()
    bright_rows = np.where(image.max(axis=1) > 0)[0]
    assert bright_rows.min() <= 12 and bright_rows.max() >= 78


def frame_of(tmp_path, n=5):
    rows = []
    for i in range(n):
        array = np.roll(hand(), i * 3, axis=0)
        path = tmp_path / f"{i}.png"
        Image.fromarray(array).save(path)
        rows.append({"id": str(i), "path": str(path), "boneage": 10.0 * i, "male": i % 2 == 0})
    return pd.DataFrame(rows)


def test_pipeline_matches_eager_decode_and_keeps_every_row(tmp_path):
    frame = frame_of(tmp_path, 5)
    ds = make_dataset(frame, 72, batch_size=2, training=False)
    batches = list(ds)
    assert sum(len(y) for _, y in batches) == 5  # the whole set, last batch not dropped
    images = np.concatenate([x["image"].numpy() for x, _ in batches])
    males = np.concatenate([x["male"].numpy() for x, _ in batches])[:, 0]
    ages = np.concatenate([y.numpy() for _, y in batches])
    for i, path in enumerate(frame["path"]):
        eager = prepare_image(tf.io.read_file(path), 72).numpy().astype(np.float32)
        np.testing.assert_array_equal(images[i], eager)
    np.testing.assert_array_equal(ages, frame["boneage"].to_numpy(np.float32))
    np.testing.assert_array_equal(males, frame["male"].to_numpy(np.float32))


def test_threads_bound_the_pipeline_to_a_private_pool(tmp_path):
    frame = frame_of(tmp_path, 3)
    bounded = make_dataset(frame, 72, 3, training=True, augment_strength=0.5, threads=2)
    assert bounded.options().threading.private_threadpool_size == 2
    assert make_dataset(frame, 72, 3, training=False).options().threading.private_threadpool_size is None
    assert sum(len(y) for _, y in bounded) == 3


def test_without_sex_input_the_features_hold_only_the_image(tmp_path):
    x, _ = next(iter(make_dataset(frame_of(tmp_path, 3), 72, 3, training=False, include_sex=False)))
    assert set(x) == {"image"}


def test_strength_zero_is_identity_and_positive_strength_changes_images(tmp_path):
    frame = frame_of(tmp_path, 4)
    plain = np.concatenate([x["image"].numpy() for x, _ in make_dataset(frame, 72, 4, training=False)])
    train0 = make_dataset(frame, 72, 4, training=True, augment_strength=0.0, seed=3)
    x0, y0 = next(iter(train0))
    order = [list(frame["boneage"]).index(v) for v in y0.numpy()]
    np.testing.assert_array_equal(x0["image"].numpy(), plain[order])
    x1, y1 = next(iter(make_dataset(frame, 72, 4, training=True, augment_strength=1.0, seed=3)))
    order = [list(frame["boneage"]).index(v) for v in y1.numpy()]
    assert np.abs(x1["image"].numpy() - plain[order]).mean() > 1.0


def test_augment_is_reproducible_for_a_seed():
    image = tf.constant(hand(72, 72)[..., None], tf.float32)
    seed = tf.constant([1, 2], tf.int64)
    a, b = augment(image, 0.7, seed).numpy(), augment(image, 0.7, seed).numpy()
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0 and a.max() <= 255
    np.testing.assert_array_equal(augment(image, 0.0, seed).numpy(), image.numpy())
