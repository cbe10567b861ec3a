"""Tiny random transformers models for parity tests (imported by the test modules)."""

import torch
import transformers


def random_model(config_cls: str = "LlamaConfig", model_cls: str = "LlamaForCausalLM", *, seed: int = 0,
                 scale: float = 0.1, **config):
    """A float32 transformers model with every tensor drawn from ``scale * N(0, 1)``.

    transformers' own init leaves norms at 1 and biases at 0; random values everywhere make
    a parity test see every parameter. Defaults: 2 layers, rms_norm_eps 1e-5, untied.
    """
    kw = dict(num_hidden_layers=2, rms_norm_eps=1e-5, tie_word_embeddings=False)
    kw.update(config)
    cfg = getattr(transformers, config_cls)(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(scale * torch.randn(p.shape))
    return model.float().eval()


def save_random_model(tmp_path_factory, folder: str = "base", **kwargs):
    """``random_model(**kwargs)`` saved with ``save_pretrained`` into a fresh
    ``tmp_path_factory`` folder named after ``folder``; returns that folder."""
    path = tmp_path_factory.mktemp(folder)
    random_model(**kwargs).save_pretrained(path)
    return path


def save_word_tokenizer(folder, vocab_size: int) -> list[str]:
    """Save a word-level tokenizer (``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, then words ``w0``,
    ``w1``, ...) of ``vocab_size`` ids into ``folder``; returns the words."""
    from tokenizers import Tokenizer as Backend, models, pre_tokenizers

    from jaxqlora.tokenizer import Tokenizer

    words = [f"w{i}" for i in range(vocab_size - 3)]
    backend = Backend(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}},
                                       unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    Tokenizer(backend, bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(folder)
    return words
