"""What a reference is, whichever way it was computed: per held-out position the true next token's log-probability
and the `TOP_K` most likely tokens with theirs (`ChunkScores`, from full log-probabilities by `score`), the prompts'
greedy continuations (`PromptCase`), and how they are kept on disk (`Reference.save`, `load`: one memory-mapped
array per kind). `pipeline.reference` computes a reference with the whole model and caches it;
`pipeline.reference_stream` computes the same one layer by layer. See pipeline.reference for why the top 8192.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.corpus import bos_prefix
from pipeline.source import load_tokenizer

TOP_K = 8192  # measured on SmolLM2 Q4_0: KL over the top 8192 and a tail bucket is 0.2% under the exact figure
ARRAYS = ("target", "top_ids", "top_logprobs")
TOKENIZER_PROBE_SUFFIX = (
    "\n\n  0. Numbers 1234567 and 3.14159;  spaces\t\ttabs\n"
    "Émigré naïve café — “quotes” «guillemets» 日本語のテキスト Привет 🦙🚀 <b>html</b> x**2 + y_1 == z\n"
)


@dataclass
class PromptCase:
    prompt: str
    rendered: str
    ids: list[int]
    expected: list[int]


@dataclass
class ChunkScores:
    """The reference's predictions for positions 1..n-1 of one held-out chunk."""

    target: np.ndarray  # float32 [n-1]: log-probability of the true next token
    top_ids: np.ndarray  # int32 [n-1, k]: the k most likely next tokens, most likely first
    top_logprobs: np.ndarray  # float32 [n-1, k]: their log-probabilities


def score(logprobs: np.ndarray, chunk: list[int], k: int = TOP_K) -> ChunkScores:
    """ChunkScores from full log-probabilities [n-1, vocab] of the predictions for `chunk`'s positions 1..n-1."""
    k = min(k, logprobs.shape[-1])
    top = np.argpartition(-logprobs, k - 1, axis=-1)[:, :k]
    top_lp = np.take_along_axis(logprobs, top, -1)
    order = np.argsort(-top_lp, axis=-1, kind="stable")
    return ChunkScores(
        target=logprobs[np.arange(len(chunk) - 1), chunk[1:]].astype(np.float32),
        top_ids=np.take_along_axis(top, order, -1).astype(np.int32),
        top_logprobs=np.take_along_axis(top_lp, order, -1).astype(np.float32),
    )


@dataclass
class Reference:
    chunks: list[list[int]]
    scores: list[ChunkScores]
    prompts: list[PromptCase]
    probe_text: str
    probe_ids: list[int]
    stop_ids: set[int]
    source: Path | None = None  # the checkpoint the reference ran, for runtimes that derive from it (RTN floor)
    description: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None  # the source's Hugging Face tokenizer (loaded on first use)

    def __post_init__(self) -> None:
        if self.tokenizer is None and self.source is not None:
            self.tokenizer = load_tokenizer(self.source)

    @property
    def ppl(self) -> float:
        return math.exp(-float(np.mean(np.concatenate([s.target for s in self.scores]))))

    def save(self, folder: Path) -> None:
        meta = {"chunks": self.chunks, "prompts": [p.__dict__ for p in self.prompts], "probe_text": self.probe_text,
                "probe_ids": self.probe_ids, "stop_ids": sorted(self.stop_ids),
                "description": self.description}  # fmt: skip
        for name in ARRAYS:  # one file per kind, chunks stacked: read back memory-mapped
            np.save(folder / f"{name}.npy", np.stack([getattr(s, name) for s in self.scores]))
        (folder / "reference.json").write_text(json.dumps(meta), encoding="utf-8")


def load(folder: Path, source: Path) -> Reference:
    meta = json.loads((folder / "reference.json").read_text(encoding="utf-8"))
    arrays = [np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS]
    scores = [ChunkScores(*(a[i] for a in arrays)) for i in range(len(meta["chunks"]))]
    return Reference(
        chunks=meta["chunks"],
        scores=scores,
        prompts=[PromptCase(**p) for p in meta["prompts"]],
        probe_text=meta["probe_text"],
        probe_ids=meta["probe_ids"],
        stop_ids=set(meta["stop_ids"]),
        source=source,
        description=meta["description"],
    )


def eval_chunks(tokenizer, text: str, n_tokens: int, context: int) -> list[list[int]]:
    """Held-out token ids cut into independent contexts of `context` tokens (each starting with BOS when the
    tokenizer adds one), `n_tokens` in all, rounded down to whole contexts (at least one)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    bos = bos_prefix(tokenizer)
    step = context - len(bos)
    n_chunks = max(1, n_tokens // context)
    if len(ids) < n_chunks * step:
        raise ValueError(f"held-out text has {len(ids)} tokens; {n_chunks} chunks of {context} need {n_chunks * step}")
    return [bos + ids[i * step : (i + 1) * step] for i in range(n_chunks)]


def render_prompt(tokenizer, prompt: str) -> str:
    if tokenizer.chat_template is None:
        return prompt
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def stop_ids(generation_config, tokenizer) -> set[int]:
    """The model's end-of-sequence ids (its generation config's) and the tokenizer's."""
    eos = generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
