"""Bad input through the real command lines, as one table: each case must give ONE clear message
naming the file, row or key, exit status 2, no traceback, and leave nothing behind; each valid
variant (16-bit, RGBA, palette PNGs, an empty YAML section filled by --set) loads instead.

Cases that fail before TensorFlow is imported run as real subprocesses (`python -m boneage`,
`python -m tuning.search`); the training-data cases go through `boneage.cli.main(argv)` in this
process, because `train` imports TensorFlow (seconds per subprocess) before it reads the data.
"""
import json
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

TRAIN_CSV = "boneage-training-dataset.csv"
GOOD_ROWS = "id,boneage,male\n1,100,True\n2,50,False\n3,200,True\n4,12.5,False\n"


# --- building bad files ----------------------------------------------------------------------

def grey(path, size=(24, 32), seed=0):
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0]), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, "PNG")
    return path


def png_declaring(path, width, height):
    """A valid-looking PNG of ~100 bytes whose header declares width x height pixels."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b""))
    return path


def damage(path, how):
    if how == "missing":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        raw = grey(path, size=(64, 64)).read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "jpeg":
        Image.new("L", (16, 16)).save(path, "JPEG")
    elif how == "text":
        path.write_text("Case ID,Sex\n1,M\n")
    elif how == "1x1":
        grey(path, size=(1, 1))
    elif how == "bomb":  # 20000 x 20000 = 400 M pixels: PIL's own limit would raise here
        png_declaring(path, 20000, 20000)
    elif how == "bomb-under-pil":  # 81 M pixels: PIL only warns, our limit refuses it
        png_declaring(path, 9000, 9000)
    return path


def training_root(tmp, csv_text=GOOD_ROWS):
    """An RSNA-layout folder with a training CSV and one small PNG per id 1..4."""
    root = tmp / "data"
    for i in range(1, 5):
        grey(root / "boneage-training-dataset" / f"{i}.png", seed=i)
    (root / TRAIN_CSV).write_text(csv_text)
    return root


def with_row3(field, value):
    """GOOD_ROWS with one field of CSV row 3 (id 2) replaced."""
    lines = GOOD_ROWS.splitlines()
    cells = lines[2].split(",")
    cells[{"id": 0, "age": 1, "male": 2}[field]] = value
    lines[2] = ",".join(cells)
    return "\n".join(lines) + "\n"


# --- the cases -------------------------------------------------------------------------------

@dataclass
class Case:
    """`make(tmp, model)` builds the input and returns (command, argv, {name: text expected in the
    message}); command is "boneage" or "tuning.search"; in_process only for `train` data cases."""
    name: str
    make: Callable
    in_process: bool = False


def train_data(csv_text=GOOD_ROWS, image=None, how=None):
    def make(tmp, model):
        root = training_root(tmp, csv_text)
        expect = {"csv": str(root / TRAIN_CSV)}
        if image:
            expect["file"] = str(damage(root / "boneage-training-dataset" / f"{image}.png", how))
        return "boneage", ["train", "--set", f"data.root={root}", "--set", "model.weights=none",
                           "--out", str(tmp / "run")], expect
    return make


def csv_case(csv_text, *expected):
    def make(tmp, model):
        command, argv, expect = train_data(csv_text)(tmp, model)
        return command, argv, {**expect, **{e: e for e in expected}}
    return make


def image_case(how, *expected, training=False):
    """A damaged image: through the training data check, or through `predict FILE`."""
    def make(tmp, model):
        if training:
            command, argv, expect = train_data(image=2, how=how)(tmp, model)
        else:
            path = damage(grey(tmp / "hand.png"), how)
            command, argv, expect = "boneage", ["predict", model, str(path), "--sex", "F"], {"file": str(path)}
        return command, argv, {**expect, **{e: e for e in expected}}
    return make


def config_case(yaml_text, *argv_and_expected, search=False):
    """A config file (and --set overrides), through `train` or `tuning.search` before any work."""
    overrides = [a for a in argv_and_expected if a.startswith("--set=")]
    expected = [a for a in argv_and_expected if not a.startswith("--set=")]

    def make(tmp, model):
        path = tmp / "config.yaml"
        path.write_text(yaml_text)
        argv = (["--config", str(path)] if search else ["train", "--config", str(path), "--out", str(tmp / "run")])
        argv += [part for o in overrides for part in ("--set", o[len("--set="):])]
        return "tuning.search" if search else "boneage", argv, {e: e for e in expected}
    return make


def cli_case(argv_of, *expected, command="boneage"):
    def make(tmp, model):
        argv = argv_of(tmp, model)
        return command, argv, {e: e.format(tmp=tmp, model=model) for e in expected}
    return make


def case_images(tmp):
    images = tmp / "images"
    for i in (1, 2):
        grey(images / f"{i}.png", seed=i)
    return images


def predict_csv_with_sex_x(tmp, model):
    (tmp / "cases.csv").write_text("Case ID,Sex\n1,M\n2,X\n")
    return ["predict", model, "--csv", str(tmp / "cases.csv"), "--images", str(case_images(tmp)),
            "--out", str(tmp / "predictions.csv")]


def export_a_text_file(tmp, model):
    (tmp / "m.keras").write_text("not a model")
    return ["export", str(tmp / "m.keras"), "--out", str(tmp / "export")]


SEARCH_YAML = "tune:\n  space:\n    learning_rate: {loguniform: [1.0e-4, 1.0e-2]}\n"

CASES = [
    # CSV: the training table, through the data check that `train` runs first
    Case("csv-missing-column", csv_case("id,age,male\n1,100,True\n", "missing column 'boneage'"), True),
    Case("csv-age-not-a-number", csv_case(with_row3("age", "abc"), "age not a number", "row 3 'abc'"), True),
    Case("csv-age-negative", csv_case(with_row3("age", "-3"), "age out of range 0..240", "row 3 '-3'"), True),
    Case("csv-age-over-240", csv_case(with_row3("age", "241"), "age out of range 0..240", "row 3 '241'"), True),
    Case("csv-age-nan", csv_case(with_row3("age", "NaN"), "age missing", "row 3 'NaN'"), True),
    Case("csv-duplicate-id", csv_case(with_row3("id", "1"), "duplicate id", "row 2 (id 1)", "row 3 (id 1)"), True),
    Case("csv-male-unreadable", csv_case(with_row3("male", "yes"), "male not True/False/1/0", "row 3 'yes'"), True),
    Case("csv-empty-file", csv_case("", "CSV file is empty"), True),
    Case("csv-header-only", csv_case("id,boneage,male\n", "header but no rows"), True),
    Case("csv-wrong-delimiter", csv_case(GOOD_ROWS.replace(",", ";"), "separated by ';'"), True),
    Case("csv-test-sex-unreadable", cli_case(predict_csv_with_sex_x, "{tmp}/cases.csv", "Sex not M/F", "row 3 'X'")),
    # images: in the training data check and in `predict FILE`
    Case("image-missing-training", image_case("missing", "missing image", training=True), True),
    Case("image-zero-bytes-training", image_case("empty", "empty image file (0 bytes)", training=True), True),
    Case("image-not-png-training", image_case("jpeg", "not a PNG image", "(JPEG)", training=True), True),
    Case("image-bomb-training", image_case("bomb-under-pil", "image larger than 50,000,000 pixels",
                                           "(9000x9000)", training=True), True),
    Case("image-missing", image_case("missing", "missing image")),
    Case("image-zero-bytes", image_case("empty", "empty image file")),
    Case("image-truncated", image_case("truncated", "unreadable image (truncated or not an image)")),
    Case("image-not-png", image_case("jpeg", "not a PNG image")),
    Case("image-text-file", image_case("text", "unreadable image")),
    Case("image-1x1", image_case("1x1", "image smaller than 8x8 (1x1)")),
    Case("image-decompression-bomb", image_case("bomb", "image larger than 50,000,000 pixels", "(20000x20000)")),
    # config: file keys, --set values, the search space
    Case("config-unknown-key", config_case("train:\n  learnig_rate: 0.1\n", "train.learnig_rate", "unknown config key")),
    Case("config-wrong-type", config_case("train:\n  epochs: two\n", "train.epochs", "expected an integer")),
    Case("config-nan-set", config_case("", "--set=train.learning_rate=nan", "train.learning_rate", "finite")),
    Case("config-nan-yaml", config_case("model:\n  dropout: .nan\n", "model.dropout", "finite")),
    Case("config-inf-set", config_case("", "--set=model.dropout=.inf", "model.dropout", "finite")),
    Case("config-inf-unbounded", config_case(SEARCH_YAML, "--set=tune.time_budget_s=inf", "tune.time_budget_s",
                                             "finite", search=True)),
    Case("config-out-of-range", config_case("model:\n  frozen_layers: 15\n", "model.frozen_layers", "between 0 and 14")),
    Case("config-low-above-high", config_case(
        "tune:\n  space:\n    learning_rate: {loguniform: [1.0e-2, 1.0e-4]}\n",
        "tune.space.learning_rate", "greater than high", search=True)),
    Case("config-unknown-distribution", config_case(
        "tune:\n  space:\n    learning_rate: {normal: [0.001, 0.0001]}\n",
        "tune.space.learning_rate", "expected one of", search=True)),
    Case("config-nan-bound", config_case(
        "tune:\n  space:\n    dropout: {uniform: [0.0, .nan]}\n", "tune.space.dropout", "finite", search=True)),
    Case("config-set-below-a-value", config_case("train:\n  epochs: 2\n", "--set=train.epochs.max=3",
                                                 "train.epochs is a value (2), not a section")),
    Case("config-not-yaml", config_case("train: [epochs: 1\n", "config.yaml", "not valid YAML")),
    # CLI: flags and paths
    Case("cli-unknown-flag", cli_case(lambda tmp, model: ["train", "--bogus"],
                                      "python -m boneage train: error: unrecognized arguments: --bogus")),
    Case("cli-sex-x", cli_case(lambda tmp, model: ["predict", model, str(grey(tmp / "a.png")), "--sex", "X"],
                               "argument --sex", "invalid choice: 'X'")),
    Case("cli-sex-missing", cli_case(lambda tmp, model: ["predict", model, str(grey(tmp / "a.png"))], "--sex M")),
    Case("cli-missing-config", cli_case(lambda tmp, model: ["train", "--config", str(tmp / "nope.yaml")],
                                        "config file not found: {tmp}/nope.yaml")),
    Case("cli-missing-model", cli_case(lambda tmp, model: ["predict", str(tmp / "nope"), str(grey(tmp / "a.png")),
                                                           "--sex", "F"], "no model at {tmp}/nope")),
    Case("cli-model-not-keras", cli_case(export_a_text_file, "{tmp}/m.keras", "not a .keras file")),
    Case("cli-missing-csv", cli_case(lambda tmp, model: ["predict", model, "--csv", str(tmp / "nope.csv"),
                                                         "--images", str(case_images(tmp))],
                                     "{tmp}/nope.csv: CSV file not found")),
    Case("cli-search-unknown-flag", cli_case(lambda tmp, model: ["--config", "x.yaml", "--bogus"],
                                             "unrecognized arguments: --bogus", command="tuning.search")),
    Case("cli-search-no-config", cli_case(lambda tmp, model: [], "--config is required", command="tuning.search")),
]


def _files(folder: Path) -> set:
    return {p.relative_to(folder) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def model_dir(trained_run) -> str:
    return str(trained_run[0] / "export")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_clearly(case, tmp_path, model_dir, capsys):
    work = tmp_path / "work"
    work.mkdir()
    command, argv, expected = case.make(work, model_dir)
    before = _files(work)
    if case.in_process:
        from boneage.cli import main

        capsys.readouterr()
        status = main(argv)  # an exception escaping here fails the test: it would be a traceback
        stderr = capsys.readouterr().err
    else:
        proc = subprocess.run([sys.executable, "-m", command, *argv], capture_output=True, text=True,
                              timeout=120, cwd=work)
        status, stderr = proc.returncode, proc.stderr
    assert status == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert stderr.count("error:") == 1, stderr  # one message (argparse adds only its usage line)
    for text in expected.values():
        assert text in stderr, f"{text!r} not in:\n{stderr}"
    assert _files(work) == before, "a refused command left files behind"


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30 and len({c.name for c in CASES}) == len(CASES)


# --- valid variants load instead -------------------------------------------------------------

def test_png_variants_predict_like_the_8_bit_grey_image(tmp_path, model_dir, phantom_root, capsys):
    """16-bit, RGBA, palette and grey+alpha versions of one radiograph are accepted by the data
    check and `predict`, and give the 8-bit grey image's prediction."""
    from boneage import data
    from boneage.cli import main

    source = sorted((phantom_root / "boneage-training-dataset").glob("*.png"))[0]
    with Image.open(source) as im:
        grey8 = np.asarray(im.convert("L"))
    variants = {
        "grey8": Image.fromarray(grey8),
        "grey16": Image.fromarray(grey8.astype(np.uint16) * 257),
        "rgba": Image.fromarray(grey8).convert("RGBA"),
        "palette": Image.fromarray(grey8).convert("P"),
        "grey_alpha": Image.fromarray(grey8).convert("LA"),
    }
    paths = []
    for name, image in variants.items():
        image.save(tmp_path / f"{name}.png", "PNG")
        paths.append(str(tmp_path / f"{name}.png"))
        assert data.check_image_file(paths[-1]) is None, name
    with Image.open(tmp_path / "grey16.png") as im, Image.open(tmp_path / "palette.png") as pal:
        assert im.mode in ("I;16", "I") and pal.mode == "P"
    capsys.readouterr()
    assert main(["predict", model_dir, *paths, "--sex", "F", "--format", "json"]) == 0
    months = {Path(r["image"]).stem: r["months"] for r in json.loads(capsys.readouterr().out)}
    assert set(months) == set(variants) and all(np.isfinite(list(months.values())))
    for name, value in months.items():
        assert abs(value - months["grey8"]) < 0.5, months


