#!/usr/bin/env python3
"""The README's "## Results" section, regenerated from benchmarks/RESULTS.md.

    python benchmarks/readme_results.py            # print the section
    python benchmarks/readme_results.py --check    # exit 1, naming the stale rows, if README.md differs
    python benchmarks/readme_results.py --write    # rewrite README.md's Results section in place

Every README row is declared in `TABLES` below: a `Row` says where its figures are
(`Src`: regexes that the RESULTS.md headings must match, and for each field a table cell,
`T(row, column)`, or a sentence, `R(regex)`), and `Cmp` says what it is compared with.

Newest wins: RESULTS.md keeps its newest sections at the top, so the figures come from the
first block, in file order, whose headings match and that holds every field of one `Src`
(a block is a ``## `` section's text before its first ``### ``, or one ``### `` subsection;
its headings are ``## <section> › ### <subsection>``). A new section whose heading and table
labels match a `Src` replaces the older figures without an edit here.

Device and date come from the block's headings (the ``### `` heading if it holds a date, else
the ``## `` one): ``... — <device>, <YYYY-MM-DD>`` or ``..., <device>, <YYYY-MM-DD>``.

Same run or not: a comparison is marked *same run* only when its figures come from the same
block as the row's and the `Cmp` says that block measured both sides in one run; otherwise it
is marked *not same run* with the other side's device and date (or its note).

A declared figure that no block holds is an error naming the row, the headings and the field.
No jaxqlora import: this runs in milliseconds (tests/test_readme_results.py).

Refreshing a figure: put the new section at the top of RESULTS.md with a heading that names
the device and date (``## <what> (issue N) — <device>, <YYYY-MM-DD>``), using the heading
words and the table labels of the figure's `Src` (``--explain`` prints, per row, the block
that won and the row/column each field came from); then run ``--write`` and commit README.md
with RESULTS.md. A new layout for an existing figure: add a `Src` to the row's ``find`` (and
to its `Cmp`'s, if the same block holds the other side). A new figure: add a `Row` to a list
in `TABLES`.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
README = ROOT / "README.md"

NUM = r"\d[\d,]*(?:\.\d+)?"          # 1,516.4  0.8571  17
DATE = re.compile(r"\b(\d{4}-\d{2}-\d{2})\b")
SECTION = "## Results"


# ---------------------------------------------------------------------------------------
# Declarations


@dataclass(frozen=True)
class T:
    """A table cell: the first row whose cells joined by `` | `` match ``row`` (re.search,
    so ``^label \\|`` is "the first cell is label"), in the column whose header matches
    ``col`` (re.search, case-insensitive). ``pick``: a regex applied to the cell (group 1 if
    it has one, else the whole match); default the whole cell. ``**`` is removed first."""
    row: str
    col: str
    pick: str | None = None


@dataclass(frozen=True)
class R:
    """A figure in a sentence: ``regex`` searched in the block's text (whitespace collapsed,
    ``**`` removed); the value is its group ``group``."""
    regex: str
    group: int | str = 1


@dataclass(frozen=True)
class Src:
    """Where one set of fields is: ``heading`` regexes that must all match the block's
    headings (case-insensitive), and ``fields`` (name -> `T` or `R`), all in one block.
    ``note`` is printed after the row's figures when this source wins."""
    heading: tuple[str, ...]
    fields: dict
    note: str = ""


@dataclass(frozen=True)
class Cmp:
    """What a row is compared with. ``find``: its sources (newest wins, as for the row);
    ``text``: a format over the row's and these fields and ``ratios`` (name -> (numerator
    field, denominator field), printed as 1.23x). ``same_run``: the block measured both sides
    in one run (only then, and only when both come from the same block, is it marked so);
    ``note`` says where a not-same-run figure from the same block comes from."""
    find: tuple[Src, ...]
    text: str
    ratios: dict = field(default_factory=dict)
    same_run: bool = True
    note: str = ""


@dataclass(frozen=True)
class Row:
    """One README row: ``label`` (first column), ``find`` (its sources, in priority order
    within a block), ``text`` (a format over the fields and ``ratios``), ``cmps``."""
    label: str
    find: tuple[Src, ...]
    text: str
    cmps: tuple[Cmp, ...] = ()
    ratios: dict = field(default_factory=dict)


