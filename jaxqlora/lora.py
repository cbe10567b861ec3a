"""LoRA (Hu et al. 2021, arXiv:2106.09685) on any of the seven projections.

`LoRALinear` wraps a base linear (bf16 `jaxqlora.model.Linear`, or any
`jaxqlora.quantize.QuantizedLinear`: NF4, or a GGUF format kept from a ``.gguf`` file) as PEFT does: the base is kept as ``base_layer`` and
the adapter adds ``lora_B(lora_A(dropout(x))) * scaling``. The rank-r intermediate is
named ``"lora_a"`` for rematerialisation policies (`jaxqlora.model.remat_policy`). The factors keep PEFT's
layout, ``lora_A [r, in_features]`` and ``lora_B [out_features, r]`` (Flax's `nnx.LoRA`
keeps them transposed), in float32 as `nnx.LoRAParam`, so that adapter files are a
rename away from the parameters and a silent transpose cannot happen. On the stacked
decoder (`jaxqlora.model`) one `LoRALinear` per projection wraps all layers: its factors
carry the leading layer axis (``lora_A [layers, r, in_features]``) and the adapter files
keep PEFT's per-layer keys.

Several adapters in one batch (serving; Punica's BGMV and S-LoRA): built with
``adapters=A``, the factors carry an adapter axis after the layer axis (``lora_A [layers, A,
r, in_features]``, ``lora_B [layers, A, out_features, r]``) and ``adapter_scaling [layers, A]``
holds each adapter's scale; a call with ``adapter`` (int32 ``[B]``) gathers each row's factors.
Adapters of smaller rank are zero-padded to ``r`` (exact: the padded rank contributes
zeros), and an adapter without this target has zero factors (`jaxqlora.io.peft.load_adapters`).

Source: PEFT ``tuners/lora/layer.py`` (``Linear.update_layer``, ``reset_lora_parameters``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ATTENTION_TARGETS + MLP_TARGETS


class LoRALinear(nnx.Module):
    """``y = base_layer(x) + (dropout(x) @ lora_A.T @ lora_B.T) * scaling``.

    Args:
      base_layer: any linear with ``in_features``, ``out_features`` and ``__call__``.
      r: rank (> 0).
      alpha: ``lora_alpha``; scaling is ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA.
      dropout: dropout rate on the adapter's input (PEFT ``lora_dropout``).
      use_rslora: rank-stabilised scaling (Kalajdzievski 2023, arXiv:2312.03732).
      rngs: ``params`` for lora_A's init, ``dropout`` for the dropout mask.
      stack: leading axes of the factors: ``(num_layers,)`` when ``base_layer`` is a
        stacked layer of the decoder (one layer's slice is used per call), ``()`` for a
        single linear.
      adapters: 0 for one adapter; ``A > 0`` for A adapters picked per row (module
        docstring), zero-initialised, with scales ``adapter_scaling`` (all ``scaling``).

    ``lora_A`` is initialised as PEFT does (Kaiming-uniform with a=sqrt(5): uniform in
    ``±1/sqrt(in_features)``); ``lora_B`` is zero, so a fresh adapter changes nothing.
    """

    def __init__(self, base_layer: nnx.Module, *, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, rngs: nnx.Rngs, stack: tuple[int, ...] = (), adapters: int = 0):
        if r <= 0:
            raise ValueError(f"LoRA rank r must be > 0, got {r}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.use_rslora = r, float(alpha), use_rslora
        self.scaling = self.alpha / (math.sqrt(r) if use_rslora else r)
        bound = 1.0 / math.sqrt(self.in_features)
        self.adapters = int(adapters)
        if self.adapters:
            self.adapter_scaling = AdapterScaling(jnp.full(tuple(stack) + (self.adapters,), self.scaling, jnp.float32))
            stack = tuple(stack) + (self.adapters,)
            self.lora_A = nnx.LoRAParam(jnp.zeros(stack + (r, self.in_features), jnp.float32))
        else:
            stack = tuple(stack)
            self.lora_A = nnx.LoRAParam(jax.random.uniform(rngs.params(), stack + (r, self.in_features), jnp.float32,
                                                           -bound, bound))
        self.lora_B = nnx.LoRAParam(jnp.zeros(stack + (self.out_features, r), jnp.float32))
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

    def __call__(self, x: jax.Array, layer=None, adapter=None, keep: "KeepView | None" = None) -> jax.Array:
        """``x [..., in]`` -> ``[..., out]`` in x's dtype; ``layer`` selects one layer of
        stacked factors and base (see `jaxqlora.model.Linear`), ``adapter`` (int32
        ``[B]``, x's leading axis) each row's adapter when there are several (None: 0);
        ``keep`` this call's dropout mask drawn for the whole layer (`layer_keep_masks`;
        None: the module draws its own)."""
        return self.add_update(x, self.base_layer(x, layer), layer, adapter, keep)

    def add_update(self, x: jax.Array, y: jax.Array, layer=None, adapter=None,
                   keep: "KeepView | None" = None) -> jax.Array:
        """``y + scaling * (dropout(x) @ lora_A.T) @ lora_B.T`` in float32, rounded to x's
        dtype: the adapter added to the base product ``y [..., out]`` of ``x [..., in]`` (what
        ``__call__`` returns; `jaxqlora.model.project_together` computes several base
        products in one kernel and adds each adapter here). The rank-r intermediate is
        tagged ``"lora_a"``; the dropout draws from this module's RNG stream, unless
        ``keep`` brings the mask the layer drew for all its projections at once."""
        a, b = (self._factor(v, layer) for v in (self.lora_A, self.lora_B))
        if self.adapters:  # each row's factors and scale, gathered (Punica's BGMV in jnp)
            h = x if self.dropout is None else self.dropout(x)
            ids = jnp.zeros((x.shape[0],), jnp.int32) if adapter is None else adapter
            a, b = jnp.take(a, ids, axis=0), jnp.take(b, ids, axis=0)  # [B, r, in], [B, out, r]
            scaling = self.adapter_scaling[...] if layer is None else self.adapter_scaling[layer]
            scale = jnp.take(scaling, ids).reshape((-1,) + (1,) * (x.ndim - 1))
            h = checkpoint_name(jnp.einsum("b...i,bri->b...r", h.astype(jnp.float32), a), "lora_a")
            return (y.astype(jnp.float32) + scale * jnp.einsum("b...r,bor->b...o", h, b)).astype(x.dtype)
        if keep is None:
            keep, scale = self._dropout_keep(x)
        else:
            scale = 1.0 / (1.0 - self.dropout.rate)
        h = checkpoint_name(lora_a_product(x, keep, a, scale), "lora_a")
        return (y.astype(jnp.float32) + lora_b_product(h, b, self.scaling)).astype(x.dtype)

    def dropout_active(self) -> bool:
        """Whether a call drops: a dropout rate in (0, 1), training mode, one adapter."""
        d = self.dropout
        return d is not None and not d.deterministic and 0.0 < d.rate < 1.0 and not self.adapters

    def _dropout_keep(self, x: jax.Array) -> tuple[jax.Array | None, float]:
        """This call's dropout: ``(keep, scale)``, ``keep`` bool of x's shape drawn by
        `keep_mask` with the next key of the module's ``nnx.Dropout`` stream and ``scale = 1 /
        (1 - rate)``; ``(None, 1.0)`` when no dropout applies (none configured, or evaluation)."""
        d = self.dropout
        if d is None or d.deterministic or d.rate == 0.0:
            return None, 1.0
        return keep_mask(_dropout_key(d), x.shape, d.rate), (0.0 if d.rate >= 1.0 else 1.0 / (1.0 - d.rate))

    def _factor(self, v: nnx.Variable, layer) -> jax.Array:
        """One layer's ``lora_A`` / ``lora_B``: ``v[layer]`` of a stacked factor, or ``v``
        itself when ``layer`` is None or the factor is already one layer's slice, or a
        `PackedFactor` (the layer scan of `jaxqlora.model.CausalLM` hands each step one
        packed row of its layer's factors, while the frozen base is read in place by
        ``layer`` or sliced)."""
        value = v.get_value()
        if isinstance(value, PackedFactor):  # a view of the layer's packed row (the layer scan);
            return value.value() if self.adapters else value  # the products take the view itself
        stacked = value.ndim > 2 + (1 if self.adapters else 0)
        return v[layer] if layer is not None and stacked else v[...]

    def delta_weight(self) -> jax.Array:
        """The adapter's weight update ``scaling * lora_B @ lora_A``, float32 ``[out, in]``
        (``[layers, out, in]`` when stacked)."""
        return self.scaling * (self.lora_B[...] @ self.lora_A[...])


@functools.partial(jax.tree_util.register_dataclass, data_fields=["row"], meta_fields=["offset", "shape"])
@dataclasses.dataclass(frozen=True)
class PackedFactor:
    """One layer's LoRA factor as a view of that layer's packed row of factors.

    The layer scan of `jaxqlora.model.CausalLM` (`pack_factors`) packs every LoRA factor of
    the stacked layers into one float32 ``[layers, P]`` array, so that each scan step slices
    one row instead of one array per factor (fourteen with LoRA on all seven projections),
    and the backward writes one row of factor gradients per layer. `lora_a_product` and
    `lora_b_product` take the view itself and slice the factor inside their forward and
    backward: their saved residual is then the row the scan hands in (no per-layer copy of
    each factor for the backward), and the factor's gradient comes back as a row with the
    factor's values at its place and zeros elsewhere (XLA adds a layer's fourteen into one
    row).

    Attributes:
      row: float32 ``[P]``, one layer's packed factors (the leaf; traced).
      offset: where this factor starts in ``row`` (static).
      shape: the factor's shape, ``[r, in_features]`` or ``[out_features, r]`` (static).
    """

    row: jax.Array
    offset: int
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        """The factor's number of dimensions (2)."""
        return len(self.shape)

    @property
    def size(self) -> int:
        """The factor's number of values in ``row``."""
        return math.prod(self.shape)

    def value(self) -> jax.Array:
        """The factor, float32 ``shape``."""
        return jax.lax.slice_in_dim(self.row, self.offset, self.offset + self.size).reshape(self.shape)

    def cotangent(self, d: jax.Array) -> "PackedFactor":
        """The row-shaped cotangent of this view for the factor's cotangent ``d`` (``shape``):
        ``d`` at the factor's place, zeros elsewhere."""
        flat = d.reshape(-1).astype(self.row.dtype)
        return PackedFactor(jax.lax.pad(flat, jnp.zeros((), flat.dtype),
                                        ((self.offset, self.row.shape[-1] - self.offset - self.size, 0),)),
                            self.offset, self.shape)


