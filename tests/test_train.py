"""Training against PEFT + transformers on a tiny random Llama (float32, CPU): the
classification head, the loss and gradient of an accumulated batch, compile counts,
skipping non-finite steps, and resuming from a checkpoint."""

import json

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxqlora.config import ModelConfig
from jaxqlora.io import load_pretrained
from jaxqlora.io.peft import save_adapter
from jaxqlora.lora import apply_lora, lora_layers
from jaxqlora.model import CausalLM
from jaxqlora.train import (SequenceClassifier, Trainer, causal_lm_loss, causal_lm_metrics, classification_loss,
                            classification_metrics, make_optimizer, nonfinite_steps)

transformers = pytest.importorskip("transformers")
from tiny_models import save_random_model, save_word_tokenizer  # noqa: E402
peft = pytest.importorskip("peft")

VOCAB = 90


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return save_random_model(tmp_path_factory, "base", vocab_size=VOCAB, hidden_size=48, intermediate_size=64,
                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)


def _randomize_lora(model, seed):
    rng = np.random.default_rng(seed)
    for layer in lora_layers(model).values():
        layer.lora_B[...] = jnp.asarray(rng.normal(0, 0.2, layer.lora_B[...].shape), jnp.float32)


def _right_padded(lengths, length, seed):
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), length), np.int32)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1, VOCAB, n)
        mask[i, :n] = 1
    return ids, mask


def test_classifier_last_pooling_matches_peft_seq_cls(base_folder, tmp_path):
    """Our SEQ_CLS adapter (LoRA + score head) loaded by PEFT on LlamaForSequenceClassification
    gives our class logits."""
    lm, _ = load_pretrained(base_folder, dtype=jnp.float32)
    apply_lora(lm, r=4, alpha=8.0, targets=("q_proj", "v_proj"), seed=1)
    _randomize_lora(lm, 2)
    clf = SequenceClassifier(lm, 3, pooling="last", seed=3)
    save_adapter(lm, tmp_path, task_type="SEQ_CLS", head={"score": clf.score[...]})
    ids, mask = _right_padded([9, 4, 7], 9, seed=4)
    got = np.asarray(clf(jnp.asarray(ids), jnp.asarray(mask)))

    base = transformers.LlamaForSequenceClassification.from_pretrained(base_folder, num_labels=3, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        ref = pm(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
    assert np.abs(got - ref).max() < 1e-4

    labels = np.array([ref[0].argmax(), (ref[1].argmax() + 1) % 3, ref[2].argmax()], np.int32)  # 2 of 3 right
    weight = np.array([1.0, 1.0, 0.5], np.float32)
    m = classification_metrics(clf, {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
                                     "labels": jnp.asarray(labels), "weight": jnp.asarray(weight)})
    assert float(m["correct"]) == float(((ref.argmax(-1) == labels) * weight).sum()) == 1.5
    assert float(m["total"]) == 2.5


def _peft_causal_reference(base_folder, adapter_dir, ids, mask, loss_mask):
    """HF loss over the whole batch (labels -100 outside the response) and the LoRA grad norm."""
    base = transformers.AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(base, adapter_dir, is_trainable=True).train()
    labels = np.full(ids.shape, -100, np.int64)
    # our loss_mask[b, t] = 1: logits at t predict token t+1 -> HF label at t+1
    labels[:, 1:] = np.where(loss_mask[:, :-1] > 0, ids[:, 1:], -100)
    out = pm(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
             labels=torch.tensor(labels))
    out.loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for n, p in pm.named_parameters() if p.grad is not None))
    return float(out.loss), float(norm), out.logits.detach().numpy()


@pytest.mark.parametrize("remat,precompiled,in_place", [
    (False, False, False), (True, False, False), ("dots", True, False), ("offload", False, False),
    (("q_proj", "k_proj", "v_proj", "attention"), False, False), (False, False, True), ("dots", True, True)])
