"""Training: objectives, the optimizer, and one jitted train step with gradient accumulation.

- `SequenceClassifier`: a bias-free linear head ``score [num_labels, hidden]`` over pooled
  hidden states: ``mean`` over non-pad tokens (the re-created trainer's choice) or the
  ``last`` non-pad token (transformers' ``*ForSequenceClassification``).
- Losses return ``(sum, count)`` so that gradient accumulation divides by the count of
  the whole accumulated batch, not per micro-batch (transformers issue 34191).
- `make_optimizer`: optax ``clip_by_global_norm`` + ``adamw`` with warmup then constant or
  cosine, wrapped in ``apply_if_finite`` (non-finite gradients skip the step and are counted).
  Every setting (learning rate, schedule and its length, clipping, decay, betas) is held in
  the optimizer state as device scalars (``optax.inject_hyperparams``, `scale_by_lr_schedule`),
  so runs that differ only in them compile, and cache on disk, the same programs.
- Metrics (`classification_metrics`, `causal_lm_metrics`) return sums over a batch, so
  evaluation adds them on the host and never runs an uncompiled op.
- `Trainer`: the model split into trainable (LoRA + head), RNG (dropout) and frozen
  state; `Trainer.step` is one optimizer step over ``[accum, batch, ...]`` arrays,
  `Trainer.evaluate_batch` the metric sums of one batch; the compiled steps take the state
  as flat lists of arrays, so a call costs the host little. `Trainer.precompile` compiles
  both for every shape bucket ahead of time, several at once (`jaxqlora.compile`); it also works on a
  Trainer built over an abstract model (``nnx.eval_shape``), before the weights exist,
  which `Trainer.attach` then binds to the real model.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxqlora import sharding
from jaxqlora.compile import BucketKey, Executables, Job, abstract, is_abstract, precompile
from jaxqlora.model import CausalLM, lm_logits


class HeadParam(nnx.Param):
    """A trainable parameter that is not a LoRA factor (the classification head)."""


TRAINABLE = nnx.Any(nnx.LoRAParam, HeadParam)


class SequenceClassifier(nnx.Module):
    """Class logits from a decoder: ``score(pool(hidden_states))``.

    Args:
      lm: the `CausalLM` (its ``lm_head`` is unused).
      num_labels: number of classes.
      pooling: ``"mean"`` (mean over non-pad tokens) or ``"last"`` (last non-pad token,
        as transformers' ``LlamaForSequenceClassification`` with right padding).
      seed: seed of the head's init (normal, std 0.02 as ``initializer_range``).

    Call: ``input_ids`` int32 ``[B, T]``, ``attention_mask`` ``[B, T]`` (right padding) ->
    float32 logits ``[B, num_labels]``.
    """

    def __init__(self, lm: CausalLM, num_labels: int, *, pooling: str = "mean", seed: int = 0):
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        self.lm = lm
        self.pooling = pooling
        self.num_labels = num_labels
        hidden = lm.config.hidden_size
        self.score = HeadParam(0.02 * jax.random.normal(jax.random.key(seed), (num_labels, hidden), jnp.float32))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        h = self.lm.hidden_states(input_ids, attention_mask).astype(jnp.float32)
        m = attention_mask.astype(jnp.float32)
        if self.pooling == "mean":
            pooled = jnp.einsum("bth,bt->bh", h, m) / jnp.maximum(m.sum(1, keepdims=True), 1.0)
        else:
            last = jnp.maximum(attention_mask.sum(1) - 1, 0)
            pooled = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
        return pooled @ self.score[...].T


# ------------------------------------------------------------------- losses


def classification_loss(model: SequenceClassifier, batch) -> tuple[jax.Array, jax.Array]:
    """Sum of example cross-entropies (weighted by ``batch["weight"]``) and the weight sum."""
    logits = model(batch["input_ids"], batch["attention_mask"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    return jnp.sum(ce * batch["weight"]), jnp.sum(batch["weight"])


#: Tokens per chunk of `chunked_cross_entropy`, all rows together (float32 logits of
#: 1024 x 128256: 0.5 GB). Read at trace time by `causal_lm_loss`.
CE_CHUNK_TOKENS = 1024


def chunked_cross_entropy(hidden: jax.Array, weight: jax.Array, targets: jax.Array, mask: jax.Array,
                          chunk_tokens: int = CE_CHUNK_TOKENS) -> jax.Array:
    """``sum(mask * CE(hidden @ weight.T, targets))`` without the whole logits tensor in memory.

    The sequence is cut into chunks of ``chunk_tokens // B`` positions (all B rows at
    once, so that a batch split over devices stays split: each device computes its own
    rows' logits); a ``lax.scan`` computes each chunk's float32 logits
    (`jaxqlora.model.lm_logits`), cross-entropy and masked sum under ``jax.checkpoint``,
    so the backward pass recomputes one chunk's logits at a time. Peak memory for the loss
    is one chunk's logits and their gradient instead of ``[B, T, vocab]`` float32 twice
    (4.2 GB each for 8192 tokens of a 128256-word vocabulary), for one extra forward
    matmul of the head. The same numbers as the unchunked loss (float32 logits,
    ``optax.softmax_cross_entropy_with_integer_labels``). The memory trick is the one of
    Liger Kernel's fused linear cross-entropy (Hsu et al. 2024, arXiv:2410.10989).

    Args:
      hidden: ``[..., T, hidden]`` final hidden states (leading axes are rows).
      weight: ``[vocab, hidden]`` LM head.
      targets: int ``[..., T]`` token ids; mask: float ``[..., T]`` per-token weights.
      chunk_tokens: tokens per chunk, all rows together (T is padded up to a multiple of
        the chunk's positions).

    Returns:
      float32 scalar.
    """
    length, width = hidden.shape[-2:]
    h = hidden.reshape(-1, length, width)
    rows = h.shape[0]
    t, m = targets.reshape(rows, length), mask.reshape(rows, length).astype(jnp.float32)
    c = max(1, min(length, int(chunk_tokens) // max(rows, 1)))
    pad = -length % c
    if pad:
        h, t, m = (jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2)) for a in (h, t, m))

    def chunks(a):  # [rows, n * c, ...] -> [n, rows, c, ...]
        return jnp.moveaxis(a.reshape(rows, -1, c, *a.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk(total, xs):
        hc, tc, mc = xs
        ce = optax.softmax_cross_entropy_with_integer_labels(lm_logits(hc, weight), tc)
        return total + jnp.sum(ce * mc), None

    total, _ = jax.lax.scan(chunk, jnp.zeros((), jnp.float32), (chunks(h), chunks(t), chunks(m)))
    return total


def causal_lm_loss(model: CausalLM, batch) -> tuple[jax.Array, jax.Array]:
    """Sum of next-token cross-entropies over ``loss_mask`` positions (response tokens) and
    their count. ``loss_mask[b, t] = 1`` means the logits at t must predict token t+1.
    The logits are computed in chunks (`chunked_cross_entropy`). ``attention_mask`` may
    hold the segment ids of packed rows (`jaxqlora.data.pack`): the model then keeps
    attention and positions per example, and the sums are those of the examples unpacked."""
    return _causal_lm_sums(model, batch, model.hidden_states(batch["input_ids"], batch["attention_mask"]))


def _causal_lm_sums(model: CausalLM, batch, hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
    mask = batch["loss_mask"][:, :-1] * batch["weight"][:, None]
    loss = chunked_cross_entropy(hidden[:, :-1], model.head_weight, batch["input_ids"][:, 1:], mask,
                                 CE_CHUNK_TOKENS)
    return loss, jnp.sum(mask)


# ------------------------------------------------------------------ metrics


def classification_metrics(model: SequenceClassifier, batch) -> dict[str, jax.Array]:
    """Weighted count of correct argmax predictions (``correct``) and the weight sum (``total``)."""
    logits = model(batch["input_ids"], batch["attention_mask"])
    hit = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
    return {"correct": jnp.sum(hit * batch["weight"]), "total": jnp.sum(batch["weight"])}


def causal_lm_metrics(model: CausalLM, batch) -> dict[str, jax.Array]:
    """Sums of one causal-LM batch: ``loss_sum`` / ``count`` (as `causal_lm_loss`), and
    ``correct`` / ``total``: rows whose greedy first response token equals the real one
    (label-word accuracy when responses are single label words)."""
    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])
    loss_sum, count = _causal_lm_sums(model, batch, hidden)  # no [B, T, vocab] logits
    first = jnp.argmax(batch["loss_mask"], axis=1)  # logits at `first` predict the first response token
    rows = jnp.arange(first.shape[0])
    hit = (jnp.argmax(model.logits(hidden[rows, first]), -1) == batch["input_ids"][rows, first + 1]).astype(
        jnp.float32)
    return {"loss_sum": loss_sum, "count": count, "correct": jnp.sum(hit * batch["weight"]),
            "total": jnp.sum(batch["weight"])}


_METRICS = {classification_loss: classification_metrics, causal_lm_loss: causal_lm_metrics}


# ---------------------------------------------------------------- optimizer


SCHEDULES = ("constant", "cosine")
"""Learning-rate schedule kinds of `make_optimizer`."""


class LRScheduleState(NamedTuple):
    """State of `scale_by_lr_schedule`: the update count and the schedule's parameters.

    Every field is a device scalar, so a compiled train step reads them as inputs: runs
    that differ only in learning rate, warmup, length or kind of schedule share one
    compiled program (and one persistent-cache entry).

    Attributes:
      count: int32 ``[]``, updates applied so far (the step the next update uses).
      peak_lr: float32 ``[]``, the learning rate at the end of warmup.
      warmup_steps: int32 ``[]`` (>= 1), steps of the linear warmup from 0.
      decay_steps: int32 ``[]`` (>= 1), steps of the cosine decay after warmup (unused by
        the constant schedule).
      cosine: bool ``[]``, cosine decay to 0 after warmup (else constant).
    """

    count: jax.Array
    peak_lr: jax.Array
    warmup_steps: jax.Array
    decay_steps: jax.Array
    cosine: jax.Array


def schedule_value(count, peak_lr, warmup_steps, decay_steps, cosine) -> jax.Array:
    """The learning rate at update ``count`` (float32 ``[]``; traceable, every argument may
    be a device scalar).

    Linear warmup from 0 over ``warmup_steps`` updates (``optax.linear_schedule(0, peak_lr,
    warmup_steps)``), then ``peak_lr`` (``cosine`` False: ``optax.join_schedules`` of that
    and ``optax.constant_schedule(peak_lr)``) or a cosine decay to 0 over ``decay_steps``
    updates (``cosine`` True: ``optax.warmup_cosine_decay_schedule(0, peak_lr,
    warmup_steps, warmup_steps + decay_steps)``); the same float32 operations in the same
    order as optax's, with the step counts as arrays instead of Python constants.

    Args:
      count: int ``[]``, updates so far. peak_lr: float ``[]``. warmup_steps, decay_steps:
        int ``[]``, >= 1. cosine: bool ``[]``.
    """
    count = jnp.asarray(count, jnp.int32)
    peak = jnp.asarray(peak_lr, jnp.float32)
    warmup = jnp.asarray(warmup_steps, jnp.int32)
    decay = jnp.asarray(decay_steps, jnp.int32).astype(jnp.float32)
    # optax.polynomial_schedule(init 0, end peak, power 1, transition_steps warmup)
    frac = 1 - jnp.clip(count, 0, warmup) / warmup
    warm = (0.0 - peak) * frac + peak
    # optax.cosine_decay_schedule(peak, decay, alpha 0) at count - warmup
    t = jnp.minimum((count - warmup).astype(jnp.float32), decay)
    cos = peak * (0.5 * (1 + jnp.cos(jnp.pi * t / decay)))
    return jnp.where(count < warmup, warm, jnp.where(jnp.asarray(cosine, bool), cos, peak))


def scale_by_lr_schedule(peak_lr: float, *, warmup_steps: int, total_steps: int,
                         schedule: str = "constant") -> optax.GradientTransformation:
    """``optax.scale_by_learning_rate`` of the warmup + constant / cosine schedule of
    `schedule_value`, whose parameters live in the state (`LRScheduleState`), not in the
    compiled program: updates are multiplied by ``-lr(count)``, then ``count`` increments.

    Args:
      peak_lr: learning rate after warmup.
      warmup_steps: linear-warmup updates (>= 1).
      total_steps: length of the whole schedule; the cosine decay reaches 0 at
        ``max(total_steps, warmup_steps + 1)`` (as ``optax.warmup_cosine_decay_schedule``
        with ``decay_steps`` that value).
      schedule: ``"constant"`` or ``"cosine"``.

    Raises:
      ValueError: unknown ``schedule``, or ``warmup_steps`` < 1.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    if int(warmup_steps) < 1:
        raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}")
    warmup = int(warmup_steps)
    decay = max(int(total_steps), warmup + 1) - warmup

    def init(params):
        del params
        return LRScheduleState(jnp.zeros([], jnp.int32), jnp.asarray(peak_lr, jnp.float32),
                               jnp.asarray(warmup, jnp.int32), jnp.asarray(decay, jnp.int32),
                               jnp.asarray(schedule == "cosine"))

    def update(updates, state, params=None):
        del params
        step_size = -1 * lr_of(state)
        updates = jax.tree_util.tree_map(lambda g: jnp.array(step_size, dtype=g.dtype) * g, updates)
        return updates, state._replace(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def lr_of(state: LRScheduleState) -> jax.Array:
    """The learning rate the next update of a `scale_by_lr_schedule` state uses (float32 ``[]``)."""
    return schedule_value(state.count, state.peak_lr, state.warmup_steps, state.decay_steps, state.cosine)


def learning_rate(opt_state) -> jax.Array | None:
    """The learning rate the next update of ``opt_state`` (from `make_optimizer`) uses:
    float32 ``[]`` (traceable), or None when the state holds no `LRScheduleState`."""
    found = [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, LRScheduleState))
             if isinstance(x, LRScheduleState)]
    return lr_of(found[0]) if found else None


