/* Ember's CPU kernels: products of packed GGUF weight blocks with float activations, dequantization,
 * and the thread pool that runs them. Loaded with ctypes (see ember/kernels/cpu.py); no Python API.
 *
 * Activations are quantized on the fly to blocks of 32 int8 values with one float scale and the
 * integer sum of the block (the sum folds a weight block's offset or minimum into one multiply), as
 * llama.cpp's q8_1 does. Each weight format then needs only an integer dot product of 32 pairs per
 * block. Kernels exist five times: portable C (correct everywhere, ARM included), AVX2+FMA, AVX2 with
 * AVX-VNNI (vpdpbusd), AVX-512 VNNI, and AVX-512 with AMX tiles for batches of 16 rows and more; the best
 * the CPU (and, for AMX, the kernel) allows is picked at load (ember_init).
 *
 * Work is split into chunks of output rows taken from one atomic counter, so a pool thread that
 * the OS has not scheduled just takes no chunk: a shared core slows a product, never stalls it.
 */
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#define EMBER_X86 1
#include <immintrin.h>
#endif
/* AMX: Linux grants the tile state on request; GCC has the tile intrinsics from version 11 */
#if defined(__x86_64__) && defined(__linux__) && !defined(__clang__) && __GNUC__ >= 11
#define EMBER_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

enum { T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
       T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14 };

typedef struct {
    float d;       /* scale: x ~= d * qs */
    float s;       /* d * sum of qs */
    float s_lo;    /* d * sum of qs[0..15] (Q6_K's half-block scales) */
    int32_t sum;   /* sum of qs */
    int8_t qs[32];
} block_q8;        /* 48 bytes */

typedef struct {
    float d[8];      /* per row */
    float s[8];      /* d * sum of the row's 32 values */
    float s_lo[8];   /* d * sum of the first 16 */
    int8_t qs[256];  /* bytes 4t..4t+3 of rows 0..7, then 4t+4.. (see gemm_x86.h) */
} block_q8x8;        /* one block of 8 activation rows, interleaved */

typedef struct {
    float d[16], s[16], s_lo[16];
    int8_t qs[512];  /* bytes 4t..4t+3 of rows 0..15, then 4t+4.. (see gemm_avx512.h) */
} block_q8x16;       /* the same for 16 rows (AVX-512) */

static float f16_table[65536];

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) {
        float f = ldexpf((float)mant, -24);
        return sign ? -f : f;
    }
    bits = exp == 31 ? (sign | 0x7f800000u | (mant << 13)) : (sign | ((exp + 112) << 23) | (mant << 13));
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return f16_table[h];
}

/* ---- block geometry ------------------------------------------------------------------------- */

static int block_elems(int type) { return type >= T_Q4_K ? 256 : 32; }

static int block_bytes(int type) {
    switch (type) {
    case T_Q4_0: return 18;
    case T_Q4_1: return 20;
    case T_Q5_0: return 22;
    case T_Q5_1: return 24;
    case T_Q8_0: return 34;
    case T_Q4_K: return 144;
    case T_Q5_K: return 176;
    case T_Q6_K: return 210;
    default: return 0;
    }
}

/* Q4_K / Q5_K: 6-bit scale and min of sub-block j (llama.cpp's get_scale_min_k4). */
static inline void k_scale_min(int j, const uint8_t *s, int *sc, int *m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* ---- dequantization (portable; the same float arithmetic, in the same order, as gguf.quants) -- */

static void dequant_block(int type, const uint8_t *b, float *y) {
    switch (type) {
    case T_Q8_0: {
        float d = f16(b);
        for (int j = 0; j < 32; j++) y[j] = (float)(int8_t)b[2 + j] * d;
        break;
    }
    case T_Q4_0: {
        float d = f16(b);
        for (int j = 0; j < 16; j++) {
            y[j] = (float)((b[2 + j] & 0xF) - 8) * d;
            y[j + 16] = (float)((b[2 + j] >> 4) - 8) * d;
        }
        break;
    }
    case T_Q4_1: {
        float d = f16(b), m = f16(b + 2);
        for (int j = 0; j < 16; j++) {
            y[j] = (float)(b[4 + j] & 0xF) * d + m;
            y[j + 16] = (float)(b[4 + j] >> 4) * d + m;
        }
        break;
    }
    case T_Q5_0:
    case T_Q5_1: {
        int q51 = type == T_Q5_1;
        float d = f16(b), m = q51 ? f16(b + 2) : 0.0f;
        uint32_t qh;
        memcpy(&qh, b + (q51 ? 4 : 2), 4);
        const uint8_t *qs = b + (q51 ? 8 : 6);
        for (int j = 0; j < 16; j++) {
            int lo = (qs[j] & 0xF) | (((qh >> j) & 1) << 4), hi = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
            if (q51) {
                y[j] = (float)lo * d + m;
                y[j + 16] = (float)hi * d + m;
            } else {
                y[j] = (float)(lo - 16) * d;
                y[j + 16] = (float)(hi - 16) * d;
            }
        }
        break;
    }
    case T_Q4_K:
    case T_Q5_K: {
        int q5 = type == T_Q5_K;
        float d = f16(b), dmin = f16(b + 2);
        const uint8_t *sc = b + 4, *qh = b + 16, *qs = b + (q5 ? 48 : 16);
        for (int j = 0; j < 8; j++) {
            int s, m;
            k_scale_min(j, sc, &s, &m);
            float ds = d * (float)s, dm = dmin * (float)m;
            const uint8_t *q = qs + 32 * (j / 2);
            for (int l = 0; l < 32; l++) {
                int v = (j & 1) ? (q[l] >> 4) : (q[l] & 0xF);
                if (q5) v |= ((qh[l] >> j) & 1) << 4;
                y[32 * j + l] = (float)v * ds - dm;
            }
        }
        break;
    }
    case T_Q6_K: {
        float d = f16(b + 208);
        const int8_t *sc = (const int8_t *)(b + 192);
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = b + 64 * h, *qh = b + 128 + 32 * h;
            for (int l = 0; l < 32; l++) {
                int q[4] = {(ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4), (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4),
                            (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4), (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)};
                for (int g = 0; g < 4; g++) {
                    int e = 128 * h + 32 * g + l;
                    y[e] = (float)(q[g] - 32) * (d * (float)sc[e / 16]);
                }
            }
        }
        break;
    }
    }
}

