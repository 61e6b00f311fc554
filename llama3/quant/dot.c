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
   costs 0.25%). A weight row is read in one stream: its G = K / 32 blocks of codes (16 bytes each, byte j
   holding element j in its low nibble and element j + 16 in its high one, as GGUF's blocks), then its G scales,
   then its G minimums (float16, as GGUF's Q4_1 stores them): 20 bytes a block, and the scales of 8 blocks
   convert in one instruction. Pairs of uint8 x int8 products are at most 2 * 15 * 127 = 3810 in int16.

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
#define MAX_BLOCKS 2048 /* K up to 65536: a row's scales times the activations' live on the stack */
#define ROWS 4          /* rows of x multiplied per pass over a weight row (prefill): four accumulators in flight */
#define INLINE static inline __attribute__((always_inline))

const char *dot_isa(void) { return DOT_AVX2 ? "avx2" : "generic"; }
int64_t dot_max_inputs(void) { return (int64_t)MAX_BLOCKS * BLOCK; }

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

/* Activations of M rows, quantized: what the products read. */
typedef struct {
    int8_t *a;
    float *d, *sums, *shift;
    int64_t K, G;
} activations;

/* An int4 weight row: G blocks of 16 bytes of codes, then G float16 scales, then G float16 minimums. */
typedef struct {
    const uint8_t *codes;
    const uint16_t *scales, *mins;
} q4_row;

INLINE q4_row q4_row_at(const uint8_t *rows, int64_t n, int64_t G) {
    const uint8_t *row = rows + n * G * (BLOCK / 2 + 4);
    const uint16_t *scales = (const uint16_t *)(row + G * (BLOCK / 2));
    return (q4_row){row, scales, scales + G};
}

#if DOT_AVX2
INLINE float hsum(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

/* The 8 int32 sums of pairs of products of a block of int4 codes and a block of int8 activations, as floats. */
INLINE __m256 q4_dot(const uint8_t *codes, const int8_t *a) {
    const __m128i packed = _mm_loadu_si128((const __m128i *)codes);
    /* elements 0..15 from the low nibbles, 16..31 from the high ones */
    const __m256i w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0F));
    const __m256i act = _mm256_loadu_si256((const __m256i *)a);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(w, act), _mm256_set1_epi16(1)));
}

/* The same for int8 codes: |w| (uint8) times a * sign(w) (int8). */
INLINE __m256 q8_dot(const int8_t *q, const int8_t *a) {
    const __m256i w = _mm256_loadu_si256((const __m256i *)q), act = _mm256_loadu_si256((const __m256i *)a);
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(act, w));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
#else
INLINE float q4_dot(const uint8_t *codes, const int8_t *a) {
    int dot = 0;
    for (int j = 0; j < BLOCK / 2; j++) dot += (codes[j] & 0x0F) * a[j] + (codes[j] >> 4) * a[j + BLOCK / 2];
    return (float)dot;
}

INLINE float q8_dot(const int8_t *q, const int8_t *a) {
    int dot = 0;
    for (int j = 0; j < BLOCK; j++) dot += q[j] * a[j];
    return (float)dot;
}
#endif

/* One row of x times one int4 weight row (decode). First, for every block, the product of the two scales (sd)
   and the part outside the integer products (extra: s * shift + z * sums), 8 blocks at a time; then the
   integer products with two accumulators (even and odd blocks), so that each multiply-add waits on the one two
   blocks back, not the one before. */
INLINE float q4_decode(const activations *x, int64_t m, q4_row w) {
    const int64_t G = x->G;
    const int8_t *a = x->a + m * x->K;
    const float *d = x->d + m * G, *sums = x->sums + m * G, *shift = x->shift + m * G;
    float sd[MAX_BLOCKS], extra = 0.0f;
    int64_t g = 0;
#if DOT_AVX2
    __m256 extra8 = _mm256_setzero_ps();
    for (; g + 8 <= G; g += 8) {
        const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w.scales + g)));
        const __m256 z = _mm256_fmadd_ps(_mm256_set1_ps(8.0f), s, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w.mins + g))));
        _mm256_storeu_ps(sd + g, _mm256_mul_ps(s, _mm256_loadu_ps(d + g)));
        extra8 = _mm256_fmadd_ps(s, _mm256_loadu_ps(shift + g), extra8);
        extra8 = _mm256_fmadd_ps(z, _mm256_loadu_ps(sums + g), extra8);
    }
    extra = hsum(extra8);
#endif
    for (; g < G; g++) {
        const float s = half_to_float(w.scales[g]);
        sd[g] = s * d[g];
        extra += s * shift[g] + (half_to_float(w.mins[g]) + 8.0f * s) * sums[g];
    }
#if DOT_AVX2
    __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
    for (g = 0; g + 1 < G; g += 2) {
        even = _mm256_fmadd_ps(_mm256_broadcast_ss(sd + g), q4_dot(w.codes + g * 16, a + g * BLOCK), even);
        odd = _mm256_fmadd_ps(_mm256_broadcast_ss(sd + g + 1), q4_dot(w.codes + g * 16 + 16, a + g * BLOCK + BLOCK), odd);
    }
    if (g < G) even = _mm256_fmadd_ps(_mm256_broadcast_ss(sd + g), q4_dot(w.codes + g * 16, a + g * BLOCK), even);
    return hsum(_mm256_add_ps(even, odd)) + extra;
#else
    float dot = 0.0f;
    for (g = 0; g < G; g++) dot += sd[g] * q4_dot(w.codes + g * 16, a + g * BLOCK);
    return dot + extra;
