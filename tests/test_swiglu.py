"""pallas_kernels.swiglu against float64 oracles.

The forward is checked against NumPy in float64 (``g / (1 + exp(-g)) * u``), the fused
backward against ``jax.vjp`` of the same math in float64 jnp (x64 enabled locally), for
the Pallas kernels (interpret mode on CPU) and, once, for the plain-jnp reference. Shapes
cover 1, 3, 16, 17 rows, leading batch dims, and column counts that are not multiples of
the 2-D tile (96, 200, 576, 1500 > the 1024-column tile).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_checks import INTERPRET, ON_GPU, assert_close, f64
from pallas_kernels.swiglu import swiglu, swiglu_reference

BF16, F16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)


def _inputs(seed, shape, dtype):
    rng = np.random.default_rng(seed)
    gate = rng.normal(0.0, 3.0, shape)
    gate.reshape(-1)[:4] = [-60.0, 60.0, -15.0, 15.0]  # saturated sigmoid must stay finite
    up = rng.normal(0.5, 1.0, shape)
    dout = rng.normal(size=shape)
    return tuple(jnp.asarray(a, dtype) for a in (gate, up, dout))


def oracle_swiglu(gate, up):
    """float64 NumPy: ``gate * sigmoid(gate) * up``."""
    g = f64(gate)
    return g / (1.0 + np.exp(-g)) * f64(up)


def oracle_swiglu_vjp(gate, up, dout):
    """(dgate, dup) by float64 autodiff."""
    with jax.enable_x64(True):
        _, pull = jax.vjp(lambda g, u: g * jax.nn.sigmoid(g) * u,
                          jnp.asarray(f64(gate)), jnp.asarray(f64(up)))
        return tuple(np.asarray(t) for t in pull(jnp.asarray(f64(dout))))


CASES = [
    ((1, 96), F32),
    ((3, 200), BF16),
    ((16, 576), F32),
    ((17, 1500), BF16),
    ((2, 3, 200), F16),
]


@pytest.mark.parametrize("shape,dtype", CASES, ids=str)
def test_swiglu_kernel_matches_float64(shape, dtype):
    gate, up, dout = _inputs(shape[0] * 1000 + shape[-1], shape, dtype)
    out, pull = jax.vjp(lambda g, u: swiglu(g, u, impl="pallas", interpret=INTERPRET), gate, up)
    assert out.dtype == dtype and out.shape == shape
    assert_close(out, oracle_swiglu(gate, up), what="out")
    dgate, dup = pull(dout)
    assert dgate.dtype == dtype and dup.dtype == dtype
    ref_dgate, ref_dup = oracle_swiglu_vjp(gate, up, dout)
    assert_close(dgate, ref_dgate, what="dgate")
    assert_close(dup, ref_dup, what="dup")


def test_reference_matches_float64():
    gate, up, dout = _inputs(1, (3, 200), F32)
    assert_close(swiglu_reference(gate, up), oracle_swiglu(gate, up), what="reference")
    dgate, dup = jax.vjp(swiglu_reference, gate, up)[1](dout)
    ref_dgate, ref_dup = oracle_swiglu_vjp(gate, up, dout)
    assert_close(dgate, ref_dgate, what="dgate")
    assert_close(dup, ref_dup, what="dup")
    np.testing.assert_array_equal(np.asarray(swiglu(gate, up, impl="xla")),
                                  np.asarray(swiglu_reference(gate, up)))


def test_bad_inputs_raise():
    gate, up, _ = _inputs(2, (3, 96), F32)
    with pytest.raises(ValueError, match="one shape"):
        swiglu(gate, up[:2])
    with pytest.raises(TypeError, match="dtype"):
        swiglu(gate, up.astype(jnp.bfloat16))
    with pytest.raises(TypeError, match="gate must be"):
        swiglu(gate.astype(jnp.int32), up.astype(jnp.int32))
    if not ON_GPU:
        with pytest.raises(ValueError, match="GPU backend"):
            swiglu(gate, up, impl="pallas")
