"""Synthetic phantom hand radiographs in the RSNA Pediatric Bone Age (Kaggle) layout.

This is the offline default dataset: no download, deterministic by seed, and the bone age
label drives visible anatomy, so a CNN has to learn shape to predict it. Run it with

    python -m boneage phantom --out DIR --n 2000 --seed 0

which writes DIR/boneage-training-dataset.csv (id,boneage,male) + DIR/boneage-training-dataset/
{id}.png, DIR/boneage-test-dataset.csv (Case ID,Sex) + DIR/boneage-test-dataset/{id}.png, and
DIR/boneage-test-labels.csv (id,boneage,male) for the test images.

How age maps to anatomy. Everything is driven by a "skeletal age" a = age_months for boys and
a = age_months * 16/14 for girls, so girls mature earlier and fuse at 14 instead of 16 years:
  * proportions: metacarpal and phalanx lengths grow by ~28% relative to palm width (fingers
    get long, the palm narrow as a fraction of hand length). Soft tissue keeps its width
    relative to hand length, and the whole hand is then scaled to a random size, so only
    proportions, never absolute size or silhouette area, carry age;
  * epiphyses: each phalanx, metacarpal and the distal radius/ulna gets a cap at one end that
    ossifies at its own age (radius ~1 y, phalanges/metacarpals 1.5-3.5 y, ulna ~7 y), grows
    from a dot to the full width of the shaft, and sits behind a dark growth-plate gap that
    narrows with age and disappears (fusion) at a = 192 months;
  * carpals: 8 ossification centres appear one by one (capitate and hamate in the first
    months, triquetrum ~2.5 y, lunate ~4 y, trapezium/trapezoid/scaphoid ~5.5-6.5 y,
    pisiform ~11.5 y in boys, so all 8 by ~10 y in girls) and grow after they appear.
Nuisance drawn independently of age: hand scale (0.75-1.1), position, rotation (+-15 deg),
finger spread, background/tissue/bone intensities, an exposure gradient, blur and noise, and
the share of the frame the bones cover (6-11%): caps, carpals and longer bones would make bone
area grow with age, so the bone width is solved for that random share instead (thicker bones
in a young hand, thinner in an old one: a shape cue, not a global one). Neither the brightness
histogram, nor the bright or foreground area, nor their ratio then predicts age well
(tests/test_phantom.py measures it on what the network sees).
"""

import csv
import json
import math
import os
import pathlib
import shutil

import numpy as np
from PIL import Image

from boneage.errors import InputError

FUSION = 192.0  # skeletal age (months) at which every growth plate has closed
FIRST_TRAIN_ID = 1377  # Kaggle's first training id
GENERATOR_VERSION = 2  # in phantom.json: a dataset drawn by an older generator is not reused

# Rays from the wrist (canonical units: palm width = 1, y towards the fingertips).
# Each bone: (adult length, half-width at proximal end, mid-shaft, distal end,
#             which end carries the epiphysis, epiphysis onset in skeletal months).
FINGERS = [  # (base x, base y, base angle in degrees, bones)
    (-0.30, 0.45, -7, [(0.76, .070, .050, .072, "dist", 20), (0.47, .068, .046, .055, "prox", 18),
                       (0.27, .058, .040, .048, "prox", 30), (0.20, .050, .034, .030, "prox", 32)]),
    (-0.10, 0.45, 0, [(0.74, .070, .050, .072, "dist", 18), (0.53, .068, .046, .055, "prox", 17),
                      (0.33, .058, .040, .048, "prox", 28), (0.22, .050, .034, .030, "prox", 30)]),
    (0.10, 0.45, 6, [(0.67, .066, .048, .068, "dist", 20), (0.49, .066, .044, .053, "prox", 18),
                     (0.31, .056, .040, .046, "prox", 30), (0.22, .048, .032, .030, "prox", 34)]),
    (0.30, 0.45, 13, [(0.61, .062, .044, .064, "dist", 24), (0.39, .060, .040, .050, "prox", 20),
                      (0.21, .052, .036, .042, "prox", 36), (0.20, .046, .030, .028, "prox", 38)]),
    (-0.36, 0.30, -42, [(0.53, .072, .052, .070, "prox", 28), (0.36, .070, .048, .058, "prox", 22),
                        (0.28, .060, .040, .034, "prox", 30)]),  # thumb: no middle phalanx
]
FOREARM = [  # radius and ulna point down from the wrist; epiphysis at the wrist end
    (-0.23, -0.02, 180, [(3.0, .130, .090, .100, "prox", 12)]),  # long enough to leave the frame
    (0.25, -0.08, 180, [(3.0, .090, .065, .070, "prox", 80)]),
]
CARPALS = [  # (x, y, full half-length, full radius, angle in degrees, onset in skeletal months)
    (0.00, 0.30, 0.060, 0.085, 90, 1), (0.18, 0.29, 0.040, 0.080, 75, 3),
    (0.16, 0.11, 0.020, 0.070, 0, 30), (-0.05, 0.10, 0.020, 0.080, 0, 48),
    (-0.33, 0.31, 0.030, 0.070, -40, 62), (-0.17, 0.33, 0.020, 0.060, 0, 68),
    (-0.25, 0.12, 0.050, 0.065, -50, 74), (0.25, 0.06, 0.000, 0.050, 0, 140),
]


