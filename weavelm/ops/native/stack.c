/* A whole Llama / Mistral / Qwen2 / Qwen3 decoder stack in one call (weavelm/plugins/models/native_stack.py). */
#include "common.h"

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
        wl_q4_gemm(x, M, l->k, l->k, (const uint8_t *)l->codes, l->d, l->m, l->n, l->bias, y, l->n);
    else
        wl_q8_gemm(x, M, l->k, l->k, (const int8_t *)l->codes, l->d, l->n, l->bias, y, l->n);
}

/* hidden (T, hidden): in, the embedding output; out, the last layer's MLP output. residual (T, hidden): out, the
 * running residual. As weavelm's DecoderLayer loop leaves them (the final norm adds the two). */
void wl_decoder_forward(const WLayer *layers, int64_t L, const WStep *s, float *hidden, float *residual) {
    const int64_t T = s->T, q_size = s->H * s->D, kv_size = s->KVH * s->D, width = q_size + 2 * kv_size;
    for (int64_t i = 0; i < L; i++) {
        const WLayer *ly = layers + i;
        if (i == 0) {
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
                           s->attn, T, 0); /* no window: native_stack.py declines windowed models */
        linear(&ly->o, s->attn, T, hidden);
        wl_rmsnorm(hidden, residual, residual, ly->post_norm, s->eps, T, s->hidden, s->x_norm);
        linear(&ly->gate_up, s->x_norm, T, s->gate_up);
        wl_silu_mul(s->gate_up, T, s->inter, s->act);
        linear(&ly->down, s->act, T, hidden);
    }
}
