"""GGUF GEMVs on Hopper through Mosaic GPU: ``y = x @ W.T`` for ``W`` in llama.cpp's Q4_K,
Q6_K, Q4_0, Q4_1 and Q8_0 blocks, decode-sized ``M`` (one token; a few tokens are tiled by
8), mixed Q4_K/Q6_K stacks in one launch.

Numerics (what "bit-exact" means here). Every format writes a weight as ``w = scale_j * q +
bias_j`` per sub-block ``j`` of ``S`` values (16 or 32), ``q`` a small integer (Q4_K: 0..15,
Q6_K: -32..31, Q4_0: -8..7, Q4_1: 0..15, Q8_0: -128..127). The kernel decodes ``q`` to
bfloat16, which holds these integers exactly, and lets the tensor cores form ``P_j = sum
q * x`` over each sub-block in float32 (``x`` bfloat16: every product is exact); then, on the
CUDA cores, ``y += scale_j * P_j + bias_j * sum(x over j)`` in float32 with ``scale_j``
and ``bias_j`` computed as ``gguf.quants`` computes them (``d * sc``, ``dmin * m`` ...,
float32 from the float16 fields). So the result is ``gguf.quants.dequantize(W) @ x`` up to
float32 rounding of the sums (no weight is ever rounded to bfloat16); the tests hold it to
float64 NumPy at float32-accumulation tolerance. Activations must be bfloat16 (float32 ``x``
would be rounded: `gguf_mgpu_supported` says no and the caller keeps the Triton kernel).

Kernel layout (derived once at load time by `gguf_kernel_layout`, from the field planes of
`pallas_kernels.gguf_matmul.split_blocks`; never saved, the GGUF bytes stay the storage).
It holds the same bytes as the file, permuted, plus padding:

* ``codes`` uint32 ``[(L,) N, Kp // 8]`` (``Kp`` = K rounded up to 256): the low 4 bits of
  every ``q`` (Q4_K/Q4_0/Q4_1: the nibble as stored; Q6_K: ``ql``; Q8_0: the low nibble of
  ``q + 128``), 8 per word, in the order of wgmma's register layout (as
  `pallas_kernels.nf4_mgpu.nf4_kernel_codes`): within each 256-value group, word ``8 g + 2 p
  + e`` (``g`` 0..3, ``p`` 0..3 the thread's quad, ``e`` 0..1) holds sub-block ``j = 2 g +
  e`` (32 values), nibble ``t + 4 b`` the value of column ``32 j + 8 t + 2 p + b``. A
  thread's 32-bit load gives it the codes of four bfloat16 pairs of `plgpu.Layout.WGMMA`;
  pair ``t`` is nibbles ``t`` and ``t + 4``, so ``(w >> 4 t) & 0x000F000F | 0x43004300`` is
  the bfloat16 pair ``(128 + q0, 128 + q1)`` and one ``fma.rn.bf16x2`` subtracts the
  format's constant (128, 136 for Q4_0's ``q - 8``, ...): three instructions per pair
  (Q6_K about five, Q8_0 about seven; `decode_program` lists them).
* ``hi2`` uint32 ``[(L,) N, Kp // 16]`` (Q6_K): the high 2 bits (``qh``), 16 per word: word
  ``8 g + 2 p + e`` holds 32-value groups ``j = 4 g + 2 e + h``, value ``(h, t, b)`` at bit
  ``16 b + 8 h + 2 t``; moved to bits 4..5 of each half and OR-ed in (``128 + q``, q < 64).
* ``hi4`` uint32 ``[(L,) N, Kp // 8]`` (Q8_0): the high nibble of ``q + 128``, as ``codes``.
* ``rec`` uint32 ``[(L,) N, nb * 4]`` (k-quants): per block 16 bytes: Q4_K's ``d``,
  ``dmin`` and 12 ``scales`` bytes as stored; Q6_K's 16 int8 ``scales``.
* ``d`` float16 ``[(L,) nb, N8]`` (Q6_K, Q4_0, Q4_1, Q8_0) and ``m`` (Q4_1): the block
  scales, transposed so that one K step's scales of 64 rows are one TMA box (``N8``: N
  rounded up to 8, zero rows; 16-byte TMA rows).

The layout holds the weight in full (`gguf_mgpu_dequantize` decodes it back, and the
backward of `gguf_mgpu_matmul` uses that), so a model serving through this kernel could
drop the field planes from the device (nothing here rebuilds the GGUF bytes from it).

The kernel (after `pallas_kernels.nf4_mgpu`: weight on wgmma's M side, tokens on its N
side padded to 8). Grid ``(cdiv(N, 64), cdiv(M, 8), splits)``: a program owns 64 rows of W
and 8 tokens over its share of K (split-K, float32 partials summed by XLA).
`plgpu.emit_pipeline` streams, per step of 256 values of K (one k-quant super-block, eight
legacy blocks), the ``[64, 32]`` words of ``codes`` (and ``hi2``/``hi4``), the step's
scales and ``x [8, 256]`` (swizzled ``2 S`` bytes so that each sub-block of ``x`` is whole
tiles) into shared memory by TMA (zero fill past N, M and K). Each step decodes the words
in registers (inline PTX, `_decode` running `decode_program`) to one bfloat16 ``[64, S]``
block per sub-block,
issues one wgmma per sub-block into its own float32 accumulator, waits, and folds them
into the running ``y`` tile (the pipeline's carry) with the scales decoded in registers
from shared memory (`_combine`: ``get_scale_min_k4`` for Q4_K). The sums of ``x`` per
32-value sub-block that Q4_K's mins and Q4_1's ``m`` multiply come from one more wgmma
per sub-block with an all-ones A (float32 sums of the bfloat16 x; the tensor cores are
idle at decode M), so the launch needs no XLA op before it; after it, XLA sums the split-K
partials.

Run on an H100 (2026-12-07): 64 of the 65 tests of ``tests/test_gguf_mgpu.py`` passed and
none failed (the time limit stopped the last); not yet timed. Before that, on a CPU machine
every format's kernel was lowered by jax 0.10.2 and
compiled through jax-cuda12-plugin 0.10.2's Mosaic GPU pipeline to PTX and by ptxas (CUDA
13.0) for sm_90a (a stub CUDA driver answering compute capability 9.0): registers per
thread 158 (Q4_K), 154 (Q6_K), 160 (Q4_K + Q6_K), 167 (Q4_1), 122 (Q4_0, Q8_0), no
spills; about 600 PTX instructions per thread for the whole Q4_K kernel, most of them in
the step (the nibble decode, the scale decode and the fold).

A mixed stack (``fmts = (Q4_K, Q6_K)``, an int32 ``kind [L]`` per layer, as the Triton
kernel takes) shares ``codes`` and ``rec``; each program reads ``kind[layer]`` and runs
that format's pipeline under a `pl.when` branch: one launch per projection whatever the
layer's format.

Restrictions (`gguf_mgpu_supported`): a Hopper GPU (compute capability 9.0), bfloat16
``x``, ``1 <= M <= GEMV_MAX_M``, a format in `MGPU_FORMATS` (one, or Q4_K with Q6_K). Any
N; K a multiple of the block size (32 or 256). The kernel has no CPU interpret mode
(Mosaic GPU's interpreter has no TMA); `gguf_mgpu_reference` (plain jnp over the kernel
layout, the kernel's arithmetic) is the oracle ``tests/test_gguf_mgpu.py`` checks against
float64 ``gguf.quants.dequantize`` products, and the CUDA lowering is checked on a CPU
machine.

Sources: ggml ``ggml-common.h`` (``block_q4_K``, ``block_q6_K``, ``block_q4_0``,
``block_q4_1``, ``block_q8_0``), ``ggml-quants.c`` (``dequantize_row_*``,
``get_scale_min_k4``), gguf-py ``gguf/quants.py``; the Mosaic GPU patterns of
`pallas_kernels.nf4_mgpu` and jax's ``jax/experimental/pallas/ops/gpu/
hopper_mixed_type_matmul_mgpu.py`` (registers -> wgmma) and ``attention_mgpu.py`` (a
carried WGMMA-layout accumulator).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.nf4_mgpu import (
    _SMEM_BUDGET,
    _check_splits,
    _default_splits,
    _i32_to_vec,
    _pad_rows,
    _store_rows,
    _sum_partials,
    _swizzled,
)

__all__ = [
    "GEMV_MAX_M",
    "MGPU_FORMATS",
    "decode_program",
    "emulate_program",
    "gguf_kernel_layout",
    "gguf_mgpu_dequantize",
    "gguf_mgpu_kernel",
    "gguf_mgpu_matmul",
    "gguf_mgpu_reference",
    "gguf_mgpu_supported",
    "program_ptx",
]

#: Values of K per pipeline step: one k-quant super-block, eight legacy blocks.
STEP = 256

#: Token columns per program (wgmma's N; M is tiled by it).
BLOCK_M = 8

#: Largest M `gguf_mgpu_supported` accepts (as `pallas_kernels.gguf_matmul.GEMV_MAX_M`).
GEMV_MAX_M = 16


class _Spec(NamedTuple):
    """What the kernel needs to know of a format."""
    sub: int            # values per sub-block: one wgmma group, one scale
    block: int          # values per GGUF block
    operands: tuple     # kernel-layout operands read (besides x)
    bias: bool          # a per-sub-block offset times sum(x) (Q4_K's mins, Q4_1's m)


_SPECS = {
    "Q4_K": _Spec(32, 256, ("codes", "rec"), True),
    "Q6_K": _Spec(16, 256, ("codes", "hi2", "rec", "d"), False),
    "Q4_0": _Spec(32, 32, ("codes", "d"), False),
    "Q4_1": _Spec(32, 32, ("codes", "d", "m"), True),
    "Q8_0": _Spec(32, 32, ("codes", "hi4", "d"), False),
}

#: GGUF types the Mosaic GEMV takes (alone; Q4_K and Q6_K also mixed in one stack).
MGPU_FORMATS = tuple(_SPECS)

_MIXES = {("Q4_K",), ("Q6_K",), ("Q4_0",), ("Q4_1",), ("Q8_0",), ("Q4_K", "Q6_K")}


def _names(fmts) -> tuple[str, ...]:
    """Format names from modules (``pallas_kernels.gguf_q4_k``) or names."""
    return tuple(f if isinstance(f, str) else f.NAME for f in fmts)


def gguf_mgpu_supported(m: int, n: int, k: int, fmts, dtype) -> bool:
    """True when `gguf_mgpu_matmul` handles this call on this machine's GPU: a Hopper GPU
    (compute capability 9.0), bfloat16 activations, ``fmts`` (modules or names) one format
    of `MGPU_FORMATS` or Q4_K with Q6_K, ``K`` a multiple of the block size, ``1 <= M <=
    GEMV_MAX_M``. The kernel is a GEMV design (tokens padded to 8 per program, the weight
    read once per 8 tokens): larger ``M`` (prefill) stays with the caller's other path."""
    names = tuple(sorted(_names(fmts)))
    if names not in _MIXES or jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16):
        return False
    if not 1 <= m <= GEMV_MAX_M or n < 1 or k < 1 or k % _SPECS[names[0]].block:
        return False
    try:
        dev = jax.devices()[0]
    except RuntimeError:  # pragma: no cover
        return False
    return dev.platform == "gpu" and getattr(dev, "compute_capability", "") == "9.0"


