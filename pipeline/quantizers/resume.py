"""Finished layers of a layer-wise quantization, kept on disk so that a killed or failed run resumes at the next layer.

A GPTQ run over a large model takes hours; a kill (a preempted worker, an out-of-memory kill, a deploy) used to
throw all of it away. After each layer the quantizer hands `LayerStore.save` what it wrote for that layer (tensor
names in writing order, the tensors, the layer's report entry) and the calibration activations that come out of it
(the next layer's inputs). A rerun with the same inputs (`key`: source files, calibration samples, quantization
settings, compute dtype, solver threads, torch version) replays the finished layers from disk into the checkpoint
writer and continues from the stored activations, so its output is byte-for-byte the uninterrupted run's; a rerun
with other inputs starts afresh.

Each layer is one safetensors file, written to a temporary name, fsynced and renamed: the file is there whole or not
at all. The activations after the newest layer are written first and the layer file last, so a layer counts as
finished only when its activations are on disk too; older activations are deleted as newer ones land. The folder
lives beside the artifact's (`.<folder>.layers`) and is deleted once the checkpoint is complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from pipeline.files import fsync_dir, write_json

VERSION = 1  # bump when what a layer file holds, or the computation behind it, changes
log = logging.getLogger("weightsmith")


class LayerStore:
    def __init__(self, folder: Path, key: dict[str, Any]):
        self.folder = folder
        self.key = {**key, "version": VERSION}
        stored = folder / "key.json"
        if folder.is_dir() and (not stored.is_file() or json.loads(stored.read_text(encoding="utf-8")) != self.key):
            log.info("gptq: finished layers in %s are from other inputs; starting afresh", folder.name)
            shutil.rmtree(folder)
        if not folder.is_dir():
            folder.mkdir(parents=True)
            write_json(stored, self.key)

    def _layer(self, index: int) -> Path:
        return self.folder / f"layer-{index:05d}.safetensors"

    def _hidden(self, index: int) -> Path:
        return self.folder / f"hidden-{index:05d}.safetensors"

    def finished(self) -> int:
        """How many layers, from the first, are finished (each layer file present, and the activations after the
        last of them)."""
        count = 0
        while self._layer(count).is_file():
            count += 1
        while count and not self._hidden(count - 1).is_file():  # cannot happen with save's order; be safe anyway
            count -= 1
        return count

    def load(self, index: int) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
        """Layer `index`'s written tensors, in writing order, and its report entry."""
        from safetensors import safe_open

        with safe_open(self._layer(index), framework="pt") as fh:
            meta = fh.metadata()
            names = json.loads(meta["names"])
            return [(name, fh.get_tensor(name)) for name in names], json.loads(meta["entry"])

    def hidden(self, index: int) -> list:
        """The calibration activations after layer `index`, batch by batch."""
        from safetensors.torch import load_file

        batches = load_file(self._hidden(index))
        return [batches[str(b)] for b in range(len(batches))]

    def save(self, index: int, written: list[tuple[str, Any]], entry: dict[str, Any], hidden: list) -> None:
        """Record layer `index` as finished: the activations after it, then its tensors and report entry."""
        self._write(self._hidden(index), {str(b): h.contiguous() for b, h in enumerate(hidden)}, {})
        self._write(self._layer(index), dict(written), {"names": json.dumps([n for n, _ in written]),
                                                        "entry": json.dumps(entry)})  # fmt: skip
        if index and self._hidden(index - 1).is_file():
            self._hidden(index - 1).unlink()

    def _write(self, path: Path, tensors: dict, metadata: dict[str, str]) -> None:
        from safetensors.torch import save_file

        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, tmp, metadata={"format": "pt", **metadata})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(self.folder)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
