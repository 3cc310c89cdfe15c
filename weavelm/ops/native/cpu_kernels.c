/* weavelm's CPU kernels, fp32 throughout: built on first use by weavelm/ops/native/__init__.py
 * (gcc -O3 -march=native -fopenmp) and called through ctypes.
 *
 * - wl_q4_gemm / wl_q8_gemm: y (M, N) = x (M, K) @ W^T (+ bias) with W kept in llama.cpp's 32-element blocks:
 *   4-bit codes q with per-block scale d and min m (w = d * q + m: Q4_0, Q4_1 and Q4_K all map here exactly), or
 *   int8 codes with per-block scale (w = d * q: Q8_0). Each block is dequantized in registers (d * q + m as one
 *   fused multiply-add: within half an ulp of the gguf package's dequantized weight), then multiplied with fp32
 *   activations and accumulated in fp32. So the result equals the dequantized fp32 model's up to rounding order.
 *   Up to 8 activation rows share each dequantized block; the caller routes wider inputs to a dense GEMM.
 * - wl_dequant_q4 / wl_dequant_q8: the same blocks to a dense fp32 (N, K) matrix.
 * - wl_rmsnorm: optional residual add, then RMSNorm (fp32 statistics), as weavelm's torch RMSNorm computes it.
 * - wl_silu_mul: silu(x[:, :D]) * x[:, D:].
 * - wl_rotary: neox rotary embedding in place on the q and k heads of a (T, stride) qkv buffer.
 * - wl_paged_attention: writes the new keys/values into the paged cache, then causal attention of every query
 *   token over its request's context (two passes: scores, then softmax-weighted values), for each head.
 *
 * Portable C with GCC vector extensions: the same source vectorises for AVX-512, AVX2 or SSE as -march=native
 * allows. Threads come from OpenMP; the library links the libgomp torch has already loaded (same soname), so it
 * shares torch's thread pool and `torch.set_num_threads`.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

#define BLOCK 32
#define MAX_ROWS 8

static inline v16f load16(const float *p) {
    v16f v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* 16 bytes -> 16 int32 lanes (GCC's generic widening of a byte vector is scalar, hence the intrinsics). */
static inline v16i widen_u8(const uint8_t *p) {
    v16i out;
#if defined(__AVX512F__)
    __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    memcpy(&out, &w, 64);
#elif defined(__AVX2__)
    __m128i raw = _mm_loadu_si128((const __m128i *)p);
    __m256i a = _mm256_cvtepu8_epi32(raw), b = _mm256_cvtepu8_epi32(_mm_srli_si128(raw, 8));
    memcpy(&out, &a, 32);
    memcpy((char *)&out + 32, &b, 32);
#else
    for (int i = 0; i < 16; i++) out[i] = p[i];
#endif
    return out;
}

static inline v16i widen_i8(const int8_t *p) {
    v16i out;
#if defined(__AVX512F__)
    __m512i w = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p));
    memcpy(&out, &w, 64);
#elif defined(__AVX2__)
    __m128i raw = _mm_loadu_si128((const __m128i *)p);
    __m256i a = _mm256_cvtepi8_epi32(raw), b = _mm256_cvtepi8_epi32(_mm_srli_si128(raw, 8));
    memcpy(&out, &a, 32);
    memcpy((char *)&out + 32, &b, 32);
#else
    for (int i = 0; i < 16; i++) out[i] = p[i];
#endif
    return out;
}

static inline float hsum16(v16f v) {
    typedef float v8f __attribute__((vector_size(32)));
    typedef float v4f __attribute__((vector_size(16)));
    v8f a, b;
    memcpy(&a, &v, 32);
    memcpy(&b, (char *)&v + 32, 32);
    a += b;
    v4f c, e;
    memcpy(&c, &a, 16);
    memcpy(&e, (char *)&a + 16, 16);
    c += e;
    return (c[0] + c[2]) + (c[1] + c[3]);
}

int wl_abi_version(void) { return 1; }

/* ---- quantized GEMM ------------------------------------------------------------------------------------ */

/* One output feature n for `mr` (1..8) activation rows. MR is a compile-time constant in each instance. Each row
 * keeps 2 * U independent accumulator chains (U blocks per iteration: 2 for few rows, where the FMA latency would
 * otherwise bound a single row), and the dequantized block is shared by every row. */
#define Q4_BLOCK(bb, lo, hi)                                                                                    \
    v16i wi = widen_u8(qs + (bb) * 16);                                                                        \
    v16f dv = (v16f){0} + d[bb], mv = (v16f){0} + m[bb];                                                       \
    v16f lo = __builtin_convertvector(wi & 15, v16f) * dv + mv;                                                \
    v16f hi = __builtin_convertvector(wi >> 4, v16f) * dv + mv;
