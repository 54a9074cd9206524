/* Matrix kernels for weights stored in blocks of 32 along the input, one fp16 scale per block, as GGUF's Q8_0 and
 * Q5_0 store them (qwen-family.md §9.2), repacked so that one 16-lane step (simd.h) covers 64 weights of a row:
 *
 *   8-bit: codes[n][k] = q + 128            (uint8), w = d · (code − 128)
 *   5-bit: nibbles[n][k/2]: byte j of a 64-weight chunk holds weight j (low nibble) and weight 32 + j (high);
 *          high_bits[n][k/8]: bit i of a chunk's 64-bit word is the fifth bit of weight i;  w = d · (code − 16)
 *
 * where k counts positions in the order block_quant.h describes, not columns: along a row the columns go in
 * superblocks whose lanes each stay within one block. Decoding (a few rows of activations) quantizes the activations
 * the way llama.cpp does for these formats (int8 in blocks of 32 with a float scale), in the same order, and takes
 * integer dot products (simd.h's dot_codes: VNNI, or AVX2's sign trick); prefill takes amx_matmul.c, or without AMX
 * the same integer products over all its rows (model/quantized.py says why).
 * Built and loaded by qwen_engine/kernels/__init__.py; threads are OpenMP's, which is PyTorch's own pool (same
 * libgomp), sized by torch.set_num_threads.
 */
#include "block_quant.h"

#define PREFETCH_BYTES 4096  /* how far ahead of the rows being read to ask for memory (measured: 2–8 KiB best) */
#define CHUNK_ROWS 64        /* activation rows a decoded pair of weight rows meets (measured: 1–6% faster than 32) */
#define TILE_ROWS 32         /* weight rows whose products are written together: a cache line of bfloat16 a row */
_Static_assert(CHUNK_ROWS % 16 == 0, "row_pair_dots sums a chunk's accumulators 16 at a time, padding to 16");

/* One row's activations in one superblock, quantized for the dot products in the codes' order (block_quant.h):
 * int8 values, and for each of the superblock's 16 lanes its block's scale and −offset · (sum of the lane's values),
 * which starts the lane's dot product so that codes need no unpacking of the offset:
 * Σ (code − offset)·x = offset-free VNNI dot + that start. */
typedef struct {
    int8_t *q;
    float *lane_scale;
    int32_t *lane_start;
} Activations;

/* All rows' activations, superblock-major: superblock after superblock, and within one, row after row, each row's
 * lane starts (64 B), lane scales (64 B) and int8 values (64 · S B) together. A pass of the rows over a superblock
 * then streams through memory (measured: 3–5% faster at K = 896, 14% at K = 4864, than row after row with the lane
 * data apart). */
#define LANE_BYTES 128
typedef struct {
    int8_t *data;
    int64_t rows;
} ActivationRows;

/* Row 0 of superblock `sb`, which starts at column k0. */
static inline int8_t *superblock_rows(ActivationRows a, int64_t k0, int64_t sb) {
    return a.data + a.rows * (k0 + LANE_BYTES * sb);
}

/* Row m of a superblock of S steps, from its row 0. */
static inline Activations row_of(int8_t *rows, int64_t m, int S) {
    int8_t *at = rows + m * (64 * S + LANE_BYTES);
    return (Activations){at + LANE_BYTES, (float *)(at + 64), (int32_t *)at};
}

static int64_t activation_row_bytes(int64_t K) {
    int64_t bytes = 0;
    for (int64_t k0 = 0, S; k0 < K; k0 += 64 * S) S = superblock_steps(K - k0), bytes += 64 * S + LANE_BYTES;
    return bytes;
}

