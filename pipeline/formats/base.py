"""The contract every target format keeps, and the registry its subclasses join by being defined.

A format is one module with one `Format` subclass. The class says, as data, its name, its quants, the pip extra of
its runtime, the hardware each step runs on (preferred first) and the typed model of its options; its methods plan
(`depends_on`, `missing_dependency`, `check`), build, open the artifact in its runtime for validation, and write the
artifact's serving hand-off files. The plan (`pipeline.plan`) and the steps (`pipeline.convert`) only ever call
these methods; nothing probes a format for what it has.

Options are parsed once, when the format is made for a target (`Format.for_target`): into the format's own typed
model, then checked against the quant (`check_options`). Errors name the key. Heavy runtime imports happen inside the
methods, so the registry stays cheap to import (recipe validation does).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.resources import ModelSize, Needs
from pipeline.types import (
    Calibration,
    FormatError,
    Hardware,
    Manifest,
    Serving,
    SourceInfo,
    Status,
    Step,
    Target,
    Validation,
)

Progress = Callable[[int, int, str], None]


class Options(BaseModel):
    """Base of every format's options model: unknown keys are errors, values immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class BuildContext:
    """What a build gets besides the source: the recipe's name (file names), calibration settings, the artifact
    folders of the targets it is made from (by target key, see `Format.depends_on`), a progress callback, and a
    folder kept across runs of this target where a long build may keep finished work to resume from (None: no
    resuming; the build removes what it kept there once it is done)."""

    name: str
    calibration: Calibration = field(default_factory=Calibration)
    inputs: Mapping[str, Path] = field(default_factory=dict)
    progress: Progress | None = None
    work: Path | None = None


