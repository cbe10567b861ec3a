"""Token sampling against NumPy definitions of temperature, top-k and nucleus (top-p) sampling
(Holtzman et al. 2019): the support and the frequencies of 40,000 draws."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxqlora.generate import SamplingConfig, sample_token

N = 40_000


def _np_probs(logits, temperature, top_k=0, top_p=1.0):
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.ones_like(p, bool)
    if top_k:
        keep[order[top_k:]] = False
    if top_p < 1.0:
        q = np.where(keep, p, 0)
        q /= q.sum()
        cum = np.cumsum(q[order])
        n = int(np.searchsorted(cum, top_p) + 1)  # smallest prefix with mass >= top_p
        keep2 = np.zeros_like(keep)
        keep2[order[:n]] = True
        keep &= keep2
    p = np.where(keep, p, 0)
    return p / p.sum()


def _frequencies(logits, cfg, seed):
    batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (N, logits.size))
    draws = np.asarray(sample_token(batch, jax.random.key(seed), cfg))
    return np.bincount(draws, minlength=logits.size) / N


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 3, 1.0), (1.0, 0, 0.8),
                                                     (0.9, 5, 0.6)])
def test_sampling_distribution(temperature, top_k, top_p):
    rng = np.random.default_rng(int(temperature * 10) + top_k)
    logits = rng.normal(0, 1.5, 12)
    want = _np_probs(logits, temperature, top_k, top_p)
    got = _frequencies(logits, SamplingConfig(temperature, top_k, top_p), seed=top_k + 1)
    assert set(np.flatnonzero(got)) <= set(np.flatnonzero(want))
    tol = 4.5 * np.sqrt(want * (1 - want) / N) + 1e-9  # 4.5 standard errors of a frequency
    assert np.all(np.abs(got - want) <= tol), (got, want)


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).normal(size=(7, 50))
    got = np.asarray(sample_token(jnp.asarray(logits, jnp.float32), jax.random.key(0), SamplingConfig()))
    np.testing.assert_array_equal(got, logits.argmax(-1))


@pytest.mark.parametrize("kw", [dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_settings(kw):
    with pytest.raises(ValueError):
        SamplingConfig(**kw)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (1.3, 3, 1.0), (0.9, 5, 0.6)])
def test_per_row_sampling_distribution(temperature, top_k, top_p):
    """`jaxqlora.decode.sample_rows` (each row its own settings and key, as the serving engine
    decodes) against the same NumPy definitions; rows with temperature 0 in the same batch
    take the argmax."""
    from jaxqlora.decode import SlotState, sample_rows

    rng = np.random.default_rng(int(temperature * 10) + top_k + 7)
    logits = rng.normal(0, 1.5, 12)
    want = _np_probs(logits, temperature, top_k, top_p)
    n = N + 2
    temps = np.full((n,), temperature, np.float32)
    temps[:2] = 0.0  # two greedy rows in the batch
    slots = SlotState.init(n).replace(keys=jax.random.split(jax.random.key(top_k + 3), n), temperature=jnp.asarray(temps),
                                      top_k=jnp.full((n,), top_k, jnp.int32), top_p=jnp.full((n,), top_p, jnp.float32))
    draws, _ = jax.jit(sample_rows, static_argnums=2)(jnp.broadcast_to(jnp.asarray(logits, jnp.float32),
                                                                        (n, logits.size)), slots, False)
    draws = np.asarray(draws)
    assert list(draws[:2]) == [int(np.argmax(logits))] * 2
    got = np.bincount(draws[2:], minlength=logits.size) / N
    assert set(np.flatnonzero(got)) <= set(np.flatnonzero(want))
    tol = 4.5 * np.sqrt(want * (1 - want) / N) + 1e-9
    assert np.all(np.abs(got - want) <= tol), (got, want)
