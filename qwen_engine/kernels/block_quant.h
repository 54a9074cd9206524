/* Shared by the CPU kernels: bfloat16 helpers and the block-quantized matrix (see block_quant.c for the layouts). */
#ifndef QWEN_ENGINE_BLOCK_QUANT_H
#define QWEN_ENGINE_BLOCK_QUANT_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROWS 32 /* rows of activations one product takes (a serving batch's decoding steps) */

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

/* 16 floats to bfloat16, rounded to nearest even (the one-instruction conversion where the CPU has AVX-512 BF16;
 * it differs only on subnormal floats, which it flushes to zero). */
static inline __m256i round_bf16x16(__m512 v) {
#ifdef __AVX512BF16__
    return (__m256i)_mm512_cvtneps_pbh(v);
#else
    __m512i bits = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), odd), 16);
    return _mm512_cvtepi32_epi16(rounded);
#endif
}

/* 16 floats rounded to bfloat16 and widened back: the value a bfloat16 tensor op would store. */
static inline __m512 bf16_round_ps(__m512 v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(round_bf16x16(v)), 16));
}

/* out = weight · bf16(x · rsqrt(mean(x²) + eps)), the statistics in float32 (n a multiple of 16): the decoder's
 * RMSNorm with its roundings. */
static inline void rms_norm_row(const uint16_t *x, const uint16_t *weight, int64_t n, float eps, uint16_t *out) {
    __m512 squares = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        __m512 v = load_bf16x16(x + i);
        squares = _mm512_fmadd_ps(v, v, squares);
    }
    __m512 inverse = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)n + eps));
    for (int64_t i = 0; i < n; i += 16) {
        __m512 normalized = bf16_round_ps(_mm512_mul_ps(load_bf16x16(x + i), inverse));
        _mm256_storeu_si256((__m256i *)(out + i), round_bf16x16(_mm512_mul_ps(load_bf16x16(weight + i), normalized)));
    }
}

/* One head in place: x·cos + rotate_half(x)·sin, each product and the sum rounded as bfloat16 tensor arithmetic
 * rounds them (rope.py's apply_rotary). d a multiple of 32; both halves are read before either is written. */
static inline void rotate_head(uint16_t *x, const uint16_t *cos, const uint16_t *sin, int64_t d) {
    int64_t half = d / 2;
    for (int64_t i = 0; i < half; i += 16) {
        __m512 lo = load_bf16x16(x + i), hi = load_bf16x16(x + half + i);
        __m512 new_lo = _mm512_add_ps(bf16_round_ps(_mm512_mul_ps(lo, load_bf16x16(cos + i))),
                                      bf16_round_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), hi), load_bf16x16(sin + i))));
        __m512 new_hi = _mm512_add_ps(bf16_round_ps(_mm512_mul_ps(hi, load_bf16x16(cos + half + i))),
                                      bf16_round_ps(_mm512_mul_ps(lo, load_bf16x16(sin + half + i))));
        _mm256_storeu_si256((__m256i *)(x + i), round_bf16x16(new_lo));
        _mm256_storeu_si256((__m256i *)(x + half + i), round_bf16x16(new_hi));
    }
}

/* bf16(bf16(silu(g)) · u) for 16 lanes, as the PyTorch path rounds. */
static inline __m256i silu_mul16(__m512 g, __m512 u) {
    /* g / (1 + e^−g): the reciprocal by its 14-bit estimate and one Newton step (~2^−23), cheaper than a divide */
    __m512 denominator = _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)));
    __m512 estimate = _mm512_rcp14_ps(denominator);
    estimate = _mm512_mul_ps(estimate, _mm512_fnmadd_ps(denominator, estimate, _mm512_set1_ps(2.0f)));
    __m512 silu = _mm512_mul_ps(g, estimate);
    return round_bf16x16(_mm512_mul_ps(bf16_round_ps(silu), u));
}

/* out[i] = bf16(bf16(silu(gate[i])) · up[i]) for i < n (out may be gate); a last part of fewer than 16 goes through
 * masked loads. */
static inline void silu_mul_row(const uint16_t *gate, const uint16_t *up, int64_t n, uint16_t *out) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(out + i), silu_mul16(load_bf16x16(gate + i), load_bf16x16(up + i)));
    if (i < n) {
        __mmask16 tail = (__mmask16)((1u << (n - i)) - 1);
        __m512 g = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(tail, gate + i)), 16));
        __m512 u = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(tail, up + i)), 16));
        _mm256_mask_storeu_epi16(out + i, tail, silu_mul16(g, u));
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

