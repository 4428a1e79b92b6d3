"""Model registry: ``create_model(name)`` and ``list_models()``."""

from leukodetect.models import zoo as _zoo  # noqa: F401  (registers the architectures)
from leukodetect.models.registry import (
    create_model,
    get_spec,
    list_models,
    register_model,
)

__all__ = ["create_model", "get_spec", "list_models", "register_model"]
