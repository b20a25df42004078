"""Target formats, one module each, all with the same small surface.

A format module defines:

    QUANTS    tuple of quant names a recipe may ask for (`f16`, `q8_0`, ...)
    EXTRA     the pip extra that installs its runtime (`pip install 'weightsmith[gguf]'`)
    HARDWARE  {"build": (...), "smoke": (...)}: the hardware each step can run on, preferred first
              ("cpu", "cuda", "apple")
    Options   a pydantic model of the target options it accepts (checked when the recipe is loaded)
    check_options(quant, options) -> None
              raise FormatError for options that do not fit the quant (checked when the recipe is loaded)
    missing_dependency(step, target) -> str | None
              why `step` of `target` cannot run in this environment (a missing package, named with its extra)
    check(source, target) -> None
              raise FormatError before anything is written (unsupported architecture, bad option ...)
    build(source, target, out_dir, *, name, progress, calibration) -> dict
              write the artifact's files into out_dir (a staging folder) and return facts for the manifest
    depends_on(target) -> list[str]   (optional)
              the recipe targets whose artifacts this target is made from
    smoke(artifact_dir, reference, validation) -> dict
              run the artifact in its own runtime against the reference (see pipeline.validate) and return the
              measured results: {"smoke", "quality", "failures"}
    engine(artifact_dir, reference, validation) -> dict   (optional; HARDWARE["engine"])
              a further step on other hardware once the artifact passed (TensorRT-LLM's engine build and run):
              {"build": {"status", "reason", ...}, "smoke": {...}}, status ok, failed or not_run

`FORMATS` maps the names used in recipes to these modules; the CLI and the flow only go through it. Heavy runtime
imports happen inside the functions, so importing this package (as recipe validation does) stays cheap.
"""

from __future__ import annotations

import re
from types import ModuleType
from typing import Any


class FormatError(ValueError):
    """A target that this format cannot produce from this source; raised before any output is written."""


def parse_size(value: Any) -> Any:
    """'2G', '500M', '64K', '1000' (bytes, decimal units) -> int; anything else unchanged for pydantic to judge."""
    if isinstance(value, str) and (m := re.fullmatch(r"\s*(\d+)\s*([KMG]?)B?\s*", value.upper())):
        return int(m.group(1)) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[m.group(2)]
    return value


def engine_not_run(code: str, detail: str) -> dict[str, Any]:
    """The outcome of an engine step that could not run: both its parts not_run, with the reason code."""
    skipped = {"status": "not_run", "reason": code, "detail": detail}
    return {"build": skipped, "smoke": dict(skipped)}


def check_group_size(source, group_size: int, quantized=lambda name: name.endswith(".weight")) -> None:
    """Raise FormatError unless `group_size` divides the input size of every 2-D tensor to be quantized: kernels and
    converters either reject a ragged last group or, worse, silently leave the tensor unquantized."""
    from pipeline.source import Checkpoint

    checkpoint = Checkpoint(source.path)
    for name in checkpoint.names():
        shape = checkpoint.shape(name)
        if len(shape) == 2 and quantized(name) and shape[-1] % group_size:
            fits = [
                g
                for g in (32, 64, 128, 256)
                if all(
                    checkpoint.shape(n)[-1] % g == 0
                    for n in checkpoint.names()
                    if len(checkpoint.shape(n)) == 2 and quantized(n)
                )
            ]
            raise FormatError(
                f"group size {group_size} does not divide the input size {shape[-1]} of {name}; "
                f"group sizes that fit every quantized tensor: {', '.join(map(str, fits)) or 'none'}"
            )


from pipeline.formats import gguf, gptq, mlx, onnx, tensorrt  # noqa: E402  (the modules import FormatError from here)

FORMATS: dict[str, ModuleType] = {"gguf": gguf, "gptq": gptq, "mlx": mlx, "onnx": onnx, "tensorrt": tensorrt}