#endif
}

/* `rows` rows of x from m times one int4 weight row (prefill): the row's codes unpacked once for all of them. */
INLINE void q4_rows(const activations *x, int64_t m, const int rows, q4_row w, float *y, int64_t N) {
    const int64_t G = x->G;
    float extra[ROWS] = {0.0f};
#if DOT_AVX2
    __m256 acc[ROWS];
    for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
#else
    float acc[ROWS] = {0.0f};
#endif
    for (int64_t g = 0; g < G; g++) {
        const float s = half_to_float(w.scales[g]), z = half_to_float(w.mins[g]) + 8.0f * s;
        for (int r = 0; r < rows; r++) {
            const int64_t mb = (m + r) * G + g;
            const int8_t *a = x->a + (m + r) * x->K + g * BLOCK;
#if DOT_AVX2
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(s * x->d[mb]), q4_dot(w.codes + g * 16, a), acc[r]);
#else
            acc[r] += s * x->d[mb] * q4_dot(w.codes + g * 16, a);
#endif
            extra[r] += s * x->shift[mb] + z * x->sums[mb];
        }
    }
    for (int r = 0; r < rows; r++) {
#if DOT_AVX2
        y[(m + r) * N] = hsum(acc[r]) + extra[r];
#else
        y[(m + r) * N] = acc[r] + extra[r];
#endif
    }
}

/* `rows` rows of x from m times one int8 weight row; with one row, two accumulators (as q4_decode). */
INLINE void q8_rows(const activations *x, int64_t m, const int rows, const int8_t *q, float scale, float *y,
                    int64_t N) {
    const int64_t G = x->G;
#if DOT_AVX2
    __m256 acc[ROWS + 1];
    for (int r = 0; r <= rows; r++) acc[r] = _mm256_setzero_ps();
    if (rows == 1) {
        const int8_t *a = x->a + m * x->K;
        const float *d = x->d + m * G;
        int64_t g = 0;
        for (; g + 1 < G; g += 2) {
            acc[0] = _mm256_fmadd_ps(_mm256_broadcast_ss(d + g), q8_dot(q + g * BLOCK, a + g * BLOCK), acc[0]);
            acc[1] = _mm256_fmadd_ps(_mm256_broadcast_ss(d + g + 1), q8_dot(q + g * BLOCK + BLOCK, a + g * BLOCK + BLOCK), acc[1]);
        }
        if (g < G) acc[0] = _mm256_fmadd_ps(_mm256_broadcast_ss(d + g), q8_dot(q + g * BLOCK, a + g * BLOCK), acc[0]);
        y[m * N] = scale * hsum(_mm256_add_ps(acc[0], acc[1]));
        return;
    }
    for (int64_t g = 0; g < G; g++)
        for (int r = 0; r < rows; r++) {
            const int64_t mb = (m + r) * G + g;
            acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(x->d + mb), q8_dot(q + g * BLOCK, x->a + mb * BLOCK), acc[r]);
        }
    for (int r = 0; r < rows; r++) y[(m + r) * N] = scale * hsum(acc[r]);
#else
    float acc[ROWS] = {0.0f};
    for (int64_t g = 0; g < G; g++)
        for (int r = 0; r < rows; r++) {
            const int64_t mb = (m + r) * G + g;
            acc[r] += x->d[mb] * q8_dot(q + g * BLOCK, x->a + mb * BLOCK);
        }
    for (int r = 0; r < rows; r++) y[(m + r) * N] = scale * acc[r];
#endif
}

/* Quantizes the M rows of x into freshly allocated activations; 0, or -1 if out of memory. */
static int quantize(const float *x, int64_t M, int64_t K, int threads, activations *act) {
    const int64_t G = K / BLOCK;
    float *mem = malloc((size_t)(3 * M * G) * sizeof(float) + (size_t)(M * K));
    if (!mem) return -1;
    *act = (activations){(int8_t *)(mem + 3 * M * G), mem, mem + M * G, mem + 2 * M * G, K, G};
#pragma omp parallel for schedule(static) num_threads(threads) if (M > 1)
    for (int64_t m = 0; m < M; m++)
        quantize_row(x + m * K, K, act->a + m * K, act->d + m * G, act->sums + m * G, act->shift + m * G);
    return 0;
}

/* y (M, N) = x (M, K) @ W.T for int4 W: N rows as `q4_row_at` reads them (K / 32 * 20 bytes each). K must be a
   multiple of 32 and at most dot_max_inputs(). Returns 0, or -1 if out of memory. */
int dot_q4(const float *x, int64_t M, int64_t K, const uint8_t *rows, int64_t N, float *y, int threads) {
    activations act;
    if (quantize(x, M, K, threads, &act)) return -1;
    const int64_t tiled = M / ROWS * ROWS;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const q4_row w = q4_row_at(rows, n, act.G);
        if (M == 1) {
            y[n] = q4_decode(&act, 0, w);
            continue;
        }
        for (int64_t m = 0; m < tiled; m += ROWS) q4_rows(&act, m, ROWS, w, y + n, N);
        for (int64_t m = tiled; m < M; m++) q4_rows(&act, m, 1, w, y + n, N);
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
    const int64_t tiled = M / ROWS * ROWS;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m = 0; m < tiled; m += ROWS) q8_rows(&act, m, ROWS, codes + n * K, scales[n], y + n, N);
        for (int64_t m = tiled; m < M; m++) q8_rows(&act, m, 1, codes + n * K, scales[n], y + n, N);
    }
    free(act.d);
    return 0;
}
