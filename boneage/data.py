"""Read and check the RSNA Pediatric Bone Age tables.

The data comes as Kaggle's "rsna-bone-age" ships it: a CSV of labels and a folder of `{id}.png`
radiographs, the folder either flat or nested one level deeper (as in Kaggle's archive):

    <root>/boneage-training-dataset.csv    id,boneage,male   (male: True/False, true/false, 1/0)
    <root>/boneage-training-dataset[/boneage-training-dataset]/{id}.png
    <root>/boneage-test-dataset.csv        Case ID,Sex       (Sex: M/F)
    <root>/boneage-test-dataset[/boneage-test-dataset]/{id}.png
    <root>/boneage-test-labels.csv         id,boneage,male   (optional labels for the test set)

`load_table` checks every row and image before any training (columns, ages in 0..240 months,
sexes, duplicate ids, test ids vs labels, missing/empty/truncated/non-PNG/tiny/huge images) and returns
the IMAGE_COLUMNS frame every other module uses. All problems come back in ONE InputError naming the
CSV, its rows (line numbers as an editor shows them, header = line 1) and files; with
drop_invalid=True the bad rows are dropped and one report line says how many and why.

    frame = load_table(root, drop_invalid=drop)                  # or part="test"

(splitting, saving splits and fingerprints are in `boneage.splits`).

`load_test_csv` does the same for a `Case ID,Sex` CSV and image folder anywhere (predict), and
`check_image_file` checks one loose image. An image declaring more than MAX_IMAGE_PIXELS pixels
is refused from its PNG header, before anything decodes it (a few bytes can declare gigapixels).
"""

import csv
import math
import os
import re
import struct
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pandas as pd
from PIL import Image

from boneage.errors import InputError, summarize

IMAGE_COLUMNS = ("id", "path", "boneage", "male")
MAX_AGE_MONTHS = 240
MIN_IMAGE_SIDE = 8
MAX_IMAGE_PIXELS = 50_000_000  # 15x the largest RSNA radiograph (about 2500x3300); PIL's own limit is 89M
PROGRESS_OVER = 2000  # report progress (every 25%) when checking more images than this
_MALE = {"true": True, "1": True, "false": False, "0": False}
_SEX = {"m": True, "f": False}

# Reasons a row is invalid. Image reasons list files; the others list CSV rows.
MISSING_IMAGE = "missing image"
FLOAT_ID = "id written as a float"
EMPTY_IMAGE = "empty image file (0 bytes)"
UNREADABLE_IMAGE = "unreadable image (truncated or not an image)"
NOT_PNG = "not a PNG image"
SMALL_IMAGE = f"image smaller than {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}"
LARGE_IMAGE = f"image larger than {MAX_IMAGE_PIXELS:,} pixels"
_FILE_REASONS = {MISSING_IMAGE, EMPTY_IMAGE, UNREADABLE_IMAGE, NOT_PNG, SMALL_IMAGE, LARGE_IMAGE}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# What PIL raises for a broken file (UnidentifiedImageError is an OSError). Anything else is a
# fault of this program or its libraries and must show its traceback, not pass as bad input.
_BROKEN_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)


def find_image_dir(root, part: str, cached=()) -> Path:
    """The folder holding <part>'s `{id}.png` files: nested (Kaggle's archive) or flat, the one
    with PNGs first, then one in `cached` (folders whose images a prepared cache holds, see
    boneage.prepare.cached_folders: a node that kept only its cache), then an empty one."""
    if part not in ("training", "test"):
        raise InputError(f"unknown data part {part!r}: expected 'training' or 'test'")
    root = Path(root).absolute()
    flat = root / f"boneage-{part}-dataset"
    nested = flat / flat.name
    existing = [d for d in (nested, flat) if d.is_dir()]
    for folder in existing:
        with os.scandir(folder) as entries:
            if any(e.name.lower().endswith(".png") for e in entries):
                return folder
    cached = {str(Path(c)) for c in cached}
    for folder in (nested, flat):
        if str(folder) in cached:
            return folder
    if not existing:
        raise InputError(f"{root}: no image folder {flat.name}/ (nor {flat.name}/{flat.name}/)")
    return existing[0]  # holds no PNGs: the image checks will list every missing file


