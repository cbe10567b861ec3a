"""Tile sweeps for the Pallas kernels on a GPU (the defaults in `pallas_kernels` come from here).

Each configuration is checked against the XLA reference on random data and timed like
``benchmarks/kernels.py`` (distinct inputs per repetition inside one jitted call). Parts:

* ``gemv``: `nf4_gemv_pallas` block_n x block_k x splits x num_warps, W 4096x11008, M = 1, 16;
* ``decode``: `decode_attention_pallas` splits x block_k x warps x stages at 32k context, B = 1;
* ``decode-short``: the same at the decode benchmark's context (a 640-slot cache, 576 keys
  valid: a 512-token prompt plus 64 new tokens, `benchmarks/generate.py`), B = 1, 8 and 32;
* ``elementwise``: the row/element tile of `rms_norm` and `swiglu` (module ``_TILE``).

Usage (GPU, repository root): ``python benchmarks/nf4_tune.py --part gemv,decode,elementwise``
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.kernels import BLOCKSIZE, bench_sets, random_nf4, rel_err  # noqa: E402
import pallas_kernels.rms_norm as rms_mod  # noqa: E402
import pallas_kernels.swiglu as swiglu_mod  # noqa: E402
from pallas_kernels.decode_attention import (  # noqa: E402
    decode_attention,
    decode_attention_pallas,
    default_block_k,
    default_num_splits,
)
from pallas_kernels.nf4_matmul import NF4_CODE, nf4_gemv_pallas, nf4_matmul  # noqa: E402


def sweep(name, fn_of_cfg, sets, ref, configs, top=5, calls=3, rounds=3):
    rows = []
    for cfg in configs:
        try:
            t, out = bench_sets(fn_of_cfg(**cfg), sets, calls=calls, rounds=rounds)
            rows.append((t, cfg, rel_err(out, ref)))
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"  {name} {cfg}: FAILED {type(e).__name__}: {str(e)[:160]}", flush=True)
    rows.sort(key=lambda r: r[0])
    for t, cfg, err in rows[:top]:
        print(f"  {name} {t * 1e6:8.1f} us  err {err:.1e}  {cfg}", flush=True)
    if rows:
        print(f"  {name} worst {rows[-1][0] * 1e6:.1f} us of {len(rows)} configs", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="gemv,decode,elementwise")
    a = ap.parse_args()
    parts = set(a.part.split(","))
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    key = jax.random.PRNGKey(0)
    code = jnp.asarray(NF4_CODE)
    if "gemv" in parts:
        n, k = 4096, 11008
        for m in (1, 16):
            sets = [(jax.random.normal(jax.random.fold_in(key, r), (m, k), jnp.bfloat16),
                     *random_nf4(jax.random.fold_in(key, 100 + r), n, k)) for r in range(8)]
            ref = nf4_matmul(*sets[0], blocksize=BLOCKSIZE, impl="xla")
            grid = itertools.product((32, 64, 128) if m == 1 else (32, 64), (128, 256),
                                     (4, 16), (4, 8), (2, 3))
            configs = [dict(block_n=bn, block_k=bk, splits=sp, num_warps=nw, num_stages=ns)
                       for bn, bk, sp, nw, ns in grid]

            def fn(**cfg):
                return lambda x, p, am, na, nc, off: nf4_gemv_pallas(
                    x, p, am, code, na, nc, off, blocksize=BLOCKSIZE, **cfg)
            sweep(f"gemv M={m}", fn, sets, ref, configs)
    if "decode" in parts:
        b, s, hq, hkv, d = 1, 32768, 32, 8, 128
        sets = []
        for r in range(4):
            kk = jax.random.fold_in(key, r)
            sets.append((jax.random.normal(kk, (b, hq, d), jnp.bfloat16),
                         jax.random.normal(jax.random.fold_in(kk, 1), (b, s, hkv, d), jnp.bfloat16),
                         jax.random.normal(jax.random.fold_in(kk, 2), (b, s, hkv, d), jnp.bfloat16),
                         jnp.full((b,), s, jnp.int32), jnp.zeros((b,), jnp.int32)))
        ref = decode_attention(*sets[0][:4], impl="xla")
        configs = [dict(num_splits=sp, block_k=bk, num_warps=nw, num_stages=ns)
                   for sp, bk, nw, ns in itertools.product((33, 66, 132, 264), (64, 128),
                                                           (4, 8), (2, 3))]

        def fn_d(**cfg):
            return lambda q, k, v, ln, st: decode_attention_pallas(
                q, k, v, ln, st, scale=d ** -0.5, **cfg)
        sweep("decode B1 32k", fn_d, sets, ref, configs)
    if "decode-short" in parts:
        s, valid, hq, hkv, d = 640, 576, 32, 8, 128
        for b in (32, 8, 1):
            sets = []
            for r in range(4):
                kk = jax.random.fold_in(key, 50 + r)
                sets.append((jax.random.normal(kk, (b, hq, d), jnp.bfloat16),
                             jax.random.normal(jax.random.fold_in(kk, 1), (b, s, hkv, d), jnp.bfloat16),
                             jax.random.normal(jax.random.fold_in(kk, 2), (b, s, hkv, d), jnp.bfloat16),
                             jnp.full((b,), valid, jnp.int32), jnp.zeros((b,), jnp.int32)))
            ref = decode_attention(*sets[0][:4], impl="xla")

            def fn_s(**cfg):
                return lambda q, k, v, ln, st: decode_attention_pallas(
                    q, k, v, ln, st, scale=d ** -0.5, **cfg)
            bk0 = default_block_k(s, d)  # the defaults, timed the way the sweep times the rest
            default = dict(num_splits=default_num_splits(b, hkv, s, bk0), block_k=bk0)
            sweep(f"decode B{b} 576 default", fn_s, sets, ref, [default], top=1)
            configs = [dict(num_splits=sp, block_k=bk, num_warps=nw, num_stages=ns)
                       for sp, bk, nw, ns in itertools.product((1, 2, 3, 5, 9), (32, 64, 128), (4, 8), (2, 3))]
            sweep(f"decode B{b} 576", fn_s, sets, ref, configs)
    if "elementwise" in parts:
        m, h = 16384, 4096
        xs = [(jax.random.normal(jax.random.fold_in(key, r), (m, h), jnp.bfloat16),
               jnp.ones((h,), jnp.bfloat16) * 1.1,
               jax.random.normal(jax.random.fold_in(key, 9 + r), (m, h), jnp.bfloat16))
              for r in range(4)]
        nref = rms_mod.rms_norm_reference(xs[0][0], xs[0][1], 1e-5)
        dref = jax.vjp(lambda a, b: rms_mod.rms_norm_reference(a, b, 1e-5),
                       xs[0][0], xs[0][1])[1](xs[0][2])[0]
        # The tiles are read at trace time: clear the jit caches after each change.
        tile0, bwd_tile0 = rms_mod._TILE, rms_mod._BWD_TILE
        for tile in (4096, 8192, 16384, 32768):
            rms_mod._TILE = tile  # forward tile
            jax.clear_caches()
            sweep(f"rmsnorm fwd TILE={tile}",
                  lambda: (lambda x, w, dy: rms_mod.rms_norm(x, w, 1e-5, impl="pallas")),
                  xs, nref, [{}], top=1)
            rms_mod._TILE, rms_mod._BWD_TILE = tile0, tile  # backward tile, default forward
            jax.clear_caches()
            sweep(f"rmsnorm fwd+bwd BWD_TILE={tile}",
                  lambda: (lambda x, w, dy: jax.vjp(
                      lambda a, b: rms_mod.rms_norm(a, b, 1e-5, impl="pallas"), x, w)[1](dy)[0]),
                  xs, dref, [{}], top=1)
            rms_mod._BWD_TILE = bwd_tile0
        jax.clear_caches()
        r_, c = 16384, 11008
        gs = [tuple(jax.random.normal(jax.random.fold_in(key, 10 * r + i), (r_, c), jnp.bfloat16)
                    for i in range(3)) for r in range(2)]
        ref = swiglu_mod.swiglu_reference(gs[0][0], gs[0][1])
        gref = jax.vjp(swiglu_mod.swiglu_reference, gs[0][0], gs[0][1])[1](gs[0][2])[0]
        tile0 = swiglu_mod._TILE
        for tile in (4096, 8192, 16384, 32768):
            swiglu_mod._TILE = tile
            jax.clear_caches()
            sweep(f"swiglu fwd TILE={tile}",
                  lambda: (lambda g, u, d: swiglu_mod.swiglu(g, u, impl="pallas")),
                  gs, ref, [{}], top=1)
            sweep(f"swiglu bwd TILE={tile}",
                  lambda: (lambda g, u, d: jax.vjp(
                      lambda a, b: swiglu_mod.swiglu(a, b, impl="pallas"), g, u)[1](d)[0]),
                  gs, gref, [{}], top=1)
        swiglu_mod._TILE = tile0
        jax.clear_caches()
        sweep("xla rmsnorm fwd", lambda: (lambda x, w, dy: rms_mod.rms_norm(x, w, 1e-5, impl="xla")),
              xs, nref, [{}], top=1)
        sweep("xla swiglu fwd", lambda: (lambda g, u, d: swiglu_mod.swiglu(g, u, impl="xla")),
              gs, ref, [{}], top=1)
        big = jnp.ones((256 * 1024 * 1024,), jnp.float32)
        sweep("copy f32 1GiB a+1", lambda: (lambda v: v + 1.0), [(big,), (big * 2,)], big + 1.0,
              [{}], top=1)


if __name__ == "__main__":
    main()
