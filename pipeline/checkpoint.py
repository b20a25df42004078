"""Tensor-by-tensor access to a (possibly sharded) safetensors checkpoint, checked before it is trusted; the config
keys other readers need; and `ShardWriter`, which the formats that write safetensors checkpoints share.

Tensors are read with plain positioned reads rather than through a memory map: a mapped file's pages stay in the
process's resident set once touched, so streaming a whole model through an mmap grows RSS to the model's size.
Reading one tensor at a time keeps peak memory at about one tensor.

Why our own reader (the `safetensors` package reads the same files): we need its checks to name the file, the tensor
and the fix in one line, a short read to be an error rather than zeros, and the headers of every shard checked
before a build starts. The layout is the safetensors specification: an 8-byte little-endian header length, a JSON
header of dtype, shape and byte offsets per tensor (relative to the end of the header), then the data.
Every floating-point tensor is checked for NaN and infinities as it is read (no extra pass over the file).
Checks on open: the header length is within bounds and the file, the header is a JSON object, every entry's dtype is
known and its byte span equals dtype size x shape, spans lie within the file and do not overlap; with an index file,
its `weight_map` names exactly the tensors the shards hold, each in the shard that holds it. A read that comes up
short (the file changed or was truncated since) raises.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from pipeline.types import FormatError

# gpt-oss as released keeps its experts packed in MXFP4: `<fused expert tensor>_blocks` and `_scales`
MXFP4_PARTS = ("_blocks", "_scales")


def mxfp4_packed(fmt: str, name: str, why: str) -> FormatError:
    """The refusal of an MXFP4-packed expert tensor, saying how to get the float checkpoint the formats read."""
    return FormatError(f"{fmt}: {name} is an MXFP4-packed expert tensor, {why}; load the checkpoint dequantized "
                       f"(transformers' Mxfp4Config(dequantize=True)) and save it first")  # fmt: skip


# a decoder layer's tensors: `model.layers.N.` in a text model, `model.language_model.layers.N.` in a multimodal one
LAYER = re.compile(r"^model\.(?:language_model\.)?layers\.(\d+)\.")


def decoder_prefix(names) -> str:
    """Where checkpoint tensor `names` keep the text decoder (embed_tokens, layers, norm): `model.`, or
    `model.language_model.` in a multimodal checkpoint (Qwen 3.5 as released, Gemma 3), beside its vision tower."""
    multimodal = any(name.startswith("model.language_model.layers.") for name in names)
    return "model.language_model." if multimodal else "model."


MAX_HEADER = 100 * 2**20  # the safetensors reference implementation refuses headers above 100 MB
INDEX = "model.safetensors.index.json"

DTYPES = {  # safetensors dtype -> (torch dtype name, bytes per element)
    "BF16": ("bfloat16", 2),
    "F16": ("float16", 2),
    "F32": ("float32", 4),
    "F64": ("float64", 8),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}


FLOATS = ("BF16", "F16", "F32", "F64")  # checked for NaN and infinities as they are read


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted; the message names the file, what is wrong and the fix."""


