"""Tests for boneage.data: layouts, every bad-input case, image formats, splitting, fingerprints."""

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from boneage import data
from boneage.data import IMAGE_COLUMNS, check_image_file, find_image_dir, load_table, load_test_csv
from boneage.splits import fingerprint, save_split, split_table
from boneage.errors import InputError

TRAIN_CSV = "boneage-training-dataset.csv"
GOOD = [("1", 100, True), ("2", 50, False), ("3", 200, True), ("4", 12.5, False)]


def png(path, mode="L", size=(16, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(len(str(path))).integers(0, 255, (size[1], size[0]), dtype=np.uint8)
    im = Image.fromarray(arr).convert(mode) if mode not in ("I;16",) else \
        Image.fromarray(arr.astype(np.uint16) * 257)
    im.save(path, "PNG")
    return path


def training_root(tmp_path, rows=GOOD, nested=False, csv_text=None, images=True):
    """A training root with `rows` (id, age, male) in the CSV and a small PNG per id."""
    folder = tmp_path / "boneage-training-dataset"
    if nested:
        folder = folder / "boneage-training-dataset"
    folder.mkdir(parents=True)
    text = csv_text if csv_text is not None else \
        "id,boneage,male\n" + "".join(f"{i},{a},{m}\n" for i, a, m in rows)
    (tmp_path / TRAIN_CSV).write_text(text)
    if images:
        for i, *_ in rows:
            png(folder / f"{str(i).strip()}.png")
    return tmp_path, folder


def test_table_training_flat_and_nested(tmp_path):
    for nested in (False, True):
        root, folder = training_root(tmp_path / str(nested), nested=nested)
        assert find_image_dir(root, "training") == folder
        frame = load_table(root)
        assert tuple(frame.columns) == IMAGE_COLUMNS
        assert list(frame["id"]) == ["1", "2", "3", "4"]
        assert list(frame["boneage"]) == [100.0, 50.0, 200.0, 12.5]
        assert list(frame["male"]) == [True, False, True, False]
        assert frame["male"].dtype == bool and frame["boneage"].dtype == float
        assert all(Path(p).is_absolute() and Path(p).is_file() for p in frame["path"])


def test_find_image_dir_prefers_folder_with_pngs_and_names_root(tmp_path):
    root, folder = training_root(tmp_path, nested=False)
    (folder / "boneage-training-dataset").mkdir()  # empty nested folder: flat one holds the PNGs
    assert find_image_dir(root, "training") == folder
    with pytest.raises(InputError, match=str(root)):
        find_image_dir(root, "test")
    with pytest.raises(InputError, match="training"):
        find_image_dir(root, "validation")


def test_ids_stripped_and_male_spellings(tmp_path):
    text = "id , boneage ,male\n 1 ,100,TRUE\n2, 50 ,false\n3,200,1\n4,12.5, 0\n\n"
    root, _ = training_root(tmp_path, csv_text=text)
    frame = load_table(root)
    assert list(frame["id"]) == ["1", "2", "3", "4"]
    assert list(frame["male"]) == [True, False, True, False]


def test_float_looking_ids_are_named(tmp_path):
    root, folder = training_root(tmp_path, csv_text="id,boneage,male\n1.0,100,True\nab-7,10,False\n",
                                 images=False)
    png(folder / "1.png"), png(folder / "ab-7.png")  # a non-integer id is fine when its file exists
    expected = r"id written as a float \(1 row\): row 2 \(id 1.0; the image is 1.png\)"
    with pytest.raises(InputError, match=expected) as e:
        load_table(root)
    assert "row 3" not in str(e.value)


def test_table(tmp_path):
    root = tmp_path
    for i in ("10", "11", "12"):
        png(root / "boneage-test-dataset" / "boneage-test-dataset" / f"{i}.png")
    (root / "boneage-test-dataset.csv").write_text("Case ID,Sex\n10,M\n11,f\n12,F\n")
    frame = load_table(root, "test")
    assert tuple(frame.columns) == IMAGE_COLUMNS
    assert frame["boneage"].isna().all() and list(frame["male"]) == [True, False, False]
    labels = "id,boneage,male\n12,30,False\n10,120,True\n11,60,False\n"
    (root / "boneage-test-labels.csv").write_text(labels)
    frame = load_table(root, "test")  # labels found next to the CSV
    assert list(frame["boneage"]) == [120.0, 60.0, 30.0]
    other = tmp_path / "elsewhere.csv"
    other.write_text("id,boneage,male\n10,1,True\n11,2,False\n12,3,False\n")
    assert list(load_table(root, "test", labels_csv=other)["boneage"]) == [1.0, 2.0, 3.0]


def test_test_labels_mismatch_both_ways(tmp_path):
    root = tmp_path
    for i in ("10", "11"):
        png(root / "boneage-test-dataset" / f"{i}.png")
    (root / "boneage-test-dataset.csv").write_text("Case ID,Sex\n10,M\n11,F\n")
    labels = root / "boneage-test-labels.csv"
    labels.write_text("id,boneage,male\n10,120,False\n99,60,False\n")
    with pytest.raises(InputError) as e:
        load_table(root, "test")
    msg = str(e.value)
    assert f"{root / 'boneage-test-dataset.csv'}: 2 invalid rows" in msg
    assert "no label in boneage-test-labels.csv (1 row): row 3 (id 11)" in msg
    assert "Sex differs from male in boneage-test-labels.csv (1 row): row 2" in msg
    assert f"{labels}: 1 invalid row" in msg
    assert "id not in boneage-test-dataset.csv (1 row): row 3 (id 99)" in msg
    with pytest.raises(InputError, match="no valid rows left"):
        load_table(root, "test", drop_invalid=True, report=lambda m: None)
    (root / "boneage-test-dataset.csv").write_text("Case ID,Sex\n10,F\n11,F\n")
    reports = []
    frame = load_table(root, "test", drop_invalid=True, report=reports.append)
    assert list(frame["id"]) == ["10"] and list(frame["boneage"]) == [120.0]
    assert reports == [f"{root / 'boneage-test-dataset.csv'}: dropped 1 of 2 rows "
                       "(1 no label in boneage-test-labels.csv); "
                       f"{labels}: ignored 1 row (1 id not in boneage-test-dataset.csv); 1 row left."]
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'nope.csv'}: CSV file not found")):
        load_table(root, "test", labels_csv=tmp_path / "nope.csv")


def test_load_test_csv_anywhere_and_check_image_file(tmp_path):
    images = tmp_path / "pics"
    png(images / "7.png"), png(images / "8.png", size=(4, 4))
    csv_path = tmp_path / "cases.csv"
    csv_path.write_text("Case ID,Sex\n7,F\n")
    frame = load_test_csv(csv_path, images)
    assert list(frame["id"]) == ["7"] and frame["boneage"].isna().all()
    with pytest.raises(InputError, match="image folder"):
        load_test_csv(csv_path, tmp_path / "nope")
    assert check_image_file(images / "7.png") is None
    assert check_image_file(images / "8.png") == "image smaller than 8x8 (4x4)"
    assert check_image_file(images / "9.png") == "missing image"


def test_missing_csv_column_and_empty(tmp_path):
    root, _ = training_root(tmp_path)
    (root / TRAIN_CSV).unlink()
    csv_path = re.escape(str(root / TRAIN_CSV))
    with pytest.raises(InputError, match=f"{csv_path}: CSV file not found"):
        load_table(root)
    (root / TRAIN_CSV).write_text("id,age,male\n1,100,True\n")
    with pytest.raises(InputError, match=rf"{csv_path}: missing column 'boneage' \(found 'id', 'age'"):
        load_table(root)
    (root / TRAIN_CSV).write_text("")
    with pytest.raises(InputError, match=f"{csv_path}: CSV file is empty"):
        load_table(root)
    (root / TRAIN_CSV).write_bytes(b"id,boneage,male\n1,\xff\xfe,True\n")
    with pytest.raises(InputError, match=f"{csv_path}: cannot read CSV"):
        load_table(root)
    (root / TRAIN_CSV).write_text("id,boneage,male\n1,100,True\n2,50\n")  # short row
    with pytest.raises(InputError, match=r"male not True/False/1/0 \(1 row\): row 3 ''"):
        load_table(root)
    (root / TRAIN_CSV).write_text("id,boneage,male\n\n")
    with pytest.raises(InputError, match="header but no rows"):
        load_table(root)
    (root / "boneage-test-dataset").mkdir()
    png(root / "boneage-test-dataset" / "1.png")
    (root / "boneage-test-dataset.csv").write_text("Case ID,Gender\n1,M\n")
    with pytest.raises(InputError, match="missing column 'Sex'"):
        load_table(root, "test")
    with pytest.raises(InputError, match="not a folder"):
        load_table(root / "nope")


def _break(kind, folder):
    """Damage image 3.png (CSV row 4) in one way."""
    path = folder / "3.png"
    if kind == "missing":
        path.unlink()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        png(path, size=(64, 64))
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "text":
        path.write_text("id,boneage,male\nnot an image\n")
    elif kind == "tiny":
        png(path, size=(4, 8))
    elif kind == "jpeg":
        Image.new("L", (16, 16)).save(path, "JPEG")


BAD_ROWS = [  # (row 4 of the CSV is id 3: its age, male, or image), expected reason, detail
    ("age", "abc", "age not a number", "row 4 'abc'"),
    ("age", "", "age missing", "row 4 ''"),
    ("age", "NaN", "age missing", "row 4 'NaN'"),
    ("age", "-1", "age out of range 0..240 months", "row 4 '-1'"),
    ("age", "240.5", "age out of range 0..240 months", "row 4 '240.5'"),
    ("male", "yes", "male not True/False/1/0", "row 4 'yes'"),
    ("id", "1", "duplicate id", "row 2 (id 1)"),
    ("id", "", "id missing", "row 4"),
    ("image", "missing", "missing image", "3.png"),
    ("image", "empty", "empty image file (0 bytes)", "3.png"),
    ("image", "truncated", "unreadable image (truncated or not an image)", "3.png"),
    ("image", "text", "unreadable image (truncated or not an image)", "3.png"),
    ("image", "tiny", "image smaller than 8x8", "3.png (4x8)"),
    ("image", "jpeg", "not a PNG image", "3.png (JPEG)"),
]


@pytest.mark.parametrize("field,value,reason,detail", BAD_ROWS)
def test_each_bad_input_is_named(tmp_path, field, value, reason, detail):
    rows = [list(r) for r in GOOD]
    index = {"id": 0, "age": 1, "male": 2}.get(field)
    if index is not None:
        rows[2][index] = value
    root, folder = training_root(tmp_path, rows)
    if field == "id" and value == "":
        png(folder / "3.png")
    if field == "image":
        _break(value, folder)
    with pytest.raises(InputError) as e:
        load_table(root)
    msg = str(e.value)
    expected_rows = 2 if reason == "duplicate id" else 1
    assert f"{root / TRAIN_CSV}: {expected_rows} invalid row" in msg
    assert f"  {reason} (" in msg and detail in msg, msg
    if field == "image":
        assert str(folder / "3.png") in msg
    assert "drop_invalid" in msg
    reports = []
    frame = load_table(root, drop_invalid=True, report=reports.append)
    kept = {"1", "2", "4"} if expected_rows == 1 else {"2", "4"}
    if field == "id" and value == "1":
        kept = {"2", "4"}  # both rows of a duplicated id go
    assert set(frame["id"]) == kept
    assert len(reports) == 1 and f"dropped {4 - len(kept)} of 4 rows" in reports[0]
    assert f"{expected_rows} {reason}" in reports[0]


def test_all_problems_listed_at_once_and_dropped_by_reason(tmp_path):
    rows = [(str(i), 100, True) for i in range(1, 21)]
    rows[1] = ("2", "x", True)  # row 3
    rows[5] = ("6", "y", "maybe")  # row 7: two problems, one row
    rows[9] = ("10", 999, False)  # row 11
    root, folder = training_root(tmp_path, rows)
    for i in range(12, 20):  # rows 13..20: eight missing images
        (folder / f"{i}.png").unlink()
    (folder / "20.png").write_bytes(b"")  # row 21
    with pytest.raises(InputError) as e:
        load_table(root)
    msg = str(e.value)
    assert msg.startswith(f"{root / TRAIN_CSV}: 12 invalid rows\n")
    assert "  age not a number (2 rows): row 3 'x', row 7 'y'\n" in msg
    assert "  male not True/False/1/0 (1 row): row 7 'maybe'\n" in msg
    assert "  age out of range 0..240 months (1 row): row 11 '999'\n" in msg
    assert f"  missing image (8 files): {folder / '12.png'}, " in msg
    assert "(and 3 more; 8 in all)" in msg
    assert f"  empty image file (0 bytes) (1 file): {folder / '20.png'}\n" in msg
    reports = []
    frame = load_table(root, drop_invalid=True, report=reports.append)
    assert list(frame["id"]) == ["1", "3", "4", "5", "7", "8", "9", "11"]
    assert reports == [f"{root / TRAIN_CSV}: dropped 12 of 20 rows (2 age not a number, "
                       "1 male not True/False/1/0, 1 age out of range 0..240 months, "
                       "8 missing image, 1 empty image file (0 bytes)); 8 rows left."]


def test_drop_invalid_with_nothing_left(tmp_path):
    root, _ = training_root(tmp_path, [("1", -5, True)])
    with pytest.raises(InputError, match="no valid rows left"):
        load_table(root, drop_invalid=True, report=lambda m: None)


def test_check_images_false_only_checks_existence(tmp_path):
    root, folder = training_root(tmp_path)
    _break("truncated", folder)
    assert len(load_table(root, check_images=False)) == 4
    (folder / "4.png").unlink()
    with pytest.raises(InputError, match="missing image"):
        load_table(root, check_images=False)


@pytest.mark.parametrize("mode", ["L", "I;16", "P", "RGB", "RGBA", "LA"])
def test_image_formats_pass(tmp_path, mode):
    root, folder = training_root(tmp_path)
    png(folder / "3.png", mode=mode, size=(30, 9))
    with Image.open(folder / "3.png") as im:
        assert im.mode == mode
    assert len(load_table(root)) == 4


def test_progress_reported_for_big_sets(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "PROGRESS_OVER", 10)
    rows = [(str(i), 100, True) for i in range(40)]
    root, _ = training_root(tmp_path, rows)
    reports = []
    load_table(root, report=reports.append)
    assert reports[0].startswith("checking 40 images")
    assert [r.split("(")[-1] for r in reports[1:]] == ["25%)", "50%)", "75%)", "100%)"]


def synthetic(n, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"id": [str(i) for i in range(n)], "path": [f"/x/{i}.png" for i in range(n)],
                         "boneage": rng.integers(1, 229, n).astype(float),
                         "male": rng.random(n) < 0.54})


