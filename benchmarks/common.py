"""Shared pieces of the end-to-end benchmarks (train.py, generate.py, compile.py).

- Model shapes: Llama-3-8B and SmolLM2-135M (`MODELS`), plus a tiny ``smoke`` shape for
  checking the scripts on a CPU.
- `random_nf4_model`: a `CausalLM` whose projections are random NF4 (double quantization,
  blocksize 64) built directly on the device, one tensor at a time: random packed codes
  and absmax codes, never a bf16 copy of the weights (16 GB for the 8B shape).
- `peer_model`: the same shape in transformers with bitsandbytes 4-bit projections (CUDA
  only), for the side-by-side rows.
- `bench`: JAX timing as in kernels.py (warm up, queue calls, one sync, median of rounds).
- `run_worker`: each model/config runs in its own subprocess, so that peak memory is per
  configuration and JAX and torch never share a GPU process; the worker prints one JSON
  line, the parent collects them into the table.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jaxqlora.config import ModelConfig  # noqa: E402
from jaxqlora.lora import ALL_TARGETS as TARGETS, ATTENTION_TARGETS, MLP_TARGETS  # noqa: E402

MODELS = {
    # meta-llama/Meta-Llama-3-8B config.json (RoPE scaling of 3.1 left out: same cost)
    "llama3-8b": ModelConfig(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                             rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192),
    # HuggingFaceTB/SmolLM2-135M-Instruct (REFERENCE.md section 3)
    "smollm2-135m": ModelConfig(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
                                tie_word_embeddings=True),
    # CPU check of the scripts (--smoke)
    "smoke": ModelConfig(arch="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024),
}


# ------------------------------------------------------------------ JAX side


def abstract_nf4_model(cfg: ModelConfig, *, dtype=None, lora: bool = False, remat=False, dropout: float = 0.05):
    """The NF4 `CausalLM` of ``cfg`` as shapes only (``nnx.eval_shape``; no memory), with
    LoRA r=16 alpha=32 (``dropout``) on the seven projections when ``lora``."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxqlora.lora import apply_lora
    from jaxqlora.model import CausalLM
    from jaxqlora.quantize import quantize_model

    def build():
        lm = CausalLM(cfg, dtype=jnp.bfloat16 if dtype is None else dtype, rngs=nnx.Rngs(0))
        quantize_model(lm)
        if lora:
            apply_lora(lm, r=16, alpha=32.0, dropout=dropout)
        lm.remat = remat
        return lm

    return nnx.eval_shape(build)


