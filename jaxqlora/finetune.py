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

Every setting is checked when the `FinetuneConfig` is made (`FinetuneConfig.validate`), and
the data (columns, classes, split sizes) before the model is loaded; the output folder is
created only when training starts, so a run that fails earlier leaves none behind.

Kills and interrupts: checkpoints are written to a temporary folder and renamed into place
(orbax), the adapter folder is written aside and swapped in with one rename, and
``results.json`` / ``metrics.jsonl`` are rewritten atomically, so a process killed at any
moment (SIGKILL included) leaves the last complete checkpoint and adapter readable, and
``resume=True`` continues from that checkpoint to the weights an uninterrupted run gets
(bit for bit on CPU); ``metrics.jsonl`` is cut back to the resumed step. SIGINT (Ctrl-C)
or SIGTERM during training finishes the current step, saves a checkpoint and raises
`TrainingInterrupted`; a second one aborts at once (the checkpoints stay intact).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxqlora import data as D
from jaxqlora import sharding
from jaxqlora.checkpoint import kill_point
from jaxqlora.compile import DEFAULT_BUCKETS, buckets_up_to
from jaxqlora.errors import JaxQLoRAError
from jaxqlora.io.atomic import atomic_write_bytes, atomic_write_dir, atomic_write_json, remove_leftovers
from jaxqlora.lora import ALL_TARGETS, apply_lora
from jaxqlora.memory import (MemoryEstimateError, device_memory, format_memory, memory_estimate,  # noqa: F401
                             trainer_bytes)
from jaxqlora.train import (TRAINABLE, SequenceClassifier, Trainer, causal_lm_loss, classification_loss,
                            make_optimizer, nonfinite_steps)