def image_problems(paths, check_images: bool = True, trusted=frozenset(), report=None) -> dict:
    """{path: (reason, note)} for the bad ones of `paths`, checked as load_table checks them
    (check_images=False: existence and size only; paths in `trusted` are not looked at)."""
    unchecked = [str(p) for p in paths if str(p) not in trusted]
    results = _check_images(unchecked, check_images, report or (lambda m: None)) if unchecked else []
    return {p: r for p, r in zip(unchecked, results) if r}


class _Problems:
    """Invalid rows, per CSV file and reason, in the order they were found."""

    def __init__(self):
        self.by_file = {}  # csv path -> {reason: [(line, detail)]}

    def add(self, path, reason, line, detail=""):
        self.by_file.setdefault(str(path), {}).setdefault(reason, []).append((line, detail))

    def lines(self, path) -> set:
        return {line for items in self.by_file.get(str(path), {}).values() for line, _ in items}

    def counts(self, path) -> str:
        reasons = self.by_file.get(str(path), {})
        return ", ".join(f"{len(items)} {reason}" for reason, items in reasons.items())

    def message(self) -> str:
        out = []
        for path, reasons in self.by_file.items():
            out.append(f"{path}: {_count(len(self.lines(path)), 'invalid row')}")
            for reason, items in reasons.items():
                if reason in _FILE_REASONS:  # image problems list the files, the others the rows
                    out.append(f"  {reason} ({_count(len(items), 'file')}): {summarize(d for _, d in items)}")
                else:
                    rows = summarize(f"row {line} {detail}".rstrip() for line, detail in items)
                    out.append(f"  {reason} ({_count(len(items), 'row')}): {rows}")
        return "\n".join(out)


def _count(n, noun):
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _read_csv(path, columns) -> list:
    """(line number, {column: stripped text}) for each non-blank row; InputError if unusable."""
    path = Path(path).absolute()
    if not path.is_file():
        raise InputError(f"{path}: CSV file not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header or not any(h.strip() for h in header):
                raise InputError(f"{path}: CSV file is empty (expected columns {', '.join(columns)})")
            index = {}
            for i, name in enumerate(header):
                index.setdefault(name.strip().lower(), i)
            missing = [c for c in columns if c.lower() not in index]
            if missing:
                found = summarize(repr(h.strip()) for h in header)
                other = [d for d in ";\t|" if len(header) == 1 and d in header[0]]
                hint = f"; the file seems to be separated by {other[0]!r}, expected commas" if other else ""
                raise InputError(f"{path}: missing column{'s' if len(missing) > 1 else ''} "
                                 f"{summarize(map(repr, missing))} (found {found}){hint}")
            where = {c: index[c.lower()] for c in columns}
            rows = []
            for cells in reader:
                if any(cell.strip() for cell in cells):  # blank lines are skipped
                    cells += [""] * (len(header) - len(cells))  # short rows: missing values
                    rows.append((reader.line_num, {c: cells[i].strip() for c, i in where.items()}))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path}: cannot read CSV ({e})") from e
    if not rows:
        raise InputError(f"{path}: CSV file has a header but no rows")
    return rows


def _parse_age(text):
    """(months, None) or (None, reason)."""
    try:
        age = float(text) if text else math.nan
    except ValueError:
        return None, "age not a number"
    if math.isnan(age):
        return None, "age missing"
    if not 0 <= age <= MAX_AGE_MONTHS:
        return None, f"age out of range 0..{MAX_AGE_MONTHS} months"
    return age, None


def _check_ids(path, records, problems):
    seen = Counter(r[1] for r in records if r[1])
    for line, id_, *_ in records:
        if not id_:
            problems.add(path, "id missing", line)
        elif seen[id_] > 1:
            problems.add(path, "duplicate id", line, f"(id {id_})")


def _label_records(path, problems) -> list:
    """[line, id, age, male] for each row of an `id,boneage,male` CSV, problems noted."""
    path = Path(path).absolute()
    records = []
    for line, row in _read_csv(path, ("id", "boneage", "male")):
        age, why = _parse_age(row["boneage"])
        if why:
            problems.add(path, why, line, repr(row["boneage"]))
        male = _MALE.get(row["male"].lower())
        if male is None:
            problems.add(path, "male not True/False/1/0", line, repr(row["male"]))
        records.append([line, row["id"], age, male])
    _check_ids(path, records, problems)
    return records


