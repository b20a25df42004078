"""Text for calibration and held-out evaluation.

`builtin:corpus` is the shipped public-domain corpus (see data/README.md), cut once at a paragraph boundary into a
calibration part and a held-out part that never overlap. Any other value is a path to a UTF-8 text file, used whole.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pipeline.types import InputError

BUILTIN = "builtin:corpus"
CORPUS_FILE = Path(__file__).parent / "data" / "corpus.txt"
EVAL_FRACTION = 0.2


def split_corpus(text: str, eval_fraction: float = EVAL_FRACTION) -> tuple[str, str]:
    """(calibration, held_out): the held-out part is the last `eval_fraction` of the text, starting at a paragraph."""
    cut = text.find("\n\n", int(len(text) * (1 - eval_fraction)))
    if cut < 0:
        raise ValueError("text too short to split at a paragraph boundary")
    return text[:cut].rstrip("\n") + "\n", text[cut:].lstrip("\n")


def load_text(spec: str, part: Literal["calibration", "held_out"]) -> str:
    """The text a recipe names (InputError, saying what to do, when it cannot be read)."""
    if spec == BUILTIN:
        calibration, held_out = split_corpus(CORPUS_FILE.read_text(encoding="utf-8"))
        return calibration if part == "calibration" else held_out
    path = Path(spec).expanduser()
    key = "calibration.text" if part == "calibration" else "validation.held_out"
    if not path.is_file():
        raise InputError(f"{key} {spec!r}: no such file (use {BUILTIN!r} or a path to a UTF-8 text file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{key} {spec!r}: not UTF-8 text (byte {exc.start}): convert it to UTF-8") from None
    except OSError as exc:
        raise InputError(f"{key} {spec!r}: cannot be read ({exc.strerror}): check its permissions") from None
    if not text.strip():
        raise InputError(f"{key} {spec!r}: the file is empty")
    return text


def bos_prefix(tokenizer) -> list[int]:
    """[bos] when the tokenizer starts every text with BOS (so each independent context should too), else []."""
    first = tokenizer("a").input_ids
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and first and first[0] == bos else []


def calibration_samples(tokenizer, text: str, samples: int, seq_len: int, seed: int) -> list[list[int]]:
    """`samples` windows of `seq_len` tokens from the calibration text, chosen without overlap by a seeded random
    draw (so the same recipe always calibrates on the same tokens), each starting with BOS if the model expects it."""
    import numpy as np

    ids = tokenizer(text, add_special_tokens=False).input_ids
    bos = bos_prefix(tokenizer)
    step = seq_len - len(bos)
    windows = len(ids) // step
    if windows < samples:
        raise ValueError(
            f"calibration text has {len(ids)} tokens: {windows} samples of {seq_len}, but the recipe asks for "
            f"{samples}; lower calibration.samples or seq_len, or give a longer calibration.text"
        )
    picks = sorted(np.random.default_rng(seed).choice(windows, samples, replace=False).tolist())
    return [bos + ids[i * step : (i + 1) * step] for i in picks]


def samples_digest(samples: list[list[int]]) -> str:
    return hashlib.sha256(str(samples).encode()).hexdigest()
