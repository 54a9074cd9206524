/* Prefill's matrix product on Intel AMX, reading the weight blocks directly: out[M][N] = x[M][K] · Wᵀ in bfloat16
 * with float32 accumulation (the rounding of PyTorch's bfloat16 matmul), without first writing W out as bfloat16.
 *
 * Each thread takes panels of 32 weight rows in turn. A panel is dequantized into a small buffer that stays in the
 * core's cache, rearranged into AMX's B layout (pairs of bfloat16 along K, one 16×16 dword transpose per tile), then
 * multiplied with every 32-row block of x: four accumulator tiles (2 row tiles × 2 column tiles) take K in steps of
 * 32. Against dequantizing to bfloat16 and calling PyTorch's matmul this saves writing and re-reading the whole
 * bfloat16 matrix and oneDNN's own weight reorder on every call. Built only with -mamx-tile -mamx-bf16 (where the CPU
 * has them); elsewhere the entry point reports −2 and callers take the dequantize-then-matmul path.
 */
#define _GNU_SOURCE /* syscall() under -std=c11 */
#include "block_quant.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define PANEL 32   /* weight rows per panel: two 16-column tiles of the output */
#define K_CHUNK 256 /* columns of x per pass: a 32-row block of them is 16 KiB */

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* In place: r[i] holds dword i of every input row (r[i][j] = input row j, dword i). */
static inline void transpose16x16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    /* each 128-bit lane now holds a transposed 4×4 block; move the lanes */
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
        r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
    }
}

/* 32 rows of W into B tiles: tile (kb, c) holds, in row kk, the pairs W[row c·16 + j][32kb + 2kk, +1] for
 * j = 0…15 (AMX's layout of B: K/2 rows of column pairs). */
static void pack_panel(const BlockMatrix *w, int64_t first, int64_t second, uint16_t *rows, uint16_t *tiles) {
    int64_t K = w->columns; /* the panel's two tiles take weight rows first… and second… (16 each) */
    for (int64_t n = 0; n < PANEL / 2; n++) {
        dequantize_row(w, first + n, rows + n * K);
        dequantize_row(w, second + n, rows + (PANEL / 2 + n) * K);
    }
    for (int64_t kb = 0; kb < K / 32; kb++)
        for (int c = 0; c < 2; c++) {
            __m512i r[16];
            for (int j = 0; j < 16; j++) r[j] = _mm512_loadu_si512(rows + (16 * c + j) * K + 32 * kb);
            transpose16x16(r);
            uint16_t *tile = tiles + (2 * kb + c) * 512;
            for (int kk = 0; kk < 16; kk++) _mm512_storeu_si512(tile + 32 * kk, r[kk]);
        }
}

/* A buffer of this thread's that only grows: prefill calls this kernel ~100 times, and fresh allocations in between
 * PyTorch's large temporaries fragment the heap (measured: +50–130 MB of peak RSS on a 4096-token prefill). */
typedef struct {
    void *data;
    size_t size;
} Scratch;

static void *scratch(Scratch *s, size_t size) {
    if (s->size < size) {
        free(s->data);
        s->data = aligned_alloc(64, (size + 63) / 64 * 64);
        s->size = s->data ? size : 0;
    }
    return s->data;
}

static _Thread_local Scratch rows_scratch, tiles_scratch, partial_scratch, tail_scratch;

static int amx_permitted(void) {
    static int state = 0; /* 0 unknown, 1 yes, −1 no */
    if (state == 0) state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : -1;
    return state == 1;
}

/* out = x · Wᵀ [M][N], by `mode`: AMX_BF16 rounds to bfloat16; AMX_SUMS keeps the float32 sums (a tensor-parallel
 * rank's partial products, rounded once the ranks have added them up); AMX_SWIGLU takes W as the packed [gate; up]
 * of a SwiGLU MLP (N = 2I) and out [M][I] is silu(x·gateᵀ) · (x·upᵀ), rounded as the unfused path rounds: each
 * panel then pairs 16 gate rows with the 16 up rows of the same outputs, and the [M][2I] product is never written. */
enum { AMX_BF16 = 0, AMX_SWIGLU = 1, AMX_SUMS = 2 };

