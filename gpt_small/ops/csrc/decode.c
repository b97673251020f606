/* Kernels for decoding on the CPU: skinny_linear (fp32, bf16 or int8 weights) and decode_attention.
 *
 * skinny_linear: y = x @ W.T + bias for a few rows of x (one row per sample).
 *
 * W is a torch Linear weight, (N, K) row-major. With a few rows of x the product is bound by
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

/* How far ahead of the row being summed the weights are requested, in bytes, into L2 (prefetcht2).
 * Out of cache, the hardware prefetchers alone leave a bf16 or int8 weight stream well short of
 * the memory bandwidth an fp32 one reaches: fewer bytes per instruction, fewer misses in flight.
 * Asking for every line a few pages ahead closes the gap (benchmarks/weight_streaming.py). */
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 8192
#endif

/* Rows [n0, n1) of y for B rows of x (with add, added to y: a residual); B and the weight type
 * are compile-time constants at each call site, so each (B, type) pair gets its own loop. */
static inline __attribute__((always_inline)) void linear_rows(
        const float *x, const void *W, const int type, const float *scale, const float *bias, float *y,
        const int B, long K, long N, long n0, long n1, int add) {
    const long wsize = type == W_F32 ? 4 : type == W_BF16 ? 2 : 1;
    /* S partial sums per row of x, on blocks of 16 in turn: with one, a row of x waits on the
     * previous add (4 cycles), which an int8 or bf16 weight stream outruns. Always 4, whatever B,
     * so a row's sums are added in one order however many rows run beside it (batch-invariant
     * decoding: serve's promise that a seeded request's text does not depend on the others);
     * B is at most 4, so the sums and a weight vector stay within the 32 vector registers. */
    const int S = 4;
    const long step = 16 * S, K16 = K & ~15L, Kstep = K - K % step;
    const char *Wb = (const char *)W;
    for (long n = n0; n < n1; n++) {
        const long row = n * K;
        v16 acc[4][4] = {{{0}}};
        for (long k = 0; k < Kstep; k += step) {
            for (long o = 0; o < step * wsize; o += 64)
                __builtin_prefetch(Wb + (row + k) * wsize + o + PREFETCH_AHEAD, 0, 1);
            for (int j = 0; j < S; j++) {
                v16 wv = load_w16(W, row + k + 16 * j, type);
                for (int b = 0; b < B; b++) acc[b][j] += wv * load16(x + b * K + k + 16 * j);
            }
        }
        for (long k = Kstep; k < K16; k += 16) {
            v16 wv = load_w16(W, row + k, type);
            for (int b = 0; b < B; b++) acc[b][0] += wv * load16(x + b * K + k);
        }
        for (int b = 0; b < B; b++) {
            v16 a = (acc[b][0] + acc[b][1]) + (acc[b][2] + acc[b][3]);
            float s = hsum(a);
            for (long k = K16; k < K; k++) s += load_w1(W, row + k, type) * x[b * K + k];
            if (scale) s *= scale[n];
            if (bias) s += bias[n];
            y[b * N + n] = add ? y[b * N + n] + s : s;
        }
    }
}

/* This thread's contiguous share [n0, n1) of n rows (all of them outside a parallel region). */
static inline void thread_share(long n, long *n0, long *n1) {
    int t = 0, nt = 1;
#ifdef _OPENMP
    extern int omp_get_thread_num(void);
    extern int omp_get_num_threads(void);
    t = omp_get_thread_num();
    nt = omp_get_num_threads();
#endif
    *n0 = n * t / nt;
    *n1 = n * (t + 1) / nt;
}

#define CASE(b, T) case b: linear_rows(xc, W, T, scale, bias, yc, b, K, N, m0, m1, add); break;

/* Inside a parallel region: this thread's share of the N weight rows of y (+)= x @ W.T + bias,
 * one contiguous block per thread. Up to 4 rows of x, one pass over the block; more (a short
 * prompt, a large batch), 4 rows of x at a time over 8 weight rows at a time, so each weight
 * row comes from memory once and from L1 for the other rows of x. Every row of x goes through
 * the same 4-row loop, so its result is the same bits alone or beside others, at any place in
 * the batch. type is a constant at each call site (always inlined), so each weight type gets its
 * own loops. */
static inline __attribute__((always_inline)) void linear_share(
        const float *x, const void *W, const int type, const float *scale, const float *bias, float *y,
        int B, long K, long N, int add) {
    long n0, n1;
    thread_share(N, &n0, &n1);
    const long nb = B <= 4 ? n1 - n0 : 8;
    for (long m0 = n0; m0 < n1; m0 += nb) {
        const long m1 = m0 + nb < n1 ? m0 + nb : n1;
        for (int b0 = 0; b0 < B; b0 += 4) {
            const float *xc = x + (long)b0 * K;
            float *yc = y + (long)b0 * N;
            switch (B - b0 < 4 ? B - b0 : 4) {
                CASE(1, type) CASE(2, type) CASE(3, type) CASE(4, type) }
        }
    }
}

