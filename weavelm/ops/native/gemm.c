/* Block-quantized GEMMs (llama.cpp's Q4 and Q8_0 blocks, fp32 activations and accumulation) and their
 * dequantization. See common.h and weavelm/ops/quant_kernels.py. */
#include "common.h"

/* ---- quantized GEMM ------------------------------------------------------------------------------------ */

/* Dequantize block `bb` of one weight row into two 16-lane halves (lo: elements 0..15, hi: 16..31). Q4: the low
 * nibbles of the block's 16 bytes are elements 0..15, the high ones 16..31 (w = d q + m); Q8: w = d q. */
#define Q4_BLOCK(bb, lo, hi)                                                                                    \
    v16i wi = widen_u8(qs + (bb) * 16);                                                                        \
    v16f dv = (v16f){0} + d[bb], mv = (v16f){0} + m[bb];                                                       \
    v16f lo = __builtin_convertvector(wi & 15, v16f) * dv + mv;                                                \
    v16f hi = __builtin_convertvector(wi >> 4, v16f) * dv + mv;
#define Q8_BLOCK(bb, lo, hi)                                                                                    \
    v16f dv = (v16f){0} + d[bb];                                                                               \
    v16f lo = __builtin_convertvector(widen_i8(qs + (bb) * BLOCK), v16f) * dv;                                 \
    v16f hi = __builtin_convertvector(widen_i8(qs + (bb) * BLOCK + 16), v16f) * dv;

/* One row, one feature, for 4-bit codes: sum_b d_b * (q_b . x_b) + sum_b m_b * sum(x_b), with the block sums of x
 * precomputed (xsum): 3 multiply-adds per block instead of 4 (the dequantizing pair kernels win from 2 rows on). */
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

/* Two output features (n0, n1) for MR (1..8, a compile-time constant per instance) activation rows: each block is
 * dequantized once for all rows, and each x load feeds both features' multiply-adds (one feature per pass was
 * bound by loads as much as by multiply-adds). An odd last feature passes itself as both. */
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

DEFINE_Q4_PAIR(1)
DEFINE_Q8_PAIR(1)
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

typedef void (*pair_fn)(const float *, int64_t, int64_t, const void *, const float *, const float *, const void *,
                        const float *, const float *, float *, float *);
static const pair_fn Q4_PAIRS[MAX_ROWS + 1] = {
    0, (pair_fn)q4_pair_1, (pair_fn)q4_pair_2, (pair_fn)q4_pair_3, (pair_fn)q4_pair_4,
    (pair_fn)q4_pair_5, (pair_fn)q4_pair_6, (pair_fn)q4_pair_7, (pair_fn)q4_pair_8};
static const pair_fn Q8_PAIRS[MAX_ROWS + 1] = {
    0, (pair_fn)q8_pair_1, (pair_fn)q8_pair_2, (pair_fn)q8_pair_3, (pair_fn)q8_pair_4,
    (pair_fn)q8_pair_5, (pair_fn)q8_pair_6, (pair_fn)q8_pair_7, (pair_fn)q8_pair_8};

/* y[r * ldy + n] = sum_k x[r * ldx + k] * W[n, k] (+ bias[n]) for r < M (any M: tiles of 8 rows).
 * codes: (N, K * bits / 8) bytes; d, m: (N, K / 32) fp32 (m unused for Q8). */
static void qgemm(int q4, const float *x, int64_t M, int64_t ldx, int64_t K, const uint8_t *codes, const float *d,
                  const float *m, int64_t N, const float *bias, float *y, int64_t ldy) {
    const int64_t nb = K / BLOCK;
    const int64_t row_bytes = nb * (q4 ? 16 : BLOCK);
    const pair_fn *pairs = q4 ? Q4_PAIRS : Q8_PAIRS;
    const int64_t chunk = 8;
    const int64_t nchunks = (N + chunk - 1) / chunk;
    float xsum_stack[512];
    float *xsum = 0;
    if (M == 1 && q4) { /* the factorised single-row kernel needs x's block sums */
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
        if (M == 1) {
            for (int64_t n = n0; n < n1; n++) {
                float out;
                if (q4)
                    q4_row_fact(x, nb, codes + n * row_bytes, d + n * nb, m + n * nb, xsum, &out);
                else
                    q8_row_fact(x, nb, (const int8_t *)(codes + n * row_bytes), d + n * nb, &out);
                y[n] = out + (bias ? bias[n] : 0.f);
            }
            continue;
        }
        float out0[MAX_ROWS], out1[MAX_ROWS];
        for (int64_t r0 = 0; r0 < M; r0 += MAX_ROWS) {
            const int64_t mr = M - r0 < MAX_ROWS ? M - r0 : MAX_ROWS;
            for (int64_t n = n0; n < n1; n += 2) {
                const int64_t nn = n + 1 < n1 ? n + 1 : n; /* an odd last feature pairs with itself */
                pairs[mr](x + r0 * ldx, ldx, nb, codes + n * row_bytes, d + n * nb, m ? m + n * nb : 0,
                          codes + nn * row_bytes, d + nn * nb, m ? m + nn * nb : 0, out0, out1);
                const float b0 = bias ? bias[n] : 0.f, b1 = bias ? bias[nn] : 0.f;
                for (int64_t r = 0; r < mr; r++) {
                    y[(r0 + r) * ldy + n] = out0[r] + b0;
                    y[(r0 + r) * ldy + nn] = out1[r] + b1;
                }
            }
        }
    }
    if (xsum && xsum != xsum_stack) free(xsum);
}

void wl_q4_gemm(const float *x, int64_t M, int64_t ldx, int64_t K, const uint8_t *codes, const float *d,
                const float *m, int64_t N, const float *bias, float *y, int64_t ldy) {
    qgemm(1, x, M, ldx, K, codes, d, m, N, bias, y, ldy);
}

void wl_q8_gemm(const float *x, int64_t M, int64_t ldx, int64_t K, const int8_t *codes, const float *d,
                int64_t N, const float *bias, float *y, int64_t ldy) {
    qgemm(0, x, M, ldx, K, (const uint8_t *)codes, d, 0, N, bias, y, ldy);
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
