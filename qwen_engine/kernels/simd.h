/* The 16-lane vectors every kernel is written in: one 512-bit register where the build has AVX-512, or a pair of
 * 256-bit AVX2 registers (low lanes 0–7, high 8–15) otherwise. Both give each lane the same arithmetic in the same
 * order (the sums across lanes included: v16f_sum pairs them as GCC's _mm512_reduce_add_ps does), so the integer
 * block products, norms, rotations and attention sums of an AVX2 build equal the AVX-512 build's bit for bit; the
 * exceptions are named where they are (the silu reciprocal, e^x at its lowest clamp). The weights' packed layout is
 * the same for both, so one converted-weights cache serves every variant.
 *
 * Integer dot products of codes with int8 activations take VNNI's vpdpbusd where the build has it (AVX-512 VNNI, or
 * AVX-VNNI on AVX2 CPUs), else AVX2's vpmaddubsw (dot_codes below), giving the same integers.
 */
#ifndef QWEN_ENGINE_SIMD_H
#define QWEN_ENGINE_SIMD_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define QE_AVX512 1
#define QE_VNNI 1
typedef __m512 v16f;
typedef __m512i v16i; /* 64 bytes: 16 dwords or 64 int8/uint8 */
#else
#if defined(__AVXVNNI__)
#define QE_VNNI 1
#endif
typedef struct {
    __m256 lo, hi;
} v16f;
typedef struct {
    __m256i lo, hi;
} v16i;
#endif

/* Sums the 8 lanes of a 256-bit vector: halves, then pairs of pairs, then the last two (GCC's reduction order). */
static inline float sum8(__m256 v) {
    __m128 four = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    __m128 two = _mm_add_ps(four, _mm_shuffle_ps(four, four, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtss_f32(two) + _mm_cvtss_f32(_mm_shuffle_ps(two, two, 1));
}

/* 8 bfloat16 values widened to floats (exactly); 8 floats to bfloat16 (nearest even, in the low half of each dword).
 * Plain AVX2, so both builds have them. */
static inline __m256 widen_bf16x8(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
static inline __m256i bf16_bits8(__m256 v) { /* nearest even, in the low half of each dword */
    __m256i bits = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), odd), 16);
}

#ifdef QE_AVX512

static inline v16f v16f_set1(float f) { return _mm512_set1_ps(f); }
static inline v16f v16f_zero(void) { return _mm512_setzero_ps(); }
static inline v16f v16f_add(v16f a, v16f b) { return _mm512_add_ps(a, b); }
static inline v16f v16f_sub(v16f a, v16f b) { return _mm512_sub_ps(a, b); }
static inline v16f v16f_mul(v16f a, v16f b) { return _mm512_mul_ps(a, b); }
static inline v16f v16f_div(v16f a, v16f b) { return _mm512_div_ps(a, b); }
static inline v16f v16f_min(v16f a, v16f b) { return _mm512_min_ps(a, b); }
static inline v16f v16f_max(v16f a, v16f b) { return _mm512_max_ps(a, b); }
static inline v16f v16f_abs(v16f a) { return _mm512_abs_ps(a); }
static inline v16f v16f_fmadd(v16f a, v16f b, v16f c) { return _mm512_fmadd_ps(a, b, c); }   /* a·b + c */
static inline v16f v16f_fnmadd(v16f a, v16f b, v16f c) { return _mm512_fnmadd_ps(a, b, c); } /* c − a·b */
static inline v16f v16f_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void v16f_store(float *p, v16f v) { _mm512_storeu_ps(p, v); }
static inline __m256 v16f_fold(v16f v) {  /* the upper 8 lanes added to the lower 8 */
    return _mm256_add_ps(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)), _mm512_castps512_ps256(v));
}
static inline float v16f_max_lane(v16f v) { return _mm512_reduce_max_ps(v); }
static inline v16f v16f_round(v16f v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline v16f v16f_scale_pow2(v16f p, v16f n) { return _mm512_scalef_ps(p, n); } /* p · 2^n, n integral */
static inline v16f v16f_from_i32(v16i v) { return _mm512_cvtepi32_ps(v); }
static inline v16f v16f_from_i8(__m128i bytes) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)); }
static inline __m128i v16f_to_i8(v16f v) { return _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)); } /* nearest even */