def _ramp(x):
    return min(max(float(x), 0.0), 1.0)


def _shaft(pieces, at, s_a, s_b, hw_a, hw_m, hw_b):
    """Bone shaft occupying [s_a, s_b] along a ray, waisted in the middle (two tapered capsules)."""
    if s_b - s_a < 2 * hw_m:  # too short for a waist: a single blob
        pieces.append((at(0.5 * (s_a + s_b)), at(0.5 * (s_a + s_b)), max(s_b - s_a, 0.01) / 2, None))
        return
    s_m = 0.5 * (s_a + s_b)
    # Capsule segment ends are inset by the end radius so the bone's outline spans exactly [s_a, s_b].
    pieces.append((at(s_a + min(hw_a, s_m - s_a)), at(s_m), min(hw_a, s_m - s_a), hw_m))
    pieces.append((at(s_m), at(s_b - min(hw_b, s_b - s_m)), hw_m, min(hw_b, s_b - s_m)))


def _ray(base, angle, bones, a, grow_len, widen, bone_pieces):
    """Lay a chain of bones along one ray; returns (distance to the last bone's end, point-on-ray function)."""
    ux, uy = math.sin(math.radians(angle)), math.cos(math.radians(angle))
    at = lambda s, off=0.0: (base[0] + s * ux + off * uy, base[1] + s * uy - off * ux)  # noqa: E731
    s = 0.0
    for length, hw_p, hw_m, hw_d, end, onset in bones:
        length *= grow_len
        hw_p, hw_m, hw_d = hw_p * widen, hw_m * widen, hw_d * widen
        grow = _ramp((a - onset) / 110.0) if a >= onset else None
        thick = 0.030 + 0.045 * (grow or 0.0)  # cartilage is reserved even before the cap ossifies
        gap = 0.035 + 0.05 * _ramp((FUSION - a) / FUSION) if a < FUSION else None
        s0, s1 = s, s + length
        if end == "prox":
            cap_mid, hw_end = s0 + thick / 2, hw_p
            shaft = (s0 if gap is None else s0 + thick + gap, s1)
        else:
            cap_mid, hw_end = s1 - thick / 2, hw_d
            shaft = (s0, s1 if gap is None else s1 - thick - gap)
        _shaft(bone_pieces, at, *shaft, hw_p, hw_m, hw_d)
        if grow is not None:  # the cap: a flat capsule across the ray, from a dot to wider than the shaft
            half_w = hw_end * (0.4 + 0.75 * grow)
            reach = max(half_w - thick / 2, 0.0)
            bone_pieces.append((at(cap_mid, -reach), at(cap_mid, reach), thick / 2, None))
        s = s1 + 0.045  # joint space: always open
    return s - 0.045, at


