"""The runtimes artifacts are validated in (llama.cpp, MLX, onnxruntime, transformers, TensorRT-LLM, TensorRT), each
behind `pipeline.runtimes.base.Runtime`, the small interface `pipeline.validate` drives."""