@dataclasses.dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run (the CLI flags of ``jaxqlora finetune``).

    Attributes:
      model: HF folder or ``.gguf``; None = embedded SmolLM2-135M-Instruct.
      data: CSV/JSONL file; None = embedded Rotten Tomatoes.
      task: ``"classification"``, ``"causal-lm"`` (prompt/response) or ``"chat"`` (a
        ``messages`` column rendered with the chat template, loss on assistant turns only;
        without ``data``: the embedded set as chat, `jaxqlora.data.sentiment_as_chat`).
      text_column, label_column: classification columns.
      prompt_column, response_column: causal-LM columns (when ``data`` is given).
      messages_column: chat column (when ``data`` is given).
      packing: pack causal-LM / chat training examples into rows of ``max_seq_len``
        tokens (`jaxqlora.data.pack`; attention and positions per example); evaluation
        stays one example per row. Not for classification.
      pooling: classification pooling, ``"last"`` (default; transformers' choice, 87.3% test on
        Rotten Tomatoes after 2 epochs on an H200) or ``"mean"`` (the re-created trainer's; 85.7%).
      quantize: NF4 base weights (QLoRA); False keeps bf16.
      rank, alpha, dropout, targets, use_rslora: LoRA settings.
      epochs, max_steps: length (max_steps > 0 overrides epochs; the default 350 steps of 16
        fits the 2-core CPU budget; ``jaxqlora finetune --epochs 2`` sets max_steps to 0).
      group_by_length: batch rows of similar length together (fewer padded tokens).
      batch_size, grad_accum: micro-batch size and micro-batches per step.
      lr, schedule, warmup_ratio, weight_decay, max_grad_norm: optimizer settings.
      max_seq_len: longer texts are truncated; buckets: sequence-length buckets (<= max_seq_len used;
        None = `default_buckets` of the run's training rows: finer on a CPU for long runs).
      eval_batch_size: batch size of evaluation.
      output: output folder; resume: continue from its latest checkpoint; overwrite: delete an
        earlier run's adapter, checkpoints, metrics and results there when training starts
        (without ``resume`` or ``overwrite``, an output folder holding a run is refused).
      checkpoint_every: steps between checkpoints (0 = only at the end).
      log_every: steps between metric records.
      seed: data order, LoRA init, dropout.
      dtype: ``"bfloat16"`` or ``"float32"`` for the base weights and activations; None
        (default): `default_dtype`, float32 on a CPU and bfloat16 elsewhere.
      remat: rematerialisation of each decoder layer: False, True / ``"full"``, ``"dots"``
        (keep matmul outputs, recompute elementwise work), ``"offload"`` (matmul outputs
        kept in pinned host memory); see `jaxqlora.model.remat_policy`. None (default):
        chosen from the memory estimate (with ``check_memory``, one device): none when the
        run fits the device or its memory is unknown, else the first of ``"dots"`` and
        ``"full"`` whose estimate fits (logged; the same numbers, recomputed), else none
        (and `MemoryEstimateError` with the settings that fit).
      scan_layers: the decoder's layer loop in the train and eval steps (`CausalLM.scan_layers`):
        True ``jax.lax.scan`` (one layer in the compiled program), False unrolled (every
        layer written out: no per-layer slices and stacked residuals for XLA to copy, a
        compile time that grows with depth; for SmolLM2-135M at 16 x 64 on an H100 it measured
        0.67-0.69x the scan's speed with a 6-8x longer compile, benchmarks/RESULTS.md), None
        (default) `jaxqlora.model.default_scan` (the scan).
      precompile_only: compile every step for its buckets (warming the persistent cache)
        and return without loading weights or training (single device only).
      dry_run: compile (shapes only), estimate the device memory the run needs
        (`memory_estimate`) and return it without loading weights (single device only).
      check_memory: before loading the weights, refuse a run whose estimate exceeds the
        device's memory (`MemoryEstimateError`, with settings that would fit).
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
    messages_column: str = "messages"
    packing: bool = False
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
    buckets: tuple[int, ...] | None = None
    eval_batch_size: int = 64
    output: str = "runs/finetune"
    resume: bool = False
    overwrite: bool = False
    checkpoint_every: int = 0
    log_every: int = 10
    seed: int = 0
    dtype: str | None = None
    remat: bool | str | None = None
    scan_layers: bool | None = None
    precompile_only: bool = False
    dry_run: bool = False
    check_memory: bool = True
    mesh: str | None = None
    distributed: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self):
        if isinstance(self.targets, list):
            self.targets = tuple(self.targets)
        if isinstance(self.buckets, list):
            self.buckets = tuple(self.buckets)
        self.validate()

    def validate(self) -> "FinetuneConfig":
        """Check every field (types, ranges, choices, combinations); returns self.

        Called when the config is made and again by `finetune` (fields may have been
        changed since); touches no file.

        Raises:
          FinetuneConfigError: the first bad field, named with its value.
        """
        bad = FinetuneConfigError
        for name in ("quantize", "use_rslora", "group_by_length", "resume", "overwrite", "precompile_only",
                     "dry_run", "check_memory", "distributed", "packing"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise bad(name, getattr(self, name), "must be True or False")
        for name, low in (("rank", 1), ("batch_size", 1), ("grad_accum", 1), ("max_seq_len", 1),
                          ("eval_batch_size", 1), ("log_every", 1), ("max_steps", 0), ("checkpoint_every", 0),
                          ("seed", 0)):
            _check_int(self, name, low)
        for name, low, high, closed in (("alpha", 0.0, None, False), ("epochs", 0.0, None, False),
                                        ("lr", 0.0, None, False), ("dropout", 0.0, 1.0, None),
                                        ("warmup_ratio", 0.0, 1.0, True), ("weight_decay", 0.0, None, True),
                                        ("max_grad_norm", 0.0, None, False)):
            _check_float(self, name, low, high, closed)
        for name, choices in (("task", ("classification", "causal-lm", "chat")), ("pooling", ("last", "mean")),
                              ("schedule", ("cosine", "constant")), ("dtype", (None, "bfloat16", "float32"))):
            if getattr(self, name) not in choices:
                raise bad(name, getattr(self, name), f"must be one of {', '.join(map(repr, choices))}")
        if self.remat not in (None, False, True, "none", "full", "dots", "offload"):
            raise bad("remat", self.remat, "must be None, False, True, 'none', 'full', 'dots' or 'offload'")
        if self.scan_layers not in (None, False, True):
            raise bad("scan_layers", self.scan_layers, "must be None, True (scan) or False (unrolled)")
        for name in ("text_column", "label_column", "prompt_column", "response_column", "messages_column", "output"):
            value = getattr(self, name)
            if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
                raise bad(name, value, "must be a non-empty string")
        for name in ("model", "data"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (str, os.PathLike)) or not str(value).strip()):
                raise bad(name, value, "must be a path or None")
        if not isinstance(self.targets, tuple) or not self.targets or not set(self.targets) <= set(ALL_TARGETS):
            raise bad("targets", self.targets, f"must be a non-empty tuple of {', '.join(ALL_TARGETS)}")
        if self.buckets is not None and (not isinstance(self.buckets, tuple) or not self.buckets
                or not all(isinstance(b, numbers.Integral) and not isinstance(b, bool) and b >= 1
                           for b in self.buckets)):
            raise bad("buckets", self.buckets, "must be a non-empty tuple of positive integers")
        if self.task != "classification" and self.max_seq_len < 2:
            raise bad("max_seq_len", self.max_seq_len, f"must be at least 2 for task {self.task!r}")
        if self.packing and self.task == "classification":
            raise bad("packing", self.packing, "works for task 'causal-lm' and 'chat'; classification keeps one "
                      "example per row")
        if self.resume and self.overwrite:
            raise bad("overwrite", self.overwrite, "not allowed with resume=True")
        if self.mesh is not None:
            from jaxqlora.sharding import parse_mesh

            try:
                parse_mesh(self.mesh)
            except JaxQLoRAError as e:
                raise bad("mesh", self.mesh, str(e)) from None
        for name, low in (("num_processes", 1), ("process_id", 0)):
            if getattr(self, name) is not None:
                _check_int(self, name, low)
        if self.num_processes is not None and self.process_id is not None and self.process_id >= self.num_processes:
            raise bad("process_id", self.process_id, f"must be below num_processes {self.num_processes}")
        return self

    @property
    def param_dtype(self) -> jnp.dtype:
        """The dtype of the base weights and activations: ``dtype``, or `default_dtype` when
        it is None (read when the model is built, after ``jax.distributed`` has started)."""
        return jnp.dtype(self.dtype or default_dtype())


def default_dtype() -> str:
    """``"float32"`` on a CPU backend, ``"bfloat16"`` elsewhere: the default `FinetuneConfig.dtype`.

    On a CPU the default fine-tune runs about 1.6x faster in float32 (issue 26, 2-core AVX2
    CPU, together with `jaxqlora.lora.lora_b_product`; benchmarks/cpu_train.py and
    benchmarks/RESULTS.md): XLA:CPU multiplies bf16 x bf16 about 2x
    slower than float32 x float32 (no bf16 dot instructions there), and it writes each layer's
    bf16 activations into the scanned stack of saved residuals through a float32 copy of the
    whole stack (not in place), once per layer. NF4 weights dequantize to float32 instead of
    being rounded to bf16, and activations stay float32: the same computation with less rounding.
    """
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


CPU_BUCKETS = (16, 24, 32, 40, 48, 64) + tuple(b for b in DEFAULT_BUCKETS if b > 64)
"""The CPU's sequence-length buckets for long runs: every 8 tokens from 16 to 48, then
`jaxqlora.compile.DEFAULT_BUCKETS` from 64 on."""

FINE_BUCKET_ROWS = 1024
"""Rows a CPU run passes through the model (training: steps x batch x accumulation;
``jaxqlora eval``: the validation and test rows) from which `CPU_BUCKETS` pay."""


def default_buckets(rows: int = 0) -> tuple[int, ...]:
    """The default `FinetuneConfig.buckets` (tokens) of a run over ``rows`` rows (see
    `FINE_BUCKET_ROWS`): `CPU_BUCKETS` on a CPU backend from `FINE_BUCKET_ROWS`
    rows on, else `jaxqlora.compile.DEFAULT_BUCKETS`.

    A CPU step costs about its padded tokens (it is bound by matmul FLOPs), so short buckets
    pay for their extra compiles (two executables, about 5 s each on 2 cores) once a run is
    long enough. For ``jaxqlora finetune``'s defaults (350 steps of 16 embedded Rotten
    Tomatoes rows, median 24 tokens, truncated to 64) length-grouped batches fill 84% of their
    slots with tokens over the 350 steps against 61% with (32, 64). On a 2-core AVX2 CPU, in
    the same run, the 350 steps were estimated at 1,037 s against 1,403 s and the evaluation at
    188 s against 259 s; the whole command took 1,242-1,275 s against 1,492-1,563 s, compiling
    12 executables in 65-74 s (benchmarks/cpu_train.py, benchmarks/RESULTS.md, 2026-12-07). A
    GPU step of that size is bound by per-step costs, not tokens (benchmarks/RESULTS.md,
    packing), so there a bucket only adds a compile; so does it in a short run (a test, a
    smoke run).
    """
    fine = jax.default_backend() == "cpu" and rows >= FINE_BUCKET_ROWS
    return CPU_BUCKETS if fine else DEFAULT_BUCKETS


class FinetuneConfigError(JaxQLoRAError, ValueError):
    """A `FinetuneConfig` field has a bad value (``field`` names it), or the output folder
    cannot take the run."""

    def __init__(self, field: str, value, message: str):
        self.field, self.value = field, value
        super().__init__(f"{field}={value!r}: {message}")


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped `finetune` after a step; a checkpoint of that step was saved
    (``resume=True`` continues from it). ``step`` and ``total`` say how far the run got."""

    def __init__(self, message: str, step: int, total: int):
        super().__init__(message)
        self.step, self.total = step, total


def _check_int(cfg, name: str, low: int) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)):
        raise FinetuneConfigError(name, value, "must be an integer")
    if value < low:
        raise FinetuneConfigError(name, value, "must be a positive integer (>= 1)" if low == 1 else
                                  f"must be an integer >= {low}")


def _check_float(cfg, name: str, low: float, high: float | None, closed: bool | None) -> None:
    """``closed``: True [low, high], False (low, high] or (low, inf), None [low, high)."""
    value = getattr(cfg, name)
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)) or not math.isfinite(value):
        raise FinetuneConfigError(name, value, "must be a finite number")
    if closed is False and value <= low:
        raise FinetuneConfigError(name, value, f"must be > {low:g}")
    if closed is not False and value < low:
        raise FinetuneConfigError(name, value, f"must be >= {low:g}")
    if high is not None and (value > high or (closed is None and value >= high)):
        raise FinetuneConfigError(name, value, f"must be {'<' if closed is None else '<='} {high:g}")


#: What a run writes into its output folder (``overwrite`` removes exactly these).
RUN_ENTRIES = ("adapter", "checkpoints", "metrics.jsonl", "results.json")


def _earlier_run(out: Path) -> list[str]:
    """The `RUN_ENTRIES` present in ``out`` (an empty ``checkpoints`` folder does not count)."""
    if not out.is_dir():
        return []
    found = []
    for name in RUN_ENTRIES:
        path = out / name
        if name == "checkpoints":
            if path.is_dir() and any(path.iterdir()):
                found.append(name)
        elif path.exists():
            found.append(name)
    return found


def _check_output(cfg: FinetuneConfig) -> Path:
    """The output folder, refused when it is a file, or holds a run that neither ``resume``
    nor ``overwrite`` allows to touch."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise FinetuneConfigError("output", str(cfg.output), "exists and is not a folder")
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise FinetuneConfigError("output", str(cfg.output), f"{parent} is a file, not a folder")
            break
    if not (cfg.resume or cfg.overwrite or cfg.precompile_only or cfg.dry_run):
        earlier = _earlier_run(out)
        if earlier:
            raise FinetuneConfigError("output", str(cfg.output), f"already holds a run ({', '.join(earlier)}); "
                                      "resume=True continues it, overwrite=True replaces it")
    return out


def _buckets(cfg: FinetuneConfig) -> tuple[int, ...]:
    return buckets_up_to(cfg.max_seq_len, cfg.buckets or default_buckets())


def _train_buckets(cfg: FinetuneConfig) -> tuple[int, ...]:
    """The train step's buckets: packed rows are all padded to ``max_seq_len`` (one shape)."""
    return (cfg.max_seq_len,) if cfg.packing else _buckets(cfg)


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
    """Optimizer steps of one epoch: ``grad_accum`` micro-batches stacked (a last group of
    fewer micro-batches is dropped: its shape was never compiled)."""
    it = D.batches(enc, cfg.batch_size, _train_buckets(cfg), pad_id=pad_id, shuffle=True, seed=cfg.seed + epoch,
                   start=start * cfg.grad_accum, group_by_length=cfg.group_by_length)
    while True:
        micro = [b for _, b in zip(range(cfg.grad_accum), it)]
        if len(micro) < cfg.grad_accum:
            return
        yield _stack(micro)


def _epoch_batches(enc, cfg, pad_id, epoch, start) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """``(epoch, batch)`` from batch ``start`` of ``epoch`` on, epoch after epoch, without end.

    Raises:
      DataError: an epoch yields no batch (no training rows).
    """
    while True:
        empty = True
        for batch in _train_batches(enc, cfg, pad_id, epoch, start):
            empty = False
            yield epoch, batch
        if empty and start == 0:
            raise D.DataError("the training split yields no batches")
        epoch, start = epoch + 1, 0


def _progress(total: int, desc: str, **kw):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, **kw)


def evaluate(eval_batch, enc: D.Encoded, cfg: FinetuneConfig, pad_id: int,
             label_accuracy: bool = False, desc: str | None = None) -> dict[str, float]:
    """Accuracy (classification, ``cfg.task``), or loss / perplexity and, with
    ``label_accuracy``, label-word accuracy (causal LM).

    ``eval_batch(batch)`` returns the metric sums of one host batch (`Trainer.evaluate_batch`:
    ``correct`` / ``total``, and ``loss_sum`` / ``count`` for causal LM); one batch is kept in
    flight while the next is made, and a progress bar labelled ``desc`` (None: no bar)
    advances as batches finish on the device. Label-word accuracy is the share of rows
    whose greedy first response token is the real one.
    """
    n = D.num_batches(len(enc.ids), cfg.eval_batch_size)
    bar = _progress(n, desc or "evaluate", disable=desc is None or not sharding.is_primary(), leave=False)
    per_batch = []
    for b in D.batches(enc, cfg.eval_batch_size, _buckets(cfg), pad_id=pad_id, group_by_length=True):
        per_batch.append(eval_batch(b))
        if len(per_batch) > 1:
            jax.block_until_ready(per_batch[-2])  # the previous batch is done: the bar shows device progress
            bar.update(1)
    sums: dict[str, float] = {}
    for m in jax.device_get(per_batch):
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    bar.update(n - bar.n)
    bar.close()
    accuracy = sums.get("correct", 0.0) / max(sums.get("total", 0.0), 1)
    if cfg.task == "classification":
        return {"accuracy": accuracy}
    loss = sums["loss_sum"] / max(sums["count"], 1)
    out = {"loss": loss, "perplexity": math.exp(min(loss, 50))}
    if label_accuracy:
        out["label_accuracy"] = accuracy
    return out


def _load_data(cfg: FinetuneConfig):
    """The data set and its label words (no tokenizer, no model).

    Raises:
      DataError: unreadable file, a named column missing, fewer than two classes.
    """
    if cfg.task == "classification":
        return D.load_classification(cfg.data, cfg.text_column, cfg.label_column), None
    if cfg.task == "chat":
        if cfg.data is None:
            return D.sentiment_as_chat(D.load_classification(None)), ("Positive", "Negative")
        return D.load_chat(cfg.data, cfg.messages_column), None
    if cfg.data is None:
        return D.sentiment_as_prompts(D.load_classification(None)), (" positive", " negative")
    return D.load_prompt_response(cfg.data, cfg.prompt_column, cfg.response_column), None


def _check_splits(parts: dict, cfg: FinetuneConfig, training: bool) -> None:
    """A training split must fill one optimizer step; evaluation splits must not be empty.

    Raises:
      DataError: a split is too small (the message gives the sizes and what would fit).
    """
    where = cfg.data or "the embedded data set"
    rows = cfg.batch_size * cfg.grad_accum
    if training and len(parts["train"]) < rows:
        raise D.DataError(
            f"{where}: the training split has {len(parts['train'])} rows, fewer than one optimizer step "
            f"(batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} = {rows}); use a batch size of at most "
            f"{max(1, len(parts['train']) // cfg.grad_accum)} or more data")
    for name in ("validation", "test"):
        if len(parts[name]) == 0:
            raise D.DataError(f"{where}: the {name} split is empty ({sum(len(v) for v in parts.values())} rows)")


def _prepare(cfg: FinetuneConfig, training: bool = True, log=lambda *_: None):
    """Padding id, data splits, encoded splits, label words and the tokenizer (no weights
    loaded). The data is read and checked before the tokenizer is loaded; chat
    conversations longer than ``max_seq_len`` are counted and reported."""
    from jaxqlora.io import load_tokenizer

    t0 = time.perf_counter()
    ds, label_words = _load_data(cfg)
    parts = D.split(ds, seed=cfg.seed)
    _check_splits(parts, cfg, training)
    tokenizer = load_tokenizer(cfg.model)
    if tokenizer is None:
        raise D.DataError(f"{cfg.model}: the model folder has no tokenizer.json")
    if cfg.task == "chat" and tokenizer.chat_template is None:
        raise D.DataError(f"{cfg.model or 'the embedded model'}: the tokenizer has no chat template; task 'chat' "
                          "renders conversations with it")
    enc = {k: D.encode(tokenizer, v, cfg.max_seq_len) for k, v in parts.items()}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    log(f"data: train {len(parts['train'])}, validation {len(parts['validation'])}, test {len(parts['test'])} "
        f"rows, tokenized in {time.perf_counter() - t0:.1f} s")
    if cfg.task == "chat":
        for k, e in enc.items():
            if e.truncated:
                log(f"chat: {e.truncated} of {len(e.ids)} {k} conversations are longer than max_seq_len "
                    f"{cfg.max_seq_len} and were truncated ({e.truncated - e.cut_inside_turn} at a turn boundary, "
                    f"{e.cut_inside_turn} inside the first assistant turn)")
    return pad_id, parts, enc, label_words, tokenizer


def _build(lm, cfg: FinetuneConfig, num_labels: int):
    """NF4 (if ``cfg.quantize``), LoRA, remat, the layer loop and the classification head on a loaded (or
    abstract) `CausalLM`; returns ``(model, loss_fn, nf4_report)``."""
    report = None
    if cfg.quantize:
        from jaxqlora.quantize import quantize_model

        report = quantize_model(lm)
    apply_lora(lm, r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.targets,
               use_rslora=cfg.use_rslora, seed=cfg.seed)
    lm.remat = False if cfg.remat is None else cfg.remat
    lm.scan_layers = cfg.scan_layers
    if cfg.task == "classification":
        return SequenceClassifier(lm, num_labels, pooling=cfg.pooling, seed=cfg.seed), classification_loss, report
    return lm, causal_lm_loss, report


def _abstract_model(cfg: FinetuneConfig, num_labels: int):
    """The model `_build` makes, as shapes only (``nnx.eval_shape``: no weights)."""
    from jaxqlora.io import load_config
    from jaxqlora.model import CausalLM

    model_cfg = load_config(cfg.model)
    return nnx.eval_shape(lambda: _build(CausalLM(model_cfg, dtype=cfg.param_dtype, rngs=nnx.Rngs(0)), cfg,
                                         num_labels)[0])


def format_nf4_report(report: dict[str, float]) -> str:
    """`jaxqlora.quantize.quantize_model`'s report as one readable line."""
    return (f"NF4: quantized projections {report['linear_mb_before']:,.1f} MB -> {report['linear_mb_after']:,.1f} MB "
            f"({report['bits_per_param']:.3f} bits per weight); whole model {report['model_mb_before']:,.1f} MB -> "
            f"{report['model_mb_after']:,.1f} MB")


class _StopRequest:
    """While active (a context manager, main thread only), SIGINT and SIGTERM set
    ``signum`` instead of raising; a second signal restores the previous handlers and
    re-raises it (KeyboardInterrupt for SIGINT)."""

    def __init__(self, log):
        self.signum = None
        self._log = log
        self._old = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            self._restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        self._log(f"{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                  "(again to abort without saving)")

    def _restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        self._restore()


def _read_metrics(path: Path, up_to: int) -> bytes:
    """The complete records of ``metrics.jsonl`` with ``step <= up_to`` (a record cut by a kill
    and the records after the resumed checkpoint are dropped)."""
    keep = []
    if path.is_file():
        for line in path.read_bytes().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= up_to:
                keep.append(line + b"\n")
    return b"".join(keep)


def finetune(cfg: FinetuneConfig, log=print) -> dict[str, Any]:
    """Run a fine-tuning job; returns the results dict (also written to ``results.json``).

    Raises:
      FinetuneConfigError: a bad setting, or an output folder that holds a run without
        ``resume`` / ``overwrite`` (before anything is loaded).
      CheckpointError / DataError: bad model or data files (named in the message), a
        missing column, fewer than two classes, a split too small for the batch size
        (checked before the model is loaded).
      TrainingInterrupted: SIGINT/SIGTERM during training (a checkpoint was saved first).
    """
    t_start = time.perf_counter()
    cfg.validate()
    out = _check_output(cfg)
    mesh = _mesh(cfg)
    primary = sharding.is_primary()
    if not primary:
        log = lambda *_: None  # noqa: E731
    pad_id, parts, enc, label_words, tokenizer = _prepare(cfg, training=True, log=log)
    num_labels = len(parts["train"].label_names)
    n_train = len(parts["train"])
    train_enc = enc["train"]
    if cfg.packing:
        train_enc = D.pack(enc["train"], cfg.max_seq_len)
        real = sum(len(r) for r in train_enc.ids)
        log(f"packing: {n_train} training examples in {len(train_enc.ids)} rows of {cfg.max_seq_len} tokens "
            f"({real / (len(train_enc.ids) * cfg.max_seq_len):.1%} tokens, the rest padding)")
        if D.num_batches(len(train_enc.ids), cfg.batch_size) < cfg.grad_accum:
            raise D.DataError(f"{cfg.data or 'the embedded data set'}: packed, the training split fills "
                              f"{len(train_enc.ids)} rows, fewer than one optimizer step of {cfg.grad_accum} "
                              f"micro-batches of {cfg.batch_size} rows; lower batch_size or grad_accum")
    n_rows = len(train_enc.ids)  # rows of the training batches: examples, or packed rows
    per_epoch = max(1, D.num_batches(n_rows, cfg.batch_size) // cfg.grad_accum)
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, int(round(cfg.epochs * per_epoch)))
    if cfg.buckets is None:  # chosen once here: compiles, batches and evaluation all use these
        cfg = dataclasses.replace(cfg, buckets=default_buckets(total * cfg.batch_size * cfg.grad_accum))
    # Every optimizer setting (and the step count) lives in the optimizer state, so the
    # compiled steps (and their persistent-cache entries) do not depend on them.
    optimizer, _ = make_optimizer(cfg.lr, total_steps=total, warmup_ratio=cfg.warmup_ratio,
                                  schedule=cfg.schedule, weight_decay=cfg.weight_decay,
                                  max_grad_norm=cfg.max_grad_norm)

    loss_fn = classification_loss if cfg.task == "classification" else causal_lm_loss
    t0 = time.perf_counter()
    # Compile every step for its buckets (with a mesh: for its shardings, FSDP shards of the
    # frozen weights) over the abstract model, before the weights take any device memory.
    trainer = Trainer(_abstract_model(cfg, num_labels), loss_fn, optimizer, mesh=mesh)
    _precompile(trainer, cfg, log)
    compile_s = time.perf_counter() - t0
    log(f"precompiled {len(trainer.executables)} steps in {compile_s:.1f} s")
    if cfg.precompile_only:
        return {"precompiled": {str(k): t._asdict() for k, t in trainer.executables.seconds.items()},
                "compile_seconds": compile_s, "seconds": time.perf_counter() - t_start}
    if cfg.dry_run or cfg.check_memory:
        estimate = memory_estimate(trainer.executables, trainer_bytes(trainer))  # per device with a mesh
        capacity = device_memory()
        searched, suggestion = False, None  # the settings that fit are searched at most once
        if cfg.remat is None and mesh is None and capacity is not None and estimate["peak_bytes"] > capacity:
            # a dry run tries the remat policies alone; a run the whole list, whose answer is
            # also the suggestion of the error below when no remat policy fits
            suggestion = _fitting_settings(cfg, num_labels, optimizer, capacity, log, remat_only=cfg.dry_run)
            searched = True
            if suggestion is not None and set(suggestion["settings"]) == {"remat"}:
                # the fastest policy that fits: compile every bucket with it
                cfg = dataclasses.replace(cfg, remat=suggestion["settings"]["remat"])
                searched = False
                log(f"the run does not fit the device without remat ({estimate['peak_bytes'] / 1e9:.2f} GB "
                    f"of {capacity / 1e9:.2f} GB): remat {cfg.remat!r}")
                t0 = time.perf_counter()
                trainer = Trainer(_abstract_model(cfg, num_labels), loss_fn, optimizer, mesh=mesh)
                _precompile(trainer, cfg, log)
                compile_s += time.perf_counter() - t0
                estimate = memory_estimate(trainer.executables, trainer_bytes(trainer))
        log(format_memory(estimate, capacity))
        if cfg.dry_run:
            return {"memory": estimate, "capacity_bytes": capacity, "compile_seconds": compile_s,
                    "remat": cfg.remat or False,
                    "fits": capacity is None or estimate["peak_bytes"] <= capacity,
                    "seconds": time.perf_counter() - t_start}
        if capacity is not None and estimate["peak_bytes"] > capacity:
            if mesh is not None:  # no search over mesh settings: the estimate and the capacity
                raise MemoryEstimateError(estimate, capacity, None, what="run on each device")
            raise MemoryEstimateError(estimate, capacity, suggestion if searched else
                                      _fitting_settings(cfg, num_labels, optimizer, capacity, log))
    if cfg.remat is None:  # it fits (or the device's memory is unknown): no remat, recorded as such
        cfg = dataclasses.replace(cfg, remat=False)
    model = _load_model(cfg, num_labels, log)
    if mesh is not None:  # each device keeps its FSDP shard
        sharding.shard_model(model, mesh, trainable=TRAINABLE)
    try:
        trainer.attach(model)
    except ValueError:  # e.g. a bitsandbytes checkpoint with its own NF4 settings: compile for what was loaded
        log("the loaded model differs from its abstract twin; compiling again")
        trainer = Trainer(model, loss_fn, optimizer, mesh=mesh)
        _precompile(trainer, cfg, log)
    if mesh is not None:
        frozen = max(sharding.bytes_per_device(trainer.frozen).values())
        log(f"mesh {dict(mesh.shape)} over {jax.process_count()} process(es): frozen weights "
            f"{frozen / 1e6:.1f} MB per device")
    model = trainer.model  # the trained module (classifier or LM); ``lm`` is its decoder
    lm = model.lm if cfg.task == "classification" else model
    log(f"trainable parameters: {trainer.num_trainable:,}; {total} steps of {cfg.grad_accum} x {cfg.batch_size}")
    # The untrained baseline, before any checkpoint is restored.
    baseline = _baseline(parts, enc, cfg, trainer, pad_id, label_words is not None)

    # Training starts: only now is the output folder created (or an earlier run removed).
    from jaxqlora.checkpoint import TrainCheckpointer

    if primary:
        if cfg.overwrite:
            _remove_run(out)
        out.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out, RUN_ENTRIES)
    ckpt = TrainCheckpointer(out / "checkpoints")
    step, epoch, pos = 0, 0, 0
    if cfg.resume:
        restored = ckpt.restore_latest(trainer, log=log)
        if restored is not None:
            step, epoch, pos = restored
            log(f"resumed at step {step} (epoch {epoch}, batch {pos})")
        else:
            log("no checkpoint to resume from: starting at step 0")
    metrics_path = out / "metrics.jsonl"
    if primary:  # a resumed run keeps the records up to its checkpoint; a new run starts the file
        atomic_write_bytes(metrics_path, _read_metrics(metrics_path, step) if cfg.resume else b"")
    metrics_file = metrics_path.open("a") if primary else open(os.devnull, "w")

    bar = _progress(total, "finetune", initial=step, disable=not primary)
    put = jax.device_put if mesh is None else (lambda b: sharding.shard_batch(sharding.local_rows(b, mesh), mesh))

    def to_device(item):  # in the prefetch thread: host batch -> device, and its token count
        batch_epoch, batch = item
        return batch_epoch, int((batch["attention_mask"] > 0).sum()), put(batch)  # packed: segment ids

    # The host never waits on the device between log records: batches are made and put on
    # the device in a background thread while earlier steps run, and step metrics stay on
    # the device until a log step reads the latest ones back (one transfer).
    t_log, tokens = time.perf_counter(), 0
    with _StopRequest(log) as stop, metrics_file, \
            D.prefetch(_epoch_batches(train_enc, cfg, pad_id, epoch, pos), to_device, depth=2) as batches:
        while step < total and stop.signum is None:
            batch_epoch, batch_tokens, batch = next(batches)
            if batch_epoch != epoch:
                epoch, pos = batch_epoch, 0
            m = trainer.step(batch)
            step, pos = step + 1, pos + 1
            tokens += batch_tokens
            bar.update(1)
            if step % cfg.log_every == 0 or step == total or stop.signum is not None:
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
            kill_point("after_step", step)
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or stop.signum is not None:
                ckpt.save(trainer, step, epoch, pos)
        bar.close()
        ckpt.save(trainer, step, epoch, pos)
        ckpt.close()
        if stop.signum is not None:
            name = signal.Signals(stop.signum).name
            raise TrainingInterrupted(f"{name}: stopped at step {step} of {total}; checkpoint saved in "
                                      f"{out / 'checkpoints'}; resume=True (--resume) continues", step, total)
    train_s = time.perf_counter() - t_start

    rows_seen = epoch * n_rows + min(pos * cfg.grad_accum * cfg.batch_size, n_rows)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}
    if cfg.max_steps > 0:
        config["epochs"] = None  # max_steps set the length; epochs was not used
    config["dtype"] = cfg.param_dtype.name  # the dtype used, also when chosen by default
    config["buckets"] = list(_buckets(cfg))  # the buckets used (up to max_seq_len), also when chosen by default
    results = {"config": config, "steps": step, "epochs": round(rows_seen / n_rows, 4),
               "train_rows": n_train, "baseline": baseline, "nonfinite_skipped": nonfinite_steps(trainer.opt_state)}
    if cfg.packing:
        results["packed_rows"] = n_rows
    if cfg.task == "chat":
        results["truncated"] = {k: e.truncated for k, e in enc.items()}
    for split_name in ("validation", "test"):
        results[split_name] = evaluate(trainer.evaluate_batch, enc[split_name], cfg, pad_id, label_words is not None,
                                       desc=f"evaluate {split_name}")
    results["seconds"] = time.perf_counter() - t_start
    results["train_seconds"] = train_s

    trainer.sync_model()
    if not primary:
        return results
    from jaxqlora.io.peft import save_adapter

    head = {"score": model.score[...]} if cfg.task == "classification" else None

    def write_adapter(folder: Path) -> None:
        save_adapter(lm, folder, base_model_name_or_path=cfg.model or "HuggingFaceTB/SmolLM2-135M-Instruct",
                     task_type="SEQ_CLS" if head else "CAUSAL_LM", head=head, task=cfg.task,
                     chat_template=tokenizer.chat_template if cfg.task == "chat" else None)
        if head:
            atomic_write_json(folder / "jaxqlora_head.json",
                              {"pooling": cfg.pooling, "label_names": list(parts["train"].label_names)})

    atomic_write_dir(out / "adapter", write_adapter, before_swap=lambda: kill_point("adapter_writing"))
    kill_point("adapter_written")
    atomic_write_json(out / "results.json", results)
    return results