def _test_records(csv_path, labels_csv, problems) -> list:
    """[line, id, age, male] for each test row; ages from the labels CSV if there is one."""
    records = []
    for line, row in _read_csv(csv_path, ("Case ID", "Sex")):
        male = _SEX.get(row["Sex"].lower())
        if male is None:
            problems.add(csv_path, "Sex not M/F", line, repr(row["Sex"]))
        records.append([line, row["Case ID"], math.nan, male])
    _check_ids(csv_path, records, problems)
    if labels_csv is None:
        return records
    labels_path = Path(labels_csv).absolute()
    test_ids = {r[1] for r in records}
    labels = {}
    for line, id_, age, male in _label_records(labels_path, problems):
        if id_ and id_ not in test_ids:
            problems.add(labels_path, f"id not in {csv_path.name}", line, f"(id {id_})")
        labels.setdefault(id_, (line, age, male))
    bad_labels = problems.lines(labels_path)
    for record in (r for r in records if r[1]):
        line, id_, _, male = record
        label_line, age, label_male = labels.get(id_, (None, None, None))
        if label_line is None:
            problems.add(csv_path, f"no label in {labels_path.name}", line, f"(id {id_})")
        elif label_line in bad_labels:
            problems.add(csv_path, f"invalid label in {labels_path.name}", line, f"(its row {label_line})")
        elif male is not None and male != label_male:
            problems.add(csv_path, f"Sex differs from male in {labels_path.name}", line,
                         f"(id {id_}: Sex {'M' if male else 'F'}, male {label_male})")
        else:
            record[2] = age
    return records


def png_size(path: str):
    """(width, height) from a PNG's header (its first 24 bytes), or None if it is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or not head.startswith(_PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def _check_image(path: str, full: bool = True):
    """(reason, note) for a bad image file, or None. `full` opens it; else only stats it."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return MISSING_IMAGE, ""
    except OSError as e:
        return UNREADABLE_IMAGE, f"({e})"
    if size == 0:
        return EMPTY_IMAGE, ""
    if not full:
        return None  # only existence and size: a cache says the contents were checked
    try:
        declared = png_size(path)  # before PIL or TensorFlow reads more than the header
        if declared and declared[0] * declared[1] > MAX_IMAGE_PIXELS:
            return LARGE_IMAGE, f"({declared[0]}x{declared[1]})"
        with Image.open(path) as im:
            fmt, (width, height) = im.format, im.size
            im.verify()  # walks the PNG chunks and their CRCs without decoding pixels
    except Image.DecompressionBombError as e:  # another format declaring a huge image
        return LARGE_IMAGE, f"({e})"
    except _BROKEN_IMAGE_ERRORS as e:
        return UNREADABLE_IMAGE, f"({type(e).__name__}: {e})"
    if width * height > MAX_IMAGE_PIXELS:
        return LARGE_IMAGE, f"({width}x{height})"
    if fmt != "PNG":
        return NOT_PNG, f"({fmt})"
    if width < MIN_IMAGE_SIDE or height < MIN_IMAGE_SIDE:
        return SMALL_IMAGE, f"({width}x{height})"
    return None


def check_image_file(path: str):
    """Why one image file cannot be used (e.g. "missing image"), or None if it is fine."""
    problem = _check_image(str(path))
    return problem and f"{problem[0]} {problem[1]}".rstrip()


