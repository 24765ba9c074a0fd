"""MNIST loading, IDX validation, and verified download from mirrors (a loopback server; no internet)."""

import gzip
import hashlib
import shutil
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.data.mnist import MNIST_FILES, load_mnist, read_idx, resolve_mnist_dir
from kiln.errors import DataError

TRAIN_LABELS = MNIST_FILES["train_labels"][0]
TRAIN_LABELS_SHA = MNIST_FILES["train_labels"][1]
ALL_NAMES = [name for name, _ in MNIST_FILES.values()]


# ---------------------------------------------------------------- helpers


def _idx(dims: tuple[int, ...], payload: bytes, magic: int | None = None) -> bytes:
    """An IDX file of unsigned bytes; ``magic`` overrides the correct magic number."""
    magic = (0x08 << 8) | len(dims) if magic is None else magic
    return struct.pack(f">I{len(dims)}I", magic, *dims) + payload


def _copy_mnist(src: Path, dest: Path, skip: tuple[str, ...] = ()) -> Path:
    """Copy the four MNIST files (less ``skip``) into ``dest``; copies, so tests may overwrite them."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ALL_NAMES:
        if name not in skip:
            shutil.copyfile(src / name, dest / name)
    return dest


def _train_labels_gz(mnist_root: Path, first_label: int) -> bytes:
    """Valid gzip of the train labels with the first label changed: parses, but fails the checksum."""
    content = bytearray(gzip.decompress((mnist_root / TRAIN_LABELS).read_bytes()))
    content[8] = first_label  # byte 8: first label, after the 8-byte IDX header
    return gzip.compress(bytes(content), mtime=0)


def _closed_port_url() -> str:
    """A loopback URL where nothing listens: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@dataclass
class Mirror:
    """A loopback HTTP server's state: what it serves and every GET it received."""

    url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)  # URL path -> body
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    honour_range: bool = True


def _handler(mirror: Mirror) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            range_header = self.headers.get("Range")
            mirror.requests.append((self.path, range_header))
            body = mirror.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            start = 0  # kiln only sends open-ended ranges: "bytes=N-"
            if range_header and mirror.honour_range:
                start = int(range_header.removeprefix("bytes=").removesuffix("-"))
            if start and start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            self.wfile.write(body[start:])

        def log_message(self, *args) -> None:
            """Silence the per-request log lines."""

    return Handler


@pytest.fixture(scope="module")
def mnist_gz(mnist_root: Path) -> dict[str, bytes]:
    return {name: (mnist_root / name).read_bytes() for name in ALL_NAMES}


@pytest.fixture
def mirror(monkeypatch, mnist_root: Path, mnist_gz: dict[str, bytes]):
    """A loopback server with the real files under /good/ and corrupted train labels under /bad/.

    KILN_DATA is unset so resolution reaches the cache (each test passes cache_dir=tmp_path), and
    proxies are bypassed so requests stay on this machine.
    """
    monkeypatch.delenv("KILN_DATA", raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    state = Mirror(files={f"/good/{name}": body for name, body in mnist_gz.items()})
    state.files[f"/bad/{TRAIN_LABELS}"] = _train_labels_gz(mnist_root, first_label=3)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    # A short poll interval (seconds) keeps shutdown, and so each test's teardown, quick.
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_port}"
    yield state
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="module")
def mnist(mnist_root: Path):
    return load_mnist(mnist_root)


# ---------------------------------------------------------------- loading the real files


def test_load_gives_shapes_dtypes_labels_and_checksums(mnist):
    assert mnist.train_images.shape == (60000, 28, 28)
    assert mnist.test_images.shape == (10000, 28, 28)
    assert mnist.train_images.dtype == mnist.test_images.dtype == torch.uint8
    assert mnist.train_labels.shape == (60000,) and mnist.test_labels.shape == (10000,)
    assert mnist.train_labels.dtype == mnist.test_labels.dtype == torch.int64
    for labels in (mnist.train_labels, mnist.test_labels):
        assert torch.equal(labels.unique(), torch.arange(10))
    assert mnist.train_labels[:5].tolist() == [5, 0, 4, 1, 9]  # the well-known first digits
    assert int(mnist.train_images.max()) == 255
    assert mnist.checksums == {name: sha for name, sha in MNIST_FILES.values()}


