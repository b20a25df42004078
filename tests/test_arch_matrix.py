"""The architecture x format matrix, cell by cell: a tiny random checkpoint of every architecture the table knows,
through the five targets of issue 17 (gguf/f16, gguf/q4_k_m, mlx/q4, gptq/int4, onnx/fp32). A cell the table marks
unsupported is refused up front by the format's check, in one line naming the architecture and the format, before
anything is written. A supported cell is built and run in its own runtime (llama.cpp, mlx-lm, transformers with
GPTQModel's kernels, onnxruntime) on a text longer than the tiny models' sliding windows: the float cells' logits
match transformers' float32 ones and their greedy continuation (8 tokens, in the runtime's own generation loop) is
transformers' as far as each of its choices leads by more than 3x the measured logit error (how far it is equal is
printed), the quantized cells keep most of its top-1 choices; max |Δlogit| and top-1
agreement of every cell are printed at the end of the test run (tests/conftest.py). The GGUF cells of the 2026
families use their `-gguf` checkpoints (hidden size 256, so that the K-quants apply). Format-specific checks (tensor
bytes against llama.cpp's converter, expert coverage, packing) live in the per-format tests."""

from __future__ import annotations

import pytest

from pipeline.archs import ARCHS, arch
from pipeline.formats.base import Format
from pipeline.source import inspect_checkpoint
from pipeline.types import Calibration, FormatError, Target
from tests.conftest import MATRIX_RESULTS, TINY_MODELS, build_artifact

TARGETS = {  # target -> (format, quant, options, the row's attribute that says it is supported, the format's name)
    "gguf/f16": ("gguf", "f16", {}, "gguf", "GGUF"),
    "gguf/q4_k_m": ("gguf", "q4_k_m", {}, "gguf", "GGUF"),
    "mlx/q4": ("mlx", "q4", {"group_size": 32}, "mlx", "MLX"),
    "gptq/int4": ("gptq", "int4", {"group_size": 32}, "gptq", "GPTQ"),
    "onnx/fp32": ("onnx", "fp32", {}, "onnx_export", "ONNX"),
}


def test_every_architecture_of_the_table_has_a_tiny_checkpoint():
    assert sorted(ARCHS) == sorted(name for name in ARCHS if name in TINY_MODELS)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("model", sorted(ARCHS))
def test_each_cell_is_checked_or_refused_up_front(model, target, tiny_model, gguf_build, tmp_path):
    fmt_name, quant, options, attribute, label = TARGETS[target]
    source = inspect_checkpoint(tiny_model(model))
    fmt = Format.for_target(Target(format=fmt_name, quant=quant, options=options))
    if getattr(arch(source.model_type), attribute):
        run_cell(model, target, tiny_model, gguf_build, tmp_path)
        return
    with pytest.raises(FormatError) as refused:
        fmt.check(source)
    message = str(refused.value)
    assert label in message and repr(source.model_type) in message and "\n" not in message


TEXT = ("Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do: "
        "once or twice she had peeped into the book her sister was reading, but it had no pictures in it.")  # fmt: skip
FLOAT = ("gguf/f16", "onnx/fp32")
_REFERENCE: dict = {}


