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

static inline void gather_patch(const float *x, int b, int C, int H, int W, int kh, int kw, int y, int xx,
                                float *patch) {
    int k = 0;
    for (int c = 0; c < C; c++)
        for (int ky = 0; ky < kh; ky++)
            for (int kx = 0; kx < kw; kx++)
                patch[k++] = x[(((long)b * C + c) * H + y + ky) * W + xx + kx];
}

/* x: (B, C, H, W) float32; w: (K, F), K = C*kh*kw in (c, ky, kx) order; bias: (F) or NULL.
   out: (B, PH, PW, F) = max over each p x p window of the stride-1 valid convolution; arg: (B, PH, PW, F)
   the window position (dy * p + dx) of that maximum, the first one on ties (NaN wins, as in max_pool2d).
   Images are split over `threads` OpenMP threads; each output is computed by one thread alone. */
void convpool_forward(const float *x, const float *w, const float *bias, float *out, unsigned char *arg,
                      int B, int C, int H, int W, int kh, int kw, int F, int p, int threads) {
    const int OH = H - kh + 1, OW = W - kw + 1, PH = OH / p, PW = OW / p, K = C * kh * kw;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < B; b++) {
        float patch[K], acc[F];
        for (int i = 0; i < PH; i++)
            for (int j = 0; j < PW; j++) {
                const long o = (((long)b * PH + i) * PW + j) * F;
                float *restrict om = out + o;
                unsigned char *restrict am = arg + o;
                for (int q = 0; q < p * p; q++) {
                    gather_patch(x, b, C, H, W, kh, kw, i * p + q / p, j * p + q % p, patch);
                    for (int f = 0; f < F; f++) acc[f] = bias ? bias[f] : 0.0f;
                    for (int k = 0; k < K; k++) {
                        const float pk = patch[k];
                        const float *wr = w + (long)k * F;
                        for (int f = 0; f < F; f++) acc[f] += pk * wr[f];
                    }
                    if (q == 0) {
                        memcpy(om, acc, sizeof(float) * F);
                        memset(am, 0, F);
                    } else {  /* branch-free, so that it vectorises */
                        for (int f = 0; f < F; f++) {
                            const float v = acc[f], m = om[f];
                            const int better = (v > m) | ((v != v) & (m == m));
                            om[f] = better ? v : m;
                            am[f] = better ? (unsigned char)q : am[f];
                        }
                    }
                }
            }
    }
}

/* g: (B, PH, PW, F) gradient of out. dw: (K, F) and db: (F) are overwritten. Each thread sums its own
   images in a private buffer; the buffers are added in thread order, so a thread count gives one result. */
void convpool_backward(const float *x, const float *g, const unsigned char *arg, float *dw, float *db,
                       int B, int C, int H, int W, int kh, int kw, int F, int p, int threads) {
    const int OH = H - kh + 1, OW = W - kw + 1, PH = OH / p, PW = OW / p, K = C * kh * kw;
    float part[threads][(K + 1) * F];
    memset(part, 0, sizeof(part));
    #pragma omp parallel num_threads(threads)
    {
        int t = 0, nt = 1;
        #ifdef _OPENMP
        t = omp_get_thread_num(); nt = omp_get_num_threads();
        #endif
        float *pw_ = part[t], *pb = part[t] + (long)K * F;
        float patch[K], gq[F];
        const int lo = (int)((long)B * t / nt), hi = (int)((long)B * (t + 1) / nt);
        for (int b = lo; b < hi; b++)
            for (int i = 0; i < PH; i++)
                for (int j = 0; j < PW; j++) {
                    const long o = (((long)b * PH + i) * PW + j) * F;
                    for (int f = 0; f < F; f++) pb[f] += g[o + f];
                    for (int q = 0; q < p * p; q++) {
                        for (int f = 0; f < F; f++) gq[f] = arg[o + f] == q ? g[o + f] : 0.0f;
                        gather_patch(x, b, C, H, W, kh, kw, i * p + q / p, j * p + q % p, patch);
                        for (int k = 0; k < K; k++) {
                            const float pk = patch[k];
                            float *dr = pw_ + (long)k * F;
                            for (int f = 0; f < F; f++) dr[f] += pk * gq[f];
                        }
                    }
                }
    }
    memset(dw, 0, sizeof(float) * K * F);
    memset(db, 0, sizeof(float) * F);
    for (int t = 0; t < threads; t++) {
        for (long e = 0; e < (long)K * F; e++) dw[e] += part[t][e];
        for (int f = 0; f < F; f++) db[f] += part[t][(long)K * F + f];
    }
}
"""

FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-std=gnu99", "-fopenmp"]
_loaded: tuple[ctypes.CDLL | None, str] | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("KILN_CACHE") or Path.home() / ".cache" / "kiln") / "native"


def _compile(target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "convpool.c"
        src.write_text(SOURCE)
        out = Path(tmp) / target.name
        done = subprocess.run([compiler, *FLAGS, str(src), "-o", str(out), "-lm"], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[:300]}")
        os.replace(out, target)  # atomic: a concurrent process sees the whole library or none


def load() -> tuple[ctypes.CDLL | None, str]:
    """(library, how) once per process; library is None when it cannot be built here, and ``how`` says why."""
    global _loaded
    if _loaded is None:
        if os.environ.get("KILN_NATIVE", "1") == "0":
            _loaded = None, "native kernels turned off (KILN_NATIVE=0)"
            return _loaded
        # -march=native code is for this CPU only: its flags are part of the name.
        key = SOURCE + " ".join(FLAGS) + " ".join(sorted(cpu_flags())) + platform.machine()
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        target = cache_dir() / f"convpool-{digest}.so"
        try:
            if not target.is_file():
                _compile(target)
            lib = ctypes.CDLL(str(target))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _loaded = None, f"native kernel unavailable ({e})"
            return _loaded
        ptr, i = ctypes.c_void_p, ctypes.c_int
        for fn in (lib.convpool_forward, lib.convpool_backward):
            fn.argtypes = [ptr] * 5 + [i] * 9
            fn.restype = None
        _loaded = lib, f"native C kernel ({target.name})"
    return _loaded
