"""Prepared images shared through the search's storage: decoded by the first node, fetched by the
next ones (a copy is seconds; decoding full-size radiographs is minutes per node).

    store = PreparedStore.of(cfg)          # None unless tune.storage_path is a URI (s3://...)
    lines = prepare_here(cfg.data, frame, [96, 256], store, threads=4)   # on a node

`boneage.prepare` keeps each node's cache under node-local paths; here a cache travels under a
key of its content (`boneage.prepare.content_key`: the images' ids and bytes, the resolution and
the decoding code's version), so every node holding the same images, however it holds them,
asks for the same file. The store is `<tune.storage_path>/prepared-images/`, beside the
experiments, so the next search on the same data fetches it too:

    <key>.npy     the images, np.save format, rows in the order of the manifest's ids
    <key>.json    manifest: key, resolution, [id, bytes] of every row; written last (the commit point)

A folder storage (one machine, or a shared file system) needs none of this: one machine has one
cache, and a shared file system can hold it for all nodes (`data.prepared_dir`).
"""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

STORE_FOLDER = "prepared-images"
CHUNK_ROWS = 256  # rows per write while streaming an array (bounded memory at any resolution)


class PreparedStore:
    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")

    @classmethod
    def of(cls, cfg) -> "PreparedStore | None":
        from tuning.experiment import is_uri

        storage = cfg.tune.storage_path
        return cls(f"{storage.rstrip('/')}/{STORE_FOLDER}") if is_uri(storage) else None

    def _fs(self):
        import pyarrow.fs

        return pyarrow.fs.FileSystem.from_uri(self.uri)

    def manifest(self, key: str) -> dict | None:
        """The stored manifest of `key`, or None when no node published it (yet)."""
        fs, base = self._fs()
        try:
            with fs.open_input_stream(f"{base}/{key}.json") as f:
                return json.loads(f.read())
        except (FileNotFoundError, ValueError):
            return None
        except OSError as err:  # pyarrow's S3 reports a missing key as a plain OSError
            if "not found" in str(err).lower() or "nosuchkey" in str(err).lower():
                return None
            raise

    def fetcher(self, report):
        """The `fetch` hook of `boneage.prepare.ensure_prepared`: this store's copy of the
        images `paths` name (by their content key), written to `partial`."""
        def fetch(paths, image_size, partial):
            from boneage.prepare import content_key

            key = content_key(paths, image_size)
            manifest = self.manifest(key) if key else None
            if manifest is None:
                return None
            started = time.time()
            by_id = {Path(p).stem: p for p in paths}
            fs, base = self._fs()
            with fs.open_input_stream(f"{base}/{key}.npy") as source, open(partial, "wb") as target:
                while chunk := source.read(16 << 20):
                    target.write(chunk)
            size_mib = Path(partial).stat().st_size / 2**20
            report(f"fetched prepared images {key} ({len(paths)} images at {image_size} px, {size_mib:.0f} MiB) "
                   f"from {self.uri} in {time.time() - started:.1f} s, published by {manifest.get('node', '?')}")
            return [by_id[i] for i, _ in manifest["ids"]]
        fetch.source = self.uri
        return fetch

    def publish(self, images, paths, image_size: int, report) -> str | None:
        """Copy the rows of `images` (a `boneage.prepare.PreparedImages`) that `paths` name into
        the store under their content key, unless it holds them already. Returns the key."""
        import numpy as np

        from boneage.prepare import content_key

        paths = list(dict.fromkeys(map(str, paths)))
        key = content_key(paths, image_size)
        if key is None or self.manifest(key) is not None:
            return key
        started = time.time()
        fs, base = self._fs()
        if fs.type_name == "local":
            fs.create_dir(base, recursive=True)
        rows = np.array([images.index[p] for p in paths], dtype=np.int64)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": (len(paths), image_size, image_size)}
        with fs.open_output_stream(f"{base}/{key}.npy") as out:  # streamed: never a second copy on disk
            np.lib.format.write_array_header_1_0(out, header)
            for i in range(0, len(rows), CHUNK_ROWS):
                out.write(np.ascontiguousarray(images.array[rows[i:i + CHUNK_ROWS]]).tobytes())
        manifest = {"key": key, "image_size": image_size, "node": socket.gethostname(),
                    "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "ids": [[Path(p).stem, Path(p).stat().st_size] for p in paths]}
        with fs.open_output_stream(f"{base}/{key}.json") as out:  # last: a reader sees all or nothing
            out.write(json.dumps(manifest).encode())
        report(f"published prepared images {key} ({len(paths)} images at {image_size} px) to {self.uri} "
               f"in {time.time() - started:.1f} s")
        return key


def prepare_here(data_cfg, frame, sizes, store: PreparedStore | None, threads: int | None, report=print) -> None:
    """This node's prepared images at each of `sizes`: opened, else fetched from `store`, else
    decoded here and published into `store` for the next nodes."""
    from boneage.prepare import ensure_prepared, prepared_dir

    paths = list(dict.fromkeys(frame["path"].astype(str)))
    for size in sizes:
        images = ensure_prepared(frame, size, prepared_dir(data_cfg), threads=threads, report=report,
                                 fetch=store.fetcher(report) if store else None)
        if store is not None and not _fetched(images):
            store.publish(images, paths, size, report)


def _fetched(images) -> bool:
    try:
        return bool(json.loads(Path(images.manifest_path).read_text()).get("fetched"))
    except (OSError, ValueError):
        return False