/* Row m of x (K bfloat16) into `rows`, as the codes of the given offset (16: 5-bit, 128: 8-bit) take it. */
static void quantize_row(const uint16_t *x, int64_t K, int offset, ActivationRows rows, int64_t m) {
    for (int64_t k0 = 0, S, sb = 0; k0 < K; k0 += 64 * S, sb++) {
        S = superblock_steps(K - k0);
        Activations a = row_of(superblock_rows(rows, k0, sb), m, S);
        int32_t plain[128];
        float block_scale[16];
        for (int b = 0; b < 2 * S; b++) {
            const uint16_t *block = x + k0 + 32 * b;
            v16f lo = load_bf16x16(block), hi = load_bf16x16(block + 16);
            float amax = v16f_max_lane(v16f_max(v16f_abs(lo), v16f_abs(hi)));
            v16f scale = v16f_set1(amax > 0 ? 127.0f / amax : 0.0f);
            block_scale[b] = amax / 127.0f;
            _mm_storeu_si128((__m128i *)(plain + 8 * b), v16f_to_i8(v16f_mul(lo, scale)));
            _mm_storeu_si128((__m128i *)(plain + 8 * b + 4), v16f_to_i8(v16f_mul(hi, scale)));
        }
        int32_t *stored = (int32_t *)a.q;
        for (int s = 0; s < S; s++)
            for (int l = 0; l < 16; l++) stored[16 * s + l] = plain[S * l + s];
        for (int l = 0; l < 16; l++) a.lane_scale[l] = block_scale[S * l / 8];
        v16i sums = v16i_zero();
        if (codes_take_lane_start(offset == 16))
            for (int s = 0; s < S; s++) sums = dot_codes(sums, v16i_set1_i8(1), v16i_load(stored + 16 * s), 1);
        v16i_store(a.lane_start, v16i_mul_i32(sums, -offset));
    }
}

/* With AVX-512's 32 registers, activation rows go two at a time (measured: 5–20% faster); AVX2's 16 would spill. */
#ifdef QE_AVX512
#define ROWS_TOGETHER 2
#else
#define ROWS_TOGETHER 1
#endif

/* Activation rows m … m + J − 1 (J ≤ ROWS_TOGETHER) of a superblock (`rows`: its row 0) against two weight rows'
 * codes there (c, decoded): each code vector loaded serves the J rows. The products go into acc, or start it at a
 * row's first superblock. J and `first` are constants at each call, so the loops unroll. */
static inline __attribute__((always_inline)) void rows_dots(int8_t *rows, int m, int J, int S,
                                                            v16i c[2][8], const v16f w_scale[2], int five_bit,
                                                            int first, v16f acc[2][CHUNK_ROWS]) {
    v16i dot[ROWS_TOGETHER][2];
    Activations a[ROWS_TOGETHER];
    for (int j = 0; j < J; j++) a[j] = row_of(rows, m + j, S);
    for (int j = 0; j < J; j++) dot[j][0] = dot[j][1] = v16i_load(a[j].lane_start);
#ifdef QE_VNNI
    /* each activation vector loaded once for both weight rows: GCC would fold a load of it into each vpdpbusd
     * (measured: 2–9% faster) */
    for (int s = 0; s < S; s++)
        for (int j = 0; j < J; j++) {
            v16i x = in_order(v16i_load(a[j].q + 64 * s));
            for (int r = 0; r < 2; r++) dot[j][r] = dot_codes(dot[j][r], c[r][s], x, five_bit);
        }
#else
    for (int s = 0; s < S; s += 4)
        for (int j = 0; j < J; j++)
            for (int r = 0; r < 2; r++)
                dot[j][r] = dot_code_steps(dot[j][r], c[r] + s, a[j].q + 64 * s, S - s < 4 ? S - s : 4, five_bit);
#endif
    for (int j = 0; j < J; j++) {
        v16f lane_scale = v16f_load(a[j].lane_scale);
        for (int r = 0; r < 2; r++)
            acc[r][m + j] = v16f_fmadd(v16f_from_i32(dot[j][r]), v16f_mul(w_scale[r], lane_scale),
                                       first ? v16f_zero() : acc[r][m + j]);
    }
}

/* One superblock (S steps from column k0) of two weight rows against M activation rows: each activation vector loaded
 * serves both weight rows, which is what a batch of rows (the serving engine's decode steps) is bound by. Integer
 * sums run through all S steps; then one conversion and one scaled add per lane. */
static inline __attribute__((always_inline)) void superblock_dots(
    int8_t *rows, int M, int64_t k0, int S, const uint8_t *codes[2], const uint8_t *high_bits[2],
    const uint16_t *scales[2], int five_bit, int first, v16f acc[2][CHUNK_ROWS]) {
    v16f w_scale[2];
    v16i c[2][8];
    for (int r = 0; r < 2; r++) {
        w_scale[r] = lane_block_scales(scales[r] + k0 / 32, S);
        for (int s = 0; s < S; s++) {
            int64_t k = k0 + 64 * s;
            if (five_bit) {
                _mm_prefetch((const char *)(codes[r] + k / 2) + PREFETCH_BYTES, _MM_HINT_T0);
                _mm_prefetch((const char *)(high_bits[r] + k / 8) + PREFETCH_BYTES / 4, _MM_HINT_T0);
                c[r][s] = codes_for_dots(codes5(codes[r] + k / 2, high_bits[r] + k / 8), 1);
            } else {
                _mm_prefetch((const char *)(codes[r] + k) + PREFETCH_BYTES, _MM_HINT_T0);
                c[r][s] = codes_for_dots(codes8(codes[r] + k), 0);
            }
        }
    }
    int m = 0;
    for (; m + ROWS_TOGETHER <= M; m += ROWS_TOGETHER)
        rows_dots(rows, m, ROWS_TOGETHER, S, c, w_scale, five_bit, first, acc);
    for (; m < M; m++) rows_dots(rows, m, 1, S, c, w_scale, five_bit, first, acc);
}

