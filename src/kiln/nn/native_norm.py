"""A residual add and LayerNorm as one C kernel call per pass (``kiln.nn.native``): ``norm(x + y)``.

A post-norm transformer layer ends each half with this. PyTorch runs it as an add, then a LayerNorm whose
kernels are built for wide rows; at the seed model's width of 50, forward and backward of one of them took
0.44 ms for a batch of 128 here, most of it fixed costs of the three operators and their reductions. This
kernel keeps each row in registers (widths up to ``MAX_WIDTH``) and writes the output and, backward, the
input gradient once; the gradients of the scale and shift are summed per thread over a fixed range of rows
and added in thread order, so one thread count gives one result.

It covers float32 on the CPU; anything else, and tracing or exporting, takes the PyTorch operators.
"""

from __future__ import annotations

import torch

from kiln.nn import native

MAX_WIDTH = 256  # a row lives in registers and on the stack

SOURCE = native.MATH_C + r"""
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Compiled once per width C and epsilon EPS (-D flags). Rows are C floats; a row is held as NV vectors of
   eight, the last one zero-padded. */
#define NV ((C + 7) / 8)

#define TAIL (C - 8 * (NV - 1))  /* floats in the last vector */

static inline void load_row(vf *dst, const float *src) {  /* whole vectors, then the zero-padded tail */
    for (int k = 0; k < NV - 1; k++) memcpy(dst + k, src + 8 * k, sizeof(vf));
    vf t = {0};
    memcpy(&t, src + 8 * (NV - 1), TAIL * sizeof(float));
    dst[NV - 1] = t;
}
static inline void store_row(float *dst, const vf *src) {
    for (int k = 0; k < NV - 1; k++) memcpy(dst + 8 * k, src + k, sizeof(vf));
    memcpy(dst + 8 * (NV - 1), src + NV - 1, TAIL * sizeof(float));
}
static inline float hsum(const vf *v) {
    vf s = v[0];
    for (int k = 1; k < NV; k++) s += v[k];
    float t[8];
    memcpy(t, &s, sizeof(t));
    return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}

/* Rows r .. r + n - 1 (n <= 4) of the forward pass, side by side: one row alone is a chain of dependent
   steps (sum, mean, variance, square root), and four of them keep the vector units busy. */
static inline __attribute__((always_inline)) void norm_rows(const float *restrict x, const float *restrict y,
                                                            const vf *wv, const vf *bv, vi tail,
                                                            float *restrict out, float *restrict xhat,
                                                            float *restrict rstd, long r, const int n) {
    vf d[4][NV], t[4][NV];
    float mean[4], rs[4];
    for (int i = 0; i < n; i++) {
        load_row(d[i], x + (r + i) * C);
        load_row(t[i], y + (r + i) * C);
        for (int k = 0; k < NV; k++) d[i][k] += t[i][k];
    }
    for (int i = 0; i < n; i++) mean[i] = hsum(d[i]) / C;
    for (int i = 0; i < n; i++) {
        for (int k = 0; k < NV; k++) d[i][k] -= mean[i];
        d[i][NV - 1] = vsel(tail, d[i][NV - 1], (vf){0});  /* the padding is not part of the row */
        for (int k = 0; k < NV; k++) t[i][k] = d[i][k] * d[i][k];
    }
    for (int i = 0; i < n; i++) rs[i] = 1.0f / sqrtf(hsum(t[i]) / C + (float)EPS);
    for (int i = 0; i < n; i++) {
        for (int k = 0; k < NV; k++) {
            d[i][k] *= rs[i];
            t[i][k] = d[i][k] * wv[k] + bv[k];
        }
        store_row(xhat + (r + i) * C, d[i]);
        store_row(out + (r + i) * C, t[i]);
        rstd[r + i] = rs[i];
    }
}

/* x, y: (R, C); w, b: (C). out = (s - mean) * rstd * w + b with s = x + y; xhat = (s - mean) * rstd and
   rstd (R) are kept for the backward pass. Rows are split over OpenMP threads, four at a time. */
void addnorm_forward(const float *restrict x, const float *restrict y, const float *restrict w,
                     const float *restrict b, float *restrict out, float *restrict xhat, float *restrict rstd,
                     int R, int threads) {
    vf wv[NV], bv[NV];
    load_row(wv, w);
    load_row(bv, b);
    const vi lane = {0, 1, 2, 3, 4, 5, 6, 7}, tail = lane < TAIL;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int r = 0; r < R; r += 4) {
        if (r + 4 <= R) norm_rows(x, y, wv, bv, tail, out, xhat, rstd, r, 4);
        else norm_rows(x, y, wv, bv, tail, out, xhat, rstd, r, R - r);
    }
}

/* g: (R, C) gradient of out. dx: (R, C) gradient of s (the same for x and y); dw, db: (C), overwritten. */
void addnorm_backward(const float *restrict g, const float *restrict xhat, const float *restrict rstd,
                      const float *restrict w, float *restrict dx, float *restrict dw, float *restrict db,
                      int R, int threads) {
    vf wv[NV];
    load_row(wv, w);
    vf part[threads][2 * NV];
    #pragma omp parallel num_threads(threads)
    {
        int th = 0, nt = 1;
#ifdef _OPENMP
        th = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        const int lo = (int)((long)R * th / nt), hi = (int)((long)R * (th + 1) / nt);
        vf aw[NV], ab[NV];
        for (int k = 0; k < NV; k++) aw[k] = ab[k] = (vf){0};
        for (int r = lo; r < hi; r++) {
            vf gv[NV], xv[NV], dxh[NV], t[NV];
            load_row(gv, g + (long)r * C);
            load_row(xv, xhat + (long)r * C);
            for (int k = 0; k < NV; k++) {
                aw[k] += gv[k] * xv[k];
                ab[k] += gv[k];
                dxh[k] = gv[k] * wv[k];
                t[k] = dxh[k] * xv[k];
            }
            const float m1 = hsum(dxh) / C, m2 = hsum(t) / C, rs = rstd[r];
            for (int k = 0; k < NV; k++) t[k] = (dxh[k] - m1 - xv[k] * m2) * rs;
            store_row(dx + (long)r * C, t);
        }
        for (int k = 0; k < NV; k++) {
            part[th][k] = aw[k];
            part[th][NV + k] = ab[k];
        }
    }
    vf sw[NV], sb[NV];
    for (int k = 0; k < NV; k++) sw[k] = sb[k] = (vf){0};
    for (int th = 0; th < threads; th++)
        for (int k = 0; k < NV; k++) {
            sw[k] += part[th][k];
            sb[k] += part[th][NV + k];
        }
    store_row(dw, sw);
    store_row(db, sb);
}
"""


