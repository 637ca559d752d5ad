"""The HTTP service: ``create_app(...)`` for ASGI servers and tests, ``serve(settings)`` to run it.

``lipsync serve`` calls ``serve(settings)``; ``python -m lipsync.server`` does the same with the
settings from the environment.
"""

from __future__ import annotations

from .app import create_app
from .runner import serve

__all__ = ["create_app", "serve"]
