// ember's CPU kernels (x86-64 with AVX2, FMA and F16C): block-quantized linear layers, and the pieces of a
// decode step that PyTorch runs as many small ops (RMSNorm, rotary embedding with the KV cache write,
// attention over the paged KV cache).
//
// Quantized linear layers. Weights are stored in GGUF's block formats, 32 input columns per block:
//   q4_1: w = d * q + m, q in 0..15, 16 bytes of nibbles per block (byte j holds element j in its low
//         nibble and element j + 16 in its high nibble), d and m in float16;
//   q8_0: w = d * q, q in -127..127, 32 bytes per block, d in float16.
// Activations are quantized on the fly per block of 32 to int8 with one float scale (and, for q4_1, the
// scaled sum of the codes, which carries the m term), so each block's dot product is integer arithmetic:
// maddubs (unsigned x signed bytes) then madd into 32-bit sums, then one fused multiply-add in float.
// Decoding one token reads every weight once, so the time is the weight bytes over the memory bandwidth:
// 4-bit blocks read 5/32 of float32's bytes.
//
// Threads: the loops run under OpenMP; linked against the libgomp torch has loaded, they share its pool.

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#define QK 32
#define PREFETCH_ROWS 16

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// x [M, K] float -> xq [M, K] int8, xd [M * K / 32] scales, xs [M * K / 32] scale * sum of codes.
// q = round-half-even(x * (1 / d)), d = max|x| / 127 over the block (0 for an all-zero block).
static void quantize_activations(const float *x, int64_t n_blocks, int8_t *xq, float *xd, float *xs) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
#pragma omp parallel for schedule(static) if (n_blocks > 256)
    for (int64_t i = 0; i < n_blocks; i++) {
        const float *src = x + i * QK;
        __m256 v[4];
        __m256 amax = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_loadu_ps(src + 8 * j);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float d = _mm_cvtss_f32(m4) / 127.0f;
        const __m256 id = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
        __m256i q[4];
        for (int j = 0; j < 4; j++) {
            __m256 r = _mm256_round_ps(_mm256_mul_ps(v[j], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            q[j] = _mm256_cvtps_epi32(r);
        }
        // 32 int32 -> 32 int8, in order (packs work per 128-bit lane, the permute restores the order).
        __m256i a = _mm256_packs_epi32(q[0], q[1]);
        __m256i b = _mm256_packs_epi32(q[2], q[3]);
        __m256i p = _mm256_packs_epi16(a, b);
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(xq + i * QK), p);
        __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        xd[i] = d;
        xs[i] = d * (float)hsum(_mm256_cvtepi32_ps(s));
    }
}

