"""The ``jaxqlora`` command's argument checks: every bad argument is refused by argparse
(``error: argument --x: ...``, exit code 2, no traceback) before any model, data or
compilation is touched; ``--help`` gives every option a line and its default."""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import jaxqlora.data
import jaxqlora.errors
import jaxqlora.finetune
import jaxqlora.io
from jaxqlora import cli
from jaxqlora.cli import build_parser, main


@pytest.fixture(autouse=True)
def nothing_is_loaded(monkeypatch):
    """Any attempt to load a model, train or evaluate fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a bad argument reached the loader")

    monkeypatch.setattr(jaxqlora.io, "load_pretrained", forbidden)
    monkeypatch.setattr(jaxqlora.finetune, "finetune", forbidden)
    monkeypatch.setattr(jaxqlora.finetune, "evaluate_adapter", forbidden)


@pytest.fixture
def adapter_dir(tmp_path):
    d = tmp_path / "adapter"
    d.mkdir()
    return d


def _refused(argv, capsys, *expected):
    """Run ``main(argv)``; it must return 2 fast with one ``error:`` line naming ``expected``."""
    t0 = time.perf_counter()
    code = main([str(a) for a in argv])
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert code == 2, err
    assert elapsed < 1.0, elapsed
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


FINETUNE_BAD = [
    (["--batch-size", "0"], "--batch-size", "positive integer", "0"),
    (["--batch-size", "-4"], "--batch-size", "positive integer", "-4"),
    (["--batch-size", "two"], "--batch-size", "'two'"),
    (["--batch-size", "1.5"], "--batch-size", "'1.5'"),
    (["--rank", "0"], "--rank", "positive integer"),
    (["--rank", "-8"], "--rank", "positive integer"),
    (["--alpha", "0"], "--alpha", "positive number"),
    (["--alpha", "-1"], "--alpha", "positive number"),
    (["--dropout", "1"], "--dropout", "[0, 1)"),
    (["--dropout", "-0.1"], "--dropout", "[0, 1)"),
    (["--epochs", "-1"], "--epochs", "positive number"),
    (["--epochs", "0"], "--epochs", "positive number"),
    (["--epochs", "nan"], "--epochs", "'nan'"),
    (["--epochs", "inf"], "--epochs", "'inf'"),
    (["--max-steps", "0"], "--max-steps", "positive integer"),
    (["--max-steps", "-3"], "--max-steps", "positive integer"),
    (["--grad-accum", "0"], "--grad-accum", "positive integer"),
    (["--lr", "-0.1"], "--lr", "positive number"),
    (["--lr", "0"], "--lr", "positive number"),
    (["--max-seq-len", "0"], "--max-seq-len", "positive integer"),
    (["--max-seq-len", "-64"], "--max-seq-len", "positive integer"),
    (["--task", "causal-lm", "--max-seq-len", "1"], "--max-seq-len", "at least 2"),
    (["--checkpoint-every", "-1"], "--checkpoint-every", "non-negative integer"),
    (["--log-every", "0"], "--log-every", "positive integer"),
    (["--seed", "-1"], "--seed", "non-negative integer"),
    (["--targets", "w_proj"], "--targets", "w_proj"),
    (["--schedule", "linear"], "--schedule", "linear"),
    (["--dtype", "float16"], "--dtype", "float16"),
    (["--text-column", ""], "--text-column", "empty"),
    (["--mesh", "data=0"], "--mesh", "data=0"),
    (["--mesh", "model=2"], "--mesh"),
    (["--num-processes", "0"], "--num-processes", "positive integer"),
    (["--process-id", "-1"], "--process-id", "non-negative integer"),
    (["--num-processes", "2", "--process-id", "2"], "--process-id", "below --num-processes 2"),
    (["--model", "{tmp}/absent"], "--model", "absent", "no such file"),
    (["--data", "{tmp}/absent.csv"], "--data", "absent.csv", "no such file"),
    (["--data", "{tmp}"], "--data", "not a file"),
]


@pytest.mark.parametrize("args, expected", [(a[0], a[1:]) for a in FINETUNE_BAD],
                         ids=[" ".join(a[0]) for a in FINETUNE_BAD])
def test_finetune_bad_argument_refused(args, expected, tmp_path, capsys):
    out = tmp_path / "run"
    args = [a.format(tmp=tmp_path) for a in args]
    expected = [e.format(tmp=tmp_path) for e in expected]
    line = _refused(["finetune", "--output", out, *args], capsys, "argument", *expected)
    assert line.startswith("jaxqlora finetune: error:")
    assert not out.exists()  # the output folder is untouched


def test_output_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    _refused(["finetune", "--output", target], capsys, "--output", "results.txt", "not a folder")
    assert target.read_text() == "keep me"
    _refused(["finetune", "--output", target / "sub"], capsys, "--output", "is a file")
    _refused(["merge", "--adapter", tmp_path, "--output", target], capsys, "--output", "not a folder")
    assert target.read_text() == "keep me"


GENERATE_BAD = [
    (["--max-new-tokens", "0"], "--max-new-tokens", "positive integer"),
    (["--max-new-tokens", "-5"], "--max-new-tokens", "positive integer"),
    (["--temperature", "-1"], "--temperature", "non-negative number"),
    (["--temperature", "nan"], "--temperature", "'nan'"),
    (["--top-k", "-1"], "--top-k", "non-negative integer"),
    (["--top-p", "0"], "--top-p", "(0, 1]"),
    (["--top-p", "1.5"], "--top-p", "(0, 1]"),
    (["--top-p", "-0.5"], "--top-p", "(0, 1]"),
    (["--seed", "-2"], "--seed", "non-negative integer"),
    (["--adapter", "{tmp}/absent"], "--adapter", "no such folder"),
    (["--model", "{tmp}/absent.gguf"], "--model", "absent.gguf"),
]


@pytest.mark.parametrize("args, expected", [(a[0], a[1:]) for a in GENERATE_BAD],
                         ids=[" ".join(a[0]) for a in GENERATE_BAD])
def test_generate_bad_argument_refused(args, expected, tmp_path, capsys):
    args = [a.format(tmp=tmp_path) for a in args]
    line = _refused(["generate", "--prompt", "hi", *args], capsys, "argument", *expected)
    assert line.startswith("jaxqlora generate: error:")


def test_generate_empty_prompt_and_missing_prompt(capsys):
    _refused(["generate", "--prompt", "  "], capsys, "--prompt", "empty")
    _refused(["generate"], capsys, "--prompt", "required")


def test_eval_and_merge_bad_arguments(tmp_path, adapter_dir, capsys):
    _refused(["eval"], capsys, "--adapter", "required")
    _refused(["eval", "--adapter", tmp_path / "nope"], capsys, "--adapter", "no such folder")
    file = tmp_path / "f"
    file.write_text("")
    _refused(["eval", "--adapter", file], capsys, "--adapter", "not a folder")
    _refused(["eval", "--adapter", adapter_dir, "--max-seq-len", "0"], capsys, "--max-seq-len")
    _refused(["merge", "--adapter", adapter_dir], capsys, "--output", "required")
    _refused(["merge", "--output", tmp_path / "m"], capsys, "--adapter", "required")


def test_unknown_command_and_option(capsys):
    _refused(["train"], capsys, "invalid choice", "train")
    _refused(["finetune", "--batchsize", "4"], capsys, "unrecognized arguments")
    _refused([], capsys, "required")


def test_good_arguments_reach_finetune(monkeypatch, tmp_path, capsys):
    """Valid values pass the checks unchanged and become the FinetuneConfig."""
    seen = {}

    def fake_finetune(cfg, log=None):
        seen["cfg"] = cfg
        raise jaxqlora.data.DataError("stop here")

    monkeypatch.setattr(jaxqlora.finetune, "finetune", fake_finetune)
    out = tmp_path / "out"
    code = main(["finetune", "--output", str(out), "--epochs", "0.5", "--batch-size", "3", "--rank", "4",
                 "--lr", "1e-3", "--dropout", "0", "--targets", "q_proj", "v_proj", "--mesh", "data=1",
                 "--scan-layers", "unroll"])
    assert code == 2 and "error: stop here" in capsys.readouterr().err
    cfg = seen["cfg"]
    assert (cfg.epochs, cfg.max_steps, cfg.batch_size, cfg.rank, cfg.lr, cfg.dropout) == (0.5, 0, 3, 4, 1e-3, 0.0)
    assert cfg.targets == ("q_proj", "v_proj") and cfg.output == str(out) and cfg.mesh == "data=1"
    assert cfg.scan_layers is False


def test_library_error_is_one_line_and_debug_shows_traceback(monkeypatch, tmp_path, capsys):
    def fails(cfg, log=None):
        raise jaxqlora.errors.CheckpointError(tmp_path / "x.gguf", "damaged", "general.architecture")

    monkeypatch.setattr(jaxqlora.finetune, "finetune", fails)
    assert main(["finetune", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"error: {tmp_path / 'x.gguf'}, 'general.architecture': damaged"]
    with pytest.raises(jaxqlora.errors.CheckpointError):
        main(["finetune", "--output", str(tmp_path / "o"), "--debug"])


def _options(parser):
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                yield name, sub, action


def test_every_option_has_help_and_its_default():
    parser = build_parser()
    seen = 0
    for name, sub, action in _options(parser):
        seen += 1
        assert action.help and action.help.strip(), (name, action.option_strings)
        help_text = sub.format_help()
        assert action.option_strings[0] in help_text
        if action.nargs != 0 and action.default is not None and not action.required:
            line = sub._get_formatter()._get_help_string(action)
            assert "(default:" in line, (name, action.option_strings, line)
    assert seen > 40


def test_help_text_shows_defaults(capsys):
    assert main(["finetune", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--batch-size BATCH_SIZE rows per micro-batch (default: 16)", "(default: runs/finetune)",
                 "--lr LR peak learning rate (default: 0.0002)", "(default: cosine)", "(default: 64)"):
        assert text in out, text
    assert main(["generate", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 128)" in out and "0 = greedy (default: 0.0)" in out


@pytest.mark.parametrize("fn, good, bad", [
    (cli.positive_int, {"1": 1, "42": 42}, ["0", "-1", "x", "1.0", ""]),
    (cli.nonnegative_int, {"0": 0, "7": 7}, ["-1", "x"]),
    (cli.positive_float, {"1e-4": 1e-4, "3": 3.0}, ["0", "-0.1", "nan", "inf", "-inf", "x"]),
    (cli.nonnegative_float, {"0": 0.0, "0.7": 0.7}, ["-1e-9", "nan"]),
    (cli.probability, {"1": 1.0, "0.9": 0.9}, ["0", "1.0001", "-1"]),
    (cli.dropout_rate, {"0": 0.0, "0.5": 0.5}, ["1", "-0.01"]),
    (cli.layer_loop, {"scan": True, "unroll": False}, ["Scan", "", "loop", "1"]),
])
def test_argument_types(fn, good, bad):
    for text, value in good.items():
        assert fn(text) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            fn(text)


def test_console_script_exit_code_without_traceback(tmp_path):
    """The real process: exit code 2 and argparse's message, no traceback."""
    r = subprocess.run([sys.executable, "-m", "jaxqlora.cli", "finetune", "--batch-size", "0",
                        "--output", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "error: argument --batch-size: must be a positive integer (>= 1), got 0" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()


def _finished_run(folder):
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"first run")
    (folder / "checkpoints" / "2").mkdir(parents=True)
    (folder / "metrics.jsonl").write_text('{"step": 2}\n')
    (folder / "results.json").write_text("{}")


def test_output_with_a_finished_run_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    _finished_run(out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    _refused(["finetune", "--output", out], capsys, "--output", "already holds a run", "--resume", "--overwrite")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    _refused(["finetune", "--output", out, "--resume", "--overwrite"], capsys, "--overwrite", "--resume")


def test_overwrite_and_resume_reach_finetune_with_the_first_run_intact(monkeypatch, tmp_path, capsys):
    """--resume and --overwrite pass the refusal; the CLI deletes nothing itself (finetune
    removes the earlier run only when training starts: tests/test_train.py)."""
    seen = []

    def fake_finetune(cfg, log=None):
        seen.append((cfg.resume, cfg.overwrite, sorted(p.name for p in Path(cfg.output).iterdir())))
        raise jaxqlora.data.DataError("stop here")

    monkeypatch.setattr(jaxqlora.finetune, "finetune", fake_finetune)
    out = tmp_path / "run"
    _finished_run(out)
    (out / "notes.txt").write_text("the user's own file")
    everything = ["adapter", "checkpoints", "metrics.jsonl", "notes.txt", "results.json"]
    assert main(["finetune", "--output", str(out), "--resume"]) == 2
    assert seen[-1] == (True, False, everything)
    assert main(["finetune", "--output", str(out), "--overwrite"]) == 2
    assert seen[-1] == (False, True, everything)  # a run that fails before training leaves the first one
    assert "stop here" in capsys.readouterr().err


def test_generate_refuses_a_classification_adapter(tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "SEQ_CLS"}))
    _refused(["generate", "--prompt", "hi", "--adapter", adapter], capsys, "--adapter", "classification adapter",
             "task_type SEQ_CLS")