def test_accumulated_loss_and_grad_norm_match_whole_batch_in_peft(base_folder, tmp_path, remat, precompiled,
                                                                   in_place):
    """Two micro-batches with different response-token counts: our accumulated loss and
    gradient norm equal transformers' loss over the whole batch (normalised by the total
    token count, transformers issue 34191), without and with per-layer rematerialisation
    (full, matmul outputs kept, matmul outputs offloaded to host memory, attention side
    kept), jitted or precompiled, with each scan step given its layer's slices or reading
    the stacked parameters in place (``params_in_place``)."""
    lm, _ = load_pretrained(base_folder, dtype=jnp.float32)
    apply_lora(lm, r=4, alpha=8.0, seed=5)
    _randomize_lora(lm, 6)
    lm.remat = remat
    lm.params_in_place = in_place
    save_adapter(lm, tmp_path)
    ids, mask = _right_padded([12, 5, 10, 3], 12, seed=7)
    loss_mask = np.zeros(ids.shape, np.float32)
    for i, (start, n) in enumerate([(2, 12), (1, 5), (8, 10), (0, 3)]):
        loss_mask[i, start:n - 1] = 1  # response tokens of very different counts
    ref_loss, ref_norm, ref_logits = _peft_causal_reference(base_folder, tmp_path, ids, mask, loss_mask)

    opt, _ = make_optimizer(1e-3, total_steps=10)
    trainer = Trainer(lm, causal_lm_loss, opt)
    if precompiled:
        trainer.precompile(2, (12,), grad_accum=2, log=lambda *_: None)
    batch = {"input_ids": ids.reshape(2, 2, -1), "attention_mask": mask.reshape(2, 2, -1),
             "loss_mask": loss_mask.reshape(2, 2, -1), "weight": np.ones((2, 2), np.float32)}
    m = trainer.step({k: jnp.asarray(v) for k, v in batch.items()})
    assert abs(float(m["loss"]) - ref_loss) < 1e-5
    assert abs(float(m["grad_norm"]) - ref_norm) / ref_norm < 1e-4
    assert float(m["count"]) == loss_mask[:, :-1].sum()


def test_causal_lm_metrics_match_peft(base_folder, tmp_path):
    """Evaluation sums of a causal-LM batch: loss over the response tokens and greedy
    first-response-token accuracy equal those computed from PEFT's logits."""
    lm, _ = load_pretrained(base_folder, dtype=jnp.float32)
    apply_lora(lm, r=4, alpha=8.0, dropout=0.1, seed=5)  # dropout is off in evaluation
    _randomize_lora(lm, 6)
    save_adapter(lm, tmp_path)
    ids, mask = _right_padded([12, 5, 10, 3], 12, seed=8)
    loss_mask = np.zeros(ids.shape, np.float32)
    for i, (start, n) in enumerate([(2, 12), (1, 5), (8, 10), (0, 3)]):
        loss_mask[i, start:n - 1] = 1
    base = transformers.AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    first = loss_mask.argmax(1)
    with torch.no_grad():  # make rows 0 and 2 greedy-correct: logits at `first` see no later token
        greedy = pm(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()[np.arange(4), first].argmax(-1)
    for i in (0, 2):
        ids[i, first[i] + 1] = greedy[i]
    for i in (1, 3):
        ids[i, first[i] + 1] = (greedy[i] + 1) % VOCAB or 1
    labels = np.full(ids.shape, -100, np.int64)
    labels[:, 1:] = np.where(loss_mask[:, :-1] > 0, ids[:, 1:], -100)
    with torch.no_grad():
        out = pm(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                 labels=torch.tensor(labels))
    logits = out.logits.numpy()
    hits = logits[np.arange(4), first].argmax(-1) == ids[np.arange(4), first + 1]

    trainer = Trainer(lm, causal_lm_loss, None)  # evaluation only
    m = trainer.evaluate_batch({"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
                                "loss_mask": jnp.asarray(loss_mask), "weight": jnp.ones(4, jnp.float32)})
    assert abs(float(m["loss_sum"]) / float(m["count"]) - float(out.loss)) < 1e-5
    assert float(m["count"]) == loss_mask[:, :-1].sum()
    assert float(m["correct"]) == hits.sum() and float(m["total"]) == 4.0
    assert hits.tolist() == [True, False, True, False]
    assert trainer.metrics_fn is causal_lm_metrics


def _count_dots(jaxpr) -> int:
    """dot_general equations in a jaxpr and every jaxpr nested in its parameters."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "dot_general"
        for v in eqn.params.values():
            for j in v if isinstance(v, (tuple, list)) else (v,):
                j = getattr(j, "jaxpr", j)  # ClosedJaxpr -> Jaxpr
                if hasattr(j, "eqns"):
                    n += _count_dots(j)
    return n


def test_dots_remat_recomputes_no_matmul(base_folder):
    """With ``remat="dots"`` the gradient's program recomputes no projection: at most one
    more matmul per layer than without remat (the attention scores QK^T; flash attention's
    backward recomputes them too), and fewer than full remat (the whole forward again)."""
    lm, _ = load_pretrained(base_folder, dtype=jnp.float32)
    apply_lora(lm, r=4, alpha=8.0)
    ids = jnp.asarray(_right_padded([9, 6], 9, seed=1)[0])

    def dots(remat):
        lm.remat = remat
        graphdef, lora, rest = nnx.split(lm, nnx.LoRAParam, ...)

        def loss(lora):
            return jnp.sum(nnx.merge(graphdef, lora, rest, copy=True)(ids) ** 2)

        return _count_dots(jax.make_jaxpr(jax.grad(loss))(lora).jaxpr)

    none, saved, full = dots(False), dots("dots"), dots("full")
    assert none <= saved <= none + lm.config.num_hidden_layers < full, (none, saved, full)
    with pytest.raises(ValueError, match="remat must be"):
        dots("everything")


def test_compiles_once_per_bucket_and_skips_nonfinite(base_folder):
    lm, _ = load_pretrained(base_folder, dtype=jnp.float32)
    apply_lora(lm, r=2, alpha=4.0, targets=("q_proj", "v_proj"))
    opt, _ = make_optimizer(1e-3, total_steps=10)
    trainer = Trainer(SequenceClassifier(lm, 2), classification_loss, opt)

    def batch(length, seed, weight=1.0):
        ids, mask = _right_padded([length] * 4, length, seed)
        return {"input_ids": jnp.asarray(ids[None]), "attention_mask": jnp.asarray(mask[None]),
                "labels": jnp.asarray(np.array([[0, 1, 1, 0]], np.int32)),
                "weight": jnp.full((1, 4), weight, jnp.float32)}

    ref = optax.join_schedules([optax.linear_schedule(0.0, 1e-3, 1), optax.constant_schedule(1e-3)], [1])
    lrs = []
    for i in range(6):
        lrs.append(trainer.step(batch((16, 32)[i % 2], seed=i))["lr"])
    assert trainer._step._cache_size() == 2  # one executable per bucket, never again
    np.testing.assert_allclose(jax.device_get(lrs), [float(ref(i)) for i in range(6)], rtol=1e-6)

    before = jax.tree_util.tree_map(np.asarray, trainer.trainable)
    m = trainer.step(batch(16, seed=9, weight=float("nan")))  # NaN loss -> NaN gradients
    after = jax.tree_util.tree_map(np.asarray, trainer.trainable)
    assert nonfinite_steps(trainer.opt_state) == 1 and int(m["nonfinite_skipped"]) == 1
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, after)
    assert trainer._step._cache_size() == 2
    # the skipped step did not advance the schedule: the next step uses step 6's rate
    assert float(trainer.step(batch(16, seed=10))["lr"]) == pytest.approx(float(ref(6)), rel=1e-6)


# ------------------------------------------------ optimizer settings are state


def _optax_schedule(lr, total, warmup, kind):
    """What `make_optimizer` used before its settings moved into the state (optax's own)."""
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total, warmup + 1), end_value=0.0)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])