def _layout(age_months, male, spread, jitter, widen):
    """Bones and soft tissue as capsules (p0, p1, r0, r1) in canonical hand coordinates.
    `widen` scales bone widths; soft tissue and hand length do not depend on it."""
    a = age_months if male else age_months * 16.0 / 14.0
    m = _ramp(a / 200.0)
    grow_len = 0.78 + 0.22 * m
    # Soft tissue keeps its width relative to hand LENGTH, so once the hand is scaled to a random
    # size the silhouette's area does not shrink with age (which would leak age to a pixel counter).
    fat = 0.82 + 0.18 * m
    bones, tissue, tips = [], [], []
    for (x, y, ang, chain), dj in zip(FINGERS, jitter):
        angle = ang * (spread if len(chain) == 4 else 0.6 + 0.4 * spread) + dj  # the thumb moves less
        end, at = _ray((x, y), angle, chain, a, grow_len, widen, bones)
        tips.append(at(end))
        head = at(0.74 * grow_len if len(chain) == 4 else 0.0)  # the finger leaves the palm here
        tissue.append((head, at(end + 0.03), fat * (0.125 if len(chain) == 4 else 0.14), fat * 0.095))
        tissue.append((at(0.05), at(0.62 * grow_len), fat * 0.17, fat * 0.16))  # palm around a metacarpal
    for x, y, ang, chain in FOREARM:
        _ray((x, y), ang, chain, a, grow_len, widen, bones)
    for x, y, half_len, r, ang, onset in CARPALS:
        if a >= onset:
            size = 0.3 + 0.7 * _ramp((a - onset) / 100.0) ** 0.8
            d = half_len * size * np.array([math.cos(math.radians(ang)), math.sin(math.radians(ang))])
            bones.append((np.array([x, y]) - d, np.array([x, y]) + d, r * size, None))
    tissue.append((np.array([0.0, -3.0]), np.array([0.0, 0.2]), fat * 0.44, fat * 0.44))  # forearm
    tissue.append((np.array([-0.2, 0.22]), np.array([0.2, 0.22]), fat * 0.28, fat * 0.28))  # wrist
    hand_len = float(np.hypot(*tips[1]))  # wrist to middle fingertip
    return bones, tissue, hand_len


def _draw(canvas, pieces, to_px, px_per_unit, shade):
    """Rasterise capsules into canvas (max-union) with anti-aliased edges, each over its bounding box."""
    h, w = canvas.shape
    for p0, p1, r0, r1 in pieces:
        (ax, ay), (bx, by) = to_px(p0), to_px(p1)
        r0 = r0 * px_per_unit
        r1 = r0 if r1 is None else r1 * px_per_unit
        rmax = max(r0, r1) + 1
        x0, x1 = max(int(min(ax, bx) - rmax), 0), min(int(max(ax, bx) + rmax) + 2, w)
        y0, y1 = max(int(min(ay, by) - rmax), 0), min(int(max(ay, by) + rmax) + 2, h)
        if x0 >= x1 or y0 >= y1:
            continue
        xs = np.arange(x0, x1, dtype=np.float32)[None, :] - ax
        ys = np.arange(y0, y1, dtype=np.float32)[:, None] - ay
        dx, dy = bx - ax, by - ay
        t = np.clip((xs * dx + ys * dy) / max(dx * dx + dy * dy, 1e-9), 0.0, 1.0)
        dist = np.hypot(xs - t * dx, ys - t * dy)
        radius = r0 + (r1 - r0) * t
        cover = np.clip(radius - dist + 0.5, 0.0, 1.0)
        if shade:  # cortex brighter than the marrow cavity, as on a radiograph
            cover *= 1.0 - shade * np.clip(1.0 - dist / radius, 0.0, 1.0) ** 2
        view = canvas[y0:y1, x0:x1]
        np.maximum(view, cover, out=view)