GPU = r"NVIDIA|H100|H200"
CPU = r"2-core CPU"
SERVING = r"\bserv(?:e|ing)\b"   # "## Serving (issue 24) — ...", "### `benchmarks/serve.py ...`"
FINETUNE = r"fine-?tun"


def _first(label: str) -> str:
    """Row regex: the first cell is exactly ``label``."""
    return "^" + re.escape(label) + r" \|"


# Fine-tuning ---------------------------------------------------------------------------

_CPU_FT = Src((CPU, FINETUNE), {
    "acc": T(r"^test accuracy \|", r"^jaxqlora", NUM),
    "wall": T(r"^wall time", r"^jaxqlora", r"^[^(]+"),
    "step": T(r"^seconds per step \|", r"^jaxqlora", NUM)})
_CPU_FT_PEER = Src((CPU, FINETUNE), {
    "p_acc": T(r"^test accuracy \|", r"transformers", r"^" + NUM + r"(?: after \d+ steps)?"),
    "p_wall": T(r"^wall time", r"transformers", r"^[^(]+"),
    "p_step": T(r"^seconds per step \|", r"transformers", NUM)})

_CPU_FT_QUIET = Src((CPU, FINETUNE, r"quiet"), {
    "acc": T(r"quiet\) \|", r"test accuracy", r"/ (\d\.\d+)"),
    "wall": T(r"quiet\) \|", r"^wall", r"^[\d,]+ s"),
    "step": T(r"quiet\) \|", r"^training loop", r"\(([\d.]+) s/step")},
    note="an AVX2 2-core machine with nothing else running")

FINE_TUNING = [
    Row("`jaxqlora finetune` (defaults: 350 steps of 16)", (_CPU_FT_QUIET, _CPU_FT),
        "test {acc}, {wall} wall, {step} s/step",
        (Cmp((_CPU_FT_PEER,), "transformers + PEFT: test {p_acc}, {p_wall} wall, {p_step} s/step",
             same_run=False, note="2026-11-21 on another 2-core machine, same split; not the same run"),)),
    Row("`jaxqlora finetune --epochs 2` (1,154 steps of 16)",
        (Src((GPU, r"finetune --epochs 2"), {
            "acc": T(r"^after, empty compile cache \|", r"^test accuracy"),
            "cold": T(r"^after, empty compile cache \|", r"^wall"),
            "warm": T(r"^after, warm cache \|", r"^wall")}),),
        "test {acc}, {cold} wall with an empty compile cache, {warm} with a warm one"),
    Row("`jaxqlora finetune --task causal-lm` (350 steps of 16)",
        (Src((r"causal-lm " + FINETUNE,), {
            "acc": T(r"^test, after training \|", r"label-word accuracy"),
            "v0": T(r"^validation, untrained", r"^loss$"),
            "v1": T(r"^validation, after training \|", r"^loss$")}),),
        "label word {acc} (greedy), validation loss {v0} -> {v1}"),
]

# Generation ----------------------------------------------------------------------------

def _decode_8b(batch: int, shape: str) -> Row:
    return Row(
        f"8B-shaped NF4 (random weights), {shape} prompt, 128 new tokens",
        (Src((GPU,), {"codes": T(r"^kernel codes \|", rf"^batch {batch}$"),
                      "bnb": T(r"^bnb bytes \(default\) \|", rf"^batch {batch}$")}),),
        "{codes} tok/s with `--kernel-codes`, {bnb} by default",
        (Cmp((Src((GPU,), {"peer": T(_first("8B-shaped NF4") + rf" {shape} \|", r"^transformers")}),),
             "transformers + bitsandbytes {peer} tok/s (`--kernel-codes` {r}, default {rd})",
             {"r": ("codes", "peer"), "rd": ("bnb", "peer")}),))


