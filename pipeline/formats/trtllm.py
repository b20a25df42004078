"""TensorRT-LLM's PyTorch backend: the Hugging Face checkpoint it loads directly, and `trtllm-serve` serves.

Since mid-2026 this is TensorRT-LLM's only backend (its TensorRT engine backend was removed upstream; the engine
route, `format: tensorrt`, stays for workers pinned to TensorRT-LLM 1.2). The PyTorch backend (TensorRT-LLM 1.0 and
later) reads a Hugging Face folder as transformers saves it, so the artifact is that folder in the dtype the GPU
serves: `bf16` or `fp16`, written shard by shard from the source's safetensors files (one shard in memory), with its
config, tokenizer and chat template. Quantized checkpoints for this backend are the compressed-tensors and ModelOpt
ones, made by their own targets.

Steps: build (any machine); validate (the folder in transformers on CPU, against the source, like every artifact);
engine (a CUDA worker with TensorRT-LLM ≥ 1.0: `tensorrt_llm.LLM` loads the folder and generates greedily from the
smoke test's prompts; elsewhere `not_run` with the reason code); publish. Hand-off: `trtllm-serve.sh`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

from pipeline import handoff
from pipeline.archs import arch
from pipeline.checkpoint import Checkpoint, portable_config
from pipeline.formats.base import BuildContext, Format, engine_not_run, refuse_unless
from pipeline.formats.base import Options as BaseOptions
from pipeline.resources import ModelSize, Needs
from pipeline.types import Calibration, Manifest, SourceInfo, Status, Step, Validation

INSTALL = "pip install 'tensorrt-llm>=1.0' --extra-index-url https://pypi.nvidia.com (on a CUDA machine)"
MIN_VERSION = (1, 0)


class Options(BaseOptions):
    """Target options for TensorRT-LLM's PyTorch backend."""

    max_batch_size: int = 8
    kv_cache_fraction: float = 0.5  # of the free GPU memory, for the engine step's LLM


