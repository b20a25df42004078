"""Importance matrix for llama.cpp's low-bit quantizers, computed with transformers on the recipe's calibration text.

The statistic is the one llama.cpp's `llama-imatrix` collects: for each weight matrix of the decoder layers, the sum
over calibration tokens of every input column's squared activation, and the number of tokens; the quantizer weighs
its rounding error per column by the mean (sum / count). The output projection is left out, as llama-imatrix does by
default.

We collect it in torch with forward pre-hooks on the checkpoint's linear layers instead of running llama-imatrix,
which would mean building llama.cpp's tools from source on every install; the activations are those of the source
model in float32 rather than of an F16 GGUF. The file is written in llama.cpp's GGUF imatrix format
(`<tensor>.in_sum2`, `<tensor>.counts`, `imatrix.datasets`, `imatrix.chunk_count`, `imatrix.chunk_size`), so
`llama-quantize --imatrix imatrix.gguf` reads the copy shipped beside the artifact.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

log = logging.getLogger("weightsmith")


@dataclass
class ImportanceMatrix:
    sums: dict[str, np.ndarray]  # llama.cpp tensor name -> float32 [input columns]: sum of squared activations
    counts: dict[str, int]  # tokens seen by that tensor
    chunk_size: int
    chunks: int
    dataset: str
    digest: str  # sha256 of the calibration token ids

    def means(self) -> dict[str, np.ndarray]:
        return {n: np.ascontiguousarray(s / self.counts[n], dtype=np.float32) for n, s in self.sums.items()}

    def describe(self) -> dict:
        return {"tensors": len(self.sums), "chunks": self.chunks, "chunk_size": self.chunk_size,
                "dataset": self.dataset, "calibration_sha256": self.digest}  # fmt: skip


def compute(source, calibration, name_of: Callable[[str], str | None]) -> ImportanceMatrix:
    """The statistics of every linear whose weight `name_of` names (the quantized file's tensor name; None: skip)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.corpus import calibration_samples, load_text, samples_digest
    from pipeline.source import load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(source.path, source.trust_remote_code)
    samples = calibration_samples(tokenizer, load_text(calibration.text, "calibration"), calibration.samples,
                                  calibration.seq_len, calibration.seed)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(
        source.path, dtype=torch.float32, use_safetensors=True, trust_remote_code=source.trust_remote_code
    ).to(device)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def collect(name: str):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    handles = []
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            name = name_of(f"{module_name}.weight")
            if name is not None and name != "output.weight":
                handles.append(module.register_forward_pre_hook(collect(name)))
    log.info("importance matrix: %d samples of %d tokens from %s", len(samples), calibration.seq_len, calibration.text)
    start = last = time.monotonic()
    with torch.inference_mode():
        for i, sample in enumerate(samples):
            model(torch.tensor([sample], device=device))
            if time.monotonic() - last > 10:
                last = time.monotonic()
                eta = (last - start) / (i + 1) * (len(samples) - i - 1)
                log.info("importance matrix: %d/%d samples, about %.0f s left", i + 1, len(samples), eta)
    for handle in handles:
        handle.remove()
    return ImportanceMatrix(
        sums={n: s.float().cpu().numpy() for n, s in sums.items()},
        counts=counts,
        chunk_size=calibration.seq_len,
        chunks=len(samples),
        dataset=calibration.text,
        digest=samples_digest(samples),
    )


def write(path: Path, imatrix: ImportanceMatrix) -> None:
    writer = gguf.GGUFWriter(path, "imatrix")
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", [imatrix.dataset])
    writer.add_uint32("imatrix.chunk_count", imatrix.chunks)
    writer.add_uint32("imatrix.chunk_size", imatrix.chunk_size)
    for name, values in imatrix.sums.items():
        writer.add_tensor(f"{name}.in_sum2", values.astype(np.float32))
        writer.add_tensor(f"{name}.counts", np.array([imatrix.counts[name]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read(path: Path) -> ImportanceMatrix:
    reader = gguf.GGUFReader(path)
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    names = [n.removesuffix(".in_sum2") for n in tensors if n.endswith(".in_sum2")]
    return ImportanceMatrix(
        sums={n: tensors[f"{n}.in_sum2"] for n in names},
        counts={n: int(tensors[f"{n}.counts"][0]) for n in names},
        chunk_size=int(reader.get_field("imatrix.chunk_size").contents()),
        chunks=int(reader.get_field("imatrix.chunk_count").contents()),
        dataset=reader.get_field("imatrix.datasets").contents()[0],
        digest="",
    )
