"""Prepare the images once: decode, letterbox and resize every image of a dataset once per
resolution into a uint8 array file that every trial memory-maps instead of decoding PNGs.

    python -m boneage prepare --config configs/small.yaml [--size 72 --size 96]

    images = ensure_prepared(frame, image_size=96, folder=prepared_dir(cfg.data), threads=4)
    images.rows(frame)   # each frame row's index into images.array, (N, 96, 96) uint8, read-only

`boneage.train.train` calls `ensure_prepared` itself, so every caller (a Ray trial, the retrain,
`python -m boneage train`) gets the cache without knowing about it; the search's driver builds
it before the first trial starts. The pixels are exactly `boneage.pipeline.prepare_image`'s; the
decoding itself, with its progress bar, is `boneage.decode`.

A folder (`data.prepared_dir`, default `$XDG_CACHE_HOME/boneage/prepared`, i.e. on each node's
own disk) holds, per image folder and resolution, under a key that also covers the source of
`prepare_image` (so a change to it rebuilds):

    <key>.json              manifest: resolution, and [path, bytes, mtime_ns] of every image
    <key>.<build>.npy       the images, np.save format, memory-mapped by readers
    <key>.lock              flock: one process per node builds, the others wait for it

A cache is used for a table when it holds every image of the table and every image still on
disk has the size and modification time it had when prepared (a missing image is served from
the cache: after `prepare` the PNGs, even their folder, may go; `cached_folders` still finds
the folder, `trusted_images` the images and their sizes). Anything else rebuilds it, into
temporary names renamed into place, so a reader never sees half a cache.

A cache can also come from elsewhere: `ensure_prepared(..., fetch=...)` first asks `fetch` (under
the same lock) for a copy, which `tuning.prepared_store` finds in the search's storage by
`content_key` (the images' ids and bytes, the resolution and `prepare_image`'s version: equal on
every node holding the same images, wherever they are). A fetched cache's manifest says where it
came from (`fetched`); every manifest records its `content_key`.
"""
from __future__ import annotations

import ast
import fcntl
import hashlib
import importlib.util
import json
import os
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from boneage.config import DataConfig, write_atomic
from boneage.errors import InputError

def prepared_dir(cfg: DataConfig) -> Path:
    """`data.prepared_dir`, else the user's cache folder: node-local on a cluster."""
    if cfg.prepared_dir:
        return Path(cfg.prepared_dir).expanduser().resolve()
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home).expanduser().resolve() / "boneage" / "prepared"


@lru_cache(maxsize=1)
def _decode_version() -> str:
    """Hash of `prepare_image`'s source, read without importing TensorFlow."""
    source = Path(importlib.util.find_spec("boneage.pipeline").origin).read_text()
    node = next(n for n in ast.parse(source).body
                if isinstance(n, ast.FunctionDef) and n.name == "prepare_image")
    return hashlib.sha256(ast.unparse(node).encode()).hexdigest()[:12]


def _key(folders, image_size: int) -> str:
    text = "\n".join(sorted(folders)) + f"\n{image_size}\n{_decode_version()}"
    return f"{hashlib.sha256(text.encode()).hexdigest()[:16]}-{image_size}px"