def _fitting_settings(cfg: FinetuneConfig, num_labels: int, optimizer, capacity: int, log,
                      remat_only: bool = False) -> dict | None:
    """The first of these that fits ``capacity``, compiled shapes-only (train and evaluation
    steps of the longest bucket): remat "dots", remat "full", then (with full remat) the
    micro-batch and the evaluation batch halved and gradient accumulation doubled (about the
    same rows per step) down to 1, then the longest bucket halved (at most 8 trials);
    ``remat_only``: the remat policies alone (what changes no number of the run)."""
    candidates = []
    if cfg.remat in (None, False, "none"):
        candidates.append({"remat": "dots"})
    if cfg.remat is not True and cfg.remat != "full":
        candidates.append({"remat": "full"})
    b, g, e = cfg.batch_size, cfg.grad_accum, cfg.eval_batch_size
    while b > 1 or e > 1:
        b, g, e = max(1, b // 2), g * 2 if b > 1 else g, max(1, e // 2)
        candidates.append({"remat": "full", "batch_size": b, "grad_accum": g, "eval_batch_size": e})
    t = cfg.max_seq_len
    while t > 32:
        t //= 2
        candidates.append({"remat": "full", "batch_size": b, "grad_accum": g, "eval_batch_size": e, "max_seq_len": t})
    if remat_only:
        candidates = [c for c in candidates if set(c) == {"remat"}]
    for settings in candidates[:8]:
        trial = dataclasses.replace(cfg, **settings)
        trainer = Trainer(_abstract_model(trial, num_labels), classification_loss if cfg.task == "classification"
                          else causal_lm_loss, optimizer)
        trainer.precompile(trial.batch_size, _buckets(trial)[-1:], grad_accum=trial.grad_accum,
                           eval_batch_size=trial.eval_batch_size, log=lambda *_: None,
                           desc=f"memory with {settings}")
        peak = memory_estimate(trainer.executables, trainer_bytes(trainer))["peak_bytes"]
        log(f"memory estimate with {settings}: {peak / 1e9:.3f} GB")
        if peak <= capacity:
            return {"settings": settings, "peak_bytes": peak}
    return None


def _remove_run(out: Path) -> None:
    """Delete an earlier run's `RUN_ENTRIES` in ``out`` (other files stay)."""
    for name in RUN_ENTRIES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _precompile(trainer: Trainer, cfg: FinetuneConfig, log) -> None:
    trainer.precompile(cfg.batch_size, _buckets(cfg), grad_accum=cfg.grad_accum, eval_batch_size=cfg.eval_batch_size,
                       log=log, desc="compile train/eval steps", train_seq_lens=_train_buckets(cfg))


def _load_model(cfg: FinetuneConfig, num_labels: int, log):
    """The checkpoint loaded and built (`_build`: quantized, LoRA, head) for training."""
    from jaxqlora.io import load_pretrained

    t0 = time.perf_counter()
    log(f"loading {cfg.model or 'the embedded SmolLM2-135M-Instruct'} ...")
    lm, _ = load_pretrained(cfg.model, dtype=cfg.param_dtype)
    t1 = time.perf_counter()
    log(f"loaded in {t1 - t0:.1f} s" + ("; quantizing to NF4 ..." if cfg.quantize else ""))
    model, _, report = _build(lm, cfg, num_labels)
    if report is not None:
        log(format_nf4_report(report) + f" in {time.perf_counter() - t1:.1f} s")
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
            for k, v in evaluate(trainer.evaluate_batch, enc["validation"], cfg, pad_id, label_accuracy,
                                 desc="evaluate untrained model").items()}


