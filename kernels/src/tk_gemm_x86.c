/* x86 SIMD micro-kernels (AVX2, AVX-512 VPOPCNTDQ). Compiled with per-function target attributes,
 * so the file builds without -m flags and the dispatcher only calls what the CPU has. Each must
 * equal tk_gemm_portable bit for bit (tests/test_kernels.py sweeps every path).
 *
 * Layout (docs/kernels.md): a vector lane holds one filter, so a 64-bit activation word is broadcast
 * and meets one 64-bit word of 8 (AVX-512) or 4 (AVX2) filters at once. The sums never need a
 * horizontal reduction and K is padded only to 64 bits. */
#include "tk_internal.h"

#if TK_HAVE_X86_PATHS
#include <immintrin.h>
#include <string.h>

/* ---------------------------------------------------------------- AVX-512 (8 filters per zmm) */

#define TK_AVX512 __attribute__((target("avx512f,avx512vpopcntdq")))

/* NV voxels x NG octets. popcount(M) and popcount(N) go to separate sums (combined once as
 * sum M - 2 sum N after the K loop): per pair and word vpandq, vpopcntq, vpternlogq, vpopcntq and
 * two adds; NV * NG * 2 sums plus the NG * 2 weight registers stay within the 32 zmm registers. */
#define TK_AVX512_BLOCK(NV, NG)                                                                  \
    static TK_AVX512 void avx512_block_##NV##_##NG(const uint64_t *a, const uint64_t *w,         \
                                                   int64_t kw, int64_t wstride, int32_t *acc,    \
                                                   int64_t accstride) {                          \
        __m512i sm[NV][NG], sn[NV][NG];                                                          \
        for (int i = 0; i < NV; ++i)                                                             \
            for (int j = 0; j < NG; ++j) sm[i][j] = sn[i][j] = _mm512_setzero_si512();           \
        for (int64_t k = 0; k < kw; ++k) {                                                       \
            __m512i wm[NG], ws[NG];                                                              \
            for (int j = 0; j < NG; ++j) {                                                       \
                wm[j] = _mm512_loadu_si512((const void *)(w + j * wstride + k * 16));            \
                ws[j] = _mm512_loadu_si512((const void *)(w + j * wstride + k * 16 + 8));        \
            }                                                                                    \
            for (int i = 0; i < NV; ++i) {                                                       \
                const __m512i am = _mm512_set1_epi64((long long)a[i * 2 * kw + k]);              \
                const __m512i as = _mm512_set1_epi64((long long)a[i * 2 * kw + kw + k]);         \
                for (int j = 0; j < NG; ++j) {                                                   \
                    const __m512i m = _mm512_and_si512(am, wm[j]);                               \
                    sm[i][j] = _mm512_add_epi64(sm[i][j], _mm512_popcnt_epi64(m));               \
                    /* imm 0x60 = A & (B ^ C): truth-table bits 5 (A,~B,C) and 6 (A,B,~C) */      \
                    const __m512i n = _mm512_ternarylogic_epi64(m, as, ws[j], 0x60);             \
                    sn[i][j] = _mm512_add_epi64(sn[i][j], _mm512_popcnt_epi64(n));               \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
        for (int i = 0; i < NV; ++i)                                                             \
            for (int j = 0; j < NG; ++j) {                                                       \
                const __m512i d = _mm512_sub_epi64(sm[i][j], _mm512_add_epi64(sn[i][j], sn[i][j])); \
                _mm256_storeu_si256((__m256i *)(acc + i * accstride + j * 8), _mm512_cvtepi64_epi32(d)); \
            }                                                                                    \
    }

TK_AVX512_BLOCK(2, 4)
TK_AVX512_BLOCK(2, 3)
TK_AVX512_BLOCK(4, 2)
TK_AVX512_BLOCK(4, 1)

TK_AVX512 void tk_gemm_avx512(const uint64_t *a, int64_t nv, const uint64_t *w, int64_t noct,
                              int64_t kw, int32_t *acc) {
    const int64_t wstride = kw * 2 * TK_OCTET, accstride = noct * TK_OCTET;
    for (int64_t g = 0; g < noct; g += 4) {
        const int64_t ng = noct - g < 4 ? noct - g : 4;
        const uint64_t *wg = w + g * wstride;
        for (int64_t v = 0; v < nv; v += 4) {
            const uint64_t *av = a + v * 2 * kw;
            int32_t *out = acc + v * accstride + g * TK_OCTET;
            switch (ng) {
            case 4:
                avx512_block_2_4(av, wg, kw, wstride, out, accstride);
                avx512_block_2_4(av + 4 * kw, wg, kw, wstride, out + 2 * accstride, accstride);
                break;
            case 3:
                avx512_block_2_3(av, wg, kw, wstride, out, accstride);
                avx512_block_2_3(av + 4 * kw, wg, kw, wstride, out + 2 * accstride, accstride);
                break;
            case 2: avx512_block_4_2(av, wg, kw, wstride, out, accstride); break;
            default: avx512_block_4_1(av, wg, kw, wstride, out, accstride); break;
            }
        }
    }
}

/* The ternary epilogue of tk_conv.c with 16-lane compares; each mask bit is one channel's bit. */
TK_AVX512 void tk_epilogue_ternary_avx512(const int32_t *acc, int64_t ldacc, int64_t nv,
                                          int64_t cout, const int32_t *lo, const int32_t *hi,
                                          uint8_t *out) {
    const int64_t cbo = tk_channel_bytes(cout);
    for (int64_t v = 0; v < nv; ++v) {
        const int32_t *av = acc + v * ldacc;
        uint8_t *om = out + v * 2 * cbo, *os = om + cbo;
        for (int64_t c0 = 0; c0 < cout; c0 += 16) {
            const int64_t n = cout - c0 < 16 ? cout - c0 : 16;
            const __mmask16 k = (__mmask16)((1u << n) - 1u);
            const __m512i a = _mm512_maskz_loadu_epi32(k, av + c0);
            const __mmask16 pos = _mm512_mask_cmpgt_epi32_mask(k, a, _mm512_maskz_loadu_epi32(k, hi + c0));
            const __mmask16 neg = _mm512_mask_cmplt_epi32_mask(k, a, _mm512_maskz_loadu_epi32(k, lo + c0)) & ~pos;
            const unsigned m = (unsigned)(pos | neg), sg = (unsigned)neg;
            om[c0 >> 3] = (uint8_t)m;
            os[c0 >> 3] = (uint8_t)sg;
            if (n > 8) {
                om[(c0 >> 3) + 1] = (uint8_t)(m >> 8);
                os[(c0 >> 3) + 1] = (uint8_t)(sg >> 8);
            }
        }
    }
}

/* ------------------------------------------------------------------ AVX2 (4 filters per ymm) */

#define TK_AVX2 __attribute__((target("avx2")))

/* The bit im2col of one voxel for kernels with k_w = 3, dilation_w = 1 and Cb = 2 or 4 (16 or 32
 * channels): the three taps of an input row are three consecutive records [m0 s0 | m1 s1 | m2 s2],
 * de-interleaved with one load and a shuffle into [m0 m1 m2] and [s0 s1 s2]. rows[r] is the input
 * row (kd, kh) r shifted to the voxel's first tap, or NULL for a row in the padding. Stores are 8 or
 * 16 bytes wide: the bytes past a segment land in the next segment (written after it) or in the
 * K padding, whose weight bits are zero, so they never reach a sum. The caller guarantees that the
 * loads (16 or 32 bytes from each row pointer) stay inside the input. */
TK_AVX2 void tk_gather3_avx2(const uint8_t *const *rows, int64_t nrows, int64_t cb, uint8_t *dm,
                             uint8_t *ds) {
    if (cb == 4) {
        const __m256i to_mask = _mm256_setr_epi32(0, 2, 4, 6, 0, 0, 0, 0);
        const __m256i to_sign = _mm256_setr_epi32(1, 3, 5, 7, 0, 0, 0, 0);
        for (int64_t r = 0; r < nrows; ++r, dm += 12, ds += 12) {
            if (!rows[r]) {
                memset(dm, 0, 12);
                memset(ds, 0, 12);
                continue;
            }
            const __m256i v = _mm256_loadu_si256((const __m256i *)rows[r]);
            _mm_storeu_si128((__m128i *)dm, _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(v, to_mask)));
            _mm_storeu_si128((__m128i *)ds, _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(v, to_sign)));
        }
    } else { /* cb == 2 */
        const __m128i split = _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
        for (int64_t r = 0; r < nrows; ++r, dm += 6, ds += 6) {
            if (!rows[r]) {
                memset(dm, 0, 6);
                memset(ds, 0, 6);
                continue;
            }
            const __m128i v = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)rows[r]), split);
            _mm_storel_epi64((__m128i *)dm, v);
            _mm_storel_epi64((__m128i *)ds, _mm_unpackhi_epi64(v, v));
        }
    }
}

