"""The lab service: an HTTP API and a web page over one loaded model (``leukodetect serve``)."""

from leukodetect.serving.app import create_app
from leukodetect.serving.server import serve

__all__ = ["create_app", "serve"]
