"""The lab service: an HTTP API and a web page over one loaded model (``leukodetect serve``)."""

from .app import create_app
from .server import serve

__all__ = ["create_app", "serve"]
