"""Recipes: the shipped ones load; bad ones fail with one line per problem naming file, line, key and the fix."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.recipe import Recipe, RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def errors(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text))
    return str(info.value).splitlines()


def test_shipped_recipe_loads():
    recipe = load_recipe(REPO / "recipes" / "smollm2.yaml")
    assert recipe.source.id == "bundled:smollm2-135m"
    assert [t.key for t in recipe.targets][:2] == ["gguf/f16", "gguf/q8_0"]
    assert recipe.budget(recipe.target("gguf/q8_0")).max_ppl_ratio == 1.01
    assert recipe.trust_remote_code is False and recipe.allow_pickle is False


def test_defaults_and_hub_source_with_revision(tmp_path):
    recipe = load_recipe(
        write(
            tmp_path,
            """
        name: qwen
        source: {id: Qwen/Qwen2.5-0.5B-Instruct, revision: 7ae557604adf67be50417f59c2c2f167def9a775}
        targets: [{format: gguf, quant: q8_0}]
    """,
        )
    )
    assert recipe.source.revision.startswith("7ae5576")
    assert recipe.calibration.text == "builtin:corpus" and recipe.validation.prompts
    assert recipe.output_dir(tmp_path) == tmp_path / "artifacts" / "qwen"


def test_unknown_keys_name_the_key_its_line_and_what_is_allowed(tmp_path):
    lines = errors(
        tmp_path,
        """
        name: x
        source: bundled:smollm2-135m
        targetz: []
        targets:
          - format: gguf
            quant: f16
            opts: {}
    """,
    )
    assert lines == [
        f"{tmp_path / 'recipe.yaml'}:3: targetz: unknown key 'targetz' (allowed here: name, source, dtype, targets, "
        "calibration, validation, output, dispatch_timeout_s, hardware_fallback, allow_pickle, trust_remote_code, "
        "check_resources, concurrency)",
        f"{tmp_path / 'recipe.yaml'}:7: targets[0].opts: unknown key 'opts' "
        "(allowed here: format, quant, name, options)",
    ]


def test_bad_values_point_at_their_line(tmp_path):
    lines = errors(
        tmp_path,
        """
        name: x
        source: bundled:smollm2-135m
        targets:
          - format: gguf
            quant: q9
          - format: tensorflow
            quant: fp32
        validation:
          eval_tokens: 10
          budgets:
            gguf/q9: {max_ppl: 2}
    """,
    )
    assert ":5: targets[0].quant: gguf has no quant 'q9' (supported: f32, f16, bf16, q8_0, q4_0, q4_1," in lines[0]
    assert lines[0].endswith(", q6_k, iq4_nl, iq4_xs)")
    assert lines[1].endswith(
        ":6: targets[1].format: unknown format 'tensorflow' (supported: compressed, gguf, gptq, mlx, onnx, tensorrt, "
        "trtllm)"
    )
    assert lines[2].endswith(":9: validation.eval_tokens: Input should be greater than or equal to 32 (got 10)")
    assert lines[3].endswith(
        ":11: validation.budgets.gguf/q9.max_ppl: unknown key 'max_ppl' "
        "(allowed here: max_ppl_ratio, min_top1, max_kl_mean, exact_tokenizer)"
    )


def test_cross_field_errors(tmp_path):
    lines = errors(
        tmp_path,
        """
        name: x
        source: ./model
        targets:
          - {format: gguf, quant: f16}
          - {format: gguf, quant: f16}
    """,
    )
    assert lines == [f"{tmp_path / 'recipe.yaml'}:3: targets: target listed twice: gguf/f16"]
    lines = errors(
        tmp_path,
        """
        name: x
        source: ./model
        targets: [{format: gguf, quant: f16}]
        validation:
          budgets:
            gguf/q8_0: {max_ppl_ratio: 1.01}
    """,
    )
    assert lines == [
        f"{tmp_path / 'recipe.yaml'}:4: validation: budgets for gguf/q8_0, which is not a target (targets: gguf/f16)"
    ]


def test_missing_keys_and_broken_yaml(tmp_path):
    assert errors(tmp_path, "name: x\n")[0].endswith(":1: source: required key 'source' is missing")
    assert "not valid YAML" in errors(tmp_path, "name: x\nsource: [a\n")[0]
    assert errors(tmp_path, "- just\n- a list\n")[0].endswith(
        ":1: a recipe is a mapping with keys name, source, targets, ..."
    )


def test_budget_must_be_a_ratio_of_at_least_one(tmp_path):
    lines = errors(
        tmp_path,
        """
        name: x
        source: ./m
        targets: [{format: gguf, quant: f16}]
        validation: {budgets: {gguf/f16: {max_ppl_ratio: 0.5}}}
    """,
    )
    assert "max_ppl_ratio: Input should be greater than or equal to 1" in lines[0]


def test_validate_command(tmp_path):
    good = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "validate", str(REPO / "recipes" / "smollm2.yaml")],
        capture_output=True,
        text=True,
    )
    assert good.returncode == 0, good.stderr
    assert "ok: smollm2-135m" in good.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "validate", str(write(tmp_path, "name: x\n"))],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [
        f"error: {tmp_path / 'recipe.yaml'}:1: source: required key 'source' is missing",
        f"{tmp_path / 'recipe.yaml'}:1: targets: required key 'targets' is missing",
    ]


def test_recipe_is_immutable():
    recipe = load_recipe(REPO / "recipes" / "smollm2.yaml")
    with pytest.raises(ValidationError):
        recipe.name = "other"
    assert isinstance(recipe, Recipe)
