"""Shared fixtures: the embedded SmolLM2-135M-Instruct, loaded once per test session, by
transformers (the independent reference) and by us. Tests keep JAX's persistent
compilation cache in a temporary folder, never in the user's cache."""

import os
import shutil
import tempfile

# Before jaxqlora is imported (it turns the cache on at import): a throw-away cache folder.
_CACHE = None
if "JAXQLORA_COMPILE_CACHE" not in os.environ:
    _CACHE = os.environ["JAXQLORA_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="jaxqlora-test-xla-")

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    if _CACHE:
        shutil.rmtree(_CACHE, ignore_errors=True)


# ``pytest -n 2 --dist loadfile`` (the CI command) sends whole files to the two workers in
# xdist's default order: files with MORE TESTS first, so the slow files with few tests
# (the notebooks, the subprocess runs) came last and one worker idled at the end. This
# scheduler hands out the heaviest files first (longest-processing-time-first), by the
# seconds each file took on the 2-core CI machine (measured with ``--durations=0``, setup
# included, summed per file; rounded). Files not listed follow in xdist's own order. The
# numbers only order the work: a stale entry costs balance, never a test.
FILE_SECONDS = {
    "test_notebooks.py": 490, "test_train.py": 220, "test_gguf_quant.py": 215, "test_speculative.py": 205,
    "test_serve_e2e.py": 190, "test_sharding.py": 185, "test_compile.py": 165, "test_embedded_model.py": 140,
    "test_kill.py": 120, "test_scan.py": 120, "test_kernels_in_model.py": 75, "test_nf4_matmul.py": 57,
    "test_engine.py": 50, "test_packing.py": 47, "test_model_parity.py": 43, "test_nf4_mgpu.py": 33,
    "test_nf4.py": 33, "test_quantize.py": 29, "test_multi_lora.py": 25, "test_cli.py": 24, "test_rms_norm.py": 24,
    "test_nf4_mgpu_gemm.py": 23, "test_gguf_mgpu.py": 23,
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class HeaviestFileFirst(LoadFileScheduling):
        _ordered = False

        def _assign_work_unit(self, node):
            if not self._ordered:  # the work queue is complete at the first assignment
                units = sorted(self.workqueue.items(),
                               key=lambda unit: -FILE_SECONDS.get(os.path.basename(unit[0]), 0))
                self.workqueue.clear()
                self.workqueue.update(units)
                self._ordered = True
            super()._assign_work_unit(node)

    return HeaviestFileFirst(config, log)

# Parity tests compare float32 numerics with PyTorch on CPU; on a GPU, XLA's default
# precision would run float32 matmuls in TF32.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def embedded_path():
    from jaxqlora.io.embedded import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def hf_embedded(embedded_path):
    """transformers' float32 model and tokenizer from the embedded GGUF (about 20 s)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(embedded_path.parent), gguf_file=embedded_path.name, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(embedded_path.parent), gguf_file=embedded_path.name)
    return model, tokenizer


@pytest.fixture(scope="session")
def ours_f32(embedded_path):
    import jax.numpy as jnp

    from jaxqlora.io import load_pretrained

    return load_pretrained(embedded_path, dtype=jnp.float32)