@pytest.mark.parametrize("kind", ["constant", "cosine"])
@pytest.mark.parametrize("lr,total,warmup_ratio", [(2e-4, 350, 0.03), (1e-3, 7, 0.0), (3e-4, 1154, 0.03),
                                                   (5e-5, 20, 0.95), (1e-2, 5, 1.0)])
def test_schedule_is_optax_schedule(kind, lr, total, warmup_ratio):
    """The learning rate the optimizer computes on device from its state equals optax's
    ``join_schedules(linear, constant)`` / ``warmup_cosine_decay_schedule`` at every step
    (to float32 rounding: a few ulp), past the end too; so does the returned schedule."""
    from jaxqlora.train import learning_rate

    opt, schedule = make_optimizer(lr, total_steps=total, warmup_ratio=warmup_ratio, schedule=kind)
    warmup = max(1, int(round(warmup_ratio * total)))
    steps = np.arange(total + 6)
    ref = np.asarray(jax.vmap(_optax_schedule(lr, total, warmup, kind))(jnp.asarray(steps, jnp.int32)))

    params = {"w": jnp.ones((3,), jnp.float32)}

    @jax.jit
    def rates(state):  # the rate each update uses, read from the state on device
        def one(state, _):
            return opt.update({"w": jnp.full((3,), 0.5, jnp.float32)}, state, params)[1], learning_rate(state)

        return jax.lax.scan(one, state, None, length=len(steps))[1]

    np.testing.assert_allclose(np.asarray(rates(opt.init(params))), ref, rtol=1e-6, atol=1e-7 * lr)
    np.testing.assert_allclose(np.asarray(jax.vmap(schedule)(jnp.asarray(steps))), ref, rtol=1e-6, atol=1e-7 * lr)
    assert ref.max() == pytest.approx(lr, rel=1e-6)


def test_optimizer_is_optax_adamw_chain():
    """Fifteen updates (one with a NaN gradient, skipped) of `make_optimizer` equal those
    of optax's own ``apply_if_finite(chain(clip_by_global_norm, adamw(schedule)))`` with
    the same non-default settings (rtol 1e-5: betas are float32 state, not Python
    constants, so 1 - b2 rounds differently)."""
    rng = np.random.default_rng(0)
    params = {"a": jnp.asarray(rng.normal(size=(4, 8)), jnp.float32), "b": jnp.asarray(rng.normal(size=3), jnp.float32)}
    for kind in ("constant", "cosine"):
        lr, total, wd, clip, b1, b2 = 1e-2, 12, 0.1, 0.5, 0.8, 0.99
        opt, _ = make_optimizer(lr, total_steps=total, warmup_ratio=0.25, schedule=kind, weight_decay=wd,
                                max_grad_norm=clip, b1=b1, b2=b2)
        ref = optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(clip), optax.adamw(
            _optax_schedule(lr, total, 3, kind), b1=b1, b2=b2, weight_decay=wd)), 20)
        p1 = p2 = params
        s1, s2 = opt.init(params), ref.init(params)
        for t in range(15):
            g = {k: jnp.asarray(rng.normal(size=v.shape) * (3.0 if t % 3 else 0.1), jnp.float32)
                 for k, v in params.items()}  # every third gradient below the clip norm
            if t == 5:
                g["a"] = g["a"].at[0, 0].set(jnp.nan)
            u1, s1 = jax.jit(opt.update)(g, s1, p1)
            u2, s2 = jax.jit(ref.update)(g, s2, p2)
            p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
            for k in params:
                np.testing.assert_allclose(np.asarray(p1[k]), np.asarray(p2[k]), rtol=1e-5, atol=1e-7)
        assert int(s1.total_notfinite) == int(s2.total_notfinite) == 1


