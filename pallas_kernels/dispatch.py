"""Choosing between a Pallas kernel and its plain-jnp reference, shared by the kernel modules.

Every op in `pallas_kernels` takes ``impl`` ('auto'/None, 'pallas' or 'xla') and
``interpret``; `resolve_impl` turns them into 'pallas' or 'xla' the same way for all of
them (the rule `pallas_kernels.nf4_matmul` introduced):

* 'pallas' / 'xla' force one path;
* 'auto' (or None) honours ``$JAXQLORA_KERNELS`` ('pallas' or 'xla') when it is set,
  otherwise picks 'pallas' when ``jax.default_backend() == 'gpu'`` or ``interpret=True``,
  and 'xla' (the reference) elsewhere.

The small helpers every kernel module shares live here too: `check_float_dtype` (the
bfloat16/float16/float32 operand check), `dot_f32` (an in-kernel or XLA dot with float32
accumulation), `zero` (the ``other=`` of masked loads) and `triton_compiler_params`.

`triton_compiler_params` hides the rename of the Triton compiler-params class between
jax 0.10 (``TritonCompilerParams``, with ``CompilerParams`` as an alias in later
releases) and jax 0.11 (``CompilerParams``).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

try:  # The Triton-specific Pallas API (``plgpu`` in jax's own GPU ops).
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - very old / unusual jax builds.
    plgpu = None

__all__ = ["KERNELS_ENV", "FLOAT_DTYPES", "resolve_impl", "require_pallas_backend",
           "check_float_dtype", "dot_f32", "triton_compiler_params", "plgpu", "zero",
           "zero_cotangent"]

#: Environment variable that overrides ``impl=None``/``'auto'``: 'pallas' or 'xla'.
KERNELS_ENV = "JAXQLORA_KERNELS"

#: The activation dtypes every op accepts.
FLOAT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def resolve_impl(impl: str | None = "auto", interpret: bool = False,
                 gpu_default: str = "pallas") -> str:
    """'pallas' or 'xla' from ``impl``, ``$JAXQLORA_KERNELS`` and the default backend.

    Args:
      impl: None or 'auto' (choose), 'pallas' or 'xla' (forced).
      interpret: the caller runs Pallas in interpret mode (then 'auto' means 'pallas').
      gpu_default: what 'auto' picks on a GPU: 'pallas', or 'xla' for an op whose kernel
        measured slower than XLA's fusion (`pallas_kernels.rms_norm.rms_norm`).

    Raises:
      ValueError: ``impl`` or ``$JAXQLORA_KERNELS`` is not one of the names above.
    """
    if impl in ("pallas", "xla"):
        return impl
    if impl not in (None, "auto"):
        raise ValueError(f"impl must be None, 'auto', 'pallas' or 'xla', got {impl!r}")
    env = os.environ.get(KERNELS_ENV, "").strip().lower()
    if env:
        if env not in ("pallas", "xla"):
            raise ValueError(f"${KERNELS_ENV} must be 'pallas' or 'xla', got {env!r}")
        return env
    if interpret:
        return "pallas"
    if jax.default_backend() == "gpu":
        return gpu_default
    return "xla"


def require_pallas_backend(op: str, interpret: bool) -> None:
    """Raise ValueError unless a compiled Pallas-Triton call of ``op`` can run here.

    The Triton backend needs ``jax.default_backend() == 'gpu'``; ``interpret=True`` runs
    anywhere.
    """
    if not interpret and jax.default_backend() != "gpu":
        raise ValueError(
            f"impl: the pallas path of {op} needs a GPU backend (or interpret=True); the "
            f"default backend is {jax.default_backend()!r}, use impl='xla'")


def check_float_dtype(name: str, a: jax.Array) -> None:
    """Raise TypeError naming ``name`` unless ``a`` is bfloat16, float16 or float32."""
    if jnp.dtype(a.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be bfloat16, float16 or float32, got {a.dtype}")


def dot_f32(a: jax.Array, b: jax.Array, contract_b: int) -> jax.Array:
    """``a @ b`` (contract_b=0) or ``a @ b.T`` (contract_b=1) of 2-D operands, float32 out.

    ``Precision.HIGHEST`` makes float32 operands IEEE float32 on Triton and XLA (no TF32);
    for 16-bit operands it is the plain MMA with float32 accumulation.
    """
    return lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())),
                           precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)


def triton_compiler_params(num_warps: int, num_stages: int):
    """``plgpu.CompilerParams`` (jax >= 0.11) or ``plgpu.TritonCompilerParams`` (0.10)."""
    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)


def zero(dtype) -> jax.Array:
    """A 0-d zero of ``dtype``, for ``other=`` of masked loads (Triton wants matching types)."""
    return jnp.zeros((), dtype)


def zero_cotangent(a):
    """The cotangent of a frozen operand: zeros of its shape and dtype for a floating array,
    ``float0`` zeros for an integer one, None for None (a ``custom_vjp`` backward's return)."""
    if a is None:
        return None
    if jnp.issubdtype(a.dtype, jnp.inexact):
        return jnp.zeros(a.shape, a.dtype)
    return np.zeros(a.shape, dtype=jax.dtypes.float0)
