"""Several devices and hosts: data-parallel and FSDP QLoRA training with ``jax.sharding``.

JAX does the communication; this module only says where every array lives.

- The mesh has two axes, ``data`` and ``fsdp`` (either may be 1): `make_mesh`,
  `parse_mesh` (``"data=2,fsdp=4"``), `check_mesh` for a user's own mesh.
- The batch ``[accum, B, ...]`` is split along B over both axes (`batch_sharding`,
  `shard_batch`): each device computes ``B / (data * fsdp)`` rows of every micro-batch.
- Trainable parameters (LoRA, head), optimizer state and the dropout RNG are replicated;
  XLA all-reduces the gradients.
- Frozen weights (`frozen_shardings`) are sharded over ``fsdp``: an NF4 weight's packed
  codes and absmax in whole rows of ``W [N, K]`` (a shard boundary never splits a
  4-bit block; the nested absmax is sharded when its groups of 256 blocks stay whole,
  else replicated), bf16 matrices (embeddings, LM head, un-quantized linears) along
  their first axis divisible by ``fsdp``; vectors and code tables are replicated. The
  stacked decoder layers' leading layer axis is never sharded (each scan step slices one
  layer; a sharded layer axis would gather every layer at once): their arrays follow the
  same rules one axis further in.
  Tensors that do not divide are replicated and the reason is logged
  (``logging.getLogger("jaxqlora.sharding")``).
- In a layer, `per_device` runs the NF4 kernel on each device's rows inside
  ``jax.shard_map`` with the weight whole: XLA all-gathers each layer's weight when the
  layer needs it. With ``fsdp > 1`` the backward pass gathers again instead of keeping
  every layer's full weight alive. `rowwise` does the same for the per-row kernels with
  nothing to gather (RMSNorm, SwiGLU, cuDNN attention): XLA cannot split a Pallas call,
  and left to itself gathers the activations and runs the whole batch on every device.
- Several hosts: `initialize_distributed` (``jax.distributed.initialize``), each process
  passes its own rows (`local_rows`, `shard_batch` builds the global array with
  ``jax.make_array_from_process_local_data``), and only process 0 writes (`is_primary`).

Sources: JAX documentation, "Distributed arrays and automatic parallelization",
"Introduction to multi-controller JAX", "Manual parallelism with shard_map"; FSDP:
Zhao et al. 2023, "PyTorch FSDP" (arXiv:2304.11277); FSDP with QLoRA: Answer.AI's
fsdp_qlora (2024), which shards the packed 4-bit storage the same way.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxqlora.errors import ShardingError
from jaxqlora.stacked import is_stacked_key
from jaxqlora.nf4 import NF4Weight

DATA, FSDP = "data", "fsdp"
#: The mesh axes that split the batch (all of them: data parallel and FSDP both split it).
BATCH_AXES = (DATA, FSDP)

_log = logging.getLogger(__name__)


# ------------------------------------------------------------------------ the mesh


def parse_mesh(spec: str) -> dict[str, int]:
    """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4}`` (the ``--mesh`` flag).

    Either axis may be left out (``"fsdp=8"``): `make_mesh` fills ``data`` from the
    device count and takes ``fsdp`` as 1.

    Raises:
      ShardingError: an unknown axis name, a repeated axis, or a size that is not a
        positive integer.
    """
    out: dict[str, int] = {}
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in BATCH_AXES:
            raise ShardingError(f"--mesh {spec!r}: expected 'data=N,fsdp=M', got the item {part!r}")
        if name in out:
            raise ShardingError(f"--mesh {spec!r}: axis {name!r} given twice")
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1:
            raise ShardingError(f"--mesh {spec!r}: {name} must be a positive integer, got {value.strip()!r}")
        out[name] = size
    if not out:
        raise ShardingError(f"--mesh {spec!r}: expected 'data=N,fsdp=M'")
    return out


def make_mesh(data: int | None = None, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: every device of every process).

    Devices keep ``jax.devices()`` order (process by process), so each process owns a
    contiguous block of batch rows.

    Args:
      data: size of the ``data`` axis; None = ``len(devices) // fsdp``.
      fsdp: size of the ``fsdp`` axis (frozen weights are sharded over it).
      devices: the devices, default ``jax.devices()``.

    Raises:
      ShardingError: ``data * fsdp != len(devices)``, or a size < 1.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp < 1 or (data is not None and data < 1):
        raise ShardingError(f"mesh sizes must be >= 1, got data={data}, fsdp={fsdp}")
    if data is None:
        if n % fsdp:
            raise ShardingError(f"fsdp={fsdp} does not divide the {n} devices")
        data = n // fsdp
    if data * fsdp != n:
        raise ShardingError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but {n} devices are "
                            f"visible ({devices[0].platform}); the mesh must use all of them")
    return Mesh(np.array(devices, dtype=object).reshape(data, fsdp), BATCH_AXES)


def check_mesh(mesh: Mesh) -> Mesh:
    """Return ``mesh`` if it has the axes ``data`` and ``fsdp`` (others must have size 1).

    Raises:
      ShardingError: an axis is missing, or another axis is larger than 1.
    """
    if not isinstance(mesh, (Mesh, jax.sharding.AbstractMesh)):
        raise ShardingError(f"expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    missing = [a for a in BATCH_AXES if a not in mesh.axis_names]
    extra = {a: s for a, s in mesh.shape.items() if a not in BATCH_AXES and s > 1}
    if missing or extra:
        raise ShardingError(f"the mesh {dict(mesh.shape)} needs axes 'data' and 'fsdp' "
                            f"(missing {missing}; other axes must have size 1, got {extra})")
    return mesh


def batch_parallel(mesh: Mesh) -> int:
    """How many devices split the batch: ``data * fsdp``."""
    return int(mesh.shape[DATA]) * int(mesh.shape[FSDP])


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raise `ShardingError` unless ``batch_size`` (rows of a micro-batch, all processes
    together) divides evenly over ``data * fsdp`` devices."""
    n = batch_parallel(mesh)
    if batch_size % n:
        raise ShardingError(f"batch size {batch_size} is not divisible by data x fsdp = {n} devices "
                            f"(mesh {dict(mesh.shape)})")