static inline float dot_f32(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline __m256i unpack_q4(const uint8_t *p) {
    const __m128i packed = _mm_loadu_si128((const __m128i *)p);
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

#define INLINE static inline __attribute__((always_inline))

// A tile: RN weight rows (w, row_bytes apart; their scales as floats in wd/wm, nb apart) against RM
// activation rows (from row m0). Each weight block is unpacked once and used for every activation row;
// each activation block is loaded once and used for every weight row. out[j * RN + i] for row i, row j.
INLINE void tile(int format, const uint8_t *w, int64_t row_bytes, const float *wd, const float *wm,
                 const int8_t *xq, const float *xd, const float *xs, int64_t nb, int64_t m0, const int RN,
                 const int RM, float *out) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4][2];
    for (int i = 0; i < RN; i++)
        for (int j = 0; j < RM; j++) acc[i][j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i y[2];
        for (int j = 0; j < RM; j++) y[j] = _mm256_loadu_si256((const __m256i *)(xq + ((m0 + j) * nb + b) * QK));
        for (int i = 0; i < RN; i++) {
            // maddubs multiplies unsigned by signed bytes: q4_1's codes are unsigned already; for q8_0 the
            // weight's signs move onto x.
            __m256i wu, ws = _mm256_setzero_si256();
            if (format == 0) {
                wu = unpack_q4(w + i * row_bytes + b * 16);
            } else {
                ws = _mm256_loadu_si256((const __m256i *)(w + i * row_bytes + b * QK));
                wu = _mm256_abs_epi8(ws);
            }
            // The memory of the weight rows a few tiles on, fetched ahead: decoding streams weights from
            // DRAM, and the hardware prefetcher alone keeps too few loads in flight.
            _mm_prefetch((const char *)(w + (i + PREFETCH_ROWS) * row_bytes + b * (format == 0 ? 16 : QK)), _MM_HINT_T0);
            const float dw = wd[i * nb + b];
            for (int j = 0; j < RM; j++) {
                const __m256i yy = format == 0 ? y[j] : _mm256_sign_epi8(y[j], ws);
                const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(wu, yy), ones);
                const __m256 scale = _mm256_set1_ps(dw * xd[(m0 + j) * nb + b]);
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[i][j]);
            }
        }
    }
    for (int j = 0; j < RM; j++) {
        float sums[4];
        if (RN == 4) {  // four horizontal sums at once
            const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0][j], acc[1][j]), _mm256_hadd_ps(acc[2][j], acc[3][j]));
            _mm_storeu_ps(sums, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
        } else {
            for (int i = 0; i < RN; i++) sums[i] = hsum(acc[i][j]);
        }
        for (int i = 0; i < RN; i++) {
            if (format == 0) sums[i] += dot_f32(wm + i * nb, xs + (m0 + j) * nb, nb);  // the m term
            out[j * RN + i] = sums[i];
        }
    }
}

static void halves_to_floats(const uint16_t *h, float *f, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
    for (; i < n; i++) f[i] = _cvtsh_ss(h[i]);
}

// y [M, N] = x [M, K] @ W.T (+ bias [N]); format 0: q4_1 (wq [N, K / 2] bytes, wm used), 1: q8_0 (wq [N, K]).
// Returns 0, or -1 when scratch memory could not be had.
int ember_quant_linear(int format, const float *x, int64_t M, int64_t K, const void *wq, const uint16_t *wd,
                       const uint16_t *wm, int64_t N, const float *bias, float *y) {
    const int64_t nb = K / QK;
    if (M == 0 || N == 0) return 0;
    int8_t *xq = (int8_t *)malloc((size_t)(M * K));
    float *xd = (float *)malloc(sizeof(float) * (size_t)(M * nb));
    float *xs = (float *)malloc(sizeof(float) * (size_t)(M * nb));
    if (!xq || !xd || !xs) {
        free(xq), free(xd), free(xs);
        return -1;
    }
    quantize_activations(x, M * nb, xq, xd, xs);
    const int64_t row_bytes = format == 0 ? K / 2 : K;
    const int64_t n_tiles = (N + 3) / 4;
#pragma omp parallel
    {
        float scales[8 * nb];  // this thread's 4 weight rows' d and m, as floats
        float *d = scales, *m = scales + 4 * nb;
        float out[8];
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n_tiles; t++) {
            const int64_t n0 = t * 4;
            const int rn = N - n0 < 4 ? (int)(N - n0) : 4;
            const uint8_t *w = (const uint8_t *)wq + n0 * row_bytes;
            halves_to_floats(wd + n0 * nb, d, rn * nb);
            if (format == 0) halves_to_floats(wm + n0 * nb, m, rn * nb);
            for (int64_t m0 = 0; m0 < M;) {
                int rm = M - m0 >= 2 && rn == 4 ? 2 : 1;
                if (rn == 4 && rm == 2) {
                    if (format == 0)
                        tile(0, w, row_bytes, d, m, xq, xd, xs, nb, m0, 4, 2, out);
                    else
                        tile(1, w, row_bytes, d, m, xq, xd, xs, nb, m0, 4, 2, out);
                } else if (rn == 4) {
                    if (format == 0)
                        tile(0, w, row_bytes, d, m, xq, xd, xs, nb, m0, 4, 1, out);
                    else
                        tile(1, w, row_bytes, d, m, xq, xd, xs, nb, m0, 4, 1, out);
                } else {
                    for (int i = 0; i < rn; i++) {
                        if (format == 0)
                            tile(0, w + i * row_bytes, row_bytes, d + i * nb, m + i * nb, xq, xd, xs, nb, m0, 1, 1, out + i);
                        else
                            tile(1, w + i * row_bytes, row_bytes, d + i * nb, m, xq, xd, xs, nb, m0, 1, 1, out + i);
                    }
                }
                for (int j = 0; j < rm; j++)
                    for (int i = 0; i < rn; i++) y[(m0 + j) * N + n0 + i] = out[j * rn + i] + (bias ? bias[n0 + i] : 0.0f);
                m0 += rm;
            }
        }
    }
    free(xq), free(xd), free(xs);
    return 0;
}

