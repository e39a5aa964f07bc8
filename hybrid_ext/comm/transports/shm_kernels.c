/* The hot loops of the shared-memory allreduce (hybrid_ext/comm/shm_allreduce.py), loaded with ctypes.

   Built on first use by hybrid_ext/comm/shm_kernels.py with the system C compiler (no torch headers, so the build
   takes well under a second); where there is none, the Python fallback in that module does the same work.

   hx_reduce: out = op(src[0], ..., src[n-1]) element-wise, in blocks small enough to stay in L1. 16-bit floats
   are widened to float32, summed in rank order and rounded once (round to nearest even, as torch rounds), so the
   result depends only on the inputs and n: every rank that computes an element gets the same bits.
   hx_arrive / hx_wait / hx_sleep: a counter barrier among the ranks of one host (x86-64: loads and stores of aligned
   64-bit words are atomic; the sequentially consistent ones below order a rank's announcements against its reads). */

#include <linux/futex.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define HX_PAUSE() _mm_pause()
#else
#define HX_PAUSE() ((void)0)
#endif

enum { HX_F32 = 0, HX_F64 = 1, HX_F16 = 2, HX_BF16 = 3, HX_I32 = 4, HX_I64 = 5 };
enum { HX_SUM = 0, HX_MIN = 1, HX_MAX = 2 };

#define HX_BLOCK 512 /* elements per accumulator block: 2 KiB of float32 */

