"""SwiGLU activation ``silu(gate) * up``, forward and fused backward, as Pallas kernels.

The math (Shazeer 2020, "GLU Variants Improve Transformer"; the Llama MLP
``down_proj(silu(gate_proj(x)) * up_proj(x))``), elementwise with ``s = sigmoid(gate)``::

    out   = gate * s * up
    dup   = dout * gate * s
    dgate = dout * up * s * (1 + gate * (1 - s))

The backward recomputes ``s`` from the saved ``gate`` instead of storing it (Unsloth's
``kernels/swiglu.py`` does the same); one kernel writes both cotangents.

The file reads top to bottom: the forward kernel and its wrapper, the backward kernel and
its wrapper, the ``jax.custom_vjp`` binding with the public `swiglu`, and the plain-jnp
`swiglu_reference` at the bottom (the 'xla' path and the oracle).

Kernel structure (Pallas, Triton backend; also runs with ``interpret=True``): the
operands are viewed as ``[R, C]`` (``C`` the last axis, ``R`` all leading axes), the grid
is ``(cdiv(R, block_r), cdiv(C, block_c))`` of ``[block_r, block_c]`` tiles (``block_c``
the next power of two of ``C`` capped at 1024, ``block_r`` filling the tile up to 4096
elements), and the ragged edges of both axes are masked. The Pallas kernels compute in
float32 and round once to the input dtype; the reference is ``jax.nn.silu(gate) * up`` in
the input dtype (jaxqlora's MLP, unchanged), so for bfloat16 the two may differ by an
ulp or two.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.dispatch import (
    check_float_dtype,
    plgpu,
    require_pallas_backend,
    resolve_impl,
    triton_compiler_params,
    zero,
)

__all__ = ["swiglu", "swiglu_reference"]

#: Elements of one program's tile.
_TILE = 4096


def _tiles(r: int, c: int) -> tuple[int, int]:
    """``(block_r, block_c)`` for an ``[R, C]`` operand."""
    block_c = min(pl.next_power_of_2(c), 1024)
    block_r = max(1, min(pl.next_power_of_2(r), _TILE // block_c))
    return block_r, block_c


def _tile(ref, block_r: int, block_c: int):
    """The program's ``[block_r, block_c]`` view of ``ref`` and its in-bounds mask."""
    r, c = ref.shape
    r0 = pl.program_id(0) * block_r
    c0 = pl.program_id(1) * block_c
    mask_r = r0 + jnp.arange(block_r, dtype=jnp.int32) < r
    mask_c = c0 + jnp.arange(block_c, dtype=jnp.int32) < c
    return ref.at[pl.ds(r0, block_r), pl.ds(c0, block_c)], mask_r[:, None] & mask_c[None, :]


def _load_f32(ref, block_r: int, block_c: int):
    view, mask = _tile(ref, block_r, block_c)
    return plgpu.load(view, mask=mask, other=zero(ref.dtype)).astype(jnp.float32)


def _store(ref, value, block_r: int, block_c: int):
    view, mask = _tile(ref, block_r, block_c)
    plgpu.store(view, value.astype(ref.dtype), mask=mask)


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------


def swiglu_forward_kernel(gate_ref, up_ref, o_ref, *, block_r: int, block_c: int):
    """One ``[block_r, block_c]`` tile of ``silu(gate) * up`` (float32 math)."""
    g = _load_f32(gate_ref, block_r, block_c)
    u = _load_f32(up_ref, block_r, block_c)
    _store(o_ref, g * jax.nn.sigmoid(g) * u, block_r, block_c)