def _stat(path: str):
    """(bytes, mtime_ns) of a file, or None if it is gone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


@dataclass
class PreparedImages:
    """An opened cache: `array` is (N, size, size) uint8, memory-mapped read-only."""
    array: np.ndarray
    index: dict  # image path -> row of array
    manifest_path: Path

    def rows(self, frame) -> np.ndarray:
        return np.array([self.index[p] for p in frame["path"].astype(str)], dtype=np.int64)

    def holds(self, frame) -> bool:
        return all(p in self.index for p in frame["path"].astype(str))


def _read_manifest(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _usable(manifest, paths) -> bool:
    """True if the manifest holds every path and none of them changed on disk since."""
    if manifest is None:
        return False
    recorded = {p: (size, mtime) for p, size, mtime in manifest["images"]}
    for path in paths:
        if path not in recorded:
            return False
        now = _stat(path)
        if now is not None and now != recorded[path]:
            return False
    return True


def _open(folder: Path, manifest: dict, manifest_path: Path) -> PreparedImages | None:
    data = folder / manifest["data_file"]
    try:
        array = np.load(data, mmap_mode="r")
    except (OSError, ValueError):
        return None  # the data file went missing or is not what the manifest says: rebuild
    size = manifest["image_size"]
    if array.shape != (len(manifest["images"]), size, size) or array.dtype != np.uint8:
        return None
    return PreparedImages(array, {p: i for i, (p, _, _) in enumerate(manifest["images"])}, manifest_path)


_OPENED: dict = {}  # (folders, size) -> PreparedImages opened by this process, for `opened`


def opened(frame, image_size: int) -> PreparedImages | None:
    """A cache this process already opened that holds every image of `frame` at `image_size`
    (evaluation after training reads the test split from it), else None."""
    key = (tuple(sorted({os.path.dirname(p) for p in frame["path"].astype(str)})), int(image_size))
    images = _OPENED.get(key)
    return images if images is not None and images.holds(frame) else None


def content_key(paths, image_size: int) -> str | None:
    """The identity of these images' cache wherever it was built: their ids (file names) and
    bytes, the resolution and `prepare_image`'s version, never node-local folders or mtimes
    (so nodes holding the same images their own way agree). None if an image is not here."""
    rows = []
    for path in dict.fromkeys(map(str, paths)):
        found = _stat(path)
        if found is None:
            return None
        rows.append(f"{Path(path).stem},{found[0]}")
    text = "\n".join(sorted(rows)) + f"\n{image_size}\n{_decode_version()}"
    return f"{hashlib.sha256(text.encode()).hexdigest()[:16]}-{image_size}px"


def ensure_prepared(frame, image_size: int, folder, threads: int | None = None,
                    report=print, fetch=None) -> PreparedImages:
    """The prepared images of every row of `frame` at `image_size`: opened if a usable cache
    exists, else built (once per folder: concurrent callers wait for the first one). `fetch`,
    if given, is tried first, under the same lock: `fetch(paths, image_size, partial)` writes an
    .npy built elsewhere (`tuning.prepared_store`) to `partial` and returns its rows' paths in
    order, or None when it has none."""
    folder = Path(folder)
    paths = list(dict.fromkeys(frame["path"].astype(str)))
    folders = sorted({os.path.dirname(p) for p in paths})
    key = _key(folders, image_size)
    manifest_path = folder / f"{key}.json"
    images = _open_if_usable(folder, manifest_path, paths)
    if images is None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(f"config key data.prepared_dir: cannot create {folder} ({err})") from None
        with _lock(folder / f"{key}.lock", report, f"{len(paths)} images at {image_size} px"):
            images = _open_if_usable(folder, manifest_path, paths)  # built while we waited?
            if images is None and fetch is not None:
                _install(paths, image_size, folder, key, fetch, report)
                images = _open_if_usable(folder, manifest_path, paths)
            if images is None:
                _build(paths, image_size, folder, key, threads, report)
                images = _open_if_usable(folder, manifest_path, paths)
                if images is None:
                    raise InputError(f"images in {', '.join(folders)} changed while they were being "
                                     f"prepared; run again once they stay put")
    _OPENED[(tuple(folders), int(image_size))] = images
    return images


def _open_if_usable(folder, manifest_path, paths):
    manifest = _read_manifest(manifest_path)
    return _open(folder, manifest, manifest_path) if _usable(manifest, paths) else None


@contextmanager
def _lock(path: Path, report, what: str):
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report(f"waiting for another process preparing {what} ({path.parent})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(paths, image_size, folder: Path, key: str, threads, report) -> None:
    from boneage.decode import decode_into

    stats = [_stat(p) for p in paths]  # before reading: a file changed meanwhile shows as stale
    missing = [p for p, s in zip(paths, stats) if s is None]
    if missing:
        raise InputError(f"cannot prepare images: {len(missing)} missing, e.g. {', '.join(missing[:3])}")
    data_file = f"{key}.{uuid.uuid4().hex[:8]}.npy"
    partial = folder / f".{data_file}.partial"
    try:
        progress = decode_into(partial, paths, image_size, threads, report)
        os.replace(partial, folder / data_file)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    old = _read_manifest(folder / f"{key}.json")
    manifest = {"image_size": image_size, "decode_version": _decode_version(), "data_file": data_file,
                "created": time.strftime("%Y-%m-%d %H:%M:%S"), "content_key": content_key(paths, image_size),
                "images": [[p, size, mtime] for p, (size, mtime) in zip(paths, stats)]}
    write_atomic(folder / f"{key}.json", json.dumps(manifest))  # the commit point
    if old and old.get("data_file") != data_file:
        (folder / old["data_file"]).unlink(missing_ok=True)  # readers that mapped it keep it
    progress.finish(f"prepared in {folder / data_file} ({len(paths) * image_size ** 2 / 2 ** 20:.0f} MiB)")
    prune(folder)


def _install(paths, image_size, folder: Path, key: str, fetch, report) -> None:
    """A cache built elsewhere, written by `fetch`, checked and committed as `_build` would."""
    stats = {p: _stat(p) for p in paths}
    if None in stats.values():  # an image not here: its bytes are unknown, so is the cache's key
        return
    data_file = f"{key}.{uuid.uuid4().hex[:8]}.npy"
    partial = folder / f".{data_file}.partial"
    try:
        order = fetch(paths, image_size, partial)
        if order is None:
            return
        array = np.load(partial, mmap_mode="r")
        if sorted(order) != sorted(paths) or array.shape != (len(order), image_size, image_size) \
                or array.dtype != np.uint8:
            report(f"  the fetched cache does not hold these {len(paths)} images at {image_size} px: preparing here")
            return
        del array
        os.replace(partial, folder / data_file)
    finally:
        partial.unlink(missing_ok=True)
    manifest = {"image_size": image_size, "decode_version": _decode_version(), "data_file": data_file,
                "created": time.strftime("%Y-%m-%d %H:%M:%S"), "fetched": getattr(fetch, "source", "elsewhere"),
                "content_key": content_key(paths, image_size),
                "images": [[p, *stats[p]] for p in order]}
    write_atomic(folder / f"{key}.json", json.dumps(manifest))  # the commit point


def _current_manifests(folder: Path):
    """The manifests in `folder` of today's decoding whose data file is there."""
    for manifest_path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        manifest = _read_manifest(manifest_path)
        if manifest and manifest.get("decode_version") == _decode_version() \
                and (folder / manifest.get("data_file", "")).is_file():
            yield manifest


