"""Serving: the continuous-batching decode engine (`jaxqlora.serving.engine`) and the
OpenAI-compatible HTTP server on it (`jaxqlora.serving.server`, ``jaxqlora serve``)."""