/* The first n lanes (n < 16) loaded, the rest 0; stored; kept. */
static inline v16f v16f_load_first(const float *p, int n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
static inline void v16f_store_first(float *p, v16f v, int n) { _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), v); }
static inline v16f v16f_keep_first(v16f v, int n) { return _mm512_maskz_mov_ps((__mmask16)((1u << n) - 1), v); }

/* 16 bfloat16 values widened to floats (exactly). */
static inline v16f widen_bf16x16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

/* 16 floats to bfloat16, rounded to nearest even (the one-instruction conversion where the CPU has AVX-512 BF16;
 * it differs only on subnormal floats, which it flushes to zero). */
static inline __m256i round_bf16x16(v16f v) {
#ifdef __AVX512BF16__
    return (__m256i)_mm512_cvtneps_pbh(v);
#else
    __m512i bits = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), odd), 16);
    return _mm512_cvtepi32_epi16(rounded);
#endif
}

/* 1 / d to about 2^−23: the 14-bit estimate and one Newton step, cheaper than a divide. */
static inline v16f v16f_reciprocal(v16f d) {
    v16f estimate = _mm512_rcp14_ps(d);
    return _mm512_mul_ps(estimate, _mm512_fnmadd_ps(d, estimate, _mm512_set1_ps(2.0f)));
}

static inline v16i v16i_load(const void *p) { return _mm512_loadu_si512(p); }
static inline void v16i_store(void *p, v16i v) { _mm512_storeu_si512(p, v); }
static inline v16i v16i_zero(void) { return _mm512_setzero_si512(); }
static inline v16i v16i_set1_i8(int8_t b) { return _mm512_set1_epi8(b); }
static inline v16i v16i_sub_i8(v16i a, int8_t b) { return _mm512_sub_epi8(a, _mm512_set1_epi8(b)); }
static inline v16i v16i_mul_i32(v16i a, int32_t b) { return _mm512_mullo_epi32(a, _mm512_set1_epi32(b)); }

/* Dwords of a and b interleaved: a0 b0 a1 b1 … a7 b7 (from their low halves, half 0) or a8 b8 … a15 b15 (half 1). */
static inline v16i v16i_interleave(v16i a, v16i b, int half) {
    static const int32_t order[2][16] __attribute__((aligned(64))) = {
        {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23},
        {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31},
    };
    return _mm512_permutex2var_epi32(a, _mm512_load_si512(order[half]), b);
}

/* Bytes 16·p … 16·p + 15. */
static inline __m128i v16i_quarter(v16i v, int p) {
    switch (p) {
        case 0: return _mm512_extracti32x4_epi32(v, 0);
        case 1: return _mm512_extracti32x4_epi32(v, 1);
        case 2: return _mm512_extracti32x4_epi32(v, 2);
        default: return _mm512_extracti32x4_epi32(v, 3);
    }
}

/* 64 five-bit codes: nibbles (byte j: weight j low, weight 32 + j high) plus 16 where their bit in `fifth` is set. */
static inline v16i codes5(const uint8_t *nibbles, const uint8_t *high_bits) {
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    __m256i packed = _mm256_loadu_si256((const __m256i *)nibbles);
    __m256i lo = _mm256_and_si256(packed, low4), hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4);
    __m512i c = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    uint64_t fifth;
    memcpy(&fifth, high_bits, 8);
    return _mm512_mask_add_epi8(c, (__mmask64)fifth, c, _mm512_set1_epi8(16));
}

/* A superblock's block scales (2·S fp16 values) spread over its 16 lanes: lane l belongs to block S·l / 8. */
static inline v16f lane_block_scales(const uint16_t *scales, int S) {
    const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i lane_block = _mm512_srli_epi32(_mm512_mullo_epi32(lanes, _mm512_set1_epi32(S)), 3);
    __m512 present = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16((__mmask16)((1u << (2 * S)) - 1), scales));
    return _mm512_permutexvar_ps(lane_block, present);
}