class Checkpoint:
    """The tensors of every `*.safetensors` file in a folder, by name."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._entries: dict[str, tuple[Path, int, dict]] = {}
        for file in sorted(self.path.glob("*.safetensors")):
            base, header = read_header(file)
            for name, entry in header.items():
                if name in self._entries:
                    raise CheckpointError(f"{file.name}: tensor {name!r} is also in {self._entries[name][0].name}: "
                                          f"the shards overlap; re-download the checkpoint")  # fmt: skip
                self._entries[name] = (file, base, entry)
        check_index(self.path, {name: entry[0].name for name, entry in self._entries.items()})

    def names(self) -> list[str]:
        return list(self._entries)

    def shard(self, name: str) -> Path:
        return self._entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][2]["shape"])

    def numel(self, name: str) -> int:
        n = 1
        for d in self.shape(name):
            n *= d
        return n

    def nbytes(self, name: str) -> int:
        start, end = self._entries[name][2]["data_offsets"]
        return end - start

    def dtype(self, name: str) -> str:
        return self._entries[name][2]["dtype"]

    def dtype_summary(self) -> str:
        counts: dict[str, int] = {}
        for name in self._entries:
            counts[self.dtype(name)] = counts.get(self.dtype(name), 0) + self.numel(name)
        top = max(counts, key=counts.get) if counts else "unknown"
        return DTYPES[top][0] if top in DTYPES else top.lower()

    def tensor(self, name: str):
        """One tensor, read from disk (a torch tensor in the stored dtype)."""
        import torch

        file, base, entry = self._entries[name]
        start, end = entry["data_offsets"]
        buffer = bytearray(end - start)
        with open(file, "rb") as fh:
            fh.seek(base + start)
            got = fh.readinto(buffer)
        if got != len(buffer):
            raise CheckpointError(f"{file.name}: tensor {name!r} ends past the end of the file ({got} of "
                                  f"{len(buffer)} bytes read): the file is truncated; re-download it")  # fmt: skip
        dtype = getattr(torch, DTYPES[entry["dtype"]][0])
        if not buffer:
            return torch.empty(entry["shape"], dtype=dtype)
        tensor = torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])
        if entry["dtype"] in FLOATS and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{file.name}: tensor {name!r} holds NaN or infinite values: the checkpoint is "
                                  f"damaged (or saved from a diverged run); nothing can be made of it")  # fmt: skip
        return tensor


def read_header(file: Path) -> tuple[int, dict[str, dict]]:
    """(offset of the data, {tensor name: entry}) of one safetensors file, every entry checked against the file."""
    size = os.path.getsize(file)
    fix = "re-download or re-save the checkpoint"
    if size < 8:
        raise CheckpointError(f"{file.name}: {size} bytes, too short for a safetensors header: {fix}")
    with open(file, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        if length > MAX_HEADER or 8 + length > size:
            raise CheckpointError(f"{file.name}: header length {length} is beyond the file ({size} bytes) or the "
                                  f"100 MB limit: not a safetensors file, or a damaged one; {fix}")  # fmt: skip
        raw = fh.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file.name}: the header is not valid JSON ({exc}): {fix}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file.name}: the header is not a JSON object: {fix}")
    header.pop("__metadata__", None)
    base, spans = 8 + length, []
    for name, entry in header.items():
        spans.append((*_checked_span(file.name, name, entry, size - base), name))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise CheckpointError(f"{file.name}: tensors {first!r} and {second!r} share bytes: the header is "
                                  f"damaged; {fix}")  # fmt: skip
    return base, header


def _checked_span(file: str, name: str, entry, data_size: int) -> tuple[int, int]:
    fix = "re-download or re-save the checkpoint"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise CheckpointError(f"{file}: entry {name!r} lacks dtype, shape or data_offsets: {fix}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise CheckpointError(f"{file}: tensor {name!r} has dtype {dtype!r}, which weightsmith does not read "
                              f"(dtypes: {', '.join(DTYPES)})")  # fmt: skip
    valid_shape = isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
    valid_offsets = isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
    if not (valid_shape and valid_offsets) or not 0 <= offsets[0] <= offsets[1]:
        raise CheckpointError(f"{file}: tensor {name!r} has an invalid shape or data_offsets: {fix}")
    numel = 1
    for d in shape:
        numel *= d
    if offsets[1] - offsets[0] != numel * DTYPES[dtype][1]:
        raise CheckpointError(f"{file}: tensor {name!r} spans {offsets[1] - offsets[0]} bytes, but {dtype} x "
                              f"{shape} needs {numel * DTYPES[dtype][1]}: the header is damaged; {fix}")  # fmt: skip
    if offsets[1] > data_size:
        raise CheckpointError(f"{file}: tensor {name!r} ends at byte {offsets[1]} of a {data_size}-byte data "
                              f"section: the file is truncated; {fix}")  # fmt: skip
    return offsets[0], offsets[1]


def check_index(folder: Path, holder: dict[str, str]) -> None:
    """The index's weight_map must name every tensor, each in the shard that holds it, and nothing else."""
    path = folder / INDEX
    if not path.is_file():
        return
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{INDEX}: not valid JSON with a weight_map: re-download the checkpoint") from None
    missing = sorted(set(weight_map) - set(holder))
    unlisted = sorted(set(holder) - set(weight_map))
    moved = sorted(n for n in set(weight_map) & set(holder) if weight_map[n] != holder[n])
    for problem, names in (("names tensors no shard holds", missing), ("does not list tensors the shards hold",
                           unlisted), ("puts tensors in another shard than the one holding them", moved)):  # fmt: skip
        if names:
            raise CheckpointError(f"{INDEX} {problem} ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''}): a "
                                  f"shard is missing or the index is stale; re-download the checkpoint")  # fmt: skip


