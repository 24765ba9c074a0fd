/* Vector math for kiln's kernels, in GCC vector types of eight floats (one AVX register; two SSE or NEON
   ones): glibc's vector expf needs -ffast-math, which would also drop NaN handling. exp is Cephes' expf
   polynomial with the power of two set in the exponent bits: within 2 ulp of expf on [-87, 88], saturating
   beyond; NaN in gives NaN out. tanh(x) = 1 - 2 / (exp(2x) + 1). */
#ifndef KILN_VECMATH_H
#define KILN_VECMATH_H
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
#endif
