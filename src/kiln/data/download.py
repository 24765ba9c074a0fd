"""Download one file from a list of mirrors, resuming partial downloads, and keep it only if it verifies.

Every data source shares the guarantee this gives: the destination file is either absent or complete
and verified. Bytes arrive in ``<dest>.part`` (a fixed name, so a later run can resume it) and reach
``dest`` with one ``os.replace`` only after ``verify`` accepts them.
"""

from __future__ import annotations

import http.client
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from kiln.errors import DataError

CHUNK_BYTES = 1 << 20  # read/write granularity while streaming a response: 1 MiB
USER_AGENT = "kiln-data-download"

# What one mirror can fail with: network and HTTP errors (URLError is an OSError), a malformed or
# unsupported URL (ValueError), a short or broken HTTP response, or content that fails `verify`.
_MIRROR_ERRORS = (DataError, OSError, http.client.HTTPException, ValueError)


def download_verified(
    urls: Sequence[str],
    dest: Path,
    *,
    verify: Callable[[Path], None],
    timeout: float = 30,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Fetch ``dest`` from the first of ``urls`` that serves content ``verify`` accepts; return ``dest``.

    ``verify(path)`` raises DataError when the content is wrong. ``timeout`` is in seconds, per socket
    operation (connect, each read), not for the whole file. A ``.part`` left by an earlier attempt is
    resumed with an HTTP Range request. Content that fails verification is deleted and the next URL
    tried; a network failure keeps the ``.part`` so the next URL (or a later run) resumes it.
    Raises DataError listing every URL and why it failed when none succeeds.
    """
    dest = Path(dest)
    if not urls:
        raise DataError(f"no download URLs given for {dest.name}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    say = progress or (lambda message: None)
    failures = []
    for url in urls:
        try:
            _fetch_and_verify(url, part, verify, timeout, say)
        except _MIRROR_ERRORS as error:
            failures.append(f"{url}: {_reason(error)}")
            say(f"{url} failed: {_reason(error)}")
            continue
        os.replace(part, dest)
        return dest
    raise DataError(
        f"could not download {dest.name}: every mirror failed:\n  "
        + "\n  ".join(failures)
        + f"\nCheck the network, or put a correct copy of the file at {dest} by hand."
    )


def _fetch_and_verify(
    url: str, part: Path, verify: Callable[[Path], None], timeout: float, say: Callable[[str], None]
) -> None:
    """Download ``url`` into ``part`` and verify it; delete ``part`` when verification fails.

    A resumed ``.part`` may hold bytes from another mirror or an older file (mirrors compress the
    same content differently), so when resumed content fails verification this mirror is tried
    once more from byte 0 before it is given up. The loop ends: after the delete, the next fetch
    starts from byte 0 and is not a resume.
    """
    while True:
        resumed = _fetch(url, part, timeout, say)
        try:
            verify(part)
            return
        except DataError:
            part.unlink(missing_ok=True)
            if not resumed:
                raise
        say(f"resumed download of {url} failed verification; starting it again from byte 0")


def _fetch(url: str, part: Path, timeout: float, say: Callable[[str], None]) -> bool:
    """Stream ``url`` into ``part``, appending if the server continues it; return whether it resumed."""
    offset = part.stat().st_size if part.exists() else 0  # bytes
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code != 416 or not offset:
            raise
        # 416 Range Not Satisfiable: the part is already as long as the file. It may be complete
        # (a run stopped before the rename); report a resume so verification decides.
        return True
    with response:
        resumed = offset > 0 and _continues_at(response, offset)
        if offset and not resumed:
            say(f"{url} ignored the range request; downloading it from byte 0")
        say(f"downloading {url}" + (f" from byte {offset}" if resumed else ""))
        with open(part, "ab" if resumed else "wb") as out:
            shutil.copyfileobj(response, out, CHUNK_BYTES)
            out.flush()
            os.fsync(out.fileno())  # so the later rename can never expose unwritten bytes
            size = out.tell()  # bytes
    say(f"downloaded {url} ({size / 1e6:.1f} MB)")
    return resumed


def _continues_at(response: http.client.HTTPResponse, offset: int) -> bool:
    """Whether the server sent partial content starting exactly at byte ``offset``."""
    content_range = response.headers.get("Content-Range", "")
    return response.status == 206 and content_range.startswith(f"bytes {offset}-")


def _reason(error: BaseException) -> str:
    """A one-line reason for a failed mirror, as a user would want to read it."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    if isinstance(error, DataError):
        return str(error)
    return f"{type(error).__name__}: {error}"
