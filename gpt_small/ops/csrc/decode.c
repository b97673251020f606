/* Kernels for decoding on the CPU: skinny_linear (fp32, bf16 or int8 weights) and decode_attention.
 *
 * skinny_linear: y = x @ W.T + bias for a few rows of x (one row per sample).
 *
 * W is a torch Linear weight, (N, K) row-major. With B <= 8 rows of x the product is bound by
 * reading W from memory once: each weight row is loaded into vector registers one time and
 * multiplied against all B rows of x (which stay in L1/L2), and the N weight rows are split
 * into one contiguous block per thread, so each thread streams its part of W sequentially.
 * torch's fp32 kernels read such weights at about half the memory bandwidth (README, "Speed").
 * Summation order differs from torch's, so results match F.linear to rounding.
 *
 * Built by gpt_small/ops/kernels.py when the CPU backend is chosen: cc -O3 -march=native -fopenmp -shared -fPIC ... -lm.
 * OpenMP comes from the libgomp that torch has already loaded, so torch and this kernel share
 * one thread pool.
 */
#include <math.h>
#include <stddef.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));  /* unaligned loads */

static inline v16 load16(const float *p) { return *(const v16u *)p; }

typedef int vi16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

/* A pairwise sum (halves, quarters, then pairs): two vector adds and three scalar ones, not 15
 * dependent scalar adds. */
static inline float hsum(v16 v) {
    v8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
         + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
    return (q[0] + q[2]) + (q[1] + q[3]);
}

/* Weights in fewer bytes, for decoding (gpt_small/ops/quantize.py): fewer bytes per weight is the
 * only way past the memory wall above. bf16 is the top half of an fp32, widened by a shift;
 * int8 is symmetric with one fp32 scale per output row (weight-only: x stays fp32), so
 * y[b, n] = scale[n] * sum_k x[b, k] q[n, k] + bias[n], summed in fp32. Each weight row is still
 * read once and widened in registers, never written back as fp32. */
enum { W_F32, W_BF16, W_I8 };

static inline __attribute__((always_inline)) float load_w1(const void *W, long i, const int type) {
    if (type == W_BF16) {
        union { unsigned int u; float f; } v = { (unsigned int)((const unsigned short *)W)[i] << 16 };
        return v.f;
    }
    if (type == W_I8) return (float)((const signed char *)W)[i];
    return ((const float *)W)[i];
}

/* 16 weights from element i on, widened to fp32. gcc 12 turns __builtin_convertvector from 8- or
 * 16-bit lanes into a scalar loop, so with AVX-512 the widening is spelled in intrinsics (one
 * sign- or zero-extension and one convert or shift); elsewhere a plain loop it vectorises. */
static inline __attribute__((always_inline)) v16 load_w16(const void *W, long i, const int type) {
    if (type == W_F32) return load16((const float *)W + i);
#ifdef __AVX512F__
    if (type == W_BF16)
        return (v16)_mm512_slli_epi32(_mm512_cvtepu16_epi32(
            _mm256_loadu_si256((const __m256i *)((const unsigned short *)W + i))), 16);
    return (v16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const signed char *)W + i))));
#else
    float t[16];
    for (int j = 0; j < 16; j++) t[j] = load_w1(W, i + j, type);
    return load16(t);
#endif
}

/* Rows [n0, n1) of y for B rows of x; B and the weight type are compile-time constants at each
 * call site, so each (B, type) pair gets its own loop. */
static inline __attribute__((always_inline)) void linear_rows(
        const float *x, const void *W, const int type, const float *scale, const float *bias, float *y,
        const int B, long K, long N, long n0, long n1) {
    const long K16 = K & ~15L, K32 = K & ~31L;
    const long wsize = type == W_F32 ? 4 : type == W_BF16 ? 2 : 1;
    for (long n = n0; n < n1; n++) {
        const long row = n * K;
        /* two sums per row of x, on alternate blocks of 16: with one, a row of x waits on the
         * previous add (4 cycles), which an int8 or bf16 weight stream can outrun */
        v16 acc[8] = {0}, acc2[8] = {0};
        for (long k = 0; k < K32; k += 32) {
            v16 wv = load_w16(W, row + k, type), wv2 = load_w16(W, row + k + 16, type);
            /* From 5 rows of x on, compute slows the weight stream enough that asking for the
             * weights 4 KiB ahead pays (an A/B at batch 6 and 8 in fp32; a loss below). */
            if (B >= 5) __builtin_prefetch((const char *)W + (row + k) * wsize + 4096, 0, 0);
            for (int b = 0; b < B; b++) {
                acc[b] += wv * load16(x + b * K + k);
                acc2[b] += wv2 * load16(x + b * K + k + 16);
            }
        }
        if (K16 > K32) {
            v16 wv = load_w16(W, row + K32, type);
            for (int b = 0; b < B; b++) acc[b] += wv * load16(x + b * K + K32);
        }
        for (int b = 0; b < B; b++) {
            float s = hsum(acc[b] + acc2[b]);
            for (long k = K16; k < K; k++) s += load_w1(W, row + k, type) * x[b * K + k];
            if (scale) s *= scale[n];
            y[b * N + n] = bias ? s + bias[n] : s;
        }
    }
}

#define CASE(b, T) case b: linear_rows(x, W, T, scale, bias, y, b, K, N, n0, n1); break;