def _lowered_steps(folder, seed, **opt_kw):
    """Lowered text of the train and eval steps of a Trainer over the abstract model
    (LoRA, dropout and head seeded with ``seed``)."""
    from jaxqlora.compile import abstract
    from jaxqlora.data import batch_spec
    from jaxqlora.io import load_config
    from jaxqlora.model import CausalLM

    cfg = load_config(folder)

    def build():
        lm = CausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(seed))
        apply_lora(lm, r=2, alpha=4.0, dropout=0.1, seed=seed)
        return SequenceClassifier(lm, 2, seed=seed)

    trainer = Trainer(nnx.eval_shape(build), classification_loss, make_optimizer(**opt_kw)[0])
    state = tuple(abstract(x) for x in (trainer.trainable, trainer.rng_state, trainer.opt_state, trainer.frozen))
    train = trainer._step.lower(*state, batch_spec(4, 16, causal_lm=False, accum=2)).as_text()
    evals = trainer._metrics.lower(state[0], state[1], state[3], batch_spec(8, 16, causal_lm=False)).as_text()
    return train, evals


def test_train_step_program_does_not_depend_on_settings_or_seed(base_folder):
    """Compile once, reuse always: two runs that differ in learning rate, step count,
    warmup, schedule kind, clipping, weight decay, betas and seed lower to the same
    programs (so they share compiled executables and persistent-cache entries)."""
    a = _lowered_steps(base_folder, 0, lr=2e-4, total_steps=350, warmup_ratio=0.03, schedule="cosine",
                       max_grad_norm=0.3, weight_decay=0.0, b1=0.9, b2=0.999)
    b = _lowered_steps(base_folder, 7, lr=1e-3, total_steps=20, warmup_ratio=0.5, schedule="constant",
                       max_grad_norm=1.0, weight_decay=0.01, b1=0.8, b2=0.99)
    assert a[0] == b[0]
    assert a[1] == b[1]


def test_resume_continues_the_same_loss_curve(base_folder, tmp_path):
    """A run stopped after a checkpoint and resumed gives the uninterrupted run's losses; a
    run with its layers unrolled (``scan_layers=False``, ``--scan-layers unroll``) gives the
    scanned run's losses (float32, 1e-5), recording the setting in results.json."""
    from jaxqlora.finetune import FinetuneConfig, finetune

    words = save_word_tokenizer(base_folder, VOCAB)  # the tiny model's vocabulary as words
    rng = np.random.default_rng(0)
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "\n".join(
        f"{' '.join(rng.choice(words, rng.integers(3, 20)))},{'ab'[i % 2]}" for i in range(200)) + "\n")

    def run(out, steps, resume=False, **kw):
        cfg = FinetuneConfig(model=str(base_folder), data=str(data), quantize=False, rank=2, alpha=4.0, dropout=0.1,
                             max_steps=steps, batch_size=8, max_seq_len=32, buckets=(16, 32), output=str(out), schedule="constant",
                             resume=resume, checkpoint_every=3, log_every=1, eval_batch_size=32, dtype="float32", **kw)
        res = finetune(cfg, log=lambda *_: None)
        assert res["config"]["scan_layers"] == kw.get("scan_layers")
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    full = run(tmp_path / "full", 6)
    run(tmp_path / "cut", 3)
    resumed = run(tmp_path / "cut", 6, resume=True)
    assert len(full) == 6 and len(resumed) == 6
    np.testing.assert_allclose(resumed[3:], full[3:], rtol=1e-5)
    unrolled = run(tmp_path / "unrolled", 6, scan_layers=False)
    np.testing.assert_allclose(unrolled, full, rtol=1e-5)


