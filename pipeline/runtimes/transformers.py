"""Models in transformers: any torch causal LM behind the Runtime interface, and a GPTQ checkpoint loaded the way
serving stacks load it (transformers' GPTQ loader with GPTQModel's kernels, the independent judge), with a
dequantizing fallback when gptqmodel is not installed.

Mixtures of experts: transformers 5 builds experts as fused 3-D tensors, which its GPTQ loading (optimum replaces
`nn.Linear` modules by GPTQ kernels) cannot hold: measured with transformers 5.24, the per-expert GPTQ tensors are
then silently left unloaded and the experts keep random weights. GPTQModel's own loader first has defuser (a
GPTQModel dependency) swap in per-expert `nn.Linear` blocks; we do the same for the one load, with Mixtral's
checkpoint names (w1/w3/w2) mapped to the per-expert modules' (gate_proj/up_proj/down_proj), and say so in
`validated_by`. The dequantizing fallback re-fuses the experts into transformers' tensors.
"""

from __future__ import annotations

import importlib
import json
import os
from contextlib import contextmanager, nullcontext
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.archs import arch
from pipeline.runtimes.base import Runtime

PACKED = ("qweight", "qzeros", "scales", "g_idx")


class TorchRuntime(Runtime):
    """A causal LM as torch module, driven through pipeline.validate's Runtime interface."""

    def __init__(self, model, description: dict[str, Any]):
        self.model, self.description = model, description
        self.device = next(model.parameters()).device

    def logits(self, ids: list[int]) -> np.ndarray:
        with torch.inference_mode():
            return self.model(torch.tensor([ids], device=self.device)).logits[0].float().cpu().numpy()

    def greedy(self, ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
        with torch.inference_mode():
            prompt = torch.tensor([ids], device=self.device)
            out = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                                      do_sample=False, eos_token_id=sorted(stop_ids) or None,
                                      pad_token_id=next(iter(stop_ids), 0))  # fmt: skip
        return out[0, len(ids) :].tolist()

    def close(self) -> None:
        del self.model


def open_gptq(path: Path) -> TorchRuntime:
    """transformers' own GPTQ loading (the path Xinference and others take), with GPTQModel's kernels: `torch` on
    CPU, which computes with the exact weights; the default GPU kernel on CUDA. Without gptqmodel: dequantizing."""
    try:
        return _transformers_runtime(path)
    except ImportError:
        return _dequantized_runtime(path)


def _transformers_runtime(path: Path) -> TorchRuntime:
    cpu_workers()
    import gptqmodel  # noqa: F401  (transformers' GPTQ loading needs it and optimum; fail here, not half-way)
    import optimum  # noqa: F401
    from transformers import AutoModelForCausalLM, GPTQConfig

    cuda = torch.cuda.is_available()
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    experts = arch(config.get("model_type", "")).gptq_experts
    # float32 activations on CPU, as the reference runs there: the quality figure should measure the weights
    with per_expert_modules(config["model_type"]) if experts else nullcontext():
        model, info = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=GPTQConfig(bits=config["quantization_config"]["bits"], backend=None if cuda
            else "torch"), device_map="cuda" if cuda else "cpu", dtype=torch.float16 if cuda else torch.float32,
            key_mapping=expert_key_mapping(experts), output_loading_info=True)  # fmt: skip
    missing = [k for k in info["missing_keys"] if k.endswith(PACKED)]
    if missing:
        raise RuntimeError(f"transformers left {len(missing)} GPTQ tensors unloaded ({', '.join(missing[:3])} ...)")
    kernel = next(type(module).__name__ for module in model.modules() if hasattr(module, "qweight"))
    how = f"transformers {version('transformers')} with gptqmodel {version('gptqmodel')}"
    if experts:
        renamed = {k: v for k, v in experts.parts.items() if k != v}
        how += (f" (experts as per-expert GPTQ linears in defuser {version('defuser')}'s unfused blocks, as "
                f"GPTQModel's loader builds them" + "".join(f"; checkpoint's {v} loaded as {k}" for k, v in
                renamed.items()) + ")")  # fmt: skip
    return TorchRuntime(model.eval(), {
        "runtime": f"transformers {version('transformers')} + gptqmodel {version('gptqmodel')} ({kernel})",
        "device": "cuda" if cuda else "cpu",
        "validated_by": how,
    })  # fmt: skip