GENERATION = [
    _decode_8b(1, "1x512"),
    _decode_8b(32, "32x512"),
    Row("SmolLM2-135M-shaped NF4 (random weights), 1x512 prompt, 128 new tokens",
        (Src((GPU,), {"tps": R(r"SmolLM2-135M-shaped NF4 \([^)]*\): (" + NUM + r") tokens/s at batch 1")}),
         Src((GPU,), {"tps": T(r"^SmolLM2-135M NF4 \| 1 \|", r"^tok/s$")})),
        "{tps} tok/s",
        (Cmp((Src((GPU,), {"peer": T(r"^SmolLM2-shaped NF4 \| 1x512 \|", r"^transformers")}),),
             "transformers + bitsandbytes {peer} tok/s ({r})", {"r": ("tps", "peer")}),)),
    Row("GGUF kept quantized (`--keep-quantized`): 8B-shaped Q4_K_M (random blocks), 1x512 prompt",
        (Src((GPU, r"GGUF kept quantized"), {
            "kc": T(r"^8B-shaped Q4_K_M, `--kernel-codes`", r"^decode tok", NUM),
            "kgb": T(r"^8B-shaped Q4_K_M, `--kernel-codes`", r"^device GB in use", r"^[\d.]+"),
            "tps": T(r"^8B-shaped Q4_K_M, Triton", r"^decode tok", NUM),
            "gb": T(r"^8B-shaped Q4_K_M, Triton", r"^device GB in use", r"^[\d.]+")}),),
        "{kc} tok/s with `--kernel-codes` ({kgb} GB on the device), {tps} by default ({gb} GB)"),
    Row("GGUF kept quantized: the embedded SmolLM2-135M Q4_1 file, 1x512 prompt",
        (Src((GPU, r"GGUF kept quantized"), {"tps": T(r"^SmolLM2-135M Q4_1", r"^decode tokens/s")}),),
        "{tps} tok/s"),
    Row("embedded SmolLM2-135M-Instruct, `generate` at batch 1, 128 new tokens",
        (Src((CPU,), {"tps": T(r"^concurrency 1 \|", r"^offline decode", NUM)},
             note="decode only: the offline baseline of `benchmarks/serve.py`, 512-token prompt, float32"),),
        "{tps} tok/s"),
    Row("embedded SmolLM2-135M-Instruct Q4_1 GGUF against llama.cpp on the same 2-core machine and file",
        (Src((CPU, r"against llama\.cpp"), {
            "o1": T(r"^ours, default \(float32, kept quantized\): decode", r"^run 1"),
            "o2": T(r"^ours, default \(float32, kept quantized\): decode", r"^run 2"),
            "k1": T(r"^ours, `--keep-quantized` \(float32\): decode", r"^run 1"),
            "k2": T(r"^ours, `--keep-quantized` \(float32\): decode", r"^run 2"),
            "t1": T(r"^ours, default: first token", r"^run 1"),
            "t2": T(r"^ours, default: first token", r"^run 2")}),),
        "decode {o1} / {o2} tok/s by default (the file kept in its blocks, through the CPU GGUF kernel), {k1} / {k2} "
        "with `--keep-quantized` (two runs); first token of a 512-token prompt {t1} / {t2} s",
        (Cmp((Src((CPU, r"against llama\.cpp"), {
            "l1": T(r"^llama\.cpp `llama-bench -t 2`: tg128", r"^run 1"),
            "l2": T(r"^llama\.cpp `llama-bench -t 2`: tg128", r"^run 2"),
            "p1": T(r"^llama\.cpp: pp512", r"^run 1", r"^" + NUM),
            "p2": T(r"^llama\.cpp: pp512", r"^run 2", r"^" + NUM)}),),
            "llama.cpp `llama-bench -t 2` decodes {l1} / {l2} tok/s (default {r1} / {r2}) and prefills 512 tokens "
            "in {p1} / {p2} s",
            {"r1": ("o1", "l1"), "r2": ("o2", "l2")}),)),
]

# Serving -------------------------------------------------------------------------------

def _serve_c1(model: str, dev: str) -> Row:
    c1 = r"^concurrency 1 \|"
    return Row(
        f"{model}, concurrency 1: first token and decode per request",
        (Src((SERVING, dev), {"ttft": T(c1, r"^TTFT p50", "^" + NUM),
                              "dec": T(c1, r"^decode tok/s per request", NUM)}),),
        "TTFT p50 {ttft} ms, decode {dec} tok/s",
        (Cmp((Src((SERVING, dev), {"gen": T(c1, r"^offline decode", NUM)}),),
             "`generate` at batch 1: decode {gen} tok/s ({r})", {"r": ("dec", "gen")}),))


