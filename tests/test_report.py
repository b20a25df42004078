"""The run report and the serving hand-off files, on a real run of three formats over a tiny model."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess

import pytest
import yaml

from pipeline.chat import render_chat_template
from pipeline.source import load_tokenizer
from tests import ollama_modelfile
from tests.conftest import write_recipe

TARGETS = [("gguf", "q8_0"), ("gptq", "int4"), ("mlx", "q8"), ("tensorrt", "fp16")]


@pytest.fixture(scope="module")
def run(tiny_llama, tmp_path_factory):
    from pipeline.convert import run_recipe
    from pipeline.recipe import load_recipe

    folder = tmp_path_factory.mktemp("report")
    path = write_recipe(folder, tiny_llama, TARGETS)
    data = yaml.safe_load(path.read_text())
    data["targets"][1]["options"] = {"group_size": 32}
    data["calibration"] = {"samples": 4, "seq_len": 64}
    path.write_text(yaml.safe_dump(data))
    recipe = load_recipe(path)
    return recipe, run_recipe(recipe), tiny_llama


def test_report_has_every_target_side_by_side(run):
    recipe, summary, _ = run
    root = recipe.output_dir()
    assert summary["report"] == str(root / "report.html")
    md = (root / "report.md").read_text()
    for target in ("gguf/q8_0", "gptq/int4", "mlx/q8", "tensorrt/fp16"):
        assert re.search(rf"^\| {re.escape(target)} \| (ok|not_run) \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", md, re.M), md
    gguf = next(r for r in summary["targets"] if r["target"] == "gguf/q8_0")
    assert 8.5 < gguf["bits_per_weight"] < 16  # Q8_0: 8.5 bits a weight, plus norms and the vocabulary (tiny model)
    assert gguf["kl_p99"] >= gguf["kl_mean"] and gguf["tokens_per_s"] > 0 and "llama.cpp" in gguf["validated_on"]
    assert (root / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_renders_in_headless_chromium(run, tmp_path):
    from PIL import Image

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine (.ci/run installs it)")
    recipe, _, _ = run
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1400,1200",
                    (recipe.output_dir() / "report.html").as_uri()], check=True, capture_output=True,
                   timeout=120)  # fmt: skip
    pixels = list(Image.open(shot).convert("RGB").getdata())
    header = sum(p == (31, 78, 121) for p in pixels)  # the table's header row
    gguf_point = sum(p == (31, 119, 180) for p in pixels)  # a chart marker (GGUF's colour)
    axis_text = sum(p == (0, 0, 0) for p in pixels)
    assert header > 2000, "the table header is not on screen"
    assert gguf_point > 30 and axis_text > 200, "the chart is not on screen"


def script_command(path):
    """The command a hand-off script runs (its first `exec` line), without `exec` and the passed-on "$@"."""
    line = next(line.strip() for line in path.read_text().splitlines() if line.strip().startswith("exec "))
    argv = shlex.split(line)[1:]
    assert argv[-1] == "$@"  # arguments given to the script reach the server
    return argv[:-1]


def test_gguf_handoff_files(run):
    recipe, _, source = run
    folder = recipe.output_dir() / "gguf-q8_0"
    commands = ollama_modelfile.parse((folder / "Modelfile").read_text())  # as `ollama create` reads it
    assert {c for c, _ in commands} == {"model", "template", "system", "stop", "num_ctx"}
    (gguf_from,) = [v for c, v in commands if c == "model"]
    assert (folder / gguf_from).is_file()
    stops = [v for c, v in commands if c == "stop"]
    tokenizer = load_tokenizer(source)
    assert tokenizer.eos_token in stops
    (template,) = [v for c, v in commands if c == "template"]
    assert "{{ range .Messages }}" in template.replace("{{- range", "{{ range") and "<|im_start|>" in template
    (system,) = [v for c, v in commands if c == "system"]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered.startswith(f"<|im_start|>system\n{system}<|im_end|>")  # the template's default system prompt
    localai = yaml.safe_load((folder / "localai.yaml").read_text())
    assert localai["backend"] == "llama-cpp" and (folder / localai["parameters"]["model"]).is_file()
    assert localai["template"] == {"use_tokenizer_template": True} and tokenizer.eos_token in localai["stopwords"]
    argv = script_command(folder / "llama-server.sh")  # the llama-server line; the fallback is tested in test_serve
    assert argv[:2] == ["llama-server", "-m"] and (folder / argv[2]).samefile(folder / gguf_from) and "--jinja" in argv


def test_gptq_handoff_files(run):
    recipe, _, source = run
    folder = recipe.output_dir() / "gptq-int4"
    argv = script_command(folder / "vllm-serve.sh")
    assert argv[:5] == ["${PYTHON:-python3}", "-m", "vllm.entrypoints.openai.api_server", "--model", "."]  # its folder
    assert argv[argv.index("--quantization") + 1] == "gptq"
    assert os.access(folder / "vllm-serve.sh", os.X_OK)
    xinference = json.loads((folder / "xinference.json").read_text())
    (spec,) = xinference["model_specs"]
    assert spec["model_format"] == "gptq" and spec["quantization"] == "Int4"
    assert spec["model_uri"] == folder.resolve().as_uri()
    # Xinference's registration takes an int or a string with "_" for the decimal point, never a float
    size = spec["model_size_in_billions"]
    assert isinstance(size, int) or re.fullmatch(r"\d+_\d+", size), size
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["serving"]["vllm"]["accepts"] and manifest["serving"]["vllm"]["why"] is None
    tokenizer = load_tokenizer(source)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Why is the sky blue?"},
    ]
    for conversation in (messages, messages[1:2]):
        ours = render_chat_template(xinference["chat_template"], conversation, bos_token=tokenizer.bos_token,
                                    eos_token=tokenizer.eos_token)  # fmt: skip
        assert ours == tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert tokenizer.convert_tokens_to_ids(tokenizer.eos_token) in xinference["stop_token_ids"]
    ast.parse((folder / "transformers_example.py").read_text())


def test_model_cards_and_other_handoffs(run):
    recipe, summary, _ = run
    root = recipe.output_dir()
    for row in summary["targets"]:
        folder = root / row["target"].replace("/", "-")
        manifest = json.loads((folder / "manifest.json").read_text())
        card = (folder / "README.md").read_text()
        front = yaml.safe_load(card.split("---")[1])
        assert front["base_model"] == manifest["source"]["spec"] and front["quantized_by"].startswith("weightsmith")
        assert manifest["format"] in front["tags"] and front["library_name"]
        assert f"| {row['target']} | {row['status']} |" in card
        assert set(manifest["handoff"]) <= {f["path"] for f in manifest["files"]}  # hashed like everything else
        for entry in manifest["files"]:  # readable by a server running as another user (safetensors writes 0600)
            mode = (folder / entry["path"]).stat().st_mode & 0o777
            assert mode == (0o755 if entry["path"].endswith(".sh") else 0o644), (entry["path"], oct(mode))
    assert script_command(root / "mlx-q8" / "mlx-server.sh")[0] == "mlx_lm.server"
    assert script_command(root / "tensorrt-fp16" / "trtllm-serve.sh")[0] == "trtllm-serve"


@pytest.mark.parametrize("text", ["<|im_end|>", "</s>", "a b", 'say "hi"', 'ends with "', "two\nlines",
                                  '"\nADAPTER /etc/passwd\nPARAMETER stop "', "x\nSYSTEM evil", "\n"])  # fmt: skip
def test_modelfile_values_cannot_add_a_directive(text):
    """Any stop string or system prompt a tokenizer or template may carry is read back by Ollama's parser as exactly
    that one value, or refused; never as another directive."""
    from pipeline.handoff import modelfile_value

    written = f"FROM ./m.gguf\nPARAMETER stop {modelfile_value(text)}\nSYSTEM {modelfile_value(text)}\n"
    assert ollama_modelfile.parse(written) == [("model", "./m.gguf"), ("stop", text), ("system", text)]


@pytest.mark.parametrize("text", ['a"""\nADAPTER x\n"""', "tab\there", ""])
def test_modelfile_values_ollama_cannot_read_back_are_refused(text):
    from pipeline.handoff import modelfile_value

    if text:
        with pytest.raises(ValueError, match="cannot be written in a Modelfile"):
            modelfile_value(text)
    else:
        assert ollama_modelfile.parse(f"FROM ./m.gguf\nPARAMETER stop {modelfile_value(text)}\n")[1] == ("stop", "")


@pytest.mark.parametrize(("n_params", "size"), [(135_000_000, "0_135"), (1_540_000_000, "1_5"), (7_000_000_000, 7),
                                                 (72_700_000_000, "72_7"), (999_900_000, 1)])  # fmt: skip
def test_xinference_size_is_what_its_registration_takes(n_params, size):
    from pipeline.handoff import xinference_size
    from pipeline.types import Manifest, Status

    manifest = Manifest(model="m", target="gptq/int4", format="gptq", quant="int4", status=Status.OK,
                        source={"n_params": n_params})  # fmt: skip
    assert xinference_size(manifest) == size
