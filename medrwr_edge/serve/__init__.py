"""`medrwr-edge serve`: a local HTTP service (FastAPI + uvicorn) in front of one loaded Session.

Needs the `serve` extra (`pip install -e ".[serve]"`): nothing here is imported by the rest of the runtime.
"""

from __future__ import annotations


def create_app(session_factory, config=None):
    from .app import create_app as _create_app

    return _create_app(session_factory, config)


from .config import ServeConfig  # noqa: E402  (no FastAPI import: safe without the extra)

__all__ = ["ServeConfig", "create_app"]