def _serve_cn(model: str, dev: str, n: int, extra: tuple[str, ...] = (), how: str = "") -> Row:
    cn = rf"^concurrency {n} \|"
    return Row(
        f"{model}, concurrency {n}{how}: output tokens/s",
        (Src((SERVING, dev) + extra, {"out": T(cn, r"^output tok/s")}),),
        "{out} tok/s",
        (Cmp((Src((SERVING, dev) + extra, {"off": T(cn, r"^offline same batch"),
                                           "dec": T(cn, r"^offline decode")}),),
             f"`generate` at batch {n}: " + "{off} tok/s end to end ({r}), {dec} decode only ({rd})",
             {"r": ("out", "off"), "rd": ("out", "dec")}),))


_GPU_MODEL = "8B-shaped NF4, `--kernel-codes`"
_CPU_MODEL = "embedded SmolLM2-135M-Instruct (float32)"
SERVING_ROWS = [
    _serve_c1(_GPU_MODEL, GPU),
    _serve_cn(_GPU_MODEL, GPU, 32, (r"^(?!.*clients in \d+ processes)",), ", clients in the server's process"),
    _serve_cn(_GPU_MODEL, GPU, 32, (r"clients in \d+ processes",), ", clients in their own processes"),
    _serve_c1(_CPU_MODEL, CPU),
    _serve_cn(_CPU_MODEL, CPU, 8),
    Row("embedded SmolLM2-135M-Instruct kept quantized (the CPU default: the CPU GGUF kernel), concurrency 1 / 8",
        (Src((SERVING, CPU, r"kept in its blocks"), {
            "c1": T(r"^kept quantized, concurrency 1 \|", r"^output tok/s"),
            "c8": T(r"^kept quantized, concurrency 8 \|", r"^output tok/s"),
            "d1": T(r"^kept quantized, concurrency 1 \|", r"^decode tok/s per request"),
            "i1": T(r"^kept quantized, concurrency 1 \|", r"^ITL p50", r"^" + NUM)}),),
        "output {c1} / {c8} tok/s; one request decodes {d1} tok/s, ITL p50 {i1} ms",
        (Cmp((Src((SERVING, CPU, r"kept in its blocks"), {
            "f1": T(r"^float32 copy, concurrency 1 \|", r"^output tok/s"),
            "f8": T(r"^float32 copy, concurrency 8 \|", r"^output tok/s"),
            "fd": T(r"^float32 copy, concurrency 1 \|", r"^decode tok/s per request")}),),
            "the float32 copy: output {f1} / {f8} tok/s, {fd} tok/s per request ({r})",
            {"r": ("d1", "fd")}, same_run=False, note="run just before it, same machine and script"),)),
    Row(f"{_CPU_MODEL}, concurrency 1 / 8 against llama.cpp on the same file: output tokens/s",
        (Src((SERVING, CPU), {"c1": T(r"^concurrency 1 \|", r"^output tok/s"),
                              "c8": T(r"^concurrency 8 \|", r"^output tok/s")}),),
        "{c1} / {c8} tok/s",
        (Cmp((Src((SERVING, CPU), {
            "l1": R(r"`llama-server -np 8` on this machine and the same file \([^:]*: (" + NUM
                    + r") tok/s at concurrency 1"),
            "l8": R(r"tok/s at concurrency 1, (" + NUM + r") at 8\)")}),),
            "`llama-server -np 8` {l1} / {l8} tok/s ({r1} / {r8})",
            {"r1": ("c1", "l1"), "r8": ("c8", "l8")},
            same_run=False, note="REFERENCE.md section 11, quoted in RESULTS.md"),)),
]

# Training step -------------------------------------------------------------------------

_PEER_8B = Src((GPU,), {
    "p": T(r"^8B-shaped 4x2048, checkpointing \| transformers\+PEFT\+bnb \|", r"^tokens/s$"),
    "pgb": T(r"^8B-shaped 4x2048, checkpointing \| transformers\+PEFT\+bnb \|", r"^peak GB")})
_PEER_SMOL = Src((GPU,), {
    "p": T(r"^SmolLM2-shaped 16x512, no checkpointing \| transformers\+PEFT\+bnb \|", r"^tokens/s$"),
    "pgb": T(r"^SmolLM2-shaped 16x512, no checkpointing \| transformers\+PEFT\+bnb \|", r"^peak GB")})
_VS_PEER = "transformers + PEFT + bitsandbytes {p} tok/s, {pgb} GB ({r})"
_FULL = r'^8B-shaped 4x2048, checkpointing \| jaxqlora `remat="full"` \|'
_SMOL_SAME = r"^SmolLM2-shaped 16x512, no checkpointing \| jaxqlora \|"

