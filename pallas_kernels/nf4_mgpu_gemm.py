"""NF4 GEMM on Hopper through Mosaic GPU for large M (prefill, training): ``y = x @ W.T``
and ``dx = dy @ W`` with the NF4 codes decoded inside the GEMM, so that no bfloat16 copy
of ``W`` is ever written to HBM.

Today's large-M path (`pallas_kernels.nf4_matmul`, M > 64) dequantizes the whole weight
to a bfloat16 ``[N, K]`` array in HBM and calls cuBLAS on it (H200: forward 1.09-1.20x,
transposed 1.10-1.43x the dense bfloat16 dot; issue 27). Here each program decodes the
``[block_n, 64]`` (forward) or ``[64, block_k]`` (transposed) tile of W it needs into
shared memory, once per K step, and the tensor cores (wgmma) read it from there; the
decode cost is spread over the ``block_m`` (default 128) rows of ``x`` that share it.

Design (after jax's ``jax/experimental/pallas/ops/gpu/hopper_matmul_mgpu.py``: a TMA
pipeline feeding wgmma with a float32 accumulator in registers, a tiled epilogue through
swizzled SMEM; the decode-to-SMEM step is `pallas_kernels.nf4_mgpu`'s transposed GEMV,
itself after tokamax's sm90 quantized ragged dot):

* Forward `nf4_mgpu_gemm`, grid ``(cdiv(M, block_m), cdiv(N, block_n))``, one warpgroup
  per program owning a ``[block_m, block_n]`` tile of ``y`` (default 128 x 128, or 128 x
  64 where that leaves fewer than two programs per SM: `_default_tile`). `plgpu.emit_pipeline`
  streams per K step of 64: the int4 codes ``[block_n, 64]`` (the bitcast view of bnb's
  packed bytes, see `nf4_mgpu._int4_view`), their scales ``scale[k, n0:n0 + block_n]``
  (`nf4_mgpu.nf4_kernel_scale`: one bfloat16 per row and 64-column block) and
  ``x [block_m, 64]``, by TMA, zero-filled past the edges. The codes are decoded in
  registers (`nf4_mgpu._nf4_dequant`: byte-permutes over the NF4 table held as PTX
  immediates, one ``fma.rn.bf16x2`` for the scale; with the codes in
  `nf4_mgpu.nf4_kernel_codes`' uint32 layout, `nf4_mgpu._nf4_dequant_words`, which needs
  no warp shuffles) and stored as bfloat16 to one of two
  swizzled SMEM tiles; wgmma multiplies ``x [block_m, 64]`` by that tile transposed
  (``W.T [64, block_n]``, K-major B) into ``acc [block_m, block_n]`` float32. With
  ``in_flight`` = 1 the two tiles alternate: step t+1's decode overlaps step t's wgmma,
  and the pipeline releases its buffers one step late.
* Transposed `nf4_mgpu_gemm_t` (``dx = dy @ W``, the input gradient), grid
  ``(cdiv(M, block_m), cdiv(K, block_k))``: per step of 64 rows of W (the reduction runs
  over N), the codes ``[64, block_k]``, their scales ``scale[k0 // 64 + j, n0:n0 + 64]``
  and ``dy [block_m, 64]``; each 64-column block j of the codes is decoded with its own
  per-row scale and stored to its 64 columns of the SMEM tile ``W [64, block_k]``, which
  wgmma reads as an N-major B.
* ``block_m=256`` (both directions): two compute warpgroups of 128 rows each and a third
  that only issues the TMA copies (`plgpu.emit_pipeline_warp_specialized`, as jax's
  ``hopper_matmul_mgpu.py``; 40 registers for it, 232 for the others). Per step each
  compute warpgroup decodes half of the W tile (64 of the 128 rows forward, one of the two
  64-column blocks transposed) into the step's shared bfloat16 tile, arrives at the
  step's mbarrier and waits for the other half, then issues its wgmma on the whole tile:
  the decode per multiply-add is half that of one warpgroup per 128 rows. Three decoded
  tiles rotate (a warpgroup waits only for its wgmma two steps back), 3 pipeline stages
  (189 KB of shared memory with the epilogue's 64-column slots), one program per SM.
* Shared memory: by default up to `_SMEM_PER_PROGRAM` (112 KB) per program, so that two
  programs, each one warpgroup, share an SM and one decodes while the other's wgmma runs
  (the default tiles: 3 pipeline stages, 95 KB; the epilogue's tile reuses the
  pipeline's space). ``stages=4`` gives one program per SM with a deeper pipeline.
* Epilogue: the float32 accumulator rounded to the output dtype, stored to a swizzled
  SMEM tile and copied to HBM by TMA. When M, N (K for the transposed kernel) do not
  divide the tiles, the output is allocated rounded up and sliced by XLA afterwards (the
  Llama-3-8B shapes at M a multiple of 128 need no slice).

Numerics: the dtype of the scale operand picks the rounding of W.

* float32 scales (`nf4_kernel_scale_f32`: the decoded absmax, double quantization
  included, not rounded): each weight is ``bf16(NF4[code] * absmax)`` of float32
  operands, the product rounded once to float32 and then to bfloat16, bit for bit the
  bfloat16 W of today's dequantize path (`nf4_dequantize_reference` / the Triton
  dequantize kernel rounded to bfloat16, bnb's ``dequantize_4bit``): the SAME products
  as dequantize-then-matmul. The decode (`_ASM8_EXACT`, `_ASM_EXACT`) looks each of
  the four bytes of the float32 codebook values up with byte-permutes, assembles the
  float32 values, multiplies (``mul.rn.f32``) and rounds pairs (``cvt.rn.bf16x2.f32``):
  about 7.5 instructions per weight against 3 for the bfloat16 rule.
* bfloat16 scales (`nf4_mgpu.nf4_kernel_scale`: absmax rounded to bfloat16 once): each
  weight is ``bf16(bf16(NF4[code]) * bf16(absmax))`` (one ``fma.rn.bf16x2``), the rule
  of `pallas_kernels.nf4_mgpu`'s kernels (M <= 64): within three bfloat16 roundings (3 *
  2**-8 relative) of the exact ``NF4[code] * absmax``, not bit-identical to the
  dequantize path.

Either way the products of the bfloat16 W with bfloat16 ``x`` are exact in float32 and
accumulated in float32 on the tensor cores (``wgmma ... f32.bf16.bf16``): the kernel
equals `nf4_mgpu_gemm_reference` (the same W in plain jnp) up to float32 summation
order. The tests check the references and (on a GPU) the kernels against float64
products of that W, and run the decode's inline PTX on the CPU through a small
interpreter of its instructions (bit for bit against bnb's rounding).

Restrictions (`nf4_mgpu_gemm_supported`; the wrappers raise ValueError on shapes): a
Hopper GPU (compute capability 9.0), bfloat16 ``x`` / ``dy``, ``K`` and ``blocksize``
multiples of 64, ``N`` a multiple of 8 (16-byte TMA rows of the scales), the transposed
kernel's ``block_k`` dividing ``K``, ``M >= 1`` (meant for ``M >= 64``: below that
`pallas_kernels.nf4_mgpu`'s GEMV layout is the one to use). The kernel has no CPU
interpret mode (Mosaic GPU's interpreter has no TMA): `nf4_mgpu_gemm_reference` and
`nf4_mgpu_gemm_reference_t` at the bottom are the oracles of
``tests/test_nf4_mgpu_gemm.py``; on a CPU machine the tests check the references against
float64 and lower both kernels for CUDA.

Status: lowered for CUDA on a CPU machine by jax 0.10.2 and by jax 0.11.2 (the GPU
machine's version; a Python 3.12 virtual environment), and compiled through
jax-cuda12-plugin 0.10.2's Mosaic GPU pipeline to PTX and by ptxas (CUDA 13.0) for
sm_90a with a stub driver (compute capability 9.0), M 4096 x W 4096x4096 (and M 512 for
the 128 x 64 default tile): no spills in any variant. One warpgroup: 191-201 registers
per thread with bfloat16 scales, 198-233 with float32 scales (95-96 KB of shared memory;
112 registers and 91 KB at 128 x 64); two warpgroups (block_m=256): 168 at launch with
setmaxnreg 232 / 40, 189-190 KB. Per K step the one-warpgroup forward with bfloat16
scales issues about 395 PTX instructions per thread with the `nf4_kernel_codes` words
and 500 with the bnb bytes (warp shuffles of the int4 relayout). On an H100 (2026-12-07) every
test of ``tests/test_nf4_mgpu_gemm.py`` passed; at M = 4096 the best variant (``block_m=256``,
bfloat16 scales) took 1.50-1.55x the dense bfloat16 dot and the float32-scale one 1.80-2.43x,
slower than dequantize-then-cuBLAS (1.11-1.30x; benchmarks/RESULTS.md), so
`pallas_kernels.nf4_matmul` does not use it by default (``MGPU_GEMM``).

Sources: bitsandbytes NF4 (``bitsandbytes.functional.quantize_4bit(quant_type="nf4")``,
Dettmers et al. 2023, QLoRA App. E: 16-entry codebook, absmax per ``blocksize``
block, optional double quantization of absmax); jax's Mosaic GPU examples
``hopper_matmul_mgpu.py`` (pipeline + wgmma + swizzled epilogue) and
``hopper_mixed_type_matmul_mgpu.py`` (registers -> wgmma); `pallas_kernels.nf4_mgpu`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.nf4_mgpu import (
    _NF4,
    _i32_to_vec,
    _int4_view,
    _nf4_dequant,
    _nf4_dequant_words,
    _pad_rows,
    _reference_weight,
    _swizzled,
    _vec_to_i8,
)

__all__ = ["nf4_mgpu_gemm", "nf4_mgpu_gemm_t", "nf4_mgpu_gemm_supported", "nf4_kernel_scale_f32",
           "nf4_mgpu_gemm_reference", "nf4_mgpu_gemm_reference_t"]


def nf4_mgpu_gemm_supported(m: int, n: int, k: int, blocksize: int, dtype) -> bool:
    """True when `nf4_mgpu_gemm` / `nf4_mgpu_gemm_t` handle ``x [m, k]`` (``dy [m, n]``)
    of ``dtype`` with an NF4 ``W [n, k]`` of this ``blocksize`` on this machine: bfloat16,
    ``k`` and ``blocksize`` multiples of 64, ``n`` a multiple of 8, ``m >= 1``, and the
    first device a Hopper GPU (compute capability 9.0)."""
    if jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16):
        return False
    if k % 64 or blocksize % 64 or n % 8 or m < 1 or n < 1 or k < 1:
        return False
    try:
        dev = jax.devices()[0]
    except RuntimeError:  # pragma: no cover
        return False
    return dev.platform == "gpu" and getattr(dev, "compute_capability", "") == "9.0"


# ---------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------

_CODE_BYTES = lambda rows, cols: rows * cols // 2  # noqa: E731  int4 tile bytes


def _epilogue(acc, o_gmem, m0, c0, *, out_dtype):
    """Round the float32 ``acc [block_m, block_c]`` (layout WGMMA) to ``out_dtype``,
    store it to a swizzled SMEM tile and copy it by TMA to ``o_gmem[m0:, c0:]``."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    bm, bc = acc.shape
    bits = 8 * jnp.dtype(out_dtype).itemsize
    swizzle = plgpu.find_swizzle(bits * bc, "epilogue")

    def store(o_smem):
        o_smem[...] = acc.astype(out_dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(m0, bm), pl.ds(c0, bc)])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(store, plgpu.SMEM((bm, bc), out_dtype, transforms=_swizzled(swizzle, bits)))


