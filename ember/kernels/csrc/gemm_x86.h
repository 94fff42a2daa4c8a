/* x86 block products, included by ember_kernels.c after dot_x86.h under the same pragmas.
 *
 * Two kernels with the same arithmetic per output, so that a row's result never depends on how many
 * rows share its batch (batch invariance, bit for bit):
 * - gemm8: 8 activation rows against one weight row. The rows are interleaved per block
 *   (block_q8x8): bytes 4t..4t+3 of all 8 rows make one 32-byte vector, and four weight bytes
 *   broadcast against it give row r's partial dot in lane r. The weight block is unpacked once
 *   for 8 rows and no horizontal sum is needed.
 * - gemv8: one activation row against 8 weight rows; each row's block dot is reduced and the 8 sums
 *   transposed into the lanes of one vector.
 * Either way, lane by lane and block by block: acc = fma(float(isum), dw * xd, acc), then
 * acc = fma(cw, x_sum_term, acc) for formats with an offset or minimum.
 *
 * DOT4(acc, w, y): acc += per-lane dot of 4 unsigned weight bytes and 4 signed activation bytes.
 */
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define F(name) CAT(name, SUFFIX)
#define INLINE static inline __attribute__((always_inline))

/* formats whose blocks carry an offset or minimum (an fma on the activation sums) */
#define HAS_CW(type) ((type) != T_Q8_0 || !SIGNED_Q8)

/* Q4_K / Q5_K sub-blocks j and j + 1 of super-block `w`: unsigned values and their scales */
INLINE void F(kquant_pair)(const uint8_t *w, int q5, int j, __m256i *lo, __m256i *hi, float *dw, float *cw) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
    float d = F(half)(w), dmin = F(half)(w + 2);
    int sc0, m0, sc1, m1;
    k_scale_min(j, w + 4, &sc0, &m0);
    k_scale_min(j + 1, w + 4, &sc1, &m1);
    __m256i bits = _mm256_loadu_si256((const __m256i *)(w + (q5 ? 48 : 16) + 16 * j));
    *lo = _mm256_and_si256(bits, m4);
    *hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
    if (q5) {
        __m256i hb = _mm256_loadu_si256((const __m256i *)(w + 16));
        __m256i h0 = _mm256_and_si256(_mm256_srl_epi16(hb, _mm_cvtsi32_si128(j)), one);
        __m256i h1 = _mm256_and_si256(_mm256_srl_epi16(hb, _mm_cvtsi32_si128(j + 1)), one);
        *lo = _mm256_or_si256(*lo, _mm256_slli_epi16(h0, 4));
        *hi = _mm256_or_si256(*hi, _mm256_slli_epi16(h1, 4));
    }
    dw[0] = d * (float)sc0;
    cw[0] = -dmin * (float)m0;
    dw[1] = d * (float)sc1;
    cw[1] = -dmin * (float)m1;
}

/* Q4_K / Q5_K: the 8 6-bit scales and 8 6-bit mins of a super-block (its 12 scale bytes at s), as bytes
 * in the low halves of sc and mn (llama.cpp's bit shuffle, the same values as k_scale_min) */
INLINE void F(kquant_scales)(const uint8_t *s, __m128i *sc, __m128i *mn) {
    uint32_t u[4];
    memcpy(u, s, 12);
    const uint32_t m1 = 0x3f3f3f3f, m2 = 0x0f0f0f0f, m3 = 0x03030303;
    u[3] = ((u[2] >> 4) & m2) | (((u[1] >> 6) & m3) << 4);
    uint32_t aux = u[1] & m1;
    u[1] = (u[2] & m2) | (((u[0] >> 6) & m3) << 4);
    u[2] = aux;
    u[0] &= m1;
    *sc = _mm_set_epi32(0, 0, (int)u[1], (int)u[0]);
    *mn = _mm_set_epi32(0, 0, (int)u[3], (int)u[2]);
}

/* in place: v[r][j] -> v[j][r] for an 8x8 block of floats (data movement only) */
INLINE void F(transpose8)(__m256 *v) {
    __m256 t[8], u[8];
    for (int k = 0; k < 8; k += 2) {
        t[k] = _mm256_unpacklo_ps(v[k], v[k + 1]);
        t[k + 1] = _mm256_unpackhi_ps(v[k], v[k + 1]);
    }
    for (int k = 0; k < 8; k += 4) {
        u[k] = _mm256_shuffle_ps(t[k], t[k + 2], 0x44);
        u[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], 0xEE);
        u[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0x44);
        u[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
    }
    for (int k = 0; k < 4; k++) {
        v[k] = _mm256_permute2f128_ps(u[k], u[k + 4], 0x20);
        v[k + 4] = _mm256_permute2f128_ps(u[k], u[k + 4], 0x31);
    }
}

