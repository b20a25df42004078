"""What a plan will need of the machine, estimated from the checkpoint's headers before anything runs, and checked.

Each format says what one of its targets holds at its peak in each step and writes to disk (`Format.needs`), from
the sizes here: parameters, stored bytes, the largest shard, tensor and decoder layer, and the validation settings.
The run adds the source model's reference pass unless it is cached (transformers in the recipe's dtype: the whole
model, or one decoder layer at a time when the whole would not fit, `pipeline.reference.mode`), and a fixed overhead
per process (Python, torch, the runtime's libraries), and refuses to start, in one line, when the largest step would
not fit in the memory available now or the artifacts would not fit on the output's disk.
The models behind the figures were measured (issue 18's table: a 1.09B Qwen2 in bf16): a whole model in float32 is
4 bytes a parameter; streamed stages hold a shard or a layer at a time. Estimates err on the high side; a recipe
that knows better sets `check_resources: false`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.checkpoint import LAYER
from pipeline.types import Step

GB = 1_000_000_000
PROCESS = int(1.5 * GB)  # Python, torch, transformers and a runtime's libraries, resident before any weight


@dataclass(frozen=True)
class ModelSize:
    """Sizes of a checkpoint, from its safetensors headers."""

    n_params: int
    stored: int  # bytes of all tensors as stored
    largest_shard: int
    largest_tensor: int  # elements of the largest tensor
    largest_layer: int  # bytes of the largest decoder layer as stored
    hidden: int
    vocab: int
    experts: int = 0  # routed experts per MoE layer (0: dense)
    expert_inter: int = 0  # an expert's intermediate size

    @property
    def float32(self) -> int:
        """The whole model in float32 (transformers' reference pass, a float32 export or runtime)."""
        return 4 * self.n_params

    def at_bits(self, bits: float) -> int:
        return int(self.n_params * bits / 8)


@dataclass
class Needs:
    """Peak resident bytes per step (the fixed process overhead excluded) and bytes written to disk."""

    memory: dict[Step, int] = field(default_factory=dict)
    disk: int = 0


def model_size(checkpoint, config: dict) -> ModelSize:
    """`checkpoint`: a `pipeline.checkpoint.Checkpoint`; `config`: the source's config.json."""
    shards: dict[Path, int] = {}
    layers: dict[str, int] = {}
    largest = 0
    for name in checkpoint.names():
        size = checkpoint.nbytes(name)
        shards[checkpoint.shard(name)] = shards.get(checkpoint.shard(name), 0) + size
        if found := LAYER.match(name):
            layers[found.group(1)] = layers.get(found.group(1), 0) + size
        largest = max(largest, checkpoint.numel(name))
    text = config.get("text_config") or config
    return ModelSize(n_params=sum(checkpoint.numel(n) for n in checkpoint.names()), stored=sum(shards.values()),
                     largest_shard=max(shards.values(), default=0), largest_tensor=largest,
                     largest_layer=max(layers.values(), default=0), hidden=int(text.get("hidden_size") or 0),
                     vocab=int(text.get("vocab_size") or 0), experts=_first(text, EXPERTS),
                     expert_inter=_first(text, ("moe_intermediate_size", "intermediate_size")))  # fmt: skip


EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts")


def _first(config: dict, keys: tuple[str, ...]) -> int:
    return next((int(config[k]) for k in keys if config.get(k)), 0)


def reference_memory(size: ModelSize, validation, dtype: str = "float32", streamed: bool = False) -> int:
    """The source model's reference pass in `dtype` (`Recipe.dtype`; "auto": as stored). Whole: the model and one
    context's logits (three copies: as computed, in float32, as log-probabilities). Streamed
    (`pipeline.reference_stream`): the largest decoder layer twice in float32 (its parameters and the copy read from
    disk; a mixture of experts once more, for the fused experts), the embedding table as stored with the output
    projection in `dtype` and a float32 copy of it as it is read, the chunks' activations twice and one batch's
    intermediate activations, and a slice of positions' logits (with their log-probabilities and top-k's index
    arrays)."""
    width = {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype, size.stored / max(size.n_params, 1))
    if not streamed:
        return int(size.n_params * width) + 3 * validation.context * size.vocab * 4
    from pipeline.reference_stream import SLICE

    layer = size.largest_layer * size.float32 // max(size.stored, 1)
    table = size.vocab * size.hidden
    tokens = max(1, validation.eval_tokens // validation.context) * validation.context
    activations = 2 * tokens * size.hidden * 4 + 8 * validation.context * size.hidden * 4 * 12
    return ((3 if size.experts else 2) * layer + int(table * (size.stored / max(size.n_params, 1) + width + 4))
            + activations + 5 * SLICE * size.vocab * 4)  # fmt: skip


def shortfalls(needs: dict[str, Needs], reference: int, memory_free: int, disk_free: int) -> list[str]:
    """What does not fit: the largest step (or the reference pass) against free memory, all artifacts (written as
    candidates beside what is published) against free disk."""
    problems = []
    peaks = {f"{key} {step}": bytes_ for key, n in needs.items() for step, bytes_ in n.memory.items()}
    if reference:
        peaks["the reference pass"] = reference
    if peaks:
        where, peak = max(peaks.items(), key=lambda item: item[1])
        if peak + PROCESS > memory_free:
            problems.append(f"{where} needs about {(peak + PROCESS) / GB:.1f} GB of memory, {memory_free / GB:.1f} GB "
                            f"is available")  # fmt: skip
    disk = sum(n.disk for n in needs.values())
    if disk > disk_free:
        problems.append(f"the artifacts need about {disk / GB:.1f} GB on the output's disk, {disk_free / GB:.1f} GB "
                        f"is free")  # fmt: skip
    return problems


def machine_free(output: Path) -> tuple[int, int]:
    """(available memory, free disk under `output` or its nearest existing parent) in bytes."""
    import psutil

    existing = next(p for p in [output, *output.parents] if p.exists())
    return psutil.virtual_memory().available, shutil.disk_usage(existing).free
