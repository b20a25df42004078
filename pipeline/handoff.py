"""Serving hand-off files and the model card, written beside each validated artifact from its manifest.

One function per format returns {file name: text}; `write_handoff` adds the model card (README.md, Hugging Face
conventions) and writes them all atomically. Nothing here is per-model text: names, paths, stop tokens, context
length and the chat template all come from the manifest, the source's config and its tokenizer files.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import yaml

from pipeline import __version__

CARD = "README.md"


def write_handoff(folder: Path, manifest) -> list[str]:
    """Write the hand-off files for `manifest`'s artifact in `folder`; return their names."""
    chat = _chat(manifest)
    files = HANDOFF.get(manifest.format, lambda *_: {})(folder, manifest, chat)
    files[CARD] = model_card(manifest, files)
    for name, text in files.items():
        tmp = folder / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(folder / name)
    return sorted(files)


def _chat(manifest) -> dict[str, Any]:
    """The chat template, stop strings and ids, and context length, from the source checkpoint's files."""
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
            "context": min(int(config.get("max_position_embeddings") or 4096), 8192)}  # fmt: skip


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _vocab(path: Path) -> dict[int, str]:
    data = _read_json(path)
    vocab = {i: t for t, i in (data.get("model", {}).get("vocab") or {}).items()} if data else {}
    vocab.update({t["id"]: t["content"] for t in data.get("added_tokens", [])})
    return vocab


def _model_name(manifest) -> str:
    return f"{manifest.model}-{manifest.target.split('/', 1)[1]}".lower()


def gguf_files(folder: Path, manifest, chat) -> dict[str, str]:
    gguf = manifest.build["file"]
    lines = [f"# Ollama Modelfile for {manifest.model} {manifest.quant} (weightsmith {__version__})", f"FROM ./{gguf}"]
    if template := ollama_template(chat["template"]):
        lines.append(f'TEMPLATE """{template}"""')
        if system := default_system(chat["template"]):
            lines.append(f'SYSTEM """{system}"""')
    else:
        lines.append("# TEMPLATE: none written; Ollama takes the chat template stored in the GGUF")
    lines += [f'PARAMETER stop "{s}"' for s in chat["stop"]]
    lines.append(f"PARAMETER num_ctx {chat['context']}")
    localai = {"name": _model_name(manifest), "backend": "llama-cpp", "context_size": chat["context"],
               "parameters": {"model": gguf}, "template": {"use_tokenizer_template": True},
               "stopwords": chat["stop"]}  # fmt: skip
    server = [
        "llama-server",
        "-m",
        gguf,
        "--jinja",
        "-c",
        str(chat["context"]),
        "--host",
        "127.0.0.1",
        "--port",
        "8080",
    ]
    return {"Modelfile": "\n".join(lines) + "\n", "localai.yaml": yaml.safe_dump(localai, sort_keys=False),
            "llama-server.sh": _script(server)}  # fmt: skip


def ollama_template(jinja: str | None) -> str | None:
    """Ollama's Go template for the ChatML family (the only one translated; others rely on the GGUF's template)."""
    if not jinja or "<|im_start|>" not in jinja:
        return None
    return ("{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
            "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
            "<|im_start|>assistant\n")  # fmt: skip


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
    """The chat template rendered as transformers renders it, in jinja2's sandbox."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **extra)


def default_system(template: str) -> str | None:
    """The system prompt a ChatML template inserts when the conversation has none (Ollama's SYSTEM)."""
    import re

    text = render_chat_template(template, [{"role": "user", "content": "-"}])
    found = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.S)
    return found.group(1) if found else None


def gptq_files(folder: Path, manifest, chat) -> dict[str, str]:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    vllm = ["vllm", "serve", str(folder), "--quantization", "gptq", "--served-model-name", _model_name(manifest),
            "--max-model-len", str(chat["context"])]  # fmt: skip
    xinference = {
        "version": 2,
        "context_length": chat["context"],
        "model_name": _model_name(manifest),
        "model_lang": ["en"],
        "model_ability": ["generate", "chat"] if chat["template"] else ["generate"],
        "model_description": f"{manifest.model} GPTQ int{config['bits']} (group {config['group_size']}) by weightsmith",
        "model_family": "other",
        "model_specs": [{"model_format": "gptq", "model_size_in_billions": _billions(manifest),
                         "quantization": f"Int{config['bits']}", "model_uri": folder.resolve().as_uri()}],
        "chat_template": chat["template"],
        "stop_token_ids": chat["stop_ids"],
        "stop": chat["stop"],
    }  # fmt: skip
    snippet = f'''"""Load {manifest.model} GPTQ int{config["bits"]} with transformers (needs gptqmodel and optimum)."""
from transformers import AutoModelForCausalLM, AutoTokenizer

path = {str(folder.resolve())!r}
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, device_map="auto")
messages = [{{"role": "user", "content": "What is the capital of France?"}}]
ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt").to(model.device)
print(tokenizer.decode(model.generate(ids, max_new_tokens=32)[0, ids.shape[1]:], skip_special_tokens=True))
'''
    return {"vllm-serve.sh": _script(vllm), "xinference.json": json.dumps(xinference, indent=2) + "\n",
            "transformers_example.py": snippet}  # fmt: skip


