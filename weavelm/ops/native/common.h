/* weavelm's CPU kernels, fp32 throughout: the .c files of this folder, built together into one library on first
 * use by weavelm/ops/native/__init__.py (cc -O3 -march=native -fopenmp) and called through ctypes.
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
 * - wl_head_norm: Qwen3's per-head RMSNorm in place.
 * - wl_paged_attention (attention.c): writes the new keys/values into the paged cache, then causal attention of
 *   every query token over its request's context, split into 128-key chunks across threads and merged.
 * - wl_decoder_forward (stack.c): a whole Llama-family decoder stack for a small batch, calling the above.
 *
 * Portable C with GCC vector extensions: the same source vectorises for AVX-512, AVX2 or SSE as -march=native
 * allows. Threads come from OpenMP; the library links the libgomp torch has already loaded (same soname), so it
 * shares torch's thread pool and `torch.set_num_threads`.
 */
/* This header: vector types, loads, reductions, a vectorisable exp, and the functions one file calls from
 * another. */
#pragma once
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

/* 16 bytes -> 16 int32 lanes, zero- (u8) or sign-extended (i8); GCC's generic widening of a byte vector is
 * scalar, hence the intrinsics. */
#if defined(__AVX512F__)
#define DEFINE_WIDEN(NAME, T, EXT)                                                                               \
    static inline v16i NAME(const T *p) {                                                                      \
        v16i out;                                                                                              \
        __m512i w = _mm512_cvt##EXT##_epi32(_mm_loadu_si128((const __m128i *)p));                              \
        memcpy(&out, &w, 64);                                                                                  \
        return out;                                                                                            \
    }
#elif defined(__AVX2__)
#define DEFINE_WIDEN(NAME, T, EXT)                                                                               \
    static inline v16i NAME(const T *p) {                                                                      \
        v16i out;                                                                                              \
        __m128i raw = _mm_loadu_si128((const __m128i *)p);                                                     \
        __m256i a = _mm256_cvt##EXT##_epi32(raw), b = _mm256_cvt##EXT##_epi32(_mm_srli_si128(raw, 8));         \
        memcpy(&out, &a, 32);                                                                                  \
        memcpy((char *)&out + 32, &b, 32);                                                                     \
        return out;                                                                                            \
    }
#else
#define DEFINE_WIDEN(NAME, T, EXT)                                                                               \
    static inline v16i NAME(const T *p) {                                                                      \
        v16i out;                                                                                              \
        for (int i = 0; i < 16; i++) out[i] = p[i];                                                            \
        return out;                                                                                            \
    }
#endif
DEFINE_WIDEN(widen_u8, uint8_t, epu8)
DEFINE_WIDEN(widen_i8, int8_t, epi8)

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

/* exported functions used across files */
void wl_q4_gemm(const float *x, int64_t M, int64_t ldx, int64_t K, const uint8_t *codes, const float *d,
                const float *m, int64_t N, const float *bias, float *y, int64_t ldy);
void wl_q8_gemm(const float *x, int64_t M, int64_t ldx, int64_t K, const int8_t *codes, const float *d,
                int64_t N, const float *bias, float *y, int64_t ldy);
void wl_rmsnorm(const float *x, const float *residual, float *residual_out, const float *weight, float eps,
                int64_t M, int64_t H, float *out);
void wl_silu_mul(const float *x, int64_t M, int64_t D, float *out);
void wl_rotary(float *x, int64_t T, int64_t stride, int64_t q_off, int64_t nq, int64_t k_off, int64_t nk,
               int64_t D, const int64_t *pos, const float *cos_cache, const float *sin_cache);
void wl_head_norm(float *x, int64_t T, int64_t stride, int64_t off, int64_t heads, int64_t D, const float *w,
                  float eps);
void wl_paged_attention(const float *q, int64_t q_stride, const float *k, int64_t k_stride, const float *v,
                        int64_t v_stride, float *cache, int64_t num_slots, const int64_t *slot_mapping,
                        int64_t n_new, const int32_t *query_start_loc, const int32_t *seq_lens,
                        const int32_t *block_table, int64_t max_blocks, int64_t block_size, int64_t R, int64_t H,
                        int64_t KVH, int64_t D, float scale, float *out, int64_t T, int64_t window);

