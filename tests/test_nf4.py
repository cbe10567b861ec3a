"""jaxqlora.nf4 against bitsandbytes on CPU: bit-identical NF4 quantization,
double quantization, dequantization and the transformers 4-bit checkpoint keys.

Reference: bitsandbytes 0.50 (`functional.quantize_4bit`, `dequantize_4bit`,
`create_dynamic_map`, `QuantState.as_dict` / `from_dict`, `nn.Linear4bit`).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as F  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
from bitsandbytes.backends.default import ops as bnb_default_ops  # noqa: E402

from jaxqlora.errors import CheckpointError, MissingTensorError, TensorShapeError  # noqa: E402
from jaxqlora.nf4 import (  # noqa: E402
    NF4_CODE,
    NF4ArgumentError,
    NF4Weight,
    absmax_float32,
    create_dynamic_map,
    nf4_from_state_dict,
    nf4_to_state_dict,
)
from jaxqlora import dequantize_nf4, quantize_nf4  # noqa: E402  (exported at the top level)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
PREFIX = "model.layers.0.self_attn.q_proj"

# bnb's own torch implementation of dequantize_4bit (flat blocks, = the CUDA
# kernel), without the torch.compile wrapper.
_bnb_compute = bnb_default_ops._dequantize_4bit_compute
_bnb_ref_dequant = getattr(_bnb_compute, "__wrapped__", _bnb_compute)


@pytest.fixture(autouse=True, scope="module")
def _torch_setup():
    """One torch thread (torch's mean of > 32768 floats depends on the thread count)
    and no torch.compile (bnb's fallback kernels would compile C++ for minutes)."""
    import torch._dynamo

    threads = torch.get_num_threads()
    disabled = torch._dynamo.config.disable
    torch.set_num_threads(1)
    torch._dynamo.config.disable = True
    yield
    torch.set_num_threads(threads)
    torch._dynamo.config.disable = disabled


def _weight(shape, dtype: str, seed: int):
    """Fresh random weight (never zeros), heavy-tailed for odd seeds; returns (torch, numpy) with equal values."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32) * np.float32(rng.uniform(0.02, 3.0))
    if seed % 2:
        w = (w * np.abs(w)).astype(np.float32)  # outliers, as in real weights
    w[np.abs(w) < 1e-3] = np.float32(1e-3)  # nothing that rounds to 0 in float16
    tw = torch.from_numpy(w).to(TORCH_DTYPES[dtype])
    nw = tw.float().numpy().astype(NP_DTYPES[dtype])
    assert np.count_nonzero(tw.float().numpy()) == w.size
    return tw, nw


def _bnb_absmax_f32(st):
    if st.nested:
        return (F.dequantize_blockwise(st.absmax, st.state2) + st.offset).numpy()
    return st.absmax.numpy()


def _assert_same_as_bnb(q: NF4Weight, qt, st):
    """Every stored field of q equals bnb's quantize_4bit output, bit for bit."""
    assert np.array_equal(np.asarray(q.packed), qt.numpy().reshape(-1))
    assert qt.shape == ((q.numel + 1) // 2, 1)
    assert np.asarray(q.absmax).dtype == st.absmax.numpy().dtype
    assert np.array_equal(np.asarray(q.absmax), st.absmax.numpy())
    assert np.array_equal(np.asarray(q.code), st.code.numpy())
    assert q.shape == tuple(st.shape) and q.blocksize == st.blocksize
    assert q.dtype == str(st.dtype).removeprefix("torch.")
    assert q.double_quant == st.nested
    if st.nested:
        assert np.array_equal(np.asarray(q.nested_absmax), st.state2.absmax.numpy())
        assert np.array_equal(np.asarray(q.nested_code), st.state2.code.numpy())
        assert np.asarray(q.offset).dtype == np.float32 and np.asarray(q.offset).shape == ()
        assert np.asarray(q.offset).view(np.uint32) == st.offset.numpy().view(np.uint32)
        assert q.nested_blocksize == st.state2.blocksize == 256
    else:
        assert q.nested_absmax is None and q.nested_code is None and q.offset is None
    assert np.array_equal(np.asarray(absmax_float32(q)), _bnb_absmax_f32(st))


def _bytes(t) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _assert_dequant_same_as_bnb(q: NF4Weight, qt, st):
    ours = np.asarray(dequantize_nf4(q))
    assert ours.dtype == NP_DTYPES[q.dtype] and ours.shape == q.shape
    absmax = torch.from_numpy(_bnb_absmax_f32(st))
    nf4 = F.get_4bit_type("nf4", device="cpu")
    ref = _bnb_ref_dequant(qt.reshape(-1), absmax, nf4, st.blocksize, tuple(st.shape), st.dtype)
    assert ours.tobytes() == _bytes(ref)
    # bnb 0.50's native CPU kernel (AVX-512 path, in_features and blocksize
    # multiples of 16) indexes absmax per row, so it disagrees with its own
    # quantizer when in_features % blocksize != 0; compare with it elsewhere.
    k = q.shape[1]
    if k % q.blocksize == 0 or k % 16 != 0:
        native = F.dequantize_4bit(qt, st, quant_type="nf4")
        assert np.array_equal(ours.astype(np.float32), native.float().numpy())
        assert ours.tobytes() == _bytes(native)


# (shape, blocksize, dtype, double_quant); seed = position in the list.
CASES = [
    ((7, 33), 64, "float32", True),
    ((7, 33), 64, "bfloat16", False),
    ((64, 100), 64, "bfloat16", True),
    ((64, 100), 128, "float32", False),
    ((128, 576), 64, "float32", True),
    ((128, 576), 128, "bfloat16", True),
    ((3, 5), 64, "float32", True),
    ((3, 5), 32, "bfloat16", True),
    ((96, 80), 32, "float16", True),
    ((64, 100), 256, "float32", True),
    ((33, 1000), 256, "bfloat16", False),
    ((640, 520), 32, "float32", True),
    ((257, 64), 64, "float16", False),
    ((1, 1), 4096, "float32", True),
]


CASE_IDS = [f"{s[0]}x{s[1]}-bs{b}-{d}-{'dq' if q else 'nodq'}" for s, b, d, q in CASES]


@pytest.mark.parametrize("seed,case", list(enumerate(CASES)), ids=CASE_IDS)
def test_quantize_matches_bnb(seed, case):
    shape, bs, dtype, dq = case
    tw, nw = _weight(shape, dtype, 100 + seed)
    qt, st = F.quantize_4bit(tw, blocksize=bs, compress_statistics=dq, quant_type="nf4")
    q = quantize_nf4(nw, blocksize=bs, double_quant=dq)
    _assert_same_as_bnb(q, qt, st)
    _assert_dequant_same_as_bnb(q, qt, st)


def test_quantize_many_blocks_matches_bnb():
    """131072 blocks: the offset exercises every level of torch's cascade sum."""
    tw, nw = _weight((2048, 2048), "float32", 7)
    qt, st = F.quantize_4bit(tw, blocksize=32, compress_statistics=True, quant_type="nf4")
    q = quantize_nf4(nw, blocksize=32, double_quant=True)
    _assert_same_as_bnb(q, qt, st)


def test_quantize_under_jit_and_jax_inputs_match_bnb():
    tw, nw = _weight((48, 72), "bfloat16", 11)
    qt, st = F.quantize_4bit(tw, blocksize=64, compress_statistics=True, quant_type="nf4")
    jitted = jax.jit(quantize_nf4, static_argnames=("blocksize", "double_quant"))
    q = jitted(jnp.asarray(nw), blocksize=64, double_quant=True)
    _assert_same_as_bnb(q, qt, st)
    d = jax.jit(dequantize_nf4)(q)
    assert d.dtype == jnp.bfloat16
    assert np.array_equal(np.asarray(d).astype(np.float32), F.dequantize_4bit(qt, st, quant_type="nf4").float().numpy())


def test_ties_and_partial_block_match_bnb():
    """Values exactly on the midpoint of two codes (and one ulp either side), in a
    full block (scaled by 1/absmax) and in the partial last block (divided)."""
    mids = ((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)).astype(np.float32)
    up, down = np.nextafter(mids, np.float32(2)), np.nextafter(mids, np.float32(-2))
    vals = np.concatenate([mids, up, down, -mids, [np.float32(0.5)] * 3]).astype(np.float32)  # 63 values
    row = np.concatenate([[np.float32(1.0)], vals, [np.float32(-1.0)], vals[:40]]).astype(np.float32)  # 64 + 41
    for dq in (False, True):
        tw = torch.from_numpy(row.reshape(1, -1).copy())
        qt, st = F.quantize_4bit(tw, blocksize=64, compress_statistics=dq, quant_type="nf4")
        q = quantize_nf4(row.reshape(1, -1), blocksize=64, double_quant=dq)
        _assert_same_as_bnb(q, qt, st)
        _assert_dequant_same_as_bnb(q, qt, st)
    # the tie rule itself: a midpoint goes to the lower code
    nib = np.stack([np.asarray(q.packed) >> 4, np.asarray(q.packed) & 15], 1).reshape(-1)
    assert list(nib[1:16]) == list(range(15))


def test_zero_blocks_match_bnb():
    """A full zero block (absmax 0) and a zero partial last block (bnb stores 1e-38)."""
    tw, nw = _weight((3, 40), "float32", 5)
    nw = nw.copy()
    nw.reshape(-1)[32:64] = 0
    nw.reshape(-1)[96:] = 0
    tw = torch.from_numpy(nw.copy())
    for dq in (False, True):
        qt, st = F.quantize_4bit(tw, blocksize=32, compress_statistics=dq, quant_type="nf4")
        q = quantize_nf4(nw, blocksize=32, double_quant=dq)
        _assert_same_as_bnb(q, qt, st)
        _assert_dequant_same_as_bnb(q, qt, st)


def test_nf4_code_matches_bnb():
    assert NF4_CODE.dtype == np.float32
    assert np.array_equal(NF4_CODE, F.get_4bit_type("nf4", device="cpu").numpy())


@pytest.mark.parametrize("signed,max_exp", [(True, 7), (False, 7), (True, 4), (True, 1)])
def test_dynamic_map_matches_bnb(signed, max_exp):
    ours = create_dynamic_map(signed=signed, max_exponent_bits=max_exp)
    theirs = F.create_dynamic_map(signed=signed, max_exponent_bits=max_exp).numpy()
    assert ours.dtype == np.float32 and ours.shape == (256,)
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


def test_pytree_and_nbytes():
    tw, nw = _weight((40, 100), "float32", 21)
    qt, st = F.quantize_4bit(tw, blocksize=64, compress_statistics=True, quant_type="nf4")
    q = quantize_nf4(nw, blocksize=64, double_quant=True)
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 6
    q2 = jax.tree_util.tree_unflatten(treedef, [np.asarray(x) for x in leaves])
    assert (q2.shape, q2.blocksize, q2.nested_blocksize, q2.dtype) == ((40, 100), 64, 256, "float32")
    assert np.array_equal(np.asarray(dequantize_nf4(q2)), F.dequantize_4bit(qt, st, quant_type="nf4").numpy())
    tensors = (qt, st.absmax, st.code, st.state2.absmax, st.state2.code, st.offset)
    bnb_bytes = sum(t.numel() * t.element_size() for t in tensors)
    assert q.nbytes == bnb_bytes
    with pytest.raises(Exception):  # frozen
        q.blocksize = 32
    q_plain = quantize_nf4(nw, blocksize=64, double_quant=False)
    assert len(jax.tree_util.tree_leaves(q_plain)) == 3 and not q_plain.double_quant


def _bnb_linear_state_dict(qt, st, bs, dq, shape):
    lin = bnb.nn.Linear4bit(
        shape[1], shape[0], bias=False, compress_statistics=dq, quant_type="nf4", quant_storage=torch.uint8
    )
    lin.weight = bnb.nn.Params4bit(
        qt, requires_grad=False, quant_state=st, blocksize=bs, compress_statistics=dq, quant_type="nf4",
        bnb_quantized=True, module=lin,
    )
    return {k: v.detach() for k, v in lin.state_dict(prefix=PREFIX + ".").items()}


@pytest.mark.parametrize(
    "shape,bs,dtype,dq",
    [((7, 33), 64, "bfloat16", True), ((64, 100), 128, "float32", False), ((40, 300), 32, "float16", True)],
)
def test_state_dict_matches_bnb_linear4bit(shape, bs, dtype, dq):
    tw, nw = _weight(shape, dtype, 31 + bs)
    qt, st = F.quantize_4bit(tw, blocksize=bs, compress_statistics=dq, quant_type="nf4")
    q = quantize_nf4(nw, blocksize=bs, double_quant=dq)
    ours = nf4_to_state_dict(PREFIX, q)
    theirs = _bnb_linear_state_dict(qt, st, bs, dq, shape)
    assert list(ours) == list(theirs)
    as_dict = {f"{PREFIX}.weight.{k}": v for k, v in st.as_dict(packed=True).items()}
    assert set(ours) == set(as_dict) | {f"{PREFIX}.weight"}
    for key, t in theirs.items():
        a = ours[key]
        assert isinstance(a, np.ndarray)
        assert a.dtype == t.numpy().dtype, key
        assert a.shape == tuple(t.shape), key
        assert a.tobytes() == t.contiguous().numpy().tobytes(), key
    blob = json.loads(ours[f"{PREFIX}.weight.quant_state.bitsandbytes__nf4"].tobytes())
    assert blob["quant_type"] == "nf4" and blob["shape"] == list(shape) and blob["dtype"] == dtype
    assert ("nested_offset" in blob) == dq


@pytest.mark.parametrize("dq", [True, False])
def test_from_state_dict_of_bnb(dq):
    shape, bs = (24, 130), 64
    tw, nw = _weight(shape, "bfloat16", 41 + dq)
    qt, st = F.quantize_4bit(tw, blocksize=bs, compress_statistics=dq, quant_type="nf4")
    theirs = _bnb_linear_state_dict(qt, st, bs, dq, shape)
    tensors = {k: v.numpy() for k, v in theirs.items()}
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((3, 1), np.uint8)  # unrelated keys are ignored
    q = nf4_from_state_dict(PREFIX, tensors)
    _assert_same_as_bnb(q, qt, st)
    _assert_dequant_same_as_bnb(q, qt, st)


def test_bnb_loads_our_state_dict():
    """bnb's loader (Params4bit.from_prequantized, as transformers uses it) reads our keys."""
    shape, bs = (32, 96), 32
    tw, nw = _weight(shape, "bfloat16", 51)
    q = quantize_nf4(nw, blocksize=bs, double_quant=True)
    sd = nf4_to_state_dict(PREFIX, q)
    w = f"{PREFIX}.weight"
    stats = {k[len(w) + 1 :]: torch.from_numpy(v.copy()) for k, v in sd.items() if k != w}
    p = bnb.nn.Params4bit.from_prequantized(data=torch.from_numpy(sd[w].copy()), quantized_stats=stats, device="cpu")
    st = p.quant_state
    assert st.blocksize == bs and tuple(st.shape) == shape and st.dtype == torch.bfloat16 and st.quant_type == "nf4"
    assert st.offset.item() == float(np.asarray(q.offset))
    native = F.dequantize_4bit(p.data, st, quant_type="nf4")
    assert np.array_equal(np.asarray(dequantize_nf4(q)).astype(np.float32), native.float().numpy())
    # and it is what bnb itself would have produced from the weight
    qt, st_b = F.quantize_4bit(tw, blocksize=bs, compress_statistics=True, quant_type="nf4")
    assert torch.equal(p.data, qt) and torch.equal(st.absmax, st_b.absmax)


def test_state_dict_survives_safetensors(tmp_path):
    from safetensors.numpy import load_file, save_file

    tw, nw = _weight((17, 64), "float16", 61)
    qt, st = F.quantize_4bit(tw, blocksize=128, compress_statistics=True, quant_type="nf4")
    q = quantize_nf4(nw, blocksize=128, double_quant=True)
    save_file(nf4_to_state_dict(PREFIX, q), str(tmp_path / "m.safetensors"))
    q2 = nf4_from_state_dict(PREFIX, load_file(str(tmp_path / "m.safetensors")), source=str(tmp_path / "m.safetensors"))
    _assert_same_as_bnb(q2, qt, st)
    _assert_dequant_same_as_bnb(q2, qt, st)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("blocksize", [48, 16, 8192, 0, True, 64.0, "64"])
def test_bad_blocksize(blocksize):
    with pytest.raises(NF4ArgumentError) as e:
        quantize_nf4(np.ones((4, 64), np.float32), blocksize=blocksize)
    assert e.value.field == "blocksize" and isinstance(e.value, ValueError)
    assert "blocksize" in str(e.value)


@pytest.mark.parametrize(
    "w,field",
    [
        (np.ones(64, np.float32), "w"),
        (np.ones((2, 4, 64), np.float32), "w"),
        (np.ones((0, 64), np.float32), "w"),
        (np.ones((4, 64), np.int32), "w.dtype"),
        (np.array([[1.0, np.nan]], np.float32), "w"),
        (np.array([[1.0, np.inf]], np.float32), "w"),
        (np.array([[1.0, -np.inf]], ml_dtypes.bfloat16), "w"),
    ],
)
def test_bad_weight(w, field):
    with pytest.raises(NF4ArgumentError) as e:
        quantize_nf4(w)
    assert e.value.field == field and isinstance(e.value, ValueError)


def test_bad_double_quant_and_dequant_args():
    with pytest.raises(NF4ArgumentError) as e:
        quantize_nf4(np.ones((2, 64), np.float32), double_quant="yes")
    assert e.value.field == "double_quant"
    q = quantize_nf4(np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64))
    with pytest.raises(NF4ArgumentError) as e:
        dequantize_nf4(q, dtype="int8")
    assert e.value.field == "dtype"
    with pytest.raises(NF4ArgumentError) as e:
        dequantize_nf4(q.replace(absmax=q.absmax[:-1]))
    assert e.value.field == "absmax"
    with pytest.raises(NF4ArgumentError) as e:
        dequantize_nf4(q.replace(offset=None))
    assert e.value.field == "offset"


def _good_dict(dq=True):
    _, nw = _weight((8, 40), "float32", 71)
    return nf4_to_state_dict(PREFIX, quantize_nf4(nw, blocksize=64, double_quant=dq))


@pytest.mark.parametrize(
    "suffix", ["", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4"]
)
def test_missing_key(suffix):
    sd = _good_dict()
    key = f"{PREFIX}.weight{suffix}"
    del sd[key]
    with pytest.raises((MissingTensorError, CheckpointError)) as e:
        nf4_from_state_dict(PREFIX, sd, source="model.safetensors")
    assert isinstance(e.value, ValueError)
    assert key in str(e.value) and "model.safetensors" in str(e.value)
    if suffix in ("", ".absmax", ".quant_map", ".quant_state.bitsandbytes__nf4"):
        assert isinstance(e.value, MissingTensorError) and e.value.name == key


def _with_blob(sd, **changes):
    key = f"{PREFIX}.weight.quant_state.bitsandbytes__nf4"
    meta = json.loads(sd[key].tobytes())
    meta.update(changes)
    sd[key] = np.frombuffer(json.dumps(meta).encode(), np.uint8).copy()
    return sd


def test_malformed_keys():
    w = f"{PREFIX}.weight"
    sd = _good_dict()
    sd[w + ".absmax"] = sd[w + ".absmax"].astype(np.float32)
    with pytest.raises(TensorShapeError) as e:
        nf4_from_state_dict(PREFIX, sd)
    assert e.value.name == w + ".absmax"

    sd = _good_dict()
    sd[w] = sd[w][:-1]
    with pytest.raises(TensorShapeError) as e:
        nf4_from_state_dict(PREFIX, sd)
    assert e.value.name == w

    sd = _good_dict()
    sd[w + ".nested_quant_map"] = sd[w + ".nested_quant_map"][:128]
    with pytest.raises(TensorShapeError) as e:
        nf4_from_state_dict(PREFIX, sd)
    assert e.value.name == w + ".nested_quant_map"

    sd = _good_dict()
    sd[w + ".quant_state.bitsandbytes__nf4"] = np.frombuffer(b"{not json", np.uint8).copy()
    with pytest.raises(CheckpointError) as e:
        nf4_from_state_dict(PREFIX, sd)
    assert e.value.name == w + ".quant_state.bitsandbytes__nf4"

    changes = ({"blocksize": 48}, {"dtype": "int8"}, {"shape": [320]}, {"quant_type": "fp4"}, {"nested_blocksize": 128})
    for change in changes:
        with pytest.raises(CheckpointError) as e:
            nf4_from_state_dict(PREFIX, _with_blob(_good_dict(), **change))
        assert e.value.name == w + ".quant_state.bitsandbytes__nf4", change

    sd = _good_dict()
    sd[w + ".quant_state.bitsandbytes__fp4"] = sd.pop(w + ".quant_state.bitsandbytes__nf4")
    with pytest.raises(CheckpointError, match="fp4"):
        nf4_from_state_dict(PREFIX, sd)

    sd = _good_dict()
    sd[w + ".quant_map"] = sd[w + ".quant_map"][::-1].copy()
    with pytest.raises(CheckpointError) as e:
        nf4_from_state_dict(PREFIX, sd)
    assert e.value.name == w + ".quant_map"

    sd = _good_dict()
    sd[w + ".nested_absmax"] = -sd[w + ".nested_absmax"]
    with pytest.raises(CheckpointError) as e:
        nf4_from_state_dict(PREFIX, sd)
    assert e.value.name == w + ".nested_absmax"

    sd = _good_dict(dq=False)
    sd[w + ".nested_absmax"] = np.ones(1, np.float32)  # nested tensor, no nested metadata
    with pytest.raises(CheckpointError):
        nf4_from_state_dict(PREFIX, sd)
