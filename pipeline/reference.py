"""The reference every artifact is measured against: the source checkpoint run in transformers on the held-out text
and the recipe's prompts, computed once and kept on disk.

What is kept, per held-out position: the log-probability the source gives the true next token (for perplexity),
and its `TOP_K` most likely tokens with their log-probabilities (for top-1 agreement and KL divergence). The rest of
the distribution is one number, the mass outside the top-k, so KL is computed over the top-k tokens plus one
"everything else" bucket: a lower bound on the full-vocabulary KL, exact when the top-k holds all the mass. Measured
on SmolLM2-135M's Q4_0 GGUF (49k vocabulary, two contexts of 512 tokens), the bucketed KL was 4.4% under the exact
one with the top 512 tokens, 1.3% with 2048, 0.2% with 8192 and 0.04% with 16384. The top 8192 keep the reference at
64 KB per position, whatever the vocabulary (the full distributions of 2048 tokens of a 150k vocabulary are 1.2 GB),
memory-mapped from disk when read.

The source runs whole (`from_pretrained`, every weight in memory at once, 4 bytes a parameter in float32) or streamed
(`pipeline.reference_stream`: one decoder layer at a time, the same numbers within float rounding). The recipe's
`validation.reference` chooses; `auto` streams when the whole model's pass would not fit in the memory available now
(`pipeline.resources.reference_memory`) and the layer walker runs the architecture.

The cache is keyed by the source's file hashes, the held-out text's contents, the validation settings, the dtype and
this module's version, under `<cache>/references/`; every target and every rerun reuses it. The key leaves out
`validation.reference`: both ways compute the same function in the same dtype and agree to float rounding (tests:
identical top-1 ids and continuations), so a reference computed either way serves both, and whether a run streams
(which can depend on the memory free at the time) does not make it recompute a reference it has.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from pipeline.corpus import load_text
from pipeline.files import cache_root, staging_dir, text_sha256
from pipeline.scores import (  # noqa: F401  (re-exported: what a reference is)
    ARRAYS,
    TOKENIZER_PROBE_SUFFIX,
    TOP_K,
    ChunkScores,
    PromptCase,
    Reference,
    eval_chunks,
    load,
    render_prompt,
    score,
    stop_ids,
)
from pipeline.source import load_tokenizer
from pipeline.types import InputError, SourceInfo, Validation

VERSION = 2  # bump when what is stored or how it is computed changes
log = logging.getLogger("weightsmith")
_computing = threading.Lock()  # targets validated side by side (pipeline.lanes) compute it once, not each


def reference(source: SourceInfo, validation: Validation, dtype: str = "float32") -> Reference:
    """The source model's outputs on the validation text and prompts, run in `dtype` ("auto": as stored); computed
    once per source, text and settings, then read from the cache."""
    held_out = load_text(validation.held_out, "held_out")
    folder = cache_folder(source, validation, dtype, held_out)
    with _computing:
        if not (folder / "reference.json").is_file():
            _compute_into(folder, source, validation, dtype, held_out)
    return load(folder, source.path)


def _compute_into(folder: Path, source: SourceInfo, validation: Validation, dtype: str, held_out: str) -> None:
    how = mode(source, validation, dtype)
    log.info("reference: running the source model in transformers (%s, %s) on %d held-out tokens", dtype, how,
             validation.eval_tokens)  # fmt: skip
    if how == "streamed":
        from pipeline import reference_stream

        computed = reference_stream.compute(source, validation, dtype, held_out)
    else:
        computed = _compute(source, validation, dtype, held_out)
    with staging_dir(folder) as tmp:
        computed.save(tmp)


def mode(source: SourceInfo, validation: Validation, dtype: str, memory_free: int | None = None, size=None) -> str:
    """How the reference runs: "whole" or "streamed", as `validation.reference` says; for "auto", streamed when the
    whole model's pass (`size`: the source's `ModelSize`, read from its headers when None) would not fit in
    `memory_free` (the memory available now when None) and the layer walker runs the source. InputError when the
    recipe asks to stream a source the walker cannot run."""
    from pipeline.reference_stream import walkable

    why_not = walkable(source)
    if validation.reference == "streamed" and why_not:
        raise InputError(f"validation.reference: streamed: {why_not}; set it to whole or auto")
    if validation.reference != "auto":
        return validation.reference
    if why_not:
        return "whole"
    import psutil

    from pipeline.checkpoint import Checkpoint
    from pipeline.resources import PROCESS, model_size, reference_memory

    size = size or model_size(Checkpoint(source.path), source.config())
    whole = reference_memory(size, validation, dtype) + PROCESS
    free = psutil.virtual_memory().available if memory_free is None else memory_free
    return "whole" if whole <= free else "streamed"


def cache_folder(source: SourceInfo, validation: Validation, dtype: str, held_out: str) -> Path:
    """Where the reference for this source, text and settings is cached (`reference.json` in it once computed)."""
    key = text_sha256(json.dumps({"source": source.fingerprint, "held_out": text_sha256(held_out), "dtype": dtype,
                                  "validation": validation.model_dump(mode="json", exclude={"budgets", "reference"}),
                                  "top_k": TOP_K, "version": VERSION}, sort_keys=True))  # fmt: skip
    return cache_root() / "references" / key[:24]


def _compute(source: SourceInfo, validation: Validation, dtype: str, held_out: str) -> Reference:
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
    chunks = eval_chunks(tokenizer, held_out, validation.eval_tokens, validation.context)
    stops = stop_ids(model.generation_config, tokenizer)
    scores = []
    with torch.inference_mode():
        for chunk in chunks:
            logits = model(torch.tensor([chunk], device=device)).logits[0, :-1].float()
            scores.append(score(torch.log_softmax(logits, -1).cpu().numpy(), chunk))
        prompts = [_greedy_case(model, tokenizer, p, validation.max_new_tokens, stops) for p in validation.prompts]
    probe_text = held_out[:2000] + TOKENIZER_PROBE_SUFFIX
    return Reference(
        chunks=chunks,
        scores=scores,
        prompts=prompts,
        probe_text=probe_text,
        probe_ids=tokenizer(probe_text).input_ids,
        stop_ids=stops,
        tokenizer=tokenizer,
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
