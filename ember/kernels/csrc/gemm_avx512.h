/* AVX-512 VNNI: gemm8's scheme on 16 activation rows at once (block_q8x16, 64-byte vectors) and on every
 * group of 16 rows per unpacked weight block, included by ember_kernels.c after gemm_x86.h under the
 * AVX-512 pragma. Lane by lane it does exactly what gemm8 and gemv8 do (the same fma sequence per
 * block), so batches of any size give bit-identical rows. */
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define F(name) CAT(name, SUFFIX)
#define INLINE static inline __attribute__((always_inline))

/* The same 32-value block of two weight rows (q, its scale dw and offset coefficient cw per row) against
 * every group of 16 activation rows: each row's block is unpacked and its 4-byte groups broadcast once
 * for all groups, and each group's activation bytes and scales are loaded once for both rows.
 * halves: Q6_K, whose two 16-value halves have scales dw and cw (its offset of -32 is implied). */
INLINE void F(apply16)(const __m256i *q, int halves, const float *dw, const float *cw, const block_q8x16 *x,
                       int64_t nb, int64_t groups, __m512 *acc0, __m512 *acc1) {
    __m512i wb[2][8];
    for (int r = 0; r < 2; r++)
        for (int t = 0; t < 8; t++)
            wb[r][t] = _mm512_permutexvar_epi32(_mm512_set1_epi32(t), _mm512_castsi256_si512(q[r]));
    for (int64_t g = 0; g < groups; g++) {
        const block_q8x16 *xg = x + g * nb;
        __m512i lo[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()}, hi[2] = {lo[0], lo[0]};
        for (int t = 0; t < 4; t++) {
            __m512i y0 = _mm512_loadu_si512((const void *)(xg->qs + 64 * t));
            __m512i y1 = _mm512_loadu_si512((const void *)(xg->qs + 64 * (t + 4)));
            for (int r = 0; r < 2; r++) {
                lo[r] = _mm512_dpbusd_epi32(lo[r], wb[r][t], y0);
                hi[r] = _mm512_dpbusd_epi32(hi[r], wb[r][t + 4], y1);
            }
        }
        __m512 d = _mm512_loadu_ps(xg->d), s = _mm512_loadu_ps(xg->s);
        __m512 *acc[2] = {acc0 + g, acc1 + g};
        for (int r = 0; r < 2; r++) {
            __m512 a = *acc[r];
            if (halves) {
                __m512 s_lo = _mm512_loadu_ps(xg->s_lo);
                a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo[r]), _mm512_mul_ps(_mm512_set1_ps(dw[r]), d), a);
                a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi[r]), _mm512_mul_ps(_mm512_set1_ps(cw[r]), d), a);
                a = _mm512_fmadd_ps(_mm512_set1_ps(-32.0f * dw[r]), s_lo, a);
                a = _mm512_fmadd_ps(_mm512_set1_ps(-32.0f * cw[r]), _mm512_sub_ps(s, s_lo), a);
            } else {
                a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(lo[r], hi[r])),
                                    _mm512_mul_ps(_mm512_set1_ps(dw[r]), d), a);
                a = _mm512_fmadd_ps(_mm512_set1_ps(cw[r]), s, a);
            }
            *acc[r] = a;
        }
    }
}

#define GEMM16_LOOP32(BB, UNPACK)                                                                         \
    for (int64_t i = 0; i < nb; i++) {                                                                     \
        __m256i q[2];                                                                                      \
        float dw[2], cw[2];                                                                                \
        UNPACK(w0 + i * (BB), q[0], dw[0], cw[0]);                                                         \
        UNPACK(w1 + i * (BB), q[1], dw[1], cw[1]);                                                         \
        F(apply16)(q, 0, dw, cw, x + i, nb, groups, acc0, acc1);                                           \
    }

/* out0/out1[16 g + r] = <weight row w0/w1, activation row r of group g> for `groups` groups of 16
 * interleaved rows (each nb blocks); w1 may equal w0 */
static void F(gemm16_rows)(int type, const uint8_t *w0, const uint8_t *w1, const block_q8x16 *x, int64_t nb,
                           int64_t groups, float *out0, float *out1) {
    __m512 acc0[groups], acc1[groups];
    for (int64_t g = 0; g < groups; g++) acc0[g] = acc1[g] = _mm512_setzero_ps();
    switch (type) {
    case T_Q8_0: GEMM16_LOOP32(34, UNPACK_Q8_0) break;
    case T_Q4_0: GEMM16_LOOP32(18, UNPACK_Q4_0) break;
    case T_Q4_1: GEMM16_LOOP32(20, UNPACK_Q4_1) break;
    case T_Q5_0: GEMM16_LOOP32(22, UNPACK_Q5_0) break;
    case T_Q5_1: GEMM16_LOOP32(24, UNPACK_Q5_1) break;
    case T_Q4_K:
    case T_Q5_K: {
        int q5 = type == T_Q5_K, bb = q5 ? 176 : 144;
        for (int64_t i = 0; i < nb / 8; i++)
            for (int j = 0; j < 8; j += 2) {
                __m256i lo[2], hi[2];
                float dw[2][2], cw[2][2];
                F(kquant_pair)(w0 + i * bb, q5, j, &lo[0], &hi[0], dw[0], cw[0]);
                F(kquant_pair)(w1 + i * bb, q5, j, &lo[1], &hi[1], dw[1], cw[1]);
                float dlo[2] = {dw[0][0], dw[1][0]}, clo[2] = {cw[0][0], cw[1][0]};
                float dhi[2] = {dw[0][1], dw[1][1]}, chi[2] = {cw[0][1], cw[1][1]};
                F(apply16)(lo, 0, dlo, clo, x + 8 * i + j, nb, groups, acc0, acc1);
                F(apply16)(hi, 0, dhi, chi, x + 8 * i + j + 1, nb, groups, acc0, acc1);
            }
        break;
    }
    case T_Q6_K:
        for (int64_t i = 0; i < nb / 8; i++)
            for (int h = 0; h < 2; h++)
                for (int g = 0; g < 4; g++) {
                    __m256i q[2];
                    float d0[2], d1[2];
                    q[0] = F(q6k_group)(w0 + i * 210, h, g, &d0[0], &d1[0]);
                    q[1] = F(q6k_group)(w1 + i * 210, h, g, &d0[1], &d1[1]);
                    F(apply16)(q, 1, d0, d1, x + 8 * i + 4 * h + g, nb, groups, acc0, acc1);
                }
        break;
    }
    for (int64_t g = 0; g < groups; g++) {
        _mm512_storeu_ps(out0 + 16 * g, acc0[g]);
        _mm512_storeu_ps(out1 + 16 * g, acc1[g]);
    }
}

#undef GEMM16_LOOP32
#undef F
#undef CAT
#undef CAT_
#undef INLINE