def mlx_files(folder: Path, manifest, chat) -> dict[str, str]:
    server = ["mlx_lm.server", "--model", str(folder.resolve()), "--host", "127.0.0.1", "--port", "8080"]
    note = (
        f"# LM Studio\n\nCopy or link this folder to `~/.lmstudio/models/weightsmith/{_model_name(manifest)}/` "
        "(LM Studio's `publisher/model` layout); it holds config.json with its quantization block, the "
        "safetensors weights, the tokenizer and the chat template, which is all LM Studio's MLX engine reads.\n"
    )
    return {"mlx-server.sh": _script(server), "LMSTUDIO.md": note}  # fmt: skip


def onnx_files(folder: Path, manifest, chat) -> dict[str, str]:
    if (folder / "genai_config.json").is_file():
        body = f"""import onnxruntime_genai as og

model = og.Model({str(folder.resolve())!r})
tokenizer = og.Tokenizer(model)
params = og.GeneratorParams(model)
params.set_search_options(max_length=256)
generator = og.Generator(model, params)
generator.append_tokens(tokenizer.encode("What is the capital of France?"))
while not generator.is_done():
    generator.generate_next_token()
print(tokenizer.decode(generator.get_sequence(0)))
"""
    else:
        body = f"""import onnxruntime as ort

session = ort.InferenceSession({str((folder / "model.onnx").resolve())!r}, providers=["CPUExecutionProvider"])
print([i.name for i in session.get_inputs()])  # input_ids, attention_mask, position_ids, past_key_values.*
"""
    return {"onnxruntime_example.py": f'"""Run {manifest.model} {manifest.quant} (ONNX) with onnxruntime."""\n' + body}


def tensorrt_files(folder: Path, manifest, chat) -> dict[str, str]:
    serve = ["trtllm-serve", str((folder / "engine").resolve()), "--tokenizer", str(folder.resolve()), "--host",
             "127.0.0.1", "--port", "8000"]  # fmt: skip
    build = [
        "trtllm-build",
        "--checkpoint_dir",
        str(folder.resolve()),
        "--output_dir",
        str((folder / "engine").resolve()),
    ]
    return {"trtllm-serve.sh": "# build the engine on the CUDA worker first (weightsmith does this when it can):\n"
            + "# " + shlex.join(build) + "\n" + _script(serve)}  # fmt: skip


HANDOFF = {"gguf": gguf_files, "gptq": gptq_files, "mlx": mlx_files, "onnx": onnx_files, "tensorrt": tensorrt_files}
LIBRARY = {"gguf": "gguf", "gptq": "transformers", "mlx": "mlx", "onnx": "onnx", "tensorrt": "tensorrt-llm"}


def _script(argv: list[str]) -> str:
    return '#!/bin/sh\ncd "$(dirname "$0")"  # paths below are relative to this folder\n' + shlex.join(argv) + "\n"


def _billions(manifest) -> float:
    return round(manifest.source.get("n_params", 0) / 1e9, 3)


def model_card(manifest, handoff: dict[str, str]) -> str:
    quality = manifest.quality or {}
    front = {
        "base_model": manifest.source.get("spec"),
        "library_name": LIBRARY[manifest.format],
        "tags": ["weightsmith", manifest.format, manifest.quant],
        "quantized_by": f"weightsmith {__version__}",
    }
    row = ["target", "status", "size (MB)", "ppl", "ppl ratio", "top-1", "KL mean", "validated on"]
    values = [manifest.target, manifest.status, f"{manifest.size / 1e6:.1f}", _fmt(quality.get("ppl"), 3),
              _fmt(quality.get("ppl_ratio"), 4), _fmt(quality.get("top1_agreement"), 4),
              _fmt(quality.get("kl_mean"), 5), (manifest.validated_on or {}).get("runtime", "-")]  # fmt: skip
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {manifest.model} — {manifest.format} {manifest.quant}",
        "",
        f"Converted from `{manifest.source.get('spec')}` by weightsmith and validated in its own runtime against "
        "the source model (held-out perplexity, top-1 agreement and KL divergence of next-token predictions).",
        "",
        "| " + " | ".join(row) + " |",
        "|" + "---|" * len(row),
        "| " + " | ".join(values) + " |",
        "",
    ]
    if manifest.reason:
        lines += [f"Status note: {manifest.reason}", ""]
    lines += ["## How to load it", ""] + [f"- `{name}`" for name in sorted(handoff)]
    lines += ["", "Checksums of every file are in `manifest.json`.", ""]
    return "\n".join(lines)


def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
