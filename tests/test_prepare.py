"""boneage.prepare: images decoded once into a memory-mapped cache that equals the decode path,
is rebuilt when stale or half-written, built once under concurrency, serves images whose PNGs
are gone, and is shared between processes instead of copied."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

tf = pytest.importorskip("tensorflow")

from boneage import prepare  # noqa: E402
from boneage.config import load_config  # noqa: E402
from boneage.errors import InputError  # noqa: E402
from boneage.pipeline import make_dataset, prepare_image  # noqa: E402
from boneage.splits import load_splits  # noqa: E402
from tests.conftest import tiny_overrides  # noqa: E402


def copy_of(root, tmp_path) -> Path:
    """A private copy of a phantom dataset (tests here move and rewrite its files)."""
    import shutil

    return Path(shutil.copytree(root, tmp_path / "data"))


def frame_of(root, cache="prepared", folder=None):
    overrides = tiny_overrides(root) + [f"data.cache={cache}"]
    if folder:
        overrides.append(f"data.prepared_dir={folder}")
    return load_splits(load_config(None, overrides).data, report=lambda m: None).all()


def build(frame, size, folder, threads=2):
    messages = []
    images = prepare.ensure_prepared(frame, size, folder, threads=threads, report=messages.append)
    return images, any(m.startswith("preparing") for m in messages)


def test_prepared_pixels_and_batches_equal_the_decode_path(phantom_root, tmp_path):
    frame = frame_of(phantom_root)
    images, built = build(frame, 71, tmp_path / "prepared")
    assert built and images.array.dtype == np.uint8 and images.array.shape == (len(frame), 71, 71)
    assert isinstance(images.array, np.memmap) and not images.array.flags.writeable
    for row, path in zip(images.rows(frame)[:10], frame["path"][:10]):
        np.testing.assert_array_equal(images.array[row], prepare_image(tf.io.read_file(path), 71).numpy()[..., 0])
    # Same images, same shuffle, same augmentation as decoding PNGs and caching them in memory.
    for training, strength in ((True, 0.5), (True, 0.0), (False, 0.0)):
        args = dict(image_size=71, batch_size=16, training=training, augment_strength=strength, seed=3)
        for _ in range(2):  # two epochs: reshuffled alike
            cached = make_dataset(frame, prepared=images, **args)
            decoded = make_dataset(frame, cache="memory", **args)
            assert cached.cardinality().numpy() == decoded.cardinality().numpy() == 4
            for (xa, ya), (xb, yb) in zip(cached, decoded):
                np.testing.assert_array_equal(ya.numpy(), yb.numpy())
                np.testing.assert_array_equal(xa["image"].numpy(), xb["image"].numpy())
                np.testing.assert_array_equal(xa["male"].numpy(), xb["male"].numpy())
    again, built = build(frame, 71, tmp_path / "prepared")
    assert not built and again.manifest_path == images.manifest_path
    subset, built = build(frame.iloc[5:20], 71, tmp_path / "prepared")  # a cache holding more is used
    assert not built


def test_stale_or_half_written_caches_are_rebuilt(phantom_root, tmp_path):
    root = copy_of(phantom_root, tmp_path)
    folder = tmp_path / "prepared"
    frame = frame_of(root)
    images, _ = build(frame, 71, folder)
    manifest = json.loads(images.manifest_path.read_text())

    def data_file():
        return json.loads(images.manifest_path.read_text())["data_file"]

    # A changed image (new size and time) makes the cache stale: rebuilt, with the new pixels.
    path = frame["path"][3]
    Image.fromarray(np.full((160, 128), 200, np.uint8)).save(path)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    fresh, built = build(frame, 71, folder)
    assert built and data_file() != manifest["data_file"]
    assert not (folder / manifest["data_file"]).exists()  # the old array is gone
    np.testing.assert_array_equal(fresh.array[fresh.index[path]], prepare_image(tf.io.read_file(path), 71).numpy()[..., 0])

    # A truncated array file (a crash mid-copy, a full disk) is never used: rebuilt.
    with open(folder / data_file(), "r+b") as f:
        f.truncate(1000)
    assert build(frame, 71, folder)[1]
    # A manifest whose array is missing: rebuilt. Leftover partial files of a killed build are ignored.
    (folder / data_file()).unlink()
    (folder / f".{images.manifest_path.stem}.dead.npy.partial").write_bytes(b"half")
    assert build(frame, 71, folder)[1]
    # A table holding an image the cache lacks: rebuilt with it.
    extra = frame.iloc[:3].copy()
    extra["path"] = [str(Path(p).with_name(f"copy{i}.png")) for i, p in enumerate(extra["path"])]
    for src, dst in zip(frame["path"][:3], extra["path"]):
        Path(dst).write_bytes(Path(src).read_bytes())
    images, built = build(pd.concat([frame, extra], ignore_index=True), 71, folder)
    assert built and images.holds(extra)


def test_gone_or_overwritten_pngs_are_served_from_the_cache(phantom_root, tmp_path):
    root = copy_of(phantom_root, tmp_path)
    frame = frame_of(root)
    before, _ = build(frame, 71, prepare.prepared_dir(load_config(None, tiny_overrides(root)).data))
    pixels = np.array(before.array)
    image_dir = Path(frame["path"][0]).parent
    for i, path in enumerate(sorted(image_dir.glob("*.png"))):
        if i % 2:  # half of them gone ...
            path.rename(tmp_path / path.name)
        else:  # ... half overwritten with garbage of the same size and time (only a decode would notice)
            stat = path.stat()
            path.write_bytes(os.urandom(stat.st_size))
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # The data check trusts the cache (no image is opened) and the same table comes back ...
    again = frame_of(root)
    pd.testing.assert_frame_equal(again, frame)
    # ... and training reads the cache without decoding anything.
    images, built = build(again, 71, prepare.prepared_dir(load_config(None, tiny_overrides(root)).data))
    assert not built
    np.testing.assert_array_equal(images.array, pixels)
    x, _ = next(iter(make_dataset(again, 71, 60, training=False, prepared=images)))
    assert x["image"].shape == (60, 71, 71, 1)
    # Without the prepared cache, the missing files are reported as usual.
    with pytest.raises(InputError, match="missing image"):
        frame_of(root, cache="memory")
    # A resolution that was never prepared cannot be built from what is left.
    with pytest.raises(InputError, match="cannot prepare images"):
        build(again, 72, prepare.prepared_dir(load_config(None, tiny_overrides(root)).data))


def test_an_undecodable_image_is_named(phantom_root, tmp_path):
    root = copy_of(phantom_root, tmp_path)
    frame = frame_of(root)
    bad = frame["path"][7]
    Path(bad).write_bytes(Path(bad).read_bytes()[:200])  # truncated PNG
    with pytest.raises(InputError, match=str(bad)):
        build(frame, 71, tmp_path / "prepared")
    assert not list((tmp_path / "prepared").glob("*.json"))  # nothing half-written
    assert not list((tmp_path / "prepared").glob("*.partial"))


def test_concurrent_callers_build_once(phantom_root, tmp_path):
    frame = frame_of(phantom_root)
    folder, results = tmp_path / "prepared", []

    def worker():  # separate opens of the lock file lock each other out, as processes do
        results.append(build(frame, 80, folder, threads=1))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(built for _, built in results) == [False, False, True]
    assert len({images.manifest_path for images, _ in results}) == 1
    assert len(list(folder.glob("*.npy"))) == 1


def test_retired_cache_values_are_named():
    with pytest.raises(InputError, match="data.cache"):
        load_config(None, ["data.cache=/tmp/boneage-cache"])


READER = r"""
import ctypes, json, sys
import pandas as pd
import tensorflow as tf
from boneage.pipeline import make_dataset
from boneage.prepare import ensure_prepared

