"""The folder of compiled kernels (``$KILN_CACHE/native``), and why a library found in it can be loaded.

Loading a shared library runs its code inside kiln, constructors first: one planted by someone else could
change predictions, and a truncated one kills the process with SIGBUS when a missing page is touched. So:

- the folder must belong to this user and be writable by no one else (kiln creates it 0700); otherwise
  nothing in it is trusted, ``CacheRefused`` says why, and the PyTorch operators run;
- each library ``<name>`` has a record ``<name>.sha256`` of its SHA-256, written by the build beside it
  (as protected as the library: same folder, same checks). A library is loaded only where both are regular
  files of this user that no one else can write and the digest of the bytes read matches the record.
  Anything else (missing, empty, truncated, garbage, planted) is rebuilt;
- files are written under a temporary name, fsynced, renamed into place, and the folder fsynced: a crash
  leaves the old file or the new one, never part of one;
- the folder is opened once per library and every later step goes through that descriptor, and a library
  is loaded through the descriptor of the very file whose bytes were checked (``/proc/self/fd``): nothing
  can be swapped in between.

The check costs a read and a hash of each library once per process: 0.15 ms for the seed model's four here.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

RECORD = ".sha256"  # suffix of a library's digest record


class CacheRefused(Exception):
    """The cache folder is not private to this user, so nothing in it can be trusted."""


def load(folder: Path, name: str, build: Callable[[], bytes]) -> ctypes.CDLL:
    """Library ``name`` from the private ``folder``, checked against its record; where it is missing or fails the
    check, ``build()`` gives its bytes, which are installed with their record and loaded."""
    dir_fd = _open_private(folder)
    try:
        fd = _verified(dir_fd, name)
        if fd is None:
            fd = _install(dir_fd, name, build())
    finally:
        os.close(dir_fd)
    try:
        lib = ctypes.CDLL(f"/proc/self/fd/{fd}")
    except OSError:
        os.close(fd)
        raise
    # fd stays open for the life of the process: were its number reused for another library, the dynamic loader
    # would take the same /proc/self/fd name for this one, already loaded.
    return lib


def _open_private(folder: Path) -> int:
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    st = os.fstat(dir_fd)
    if st.st_uid == os.geteuid() and not st.st_mode & 0o022:
        return dir_fd
    os.close(dir_fd)
    if st.st_uid != os.geteuid():
        raise CacheRefused(f"the kernel cache {folder} belongs to another user: no library in it is loaded; "
                           "remove it or point KILN_CACHE elsewhere")
    raise CacheRefused(f"the kernel cache {folder} is writable by group or others ({stat.filemode(st.st_mode)}): "
                       f"no library in it is loaded; `chmod go-w {folder}` makes kiln rebuild and use it")


def _private_file(dir_fd: int, name: str) -> int | None:
    """A descriptor of ``name`` in the folder if it is a regular file of this user that no one else can write."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError:  # missing, or a symbolic link
        return None
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022:
        return fd
    os.close(fd)
    return None


def _sha256(fd: int) -> str:
    digest, offset = hashlib.sha256(), 0
    while chunk := os.pread(fd, 1 << 20, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def _verified(dir_fd: int, name: str) -> int | None:
    """A descriptor of library ``name`` if its bytes match its record; None otherwise."""
    lib = _private_file(dir_fd, name)
    if lib is None:
        return None
    record = _private_file(dir_fd, name + RECORD)
    if record is not None:
        recorded = os.pread(record, 65, 0)  # a SHA-256 in hex is 64 bytes: one more tells a longer record
        os.close(record)
        if recorded == _sha256(lib).encode():
            return lib
    os.close(lib)
    return None


def _install(dir_fd: int, name: str, data: bytes) -> int:
    """Write library ``name`` and then its record; a descriptor of the library written. A crash between the two
    leaves a library that fails its check, so it is rebuilt."""
    lib = _write(dir_fd, name, data)
    os.close(_write(dir_fd, name + RECORD, hashlib.sha256(data).hexdigest().encode()))
    os.fsync(dir_fd)  # the renames
    return lib


def _write(dir_fd: int, name: str, data: bytes) -> int:
    """``data`` as file ``name`` (0600), whole or not at all: written under a temporary name, fsynced, renamed."""
    tmp = f".{name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError:
        os.close(fd)
        os.unlink(tmp, dir_fd=dir_fd)
        raise
    return fd
