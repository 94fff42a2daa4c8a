/* AVX-512 VNNI: gemm8's scheme on 16 activation rows at once (block_q8x16, 64-byte vectors) and on every
 * group of 16 rows per unpacked weight block, included by ember_kernels.c after gemm_x86.h under the
 * AVX-512 pragma. Lane by lane it does exactly what gemm8 and gemv8 do (the same fma sequence per
 * block), so batches of any size give bit-identical rows. */
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define F(name) CAT(name, SUFFIX)
#define INLINE static inline __attribute__((always_inline))

/* One 32-value weight block (q, its scale dw and offset coefficient cw) against every group of 16
 * activation rows: the 8 broadcasts of its 4-byte groups are made once and reused by all groups.
 * halves: Q6_K, whose two 16-value halves have scales dw and cw (its offset of -32 is implied). */
INLINE void F(apply16)(__m256i q, int halves, float dw, float cw, const block_q8x16 *x, int64_t nb, int64_t groups,
                       __m512 *acc) {
    __m512i wz = _mm512_castsi256_si512(q), wb[8];
    for (int t = 0; t < 8; t++) wb[t] = _mm512_permutexvar_epi32(_mm512_set1_epi32(t), wz);
    for (int64_t g = 0; g < groups; g++) {
        const block_q8x16 *xg = x + g * nb;
        __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
        for (int t = 0; t < 4; t++) {
            lo = _mm512_dpbusd_epi32(lo, wb[t], _mm512_loadu_si512((const void *)(xg->qs + 64 * t)));
            hi = _mm512_dpbusd_epi32(hi, wb[t + 4], _mm512_loadu_si512((const void *)(xg->qs + 64 * (t + 4))));
        }
        __m512 d = _mm512_loadu_ps(xg->d), s = _mm512_loadu_ps(xg->s), a = acc[g];
        if (halves) {
            __m512 s_lo = _mm512_loadu_ps(xg->s_lo);
            a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), _mm512_mul_ps(_mm512_set1_ps(dw), d), a);
            a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_mul_ps(_mm512_set1_ps(cw), d), a);
            a = _mm512_fmadd_ps(_mm512_set1_ps(-32.0f * dw), s_lo, a);
            a = _mm512_fmadd_ps(_mm512_set1_ps(-32.0f * cw), _mm512_sub_ps(s, s_lo), a);
        } else {
            a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(lo, hi)), _mm512_mul_ps(_mm512_set1_ps(dw), d), a);
            a = _mm512_fmadd_ps(_mm512_set1_ps(cw), s, a);
        }
        acc[g] = a;
    }
}

#define GEMM16_LOOP32(BB, UNPACK)                                                                         \
    for (int64_t i = 0; i < nb; i++, w += (BB)) {                                                          \
        __m256i q;                                                                                         \
        float dw, cw;                                                                                      \
        UNPACK(w, q, dw, cw);                                                                              \
        F(apply16)(q, 0, dw, cw, x + i, nb, groups, acc);                                                  \
    }

/* out[16 g + r] = <weight row w, activation row r of group g> for `groups` groups of 16 interleaved rows
 * (each nb blocks) */
static void F(gemm16_rows)(int type, const uint8_t *w, const block_q8x16 *x, int64_t nb, int64_t groups,
                           float *out) {
    __m512 acc[groups];
    for (int64_t g = 0; g < groups; g++) acc[g] = _mm512_setzero_ps();
    switch (type) {
    case T_Q8_0: GEMM16_LOOP32(34, UNPACK_Q8_0) break;
    case T_Q4_0: GEMM16_LOOP32(18, UNPACK_Q4_0) break;
    case T_Q4_1: GEMM16_LOOP32(20, UNPACK_Q4_1) break;
    case T_Q5_0: GEMM16_LOOP32(22, UNPACK_Q5_0) break;
    case T_Q5_1: GEMM16_LOOP32(24, UNPACK_Q5_1) break;
    case T_Q4_K:
    case T_Q5_K: {
        int q5 = type == T_Q5_K;
        for (int64_t i = 0; i < nb / 8; i++, w += q5 ? 176 : 144)
            for (int j = 0; j < 8; j += 2) {
                __m256i lo, hi;
                float dw[2], cw[2];
                F(kquant_pair)(w, q5, j, &lo, &hi, dw, cw);
                F(apply16)(lo, 0, dw[0], cw[0], x + 8 * i + j, nb, groups, acc);
                F(apply16)(hi, 0, dw[1], cw[1], x + 8 * i + j + 1, nb, groups, acc);
            }
        break;
    }
    case T_Q6_K:
        for (int64_t i = 0; i < nb / 8; i++, w += 210)
            for (int h = 0; h < 2; h++)
                for (int g = 0; g < 4; g++) {
                    float dw0, dw1;
                    __m256i q = F(q6k_group)(w, h, g, &dw0, &dw1);
                    F(apply16)(q, 1, dw0, dw1, x + 8 * i + 4 * h + g, nb, groups, acc);
                }
        break;
    }
    for (int64_t g = 0; g < groups; g++) _mm512_storeu_ps(out + 16 * g, acc[g]);
}

#undef GEMM16_LOOP32
#undef F
#undef CAT
#undef CAT_
#undef INLINE
