"""GGUF block-quantized matmul: ``y = x @ W.T`` with ``W`` in llama.cpp's block formats.

The formats (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K) each live in their own module
(`pallas_kernels.gguf_q4_0` ...): the block layout (``LAYOUT``, ``BLOCK`` values per block,
``TYPE_SIZE`` bytes), the in-kernel decode of one tile of blocks (``decode``) and a thin
wrapper. This module holds what they share: the field planes, the kernel driver, its
wrapper, the ``custom_vjp`` binding, and the plain-jnp reference at the bottom (the XLA
path and, with the ``gguf`` package's own dequantizer, the tests' oracle).

Storage ("field planes"). A GGUF tensor ``[N, K]`` is ``N * K / BLOCK`` blocks of
``TYPE_SIZE`` bytes (ggml ``ggml-common.h``, ``block_q4_K`` ...). At load time each block's
fields are split into planes, byte for byte (`split_blocks`; `join_blocks` is the inverse,
so the GGUF bytes stay the source of truth): f16 fields (``d``, ``dmin``, ``m``) as float16
``[N, nb]``, byte fields (``scales``, ``qh``, ``qs``) as uint8 ``[N, nb, nbytes]``
(``nb = K / BLOCK``). The device holds exactly the file's bytes, and a kernel loads each
field as a contiguous vector per block instead of unaligned bytes out of 18- or 210-byte
records. Field names are shared between formats (Q6_K's ``ql`` is stored as ``qs``), so a
projection whose layers mix formats of one family (a Q4_K_M file stores some layers'
``ffn_down``/``attn_v`` as Q6_K) is ONE set of stacked planes, each field as wide as its
widest format (`union_layout`), with an int32 ``kind [L]`` naming each layer's format.

Decoding. Every format writes a block as sub-blocks of ``S`` values (16 or 32) with
``W_sub = scale * q + bias``: ``q`` small integers (as float32), ``scale`` and ``bias``
per sub-block (``bias`` None when the format has no offset). A format's ``decode(ld)``
yields ``(j, q [..., S], scale [...], bias [...] | None)`` for each sub-block ``j`` (in
natural order of K within the block), reading the fields through ``ld(field, start,
size)``; it runs inside the Pallas kernel (``ld`` = masked tile loads). Each format's
``reference(planes)`` decodes whole planes with vectorized jnp in ``gguf.quants``' order of
float32 operations (``(d*sc)*q - dmin*m`` ...), so the reference dequantization is
bit-identical to ``gguf.quants.dequantize``; the tests hold the kernel to float64 NumPy.

The kernel (Pallas Triton backend; ``interpret=True`` runs it on a CPU). Grid
``(cdiv(M, block_m), cdiv(N, block_n), splits)``; each program streams ``blocks`` whole
GGUF blocks of ``block_n`` rows per step over its share of K (split-K), decodes each
block's scales once, and for each sub-block

* ``M == 1`` (decode, CUDA cores): an elementwise float32 accumulator ``acc += q * x_sub *
  scale`` (summed once at the end, as the NF4 GEMV does) and ``bias * sum(x_sub)`` per
  sub-block for the offsets (Q4_1's ``m``, the k-quants' ``dmin * m``); no table lookups:
  the values are arithmetic;
* ``M > 1``: ``acc[m, n] += x_sub @ (scale * q + bias).T`` on the matrix units (M padded
  to 16 rows for M <= 16; tiles of 64 rows above: the weight is dequantized tile by tile
  into the matmul and never written out).

A mixed-format projection runs every format's decode with its loads masked by ``kind ==
format`` (masked lanes issue no memory traffic), so one kernel serves every layer without
a host-side branch. Float32 partials ``[splits, M, N]`` are summed by XLA (with one split the
kernel writes ``y`` in ``x.dtype`` directly).

Backward: the weight is frozen; ``dx = dy @ W`` dequantizes ``W`` with the reference and
multiplies with XLA (zero cotangents for the planes).

Source: ggml ``ggml-common.h`` (block structs), ``ggml-quants.c``
(``dequantize_row_q4_0`` ... ``dequantize_row_q6_K``), gguf-py ``gguf/quants.py``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.dispatch import (
    zero_cotangent,
    check_float_dtype,
    dot_f32 as _dot,
    plgpu,
    require_pallas_backend,
    resolve_impl,
    triton_compiler_params as _compiler_params,
)

__all__ = ["F16", "GEMV_MAX_M", "gguf_matmul", "gguf_matmul_pallas", "split_blocks", "join_blocks",
           "union_layout", "gguf_dequantize_reference", "gguf_matmul_reference"]

#: Marks an f16 field in a format's ``LAYOUT`` (else the entry is a byte count).
F16 = "f16"

#: Largest M that takes the split-K GEMV tiling (one row, or 16 padded rows on the MMA).
GEMV_MAX_M = 16


# ---------------------------------------------------------------------------
# Field planes (load time, NumPy)
# ---------------------------------------------------------------------------


def _field_bytes(kind) -> int:
    return 2 if kind == F16 else int(kind)


def split_blocks(raw: np.ndarray, fmt, k: int) -> dict[str, np.ndarray]:
    """A GGUF tensor's bytes -> its field planes.

    Args:
      raw: uint8, ``N * (K // BLOCK) * TYPE_SIZE`` bytes in any shape (rows of
        ``gguf.GGUFReader`` tensors: ``[N, K // BLOCK * TYPE_SIZE]``), rows outermost.
      fmt: the format module (``LAYOUT``, ``BLOCK``, ``TYPE_SIZE``).
      k: the row length K (a multiple of ``BLOCK``).

    Returns:
      ``{field: plane}``: float16 ``[N, nb]`` for f16 fields, uint8 ``[N, nb, nbytes]``
      for byte fields (``nb = K // BLOCK``); the bytes are copied, never converted.

    Raises:
      ValueError: ``K`` not a multiple of ``BLOCK``, or a byte count that is not a whole
        number of rows of blocks.
    """
    if k % fmt.BLOCK:
        raise ValueError(f"{fmt.NAME}: row length {k} is not a multiple of the block size {fmt.BLOCK}")
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    nb = k // fmt.BLOCK
    row = nb * fmt.TYPE_SIZE
    if raw.size % row:
        raise ValueError(f"{fmt.NAME}: {raw.size} bytes are not a whole number of {k}-value rows "
                         f"({row} bytes each)")
    blocks = raw.reshape(raw.size // row, nb, fmt.TYPE_SIZE)
    planes, at = {}, 0
    for name, kind in fmt.LAYOUT:
        size = _field_bytes(kind)
        part = np.ascontiguousarray(blocks[:, :, at:at + size])
        planes[name] = part.view(np.float16)[..., 0] if kind == F16 else part
        at += size
    assert at == fmt.TYPE_SIZE, (fmt.NAME, at)
    return planes


def join_blocks(planes: dict[str, Any], fmt) -> np.ndarray:
    """The inverse of `split_blocks`: uint8 ``[N, nb * TYPE_SIZE]``, the GGUF bytes (a
    field wider than the format's, from a mixed projection, is cut to the format's width)."""
    parts = []
    for name, kind in fmt.LAYOUT:
        a = np.asarray(planes[name])
        if kind == F16:
            parts.append(np.ascontiguousarray(a.astype(np.float16))[..., None].view(np.uint8))
        else:
            parts.append(a[..., :int(kind)].astype(np.uint8))
    blocks = np.concatenate(parts, axis=-1)
    return blocks.reshape(*blocks.shape[:-2], -1)


def union_layout(fmts: Sequence[Any]) -> dict[str, Any]:
    """``{field: F16 or nbytes}`` covering every format in ``fmts`` (each byte field as wide
    as its widest use), the planes of a projection whose layers mix these formats.

    Raises:
      ValueError: formats with different ``BLOCK`` sizes, or a field that is f16 in one
        format and bytes in another.
    """
    if len({f.BLOCK for f in fmts}) != 1:
        raise ValueError(f"formats {[f.NAME for f in fmts]} have different block sizes")
    out: dict[str, Any] = {}
    for f in fmts:
        for name, kind in f.LAYOUT:
            old = out.get(name)
            if old is not None and (old == F16) != (kind == F16):
                raise ValueError(f"field {name!r} is f16 in one format and bytes in another")
            out[name] = kind if old is None or kind == F16 else max(int(old), int(kind))
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------


def _signed8(v):
    """int32 holding a byte (0..255) -> its int8 value (-128..127), by arithmetic."""
    return v - ((v >> 7) << 8)


def gguf_matmul_kernel(layer_ref, kind_ref, *refs, fmts, fields, sizes, block_m: int,
                       block_n: int, blocks: int, steps: int):
    """Partial ``y`` of one ``[block_m, block_n]`` tile of the output over one K split.

    Refs: ``layer [1]`` int32, ``kind [L]`` int32; for each sub-block size ``S`` in ``sizes``
    an x view ``[M, nb, BLOCK // S, S]``; the field planes ``[L, N, nb(, nbytes)]`` in the
    order of ``fields``; the output ``[splits, M, N]``.

    Program ``(i, j, s)`` covers rows ``i*block_m ...`` of x, rows ``j*block_n ...`` of W
    and the block tiles ``[s*steps, (s+1)*steps)`` of K (tiles past K masked). With
    ``block_m == 1`` the products accumulate elementwise (``acc[S] += q * x * scale``, one
    float32 accumulator per sub-block size, the offsets' ``bias * sum(x)`` in another), summed
    once at the end; otherwise each sub-block is one MMA.
    """
    nx = len(sizes)
    x_refs = refs[:nx]
    planes = dict(zip(fields, refs[nx:nx + len(fields)]))
    o_ref = refs[-1]
    m = x_refs[0].shape[0]
    first = planes[fields[0]]
    n, nb = first.shape[1], first.shape[2]
    lay = layer_ref[0]
    kind = kind_ref[lay]
    m0 = pl.program_id(0) * block_m
    n0 = pl.program_id(1) * block_n
    split = pl.program_id(2)
    mask_n = n0 + jnp.arange(block_n, dtype=jnp.int32) < n
    mask_m = m0 + jnp.arange(block_m, dtype=jnp.int32) < m

    def body(t, acc):
        b0 = (split * steps + t) * blocks
        mask_b = b0 + jnp.arange(blocks, dtype=jnp.int32) < nb
        acc = list(acc)
        for index, fmt in enumerate(fmts):
            mask2 = mask_n[:, None] & mask_b[None, :]
            if len(fmts) > 1:
                mask2 = mask2 & (kind == index)

            def ld(name, start, size=None, _mask2=mask2):
                ref = planes[name]
                if ref.dtype == jnp.float16:
                    v = plgpu.load(ref.at[lay, pl.ds(n0, block_n), pl.ds(b0, blocks)],
                                   mask=_mask2, other=jnp.zeros((), ref.dtype))
                    return v.astype(jnp.float32)
                if size is None:
                    v = plgpu.load(ref.at[lay, pl.ds(n0, block_n), pl.ds(b0, blocks), jnp.int32(start)],
                                   mask=_mask2, other=jnp.zeros((), ref.dtype))
                else:
                    v = plgpu.load(ref.at[lay, pl.ds(n0, block_n), pl.ds(b0, blocks), pl.ds(start, size)],
                                   mask=jnp.broadcast_to(_mask2[:, :, None], (block_n, blocks, size)),
                                   other=jnp.zeros((), ref.dtype))
                return v.astype(jnp.int32)

            for j, q, scale, bias in fmt.decode(ld):
                s = q.shape[-1]
                xi = sizes.index(s)
                if block_m == 1:
                    xj = plgpu.load(x_refs[xi].at[m0, pl.ds(b0, blocks), jnp.int32(j), :],
                                    mask=jnp.broadcast_to(mask_b[:, None], (blocks, s)),
                                    other=jnp.zeros((), x_refs[xi].dtype)).astype(jnp.float32)
                    acc[xi] = acc[xi] + q * xj[None] * scale[:, :, None]
                    if bias is not None:
                        acc[-1] = acc[-1] + bias * jnp.sum(xj, axis=-1)[None, :]
                else:
                    w = q * scale[:, :, None]
                    if bias is not None:
                        w = w + bias[:, :, None]
                    xmask = mask_m[:, None, None] & mask_b[None, :, None]
                    xj = plgpu.load(x_refs[xi].at[pl.ds(m0, block_m), pl.ds(b0, blocks), jnp.int32(j), :],
                                    mask=jnp.broadcast_to(xmask, (block_m, blocks, s)),
                                    other=jnp.zeros((), x_refs[xi].dtype))
                    dt = x_refs[xi].dtype
                    acc[0] = acc[0] + _dot(xj.reshape(block_m, blocks * s),
                                           w.reshape(block_n, blocks * s).astype(dt), 1)
        return tuple(acc)

    if block_m == 1:
        init = tuple(jnp.zeros((block_n, blocks, s), jnp.float32) for s in sizes) + (
            jnp.zeros((block_n, blocks), jnp.float32),)
        acc = lax.fori_loop(0, steps, body, init)
        out = jnp.sum(acc[-1], axis=1)
        for a in acc[:-1]:
            out = out + jnp.sum(jnp.sum(a, axis=2), axis=1)
        out = out[None, :]
    else:
        (out,) = lax.fori_loop(0, steps, body, (jnp.zeros((block_m, block_n), jnp.float32),))
    plgpu.store(o_ref.at[split, pl.ds(m0, block_m), pl.ds(n0, block_n)], out.astype(o_ref.dtype),
                mask=mask_m[:, None] & mask_n[None, :])


class Tiling(NamedTuple):
    """Tile sizes of one call (see `plan`)."""
    block_m: int
    block_n: int
    blocks: int
    splits: int
    steps: int
    num_warps: int
    num_stages: int


def plan(m: int, n: int, nb: int, block: int, *, block_n=None, blocks=None, splits=None,
         num_warps=None, num_stages=None) -> Tiling:
    """Tile sizes from the shape: M = 1 on the CUDA cores (64 rows x 256 values a step,
    split-K to about 1024 programs); 1 < M <= 16 on the MMA with M padded to 16 (32 rows x
    256 values); larger M in 64 x 64 tiles over 1024 values a step (MMAs of K = 64..256),
    8 warps, without split-K. Any argument given overrides its default."""
    if m == 1:
        bm = 1
    elif m <= GEMV_MAX_M:
        bm = 16
    else:
        bm = 64
    block_n = block_n or (32 if 1 < m <= GEMV_MAX_M else 64)
    # M = 1 with 256-value k-quant blocks: two blocks a step and 16 splits, the best of 48
    # settings of `benchmarks/kernels.py --gguf-sweep` on the H200 (2026-11-30, Q4_K
    # 14336x4096 / 4096x14336: 47.3 / 49.5 us against 50.8 / 52.4 us for one block, 4 splits).
    kquant_gemv = m == 1 and block == 256
    blocks = blocks or (max(1, 1024 // block) if m > GEMV_MAX_M and block > 32 else
                        8 if m > GEMV_MAX_M else 2 if kquant_gemv else max(1, 256 // block))
    num_warps = num_warps or (8 if m > GEMV_MAX_M else 4)
    tiles = pl.cdiv(nb, blocks)
    grid_mn = pl.cdiv(m, bm) * pl.cdiv(n, block_n)
    if splits is None:
        splits = (1 if m > GEMV_MAX_M else 16 if kquant_gemv else
                  max(1, min(16, 1024 // grid_mn)))
    splits = max(1, min(splits, tiles))
    steps = pl.cdiv(tiles, splits)
    splits = pl.cdiv(tiles, steps)
    return Tiling(bm, block_n, blocks, splits, steps, num_warps or 4, num_stages or 2)


def _x_views(x, block: int, sizes):
    """x ``[M, K]`` as ``[M, nb, BLOCK // S, S]`` per sub-block size (free reshapes)."""
    m, k = x.shape
    return tuple(x.reshape(m, k // block, block // s, s) for s in sizes)


@functools.partial(jax.jit, static_argnames=("fmts", "interpret", "block_n", "blocks", "splits",
                                             "num_warps", "num_stages"))
def gguf_matmul_pallas(x, planes, kind, layer=None, *, fmts: tuple, interpret: bool = False,
                       block_n: int | None = None, blocks: int | None = None,
                       splits: int | None = None, num_warps: int | None = None,
                       num_stages: int | None = None):
    """``x [M, K] @ W.T -> [M, N]`` in ``x.dtype`` by `gguf_matmul_kernel` (checked operands).

    Args:
      x: bfloat16, float16 or float32 ``[M, K]``.
      planes: ``{field: plane}`` as `split_blocks` gives them, with a leading layer axis
        ``[L, N, nb(, nbytes)]`` when ``layer`` is given (one weight otherwise).
      kind: int32 ``[L]`` (or scalar): each layer's index into ``fmts``.
      layer: int32 scalar or None; the layer is read in place.
      fmts: the format modules of the union (static).
      block_n, blocks, splits, num_warps, num_stages: tiling overrides (see `plan`).
    """
    if layer is None:
        planes = {k: v[None] for k, v in planes.items()}
        kind, layer = jnp.reshape(kind, (1,)), 0
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    kind = jnp.asarray(kind, jnp.int32).reshape(-1)
    fields = tuple(sorted(planes))
    m, k = x.shape
    block = fmts[0].BLOCK
    nb = k // block
    n = planes[fields[0]].shape[1]
    t = plan(m, n, nb, block, block_n=block_n, blocks=blocks, splits=splits, num_warps=num_warps,
             num_stages=num_stages)
    sizes = tuple(sorted({f.SUB for f in fmts}))
    views = _x_views(x, block, sizes)
    kernel = functools.partial(gguf_matmul_kernel, fmts=fmts, fields=fields, sizes=sizes,
                               block_m=t.block_m, block_n=t.block_n, blocks=t.blocks, steps=t.steps)
    out = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(m, t.block_m), pl.cdiv(n, t.block_n), t.splits),
        out_shape=jax.ShapeDtypeStruct((t.splits, m, n), x.dtype if t.splits == 1 else jnp.float32),
        compiler_params=_compiler_params(t.num_warps, t.num_stages),
        interpret=interpret,
        name="gguf_matmul_" + "_".join(f.NAME.lower() for f in fmts),
    )(layer, kind, *views, *(planes[f] for f in fields))
    return out[0] if t.splits == 1 else out.sum(axis=0).astype(x.dtype)


# ---------------------------------------------------------------------------
# custom_vjp binding and the public op
# ---------------------------------------------------------------------------


class _Config(NamedTuple):
    impl: str
    fmts: tuple
    shape: tuple[int, int]
    interpret: bool


def _layer_planes(planes, kind, layer):
    if layer is None:
        return planes, kind
    return {k: v[layer] for k, v in planes.items()}, kind[layer]


#: Largest M (rows of ``x``) that takes the Pallas kernel on a GPU; larger M dequantizes
#: with XLA and multiplies on cuBLAS (H200, 2026-11-30, Q4_K 14336x4096 / 4096x14336 at
#: M = 512: the tile-dequantizing kernel 983 / 977 us against 272 / 252 us for XLA's
#: dequantize + dot; at M = 16 the kernel was faster, 73 against 201 us).
PALLAS_MAX_M = 16


def _forward(cfg: _Config, x, planes, kind, layer):
    n, k = cfg.shape
    batch = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return jnp.zeros((*batch, n), x.dtype)
    if cfg.impl == "xla" or (x2.shape[0] > PALLAS_MAX_M and not cfg.interpret):
        p, kd = _layer_planes(planes, kind, layer)
        y = gguf_matmul_reference(x2, p, kd, fmts=cfg.fmts)
    else:
        y = gguf_matmul_pallas(x2, planes, kind, layer, fmts=cfg.fmts, interpret=cfg.interpret)
    return y.reshape(*batch, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gguf_matmul_vjp(cfg, x, planes, kind, layer):
    return _forward(cfg, x, planes, kind, layer)


def _fwd(cfg, x, planes, kind, layer):
    return _forward(cfg, x, planes, kind, layer), (planes, kind, layer)


def _bwd(cfg, residuals, dy):
    planes, kind, layer = residuals
    p, kd = _layer_planes(planes, kind, layer)
    w = gguf_dequantize_reference(p, kd, fmts=cfg.fmts).astype(dy.dtype)
    dx = lax.dot_general(dy, w, (((dy.ndim - 1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32).astype(dy.dtype)
    return (dx, jax.tree_util.tree_map(zero_cotangent, planes), zero_cotangent(kind), zero_cotangent(layer))


_gguf_matmul_vjp.defvjp(_fwd, _bwd)


def gguf_matmul(x, planes, kind, *, fmts: tuple, layer=None, impl: str | None = None,
                interpret: bool = False) -> jax.Array:
    """``y = x @ W.T`` for a frozen GGUF-quantized weight ``W [N, K]`` held as field planes.

    Args:
      x: ``[..., K]`` bfloat16, float16 or float32.
      planes: ``{field: plane}`` (`split_blocks`; `union_layout` for a mixed projection):
        float16 ``[N, nb]`` or uint8 ``[N, nb, nbytes]``, ``nb = K / BLOCK``; with ``layer``
        every plane has a leading axis of L stacked weights.
      kind: int32 scalar (``[L]`` with ``layer``): the index into ``fmts`` of the format
        of the weight (of each layer).
      fmts: tuple of format modules (``pallas_kernels.gguf_q4_k`` ...), one ``BLOCK``.
      layer: int32 scalar or None: multiply stacked weight ``layer`` (the kernel reads it
        in place; the XLA path slices it).
      impl, interpret: as every op in `pallas_kernels` (`pallas_kernels.dispatch`).

    Returns:
      ``[..., N]`` in ``x.dtype`` (float32 accumulation). Differentiable in ``x`` (``dx =
      dy @ W``, W dequantized by the reference); the planes get zero cotangents.

    Raises:
      TypeError: ``x`` not a float dtype, a plane of the wrong dtype.
      ValueError: ``K`` not ``nb * BLOCK``, planes that disagree in N or nb, an unknown
        field, mixed block sizes; 'pallas' without a GPU and without ``interpret``.
    """
    mode = resolve_impl(impl, interpret)
    if mode == "pallas":
        require_pallas_backend("gguf_matmul", interpret)
    x = jnp.asarray(x)
    check_float_dtype("x", x)
    fmts = tuple(fmts)
    layout = union_layout(fmts)
    if set(planes) != set(layout):
        raise ValueError(f"planes has fields {sorted(planes)}, formats {[f.NAME for f in fmts]} need "
                         f"{sorted(layout)}")
    lead = 0 if layer is None else 1
    first = planes[next(iter(layout))]
    n, nb = first.shape[lead], first.shape[lead + 1]
    block = fmts[0].BLOCK
    if x.shape[-1] != nb * block:
        raise ValueError(f"x has K = {x.shape[-1]}, the planes hold {nb} blocks of {block} = {nb * block}")
    for name, kind_ in layout.items():
        p = planes[name]
        want = first.shape[:lead + 2] + (() if kind_ == F16 else (int(kind_),))
        dtype = jnp.float16 if kind_ == F16 else jnp.uint8
        if tuple(p.shape) != tuple(want):
            raise ValueError(f"plane {name!r} has shape {tuple(p.shape)}, expected {tuple(want)}")
        if p.dtype != dtype:
            raise TypeError(f"plane {name!r} must be {jnp.dtype(dtype).name}, got {p.dtype}")
    kind = jnp.asarray(kind, jnp.int32)
    if layer is not None:
        layer = jnp.asarray(layer, jnp.int32)
    cfg = _Config(mode, fmts, (int(n), int(nb * block)), bool(interpret))
    return _gguf_matmul_vjp(cfg, x, dict(planes), kind, layer)


# ---------------------------------------------------------------------------
# Plain-jnp references (the XLA path and, with gguf.quants, the test oracle)
# ---------------------------------------------------------------------------


def _decode_all(fmt, planes):
    """``fmt.reference``: its vectorized decode, float32 ``[..., nb, BLOCK]``."""
    return fmt.reference(planes)


def gguf_dequantize_reference(planes, kind=0, *, fmts: tuple) -> jax.Array:
    """Dequantize GGUF field planes with jnp: float32 ``[..., N, K]``.

    ``planes`` as in `gguf_matmul` without a layer axis (any leading axes: the rows of an
    embedding gathered by token ids work too); ``kind`` the index into ``fmts`` (an int32
    scalar; every format is decoded and the right one selected when ``fmts`` has several).
    Bit-identical to ``gguf.quants.dequantize`` (same float32 operations in the same order).
    """
    outs = [_decode_all(f, planes) for f in fmts]
    w = outs[0]
    for i, o in enumerate(outs[1:], start=1):
        w = jnp.where(jnp.asarray(kind) == i, o, w)
    return w.reshape(*w.shape[:-2], -1)


def gguf_matmul_reference(x, planes, kind=0, *, fmts: tuple) -> jax.Array:
    """``x @ W.T`` by `gguf_dequantize_reference` + one XLA dot: W rounded to ``x.dtype``,
    float32 accumulation (``Precision.HIGHEST``), result in ``x.dtype``."""
    x = jnp.asarray(x)
    w = gguf_dequantize_reference(planes, kind, fmts=fmts)
    y = lax.dot_general(x, w.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())),
                        precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)
