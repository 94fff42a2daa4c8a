/* x86 helpers for the block kernels (gemm_x86.h), included twice by ember_kernels.c under different
 * `#pragma GCC target`s: AVX2 (DOT_US = vpmaddubsw + vpmaddwd) and AVX-VNNI (DOT_US = vpdpbusd).
 * SUFFIX names each copy.
 *
 * Every 32-value weight block reduces to a vector q of 32 unsigned bytes (UNPACK_*), a scale dw on
 * its integer dot with the activation bytes, and a coefficient cw on the activation block's sum d*sum
 * (the format's offset or minimum). Q8_0 is signed: SIGNED_Q8 says how a copy handles it.
 * The UNPACK_* macros stay defined for the kernels included after this file (ember_kernels.c
 * undefines them after each copy).
 */
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define F(name) CAT(name, SUFFIX)
#define INLINE static inline __attribute__((always_inline))

/* 16 packed bytes -> 32 nibbles: low nibbles in bytes 0..15, high nibbles in 16..31 */
INLINE __m256i F(nibbles32)(const uint8_t *p) {
    __m128i t = _mm_loadu_si128((const __m128i *)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0x0F));
}

/* bit j of a little-endian uint32 -> byte j = 0x10 where set (the fifth bit of Q5_0 / Q5_1) */
INLINE __m256i F(bits32_x10)(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int)v), shuf);
    b = _mm256_or_si256(b, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    return _mm256_and_si256(_mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1)), _mm256_set1_epi8(0x10));
}

/* unsigned bytes x signed bytes -> 8 int32 sums of 4 products each */
INLINE __m256i F(dot_us)(__m256i u, __m256i s) { return DOT_US(u, s); }

INLINE float F(half)(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

#if SIGNED_Q8
#define UNPACK_Q8_0(p, q, dw, cw) (q = _mm256_loadu_si256((const __m256i *)((p) + 2)), dw = F(half)(p), cw = 0.0f)
#else /* offset to unsigned; the offset of 128 comes back through the activation sums */
#define UNPACK_Q8_0(p, q, dw, cw) \
    (q = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)((p) + 2)), _mm256_set1_epi8((char)0x80)), \
     dw = F(half)(p), cw = -128.0f * dw)
#endif
#define UNPACK_Q4_0(p, q, dw, cw) (q = F(nibbles32)((p) + 2), dw = F(half)(p), cw = -8.0f * dw)
#define UNPACK_Q4_1(p, q, dw, cw) (q = F(nibbles32)((p) + 4), dw = F(half)(p), cw = F(half)((p) + 2))
#define UNPACK_Q5_0(p, q, dw, cw) \
    (q = _mm256_or_si256(F(nibbles32)((p) + 6), F(bits32_x10)((p) + 2)), dw = F(half)(p), cw = -16.0f * dw)
#define UNPACK_Q5_1(p, q, dw, cw) \
    (q = _mm256_or_si256(F(nibbles32)((p) + 8), F(bits32_x10)((p) + 4)), dw = F(half)(p), cw = F(half)((p) + 2))


INLINE int32_t F(hsum_epi32)(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

/* quantize_row_q8 (ember_kernels.c) with vectors, bit for bit: the same amax, d, 1/d, products and
 * round-half-even conversion (the default MXCSR mode nearbyintf also follows) */
static void F(quantize_row)(const float *x, int64_t k, block_q8 *out) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t i = 0; i < k / 32; i++, x += 32) {
        __m256 v[4], mx = _mm256_setzero_ps();
        for (int t = 0; t < 4; t++) {
            v[t] = _mm256_loadu_ps(x + 8 * t);
            mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[t]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float d = _mm_cvtss_f32(m4) / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        __m256i q[4];
        for (int t = 0; t < 4; t++) q[t] = _mm256_cvtps_epi32(_mm256_mul_ps(v[t], _mm256_set1_ps(id)));
        int32_t lo = F(hsum_epi32)(_mm256_add_epi32(q[0], q[1]));
        int32_t sum = lo + F(hsum_epi32)(_mm256_add_epi32(q[2], q[3]));
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)out[i].qs, _mm256_permutevar8x32_epi32(p, order));
        out[i].d = d;
        out[i].s = d * (float)sum;
        out[i].s_lo = d * (float)lo;
        out[i].sum = sum;
    }
}
