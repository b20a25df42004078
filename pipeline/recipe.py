"""Recipes: one YAML file saying which checkpoint to convert, into which artifacts, and how to judge them.

The recipe is a typed pydantic model. Loading goes through `yaml.safe_load`'s node tree so that every validation
error can name the key *and the line* it came from; unknown keys are errors, never silently ignored.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from pipeline import formats, storage
from pipeline.formats import FormatError

BUILTIN_CORPUS = "builtin:corpus"
DEFAULT_PROMPTS = ["What is the capital of France?", "Write one sentence about the sea."]


class RecipeError(ValueError):
    """A recipe that cannot be used; `str()` is one line per problem, each naming file, line and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceSpec(_Strict):
    """Where the checkpoint comes from: `bundled:NAME`, a local folder, or a hub id (with an optional revision)."""

    id: str = Field(min_length=1)
    revision: str | None = None


def folder_of(key: str) -> str:
    """The artifact folder of the target named `key` (`gguf/q8_0` -> `gguf-q8_0`)."""
    return key.replace("/", "-", 1)


class Target(_Strict):
    format: str
    quant: str
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # tells apart two of one quant
    options: dict[str, Any] = Field(default_factory=dict)

    @property
    def key(self) -> str:
        """The target's name in budgets, logs and summaries: `gguf/q8_0`."""
        return f"{self.format}/{self.name or self.quant}"

    @property
    def folder(self) -> str:
        """The artifact folder's name: `gguf-q8_0`."""
        return folder_of(self.key)

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value not in formats.FORMATS:
            raise ValueError(f"unknown format {value!r} (supported: {', '.join(sorted(formats.FORMATS))})")
        return value

    @field_validator("quant")
    @classmethod
    def _known_quant(cls, value: str, info: ValidationInfo) -> str:
        fmt = info.data.get("format")
        if fmt in formats.FORMATS and value not in formats.FORMATS[fmt].QUANTS:
            raise ValueError(f"{fmt} has no quant {value!r} (supported: {', '.join(formats.FORMATS[fmt].QUANTS)})")
        return value

    @field_validator("options")
    @classmethod
    def _known_options(cls, value: dict, info: ValidationInfo) -> dict:
        fmt = formats.FORMATS.get(info.data.get("format"))
        if fmt is None:
            return value
        try:
            fmt.check_options(info.data.get("quant"), fmt.Options.model_validate(value))
        except FormatError as exc:
            raise ValueError(str(exc)) from None
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                key = ".".join(str(p) for p in err["loc"])
                if err["type"] == "extra_forbidden":
                    problems.append(f"unknown option {key!r} (options: {', '.join(fmt.Options.model_fields)})")
                else:
                    problems.append(f"option {key!r}: {err['msg']}")
            raise ValueError("; ".join(problems)) from None
        return value


class Calibration(_Strict):
    text: str = BUILTIN_CORPUS
    samples: int = Field(default=32, ge=1)
    seq_len: int = Field(default=512, ge=16)
    seed: int = 0


class Budget(_Strict):
    """Quality limits for one target; a measured figure outside any of them fails the target."""

    max_ppl_ratio: float | None = Field(default=None, ge=1.0)
    min_top1: float | None = Field(default=None, ge=0.0, le=1.0)
    max_kl_mean: float | None = Field(default=None, ge=0.0)
    exact_tokenizer: bool = True  # the artifact's own tokenizer must give the source's ids on the probe text


class Validation(_Strict):
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), min_length=1)
    held_out: str = BUILTIN_CORPUS
    eval_tokens: int = Field(default=2048, ge=32)
    context: int = Field(default=512, ge=16)
    max_new_tokens: int = Field(default=24, ge=1)
    budgets: dict[str, Budget] = Field(default_factory=dict)


class Recipe(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    source: SourceSpec
    # precision the source model runs in as the validation reference (auto: as stored; float32 suits CPUs)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "float32"
    targets: list[Target] = Field(min_length=1)
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

    @field_validator("source", mode="before")
    @classmethod
    def _source_from_string(cls, value: Any) -> Any:
        return {"id": value} if isinstance(value, str) else value

    @field_validator("targets")
    @classmethod
    def _targets_unique(cls, targets: list[Target]) -> list[Target]:
        keys = [t.key for t in targets]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"target listed twice: {', '.join(dupes)}")
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
        """The recipe with only the targets named by `keys` (all when None or empty)."""
        if not keys:
            return self
        unknown = [k for k in keys if k not in {t.key for t in self.targets}]
        if unknown:
            raise RecipeError(f"no target {', '.join(unknown)} in recipe {self.name} (targets: "
                              f"{', '.join(t.key for t in self.targets)})")  # fmt: skip
        return self.model_copy(update={"targets": [t for t in self.targets if t.key in keys]})

    def with_source(self, source: str | None) -> Recipe:
        """The recipe converting `source` (bundled:NAME, a folder or a hub id) instead of its own, when given."""
        return self if not source else self.model_copy(update={"source": SourceSpec(id=source)})

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