static inline float bf16_load(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t bf16_store(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (f != f) ? (uint16_t)0x7FC0u : (uint16_t)rounded;
}

/* float16 <-> float32 a block at a time: F16C's conversions where the CPU has them (the compiler does not vectorise
   _Float16 casts by itself), else _Float16's. Both round to nearest even, as torch does. */
static inline void f16_widen(float *dst, const uint16_t *src, int m) {
    int i = 0;
#if defined(__F16C__)
    for (; i + 8 <= m; i += 8) {
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    }
    for (; i < m; i++) dst[i] = _cvtsh_ss(src[i]);
#else
    for (; i < m; i++) {
        _Float16 h;
        memcpy(&h, src + i, sizeof h);
        dst[i] = (float)h;
    }
#endif
}

static inline void f16_narrow(uint16_t *dst, const float *src, int m) {
    int i = 0;
#if defined(__F16C__)
    for (; i + 8 <= m; i += 8) {
        __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128((__m128i *)(dst + i), h);
    }
    for (; i < m; i++) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    for (; i < m; i++) {
        _Float16 h = (_Float16)src[i];
        memcpy(dst + i, &h, sizeof h);
    }
#endif
}
#define HX_SAME(x) (x)

/* NaN-propagating min / max, as torch.minimum / torch.maximum. */
#define HX_MIN_F(a, b) ((a) != (a) ? (a) : ((b) != (b) ? (b) : ((b) < (a) ? (b) : (a))))
#define HX_MAX_F(a, b) ((a) != (a) ? (a) : ((b) != (b) ? (b) : ((b) > (a) ? (b) : (a))))
#define HX_MIN_I(a, b) ((b) < (a) ? (b) : (a))
#define HX_MAX_I(a, b) ((b) > (a) ? (b) : (a))
#define HX_ADD(a, b) ((a) + (b))

/* One op over n sources into out, for element type T accumulated as A. out may be one of the sources: each block
   is read whole before it is written. */
#define HX_DEFINE(NAME, T, A, LOAD, STORE, COMBINE)                                          \
    static void NAME(T *out, T *const *src, int n, int64_t offset, int64_t count, double divisor) { \
        A acc[HX_BLOCK];                                                                     \
        for (int64_t base = 0; base < count; base += HX_BLOCK) {                             \
            int m = (count - base) < HX_BLOCK ? (int)(count - base) : HX_BLOCK;              \
            const T *first = src[0] + offset + base;                                         \
            for (int i = 0; i < m; i++) acc[i] = (A)LOAD(first[i]);                          \
            for (int k = 1; k < n; k++) {                                                    \
                const T *s = src[k] + offset + base;                                         \
                for (int i = 0; i < m; i++) acc[i] = COMBINE(acc[i], (A)LOAD(s[i]));         \
            }                                                                                \
            if (divisor != 1.0) {                                                            \
                for (int i = 0; i < m; i++) acc[i] = (A)(acc[i] / (A)divisor);               \
            }                                                                                \
            T *o = out + base;                                                               \
            for (int i = 0; i < m; i++) o[i] = (T)STORE(acc[i]);                             \
        }                                                                                    \
    }

HX_DEFINE(sum_f32, float, float, HX_SAME, HX_SAME, HX_ADD)
HX_DEFINE(min_f32, float, float, HX_SAME, HX_SAME, HX_MIN_F)
HX_DEFINE(max_f32, float, float, HX_SAME, HX_SAME, HX_MAX_F)
HX_DEFINE(sum_f64, double, double, HX_SAME, HX_SAME, HX_ADD)
HX_DEFINE(min_f64, double, double, HX_SAME, HX_SAME, HX_MIN_F)
HX_DEFINE(max_f64, double, double, HX_SAME, HX_SAME, HX_MAX_F)
HX_DEFINE(sum_bf16, uint16_t, float, bf16_load, bf16_store, HX_ADD)
HX_DEFINE(min_bf16, uint16_t, float, bf16_load, bf16_store, HX_MIN_F)
HX_DEFINE(max_bf16, uint16_t, float, bf16_load, bf16_store, HX_MAX_F)
/* float16: each source widened a block at a time into a second buffer, then combined as float32. */
#define HX_DEFINE_F16(NAME, COMBINE)                                                                  \
    static void NAME(uint16_t *out, uint16_t *const *src, int n, int64_t offset, int64_t count,     \
                     double divisor) {                                                              \
        float acc[HX_BLOCK], wide[HX_BLOCK];                                                        \
        for (int64_t base = 0; base < count; base += HX_BLOCK) {                                    \
            int m = (count - base) < HX_BLOCK ? (int)(count - base) : HX_BLOCK;                     \
            f16_widen(acc, src[0] + offset + base, m);                                              \
            for (int k = 1; k < n; k++) {                                                           \
                f16_widen(wide, src[k] + offset + base, m);                                         \
                for (int i = 0; i < m; i++) acc[i] = COMBINE(acc[i], wide[i]);                      \
            }                                                                                       \
            if (divisor != 1.0) {                                                                   \
                for (int i = 0; i < m; i++) acc[i] = acc[i] / (float)divisor;                       \
            }                                                                                       \
            f16_narrow(out + base, acc, m);                                                         \
        }                                                                                           \
    }

HX_DEFINE_F16(sum_f16, HX_ADD)
HX_DEFINE_F16(min_f16, HX_MIN_F)
HX_DEFINE_F16(max_f16, HX_MAX_F)
/* Integer sums wrap (two's complement, as torch's do): accumulate unsigned, where overflow is defined. */
HX_DEFINE(sum_i32, int32_t, uint32_t, HX_SAME, HX_SAME, HX_ADD)
HX_DEFINE(min_i32, int32_t, int32_t, HX_SAME, HX_SAME, HX_MIN_I)
HX_DEFINE(max_i32, int32_t, int32_t, HX_SAME, HX_SAME, HX_MAX_I)
HX_DEFINE(sum_i64, int64_t, uint64_t, HX_SAME, HX_SAME, HX_ADD)
HX_DEFINE(min_i64, int64_t, int64_t, HX_SAME, HX_SAME, HX_MIN_I)
HX_DEFINE(max_i64, int64_t, int64_t, HX_SAME, HX_SAME, HX_MAX_I)

#define HX_DISPATCH(SUFFIX, T)                                                                   \
    switch (op) {                                                                                \
        case HX_SUM: sum_##SUFFIX((T *)out, (T *const *)src, n, offset, count, divisor); return 0; \
        case HX_MIN: min_##SUFFIX((T *)out, (T *const *)src, n, offset, count, 1.0); return 0;     \
        case HX_MAX: max_##SUFFIX((T *)out, (T *const *)src, n, offset, count, 1.0); return 0;     \
        default: return -1;                                                                      \
    }

/* out[0:count] = op over k of src[k][offset:offset+count] (offset and count in elements); a sum is divided by
   ``divisor`` before it is rounded (an average: as exact as the sum). 0, or -1: unknown dtype or op. */
int hx_reduce(int dtype, int op, void *out, void *const *src, int n, int64_t offset, int64_t count, double divisor) {
    switch (dtype) {
        case HX_F32: HX_DISPATCH(f32, float)
        case HX_F64: HX_DISPATCH(f64, double)
        case HX_F16: HX_DISPATCH(f16, uint16_t)
        case HX_BF16: HX_DISPATCH(bf16, uint16_t)
        case HX_I32: HX_DISPATCH(i32, int32_t)
        case HX_I64: HX_DISPATCH(i64, int64_t)
        default: return -1;
    }
}

/* dst[starts[k]:stops[k]] = src[k][starts[k]:stops[k]] (bytes) for each rank k: the all-gather of reduced slices. */
void hx_gather(char *dst, char *const *src, int n, const int64_t *starts, const int64_t *stops) {
    for (int k = 0; k < n; k++) {
        memcpy(dst + starts[k], src[k] + starts[k], (size_t)(stops[k] - starts[k]));
    }
}

static int hx_reached(int64_t *const *counters, int n, int64_t target) {
    for (int k = 0; k < n; k++) {
        if (__atomic_load_n(counters[k], __ATOMIC_ACQUIRE) < target) return 0;
    }
    return 1;
}

/* Announce that this rank reached ``target``, and wake the host-mates that sleep on their doorbell. */
void hx_arrive(int64_t *own, int64_t target, int32_t *const *sleeping, int32_t *const *bells, int n) {
    __atomic_store_n(own, target, __ATOMIC_SEQ_CST);
    for (int k = 0; k < n; k++) {
        if (__atomic_load_n(sleeping[k], __ATOMIC_SEQ_CST)) {
            __atomic_add_fetch(bells[k], 1, __ATOMIC_SEQ_CST);
            syscall(SYS_futex, bells[k], FUTEX_WAKE, 1 << 30, NULL, NULL, 0);
        }
    }
}

/* 1 once every counter is at least ``target``; 0 after ``rounds`` looks (spinning first, then yielding the core
   to whichever rank this one waits for: ranks may outnumber cores). */
int hx_wait(int64_t *const *counters, int n, int64_t target, int64_t rounds, int64_t spins) {
    for (int64_t round = 0; round < rounds; round++) {
        if (hx_reached(counters, n, target)) return 1;
        if (round < spins) {
            HX_PAUSE();
        } else {
            sched_yield();
        }
    }
    return hx_reached(counters, n, target);
}

/* Sleep on this rank's doorbell until a host-mate arrives (or ``nanoseconds`` pass); 1 if every counter reached
   ``target``. The flag is raised before the last look, so an arrival after that look rings the bell. */
int hx_sleep(int32_t *sleeping, int32_t *bell, int64_t *const *counters, int n, int64_t target, int64_t nanoseconds) {
    int32_t rung = __atomic_load_n(bell, __ATOMIC_SEQ_CST);
    __atomic_store_n(sleeping, 1, __ATOMIC_SEQ_CST);
    if (!hx_reached(counters, n, target)) {
        struct timespec timeout = {nanoseconds / 1000000000, nanoseconds % 1000000000};
        syscall(SYS_futex, bell, FUTEX_WAIT, rung, &timeout, NULL, 0);
    }
    __atomic_store_n(sleeping, 0, __ATOMIC_SEQ_CST);
    return hx_reached(counters, n, target);
}

/* What one rank's chunks of the allreduce on one buffer set share, set up once (fewer arguments per call). */
typedef struct {
    int64_t n, own, rounds, spins;
    int64_t *own_counter;
    int64_t *const *counters;
    int32_t *const *sleeping;
    int32_t *const *bells;
    void *const *buffers; /* every rank's buffer of this set */
} hx_group;

/* A chunk that every rank reduces whole (one barrier): copy ``nbytes`` from ``in`` into this rank's buffer, arrive
   at ``target``, wait (``rounds`` looks at most), then reduce every rank's buffer into ``out``. 1: done. 0: the wait
   ran out; the caller waits on (deadline, dead peers) and reduces. -1: unknown dtype or op. */
int hx_small(const hx_group *g, int dtype, int op, void *out, const void *in, int64_t nbytes, int64_t count,
             double divisor, int64_t target) {
    memcpy(g->buffers[g->own], in, (size_t)nbytes);
    hx_arrive(g->own_counter, target, g->sleeping, g->bells, (int)g->n);
    if (!hx_wait(g->counters, (int)g->n, target, g->rounds, g->spins)) return 0;
    return hx_reduce(dtype, op, out, g->buffers, (int)g->n, 0, count, divisor) == 0 ? 1 : -1;
}
