"""NF4 matmul on Hopper through Mosaic GPU: ``y = x @ W.T`` with the NF4 codes looked up in
registers and the tensor cores (wgmma) doing the products, for every M.

Design (after tokamax's sm90 quantized ragged dot, ``tokamax/_src/ops/ragged_dot/
pallas_mosaic_gpu_kernel_sm90_quant.py``): the weight sits on wgmma's M side and the
tokens on its N side, so one kernel serves decoding (M = 1..16 tokens, padded to 8 or 16
wgmma columns) and larger M (``block_m`` up to 128 token columns per program):

* Grid ``(cdiv(N, 64), cdiv(M, block_m), splits)``. One warpgroup owns 64 rows of W and
  ``block_m`` tokens; ``splits`` programs share the K range of a row tile (split-K, for
  decoding shapes with few row tiles) and write float32 partials that XLA sums.
* Several weights of one ``K`` (a layer's q/k/v, or gate/up) run in ONE launch
  (`nf4_mgpu_matmul_multi`; `nf4_mgpu_matmul` is its one-weight case): the row-tile axis
  covers ``sum_i cdiv(N_i, 64)`` tiles, and a program runs the pipeline below on the
  weight its tile falls in, chosen by a static chain of `pl.when` branches (Mosaic GPU
  lowers each to an ``scf.index_switch``; the branches share their shared memory and
  barriers), each weight read from its own operands (nothing concatenated or copied).
  Decoding pays a fixed cost per launch (H200: about 16 us of the 20.5 us a 4096x4096
  weight takes at M = 1), which this pays once per group.
* `plgpu.emit_pipeline` streams ``[64, block_k]`` tiles of codes, ``[block_k // 64, 64]``
  tiles of scales and ``[block_m, block_k]`` tiles of ``x`` into shared memory by TMA
  (zero-filled past the edges, so ragged N, M and K need no masks).
* The codes are bitsandbytes' packed bytes as they are stored (``packed [N, K//2]``
  uint8, element ``2i`` in the HIGH nibble), viewed as int4 ``[N, K]``: the int4 view
  pairs each byte's nibbles the other way round, which `_nf4_dequant` undoes for free in
  its last byte-permute. It loads 8 codes per thread-register (layout
  ``WGMMA_UPCAST_4X``) and turns 4 codes into 4 bfloat16 values with 8 ``prmt``
  byte-permutes over the 16-entry NF4 table held as immediate operands (the table's low
  and high bytes looked up separately, then interleaved; the scheme of Mosaic GPU's own
  int4 -> f8e4m3 conversion in ``fragmented_array.py``, after CUTLASS's
  ``NumericArrayConverter``), and one ``fma.rn.bf16x2`` applies the block scale. No
  gathers, no per-element table loads. The relayout from ``WGMMA_UPCAST_4X`` to
  ``WGMMA`` costs warp shuffles and byte extraction: Nsight Compute (H200, W 11008x4096,
  M = 1) finds the kernel bound by integer/logic instructions (ALU pipe 66%, issue slots
  60% busy, DRAM 28%; 10.3 M warp instructions, about 7 per weight).
* The codes may instead come in the kernel layout `nf4_kernel_codes` (uint32 words of 8
  codes in the order of wgmma's register layout, derived offline from the bnb bytes):
  one 32-bit load per register pair, the lookup of 8 codes in one `_ASM8` block, no
  relayout (`_nf4_dequant_words`). Same products, bit-identical results; 8.6 M warp
  instructions and 12-18% less time for the large decode shapes (H200); the model reads it
  when ``jaxqlora.quantize.use_kernel_codes`` derived it (8B decode 1.10-1.14x). Over it the
  kernel still issues about 6 instructions per weight and waits on shared-memory loads as
  much as on the ALU pipe (Nsight Compute, W 11008x4096, M = 1, 15.7 us: per issued
  instruction 1.77 cycles of long-scoreboard stall, 1.30 math-pipe throttle, 1.64 not
  selected; 30% occupancy, limited by 79 registers per thread and 25.6 KB of shared memory
  per block). A shared-memory table of 256 bfloat16 pairs (one load per two codes instead
  of the permutes) was tried and not faster (17.2-19.8 vs 17.7 us).
* The block scales are the kernel layout `nf4_kernel_scale` derives once per weight
  (``absmax`` decoded, double quantization included, to one bfloat16 per block,
  transposed to ``[K // blocksize, N]`` so a K tile's scales are one TMA box); the bnb
  codes stay the storage and interchange format.

* The backward ``dx = dy @ W`` (`nf4_mgpu_matmul_t`) keeps the weight on wgmma's M side
  with K as the output rows: grid ``(K // 64, cdiv(M, block_m), splits)``, split over N.
  Each step decodes a ``[block_n, 64]`` tile of the same int4 view (N rows, one scale
  per row from the same kernel layout, the same `_nf4_dequant`), stores it as bfloat16
  to a swizzled SMEM tile and multiplies it transposed (wgmma reads a 16-bit A from
  SMEM either way round) against ``dy.T``; float32 split-N partials summed by XLA.

Numerics: each weight element is ``bf16(bf16(code) * bf16(scale))`` (bnb's dequantize to
bfloat16 rounds ``code * absmax`` once, from float32: the two differ by at most 2**-8
relative per element), products on the tensor cores with float32 accumulation.

Restrictions (the wrapper checks them): a Hopper GPU (compute capability 9.0), ``K``
and ``blocksize`` multiples of 64 (one scale per 64-column step), ``N`` a multiple of 8
(16-byte TMA rows of the scales), bfloat16 ``x`` (``dy``). Other cases take
`pallas_kernels.nf4_matmul`. The kernel has no CPU interpret mode (Mosaic GPU's
interpreter in jax 0.10/0.11 has no TMA); `nf4_mgpu_reference` and
`nf4_mgpu_reference_t` at the bottom are the oracles its tests
(``tests/test_nf4_mgpu.py``, run on the GPU) compare with.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

__all__ = ["nf4_kernel_codes", "nf4_codes_from_kernel", "nf4_kernel_scale", "nf4_mgpu_matmul", "nf4_mgpu_matmul_multi", "nf4_mgpu_matmul_t",
           "nf4_mgpu_reference", "nf4_mgpu_reference_t", "nf4_mgpu_supported", "NF4_BF16_BYTES"]

#: bitsandbytes' NF4 codebook (QLoRA App. E), rounded to bfloat16: the byte tables of
#: `_nf4_dequant` are built from these bit patterns.
_NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                 -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                 0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0], np.float32)
# NumPy (ml_dtypes) only: importing this module must not start a JAX backend (a
# multi-process run calls jax.distributed.initialize() after its imports).
NF4_BF16_BYTES = _NF4.astype(ml_dtypes.bfloat16).view(np.uint16).astype(np.uint32)


def _word(values) -> int:
    """Four bytes, little-endian, as one 32-bit immediate."""
    return int(sum(int(v) << (8 * i) for i, v in enumerate(values)))


_LO = [_word(NF4_BF16_BYTES[4 * i:4 * i + 4] & 0xFF) for i in range(4)]
_HI = [_word(NF4_BF16_BYTES[4 * i:4 * i + 4] >> 8) for i in range(4)]

#: Output-pair byte selectors of the last prmt: the int4 view of a bnb byte holds the
#: odd element in its low nibble, so pair (e0, e1) takes nibbles 1 and 0.
_PAIR_SEL = (0x4051, 0x6273)


def nf4_mgpu_supported(m: int, n: int, k: int, blocksize: int, dtype) -> bool:
    """True when `nf4_mgpu_matmul` handles these shapes on this machine's GPU (see the
    module docstring's restrictions)."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16),):
        return False
    if k % 64 or blocksize % 64 or n % 8 or m < 1:
        return False
    try:
        dev = jax.devices()[0]
    except RuntimeError:  # pragma: no cover
        return False
    return dev.platform == "gpu" and getattr(dev, "compute_capability", "") == "9.0"


