"""Pallas GPU kernels (Triton backend) for jaxqlora; one op per module.

This package must not import ``jaxqlora``: it only depends on jax and numpy.

* `nf4_matmul`: ``y = x @ W.T`` with ``W`` an NF4 (bitsandbytes 4-bit NormalFloat)
  weight, dequantized on the fly, with a custom VJP whose ``dx`` is a transposed
  NF4 kernel (see `pallas_kernels.nf4_matmul`).

Import functions from their modules (``from pallas_kernels.nf4_matmul import nf4_matmul``):
the package re-exports nothing, so a module and its function never shadow each other.
"""
