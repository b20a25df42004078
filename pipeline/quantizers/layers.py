"""Calibration activations pushed through a checkpoint's decoder one layer at a time, for layer-wise quantizers.

The layer objects are the checkpoint's own transformers classes, built on the `meta` device from its config and
given real weights one layer at a time from the safetensors files, so the whole model is never in memory. Inputs are
the calibration samples' embeddings; each layer's outputs become the next layer's inputs. Attention uses PyTorch's
SDPA with no mask, i.e. causal, as the full model does for unpadded sequences.

Forward passes run in `compute_dtype`: bfloat16 where the hardware has fast bf16 matmuls (CUDA, or CPUs with AMX or
AVX512-BF16, measured 4.6x faster than float32 here), as GPTQ implementations on GPUs run them in half precision;
Hessians are accumulated in float32, and the solver works on the checkpoint's weights in float32.
"""

from __future__ import annotations

import re

import torch

from pipeline.checkpoint import Checkpoint

LAYER = re.compile(r"^model\.layers\.(\d+)\.")
BATCH = 8  # samples per forward pass


def fast_dtype() -> torch.dtype:
    """bfloat16 where matmuls in it are fast (CUDA; CPUs with AMX or AVX512-BF16), else float32."""
    if torch.cuda.is_available():
        return torch.bfloat16
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:
        flags = []
    return torch.bfloat16 if {"amx_bf16", "avx512_bf16"} & set(flags) else torch.float32


GRAM_ROWS = 512  # tokens per partial XᵀX in the compute dtype


def gram(x: torch.Tensor) -> torch.Tensor:
    """XᵀX in float32, from partial products over GRAM_ROWS tokens each computed in x's dtype. In bfloat16 those are
    4.6x faster than float32 here; one bf16 product over all 4096 tokens of a batch rounded H enough to lose positive
    definiteness, while summing 512-token partials in float32 keeps the rounding error small."""
    if x.dtype == torch.float32:
        return x.T @ x
    total = torch.zeros(x.shape[1], x.shape[1])
    for start in range(0, x.shape[0], GRAM_ROWS):
        part = x[start : start + GRAM_ROWS]
        total += (part.T @ part).float()
    return total


class LayerStream:
    def __init__(self, source, samples: list[list[int]], linears: tuple[str, ...],
                 compute_dtype: torch.dtype | None = None):  # fmt: skip
        """`samples`: token ids of equal length; `linears`: the layer's linears to collect Hessians for, in
        quantization order (the architecture row's `gptq_linears`)."""
        self.order = linears
        self.dtype = compute_dtype or fast_dtype()
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(source.path, trust_remote_code=source.trust_remote_code)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(
                config, attn_implementation="sdpa", trust_remote_code=source.trust_remote_code
            )
        self.checkpoint = Checkpoint(source.path)
        self.n_layers = config.num_hidden_layers
        embed = self.checkpoint.tensor("model.embed_tokens.weight").float()
        ids = torch.tensor(samples)
        self.hidden = [embed[ids[i : i + BATCH]].to(self.dtype) for i in range(0, len(samples), BATCH)]
        self.position_ids = torch.arange(len(samples[0]))[None]
        rotary = type(self.model.model.rotary_emb)(config=config)
        self.rope = tuple(r.to(self.dtype) for r in rotary(self.hidden[0].float(), self.position_ids))

    def other_tensors(self):
        """The checkpoint's tensors outside the decoder layers (embeddings, final norm, lm_head)."""
        for name in self.checkpoint.names():
            if not LAYER.match(name):
                yield name, self.checkpoint.tensor(name)

    def load(self, index: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
        """Layer `index` in the compute dtype, and its parameters in float32 as the checkpoint holds them."""
        prefix = f"model.layers.{index}."
        layer = self.model.model.layers[index].to_empty(device="cpu")
        state = {n[len(prefix) :]: self.checkpoint.tensor(n).float() for n in self.checkpoint.names()
                 if n.startswith(prefix)}  # fmt: skip
        layer.load_state_dict(state, strict=True)
        return layer.to(self.dtype).eval(), state

    def forward(self, layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = layer(hidden, attention_mask=None, position_ids=self.position_ids, position_embeddings=self.rope)
        return out[0] if isinstance(out, tuple) else out

    def linears(self, layer: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
        modules = dict(layer.named_modules())
        return [(name, modules[name]) for name in self.order]

    def collect(self, index: int):
        """Layer `index` (compute dtype), its float32 parameters, and its linears grouped by shared input (q/k/v read
        one tensor, so do gate/up), each group with the Hessian 2XXᵀ/n of that input over the samples, in float32."""
        layer, state = self.load(index)
        linears = dict(self.linears(layer))
        inputs: dict[str, torch.Tensor] = {}
        sums: dict[tuple[str, ...], torch.Tensor] = {}
        counts: dict[tuple[str, ...], int] = {}

        def hook(name: str):
            def record(module, args):
                inputs[name] = args[0]

            return record

        handles = [module.register_forward_pre_hook(hook(name)) for name, module in linears.items()]
        with torch.inference_mode():
            for hidden in self.hidden:
                inputs.clear()
                self.forward(layer, hidden)
                readers: dict[int, list[str]] = {}
                for name, x in inputs.items():
                    readers.setdefault(id(x), []).append(name)
                for names in readers.values():
                    flat = inputs[names[0]].reshape(-1, inputs[names[0]].shape[-1])
                    sums[tuple(names)] = sums.get(tuple(names), 0) + gram(flat)
                    counts[tuple(names)] = counts.get(tuple(names), 0) + flat.shape[0]
        for handle in handles:
            handle.remove()
        inputs.clear()
        groups = [([(n, linears[n]) for n in names], 2 * sums[names] / counts[names]) for names in sums]
        return layer, state, groups

    def advance(self, layer: torch.nn.Module) -> None:
        """Replace the stored activations by this (quantized) layer's outputs, then let the layer's weights go: the
        skeleton keeps it on the `meta` device, so the model never accumulates in memory."""
        with torch.inference_mode():
            self.hidden = [self.forward(layer, hidden) for hidden in self.hidden]
        layer.to(device="meta")
