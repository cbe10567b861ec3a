"""The NF4 matmul at large M without the bfloat16 copy of W (issue 27 item 1): the Mosaic GPU
GEMM `pallas_kernels.nf4_mgpu_gemm` (codes decoded into shared memory inside the GEMM)
against today's large-M path (`nf4_matmul_pallas` / `nf4_matmul_t_pallas`: the Triton
dequantize kernel writes W as bfloat16 to HBM, then cuBLAS through XLA) and a dense
bfloat16 dot (W already dequantized: the floor without NF4), forward ``y = x @ W.T`` and
transposed ``dx = dy @ W``.

Shapes: M = 512, 2048, 4096 rows of ``x`` (``dy``) x W ``[N, K]`` = 4096x4096 (q/o),
14336x4096 (gate/up), 4096x14336 (down), blocksize 64. Every shape gets fresh random data
(bnb packed codes, float32 absmax, bfloat16 activations from a normal distribution), and
before any timing each path is checked on it: each kernel configuration against its own
rule (`nf4_mgpu_gemm_reference` with the same scales, float32: relative Frobenius error <
2**-8, the output's bfloat16 rounding), and every path against ``x @ dequantize(W)`` in
float32 (< 1e-2).

Timing: ``R`` distinct weight/activation sets per jitted call (back to back), two warm-up
calls, then per round ``--calls`` queued calls and one ``block_until_ready``; the median
over ``--rounds`` rounds divided by ``R``. The table gives microseconds, TFLOP/s and the
ratio of each NF4 path to the dense dot measured in the same run: the kernel on the bnb
bytes at its default tiles (``kernel``: ``block_m`` 128, one warpgroup per program) and
with ``block_m=256`` (``kernel256``: two compute warpgroups sharing each decoded tile),
both with bfloat16 scales (``bf16(bf16(code) * bf16(absmax))``); the same two with float32
scales (``exact``, ``exact256``: W bit for bit today's bfloat16 W, so the same products as
today's path); and today's path (issue 27 targets: <= 1.03x dense forward, <= 1.05x
transposed).

``--sweep`` also times the kernel over its tiles (`SWEEP`: block_m, block_n / block_k,
stages, in_flight, bnb bytes vs `nf4_kernel_codes` words), each checked first, at the largest
M (``--sweep-all``: every M), and prints the best five per shape (a configuration that fails
to compile or to check is printed as FAILED and skipped). ``--smoke`` runs the whole
script on a CPU at tiny shapes with the kernel
replaced by its reference (checks the script, times nothing meaningful).

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.8 python benchmarks/nf4_gemm.py \
        [--only forward|transposed] [--ms 512,2048,4096] [--sweep]   # Hopper only

Without a Hopper GPU (and without ``--smoke``) it exits with status 2 and says so.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from pallas_kernels.nf4_matmul import (  # noqa: E402
    NF4_CODE,
    nf4_dequantize_reference,
    nf4_matmul_pallas,
    nf4_matmul_t_pallas,
)
from pallas_kernels.nf4_mgpu import nf4_kernel_codes, nf4_kernel_scale  # noqa: E402
from pallas_kernels.nf4_mgpu_gemm import (  # noqa: E402
    nf4_kernel_scale_f32,
    nf4_mgpu_gemm,
    nf4_mgpu_gemm_reference,
    nf4_mgpu_gemm_reference_t,
    nf4_mgpu_gemm_supported,
    nf4_mgpu_gemm_t,
)

BLOCKSIZE = 64
SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))  # W [N, K]
MS = (512, 2048, 4096)
SMOKE_SHAPES, SMOKE_MS = ((256, 128), (128, 256)), (128,)

#: Kernel tiles the sweep tries (forward: block_n; transposed: block_k).
SWEEP = ([dict(block_m=bm, tile=bt, stages=st, in_flight=1, words=w)
          for bm, bt in ((128, 128), (64, 256)) for st in (None, 4) for w in (False, True)]
         + [dict(block_m=128, tile=128, stages=None, in_flight=0, words=w) for w in (False, True)]
         + [dict(block_m=128, tile=256, stages=2, in_flight=1, words=True),
            dict(block_m=128, tile=64, stages=4, in_flight=1, words=True)]
         + [dict(block_m=256, tile=128, stages=st, in_flight=1, words=w)
            for st in (None, 2) for w in (False, True)]
         + [dict(block_m=bm, tile=128, stages=None, in_flight=1, words=True, scale="f32")
            for bm in (128, 256)])


#: The kernel configurations of the main table: name -> (block_m, scale dtype). ``kernel``
#: is the default (one warpgroup per 128 rows, bfloat16 scales), ``kernel256`` two compute
#: warpgroups sharing each decoded tile; ``exact``/``exact256`` the same with float32
#: scales (W bit for bit today's bfloat16 W: the same products).
KERNELS = {"kernel": (128, "bf16"), "kernel256": (256, "bf16"),
           "exact": (128, "f32"), "exact256": (256, "f32")}
PATHS = (*KERNELS, "today", "dense")

HEADER = ("| product | W [N, K] | M | " + " | ".join(f"{p} us" for p in PATHS)
          + " | best kernel TFLOP/s | dense TFLOP/s | "
          + " | ".join(f"{p} / dense" for p in PATHS if p != "dense") + " |")
ROW = ("| {} | {} | {} | " + " | ".join(["{:.1f}"] * len(PATHS)) + " | {:.0f} | {:.0f} | "
       + " | ".join(["{:.3f}"] * (len(PATHS) - 1)) + " |")


def bench(fn, sets, *, calls: int, rounds: int) -> float:
    """Median seconds per product of ``fn`` over the argument tuples ``sets`` (all in one
    jitted call): two warm-up calls, then ``calls`` queued calls and one sync per round."""
    f = jax.jit(lambda s: [fn(*a) for a in s])
    for _ in range(2):
        jax.block_until_ready(f(sets))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = None
        for _ in range(calls):
            out = f(sets)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls / len(sets))
    return statistics.median(times)


def rel_err(a, b) -> float:
    a, b = (jnp.asarray(t, jnp.float32) for t in (a, b))
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def make_sets(n: int, k: int, m: int, transposed: bool, seed: int, count: int):
    """``count`` fresh ``(a, packed, absmax, scales, words, w_bf16)``: ``a`` bfloat16
    ``[m, k]`` (``[m, n]`` transposed), bnb codes uint8 ``[n, k // 2]``, float32 absmax
    ``[n, k // 64]``, its two kernel layouts ``(bfloat16, float32)``
    (`nf4_kernel_scale`, `nf4_kernel_scale_f32`), the same codes as `nf4_kernel_codes`
    words, and the dequantized bfloat16 W (the dense path's operand)."""
    out = []
    for r in range(count):
        ka, kp, ks = jax.random.split(jax.random.key(seed * 100 + r), 3)
        packed = jax.random.randint(kp, (n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
        absmax = jax.random.uniform(ks, (n, k // BLOCKSIZE), jnp.float32, 0.01, 0.1)
        a = jax.random.normal(ka, (m, n if transposed else k), jnp.bfloat16)
        w = nf4_dequantize_reference(packed, absmax, shape=(n, k), blocksize=BLOCKSIZE)
        scales = (nf4_kernel_scale(absmax, n, k, BLOCKSIZE),
                  nf4_kernel_scale_f32(absmax, n, k, BLOCKSIZE))
        out.append((a, packed, absmax, scales, nf4_kernel_codes(packed, n, k),
                    w.astype(jnp.bfloat16)))
    return out




def paths(transposed: bool, smoke: bool):
    """name -> fn(a, packed, absmax, scales, words, w) for `PATHS`: the kernel
    configurations of `KERNELS`, today's path (dequantize + dot) and the dense dot."""
    code = jnp.asarray(NF4_CODE)
    ref = nf4_mgpu_gemm_reference_t if transposed else nf4_mgpu_gemm_reference
    gemm = nf4_mgpu_gemm_t if transposed else nf4_mgpu_gemm
    out = {}
    for name, (block_m, sdt) in KERNELS.items():
        si = 1 if sdt == "f32" else 0
        if smoke:  # CPU: the kernel's reference stands in for the kernel
            out[name] = lambda a, p, am, s, wd, w, si=si: ref(a, p, s[si]).astype(a.dtype)
        else:
            out[name] = lambda a, p, am, s, wd, w, si=si, bm=block_m: gemm(a, p, s[si],
                                                                          block_m=bm)
    if transposed:
        out["today"] = lambda a, p, am, s, wd, w: nf4_matmul_t_pallas(  # noqa: E731
            a, p, am, code, blocksize=BLOCKSIZE, interpret=smoke)
        out["dense"] = lambda a, p, am, s, wd, w: a @ w  # noqa: E731
    else:
        out["today"] = lambda a, p, am, s, wd, w: nf4_matmul_pallas(  # noqa: E731
            a, p, am, code, blocksize=BLOCKSIZE, interpret=smoke)
        out["dense"] = lambda a, p, am, s, wd, w: a @ w.T  # noqa: E731
    return out


def check(name, fn, sets, transposed):
    """Raise SystemExit unless ``fn`` matches the references on every set (see the module
    docstring for the tolerances)."""
    for a, p, am, s, wd, w in sets:
        got = jax.jit(fn)(a, p, am, s, wd, w)
        w32 = nf4_dequantize_reference(p, am, shape=(p.shape[0], 2 * p.shape[1]),
                                       blocksize=BLOCKSIZE)
        bnb = jnp.dot(a.astype(jnp.float32), w32 if transposed else w32.T,
                      precision=lax.Precision.HIGHEST)
        err = rel_err(got, bnb)
        if not err < 1e-2:
            raise SystemExit(f"{name}: relative error {err:.3g} vs x @ dequantize(W) (float32)")
        if name.startswith(("kernel", "exact")):
            si = 1 if name.startswith("exact") else 0
            ref = (nf4_mgpu_gemm_reference_t if transposed else nf4_mgpu_gemm_reference)(
                a, p, s[si])
            err = rel_err(got, ref)
            if not err < 2.0 ** -8:
                raise SystemExit(f"{name}: relative error {err:.3g} vs nf4_mgpu_gemm_reference")


def sweep(n, k, m, transposed, sets, args):
    """Time the kernel over `SWEEP` (each configuration checked first); print the best 5."""
    fn0 = nf4_mgpu_gemm_t if transposed else nf4_mgpu_gemm
    results = []
    for cfg in SWEEP:
        kw = dict(block_m=cfg["block_m"], stages=cfg["stages"], in_flight=cfg["in_flight"])
        kw["block_k" if transposed else "block_n"] = cfg["tile"]
        words, si = cfg["words"], 1 if cfg.get("scale") == "f32" else 0
        fn = lambda a, p, am, s, wd, w, kw=kw, words=words, si=si: fn0(  # noqa: E731
            a, wd if words else p, s[si], **kw)
        label = dict(kw, words=words, scale=cfg.get("scale", "bf16"))
        try:
            check(f"{'exact' if si else 'kernel'} {label}", fn, sets[:1], transposed)
            t = bench(fn, sets, calls=args.calls, rounds=args.rounds)
        except (SystemExit, Exception) as e:  # noqa: BLE001  report and go on
            print(f"  sweep {label}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        results.append((t, label))
    results.sort(key=lambda r: r[0])
    for t, label in results[:5]:
        print(f"  sweep {'dx' if transposed else 'y'} W{n}x{k} M={m}: {t * 1e6:8.1f} us "
              f"{2 * m * n * k / t / 1e12:6.1f} TFLOP/s {label}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", action="store_true", help="also sweep the kernel's tiles")
    ap.add_argument("--sweep-all", action="store_true",
                    help="sweep at every M (default: only the largest)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU check of the script: tiny shapes, the kernel's reference")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--sets", type=int, default=2, help="distinct input sets per call (R)")
    ap.add_argument("--only", choices=("forward", "transposed"), default=None)
    ap.add_argument("--ms", default=None,
                    help="comma-separated M values (default 512,2048,4096)")
    args = ap.parse_args(argv)
    if not args.smoke and not nf4_mgpu_gemm_supported(512, 4096, 4096, BLOCKSIZE, jnp.bfloat16):
        print(f"nf4_gemm.py: needs a Hopper GPU (compute capability 9.0); found "
              f"{jax.devices()[0].device_kind!r} on {jax.default_backend()!r}: nothing timed",
              file=sys.stderr)
        return 2
    shapes, ms = (SMOKE_SHAPES, SMOKE_MS) if args.smoke else (SHAPES, MS)
    if args.ms:
        ms = tuple(int(v) for v in args.ms.split(","))
    if args.smoke:
        args.calls, args.rounds, args.sets = 1, 1, 1
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}; us per product (median "
          f"of {args.rounds} rounds x {args.calls} calls x {args.sets} sets)")
    directions = [False, True] if args.only is None else [args.only == "transposed"]
    print(HEADER)
    table = []
    for transposed in directions:
        ps = paths(transposed, args.smoke)
        for seed, ((n, k), m) in enumerate(itertools.product(shapes, ms)):
            sets = make_sets(n, k, m, transposed, seed + (1000 if transposed else 0), args.sets)
            for name, fn in ps.items():
                check(name, fn, sets, transposed)
            t = {name: bench(fn, sets, calls=args.calls, rounds=args.rounds)
                 for name, fn in ps.items()}
            flop = 2 * m * n * k
            row = (("dx = dy @ W" if transposed else "y = x @ W.T"), f"{n}x{k}", m,
                   *(t[p] * 1e6 for p in PATHS),
                   flop / min(t[p] for p in KERNELS) / 1e12, flop / t["dense"] / 1e12,
                   *(t[p] / t["dense"] for p in PATHS if p != "dense"))
            table.append(row)
            print(ROW.format(*row), flush=True)
            if args.sweep and not args.smoke and (args.sweep_all or m == max(ms)):
                sweep(n, k, m, transposed, sets, args)
            del sets
    print("\n" + HEADER)
    print("|---" * (3 + len(PATHS) + 2 + len(PATHS) - 1) + "|")
    for row in table:
        print(ROW.format(*row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