def random_nf4_model(cfg: ModelConfig, *, seed: int = 0, dtype=None):
    """A `CausalLM` of ``cfg`` with random NF4 projections (blocksize 64, double quant),
    random bf16 embeddings / LM head (std 0.02) and unit norms, made on the device leaf by
    leaf. Dequantized projection weights have std about 0.02 (codes uniform over the NF4
    codebook, absmax 0.03 ... 0.05)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxqlora.nf4 import NF4_CODE, create_dynamic_map

    graphdef, state = nnx.split(abstract_nf4_model(cfg, dtype=dtype))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    nested_code = jnp.asarray(create_dynamic_map(signed=True))
    fill = jax.jit(_fill, static_argnums=(0, 1, 2))
    out = []
    for i, (path, x) in enumerate(leaves):
        name = jax.tree_util.keystr(path)
        if name.endswith(".nested_code"):  # code tables: one copy per stacked layer
            out.append(jnp.broadcast_to(nested_code, x.shape))
        elif name.endswith(".code"):
            out.append(jnp.broadcast_to(jnp.asarray(NF4_CODE), x.shape))
        else:
            kind = ("offset" if name.endswith(".offset") else "nested_absmax" if name.endswith(".nested_absmax")
                    else "scale" if name.endswith(".kernel_scale")
                    else "bits" if x.dtype == jnp.uint8 else "ones" if "norm']" in name else "normal")
            out.append(fill(kind, tuple(x.shape), jnp.dtype(x.dtype), jax.random.key(seed * 100003 + i)))
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, out))


def _fill(kind, shape, dtype, key):
    import jax
    import jax.numpy as jnp

    if kind == "bits":
        return jax.random.bits(key, shape, jnp.uint8)
    if kind == "offset":
        return jnp.full(shape, 0.04, dtype)
    if kind == "nested_absmax":
        return jax.random.uniform(key, shape, dtype, 0.008, 0.012)
    if kind == "ones":
        return jnp.ones(shape, dtype)
    if kind == "scale":  # NF4Weight.kernel_scale: decoded absmax, as the nested values give
        return jax.random.uniform(key, shape, jnp.float32, 0.03, 0.05).astype(dtype)
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


#: ``--in-place`` of benchmarks/train.py and gpu_profile.py -> `jaxqlora.model.CausalLM.params_in_place`
IN_PLACE = {"default": None, "off": False, "on": True}


def causal_batch(cfg: ModelConfig, batch: int, length: int, seed: int = 0) -> dict:
    """One train step's host batch ``[1, batch, length]``: random token ids, no padding,
    the loss over every token."""
    import numpy as np

    ids = np.random.default_rng(seed).integers(1, cfg.vocab_size, (1, batch, length)).astype(np.int32)
    ones = np.ones((1, batch, length), np.float32)
    return {"input_ids": ids, "attention_mask": ones.astype(np.int32), "loss_mask": ones, "weight": ones[:, :, 0]}


def bench(fn, *, calls: int, rounds: int, warmup: int = 2) -> float:
    """Median seconds per call of ``fn()`` (JAX): ``warmup`` calls, then per round ``calls``
    queued calls and one ``block_until_ready`` on the last result."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = None
        for _ in range(calls):
            out = fn()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def peak_bytes() -> int | None:
    """JAX's peak device memory in use (bytes) so far in this process; None where the
    backend keeps no statistics (CPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0))


def copy_bandwidth(nbytes: int = 1 << 30, calls: int = 10, rounds: int = 5) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write) of an ``nbytes`` array."""
    import jax
    import jax.numpy as jnp

    big = jnp.zeros((nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    t = bench(lambda: copy(big), calls=calls, rounds=rounds)
    return 2 * big.nbytes / t


class TokenIds:
    """What `jaxqlora.generate` needs of a tokenizer when prompts are token ids and EOS is ignored."""

    eos_token_id, pad_token_id, eos_token_ids = 0, 0, frozenset()


# ------------------------------------------------------------------ peer side


def peer_available() -> str | None:
    """None when transformers + PEFT + bitsandbytes run on a CUDA GPU here, else the reason."""
    try:
        import torch
    except ImportError as e:
        return f"no torch ({e})"
    if not torch.cuda.is_available():
        return "torch has no CUDA device"
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except Exception as e:  # bitsandbytes raises various errors without its CUDA library
        return f"{type(e).__name__}: {e}"
    return None


def peer_model(cfg: ModelConfig, device: str = "cuda"):
    """transformers ``LlamaForCausalLM`` of ``cfg`` on CUDA, bf16, with every projection a
    bitsandbytes ``Linear4bit`` (NF4, double quantization, bf16 compute), quantized on the
    GPU one projection at a time from transformers' random init. Resets torch's peak
    memory statistics afterwards."""
    import bitsandbytes as bnb
    import torch
    import transformers

    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures",)})
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf_cfg)
    torch.set_default_dtype(torch.float32)
    for layer in model.model.layers:
        for owner, names in ((layer.self_attn, ATTENTION_TARGETS), (layer.mlp, MLP_TARGETS)):
            for name in names:
                lin = getattr(owner, name)
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      compress_statistics=True, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4", module=q).to(device)
                setattr(owner, name, q)
                del lin
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    return model


def torch_time(fn, *, calls: int, rounds: int, warmup: int = 2) -> float:
    """Median seconds per call of ``fn()`` on CUDA (synchronised per round)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


# --------------------------------------------------------------- subprocesses


def run_worker(script: str, args: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run ``python script --worker ...args`` and return its last stdout line as JSON, or
    ``{"error": ...}`` (non-zero exit, timeout, no JSON). stderr passes through."""
    cmd = [sys.executable, script, *args]
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                    XLA_PYTHON_CLIENT_MEM_FRACTION=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95"))
    full_env.update(env or {})
    if timeout <= 5:
        return {"error": "skipped: out of time budget"}
    try:
        proc = subprocess.run(cmd, env=full_env, stdout=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit code {proc.returncode}" + (f": {proc.stdout.strip()[-300:]}" if proc.stdout else "")}
    return json.loads(lines[-1])


class TreeWorker:
    """A long-lived worker process running ``script --worker *args`` over the source tree at
    ``root`` (CPU only): it prints one JSON line when ready (`info`) and one per command
    read from stdin (`ask`). Used by the same-run comparisons of two trees (cpu_train.py,
    cpu_generate.py), so that both trees' workers alternate on one machine."""

    def __init__(self, name: str, root: Path, script: str, args: list[str]):
        self.name = name
        env = dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu")
        self.proc = subprocess.Popen([sys.executable, str(Path(script).resolve()), "--worker", *args],
                                     cwd=str(root), env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.info = self._read()

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"worker {self.name} exited with {self.proc.wait()}")
            if line.startswith("{"):
                return json.loads(line)

    def ask(self, cmd: str) -> dict:
        """Send one command line; return the worker's JSON answer."""
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@contextlib.contextmanager
def base_tree(rev: str, prefix: str):
    """A ``git worktree`` of ``rev`` in a temporary folder (its path), removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    subprocess.run(["git", "worktree", "add", "--detach", str(tmp / "tree"), rev], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    try:
        yield tmp / "tree"
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "tree")], cwd=ROOT)
        shutil.rmtree(tmp, ignore_errors=True)


def tree_state() -> tuple[str, str]:
    """``(short HEAD commit, git status --porcelain of tracked files)`` of this tree."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, stdout=subprocess.PIPE, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           stdout=subprocess.PIPE, text=True).stdout.strip()
    return head.strip(), dirty


def spread(values: list[float], fmt: str = ".2f") -> str:
    """``median [min-max]`` of ``values`` in ``fmt``."""
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def emit(result: dict) -> None:
    """Print a worker's result as the JSON line `run_worker` reads."""
    print(json.dumps(result), flush=True)


def device_line() -> str:
    """``date | device | jax version`` for table headers."""
    import datetime

    import jax

    return f"{datetime.date.today()} | {jax.devices()[0].device_kind} | jax {jax.__version__}"


def gb(x) -> str:
    """Bytes as GB (1e9) with one decimal, or n/a."""
    return "n/a" if x is None else f"{x / 1e9:.1f}"
