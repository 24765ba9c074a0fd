"""Small C kernels, compiled here with the system's C compiler, for the parts of a training step that
PyTorch runs as many small, memory-bound operators.

- ``convpool``: the fused conv2d + max-pool front end of the seed model (a 3x3 convolution of a grey
  image, then a 2x2 max-pool). Written with PyTorch operators, the full-resolution convolution output
  (B, 26, 26, 32) is written, read by the pool, and zero-filled and scattered into again for the
  backward pass. This kernel computes, per pooling window, the convolution at each of the window's
  positions in registers and keeps only the maximum and which position gave it (first position on
  ties, as ``max_pool2d`` does). The backward pass then needs only that position's input value for the
  weight gradient. Neither pass materialises the full-resolution map.
- ``attention``, ``lstm`` and ``addnorm``: see ``kiln.nn.native_attention``, ``kiln.nn.native_lstm`` and
  ``kiln.nn.native_norm``.

The C sources are package data in ``kiln/nn/kernels/`` (each ``<kind>.c`` includes the shared vector math of
``vecmath.h``). Each is compiled once per machine and shape into the kiln cache (``-O3 -march=native``: the
machine that compiles is the one that runs it; the shape is a compile-time constant, so loops unroll),
checked there before each load (``kiln.nn.native_cache``) and loaded with ctypes, which releases Python's
lock during a call. Where there is no C compiler, or compiling or loading fails, the loaders return ``None``
with the reason (also given as a warning) and callers keep the PyTorch path.

The C code reads raw memory: a kernel applies only to plain float32 CPU tensors (``eligible``), and every
call checks each buffer's dtype, device and layout first (``Kernel``), so that a bf16 tensor from autocast,
say, is refused rather than read as float32.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import torch

from kiln.hardware import cpu_flags
from kiln.nn import native_cache

# -fno-math-errno: math functions need not set errno, so that loops calling expf can be vectorised.
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-std=gnu11", "-fopenmp", "-fno-math-errno"]
_loaded: dict[tuple, tuple[SimpleNamespace | None, str]] = {}


def eligible(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """Whether a kernel may run on input ``x`` and parameters ``params``: plain float32 CPU tensors, outside tracing
    and compiling (which must record PyTorch operators) and outside CPU autocast (which turns the results of
    the PyTorch operators around a kernel, its inputs, into bf16)."""
    if type(x) is not torch.Tensor or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (x, *params))


_BUFFERS = {"f32": torch.float32, "u8": torch.uint8}  # the kinds of pointer argument in a signature


class Kernel:
    """One C function of a compiled kernel, called with tensors where it takes pointers. ``signature`` names its
    arguments in order: ``f32`` and ``u8`` buffers, ``int`` values. Each buffer is checked right before the
    call (about 0.4 us per buffer here): one of another dtype, device or layout would be read as garbage, or
    beyond its end."""

    def __init__(self, fn, name: str, signature: str) -> None:
        self.fn, self.name = fn, name
        self.dtypes = [None if arg == "int" else _BUFFERS[arg] for arg in signature.split()]  # None: an int
        fn.argtypes = [ctypes.c_void_p if dtype else ctypes.c_int for dtype in self.dtypes]
        fn.restype = None

    def __call__(self, *values) -> None:
        args = []
        for i, (dtype, value) in enumerate(zip(self.dtypes, values, strict=True)):
            if dtype is None:
                args.append(value)
            elif value.dtype == dtype and value.is_cpu and value.is_contiguous():
                args.append(value.data_ptr())
            else:
                layout = "contiguous" if value.is_contiguous() else "non-contiguous"
                raise TypeError(f"kiln's native {self.name}: argument {i} is a {layout} {value.dtype} tensor on "
                                f"{value.device}; the kernel reads contiguous {dtype} CPU memory")
        self.fn(*args)


def cache_dir() -> Path:
    return Path(os.environ.get("KILN_CACHE") or Path.home() / ".cache" / "kiln") / "native"


HEADER = "vecmath.h"  # the vector math that every kernel source includes


def sources(kind: str) -> dict[str, str]:
    """The files to compile for one kind of kernel, by name: its C source (as ``kernel.c``) and the header."""
    kernels = resources.files("kiln.nn") / "kernels"
    return {"kernel.c": (kernels / f"{kind}.c").read_text(), HEADER: (kernels / HEADER).read_text()}


def _compile(files: dict[str, str], defines: list[str]) -> bytes:
    """The shared library built from ``files``, as bytes; compiled in a private temporary folder."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    with tempfile.TemporaryDirectory(prefix="kiln-native-") as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text)
        # Relative names: the temporary folder's name stays out of the library, so one source gives one file.
        done = subprocess.run([compiler, *FLAGS, *defines, "kernel.c", "-o", "kernel.so"], cwd=tmp,
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[:300]}")
        return (Path(tmp) / "kernel.so").read_bytes()


def build(kind: str, defines: dict[str, int | float],
          functions: dict[str, str]) -> tuple[SimpleNamespace | None, str]:
    """(library, how) for one kind of kernel (``kernels/<kind>.c``) and shape, built once per machine and loaded
    once per process. ``functions`` maps each exported function to its ``Kernel`` signature; the library has
    them as attributes. It is None when it cannot be built here, and ``how`` says why."""
    spec = (kind, tuple(sorted(defines.items())))
    if spec not in _loaded:
        _loaded[spec] = _build(kind, [f"-D{k}={v}" for k, v in defines.items()], functions)
    return _loaded[spec]


def _build(kind: str, defines: list[str], functions: dict[str, str]) -> tuple[SimpleNamespace | None, str]:
    if os.environ.get("KILN_NATIVE", "1") == "0":
        return None, "native kernels turned off (KILN_NATIVE=0)"
    files = sources(kind)
    # -march=native code is for this CPU only: its flags are part of the name, as are the sources and the shape.
    key = "".join(files.values()) + " ".join(FLAGS + defines) + " ".join(sorted(cpu_flags())) + platform.machine()
    name = f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    try:
        lib = native_cache.load(cache_dir(), name, lambda: _compile(files, defines))
        kernels = {fn: Kernel(getattr(lib, fn), fn, signature) for fn, signature in functions.items()}
    except Exception as e:  # whatever goes wrong with a kernel, the PyTorch path runs
        how = f"native kernel unavailable ({e})"
        # Kernels are built at first use, inside a training step or a prediction: a warning is how the reason
        # reaches the user.
        warnings.warn(f"kiln: {kind} {how}; the PyTorch operators run instead", RuntimeWarning)
        return None, how
    return SimpleNamespace(**kernels), f"native C kernel ({name})"


MAX_FILTERS = 256  # the kernel keeps a position's sums on the stack


def load(channels: int, kh: int, kw: int, filters: int, pool: int) -> tuple[SimpleNamespace | None, str]:
    """(library, how) of the convpool kernel for one layer shape."""
    if filters > MAX_FILTERS or pool > 16:
        return None, f"no native kernel for {filters} filters and {pool}x{pool} pooling"
    return build("convpool", {"NC": channels, "KH": kh, "KW": kw, "NF": filters, "NP": pool},
                 {"convpool_forward": "f32 f32 f32 f32 u8 int int int int int",
                  "convpool_backward": "f32 f32 u8 f32 f32 f32 int int int int int"})
