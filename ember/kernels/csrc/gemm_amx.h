/* AMX (Sapphire Rapids and later): the 16-row product on the tile unit, included by ember_kernels.c after
 * gemm_avx512.h under a pragma that adds amx-tile and amx-int8.
 *
 * 16 weight rows are unpacked once into unsigned bytes (a 16 x 32 A tile per 32-value block, with their
 * scales dw and coefficients cw), then every group of 16 activation rows (block_q8x16, whose bytes
 * 4t..4t+3 of rows 0..15 are exactly the B tile's VNNI layout) meets them one block at a time: one
 * tdpbusd gives the 16 x 16 exact integer block dots, and the vector unit applies the same fma sequence
 * per output as gemv8 / gemm8 / gemm16 (acc = fma(isum, dw * d, acc), then the cw term), so a row's
 * result is still bit-identical whatever its batch. Q6_K's two 16-value halves are two K=16 products.
 *
 * GCC's tile intrinsics are asm statements without a memory clobber: BARRIER() orders the plain
 * stores and loads around them. */
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define F(name) CAT(name, SUFFIX)
#define INLINE static inline __attribute__((always_inline))
#define BARRIER() __asm__ volatile("" ::: "memory")

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Two configurations: C tiles tmm0..tmm3 (16 x 16 int32) with A tiles tmm4, tmm5 (16 weight rows) and B tiles
 * tmm6, tmm7, over whole 32-value blocks (A 32 bytes a row, B 8 rows of 64) or, for Q6_K, over 16-value
 * halves (A 16 bytes, B 4 rows). Loaded at the start of each chunk of work and released at its end: other
 * AMX users in the process (oneDNN inside torch) configure and release the tiles of the same thread. */
static const tile_config amx_configs[2] = {
    {.palette = 1, .colsb = {64, 64, 64, 64, 32, 32, 64, 64}, .rows = {16, 16, 16, 16, 16, 16, 8, 8}},
    {.palette = 1, .colsb = {64, 64, 64, 64, 16, 16, 64, 64}, .rows = {16, 16, 16, 16, 16, 16, 4, 4}},
};

/* (a configuration in static memory: the intrinsic's asm tells the compiler it reads only 8 bytes) */
static void F(amx_begin)(int halves) { _tile_loadconfig(&amx_configs[halves]); }

static void F(amx_end)(void) { _tile_release(); }

#define AMX_STORE(b, n, Q, DW, CW) \
    (_mm256_storeu_si256((__m256i *)(wq + 512 * (b) + 32 * (n)), Q), dw[16 * (b) + (n)] = DW, cw[16 * (b) + (n)] = CW)
#define AMX_UNPACK32(BB, UNPACK)                                  \
    for (int64_t i = 0; i < nb; i++) {                           \
        __m256i q;                                               \
        float d_, c_;                                            \
        UNPACK(row + i * (BB), q, d_, c_);                       \
        AMX_STORE(i, n, q, d_, c_);                              \
    }

/* Weight rows w[0 .. rows-1] (rows <= 16; the last repeats to fill 16), nb 32-value blocks each, as A
 * tiles: wq[512 b + 32 n + j] = value j of block b of row n, with dw / cw[16 b + n] (Q6_K: the scales of
 * its two halves). */
