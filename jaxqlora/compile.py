"""Shape buckets, ahead-of-time compilation, and the persistent compilation cache.

Every jitted function jaxqlora runs sees inputs of a few fixed shapes: training and
evaluation batches are padded to a sequence-length bucket (`DEFAULT_BUCKETS`), prompts to
a prompt-length bucket (`PROMPT_BUCKETS`). `precompile` lowers and compiles each
(function, bucket) pair once, before the weights fill the device, with
``jax.jit(f).lower(*abstract_args).compile()``, several compiles at once in a thread pool
(XLA releases the GIL while it compiles); the returned `Executables` (a dict keyed
by `BucketKey`) are what `jaxqlora.train.Trainer` and `jaxqlora.generate.generate` then
call. An input that needs a bucket nobody compiled is an error (`BucketError`) unless the
caller opted in to compiling new buckets (``allow_new_buckets``), so a run never
recompiles silently.

Compiled programs also persist on disk across runs: `enable_compile_cache` points JAX's
persistent compilation cache at a per-user folder (``$XDG_CACHE_HOME/jaxqlora/xla``, else
``~/.cache/jaxqlora/xla``). Importing jaxqlora calls it once. ``JAXQLORA_COMPILE_CACHE=0``
turns it off; ``JAXQLORA_COMPILE_CACHE=/some/dir`` moves it. A folder set by the user
through JAX itself (``JAX_COMPILATION_CACHE_DIR``) is left alone.

Source: JAX ahead-of-time lowering (``jax.stages``) and the persistent compilation cache
guide (docs.jax.dev/en/latest/persistent_compilation_cache.html); the config names used
(``jax_compilation_cache_dir``, ``jax_persistent_cache_min_compile_time_secs``,
``jax_persistent_cache_min_entry_size_bytes``) exist in jax 0.10 and 0.11.
"""

from __future__ import annotations

import os
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax

from jaxqlora.errors import JaxQLoRAError

DEFAULT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048)
"""Sequence-length buckets of training and evaluation batches (tokens)."""

PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
"""Prompt-length buckets of generation's prefill (tokens); prompts are left-padded to one."""


class BucketError(JaxQLoRAError, ValueError):
    """An input needs a shape bucket that is not available (longer than the largest
    bucket, or never precompiled)."""


def bucket_for(length: int, buckets: Sequence[int], *, allow_new: bool = False) -> int:
    """The smallest bucket >= ``length`` (tokens).

    Args:
      length: the input length.
      buckets: the available bucket lengths.
      allow_new: when ``length`` exceeds every bucket, return ``length`` itself (a new
        bucket, compiled on first use) instead of raising.

    Raises:
      BucketError: ``length`` exceeds the largest bucket (or there are no buckets) and
        ``allow_new`` is False; the message names the length and the buckets.
    """
    for b in sorted(buckets):
        if length <= b:
            return int(b)
    if allow_new:
        return int(length)
    raise BucketError(f"an input of {length} tokens exceeds the largest bucket; buckets are "
                      f"{tuple(sorted(buckets))} (add a larger bucket, or allow new buckets explicitly)")


