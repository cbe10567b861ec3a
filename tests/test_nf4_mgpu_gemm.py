"""The Mosaic GPU NF4 GEMM for large M (`pallas_kernels.nf4_mgpu_gemm`) against float64.

The kernels run only on a Hopper GPU (Mosaic GPU has no CPU interpreter for TMA
pipelines): those tests are skipped elsewhere and run on the H100/H200 through the device
tool (``python -m pytest -q tests/test_nf4_mgpu_gemm.py``). On a CPU machine (< 30 s) the
plain-jnp references are checked against float64 NumPy at ragged shapes, both kernels are
lowered for CUDA (layouts, the inline PTX, the pipeline), and the shape checks and
`nf4_mgpu_gemm_supported` are exercised on a faked Hopper.

Every weight is fresh random: random bnb bytes with random absmax, or a real
double-quantized `jaxqlora.nf4.quantize_nf4` of a random matrix; activations are random
normal (never zeros), so a decode or layout error cannot hide behind zeros.
"""

from __future__ import annotations

import ml_dtypes
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.nf4_mgpu import nf4_kernel_codes, nf4_kernel_scale
from pallas_kernels.nf4_mgpu_gemm import (
    nf4_kernel_scale_f32,
    nf4_mgpu_gemm,
    nf4_mgpu_gemm_reference,
    nf4_mgpu_gemm_reference_t,
    nf4_mgpu_gemm_supported,
    nf4_mgpu_gemm_t,
)

#: bitsandbytes' NF4 codebook (``bitsandbytes.functional.get_4bit_type('nf4')``, QLoRA
#: App. E), written out here as the independent reference.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0])

ON_HOPPER = nf4_mgpu_gemm_supported(128, 64, 64, 64, jnp.bfloat16)
BF16 = ml_dtypes.bfloat16


def bf16(a):
    """Round float64 to bfloat16 (round to nearest even) and back to float64."""
    return np.asarray(a, np.float64).astype(np.float32).astype(BF16).astype(np.float64)