TRAINING = [
    Row('QLoRA step, 8B-shaped, 4x2048 tokens, checkpointing (`remat="full"`)',
        (Src((GPU,), {"tps": T(_FULL, r"^tokens/s$"), "gb": T(_FULL, r"^peak GB")}),),
        "{tps} tok/s, {gb} GB",
        (Cmp((_PEER_8B,), _VS_PEER, {"r": ("tps", "p")}),)),
    Row('QLoRA step, 8B-shaped, 4x2048 tokens, `remat="dots"`',
        (Src((GPU,), {"tps": T(r"^8B train step", r"^measured this session", NUM)}),
         Src((GPU,), {"tps": T(r"^8B-shaped 4x2048, `dots` \|", r"^tokens/s$")})),
        "{tps} tok/s",
        (Cmp((_PEER_8B,), "transformers + PEFT + bitsandbytes with checkpointing {p} tok/s, {pgb} GB ({r})",
             {"r": ("tps", "p")}),)),
    Row("QLoRA step, SmolLM2-shaped, 16x512 tokens, no checkpointing",
        (Src((GPU,), {"tps": T(r"^SmolLM2 16x512, no remat \|", r"^tokens/s$"),
                      "gb": T(r"^SmolLM2 16x512, no remat \|", r"^peak GB")}),),
        "{tps} tok/s, {gb} GB",
        (Cmp((_PEER_SMOL,), _VS_PEER, {"r": ("tps", "p")}),)),
    Row("QLoRA step, SmolLM2-shaped, 16x512 tokens, jaxqlora and the peer in one run",
        (Src((GPU,), {"tps": T(_SMOL_SAME, r"^tokens/s$"), "gb": T(_SMOL_SAME, r"^peak GB")}),),
        "{tps} tok/s, {gb} GB",
        (Cmp((_PEER_SMOL,), _VS_PEER, {"r": ("tps", "p")}),)),
    Row("2 GPUs, 8B-shaped with 8 layers, 4x2048 tokens per GPU",
        (Src((r"Several GPUs",), {
            "dp": T(r"^data-parallel \| 2 \| \(2, 1\) \| 16384 \|", r"^vs 1 device", r"[\d.]+x"),
            "fsdp": T(r"^FSDP \| 2 \| \(1, 2\) \| 16384 \|", r"^vs 1 device", r"[\d.]+x"),
            "w": T(r"^FSDP \| 2 \| \(1, 2\) \| 16384 \|", r"^frozen MB", r"\(([\d.]+x)")}),),
        "data-parallel {dp}, FSDP {fsdp} the tokens/s of one GPU; FSDP holds {w} of the frozen weights per GPU",
        (Cmp((Src((r"Several GPUs",), {"one": T(r"^single \| 1 \| - \| 8192 \|", r"^tokens/s$")}),),
             "one GPU: {one} tok/s"),)),
]

# Kernels -------------------------------------------------------------------------------

def _gemv(w: str, m: int, prose: str) -> Row:
    """NF4 GEMV ``w`` at M=``m``: the sweep (`nf4_mgpu_sweep.py`) as a sentence (``prose``
    with groups dense / bnb bytes / kernel codes) or as its table (columns dense bf16, bnb, w)."""
    row = rf"^{w}, {m} \|"
    sweep = (Src((GPU,), {"dense": R(prose, 1), "bnb": R(prose, 2), "codes": R(prose, 3)}),
             Src((GPU,), {"dense": T(row, r"^dense bf16$"), "bnb": T(row, r"^bnb$"), "codes": T(row, r"^w$")}))
    return Row(
        f"NF4 GEMV, W {w}, M={m}", sweep,
        "{codes} us with `--kernel-codes`, {bnb} us by default",
        (Cmp(sweep, "dense bf16 {dense} us ({r} its time)", {"r": ("codes", "dense")}),
         Cmp((Src((GPU,), {"bnbk": T(rf"^NF4 GEMV \| W {w}, M={m} \|", r"^bnb us")}),),
             "bitsandbytes `matmul_4bit` {bnbk} us ({r} its time)", {"r": ("codes", "bnbk")})))


