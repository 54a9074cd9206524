/* Shared by the CPU kernels: bfloat16 helpers and the block-quantized matrix (see block_quant.c for the layouts). */
#ifndef QWEN_ENGINE_BLOCK_QUANT_H
#define QWEN_ENGINE_BLOCK_QUANT_H

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROWS 8

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch's .to(torch.bfloat16) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline __m512 load_bf16x16(const uint16_t *x) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)x));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

/* e^x for 16 lanes: x = n·ln2 + r with |r| ≤ ln2/2, e^r by its degree-6 Taylor polynomial (relative error
 * < 2e-7, far below bfloat16's 4e-3), then scaled by 2^n. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* 16 floats to bfloat16, rounded to nearest even. */
static inline __m256i round_bf16x16(__m512 v) {
    __m512i bits = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), odd), 16);
    return _mm512_cvtepi32_epi16(rounded);
}

/* out[i] = bf16(bf16(silu(gate[i])) · up[i]) for i < n (n a multiple of 16), as the PyTorch path rounds. */
static inline void silu_mul_row(const uint16_t *gate, const uint16_t *up, int64_t n, uint16_t *out) {
    for (int64_t i = 0; i < n; i += 16) {
        __m512 g = load_bf16x16(gate + i);
        __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        __m512 rounded = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(round_bf16x16(silu)), 16));
        _mm256_storeu_si256((__m256i *)(out + i), round_bf16x16(_mm512_mul_ps(rounded, load_bf16x16(up + i))));
    }
}

/* A weight matrix [rows][columns] in blocks of 32 (high_bits NULL: 8-bit codes; else 5-bit), optional bf16 bias. */
typedef struct {
    const uint8_t *codes;
    const uint8_t *high_bits;
    const uint16_t *scales;
    const uint16_t *bias;
    int64_t rows, columns;
} BlockMatrix;

/* out[M][rows] (bfloat16) = x[M][columns] · Wᵀ (+ bias), each result rounded to bfloat16 before the bias is added,
 * as the PyTorch path rounds. M ≤ MAX_ROWS, columns a multiple of 64. Returns 0, or −1 on bad arguments. */
int qe_matrix_times(const BlockMatrix *w, const uint16_t *x, int64_t M, uint16_t *out);

#endif