def expert_key_mapping(experts) -> dict[str, str] | None:
    """Checkpoint expert names -> the per-expert modules' (gate_proj, up_proj, down_proj), where they differ."""
    renamed = {rf"\.experts\.(\d+)\.{name}\.": rf".experts.\1.{part}." for part, name in
               (experts.parts.items() if experts else ()) if part != name}  # fmt: skip
    return renamed or None


@contextmanager
def per_expert_modules(model_type: str):
    """For one load, transformers' sparse-MoE block of `model_type` replaced by defuser's per-expert one (what
    GPTQModel's loader does): a block class swapped in before the model is built where defuser has one (Qwen3 MoE,
    Mixtral, Qwen3-Next), else the built model's fused experts split into per-expert linears by defuser's runtime
    defusion just before transformers' GPTQ conversion replaces linears by GPTQ kernels (Qwen 3.5 MoE,
    DeepSeek-V3). defuser patches transformers' classes and checkpoint conversion mapping for the whole process;
    everything patched is restored afterwards, so that float models load fused as before."""
    import defuser
    from defuser.model_registry import MODEL_CONFIG, PATCH
    from transformers.quantizers.quantizer_gptq import GptqHfQuantizer

    targets = [(importlib.import_module(f"transformers.{module}"), "get_checkpoint_conversion_mapping")
               for module in ("conversion_mapping", "modeling_utils")]  # fmt: skip
    replaced = MODEL_CONFIG.get(model_type, {}).get(PATCH.REPLACE_MODULE, [])
    for original, _ in replaced:
        module, name = original.rsplit(".", 1)
        targets.append((importlib.import_module(module), name))
    targets.append((GptqHfQuantizer, "_process_model_before_weight_loading"))
    missing = object()
    saved = [(module, name, getattr(module, name, missing)) for module, name in targets]
    convert = GptqHfQuantizer._process_model_before_weight_loading

    def defuse_then_convert(self, model, **kwargs):
        if not defuser.convert_model(model):
            raise RuntimeError(f"defuser {version('defuser')} could not split the experts of {model_type}")
        return convert(self, model, **kwargs)

    try:
        if replaced and not defuser.replace_fused_blocks(model_type):
            raise RuntimeError(f"defuser {version('defuser')} has no per-expert block for {model_type}")
        if not replaced:
            if model_type not in MODEL_CONFIG:
                raise RuntimeError(f"defuser {version('defuser')} does not know {model_type}")
            GptqHfQuantizer._process_model_before_weight_loading = defuse_then_convert
        yield
    finally:
        for module, name, value in saved:
            if value is not missing:
                setattr(module, name, value)
            elif hasattr(module, name):
                delattr(module, name)


def _dequantized_runtime(path: Path) -> TorchRuntime:
    """transformers on weights dequantized with our own unpacking: a weaker check, used only without gptqmodel.
    A mixture of experts' per-expert weights are re-fused into transformers' expert tensors."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.quantizers.gptq import from_checkpoint
    from pipeline.quantizers.layers import fuse_experts

    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    bits = config["quantization_config"]["bits"]
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    state = {n: t.float() for n, t in tensors.items() if not n.endswith(PACKED)}
    for name in [n.removesuffix(".qweight") for n in tensors if n.endswith(".qweight")]:
        state[f"{name}.weight"] = from_checkpoint({k: tensors[f"{name}.{k}"] for k in PACKED}, bits)
    experts = arch(config.get("model_type", "")).gptq_experts
    plain = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(plain, dtype=torch.float32)
    unexpected = model.load_state_dict(fuse_experts(state, experts) if experts else state, strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"the model has no place for {len(unexpected)} tensors ({', '.join(unexpected[:3])} ...)")
    model.tie_weights()
    why = "gptqmodel or optimum is not installed (pip install 'weightsmith[gptq]')"
    return TorchRuntime(model.eval(), {"runtime": "transformers (dequantized by weightsmith)", "device": "cpu",
                                       "validated_by": f"weightsmith's own dequantization: {why}"})  # fmt: skip


def cpu_workers() -> None:
    """GPTQModel refuses to start on 2 cores unless told how many CPU workers it may use."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