_N = "(" + NUM + ")"
KERNELS = [
    _gemv("11008x4096", 1, rf"W 11008x4096 M=1: dense {_N}, bnb bytes {_N}, kernel codes {_N} us"),
    _gemv("4096x11008", 1, rf"; 4096x11008 M=1: {_N} / {_N} / {_N}"),
    _gemv("11008x4096", 16, rf"; 11008x4096 M=16: {_N} / {_N} / {_N}"),
    Row("NF4 forward at M=4096, W 4096x11008 (dequantize + cuBLAS)",
        (Src((GPU,), {"nf4": T(r"^4096x11008 \|", r"^NF4 fwd"), "dense": T(r"^4096x11008 \|", r"^dense bf16 fwd")}),
         Src((GPU,), {"nf4": T(r"^4096x11008 \|", r"^NF4 forward us"), "dense": T(r"^4096x11008 \|", r"^dense bf16 us")})),
        "{nf4} us",
        (Cmp((Src((GPU,), {"dense": T(r"^4096x11008 \|", r"^dense bf16 fwd")}),
              Src((GPU,), {"dense": T(r"^4096x11008 \|", r"^dense bf16 us")})),
             "dense bf16 {dense} us ({r} its time)", {"r": ("nf4", "dense")}),
         Cmp((Src((GPU,), {"bnbk": T(r"^NF4 dequant \+ matmul \| W 4096x11008, M=4096 \|", r"^bnb us")}),),
             "bitsandbytes `matmul_4bit` {bnbk} us ({r} its time)", {"r": ("nf4", "bnbk")}))),
]

TABLES = [
    ("Fine-tuning: the embedded SmolLM2-135M-Instruct on Rotten Tomatoes", FINE_TUNING),
    ("Generation: greedy decoding", GENERATION),
    ("Serving: `jaxqlora serve` under load (`benchmarks/serve.py`)", SERVING_ROWS),
    ("Training step (random weights, LoRA r=16 on all seven projections)", TRAINING),
    ("Kernels (per call)", KERNELS),
]

INTRO = """\
Generated from the newest rows of [benchmarks/RESULTS.md](benchmarks/RESULTS.md) by
`python benchmarks/readme_results.py --write` (`--check` fails when this section is behind).
Each row names the device and date of the RESULTS.md section it comes from; the command, the
tree and more rows are there. In "compared with", *same run* means both sides were measured in
one run; *not same run* means they were not (the other side's device and date, or its source,
follow), so the ratio also holds the spread between runs. Ratios of tokens/s are ours over
theirs; ratios of kernel times are our time over theirs."""

OUTRO = """\
Every target of the issues, met or not, with the reasons: [benchmarks/RESULTS.md](benchmarks/RESULTS.md)
(`benchmarks/kernels.py`, `train.py`, `generate.py`, `serve.py`, `compile.py`, `scaling.py`, `gpu_profile.py`)."""


# ---------------------------------------------------------------------------------------
# RESULTS.md


class FigureNotFound(LookupError):
    """A declared figure that no RESULTS.md block holds."""


@dataclass
class Block:
    h2: str
    h3: str
    lines: list

    @property
    def path(self) -> str:
        return f"## {self.h2}" + (f" › ### {self.h3}" if self.h3 else "")

    @property
    def text(self) -> str:
        return re.sub(r"\s+", " ", " ".join(self.lines).replace("**", ""))

    def tables(self):
        """(header cells, [row cells]) of each markdown table in the block."""
        out, cur = [], []
        for line in self.lines + [""]:
            if line.lstrip().startswith("|"):
                cur.append(_cells(line))
            else:
                if len(cur) >= 2:
                    out.append((cur[0], [r for r in cur[2:]]))
                cur = []
        return out

    def device_date(self):
        for h in (self.h3, self.h2):
            m = DATE.search(h)
            if m:
                before = h[:m.start()].rstrip(" ,")
                dev = before.rsplit("—", 1)[1] if "—" in before else before.rsplit(", ", 1)[-1]
                dev = re.sub(r"\s*\([^)]*\)", "", dev).strip()
                return dev, m.group(1)
        return None


def _cells(line: str) -> list:
    return [c.strip().replace("**", "") for c in line.strip().strip("|").split("|")]