def memory():  # MiB of this process: its share of file pages (Pss_File), its anonymous memory
    # first hand freed heap back to the system: batches read and dropped stay in glibc's per-thread
    # arenas, more of them the more threads ran at once (on a busy machine: USS +115 MiB), and
    # that memory is free, not a copy of the cache
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    fields = dict(l.split(":") for l in open("/proc/self/smaps_rollup").read().splitlines()[1:])
    kib = lambda k: int(fields[k].split()[0])
    return {"pss": kib("Pss") / 1024, "uss": (kib("Private_Clean") + kib("Private_Dirty")) / 1024,
            "pss_file": kib("Pss_File") / 1024, "anon": kib("Anonymous") / 1024}

frame, size = pd.read_csv(sys.argv[1]), int(sys.argv[2])
images = ensure_prepared(frame, size, sys.argv[3])
warm_up = tf.data.Dataset.range(256).map(lambda i: tf.fill([size, size, 1], tf.cast(i, tf.float32)))
for _ in warm_up.batch(32).prefetch(4):  # TensorFlow's own start-up allocations are not the cache's
    pass
ds = make_dataset(frame, size, 32, training=True, prepared=images)
print("loaded", flush=True)
sys.stdin.readline()  # both processes have loaded TensorFlow: its libraries' PSS is split alike
before = memory()
for epoch in range(2):
    for batch in ds:
        pass
