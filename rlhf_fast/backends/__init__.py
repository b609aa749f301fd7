"""Backend selection: ``use_backend``, ``explain`` and the provider registry."""

from .registry import BACKENDS, BackendUnavailable, default_backend, explain, use_backend

__all__ = ["BACKENDS", "BackendUnavailable", "default_backend", "explain", "use_backend"]