# ---------------------------------------------------------------------------
# The in-register decode: a tiny op list rendered to PTX (`program_ptx`) and emulated in
# NumPy (`emulate_program`, the CPU tests' check of the bit tricks)
# ---------------------------------------------------------------------------

_BF16 = {v: int(np.array(v, ml_dtypes.bfloat16).view(np.uint16)) for v in
         (1.0, 16.0, -128.0, -136.0, -160.0, -256.0)}


def _pair(v: float) -> int:
    b = _BF16[v]
    return b | (b << 16)


def decode_program(fmt: str, h: int = 0) -> list[tuple]:
    """The ops turning one 32-bit code word (``$w``; Q6_K/Q8_0 also ``$h``, the high-bit
    word) into four bfloat16 pairs ``$o0..$o3`` (pair ``t``: nibbles ``t``, ``t + 4``).

    Ops: ``("shr", dst, src, n)``, ``("shl", dst, src, n)``, ``("lop3", dst, a, b, c)``
    (``(a & b) | c``), ``("fma", dst, a, b, c)`` (``fma.rn.bf16x2``); operands are register
    names or integer immediates. ``h`` (Q6_K): which 32-value half of the ``hi2`` word.
    """
    ops = []
    one = _pair(1.0)
    for t in range(4):
        src = "$w"
        if t:
            ops.append(("shr", "a", "$w", 4 * t))
            src = "a"
        ops.append(("lop3", "a", src, 0x000F000F, 0x43004300))  # (128 + q_lo) pairs
        out = f"$o{t}"
        if fmt in ("Q4_K", "Q4_1"):
            ops.append(("fma", out, "a", one, _pair(-128.0)))
        elif fmt == "Q4_0":
            ops.append(("fma", out, "a", one, _pair(-136.0)))  # q - 8
        elif fmt == "Q6_K":
            s = 8 * h + 2 * t  # bit of this pair's high 2 bits in the hi2 word
            if s > 4:
                ops.append(("shr", "b", "$h", s - 4))
            elif s < 4:
                ops.append(("shl", "b", "$h", 4 - s))
            ops.append(("lop3", "a", "b" if s != 4 else "$h", 0x00300030, "a"))
            ops.append(("fma", out, "a", one, _pair(-160.0)))  # q - 32
        elif fmt == "Q8_0":
            ops.append(("fma", "a", "a", one, _pair(-256.0)))  # lo - 128
            src = "$h"
            if t:
                ops.append(("shr", "b", "$h", 4 * t))
                src = "b"
            ops.append(("lop3", "b", src, 0x000F000F, 0x43004300))
            ops.append(("fma", "b", "b", one, _pair(-128.0)))  # hi
            ops.append(("fma", out, "b", _pair(16.0), "a"))  # 16 hi + lo - 128
        else:
            raise ValueError(f"no decode for {fmt}")
    return ops