def reference_logits(folder):
    """Token ids of TEXT and transformers' float32 logits for them, once per checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.source import load_tokenizer

    if folder not in _REFERENCE:
        ids = load_tokenizer(folder)(TEXT).input_ids[:48]
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.inference_mode():
            _REFERENCE[folder] = ids, model(torch.tensor([ids])).logits[0].numpy()
    return _REFERENCE[folder]


def run_cell(model: str, target: str, tiny_model, gguf_build, out) -> None:
    """Build the cell's artifact, run TEXT through it in its runtime, compare with transformers, record the figures.
    The GGUF cells of the families with a `-gguf` checkpoint read the files tests/test_gguf_archs.py checks."""
    from types import SimpleNamespace

    from pipeline.types import Validation

    fmt_name, quant, options, _, _ = TARGETS[target]
    own_gguf = fmt_name == "gguf" and f"{model}-gguf" in TINY_MODELS
    folder = tiny_model(f"{model}-gguf" if own_gguf else model)
    ids, theirs = reference_logits(folder)
    if own_gguf:
        path, facts = gguf_build(model, quant)
        fmt, out = Format.for_target(Target(format=fmt_name, quant=quant, options=options)), path.parent
    else:
        fmt, _, facts = build_artifact(
            folder, (fmt_name, quant, options), out, calibration=Calibration(samples=4, seq_len=64)
        )
    reference = SimpleNamespace(prompts=[SimpleNamespace(ids=ids[:8])], chunks=[ids])
    runtime = fmt.open_runtime(out, reference, Validation(max_new_tokens=4))
    try:
        ours = runtime.logits(ids)
        greedy = runtime.greedy(ids[:GREEDY_PROMPT], GREEDY_TOKENS, set()) if target in FLOAT else None
    finally:
        runtime.close()
    gap = float(abs(ours - theirs).max())
    top1 = float((ours.argmax(-1) == theirs.argmax(-1)).mean())
    r, figures = correlation(ours, theirs), (model, target, gap, float(abs(theirs).max()), top1)
    if target in FLOAT:  # llama.cpp computes in F16 here; our ONNX graph in float32 like transformers
        limit = 1e-4 if target == "onnx/fp32" else 0.02 * abs(theirs).max()
        # a token whose lead is over 3x the largest logit error measured above cannot flip
        want, decided = reference_greedy(folder, ids[:GREEDY_PROMPT], 3 * max(gap, 1e-5))
        same = next((i for i, (a, b) in enumerate(zip(greedy, want)) if a != b), GREEDY_TOKENS)
        MATRIX_RESULTS.append((*figures, f"{r:.3f}, greedy: {same}/{GREEDY_TOKENS} equal, {decided} decided"))
        assert gap <= limit, f"{model} {target}: max |Δlogit| {gap:.4f}"
        assert greedy[:decided] == want[:decided], f"{model} {target}: greedy {greedy} != transformers' {want}"
    else:  # 4 bits of random weights move many top choices; a wrong tensor or layout leaves no correlation at all
        MATRIX_RESULTS.append((*figures, r))
        assert r >= 0.6, f"{model} {target}: logits' correlation with transformers' {r:.2f} (top-1 {top1:.2f})"
    if fmt_name == "gptq":
        check_gptq_layers(model, facts, out)


GREEDY_PROMPT, GREEDY_TOKENS = 12, 8


def reference_greedy(folder, ids: list[int], margin: float) -> tuple[list[int], int]:
    """transformers' greedy continuation of `ids` in float32, and how many of its leading tokens were chosen by more
    than `margin` over the runner-up: a float artifact must continue identically that far (a closer call may go
    either way within the float cell's logit tolerance)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens, gaps = list(ids), []
    with torch.inference_mode():  # whole-sequence forwards: no cache, no generation config (suppressed tokens ...)
        for _ in range(GREEDY_TOKENS):
            top2 = model(torch.tensor([tokens])).logits[0, -1].topk(2)
            tokens.append(int(top2.indices[0]))
            gaps.append(float(top2.values[0] - top2.values[1]))
    return tokens[len(ids) :], next((i for i, gap in enumerate(gaps) if gap <= margin), len(gaps))


def correlation(ours, theirs) -> float:
    """Mean over positions of the Pearson correlation of the two logit vectors."""
    import numpy as np

    a = ours - ours.mean(-1, keepdims=True)
    b = theirs - theirs.mean(-1, keepdims=True)
    return float(np.mean((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)))


def check_gptq_layers(model: str, facts: dict, folder) -> None:
    """Every layer's linears that the row lists and the layer has are packed (none left in float by mistake), GPTQ
    beat round-to-nearest on each, and a mixture of experts' experts are all there."""
    import torch
    from safetensors.torch import load_file

    from pipeline.checkpoint import decoder_prefix

    found, row = load_file(folder / "model.safetensors"), arch(model)
    decoder = decoder_prefix(found)  # a multimodal checkpoint's language model: model.language_model.*
    for layer in facts["layers"]:
        assert layer["errors"] and all(e["gptq"] < e["rtn"] for e in layer["errors"].values()), layer
        assert set(layer["errors"]) <= set(row.gptq_linears)
        for name in layer["errors"]:
            assert f"{decoder}layers.{layer['layer']}.{name}.qweight" in found
            assert f"{decoder}layers.{layer['layer']}.{name}.weight" not in found
        if "expert_errors" in layer:
            assert len(layer["expert_errors"]["gptq"]) == 4  # the tiny checkpoints' experts (tests/conftest.py)
    vision = [n for n in found if n.startswith("model.visual.")]  # kept whole, in float16
    assert all(found[n].dtype == torch.float16 for n in vision) and (decoder == "model.") == (not vision)
    if row.gptq_experts:
        assert facts["expert_coverage"] and any(
            n.endswith(f".{row.gptq_experts.name(3, 'down_proj')}.qweight") for n in found
        )
