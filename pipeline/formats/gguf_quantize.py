"""llama.cpp's own quantizer, called in-process through llama-cpp-python's binding of `llama_model_quantize`.

This is the function the `llama-quantize` tool wraps, so the output is what `llama-quantize` makes from the same
input, K-quant mixes and fallbacks included. An importance matrix is passed as the binding's
`llama_model_imatrix_data` array (tensor name, per-column mean squared activation), which is what
`llama-quantize --imatrix` hands the same function after reading the file.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from collections import Counter
from pathlib import Path

import gguf
import numpy as np

from pipeline.types import FormatError

log = logging.getLogger("weightsmith")


def quantize(source: Path, out_prefix: Path, file_type: gguf.LlamaFileType, imatrix=None, keep_split: bool = False,
             threads: int | None = None) -> dict[str, int]:  # fmt: skip
    """Quantize the GGUF `source` (first shard, when split) to `out_prefix`.gguf, or to llama.cpp's
    `out_prefix-0000N-of-0000M.gguf` shards with `keep_split`; return the count of each tensor type written."""
    import llama_cpp

    from pipeline.hardware import torch_threads

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type)
    params.nthread = threads or torch_threads()
    params.keep_split = keep_split
    means = imatrix.means() if imatrix is not None else {}  # kept alive for the call: the entries point into it
    entries = _imatrix_entries(means)
    if entries is not None:
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    out = out_prefix if keep_split else out_prefix.with_name(out_prefix.name + ".gguf")
    with _captured_llama_log() as lines:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    fallbacks = sum("falling back" in line for line in lines)
    if fallbacks:
        log.info("llama.cpp fell back to another type for %d tensor(s) whose rows do not fit the requested block",
                 fallbacks)  # fmt: skip
    if status != 0:
        detail = " ".join(line.strip() for line in lines[-5:])
        raise FormatError(f"llama.cpp's quantizer failed for {file_type.name} (status {status}): {detail}")
    written = sorted(out_prefix.parent.glob(out_prefix.name + "*.gguf"))
    return dict(Counter(t.tensor_type.name for f in written for t in gguf.GGUFReader(f).tensors))


def _imatrix_entries(means: dict[str, np.ndarray]):
    """A NULL-terminated ctypes array of llama_model_imatrix_data pointing into `means`."""
    import llama_cpp

    if not means:
        return None
    entries = (llama_cpp.llama_model_imatrix_data * (len(means) + 1))()
    for entry, (name, values) in zip(entries, means.items()):
        entry.name = name.encode()
        entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entry.size = values.size
    return entries


@contextlib.contextmanager
def _captured_llama_log():
    """Collect llama.cpp's log lines (hundreds of per-tensor lines for a quantization) instead of printing them;
    they go to the debug log, and llama-cpp-python's own log callback is put back afterwards."""
    import llama_cpp
    from llama_cpp import _logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        log.debug("llama.cpp: %s", "".join(lines))