def test_eval_progress_and_a_run_that_fails_before_training(base_folder, tmp_path, capfd):
    """``evaluate_adapter`` labels its bars by what they do (never "precompile train/eval") and
    gives the accuracy finetune reported; a run whose model file is damaged stops before
    training and leaves no output folder."""
    import shutil

    from jaxqlora.errors import CheckpointError
    from jaxqlora.finetune import FinetuneConfig, evaluate_adapter, finetune

    words = save_word_tokenizer(base_folder, VOCAB)
    rng = np.random.default_rng(1)
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "\n".join(
        f"{' '.join(rng.choice(words, rng.integers(3, 20)))},{'ab'[i % 2]}" for i in range(120)) + "\n")
    kw = dict(data=str(data), quantize=False, rank=2, alpha=4.0, max_steps=2, batch_size=8, max_seq_len=32,
              buckets=(16, 32), eval_batch_size=8, dtype="float32")
    res = finetune(FinetuneConfig(model=str(base_folder), output=str(tmp_path / "run"), **kw), log=lambda *_: None)
    capfd.readouterr()
    got = evaluate_adapter(FinetuneConfig(model=str(base_folder), **kw), tmp_path / "run" / "adapter")
    err = capfd.readouterr().err
    assert "evaluate validation" in err and "evaluate test" in err and "compile evaluation steps" in err
    assert "precompile train/eval" not in err
    assert got["validation"] == res["validation"] and got["test"] == res["test"]

    damaged = tmp_path / "damaged"
    shutil.copytree(base_folder, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "never"
    with pytest.raises(CheckpointError):
        finetune(FinetuneConfig(model=str(damaged), output=str(out), **kw), log=lambda *_: None)
    assert not out.exists()

    # overwrite: a run failing before training leaves the earlier run; one that trains replaces it all
    run = tmp_path / "run"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError):
        finetune(FinetuneConfig(model=str(damaged), output=str(run), overwrite=True, **kw), log=lambda *_: None)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    again = dict(kw, max_steps=1)
    res = finetune(FinetuneConfig(model=str(base_folder), output=str(run), overwrite=True, **again), log=lambda *_: None)
    assert res["steps"] == 1 and json.loads((run / "results.json").read_text())["steps"] == 1
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1"]


def test_lora_b_product_and_its_gradients_match_float64():
    """`jaxqlora.lora.lora_b_product` (LoRA's second factor with its own backward) and its
    gradients under a cotangent g equal the float64 NumPy formulas: y = s h B^T, dh = s g B,
    dB = s g^T h, with h [2, 5, r] (leading axes are tokens)."""
    from jaxqlora.lora import lora_b_product

    rng = np.random.default_rng(0)
    h, b, g = (rng.normal(size=s).astype(np.float32) for s in ((2, 5, 4), (6, 4), (2, 5, 6)))
    with jax.default_matmul_precision("highest"):
        y, vjp = jax.vjp(lambda h, b: lora_b_product(h, b, 1.5), jnp.asarray(h), jnp.asarray(b))
        dh, db = vjp(jnp.asarray(g))
    h64, b64, g64 = (a.astype(np.float64) for a in (h, b, g))
    np.testing.assert_allclose(np.asarray(y), 1.5 * h64 @ b64.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dh), 1.5 * g64 @ b64, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(db), 1.5 * np.einsum("bto,btr->or", g64, h64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dropout", [False, True, "view"])
def test_lora_a_product_and_its_gradients_match_float64(dropout):
    """`jaxqlora.lora.lora_a_product` (LoRA's first factor with the dropout, its backward
    recomputing the dropped input from x and the mask) and its gradients under a cotangent g
    equal the float64 NumPy formulas: d = x * keep * s (x cast to float32 first, as PEFT
    casts to lora_A's dtype), h = d A^T, dA = g^T d, dx = (g A) * keep * s rounded to x's
    dtype; x bfloat16 [2, 5, 24] (leading axes are tokens), a random keep mask, s = 1/0.9.
    "view": the mask given as columns 9..32 of a wider layer mask (`jaxqlora.lora.KeepView`)."""
    from jaxqlora.lora import KeepView, lora_a_product

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 5, 24)), jnp.bfloat16)
    a, g = (rng.normal(size=s).astype(np.float32) for s in ((4, 24), (2, 5, 4)))
    wide = rng.random((2, 5, 40)) > 0.3
    keep = wide[..., 9:33] if dropout else None
    arg = KeepView(jnp.asarray(wide), 9, 24) if dropout == "view" else None if keep is None else jnp.asarray(keep)
    scale = 1 / 0.9 if dropout else 1.0
    with jax.default_matmul_precision("highest"):
        h, vjp = jax.vjp(lambda x, a: lora_a_product(x, arg, a, scale), x, jnp.asarray(a))
        dx, da = vjp(jnp.asarray(g))
    m = np.ones(x.shape) if keep is None else keep.astype(np.float64)
    d64 = np.asarray(x.astype(jnp.float32), np.float64) * m * np.float64(np.float32(scale))
    a64, g64 = a.astype(np.float64), g.astype(np.float64)
    assert dx.dtype == jnp.bfloat16 and h.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(h), d64 @ a64.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(da), np.einsum("btr,bti->ri", g64, d64), rtol=1e-5, atol=1e-5)
    want_dx = (g64 @ a64) * m * scale
    np.testing.assert_allclose(np.asarray(dx, np.float64), want_dx, rtol=2 ** -7, atol=1e-2)
    assert (np.asarray(dx, np.float64)[m == 0] == 0).all()


