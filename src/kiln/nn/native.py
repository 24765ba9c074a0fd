"""A small C kernel for the fused conv2d + max-pool front end, compiled here with the system's C compiler.

The front end of the seed model (a 3x3 convolution of a grey image, then a 2x2 max-pool) is the
largest part of a training step when written with PyTorch operators: the full-resolution convolution
output (B, 26, 26, 32) is written, read by the pool, and zero-filled and scattered into again for the
backward pass, all memory-bound. This kernel computes, per pooling window, the convolution at each of
the window's positions in registers and keeps only the maximum and which position gave it (first
position on ties, as ``max_pool2d`` does). The backward pass then needs only that position's input
patch for the weight gradient. Neither pass materialises the full-resolution map.

The source is compiled once per machine into the kiln cache (``-O3 -march=native``: the machine that
compiles is the one that runs it) and loaded with ctypes, which releases Python's lock during a call.
Where there is no C compiler, or compiling fails, ``load()`` returns ``None`` with the reason and
callers keep the PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from kiln.hardware import cpu_flags

SOURCE = r"""
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Compiled once per layer shape: NC input channels, KH x KW kernel, NF filters, NP x NP pooling (-D flags),
   so that the compiler unrolls the patch and keeps a position's NF sums in vector registers. */
#define K (NC * KH * KW)

/* x: (B, NC, H, W) float32; w: (K, NF), rows in (c, ky, kx) order; bias: (NF).
   out: (B, PH, PW, NF) = max over each NP x NP window of the stride-1 valid convolution; arg: the window
   position (dy * NP + dx) of that maximum, the first one on ties (NaN wins, as in max_pool2d).
   Images are split over `threads` OpenMP threads; each output is computed by one thread alone. */
void convpool_forward(const float *restrict x, const float *restrict w, const float *restrict bias,
                      float *restrict out, unsigned char *restrict arg, int B, int H, int W, int threads) {
    const int PH = (H - KH + 1) / NP, PW = (W - KW + 1) / NP;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < B; b++)
        for (int i = 0; i < PH; i++)
            for (int j = 0; j < PW; j++) {
                float best[NF];
                unsigned char pos[NF];
                for (int q = 0; q < NP * NP; q++) {
                    const int y = i * NP + q / NP, xx = j * NP + q % NP;
                    float patch[K], acc[NF];
                    int k = 0;
                    for (int c = 0; c < NC; c++)
                        for (int ky = 0; ky < KH; ky++)
                            for (int kx = 0; kx < KW; kx++)
                                patch[k++] = x[(((long)b * NC + c) * H + y + ky) * W + xx + kx];
                    for (int f = 0; f < NF; f++) acc[f] = bias[f];
                    for (k = 0; k < K; k++)
                        for (int f = 0; f < NF; f++) acc[f] += patch[k] * w[k * NF + f];
                    for (int f = 0; f < NF; f++) {  /* branch-free, so that it vectorises */
                        const float v = acc[f], m = best[f];
                        const int better = (q == 0) | (v > m) | ((v != v) & (m == m));
                        best[f] = better ? v : m;
                        pos[f] = better ? (unsigned char)q : pos[f];
                    }
                }
                const long o = (((long)b * PH + i) * PW + j) * NF;
                memcpy(out + o, best, sizeof(best));
                memcpy(arg + o, pos, sizeof(pos));
            }
}

/* g: (B, PH, PW, NF) gradient of out. dw: (K, NF) and db: (NF) are overwritten. Each thread sums a fixed
   range of images in its own buffer and the buffers are added in thread order: one thread count, one result. */
