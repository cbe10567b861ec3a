"""The fine-tuning job: checkpoint -> model -> NF4 -> LoRA -> train -> evaluate -> adapter.

`finetune(FinetuneConfig(...))` is what ``jaxqlora finetune`` runs. With the defaults it
fine-tunes the embedded SmolLM2-135M-Instruct with QLoRA on the embedded Rotten Tomatoes
polarity set and reports validation and test accuracy.

Output folder: ``adapter/`` (PEFT format, with the ``score`` head for classification),
``metrics.jsonl`` (one record per logged step: step, loss, lr, grad_norm, tokens_per_s,
nonfinite_skipped), ``results.json`` and ``checkpoints/`` (orbax, full training state:
LoRA and head parameters, optimizer state, dropout RNG, step and data position).

Order of work: tokenizer and data, then every train and evaluation step is compiled for
its shape buckets over the abstract model (`Trainer.precompile`, cached on disk by
`jaxqlora.compile`), and only then are the weights loaded; the run itself compiles nothing
more. ``precompile_only`` stops after compiling (``jaxqlora finetune --precompile-only``
warms the cache).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxqlora import data as D
from jaxqlora import sharding
from jaxqlora.compile import buckets_up_to
from jaxqlora.io.atomic import atomic_write_json
from jaxqlora.lora import ALL_TARGETS, apply_lora
from jaxqlora.train import (SequenceClassifier, Trainer, causal_lm_loss, classification_loss, make_optimizer,
                            nonfinite_steps)


@dataclasses.dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run (the CLI flags of ``jaxqlora finetune``).

    Attributes:
      model: HF folder or ``.gguf``; None = embedded SmolLM2-135M-Instruct.
      data: CSV/JSONL file; None = embedded Rotten Tomatoes.
      task: ``"classification"`` or ``"causal-lm"``.
      text_column, label_column: classification columns.
      prompt_column, response_column: causal-LM columns (when ``data`` is given).
      pooling: classification pooling, ``"last"`` (default; transformers' choice, 87.3% test on
        Rotten Tomatoes after 2 epochs on an H200) or ``"mean"`` (the re-created trainer's; 85.7%).
      quantize: NF4 base weights (QLoRA); False keeps bf16.
      rank, alpha, dropout, targets, use_rslora: LoRA settings.
      epochs, max_steps: length (max_steps > 0 overrides epochs; the default 350 steps of 16
        fits the 2-core CPU budget; ``jaxqlora finetune --epochs 2`` sets max_steps to 0).
      group_by_length: batch rows of similar length together (fewer padded tokens).
      batch_size, grad_accum: micro-batch size and micro-batches per step.
      lr, schedule, warmup_ratio, weight_decay, max_grad_norm: optimizer settings.
      max_seq_len: longer texts are truncated; buckets: sequence-length buckets (<= max_seq_len used).
      eval_batch_size: batch size of evaluation.
      output: output folder; resume: continue from its latest checkpoint.
      checkpoint_every: steps between checkpoints (0 = only at the end).
      log_every: steps between metric records.
      seed: data order, LoRA init, dropout.
      dtype: ``"bfloat16"`` or ``"float32"`` for the base weights and activations.
      remat: rematerialisation of each decoder layer: False, True / ``"full"``, ``"dots"``
        (keep matmul outputs, recompute elementwise work); see `jaxqlora.model.remat_policy`.
      precompile_only: compile every step for its buckets (warming the persistent cache)
        and return without loading weights or training (single device only).
      mesh: ``"data=N,fsdp=M"`` (`jaxqlora.sharding.parse_mesh`): train on N x M devices,
        the batch split over all of them, frozen weights sharded over ``fsdp``. None: one
        device, or every device data-parallel with ``distributed``.
      distributed: call ``jax.distributed.initialize`` first (several processes/hosts);
        ``coordinator_address``, ``num_processes``, ``process_id`` default to the
        environment (`jaxqlora.sharding.initialize_distributed`). Every process reads
        the same data and keeps its rows; only process 0 writes logs, metrics,
        results and the adapter (all processes take part in checkpoints).
    """

    model: str | None = None
    data: str | None = None
    task: str = "classification"
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    pooling: str = "last"
    quantize: bool = True
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ALL_TARGETS
    use_rslora: bool = False
    epochs: float = 1.0
    max_steps: int = 350
    group_by_length: bool = True
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-4
    schedule: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    max_seq_len: int = 64
    buckets: tuple[int, ...] = D.DEFAULT_BUCKETS
    eval_batch_size: int = 64
    output: str = "runs/finetune"
    resume: bool = False
    checkpoint_every: int = 0
    log_every: int = 10
    seed: int = 0
    dtype: str = "bfloat16"
    remat: bool | str = False
    precompile_only: bool = False
    mesh: str | None = None
    distributed: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _buckets(cfg: FinetuneConfig) -> tuple[int, ...]:
    return buckets_up_to(cfg.max_seq_len, cfg.buckets)


