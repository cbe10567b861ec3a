"""GGUF Q4_0 / Q4_1 / Q8_0 GEMV on the CPU: a C++ kernel called through XLA's FFI.

XLA:CPU multiplies by GGUF blocks only after writing every decoded weight piece as float32
(`jaxqlora.ggml.xla_matmul`; the profile in benchmarks/RESULTS.md: 56% of a CPU decode step).
`gguf_cpu.cc` reads the blocks as stored (the field planes of
`pallas_kernels.gguf_matmul.split_blocks`, a stacked weight's layer picked by index, nothing
sliced or copied), widens each block's codes to float32 in registers and multiplies them by x
with FMAs (AVX2 + FMA + F16C where the compiler targets them, plain C++ elsewhere), over the rows
in chunks on XLA's intra-op thread pool: llama.cpp's way of reading a quantized weight, in
float32 activations (llama.cpp quantizes x to 8 bits; this does not).

The kernel is compiled on first use with the machine's C++ compiler (``$CXX``, else ``c++``,
``g++`` or ``clang++``; ``-O3 -march=native``; about 5-10 s) into
``$XDG_CACHE_HOME/jaxqlora/cpu_kernels`` (else ``~/.cache/jaxqlora/cpu_kernels``), keyed by
the source, the compiler, jaxlib's version and the CPU's flags, written under a temporary name
and renamed. Where there is no compiler or the build fails, `available` is False (the reason in
`unavailable_reason`) and callers keep the XLA path. ``JAXQLORA_CPU_KERNELS=0`` turns it off.

Source: ggml ``ggml-common.h`` (block_q4_0, block_q4_1, block_q8_0) and ``ggml-cpu`` (the
per-block dot with the scale applied once per block); XLA FFI (``xla/ffi/api/ffi.h``, the
``jax.ffi`` guide).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["FORMATS", "MAX_M", "ENV", "available", "unavailable_reason", "applies", "gguf_gemv",
           "gguf_gemv_reference"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gguf_cpu.cc")

#: GGUF type -> (handler symbol in gguf_cpu.cc, the planes it reads, in order).
FORMATS = {"Q4_0": ("JaxqloraGgufGemvQ4_0", ("d", "qs")),
           "Q4_1": ("JaxqloraGgufGemvQ4_1", ("d", "m", "qs")),
           "Q8_0": ("JaxqloraGgufGemvQ8_0", ("d", "qs"))}

#: Rows of x up to which the kernel is used (decoding); more rows (a prefill) are a GEMM,
#: where XLA's dot over decoded pieces reuses each decoded weight across the rows.
MAX_M = 16

#: Environment variable: "0" / "off" / "false" turns the CPU kernel off.
ENV = "JAXQLORA_CPU_KERNELS"

_lock = threading.Lock()
_state: dict = {}


def _target(fmt: str) -> str:
    return f"jaxqlora_gguf_gemv_{fmt.lower()}"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxqlora" / "cpu_kernels"


def _build(cxx: str) -> Path:
    """Compile gguf_cpu.cc into the cache (once per source, compiler, jaxlib and CPU)."""
    import jaxlib

    include = jax.ffi.include_dir()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{include}"]
    native = ["-march=native"] if platform.machine().lower() in ("x86_64", "amd64", "i686") else ["-mcpu=native"]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(flags + native), jaxlib.__version__,
                                    _cpu_flags()]).encode()).hexdigest()[:20]
    out = _cache_dir() / f"gguf_cpu-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".gguf_cpu-", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        for extra in (native, []):  # -march=native first; a compiler without it builds generic code
            r = subprocess.run([cxx, *flags, *extra, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                               timeout=600)
            if r.returncode == 0:
                break
        else:
            raise RuntimeError(f"{cxx} failed on {SOURCE.name}: {r.stderr.strip()[-800:]}")
        os.replace(tmp, out)  # whole or absent: a concurrent build of the same key writes the same file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load() -> bool:
    """Build (or find) the kernel library and register its FFI targets once per process."""
    if "ok" in _state:
        return _state["ok"]
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        ok, reason = False, ""
        if os.environ.get(ENV, "").strip().lower() in ("0", "off", "false", "no"):
            reason = f"${ENV} is off"
        elif (cxx := _compiler()) is None:
            reason = "no C++ compiler found (set $CXX)"
        else:
            try:
                path = _build(cxx)
                lib = ctypes.cdll.LoadLibrary(str(path))
                for fmt, (symbol, _) in FORMATS.items():
                    jax.ffi.register_ffi_target(_target(fmt), jax.ffi.pycapsule(getattr(lib, symbol)),
                                                platform="cpu")
                ok, reason = True, str(path)
            except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
                reason = f"{type(e).__name__}: {e}"
                log.warning("jaxqlora: the CPU GGUF kernel is not available (%s); XLA's path is used", reason)
        _state["ok"], _state["reason"] = ok, reason
        return ok


def available() -> bool:
    """True when the CPU kernel is built (or found in the cache) and registered; builds it on
    the first call (a few seconds)."""
    return _load()


def unavailable_reason() -> str:
    """Why `available` is False ('' before the first call); the library's path when it is True."""
    return _state.get("reason", "")


