/* One decoding step (a single token) through all decoder layers in one call: the layer of model/decoder.py —
 * RMSNorm, q/k/v, RoPE, the KV-cache write, GQA attention, o, residual, RMSNorm, SwiGLU, down, residual
 * (qwen-family.md §0, §3.2). Decoding is dominated by reading weights, and between those reads the PyTorch path
 * spends ~60 small operator calls a layer; here they cost nothing. Every intermediate is rounded to bfloat16 where
 * the PyTorch path rounds it, so the two paths agree up to summation order.
 */
#include "block_quant.h"

typedef struct {
    BlockMatrix qkv, o, gate_up, down;
    const uint16_t *input_norm, *post_norm; /* RMSNorm weights [hidden] */
    int64_t window;                         /* sliding window in keys, 0 for none */
} DecodeLayer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, intermediate;
    float eps;
} DecodeShape;

static inline uint16_t round_bf16(float f) { return f32_to_bf16(f); }

static inline float dot_bf16(const uint16_t *a, const __m512 *q, int64_t d) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < d / 16; i++) acc = _mm512_fmadd_ps(load_bf16x16(a + 16 * i), q[i], acc);
    return _mm512_reduce_add_ps(acc);
}

/* Softmax attention of one query head over keys first…last of its kv head (rows of [max_len][d]), in float32. */
static void attend(const uint16_t *q, const uint16_t *keys, const uint16_t *values, int64_t first, int64_t last,
                   int64_t d, float *scores, uint16_t *out) {
    __m512 query[32], acc[32];
    float scale = 1.0f / sqrtf((float)d);
    for (int64_t i = 0; i < d / 16; i++) {
        query[i] = _mm512_mul_ps(load_bf16x16(q + 16 * i), _mm512_set1_ps(scale));
        acc[i] = _mm512_setzero_ps();
    }
    float top = -INFINITY;
    for (int64_t t = first; t <= last; t++) {
        scores[t - first] = dot_bf16(keys + t * d, query, d);
        top = fmaxf(top, scores[t - first]);
    }
    float total = 0.0f;
    for (int64_t t = first; t <= last; t++) {
        float p = expf(scores[t - first] - top);
        total += p;
        __m512 weight = _mm512_set1_ps(p);
        for (int64_t i = 0; i < d / 16; i++) acc[i] = _mm512_fmadd_ps(load_bf16x16(values + t * d + 16 * i), weight, acc[i]);
    }
    for (int64_t i = 0; i < d / 16; i++) {
        float lanes[16];
        _mm512_storeu_ps(lanes, _mm512_div_ps(acc[i], _mm512_set1_ps(total)));
        for (int j = 0; j < 16; j++) out[16 * i + j] = round_bf16(lanes[j]);
    }
}

/* hidden [H] (bfloat16, updated in place) through `count` layers at position `pos`. keys/values: the cache of layer
 * 0, [kv_heads][max_len][head_dim] bfloat16, the next layer `layer_stride` elements on. cos/sin: the rotary rows for
 * `pos` (q_cos/q_sin for queries; they differ under LogN scaling). Returns 0, or −1 on bad arguments. */
int qe_decode_layers(const DecodeLayer *layers, int64_t count, const DecodeShape *shape, uint16_t *hidden,
                     uint16_t *keys, uint16_t *values, int64_t layer_stride, int64_t max_len, int64_t pos,
                     const uint16_t *cos, const uint16_t *sin, const uint16_t *q_cos, const uint16_t *q_sin) {
    int64_t H = shape->hidden, d = shape->head_dim, heads = shape->heads, kv_heads = shape->kv_heads;
    int64_t inter = shape->intermediate;
    if (d % 32 || d > 512 || H % 64 || inter % 64 || pos < 0 || pos >= max_len || kv_heads < 1 || heads % kv_heads)
        return -1;
    int64_t group = heads / kv_heads;
    size_t qkv_size = (size_t)(heads + 2 * kv_heads) * d;
    uint16_t *normed = malloc(H * 2), *qkv = malloc(qkv_size * 2), *attn = malloc(heads * d * 2), *mixed = malloc(H * 2);
    uint16_t *gate_up = malloc(inter * 4), *act = malloc(inter * 2);
    float *scores = malloc((size_t)heads * (pos + 1) * sizeof(float));
    int status = (normed && qkv && attn && mixed && gate_up && act && scores) ? 0 : -1;
    for (int64_t l = 0; l < count && status == 0; l++) {
        const DecodeLayer *layer = &layers[l];
        uint16_t *layer_keys = keys + l * layer_stride, *layer_values = values + l * layer_stride;
        rms_norm_row(hidden, layer->input_norm, H, shape->eps, normed);
        if ((status = qe_matrix_times(&layer->qkv, normed, 1, qkv))) break;
        uint16_t *q = qkv, *k = qkv + heads * d, *v = k + kv_heads * d;
        for (int64_t h = 0; h < heads; h++) rotate_head(q + h * d, q_cos, q_sin, d);
        for (int64_t h = 0; h < kv_heads; h++) {
            rotate_head(k + h * d, cos, sin, d);
            memcpy(layer_keys + (h * max_len + pos) * d, k + h * d, (size_t)d * 2);
            memcpy(layer_values + (h * max_len + pos) * d, v + h * d, (size_t)d * 2);
        }
        int64_t first = layer->window > 0 && pos - layer->window + 1 > 0 ? pos - layer->window + 1 : 0;
#pragma omp parallel for schedule(static)
        for (int64_t h = 0; h < heads; h++) {
            int64_t g = h / group;
            attend(q + h * d, layer_keys + g * max_len * d, layer_values + g * max_len * d, first, pos, d,
                   scores + h * (pos + 1), attn + h * d);
        }
        if ((status = qe_matrix_times(&layer->o, attn, 1, mixed))) break;
        for (int64_t i = 0; i < H; i++) hidden[i] = round_bf16(bf16_to_f32(hidden[i]) + bf16_to_f32(mixed[i]));
        rms_norm_row(hidden, layer->post_norm, H, shape->eps, normed);
        if ((status = qe_matrix_times(&layer->gate_up, normed, 1, gate_up))) break;
        silu_mul_row(gate_up, gate_up + inter, inter, act);
        if ((status = qe_matrix_times(&layer->down, act, 1, mixed))) break;
        for (int64_t i = 0; i < H; i++) hidden[i] = round_bf16(bf16_to_f32(hidden[i]) + bf16_to_f32(mixed[i]));
    }
    free(normed), free(qkv), free(attn), free(mixed), free(gate_up), free(act), free(scores);
    return status ? -1 : 0;
}
