/* A one-layer LSTM's recurrence, forward and backward through time: see kiln/nn/native_lstm.py. */
#include "vecmath.h"

/* Compiled once per width: H units (-D flag), gates in PyTorch's order i, f, g, o. Inside the kernel each
   gate's H values are padded to HP (whole vectors of eight); padded lanes hold zeros or unused values and
   are never written out. */
#define G (4 * H)
#define HP ((H + 7) / 8 * 8)
#define NV (HP / 8)

static inline void load_gates(vf *dst, const float *src) {  /* (4, H) row -> (4, NV) vectors, zero-padded */
    float buf[4 * HP];
    memset(buf, 0, sizeof(buf));
    for (int k = 0; k < 4; k++) memcpy(buf + k * HP, src + k * H, H * sizeof(float));
    memcpy(dst, buf, sizeof(buf));
}

static inline void store_gates(float *dst, const vf *src) {
    for (int k = 0; k < 4; k++) memcpy(dst + k * H, (const float *)src + k * HP, H * sizeof(float));
}

/* Sequences run in pairs: each weight vector loaded serves both, and the two sets of accumulators are
   independent chains for the FMA units. An odd last sequence is paired with itself (same values twice). */
#define PAIR(p) {2 * (p), 2 * (p) + 1 < B ? 2 * (p) + 1 : 2 * (p)}

/* xp: (B, T, G) input projection with both biases. whh_t: (H, 4, HP) weight_hh transposed and padded.
   hs: (B, T, H) outputs; acts: (B, T, G) gate activations and cs: (B, T, H) cell states, for backward. */
void lstm_forward(const float *restrict xp, const float *restrict whh_t, float *restrict hs, float *restrict acts,
                  float *restrict cs, int B, int T, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int p = 0; p < (B + 1) / 2; p++) {
        const int bs[2] = PAIR(p);
        vf h[2][NV], c[2][NV], gt[2][4 * NV];
        float hb[2][HP];
        memset(h, 0, sizeof(h));
        memset(c, 0, sizeof(c));
        for (int t = 0; t < T; t++) {
            for (int s = 0; s < 2; s++) load_gates(gt[s], xp + ((long)bs[s] * T + t) * G);
            if (t > 0) {
                memcpy(hb, h, sizeof(hb));
                for (int v = 0; v < 4 * NV; v += 4) {  /* 4 * NV is a multiple of 4: named registers */
                    vf a0 = gt[0][v], a1 = gt[0][v + 1], a2 = gt[0][v + 2], a3 = gt[0][v + 3];
                    vf b0 = gt[1][v], b1 = gt[1][v + 1], b2 = gt[1][v + 2], b3 = gt[1][v + 3];
                    for (int k = 0; k < H; k++) {
                        const vf *w = (const vf *)(whh_t + (long)k * 4 * HP) + v;
                        const float x0 = hb[0][k], x1 = hb[1][k];
                        a0 += x0 * w[0], a1 += x0 * w[1], a2 += x0 * w[2], a3 += x0 * w[3];
                        b0 += x1 * w[0], b1 += x1 * w[1], b2 += x1 * w[2], b3 += x1 * w[3];
                    }
                    gt[0][v] = a0, gt[0][v + 1] = a1, gt[0][v + 2] = a2, gt[0][v + 3] = a3;
                    gt[1][v] = b0, gt[1][v + 1] = b1, gt[1][v + 2] = b2, gt[1][v + 3] = b3;
                }
            }
            for (int s = 0; s < 2; s++) {
                vf *g = gt[s];
                for (int v = 0; v < NV; v++) {
                    g[v] = vsigmoid(g[v]);
                    g[NV + v] = vsigmoid(g[NV + v]);
                    g[2 * NV + v] = vtanh(g[2 * NV + v]);
                    g[3 * NV + v] = vsigmoid(g[3 * NV + v]);
                    c[s][v] = g[NV + v] * c[s][v] + g[v] * g[2 * NV + v];
                    h[s][v] = g[3 * NV + v] * vtanh(c[s][v]);
                }
                const long row = (long)bs[s] * T + t;
                store_gates(acts + row * G, g);
                memcpy(cs + row * H, c[s], H * sizeof(float));
                memcpy(hs + row * H, h[s], H * sizeof(float));
            }
        }
    }
}

/* dhs: (B, T, H) gradient of the outputs; whh_t as in forward. dxp: (B, T, G) is overwritten with the gradient
   of the projection; weight_hh's gradient is then one matrix multiply of it with the outputs (in PyTorch). */
void lstm_backward(const float *restrict dhs, const float *restrict acts, const float *restrict cs,
                   const float *restrict whh_t, float *restrict dxp, int B, int T, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int p = 0; p < (B + 1) / 2; p++) {
        const int bs[2] = PAIR(p);
        vf dh[2][NV], dc[2][NV], dg[2][4 * NV];
        float dhb[2][HP];
        memset(dh, 0, sizeof(dh));
        memset(dc, 0, sizeof(dc));
        for (int t = T - 1; t >= 0; t--) {
            for (int s = 0; s < 2; s++) {
                const long row = (long)bs[s] * T + t;
                vf a[4 * NV], c[NV], cprev[NV], dy[NV];
                load_gates(a, acts + row * G);
                memset(c, 0, sizeof(c));
                memcpy(c, cs + row * H, H * sizeof(float));
                memset(dy, 0, sizeof(dy));
                memcpy(dy, dhs + row * H, H * sizeof(float));
                memset(cprev, 0, sizeof(cprev));
                if (t > 0) memcpy(cprev, cs + (row - 1) * H, H * sizeof(float));
                for (int v = 0; v < NV; v++) {
                    const vf i = a[v], f = a[NV + v], g = a[2 * NV + v], o = a[3 * NV + v];
                    const vf tc = vtanh(c[v]), dhv = dy[v] + dh[s][v];
                    const vf dcv = dhv * o * (1.0f - tc * tc) + dc[s][v];
                    dg[s][v] = dcv * g * i * (1.0f - i);
                    dg[s][NV + v] = dcv * cprev[v] * f * (1.0f - f);
                    dg[s][2 * NV + v] = dcv * i * (1.0f - g * g);
                    dg[s][3 * NV + v] = dhv * tc * o * (1.0f - o);
                    dc[s][v] = dcv * f;
                }
                store_gates(dxp + row * G, dg[s]);
            }
            /* dh[k] = sum over gates of dg * weight_hh[:, k]: a dot product with row k of whh_t */
            memset(dhb, 0, sizeof(dhb));
            for (int k = 0; k < H; k++) {
                const vf *w = (const vf *)(whh_t + (long)k * 4 * HP);
                vf s0 = dg[0][0] * w[0], s1 = dg[0][1] * w[1], r0 = dg[1][0] * w[0], r1 = dg[1][1] * w[1];
                for (int v = 2; v < 4 * NV; v += 2) {
                    s0 += dg[0][v] * w[v], s1 += dg[0][v + 1] * w[v + 1];
                    r0 += dg[1][v] * w[v], r1 += dg[1][v + 1] * w[v + 1];
                }
                const vf s = s0 + s1, r = r0 + r1;
                dhb[0][k] = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
                dhb[1][k] = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
            }
            memcpy(dh, dhb, sizeof(dh));
        }
    }
}
