"""The reference computed one decoder layer at a time, for a source whose whole model would not fit in memory.

It computes what `pipeline.reference` computes with the whole model loaded (the same ChunkScores and greedy
continuations, in the same dtype), on GPTQ's layer walker (`pipeline.quantizers.layers.LayerStream`): the model is a
skeleton on the `meta` device, and each decoder layer in turn is read from the safetensors, run on everything that
needs it, and let go. Peak memory is one layer (twice: its parameters and the float32 copy read from disk), the
embedding table as stored, the output projection, and the activations.

- Held-out chunks: every chunk goes through layer i before any goes through layer i+1; then the final norm and the
  output projection turn each chunk's outputs into log-probabilities a slice of `SLICE` positions at a time, so a
  chunk's full-vocabulary logits are never in memory at once.
- Prompts: greedy decoding in lockstep. The first walk over the layers also runs every prompt (keeping each layer's
  keys and values in a per-prompt cache); each further token is one more walk, running each unfinished prompt's last
  token against its cache. A walk reads every layer from disk, so `max_new_tokens` tokens cost that many reads of
  the checkpoint (the page cache serves them when it can hold the checkpoint). Each step's logits go through the
  logits processors `generate` would apply from the model's generation config (a repetition penalty, say), and a
  prompt stops at the generation config's end-of-sequence ids, as `generate` does.

Attention is PyTorch's SDPA, causal without a mask: what the whole model computes for unpadded sequences with full
attention. The walker knows nothing of embedding scales, logit soft-capping or sliding windows, so it runs the
architectures GPTQ walks (`walkable`), and refuses a sliding window shorter than a sequence it would run.
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline.archs import arch, supported
from pipeline.scores import (
    ARRAYS,
    TOKENIZER_PROBE_SUFFIX,
    ChunkScores,
    PromptCase,
    Reference,
    eval_chunks,
    render_prompt,
    score,
    stop_ids,
)
from pipeline.source import load_tokenizer
from pipeline.types import SourceInfo, Validation

SLICE = 128  # positions per output-projection product: 128 x a 150k vocabulary x 4 bytes = 77 MB of logits
log = logging.getLogger("weightsmith")


def walkable(source: SourceInfo) -> str | None:
    """Why the layer walker cannot run `source` (None when it can): it runs the rows marked `stream_reference`
    (Llama-style layers, whose inputs are the embeddings and whose attention needs no mask)."""
    if not arch(source.model_type).stream_reference:
        return f"the layer walker does not run {source.model_type} (it runs {', '.join(walked())})"
    return None


def walked() -> list[str]:
    return supported("stream_reference")


def compute(source: SourceInfo, validation: Validation, dtype: str, held_out: str) -> Reference:
    """The reference of `pipeline.reference._compute`, one decoder layer at a time."""
    import torch
    import transformers

    from pipeline.quantizers.layers import LayerStream

    tokenizer = load_tokenizer(source.path, source.trust_remote_code)
    chunks = eval_chunks(tokenizer, held_out, validation.eval_tokens, validation.context)
    rendered = [render_prompt(tokenizer, p) for p in validation.prompts]
    prompts = [tokenizer(r, add_special_tokens=tokenizer.chat_template is None).input_ids for r in rendered]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    row = arch(source.model_type)
    stream = LayerStream(source, chunks, compute_dtype=compute_dtype(source, dtype), experts=row.gptq_experts,
                         device=device)  # fmt: skip
    check_window(stream.config, max(len(chunks[0]), *(len(p) + validation.max_new_tokens for p in prompts)))
    generation = generation_config(source, stream.config)
    decoder = Greedy(stream, stream.embeddings(), prompts, generation, validation.max_new_tokens)
    with torch.inference_mode():
        scores = first_walk(stream, decoder, chunks)
        while decoder.active:
            walk(stream, decoder)
    probe_text = held_out[:2000] + TOKENIZER_PROBE_SUFFIX
    cases = zip(validation.prompts, rendered, prompts, decoder.out)
    description = {"runtime": f"transformers {transformers.__version__}, one decoder layer at a time",
                   "device": device, "dtype": str(stream.dtype).removeprefix("torch.")}  # fmt: skip
    return Reference(chunks=chunks, scores=scores, prompts=[PromptCase(*case) for case in cases],
                     probe_text=probe_text, probe_ids=tokenizer(probe_text).input_ids,
                     stop_ids=stop_ids(generation, tokenizer), tokenizer=tokenizer,
                     description=description)  # fmt: skip


def first_walk(stream, decoder: Greedy, chunks: list[list[int]]) -> list:
    """One walk over the layers running the chunks and the whole prompts; the chunks' scores, and the prompts'
    first new tokens picked."""
    for index in range(stream.n_layers):
        layer = stream.load(index)[0]  # its float32 state dict let go at once
        decoder.through(layer)
        stream.advance(layer)
    decoder.norm, decoder.weight = stream.head()
    outputs = [hidden for batch in stream.hidden for hidden in batch]
    stream.hidden = []
    scores = [chunk_scores(decoder.norm, decoder.weight, hidden, chunk) for hidden, chunk in zip(outputs, chunks)]
    decoder.next_tokens()
    return scores


def walk(stream, decoder: Greedy) -> None:
    """One more walk over the layers for the unfinished prompts' last tokens, and their next tokens picked."""
    log.info("reference: streamed generation, token %d of at most %d", max(map(len, decoder.out)) + 1,
             decoder.max_new_tokens)  # fmt: skip
    for index in range(stream.n_layers):
        layer = stream.load(index)[0]  # its float32 state dict let go at once
        decoder.through(layer)
        layer.to(device="meta")
    decoder.next_tokens()