// ---------------------------------------------------------------------------------------------------------
// The same linear layers with AVX-512 and VNNI (AVX512-VNNI with VL and BW), compiled for those flags only
// and chosen at run time by the caller (ember/kernels/cpu.py). Two blocks per 512-bit register and one
// vpdpbusd per pair of blocks instead of maddubs + madd per block: about half the instructions per weight.
// q4_1 codes are unsigned already; q8_0 codes get 128 added (xor 0x80), and the 128 * sum(x) that adds is
// taken back per row through the same scaled code sums (xs) that carry q4_1's m term.

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq")

// Two q4_1 blocks' 32 bytes of nibbles -> their 64 codes in order (block b's 32, then block b + 1's).
INLINE __m512i unpack_q4_pair(const uint8_t *p) {
    // qwords [0 1 0 1 2 3 2 3], then the second and fourth copies shifted right by 4: low then high nibbles.
    const __m512i both = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 1, 0, 1, 2, 3, 2, 3),
                                                  _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)p)));
    const __m512i shifted = _mm512_srlv_epi64(both, _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4));
    return _mm512_and_si512(shifted, _mm512_set1_epi8(0x0F));
}

// As `tile` above, for the AVX-512 path.
INLINE void tile512(int format, const uint8_t *w, int64_t row_bytes, const float *wd, const float *wm,
                    const int8_t *xq, const float *xd, const float *xs, int64_t nb, int64_t m0, const int RN,
                    const int RM, float *out) {
    const int64_t bytes = format == 0 ? 16 : QK;  // weight bytes per block
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    __m512 acc[4][2];
    for (int i = 0; i < RN; i++)
        for (int j = 0; j < RM; j++) acc[i][j] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        __m512i y[2];
        __m512 ys[2];  // the activation scales of blocks b and b + 1, 8 lanes each
        for (int j = 0; j < RM; j++) {
            y[j] = _mm512_loadu_si512((const void *)(xq + ((m0 + j) * nb + b) * QK));
            ys[j] = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(_mm_castpd_ps(
                                                      _mm_load_sd((const double *)(xd + (m0 + j) * nb + b)))));
        }
        for (int i = 0; i < RN; i++) {
            const uint8_t *src = w + i * row_bytes + b * bytes;
            const __m512i wu = format == 0 ? unpack_q4_pair(src)
                                           : _mm512_xor_si512(_mm512_loadu_si512((const void *)src), flip);
            _mm_prefetch((const char *)(src + PREFETCH_ROWS * row_bytes), _MM_HINT_T0);
            if (format != 0) _mm_prefetch((const char *)(src + PREFETCH_ROWS * row_bytes + 63), _MM_HINT_T0);
            const __m512 ws = _mm512_permutexvar_ps(
                halves, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double *)(wd + i * nb + b)))));
            for (int j = 0; j < RM; j++) {
                const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, y[j]);
                acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(ws, ys[j]), acc[i][j]);
            }
        }
    }
    __m256 tail[4][2];  // the last block when nb is odd
    for (int i = 0; i < RN; i++)
        for (int j = 0; j < RM; j++) tail[i][j] = _mm256_setzero_ps();
    if (b < nb) {
        for (int i = 0; i < RN; i++) {
            const uint8_t *src = w + i * row_bytes + b * bytes;
            const __m256i wu = format == 0 ? unpack_q4(src)
                                           : _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)src),
                                                              _mm512_castsi512_si256(flip));
            for (int j = 0; j < RM; j++) {
                const __m256i y = _mm256_loadu_si256((const __m256i *)(xq + ((m0 + j) * nb + b) * QK));
                const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wu, y);
                tail[i][j] = _mm256_mul_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(wd[i * nb + b] * xd[(m0 + j) * nb + b]));
            }
        }
    }
    for (int j = 0; j < RM; j++)
        for (int i = 0; i < RN; i++) {
            float s = _mm512_reduce_add_ps(acc[i][j]) + hsum(tail[i][j]);
            const float code_sums = dot_f32(format == 0 ? wm + i * nb : wd + i * nb, xs + (m0 + j) * nb, nb);
            out[j * RN + i] = s + (format == 0 ? code_sums : -128.0f * code_sums);
        }
}

