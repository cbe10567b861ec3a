"""One NF4 GEMV (and the dense bf16 GEMV of the same shape) for Nsight Compute to profile:
where the Mosaic GPU kernel's time goes, from the hardware counters (issue 13).

Each kernel is checked against its float32 reference first, then run a few times; run it
under ``ncu`` and filter the kernels by name:

    ncu --clock-control none -k regex:mosaic --launch-skip 3 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        --section SchedulerStats --section LaunchStats --section MemoryWorkloadAnalysis \\
        python3 benchmarks/nf4_ncu.py --n 11008 --k 4096 --m 1

``--transposed`` runs `nf4_mgpu_matmul_t` instead (``dx = dy @ W``); ``--kernel-codes`` the
forward kernel over the `nf4_kernel_codes` layout. Hopper only.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=11008)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--transposed", action="store_true")
    ap.add_argument("--kernel-codes", action="store_true",
                    help="the forward kernel over the nf4_kernel_codes layout")
    ap.add_argument("--runs", type=int, default=6)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.nf4_mgpu import (nf4_kernel_codes, nf4_kernel_scale, nf4_mgpu_matmul,
                                         nf4_mgpu_matmul_t, nf4_mgpu_reference, nf4_mgpu_reference_t)

    rng = np.random.default_rng()
    n, k, m = args.n, args.k, args.m
    packed = jnp.asarray(rng.integers(0, 256, (n, k // 2), dtype=np.uint8))
    scale = nf4_kernel_scale(jnp.asarray(rng.uniform(0.01, 0.1, (n, k // 64)), jnp.float32), n, k, 64)
    x = jnp.asarray(rng.standard_normal((m, n if args.transposed else k)), jnp.bfloat16)
    f, ref = (nf4_mgpu_matmul_t, nf4_mgpu_reference_t) if args.transposed else \
        (nf4_mgpu_matmul, nf4_mgpu_reference)
    want = ref(x, packed, scale)
    if args.kernel_codes:
        packed = nf4_kernel_codes(packed, n, k)
    y = f(x, packed, scale).astype(jnp.float32)
    err = float(jnp.linalg.norm(y - want) / jnp.linalg.norm(want))
    print(f"# {jax.devices()[0].device_kind} | {'dx = dy @ W' if args.transposed else 'x @ W.T'} "
          f"W {n}x{k}, M={m} | rel err {err:.1e}")
    if err > 1e-2:
        return 1
    w = jnp.asarray(rng.standard_normal((n, k)) * 0.05, jnp.bfloat16)
    dense = jax.jit((lambda a, b: a @ b) if args.transposed else (lambda a, b: a @ b.T))
    for _ in range(args.runs):
        jax.block_until_ready(f(x, packed, scale))
        jax.block_until_ready(dense(x, w))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