/* Q6_K: the 32 unsigned 6-bit values of group g (0..3) in half h of super-block `w` */
INLINE __m256i F(q6k_values)(const uint8_t *w, int h, int g) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m3 = _mm256_set1_epi8(3);
    __m256i l = _mm256_loadu_si256((const __m256i *)(w + 64 * h + 32 * (g & 1)));
    __m256i qh = _mm256_loadu_si256((const __m256i *)(w + 128 + 32 * h));
    if (g & 2) l = _mm256_srli_epi16(l, 4);
    qh = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * g));
    return _mm256_or_si256(_mm256_and_si256(l, m4), _mm256_slli_epi16(_mm256_and_si256(qh, m3), 4));
}

/* the same values and the scales of their two 16-value halves */
INLINE __m256i F(q6k_group)(const uint8_t *w, int h, int g, float *dw0, float *dw1) {
    const int8_t *sc = (const int8_t *)(w + 192);
    float d = F(half)(w + 208);
    *dw0 = d * (float)sc[8 * h + 2 * g];
    *dw1 = d * (float)sc[8 * h + 2 * g + 1];
    return F(q6k_values)(w, h, g);
}

/* ---- gemm8: lanes are activation rows ---- */

/* isums over bytes 0..15 and 16..31 of one weight block, all 8 rows */
INLINE void F(block_isums)(__m256i w, int is_signed, const block_q8x8 *x, __m256i *lo, __m256i *hi) {
    __m256i s[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int t = 0; t < 8; t++) {
        __m256i wb = _mm256_permutevar8x32_epi32(w, _mm256_set1_epi32(t));
        __m256i y = _mm256_loadu_si256((const __m256i *)(x->qs + 32 * t));
        if (is_signed) s[t / 4] = _mm256_add_epi32(s[t / 4], F(dot_us)(_mm256_sign_epi8(wb, wb), _mm256_sign_epi8(y, wb)));
        else s[t / 4] = DOT4(s[t / 4], wb, y);
    }
    *lo = s[0];
    *hi = s[1];
}

INLINE void F(block8)(__m256i w, int is_signed, int has_cw, float dw, float cw, const block_q8x8 *x, __m256 *acc) {
    __m256i lo, hi;
    F(block_isums)(w, is_signed, x, &lo, &hi);
    __m256 d = _mm256_mul_ps(_mm256_set1_ps(dw), _mm256_loadu_ps(x->d));
    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi)), d, *acc);
    if (has_cw) *acc = _mm256_fmadd_ps(_mm256_set1_ps(cw), _mm256_loadu_ps(x->s), *acc);
}

/* Q6_K: separate scales on the two halves, and the offset of -32 through the half sums */
INLINE void F(block8_halves)(__m256i w, float dw0, float dw1, const block_q8x8 *x, __m256 *acc) {
    __m256i lo, hi;
    F(block_isums)(w, 0, x, &lo, &hi);
    __m256 d = _mm256_loadu_ps(x->d), s = _mm256_loadu_ps(x->s), s_lo = _mm256_loadu_ps(x->s_lo);
    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_mul_ps(_mm256_set1_ps(dw0), d), *acc);
    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_mul_ps(_mm256_set1_ps(dw1), d), *acc);
    *acc = _mm256_fmadd_ps(_mm256_set1_ps(-32.0f * dw0), s_lo, *acc);
    *acc = _mm256_fmadd_ps(_mm256_set1_ps(-32.0f * dw1), _mm256_sub_ps(s, s_lo), *acc);
}

#define GEMM8_LOOP32(BB, UNPACK)                                                                          \
    for (int64_t i = 0; i < nb; i++, w += (BB)) {                                                          \
        __m256i q;                                                                                         \
        float dw, cw;                                                                                      \
        UNPACK(w, q, dw, cw);                                                                              \
        F(block8)(q, type == T_Q8_0 && SIGNED_Q8, HAS_CW(type), dw, cw, x + i, &acc);                      \
    }

