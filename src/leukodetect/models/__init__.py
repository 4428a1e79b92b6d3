"""Model registry: ``create_model(name)`` and ``list_models()``."""

from . import zoo as _zoo  # noqa: F401  (registers the architectures)
from .registry import create_model, get_spec, list_models, register_model

__all__ = ["create_model", "get_spec", "list_models", "register_model"]
