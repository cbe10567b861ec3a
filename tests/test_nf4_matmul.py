"""Tests of pallas_kernels.nf4_matmul against an independent float64 NumPy oracle.

On CPU the Pallas kernels run with ``interpret=True`` (whose output buffers start
as NaN, so a tile the kernel never writes shows up); on a GPU backend the same
tests run the compiled Triton kernels. Shapes are small and reused so that the
interpret-mode compilations stay few (the file runs in well under 3 minutes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.nf4_matmul as nf4_module  # for its private helpers
from kernel_checks import INTERPRET, ON_GPU
from pallas_kernels.dispatch import KERNELS_ENV, resolve_impl
from pallas_kernels.nf4_matmul import (
    nf4_dequantize_pallas,
    nf4_dequantize_reference,
    nf4_gemv_pallas,
    nf4_gemv_t_pallas,
    nf4_matmul,
    nf4_matmul_reference,
)

# The NF4 codebook as the QLoRA paper (App. E) / bitsandbytes list it, typed in
# again here so that the oracle does not share the module's table.
CODE64 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=np.float64)

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


# ---------------------------------------------------------------------------
# Random quantized weights and the float64 oracle
# ---------------------------------------------------------------------------


def make_weight(seed, n, k, blocksize, double_quant, nested_blocksize=256, flat=False):
    """Random bnb-layout NF4 operands (never zero scales) as a kwargs dict."""
    rng = np.random.default_rng(seed)
    numel = n * k
    nblocks = -(-numel // blocksize)
    if flat:
        packed = rng.integers(0, 256, ((numel + 1) // 2,), dtype=np.uint8)
    else:
        packed = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
    absmax_shape = (nblocks,) if flat else (n, k // blocksize)
    w = dict(packed=packed, blocksize=blocksize)
    if double_quant:
        n_nested = -(-nblocks // nested_blocksize)
        w["absmax"] = rng.integers(0, 256, absmax_shape, dtype=np.uint8)
        w["nested_absmax"] = rng.uniform(0.1, 0.5, (n_nested,)).astype(np.float32)
        w["nested_code"] = np.sort(rng.uniform(-1.0, 1.0, 256)).astype(np.float32)
        w["offset"] = np.float32(rng.uniform(0.6, 1.0))  # absmax in (0.1, 1.5)
        w["nested_blocksize"] = nested_blocksize
    else:
        w["absmax"] = rng.uniform(0.25, 2.0, absmax_shape).astype(np.float32)
    return w


def oracle_weight(w, n, k):
    """Float64 W[n, k] straight from the layout's definition (numpy only)."""
    flat = np.asarray(w["packed"]).reshape(-1).astype(np.int64)
    nibbles = np.empty(2 * flat.size, np.int64)
    nibbles[0::2] = flat >> 4    # even flat index: high nibble
    nibbles[1::2] = flat & 0xF   # odd flat index: low nibble
    f = np.arange(n * k)
    absmax = np.asarray(w["absmax"]).reshape(-1)
    if absmax.dtype == np.uint8:
        i = np.arange(absmax.size)
        nbs = w["nested_blocksize"]
        scales = (np.asarray(w["nested_code"], np.float64)[absmax]
                  * np.asarray(w["nested_absmax"], np.float64)[i // nbs]
                  + np.float64(w["offset"]))
    else:
        scales = absmax.astype(np.float64)
    return (CODE64[nibbles[f]] * scales[f // w["blocksize"]]).reshape(n, k)


def make_x(seed, shape, dtype):
    x = jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)
    return x, np.asarray(x.astype(jnp.float32), np.float64)


def assert_matches(got, a64, b64, tol, what):
    """``got ~= a64 @ b64`` elementwise, relative to ``|a64| @ |b64|``.

    Every element must be finite and within ``tol`` (a skipped or stale tile
    fails), and the whole array within ``tol`` in norm.
    """
    got = np.asarray(jnp.asarray(got).astype(jnp.float32), np.float64)
    ref = a64 @ b64
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    assert np.all(np.isfinite(got)), f"{what}: non-finite outputs"
    bound = np.abs(a64) @ np.abs(b64)
    err = np.abs(got - ref) / bound
    worst = np.unravel_index(np.argmax(err), err.shape)
    assert err.max() <= tol, f"{what}: elementwise rel err {err.max():.3g} at {worst}"
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel <= tol, f"{what}: norm rel err {rel:.3g}"


def weight_args(w):
    args = (w["packed"], w["absmax"], w.get("nested_absmax"), w.get("nested_code"),
            w.get("offset"))
    kwargs = dict(blocksize=w["blocksize"])
    if "nested_blocksize" in w:
        kwargs["nested_blocksize"] = w["nested_blocksize"]
    return args, kwargs


def run(x, w, impl, **extra):
    args, kwargs = weight_args(w)
    return nf4_matmul(x, *args, impl=impl, interpret=INTERPRET and impl == "pallas",
                      **kwargs, **extra)


# (x batch shape, N, K, blocksize, double quant, x dtype, nested_blocksize)
CASES = [
    ((1,), 48, 192, 64, False, jnp.float32, 256),
    ((3,), 100, 320, 64, True, jnp.float32, 256),      # 500 blocks: 2 nested entries
    ((16,), 100, 192, 64, False, jnp.bfloat16, 256),
    ((17,), 48, 320, 64, True, jnp.bfloat16, 256),
    ((17,), 100, 384, 128, True, jnp.float32, 64),     # K tile 128, 5 nested entries
    ((5,), 40, 512, 256, True, jnp.float32, 16),       # 2 K tiles per absmax block
    ((16,), 33, 96, 32, False, jnp.bfloat16, 256),     # blocksize 32, K tile 32
    ((2, 3), 100, 192, 64, True, jnp.bfloat16, 256),   # batched x
    ((2, 3), 48, 320, 64, False, jnp.float32, 256),
]
IDS = [f"x{'x'.join(map(str, b))}-N{n}-K{k}-bs{bs}-{'dq' if dq else 'f32abs'}-"
       f"{jnp.dtype(dt).name}" for b, n, k, bs, dq, dt, _ in CASES]


# ---------------------------------------------------------------------------
# Forward and backward against the oracle
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["pallas", "xla"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_matches_oracle(case, impl):
    batch, n, k, bs, dq, dtype, nbs = case
    w = make_weight(1, n, k, bs, dq, nbs)
    x, x64 = make_x(2, (*batch, k), dtype)
    y = run(x, w, impl)
    assert y.shape == (*batch, n) and y.dtype == dtype
    w64 = oracle_weight(w, n, k)
    assert_matches(y.reshape(-1, n), x64.reshape(-1, k), w64.T, TOL[dtype], impl)


@pytest.mark.parametrize("impl", ["pallas", "xla"])
@pytest.mark.parametrize("case", [CASES[i] for i in (1, 3, 5, 6, 7)],
                         ids=[IDS[i] for i in (1, 3, 5, 6, 7)])
def test_grad_x_matches_oracle(case, impl):
    batch, n, k, bs, dq, dtype, nbs = case
    w = make_weight(1, n, k, bs, dq, nbs)
    x, _ = make_x(2, (*batch, k), dtype)
    cot = np.random.default_rng(3).standard_normal((*batch, n)).astype(np.float32)

    def loss(x):
        return jnp.sum(run(x, w, impl).astype(jnp.float32) * cot)

    dx = jax.grad(loss)(x)
    assert dx.shape == x.shape and dx.dtype == dtype
    # jax.grad rounds the cotangent to x.dtype; the oracle uses the exact one.
    w64 = oracle_weight(w, n, k)
    assert_matches(dx.reshape(-1, k), cot.reshape(-1, n).astype(np.float64), w64,
                   TOL[dtype], impl)


# (N, K, blocksize, M, block_n, block_k, splits, mma, x dtype): ragged N, K tiles
# spanning 1 or 2 quantization blocks or inside one, splits that leave the last
# split partly past K (or N), M = 1 on the CUDA cores and M = 3 either way.
GEMV_TILES = [
    (50, 256, 64, 1, 16, 128, 2, None, jnp.float32),
    (50, 320, 64, 3, 16, 64, 2, True, jnp.float32),
    (50, 256, 64, 3, 16, 32, None, False, jnp.float32),
    (33, 512, 128, 17, 16, 256, 2, None, jnp.float32),
    (40, 512, 256, 1, 16, 128, 4, None, jnp.bfloat16),
    (40, 192, 64, 16, 32, 64, 2, None, jnp.bfloat16),
]


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("tiles", GEMV_TILES, ids=lambda t: f"N{t[0]}-K{t[1]}-M{t[3]}")
def test_gemv_tiles_and_splits(tiles, double_quant):
    """Forced small tiles: many programs, ragged N, split-K / split-N partial sums."""
    n, k, bs, m, bn, bk, splits, mma, dtype = tiles
    w = make_weight(4, n, k, bs, double_quant, nested_blocksize=8)
    args = (w["packed"], w["absmax"], jnp.asarray(nf4_module.NF4_CODE))
    if double_quant:
        args += (w["nested_absmax"], w["nested_code"], jnp.float32(w["offset"]))
    kw = dict(blocksize=bs, nested_blocksize=8, interpret=INTERPRET, block_n=bn,
              block_k=bk, splits=splits, mma=mma)
    w64 = oracle_weight(w, n, k)
    x, x64 = make_x(5, (m, k), dtype)
    assert_matches(nf4_gemv_pallas(x, *args, **kw), x64, w64.T, TOL[dtype], "gemv")
    dy, dy64 = make_x(6, (m, n), dtype)
    assert_matches(nf4_gemv_t_pallas(dy, *args, **kw), dy64, w64, TOL[dtype], "gemv_t")


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_kernel_ragged_rows(double_quant):
    """The dequantize kernel with a row tile that leaves the last program half empty."""
    n, k, bs = 50, 192, 64  # 150 blocks, 16-block tiles: 10 programs, the last ragged
    w = make_weight(8, n, k, bs, double_quant, nested_blocksize=8)
    args = (w["packed"], w["absmax"], jnp.asarray(nf4_module.NF4_CODE))
    if double_quant:
        args += (w["nested_absmax"], w["nested_code"], jnp.float32(w["offset"]))
    got = nf4_dequantize_pallas(*args, shape=(n, k), dtype=jnp.float32, blocksize=bs,
                                nested_blocksize=8, interpret=INTERPRET, block_rows=16)
    np.testing.assert_allclose(np.asarray(got, np.float64), oracle_weight(w, n, k),
                               rtol=1e-6, atol=0)


def test_pallas_under_jit_and_in_batch_of_ones():
    n, k, bs = 48, 192, 64  # same shapes as CASES[0]: reuses the compiled kernel
    w = make_weight(1, n, k, bs, False)
    x, x64 = make_x(7, (1, k), jnp.float32)
    args, kwargs = weight_args(w)
    f = jax.jit(lambda x: nf4_matmul(x, *args, impl="pallas", interpret=INTERPRET, **kwargs))
    assert_matches(f(x), x64, oracle_weight(w, n, k).T, 1e-5, "jit")


def test_assert_matches_catches_a_skipped_tile():
    """The harness itself: a zeroed 16x16 tile or one NaN must fail."""
    n, k = 100, 192
    w = make_weight(1, n, k, 64, False)
    x, x64 = make_x(2, (17, k), jnp.float32)
    w64 = oracle_weight(w, n, k)
    good = (x64 @ w64.T).astype(np.float32)
    assert_matches(good, x64, w64.T, 1e-5, "exact")
    bad = good.copy()
    bad[16:, 64:80] = 0.0
    with pytest.raises(AssertionError):
        assert_matches(bad, x64, w64.T, 1e-2, "tile")
    bad = good.copy()
    bad[3, 99] = np.nan
    with pytest.raises(AssertionError):
        assert_matches(bad, x64, w64.T, 1e-2, "nan")


# ---------------------------------------------------------------------------
# Frozen weight: zero cotangents
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["pallas", "xla"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_weight_cotangents_are_zero(impl, double_quant):
    case = CASES[1] if double_quant else CASES[0]  # reuse compiled shapes
    batch, n, k, bs, _, dtype, nbs = case
    w = make_weight(1, n, k, bs, double_quant, nbs)
    x, _ = make_x(2, (*batch, k), dtype)
    args, kwargs = weight_args(w)
    args = tuple(None if a is None else jnp.asarray(a) for a in args)
    live = [i for i, a in enumerate(args) if a is not None]

    def f(x, *weights):
        full = list(args)
        for i, a in zip(live, weights):
            full[i] = a
        return nf4_matmul(x, *full, impl=impl, interpret=INTERPRET and impl == "pallas",
                          **kwargs)

    y, vjp = jax.vjp(f, x, *(args[i] for i in live))
    cts = vjp(jnp.ones_like(y))
    assert np.any(np.asarray(cts[0]) != 0)
    for i, ct in zip(live, cts[1:]):
        if jnp.issubdtype(args[i].dtype, jnp.integer):
            assert ct.dtype == jax.dtypes.float0, (i, ct.dtype)
        else:
            assert ct.dtype == args[i].dtype and not np.any(np.asarray(ct)), i
    if not double_quant:  # jax.grad w.r.t. the float absmax is exactly zero
        g = jax.grad(lambda a: jnp.sum(f(x, args[0], a)))(args[1])
        assert not np.any(np.asarray(g))


# ---------------------------------------------------------------------------
# Reference dequantize on bnb's flat layout (any N*K) and the XLA path
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True])
def test_reference_dequantize_flat_ragged(double_quant):
    n, k, bs = 7, 45, 32  # 315 elements: odd count, ragged last block, K % bs != 0
    w = make_weight(8, n, k, bs, double_quant, nested_blocksize=4, flat=True)
    args, kwargs = weight_args(w)
    w64 = oracle_weight(w, n, k)
    for packed in (w["packed"], w["packed"].reshape(-1, 1)):  # bnb saves [(N*K+1)//2, 1]
        got = nf4_dequantize_reference(packed, *args[1:], shape=(n, k), **kwargs)
        assert got.shape == (n, k) and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), w64, rtol=1e-6, atol=0)
    x, x64 = make_x(9, (3, k), jnp.float32)
    y = nf4_matmul(x, w["packed"].reshape(-1, 1), *args[1:], impl="xla", **kwargs)
    assert_matches(y, x64, w64.T, 1e-5, "xla flat")
    y = nf4_matmul_reference(x, *args, **kwargs)  # N inferred from the flat size
    assert_matches(y, x64, w64.T, 1e-5, "reference flat")


