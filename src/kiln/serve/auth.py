"""The optional API key: read from an environment variable at start, sent as X-API-Key or a Bearer token."""

from __future__ import annotations

import hmac
import os

from starlette.requests import Request

from kiln.errors import KilnError
from kiln.serve.errors import ApiError


def api_key_from_env(name: str | None) -> str | None:
    """The key held in the environment variable ``name``; ``None`` when no key is asked for."""
    if not name:
        return None
    key = os.environ.get(name)
    if not key:
        raise KilnError(f"--api-key-env {name}: that environment variable is unset or empty")
    # Header values travel as latin-1 bytes and lose surrounding blanks: any other key could never be matched.
    if not (key.isascii() and key.isprintable() and key == key.strip()):
        raise KilnError(f"--api-key-env {name}: the key must be printable ASCII without leading or trailing "
                        "spaces (HTTP header values cannot carry anything else reliably)")
    return key


def check_key(request: Request, key: str | None) -> None:
    """Raises a 401 unless the request carries ``key`` (always passes when there is no key)."""
    if key is None:
        return
    given = request.headers.get("x-api-key") or ""
    auth = request.headers.get("authorization") or ""
    if not given and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if not hmac.compare_digest(given.encode("utf-8", "replace"), key.encode()):
        raise ApiError(401, "unauthorized", "missing or wrong API key (send it as X-API-Key or "
                                            "Authorization: Bearer)", headers={"WWW-Authenticate": "Bearer"})