static void dequant_row(int type, const uint8_t *row, int64_t k, float *y) {
    if (type == T_F32) {
        memcpy(y, row, (size_t)k * 4);
        return;
    }
    if (type == T_F16) {
        for (int64_t i = 0; i < k; i++) y[i] = f16(row + 2 * i);
        return;
    }
    int be = block_elems(type), bb = block_bytes(type);
    for (int64_t i = 0; i < k / be; i++) dequant_block(type, row + i * bb, y + i * be);
}

/* ---- activation quantization -------------------------------------------------------------- */

static void quantize_row_q8(const float *x, int64_t k, block_q8 *out) {
    for (int64_t i = 0; i < k / 32; i++, x += 32) {
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[j]));
        float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        int32_t sum = 0, lo = 0;
        for (int j = 0; j < 32; j++) {
            int v = (int)nearbyintf(x[j] * id);
            out[i].qs[j] = (int8_t)v;
            sum += v;
            lo += j < 16 ? v : 0;
        }
        out[i].d = d;
        out[i].s = d * (float)sum;
        out[i].s_lo = d * (float)lo;
        out[i].sum = sum;
    }
}

/* ---- dot products, portable ------------------------------------------------------------------ */

/* dot of one weight row (nb blocks of `type`) with one quantized activation row */
static inline int32_t idot16(const uint8_t *lo_hi_src, int high, const int8_t *y) { /* 16 nibbles */
    int32_t s = 0;
    for (int j = 0; j < 16; j++) s += (high ? (lo_hi_src[j] >> 4) : (lo_hi_src[j] & 0xF)) * y[j];
    return s;
}