def program_ptx(ops: list[tuple], with_hi: bool) -> str:
    """PTX of `decode_program`'s ops for ``llvm.inline_asm``: outputs ``$0..$3``, the word
    ``$4`` (and, ``with_hi``, the high-bit word ``$5``), both copied to scratch registers
    first (an output may share a register with an input); constants of ``fma`` go through
    registers."""
    names = {"$o0": "$0", "$o1": "$1", "$o2": "$2", "$o3": "$3", "$w": "w", "$h": "hw"}
    consts: dict[int, str] = {}
    lines = []

    def arg(v, reg=False):
        if isinstance(v, str):
            return names.get(v, v)
        if not reg:
            return f"{v:#010x}"
        if v not in consts:
            consts[v] = f"k{len(consts)}"
        return consts[v]

    for op in ops:
        kind, dst, *src = op
        d = arg(dst)
        if kind == "shr":
            lines.append(f"shr.u32 {d}, {arg(src[0])}, {src[1]};")
        elif kind == "shl":
            lines.append(f"shl.b32 {d}, {arg(src[0])}, {src[1]};")
        elif kind == "lop3":
            lines.append(f"lop3.b32 {d}, {arg(src[0])}, {arg(src[1])}, {arg(src[2])}, 0xEA;")
        elif kind == "fma":
            lines.append(f"fma.rn.bf16x2 {d}, {arg(src[0], True)}, {arg(src[1], True)}, "
                         f"{arg(src[2], True)};")
    regs = ["a", "b", "w", "hw"] + list(consts.values())
    head = [f".reg .b32 {', '.join(regs)};", "mov.b32 w, $4;"] + (["mov.b32 hw, $5;"] if with_hi else [])
    head += [f"mov.b32 {r}, {v:#010x};" for v, r in consts.items()]
    return "\n".join(["{"] + head + lines + ["}"])


def emulate_program(ops: list[tuple], w: np.ndarray, h: np.ndarray | None = None) -> np.ndarray:
    """`decode_program`'s ops on uint32 arrays in NumPy (bfloat16 pairs through
    ``ml_dtypes``, the fma in float64 then rounded to bfloat16 as ``fma.rn`` rounds once):
    float32 ``[..., 4, 2]``, pair ``t``'s (low half, high half) values."""
    regs = {"$w": np.asarray(w, np.uint32)}
    if h is not None:
        regs["$h"] = np.asarray(h, np.uint32)

    def val(v):
        return regs[v] if isinstance(v, str) else np.uint32(v)

    def halves(u):
        lo = (u & 0xFFFF).astype(np.uint16).view(ml_dtypes.bfloat16).astype(np.float64)
        hi = (u >> 16).astype(np.uint16).view(ml_dtypes.bfloat16).astype(np.float64)
        return lo, hi

    for kind, dst, *src in ops:
        if kind == "shr":
            regs[dst] = val(src[0]) >> np.uint32(src[1])
        elif kind == "shl":
            regs[dst] = (val(src[0]) << np.uint32(src[1])) & np.uint32(0xFFFFFFFF)
        elif kind == "lop3":
            regs[dst] = (val(src[0]) & val(src[1])) | val(src[2])
        elif kind == "fma":
            (al, ah), (bl, bh), (cl, ch) = (halves(np.broadcast_to(val(s), regs["$w"].shape))
                                            for s in src)
            lo = (al * bl + cl).astype(ml_dtypes.bfloat16).view(np.uint16).astype(np.uint32)
            hi = (ah * bh + ch).astype(ml_dtypes.bfloat16).view(np.uint16).astype(np.uint32)
            regs[dst] = lo | (hi << 16)
    out = np.stack([np.stack(halves(regs[f"$o{t}"]), axis=-1) for t in range(4)], axis=-2)
    return out.astype(np.float32)


# ---------------------------------------------------------------------------
# Kernel layout (load time, jnp)
# ---------------------------------------------------------------------------


