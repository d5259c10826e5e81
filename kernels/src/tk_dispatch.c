/* Run-time selection of the instruction-set path, and small helpers shared by all sources. */
#include "tk_internal.h"

static int g_path = -2; /* -2: not yet initialised */

int tk_abi_version(void) { return TK_ABI_VERSION; }

int tk_supported_paths(void) {
    int mask = 1 << TK_PATH_PORTABLE;
#if TK_HAVE_X86_PATHS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("popcnt")) mask |= 1 << TK_PATH_SCALAR;
    if (__builtin_cpu_supports("avx2")) mask |= 1 << TK_PATH_AVX2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq"))
        mask |= 1 << TK_PATH_AVX512;
#endif
    return mask;
}

static int best_path(void) {
    int mask = tk_supported_paths();
    for (int p = TK_PATH_AVX512; p > TK_PATH_PORTABLE; --p)
        if (mask & (1 << p)) return p;
    return TK_PATH_PORTABLE;
}

int tk_select_path(int path) {
    if (path == TK_PATH_AUTO) {
        g_path = best_path();
        return g_path;
    }
    if (path < TK_PATH_PORTABLE || path > TK_PATH_AVX512) return TK_ERR_PATH;
    if (!(tk_supported_paths() & (1 << path))) return TK_ERR_PATH;
    g_path = path;
    return g_path;
}

int tk_current_path(void) {
    if (g_path == -2) g_path = best_path();
    return g_path;
}

tk_gemm_fn tk_selected_gemm(void) {
    switch (tk_current_path()) {
#if TK_HAVE_X86_PATHS
    case TK_PATH_AVX512: return tk_gemm_avx512;
    case TK_PATH_AVX2: return tk_gemm_avx2;
    case TK_PATH_SCALAR: return tk_gemm_scalar;
#endif
    default: return tk_gemm_portable;
    }
}

tk_epilogue_fn tk_selected_epilogue(void) {
    switch (tk_current_path()) {
#if TK_HAVE_X86_PATHS
    case TK_PATH_AVX512: return tk_epilogue_ternary_avx512;
    case TK_PATH_AVX2: return tk_epilogue_ternary_avx2;
#endif
    default: return tk_epilogue_ternary_portable;
    }
}

int tk_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

int tk_threads(int threads) {
    int n = threads > 0 ? threads : tk_max_threads();
#ifndef _OPENMP
    n = 1;
#endif
    return n;
}

int64_t tk_mul_checked(int64_t a, int64_t b) {
    if (a <= 0 || b <= 0) return 0;
    if (a > INT64_MAX / b) return 0;
    return a * b;
}

int64_t tk_channel_bytes(int64_t channels) {
    if (channels <= 0 || channels > ((int64_t)1 << 40)) return 0;
    return (channels + 7) / 8;
}

int64_t tk_conv_out_size(int64_t in, int32_t stride) {
    if (in <= 0 || stride <= 0) return 0;
    return (in + stride - 1) / stride;
}

int64_t tk_k_words(int64_t in_channels, int64_t taps) {
    int64_t bytes = tk_mul_checked(tk_channel_bytes(in_channels), taps);
    return bytes ? (bytes + 7) / 8 : 0;
}

int64_t tk_packed_weights_words(int64_t out_channels, int64_t in_channels, int32_t k_d, int32_t k_h,
                                int32_t k_w) {
    if (out_channels <= 0 || k_d <= 0 || k_h <= 0 || k_w <= 0) return 0;
    int64_t kw = tk_k_words(in_channels, (int64_t)k_d * k_h * k_w);
    int64_t noct = (out_channels + TK_OCTET - 1) / TK_OCTET;
    return tk_mul_checked(tk_mul_checked(noct, kw), 2 * TK_OCTET);
}

int tk_check_conv_params(const tk_conv_params *p) {
    if (!p) return TK_ERR_ARGUMENT;
    if (p->in_d <= 0 || p->in_h <= 0 || p->in_w <= 0 || p->in_channels <= 0 || p->out_channels <= 0)
        return TK_ERR_ARGUMENT;
    const int32_t k[3] = {p->k_d, p->k_h, p->k_w};
    const int32_t s[3] = {p->stride_d, p->stride_h, p->stride_w};
    const int32_t d[3] = {p->dilation_d, p->dilation_h, p->dilation_w};
    for (int i = 0; i < 3; ++i) {
        if (k[i] <= 0 || k[i] % 2 == 0 || k[i] > 255) return TK_ERR_ARGUMENT;
        if (s[i] <= 0 || s[i] > 255 || d[i] <= 0 || d[i] > 255) return TK_ERR_ARGUMENT;
    }
    int64_t vox = tk_mul_checked(tk_mul_checked(p->in_d, p->in_h), p->in_w);
    int64_t taps = (int64_t)p->k_d * p->k_h * p->k_w;
    if (!vox || !tk_mul_checked(vox, tk_channel_bytes(p->in_channels) * 2) ||
        !tk_mul_checked(vox, p->out_channels) || !tk_k_words(p->in_channels, taps) ||
        p->out_channels > ((int64_t)1 << 30) || p->in_channels > ((int64_t)1 << 30))
        return TK_ERR_SIZE;
    /* |acc| <= taps * Cin must fit the int32 accumulators. */
    if (tk_mul_checked(taps, p->in_channels) > INT32_MAX) return TK_ERR_SIZE;
    return TK_OK;
}
