"""The streamed reference (one decoder layer at a time) gives the whole model's numbers, and is chosen when the whole
model would not fit: held-out scores within float rounding with identical top-1 ids, identical greedy continuations,
on a dense and a mixture-of-experts checkpoint; an architecture the layer walker cannot run is refused or left whole.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import reference_stream
from pipeline.reference import _compute, mode
from pipeline.resources import GB, PROCESS, ModelSize, reference_memory
from pipeline.source import inspect_checkpoint
from pipeline.types import InputError, Validation

# two chunks of 200 tokens: each chunk's 199 predictions take two output-projection slices
VALIDATION = Validation(eval_tokens=400, context=200, max_new_tokens=8)


@pytest.mark.parametrize("name", ["llama", "qwen3_moe", "olmo2", "smollm3"])
def test_streamed_and_whole_references_agree(tiny_model, name):
    from pipeline.corpus import load_text

    source = inspect_checkpoint(tiny_model(name))
    held_out = load_text(VALIDATION.held_out, "held_out")
    whole = _compute(source, VALIDATION, "float32", held_out)
    streamed = reference_stream.compute(source, VALIDATION, "float32", held_out)
    assert streamed.chunks == whole.chunks and len(whole.chunks) == 2
    worst = 0.0
    for mine, theirs in zip(streamed.scores, whole.scores):
        assert mine.target.shape == theirs.target.shape == (199,)
        np.testing.assert_array_equal(mine.top_ids[:, 0], theirs.top_ids[:, 0])
        worst = max(worst, float(np.abs(mine.target - theirs.target).max()),
                    float(np.abs(mine.top_logprobs - theirs.top_logprobs).max()))  # fmt: skip
    assert worst < 1e-4, worst
    assert [p.expected for p in streamed.prompts] == [p.expected for p in whole.prompts]
    assert all(len(p.expected) > 1 for p in whole.prompts)  # a continuation worth comparing
    assert [p.ids for p in streamed.prompts] == [p.ids for p in whole.prompts]
    assert streamed.stop_ids == whole.stop_ids and streamed.probe_ids == whole.probe_ids
    assert streamed.description["dtype"] == "float32"


def test_the_generation_configs_processors_apply_as_in_generate(tiny_llama, tmp_path):
    """Suppressed tokens and a repetition penalty in generation_config.json change greedy decoding in `generate`;
    the streamed decoder applies them too."""
    import json
    import shutil

    from pipeline.corpus import load_text

    folder = shutil.copytree(tiny_llama, tmp_path / "penalised")
    validation = VALIDATION.model_copy(update={"eval_tokens": 200, "max_new_tokens": 12})
    held_out = load_text(validation.held_out, "held_out")
    plain = _compute(inspect_checkpoint(folder), validation, "float32", held_out)
    banned = sorted({p.expected[0] for p in plain.prompts})  # what greedy decoding picks first, suppressed
    settings = {"bos_token_id": 1, "eos_token_id": 2, "repetition_penalty": 3.0, "suppress_tokens": banned}
    (folder / "generation_config.json").write_text(json.dumps(settings))
    source = inspect_checkpoint(folder)
    whole = _compute(source, validation, "float32", held_out)
    streamed = reference_stream.compute(source, validation, "float32", held_out)
    assert [p.expected for p in whole.prompts] != [p.expected for p in plain.prompts]  # the settings bite
    assert [p.expected for p in streamed.prompts] == [p.expected for p in whole.prompts]


def test_auto_streams_only_when_the_whole_model_would_not_fit(tiny_llama):
    source = inspect_checkpoint(tiny_llama)
    assert mode(source, VALIDATION, "float32", memory_free=100 * GB) == "whole"
    assert mode(source, VALIDATION, "float32", memory_free=PROCESS) == "streamed"
    forced = VALIDATION.model_copy(update={"reference": "whole"})
    assert mode(source, forced, "float32", memory_free=PROCESS) == "whole"


def test_an_architecture_the_walker_cannot_run_is_refused_or_run_whole(tiny_model):
    source = inspect_checkpoint(tiny_model("gemma2"))  # embedding scale, soft-capping: not the walker's
    assert mode(source, VALIDATION, "float32", memory_free=PROCESS) == "whole"
    with pytest.raises(InputError, match="validation.reference: streamed: the layer walker does not run gemma2"):
        mode(source, VALIDATION.model_copy(update={"reference": "streamed"}), "float32")


def test_the_streamed_estimate_is_a_few_layers_not_the_model():
    # a 7B Llama in bfloat16: 32 layers of 0.4 GB, a 32k vocabulary
    size = ModelSize(n_params=6_740_000_000, stored=13_480_000_000, largest_shard=9_900_000_000,
                     largest_tensor=131_072_000, largest_layer=404_750_336, hidden=4096, vocab=32000)  # fmt: skip
    whole = reference_memory(size, Validation(), "float32")
    streamed = reference_memory(size, Validation(), "float32", streamed=True)
    assert whole > 26 * GB and 2 * 0.8 * GB < streamed < 4 * GB


def test_check_resources_counts_the_streamed_reference_when_the_whole_would_not_fit(tiny_llama, tmp_path, monkeypatch):
    """A 7B source (its sizes stand in for the tiny checkpoint's) on a 20 GB machine: the whole float32 reference
    (27 GB) is refused, the streamed one fits beside the GGUF steps (17 GB)."""
    from pipeline import convert as steps
    from pipeline.plan import make_plan
    from pipeline.recipe import load_recipe
    from pipeline.types import NotEnoughResources
    from tests.conftest import write_recipe

    size = ModelSize(n_params=6_740_000_000, stored=13_480_000_000, largest_shard=9_900_000_000,
                     largest_tensor=131_072_000, largest_layer=404_750_336, hidden=4096, vocab=32000)  # fmt: skip
    monkeypatch.setattr(steps, "model_size", lambda checkpoint, config: size)
    monkeypatch.setattr(steps, "machine_free", lambda output: (20 * GB, 100 * GB))
    monkeypatch.setattr(steps, "cache_folder", lambda *args: tmp_path)  # nothing cached
    source = inspect_checkpoint(tiny_llama)
    recipe = load_recipe(write_recipe(tmp_path, tiny_llama, [("gguf", "q4_k_m")]))
    steps.check_resources(recipe, make_plan(recipe), source)  # auto: streamed
    whole = recipe.model_copy(update={"validation": recipe.validation.model_copy(update={"reference": "whole"})})
    with pytest.raises(NotEnoughResources, match="the reference pass needs about 2[89]"):
        steps.check_resources(whole, make_plan(whole), source)