def _check_images(paths, full, report) -> list:
    """_check_image for every path, in chunks on parallel threads, with progress for big sets.
    full=None checks nothing: the images are not on this machine (see load_table)."""
    if full is None:
        return [None] * len(paths)
    n, results = len(paths), []
    chunk = max(1, min(128, n // 64))  # chunks of paths: far less thread switching than one each
    quarters = [n * q // 4 for q in (1, 2, 3, 4)] if n > PROGRESS_OVER else []
    if quarters:
        report(f"checking {n} images in {os.path.dirname(paths[0])}")
    check = partial(_check_image, full=full)
    with ThreadPoolExecutor(max_workers=min(16, 4 * (os.cpu_count() or 1))) as pool:
        for part in pool.map(lambda i: [check(p) for p in paths[i:i + chunk]], range(0, n, chunk)):
            results += part
            if quarters and len(results) >= quarters[0]:
                report(f"  checked {len(results)} of {n} images ({100 * len(results) // n}%)")
                quarters = [q for q in quarters if q > len(results)]
    return results


def load_table(root, part: str = "training", labels_csv=None, drop_invalid: bool = False,
               check_images: bool = True, report=print, trusted=frozenset(), cached=()) -> pd.DataFrame:
    """The checked table of one part ("training" or "test") as a frame with IMAGE_COLUMNS.

    Raises one InputError listing every problem, or with drop_invalid drops the bad rows and
    reports how many and why. check_images=False only checks that each image exists and is not
    empty (for when a cache says the files were checked before); None checks the CSV alone (a
    cluster's head, when the images are staged on the workers, which check them themselves).
    Images in `trusted` (held by a prepared cache, see boneage.prepare) are not looked at at all,
    and `cached` names the folders such a cache holds (find_image_dir).
    For the test part, labels_csv
    defaults to <root>/boneage-test-labels.csv if it exists; without labels boneage is NaN.
    """
    root = Path(root).absolute()
    if not root.is_dir():
        raise InputError(f"data root {root} is not a folder")
    image_dir = find_image_dir(root, part, cached) if check_images is not None else root / f"boneage-{part}-dataset"
    if part == "test" and labels_csv is None and (root / "boneage-test-labels.csv").is_file():
        labels_csv = root / "boneage-test-labels.csv"
    return _load(root / f"boneage-{part}-dataset.csv", image_dir, part, labels_csv,
                 drop_invalid, check_images, report, trusted)


def load_test_csv(csv_path, image_dir, labels_csv=None, drop_invalid: bool = False,
                  check_images: bool = True, report=print) -> pd.DataFrame:
    """Like load_table(part="test") for a `Case ID,Sex` CSV and image folder anywhere."""
    if not Path(image_dir).is_dir():
        raise InputError(f"image folder {image_dir} not found")
    return _load(Path(csv_path).absolute(), Path(image_dir).absolute(), "test", labels_csv,
                 drop_invalid, check_images, report)


def _load(csv_path, image_dir, part, labels_csv, drop_invalid, check_images, report, trusted=frozenset()):
    """Read and check the CSV(s), check {id}.png in image_dir, then raise, or drop and report."""
    report = report or (lambda message: None)
    problems = _Problems()
    if part == "training":
        records = _label_records(csv_path, problems)
    else:
        records = _test_records(csv_path, labels_csv, problems)

    with_id = [r for r in records if r[1]]
    paths = [str(image_dir / f"{r[1]}.png") for r in with_id]
    unchecked = [p for p in paths if p not in trusted]
    checked = dict(zip(unchecked, _check_images(unchecked, check_images, report))) if unchecked else {}
    for (line, id_, *_), path in zip(with_id, paths):
        result = checked.get(path)
        if result and result[0] == MISSING_IMAGE and re.fullmatch(r"\d+\.0+", id_) \
                and (image_dir / f"{id_.split('.')[0]}.png").is_file():
            problems.add(csv_path, FLOAT_ID, line, f"(id {id_}; the image is {id_.split('.')[0]}.png)")
        elif result:
            problems.add(csv_path, result[0], line, f"{path} {result[1]}".rstrip())

    if problems.by_file and not drop_invalid:
        raise InputError(f"{problems.message()}\nFix them or set data.drop_invalid: true to skip them.")
    bad = problems.lines(csv_path)
    kept = [(r, p) for r, p in zip(with_id, paths) if r[0] not in bad]
    if problems.by_file:
        message = f"{csv_path}: dropped {len(records) - len(kept)} of {len(records)} rows"
        message += f" ({problems.counts(csv_path)})" if bad else ""
        for path in set(problems.by_file) - {str(csv_path)}:  # the test labels CSV
            ignored = _count(len(problems.lines(path)), "row")
            message += f"; {path}: ignored {ignored} ({problems.counts(path)})"
        report(f"{message}; {_count(len(kept), 'row')} left.")
    if not kept:
        raise InputError(f"no valid rows left in {csv_path}:\n{problems.message()}")
    return pd.DataFrame({
        "id": pd.Series([r[1] for r, _ in kept], dtype=str),
        "path": pd.Series([p for _, p in kept], dtype=str),
        "boneage": pd.Series([r[2] for r, _ in kept], dtype=float),
        "male": pd.Series([bool(r[3]) for r, _ in kept], dtype=bool),
    }, columns=list(IMAGE_COLUMNS))
