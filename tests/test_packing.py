"""Packing: first-fit decreasing against a plain O(n * rows) FFD; a packed batch gives the loss
and LoRA gradients of the same examples run one per padded row (float32, tiny random Llama);
attention never crosses an example boundary (and would, without segment ids); a packed
chat fine-tune runs end to end and records its task for generation."""

import json

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxqlora.data import Encoded, batches, pack, pack_rows
from jaxqlora.io import load_pretrained
from jaxqlora.lora import apply_lora, lora_layers
from jaxqlora.train import Trainer, causal_lm_loss

transformers = pytest.importorskip("transformers")
from tiny_models import save_random_model  # noqa: E402

VOCAB = 90


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return save_random_model(tmp_path_factory, "base", vocab_size=VOCAB, hidden_size=48, intermediate_size=64,
                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)


@pytest.fixture(scope="module")
def lm(base_folder):
    model, _ = load_pretrained(base_folder, dtype=jnp.float32)
    apply_lora(model, r=4, alpha=8.0, dropout=0.0, seed=0)
    rng = np.random.default_rng(0)
    for layer in lora_layers(model).values():  # B != 0: the LoRA path changes the outputs and gets gradients
        layer.lora_B[...] = jnp.asarray(rng.normal(0, 0.2, layer.lora_B[...].shape), jnp.float32)
    return model


def ffd_reference(lengths, capacity):
    """First-fit decreasing, the textbook loop: longest first, into the first row with room."""
    rows, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r in range(len(rows)):
            if free[r] >= lengths[i]:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def test_pack_rows_is_first_fit_decreasing():
    rng = np.random.default_rng(0)
    for n, capacity in ((1, 8), (7, 16), (300, 64), (1000, 256)):
        lengths = rng.integers(1, capacity + 1, n).tolist()
        rows = pack_rows(lengths, capacity)
        assert rows == ffd_reference(lengths, capacity)
        assert sorted(i for r in rows for i in r) == list(range(n))
        assert max(sum(lengths[i] for i in r) for r in rows) <= capacity
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([3, 9], 8)


