/* Kernels for decoding on the CPU in fp32: skinny_linear and decode_attention.
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

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));  /* unaligned loads */

static inline v16 load16(const float *p) { return *(const v16u *)p; }

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

/* Rows [n0, n1) of y for B rows of x; B is a compile-time constant at each call site. */
static inline __attribute__((always_inline)) void linear_rows(
        const float *x, const float *W, const float *bias, float *y,
        const int B, long K, long N, long n0, long n1) {
    const long K16 = K & ~15L;
    for (long n = n0; n < n1; n++) {
        const float *w = W + n * K;
        v16 acc[8] = {0};
        for (long k = 0; k < K16; k += 16) {
            v16 wv = load16(w + k);
            /* From 5 rows of x on, compute slows the weight stream enough that asking for the
             * weights 4 KiB ahead pays: 13-23% at batch 6 and 8 in an A/B; 0 to -15% below. */
            if (B >= 5) __builtin_prefetch(w + k + 1024, 0, 0);
            for (int b = 0; b < B; b++) acc[b] += wv * load16(x + b * K + k);
        }
        for (int b = 0; b < B; b++) {
            float s = hsum(acc[b]);
            for (long k = K16; k < K; k++) s += w[k] * x[b * K + k];
            y[b * N + n] = bias ? s + bias[n] : s;
        }
    }
}

#define CASE(b) case b: linear_rows(x, W, bias, y, b, K, N, n0, n1); break;

/* x: (B, K), W: (N, K), bias: (N,) or NULL, y: (B, N); 1 <= B <= 8. Returns 0, or -1 for B out of range. */
int skinny_linear(const float *x, const float *W, const float *bias, float *y,
                  int B, long K, long N, int threads) {
    if (B < 1 || B > 8) return -1;
    if (threads < 1) threads = 1;
    #pragma omp parallel num_threads(threads)
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        extern int omp_get_thread_num(void);
        extern int omp_get_num_threads(void);
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        long n0 = N * t / nt, n1 = N * (t + 1) / nt;
        switch (B) { CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8) }
    }
    return 0;
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
typedef int vi16 __attribute__((vector_size(64)));

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