def test_keep_mask_keeps_each_element_at_one_minus_the_rate():
    """`jaxqlora.lora.keep_mask` (16 random bits per element): over 64 x 64 x 577 elements
    (an odd width: the last 32-bit word's high half unused) each column block is kept at
    1 - T / 2**16 with T = round(rate * 2**16) (within 0.006: more than 10 standard
    deviations of every fraction checked), for one rate and for per-column rates; the two 16-bit halves of a word
    (columns j and j + 289) and neighbouring columns agree at p^2 + (1 - p)^2, as
    independent draws do; another key gives another mask; rate 0 keeps everything."""
    from jaxqlora.lora import keep_mask

    seed = int(np.random.default_rng().integers(1 << 30))
    m = np.asarray(keep_mask(jax.random.key(seed), (64, 64, 577), 0.3))
    p = 1 - round(0.3 * 65536) / 65536
    assert m.shape == (64, 64, 577) and m.dtype == np.bool_
    assert abs(m.mean() - p) < 0.006
    agree = p * p + (1 - p) ** 2
    assert abs(np.mean(m[..., :288] == m[..., 289:]) - agree) < 0.006  # halves of one word
    assert abs(np.mean(m[..., :-1] == m[..., 1:]) - agree) < 0.006  # neighbours
    rates = np.repeat([0.05, 0.5, 0.9], [200, 200, 177])
    v = np.asarray(keep_mask(jax.random.key(seed + 1), (64, 64, 577), rates))
    for lo, hi, r in ((0, 200, 0.05), (200, 400, 0.5), (400, 577, 0.9)):
        assert abs(v[..., lo:hi].mean() - (1 - round(r * 65536) / 65536)) < 0.006, (r, v[..., lo:hi].mean())
    assert not np.array_equal(np.asarray(keep_mask(jax.random.key(seed + 2), (64, 64, 577), 0.3)), m)
    assert np.asarray(keep_mask(jax.random.key(seed), (8, 33), 0.0)).all()


def test_layer_keep_masks_draw_each_projection_at_its_rate(monkeypatch):
    """`jaxqlora.lora.layer_keep_masks`: one bool mask [B, T, W] for a decoder layer's LoRA
    projections (W = the sum of their in_features: 4 x 64 for q/k/v/o, 2 x 64 for gate/up,
    96 for down), each projection's columns kept with probability 1 - its rate: 0.3 for all
    but up_proj, set to 0.6 (binomial: 64 x 64 tokens x 64 columns, std 0.002 at most;
    within 0.01), its masks independent of the others (the share of columns where q_proj
    and k_proj agree is p^2 + (1 - p)^2 = 0.58, within 0.01), one mask drawn per call
    (a second call differs); in evaluation mode, or with one projection dropping, none.
    `LAYER_MASKS` on (the CPU default is off, `default_layer_masks`); off, none."""
    import jaxqlora.lora as lora_mod
    from jaxqlora.lora import ALL_TARGETS, apply_lora, layer_keep_masks, projection_owner

    monkeypatch.setattr(lora_mod, "LAYER_MASKS", True)
    cfg = ModelConfig(arch="llama", vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=16)
    model = CausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    apply_lora(model, r=2, alpha=4.0, dropout=0.3, seed=int(np.random.default_rng().integers(1 << 30)))
    layer = model.model.layers
    projection_owner(layer, "up_proj").up_proj.dropout.rate = 0.6
    views = layer_keep_masks(layer, (64, 64))
    assert list(views) == list(ALL_TARGETS)
    assert len({id(v.keep) for v in views.values()}) == 1 and views["q_proj"].keep.shape == (64, 64, 6 * 64 + 96)
    for name, v in views.items():
        m = np.asarray(v.value())
        assert m.shape == (64, 64, 96 if name == "down_proj" else 64)
        assert abs(m.mean() - (0.4 if name == "up_proj" else 0.7)) < 0.01, (name, m.mean())
    same = np.mean(np.asarray(views["q_proj"].value()) == np.asarray(views["k_proj"].value()))
    assert abs(same - 0.58) < 0.01
    again = layer_keep_masks(layer, (64, 64))
    assert not np.array_equal(np.asarray(again["q_proj"].keep), np.asarray(views["q_proj"].keep))
    monkeypatch.setattr(lora_mod, "LAYER_MASKS", False)
    assert layer_keep_masks(layer, (64, 64)) == {}
    monkeypatch.setattr(lora_mod, "LAYER_MASKS", True)
    model.eval()
    assert layer_keep_masks(layer, (64, 64)) == {}
    model.train()
    for name in ALL_TARGETS[1:]:
        getattr(projection_owner(layer, name), name).dropout.rate = 0.0
    assert layer_keep_masks(layer, (64, 64)) == {}