def test_reference_dequantize_matches_2d_layout():
    n, k, bs = 48, 192, 64
    w = make_weight(1, n, k, bs, True)
    args, kwargs = weight_args(w)
    got = nf4_dequantize_reference(*args, shape=(n, k), **kwargs)
    np.testing.assert_allclose(np.asarray(got), oracle_weight(w, n, k), rtol=1e-6)


# ---------------------------------------------------------------------------
# Dispatch and errors
# ---------------------------------------------------------------------------


def test_impl_resolution(monkeypatch):
    """`pallas_kernels.dispatch.resolve_impl`, the rule every op shares."""
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    assert resolve_impl(None, False) == ("pallas" if ON_GPU else "xla")
    assert resolve_impl("auto") == ("pallas" if ON_GPU else "xla")
    assert resolve_impl("auto", True) == "pallas"
    assert resolve_impl("xla", True) == "xla"
    monkeypatch.setenv(KERNELS_ENV, "xla")
    assert resolve_impl(None, False) == "xla"
    assert resolve_impl("auto", True) == "xla"  # the variable beats interpret
    assert resolve_impl("pallas", False) == "pallas"  # explicit beats the variable
    monkeypatch.setenv(KERNELS_ENV, "pallas")
    assert resolve_impl("auto", False) == "pallas"
    assert resolve_impl(None) == "pallas"
    assert resolve_impl("xla") == "xla"
    monkeypatch.setenv(KERNELS_ENV, "triton")
    with pytest.raises(ValueError, match="JAXQLORA_KERNELS"):
        resolve_impl(None, False)
    with pytest.raises(ValueError, match="impl"):
        resolve_impl("cuda", False)