def portable_config(config: dict) -> dict:
    """config.json as readers other than transformers 5 expect it. transformers 5 writes the rope settings only as
    `rope_parameters` and the dtype only as `dtype`; transformers 4.x, mlx-lm and others read `rope_theta`,
    `rope_scaling` and `torch_dtype`, and silently fall back to their own defaults (wrong logits, no error) when
    those are missing; mlx-lm's Qwen3 MoE wants `num_experts`, which transformers 5 saves as `num_local_experts`. The
    new keys stay; the old ones are added where absent."""
    out = dict(config)
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_theta") is not None:
        out.setdefault("rope_theta", rope["rope_theta"])
    if "partial_rotary_factor" in rope:
        out.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
    kind = rope.get("rope_type", "default")
    if kind != "default" and not out.get("rope_scaling"):
        out["rope_scaling"] = {**{k: v for k, v in rope.items() if k != "rope_theta"}, "rope_type": kind, "type": kind}
    if config.get("dtype") is not None:
        out.setdefault("torch_dtype", config["dtype"])
    if config.get("num_local_experts") is not None:  # transformers 5 saves Qwen3 MoE's `num_experts` under this name
        out.setdefault("num_experts", config["num_local_experts"])
    return {**out, **per_layer_type(config, out)}


def per_layer_type(config: dict, portable: dict) -> dict:
    """Gemma 3/4's settings per layer type as transformers 4 and the original releases spelled them: transformers 5
    nests the rope settings under `rope_parameters.{full_attention,sliding_attention}` (4: `rope_theta` and
    `rope_local_base_freq`), keeps only `layer_types` (4: `sliding_window_pattern`, every n-th layer global) and saves
    Gemma 4's global head size in `per_layer_config` (the release: `global_head_dim`, `num_global_key_value_heads`)."""
    out: dict = {}
    rope = config.get("rope_parameters") or {}
    full, sliding = rope.get("full_attention"), rope.get("sliding_attention")
    if isinstance(full, dict) and isinstance(sliding, dict):
        out["rope_theta"], out["rope_local_base_freq"] = full.get("rope_theta"), sliding.get("rope_theta")
        kind = full.get("rope_type", "default")
        # Gemma 3's global-layer scaling as transformers 4 read it (transformers 5 wants its rope_theta too); Gemma 4
        # came with transformers 5, whose reader takes a `rope_scaling` over its nested settings (KeyError)
        if kind != "default" and not portable.get("rope_scaling") and config.get("model_type") != "gemma4_text":
            out["rope_scaling"] = {**full, "type": kind}
    types = config.get("layer_types") or []
    if "sliding_attention" in types and "full_attention" in types:
        period = types.index("full_attention") + 1
        if all((kind == "full_attention") == ((i + 1) % period == 0) for i, kind in enumerate(types)):
            out["sliding_window_pattern"] = period
    per_layer = config.get("per_layer_config") or {}
    globals_ = [per_layer[str(i)] for i, kind in enumerate(types) if kind == "full_attention" and str(i) in per_layer]
    if globals_ and "head_dim" in globals_[0]:
        out["global_head_dim"] = globals_[0]["head_dim"]
    if globals_ and "num_key_value_heads" in globals_[0]:
        out["num_global_key_value_heads"] = globals_[0]["num_key_value_heads"]
    return {k: v for k, v in out.items() if k not in portable and v is not None}


def portable_view(source: Path, shadow: Path) -> Path:
    """A folder of links to the checkpoint's files whose config.json carries the portable keys (`portable_config`),
    for tools that read the config themselves (mlx-lm, onnxruntime-genai's builder)."""
    shadow.mkdir()
    for item in source.iterdir():
        if item.name != "config.json":
            os.symlink(item.resolve(), shadow / item.name)
    config = portable_config(json.loads((source / "config.json").read_text(encoding="utf-8")))
    (shadow / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return shadow


class ShardWriter:
    """Writes tensors into safetensors shards of at most `max_bytes` (a tensor larger than that gets its own), and
    the index transformers reads when there is more than one."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []

    def add(self, name: str, tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f".shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, path, metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        if len(self.shards) == 1:
            self.shards[0][0].rename(self.folder / "model.safetensors")
            return
        weight_map, total = {}, 0
        for i, (path, names) in enumerate(self.shards):
            final = self.folder / f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"
            path.rename(final)
            total += final.stat().st_size
            weight_map.update(dict.fromkeys(names, final.name))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
