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

/* One output voxel x half an octet (4 filters) per inner loop. popcount(M) and popcount(N) are
 * summed separately and combined once at the end (sum M - 2 sum N), which saves an operation per
 * word; the 8 running sums and the two activation words fit in x86-64's general registers (the
 * weights are read as memory operands). Sums fit: sum M <= taps * Cin < 2^31. */
#define TK_GEMM_PLAIN_HALF 4
#define TK_GEMM_PLAIN_BODY(POPCOUNT)                                                          \
    for (int64_t g = 0; g < noct; ++g) {                                                      \
        for (int h = 0; h < TK_OCTET; h += TK_GEMM_PLAIN_HALF) {                              \
            const uint64_t *wo = w + g * kw * 2 * TK_OCTET + h;                               \
            for (int64_t v = 0; v < nv; ++v) {                                                \
                const uint64_t *av = a + v * 2 * kw;                                          \
                uint32_t sm[TK_GEMM_PLAIN_HALF] = {0}, sn[TK_GEMM_PLAIN_HALF] = {0};          \
                for (int64_t k = 0; k < kw; ++k) {                                            \
                    const uint64_t *wm = wo + k * 2 * TK_OCTET, *ws = wm + TK_OCTET;          \
                    const uint64_t am = av[k], as = av[kw + k];                               \
                    for (int j = 0; j < TK_GEMM_PLAIN_HALF; ++j) {                            \
                        const uint64_t m = am & wm[j];                                        \
                        sm[j] += (uint32_t)POPCOUNT(m);                                       \
                        sn[j] += (uint32_t)POPCOUNT(m & (as ^ ws[j]));                        \
                    }                                                                         \
                }                                                                             \
                int32_t *o = acc + v * noct * TK_OCTET + g * TK_OCTET + h;                    \
                for (int j = 0; j < TK_GEMM_PLAIN_HALF; ++j)                                  \
                    o[j] = (int32_t)sm[j] - 2 * (int32_t)sn[j];                               \
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
