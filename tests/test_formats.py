"""The Format contract, checked for every registered format: what a format declares, how its options are parsed,
what it says about a source it cannot take."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.formats import FORMATS
from pipeline.formats.base import Format, Options
from pipeline.source import inspect_checkpoint
from pipeline.types import HARDWARE_KINDS, FormatError, Step, Target


@pytest.fixture(scope="module")
def foreign(tiny_llama, tmp_path_factory):
    """A checkpoint whose architecture no row of the table knows."""
    folder = tmp_path_factory.mktemp("gpt-neox")
    shutil.copytree(tiny_llama, folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    return inspect_checkpoint(folder)


def test_the_registry_holds_every_format_module():
    assert set(FORMATS) == {"compressed", "gguf", "gptq", "mlx", "onnx", "tensorrt", "trtllm"}
    with pytest.raises(TypeError, match="two formats named 'gguf'"):
        type("Again", (Format,), {"name": "gguf"})


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_declarations(name):
    fmt = FORMATS[name]
    assert fmt.name == name and fmt.quants and fmt.extra and fmt.library
    assert issubclass(fmt.options_model, Options)
    assert {Step.BUILD, Step.VALIDATE} <= set(fmt.hardware)
    assert all(kinds and set(kinds) <= set(HARDWARE_KINDS) for kinds in fmt.hardware.values())
    assert fmt.build is not Format.build and fmt.open_runtime is not Format.open_runtime
    for quant in fmt.quants:  # every quant takes the default options
        made = Format.for_target(Target(format=name, quant=quant))
        assert isinstance(made, fmt) and made.options == fmt.options_model()
        assert made.steps[0] == Step.BUILD and made.steps[-1] == Step.PUBLISH and Step.VALIDATE in made.steps
        assert (Step.ENGINE in made.steps) == (fmt.engine is not Format.engine) == (Step.ENGINE in fmt.hardware)
        assert isinstance(made.depends_on(), list)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_option_errors_name_the_key(name):
    fmt = FORMATS[name]
    with pytest.raises(FormatError, match=r"unknown option 'no_such_option' \(options: "):
        Format.for_target(Target(format=name, quant=fmt.quants[0], options={"no_such_option": 1}))
    with pytest.raises(FormatError, match=rf"{name} has no quant 'q9' \(quants: "):
        Format.for_target(Target(format=name, quant="q9"))


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_an_unknown_architecture_is_refused_naming_it_and_the_format(name, foreign):
    made = Format.for_target(Target(format=name, quant=FORMATS[name].quants[0]))
    with pytest.raises(FormatError, match=r"does not support architecture 'gpt_neox'.*\(supported: .*llama"):
        made.check(foreign)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_a_supported_source_passes_the_check(name, tiny_llama):
    quant = {"gptq": "int8", "mlx": "q8"}.get(name, FORMATS[name].quants[0])
    options = {"group_size": 32} if name in ("gptq", "mlx") else {}
    Format.for_target(Target(format=name, quant=quant, options=options)).check(inspect_checkpoint(tiny_llama))
