"""Benchmark suite of the Pallas kernels in `pallas_kernels` on one GPU.

Prints one table: kernel, shape, implementation, median time, achieved GB/s and
TFLOP/s, percent of the two ceilings measured in the same run (a 1 GiB float32
elementwise copy; an 8192^3 bf16 matmul), and the ratio to the XLA
reference and to bitsandbytes (``bitsandbytes.matmul_4bit`` on a weight of the
same shape, CUDA events) when bitsandbytes is importable with CUDA.

Shapes (issue 4): NF4 (blocksize 64, double quantization) W [N, K] = 4096x11008,
11008x4096 and 4096x4096 with M = 1, 16, 512, 4096 (forward) and M = 1, 16,
4096 (transposed, ``dy @ W``); RMSNorm 16384x4096 (forward, backward, fused
residual add); SwiGLU 16384x11008 (forward, backward); GQA decode with 32 query /
8 KV heads, head_dim 128, context 4k and 32k, batch 1 and 8. GGUF (issue 14, ``--only gguf``):
Q4_K, Q6_K, Q4_0, Q8_0 W [N, K] = 14336x4096 and 4096x14336 at M = 1 (and Q4_K at M = 16 and
512: the tile-dequantizing MMA against XLA's dequantize + dot),
each with its byte floor (the weight's bytes at the measured copy bandwidth) and the ratio
to it, and a dense bf16 GEMV of the same shape in the same run as the baseline.

Timing: every kernel runs on ``R`` distinct input sets inside ONE jitted call
(``R`` back-to-back kernels; distinct weights so that nothing is served from the
50 MB L2 and XLA can neither hoist nor batch the reference), calls are queued,
then one ``block_until_ready``; the median over rounds divided by ``R``. Before
timing, each Pallas kernel is compared with its XLA reference on the same random
inputs (relative error in norm, printed as ``err``).

Usage (GPU, repository root)::

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 python benchmarks/kernels.py [--only nf4,norm,swiglu,decode,gguf]
    python benchmarks/kernels.py --only gguf --smoke    # CPU check: small shapes, interpret mode
    python benchmarks/kernels.py --gguf-sweep            # GGUF kernel tile sizes (Q4_K GEMV)
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

from pallas_kernels.decode_attention import decode_attention  # noqa: E402
from pallas_kernels.nf4_matmul import (  # noqa: E402
    NF4_CODE,
    nf4_dequantize_reference,
    nf4_matmul,
    nf4_matmul_t_pallas,
)
from pallas_kernels.nf4_matmul import MGPU_MAX_M  # noqa: E402
from pallas_kernels.nf4_mgpu import (  # noqa: E402
    nf4_kernel_codes,
    nf4_kernel_scale,
    nf4_mgpu_matmul,
    nf4_mgpu_matmul_t,
    nf4_mgpu_supported,
)
from pallas_kernels.rms_norm import add_rms_norm, rms_norm  # noqa: E402
from pallas_kernels.gguf_matmul import gguf_matmul  # noqa: E402
from pallas_kernels.swiglu import swiglu  # noqa: E402

BLOCKSIZE, NESTED = 64, 256
ROWS: list[dict] = []


def bench_sets(fn, sets, *, calls: int, rounds: int) -> tuple[float, object]:
    """Median seconds per kernel of ``fn`` over the distinct argument tuples ``sets``."""
    f = jax.jit(lambda s: [fn(*a) for a in s])
    out = jax.block_until_ready(f(sets))
    for _ in range(2):
        jax.block_until_ready(f(sets))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            r = f(sets)
        jax.block_until_ready(r)
        times.append((time.perf_counter() - t0) / calls / len(sets))
    return statistics.median(times), out[0]


def rel_err(a, b) -> float:
    a, b = (jnp.asarray(t, jnp.float32) for t in (a, b))
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def record(kernel, shape, impl, t, *, nbytes=0, flops=0, err=None, xla=None, bnb=None, floor=None):
    ROWS.append(dict(kernel=kernel, shape=shape, impl=impl, t=t, nbytes=nbytes, flops=flops,
                     err=err, xla=xla, bnb=bnb, floor=floor))


def random_nf4(key, n, k):
    kp, ka, kn, kc = jax.random.split(key, 4)
    nblocks = n * k // BLOCKSIZE
    packed = jax.random.randint(kp, (n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
    absmax = jax.random.randint(ka, (n, k // BLOCKSIZE), 0, 256, jnp.int32).astype(jnp.uint8)
    nested = jax.random.uniform(kn, (-(-nblocks // NESTED),), jnp.float32, 0.01, 0.05)
    ncode = jnp.sort(jax.random.uniform(kc, (256,), jnp.float32, -1.0, 1.0))
    return packed, absmax, nested, ncode, jnp.float32(0.08)


def nbytes(*arrays) -> int:
    return sum(a.size * a.dtype.itemsize for a in arrays)


# --------------------------------------------------------------------------- bnb


def bnb_time(n, k, m, *, rounds, reps):
    """Seconds per ``bitsandbytes.matmul_4bit`` (x bf16 [m, k], NF4 W [n, k], double quant)."""
    try:
        import bitsandbytes as bnb
        import torch
        if not torch.cuda.is_available():
            return None
    except Exception:  # noqa: BLE001 - optional baseline
        return None
    torch.manual_seed(0)
    ws = []
    for _ in range(reps):
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        q, st = bnb.functional.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4",
                                             compress_statistics=True)
        ws.append((q, st))
    xs = [torch.randn(m, k, dtype=torch.bfloat16, device="cuda") for _ in range(reps)]
    for _ in range(3):
        for x, (q, st) in zip(xs, ws):
            bnb.matmul_4bit(x, q.t(), quant_state=st)
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for x, (q, st) in zip(xs, ws):
            bnb.matmul_4bit(x, q.t(), quant_state=st)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / reps)
    del ws, xs
    torch.cuda.empty_cache()
    return statistics.median(times)


# --------------------------------------------------------------------------- suites


def suite_nf4(key, calls, rounds, use_bnb, ms=(1, 16, 512, 4096)):
    code = jnp.asarray(NF4_CODE)
    for n, k in ((4096, 11008), (11008, 4096), (4096, 4096)):
        for m in ms:
            reps = 8 if m <= 16 else 2
            sets, wsets = [], []
            for r in range(reps):
                kk = jax.random.fold_in(key, 1000 * n + 10 * m + r)
                w = random_nf4(kk, n, k)
                x = jax.random.normal(jax.random.fold_in(kk, 1), (m, k), jnp.bfloat16)
                sets.append((x, *w))
                wsets.append(w)
            shape = f"W{n}x{k} M={m}"
            fp = lambda x, *w: nf4_matmul(x, *w, blocksize=BLOCKSIZE, impl="pallas")
            fx = lambda x, *w: nf4_matmul(x, *w, blocksize=BLOCKSIZE, impl="xla")
            t_p, y_p = bench_sets(fp, sets, calls=calls, rounds=rounds)
            t_x, y_x = bench_sets(fx, sets, calls=calls, rounds=rounds)
            dense_sets = [(s[0], nf4_dequantize_reference(*s[1:], shape=(n, k),
                                                          blocksize=BLOCKSIZE)
                           .astype(jnp.bfloat16)) for s in sets]
            t_d, y_d = bench_sets(lambda x, W: x @ W.T, dense_sets, calls=calls, rounds=rounds)
            del dense_sets
            t_b = bnb_time(n, k, m, rounds=rounds, reps=reps) if use_bnb else None
            b = nbytes(*sets[0][1:]) + 2 * m * (k + n)
            f = 2 * m * n * k
            record("nf4 fwd", shape, "pallas", t_p, nbytes=b, flops=f, err=rel_err(y_p, y_d),
                   xla=t_x, bnb=t_b)
            record("nf4 fwd", shape, "xla dequant+dot", t_x, nbytes=b, flops=f, xla=t_x, bnb=t_b)
            record("nf4 fwd", shape, "bf16 dense (no NF4)", t_d, nbytes=2 * n * k + 2 * m * (n + k),
                   flops=f, xla=t_x, bnb=t_b)
            if t_b is not None:
                record("nf4 fwd", shape, "bitsandbytes", t_b, nbytes=b, flops=f, xla=t_x, bnb=t_b)
            mosaic = m <= MGPU_MAX_M and nf4_mgpu_supported(m, n, k, BLOCKSIZE, jnp.bfloat16)
            scales = [nf4_kernel_scale(ncode[a.astype(jnp.int32)] * na[
                jnp.arange(a.size).reshape(a.shape) // NESTED] + off, n, k, BLOCKSIZE)
                for p, a, na, ncode, off in wsets] if mosaic else []
            mbytes = n * k // 2 + n * k // 32 + 2 * m * (k + n)  # codes, bf16 scales, x and y
            for label, codes in (("mosaic gpu (bnb bytes, kernel scales)", lambda p: p),
                                 ("mosaic gpu (kernel codes and scales)",
                                  lambda p: nf4_kernel_codes(p, n, k))):
                if not mosaic:
                    break
                msets = [(x, codes(w[0]), sc) for (x, *_), w, sc in zip(sets, wsets, scales)]
                t_m, y_m = bench_sets(lambda x, p, s: nf4_mgpu_matmul(x, p, s), msets,
                                      calls=calls, rounds=rounds)
                del msets
                record("nf4 fwd", shape, label, t_m, nbytes=mbytes, flops=f,
                       err=rel_err(y_m, y_d), xla=t_x, bnb=t_b)
            if m in (1, 16, 4096):
                tsets = [(jax.random.normal(jax.random.fold_in(key, 7 + r), (m, n), jnp.bfloat16),
                          *wsets[r]) for r in range(reps)]
                ftp = lambda dy, p, a, na, nc, off: nf4_matmul_t_pallas(
                    dy, p, a, code, na, nc, off, blocksize=BLOCKSIZE)
                ftx = lambda dy, *w: dy @ nf4_dequantize_reference(
                    *w, shape=(n, k), blocksize=BLOCKSIZE).astype(jnp.bfloat16)
                t_tp, d_p = bench_sets(ftp, tsets, calls=calls, rounds=rounds)
                t_tx, d_x = bench_sets(ftx, tsets, calls=calls, rounds=rounds)
                record("nf4 dx=dy@W", shape, "pallas", t_tp, nbytes=b, flops=f,
                       err=rel_err(d_p, d_x), xla=t_tx)
                record("nf4 dx=dy@W", shape, "xla dequant+dot", t_tx, nbytes=b, flops=f, xla=t_tx)
                if mosaic:
                    t_tm, d_m = bench_sets(lambda dy, p, s: nf4_mgpu_matmul_t(dy, p, s),
                                           [(t[0], w[0], sc) for t, w, sc in zip(tsets, wsets, scales)],
                                           calls=calls, rounds=rounds)
                    record("nf4 dx=dy@W", shape, "mosaic gpu (transposed)", t_tm, nbytes=mbytes, flops=f,
                           err=rel_err(d_m, d_x), xla=t_tx)
                dense_t = [(t[0], nf4_dequantize_reference(*w, shape=(n, k), blocksize=BLOCKSIZE)
                            .astype(jnp.bfloat16)) for t, w in zip(tsets, wsets)]
                t_td, _ = bench_sets(lambda dy, W: dy @ W, dense_t, calls=calls, rounds=rounds)
                del dense_t
                record("nf4 dx=dy@W", shape, "bf16 dense (no NF4)", t_td, nbytes=2 * n * k + 2 * m * (n + k),
                       flops=f, xla=t_tx)
            print(f"# done {shape}", flush=True)


def suite_norm(key, calls, rounds):
    m, h = 16384, 4096
    reps = 4
    sets = [(jax.random.normal(jax.random.fold_in(key, r), (m, h), jnp.bfloat16),
             (1.0 + 0.1 * jax.random.normal(jax.random.fold_in(key, 50 + r), (h,))).astype(jnp.bfloat16),
             jax.random.normal(jax.random.fold_in(key, 100 + r), (m, h), jnp.bfloat16))
            for r in range(reps)]
    shape = f"{m}x{h} bf16"
    for impl in ("pallas", "xla"):
        fwd = lambda x, w, dy: rms_norm(x, w, 1e-5, impl=impl)
        grad = lambda x, w, dy: jax.vjp(lambda a, b: rms_norm(a, b, 1e-5, impl=impl), x, w)[1](dy)
        t_f, y = bench_sets(fwd, sets, calls=calls, rounds=rounds)
        t_g, g = bench_sets(grad, sets, calls=calls, rounds=rounds)
        if impl == "pallas":
            yp, gp, tfp, tgp = y, g, t_f, t_g
            continue
        record("rmsnorm fwd", shape, "pallas", tfp, nbytes=2 * 2 * m * h, err=rel_err(yp, y), xla=t_f)
        record("rmsnorm fwd", shape, "xla", t_f, nbytes=2 * 2 * m * h, xla=t_f)
        record("rmsnorm fwd+bwd", shape, "pallas", tgp, nbytes=5 * 2 * m * h,
               err=rel_err(gp[0], g[0]), xla=t_g)
        record("rmsnorm fwd+bwd", shape, "xla", t_g, nbytes=5 * 2 * m * h, xla=t_g)
    for rows in (m, 32, 1):  # training rows, then decoding's batch 32 and batch 1
        rsets = [(x[:rows], w, dy[:rows].astype(jnp.float32)) for x, w, dy in sets]
        rshape = f"{rows}x{h} bf16 res f32"
        for impl in ("pallas", "xla"):
            f = lambda x, w, res: add_rms_norm(x, res, w, 1e-5, impl=impl)
            t, y = bench_sets(f, rsets, calls=calls, rounds=rounds)
            if impl == "pallas":
                yp, tp = y, t
                continue
            record("add+rmsnorm fwd", rshape, "pallas", tp, nbytes=12 * rows * h,
                   err=rel_err(yp[0], y[0]), xla=t)
            record("add+rmsnorm fwd", rshape, "xla", t, nbytes=12 * rows * h, xla=t)


def suite_swiglu(key, calls, rounds):
    r_, c = 16384, 11008
    reps = 2
    sets = [tuple(jax.random.normal(jax.random.fold_in(key, 10 * r + i), (r_, c), jnp.bfloat16)
                  for i in range(3)) for r in range(reps)]
    shape = f"{r_}x{c} bf16"
    res = {}
    for impl in ("pallas", "xla"):
        fwd = lambda g, u, d: swiglu(g, u, impl=impl)
        grad = lambda g, u, d: jax.vjp(lambda a, b: swiglu(a, b, impl=impl), g, u)[1](d)
        res[impl] = (*bench_sets(fwd, sets, calls=calls, rounds=rounds),
                     *bench_sets(grad, sets, calls=calls, rounds=rounds))
    tfp, yp, tgp, gp = res["pallas"]
    tfx, yx, tgx, gx = res["xla"]
    n = r_ * c
    record("swiglu fwd", shape, "pallas", tfp, nbytes=6 * n, err=rel_err(yp, yx), xla=tfx)
    record("swiglu fwd", shape, "xla", tfx, nbytes=6 * n, xla=tfx)
    record("swiglu bwd", shape, "pallas", tgp, nbytes=10 * n, err=rel_err(gp[0], gx[0]), xla=tgx)
    record("swiglu bwd", shape, "xla", tgx, nbytes=10 * n, xla=tgx)


def suite_decode(key, calls, rounds):
    hq, hkv, d = 32, 8, 128
    for s in (4096, 32768):
        for b in (1, 8):
            kv_bytes = 2 * b * s * hkv * d * 2
            reps = int(min(8, max(2, 512e6 // kv_bytes)))
            sets = []
            for r in range(reps):
                kk = jax.random.fold_in(key, 100 * s + 10 * b + r)
                q = jax.random.normal(kk, (b, hq, d), jnp.bfloat16)
                k = jax.random.normal(jax.random.fold_in(kk, 1), (b, s, hkv, d), jnp.bfloat16)
                v = jax.random.normal(jax.random.fold_in(kk, 2), (b, s, hkv, d), jnp.bfloat16)
                lengths = jnp.full((b,), s, jnp.int32) - jnp.arange(b, dtype=jnp.int32) * 7
                sets.append((q, k, v, lengths))
            shape = f"B{b} ctx{s} {hq}q/{hkv}kv d{d}"
            tp, op = bench_sets(lambda q, k, v, ln: decode_attention(q, k, v, ln, impl="pallas"),
                                sets, calls=calls, rounds=rounds)
            tx, ox = bench_sets(lambda q, k, v, ln: decode_attention(q, k, v, ln, impl="xla"),
                                sets, calls=calls, rounds=rounds)
            record("gqa decode", shape, "pallas", tp, nbytes=kv_bytes, err=rel_err(op, ox), xla=tx)
            record("gqa decode", shape, "xla", tx, nbytes=kv_bytes, xla=tx)
            del sets


def random_gguf(key, qtype, n, k):
    """Random GGUF planes of a ``[n, k]`` ``qtype`` weight (uniform bytes; f16 fields finite,
    small), on the device."""
    from jaxqlora.ggml import GGUF_FORMATS
    from pallas_kernels.gguf_matmul import F16

    fmt = GGUF_FORMATS[qtype]
    nb = k // fmt.BLOCK
    planes = {}
    for i, (name, kind) in enumerate(fmt.LAYOUT):
        kk = jax.random.fold_in(key, i)
        if kind == F16:
            planes[name] = jax.random.uniform(kk, (n, nb), jnp.float32, -1e-3, 1e-3).astype(jnp.float16)
        else:
            planes[name] = jax.random.randint(kk, (n, nb, kind), 0, 256, jnp.int32).astype(jnp.uint8)
    return planes, fmt


def suite_gguf(key, calls, rounds, smoke=False):
    """GGUF GEMV rows (issue 14): Pallas kernel vs byte floor and vs a dense bf16 GEMV."""
    interpret = jax.default_backend() != "gpu"
    shapes = ((256, 512), (512, 256)) if smoke else ((14336, 4096), (4096, 14336))
    cases = [(q, 1) for q in ("Q4_K", "Q6_K", "Q4_0", "Q8_0")] + [("Q4_K", 16), ("Q4_K", 64 if smoke else 512)]
    for n, k in shapes:
        reps = 2 if smoke else 8
        xs = [jax.random.normal(jax.random.fold_in(key, 900 + r), (512, k), jnp.bfloat16) for r in range(reps)]
        dense = [(x[:1], jax.random.normal(jax.random.fold_in(key, 950 + r), (n, k), jnp.bfloat16))
                 for r, x in enumerate(xs)]
        t_d, _ = bench_sets(lambda x, w: x @ w.T, dense, calls=calls, rounds=rounds)
        shape = f"W{n}x{k} M=1"
        record("dense bf16 GEMV", shape, "xla (baseline)", t_d, nbytes=2 * n * k + 2 * (n + k))
        del dense
        for qtype, m in cases:
            sets = []
            for r in range(reps):
                planes, fmt = random_gguf(jax.random.fold_in(key, hash((qtype, n, r)) % 2**31), qtype, n, k)
                sets.append((xs[r][:m], planes))
            fmts = (fmt,)
            fp = lambda x, p: gguf_matmul(x, p, 0, fmts=fmts, impl="pallas", interpret=interpret)
            fx = lambda x, p: gguf_matmul(x, p, 0, fmts=fmts, impl="xla")
            t_p, y_p = bench_sets(fp, sets, calls=calls, rounds=rounds)
            t_x, y_x = bench_sets(fx, sets, calls=calls, rounds=rounds)
            b = nbytes(*sets[0][1].values()) + 2 * m * (k + n)
            shape = f"W{n}x{k} M={m}"
            record(f"gguf {qtype}", shape, "pallas", t_p, nbytes=b, flops=2 * m * n * k, err=rel_err(y_p, y_x),
                   xla=t_x, floor=b)
            record(f"gguf {qtype}", shape, "xla dequant+dot", t_x, nbytes=b, flops=2 * m * n * k, xla=t_x)
            print(f"# done gguf {qtype} {shape}", flush=True)
            del sets


def gguf_sweep(key, calls, rounds, smoke=False):
    """Tile sizes of the GGUF kernel for Q4_K W 14336x4096 and 4096x14336 at M = 1 (48 settings):
    one line per setting, best first per shape (feed the winner into
    `pallas_kernels.gguf_matmul.plan`)."""
    import itertools

    from pallas_kernels.gguf_matmul import gguf_matmul_pallas

    interpret = jax.default_backend() != "gpu"
    shapes = ((256, 512),) if smoke else ((14336, 4096), (4096, 14336))
    grid = list(itertools.product((32, 64, 128), (1, 2), (None, 1, 4, 16), (4, 8)))
    if smoke:
        grid = grid[:4]
    for qtype in ("Q4_K",):
        for n, k in shapes:
            reps = 2 if smoke else 8
            sets = []
            for r in range(reps):
                planes, fmt = random_gguf(jax.random.fold_in(key, 77 + r), qtype, n, k)
                sets.append((jax.random.normal(jax.random.fold_in(key, 99 + r), (1, k), jnp.bfloat16), planes))
            b = nbytes(*sets[0][1].values())
            res = []
            for bn, blocks, splits, warps in grid:
                f = lambda x, p: gguf_matmul_pallas(x, p, jnp.zeros((), jnp.int32), fmts=(fmt,), interpret=interpret,
                                                    block_n=bn, blocks=blocks, splits=splits, num_warps=warps)
                try:
                    t_p, _ = bench_sets(f, sets, calls=calls, rounds=rounds)
                except Exception as e:  # noqa: BLE001 - a setting Triton refuses
                    print(f"# sweep {qtype} W{n}x{k} bn={bn} blocks={blocks} splits={splits} warps={warps}: "
                          f"{type(e).__name__}", flush=True)
                    continue
                res.append((t_p, bn, blocks, splits, warps))
            res.sort()
            for t_p, bn, blocks, splits, warps in res:
                print(f"sweep {qtype} W{n}x{k} M=1 block_n={bn} blocks={blocks} splits={splits} warps={warps}: "
                      f"{t_p * 1e6:.1f} us, {b / t_p / 1e9:.0f} GB/s", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf-sweep", action="store_true",
                    help="only: sweep the GGUF kernel's tile sizes (Q4_K GEMV at M = 1)")
    ap.add_argument("--only", default="nf4,norm,swiglu,decode,gguf")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny ceilings and shapes (the gguf suite only runs at small size; CPU: interpret mode)")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-bnb", action="store_true")
    ap.add_argument("--nf4-m", default="1,16,512,4096", help="rows M of the nf4 suite's shapes")
    a = ap.parse_args(argv)
    dev = jax.devices()[0]
    print(f"# pallas_kernels benchmark {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"# device: {dev.device_kind}, jax {jax.__version__}, backend {jax.default_backend()}")
    key = jax.random.PRNGKey(0)
    big = jax.random.normal(key, ((1 if a.smoke else 256) * 1024 * 1024,), jnp.float32)
    t_copy, _ = bench_sets(lambda v: v + 1.0, [(big,), (big * 3,)], calls=a.calls,
                           rounds=a.rounds)
    copy_bw = 2 * big.nbytes / t_copy
    del big
    size = 512 if a.smoke else 8192
    mm = [(jax.random.normal(jax.random.fold_in(key, i), (size, size), jnp.bfloat16),) * 2
          for i in range(2)]
    t_mm, _ = bench_sets(lambda x, y: x @ y, mm, calls=a.calls, rounds=a.rounds)
    mm_rate = 2 * size**3 / t_mm
    del mm
    print(f"# ceilings: copy {copy_bw / 1e9:.0f} GB/s (1 GiB float32 x + 1, read+write, {t_copy * 1e6:.0f} us); "
          f"bf16 matmul 8192^3 {mm_rate / 1e12:.0f} TFLOP/s ({t_mm * 1e6:.0f} us)", flush=True)
    if a.gguf_sweep:
        gguf_sweep(key, a.calls, a.rounds, smoke=a.smoke)
        return 0
    only = set(a.only.split(","))
    if "nf4" in only:
        suite_nf4(key, a.calls, a.rounds, not a.no_bnb, tuple(int(v) for v in a.nf4_m.split(",")))
    if "norm" in only:
        suite_norm(key, a.calls, a.rounds)
    if "swiglu" in only:
        suite_swiglu(key, a.calls, a.rounds)
    if "decode" in only:
        suite_decode(key, a.calls, a.rounds)
    if "gguf" in only:
        suite_gguf(key, a.calls, a.rounds, smoke=a.smoke)
    print("\n| kernel | shape | impl | time us | GB/s | TFLOP/s | % copy | % matmul | "
          "x faster than XLA | x faster than bnb | err vs XLA | x byte floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in ROWS:
        gbs = r["nbytes"] / r["t"] / 1e9 if r["nbytes"] else None
        tfs = r["flops"] / r["t"] / 1e12 if r["flops"] else None
        cells = [r["kernel"], r["shape"], r["impl"], f"{r['t'] * 1e6:.1f}",
                 f"{gbs:.0f}" if gbs else "", f"{tfs:.1f}" if tfs else "",
                 f"{100 * gbs * 1e9 / copy_bw:.0f}" if gbs else "",
                 f"{100 * tfs * 1e12 / mm_rate:.0f}" if tfs else "",
                 f"{r['xla'] / r['t']:.2f}" if r["xla"] else "",
                 f"{r['bnb'] / r['t']:.2f}" if r["bnb"] else "",
                 f"{r['err']:.1e}" if r["err"] is not None else "",
                 f"{r['t'] / (r['floor'] / copy_bw):.2f}" if r.get("floor") else ""]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
