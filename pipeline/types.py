"""The ground types every part of weightsmith speaks in. This module imports nothing of ours.

- `Status`: the outcome of a step and of a target (the only place status words are spelled).
- `Step`, `Hardware`: the steps of a plan and the hardware kinds they run on.
- `SourceSpec`, `SourceInfo`: where a checkpoint comes from, and what it is.
- `Target`: one artifact a recipe asks for (format, quant, options).
- `Calibration`, `Validation`, `Budget`: the settings a target is built and judged with.
- `FileEntry`, `Manifest`: an artifact folder's record of itself.
- `FormatError`: a target that a format cannot produce from a source, raised before anything is written.
- `InputError` (`SourceError`, `RecipeError`), `OutputBusy`, and the `ExitCode` each error ends a run with.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from enum import Enum, IntEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

BUILTIN_CORPUS = "builtin:corpus"
DEFAULT_PROMPTS = ["What is the capital of France?", "Write one sentence about the sea."]
MANIFEST = "manifest.json"


class Status(str, Enum):
    """What became of a step, or of a target once its steps ran."""

    BUILT = "built"  # files complete, not yet validated
    OK = "ok"  # validated, within budget
    FAILED = "failed"  # with a reason; the numbers that failed are kept
    NOT_RUN = "not_run"  # a step that cannot run here (missing hardware or package), with the reason
    REFUSED = "refused"  # the format cannot take this source (architecture, shape), said before anything is written

    def __str__(self) -> str:
        return self.value


class Step(str, Enum):
    """The steps of one target, in the order a plan runs them."""

    BUILD = "build"  # write the artifact into a staging folder
    VALIDATE = "validate"  # run it in its own runtime against the source
    ENGINE = "engine"  # a further build and run on other hardware (TensorRT engines)
    SERVE = "serve"  # the artifact's own server script answers as our runtime did (pipeline.serve)
    PUBLISH = "publish"  # move the validated artifact into place

    def __str__(self) -> str:
        return self.value


Hardware = Literal["cpu", "cuda", "apple"]
HARDWARE_KINDS: tuple[Hardware, ...] = ("cpu", "cuda", "apple")


class FormatError(ValueError):
    """A target that this format cannot produce from this source; raised before any output is written."""


class InputError(ValueError):
    """Something the user gave cannot be used (a recipe, a source, a text it names); the message is one line or more,
    each saying what, where and how to fix it."""


class SourceError(InputError):
    """The source cannot be used; the message says why and what to do."""


class RecipeError(InputError):
    """A recipe that cannot be used; `str()` is one line per problem, each naming file, line and key."""


class NotEnoughResources(OSError):
    """The machine cannot hold what the plan needs (memory or disk), found before anything runs."""


class OutputBusy(RuntimeError):
    """Another run is writing into this output folder."""


class ExitCode(IntEnum):
    """What `weightsmith convert` exits with, and what a failed flow run's message starts with (`exit 2: ...`)."""

    OK = 0  # every target ok, not_run or refused
    FAILED = 1  # a target failed its build, validation or budget
    BAD_INPUT = 2  # the recipe, the source or a text it names cannot be used
    BUSY = 3  # another run is writing into the output folder
    ENVIRONMENT = 4  # the machine cannot do it: the output is not writable, the disk is full
    INTERNAL = 5  # a bug in weightsmith: rerun with --debug and report the traceback


def exit_code(exc: BaseException) -> ExitCode:
    """The exit code an error ends a run with."""
    if isinstance(exc, InputError):
        return ExitCode.BAD_INPUT
    if isinstance(exc, OutputBusy):
        return ExitCode.BUSY
    if isinstance(exc, OSError):
        return ExitCode.ENVIRONMENT
    return ExitCode.INTERNAL


def one_line(exc: BaseException) -> str:
    """An error as the user reads it: what, where, how to fix, without a traceback."""
    if isinstance(exc, OSError) and exc.filename:
        fix = "free space, or set output to another disk" if exc.errno == 28 else "check the path and its permissions"
        return f"cannot write or read {exc.filename}: {exc.strerror}; {fix}"
    if exit_code(exc) == ExitCode.INTERNAL:
        return f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback, and report it)"
    return " ".join(str(exc).split()) if isinstance(exc, (OSError, FormatError)) else str(exc)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceSpec(Strict):
    """Where the checkpoint comes from: `bundled:NAME`, a local folder, or a hub id (with an optional revision)."""

    id: str = Field(min_length=1)
    revision: str | None = None