void convpool_backward(const float *restrict x, const float *restrict g, const unsigned char *restrict arg,
                       float *restrict dw, float *restrict db, int B, int H, int W, int threads) {
    const int PH = (H - KH + 1) / NP, PW = (W - KW + 1) / NP;
    float part[threads][(K + 1) * NF];
    memset(part, 0, sizeof(part));
    #pragma omp parallel num_threads(threads)
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        float dwt[K * NF], dbt[NF];
        memset(dwt, 0, sizeof(dwt));
        memset(dbt, 0, sizeof(dbt));
        const int lo = (int)((long)B * t / nt), hi = (int)((long)B * (t + 1) / nt);
        for (int b = lo; b < hi; b++)
            for (int i = 0; i < PH; i++)
                for (int j = 0; j < PW; j++) {
                    const long o = (((long)b * PH + i) * PW + j) * NF;
                    for (int f = 0; f < NF; f++) dbt[f] += g[o + f];
                    for (int q = 0; q < NP * NP; q++) {
                        const int y = i * NP + q / NP, xx = j * NP + q % NP;
                        float patch[K], gq[NF];
                        for (int f = 0; f < NF; f++) gq[f] = arg[o + f] == q ? g[o + f] : 0.0f;
                        int k = 0;
                        for (int c = 0; c < NC; c++)
                            for (int ky = 0; ky < KH; ky++)
                                for (int kx = 0; kx < KW; kx++)
                                    patch[k++] = x[(((long)b * NC + c) * H + y + ky) * W + xx + kx];
                        for (k = 0; k < K; k++)
                            for (int f = 0; f < NF; f++) dwt[k * NF + f] += patch[k] * gq[f];
                    }
                }
        memcpy(part[t], dwt, sizeof(dwt));
        memcpy(part[t] + K * NF, dbt, sizeof(dbt));
    }
    memset(dw, 0, sizeof(float) * K * NF);
    memset(db, 0, sizeof(float) * NF);
    for (int t = 0; t < threads; t++) {
        for (int e = 0; e < K * NF; e++) dw[e] += part[t][e];
        for (int f = 0; f < NF; f++) db[f] += part[t][K * NF + f];
    }
}
"""

FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-std=gnu99", "-fopenmp"]
_loaded: dict[tuple[int, ...], tuple[ctypes.CDLL | None, str]] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("KILN_CACHE") or Path.home() / ".cache" / "kiln") / "native"


def _compile(target: Path, defines: list[str]) -> None:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "convpool.c"
        src.write_text(SOURCE)
        out = Path(tmp) / target.name
        done = subprocess.run([compiler, *FLAGS, *defines, str(src), "-o", str(out)], capture_output=True,
                              text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[:300]}")
        os.replace(out, target)  # atomic: a concurrent process sees the whole library or none


MAX_FILTERS = 256  # the kernel keeps a position's sums on the stack


def load(channels: int, kh: int, kw: int, filters: int, pool: int) -> tuple[ctypes.CDLL | None, str]:
    """(library, how) for one layer shape, built once per machine and loaded once per process; the library
    is None when it cannot be built here, and ``how`` says why."""
    spec = (channels, kh, kw, filters, pool)
    if spec not in _loaded:
        _loaded[spec] = _load(*spec)
    return _loaded[spec]


def _load(channels: int, kh: int, kw: int, filters: int, pool: int) -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("KILN_NATIVE", "1") == "0":
        return None, "native kernels turned off (KILN_NATIVE=0)"
    if filters > MAX_FILTERS or pool > 16:
        return None, f"no native kernel for {filters} filters and {pool}x{pool} pooling"
    defines = [f"-DNC={channels}", f"-DKH={kh}", f"-DKW={kw}", f"-DNF={filters}", f"-DNP={pool}"]
    # -march=native code is for this CPU only: its flags are part of the name, as is the layer shape.
    key = SOURCE + " ".join(FLAGS + defines) + " ".join(sorted(cpu_flags())) + platform.machine()
    target = cache_dir() / f"convpool-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    try:
        if not target.is_file():
            _compile(target, defines)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, f"native kernel unavailable ({e})"
    ptr, i = ctypes.c_void_p, ctypes.c_int
    for fn in (lib.convpool_forward, lib.convpool_backward):
        fn.argtypes = [ptr] * 5 + [i] * 4
        fn.restype = None
    return lib, f"native C kernel ({target.name})"
