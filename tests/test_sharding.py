"""Data-parallel and FSDP training on several CPU devices and processes (jaxqlora.sharding).

The multi-device runs need a JAX started with several host devices, so they run in
subprocesses (tests/sharding_worker.py, or ``python -m jaxqlora.cli finetune``).

The reference for a sharded step is our own unsharded `Trainer` step on one device, run
on the same model and batches: the unsharded step is itself checked against PEFT +
transformers (loss and gradient norm of an accumulated batch) in tests/test_train.py,
so agreement here means the sharded step computes that same, independently checked
result. Tolerances are float32 ones: XLA sums gradients over devices in another order.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxqlora import sharding
from jaxqlora.errors import ShardingError

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "sharding_worker.py"


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")]),
               JAX_DEFAULT_MATMUL_PRECISION="highest", TQDM_DISABLE="1")
    return env


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory):
    """The worker's results on 8 host devices (one subprocess, about 40 s on 2 cores)."""
    folder = tmp_path_factory.mktemp("meshes")
    out = folder / "out.json"
    proc = subprocess.run([sys.executable, str(WORKER), "meshes", str(out), str(folder / "ckpt")], env=_env(8),
                          capture_output=True, text=True, timeout=600)
    _check(proc)
    return json.loads(out.read_text())


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in a)


@pytest.mark.parametrize("shape", ["(8, 1)", "(2, 4)", "(1, 8)"])
def test_training_steps_on_a_mesh_match_one_device(mesh_runs, shape):
    """Three AdamW steps (dropout on, 2 micro-batches of 8 rows, NF4 base): the losses and
    the updated LoRA factors on the (data, fsdp) mesh equal the one-device run's; after the
    first step nothing is compiled again (the state keeps its shardings)."""
    ref, got = mesh_runs["single"], mesh_runs[shape]
    assert mesh_runs["devices"] == 8
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-6, atol=2e-6)
    assert _max_diff(got["lora"], ref["lora"]) < 2e-6
    assert _max_diff(ref["lora"], mesh_runs["initial_lora"]) > 1e-3  # the steps did move LoRA
    assert got["compiles_per_step"][1:] == [0, 0], got["compiles_per_step"]


@pytest.mark.parametrize("shape", ["(1, 2)", "(2, 1)"])
def test_pallas_kernels_on_a_mesh_match_one_device(mesh_runs, shape):
    """The GPU path: with the Pallas NF4, RMSNorm and SwiGLU kernels (interpret mode on CPU)
    run per device inside shard_map (on gathered FSDP shards for (1, 2)), two steps equal
    the one-device steps."""
    ref, got = mesh_runs["pallas"]["single"], mesh_runs["pallas"][shape]
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-6, atol=2e-6)
    assert _max_diff(got["lora"], ref["lora"]) < 2e-6


def test_data_parallel_step_with_pallas_kernels_has_no_all_gather(mesh_runs):
    """Data parallel with the Pallas kernels: each device runs its own rows through every
    kernel and its own rows' loss chunks, so the compiled step's only collectives are
    all-reduces (gradients, loss sums). A Pallas call left to XLA's partitioner makes it
    all-gather the activations and run the whole batch on every device (23 all-gathers in
    this step before `sharding.rowwise`), and so did a loss chunked over the flattened
    rows x positions (6)."""
    ops = mesh_runs["pallas"]["(2, 1)"]["collectives"]
    assert ops["all-gather"] == 0 and ops["all-to-all"] == 0, ops
    assert ops["all-reduce"] >= 1, ops


def test_checkpoint_from_2x4_resumes_on_1x1_and_8x1(mesh_runs):
    """A checkpoint saved by the (2, 4) run after step 2 restores on a (1, 1) and an (8, 1)
    mesh, and step 3 there gives the (2, 4) run's step 3 (loss and LoRA factors)."""
    base = mesh_runs["(2, 4)"]
    for name in ("(1, 1)", "(8, 1)"):
        r = mesh_runs["resumed"][name]
        assert r["restored"] == [2, 0, 2]
        np.testing.assert_allclose(r["loss"], base["loss"][2:], rtol=1e-6, atol=2e-6)
        assert _max_diff(r["lora"], base["lora"]) < 2e-6


