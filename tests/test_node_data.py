"""Data that each node of a cluster holds its own way (issue 16, Why items 2-4), in-process.

One file system plays the nodes: a small phantom set's training images are moved between
Kaggle's flat layout (`root/boneage-training-dataset/ID.png`), its nested one
(`root/boneage-training-dataset/boneage-training-dataset/ID.png`), none (a head holding only the
label CSV) and only the prepared cache, at the same `data.root`, as each node of a cluster sees
its own disk there. The node-side functions run as Ray would run them on each node
(`tuning.prepare._check_on_node`, `_prepare_on_node`, `tuning.nodecheck.data_problems`): no Ray,
no training. The tests that build a prepared cache import TensorFlow (about 6 s, once).
"""
import shutil
from pathlib import Path

import pytest

from boneage import data, phantom
from boneage.errors import InputError
from boneage.splits import fingerprint, here, load_splits, make_splits, read_table
from tuning.config import load_search_config
from tuning.nodecheck import data_problems
from tuning.prepare import _check_on_node, _prepare_on_node

N = 14
QUIET = dict(report=lambda m: None)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """N phantom radiographs, 72x72 px, flat layout (phantom.generate's)."""
    return phantom.generate(tmp_path_factory.mktemp("phantom") / "data", N, seed=3, width=72, height=72)


@pytest.fixture
def node(images, tmp_path):
    """A `data.root` whose training images a test lays out as each node holds them."""
    root = Path(shutil.copytree(images, tmp_path / "root"))
    pngs = tmp_path / "pngs"
    shutil.move(root / "boneage-training-dataset", pngs)

    def hold(layout: str, broken=()) -> Path:
        """layout: 'flat', 'nested' or 'csv' (no image folder); `broken` ids get bytes that are no PNG."""
        flat = root / "boneage-training-dataset"
        shutil.rmtree(flat, ignore_errors=True)
        if layout != "csv":
            folder = flat / flat.name if layout == "nested" else flat
            shutil.copytree(pngs, folder)
            for id_ in broken:
                (folder / f"{id_}.png").write_bytes(b"not a png")
        return root

    hold.root, hold.ids = root, sorted(p.stem for p in pngs.glob("*.png"))
    return hold


def search_cfg(root, tmp_path, *overrides):
    return load_search_config(None, [f"data.root={root}", "data.val_fraction=0.2", "data.test_fraction=0.2",
                                     f"data.prepared_dir={tmp_path / 'prepared'}", *overrides])


def driver_splits_from_node(cfg, hold, layout, broken=()):
    """What the search does for a head holding only the label CSV (tuning.prepare.splits_from_a_node),
    with the first node's task called in-process after its disk is laid out."""
    root, table = read_table(cfg.data, images=False, **QUIET)  # the head: labels only
    assert not (root / "boneage-training-dataset").exists()
    hold(layout, broken)  # the first node's disk
    kept, sizes, messages = _check_on_node(cfg.data, table.drop(columns="path"))
    return make_splits(cfg.data, root, table[table["id"].isin(kept)], sizes, **QUIET), messages


def test_csv_only_head_and_workers_with_their_own_layouts(node, tmp_path):
    """Why 2: the head's splits carry flat paths; a nested worker reads its own, and the node
    check compares image bytes, not only labels."""
    cfg = search_cfg(node.root, tmp_path)
    node("csv")
    splits, messages = driver_splits_from_node(cfg, node, "nested")
    assert splits.fingerprint and messages == []
    assert not Path(splits.train["path"].iloc[0]).exists()  # the head's own guess of a path
    for layout in ("nested", "flat"):
        node(layout)
        local = here(splits, cfg.data)
        assert all(Path(p).is_file() for p in local.all()["path"]), layout
        assert list(local.train["id"]) == list(splits.train["id"])
        assert data_problems(splits.fingerprint, cfg, splits) == [], layout
    # a node whose image differs (other bytes, same id) is named, not trained on
    other = data.find_image_dir(node.root, "training") / f"{splits.train['id'].iloc[0]}.png"
    phantom.generate(tmp_path / "other", 2, seed=9, width=96, height=96)
    shutil.copy(next((tmp_path / "other" / "boneage-training-dataset").glob("*.png")), other)
    (problem,) = data_problems(splits.fingerprint, cfg, splits)
    assert "holds other images than the search's" in problem and splits.fingerprint in problem
    node("csv")  # a worker without the images
    (problem,) = data_problems(splits.fingerprint, cfg, splits)
    assert problem.startswith(f"data.root {node.root}:") and "no image folder" in problem