static float dot_portable(int type, const uint8_t *w, const block_q8 *x, int64_t nb) {
    float acc = 0.0f;
    int bb = block_bytes(type);
    for (int64_t i = 0; i < nb * 32 / block_elems(type); i++, w += bb) {
        switch (type) {
        case T_Q8_0: {
            int32_t s = 0;
            for (int j = 0; j < 32; j++) s += (int8_t)w[2 + j] * x[i].qs[j];
            acc += f16(w) * x[i].d * (float)s;
            break;
        }
        case T_Q4_0: {
            int32_t s = idot16(w + 2, 0, x[i].qs) + idot16(w + 2, 1, x[i].qs + 16);
            acc += f16(w) * x[i].d * (float)(s - 8 * x[i].sum);
            break;
        }
        case T_Q4_1: {
            int32_t s = idot16(w + 4, 0, x[i].qs) + idot16(w + 4, 1, x[i].qs + 16);
            acc += f16(w) * x[i].d * (float)s + f16(w + 2) * x[i].d * (float)x[i].sum;
            break;
        }
        case T_Q5_0:
        case T_Q5_1: {
            int q51 = type == T_Q5_1;
            uint32_t qh;
            memcpy(&qh, w + (q51 ? 4 : 2), 4);
            const uint8_t *qs = w + (q51 ? 8 : 6);
            int32_t s = 0;
            for (int j = 0; j < 16; j++) {
                s += ((qs[j] & 0xF) | (((qh >> j) & 1) << 4)) * x[i].qs[j];
                s += ((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) * x[i].qs[j + 16];
            }
            if (q51) acc += f16(w) * x[i].d * (float)s + f16(w + 2) * x[i].d * (float)x[i].sum;
            else acc += f16(w) * x[i].d * (float)(s - 16 * x[i].sum);
            break;
        }
        case T_Q4_K:
        case T_Q5_K: {
            int q5 = type == T_Q5_K;
            float d = f16(w), dmin = f16(w + 2);
            const uint8_t *qh = w + 16, *qs = w + (q5 ? 48 : 16);
            const block_q8 *xb = x + 8 * i;
            for (int j = 0; j < 8; j++) {
                int sc, m;
                k_scale_min(j, w + 4, &sc, &m);
                const uint8_t *q = qs + 32 * (j / 2);
                int32_t s = 0;
                for (int l = 0; l < 32; l++) {
                    int v = (j & 1) ? (q[l] >> 4) : (q[l] & 0xF);
                    if (q5) v |= ((qh[l] >> j) & 1) << 4;
                    s += v * xb[j].qs[l];
                }
                acc += d * (float)sc * xb[j].d * (float)s - dmin * (float)m * xb[j].d * (float)xb[j].sum;
            }
            break;
        }
        case T_Q6_K: {
            float d = f16(w + 208);
            const int8_t *sc = (const int8_t *)(w + 192);
            const block_q8 *xb = x + 8 * i;
            for (int h = 0; h < 2; h++) {
                const uint8_t *ql = w + 64 * h, *qh = w + 128 + 32 * h;
                for (int g = 0; g < 4; g++) {
                    const block_q8 *xg = xb + 4 * h + g;
                    int32_t s[2] = {0, 0};
                    for (int l = 0; l < 32; l++) {
                        int lo = (g & 1) ? ql[l + 32] : ql[l];
                        int v = ((g & 2) ? (lo >> 4) : (lo & 0xF)) | (((qh[l] >> (2 * g)) & 3) << 4);
                        s[l / 16] += (v - 32) * xg->qs[l];
                    }
                    int e = 128 * h + 32 * g;
                    acc += d * xg->d * (float)(sc[e / 16] * s[0] + sc[e / 16 + 1] * s[1]);
                }
            }
            break;
        }
        }
    }
    return acc;
}

/* out[0..7] = <weight row, activation row r> for the 8 interleaved rows of x */
typedef void (*gemm8_fn)(int type, const uint8_t *w, const block_q8x8 *x, int64_t nb, float *out);
/* out[0..7] = <weight row w[r], activation row x> */
typedef void (*gemv8_fn)(int type, const uint8_t *const *w, const block_q8 *x, int64_t nb, float *out);
/* out0/out1[16 g + r] = <weight row w0/w1, activation row r of group g> for `groups` groups of 16
 * interleaved rows */
typedef void (*gemm16_fn)(int type, const uint8_t *w0, const uint8_t *w1, const block_q8x16 *x, int64_t nb,
                          int64_t groups, float *out0, float *out1);
/* one row of activations to 8-bit blocks (quantize_row_q8's arithmetic) */
typedef void (*quantize_fn)(const float *x, int64_t k, block_q8 *out);
/* AMX: 16 weight rows unpacked to bytes, then their products with groups of 16 rows (gemm_amx.h) */
typedef void (*amx_unpack_fn)(int type, const uint8_t *w, int64_t row_bytes, int64_t rows, int64_t nb, uint8_t *wq,
                              float *dw, float *cw);
typedef void (*amx_gemm_fn)(int type, const uint8_t *wq, const float *dw, const float *cw, const block_q8x16 *x,
                            int64_t nb, int64_t m, int rows, float *y, int64_t ldy, const float *bias, int accumulate);

/* `group` (8 or 16) rows of activation blocks, fewer at the end of a batch (the rest zero), interleaved
 * as block_q8x8 / block_q8x16: per block the rows' d, s and s_lo, then bytes 4t..4t+3 of every row. */
static void pack_group(const block_q8 *x, int64_t rows, int64_t nb, int group, void *out) {
    size_t bytes = group == 8 ? sizeof(block_q8x8) : sizeof(block_q8x16);
    for (int64_t b = 0; b < nb; b++) {
        float *d = (float *)((char *)out + b * bytes), *s = d + group, *s_lo = s + group;
        int8_t *qs = (int8_t *)(s_lo + group);
        memset(d, 0, bytes);
        for (int64_t r = 0; r < rows; r++) {
            const block_q8 *src = x + r * nb + b;
            d[r] = src->d;
            s[r] = src->s;
            s_lo[r] = src->s_lo;
            for (int t = 0; t < 8; t++) memcpy(qs + 4 * group * t + 4 * r, src->qs + 4 * t, 4);
        }
    }
}

/* ---- dot products, x86: AVX2 + FMA; with AVX-VNNI; with AVX-512 VNNI (+ 16-row gemm) ----------- */
#ifdef EMBER_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define DOT_US(u, s) _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
#define DOT4(acc, w, y) _mm256_add_epi32(acc, DOT_US(w, y))
#define SIGNED_Q8 1
#define SUFFIX _avx2
#include "dot_x86.h"
#include "gemm_x86.h"
#include "undef_x86.h"
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
#define DOT_US(u, s) _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s)
#define DOT4(acc, w, y) _mm256_dpbusd_avx_epi32(acc, w, y)
#define SIGNED_Q8 0
#define SUFFIX _avxvnni
#include "dot_x86.h"
#include "gemm_x86.h"
#include "undef_x86.h"
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#define DOT_US(u, s) _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
#define DOT4(acc, w, y) _mm256_dpbusd_epi32(acc, w, y)
#define SIGNED_Q8 0
#define SUFFIX _avx512
#include "dot_x86.h"
#include "gemm_x86.h"
#include "gemm_avx512.h"
#include "undef_x86.h"
#pragma GCC pop_options

#ifdef EMBER_AMX
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8")
#define DOT_US(u, s) _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
#define DOT4(acc, w, y) _mm256_dpbusd_epi32(acc, w, y)
#define SIGNED_Q8 0
#define SUFFIX _amx
#include "dot_x86.h"
#include "gemm_x86.h"
#include "gemm_avx512.h"
#include "gemm_amx.h"
#include "undef_x86.h"
#pragma GCC pop_options
#endif
#endif

/* ---- thread pool ------------------------------------------------------------------------------ */

typedef void (*task_fn)(void *ctx, int64_t chunk);

#define MAX_THREADS 64
#define SPIN_ITERS 20000

static struct {
    pthread_mutex_t busy;            /* one job at a time; a caller that finds it held runs inline */
    pthread_mutex_t mu;
    pthread_cond_t wake;
    pthread_t threads[MAX_THREADS];
    int n_workers;                   /* threads besides the caller */
    int stop;
    _Atomic uint32_t gen;            /* job generation */
    _Atomic uint64_t next;           /* (generation << 32) | next chunk */
    _Atomic int64_t done;
    task_fn fn;
    void *ctx;
    _Atomic int64_t n_chunks;
} pool = {.busy = PTHREAD_MUTEX_INITIALIZER, .mu = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static inline void cpu_relax(void) {
#ifdef EMBER_X86
    _mm_pause();
#endif
}

/* Take chunks of job `gen` until none is left; the generation in the counter keeps a late thread
 * from taking a chunk of a later job with a stale view of it. A chunk claimed (the compare-exchange
 * succeeded while the counter still held this generation) is this job's: parallel_for closes the
 * counter before it writes the next job's fn, ctx and n_chunks, so a thread that read the next job's
 * n_chunks can no longer claim anything with it. */
static void run_chunks(uint32_t gen) {
    for (;;) {
        uint64_t v = atomic_load(&pool.next);
        if ((uint32_t)(v >> 32) != gen || (int64_t)(v & 0xffffffffu) >= pool.n_chunks) return;
        if (!atomic_compare_exchange_weak(&pool.next, &v, v + 1)) continue;
        pool.fn(pool.ctx, (int64_t)(v & 0xffffffffu));
        atomic_fetch_add(&pool.done, 1);
    }
}

static void *worker(void *arg) {
    (void)arg;
    uint32_t seen = atomic_load(&pool.gen);
    for (;;) {
        int spins = 0;
        while (atomic_load(&pool.gen) == seen) {
            if (++spins < SPIN_ITERS) {
                cpu_relax();
                continue;
            }
            pthread_mutex_lock(&pool.mu);
            while (atomic_load(&pool.gen) == seen && !pool.stop) pthread_cond_wait(&pool.wake, &pool.mu);
            pthread_mutex_unlock(&pool.mu);
            if (pool.stop) return NULL;
        }
        if (pool.stop) return NULL;
        seen = atomic_load(&pool.gen);
        run_chunks(seen);
    }
}

static void parallel_for(task_fn fn, void *ctx, int64_t n_chunks) {
    if (n_chunks <= 0) return;
    if (n_chunks == 1 || pool.n_workers == 0 || pthread_mutex_trylock(&pool.busy) != 0) {
        for (int64_t c = 0; c < n_chunks; c++) fn(ctx, c);
        return;
    }
    uint32_t gen = atomic_load(&pool.gen) + 1;
    /* closed first: a thread still in the last job's run_chunks must not claim a chunk between here and
     * the opening below (with this job's n_chunks and the last one's counter, it ran a chunk twice,
     * with a ctx from a finished call's stack: a crash) */
    atomic_store(&pool.next, ((uint64_t)gen << 32) | 0xffffffffu);
    pool.fn = fn;
    pool.ctx = ctx;
    atomic_store(&pool.n_chunks, n_chunks);
    atomic_store(&pool.done, 0);
    atomic_store(&pool.next, (uint64_t)gen << 32);
    pthread_mutex_lock(&pool.mu);
    atomic_store(&pool.gen, gen);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
    run_chunks(gen);
    for (int spins = 0; atomic_load(&pool.done) < n_chunks; spins++) {
        if (spins < SPIN_ITERS) cpu_relax();
        else sched_yield();
    }
    pthread_mutex_unlock(&pool.busy);
}

/* Threads used by every kernel, the caller included. Not to be called while a kernel runs. */
int ember_set_num_threads(int n) {
    if (n < 1) n = 1;
    if (n > MAX_THREADS) n = MAX_THREADS;
    pthread_mutex_lock(&pool.busy);
    pthread_mutex_lock(&pool.mu);
    pool.stop = 1;
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
    for (int i = 0; i < pool.n_workers; i++) pthread_join(pool.threads[i], NULL);
    pool.stop = 0;
    pool.n_workers = 0;
    for (int i = 0; i < n - 1; i++) {
        if (pthread_create(&pool.threads[i], NULL, worker, NULL) != 0) break;
        pool.n_workers++;
    }
    pthread_mutex_unlock(&pool.busy);
    return pool.n_workers + 1;
}

int ember_num_threads(void) { return pool.n_workers + 1; }

/* ---- public entry points ------------------------------------------------------------------------ */

/* the x86 kernels, NULL on the portable path */
static gemm8_fn best_gemm8 = NULL;
static gemv8_fn best_gemv8 = NULL;
static gemm16_fn best_gemm16 = NULL;  /* AVX-512 only */
static quantize_fn best_quantize = quantize_row_q8;
static struct {
    amx_unpack_fn unpack;
    amx_gemm_fn gemm;
    void (*begin)(int halves);  /* tile configuration for whole blocks, or Q6_K's halves */
    void (*end)(void);
} amx;  /* AMX only: all NULL elsewhere */
static const char *isa_name = "portable";

#ifdef EMBER_AMX
/* AMX-TILE and AMX-INT8 (CPUID.(EAX=7,ECX=0):EDX[24,25]), and the kernel's leave to use the tile data
 * (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, once per process) */
static int amx_usable(void) {
    static int usable = -1;
    if (usable < 0) {
        unsigned a, b, c, d;
        __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
        usable = (d & (3u << 24)) == (3u << 24) && syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    }
    return usable;
}
#endif

/* 0 portable, 1 avx2, 2 avx-vnni, 3 avx512-vnni, 4 avx512-amx: the best the CPU supports up to `max_level`. */
int ember_init(int max_level) {
    for (uint32_t h = 0; h < 65536; h++) f16_table[h] = half_to_float((uint16_t)h);
    best_gemm8 = NULL;
    best_gemv8 = NULL;
    best_gemm16 = NULL;
    best_quantize = quantize_row_q8;
    memset(&amx, 0, sizeof amx);
    isa_name = "portable";
#ifdef EMBER_X86
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    unsigned a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(1));
    int avxvnni = avx2 && (a & (1u << 4));  /* CPUID.(EAX=7,ECX=1):EAX[4] */
    int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#ifdef EMBER_AMX
    if (max_level >= 4 && avx512 && amx_usable()) {
        best_gemm8 = gemm8_row_amx;
        best_gemv8 = gemv8_amx;
        best_quantize = quantize_row_amx;
        best_gemm16 = gemm16_rows_amx;
        amx.unpack = amx_unpack_amx;
        amx.gemm = amx_gemm_amx;
        amx.begin = amx_begin_amx;
        amx.end = amx_end_amx;
        isa_name = "avx512-amx";
        return 0;
    }
#endif
    if (max_level >= 3 && avx512) {
        best_gemm8 = gemm8_row_avx512;
        best_gemv8 = gemv8_avx512;
        best_quantize = quantize_row_avx512;
        best_gemm16 = gemm16_rows_avx512;
        isa_name = "avx512-vnni";
    } else if (max_level >= 2 && avxvnni) {
        best_gemm8 = gemm8_row_avxvnni;
        best_gemv8 = gemv8_avxvnni;
        best_quantize = quantize_row_avxvnni;
        isa_name = "avx-vnni";
    } else if (max_level >= 1 && avx2) {
        best_gemm8 = gemm8_row_avx2;
        best_gemv8 = gemv8_avx2;
        best_quantize = quantize_row_avx2;
        isa_name = "avx2";
    }
#else
    (void)max_level;
#endif
    return 0;
}

const char *ember_isa(void) { return isa_name; }


typedef struct {
    int type;
    const uint8_t *w;
    int64_t row_bytes, n_out, k, m, rows_per_chunk, ldy;
    const block_q8 *x;
    const block_q8x8 *x8;  /* the same rows interleaved in groups of 8, when gemm8 runs */
    const block_q8x16 *x16;  /* or in groups of 16, when gemm16 runs */
    float *y;
    const float *bias;
    int accumulate;        /* y += instead of y = */
} matmul_job;

static inline void store_out(const matmul_job *j, int64_t row, int64_t col, float v) {
    float *dst = j->y + row * j->ldy + col;
    *dst = (j->accumulate ? *dst : 0.0f) + v + (j->bias ? j->bias[col] : 0.0f);
}

/* A pool thread's AMX buffer: 16 unpacked weight rows (bytes, scales, coefficients) */
static _Thread_local uint8_t *amx_wq;
static _Thread_local float *amx_dw, *amx_cw;
static _Thread_local int64_t amx_nb;

/* 0 once it holds nb blocks; -1 when memory ran out */
static int amx_buffer(int64_t nb) {
    if (nb > amx_nb) {
        uint8_t *wq = realloc(amx_wq, (size_t)nb * 512);
        if (wq) amx_wq = wq;
        float *dw = wq ? realloc(amx_dw, (size_t)nb * 16 * sizeof(float)) : NULL;
        if (dw) amx_dw = dw;
        float *cw = dw ? realloc(amx_cw, (size_t)nb * 16 * sizeof(float)) : NULL;
        if (!cw) return -1;
        amx_cw = cw;
        amx_nb = nb;
    }
    return 0;
}

static void matmul_chunk(void *ctx, int64_t chunk) {
    const matmul_job *j = ctx;
    int64_t r0 = chunk * j->rows_per_chunk, r1 = r0 + j->rows_per_chunk;
    if (r1 > j->n_out) r1 = j->n_out;
    int64_t nb = j->k / 32;
    float part[16];
    if (!best_gemv8) {
        for (int64_t r = r0; r < r1; r++)
            for (int64_t i = 0; i < j->m; i++)
                store_out(j, i, r, dot_portable(j->type, j->w + r * j->row_bytes, j->x + i * nb, nb));
        return;
    }
    if (j->x16 && amx.gemm && amx_buffer(nb) == 0) {  /* (else gemm16: the same sums) */
        amx.begin(j->type == T_Q6_K);
        for (int64_t r = r0; r < r1; r += 16) {
            int rows = r1 - r < 16 ? (int)(r1 - r) : 16;
            amx.unpack(j->type, j->w + r * j->row_bytes, j->row_bytes, rows, nb, amx_wq, amx_dw, amx_cw);
            amx.gemm(j->type, amx_wq, amx_dw, amx_cw, j->x16, nb, j->m, rows, j->y + r, j->ldy,
                     j->bias ? j->bias + r : NULL, j->accumulate);
        }
        amx.end();
        return;
    }
    if (j->x16) {
        /* tiles of groups small enough to stay in L1 while the chunk's weight rows stream past them */
        int64_t groups = (j->m + 15) / 16, tile = (int64_t)(32768 / ((size_t)nb * sizeof(block_q8x16)));
        if (tile < 1) tile = 1;
        float out[2][16 * tile];
        for (int64_t g0 = 0; g0 < groups; g0 += tile) {
            int64_t n = groups - g0 < tile ? groups - g0 : tile;
            for (int64_t r = r0; r < r1; r += 2) {  /* two weight rows at a time */
                int64_t r2 = r + 1 < r1 ? r + 1 : r;
                best_gemm16(j->type, j->w + r * j->row_bytes, j->w + r2 * j->row_bytes, j->x16 + g0 * nb, nb, n,
                            out[0], out[1]);
                for (int64_t i = 16 * g0; i < j->m && i < 16 * (g0 + n); i++) {
                    store_out(j, i, r, out[0][i - 16 * g0]);
                    if (r2 != r) store_out(j, i, r2, out[1][i - 16 * g0]);
                }
            }
        }
        return;
    }
    if (j->x8) {
        for (int64_t r = r0; r < r1; r++)
            for (int64_t i = 0; i < j->m; i += 8) {
                best_gemm8(j->type, j->w + r * j->row_bytes, j->x8 + (i / 8) * nb, nb, part);
                for (int t = 0; t < 8 && i + t < j->m; t++) store_out(j, i + t, r, part[t]);
            }
        return;
    }
    for (int64_t r = r0; r < r1; r += 8) {
        const uint8_t *rows[8];
        for (int t = 0; t < 8; t++) rows[t] = j->w + (r + t < r1 ? r + t : r1 - 1) * j->row_bytes;
        for (int64_t i = 0; i < j->m; i++) {
            best_gemv8(j->type, rows, j->x + i * nb, nb, part);
            for (int t = 0; t < 8 && r + t < r1; t++) store_out(j, i, r + t, part[t]);
        }
    }
}

typedef struct {
    const float *x;
    int64_t k, ldx, m;
    block_q8 *out;
    int group;     /* 0: rows stay as they are; 8 or 16: also interleaved into `packed` */
    void *packed;
} quant_job;

/* chunk c: row c, or the rows of group c quantized and interleaved */
static void quant_chunk(void *ctx, int64_t c) {
    const quant_job *j = ctx;
    int64_t nb = j->k / 32, r0 = j->group ? c * j->group : c, r1 = j->group ? r0 + j->group : c + 1;
    if (r1 > j->m) r1 = j->m;
    for (int64_t r = r0; r < r1; r++) best_quantize(j->x + r * j->ldx, j->k, j->out + r * nb);
    if (!j->group) return;
    size_t bytes = j->group == 8 ? sizeof(block_q8x8) : sizeof(block_q8x16);
    pack_group(j->out + r0 * nb, r1 - r0, nb, j->group, (char *)j->packed + c * nb * bytes);
}

/* The calling thread's buffer for quantized activations, grown as needed (one per engine thread). */
static _Thread_local block_q8 *q8_buf;
static _Thread_local int64_t q8_cap;
static _Thread_local void *packed_buf;  /* block_q8x8 or block_q8x16 groups */
static _Thread_local size_t packed_cap;

/* from this many activation rows on, the 8-row interleaved kernel runs, and from 16 the 16-row one; on AMX
 * from 9 (measured: two groups of 8 on the vector unit lose to one padded tile of 16) */
#define GEMM8_MIN_ROWS 4
#define GEMM16_MIN_ROWS 16
#define AMX_MIN_ROWS 9

/* y[m, n_out] (row stride ldy) (+)= x[m, k] (row stride ldx) @ W^T (+ bias), W being n_out rows of packed
 * blocks; `accumulate` adds to y (a residual) instead of overwriting it. Returns 0, -1 for a type or
 * shape the kernels do not take, -2 when out of memory. */
int ember_qmatmul(int type, const uint8_t *w, int64_t row_bytes, int64_t n_out, int64_t k, const float *x,
                  int64_t ldx, int64_t m, float *y, int64_t ldy, const float *bias, int accumulate) {
    if (block_bytes(type) == 0 || k % block_elems(type) != 0) return -1;
    if (m * (k / 32) > q8_cap) {
        block_q8 *grown = realloc(q8_buf, (size_t)(m * (k / 32)) * sizeof(block_q8));
        if (!grown) return -2;
        q8_buf = grown;
        q8_cap = m * (k / 32);
    }
    block_q8 *xq = q8_buf;
    int64_t nb = k / 32;
    int interleave = best_gemm8 && m >= GEMM8_MIN_ROWS;
    int wide = interleave && best_gemm16 && m >= (amx.gemm ? AMX_MIN_ROWS : GEMM16_MIN_ROWS);
    int group = !interleave ? 0 : wide ? 16 : 8;
    int64_t chunks = group ? (m + group - 1) / group : m;
    if (group) {
        size_t need = (size_t)(chunks * nb) * (wide ? sizeof(block_q8x16) : sizeof(block_q8x8));
        if (need > packed_cap) {
            void *grown = realloc(packed_buf, need);
            if (!grown) return -2;
            packed_buf = grown;
            packed_cap = need;
        }
    }
    quant_job qj = {x, k, ldx, m, xq, group, packed_buf};
    if (m * k >= 16384) parallel_for(quant_chunk, &qj, chunks);
    else for (int64_t c = 0; c < chunks; c++) quant_chunk(&qj, c);
    block_q8x8 *x8 = group == 8 ? packed_buf : NULL;
    block_q8x16 *x16 = group == 16 ? packed_buf : NULL;
    /* enough chunks to balance 1-4 threads, each at least a few rows of one weight stream, in whole units of
     * the kernel (gemv8 takes 8 rows, AMX 16) */
    int64_t threads = pool.n_workers + 1, unit = x16 && amx.gemm ? 16 : 8;
    int64_t per = (n_out / (threads * unit) + unit - 1) / unit * unit;
    if (per < unit) per = unit;
    matmul_job mj = {type, w, row_bytes, n_out, k, m, per, ldy, xq, x8, x16, y, bias, accumulate};
    parallel_for(matmul_chunk, &mj, (n_out + per - 1) / per);
    return 0;
}

typedef struct {
    int type;
    const uint8_t *w;
    int64_t row_bytes, k, rows_per_chunk, n_rows;
    const int64_t *rows;
    float *out;
} dequant_job;

static void dequant_chunk(void *ctx, int64_t chunk) {
    const dequant_job *j = ctx;
    int64_t r0 = chunk * j->rows_per_chunk, r1 = r0 + j->rows_per_chunk;
    if (r1 > j->n_rows) r1 = j->n_rows;
    for (int64_t r = r0; r < r1; r++) {
        int64_t src = j->rows ? j->rows[r] : r;
        dequant_row(j->type, j->w + src * j->row_bytes, j->k, j->out + r * j->k);
    }
}

/* out[n_rows, k] = rows `rows` (or 0..n_rows-1 when NULL) of W, as float32. */
int ember_dequantize(int type, const uint8_t *w, int64_t row_bytes, int64_t k, const int64_t *rows, int64_t n_rows,
                     float *out) {
    if (type != T_F32 && type != T_F16 && (block_bytes(type) == 0 || k % block_elems(type) != 0)) return -1;
    int64_t per = n_rows * k >= 65536 ? 16 : n_rows;
    if (per < 1) per = 1;
    dequant_job j = {type, w, row_bytes, k, per, n_rows, rows, out};
    parallel_for(dequant_chunk, &j, (n_rows + per - 1) / per);
    return 0;
}

/* ---- decode attention over the paged KV cache ------------------------------------------------------ */

#ifdef EMBER_X86
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

/* e^x to ~2 ulp on [-87, 88] (clamped outside): x = n ln2 + r with n = round(x / ln2), 2^n from the
 * exponent bits, a degree-6 polynomial for e^r. Branch- and call-free, so loops over rows of values
 * vectorize (libm's expf and floorf do not). */
static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  /* round to nearest: 1.5 * 2^23 */
    float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (0.16666667f + r * (0.041666668f + r * (0.008333334f +
              r * 0.0013888889f)))));
    int32_t bits;
    memcpy(&bits, &p, 4);
    bits += (int32_t)n * (1 << 23);
    memcpy(&p, &bits, 4);
    return p;
}