def _check_common(name, a, packed, scale, n, k, block_m, stages, in_flight,
                  block_ms=(64, 128, 256)):
    """The checks both wrappers share (see their Raises)."""
    words = packed.dtype == jnp.uint32
    if packed.dtype not in (jnp.uint8, jnp.uint32):
        raise ValueError(f"{name}: packed must be uint8 bnb bytes or uint32 "
                         f"`nf4_kernel_codes` words, got {packed.dtype}")
    if packed.ndim != 3 or scale.ndim != 3 \
            or packed.shape[1:] != (n, k // 8 if words else k // 2) \
            or scale.shape[1:] != (k // 64, n) or scale.shape[0] != packed.shape[0]:
        raise ValueError(f"{name}: {a.shape}, packed {packed.shape} {packed.dtype}, scale "
                         f"{scale.shape} disagree (want packed uint8 [(L,) N, K//2] or uint32 "
                         "[(L,) N, K//8], scale [(L,) K//64, N] bfloat16)")
    if a.dtype != jnp.bfloat16 or scale.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"{name}: activations must be bfloat16 and scale bfloat16 or "
                         f"float32, got {a.dtype}, {scale.dtype}")
    if k % 64 or n % 8 or k < 64 or n < 8:
        raise ValueError(f"{name}: K={k} must be a multiple of 64 and N={n} of 8")
    if block_m not in block_ms:
        raise ValueError(f"{name}: block_m={block_m} must be one of {block_ms}")
    if in_flight not in (0, 1):
        raise ValueError(f"{name}: in_flight={in_flight} must be 0 or 1")
    if stages is not None and stages < 1:
        raise ValueError(f"{name}: stages={stages} must be >= 1")


def _codes_operand(packed, n, k):
    """The kernels' codes operand: uint32 words as they are, bnb bytes as the int4 view."""
    return packed if packed.dtype == jnp.uint32 else _int4_view(packed, n, k)


#: Shared memory the two-warpgroup kernels (``block_m`` 256, one program per SM) keep
#: their pipeline, decoded tiles and epilogue within (of the 227 KB a block may have).
_SMEM_WS = 216 * 1024

#: Shared memory per program the default plan keeps within, so that two programs (two
#: warpgroups: one decodes while the other's wgmma runs) fit one SM's 228 KB.
_SMEM_PER_PROGRAM = 112 * 1024


#: Programs the default tile aims for: two per SM of a 132-SM H100 / H200 (the
#: one-warpgroup kernels run two per SM).
_TARGET_PROGRAMS = 264


def _default_tile(m: int, cols: int, block_m: int) -> int:
    """The default output-column tile (forward ``block_n``, transposed ``block_k``): 128,
    or 64 where 128 leaves fewer than `_TARGET_PROGRAMS` programs (M = 512 with 4096
    columns: 128 programs of 128 x 128, 256 of 128 x 64; the decode per multiply-add
    stays one per ``block_m`` rows). Always 128 for ``block_m`` 256."""
    if block_m == 256 or pl.cdiv(m, block_m) * pl.cdiv(cols, 128) >= _TARGET_PROGRAMS:
        return 128
    return 64


def _stages(stages, steps, per_stage, fixed, in_flight):
    """Pipeline buffers: given, or as many (up to 4) as fit `_SMEM_PER_PROGRAM` after
    ``fixed`` bytes of scratch; at least 2 with ``in_flight`` (buffers are released a step
    late)."""
    if stages is None:
        stages = max(1, min(4, steps, (_SMEM_PER_PROGRAM - fixed) // per_stage))
    return max(stages, 2) if in_flight else stages


# ---------------------------------------------------------------------------
# The exact decode (float32 scales): bf16(NF4[code] * absmax) in float32, bnb's rounding
# ---------------------------------------------------------------------------

#: bitsandbytes' NF4 codebook as float32 bit patterns, and its four byte planes as
#: 32-bit immediates (plane b, word w: byte b of codes 4w..4w+3), for `_exact_ptx`.
_NF4_F32_BITS = _NF4.astype(np.float32).view(np.uint32)
_PLANES = [[int(sum(((int(_NF4_F32_BITS[4 * w + i]) >> (8 * b)) & 0xFF) << (8 * i)
                    for i in range(4))) for w in range(4)] for b in range(4)]


def _exact_ptx(idx: str, sel: str, scales: tuple, pairs: tuple, outs: tuple) -> list[str]:
    """PTX of the exact decode of four codes: ``idx`` holds their low 3 bits as prmt
    selector nibbles (code ``i`` in nibble ``i``), ``sel`` the selectors that take the
    upper half of the table for codes >= 8 (as in `nf4_mgpu._lookup_ptx`). Each of the four
    bytes of the float32 codebook values is looked up as its own plane (3 prmt), the
    planes are interleaved into the four float32 values ``f0..f3`` (8 prmt), multiplied by
    the float32 ``scales[i]`` (``mul.rn.f32``) and rounded in pairs to bfloat16
    (``cvt.rn.bf16x2.f32``, round to nearest even): ``outs[j]`` gets codes ``pairs[j] =
    (lo, hi)`` (``lo`` in the low half)."""
    lines = []
    for b in range(4):
        lines += [f"prmt.b32 q0, {_PLANES[b][0]}, {_PLANES[b][1]}, {idx};",
                  f"prmt.b32 q1, {_PLANES[b][2]}, {_PLANES[b][3]}, {idx};",
                  f"prmt.b32 b{b}, q0, q1, {sel};"]
    lines += ["prmt.b32 l01, b0, b1, 0x5140;", "prmt.b32 h01, b2, b3, 0x5140;",
              "prmt.b32 l23, b0, b1, 0x7362;", "prmt.b32 h23, b2, b3, 0x7362;",
              "prmt.b32 f0, l01, h01, 0x5410;", "prmt.b32 f1, l01, h01, 0x7632;",
              "prmt.b32 f2, l23, h23, 0x5410;", "prmt.b32 f3, l23, h23, 0x7632;"]
    lines += [f"mul.rn.f32 f{i}, f{i}, {scales[i]};" for i in range(4)]
    lines += [f"cvt.rn.bf16x2.f32 {o}, f{hi}, f{lo};" for o, (lo, hi) in zip(outs, pairs)]
    return lines


_EXACT_REGS = (".reg .b32 idx, sel, ih, sh, q0, q1, b0, b1, b2, b3, l01, h01, l23, h23;\n"
               ".reg .f32 f0, f1, f2, f3;")

#: Four codes (selector nibbles in $2's low 16 bits: register a's byte, then b's; the
#: int4 view holds bnb's element 2i in the HIGH nibble, so a pair is (nibble 1, nibble 0))
#: -> two bfloat16 pairs ($0 for a, $1 for b), scaled by the float32 $3 (a) and $4 (b).
_ASM_EXACT = "\n".join(["{", _EXACT_REGS,
                        "and.b32 idx, $2, 0x7777;", "and.b32 sel, $2, 0x8888;",
                        "shr.u32 sel, sel, 1;", "or.b32 sel, sel, 0x3210;",
                        *_exact_ptx("idx", "sel", ("$3", "$3", "$4", "$4"), ((1, 0), (3, 2)),
                                    ("$0", "$1")), "}"])

#: Eight codes (the word $4, code i in nibble i) -> four bfloat16 pairs $0..$3 (pair t:
#: codes 2t, 2t+1, low half first), scaled by the float32 $5.
_ASM8_EXACT = "\n".join(["{", _EXACT_REGS,
                         "and.b32 idx, $4, 0x77777777;", "and.b32 sel, $4, 0x88888888;",
                         "shr.u32 sel, sel, 1;", "or.b32 sel, sel, 0x32103210;",
                         "shr.u32 ih, idx, 16;", "shr.u32 sh, sel, 16;",
                         *_exact_ptx("idx", "sel", ("$5",) * 4, ((0, 1), (2, 3)),
                                     ("$0", "$1")),
                         *_exact_ptx("ih", "sh", ("$5",) * 4, ((0, 1), (2, 3)),
                                     ("$2", "$3")),
                         "}"])


def _f32_bits(s_smem, index):
    """The float32 at ``s_smem[index]`` as an i32 (the inline PTX's ``r`` operand)."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, memref
    return arith.bitcast(ir.IntegerType.get_signless(32), memref.load(s_smem, index))


def _nf4_dequant_exact(codes, scale_ref):
    """`nf4_mgpu._nf4_dequant` with bitsandbytes' rounding: bfloat16 ``bf16(NF4[code] *
    scale[row])`` computed in float32 (`_ASM_EXACT`) for an int4 ``codes [rows, c]`` value
    in layout ``WGMMA``; ``scale_ref`` a ``[rows]`` float32 SMEM ref. Result in layout
    ``WGMMA``, one bfloat16 pair per register."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from jax.experimental.mosaic import gpu as mgpu
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm

    layout = plgpu.Layout.WGMMA

    @plgpu.inline_mgpu(
        arg_types=(layout, plgpu.RefType()),
        return_type=plgpu.ShapeDtypeStruct(codes.shape, jnp.bfloat16, layout),
    )
    def dequant(_, w, s_smem):
        i32 = ir.IntegerType.get_signless(32)
        c = lambda v: arith.constant(i32, ir.IntegerAttr.get(i32, v))  # noqa: E731
        struct = llvm.StructType.get_literal([i32, i32])
        pair_ty = ir.VectorType.get((2,), ir.BF16Type.get())
        strides = w.layout.tiling.tile_strides(tuple(mgpu.utils.get_contiguous_strides(w.shape)))
        regs, scales = [], {}
        for idx, reg_idx in zip(w.layout.thread_idxs(w.shape), np.ndindex(w.registers.shape)):
            key = sum(i * st for i, st in zip(reg_idx, strides)) // w.shape[1]
            if key not in scales:  # one load per row the thread's registers lie in
                scales[key] = _f32_bits(s_smem, [idx[0]])
            regs.append((scales[key], reg_idx))
        assert len(regs) % 2 == 0, len(regs)
        new_regs = np.empty_like(w.registers)
        for (sa, ra), (sb, rb) in zip(regs[0::2], regs[1::2]):
            bytes_ = [arith.extui(i32, _vec_to_i8(w.registers[r])) for r in (ra, rb)]
            sel = arith.ori(bytes_[0], arith.shli(bytes_[1], c(8)))
            res = llvm.inline_asm(struct, [sel, sa, sb], _ASM_EXACT, "=r,=r,r,r,r")
            for j, r in enumerate((ra, rb)):
                out = llvm.extractvalue(i32, res, ir.DenseI64ArrayAttr.get([j]))
                new_regs[r] = _i32_to_vec(out, pair_ty)
        return mgpu.FragmentedArray(_registers=new_regs, _layout=w.layout, _is_signed=None)

    return dequant(codes, scale_ref)


def _nf4_dequant_words_exact(words, scale_ref, sub: int):
    """`nf4_mgpu._nf4_dequant_words` with bitsandbytes' rounding (`_ASM8_EXACT`): the
    ``sub`` bfloat16 ``[64, 64]`` blocks (layout ``WGMMA``) of ``bf16(NF4[code] *
    scale[j, row])`` computed in float32, for a uint32 ``words [64, 8 * sub]`` tile of the
    `nf4_kernel_codes` layout (layout ``WGMMA``); ``scale_ref`` the ``[sub, 64]`` float32
    SMEM scales."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from jax.experimental.mosaic import gpu as mgpu
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, vector

    layout = plgpu.Layout.WGMMA
    out_ty = plgpu.ShapeDtypeStruct((64, 64), jnp.bfloat16, layout)

    @plgpu.inline_mgpu(arg_types=(layout, plgpu.RefType()),
                       return_type=tuple(out_ty for _ in range(sub)))
    def dequant(_, w, s_smem):
        i32 = ir.IntegerType.get_signless(32)
        index = ir.IndexType.get()
        struct = llvm.StructType.get_literal([i32] * 4)
        pair_ty = ir.VectorType.get((2,), ir.BF16Type.get())

        def offsets(arr_layout, shape):  # register index -> static (row, col) offset
            strides = arr_layout.tiling.tile_strides(
                tuple(mgpu.utils.get_contiguous_strides(shape)))
            return {r: divmod(sum(i * st for i, st in zip(r, strides)), shape[1])
                    for r in np.ndindex(arr_layout.registers_shape(shape))}

        src = {}  # the words of each (row offset, word column)
        for r, (ro, co) in offsets(w.layout, w.shape).items():
            for e in range(2):
                src[(ro, co + e)] = vector.extract(w.registers[r], [], [e])
        out_layout = mgpu.WGMMA_LAYOUT
        out_offsets = offsets(out_layout, (64, 64))
        rows = {r: idx[0] for r, idx in zip(np.ndindex(out_layout.registers_shape((64, 64))),
                                             out_layout.thread_idxs((64, 64)))}
        by_off = {off: r for r, off in out_offsets.items()}
        row_offs = sorted({ro for ro, _ in out_offsets.values()})
        outs = []
        for j in range(sub):
            regs = np.empty(out_layout.registers_shape((64, 64)), dtype=object)
            for row_off in row_offs:
                scale = _f32_bits(s_smem, [arith.constant(index, j),
                                           rows[by_off[(row_off, 0)]]])
                for e in range(2):  # word column 8 j + e of this thread's quad: pairs 4 e + t
                    word = src[(row_off, 8 * j + e)]
                    res = llvm.inline_asm(struct, [word, scale], _ASM8_EXACT,
                                          "=r,=r,=r,=r,r,r")
                    for t in range(4):
                        out = llvm.extractvalue(i32, res, ir.DenseI64ArrayAttr.get([t]))
                        regs[by_off[(row_off, 8 * (4 * e + t))]] = _i32_to_vec(out, pair_ty)
            assert all(x is not None for x in regs.flat)
            outs.append(mgpu.FragmentedArray(_registers=regs, _layout=out_layout,
                                             _is_signed=None))
        return tuple(outs)

    return dequant(words, scale_ref)


def _decoders(scale_dtype):
    """The (int4 view, words) decoders for a scale operand of this dtype: bfloat16 scales
    take `nf4_mgpu`'s ``fma.rn.bf16x2`` rule, float32 scales the exact one."""
    if jnp.dtype(scale_dtype) == jnp.dtype(jnp.float32):
        return _nf4_dequant_exact, _nf4_dequant_words_exact
    return _nf4_dequant, _nf4_dequant_words


# ---------------------------------------------------------------------------
# Forward: y = x @ W.T
# ---------------------------------------------------------------------------


def _fwd_body(layer_ref, x_gmem, w_gmem, s_gmem, o_gmem, *, block_m: int, block_n: int,
              steps: int, stages: int, in_flight: int, out_dtype):
    """One program: ``y[m0:m0 + block_m, n0:n0 + block_n]`` over all of K in ``steps``
    steps of 64 (see the module docstring)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    mi, ni = lax.axis_index("m"), lax.axis_index("n")
    layer = layer_ref[0]
    words = w_gmem.dtype == jnp.uint32  # `nf4_kernel_codes` layout, else the int4 view
    dequant, dequant_words = _decoders(s_gmem.dtype)
    c_swizzle = plgpu.find_swizzle(4 * 64, "codes")  # 32 bytes: 64 codes of 4 bits
    swizzle = plgpu.find_swizzle(16 * 64, "wgmma operands")  # 128 bytes
    bufs = 2 if in_flight else 1

    def compute(acc_ref, w_smem):
        def step(idx, c_smem, x_smem, s_smem):
            buf = w_smem.at[lax.rem(idx[0], bufs)] if bufs > 1 else w_smem.at[0]
            if words:  # per 64-row slab: [64, 8] words -> one [64, 64] bfloat16 block
                for r in range(block_n // 64):
                    rows = pl.ds(64 * r, 64)
                    wr = plgpu.load(c_smem.at[rows], (), layout=plgpu.Layout.WGMMA)
                    (blk,) = dequant_words(wr, s_smem.at[:, rows], 1)
                    buf.at[rows][...] = blk
            else:
                codes = plgpu.load(c_smem, (), layout=plgpu.Layout.WGMMA_UPCAST_4X)
                buf[...] = dequant(plgpu.layout_cast(codes, plgpu.Layout.WGMMA), s_smem.at[0])
            plgpu.commit_smem()  # the generic-proxy stores, visible to wgmma
            plgpu.wgmma(acc_ref, x_smem, plgpu.transpose_ref(buf, (1, 0)))
            plgpu.wgmma_wait(in_flight)

        c_spec = plgpu.BlockSpec((block_n, 8) if words else (block_n, 64), lambda t: (ni, t),
                                 transforms=_swizzled(c_swizzle, 32 if words else 4),
                                 delay_release=in_flight)
        x_spec = plgpu.BlockSpec((block_m, 64), lambda t: (mi, t),
                                 transforms=_swizzled(swizzle, 16), delay_release=in_flight)
        s_spec = plgpu.BlockSpec((1, block_n), lambda t: (t, ni), delay_release=in_flight)
        plgpu.emit_pipeline(step, grid=(steps,), in_specs=(c_spec, x_spec, s_spec),
                            max_concurrent_steps=stages)(
            w_gmem.at[layer], x_gmem, s_gmem.at[layer])
        plgpu.wgmma_wait(0)
        return acc_ref[...]

    acc = pl.run_scoped(compute, plgpu.ACC((block_m, block_n)),
                        plgpu.SMEM((bufs, block_n, 64), jnp.bfloat16,
                                   transforms=_swizzled(swizzle, 16)))
    _epilogue(acc, o_gmem, mi * block_m, ni * block_n, out_dtype=out_dtype)


#: Decoded W tiles the two-warpgroup kernels cycle through: a warpgroup writes tile t + 1
#: while the other's wgmma t - 1 may still read tile t - 1 (it waits for wgmma t - 2 only,
#: before it arrives at step t's barrier), so three.
_WS_TILES = 3


def _ws_epilogue(acc, o_gmem, out_smem, r0, c0, wg):
    """The two-warpgroup kernels' epilogue: warpgroup ``wg`` writes its float32 ``acc
    [128, cols]`` rounded to ``out_smem``'s dtype to ``o_gmem[r0:r0 + 128, c0:]`` in
    64-column pieces through its slot of ``out_smem [2, 128, 64]`` (TMA stores)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    acc = acc.astype(out_smem.dtype)
    for j in range(acc.shape[1] // 64):
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the slot's last store has read it
        out_smem[wg] = acc[:, j * 64:(j + 1) * 64]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem.at[wg],
                                o_gmem.at[pl.ds(r0, 128), pl.ds(c0 + 64 * j, 64)])
    plgpu.wait_smem_to_gmem(0)


def _fwd_ws_body(layer_ref, x_gmem, w_gmem, s_gmem, o_gmem, *, block_n: int, steps: int,
                 stages: int, out_dtype):
    """One program of the two-warpgroup forward kernel (``block_m`` 256): warpgroups 0 and 1
    each own 128 rows of ``y``'s ``[256, block_n]`` tile, warpgroup 2 issues the TMA copies
    (`plgpu.emit_pipeline_warp_specialized`, after jax's ``hopper_matmul_mgpu.py``). Per K
    step each compute warpgroup decodes HALF of the ``[block_n, 64]`` W tile (its
    ``block_n // 2`` rows) into the shared bfloat16 tile of this step, arrives at the
    step's barrier and waits for the other half; then both multiply the whole tile. The
    decode per product is half that of `_fwd_body`."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    mi, ni = lax.axis_index("m"), lax.axis_index("n")
    layer = layer_ref[0]
    words = w_gmem.dtype == jnp.uint32
    dequant, dequant_words = _decoders(s_gmem.dtype)
    half = block_n // 2
    c_swizzle = plgpu.find_swizzle(4 * 64, "codes")
    swizzle = plgpu.find_swizzle(16 * 64, "wgmma operands")  # 128 bytes
    out_swizzle = plgpu.find_swizzle(64 * 8 * jnp.dtype(out_dtype).itemsize, "out")

    c_spec = plgpu.BlockSpec((block_n, 8) if words else (block_n, 64), lambda t: (ni, t),
                             transforms=_swizzled(c_swizzle, 32 if words else 4),
                             delay_release=1)
    x_spec = plgpu.BlockSpec((256, 64), lambda t: (mi, t), transforms=_swizzled(swizzle, 16),
                             delay_release=1)
    s_spec = plgpu.BlockSpec((1, block_n), lambda t: (t, ni), delay_release=1)

    def scope(dec, bar, out_smem):
        wg = lax.axis_index("wg")

        def decode_half(c_smem, s_smem, buf, w):
            rows = slice(w * half, (w + 1) * half)
            if words:
                for r in range(half // 64):
                    sl = slice(w * half + 64 * r, w * half + 64 * r + 64)
                    wr = plgpu.load(c_smem.at[sl], (), layout=plgpu.Layout.WGMMA)
                    (blk,) = dequant_words(wr, s_smem.at[:, sl], 1)
                    buf.at[sl][...] = blk
            else:
                codes = plgpu.load(c_smem.at[rows], (), layout=plgpu.Layout.WGMMA_UPCAST_4X)
                buf.at[rows][...] = dequant(
                    plgpu.layout_cast(codes, plgpu.Layout.WGMMA), s_smem.at[0, rows])

        def step(idx, c_smem, x_smem, s_smem, acc_ref):
            slot = lax.rem(idx[0], _WS_TILES)
            buf = dec.at[slot]
            for w in range(2):
                pl.when(wg == w)(functools.partial(decode_half, c_smem, s_smem, buf, w))
            plgpu.commit_smem()  # this warpgroup's stores, visible to the async proxy
            plgpu.barrier_arrive(bar.at[slot])
            plgpu.barrier_wait(bar.at[slot])  # both halves of the tile are in SMEM
            plgpu.wgmma(acc_ref, x_smem.at[pl.ds(wg * 128, 128)],
                        plgpu.transpose_ref(buf, (1, 0)))
            plgpu.wgmma_wait(1)
            return acc_ref

        def compute_context(eval_pipeline):
            def acc_scope(acc_ref):
                eval_pipeline(acc_ref)
                plgpu.wgmma_wait(0)
                _ws_epilogue(acc_ref[...], o_gmem, out_smem, mi * 256 + wg * 128,
                             ni * block_n, wg)
            pl.run_scoped(acc_scope, plgpu.ACC((128, block_n)))

        plgpu.emit_pipeline_warp_specialized(
            step, grid=(steps,), memory_registers=40, in_specs=(c_spec, x_spec, s_spec),
            wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=stages,
            compute_context=compute_context)(w_gmem.at[layer], x_gmem, s_gmem.at[layer])

    pl.run_scoped(scope,
                  plgpu.SMEM((_WS_TILES, block_n, 64), jnp.bfloat16,
                             transforms=_swizzled(swizzle, 16)),
                  plgpu.Barrier(num_arrivals=2, num_barriers=_WS_TILES),
                  plgpu.SMEM((2, 128, 64), out_dtype,
                             transforms=_swizzled(out_swizzle, 8 * jnp.dtype(out_dtype).itemsize)),
                  collective_axes="wg")


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "stages", "in_flight",
                                             "out_dtype"))
def nf4_mgpu_gemm(x: jax.Array, packed: jax.Array, scale: jax.Array, layer=None, *,
                  block_m: int = 128, block_n: int | None = None, stages: int | None = None,
                  in_flight: int = 1, out_dtype=None) -> jax.Array:
    """``y = x @ W.T`` for an NF4 ``W [N, K]`` in bitsandbytes' packed bytes, on Hopper,
    decoding W tile by tile into shared memory (no bfloat16 W in HBM).

    Args:
      x: ``[M, K]`` bfloat16 activations.
      packed: ``[N, K // 2]`` uint8 bnb codes (element ``2i`` of a row in the HIGH
        nibble), or ``[L, N, K // 2]`` stacked layers with ``layer`` given; or the same
        codes in `pallas_kernels.nf4_mgpu.nf4_kernel_codes`' layout, uint32
        ``[(L,) N, K // 8]`` (decoded without shuffles; ``block_n`` a multiple of 64).
      scale: the decoded absmax as ``[K // 64, N]`` (``[L, K // 64, N]`` when stacked):
        float32 (`nf4_kernel_scale_f32`) for W rounded as bnb's dequantize rounds it,
        bit for bit; bfloat16 (`pallas_kernels.nf4_mgpu.nf4_kernel_scale`) for the
        cheaper ``fma.rn.bf16x2`` rule (see the module docstring).
      layer: int32 scalar, the stacked layer to multiply (read in place), or None.
      block_m: rows of ``x`` per program: 64 or 128 (one warpgroup, wgmma's M), or 256:
        two compute warpgroups of 128 rows share each decoded W tile and a third issues
        the TMA copies (`_fwd_ws_body`; half the decode per product; ``block_n`` 128;
        ``in_flight`` does not apply).
      block_n: rows of W per program, wgmma's N (a multiple of 8 up to 256; default
        `_default_tile`: 128, or 64 where 128 leaves the GPU short of programs).
      stages: pipeline buffers in flight (default: up to 4 within `_SMEM_PER_PROGRAM`,
        3 for the default tiles: two programs per SM).
      in_flight: 1 (default): two decoded tiles alternate and one wgmma stays in flight
        while the next tile is decoded; 0: wait for each wgmma.
      out_dtype: the result's dtype (default ``x.dtype``; float32 keeps the accumulator).

    Returns:
      ``[M, N]`` in ``out_dtype``.

    Raises:
      ValueError: ``x``, ``packed`` and ``scale`` of disagreeing shapes or dtypes, ``K``
        not a multiple of 64 or ``N`` not of 8, or a bad ``block_m``, ``block_n``,
        ``stages`` or ``in_flight``.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    name = "nf4_mgpu_gemm"
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if layer is None:
        packed, scale, layer = packed[None], scale[None], 0
    if x.ndim != 2:
        raise ValueError(f"{name}: x must be [M, K], got {x.shape}")
    m, k = x.shape
    n = packed.shape[1] if packed.ndim == 3 else -1
    _check_common(name, x, packed, scale, n, k, block_m, stages, in_flight)
    block_n = block_n or _default_tile(m, n, block_m)
    if block_n % 8 or not 8 <= block_n <= 256 or (packed.dtype == jnp.uint32 and block_n % 64):
        raise ValueError(f"{name}: block_n={block_n} must be a multiple of 8 in [8, 256] "
                         "(of 64 with uint32 words)")
    steps = k // 64
    tiles_m, tiles_n = pl.cdiv(m, block_m), pl.cdiv(n, block_n)
    mp, np_ = tiles_m * block_m, tiles_n * block_n
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    operands = (layer, _pad_rows(x), _codes_operand(packed, n, k), scale)
    if block_m == 256:  # two compute warpgroups share each decoded tile
        if block_n != 128:
            raise ValueError(f"{name}: block_n={block_n} must be 128 with block_m=256 "
                             "(each warpgroup decodes 64 rows; a 128x256 accumulator "
                             "spills)")
        per_stage = _CODE_BYTES(block_n, 64) + 256 * 64 * 2 + block_n * scale.dtype.itemsize
        fixed = _WS_TILES * block_n * 64 * 2 + 2 * 128 * 64 * out_dtype.itemsize
        stages = stages or max(2, min(4, (_SMEM_WS - fixed) // per_stage))
        if stages < 2:
            raise ValueError(f"{name}: stages={stages} must be >= 2 with block_m=256")
        kernel = plgpu.kernel(
            functools.partial(_fwd_ws_body, block_n=block_n, steps=steps, stages=stages,
                              out_dtype=out_dtype),
            out_type=jax.ShapeDtypeStruct((mp, np_), out_dtype),
            grid=(tiles_m, tiles_n), grid_names=("m", "n"),
            num_threads=3, thread_name="wg")
        y = kernel(*operands)
        return y if (mp, np_) == (m, n) else y[:m, :n]
    if steps < 2:
        in_flight = 0
    bufs = 2 if in_flight else 1
    per_stage = _CODE_BYTES(block_n, 64) + block_m * 64 * 2 + block_n * scale.dtype.itemsize
    fixed = bufs * block_n * 64 * 2  # the epilogue's tile reuses the pipeline's SMEM
    stages = _stages(stages, steps, per_stage, fixed, in_flight)
    kernel = plgpu.kernel(
        functools.partial(_fwd_body, block_m=block_m, block_n=block_n, steps=steps,
                          stages=stages, in_flight=in_flight, out_dtype=out_dtype),
        out_type=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        grid=(tiles_m, tiles_n),
        grid_names=("m", "n"),
    )
    y = kernel(*operands)
    return y if (mp, np_) == (m, n) else y[:m, :n]


# ---------------------------------------------------------------------------
# Transposed: dx = dy @ W (the backward of y = x @ W.T)
# ---------------------------------------------------------------------------


def _t_body(layer_ref, dy_gmem, w_gmem, s_gmem, o_gmem, *, block_m: int, block_k: int,
            steps: int, stages: int, in_flight: int, out_dtype):
    """One program: ``dx[m0:m0 + block_m, k0:k0 + block_k]`` over all of N in ``steps``
    steps of 64 rows of W (see the module docstring)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    mi, ki = lax.axis_index("m"), lax.axis_index("k")
    layer = layer_ref[0]
    words = w_gmem.dtype == jnp.uint32  # `nf4_kernel_codes` layout, else the int4 view
    dequant, dequant_words = _decoders(s_gmem.dtype)
    sub = block_k // 64
    c_swizzle = plgpu.find_swizzle(4 * block_k, "codes")
    swizzle = plgpu.find_swizzle(16 * 64, "wgmma operands")  # 128 bytes
    bufs = 2 if in_flight else 1

    def compute(acc_ref, w_smem):
        def step(idx, c_smem, dy_smem, s_smem):
            buf = w_smem.at[lax.rem(idx[0], bufs)] if bufs > 1 else w_smem.at[0]
            if words:  # [64, 8 * sub] words -> sub [64, 64] bfloat16 blocks
                blocks = dequant_words(plgpu.load(c_smem, (), layout=plgpu.Layout.WGMMA),
                                       s_smem, sub)
            else:
                codes = plgpu.load(c_smem, (), layout=plgpu.Layout.WGMMA_UPCAST_4X)
            for j in range(sub):
                if words:
                    blk = blocks[j]
                else:
                    cj = plgpu.layout_cast(codes[:, j * 64:(j + 1) * 64], plgpu.Layout.WGMMA)
                    blk = dequant(cj, s_smem.at[j])
                buf.at[:, j * 64:(j + 1) * 64][...] = blk
            plgpu.commit_smem()  # the generic-proxy stores, visible to wgmma
            plgpu.wgmma(acc_ref, dy_smem, buf)
            plgpu.wgmma_wait(in_flight)

        c_spec = plgpu.BlockSpec((64, block_k // 8) if words else (64, block_k),
                                 lambda t: (t, ki),
                                 transforms=_swizzled(c_swizzle, 32 if words else 4),
                                 delay_release=in_flight)
        dy_spec = plgpu.BlockSpec((block_m, 64), lambda t: (mi, t),
                                  transforms=_swizzled(swizzle, 16), delay_release=in_flight)
        s_spec = plgpu.BlockSpec((sub, 64), lambda t: (ki, t), delay_release=in_flight)
        plgpu.emit_pipeline(step, grid=(steps,), in_specs=(c_spec, dy_spec, s_spec),
                            max_concurrent_steps=stages)(
            w_gmem.at[layer], dy_gmem, s_gmem.at[layer])
        plgpu.wgmma_wait(0)
        return acc_ref[...]

    acc = pl.run_scoped(compute, plgpu.ACC((block_m, block_k)),
                        plgpu.SMEM((bufs, 64, block_k), jnp.bfloat16,
                                   transforms=_swizzled(swizzle, 16)))
    _epilogue(acc, o_gmem, mi * block_m, ki * block_k, out_dtype=out_dtype)


def _t_ws_body(layer_ref, dy_gmem, w_gmem, s_gmem, o_gmem, *, block_k: int, steps: int,
               stages: int, out_dtype):
    """One program of the two-warpgroup transposed kernel (``block_m`` 256): warpgroups 0 and
    1 each own 128 rows of ``dx``'s ``[256, block_k]`` tile, warpgroup 2 issues the TMA
    copies. Per step of 64 rows of W each compute warpgroup decodes half of the ``[64,
    block_k]`` tile's 64-column blocks into the shared bfloat16 tile of this step, arrives
    at the step's barrier and waits for the other half; then both multiply the whole tile
    (see `_fwd_ws_body`)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    mi, ki = lax.axis_index("m"), lax.axis_index("k")
    layer = layer_ref[0]
    words = w_gmem.dtype == jnp.uint32
    dequant, dequant_words = _decoders(s_gmem.dtype)
    sub = block_k // 64
    c_swizzle = plgpu.find_swizzle(4 * block_k, "codes")
    swizzle = plgpu.find_swizzle(16 * 64, "wgmma operands")  # 128 bytes
    out_swizzle = plgpu.find_swizzle(64 * 8 * jnp.dtype(out_dtype).itemsize, "out")

    c_spec = plgpu.BlockSpec((64, block_k // 8) if words else (64, block_k), lambda t: (t, ki),
                             transforms=_swizzled(c_swizzle, 32 if words else 4),
                             delay_release=1)
    dy_spec = plgpu.BlockSpec((256, 64), lambda t: (mi, t), transforms=_swizzled(swizzle, 16),
                              delay_release=1)
    s_spec = plgpu.BlockSpec((sub, 64), lambda t: (ki, t), delay_release=1)

    def scope(dec, bar, out_smem):
        wg = lax.axis_index("wg")

        def decode_half(c_smem, s_smem, buf, w):
            blocks = range(w * sub // 2, (w + 1) * sub // 2)
            if words:
                allw = plgpu.load(c_smem, (), layout=plgpu.Layout.WGMMA)
            else:
                codes = plgpu.load(c_smem, (), layout=plgpu.Layout.WGMMA_UPCAST_4X)
            for j in blocks:
                if words:
                    (blk,) = dequant_words(allw[:, 8 * j:8 * j + 8], s_smem.at[j:j + 1], 1)
                else:
                    cj = plgpu.layout_cast(codes[:, j * 64:(j + 1) * 64], plgpu.Layout.WGMMA)
                    blk = dequant(cj, s_smem.at[j])
                buf.at[:, j * 64:(j + 1) * 64][...] = blk

        def step(idx, c_smem, dy_smem, s_smem, acc_ref):
            slot = lax.rem(idx[0], _WS_TILES)
            buf = dec.at[slot]
            for w in range(2):
                pl.when(wg == w)(functools.partial(decode_half, c_smem, s_smem, buf, w))
            plgpu.commit_smem()  # this warpgroup's stores, visible to the async proxy
            plgpu.barrier_arrive(bar.at[slot])
            plgpu.barrier_wait(bar.at[slot])  # both halves of the tile are in SMEM
            plgpu.wgmma(acc_ref, dy_smem.at[pl.ds(wg * 128, 128)], buf)
            plgpu.wgmma_wait(1)
            return acc_ref

        def compute_context(eval_pipeline):
            def acc_scope(acc_ref):
                eval_pipeline(acc_ref)
                plgpu.wgmma_wait(0)
                _ws_epilogue(acc_ref[...], o_gmem, out_smem, mi * 256 + wg * 128,
                             ki * block_k, wg)
            pl.run_scoped(acc_scope, plgpu.ACC((128, block_k)))

        plgpu.emit_pipeline_warp_specialized(
            step, grid=(steps,), memory_registers=40, in_specs=(c_spec, dy_spec, s_spec),
            wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=stages,
            compute_context=compute_context)(w_gmem.at[layer], dy_gmem, s_gmem.at[layer])

    pl.run_scoped(scope,
                  plgpu.SMEM((_WS_TILES, 64, block_k), jnp.bfloat16,
                             transforms=_swizzled(swizzle, 16)),
                  plgpu.Barrier(num_arrivals=2, num_barriers=_WS_TILES),
                  plgpu.SMEM((2, 128, 64), out_dtype,
                             transforms=_swizzled(out_swizzle, 8 * jnp.dtype(out_dtype).itemsize)),
                  collective_axes="wg")


@functools.partial(jax.jit, static_argnames=("block_m", "block_k", "stages", "in_flight",
                                             "out_dtype"))
def nf4_mgpu_gemm_t(dy: jax.Array, packed: jax.Array, scale: jax.Array, layer=None, *,
                    block_m: int = 128, block_k: int | None = None, stages: int | None = None,
                    in_flight: int = 1, out_dtype=None) -> jax.Array:
    """``dx = dy @ W`` for an NF4 ``W [N, K]`` in bitsandbytes' packed bytes, on Hopper:
    the input gradient of `nf4_mgpu_gemm`, decoding W tile by tile into shared memory.

    Args:
      dy: ``[M, N]`` bfloat16 output cotangent.
      packed: ``[N, K // 2]`` uint8 bnb codes (``[L, N, K // 2]`` with ``layer``), or
        uint32 `nf4_kernel_codes` words ``[(L,) N, K // 8]``.
      scale: ``[K // 64, N]`` float32 (`nf4_kernel_scale_f32`) or bfloat16
        (`nf4_kernel_scale`) (``[L, K // 64, N]`` stacked), the operand the forward takes.
      layer: int32 scalar, the stacked layer to multiply (read in place), or None.
      block_m: rows of ``dy`` per program: 64, 128, or 256 with two compute warpgroups
        sharing each decoded tile (`_t_ws_body`), as in `nf4_mgpu_gemm`.
      block_k: columns of ``dx`` (of W) per program, wgmma's N (64, 128 or 256, dividing
        K; default `_default_tile` where 128 divides K, else 64; 128 with ``block_m`` 256).
      stages, in_flight, out_dtype: as in `nf4_mgpu_gemm`.

    Returns:
      ``[M, K]`` in ``out_dtype`` (default ``dy.dtype``).

    Raises:
      ValueError: ``dy``, ``packed`` and ``scale`` of disagreeing shapes or dtypes, ``K``
        not a multiple of 64 or ``N`` not of 8, or a bad ``block_m``, ``block_k``,
        ``stages`` or ``in_flight``.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    name = "nf4_mgpu_gemm_t"
    out_dtype = jnp.dtype(out_dtype or dy.dtype)
    if layer is None:
        packed, scale, layer = packed[None], scale[None], 0
    if dy.ndim != 2:
        raise ValueError(f"{name}: dy must be [M, N], got {dy.shape}")
    m, n = dy.shape
    k = (8 if packed.dtype == jnp.uint32 else 2) * packed.shape[-1]
    _check_common(name, dy, packed, scale, n, k, block_m, stages, in_flight)
    block_k = block_k or (_default_tile(m, k, block_m) if k % 128 == 0 else 64)
    if block_k not in (64, 128, 256) or k % block_k:
        raise ValueError(f"{name}: block_k={block_k} must be 64, 128 or 256 and divide "
                         f"K={k} (the codes' TMA tiles span block_k columns)")
    steps = pl.cdiv(n, 64)
    tiles_m, tiles_k = pl.cdiv(m, block_m), pl.cdiv(k, block_k)
    mp, kp = tiles_m * block_m, tiles_k * block_k
    dy_in = _pad_rows(dy)
    if n % 64:  # dy is tiled by 64 columns in SMEM: zero columns up to the next 64
        dy_in = jnp.pad(dy_in, ((0, 0), (0, -n % 64)))
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    operands = (layer, dy_in, _codes_operand(packed, n, k), scale)
    if block_m == 256:  # two compute warpgroups share each decoded tile
        if block_k != 128:
            raise ValueError(f"{name}: block_k={block_k} must be 128 with block_m=256 "
                             "(each warpgroup decodes one 64-column block; a 128x256 "
                             "accumulator spills)")
        per_stage = (_CODE_BYTES(64, block_k) + 256 * 64 * 2
                     + (block_k // 64) * 64 * scale.dtype.itemsize)
        fixed = _WS_TILES * 64 * block_k * 2 + 2 * 128 * 64 * out_dtype.itemsize
        stages = stages or max(2, min(4, (_SMEM_WS - fixed) // per_stage))
        if stages < 2:
            raise ValueError(f"{name}: stages={stages} must be >= 2 with block_m=256")
        kernel = plgpu.kernel(
            functools.partial(_t_ws_body, block_k=block_k, steps=steps, stages=stages,
                              out_dtype=out_dtype),
            out_type=jax.ShapeDtypeStruct((mp, kp), out_dtype),
            grid=(tiles_m, tiles_k), grid_names=("m", "k"),
            num_threads=3, thread_name="wg")
        dx = kernel(*operands)
        return dx if (mp, kp) == (m, k) else dx[:m, :k]
    if steps < 2:
        in_flight = 0
    bufs = 2 if in_flight else 1
    per_stage = (_CODE_BYTES(64, block_k) + block_m * 64 * 2
                 + (block_k // 64) * 64 * scale.dtype.itemsize)
    fixed = bufs * 64 * block_k * 2  # the epilogue's tile reuses the pipeline's SMEM
    stages = _stages(stages, steps, per_stage, fixed, in_flight)
    kernel = plgpu.kernel(
        functools.partial(_t_body, block_m=block_m, block_k=block_k, steps=steps,
                          stages=stages, in_flight=in_flight, out_dtype=out_dtype),
        out_type=jax.ShapeDtypeStruct((mp, kp), out_dtype),
        grid=(tiles_m, tiles_k),
        grid_names=("m", "k"),
    )
    dx = kernel(*operands)
    return dx if (mp, kp) == (m, k) else dx[:m, :k]


# ---------------------------------------------------------------------------
# References (the oracles): the same functions in plain jnp
# ---------------------------------------------------------------------------


def nf4_kernel_scale_f32(absmax_f32: jax.Array, n: int, k: int, blocksize: int) -> jax.Array:
    """The float32 scale operand of the exact decode: ``absmax`` (float32, ``[N *
    K // blocksize]`` or ``[N, K // blocksize]``, double quantization already decoded, e.g.
    ``jaxqlora.nf4.absmax_float32``) repeated to one scale per 64 columns and transposed,
    NOT rounded: float32 ``[K // 64, N]`` (a leading layer axis is kept). With it the
    kernels compute each weight as ``bf16(NF4[code] * absmax)`` in float32, bit for bit
    the bfloat16 weight of bnb's ``dequantize_4bit`` and of
    `pallas_kernels.nf4_matmul.nf4_dequantize_reference` rounded to bfloat16."""
    lead = absmax_f32.shape[:-2] if absmax_f32.ndim >= 2 and absmax_f32.shape[-2:] == (
        n, k // blocksize) else absmax_f32.shape[:-1]
    a = absmax_f32.astype(jnp.float32).reshape(*lead, n, k // blocksize)
    return jnp.swapaxes(jnp.repeat(a, blocksize // 64, axis=-1), -1, -2)


def _gemm_weight(packed: jax.Array, scale: jax.Array) -> jax.Array:
    """float32 ``W [N, K]`` as the kernels decode it: bfloat16 ``scale`` (the
    `nf4_kernel_scale` layout): ``bf16(bf16(NF4[code]) * scale)``; float32 ``scale``
    (`nf4_kernel_scale_f32`): ``bf16(NF4[code] * scale)`` in float32."""
    if scale.dtype != jnp.float32:
        return _reference_weight(packed, scale)
    n, kh = packed.shape
    codes = jnp.stack([packed >> 4, packed & 15], axis=-1).reshape(n, 2 * kh).astype(jnp.int32)
    s = jnp.repeat(scale.T, 64, axis=1)  # [N, K]
    w = jnp.asarray(_NF4, jnp.float32)[codes] * s
    return w.astype(jnp.bfloat16).astype(jnp.float32)


def nf4_mgpu_gemm_reference(x: jax.Array, packed: jax.Array, scale: jax.Array) -> jax.Array:
    """What `nf4_mgpu_gemm` computes, in float32 jnp: ``W[n, k] = bf16(bf16(NF4[code]) *
    scale[k // 64, n])`` for a bfloat16 ``scale``, ``bf16(NF4[code] * scale[k // 64, n])``
    in float32 for a float32 one (bnb's nibble order: element ``2i`` in the high nibble),
    then ``x [M, K] @ W.T`` with float32 products and accumulation (float32 ``[M, N]``)."""
    w = _gemm_weight(packed, scale)
    return jnp.dot(x.astype(jnp.float32), w.T, precision=lax.Precision.HIGHEST)


def nf4_mgpu_gemm_reference_t(dy: jax.Array, packed: jax.Array, scale: jax.Array) -> jax.Array:
    """What `nf4_mgpu_gemm_t` computes, in float32 jnp: ``dy [M, N] @ W [N, K]`` with ``W``
    as in `nf4_mgpu_gemm_reference` (float32 ``[M, K]``)."""
    w = _gemm_weight(packed, scale)
    return jnp.dot(dy.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
