"""`jaxqlora.stream` (what ``jaxqlora generate`` prints from) vs `jaxqlora.generate` on the
embedded SmolLM2-135M-Instruct, bf16 as the CLI loads it: seconds for one chat prompt and up to
128 new tokens, after one warm-up call of each (both compiled), three rounds alternating.

    python benchmarks/stream.py      # CPU or GPU; about a minute on 2 CPU cores
"""
import time, statistics, numpy as np
import jaxqlora
from jaxqlora.generate import generate, stream, encode_prompts
model, tok = jaxqlora.load_pretrained()   # bf16, as the CLI
prompt = [{"role": "user", "content": "Write a long story about a robot who learns to paint."}]
N = 128
def run_generate():
    t = time.perf_counter()
    ids = generate(model, tok, prompt, max_new_tokens=N, return_ids=True)
    ids = np.asarray(ids[0] if isinstance(ids, tuple) else ids)
    return time.perf_counter() - t, ids
def run_stream():
    t = time.perf_counter(); n = 0; first = None
    for piece in stream(model, tok, prompt, max_new_tokens=N):
        if first is None: first = time.perf_counter()
        n += 1
    return time.perf_counter() - t, n, first - t
run_generate(); run_stream()  # compile both
g, s = [], []
for r in range(3):
    dt, ids = run_generate(); g.append(dt)
    dt2, n, ft = run_stream(); s.append((dt2, n, ft))
print("generate s:", [round(x, 2) for x in g], "ids shape", ids.shape)
print("stream s, pieces, first:", [(round(a, 2), b, round(c, 2)) for a, b, c in s])
print("median generate", round(statistics.median(g), 2), "median stream", round(statistics.median([a for a, _, _ in s]), 2))
