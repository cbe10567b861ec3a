"""The backward of an NF4 matmul, ``dx = dy @ W``, on Hopper (issue 13): the Mosaic GPU
transposed kernel `nf4_mgpu_matmul_t` against the Triton transposed GEMV that
`nf4_matmul_t_pallas` takes today (`nf4_gemv_t_pallas`, M <= 16) and a dense bfloat16
``dy @ W`` (cuBLAS through XLA, W already dequantized: the floor without NF4), at M = 1 and
16 rows of ``dy`` for W 4096x4096, 11008x4096 and 4096x11008 ([N, K]; dx is [M, K]).

Each weight set is fresh random data (codes, float32 absmax, and the kernel layout of the
same scales for the Mosaic kernel). Before any timing every path is compared with the
float32 reference ``dy @ dequantize(W)`` (relative Frobenius error, must be < 1e-2; the
Mosaic kernel's bf16 scales differ by up to 2**-8 per element). Timing as
``benchmarks/nf4_multi.py``: `kernels.bench_sets` over 8 distinct weight sets per jitted
call (nothing served from the 50 MB L2), warm-up, 20 queued calls, one sync, median of 7
rounds, microseconds per product. The effective bandwidth counts the bytes each path must
read (codes + scales + dy for the NF4 paths, the bf16 W for the dense one).

``--sweep`` also times the Mosaic kernel over its tiles (block_n, splits, in_flight) and
prints the best, to tune the defaults.

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 python benchmarks/nf4_mgpu_t.py [--sweep]   # Hopper only

Without a Hopper GPU it exits with status 2 and says so (nothing is timed).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                os.path.dirname(os.path.abspath(__file__))]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from kernels import bench_sets  # noqa: E402
from pallas_kernels.nf4_matmul import (  # noqa: E402
    NF4_CODE,
    nf4_dequantize_reference,
    nf4_matmul_t_pallas,
)
from pallas_kernels.nf4_mgpu import (  # noqa: E402
    nf4_kernel_scale,
    nf4_mgpu_matmul_t,
    nf4_mgpu_supported,
)

BLOCKSIZE, R = 64, 8
SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # W [N, K]
MS = (1, 16)


def weight_sets(n: int, k: int, m: int, seed: int):
    """``R`` fresh ``(dy, packed, absmax, kernel_scale)``: bf16 ``dy [m, n]``, uint8 codes
    ``[n, k // 2]``, float32 ``absmax [n, k // 64]`` and its bf16 kernel layout."""
    out = []
    for r in range(R):
        kd, kp, ka = jax.random.split(jax.random.key(seed * 1000 + r), 3)
        packed = jax.random.randint(kp, (n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
        absmax = jax.random.uniform(ka, (n, k // BLOCKSIZE), jnp.float32, 0.01, 0.1)
        out.append((jax.random.normal(kd, (m, n), jnp.bfloat16), packed, absmax,
                    nf4_kernel_scale(absmax, n, k, BLOCKSIZE)))
    return out


def rel_err(a, b) -> float:
    a, b = (jnp.asarray(t, jnp.float32) for t in (a, b))
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", action="store_true", help="also sweep the Mosaic kernel's tiles")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    if not nf4_mgpu_supported(1, 4096, 4096, BLOCKSIZE, jnp.bfloat16):
        print(f"nf4_mgpu_t.py: needs a Hopper GPU (compute capability 9.0); found "
              f"{jax.devices()[0].device_kind!r} on {jax.default_backend()!r}: nothing timed",
              file=sys.stderr)
        return 2
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}; us per dx = dy @ W "
          f"(median of {args.rounds} rounds x {args.calls} calls x {R} weight sets)")
    code = jnp.asarray(NF4_CODE)
    dense_w = jax.jit(lambda p, a, n, k: nf4_dequantize_reference(
        p, a, shape=(n, k), blocksize=BLOCKSIZE), static_argnums=(2, 3))
    paths = {
        "mosaic nf4_mgpu_matmul_t": lambda dy, p, a, s, w: nf4_mgpu_matmul_t(dy, p, s),
        "triton nf4_matmul_t_pallas": lambda dy, p, a, s, w: nf4_matmul_t_pallas(
            dy, p, a, code, blocksize=BLOCKSIZE),
        "dense bf16 dy @ W": lambda dy, p, a, s, w: dy @ w,
    }
    for seed, ((n, k), m) in enumerate(itertools.product(SHAPES, MS)):
        sets = []
        for dy, p, a, s in weight_sets(n, k, m, seed):
            w = dense_w(p, a, n, k)  # float32 [n, k]
            ref = jnp.dot(dy.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
            sets.append(((dy, p, a, s, w.astype(jnp.bfloat16)), ref))
        args_sets = [a for a, _ in sets]
        for name, fn in paths.items():  # correctness first, every set
            for a, ref in sets:
                err = rel_err(jax.jit(fn)(*a), ref)
                if not err < 1e-2:
                    raise SystemExit(f"{name} W{n}x{k} M={m}: relative error {err:.3g} vs "
                                     "the float32 reference")
        nf4_bytes = n * k // 2 + n * k // BLOCKSIZE * 4 + 2 * m * (n + k)
        row = []
        for name, fn in paths.items():
            t, _ = bench_sets(fn, args_sets, calls=args.calls, rounds=args.rounds)
            nbytes = 2 * n * k + 2 * m * (n + k) if name.startswith("dense") else nf4_bytes
            row.append(f"{name} {t * 1e6:6.1f} us ({nbytes / t / 1e9:5.0f} GB/s)")
        print(f"W{n}x{k} M={m:2d}: " + " | ".join(row), flush=True)
        if args.sweep:
            sweep(n, k, m, args_sets, sets, args)
        del sets, args_sets
    return 0


def sweep(n, k, m, args_sets, sets, args):
    """Time `nf4_mgpu_matmul_t` over its tiles (each checked against the reference)."""
    results = []
    for block_n, in_flight in itertools.product((64, 128, 256), (0, 1)):
        steps = -(-n // block_n)
        for splits in (1, 2, 4, 8, 16):
            if steps % splits or (in_flight and steps // splits < 2):
                continue
            kw = dict(block_n=block_n, splits=splits, in_flight=in_flight)
            fn = lambda dy, p, a, s, w, kw=kw: nf4_mgpu_matmul_t(dy, p, s, **kw)
            err = rel_err(jax.jit(fn)(*sets[0][0]), sets[0][1])
            if not err < 1e-2:
                print(f"  sweep {kw}: relative error {err:.3g}: WRONG", flush=True)
                continue
            t, _ = bench_sets(fn, args_sets, calls=args.calls, rounds=args.rounds)
            results.append((t, kw))
    results.sort(key=lambda r: r[0])
    for t, kw in results[:5]:
        print(f"  sweep W{n}x{k} M={m}: {t * 1e6:6.1f} us {kw}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