def pack_factors(factors: list[jax.Array]) -> tuple[jax.Array, list[tuple[int, tuple[int, ...]]]]:
    """Stacked LoRA factors (float32 ``[layers, ...]`` each) -> ``(rows, places)``: one
    float32 ``[layers, P]`` array, each layer's factors flattened and concatenated (P the
    sum of their sizes), and each factor's ``(offset, shape)`` in a row, for `PackedFactor`.

    Raises:
      ValueError: no factors, or factors of different layer counts or dtypes.
    """
    if not factors:
        raise ValueError("no LoRA factors to pack")
    layers, dtype = factors[0].shape[0], factors[0].dtype
    if any(f.shape[0] != layers or f.dtype != dtype for f in factors):
        raise ValueError("LoRA factors to pack must share the layer count and dtype: "
                         f"{[(tuple(f.shape), str(f.dtype)) for f in factors]}")
    places, offset = [], 0
    for f in factors:
        places.append((offset, tuple(f.shape[1:])))
        offset += math.prod(f.shape[1:])
    return jnp.concatenate([f.reshape(layers, -1) for f in factors], axis=1), places


@functools.partial(jax.tree_util.register_dataclass, data_fields=["keep"], meta_fields=["offset", "width"])
@dataclasses.dataclass(frozen=True)
class KeepView:
    """One projection's dropout keep mask as a view of the mask its decoder layer drew for
    all its LoRA projections at once (`layer_keep_masks`).

    A layer with dropout on seven projections would otherwise draw seven masks (seven RNG
    kernels) and the layer scan would save seven bool residuals per layer; with the views
    it draws one ``[..., W]`` mask (W the sum of the projections' ``in_features``) and
    saves it once: `lora_a_product` takes the view and slices its columns inside its
    forward and backward.

    Attributes:
      keep: bool ``[..., W]``, the layer's mask (the leaf; traced).
      offset: this projection's first column in ``keep`` (static).
      width: its ``in_features`` (static).
    """

    keep: jax.Array
    offset: int
    width: int

    def value(self) -> jax.Array:
        """The projection's mask, bool ``[..., width]``."""
        return jax.lax.slice_in_dim(self.keep, self.offset, self.offset + self.width, axis=self.keep.ndim - 1)


