/* Elementwise layers: RMSNorm (with the residual add), SiLU-and-mul, rotary in place, per-head RMSNorm. */
#include "common.h"

/* If residual: s = x + residual, written to residual_out; else s = x. out = weight * (s / sqrt(mean(s^2) + eps)).
 * Rows have stride H (contiguous). residual_out may alias residual; out may alias x. */
void wl_rmsnorm(const float *x, const float *residual, float *residual_out, const float *weight, float eps,
                int64_t M, int64_t H, float *out) {
#pragma omp parallel for schedule(static) if (M > 4)
    for (int64_t i = 0; i < M; i++) {
        const float *xi = x + i * H;
        float *oi = out + i * H;
        const float *s = xi;
        if (residual) {
            const float *ri = residual + i * H;
            float *so = residual_out + i * H;
            for (int64_t j = 0; j < H; j++) so[j] = xi[j] + ri[j];
            s = so;
        }
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < H; j++) ss += s[j] * s[j];
        const float inv = 1.0f / sqrtf(ss / (float)H + eps);
        for (int64_t j = 0; j < H; j++) oi[j] = weight[j] * (s[j] * inv);
    }
}

void wl_silu_mul(const float *x, int64_t M, int64_t D, float *out) {
#pragma omp parallel for schedule(static) if (M > 4)
    for (int64_t i = 0; i < M; i++) {
        const float *a = x + i * 2 * D, *b = a + D;
        float *o = out + i * D;
#pragma omp simd
        for (int64_t j = 0; j < D; j++) o[j] = a[j] / (1.0f + exp_approx(-a[j])) * b[j];
    }
}

/* Neox rotary in place: for each token t, heads [0, nq) at x + t * stride + q_off and [0, nk) at k_off,
 * pairs (i, i + D/2) rotated by cos/sin[pos[t], i] (caches (max_pos, D/2)). */
void wl_rotary(float *x, int64_t T, int64_t stride, int64_t q_off, int64_t nq, int64_t k_off, int64_t nk,
               int64_t D, const int64_t *pos, const float *cos_cache, const float *sin_cache) {
    const int64_t half = D / 2;
#pragma omp parallel for schedule(static) if (T > 4)
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_cache + pos[t] * half, *s = sin_cache + pos[t] * half;
        for (int64_t h = 0; h < nq + nk; h++) {
            float *v = x + t * stride + (h < nq ? q_off + h * D : k_off + (h - nq) * D);
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                const float x1 = v[i], x2 = v[i + half];
                v[i] = x1 * c[i] - x2 * s[i];
                v[i + half] = x2 * c[i] + x1 * s[i];
            }
        }
    }
}

/* RMSNorm over each head_dim-wide head of `heads` heads starting at column `off` of each (T, stride) row. */
void wl_head_norm(float *x, int64_t T, int64_t stride, int64_t off, int64_t heads, int64_t D, const float *w,
                  float eps) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + t * stride + off + h * D;
            wl_rmsnorm(v, 0, 0, w, eps, 1, D, v);
        }
}
