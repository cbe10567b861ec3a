"""The continuous-batching engine (`jaxqlora.serving.engine`) on a tiny random float32 Llama on
the CPU: more requests than slots, prompts longer than a prefill chunk, two prompts per prefill
call, all arriving at once,
give the tokens of plain greedy decoding computed without a cache (token for token), and the
engine compiles nothing after `Engine.start`; stop strings, stop ids, ``max_tokens``,
cancellation, a request's seed (same samples whatever shares the batch) and a full queue."""

import threading
import time

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from jaxqlora.compile import CompileCounter
from jaxqlora.config import ModelConfig
from jaxqlora.model import CausalLM
from jaxqlora.serving.engine import Engine, EngineConfig
from jaxqlora.serving.request import QueueFullError, Request, SamplingParams
from jaxqlora.tokenizer import Tokenizer
from tiny_models import save_word_tokenizer

VOCAB = 48


@pytest.fixture(scope="module")
def lm_tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    save_word_tokenizer(folder, VOCAB)
    cfg = ModelConfig(arch="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    lm = CausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    nnx.update(lm, jax.tree.map(lambda x: x * 25 if x.ndim >= 2 else x, nnx.state(lm, nnx.Param)))
    return lm, Tokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def engine(lm_tok):
    lm, tok = lm_tok
    eng = Engine(lm, tok, EngineConfig(max_batch=3, max_model_len=128, max_queue=16, prefill_chunk=32,
                                       prefill_buckets=(8,), prefill_batch=2), model_name="tiny")
    eng.start(log_fn=lambda m: None)
    yield eng
    eng.shutdown(5)


@jax.jit
def _forward(lm, ids):
    return lm(ids)


def _greedy_without_cache(lm, ids, n, eos, length=96):
    """Greedy decoding by full forwards without a cache (right-padded to ``length``: causal
    attention keeps the padding out of the real positions)."""
    ids, out = list(ids), []
    for _ in range(n):
        t = int(jnp.argmax(_forward(lm, jnp.asarray([ids + [0] * (length - len(ids))], jnp.int32))[0, len(ids) - 1]))
        out.append(t)
        if t in eos:
            break
        ids.append(t)
    return out


def _run(engine, requests, timeout=120):
    """Submit ``[(prompt ids, SamplingParams)]`` at once; returns each one's (ids, text, reason)."""
    results, done = {}, threading.Event()

    def callback(i):
        def f(o):
            ids, text = results.get(i, ([], ""))[:2]
            results[i] = (ids + o.token_ids, text + o.text, o.finish_reason if o.finished else None)
            if o.finished and sum(r[2] is not None for r in results.values()) == len(requests):
                done.set()
        return f

    for i, (ids, params) in enumerate(requests):
        engine.submit(Request([int(t) for t in ids], params, callback(i)))
    assert done.wait(timeout)
    return [results[i] for i in range(len(requests))]


def test_more_requests_than_slots_equal_greedy_without_cache_and_compile_nothing(engine, lm_tok):
    lm, tok = lm_tok
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, VOCAB, n) for n in (3, 9, 17, 40, 5, 70, 2, 33)]  # 40, 70: several chunks of 32
    with CompileCounter() as counter:
        got = _run(engine, [(p, SamplingParams(max_tokens=10, temperature=0.0)) for p in prompts])
    assert counter.count == 0, counter.names
    eos = set(tok.eos_token_ids)
    for p, (ids, text, reason) in zip(prompts, got):
        want = _greedy_without_cache(lm, p, 10, eos)
        assert ids == [t for t in want if t not in eos]
        assert reason == ("stop" if want[-1] in eos else "length")
        assert text == tok.decode(ids, skip_special_tokens=True)


def test_stop_string_stop_id_and_max_tokens(engine, lm_tok):
    lm, tok = lm_tok
    prompt = [5, 9, 11, 4]
    free = _greedy_without_cache(lm, prompt, 12, set())
    full = tok.decode(free, skip_special_tokens=True)
    word = tok.decode([free[3]], skip_special_tokens=True).strip()
    stop_id = free[2]
    (ids, text, reason), (ids2, _, reason2), (ids3, _, reason3) = _run(engine, [
        (prompt, SamplingParams(max_tokens=12, temperature=0.0, stop=(word,), ignore_eos=True)),
        (prompt, SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(stop_id,), ignore_eos=True)),
        (prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))])
    assert reason == "stop" and text == full[:full.index(word)] and word not in text
    assert reason2 == "stop" and ids2 == free[:free.index(stop_id)]
    assert reason3 == "length" and ids3 == free[:4]


def test_seed_gives_the_same_samples_whatever_shares_the_batch(engine):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=20, seed=123, ignore_eos=True)
    alone = _run(engine, [([7, 8, 9], params)])[0][0]
    crowd = _run(engine, [([7, 8, 9], params), ([3, 4], SamplingParams(max_tokens=12, temperature=1.0, seed=5)),
                          ([12, 30, 2, 6], SamplingParams(max_tokens=12, temperature=0.0))])[0][0]
    other = _run(engine, [([7, 8, 9], SamplingParams(max_tokens=12, temperature=1.0, top_k=20, seed=124,
                                                     ignore_eos=True))])[0][0]
    assert alone == crowd and len(alone) == 12 and alone != other


def test_cancel_frees_the_slot_and_a_full_queue_refuses(lm_tok):
    lm, tok = lm_tok
    eng = Engine(lm, tok, EngineConfig(max_batch=1, max_model_len=128, max_queue=1, prefill_chunk=16), model_name="t")
    eng.start(log_fn=lambda m: None)
    try:
        seen, finished = [], threading.Event()

        def cb(o):
            seen.append(o)
            if o.finished:
                finished.set()

        long = Request([5, 6], SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True), cb)
        eng.submit(long)
        while not seen:  # the long request holds the one slot
            time.sleep(0.01)
        eng.submit(Request([5], SamplingParams(max_tokens=1), lambda o: None))  # waits for the slot
        with pytest.raises(QueueFullError):
            eng.submit(Request([5], SamplingParams(max_tokens=1), lambda o: None))
        eng.cancel(long.request_id)
        assert finished.wait(30)
        assert seen[-1].finish_reason == "abort" and seen[-1].completion_tokens < 120
    finally:
        eng.shutdown(5)