def test_split_deterministic_disjoint_complete_and_stratified():
    frame = synthetic(2000)
    train, val, test = split_table(frame, 0.15, 0.15, seed=7)
    again = split_table(frame, 0.15, 0.15, seed=7)
    assert all(a.equals(b) for a, b in zip((train, val, test), again))
    assert not split_table(frame, 0.15, 0.15, seed=8)[1].equals(val)
    ids = [set(p["id"]) for p in (train, val, test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert ids[0] | ids[1] | ids[2] == set(frame["id"])
    assert (len(train), len(val), len(test)) == (1400, 300, 300)
    assert tuple(train.columns) == IMAGE_COLUMNS
    for part in (val, test):
        assert abs(part["male"].mean() - frame["male"].mean()) < 0.02
        assert abs(part["boneage"].mean() - frame["boneage"].mean()) < 4
        for q in (0.2, 0.4, 0.6, 0.8):
            assert abs(part["boneage"].quantile(q) - frame["boneage"].quantile(q)) < 8


def test_split_tiny_singleton_and_zero_test():
    frame = synthetic(40, seed=1)
    parts = split_table(frame, 0.2, 0.2, seed=0)
    assert [len(p) for p in parts] == [24, 8, 8]
    odd = synthetic(30, seed=2)
    odd.loc[0, ["boneage", "male"]] = [239.0, False]  # the only old girl
    odd.loc[1:, "male"] = True
    train, val, test = split_table(odd, 0.2, 0.1, seed=3)
    assert sorted(pd.concat([train, val, test])["id"], key=int) == list(odd["id"])
    train, val, test = split_table(frame, 0.25, 0, seed=0)
    assert (len(train), len(val), len(test)) == (30, 10, 0)
    assert tuple(test.columns) == IMAGE_COLUMNS
    assert len(split_table(synthetic(3), 0.3, 0.3, seed=0)[0]) == 1


@pytest.mark.parametrize("val,test,match", [(0.5, 0.5, "below 1"), (-0.1, 0, "val_fraction"),
                                            (0.2, "0.1", "test_fraction")])
def test_split_bad_fractions(val, test, match):
    with pytest.raises(InputError, match=match):
        split_table(synthetic(100), val, test, seed=0)


def test_split_too_few_rows():
    with pytest.raises(InputError, match="2 images are too few"):
        split_table(synthetic(2), 0.2, 0.2, seed=0)


def test_fingerprint_and_save_split(tmp_path):
    root, folder = training_root(tmp_path)
    frame = load_table(root)
    fp = fingerprint(frame)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fingerprint(frame.iloc[::-1]) == fp
    changed = frame.copy()
    changed.loc[0, "boneage"] = 101.0
    assert fingerprint(changed) != fp
    png(folder / "2.png", size=(40, 40))
    assert fingerprint(frame) != fp
    train, val, test = split_table(frame, 0.25, 0, seed=0)
    out = tmp_path / "run" / "x"
    save_split({"train": train, "val": val, "test": test}, out)
    assert sorted(os.listdir(out)) == ["split_test.csv", "split_train.csv", "split_val.csv"]
    back = pd.read_csv(out / "split_train.csv", dtype={"id": str})
    assert list(back.columns) == ["id", "boneage", "male"]
    assert list(back["id"]) == list(train["id"]) and list(back["male"]) == list(train["male"])
    assert pd.read_csv(out / "split_test.csv").empty


SAMPLE = os.environ.get("BONEAGE_SAMPLE_DATA")


@pytest.mark.skipif(not SAMPLE, reason="set BONEAGE_SAMPLE_DATA to the rsna-sample folder")
def test_real_sample_data():
    train = load_table(SAMPLE)
    assert len(train) == 40 and train["male"].sum() == 26
    assert {"1578", "2110"} <= set(train["id"])  # palette PNGs pass
    assert train["boneage"].between(24, 216).all()
    test = load_table(SAMPLE, "test")
    assert len(test) == 20 and test["boneage"].notna().all() and "4533" in set(test["id"])
    parts = split_table(train, 0.2, 0.2, seed=0)
    assert [len(p) for p in parts] == [24, 8, 8]


FULL_100PX = os.environ.get("BONEAGE_RSNA_100PX")


@pytest.mark.skipif(not FULL_100PX, reason="set BONEAGE_RSNA_100PX to the rsna-100px folder")
def test_all_real_training_images_in_the_nested_layout():
    """All 12,611 challenge images, in Kaggle's nested folder, checked and split."""
    frame = load_table(FULL_100PX, report=lambda message: None)
    assert len(frame) == 12611 and frame["id"].is_unique
    assert find_image_dir(FULL_100PX, "training").name == find_image_dir(FULL_100PX, "training").parent.name
    train, val, test = split_table(frame, 0.15, 0.15, seed=0)
    assert abs(train["male"].mean() - test["male"].mean()) < 0.01
    assert abs(train["boneage"].mean() - val["boneage"].mean()) < 1.0
