"""Tokenizer -> GGUF metadata: vocabulary, scores, token types, merges, special tokens, chat template, and the name
of llama.cpp's pre-tokenizer.

Three vocabulary kinds, as llama.cpp knows them:
- `gpt2`: byte-level BPE from tokenizer.json (SmolLM2, Qwen2, Llama 3 ...);
- `llama`: SentencePiece from tokenizer.model (Llama 2, Mistral v0.1 ...);
- a family's own SentencePiece-style BPE (tokenizer.json with byte fallback and no tokenizer.model) where llama.cpp
  has a tokenizer for that family's architecture (`SPM_BPE`: Gemma 4's `gemma4`), written as llama.cpp's converter
  writes it for that family.

Merges, special-token ids and the chat template are read with gguf-py's own `SpecialVocab`. Whether BOS/EOS are
added is not copied from flags but measured on the Hugging Face tokenizer, so llama.cpp adds exactly what
transformers adds.

The pre-tokenizer name is chosen from behaviour, the way llama.cpp's converter does it: encode llama.cpp's fixed
probe text with the Hugging Face tokenizer and look up the sha256 of the ids. An unknown hash is an error that prints
the hash; the name is never guessed from the model's name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import gguf

from pipeline.types import FormatError

# llama.cpp's probe text (convert_hf_to_gguf.py, `chktxt`): it must be byte-identical for the hashes below to match.
PROBE_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256 of str(ids of PROBE_TEXT) -> llama.cpp pre-tokenizer name. The hashes are those llama.cpp's
# convert_hf_to_gguf_update.py computed for the reference tokenizers named on the right.
KNOWN_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Smaug-Llama-3-70B
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",  # Llama-4-Scout
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": "exaone",
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",
}


# llama.cpp architecture -> its tokenizer for the family's SentencePiece-style BPE (tokenizer.json, byte fallback)
SPM_BPE = {"gemma4": "gemma4"}
# Gemma 4's chat-syntax tokens that llama.cpp's converter marks user-defined, so that llama.cpp renders them for its
# chat parser (convert_hf_to_gguf's Gemma4Model.set_vocab)
VISIBLE_TOKENS = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
                  '<|"|>'}  # fmt: skip


@dataclass
class Vocab:
    model: str  # "gpt2" (byte-level BPE), "llama" (SentencePiece) or an `SPM_BPE` tokenizer
    pre: str | None  # None: the tokenizer implies it (llama.cpp's gemma4 sets its own)
    tokens: list[str | bytes]
    types: list[int]
    scores: list[float] | None
    add_bos: bool
    add_eos: bool


def load_vocab(path: Path, vocab_size: int, arch: str = "") -> Vocab:
    """Read the checkpoint's tokenizer into llama.cpp's terms for llama.cpp architecture `arch`; raise FormatError if
    llama.cpp could not use it."""
    from pipeline.source import load_tokenizer

    tokenizer = load_tokenizer(path)
    add_bos, add_eos = _added_specials(tokenizer)
    if (path / "tokenizer.model").is_file():
        tokens, scores, types = _sentencepiece_tokens(path, vocab_size)
        return Vocab("llama", "default", tokens, types, scores, add_bos, add_eos)
    if not (path / "tokenizer.json").is_file():
        raise FormatError(f"{path}: no tokenizer.json or tokenizer.model; GGUF needs the tokenizer")
    model = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    if model.get("type") == "BPE" and model.get("byte_fallback") and arch in SPM_BPE:
        tokens, scores, types = _spm_bpe_tokens(path, vocab_size)
        return Vocab(SPM_BPE[arch], None, tokens, types, scores, True, add_eos)  # llama.cpp adds BOS for it anyway
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise FormatError(
            f"{path}: tokenizer.json model {model.get('type')!r} without tokenizer.model is not supported "
            f"for GGUF (byte-level BPE or SentencePiece are)"
        )
    tokens, types = _bpe_tokens(tokenizer, vocab_size)
    return Vocab("gpt2", pre_tokenizer_name(tokenizer), tokens, types, None, add_bos, add_eos)


def pre_tokenizer_name(tokenizer) -> str:
    digest = hashlib.sha256(str(tokenizer.encode(PROBE_TEXT)).encode()).hexdigest()
    if digest not in KNOWN_PRE_TOKENIZERS:
        raise FormatError(
            f"unknown BPE pre-tokenizer (probe hash {digest}): llama.cpp would tokenize differently from the model. "
            f"Fix: find this hash in llama.cpp's convert_hf_to_gguf.py and add it to KNOWN_PRE_TOKENIZERS in {__name__}"
        )
    return KNOWN_PRE_TOKENIZERS[digest]


def add_to_writer(writer: gguf.GGUFWriter, vocab: Vocab, path: Path) -> None:
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    special = gguf.SpecialVocab(path, load_merges=vocab.model != "llama", n_vocab=len(vocab.tokens))
    special.add_special_token["bos"] = vocab.add_bos
    special.add_special_token["eos"] = vocab.add_eos
    special.add_to_gguf(writer, quiet=True)
    config = _read_json(path / "tokenizer_config.json")
    if vocab.model in SPM_BPE.values():  # spaces are pieces of the tokens (▁), none added in front
        writer.add_add_space_prefix(False)
    elif isinstance(config.get("add_prefix_space"), bool):
        writer.add_add_space_prefix(config["add_prefix_space"])


def _added_specials(tokenizer) -> tuple[bool, bool]:
    ids = tokenizer("a").input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bool(ids) and bos is not None and ids[0] == bos, bool(ids) and eos is not None and ids[-1] == eos


def _looks_special(token: str) -> bool:
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


def _bpe_tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise FormatError(f"tokenizer has id {max(by_id)} but the model's vocab_size is {vocab_size}")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            text = by_id[i]
            if not added[i].normalized:  # llama.cpp expects added tokens in their normalized form
                text = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
            special = added[i].special or _looks_special(text)
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _spm_bpe_tokens(path: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """A SentencePiece-style BPE tokenizer.json as llama.cpp's converter reads it (gguf-py's `LlamaHfVocab`: byte
    tokens as <0xXX>, specials as control tokens), the chat-syntax tokens user-defined; padded to the model's
    vocab_size with unused tokens."""
    hf = gguf.LlamaHfVocab(path)
    if hf.vocab_size > vocab_size:
        raise FormatError(f"tokenizer has {hf.vocab_size} tokens but the model's vocab_size is {vocab_size}")
    tokens, scores, types = [], [], []
    for text, score, kind in hf.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(gguf.TokenType.USER_DEFINED if text.decode() in VISIBLE_TOKENS else kind)
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    return tokens, scores, types


def _sentencepiece_tokens(path: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise FormatError(
            "SentencePiece tokenizer needs the sentencepiece package: pip install sentencepiece"
        ) from None
    sp = SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    tokens: list[bytes] = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i], scores[i] = sp.id_to_piece(i).encode("utf-8"), sp.get_score(i)
        types[i] = _piece_type(sp, i)
    added = _read_json(path / "tokenizer_config.json").get("added_tokens_decoder", {})
    for key, entry in added.items():
        i = int(key)
        if i < vocab_size and tokens[i] != entry["content"].encode("utf-8"):
            tokens[i] = entry["content"].replace("\u2581", " ").encode("utf-8")
            types[i] = gguf.TokenType.CONTROL if entry.get("special") else gguf.TokenType.USER_DEFINED
    return tokens, scores, types


def _piece_type(sp, i: int) -> int:
    if sp.is_unknown(i):
        return gguf.TokenType.UNKNOWN
    if sp.is_control(i):
        return gguf.TokenType.CONTROL
    if sp.is_unused(i):
        return gguf.TokenType.UNUSED
    if sp.is_byte(i):
        return gguf.TokenType.BYTE
    return gguf.TokenType.NORMAL


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
