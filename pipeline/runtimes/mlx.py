"""An MLX folder in mlx-lm, on whatever MLX backend the worker has (Metal on Apple silicon, CUDA, or the CPU
backend of `mlx[cpu]` on Linux).

On the CPU backend the model runs with float32 activations for validation: MLX's CPU kernels for bfloat16/float16
activations were measured ~25x less accurate and ~9x slower than float32 on this project's machines, so float32
measures the artifact's weights rather than the CPU kernels. `stored_dtype=True` runs it as `mlx_lm.server` does, in
the dtype the folder stores (the serve check's reference replies).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from pipeline.runtimes.base import Runtime


def backend() -> str:
    import mlx.core as mx

    if mx.metal.is_available():
        return "metal"
    if getattr(mx, "cuda", None) is not None and mx.cuda.is_available():
        return "cuda"
    return "cpu"


def package_version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


class MlxRuntime(Runtime):
    def __init__(self, path: Path, stored_dtype: bool = False):
        import mlx.core as mx
        from mlx_lm import load

        self.mx = mx
        self.model, self.tokenizer = load(str(path))
        self.backend = backend()
        compute = "stored dtype"
        if self.backend == "cpu" and not stored_dtype:
            self.model.set_dtype(mx.float32)  # see the module docstring
            compute = "float32"
        self.description = {
            "runtime": f"mlx-lm {package_version('mlx-lm')} (mlx {mx.__version__})",
            "device": self.backend,
            "backend": self.backend,
            "compute_dtype": compute,
        }

    def logits(self, ids: list[int]) -> np.ndarray:
        out = self.model(self.mx.array([ids]))
        return np.array(out[0].astype(self.mx.float32))

    def greedy(self, ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
        from mlx_lm.generate import generate_step

        out: list[int] = []
        steps = generate_step(self.mx.array(ids), self.model, max_tokens=max_new_tokens,
                              sampler=lambda logprobs: self.mx.argmax(logprobs, axis=-1))  # fmt: skip
        for token, _ in steps:
            out.append(int(token))
            if out[-1] in stop_ids or len(out) >= max_new_tokens:
                break
        return out

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def chat_template(self) -> dict[str, str] | None:
        template = self.tokenizer.chat_template
        if template is None:
            return None
        return {"template": template, "bos_token": self.tokenizer.bos_token or "",
                "eos_token": self.tokenizer.eos_token or ""}  # fmt: skip

    def close(self) -> None:
        del self.model
        self.mx.clear_cache()