def use_mesh(mesh: Mesh | None):
    """Context in which traced layers see ``mesh`` (``jax.set_mesh``); a no-op for None."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


# --------------------------------------------------------------------- shardings


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that keeps a whole copy on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, axis: int = 1) -> NamedSharding:
    """Rows split over ``data`` and ``fsdp`` along ``axis`` (1 for ``[accum, B, ...]``
    training batches, 0 for ``[B, ...]`` inputs); other axes whole."""
    return NamedSharding(mesh, P(*([None] * axis), BATCH_AXES))


def _array_sharding(name: str, x: Any, mesh: Mesh, notes: list[str], lead: int = 0) -> NamedSharding:
    f = int(mesh.shape[FSDP])
    if f == 1 or np.ndim(x) - lead < 2:
        return replicated(mesh)
    for axis, size in enumerate(x.shape):
        if axis >= lead and size % f == 0:
            return NamedSharding(mesh, P(*([None] * axis), FSDP))
    notes.append(f"{name} {tuple(x.shape)}: no axis divisible by fsdp={f}; replicated")
    return replicated(mesh)


def _nf4_shardings(name: str, q: NF4Weight, mesh: Mesh, notes: list[str], lead: int = 0) -> NF4Weight:
    f = int(mesh.shape[FSDP])
    rep = replicated(mesh)
    n, k = q.shape
    whole = rep
    if f > 1:
        if n % f == 0 and ((n // f) * k) % q.blocksize == 0:
            whole = NamedSharding(mesh, P(*([None] * lead), FSDP))
        else:
            notes.append(f"{name} NF4 {q.shape}: {n} rows do not split into {f} shards of whole "
                         f"{q.blocksize}-element blocks; replicated")
    nested = None
    if q.nested_absmax is not None:
        nested = whole if whole is not rep and (q.num_blocks // f) % q.nested_blocksize == 0 else rep
    return q.replace(packed=whole, absmax=whole, nested_absmax=nested,
                     nested_code=None if q.nested_code is None else rep,
                     offset=None if q.offset is None else rep, code=rep,
                     kernel_scale=None if q.kernel_scale is None else rep,
                     kernel_codes=None if q.kernel_codes is None else rep)


def _path_name(path) -> str:
    """Dotted module path of a pytree key path (``model.layers.mlp.up_proj.weight``)."""
    parts = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
    return ".".join(str(p) for p in parts if p != "value")


def frozen_shardings(state: Any, mesh: Mesh) -> tuple[Any, list[str]]:
    """FSDP shardings for a frozen state (an ``nnx.State`` or any pytree with `NF4Weight`s).

    Returns:
      ``(shardings, notes)``: a pytree of ``NamedSharding`` of ``state``'s structure, and
      one line per tensor that had to be replicated although ``fsdp > 1`` (also logged).
    """
    check_mesh(mesh)
    notes: list[str] = []
    shardings = _shardings(state, mesh, notes)
    for line in notes:
        _log.info("%s", line)
    return shardings, notes


def _shardings(state, mesh, notes):
    def rule(path, x):
        name = jax.tree_util.keystr(path)
        lead = 1 if is_stacked_key(_path_name(path)) else 0  # the layer axis stays whole
        if isinstance(x, NF4Weight):
            return _nf4_shardings(name, x, mesh, notes, lead)
        return _array_sharding(name, x, mesh, notes, lead)

    return jax.tree_util.tree_map_with_path(rule, state, is_leaf=lambda x: isinstance(x, NF4Weight))


def place(tree: Any, shardings: Any) -> Any:
    """``jax.device_put(tree, shardings)`` (one sharding, or a pytree of them shaped like
    ``tree``). With several processes, local arrays become global ones: every process
    must then hold the same value (as after loading the same checkpoint). An abstract tree
    (``jax.ShapeDtypeStruct`` leaves, e.g. from ``nnx.eval_shape``) gets the shardings as
    attributes and allocates nothing, so that steps can be compiled for the mesh before the
    weights exist."""
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(tree)):
        def spec(x, s):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) if hasattr(x, "dtype") else x

        if isinstance(shardings, jax.sharding.Sharding):
            return jax.tree_util.tree_map(lambda x: spec(x, shardings), tree)
        return jax.tree_util.tree_map(spec, tree, shardings)
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(x, s):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, s)
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x), s), impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree_util.tree_map(lambda x: put(x, shardings), tree)
    return jax.tree_util.tree_map(put, tree, shardings)


def shard_model(model: nnx.Module, mesh: Mesh, trainable: Any = nnx.LoRAParam) -> list[str]:
    """Move ``model``'s state onto ``mesh``, in place: ``trainable`` variables and
    ``nnx.RngState`` replicated, every other variable by `frozen_shardings`.

    Args:
      model: an ``nnx.Module`` (e.g. a `jaxqlora.model.CausalLM` after quantization and LoRA).
      mesh: a ``(data, fsdp)`` mesh.
      trainable: nnx filter of the trained variables (`jaxqlora.train.TRAINABLE` in the Trainer).

    Returns:
      The notes of `frozen_shardings` (tensors replicated although ``fsdp > 1``).
    """
    _, train, rng, frozen = nnx.split(model, trainable, nnx.RngState, ...)
    shardings, notes = frozen_shardings(frozen, mesh)
    rep = replicated(mesh)
    nnx.update(model, place(train, rep), place(rng, rep), place(frozen, shardings))
    return notes


def bytes_per_device(tree: Any) -> dict[str, int]:
    """Bytes each local device holds of ``tree``'s arrays (its addressable shards),
    keyed by ``str(device)``. PRNG key arrays count their key data. Abstract leaves
    (``jax.ShapeDtypeStruct`` with a sharding, see `place`) count the shard they will have."""
    out: dict[str, int] = {}
    for x in jax.tree_util.tree_leaves(tree):
        if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None:
            shape = x.sharding.shard_shape(x.shape)
            size = 8 if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else np.dtype(x.dtype).itemsize
            for device, _ in x.sharding.addressable_devices_indices_map(x.shape).items():
                out[str(device)] = out.get(str(device), 0) + int(np.prod(shape)) * size
            continue
        if not isinstance(x, jax.Array):
            continue
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        for shard in x.addressable_shards:
            out[str(shard.device)] = out.get(str(shard.device), 0) + shard.data.nbytes
    return out


# ------------------------------------------------------------------------- batches


def local_rows(batch: dict[str, np.ndarray], mesh: Mesh, axis: int = 1) -> dict[str, np.ndarray]:
    """This process's rows of a global host batch (the whole batch with one process).

    Every process may iterate the same global batches (same seed) and keep its rows;
    `shard_batch` puts them back together as one global array.

    Raises:
      ShardingError: the batch's row count is not divisible by ``data * fsdp``.
    """
    if jax.process_count() == 1:
        return batch
    first = next(iter(batch.values()))
    rows = first.shape[axis]
    check_batch_size(rows, mesh)
    sharding = batch_sharding(mesh, axis)
    spans = {(s.start or 0, rows if s.stop is None else s.stop)
             for s in (idx[axis] for idx in sharding.addressable_devices_indices_map(first.shape).values())}
    start, stop = min(a for a, _ in spans), max(b for _, b in spans)
    if sum(b - a for a, b in spans) != stop - start:
        raise ShardingError(f"this process's devices hold rows {sorted(spans)}, not one contiguous block: "
                            "order the mesh devices process by process (make_mesh does)")
    return {k: np.take(np.asarray(v), np.arange(start, stop), axis=axis) for k, v in batch.items()}


def shard_batch(batch: dict[str, Any], mesh: Mesh, axis: int = 1) -> dict[str, jax.Array]:
    """Global arrays split by `batch_sharding` from each process's own rows.

    Args:
      batch: arrays ``[accum, rows, ...]`` (``axis=1``) holding this process's rows (with
        one process: the whole batch). Arrays already placed by `batch_sharding` pass.
      mesh: the mesh.

    Raises:
      ShardingError: the global row count is not divisible by ``data * fsdp``.
    """
    sharding = batch_sharding(mesh, axis)
    out = {}
    for key, v in batch.items():
        if isinstance(v, jax.Array) and v.sharding == sharding:
            out[key] = v
            continue
        rows = v.shape[axis] * jax.process_count()
        check_batch_size(rows, mesh)
        if jax.process_count() == 1:
            out[key] = jax.device_put(v, sharding)
        else:
            shape = list(v.shape)
            shape[axis] = rows
            out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(v), tuple(shape))
    return out


def input_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Where `global_input` puts an array of ``shape``: rows (axis 0) split over the batch
    axes when they divide, else replicated."""
    n = batch_parallel(mesh)
    return batch_sharding(mesh, 0) if len(shape) and shape[0] % n == 0 else replicated(mesh)