# --- data and settings checked before any model is loaded (the real finetune, load_pretrained still forbidden)

REAL_FINETUNE = jaxqlora.finetune.finetune


def _data_refused(monkeypatch, capsys, tmp_path, name, text, *args, expected=()):
    monkeypatch.setattr(jaxqlora.finetune, "finetune", REAL_FINETUNE)
    monkeypatch.setattr(jaxqlora.io, "load_tokenizer", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("the tokenizer was loaded before the data was checked")))
    data = tmp_path / name
    data.write_text(text)
    out = tmp_path / "run"
    code = main(["finetune", "--data", str(data), "--output", str(out), *map(str, args)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for e in expected:
        assert e in lines[0], (e, lines[0])
    assert not out.exists()  # a run that fails before training leaves no output folder
    return lines[0]


def _rows(n, label=lambda i: "ab"[i % 2], text=lambda i: f"row {i}"):
    return "text,label\n" + "".join(f"{text(i)},{label(i)}\n" for i in range(n))


def test_data_without_the_named_column_lists_its_columns(monkeypatch, capsys, tmp_path):
    _data_refused(monkeypatch, capsys, tmp_path, "d.csv", "sentence,stars\nhello,1\nbye,0\n",
                  expected=("d.csv", "text column 'text' not found", "['sentence', 'stars']"))
    _data_refused(monkeypatch, capsys, tmp_path, "d.csv", "text,stars\nhello,1\nbye,0\n",
                  expected=("label column 'label' not found", "['text', 'stars']"))
    _data_refused(monkeypatch, capsys, tmp_path, "d.jsonl", '{"q": "a", "a": "b"}\n', "--task", "causal-lm",
                  expected=("prompt column 'prompt' not found", "['q', 'a']"))
    _data_refused(monkeypatch, capsys, tmp_path, "d.jsonl", '{"prompt": "a", "a": "b"}\n', "--task", "causal-lm",
                  expected=("response column 'response' not found", "['prompt', 'a']"))


def test_data_with_fewer_than_two_classes(monkeypatch, capsys, tmp_path):
    _data_refused(monkeypatch, capsys, tmp_path, "d.csv", _rows(50, label=lambda i: "pos"),
                  expected=("label column 'label' has 1 class ('pos')", "at least 2"))


def test_data_with_a_missing_label_or_a_non_object_line(monkeypatch, capsys, tmp_path):
    _data_refused(monkeypatch, capsys, tmp_path, "d.csv", _rows(50, label=lambda i: "" if i == 7 else "ab"[i % 2]),
                  expected=("row 8 has no value in label column 'label'",))
    _data_refused(monkeypatch, capsys, tmp_path, "d.jsonl", '{"text": "a", "label": 1}\n[1, 2]\n',
                  expected=("line 2 is a JSON list",))


def test_split_too_small_for_the_batch_size(monkeypatch, capsys, tmp_path):
    """100 rows: test 20, validation 8, train 72 (sklearn's stratified split) < 16 x 5."""
    _data_refused(monkeypatch, capsys, tmp_path, "d.csv", _rows(100), "--batch-size", "16", "--grad-accum", "5",
                  expected=("training split has 72 rows", "batch_size 16 x grad_accum 5 = 80",
                            "batch size of at most 14"))
    _data_refused(monkeypatch, capsys, tmp_path, "d.csv", _rows(4), "--batch-size", "1",
                  expected=("4 rows cannot be split", "\'a\': 2, \'b\': 2"))


def _cfg(**kw):
    from jaxqlora.finetune import FinetuneConfig

    return FinetuneConfig(**kw)


CONFIG_BAD = [
    (dict(rank=0), "rank=0", "positive integer"), (dict(rank=2.0), "rank=2.0", "integer"),
    (dict(batch_size=True), "batch_size=True", "integer"), (dict(batch_size=-1), "batch_size", "positive"),
    (dict(grad_accum=0), "grad_accum", "positive"), (dict(max_steps=-1), "max_steps", ">= 0"),
    (dict(epochs=0.0), "epochs", "> 0"), (dict(epochs=float("nan")), "epochs", "finite"),
    (dict(lr=-0.1), "lr=-0.1", "> 0"), (dict(alpha=0), "alpha", "> 0"), (dict(dropout=1.0), "dropout", "< 1"),
    (dict(dropout=-0.5), "dropout", ">= 0"), (dict(warmup_ratio=1.5), "warmup_ratio", "<= 1"),
    (dict(weight_decay=-1e-3), "weight_decay", ">= 0"), (dict(max_grad_norm=0.0), "max_grad_norm", "> 0"),
    (dict(max_seq_len=0), "max_seq_len", "positive"), (dict(task="causal-lm", max_seq_len=1), "max_seq_len", "2"),
    (dict(eval_batch_size=0), "eval_batch_size", "positive"), (dict(log_every=0), "log_every", "positive"),
    (dict(checkpoint_every=-2), "checkpoint_every", ">= 0"), (dict(seed=-1), "seed", ">= 0"),
    (dict(task="regression"), "task='regression'", "'classification'"), (dict(pooling="max"), "pooling", "'mean'"),
    (dict(schedule="linear"), "schedule", "'cosine'"), (dict(dtype="float16"), "dtype", "'bfloat16'"),
    (dict(remat="some"), "remat", "'dots'"), (dict(scan_layers="unroll"), "scan_layers", "False (unrolled)"), (dict(targets=("w_proj",)), "targets", "q_proj"),
    (dict(targets=()), "targets", "non-empty"), (dict(buckets=(0, 64)), "buckets", "positive"),
    (dict(quantize="yes"), "quantize", "True or False"), (dict(text_column=""), "text_column", "non-empty"),
    (dict(output=" "), "output", "non-empty"), (dict(data=3), "data", "path"),
    (dict(resume=True, overwrite=True), "overwrite", "resume"), (dict(mesh="data=0"), "mesh", "data=0"),
    (dict(num_processes=2, process_id=2), "process_id", "below num_processes 2"),
]


@pytest.mark.parametrize("kw, expected", [(c[0], c[1:]) for c in CONFIG_BAD], ids=[str(c[0]) for c in CONFIG_BAD])
def test_finetune_config_refuses_bad_fields(kw, expected):
    from jaxqlora.finetune import FinetuneConfigError

    with pytest.raises(FinetuneConfigError) as e:
        _cfg(**kw)
    assert isinstance(e.value, jaxqlora.errors.JaxQLoRAError)
    for text in expected:
        assert text in str(e.value), (text, str(e.value))


def test_finetune_config_is_checked_again_by_finetune(tmp_path):
    """A field changed after the config was made is caught by finetune, before anything loads."""
    from jaxqlora.finetune import FinetuneConfigError

    cfg = _cfg(output=str(tmp_path / "o"))
    cfg.batch_size = 0
    with pytest.raises(FinetuneConfigError, match="batch_size=0"):
        REAL_FINETUNE(cfg, log=lambda *_: None)
    assert not (tmp_path / "o").exists()


def test_finetune_library_refuses_an_output_with_a_run_or_a_file(tmp_path):
    from jaxqlora.finetune import FinetuneConfigError

    out = tmp_path / "run"
    _finished_run(out)
    with pytest.raises(FinetuneConfigError, match="already holds a run"):
        REAL_FINETUNE(_cfg(output=str(out)), log=lambda *_: None)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(FinetuneConfigError, match="not a folder"):
        REAL_FINETUNE(_cfg(output=str(f)), log=lambda *_: None)
    assert f.read_text() == "x"


def test_nf4_report_is_one_readable_line():
    from jaxqlora.finetune import format_nf4_report

    line = format_nf4_report({"linear_mb_before": 169.87, "linear_mb_after": 43.8, "model_mb_before": 269.1,
                              "model_mb_after": 143.03, "bits_per_param": 4.127})
    assert line == ("NF4: quantized projections 169.9 MB -> 43.8 MB (4.127 bits per weight); "
                    "whole model 269.1 MB -> 143.0 MB")


# --- streaming: one compiled loop per chunk of tokens, the tokens of plain greedy decoding

def _tiny_lm_and_tokenizer(tmp_path):
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from tokenizers import Tokenizer as Backend, models, pre_tokenizers

    from jaxqlora.config import ModelConfig
    from jaxqlora.model import CausalLM
    from jaxqlora.tokenizer import Tokenizer

    vocab = 40
    cfg = ModelConfig(arch="llama", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    model = CausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    new = [(1.0 + 0.1 * jax.random.normal(k, a.shape)) if a.ndim == 1 else 0.5 * jax.random.normal(k, a.shape)
           for k, a in zip(keys, leaves)]  # spread-out logits: argmax is not a near tie
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, [x.astype(a.dtype) for x, a in zip(new, leaves)]))
    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(vocab - 3)}}
    backend = Backend(models.WordLevel(words, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return model, Tokenizer(backend, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _greedy_without_cache(model, prompt_ids, n, eos):
    """Plain greedy decoding: the whole sequence through the model for every new token (no KV
    cache; right-padded to one length, which a causal model's earlier logits ignore)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))
    length = len(prompt_ids) + n
    ids, out = list(prompt_ids), []
    for _ in range(n):
        logits = forward(state, jnp.asarray([ids + [0] * (length - len(ids))], jnp.int32))
        t = int(jnp.argmax(logits[0, len(ids) - 1]))
        if t == eos:
            break
        out.append(t)
        ids.append(t)
    return out


@pytest.mark.parametrize("n", [3, 70])
def test_stream_yields_the_tokens_of_greedy_decoding(tmp_path, n):
    """Pieces of `stream` (chunks of `STREAM_CHUNK` tokens per compiled call) join to the text of
    greedy decoding computed without a cache, for a length inside the first chunk and one
    across many chunks; a sampled stream equals `generate` with the same seed (each row's PRNG
    key advances once per token, whatever the chunk size: `generate` takes chunks of 16)."""
    from jaxqlora.generate import DECODE_CHUNK, STREAM_CHUNK, generate, stream

    assert STREAM_CHUNK < DECODE_CHUNK
    model, tok = _tiny_lm_and_tokenizer(tmp_path)
    prompt = "w1 w5 w9 w2"
    ref = _greedy_without_cache(model, tok.encode(prompt), n, tok.eos_token_id)
    pieces = list(stream(model, tok, prompt, max_new_tokens=n))
    assert "".join(pieces) == tok.decode(ref, skip_special_tokens=True)
    assert len(pieces) == len(ref) and len(ref) >= min(n, 3)
    if n < DECODE_CHUNK:
        return
    kw = dict(max_new_tokens=n, temperature=1.0, top_k=10, seed=7)
    ids = generate(model, tok, prompt, return_ids=True, **kw)
    assert "".join(stream(model, tok, prompt, **kw)) == tok.decode([t for t in ids if t != 2], skip_special_tokens=True)


def test_stream_closed_early_stops(tmp_path):
    from jaxqlora.generate import stream

    model, tok = _tiny_lm_and_tokenizer(tmp_path)
    it = stream(model, tok, "w1 w5", max_new_tokens=70)
    first = next(it)
    it.close()  # no thread or loop left behind
    assert first.strip()
