"""Serving: the continuous-batching engine over a paged latent cache, and the OpenAI-compatible HTTP server."""

from kimi_jax.serve.engine import Completion, Engine, EngineConfig, Event, QueueFull, Request, RequestError

__all__ = ["Completion", "Engine", "EngineConfig", "Event", "QueueFull", "Request", "RequestError"]