def load(width: int, eps: float):
    """(library, how) of the add-and-norm kernel for one width and epsilon."""
    if width > MAX_WIDTH:
        return None, f"no native add-and-norm kernel above width {MAX_WIDTH}"
    return native.build("addnorm", SOURCE, {"C": width, "EPS": float(eps)},
                        {"addnorm_forward": (7, 2), "addnorm_backward": (7, 2)})


def applies(x: torch.Tensor, norm: torch.nn.LayerNorm) -> bool:
    """The kernel covers float32 CPU rows x, normalised over the last dimension with a scale and a shift."""
    if type(x) is not torch.Tensor or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")):
        return False
    if len(norm.normalized_shape) != 1 or norm.weight is None or norm.bias is None:
        return False
    return norm.weight.dtype == torch.float32 and load(x.shape[-1], norm.eps)[0] is not None


class AddNorm(torch.autograd.Function):
    """norm(x + y) for a LayerNorm over the last dimension, with its scale ``weight`` and shift ``bias``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                eps: float) -> torch.Tensor:
        c = x.shape[-1]
        lib, _ = load(c, eps)
        x, y = x.contiguous(), y.contiguous()
        rows = x.numel() // c
        w, b = weight.detach().contiguous(), bias.detach().contiguous()
        out = torch.empty_like(x)
        xhat = torch.empty_like(x)
        rstd = torch.empty(rows)
        lib.addnorm_forward(x.data_ptr(), y.data_ptr(), w.data_ptr(), b.data_ptr(), out.data_ptr(),
                            xhat.data_ptr(), rstd.data_ptr(), rows, torch.get_num_threads())
        ctx.save_for_backward(xhat, rstd, weight)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xhat, rstd, weight = ctx.saved_tensors
        c = xhat.shape[-1]
        lib, _ = load(c, ctx.eps)
        g, w = grad.contiguous(), weight.detach().contiguous()
        dx = torch.empty_like(xhat)
        dw = torch.empty(c)
        db = torch.empty(c)
        lib.addnorm_backward(g.data_ptr(), xhat.data_ptr(), rstd.data_ptr(), w.data_ptr(), dx.data_ptr(),
                             dw.data_ptr(), db.data_ptr(), xhat.numel() // c, torch.get_num_threads())
        return dx, dx, dw, db, None
