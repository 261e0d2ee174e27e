"""The retrain's checkpoint: a killed retrain continues from its last finished epoch, not epoch 1.

    saver = RetrainCheckpoint(exp, tuned_cfg, splits.fingerprint)
    resume = saver.latest()                        # a boneage.train.Resume, or None
    progress = Progress(resume)                    # boneage.progress
    train(cfg, splits, callbacks=[saver.callback(progress)], resume=resume, progress=progress)
    saver.clear()                                  # once the export is in the storage
    saver.close()                                  # in any case: the local copy of a remote one

Every epoch the full model (with its optimizer state, so the cosine schedule goes on where it
was) and the history so far go into the experiment's storage (a folder or s3://, through
`tuning.experiment.Experiment`) under retrain_checkpoint/<key>/. The key hashes the tuned config
and the data's fingerprint: a rerun whose best config (or data) differs never continues another
retrain. Each file is written once under a new name (model-0003.keras, then state-0003.json
naming it) before the previous epoch's are deleted, so a kill at any moment leaves a whole
checkpoint: the newest state file that reads and whose model is there. `python -m tuning.search
--retrain-only EXPERIMENT` (or `--resume` of a search whose retrain was killed) continues it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

RETRAIN_CHECKPOINT = "retrain_checkpoint"


def checkpoint_key(cfg, data_fingerprint: str) -> str:
    """The same tuned config on the same data gives the same key, on any node and after a
    round trip through the saved YAML (floats keep their repr, tuples read back as lists)."""
    text = json.dumps({"config": dataclasses.asdict(cfg), "data": data_fingerprint}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class RetrainCheckpoint:
    def __init__(self, exp, cfg, data_fingerprint: str):
        self.exp = exp
        self.folder = f"{RETRAIN_CHECKPOINT}/{checkpoint_key(cfg, data_fingerprint)}"
        self.old: list[str] = []  # files of the storage's folder to delete after the next save
        self.scratch: Path | None = None  # the fetched copy of a remote checkpoint

    def latest(self):
        """The newest whole checkpoint of this config in the storage as a Resume, or None."""
        from boneage.train import Resume

        if not self.exp.fetch(self.folder):
            return None
        local = self.exp.local_dir / self.folder
        if self.exp.remote:  # out of local_dir, which the driver publishes at the end
            self.scratch = Path(tempfile.mkdtemp(prefix="boneage-retrain-"))
            local = Path(shutil.move(str(local), str(self.scratch / "checkpoint")))
            shutil.rmtree(self.exp.local_dir / RETRAIN_CHECKPOINT, ignore_errors=True)
        names = sorted(p.name for p in local.iterdir())
        self.old = sorted(names, key=lambda n: not n.startswith("state-"))  # states first: never a dangling one
        for name in reversed([n for n in names if n.startswith("state-")]):
            try:
                state = json.loads((local / name).read_text())
                model = local / state["model"]
                if model.is_file():
                    return Resume(str(model), int(state["epoch"]), history=state["history"])
            except (OSError, ValueError, KeyError, TypeError):  # cut off while it was written
                continue
        return None

    def save(self, model, epoch: int, history: dict) -> None:
        model_name, state_name = f"model-{epoch:04d}.keras", f"state-{epoch:04d}.json"
        with tempfile.TemporaryDirectory() as scratch:
            local = Path(scratch) / self.folder
            local.mkdir(parents=True)
            model.save(local / model_name)
            (local / state_name).write_text(json.dumps({"epoch": epoch, "model": model_name, "history": history}))
            self._make_folder()
            self.exp.publish([f"{self.folder}/{model_name}"], scratch)  # the model first, then
            self.exp.publish([f"{self.folder}/{state_name}"], scratch)  # the state that names it
        for name in self.old:
            if name not in (model_name, state_name):
                self.exp.delete(f"{self.folder}/{name}")
        self.old = [state_name, model_name]

    def _make_folder(self) -> None:
        """pyarrow copies a file into a local folder (or file://) only when the folder exists."""
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(f"{self.exp.uri}/{self.folder}")
        fs.create_dir(path, recursive=True)

    def callback(self, progress):
        """A Keras callback saving a checkpoint after every epoch that did not diverge; it runs
        after `progress` (boneage.progress.Progress), whose history it saves."""
        import keras

        saver = self

        class SaveRetrainCheckpoint(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if not progress.diverged:
                    saver.save(self.model, epoch + 1, progress.history)

        return SaveRetrainCheckpoint()

    def clear(self) -> None:
        """Delete every retrain checkpoint of the experiment (this config's and stale ones)."""
        self.exp.delete(RETRAIN_CHECKPOINT)

    def close(self) -> None:
        """Remove the local copy of a remote checkpoint (the storage keeps it)."""
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None