int ember_quant_linear_avx512(int format, const float *x, int64_t M, int64_t K, const void *wq, const uint16_t *wd,
                              const uint16_t *wm, int64_t N, const float *bias, float *y) {
    const int64_t nb = K / QK;
    if (M == 0 || N == 0) return 0;
    int8_t *xq = (int8_t *)malloc((size_t)(M * K));
    float *xd = (float *)malloc(sizeof(float) * (size_t)(M * nb));
    float *xs = (float *)malloc(sizeof(float) * (size_t)(M * nb));
    if (!xq || !xd || !xs) {
        free(xq), free(xd), free(xs);
        return -1;
    }
    quantize_activations(x, M * nb, xq, xd, xs);
    const int64_t row_bytes = format == 0 ? K / 2 : K;
    const int64_t n_tiles = (N + 3) / 4;
#pragma omp parallel
    {
        float scales[8 * nb];  // this thread's 4 weight rows' d and m, as floats
        float *d = scales, *m = scales + 4 * nb;
        float out[8];
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n_tiles; t++) {
            const int64_t n0 = t * 4;
            const int rn = N - n0 < 4 ? (int)(N - n0) : 4;
            const uint8_t *w = (const uint8_t *)wq + n0 * row_bytes;
            halves_to_floats(wd + n0 * nb, d, rn * nb);
            if (format == 0) halves_to_floats(wm + n0 * nb, m, rn * nb);
            for (int64_t m0 = 0; m0 < M;) {
                const int rm = M - m0 >= 2 && rn == 4 ? 2 : 1;
                if (rn == 4 && rm == 2) {
                    if (format == 0)
                        tile512(0, w, row_bytes, d, m, xq, xd, xs, nb, m0, 4, 2, out);
                    else
                        tile512(1, w, row_bytes, d, m, xq, xd, xs, nb, m0, 4, 2, out);
                } else if (rn == 4) {
                    if (format == 0)
                        tile512(0, w, row_bytes, d, m, xq, xd, xs, nb, m0, 4, 1, out);
                    else
                        tile512(1, w, row_bytes, d, m, xq, xd, xs, nb, m0, 4, 1, out);
                } else {
                    for (int i = 0; i < rn; i++) {
                        if (format == 0)
                            tile512(0, w + i * row_bytes, row_bytes, d + i * nb, m + i * nb, xq, xd, xs, nb, m0, 1, 1, out + i);
                        else
                            tile512(1, w + i * row_bytes, row_bytes, d + i * nb, m, xq, xd, xs, nb, m0, 1, 1, out + i);
                    }
                }
                for (int j = 0; j < rm; j++)
                    for (int i = 0; i < rn; i++) y[(m0 + j) * N + n0 + i] = out[j * rn + i] + (bias ? bias[n0 + i] : 0.0f);
                m0 += rm;
            }
        }
    }
    free(xq), free(xd), free(xs);
    return 0;
}

