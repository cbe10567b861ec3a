"""Speculative decoding (jaxqlora.speculative) on tiny random float32 Llamas, CPU.

- Greedy: speculative output equals plain greedy decoding token for token, for prompt lookup
  and a draft model (one as deep as the target with noisy weights, one shallower), k in
  {1, 2, 3, 5}, batched prompts of different lengths, with and without an EOS inside accepted
  runs; the target's KV cache after generation equals plain decoding's on the valid slots.
  (Most tests share one shape, 3 prompts in the 32-token bucket, 24 new tokens and k = 5, so
  that they share compiled programs: compilation is most of this file's time.)
- Fewer new tokens than drafts (1 and 2) and the embedded SmolLM2-135M-Instruct (float32,
  prompt lookup and the model drafting for itself) also give plain greedy output.
- One compiled loop: a second generation with other prompts (other acceptance lengths)
  compiles nothing; after `precompile_generate(speculative=...)` (from abstract models)
  generation compiles nothing, and another k is a `BucketError`.
- Rejection sampling: the first token after speculation has the target's distribution
  (chi-square at a fixed seed), for `accept` alone (draft model and point-mass drafts) and
  end to end through `generate`; with the residual correction switched off
  (``SpeculativeConfig(residual=False)``) the same test rejects.
- Prompt lookup drafts, cache compaction and rollback on hand-made inputs; configuration and
  CLI argument errors.
"""

import functools

import numpy as np
import pytest
from scipy import stats as sstats

import jax
import jax.numpy as jnp
from flax import nnx

from jaxqlora.compile import CompileCounter
from jaxqlora.config import ModelConfig
from jaxqlora.decode import prefill
from jaxqlora.generate import SamplingConfig, _left_pad, generate, sample_token
from jaxqlora.model import CausalLM, KVCache
from jaxqlora.speculative import (SpeculativeConfig, accept, compact_cache, ngram_drafts, rollback, sampling_logits,
                                  speculative_config, speculative_decode, target_probs)
from jaxqlora.tokenizer import Tokenizer

from tiny_models import save_word_tokenizer

VOCAB = 48
NEW, K = 24, 5  # the shared shape: new tokens per row and drafts per step


def _cfg(vocab=VOCAB, layers=2):
    return ModelConfig(arch="llama", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)


def _model(seed=0, vocab=VOCAB, layers=2, scale=25.0, noise_from=None, noise=0.0):
    """A random float32 model whose matrices are ``scale`` times the default init (logits with a
    spread of a few units, so argmax and sampling are not near-uniform); ``noise_from``: a copy
    of that model's weights plus ``noise`` relative Gaussian noise (a draft that agrees often)."""
    lm = CausalLM(_cfg(vocab, layers), dtype=jnp.float32, rngs=nnx.Rngs(seed))
    params = nnx.state(lm, nnx.Param)
    if noise_from is not None:
        src = nnx.state(noise_from, nnx.Param)
        leaves, tree = jax.tree.flatten(src)
        keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
        new = [x + noise * jnp.std(x) * jax.random.normal(kk, x.shape) if x.ndim >= 2 else x
               for x, kk in zip(leaves, keys)]
        nnx.update(lm, jax.tree.unflatten(tree, new))
    else:
        nnx.update(lm, jax.tree.map(lambda x: x * scale if x.ndim >= 2 else x, params))
    return lm


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    save_word_tokenizer(folder, VOCAB)
    return Tokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def target():
    return _model(0)


@pytest.fixture(scope="module")
def drafts(target):
    return {"noisy": _model(1, noise_from=target, noise=0.08), "shallow": _model(2, layers=1)}


def _prompts(seed=0, lengths=(5, 11, 17)):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:  # a repeated motif, so that prompt lookup finds matches
        motif = rng.integers(3, VOCAB, 4).tolist()
        out.append((motif * n)[:n - 2] + rng.integers(3, VOCAB, 2).tolist())
    return out


class _Tok:
    """Only the ids generation needs (prompts are token ids)."""

    pad_token_id = 0

    def __init__(self, eos):
        self.eos_token_id, self.eos_token_ids = eos, {eos}


# ------------------------------------------------------------------ greedy


