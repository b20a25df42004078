"""Activations pushed through a checkpoint's decoder one layer at a time: calibration samples for layer-wise
quantizers (GPTQ), and the held-out chunks and prompts of a reference computed without loading the whole model
(`pipeline.reference_stream`, which also uses `head` and the key/value caches `forward` takes).

The layer objects are the checkpoint's own transformers classes, built on the `meta` device from its config and
given real weights one layer at a time from the safetensors files, so the whole model is never in memory; each
layer's outputs become the next layer's inputs. With `capture` (GPTQ) the first layer's inputs and every layer's other
arguments come from the model's own forward over the samples, run once with each decoder layer replaced by a
recorder: embedding scales (Gemma, Granite), rotary embeddings and masks per layer type (sliding/global, linear
attention), per-layer inputs (Gemma 4) are then the model's own, whatever the architecture; only the non-layer
modules (embeddings, rotary, final norm) are given weights for that. Without it (the streamed reference) inputs are
the samples' embeddings and attention uses PyTorch's SDPA with no mask, i.e. causal, as Llama-style models do for
unpadded sequences.

Forward passes run in `compute_dtype`: bfloat16 where the hardware has fast bf16 matmuls (CUDA, or CPUs with AMX or
AVX512-BF16, measured 4.6x faster than float32 here), as GPTQ implementations on GPUs run them in half precision;
Hessians are accumulated in float32, and the solver works on the checkpoint's weights in float32.

Mixtures of experts (an architecture row with `gptq_experts`): the router sends each token to a few experts, so each
expert is calibrated on the tokens routed to it. A pre-hook on transformers' fused experts module sees the tokens and
the router's top-k choice; per expert, gate/up's Hessian comes from its tokens and down's from act(gate(x))·up(x) of
those tokens, through the module's own activation (gpt-oss's clamped SwiGLU with biases). Llama 4 passes no choice:
its experts get expert-major blocks of every token, scaled by the router's sigmoid score (0 where not chosen), and
an expert's tokens are its block's non-zero rows, as scaled. An expert that saw fewer than `expert_floor` tokens (few
tokens make a Hessian of low rank, which GPTQ fits to those tokens at the expense of every other input; none make no
Hessian at all) is calibrated on every token of the layer instead ("topped up"), and the coverage record says which.
"""

from __future__ import annotations

import re
import statistics

import torch

from pipeline.archs import Experts
from pipeline.checkpoint import LAYER, Checkpoint, decoder_prefix

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