def _area_in_frame(pieces, rot, shift, px_per_unit, width, height) -> float:
    """Approximate pixel area of capsules (p0, p1, r0, r1) inside the frame: each one's axis is
    clipped to the frame, then counted as a band of its mean width plus its round ends."""
    ends = np.array([(*p0, *p1) for p0, p1, _, _ in pieces], np.float64).reshape(-1, 2, 2) @ rot.T + shift
    r0 = np.array([r for _, _, r, _ in pieces]) * px_per_unit
    r1 = np.array([a if b is None else b for _, _, a, b in pieces]) * px_per_unit
    start, step = ends[:, 0], ends[:, 1] - ends[:, 0]
    lo, hi = np.zeros(len(pieces)), np.ones(len(pieces))
    with np.errstate(divide="ignore", invalid="ignore"):  # segments parallel to an edge
        for axis, limit in ((0, width), (1, height)):  # clip each axis to [0, limit] (Liang-Barsky)
            t0, t1 = -start[:, axis] / step[:, axis], (limit - start[:, axis]) / step[:, axis]
            flat = np.abs(step[:, axis]) < 1e-9
            inside = (start[:, axis] >= 0) & (start[:, axis] <= limit)
            lo = np.maximum(lo, np.where(flat, np.where(inside, 0.0, 1.0), np.minimum(t0, t1)))
            hi = np.minimum(hi, np.where(flat, np.where(inside, 1.0, 0.0), np.maximum(t0, t1)))
    seen = lo < hi
    band = (hi - lo) * np.hypot(*step.T) * (r0 + r1) + np.pi * (r0 * r0 + r1 * r1) / 2
    return float(band[seen].sum())


