"""Bad input, as a new user brings it: every case ends with its documented exit code and one line saying what is
wrong, where, and how to fix it; never a traceback; and nothing published is changed.

Each case runs `weightsmith convert` (without Prefect, which is covered by the flow tests) on a recipe writing into
the same output as a good run made first, and compares that output before and after.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, write_recipe

BAD_INPUT, BUSY, ENVIRONMENT, FAILED = 2, 3, 4, 1


@pytest.fixture(scope="module")
def published(tiny_llama, tmp_path_factory):
    """An output folder holding a published, validated gguf/f16 artifact of the tiny model."""
    folder = tmp_path_factory.mktemp("published")
    run = cli(write_recipe(folder, tiny_llama, [("gguf", "f16")]))
    assert run.returncode == 0, run.stderr
    return folder / "artifacts"


def cli(recipe: Path, *args: str, env: dict | None = None, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "convert", str(recipe), "--no-prefect", *args],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})},
                          preexec_fn=preexec, timeout=600)  # fmt: skip


def snapshot(output: Path) -> dict[str, bytes]:
    """Every file of the published output but the run's own summary and report and the lock."""
    skip = {"summary.json", "report.html", "report.md", "report.png", ".weightsmith.lock"}
    return {str(p.relative_to(output)): p.read_bytes() for p in sorted(output.rglob("*")) if p.is_file()
            and p.name not in skip}  # fmt: skip


def recipe_for(tmp_path: Path, published: Path, model: Path, changes: dict | None = None) -> Path:
    """A gguf/f16 recipe for `model` into the published output, with `changes` ("section__field": value)."""
    path = write_recipe(tmp_path, model, [("gguf", "f16")])
    data = yaml.safe_load(path.read_text())
    data["output"] = str(published)
    for key, value in (changes or {}).items():
        section, _, field = key.partition("__")
        if field:
            data.setdefault(section, {})[field] = value
        else:
            data[section] = value
    path.write_text(yaml.safe_dump(data))
    return path


def copy_model(tiny_llama: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    return folder


def header(folder: Path) -> tuple[dict, bytes]:
    raw = (folder / "model.safetensors").read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def write_header(folder: Path, head: dict, data: bytes) -> None:
    text = json.dumps(head).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + data)


def first_weight(head: dict) -> str:
    return next(n for n in head if n != "__metadata__" and head[n]["dtype"] == "F32" and len(head[n]["shape"]) == 2)


# Each case: (name, how to spoil a copy of the model or the recipe, expected exit code, pattern of the error line).
# A spoiler gets (model folder, tmp_path) and returns recipe changes (or None).


def truncate(m, t):
    path = m / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(m, t):
    (m / "model.safetensors").write_bytes(b"")


def huge_header(m, t):
    (m / "model.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")


def not_json_header(m, t):
    (m / "model.safetensors").write_bytes(struct.pack("<Q", 5) + b"{oops")


def list_header(m, t):
    write_header(m, [], b"")  # type: ignore[arg-type]


def unknown_dtype(m, t):
    head, data = header(m)
    head[first_weight(head)]["dtype"] = "F128"
    write_header(m, head, data)


def wrong_span(m, t):
    head, data = header(m)
    head[first_weight(head)]["shape"][0] += 1
    write_header(m, head, data)


def overlapping(m, t):
    head, data = header(m)
    names = [n for n in head if n != "__metadata__"]
    a, b = head[names[0]], head[names[1]]
    if b["data_offsets"][1] - b["data_offsets"][0] == a["data_offsets"][1] - a["data_offsets"][0]:
        b["data_offsets"] = list(a["data_offsets"])
    else:  # two spans of one size: make the second start inside the first
        size = a["data_offsets"][1] - a["data_offsets"][0]
        names = [n for n in names if head[n]["data_offsets"][1] - head[n]["data_offsets"][0] == size][:2]
        head[names[1]]["data_offsets"] = list(head[names[0]]["data_offsets"])
    write_header(m, head, data)


def past_end(m, t):
    head, data = header(m)
    entry = head[first_weight(head)]
    span = entry["data_offsets"][1] - entry["data_offsets"][0]
    entry["data_offsets"] = [len(data), len(data) + span]
    write_header(m, head, data)


def stale_index(m, t):
    (m / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "other.safetensors"}})
    )


def broken_index(m, t):
    (m / "model.safetensors.index.json").write_text("{not json")