def keep_mask(key: jax.Array, shape: tuple[int, ...], rate) -> jax.Array:
    """A dropout keep mask: bool ``shape``, each element kept with probability ``1 - rate``
    independently, from 16 random bits per element.

    ``rate``: a Python float, or a NumPy array ``[shape[-1]]`` of per-column rates (one
    mask for several projections, `layer_keep_masks`). The mask compares 16-bit uniform
    integers u with ``T = round(rate * 2**16)`` (kept when ``u >= T``), so the rate used is
    ``T / 2**16``, within 2**-17 of ``rate`` (0.05 -> 0.0500031); torch's ``dropout`` compares
    a 24-bit float uniform. The bits are two 16-bit halves of ``ceil(shape[-1] / 2)`` 32-bit
    words per row (threefry, ``jax.random.bits``): on the 2-core CPU the seven masks of a
    SmolLM2 layer at 16 x 64 tokens take 6-8 ms this way against 27-30 ms for
    ``jax.random.bernoulli`` (one 32-bit word and a float conversion per element).
    """
    n = shape[-1]
    words = jax.random.bits(key, tuple(shape[:-1]) + ((n + 1) // 2,), jnp.uint32)
    u = jnp.concatenate([words & 0xFFFF, words >> 16], axis=-1)[..., :n]
    threshold = np.minimum(np.round(np.asarray(rate, np.float64) * 65536.0), 65536).astype(np.uint32)
    return u >= (threshold if threshold.ndim else int(threshold))


def _dropout_key(d: nnx.Dropout) -> jax.Array:
    """The next key of ``d``'s RNG stream, as ``nnx.Dropout.__call__`` draws it."""
    return d.rngs[d.rng_collection]() if isinstance(d.rngs, nnx.Rngs) else d.rngs()


#: Whether `layer_keep_masks` draws one mask per decoder layer: True, False, or None for
#: `default_layer_masks` (tests set it to check the shared mask on the CPU).
LAYER_MASKS: bool | None = None


def default_layer_masks() -> bool:
    """`LAYER_MASKS` when it is None: True on a GPU backend, False elsewhere.

    On the GPU the point is kernel count: one RNG kernel and one saved residual per layer
    instead of seven of each (SmolLM2's 16 x 64 step runs ~220 kernels per layer at ~2 us
    each). On the 2-core AVX2 CPU one draw of the layer's ``[16, 64, 4992]`` mask takes
    27-43 ms against 6.7-7.2 ms for the seven projections' own `keep_mask` draws (with
    ``jax.random.bernoulli``: 53 against 27-30 ms; the one large draw runs on one core), and
    with it the SmolLM2 float32 classification step 16 x 64 went from 4.30-4.94 s to
    5.04-5.35 s (four alternating processes each, 2026-12-08): the CPU keeps the
    per-projection draws."""
    return jax.default_backend() == "gpu"


def layer_keep_masks(layer: nnx.Module, lead: tuple[int, ...]) -> dict[str, KeepView]:
    """One dropout draw for all LoRA projections of a decoder ``layer`` (its ``self_attn``
    and ``mlp``) whose dropout is active: ``{name: KeepView}`` over one bool mask
    ``[*lead, W]``, W the sum of their ``in_features`` (``lead`` the activations' leading
    shape, ``[B, T]``), each column kept with probability ``1 - rate`` of its projection
    (`keep_mask`), independently (inverted dropout as torch's and PEFT's; the kept values are scaled by
    ``1 / (1 - rate)`` where the mask is applied). The key is the next one of the first such
    projection's stream (q_proj ... down_proj order). ``{}`` when fewer than two
    projections drop (nothing to share: each draws its own), or when the layer draws are
    off (`LAYER_MASKS`, `default_layer_masks`: off on a CPU)."""
    if not (default_layer_masks() if LAYER_MASKS is None else LAYER_MASKS):
        return {}
    active = [(name, m) for name in ALL_TARGETS
              if isinstance(m := getattr(projection_owner(layer, name), name, None), LoRALinear)
              and m.dropout_active()]
    if len(active) < 2:
        return {}
    widths = [m.in_features for _, m in active]
    rates = np.repeat([m.dropout.rate for _, m in active], widths)
    keep = keep_mask(_dropout_key(active[0][1].dropout), tuple(lead) + (sum(widths),),
                     rates[0] if (rates == rates[0]).all() else rates)
    offsets = np.cumsum([0] + widths[:-1])
    return {name: KeepView(keep, int(o), w) for (name, _), o, w in zip(active, offsets, widths)}


def _unpacked(f):
    return f.value() if isinstance(f, PackedFactor) else f


def _factor_cotangent(f, d):
    return f.cotangent(d) if isinstance(f, PackedFactor) else d


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lora_a_product(x: jax.Array, keep: jax.Array | None, a: jax.Array, scale: float) -> jax.Array:
    """``dropout(x) @ a.T``: LoRA's first factor, float32 ``[..., r]`` from ``x [..., in]``
    (any float dtype, cast to float32 first, as PEFT casts the input to ``lora_A``'s dtype),
    the dropout keep mask ``keep`` (bool ``[..., in]``, a `KeepView` of the layer's mask, or
    None for no dropout; kept values
    are multiplied by ``scale``, torch's inverted dropout) and ``a`` (``lora_A``, float32
    ``[r, in]``).

    The backward keeps ``x`` itself (in its own dtype, one copy shared by the projections
    that read the same input, q/k/v and gate/up) and the bool mask, and recomputes the
    float32 dropped input for ``lora_A``'s gradient, instead of saving a float32 copy of
    the dropped input per projection (JAX's rule): a quarter to a half of the residual
    bytes of a layer, and fewer stacked residuals for the layer scan to write and read.
    ``scale`` is a Python float; ``a`` may be a `PackedFactor` (its gradient is then one too).
    """
    h = _dropped(x, keep, scale)
    return jax.lax.dot_general(h, _unpacked(a), (((h.ndim - 1,), (1,)), ((), ())))


def _dropped(x, keep, scale):
    x = x.astype(jnp.float32)
    return x if keep is None else jnp.where(_keep_value(keep), x * scale, 0.0)


def _keep_value(keep):
    return keep.value() if isinstance(keep, KeepView) else keep


def _lora_a_fwd(x, keep, a, scale):
    return lora_a_product(x, keep, a, scale), (x, keep, a)


def _lora_a_bwd(scale, res, g):
    x, keep, packed = res
    a = _unpacked(packed)
    lead = tuple(range(g.ndim - 1))
    da = jax.lax.dot_general(g, _dropped(x, keep, scale), ((lead, lead), ((), ())))  # [r, in]
    dh = jax.lax.dot_general(g, a, (((g.ndim - 1,), (0,)), ((), ())))  # [..., in]
    dx = dh if keep is None else jnp.where(_keep_value(keep), dh * scale, 0.0)
    return dx.astype(x.dtype), None, _factor_cotangent(packed, da)


lora_a_product.defvjp(_lora_a_fwd, _lora_a_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def lora_b_product(h: jax.Array, b: jax.Array, scaling: float) -> jax.Array:
    """``scaling * h @ b.T``: LoRA's second factor, float32 ``[..., out]`` from the rank-r
    intermediate ``h`` (float32 ``[..., r]``) and ``b`` (``lora_B``, float32 ``[out, r]``).

    The same product as ``jax.lax.dot_general`` with JAX's own gradient, but the backward
    computes ``lora_B``'s gradient as ``(h^T @ g)^T``: contracting the tokens with the small
    ``[r, tokens]`` operand on the left, so that XLA:CPU transposes ``h`` (r values per token)
    rather than the ``[tokens, out]`` output gradient ``g``, which JAX's rule
    (``g^T @ h``) makes it copy into ``[out, tokens]`` once per projection and layer (with the
    elementwise backward of the SwiGLU fused into that copy: a sixth of a CPU train step,
    issue 26). ``scaling`` is a Python float; ``b`` may be a `PackedFactor` (its gradient
    is then one too).
    """
    return scaling * jax.lax.dot_general(h, _unpacked(b), (((h.ndim - 1,), (1,)), ((), ())))


def _lora_b_fwd(h, b, scaling):
    return lora_b_product(h, b, scaling), (h, b)


def _lora_b_bwd(scaling, res, g):
    h, packed = res
    b = _unpacked(packed)
    g = scaling * g
    lead = tuple(range(h.ndim - 1))
    dh = jax.lax.dot_general(g, b, (((g.ndim - 1,), (0,)), ((), ())))  # [..., r]
    db = jax.lax.dot_general(h, g, ((lead, lead), ((), ()))).T  # [r, out] -> [out, r]
    return dh, _factor_cotangent(packed, db)


lora_b_product.defvjp(_lora_b_fwd, _lora_b_bwd)


class AdapterScaling(nnx.Variable):
    """Each adapter's scale (``lora_alpha / r``, or ``/ sqrt(r)``), float32 ``[layers, A]``, of a
    `LoRALinear` holding A adapters; never trained."""


def projection_owner(layer: nnx.Module, name: str) -> nnx.Module:
    """The module of a decoder ``layer`` (the stacked layers) that holds the projection
    ``name`` (``self_attn`` or ``mlp``)."""
    return layer.self_attn if name in ATTENTION_TARGETS else layer.mlp


def apply_lora(model: nnx.Module, *, r: int = 16, alpha: float = 32.0, dropout: float = 0.0,
               targets: Iterable[str] = ALL_TARGETS, use_rslora: bool = False, seed: int = 0) -> nnx.Module:
    """Wrap the ``targets`` projections of every decoder layer in `LoRALinear`, in place.

    Args:
      model: a `jaxqlora.model.CausalLM` (bf16 or NF4 base).
      r, alpha, dropout, use_rslora: see `LoRALinear`. PEFT defaults are r=8, alpha=8;
        the QLoRA paper uses r=64, alpha=16, dropout 0.1.
      targets: names among ``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj``
        (default all seven, as in the QLoRA paper).
      seed: seed of lora_A's init and of the dropout masks.

    Returns:
      ``model`` (modified in place), for chaining.

    Raises:
      ValueError: an unknown target name, or a projection that already has LoRA.
    """
    targets = tuple(targets)
    unknown = sorted(set(targets) - set(ALL_TARGETS))
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; choose among {ALL_TARGETS}")
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    layers = model.model.layers
    for name in targets:
        owner = projection_owner(layers, name)
        base = getattr(owner, name)
        if isinstance(base, LoRALinear):
            raise ValueError(f"the {name} projections already have LoRA adapters")
        setattr(owner, name, LoRALinear(base, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, rngs=rngs,
                                        stack=(model.num_layers,)))
    return model


def lora_layers(model: nnx.Module) -> dict[str, LoRALinear]:
    """``{"model.layers.self_attn.q_proj": LoRALinear, ...}`` for every adapted projection
    (stacked paths: one entry per projection covers every layer; per-layer keys come from
    `jaxqlora.model.per_layer_items`)."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, LoRALinear):
            out[".".join(str(p) for p in path)] = node
    return out


def lora_config(model: nnx.Module) -> dict:
    """r, alpha, dropout, rsLoRA and target names of the adapters in ``model``.

    Raises:
      ValueError: the model has no LoRA layers, or they differ in r / alpha.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers")
    first = next(iter(layers.values()))
    for name, l in layers.items():
        if (l.r, l.alpha, l.use_rslora) != (first.r, first.alpha, first.use_rslora):
            raise ValueError(f"{name} has r={l.r}, alpha={l.alpha}; mixed LoRA settings are not supported")
    targets = sorted({name.rsplit(".", 1)[-1] for name in layers})
    rate = first.dropout.rate if first.dropout is not None else 0.0
    return dict(r=first.r, lora_alpha=first.alpha, lora_dropout=rate, use_rslora=first.use_rslora,
                target_modules=targets)
