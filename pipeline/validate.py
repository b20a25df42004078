"""Smoke tests and quality figures, shared by every format.

The reference is the source checkpoint run in transformers, in float32 on the CPU (or the GPU when there is one),
on the held-out text. Each format drives its own runtime (llama.cpp, onnxruntime, MLX ...) through the small
`Runtime` interface below, and is compared with the reference on the *same token ids*, so tokenizer differences
cannot hide in the numbers:

- perplexity of both on the held-out chunks, their ratio, top-1 agreement of next-token predictions, and the KL
  divergence of the next-token distributions (mean and 99th percentile);
- greedy generation from the recipe's prompts (chat-templated when the model has a template): the text, how many
  leading tokens match the reference's greedy tokens, tokens per second;
- when the runtime carries a tokenizer of its own: the same ids as the Hugging Face tokenizer on a probe text;
  when it carries a chat template: the same prompt string as transformers' `apply_chat_template`.

A target passes when every check holds and the recipe's budget (if any) is met.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.corpus import bos_prefix, load_text
from pipeline.recipe import Budget, Validation
from pipeline.source import SourceInfo, load_tokenizer

TOKENIZER_PROBE_SUFFIX = (
    "\n\n  0. Numbers 1234567 and 3.14159;  spaces\t\ttabs\n"
    "Émigré naïve café — “quotes” «guillemets» 日本語のテキスト Привет 🦙🚀 <b>html</b> x**2 + y_1 == z\n"
)


class Runtime(Protocol):
    """What a format's smoke test needs from the runtime it validates in."""

    description: dict[str, Any]

    def logits(self, ids: list[int]) -> np.ndarray:
        """Next-token logits for every position of `ids`, evaluated in a fresh context: float32 [len(ids), vocab]."""

    def greedy(self, ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
        """Greedy continuation of `ids` (without the prompt), stopping after a stop id or `max_new_tokens`."""

    def tokenize(self, text: str) -> list[int] | None:
        """The artifact's own tokenization of `text`, special tokens added as the artifact says; None if it has none."""

    def chat_template(self) -> dict[str, str] | None:
        """{"template", "bos_token", "eos_token"} as the artifact carries them; None if it carries no template."""


@dataclass
class PromptCase:
    prompt: str
    rendered: str
    ids: list[int]
    expected: list[int]


@dataclass
class Reference:
    tokenizer: Any
    chunks: list[list[int]]
    logprobs: list[np.ndarray]  # per chunk: log-softmax of the reference's predictions for positions 1..n-1
    prompts: list[PromptCase]
    probe_text: str
    probe_ids: list[int]
    stop_ids: set[int]
    source: Path | None = None  # the checkpoint the reference ran, for runtimes that derive from it (RTN floor)
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def ppl(self) -> float:
        return math.exp(float(np.mean(np.concatenate(_target_nll(self.logprobs, self.chunks)))))


_REFERENCES: dict[tuple, Reference] = {}


def reference(source: SourceInfo, validation: Validation, dtype: str = "float32") -> Reference:
    """The source model's outputs on the validation text and prompts, run in `dtype` ("auto": as stored);
    computed once per process, source and settings."""
    key = (source.fingerprint, validation.model_dump_json(exclude={"budgets"}), dtype)
    if key not in _REFERENCES:
        _REFERENCES[key] = _compute_reference(source, validation, dtype)
    return _REFERENCES[key]


def _compute_reference(source: SourceInfo, validation: Validation, dtype: str) -> Reference:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(source.path, source.trust_remote_code)
    model = (
        AutoModelForCausalLM.from_pretrained(
            source.path,
            dtype=dtype if dtype == "auto" else getattr(torch, dtype),
            use_safetensors=True,
            trust_remote_code=source.trust_remote_code,
        )
        .to(device)
        .eval()
    )
    held_out = load_text(validation.held_out, "held_out")
    chunks = eval_chunks(tokenizer, held_out, validation.eval_tokens, validation.context)
    stop_ids = _stop_ids(model, tokenizer)
    with torch.inference_mode():
        logprobs = [
            torch.log_softmax(model(torch.tensor([c], device=device)).logits[0, :-1].float(), -1).cpu().numpy()
            for c in chunks
        ]
        prompts = [_greedy_case(model, tokenizer, p, validation.max_new_tokens, stop_ids) for p in validation.prompts]
    probe_text = held_out[:2000] + TOKENIZER_PROBE_SUFFIX
    return Reference(
        tokenizer=tokenizer,
        chunks=chunks,
        logprobs=logprobs,
        prompts=prompts,
        probe_text=probe_text,
        probe_ids=tokenizer(probe_text).input_ids,
        stop_ids=stop_ids,
        source=source.path,
        description={
            "runtime": f"transformers {transformers.__version__}",
            "device": device,
            "dtype": str(model.dtype).removeprefix("torch."),
        },
    )


def _greedy_case(model, tokenizer, prompt: str, max_new_tokens: int, stop_ids: set[int]) -> PromptCase:
    import torch

    rendered = render_prompt(tokenizer, prompt)
    ids = tokenizer(rendered, add_special_tokens=tokenizer.chat_template is None).input_ids
    out = model.generate(
        torch.tensor([ids], device=model.device),
        attention_mask=torch.ones(1, len(ids), device=model.device, dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or next(iter(stop_ids), 0),
    )
    return PromptCase(prompt, rendered, ids, out[0, len(ids) :].tolist())


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


def _stop_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _target_nll(logprobs: list[np.ndarray], chunks: list[list[int]]) -> list[np.ndarray]:
    return [-lp[np.arange(len(c) - 1), c[1:]] for lp, c in zip(logprobs, chunks)]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))).astype(np.float32)