def test_drop_invalid_is_decided_by_one_node_and_applied_by_all(node, tmp_path):
    """Why 3: with data.drop_invalid and a CSV-only head, the first node decides which rows go;
    the splits hold only the rest, and every node checks those (a bad image elsewhere is its own)."""
    cfg = search_cfg(node.root, tmp_path, "data.drop_invalid=true")
    bad = node.ids[4]
    node("csv")
    splits, messages = driver_splits_from_node(cfg, node, "nested", broken=[bad])
    assert len(splits.all()) == N - 1 and bad not in set(splits.all()["id"])
    assert len(messages) == 1 and f"{bad}.png" in messages[0] and "unreadable image" in messages[0]
    node("flat", broken=[bad])  # another node with the same data, its own layout
    assert data_problems(splits.fingerprint, cfg, splits) == []
    kept = splits.train["id"].iloc[0]
    node("flat", broken=[bad, kept])  # a node with another bad image: named, the search stopped
    (problem,) = data_problems(splits.fingerprint, cfg, splits)
    assert f"{kept}.png" in problem and "1 of 13 images cannot be used here" in problem
    # the driver with the images decides the same rows, so the same splits
    node("flat", broken=[bad])
    on_driver = load_splits(cfg.data, **QUIET)
    assert on_driver.fingerprint == splits.fingerprint
    assert list(on_driver.test["id"]) == list(splits.test["id"])


def test_drop_invalid_without_a_node_holding_images_is_refused(node, tmp_path, monkeypatch):
    """Why 3, where it cannot be decided: an autoscaled head with only the CSV and no worker up."""
    pytest.importorskip("ray")
    from tuning import prepare

    monkeypatch.setattr(prepare, "_trial_nodes", lambda cfg: [])  # a cluster with no worker yet
    node("csv")
    with pytest.raises(InputError, match="data.drop_invalid: true needs a node holding the images"):
        prepare.splits_from_a_node(search_cfg(node.root, tmp_path, "data.drop_invalid=true"))
    splits = prepare.splits_from_a_node(search_cfg(node.root, tmp_path))
    assert len(splits.all()) == N and splits.fingerprint == ""  # each node checks its own images


def test_without_drop_invalid_a_bad_image_on_the_deciding_node_is_one_message(node, tmp_path):
    cfg = search_cfg(node.root, tmp_path)
    node("csv")
    with pytest.raises(InputError) as err:
        driver_splits_from_node(cfg, node, "flat", broken=[node.ids[0], node.ids[1]])
    text = str(err.value)
    assert f"{node.ids[0]}.png" in text and f"{node.ids[1]}.png" in text
    assert "2 of 14 images cannot be used here" in text and "data.drop_invalid: true" in text


def test_a_node_that_kept_only_its_prepared_cache(node, tmp_path):
    """Why 4 (and 2's prepare step): a nested node prepares the driver's splits, then its PNGs
    and their folder go; it still resolves its image folder, passes the fingerprint check
    against a driver that has the PNGs, and serves the images from the cache."""
    pytest.importorskip("tensorflow")
    from boneage.prepare import ensure_prepared, prepared_dir

    cfg = search_cfg(node.root, tmp_path)
    node("flat")
    driver = load_splits(cfg.data, **QUIET)
    node("nested")
    _prepare_on_node(cfg.data, driver, [72], 1, None)  # the old code: "cannot prepare images: 14 missing"
    shutil.rmtree(node.root / "boneage-training-dataset")
    with pytest.raises(InputError, match="no image folder"):
        data.find_image_dir(node.root, "training")  # without the cache, as before
    nested = node.root / "boneage-training-dataset" / "boneage-training-dataset"
    assert data.find_image_dir(node.root, "training", {str(nested)}) == nested
    assert data_problems(driver.fingerprint, cfg, driver) == []
    local = here(driver, cfg.data)
    messages = []
    ensure_prepared(local.all(), 72, prepared_dir(cfg.data), threads=1, report=messages.append)
    assert not any(m.startswith("preparing") for m in messages)  # opened, not rebuilt
    # the same node as a head: it holds the images (images_here), and fingerprints them the same
    from tuning.search import images_here

    assert images_here(cfg, "auto")
    assert load_splits(cfg.data, **QUIET).fingerprint == driver.fingerprint
    with pytest.raises(InputError, match="image not found"):
        fingerprint(local.all())  # the files alone cannot say their bytes: never a size of -1