def _examples(seed, n, lo=3, hi=14):
    """Causal-LM examples: random ids, loss on a random suffix (as prompt/response)."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(1, VOCAB, rng.integers(lo, hi)).tolist() for _ in range(n)]
    return Encoded(ids, None, loss_start=np.array([rng.integers(0, len(r) - 1) for r in ids], np.int32))


def test_packed_step_loss_and_lora_grads_equal_padded(base_folder):
    """One optimizer step over 2 accumulated packed micro-batches vs all the examples in one
    padded batch, one per row: the same loss (the mean over the step's supervised tokens),
    token count and LoRA gradients (read back as the update of plain SGD with rate 1)."""
    import optax

    enc = _examples(1, 16)
    packed = pack(enc, 32)
    n = len(packed.ids)
    assert n < len(enc.ids)
    micro = list(batches(packed, -(-n // 2), (32,), pad_id=0))
    assert len(micro) == 2 and micro[0]["attention_mask"].max() > 1  # segment ids: several examples per row
    step_packed = {k: np.stack([m[k] for m in micro]) for k in micro[0]}
    step_padded = {k: v[None] for k, v in next(batches(enc, len(enc.ids), (16,), pad_id=0)).items()}
    out, grads = [], []
    for batch in (step_packed, step_padded):
        model, _ = load_pretrained(base_folder, dtype=jnp.float32)
        apply_lora(model, r=4, alpha=8.0, dropout=0.0, seed=0)
        rng = np.random.default_rng(0)
        for layer in lora_layers(model).values():  # B != 0: the LoRA path changes the outputs
            layer.lora_B[...] = jnp.asarray(rng.normal(0, 0.2, layer.lora_B[...].shape), jnp.float32)
        trainer = Trainer(model, causal_lm_loss, optax.sgd(1.0))
        before = jax.device_get(trainer.trainable)
        out.append(jax.device_get(trainer.step(batch)))
        grads.append(jax.tree_util.tree_map(lambda a, b: np.asarray(a) - np.asarray(b), before,
                                            jax.device_get(trainer.trainable)))
    assert out[0]["count"] == out[1]["count"] == sum(len(r) - 1 - s for r, s in zip(enc.ids, enc.loss_start))
    assert abs(out[0]["loss"] - out[1]["loss"]) <= 1e-5
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(grads[0]),
                                                          jax.tree_util.tree_leaves(grads[1])))
    assert diff <= 1e-5
    assert max(float(np.abs(a).max()) for a in jax.tree_util.tree_leaves(grads[1])) > 1e-3


def test_attention_never_crosses_an_example_boundary(lm):
    rng = np.random.default_rng(2)
    parts = [rng.integers(1, VOCAB, n).tolist() for n in (7, 5, 9)]
    changed = [parts[0], rng.integers(1, VOCAB, 5).tolist(), parts[2]]

    @jax.jit
    def run(ids, mask):
        return lm(ids, mask)

    def logits(rows, segmented=True):
        ids = np.array([sum(rows, [])], np.int32)
        seg = np.concatenate([np.full(len(r), k + 1 if segmented else 1, np.int32) for k, r in enumerate(rows)])
        return np.asarray(run(jnp.asarray(ids), jnp.asarray(seg[None])))[0]

    a, b = logits(parts), logits(changed)
    s0, s1 = 7, 12  # example 2 holds tokens 7..11
    assert np.abs(a[:s0] - b[:s0]).max() == 0 and np.abs(a[s1:] - b[s1:]).max() == 0
    assert np.abs(a[s0:s1] - b[s0:s1]).max() > 1e-3
    # each packed example computes what it computes alone (positions restart at 0): alone, right-padded
    for k, start in enumerate((0, 7, 12)):
        n = len(parts[k])
        ids = np.zeros((1, 21), np.int32)
        ids[0, :n] = parts[k]
        alone = np.asarray(run(jnp.asarray(ids), jnp.asarray((ids != 0).astype(np.int32))))[0, :n]
        np.testing.assert_allclose(a[start:start + n], alone, atol=1e-5)
    # the control: one segment for the whole row lets example 3 see example 2
    c, d = logits(parts, segmented=False), logits(changed, segmented=False)
    assert np.abs(c[s1:] - d[s1:]).max() > 1e-3


def test_packed_loss_mask_stays_inside_examples():
    enc = _examples(3, 20)
    packed = pack(enc, 40)
    b = next(batches(packed, len(packed.ids), (40,), pad_id=0))
    seg, lm_ = b["attention_mask"], b["loss_mask"]
    nxt = np.concatenate([seg[:, 1:], np.zeros_like(seg[:, :1])], axis=1)
    assert not (lm_.astype(bool) & (seg != nxt)).any()  # never predicts the next example's first token
    assert lm_.sum() == sum(len(r) - 1 - s for r, s in zip(enc.ids, enc.loss_start))


def test_packed_chat_finetune_records_its_task_and_generate_uses_the_template(base_folder, tmp_path, capsys):
    """A packed chat fine-tune end to end on the tiny model (chat template, word tokenizer);
    the adapter records task and template, and ``generate --messages`` prompts with that
    template: its text equals `generate` on the conversation rendered with it."""
    from tokenizers import AddedToken

    from jaxqlora.cli import main
    from jaxqlora.finetune import FinetuneConfig, finetune
    from jaxqlora.generate import stream
    from jaxqlora.io.peft import load_adapter, read_task
    from jaxqlora.tokenizer import Tokenizer
    from tiny_models import save_word_tokenizer

    words = save_word_tokenizer(base_folder, VOCAB - 1)  # the last id becomes the end-of-turn token
    tok = Tokenizer.from_pretrained(base_folder)
    tok.backend.add_special_tokens([AddedToken("<eot>", special=True, normalized=False)])
    template = ("{% for m in messages %}{{ {'system': 'w0', 'user': 'w1', 'assistant': 'w2'}[m['role']] + ' ' + "
                "m['content'] + ' <eot> ' }}{% endfor %}{% if add_generation_prompt %}{{ 'w2 ' }}{% endif %}")
    eot = tok.backend.token_to_id("<eot>")
    Tokenizer(tok.backend, bos_token_id=1, eos_token_id=eot, pad_token_id=0,
              chat_template=template).save_pretrained(base_folder)
    rng = np.random.default_rng(0)

    def say(n):
        return " ".join(rng.choice(words[3:], n))

    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": say(rng.integers(2, 9))},
                                                       {"role": "assistant", "content": say(rng.integers(1, 5))}]})
                              for _ in range(80)))
    out = tmp_path / "run"
    res = finetune(FinetuneConfig(model=str(base_folder), data=str(data), task="chat", packing=True, quantize=False,
                                  rank=2, alpha=4.0, max_steps=2, batch_size=2, max_seq_len=32, buckets=(32,),
                                  eval_batch_size=16, dtype="float32", output=str(out)), log=lambda *_: None)
    assert res["steps"] == 2 and res["packed_rows"] < res["train_rows"] and res["truncated"]["train"] == 0
    assert np.isfinite(res["validation"]["loss"])
    assert read_task(out / "adapter") == {"task": "chat", "chat_template": template}

    # generation prompts with the recorded template, even when the model folder's tokenizer has another one
    Tokenizer(tok.backend, bos_token_id=1, eos_token_id=eot, pad_token_id=0,
              chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}").save_pretrained(base_folder)
    conv = [{"role": "user", "content": "w5 w6 w7"}]
    assert main(["generate", "--model", str(base_folder), "--adapter", str(out / "adapter"), "--dtype", "float32",
                 "--messages", json.dumps(conv), "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    model, _ = load_pretrained(base_folder, dtype=jnp.float32)
    load_adapter(model, out / "adapter")
    want = "".join(stream(model, tok, tok.encode(tok.apply_chat_template(conv, chat_template=template),
                                                 add_special_tokens=False), max_new_tokens=4))
    assert printed == want + "\n"