def compare(ref: Reference, runtime: Runtime, max_tokens: int | None = None) -> dict[str, Any]:
    """Perplexity (artifact and source), their ratio, top-1 agreement and KL(reference || artifact) on the
    reference's chunks; with `max_tokens`, on the first chunks holding at least that many tokens (for runtimes too
    slow for the whole held-out set, such as MLX's CPU backend)."""
    n_chunks = len(ref.chunks) if max_tokens is None else max(1, math.ceil(max_tokens / len(ref.chunks[0])))
    nll, ref_nll, top1, kl = [], [], [], []
    for chunk, ref_lp in zip(ref.chunks[:n_chunks], ref.logprobs[:n_chunks]):
        lp = _log_softmax(runtime.logits(chunk)[:-1])
        if lp.shape != ref_lp.shape:
            raise ValueError(f"runtime returned logits of shape {lp.shape}, reference has {ref_lp.shape}")
        positions, targets = np.arange(len(chunk) - 1), chunk[1:]
        nll.append(-lp[positions, targets])
        ref_nll.append(-ref_lp[positions, targets])
        top1.append(lp.argmax(-1) == ref_lp.argmax(-1))
        kl.append((np.exp(ref_lp) * (ref_lp - lp)).sum(-1))
    kl_all = np.concatenate(kl)
    ppl = math.exp(float(np.mean(np.concatenate(nll))))
    ppl_source = math.exp(float(np.mean(np.concatenate(ref_nll))))
    return {
        "n_tokens": int(sum(len(c) - 1 for c in ref.chunks[:n_chunks])),
        "context": len(ref.chunks[0]),
        "ppl": ppl,
        "ppl_source": ppl_source,
        "ppl_ratio": ppl / ppl_source,
        "top1_agreement": float(np.mean(np.concatenate(top1))),
        "kl_mean": float(kl_all.mean()),
        "kl_p99": float(np.percentile(kl_all, 99)),
    }