def test_kiln_data_may_hold_a_mnist_subfolder_and_an_explicit_root_wins(
    mnist_root, tmp_path, monkeypatch
):
    data = tmp_path / "data"
    (data / "mnist").mkdir(parents=True)
    for name in ALL_NAMES:
        (data / "mnist" / name).symlink_to(mnist_root / name)
    monkeypatch.setenv("KILN_DATA", str(data))
    assert resolve_mnist_dir(None, download=False, cache_dir=tmp_path) == data / "mnist"
    monkeypatch.setenv("KILN_DATA", str(tmp_path / "nowhere"))
    assert resolve_mnist_dir(data, download=False, cache_dir=tmp_path) == data / "mnist"


def test_root_missing_a_file_says_which_where_and_how_to_fix(mnist_root, tmp_path):
    root = _copy_mnist(mnist_root, tmp_path / "mnist", skip=("t10k-labels-idx1-ubyte.gz",))
    with pytest.raises(DataError) as error:
        load_mnist(tmp_path)
    message = str(error.value)
    assert "t10k-labels-idx1-ubyte.gz" in message and str(root) in message
    assert "train-images-idx3-ubyte.gz" not in message.split("Fix")[0]
    assert "KILN_DATA" in message and "data.root" in message


def test_empty_cache_without_download_says_so(tmp_path, monkeypatch):
    monkeypatch.delenv("KILN_DATA", raising=False)
    with pytest.raises(DataError, match="download") as error:
        resolve_mnist_dir(None, download=False, cache_dir=tmp_path)
    assert str(tmp_path / "mnist") in str(error.value) and TRAIN_LABELS in str(error.value)


# ---------------------------------------------------------------- IDX validation


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_reads_raw_and_gzip_into_a_writable_array(tmp_path, suffix):
    payload = bytes(range(24))
    content = _idx((2, 3, 4), payload)
    path = tmp_path / f"images-idx3-ubyte{suffix}"
    path.write_bytes(gzip.compress(content) if suffix else content)
    array = read_idx(path, expected_ndim=3)
    assert array.dtype == np.uint8 and array.shape == (2, 3, 4)
    assert array.tobytes() == payload and array.flags.writeable


GOOD_3D = _idx((2, 3, 4), bytes(24))

BAD_FILES = {
    "bad magic": ("x-idx3-ubyte", _idx((2, 3, 4), bytes(24), magic=0x0802), 3,
                  ["magic number is 0x00000802", "expected 0x00000803"]),
    "labels read as images": ("x-idx1-ubyte", _idx((5,), bytes(5)), 3, ["magic number"]),
    "truncated header": ("x-idx3-ubyte", GOOD_3D[:7], 3, ["truncated", "16 bytes", "found 7"]),
    "truncated data": ("x-idx3-ubyte", GOOD_3D[:-14], 3, ["truncated", "need 24 bytes", "found 10"]),
    "trailing data": ("x-idx3-ubyte", GOOD_3D + bytes(6), 3, ["longer", "need 24", "found 30"]),
    "not gzip": ("x-idx3-ubyte.gz", b"this is not gzip", 3, ["not a valid gzip"]),
    "cut gzip": ("x-idx3-ubyte.gz", gzip.compress(GOOD_3D)[:20], 3, ["not a valid gzip"]),
}