/* Byte-wise popcount by nibble lookup (vpshufb). */
static inline TK_AVX2 __m256i popcount_bytes(__m256i x, __m256i lut, __m256i low4) {
    const __m256i lo = _mm256_and_si256(x, low4);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low4);
    return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

/* popcount(M) and popcount(N) are summed separately as unsigned bytes (<= 8 per word), safe for
 * 31 words (<= 248), then flushed into 64-bit lanes with vpsadbw (8 bytes per lane); the result is
 * sum M - 2 sum N. */
#define TK_AVX2_FLUSH_WORDS 31

/* 2 voxels x 2 quads (one octet). */
static TK_AVX2 void avx2_block(const uint64_t *a, const uint64_t *w, int64_t kw, int32_t *acc,
                               int64_t accstride) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2,
                                         1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m256i zero = _mm256_setzero_si256();
    __m256i total[2][2];
    for (int i = 0; i < 2; ++i) total[i][0] = total[i][1] = zero;
    for (int64_t k0 = 0; k0 < kw; k0 += TK_AVX2_FLUSH_WORDS) {
        const int64_t k1 = k0 + TK_AVX2_FLUSH_WORDS < kw ? k0 + TK_AVX2_FLUSH_WORDS : kw;
        __m256i sm[2][2], sn[2][2];
        for (int i = 0; i < 2; ++i) sm[i][0] = sm[i][1] = sn[i][0] = sn[i][1] = zero;
        for (int64_t k = k0; k < k1; ++k) {
            const uint64_t *wk = w + k * 16;
            const __m256i wm0 = _mm256_loadu_si256((const __m256i *)wk);
            const __m256i wm1 = _mm256_loadu_si256((const __m256i *)(wk + 4));
            const __m256i ws0 = _mm256_loadu_si256((const __m256i *)(wk + 8));
            const __m256i ws1 = _mm256_loadu_si256((const __m256i *)(wk + 12));
            for (int i = 0; i < 2; ++i) {
                const __m256i am = _mm256_set1_epi64x((long long)a[i * 2 * kw + k]);
                const __m256i as = _mm256_set1_epi64x((long long)a[i * 2 * kw + kw + k]);
                const __m256i m0 = _mm256_and_si256(am, wm0), m1 = _mm256_and_si256(am, wm1);
                const __m256i n0 = _mm256_and_si256(m0, _mm256_xor_si256(as, ws0));
                const __m256i n1 = _mm256_and_si256(m1, _mm256_xor_si256(as, ws1));
                sm[i][0] = _mm256_add_epi8(sm[i][0], popcount_bytes(m0, lut, low4));
                sm[i][1] = _mm256_add_epi8(sm[i][1], popcount_bytes(m1, lut, low4));
                sn[i][0] = _mm256_add_epi8(sn[i][0], popcount_bytes(n0, lut, low4));
                sn[i][1] = _mm256_add_epi8(sn[i][1], popcount_bytes(n1, lut, low4));
            }
        }
        for (int i = 0; i < 2; ++i)
            for (int h = 0; h < 2; ++h) {
                const __m256i pm = _mm256_sad_epu8(sm[i][h], zero), pn = _mm256_sad_epu8(sn[i][h], zero);
                total[i][h] = _mm256_add_epi64(total[i][h], _mm256_sub_epi64(pm, _mm256_add_epi64(pn, pn)));
            }
    }
    for (int i = 0; i < 2; ++i)
        for (int h = 0; h < 2; ++h) {
            int64_t lanes[4];
            _mm256_storeu_si256((__m256i *)lanes, total[i][h]);
            for (int j = 0; j < 4; ++j) acc[i * accstride + h * 4 + j] = (int32_t)lanes[j];
        }
}