static inline float dot_f32(const float *a, const float *b, int64_t n) {
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += a[i + j] * b[i + j];
    for (int w = 8; w > 0; w >>= 1)  /* a tree the vectorizer turns into a few shuffles */
        for (int j = 0; j < w; j++) acc[j] += acc[j + w];
    float s = acc[0];
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

typedef struct {
    const float *q, *k_cache, *v_cache;
    const int64_t *tables, *row_seq, *lens;
    int64_t q_stride, heads, kv_heads, dim, block_size, max_blocks;
    float scale;
    int64_t window;  /* > 0: each row attends only to its last `window` slots (a sliding-window layer) */
    float *out;
    int per_kv_head;  /* a task per (row, kv head) rather than per (row, head) */
} attn_job;

/* the first slot row b attends to: 0, or the start of its window */
static inline int64_t attn_first(const attn_job *j, int64_t b) {
    return j->window > 0 && j->lens[b] > j->window ? j->lens[b] - j->window : 0;
}

static _Thread_local float *score_buf;
static _Thread_local int64_t score_cap;

/* 16 floats as one value (a zmm on x86-64-v4, two ymm on v3, four xmm elsewhere), loaded unaligned */
typedef float v16f __attribute__((vector_size(64), aligned(4)));

/* One query row and head: a decode attends to its whole context, a prefill query to the positions up to
 * its own. K is cached transposed within each block ([blocks, kv_heads, dim, block_size]), so with
 * 16-token blocks a block's 16 scores are one vector, built by dim multiply-adds with no horizontal sum;
 * V is cached as written ([blocks, block_size, kv_heads, dim]) and summed into dim / 16 vectors. D is the
 * head size (a constant from the caller where it is a common one, so the accumulators stay in registers).
 * Every row runs this same arithmetic, so a token's attention does not depend on how the scheduler
 * chunked, batched or cached its prompt (the multiply-adds are fused where the clone's ISA has FMA: the same
 * for every row on one machine). */
#define FMA_OK __attribute__((optimize("fp-contract=fast")))  /* multiply-adds fused where the ISA has them */
static inline __attribute__((always_inline)) FMA_OK void attn_core16(const attn_job *j, int64_t b, int64_t h, int64_t D) {
    int64_t kvh = h / (j->heads / j->kv_heads), len = j->lens[b], first = attn_first(j, b), stride = j->kv_heads * D;
    const float *restrict q = j->q + b * j->q_stride + h * D;
    const int64_t *table = j->tables + j->row_seq[b] * j->max_blocks;
    float *restrict s = score_buf, mx = -INFINITY;
    v16f mx16;
    for (int o = 0; o < 16; o++) mx16[o] = -INFINITY;
    for (int64_t blk = first / 16, t = blk * 16; t < len; blk++, t += 16) {
        const v16f *kt = (const v16f *)(j->k_cache + (table[blk] * j->kv_heads + kvh) * D * 16);
        v16f acc = {0};
        for (int64_t e = 0; e < D; e++) acc += q[e] * kt[e];
        acc *= j->scale;
        if (t >= first && t + 16 <= len) {
            memcpy(s + t, &acc, sizeof acc);
            for (int o = 0; o < 16; o++) mx16[o] = acc[o] > mx16[o] ? acc[o] : mx16[o];
        } else {
            for (int o = t < first ? (int)(first - t) : 0; o < 16 && t + o < len; o++) {
                s[t + o] = acc[o];
                mx = acc[o] > mx ? acc[o] : mx;
            }
        }
    }
    for (int o = 0; o < 16; o++) mx = mx16[o] > mx ? mx16[o] : mx;
    v16f part = {0};
    int64_t t = first;
    for (; t + 16 <= len; t += 16) {
        v16f e16;
        for (int o = 0; o < 16; o++) e16[o] = exp_approx(s[t + o] - mx);
        memcpy(s + t, &e16, sizeof e16);
        part += e16;
    }
    for (; t < len; t++) {
        s[t] = exp_approx(s[t] - mx);
        part[0] += s[t];
    }
    float sum = 0.0f;
    for (int o = 0; o < 16; o++) sum += part[o];
    float inv = 1.0f / sum;
    v16f out[32] = {{0}};  /* D <= 512 */
    for (int64_t t = first; t < len;) {
        int64_t o = t % 16;
        const float *v = j->v_cache + (table[t / 16] * 16 + o) * stride + kvh * D;
        for (; o < 16 && t < len; o++, t++, v += stride) {
            float p = s[t] * inv;
            for (int64_t i = 0; i < D / 16; i++) out[i] += p * ((const v16f *)v)[i];
        }
    }
    memcpy(j->out + (b * j->heads + h) * D, out, (size_t)D * sizeof(float));
}

/* the same for any block size and head size (scalar loops over the same layouts) */
static void attn_core_any(const attn_job *j, int64_t b, int64_t h) {
    int64_t D = j->dim, BS = j->block_size;
    int64_t kvh = h / (j->heads / j->kv_heads), len = j->lens[b], first = attn_first(j, b), stride = j->kv_heads * D;
    const float *q = j->q + b * j->q_stride + h * D;
    const int64_t *table = j->tables + j->row_seq[b] * j->max_blocks;
    float *s = score_buf, mx = -INFINITY, sum = 0.0f, acc[512];
    for (int64_t t = first; t < len;) {
        int64_t o = t % BS;
        const float *kt = j->k_cache + (table[t / BS] * j->kv_heads + kvh) * D * BS;
        for (; o < BS && t < len; o++, t++) {
            float dot = 0.0f;
            for (int64_t e = 0; e < D; e++) dot += q[e] * kt[e * BS + o];
            s[t] = dot * j->scale;
            mx = s[t] > mx ? s[t] : mx;
        }
    }
    for (int64_t t = first; t < len; t++) {
        s[t] = exp_approx(s[t] - mx);
        sum += s[t];
    }
    float inv = 1.0f / sum;
    for (int64_t e = 0; e < D; e++) acc[e] = 0.0f;
    for (int64_t t = first; t < len;) {
        int64_t o = t % BS;
        const float *v = j->v_cache + (table[t / BS] * BS + o) * stride + kvh * D;
        for (; o < BS && t < len; o++, t++, v += stride)
            for (int64_t e = 0; e < D; e++) acc[e] += s[t] * inv * v[e];
    }
    memcpy(j->out + (b * j->heads + h) * D, acc, (size_t)D * sizeof(float));
}

MULTIVERSION FMA_OK static void attn_row(const attn_job *j, int64_t b, int64_t h) {
    int64_t len = j->lens[b];
    if (len > score_cap) {
        float *grown = realloc(score_buf, (size_t)len * sizeof(float));
        if (!grown) return;
        score_buf = grown;
        score_cap = len;
    }
    if (j->block_size != 16 || j->dim % 16) attn_core_any(j, b, h);
    else if (j->dim == 64) attn_core16(j, b, h, 64);
    else if (j->dim == 128) attn_core16(j, b, h, 128);
    else if (j->dim == 256) attn_core16(j, b, h, 256);  /* Gemma 3 */
    else attn_core16(j, b, h, j->dim);
}

/* task: one query row and head, or (with enough rows to balance the threads) one row and kv head, whose
 * query heads then run back to back on the keys and values one thread just brought into its cache */
static void attn_task(void *ctx, int64_t task) {
    const attn_job *j = ctx;
    if (!j->per_kv_head) {
        attn_row(j, task / j->heads, task % j->heads);
        return;
    }
    int64_t group = j->heads / j->kv_heads, b = task / j->kv_heads, kvh = task % j->kv_heads;
    for (int64_t h = kvh * group; h < (kvh + 1) * group; h++) attn_row(j, b, h);
}

/* out[i, h, :] = softmax(q[i, h] . K^T * scale) V for every query row i (rows q_stride apart), K / V being
 * the first lens[i] slots of the blocks of its sequence (tables[row_seq[i], :]) in caches laid out
 * [blocks, kv_heads, dim, block_size] (K, transposed within each block) and [blocks, block_size, kv_heads,
 * dim] (V): a decode attends to its whole context, a prefill query to the positions up to its own
 * (causal); with window > 0 only to the last `window` of those (a sliding-window layer). out is [rows, heads,
 * dim]; dim is at most 512. */
void ember_attention(const float *q, int64_t q_stride, const float *k_cache, const float *v_cache,
                     const int64_t *tables, const int64_t *row_seq, const int64_t *lens, int64_t rows, int64_t heads,
                     int64_t kv_heads, int64_t dim, int64_t block_size, int64_t max_blocks, float scale,
                     int64_t window, float *out) {
    int per_kv_head = rows * kv_heads >= 4 * (pool.n_workers + 1);
    attn_job j = {q, k_cache, v_cache, tables, row_seq, lens, q_stride, heads, kv_heads, dim, block_size, max_blocks,
                  scale, window, out, per_kv_head};
    parallel_for(attn_task, &j, rows * (per_kv_head ? kv_heads : heads));
}

/* ---- the small per-layer operations, fused (one call instead of 5-20 torch ops each) --------------- */

/* out[i] = w * x[i] / sqrt(mean(x[i]^2) + eps) for n rows of d values (rows ld apart in x) */
MULTIVERSION void ember_rms_norm(const float *x, int64_t ldx, int64_t n, int64_t d, const float *w, float eps,
                                 float *out) {
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * ldx;
        float ss = dot_f32(xi, xi, d);
        float r = 1.0f / sqrtf(ss / (float)d + eps);
        for (int64_t e = 0; e < d; e++) out[i * d + e] = w[e] * (xi[e] * r);
    }
}

