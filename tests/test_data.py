"""Data: the embedded Rotten Tomatoes set, the fixed split, tokenised bucketed batches."""

import json

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from jaxqlora.compile import BucketError, bucket_for
from jaxqlora.data import (DataError, Encoded, batches, load_classification, load_prompt_response,
                           sentiment_as_prompts, split)


@pytest.fixture(scope="module")
def rt():
    return load_classification()


def test_embedded_counts_and_majority_baseline(rt):
    """Published facts: 7,403 fresh, 5,405 rotten; majority class 57.8% of the test split."""
    assert rt.label_names == ("fresh", "rotten")
    assert (np.sum(rt.labels == 0), np.sum(rt.labels == 1)) == (7403, 5405)
    test = split(rt)["test"]
    assert len(test) == 2562
    assert round(100 * np.mean(test.labels == 0), 1) == 57.8


def test_test_split_is_sklearn_recipe(rt):
    parts = split(rt)
    _, ref_test = train_test_split(np.array(rt.texts, dtype=object), test_size=0.2, random_state=0, stratify=rt.labels)
    assert parts["test"].texts == list(ref_test)
    assert len(parts["train"]) + len(parts["validation"]) + len(parts["test"]) == len(rt)
    all_rows = sorted(zip(rt.texts, rt.labels.tolist()))
    parted = sorted(r for p in parts.values() for r in zip(p.texts, p.labels.tolist()))
    assert parted == all_rows  # a partition of the rows, labels carried along


def test_batches_shapes_buckets_and_filler():
    enc = Encoded([[5] * n for n in (3, 40, 7, 70, 2)], np.array([0, 1, 0, 1, 1], np.int32))
    out = list(batches(enc, 2, (16, 64, 128), pad_id=0))
    assert [b["input_ids"].shape for b in out] == [(2, 64), (2, 128), (2, 16)]
    np.testing.assert_array_equal(out[0]["attention_mask"].sum(1), [3, 40])
    np.testing.assert_array_equal(out[2]["weight"], [1.0, 0.0])  # filler row of the last batch
    np.testing.assert_array_equal(out[1]["labels"], [0, 1])
    assert (out[0]["input_ids"][0, 3:] == 0).all()
    with pytest.raises(BucketError, match="200 tokens exceeds the largest bucket"):
        bucket_for(200, (16, 64, 128))
    assert bucket_for(200, (16, 64, 128), allow_new=True) == 200  # a new bucket only by explicit choice


def test_causal_lm_loss_mask_covers_response_only(tmp_path):
    class Tok:
        eos_token_id = 99

        def encode(self, text, add_special_tokens=True):
            return [len(w) for w in text.split()]

    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": "a bb ccc", "response": "dddd ee"}) for _ in range(2)))
    from jaxqlora.data import encode

    enc = encode(Tok(), load_prompt_response(f), max_seq_len=32)
    assert enc.ids[0] == [1, 2, 3, 4, 2, 99]
    b = next(batches(enc, 2, (8,), pad_id=0))
    # logits at positions 2, 3, 4 predict 4, 2, 99 (the response and EOS)
    np.testing.assert_array_equal(b["loss_mask"][0], [0, 0, 1, 1, 1, 0, 0, 0])


def test_sentiment_prompts(rt):
    rows = [int(np.argmax(rt.labels == 0)), int(np.argmax(rt.labels == 1))]  # one fresh, one rotten
    ds = sentiment_as_prompts(rt.subset(rows))
    assert ds.texts == [f"Review: {rt.texts[i]}\nSentiment:" for i in rows]
    assert ds.responses == [" positive", " negative"]  # fresh = positive
    np.testing.assert_array_equal(ds.labels, [0, 1])


def test_data_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_classification(tmp_path / "none.csv")
    f = tmp_path / "d.csv"
    f.write_text("sentence,label\nhello,1\nbye,0\n")
    with pytest.raises(DataError, match="'text' not found"):
        load_classification(f)
    ds = load_classification(f, text_column="sentence")
    assert ds.label_names == ("0", "1") and list(ds.labels) == [1, 0]
    g = tmp_path / "bad.jsonl"
    g.write_text('{"text": "a", "label": 1}\n{oops\n')
    with pytest.raises(DataError, match="line 2"):
        load_classification(g)


