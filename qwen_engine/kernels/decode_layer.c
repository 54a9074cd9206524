/* One decoding step (one token for each of up to MAX_ROWS sequences) through all decoder layers in one call: the layer
 * of model/decoder.py —
 * RMSNorm, q/k/v, RoPE, the KV-cache write, GQA attention, o, residual, RMSNorm, SwiGLU, down, residual
 * (qwen-family.md §0, §3.2). Decoding is dominated by reading weights, and between those reads the PyTorch path
 * spends ~60 small operator calls a layer; here they cost nothing. Every intermediate is rounded to bfloat16 where
 * the PyTorch path rounds it, so the two paths agree up to summation order. Under tensor parallelism a layer holds
 * one rank's heads and MLP columns, and `reduce` sums the ranks' float32 partial o and down products where the
 * PyTorch path all-reduces them (model/parallel.py), before their one rounding.
 */
#include "block_quant.h"

#include <omp.h>

typedef struct {
    BlockMatrix qkv, o, gate_up, down;
    const uint16_t *input_norm, *post_norm; /* RMSNorm weights [hidden] */
    int64_t window;                         /* sliding window in keys, 0 for none */
} DecodeLayer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, intermediate;
    float eps;
} DecodeShape;

/* Where a sequence keeps its keys and values: position t of kv head g is at base + slots[t]·token_stride +
 * g·head_stride (slots: the paged cache's block slots of the sequence's positions). */
/* Sums `count` float32 values in place over every tensor-parallel rank (a collective all ranks enter in the same
 * order); returns 0, or non-zero when it failed. */
typedef int (*ReduceRows)(float *sums, int64_t count);

typedef struct {
    const int64_t *slots;
    int64_t token_stride, head_stride;
} KVLayout;

static inline int64_t kv_offset(const KVLayout *kv, int64_t t, int64_t g) {
    return kv->slots[t] * kv->token_stride + g * kv->head_stride;
}

#define TASK_HEADS 8 /* most query heads of one KV head attended together */

/* Softmax attention, in float32, of n ≤ TASK_HEADS query heads that share kv head g (GQA) over positions
 * first…last: each key and value row is loaded and widened once for all n. Head j's query is at q + j·d, its
 * scores at scores + j·score_stride, its output at out + j·d; its arithmetic is the same whatever n is. */
static void attend(const uint16_t *q, int64_t n, const uint16_t *keys, const uint16_t *values, const KVLayout *kv,
                   int64_t g, int64_t first, int64_t last, int64_t d, float *scores, int64_t score_stride,
                   uint16_t *out) {
    v16f query[TASK_HEADS][32], acc[TASK_HEADS][32], row[32];
    float scale = 1.0f / sqrtf((float)d), top[TASK_HEADS], total[TASK_HEADS];
    int64_t count = last - first + 1, vectors = d / 16;
    for (int64_t j = 0; j < n; j++) {
        for (int64_t i = 0; i < vectors; i++) {
            query[j][i] = v16f_mul(load_bf16x16(q + j * d + 16 * i), v16f_set1(scale));
            acc[j][i] = v16f_zero();
        }
        top[j] = -INFINITY;
    }
    for (int64_t t = first; t <= last; t++) {
        const uint16_t *key = keys + kv_offset(kv, t, g);
        for (int64_t i = 0; i < vectors; i++) row[i] = load_bf16x16(key + 16 * i);
        for (int64_t j = 0; j < n; j++) {
            v16f dot = v16f_zero();
            for (int64_t i = 0; i < vectors; i++) dot = v16f_fmadd(row[i], query[j][i], dot);
            float score = v16f_sum(dot);
            scores[j * score_stride + t - first] = score;
            top[j] = fmaxf(top[j], score);
        }
    }
    for (int64_t j = 0; j < n; j++) {  /* the exponentials 16 at a time (a masked last group), summed lane-wise */
        float *head_scores = scores + j * score_stride;
        v16f sums = v16f_zero(), shift = v16f_set1(top[j]);
        int64_t t = 0;
        for (; t + 16 <= count; t += 16) {
            v16f p = exp16(v16f_sub(v16f_load(head_scores + t), shift));
            v16f_store(head_scores + t, p);
            sums = v16f_add(sums, p);
        }
        if (t < count) {
            int present = (int)(count - t);
            v16f p = exp16(v16f_sub(v16f_load_first(head_scores + t, present), shift));
            v16f_store_first(head_scores + t, p, present);
            sums = v16f_add(sums, v16f_keep_first(p, present));
        }
        total[j] = v16f_sum(sums);
    }
    for (int64_t t = first; t <= last; t++) {
        const uint16_t *value = values + kv_offset(kv, t, g);
        for (int64_t i = 0; i < vectors; i++) row[i] = load_bf16x16(value + 16 * i);
        for (int64_t j = 0; j < n; j++) {
            v16f weight = v16f_set1(scores[j * score_stride + t - first]);
            for (int64_t i = 0; i < vectors; i++) acc[j][i] = v16f_fmadd(row[i], weight, acc[j][i]);
        }
    }
    for (int64_t j = 0; j < n; j++)
        for (int64_t i = 0; i < vectors; i++) {
            float lanes[16];
            v16f_store(lanes, v16f_div(acc[j][i], v16f_set1(total[j])));
            for (int k = 0; k < 16; k++) out[j * d + 16 * i + k] = f32_to_bf16(lanes[k]);
        }
}

