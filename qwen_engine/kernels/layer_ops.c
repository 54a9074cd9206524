/* The element-wise parts of a decoder layer over many rows (prefill): RMSNorm, rotary embedding and SwiGLU's
 * silu·up. In PyTorch each is several bfloat16 operator calls that convert every element to float32 and back and
 * write a temporary; together they cost a 660-token prefill about a quarter of its time. Here each is one pass
 * with the same bfloat16 roundings (a residual add joins the norm after it), with rows spread over OpenMP threads;
 * the per-row helpers are block_quant.h's, shared with the fused decoding step. Each function returns 0, or −1 when its sizes are not ones it handles (the caller
 * then uses PyTorch).
 */
#include "block_quant.h"

/* out[r] = RMSNorm(x[r]) · weight for rows of n values (n a multiple of 16). */
int qe_rms_norm(const uint16_t *x, const uint16_t *weight, int64_t rows, int64_t n, float eps, uint16_t *out) {
    if (n % 16 || rows < 0) return -1;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) rms_norm_row(x + r * n, weight, n, eps, out + r * n);
    return 0;
}

/* x[r] = bf16(x[r] + residual[r]) in place, then out[r] = RMSNorm(x[r]) · weight: a residual connection and the
 * norm after it in one pass (n a multiple of 16). */
int qe_add_rms_norm(uint16_t *x, const uint16_t *residual, const uint16_t *weight, int64_t rows, int64_t n, float eps,
                    uint16_t *out) {
    if (n % 16 || rows < 0) return -1;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *sum = x + r * n;
        for (int64_t i = 0; i < n; i += 16)
            _mm256_storeu_si256((__m256i *)(sum + i),
                                round_bf16x16(v16f_add(load_bf16x16(sum + i), load_bf16x16(residual + r * n + i))));
        rms_norm_row(sum, weight, n, eps, out + r * n);
    }
    return 0;
}

/* Rotates `heads` heads of d values in place in each row of x (row r starts at x + r·stride) with the tables'
 * row r (cos/sin [rows][d]); d a multiple of 32. */
int qe_rotate(uint16_t *x, int64_t rows, int64_t stride, int64_t heads, int64_t d, const uint16_t *cos,
              const uint16_t *sin) {
    if (d % 32 || rows < 0 || stride < heads * d) return -1;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t h = 0; h < heads; h++) rotate_head(x + r * stride + h * d, cos + r * d, sin + r * d, d);
    return 0;
}

/* gate[r] = silu(gate[r]) · up[r] in place over `rows` rows of n values, the rows of gate and of up `stride` apart
 * (gate_up [rows][gate n | up n] has up = gate + n and stride 2n; its transpose, [gate rows | up rows] of n each,
 * has up = gate + rows·n and stride n). In place, as the PyTorch path's silu_().mul_(): a long prefill's gate/up
 * product is its largest temporary, and a separate output would add half of it again. */
int qe_silu_mul(uint16_t *gate, const uint16_t *up, int64_t rows, int64_t n, int64_t stride) {
    if (rows < 0 || n < 0 || stride < n) return -1;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) silu_mul_row(gate + r * stride, up + r * stride, n, gate + r * stride);
    return 0;
}
