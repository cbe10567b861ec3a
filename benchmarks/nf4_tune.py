"""Tile sweep for the NF4 kernels of pallas_kernels.nf4_matmul on a GPU.

Times the split-K GEMV (forward, M <= 16) and the split-N transposed GEMV over
block_n x block_k x splits (x mma for M = 1), the dequantize kernel over its row
tile, and the tiled fused kernel for large M, each after a check against the
XLA reference on random data. Prints the best configurations per shape; the
defaults in pallas_kernels/nf4_matmul.py are chosen from its output.

Usage (GPU, repository root): ``python benchmarks/nf4_tune.py [--part gemv|gemv_t|large]``
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.nf4_matmul import BLOCKSIZE, bench, random_weight, rel_err  # noqa: E402
from pallas_kernels.nf4_matmul import (  # noqa: E402
    NF4_CODE, nf4_dequantize_pallas, nf4_dequantize_reference, nf4_gemv_pallas,
    nf4_gemv_t_pallas, nf4_matmul_pallas, nf4_matmul_reference)


REPEAT = 32  # kernels per jitted call for small ops (amortizes Python dispatch)


def inner(g, xs):
    """A jitted call running ``g`` on each of ``xs[0..REPEAT)``: back-to-back kernels."""
    f = jax.jit(lambda xs: jnp.stack([g(xs[i]) for i in range(xs.shape[0])]))
    return lambda: f(xs)


def sweep(name, make, ref, configs, calls, rounds, top=4, per_call=1):
    rows = []
    for cfg in configs:
        try:
            f = make(**cfg)
            out = f()
            err = rel_err(out[0] if per_call > 1 else out, ref)
            t = bench(f, calls=calls, rounds=rounds) / per_call
            rows.append((t, cfg, err))
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"  {name} {cfg}: FAILED {type(e).__name__}: {str(e)[:200]}")
    rows.sort(key=lambda r: r[0])
    for t, cfg, err in rows[:top]:
        print(f"  {name} {t * 1e6:8.1f} us  err {err:.1e}  {cfg}", flush=True)
    if rows:
        worst = rows[-1]
        print(f"  {name} worst {worst[0] * 1e6:8.1f} us {worst[1]}  ({len(rows)} configs)")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="all")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    key = jax.random.PRNGKey(0)
    code = jnp.asarray(NF4_CODE)
    tiny = jnp.ones((REPEAT, 8), jnp.float32) * 1.5
    t0 = bench(jax.jit(lambda v: v * 2.0), tiny[0], calls=200, rounds=5)
    t1 = bench(inner(lambda v: jnp.sin(v) * 2.0, tiny), calls=20, rounds=5) / REPEAT
    print(f"# dispatch floor: one tiny jitted op per call {t0 * 1e6:.1f} us; "
          f"per tiny kernel inside one jit {t1 * 1e6:.1f} us", flush=True)
    shapes = [(4096, 11008), (11008, 4096), (4096, 4096)]
    for (n, k) in shapes:
        w = random_weight(jax.random.fold_in(key, n), n, k)
        packed, absmax, na, nc, off = w
        wargs = (packed, absmax, code, na, nc, off)
        W = nf4_dequantize_reference(packed, absmax, na, nc, off, shape=(n, k),
                                     blocksize=BLOCKSIZE).astype(jnp.bfloat16)
        for m in (1, 16):
            if a.part not in ("all", "gemv", "gemv_t"):
                break
            xs = jax.random.normal(jax.random.fold_in(key, m), (REPEAT, m, k), jnp.bfloat16)
            dys = jax.random.normal(jax.random.fold_in(key, m + 1), (REPEAT, m, n), jnp.bfloat16)
            x, dy = xs[0], dys[0]
            ref = x @ W.T
            t_xla = bench(inner(lambda x: nf4_matmul_reference(
                x, packed, absmax, na, nc, off, blocksize=BLOCKSIZE), xs), calls=a.calls,
                rounds=a.rounds) / REPEAT
            t_bf16 = bench(inner(lambda x: x @ W.T, xs), calls=a.calls,
                           rounds=a.rounds) / REPEAT
            print(f"W[{n},{k}] M={m}: xla {t_xla * 1e6:.1f} us, bf16 dense {t_bf16 * 1e6:.1f} us",
                  flush=True)
            if a.part in ("all", "gemv"):
                bks = [b for b in (128, 256, 512) if k % b == 0]
                configs = [dict(block_n=bn, block_k=bk, splits=sp, mma=mma, num_warps=nw,
                                num_stages=ns)
                           for bn, bk, sp, mma, nw, ns in itertools.product(
                               (16, 32, 64), bks, (1, 4, 16),
                               (m > 1,), (4,), (3,))]

                def make(**cfg):
                    return inner(lambda x: nf4_gemv_pallas(x, *wargs, blocksize=BLOCKSIZE,
                                                           **cfg), xs)
                sweep("gemv", make, ref, configs, a.calls, a.rounds, per_call=REPEAT)
            if a.part in ("all", "gemv_t") and n == 4096 and k == 11008:
                ref_t = dy @ W
                configs = [dict(block_n=bn, block_k=bk, splits=sp, num_warps=4, num_stages=3)
                           for bn, bk, sp in itertools.product((32, 64, 128), (64, 128, 256),
                                                               (1, 4, 16))]

                def make_t(**cfg):
                    return inner(lambda d: nf4_gemv_t_pallas(d, *wargs, blocksize=BLOCKSIZE,
                                                             **cfg), dys)
                sweep("gemv_t", make_t, ref_t, configs, a.calls, a.rounds, per_call=REPEAT)
        if a.part in ("all", "large") and (n, k) == (4096, 11008):
            configs = [dict(block_rows=r, num_warps=nw) for r in (32, 64, 128, 256, 512)
                       for nw in (4, 8)]

            def make_d(**cfg):
                f = jax.jit(lambda: nf4_dequantize_pallas(*wargs, shape=(n, k),
                                                          blocksize=BLOCKSIZE, **cfg))
                return f
            sweep("dequant", make_d, W, configs, 20, a.rounds)
            t_deq_xla = bench(jax.jit(lambda: nf4_dequantize_reference(
                packed, absmax, na, nc, off, shape=(n, k), blocksize=BLOCKSIZE
            ).astype(jnp.bfloat16)), calls=20, rounds=a.rounds)
            print(f"  dequant xla {t_deq_xla * 1e6:.1f} us", flush=True)
            for m in (512, 4096):
                x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
                ref = x @ W.T
                t_bf16 = bench(jax.jit(lambda x, W: x @ W.T), x, W, calls=10, rounds=a.rounds)
                t_xla = bench(jax.jit(lambda x: nf4_matmul_reference(
                    x, packed, absmax, na, nc, off, blocksize=BLOCKSIZE)), x, calls=10,
                    rounds=a.rounds)
                t_dd = bench(jax.jit(lambda x: x @ nf4_dequantize_pallas(
                    *wargs, shape=(n, k), blocksize=BLOCKSIZE).T), x, calls=10, rounds=a.rounds)
                print(f"W[{n},{k}] M={m}: bf16 {t_bf16 * 1e6:.1f} xla {t_xla * 1e6:.1f} "
                      f"pallas-dequant+dot {t_dd * 1e6:.1f} us (x{t_dd / t_bf16:.3f} of bf16)",
                      flush=True)
                configs = [dict(block_m=bm, block_n=bn, block_k=64, num_warps=nw, num_stages=ns)
                           for bm, bn, nw, ns in ((128, 128, 8, 3), (64, 128, 4, 3),
                                                  (128, 256, 8, 3), (128, 64, 4, 4))]

                def make_f(**cfg):
                    f = jax.jit(lambda x: nf4_matmul_pallas(x, *wargs, blocksize=BLOCKSIZE, **cfg))
                    return lambda: f(x)
                sweep(f"fused M={m}", make_f, ref, configs, 5, 3)


if __name__ == "__main__":
    main()