/* The N weight rows split into one contiguous block per thread, for B = 1..8 rows of x. */
#define SKINNY_BODY(T)                                                                     \
    if (B < 1 || B > 8) return -1;                                                         \
    if (threads < 1) threads = 1;                                                          \
    _Pragma("omp parallel num_threads(threads)")                                           \
    {                                                                                      \
        int t = 0, nt = 1;                                                                 \
        thread_id(&t, &nt);                                                                \
        long n0 = N * t / nt, n1 = N * (t + 1) / nt;                                       \
        switch (B) { CASE(1, T) CASE(2, T) CASE(3, T) CASE(4, T)                          \
                     CASE(5, T) CASE(6, T) CASE(7, T) CASE(8, T) }                        \
    }                                                                                      \
    return 0;

static inline void thread_id(int *t, int *nt) {
#ifdef _OPENMP
    extern int omp_get_thread_num(void);
    extern int omp_get_num_threads(void);
    *t = omp_get_thread_num();
    *nt = omp_get_num_threads();
#endif
}

/* x: (B, K) fp32; W: (N, K) of the function's type; scale: (N,) fp32 (int8 only); bias: (N,) fp32
 * or NULL; y: (B, N) fp32; 1 <= B <= 8. Return 0, or -1 for B out of range. */
int skinny_linear(const float *x, const float *W, const float *bias, float *y,
                  int B, long K, long N, int threads) {
    const float *scale = NULL;
    SKINNY_BODY(W_F32)
}

int skinny_linear_bf16(const float *x, const unsigned short *W, const float *bias, float *y,
                       int B, long K, long N, int threads) {
    const float *scale = NULL;
    SKINNY_BODY(W_BF16)
}

int skinny_linear_int8(const float *x, const signed char *W, const float *scale, const float *bias, float *y,
                       int B, long K, long N, int threads) {
    SKINNY_BODY(W_I8)
}

/* One decoding step of attention: for each sample b and head h, the new token's query q[b, h]
 * (hs floats) against the S cached keys and values k[b, h, s], v[b, h, s]:
 *     y[b, h] = softmax(q . k[s] * scale over s) @ v
 * written to y as (B, nh * hs), the layout the output projection takes. q, k and v are given by
 * their sample and head strides (in floats); within a head, keys and values are rows of hs floats
 * one after another (a KV cache). Parallel over the B * nh (sample, head) pairs.
 * In cache it takes 22 us where SDPA's CPU kernel takes 30 (batch 8, 4 heads, 116 positions,
 * head size 32); out of cache SDPA read the cache at about 12 GB/s (README, "Speed").
 */
/* exp of 16 floats <= 0 (scores minus their maximum), to about 2 ulp: e^x = 2^n e^r with
 * n = round(x / ln 2), |r| <= ln 2 / 2, and e^r from Cephes' expf polynomial. Below -87 the
 * result is flushed to (about) 2^-126 where expf would give 0 or a denormal; next to e^0 = 1 for
 * the maximum such terms vanish in the sum anyway. */
static inline v16 exp16(v16 x) {
    const v16 lo = x - x - 87.0f;
    vi16 below = x < lo;
    x = (v16)((below & (vi16)lo) | (~below & (vi16)x));
    v16 n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  /* round to nearest */
    v16 r = x - n * 0.693359375f + n * 2.12194440e-4f;  /* x - n ln 2 in two parts */
    v16 poly = 1.9875691500e-4f * r + 1.3981999507e-3f;
    poly = poly * r + 8.3334519073e-3f;
    poly = poly * r + 4.1665795894e-2f;
    poly = poly * r + 1.6666665459e-1f;
    poly = poly * r + 5.0000001201e-1f;
    v16 er = poly * r * r + r + 1.0f;
    vi16 scale = (__builtin_convertvector(n, vi16) + 127) << 23;  /* 2^n as float bits */
    return er * (v16)scale;
}

static inline float dot(const float *a, const float *b, long n) {
    const long n16 = n & ~15L;
    v16 acc = {0};
    for (long i = 0; i < n16; i += 16) acc += load16(a + i) * load16(b + i);
    float s = hsum(acc);
    for (long i = n16; i < n; i++) s += a[i] * b[i];
    return s;
}

int decode_attention(const float *q, const float *k, const float *v, float *y,
                     int B, int nh, long S, long hs,
                     long q_sb, long q_sh, long kv_sb, long kv_sh, float scale, int threads) {
    if (S < 1 || S > 65536) return -1;
    if (threads < 1) threads = 1;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long bh = 0; bh < (long)B * nh; bh++) {
        const long b = bh / nh, h = bh % nh;
        const float *qv = q + b * q_sb + h * q_sh;
        const float *K = k + b * kv_sb + h * kv_sh, *V = v + b * kv_sb + h * kv_sh;
        float *out = y + bh * hs;
        float p[S];
        float m = -INFINITY;
        for (long s = 0; s < S; s++) {
            p[s] = dot(qv, K + s * hs, hs) * scale;
            if (p[s] > m) m = p[s];
        }
        const long S16 = S & ~15L;
        v16 vsum = {0};
        for (long s = 0; s < S16; s += 16) {
            v16 e = exp16(load16(p + s) - m);
            *(v16u *)(p + s) = e;
            vsum += e;
        }
        float sum = hsum(vsum);
        for (long s = S16; s < S; s++) {
            p[s] = expf(p[s] - m);
            sum += p[s];
        }
        const float inv = 1.0f / sum;
        for (long d = 0; d < hs; d++) out[d] = 0.0f;
        for (long s = 0; s < S; s++) {
            const float w = p[s] * inv;
            const float *vs = V + s * hs;
            for (long d = 0; d < hs; d++) out[d] += w * vs[d];
        }
    }
    return 0;
}