def global_input(x: Any, mesh: Mesh) -> jax.Array:
    """A global array from a host value that every process holds whole (e.g. an evaluation
    batch ``[B, ...]``): rows split over the devices when B divides, else replicated."""
    x = np.asarray(x)
    sharding = input_sharding(mesh, x.shape)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


# --------------------------------------------------------------- inside the layer


def per_device(fn: Callable, x: jax.Array, *operands: Any) -> jax.Array:
    """``fn(x, *operands)`` on each device's rows of ``x`` with the operands whole.

    Without an active mesh (`use_mesh`) this is ``fn(x, *operands)``. With one, ``fn``
    runs inside ``jax.shard_map`` on the rows of ``x [B, ...]`` that each device holds
    (a Pallas kernel, a custom call, is never partitioned by XLA itself; when B does not
    divide over the batch axes, every device runs the whole ``x``). Operands laid out by
    `frozen_shardings` (FSDP-sharded NF4 weights) are all-gathered inside, right before
    ``fn``, once this layer's ``x`` exists (an optimization barrier, so that XLA cannot
    gather every layer's weight at the start of the step); the backward pass keeps the
    shards only and gathers again once the cotangent exists, so no layer's whole weight
    has to stay alive from the forward to the backward pass (peak memory per device:
    ``benchmarks/scaling.py``).

    Args:
      fn: ``fn(x_rows, *operands) -> y_rows``, rows along axis 0 of ``x`` and ``y``;
        differentiable in ``x`` (the operands are frozen: zero cotangents).
      x: ``[B, ...]`` activations.
      operands: pytrees passed whole (`NF4Weight`s, arrays).

    Returns:
      ``fn``'s result ``[B, ...]``.
    """
    mesh = _active_mesh()
    if mesh is None:
        return fn(x, *operands)
    return _per_device(fn, mesh, x, *operands)


