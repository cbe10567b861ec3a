"""The embedded SmolLM2-135M-Instruct against transformers' GGUF loader (CPU)."""

import numpy as np
import pytest
import torch

import jax.numpy as jnp

from jaxqlora.errors import ContextLengthError
from jaxqlora.generate import generate

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_config_from_gguf_metadata(ours_f32):
    cfg = ours_f32[0].config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.rope_theta) == (49152, 8192, 100000.0)
    assert cfg.tie_word_embeddings and cfg.arch == "llama"


def test_logits_match_transformers(hf_embedded, ours_f32):
    """float32 logits against transformers in float32 and float64.

    The residual stream of this model reaches |h| ~ 2.3e4, where one float32 ulp is 2e-3,
    so two float32 implementations that sum in different orders differ by ~1e-4 on the
    logits (|logit| up to ~35). We assert < 2e-4 against transformers float32, and that
    our float32 error against a float64 run is no worse than transformers' own or within
    that same 2e-4 (transformers' own float32 error depends on its version: 6.5e-5 with
    5.24 on 2026-11-30, where ours is 1.4e-4, and the code of 2026-11-21 gives 1.5e-4).
    """
    hf, _ = hf_embedded
    model, _ = ours_f32
    ids = np.random.default_rng(0).integers(0, 49152, (2, 24))
    import copy

    with torch.no_grad():
        ref32 = hf(torch.tensor(ids)).logits.numpy()
        ref64 = copy.deepcopy(hf).double()(torch.tensor(ids)).logits.numpy()
    got = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    ours_err, hf_err = np.abs(got - ref64).max(), np.abs(ref32 - ref64).max()
    print(f"max|ours32-hf32|={np.abs(got - ref32).max():.3g} max|ours32-hf64|={ours_err:.3g} max|hf32-hf64|={hf_err:.3g}")
    assert np.abs(got - ref32).max() < 2e-4
    assert ours_err <= max(1.5 * hf_err + 1e-5, 2e-4)
    assert (got.argmax(-1) == ref64.argmax(-1)).all()


def _chat_ids(hf_tok, messages):
    return hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_greedy_generation_matches_transformers(hf_embedded, ours_f32):
    hf, hf_tok = hf_embedded
    model, tokenizer = ours_f32
    for messages in (QUESTION, [{"role": "user", "content": "Write a haiku about the sea."}]):
        prompt = list(_chat_ids(hf_tok, messages))
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                              pad_token_id=2, eos_token_id=2)[0, len(prompt):].tolist()
        got = generate(model, tokenizer, prompt, max_new_tokens=32, return_ids=True)
        assert got == ref, (got, ref)


def test_chat_answer_contains_paris(ours_f32):
    model, tokenizer = ours_f32
    answer = generate(model, tokenizer, QUESTION, max_new_tokens=32)
    assert "Paris" in answer, answer


def test_batched_prompts_equal_single_rows(ours_f32):
    """Left-padded batch of prompts of different lengths, greedy: each row as alone."""
    model, tokenizer = ours_f32
    prompts = [QUESTION, [{"role": "user", "content": "Name three colors."}], "The sun is a"]
    batch = generate(model, tokenizer, prompts, max_new_tokens=12, return_ids=True)
    for p, row in zip(prompts, batch):
        assert generate(model, tokenizer, p, max_new_tokens=12, return_ids=True) == row


def test_top_k_1_sampling_is_transformers_greedy(hf_embedded, ours_f32):
    """Sampling at temperature 0.9 restricted to the top-1 token must give transformers' greedy ids."""
    hf, _ = hf_embedded
    model, tokenizer = ours_f32
    prompt = tokenizer.encode("Once upon a time")
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                          pad_token_id=2)[0, len(prompt):].tolist()
    got = generate(model, tokenizer, prompt, max_new_tokens=8, temperature=0.9, top_k=1, seed=1, return_ids=True,
                   ignore_eos=True)
    assert got == ref


def test_prompt_longer_than_context(ours_f32):
    model, tokenizer = ours_f32
    with pytest.raises(ContextLengthError, match="8192"):
        generate(model, tokenizer, [5] * 8190, max_new_tokens=10)


def test_bf16_default_answers_paris(embedded_path):
    """The default dtype (bf16 parameters, float32 residual stream), jitted generation."""
    from jaxqlora.io import load_pretrained

    model, tokenizer = load_pretrained(embedded_path)
    assert "Paris" in generate(model, tokenizer, QUESTION, max_new_tokens=16)


def test_float16_cpu_default_logits_match_transformers(hf_embedded, embedded_path):
    """``jaxqlora generate``'s default on a CPU (float16 parameters and activations, float32
    residual stream and logits): logits within 2**-7 of the largest |logit| of transformers'
    float32 run (float16 rounds to 2**-11 relative; bf16, with 3 fewer bits, misses by ~1.1
    here) and the same argmax everywhere; on a CPU the CLI keeps the embedded Q4_1 / Q8_0 file
    quantized in float32 by default (generate and serve), float16 with --no-keep-quantized (serve:
    bfloat16), float32 with --keep-quantized; the float16 decode loop answers the question."""
    import jax

    from jaxqlora.cli import build_parser
    from jaxqlora.io import load_pretrained
    if jax.default_backend() == "cpu":
        for extra, want in (([], (True, "float32")), (["--no-keep-quantized"], (False, "float16")),
                            (["--keep-quantized"], (True, "float32"))):
            args = build_parser().parse_args(["generate", "--prompt", "hi", *extra])
            args.check(args)
            assert (args.keep_quantized, args.dtype) == want, extra
        for extra, want in (([], (True, "float32")), (["--no-keep-quantized"], (False, "bfloat16"))):
            args = build_parser().parse_args(["serve", *extra])
            args.check(args)
            assert (args.keep_quantized, args.dtype) == want, extra
    hf, _ = hf_embedded
    ids = np.random.default_rng(0).integers(0, 49152, (2, 24))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    model, tokenizer = load_pretrained(embedded_path, dtype=jnp.float16)
    got = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    assert got.dtype == np.float32
    assert np.abs(got - ref).max() < 2 ** -7 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert "Paris" in generate(model, tokenizer, QUESTION, max_new_tokens=16)  # the float16 cache and decode loop
