"""What validation needs from the runtime an artifact runs in."""

from __future__ import annotations

from typing import Any

import numpy as np


class Runtime:
    """An artifact loaded in its own runtime. Subclasses implement `logits` and `greedy`; a runtime that carries its
    own tokenizer or chat template says so through `tokenize` and `chat_template`; `close` frees what it holds."""

    description: dict[str, Any]

    def logits(self, ids: list[int]) -> np.ndarray:
        """Next-token logits for every position of `ids`, evaluated in a fresh context: float32 [len(ids), vocab]."""
        raise NotImplementedError

    def greedy(self, ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
        """Greedy continuation of `ids` (without the prompt), stopping after a stop id or `max_new_tokens`."""
        raise NotImplementedError

    def tokenize(self, text: str) -> list[int] | None:
        """The artifact's own tokenization of `text`, special tokens added as the artifact says; None if it has none."""
        return None

    def chat_template(self) -> dict[str, str] | None:
        """{"template", "bos_token", "eos_token"} as the artifact carries them; None if it carries no template."""
        return None

    def close(self) -> None:
        """Free the runtime's memory (models, contexts) before the next target is validated."""