/* superblock_dots with S a constant in each call, so that its loops unroll. */
static inline __attribute__((always_inline)) void superblock_dots_of(
    int8_t *rows, int M, int64_t k0, int S, const uint8_t *codes[2], const uint8_t *high_bits[2],
    const uint16_t *scales[2], int five_bit, int first, v16f acc[2][CHUNK_ROWS]) {
    switch (S) {
        case 8: superblock_dots(rows, M, k0, 8, codes, high_bits, scales, five_bit, first, acc); break;
        case 4: superblock_dots(rows, M, k0, 4, codes, high_bits, scales, five_bit, first, acc); break;
        case 2: superblock_dots(rows, M, k0, 2, codes, high_bits, scales, five_bit, first, acc); break;
        default: superblock_dots(rows, M, k0, 1, codes, high_bits, scales, five_bit, first, acc);
    }
}

/* Where the accumulators start: at the first superblock's products, with VNNI (measured: 3–6% faster at K = 896 than
 * zeroing them first); zeroed before it in plain AVX2 builds, whose 8-bit loop GCC compiled 10–20% slower beside a
 * first superblock apart. */
#ifdef QE_VNNI
#define FIRST_SUPERBLOCK_STARTS 1
#else
#define FIRST_SUPERBLOCK_STARTS 0
#endif

/* Dot products of two weight rows with activation rows m0 … m0 + M − 1 (M ≤ CHUNK_ROWS), one accumulator per
 * (weight row, activation row): the weight codes are decoded once for all M. The accumulators are touched once per
 * superblock, so those that do not fit in registers cost little in L1. */
static inline __attribute__((always_inline)) void row_pair_dots(
    ActivationRows acts, int64_t m0, int M, int64_t K, const uint8_t *codes[2], const uint8_t *high_bits[2],
    const uint16_t *scales[2], int five_bit, float *out[2]) {
    v16f acc[2][CHUNK_ROWS];
    if (!FIRST_SUPERBLOCK_STARTS)
        for (int r = 0; r < 2; r++) memset(acc[r], 0, (size_t)M * sizeof(v16f));
    for (int64_t k0 = 0, S, sb = 0; k0 < K; k0 += 64 * S, sb++) {
        S = superblock_steps(K - k0);
        int8_t *rows = superblock_rows(acts, k0, sb) + m0 * (64 * S + LANE_BYTES);
        if (FIRST_SUPERBLOCK_STARTS && k0 == 0)
            superblock_dots_of(rows, M, k0, (int)S, codes, high_bits, scales, five_bit, 1, acc);
        else
            superblock_dots_of(rows, M, k0, (int)S, codes, high_bits, scales, five_bit, 0, acc);
    }
    for (int r = 0; r < 2; r++) {
        if (M < 8) {  /* a decoding step's few rows: one sum each */
            for (int m = 0; m < M; m++) out[r][m] = v16f_sum(acc[r][m]);
            continue;
        }
        for (int m = M; m % 16; m++) acc[r][m] = v16f_zero();
        for (int m = 0; m < M; m += 16) v16f_store(out[r] + m, v16f_sum16(acc[r] + m));
    }
}

/* 16 floats (lo: the first 8) as 16 bfloat16 values, each rounded as f32_to_bf16 rounds it. */
static inline __m256i bf16x16_exact(__m256 lo, __m256 hi) {
    __m256i rounded[2];
    for (int h = 0; h < 2; h++) {
        __m256 v = h ? hi : lo;
        __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(_mm256_castps_si256(v), 16), _mm256_set1_epi32(0x40));
        __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        rounded[h] = _mm256_blendv_epi8(bf16_bits8(v), quiet, nan);
    }
    return _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded[0], rounded[1]), _MM_SHUFFLE(3, 1, 2, 0));
}