static void F(amx_unpack)(int type, const uint8_t *w, int64_t row_bytes, int64_t rows, int64_t nb, uint8_t *wq,
                          float *dw, float *cw) {
    for (int n = 0; n < 16; n++) {
        const uint8_t *row = w + (n < rows ? n : rows - 1) * row_bytes;
        switch (type) {
        case T_Q8_0: AMX_UNPACK32(34, UNPACK_Q8_0) break;
        case T_Q4_0: AMX_UNPACK32(18, UNPACK_Q4_0) break;
        case T_Q4_1: AMX_UNPACK32(20, UNPACK_Q4_1) break;
        case T_Q5_0: AMX_UNPACK32(22, UNPACK_Q5_0) break;
        case T_Q5_1: AMX_UNPACK32(24, UNPACK_Q5_1) break;
        case T_Q4_K:
        case T_Q5_K: {
            int q5 = type == T_Q5_K, bb = q5 ? 176 : 144;
            for (int64_t i = 0; i < nb / 8; i++)
                for (int j = 0; j < 8; j += 2) {
                    __m256i lo, hi;
                    float d2[2], c2[2];
                    F(kquant_pair)(row + i * bb, q5, j, &lo, &hi, d2, c2);
                    AMX_STORE(8 * i + j, n, lo, d2[0], c2[0]);
                    AMX_STORE(8 * i + j + 1, n, hi, d2[1], c2[1]);
                }
            break;
        }
        case T_Q6_K:
            for (int64_t i = 0; i < nb / 8; i++)
                for (int h = 0; h < 2; h++)
                    for (int g = 0; g < 4; g++) {
                        float d0, d1;
                        __m256i q = F(q6k_group)(row + i * 210, h, g, &d0, &d1);
                        AMX_STORE(8 * i + 4 * h + g, n, q, d0, d1);
                    }
            break;
        }
    }
}

#undef AMX_UNPACK32
#undef AMX_STORE

/* acc[n] for 16 weight rows n over one activation block: gemm16's arithmetic, lane = activation row */
INLINE void F(amx_scale)(const int32_t *c, const int32_t *c_hi, int halves, const float *dw, const float *cw,
                         const block_q8x16 *xb, __m512 *acc) {
    __m512 d = _mm512_loadu_ps(xb->d), s = _mm512_loadu_ps(xb->s);
    if (!halves) {
        for (int n = 0; n < 16; n++) {
            __m512 a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(c + 16 * n)),
                                       _mm512_mul_ps(_mm512_set1_ps(dw[n]), d), acc[n]);
            acc[n] = _mm512_fmadd_ps(_mm512_set1_ps(cw[n]), s, a);
        }
        return;
    }
    __m512 s_lo = _mm512_loadu_ps(xb->s_lo), s_hi = _mm512_sub_ps(s, s_lo);
    for (int n = 0; n < 16; n++) {
        __m512 a = acc[n];
        a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(c + 16 * n)), _mm512_mul_ps(_mm512_set1_ps(dw[n]), d), a);
        a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(c_hi + 16 * n)),
                            _mm512_mul_ps(_mm512_set1_ps(cw[n]), d), a);
        a = _mm512_fmadd_ps(_mm512_set1_ps(-32.0f * dw[n]), s_lo, a);
        acc[n] = _mm512_fmadd_ps(_mm512_set1_ps(-32.0f * cw[n]), s_hi, a);
    }
}