@pytest.mark.parametrize("method,k", [("ngram", 1), ("ngram", K), ("noisy", 1), ("noisy", K), ("shallow", 3)])
def test_greedy_equals_plain(target, drafts, tok, method, k):
    """Other k: 3 with the shallow draft here and with prompt lookup in test_greedy_few_tokens, 2 with
    a draft model in test_precompiled_executables, 4 and 3 on the embedded model."""
    prompts = _prompts()
    plain = generate(target, tok, prompts, max_new_tokens=NEW, ignore_eos=True, return_ids=True)
    spec = SpeculativeConfig("ngram" if method == "ngram" else "draft", num_draft=k)
    got, st = generate(target, tok, prompts, max_new_tokens=NEW, ignore_eos=True, return_ids=True, speculative=spec,
                       draft_model=None if method == "ngram" else drafts[method], return_stats=True)
    assert got == plain
    assert st["new_tokens"] == 3 * NEW and st["drafted"] == k * st["steps"]
    assert sum(st["accept_lengths"]) == st["steps"] and st["accepted"] <= st["drafted"]
    if method != "shallow":  # drafts were accepted and rejected, rows got ahead of plain decoding
        assert st["accepted"] > 0 and st["accept_lengths"][0] > 0
        assert st["steps"] < 3 * (NEW - 1)


@pytest.mark.parametrize("n", [1, 2])
def test_greedy_few_tokens(target, tok, n):
    """Fewer new tokens than drafts: the first token alone, or one verification step cut short."""
    prompts = _prompts(6)
    plain = generate(target, tok, prompts, max_new_tokens=n, ignore_eos=True, return_ids=True)
    got = generate(target, tok, prompts, max_new_tokens=n, ignore_eos=True, return_ids=True,
                   speculative=SpeculativeConfig("ngram", num_draft=3))
    assert got == plain and all(len(r) == n for r in got)


def test_greedy_with_eos_inside_accepted_runs(target, drafts):
    prompts = _prompts(1)
    base = generate(target, _Tok(2), prompts, max_new_tokens=NEW, ignore_eos=True, return_ids=True)
    eos = base[1][9]  # a token that row 1 makes mid-way (and maybe others too)
    plain = generate(target, _Tok(eos), prompts, max_new_tokens=NEW, return_ids=True)
    assert any(len(r) < NEW for r in plain)
    for method, draft in (("ngram", None), ("draft", drafts["noisy"])):
        got = generate(target, _Tok(eos), prompts, max_new_tokens=NEW, return_ids=True,
                       speculative=SpeculativeConfig(method, num_draft=K), draft_model=draft)
        assert got == plain, method


@nnx.jit
def _forward(model, ids, cache=None):
    """``model(ids, cache=cache)``, compiled (eager calls compile every operation of the model)."""
    return model(ids, cache=cache)


_rollback, _compact = jax.jit(rollback), jax.jit(compact_cache)


@functools.partial(jax.jit, static_argnames="graphdef")
def _plain_step(graphdef, state, token, cache):
    model = nnx.merge(graphdef, state)
    hidden, cache = model.hidden_states(token[:, None], cache=cache)
    return jnp.argmax(model.logits(hidden[:, -1]), axis=-1).astype(jnp.int32), cache


def _plain_cache(model, ids, mask, n):
    """Plain greedy decoding, one cached forward per token: (tokens, the final cache)."""
    graphdef, state = nnx.split(model)
    tok, cache, _ = prefill(graphdef, state, ids, mask, np.int32(0), max_len=ids.shape[1] + n,
                             sampling=SamplingConfig())
    out = [tok]
    for _ in range(n - 1):
        tok, cache = _plain_step(graphdef, state, tok, cache)
        out.append(tok)
    return np.stack(out, 1), cache


