"""Tile and pipeline variants of the Mosaic GPU NF4 kernel (`pallas_kernels.nf4_mgpu`), H200.

For each weight shape and M: the dense bf16 matmul of the dequantized weight and the Pallas
(Triton) NF4 path as same-run baselines, the byte floor (codes + bf16 scales at 4.3 TB/s),
and `nf4_mgpu_matmul` with each variant in ``CONFIGS`` (block_k, splits, pipeline stages,
wgmma groups in flight), each checked against `nf4_mgpu_reference` first (``ERR`` marks a
relative error >= 5e-3). Then M = 4096 with block_m 128/256 (the fused large-M variant).
Times: 8 distinct weight sets per jitted call (no L2 reuse), 20 queued calls, median of 5.

    python benchmarks/nf4_mgpu_sweep.py      # one H200, about 4 minutes
    python benchmarks/nf4_mgpu_sweep.py --kernel-codes   # bnb bytes vs the kernel layout

This is the script of the exploration rows in RESULTS.md (issue 13); `benchmarks/kernels.py
--only nf4` has the recorded comparison.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.nf4_matmul import NF4_CODE, nf4_matmul  # noqa: E402
from pallas_kernels.nf4_mgpu import (nf4_kernel_codes, nf4_kernel_scale, nf4_mgpu_matmul,  # noqa: E402
                                     nf4_mgpu_reference)
from kernels import bench_sets  # noqa: E402

CONFIGS = {"base": {}, "if1": dict(in_flight=1), "bk512": dict(block_k=512),
           "bk512if1": dict(block_k=512, in_flight=1), "bk128": dict(block_k=128),
           "s1": dict(splits=1), "s8": dict(splits=8), "st2": dict(stages=2), "st6": dict(stages=6)}
LARGE = {"bm128": dict(block_m=128), "bm256": dict(block_m=256),
         "bm256bk128": dict(block_m=256, block_k=128), "bm256if1": dict(block_m=256, in_flight=1)}
SHAPES = [(11008, 4096, 1), (4096, 4096, 1), (4096, 14336, 1), (14336, 4096, 1),
          (11008, 4096, 16), (11008, 4096, 32), (11008, 4096, 64)]
RNG = np.random.default_rng(0)


def weight(n, k):
    """Random bnb codes [N, K//2] and float32 absmax [N, K//64] (0.01 ... 0.1)."""
    return (jnp.asarray(RNG.integers(0, 256, (n, k // 2), dtype=np.uint8)),
            jnp.asarray(RNG.uniform(0.01, 0.1, (n, k // 64)).astype(np.float32)))


def bench(fn, sets, calls=20, rounds=5):
    """Median seconds per kernel over the distinct argument tuples ``sets`` (kernels.py's timer)."""
    return bench_sets(fn, sets, calls=calls, rounds=rounds)[0]


def dense(p, a, n, k):
    codes = jnp.stack([p >> 4, p & 15], -1).reshape(n, k).astype(jnp.int32)
    return (jnp.asarray(NF4_CODE)[codes] * jnp.repeat(a, 64, 1)).astype(jnp.bfloat16)


#: ``--kernel-codes``: the kernel over bnb's bytes (int4 view) against the same kernel over
#: the `nf4_kernel_codes` layout (``w`` names).
CODES = {"bnb": {}, "bnb_s8": dict(splits=8), "w": dict(words=True),
         "w_s8": dict(words=True, splits=8), "w_bk128": dict(words=True, block_k=128),
         "w_if1": dict(words=True, in_flight=1)}
CODES_SHAPES = [(11008, 4096, 1), (4096, 11008, 1), (4096, 4096, 1), (14336, 4096, 1),
                (4096, 14336, 1), (11008, 4096, 16), (4096, 4096, 16)]


def row(n, k, m, reps, configs, calls):
    sets = []
    for _ in range(reps):
        p, a = weight(n, k)
        sets.append((jnp.asarray(RNG.standard_normal((m, k)), jnp.bfloat16), p, a))
    msets = [(x, p, nf4_kernel_scale(a, n, k, 64)) for x, p, a in sets]
    wsets = [(x, nf4_kernel_codes(p, n, k), s) for x, p, s in msets] \
        if any(kw.get("words") for kw in configs.values()) else None
    ref = nf4_mgpu_reference(*msets[0])
    t_dense = bench(lambda x, w: x @ w.T, [(x, dense(p, a, n, k)) for x, p, a in sets], calls)
    t_triton = bench(lambda x, p, a: nf4_matmul(x, p, a, blocksize=64, impl="pallas"), sets, calls)
    floor = (n * k // 2 + n * k // 64 * 2) / 4.3e12
    line = (f"{n}x{k} M={m}: dense {t_dense * 1e6:.1f} triton {t_triton * 1e6:.1f} "
            f"floor {floor * 1e6:.1f} |")
    for name, kw in configs.items():
        if k % kw.get("block_k", 64):
            continue
        kw = dict(kw)
        use = wsets if kw.pop("words", False) else msets
        try:
            y = nf4_mgpu_matmul(*use[0], **kw)
            err = float(jnp.linalg.norm(y.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
            t = bench(lambda x, p, s: nf4_mgpu_matmul(x, p, s, **kw), use, calls)
            line += f" {name} {t * 1e6:.1f}" + ("" if err < 5e-3 else f"(ERR {err:.1e})")
        except Exception as e:  # noqa: BLE001 - e.g. a variant over the shared memory
            line += f" {name} FAIL[{type(e).__name__}: {str(e)[:80]}]"
    print(line, flush=True)


def main() -> int:
    print(f"# nf4_mgpu sweep | {jax.devices()[0].device_kind} | jax {jax.__version__} | us per call")
    if "--kernel-codes" in sys.argv:
        for n, k, m in CODES_SHAPES:
            row(n, k, m, 8, CODES, 20)
        return 0
    for n, k, m in SHAPES:
        row(n, k, m, 8, CONFIGS, 20)
    for n, k in ((11008, 4096), (4096, 11008)):
        row(n, k, 4096, 2, LARGE, 5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
