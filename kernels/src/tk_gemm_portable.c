/* The plain micro-kernels: portable C (any CPU) and x86-64 POPCNT. Both expand the same body, so
 * they are equal by construction; the optimised kernels in tk_gemm_x86.c are tested against them. */
#include "tk_internal.h"

/* Portable population count (the compiler's builtin where it has one; SWAR otherwise). */
static inline int popcount64_portable(uint64_t x) {
#if defined(__GNUC__)
    return __builtin_popcountll(x);
#else
    x = x - ((x >> 1) & 0x5555555555555555ULL);
    x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
    return (int)((x * 0x0101010101010101ULL) >> 56);
#endif
}

/* Two output voxels x one octet of filters per inner loop: 16 running sums in registers. */
#define TK_GEMM_PLAIN_BODY(POPCOUNT)                                                          \
    for (int64_t g = 0; g < noct; ++g) {                                                      \
        const uint64_t *wo = w + g * kw * 2 * TK_OCTET;                                       \
        for (int64_t v = 0; v < nv; v += 2) {                                                 \
            const uint64_t *a0 = a + v * 2 * kw, *a1 = a0 + 2 * kw;                           \
            int64_t s0[TK_OCTET] = {0}, s1[TK_OCTET] = {0};                                   \
            for (int64_t k = 0; k < kw; ++k) {                                                \
                const uint64_t *wm = wo + k * 2 * TK_OCTET, *ws = wm + TK_OCTET;              \
                const uint64_t am0 = a0[k], as0 = a0[kw + k], am1 = a1[k], as1 = a1[kw + k];  \
                for (int j = 0; j < TK_OCTET; ++j) {                                          \
                    uint64_t m0 = am0 & wm[j], m1 = am1 & wm[j];                              \
                    s0[j] += POPCOUNT(m0) - 2 * POPCOUNT(m0 & (as0 ^ ws[j]));                 \
                    s1[j] += POPCOUNT(m1) - 2 * POPCOUNT(m1 & (as1 ^ ws[j]));                 \
                }                                                                             \
            }                                                                                 \
            int32_t *o0 = acc + v * noct * TK_OCTET + g * TK_OCTET, *o1 = o0 + noct * TK_OCTET; \
            for (int j = 0; j < TK_OCTET; ++j) {                                              \
                o0[j] = (int32_t)s0[j];                                                       \
                o1[j] = (int32_t)s1[j];                                                       \
            }                                                                                 \
        }                                                                                     \
    }

void tk_gemm_portable(const uint64_t *a, int64_t nv, const uint64_t *w, int64_t noct, int64_t kw,
                      int32_t *acc) {
    TK_GEMM_PLAIN_BODY(popcount64_portable)
}

#if TK_HAVE_X86_PATHS
__attribute__((target("popcnt"))) void tk_gemm_scalar(const uint64_t *a, int64_t nv,
                                                      const uint64_t *w, int64_t noct, int64_t kw,
                                                      int32_t *acc) {
    TK_GEMM_PLAIN_BODY(__builtin_popcountll)
}
#endif
