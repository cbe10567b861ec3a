"""Benchmark of pallas_kernels.nf4_matmul on a GPU (Pallas Triton backend).

For NF4 weights (blocksize 64, double quantization, bitsandbytes layout) of
Llama-7B's MLP shapes W [N, K] = [4096, 11008] (down_proj) and [11008, 4096]
(gate/up_proj), and bfloat16 activations x [M, K] with M = 1, 16, 512, 4096:

1. checks the Pallas path against the XLA reference path on random data
   (relative error in norm, forward and the transposed dx kernel);
2. times the Pallas forward, the XLA reference path (jnp dequantize + dot), a
   dense bfloat16 matmul ``x @ W_bf16.T`` and, once, a large device-to-device
   copy (the HBM bandwidth ceiling);
3. times the backward ``dx = dy @ W`` (the transposed NF4 kernel) against the
   XLA backward and the dense bf16 ``dy @ W_bf16`` for M = 512 and 4096.

Timing: compile + warm up, then per round queue ``--calls`` calls, one
``block_until_ready``, and report the median over ``--rounds`` rounds.
"NF4 GB/s" is the quantized weight's bytes (packed codes + uint8 absmax +
nested tables) divided by the time, for every row (what a weight-streaming
kernel must reach; compare with the copy ceiling).

Usage (on a GPU machine, from the repository root)::

    python benchmarks/nf4_matmul.py            # full run
    python benchmarks/nf4_matmul.py --quick    # one shape, M = 1 and 512, fewer rounds
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.nf4_matmul import (  # noqa: E402
    NF4_CODE,
    nf4_dequantize_reference,
    nf4_matmul,
    nf4_matmul_t_pallas,
)

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256


def bench(fn, *args, calls: int, rounds: int) -> float:
    """Median seconds per call of ``fn(*args)`` (async queue of ``calls`` calls)."""
    jax.block_until_ready(fn(*args))  # compile
    for _ in range(3):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = None
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def random_weight(key, n: int, k: int):
    """Random double-quantized NF4 operands, bnb layout, as device arrays."""
    kp, ka, kn, kc = jax.random.split(key, 4)
    nblocks = n * k // BLOCKSIZE
    packed = jax.random.randint(kp, (n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
    absmax = jax.random.randint(ka, (n, k // BLOCKSIZE), 0, 256, jnp.int32).astype(jnp.uint8)
    nested_absmax = jax.random.uniform(kn, (-(-nblocks // NESTED_BLOCKSIZE),),
                                       jnp.float32, 0.01, 0.05)
    nested_code = jnp.sort(jax.random.uniform(kc, (256,), jnp.float32, -1.0, 1.0))
    offset = jnp.float32(0.08)
    return packed, absmax, nested_absmax, nested_code, offset


def nbytes(*arrays) -> int:
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in arrays)


def rel_err(a, b) -> float:
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one shape, M=1,512, 3 rounds")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)

    shapes = [(4096, 11008), (11008, 4096)]
    ms = [1, 16, 512, 4096]
    bwd_ms = [512, 4096]
    calls, rounds = args.calls, args.rounds
    if args.quick:
        shapes, ms, bwd_ms = shapes[:1], [1, 512], [512]
        calls, rounds = min(calls, 20), min(rounds, 3)

    dev = jax.devices()[0]
    print(f"# nf4_matmul benchmark  {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"# device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, "
          f"backend {jax.default_backend()}")
    print(f"# NF4 blocksize {BLOCKSIZE}, double quant (nested {NESTED_BLOCKSIZE}), "
          f"x bf16; median of {rounds} rounds x {calls} queued calls")
    if jax.default_backend() != "gpu":
        print("# WARNING: not a GPU backend; the pallas path will not compile here.")

    # Bandwidth ceiling: a 1 GiB device-to-device elementwise copy (read + write).
    big = jnp.zeros((256 * 1024 * 1024,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    t_copy = bench(copy, big, calls=max(calls // 5, 5), rounds=rounds)
    copy_gbs = 2 * big.nbytes / t_copy / 1e9
    print(f"# d2d copy of {big.nbytes / 2**30:.0f} GiB: {t_copy * 1e6:.0f} us, "
          f"{copy_gbs:.0f} GB/s (read + write)")
    del big

    key = jax.random.PRNGKey(0)
    fwd_pallas = jax.jit(lambda x, *w: nf4_matmul(x, *w, blocksize=BLOCKSIZE, impl="pallas"))
    fwd_xla = jax.jit(lambda x, *w: nf4_matmul(x, *w, blocksize=BLOCKSIZE, impl="xla"))
    dense = jax.jit(lambda x, w: x @ w.T)
    dense_t = jax.jit(lambda dy, w: dy @ w)
    bwd_pallas = jax.jit(lambda dy, p, a, na, nc, off: nf4_matmul_t_pallas(
        dy, p, a, jnp.asarray(NF4_CODE), na, nc, off, blocksize=BLOCKSIZE,
        nested_blocksize=NESTED_BLOCKSIZE))

    def bwd_via(impl):
        def f(x, dy, *w):
            _, vjp = jax.vjp(lambda x: nf4_matmul(x, *w, blocksize=BLOCKSIZE, impl=impl), x)
            return vjp(dy)[0]
        return jax.jit(f)

    bwd_xla = bwd_via("xla")
    bwd_pallas_vjp = bwd_via("pallas")

    header = (f"{'W [N,K]':>13} {'M':>5} {'op':>14} {'time us':>10} {'NF4 GB/s':>9} "
              f"{'TFLOP/s':>8} {'vs xla':>7} {'vs bf16':>7}")
    rows = []
    for n, k in shapes:
        key, kw, kx, kd = jax.random.split(key, 4)
        w = random_weight(kw, n, k)
        w_bytes = nbytes(*w[:3])
        w_bf16 = nf4_dequantize_reference(*w, shape=(n, k), blocksize=BLOCKSIZE).astype(
            jnp.bfloat16)
        print(f"\n## W [{n}, {k}]: NF4 weight {w_bytes / 2**20:.1f} MiB, "
              f"bf16 {w_bf16.nbytes / 2**20:.1f} MiB")

        # Correctness first: pallas vs xla on random data.
        for m in ms:
            x = jax.random.normal(jax.random.fold_in(kx, m), (m, k), jnp.bfloat16)
            e = rel_err(fwd_pallas(x, *w), fwd_xla(x, *w))
            status = "ok" if e < 1e-2 else "MISMATCH"
            print(f"# check forward M={m}: rel err pallas vs xla {e:.2e} {status}")
        for m in bwd_ms:
            x = jax.random.normal(jax.random.fold_in(kx, m), (m, k), jnp.bfloat16)
            dy = jax.random.normal(jax.random.fold_in(kd, m), (m, n), jnp.bfloat16)
            e = rel_err(bwd_pallas_vjp(x, dy, *w), bwd_xla(x, dy, *w))
            status = "ok" if e < 1e-2 else "MISMATCH"
            print(f"# check backward dx M={m}: rel err pallas vs xla {e:.2e} {status}")

        print(header)
        for m in ms:
            x = jax.random.normal(jax.random.fold_in(kx, m), (m, k), jnp.bfloat16)
            flops = 2.0 * m * n * k
            t = {
                "pallas fwd": bench(fwd_pallas, x, *w, calls=calls, rounds=rounds),
                "xla fwd": bench(fwd_xla, x, *w, calls=calls, rounds=rounds),
                "bf16 dense": bench(dense, x, w_bf16, calls=calls, rounds=rounds),
            }
            for op, sec in t.items():
                line = (f"{f'[{n},{k}]':>13} {m:>5} {op:>14} {sec * 1e6:>10.1f} "
                        f"{w_bytes / sec / 1e9:>9.0f} {flops / sec / 1e12:>8.1f} "
                        f"{t['xla fwd'] / sec:>7.2f} {t['bf16 dense'] / sec:>7.2f}")
                print(line)
                rows.append(line)
        for m in bwd_ms:
            dy = jax.random.normal(jax.random.fold_in(kd, m), (m, n), jnp.bfloat16)
            x = jax.random.normal(jax.random.fold_in(kx, m), (m, k), jnp.bfloat16)
            flops = 2.0 * m * n * k
            t = {
                "pallas dx": bench(bwd_pallas, dy, *w, calls=calls, rounds=rounds),
                "xla dx": bench(bwd_xla, x, dy, *w, calls=calls, rounds=rounds),
                "bf16 dense dx": bench(dense_t, dy, w_bf16, calls=calls, rounds=rounds),
            }
            for op, sec in t.items():
                line = (f"{f'[{n},{k}]':>13} {m:>5} {op:>14} {sec * 1e6:>10.1f} "
                        f"{w_bytes / sec / 1e9:>9.0f} {flops / sec / 1e12:>8.1f} "
                        f"{t['xla dx'] / sec:>7.2f} {t['bf16 dense dx'] / sec:>7.2f}")
                print(line)
                rows.append(line)
        del w_bf16

    print("\n## summary (ratios > 1: faster than the reference column)")
    print(f"# copy ceiling {copy_gbs:.0f} GB/s (read + write)")
    print(header)
    for line in rows:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
