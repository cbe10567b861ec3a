"""The GGUF block formats as a weight: `GGUFWeight`, built from a tensor's stored bytes.

A `GGUFWeight` holds one ``[out, in]`` weight (or a stack of them, one per decoder layer)
in llama.cpp's block format, byte for byte: the blocks' fields split into planes at load
time (`pallas_kernels.gguf_matmul.split_blocks`; `to_blocks` gives the GGUF bytes back).
The formats kept on the device are `GGUF_FORMATS` (name -> the kernel module under
`pallas_kernels/`); a stack whose layers mix formats of one family (Q4_K and Q6_K in a
Q4_K_M file) is one `GGUFWeight` whose ``kind`` names each layer's format.

Off the GPU, `xla_matmul` multiplies by the blocks: a decode-sized product by a Q4_0, Q4_1 or
Q8_0 weight runs the CPU kernel `pallas_kernels.gguf_cpu` (C++ through XLA's FFI, the blocks
read in place); everything else runs with XLA, each sub-block of every block decoded to float32
in pieces of rows that stay in the CPU cache and multiplied at once (one dot per sub-block
position, no reassembled weight), so a decode step reads the blocks' bytes, not a dequantized
copy.

Source: ggml ``ggml-common.h`` (block layouts), the GGUF spec (ggml ``docs/gguf.md``).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxqlora.model import by_row_pieces
from pallas_kernels import gguf_cpu, gguf_q4_0, gguf_q4_1, gguf_q4_k, gguf_q5_k, gguf_q6_k, gguf_q8_0
from pallas_kernels.gguf_matmul import F16, gguf_dequantize_reference, join_blocks, split_blocks, union_layout

#: GGUF tensor types kept quantized on the device -> their kernel module.
GGUF_FORMATS = {m.NAME: m for m in (gguf_q4_0, gguf_q4_1, gguf_q8_0, gguf_q4_k, gguf_q5_k, gguf_q6_k)}


@flax.struct.dataclass
class GGUFWeight:
    """A frozen weight ``[out, in]`` in GGUF block formats (a pytree).

    Attributes:
      planes: ``{field: plane}``: float16 ``[(L,) out, nb]`` or uint8 ``[(L,) out, nb,
        nbytes]`` (``nb = in / BLOCK``), the blocks' fields byte for byte.
      kind: int32 ``[(L,)]``: each layer's index into ``formats``.
      formats: the GGUF type names in the weight (static), e.g. ``("Q4_K", "Q6_K")``.
      shape: ``(out, in)`` of one layer (static).
      kernel_layout: None, or the Mosaic GPU GEMV's layout of the same weight
        (`pallas_kernels.gguf_mgpu.gguf_kernel_layout`: ``{name: array}`` with the planes'
        leading layer axis), added on a Hopper GPU by `jaxqlora.quantize.use_kernel_codes`
        and never saved; the planes stay the source of truth.
    """

    planes: dict
    kind: jax.Array
    formats: tuple = flax.struct.field(pytree_node=False)
    shape: tuple = flax.struct.field(pytree_node=False)
    kernel_layout: dict | None = None

    @property
    def modules(self) -> tuple:
        """The kernel modules of ``formats``."""
        return tuple(GGUF_FORMATS[f] for f in self.formats)

    @property
    def stacked(self) -> bool:
        """True when the planes carry a leading layer axis."""
        return jnp.ndim(self.kind) == 1

    @property
    def nbytes(self) -> int:
        """Device bytes of the planes (the file's bytes, plus padding of mixed stacks) and of
        the kernel layout when there is one."""
        arrays = list(self.planes.values()) + list((self.kernel_layout or {}).values())
        return sum(int(p.size) * jnp.dtype(p.dtype).itemsize for p in arrays)

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """``[(L,) out, in]`` in ``dtype`` (float32 values bit-identical to
        ``gguf.quants.dequantize``)."""
        if self.stacked:
            return jax.vmap(lambda p, k: gguf_dequantize_reference(p, k, fmts=self.modules))(
                self.planes, self.kind).astype(dtype)
        return gguf_dequantize_reference(self.planes, self.kind, fmts=self.modules).astype(dtype)

    def rows(self, ids: jax.Array, dtype: Any) -> jax.Array:
        """Rows ``ids`` (int ``[...]``) dequantized, ``[..., in]`` in ``dtype``: only the
        looked-up rows' blocks are read (an embedding lookup)."""
        planes = {k: jnp.take(v, ids, axis=0) for k, v in self.planes.items()}
        return gguf_dequantize_reference(planes, self.kind, fmts=self.modules).astype(dtype)


def _piece_product(x: jax.Array, planes: dict, fmt) -> jax.Array:
    """float32 ``x [M, K] @ W.T`` for the rows of ``planes`` (one format, no layer axis):
    for each sub-block position j (``fmt.decode``), ``W_j = q * scale + bias`` over every
    block ``[rows, nb * S]`` times the matching values of x."""

    def ld(name, start, size=None):
        p = planes[name]
        if p.dtype == jnp.float16:
            return p.astype(jnp.float32)
        return (p[..., start] if size is None else p[..., start:start + size]).astype(jnp.int32)

    m, k = x.shape
    y = None
    for j, q, scale, bias in fmt.decode(ld):
        rows, nb, s = q.shape
        w = q * scale[..., None]
        if bias is not None:
            w = w + bias[..., None]
        xj = x.reshape(m, nb, fmt.BLOCK // s, s)[:, :, j, :].reshape(m, nb * s)
        yj = jax.lax.dot_general(xj, w.reshape(rows, nb * s), (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        y = yj if y is None else y + yj
    return y


def xla_matmul(x: jax.Array, w: GGUFWeight, layer=None) -> jax.Array:
    """``x @ W.T`` for a GGUF weight ``W [N, K]``, with XLA (the CPU path of
    `jaxqlora.quantize.gguf_linear`).

    A product of at most `pallas_kernels.gguf_cpu.MAX_M` rows (decoding) by a Q4_0, Q4_1 or
    Q8_0 weight runs the CPU kernel `pallas_kernels.gguf_cpu.gguf_gemv` where it is available
    (it reads the blocks in place and never writes a decoded weight); everything else, and
    derivatives, take XLA's path below.

    The rows are taken in pieces of at most `jaxqlora.model.PIECE_VALUES` values
    (`jaxqlora.model.by_row_pieces`); in each piece every sub-block position of every block is
    decoded to float32 (the format's ``decode``, the operations of the Pallas kernel) and
    multiplied by the matching values of x, so the dequantized weight never exists whole and
    each decoded piece is read from the cache.

    Args:
      x: ``[..., K]`` float activations (computed in float32).
      w: the weight; stacked (``[L, ...]`` planes) when ``layer`` is given.
      layer: int or int32 scalar: multiply layer ``layer`` of a stacked weight (a stack mixing
        formats picks the layer's format with ``lax.switch``).

    Returns:
      ``[..., N]`` in x's dtype (float32 accumulation).
    """
    n, k = w.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).astype(jnp.float32)
    stacked = layer is not None
    kind = w.kind[layer] if stacked else w.kind
    fields = sorted(w.planes)

    def pieces(x2):
        def product(start, rows):
            planes = {}
            for name in fields:
                p = w.planes[name]
                starts = ((layer,) if stacked else ()) + (start,) + (0,) * (p.ndim - 1 - stacked)
                sizes = ((1,) if stacked else ()) + (rows,) + p.shape[1 + stacked:]
                piece = jax.lax.dynamic_slice(p, starts, sizes)
                planes[name] = piece[0] if stacked else piece
            branches = [lambda pl, f=f: _piece_product(x2, pl, f) for f in w.modules]
            if len(branches) == 1:
                return branches[0](planes)
            return jax.lax.switch(kind, branches, planes)

        return by_row_pieces(product, n, k)

    if len(w.formats) == 1 and gguf_cpu.applies(w.formats[0], x2.shape[0]):
        y = gguf_cpu.gguf_gemv(x2, w.planes, w.formats[0], layer, fallback=pieces)
    else:
        y = pieces(x2)
    return y.reshape(*lead, n).astype(x.dtype)


def from_blocks(raw: np.ndarray, qtype: str, shape: tuple[int, int]) -> GGUFWeight:
    """A `GGUFWeight` (NumPy planes, one layer) from a GGUF tensor's stored bytes.

    Args:
      raw: uint8, the tensor's bytes (``gguf.GGUFReader`` gives ``[out, in / BLOCK *
        TYPE_SIZE]``), rows outermost.
      qtype: a name in `GGUF_FORMATS`.
      shape: ``(out, in)``.

    Raises:
      KeyError: ``qtype`` is not kept quantized.
      ValueError: ``in`` not a multiple of the block size, or ``raw`` not exactly
        ``out * in / BLOCK * TYPE_SIZE`` bytes.
    """
    fmt = GGUF_FORMATS[qtype]
    n, k = (int(s) for s in shape)
    want = n * (k // fmt.BLOCK) * fmt.TYPE_SIZE
    if k % fmt.BLOCK or raw.size * raw.dtype.itemsize != want:
        raise ValueError(f"{qtype} {n}x{k} needs {want} bytes (in a multiple of {fmt.BLOCK}), "
                         f"got {raw.size * raw.dtype.itemsize}")
    return GGUFWeight(split_blocks(raw, fmt, k), np.zeros((), np.int32), (qtype,), (n, k))


def to_blocks(w: GGUFWeight) -> np.ndarray:
    """The GGUF bytes of a one-layer `GGUFWeight` (uint8 ``[out, in / BLOCK * TYPE_SIZE]``)."""
    if w.stacked:
        raise ValueError("to_blocks takes one layer (index a stacked weight with jaxqlora.stacked.layer_slice)")
    fmt = GGUF_FORMATS[w.formats[int(w.kind)]]
    return join_blocks({k: np.asarray(v) for k, v in w.planes.items()}, fmt)


def family_ok(qtypes: Sequence[str]) -> bool:
    """True when weights of these types can share one stack (same block size)."""
    return len({GGUF_FORMATS[q].BLOCK for q in qtypes}) == 1


def stack_weights(parts: Sequence[GGUFWeight]) -> GGUFWeight:
    """One stacked `GGUFWeight` ``[L, ...]`` from one-layer weights of one shape whose
    formats share a block size; fields missing in a layer's format are zero, narrower
    ones zero-padded (`pallas_kernels.gguf_matmul.union_layout`).

    Raises:
      ValueError: different shapes, or formats of different block sizes.
    """
    shapes = {p.shape for p in parts}
    if len(shapes) != 1:
        raise ValueError(f"cannot stack weights of shapes {sorted(shapes)}")
    formats = tuple(sorted({p.formats[int(p.kind)] for p in parts}))
    layout = union_layout([GGUF_FORMATS[f] for f in formats])
    planes = {}
    for name, kind in layout.items():
        layers = []
        for p in parts:
            a = p.planes.get(name)
            ref = next(iter(p.planes.values()))
            if kind == F16:
                layers.append(np.zeros(ref.shape[:2], np.float16) if a is None else np.asarray(a))
            else:
                out = np.zeros(ref.shape[:2] + (int(kind),), np.uint8)
                if a is not None:
                    out[..., :a.shape[-1]] = np.asarray(a)
                layers.append(out)
        planes[name] = jnp.asarray(np.stack(layers))
    kind = jnp.asarray([formats.index(p.formats[int(p.kind)]) for p in parts], jnp.int32)
    return GGUFWeight(planes, kind, formats, shapes.pop())


def to_device(w: GGUFWeight) -> GGUFWeight:
    """``w`` with its planes and kind as device arrays."""
    return w.replace(planes={k: jnp.asarray(v) for k, v in w.planes.items()}, kind=jnp.asarray(w.kind, jnp.int32))


__all__ = ["GGUF_FORMATS", "GGUFWeight", "xla_matmul", "from_blocks", "to_blocks", "stack_weights", "family_ok", "to_device"]
