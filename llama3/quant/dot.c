/* llama3's CPU kernels for quantized weights: integer dot products, as llama.cpp runs its Q4 and Q8 weights.

   y = x @ W.T for float32 x (M, K) and a quantized W (N, K), in three steps per call:
   1. each row of x is quantized per block of 32 inputs (llama.cpp's Q8_0): d = max|x| / 127,
      a = round(x * (1 / d)) in -127..127 (round half to even), and the block's exact float sum is kept;
   2. each block of a weight row is multiplied by the activation block in integers (products of 4- or 8-bit
      codes and 8-bit activations, added in int16 pairs and then int32: no overflow, see below);
   3. the integer sums are scaled in float32 and added up, one float32 result per (row of x, row of W).

   int4 weights (`dot_q4`): codes q in 0..15 and, per block of 32, a scale s and a minimum m: w = q * s + m
   (GGUF's Q4_1 form; Q4_0's w = (q - 8) * s has m = -8 s). With z = m + 8 s, the block's middle value,
       w = (q - 8) * s + z,   sum_k w[k] * x[k] ~ sum_blocks  s * d * (sum q * a - 8 * sum a) + z * (sum x):
   the exact sum of x meets the block's common part z, and only the centred (q - 8) s meets the 8-bit rounding
   of the activations (the other way round, q * s with m, cost SmolLM2 0.73% of perplexity on Hamlet where this
   costs 0.25%). A block is 20 bytes, as GGUF's Q4_1 block, read in one stream: s and m (float16), then 16
   bytes of codes, byte j holding element j in its low nibble and element j + 16 in its high one. Pairs of
   uint8 x int8 products are at most 2 * 15 * 127 = 3810 in int16.

   int8 weights (`dot_q8`): codes q in -128..127 and one scale per row: w = q * scale.
   The int16 pair of |q| (uint8) times a * sign(q) (int8) is at most 2 * 128 * 127 = 32512 < 2^15.

   Rows of W are split between `threads` OpenMP threads (PyTorch's count, passed in as ATen passes its own:
   OpenMP's per-thread default would be every core in a thread that never set it), in PyTorch's runtime: this
   library is built with -fopenmp and loaded into a process that has PyTorch's libgomp, whose soname it shares.
   With AVX2, FMA and F16C the block products run on 256-bit registers (vpmaddubsw, vpmaddwd); otherwise the
   same math in plain C.
   The PyTorch reference of both kernels is in llama3/quant/dot.py. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define DOT_AVX2 1
#else
#define DOT_AVX2 0
#endif

#define BLOCK 32
#define ROWS 4 /* rows of x multiplied per pass over a weight row (prefill): four accumulators in flight */
#define INLINE static inline __attribute__((always_inline))

typedef struct {
    uint16_t scale, min; /* float16 */
    uint8_t q[BLOCK / 2];
} q4_block;

/* float16 bits to float32 (IEEE binary16: subnormals, infinities and NaN included) */
static inline float half_to_float(uint16_t h) {
#if DOT_AVX2
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h >> 15) << 31, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
    union {
        uint32_t u;
        float f;
    } out;
    if (exponent == 0x1F) {
        out.u = sign | 0x7F800000u | (mantissa << 13);
    } else if (exponent != 0) {
        out.u = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else { /* zero or subnormal: mantissa * 2^-24, exact in float32 */
        out.f = (float)mantissa * 0x1p-24f;
        out.u |= sign;
    }
    return out.f;
#endif
}

const char *dot_isa(void) { return DOT_AVX2 ? "avx2" : "generic"; }
int64_t dot_q4_block_bytes(void) { return (int64_t)sizeof(q4_block); }

/* One row's activations, per block: the codes a, the scale d, the exact sum of x (sums) and -8 * d * sum(a)
   (shift: the (q - 8) of int4 codes, applied once per block outside the integer products). */
static void quantize_row(const float *x, int64_t K, int8_t *a, float *d, float *sums, float *shift) {
    for (int64_t g = 0; g < K / BLOCK; g++) {
        const float *xb = x + g * BLOCK;
        int8_t *ab = a + g * BLOCK;
        float amax = 0.0f, sum = 0.0f;
        for (int j = 0; j < BLOCK; j++) {
            const float v = fabsf(xb[j]);
            amax = v > amax ? v : amax;
            sum += xb[j];
        }
        const float scale = amax / 127.0f;
        const float inverse = scale != 0.0f ? 1.0f / scale : 0.0f;
        int asum = 0;
#if DOT_AVX2
        const __m256 by = _mm256_set1_ps(inverse);
        __m256i codes[4], total = _mm256_setzero_si256();
        for (int i = 0; i < 4; i++) { /* round half to even, as nearbyintf in the default rounding mode */
            const __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xb + 8 * i), by),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            codes[i] = _mm256_cvtps_epi32(v); /* |x * inverse| <= 127 (1 + 2^-22): never past 127 */
            total = _mm256_add_epi32(total, codes[i]);
        }
        const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(codes[0], codes[1]),
                                                  _mm256_packs_epi32(codes[2], codes[3]));
        /* the packs interleave the two 128-bit lanes: put the 8 groups of 4 back in order */
        _mm256_storeu_si256((__m256i *)ab, _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
        asum = _mm_cvtsi128_si32(t);
#else
        for (int j = 0; j < BLOCK; j++) {
            float q = nearbyintf(xb[j] * inverse); /* the default rounding mode: half to even */
            q = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);
            ab[j] = (int8_t)q;
            asum += ab[j];
        }
