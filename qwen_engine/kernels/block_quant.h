/* Shared by the CPU kernels: bfloat16 helpers and the block-quantized matrix (see block_quant.c for the layouts). */
#ifndef QWEN_ENGINE_BLOCK_QUANT_H
#define QWEN_ENGINE_BLOCK_QUANT_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

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

/* e^x for 16 lanes: x = n·ln2 + r with |r| ≤ ln2/2, e^r by its degree-6 Taylor polynomial (relative error
 * < 2e-7, far below bfloat16's 4e-3), then scaled by 2^n. */
static inline v16f exp16(v16f x) {
    x = v16f_max(v16f_min(x, v16f_set1(88.0f)), v16f_set1(-88.0f));
    v16f n = v16f_round(v16f_mul(x, v16f_set1(1.44269504f)));
    v16f r = v16f_fnmadd(n, v16f_set1(0.693145752f), x);
    r = v16f_fnmadd(n, v16f_set1(1.42860677e-6f), r);
    v16f p = v16f_set1(1.0f / 720);
    p = v16f_fmadd(p, r, v16f_set1(1.0f / 120));
    p = v16f_fmadd(p, r, v16f_set1(1.0f / 24));
    p = v16f_fmadd(p, r, v16f_set1(1.0f / 6));
    p = v16f_fmadd(p, r, v16f_set1(0.5f));
    p = v16f_fmadd(p, r, v16f_set1(1.0f));
    p = v16f_fmadd(p, r, v16f_set1(1.0f));
    return v16f_scale_pow2(p, n);
}

/* 16 floats rounded to bfloat16 and widened back: the value a bfloat16 tensor op would store. */
static inline v16f bf16_round_ps(v16f v) { return widen_bf16x16(round_bf16x16(v)); }

/* out = weight · bf16(x · rsqrt(mean(x²) + eps)), the statistics in float32 (n a multiple of 16): the decoder's
 * RMSNorm with its roundings. */
static inline void rms_norm_row(const uint16_t *x, const uint16_t *weight, int64_t n, float eps, uint16_t *out) {
    v16f squares = v16f_zero();
    for (int64_t i = 0; i < n; i += 16) {
        v16f v = load_bf16x16(x + i);
        squares = v16f_fmadd(v, v, squares);
    }
    v16f inverse = v16f_set1(1.0f / sqrtf(v16f_sum(squares) / (float)n + eps));
    for (int64_t i = 0; i < n; i += 16) {
        v16f normalized = bf16_round_ps(v16f_mul(load_bf16x16(x + i), inverse));
        _mm256_storeu_si256((__m256i *)(out + i), round_bf16x16(v16f_mul(load_bf16x16(weight + i), normalized)));
    }
}

/* One head in place: x·cos + rotate_half(x)·sin, each product and the sum rounded as bfloat16 tensor arithmetic
 * rounds them (rope.py's apply_rotary). d a multiple of 32; both halves are read before either is written. */
static inline void rotate_head(uint16_t *x, const uint16_t *cos, const uint16_t *sin, int64_t d) {
    int64_t half = d / 2;
    for (int64_t i = 0; i < half; i += 16) {
        v16f lo = load_bf16x16(x + i), hi = load_bf16x16(x + half + i);
        v16f new_lo = v16f_add(bf16_round_ps(v16f_mul(lo, load_bf16x16(cos + i))),
                               bf16_round_ps(v16f_mul(v16f_sub(v16f_zero(), hi), load_bf16x16(sin + i))));
        v16f new_hi = v16f_add(bf16_round_ps(v16f_mul(hi, load_bf16x16(cos + half + i))),
                               bf16_round_ps(v16f_mul(lo, load_bf16x16(sin + half + i))));
        _mm256_storeu_si256((__m256i *)(x + i), round_bf16x16(new_lo));
        _mm256_storeu_si256((__m256i *)(x + half + i), round_bf16x16(new_hi));
    }
}

/* bf16(bf16(silu(g)) · u) for 16 lanes, as the PyTorch path rounds: silu(g) = g · 1 / (1 + e^−g). */
static inline __m256i silu_mul16(v16f g, v16f u) {
    v16f silu = v16f_mul(g, v16f_reciprocal(v16f_add(v16f_set1(1.0f), exp16(v16f_sub(v16f_zero(), g)))));
    return round_bf16x16(v16f_mul(bf16_round_ps(silu), u));
}

/* out[i] = bf16(bf16(silu(gate[i])) · up[i]) for i < n (out may be gate); a last part of fewer than 16 goes through
 * a zero-padded copy. */
static inline void silu_mul_row(const uint16_t *gate, const uint16_t *up, int64_t n, uint16_t *out) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(out + i), silu_mul16(load_bf16x16(gate + i), load_bf16x16(up + i)));
    if (i < n) {
        uint16_t g[16] = {0}, u[16] = {0}, mixed[16];
        memcpy(g, gate + i, (size_t)(n - i) * 2), memcpy(u, up + i, (size_t)(n - i) * 2);
        _mm256_storeu_si256((__m256i *)mixed, silu_mul16(load_bf16x16(g), load_bf16x16(u)));
        memcpy(out + i, mixed, (size_t)(n - i) * 2);
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

/* One superblock of row n's weights (S steps from column k0) as bfloat16 in the plain column order. Its stored
 * steps form an S × 16 matrix of dwords (step × lane) whose transpose is the plain order: log2(S) rounds of perfect
 * shuffles, step j with step j + S/2, transpose it back. */
static inline __attribute__((always_inline)) void dequantize_superblock(const BlockMatrix *w, int64_t n, int64_t k0,
                                                                        int S, uint16_t *out) {
    int64_t K = w->columns;
    int five_bit = w->high_bits != NULL;
    const uint8_t *row = w->codes + n * (five_bit ? K / 2 : K), *high_bits = five_bit ? w->high_bits + n * (K / 8) : NULL;
    const uint16_t *row_scales = w->scales + n * (K / 32);
    v16i v[8], shuffled[8];
    for (int s = 0; s < S; s++) {
        int64_t k = k0 + 64 * s;
        v[s] = five_bit ? v16i_sub_i8(codes5(row + k / 2, high_bits + k / 8), 16) : v16i_sub_i8(codes8(row + k), (int8_t)128);
    }
    for (int round = 1; round < S; round *= 2) {
        for (int j = 0; j < S / 2; j++) {
            shuffled[2 * j] = v16i_interleave(v[j], v[j + S / 2], 0);
            shuffled[2 * j + 1] = v16i_interleave(v[j], v[j + S / 2], 1);
        }
        for (int j = 0; j < S; j++) v[j] = shuffled[j];
    }
    for (int step = 0; step < S; step++) {
        int64_t k = k0 + 64 * step;
        v16f part[4];
        for (int p = 0; p < 4; p++)
            part[p] = v16f_mul(v16f_from_i8(v16i_quarter(v[step], p)), v16f_set1(_cvtsh_ss(row_scales[k / 32 + p / 2])));
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