#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------------------
// The other pieces of a step, float32. Each replaces a handful of PyTorch ops (and their dispatch, which
// on a 2-core CPU costs more than the arithmetic of one decode token).

// out[t] = w * x[t] / sqrt(mean(x[t]^2) + eps), for T rows of H.
void ember_rms_norm(const float *x, const float *w, float eps, int64_t T, int64_t H, float *out) {
#pragma omp parallel for schedule(static) if (T > 16)
    for (int64_t t = 0; t < T; t++) {
        const float *r = x + t * H;
        const float inv = 1.0f / sqrtf(dot_f32(r, r, H) / (float)H + eps);
        float *o = out + t * H;
        for (int64_t i = 0; i < H; i++) o[i] = w[i] * (r[i] * inv);
    }
}

// The residual add fused into the norm that follows it: sum [T, H] = x + h, out = rms_norm(sum) as above.
void ember_add_rms_norm(const float *x, const float *h, const float *w, float eps, int64_t T, int64_t H,
                        float *sum, float *out) {
#pragma omp parallel for schedule(static) if (T > 16)
    for (int64_t t = 0; t < T; t++) {
        float *r = sum + t * H;
        const float *a = x + t * H, *b = h + t * H;
        for (int64_t i = 0; i < H; i++) r[i] = a[i] + b[i];
        const float inv = 1.0f / sqrtf(dot_f32(r, r, H) / (float)H + eps);
        float *o = out + t * H;
        for (int64_t i = 0; i < H; i++) o[i] = w[i] * (r[i] * inv);
    }
}

static inline __m256 exp256(__m256 x);