def test_lora_products_of_a_packed_row_match_float64():
    """`lora_a_product` then `lora_b_product` with both factors given as views of one packed
    row (`jaxqlora.lora.PackedFactor`, what the layer scan hands each step) against the
    float64 formulas: y = s_B (d A^T) B^T with d = x * keep * s; the row's gradient holds
    dA = g_h^T d and dB = s_B g^T h at the factors' places and zeros elsewhere
    (g_h = s_B g B); dx = (g_h A) * keep * s. Row: 7 unused values, A [4, 24], 5 unused, B
    [6, 4], 3 unused; x float32 [2, 5, 24]."""
    from jaxqlora.lora import PackedFactor, lora_a_product, lora_b_product

    rng = np.random.default_rng()
    a, b = rng.normal(size=(4, 24)), rng.normal(size=(6, 4))
    off_a, off_b, size = 7, 7 + 96 + 5, 7 + 96 + 5 + 24 + 3
    row = rng.normal(size=size)
    row[off_a:off_a + 96], row[off_b:off_b + 24] = a.ravel(), b.ravel()
    x = rng.normal(size=(2, 5, 24)).astype(np.float32)
    keep = rng.random((2, 5, 24)) > 0.3
    g = rng.normal(size=(2, 5, 6)).astype(np.float32)
    s, s_b = 1 / 0.9, 2.5

    def f(x, row):
        h = lora_a_product(x, jnp.asarray(keep), PackedFactor(row, off_a, (4, 24)), s)
        return lora_b_product(h, PackedFactor(row, off_b, (6, 4)), s_b)

    with jax.default_matmul_precision("highest"):
        y, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(row, jnp.float32))
        dx, drow = vjp(jnp.asarray(g))
    a, b = (np.float64(np.float32(v)) for v in (a, b))
    d = x.astype(np.float64) * keep * np.float64(np.float32(s))
    h = d @ a.T
    g64 = g.astype(np.float64)
    np.testing.assert_allclose(np.asarray(y), s_b * h @ b.T, rtol=1e-5, atol=1e-5)
    gh = s_b * g64 @ b
    want = np.zeros(size)
    want[off_a:off_a + 96] = np.einsum("btr,bti->ri", gh, d).ravel()
    want[off_b:off_b + 24] = s_b * np.einsum("bto,btr->or", g64, h).ravel()
    np.testing.assert_allclose(np.asarray(drow), want, rtol=1e-5, atol=1e-5)
    assert (np.asarray(drow)[want == 0] == 0).all()
    np.testing.assert_allclose(np.asarray(dx), (gh @ a) * keep * np.float32(s), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [4, 7, 64])
def test_chunked_cross_entropy_matches_float64(chunk):
    """The chunked masked cross-entropy sum and its gradients (hidden and head) equal the
    float64 NumPy formulas: loss = sum m (logsumexp(z) - z[t]), dz = m (softmax(z) - onehot(t)).
    3 rows x 7 positions: chunks of 4, 7 and 64 tokens are 1, 2 (the last one padded) and
    all 7 positions of the 3 rows."""
    from jaxqlora.train import chunked_cross_entropy

    rng = np.random.default_rng(chunk)
    h = rng.normal(size=(3, 7, 16)).astype(np.float32)
    w = rng.normal(size=(50, 16)).astype(np.float32) * 0.5
    t = rng.integers(0, 50, (3, 7))
    m = (rng.random((3, 7)) < 0.7) * rng.uniform(0.5, 2.0, (3, 7))
    with jax.default_matmul_precision("highest"):
        loss, (dh, dw) = jax.value_and_grad(chunked_cross_entropy, argnums=(0, 1))(
            jnp.asarray(h), jnp.asarray(w), jnp.asarray(t), jnp.asarray(m, jnp.float32), chunk)

    z = h.astype(np.float64) @ w.astype(np.float64).T
    zmax = z.max(-1, keepdims=True)
    lse = np.log(np.exp(z - zmax).sum(-1)) + zmax[..., 0]
    picked = np.take_along_axis(z, t[..., None], -1)[..., 0]
    ref = np.sum(m * (lse - picked))
    dz = np.exp(z - lse[..., None])
    np.put_along_axis(dz, t[..., None], np.take_along_axis(dz, t[..., None], -1) - 1.0, -1)
    dz *= m[..., None]
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dh), dz @ w.astype(np.float64), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), np.einsum("btv,bth->vh", dz, h.astype(np.float64)),
                               rtol=1e-4, atol=1e-5)


