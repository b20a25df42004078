"""llama.cpp's own quantizer, called in-process through llama-cpp-python's binding of `llama_model_quantize`.

This is the function the `llama-quantize` tool wraps, so the output is what `llama-quantize` makes from the same
input, K-quant mixes and fallbacks included. An importance matrix is passed as the binding's
`llama_model_imatrix_data` array (tensor name, per-column mean squared activation), which is what
`llama-quantize --imatrix` hands the same function after reading the file.
"""

from __future__ import annotations

import ctypes
import logging
from collections import Counter
from pathlib import Path

import gguf
import numpy as np

from pipeline.formats import FormatError


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
    llama_log = logging.getLogger("llama-cpp-python")  # gates llama.cpp's own log; its per-tensor lines are noise
    level = llama_log.level
    llama_log.setLevel(logging.ERROR)
    try:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    finally:
        llama_log.setLevel(level)
    if status != 0:
        raise FormatError(f"llama.cpp's quantizer failed for {file_type.name} (status {status}); see its log above")
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