def rowwise(fn: Callable, rows: Sequence[jax.Array], whole: Sequence[Any] = ()) -> Any:
    """``fn(*rows, *whole)`` on each device's rows, for per-row ops with no weights to gather.

    A Pallas kernel (RMSNorm, SwiGLU) or cuDNN call inside a sharded ``jax.jit`` is a custom
    call that XLA's partitioner cannot split: without this wrapper it all-gathers the
    activations and every device runs the whole batch. Here ``fn`` runs inside
    ``jax.shard_map`` on each device's rows of every array in ``rows`` (all ``[B, ...]``
    with the same B) with ``whole`` (small replicated operands: norm weights) passed
    whole; every output is ``[B, ...]`` split the same way. Differentiable through
    ``shard_map``'s own transpose (cotangents of ``whole`` are summed over devices).
    Without an active mesh (`use_mesh`) this is ``fn(*rows, *whole)``; when B does not
    divide over the batch axes every device runs all rows.

    Args:
      fn: ``fn(*rows, *whole) -> array or tuple of arrays``, each ``[B, ...]``.
      rows: activations split along axis 0.
      whole: operands every device needs whole.
    """
    mesh = _active_mesh()
    if mesh is None:
        return fn(*rows, *whole)
    spec = _row_spec(mesh, *rows)
    return jax.shard_map(lambda r, w: fn(*r, *w), mesh=mesh, in_specs=(spec, P()), out_specs=spec,
                         check_vma=False)(tuple(rows), tuple(whole))