def test_remat_is_chosen_from_the_memory_estimate(base_folder, tmp_path, monkeypatch):
    """``remat=None`` (the default): a run that fits the device gets no remat; one that does
    not gets the first of "dots" and "full" whose own estimate (a dry run with that policy
    asked for) fits, compiled for every bucket; a device that not even "full" fits is refused
    with the settings that fit. The capacities come from the dry runs' estimates."""
    import jaxqlora.finetune as F
    from jaxqlora.finetune import FinetuneConfig, MemoryEstimateError, finetune

    words = save_word_tokenizer(base_folder, VOCAB)
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "\n".join(f"{words[i % 50]} {words[(3 * i) % 40]},{'ab'[i % 2]}"
                                                for i in range(200)) + "\n")
    kw = dict(model=str(base_folder), data=str(data), quantize=False, rank=2, alpha=4.0, batch_size=32, max_seq_len=32,
              buckets=(32,), eval_batch_size=16, dtype="float32", output=str(tmp_path / "out"), dry_run=True)
    peak = {r: finetune(FinetuneConfig(remat=r, **kw), log=lambda *_: None)["memory"]["peak_bytes"]
            for r in ("none", "dots", "full")}
    assert peak["full"] < peak["none"]  # so the capacity peak["full"] needs a policy

    def expected(capacity):  # the rule, from the dry runs' estimates alone
        if capacity is None or peak["none"] <= capacity:
            return False
        return next(r for r in ("dots", "full") if peak[r] <= capacity)

    assert expected(peak["full"]) in ("dots", "full")
    for capacity in (None, peak["none"], peak["dots"], peak["full"]):
        monkeypatch.setattr(F, "device_memory", lambda *a, c=capacity: c)
        res = finetune(FinetuneConfig(**kw), log=lambda *_: None)
        want = expected(capacity)
        assert res["remat"] == want, (capacity, peak)
        assert res["memory"]["peak_bytes"] == peak["none" if want is False else want]
    monkeypatch.setattr(F, "device_memory", lambda *a: peak["full"] - 1)
    kw["dry_run"] = False
    with pytest.raises(MemoryEstimateError):
        finetune(FinetuneConfig(**kw), log=lambda *_: None)
    assert not (tmp_path / "out").exists()


def test_dry_run_memory_estimate_and_refusal(base_folder, tmp_path, monkeypatch):
    """``dry_run``: the estimate's arguments of the train step are the bytes of the frozen
    weights, LoRA/head parameters, optimizer state, RNG and one batch (counted here from the
    arrays); nothing is loaded or written. A device smaller than the estimate is refused
    before the weights load, with the estimate, the capacity and settings that fit."""
    import jaxqlora.finetune as F
    import jaxqlora.io
    from jaxqlora.data import batch_spec
    from jaxqlora.finetune import FinetuneConfig, MemoryEstimateError, finetune

    words = save_word_tokenizer(base_folder, VOCAB)
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "\n".join(f"{words[i % 50]} {words[(3 * i) % 40]},{'ab'[i % 2]}"
                                                for i in range(200)) + "\n")
    kw = dict(model=str(base_folder), data=str(data), quantize=False, rank=2, alpha=4.0, batch_size=8, max_seq_len=32,
              buckets=(32,), eval_batch_size=16, dtype="float32", output=str(tmp_path / "out"))
    monkeypatch.setattr(jaxqlora.io, "load_pretrained", lambda *a, **k: pytest.fail("weights were loaded"))
    res = finetune(FinetuneConfig(dry_run=True, **kw), log=lambda *_: None)
    assert not (tmp_path / "out").exists()
    train = res["memory"]["per_step"]["train (1, 8, 32)"]

    cfg = FinetuneConfig(**kw)
    trainer = Trainer(F._abstract_model(cfg, 2), classification_loss, make_optimizer(total_steps=10)[0])
    leaves = jax.tree_util.tree_leaves((trainer.trainable, trainer.rng_state, trainer.opt_state, trainer.frozen))
    resident = sum(8 if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)  # a threefry key is 2 x uint32
                   else int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)
    batch = sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize
                for s in batch_spec(8, 32, causal_lm=False, accum=1).values())
    lm_head = VOCAB * 48 * 4  # float32 [vocab, hidden]: loaded, never read by a classifier's step
    assert abs(train["argument"] - batch - (resident - lm_head)) <= 8  # and a few unread scalars
    assert train["argument"] + train["unread"] == resident
    assert train["total"] == resident + train["output"] - train["alias"] + train["temp"] > resident + batch
    assert res["memory"]["peak_bytes"] == max(p["total"] for p in res["memory"]["per_step"].values())

    capacity = res["memory"]["peak_bytes"] - 1
    monkeypatch.setattr(F, "device_memory", lambda *a: capacity)
    with pytest.raises(MemoryEstimateError) as e:
        finetune(FinetuneConfig(remat="none", **kw), log=lambda *_: None)  # no remat asked for: refused
    assert f"the device has {capacity / 1e9:.2f} GB" in str(e.value)
    if e.value.suggestion is not None:
        assert e.value.suggestion["peak_bytes"] <= capacity and "remat" in str(e.value)
    assert not (tmp_path / "out").exists()