typedef struct {
    const float *gu;
    int64_t inter;
    float *out;
} silu_job;

MULTIVERSION static void silu_row(void *ctx, int64_t i) {
    const silu_job *j = ctx;
    const float *g = j->gu + i * 2 * j->inter, *u = g + j->inter;
    float *o = j->out + i * j->inter;
    for (int64_t e = 0; e < j->inter; e++) o[e] = g[e] / (1.0f + exp_approx(-g[e])) * u[e];
}

/* out[i] = silu(gu[i, :inter]) * gu[i, inter:] for n rows */
void ember_silu_mul(const float *gu, int64_t n, int64_t inter, float *out) {
    silu_job j = {gu, inter, out};
    if (n * inter >= 16384) parallel_for(silu_row, &j, n);
    else for (int64_t i = 0; i < n; i++) silu_row(&j, i);
}

/* In place on qkv rows ([q heads | k heads | v heads] * dim, rows ld apart): rotate-half rotary embedding
 * of q and k at each row's position (cos/sin tables [positions, dim / 2]), then store k and v into the
 * caches at each row's slot, in ember_attention's layouts. */
MULTIVERSION void ember_rope_store(float *qkv, int64_t ld, int64_t n, const int64_t *positions, const float *cos_t,
                                   const float *sin_t, int64_t heads, int64_t kv_heads, int64_t dim,
                                   const int64_t *slots, int64_t block_size, float *k_cache, float *v_cache) {
    int64_t half = dim / 2;
    for (int64_t i = 0; i < n; i++) {
        float *row = qkv + i * ld;
        const float *c = cos_t + positions[i] * half, *s = sin_t + positions[i] * half;
        for (int64_t h = 0; h < heads + kv_heads; h++) {
            float *x = row + h * dim;
            for (int64_t e = 0; e < half; e++) {
                float a = x[e], b = x[e + half];
                x[e] = a * c[e] - b * s[e];
                x[e + half] = b * c[e] + a * s[e];
            }
        }
        int64_t kv = kv_heads * dim, blk = slots[i] / block_size, off = slots[i] % block_size;
        float *kt = k_cache + blk * kv * block_size + off;  /* K transposed within its block (ember_attention) */
        for (int64_t e = 0; e < kv; e++) kt[e * block_size] = row[heads * dim + e];
        memcpy(v_cache + slots[i] * kv, row + (heads + kv_heads) * dim, (size_t)kv * sizeof(float));
    }
}