def buckets_up_to(max_len: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> tuple[int, ...]:
    """The buckets shorter than ``max_len``, then ``max_len`` itself (inputs are truncated
    to ``max_len``, so it is the largest bucket needed)."""
    return tuple(int(b) for b in sorted(buckets) if b < max_len) + (int(max_len),)


# --------------------------------------------------------------- executables


class BucketKey(NamedTuple):
    """Names one compiled executable.

    Attributes:
      kind: which function (``"train"``, ``"eval"``, ``"prefill"``, ``"decode"``, ...).
      shape: the bucketed shape of its main input (e.g. ``(accum, batch, seq_len)``).
      static: everything else the executable was specialised on (hashable; compared,
        never shown in messages).
    """

    kind: str
    shape: tuple[int, ...]
    static: Any = ()

    def __str__(self) -> str:
        return f"{self.kind} {tuple(self.shape)}"


class Job(NamedTuple):
    """A function to lower and the abstract arguments to lower it with.

    ``fn`` is a ``jax.jit``-wrapped function; ``args`` / ``kwargs`` are what its call
    takes, arrays given as ``jax.ShapeDtypeStruct`` (see `abstract`), static arguments as
    their values.
    """

    fn: Callable
    args: tuple
    kwargs: Mapping[str, Any] = {}


class Timing(NamedTuple):
    """Seconds spent on one executable: ``lower`` (tracing and lowering to StableHLO, never
    cached) and ``compile`` (XLA compilation, or loading it from the persistent cache)."""

    lower: float
    compile: float


class Executables(dict):
    """Compiled executables (``jax.stages.Compiled``) keyed by `BucketKey`.

    Attributes:
      allow_new_buckets: when a key is missing, `lookup` compiles it (logged) instead of
        raising `BucketError`.
      seconds: the `Timing` of each key.
      wall: wall-clock seconds spent in `precompile` calls that filled this collection
        (less than `total` when compiles ran concurrently).
      log: where per-bucket compile times are reported.
    """

    def __init__(self, *, allow_new_buckets: bool = False, log: Callable[[str], None] = print):
        super().__init__()
        self.allow_new_buckets = allow_new_buckets
        self.seconds: dict[BucketKey, Timing] = {}
        self.wall = 0.0
        self.log = log

    def lookup(self, key: BucketKey, job: Callable[[], Job] | None = None):
        """The executable of ``key``; a missing one is compiled from ``job()`` when
        ``allow_new_buckets`` is set.

        Raises:
          BucketError: ``key`` was not precompiled (the message lists what was).
        """
        if key in self:
            return self[key]
        if self.allow_new_buckets and job is not None:
            self.log(f"compiling a new bucket: {key}")
            precompile({key: job()}, into=self, progress=False)
            return self[key]
        have = sorted(str(k) for k in self if k.kind == key.kind)
        raise BucketError(f"no executable was precompiled for {key}; precompiled {key.kind} buckets: "
                          f"{have or 'none'} (precompile it, or allow new buckets explicitly)")

    def lengths(self, kind: str, match: Callable[[BucketKey], bool] = lambda k: True) -> tuple[int, ...]:
        """Sorted last-axis lengths of the ``kind`` keys that satisfy ``match``."""
        return tuple(sorted({k.shape[-1] for k in self if k.kind == kind and match(k)}))

    def total(self, stage: str | None = None) -> float:
        """Seconds over all executables: of one stage (``"lower"`` / ``"compile"``) or both."""
        return sum(t.lower + t.compile if stage is None else getattr(t, stage) for t in self.seconds.values())


def abstract(tree):
    """``tree`` with every array replaced by a ``jax.ShapeDtypeStruct`` of its shape, dtype
    and sharding (leaves that already are ShapeDtypeStructs, e.g. from ``nnx.eval_shape``,
    are kept). Other leaves (Python scalars) are left as they are."""

    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if hasattr(x, "shape") and hasattr(x, "dtype"):  # NumPy arrays
            return jax.ShapeDtypeStruct(x.shape, x.dtype)
        return x

    return jax.tree_util.tree_map(one, tree)


def is_abstract(tree) -> bool:
    """True when any leaf of ``tree`` is a ``jax.ShapeDtypeStruct`` (no data)."""
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(tree))


def default_workers(n_jobs: int) -> int:
    """Compiles `precompile` runs at once by default: ``min(n_jobs, os.cpu_count())`` (at least 1)."""
    return max(1, min(int(n_jobs), os.cpu_count() or 1))