#define Q8_BLOCK(bb, lo, hi)                                                                                    \
    v16f dv = (v16f){0} + d[bb];                                                                               \
    v16f lo = __builtin_convertvector(widen_i8(qs + (bb) * BLOCK), v16f) * dv;                                 \
    v16f hi = __builtin_convertvector(widen_i8(qs + (bb) * BLOCK + 16), v16f) * dv;

#define DEFINE_ROW(NAME, CODE_T, BLOCK_MACRO, MR)                                                               \
    static void NAME##_##MR(const float *x, int64_t ldx, int64_t nb, const CODE_T *qs, const float *d,         \
                            const float *m, float *out) {                                                      \
        (void)m;                                                                                               \
        enum { U = MR <= 2 ? 2 : 1 };                                                                          \
        v16f acc[MR][2 * U];                                                                                   \
        for (int r = 0; r < MR; r++)                                                                           \
            for (int c = 0; c < 2 * U; c++) acc[r][c] = (v16f){0};                                            \
        int64_t b = 0;                                                                                         \
        for (; b + U <= nb; b += U) {                                                                          \
            for (int u = 0; u < U; u++) {                                                                      \
                BLOCK_MACRO(b + u, lo, hi)                                                                     \
                for (int r = 0; r < MR; r++) {                                                                 \
                    const float *xr = x + r * ldx + (b + u) * BLOCK;                                           \
                    acc[r][2 * u] += lo * load16(xr);                                                          \
                    acc[r][2 * u + 1] += hi * load16(xr + 16);                                                 \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
        for (; b < nb; b++) {                                                                                  \
            BLOCK_MACRO(b, lo, hi)                                                                             \
            for (int r = 0; r < MR; r++) {                                                                     \
                const float *xr = x + r * ldx + b * BLOCK;                                                     \
                acc[r][0] += lo * load16(xr);                                                                  \
                acc[r][1] += hi * load16(xr + 16);                                                             \
            }                                                                                                  \
        }                                                                                                      \
        for (int r = 0; r < MR; r++) {                                                                         \
            v16f t = acc[r][0] + acc[r][1];                                                                    \
            for (int c = 2; c < 2 * U; c++) t += acc[r][c];                                                    \
            out[r] = hsum16(t);                                                                                \
        }                                                                                                      \
    }
#define DEFINE_Q4_ROW(MR) DEFINE_ROW(q4_row, uint8_t, Q4_BLOCK, MR)

/* One row, one feature, for 4-bit codes: sum_b d_b * (q_b . x_b) + sum_b m_b * sum(x_b), with the block sums of x
 * precomputed (xsum): 3 multiply-adds per block instead of 4 (the dequantizing form wins from 2 rows on). */
static void q4_row_fact(const float *x, int64_t nb, const uint8_t *qs, const float *d, const float *m,
                        const float *xsum, float *out) {
    v16f a0 = (v16f){0}, a1 = (v16f){0};
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        v16i w0 = widen_u8(qs + b * 16), w1 = widen_u8(qs + b * 16 + 16);
        const float *x0 = x + b * BLOCK, *x1 = x0 + BLOCK;
        v16f t0 = __builtin_convertvector(w0 & 15, v16f) * load16(x0);
        t0 += __builtin_convertvector(w0 >> 4, v16f) * load16(x0 + 16);
        v16f t1 = __builtin_convertvector(w1 & 15, v16f) * load16(x1);
        t1 += __builtin_convertvector(w1 >> 4, v16f) * load16(x1 + 16);
        a0 += t0 * d[b];
        a1 += t1 * d[b + 1];
    }
    for (; b < nb; b++) {
        v16i w0 = widen_u8(qs + b * 16);
        const float *x0 = x + b * BLOCK;
        v16f t0 = __builtin_convertvector(w0 & 15, v16f) * load16(x0);
        t0 += __builtin_convertvector(w0 >> 4, v16f) * load16(x0 + 16);
        a0 += t0 * d[b];
    }
    float ms = 0.f;
    for (int64_t j = 0; j < nb; j++) ms += m[j] * xsum[j];
    *out = hsum16(a0 + a1) + ms;
}

/* One row, one feature, for int8 codes: sum_b d_b * (q_b . x_b). */
static void q8_row_fact(const float *x, int64_t nb, const int8_t *qs, const float *d, float *out) {
    v16f a0 = (v16f){0}, a1 = (v16f){0};
    for (int64_t b = 0; b < nb; b++) {
        const float *x0 = x + b * BLOCK;
        v16f t = __builtin_convertvector(widen_i8(qs + b * BLOCK), v16f) * load16(x0);
        t += __builtin_convertvector(widen_i8(qs + b * BLOCK + 16), v16f) * load16(x0 + 16);
        if (b & 1)
            a1 += t * d[b];
        else
            a0 += t * d[b];
    }
    *out = hsum16(a0 + a1);
}
#define DEFINE_Q8_ROW(MR) DEFINE_ROW(q8_row, int8_t, Q8_BLOCK, MR)

/* Two output features (n, n + 1) for `mr` rows: each x load feeds both features' multiply-adds (the row kernels
 * above are bound by loads as much as by multiply-adds from 2 rows on). */
#define DEFINE_PAIR(NAME, CODE_T, BLOCK_MACRO, MR)                                                              \
    static void NAME##_##MR(const float *x, int64_t ldx, int64_t nb, const CODE_T *qs0, const float *d0,       \
                            const float *m0, const CODE_T *qs1, const float *d1, const float *m1, float *out0,   \
                            float *out1) {                                                                     \
        v16f a0[MR], a1[MR];                                                                                   \
        for (int r = 0; r < MR; r++) a0[r] = a1[r] = (v16f){0};                                               \
        for (int64_t b = 0; b < nb; b++) {                                                                     \
            v16f lo0, hi0, lo1, hi1;                                                                           \
            {                                                                                                  \
                const CODE_T *qs = qs0;                                                                        \
                const float *d = d0, *m = m0;                                                                  \
                (void)m;                                                                                       \
                BLOCK_MACRO(b, l, h)                                                                           \
                lo0 = l, hi0 = h;                                                                              \
            }                                                                                                  \
            {                                                                                                  \
                const CODE_T *qs = qs1;                                                                        \
                const float *d = d1, *m = m1;                                                                  \
                (void)m;                                                                                       \
                BLOCK_MACRO(b, l, h)                                                                           \
                lo1 = l, hi1 = h;                                                                              \
            }                                                                                                  \
            for (int r = 0; r < MR; r++) {                                                                     \
                const float *xr = x + r * ldx + b * BLOCK;                                                     \
                const v16f xl = load16(xr), xh = load16(xr + 16);                                              \
                a0[r] += lo0 * xl;                                                                             \
                a1[r] += lo1 * xl;                                                                             \
                a0[r] += hi0 * xh;                                                                             \
                a1[r] += hi1 * xh;                                                                             \
            }                                                                                                  \
        }                                                                                                      \
        for (int r = 0; r < MR; r++) out0[r] = hsum16(a0[r]), out1[r] = hsum16(a1[r]);                       \
    }
#define DEFINE_Q4_PAIR(MR) DEFINE_PAIR(q4_pair, uint8_t, Q4_BLOCK, MR)
#define DEFINE_Q8_PAIR(MR) DEFINE_PAIR(q8_pair, int8_t, Q8_BLOCK, MR)

DEFINE_Q4_ROW(1)
DEFINE_Q4_ROW(2)
DEFINE_Q4_ROW(3)
DEFINE_Q4_ROW(4)
DEFINE_Q4_ROW(5)
DEFINE_Q4_ROW(6)
DEFINE_Q4_ROW(7)
DEFINE_Q4_ROW(8)
DEFINE_Q8_ROW(1)
DEFINE_Q8_ROW(2)
DEFINE_Q8_ROW(3)
DEFINE_Q8_ROW(4)
DEFINE_Q8_ROW(5)
DEFINE_Q8_ROW(6)
DEFINE_Q8_ROW(7)
DEFINE_Q8_ROW(8)

DEFINE_Q4_PAIR(2)
DEFINE_Q8_PAIR(2)
DEFINE_Q4_PAIR(3)
DEFINE_Q8_PAIR(3)
DEFINE_Q4_PAIR(4)
DEFINE_Q8_PAIR(4)
DEFINE_Q4_PAIR(5)
DEFINE_Q8_PAIR(5)
DEFINE_Q4_PAIR(6)
DEFINE_Q8_PAIR(6)
DEFINE_Q4_PAIR(7)
DEFINE_Q8_PAIR(7)
DEFINE_Q4_PAIR(8)
DEFINE_Q8_PAIR(8)

typedef void (*row_fn)(const float *, int64_t, int64_t, const void *, const float *, const float *, float *);
typedef void (*pair_fn)(const float *, int64_t, int64_t, const void *, const float *, const float *, const void *,
                        const float *, const float *, float *, float *);
static const pair_fn Q4_PAIRS[MAX_ROWS + 1] = {
    0, 0, (pair_fn)q4_pair_2, (pair_fn)q4_pair_3, (pair_fn)q4_pair_4,
    (pair_fn)q4_pair_5, (pair_fn)q4_pair_6, (pair_fn)q4_pair_7, (pair_fn)q4_pair_8};
static const pair_fn Q8_PAIRS[MAX_ROWS + 1] = {
    0, 0, (pair_fn)q8_pair_2, (pair_fn)q8_pair_3, (pair_fn)q8_pair_4,
    (pair_fn)q8_pair_5, (pair_fn)q8_pair_6, (pair_fn)q8_pair_7, (pair_fn)q8_pair_8};

static const row_fn Q4_ROWS[MAX_ROWS + 1] = {
    0, (row_fn)q4_row_1, (row_fn)q4_row_2, (row_fn)q4_row_3, (row_fn)q4_row_4,
    (row_fn)q4_row_5, (row_fn)q4_row_6, (row_fn)q4_row_7, (row_fn)q4_row_8};
static const row_fn Q8_ROWS[MAX_ROWS + 1] = {
    0, (row_fn)q8_row_1, (row_fn)q8_row_2, (row_fn)q8_row_3, (row_fn)q8_row_4,
    (row_fn)q8_row_5, (row_fn)q8_row_6, (row_fn)q8_row_7, (row_fn)q8_row_8};

/* y[r * ldy + n] = sum_k x[r * ldx + k] * W[n, k] (+ bias[n]) for r < M (any M: tiles of 8 rows).
 * codes: (N, K * bits / 8) bytes; d, m: (N, K / 32) fp32 (m unused for Q8). */
static void qgemm(const row_fn *rows, int bytes_per_block, const float *x, int64_t M, int64_t ldx, int64_t K,
                  const uint8_t *codes, const float *d, const float *m, int64_t N, const float *bias, float *y,
                  int64_t ldy) {
    const int64_t nb = K / BLOCK;
    const int64_t row_bytes = nb * bytes_per_block;
    const int64_t chunk = 8;
    const int64_t nchunks = (N + chunk - 1) / chunk;
    float xsum_stack[512];
    float *xsum = 0;
    if (M == 1 && rows == Q4_ROWS) { /* the factorised single-row kernel needs x's block sums */
        xsum = nb <= 512 ? xsum_stack : (float *)malloc(nb * sizeof(float));
        for (int64_t b = 0; b < nb; b++) {
            float s = 0.f;
            for (int j = 0; j < BLOCK; j++) s += x[b * BLOCK + j];
            xsum[b] = s;
        }
    }
#pragma omp parallel for schedule(static) if (nchunks > 1 && (M * N * K) > (1 << 16))
    for (int64_t c = 0; c < nchunks; c++) {
        const int64_t n0 = c * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
        float out[MAX_ROWS];
        for (int64_t r0 = 0; r0 < M; r0 += MAX_ROWS) {
            const int64_t mr = M - r0 < MAX_ROWS ? M - r0 : MAX_ROWS;
            for (int64_t n = n0; n < n1; n++) {
                if (M == 1) {
                    if (xsum)
                        q4_row_fact(x, nb, codes + n * row_bytes, d + n * nb, m + n * nb, xsum, out);
                    else
                        q8_row_fact(x, nb, (const int8_t *)(codes + n * row_bytes), d + n * nb, out);
                    y[n] = out[0] + (bias ? bias[n] : 0.f);
                    continue;
                }
                if (mr >= 2 && n + 1 < n1) { /* two features at a time */
                    const pair_fn pf = (rows == Q4_ROWS ? Q4_PAIRS : Q8_PAIRS)[mr];
                    float out1[MAX_ROWS];
                    pf(x + r0 * ldx, ldx, nb, codes + n * row_bytes, d + n * nb, m ? m + n * nb : 0,
                       codes + (n + 1) * row_bytes, d + (n + 1) * nb, m ? m + (n + 1) * nb : 0, out, out1);
                    const float b0 = bias ? bias[n] : 0.f, b1 = bias ? bias[n + 1] : 0.f;
                    for (int64_t r = 0; r < mr; r++) {
                        y[(r0 + r) * ldy + n] = out[r] + b0;
                        y[(r0 + r) * ldy + n + 1] = out1[r] + b1;
                    }
                    n++;
                    continue;
                }
                rows[mr](x + r0 * ldx, ldx, nb, codes + n * row_bytes, d + n * nb, m ? m + n * nb : 0, out);
                const float bn = bias ? bias[n] : 0.f;
                for (int64_t r = 0; r < mr; r++) y[(r0 + r) * ldy + n] = out[r] + bn;
            }
        }
    }
    if (xsum && xsum != xsum_stack) free(xsum);
}

void wl_q4_gemm(const float *x, int64_t M, int64_t ldx, int64_t K, const uint8_t *codes, const float *d,
                const float *m, int64_t N, const float *bias, float *y, int64_t ldy) {
    qgemm(Q4_ROWS, 16, x, M, ldx, K, codes, d, m, N, bias, y, ldy);
}

void wl_q8_gemm(const float *x, int64_t M, int64_t ldx, int64_t K, const int8_t *codes, const float *d,
                int64_t N, const float *bias, float *y, int64_t ldy) {
    qgemm(Q8_ROWS, 32, x, M, ldx, K, (const uint8_t *)codes, d, 0, N, bias, y, ldy);
}

void wl_dequant_q4(const uint8_t *codes, const float *d, const float *m, int64_t N, int64_t K, float *w) {
    const int64_t nb = K / BLOCK;
#pragma omp parallel for schedule(static) if (N * K > (1 << 16))
    for (int64_t n = 0; n < N; n++) {
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *q = codes + (n * nb + b) * 16;
            const float db = d[n * nb + b], mb = m[n * nb + b];
            float *o = w + n * K + b * BLOCK;
            for (int j = 0; j < 16; j++) {
                o[j] = (float)(q[j] & 15) * db + mb;
                o[j + 16] = (float)(q[j] >> 4) * db + mb;
            }
        }
    }
}

