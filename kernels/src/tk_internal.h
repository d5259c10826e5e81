/* Internal declarations shared by the kernel sources (not part of the public API). */
#ifndef TK_INTERNAL_H
#define TK_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "ternary_kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if (defined(__x86_64__) || defined(_M_X64) || defined(__i386__)) && defined(__GNUC__)
#define TK_HAVE_X86_PATHS 1
#else
#define TK_HAVE_X86_PATHS 0
#endif

#if defined(__GNUC__)
#define TK_ALWAYS_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define TK_ALWAYS_INLINE __forceinline
#else
#define TK_ALWAYS_INLINE inline
#endif

/* Filters are processed in octets: one AVX-512 register holds one 64-bit word of 8 filters. */
#define TK_OCTET 8
/* Output voxels per micro-kernel call are a multiple of this (rows are zero-padded up to it). */
#define TK_VOXEL_GROUP 4

/*
 * The GEMM micro-kernel every path implements (see docs/kernels.md):
 *   a   : nv rows (nv % TK_VOXEL_GROUP == 0), each [mask words 0..kw-1 | sign words 0..kw-1]
 *   w   : noct octets, each kw words x {mask, sign} x 8 filters (tk_pack_weights layout)
 *   acc : int32 [nv][noct * 8], acc[v][f] = sum_k popcount(M) - 2 popcount(N) with
 *         M = a_mask & w_mask, N = M & (a_sign ^ w_sign).
 */
typedef void (*tk_gemm_fn)(const uint64_t *a, int64_t nv, const uint64_t *w, int64_t noct,
                           int64_t kw, int32_t *acc);

void tk_gemm_portable(const uint64_t *a, int64_t nv, const uint64_t *w, int64_t noct, int64_t kw,
                      int32_t *acc);
#if TK_HAVE_X86_PATHS
void tk_gemm_scalar(const uint64_t *a, int64_t nv, const uint64_t *w, int64_t noct, int64_t kw,
                    int32_t *acc);
void tk_gemm_avx2(const uint64_t *a, int64_t nv, const uint64_t *w, int64_t noct, int64_t kw,
                  int32_t *acc);
void tk_gemm_avx512(const uint64_t *a, int64_t nv, const uint64_t *w, int64_t noct, int64_t kw,
                    int32_t *acc);
#endif

/* The ternary epilogue (see tk_conv.c): packs acc [nv][ldacc] against thresholds into nv records. */
typedef void (*tk_epilogue_fn)(const int32_t *acc, int64_t ldacc, int64_t nv, int64_t cout,
                               const int32_t *lo, const int32_t *hi, uint8_t *out);

void tk_epilogue_ternary_portable(const int32_t *acc, int64_t ldacc, int64_t nv, int64_t cout,
                                  const int32_t *lo, const int32_t *hi, uint8_t *out);
#if TK_HAVE_X86_PATHS
void tk_epilogue_ternary_avx2(const int32_t *acc, int64_t ldacc, int64_t nv, int64_t cout,
                              const int32_t *lo, const int32_t *hi, uint8_t *out);
void tk_epilogue_ternary_avx512(const int32_t *acc, int64_t ldacc, int64_t nv, int64_t cout,
                                const int32_t *lo, const int32_t *hi, uint8_t *out);
#endif

#if TK_HAVE_X86_PATHS
/* Bit im2col of one voxel for 3-wide rows (k_w = 3, dilation_w = 1) with Cb = 2 or 4; see
 * tk_gemm_x86.c for the contract. */
void tk_gather3_avx2(const uint8_t *const *rows, int64_t nrows, int64_t cb, uint8_t *dm, uint8_t *ds);
#endif

/* The micro-kernel and ternary epilogue of the currently selected path. */
tk_gemm_fn tk_selected_gemm(void);
tk_epilogue_fn tk_selected_epilogue(void);

/* Number of threads for a call: threads <= 0 means all. */
int tk_threads(int threads);

/* Weight words per filter and plane: ceil(taps * Cb / 8). */
int64_t tk_k_words(int64_t in_channels, int64_t taps);

/* Checked arithmetic: returns 0 on overflow (sizes are positive here). */
int64_t tk_mul_checked(int64_t a, int64_t b);

/* Shared validation of a convolution geometry; TK_OK or an error. */
int tk_check_conv_params(const tk_conv_params *p);

/* memcpy of n bytes in fixed-size pieces: with a compile-time n, a few moves and no library call
 * (for the odd channel counts of the gather). */
static TK_ALWAYS_INLINE void tk_copy_bytes(uint8_t *dst, const uint8_t *src, int64_t n) {
    for (; n >= 8; n -= 8, dst += 8, src += 8) memcpy(dst, src, 8);
    if (n >= 4) { memcpy(dst, src, 4); dst += 4; src += 4; n -= 4; }
    if (n >= 2) { memcpy(dst, src, 2); dst += 2; src += 2; n -= 2; }
    if (n) *dst = *src;
}

/* One voxel's record of a runtime size n: the common sizes as inlined fixed-size copies (a library
 * call per voxel would cost more than the copy itself). */
static TK_ALWAYS_INLINE void tk_copy_record(uint8_t *dst, const uint8_t *src, int64_t n) {
    switch (n) {
    case 1: tk_copy_bytes(dst, src, 1); break;
    case 2: tk_copy_bytes(dst, src, 2); break;
    case 4: tk_copy_bytes(dst, src, 4); break;
    case 8: tk_copy_bytes(dst, src, 8); break;
    case 16: tk_copy_bytes(dst, src, 16); break;
    default: memcpy(dst, src, (size_t)n); break;
    }
}

/* One voxel's float values -> its packed record (mask bytes om, sign bytes os): +1 where
 * y > hi[c], -1 where y < lo[c], else 0 (NaN -> 0). Branch-free: the data decide nothing. */
static TK_ALWAYS_INLINE void tk_pack_record_f(const float *y, int64_t channels, const float *lo,
                                              const float *hi, uint8_t *om, uint8_t *os) {
    for (int64_t c0 = 0; c0 < channels; c0 += 8) {
        const int64_t n = channels - c0 < 8 ? channels - c0 : 8;
        unsigned m = 0, s = 0;
        for (int64_t j = 0; j < n; ++j) {
            const unsigned pos = y[c0 + j] > hi[c0 + j];
            const unsigned neg = (y[c0 + j] < lo[c0 + j]) & (pos ^ 1u);
            m |= (pos | neg) << j;
            s |= neg << j;
        }
        om[c0 >> 3] = (uint8_t)m;
        os[c0 >> 3] = (uint8_t)s;
    }
}

#endif