def precompile(jobs: Mapping[BucketKey, Job], *, into: Executables | None = None,
               log: Callable[[str], None] | None = None, progress: bool = True,
               desc: str = "precompile", max_workers: int | None = None) -> Executables:
    """Lower and compile each job ahead of time: ``job.fn.lower(*job.args, **job.kwargs).compile()``,
    several compiles at once.

    Lowering (tracing to StableHLO: Python, holds the GIL, and reads the calling thread's
    context such as the active mesh) runs in the calling thread, job by job; each lowered
    job is then compiled in a worker thread (XLA releases the GIL while it compiles) while
    the next one lowers. The executables are the ones a serial run gives: the same
    lowered programs, compiled by the same XLA.

    Args:
      jobs: ``{key: Job}``; the arrays in a job's arguments are ``jax.ShapeDtypeStruct``s
        (no device memory is touched by the model's weights).
      into: add the executables to this collection (default: a new `Executables`).
      log: receives one line per executable (as it finishes) with its own wall time:
        seconds lowering it plus seconds compiling it, in its thread; then a line with
        the whole call's wall time and those seconds summed over jobs. Default
        ``into.log`` (print). Called from the calling thread only.
      progress: show a tqdm progress bar (counts finished compiles).
      desc: the progress bar's label.
      max_workers: compiles running at once (threads). None: `default_workers`
        (``min(len(jobs), os.cpu_count())``); 1: one after another in the calling thread.

    Returns:
      The `Executables` (``into`` if given), with ``seconds[key]`` (a `Timing`) filled and
      ``wall`` increased by this call's wall-clock seconds. Keys are added in ``jobs``'
      order, after every job has compiled.

    Raises:
      ValueError: ``max_workers`` < 1.
      Whatever lowering or compiling a job raises (the other compiles are awaited first).

    The persistent cache (`enable_compile_cache`) makes a second process's compile stage a
    disk read; tracing and lowering run every time.
    """
    from tqdm.auto import tqdm

    out = Executables() if into is None else into
    log = out.log if log is None else log
    items = list(jobs.items())
    workers = default_workers(len(items)) if max_workers is None else int(max_workers)
    if workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers!r}")
    bar = tqdm(total=len(items), desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    done: dict[BucketKey, tuple[Any, Timing]] = {}
    t_start = time.perf_counter()

    def lower(job: Job):
        t0 = time.perf_counter()
        lowered = job.fn.lower(*job.args, **dict(job.kwargs))
        return lowered, time.perf_counter() - t0

    def compile_(lowered):
        t0 = time.perf_counter()
        compiled = lowered.compile()
        return compiled, time.perf_counter() - t0

    def finish(key: BucketKey, t_lower: float, compiled_and_seconds) -> None:
        compiled, t_compile = compiled_and_seconds
        t = Timing(t_lower, t_compile)
        done[key] = (compiled, t)
        bar.update(1)
        log(f"compiled {key} in {t.lower + t.compile:.2f} s (lower {t.lower:.2f} s, compile {t.compile:.2f} s)")

    try:
        if workers == 1:
            for key, job in items:
                bar.set_postfix_str(str(key))
                lowered, t_lower = lower(job)
                finish(key, t_lower, compile_(lowered))
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="jaxqlora-compile") as pool:
                pending: dict[Future, tuple[BucketKey, float]] = {}
                try:
                    for key, job in items:
                        bar.set_postfix_str(str(key))
                        lowered, t_lower = lower(job)
                        pending[pool.submit(compile_, lowered)] = (key, t_lower)
                        for f in [f for f in pending if f.done()]:  # report what finished meanwhile
                            key_f, t_lower_f = pending.pop(f)
                            finish(key_f, t_lower_f, f.result())
                    for f in as_completed(list(pending)):
                        key_f, t_lower_f = pending.pop(f)
                        finish(key_f, t_lower_f, f.result())
                except BaseException:
                    for f in pending:
                        f.cancel()
                    raise
    finally:
        bar.close()
    for key, _ in items:  # the jobs' order, whatever order they finished in
        out[key], out.seconds[key] = done[key]
    wall = time.perf_counter() - t_start
    out.wall += wall
    if len(items) > 1:
        lower_s = sum(done[k][1].lower for k, _ in items)
        comp_s = sum(done[k][1].compile for k, _ in items)
        log(f"precompiled {len(items)} executables in {wall:.2f} s wall with {min(workers, len(items))} "
            f"worker(s) (summed over executables: lower {lower_s:.2f} s, compile {comp_s:.2f} s)")
    return out


