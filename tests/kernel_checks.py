"""Helpers shared by the Pallas kernel tests (rms_norm, swiglu, decode_attention).

On CPU the kernels run with ``interpret=True``, whose output buffers start as NaN (jax's
``uninitialized_value``), so an element a kernel never writes shows up as non-finite; on
a GPU backend the same tests run the compiled Triton kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU

#: Tolerance per output dtype, relative to the float64 oracle: elementwise
#: ``|a - ref| <= tol * |ref| + tol * max|ref|``. bfloat16 and float16 allow about two
#: roundings to the dtype (2**-8 and 2**-11 relative each); float32 a few ulps of float32
#: arithmetic (more on GPU, whose exp/rsqrt are approximate to about 2**-22).
TOL = {
    jnp.dtype(jnp.float32): 1e-5 if ON_GPU else 2e-6,
    jnp.dtype(jnp.float16): 3e-3,
    jnp.dtype(jnp.bfloat16): 1.6e-2,
}


def f64(a) -> np.ndarray:
    """``a`` (any float dtype, bf16 included) as a float64 NumPy array."""
    return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


def assert_close(actual, expected, dtype=None, what: str = ""):
    """Every element of ``actual`` is finite and within `TOL` of float64 ``expected``."""
    dtype = jnp.dtype(actual.dtype if dtype is None else dtype)
    a = np.asarray(jnp.asarray(actual).astype(jnp.float32), np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, (what, a.shape, e.shape)
    assert np.isfinite(a).all(), f"{what}: non-finite elements"
    tol = TOL[dtype]
    np.testing.assert_allclose(a, e, rtol=tol, atol=tol * float(np.max(np.abs(e))), err_msg=what)
