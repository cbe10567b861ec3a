"""What the train step's layer scan slices, saves and writes per layer, from its jaxpr.

Each array the layer scan slices (its scanned inputs), saves for the backward (the forward
scan's stacked outputs) or reads back (the backward scan's scanned inputs) costs XLA a
dynamic slice or update per layer: on the H100 each was an async copy node of about 2 us
(benchmarks/RESULTS.md, issue 27's SmolLM2 16 x 64 profile). This script counts them without
running anything: it traces the `jaxqlora.train.Trainer` step of a shapes-only QLoRA model
(NF4 + DQ, LoRA r=16 on all seven projections, dropout 0.05) and prints, for the forward and
the backward scan over the layers, how many arrays go in and out per layer, by shape and dtype.

``--fake-gpu`` traces the GPU path on the CPU (`jax.default_backend` reports "gpu" and
cuDNN's version check is faked, so cuDNN attention and the Pallas add+norm are what is
traced; nothing is lowered or run).

    python benchmarks/scan_arrays.py --fake-gpu            # SmolLM2 classification step, 16 x 64
    python benchmarks/scan_arrays.py --task causal-lm --length 512 --in-place off
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _walk(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for p in e.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _walk(inner)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", type=int, default=0, help="override the layer count (0: the model's)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--task", choices=["classification", "causal-lm"], default="classification")
    ap.add_argument("--in-place", choices=["default", "off", "on"], default="on",
                    help="CausalLM.params_in_place (default here: on, the GPU default)")
    ap.add_argument("--fake-gpu", action="store_true", help="trace the GPU path on the CPU (see above)")
    args = ap.parse_args(argv)

    import jax

    if args.fake_gpu:
        import jax._src.cudnn.fused_attention_stablehlo as fa

        jax.default_backend = lambda: "gpu"
        fa.check_cudnn_version = lambda: 91000
        fa.check_compute_capability = lambda *a: True
    from flax import nnx

    import common
    from jaxqlora.data import batch_spec
    from jaxqlora.train import (_STATES, SequenceClassifier, Trainer, abstract, causal_lm_loss,
                                classification_loss, make_optimizer)

    cfg = common.MODELS[args.model]
    if args.layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=args.layers)
    layers = cfg.num_hidden_layers
    optimizer, _ = make_optimizer(2e-4, total_steps=1000)
    model = common.abstract_nf4_model(cfg, lora=True, remat="none", dropout=0.05)
    model.params_in_place = common.IN_PLACE[args.in_place]
    cls = args.task == "classification"
    if cls:
        model = nnx.eval_shape(lambda: SequenceClassifier(model, 2, pooling="last", seed=0))
    trainer = Trainer(model, classification_loss if cls else causal_lm_loss, optimizer)
    call = trainer._step
    batch = batch_spec(args.batch, args.length, causal_lm=not cls, accum=1)
    jaxpr = jax.make_jaxpr(call.jitted)(*call._flat(tuple(abstract(trainer._leaves[n]) for n in _STATES) + (batch,)))
    scans = [e for e in _walk(jaxpr.jaxpr) if e.primitive.name == "scan" and e.params["length"] == layers]
    print(f"# {args.model} ({layers} layers) {args.task} {args.batch} x {args.length}, in-place {args.in_place}, "
          f"{'faked GPU' if args.fake_gpu else jax.default_backend()} path, jax {jax.__version__}")
    for name, e in zip(("forward", "backward"), scans):
        nc, nk = e.params["num_consts"], e.params["num_carry"]
        ins, outs = [v.aval for v in e.invars[nc + nk:]], [v.aval for v in e.outvars[nk:]]
        print(f"{name}: {len(ins)} arrays sliced per layer, {len(outs)} written per layer, {nk} carried")
        for label, avals in (("  in ", ins), ("  out", outs)):
            for shape, n in sorted(collections.Counter(a.str_short() for a in avals).items()):
                print(f"{label} {n:3d} x {shape}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
