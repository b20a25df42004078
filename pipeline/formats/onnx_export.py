"""Standard-opset ONNX export of a decoder with its KV cache, through torch's own exporter (`torch.onnx.export` with
`dynamo=True`, i.e. torch.export).

Why our own wrapper rather than a library: optimum-onnx, the usual tool, pins transformers < 4.58 and cannot live in
one environment with the transformers 5 every other format here needs; onnxruntime-genai's builder emits ORT-only
contrib ops (GroupQueryAttention, MatMulNBits), not the standard graph a plain TensorRT build takes. The wrapper is
small: it turns flat past key/value tensors into transformers' `DynamicCache`, runs the model, and flattens the
updated cache back out. Every layer keeps the whole past, sliding-window layers too (their masks apply the window),
so that every past/present tensor has the lengths the interface below names.

Graph interface (dynamic axes named as below):
    inputs   input_ids [batch, sequence_length] int64, attention_mask [batch, total_sequence_length] int64,
             position_ids [batch, sequence_length] int64,
             past_key_values.N.key / .value [batch, kv_heads, past_sequence_length, head_dim] float
    outputs  logits [batch, sequence_length, vocab] float, present.N.key / .value [batch, kv_heads,
             total_sequence_length, head_dim] float
"""

from __future__ import annotations

from pathlib import Path

MAX_CONTEXT = 8192


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def export(source_dir: Path, out: Path, trust_remote_code: bool = False, precision: str = "fp32") -> dict:
    """Export the checkpoint in `precision` (fp32, fp16) to `out` (model.onnx + model.onnx.data); return the graph's
    shape facts."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    dtype = {"fp32": torch.float32, "fp16": torch.float16}[precision]
    model = AutoModelForCausalLM.from_pretrained(
        source_dir, dtype=dtype, attn_implementation="eager", trust_remote_code=trust_remote_code
    ).eval()
    config = model.config
    n_layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    class WithFlatCache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            # full layers for every layer kind: a sliding-window layer of `DynamicCache(config=...)` keeps only its
            # window, and the graph's past/present would then differ in length by layer (onnxruntime fails on the
            # mask's gather once the past outgrows the window); the masks apply the window over the full cache
            cache = DynamicCache()
            for i in range(n_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)  # fmt: skip
            layers = out.past_key_values.layers
            return (out.logits, *[t for layer in layers for t in (layer.keys, layer.values)])

    past_len, seq = 3, 4  # example sizes above 1, so that torch.export keeps the axes dynamic
    example = (
        torch.randint(0, config.vocab_size, (1, seq)),
        torch.ones(1, past_len + seq, dtype=torch.long),
        torch.arange(past_len, past_len + seq)[None],
        *[torch.zeros(1, kv_heads, past_len, head_dim, dtype=dtype) for _ in range(2 * n_layers)],
    )
    dim = torch.export.Dim
    batch, sequence = dim("batch", max=256), dim("sequence_length", max=MAX_CONTEXT)
    past, total = dim("past_sequence_length", max=MAX_CONTEXT), dim("total_sequence_length", max=2 * MAX_CONTEXT)
    shapes = {
        "input_ids": {0: batch, 1: sequence},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: sequence},
        "past": tuple({0: batch, 2: past} for _ in range(2 * n_layers)),
    }
    inputs, outputs = io_names(n_layers)
    wrapper = WithFlatCache().eval()
    torch.onnx.export(wrapper, example, str(out / "model.onnx"), input_names=inputs, output_names=outputs,
                      dynamo=True, dynamic_shapes=shapes, external_data=True)  # fmt: skip
    return {"n_layers": n_layers, "kv_heads": kv_heads, "head_dim": head_dim, "inputs": inputs, "outputs": outputs}