def test_fsdp_frozen_bytes_per_device(mesh_runs):
    """Frozen state (NF4 codes + absmax, embeddings, LM head) per device: (8, 1) keeps a whole
    copy everywhere; (1, 8) holds about 1/8 (plus replicated norms and code tables); a
    weight whose rows do not split into whole blocks is replicated with a reason."""
    total = mesh_runs["single"]["frozen_bytes"]
    dp = mesh_runs["(8, 1)"]["frozen_bytes_per_device"]
    fsdp = mesh_runs["(1, 8)"]["frozen_bytes_per_device"]
    assert len(dp) == len(fsdp) == 8
    assert all(v == total for v in dp.values())
    assert max(fsdp.values()) <= 0.2 * total
    assert max(mesh_runs["(2, 4)"]["frozen_bytes_per_device"].values()) <= 0.3 * total
    ind = mesh_runs["indivisible"]
    assert ind["packed_replicated"] and "12 rows do not split into 8 shards" in ind["notes"][0]


# ------------------------------------------------------------- two processes, the CLI

VOCAB = 96


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny random Llama folder (float32 safetensors + word-level tokenizer) and a CSV."""
    import jax.numpy as jnp
    from flax import nnx
    from tokenizers import Tokenizer as Backend, models, pre_tokenizers

    from jaxqlora.config import ModelConfig
    from jaxqlora.io.export import save_pretrained
    from jaxqlora.model import CausalLM
    from jaxqlora.tokenizer import Tokenizer

    folder = tmp_path_factory.mktemp("tiny")
    words = [f"w{i}" for i in range(VOCAB - 3)]
    backend = Backend(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}},
                                       unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    cfg = ModelConfig(arch="llama", vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    save_pretrained(CausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)), folder / "model",
                    tokenizer=Tokenizer(backend, bos_token_id=1, eos_token_id=2, pad_token_id=0), dtype=jnp.float32)
    rng = np.random.default_rng(0)
    data = folder / "d.csv"
    data.write_text("text,label\n" + "\n".join(
        f"{' '.join(rng.choice(words, rng.integers(3, 20)))},{'ab'[i % 2]}" for i in range(120)) + "\n")
    return folder


def _args(tiny_run, output) -> list[str]:
    return ["--model", str(tiny_run / "model"), "--data", str(tiny_run / "d.csv"), "--dtype", "float32",
            "--rank", "2", "--alpha", "4", "--dropout", "0.1", "--max-steps", "4", "--batch-size", "8",
            "--max-seq-len", "32", "--schedule", "constant", "--checkpoint-every", "2", "--log-every", "1", "--output", str(output)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_finetune_like_one(tiny_run, tmp_path):
    """``jaxqlora finetune --distributed --mesh data=2,fsdp=2`` in two processes (2 CPU
    devices each, gloo collectives, localhost coordinator) logs the one-device run's
    losses and accuracies; only process 0 writes metrics, results and the adapter, and
    both write the (sharded) checkpoints."""
    from jaxqlora.cli import main

    ref_out = tmp_path / "single"
    assert main(["finetune", *_args(tiny_run, ref_out)]) == 0
    ref = [json.loads(line) for line in (ref_out / "metrics.jsonl").read_text().splitlines()]

    out = tmp_path / "two"
    port = _free_port()
    cmd = [sys.executable, "-m", "jaxqlora.cli", "finetune", *_args(tiny_run, out), "--mesh", "data=2,fsdp=2",
           "--distributed", "--coordinator-address", f"localhost:{port}", "--num-processes", "2"]
    procs = [subprocess.Popen([*cmd, "--process-id", str(i)], env=_env(2), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=300)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:  # a process left waiting for its peer's collectives is stopped
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r in results:
        _check(r)
    assert "validation: accuracy" in results[0].stdout and "validation" not in results[1].stdout
    got = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in got] == [m["step"] for m in ref]  # written once, by process 0
    np.testing.assert_allclose([m["loss"] for m in got], [m["loss"] for m in ref], rtol=1e-5)
    np.testing.assert_allclose([m["grad_norm"] for m in got], [m["grad_norm"] for m in ref], rtol=1e-4)
    a, b = (json.loads((d / "results.json").read_text()) for d in (out, ref_out))
    assert a["validation"] == b["validation"] and a["test"] == b["test"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]


# ------------------------------------------------------------------------- errors


def test_mesh_spec_and_size_errors():
    assert sharding.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4}
    assert sharding.parse_mesh(" fsdp=8 ") == {"fsdp": 8}
    for bad in ("data=2,model=4", "data=0", "data=x", "data=2,data=2", "data", ""):
        with pytest.raises(ShardingError, match="--mesh"):
            sharding.parse_mesh(bad)
    import jax

    n = jax.device_count()
    with pytest.raises(ShardingError, match=f"but {n} devices are visible"):
        sharding.make_mesh(data=n + 1)
    with pytest.raises(ShardingError, match="not divisible by data x fsdp = 3"):
        sharding.check_batch_size(16, jax.sharding.AbstractMesh((3, 1), sharding.BATCH_AXES))


def test_cli_mesh_error_exits_2(capsys):
    """A mesh larger than the visible devices stops ``jaxqlora finetune`` before any work."""
    import jax

    from jaxqlora.cli import main

    assert main(["finetune", "--mesh", f"data={jax.device_count() + 1}"]) == 2
    assert "devices are visible" in capsys.readouterr().err


_MESH_ESTIMATE = r"""
import json, sys
import jax
from jaxqlora import sharding
from jaxqlora.data import batch_spec
from jaxqlora.finetune import FinetuneConfig, _load_model, finetune
from jaxqlora.train import Trainer, classification_loss, make_optimizer

