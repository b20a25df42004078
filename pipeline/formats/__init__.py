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
    smoke(artifact_dir, reference, validation) -> dict
              run the artifact in its own runtime against the reference (see pipeline.validate) and return the
              measured results

`FORMATS` maps the names used in recipes to these modules; the CLI and the flow only go through it. Heavy runtime
imports happen inside the functions, so importing this package (as recipe validation does) stays cheap.
"""

from __future__ import annotations

from types import ModuleType


class FormatError(ValueError):
    """A target that this format cannot produce from this source; raised before any output is written."""


from pipeline.formats import gguf  # noqa: E402  (the modules import FormatError from here)

FORMATS: dict[str, ModuleType] = {"gguf": gguf}