void wl_dequant_q8(const int8_t *codes, const float *d, int64_t N, int64_t K, float *w) {
    const int64_t nb = K / BLOCK;
#pragma omp parallel for schedule(static) if (N * K > (1 << 16))
    for (int64_t n = 0; n < N; n++)
        for (int64_t b = 0; b < nb; b++)
            for (int j = 0; j < BLOCK; j++)
                w[n * K + b * BLOCK + j] = (float)codes[(n * nb + b) * BLOCK + j] * d[n * nb + b];
}

/* ---- elementwise layers ------------------------------------------------------------------------------- */

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

/* exp(x) for x <= 0..88 in fp32: Cody-Waite reduction and a degree-6 polynomial (about 1 ulp), vectorisable. */
static inline float exp_approx(float x) {
    x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
    const float n = __builtin_rintf(x * 1.44269504088896341f);
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = (p * r * r + r) + 1.0f;
    int32_t e = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, 4);
    return p * scale;
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

/* ---- paged attention ---------------------------------------------------------------------------------- */


/* ---- paged attention, split over the context (flash-decoding) -------------------------------------------- */

#define SPLIT_KEYS 128 /* keys per work item: long contexts spread over every thread */

#if defined(__clang__)
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUF(a, b, ...) __builtin_shuffle(a, b, (v16i){__VA_ARGS__})
#endif