def _valid_kv(cache: KVCache, row: int, count: int):
    slots = np.flatnonzero(np.asarray(cache.valid[row]))[:count]
    return np.asarray(cache.k[:, row, slots]), np.asarray(cache.v[:, row, slots]), len(slots)


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_cache_equals_plain_cache(target, drafts, method):
    prompts = _prompts(2, lengths=(4, 13, 9))
    n = NEW
    ids, mask = _left_pad(prompts, 0, 32)  # the bucket generate pads these prompts to
    want, plain = _plain_cache(target, ids, mask, n)
    res = speculative_decode(target, ids, mask, max_new_tokens=n, spec=SpeculativeConfig(method, num_draft=K),
                             draft_model=drafts["noisy"] if method == "draft" else None)
    np.testing.assert_array_equal(res.tokens, want)
    assert res.stats.accepted.sum() > 0
    for row, p in enumerate(prompts):
        count = len(p) + n - 1  # the prompt and every new token but the last
        k0, v0, c0 = _valid_kv(plain, row, count)
        k1, v1, c1 = _valid_kv(res.cache, row, count)
        assert c0 == c1 == count
        np.testing.assert_allclose(k1, k0, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(v1, v0, rtol=1e-4, atol=1e-5)


def test_one_compiled_loop(target, drafts, tok):
    spec = SpeculativeConfig("draft", num_draft=K)
    generate(target, tok, _prompts(3), max_new_tokens=NEW, ignore_eos=True, speculative=spec,
             draft_model=drafts["noisy"])
    with CompileCounter() as counter:
        _, st = generate(target, tok, _prompts(4), max_new_tokens=NEW, ignore_eos=True, speculative=spec,
                         draft_model=drafts["noisy"], return_stats=True)
    assert sum(v > 0 for v in st["accept_lengths"]) >= 2  # several acceptance lengths ran
    assert counter.count == 0


def test_precompiled_executables(target, drafts, tok):
    """`precompile_generate(speculative=...)` compiles prefills and loop from the shapes; generation
    then compiles nothing and still equals plain greedy decoding."""
    from jaxqlora.compile import BucketError
    from jaxqlora.generate import precompile_generate

    spec = SpeculativeConfig("draft", num_draft=2)
    prompts = _prompts(5)
    plain = generate(target, tok, prompts, max_new_tokens=NEW, ignore_eos=True, return_ids=True)
    ex = precompile_generate(nnx.eval_shape(lambda: _model(0)), tok, batch_size=3, prompt_lens=(32,),
                             max_new_tokens=NEW, ignore_eos=True, speculative=spec,
                             draft_model=nnx.eval_shape(lambda: _model(1)), log=lambda m: None)
    assert sorted(k.kind for k in ex) == ["draft_prefill", "prefill", "speculative"]
    with CompileCounter() as counter:
        got = generate(target, tok, prompts, max_new_tokens=NEW, ignore_eos=True, return_ids=True, executables=ex,
                       speculative=spec, draft_model=drafts["noisy"])
    assert counter.count == 0 and got == plain
    with pytest.raises(BucketError):  # another k was not compiled
        generate(target, tok, prompts, max_new_tokens=NEW, ignore_eos=True, executables=ex,
                 speculative=SpeculativeConfig("draft", num_draft=3), draft_model=drafts["noisy"])


def test_cli_arguments(tmp_path):
    from jaxqlora.cli import main

    assert main(["generate", "--prompt", "hi", "--speculative", "draft"]) == 2  # needs --draft-model
    assert main(["generate", "--prompt", "hi", "--draft-model", str(tmp_path)]) == 2  # needs --speculative draft
    assert main(["generate", "--prompt", "hi", "--speculative", "ngram", "--num-draft", "0"]) == 2


# ------------------------------------------------------------ rejection sampling

N = 60_000


def _chi2(counts, probs):
    """Pearson's chi-square p-value of ``counts`` against ``probs`` (bins expected < 5 pooled)."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return sstats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


_accept = jax.jit(accept, static_argnames=("sampling", "residual"))


@pytest.mark.parametrize("kind", ["draft", "point"])
def test_accept_first_token_has_target_distribution(kind):
    v, k = 12, 3
    rng = np.random.default_rng(0)
    p_logits = jnp.asarray(rng.normal(0, 1.5, (k + 1, v)), jnp.float32)
    q_logits = jnp.asarray(rng.normal(0, 1.5, (k, v)), jnp.float32)
    sampling = SamplingConfig(temperature=1.0)
    logits = jnp.broadcast_to(p_logits, (N, k + 1, v))
    if kind == "draft":
        q = jnp.broadcast_to(target_probs(q_logits, sampling), (N, k, v))
        d = jax.random.categorical(jax.random.key(1), jnp.log(q), axis=-1).astype(jnp.int32)
    else:  # prompt lookup: fixed drafts, the likeliest tokens of p (so acceptance is frequent)
        q = None
        d = jnp.broadcast_to(jnp.argmax(p_logits[:k], -1).astype(jnp.int32), (N, k))
    want = np.asarray(target_probs(p_logits[0], sampling))
    pvals = {}
    for residual in (True, False):
        n, nxt = _accept(logits, d, q, jax.random.key(2), sampling, residual=residual)
        first = np.where(np.asarray(n) >= 1, np.asarray(d[:, 0]), np.asarray(nxt))
        pvals[residual] = _chi2(np.bincount(first, minlength=v), want)
    assert pvals[True] > 1e-3, pvals
    assert pvals[False] < 1e-12, pvals


def _numpy_target(x, temperature, top_k=0, top_p=1.0):
    """float64 NumPy: softmax(x / T) restricted to the top-k tokens, then to the smallest
    prefix (by descending probability) whose mass before each kept token is < top_p."""
    z = x.astype(np.float64) / temperature
    keep = np.ones_like(z, bool)
    if top_k:
        kth = np.sort(z, axis=-1)[:, -top_k][:, None]
        keep &= z >= kth
    p = np.where(keep, np.exp(z - z.max(-1, keepdims=True)), 0.0)
    p /= p.sum(-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-p, axis=-1, kind="stable")
        sp = np.take_along_axis(p, order, -1)
        before = np.cumsum(sp, -1) - sp
        mask = np.zeros_like(keep)
        np.put_along_axis(mask, order, before < top_p, -1)
        p = np.where(mask, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    return p


def test_target_probs_against_numpy():
    """The distribution speculative sampling corrects towards (temperature, top-k, top-p)
    against float64 NumPy written from the definitions."""
    x = np.random.default_rng(3).normal(0, 2, (64, 30)).astype(np.float32)
    for t, k, p in ((0.8, 0, 1.0), (1.2, 5, 1.0), (1.0, 0, 0.7), (0.9, 8, 0.5)):
        got = np.asarray(jax.nn.softmax(sampling_logits(jnp.asarray(x), SamplingConfig(t, top_k=k, top_p=p)), -1))
        np.testing.assert_allclose(got, _numpy_target(x, t, k, p), atol=2e-6)


def test_generate_samples_from_target():
    """End to end: batch of identical prompts, 2 new tokens; the second (the first made by a
    verification step) against the target's p(. | prompt, first token)."""
    v, rows = 16, 6000
    tgt = _model(5, vocab=v)
    draft = _model(6, vocab=v, noise_from=tgt, noise=1.0)  # overlaps p without being it
    prompt = [3, 7, 5, 9, 4]
    tok = _Tok(2)
    # p(second | prompt, first = t) for every t: one forward without a cache over the v continuations
    logits = _forward(tgt, jnp.asarray([prompt + [t] for t in range(v)]))[:, -1]
    cond = np.asarray(target_probs(logits, SamplingConfig(1.0)), np.float64)
    pvals = {}
    for residual in (True, False):
        spec = SpeculativeConfig("draft", num_draft=2, residual=residual)
        out = generate(tgt, tok, [prompt] * rows, max_new_tokens=2, temperature=1.0, seed=7, ignore_eos=True,
                       return_ids=True, speculative=spec, draft_model=draft)
        out = np.asarray(out)
        expected = sum(cond[t] for t in out[:, 0])
        pvals[residual] = _chi2(np.bincount(out[:, 1], minlength=v), expected / rows)
    assert pvals[True] > 1e-3, pvals
    assert pvals[False] < 1e-6, pvals


# ------------------------------------------------------------------ pieces


def test_ngram_drafts():
    a, b, c, d, x, y = 10, 11, 12, 13, 20, 21
    hist = jnp.asarray([[a, b, c, d, a, b, 0, 0],  # "a b" occurred at 0: c d a b, then copies on (c)
                        [x, a, b, y, a, b, x, 0],  # longest match "b x"? no; "x" at 0 -> a b y a b
                        [x, y, 0, 0, 0, 0, 0, 0],  # no earlier occurrence: repeat the last token
                        [a, b, a, b, a, b, 0, 0]],  # most recent occurrence of "a b" (at 2): a b a b a
                       jnp.int32)
    got = ngram_drafts(hist, jnp.asarray([6, 7, 2, 6]), 5, max_ngram=3)
    np.testing.assert_array_equal(np.asarray(got), [[c, d, a, b, c], [a, b, y, a, b], [y] * 5, [a, b, a, b, a]])


def test_rollback_and_compaction(target):
    """Rows that keep different numbers of a step's tokens give the next
    token's logits of a forward without cache, before and after compaction."""
    cache = KVCache.init(target.config, 2, 12, jnp.float32)
    _, cache = _forward(target, jnp.asarray([[5, 6], [9, 10]]), cache=cache)
    start = cache.index
    _, cache = _forward(target, jnp.asarray([[7, 8, 30], [11, 31, 32]]), cache=cache)
    cache = _rollback(cache, start, jnp.asarray([[True, True, False], [True, False, False]]))
    np.testing.assert_array_equal(np.asarray(cache.index), [4, 3])  # each row after its last kept slot
    np.testing.assert_array_equal(np.asarray(cache.valid[:, :6]), [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    want = jnp.stack([_forward(target, jnp.asarray([[5, 6, 7, 8, 13]]))[0, -1],
                      _forward(target, jnp.asarray([[9, 10, 11, 12]]))[0, -1]])
    packed = _compact(cache)
    np.testing.assert_array_equal(np.asarray(packed.index), [4, 3])
    np.testing.assert_array_equal(np.asarray(packed.valid[:, :6]), [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    for c in (cache, packed):
        got, _ = _forward(target, jnp.asarray([[13], [12]]), cache=c)
        np.testing.assert_allclose(np.asarray(got[:, 0]), np.asarray(want), rtol=1e-4, atol=1e-4)
    holes = cache.replace(valid=cache.valid.at[0, 1].set(False))  # a hole inside row 0 moves its slots
    packed = _compact(holes)
    np.testing.assert_array_equal(np.asarray(packed.k[:, 0, :3]), np.asarray(holes.k[:, 0, jnp.asarray([0, 2, 3])]))
    np.testing.assert_array_equal(np.asarray(packed.index), [3, 3])


def test_config_errors(target):
    with pytest.raises(ValueError):
        SpeculativeConfig("beam")
    with pytest.raises(ValueError):
        SpeculativeConfig(num_draft=0)
    with pytest.raises(ValueError):
        speculative_config("draft")
    with pytest.raises(ValueError):
        speculative_config("ngram", draft_model=target)
    assert speculative_config(None) is None
    assert speculative_config(None, draft_model=target).method == "draft"
    other = _model(9, vocab=VOCAB + 4, layers=1)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(target, _Tok(2), [[3, 4, 5]], max_new_tokens=4, draft_model=other)


def test_embedded_model_greedy(ours_f32):
    """The embedded SmolLM2-135M-Instruct (float32; layers scanned to keep the CPU compile short):
    prompt lookup and the model as its own draft give plain greedy output, batched."""
    model, tok = ours_f32
    prompts = ["Repeat exactly: the cat sat on the mat. The cat sat on the mat. The cat sat",
               [{"role": "user", "content": "Count from 1 to 20."}]]
    model.scan_layers = True
    try:
        plain = generate(model, tok, prompts, max_new_tokens=16, return_ids=True)
        got, st = generate(model, tok, prompts, max_new_tokens=16, return_ids=True, return_stats=True,
                           speculative=SpeculativeConfig("ngram", num_draft=4))
        assert got == plain
        assert st["acceptance_rate"] > 0.2, st
        got, st = generate(model, tok, prompts, max_new_tokens=16, return_ids=True, return_stats=True,
                           speculative=SpeculativeConfig("draft", num_draft=3), draft_model=model)
        assert got == plain
        assert st["acceptance_rate"] > 0.9, st  # the target drafting for itself
    finally:
        model.scan_layers = None


def test_lora_dropout_adapter(tok):
    """A model with LoRA dropout (every finetune adapter has 0.05) decodes speculatively: the
    loop merges the model inside its body (it crashed with TraceContextError before), and
    dropout is off, so greedy output is plain greedy output."""
    from jaxqlora.lora import apply_lora

    lm = _model(0)
    apply_lora(lm, r=4, alpha=8.0, dropout=0.05)
    prompts = _prompts()
    plain = generate(lm, tok, prompts, max_new_tokens=NEW, ignore_eos=True, return_ids=True)
    got = generate(lm, tok, prompts, max_new_tokens=NEW, ignore_eos=True, return_ids=True,
                   speculative=SpeculativeConfig("ngram", num_draft=5))
    assert got == plain
