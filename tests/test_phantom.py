"""Tests for boneage.phantom: Kaggle layout, determinism, idempotent re-use, and that age lives in
the anatomy rather than in image statistics a CNN could shortcut through."""

import csv

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import KFold

from boneage import phantom
from boneage.errors import InputError


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_layout(tmp_path):
    calls = []
    out = phantom.generate(tmp_path / "ph", n=12, seed=3, width=64, height=80,
                           progress=lambda done, total: calls.append((done, total)))
    assert out == tmp_path / "ph"
    assert calls[-1] == (16, 16)  # n_test defaults to max(4, n // 10)

    train = _rows(out / "boneage-training-dataset.csv")
    assert train[0] == ["id", "boneage", "male"]
    assert [int(r[0]) for r in train[1:]] == list(range(1377, 1389))
    assert all(1 <= int(r[1]) <= 228 and r[2] in ("True", "False") for r in train[1:])

    test = _rows(out / "boneage-test-dataset.csv")
    labels = _rows(out / "boneage-test-labels.csv")
    assert test[0] == ["Case ID", "Sex"] and labels[0] == ["id", "boneage", "male"]
    assert [int(r[0]) for r in test[1:]] == list(range(1389, 1393))
    assert [r[0] for r in test[1:]] == [r[0] for r in labels[1:]]
    assert [r[1] for r in test[1:]] == [{"True": "M", "False": "F"}[r[2]] for r in labels[1:]]

    for folder, rows in (("boneage-training-dataset", train), ("boneage-test-dataset", test)):
        assert sorted(p.name for p in (out / folder).iterdir()) == sorted(f"{r[0]}.png" for r in rows[1:])
        for r in rows[1:]:
            with Image.open(out / folder / f"{r[0]}.png") as im:
                assert im.mode == "L" and im.size == (64, 80)
    assert not list(tmp_path.glob(".ph.tmp-*"))  # the staging directory is gone


def _contents(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_by_seed(tmp_path):
    a = _contents(phantom.generate(tmp_path / "a", n=6, seed=7, width=64, height=80))
    b = _contents(phantom.generate(tmp_path / "b", n=6, seed=7, width=64, height=80))
    c = _contents(phantom.generate(tmp_path / "c", n=6, seed=8, width=64, height=80))
    assert a == b
    assert a.keys() == c.keys() and a != c
    # Image i does not depend on how many images are generated.
    d = phantom.generate(tmp_path / "d", n=3, seed=7, width=64, height=80)
    assert (d / "boneage-training-dataset/1378.png").read_bytes() == \
        a[(tmp_path / "a/boneage-training-dataset/1378.png").relative_to(tmp_path / "a")]


def test_reuse_and_conflicts(tmp_path):
    out = phantom.generate(tmp_path / "ph", n=4, seed=0, width=64, height=80)
    png = out / "boneage-training-dataset/1377.png"
    before = png.stat().st_mtime_ns
    assert phantom.generate(tmp_path / "ph", n=4, seed=0, width=64, height=80) == out
    assert png.stat().st_mtime_ns == before

    with pytest.raises(InputError, match="ph"):
        phantom.generate(tmp_path / "ph", n=5, seed=0, width=64, height=80)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("mine")
    with pytest.raises(InputError, match="foreign"):
        phantom.generate(foreign, n=4, seed=0, width=64, height=80)
    assert (foreign / "x.txt").read_text() == "mine"


def test_age_drives_anatomy():
    young = phantom.render_hand(24, True, np.random.default_rng(5), 128, 160).astype(float)
    old = phantom.render_hand(200, True, np.random.default_rng(5), 128, 160).astype(float)
    assert young.shape == (160, 128)
    assert np.abs(young - old).mean() > 5  # same nuisance draws, different anatomy

    # Growth plates: an open plate cuts a cap off its shaft, so the bone mask falls into many more
    # pieces before fusion (16 y in boys, 14 y in girls) than after it.
    def pieces(age, male, seed):
        img = phantom.render_hand(age, male, np.random.default_rng(seed), 128, 160)
        hand = img[img > _otsu(img)]
        return ndimage.label(img > _otsu(hand))[1]

    def mean_pieces(age, male):
        return np.mean([pieces(age, male, seed) for seed in range(6)])

    assert mean_pieces(185, True) > mean_pieces(196, True) + 8  # a boy fuses at 16 y
    assert mean_pieces(160, False) > mean_pieces(175, False) + 8  # a girl at 14 y
    assert mean_pieces(175, True) > mean_pieces(175, False) + 8  # same age: the girl is ahead


def _otsu(img):
    """Threshold that best splits the histogram in two (background vs hand)."""
    p = np.bincount(img.ravel(), minlength=256) / img.size
    w, mu = np.cumsum(p), np.cumsum(p * np.arange(256))
    between = (mu[-1] * w - mu) ** 2 / np.maximum(w * (1 - w), 1e-12)
    return int(np.argmax(between))


def test_histogram_and_area_do_not_predict_age():
    """A linear model on the intensity histogram + foreground area must do little better than
    predicting the mean age: age has to be read from shape, not from brightness or size."""
    features, ages = [], []
    for i in range(400):
        age, male, img = phantom._label_and_image(11, 0, i, 128, 160)
        fg = (img > _otsu(img)).mean()
        assert 0.05 < fg < 0.8, f"image {i} looks blank or flooded (foreground {fg:.2f})"
        features.append(np.r_[np.bincount(img.ravel() // 8, minlength=32) / img.size, fg])
        ages.append(age)
    X, y = np.array(features), np.array(ages, float)
    assert 110 < y.mean() < 145 and 30 < y.std() < 50  # RSNA-like labels

    ridge_err, mean_err = [], []
    for train, held in KFold(5, shuffle=True, random_state=0).split(X):
        model = RidgeCV(alphas=np.logspace(-6, 3, 30)).fit(X[train], y[train])
        ridge_err.append(np.abs(model.predict(X[held]) - y[held]))
        mean_err.append(np.abs(y[train].mean() - y[held]))
    ratio = np.concatenate(ridge_err).mean() / np.concatenate(mean_err).mean()
    assert ratio >= 0.7, f"histogram+area predict age too well: ridge/mean MAE = {ratio:.2f}"
