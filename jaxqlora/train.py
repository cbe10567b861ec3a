"""Training: objectives, the optimizer, and one jitted train step with gradient accumulation.

- `SequenceClassifier`: a bias-free linear head ``score [num_labels, hidden]`` over pooled
  hidden states: ``mean`` over non-pad tokens (the re-created trainer's choice) or the
  ``last`` non-pad token (transformers' ``*ForSequenceClassification``).
- Losses return ``(sum, count)`` so that gradient accumulation divides by the count of
  the whole accumulated batch, not per micro-batch (transformers issue 34191).
- `make_optimizer`: optax ``clip_by_global_norm`` + ``adamw`` with warmup then constant or
  cosine, wrapped in ``apply_if_finite`` (non-finite gradients skip the step and are counted).
- `Trainer`: the model split into trainable (LoRA + head), RNG (dropout) and frozen
  state; `Trainer.step` is one optimizer step over ``[accum, batch, ...]`` arrays.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxqlora import sharding
from jaxqlora.model import CausalLM


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


def causal_lm_loss(model: CausalLM, batch) -> tuple[jax.Array, jax.Array]:
    """Sum of next-token cross-entropies over ``loss_mask`` positions (response tokens) and
    their count. ``loss_mask[b, t] = 1`` means the logits at t must predict token t+1."""
    logits = model(batch["input_ids"], batch["attention_mask"])[:, :-1]
    targets = batch["input_ids"][:, 1:]
    mask = batch["loss_mask"][:, :-1] * batch["weight"][:, None]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(ce * mask), jnp.sum(mask)


# ---------------------------------------------------------------- optimizer


def make_optimizer(lr: float = 2e-4, *, total_steps: int, warmup_ratio: float = 0.03, schedule: str = "constant",
                   weight_decay: float = 0.0, max_grad_norm: float = 0.3, b1: float = 0.9, b2: float = 0.999,
                   max_consecutive_nonfinite: int = 20) -> optax.GradientTransformation:
    """AdamW with global-norm clipping, linear warmup, then constant or cosine decay.

    Defaults follow the QLoRA paper (lr 2e-4, 3% warmup, constant, max_grad_norm 0.3,
    beta2 0.999, no weight decay). Non-finite gradients leave the parameters unchanged
    (``optax.apply_if_finite``); after ``max_consecutive_nonfinite`` in a row the update
    is applied anyway so that training does not stall silently.
    """
    warmup = max(1, int(round(warmup_ratio * total_steps)))
    if schedule == "constant":
        sched = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    elif schedule == "cosine":
        sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1), end_value=0.0)
    else:
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    tx = optax.chain(optax.clip_by_global_norm(max_grad_norm),
                     optax.adamw(sched, b1=b1, b2=b2, weight_decay=weight_decay))
    return optax.apply_if_finite(tx, max_consecutive_errors=max_consecutive_nonfinite), sched


def nonfinite_steps(opt_state) -> int:
    """How many steps ``apply_if_finite`` has skipped so far."""
    return int(opt_state.total_notfinite)


# ------------------------------------------------------------------- trainer


@dataclasses.dataclass
class Trainer:
    """Holds the split model, the optimizer and its state; `step` trains, `predict` infers.

    Args:
      model: a `SequenceClassifier` or `CausalLM` with LoRA layers.
      loss_fn: `classification_loss` or `causal_lm_loss`.
      optimizer: from `make_optimizer`.
      mesh: None (one device), or a ``(data, fsdp)`` ``jax.sharding.Mesh``
        (`jaxqlora.sharding.make_mesh`): the batch is split over both axes, frozen weights
        are sharded over ``fsdp`` (`jaxqlora.sharding.shard_model`, applied to ``model``
        in place), trainable and optimizer state are replicated.
    """

    model: nnx.Module
    loss_fn: Callable
    optimizer: optax.GradientTransformation
    mesh: Any = None

    def __post_init__(self):
        out = {}
        if self.mesh is not None:
            sharding.shard_model(self.model, self.mesh, trainable=TRAINABLE)
            out = {"out_shardings": sharding.replicated(self.mesh)}
        self.graphdef, self.trainable, self.rng_state, self.frozen = nnx.split(self.model, TRAINABLE, nnx.RngState, ...)
        if not jax.tree_util.tree_leaves(self.trainable):
            raise ValueError("the model has no trainable (LoRA or head) parameters")
        self.opt_state = self.optimizer.init(self.trainable)
        if self.mesh is not None:
            self.opt_state = sharding.place(self.opt_state, sharding.replicated(self.mesh))
        self.steps = 0
        self._step = jax.jit(functools.partial(_train_step, self.graphdef, self.loss_fn, self.optimizer),
                             donate_argnums=(0, 1, 2), **out)
        self._eval = jax.jit(functools.partial(_eval_forward, self.graphdef), **out)

    @property
    def num_trainable(self) -> int:
        return sum(x.size for x in jax.tree_util.tree_leaves(self.trainable))

    def step(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        """One optimizer step. ``batch`` arrays have a leading micro-batch axis ``[accum, B, ...]``.

        Returns ``{"loss", "grad_norm", "count"}`` as device scalars (not synced).
        With a mesh, host arrays hold this process's rows (`jaxqlora.sharding.shard_batch`).
        """
        if self.mesh is not None:
            batch = sharding.shard_batch(batch, self.mesh)
        with sharding.use_mesh(self.mesh):
            self.trainable, self.rng_state, self.opt_state, metrics = self._step(
                self.trainable, self.rng_state, self.opt_state, self.frozen, batch)
        self.steps += 1
        return metrics

    def predict(self, input_ids, attention_mask) -> jax.Array:
        """Model output (class logits or LM logits) with dropout off. With a mesh every
        process passes the whole batch and gets the whole output on its first device."""
        if self.mesh is None:
            return self._eval(self.trainable, self.rng_state, self.frozen, input_ids, attention_mask)
        input_ids = sharding.global_input(input_ids, self.mesh)
        attention_mask = sharding.global_input(attention_mask, self.mesh)
        with sharding.use_mesh(self.mesh):
            out = self._eval(self.trainable, self.rng_state, self.frozen, input_ids, attention_mask)
        return out.addressable_data(0)

    def sync_model(self) -> nnx.Module:
        """Write the trained state back into ``self.model`` and return it."""
        nnx.update(self.model, self.trainable, self.rng_state)
        return self.model


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
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    return trainable, rng_state, opt_state, {"loss": loss_sum / denom, "grad_norm": optax.tree.norm(grads),
                                             "count": count}


def _eval_forward(graphdef, trainable, rng_state, frozen, input_ids, attention_mask):
    model = nnx.merge(graphdef, trainable, rng_state, frozen)
    model.eval()
    return model(input_ids, attention_mask)


def make_predict(model: nnx.Module) -> Callable:
    """A jitted ``predict(input_ids, attention_mask)`` of ``model`` with dropout off."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, input_ids, attention_mask):
        m = nnx.merge(graphdef, state, copy=True)
        m.eval()
        return m(input_ids, attention_mask)

    return lambda input_ids, attention_mask: run(state, input_ids, attention_mask)