class Format:
    """One target format. Subclasses set the class attributes below and override the methods they need."""

    name: ClassVar[str]  # the `format:` of a recipe target
    quants: ClassVar[tuple[str, ...]]
    extra: ClassVar[str]  # the pip extra that installs its runtime: pip install 'weightsmith[<extra>]'
    library: ClassVar[str]  # the model card's `library_name` (Hugging Face hub conventions)
    options_model: ClassVar[type[Options]] = Options
    hardware: ClassVar[dict[Step, tuple[Hardware, ...]]]  # per step: the kinds it runs on, preferred first
    server_script: ClassVar[str | None] = None  # hand-off script that starts its server (adds the SERVE step)
    server: ClassVar[str] = ""  # that server, in words
    # whether its steps may run in threads beside other targets' (pipeline.lanes); false: its target runs alone
    shares_process: ClassVar[bool] = False
    registry: ClassVar[dict[str, type[Format]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in Format.registry:
                raise TypeError(f"two formats named {cls.name!r}: {Format.registry[cls.name]} and {cls}")
            Format.registry[cls.name] = cls

    def __init__(self, target: Target, options: Options):
        self.target, self.quant, self.options = target, target.quant, options

    @classmethod
    def for_target(cls, target: Target) -> Format:
        """The format of `target`, its options parsed and checked; FormatError naming the key otherwise."""
        fmt = cls.registry.get(target.format)
        if fmt is None:
            raise FormatError(f"unknown format {target.format!r} (formats: {', '.join(sorted(cls.registry))})")
        if target.quant not in fmt.quants:
            raise FormatError(f"{fmt.name} has no quant {target.quant!r} (quants: {', '.join(fmt.quants)})")
        return fmt(target, fmt.parse_options(target.quant, target.options))

    @classmethod
    def parse_options(cls, quant: str, raw: Mapping[str, Any]) -> Any:
        try:
            options = cls.options_model.model_validate(dict(raw))
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                key = ".".join(str(p) for p in err["loc"])
                if err["type"] == "extra_forbidden":
                    problems.append(f"unknown option {key!r} (options: {', '.join(cls.options_model.model_fields)})")
                else:
                    problems.append(f"option {key!r}: {err['msg']}")
            raise FormatError("; ".join(problems)) from None
        cls.check_options(quant, options)
        return options

    @classmethod
    def check_options(cls, quant: str, options: Any) -> None:
        """Raise FormatError for options that do not fit the quant (checked when the recipe is loaded)."""

    # planning

    @property
    def steps(self) -> tuple[Step, ...]:
        """The steps of this target, in order: a serve check where the format has a server script."""
        return (Step.BUILD, Step.VALIDATE, *((Step.SERVE,) if self.server_script else ()), Step.PUBLISH)

    def runs_on(self, step: Step) -> tuple[Hardware, ...]:
        """The hardware kinds `step` runs on, preferred first (a serve check runs where validation does)."""
        return self.hardware.get(step) or self.hardware.get(Step.VALIDATE, ("cpu",))

    def depends_on(self) -> list[str]:
        """Keys of the recipe targets whose validated artifacts this one is made from."""
        return []

    @property
    def calibrates(self) -> bool:
        """Whether the build reads the recipe's calibration text (checked before any build when it does)."""
        return False

    def missing_dependency(self, step: Step) -> str | None:
        """Why `step` cannot run in this environment (a missing package, named with its extra), or None."""
        return None

    def check(self, source: SourceInfo) -> None:
        """Raise FormatError, before anything is written, when this target cannot be made from `source`."""

    # building and validating

    def build(self, source: SourceInfo, out_dir: Path, ctx: BuildContext) -> dict[str, Any]:
        """Write the artifact's files into `out_dir` (a staging folder); return facts for the manifest."""
        raise NotImplementedError

    def open_runtime(self, artifact: Path, reference: Any, validation: Validation) -> Any:
        """The artifact loaded in its own runtime (a `pipeline.runtimes.base.Runtime`)."""
        raise NotImplementedError

    def validate(self, artifact: Path, reference: Any, validation: Validation) -> dict[str, Any]:
        """Run the artifact against the reference: {"smoke", "quality", "failures"} (see pipeline.validate)."""
        from pipeline.validate import smoke_test

        runtime = self.open_runtime(artifact, reference, validation)
        try:
            return smoke_test(runtime, reference, validation, self.eval_tokens(runtime))
        finally:
            runtime.close()

    def eval_tokens(self, runtime: Any) -> int | None:
        """How many held-out tokens to score in this runtime (None: all the recipe asks for)."""
        return None

    def engine(self, artifact: Path, reference: Any, validation: Validation,
               inputs: Mapping[str, Path]) -> dict[str, Any]:  # fmt: skip
        """The ENGINE step of formats that list it in `steps`: {"build": {...}, "smoke": {...}}."""
        raise NotImplementedError

    # serving

    def serve(self, artifact: Path, manifest: Manifest, validation: Validation, log: Path) -> dict[str, Any]:
        """The SERVE step: the artifact's own server script, run as written, answers the first smoke prompt as our
        runtime did (`pipeline.serve`). {"status", "server", "cases", "reason"}."""
        from pipeline.handoff import chat_info
        from pipeline.serve import serve_check

        stops = chat_info(manifest, artifact)["stop"]
        return serve_check(artifact / self.server_script, self.server, manifest.smoke or {}, stops,
                           validation.max_new_tokens, log)  # fmt: skip

    def needs(self, size: ModelSize, validation: Validation, calibration: Calibration) -> Needs:
        """Peak memory per step and disk of this target (`pipeline.resources`). The default: a build streaming a shard
        and a few layers, a validation holding the model in float32, an artifact as large as the source."""
        return Needs({Step.BUILD: size.largest_shard + 3 * size.largest_layer, Step.VALIDATE: size.float32},
                     disk=size.stored)  # fmt: skip

    def serving(self, artifact: Path) -> dict[str, Serving]:
        """Per serving stack this format is for, whether its loader takes the artifact (by that loader's rules)."""
        return {}

    def handoff_files(self, artifact: Path, manifest: Manifest, chat: dict[str, Any]) -> dict[str, str]:
        """Serving hand-off files for a validated artifact: {file name: text}. The model card is added by the caller."""
        return {}


class ServedByVllm:
    """A format whose serving stack is vLLM (GPTQ, compressed-tensors): its SERVE step is vLLM's own server started by
    the artifact's `vllm-serve.sh` in vLLM's virtualenv (`pipeline.consumers.vllm_check`: config, weights, greedy
    reply, each as vLLM logs it); `not_run`, naming why, without that virtualenv or where vLLM's loader rules refuse
    the artifact (no script is written then)."""

    server_script = "vllm-serve.sh"
    server = "vLLM's OpenAI server"

    def missing_vllm(self) -> str | None:
        """Why the SERVE step cannot start vLLM here (no virtualenv), or None."""
        from pipeline.consumers import vllm_missing

        return vllm_missing()

    def serve(self, artifact: Path, manifest: Manifest, validation: Validation, log: Path) -> dict[str, Any]:
        from pipeline.consumers import vllm_check

        return vllm_check(artifact, log)


def parse_size(value: Any) -> Any:
    """'2G', '500M', '64K', '1000' (bytes, decimal units) -> int; anything else unchanged for pydantic to judge."""
    if isinstance(value, str) and (m := re.fullmatch(r"\s*(\d+)\s*([KMG]?)B?\s*", value.upper())):
        return int(m.group(1)) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[m.group(2)]
    return value


def engine_not_run(code: str, detail: str) -> dict[str, Any]:
    """The outcome of an engine step that could not run: both its parts not_run, with the reason code."""
    skipped = {"status": Status.NOT_RUN, "reason": code, "detail": detail}
    return {"build": skipped, "smoke": dict(skipped)}


def missing_modules(modules: dict[str, str], extra: str) -> str | None:
    """Why a step needing `modules` ({module: its distribution's name}) cannot run here (the first one that does not
    import), or None."""
    for module, package in modules.items():
        try:
            __import__(module)
        except ImportError:
            return f"{package} is not installed: pip install 'weightsmith[{extra}]'"
    return None


def matrix_input(name: str, shape: tuple[int, ...]) -> int | None:
    """The input size of a 2-D weight (its last axis), None for any other tensor: what check_group_size checks by
    default."""
    return shape[-1] if len(shape) == 2 and name.endswith(".weight") else None


def check_group_size(source: SourceInfo, group_size: int,
                     input_size: Callable[[str, tuple[int, ...]], int | None] = matrix_input) -> None:  # fmt: skip
    """Raise FormatError unless `group_size` divides the input size of every tensor to be quantized (`input_size`
    of its name and shape; None for a tensor left as it is): kernels and converters either reject a ragged last
    group or, worse, silently leave the tensor unquantized."""
    from pipeline.checkpoint import Checkpoint

    checkpoint = Checkpoint(source.path)
    widths = {name: input_size(name, checkpoint.shape(name)) for name in checkpoint.names()}
    widths = {name: width for name, width in widths.items() if width is not None}
    for name, width in widths.items():
        if width % group_size:
            fits = [g for g in (32, 64, 128, 256) if all(w % g == 0 for w in widths.values())]
            raise FormatError(
                f"group size {group_size} does not divide the input size {width} of {name}; "
                f"group sizes that fit every quantized tensor: {', '.join(map(str, fits)) or 'none'}"
            )


def refuse_unless(supported: bool, fmt: str, model_type: str, attribute: str, what: str) -> None:
    """FormatError naming the architecture, the format and what would be needed, unless `supported`."""
    if not supported:
        from pipeline.archs import supported as supporting

        raise FormatError(f"{fmt} does not support architecture {model_type!r}: {what} (supported: "
                          f"{', '.join(supporting(attribute))})")  # fmt: skip