def parse_blocks(text: str) -> list:
    """RESULTS.md in file order (newest first) as `Block`s."""
    blocks, h2, cur, fenced = [], None, None, False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("## "):
            h2 = line[3:].strip()
            cur = Block(h2, "", [])
            blocks.append(cur)
            continue
        if not fenced and line.startswith("### ") and h2 is not None:
            cur = Block(h2, line[4:].strip(), [])
            blocks.append(cur)
            continue
        if cur is not None:
            cur.lines.append(line)
    return blocks


def _pick(cell: str, pick: str | None):
    if not cell:
        return None
    if pick is None:
        return cell
    m = re.search(pick, cell)
    if not m:
        return None
    return (m.group(1) if m.groups() else m.group(0)).strip()


def _field(block: Block, spec):
    """The value of one field in ``block``, or None."""
    if isinstance(spec, R):
        m = re.search(spec.regex, block.text)
        return m.group(spec.group).strip() if m else None
    for header, rows in block.tables():
        cols = [i for i, h in enumerate(header) if re.search(spec.col, h, re.I)]
        if not cols:
            continue
        for cells in rows:
            if re.search(spec.row, " | ".join(cells)) and cols[0] < len(cells):
                v = _pick(cells[cols[0]], spec.pick)
                if v:
                    return v
    return None


def _heading_ok(block: Block, src: Src) -> bool:
    return all(re.search(h, block.path, re.I) for h in src.heading)


@dataclass
class Hit:
    block: Block
    index: int
    src: Src
    values: dict


def resolve(srcs, blocks, what: str) -> Hit:
    """The newest block holding every field of one of ``srcs`` (tried in order within a block)."""
    for i, b in enumerate(blocks):
        for s in srcs:
            if not _heading_ok(b, s):
                continue
            vals = {k: _field(b, spec) for k, spec in s.fields.items()}
            if all(v is not None for v in vals.values()):
                if b.device_date() is None:
                    raise FigureNotFound(
                        f"{what}: RESULTS.md block '{b.path}' holds the figure but its headings name "
                        "no '<device>, <YYYY-MM-DD>'")
                return Hit(b, i, s, vals)
    reasons = []
    for s in srcs:
        matched = [b for b in blocks if _heading_ok(b, s)]
        if not matched:
            reasons.append(f"no RESULTS.md heading matches all of {list(s.heading)}")
            continue
        b = matched[0]
        missing = [f"{k}: {_describe(spec)}" for k, spec in s.fields.items() if _field(b, spec) is None]
        reasons.append(f"{len(matched)} block(s) match headings {list(s.heading)}, none holds every field; "
                       f"the newest, '{b.path}', lacks " + "; ".join(missing))
    raise FigureNotFound(f"{what}: not found in benchmarks/RESULTS.md:\n  - " + "\n  - ".join(reasons))


def _describe(spec) -> str:
    if isinstance(spec, R):
        return f"a sentence matching /{spec.regex}/"
    return f"a table row /{spec.row}/ in a column /{spec.col}/" + (f" with /{spec.pick}/" if spec.pick else "")


def _num(s: str) -> float:
    m = re.search(NUM, s)
    if not m:
        raise ValueError(f"no number in {s!r}")
    return float(m.group(0).replace(",", ""))


def _ratios(spec: dict, ns: dict, what: str) -> dict:
    out = {}
    for name, (a, b) in spec.items():
        if a not in ns or b not in ns:
            raise ValueError(f"{what}: ratio {name!r} names a field that is not declared ({a!r}, {b!r})")
        r = _num(ns[a]) / _num(ns[b])
        out[name] = f"{r:.2f}x" if r < 10 else f"{r:.1f}x"
    return out


def _where(hit: Hit) -> str:
    dev, date = hit.block.device_date()
    return f"{dev}, {date}"


def render_row(row: Row, blocks) -> str:
    hit = resolve(row.find, blocks, f"row '{row.label}'")
    ns = dict(hit.values)
    ns.update(_ratios(row.ratios, ns, row.label))
    ours = row.text.format(**ns)
    if hit.src.note:
        ours += f" ({hit.src.note})"
    cmps = []
    for c in row.cmps:
        ch = resolve(c.find, blocks, f"row '{row.label}', compared with '{c.text}'")
        cns = {**ch.values, **hit.values}
        cns.update(_ratios(c.ratios, cns, row.label))
        text = c.text.format(**cns)
        if ch.index == hit.index and c.same_run:
            text += ", *same run*"
        elif ch.index == hit.index:
            text += f", *not same run*: {c.note}" if c.note else ", *not same run*"
        else:
            text += f", *not same run*: {_where(ch)}"
        cmps.append(text)
    return f"| {row.label} | {ours} | {'; '.join(cmps) or '—'} | {_where(hit)} |"