static void add_rows(uint16_t *hidden, const uint16_t *delta, int64_t n) {
    for (int64_t i = 0; i < n; i++) hidden[i] = f32_to_bf16(bf16_to_f32(hidden[i]) + bf16_to_f32(delta[i]));
}

/* The residual add of a row-parallel matrix's output: one rank's partial products into `sums`, the ranks' total
 * rounded once (as one process rounds the whole product), added to hidden. No bias (Qwen's o and down have none). */
static int add_reduced(const BlockMatrix *w, const uint16_t *x, int64_t B, float *sums, ReduceRows reduce,
                       uint16_t *hidden, int64_t H) {
    int status = qe_matrix_sums(w, x, B, sums);
    if (status || (status = reduce(sums, B * H))) return -1;
    for (int64_t i = 0; i < B * H; i++)
        hidden[i] = f32_to_bf16(bf16_to_f32(hidden[i]) + bf16_to_f32(f32_to_bf16(sums[i])));
    return 0;
}

/* hidden [B][H] (bfloat16, updated in place): one token of each of B sequences (B ≤ MAX_ROWS) through `count`
 * layers, sequence b at position positions[b]. keys/values: layer 0's cache, the next layer `layer_stride` elements
 * on; token_stride/head_stride and slots (concatenated, sequence b's from slot_starts[b])
 * say where each position lives (KVLayout). cos/sin/q_cos/q_sin: [B][d] rotary rows (q_* for queries; they differ
 * under LogN scaling). reduce: NULL on one process, else the ranks' sum after o and after down. Each sequence's
 * arithmetic is independent of the others in the batch. Returns 0, or −1 on bad arguments or a failed reduce. */
