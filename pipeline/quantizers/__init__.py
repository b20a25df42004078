"""Quantizers, apart from the formats that store their results: GPTQ (our solver, and GPTQModel as the reference),
the calibration layer stream they share, and llama.cpp's importance matrix statistics."""