def test_env_variable_selects_xla_path(monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, "xla")
    n, k, bs = 48, 192, 64
    w = make_weight(1, n, k, bs, False)
    x, x64 = make_x(2, (2, k), jnp.float32)
    called = []
    monkeypatch.setattr(nf4_module, "nf4_matmul_pallas",
                        lambda *a, **kw: called.append(1))
    args, kwargs = weight_args(w)
    # interpret=True: without the variable, auto would pick the Pallas path on any backend.
    y = nf4_matmul(x, *args, impl=None, interpret=True, **kwargs)
    assert not called
    assert_matches(y, x64, oracle_weight(w, n, k).T, 1e-5, "env xla")


def test_errors():
    n, k, bs = 48, 192, 64
    w = make_weight(1, n, k, bs, True)
    x = jnp.ones((2, k), jnp.float32)
    p, a, na, nc, off = w["packed"], w["absmax"], w["nested_absmax"], w["nested_code"], w["offset"]

    def call(*args, impl="pallas", **kw):
        return nf4_matmul(*args, impl=impl, interpret=True, **kw)

    # K % blocksize != 0 on the pallas path (K = 96, blocksize 64).
    w96 = make_weight(1, n, 96, 64, False, flat=True)
    with pytest.raises(ValueError, match="blocksize"):
        call(jnp.ones((2, 96)), w96["packed"].reshape(n, 48), w96["absmax"])
    # ... is fine on the xla path (ragged blocks).
    y = call(jnp.ones((2, 96)), w96["packed"].reshape(n, 48), w96["absmax"], impl="xla")
    assert y.shape == (2, n)
    with pytest.raises(ValueError, match="blocksize"):
        call(x, p, a, na, nc, off, blocksize=48)  # not a power of two (pallas)
    with pytest.raises(ValueError, match="blocksize"):
        call(x, p, a, na, nc, off, blocksize=63)
    with pytest.raises(ValueError, match="packed"):
        call(jnp.ones((2, k + 2)), p, a, na, nc, off)
    with pytest.raises(TypeError, match="packed"):
        call(x, p.astype(np.int32), a, na, nc, off)
    with pytest.raises(ValueError, match="absmax"):
        call(x, p, a[:, :-1], na, nc, off)
    with pytest.raises(ValueError, match="nested_absmax"):
        call(x, p, a)
    with pytest.raises(ValueError, match="nested_absmax"):
        call(x, p, a, na[:0], nc, off)
    with pytest.raises(ValueError, match="nested_code"):
        call(x, p, a, na, nc[:16], off)
    with pytest.raises(ValueError, match="offset"):
        call(x, p, a, na, nc, np.ones(2, np.float32))
    with pytest.raises(ValueError, match="nested_absmax"):
        call(x, p, make_weight(1, n, k, bs, False)["absmax"], na, nc, off)
    with pytest.raises(ValueError, match="code"):
        call(x, p, a, na, nc, off, code=np.zeros(8, np.float32))
    with pytest.raises(TypeError, match="x"):
        call(x.astype(jnp.int32), p, a, na, nc, off)
    with pytest.raises(ValueError, match="impl"):
        call(x, p, a, na, nc, off, impl="cuda")
    if not ON_GPU:
        with pytest.raises(ValueError, match="interpret"):
            nf4_matmul(x, p, a, na, nc, off, impl="pallas")


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("double_quant", [False, True])
def test_stacked_weights_with_layer_index(m, double_quant):
    """``layer`` picks one of L stacked weights (a scanned decoder's layers): the GEMV
    (M <= 16) and the dequantize kernel of larger M read it in place; both match the
    float64 oracle of that layer, ragged N, and the gradient in x goes through the same
    layer (larger M: the dequantize kernel in place again)."""
    n, k, bs, layers, pick = 40, 256, 64, 3, 1
    ws = [make_weight(20 + i, n, k, bs, double_quant, nested_blocksize=8) for i in range(layers)]
    stack = {key: np.stack([np.asarray(w[key]) for w in ws]) for key in ("packed", "absmax")}
    kw = dict(blocksize=bs, impl="pallas", interpret=INTERPRET)
    if double_quant:
        stack.update({key: np.stack([np.asarray(w[key]) for w in ws])
                      for key in ("nested_absmax", "nested_code", "offset")})
        kw["nested_blocksize"] = 8
    x, x64 = make_x(7, (m, k), jnp.float32)
    w64 = oracle_weight(ws[pick], n, k)
    y = nf4_matmul(x, **stack, **kw, layer=jnp.int32(pick))
    assert_matches(y, x64, w64.T, TOL[jnp.float32], "stacked forward")
    dy, dy64 = make_x(8, (m, n), jnp.float32)
    dx = jax.vjp(lambda x: nf4_matmul(x, **stack, **kw, layer=jnp.int32(pick)), x)[1](dy)[0]
    assert_matches(dx, dy64, w64, TOL[jnp.float32], "stacked dx")
    y_xla = nf4_matmul(x, **stack, **dict(kw, impl="xla"), layer=jnp.int32(pick))
    assert_matches(y_xla, x64, w64.T, TOL[jnp.float32], "stacked xla path")
