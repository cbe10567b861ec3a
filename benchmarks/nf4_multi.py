"""Fused vs separate NF4 GEMVs on Hopper: q/k/v (4096 -> 4096 + 1024 + 1024) and gate/up
(4096 -> 2 x 14336, then SwiGLU) as ONE `nf4_mgpu_matmul_multi` launch against one
`nf4_mgpu_matmul` per weight (and the SwiGLU kernel), at M = 1 and 16 tokens.

8 distinct random weight sets per jitted call (nothing served from the 50 MB L2), timed by
`kernels.bench_sets` (warm-up, 20 queued calls, one sync, median of 7 rounds); the last
column is the largest difference between the two paths' outputs.

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 python benchmarks/nf4_multi.py    # an H200 (Hopper only)
"""
import os, sys; sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]
import jax, jax.numpy as jnp
from kernels import bench_sets
from pallas_kernels.nf4_mgpu import nf4_kernel_scale, nf4_mgpu_matmul, nf4_mgpu_matmul_multi
from pallas_kernels.swiglu import swiglu

K, R = 4096, 8

def weight(key, n):
    kp, ka = jax.random.split(key)
    packed = jax.random.randint(kp, (n, K // 2), 0, 256, jnp.int32).astype(jnp.uint8)
    return packed, nf4_kernel_scale(jax.random.uniform(ka, (n, K // 64), jnp.float32, 0.01, 0.1), n, K, 64)

def sets(ns, m):
    out = []
    for r in range(R):
        kx, *kw = jax.random.split(jax.random.key(r), len(ns) + 1)
        ws = [weight(k, n) for k, n in zip(kw, ns)]
        out.append((jax.random.normal(kx, (m, K), jnp.bfloat16), tuple(p for p, _ in ws), tuple(s for _, s in ws)))
    return out

glu = lambda g, u: (jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(g.dtype)
fused = lambda x, ps, ss: nf4_mgpu_matmul_multi(x, ps, ss)
separate = lambda x, ps, ss: tuple(nf4_mgpu_matmul(x, p, s) for p, s in zip(ps, ss))
cases = {"q/k/v 4096->4096+1024+1024": ((4096, 1024, 1024), fused, separate),
         "gate/up 4096->2x14336 +SwiGLU": ((14336, 14336), lambda *a: glu(*fused(*a)),
                                            lambda *a: swiglu(*separate(*a)))}
for m in (1, 16):
    for name, (ns, f_fused, f_sep) in cases.items():
        s = sets(ns, m)
        tf, yf = bench_sets(f_fused, s, calls=20, rounds=7)
        ts, ys = bench_sets(f_sep, s, calls=20, rounds=7)
        diff = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                   for a, b in zip(jax.tree.leaves(yf), jax.tree.leaves(ys)))
        print(f"M={m:2d} {name:30s} fused {tf * 1e6:6.1f} us  separate {ts * 1e6:6.1f} us  "
              f"saves {(ts - tf) * 1e6:5.1f} us (x{ts / tf:.2f})  max|diff| {diff:.3g}", flush=True)