int qe_block_matmul_amx(const uint16_t *x, int64_t M, int64_t K, int64_t stride, const uint8_t *codes,
                        const uint8_t *high_bits, const uint16_t *scales, int64_t N, int mode, void *out) {
    int swiglu = mode == AMX_SWIGLU;
    if (K % 64 || N % PANEL || M < 1 || stride < K || mode < AMX_BF16 || mode > AMX_SUMS) return -1;
    int64_t half = N / 2, width = swiglu ? N / 2 : N; /* output columns */
    if (!amx_permitted()) return -2;
    BlockMatrix w = {codes, high_bits, scales, NULL, N, K};
    /* The last block of fewer than 32 rows of x is read from a zero-padded copy. */
    int64_t full = M / 32 * 32;
    uint16_t *tail = scratch(&tail_scratch, 32 * (size_t)K * 2);
    if (!tail) return -1;
    memset(tail, 0, 32 * (size_t)K * 2);
    for (int64_t m = full; m < M; m++) memcpy(tail + (m - full) * K, x + m * stride, (size_t)K * 2);
    int status = 0;
    /* Loop nest: groups of panels whose B tiles fill about half of a core's L2 (split evenly over the threads);
     * within a group, each 32-row block of x in chunks of K_CHUNK columns (16 KiB, kept in L1) against every panel,
     * the accumulators parked in `partial` between chunks. So the tiles of x come from L1 and those of W from L2. */
    int64_t panels_total = N / PANEL, threads = omp_get_max_threads();
    int64_t group = (1 << 20) / (PANEL * K * 2);
    int64_t even = (panels_total + threads - 1) / threads;
    group = group < 1 ? 1 : group > even ? even : group;
#pragma omp parallel
    {
        TileConfig config = {.palette = 1};
        for (int t = 0; t < 8; t++) config.rows[t] = 16, config.colsb[t] = 64;
        _tile_loadconfig(&config);
        uint16_t *rows = scratch(&rows_scratch, PANEL * (size_t)K * 2);
        uint16_t *tiles = scratch(&tiles_scratch, group * PANEL * (size_t)K * 2);
        float *partial = scratch(&partial_scratch, group * 32 * 32 * sizeof(float));
        if (!rows || !tiles || !partial) {
#pragma omp atomic write
            status = -1;
        }
#pragma omp for schedule(static)
        for (int64_t g0 = 0; g0 < N; g0 += group * PANEL) {
            if (!rows || !tiles || !partial) continue;
            int64_t panels = (N - g0) / PANEL < group ? (N - g0) / PANEL : group;
            for (int64_t p = 0; p < panels; p++) {
                int64_t n0 = g0 + p * PANEL;
                if (swiglu)
                    pack_panel(&w, n0 / 2, half + n0 / 2, rows, tiles + p * PANEL * K);
                else
                    pack_panel(&w, n0, n0 + PANEL / 2, rows, tiles + p * PANEL * K);
            }
            for (int64_t m0 = 0; m0 < M; m0 += 32) {
                const uint16_t *a = m0 < full ? x + m0 * stride : tail;
                int64_t a_stride = (m0 < full ? stride : K) * 2;
                for (int64_t k0 = 0; k0 < K; k0 += K_CHUNK) {
                    int64_t k1 = k0 + K_CHUNK < K ? k0 + K_CHUNK : K;
                    for (int64_t p = 0; p < panels; p++) {
                        const uint16_t *b = tiles + p * PANEL * K;
                        float *c = partial + p * 32 * 32;
                        if (k0 == 0) {
                            _tile_zero(0);
                            _tile_zero(1);
                            _tile_zero(2);
                            _tile_zero(3);
                        } else {
                            _tile_loadd(0, c, 128);
                            _tile_loadd(1, c + 16, 128);
                            _tile_loadd(2, c + 16 * 32, 128);
                            _tile_loadd(3, c + 16 * 32 + 16, 128);
                        }
                        for (int64_t kb = k0 / 32; kb < k1 / 32; kb++) {
                            _tile_loadd(4, a + 32 * kb, a_stride);
                            _tile_loadd(5, a + a_stride / 2 * 16 + 32 * kb, a_stride);
                            _tile_loadd(6, b + 2 * kb * 512, 64);
                            _tile_loadd(7, b + (2 * kb + 1) * 512, 64);
                            _tile_dpbf16ps(0, 4, 6);
                            _tile_dpbf16ps(1, 4, 7);
                            _tile_dpbf16ps(2, 5, 6);
                            _tile_dpbf16ps(3, 5, 7);
                        }
                        _tile_stored(0, c, 128);
                        _tile_stored(1, c + 16, 128);
                        _tile_stored(2, c + 16 * 32, 128);
                        _tile_stored(3, c + 16 * 32 + 16, 128);
                    }
                }
                int64_t count = M - m0 < 32 ? M - m0 : 32;
                for (int64_t p = 0; p < panels; p++)
                    for (int64_t m = 0; m < count; m++) {
                        const float *c = partial + p * 32 * 32 + 32 * m;
                        int64_t n0 = g0 + p * PANEL;
                        uint16_t *halves = (uint16_t *)out + (m0 + m) * width;
                        if (mode == AMX_SUMS) {
                            float *sums = (float *)out + (m0 + m) * width + n0;
                            _mm512_storeu_ps(sums, _mm512_load_ps(c));
                            _mm512_storeu_ps(sums + 16, _mm512_load_ps(c + 16));
                        } else if (swiglu) {
                            __m256i mixed = silu_mul16(bf16_round_ps(_mm512_load_ps(c)), bf16_round_ps(_mm512_load_ps(c + 16)));
                            _mm256_storeu_si256((__m256i *)(halves + n0 / 2), mixed);
                        } else {
                            __m256i lo = round_bf16x16(_mm512_load_ps(c)), hi = round_bf16x16(_mm512_load_ps(c + 16));
                            _mm512_storeu_si512(halves + n0, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
                        }
                    }
            }
        }
        _tile_release();
    }
    return status;
}

#else

int qe_block_matmul_amx(const uint16_t *x, int64_t M, int64_t K, int64_t stride, const uint8_t *codes,
                        const uint8_t *high_bits, const uint16_t *scales, int64_t N, int mode, void *out) {
    (void)x, (void)M, (void)K, (void)stride, (void)codes, (void)high_bits, (void)scales, (void)N, (void)mode, (void)out;
    return -2;
}

#endif