def _call(kernel, name: str, args, out_shape, interpret: bool):
    r, c = args[0].shape
    block_r, block_c = _tiles(r, c)
    return pl.pallas_call(
        functools.partial(kernel, block_r=block_r, block_c=block_c),
        grid=(pl.cdiv(r, block_r), pl.cdiv(c, block_c)),
        out_shape=out_shape,
        compiler_params=triton_compiler_params(max(1, min(8, block_r * block_c // 512)), 1),
        interpret=interpret,
        name=name,
    )(*args)


@functools.partial(jax.jit, static_argnames=("interpret",))
def swiglu_forward_pallas(gate, up, *, interpret: bool = False):
    """Forward Pallas call on 2-D ``gate, up [R, C]`` (one dtype) -> ``[R, C]``.

    Use `swiglu`; this skips its checks.
    """
    return _call(swiglu_forward_kernel, "swiglu", (gate, up),
                 jax.ShapeDtypeStruct(gate.shape, gate.dtype), interpret)


# ---------------------------------------------------------------------------
# Backward (recomputes the sigmoid)
# ---------------------------------------------------------------------------


def swiglu_backward_kernel(gate_ref, up_ref, do_ref, dgate_ref, dup_ref, *, block_r: int,
                           block_c: int):
    """One tile of ``dgate`` and ``dup`` from ``gate``, ``up`` and ``dout``."""
    g = _load_f32(gate_ref, block_r, block_c)
    u = _load_f32(up_ref, block_r, block_c)
    do = _load_f32(do_ref, block_r, block_c)
    s = jax.nn.sigmoid(g)
    _store(dup_ref, do * g * s, block_r, block_c)
    _store(dgate_ref, do * u * s * (1.0 + g * (1.0 - s)), block_r, block_c)


@functools.partial(jax.jit, static_argnames=("interpret",))
def swiglu_backward_pallas(gate, up, dout, *, interpret: bool = False):
    """Backward Pallas call on 2-D ``[R, C]`` operands -> ``(dgate, dup)`` in their dtype."""
    shape = jax.ShapeDtypeStruct(gate.shape, gate.dtype)
    return _call(swiglu_backward_kernel, "swiglu_bwd", (gate, up, dout), [shape, shape],
                 interpret)


# ---------------------------------------------------------------------------
# custom_vjp binding and the public op
# ---------------------------------------------------------------------------


class _Config(NamedTuple):
    interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _swiglu_pallas(cfg: _Config, gate, up):
    return swiglu_forward_pallas(gate, up, interpret=cfg.interpret)


def _swiglu_fwd(cfg, gate, up):
    return swiglu_forward_pallas(gate, up, interpret=cfg.interpret), (gate, up)


def _swiglu_bwd(cfg, res, dout):
    gate, up = res
    return swiglu_backward_pallas(gate, up, dout, interpret=cfg.interpret)


_swiglu_pallas.defvjp(_swiglu_fwd, _swiglu_bwd)


def swiglu(gate, up, *, impl: str | None = "auto", interpret: bool = False) -> jax.Array:
    """SwiGLU: ``silu(gate) * up = gate * sigmoid(gate) * up``, elementwise.

    Source: Shazeer 2020 (GLU variants); transformers ``LlamaMLP``
    (``act_fn(gate_proj(x)) * up_proj(x)`` with ``act_fn = silu``).

    Args:
      gate, up: ``[..., C]`` arrays of one shape and one dtype (bfloat16, float16 or
        float32); any sizes (ragged tile edges are masked).
      impl: None/'auto' -> the Pallas kernel when ``jax.default_backend() == 'gpu'`` (or
        ``interpret=True``), else `swiglu_reference`; ``$JAXQLORA_KERNELS``
        ('pallas'/'xla') overrides auto; 'pallas'/'xla' force one path.
      interpret: run the Pallas kernels in interpret mode (CPU testing).

    Returns:
      ``[..., C]`` in the input dtype (the Pallas path computes in float32 and rounds
      once). Differentiable in both inputs; the Pallas backward is one fused kernel that
      recomputes the sigmoid.

    Raises:
      TypeError: a dtype other than bfloat16/float16/float32, or ``gate`` and ``up`` of
        different dtypes.
      ValueError: ``gate.shape != up.shape``; a bad ``impl``; 'pallas' without a GPU and
        without ``interpret``.
    """
    mode = resolve_impl(impl, interpret)
    gate, up = jnp.asarray(gate), jnp.asarray(up)
    check_float_dtype("gate", gate)
    if up.dtype != gate.dtype:
        raise TypeError(f"up must have gate's dtype {gate.dtype}, got {up.dtype}")
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have one shape, got {gate.shape} and {up.shape}")
    if mode == "xla" or gate.size == 0 or gate.ndim == 0:
        return swiglu_reference(gate, up)
    require_pallas_backend("swiglu", interpret)
    c = gate.shape[-1]
    out = _swiglu_pallas(_Config(bool(interpret)), gate.reshape(-1, c), up.reshape(-1, c))
    return out.reshape(gate.shape)


# ---------------------------------------------------------------------------
# Plain-jnp reference (the XLA path and the test oracle)
# ---------------------------------------------------------------------------


def swiglu_reference(gate, up) -> jax.Array:
    """`swiglu` in plain jnp: ``jax.nn.silu(gate) * up`` in the input dtype (autodiff)."""
    return jax.nn.silu(gate) * up