/* v, with the compiler told nothing of how it was made (below, at the AVX2 one). */
static inline v16i in_order(v16i v) {
    __asm__("" : "+v"(v));
    return v;
}

#else /* AVX2: pairs of 256-bit registers */

#define PAIR(a, b, op) ((v16f){op((a).lo, (b).lo), op((a).hi, (b).hi)})
static inline v16f v16f_set1(float f) { return (v16f){_mm256_set1_ps(f), _mm256_set1_ps(f)}; }
static inline v16f v16f_zero(void) { return (v16f){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline v16f v16f_add(v16f a, v16f b) { return PAIR(a, b, _mm256_add_ps); }
static inline v16f v16f_sub(v16f a, v16f b) { return PAIR(a, b, _mm256_sub_ps); }
static inline v16f v16f_mul(v16f a, v16f b) { return PAIR(a, b, _mm256_mul_ps); }
static inline v16f v16f_div(v16f a, v16f b) { return PAIR(a, b, _mm256_div_ps); }
static inline v16f v16f_min(v16f a, v16f b) { return PAIR(a, b, _mm256_min_ps); }
static inline v16f v16f_max(v16f a, v16f b) { return PAIR(a, b, _mm256_max_ps); }
#undef PAIR
static inline v16f v16f_abs(v16f a) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    return (v16f){_mm256_and_ps(a.lo, magnitude), _mm256_and_ps(a.hi, magnitude)};
}
static inline v16f v16f_fmadd(v16f a, v16f b, v16f c) {
    return (v16f){_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
static inline v16f v16f_fnmadd(v16f a, v16f b, v16f c) {
    return (v16f){_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
static inline v16f v16f_load(const float *p) { return (v16f){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline void v16f_store(float *p, v16f v) { _mm256_storeu_ps(p, v.lo), _mm256_storeu_ps(p + 8, v.hi); }
static inline __m256 v16f_fold(v16f v) { return _mm256_add_ps(v.hi, v.lo); }
static inline float v16f_max_lane(v16f v) {
    __m256 eight = _mm256_max_ps(v.lo, v.hi);
    __m128 four = _mm_max_ps(_mm256_extractf128_ps(eight, 1), _mm256_castps256_ps128(eight));
    __m128 two = _mm_max_ps(four, _mm_shuffle_ps(four, four, _MM_SHUFFLE(1, 0, 3, 2)));
    return fmaxf(_mm_cvtss_f32(two), _mm_cvtss_f32(_mm_shuffle_ps(two, two, 1)));
}
static inline v16f v16f_round(v16f v) {
    const int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    return (v16f){_mm256_round_ps(v.lo, mode), _mm256_round_ps(v.hi, mode)};
}
/* p · 2^n for integral n in [−127, 127] by building 2^n's exponent; n = −127 gives 0 where scalef gives 2^−127·p
 * (only e^x at its clamp of −88, ~1e-38: nothing a softmax or silu can see). */
static inline __m256 scale_pow2_8(__m256 p, __m256 n) {
    __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
}
static inline v16f v16f_scale_pow2(v16f p, v16f n) { return (v16f){scale_pow2_8(p.lo, n.lo), scale_pow2_8(p.hi, n.hi)}; }
static inline v16f v16f_from_i32(v16i v) { return (v16f){_mm256_cvtepi32_ps(v.lo), _mm256_cvtepi32_ps(v.hi)}; }
static inline v16f v16f_from_i8(__m128i bytes) {
    return (v16f){_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8)))};
}
static inline __m128i v16f_to_i8(v16f v) {
    __m256i words = _mm256_packs_epi32(_mm256_cvtps_epi32(v.lo), _mm256_cvtps_epi32(v.hi)); /* lanes 0–3 8–11 4–7 12–15 */
    words = _mm256_permute4x64_epi64(words, _MM_SHUFFLE(3, 1, 2, 0));
    return _mm_packs_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
}

static inline __m256i first_lanes(int n, int from) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n - from), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline v16f v16f_load_first(const float *p, int n) {
    return (v16f){_mm256_maskload_ps(p, first_lanes(n, 0)), _mm256_maskload_ps(p + 8, first_lanes(n, 8))};
}
static inline void v16f_store_first(float *p, v16f v, int n) {
    _mm256_maskstore_ps(p, first_lanes(n, 0), v.lo), _mm256_maskstore_ps(p + 8, first_lanes(n, 8), v.hi);
}
static inline v16f v16f_keep_first(v16f v, int n) {
    return (v16f){_mm256_and_ps(v.lo, _mm256_castsi256_ps(first_lanes(n, 0))),
                  _mm256_and_ps(v.hi, _mm256_castsi256_ps(first_lanes(n, 8)))};
}

static inline v16f widen_bf16x16(__m256i h) {
    return (v16f){widen_bf16x8(_mm256_castsi256_si128(h)), widen_bf16x8(_mm256_extracti128_si256(h, 1))};
}

static inline __m256i round_bf16x16(v16f v) {
    __m256i words = _mm256_packus_epi32(bf16_bits8(v.lo), bf16_bits8(v.hi)); /* lanes 0–3 8–11 4–7 12–15 */
    return _mm256_permute4x64_epi64(words, _MM_SHUFFLE(3, 1, 2, 0));
}

/* 1 / d by a divide: AVX2's 12-bit estimate would need two Newton steps, and still differ from AVX-512's. */
static inline v16f v16f_reciprocal(v16f d) { return v16f_div(v16f_set1(1.0f), d); }

static inline v16i v16i_load(const void *p) {
    return (v16i){_mm256_loadu_si256((const __m256i *)p), _mm256_loadu_si256((const __m256i *)p + 1)};
}
static inline void v16i_store(void *p, v16i v) {
    _mm256_storeu_si256((__m256i *)p, v.lo), _mm256_storeu_si256((__m256i *)p + 1, v.hi);
}
static inline v16i v16i_zero(void) { return (v16i){_mm256_setzero_si256(), _mm256_setzero_si256()}; }
static inline v16i v16i_set1_i8(int8_t b) { return (v16i){_mm256_set1_epi8(b), _mm256_set1_epi8(b)}; }
static inline v16i v16i_sub_i8(v16i a, int8_t b) {
    return (v16i){_mm256_sub_epi8(a.lo, _mm256_set1_epi8(b)), _mm256_sub_epi8(a.hi, _mm256_set1_epi8(b))};
}
static inline v16i v16i_mul_i32(v16i a, int32_t b) {
    return (v16i){_mm256_mullo_epi32(a.lo, _mm256_set1_epi32(b)), _mm256_mullo_epi32(a.hi, _mm256_set1_epi32(b))};
}
static inline v16i v16i_interleave(v16i a, v16i b, int half) {
    __m256i x = half ? a.hi : a.lo, y = half ? b.hi : b.lo;
    __m256i low = _mm256_unpacklo_epi32(x, y), high = _mm256_unpackhi_epi32(x, y); /* x0 y0 x1 y1 | x4 y4 x5 y5 … */
    return (v16i){_mm256_permute2x128_si256(low, high, 0x20), _mm256_permute2x128_si256(low, high, 0x31)};
}
static inline __m128i v16i_quarter(v16i v, int p) {
    __m256i half = p < 2 ? v.lo : v.hi;
    return p % 2 ? _mm256_extracti128_si256(half, 1) : _mm256_castsi256_si128(half);
}

/* 32 bytes, 0xff where their bit of `bits` is set (byte i: bit i). */
static inline __m256i bit_bytes(uint32_t bits) {
    const __m256i which = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3,
                                           3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), which);
    return _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
}
static inline v16i codes5(const uint8_t *nibbles, const uint8_t *high_bits) {
    const __m256i low4 = _mm256_set1_epi8(0x0f), sixteen = _mm256_set1_epi8(16);
    __m256i packed = _mm256_loadu_si256((const __m256i *)nibbles);
    __m256i lo = _mm256_and_si256(packed, low4), hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4);
    uint32_t fifth[2];
    memcpy(fifth, high_bits, 8);
    return (v16i){_mm256_add_epi8(lo, _mm256_and_si256(bit_bytes(fifth[0]), sixteen)),
                  _mm256_add_epi8(hi, _mm256_and_si256(bit_bytes(fifth[1]), sixteen))};
}