/* ---- a whole forward pass of a Llama-family model with packed weights, in one call ------------------- */

typedef struct {
    int32_t type;
    const uint8_t *w;
    int64_t row_bytes, n_out, k;
    const float *bias;
} qweight;

typedef struct {
    const float *input_norm, *post_norm;
    int64_t n_qkv;   /* q/k/v as one product, or as up to 3 when their formats differ (Q4_K_M's v) */
    qweight qkv[3], o, gate_up, down;
    float *k_cache, *v_cache;
} qlayer;

typedef struct {
    int64_t n_layers, hidden, heads, kv_heads, head_dim, inter, block_size;
    float eps;
    const float *cos_t, *sin_t;
    const qlayer *layers;
} qmodel;  /* mirrored by ctypes Structures in ember/kernels/cpu.py */

static _Thread_local float *step_buf;
static _Thread_local int64_t step_cap;

/* y[m, q->n_out] (rows ldy apart) (+)= x @ W^T */
static int qlinear(const qweight *q, const float *x, int64_t m, float *y, int64_t ldy, int accumulate) {
    return ember_qmatmul(q->type, q->w, q->row_bytes, q->n_out, q->k, x, q->k, m, y, ldy, q->bias, accumulate);
}

/* The decoder layers for a batch of `rows` tokens (decodes and prefill chunks alike): h [rows, hidden] is
 * the embedded input and becomes the last layer's output (before the final norm). Per row: its
 * position, its new cache slot, its sequence (a row of `tables`, max_blocks wide) and how many slots it
 * attends to. The same arithmetic as the per-operation calls (llama.py's fused path), without
 * returning to Python between operations. Returns 0 or an error. */