def sharding_active() -> bool:
    """True inside `use_mesh` with a ``(data, fsdp)`` mesh (layers then run per device)."""
    return _active_mesh() is not None


def _active_mesh():
    """The mesh of `use_mesh` if it has the batch axes, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or any(a not in mesh.axis_names for a in BATCH_AXES) else mesh


def _row_spec(mesh, *arrays) -> P:
    """Rows split over the batch axes when every array's axis 0 divides over them, else whole."""
    n = batch_parallel(mesh)
    return P(BATCH_AXES) if all(a.ndim and a.shape[0] % n == 0 for a in arrays) else P()


def _specs(mesh, ops):
    shardings = _shardings(ops, mesh, [])
    return jax.tree_util.tree_map(lambda s: s.spec, shardings, is_leaf=lambda s: isinstance(s, NamedSharding))


def _run_local(fn, mesh, x, ops, cotangent=None):
    """shard_map of ``fn`` (or of its vjp when ``cotangent`` is given) with the operands'
    FSDP shards gathered inside, after a barrier on this call's activations."""
    rows = _row_spec(mesh, x)
    op_specs = _specs(mesh, ops)

    def gather(a, spec):
        for axis, name in enumerate(spec):
            if name == FSDP:
                return jax.lax.all_gather(a, FSDP, axis=axis, tiled=True)
        return a

    def local(x, ops, *ct):
        x, ops, ct = jax.lax.optimization_barrier((x, ops, ct))
        ops = jax.tree_util.tree_map(gather, ops, op_specs)
        if not ct:
            return fn(x, *ops)
        _, vjp = jax.vjp(lambda x: fn(x, *ops), x)
        return vjp(ct[0])[0]

    extra = () if cotangent is None else (cotangent,)
    return jax.shard_map(local, mesh=mesh, in_specs=(rows, op_specs) + (rows,) * len(extra), out_specs=rows,
                         check_vma=False)(x, ops, *extra)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _per_device(fn, mesh, x, *ops):
    return _run_local(fn, mesh, x, ops)


def _per_device_fwd(fn, mesh, x, *ops):
    return _run_local(fn, mesh, x, ops), (x, ops)


def _zero_cotangent(a):
    if jax.dtypes.issubdtype(a.dtype, np.inexact):
        return jax.numpy.zeros(a.shape, a.dtype)
    return np.zeros(a.shape, jax.dtypes.float0)


def _per_device_bwd(fn, mesh, res, dy):
    x, ops = res
    return (_run_local(fn, mesh, x, ops, cotangent=dy), *jax.tree_util.tree_map(_zero_cotangent, ops))


_per_device.defvjp(_per_device_fwd, _per_device_bwd)


# ----------------------------------------------------------------- several hosts


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """``jax.distributed.initialize`` once per process, before any other JAX call.

    Each argument left None comes from the environment: ``JAX_COORDINATOR_ADDRESS``
    (``host:port`` of process 0), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``; if those are
    unset too, JAX detects the cluster itself (SLURM, Open MPI, Kubernetes, Cloud TPU).
    On CPU the processes talk through gloo (``jax_cpu_collectives_implementation``).

    Raises:
      ShardingError: a process count or id in the environment that is not an integer.
    """
    if jax.distributed.is_initialized():
        return

    def env_int(name):
        value = os.environ.get(name)
        if value in (None, ""):
            return None
        try:
            return int(value)
        except ValueError:
            raise ShardingError(f"${name} must be an integer, got {value!r}") from None

    num_processes = env_int("JAX_NUM_PROCESSES") if num_processes is None else num_processes
    process_id = env_int("JAX_PROCESS_ID") if process_id is None else process_id
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def is_primary() -> bool:
    """True in process 0, the one that writes logs, metrics, results and adapters."""
    return jax.process_index() == 0