// SwiGLU on the fused gate-up projection's output: gu [T, 2I] (gate then up) -> out [T, I] = silu(gate) * up,
// silu(g) = g / (1 + e^-g).
void ember_silu_mul(const float *gu, int64_t T, int64_t I, float *out) {
#pragma omp parallel for schedule(static) if (T > 16)
    for (int64_t t = 0; t < T; t++) {
        const float *g = gu + t * 2 * I, *u = g + I;
        float *o = out + t * I;
        int64_t i = 0;
        for (; i + 8 <= I; i += 8) {
            const __m256 gv = _mm256_loadu_ps(g + i);
            const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
        }
        for (; i < I; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

// Rotary embedding (the half-split form: pairs (i, i + D/2)) of q and k from the fused projection, and the
// KV cache write. qkv [T, Hq*D + 2*Hkv*D] (row stride ld); cos, sin [T, D]; slots [T] (block * bs + offset);
// caches [Hkv, n_slots, D]. Writes the rotated q to q_out [T, Hq, D].
void ember_rope_write_kv(const float *qkv, int64_t ld, const float *cos, const float *sin, const int64_t *slots,
                         int64_t T, int64_t Hq, int64_t Hkv, int64_t D, float *k_cache, float *v_cache,
                         int64_t n_slots, float *q_out) {
    const int64_t half = D / 2;
#pragma omp parallel for schedule(static) if (T > 16)
    for (int64_t t = 0; t < T; t++) {
        const float *row = qkv + t * ld, *c = cos + t * D, *s = sin + t * D;
        for (int64_t h = 0; h < Hq + Hkv; h++) {
            const float *src = row + h * D;
            float *dst = h < Hq ? q_out + (t * Hq + h) * D : k_cache + ((h - Hq) * n_slots + slots[t]) * D;
            for (int64_t i = 0; i < half; i++) {
                dst[i] = src[i] * c[i] - src[i + half] * s[i];
                dst[i + half] = src[i + half] * c[i + half] + src[i] * s[i + half];
            }
        }
        const float *v = row + (Hq + Hkv) * D;
        for (int64_t h = 0; h < Hkv; h++) memcpy(v_cache + (h * n_slots + slots[t]) * D, v + h * D, sizeof(float) * D);
    }
}

// e^x for 8 floats: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor series to r^7 (relative error
// under 2e-7), times 2^n through the exponent bits. Inputs below -87 give 0.
static inline __m256 exp256(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), lo);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts, exact first
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// Attention of B decode queries over their paged contexts. q [B, Hq, D]; caches [Hkv, n_slots, D] with
// block size bs; block_tables [B, max_blocks]; context_lens [B]; window 0 for none, else each query sees
// its last `window` keys. out [B, Hq, D]. One task per (sequence, query head), so that even a single
// sequence splits evenly over the threads.
void ember_decode_attention(const float *q, const float *k_cache, const float *v_cache, int64_t n_slots,
                            int64_t bs, const int64_t *block_tables, int64_t max_blocks,
                            const int64_t *context_lens, int64_t B, int64_t Hq, int64_t Hkv, int64_t D,
                            int64_t window, float scale, float *out) {
    const int64_t G = Hq / Hkv;
#pragma omp parallel
    {
        int64_t cap = 0;
        float *sc = NULL;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < B * Hq; task++) {
            const int64_t b = task / Hq, hq = task % Hq, h = hq / G, len = context_lens[b];
            const int64_t first = window > 0 && len > window ? len - window : 0, n = len - first;
            float *o = out + (b * Hq + hq) * D;
            if (n + 8 > cap) {
                free(sc);
                cap = n + 8 > 4096 ? n + 8 : 4096;
                sc = (float *)malloc(sizeof(float) * (size_t)cap);
                if (!sc) cap = 0;
            }
            if (!sc || n == 0) {  // no memory for the scores, or nothing to attend to: NaN, never a crash
                for (int64_t i = 0; i < D; i++) o[i] = NAN;
                continue;
            }
            const int64_t *table = block_tables + b * max_blocks;
            const float *kh = k_cache + h * n_slots * D, *vh = v_cache + h * n_slots * D;
            const float *qh = q + (b * Hq + hq) * D;
            float mx = -INFINITY;
            for (int64_t j = 0; j < n; j++) {
                const int64_t p = first + j;
                sc[j] = scale * dot_f32(qh, kh + (table[p / bs] * bs + p % bs) * D, D);
                mx = sc[j] > mx ? sc[j] : mx;
            }
            for (int64_t j = n; j < n + 8; j++) sc[j] = -INFINITY;  // padding: e^-inf is 0
            __m256 sum8 = _mm256_setzero_ps();
            const __m256 mx8 = _mm256_set1_ps(mx);
            for (int64_t j = 0; j < n; j += 8) {
                const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sc + j), mx8));
                _mm256_storeu_ps(sc + j, e);
                sum8 = _mm256_add_ps(sum8, e);
            }
            const float inv = 1.0f / hsum(sum8);
            memset(o, 0, sizeof(float) * D);
            for (int64_t j = 0; j < n; j++) {
                const int64_t p = first + j;
                const float *vr = vh + (table[p / bs] * bs + p % bs) * D;
                const __m256 pj = _mm256_set1_ps(sc[j]);
                int64_t i = 0;
                for (; i + 8 <= D; i += 8) _mm256_storeu_ps(o + i, _mm256_fmadd_ps(pj, _mm256_loadu_ps(vr + i), _mm256_loadu_ps(o + i)));
                for (; i < D; i++) o[i] += sc[j] * vr[i];
            }
            for (int64_t i = 0; i < D; i++) o[i] *= inv;
        }
        free(sc);
    }
}