def _pack_codes(v: jax.Array) -> jax.Array:
    """Integers 0..15 ``[.., N, Kp]`` (Kp a multiple of 256) -> the ``codes`` words
    ``[.., N, Kp // 8]`` (see the module docstring)."""
    *lead, n, kp = v.shape
    nd = len(lead)
    v = v.astype(jnp.uint32).reshape(*lead, n, kp // 256, 4, 2, 4, 4, 2)  # G, g, e, t, p, b
    perm = tuple(range(nd + 2)) + tuple(nd + 2 + i for i in (0, 3, 1, 4, 2))  # g p e b t
    v = jnp.transpose(v, perm).reshape(*lead, n, kp // 8, 8)
    return jnp.sum(v << (4 * jnp.arange(8, dtype=jnp.uint32)), axis=-1, dtype=jnp.uint32)


def _unpack_codes(words: jax.Array) -> jax.Array:
    """The inverse of `_pack_codes`: int32 ``[.., N, Kp]``."""
    *lead, n, w = words.shape
    nd = len(lead)
    v = (words[..., None] >> (4 * jnp.arange(8, dtype=jnp.uint32))) & 15
    v = v.reshape(*lead, n, w // 32, 4, 4, 2, 2, 4)  # G, g, p, e, b, t
    perm = tuple(range(nd + 2)) + tuple(nd + 2 + i for i in (0, 2, 4, 1, 3))  # g e t p b
    return jnp.transpose(v, perm).reshape(*lead, n, w * 8).astype(jnp.int32)


def _pack_hi2(v: jax.Array) -> jax.Array:
    """Integers 0..3 ``[.., N, Kp]`` -> the ``hi2`` words ``[.., N, Kp // 16]``."""
    *lead, n, kp = v.shape
    nd = len(lead)
    v = v.astype(jnp.uint32).reshape(*lead, n, kp // 256, 2, 2, 2, 4, 4, 2)  # G g e h t p b
    perm = tuple(range(nd + 2)) + tuple(nd + 2 + i for i in (0, 4, 1, 5, 2, 3))  # g p e b h t
    v = jnp.transpose(v, perm).reshape(*lead, n, kp // 16, 16)
    return jnp.sum(v << (2 * jnp.arange(16, dtype=jnp.uint32)), axis=-1, dtype=jnp.uint32)


def _unpack_hi2(words: jax.Array) -> jax.Array:
    """The inverse of `_pack_hi2`: int32 ``[.., N, Kp]``."""
    *lead, n, w = words.shape
    nd = len(lead)
    v = (words[..., None] >> (2 * jnp.arange(16, dtype=jnp.uint32))) & 3
    v = v.reshape(*lead, n, w // 16, 2, 4, 2, 2, 2, 4)  # G g p e b h t
    perm = tuple(range(nd + 2)) + tuple(nd + 2 + i for i in (0, 2, 4, 5, 1, 3))  # g e h t p b
    return jnp.transpose(v, perm).reshape(*lead, n, w * 16).astype(jnp.int32)


def _bytes_to_words(b: jax.Array) -> jax.Array:
    """uint8 ``[..., 4 w]`` -> little-endian uint32 ``[..., w]``."""
    b = b.astype(jnp.uint32).reshape(*b.shape[:-1], b.shape[-1] // 4, 4)
    return jnp.sum(b << (8 * jnp.arange(4, dtype=jnp.uint32)), axis=-1, dtype=jnp.uint32)


def _f16_bits(a: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(jnp.asarray(a, jnp.float16), jnp.uint16).astype(jnp.uint32)


def _q_of(name: str, planes: dict) -> tuple[jax.Array, jax.Array | None]:
    """The format's integers in natural K order, ``[.., N, K]`` int32: the low 4 bits and
    the high bits (Q6_K: 0..3; Q8_0: the high nibble of ``q + 128``; else None)."""
    qs = jnp.asarray(planes["qs"]).astype(jnp.int32)
    if name == "Q4_K":  # bytes 32c..32c+31: sub-block 2c low nibbles, 2c+1 high
        q = qs[..., :128].reshape(*qs.shape[:-1], 4, 1, 32)
        q = jnp.concatenate([q & 15, q >> 4], axis=-2)
        return q.reshape(*qs.shape[:-2], -1), None
    if name == "Q6_K":  # gguf.quants Q6_K.dequantize_blocks' order
        ql = qs[..., :128].reshape(*qs.shape[:-1], 2, 1, 64)
        ql = jnp.concatenate([ql & 15, ql >> 4], axis=-2).reshape(*qs.shape[:-1], 8, 32)
        qh = jnp.asarray(planes["qh"]).astype(jnp.int32)[..., :64]
        qh = qh.reshape(*qh.shape[:-1], 2, 1, 32) >> jnp.asarray([0, 2, 4, 6], jnp.int32)[:, None]
        qh = (qh & 3).reshape(*qh.shape[:-3], 8, 32)
        return ql.reshape(*qs.shape[:-2], -1), qh.reshape(*qs.shape[:-2], -1)
    if name in ("Q4_0", "Q4_1"):  # value l < 16: low nibble of qs[l]; l + 16: its high
        q = qs[..., :16]
        q = jnp.stack([q & 15, q >> 4], axis=-2)
        return q.reshape(*qs.shape[:-2], -1), None
    if name == "Q8_0":  # int8 q stored as a byte; q + 128 = byte ^ 0x80
        u = qs[..., :32] ^ 128
        return (u & 15).reshape(*qs.shape[:-2], -1), (u >> 4).reshape(*qs.shape[:-2], -1)
    raise ValueError(f"no Mosaic GPU kernel for {name}")


def gguf_kernel_layout(planes: dict, fmts, kind=0) -> dict[str, jax.Array]:
    """The kernel layout (module docstring) of a GGUF weight held as field planes.

    Args:
      planes: ``{field: plane}`` as `pallas_kernels.gguf_matmul.split_blocks` gives them
        (float16 ``[(L,) N, nb]``, uint8 ``[(L,) N, nb, nbytes]``; a mixed Q4_K/Q6_K
        stack's planes as `pallas_kernels.gguf_matmul.union_layout` makes them).
      fmts: the formats (modules or names), as for `gguf_mgpu_matmul`.
      kind: int32 ``[L]`` (or scalar): each layer's index into ``fmts``.

    Returns:
      ``{name: array}``: the operands of `gguf_mgpu_matmul`'s ``kernel_layout`` (``codes``
      and, by format, ``hi2``, ``hi4``, ``rec``, ``d``, ``m``), with the planes' leading
      layer axis. Built with jnp (jit it, or run it once at load time).

    Raises:
      ValueError: a format without a Mosaic GPU kernel, or a mix other than Q4_K + Q6_K.
    """
    names = _names(fmts)
    if tuple(sorted(names)) not in _MIXES:
        raise ValueError(f"gguf_kernel_layout: no Mosaic GPU kernel for {names}")
    first = jnp.asarray(planes["qs"])
    n, nb = first.shape[-3], first.shape[-2]
    block = _SPECS[names[0]].block
    k = nb * block
    kp = -(-k // STEP) * STEP
    kind = jnp.asarray(kind, jnp.int32)
    lead = first.shape[:-3]

    def sel(arrs):  # per layer: the array of its format
        out = arrs[0]
        for i, a in enumerate(arrs[1:], start=1):
            kk = kind.reshape(kind.shape + (1,) * (a.ndim - kind.ndim))
            out = jnp.where(kk == i, a, out)
        return out

    def padk(v):
        return jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, kp - k)])

    def transposed(f16):  # [.., N, nb] -> [.., nb, N8]
        a = jnp.swapaxes(jnp.asarray(f16, jnp.float16), -1, -2)
        return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, -n % 8)])

    out: dict[str, list] = {}
    for name in names:
        lo, hi = _q_of(name, planes)
        ops = {"codes": _pack_codes(padk(lo))}
        if name == "Q6_K":
            ops["hi2"] = _pack_hi2(padk(hi))
        if name == "Q8_0":
            ops["hi4"] = _pack_codes(padk(hi))
        if name == "Q4_K":
            head = _f16_bits(planes["d"]) | (_f16_bits(planes["dmin"]) << 16)
            sc = _bytes_to_words(jnp.asarray(planes["scales"])[..., :12])
            ops["rec"] = jnp.concatenate([head[..., None], sc], axis=-1).reshape(*lead, n, nb * 4)
        if name == "Q6_K":
            ops["rec"] = _bytes_to_words(jnp.asarray(planes["scales"])[..., :16]).reshape(
                *lead, n, nb * 4)
        if "d" in _SPECS[name].operands:
            ops["d"] = transposed(planes["d"])
        if "m" in _SPECS[name].operands:
            ops["m"] = transposed(planes["m"])
        for key, v in ops.items():
            out.setdefault(key, []).append((name, v))
    result = {}
    for key, items in out.items():
        arrs = [dict(items).get(nm, items[0][1]) for nm in names]
        result[key] = arrs[0] if len(names) == 1 else sel(arrs)
    return result


# ---------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------


def _offsets(layout, shape):
    """Register index -> its static (row, column) offset in ``shape`` under ``layout``
    (the thread's own row and column come on top)."""
    from jax.experimental.mosaic import gpu as mgpu
    strides = layout.tiling.tile_strides(tuple(mgpu.utils.get_contiguous_strides(shape)))
    return {r: divmod(sum(i * st for i, st in zip(r, strides)), shape[1])
            for r in np.ndindex(layout.registers_shape(shape))}


def _decode(name: str, words, hi):
    """The bfloat16 blocks ``[64, S]`` (layout ``WGMMA``, one per sub-block of a 256-value
    step: 8 of 32 values, Q6_K 16 of 16) of the integers ``q`` held by a ``[64, 32]``
    uint32 ``codes`` tile (and the ``hi2`` ``[64, 16]`` or ``hi4`` ``[64, 32]`` tile)
    loaded in layout ``WGMMA`` (two words per register)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import llvm, vector
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.pallas import mosaic_gpu as plgpu

    spec = _SPECS[name]
    s = spec.sub
    nsub = STEP // s
    layout = plgpu.Layout.WGMMA
    out_ty = plgpu.ShapeDtypeStruct((64, s), jnp.bfloat16, layout)
    asms = {h: program_ptx(decode_program(name, h), hi is not None)
            for h in ((0, 1) if name == "Q6_K" else (0,))}
    args = (words,) if hi is None else (words, hi)

    @plgpu.inline_mgpu(arg_types=tuple(layout for _ in args),
                       return_type=tuple(out_ty for _ in range(nsub)))
    def dequant(_, w, *h_arr):
        i32 = ir.IntegerType.get_signless(32)
        struct = llvm.StructType.get_literal([i32] * 4)
        pair_ty = ir.VectorType.get((2,), ir.BF16Type.get())

        def words_of(arr):  # (row offset, word column 8 g + e) -> the thread's word
            src = {}
            for r, (ro, co) in _offsets(arr.layout, arr.shape).items():
                for e in range(2):
                    src[(ro, co + e)] = vector.extract(arr.registers[r], [], [e])
            return src

        src = words_of(w)
        hsrc = words_of(h_arr[0]) if h_arr else None
        out_layout = mgpu.WGMMA_LAYOUT
        by_off = {off: r for r, off in _offsets(out_layout, (64, s)).items()}
        row_offs = sorted({ro for ro, _ in by_off})
        regs = [np.empty(out_layout.registers_shape((64, s)), dtype=object) for _ in range(nsub)]
        for ro in row_offs:
            for g in range(4):
                for e in range(2):
                    jj = 2 * g + e  # the 32-value group of this word
                    word = src[(ro, 8 * g + e)]
                    if name == "Q6_K":
                        hw = hsrc[(ro, 8 * (jj // 4) + (jj // 2) % 2)]
                        ins, asm = [word, hw], asms[jj % 2]
                    elif name == "Q8_0":
                        ins, asm = [word, hsrc[(ro, 8 * g + e)]], asms[0]
                    else:
                        ins, asm = [word], asms[0]
                    cons = "=r,=r,=r,=r," + ",".join("r" for _ in ins)
                    res = llvm.inline_asm(struct, ins, asm, cons)
                    for t in range(4):
                        pair = _i32_to_vec(llvm.extractvalue(i32, res, ir.DenseI64ArrayAttr.get([t])),
                                           pair_ty)
                        if s == 32:
                            regs[jj][by_off[(ro, 8 * t)]] = pair
                        else:  # 16-value sub-blocks 2 jj (t = 0, 1) and 2 jj + 1 (t = 2, 3)
                            regs[2 * jj + t // 2][by_off[(ro, 8 * (t % 2))]] = pair
        outs = []
        for rg in regs:
            assert all(v is not None for v in rg.flat)
            outs.append(mgpu.FragmentedArray(_registers=rg, _layout=out_layout, _is_signed=None))
        return tuple(outs)

    return dequant(*args)


def _combine(name: str, total, parts, sums, refs: dict):
    """``total + sum_j scale[row, j] * parts[j] + bias[row, j] * sums[j]`` (float32 fused
    multiply-adds, layout ``WGMMA``, ``[64, BLOCK_M]``): the step's sub-block partial
    products scaled, and (Q4_K, Q4_1) the offsets times ``sums[j]``, the sums of x over
    32-value sub-block ``j`` (the same in every row); either may be empty (the unused
    scales' arithmetic is dead code). The scales are decoded per row in registers from the
    step's SMEM tiles ``refs`` (``rec [64, 4]`` uint32, ``d``/``m`` float16 ``[1 or 8,
    64]``)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, math, memref, vector
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.pallas import mosaic_gpu as plgpu

    keys = tuple(sorted(refs))
    layout = plgpu.Layout.WGMMA
    out_ty = plgpu.ShapeDtypeStruct(total.shape, jnp.float32, layout)

    @plgpu.inline_mgpu(arg_types=(layout, tuple(layout for _ in parts),
                                  tuple(layout for _ in sums),
                                  tuple(plgpu.RefType() for _ in keys)),
                       return_type=out_ty)
    def fold(_, tot, prts, xsums, rfs):
        r = dict(zip(keys, rfs))
        i32 = ir.IntegerType.get_signless(32)
        i16 = ir.IntegerType.get_signless(16)
        f32 = ir.F32Type.get()
        f16 = ir.F16Type.get()
        index = ir.IndexType.get()
        vec_ty = ir.VectorType.get((2,), f32)
        c = lambda v: arith.constant(i32, ir.IntegerAttr.get(i32, v))
        ci = lambda v: arith.constant(index, ir.IntegerAttr.get(index, v))

        def f16_to_f32(bits):  # i32 holding f16 bits in its low half
            return arith.extf(f32, arith.bitcast(f16, arith.trunci(i16, bits)))

        def byte(w, i):
            return arith.andi(arith.shrui(w, c(8 * i)), c(255)) if i else arith.andi(w, c(255))

        def row_scales(row):  # [(scale_j, min_j or None)] for the thread's row
            out = []
            if name == "Q4_K":
                w = [memref.load(r["rec"], [row, ci(i)]) for i in range(4)]
                d = f16_to_f32(w[0])
                dmin = f16_to_f32(arith.shrui(w[0], c(16)))
                sb = [byte(w[1 + i // 4], i % 4) for i in range(12)]
                for j in range(8):  # ggml get_scale_min_k4
                    if j < 4:
                        sc, mn = arith.andi(sb[j], c(63)), arith.andi(sb[j + 4], c(63))
                    else:
                        sc = arith.ori(arith.andi(sb[j + 4], c(15)),
                                       arith.shli(arith.shrui(sb[j - 4], c(6)), c(4)))
                        mn = arith.ori(arith.shrui(sb[j + 4], c(4)),
                                       arith.shli(arith.shrui(sb[j], c(6)), c(4)))
                    out.append((arith.mulf(d, arith.uitofp(f32, sc)),
                                arith.mulf(dmin, arith.uitofp(f32, mn))))
            elif name == "Q6_K":
                w = [memref.load(r["rec"], [row, ci(i)]) for i in range(4)]
                d = arith.extf(f32, memref.load(r["d"], [ci(0), row]))
                for j in range(16):  # int8 scales, sign-extended
                    v = arith.shrsi(arith.shli(w[j // 4], c(24 - 8 * (j % 4))), c(24))
                    out.append((arith.mulf(d, arith.sitofp(f32, v)), None))
            else:
                for j in range(8):
                    d = arith.extf(f32, memref.load(r["d"], [ci(j), row]))
                    m = arith.extf(f32, memref.load(r["m"], [ci(j), row])) if name == "Q4_1" else None
                    out.append((d, m))
            return out

        scales = {}
        new = np.empty_like(tot.registers)
        offs = _offsets(tot.layout, tot.shape)
        for (reg, (ro, co)), idx in zip(offs.items(), tot.layout.thread_idxs(tot.shape)):
            if ro not in scales:
                scales[ro] = row_scales(idx[0])
            acc = tot.registers[reg]
            for j in range(len(prts)):
                acc = math.fma(prts[j].registers[reg], vector.broadcast(vec_ty, scales[ro][j][0]), acc)
            for j in range(len(xsums)):  # Q4_K subtracts its min, Q4_1 adds its m
                mn = scales[ro][j][1]
                bias = arith.negf(mn) if name == "Q4_K" else mn
                acc = math.fma(xsums[j].registers[reg], vector.broadcast(vec_ty, bias), acc)
            new[reg] = acc
        return mgpu.FragmentedArray(_registers=new, _layout=tot.layout, _is_signed=None)

    return fold(total, tuple(parts), tuple(sums), tuple(refs[k] for k in keys))


def _format_tile(name: str, x_gmem, ops: dict, o_gmem, layer, *, steps: int, stages: int):
    """One program's work in format ``name``: rows ``[64 n, 64 n + 64)`` of the weight
    times ``BLOCK_M`` tokens over this program's K split, written to the partials. Per step
    one wgmma per sub-block (the decoded ``q`` times x) and, for formats with offsets, one
    more per 32 values with an all-ones A (the sums of x the offsets multiply; the tensor
    cores are idle at these M), each into its own accumulator; then `_combine`."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    ni, mi, si = lax.axis_index("n"), lax.axis_index("m"), lax.axis_index("s")
    spec = _SPECS[name]
    s = spec.sub
    kt = lambda t: si * steps + t
    specs, gmems, kinds = [], [], []
    specs.append(plgpu.BlockSpec((BLOCK_M, STEP), lambda t: (mi, kt(t)),
                                 transforms=_swizzled(2 * s, 16)))
    gmems.append(x_gmem)
    kinds.append("x")
    for key in spec.operands:
        if key in ("codes", "hi4"):
            bs = plgpu.BlockSpec((64, 32), lambda t: (ni, kt(t)), transforms=_swizzled(128, 32))
        elif key == "hi2":
            bs = plgpu.BlockSpec((64, 16), lambda t: (ni, kt(t)), transforms=_swizzled(64, 32))
        elif key == "rec":
            bs = plgpu.BlockSpec((64, 4), lambda t: (ni, kt(t)))
        elif name == "Q6_K":  # d: one block per step
            bs = plgpu.BlockSpec((1, 64), lambda t: (kt(t), ni))
        else:  # d, m of the eight legacy blocks of a step
            bs = plgpu.BlockSpec((8, 64), lambda t: (kt(t), ni))
        specs.append(bs)
        gmems.append(ops[key].at[layer])
        kinds.append(key)

    def step(_, *refs):
        *refs, carry = refs
        r = dict(zip(kinds, refs))
        x_smem = r["x"]
        scale_refs = {k: v for k, v in r.items() if k in ("rec", "d", "m")}

        def mma(*accs):
            words = plgpu.load(r["codes"], (), layout=plgpu.Layout.WGMMA)
            hi = None
            if "hi2" in r or "hi4" in r:
                hi = plgpu.load(r["hi2" if "hi2" in r else "hi4"], (), layout=plgpu.Layout.WGMMA)
            blocks = _decode(name, words, hi)
            for j, (acc, w) in enumerate(zip(accs, blocks)):
                plgpu.wgmma(acc, w, x_smem.at[:, j * s:(j + 1) * s].T)
            plgpu.wgmma_wait(0)
            return tuple(a[...] for a in accs)

        def mma_sums(*accs):  # sums of x per 32 values: an all-ones A
            ones = plgpu.layout_cast(jnp.full((64, 32), 1.0, dtype=jnp.bfloat16), plgpu.Layout.WGMMA)
            for j, acc in enumerate(accs):
                plgpu.wgmma(acc, ones, x_smem.at[:, j * 32:(j + 1) * 32].T)
            plgpu.wgmma_wait(0)
            return tuple(a[...] for a in accs)

        if spec.bias:  # first the offsets' share, so that its accumulators are dead below
            sums = pl.run_scoped(mma_sums, *[plgpu.ACC((64, BLOCK_M)) for _ in range(STEP // 32)])
            carry = _combine(name, carry, (), sums, scale_refs)
        parts = pl.run_scoped(mma, *[plgpu.ACC((64, BLOCK_M)) for _ in range(STEP // s)])
        return _combine(name, carry, parts, (), scale_refs)

    zero = plgpu.layout_cast(jnp.full((64, BLOCK_M), 0, dtype=jnp.float32), plgpu.Layout.WGMMA)
    total = plgpu.emit_pipeline(step, grid=(steps,), in_specs=tuple(specs),
                                max_concurrent_steps=stages, init_carry=zero)(*gmems)
    _store_rows(total, o_gmem, ni)


def _kernel_body(layer_ref, kind_ref, x_gmem, *refs, names: tuple, keys: tuple, steps: int,
                 stages: int):
    """The kernel: ``layer [1]`` and ``kind [L]`` int32 (``kind[layer]`` the layer's index
    into ``names``, read here: no XLA op before the launch), ``x`` bfloat16 ``[M, K]``, the
    kernel-layout operands ``refs[:-1]`` in the order of ``keys``, the partials
    ``refs[-1]``. One `pl.when` branch per format when ``names`` has several."""
    *arrs, o_gmem = refs
    ops = dict(zip(keys, arrs))
    layer = layer_ref[0]
    if len(names) == 1:
        _format_tile(names[0], x_gmem, ops, o_gmem, layer, steps=steps, stages=stages)
        return
    kind = kind_ref[layer]
    for i, name in enumerate(names):
        pl.when(kind == i)(functools.partial(_format_tile, name, x_gmem, ops, o_gmem,
                                             layer, steps=steps, stages=stages))


#: Shared-memory bytes of one pipeline step's tile of each kernel-layout operand.
_OP_BYTES = {"codes": 64 * 32 * 4, "hi2": 64 * 16 * 4, "hi4": 64 * 32 * 4, "rec": 64 * 16,
             "d": 8 * 64 * 2, "m": 8 * 64 * 2}


def _stage_bytes(names) -> int:
    """Shared memory of one pipeline stage (the largest over the formats' branches)."""
    return max(BLOCK_M * STEP * 2 + sum(_OP_BYTES[key] for key in _SPECS[nm].operands)
               for nm in names)


@functools.partial(jax.jit, static_argnames=("fmts", "splits", "stages", "out_dtype"))
def gguf_mgpu_kernel(x: jax.Array, ops: dict, kind, layer=None, *, fmts: tuple,
                     splits: int | None = None, stages: int | None = None,
                     out_dtype=None) -> jax.Array:
    """``x @ W.T`` by the Mosaic GPU kernel over the kernel layout ``ops``
    (`gguf_kernel_layout`): ``x`` bfloat16 ``[M, K]`` -> ``[M, N]`` in ``out_dtype``
    (default ``x.dtype``; float32 gives the kernel's float32 sums unrounded).

    Args:
      x: bfloat16 ``[M, K]``.
      ops: `gguf_kernel_layout`'s dict (leading layer axis when ``layer`` is given).
      kind: int32 ``[L]`` with ``layer`` (or a scalar): each layer's index into ``fmts``.
      layer: int32 scalar or None (the layer is read in place).
      fmts: format names (static), as `gguf_kernel_layout` got them.
      splits: programs sharing a row tile's K range (default: the NF4 kernel's rule).
      stages: pipeline buffers in flight (default: up to 4 in the shared memory).
      out_dtype: the result's dtype (None: ``x.dtype``).

    Raises:
      ValueError: formats without a kernel, operands that disagree with ``x``.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    names = _names(fmts)
    if tuple(sorted(names)) not in _MIXES:
        raise ValueError(f"gguf_mgpu_kernel: no Mosaic GPU kernel for {names}")
    if layer is None:
        ops = {k: v[None] for k, v in ops.items()}
        kind, layer = jnp.reshape(kind, (1,)), 0
    kind = jnp.asarray(kind, jnp.int32).reshape(-1)
    layer = jnp.asarray(layer, jnp.int32)
    keys = tuple(sorted(ops))
    if x.ndim != 2 or x.dtype != jnp.bfloat16:
        raise ValueError(f"gguf_mgpu_kernel: x must be bfloat16 [M, K], got {x.dtype} {x.shape}")
    m, k = x.shape
    n, kp = ops["codes"].shape[1], ops["codes"].shape[2] * 8
    if kp != -(-k // STEP) * STEP or k % _SPECS[names[0]].block:
        raise ValueError(f"gguf_mgpu_kernel: x has K={k}, the codes hold {kp} (K rounded up "
                         f"to {STEP}) values per row")
    tiles_n, tiles_m, tiles_k = pl.cdiv(n, 64), pl.cdiv(m, BLOCK_M), kp // STEP
    if splits is None:
        splits = _default_splits(tiles_n * tiles_m, tiles_k)
    steps = _check_splits("gguf_mgpu_kernel", splits, tiles_k, f"K/{STEP}={tiles_k}")
    stages = stages or max(1, min(4, steps, _SMEM_BUDGET // _stage_bytes(names)))
    kernel = plgpu.kernel(
        functools.partial(_kernel_body, names=names, keys=keys, steps=steps, stages=stages),
        out_type=jax.ShapeDtypeStruct((splits, tiles_m, tiles_n * 64, BLOCK_M), jnp.float32),
        grid=(tiles_n, tiles_m, splits),
        grid_names=("n", "m", "s"),
    )
    # M > 8 is tiled by 8 rows: TMA boxes of 8-row tiles need M < 8 or a multiple of 8
    y = _sum_partials(kernel(layer.reshape(1), kind, _pad_rows(x), *(ops[key] for key in keys)), m)
    return y[:, :n].astype(out_dtype or x.dtype)


class _Config(NamedTuple):
    fmts: tuple
    k: int
    splits: int | None
    stages: int | None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mgpu_vjp(cfg: _Config, x, ops, kind, layer):
    return gguf_mgpu_kernel(x, ops, kind, layer, fmts=cfg.fmts, splits=cfg.splits, stages=cfg.stages)


def _mgpu_fwd(cfg, x, ops, kind, layer):
    return _mgpu_vjp(cfg, x, ops, kind, layer), (ops, kind, layer)


def _mgpu_bwd(cfg, residuals, dy):
    from pallas_kernels.dispatch import zero_cotangent

    ops, kind, layer = residuals
    w = gguf_mgpu_dequantize(ops, cfg.k, kind, layer, fmts=cfg.fmts).astype(dy.dtype)
    dx = lax.dot_general(dy, w, (((1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32).astype(dy.dtype)
    return (dx, jax.tree_util.tree_map(zero_cotangent, ops), zero_cotangent(kind),
            zero_cotangent(layer))


_mgpu_vjp.defvjp(_mgpu_fwd, _mgpu_bwd)


def gguf_mgpu_matmul(x: jax.Array, planes: dict | None, kind, *, fmts, layer=None,
                     kernel_layout: dict | None = None, splits: int | None = None,
                     stages: int | None = None) -> jax.Array:
    """``y = x @ W.T`` for a GGUF weight on Hopper: the call shape of
    `pallas_kernels.gguf_matmul.gguf_matmul` (``planes``, ``kind``, ``fmts``, ``layer``),
    so that a model can switch to it where `gguf_mgpu_supported` says yes.

    Args:
      x: bfloat16 ``[..., K]``.
      planes: the field planes (`pallas_kernels.gguf_matmul.split_blocks`; ``[L, ...]``
        with ``layer``), or None when ``kernel_layout`` is given.
      kind: int32 scalar (``[L]`` with ``layer``): the index into ``fmts``.
      fmts: format modules or names: one of `MGPU_FORMATS`, or Q4_K and Q6_K.
      layer: int32 scalar or None: the stacked layer, read in place.
      kernel_layout: `gguf_kernel_layout` of the planes, made once at load time; without
        it the layout is derived inside this call (correct, and slower: every call then
        re-packs the weight).
      splits, stages: tiling overrides (`gguf_mgpu_kernel`).

    Returns:
      ``[..., N]`` bfloat16 (float32 accumulation; see the module docstring's numerics).
      Differentiable in ``x`` as the Triton op is: ``dx = dy @ W`` with ``W`` dequantized
      from the kernel layout (`gguf_mgpu_dequantize`) and one XLA dot; the weight gets
      zero cotangents.

    Raises:
      TypeError: ``x`` not bfloat16.
      ValueError: formats without a kernel, operands that disagree with ``x``.
    """
    x = jnp.asarray(x)
    if x.dtype != jnp.bfloat16:
        raise TypeError(f"gguf_mgpu_matmul: x must be bfloat16, got {x.dtype}")
    names = _names(fmts)
    if kernel_layout is None:
        kernel_layout = gguf_kernel_layout(planes, names, kind)
    batch = x.shape[:-1]
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if layer is not None:
        layer = jnp.asarray(layer, jnp.int32)
    y = _mgpu_vjp(_Config(names, k, splits, stages), x2, dict(kernel_layout),
                  jnp.asarray(kind, jnp.int32), layer)
    return y.reshape(*batch, y.shape[-1])


# ---------------------------------------------------------------------------
# Reference (the oracle): what the kernel computes, in plain jnp over the kernel layout
# ---------------------------------------------------------------------------


def _reference_parts(name: str, ops: dict, n: int, k: int):
    """From the kernel layout of one weight: ``q [N, K]`` (float32 integers) and per
    sub-block ``scale``, ``bias`` (float32 ``[N, K // S]``; bias None) as the kernel
    decodes them."""
    spec = _SPECS[name]
    lo = _unpack_codes(ops["codes"])[:, :k]
    if name == "Q4_K" or name == "Q4_1":
        q = lo
    elif name == "Q4_0":
        q = lo - 8
    elif name == "Q6_K":
        q = lo + 16 * _unpack_hi2(ops["hi2"])[:, :k] - 32
    else:
        q = lo + 16 * _unpack_codes(ops["hi4"])[:, :k] - 128
    nb = k // spec.block
    bias = None
    if name == "Q4_K":
        rec = ops["rec"].reshape(n, nb, 4)
        d = lax.bitcast_convert_type((rec[..., 0] & 0xFFFF).astype(jnp.uint16), jnp.float16)
        dmin = lax.bitcast_convert_type((rec[..., 0] >> 16).astype(jnp.uint16), jnp.float16)
        sb = (rec[..., 1:, None] >> (8 * jnp.arange(4, dtype=jnp.uint32))) & 255
        sb = sb.reshape(n, nb, 12).astype(jnp.int32)
        lo_, mid, hi_ = sb[..., 0:4], sb[..., 4:8], sb[..., 8:12]
        sc = jnp.concatenate([lo_ & 63, (hi_ & 15) | ((lo_ >> 6) << 4)], axis=-1)
        mn = jnp.concatenate([mid & 63, (hi_ >> 4) | ((mid >> 6) << 4)], axis=-1)
        scale = d.astype(jnp.float32)[..., None] * sc.astype(jnp.float32)
        bias = -(dmin.astype(jnp.float32)[..., None] * mn.astype(jnp.float32))
    elif name == "Q6_K":
        rec = ops["rec"].reshape(n, nb, 4)
        sb = lax.bitcast_convert_type(rec, jnp.int8).reshape(n, nb, 16).astype(jnp.float32)
        d = ops["d"][:, :n].T.astype(jnp.float32)  # [N, nb]
        scale = d[..., None] * sb
    else:
        scale = ops["d"][:, :n].T.astype(jnp.float32)[..., None]
        if name == "Q4_1":
            bias = ops["m"][:, :n].T.astype(jnp.float32)[..., None]
    return q.astype(jnp.float32), scale.reshape(n, -1), None if bias is None else bias.reshape(n, -1)


def gguf_mgpu_dequantize(ops: dict, k: int, kind=0, layer=None, *, fmts) -> jax.Array:
    """The weight ``W [N, K]`` (float32, ``scale_j * q + bias_j`` per sub-block, gguf's
    values up to one float32 rounding) decoded back from the kernel layout ``ops``
    (`gguf_kernel_layout`; stacked with ``layer``): the backward of `gguf_mgpu_matmul`
    needs no field planes."""
    names = _names(fmts)
    if layer is not None:
        ops = {key: v[layer] for key, v in ops.items()}
        kind = jnp.asarray(kind)[layer]
    n = ops["codes"].shape[0]
    ws = []
    for name in names:
        s = _SPECS[name].sub
        q, scale, bias = _reference_parts(name, ops, n, k)
        w = q.reshape(n, k // s, s) * scale[..., None]
        if bias is not None:
            w = w.reshape(n, k // 32, 32) + bias[..., None]
        ws.append(w.reshape(n, k))
    out = ws[0]
    for i, w in enumerate(ws[1:], start=1):
        out = jnp.where(jnp.asarray(kind) == i, w, out)
    return out


def gguf_mgpu_reference(x: jax.Array, ops: dict, kind=0, layer=None, *, fmts) -> jax.Array:
    """What `gguf_mgpu_kernel` computes, in float32 jnp from the kernel layout: per
    sub-block ``P = sum q * x`` (float32), ``y = sum_j scale_j * P_j + bias_j * sum(x_j)``.
    ``x`` ``[M, K]`` (any float dtype, taken as float32); returns float32 ``[M, N]``.
    Decoding the kernel layout back, it also checks `gguf_kernel_layout`."""
    names = _names(fmts)
    if layer is not None:
        ops = {key: v[layer] for key, v in ops.items()}
        kind = jnp.asarray(kind)[layer]
    x = jnp.asarray(x).astype(jnp.float32)
    m, k = x.shape
    n = ops["codes"].shape[0]
    ys = []
    for name in names:
        s = _SPECS[name].sub
        q, scale, bias = _reference_parts(name, ops, n, k)
        p = jnp.einsum("mjs,njs->mnj", x.reshape(m, k // s, s), q.reshape(n, k // s, s),
                       precision=lax.Precision.HIGHEST)
        y = jnp.sum(p * scale[None], axis=-1)
        if bias is not None:  # per 32 values, as the kernel's sum(x)
            xs = x.reshape(m, k // 32, 32).sum(-1)
            y = y + jnp.einsum("mj,nj->mn", xs, bias, precision=lax.Precision.HIGHEST)
        ys.append(y)
    out = ys[0]
    for i, y in enumerate(ys[1:], start=1):
        out = jnp.where(jnp.asarray(kind) == i, y, out)
    return out