/* out[k] = sum of the 16 lanes of a[k]: a transposing add tree (30 shuffles, 15 adds for 16 sums). */
static inline v16f reduce16x16(const v16f a[16]) {
    v16f b[8], c[4], d[2];
    for (int i = 0; i < 8; i++)
        b[i] = SHUF(a[i], a[i + 8], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               SHUF(a[i], a[i + 8], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; i++)
        c[i] = SHUF(b[i], b[i + 4], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
               SHUF(b[i], b[i + 4], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++)
        d[i] = SHUF(c[i], c[i + 2], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
               SHUF(c[i], c[i + 2], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    return SHUF(d[0], d[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
           SHUF(d[0], d[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}

/* One work item: query token t of request r, kv head kvh, keys [j0, j1), for the `group` query heads sharing kvh.
 * Writes, per head, the unnormalised partial output (D floats) then its running max and sum. D % 16 == 0. */
static void attention_chunk(const float *q, int64_t q_stride, const float *kc, const float *vc, int64_t t,
                            const int32_t *table, int64_t block_size, int64_t j0, int64_t j1, int64_t KVH,
                            int64_t kvh, int64_t group, int64_t D, float scale, float *part) {
    const int64_t nv = D / 16;
    v16f qv[8][16]; /* group <= 8, D <= 256 */
    for (int64_t g = 0; g < group; g++)
        for (int64_t c = 0; c < nv; c++) qv[g][c] = load16(q + t * q_stride + (kvh * group + g) * D + c * 16) * scale;
    float sc[8][SPLIT_KEYS + 16];
    float mx[8];
    for (int64_t g = 0; g < group; g++) mx[g] = -INFINITY;
    const float *kp[SPLIT_KEYS]; /* each key row of the chunk, a block-table entry at a time */
    const int64_t n = j1 - j0;
    for (int64_t j = j0; j < j1;) {
        const int64_t off = j % block_size, run = block_size - off < j1 - j ? block_size - off : j1 - j;
        const float *kv = kc + (((int64_t)table[j / block_size] * block_size + off) * KVH + kvh) * D;
        for (int64_t u = 0; u < run; u++, j++, kv += KVH * D) kp[j - j0] = kv;
    }
    for (int64_t g = 0; g < group; g++) {
        v16f m16 = (v16f){0} - INFINITY;
        for (int64_t j = 0; j < n; j += 16) { /* 16 keys' dot products, then one transposing reduction */
            v16f acc[16];
            for (int64_t u = 0; u < 16; u++) {
                if (j + u < n) {
                    const float *kv = kp[j + u];
                    v16f a = qv[g][0] * load16(kv);
                    for (int64_t c = 1; c < nv; c++) a += qv[g][c] * load16(kv + c * 16);
                    acc[u] = a;
                } else {
                    acc[u] = (v16f){0};
                }
            }
            const v16f s16 = reduce16x16(acc);
            memcpy(&sc[g][j], &s16, 64);
            const int64_t valid = n - j < 16 ? n - j : 16;
            for (int64_t u = 0; u < valid; u++) m16[u] = s16[u] > m16[u] ? s16[u] : m16[u];
        }
        float m = -INFINITY;
        for (int u = 0; u < 16; u++) m = m16[u] > m ? m16[u] : m;
        mx[g] = m;
    }
    for (int64_t g = 0; g < group; g++) {
        float total = 0.f;
        const float m = mx[g];
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < n; j++) {
            const float e = exp_approx(sc[g][j] - m);
            sc[g][j] = e;
            total += e;
        }
        float *pg = part + g * (D + 2);
        pg[D] = m;
        pg[D + 1] = total;
    }
    v16f o[8][16];
    for (int64_t g = 0; g < group; g++)
        for (int64_t c = 0; c < nv; c++) o[g][c] = (v16f){0};
    for (int64_t j = j0; j < j1;) {
        const int64_t off = j % block_size, run = block_size - off < j1 - j ? block_size - off : j1 - j;
        const float *vv = vc + (((int64_t)table[j / block_size] * block_size + off) * KVH + kvh) * D;
        for (int64_t u = 0; u < run; u++, j++, vv += KVH * D) {
            for (int64_t c = 0; c < nv; c++) {
                const v16f x = load16(vv + c * 16);
                for (int64_t g = 0; g < group; g++) o[g][c] += sc[g][j - j0] * x;
            }
        }
    }
    for (int64_t g = 0; g < group; g++)
        for (int64_t c = 0; c < nv; c++) memcpy(part + g * (D + 2) + c * 16, &o[g][c], 64);
}

static void attention_split(const float *q, int64_t q_stride, const float *kc, const float *vc,
                            const int32_t *query_start_loc, const int32_t *seq_lens, const int32_t *block_table,
                            int64_t max_blocks, int64_t block_size, int64_t R, int64_t H, int64_t KVH, int64_t D,
                            float scale, float *out) {
    const int64_t n_real = query_start_loc[R], group = H / KVH;
    /* per token: its request, context length and first chunk index */
    int64_t *tok_req = (int64_t *)malloc((n_real + 1) * 3 * sizeof(int64_t));
    int64_t *tok_ctx = tok_req + n_real + 1, *tok_first = tok_ctx + n_real + 1;
    int64_t items = 0;
    for (int64_t r = 0, t = 0; r < R; r++) {
        const int64_t q_len = query_start_loc[r + 1] - query_start_loc[r];
        for (int64_t i = 0; i < q_len; i++, t++) {
            tok_req[t] = r;
            tok_ctx[t] = seq_lens[r] - q_len + i + 1; /* causal: keys [0, ctx) */
            tok_first[t] = items;
            items += (tok_ctx[t] + SPLIT_KEYS - 1) / SPLIT_KEYS;
        }
    }
    tok_first[n_real] = items;
    float *parts = (float *)malloc(items * KVH * group * (D + 2) * sizeof(float));
#pragma omp parallel if (items * KVH > 1)
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items * KVH; it++) {
            const int64_t chunk = it / KVH, kvh = it % KVH;
            int64_t lo = 0, hi = n_real; /* the token whose chunks contain `chunk` */
            while (hi - lo > 1) {
                const int64_t mid = (lo + hi) / 2;
                if (tok_first[mid] <= chunk) lo = mid; else hi = mid;
            }
            const int64_t t = lo, j0 = (chunk - tok_first[t]) * SPLIT_KEYS;
            const int64_t j1 = j0 + SPLIT_KEYS < tok_ctx[t] ? j0 + SPLIT_KEYS : tok_ctx[t];
            attention_chunk(q, q_stride, kc, vc, t, block_table + tok_req[t] * max_blocks, block_size, j0, j1, KVH,
                            kvh, group, D, scale, parts + (chunk * KVH + kvh) * group * (D + 2));
        }
#pragma omp for schedule(static)
        for (int64_t th = 0; th < n_real * H; th++) { /* merge each (token, head)'s chunks */
            const int64_t t = th / H, h = th % H, kvh = h / group, g = h % group;
            float m = -INFINITY;
            for (int64_t c = tok_first[t]; c < tok_first[t + 1]; c++) {
                const float mc = parts[((c * KVH + kvh) * group + g) * (D + 2) + D];
                m = mc > m ? mc : m;
            }
            float *o = out + t * H * D + h * D, total = 0.f;
            for (int64_t i = 0; i < D; i++) o[i] = 0.f;
            for (int64_t c = tok_first[t]; c < tok_first[t + 1]; c++) {
                const float *pc = parts + ((c * KVH + kvh) * group + g) * (D + 2);
                const float w = exp_approx(pc[D] - m);
                total += w * pc[D + 1];
#pragma omp simd
                for (int64_t i = 0; i < D; i++) o[i] += w * pc[i];
            }
            const float inv = 1.0f / total;
            for (int64_t i = 0; i < D; i++) o[i] *= inv;
        }
    }
    free(parts);
    free(tok_req);
}

/* Cache layout (2, num_slots, KVH, D) with slot = block * block_size + offset (weavelm's default layout).
 * q: (T, q_stride) rows holding H heads of D; k, v: (T, kv_stride) rows holding KVH heads.
 * query_start_loc: (R + 1,) int32; seq_lens: (R,) int32 (context after this step); block_table: (R, max_blocks)
 * int32; slot_mapping: (T_real,) int64. out: (T, H * D); rows past query_start_loc[R] are zeroed. */
void wl_paged_attention(const float *q, int64_t q_stride, const float *k, int64_t k_stride, const float *v,
                        int64_t v_stride, float *cache, int64_t num_slots, const int64_t *slot_mapping,
                        int64_t n_new, const int32_t *query_start_loc, const int32_t *seq_lens,
                        const int32_t *block_table, int64_t max_blocks, int64_t block_size, int64_t R, int64_t H,
                        int64_t KVH, int64_t D, float scale, float *out, int64_t T) {
    float *kc = cache, *vc = cache + num_slots * KVH * D;
    for (int64_t t = 0; t < n_new; t++) {
        const int64_t slot = slot_mapping[t];
        if (slot < 0) continue;
        memcpy(kc + slot * KVH * D, k + t * k_stride, KVH * D * sizeof(float));
        memcpy(vc + slot * KVH * D, v + t * v_stride, KVH * D * sizeof(float));
    }
    const int64_t n_real = query_start_loc[R];
    for (int64_t t = n_real; t < T; t++) memset(out + t * H * D, 0, H * D * sizeof(float));
    const int64_t group = H / KVH;
    if (D % 16 == 0 && D <= 256 && group <= 8) {
        attention_split(q, q_stride, kc, vc, query_start_loc, seq_lens, block_table, max_blocks, block_size, R,
                        H, KVH, D, scale, out);
        return;
    }
    /* generic path (any head size; group <= 64). Work items: (token, kv head), each covering the `group` query heads that share that kv head, so every key and
     * value row is read once per group; each item finds its request by a search over query_start_loc */
    const int64_t items = n_real * KVH;
#pragma omp parallel if (items > 1)
    {
        float *scores = 0;
        int64_t cap = 0;
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            const int64_t t = it / KVH, kvh = it % KVH;
            int64_t r = 0;
            while (query_start_loc[r + 1] <= t) r++;
            const int64_t q_len = query_start_loc[r + 1] - query_start_loc[r];
            const int64_t ctx = seq_lens[r] - q_len + (t - query_start_loc[r]) + 1; /* causal: keys [0, ctx) */
            if (ctx * group > cap) {
                free(scores);
                cap = ctx * group + 1024;
                scores = (float *)malloc(cap * sizeof(float));
            }
            const int32_t *table = block_table + r * max_blocks;
            float mx[64], sum[64];
            for (int64_t g = 0; g < group; g++) mx[g] = -INFINITY, sum[g] = 0.f;
            for (int64_t j0 = 0; j0 < ctx; j0 += block_size) {
                const int64_t base = (int64_t)table[j0 / block_size] * block_size;
                const int64_t n = ctx - j0 < block_size ? ctx - j0 : block_size;
                for (int64_t o = 0; o < n; o++) {
                    const float *kv = kc + ((base + o) * KVH + kvh) * D;
                    for (int64_t g = 0; g < group; g++) {
                        const float *qv = q + t * q_stride + (kvh * group + g) * D;
                        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
                        for (int64_t i = 0; i < D; i++) acc += qv[i] * kv[i];
                        acc *= scale;
                        scores[g * ctx + j0 + o] = acc;
                        mx[g] = acc > mx[g] ? acc : mx[g];
                    }
                }
            }
            for (int64_t g = 0; g < group; g++) {
                float *sg = scores + g * ctx, total = 0.f;
                const float m = mx[g];
#pragma omp simd reduction(+ : total)
                for (int64_t j = 0; j < ctx; j++) {
                    const float e = exp_approx(sg[j] - m);
                    sg[j] = e;
                    total += e;
                }
                sum[g] = total;
                float *o = out + t * H * D + (kvh * group + g) * D;
                for (int64_t i = 0; i < D; i++) o[i] = 0.f;
            }
            for (int64_t j0 = 0; j0 < ctx; j0 += block_size) {
                const int64_t base = (int64_t)table[j0 / block_size] * block_size;
                const int64_t n = ctx - j0 < block_size ? ctx - j0 : block_size;
                for (int64_t o = 0; o < n; o++) {
                    const float *vv = vc + ((base + o) * KVH + kvh) * D;
                    for (int64_t g = 0; g < group; g++) {
                        float *og = out + t * H * D + (kvh * group + g) * D;
                        const float p = scores[g * ctx + j0 + o];
#pragma omp simd
                        for (int64_t i = 0; i < D; i++) og[i] += p * vv[i];
                    }
                }
            }
            for (int64_t g = 0; g < group; g++) {
                float *og = out + t * H * D + (kvh * group + g) * D;
                const float inv = 1.0f / sum[g];
                for (int64_t i = 0; i < D; i++) og[i] *= inv;
            }
        }
        free(scores);
    }
}

/* ---- a whole decoder stack in one call (Llama / Mistral / Qwen2 / Qwen3 shapes) ----------------------- */

typedef struct {
    int64_t kind; /* 0: 4-bit blocks (codes, d, m); 1: int8 blocks (codes, d) */
    const void *codes;
    const float *d;
    const float *m;
    const float *bias; /* or NULL */
    int64_t n, k;
} WLinear;

typedef struct {
    const float *input_norm, *post_norm;
    const float *q_norm, *k_norm; /* per-head RMSNorm weights (Qwen3) or NULL */
    WLinear qkv, o, gate_up, down;
    float *kv_cache;
} WLayer;

typedef struct {
    int64_t T, R, H, KVH, D, hidden, inter, max_blocks, block_size, num_slots, n_slots;
    float eps, scale;
    const int64_t *positions, *slot_mapping;
    const int32_t *query_start_loc, *seq_lens, *block_table;
    const float *cos_cache, *sin_cache;
    float *x_norm, *qkv, *attn, *gate_up, *act; /* scratch: T x (hidden | q+2kv | H*D | 2*inter | inter) */
} WStep;

static void linear(const WLinear *l, const float *x, int64_t M, float *y) {
    if (l->kind == 0)
        qgemm(Q4_ROWS, 16, x, M, l->k, l->k, (const uint8_t *)l->codes, l->d, l->m, l->n, l->bias, y, l->n);
    else
        qgemm(Q8_ROWS, 32, x, M, l->k, l->k, (const uint8_t *)l->codes, l->d, 0, l->n, l->bias, y, l->n);
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

/* hidden (T, hidden): in, the embedding output (first layer) or the previous layer's MLP output; residual
 * (T, hidden): the running residual (ignored when first). Out: hidden = last MLP output, residual updated, as
 * weavelm's DecoderLayer loop leaves them. */
void wl_decoder_forward(const WLayer *layers, int64_t L, const WStep *s, float *hidden, float *residual,
                        int64_t first) {
    const int64_t T = s->T, q_size = s->H * s->D, kv_size = s->KVH * s->D, width = q_size + 2 * kv_size;
    for (int64_t i = 0; i < L; i++) {
        const WLayer *ly = layers + i;
        if (first && i == 0) {
            memcpy(residual, hidden, T * s->hidden * sizeof(float));
            wl_rmsnorm(hidden, 0, 0, ly->input_norm, s->eps, T, s->hidden, s->x_norm);
        } else {
            wl_rmsnorm(hidden, residual, residual, ly->input_norm, s->eps, T, s->hidden, s->x_norm);
        }
        linear(&ly->qkv, s->x_norm, T, s->qkv);
        if (ly->q_norm) wl_head_norm(s->qkv, T, width, 0, s->H, s->D, ly->q_norm, s->eps);
        if (ly->k_norm) wl_head_norm(s->qkv, T, width, q_size, s->KVH, s->D, ly->k_norm, s->eps);
        wl_rotary(s->qkv, T, width, 0, s->H, q_size, s->KVH, s->D, s->positions, s->cos_cache, s->sin_cache);
        wl_paged_attention(s->qkv, width, s->qkv + q_size, width, s->qkv + q_size + kv_size, width, ly->kv_cache,
                           s->num_slots, s->slot_mapping, s->n_slots, s->query_start_loc, s->seq_lens,
                           s->block_table, s->max_blocks, s->block_size, s->R, s->H, s->KVH, s->D, s->scale,
                           s->attn, T);
        linear(&ly->o, s->attn, T, hidden);
        wl_rmsnorm(hidden, residual, residual, ly->post_norm, s->eps, T, s->hidden, s->x_norm);
        linear(&ly->gate_up, s->x_norm, T, s->gate_up);
        wl_silu_mul(s->gate_up, T, s->inter, s->act);
        linear(&ly->down, s->act, T, hidden);
    }
}