#endif
        d[g] = scale;
        sums[g] = sum;
        shift[g] = -8.0f * scale * (float)asum;
    }
}

#if DOT_AVX2
INLINE float hsum(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

/* The 8 int32 sums of pairs of products of a block of int4 codes and a block of int8 activations. */
INLINE __m256 q4_dot(const q4_block *b, const __m256i act) {
    const __m128i packed = _mm_loadu_si128((const __m128i *)b->q);
    /* elements 0..15 from the low nibbles, 16..31 from the high ones */
    const __m256i w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0F));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(w, act), _mm256_set1_epi16(1)));
}

/* The same for int8 codes: |w| (uint8) times a * sign(w) (int8). */
INLINE __m256 q8_dot(const int8_t *q, const __m256i act) {
    const __m256i w = _mm256_loadu_si256((const __m256i *)q);
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(act, w));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
#else
INLINE float q4_dot(const q4_block *b, const int8_t *a) {
    int dot = 0;
    for (int j = 0; j < BLOCK / 2; j++) dot += (b->q[j] & 0x0F) * a[j] + (b->q[j] >> 4) * a[j + BLOCK / 2];
    return (float)dot;
}

INLINE float q8_dot(const int8_t *q, const int8_t *a) {
    int dot = 0;
    for (int j = 0; j < BLOCK; j++) dot += q[j] * a[j];
    return (float)dot;
}
#endif

/* Activations of M rows, quantized: what the products read. */
typedef struct {
    int8_t *a;
    float *d, *sums, *shift;
    int64_t K, G;
} activations;

/* y[m, n] for `rows` rows of x from m and `cols` weight rows from n: rows * cols accumulators in flight
   (rows = 1 for decode, cols = 1 for prefill). */
INLINE void q4_tile(const activations *x, int64_t m, const int rows, const q4_block *blocks, int64_t n,
                    const int cols, int64_t N, float *y) {
    const int64_t G = x->G;
    float extra[ROWS] = {0.0f};
#if DOT_AVX2
    __m256 acc[ROWS];
    for (int i = 0; i < rows * cols; i++) acc[i] = _mm256_setzero_ps();
#else
    float acc[ROWS] = {0.0f};
#endif
    for (int64_t g = 0; g < G; g++) {
        for (int r = 0; r < rows; r++) {
            const int64_t mb = (m + r) * G + g;
#if DOT_AVX2
            const __m256i act = _mm256_loadu_si256((const __m256i *)(x->a + mb * BLOCK));
#else
            const int8_t *act = x->a + mb * BLOCK;
#endif
            for (int c = 0; c < cols; c++) {
                const q4_block *b = blocks + (n + c) * G + g;
                const int i = r * cols + c;
                const float scale = half_to_float(b->scale);
#if DOT_AVX2
                acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(scale * x->d[mb]), q4_dot(b, act), acc[i]);
#else
                acc[i] += scale * x->d[mb] * q4_dot(b, act);
#endif
                extra[i] += scale * x->shift[mb] + (half_to_float(b->min) + 8.0f * scale) * x->sums[mb];
            }
        }
    }
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) {
#if DOT_AVX2
            const float dot = hsum(acc[r * cols + c]);
#else
            const float dot = acc[r * cols + c];
#endif
            y[(m + r) * N + n + c] = dot + extra[r * cols + c];
        }
}

INLINE void q8_tile(const activations *x, int64_t m, const int rows, const int8_t *codes, const float *scales,
                    int64_t n, const int cols, int64_t N, float *y) {
    const int64_t G = x->G, K = x->K;
#if DOT_AVX2
    __m256 acc[ROWS];
    for (int i = 0; i < rows * cols; i++) acc[i] = _mm256_setzero_ps();
#else
    float acc[ROWS] = {0.0f};
#endif
    for (int64_t g = 0; g < G; g++) {
        for (int r = 0; r < rows; r++) {
            const int64_t mb = (m + r) * G + g;
#if DOT_AVX2
            const __m256i act = _mm256_loadu_si256((const __m256i *)(x->a + mb * BLOCK));
            const __m256 d = _mm256_set1_ps(x->d[mb]);
            for (int c = 0; c < cols; c++)
                acc[r * cols + c] = _mm256_fmadd_ps(d, q8_dot(codes + (n + c) * K + g * BLOCK, act), acc[r * cols + c]);
#else
            const int8_t *act = x->a + mb * BLOCK;
            for (int c = 0; c < cols; c++) acc[r * cols + c] += x->d[mb] * q8_dot(codes + (n + c) * K + g * BLOCK, act);
#endif
        }
    }
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) {
#if DOT_AVX2
            const float dot = hsum(acc[r * cols + c]);
#else
            const float dot = acc[r * cols + c];
#endif
            y[(m + r) * N + n + c] = scales[n + c] * dot;
        }
}