#define SKINNY_BODY(T)                                                                     \
    if (B < 1) return -1;                                                                  \
    if (threads < 1) threads = 1;                                                          \
    _Pragma("omp parallel num_threads(threads)")                                           \
    linear_share(x, W, T, scale, bias, y, B, K, N, 0);                                     \
    return 0;

/* x: (B, K) fp32; W: (N, K) of the function's type; scale: (N,) fp32 (int8 only); bias: (N,) fp32
 * or NULL; y: (B, N) fp32; B >= 1. Return 0, or -1 for B out of range. */
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

/* softmax(q . K[s] * scale over s < S) @ V for one (sample, head): q hs floats, K and V S rows of
 * hs floats one after another, out hs floats. */
static void attend(const float *qv, const float *K, const float *V, float *out, long S, long hs, float scale) {
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

int decode_attention(const float *q, const float *k, const float *v, float *y,
                     int B, int nh, long S, long hs,
                     long q_sb, long q_sh, long kv_sb, long kv_sh, float scale, int threads) {
    if (S < 1 || S > 65536) return -1;
    if (threads < 1) threads = 1;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (long bh = 0; bh < (long)B * nh; bh++) {
        const long b = bh / nh, h = bh % nh;
        attend(q + b * q_sb + h * q_sh, k + b * kv_sb + h * kv_sh, v + b * kv_sb + h * kv_sh, y + bh * hs,
               S, hs, scale);
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------
 * decode_blocks: one decoding step (one new token per row) through every block of the model, in
 * one call and one parallel region. Python's own cost per operation (module calls, views, the
 * ctypes calls of the kernels above) adds up over a dozen operations a block to more than the
 * weight reads of int8 or bf16 weights at GPT-2 small's size; here it is paid once a step.
 *
 * It computes what model.py's Block.forward computes, in the same order (to fp32 rounding):
 *     x = x + c_proj(attention(rope(qk_norm(split(c_attn(ln_1(x)))))))
 *     x = x + mlp.c_proj(act(c_fc(ln_2(x))))
 * with the new keys and values written to each row's KV cache at pos[b], and row b attending to
 * positions 0..pos[b]. The structs mirror those in gpt_small/ops/decoder.py.
 */
typedef struct {
    const void *w;         /* (n, k): fp32, bf16 or int8 */
    const float *scale;    /* (n,) for int8, else NULL */
    const float *bias;     /* (n,) or NULL */
    long n, k;
    int type;              /* W_F32, W_BF16, W_I8 */
} linear_t;

typedef struct {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;   /* biases may be NULL */
    const float *qn_w, *qn_b, *kn_w, *kn_b;       /* per-head LayerNorms of q and k, or NULL */
    linear_t attn, attn_proj, fc, mlp_proj;
    float *k_cache, *v_cache;                     /* (rows, nh, S, hs), contiguous */
} block_t;

typedef struct {
    int n_layer, n_head, head_size, act;          /* act: 0 relu, 1 gelu (tanh form), 2 relu^2 */
    float eps;                                    /* of every LayerNorm */
    long cache_len;                               /* S of the caches */
    const float *rope_cos, *rope_sin;             /* (positions, hs / 2), or NULL without RoPE */
    const block_t *blocks;
} decoder_t;

enum { ACT_RELU, ACT_GELU, ACT_RELU2 };

void gelu_tanh_forward(const float *x, float *y, long n, int threads);  /* gelu.c */

/* Mean and variance summed in double: n terms in fp32 could drift from torch's by more than rounding. */
static void layer_norm(const float *x, const float *w, const float *b, float *y, long n, float eps) {
    double sum = 0.0, sq = 0.0;
    for (long i = 0; i < n; i++) sum += x[i];
    const float mean = (float)(sum / n);
    for (long i = 0; i < n; i++) sq += (double)(x[i] - mean) * (x[i] - mean);
    const float inv = (float)(1.0 / sqrt(sq / n + eps));
    for (long i = 0; i < n; i++) y[i] = (x[i] - mean) * inv * w[i] + (b ? b[i] : 0.0f);
}

/* This thread's share of y (+)= x @ W.T + bias for one of the block's products. */
static void linear_part(const linear_t *L, const float *x, float *y, int B, int add) {
    if (L->type == W_BF16) linear_share(x, L->w, W_BF16, L->scale, L->bias, y, B, L->k, L->n, add);
    else if (L->type == W_I8) linear_share(x, L->w, W_I8, L->scale, L->bias, y, B, L->k, L->n, add);
    else linear_share(x, L->w, W_F32, L->scale, L->bias, y, B, L->k, L->n, add);
}

/* x: (B, C) fp32, updated in place; pos: (B,) positions, each < cache_len; scratch: at least
 * B * (6 C + hidden) floats. Return 0, or -1 for B or a position out of range. */
int decode_blocks(const decoder_t *d, float *x, int B, const long *pos, float *scratch, int threads) {
    if (B < 1) return -1;
    for (int b = 0; b < B; b++)
        if (pos[b] < 0 || pos[b] >= d->cache_len) return -1;
    if (threads < 1) threads = 1;
    const int nh = d->n_head, hs = d->head_size, C = nh * hs;
    const long S = d->cache_len;
    float *xn = scratch, *qkv = xn + (long)B * C, *att = qkv + 3L * B * C, *q = att + (long)B * C;
    float *h = q + (long)B * C;  /* q: a row's normed and rotated query, one head per thread slot */
    const float scale = 1.0f / sqrtf((float)hs);
    #pragma omp parallel num_threads(threads)
    for (int l = 0; l < d->n_layer; l++) {
        const block_t *blk = &d->blocks[l];
        #pragma omp for schedule(static)
        for (int b = 0; b < B; b++) layer_norm(x + (long)b * C, blk->ln1_w, blk->ln1_b, xn + (long)b * C, C, d->eps);
        linear_part(&blk->attn, xn, qkv, B, 0);
        #pragma omp barrier
        #pragma omp for schedule(static)
        for (long bh = 0; bh < (long)B * nh; bh++) {
            const long b = bh / nh, hd = bh % nh, p = pos[b];
            const float *qkv_b = qkv + b * 3 * C;
            float *qh = q + b * C + hd * hs;
            float *kc = blk->k_cache + ((b * nh + hd) * S) * hs, *vc = blk->v_cache + ((b * nh + hd) * S) * hs;
            float *kp = kc + p * hs;
            const float *qs = qkv_b + hd * hs, *ks = qkv_b + C + hd * hs, *vs = qkv_b + 2 * C + hd * hs;
            if (blk->qn_w) {
                layer_norm(qs, blk->qn_w, blk->qn_b, qh, hs, d->eps);
                layer_norm(ks, blk->kn_w, blk->kn_b, kp, hs, d->eps);
            } else {
                for (long i = 0; i < hs; i++) { qh[i] = qs[i]; kp[i] = ks[i]; }
            }
            if (d->rope_cos) {  /* half-split rotation: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) */
                const long half = hs / 2;
                const float *cs = d->rope_cos + p * half, *sn = d->rope_sin + p * half;
                for (long i = 0; i < half; i++) {
                    const float q1 = qh[i], q2 = qh[i + half], k1 = kp[i], k2 = kp[i + half];
                    qh[i] = q1 * cs[i] - q2 * sn[i];
                    qh[i + half] = q2 * cs[i] + q1 * sn[i];
                    kp[i] = k1 * cs[i] - k2 * sn[i];
                    kp[i + half] = k2 * cs[i] + k1 * sn[i];
                }
            }
            for (long i = 0; i < hs; i++) vc[p * hs + i] = vs[i];
            attend(qh, kc, vc, att + b * C + hd * hs, p + 1, hs, scale);
        }
        linear_part(&blk->attn_proj, att, x, B, 1);
        #pragma omp barrier
        #pragma omp for schedule(static)
        for (int b = 0; b < B; b++) layer_norm(x + (long)b * C, blk->ln2_w, blk->ln2_b, xn + (long)b * C, C, d->eps);
        linear_part(&blk->fc, xn, h, B, 0);
        {
            const long H = blk->fc.n;
            long n0, n1;
            thread_share(H, &n0, &n1);  /* the columns of h this thread's linear_part wrote */
            for (int b = 0; b < B; b++) {
                float *hb = h + b * H;
                if (d->act == ACT_GELU) gelu_tanh_forward(hb + n0, hb + n0, n1 - n0, 1);
                else
                    for (long i = n0; i < n1; i++) {
                        const float r = hb[i] > 0.0f ? hb[i] : 0.0f;
                        hb[i] = d->act == ACT_RELU2 ? r * r : r;
                    }
            }
        }
        #pragma omp barrier
        linear_part(&blk->mlp_proj, h, x, B, 1);
        #pragma omp barrier
    }
    return 0;
}