/* v[j] lane i = v[i] lane j. */
static inline void transpose8x8(__m256 v[8]) {
    __m256 pairs[8], quads[8];
    for (int i = 0; i < 8; i += 2) {
        pairs[i] = _mm256_unpacklo_ps(v[i], v[i + 1]);      /* rows i, i+1 interleaved: lanes 0 1 | 4 5 */
        pairs[i + 1] = _mm256_unpackhi_ps(v[i], v[i + 1]);  /* lanes 2 3 | 6 7 */
    }
    for (int i = 0; i < 8; i += 4)
        for (int h = 0; h < 2; h++) {
            quads[i + 2 * h] = _mm256_shuffle_ps(pairs[i + h], pairs[i + 2 + h], _MM_SHUFFLE(1, 0, 1, 0));
            quads[i + 2 * h + 1] = _mm256_shuffle_ps(pairs[i + h], pairs[i + 2 + h], _MM_SHUFFLE(3, 2, 3, 2));
        }
    for (int j = 0; j < 4; j++) {  /* quads[j] (rows 0–3) and quads[4 + j] (rows 4–7) hold columns j and 4 + j */
        v[j] = _mm256_permute2f128_ps(quads[j], quads[4 + j], 0x20);
        v[4 + j] = _mm256_permute2f128_ps(quads[j], quads[4 + j], 0x31);
    }
}

/* The products of a tile's `rows` weight rows (tile[r][m], as row_pair_dots leaves them) with its chunk of activation
 * rows, stored in their output rows from column t0: blocks of 16 weight rows × 8 activation rows go through two
 * transposes in registers, so that each output row takes 16 results a store, rounded as f32_to_bf16 rounds; what
 * is left at the edges goes one by one. */
static void write_tile(const BlockMatrix *w, float tile[TILE_ROWS][CHUNK_ROWS], int64_t rows, int chunk, int64_t t0,
                       int64_t m0, uint16_t *out, float *sums) {
    int64_t N = w->rows, whole_rows = rows / 16 * 16;
    int whole_chunk = chunk / 8 * 8;
    for (int m = 0; m < whole_chunk; m += 8)
        for (int64_t r = 0; r < whole_rows; r += 16) {
            __m256 lo[8], hi[8];
            for (int i = 0; i < 8; i++) lo[i] = _mm256_loadu_ps(tile[r + i] + m), hi[i] = _mm256_loadu_ps(tile[r + 8 + i] + m);
            transpose8x8(lo), transpose8x8(hi);  /* lo[j], hi[j]: weight rows r … r + 15 against activation row m + j */
            for (int j = 0; j < 8; j++) {
                int64_t at = (m0 + m + j) * N + t0 + r;
                if (sums) {
                    _mm256_storeu_ps(sums + at, lo[j]), _mm256_storeu_ps(sums + at + 8, hi[j]);
                    continue;
                }
                __m256i product = bf16x16_exact(lo[j], hi[j]);
                if (w->bias) {
                    const uint16_t *bias = w->bias + t0 + r;
                    __m256 first = _mm256_add_ps(widen_bf16x8(_mm256_castsi256_si128(product)),
                                                 widen_bf16x8(_mm_loadu_si128((const __m128i *)bias)));
                    __m256 last = _mm256_add_ps(widen_bf16x8(_mm256_extracti128_si256(product, 1)),
                                                widen_bf16x8(_mm_loadu_si128((const __m128i *)(bias + 8))));
                    product = bf16x16_exact(first, last);
                }
                _mm256_storeu_si256((__m256i *)(out + at), product);
            }
        }
    for (int m = 0; m < chunk; m++)
        for (int64_t r = m < whole_chunk ? whole_rows : 0; r < rows; r++) {
            int64_t n = t0 + r, at = (m0 + m) * N + n;
            if (sums) {
                sums[at] = tile[r][m];
                continue;
            }
            uint16_t product = f32_to_bf16(tile[r][m]);
            out[at] = w->bias ? f32_to_bf16(bf16_to_f32(product) + bf16_to_f32(w->bias[n])) : product;
        }
}

/* out (bfloat16, bias added) or, where `sums` is given instead, the unrounded float32 products without the bias.
 * Any number of activation rows: all are quantized once; then each pair of weight rows, decoded from memory once, meets
 * them CHUNK_ROWS at a time (kept in cache between chunks), which is how prefill multiplies straight from the blocks on
 * a CPU without AMX. Each output's arithmetic is the same whatever M is: a row's result does not depend on the batch
 * it came in (the serving engine relies on it). */