int ember_forward_layers(const qmodel *m, float *h, int64_t rows, const int64_t *positions, const int64_t *slots,
                         const int64_t *tables, const int64_t *row_seq, const int64_t *lens, int64_t max_blocks) {
    int64_t q_size = m->heads * m->head_dim, kv_size = m->kv_heads * m->head_dim, qkv_size = q_size + 2 * kv_size;
    int64_t need = rows * (m->hidden + qkv_size + q_size + 3 * m->inter);
    if (need > step_cap) {
        float *grown = realloc(step_buf, (size_t)need * sizeof(float));
        if (!grown) return -2;
        step_buf = grown;
        step_cap = need;
    }
    float *x = step_buf, *qkv = x + rows * m->hidden, *attn = qkv + rows * qkv_size, *gu = attn + rows * q_size;
    float *act = gu + rows * 2 * m->inter;
    float scale = 1.0f / sqrtf((float)m->head_dim);
    for (int64_t l = 0; l < m->n_layers; l++) {
        const qlayer *L = m->layers + l;
        int rc = 0;
        ember_rms_norm(h, m->hidden, rows, m->hidden, L->input_norm, m->eps, x);
        for (int64_t p = 0, col = 0; p < L->n_qkv; col += L->qkv[p].n_out, p++)
            rc |= qlinear(&L->qkv[p], x, rows, qkv + col, qkv_size, 0);
        ember_rope_store(qkv, qkv_size, rows, positions, m->cos_t, m->sin_t, m->heads, m->kv_heads, m->head_dim,
                         slots, m->block_size, L->k_cache, L->v_cache);
        ember_attention(qkv, qkv_size, L->k_cache, L->v_cache, tables, row_seq, lens, rows, m->heads, m->kv_heads,
                        m->head_dim, m->block_size, max_blocks, scale, 0, attn);
        rc |= qlinear(&L->o, attn, rows, h, m->hidden, 1);
        ember_rms_norm(h, m->hidden, rows, m->hidden, L->post_norm, m->eps, x);
        rc |= qlinear(&L->gate_up, x, rows, gu, 2 * m->inter, 0);
        ember_silu_mul(gu, rows, m->inter, act);
        rc |= qlinear(&L->down, act, rows, h, m->hidden, 1);
        if (rc) return rc;
    }
    return 0;
}