/* The ternary epilogue with 8-lane compares and movemask. */
TK_AVX2 void tk_epilogue_ternary_avx2(const int32_t *acc, int64_t ldacc, int64_t nv, int64_t cout,
                                      const int32_t *lo, const int32_t *hi, uint8_t *out) {
    const int64_t cbo = tk_channel_bytes(cout);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t v = 0; v < nv; ++v) {
        const int32_t *av = acc + v * ldacc;
        uint8_t *om = out + v * 2 * cbo, *os = om + cbo;
        for (int64_t c0 = 0; c0 < cout; c0 += 8) {
            const int n = cout - c0 < 8 ? (int)(cout - c0) : 8;
            const __m256i k = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane);
            const __m256i a = _mm256_maskload_epi32(av + c0, k);
            const __m256i pos = _mm256_cmpgt_epi32(a, _mm256_maskload_epi32(hi + c0, k));
            const __m256i neg = _mm256_andnot_si256(pos, _mm256_cmpgt_epi32(_mm256_maskload_epi32(lo + c0, k), a));
            const unsigned valid = (1u << n) - 1u;
            const unsigned p = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(pos)) & valid;
            const unsigned q = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(neg)) & valid;
            om[c0 >> 3] = (uint8_t)(p | q);
            os[c0 >> 3] = (uint8_t)q;
        }
    }
}

TK_AVX2 void tk_gemm_avx2(const uint64_t *a, int64_t nv, const uint64_t *w, int64_t noct,
                          int64_t kw, int32_t *acc) {
    const int64_t wstride = kw * 2 * TK_OCTET, accstride = noct * TK_OCTET;
    for (int64_t g = 0; g < noct; ++g)
        for (int64_t v = 0; v < nv; v += 2)
            avx2_block(a + v * 2 * kw, w + g * wstride, kw, acc + v * accstride + g * TK_OCTET,
                       accstride);
}

#endif /* TK_HAVE_X86_PATHS */
