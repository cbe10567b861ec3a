"""Subprocess side of tests/test_sharding.py (needs several CPU devices, so a fresh JAX).

    python tests/sharding_worker.py meshes OUT.json CKPT_DIR   # with 8 host devices:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu

Trains a tiny random NF4 + LoRA Llama (float32, dropout on) for three steps of a
[2 micro-batches x 8 rows] batch on one device and on the meshes (8,1), (2,4), (1,8);
the (2,4) run checkpoints after two steps and the checkpoint is resumed on (1,1) and
(8,1) for step three; measures the frozen bytes per device; and runs the Pallas kernels
(interpret mode, the GPU path) on (1,2), (2,1) and one device, counting the collectives
of the compiled (2,1) step. Writes losses, LoRA
parameters (as lists) and byte counts to OUT.json for the test to compare.
"""

from __future__ import annotations

import functools
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxqlora import sharding
from jaxqlora.checkpoint import TrainCheckpointer
from jaxqlora.config import ModelConfig
from jaxqlora.lora import apply_lora, lora_layers
from jaxqlora.model import CausalLM
from jaxqlora.nf4 import quantize_nf4
from jaxqlora.quantize import quantize_model
from jaxqlora import train
from jaxqlora.train import Trainer, causal_lm_loss, make_optimizer

jax.config.update("jax_default_matmul_precision", "highest")
train.CE_CHUNK_TOKENS = 32  # the loss in several chunks of 4 positions x 8 rows (15 positions: one padded chunk)

COMPILES = []  # one entry per XLA compilation (jax.monitoring event)
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **_: COMPILES.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)

# Every NF4 weight has rows divisible by 8 and whole 64-element blocks per shard; the
# embeddings and LM head [256, 256] split by rows.
CONFIG = ModelConfig(arch="llama", vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64)
ACCUM, ROWS, LENGTH, STEPS = 2, 8, 16, 3
# smaller still for the Pallas kernels in interpret mode
PALLAS_CONFIG = ModelConfig(arch="llama", vocab_size=256, hidden_size=128, intermediate_size=256,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=64)


