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

Each source is compiled once per machine and shape into the kiln cache (``-O3 -march=native``: the
machine that compiles is the one that runs it; the shape is a compile-time constant, so loops unroll)
and loaded with ctypes, which releases Python's lock during a call. Where there is no C compiler, or
compiling fails, the loaders return ``None`` with the reason and callers keep the PyTorch path.
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

# Vector math for the kernels, in GCC vector types of eight floats (one AVX register; two SSE or NEON ones):
# glibc's vector expf needs -ffast-math, which would also drop NaN handling. exp is Cephes' expf polynomial
# with the power of two set in the exponent bits: within 2 ulp of expf on [-87, 88], saturating beyond;
# NaN in gives NaN out. tanh(x) = 1 - 2 / (exp(2x) + 1).
MATH_C = r"""
#include <stdint.h>
#include <string.h>
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
static inline vf vsel(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }
static inline vf vexp(vf x) {
    const vf xc = vsel(x < -87.0f, x * 0.0f - 87.0f, vsel(x > 88.0f, x * 0.0f + 88.0f, x));
    const vf y = xc * 1.44269504088896341f + 0.5f;
    vi ni = __builtin_convertvector(y, vi);  /* toward zero */
    ni += (vi)(__builtin_convertvector(ni, vf) > y);  /* -1 where that rounded up: floor */
    const vf n = __builtin_convertvector(ni, vf);
    const vf r = xc - n * 0.693359375f + n * 2.12194440e-4f;
    vf p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * (vf)((ni + 127) << 23);
}
static inline vf vsigmoid(vf x) { return 1.0f / (1.0f + vexp(-x)); }
static inline vf vtanh(vf x) { return 1.0f - 2.0f / (vexp(2.0f * x) + 1.0f); }
"""

