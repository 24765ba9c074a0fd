/* A residual add and LayerNorm, norm(x + y): see kiln/nn/native_norm.py. */
#include "vecmath.h"
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
    int used = 1;  /* threads OpenMP granted (OMP_THREAD_LIMIT, OMP_DYNAMIC: maybe fewer): the buffers written */
    #pragma omp parallel num_threads(threads)
    {
        int th = 0, nt = 1;
#ifdef _OPENMP
        th = omp_get_thread_num();
        nt = omp_get_num_threads();
        if (th == 0) used = nt;
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
    for (int th = 0; th < used; th++)
        for (int k = 0; k < NV; k++) {
            sw[k] += part[th][k];
            sb[k] += part[th][NV + k];
        }
    store_row(dw, sw);
    store_row(db, sb);
}