/* The order codes (and quantized activations) are kept in along a row. The columns go in superblocks of S steps of
 * 64 (S = 8, 4, 2 or 1: the largest that fits what is left of the row). Seen as 16 lanes of S dwords each (lane l:
 * plain dwords S·l … S·l + S − 1), a superblock is stored transposed: step s, lane l holds plain dword S·l + s. As S
 * divides a block's 8 dwords, a lane meets one block only, through all S steps: integer dot products run on over the
 * whole superblock and are converted and scaled once per lane, not once per step. (S = 1 is the plain order.) */
static inline int superblock_steps(int64_t remaining) {
    return remaining >= 512 ? 8 : remaining >= 256 ? 4 : remaining >= 128 ? 2 : 1;
}

static inline __m512i codes8(const uint8_t *codes, int64_t k) {
    return _mm512_loadu_si512(codes + k);
}

static inline __m512i codes5(const uint8_t *nibbles, const uint8_t *high_bits, int64_t k) {
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    __m256i packed = _mm256_loadu_si256((const __m256i *)(nibbles + k / 2));
    __m256i lo = _mm256_and_si256(packed, low4), hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4);
    __m512i c = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    uint64_t fifth;
    memcpy(&fifth, high_bits + k / 8, 8);
    return _mm512_mask_add_epi8(c, (__mmask64)fifth, c, _mm512_set1_epi8(16));
}

/* Dwords 0–7 (row 0) and 8–15 (row 1) of two vectors, interleaved: a perfect shuffle. */
static const int32_t INTERLEAVE[2][16] __attribute__((aligned(64))) = {
    {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23},
    {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31},
};

/* One superblock of row n's weights (S steps from column k0) as bfloat16 in the plain column order. Its stored
 * steps form an S × 16 matrix of dwords (step × lane) whose transpose is the plain order: log2(S) rounds of perfect
 * shuffles, step j with step j + S/2, transpose it back. */
static inline __attribute__((always_inline)) void dequantize_superblock(const BlockMatrix *w, int64_t n, int64_t k0,
                                                                        int S, uint16_t *out) {
    int64_t K = w->columns;
    int five_bit = w->high_bits != NULL;
    const uint8_t *row = w->codes + n * (five_bit ? K / 2 : K);
    const uint16_t *row_scales = w->scales + n * (K / 32);
    const __m512i offset = _mm512_set1_epi8(five_bit ? 16 : (char)128);
    const __m512i lo = _mm512_load_si512(INTERLEAVE[0]), hi = _mm512_load_si512(INTERLEAVE[1]);
    __m512i v[8], shuffled[8];
    for (int s = 0; s < S; s++)
        v[s] = _mm512_sub_epi8(five_bit ? codes5(row, w->high_bits + n * (K / 8), k0 + 64 * s) : codes8(row, k0 + 64 * s), offset);
    for (int round = 1; round < S; round *= 2) {
        for (int j = 0; j < S / 2; j++) {
            shuffled[2 * j] = _mm512_permutex2var_epi32(v[j], lo, v[j + S / 2]);
            shuffled[2 * j + 1] = _mm512_permutex2var_epi32(v[j], hi, v[j + S / 2]);
        }
        for (int j = 0; j < S; j++) v[j] = shuffled[j];
    }
    for (int step = 0; step < S; step++) {
        int64_t k = k0 + 64 * step;
        __m512 part[4];
        for (int p = 0; p < 4; p++)
            part[p] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v[step], p))),
                                    _mm512_set1_ps(_cvtsh_ss(row_scales[k / 32 + p / 2])));
        for (int p = 0; p < 4; p++) _mm256_storeu_si256((__m256i *)(out + k + 16 * p), round_bf16x16(part[p]));
    }
}

/* Row n of W as bfloat16 in the plain column order (rounded to nearest even); columns a multiple of 64. */
static inline void dequantize_row(const BlockMatrix *w, int64_t n, uint16_t *out) {
    for (int64_t k0 = 0, S; k0 < w->columns; k0 += 64 * S) {
        S = superblock_steps(w->columns - k0);
        switch (S) {  /* S a constant in each, so the rounds unroll */
            case 8: dequantize_superblock(w, n, k0, 8, out); break;
            case 4: dequantize_superblock(w, n, k0, 4, out); break;
            case 2: dequantize_superblock(w, n, k0, 2, out); break;
            default: dequantize_superblock(w, n, k0, 1, out);
        }
    }
}

/* out[M][rows] (bfloat16) = x[M][columns] · Wᵀ (+ bias), each result rounded to bfloat16 before the bias is added,
 * as the PyTorch path rounds. M ≤ MAX_ROWS, columns a multiple of 64. Returns 0, or −1 on bad arguments. */
int qe_matrix_times(const BlockMatrix *w, const uint16_t *x, int64_t M, uint16_t *out);

/* The same products unrounded, float32, without the bias: a tensor-parallel rank's partial sums of a row-parallel
 * matrix, which the ranks add up before the one rounding. */
int qe_matrix_sums(const BlockMatrix *w, const uint16_t *x, int64_t M, float *out);

#endif
