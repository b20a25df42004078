"""Smoke tests and quality figures, shared by every format.

The reference is the source checkpoint run in transformers, in float32 on the CPU (or the GPU when there is one),
on the held-out text (`pipeline.reference`). Each format drives its own runtime (llama.cpp, onnxruntime, MLX ...)
through the small `pipeline.runtimes.base.Runtime` interface, and is compared with the reference on the *same token
ids*, so tokenizer differences cannot hide in the numbers:

- perplexity of both on the held-out chunks, their ratio, top-1 agreement of next-token predictions, and the KL
  divergence of the next-token distributions (mean and 99th percentile);
- greedy generation from the recipe's prompts (chat-templated when the model has a template): the text, how many
  leading tokens match the reference's greedy tokens, tokens per second;
- when the runtime carries a tokenizer of its own: the same ids as the Hugging Face tokenizer on a probe text;
  when it carries a chat template: the same prompt string as transformers' `apply_chat_template`.

A target passes when every check holds, every figure is a finite number, and the recipe's budget (if any) is met.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from pipeline.chat import render_chat_template
from pipeline.reference import Reference
from pipeline.runtimes.base import Runtime
from pipeline.types import Budget, Validation

QUALITY_FIGURES = ("ppl", "ppl_source", "ppl_ratio", "top1_agreement", "kl_mean", "kl_p99")


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))).astype(np.float32)


def compare(ref: Reference, runtime: Runtime, max_tokens: int | None = None) -> dict[str, Any]:
    """Perplexity (artifact and source), their ratio, top-1 agreement and KL(reference || artifact) on the
    reference's chunks; with `max_tokens`, on the first chunks holding at least that many tokens (for runtimes too
    slow for the whole held-out set, such as MLX's CPU backend). KL is taken over the reference's top-k tokens plus
    one bucket for the rest of the vocabulary (see pipeline.reference)."""
    n_chunks = len(ref.chunks) if max_tokens is None else max(1, math.ceil(max_tokens / len(ref.chunks[0])))
    nll, ref_nll, top1, kl = [], [], [], []
    for chunk, scores in zip(ref.chunks[:n_chunks], ref.scores[:n_chunks]):
        lp = _log_softmax(runtime.logits(chunk)[:-1])
        if lp.shape[0] != len(chunk) - 1:
            raise ValueError(f"runtime returned logits for {lp.shape[0] + 1} positions, the chunk has {len(chunk)}")
        nll.append(-lp[np.arange(len(chunk) - 1), chunk[1:]])
        ref_nll.append(-scores.target)
        top1.append(lp.argmax(-1) == scores.top_ids[:, 0])
        kl.append(bucketed_kl(scores.top_logprobs, np.take_along_axis(lp, scores.top_ids.astype(np.int64), -1)))
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


def bucketed_kl(ref_top: np.ndarray, art_top: np.ndarray) -> np.ndarray:
    """KL(p || q) per position over the reference's top-k tokens (log-probabilities `ref_top`, `art_top` [n, k]) and
    one bucket holding the rest of each distribution."""
    p, q = np.exp(ref_top.astype(np.float64)), np.exp(art_top.astype(np.float64))
    tail_p = np.clip(1.0 - p.sum(-1), 0.0, 1.0)
    tail_q = np.clip(1.0 - q.sum(-1), 1e-30, 1.0)
    head = (p * (ref_top.astype(np.float64) - art_top.astype(np.float64))).sum(-1)
    tail = np.where(tail_p > 0, tail_p * (np.log(np.maximum(tail_p, 1e-300)) - np.log(tail_q)), 0.0)
    return np.maximum(head + tail, 0.0)


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
    same = all(
        render_chat_template(carried["template"], [{"role": "user", "content": c.prompt}],
                             bos_token=carried["bos_token"], eos_token=carried["eos_token"]) == c.rendered
        for c in ref.prompts
    )  # fmt: skip
    return {"matches": same}


def judge(quality: dict[str, Any], budget: Budget | None, tokenizer: dict[str, Any] | None = None) -> list[str]:
    """What fails a target: a figure that is NaN or infinite, figures outside the budget, and a tokenizer that differs
    from the source's unless the budget accepts that (some runtimes reimplement tokenizers imperfectly: the difference
    stays on record). NaN compares false against every limit, so it is caught first, never judged by the budget."""
    failures = [
        f"{name} is {quality[name]} (not a finite number): the artifact computes garbage"
        for name in QUALITY_FIGURES
        if name in quality and not math.isfinite(quality[name])
    ]
    if tokenizer is not None and not tokenizer["matches"] and (budget is None or budget.exact_tokenizer):
        failures.append(f"tokenizer differs from the source's at token {tokenizer['first_mismatch']} "
                        f"(a budget with exact_tokenizer: false accepts it)")  # fmt: skip
    if budget is None or failures and not all(math.isfinite(quality[n]) for n in QUALITY_FIGURES if n in quality):
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
