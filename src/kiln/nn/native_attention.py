"""Multi-head self-attention over short sequences as one C kernel call per pass (``kiln.nn.native``).

Written with PyTorch operators, attention over the seed model's 13 steps is about twenty small
operators forward and backward: split, view and transpose q, k and v, copies to contiguous memory,
two batched matrix multiplies of 13 x 13 x 25 per head, a softmax, and the same again with a concat
for the gradient. Each moves a few kilobytes, so their fixed costs dominate: 1.9 ms forward and
backward for a batch of 64 on one thread here. This kernel reads the (B, T, 3C) output of the qkv
projection as it is, writes (B, T, C) for the output projection, keeps the attention weights
(B, heads, T, T) for the backward pass, and writes the (B, T, 3C) gradient in one pass.

It covers attention without a mask and without dropout in float32 on the CPU, for up to
``MAX_STEPS`` steps; anything else, and tracing or exporting, takes the PyTorch operators.
"""

from __future__ import annotations

import torch

from kiln.nn import native

MAX_STEPS = 64  # the kernel keeps a (T, T) block of scores on the stack

SOURCE = native.MATH_C + r"""
#include <math.h>

/* Compiled once per shape: T steps, NH heads of D features (-D flags); C = NH * D. qkv rows are
   [q (C) | k (C) | v (C)], head h owning features h*D .. h*D+D-1 of each. Batches split over OpenMP
   threads; every output element is computed by one thread, so results do not depend on the count. */
#define C (NH * D)
#define TP ((T + 7) / 8 * 8)  /* T rounded up to whole vectors */

static inline float dot(const float *restrict a, const float *restrict b) {
    float s = 0.0f;
    #pragma omp simd reduction(+:s)
    for (int d = 0; d < D; d++) s += a[d] * b[d];
    return s;
}

static inline void axpy(float *restrict y, float a, const float *restrict x) {
    #pragma omp simd
    for (int d = 0; d < D; d++) y[d] += a * x[d];
}

/* y (B, T, C) = softmax(q k^T * scale) v per head; p (B, NH, T, T) keeps the weights for backward. */
void attention_forward(const float *restrict qkv, float *restrict y, float *restrict p, int B, int threads) {
    const float scale = 1.0f / sqrtf((float)D);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < B; b++) {
        const float *xb = qkv + (long)b * T * 3 * C;
        float *yb = y + (long)b * T * C;
        memset(yb, 0, sizeof(float) * T * C);
        for (int h = 0; h < NH; h++) {
            float *ph = p + ((long)b * NH + h) * T * T;
            for (int t = 0; t < T; t++) {
                const float *q = xb + t * 3 * C + h * D;
                float *row = ph + t * T, m = -INFINITY, sum = 0.0f, e[TP];
                for (int s = 0; s < T; s++) {
                    e[s] = dot(q, xb + s * 3 * C + C + h * D) * scale;
                    m = e[s] > m ? e[s] : m;
                }
                for (int s = T; s < TP; s++) e[s] = m;  /* padding, left out of the sum */
                for (int s = 0; s < TP; s += 8) {
                    vf z;
                    memcpy(&z, e + s, sizeof(z));
                    z = vexp(z - m);
                    memcpy(e + s, &z, sizeof(z));
                }
                for (int s = 0; s < T; s++) sum += e[s];
                const float inv = 1.0f / sum;
                for (int s = 0; s < T; s++) {
                    row[s] = e[s] * inv;
                    axpy(yb + t * C + h * D, row[s], xb + s * 3 * C + 2 * C + h * D);
                }
            }
        }
    }
}

/* dqkv (B, T, 3C), overwritten, from dy (B, T, C), the weights p and the inputs qkv. */
void attention_backward(const float *restrict qkv, const float *restrict p, const float *restrict dy,
                        float *restrict dqkv, int B, int threads) {
    const float scale = 1.0f / sqrtf((float)D);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < B; b++) {
        const float *xb = qkv + (long)b * T * 3 * C;
        const float *gb = dy + (long)b * T * C;
        float *db = dqkv + (long)b * T * 3 * C;
        memset(db, 0, sizeof(float) * T * 3 * C);
        for (int h = 0; h < NH; h++) {
            const float *ph = p + ((long)b * NH + h) * T * T;
            for (int t = 0; t < T; t++) {
                const float *row = ph + t * T, *g = gb + t * C + h * D;
                float ds[T], rowdot = 0.0f;
                for (int s = 0; s < T; s++) {
                    ds[s] = dot(g, xb + s * 3 * C + 2 * C + h * D);  /* dP[t, s] */
                    rowdot += row[s] * ds[s];
                    axpy(db + s * 3 * C + 2 * C + h * D, row[s], g);  /* dv[s] += P[t, s] dy[t] */
                }
                for (int s = 0; s < T; s++) {
                    const float dscore = row[s] * (ds[s] - rowdot) * scale;
                    axpy(db + t * 3 * C + h * D, dscore, xb + s * 3 * C + C + h * D);  /* dq[t] */
                    axpy(db + s * 3 * C + C + h * D, dscore, xb + t * 3 * C + h * D);  /* dk[s] */
                }
            }
        }
    }
}
"""


def load(steps: int, heads: int, head_dim: int):
    """(library, how) of the attention kernel for one shape."""
    if steps > MAX_STEPS:
        return None, f"no native attention kernel above {MAX_STEPS} steps"
    return native.build("attention", SOURCE, {"T": steps, "NH": heads, "D": head_dim},
                        {"attention_forward": (3, 2), "attention_backward": (4, 2)})


def applies(qkv: torch.Tensor, heads: int, dropout: float, training: bool) -> bool:
    """The kernel covers float32 CPU attention without dropout; tracers and exporters get PyTorch operators."""
    if type(qkv) is not torch.Tensor or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if qkv.device.type != "cpu" or qkv.dtype != torch.float32 or (dropout and training):
        return False
    b, t, c3 = qkv.shape
    return load(t, heads, c3 // 3 // heads)[0] is not None


class NativeAttention(torch.autograd.Function):
    """(B, T, 3C) output of the qkv projection -> (B, T, C) attention output, heads side by side."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int) -> torch.Tensor:
        b, t, c3 = qkv.shape
        lib, _ = load(t, heads, c3 // 3 // heads)
        qkv = qkv.contiguous()
        y = torch.empty(b, t, c3 // 3)
        p = torch.empty(b, heads, t, t)
        lib.attention_forward(qkv.data_ptr(), y.data_ptr(), p.data_ptr(), b, torch.get_num_threads())
        ctx.save_for_backward(qkv, p)
        ctx.heads = heads
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qkv, p = ctx.saved_tensors
        b, t, c3 = qkv.shape
        lib, _ = load(t, ctx.heads, c3 // 3 // ctx.heads)
        g = grad.contiguous()
        dqkv = torch.empty_like(qkv)
        lib.attention_backward(qkv.data_ptr(), p.data_ptr(), g.data_ptr(), dqkv.data_ptr(), b,
                               torch.get_num_threads())
        return dqkv, None