/* out[r] = <weight row w, activation row r> for the 8 rows of x (nb interleaved blocks) */
static void F(gemm8_row)(int type, const uint8_t *w, const block_q8x8 *x, int64_t nb, float *out) {
    __m256 acc = _mm256_setzero_ps();
    switch (type) {
    case T_Q8_0: GEMM8_LOOP32(34, UNPACK_Q8_0) break;
    case T_Q4_0: GEMM8_LOOP32(18, UNPACK_Q4_0) break;
    case T_Q4_1: GEMM8_LOOP32(20, UNPACK_Q4_1) break;
    case T_Q5_0: GEMM8_LOOP32(22, UNPACK_Q5_0) break;
    case T_Q5_1: GEMM8_LOOP32(24, UNPACK_Q5_1) break;
    case T_Q4_K:
    case T_Q5_K: {
        int q5 = type == T_Q5_K;
        for (int64_t i = 0; i < nb / 8; i++, w += q5 ? 176 : 144)
            for (int j = 0; j < 8; j += 2) {
                __m256i lo, hi;
                float dw[2], cw[2];
                F(kquant_pair)(w, q5, j, &lo, &hi, dw, cw);
                F(block8)(lo, 0, 1, dw[0], cw[0], x + 8 * i + j, &acc);
                F(block8)(hi, 0, 1, dw[1], cw[1], x + 8 * i + j + 1, &acc);
            }
        break;
    }
    case T_Q6_K:
        for (int64_t i = 0; i < nb / 8; i++, w += 210)
            for (int h = 0; h < 2; h++)
                for (int g = 0; g < 4; g++) {
                    float dw0, dw1;
                    __m256i q = F(q6k_group)(w, h, g, &dw0, &dw1);
                    F(block8_halves)(q, dw0, dw1, x + 8 * i + 4 * h + g, &acc);
                }
        break;
    }
    _mm256_storeu_ps(out, acc);
}

/* ---- gemv8: lanes are weight rows ---- */

/* lane r = sum of the 8 int32 lanes of p[r] (exact, in any order) */
INLINE __m256i F(transpose_sum)(const __m256i *p) {
    __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
    __m256i c = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, c, 0x20), _mm256_permute2x128_si256(a, c, 0x31));
}

INLINE __m256i F(dot_block)(__m256i q, int is_signed, __m256i y) {
    return is_signed ? F(dot_us)(_mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q)) : F(dot_us)(q, y);
}

INLINE void F(lanes8)(const __m256i *p, const float *dw, const float *cw, int has_cw, float xd, float xs,
                      __m256 *acc) {
    __m256 d = _mm256_mul_ps(_mm256_loadu_ps(dw), _mm256_set1_ps(xd));
    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(F(transpose_sum)(p)), d, *acc);
    if (has_cw) *acc = _mm256_fmadd_ps(_mm256_loadu_ps(cw), _mm256_set1_ps(xs), *acc);
}

#define GEMV8_LOOP32(BB, UNPACK)                                                                          \
    for (int64_t i = 0; i < nb; i++) {                                                                     \
        __m256i p[8], y = _mm256_loadu_si256((const __m256i *)x[i].qs);                                    \
        float dw[8], cw[8];                                                                                \
        for (int r = 0; r < 8; r++) {                                                                      \
            __m256i q;                                                                                     \
            _mm_prefetch((const char *)(w[r] + (i + 16) * (BB)), _MM_HINT_T0);                             \
            UNPACK(w[r] + i * (BB), q, dw[r], cw[r]);                                                      \
            p[r] = F(dot_block)(q, type == T_Q8_0 && SIGNED_Q8, y);                                        \
        }                                                                                                  \
        F(lanes8)(p, dw, cw, HAS_CW(type), x[i].d, x[i].s, &acc);                                          \
    }

/* out[r] = <weight row w[r], activation row x> for 8 weight rows. The 8 rows are 8 streams through
 * memory: prefetching each a few blocks ahead doubled the bandwidth measured on a DRAM-resident matrix. */