CONVPOOL_SOURCE = MATH_C + r"""
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Compiled once per layer shape: NC input channels, KH x KW kernel, NF filters, NP x NP pooling (-D flags).
   Filters are handled eight at a time in GCC vector types (one AVX register, two SSE or NEON ones), so
   that a position's sums stay in registers and each input value is loaded once and broadcast. */
#define K (NC * KH * KW)
#define NV ((NF + 7) / 8)  /* filter vectors; the last one is zero-padded when NF is not a multiple of 8 */

typedef unsigned char vb __attribute__((vector_size(8)));

static inline vf splat(float a) { return (vf){a, a, a, a, a, a, a, a}; }

static inline vf load_filters(const float *p, int v) {  /* NF floats from p, as vector v, zero-padded */
    vf r = {0};
    memcpy(&r, p + v * 8, (v * 8 + 8 <= NF ? 8 : NF - v * 8) * sizeof(float));
    return r;
}

/* The window's NP x NP convolution sums for filter vectors v .. v + nv - 1 (nv <= 2), into acc[u * NP * NP + q].
   Two filter vectors at once give eight independent chains of multiply-adds, enough to keep the FMA units busy
   (four chains wait on each other's latency), and each broadcast input value serves both. */
static inline __attribute__((always_inline)) void window_sums(const float *restrict xw, int H, int W,
                                                               const vf *restrict wv, const vf *restrict bv,
                                                               int v, const int nv, vf *restrict acc) {
    for (int u = 0; u < nv; u++)
        for (int q = 0; q < NP * NP; q++) acc[u * NP * NP + q] = bv[v + u];
    for (int c = 0; c < NC; c++)
        #pragma GCC unroll 16
        for (int ky = 0; ky < KH; ky++)
            #pragma GCC unroll 16
            for (int kx = 0; kx < KW; kx++) {
                const float *xk = xw + (c * H + ky) * W + kx;
                vf xq[NP * NP];
                for (int q = 0; q < NP * NP; q++) xq[q] = splat(xk[(q / NP) * W + q % NP]);
                for (int u = 0; u < nv; u++) {
                    const vf wk = wv[((c * KH + ky) * KW + kx) * NV + v + u];
                    for (int q = 0; q < NP * NP; q++) acc[u * NP * NP + q] += xq[q] * wk;
                }
            }
}

/* x: (B, NC, H, W) float32; w: (K, NF), rows in (c, ky, kx) order; bias: (NF).
   out: (B, PH, PW, NF) = max over each NP x NP window of the stride-1 valid convolution, then ReLU if `relu`;
   arg: the window position (dy * NP + dx) of that maximum, the first one on ties (NaN wins, as in max_pool2d).
   Images are split over `threads` OpenMP threads; each output is computed by one thread alone. */
void convpool_forward(const float *restrict x, const float *restrict w, const float *restrict bias,
                      float *restrict out, unsigned char *restrict arg, int B, int H, int W, int threads, int relu) {
    const int PH = (H - KH + 1) / NP, PW = (W - KW + 1) / NP;
    vf wv[K * NV], bv[NV];
    for (int k = 0; k < K; k++)
        for (int v = 0; v < NV; v++) wv[k * NV + v] = load_filters(w + k * NF, v);
    for (int v = 0; v < NV; v++) bv[v] = load_filters(bias, v);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < B; b++) {
        const float *xb = x + (long)b * NC * H * W;
        for (int i = 0; i < PH; i++)
            for (int j = 0; j < PW; j++) {
                const float *xw = xb + i * NP * W + j * NP;
                const long o = (((long)b * PH + i) * PW + j) * NF;
                float bo[NV * 8];
                for (int v = 0; v < NV; v += 2) {
                    const int nv = v + 1 < NV ? 2 : 1;
                    vf acc[2 * NP * NP];
                    if (nv == 2) window_sums(xw, H, W, wv, bv, v, 2, acc);
                    else window_sums(xw, H, W, wv, bv, v, 1, acc);
                    for (int u = 0; u < nv; u++) {
                        const vf *a = acc + u * NP * NP;
                        vf best = a[0];
                        vi pos = {0};
                        for (int q = 1; q < NP * NP; q++) {
                            const vi better = (a[q] > best) | ((a[q] != a[q]) & (best == best));
                            best = vsel(better, a[q], best);
                            pos = (pos & ~better) | (better & q);
                        }
                        if (relu) best = vsel(best < 0.0f, (vf){0}, best);  /* NaN stays NaN */
                        memcpy(bo + (v + u) * 8, &best, sizeof(best));
                        const vb pb = __builtin_convertvector(pos, vb);
                        memcpy(arg + o + (v + u) * 8, &pb, (v + u) * 8 + 8 <= NF ? 8 : NF - (v + u) * 8);
                    }
                }
                memcpy(out + o, bo, NF * sizeof(float));
            }
    }
}

/* g: (B, PH, PW, NF) gradient of out; with `relu`, only where out > 0 counts. dw: (K, NF) and db: (NF) are
   overwritten. Per filter vector, the K weight-gradient sums stay in registers over a thread's images: each
   tap adds the pooled output's gradient times the input under the tap at the window position where that
   filter's maximum was (picked per lane, so no work is spent on the other positions). Each thread sums a
   fixed range of images in its own buffer and the buffers are added in thread order: one thread count, one
   result. */
void convpool_backward(const float *restrict x, const float *restrict g, const unsigned char *restrict arg,
                       const float *restrict out, float *restrict dw, float *restrict db, int B, int H, int W,
                       int threads, int relu) {
    const int PH = (H - KH + 1) / NP, PW = (W - KW + 1) / NP;
    vf part[threads][(K + 1) * NV];
    #pragma omp parallel num_threads(threads)
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        const int lo = (int)((long)B * t / nt), hi = (int)((long)B * (t + 1) / nt);
        for (int v = 0; v < NV; v++) {
            vf acc[K], accb = {0};
            for (int k = 0; k < K; k++) acc[k] = (vf){0};
            for (int b = lo; b < hi; b++) {
                const float *xb = x + (long)b * NC * H * W;
                for (int i = 0; i < PH; i++)
                    for (int j = 0; j < PW; j++) {
                        const long o = (((long)b * PH + i) * PW + j) * NF;
                        vf gv = load_filters(g + o, v);
                        if (relu) gv = vsel(load_filters(out + o, v) > 0.0f, gv, (vf){0});
                        vb ab = {0};
                        memcpy(&ab, arg + o + v * 8, v * 8 + 8 <= NF ? 8 : NF - v * 8);
                        const vi av = __builtin_convertvector(ab, vi);
                        accb += gv;
                        vi at[NP * NP];  /* lanes whose maximum was at window position q */
                        for (int q = 1; q < NP * NP; q++) at[q] = av == q;
                        const float *xw = xb + i * NP * W + j * NP;
                        for (int c = 0; c < NC; c++)
                            #pragma GCC unroll 16
                            for (int ky = 0; ky < KH; ky++)
                                #pragma GCC unroll 16
                                for (int kx = 0; kx < KW; kx++) {
                                    /* per lane, the input under this tap at that filter's maximum */
                                    const float *xk = xw + (c * H + ky) * W + kx;
                                    vf xs = splat(xk[0]);
                                    for (int q = 1; q < NP * NP; q++)
                                        xs = vsel(at[q], splat(xk[(q / NP) * W + q % NP]), xs);
                                    acc[(c * KH + ky) * KW + kx] += xs * gv;
                                }
                    }
            }
            for (int k = 0; k < K; k++) part[t][k * NV + v] = acc[k];
            part[t][K * NV + v] = accb;
        }
    }
    float sum[(K + 1) * NV * 8];
    memset(sum, 0, sizeof(sum));
    for (int t = 0; t < threads; t++) {
        float pt[(K + 1) * NV * 8];
        memcpy(pt, part[t], sizeof(pt));
        for (int e = 0; e < (K + 1) * NV * 8; e++) sum[e] += pt[e];
    }
    for (int k = 0; k < K; k++) memcpy(dw + k * NF, sum + k * NV * 8, NF * sizeof(float));
    memcpy(db, sum + K * NV * 8, NF * sizeof(float));
}
"""