def fuse_experts(state: dict[str, torch.Tensor], experts: Experts) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (any name prefix) under transformers 5's module names: each layer's per-expert gate and up
    stacked into `experts.gate_up_proj` (gate rows first), the downs into `experts.down_proj`, and the checkpoint's
    block renamed to transformers' (Mixtral's `block_sparse_moe.gate` is `mlp.gate`). transformers does the same at
    `from_pretrained`; the layer stream and the dequantizing runtime build modules from tensors themselves."""
    if experts.fused:
        return fuse_transposed(state, experts)
    parts = {name: part for part, name in experts.parts.items()}
    pattern = re.compile(rf"^((?:.*\.)?){re.escape(experts.block)}\.experts\.(\d+)\.([^.]+)\.weight$")
    block = re.compile(rf"^((?:.*?\.)?){re.escape(experts.block)}\.")
    out: dict[str, torch.Tensor] = {}
    found: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for name, tensor in state.items():
        match = pattern.match(name)
        if match and match[3] in parts:
            found.setdefault(match[1], {}).setdefault(parts[match[3]], {})[int(match[2])] = tensor
        else:
            out[block.sub(rf"\g<1>{experts.module}.", name, count=1)] = tensor
    for prefix, by_part in found.items():
        gate, up, down = (by_part[p] for p in ("gate_proj", "up_proj", "down_proj"))
        fused = f"{prefix}{experts.module}.experts."
        out[f"{fused}gate_up_proj"] = torch.stack([torch.cat([gate[e], up[e]]) for e in range(len(gate))])
        out[f"{fused}down_proj"] = torch.stack([down[e] for e in range(len(down))])
    return out


def transposed(module: torch.nn.Module, experts: Experts) -> bool:
    """Whether transformers' fused experts module holds its weights [experts, in, out], not [experts, out, in]: where
    the checkpoint keeps them fused (the module loads them as they are; Llama 4's module, which transformers'
    `use_experts_implementation` decorator does not mark, has no other sign of it), or where the decorator says so."""
    return experts.fused or bool(getattr(module, "is_transposed", False))


def fuse_transposed(state: dict[str, torch.Tensor], experts: Experts) -> dict[str, torch.Tensor]:
    """fuse_experts for a row whose checkpoint keeps the fused tensors (`Experts.fused`): the per-expert linears and
    biases back into gate_up_proj [experts, in, 2·inter] (gate_proj's rows, then up_proj's: the inverse of
    `Experts.unfused`), down_proj [experts, inter, out] and their `_bias`."""
    pattern = re.compile(rf"^((?:.*\.)?{re.escape(experts.block)}\.experts\.)(\d+)\.(\w+)\.(weight|bias)$")
    out: dict[str, torch.Tensor] = {}
    found: dict[str, dict[tuple[str, str], dict[int, torch.Tensor]]] = {}
    for name, tensor in state.items():
        match = pattern.match(name)
        if match:
            found.setdefault(match[1], {}).setdefault((match[3], match[4]), {})[int(match[2])] = tensor
        else:
            out[name] = tensor
    for fused, parts in found.items():
        by = {key: [tensors[e] for e in sorted(tensors)] for key, tensors in parts.items()}
        gate, up, down = (by[(p, "weight")] for p in ("gate_proj", "up_proj", "down_proj"))
        out[f"{fused}gate_up_proj"] = torch.stack([torch.cat([g, u]).T for g, u in zip(gate, up)])
        out[f"{fused}down_proj"] = torch.stack([d.T for d in down])
        if ("gate_proj", "bias") in by:
            pairs = zip(by[("gate_proj", "bias")], by[("up_proj", "bias")])
            out[f"{fused}gate_up_proj_bias"] = torch.stack([torch.cat(pair) for pair in pairs])
            out[f"{fused}down_proj_bias"] = torch.stack(by[("down_proj", "bias")])
    return out


class ExpertHessians:
    """Per-expert input Hessians of one MoE layer, accumulated over the calibration batches from what the router
    sent each expert (`add`, called by a pre-hook on transformers' fused experts module), then normalised, with the
    experts below `floor` tokens recalibrated on every token of the layer (`finish`)."""

    def __init__(self, module: torch.nn.Module, floor: int, experts: Experts):
        self.module, self.floor = module, floor
        self.transposed = transposed(module, experts)
        n = module.gate_up_proj.shape[0]
        self.gate_up: list = [0] * n  # H of gate/up's input (they share it: one solve for both)
        self.down: list = [0] * n  # H of down's input
        self.tokens = [0] * n  # tokens routed to each expert
        self.inputs: list[torch.Tensor] = []  # every token's input to the experts: what a top-up calibrates on
        self.topped_up: list[int] = []

    def add(self, hidden: torch.Tensor, top_k_index: torch.Tensor | None) -> None:
        """One batch: the experts' input and the router's choice; without a choice (Llama 4), `hidden` is already the
        experts' inputs one block per expert, each token scaled by its router score (0 where not chosen)."""
        if top_k_index is None:
            per_expert = hidden.view(len(self.tokens), -1, hidden.shape[-1])
            chosen = [x[x.abs().amax(dim=-1) > 0] for x in per_expert]
            self.inputs.append(per_expert.sum(dim=0))  # each token as its own expert received it
        else:
            chosen = [hidden[(top_k_index == expert).any(dim=-1)] for expert in range(len(self.tokens))]
            self.inputs.append(hidden)
        for expert, x in enumerate(chosen):
            if x.shape[0]:
                self.gate_up[expert] = self.gate_up[expert] + gram(x)
                self.down[expert] = self.down[expert] + gram(self.intermediate(x, expert))
                self.tokens[expert] += x.shape[0]

    def intermediate(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """down's input, as transformers' experts compute it: gate_up_proj (stored [in, out] where the module is
        transposed, as gpt-oss's), its bias, then the module's own activation (`_apply_gate`: gpt-oss's clamped,
        interleaved SwiGLU), else act(gate)·up with gate rows first."""
        weight = self.module.gate_up_proj[expert]
        gate_up = x @ (weight if self.transposed else weight.T)
        bias = getattr(self.module, "gate_up_proj_bias", None)
        if bias is not None:
            gate_up = gate_up + bias[expert]
        if hasattr(self.module, "_apply_gate"):
            return self.module._apply_gate(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.module.act_fn(gate) * up

    def finish(self) -> ExpertHessians:
        """H = 2XᵀX/n per expert; an expert below the floor (always one that saw no token) gets every token's."""
        everyone = sum(x.shape[0] for x in self.inputs)
        for expert, seen in enumerate(self.tokens):
            if seen < max(self.floor, 1):
                self.topped_up.append(expert)
                self.gate_up[expert] = sum(gram(x) for x in self.inputs)
                self.down[expert] = sum(gram(self.intermediate(x, expert)) for x in self.inputs)
            n = everyone if expert in self.topped_up else seen
            self.gate_up[expert], self.down[expert] = 2 * self.gate_up[expert] / n, 2 * self.down[expert] / n
        self.inputs = []
        return self

    def coverage(self, layer: int) -> dict:
        return {"layer": layer, "min_tokens": min(self.tokens), "median_tokens": statistics.median(self.tokens),
                "max_tokens": max(self.tokens), "topped_up": self.topped_up}  # fmt: skip


def cache_argument(layer: torch.nn.Module) -> str:
    """The name a decoder layer takes its key/value cache under: `cache` (transformers from 5.2x), `past_key_values`
    (earlier; now deprecated)."""
    import inspect

    return "cache" if "cache" in inspect.signature(layer.forward).parameters else "past_key_values"


def init_buffers(model: torch.nn.Module, module: torch.nn.Module) -> None:
    """The non-persistent buffers under `module` (rotary frequencies, embedding scales), which no checkpoint holds,
    computed the way transformers computes them when it loads a model (`_init_weights` of their modules)."""
    with torch.no_grad():
        for sub in module.modules():
            if any(name in sub._non_persistent_buffers_set for name in sub._buffers):
                model._init_weights(sub)


class Recorder(torch.nn.Module):
    """Stands in for a decoder layer during the capture: keeps what it is called with, passes the hidden states on."""

    def __init__(self, calls: list):
        super().__init__()
        self.calls = calls

    def forward(self, hidden_states, *args, **kwargs):
        self.calls.append((hidden_states, args, kwargs))
        return hidden_states


class LayerStream:
    def __init__(self, source, samples: list[list[int]], linears: tuple[str, ...] = (),
                 compute_dtype: torch.dtype | None = None, experts: Experts | None = None,
                 expert_floor: int = 64, device: str = "cpu", capture: bool = False):  # fmt: skip
        """`samples`: token ids of equal length; `linears`: the layer's linears to collect Hessians for, in
        quantization order (the architecture row's `gptq_linears`; a layer has those of its kind); `experts`: where
        a mixture of experts keeps them (the row's `gptq_experts`), each calibrated on its routed tokens, topped up
        below `expert_floor`; `device`: where layers and activations live (the reference runs on the GPU when there
        is one); `capture`: layer inputs from the model's own forward (see the module docstring)."""
        self.order, self.experts, self.expert_floor = linears, experts, expert_floor
        self.dtype = compute_dtype or fast_dtype()
        self.device = torch.device(device)
        from transformers import AutoConfig, AutoModelForCausalLM

        self.checkpoint = Checkpoint(source.path)
        # a multimodal checkpoint's language model is walked as the text-only model of its text config, whose
        # `model.*` modules the checkpoint keeps under `model.language_model.*`
        self.decoder = decoder_prefix(self.checkpoint.names())
        self.config = AutoConfig.from_pretrained(source.path, trust_remote_code=source.trust_remote_code)
        if self.decoder != "model.":
            self.config = self.config.get_text_config()
        with torch.device("meta"):
            try:
                self.model = AutoModelForCausalLM.from_config(
                    self.config, attn_implementation="sdpa", trust_remote_code=source.trust_remote_code
                )
            except ValueError:  # no SDPA for it (Gemma 2's soft-capped attention)
                self.model = AutoModelForCausalLM.from_config(
                    self.config, attn_implementation="eager", trust_remote_code=source.trust_remote_code
                )
        self.n_layers = self.config.num_hidden_layers
        self.calls: list | None = None  # per batch, per layer: (args, kwargs) besides the hidden states
        if capture:
            self.hidden, self.calls = self.capture(samples)
            return
        self.rotary = type(self.model.model.rotary_emb)(config=self.config).to(self.device)
        table = self.embeddings()
        self.hidden = [self.embed(table, samples[i : i + BATCH]) for i in range(0, len(samples), BATCH)]
        self.position_ids, self.rope = self.positions(0, len(samples[0]))

    def capture(self, samples: list[list[int]]) -> tuple[list[torch.Tensor], list[list[tuple]]]:
        """Each batch's input to the first layer, and per batch and layer the other arguments the model's forward
        passes that layer, from one forward of the decoder stack with every layer replaced by a Recorder."""
        base = self.model.model
        for name, child in base.named_children():
            if name != "layers":
                self.materialise(child, f"{self.decoder}{name}.")
        real, calls, hidden, arguments = base.layers, [], [], []
        base.layers = torch.nn.ModuleList(Recorder(calls) for _ in real)
        try:
            with torch.inference_mode():
                for start in range(0, len(samples), BATCH):
                    calls.clear()
                    base(input_ids=torch.tensor(samples[start : start + BATCH], device=self.device), use_cache=False)
                    if len(calls) != len(real):
                        raise RuntimeError(f"the model's forward called {len(calls)} of its {len(real)} layers")
                    hidden.append(calls[0][0])
                    arguments.append([(args, kwargs) for _, args, kwargs in calls])
        finally:
            base.layers = real
        return hidden, arguments

    def materialise(self, module: torch.nn.Module, prefix: str) -> None:
        """`module` (built on `meta`) on the device with the checkpoint's tensors under `prefix`, its parameters in
        the compute dtype (buffers such as rotary frequencies stay in float32, as transformers keeps them)."""
        module.to_empty(device=self.device)
        init_buffers(self.model, module)
        state = {n[len(prefix) :]: self.checkpoint.tensor(n) for n in self.checkpoint.names() if n.startswith(prefix)}
        module.load_state_dict(state, strict=True)
        for param in module.parameters():
            param.data = param.data.to(self.dtype)

    def embeddings(self) -> torch.Tensor:
        """The checkpoint's input embedding table, as stored."""
        return self.checkpoint.tensor(f"{self.decoder}embed_tokens.weight")

    def embed(self, table: torch.Tensor, ids: list[list[int]]) -> torch.Tensor:
        """The input embeddings of `ids` (equal lengths) in the compute dtype, from the checkpoint's `table`."""
        return table[torch.tensor(ids)].float().to(self.device, self.dtype)

    def positions(self, start: int, length: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Position ids `start`..`start+length-1` and their rotary embeddings (cos, sin) in the compute dtype."""
        ids = torch.arange(start, start + length, device=self.device)[None]
        probe = torch.zeros(1, device=self.device)  # the rotary module reads only its dtype (float32) and device
        return ids, tuple(r.to(self.dtype) for r in self.rotary(probe, ids))

    def other_tensors(self):
        """The checkpoint's tensors outside the decoder layers (embeddings, final norm, lm_head, a vision tower)."""
        for name in self.checkpoint.names():
            if not LAYER.match(name):
                yield name, self.checkpoint.tensor(name)

    def load(self, index: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
        """Layer `index` in the compute dtype, and its parameters in float32 as the checkpoint holds them."""
        prefix = f"{self.decoder}layers.{index}."
        layer = self.model.model.layers[index].to_empty(device=self.device)
        init_buffers(self.model, layer)
        state = {n[len(prefix) :]: self.checkpoint.tensor(n).float() for n in self.checkpoint.names()
                 if n.startswith(prefix)}  # fmt: skip
        per_expert = self.experts and not self.experts.fused  # a fused checkpoint holds the module's own tensors
        layer.load_state_dict(fuse_experts(state, self.experts) if per_expert else state, strict=True)
        return layer.to(self.dtype).eval(), state

    def forward(self, layer: torch.nn.Module, hidden: torch.Tensor, positions=None, cache=None) -> torch.Tensor:
        """`hidden` through `layer`, at the samples' positions or at `positions` (from `positions()`); with `cache` (a
        transformers Cache), attending to the keys and values it holds too and adding this pass's."""
        position_ids, rope = positions or (self.position_ids, self.rope)
        extra = {cache_argument(layer): cache, "use_cache": True} if cache is not None else {}
        out = layer(hidden, attention_mask=None, position_ids=position_ids, position_embeddings=rope, **extra)
        return out[0] if isinstance(out, tuple) else out

    def run(self, layer: torch.nn.Module, index: int, batch: int, hidden: torch.Tensor) -> torch.Tensor:
        """Batch `batch`'s `hidden` through layer `index` with the arguments the model's forward gave it (captured),
        else as `forward` does."""
        if self.calls is None:
            return self.forward(layer, hidden)
        args, kwargs = self.calls[batch][index]
        out = layer(hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def head(self) -> tuple[torch.nn.Module, torch.Tensor]:
        """The final norm and the output projection's weight (the input embeddings when tied), in the compute
        dtype: what turns the last layer's outputs into logits."""
        norm = self.model.model.norm
        self.materialise(norm, f"{self.decoder}norm.")
        tied = getattr(self.config, "tie_word_embeddings", False) or "lm_head.weight" not in self.checkpoint.names()
        weight = (self.embeddings() if tied else self.checkpoint.tensor("lm_head.weight")).float()
        return norm.eval(), weight.to(self.device, self.dtype)

    def linears(self, layer: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
        modules = dict(layer.named_modules())
        return [(name, modules[name]) for name in self.order if name in modules]

    def experts_module(self, layer: torch.nn.Module) -> torch.nn.Module | None:
        if self.experts is None or not hasattr(layer.get_submodule(self.experts.module), "experts"):
            return None  # a dense layer of a mixture of experts (DeepSeek-V3's first layers)
        return layer.get_submodule(f"{self.experts.module}.experts")

    def collect(self, index: int):
        """Layer `index` (compute dtype), its float32 parameters, and its linears grouped by shared input (q/k/v read
        one tensor, so do gate/up), each group with the Hessian 2XXᵀ/n of that input over the samples, in float32;
        and for a mixture of experts, the experts' Hessians (ExpertHessians, else None)."""
        layer, state = self.load(index)
        fused = self.experts_module(layer)
        experts = ExpertHessians(fused, self.expert_floor, self.experts) if fused is not None else None
        linears = dict(self.linears(layer))
        inputs: dict[str, torch.Tensor] = {}
        sums: dict[tuple[str, ...], torch.Tensor] = {}
        counts: dict[tuple[str, ...], int] = {}

        def hook(name: str):
            def record(module, args):
                inputs[name] = args[0]

            return record

        def routed(module, args, kwargs):  # transformers' experts: (hidden_states, top_k_index, top_k_weights)
            hidden = args[0] if args else kwargs["hidden_states"]  # Llama 4's: (hidden_states) only, routed already
            experts.add(hidden, args[1] if len(args) > 1 else kwargs.get("top_k_index"))

        handles = [module.register_forward_pre_hook(hook(name)) for name, module in linears.items()]
        if experts is not None:
            handles.append(fused.register_forward_pre_hook(routed, with_kwargs=True))
        with torch.inference_mode():
            for batch, hidden in enumerate(self.hidden):
                inputs.clear()
                self.run(layer, index, batch, hidden)
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
        if experts is not None:
            with torch.inference_mode():
                experts.finish()
        return layer, state, groups, experts

    def advance(self, layer: torch.nn.Module, index: int | None = None) -> None:
        """Replace the stored activations by this (quantized) layer's outputs, then let the layer's weights go: the
        skeleton keeps it on the `meta` device, so the model never accumulates in memory. `index`: the layer's, for
        its captured arguments."""
        if self.calls is not None and index is None:
            raise ValueError("a captured stream advances a layer by its index")
        with torch.inference_mode():
            self.hidden = [self.run(layer, index, batch, hidden) for batch, hidden in enumerate(self.hidden)]
        layer.to(device="meta")

    def resume(self, index: int, hidden: list[torch.Tensor]) -> None:
        """Continue at layer `index` from the activations an earlier run stored after layer `index - 1`."""
        if [h.shape for h in hidden] != [h.shape for h in self.hidden] or hidden[0].dtype != self.dtype:
            raise ValueError(f"stored activations after layer {index} do not fit these calibration samples")
        self.hidden = hidden