@pytest.mark.parametrize("name, content, ndim, fragments", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_idx_files_raise_data_error_naming_the_file(tmp_path, name, content, ndim, fragments):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        read_idx(path, expected_ndim=ndim)
    assert str(path) in str(error.value)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_missing_idx_file_raises_data_error_naming_it(tmp_path):
    with pytest.raises(DataError, match="cannot read") as error:
        read_idx(tmp_path / "absent-idx1-ubyte.gz", expected_ndim=1)
    assert str(tmp_path / "absent-idx1-ubyte.gz") in str(error.value)


# ---------------------------------------------------------------- checksums and consistency


def test_wrong_checksum_names_the_file_and_both_hashes(mnist_root, tmp_path):
    corrupted = _train_labels_gz(mnist_root, first_label=3)
    _copy_mnist(mnist_root, tmp_path)
    (tmp_path / TRAIN_LABELS).write_bytes(corrupted)
    with pytest.raises(DataError) as error:
        load_mnist(tmp_path)
    actual = hashlib.sha256(gzip.decompress(corrupted)).hexdigest()
    message = str(error.value)
    assert str(tmp_path / TRAIN_LABELS) in message
    assert TRAIN_LABELS_SHA in message and actual in message


def test_verify_false_loads_a_changed_file_and_reports_its_real_checksum(mnist_root, tmp_path):
    corrupted = _train_labels_gz(mnist_root, first_label=3)
    _copy_mnist(mnist_root, tmp_path)
    (tmp_path / TRAIN_LABELS).write_bytes(corrupted)
    data = load_mnist(tmp_path, verify=False)
    assert data.train_labels[0] == 3
    assert data.checksums[TRAIN_LABELS] == hashlib.sha256(gzip.decompress(corrupted)).hexdigest()


def test_unverified_files_that_do_not_fit_together_are_refused(mnist_root, tmp_path):
    _copy_mnist(mnist_root, tmp_path)
    (tmp_path / TRAIN_LABELS).write_bytes(_train_labels_gz(mnist_root, first_label=10))
    with pytest.raises(DataError, match="label 10 is outside 0..9"):
        load_mnist(tmp_path, verify=False)
    shutil.copyfile(mnist_root / TRAIN_LABELS, tmp_path / TRAIN_LABELS)
    shutil.copyfile(mnist_root / TRAIN_LABELS, tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match="10000 images but 60000 labels"):
        load_mnist(tmp_path, verify=False)


# ---------------------------------------------------------------- download from mirrors


def test_download_falls_back_past_dead_and_404_mirrors(mirror, tmp_path):
    mirrors = (_closed_port_url(), f"{mirror.url}/missing/", f"{mirror.url}/good/")
    messages = []
    data = load_mnist(None, mirrors=mirrors, cache_dir=tmp_path, progress=messages.append)
    assert data.train_images.shape == (60000, 28, 28)
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(ALL_NAMES)  # no .part
    for name in ALL_NAMES:
        assert (f"/missing/{name}", None) in mirror.requests
        assert (f"/good/{name}", None) in mirror.requests
    assert any("refused" in message.lower() for message in messages)


def test_mirror_serving_corrupt_content_is_refused_and_next_one_used(mirror, mnist_root, tmp_path):
    cache = _copy_mnist(mnist_root, tmp_path / "mnist", skip=(TRAIN_LABELS,))
    resolve_mnist_dir(None, mirrors=(f"{mirror.url}/bad/", f"{mirror.url}/good/"), cache_dir=tmp_path)
    assert mirror.requests == [(f"/bad/{TRAIN_LABELS}", None), (f"/good/{TRAIN_LABELS}", None)]
    assert (cache / TRAIN_LABELS).read_bytes() == (mnist_root / TRAIN_LABELS).read_bytes()
    assert not (cache / f"{TRAIN_LABELS}.part").exists()


def test_all_mirrors_failing_raises_with_each_url_and_reason(mirror, mnist_root, tmp_path):
    cache = _copy_mnist(mnist_root, tmp_path / "mnist", skip=(TRAIN_LABELS,))
    dead = _closed_port_url()
    mirrors = (f"{mirror.url}/bad/", f"{mirror.url}/missing/", dead)
    with pytest.raises(DataError) as error:
        resolve_mnist_dir(None, mirrors=mirrors, cache_dir=tmp_path)
    message = str(error.value)
    assert f"{mirror.url}/bad/{TRAIN_LABELS}: decompressed content has sha256" in message
    assert f"{mirror.url}/missing/{TRAIN_LABELS}: HTTP 404" in message
    assert f"{dead}{TRAIN_LABELS}: " in message and "refused" in message.lower()
    assert not (cache / TRAIN_LABELS).exists()
    assert not (cache / f"{TRAIN_LABELS}.part").exists()


@pytest.mark.parametrize("honour_range", [True, False], ids=["206 partial", "200 whole file"])
def test_partial_download_is_resumed_with_a_range_request(
    mirror, mnist_root, tmp_path, honour_range
):
    mirror.honour_range = honour_range
    good = (mnist_root / TRAIN_LABELS).read_bytes()
    cache = _copy_mnist(mnist_root, tmp_path / "mnist", skip=(TRAIN_LABELS,))
    half = len(good) // 2
    (cache / f"{TRAIN_LABELS}.part").write_bytes(good[:half])
    resolve_mnist_dir(None, mirrors=(f"{mirror.url}/good/",), cache_dir=tmp_path)
    assert mirror.requests == [(f"/good/{TRAIN_LABELS}", f"bytes={half}-")]
    assert (cache / TRAIN_LABELS).read_bytes() == good  # whole, not the half appended twice
    assert not (cache / f"{TRAIN_LABELS}.part").exists()


def test_resumed_part_from_another_mirror_is_refetched_from_the_start(mirror, mnist_root, tmp_path):
    good = (mnist_root / TRAIN_LABELS).read_bytes()
    other_archive = gzip.compress(gzip.decompress(good), compresslevel=1, mtime=0)
    cache = _copy_mnist(mnist_root, tmp_path / "mnist", skip=(TRAIN_LABELS,))
    (cache / f"{TRAIN_LABELS}.part").write_bytes(other_archive[:1000])
    resolve_mnist_dir(None, mirrors=(f"{mirror.url}/good/",), cache_dir=tmp_path)
    assert mirror.requests == [(f"/good/{TRAIN_LABELS}", "bytes=1000-"), (f"/good/{TRAIN_LABELS}", None)]
    assert (cache / TRAIN_LABELS).read_bytes() == good


def test_complete_part_is_kept_when_the_server_has_nothing_more(mirror, mnist_root, tmp_path):
    good = (mnist_root / TRAIN_LABELS).read_bytes()
    cache = _copy_mnist(mnist_root, tmp_path / "mnist", skip=(TRAIN_LABELS,))
    (cache / f"{TRAIN_LABELS}.part").write_bytes(good)
    resolve_mnist_dir(None, mirrors=(f"{mirror.url}/good/",), cache_dir=tmp_path)
    assert mirror.requests == [(f"/good/{TRAIN_LABELS}", f"bytes={len(good)}-")]  # answered 416
    assert (cache / TRAIN_LABELS).read_bytes() == good


def test_corrupted_cached_file_is_refused_without_touching_the_network(mirror, mnist_root, tmp_path):
    cache = _copy_mnist(mnist_root, tmp_path / "mnist")
    corrupted = _train_labels_gz(mnist_root, first_label=3)
    (cache / TRAIN_LABELS).write_bytes(corrupted)
    with pytest.raises(DataError, match="fails its checksum") as error:
        load_mnist(None, mirrors=(f"{mirror.url}/good/",), cache_dir=tmp_path)
    assert str(cache / TRAIN_LABELS) in str(error.value)
    assert mirror.requests == []
    assert (cache / TRAIN_LABELS).read_bytes() == corrupted