def nan_weight(m, t, value=float("nan")):
    head, data = header(m)
    start = head[first_weight(head)]["data_offsets"][0]
    write_header(m, head, data[:start] + struct.pack("<f", value) + data[start + 4 :])


def no_config(m, t):
    (m / "config.json").unlink()


def broken_config(m, t):
    (m / "config.json").write_text("{'model_type': llama")


def pickle_only(m, t):
    (m / "model.safetensors").rename(m / "pytorch_model.bin")


def remote_code(m, t):
    config = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "x.Model"}}))


def template_link(m, t):
    secret = t / "secret.txt"
    secret.write_text("{{ 'a secret outside the model' }}")
    (m / "chat_template.jinja").unlink(missing_ok=True)
    (m / "chat_template.jinja").symlink_to(secret)


def no_tokenizer(m, t):
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        (m / name).unlink(missing_ok=True)


def text_file(t, name, content: bytes) -> str:
    (t / name).write_bytes(content)
    return str(t / name)


CASES = [
    ("truncated safetensors", truncate, BAD_INPUT, r"model\.safetensors: .*truncated.*re-download"),
    ("empty safetensors", empty, BAD_INPUT, r"model\.safetensors: 0 bytes, too short"),
    ("header length 2^40", huge_header, BAD_INPUT, r"header length 1099511627776 is beyond"),
    ("header not JSON", not_json_header, BAD_INPUT, r"the header is not valid JSON"),
    ("header not an object", list_header, BAD_INPUT, r"the header is not a JSON object"),
    ("unknown dtype", unknown_dtype, BAD_INPUT, r"dtype 'F128', which weightsmith does not read"),
    ("dtype x shape is not the span", wrong_span, BAD_INPUT, r"spans \d+ bytes, but F32 x \[\d+, \d+\] needs \d+"),
    ("overlapping tensors", overlapping, BAD_INPUT, r"share bytes: the header is damaged"),
    ("offsets past the end", past_end, BAD_INPUT, r"ends at byte \d+ of a \d+-byte data section"),
    ("index names another shard", stale_index, BAD_INPUT, r"model\.safetensors\.index\.json .*re-download"),
    ("index not JSON", broken_index, BAD_INPUT, r"index\.json: not valid JSON with a weight_map"),
    ("NaN in a weight", nan_weight, FAILED, r"holds NaN or infinite values"),
    ("Inf in a weight", lambda m, t: nan_weight(m, t, float("inf")), FAILED, r"holds NaN or infinite values"),
    ("no config.json", no_config, BAD_INPUT, r"no config\.json: not a Hugging Face checkpoint folder"),
    ("config.json not JSON", broken_config, BAD_INPUT, r"config\.json' is not valid JSON"),
    ("pickle-only weights", pickle_only, BAD_INPUT, r"only pickle weights \(pytorch_model\.bin\).*allow_pickle"),
    ("remote code", remote_code, BAD_INPUT, r"asks to run the model's own code.*trust_remote_code"),
    ("chat template linked outside", template_link, BAD_INPUT, r"chat_template\.jinja is a link to .*outside"),
    ("no tokenizer", no_tokenizer, BAD_INPUT, r"has no tokenizer \(tokenizer\.json or tokenizer\.model\)"),
    ("source missing", lambda m, t: {"source": str(t / "nowhere")}, BAD_INPUT, r"no such folder, and not a hub id"),
    ("hub id offline", lambda m, t: {"source": "nobody/no-such-model"}, BAD_INPUT,
     r"cannot download from the Hugging Face hub: offline"),
    ("unknown format", lambda m, t: {"targets": [{"format": "gguff", "quant": "f16"}]}, BAD_INPUT,
     r"targets\[0\]\.format: unknown format 'gguff'"),
    ("unknown quant", lambda m, t: {"targets": [{"format": "gguf", "quant": "q9"}]}, BAD_INPUT,
     r"gguf has no quant 'q9'"),
    ("unknown option", lambda m, t: {"targets": [{"format": "gguf", "quant": "q4_0", "options": {"imatrx": True}}]},
     BAD_INPUT, r"unknown option 'imatrx'"),
    ("option against the quant", lambda m, t: {"targets": [{"format": "gguf", "quant": "f16",
                                                            "options": {"imatrix": True}}]},
     BAD_INPUT, r"imatrix applies to llama\.cpp-quantized types"),
    ("target listed twice", lambda m, t: {"targets": [{"format": "gguf", "quant": "f16"}] * 2}, BAD_INPUT,
     r"target listed twice: gguf/f16"),
    ("made from a missing target", lambda m, t: {"targets": [{"format": "tensorrt", "quant": "w4a16_gptq"}]},
     BAD_INPUT, r"tensorrt/w4a16_gptq is made from gptq/int4, which is not a target"),
    ("budget for no target", lambda m, t: {"validation__budgets": {"gguf/q8_0": {"max_ppl_ratio": 1.1}}}, BAD_INPUT,
     r"budgets for gguf/q8_0, which is not a target"),
    ("unknown key", lambda m, t: {"targetz": []}, BAD_INPUT, r"unknown key 'targetz'"),
    ("negative samples", lambda m, t: {"calibration__samples": -1}, BAD_INPUT, r"calibration\.samples: "),
    ("held-out file missing", lambda m, t: {"validation__held_out": str(t / "none.txt")}, BAD_INPUT,
     r"validation\.held_out '.*none\.txt': no such file"),
    ("held-out not UTF-8", lambda m, t: {"validation__held_out": text_file(t, "latin1.txt", "café ".encode("latin-1")
                                                                           * 999)},
     BAD_INPUT, r"validation\.held_out '.*latin1\.txt': not UTF-8 text"),
    ("held-out empty", lambda m, t: {"validation__held_out": text_file(t, "empty.txt", b"  \n")}, BAD_INPUT,
     r"validation\.held_out '.*empty\.txt': the file is empty"),
    ("held-out too short", lambda m, t: {"validation__held_out": text_file(t, "short.txt", b"Too short.")}, BAD_INPUT,
     r"validation\.held_out '.*short\.txt': held-out text has \d+ tokens.*lower validation\.eval_tokens"),
    ("calibration too short for GPTQ", lambda m, t: {"targets": [{"format": "gptq", "quant": "int4",
                                                                  "options": {"group_size": 32}}],
                                                     "calibration__text": text_file(t, "cal.txt", b"Short. " * 20)},
     BAD_INPUT, r"calibration\.text '.*cal\.txt': calibration text has \d+ tokens"),
    ("output is a file", lambda m, t: {"output": text_file(t, "a-file", b"x")}, ENVIRONMENT,
     r"cannot write or read .*a-file.*check the path and its permissions"),
]  # fmt: skip