def render_hand(age_months: float, male: bool, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """One phantom radiograph of a left hand, PA view, as uint8 (height, width); all nuisance comes from rng."""
    spread = rng.uniform(0.6, 1.9)
    jitter = rng.normal(0.0, 1.5, len(FINGERS))
    _, tissue, hand_len = _layout(age_months, male, spread, jitter, 1.0)
    # Similarity transform canonical -> pixels. Scale is relative to the frame, so the size of the
    # hand in pixels says nothing about age.
    px_per_unit = rng.uniform(0.75, 1.1) * 0.68 * height / hand_len
    theta = math.radians(rng.uniform(-15, 15))
    # Canonical x is mirrored (thumb on the image's right, as on RSNA's left-hand PA films) and y
    # flipped (image rows grow downwards).
    rot = px_per_unit * np.array([[-math.cos(theta), math.sin(theta)], [-math.sin(theta), -math.cos(theta)]])
    # Place the hand (everything but the forearm, which runs off the bottom) at a random spot
    # that keeps it inside the frame: its bounding box is centred, then jittered within the slack.
    ends = [(rot @ np.asarray(q), r * px_per_unit) for p0, p1, r, _ in tissue if min(p0[1], p1[1]) > -1
            for q in (p0, p1)]
    lo = np.min([q - r for q, r in ends], axis=0)
    hi = np.max([q + r for q, r in ends], axis=0)
    slack = np.maximum((np.array([width, height]) - (hi - lo)) / 2 - 2, 0)
    shift = np.array([width, height]) / 2 - (lo + hi) / 2 + rng.uniform(-1, 1, 2) * slack * [0.8, 0.5]

    def to_px(p):
        return rot @ np.asarray(p) + shift

    # Bone area: with age, bones lengthen, caps and carpals appear and growth plates close, so
    # bone would cover ever more of the hand, and a pixel counter would read age from it. Instead
    # the bones cover a random share of the frame, drawn independently of age, reached by choosing
    # their width: the area is quadratic in the width factor, so three layouts fix it.
    target = rng.uniform(0.06, 0.11) * width * height
    trial = np.array([0.5, 1.0, 1.5])
    areas = [_area_in_frame(_layout(age_months, male, spread, jitter, w)[0], rot, shift, px_per_unit, width, height)
             for w in trial]
    c2, c1, c0 = np.polyfit(trial, areas, 2)
    roots = np.roots([c2, c1, c0 - target])
    roots = roots[np.isreal(roots) & (roots.real > 0)].real
    widen = float(np.clip(roots.min() if roots.size else 1.0, 0.55, 1.6))
    bones, _, _ = _layout(age_months, male, spread, jitter, widen)

    soft = np.zeros((height, width), np.float32)
    bone = np.zeros((height, width), np.float32)
    _draw(soft, tissue, to_px, px_per_unit, shade=0.0)
    _draw(bone, bones, to_px, px_per_unit, shade=rng.uniform(0.1, 0.35))

    # Exposure: random levels, plus a linear gradient across the film (heel effect).
    bg, tissue_level, bone_level = rng.uniform(0.0, 0.15), rng.uniform(0.18, 0.42), rng.uniform(0.2, 0.45)
    img = bg + tissue_level * soft + bone_level * bone * soft
    gy, gx = np.mgrid[-0.5:0.5:height * 1j, -0.5:0.5:width * 1j].astype(np.float32)
    img *= 1.0 + rng.uniform(-0.3, 0.3) * gy + rng.uniform(-0.2, 0.2) * gx
    # Softness: blend with a 3x3 box blur by a random amount.
    pad = np.pad(img, 1, mode="edge")
    blur = sum(pad[i:i + height, j:j + width] for i in range(3) for j in range(3)) / 9.0
    img += rng.uniform(0.0, 0.9) * (blur - img)
    img += rng.normal(0.0, rng.uniform(0.005, 0.03), img.shape).astype(np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _label_and_image(seed, split, index, width, height):
    """Label and image of one case; depends only on (seed, split, index), never on n."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(split, index)))
    age = int(np.clip(round(rng.normal(127.0, 41.0)), 1, 228))  # RSNA-like label distribution
    male = bool(rng.random() < 0.54)
    return age, male, render_hand(age, male, rng, width, height)


def generate(out_dir, n: int, seed: int = 0, n_test: int | None = None,
             width: int = 128, height: int = 160, progress=None) -> pathlib.Path:
    """Write a phantom dataset to out_dir and return out_dir as a Path.

    Idempotent: an out_dir already holding a dataset with the same parameters is returned
    untouched; one holding anything else raises InputError. The dataset is built in a hidden
    sibling directory and renamed into place, so an interrupted run never leaves half a dataset.
    """
    out_dir = pathlib.Path(out_dir)
    n_test = max(4, n // 10) if n_test is None else n_test
    if n < 1 or n_test < 1 or width < 32 or height < 32:
        raise InputError(f"phantom: need n >= 1, n_test >= 1 and a size of at least 32x32, "
                         f"got n={n}, n_test={n_test}, {width}x{height}")
    params = {"n": int(n), "seed": int(seed), "n_test": int(n_test), "width": int(width), "height": int(height),
              "version": GENERATOR_VERSION}
    if _existing(out_dir, params):
        return out_dir

    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # leftover of an earlier crash of this very pid
    try:
        total, done = n + n_test, 0
        splits = [("training", 0, range(FIRST_TRAIN_ID, FIRST_TRAIN_ID + n)),
                  ("test", 1, range(FIRST_TRAIN_ID + n, FIRST_TRAIN_ID + n + n_test))]
        for name, split, ids in splits:
            (tmp / f"boneage-{name}-dataset").mkdir(parents=True)
            rows = []
            for index, case_id in enumerate(ids):
                age, male, img = _label_and_image(seed, split, index, width, height)
                Image.fromarray(img).save(tmp / f"boneage-{name}-dataset" / f"{case_id}.png")
                rows.append((case_id, age, male))
                done += 1
                if progress is not None and (done % 50 == 0 or done == total):
                    progress(done, total)
            if name == "training":
                _write_csv(tmp / "boneage-training-dataset.csv", ["id", "boneage", "male"], rows)
            else:
                _write_csv(tmp / "boneage-test-dataset.csv", ["Case ID", "Sex"],
                           [(i, "M" if male else "F") for i, _, male in rows])
                _write_csv(tmp / "boneage-test-labels.csv", ["id", "boneage", "male"], rows)
        (tmp / "phantom.json").write_text(json.dumps(params, sort_keys=True) + "\n")  # marker last
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # an empty directory holds nothing to protect
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not _existing(out_dir, params):  # a concurrent run may have finished the same dataset
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _existing(out_dir, params):
    """True if out_dir holds this very dataset; InputError if it holds anything else."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return False
    try:
        found = json.loads((out_dir / "phantom.json").read_text())
    except (OSError, ValueError):
        raise InputError(f"phantom: {out_dir} exists but is not a phantom dataset (no readable "
                         f"phantom.json); choose another --out or remove it") from None
    if {k: found.get(k) for k in params} != params:
        raise InputError(f"phantom: {out_dir} holds a phantom dataset with other parameters "
                         f"({json.dumps(found, sort_keys=True)}, wanted {json.dumps(params, sort_keys=True)}); "
                         f"choose another --out or remove it")
    return True


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
