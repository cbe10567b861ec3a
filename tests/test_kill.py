"""Kills and interrupts of ``jaxqlora finetune``: a subprocess fine-tuning a tiny random Llama
on CPU is SIGKILLed at named points (before the first checkpoint, while orbax writes a
step, after a step is finalized, between checkpoints, while the adapter folder is written,
after the adapter and before ``results.json``), at a moment picked from outside (polling
``metrics.jsonl``), and interrupted with SIGINT; each time the last finalized checkpoint and
the adapter on disk are readable, and ``--resume`` ends with exactly (bit for bit) the LoRA
weights and the per-step losses of a run that was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxqlora.checkpoint import KILL_ENV, KILL_SIGNAL_ENV

pytest.importorskip("transformers")
from tiny_models import save_random_model, save_word_tokenizer  # noqa: E402

VOCAB = 90
STEPS = 6
ORBAX_TMP = ".orbax-checkpoint-tmp"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama with a word tokenizer, a 2-class CSV of 120 rows, and the uninterrupted run."""
    base = save_random_model(tmp_path_factory, "killbase", vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    words = save_word_tokenizer(base, VOCAB)
    rng = np.random.default_rng(0)
    data = base / "d.csv"
    data.write_text("text,label\n" + "\n".join(
        f"{' '.join(rng.choice(words, rng.integers(3, 12)))},{'ab'[i % 2]}" for i in range(120)) + "\n")
    root = tmp_path_factory.mktemp("kill")
    full = root / "full"
    r = _run(base, data, full)
    assert r.returncode == 0, r.stderr
    return base, data, root, full


def _cmd(base, data, out, *extra):
    return [sys.executable, "-m", "jaxqlora.cli", "finetune", "--model", str(base), "--data", str(data),
            "--no-quantize", "--rank", "2", "--alpha", "4", "--max-steps", str(STEPS), "--batch-size", "8",
            "--max-seq-len", "16", "--checkpoint-every", "2", "--log-every", "1", "--dtype", "float32",
            "--output", str(out), *extra]


def _env(kill_at=None, sig=None):
    env = dict(os.environ)
    env.pop(KILL_ENV, None)
    env.pop(KILL_SIGNAL_ENV, None)
    if kill_at:
        env[KILL_ENV] = kill_at
    if sig:
        env[KILL_SIGNAL_ENV] = sig
    return env


def _run(base, data, out, *extra, kill_at=None, sig=None):
    return subprocess.run(_cmd(base, data, out, *extra), env=_env(kill_at, sig), capture_output=True, text=True,
                          timeout=300)


def _killed(r):
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])


def _steps(out):
    """Finalized checkpoint steps, and steps orbax had not finalized (temporary folders)."""
    folder = out / "checkpoints"
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    final = sorted(int(n) for n in names if n.isdigit())
    partial = sorted(int(n.split(".")[0]) for n in names if ORBAX_TMP in n)
    return final, partial


def _adapter(out):
    from safetensors.numpy import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


