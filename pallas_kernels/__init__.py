"""Pallas GPU kernels (Triton backend) for jaxqlora; one op per module.

This package must not import ``jaxqlora``: it only depends on jax and numpy.

* `nf4_matmul`: ``y = x @ W.T`` with ``W`` an NF4 (bitsandbytes 4-bit NormalFloat)
  weight, dequantized on the fly, with a custom VJP whose ``dx`` is a transposed
  NF4 kernel (see `pallas_kernels.nf4_matmul`).
* `rms_norm`, `add_rms_norm`: RMSNorm and the residual add fused with it, forward and a
  fused backward (``dx`` and float32 ``dweight`` partials) (`pallas_kernels.rms_norm`).
* `swiglu`: ``silu(gate) * up`` with a fused backward that recomputes the sigmoid
  (`pallas_kernels.swiglu`).
* `gguf_mgpu`: GGUF GEMVs (Q4_K, Q6_K, Q4_0, Q4_1, Q8_0; mixed Q4_K/Q6_K stacks) on
  Hopper through Mosaic GPU, over a kernel layout derived at load time
  (`pallas_kernels.gguf_mgpu`).
* `nf4_mgpu_gemm`: large-M NF4 GEMM on Hopper, W decoded in SMEM (`pallas_kernels.nf4_mgpu_gemm`).
* `decode_attention`: split-KV flash decoding of one query token over a KV cache, GQA,
  per-sequence valid ranges (`pallas_kernels.decode_attention`).
* `gguf_cpu`: the one CPU kernel, not Pallas: a C++ GEMV over GGUF Q4_0 / Q4_1 / Q8_0 blocks
  through XLA's FFI, built on first use (`pallas_kernels.gguf_cpu`, ``gguf_cpu.cc``).

Every op takes ``impl`` ('auto', 'pallas', 'xla') and ``interpret``; `pallas_kernels.dispatch`
resolves them (Pallas on GPU, the plain-jnp reference elsewhere, ``$JAXQLORA_KERNELS``
overrides 'auto').

Import functions from their modules (``from pallas_kernels.nf4_matmul import nf4_matmul``):
the package re-exports nothing, so a module and its function never shadow each other.
"""