def compute_dtype(source: SourceInfo, dtype: str):
    """The torch dtype the reference runs in: `dtype`, or for "auto" the config's (as from_pretrained reads it),
    else the checkpoint's."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    config = source.config()
    found = config.get("dtype") or config.get("torch_dtype") or source.dtype
    return getattr(torch, found)


def check_window(config, longest: int) -> None:
    """ValueError when the model attends over a sliding window shorter than a sequence the walker would run (it
    applies full causal attention)."""
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and longest > window:
        raise ValueError(f"the model attends over a sliding window of {window} tokens and the reference runs "
                         f"{longest}: the layer walker applies full attention; use validation.reference: whole, "
                         f"or shorter contexts")  # fmt: skip


def generation_config(source: SourceInfo, config):
    """The generation config `from_pretrained` would give the model: generation_config.json, else the config's."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(source.path)
    except OSError:
        return GenerationConfig.from_model_config(config)


def chunk_scores(norm, weight, hidden, chunk: list[int]):
    """ChunkScores of one chunk from its last layer's outputs [n, hidden], `SLICE` positions at a time."""
    import torch

    parts = []
    for start in range(0, len(chunk) - 1, SLICE):
        end = min(start + SLICE, len(chunk) - 1)
        logits = torch.nn.functional.linear(norm(hidden[None, start:end]), weight)[0].float()
        parts.append(score(torch.log_softmax(logits, -1).cpu().numpy(), chunk[start : end + 1]))
    return ChunkScores(*(np.concatenate([getattr(p, name) for p in parts]) for name in ARRAYS))


class Greedy:
    """The prompts' greedy continuations, decoded in lockstep: each walk over the layers runs every unfinished
    prompt's pending tokens (all of the prompt first, then its last new token) against its own key/value cache."""

    def __init__(self, stream, table, prompts: list[list[int]], generation, max_new_tokens: int):
        import torch
        from transformers import DynamicCache

        self.stream, self.table, self.max_new_tokens = stream, table, max_new_tokens
        self.prompts = prompts
        self.caches = [DynamicCache() for _ in prompts]
        self.hidden = [stream.embed(table, [ids]) for ids in prompts]
        self.at = [stream.positions(0, len(ids)) for ids in prompts]
        self.out: list[list[int]] = [[] for _ in prompts]
        self.active = list(range(len(prompts)))
        eos = generation.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.processors = [logits_processors(stream.model, generation, ids, max_new_tokens, stream.device)
                           for ids in prompts]  # fmt: skip
        self.torch = torch
        self.norm, self.weight = None, None

    def through(self, layer) -> None:
        """Run the unfinished prompts' pending tokens through a decoder layer."""
        for p in self.active:
            self.hidden[p] = self.stream.forward(layer, self.hidden[p], self.at[p], self.caches[p])

    def next_tokens(self) -> None:
        """Pick each unfinished prompt's next token from the last layer's outputs (through the final norm and the
        output projection, `norm` and `weight`, set after the first walk); retire finished prompts."""
        torch = self.torch
        for p in list(self.active):
            logits = torch.nn.functional.linear(self.norm(self.hidden[p][:, -1:]), self.weight)[:, -1].float()
            so_far = torch.tensor([self.prompts[p] + self.out[p]], device=logits.device)
            token = int(self.processors[p](so_far, logits).argmax(-1)[0])
            self.out[p].append(token)
            if token in self.eos or len(self.out[p]) >= self.max_new_tokens:
                self.active.remove(p)
                self.hidden[p] = None
                continue
            self.hidden[p] = self.stream.embed(self.table, [[token]])
            self.at[p] = self.stream.positions(len(self.prompts[p]) + len(self.out[p]) - 1, 1)


def logits_processors(model, generation, ids: list[int], max_new_tokens: int, device):
    """The logits processors greedy `generate` applies to a continuation of `ids` with this generation config (a
    repetition penalty, a minimum length ...), prepared by transformers' own steps, as `generate` prepares them."""
    import torch

    generation = generation.__class__.from_dict({**generation.to_dict(), "do_sample": False,
                                                 "max_new_tokens": max_new_tokens})  # fmt: skip
    model._prepare_special_tokens(generation, True, device=device)
    generation.max_length = len(ids) + max_new_tokens
    prompt = torch.tensor([ids], device=device)
    return model._get_logits_processor(
        generation,
        input_ids_seq_length=len(ids),
        encoder_input_ids=prompt,
        device=device,
        model_kwargs={"attention_mask": torch.ones_like(prompt)},
    )