def _losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def _assert_same_as_uninterrupted(out, full):
    a, b = _adapter(out), _adapter(full)
    assert sorted(a) == sorted(b) and len(a) > 0
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k  # bit for bit
    assert _losses(out) == _losses(full)  # each step once, the same losses
    assert [s for s, _ in _losses(full)] == list(range(1, STEPS + 1))
    res = json.loads((out / "results.json").read_text())
    ref = json.loads((full / "results.json").read_text())
    assert res["steps"] == ref["steps"] == STEPS and res["test"] == ref["test"]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    leftovers = [p.name for p in out.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert not leftovers and not _steps(out)[1], (leftovers, _steps(out))


def test_uninterrupted_run_reports_the_epochs_it_covered(setup):
    """results.json: 6 steps of 8 rows over a training split of 120 * 0.8 * 0.9 = 86 rows
    (sklearn's split: test ceil(0.2 * 120) = 24, validation ceil(0.1 * 96) = 10) cover
    48 / 86 of an epoch."""
    _, _, _, full = setup
    res = json.loads((full / "results.json").read_text())
    assert res["train_rows"] == 86
    assert res["epochs"] == round(48 / 86, 4)
    assert res["config"]["epochs"] is None and res["config"]["max_steps"] == STEPS
    assert _steps(full) == ([4, 6], [])  # max_to_keep=2


def test_sigkill_at_named_points_then_resume(setup, capsys):
    """One run killed five times, each time resumed: the state on disk after every kill is a
    readable earlier state, and the last resume ends where the uninterrupted run ended."""
    from jaxqlora.cli import main

    base, data, root, full = setup
    out = root / "chain"

    # 1. After step 1, before any checkpoint: nothing to resume but the metrics.
    _killed(_run(base, data, out, kill_at="after_step:1"))
    assert _steps(out) == ([], []) and [s for s, _ in _losses(out)] == [1]
    assert not (out / "adapter").exists() and not (out / "results.json").exists()
    # without --resume the earlier run is refused (by the argument checks: in this process)
    assert main(_cmd(base, data, out)[3:]) == 2 and "--resume" in capsys.readouterr().err

    # 2. Resumed from scratch, killed while orbax writes step 4 (step 2 is finalized).
    _killed(_run(base, data, out, "--resume", kill_at="checkpoint_writing:4"))
    final, partial = _steps(out)
    assert final == [2] and set(partial) <= {4}
    assert max(s for s, _ in _losses(out)) == 4

    # 3. Resumed from step 2, killed right after step 5 (step 4 finalized, 5 logged, not saved).
    _killed(_run(base, data, out, "--resume", kill_at="after_step:5"))
    assert _steps(out) == ([2, 4], [])
    assert [s for s, _ in _losses(out)] == [1, 2, 3, 4, 5]

    # 4. Resumed from step 4, killed with the new adapter written aside, not yet renamed into place.
    _killed(_run(base, data, out, "--resume", kill_at="adapter_writing"))
    assert _steps(out) == ([4, 6], [])
    assert not (out / "adapter").exists() and list(out.glob("adapter.tmp-*"))

    # 5. Resumed at step 6 (no step left): evaluated, adapter in place, killed before results.json.
    _killed(_run(base, data, out, "--resume", kill_at="adapter_written"))
    assert not (out / "results.json").exists()
    assert all(np.array_equal(v, _adapter(full)[k]) for k, v in _adapter(out).items())

    r = _run(base, data, out, "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed at step 6" in r.stderr
    _assert_same_as_uninterrupted(out, full)


def _start(base, data, out, *extra):
    return subprocess.Popen(_cmd(base, data, out, *extra), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_records(proc, out, n, timeout=240):
    path = out / "metrics.jsonl"
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"finished before {n} records: {proc.communicate()[1][-2000:]}")
        if path.is_file() and path.read_text().count("\n") >= n:
            return
        time.sleep(0.005)
    raise AssertionError("no progress")


def test_kill_after_a_checkpoint_from_outside_and_sigint_then_resume(setup):
    """Killed right after step 2 was finalized; then SIGKILLed from outside as soon as
    metrics.jsonl shows step 3 (wherever the process is then: in a step, in a checkpoint
    write, in evaluation, ...); then SIGINT (as Ctrl-C sends it) right after step 5: the
    run saves a checkpoint of step 5, prints one line and exits with 130; the resume ends
    bit for bit as the uninterrupted run."""
    base, data, root, full = setup
    out = root / "outside"
    _killed(_run(base, data, out, kill_at="checkpoint_written:2"))
    assert _steps(out) == ([2], [])

    proc = _start(base, data, out, "--resume")
    _wait_for_records(proc, out, 3)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    final, _ = _steps(out)
    assert final and set(final) <= {2, 4, 6}
    if 6 in final:  # the kill came after the last step: nothing left to interrupt
        r = _run(base, data, out, "--resume")
        assert r.returncode == 0, r.stderr
        _assert_same_as_uninterrupted(out, full)
        pytest.skip("the outside kill landed after the last step; SIGINT not tried")

    r = _run(base, data, out, "--resume", kill_at="after_step:5", sig="SIGINT")
    assert r.returncode == 130, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    line = [x for x in r.stderr.splitlines() if x.startswith("interrupted:")]
    assert len(line) == 1 and "SIGINT: stopped at step 5 of 6" in line[0] and "--resume" in line[0], r.stderr[-2000:]
    assert _steps(out) == ([4, 5], [])  # the step it stopped at was saved
    assert [s for s, _ in _losses(out)] == [1, 2, 3, 4, 5]
    assert not (out / "adapter").exists() and not (out / "results.json").exists()

    r = _run(base, data, out, "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed at step 5" in r.stderr
    _assert_same_as_uninterrupted(out, full)


def test_atomic_write_dir_killed_before_the_swap_keeps_the_old_folder(tmp_path):
    """A process SIGKILLed between writing a folder aside and swapping it in leaves the old
    folder whole; remove_leftovers then deletes the temporary folder."""
    from jaxqlora.io.atomic import atomic_write_dir, remove_leftovers

    target = tmp_path / "adapter"
    atomic_write_dir(target, lambda d: (d / "w.bin").write_bytes(b"old"))
    code = ("import os, signal, sys; from pathlib import Path; from jaxqlora.io.atomic import atomic_write_dir; "
            "atomic_write_dir(Path(sys.argv[1]), lambda d: (d / 'w.bin').write_bytes(b'new'), "
            "before_swap=lambda: os.kill(os.getpid(), signal.SIGKILL))")
    r = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert (target / "w.bin").read_bytes() == b"old"
    left = list(tmp_path.glob("adapter.tmp-*"))
    assert len(left) == 1 and (left[0] / "w.bin").read_bytes() == b"new"
    assert remove_leftovers(tmp_path, ["adapter"]) == left and not left[0].exists()
    atomic_write_dir(target, lambda d: (d / "w.bin").write_bytes(b"new"))  # replacing an existing folder
    assert (target / "w.bin").read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_recover_dir_puts_back_the_old_folder(tmp_path):
    """Where the atomic swap is unavailable, a kill between the two renames leaves only
    ``<name>.old-<pid>``; recover_dir (run by remove_leftovers) renames it back."""
    from jaxqlora.io.atomic import remove_leftovers

    old = tmp_path / "adapter.old-12345"
    old.mkdir()
    (old / "w.bin").write_bytes(b"old")
    (tmp_path / "results.json.tmp-999").write_text("{")
    removed = remove_leftovers(tmp_path, ["adapter", "results.json"])
    assert (tmp_path / "adapter" / "w.bin").read_bytes() == b"old"
    assert [p.name for p in removed] == ["results.json.tmp-999"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_resume_skips_an_unreadable_latest_checkpoint(setup, tmp_path):
    """A finalized step damaged on disk afterwards (its files truncated) is skipped with a
    message, and the run resumes from the step before it: a copy of the uninterrupted run
    (checkpoints 4 and 6) with step 6 damaged resumes at step 4 and ends as that run."""
    import shutil

    base, data, root, full = setup
    out = tmp_path / "damaged"
    shutil.copytree(full, out)
    assert _steps(out) == ([4, 6], [])
    damaged = [f for f in (out / "checkpoints" / "6" / "state").rglob("*") if f.is_file() and f.stat().st_size]
    assert damaged
    for f in damaged:
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 3])
    r = _run(base, data, out, "--resume")
    assert r.returncode == 0, r.stderr
    assert "checkpoint step 6 is unreadable" in r.stderr and "resumed at step 4" in r.stderr
    assert (out / "checkpoints" / "unreadable" / "6-0").is_dir()
    shutil.rmtree(out / "checkpoints" / "unreadable")
    _assert_same_as_uninterrupted(out, full)
    shutil.rmtree(out)