static void F(gemv8)(int type, const uint8_t *const *w, const block_q8 *x, int64_t nb, float *out) {
    __m256 acc = _mm256_setzero_ps();
    switch (type) {
    case T_Q8_0: GEMV8_LOOP32(34, UNPACK_Q8_0) break;
    case T_Q4_0: GEMV8_LOOP32(18, UNPACK_Q4_0) break;
    case T_Q4_1: GEMV8_LOOP32(20, UNPACK_Q4_1) break;
    case T_Q5_0: GEMV8_LOOP32(22, UNPACK_Q5_0) break;
    case T_Q5_1: GEMV8_LOOP32(24, UNPACK_Q5_1) break;
    case T_Q4_K:
    case T_Q5_K: {
        int q5 = type == T_Q5_K, bb = q5 ? 176 : 144;
        const __m256i m4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
        for (int64_t i = 0; i < nb / 8; i++) {
            float dw[8][8], cw[8][8];  /* [sub-block][row]: each row's scales decoded once a super-block */
            __m256 vdw[8], vcw[8];        /* [row] over sub-blocks, then transposed */
            for (int r = 0; r < 8; r++) {
                const uint8_t *b = w[r] + i * bb;
                _mm_prefetch((const char *)(b + 4 * bb), _MM_HINT_T0);
                _mm_prefetch((const char *)(b + 4 * bb + 64), _MM_HINT_T0);
                __m128i sc, mn;
                F(kquant_scales)(b + 4, &sc, &mn);
                vdw[r] = _mm256_mul_ps(_mm256_set1_ps(F(half)(b)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sc)));
                vcw[r] = _mm256_mul_ps(_mm256_set1_ps(-F(half)(b + 2)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(mn)));
            }
            F(transpose8)(vdw);
            F(transpose8)(vcw);
            for (int jj = 0; jj < 8; jj++) {
                _mm256_storeu_ps(dw[jj], vdw[jj]);
                _mm256_storeu_ps(cw[jj], vcw[jj]);
            }
            for (int j = 0; j < 8; j += 2) {
                const block_q8 *x0 = x + 8 * i + j, *x1 = x0 + 1;
                __m256i y0 = _mm256_loadu_si256((const __m256i *)x0->qs), y1 = _mm256_loadu_si256((const __m256i *)x1->qs);
                __m256i plo[8], phi[8];
                for (int r = 0; r < 8; r++) {
                    const uint8_t *b = w[r] + i * bb;
                    __m256i bits = _mm256_loadu_si256((const __m256i *)(b + (q5 ? 48 : 16) + 16 * j));
                    __m256i lo = _mm256_and_si256(bits, m4), hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
                    if (q5) {
                        __m256i hb = _mm256_loadu_si256((const __m256i *)(b + 16));
                        __m256i h0 = _mm256_and_si256(_mm256_srl_epi16(hb, _mm_cvtsi32_si128(j)), one);
                        __m256i h1 = _mm256_and_si256(_mm256_srl_epi16(hb, _mm_cvtsi32_si128(j + 1)), one);
                        lo = _mm256_or_si256(lo, _mm256_slli_epi16(h0, 4));
                        hi = _mm256_or_si256(hi, _mm256_slli_epi16(h1, 4));
                    }
                    plo[r] = F(dot_us)(lo, y0);
                    phi[r] = F(dot_us)(hi, y1);
                }
                F(lanes8)(plo, dw[j], cw[j], 1, x0->d, x0->s, &acc);
                F(lanes8)(phi, dw[j + 1], cw[j + 1], 1, x1->d, x1->s, &acc);
            }
        }
        break;
    }
    case T_Q6_K: {
        const __m256i low_half = _mm256_setr_epi32(-1, -1, -1, -1, 0, 0, 0, 0);
        for (int64_t i = 0; i < nb / 8; i++) {
            __m256 ds[2][8];  /* [half of the 16 scales][row], then transposed to [scale][row] */
            for (int r = 0; r < 8; r++) {
                const uint8_t *b = w[r] + i * 210;
                _mm_prefetch((const char *)(b + 4 * 210), _MM_HINT_T0);
                _mm_prefetch((const char *)(b + 4 * 210 + 64), _MM_HINT_T0);
                _mm_prefetch((const char *)(b + 4 * 210 + 128), _MM_HINT_T0);
                __m128i sc = _mm_loadu_si128((const __m128i *)(b + 192));
                __m256 d = _mm256_set1_ps(F(half)(b + 208));
                ds[0][r] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)));
                ds[1][r] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8))));
            }
            F(transpose8)(ds[0]);
            F(transpose8)(ds[1]);  /* ds[s / 8][s % 8] = scale s of every row */
            for (int h = 0; h < 2; h++)
                for (int g = 0; g < 4; g++) {
                    const block_q8 *xg = x + 8 * i + 4 * h + g;
                    __m256i y = _mm256_loadu_si256((const __m256i *)xg->qs), plo[8], phi[8];
                    for (int r = 0; r < 8; r++) {
                        __m256i p = F(dot_us)(F(q6k_values)(w[r] + i * 210, h, g), y);
                        plo[r] = _mm256_and_si256(p, low_half);
                        phi[r] = _mm256_andnot_si256(low_half, p);
                    }
                    __m256 d0 = ds[h][2 * g], d1 = ds[h][2 * g + 1], dv = _mm256_set1_ps(xg->d);
                    const __m256 m32 = _mm256_set1_ps(-32.0f);
                    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(F(transpose_sum)(plo)), _mm256_mul_ps(d0, dv), acc);
                    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(F(transpose_sum)(phi)), _mm256_mul_ps(d1, dv), acc);
                    acc = _mm256_fmadd_ps(_mm256_mul_ps(m32, d0), _mm256_set1_ps(xg->s_lo), acc);
                    acc = _mm256_fmadd_ps(_mm256_mul_ps(m32, d1), _mm256_set1_ps(xg->s - xg->s_lo), acc);
                }
        }
        break;
    }
    }
    _mm256_storeu_ps(out, acc);
}

#undef GEMM8_LOOP32
#undef GEMV8_LOOP32
#undef HAS_CW
#undef F
#undef CAT
#undef CAT_
#undef INLINE