def call_executable(executables: Executables | None, key: BucketKey, jobs: Callable[[], Mapping[BucketKey, Job]],
                    jitted: Callable, dynamic_args: tuple, static_kwargs: Mapping[str, Any], graphdef):
    """Run the precompiled executable of ``key`` on ``dynamic_args`` or, without executables,
    ``jitted(graphdef, *dynamic_args, **static_kwargs)`` (compiled on first use). ``jobs()``
    gives the job of a missing key when ``executables`` allow new buckets.

    Raises:
      BucketError: ``key`` is missing and new buckets are not allowed (`Executables.lookup`)."""
    if not executables:
        return jitted(graphdef, *dynamic_args, **static_kwargs)
    return executables.lookup(key, lambda: jobs()[key])(*dynamic_args)



# ------------------------------------------------------------- compile count


BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
"""The jax.monitoring event recorded once per XLA compilation request (persistent-cache
hits included)."""


class CompileCounter:
    """Counts XLA compilations while active (a context manager).

    Every backend compilation request records `BACKEND_COMPILE_EVENT` through
    ``jax.monitoring``, whether XLA compiles or the persistent cache answers; calls of a
    ``Compiled`` executable and jit cache hits record nothing.

    Attributes:
      names: the compiled functions' names, in order; ``count`` is their number.

    Example::

        with CompileCounter() as c:
            trainer.step(batch)
        assert c.count == 0, c.names
    """

    def __init__(self):
        self.names: list[str] = []

    def _listener(self, event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            self.names.append(str(kwargs.get("fun_name", "?")))

    @property
    def count(self) -> int:
        """Number of compilations seen."""
        return len(self.names)

    def __enter__(self) -> "CompileCounter":
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listener)


# ----------------------------------------------------------- persistent cache

_OFF = ("0", "false", "off", "no", "none")
_ours: str | None = None  # the folder enable_compile_cache set, if any


def default_cache_dir() -> Path:
    """The per-user cache folder: ``$XDG_CACHE_HOME/jaxqlora/xla`` or ``~/.cache/jaxqlora/xla``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxqlora" / "xla"


def enable_compile_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache in ``path`` (created if missing).

    Args:
      path: the cache folder. None: ``$JAXQLORA_COMPILE_CACHE`` if set (``0`` / ``off``
        leaves the cache off and returns None), else the folder JAX was already given by
        the user (``JAX_COMPILATION_CACHE_DIR``), else `default_cache_dir`.

    Returns:
      The cache folder in use, or None when off (also when the folder cannot be created:
      a warning says why).

    Every compilation is cached, however short (``jax_persistent_cache_min_compile_time_secs``
    0, ``jax_persistent_cache_min_entry_size_bytes`` -1), so small CPU programs benefit too.
    Safe to call again: changing the folder after compilations already ran re-initialises
    JAX's cache (``compilation_cache.reset_cache``). The cache is trusted code: keep it in
    a folder only you can write.
    """
    global _ours
    from jax.experimental.compilation_cache import compilation_cache as cc

    current = jax.config.jax_compilation_cache_dir
    if path is None:
        env = os.environ.get("JAXQLORA_COMPILE_CACHE", "").strip()
        if env.lower() in _OFF:
            return None
        if env:
            path = env
        elif current and current != _ours:  # the user pointed JAX somewhere: keep it
            return Path(current)
        else:
            path = default_cache_dir()
    path = Path(path).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.g. a read-only home: run without the cache rather than fail at import
        warnings.warn(f"jaxqlora: cannot create the compile cache folder {path} ({e}); the cache stays off")
        return None
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    if current != str(path):
        jax.config.update("jax_compilation_cache_dir", str(path))
        cc.reset_cache()  # takes effect even if something was compiled already
    _ours = str(path)
    return path


__all__ = ["BucketError", "BucketKey", "CompileCounter", "DEFAULT_BUCKETS", "Executables", "Job", "PROMPT_BUCKETS",
           "Timing",
           "abstract", "bucket_for", "buckets_up_to", "default_cache_dir",
           "default_workers", "enable_compile_cache", "is_abstract", "precompile"]

