"""``kiln serve``: a trained run as an HTTP microservice (FastAPI + uvicorn).

Needs the ``serve`` extra (``pip install 'kiln[serve]'``). Everything is read from the run directory:
the model, its inputs (image shape, table columns, text limits) and outputs, and the request schema
published at ``/openapi.json``.
"""

from __future__ import annotations

from kiln.errors import KilnError

try:
    import fastapi  # noqa: F401
    import prometheus_client  # noqa: F401  (/metrics)
    import python_multipart  # noqa: F401  (image uploads)
    import uvicorn  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised by a test that hides the modules
    raise KilnError(f"serving needs the serve extra ({e.name} is not installed): pip install 'kiln[serve]'") from None

from kiln.serve.app import create_app, serve  # noqa: E402
from kiln.serve.settings import ServeSettings  # noqa: E402

__all__ = ["ServeSettings", "create_app", "serve"]