# -fno-math-errno: math functions need not set errno, so that loops calling expf can be vectorised.
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-std=gnu11", "-fopenmp", "-fno-math-errno"]
_loaded: dict[tuple, tuple[ctypes.CDLL | None, str]] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("KILN_CACHE") or Path.home() / ".cache" / "kiln") / "native"


def _compile(target: Path, source: str, defines: list[str]) -> None:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "kernel.c"
        src.write_text(source)
        out = Path(tmp) / target.name
        done = subprocess.run([compiler, *FLAGS, *defines, str(src), "-o", str(out)], capture_output=True,
                              text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[:300]}")
        os.replace(out, target)  # atomic: a concurrent process sees the whole library or none


def build(kind: str, source: str, defines: dict[str, int | float],
          functions: dict[str, tuple[int, int]]) -> tuple[ctypes.CDLL | None, str]:
    """(library, how) for one kernel source and shape, built once per machine and loaded once per process.
    ``functions`` maps each exported function to its (pointer, int) argument counts, pointers first. The
    library is None when it cannot be built here, and ``how`` says why."""
    spec = (kind, tuple(sorted(defines.items())))
    if spec not in _loaded:
        _loaded[spec] = _build(kind, source, [f"-D{k}={v}" for k, v in defines.items()], functions)
    return _loaded[spec]


def _build(kind: str, source: str, defines: list[str], functions: dict[str, tuple[int, int]]) -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("KILN_NATIVE", "1") == "0":
        return None, "native kernels turned off (KILN_NATIVE=0)"
    # -march=native code is for this CPU only: its flags are part of the name, as is the shape.
    key = source + " ".join(FLAGS + defines) + " ".join(sorted(cpu_flags())) + platform.machine()
    target = cache_dir() / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    try:
        if not target.is_file():
            _compile(target, source, defines)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, f"native kernel unavailable ({e})"
    for name, (pointers, ints) in functions.items():
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * pointers + [ctypes.c_int] * ints
        fn.restype = None
    return lib, f"native C kernel ({target.name})"


MAX_FILTERS = 256  # the kernel keeps a position's sums on the stack


def load(channels: int, kh: int, kw: int, filters: int, pool: int) -> tuple[ctypes.CDLL | None, str]:
    """(library, how) of the convpool kernel for one layer shape."""
    if filters > MAX_FILTERS or pool > 16:
        return None, f"no native kernel for {filters} filters and {pool}x{pool} pooling"
    return build("convpool", CONVPOOL_SOURCE, {"NC": channels, "KH": kh, "KW": kw, "NF": filters, "NP": pool},
                 {"convpool_forward": (5, 5), "convpool_backward": (6, 5)})
