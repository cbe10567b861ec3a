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