int qe_decode_batch(const DecodeLayer *layers, int64_t count, const DecodeShape *shape, uint16_t *hidden, int64_t B,
                    uint16_t *keys, uint16_t *values, int64_t layer_stride, int64_t token_stride, int64_t head_stride,
                    const int64_t *slots, const int64_t *slot_starts, const int64_t *positions, const uint16_t *cos,
                    const uint16_t *sin, const uint16_t *q_cos, const uint16_t *q_sin, ReduceRows reduce) {
    int64_t H = shape->hidden, d = shape->head_dim, heads = shape->heads, kv_heads = shape->kv_heads;
    int64_t inter = shape->intermediate, longest = 0;
    if (d % 32 || d > 512 || H % 64 || inter % 64 || kv_heads < 1 || heads % kv_heads || B < 1 || B > MAX_ROWS)
        return -1;
    for (int64_t b = 0; b < B; b++) {
        if (positions[b] < 0) return -1;
        longest = positions[b] > longest ? positions[b] : longest;
    }
    int64_t group = heads / kv_heads, qkv_size = (heads + 2 * kv_heads) * d;
    /* Attention tasks: the query heads of a kv head in chunks of per_task, enough chunks to give every thread work */
    int64_t wanted = (omp_get_max_threads() + B * kv_heads - 1) / (B * kv_heads);
    int64_t per_task = (group + wanted - 1) / wanted < TASK_HEADS ? (group + wanted - 1) / wanted : TASK_HEADS;
    int64_t chunks = (group + per_task - 1) / per_task;
    uint16_t *normed = malloc(B * H * 2), *qkv = malloc(B * qkv_size * 2), *attn = malloc(B * heads * d * 2);
    uint16_t *mixed = malloc(B * H * 2), *gate_up = malloc(B * inter * 4), *act = malloc(B * inter * 2);
    float *scores = malloc((size_t)B * heads * (longest + 1) * sizeof(float)), *sums = malloc(B * H * sizeof(float));
    int status = (normed && qkv && attn && mixed && gate_up && act && scores && sums) ? 0 : -1;
    for (int64_t l = 0; l < count && status == 0; l++) {
        const DecodeLayer *layer = &layers[l];
        uint16_t *layer_keys = keys + l * layer_stride, *layer_values = values + l * layer_stride;
        for (int64_t b = 0; b < B; b++) rms_norm_row(hidden + b * H, layer->input_norm, H, shape->eps, normed + b * H);
        if ((status = qe_matrix_times(&layer->qkv, normed, B, qkv))) break;
        for (int64_t b = 0; b < B; b++) {
            uint16_t *q = qkv + b * qkv_size, *k = q + heads * d, *v = k + kv_heads * d;
            KVLayout kv = {slots + slot_starts[b], token_stride, head_stride};
            for (int64_t h = 0; h < heads; h++) rotate_head(q + h * d, q_cos + b * d, q_sin + b * d, d);
            for (int64_t g = 0; g < kv_heads; g++) {
                rotate_head(k + g * d, cos + b * d, sin + b * d, d);
                memcpy(layer_keys + kv_offset(&kv, positions[b], g), k + g * d, (size_t)d * 2);
                memcpy(layer_values + kv_offset(&kv, positions[b], g), v + g * d, (size_t)d * 2);
            }
        }
#pragma omp parallel for schedule(dynamic)
        for (int64_t task = 0; task < B * kv_heads * chunks; task++) {
            int64_t b = task / (kv_heads * chunks), g = task / chunks % kv_heads, h = g * group + task % chunks * per_task;
            int64_t pos = positions[b], n = group - (h - g * group) < per_task ? group - (h - g * group) : per_task;
            KVLayout kv = {slots + slot_starts[b], token_stride, head_stride};
            int64_t first = layer->window > 0 && pos - layer->window + 1 > 0 ? pos - layer->window + 1 : 0;
            attend(qkv + b * qkv_size + h * d, n, layer_keys, layer_values, &kv, g, first, pos, d,
                   scores + (b * heads + h) * (longest + 1), longest + 1, attn + (b * heads + h) * d);
        }
        if (reduce) {
            if ((status = add_reduced(&layer->o, attn, B, sums, reduce, hidden, H))) break;
        } else {
            if ((status = qe_matrix_times(&layer->o, attn, B, mixed))) break;
            add_rows(hidden, mixed, B * H);
        }
        for (int64_t b = 0; b < B; b++) rms_norm_row(hidden + b * H, layer->post_norm, H, shape->eps, normed + b * H);
        if ((status = qe_matrix_times(&layer->gate_up, normed, B, gate_up))) break;
        for (int64_t b = 0; b < B; b++) silu_mul_row(gate_up + b * 2 * inter, gate_up + b * 2 * inter + inter, inter, act + b * inter);
        if (reduce) {
            if ((status = add_reduced(&layer->down, act, B, sums, reduce, hidden, H))) break;
        } else {
            if ((status = qe_matrix_times(&layer->down, act, B, mixed))) break;
            add_rows(hidden, mixed, B * H);
        }
    }
    free(normed), free(qkv), free(attn), free(mixed), free(gate_up), free(act), free(scores), free(sums);
    return status ? -1 : 0;
}