def random_weight(rng, n, k, *, layers=None, blocksize=64, double_quant=False):
    """bnb packed bytes ``[(L,) N, K // 2]`` and the float32 absmax ``[(L,) N, K // bs]``:
    random bytes and scales, or (``double_quant``) a real double-quantized weight."""
    if double_quant:
        from jaxqlora.nf4 import absmax_float32, quantize_nf4

        ps, as_ = [], []
        for _ in range(layers or 1):
            q = quantize_nf4(jnp.asarray(rng.standard_normal((n, k)) * 0.02, jnp.float32),
                             blocksize=blocksize, double_quant=True)
            ps.append(np.asarray(q.packed).reshape(n, k // 2))
            as_.append(np.asarray(absmax_float32(q)).reshape(n, k // blocksize))
        packed, absmax = np.stack(ps), np.stack(as_)
        return (packed, absmax) if layers else (packed[0], absmax[0])
    lead = () if layers is None else (layers,)
    packed = rng.integers(0, 256, (*lead, n, k // 2), dtype=np.uint8)
    absmax = rng.uniform(0.01, 0.1, (*lead, n, k // blocksize)).astype(np.float32)
    return packed, absmax


def kernel_weight64(packed, absmax, blocksize=64):
    """float64 ``W [N, K]`` by the kernels' rule, from bnb bytes (element 2i in the HIGH
    nibble): ``bf16(bf16(NF4[code]) * bf16(absmax))`` (the product of two bfloat16 values
    is exact in float64, then rounded once, as ``fma.rn.bf16x2`` does)."""
    n, kh = packed.shape
    codes = np.stack([packed >> 4, packed & 15], axis=-1).reshape(n, 2 * kh)
    scale = bf16(np.repeat(absmax.astype(np.float64), blocksize, axis=1))
    return bf16(bf16(NF4)[codes] * scale)


def exact_weight64(packed, absmax, blocksize=64):
    """float64 ``W [N, K]`` by the exact rule (float32 scales): ``bf16(NF4[code] * absmax)``
    of float32 operands, the product rounded to float32 and then to bfloat16 (bnb's
    ``dequantize_4bit`` to bfloat16)."""
    n, kh = packed.shape
    codes = np.stack([packed >> 4, packed & 15], axis=-1).reshape(n, 2 * kh)
    prod = NF4.astype(np.float32)[codes] * np.repeat(absmax.astype(np.float32), blocksize, axis=1)
    return prod.astype(np.float32).astype(BF16).astype(np.float64)


def bnb_weight64(packed, absmax, blocksize=64):
    """float64 ``NF4[code] * absmax``: bitsandbytes' dequantized weight before rounding."""
    n, kh = packed.shape
    codes = np.stack([packed >> 4, packed & 15], axis=-1).reshape(n, 2 * kh)
    return NF4[codes] * np.repeat(absmax.astype(np.float64), blocksize, axis=1)


def assert_close(got, a64, w64, *, transposed=False, out_bf16=False):
    """``got`` against float64 ``a64 @ W.T`` (``a64 @ W`` transposed): within float32
    accumulation error, elementwise ``2**-16 * (|a| @ |W|)`` (the products are exact; the
    tensor cores' float32 additions, even if truncating, stay near ``sqrt(K) / 16 * 2**-23``
    of that sum, about 2**-20 at K = 14336; a W rounded by another rule, 2**-8 per element
    at random, would miss by about ``2**-8 / sqrt(K)``, 2**-15), plus one bfloat16 rounding
    (2**-8 relative) when the output is bfloat16."""
    w = w64 if transposed else w64.T
    want = a64 @ w
    bound = 2.0 ** -16 * (np.abs(a64) @ np.abs(w)) + 1e-30
    if out_bf16:
        bound = bound + 2.0 ** -8 * np.abs(want)
    got = np.asarray(jnp.asarray(got).astype(jnp.float32), np.float64)
    assert got.shape == want.shape
    assert np.isfinite(got).all()
    err = np.abs(got - want)
    assert (err <= bound).all(), (float((err / bound).max()), np.argwhere(err > bound)[:5])


# ---------------------------------------------------------------------------
# CPU: references, shape checks, CUDA lowering
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("m,n,k,blocksize,double_quant", [
    (70, 200, 320, 64, False),     # ragged M and N (N not a multiple of 64)
    (129, 136, 512, 128, False),   # blocksize 128 (a scale repeated over two 64-blocks)
    (64, 136, 256, 64, True),      # a real double-quantized weight
])
def test_references_match_float64(m, n, k, blocksize, double_quant):
    """Both references equal float64 products of the kernel's bfloat16 W (to float32
    accumulation), and that W is bnb's exact dequantized weight to within three bfloat16
    roundings (code, scale, product: 3 * 2**-8 relative)."""
    rng = np.random.default_rng()
    packed, absmax = random_weight(rng, n, k, blocksize=blocksize, double_quant=double_quant)
    scale = nf4_kernel_scale(jnp.asarray(absmax), n, k, blocksize)
    w64 = kernel_weight64(packed, absmax, blocksize)
    bnb = bnb_weight64(packed, absmax, blocksize)
    assert np.all(np.abs(w64 - bnb) <= 3 * 2.0 ** -8 * np.abs(bnb))
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    dy64 = np.asarray(dy.astype(jnp.float32), np.float64)
    assert_close(nf4_mgpu_gemm_reference(x, jnp.asarray(packed), scale), x64, w64)
    assert_close(nf4_mgpu_gemm_reference_t(dy, jnp.asarray(packed), scale), dy64, w64,
                 transposed=True)


# ---------------------------------------------------------------------------
# The decode's inline PTX, run by a small interpreter (its instructions only)
# ---------------------------------------------------------------------------


def _prmt(a, b, c):
    """``prmt.b32`` (default mode): byte i of the result is byte ``c[4i:4i+3]`` of the
    8-byte pool ``b:a``, its sign replicated when bit ``4i + 3`` of ``c`` is set."""
    pool = (a & 0xFFFFFFFF) | ((b & 0xFFFFFFFF) << 32)
    out = 0
    for i in range(4):
        s = (c >> (4 * i)) & 0xF
        byte = (pool >> (8 * (s & 7))) & 0xFF
        if s & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _f32(bits):
    return np.array([bits & 0xFFFFFFFF], np.uint32).view(np.float32)[0]


def _bits(x):
    return int(np.array([x], np.float32).view(np.uint32)[0])


def _bf16_bits(x):
    return int(np.array([x], np.float32).astype(BF16).view(np.uint16)[0])


def run_ptx(asm: str, args: dict) -> dict:
    """Run the inline-PTX block ``asm`` (operands ``$i`` given as 32-bit ints in ``args``)
    and return every ``$i`` register after it: the subset of PTX the decode uses."""
    regs = {f"${i}": v for i, v in args.items()}

    def val(tok):
        return regs[tok] if tok in regs else int(tok, 0)

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg") or line.startswith("//"):
            continue
        op, rest = line.split(None, 1)
        d, *src = [t.strip() for t in rest.split(",")]
        v = [val(t) for t in src]
        if op == "and.b32":
            r = v[0] & v[1]
        elif op == "or.b32":
            r = v[0] | v[1]
        elif op == "shr.u32":
            r = (v[0] & 0xFFFFFFFF) >> v[1]
        elif op == "mov.b32":
            r = v[0]
        elif op == "prmt.b32":
            r = _prmt(*v)
        elif op == "mul.rn.f32":
            r = _bits(np.float32(_f32(v[0])) * np.float32(_f32(v[1])))
        elif op == "cvt.rn.bf16x2.f32":  # a -> upper half, b -> lower half
            r = (_bf16_bits(_f32(v[0])) << 16) | _bf16_bits(_f32(v[1]))
        elif op == "fma.rn.bf16x2":  # per half: bf16(a * b + c), the product exact in f32
            r = 0
            for h in range(2):
                a, b, c = (np.array([(x >> (16 * h)) & 0xFFFF], np.uint16).view(BF16)[0]
                           .astype(np.float32) for x in v)
                r |= _bf16_bits(np.float32(a * b + c)) << (16 * h)
        else:
            raise NotImplementedError(op)
        regs[d] = r & 0xFFFFFFFF
    return regs


def _pair(word):
    """An i32 of two bfloat16 -> float32 (low half, high half)."""
    return tuple(np.array([(word >> s) & 0xFFFF], np.uint16).view(BF16)[0].astype(np.float32)
                 for s in (0, 16))


def test_exact_decode_ptx_rounds_like_bnb():
    """The float32-scale decode (`_ASM8_EXACT` on `nf4_kernel_codes` words, `_ASM_EXACT` on
    bnb bytes), run instruction by instruction: every weight is ``bf16(NF4[code] * absmax)``
    of float32 operands, bit for bit what bnb's dequantize rounds to bfloat16."""
    from pallas_kernels.nf4_mgpu_gemm import _ASM8_EXACT, _ASM_EXACT

    rng = np.random.default_rng()
    nf4 = NF4.astype(np.float32)
    want = lambda code, a: _bf16_bits(np.float32(nf4[code] * np.float32(a)))  # noqa: E731
    scales = [np.float32(v) for v in rng.uniform(1e-3, 0.2, 24)] + [np.float32(1.0)]
    for a in scales:
        for _ in range(4):
            codes = rng.integers(0, 16, 8)
            word = int(sum(int(c) << (4 * i) for i, c in enumerate(codes)))
            out = run_ptx(_ASM8_EXACT, {4: word, 5: _bits(a)})
            got = [(out[f"${t}"] >> (16 * h)) & 0xFFFF for t in range(4) for h in range(2)]
            assert got == [want(c, a) for c in codes]
        for byte_a, byte_b in rng.integers(0, 256, (4, 2)):
            b_scale = np.float32(a * 0.75)
            out = run_ptx(_ASM_EXACT, {2: int(byte_a) | int(byte_b) << 8, 3: _bits(a),
                                       4: _bits(b_scale)})
            for reg, byte, sc in (("$0", byte_a, a), ("$1", byte_b, b_scale)):
                lo, hi = out[reg] & 0xFFFF, out[reg] >> 16  # bnb element 2i: the high nibble
                assert (lo, hi) == (want(byte >> 4, sc), want(byte & 15, sc))
    # all 16 codes, exhaustively, at one scale
    word_lo, word_hi = int("76543210", 16), int("fedcba98", 16)
    for word, base in ((word_lo, 0), (word_hi, 8)):
        out = run_ptx(_ASM8_EXACT, {4: word, 5: _bits(np.float32(0.0371))})
        got = [(out[f"${t}"] >> (16 * h)) & 0xFFFF for t in range(4) for h in range(2)]
        assert got == [want(base + c, np.float32(0.0371)) for c in range(8)]


def test_bf16_decode_ptx_matches_reference_rule():
    """`nf4_mgpu`'s bfloat16-scale decode (`_ASM8`), run instruction by instruction:
    ``bf16(bf16(NF4[code]) * scale)``, the rule of `nf4_mgpu_gemm_reference`."""
    from pallas_kernels.nf4_mgpu import _ASM8

    rng = np.random.default_rng()
    for a in rng.uniform(1e-3, 0.2, 8):
        s16 = _bf16_bits(np.float32(a))
        codes = rng.integers(0, 16, 8)
        word = int(sum(int(c) << (4 * i) for i, c in enumerate(codes)))
        out = run_ptx(_ASM8, {4: word, 5: s16 | s16 << 16})
        got = [v for t in range(4) for v in _pair(out[f"${t}"])]
        sb = np.float32(bf16(a))
        want = [np.float32(bf16(np.float64(np.float32(bf16(NF4[c])) * sb))) for c in codes]
        assert got == want


@pytest.mark.parametrize("double_quant", [False, True])
def test_exact_reference_is_the_dequantize_path(double_quant):
    """With float32 scales (`nf4_kernel_scale_f32`) the reference's W is, bit for bit,
    today's large-M path's bfloat16 W (`nf4_dequantize_reference` rounded to bfloat16),
    and the references equal float64 products of it."""
    from pallas_kernels.nf4_matmul import nf4_dequantize_reference
    from pallas_kernels.nf4_mgpu_gemm import _gemm_weight

    rng = np.random.default_rng()
    n, k, m = 136, 256, 70
    packed, absmax = random_weight(rng, n, k, double_quant=double_quant)
    scale = nf4_kernel_scale_f32(jnp.asarray(absmax), n, k, 64)
    assert scale.dtype == jnp.float32 and scale.shape == (k // 64, n)
    w = np.asarray(_gemm_weight(jnp.asarray(packed), scale))
    today = np.asarray(nf4_dequantize_reference(jnp.asarray(packed), jnp.asarray(absmax),
                                                shape=(n, k)).astype(jnp.bfloat16)
                       .astype(jnp.float32))
    assert np.array_equal(w.view(np.uint32), today.view(np.uint32))
    w64 = exact_weight64(packed, absmax)
    assert np.array_equal(w64, today.astype(np.float64))
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    assert_close(nf4_mgpu_gemm_reference(x, jnp.asarray(packed), scale),
                 np.asarray(x.astype(jnp.float32), np.float64), w64)
    assert_close(nf4_mgpu_gemm_reference_t(dy, jnp.asarray(packed), scale),
                 np.asarray(dy.astype(jnp.float32), np.float64), w64, transposed=True)


def _args(fn, m, n, k, layers=None):
    lead = () if layers is None else (layers,)
    a = (m, k) if fn is nf4_mgpu_gemm else (m, n)
    args = [jax.ShapeDtypeStruct(a, jnp.bfloat16),
            jax.ShapeDtypeStruct((*lead, n, k // 2), jnp.uint8),
            jax.ShapeDtypeStruct((*lead, k // 64, n), jnp.bfloat16)]
    if layers is not None:
        args.append(jnp.int32(layers - 1))
    return args


def _mosaic_calls(text: str) -> int:
    return text.count('stablehlo.custom_call @mosaic_gpu')


@pytest.mark.parametrize("fn", [nf4_mgpu_gemm, nf4_mgpu_gemm_t], ids=["fwd", "t"])
@pytest.mark.parametrize("m,n,k,layers,kw", [
    (4096, 4096, 4096, None, {}),                    # 8B q/o: the default tiles, no slice
    (512, 14336, 4096, None, dict(in_flight=0, stages=2)),  # 8B gate/up
    (512, 4096, 14336, None, dict(out_dtype=jnp.float32)),  # 8B down
    (200, 200, 320, 3, {}),                          # ragged M, N (padded, sliced), stacked
    (77, 72, 192, None, dict(block_m=64)),           # M not a multiple of 8, one M tile of 64
    (256, 512, 64, None, {}),                        # one K step: in_flight off
])
def test_lowers_for_cuda(fn, m, n, k, layers, kw):
    """Forward and transposed kernels are built for CUDA without a GPU (Mosaic GPU's
    lowering: TMA pipeline, int4 layouts, the decode's inline PTX, wgmma, epilogue)."""
    args = _args(fn, m, n, k, layers)
    f = lambda *a: fn(*a, **kw)  # noqa: E731
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert _mosaic_calls(text) == 1
    out = jax.eval_shape(f, *args)
    want = (m, n) if fn is nf4_mgpu_gemm else (m, k)
    assert out.shape == want and out.dtype == kw.get("out_dtype", jnp.bfloat16)


@pytest.mark.parametrize("fn", [nf4_mgpu_gemm, nf4_mgpu_gemm_t], ids=["fwd", "t"])
@pytest.mark.parametrize("m,n,k,layers", [(4096, 4096, 4096, None), (200, 200, 320, 3)])
def test_words_lower_for_cuda(fn, m, n, k, layers):
    """The codes in `nf4_kernel_codes`' uint32 layout (decoded without shuffles)."""
    args = _args(fn, m, n, k, layers)
    args[1] = jax.ShapeDtypeStruct(args[1].shape[:-1] + (k // 8,), jnp.uint32)
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert _mosaic_calls(text) == 1
    assert jax.eval_shape(fn, *args).shape == ((m, n) if fn is nf4_mgpu_gemm else (m, k))


@pytest.mark.parametrize("fn", [nf4_mgpu_gemm, nf4_mgpu_gemm_t], ids=["fwd", "t"])
@pytest.mark.parametrize("m,n,k,layers,words,kw", [
    (4096, 4096, 4096, None, False, {}),
    (300, 264, 384, 2, True, {}),                        # ragged M, N; stacked; words
    (1024, 1024, 4096, None, False, dict(out_dtype=jnp.float32, stages=2)),
])
def test_two_warpgroups_lower_for_cuda(fn, m, n, k, layers, words, kw):
    """``block_m=256``: two compute warpgroups sharing each decoded tile through an
    mbarrier, a third issuing the TMA copies (warp-specialized pipeline)."""
    args = _args(fn, m, n, k, layers)
    if words:
        args[1] = jax.ShapeDtypeStruct(args[1].shape[:-1] + (k // 8,), jnp.uint32)
    f = lambda *a: fn(*a, block_m=256, **kw)  # noqa: E731
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert _mosaic_calls(text) == 1
    out = jax.eval_shape(f, *args)
    assert out.shape == ((m, n) if fn is nf4_mgpu_gemm else (m, k))
    assert out.dtype == kw.get("out_dtype", jnp.bfloat16)


@pytest.mark.parametrize("fn", [nf4_mgpu_gemm, nf4_mgpu_gemm_t], ids=["fwd", "t"])
@pytest.mark.parametrize("words,block_m", [(False, 128), (True, 256)])
def test_exact_lowers_for_cuda(fn, words, block_m):
    """Float32 scales (the exact decode) with bnb bytes and with words, one and two
    compute warpgroups, ragged and stacked."""
    m, n, k, layers = 300, 264, 384, 2
    args = _args(fn, m, n, k, layers)
    if words:
        args[1] = jax.ShapeDtypeStruct(args[1].shape[:-1] + (k // 8,), jnp.uint32)
    args[2] = jax.ShapeDtypeStruct(args[2].shape, jnp.float32)
    f = lambda *a: fn(*a, block_m=block_m)  # noqa: E731
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert _mosaic_calls(text) == 1
    assert jax.eval_shape(f, *args).shape == ((m, n) if fn is nf4_mgpu_gemm else (m, k))


def test_wide_tiles_lower_for_cuda():
    """The other wgmma shapes: block_m 64 with 256 rows of W (forward) or 256 columns of
    dx (transposed)."""
    for fn, kw in ((nf4_mgpu_gemm, dict(block_m=64, block_n=256)),
                   (nf4_mgpu_gemm_t, dict(block_m=64, block_k=256))):
        f = lambda *a, fn=fn, kw=kw: fn(*a, **kw)  # noqa: E731
        text = jax.jit(f).trace(*_args(fn, 512, 4096, 4096)).lower(
            lowering_platforms=("cuda",)).as_text()
        assert _mosaic_calls(text) == 1


def test_default_tile():
    """The default output-column tile for Llama-3-8B shapes: 128 where that gives at least
    two programs per SM of a 132-SM GPU, else 64; always 128 with two warpgroups."""
    from pallas_kernels.nf4_mgpu_gemm import _default_tile

    assert _default_tile(4096, 4096, 128) == 128      # 32 x 32 programs
    assert _default_tile(2048, 14336, 128) == 128
    assert _default_tile(512, 14336, 128) == 128      # 4 x 112
    assert _default_tile(512, 4096, 128) == 64        # 4 x 32 = 128 -> 4 x 64
    assert _default_tile(512, 1024, 128) == 64
    assert _default_tile(512, 4096, 256) == 128


@pytest.mark.parametrize("fn,args,kw,match", [
    (nf4_mgpu_gemm, ((8, 100), (16, 50), (1, 16)), {}, "multiple of 64"),
    (nf4_mgpu_gemm, ((8, 128), (12, 64), (2, 12)), {}, "N=12"),
    (nf4_mgpu_gemm, ((8, 128), (16, 64), (2, 8)), {}, "disagree"),
    (nf4_mgpu_gemm, ((8, 128), (16, 64), (2, 16)), dict(block_m=32), "block_m"),
    (nf4_mgpu_gemm, ((8, 128), (16, 64), (2, 16)), dict(block_n=12), "block_n"),
    (nf4_mgpu_gemm, ((8, 128), (16, 64), (2, 16)), dict(in_flight=2), "in_flight"),
    (nf4_mgpu_gemm_t, ((8, 16), (16, 64), (2, 16)), dict(block_k=96), "block_k"),
    (nf4_mgpu_gemm_t, ((8, 16), (16, 160), (5, 16)), dict(block_k=128), "divide K"),
    (nf4_mgpu_gemm, ((8, 128), (256, 64), (2, 256)), dict(block_m=256, block_n=256), "block_n"),
    (nf4_mgpu_gemm_t, ((8, 16), (16, 128), (4, 16)), dict(block_m=256, block_k=256), "block_k"),
    (nf4_mgpu_gemm_t, ((8, 24), (16, 64), (2, 16)), {}, "disagree"),
])
def test_rejects_bad_shapes(fn, args, kw, match):
    a, p, s = args
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda *z: fn(*z, **kw), jax.ShapeDtypeStruct(a, jnp.bfloat16),
                       jax.ShapeDtypeStruct(p, jnp.uint8), jax.ShapeDtypeStruct(s, jnp.bfloat16))


def test_rejects_words_with_partial_slabs():
    with pytest.raises(ValueError, match="block_n"):
        jax.eval_shape(lambda *a: nf4_mgpu_gemm(*a, block_n=96),
                       jax.ShapeDtypeStruct((8, 128), jnp.bfloat16),
                       jax.ShapeDtypeStruct((192, 16), jnp.uint32),
                       jax.ShapeDtypeStruct((2, 192), jnp.bfloat16))


def test_rejects_float32_activations():
    with pytest.raises(ValueError, match="bfloat16"):
        jax.eval_shape(nf4_mgpu_gemm, jax.ShapeDtypeStruct((8, 128), jnp.float32),
                       jax.ShapeDtypeStruct((16, 64), jnp.uint8),
                       jax.ShapeDtypeStruct((2, 16), jnp.bfloat16))


class _FakeDevice:
    platform = "gpu"

    def __init__(self, cc):
        self.compute_capability = cc


@pytest.mark.parametrize("cc,args,want", [
    ("9.0", (4096, 4096, 4096, 64, jnp.bfloat16), True),
    ("9.0", (512, 1024, 14336, 64, jnp.bfloat16), True),
    ("9.0", (77, 200, 320, 128, jnp.bfloat16), True),
    ("8.0", (4096, 4096, 4096, 64, jnp.bfloat16), False),   # Ampere
    ("9.0", (4096, 4096, 4000, 64, jnp.bfloat16), False),   # K not a multiple of 64
    ("9.0", (4096, 4100, 4096, 64, jnp.bfloat16), False),   # N not a multiple of 8
    ("9.0", (4096, 4096, 4096, 32, jnp.bfloat16), False),   # blocksize 32
    ("9.0", (4096, 4096, 4096, 64, jnp.float32), False),    # float32 activations
])
def test_supported_on_faked_hopper(monkeypatch, cc, args, want):
    monkeypatch.setattr(jax, "devices", lambda *a: [_FakeDevice(cc)])
    assert nf4_mgpu_gemm_supported(*args) is want


def _fake_gemm_hopper(monkeypatch):
    """Make `nf4_matmul` take its Mosaic GEMM path on this machine (tracing and CUDA
    lowering only): a GPU default backend and the real `nf4_mgpu_gemm_supported` checks on
    a faked Hopper."""
    from pallas_kernels import dispatch, nf4_matmul as op

    monkeypatch.delenv(dispatch.KERNELS_ENV, raising=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    real = op.nf4_mgpu_gemm_supported

    def on_hopper(*args):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(jax, "devices", lambda *a: [_FakeDevice("9.0")])
            return real(*args)

    monkeypatch.setattr(op, "nf4_mgpu_gemm_supported", on_hopper)


@pytest.mark.parametrize("m,n,k,layers,dq,words", [
    (4096, 4096, 4096, None, False, False),   # 8B q/o
    (65, 14336, 4096, 3, True, False),        # just past the GEMV's M, stacked, double quant
    (512, 4096, 14336, None, False, True),    # 8B down, the forward on kernel_codes words
])
def test_nf4_matmul_takes_the_gemm_on_faked_hopper(monkeypatch, m, n, k, layers, dq, words):
    """With ``MGPU_GEMM`` on, `nf4_matmul` forward and backward (bfloat16, M > MGPU_MAX_M, a
    weight >= MGPU_MIN_WEIGHT, stacked layers, double quantization) lower to the two Mosaic
    GEMMs and no dequantize kernel on a (faked) Hopper; with it off (the default), float32
    ``x`` or M <= MGPU_MAX_M they do not."""
    from pallas_kernels import nf4_matmul as op

    _fake_gemm_hopper(monkeypatch)
    monkeypatch.setattr(op, "MGPU_GEMM", True)
    lead = () if layers is None else (layers,)
    nb = n * k // 64
    w = dict(packed=jax.ShapeDtypeStruct((*lead, n, k // 2), jnp.uint8))
    if dq:
        w |= dict(absmax=jax.ShapeDtypeStruct((*lead, n, k // 64), jnp.uint8),
                  nested_absmax=jax.ShapeDtypeStruct((*lead, -(-nb // 256)), jnp.float32),
                  nested_code=jax.ShapeDtypeStruct((*lead, 256), jnp.float32),
                  offset=jax.ShapeDtypeStruct(lead, jnp.float32))
    else:
        w["absmax"] = jax.ShapeDtypeStruct((*lead, n, k // 64), jnp.float32)
    if words:
        w["kernel_codes"] = jax.ShapeDtypeStruct((*lead, n, k // 8), jnp.uint32)
    layer = None if layers is None else jnp.int32(layers - 1)

    def lowered(m, dtype=jnp.bfloat16):
        def grad(x, dy, w):
            y, vjp = jax.vjp(lambda x: op.nf4_matmul(x, **w, layer=layer, impl="pallas"), x)
            return y, vjp(dy)[0]

        return jax.jit(grad).trace(jax.ShapeDtypeStruct((m, k), dtype),
                                   jax.ShapeDtypeStruct((m, n), dtype), w).lower(
            lowering_platforms=("cuda",)).as_text()

    text = lowered(m)
    assert _mosaic_calls(text) == 2 and "nf4_dequantize" not in text
    monkeypatch.setattr(op, "MGPU_GEMM", False)
    text = lowered(m)
    assert _mosaic_calls(text) == 0 and "nf4_dequantize" in text
    monkeypatch.setattr(op, "MGPU_GEMM", True)
    assert _mosaic_calls(lowered(m, jnp.float32)) == 0
    text = lowered(op.MGPU_MAX_M)  # no kernel_scale: the dequantize path at this M
    assert _mosaic_calls(text) == 0 and "nf4_dequantize" in text


def test_nf4_matmul_gemm_scale_is_the_dequantize_path():
    """The float32 scales `nf4_matmul` hands the GEMM (its own decode of a double-quantized
    absmax, layer ``layer`` of a stack) give, bit for bit, the bfloat16 W of
    `nf4_dequantize_reference` (today's large-M path) of that layer."""
    from jaxqlora.nf4 import quantize_nf4
    from pallas_kernels import nf4_matmul as op
    from pallas_kernels.nf4_matmul import nf4_dequantize_reference
    from pallas_kernels.nf4_mgpu_gemm import _gemm_weight

    rng = np.random.default_rng()
    n, k, layers = 72, 640, 3
    qs = [quantize_nf4(jnp.asarray(rng.standard_normal((n, k)) * 0.03, jnp.float32))
          for _ in range(layers)]
    st = lambda f: jnp.stack([f(q) for q in qs])  # noqa: E731
    ops = dict(packed=st(lambda q: q.packed.reshape(n, k // 2)),
               absmax=st(lambda q: q.absmax.reshape(n, k // 64)),
               nested_absmax=st(lambda q: q.nested_absmax), nested_code=st(lambda q: q.nested_code),
               offset=st(lambda q: q.offset))
    cfg = op._Config("pallas", (n, k), 64, 256, False)
    for layer in range(layers):
        p, scale = op._gemm(cfg, lambda a2, p, s: (p, s), None, ops["packed"], ops["absmax"],
                            ops["nested_absmax"], ops["nested_code"], ops["offset"],
                            jnp.int32(layer), None)
        got = np.asarray(_gemm_weight(p, scale))
        q = qs[layer]
        want = np.asarray(nf4_dequantize_reference(
            q.packed, q.absmax, q.nested_absmax, q.nested_code, q.offset, shape=(n, k))
            .astype(jnp.bfloat16).astype(jnp.float32))
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), layer


# ---------------------------------------------------------------------------
# GPU (Hopper): the kernels against float64
# ---------------------------------------------------------------------------

needs_hopper = pytest.mark.skipif(not ON_HOPPER, reason="Mosaic GPU NF4 GEMM needs a Hopper GPU")

#: (m, n, k, layers, blocksize, double_quant, kwargs): ragged shapes, then Llama-3-8B's.
GPU_CASES = [
    (64, 64, 64, None, 64, False, {}),
    (200, 200, 320, 3, 64, False, {}),
    (77, 72, 256, None, 128, False, dict(block_m=64)),
    (300, 264, 704, None, 64, True, {}),
    (256, 512, 1024, None, 64, False, dict(in_flight=0)),
    (192, 520, 512, 2, 64, False, dict(out_dtype=jnp.float32)),
    (300, 264, 384, 2, 64, True, dict(block_m=256)),
    (512, 1024, 4096, None, 64, False, dict(block_m=256, out_dtype=jnp.float32)),
    (1024, 4096, 4096, None, 64, False, dict(block_m=256)),
    (512, 4096, 4096, None, 64, True, {}),
    (512, 1024, 4096, None, 64, False, {}),
    (256, 14336, 4096, None, 64, False, {}),
    (256, 4096, 14336, None, 64, False, {}),
]


def _gpu_case(rng, m, n, k, layers, blocksize, double_quant):
    packed, absmax = random_weight(rng, n, k, layers=layers, blocksize=blocksize,
                                   double_quant=double_quant)
    scale = nf4_kernel_scale(jnp.asarray(absmax), n, k, blocksize)
    p_last, a_last = (packed, absmax) if layers is None else (packed[-1], absmax[-1])
    extra = () if layers is None else (jnp.int32(layers - 1),)
    return jnp.asarray(packed), scale, extra, kernel_weight64(p_last, a_last, blocksize)


@needs_hopper
@pytest.mark.parametrize("m,n,k,layers,blocksize,double_quant,kw", GPU_CASES)
def test_forward_matches_float64(m, n, k, layers, blocksize, double_quant, kw):
    rng = np.random.default_rng()
    packed, scale, extra, w64 = _gpu_case(rng, m, n, k, layers, blocksize, double_quant)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    y = nf4_mgpu_gemm(x, packed, scale, *extra, **kw)
    assert y.shape == (m, n) and y.dtype == kw.get("out_dtype", jnp.bfloat16)
    assert_close(y, np.asarray(x.astype(jnp.float32), np.float64), w64,
                 out_bf16=y.dtype == jnp.bfloat16)


@needs_hopper
@pytest.mark.parametrize("m,n,k,layers,blocksize,double_quant,kw", GPU_CASES)
def test_transposed_matches_float64(m, n, k, layers, blocksize, double_quant, kw):
    rng = np.random.default_rng()
    packed, scale, extra, w64 = _gpu_case(rng, m, n, k, layers, blocksize, double_quant)
    kw = {key: v for key, v in kw.items()}
    dy = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    dx = nf4_mgpu_gemm_t(dy, packed, scale, *extra, **kw)
    assert dx.shape == (m, k) and dx.dtype == kw.get("out_dtype", jnp.bfloat16)
    assert_close(dx, np.asarray(dy.astype(jnp.float32), np.float64), w64, transposed=True,
                 out_bf16=dx.dtype == jnp.bfloat16)


@needs_hopper
@pytest.mark.parametrize("fn", [nf4_mgpu_gemm, nf4_mgpu_gemm_t], ids=["fwd", "t"])
@pytest.mark.parametrize("block_m", [128, 256])
def test_large_m_rows_match_float64(fn, block_m):
    """M = 4096 on the 8B q/o shape: 64 random rows of the result against float64, the
    whole result against the float32 reference (the same W; summation order only)."""
    rng = np.random.default_rng()
    m, n, k = 4096, 4096, 4096
    packed, scale, _, w64 = _gpu_case(rng, m, n, k, None, 64, True)
    a = jnp.asarray(rng.standard_normal((m, k if fn is nf4_mgpu_gemm else n)), jnp.bfloat16)
    out = fn(a, packed, scale, block_m=block_m, out_dtype=jnp.float32)
    rows = rng.choice(m, 64, replace=False)
    a64 = np.asarray(a.astype(jnp.float32), np.float64)[rows]
    assert_close(np.asarray(out)[rows], a64, w64, transposed=fn is nf4_mgpu_gemm_t)
    ref = (nf4_mgpu_gemm_reference if fn is nf4_mgpu_gemm else nf4_mgpu_gemm_reference_t)(
        a, packed, scale)
    assert float(jnp.max(jnp.abs(out - ref))) <= 2.0 ** -16 * float(jnp.max(jnp.abs(ref)))


@needs_hopper
@pytest.mark.parametrize("fn", [nf4_mgpu_gemm, nf4_mgpu_gemm_t], ids=["fwd", "t"])
@pytest.mark.parametrize("m,n,k,layers,kw", [
    (200, 200, 320, 3, {}),
    (512, 4096, 4096, None, {}),
    (256, 1024, 4096, None, dict(block_m=64)),
    (512, 4096, 4096, None, dict(block_m=256)),
    (300, 264, 384, 2, dict(block_m=256)),
])
def test_words_match_float64(fn, m, n, k, layers, kw):
    """The codes in `nf4_kernel_codes`' uint32 layout: the same W, the same products."""
    rng = np.random.default_rng()
    packed, scale, extra, w64 = _gpu_case(rng, m, n, k, layers, 64, False)
    words = nf4_kernel_codes(packed, n, k)
    a = jnp.asarray(rng.standard_normal((m, k if fn is nf4_mgpu_gemm else n)), jnp.bfloat16)
    out = fn(a, words, scale, *extra, out_dtype=jnp.float32, **kw)
    assert_close(out, np.asarray(a.astype(jnp.float32), np.float64), w64,
                 transposed=fn is nf4_mgpu_gemm_t)
    same = fn(a, packed, scale, *extra, out_dtype=jnp.float32, **kw)
    assert float(jnp.max(jnp.abs(out - same))) <= 2.0 ** -16 * float(jnp.max(jnp.abs(same)))


@needs_hopper
@pytest.mark.parametrize("fn", [nf4_mgpu_gemm, nf4_mgpu_gemm_t], ids=["fwd", "t"])
@pytest.mark.parametrize("m,n,k,layers,words,block_m", [
    (300, 264, 384, 2, False, 128),
    (300, 264, 384, 2, True, 256),
    (512, 4096, 4096, None, True, 128),
    (512, 4096, 4096, None, False, 256),
    (256, 14336, 4096, None, False, 128),
])
def test_exact_matches_float64(fn, m, n, k, layers, words, block_m):
    """Float32 scales: the kernel's W is bnb's bfloat16 W (``bf16(NF4[code] * absmax)``
    in float32, today's dequantize path), so its products match float64 products of that
    W to float32 accumulation."""
    rng = np.random.default_rng()
    packed, absmax = random_weight(rng, n, k, layers=layers, double_quant=True)
    scale = nf4_kernel_scale_f32(jnp.asarray(absmax), n, k, 64)
    p_last, a_last = (packed, absmax) if layers is None else (packed[-1], absmax[-1])
    w64 = exact_weight64(p_last, a_last)
    codes = jnp.asarray(packed)
    if words:
        codes = nf4_kernel_codes(codes, n, k)
    extra = () if layers is None else (jnp.int32(layers - 1),)
    a = jnp.asarray(rng.standard_normal((m, k if fn is nf4_mgpu_gemm else n)), jnp.bfloat16)
    out = fn(a, codes, scale, *extra, block_m=block_m, out_dtype=jnp.float32)
    assert_close(out, np.asarray(a.astype(jnp.float32), np.float64), w64,
                 transposed=fn is nf4_mgpu_gemm_t)