static int matrix_times(const BlockMatrix *w, const uint16_t *x, int64_t M, uint16_t *out, float *sums) {
    int64_t K = w->columns, N = w->rows;
    if (M < 1 || K % 64 != 0) return -1;
    int five_bit = w->high_bits != NULL;
    ActivationRows acts = {aligned_alloc(64, (size_t)(M * activation_row_bytes(K))), M};
    if (!acts.data) return -1;
#pragma omp parallel for schedule(static) if (M > MAX_ROWS)
    for (int64_t m = 0; m < M; m++) quantize_row(x + m * K, K, five_bit ? 16 : 128, acts, m);
    int64_t row_bytes = five_bit ? K / 2 : K;
    /* Rows of x go in groups whose quantized activations (a row: K bytes and 128 of lane data a superblock) stay in
     * L2 while every pair of weight rows passes them: with a long K (the MLP's down projection) they would otherwise
     * come from memory again for each pair (measured: 2.7x slower at K = 4864). Weight rows go in pairs, so each
     * activation vector loaded serves two, and the pairs in tiles of TILE_ROWS, whose products wait in `tile` until a
     * chunk of rows is done: each output row then gets a whole cache line at once (measured: 22% faster at N = 9728 on
     * AVX2 than two values at a time down a column of lines). A decoding step's one row is contiguous either way, and
     * keeps tiles of a pair so that many threads still share a small matrix. */
    int64_t group = (1 << 20) / (2 * K) / CHUNK_ROWS * CHUNK_ROWS;
    group = group < CHUNK_ROWS ? CHUNK_ROWS : group;
    const int64_t tile_rows = M > 1 ? TILE_ROWS : 2;
    for (int64_t g0 = 0; g0 < M; g0 += group) {
    int64_t g1 = g0 + group < M ? g0 + group : M;
#pragma omp parallel for schedule(static)
    for (int64_t t0 = 0; t0 < N; t0 += tile_rows) {
        float tile[TILE_ROWS][CHUNK_ROWS];
        int64_t rows = t0 + tile_rows <= N ? tile_rows : N - t0;
        for (int64_t m0 = g0; m0 < g1; m0 += CHUNK_ROWS) {
            int chunk = g1 - m0 < CHUNK_ROWS ? (int)(g1 - m0) : CHUNK_ROWS;
            for (int64_t p = 0; p < rows; p += 2) {
                const uint8_t *codes[2], *high_bits[2] = {NULL, NULL};
                const uint16_t *scales[2];
                float *outs[2] = {tile[p], tile[p + 1 < rows ? p + 1 : p]};
                for (int64_t r = 0; r < 2; r++) {  /* an odd last row pairs with itself; its twin result is dropped */
                    int64_t n = t0 + (p + r < rows ? p + r : p);
                    codes[r] = w->codes + n * row_bytes;
                    scales[r] = w->scales + n * (K / 32);
                    if (five_bit) high_bits[r] = w->high_bits + n * (K / 8);
                }
                if (five_bit)  /* a constant per call, so each variant is compiled without the other's branch */
                    row_pair_dots(acts, m0, chunk, K, codes, high_bits, scales, 1, outs);
                else
                    row_pair_dots(acts, m0, chunk, K, codes, high_bits, scales, 0, outs);
            }
            write_tile(w, tile, rows, chunk, t0, m0, out, sums);
        }
    }
    }
    free(acts.data);
    return 0;
}

int qe_matrix_times(const BlockMatrix *w, const uint16_t *x, int64_t M, uint16_t *out) {
    return matrix_times(w, x, M, out, NULL);
}

int qe_matrix_sums(const BlockMatrix *w, const uint16_t *x, int64_t M, float *out) {
    return matrix_times(w, x, M, NULL, out);
}

/* out[M][N] = x[M][K] (bfloat16) · Wᵀ, for the Python side (no bias): bfloat16, or float32 unrounded with `sums`. */
int qe_block_matmul(const uint16_t *x, int64_t M, int64_t K, const uint8_t *codes, const uint8_t *high_bits,
                    const uint16_t *scales, int64_t N, int sums, void *out) {
    BlockMatrix w = {codes, high_bits, scales, NULL, N, K};
    return sums ? qe_matrix_sums(&w, x, M, out) : qe_matrix_times(&w, x, M, out);
}

/* W as bfloat16 [N][K] (rounded to nearest even), for prefill's matmul. */
int qe_block_dequantize(const uint8_t *codes, const uint8_t *high_bits, const uint16_t *scales, int64_t N, int64_t K,
                        uint16_t *out) {
    if (K % 64 != 0) return -1;
    BlockMatrix w = {codes, high_bits, scales, NULL, N, K};
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) dequantize_row(&w, n, out + n * K);
    return 0;
}
