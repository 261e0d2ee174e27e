"""tuning.prepared_store without Ray: the prepared cache's content key, and a cache published into
s3:// storage (a local moto server on 127.0.0.1) by one "node" and fetched by another that holds
the same images in another folder, instead of decoding them. Seconds: 16 phantom images at 71 px,
decoded twice (the first node, and a node whose bytes differ); and the driver's wait for the
nodes' prepare tasks, bounded by tune.prepare_timeout_s, on a local Ray."""
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from boneage.config import load_config  # noqa: E402
from boneage.prepare import content_key  # noqa: E402
from boneage.splits import load_splits  # noqa: E402
from tests.conftest import tiny_overrides  # noqa: E402
from tests.s3 import BUCKET, s3_env, s3_files  # noqa: E402,F401  (s3_env: a fixture)
from tuning.prepared_store import STORE_FOLDER, PreparedStore, prepare_here  # noqa: E402

SIZE = 71


def node(tmp_path, phantom_root, name: str):
    """A "node": its own copy of the images (another folder) and its own prepared-cache folder;
    (data config, the first 16 rows with this node's paths)."""
    root = Path(shutil.copytree(phantom_root, tmp_path / name / "data"))
    cfg = load_config(None, tiny_overrides(root) + [f"data.prepared_dir={tmp_path / name / 'prepared'}"]).data
    return cfg, load_splits(cfg, report=lambda m: None).all().iloc[:16]


def manifest(cfg) -> dict:
    (found,) = Path(cfg.prepared_dir).glob("*.json")
    return json.loads(found.read_text())


def test_content_key_follows_ids_bytes_size_and_code_not_folders_or_mtimes(phantom_root, tmp_path):
    _, a = node(tmp_path, phantom_root, "a")
    _, b = node(tmp_path, phantom_root, "b")
    key = content_key(a["path"], SIZE)
    assert key and key.endswith(f"-{SIZE}px")
    assert content_key(b["path"][::-1], SIZE) == key  # another folder, another order
    os.utime(b["path"].iloc[0], (1, 1))
    assert content_key(b["path"], SIZE) == key  # an mtime is not content
    assert content_key(a["path"], SIZE + 1) != key
    assert content_key(a["path"].iloc[1:], SIZE) != key
    with open(b["path"].iloc[0], "ab") as f:
        f.write(b"\0")  # other bytes
    assert content_key(b["path"], SIZE) != key
    os.remove(b["path"].iloc[1])
    assert content_key(b["path"], SIZE) is None  # unknown here: nothing to ask the storage for


def test_the_first_node_publishes_and_the_next_fetches_instead_of_decoding(s3_env, phantom_root, tmp_path):
    store = PreparedStore(f"s3://{BUCKET}/experiments/{STORE_FOLDER}")
    (cfg_a, a), (cfg_b, b), (cfg_c, c) = (node(tmp_path, phantom_root, n) for n in "abc")
    logs = {n: [] for n in "abc"}

    prepare_here(cfg_a, a, [SIZE], store, threads=2, report=logs["a"].append)
    assert any(m.startswith("preparing") for m in logs["a"]), logs["a"]
    key = manifest(cfg_a)["content_key"]
    assert sorted(s3_files(f"experiments/{STORE_FOLDER}")) == [f"{key}.json", f"{key}.npy"]
    assert "fetched" not in manifest(cfg_a)

    prepare_here(cfg_b, b, [SIZE], store, threads=2, report=logs["b"].append)
    assert not any(m.startswith("preparing") for m in logs["b"]), logs["b"]
    assert any(m.startswith(f"fetched prepared images {key}") for m in logs["b"]), logs["b"]
    got = manifest(cfg_b)
    assert got["fetched"] == store.uri and got["content_key"] == key
    assert {Path(p).parent for p, _, _ in got["images"]} == {Path(b["path"].iloc[0]).parent}  # node b's own paths
    # the same pixels per image, read through boneage.prepare as a trial reads them
    from boneage.prepare import ensure_prepared

    mine = ensure_prepared(a, SIZE, cfg_a.prepared_dir, report=lambda m: None)
    theirs = ensure_prepared(b, SIZE, cfg_b.prepared_dir, report=lambda m: None)
    for pa, pb in zip(a["path"], b["path"]):
        np.testing.assert_array_equal(mine.array[mine.index[pa]], theirs.array[theirs.index[pb]])
    prepare_here(cfg_b, b, [SIZE], store, threads=2, report=logs["b"].append)  # opened, not fetched again
    assert sum(m.startswith("fetched") for m in logs["b"]) == 1

    # a node whose images differ by one byte asks for another key: it decodes and publishes its own
    with open(c["path"].iloc[0], "ab") as f:
        f.write(b"\0")
    prepare_here(cfg_c, c, [SIZE], store, threads=2, report=logs["c"].append)
    assert any(m.startswith("preparing") for m in logs["c"]) and not any(m.startswith("fetched") for m in logs["c"])
    assert manifest(cfg_c)["content_key"] != key
    assert len(s3_files(f"experiments/{STORE_FOLDER}")) == 4


def test_the_driver_waits_for_the_nodes_at_most_prepare_timeout_s(phantom_root, tmp_path, capsys):
    """A local Ray of 1 CPU (about 10 s: no other test's Ray has a node whose CPUs another job
    holds). The prepare task cannot start while another task holds the node's CPU: the search
    stops after tune.prepare_timeout_s naming the node, instead of waiting for ever; with no
    node that can run a trial (an autoscaled start) it says so and leaves it to the nodes."""
    import ray

    from tuning.cluster import ClusterError
    from tuning.config import load_search_config
    from tuning.prepare import prepare_on_every_node

    cfg = load_search_config(None, tiny_overrides(phantom_root) + [
        "tune.prepare_timeout_s=3", "tune.resources.cpu=1", f"data.prepared_dir={tmp_path / 'prepared'}"])
    splits = load_splits(cfg.data, report=lambda m: None)
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        blocker = ray.remote(num_cpus=1)(lambda: __import__("time").sleep(120)).remote()  # another job's task
        node = ray.nodes()[0]
        started = time.time()
        with pytest.raises(ClusterError, match=rf"within tune.prepare_timeout_s \(3 s\) on {node['NodeManagerAddress']} "
                                               rf"\({node['NodeID'][:12]}\)"):
            prepare_on_every_node(cfg, splits)
        assert 3 <= time.time() - started < 60
        assert not list((tmp_path / "prepared").glob("*.json"))  # nothing was prepared
        ray.cancel(blocker, force=True)

        cfg.tune.resources.gpu = 1  # no node has a GPU: none can run a trial yet
        assert prepare_on_every_node(cfg, splits) == set()
        assert "no node can run a trial yet" in capsys.readouterr().out
    finally:
        ray.shutdown()
