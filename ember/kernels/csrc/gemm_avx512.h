/* AVX-512 VNNI: gemm8's scheme on 16 activation rows at once (block_q8x16, 64-byte vectors), included by
 * ember_kernels.c after gemm_x86.h under the AVX-512 pragma. Lane by lane it does exactly what gemm8 and
 * gemv8 do (the same fma sequence per block), so batches of any size give bit-identical rows. */
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define F(name) CAT(name, SUFFIX)
#define INLINE static inline __attribute__((always_inline))

INLINE void F(block_isums16)(__m256i w, const block_q8x16 *x, __m512i *lo, __m512i *hi) {
    __m512i wz = _mm512_castsi256_si512(w), s[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
    for (int t = 0; t < 8; t++) {
        __m512i wb = _mm512_permutexvar_epi32(_mm512_set1_epi32(t), wz);
        s[t / 4] = _mm512_dpbusd_epi32(s[t / 4], wb, _mm512_loadu_si512((const void *)(x->qs + 64 * t)));
    }
    *lo = s[0];
    *hi = s[1];
}

INLINE void F(block16)(__m256i w, int has_cw, float dw, float cw, const block_q8x16 *x, __m512 *acc) {
    __m512i lo, hi;
    F(block_isums16)(w, x, &lo, &hi);
    __m512 d = _mm512_mul_ps(_mm512_set1_ps(dw), _mm512_loadu_ps(x->d));
    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(lo, hi)), d, *acc);
    if (has_cw) *acc = _mm512_fmadd_ps(_mm512_set1_ps(cw), _mm512_loadu_ps(x->s), *acc);
}

INLINE void F(block16_halves)(__m256i w, float dw0, float dw1, const block_q8x16 *x, __m512 *acc) {
    __m512i lo, hi;
    F(block_isums16)(w, x, &lo, &hi);
    __m512 d = _mm512_loadu_ps(x->d), s = _mm512_loadu_ps(x->s), s_lo = _mm512_loadu_ps(x->s_lo);
    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), _mm512_mul_ps(_mm512_set1_ps(dw0), d), *acc);
    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_mul_ps(_mm512_set1_ps(dw1), d), *acc);
    *acc = _mm512_fmadd_ps(_mm512_set1_ps(-32.0f * dw0), s_lo, *acc);
    *acc = _mm512_fmadd_ps(_mm512_set1_ps(-32.0f * dw1), _mm512_sub_ps(s, s_lo), *acc);
}

#define GEMM16_LOOP32(BB, UNPACK)                                                                         \
    for (int64_t i = 0; i < nb; i++, w += (BB)) {                                                          \
        __m256i q;                                                                                         \
        float dw, cw;                                                                                      \
        UNPACK(w, q, dw, cw);                                                                              \
        F(block16)(q, 1, dw, cw, x + i, &acc);                                                             \
    }

/* out[r] = <weight row w, activation row r> for the 16 rows of x (nb interleaved blocks) */
static void F(gemm16_row)(int type, const uint8_t *w, const block_q8x16 *x, int64_t nb, float *out) {
    __m512 acc = _mm512_setzero_ps();
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
                F(block16)(lo, 1, dw[0], cw[0], x + 8 * i + j, &acc);
                F(block16)(hi, 1, dw[1], cw[1], x + 8 * i + j + 1, &acc);
            }
        break;
    }
    case T_Q6_K:
        for (int64_t i = 0; i < nb / 8; i++, w += 210)
            for (int h = 0; h < 2; h++)
                for (int g = 0; g < 4; g++) {
                    float dw0, dw1;
                    __m256i q = F(q6k_group)(w, h, g, &dw0, &dw1);
                    F(block16_halves)(q, dw0, dw1, x + 8 * i + 4 * h + g, &acc);
                }
        break;
    }
    _mm512_storeu_ps(out, acc);
}

#undef GEMM16_LOOP32
#undef F
#undef CAT
#undef CAT_
#undef INLINE
