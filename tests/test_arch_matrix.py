"""The architecture x format matrix, cell by cell: a tiny random checkpoint of every architecture the table knows,
through the five targets of issue 17 (gguf/f16, gguf/q4_k_m, mlx/q4, gptq/int4, onnx/fp32). A cell the table marks
unsupported is refused up front by the format's check, in one line naming the architecture and the format, before
anything is written; a supported cell passes the check on that checkpoint. Building and validating the supported
cells (logits against transformers) is done per format: tests/test_gguf_archs.py, test_mlx_archs.py, test_gptq.py,
test_gptq_moe.py, test_onnx.py."""

from __future__ import annotations

import pytest

from pipeline.archs import ARCHS, arch
from pipeline.formats.base import Format
from pipeline.source import inspect_checkpoint
from pipeline.types import FormatError, Target
from tests.conftest import TINY_MODELS

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
def test_each_cell_is_checked_or_refused_up_front(model, target, tiny_model, tmp_path):
    fmt_name, quant, options, attribute, label = TARGETS[target]
    source = inspect_checkpoint(tiny_model(model))
    fmt = Format.for_target(Target(format=fmt_name, quant=quant, options=options))
    if getattr(arch(source.model_type), attribute):
        fmt.check(source)
        return
    with pytest.raises(FormatError) as refused:
        fmt.check(source)
    message = str(refused.value)
    assert label in message and repr(source.model_type) in message and "\n" not in message
