/* Paged attention over weavelm's default cache layout, straight over the block table, split over the context
 * (flash-decoding): each (token, kv head, 128-key chunk) is one work item, merged per head afterwards. Head sizes
 * that are a multiple of 16 up to 256, and up to 8 query heads per kv head (`attention_supported` in __init__.py);
 * the `cpu` backend runs anything else through SDPA. */
#include "common.h"

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
                            float scale, int64_t window, float *out) {
    const int64_t n_real = query_start_loc[R], group = H / KVH;
    /* per token: its request, first and last + 1 key, first chunk index */
    int64_t *tok_req = (int64_t *)malloc((n_real + 1) * 4 * sizeof(int64_t));
    int64_t *tok_ctx = tok_req + n_real + 1, *tok_first = tok_ctx + n_real + 1, *tok_lo = tok_first + n_real + 1;
    int64_t items = 0;
    for (int64_t r = 0, t = 0; r < R; r++) {
        const int64_t q_len = query_start_loc[r + 1] - query_start_loc[r];
        for (int64_t i = 0; i < q_len; i++, t++) {
            tok_req[t] = r;
            tok_ctx[t] = seq_lens[r] - q_len + i + 1; /* causal: keys [lo, ctx) */
            tok_lo[t] = window > 0 && tok_ctx[t] > window ? tok_ctx[t] - window : 0; /* sliding window */
            tok_first[t] = items;
            items += (tok_ctx[t] - tok_lo[t] + SPLIT_KEYS - 1) / SPLIT_KEYS;
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
            const int64_t t = lo, j0 = tok_lo[t] + (chunk - tok_first[t]) * SPLIT_KEYS;
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
 * int32; slot_mapping: (T_real,) int64. out: (T, H * D); rows past query_start_loc[R] are zeroed.
 * window > 0: a token at position p sees keys p - window + 1 .. p only (positions before are never read: their
 * blocks may have been freed). Requires D % 16 == 0, D <= 256, H / KVH <= 8. */
void wl_paged_attention(const float *q, int64_t q_stride, const float *k, int64_t k_stride, const float *v,
                        int64_t v_stride, float *cache, int64_t num_slots, const int64_t *slot_mapping,
                        int64_t n_new, const int32_t *query_start_loc, const int32_t *seq_lens,
                        const int32_t *block_table, int64_t max_blocks, int64_t block_size, int64_t R, int64_t H,
                        int64_t KVH, int64_t D, float scale, float *out, int64_t T, int64_t window) {
    float *kc = cache, *vc = cache + num_slots * KVH * D;
    for (int64_t t = 0; t < n_new; t++) {
        const int64_t slot = slot_mapping[t];
        if (slot < 0) continue;
        memcpy(kc + slot * KVH * D, k + t * k_stride, KVH * D * sizeof(float));
        memcpy(vc + slot * KVH * D, v + t * v_stride, KVH * D * sizeof(float));
    }
    const int64_t n_real = query_start_loc[R];
    for (int64_t t = n_real; t < T; t++) memset(out + t * H * D, 0, H * D * sizeof(float));
    attention_split(q, q_stride, kc, vc, query_start_loc, seq_lens, block_table, max_blocks, block_size, R, H,
                    KVH, D, scale, window, out);
}