def test_at_least_thirty_cases():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name,spoil,code,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, spoil, code, pattern, tiny_llama, published, tmp_path):
    model = copy_model(tiny_llama, tmp_path)
    changes = spoil(model, tmp_path) or {}
    before = snapshot(published)
    run = cli(recipe_for(tmp_path, published, model, changes))
    assert "Traceback" not in run.stdout + run.stderr, run.stderr
    assert run.returncode == code, run.stdout + run.stderr
    if code == FAILED:  # the target failed; the table has its row, the summary the whole reason
        assert [line.split()[:2] for line in run.stdout.splitlines() if line.startswith("gguf/")] == [
            ["gguf/f16", "failed"]]  # fmt: skip
        (row,) = json.loads((published / "test-model" / "summary.json").read_text())["targets"]
        assert re.search(pattern, row["reason"]), row
    else:
        errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and re.search(pattern, errors[0]), run.stderr
    assert snapshot(published) == before  # nothing published changed


def test_a_second_run_into_a_busy_output_refuses_in_one_line(tiny_llama, published, tmp_path):
    from pipeline.lock import output_lock

    before = snapshot(published)
    with output_lock(published / "test-model", run_id="holder-run"):
        run = cli(recipe_for(tmp_path, published, tiny_llama))
    assert run.returncode == BUSY and "Traceback" not in run.stderr
    (error,) = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert re.search(rf"another run is writing here \(pid {os.getpid()} on .*, run holder-run, since ", error), error
    assert snapshot(published) == before


def test_a_full_disk_fails_the_target_in_one_line_and_keeps_what_was_published(tiny_llama, published, tmp_path):
    import resource
    import signal

    def small_files():  # every file this process writes stops at 1 MB, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    before = snapshot(published)
    run = cli(recipe_for(tmp_path, published, tiny_llama), "--force", preexec=small_files)
    assert run.returncode == FAILED and "Traceback" not in run.stdout + run.stderr, run.stderr
    (row,) = json.loads((published / "test-model" / "summary.json").read_text())["targets"]
    assert row["status"] == "failed" and "File too large" in row["reason"], row
    assert snapshot(published) == before
    assert not [p for p in (published / "test-model").iterdir() if p.name.startswith(".gguf-f16.")]  # no leftovers