class TensorRTLLM(Format):
    name = "trtllm"
    quants = ("bf16", "fp16")
    extra = "trtllm"  # not a pip extra: TensorRT-LLM comes from NVIDIA's package index
    library = "transformers"
    options_model = Options
    hardware = {Step.BUILD: ("cpu", "cuda"), Step.VALIDATE: ("cpu", "cuda"), Step.ENGINE: ("cuda",)}
    options: Options

    @property
    def steps(self) -> tuple[Step, ...]:
        return (Step.BUILD, Step.VALIDATE, Step.ENGINE, Step.PUBLISH)

    def check(self, source: SourceInfo) -> None:
        refuse_unless(arch(source.model_type).trtllm_torch, "TensorRT-LLM", source.model_type, "trtllm_torch",
                      "its PyTorch backend has no model for it")  # fmt: skip

    def build(self, source: SourceInfo, out_dir: Path, ctx: BuildContext) -> dict[str, Any]:
        """The source's tensors in the target dtype, shard by shard under the source's shard names."""
        dtype = write_shards(source, out_dir, self.quant, ctx.progress)
        config = portable_config(source.config())
        config.update({"torch_dtype": dtype, "dtype": dtype})
        (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for name in [*source.tokenizer_files, "generation_config.json"]:
            if (source.path / name).is_file():
                shutil.copy(source.path / name, out_dir / name)
        return {"dtype": dtype, "backend": "pytorch", "shards": len(source.shards)}

    def needs(self, size: ModelSize, validation: Validation, calibration: Calibration) -> Needs:
        """A shard at a time, read and converted; validation in transformers in float32."""
        return Needs({Step.BUILD: 3 * size.largest_shard, Step.VALIDATE: size.float32}, disk=size.at_bits(16))

    def open_runtime(self, artifact: Path, reference, validation: Validation):
        import torch
        from transformers import AutoModelForCausalLM

        from pipeline.runtimes.transformers import TorchRuntime

        model = AutoModelForCausalLM.from_pretrained(artifact, dtype=torch.float32).eval()
        return TorchRuntime(model, {"runtime": "transformers (the folder TensorRT-LLM's PyTorch backend loads)",
                                    "device": "cpu"})  # fmt: skip

    def engine(self, artifact: Path, reference, validation: Validation, inputs) -> dict[str, Any]:
        """Load the folder in TensorRT-LLM's LLM API on this CUDA worker and generate from the smoke prompts."""
        why = unavailable()
        if why:
            return engine_not_run(*why)
        return run_llm_api(artifact, reference, validation, self.options)

    def handoff_files(self, artifact: Path, manifest: Manifest, chat: dict[str, Any]) -> dict[str, str]:
        """A trtllm-serve script (PyTorch backend, the folder itself as the model)."""
        serve = ["trtllm-serve", ".", "--backend", "pytorch", "--max_batch_size", str(self.options.max_batch_size),
                 "--host", "127.0.0.1", "--port", "8000"]  # fmt: skip
        return {"trtllm-serve.sh": handoff.script(serve)}


def write_shards(source: SourceInfo, out_dir: Path, quant: Literal["bf16", "fp16"], progress) -> str:
    """Every source tensor converted to `quant` (floating point ones; others as they are), one shard at a time."""
    import torch
    from safetensors.torch import save_file

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[quant]
    checkpoint = Checkpoint(source.path)
    by_shard: dict[Path, list[str]] = {}
    for name in checkpoint.names():
        by_shard.setdefault(checkpoint.shard(name), []).append(name)
    done, total = 0, len(checkpoint.names())
    for shard, names in by_shard.items():
        tensors = {}
        for name in names:
            tensor = checkpoint.tensor(name)
            tensors[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
            done += 1
            if progress:
                progress(done, total, "tensors")
        save_file(tensors, out_dir / shard.name, metadata={"format": "pt"})
    index = source.path / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        total_size = sum((out_dir / shard.name).stat().st_size for shard in by_shard)
        data["metadata"] = {"total_size": total_size}
        (out_dir / index.name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return {"bf16": "bfloat16", "fp16": "float16"}[quant]


def unavailable() -> tuple[str, str] | None:
    """(reason code, detail) why TensorRT-LLM's PyTorch backend cannot run here, or None."""
    import torch

    if not torch.cuda.is_available():
        return "no_cuda_device", "torch sees no CUDA device"
    try:
        import tensorrt_llm
    except ImportError:
        return "tensorrt_llm_not_installed", f"TensorRT-LLM is not importable here; {INSTALL}"
    found = tuple(int(p) for p in tensorrt_llm.__version__.split(".")[:2] if p.isdigit())
    if found < MIN_VERSION:
        return (
            "tensorrt_llm_version_mismatch",
            f"installed {tensorrt_llm.__version__}; the PyTorch backend route "
            f"needs 1.0 or later (1.2 and older: format tensorrt)",
        )
    return None


def run_llm_api(artifact: Path, reference, validation: Validation, options: Options) -> dict[str, Any]:
    """Greedy generation from the reference's (chat-templated) prompts in TensorRT-LLM's LLM API; the tokens are
    compared with the source's greedy continuation."""
    import tensorrt_llm
    from tensorrt_llm import LLM, SamplingParams
    from tensorrt_llm.llmapi import KvCacheConfig

    from pipeline.validate import common_prefix

    llm = LLM(model=str(artifact), max_batch_size=options.max_batch_size,
              kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=options.kv_cache_fraction))  # fmt: skip
    try:
        params = SamplingParams(max_tokens=validation.max_new_tokens, temperature=0.0, top_k=1)
        cases = []
        for case in reference.prompts:
            out = llm.generate([case.ids], params)[0].outputs[0]
            tokens = list(out.token_ids)
            cases.append({"prompt": case.prompt, "text": out.text, "tokens": len(tokens),
                          "matching_prefix": common_prefix(tokens, case.expected)})  # fmt: skip
    finally:
        llm.shutdown()
    built = {"status": Status.OK, "backend": "pytorch", "tensorrt_llm": tensorrt_llm.__version__}
    ok = all(c["tokens"] for c in cases)
    smoke = {"status": Status.OK if ok else Status.FAILED, "reason": None if ok else "generated no tokens",
             "generation": {"cases": cases}}  # fmt: skip
    return {"build": built, "smoke": smoke}