def build_model(seed: int = 0, config: ModelConfig | None = None) -> CausalLM:
    """The same tiny model on every call: random float32 weights, NF4 (double quant), LoRA
    r=4 on all projections with dropout 0.1 and random lora_B (so lora_A gets gradients)."""
    lm = CausalLM(config or CONFIG, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    quantize_model(lm)
    apply_lora(lm, r=4, alpha=8.0, dropout=0.1, seed=seed + 1)
    rng = np.random.default_rng(seed + 2)
    for layer in lora_layers(lm).values():
        layer.lora_B[...] = jnp.asarray(rng.normal(0, 0.2, layer.lora_B[...].shape), jnp.float32)
    return lm


def batches(seed: int = 3) -> list[dict[str, np.ndarray]]:
    """STEPS random right-padded batches [ACCUM, ROWS, LENGTH] with loss masks of varied counts."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(STEPS):
        lengths = rng.integers(4, LENGTH + 1, (ACCUM, ROWS))
        pos = np.arange(LENGTH)
        mask = (pos < lengths[..., None]).astype(np.int32)
        ids = (rng.integers(1, CONFIG.vocab_size, (ACCUM, ROWS, LENGTH)) * mask).astype(np.int32)
        start = rng.integers(0, 3, (ACCUM, ROWS))
        loss_mask = ((pos >= start[..., None]) & (pos < lengths[..., None] - 1)).astype(np.float32)
        out.append({"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask,
                    "weight": np.ones((ACCUM, ROWS), np.float32)})
    return out


def new_trainer(mesh, config: ModelConfig | None = None) -> Trainer:
    """A fresh trainer of `build_model` (AdamW, lr 1e-2, no warmup beyond the first step)."""
    opt, _ = make_optimizer(1e-2, total_steps=10, warmup_ratio=0.0)
    return Trainer(build_model(config=config), causal_lm_loss, opt, mesh=mesh)


def lora_params(trainer: Trainer) -> dict[str, list]:
    """The trainer's LoRA factors as nested lists (float32 values)."""
    return {jax.tree_util.keystr(p): np.asarray(x, np.float32).tolist()
            for p, x in jax.tree_util.tree_leaves_with_path(trainer.trainable)}


def run(trainer: Trainer, data, start: int = 0, compiles: list | None = None) -> list[float]:
    """Steps over data[start:]; returns the losses (and appends each step's XLA compile
    count to ``compiles``)."""
    losses = []
    for b in data[start:]:
        n = len(COMPILES)
        losses.append(float(trainer.step(b)["loss"]))
        if compiles is not None:
            compiles.append(len(COMPILES) - n)
    return losses


def mesh_of(data: int, fsdp: int):
    """A (data, fsdp) mesh over the first data * fsdp devices."""
    return sharding.make_mesh(data, fsdp, devices=jax.devices()[:data * fsdp])


def collectives(trainer: Trainer, batch) -> dict[str, int]:
    """How many all-gather / all-reduce / reduce-scatter / all-to-all ops the compiled train
    step of ``batch`` holds (from its optimized HLO text)."""
    args = (trainer.trainable, trainer.rng_state, trainer.opt_state, trainer.frozen,
            sharding.shard_batch(batch, trainer.mesh))
    with sharding.use_mesh(trainer.mesh):
        text = trainer._step.lower(*args).compile().as_text()
    ops = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all")
    return {op: len(re.findall(rf" {op}(?:-start)?\(", text)) for op in ops}


def meshes(path: str, folder: str) -> None:
    data = batches()
    result = {"devices": jax.device_count()}
    ref = new_trainer(None)
    result["initial_lora"] = lora_params(ref)
    result["single"] = {"loss": run(ref, data), "lora": lora_params(ref),
                        "frozen_bytes": sum(sharding.bytes_per_device(ref.frozen).values())}
    for shape in ((8, 1), (2, 4), (1, 8)):
        t = new_trainer(mesh_of(*shape))
        compiles = []
        losses = run(t, data[:2], compiles=compiles)
        if shape == (2, 4):  # checkpoint after two steps; resumed below on other meshes
            ckpt = TrainCheckpointer(folder)
            ckpt.save(t, step=2, epoch=0, batch=2)
            ckpt.close()
        losses += run(t, data, 2, compiles=compiles)
        result[str(shape)] = {"loss": losses, "lora": lora_params(t), "compiles_per_step": compiles,
                              "frozen_bytes_per_device": sharding.bytes_per_device(t.frozen)}

    # resume the (2, 4) checkpoint of step 2 elsewhere and take step 3
    result["resumed"] = {}
    for name, mesh in (("(1, 1)", mesh_of(1, 1)), ("(8, 1)", mesh_of(8, 1))):
        r = new_trainer(mesh)
        ckpt = TrainCheckpointer(folder)
        restored = ckpt.restore_latest(r)
        ckpt.close()
        result["resumed"][name] = {"restored": list(restored), "loss": run(r, data, 2), "lora": lora_params(r)}

    # a weight whose rows do not split into 8 shards is replicated, with a note
    q = quantize_nf4(np.random.default_rng(0).normal(size=(12, 128)).astype(np.float32))
    shardings, notes = sharding.frozen_shardings({"w": q}, mesh_of(1, 8))
    result["indivisible"] = {"notes": notes, "packed_replicated": shardings["w"].packed.is_fully_replicated}

    # the GPU path: every Pallas kernel of a train step (NF4 matmul, RMSNorm, SwiGLU; interpret
    # mode) on (1, 2) and (2, 1) vs one device, and the collectives in the compiled DP step
    import pallas_kernels.nf4_matmul as kernels
    from jaxqlora import model as model_module

    kernels.nf4_matmul = functools.partial(kernels.nf4_matmul, impl="pallas", interpret=True)
    for op in ("rms_norm", "add_rms_norm", "swiglu"):
        setattr(model_module, op, functools.partial(getattr(model_module, op), impl="pallas", interpret=True))
    result["pallas"] = {}
    for name, mesh in (("single", None), ("(1, 2)", mesh_of(1, 2)), ("(2, 1)", mesh_of(2, 1))):
        t = new_trainer(mesh, PALLAS_CONFIG)
        result["pallas"][name] = {"loss": run(t, data[:2]), "lora": lora_params(t)}
        if name == "(2, 1)":
            result["pallas"][name]["collectives"] = collectives(t, data[0])
    with open(path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    {"meshes": meshes}[sys.argv[1]](*sys.argv[2:])