def folder_of(key: str) -> str:
    """The artifact folder of the target named `key` (`gguf/q8_0` -> `gguf-q8_0`)."""
    return key.replace("/", "-", 1)


class Target(Strict):
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


class Calibration(Strict):
    text: str = BUILTIN_CORPUS
    samples: int = Field(default=32, ge=1)
    seq_len: int = Field(default=512, ge=16)
    seed: int = 0


class Concurrency(Strict):
    """How many of a recipe's targets run at once on one machine (pipeline.lanes)."""

    targets: int = Field(default=1, ge=1)
    # the sum of the running targets' estimated peak memory stays within this; None: the memory available at start
    memory_gb: float | None = Field(default=None, gt=0)


class Budget(Strict):
    """Quality limits for one target; a measured figure outside any of them fails the target."""

    max_ppl_ratio: float | None = Field(default=None, ge=1.0)
    min_top1: float | None = Field(default=None, ge=0.0, le=1.0)
    max_kl_mean: float | None = Field(default=None, ge=0.0)
    exact_tokenizer: bool = True  # the artifact's own tokenizer must give the source's ids on the probe text


class Validation(Strict):
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), min_length=1)
    held_out: str = BUILTIN_CORPUS
    eval_tokens: int = Field(default=2048, ge=32)
    context: int = Field(default=512, ge=16)
    max_new_tokens: int = Field(default=24, ge=1)
    # how the source model runs as the reference (pipeline.reference): whole (from_pretrained), streamed (one decoder
    # layer at a time, for a model larger than memory), or auto: streamed when the whole would not fit
    reference: Literal["auto", "whole", "streamed"] = "auto"
    budgets: dict[str, Budget] = Field(default_factory=dict)


class SourceInfo(BaseModel):
    """A resolved checkpoint: where it is on disk and what it holds."""

    spec: str
    name: str = ""  # the model's own name (hub repository, bundled model, folder), never a recipe's
    kind: Literal["bundled", "local", "hub"]
    path: Path
    revision: str | None
    fingerprint: str
    files: dict[str, str]
    model_type: str
    architecture: str
    dtype: str
    n_params: int
    shards: list[str]
    tied_embeddings: bool
    tokenizer_files: list[str]
    chat_template: str | None
    trust_remote_code: bool = False

    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text(encoding="utf-8"))

    def describe(self) -> dict:
        """What a manifest records about the source."""
        return self.model_dump(mode="json")


class FileEntry(BaseModel):
    path: str
    size: int
    sha256: str


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Serving(BaseModel):
    """Whether one serving stack's loader takes an artifact, judged by that loader's rules (`by`); no hand-off file
    promises a stack that refuses it."""

    accepts: bool
    why: str | None = None  # what its loader refuses, when it does
    by: str


class Manifest(BaseModel):
    """An artifact folder's `manifest.json`: what it is, what it was made from, how it was judged."""

    schema_version: int = 1
    model: str
    target: str
    format: str
    quant: str
    status: Status
    reason: str | None = None
    steps: dict[Step, Status] = Field(default_factory=dict)  # the outcome of each step that ran
    files: list[FileEntry] = Field(default_factory=list)
    source: dict[str, Any] = Field(default_factory=dict)
    recipe_entry: dict[str, Any] = Field(default_factory=dict)
    budget: dict[str, Any] | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    built_on: dict[str, Any] | None = None
    validated_on: dict[str, Any] | None = None
    build: dict[str, Any] = Field(default_factory=dict)
    smoke: dict[str, Any] | None = None
    quality: dict[str, Any] | None = None
    handoff: list[str] = Field(default_factory=list)  # serving files and model card written beside the artifact
    serving: dict[str, Serving] = Field(default_factory=dict)  # per serving stack: whether its loader takes it
    serve: dict[str, Any] | None = None  # the serve check's outcome: server, replies, time to first token
    consumers: dict[str, Any] = Field(default_factory=dict)  # consumer checks by stack (pipeline.consumers)
    inputs: str | None = None  # hash of what the artifact was made from (see pipeline.plan.target_inputs)
    resumed: bool = Field(default=False, exclude=True)  # this run found it complete and up to date (not stored)
    timings: dict[str, float] = Field(default_factory=dict)
    created_at: str = Field(default_factory=now)
    updated_at: str = Field(default_factory=now)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def with_step(self, step: Step, status: Status, reason: str | None = None, **updates: Any) -> Manifest:
        """This manifest after `step` ended in `status`: the target's status follows, a reason is kept."""
        return self.model_copy(update={**updates, "steps": {**self.steps, step: status}, "status": status,
                                       "reason": reason})  # fmt: skip
