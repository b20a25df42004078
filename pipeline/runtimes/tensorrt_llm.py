"""A TensorRT-LLM 1.2 engine run by TensorRT-LLM's `ModelRunner` (context logits for the quality figures, greedy
generation for the prompts); the worker's environment, which an engine is bound to.

Status: this module has not yet run on a GPU in this project's sessions (none was lent so far).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.runtimes.base import Runtime


def installed() -> dict[str, str | None]:
    """The versions of TensorRT-LLM and TensorRT importable here (None: not importable)."""
    versions: dict[str, str | None] = {}
    for module in ("tensorrt_llm", "tensorrt"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # ImportError, or a library that needs a driver this machine lacks
            versions[module] = None
    return versions


def environment() -> dict[str, Any]:
    """This worker's GPU and library versions, as an engine's engine.json records them."""
    import torch

    capability = torch.cuda.get_device_capability()
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    return {**installed(), "cuda_runtime": torch.version.cuda, "driver": driver, "gpu": torch.cuda.get_device_name(),
            "compute_capability": f"{capability[0]}.{capability[1]}"}  # fmt: skip


def refuse_foreign_engine(engine_dir: Path, here: dict[str, Any]) -> None:
    """Raise unless the engine was built for this worker's GPU and the TensorRT(-LLM) version it has: engines are
    bound to both."""
    info = json.loads((engine_dir / "engine.json").read_text(encoding="utf-8"))
    built = info["environment"]
    keys = ("gpu", "compute_capability", "tensorrt") + (("tensorrt_llm",) if info.get("route") != "onnx" else ())
    for key in keys:
        if here.get(key) != built.get(key):
            raise RuntimeError(f"engine built for {key} {built.get(key)}, this worker has {here.get(key)}: rebuild "
                               f"it here")  # fmt: skip


class EngineRuntime(Runtime):
    """A built engine through TensorRT-LLM's ModelRunner, behind pipeline.validate's Runtime interface."""

    def __init__(self, engine_dir: Path, here: dict[str, Any]):
        """`here`: this worker's `environment()`."""
        from tensorrt_llm.runtime import ModelRunner

        refuse_foreign_engine(engine_dir, here)

        self.runner = ModelRunner.from_dir(engine_dir=str(engine_dir), rank=0)
        self.description = {"runtime": f"tensorrt-llm {here['tensorrt_llm']}", "device": here["gpu"], **here}

    def _generate(self, ids: list[int], max_new_tokens: int, end_id: int):
        import torch

        return self.runner.generate([torch.tensor(ids, dtype=torch.int32)], max_new_tokens=max_new_tokens,
                                    end_id=end_id, pad_id=end_id, temperature=1.0, top_k=1,
                                    output_generation_logits=False, output_sequence_lengths=True,
                                    return_dict=True)  # fmt: skip

    def logits(self, ids: list[int]) -> np.ndarray:
        out = self._generate(ids, 1, -1)
        return out["context_logits"][0].float().cpu().numpy()

    def greedy(self, ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
        out = self._generate(ids, max_new_tokens, min(stop_ids) if stop_ids else -1)
        length = int(out["sequence_lengths"][0][0])
        return out["output_ids"][0][0][len(ids) : length].tolist()
