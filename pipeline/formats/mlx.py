"""MLX, Apple's array framework (mlx-lm, LM Studio, Xinference's MLX engine).

The conversion is mlx-lm's own (`mlx_lm.convert`): dtype conversion, affine quantization (2-8 bits, group size
32/64/128) and mlx-lm's mixed recipes (`mixed_4_6` ...: more bits for v_proj, down_proj and lm_head in the layers
llama.cpp's Q4_K_M favours). The folder it writes is what `mlx_lm.load` and LM Studio load: config.json with its
`quantization` block, safetensors, tokenizer, chat template, model card.

mlx-lm reads the source's config.json itself and, for the common architectures, takes `rope_theta` only from the
top level; transformers 5 writes it only under `rope_parameters`, and mlx-lm then silently uses its own default
(wrong logits, no error). So conversion reads the source through a shadow folder whose config.json carries the
portable keys (`pipeline.source.portable_config`), and the artifact keeps them. The artifact also gets the source's
own tokenizer files back: mlx-lm re-saves the tokenizer AutoTokenizer gave it, and for some configs transformers 5
swaps in a model-specific class with a different pre-tokenizer.

The smoke test runs the artifact with mlx-lm on whatever MLX backend the worker has (Metal on Apple silicon, CUDA,
or the CPU backend of `mlx[cpu]` on Linux) and records which. On the CPU backend the model is run with float32
activations: MLX's CPU kernels for bfloat16/float16 activations were measured ~25x less accurate and ~9x slower
than float32 on this project's machines, so float32 measures the artifact's weights rather than the CPU kernels.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from pipeline.formats import FormatError, check_group_size

FLOATS = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
BITS = {"q2": 2, "q3": 3, "q4": 4, "q5": 5, "q6": 6, "q8": 8}
MIXED = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")  # mlx-lm's own recipes
QUANTS = (*FLOATS, *BITS, *MIXED)
EXTRA = "mlx"
HARDWARE = {"build": ("apple", "cpu", "cuda"), "smoke": ("apple", "cpu", "cuda")}
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3")  # also what this project tests end to end


class Options(BaseModel):
    """Target options for MLX."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    group_size: Literal[32, 64, 128] = 64  # values sharing one scale and bias (quantized quants)
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"  # unquantized tensors (auto: the source's)


def check_options(quant: str, options: Options) -> None:
    if quant in FLOATS and options.dtype not in ("auto", FLOATS[quant]):
        raise FormatError(f"mlx {quant} stores {FLOATS[quant]}: dtype {options.dtype} contradicts it")


def missing_dependency(step: str, target) -> str | None:
    try:
        import mlx.core  # noqa: F401
        import mlx_lm  # noqa: F401
    except ImportError as exc:
        return f"MLX is not installed ({exc.name}): pip install 'weightsmith[{EXTRA}]' (mlx[cpu] on Linux)"
    return None


def check(source, target) -> None:
    options = Options.model_validate(target.options)
    check_options(target.quant, options)
    if target.quant not in FLOATS:
        check_group_size(source, options.group_size)
    if source.model_type not in SUPPORTED:
        raise FormatError(f"MLX export is not set up for architecture {source.model_type!r} "
                          f"(supported: {', '.join(SUPPORTED)})")  # fmt: skip


def backend() -> str:
    import mlx.core as mx

    if mx.metal.is_available():
        return "metal"
    if getattr(mx, "cuda", None) is not None and mx.cuda.is_available():
        return "cuda"
    return "cpu"


def build(source, target, out_dir: Path, *, name: str, progress=None, calibration=None) -> dict[str, Any]:
    from mlx_lm import convert

    options = Options.model_validate(target.options)
    dtype = FLOATS.get(target.quant) or (None if options.dtype == "auto" else options.dtype)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as scratch:
        shadow = _portable_source(source.path, Path(scratch) / "source")
        converted = Path(scratch) / "converted"  # mlx-lm insists on creating its output folder itself
        convert(
            str(shadow),
            mlx_path=str(converted),
            quantize=target.quant not in FLOATS,
            q_group_size=options.group_size,
            q_bits=BITS.get(target.quant, 4),
            dtype=dtype,
            quant_predicate=target.quant if target.quant in MIXED else None,
            trust_remote_code=source.trust_remote_code,
        )
        for item in converted.iterdir():
            shutil.move(str(item), out_dir / item.name)
    for name in source.tokenizer_files:  # mlx-lm re-saves the tokenizer it loaded; AutoTokenizer may have swapped
        shutil.copy(source.path / name, out_dir / name)  # in a model-specific class: ship the source's own files
    config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    quantization = config.get("quantization")
    return {
        "mlx_lm": _version("mlx-lm"),
        "mlx": _version("mlx"),
        "dtype": config.get("torch_dtype"),
        "quantization": {k: v for k, v in (quantization or {}).items() if not isinstance(v, dict)} or None,
        "built_with_backend": backend(),
    }


def _portable_source(source: Path, shadow: Path) -> Path:
    """A folder of links to the source's files, with a config.json that older readers understand."""
    from pipeline.source import portable_config

    shadow.mkdir()
    for item in source.iterdir():
        if item.name != "config.json":
            os.symlink(item.resolve(), shadow / item.name)
    config = portable_config(json.loads((source / "config.json").read_text(encoding="utf-8")))
    (shadow / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return shadow


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


CPU_EVAL_TOKENS = 512  # MLX's CPU backend ran this project's models at ~90 ms a token: one context, not all


def smoke(artifact_dir: Path, reference, validation) -> dict[str, Any]:
    from pipeline.validate import smoke_test

    runtime = MlxRuntime(artifact_dir)
    return smoke_test(runtime, reference, validation, CPU_EVAL_TOKENS if runtime.backend == "cpu" else None)


class MlxRuntime:
    """An MLX artifact loaded with mlx-lm, driven through pipeline.validate's Runtime interface."""

    def __init__(self, path: Path):
        import mlx.core as mx
        from mlx_lm import load

        self.mx = mx
        self.model, self.tokenizer = load(str(path))
        self.backend = backend()
        compute = "stored dtype"
        if self.backend == "cpu":
            self.model.set_dtype(mx.float32)  # see the module docstring
            compute = "float32"
        self.description = {
            "runtime": f"mlx-lm {_version('mlx-lm')} (mlx {mx.__version__})",
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