static inline v16f lane_block_scales(const uint16_t *scales, int S) {
    float lanes[16];
    for (int l = 0; l < 16; l++) lanes[l] = _cvtsh_ss(scales[S * l / 8]);
    return v16f_load(lanes);
}

/* v, with the compiler told nothing of how it was made: integer sums after it cannot be regrouped with those before,
 * and a vector loaded into it stays one load, not one folded into each instruction that uses it. GCC otherwise turns
 * a chain of additions into a tree over a whole unrolled superblock, whose partial sums no longer fit AVX2's 16
 * registers and go through the stack (measured: 8-bit products 15% faster, 5-bit 5%, with the chain). */
static inline v16i in_order(v16i v) {
    __asm__("" : "+x"(v.lo), "+x"(v.hi));
    return v;
}

#ifndef QE_VNNI
static inline __m256i add_pairs(__m256i acc, __m256i pairs) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
#endif

#endif

static inline float v16f_sum(v16f v) { return sum8(v16f_fold(v)); }

/* v16f_sum of 8 vectors at once, lane j of the result that of v[j]: the same additions of the same pairs, with the
 * vectors' halves, quarters and pairs of lanes brought together across vectors by shuffles instead of one by one. */
static inline __m256 v16f_sum8(const v16f v[8]) {
    __m256 four[4], two[2];
    for (int p = 0; p < 4; p++) {  /* four[p]: sum8's four for v[2p] (low 128 bits), v[2p + 1] (high) */
        __m256 a = v16f_fold(v[2 * p]), b = v16f_fold(v[2 * p + 1]);
        four[p] = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x31), _mm256_permute2f128_ps(a, b, 0x20));
    }
    for (int p = 0; p < 2; p++)  /* two[p]: sum8's two (lanes 0, 1) for v[4p], v[4p + 2] (low); v[4p + 1], v[4p + 3] */
        two[p] = _mm256_add_ps(_mm256_shuffle_ps(four[2 * p], four[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                               _mm256_shuffle_ps(four[2 * p], four[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    __m256 sums = _mm256_hadd_ps(two[0], two[1]);  /* v[0], v[2], v[4], v[6] | v[1], v[3], v[5], v[7] */
    return _mm256_permutevar8x32_ps(sums, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* v16f_sum of 16 vectors at once, lane j of the result that of v[j]: the same pairs again. With AVX-512 each step
 * adds two vectors' halves (then quarters, pairs, lanes) in one instruction, where v16f_sum8 adds one's (measured:
 * ~40% fewer instructions than two of those). */
static inline v16f v16f_sum16(const v16f v[16]) {
#ifdef QE_AVX512
    __m512 eight[8], four[4], two[2];
    for (int p = 0; p < 8; p++)  /* eight[p]: v[2p]'s upper 8 lanes + its lower 8 (low half), v[2p + 1]'s (high) */
        eight[p] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)),
                                 _mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)));
    for (int p = 0; p < 4; p++)  /* four[p]: those 8 lanes' upper 4 + lower 4, of v[4p] … v[4p + 3] a quarter each */
        four[p] = _mm512_add_ps(_mm512_shuffle_f32x4(eight[2 * p], eight[2 * p + 1], _MM_SHUFFLE(3, 1, 3, 1)),
                                _mm512_shuffle_f32x4(eight[2 * p], eight[2 * p + 1], _MM_SHUFFLE(2, 0, 2, 0)));
    for (int p = 0; p < 2; p++)  /* two[p], quarter k: lanes 0 + 2 and 1 + 3 of v[8p + k], then of v[8p + 4 + k] */
        two[p] = _mm512_add_ps(_mm512_shuffle_ps(four[2 * p], four[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                               _mm512_shuffle_ps(four[2 * p], four[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    /* quarter k, lane j: the sum of v[4j + k] */
    __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(two[0], two[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_ps(two[0], two[1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), sums);
#else
    return (v16f){v16f_sum8(v), v16f_sum8(v + 8)};
#endif
}

static inline v16i codes8(const uint8_t *codes) { return v16i_load(codes); }

/* Dot products of block codes (8-bit: 0–255, offset 128; 5-bit: 0–31, offset 16) with int8 activations q, summed
 * per dword of 4 bytes. `five_bit` is a constant at every call, so each format compiles to its own loop.
 *
 * With VNNI every code stays unsigned: dot_codes is vpdpbusd, and the activations' lane_start (−offset · Σ q)
 * takes the offset out. Without it, vpmaddubsw multiplies unsigned by signed bytes into int16 pairs that saturate
 * past 32767: 5-bit codes (2 · 31 · 127 at most) go in unsigned as with VNNI; 8-bit codes are made signed first
 * (w = code − 128, lane_start 0) and multiplied by the sign trick, |w| · sign(q, w) (2 · 128 · 127 at most). */
static inline int codes_take_lane_start(int five_bit) {
#ifdef QE_VNNI
    (void)five_bit;
    return 1;
#else
    return five_bit;
#endif
}

static inline v16i codes_for_dots(v16i codes, int five_bit) {
    return codes_take_lane_start(five_bit) ? codes : v16i_sub_i8(codes, (int8_t)128);
}

static inline v16i dot_codes(v16i acc, v16i codes, v16i q, int five_bit) {
#if defined(QE_AVX512)
    (void)five_bit;
    return _mm512_dpbusd_epi32(acc, codes, q);
#elif defined(QE_VNNI)
    (void)five_bit;
    return (v16i){_mm256_dpbusd_avx_epi32(acc.lo, codes.lo, q.lo), _mm256_dpbusd_avx_epi32(acc.hi, codes.hi, q.hi)};
#else
    v16i sum;
    if (five_bit)
        sum = (v16i){add_pairs(acc.lo, _mm256_maddubs_epi16(codes.lo, q.lo)),
                     add_pairs(acc.hi, _mm256_maddubs_epi16(codes.hi, q.hi))};
    else
        sum = (v16i){add_pairs(acc.lo, _mm256_maddubs_epi16(_mm256_abs_epi8(codes.lo), _mm256_sign_epi8(q.lo, codes.lo))),
                     add_pairs(acc.hi, _mm256_maddubs_epi16(_mm256_abs_epi8(codes.hi), _mm256_sign_epi8(q.hi, codes.hi)))};
    return in_order(sum);
#endif
}

/* acc + the dot products of n ≤ 4 steps of codes with the activations from q (64 bytes a step). Without VNNI,
 * 5-bit codes' int16 pairs add up over the steps before one widening (4 · 2 · 31 · 127 < 32767: still exact). */
static inline __attribute__((always_inline)) v16i dot_code_steps(v16i acc, const v16i *codes, const int8_t *q, int n,
                                                                int five_bit) {
#ifndef QE_VNNI
    if (five_bit) {
        v16i x = v16i_load(q), pairs = {_mm256_maddubs_epi16(codes[0].lo, x.lo), _mm256_maddubs_epi16(codes[0].hi, x.hi)};
        for (int s = 1; s < n; s++) {
            x = v16i_load(q + 64 * s);
            pairs = in_order((v16i){_mm256_add_epi16(pairs.lo, _mm256_maddubs_epi16(codes[s].lo, x.lo)),
                                    _mm256_add_epi16(pairs.hi, _mm256_maddubs_epi16(codes[s].hi, x.hi))});
        }
        return in_order((v16i){add_pairs(acc.lo, pairs.lo), add_pairs(acc.hi, pairs.hi)});
    }
#endif
    for (int s = 0; s < n; s++) acc = dot_codes(acc, codes[s], v16i_load(q + 64 * s), five_bit);
    return acc;
}

static inline v16f load_bf16x16(const uint16_t *x) { return widen_bf16x16(_mm256_loadu_si256((const __m256i *)x)); }

#endif
