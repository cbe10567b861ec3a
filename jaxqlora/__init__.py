"""jaxqlora: QLoRA fine-tuning and 4-bit inference of Llama/Qwen decoders in JAX."""