def make_optimizer(lr: float = 2e-4, *, total_steps: int, warmup_ratio: float = 0.03, schedule: str = "constant",
                   weight_decay: float = 0.0, max_grad_norm: float = 0.3, b1: float = 0.9, b2: float = 0.999,
                   max_consecutive_nonfinite: int = 20) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping, linear warmup, then constant or cosine decay;
    returns ``(optimizer, learning-rate schedule)``.

    Defaults follow the QLoRA paper (lr 2e-4, 3% warmup, constant, max_grad_norm 0.3,
    beta2 0.999, no weight decay). Non-finite gradients leave the parameters unchanged
    (``optax.apply_if_finite``); after ``max_consecutive_nonfinite`` in a row the update
    is applied anyway so that training does not stall silently.

    Compile once, reuse always: every setting here except ``max_consecutive_nonfinite``
    lives in the optimizer *state* as a device scalar, none in the compiled step. The
    chain is ``optax.inject_hyperparams`` of ``clip_by_global_norm(max_grad_norm)``,
    ``scale_by_adam(b1, b2)`` and ``add_decayed_weights(weight_decay)`` (what
    ``optax.adamw`` chains), then `scale_by_lr_schedule` (the schedule's parameters in its
    state, the learning rate computed from its count on device). So two runs that differ
    only in these settings (or in ``total_steps``) compile the same program.

    Args:
      lr: peak learning rate. total_steps: optimizer steps of the run (>= 1).
      warmup_ratio: warmup steps = ``max(1, round(warmup_ratio * total_steps))``.
      schedule: ``"constant"`` (after warmup) or ``"cosine"`` (decay to 0 at
        ``max(total_steps, warmup + 1)``).
      weight_decay: decoupled (AdamW) decay. max_grad_norm: global-norm clip.
      b1, b2: Adam's betas (eps 1e-8).
      max_consecutive_nonfinite: see above (a constant of the program).

    Returns:
      ``(optimizer, schedule)``: ``schedule(count)`` is the learning rate of update
      ``count`` (0-based), the function the optimizer evaluates on device (`schedule_value`),
      for plots; a train step reports the rate it used (`Trainer.step`'s ``"lr"``).

    Raises:
      ValueError: unknown ``schedule``, or ``total_steps`` < 1.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    if int(total_steps) < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup = max(1, int(round(warmup_ratio * total_steps)))
    tx = optax.chain(optax.inject_hyperparams(optax.clip_by_global_norm)(max_norm=max_grad_norm),
                     optax.inject_hyperparams(optax.scale_by_adam)(b1=b1, b2=b2),
                     optax.inject_hyperparams(optax.add_decayed_weights)(weight_decay=weight_decay),
                     scale_by_lr_schedule(lr, warmup_steps=warmup, total_steps=total_steps, schedule=schedule))
    decay = max(int(total_steps), warmup + 1) - warmup
    sched = functools.partial(_host_schedule, lr, warmup, decay, schedule == "cosine")
    return optax.apply_if_finite(tx, max_consecutive_errors=max_consecutive_nonfinite), sched


def _host_schedule(peak_lr, warmup_steps, decay_steps, cosine, count):
    return schedule_value(count, peak_lr, warmup_steps, decay_steps, cosine)


def nonfinite_steps(opt_state) -> int:
    """How many steps ``apply_if_finite`` has skipped so far (reads the device: a sync)."""
    return int(opt_state.total_notfinite)


# ------------------------------------------------------------------- trainer


_STATES = ("trainable", "rng_state", "opt_state", "frozen")


def _state_property(name: str, doc: str) -> property:
    def get(self):
        return jax.tree_util.tree_unflatten(self._defs[name], self._leaves[name])

    def set_(self, value):
        self._set_state(name, value)

    return property(get, set_, doc=doc)


class _StateCall:
    """A ``jax.jit`` function whose first ``n`` arguments are flat leaf lists (the
    `Trainer`'s compiled steps), also callable and lowerable with the state pytrees
    themselves (they are flattened first). ``jitted`` is the function itself; other
    attributes are its own."""

    def __init__(self, jitted, n: int):
        self.jitted, self.n = jitted, n

    def _flat(self, args):
        return tuple(jax.tree_util.tree_leaves(a) for a in args[:self.n]) + tuple(args[self.n:])

    def lower(self, *args, **kwargs):
        return self.jitted.lower(*self._flat(args), **kwargs)

    def __call__(self, *args, **kwargs):
        return self.jitted(*self._flat(args), **kwargs)

    def __getattr__(self, name):
        return getattr(self.jitted, name)


@dataclasses.dataclass
class Trainer:
    """Holds the split model, the optimizer and its state; `step` trains, `predict` infers.

    Args:
      model: a `SequenceClassifier` or `CausalLM` with LoRA layers; or its abstract twin
        (``nnx.eval_shape(build)``, no weights) to `precompile` before the weights are
        loaded, then `attach` the real one.
      loss_fn: `classification_loss` or `causal_lm_loss`.
      optimizer: from `make_optimizer`; None for an evaluation-only Trainer.
      metrics_fn: metric sums of a batch for `evaluate_batch`; default
        `classification_metrics` / `causal_lm_metrics` after ``loss_fn``.
      executables: compiled steps (from `precompile`). Once there are any, a batch whose
        shape was not precompiled raises `jaxqlora.compile.BucketError` (or, with
        ``executables.allow_new_buckets``, compiles its bucket); without any, the steps are
        plain ``jax.jit`` functions that compile on first use of each shape.
      mesh: None (one device), or a ``(data, fsdp)`` ``jax.sharding.Mesh``
        (`jaxqlora.sharding.make_mesh`): the batch is split over both axes, frozen weights
        are sharded over ``fsdp`` (`jaxqlora.sharding.shard_model`, applied to ``model``
        in place), trainable and optimizer state are replicated.

    The state is held as four flat lists of arrays (trainable, RNG, optimizer, frozen),
    which the compiled steps take and return as they are: a call flattens no pytree of
    ``nnx.Variable``s and builds none (thousands per call for a model of unstacked layers,
    most of a step's host time). The properties ``trainable``, ``rng_state``,
    ``opt_state`` and ``frozen`` rebuild the pytrees when read and flatten them when set
    (setting a pytree of another structure raises ValueError).
    """

    model: nnx.Module
    loss_fn: Callable
    optimizer: optax.GradientTransformation | None
    metrics_fn: Callable | None = None
    executables: Executables | None = None
    mesh: Any = None

    trainable = _state_property("trainable", "The trainable state (LoRA factors, head): an ``nnx.State``.")
    rng_state = _state_property("rng_state", "The dropout RNG state: an ``nnx.State``.")
    opt_state = _state_property("opt_state", "The optimizer state (None without an optimizer).")
    frozen = _state_property("frozen", "The frozen state (base weights, NF4 or not): an ``nnx.State``.")

    def __post_init__(self):
        out = {}
        if self.mesh is not None:
            sharding.shard_model(self.model, self.mesh, trainable=TRAINABLE)
            out = {"out_shardings": sharding.replicated(self.mesh)}
        self._defs, self._leaves = {}, {}
        self.graphdef, trainable, rng_state, frozen = nnx.split(self.model, TRAINABLE, nnx.RngState, ...)
        if not jax.tree_util.tree_leaves(trainable):
            raise ValueError("the model has no trainable (LoRA or head) parameters")
        if self.metrics_fn is None:
            self.metrics_fn = _METRICS.get(self.loss_fn)
        if self.executables is None:
            self.executables = Executables()
        self.is_abstract = is_abstract((trainable, rng_state, frozen))
        for name, value in zip(_STATES, (trainable, rng_state, self._init_opt_state(trainable), frozen)):
            self._set_state(name, value)
        self.steps = 0
        defs = {k: tuple(self._defs[n] for n in names) for k, names in
                (("train", _STATES), ("eval", ("trainable", "rng_state", "frozen")))}
        self._step = None if self.optimizer is None else _StateCall(jax.jit(
            functools.partial(_train_step_flat, self.graphdef, self.loss_fn, self.optimizer, defs["train"]),
            donate_argnums=(0, 1, 2), **out), 4)
        self._eval = _StateCall(jax.jit(functools.partial(_eval_forward, self.graphdef, defs["eval"])), 3)
        self._metrics = None if self.metrics_fn is None else _StateCall(jax.jit(
            functools.partial(_eval_metrics, self.graphdef, self.metrics_fn, defs["eval"]), **out), 3)

    def _set_state(self, name: str, value) -> None:
        leaves, treedef = jax.tree_util.tree_flatten(value)
        if name in self._defs and treedef != self._defs[name]:
            raise ValueError(f"Trainer.{name}: the new value's tree structure differs from the one the steps "
                             "were built for")
        self._defs[name], self._leaves[name] = treedef, leaves

    def _init_opt_state(self, trainable):
        if self.optimizer is None:
            return None
        if self.is_abstract:
            opt_state = jax.eval_shape(self.optimizer.init, trainable)
            return opt_state if self.mesh is None else sharding.place(opt_state, sharding.replicated(self.mesh))
        opt_state = self.optimizer.init(trainable)
        if self.mesh is not None:
            opt_state = sharding.place(opt_state, sharding.replicated(self.mesh))
        return opt_state

    @property
    def num_trainable(self) -> int:
        """Number of trainable (LoRA and head) scalars."""
        return sum(x.size for x in self._leaves["trainable"])

    def step(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """One optimizer step. ``batch`` arrays have a leading micro-batch axis ``[accum, B, ...]``.

        Returns device scalars (not synced; read them back only when needed): ``loss``
        (float32, mean over the counted tokens or rows), ``grad_norm`` (float32, global
        norm before clipping), ``count`` (float32, tokens or weighted rows counted); with
        a `make_optimizer` optimizer also ``lr`` (float32, the learning rate this step
        used: the rate of the optimizer's update count before the step) and
        ``nonfinite_skipped`` (int32, steps ``apply_if_finite`` has skipped so far,
        this one included). With a mesh, host arrays hold this process's rows
        (`jaxqlora.sharding.shard_batch`); arrays already placed by it pass as they are.

        Raises:
          BucketError: the batch's shape was not precompiled (see ``executables``).
          ValueError: no optimizer, or an abstract model (see `attach`).
        """
        if self._step is None:
            raise ValueError("this Trainer has no optimizer (evaluation only)")
        self._check_concrete()
        if self.mesh is not None:
            batch = sharding.shard_batch(batch, self.mesh)
        leaves = self._leaves
        args = (leaves["trainable"], leaves["rng_state"], leaves["opt_state"], leaves["frozen"], batch)
        key = BucketKey("train", tuple(batch["input_ids"].shape))
        with sharding.use_mesh(self.mesh):
            step = self._executable(key, self._step.jitted, args)
            leaves["trainable"], leaves["rng_state"], leaves["opt_state"], metrics = step(*args)
        self.steps += 1
        return metrics

    def evaluate_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """``metrics_fn`` of one ``[B, ...]`` batch with dropout off: device scalars of sums
        (e.g. ``correct`` / ``total``), to be added over batches.

        Raises:
          BucketError: the batch's shape was not precompiled.
          ValueError: no ``metrics_fn`` is known for this ``loss_fn``.
        """
        if self._metrics is None:
            raise ValueError(f"no metrics function for {self.loss_fn!r}; pass metrics_fn")
        self._check_concrete()
        if self.mesh is not None:
            batch = {k: sharding.global_input(v, self.mesh) for k, v in batch.items()}
        leaves = self._leaves
        args = (leaves["trainable"], leaves["rng_state"], leaves["frozen"], batch)
        with sharding.use_mesh(self.mesh):
            return self._executable(BucketKey("eval", tuple(batch["input_ids"].shape)), self._metrics.jitted,
                                    args)(*args)

    def predict(self, input_ids, attention_mask) -> jax.Array:
        """Model output (class logits or LM logits) with dropout off (plain ``jax.jit``,
        compiled on first use of each shape), on one device.

        Raises:
          ValueError: the Trainer has a mesh (use `evaluate_batch`, which is sharded).
        """
        self._check_concrete()
        if self.mesh is not None:
            raise ValueError("Trainer.predict runs on one device; with a mesh use evaluate_batch")
        leaves = self._leaves
        return self._eval.jitted(leaves["trainable"], leaves["rng_state"], leaves["frozen"], input_ids,
                                 attention_mask)

    def precompile(self, batch_size: int, seq_lens, *, grad_accum: int = 1, eval_batch_size: int | None = None,
                   log: Callable[[str], None] | None = None, max_workers: int | None = None,
                   desc: str | None = None, train_seq_lens=None) -> Executables:
        """Compile the train step for ``[grad_accum, batch_size, L]`` batches and the
        evaluation step for ``[eval_batch_size, L]`` batches, for every L in ``seq_lens``,
        ahead of time, several at once (`jaxqlora.compile.precompile`; progress bar,
        per-bucket times).

        Args:
          batch_size, grad_accum: training micro-batch size and micro-batches per step.
          seq_lens: sequence-length buckets (tokens).
          eval_batch_size: evaluation batch size; None skips evaluation steps.
          log: receives the compile-time lines (default ``executables.log``).
          max_workers: compiles at once (`jaxqlora.compile.precompile`; None: one per
            CPU core up to the number of executables, 1: serially).
          desc: the progress bar's label (default ``"precompile train/eval"``, or
            ``"precompile eval"`` for an evaluation-only Trainer).
          train_seq_lens: the buckets of the train step, if not ``seq_lens`` (packed
            training rows all have ``max_seq_len`` tokens; evaluation keeps every bucket).

        Returns:
          ``self.executables``, now holding ``BucketKey("train", (grad_accum, batch_size, L))``
          and ``BucketKey("eval", (eval_batch_size, L))`` for each L.

        Works on an abstract Trainer (no weights): only shapes, dtypes and shardings are read.
        With a mesh, batches get the shardings `step` / `evaluate_batch` give them
        (`jaxqlora.sharding.shard_batch`, `jaxqlora.sharding.global_input`).
        """
        from jaxqlora.data import batch_spec

        causal_lm = self.loss_fn is causal_lm_loss  # batches carry loss_mask, else labels
        train_sharding = eval_sharding = None
        if self.mesh is not None:
            train_sharding = sharding.batch_sharding(self.mesh, 1)
            eval_sharding = sharding.input_sharding(self.mesh, (eval_batch_size or 0,))
        trainable, rng_state, opt_state, frozen = (abstract(self._leaves[n]) for n in _STATES)
        jobs = {}
        eval_lens = set(seq_lens)
        train_lens = eval_lens if train_seq_lens is None else set(train_seq_lens)
        for length in sorted(eval_lens | train_lens):
            if self._step is not None and length in train_lens:
                batch = batch_spec(batch_size, length, causal_lm=causal_lm, accum=grad_accum,
                                   sharding=train_sharding)
                jobs[BucketKey("train", (grad_accum, batch_size, length))] = Job(
                    self._step.jitted, (trainable, rng_state, opt_state, frozen, batch))
            if eval_batch_size and self._metrics is not None and length in eval_lens:
                batch = batch_spec(eval_batch_size, length, causal_lm=causal_lm, sharding=eval_sharding)
                jobs[BucketKey("eval", (eval_batch_size, length))] = Job(
                    self._metrics.jitted, (trainable, rng_state, frozen, batch))
        with sharding.use_mesh(self.mesh):
            if desc is None:
                desc = "precompile train/eval" if self._step is not None else "precompile eval"
            return precompile(jobs, into=self.executables, log=log, desc=desc,
                              max_workers=max_workers)

    def attach(self, model: nnx.Module) -> "Trainer":
        """Bind the real ``model`` to a Trainer built (and precompiled) over its abstract twin;
        initialises the optimizer state. Returns self.

        Raises:
          ValueError: ``model``'s structure, shapes or dtypes differ from the abstract model's
            (the precompiled executables would not fit it).
        """
        graphdef, trainable, rng_state, frozen = nnx.split(model, TRAINABLE, nnx.RngState, ...)
        if graphdef != self.graphdef or _signature((trainable, rng_state, frozen)) != _signature(
                (self.trainable, self.rng_state, self.frozen)):
            raise ValueError("the model differs from the one this Trainer was built and compiled for "
                             "(structure, shapes or dtypes)")
        self.model = model
        for name, value in zip(("trainable", "rng_state", "frozen"), (trainable, rng_state, frozen)):
            self._set_state(name, value)
        self.is_abstract = False
        self._set_state("opt_state", self._init_opt_state(trainable))
        return self

    def _executable(self, key: BucketKey, jitted, args):
        if not self.executables:
            return jitted
        return self.executables.lookup(key, lambda: Job(jitted, abstract(args)))

    def _check_concrete(self):
        if self.is_abstract:
            raise ValueError("this Trainer holds an abstract model (no weights): attach the real model first")

    def sync_model(self) -> nnx.Module:
        """Write the trained state back into ``self.model`` and return it."""
        nnx.update(self.model, self.trainable, self.rng_state)
        return self.model


def _unflatten(defs, leaves):
    return tuple(jax.tree_util.tree_unflatten(d, x) for d, x in zip(defs, leaves))


def _train_step_flat(graphdef, loss_fn, optimizer, defs, trainable, rng_state, opt_state, frozen, batch):
    """`_train_step` over flat leaf lists (``defs``: the four states' treedefs)."""
    trainable, rng_state, opt_state, metrics = _train_step(
        graphdef, loss_fn, optimizer, *_unflatten(defs, (trainable, rng_state, opt_state, frozen)), batch)
    leaves = jax.tree_util.tree_leaves
    return leaves(trainable), leaves(rng_state), leaves(opt_state), metrics


def _train_step(graphdef, loss_fn, optimizer, trainable, rng_state, opt_state, frozen, batch):
    def micro(carry, mb):
        grads, loss_sum, count, rng = carry

        def f(tr, rng):  # rng passed in, so its Variables live at this trace level
            model = nnx.merge(graphdef, tr, rng, frozen, copy=True)
            s, c = loss_fn(model, mb)
            return s, (c, nnx.state(model, nnx.RngState))

        (s, (c, rng)), g = jax.value_and_grad(f, has_aux=True)(trainable, rng)
        grads = jax.tree_util.tree_map(jnp.add, grads, g)
        return (grads, loss_sum + s, count + c, rng), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
    (grads, loss_sum, count, rng_state), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0, rng_state), batch)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
    lr = learning_rate(opt_state)  # the rate of this update (read before the count moves)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = {"loss": loss_sum / denom, "grad_norm": optax.tree.norm(grads), "count": count}
    if lr is not None:
        metrics["lr"] = lr
    if hasattr(opt_state, "total_notfinite"):
        metrics["nonfinite_skipped"] = opt_state.total_notfinite
    return trainable, rng_state, opt_state, metrics


def _eval_forward(graphdef, defs, trainable, rng_state, frozen, input_ids, attention_mask):
    model = nnx.merge(graphdef, *_unflatten(defs, (trainable, rng_state, frozen)))
    model.eval()
    return model(input_ids, attention_mask)


def _eval_metrics(graphdef, metrics_fn, defs, trainable, rng_state, frozen, batch):
    model = nnx.merge(graphdef, *_unflatten(defs, (trainable, rng_state, frozen)), copy=True)
    model.eval()
    return metrics_fn(model, batch)


def _signature(tree):
    """Tree structure with each leaf's shape and dtype (to compare a model with its abstract twin)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, [(tuple(x.shape), x.dtype) for x in leaves]
