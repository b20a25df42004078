"""Recipes: one YAML file saying which checkpoint to convert, into which artifacts, and how to judge them.

The recipe is a typed pydantic model. Loading goes through `yaml.safe_load`'s node tree so that every validation
error can name the key *and the line* it came from; unknown keys are errors, never silently ignored.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator

from pipeline import storage
from pipeline.formats import FORMATS
from pipeline.formats.base import Format
from pipeline.types import (
    Budget,
    Calibration,
    Concurrency,
    FormatError,
    RecipeError,
    SourceSpec,
    Strict,
    Target,
    Validation,
)


class RecipeTarget(Target):
    """A target as a recipe lists it: its format, quant and options checked against the format registry."""

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value not in FORMATS:
            raise ValueError(f"unknown format {value!r} (supported: {', '.join(sorted(FORMATS))})")
        return value

    @field_validator("quant")
    @classmethod
    def _known_quant(cls, value: str, info: ValidationInfo) -> str:
        fmt = FORMATS.get(info.data.get("format"))
        if fmt is not None and value not in fmt.quants:
            raise ValueError(f"{fmt.name} has no quant {value!r} (supported: {', '.join(fmt.quants)})")
        return value

    @field_validator("options")
    @classmethod
    def _known_options(cls, value: dict, info: ValidationInfo) -> dict:
        fmt = FORMATS.get(info.data.get("format"))
        if fmt is not None and info.data.get("quant") in fmt.quants:
            try:
                fmt.parse_options(info.data["quant"], value)
            except FormatError as exc:
                raise ValueError(str(exc)) from None
        return value


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    source: SourceSpec
    # precision the source model runs in as the validation reference (auto: as stored; float32 suits CPUs)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "float32"
    targets: list[RecipeTarget] = Field(min_length=1)
    calibration: Calibration = Field(default_factory=Calibration)
    validation: Validation = Field(default_factory=Validation)
    output: str = "artifacts"  # a folder (shared by every worker under deployments), or an fsspec URL: s3://bucket/dir
    # under Prefect deployments: how long a step handed to another hardware pool (a TensorRT engine to `cuda`) may
    # wait for a worker there before it is recorded not_run
    dispatch_timeout_s: int = Field(default=3600, ge=1)
    # under Prefect deployments: a step whose preferred hardware has no online worker (MLX validation on `apple`,
    # GPTQ on `cuda`) runs on the next kind it supports where the flow runs; false waits for the preferred pool
    hardware_fallback: bool = True
    allow_pickle: bool = False
    trust_remote_code: bool = False
    # refuse to start when the estimated memory or disk (pipeline.resources) exceeds what the machine has
    check_resources: bool = True
    # targets built and validated at once in one run, within a memory budget (pipeline.lanes); 1: one after another
    concurrency: Concurrency = Field(default_factory=Concurrency)

    @field_validator("source", mode="before")
    @classmethod
    def _source_from_string(cls, value: Any) -> Any:
        return {"id": value} if isinstance(value, str) else value

    @field_validator("targets")
    @classmethod
    def _targets_consistent(cls, targets: list[RecipeTarget]) -> list[RecipeTarget]:
        keys = [t.key for t in targets]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"target listed twice: {', '.join(dupes)}")
        for target in targets:
            missing = [k for k in Format.for_target(target).depends_on() if k not in keys]
            if missing:
                raise ValueError(f"{target.key} is made from {', '.join(missing)}, which is not a target of this "
                                 f"recipe: add it")  # fmt: skip
        return targets

    @field_validator("validation")
    @classmethod
    def _budgets_name_targets(cls, validation: Validation, info: ValidationInfo) -> Validation:
        keys = [t.key for t in info.data.get("targets") or []]
        unknown = sorted(set(validation.budgets) - set(keys))
        if keys and unknown:
            raise ValueError(f"budgets for {', '.join(unknown)}, which is not a target (targets: {', '.join(keys)})")
        return validation

    def select(self, keys: list[str] | None) -> Recipe:
        """The recipe with only the targets named by `keys` and those they are made from (all when None or empty)."""
        if not keys:
            return self
        unknown = [k for k in keys if k not in {t.key for t in self.targets}]
        if unknown:
            raise RecipeError(f"no target {', '.join(unknown)} in recipe {self.name} (targets: "
                              f"{', '.join(t.key for t in self.targets)})")  # fmt: skip
        wanted, todo = set(), list(keys)
        while todo:
            key = todo.pop()
            if key not in wanted:
                wanted.add(key)
                todo += Format.for_target(self.target(key)).depends_on()
        return self.model_copy(update={"targets": [t for t in self.targets if t.key in wanted]})

    def with_overrides(self, only: list[str] | None = None, source: str | None = None,
                       output: str | None = None) -> Recipe:  # fmt: skip
        """The recipe as a run's options change it (the CLI's and the flows' alike): only the targets named in `only`
        (and those they are made from), converting `source` (bundled:NAME, a folder or a hub id) and writing to
        `output` instead of its own, when given."""
        recipe = self.select(only)
        if source:
            recipe = recipe.model_copy(update={"source": SourceSpec(id=source)})
        if output:
            if storage.is_url(output):
                storage.check_url(output)
            recipe = recipe.model_copy(update={"output": output})
        return recipe

    def target(self, key: str) -> Target:
        return next(t for t in self.targets if t.key == key)

    def budget(self, target: Target) -> Budget | None:
        return self.validation.budgets.get(target.key)

    @field_validator("output")
    @classmethod
    def _output_reachable(cls, value: str) -> str:
        if storage.is_url(value):
            storage.check_url(value)
        return value

    def output_dir(self, base: Path | None = None) -> Path:
        """The model's artifact root, `<output>/<name>`; a relative `output` is taken from `base` (default: the current
        directory). For a URL output (`s3://...`), the local mirror that the steps work in (see pipeline.storage)."""
        if storage.is_url(self.output):
            return storage.mirror(self.output) / self.name
        root = Path(self.output).expanduser()
        if not root.is_absolute():
            root = (base or Path.cwd()) / root
        return root / self.name


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}:1: a recipe is a mapping with keys name, source, targets, ...")
    lines = _line_index(node)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        problems = sorted((_describe(path, lines, err) for err in exc.errors()), key=lambda p: int(p.split(":")[1]))
        raise RecipeError("\n".join(problems)) from None


def _line_index(node: yaml.Node | None, path: tuple = ()) -> dict[tuple, int]:
    """Map every key path in the YAML tree (('targets', 1, 'quant')) to its 1-based line."""
    if node is None:
        return {}
    index = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            index[path + (key.value,)] = key.start_mark.line + 1
            index.update({k: v for k, v in _line_index(value, path + (key.value,)).items() if k != path + (key.value,)})
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            index.update(_line_index(item, path + (i,)))
    return index


def _describe(path: Path, lines: dict[tuple, int], err: dict) -> str:
    loc = tuple(err["loc"])
    known = next((loc[:n] for n in range(len(loc), -1, -1) if loc[:n] in lines), ())
    where = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in loc).replace(".[", "[") or "recipe"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(_allowed_keys(loc[:-1]))
        message = f"unknown key {loc[-1]!r} (allowed here: {allowed})"
    elif err["type"] == "missing":
        message = f"required key {loc[-1]!r} is missing"
    elif "input" in err and err["type"] not in ("value_error",) and not isinstance(err["input"], (dict, list)):
        message = f"{message} (got {err['input']!r})"
    return f"{path}:{lines.get(known, 1)}: {where}: {message}"


def _allowed_keys(loc: tuple) -> list[str]:
    """The keys a mapping at `loc` may have, walking the recipe's type annotations (lists and dicts step over their
    index or key)."""
    annotation: Any = Recipe
    for part in loc:
        if typing.get_origin(annotation) in (list, dict):
            annotation = typing.get_args(annotation)[-1]
            continue
        model = _model_in(annotation)
        if model is None or part not in model.model_fields:
            return []
        annotation = model.model_fields[part].annotation
    model = _model_in(annotation)
    return list(model.model_fields) if model else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None