kw = json.loads(sys.argv[1])
dry = finetune(FinetuneConfig(**kw, dry_run=True), log=lambda *_: None)
mesh = sharding.make_mesh(**sharding.parse_mesh(kw["mesh"]))
model = _load_model(FinetuneConfig(**kw), 2, lambda *_: None)
trainer = Trainer(model, classification_loss, make_optimizer(total_steps=10)[0], mesh=mesh)
held = sharding.bytes_per_device((trainer.trainable, trainer.rng_state, trainer.opt_state, trainer.frozen))
batch = batch_spec(8, 32, causal_lm=False, accum=1, sharding=sharding.batch_sharding(mesh, 1))
rows = sharding.bytes_per_device(batch)
print(json.dumps({"dry": dry["memory"]["per_step"], "held": held, "batch": rows,
                  "single": sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(
                      (trainer.trainable, trainer.rng_state, trainer.opt_state, trainer.frozen)))}))
"""


def test_mesh_dry_run_estimates_each_devices_shard(tiny_run):
    """``finetune(dry_run=True)`` on a ``fsdp=4`` mesh compiles from shapes with the mesh's
    shardings: the train step's per-device arguments are what each device really holds once
    the model is loaded and placed (FSDP shards of the frozen weights, replicated LoRA and
    AdamW state; counted from the placed arrays' shards)."""
    kw = dict(model=str(tiny_run / "model"), data=str(tiny_run / "d.csv"), dtype="float32", rank=2, alpha=4.0,
              batch_size=8, max_seq_len=32, buckets=[32], eval_batch_size=8, mesh="fsdp=4", output="unused")
    proc = subprocess.run([sys.executable, "-c", _MESH_ESTIMATE, json.dumps(kw)], env=_env(4), capture_output=True,
                          text=True, timeout=600)
    _check(proc)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    train = r["dry"]["train (1, 8, 32)"]
    held = max(r["held"].values())
    assert len(r["held"]) == 4 and held < 0.5 * r["single"]  # the frozen weights are split four ways
    # resident state the step does not read (the classifier's LM head) counts as "unread"
    assert train["argument"] + train["unread"] == held
    assert train["argument"] > max(r["batch"].values())  # the step's reads include its batch rows