def generate(ref: Reference, runtime: Runtime, max_new_tokens: int) -> dict[str, Any]:
    cases, produced, seconds = [], 0, 0.0
    for case in ref.prompts:
        start = time.perf_counter()
        out = runtime.greedy(case.ids, max_new_tokens, ref.stop_ids)
        seconds += time.perf_counter() - start
        produced += len(out)
        cases.append(
            {
                "prompt": case.prompt,
                "text": ref.tokenizer.decode(out, skip_special_tokens=True),
                "reference_text": ref.tokenizer.decode(case.expected, skip_special_tokens=True),
                "tokens": len(out),
                "matching_prefix": common_prefix(out, case.expected),
            }
        )
    return {"cases": cases, "tokens_per_s": produced / seconds if seconds else None}


def check_tokenizer(ref: Reference, runtime: Runtime) -> dict[str, Any] | None:
    ids = runtime.tokenize(ref.probe_text)
    if ids is None:
        return None
    matches = ids == ref.probe_ids
    return {
        "matches": matches,
        "n_tokens": len(ref.probe_ids),
        "first_mismatch": None if matches else common_prefix(ids, ref.probe_ids),
    }


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading items two sequences share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_chat_template(ref: Reference, runtime: Runtime) -> dict[str, Any] | None:
    carried = runtime.chat_template()
    if carried is None or ref.tokenizer.chat_template is None:
        return None
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    template = env.from_string(carried["template"])
    same = all(
        template.render(
            messages=[{"role": "user", "content": c.prompt}],
            add_generation_prompt=True,
            bos_token=carried["bos_token"],
            eos_token=carried["eos_token"],
        )
        == c.rendered
        for c in ref.prompts
    )
    return {"matches": same}


def _raise(message: str):
    raise ValueError(message)


def judge(quality: dict[str, Any], budget: Budget | None, tokenizer: dict[str, Any] | None = None) -> list[str]:
    """What fails a target: figures outside the budget, and a tokenizer that differs from the source's unless the
    budget accepts that (some runtimes reimplement tokenizers imperfectly: the difference stays on record)."""
    failures = []
    if tokenizer is not None and not tokenizer["matches"] and (budget is None or budget.exact_tokenizer):
        failures.append(f"tokenizer differs from the source's at token {tokenizer['first_mismatch']} "
                        f"(a budget with exact_tokenizer: false accepts it)")  # fmt: skip
    if budget is None:
        return failures
    if budget.max_ppl_ratio is not None and quality["ppl_ratio"] > budget.max_ppl_ratio:
        failures.append(f"perplexity ratio {quality['ppl_ratio']:.4f} > budget {budget.max_ppl_ratio}")
    if budget.min_top1 is not None and quality["top1_agreement"] < budget.min_top1:
        failures.append(f"top-1 agreement {quality['top1_agreement']:.4f} < budget {budget.min_top1}")
    if budget.max_kl_mean is not None and quality["kl_mean"] > budget.max_kl_mean:
        failures.append(f"mean KL {quality['kl_mean']:.5f} > budget {budget.max_kl_mean}")
    return failures


def smoke_test(
    runtime: Runtime, ref: Reference, validation: Validation, max_eval_tokens: int | None = None
) -> dict[str, Any]:
    """Run every check; return {"smoke", "quality", "failures"}. The budget, and with it the tokenizer check, is
    judged by the caller (`judge`)."""
    smoke = {
        "runtime": runtime.description,
        "reference": ref.description,
        "tokenizer": check_tokenizer(ref, runtime),
        "chat_template": check_chat_template(ref, runtime),
        "generation": generate(ref, runtime, validation.max_new_tokens),
    }
    quality = compare(ref, runtime, max_eval_tokens)
    failures = []
    if smoke["chat_template"] is not None and not smoke["chat_template"]["matches"]:
        failures.append("chat template renders differently from the source's")
    if not any(c["tokens"] for c in smoke["generation"]["cases"]):
        failures.append("generated no tokens for any prompt")
    return {"smoke": smoke, "quality": quality, "failures": failures}