def _stack(micro: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Micro-batches -> arrays with a leading accumulation axis; pads to the longest bucket."""
    length = max(m["input_ids"].shape[1] for m in micro)
    out = {}
    for k in micro[0]:
        parts = []
        for m in micro:
            a = m[k]
            if a.ndim == 2 and a.shape[1] < length:
                a = np.pad(a, ((0, 0), (0, length - a.shape[1])))
            parts.append(a)
        out[k] = np.stack(parts)
    return out


def _train_batches(enc, cfg, pad_id, epoch, start) -> Iterator[dict[str, np.ndarray]]:
    it = D.batches(enc, cfg.batch_size, _buckets(cfg), pad_id=pad_id, shuffle=True, seed=cfg.seed + epoch,
                   start=start * cfg.grad_accum, group_by_length=cfg.group_by_length)
    while True:
        micro = [b for _, b in zip(range(cfg.grad_accum), it)]
        if not micro:
            return
        yield _stack(micro)


def _epoch_batches(enc, cfg, pad_id, epoch, start) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """``(epoch, batch)`` from batch ``start`` of ``epoch`` on, epoch after epoch, without end.

    Raises:
      ValueError: an epoch yields no batch (no training rows).
    """
    while True:
        empty = True
        for batch in _train_batches(enc, cfg, pad_id, epoch, start):
            empty = False
            yield epoch, batch
        if empty and start == 0:
            raise ValueError("the training split yields no batches")
        epoch, start = epoch + 1, 0


def evaluate(eval_batch, enc: D.Encoded, cfg: FinetuneConfig, pad_id: int,
             label_accuracy: bool = False) -> dict[str, float]:
    """Accuracy (classification, ``cfg.task``), or loss / perplexity and, with
    ``label_accuracy``, label-word accuracy (causal LM).

    ``eval_batch(batch)`` returns the metric sums of one host batch (`Trainer.evaluate_batch`:
    ``correct`` / ``total``, and ``loss_sum`` / ``count`` for causal LM); they are read back
    once, after every batch was queued. Label-word accuracy is the share of rows whose
    greedy first response token is the real one.
    """
    per_batch = [eval_batch(b) for b in D.batches(enc, cfg.eval_batch_size, _buckets(cfg), pad_id=pad_id,
                                                   group_by_length=True)]
    sums: dict[str, float] = {}
    for m in jax.device_get(per_batch):
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    accuracy = sums.get("correct", 0.0) / max(sums.get("total", 0.0), 1)
    if cfg.task == "classification":
        return {"accuracy": accuracy}
    loss = sums["loss_sum"] / max(sums["count"], 1)
    out = {"loss": loss, "perplexity": math.exp(min(loss, 50))}
    if label_accuracy:
        out["label_accuracy"] = accuracy
    return out


def _prepare(cfg: FinetuneConfig):
    """Padding id, data splits, encoded splits and label words (no weights loaded)."""
    from jaxqlora.io import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    if tokenizer is None:
        raise ValueError(f"{cfg.model}: the model folder has no tokenizer.json")
    label_words = None
    if cfg.task == "classification":
        ds = D.load_classification(cfg.data, cfg.text_column, cfg.label_column)
    elif cfg.task == "causal-lm":
        if cfg.data is None:
            ds = D.sentiment_as_prompts(D.load_classification(None))
            label_words = (" positive", " negative")
        else:
            ds = D.load_prompt_response(cfg.data, cfg.prompt_column, cfg.response_column)
    else:
        raise ValueError(f"task must be 'classification' or 'causal-lm', got {cfg.task!r}")
    parts = D.split(ds, seed=cfg.seed)
    enc = {k: D.encode(tokenizer, v, cfg.max_seq_len) for k, v in parts.items()}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad_id, parts, enc, label_words


def _build(lm, cfg: FinetuneConfig, num_labels: int):
    """NF4 (if ``cfg.quantize``), LoRA, remat and the classification head on a loaded (or
    abstract) `CausalLM`; returns ``(model, loss_fn, nf4_report)``."""
    report = None
    if cfg.quantize:
        from jaxqlora.quantize import quantize_model

        report = quantize_model(lm)
    apply_lora(lm, r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.targets,
               use_rslora=cfg.use_rslora, seed=cfg.seed)
    lm.remat = cfg.remat
    if cfg.task == "classification":
        return SequenceClassifier(lm, num_labels, pooling=cfg.pooling, seed=cfg.seed), classification_loss, report
    return lm, causal_lm_loss, report


def _abstract_model(cfg: FinetuneConfig, num_labels: int):
    """The model `_build` makes, as shapes only (``nnx.eval_shape``: no weights)."""
    from jaxqlora.io import load_config
    from jaxqlora.model import CausalLM

    model_cfg = load_config(cfg.model)
    dtype = getattr(jnp, cfg.dtype)
    return nnx.eval_shape(lambda: _build(CausalLM(model_cfg, dtype=dtype, rngs=nnx.Rngs(0)), cfg, num_labels)[0])


def finetune(cfg: FinetuneConfig, log=print) -> dict[str, Any]:
    """Run a fine-tuning job; returns the results dict (also written to ``results.json``).

    Raises:
      CheckpointError / DataError: bad model or data files (named in the message).
      ValueError: bad settings.
    """
    t_start = time.perf_counter()
    mesh = _mesh(cfg)
    primary = sharding.is_primary()
    if not primary:
        log = lambda *_: None  # noqa: E731
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    pad_id, parts, enc, label_words = _prepare(cfg)
    log(f"data: train {len(parts['train'])}, validation {len(parts['validation'])}, test {len(parts['test'])}")
    num_labels = len(parts["train"].label_names)
    per_epoch = max(1, D.num_batches(len(parts["train"]), cfg.batch_size) // cfg.grad_accum)
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, int(round(cfg.epochs * per_epoch)))
    # Every optimizer setting (and the step count) lives in the optimizer state, so the
    # compiled steps (and their persistent-cache entries) do not depend on them.
    optimizer, _ = make_optimizer(cfg.lr, total_steps=total, warmup_ratio=cfg.warmup_ratio,
                                  schedule=cfg.schedule, weight_decay=cfg.weight_decay,
                                  max_grad_norm=cfg.max_grad_norm)

    loss_fn = classification_loss if cfg.task == "classification" else causal_lm_loss
    t0 = time.perf_counter()
    if mesh is None:
        # Compile every step for its buckets before the weights take any device memory.
        trainer = Trainer(_abstract_model(cfg, num_labels), loss_fn, optimizer)
        _precompile(trainer, cfg, log)
        compile_s = time.perf_counter() - t0
        log(f"precompiled {len(trainer.executables)} steps in {compile_s:.1f} s")
        if cfg.precompile_only:
            return {"precompiled": {str(k): t._asdict() for k, t in trainer.executables.seconds.items()},
                    "compile_seconds": compile_s, "seconds": time.perf_counter() - t_start}
        model = _load_model(cfg, num_labels, log)
        try:
            trainer.attach(model)
        except ValueError:  # e.g. a bitsandbytes checkpoint with its own NF4 settings: compile for what was loaded
            log("the loaded model differs from its abstract twin; compiling again")
            trainer = Trainer(model, loss_fn, optimizer)
            _precompile(trainer, cfg, log)
    else:
        # Sharded: the weights are placed on the mesh first (each device keeps its FSDP
        # shard), then every step is compiled for those shardings.
        if cfg.precompile_only:
            raise ValueError("precompile_only works on one device; drop mesh/distributed")
        trainer = Trainer(_load_model(cfg, num_labels, log), loss_fn, optimizer, mesh=mesh)
        frozen = max(sharding.bytes_per_device(trainer.frozen).values())
        log(f"mesh {dict(mesh.shape)} over {jax.process_count()} process(es): frozen weights "
            f"{frozen / 1e6:.1f} MB per device")
        _precompile(trainer, cfg, log)
        log(f"precompiled {len(trainer.executables)} steps in {time.perf_counter() - t0:.1f} s")
    model = trainer.model  # the trained module (classifier or LM); ``lm`` is its decoder
    lm = model.lm if cfg.task == "classification" else model
    log(f"trainable parameters: {trainer.num_trainable:,}; {total} steps of {cfg.grad_accum} x {cfg.batch_size}")

    from jaxqlora.checkpoint import TrainCheckpointer

    ckpt = TrainCheckpointer(out / "checkpoints")
    step, epoch, pos = 0, 0, 0
    if cfg.resume:
        restored = ckpt.restore_latest(trainer)
        if restored is not None:
            step, epoch, pos = restored
            log(f"resumed at step {step} (epoch {epoch}, batch {pos})")

    baseline = _baseline(parts, enc, cfg, trainer, pad_id, label_words is not None)
    metrics_file = (out / "metrics.jsonl").open("a") if primary else open(os.devnull, "w")
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=step, desc="finetune", dynamic_ncols=True, disable=not primary)
    put = jax.device_put if mesh is None else (lambda b: sharding.shard_batch(sharding.local_rows(b, mesh), mesh))

    def to_device(item):  # in the prefetch thread: host batch -> device, and its token count
        batch_epoch, batch = item
        return batch_epoch, int(batch["attention_mask"].sum()), put(batch)

    # The host never waits on the device between log records: batches are made and put on
    # the device in a background thread while earlier steps run, and step metrics stay on
    # the device until a log step reads the latest ones back (one transfer).
    t_log, tokens = time.perf_counter(), 0
    with D.prefetch(_epoch_batches(enc["train"], cfg, pad_id, epoch, pos), to_device, depth=2) as batches:
        while step < total:
            batch_epoch, batch_tokens, batch = next(batches)
            if batch_epoch != epoch:
                epoch, pos = batch_epoch, 0
            m = trainer.step(batch)
            step, pos = step + 1, pos + 1
            tokens += batch_tokens
            bar.update(1)
            if step % cfg.log_every == 0 or step == total:
                got = jax.device_get(m)
                loss = float(got["loss"])
                dt = time.perf_counter() - t_log
                rec = {"step": step, "loss": loss, "lr": float(got["lr"]), "grad_norm": float(got["grad_norm"]),
                       "tokens_per_s": tokens / dt, "nonfinite_skipped": int(got["nonfinite_skipped"]),
                       "epoch": epoch}
                metrics_file.write(json.dumps(rec) + "\n")
                metrics_file.flush()
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
                t_log, tokens = time.perf_counter(), 0
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                ckpt.save(trainer, step, epoch, pos)
    bar.close()
    metrics_file.close()
    ckpt.save(trainer, step, epoch, pos)
    ckpt.close()
    train_s = time.perf_counter() - t_start

    results = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()},
               "steps": step, "baseline": baseline,
               "nonfinite_skipped": nonfinite_steps(trainer.opt_state)}
    for split_name in ("validation", "test"):
        results[split_name] = evaluate(trainer.evaluate_batch, enc[split_name], cfg, pad_id, label_words is not None)
    results["seconds"] = time.perf_counter() - t_start
    results["train_seconds"] = train_s

    trainer.sync_model()
    if not primary:
        return results
    from jaxqlora.io.peft import save_adapter

    head = {"score": model.score[...]} if cfg.task == "classification" else None
    save_adapter(lm, out / "adapter", base_model_name_or_path=cfg.model or "HuggingFaceTB/SmolLM2-135M-Instruct",
                 task_type="SEQ_CLS" if head else "CAUSAL_LM", head=head)
    if head:
        atomic_write_json(out / "adapter" / "jaxqlora_head.json",
                          {"pooling": cfg.pooling, "label_names": list(parts["train"].label_names)})
    atomic_write_json(out / "results.json", results)
    return results


def _precompile(trainer: Trainer, cfg: FinetuneConfig, log) -> None:
    trainer.precompile(cfg.batch_size, _buckets(cfg), grad_accum=cfg.grad_accum, eval_batch_size=cfg.eval_batch_size,
                       log=log)


def _load_model(cfg: FinetuneConfig, num_labels: int, log):
    """The checkpoint loaded and built (`_build`: quantized, LoRA, head) for training."""
    from jaxqlora.io import load_pretrained

    lm, _ = load_pretrained(cfg.model, dtype=getattr(jnp, cfg.dtype))
    model, _, report = _build(lm, cfg, num_labels)
    if report is not None:
        log(f"NF4: {report}")
    return model


def _mesh(cfg: FinetuneConfig):
    """The run's mesh (None: one device); starts ``jax.distributed`` first when asked."""
    if cfg.distributed:
        sharding.initialize_distributed(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    if cfg.mesh is None and not cfg.distributed:
        return None
    mesh = sharding.make_mesh(**(sharding.parse_mesh(cfg.mesh) if cfg.mesh else {}))
    sharding.check_batch_size(cfg.batch_size, mesh)
    return mesh


def _baseline(parts, enc, cfg, trainer, pad_id, label_accuracy: bool) -> dict[str, float]:
    """Majority class (classification) or the untrained model's validation loss (causal LM)."""
    if cfg.task == "classification":
        counts = np.bincount(parts["train"].labels)
        majority = int(np.argmax(counts))
        return {"majority_class_test_accuracy": float(np.mean(parts["test"].labels == majority))}
    return {f"untrained_validation_{k}": v
            for k, v in evaluate(trainer.evaluate_batch, enc["validation"], cfg, pad_id, label_accuracy).items()}


def evaluate_adapter(cfg: FinetuneConfig, adapter: str | Path) -> dict[str, dict[str, float]]:
    """Evaluate a saved adapter (``jaxqlora eval``) on the validation and test splits of
    ``cfg``'s data (same fixed split as training)."""
    from jaxqlora.io import load_pretrained
    from jaxqlora.io.peft import load_adapter

    pad_id, parts, enc, label_words = _prepare(cfg)
    lm, _ = load_pretrained(cfg.model, dtype=getattr(jnp, cfg.dtype))
    if cfg.quantize:
        from jaxqlora.quantize import quantize_model

        quantize_model(lm)
    lm, extra = load_adapter(lm, adapter, return_extra=True)
    model, loss_fn = lm, causal_lm_loss
    if cfg.task == "classification":
        if "score" not in extra:
            raise ValueError(f"{adapter}: a classification adapter needs the 'score' head (modules_to_save)")
        head_file = Path(adapter) / "jaxqlora_head.json"
        pooling = json.loads(head_file.read_text())["pooling"] if head_file.is_file() else "last"
        model = SequenceClassifier(lm, extra["score"].shape[0], pooling=pooling)
        model.score[...] = jnp.asarray(extra["score"])
        loss_fn = classification_loss
    evaluator = Trainer(model, loss_fn, None)  # evaluation only
    evaluator.precompile(cfg.batch_size, _buckets(cfg), eval_batch_size=cfg.eval_batch_size)
    return {s: evaluate(evaluator.evaluate_batch, enc[s], cfg, pad_id, label_words is not None)
            for s in ("validation", "test")}
