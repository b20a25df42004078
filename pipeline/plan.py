"""A recipe as a plan: every step of every target, in an order that respects what each target is made from.

A target's steps are its format's (`Format.steps`: build, validate, [engine], publish). A target made from another
(`Format.depends_on`: a TensorRT-LLM checkpoint from a GPTQ artifact, a plain TensorRT engine from an ONNX graph)
comes after it, and its build and engine steps get that target's published artifact as an input. The CLI and the
Prefect flow both run this plan through `pipeline.convert.execute`.

`Plan.inputs(key)` is the hash of everything a target's artifact and its verdict depend on, by content: the source's
files, the recipe entry and budget, the calibration and held-out texts and settings, the code, and the inputs of the
targets it is made from. A rerun skips a validated artifact whose hash is unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import __version__
from pipeline.corpus import load_text
from pipeline.files import text_sha256
from pipeline.formats.base import Format
from pipeline.recipe import Recipe, RecipeError
from pipeline.types import Hardware, SourceInfo, Step, Target


@dataclass(frozen=True)
class PlannedStep:
    step: Step
    target: Target
    hardware: tuple[Hardware, ...]  # where it can run, preferred first
    inputs: tuple[str, ...] = ()  # keys of the targets whose published artifacts it reads

    @property
    def key(self) -> str:
        return self.target.key

    def __str__(self) -> str:
        return f"{self.step} {self.key}"


@dataclass
class Plan:
    recipe: Recipe
    steps: list[PlannedStep]
    formats: dict[str, Format] = field(repr=False)

    def targets(self) -> list[Target]:
        """The recipe's targets in the plan's order."""
        return list({s.key: s.target for s in self.steps}.values())

    def inputs(self, source: SourceInfo, key: str) -> str:
        return _inputs_hash(self, source, key)


def make_plan(recipe: Recipe) -> Plan:
    formats = {t.key: Format.for_target(t) for t in recipe.targets}
    steps = []
    for target in _dependency_order(recipe.targets, formats):
        fmt = formats[target.key]
        for step in fmt.steps:
            reads = tuple(fmt.depends_on()) if step in (Step.BUILD, Step.ENGINE) else ()
            steps.append(PlannedStep(step, target, fmt.runs_on(step), reads))
    return Plan(recipe, steps, formats)


def _dependency_order(targets: list[Target], formats: dict[str, Format]) -> list[Target]:
    """The targets with each after the ones it is made from, otherwise in recipe order."""
    done: list[Target] = []
    by_key = {t.key: t for t in targets}

    def visit(target: Target, path: tuple[str, ...]) -> None:
        if target in done:
            return
        if target.key in path:
            raise RecipeError(f"targets made from each other: {' -> '.join((*path, target.key))}")
        for key in formats[target.key].depends_on():
            visit(by_key[key], (*path, target.key))
        done.append(target)

    for target in targets:
        visit(target, ())
    return done


def _inputs_hash(plan: Plan, source: SourceInfo, key: str) -> str:
    recipe = plan.recipe
    target = recipe.target(key)
    budget = recipe.budget(target)
    inputs = {
        "source": source.fingerprint,
        "target": target.model_dump(mode="json"),
        "budget": budget and budget.model_dump(mode="json"),
        "calibration": recipe.calibration.model_dump(mode="json"),
        "calibration_text": _text_hash(recipe.calibration.text, "calibration"),
        "validation": recipe.validation.model_dump(mode="json", exclude={"budgets"}),
        "held_out_text": _text_hash(recipe.validation.held_out, "held_out"),
        "dtype": recipe.dtype,
        "code": code_version(),
        "depends": [_inputs_hash(plan, source, k) for k in plan.formats[key].depends_on()],
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _text_hash(spec: str, part: str) -> str:
    try:
        return text_sha256(load_text(spec, part))  # type: ignore[arg-type]
    except (OSError, UnicodeDecodeError) as exc:
        return f"unreadable: {exc}"


@functools.cache
def code_version() -> str:
    """weightsmith's version and a hash of its own source files (a changed converter invalidates its artifacts)."""
    digest = hashlib.sha256(__version__.encode())
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return f"{__version__}+{digest.hexdigest()[:12]}"