def nf4_kernel_scale(absmax_f32: jax.Array, n: int, k: int, blocksize: int) -> jax.Array:
    """The kernel layout of the block scales: ``absmax`` (float32, flat ``[N*K//blocksize]``
    or ``[N, K//blocksize]``, already decoded from double quantization) repeated to one
    scale per 64 columns, rounded to bfloat16 and transposed: ``[K // 64, N]``.

    A leading layer axis (``[L, ...]``) is kept: ``[L, K // 64, N]``.
    """
    lead = absmax_f32.shape[:-2] if absmax_f32.ndim >= 2 and absmax_f32.shape[-2:] == (
        n, k // blocksize) else absmax_f32.shape[:-1]
    a = absmax_f32.reshape(*lead, n, k // blocksize)
    a = jnp.repeat(a, blocksize // 64, axis=-1)
    return jnp.swapaxes(a, -1, -2).astype(jnp.bfloat16)


def nf4_kernel_codes(packed: jax.Array, n: int, k: int) -> jax.Array:
    """The kernel layout of the NF4 codes: bitsandbytes' packed bytes (uint8 ``[N, K // 2]``,
    element ``2i`` in the HIGH nibble; a leading layer axis is kept) repacked to uint32
    ``[N, K // 8]`` words of 8 codes, interleaved in the order the forward kernel consumes
    them, so that one 32-bit load per register gives a thread the codes of four bfloat16
    pairs of wgmma's register layout (no shuffles, no byte extraction; the offline repack
    of Marlin and FLUTE).

    Within each 64-column block ``j`` of a row, word ``8 j + 2 q + e`` (``q`` in 0..3,
    ``e`` in 0..1) holds, in nibble ``2 t + b`` (``t`` in 0..3, ``b`` in 0..1, nibble 0 the
    lowest), the code of column ``64 j + 8 (4 e + t) + 2 q + b``: the columns thread quad
    ``q`` of `plgpu.Layout.WGMMA` holds. A bijection of the bnb codes
    (`nf4_codes_from_kernel` inverts it); the bnb bytes stay the storage and interchange
    format.

    Raises:
      ValueError: ``packed`` not ``[.., N, K // 2]`` uint8 or ``K`` not a multiple of 64.
    """
    if packed.dtype != jnp.uint8 or packed.shape[-2:] != (n, k // 2) or k % 64:
        raise ValueError(f"nf4_kernel_codes: packed {packed.shape} {packed.dtype} is not uint8 "
                         f"[.., {n}, {k // 2}] with K={k} a multiple of 64")
    lead = packed.shape[:-2]
    codes = jnp.stack([packed >> 4, packed & 15], axis=-1).astype(jnp.uint32)  # [.., N, K/2, 2]
    codes = codes.reshape(*lead, n, k // 64, 2, 4, 4, 2)  # [.., N, j, e, t, q, b]
    nd = len(lead)
    perm = tuple(range(nd + 2)) + tuple(nd + 2 + i for i in (2, 0, 1, 3))  # -> [.., q, e, t, b]
    codes = jnp.transpose(codes, perm).reshape(*lead, n, k // 8, 8)
    shifts = jnp.arange(8, dtype=jnp.uint32) * 4
    return jnp.sum(codes << shifts, axis=-1, dtype=jnp.uint32)


def nf4_codes_from_kernel(codes: jax.Array, n: int, k: int) -> jax.Array:
    """bitsandbytes' packed bytes (uint8 ``[.., N, K // 2]``) back from `nf4_kernel_codes`'
    uint32 ``[.., N, K // 8]`` layout: its exact inverse (the round trip the tests check;
    nothing is saved in the kernel layout, the bnb bytes stay beside it)."""
    lead = codes.shape[:-2]
    nd = len(lead)
    nib = (codes[..., None] >> (jnp.arange(8, dtype=jnp.uint32) * 4)) & 15  # [.., N, K/8, 8]
    nib = nib.reshape(*lead, n, k // 64, 4, 2, 4, 2)  # [.., N, j, q, e, t, b]
    perm = tuple(range(nd + 2)) + tuple(nd + 2 + i for i in (1, 2, 0, 3))  # -> [.., e, t, q, b]
    nib = jnp.transpose(nib, perm).reshape(*lead, n, k // 2, 2).astype(jnp.uint8)
    return (nib[..., 0] << 4) | nib[..., 1]


# ---------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------


def _nf4_dequant(codes, scale_ref):
    """bfloat16 ``scale[row] * NF4[code]`` of an int4 ``codes [64, c]`` value in layout
    ``WGMMA`` (one bnb byte, two codes, per register), ``scale_ref`` a ``[64]`` bfloat16
    SMEM ref; the result is in layout ``WGMMA`` (one bfloat16 pair per register), ready
    for `plgpu.wgmma`. Two registers (four codes) go through one `_ASM` block.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from jax.experimental.mosaic import gpu as mgpu
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, memref

    layout = plgpu.Layout.WGMMA
    asm = _ASM

    @plgpu.inline_mgpu(
        arg_types=(layout, plgpu.RefType()),
        return_type=plgpu.ShapeDtypeStruct(codes.shape, jnp.bfloat16, layout),
    )
    def dequant(_, w, s_smem):
        i32 = ir.IntegerType.get_signless(32)
        i16 = ir.IntegerType.get_signless(16)
        bf16 = ir.BF16Type.get()
        c = lambda v: arith.constant(i32, ir.IntegerAttr.get(i32, v))
        struct = llvm.StructType.get_literal([i32, i32])
        pair_ty = ir.VectorType.get((2,), bf16)

        def scale2(row):  # the row's bfloat16 scale in both halves of an i32
            s16 = arith.extui(i32, arith.bitcast(i16, memref.load(s_smem, [row])))
            return arith.ori(s16, arith.shli(s16, c(16)))

        # Every register of a thread lies in one of a few rows (two per 64x64 tile in
        # the WGMMA layout): load each row's scale once. A register's row is the
        # thread's dynamic row plus a static offset, ``tile_lin_idx // columns``.
        tile_strides = w.layout.tiling.tile_strides(tuple(mgpu.utils.get_contiguous_strides(w.shape)))
        regs, scales = [], {}
        for idx, reg_idx in zip(w.layout.thread_idxs(w.shape), np.ndindex(w.registers.shape)):
            key = sum(i * st for i, st in zip(reg_idx, tile_strides)) // w.shape[1]
            if key not in scales:
                scales[key] = scale2(idx[0])
            regs.append((scales[key], reg_idx))
        assert len(regs) % 2 == 0, len(regs)
        new_regs = np.empty_like(w.registers)
        for (sa, ra), (sb, rb) in zip(regs[0::2], regs[1::2]):
            bytes_ = [arith.extui(i32, _vec_to_i8(w.registers[r])) for r in (ra, rb)]
            sel = arith.ori(bytes_[0], arith.shli(bytes_[1], c(8)))
            res = llvm.inline_asm(struct, [sel, sa, sb], asm, "=r,=r,r,r,r")
            for j, r in enumerate((ra, rb)):
                out = llvm.extractvalue(i32, res, ir.DenseI64ArrayAttr.get([j]))
                new_regs[r] = _i32_to_vec(out, pair_ty)
        return mgpu.FragmentedArray(_registers=new_regs, _layout=w.layout, _is_signed=None)

    return dequant(codes, scale_ref)


def _vec_to_i8(reg):
    """``vector<2xi4>`` -> ``i8`` (the bnb byte it came from)."""
    from jax.experimental.mosaic.gpu import utils as mgpu_utils
    from jax._src.lib.mlir import ir
    return mgpu_utils.bitcast(reg, ir.IntegerType.get_signless(8))


def _i32_to_vec(word, vec_ty):
    """``i32`` -> ``vector<2xbf16>``."""
    from jax.experimental.mosaic.gpu import utils as mgpu_utils
    return mgpu_utils.bitcast(word, vec_ty)


def _nf4_dequant_words(words, scale_ref, sub: int):
    """The ``sub`` bfloat16 ``[64, 64]`` blocks (layout ``WGMMA``, ready for `plgpu.wgmma`)
    of ``scale[j, row] * NF4[code]`` for a uint32 ``words [64, 8 * sub]`` tile of the
    `nf4_kernel_codes` layout loaded in layout ``WGMMA`` (two words per register);
    ``scale_ref`` the ``[sub, 64]`` bfloat16 SMEM scales. Each word (8 codes) becomes four
    bfloat16 pairs through one `_ASM8` block: no shuffles, no byte extraction."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    from jax.experimental.mosaic import gpu as mgpu
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, llvm, memref, vector

    layout = plgpu.Layout.WGMMA
    asm = _ASM8
    out_ty = plgpu.ShapeDtypeStruct((64, 64), jnp.bfloat16, layout)

    @plgpu.inline_mgpu(arg_types=(layout, plgpu.RefType()),
                       return_type=tuple(out_ty for _ in range(sub)))
    def dequant(_, w, s_smem):
        i32 = ir.IntegerType.get_signless(32)
        i16 = ir.IntegerType.get_signless(16)
        index = ir.IndexType.get()
        bf16 = ir.BF16Type.get()
        c = lambda v: arith.constant(i32, ir.IntegerAttr.get(i32, v))  # noqa: E731
        struct = llvm.StructType.get_literal([i32] * 4)
        pair_ty = ir.VectorType.get((2,), bf16)

        def offsets(arr_layout, shape):  # register index -> static (row, col) offset
            strides = arr_layout.tiling.tile_strides(tuple(mgpu.utils.get_contiguous_strides(shape)))
            return {r: divmod(sum(i * st for i, st in zip(r, strides)), shape[1])
                    for r in np.ndindex(arr_layout.registers_shape(shape))}

        # the words of each (row offset, word column): a register holds columns (c, c + 1)
        src = {}
        for r, (ro, co) in offsets(w.layout, w.shape).items():
            for e in range(2):
                src[(ro, co + e)] = vector.extract(w.registers[r], [], [e])
        out_layout = mgpu.WGMMA_LAYOUT
        out_offsets = offsets(out_layout, (64, 64))
        rows = {}  # the thread's dynamic row of each output register
        for r, idx in zip(np.ndindex(out_layout.registers_shape((64, 64))),
                          out_layout.thread_idxs((64, 64))):
            rows[r] = idx[0]
        by_off = {off: r for r, off in out_offsets.items()}
        row_offs = sorted({ro for ro, _ in out_offsets.values()})
        outs = []
        for j in range(sub):
            regs = np.empty(out_layout.registers_shape((64, 64)), dtype=object)
            for row_off in row_offs:
                s16 = memref.load(s_smem, [arith.constant(index, j), rows[by_off[(row_off, 0)]]])
                s32 = arith.extui(i32, arith.bitcast(i16, s16))
                scale2 = arith.ori(s32, arith.shli(s32, c(16)))  # the row's scale, both halves
                for e in range(2):  # word column 8 j + e of this thread's quad: pairs 4 e + t
                    word = src[(row_off, 8 * j + e)]
                    res = llvm.inline_asm(struct, [word, scale2], asm, "=r,=r,=r,=r,r,r")
                    for t in range(4):
                        out = llvm.extractvalue(i32, res, ir.DenseI64ArrayAttr.get([t]))
                        regs[by_off[(row_off, 8 * (4 * e + t))]] = _i32_to_vec(out, pair_ty)
            assert all(x is not None for x in regs.flat)
            outs.append(mgpu.FragmentedArray(_registers=regs, _layout=out_layout, _is_signed=None))
        return tuple(outs)

    return dequant(words, scale_ref)


def _lookup_ptx(idx: str, sel: str, pairs: tuple[int, int], outs: tuple[str, str],
                scales: tuple[str, str]) -> str:
    """PTX of one NF4 table lookup of four codes: ``idx`` holds their low 3 bits as prmt
    selector nibbles, ``sel`` the byte selectors that pick the upper half of the table for
    codes >= 8 (``((codes & 0x8888) >> 1) | 0x3210``). The table's low and high bytes are
    looked up separately (two 8-byte pools each), ``pairs`` interleaves them into two
    bfloat16 pairs, and each pair is scaled (``fma`` with -0.0) into ``outs``."""
    return "\n".join([
        f"prmt.b32 l0, {_LO[0]}, {_LO[1]}, {idx};",
        f"prmt.b32 l1, {_LO[2]}, {_LO[3]}, {idx};",
        f"prmt.b32 lo, l0, l1, {sel};",
        f"prmt.b32 h0, {_HI[0]}, {_HI[1]}, {idx};",
        f"prmt.b32 h1, {_HI[2]}, {_HI[3]}, {idx};",
        f"prmt.b32 hi, h0, h1, {sel};",
        f"prmt.b32 p0, lo, hi, {pairs[0]:#x};",
        f"prmt.b32 p1, lo, hi, {pairs[1]:#x};",
        f"fma.rn.bf16x2 {outs[0]}, p0, {scales[0]}, z;",
        f"fma.rn.bf16x2 {outs[1]}, p1, {scales[1]}, z;",
    ])


_REGS = ".reg .b32 idx, sel, ih, sh, l0, l1, lo, h0, h1, hi, p0, p1, z;\nmov.b32 z, 0x80008000;"

#: Four codes (selector nibbles in $2's low 16 bits: register a's byte, then b's) ->
#: two bfloat16 pairs ($0 for a, $1 for b) scaled by $3 / $4 (bf16x2 splats).
_ASM = "\n".join(["{", _REGS,
                  "and.b32 idx, $2, 0x7777;", "and.b32 sel, $2, 0x8888;",
                  "shr.u32 sel, sel, 1;", "or.b32 sel, sel, 0x3210;",
                  _lookup_ptx("idx", "sel", _PAIR_SEL, ("$0", "$1"), ("$3", "$4")), "}"])

#: Eight codes (the word $4, code i in nibble i) -> four bfloat16 pairs $0..$3 (pair t:
#: codes 2t, 2t+1, low half first) scaled by $5 (a bf16x2 splat): the lookup of `_ASM`
#: once per half word.
_ASM8 = "\n".join(["{", _REGS,
                   "and.b32 idx, $4, 0x77777777;", "and.b32 sel, $4, 0x88888888;",
                   "shr.u32 sel, sel, 1;", "or.b32 sel, sel, 0x32103210;",
                   "shr.u32 ih, idx, 16;", "shr.u32 sh, sel, 16;",
                   _lookup_ptx("idx", "sel", (0x5140, 0x7362), ("$0", "$1"), ("$5", "$5")),
                   _lookup_ptx("ih", "sh", (0x5140, 0x7362), ("$2", "$3"), ("$5", "$5")), "}"])


def _swizzled(swizzle: int, bits: int) -> tuple:
    """The SMEM transforms of a tile whose rows are ``swizzle`` bytes of ``bits``-bit
    elements: 8-row tiles one swizzle wide, swizzled (what TMA writes, what `plgpu.wgmma`
    and the tiled loads and stores read)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return (plgpu.TilingTransform((8, 8 * swizzle // bits)), plgpu.SwizzleTransform(swizzle))


def _store_rows(acc, o_gmem, row_tile):
    """Write a program's float32 ``acc [64, block_m]`` to rows ``[64 * row_tile, ...)`` of
    its split's and M tile's slice of the partials ``o_gmem [splits, tiles_m, rows,
    block_m]`` (through SMEM, by TMA)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    si, mi = lax.axis_index("s"), lax.axis_index("m")

    def store(o_smem):
        o_smem[...] = acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[si, mi, pl.ds(row_tile * 64, 64)])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(store, plgpu.SMEM(acc.shape, jnp.float32))


def _row_tile(layer_ref, x_gmem, w_gmem, s_gmem, o_gmem, tile, row_tile, *, block_m: int,
              block_k: int, steps: int, stages: int, in_flight: int):
    """One program's work: rows ``[64 * tile, 64 * tile + 64)`` of the weight ``w_gmem``
    (its scales ``s_gmem``) times ``block_m`` tokens over this program's K split, written
    to rows ``[64 * row_tile, ...)`` of the float32 partials ``o_gmem``."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    mi = lax.axis_index("m")
    si = lax.axis_index("s")
    layer = layer_ref[0]
    sub = block_k // 64
    words = w_gmem.dtype == jnp.uint32  # the `nf4_kernel_codes` layout, else the int4 view
    w_swizzle = plgpu.find_swizzle(4 * block_k, "lhs")  # a row: block_k codes, 4 bits each
    x_swizzle = plgpu.find_swizzle(16 * 64, "rhs")

    def compute(acc_ref):
        def step(_, w_smem, x_smem, s_smem):
            if words:
                blocks = _nf4_dequant_words(plgpu.load(w_smem, (), layout=plgpu.Layout.WGMMA),
                                            s_smem, sub)
            else:
                w = plgpu.load(w_smem, (), layout=plgpu.Layout.WGMMA_UPCAST_4X)
            for j in range(sub):
                if words:
                    wj = blocks[j]
                else:
                    wj = plgpu.layout_cast(w[:, j * 64:(j + 1) * 64], plgpu.Layout.WGMMA)
                    wj = _nf4_dequant(wj, s_smem.at[j])
                plgpu.wgmma(acc_ref, wj, x_smem.at[:, j * 64:(j + 1) * 64].T)
                plgpu.wgmma_wait(in_flight)

        w_spec = plgpu.BlockSpec((64, block_k // 8) if words else (64, block_k),
                                 lambda t: (tile, si * steps + t),
                                 transforms=_swizzled(w_swizzle, 32 if words else 4))
        x_spec = plgpu.BlockSpec((block_m, block_k), lambda t: (mi, si * steps + t),
                                 transforms=_swizzled(x_swizzle, 16))
        s_spec = plgpu.BlockSpec((sub, 64), lambda t: (si * steps + t, tile))
        plgpu.emit_pipeline(step, grid=(steps,), in_specs=(w_spec, x_spec, s_spec),
                            max_concurrent_steps=stages)(
            w_gmem.at[layer], x_gmem, s_gmem.at[layer])
        return acc_ref[...]

    acc = pl.run_scoped(compute, plgpu.ACC((64, block_m)))
    _store_rows(acc, o_gmem, row_tile)


def _kernel_body(layer_ref, x_gmem, *refs, tiles: tuple[int, ...], **kw):
    """The kernel: ``refs`` are ``(codes_0, scale_0, codes_1, scale_1, ..., out)``, one
    pair per weight, and ``tiles[i]`` the 64-row tiles of weight ``i``. The grid's row-tile
    axis ``n`` runs over all weights' tiles in order; a program picks its weight by a
    static chain of `pl.when` on its tile index (each branch the same `_row_tile` over its
    own refs: no weight is copied or concatenated) and writes its rows at its tile index
    of the one output."""
    *weights, o_gmem = refs
    ni = lax.axis_index("n")
    if len(tiles) == 1:
        _row_tile(layer_ref, x_gmem, *weights, o_gmem, ni, ni, **kw)
        return
    start = 0
    for i, count in enumerate(tiles):
        w_gmem, s_gmem = weights[2 * i], weights[2 * i + 1]

        def branch(w_gmem=w_gmem, s_gmem=s_gmem, start=start):
            _row_tile(layer_ref, x_gmem, w_gmem, s_gmem, o_gmem, ni - start, ni, **kw)

        pl.when((ni >= start) & (ni < start + count))(branch)
        start += count


#: Shared memory the pipeline buffers may take (the H200 allows 227 KiB per block).
_SMEM_BUDGET = 200 * 1024

#: Programs the default split count aims for (split-K forward, split-N transposed).
_SPLIT_PROGRAMS = 800


def _default_block_m(m: int) -> int:
    """Token columns per program (wgmma's N): M rounded up to 8 for M <= 64, else 128."""
    return max(8, -(-m // 8) * 8) if m <= 64 else 128


def _default_splits(programs: int, steps: int) -> int:
    """Programs sharing one output tile's reduction range of ``steps`` pipeline steps: the
    largest power of two that leaves each split at least two steps, keeps ``programs *
    splits`` (``programs``: the output tiles) under `_SPLIT_PROGRAMS` and, where it does
    not divide ``steps``, pads them by at most an eighth without an empty split (see
    `_check_splits`: K = 11008 has 43 steps of 256; unsplit, its 4096x11008 GEMV took
    43.4 us against 20.9 for 11008x4096; 8 splits of 6 steps: 22.7 us, H200, M = 1)."""
    splits = 1
    while programs * splits < _SPLIT_PROGRAMS and steps // (splits * 2) >= 2:
        cand = splits * 2
        per = -(-steps // cand)
        if 8 * (per * cand - steps) > steps or (cand - 1) * per >= steps:
            break
        splits = cand
    return splits


def _check_splits(name: str, splits: int, total: int, what: str) -> int:
    """The steps per split of ``total`` steps (``cdiv``; the last split's steps past the
    end read TMA's zero fill, so they add nothing); raises ValueError when a split would
    have no step."""
    per = -(-total // splits) if splits >= 1 else 0
    if splits < 1 or (splits - 1) * per >= total:
        raise ValueError(f"{name}: splits={splits} leaves a split with no step of the "
                         f"{total} steps of {what}")
    return per


def _int4_view(packed, n: int, k: int):
    """bnb's packed bytes ``[L, N, K // 2]`` uint8 as int4 ``[L, N, K]`` (a bitcast: each
    byte's two nibbles, the odd element first; `_nf4_dequant` swaps them back)."""
    return lax.bitcast_convert_type(packed, jnp.int4).reshape(packed.shape[0], n, k)


def _pad_rows(a):
    """``a [M, C]`` with M padded to a multiple of 8 when M > 8: TMA boxes of 8-row tiles
    need M < 8 or a multiple of 8."""
    m = a.shape[0]
    return jnp.pad(a, ((0, -m % 8), (0, 0))) if m > 8 and m % 8 else a


def _sum_partials(out, m: int):
    """The kernels' float32 partials ``[splits, tiles_m, rows, block_m]`` summed over the
    splits and laid out ``[M, rows]`` (float32; XLA ops after the kernel)."""
    _, tiles_m, rows, block_m = out.shape
    out = out.sum(axis=0)  # [tiles_m, rows, block_m]
    return out.transpose(0, 2, 1).reshape(tiles_m * block_m, rows)[:m]


@functools.partial(jax.jit, static_argnames=("block_m", "block_k", "splits", "stages",
                                             "in_flight"))
def nf4_mgpu_matmul(x: jax.Array, packed: jax.Array, scale: jax.Array, layer=None, *,
                    block_m: int | None = None, block_k: int | None = None,
                    splits: int | None = None, stages: int | None = None,
                    in_flight: int = 0) -> jax.Array:
    """``x @ W.T`` for an NF4 ``W [N, K]`` in bitsandbytes' packed bytes, on Hopper.

    The one-weight case of `nf4_mgpu_matmul_multi`.

    Args:
      x: ``[M, K]`` bfloat16 activations.
      packed: ``[N, K // 2]`` uint8 bnb codes (high nibble first), or ``[L, N, K // 2]``
        stacked layers with ``layer`` given; or the same codes in the `nf4_kernel_codes`
        layout, uint32 ``[(L,) N, K // 8]`` (fewer instructions per code).
      scale: the kernel layout `nf4_kernel_scale`: ``[K // 64, N]`` bfloat16
        (``[L, K // 64, N]`` when stacked).
      layer: int32 scalar, the stacked layer to multiply (read in place), or None.
      block_m: token columns per program (8..128, a multiple of 8; default: M rounded up
        to 8 for M <= 64, else 128).
      block_k: K columns per pipeline step (a multiple of 64 dividing K; default 256).
      splits: programs sharing one row tile's K range, each ``cdiv(K/block_k, splits)``
        steps (the last may run past K on TMA's zero fill; default: the most, up to 800
        programs, that leave each at least two steps and pad by at most an eighth).
      stages: pipeline buffers in flight (default: up to 4 within the shared memory).
      in_flight: wgmma groups left in flight after each issue (0: wait for each).

    Returns:
      ``[M, N]`` in ``x.dtype``.

    Raises:
      ValueError: shapes outside `nf4_mgpu_supported`'s restrictions.
    """
    return _mgpu_multi(x, (packed,), (scale,), layer, block_m=block_m, block_k=block_k,
                       splits=splits, stages=stages, in_flight=in_flight,
                       name="nf4_mgpu_matmul")[0]


@functools.partial(jax.jit, static_argnames=("block_m", "block_k", "splits", "stages",
                                             "in_flight"))
def nf4_mgpu_matmul_multi(x: jax.Array, packed: tuple, scale: tuple, layer=None, *,
                          block_m: int | None = None, block_k: int | None = None,
                          splits: int | None = None, stages: int | None = None,
                          in_flight: int = 0) -> tuple[jax.Array, ...]:
    """``(x @ W_0.T, x @ W_1.T, ...)`` for several NF4 weights ``W_i [N_i, K]`` of one
    ``K``, in ONE kernel launch (a decoder layer's q/k/v, or gate/up).

    The weights stay separate operands, read in place: nothing is concatenated or
    copied. The grid's row-tile axis covers ``sum_i cdiv(N_i, 64)`` tiles; a program
    runs the same pipeline as `nf4_mgpu_matmul` on the weight its tile falls in and
    writes its 64 rows into one float32 output of ``sum_i cdiv(N_i, 64) * 64`` rows.
    The split-K sum and the cut into the ``N_i`` columns of each result are XLA ops
    after the kernel (a caller's elementwise epilogue, e.g. SwiGLU of gate/up, can fuse
    with them). Design after tokamax's sm90 quantized ragged dot (one launch over
    several row groups; ``tokamax/_src/ops/ragged_dot/
    pallas_mosaic_gpu_kernel_sm90_quant.py``); NF4 codes as bitsandbytes stores them.

    Args:
      x: ``[M, K]`` bfloat16 activations, shared by every weight.
      packed: tuple of uint8 ``[N_i, K // 2]`` bnb codes (``[L, N_i, K // 2]`` each
        with ``layer``), or all in the `nf4_kernel_codes` layout (uint32 ``K // 8``).
      scale: tuple of the matching `nf4_kernel_scale` layouts, bfloat16
        ``[K // 64, N_i]`` (``[L, K // 64, N_i]`` with ``layer``).
      layer: int32 scalar, the stacked layer of every weight (read in place), or None.
      block_m, block_k, splits, stages, in_flight: as in `nf4_mgpu_matmul` (the default
        ``splits`` counts all weights' row tiles).

    Returns:
      A tuple of ``[M, N_i]`` arrays in ``x.dtype``.

    Raises:
      ValueError: ``packed`` and ``scale`` of different lengths or empty, a weight whose
        ``K`` differs from ``x``'s, or shapes outside `nf4_mgpu_supported`'s
        restrictions.
    """
    return _mgpu_multi(x, tuple(packed), tuple(scale), layer, block_m=block_m,
                       block_k=block_k, splits=splits, stages=stages, in_flight=in_flight,
                       name="nf4_mgpu_matmul_multi")


def _mgpu_multi(x, packed: tuple, scale: tuple, layer, *, block_m, block_k, splits, stages,
                in_flight, name: str) -> tuple[jax.Array, ...]:
    """The kernel launch behind `nf4_mgpu_matmul` and `nf4_mgpu_matmul_multi`."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if not packed or len(packed) != len(scale):
        raise ValueError(f"{name}: {len(packed)} packed and {len(scale)} scale operands "
                         "(want one of each per weight, at least one)")
    m, k = x.shape
    if layer is None:
        packed, scale, layer = tuple(p[None] for p in packed), tuple(s[None] for s in scale), 0
    ns = []
    words = packed[0].dtype == jnp.uint32
    per_word = 8 if words else 2  # codes per element of ``packed``
    for p, s in zip(packed, scale):
        n = p.shape[1]
        if p.ndim != 3 or s.ndim != 3 or p.shape[2] * per_word != k \
                or s.shape[1:] != (k // 64, n) or (p.dtype == jnp.uint32) != words:
            raise ValueError(f"{name}: x {x.shape}, packed {p.shape} {p.dtype}, scale {s.shape} "
                             f"disagree (want packed uint8 [.., N, K//2] for all weights or "
                             f"uint32 [.., N, K//8] for all, scale [.., K//64, N])")
        if k % 64 or n % 8:
            raise ValueError(f"{name}: K={k} must be a multiple of 64 and N={n} of 8")
        ns.append(n)
    block_m = block_m or _default_block_m(m)
    if block_k is None:
        block_k = next(b for b in (256, 128, 64) if k % b == 0)
    tiles = tuple(pl.cdiv(n, 64) for n in ns)
    tiles_n, tiles_m, tiles_k = sum(tiles), pl.cdiv(m, block_m), k // block_k
    if splits is None:  # H200, W 11008x4096, M = 1: 29.3 us unsplit, 22.2 with 2, 20.1 with 8
        splits = _default_splits(tiles_n * tiles_m, tiles_k)
    steps = _check_splits(name, splits, tiles_k, f"K/block_k={tiles_k}")
    per_stage = 64 * block_k // 2 + block_m * block_k * 2 + (block_k // 64) * 64 * 2
    stages = stages or max(1, min(4, steps, _SMEM_BUDGET // per_stage))
    operands = []
    for p, s, n in zip(packed, scale, ns):
        operands += [p if words else _int4_view(p, n, k), s]
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    kernel = plgpu.kernel(
        functools.partial(_kernel_body, tiles=tiles, block_m=block_m, block_k=block_k,
                          steps=steps, stages=stages, in_flight=in_flight),
        out_type=jax.ShapeDtypeStruct((splits, tiles_m, tiles_n * 64, block_m), jnp.float32),
        grid=(tiles_n, tiles_m, splits),
        grid_names=("n", "m", "s"),
    )
    y = _sum_partials(kernel(layer, _pad_rows(x), *operands), m)
    ys, row = [], 0
    for n, t in zip(ns, tiles):
        ys.append(y[:, row:row + n].astype(x.dtype))
        row += 64 * t
    return tuple(ys)


# ---------------------------------------------------------------------------
# The transposed kernel: dx = dy @ W (the backward of y = x @ W.T)
# ---------------------------------------------------------------------------

#: Programs the default ``block_n`` of `nf4_mgpu_matmul_t` wants at least (two per SM of
#: a 132-SM H200): the largest N step (256, 128, 64) whose split count reaches it.
_T_MIN_PROGRAMS = 256


def _default_block_n(n: int, programs: int, block_m: int = 8) -> int:
    """N rows per pipeline step of the transposed kernel. Up to 8 rows of ``dy`` (``block_m``
    8): 64, the most steps to split (the H200 sweep of `benchmarks/nf4_mgpu_t.py`, M = 1:
    13.5 us with 64 vs 17.7 with 256 for a 4096x4096 weight, 30.8 vs 33.0+ for 11008x4096).
    More rows: 128 (not past N rounded up to 64) when, with `_default_splits`, ``programs``
    output tiles reach `_T_MIN_PROGRAMS` programs in all (M = 16, 4096x4096: 13.9 us), else 64."""
    if block_m <= 8:
        return 64
    for block_n in (128,):
        steps = pl.cdiv(n, block_n)
        if block_n <= -(-n // 64) * 64 and \
                programs * _default_splits(programs, steps) >= _T_MIN_PROGRAMS:
            return block_n
    return 64


def _t_kernel_body(layer_ref, dy_gmem, w_gmem, s_gmem, o_gmem, *, block_m: int, block_n: int,
                   steps: int, stages: int, in_flight: int):
    """One program of the transposed kernel: the 64 columns ``[64 * k, 64 * k + 64)`` of
    ``dx`` (wgmma's M side: rows of ``W.T``) for ``block_m`` rows of ``dy``, over this
    program's range of N (``steps`` steps of ``block_n`` rows of W).

    Per step: the int4 codes ``[block_n, 64]`` (N rows, this K tile's columns), their
    scales ``kernel_scale[k, n0:n0 + block_n]`` (one per N row, this K block) and
    ``dy[:, n0:n0 + block_n]`` arrive by TMA; the codes are decoded in registers
    (`_nf4_dequant`, a scale per row as in the forward) and stored as bfloat16 to a
    swizzled SMEM tile, which wgmma reads transposed (``W.T [64, block_n]``, allowed from
    SMEM for 16-bit types) against ``dy.T [block_n, block_m]``. With ``in_flight`` = 1 two
    such tiles alternate, so decoding step t+1 overlaps step t's wgmma, and the pipeline
    buffers are released one step late (wgmma t may still read ``dy`` t)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    ki, mi, si = lax.axis_index("k"), lax.axis_index("m"), lax.axis_index("s")
    layer = layer_ref[0]
    c_swizzle = plgpu.find_swizzle(4 * 64, "codes")  # 32 bytes: a 64-column row of int4
    swizzle = plgpu.find_swizzle(16 * 64, "wgmma operands")  # 128 bytes, A and B alike
    bufs = 2 if in_flight else 1

    def compute(acc_ref, w_smem):
        def step(idx, c_smem, dy_smem, s_smem):
            codes = plgpu.load(c_smem, (), layout=plgpu.Layout.WGMMA_UPCAST_4X)
            w = _nf4_dequant(plgpu.layout_cast(codes, plgpu.Layout.WGMMA), s_smem.at[0])
            buf = w_smem.at[lax.rem(idx[0], bufs)] if bufs > 1 else w_smem.at[0]
            buf[...] = w
            plgpu.commit_smem()  # the stores, visible to wgmma (async proxy), all threads
            plgpu.wgmma(acc_ref, plgpu.transpose_ref(buf, (1, 0)), dy_smem.T)
            plgpu.wgmma_wait(in_flight)

        nt = lambda t: si * steps + t
        c_spec = plgpu.BlockSpec((block_n, 64), lambda t: (nt(t), ki),
                                 transforms=_swizzled(c_swizzle, 4), delay_release=in_flight)
        dy_spec = plgpu.BlockSpec((block_m, block_n), lambda t: (mi, nt(t)),
                                  transforms=_swizzled(swizzle, 16), delay_release=in_flight)
        s_spec = plgpu.BlockSpec((1, block_n), lambda t: (ki, nt(t)), delay_release=in_flight)
        plgpu.emit_pipeline(step, grid=(steps,), in_specs=(c_spec, dy_spec, s_spec),
                            max_concurrent_steps=stages)(
            w_gmem.at[layer], dy_gmem, s_gmem.at[layer])
        plgpu.wgmma_wait(0)
        return acc_ref[...]

    acc = pl.run_scoped(compute, plgpu.ACC((64, block_m)),
                        plgpu.SMEM((bufs, block_n, 64), jnp.bfloat16,
                                   transforms=_swizzled(swizzle, 16)))
    _store_rows(acc, o_gmem, ki)


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "splits", "stages",
                                             "in_flight"))
def nf4_mgpu_matmul_t(dy: jax.Array, packed: jax.Array, scale: jax.Array, layer=None, *,
                      block_m: int | None = None, block_n: int | None = None,
                      splits: int | None = None, stages: int | None = None,
                      in_flight: int = 1) -> jax.Array:
    """``dx = dy @ W`` for an NF4 ``W [N, K]`` in bitsandbytes' packed bytes, on Hopper:
    the backward (input gradient) of `nf4_mgpu_matmul`'s ``y = x @ W.T``.

    The weight stays on wgmma's M side, now with K as the output rows: grid
    ``(K // 64, cdiv(M, block_m), splits)``; each program accumulates
    ``dx.T[64 K rows, block_m] += W.T[64, block_n] @ dy.T[block_n, block_m]`` in float32
    over its share of N, pipelined (`plgpu.emit_pipeline`) in steps of ``block_n`` rows of
    W; ``splits`` programs share one K tile's N range (split-N) and XLA sums their float32
    partials. Each step decodes a ``[block_n, 64]`` tile of codes in registers with the
    forward's `_nf4_dequant` (one scale per N row), stores it as bfloat16 to SMEM and
    multiplies it transposed (see `_t_kernel_body`). Design after tokamax's sm90
    quantized ragged dot (``tokamax/_src/ops/ragged_dot/
    pallas_mosaic_gpu_kernel_sm90_quant.py``; its transposed case reads the quantized
    operand from SMEM the same way), NF4 codes as bitsandbytes stores them
    (``bitsandbytes.functional.quantize_4bit(quant_type="nf4")``). Numerics as the
    forward's: each weight element ``bf16(bf16(code) * bf16(scale))``, float32
    accumulation.

    Args:
      dy: ``[M, N]`` bfloat16 output cotangent.
      packed: ``[N, K // 2]`` uint8 bnb codes (high nibble first), or ``[L, N, K // 2]``
        stacked layers with ``layer`` given.
      scale: the kernel layout `nf4_kernel_scale`: ``[K // 64, N]`` bfloat16
        (``[L, K // 64, N]`` when stacked), the same operand the forward takes.
      layer: int32 scalar, the stacked layer to multiply (read in place), or None.
      block_m: rows of ``dy`` per program (wgmma's N: 8..256, a multiple of 8; default:
        M rounded up to 8 for M <= 64, else 128).
      block_n: rows of W (columns of ``dy``) per pipeline step (64, 128 or 256; default
        `_default_block_n`: 64 for up to 8 rows of ``dy``, else 128 where it gives 256 programs).
      splits: programs sharing one K tile's N range, each ``cdiv(cdiv(N, block_n),
        splits)`` steps (none may be left without a step; default `_default_splits`, the
        forward's rule).
      stages: pipeline buffers in flight (default: up to 4 within the shared memory; at
        least 2 with ``in_flight``).
      in_flight: 1 (default): two bfloat16 tiles alternate and one wgmma group stays in
        flight while the next tile is decoded; 0: wait for each wgmma (one tile). A
        single-step pipeline, or tiles too large for two buffers and two stages in
        shared memory, use 0.

    Returns:
      ``[M, K]`` in ``dy.dtype``.

    Raises:
      ValueError: ``dy``, ``packed`` and ``scale`` of disagreeing shapes, ``K`` not a
        multiple of 64 or ``N`` not of 8 (`nf4_mgpu_supported`'s restrictions), or a bad
        ``block_m``, ``block_n``, ``splits``, ``stages`` or ``in_flight``.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    name = "nf4_mgpu_matmul_t"
    if layer is None:
        packed, scale, layer = packed[None], scale[None], 0
    m, n = dy.shape
    k = 2 * packed.shape[-1]
    if packed.ndim != 3 or scale.ndim != 3 or packed.shape[1] != n \
            or scale.shape[1:] != (k // 64, n) or scale.shape[0] != packed.shape[0]:
        raise ValueError(f"{name}: dy {dy.shape}, packed {packed.shape}, scale {scale.shape} "
                         "disagree (want dy [M, N], packed [.., N, K//2], scale [.., K//64, N])")
    if k % 64 or n % 8:
        raise ValueError(f"{name}: K={k} must be a multiple of 64 and N={n} of 8")
    if in_flight not in (0, 1):
        raise ValueError(f"{name}: in_flight={in_flight} must be 0 or 1")
    block_m = block_m or _default_block_m(m)
    if block_m % 8 or not 8 <= block_m <= 256:
        raise ValueError(f"{name}: block_m={block_m} must be a multiple of 8 in [8, 256]")
    tiles_k, tiles_m = k // 64, pl.cdiv(m, block_m)
    block_n = block_n or _default_block_n(n, tiles_k * tiles_m, block_m)
    if block_n not in (64, 128, 256):
        raise ValueError(f"{name}: block_n={block_n} must be 64, 128 or 256")
    total = pl.cdiv(n, block_n)
    splits = splits or _default_splits(tiles_k * tiles_m, total)
    steps = _check_splits(name, splits, total, f"cdiv(N, block_n)={total}")
    per_stage = block_n * 64 // 2 + block_m * block_n * 2 + block_n * 2
    tile = block_n * 64 * 2  # one bfloat16 W tile
    if steps < 2 or 2 * tile + 2 * per_stage > _SMEM_BUDGET:
        in_flight = 0  # nothing to overlap, or no room for two tiles and two stages
    scratch = (2 if in_flight else 1) * tile
    stages = stages or max(1, min(4, steps, (_SMEM_BUDGET - scratch) // per_stage))
    stages = max(stages, 2) if in_flight else stages
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    kernel = plgpu.kernel(
        functools.partial(_t_kernel_body, block_m=block_m, block_n=block_n, steps=steps,
                          stages=stages, in_flight=in_flight),
        out_type=jax.ShapeDtypeStruct((splits, tiles_m, k, block_m), jnp.float32),
        grid=(tiles_k, tiles_m, splits),
        grid_names=("k", "m", "s"),
    )
    dy_in = _pad_rows(dy)
    if n % 64:  # dy's rows are tiled by 64 columns in SMEM: TMA needs N % 64 == 0 in GMEM
        dy_in = jnp.pad(dy_in, ((0, 0), (0, -n % 64)))  # zeros, as TMA fills past N
    out = kernel(layer, dy_in, _int4_view(packed, n, k), scale)
    return _sum_partials(out, m).astype(dy.dtype)


# ---------------------------------------------------------------------------
# Reference (the oracle): the same function in plain jnp
# ---------------------------------------------------------------------------


def _reference_weight(packed: jax.Array, scale: jax.Array) -> jax.Array:
    """float32 ``W[n, k] = bf16(bf16(NF4[code]) * scale[k // 64, n])`` with bnb's nibble
    order (what the kernels' `_nf4_dequant` computes), ``[N, K]``."""
    n, kh = packed.shape
    hi, lo = packed >> 4, packed & 15
    codes = jnp.stack([hi, lo], axis=-1).reshape(n, 2 * kh).astype(jnp.int32)
    table = jnp.asarray(_NF4, jnp.bfloat16)
    s = jnp.repeat(scale.T, 64, axis=1)  # [N, K]
    return (table[codes] * s).astype(jnp.bfloat16).astype(jnp.float32)


def nf4_mgpu_reference(x: jax.Array, packed: jax.Array, scale: jax.Array) -> jax.Array:
    """What `nf4_mgpu_matmul` computes, in float32 jnp: ``W[n, k] = bf16(bf16(NF4[code])
    * scale[k // 64, n])`` with bnb's nibble order, then ``x @ W.T`` (float32 result)."""
    w = _reference_weight(packed, scale)
    return jnp.dot(x.astype(jnp.float32), w.T, precision=lax.Precision.HIGHEST)


def nf4_mgpu_reference_t(dy: jax.Array, packed: jax.Array, scale: jax.Array) -> jax.Array:
    """What `nf4_mgpu_matmul_t` computes, in float32 jnp: ``dy [M, N] @ W [N, K]`` with
    ``W`` as in `nf4_mgpu_reference` (float32 result)."""
    w = _reference_weight(packed, scale)
    return jnp.dot(dy.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
