"""GGUF GEMV timing at decode (M = 1): the Mosaic GPU kernel (`pallas_kernels.gguf_mgpu`)
against the Pallas-Triton GGUF kernel (`pallas_kernels.gguf_matmul`, ``impl="pallas"``) and
XLA's dequantize + dot (``impl="xla"``), Llama-3-8B projection shapes, bfloat16 x.

Per (format, shape): fresh random GGUF blocks (finite f16 fields, weights of magnitude
about 0.02) and a fresh random x; first every path's result is compared with the float64
product of ``gguf.quants.dequantize`` (the relative error printed; the Mosaic kernel's
float32 result must be within float32 summation of it, else the script stops before
timing); then each path is timed: warm-up calls, then per round ``--calls`` queued calls
and one ``block_until_ready``, the median over ``--rounds`` rounds. The Mosaic kernel's
layout (`gguf_kernel_layout`) is made once before timing, as a model would at load time.

    python benchmarks/gguf_mgpu.py                      # Q4_K and Q6_K, 4096x4096, 14336x4096, 4096x14336
    python benchmarks/gguf_mgpu.py --formats Q4_K,Q6_K,Q8_0,Q4_0,Q4_1 --mixed
    python benchmarks/gguf_mgpu.py --sweep              # Mosaic only: splits x stages per shape
    python benchmarks/gguf_mgpu.py --smoke              # CPU: small shapes, the XLA path and the checks only

Output: one line per path and a ratio table (Triton / Mosaic, XLA / Mosaic), with the
bytes of the stored blocks and the bandwidth they imply.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))  # kernel_checks: the tests' random GGUF blocks

import gguf
import jax
import jax.numpy as jnp
import numpy as np
from common import bench
from kernel_checks import random_blocks, stacked_planes

from pallas_kernels import gguf_q4_0, gguf_q4_1, gguf_q4_k, gguf_q6_k, gguf_q8_0
from pallas_kernels.gguf_matmul import gguf_matmul
from pallas_kernels.gguf_mgpu import (
    gguf_kernel_layout,
    gguf_mgpu_kernel,
    gguf_mgpu_supported,
)

MODULES = {m.NAME: m for m in (gguf_q4_0, gguf_q4_1, gguf_q8_0, gguf_q4_k, gguf_q6_k)}
SUB = {"Q4_K": 32, "Q6_K": 16, "Q4_0": 32, "Q4_1": 32, "Q8_0": 32}
#: Llama-3-8B: q/o (4096x4096), gate/up (14336x4096), down (4096x14336); [N, K]
SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))
T = gguf.GGMLQuantizationType



#: f16 field scale per format: weights of magnitude about 0.02
FIELD_SCALE = {"Q4_K": 1e-3, "Q6_K": 1e-3, "Q4_0": 3e-3, "Q4_1": 3e-3, "Q8_0": 2e-4}



def run_case(rng, types, layer, n, k, *, calls, rounds, gpu, mosaic):
    """Check and time one projection: ``types`` the stacked layers' formats, ``layer`` the
    one multiplied. Returns ``{path: seconds}``."""
    raws = [random_blocks(rng, q, n, k, FIELD_SCALE[q]) for q in types]
    planes, kind, names = stacked_planes(raws, types, k)
    fmts = tuple(MODULES[q] for q in names)
    qtype = types[layer]
    x = jnp.asarray(rng.standard_normal((1, k)), jnp.bfloat16)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    w64 = gguf.quants.dequantize(raws[layer], T[qtype]).reshape(n, k).astype(np.float64)
    want = x64 @ w64.T
    absum = np.abs(x64) @ np.abs(w64).T
    li = jnp.int32(layer)
    paths = {"xla dequant+dot": jax.jit(lambda x, p, kd, i: gguf_matmul(x, p, kd, fmts=fmts, layer=i, impl="xla"))}
    args = {"xla dequant+dot": (x, planes, kind, li)}
    if gpu:
        paths["triton"] = jax.jit(lambda x, p, kd, i: gguf_matmul(x, p, kd, fmts=fmts, layer=i, impl="pallas"))
        args["triton"] = (x, planes, kind, li)
    if mosaic:
        ops = jax.block_until_ready(jax.jit(lambda p, kd: gguf_kernel_layout(p, names, kd))(planes, kind))
        f32 = gguf_mgpu_kernel(x, ops, kind, li, fmts=names, out_dtype=jnp.float32)
        err = np.abs(np.asarray(f32, np.float64) - want)
        depth = SUB[qtype] + 2 * (k // SUB[qtype]) + 16
        if not (err <= depth * 2.0 ** -23 * absum + 1e-30).all():
            raise SystemExit(f"mosaic {qtype} {n}x{k}: error {err.max():.3g} beyond float32 summation "
                             f"(max |y| {np.abs(want).max():.3g}); not timing")
        paths["mosaic"] = jax.jit(lambda x, o, kd, i: gguf_mgpu_kernel(x, o, kd, i, fmts=names))
        args["mosaic"] = (x, ops, kind, li)
    nbytes = n * (k // MODULES[qtype].BLOCK) * MODULES[qtype].TYPE_SIZE
    out = {}
    label = "+".join(types) + f"[{layer}]" if len(types) > 1 else qtype
    for name, f in paths.items():
        y = np.asarray(f(*args[name]).astype(jnp.float32), np.float64)
        rel = np.linalg.norm(y - want) / np.linalg.norm(want)
        t = bench(functools.partial(f, *args[name]), calls=calls, rounds=rounds, warmup=3)
        out[name] = t
        print(f"{label:14s} {n:5d}x{k:<5d} {name:16s} {t * 1e6:9.1f} us  {nbytes / t / 1e9:7.1f} GB/s "
              f"rel err (bf16 out) {rel:.2e}", flush=True)
    return out


def sweep(rng, qtypes, shapes, *, calls, rounds):
    """Mosaic kernel only: every ``splits`` (1, 2, 4, 8, 16 where each split keeps a step)
    and ``stages`` (1, 2, 4) per shape, each checked against float64 first; prints one line
    per setting and the best per shape."""
    for qtype in qtypes:
        for n, k in shapes:
            raw = random_blocks(rng, qtype, n, k, FIELD_SCALE[qtype])
            planes, kind, names = stacked_planes([raw], (qtype,), k)
            ops = jax.block_until_ready(jax.jit(functools.partial(gguf_kernel_layout, fmts=names))(planes, kind=kind))
            x = jnp.asarray(rng.standard_normal((1, k)), jnp.bfloat16)
            x64 = np.asarray(x.astype(jnp.float32), np.float64)
            w64 = gguf.quants.dequantize(raw, T[qtype]).reshape(n, k).astype(np.float64)
            want, absum = x64 @ w64.T, np.abs(x64) @ np.abs(w64).T
            steps = -(-k // 256)
            best = None
            for splits in (1, 2, 4, 8, 16):
                per = -(-steps // splits)
                if (splits - 1) * per >= steps:
                    continue
                for stages in (1, 2, 4):
                    if stages > per:
                        continue
                    f = jax.jit(functools.partial(gguf_mgpu_kernel, layer=jnp.int32(0), fmts=names, splits=splits,
                                                  stages=stages, out_dtype=jnp.float32))
                    err = np.abs(np.asarray(f(x, ops, kind), np.float64) - want)
                    ok = (err <= (SUB[qtype] + 2 * (k // SUB[qtype]) + 16) * 2.0 ** -23 * absum + 1e-30).all()
                    t = bench(functools.partial(f, x, ops, kind), calls=calls, rounds=rounds, warmup=3)
                    print(f"{qtype} {n:5d}x{k:<5d} splits={splits:2d} stages={stages} {t * 1e6:8.1f} us"
                          f"{'' if ok else '  WRONG (beyond float32 summation)'}", flush=True)
                    if ok and (best is None or t < best[0]):
                        best = (t, splits, stages)
            if best:
                print(f"# best {qtype} {n}x{k}: {best[0] * 1e6:.1f} us at splits={best[1]} stages={best[2]}",
                      flush=True)


def _us(t) -> str:
    return f"{t * 1e6:.1f}" if t else "-"


def _ratio(t, base) -> str:
    return f"{t / base:.2f}" if t and base else "-"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="Q4_K,Q6_K")
    ap.add_argument("--mixed", action="store_true", help="also a Q4_K/Q6_K/Q4_K stack, its Q6_K layer")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seed", type=int, default=None, help="default: fresh random data")
    ap.add_argument("--smoke", action="store_true", help="small shapes (CPU: the XLA path and checks only)")
    ap.add_argument("--sweep", action="store_true", help="Mosaic kernel only: splits x stages per shape")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(a.seed)
    gpu = jax.default_backend() == "gpu"
    shapes = ((200, 768),) if a.smoke else SHAPES
    calls, rounds = (2, 2) if a.smoke else (a.calls, a.rounds)
    dev = jax.devices()[0]
    print(f"# device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, M = 1, bf16 x", flush=True)
    if a.sweep:
        sweep(rng, a.formats.split(","), shapes, calls=calls, rounds=rounds)
        return 0
    cases = [((q,), 0) for q in a.formats.split(",")]
    if a.mixed:
        cases.append((("Q4_K", "Q6_K", "Q4_K"), 1))
    rows = []
    for types, layer in cases:
        for n, k in shapes:
            mosaic = gguf_mgpu_supported(1, n, k, tuple(sorted(set(types))), jnp.bfloat16)
            if not mosaic:
                print(f"# {types} {n}x{k}: Mosaic GPU kernel not supported here (needs a Hopper GPU)")
            t = run_case(rng, types, layer, n, k, calls=calls, rounds=rounds, gpu=gpu, mosaic=mosaic)
            rows.append(("+".join(types), n, k, t))
    print("\n| format | N x K | mosaic us | triton us | xla us | triton / mosaic | xla / mosaic |")
    print("|---|---|---|---|---|---|---|")
    for label, n, k, t in rows:
        m, tr, x = (t.get(p) for p in ("mosaic", "triton", "xla dequant+dot"))
        print(f"| {label} | {n}x{k} | {_us(m)} | {_us(tr)} | {_us(x)} | {_ratio(tr, m)} | {_ratio(x, m)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
