/* conv2d + max-pool (+ReLU) of a first layer in one pass, per pooling window: see kiln/nn/native.py. */
#include "vecmath.h"
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
    int used = 1;  /* threads OpenMP granted (OMP_THREAD_LIMIT, OMP_DYNAMIC: maybe fewer): the buffers written */
    #pragma omp parallel num_threads(threads)
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
        if (t == 0) used = nt;
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
    for (int t = 0; t < used; t++) {
        float pt[(K + 1) * NV * 8];
        memcpy(pt, part[t], sizeof(pt));
        for (int e = 0; e < (K + 1) * NV * 8; e++) sum[e] += pt[e];
    }
    for (int k = 0; k < K; k++) memcpy(dw + k * NF, sum + k * NV * 8, NF * sizeof(float));
    memcpy(db, sum + K * NV * 8, NF * sizeof(float));
}