/* in place: v[r] lane j -> v[j] lane r, for 16 vectors of 16 floats (data movement only) */
INLINE void F(transpose16)(__m512 *v) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(v[i], v[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  /* v[i + j], 128-bit lane L: column 4 L + j of rows i .. i + 3 */
        __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
        __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
        v[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        v[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        v[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        v[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int j = 0; j < 4; j++) {
        __m512 a = _mm512_shuffle_f32x4(v[j], v[4 + j], 0x88), b = _mm512_shuffle_f32x4(v[j], v[4 + j], 0xDD);
        __m512 c = _mm512_shuffle_f32x4(v[8 + j], v[12 + j], 0x88), d = _mm512_shuffle_f32x4(v[8 + j], v[12 + j], 0xDD);
        t[j] = _mm512_shuffle_f32x4(a, c, 0x88);
        t[8 + j] = _mm512_shuffle_f32x4(a, c, 0xDD);
        t[4 + j] = _mm512_shuffle_f32x4(b, d, 0x88);
        t[12 + j] = _mm512_shuffle_f32x4(b, d, 0xDD);
    }
    for (int i = 0; i < 16; i++) v[i] = t[i];
}

/* Step s's two 16 x 16 integer products into C tiles C0, C1, stored to out0 / out1: blocks 2s and 2s + 1, or
 * the two halves of Q6_K block s. */
#define AMX_STEP(C0, C1, halves, wq, xg, s, out0, out1)                                  \
    do {                                                                                  \
        int64_t b0 = (halves) ? (s) : 2 * (s), b1 = (halves) ? (s) : 2 * (s) + 1;       \
        _tile_loadd(4, (wq) + 512 * b0, 32);                                              \
        _tile_loadd(6, (xg)[b0].qs, 64);                                                  \
        _tile_loadd(5, (wq) + 512 * b1 + ((halves) ? 16 : 0), 32);                        \
        _tile_loadd(7, (xg)[b1].qs + ((halves) ? 256 : 0), 64);                           \
        _tile_zero(C0);                                                                   \
        _tile_zero(C1);                                                                   \
        _tile_dpbusd(C0, 4, 6);                                                           \
        _tile_dpbusd(C1, 5, 7);                                                           \
        _tile_stored(C0, out0, 64);                                                       \
        _tile_stored(C1, out1, 64);                                                       \
    } while (0)

/* Between amx_begin(type == T_Q6_K) and amx_end():
 * y[i, n] (rows ldy apart) (+)= <unpacked weight row n, activation row i> (+ bias[n]) for the first `rows`
 * weight rows and the m activation rows of x (groups of 16 interleaved rows, nb blocks each), written
 * row by row in the order of store_out's scalar sum: (y or 0) + product + (bias or 0).
 * Software-pipelined: the tile products of step s + 1 are under way while the vector unit scales step s. */
static void F(amx_gemm)(int type, const uint8_t *wq, const float *dw, const float *cw, const block_q8x16 *x,
                        int64_t nb, int64_t m, int rows, float *y, int64_t ldy, const float *bias, int accumulate) {
    int halves = type == T_Q6_K;
    int64_t steps = halves ? nb : nb / 2;
    int32_t c[4][256] __attribute__((aligned(64)));
    __mmask16 cols = (__mmask16)((1u << rows) - 1);
    __m512 bv = bias ? _mm512_maskz_loadu_ps(cols, bias) : _mm512_setzero_ps();
    for (int64_t g = 0; g < (m + 15) / 16; g++) {
        const block_q8x16 *xg = x + g * nb;
        __m512 acc[16];
        for (int n = 0; n < 16; n++) acc[n] = _mm512_setzero_ps();
        BARRIER();
        if (steps) AMX_STEP(0, 1, halves, wq, xg, 0, c[0], c[1]);
        for (int64_t s = 0; s < steps; s++) {
            if (s + 1 < steps) {
                if (s & 1) AMX_STEP(0, 1, halves, wq, xg, s + 1, c[0], c[1]);
                else AMX_STEP(2, 3, halves, wq, xg, s + 1, c[2], c[3]);
            }
            BARRIER();
            const int32_t *lo = c[2 * (s & 1)], *hi = c[2 * (s & 1) + 1];
            if (halves) {
                F(amx_scale)(lo, hi, 1, dw + 16 * s, cw + 16 * s, xg + s, acc);
            } else {
                F(amx_scale)(lo, NULL, 0, dw + 32 * s, cw + 32 * s, xg + 2 * s, acc);
                F(amx_scale)(hi, NULL, 0, dw + 32 * s + 16, cw + 32 * s + 16, xg + 2 * s + 1, acc);
            }
            BARRIER();
        }
        if (!halves && nb % 2) {  /* an odd last block */
            int64_t b = nb - 1;
            _tile_loadd(4, wq + 512 * b, 32);
            _tile_loadd(6, xg[b].qs, 64);
            _tile_zero(0);
            _tile_dpbusd(0, 4, 6);
            _tile_stored(0, c[0], 64);
            BARRIER();
            F(amx_scale)(c[0], NULL, 0, dw + 16 * b, cw + 16 * b, xg + b, acc);
        }
        F(transpose16)(acc);
        for (int64_t i = 16 * g; i < m && i < 16 * g + 16; i++) {
            float *dst = y + i * ldy;
            __m512 v = accumulate ? _mm512_maskz_loadu_ps(cols, dst) : _mm512_setzero_ps();
            _mm512_mask_storeu_ps(dst, cols, _mm512_add_ps(_mm512_add_ps(v, acc[i - 16 * g]), bv));
        }
    }
}

#undef AMX_STEP
#undef BARRIER
#undef F
#undef CAT
#undef CAT_
#undef INLINE
