"""NF4 (4-bit NormalFloat) weights, stored exactly as bitsandbytes stores them.

A weight ``w`` of an ``nn.Linear`` layout ``[out_features, in_features]`` is
flattened row-major and cut into blocks of ``blocksize`` consecutive values
(the last block may be shorter). Each block keeps one float32 ``absmax``; each
value becomes the index (0..15) of the nearest entry of the NF4 codebook
(QLoRA paper, Dettmers et al. 2023, App. E) to ``value / absmax``. Two indices
share a byte: element ``2j`` in the HIGH nibble, ``2j+1`` in the LOW nibble.

With double quantization (QLoRA Sec. 3, bnb ``compress_statistics=True``) the
absmax vector is itself quantized: ``offset = mean(absmax)``, and
``absmax - offset`` is quantized in blocks of 256 to uint8 indices into the
signed 8-bit dynamic map, with one float32 ``nested_absmax`` per 256 blocks.

Everything here reproduces, bit for bit, what bitsandbytes 0.50 computes on CPU
(``bitsandbytes.functional.quantize_4bit(w, quant_type="nf4")``, which runs the
torch code in ``bitsandbytes/backends/default/ops.py`` for the 4-bit part and
the native ``cquantize_blockwise_cpu_fp32`` kernel for the nested part), and the
checkpoint keys transformers writes for a bnb 4-bit ``Linear4bit``
(``QuantState.as_dict(packed=True)`` + ``Linear4bit._save_to_state_dict``).

Details that matter for bit-identity (all checked by ``tests/test_nf4.py``):

* 4-bit rounding is ``torch.bucketize(x, midpoints)``: a value exactly on a
  midpoint of two codes goes to the LOWER code. Full blocks are scaled by
  ``x * (1 / absmax)``, the last partial block by ``x / absmax`` (bnb does it
  that way); a block of zeros has ``absmax`` 0 (full block) or 1e-38 (partial
  last block, bnb clamps it) and codes 7 (= 0.0).
* When ``out * in`` is odd the last byte's low nibble is code 7 (bnb pads the
  scaled values with one 0.0 before packing).
* The nested 8-bit quantizer is NOT a nearest-code search: bnb's CPU kernel maps
  ``v = clamp(x * (1/absmax), -1, 1)`` to ``i = trunc(((v+1)*0.5)*65535 + 0.5)``
  and reads the code index from a 65536-entry table built from the map's
  midpoints. Values very close to 0 therefore get code 131 (2.1e-5), not 127.
  A nested block of zeros (e.g. only one 4-bit block) gets absmax 0 and code 0.
* ``offset`` is ``torch.mean`` of float32 absmax on CPU, whose rounding depends
  on torch's summation order; `_torch_cpu_mean_f32` replays that order
  (8-lane cascade sum, single thread). torch splits sums of more than 32768
  values across threads, so for layers with more than 32768 blocks bnb's own
  offset depends on ``torch.get_num_threads()``; ours equals bnb's with one
  torch thread. Either way only the last bit of ``offset`` can differ.

This module imports neither torch nor bitsandbytes.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxqlora.errors import (
    CheckpointError,
    JaxQLoRAError,
    MissingTensorError,
    TensorShapeError,
)

__all__ = [
    "NF4_CODE",
    "NF4_BLOCKSIZES",
    "NESTED_BLOCKSIZE",
    "NF4ArgumentError",
    "NF4Weight",
    "absmax_float32",
    "create_dynamic_map",
    "dequantize_nf4",
    "nf4_from_state_dict",
    "nf4_to_state_dict",
    "quantize_nf4",
    "validate_nf4",
]

#: The 16 NF4 code values, index 0..15 (QLoRA paper App. E; bnb
#: ``functional.get_4bit_type("nf4")``), float32 [16], sorted ascending. One copy, kept
#: beside the kernel that decodes it (``pallas_kernels`` cannot import jaxqlora).
from pallas_kernels.nf4_matmul import (  # noqa: E402
    NF4_CODE,
    double_quant_absmax,
    nf4_dequantize_reference,
    opaque_f32,
)

#: Block sizes bitsandbytes accepts for 4-bit quantization (``quantize_4bit``).
NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

#: Block size of the nested (double) quantization of absmax; fixed in bnb.
NESTED_BLOCKSIZE = 256

# Decision boundaries of the 4-bit rounding: bnb's `_get_4bit_quantize_bounds`,
# (code[:-1] + code[1:]) / 2 in float32.
_NF4_BOUNDS = ((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)).astype(np.float32)

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}

# torch's float32 CPU sum kernel (aten/src/ATen/native/cpu/SumKernel.cpp,
# `cascade_sum`) accumulates in vectors of this many lanes.
_TORCH_SUM_LANES = 8


class NF4ArgumentError(JaxQLoRAError, ValueError):
    """An argument of `quantize_nf4` / `dequantize_nf4` / `NF4Weight` is invalid.

    Attributes:
      field: the name of the offending argument or field (e.g. ``"blocksize"``).
    """

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


# ---------------------------------------------------------------------------
# Code tables
# ---------------------------------------------------------------------------


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """float32 ``torch.linspace(start, end, steps)`` on CPU, bit for bit.

    torch's `linspace_kernel` (aten/src/ATen/native/cpu/RangeFactoriesKernel.cpp)
    computes ``start + step*i`` for the first half and ``end - step*(steps-1-i)``
    for the second, in float32, and the compiler contracts each into one fused
    multiply-add (one rounding), which float64 arithmetic reproduces here.
    """
    s, e = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([s], np.float32)
    step = np.float32((e - s) / np.float32(steps - 1))
    idx = np.arange(steps, dtype=np.float64)
    lo = np.float64(s) + np.float64(step) * idx
    hi = np.float64(e) - np.float64(step) * (steps - 1 - idx)
    return np.where(idx < steps // 2, lo, hi).astype(np.float32)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """The 8-bit dynamic quantization map, float32 [2**total_bits], sorted.

    Same algorithm and the same float32 values as
    ``bitsandbytes.functional.create_dynamic_map`` (Dettmers 2015, "8-Bit
    Approximations for Parallelism in Deep Learning"): for each exponent
    ``i`` the midpoints of ``linspace(0.1, 1, n_i)`` are scaled by
    ``10**(i - max_exponent_bits + 1)``; 0 and 1 are appended; the list is
    sorted. With ``signed=True`` (the default, used by double quantization) the
    first entry is -0.99297 (not -1) and entry 127 is 0.

    Raises:
      NF4ArgumentError: if the bit counts give no valid map.
    """
    if total_bits < 2 or not 0 < max_exponent_bits < total_bits:
        raise NF4ArgumentError(
            "max_exponent_bits", f"need 0 < max_exponent_bits < total_bits, got {max_exponent_bits}, {total_bits}"
        )
    data: list[np.float32] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1

    def add(scale_exp: int, n_bounds: int) -> None:
        bounds = _torch_linspace_f32(0.1, 1.0, n_bounds)
        means = ((bounds[:-1] + bounds[1:]) / np.float32(2.0)).astype(np.float32)
        # python scalar * float32 tensor: torch casts the scalar to float32.
        scale = np.float32(10.0**scale_exp)
        data.extend((scale * means).astype(np.float32))
        if signed:
            data.extend((-scale * means).astype(np.float32))

    i = 0
    for i in range(max_exponent_bits):
        frac_bits = i + non_sign_bits - max_exponent_bits + (0 if signed else 1)
        n_items = 2**frac_bits + 1
        add(-(max_exponent_bits - 1) + i, n_items)
    if additional_items > 0:
        add(-(max_exponent_bits - 1) + i, additional_items + 1)
    data += [np.float32(0.0), np.float32(1.0)]
    if len(data) != 2**total_bits:
        raise NF4ArgumentError("total_bits", f"map has {len(data)} entries, expected {2 ** total_bits}")
    return np.sort(np.array(data, dtype=np.float32))


@functools.lru_cache(maxsize=1)
def _signed_dynamic_map() -> np.ndarray:
    m = create_dynamic_map(signed=True)
    m.setflags(write=False)
    return m


@functools.lru_cache(maxsize=1)
def _nested_lut() -> np.ndarray:
    """bnb's CPU 8-bit quantization table (`build_quantize_lut`), uint8 [65536].

    Entry ``i`` is the index of the code whose midpoint interval contains
    ``-1 + 2*i/65535`` (float32): the number of midpoints
    ``0.5*(code[k]+code[k+1])`` strictly below it.
    """
    code = _signed_dynamic_map()
    mids = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    i = np.arange(65536, dtype=np.float32)
    vals = (np.float32(-1.0) + (np.float32(2.0) * i) / np.float32(65535)).astype(np.float32)
    lut = np.searchsorted(mids, vals, side="left").astype(np.uint8)
    lut.setflags(write=False)
    return lut


# ---------------------------------------------------------------------------
# The pytree
# ---------------------------------------------------------------------------


@struct.dataclass
class NF4Weight:
    """An NF4-quantized 2-D weight in bitsandbytes' layout; an immutable JAX pytree.

    Array fields (pytree leaves):
      packed: uint8 [(N*K+1)//2], N, K = ``shape``. Codes of the row-major
        flattened weight, element 2j in the high nibble, 2j+1 in the low nibble.
        (bnb stores the same bytes as uint8 [(N*K+1)//2, 1].)
      absmax: per 4-bit block, nblocks = ceil(N*K / blocksize). float32
        [nblocks] without double quantization; uint8 [nblocks] (indices into
        ``nested_code``) with it.
      nested_absmax: float32 [ceil(nblocks/256)], or None without double quant.
      nested_code: float32 [256], the signed dynamic map, or None.
      offset: float32 [] (scalar), mean of the float32 absmax, or None.
      code: float32 [16], the NF4 codebook (`NF4_CODE`).
      kernel_scale: None, or the Hopper kernels' layout of the block scales derived by
        `with_kernel_layout`: bfloat16 ``[K // 64, N]`` (the float32 absmax, double
        quantization decoded, one per 64 columns, transposed). Derived, never stored
        in a checkpoint; `pallas_kernels.nf4_mgpu` reads it with the bnb ``packed``
        bytes as they are.
      kernel_codes: None, or the Hopper forward kernel's layout of the codes derived by
        ``with_kernel_layout(q, codes=True)``: uint32 ``[N, K // 8]`` words of 8 codes in
        wgmma's register order (`pallas_kernels.nf4_mgpu.nf4_kernel_codes`; fewer
        instructions per weight in the decode GEMV). A second copy of the codes (another
        ``N * K / 2`` bytes), derived, never stored; ``packed`` stays the bnb bytes that
        every other path (backward, larger M, saving) reads.

    Static fields (pytree metadata, hashable):
      shape: (out_features, in_features).
      blocksize: 4-bit block size, one of `NF4_BLOCKSIZES`.
      nested_blocksize: 256 with double quantization, else None.
      dtype: name of the original weight dtype: 'float32', 'bfloat16' or 'float16'.

    Source: bitsandbytes ``functional.QuantState`` (fields ``absmax``, ``code``,
    ``offset``, ``state2``) and ``quantize_4bit``.
    """

    packed: jax.Array
    absmax: jax.Array
    nested_absmax: jax.Array | None
    nested_code: jax.Array | None
    offset: jax.Array | None
    code: jax.Array
    shape: tuple[int, int] = struct.field(pytree_node=False)
    blocksize: int = struct.field(pytree_node=False, default=64)
    nested_blocksize: int | None = struct.field(pytree_node=False, default=None)
    dtype: str = struct.field(pytree_node=False, default="float32")
    kernel_scale: jax.Array | None = None
    kernel_codes: jax.Array | None = None

    @property
    def double_quant(self) -> bool:
        """True when absmax is double-quantized (bnb ``compress_statistics``)."""
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        """Number of weight values, ``out_features * in_features``."""
        return int(self.shape[0]) * int(self.shape[1])

    @property
    def num_blocks(self) -> int:
        """Number of 4-bit blocks, ``ceil(numel / blocksize)``."""
        return -(-self.numel // self.blocksize)

    @property
    def nbytes(self) -> int:
        """Bytes held by all array fields (packed, absmax, nested state, offset, code tables)."""
        total = 0
        for a in (self.packed, self.absmax, self.nested_absmax, self.nested_code, self.offset, self.code,
                  self.kernel_scale, self.kernel_codes):
            if a is not None:
                total += int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
        return total

    def absmax_float32(self) -> jax.Array:
        """The float32 absmax per block, [nblocks]; see module function `absmax_float32`."""
        return absmax_float32(self)


def _check_static(shape: Any, blocksize: Any, dtype: Any) -> tuple[tuple[int, int], int, str]:
    if not isinstance(shape, (tuple, list)) or len(shape) != 2:
        raise NF4ArgumentError("shape", f"expected (out_features, in_features), got {shape!r}")
    try:
        shp = (int(shape[0]), int(shape[1]))
    except (TypeError, ValueError):
        raise NF4ArgumentError("shape", f"expected two integers, got {shape!r}") from None
    if shp[0] <= 0 or shp[1] <= 0:
        raise NF4ArgumentError("shape", f"both dimensions must be positive, got {shp}")
    bs = _check_blocksize(blocksize)
    if dtype not in _DTYPES:
        raise NF4ArgumentError("dtype", f"must be one of {tuple(_DTYPES)}, got {dtype!r}")
    return shp, bs, str(dtype)


def _check_blocksize(blocksize: Any) -> int:
    if isinstance(blocksize, (bool, np.bool_)) or not isinstance(blocksize, (int, np.integer)):
        raise NF4ArgumentError("blocksize", f"must be an int, one of {NF4_BLOCKSIZES}, got {blocksize!r}")
    if int(blocksize) not in NF4_BLOCKSIZES:
        raise NF4ArgumentError("blocksize", f"must be one of {NF4_BLOCKSIZES} (bnb quantize_4bit), got {blocksize!r}")
    return int(blocksize)


def _check_array(name: str, a: Any, dtype: Any, shape: tuple[int, ...]) -> None:
    if a is None:
        raise NF4ArgumentError(name, "is None")
    if np.dtype(a.dtype) != np.dtype(dtype):
        raise NF4ArgumentError(name, f"dtype must be {np.dtype(dtype).name}, got {np.dtype(a.dtype).name}")
    if tuple(a.shape) != tuple(shape):
        raise NF4ArgumentError(name, f"shape must be {tuple(shape)}, got {tuple(a.shape)}")


def validate_nf4(q: NF4Weight) -> NF4Weight:
    """Check that the fields of ``q`` are mutually consistent; return ``q``.

    Checks dtypes and shapes of every array field against ``shape``,
    ``blocksize`` and ``double_quant`` (works on traced arrays too; values are
    not inspected).

    Raises:
      NF4ArgumentError: naming the first inconsistent field.
    """
    shape, bs, _ = _check_static(q.shape, q.blocksize, q.dtype)
    n = shape[0] * shape[1]
    nb = -(-n // bs)
    _check_array("packed", q.packed, np.uint8, ((n + 1) // 2,))
    _check_array("code", q.code, np.float32, (16,))
    if q.double_quant:
        if q.nested_blocksize != NESTED_BLOCKSIZE:
            raise NF4ArgumentError("nested_blocksize", f"must be {NESTED_BLOCKSIZE}, got {q.nested_blocksize!r}")
        _check_array("absmax", q.absmax, np.uint8, (nb,))
        _check_array("nested_absmax", q.nested_absmax, np.float32, (-(-nb // NESTED_BLOCKSIZE),))
        _check_array("nested_code", q.nested_code, np.float32, (256,))
        _check_array("offset", q.offset, np.float32, ())
    else:
        for name in ("nested_code", "offset"):
            if getattr(q, name) is not None:
                raise NF4ArgumentError(name, "must be None without double quantization (nested_absmax is None)")
        if q.nested_blocksize is not None:
            raise NF4ArgumentError("nested_blocksize", "must be None without double quantization")
        _check_array("absmax", q.absmax, np.float32, (nb,))
    return q


# ---------------------------------------------------------------------------
# torch's float32 CPU mean, replayed
# ---------------------------------------------------------------------------


def _seq_sum(rows: jax.Array) -> jax.Array:
    """Left-to-right float32 sum over axis 0, starting from 0 (strict order)."""
    if rows.shape[0] == 0:
        return jnp.zeros(rows.shape[1:], jnp.float32)
    if rows.shape[0] <= 4:
        acc = rows[0]
        for k in range(1, rows.shape[0]):
            acc = acc + rows[k]
        return acc
    total, _ = jax.lax.scan(lambda c, r: (c + r, None), jnp.zeros(rows.shape[1:], jnp.float32), rows)
    return total


def _ceil_log2(x: int) -> int:
    return 1 if x <= 2 else int(x - 1).bit_length()


def _grouped_seq_sums(x: jax.Array, group: int) -> tuple[jax.Array, jax.Array]:
    """Split rows of x into full groups of `group` (summed in order) and the rest (summed in order)."""
    n_full = x.shape[0] // group
    full = x[: n_full * group].reshape((n_full, group) + x.shape[1:])
    sums = _seq_sum(jnp.moveaxis(full, 1, 0)) if n_full else jnp.zeros((0,) + x.shape[1:], jnp.float32)
    rest = _seq_sum(x[n_full * group :])
    return sums, rest


def _multi_row_sum(x: jax.Array) -> jax.Array:
    """torch `multi_row_sum` (SumKernel.cpp): x [size, nrows, W] -> [nrows, W]."""
    size = x.shape[0]
    num_levels = 4
    level_power = max(4, _ceil_log2(size) // num_levels)
    step = 1 << level_power
    chunks, acc0 = _grouped_seq_sums(x, step)  # level 0: chunks of `step` rows
    groups, acc1 = _grouped_seq_sums(chunks, step)  # level 1
    supers, acc2 = _grouped_seq_sums(groups, step)  # level 2
    acc3 = _seq_sum(supers)  # level 3 never resets
    return ((acc0 + acc1) + acc2) + acc3


def _row_sum(x: jax.Array) -> jax.Array:
    """torch `row_sum` (SumKernel.cpp, ilp_factor 4): x [size, W] -> [W]."""
    size, width = x.shape
    size_ilp = size // 4
    if size_ilp:
        parts = _multi_row_sum(x[: size_ilp * 4].reshape(size_ilp, 4, width))
    else:
        parts = jnp.zeros((4, width), jnp.float32)
    p0 = parts[0]
    for i in range(size_ilp * 4, size):
        p0 = p0 + x[i]
    for k in range(1, 4):
        p0 = p0 + parts[k]
    return p0


def _torch_cpu_mean_f32(x: jax.Array, lanes: int = _TORCH_SUM_LANES) -> jax.Array:
    """``torch.mean`` of a contiguous float32 CPU vector, bit for bit (one thread).

    Replays `cascade_sum` / `vectorized_inner_sum` of torch's SumKernel.cpp
    (float32 accumulators, ``lanes``-wide vectors) and then ``sum / n``.
    """
    n = x.shape[0]
    if n >= lanes:
        nvec = n // lanes
        vacc = _row_sum(x[: nvec * lanes].reshape(nvec, lanes))
        final = _seq_sum(jnp.concatenate([x[nvec * lanes :], vacc]))
    else:
        final = _row_sum(x.reshape(n, 1))[0]
    # XLA rewrites `x / constant` as `x * (1/constant)`, which is not exact;
    # make the divisor opaque (final >= +0, so its sign bit is a runtime 0).
    return final / opaque_f32(n, final)


# ---------------------------------------------------------------------------
# Quantize / dequantize
# ---------------------------------------------------------------------------


def _nf4_codes(x: jax.Array) -> jax.Array:
    """torch.bucketize(x, _NF4_BOUNDS, right=False) for x in [-1, 1]: int32 codes 0..15."""
    bounds = jnp.asarray(_NF4_BOUNDS)
    # binary search: count of bounds strictly below x. The first step compares with one
    # scalar (a gather at constant indices would be constant-folded at the weight's size).
    idx = jnp.where(bounds[7] < x, 8, 0).astype(jnp.int32)
    for step in (4, 2, 1):
        idx = jnp.where(bounds[idx + (step - 1)] < x, idx + step, idx)
    return idx


def _quantize_nested(absmax: jax.Array, lanes: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """bnb double quantization of the float32 absmax: (uint8 codes, nested absmax, offset)."""
    nb = absmax.shape[0]
    offset = _torch_cpu_mean_f32(absmax, lanes)
    x = absmax - offset
    nb2 = -(-nb // NESTED_BLOCKSIZE)
    xp = jnp.pad(x, (0, nb2 * NESTED_BLOCKSIZE - nb)).reshape(nb2, NESTED_BLOCKSIZE)
    am2 = jnp.max(jnp.abs(xp), axis=1)
    inv = jnp.float32(1.0) / jnp.where(am2 == 0, jnp.float32(1.0), am2)
    v = jnp.clip(xp * inv[:, None], -1.0, 1.0)
    t = (v + jnp.float32(1.0)) * jnp.float32(0.5)
    # XLA may fuse this into an FMA; bnb rounds twice. Checked: over +-40 ulps
    # around every one of the 65535 table boundaries both give the same index.
    t = t * jnp.float32(65535) + jnp.float32(0.5)
    lut_idx = jnp.clip(t.astype(jnp.int32), 0, 65535)
    codes = jnp.asarray(_nested_lut())[lut_idx]
    codes = jnp.where(am2[:, None] == 0, jnp.uint8(0), codes)
    return codes.reshape(-1)[:nb], am2, offset


@functools.partial(jax.jit, static_argnames=("blocksize", "double_quant", "lanes"))
def _quantize_arrays(w: jax.Array, blocksize: int, double_quant: bool, lanes: int):
    flat = w.reshape(-1).astype(jnp.float32)
    n = flat.shape[0]
    rem = n % blocksize
    full = n - rem
    pieces, maxes = [], []
    if full:
        blocks = flat[:full].reshape(full // blocksize, blocksize)
        am = jnp.max(jnp.abs(blocks), axis=1)
        # bnb: A * (1.0 / absmax.clamp(min=1e-38)); an all-zero block scales to 0 either way.
        recip = jnp.float32(1.0) / jnp.where(am == 0, jnp.float32(1.0), am)
        pieces.append(jnp.clip(blocks * recip[:, None], -1.0, 1.0).reshape(-1))
        maxes.append(am)
    if rem:
        tail = flat[full:]
        am_t = jnp.max(jnp.abs(tail))
        # bnb clamps the partial block's absmax to 1e-38 (and stores the clamped value).
        am_t = jnp.where(am_t == 0, jnp.float32(1e-38), am_t)
        safe = jnp.where(am_t < jnp.float32(1.1754944e-38), jnp.float32(1.0), am_t)
        pieces.append(jnp.clip(tail / safe, -1.0, 1.0))
        maxes.append(am_t[None])
    scaled = jnp.concatenate(pieces) if len(pieces) > 1 else pieces[0]
    absmax = jnp.concatenate(maxes) if len(maxes) > 1 else maxes[0]
    if n % 2:
        scaled = jnp.pad(scaled, (0, 1))  # bnb pads with 0.0 -> code 7
    q = _nf4_codes(scaled).astype(jnp.uint8)
    packed = (q[0::2] << 4) | q[1::2]
    if not double_quant:
        return packed, absmax, None, None
    codes, nested_absmax, offset = _quantize_nested(absmax, lanes)
    return packed, codes, nested_absmax, offset


def quantize_nf4(w: Any, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a 2-D weight to NF4 exactly as bitsandbytes does.

    Equivalent to ``bitsandbytes.functional.quantize_4bit(w, blocksize=blocksize,
    compress_statistics=double_quant, quant_type="nf4")`` on CPU (bnb 0.50;
    `backends/default/ops.py` quantize_4bit, `functional.quantize_blockwise`
    for the nested state): same packed bytes, absmax, nested absmax / code and
    offset. Computation is in float32 and jit-friendly (``blocksize`` and
    ``double_quant`` must be static under ``jax.jit``).

    Args:
      w: [out_features, in_features] array (numpy or jax), float32, bfloat16 or
        float16 (float64 is rounded to float32 first and recorded as 'float32',
        since bnb has no float64).
      blocksize: values per absmax block, one of `NF4_BLOCKSIZES`.
      double_quant: quantize absmax again (QLoRA double quantization,
        bnb ``compress_statistics``).

    Returns:
      `NF4Weight` with ``dtype`` the name of ``w``'s dtype.

    Raises:
      NF4ArgumentError (a ValueError), field named: ``blocksize`` not allowed,
      ``double_quant`` not a bool, ``w`` not 2-D or empty, ``w.dtype`` not a
      float type, ``w`` holding NaN/inf (checked only when ``w`` is concrete,
      not under ``jax.jit``).
    """
    blocksize = _check_blocksize(blocksize)
    if not isinstance(double_quant, (bool, np.bool_)):
        raise NF4ArgumentError("double_quant", f"must be a bool, got {double_quant!r}")
    if not hasattr(w, "shape") or not hasattr(w, "dtype"):
        w = np.asarray(w)
    if len(w.shape) != 2:
        raise NF4ArgumentError("w", f"must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")
    if w.shape[0] == 0 or w.shape[1] == 0:
        raise NF4ArgumentError("w", f"must not be empty, got shape {tuple(w.shape)}")
    dt = np.dtype(w.dtype)
    if dt == np.float64:
        dtype_name = "float32"
    elif dt.name in _DTYPES:
        dtype_name = dt.name
    else:
        raise NF4ArgumentError("w.dtype", f"must be float32, bfloat16 or float16, got {dt.name}")
    try:
        finite = bool(jnp.all(jnp.isfinite(jnp.asarray(w))))
    except jax.errors.ConcretizationTypeError:  # traced under jit: values unknown
        finite = True
    if not finite:
        raise NF4ArgumentError("w", "contains NaN or infinite values")
    if dt == np.float64:
        w = np.asarray(w, dtype=np.float32) if isinstance(w, np.ndarray) else jnp.asarray(w, jnp.float32)
    packed, absmax, nested_absmax, offset = _quantize_arrays(w, blocksize, bool(double_quant), _TORCH_SUM_LANES)
    dq = bool(double_quant)
    return NF4Weight(
        packed=packed,
        absmax=absmax,
        nested_absmax=nested_absmax,
        nested_code=jnp.asarray(_signed_dynamic_map()) if dq else None,
        offset=offset,
        code=jnp.asarray(NF4_CODE),
        shape=(int(w.shape[0]), int(w.shape[1])),
        blocksize=blocksize,
        nested_blocksize=NESTED_BLOCKSIZE if dq else None,
        dtype=dtype_name,
    )


def absmax_float32(q: NF4Weight) -> jax.Array:
    """The float32 absmax of every 4-bit block of ``q``, [nblocks].

    Without double quantization this is ``q.absmax``. With it, it is
    ``nested_code[absmax] * nested_absmax[block // 256] + offset``, rounded
    after the product and after the sum like bnb
    (``functional.dequantize_blockwise(absmax, state2) + offset`` in
    ``dequantize_4bit``); a plain ``a * b + c`` would be fused into one FMA by
    XLA on CPU and differ in the last bit. ``nested_absmax`` must be >= +0 (bnb
    writes a max of absolute values; `nf4_from_state_dict` checks it).

    Returns:
      float32 jax.Array [nblocks].
    """
    if not q.double_quant:
        return q.absmax
    return double_quant_absmax(q.absmax, q.nested_absmax, q.nested_code, q.offset, NESTED_BLOCKSIZE)


def with_kernel_layout(q: NF4Weight, *, codes: bool = False, force: bool = False) -> NF4Weight:
    """``q`` with `NF4Weight.kernel_scale` (and, with ``codes``, `NF4Weight.kernel_codes`)
    derived, when the Mosaic GPU kernels (`pallas_kernels.nf4_mgpu`) can use them, else
    ``q`` unchanged.

    They can when this machine's GPU is a Hopper (``force=True`` skips that check, for
    tests), ``K`` and ``blocksize`` are multiples of 64, ``N`` of 8, and ``code`` is the NF4
    codebook (the kernels hold it as immediates). A stacked weight (leading layer axis on
    every array) gets ``kernel_scale [L, K // 64, N]`` and ``kernel_codes [L, N, K // 8]``.
    The scales cost ``N * K / 32`` bytes per weight (1/16 of its packed codes); the codes
    another ``N * K / 2`` (a second copy of the codes, worth it for decoding: the forward
    GEMV over them issues about 16% fewer instructions, H200). Works on abstract
    (``jax.eval_shape``) weights too; a field already present is kept.

    Source: the kernel layouts are this project's (issue 13); the scales are bnb's
    ``dequantize_4bit`` absmax (`absmax_float32`) rounded once to bfloat16, the codes
    `pallas_kernels.nf4_mgpu.nf4_kernel_codes` of the bnb bytes (exactly invertible).
    """
    from pallas_kernels.nf4_mgpu import nf4_kernel_codes, nf4_kernel_scale, nf4_mgpu_supported

    n, k = q.shape
    if k % 64 or q.blocksize % 64 or n % 8:
        return q
    if not (force or nf4_mgpu_supported(1, n, k, q.blocksize, jnp.bfloat16)):
        return q
    if isinstance(q.code, (np.ndarray, jax.Array)) and not isinstance(q.code, jax.core.Tracer):
        code = np.asarray(q.code, np.float32).reshape(-1, 16)
        if not (code == np.asarray(NF4_CODE, np.float32)).all():
            return q
    stacked = q.packed.ndim == 2
    if q.kernel_scale is None:
        if stacked:
            scale = jax.vmap(lambda one: nf4_kernel_scale(absmax_float32(one), n, k, one.blocksize))(q)
        else:
            scale = nf4_kernel_scale(absmax_float32(q), n, k, q.blocksize)
        q = q.replace(kernel_scale=scale)
    if codes and q.kernel_codes is None:
        lead = q.packed.shape[:1] if stacked else ()
        q = q.replace(kernel_codes=nf4_kernel_codes(q.packed.reshape(*lead, n, k // 2), n, k))
    return q


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def _dequantize(q: NF4Weight, out_dtype: str) -> jax.Array:
    # The kernel module's jnp dequantize, fed the bnb-rounded float32 absmax (its own
    # double-quant formula may be fused into an FMA; `absmax_float32` is not).
    w = nf4_dequantize_reference(q.packed, absmax_float32(q), shape=q.shape, code=q.code, blocksize=q.blocksize)
    return w.astype(_DTYPES[out_dtype])


def dequantize_nf4(q: NF4Weight, dtype: Any = None) -> jax.Array:
    """Dequantize ``q`` to a [out_features, in_features] array.

    ``out[i] = code[nibble_i] * absmax_float32(q)[i // blocksize]`` in float32,
    then cast (round to nearest even) to ``dtype``: what
    ``bitsandbytes.functional.dequantize_4bit`` computes (``_dequantize_4bit_compute``
    in `backends/default/ops.py`, CUDA kernel ``kDequantizeBlockwise``).

    Note: bnb 0.50's native CPU kernel (``cdequantize_blockwise_cpu_nf4_*``, AVX-512
    path, taken when in_features and blocksize are multiples of 16) indexes
    absmax per row and is wrong when in_features is not a multiple of blocksize
    (e.g. [128, 576] with blocksize 128); we follow the flat-block definition.

    Args:
      q: an `NF4Weight`.
      dtype: output dtype ('float32', 'bfloat16', 'float16' or the jnp/np
        dtype); default the original dtype ``q.dtype``.

    Returns:
      jax.Array of shape ``q.shape``.

    Raises:
      NF4ArgumentError: ``dtype`` unsupported, or ``q``'s fields inconsistent.
    """
    if not isinstance(q, NF4Weight):
        raise NF4ArgumentError("q", f"must be an NF4Weight, got {type(q).__name__}")
    if dtype is None:
        name = q.dtype
    else:
        try:
            name = jnp.dtype(dtype).name
        except TypeError:
            raise NF4ArgumentError("dtype", f"not a dtype: {dtype!r}") from None
    if name not in _DTYPES:
        raise NF4ArgumentError("dtype", f"must be one of {tuple(_DTYPES)}, got {name!r}")
    validate_nf4(q)
    return _dequantize(q, name)


# ---------------------------------------------------------------------------
# Checkpoint keys (transformers / bitsandbytes 4-bit state dicts)
# ---------------------------------------------------------------------------

_QS_KEY = "quant_state.bitsandbytes__nf4"


def _weight_key(prefix: str) -> str:
    if not prefix:
        return "weight"
    return prefix + "weight" if prefix.endswith(".") else prefix + ".weight"


def nf4_to_state_dict(prefix: str, q: NF4Weight) -> dict[str, np.ndarray]:
    """The tensors transformers + bitsandbytes save for a 4-bit nn.Linear weight.

    Keys (``W = prefix + ".weight"``), in bnb's order, as numpy arrays:

    * ``W``: uint8 [(N*K+1)//2, 1], the packed codes.
    * ``W.absmax``: float32 [nblocks], or uint8 [nblocks] with double quant.
    * ``W.quant_map``: float32 [16], the NF4 code.
    * ``W.nested_absmax``: float32 [ceil(nblocks/256)] (double quant only).
    * ``W.nested_quant_map``: float32 [256] (double quant only).
    * ``W.quant_state.bitsandbytes__nf4``: uint8 [L], the UTF-8 bytes of
      ``json.dumps({"quant_type": "nf4", "blocksize": B, "dtype": D,
      "shape": [N, K]}`` plus ``"nested_blocksize": 256, "nested_dtype":
      "float32", "nested_offset": <float>`` with double quant``)``.

    Source: bnb ``QuantState.as_dict(packed=True)``, ``utils.pack_dict_to_tensor``,
    ``nn.Linear4bit._save_to_state_dict``. ``prefix`` is the module path, e.g.
    ``"model.layers.0.self_attn.q_proj"`` (a trailing dot is accepted; ``""``
    gives bare ``"weight..."`` keys).

    Raises:
      NF4ArgumentError: if ``q``'s fields are inconsistent.
    """
    validate_nf4(q)
    w = _weight_key(prefix)
    meta: dict[str, Any] = {
        "quant_type": "nf4",
        "blocksize": int(q.blocksize),
        "dtype": q.dtype,
        "shape": [int(q.shape[0]), int(q.shape[1])],
    }
    out: dict[str, np.ndarray] = {
        w: np.asarray(q.packed, dtype=np.uint8).reshape(-1, 1),
        w + ".absmax": np.asarray(q.absmax),
        w + ".quant_map": np.asarray(q.code, dtype=np.float32),
    }
    if q.double_quant:
        out[w + ".nested_absmax"] = np.asarray(q.nested_absmax, dtype=np.float32)
        out[w + ".nested_quant_map"] = np.asarray(q.nested_code, dtype=np.float32)
        meta["nested_blocksize"] = int(q.nested_blocksize)
        meta["nested_dtype"] = "float32"
        meta["nested_offset"] = float(np.asarray(q.offset, dtype=np.float32))
    out[w + "." + _QS_KEY] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8).copy()
    return out


def _get(tensors: Mapping[str, Any], key: str, source: str) -> np.ndarray:
    if key not in tensors:
        raise MissingTensorError(source, "tensor missing from the 4-bit state dict", name=key)
    try:
        return np.asarray(tensors[key])
    except Exception as e:  # noqa: BLE001 - reported as a malformed tensor
        raise CheckpointError(source, f"cannot read tensor as an array: {e}", name=key) from e


def _read(tensors: Mapping[str, Any], key: str, source: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    a = _get(tensors, key, source)
    if a.dtype != np.dtype(dtype):
        raise TensorShapeError(source, f"dtype must be {np.dtype(dtype).name}, got {a.dtype.name}", name=key)
    if tuple(a.shape) != tuple(shape):
        raise TensorShapeError(source, f"shape must be {tuple(shape)}, got {tuple(a.shape)}", name=key)
    return a


def nf4_from_state_dict(prefix: str, tensors: Mapping[str, Any], *, source: str = "<state_dict>") -> NF4Weight:
    """Read a 4-bit NF4 weight written by transformers/bitsandbytes (or `nf4_to_state_dict`).

    Reads the keys listed in `nf4_to_state_dict` under ``prefix``; other keys
    of ``tensors`` are ignored. The packed weight may be stored as uint8
    [(N*K+1)//2, 1] (bnb default) or, with a non-uint8 ``quant_storage``, any
    dtype whose bytes are the packed codes (as bnb's ``A.view(torch.uint8)``).
    Values are numpy arrays or anything ``np.asarray`` accepts.

    Args:
      prefix: module path, e.g. ``"model.layers.0.mlp.down_proj"``.
      tensors: mapping key -> array.
      source: file name used in error messages.

    Returns:
      `NF4Weight` (arrays as jax arrays).

    Raises:
      MissingTensorError (a CheckpointError, ValueError): a required key is
        absent (``.name`` is the key).
      TensorShapeError: a tensor has the wrong dtype or shape.
      CheckpointError: the quant_state blob is not valid JSON, names another
        quant_type (e.g. fp4), has a bad blocksize/dtype/shape, has nested
        keys without nested tensors (or the reverse), or ``quant_map`` is not
        the NF4 code.

    Source: bnb ``QuantState.from_dict`` and ``utils.unpack_tensor_to_dict``.
    """
    w = _weight_key(prefix)
    qs_key = w + "." + _QS_KEY
    if qs_key not in tensors:
        other = [k for k in tensors if k.startswith(w + ".quant_state.")]
        if other:
            msg = f"quant_state {other[0]!r} is not NF4 (only bitsandbytes__nf4 is supported)"
            raise CheckpointError(source, msg, name=other[0])
        raise MissingTensorError(source, "tensor missing from the 4-bit state dict", name=qs_key)
    blob = _get(tensors, qs_key, source)
    try:
        meta = json.loads(blob.astype(np.uint8).tobytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(source, f"quant_state is not UTF-8 JSON: {e}", name=qs_key) from e
    if not isinstance(meta, dict):
        raise CheckpointError(source, "quant_state JSON is not an object", name=qs_key)
    for field in ("quant_type", "blocksize", "dtype", "shape"):
        if field not in meta:
            raise CheckpointError(source, f"quant_state lacks {field!r}", name=qs_key)
    if meta["quant_type"] != "nf4":
        raise CheckpointError(source, f"quant_type must be 'nf4', got {meta['quant_type']!r}", name=qs_key)
    try:
        shape, bs, dtype_name = _check_static(meta["shape"], meta["blocksize"], meta["dtype"])
    except NF4ArgumentError as e:
        raise CheckpointError(source, f"quant_state field {e.field!r}: {e}", name=qs_key) from e
    n = shape[0] * shape[1]
    nb = -(-n // bs)

    raw = _get(tensors, w, source)
    packed = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if packed.shape[0] != (n + 1) // 2:
        msg = f"packed weight must hold {(n + 1) // 2} bytes for shape {shape}, got {packed.shape[0]}"
        raise TensorShapeError(source, f"{msg} ({raw.dtype.name} {tuple(raw.shape)})", name=w)
    code = _read(tensors, w + ".quant_map", source, np.float32, (16,))
    if not np.array_equal(code, NF4_CODE):
        raise CheckpointError(source, "quant_map is not the NF4 code", name=w + ".quant_map")

    has_nested_tensors = (w + ".nested_absmax") in tensors or (w + ".nested_quant_map") in tensors
    has_nested_meta = "nested_offset" in meta or "nested_blocksize" in meta
    if has_nested_tensors != has_nested_meta:
        msg = "nested (double-quant) tensors and quant_state nested fields must come together"
        raise CheckpointError(source, msg, name=w + ".nested_absmax" if has_nested_meta else qs_key)
    if has_nested_meta:
        for field in ("nested_offset", "nested_blocksize"):
            if field not in meta:
                raise CheckpointError(source, f"quant_state lacks {field!r}", name=qs_key)
        if meta["nested_blocksize"] != NESTED_BLOCKSIZE:
            msg = f"nested_blocksize must be {NESTED_BLOCKSIZE}, got {meta['nested_blocksize']!r}"
            raise CheckpointError(source, msg, name=qs_key)
        if meta.get("nested_dtype", "float32") != "float32":
            raise CheckpointError(source, f"nested_dtype must be 'float32', got {meta['nested_dtype']!r}", name=qs_key)
        try:
            offset = np.float32(float(meta["nested_offset"]))
        except (TypeError, ValueError):
            msg = f"nested_offset is not a number: {meta['nested_offset']!r}"
            raise CheckpointError(source, msg, name=qs_key) from None
        if not math.isfinite(float(offset)):
            raise CheckpointError(source, f"nested_offset is not finite: {meta['nested_offset']!r}", name=qs_key)
        absmax = _read(tensors, w + ".absmax", source, np.uint8, (nb,))
        nested_absmax = _read(tensors, w + ".nested_absmax", source, np.float32, (-(-nb // NESTED_BLOCKSIZE),))
        nested_code = _read(tensors, w + ".nested_quant_map", source, np.float32, (256,))
        if not np.all(np.isfinite(nested_absmax)) or np.any(np.signbit(nested_absmax)):
            raise CheckpointError(source, "nested_absmax must be finite and >= +0", name=w + ".nested_absmax")
        return NF4Weight(
            packed=jnp.asarray(packed),
            absmax=jnp.asarray(absmax),
            nested_absmax=jnp.asarray(nested_absmax),
            nested_code=jnp.asarray(nested_code),
            offset=jnp.asarray(offset, dtype=jnp.float32),
            code=jnp.asarray(code),
            shape=shape,
            blocksize=bs,
            nested_blocksize=NESTED_BLOCKSIZE,
            dtype=dtype_name,
        )
    absmax = _read(tensors, w + ".absmax", source, np.float32, (nb,))
    if not np.all(np.isfinite(absmax)):
        raise CheckpointError(source, "absmax must be finite", name=w + ".absmax")
    return NF4Weight(
        packed=jnp.asarray(packed),
        absmax=jnp.asarray(absmax),
        nested_absmax=None,
        nested_code=None,
        offset=None,
        code=jnp.asarray(code),
        shape=shape,
        blocksize=bs,
        nested_blocksize=None,
        dtype=dtype_name,
    )
