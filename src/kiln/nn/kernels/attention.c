/* Multi-head self-attention over short sequences: see kiln/nn/native_attention.py. */
#include "vecmath.h"
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
