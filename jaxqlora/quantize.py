"""Quantized linear layers: ONE interface for every weight format, and NF4 quantization.

`QuantizedLinear` is the layer the model, generation, LoRA and the kernels' dispatch see
for any frozen quantized weight: ``in_features``, ``out_features``, ``__call__(x,
layer=None)``, ``dequantize(dtype)``, like `jaxqlora.model.Linear`. Its weight is a pytree
of one format, and `FORMATS` maps each format name to what the layer needs (the weight
type, the matmul, the dequantization):

| format | weight | matmul (kernel file) |
|---|---|---|
| ``NF4`` | `jaxqlora.nf4.NF4Weight` | `nf4_linear` (`pallas_kernels.nf4_matmul`) |
| ``Q4_0`` ``Q4_1`` ``Q8_0`` ``Q4_K`` ``Q5_K`` ``Q6_K`` | `jaxqlora.ggml.GGUFWeight` | `gguf_linear` (`pallas_kernels.gguf_q4_0` ... through `pallas_kernels.gguf_matmul`) |

Dense weights stay `jaxqlora.model.Linear`. Adding a GGUF type means one file under
``pallas_kernels/`` (layout, in-kernel decode, wrapper, reference) and one entry in
`jaxqlora.ggml.GGUF_FORMATS`; another kind of format adds its weight type and an entry here.
`QuantizedEmbedding` keeps a GGUF token embedding quantized (a lookup dequantizes only the
rows it reads; as a tied LM head it multiplies through the same kernels).

Model-level NF4 quantization (QLoRA, Dettmers et al. 2023, arXiv:2305.14314):
`quantize_model` replaces every linear projection of the decoder (``q_proj`` ...
``down_proj``) by an `NF4Linear` (the `QuantizedLinear` of an NF4 weight, bitsandbytes
format); embeddings, norms and the LM head stay in their dtype. NF4 multiplies through
`pallas_kernels.nf4_matmul`: a Pallas kernel on GPU that dequantizes tiles on the fly (its
``custom_vjp`` backward gives the input gradient through the transposed kernel), the XLA
reference path elsewhere.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxqlora.ggml import GGUF_FORMATS, GGUFWeight, xla_matmul
from jaxqlora.lora import ALL_TARGETS, LoRALinear, projection_owner
from jaxqlora.model import Linear
from jaxqlora.stacked import layer_slice, stack_trees
from jaxqlora.nf4 import NF4Weight, dequantize_nf4, quantize_nf4, with_kernel_layout
from jaxqlora.sharding import per_device, sharding_active


class QuantParam(nnx.Variable):
    """A frozen quantized weight (a format's weight pytree); excluded from training."""


class NF4Param(QuantParam):
    """A frozen NF4-quantized weight (`NF4Weight` pytree); excluded from training."""


def nf4_linear(x: jax.Array, q: NF4Weight, layer=None) -> jax.Array:
    """``x @ W.T`` for an NF4 weight ``W [out, in]``; ``x [..., in]`` -> ``[..., out]`` in x.dtype.

    Weights whose ``in_features`` is a multiple of the blocksize (every real model) go
    through `pallas_kernels.nf4_matmul` (blocks never straddle rows); other shapes, where
    bitsandbytes' flat blocks cross row boundaries, dequantize with XLA and multiply.
    Under a device mesh the weight is gathered whole and the product runs on each
    device's rows (`jaxqlora.sharding.per_device`).

    ``layer`` (int or int32 scalar): ``q``'s arrays are stacked over layers (leading axis)
    and layer ``layer`` is multiplied; the NF4 GEMV reads it in place (one device).
    """
    if layer is not None and sharding_active():
        q, layer = layer_slice(q, layer), None
    if layer is not None:
        return _nf4_linear_local(x, q, layer)
    return per_device(_nf4_linear_local, x, q)


def nf4_linear_multi(x: jax.Array, qs, layer=None) -> tuple[tuple[jax.Array, ...], bool]:
    """``(x @ W_0.T, x @ W_1.T, ...)`` for NF4 weights of one ``in_features`` (a decoder
    layer's q/k/v, or gate/up) and whether ONE fused kernel computed them.

    On a Hopper GPU at decoding sizes the products run in one Mosaic GPU launch
    (`pallas_kernels.nf4_matmul.nf4_matmul_multi`, each weight read in place); elsewhere,
    and under a device mesh, or for weights whose ``in_features`` is not a multiple of
    their blocksize, this is one `nf4_linear` per weight.

    Args:
      x: ``[..., in]`` activations.
      qs: a sequence of `NF4Weight` ``[out_i, in]`` (stacked over layers with ``layer``).
      layer: as in `nf4_linear`.

    Returns:
      ``(ys, fused)``: ``ys`` a tuple of ``[..., out_i]`` in x.dtype, ``fused`` True when
      the one multi-weight kernel ran (a caller may then fuse its elementwise epilogue
      with the kernel's output reduction).
    """
    from pallas_kernels.nf4_matmul import nf4_matmul_multi

    qs = tuple(qs)
    if (sharding_active() or len({q.shape[1] for q in qs}) != 1
            or any(q.shape[1] % q.blocksize for q in qs)):
        return tuple(nf4_linear(x, q, layer) for q in qs), False
    return nf4_matmul_multi(x, [_nf4_operands(q, layer) for q in qs], layer=layer, return_fused=True)


def _nf4_operands(q: NF4Weight, layer=None) -> dict:
    """`pallas_kernels.nf4_matmul.nf4_matmul`'s weight arguments for ``q`` (``in_features``
    a multiple of the blocksize; stacked over layers when ``layer`` is given)."""
    n, k = q.shape
    lead = () if layer is None else q.packed.shape[:1]
    return dict(packed=q.packed.reshape(*lead, n, k // 2), absmax=q.absmax.reshape(*lead, n, k // q.blocksize),
                nested_absmax=q.nested_absmax, nested_code=q.nested_code, offset=q.offset, code=q.code,
                blocksize=q.blocksize, nested_blocksize=q.nested_blocksize or 256, kernel_scale=q.kernel_scale,
                kernel_codes=q.kernel_codes)


def _nf4_linear_local(x: jax.Array, q: NF4Weight, layer=None) -> jax.Array:
    from pallas_kernels.nf4_matmul import nf4_matmul

    n, k = q.shape
    if k % q.blocksize == 0:
        return nf4_matmul(x, **_nf4_operands(q, layer), layer=layer)
    if layer is not None:
        q = layer_slice(q, layer)
    w = jax.lax.stop_gradient(dequantize_nf4(q, x.dtype))
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32).astype(x.dtype)


def gguf_linear(x: jax.Array, w: GGUFWeight, layer=None) -> jax.Array:
    """``x @ W.T`` for a GGUF-format weight ``W [out, in]``; ``x [..., in]`` -> ``[..., out]``
    in x.dtype: on a GPU the Mosaic GPU GEMV (`pallas_kernels.gguf_mgpu.gguf_mgpu_matmul`)
    where ``w`` has its kernel layout (`use_kernel_codes`) and `gguf_mgpu_supported` says
    yes (Hopper, bfloat16, at most 16 tokens), else the Pallas kernel
    (`pallas_kernels.gguf_matmul.gguf_matmul`, which reads the blocks in place);
    `jaxqlora.ggml.xla_matmul` elsewhere (blocks decoded piece by piece into the dots).

    ``layer`` (int or int32 scalar): ``w`` is stacked over layers and layer ``layer`` is
    multiplied, read in place by the kernel. Under a device mesh the product runs on each
    device's rows (`jaxqlora.sharding.per_device`).
    """
    from pallas_kernels.dispatch import resolve_impl
    from pallas_kernels.gguf_matmul import gguf_matmul
    from pallas_kernels.gguf_mgpu import gguf_mgpu_matmul, gguf_mgpu_supported

    if layer is not None and sharding_active():
        w, layer = layer_slice(w, layer), None

    def local(x, w):
        if resolve_impl() == "pallas":
            if w.kernel_layout is not None and not sharding_active() and gguf_mgpu_supported(
                    math.prod(x.shape[:-1]), *w.shape, w.formats, x.dtype):
                return gguf_mgpu_matmul(x, None, w.kind, fmts=w.formats, layer=layer, kernel_layout=w.kernel_layout)
            return gguf_matmul(x, w.planes, w.kind, fmts=w.modules, layer=layer)
        return xla_matmul(x, w, layer)

    return local(x, w) if layer is not None else per_device(local, x, w)


def _nf4_dequantize(q: NF4Weight, dtype: Any = None) -> jax.Array:
    if q.packed.ndim == 2:
        return jnp.stack([dequantize_nf4(layer_slice(q, i), dtype) for i in range(q.packed.shape[0])])
    return dequantize_nf4(q, dtype)


def _gguf_dequantize(w: GGUFWeight, dtype: Any = None) -> jax.Array:
    return w.dequantize(jnp.float32 if dtype is None else dtype)


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    """One entry of `FORMATS`: what a `QuantizedLinear` of this format calls.

    Attributes:
      name: the format's name.
      weight_type: its weight pytree class.
      linear: ``linear(x [..., in], weight, layer=None) -> [..., out]`` in x.dtype.
      dequantize: ``dequantize(weight, dtype=None) -> [(L,) out, in]``.
      stacked: ``stacked(weight) -> bool``: the weight carries a leading layer axis.
    """

    name: str
    weight_type: type
    linear: Callable
    dequantize: Callable
    stacked: Callable


#: The format table: format name -> `QuantFormat`.
FORMATS: dict[str, QuantFormat] = {
    "NF4": QuantFormat("NF4", NF4Weight, nf4_linear, _nf4_dequantize, lambda q: q.packed.ndim == 2),
    **{name: QuantFormat(name, GGUFWeight, gguf_linear, _gguf_dequantize, lambda w: w.stacked)
       for name in GGUF_FORMATS},
}


def format_of(weight) -> QuantFormat:
    """The `FORMATS` entry of a weight pytree (a mixed GGUF stack: its first format, whose
    entry serves them all).

    Raises:
      TypeError: not a weight of any format in `FORMATS`.
    """
    if isinstance(weight, NF4Weight):
        return FORMATS["NF4"]
    if isinstance(weight, GGUFWeight):
        return FORMATS[weight.formats[0]]
    raise TypeError(f"no quantized format for {type(weight).__name__}")


class QuantizedLinear(nnx.Module):
    """A linear layer with a frozen quantized weight of any format in `FORMATS`: the same
    interface as `jaxqlora.model.Linear`.

    Args:
      weight: the quantized ``[out_features, in_features]`` weight (`NF4Weight`,
        `GGUFWeight`); in the stacked decoder layers every array of it carries a leading
        layer axis (``weight.shape`` stays the per-layer shape), and each layer's call sees
        its slice.
      bias: optional ``[out_features]`` bias (``[layers, out_features]`` when stacked;
        kept in its dtype, frozen).
    """

    def __init__(self, weight: Any, bias: jax.Array | None = None):
        format_of(weight)
        if isinstance(weight, NF4Weight):  # the Hopper kernels' scale layout, where they run
            weight = with_kernel_layout(weight)
        self.out_features, self.in_features = weight.shape
        self.weight = self._param(weight)
        self.bias = nnx.Param(bias) if bias is not None else None

    _param = QuantParam

    @property
    def format(self) -> QuantFormat:
        """The weight's `FORMATS` entry."""
        return format_of(self.weight.get_value())

    @property
    def stacked(self) -> bool:
        """True when the weight carries a leading layer axis (see the class docstring)."""
        return self.format.stacked(self.weight.get_value())

    @property
    def num_layers(self) -> int:
        """Layers of a stacked weight (0 for one weight)."""
        if not self.stacked:
            return 0
        return int(jax.tree_util.tree_leaves(self.weight.get_value())[0].shape[0])

    def __call__(self, x: jax.Array, layer=None) -> jax.Array:
        """``x [..., in]`` -> ``[..., out]`` in x's dtype; ``layer`` as in `jaxqlora.model.Linear`."""
        return self.add_bias(self.format.linear(x, self.weight.get_value(), layer), x, layer)

    def add_bias(self, y: jax.Array, x: jax.Array, layer=None) -> jax.Array:
        """``y + bias`` (float32 add, rounded to x's dtype), or ``y`` without a bias: what
        `__call__` adds to the product ``y`` of ``x``; ``layer`` as there."""
        if self.bias is None:
            return y
        bias = self.bias[...] if layer is None else self.bias[layer]
        return (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)

    @property
    def fusable(self) -> bool:
        """Whether `project_many` can compute this projection together with others of the
        same input in one kernel (an NF4 weight); `jaxqlora.model.project_together` asks."""
        return isinstance(self.weight.get_value(), NF4Weight)

    @staticmethod
    def project_many(x: jax.Array, modules, layer=None) -> tuple[tuple[jax.Array, ...], bool]:
        """The base products (no bias) of several `fusable` projections of one input ``x
        [..., in]``: `nf4_linear_multi` (one Mosaic GPU kernel when decoding on a Hopper GPU).
        Returns ``(products, fused)``."""
        return nf4_linear_multi(x, [m.weight.get_value() for m in modules], layer)

    def project(self, hidden: jax.Array) -> jax.Array:
        """float32 logits ``hidden [..., in] @ W.T`` (as an LM head: float32 activations)."""
        return self(hidden.astype(jnp.float32)).astype(jnp.float32)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The dequantized weight ``[out, in]`` (``[layers, out, in]`` when stacked; the
        format's natural dtype by default: NF4's original dtype, float32 for GGUF)."""
        return self.format.dequantize(self.weight.get_value(), dtype)


class NF4Linear(QuantizedLinear):
    """The `QuantizedLinear` of an NF4 weight (bitsandbytes layout), with `from_linear`."""

    _param = NF4Param

    @classmethod
    def from_linear(cls, linear: Linear, *, blocksize: int = 64, double_quant: bool = True) -> "NF4Linear":
        """Quantize a `Linear`'s weight (bitsandbytes-exact, see `jaxqlora.nf4.quantize_nf4`),
        layer by layer when it is stacked (``weight [layers, out, in]``)."""
        w = linear.weight[...]
        if w.ndim == 3:
            q = stack_trees([quantize_nf4(w[i], blocksize=blocksize, double_quant=double_quant)
                             for i in range(w.shape[0])])
        else:
            q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
        return cls(q, None if linear.bias is None else linear.bias[...])


class QuantizedEmbedding(nnx.Module):
    """A token embedding ``[vocab, hidden]`` kept in a GGUF format (HF ``embed_tokens``).

    A lookup gathers the blocks of the looked-up rows and dequantizes only those; as a tied
    LM head (`project`) it multiplies through `gguf_linear`.

    Args:
      weight: a one-layer `GGUFWeight` ``[vocab, hidden]``.
      dtype: the dtype of the looked-up rows (the model's parameter dtype).
    """

    def __init__(self, weight: GGUFWeight, dtype: Any = jnp.bfloat16):
        self.num_embeddings, self.features = weight.shape
        self.weight = QuantParam(weight)
        self.dtype = jnp.dtype(dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """Rows ``ids [...]`` -> ``[..., hidden]`` in ``dtype``."""
        return self.weight.get_value().rows(ids, self.dtype)

    def project(self, hidden: jax.Array) -> jax.Array:
        """float32 logits ``hidden [..., hidden] @ weight.T`` (the tied LM head)."""
        return gguf_linear(hidden.astype(jnp.float32), self.weight.get_value()).astype(jnp.float32)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The whole table ``[vocab, hidden]`` (float32 by default)."""
        return self.weight.get_value().dequantize(jnp.float32 if dtype is None else dtype)


def place_quantized(model: nnx.Module, weights: dict, source: str, dtype: Any = jnp.bfloat16) -> None:
    """Put weights that arrive quantized into ``model`` (a `jaxqlora.model.CausalLM`, maybe
    abstract), in place: per-layer projections (``model.layers.3.mlp.up_proj``) are stacked
    (`jaxqlora.ggml.stack_weights`) into one `QuantizedLinear` per projection, ``lm_head``
    becomes a `QuantizedLinear`, ``model.embed_tokens`` a `QuantizedEmbedding`. A layer's
    bias still comes from the checkpoint's tensors.

    Raises:
      UnexpectedTensorError: a name with no place in the model.
      MissingTensorError: some layers of a projection arrive quantized and others do not.
      TensorShapeError: a weight whose shape disagrees with the config.
    """
    from jaxqlora.errors import MissingTensorError, TensorShapeError, UnexpectedTensorError
    from jaxqlora.ggml import stack_weights, to_device
    from jaxqlora.stacked import layer_key, split_layer_key

    layers = model.config.num_hidden_layers
    groups: dict[str, list] = {}
    for prefix, w in weights.items():
        stacked, layer = split_layer_key(prefix)
        if layer is None:
            groups[prefix] = w
        elif layer < layers:
            groups.setdefault(stacked, [None] * layers)[layer] = w
        else:
            raise UnexpectedTensorError(source, "quantized weight has no place in the model", f"{prefix}.weight")
    for name, parts in groups.items():
        *owner_path, attr = name.split(".")
        owner = model
        try:
            for p in owner_path:
                owner = getattr(owner, p)
            old = getattr(owner, attr)
        except AttributeError:
            raise UnexpectedTensorError(source, "quantized weight has no place in the model", f"{name}.weight") from None
        if name == "model.embed_tokens":
            want = tuple(old.weight.get_value().shape)
        elif isinstance(old, Linear):
            want = (old.out_features, old.in_features)
        else:
            raise UnexpectedTensorError(source, "quantized weight has no place in the model", f"{name}.weight")
        if isinstance(parts, list):
            for i, w in enumerate(parts):
                if w is None:
                    raise MissingTensorError(source, "weight of this layer is not quantized (the other layers of "
                                             "this projection are)", f"{layer_key(name, i)}.weight")
            checked = [(f"{layer_key(name, i)}.weight", w) for i, w in enumerate(parts)]
        else:
            checked = [(f"{name}.weight", parts)]
        for key, w in checked:
            if tuple(w.shape) != want:
                raise TensorShapeError(source, f"quantized weight of shape {tuple(w.shape)}, the config implies {want}",
                                       key)
        if name == "model.embed_tokens":
            setattr(owner, attr, QuantizedEmbedding(to_device(parts), dtype))
            continue
        new = QuantizedLinear(stack_weights(parts) if isinstance(parts, list) else to_device(parts))
        if old.bias is not None:  # the bias still comes from the tensors
            new.bias = old.bias
        setattr(owner, attr, new)


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def quantize_model(model: nnx.Module, *, blocksize: int = 64, double_quant: bool = True,
                   targets: Iterable[str] = ALL_TARGETS) -> dict[str, float]:
    """Replace the ``targets`` projections of every decoder layer by `NF4Linear`, in place.

    Works before or after `jaxqlora.lora.apply_lora` (a LoRA layer's ``base_layer`` is
    quantized). Embeddings, norms and ``lm_head`` are untouched.

    Args:
      model: a `jaxqlora.model.CausalLM`.
      blocksize: NF4 block size (bitsandbytes default 64).
      double_quant: quantize the absmax too (bitsandbytes ``compress_statistics``; ~4.127
        instead of 4.5 bits per parameter).
      targets: projection names (default all seven).

    Returns:
      A report: ``linear_mb_before``, ``linear_mb_after``, ``model_mb_before``,
      ``model_mb_after`` (MB = 1e6 bytes) and ``bits_per_param`` of the quantized layers.
    """
    before_model = _nbytes(nnx.state(model))
    lin_before = lin_after = params = 0
    for name in targets:
        owner = projection_owner(model.model.layers, name)
        mod = getattr(owner, name)
        holder, attr = (mod, "base_layer") if isinstance(mod, LoRALinear) else (owner, name)
        base = getattr(holder, attr)
        if isinstance(base, QuantizedLinear):  # NF4 already, or kept in a GGUF format
            continue
        if not isinstance(base, Linear):
            raise TypeError(f"cannot quantize {type(base).__name__} at {name}")
        q = NF4Linear.from_linear(base, blocksize=blocksize, double_quant=double_quant)
        lin_before += _nbytes(nnx.state(base))
        lin_after += _nbytes(nnx.state(q))
        params += base.in_features * base.out_features * model.num_layers
        setattr(holder, attr, q)
    after_model = _nbytes(nnx.state(model))
    return {"linear_mb_before": lin_before / 1e6, "linear_mb_after": lin_after / 1e6,
            "model_mb_before": before_model / 1e6, "model_mb_after": after_model / 1e6,
            "bits_per_param": 8 * lin_after / max(params, 1)}


def use_kernel_codes(model: nnx.Module) -> int:
    """Give every NF4 projection of ``model`` the forward kernel's layout of its codes
    (`jaxqlora.nf4.with_kernel_layout` with ``codes=True``), and every GGUF projection the
    Mosaic GPU GEMV's layout of its blocks (`gguf_with_kernel_layout`), in place; returns the
    bytes added on the device.

    For decoding on a Hopper GPU: the Mosaic GPU GEMV over `NF4Weight.kernel_codes` issues
    about 16% fewer instructions per weight than over the bnb bytes (H200, issue 13),
    at the price of a second copy of the codes (``N * K / 2`` bytes per weight: about
    3.5 GB for Llama-3-8B). The bnb ``packed`` bytes stay, unchanged: training, larger M,
    saving and every CPU path read them. A no-op (returns 0) where the kernels do not run
    (CPU, not Hopper, shapes they do not take) or the codes are there already.

    Args:
      model: a `jaxqlora.model.CausalLM` (or any module holding `QuantizedLinear` layers).

    Returns:
      int: device bytes added, ``N * K / 2`` per projection that got the layout (summed over
      stacked layers).

    Source: the layout is `pallas_kernels.nf4_mgpu.nf4_kernel_codes` (issue 13), an exact
    repacking of bitsandbytes' packed NF4 bytes.
    """
    added = 0
    for _, node in list(nnx.iter_graph(model)):
        if not isinstance(node, QuantizedLinear):
            continue
        q = node.weight.get_value()
        if isinstance(q, NF4Weight):
            new = with_kernel_layout(q, codes=True)
        elif isinstance(q, GGUFWeight):
            new = gguf_with_kernel_layout(q)
        else:
            continue
        if new is not q:
            added += new.nbytes - q.nbytes
            node.weight.set_value(new)
    return added


def gguf_with_kernel_layout(w: GGUFWeight, force: bool = False) -> GGUFWeight:
    """``w`` with the Mosaic GPU GEMV's layout of its blocks
    (`pallas_kernels.gguf_mgpu.gguf_kernel_layout`, built once on the device) beside the
    planes, which stay unchanged. Returns ``w`` itself when it has the layout already, or
    (unless ``force``: tests that trace for a faked Hopper) when the kernel does not run here
    (`pallas_kernels.gguf_mgpu.gguf_mgpu_supported` for one token: not a Hopper GPU, or
    formats without a Mosaic kernel, e.g. Q5_K)."""
    from pallas_kernels.gguf_mgpu import gguf_kernel_layout, gguf_mgpu_supported

    if w.kernel_layout is not None or not (force or gguf_mgpu_supported(1, *w.shape, w.formats, jnp.bfloat16)):
        return w
    try:
        layout = jax.jit(gguf_kernel_layout, static_argnums=1)(w.planes, tuple(w.formats), w.kind)
    except ValueError:  # formats without a Mosaic GPU kernel (Q5_K, other mixes)
        return w
    return w.replace(kernel_layout=layout)
