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