def evaluate_adapter(cfg: FinetuneConfig, adapter: str | Path, log=lambda *_: None,
                     keep_quantized: bool = False) -> dict[str, dict[str, float]]:
    """Evaluate a saved adapter (``jaxqlora eval``) on the validation and test splits of
    ``cfg``'s data (same fixed split as training); ``log`` receives progress lines (progress
    bars go to stderr). ``keep_quantized``: a GGUF base stays in its block formats
    (`jaxqlora.io.load_pretrained`; those projections are not re-quantized to NF4)."""
    from jaxqlora.io import load_pretrained
    from jaxqlora.io.peft import load_adapter

    cfg.validate()
    pad_id, parts, enc, label_words, _ = _prepare(cfg, training=False, log=log)
    if cfg.buckets is None:
        cfg = dataclasses.replace(cfg, buckets=default_buckets(len(enc["validation"].ids) + len(enc["test"].ids)))
    t0 = time.perf_counter()
    log(f"loading {cfg.model or 'the embedded SmolLM2-135M-Instruct'} ...")
    lm, _ = load_pretrained(cfg.model, dtype=cfg.param_dtype, keep_quantized=keep_quantized)
    if cfg.quantize:
        from jaxqlora.quantize import quantize_model

        report = quantize_model(lm)
        log(format_nf4_report(report))
    log(f"loaded in {time.perf_counter() - t0:.1f} s")
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
    evaluator.precompile(cfg.batch_size, _buckets(cfg), eval_batch_size=cfg.eval_batch_size, log=log,
                         desc="compile evaluation steps")
    return {s: evaluate(evaluator.evaluate_batch, enc[s], cfg, pad_id, label_words is not None, desc=f"evaluate {s}")
            for s in ("validation", "test")}