def test_valid_csv_spellings_and_an_image_at_the_pixel_limit(tmp_path):
    from boneage import data

    root = training_root(tmp_path, "\ufeffid , boneage ,male\n1,100,TRUE\n\n2, 50 ,false\n3,200,1\n4,12.5, 0\n")
    png_declaring(root / "boneage-training-dataset" / "3.png", 5000, 10000)  # exactly 50 M pixels
    frame = data.load_table(root, report=None)
    assert list(frame["id"]) == ["1", "2", "3", "4"] and list(frame["male"]) == [True, False, True, False]
    png_declaring(root / "boneage-training-dataset" / "3.png", 5001, 10000)
    with pytest.raises(data.InputError, match=r"image larger than 50,000,000 pixels .* \(5001x10000\)"):
        data.load_table(root, report=None)


def test_set_fills_a_section_the_yaml_left_empty(tmp_path):
    from boneage.config import load_config
    from tuning.config import load_search_config

    path = tmp_path / "c.yaml"
    path.write_text("data:\ntrain:\n")
    cfg = load_config(path, ["train.epochs=3", "data.root=/x"])
    assert cfg.train.epochs == 3 and cfg.data.root == "/x"
    path.write_text("train:\ntune:\n  resources:\n  space:\n    learning_rate: {loguniform: [1.0e-4, 1.0e-2]}\n")
    cfg = load_search_config(path, ["tune.resources.cpu=2", "train.learning_rate=1e-3"])
    assert cfg.tune.resources.cpu == 2.0 and cfg.train.learning_rate == pytest.approx(1e-3)
