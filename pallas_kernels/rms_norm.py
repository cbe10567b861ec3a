"""RMSNorm and the fused residual-add + RMSNorm, forward and backward, as Pallas kernels.

The math (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"; the Llama /
Qwen ``*RMSNorm`` of transformers), per row ``x`` of ``H`` elements, in float32::

    rstd = 1 / sqrt(mean(x^2) + eps)
    y    = x * rstd
    out  = weight * cast(y, weight.dtype)        # in weight.dtype

This is jaxqlora's RMSNorm (`jaxqlora.model.RMSNorm`): like transformers' ``LlamaRMSNorm``
the normalised value is rounded before the weight multiply, but to the WEIGHT's dtype
(transformers rounds to the input dtype; the two agree when ``x`` and ``weight`` share a
dtype). So the output dtype is ``weight.dtype``: a float32 residual stream with bf16
weights gives bf16 activations for the next matmul.

`add_rms_norm` fuses the decoder block's residual add with the next norm::

    new_residual = residual + cast(x, residual.dtype)   # in residual.dtype
    normed       = rms_norm(new_residual, weight)

(jaxqlora keeps the residual stream in float32 and the sublayer outputs in bf16.)

Backward, with ``g = dout * weight`` (float32) and ``c = mean(g * y)`` per row::

    dx      = rstd * (g - y * c)
    dweight = sum over rows of dout * cast(y, weight.dtype)

(for `add_rms_norm` the incoming ``d new_residual`` is added to ``dx``, and that sum is
the cotangent of both ``x`` and ``residual``, each in its own dtype).

The file reads top to bottom like jax's ``pallas/ops/gpu/rms_norm.py`` (and Unsloth's
``kernels/rms_layernorm.py``): the forward kernel and its wrapper, the backward kernel and
its wrapper, the ``jax.custom_vjp`` bindings with the public `rms_norm` and `add_rms_norm`,
and the plain-jnp references at the bottom (the 'xla' path and the oracle).

Kernel structure (Pallas, Triton backend; also runs with ``interpret=True``):

* Forward grid ``(cdiv(M, block_m),)`` over the ``M`` rows of ``x.reshape(-1, H)``; a
  program holds a ``[block_m, block_h]`` tile with ``block_h = next_power_of_2(H)`` (the
  whole row; the ragged column edge and rows past ``M`` are masked) and ``block_m`` rows
  (a power of two, at most ``4096 // block_h``, at least 1). It writes the output, the
  float32 ``rstd [M]`` for the backward pass, and (fused add) the new residual.
* Backward grid ``(P,)``: program ``p`` loops over ``steps`` row tiles, writes ``dx``
  for them, and accumulates its ``dweight`` contribution in float32 registers; the
  ``[P, H]`` float32 partial sums are added by one jnp sum (``P`` is at most about 512,
  so the partials stay small). The backward recomputes ``y`` from the saved input and
  ``rstd`` instead of storing it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.dispatch import (
    check_float_dtype,
    plgpu,
    require_pallas_backend,
    resolve_impl,
    triton_compiler_params,
    zero,
)

__all__ = ["rms_norm", "add_rms_norm", "rms_norm_reference", "add_rms_norm_reference"]

#: Elements of one program's tile (float32 in registers); wider rows get one row each.
#: From benchmarks/nf4_tune.py on an H200 (16384 x 4096 bf16): 8192 is fastest for the
#: forward, 4096 for the backward (which holds more live tensors per element).
_TILE = 8192
_BWD_TILE = 4096
#: About how many backward programs to launch (a few per SM of an H100/H200).
_BWD_PROGRAMS = 512


def _tiles(m: int, h: int, tile: int | None = None) -> tuple[int, int, int]:
    """``(block_m, block_h, num_warps)`` for ``M`` rows of ``H`` elements."""
    block_h = pl.next_power_of_2(h)
    block_m = max(1, min(pl.next_power_of_2(m), (tile or _TILE) // block_h))
    num_warps = min(max(block_m * block_h // 512, 1), 8)
    return block_m, block_h, num_warps


def _row_tile(ref, m0, block_m: int, block_h: int):
    return ref.at[pl.ds(m0, block_m), pl.ds(0, block_h)]


# ---------------------------------------------------------------------------
# Forward kernel
# ---------------------------------------------------------------------------


def rms_norm_forward_kernel(*refs, eps: float, block_m: int, block_h: int,
                            fused_add: bool):
    """One ``[block_m, block_h]`` row tile: ``out``, ``rstd`` (and the new residual)."""
    if fused_add:
        x_ref, r_ref, w_ref, o_ref, rstd_ref, h_ref = refs
    else:
        x_ref, w_ref, o_ref, rstd_ref = refs
    m, n = x_ref.shape
    m0 = pl.program_id(0) * block_m
    mask_m = m0 + jnp.arange(block_m, dtype=jnp.int32) < m
    mask_h = jnp.arange(block_h, dtype=jnp.int32) < n
    mask = mask_m[:, None] & mask_h[None, :]

    x = plgpu.load(_row_tile(x_ref, m0, block_m, block_h), mask=mask,
                   other=zero(x_ref.dtype))
    if fused_add:  # new_residual = residual + cast(x, residual.dtype), rounded to its dtype
        r = plgpu.load(_row_tile(r_ref, m0, block_m, block_h), mask=mask,
                       other=zero(r_ref.dtype))
        h = (r.astype(jnp.float32) + x.astype(r_ref.dtype).astype(jnp.float32))
        h = h.astype(h_ref.dtype)
        plgpu.store(_row_tile(h_ref, m0, block_m, block_h), h, mask=mask)
        x = h
    x = x.astype(jnp.float32)
    rstd = lax.rsqrt(jnp.sum(x * x, axis=1) / n + eps)
    w = plgpu.load(w_ref.at[pl.ds(0, block_h)], mask=mask_h, other=zero(w_ref.dtype))
    y = (x * rstd[:, None]).astype(w_ref.dtype).astype(jnp.float32)
    out = w.astype(jnp.float32)[None, :] * y
    plgpu.store(_row_tile(o_ref, m0, block_m, block_h), out.astype(o_ref.dtype), mask=mask)
    plgpu.store(rstd_ref.at[pl.ds(m0, block_m)], rstd, mask=mask_m)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def rms_norm_forward_pallas(x, weight, residual=None, *, eps: float, interpret: bool = False):
    """Forward Pallas call on 2-D ``x [M, H]`` (and ``residual [M, H]``), ``weight [H]``.

    Returns ``(out [M, H] weight.dtype, rstd [M] float32)``, plus the new residual
    ``[M, H]`` in ``residual.dtype`` when ``residual`` is given (then ``rstd`` is that of
    the new residual). Use `rms_norm` / `add_rms_norm`; this skips their checks.
    """
    m, h = x.shape
    block_m, block_h, num_warps = _tiles(m, h)
    fused_add = residual is not None
    out_shape = [jax.ShapeDtypeStruct((m, h), weight.dtype),
                 jax.ShapeDtypeStruct((m,), jnp.float32)]
    if fused_add:
        out_shape.append(jax.ShapeDtypeStruct((m, h), residual.dtype))
    kernel = functools.partial(rms_norm_forward_kernel, eps=eps, block_m=block_m,
                               block_h=block_h, fused_add=fused_add)
    args = (x, residual, weight) if fused_add else (x, weight)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(m, block_m),),
        out_shape=out_shape,
        compiler_params=triton_compiler_params(num_warps, 1),
        interpret=interpret,
        name="add_rms_norm" if fused_add else "rms_norm",
    )(*args)


# ---------------------------------------------------------------------------
# Backward kernel: dx (and the fused-add residual cotangent) + dweight partials
# ---------------------------------------------------------------------------


def rms_norm_backward_kernel(*refs, block_m: int, block_h: int, steps: int,
                             fused_add: bool):
    """``steps`` row tiles of ``dx`` and one row of float32 ``dweight`` partial sums.

    Inputs: the normalised input (``x``, or the new residual for the fused add), weight,
    rstd, dout (and the new residual's cotangent); outputs: one or two copies of ``dx`` in
    their dtypes (x's and residual's), then ``dw_partial [P, H]``.
    """
    if fused_add:
        x_ref, w_ref, rstd_ref, do_ref, dh_ref, *out_refs = refs
    else:
        (x_ref, w_ref, rstd_ref, do_ref, *out_refs), dh_ref = refs, None
    *dx_refs, dw_ref = out_refs
    m, n = x_ref.shape
    p = pl.program_id(0)
    mask_h = jnp.arange(block_h, dtype=jnp.int32) < n
    w = plgpu.load(w_ref.at[pl.ds(0, block_h)], mask=mask_h,
                   other=zero(w_ref.dtype)).astype(jnp.float32)

    def body(s, dw_acc):
        m0 = (p * steps + s) * block_m
        mask_m = m0 + jnp.arange(block_m, dtype=jnp.int32) < m
        mask = mask_m[:, None] & mask_h[None, :]

        def load(ref):
            return plgpu.load(_row_tile(ref, m0, block_m, block_h), mask=mask,
                              other=zero(ref.dtype)).astype(jnp.float32)

        rstd = plgpu.load(rstd_ref.at[pl.ds(m0, block_m)], mask=mask_m,
                          other=zero(jnp.float32))
        y = load(x_ref) * rstd[:, None]
        dout = load(do_ref)
        g = dout * w[None, :]
        c = jnp.sum(g * y, axis=1) / n
        dx = rstd[:, None] * (g - y * c[:, None])
        if dh_ref is not None:
            dx = dx + load(dh_ref)
        for dx_ref in dx_refs:
            plgpu.store(_row_tile(dx_ref, m0, block_m, block_h), dx.astype(dx_ref.dtype),
                        mask=mask)
        return dw_acc + dout * y.astype(w_ref.dtype).astype(jnp.float32)

    dw = lax.fori_loop(0, steps, body, jnp.zeros((block_m, block_h), jnp.float32))
    plgpu.store(dw_ref.at[p, pl.ds(0, block_h)], jnp.sum(dw, axis=0), mask=mask_h)


@functools.partial(jax.jit, static_argnames=("dx_dtypes", "interpret"))
def rms_norm_backward_pallas(x, weight, rstd, dout, dh=None, *, dx_dtypes: tuple,
                             interpret: bool = False):
    """Backward Pallas call on 2-D operands; returns ``(*dx, dweight)``.

    ``x [M, H]`` is the normalised input (the new residual for the fused add), ``rstd``
    float32 ``[M]`` from the forward, ``dout [M, H]`` the output cotangent, ``dh``
    (fused add only) the new residual's cotangent, added to ``dx``. One ``dx [M, H]`` is
    written per entry of ``dx_dtypes``; ``dweight [H]`` (``weight.dtype``) is the float32
    sum of the per-program partials.
    """
    m, h = x.shape
    block_m, block_h, num_warps = _tiles(m, h, _BWD_TILE)
    n_tiles = pl.cdiv(m, block_m)
    steps = pl.cdiv(n_tiles, _BWD_PROGRAMS)
    programs = pl.cdiv(n_tiles, steps)
    fused_add = dh is not None
    kernel = functools.partial(rms_norm_backward_kernel, block_m=block_m, block_h=block_h,
                               steps=steps, fused_add=fused_add)
    out_shape = [jax.ShapeDtypeStruct((m, h), dt) for dt in dx_dtypes]
    out_shape.append(jax.ShapeDtypeStruct((programs, h), jnp.float32))
    args = (x, weight, rstd, dout) + ((dh,) if fused_add else ())
    *dxs, dw_partial = pl.pallas_call(
        kernel,
        grid=(programs,),
        out_shape=out_shape,
        compiler_params=triton_compiler_params(num_warps, 1),
        interpret=interpret,
        name="add_rms_norm_bwd" if fused_add else "rms_norm_bwd",
    )(*args)
    return (*dxs, jnp.sum(dw_partial, axis=0).astype(weight.dtype))


# ---------------------------------------------------------------------------
# custom_vjp bindings and the public ops
# ---------------------------------------------------------------------------


class _Config(NamedTuple):
    eps: float
    interpret: bool
    x_dtype: jnp.dtype | None = None  # add_rms_norm: the dtype of x's cotangent


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rms_norm_pallas(cfg: _Config, x, weight):
    return rms_norm_forward_pallas(x, weight, eps=cfg.eps, interpret=cfg.interpret)[0]


def _rms_norm_fwd(cfg, x, weight):
    out, rstd = rms_norm_forward_pallas(x, weight, eps=cfg.eps, interpret=cfg.interpret)
    return out, (x, weight, rstd)


def _rms_norm_bwd(cfg, res, dout):
    x, weight, rstd = res
    dx, dw = rms_norm_backward_pallas(x, weight, rstd, dout, dx_dtypes=(x.dtype,),
                                      interpret=cfg.interpret)
    return dx, dw


_rms_norm_pallas.defvjp(_rms_norm_fwd, _rms_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _add_rms_norm_pallas(cfg: _Config, x, residual, weight):
    out, _, h = rms_norm_forward_pallas(x, weight, residual, eps=cfg.eps,
                                        interpret=cfg.interpret)
    return out, h


def _add_rms_norm_fwd(cfg, x, residual, weight):
    out, rstd, h = rms_norm_forward_pallas(x, weight, residual, eps=cfg.eps,
                                           interpret=cfg.interpret)
    return (out, h), (h, weight, rstd)


def _add_rms_norm_bwd(cfg, res, cotangents):
    h, weight, rstd = res
    dout, dh = cotangents
    # One dx when x and the residual share a dtype, else one per dtype (x's first).
    dx_dtypes = (h.dtype,) if cfg.x_dtype == h.dtype else (cfg.x_dtype, h.dtype)
    *dxs, dw = rms_norm_backward_pallas(h, weight, rstd, dout, dh, dx_dtypes=dx_dtypes,
                                        interpret=cfg.interpret)
    return dxs[0], dxs[-1], dw


_add_rms_norm_pallas.defvjp(_add_rms_norm_fwd, _add_rms_norm_bwd)


def _check(name: str, a) -> jax.Array:
    a = jnp.asarray(a)
    check_float_dtype(name, a)
    if a.ndim < 1:
        raise ValueError(f"{name} must have shape [...], got a scalar")
    return a


def _check_weight(weight, hidden: int) -> jax.Array:
    weight = _check("weight", weight)
    if weight.shape != (hidden,):
        raise ValueError(f"weight must have shape [H] = [{hidden}] (x.shape[-1]), "
                         f"got {weight.shape}")
    return weight


#: What ``impl='auto'`` picks for `rms_norm` on a GPU: 'xla'. On the H200 the Pallas
#: kernel ran forward + backward at 0.91x the speed of XLA's fusion (16384x4096 bf16,
#: 262.4 vs 239.6 us; forward alone 0.98x, 119.2 vs 116.4 us; benchmarks/RESULTS.md,
#: 2026-11-21), so the default path is XLA's (issue 13: never slower than XLA). The fused
#: `add_rms_norm` (1.18x XLA) keeps its kernel.
RMS_NORM_GPU_DEFAULT = "xla"


def rms_norm(x, weight, eps: float = 1e-6, *, impl: str | None = "auto",
             interpret: bool = False) -> jax.Array:
    """RMSNorm over the last axis: ``weight * cast(x * rsqrt(mean(x^2) + eps), weight.dtype)``.

    Source: Zhang & Sennrich 2019 (RMSNorm); transformers ``LlamaRMSNorm``, with the
    normalised value rounded to the weight's dtype as in `jaxqlora.model.RMSNorm` (see the
    module docstring).

    Args:
      x: ``[..., H]`` bfloat16, float16 or float32; any ``H`` (the kernel masks the
        ragged edge of its power-of-two row tile).
      weight: ``[H]`` bfloat16, float16 or float32.
      eps: added to the mean square (a Python float; static).
      impl: None/'auto' -> `RMS_NORM_GPU_DEFAULT` on a GPU (XLA's fusion: the kernel
        measured slower there), the Pallas kernel with ``interpret=True``, else the
        plain-jnp `rms_norm_reference`; ``$JAXQLORA_KERNELS`` ('pallas'/'xla') overrides
        auto; 'pallas'/'xla' force one.
      interpret: run the Pallas kernels in interpret mode (CPU testing).

    Returns:
      ``[..., H]`` in ``weight.dtype``; statistics in float32. Differentiable in ``x``
      and ``weight``: on the 'pallas' path through a fused backward kernel (``dx`` and
      float32 per-program ``dweight`` partial sums), on the 'xla' path by autodiff of
      the reference.

    Raises:
      TypeError: ``x`` or ``weight`` not bfloat16/float16/float32.
      ValueError: ``weight`` not ``[H]``; a bad ``impl``; 'pallas' without a GPU and
        without ``interpret``.
    """
    mode = resolve_impl(impl, interpret, gpu_default=RMS_NORM_GPU_DEFAULT)
    x = _check("x", x)
    weight = _check_weight(weight, x.shape[-1])
    if mode == "xla" or x.size == 0:
        return rms_norm_reference(x, weight, eps)
    require_pallas_backend("rms_norm", interpret)
    h = x.shape[-1]
    out = _rms_norm_pallas(_Config(float(eps), bool(interpret)), x.reshape(-1, h), weight)
    return out.reshape(x.shape)


def add_rms_norm(x, residual, weight, eps: float = 1e-6, *, impl: str | None = "auto",
                 interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """Fused residual add + RMSNorm: ``h = residual + cast(x, residual.dtype)``, ``rms_norm(h)``.

    The decoder block's ``residual = residual + sublayer(...)`` followed by the next
    pre-norm, in one pass over the rows (one read of ``x`` and ``residual``, one write
    of ``h`` and of the normed rows).

    Args:
      x: ``[..., H]`` sublayer output (bfloat16/float16/float32; bf16 in jaxqlora).
      residual: ``[..., H]`` residual stream, same shape (float32 in jaxqlora).
      weight: ``[H]`` norm weight.
      eps, impl, interpret: as in `rms_norm`.

    Returns:
      ``(normed, new_residual)``: ``normed = rms_norm(new_residual, weight, eps)`` in
      ``weight.dtype`` and ``new_residual = residual + cast(x, residual.dtype)`` in
      ``residual.dtype``. Differentiable in ``x``, ``residual`` and ``weight`` (on the
      'pallas' path one fused backward kernel writes the cotangent of ``x`` and of
      ``residual`` and the ``dweight`` partials).

    Raises:
      TypeError: a dtype not bfloat16/float16/float32.
      ValueError: ``residual.shape != x.shape``; ``weight`` not ``[H]``; a bad ``impl``;
        'pallas' without a GPU and without ``interpret``.
    """
    mode = resolve_impl(impl, interpret)
    x = _check("x", x)
    residual = _check("residual", residual)
    if residual.shape != x.shape:
        raise ValueError(f"residual must have the shape of x {x.shape}, got {residual.shape}")
    weight = _check_weight(weight, x.shape[-1])
    if mode == "xla" or x.size == 0:
        return add_rms_norm_reference(x, residual, weight, eps)
    require_pallas_backend("add_rms_norm", interpret)
    h = x.shape[-1]
    out, new_residual = _add_rms_norm_pallas(
        _Config(float(eps), bool(interpret), jnp.dtype(x.dtype)), x.reshape(-1, h),
        residual.reshape(-1, h), weight)
    return out.reshape(x.shape), new_residual.reshape(x.shape)


# ---------------------------------------------------------------------------
# Plain-jnp references (the XLA path and the test oracle)
# ---------------------------------------------------------------------------


def rms_norm_reference(x, weight, eps: float = 1e-6) -> jax.Array:
    """`rms_norm` in plain jnp (float32 statistics; output in ``weight.dtype``).

    Exactly `jaxqlora.model.RMSNorm`'s math: ``xf = float32(x)``,
    ``y = xf * rsqrt(mean(xf^2, -1) + eps)``, ``weight * y.astype(weight.dtype)``.
    """
    xf = jnp.asarray(x).astype(jnp.float32)
    y = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    weight = jnp.asarray(weight)
    return weight * y.astype(weight.dtype)


def add_rms_norm_reference(x, residual, weight, eps: float = 1e-6) -> tuple[jax.Array, jax.Array]:
    """`add_rms_norm` in plain jnp: ``h = residual + x.astype(residual.dtype)``,
    returns ``(rms_norm_reference(h, weight, eps), h)``."""
    residual = jnp.asarray(residual)
    h = residual + jnp.asarray(x).astype(residual.dtype)
    return rms_norm_reference(h, weight, eps), h
