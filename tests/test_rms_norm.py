"""pallas_kernels.rms_norm (RMSNorm and fused residual add + RMSNorm) against float64 oracles.

Forward values are checked against NumPy in float64, gradients against ``jax.vjp`` of the
same math written in float64 jnp (x64 enabled locally), for the Pallas kernels (interpret
mode on CPU) and, once, for the plain-jnp references. Shapes cover 1, 3, 16, 17 rows and
hidden sizes 96, 200, 576 (not powers of two: the row tile's ragged edge is masked).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import pallas_kernels.rms_norm as rms_module
from kernel_checks import INTERPRET, ON_GPU, assert_close, f64
from pallas_kernels.rms_norm import (
    add_rms_norm,
    add_rms_norm_reference,
    rms_norm,
    rms_norm_reference,
)

EPS = 1e-5
BF16, F16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)


def _inputs(seed, shape, dtype, w_dtype):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(0.3, 2.0, shape), dtype)
    w = jnp.asarray(1.0 + 0.3 * rng.normal(size=shape[-1]), w_dtype)
    dout = jnp.asarray(rng.normal(size=shape), w_dtype)
    return x, w, dout


def oracle_rms_norm(x, w, eps=EPS):
    """float64 NumPy: ``w * x / sqrt(mean(x^2) + eps)``."""
    x, w = f64(x), f64(w)
    return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _rms64(x, w, eps=EPS):
    return w * x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def oracle_rms_norm_vjp(x, w, dout, eps=EPS):
    """(dx, dw) by float64 autodiff."""
    with jax.enable_x64(True):
        _, pull = jax.vjp(lambda a, b: _rms64(a, b, eps), jnp.asarray(f64(x)),
                          jnp.asarray(f64(w)))
        return tuple(np.asarray(g) for g in pull(jnp.asarray(f64(dout))))


def oracle_add_rms_norm_vjp(x, r, w, dout, dh, eps=EPS):
    """(dx, dresidual, dw) by float64 autodiff of ``(norm(r + x), r + x)``."""
    with jax.enable_x64(True):
        def f(a, b, c):
            h = a + b
            return _rms64(h, c, eps), h

        _, pull = jax.vjp(f, *(jnp.asarray(f64(t)) for t in (x, r, w)))
        return tuple(np.asarray(g) for g in pull((jnp.asarray(f64(dout)), jnp.asarray(f64(dh)))))


# (shape, x dtype, weight dtype); f32 x with bf16 weight is the model's float32 residual
# stream entering a bf16 layer.
CASES = [
    ((1, 96), F32, F32),
    ((3, 200), BF16, BF16),
    ((16, 576), F32, BF16),
    ((17, 96), F16, F16),
    ((2, 3, 200), F32, F32),
]


@pytest.mark.parametrize("shape,dtype,w_dtype", CASES, ids=str)
def test_rms_norm_kernel_matches_float64(shape, dtype, w_dtype):
    x, w, dout = _inputs(len(shape) * 100 + shape[-1], shape, dtype, w_dtype)
    out, pull = jax.vjp(lambda a, b: rms_norm(a, b, EPS, impl="pallas", interpret=INTERPRET), x, w)
    assert out.dtype == w_dtype and out.shape == shape
    assert_close(out, oracle_rms_norm(x, w), what="out")
    dx, dw = pull(dout)
    assert dx.dtype == dtype and dw.dtype == w_dtype
    ref_dx, ref_dw = oracle_rms_norm_vjp(x, w, dout)
    assert_close(dx, ref_dx, what="dx")
    assert_close(dw, ref_dw, what="dweight")


# (shape, x dtype, residual dtype, weight dtype): bf16 sublayer output into a float32
# residual stream (the model), all float32, all bf16.
ADD_CASES = [
    ((17, 200), BF16, F32, BF16),
    ((3, 96), F32, F32, F32),
    ((1, 576), BF16, BF16, BF16),
]


@pytest.mark.parametrize("shape,dtype,r_dtype,w_dtype", ADD_CASES, ids=str)
def test_add_rms_norm_kernel_matches_float64(shape, dtype, r_dtype, w_dtype):
    x, w, dout = _inputs(shape[0] + shape[-1], shape, dtype, w_dtype)
    rng = np.random.default_rng(7)
    r = jnp.asarray(rng.normal(-0.2, 3.0, shape), r_dtype)
    dh = jnp.asarray(rng.normal(size=shape), r_dtype)
    (normed, new_r), pull = jax.vjp(
        lambda a, b, c: add_rms_norm(a, b, c, EPS, impl="pallas", interpret=INTERPRET), x, r, w)
    assert normed.dtype == w_dtype and new_r.dtype == r_dtype
    h64 = f64(r) + f64(x)
    assert_close(new_r, h64, what="new_residual")
    assert_close(normed, oracle_rms_norm(h64, w), what="normed")
    dx, dr, dw = pull((dout, dh))
    assert (dx.dtype, dr.dtype, dw.dtype) == (dtype, r_dtype, w_dtype)
    ref_dx, ref_dr, ref_dw = oracle_add_rms_norm_vjp(x, r, w, dout, dh)
    assert_close(dx, ref_dx, what="dx")
    assert_close(dr, ref_dr, what="dresidual")
    assert_close(dw, ref_dw, what="dweight")


def test_backward_with_several_row_tiles_per_program(monkeypatch):
    """dweight partials when each backward program loops over several row tiles (and the
    last program runs past the rows): forced by capping the program count at 3."""
    monkeypatch.setattr(rms_module, "_BWD_PROGRAMS", 3)
    x, w, dout = _inputs(5, (37, 576), F32, F32)  # 10 row tiles of 4 -> 3 programs x 4 steps
    _, pull = jax.vjp(lambda a, b: rms_norm(a, b, EPS, impl="pallas", interpret=INTERPRET), x, w)
    dx, dw = pull(dout)
    ref_dx, ref_dw = oracle_rms_norm_vjp(x, w, dout)
    assert_close(dx, ref_dx, what="dx")
    assert_close(dw, ref_dw, what="dweight")


def test_references_match_float64():
    x, w, dout = _inputs(11, (3, 200), F32, F32)
    assert_close(rms_norm_reference(x, w, EPS), oracle_rms_norm(x, w), what="rms_norm_reference")
    dx, dw = jax.vjp(lambda a, b: rms_norm_reference(a, b, EPS), x, w)[1](dout)
    ref_dx, ref_dw = oracle_rms_norm_vjp(x, w, dout)
    assert_close(dx, ref_dx, what="dx")
    assert_close(dw, ref_dw, what="dweight")
    r = jnp.asarray(np.random.default_rng(12).normal(size=(3, 200)), jnp.float32)
    normed, new_r = add_rms_norm_reference(x.astype(jnp.bfloat16), r, w, EPS)
    h64 = f64(r) + f64(x.astype(jnp.bfloat16))
    assert new_r.dtype == F32
    assert_close(new_r, h64, what="add_rms_norm_reference residual")
    assert_close(normed, oracle_rms_norm(h64, w), what="add_rms_norm_reference normed")


def test_xla_path_is_the_reference_and_auto_follows_the_env(monkeypatch):
    x, w, _ = _inputs(3, (3, 96), BF16, BF16)
    np.testing.assert_array_equal(np.asarray(rms_norm(x, w, EPS, impl="xla"), np.float32),
                                  np.asarray(rms_norm_reference(x, w, EPS), np.float32))
    # rms_norm's 'auto' follows $JAXQLORA_KERNELS (the rule itself, resolve_impl, is
    # tested in test_nf4_matmul.py): interpret=True alone would pick the kernel.
    called = []
    monkeypatch.setattr(rms_module, "_rms_norm_pallas",
                        lambda cfg, a, b: called.append(cfg) or a)
    monkeypatch.setenv("JAXQLORA_KERNELS", "xla")
    rms_norm(x, w, EPS, interpret=True)
    assert not called
    monkeypatch.setenv("JAXQLORA_KERNELS", "pallas")
    rms_norm(x, w, EPS, interpret=True)
    assert called
    monkeypatch.setenv("JAXQLORA_KERNELS", "cuda")
    with pytest.raises(ValueError, match="JAXQLORA_KERNELS"):
        rms_norm(x, w, EPS)


def test_bad_inputs_raise():
    x, w, _ = _inputs(4, (3, 96), F32, F32)
    with pytest.raises(TypeError, match="x must be"):
        rms_norm(x.astype(jnp.int32), w)
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(x, w[:95])
    with pytest.raises(ValueError, match="residual must have the shape"):
        add_rms_norm(x, x[:2], w)
    with pytest.raises(ValueError, match="impl"):
        rms_norm(x, w, impl="triton")
    if not ON_GPU:
        with pytest.raises(ValueError, match="GPU backend"):
            rms_norm(x, w, impl="pallas")