#if DOT_AVX2
/* Decode: one row of x, one weight row, read in a single stream; two accumulators (even and odd blocks) so that
   each multiply-add waits on the one two blocks back, not the one before. */
INLINE float q4_decode(const int8_t *a, const float *d, const float *sums, const float *shift, const q4_block *b,
                       int64_t G) {
    __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
    float extra = 0.0f;
    int64_t g = 0;
    for (; g + 1 < G; g += 2) {
        const __m256i a0 = _mm256_loadu_si256((const __m256i *)(a + g * BLOCK));
        const __m256i a1 = _mm256_loadu_si256((const __m256i *)(a + (g + 1) * BLOCK));
        const float s0 = half_to_float(b[g].scale), s1 = half_to_float(b[g + 1].scale);
        even = _mm256_fmadd_ps(_mm256_set1_ps(s0 * d[g]), q4_dot(b + g, a0), even);
        odd = _mm256_fmadd_ps(_mm256_set1_ps(s1 * d[g + 1]), q4_dot(b + g + 1, a1), odd);
        extra += s0 * shift[g] + (half_to_float(b[g].min) + 8.0f * s0) * sums[g];
        extra += s1 * shift[g + 1] + (half_to_float(b[g + 1].min) + 8.0f * s1) * sums[g + 1];
    }
    for (; g < G; g++) {
        const __m256i a0 = _mm256_loadu_si256((const __m256i *)(a + g * BLOCK));
        const float s0 = half_to_float(b[g].scale);
        even = _mm256_fmadd_ps(_mm256_set1_ps(s0 * d[g]), q4_dot(b + g, a0), even);
        extra += s0 * shift[g] + (half_to_float(b[g].min) + 8.0f * s0) * sums[g];
    }
    return hsum(_mm256_add_ps(even, odd)) + extra;
}
#endif

/* Quantizes the M rows of x into freshly allocated activations; 0, or -1 if out of memory. */
static int quantize(const float *x, int64_t M, int64_t K, int threads, activations *act) {
    const int64_t G = K / BLOCK;
    float *mem = malloc((size_t)(3 * M * G) * sizeof(float) + (size_t)(M * K));
    if (!mem) return -1;
    *act = (activations){(int8_t *)(mem + 3 * M * G), mem, mem + M * G, mem + 2 * M * G, K, G};
#pragma omp parallel for schedule(static) num_threads(threads) if (M > 1)
    for (int64_t m = 0; m < M; m++) quantize_row(x + m * K, K, act->a + m * K, act->d + m * G, act->sums + m * G, act->shift + m * G);
    return 0;
}

/* y (M, N) = x (M, K) @ W.T for int4 W: N rows of K / 32 `q4_block`s. K must be a multiple of 32.
   Returns 0, or -1 if out of memory. */
int dot_q4(const float *x, int64_t M, int64_t K, const q4_block *blocks, int64_t N, float *y, int threads) {
    activations act;
    if (quantize(x, M, K, threads, &act)) return -1;
    if (M == 1) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t n = 0; n < N; n++)
#if DOT_AVX2
            y[n] = q4_decode(act.a, act.d, act.sums, act.shift, blocks + n * act.G, act.G);
#else
            q4_tile(&act, 0, 1, blocks, n, 1, N, y);
#endif
    } else {
        const int64_t tiled = M / ROWS * ROWS;
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t n = 0; n < N; n++) {
            for (int64_t m = 0; m < tiled; m += ROWS) q4_tile(&act, m, ROWS, blocks, n, 1, N, y);
            for (int64_t m = tiled; m < M; m++) q4_tile(&act, m, 1, blocks, n, 1, N, y);
        }
    }
    free(act.d);
    return 0;
}

/* y (M, N) = x (M, K) @ W.T for int8 W: codes (N, K) and one scale per row (N). K must be a multiple of 32.
   Returns 0, or -1 if out of memory. */
int dot_q8(const float *x, int64_t M, int64_t K, const int8_t *codes, const float *scales, int64_t N, float *y,
           int threads) {
    activations act;
    if (quantize(x, M, K, threads, &act)) return -1;
    if (M == 1) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t n = 0; n < N; n++) q8_tile(&act, 0, 1, codes, scales, n, 1, N, y);
    } else {
        const int64_t tiled = M / ROWS * ROWS;
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t n = 0; n < N; n++) {
            for (int64_t m = 0; m < tiled; m += ROWS) q8_tile(&act, m, ROWS, codes, scales, n, 1, N, y);
            for (int64_t m = tiled; m < M; m++) q8_tile(&act, m, 1, codes, scales, n, 1, N, y);
        }
    }
    free(act.d);
    return 0;
}
