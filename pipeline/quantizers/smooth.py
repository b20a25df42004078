"""SmoothQuant's scaling (Xiao et al., 2023) for round-to-nearest W8A8: activation outliers moved into the weights.

Per-token INT8 (or FP8) activations lose precision to the few input channels whose values are far larger than the
rest. For linears that read a norm's output (q/k/v after `input_layernorm`, gate/up after
`post_attention_layernorm`: the architecture row's `smooth_norms`), input channel j can be divided by s_j in the norm's
weight and multiplied back into column j of each linear: the float model computes the same function, but the
activations get flatter and the weights take the difference, which per-output-channel weight scales absorb better.
s_j = max|X_j|^α / max|W_j|^(1-α), with max|X_j| over the calibration tokens and max|W_j| over the group's rows;
α = 0.5 is the paper's default.

Why our own: llm-compressor's SmoothQuantModifier does this, but it brings the whole llm-compressor stack and loads
the whole model; here the activation maxima come from the same one-layer-at-a-time walk GPTQ uses
(`pipeline.quantizers.layers.LayerStream`), so memory stays at one layer plus the calibration activations.
"""

from __future__ import annotations

import torch

from pipeline.quantizers.layers import LayerStream

FLOOR = 1e-5  # no channel's scale below this (a channel never active would otherwise divide by ~0)


def smoothing_scales(source, samples: list[list[int]], norms: dict[str, tuple[str, ...]], alpha: float,
                     progress=None) -> dict[str, torch.Tensor]:  # fmt: skip
    """{`model.layers.{i}.{norm}`: s (float32, [hidden])} for every layer and norm of `norms` (norm -> the linears
    reading its output), from the source's activations on `samples` and its weights."""
    stream = LayerStream(source, samples, compute_dtype=torch.float32)
    scales = {}
    for index in range(stream.n_layers):
        layer, state = stream.load(index)
        peaks = input_peaks(stream, layer, {norm: linears[0] for norm, linears in norms.items()})
        for norm, linears in norms.items():
            weights = torch.stack([state[f"{linear}.weight"].abs().amax(dim=0) for linear in linears]).amax(dim=0)
            scales[f"model.layers.{index}.{norm}"] = scale(peaks[norm], weights, alpha)
        stream.advance(layer)
        if progress:
            progress(index + 1, stream.n_layers, "layers smoothed")
    return scales


def input_peaks(stream: LayerStream, layer: torch.nn.Module, readers: dict[str, str]) -> dict[str, torch.Tensor]:
    """Per norm, the largest |value| of each channel of its output over the calibration tokens, seen at the input
    of `readers[norm]` (a linear that reads it)."""
    peaks: dict[str, torch.Tensor] = {}

    def hook(norm: str):
        def record(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).abs().amax(dim=0).float()
            peaks[norm] = torch.maximum(peaks[norm], x) if norm in peaks else x

        return record

    handles = [layer.get_submodule(linear).register_forward_pre_hook(hook(norm)) for norm, linear in readers.items()]
    with torch.inference_mode():
        for hidden in stream.hidden:
            stream.forward(layer, hidden)
    for handle in handles:
        handle.remove()
    return peaks


def scale(peaks: torch.Tensor, weights: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^α / max|W|^(1-α), 1 where a channel's activations or weights are all zero."""
    s = peaks.pow(alpha) / weights.pow(1 - alpha)
    s = torch.where((peaks > 0) & (weights > 0), s, torch.ones_like(s))
    return s.clamp(min=FLOOR)


def smoothed(name: str, tensor: torch.Tensor, scales: dict[str, torch.Tensor],
             norms: dict[str, tuple[str, ...]]) -> torch.Tensor:  # fmt: skip
    """Checkpoint tensor `name` with the scales applied: a norm's weight divided by s, a reading linear's columns
    multiplied by s; any other tensor as it is."""
    layer, _, rest = name.removeprefix("model.layers.").partition(".")
    if not name.startswith("model.layers.") or not rest.endswith(".weight"):
        return tensor
    module = rest.removesuffix(".weight")
    for norm, linears in norms.items():
        s = scales.get(f"model.layers.{layer}.{norm}")
        if s is not None and module == norm:
            return (tensor.float() / s).to(tensor.dtype)
        if s is not None and module in linears:
            return tensor.float() * s[None, :]
    return tensor