def test_group_by_length_is_a_seeded_permutation_of_similar_lengths():
    from jaxqlora.data import batch_order

    lengths = np.random.default_rng(0).integers(1, 200, 1000)
    a = batch_order(lengths, 16, shuffle=True, seed=3, group_by_length=True)
    b = batch_order(lengths, 16, shuffle=True, seed=3, group_by_length=True)
    np.testing.assert_array_equal(np.sort(a), np.arange(1000))  # every row once
    np.testing.assert_array_equal(a, b)  # resumable: same seed, same order
    spread = np.mean([np.ptp(lengths[a[i:i + 16]]) for i in range(0, 992, 16)])
    plain = batch_order(lengths, 16, shuffle=True, seed=3)
    spread_plain = np.mean([np.ptp(lengths[plain[i:i + 16]]) for i in range(0, 992, 16)])
    assert spread < 0.25 * spread_plain
    np.testing.assert_array_equal(lengths[batch_order(lengths, 16, shuffle=False, group_by_length=True)],
                                  np.sort(lengths, kind="stable"))


@pytest.mark.parametrize("causal_lm", [False, True])
def test_batch_spec_describes_what_batches_yields(causal_lm):
    """`Trainer.precompile` compiles from `batch_spec`; training feeds `batches`. Keys,
    shapes and dtypes must agree, or every precompiled executable would be missed."""
    from jaxqlora.data import batch_spec

    rows = [[5, 6, 7], [8, 9], [1, 2, 3, 4, 5]]
    enc = (Encoded(rows, None, loss_start=np.asarray([1, 0, 2])) if causal_lm
           else Encoded(rows, np.asarray([0, 1, 1])))
    got = next(batches(enc, 4, (8, 16), pad_id=0))
    spec = batch_spec(4, 8, causal_lm=causal_lm)
    assert {k: (v.shape, np.dtype(v.dtype)) for k, v in got.items()} == \
           {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in spec.items()}


def test_prefetch_keeps_order_runs_ahead_in_a_thread_and_stops_early():
    """`prefetch` yields ``fn(item)`` in order, computed in a background thread, at most
    ``depth`` results (plus the one being made) ahead of the consumer; closing it early
    stops reading the source; ``depth=0`` computes on demand in the caller's thread."""
    import threading
    import time

    from jaxqlora.data import prefetch

    drawn, threads = [], set()

    def source(n):
        for i in range(n):
            drawn.append(i)
            yield i

    def fn(x):
        threads.add(threading.current_thread().name)
        return x * 10

    with prefetch(source(100), fn, depth=2) as it:
        assert next(it) == 0
        time.sleep(0.3)  # the thread fills its queue, then waits
        assert 3 <= len(drawn) <= 4, drawn  # 1 taken + 2 queued (+ 1 being put)
        assert [next(it) for _ in range(4)] == [10, 20, 30, 40]
    n = len(drawn)
    time.sleep(0.2)
    assert len(drawn) == n < 100  # closed: the source is not read further
    assert threads == {"jaxqlora-prefetch"}

    assert list(prefetch(source(5), fn, depth=3)) == [0, 10, 20, 30, 40]
    threads.clear()
    assert list(prefetch(source(3), fn, depth=0)) == [0, 10, 20]
    assert threads == {threading.current_thread().name}
    with pytest.raises(ValueError, match="depth"):
        prefetch(source(1), fn, depth=-1)


def test_prefetch_raises_errors_where_they_happen():
    """An error of the source or of ``fn`` is raised by the consumer's ``next`` at the
    item where it happened, after the items before it."""
    from jaxqlora.data import prefetch

    def source():
        yield from (1, 2)
        raise DataError("bad row 3")

    it = prefetch(source(), depth=2)
    assert [next(it), next(it)] == [1, 2]
    with pytest.raises(DataError, match="bad row 3"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)

    def fn(x):
        if x == 2:
            raise ValueError("cannot place item 2")
        return x

    got = []
    with pytest.raises(ValueError, match="item 2"):
        for x in prefetch(range(5), fn, depth=1):
            got.append(x)
    assert got == [0, 1]