def explain(results_text: str, tables=None) -> str:
    """For each row: the block each side came from and where each field was found."""
    blocks = parse_blocks(results_text)
    out = []
    for title, rows in (tables if tables is not None else TABLES):
        out.append(f"### {title}")
        for row in rows:
            out.append(f"- {row.label}")
            for name, srcs in [("jaxqlora", row.find)] + [(f"compared with: {c.text}", c.find) for c in row.cmps]:
                hit = resolve(srcs, blocks, f"row '{row.label}'")
                out.append(f"    {name}\n      block: {hit.block.path}  [{_where(hit)}]"
                           f"\n      headings matched: {list(hit.src.heading)}")
                for k, spec in hit.src.fields.items():
                    out.append(f"      {k} = {hit.values[k]!r}  <- {_describe(spec)}")
    return "\n".join(out) + "\n"


def render(results_text: str, tables=None) -> str:
    """The README's Results section (from ``## Results`` to the blank line before the next section)."""
    blocks = parse_blocks(results_text)
    out = [SECTION, "", INTRO, ""]
    for title, rows in (tables if tables is not None else TABLES):
        out += [f"### {title}", "", "| figure | jaxqlora | compared with | device, date |", "|---|---|---|---|"]
        out += [render_row(r, blocks) for r in rows]
        out.append("")
    out += [OUTRO, ""]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------
# README.md


def section_span(readme_text: str) -> tuple[int, int]:
    """Character offsets of README's ``## Results`` section: its heading line up to the next
    ``## `` heading (outside code fences) or the end."""
    pos, start, fenced = 0, None, False
    for line in readme_text.splitlines(keepends=True):
        s = line.rstrip("\n")
        if s.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and s.startswith("## "):
            if start is not None:
                return start, pos
            if s.strip() == SECTION:
                start = pos
        pos += len(line)
    if start is None:
        raise SystemExit(f"README.md has no '{SECTION}' section")
    return start, pos


def stale_rows(current: str, fresh: str) -> list:
    """Rows (by table and label) of ``fresh`` that ``current`` lacks or states differently."""
    have = set(current.splitlines())
    out, table, other = [], "", 0
    for line in fresh.splitlines():
        if line.startswith("### "):
            table = line[4:]
        if line not in have:
            if line.startswith("| ") and not line.startswith("| figure |"):
                out.append(f"{table} / {_cells(line)[0]}")
            elif line.strip():
                other += 1
    if other:
        out.append(f"and {other} other line(s): intro, table titles or headers")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="exit 1 if README.md's Results section differs")
    g.add_argument("--write", action="store_true", help="rewrite README.md's Results section in place")
    g.add_argument("--explain", action="store_true", help="print where each figure was found")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--readme", type=Path, default=README)
    args = p.parse_args(argv)
    try:
        if args.explain:
            sys.stdout.write(explain(args.results.read_text()))
            return 0
        fresh = render(args.results.read_text())
    except FigureNotFound as e:
        print(f"readme_results: {e}", file=sys.stderr)
        return 2
    if not (args.check or args.write):
        sys.stdout.write(fresh)
        return 0
    text = args.readme.read_text()
    a, b = section_span(text)
    current = text[a:b]
    if args.check:
        if current == fresh:
            return 0
        rows = stale_rows(current, fresh)
        print(f"{args.readme}: the Results section is not what benchmarks/RESULTS.md gives "
              f"(run python benchmarks/readme_results.py --write); stale:", file=sys.stderr)
        for r in rows or ["(whitespace or removed lines)"]:
            print(f"  {r}", file=sys.stderr)
        diff = difflib.unified_diff(current.splitlines(), fresh.splitlines(), "README.md", "RESULTS.md", n=0,
                                    lineterm="")
        print("\n".join(list(diff)[:40]), file=sys.stderr)
        return 1
    new = text[:a] + fresh + text[b:]
    if new != text:
        fd, tmp = tempfile.mkstemp(dir=args.readme.parent, prefix=".README.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(new)
            os.chmod(tmp, os.stat(args.readme).st_mode & 0o777)
            os.replace(tmp, args.readme)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