def trusted_images(folder, image_dir) -> dict:
    """{path: bytes} of the images in `image_dir` that a usable cache in `folder` holds (at any
    resolution): the data check need not open them, and they may be gone from disk."""
    folder, image_dir = Path(folder), str(image_dir)
    trusted = {}
    for manifest in _current_manifests(folder):
        for path, size, mtime in manifest.get("images", []):
            if os.path.dirname(path) == image_dir and path not in trusted \
                    and _stat(path) in (None, (size, mtime)):
                trusted[path] = size
    return trusted


def cached_folders(folder) -> set:
    """The image folders whose images a usable cache in `folder` holds: a node that kept only
    its prepared cache still has them (see boneage.data.find_image_dir)."""
    return {os.path.dirname(path) for m in _current_manifests(Path(folder)) for path, _, _ in m.get("images", [])}


def prune(folder) -> int:
    """Remove caches of image folders that no longer exist, and orphaned data files."""
    folder, removed = Path(folder), 0
    keep = set()
    for manifest_path in folder.glob("*.json"):
        manifest = _read_manifest(manifest_path) or {}
        images = manifest.get("images") or []
        if images and any(os.path.isdir(os.path.dirname(p)) for p, _, _ in images[:1]):
            keep.add(manifest.get("data_file"))
            continue
        manifest_path.unlink(missing_ok=True)
        removed += 1
    for data in [*folder.glob("*.npy"), *folder.glob(".*.partial")]:
        try:
            if data.name not in keep and time.time() - data.stat().st_mtime > 3600:  # not a build in flight
                data.unlink()
        except OSError:
            pass  # removed by another process meanwhile
    return removed