def applies(fmt: str, m: int) -> bool:
    """Whether `gguf_gemv` takes a product of ``m`` rows by a weight of GGUF type ``fmt``:
    a supported format, ``m <= MAX_M``, and the kernel available."""
    return fmt in FORMATS and 0 < m <= MAX_M and available()


def _ffi(x, layer, *planes, fmt: str):
    n = planes[-1].shape[-3]
    call = jax.ffi.ffi_call(_target(fmt), jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32),
                            vmap_method="sequential")
    return call(x, layer, *planes)


def gguf_gemv(x: jax.Array, planes: dict, fmt: str, layer=None, *, fallback) -> jax.Array:
    """``x @ W.T`` in float32 for a GGUF weight ``W [N, K]`` held as field planes, by the CPU
    kernel on a CPU and by ``fallback`` on any other platform and in derivatives.

    Args:
      x: ``[M, K]`` float32 activations (``K`` a multiple of 32).
      planes: the weight's planes (`pallas_kernels.gguf_matmul.split_blocks`): float16 ``d``
        (and ``m`` for Q4_1) ``[(L,) N, nb]``, uint8 ``qs`` ``[(L,) N, nb, bytes]``.
      fmt: "Q4_0", "Q4_1" or "Q8_0".
      layer: None, or an int / int32 scalar: the planes are stacked ``[L, ...]`` and layer
        ``layer`` is multiplied, read in place.
      fallback: ``x -> x @ W.T`` for the same weight with XLA (float32 ``[M, N]``): what runs
        on a GPU (``JAXQLORA_KERNELS=xla``) and what differentiates the product in ``x`` (the
        kernel has no derivative of its own; the weight is frozen).

    Returns:
      float32 ``[M, N]``: each block's codes times x summed in float32, times the block's
      ``d`` (Q4_1: plus ``m`` times the block's sum of x); within float32 rounding of
      `gguf_gemv_reference`.

    Raises:
      KeyError: ``fmt`` not in `FORMATS`. At run time the kernel rejects a layer index
      outside ``[0, L)`` (an XLA runtime error).
    """
    _, fields = FORMATS[fmt]
    ops = tuple(planes[f] for f in fields)
    layer = jnp.asarray(0 if layer is None else layer, jnp.int32)

    @jax.custom_jvp
    def product(x, layer, *ops):
        return jax.lax.platform_dependent(x, layer, *ops, cpu=functools.partial(_ffi, fmt=fmt),
                                          default=lambda x, *_: fallback(x))

    @product.defjvp
    def _jvp(primals, tangents):
        return product(*primals), fallback(tangents[0])

    return product(x.astype(jnp.float32), layer, *ops)


def gguf_gemv_reference(x: np.ndarray, raw: np.ndarray, fmt: str, shape: tuple[int, int]) -> np.ndarray:
    """float64 ``x @ W.T`` with ``W = gguf.quants.dequantize(raw, fmt)`` (the gguf package's
    own decoder: the independent reference of the tests)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    w = dequantize(np.asarray(raw, np.uint8), GGMLQuantizationType[fmt]).reshape(shape)
    return np.asarray(x, np.float64) @ w.astype(np.float64).T