print("read", flush=True)
sys.stdin.readline()  # measure while the other reader is alive and maps the same pages
print(json.dumps({"before": before, "after": memory()}), flush=True)
"""


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc smaps_rollup")
def test_two_readers_share_the_cache_instead_of_copying_it(tmp_path):
    """Measured here (2 cores, twice): two processes each reading a 188 MiB cache twice over grew
    their combined PSS by 225-235 MiB (the one shared copy, half of it charged to each, plus
    about 20 MiB of pipeline buffers each) and their combined USS by 38-48 MiB, where two
    private copies would be 375 MiB: 0.6x and 0.1x of that. Beside three busy processes (as under
    the suite's two xdist workers) 303 and 115 MiB until each reader trims its heap before
    measuring; since then 227/39 quiet and 218/31 busy, but once 282/95 on a machine busier still
    (the buffers grow with the load). So what is asserted is what tells sharing from copying, apart
    from the buffers: the PSS of file pages (the one cache file shared: 188 MiB in all; two files
    would be 375) and each reader's anonymous memory (18-19 MiB each; a private copy adds 188)."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12000):  # tiny PNGs prepared at 128 px: a big cache from a quick build
        Image.fromarray(rng.integers(0, 255, (24, 20), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append({"id": str(i), "path": str(folder / f"{i}.png"), "boneage": float(i % 200), "male": i % 2 == 0})
    frame = pd.DataFrame(rows)
    frame.to_csv(tmp_path / "frame.csv", index=False)
    images, _ = build(frame, 128, tmp_path / "prepared")
    two_copies = 2 * images.array.nbytes / 2**20
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(tmp_path / "frame.csv"), "128",
                                 str(tmp_path / "prepared")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}) for _ in range(2)]

    def barrier(word):
        for reader in readers:
            assert reader.stdout.readline().strip() == word
        for reader in readers:
            reader.stdin.write("go\n")
            reader.stdin.flush()

    barrier("loaded")
    barrier("read")
    reports = [json.loads(reader.communicate(timeout=300)[0]) for reader in readers]
    grew = [{k: r["after"][k] - r["before"][k] for k in r["after"]} for r in reports]
    growth = {k: sum(g[k] for g in grew) for k in grew[0]}
    print(f"two copies {two_copies:.0f} MiB; combined growth PSS {growth['pss']:.0f} MiB, USS {growth['uss']:.0f} "
          f"MiB, file pages' PSS {growth['pss_file']:.0f} MiB, anonymous {[round(g['anon']) for g in grew]} MiB")
    assert growth["pss_file"] < 0.75 * two_copies  # the readers share one cache file's pages, not two files
    for g in grew:  # neither process holds a private copy (its pipeline's buffers are far smaller)
        assert g["anon"] < 0.25 * two_copies, grew
