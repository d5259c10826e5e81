/*
 * ternary_kernels.h - public C API of the TernarySegmentation popcount kernels.
 *
 * Every hidden feature map of the network is ternary (-1, 0, +1) and stored as two bit planes packed
 * along channels ("packed map"): for each voxel, in (D, H, W) C order, a record of 2*Cb bytes,
 *     [ mask: Cb bytes | sign: Cb bytes ],  Cb = tk_channel_bytes(C) = ceil(C / 8),
 * channel c at byte c/8, bit c%8 (little-endian bit order). mask=1 means nonzero, sign=1 means -1.
 * Bits of channels >= C and sign bits where mask=0 are always 0 (canonical form). docs/kernels.md has
 * the full description, the epilogue maths and the dispatch rules.
 *
 * All functions validate their scalar arguments and return TK_OK (0) or a negative tk_status; they
 * never read or write outside the buffers whose sizes the documented shapes imply. The Python binding
 * (TernarySegmentationLib/kernels.py) checks array shapes first and raises ValueError.
 */
#ifndef TERNARY_KERNELS_H
#define TERNARY_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && defined(TK_BUILDING_SHARED)
#define TK_API __declspec(dllexport)
#elif defined(__GNUC__)
#define TK_API __attribute__((visibility("default")))
#else
#define TK_API
#endif

#define TK_ABI_VERSION 2

/* Instruction-set paths; all give bit-identical results. */
enum tk_path {
    TK_PATH_AUTO = -1,    /* the fastest path this CPU supports */
    TK_PATH_PORTABLE = 0, /* plain C, any CPU */
    TK_PATH_SCALAR = 1,   /* x86-64 POPCNT, 64-bit words */
    TK_PATH_AVX2 = 2,     /* AVX2, vpshufb nibble popcount, 4 filters per register */
    TK_PATH_AVX512 = 3    /* AVX-512F + VPOPCNTDQ, 8 filters per register */
};

enum tk_epilogue {
    TK_EPILOGUE_TERNARY = 0, /* packed ternary map: +1 if acc > hi[c], -1 if acc < lo[c], else 0 */
    TK_EPILOGUE_FLOAT = 1,   /* float32 (voxel, Cout): scale[c] * acc + bias[c] */
    TK_EPILOGUE_INT32 = 2    /* int32 (voxel, Cout): the raw accumulator */
};

enum tk_status {
    TK_OK = 0,
    TK_ERR_ARGUMENT = -1, /* a null pointer, a non-positive size, an even kernel size, ... */
    TK_ERR_MEMORY = -2,   /* scratch allocation failed */
    TK_ERR_PATH = -3,     /* the requested path is not supported by this CPU or build */
    TK_ERR_SIZE = -4      /* sizes overflow 64-bit arithmetic */
};

/* Geometry of one 3D convolution. Padding is zero "same" padding: pad = dilation*(k-1)/2 before,
 * out = ceil(in / stride) (equal to torch conv3d with padding=dilation*(k-1)/2 for odd k). */
typedef struct tk_conv_params {
    int64_t in_d, in_h, in_w;   /* input spatial size */
    int64_t in_channels;        /* Cin */
    int64_t out_channels;       /* Cout */
    int32_t k_d, k_h, k_w;      /* odd kernel sizes >= 1 */
    int32_t stride_d, stride_h, stride_w;       /* >= 1 */
    int32_t dilation_d, dilation_h, dilation_w; /* >= 1 */
} tk_conv_params;

TK_API int tk_abi_version(void);
/* Bit i set when path i can run on this CPU with this build. */
TK_API int tk_supported_paths(void);
/* Select the path used by later calls (TK_PATH_AUTO = best). Returns the path now selected, or
 * TK_ERR_PATH (and keeps the old selection) when the CPU or build lacks it. */
TK_API int tk_select_path(int path);
TK_API int tk_current_path(void);
/* Threads used when a call passes threads <= 0 (all cores, as OpenMP sees them; 1 without OpenMP). */
TK_API int tk_max_threads(void);
/* Bytes per plane per voxel of a packed map with the given channel count. */
TK_API int64_t tk_channel_bytes(int64_t channels);
/* Output size along one axis: ceil(in / stride). */
TK_API int64_t tk_conv_out_size(int64_t in, int32_t stride);
/* Number of uint64 words in the buffer tk_pack_weights writes. */
TK_API int64_t tk_packed_weights_words(int64_t out_channels, int64_t in_channels, int32_t k_d,
                                       int32_t k_h, int32_t k_w);

/* float32 (nvox, C) -> packed map: +1 where x > hi[c], -1 where x < lo[c], 0 otherwise (NaN -> 0). */
TK_API int tk_pack(const float *x, int64_t nvox, int64_t channels, const float *lo, const float *hi,
                   uint8_t *out, int threads);
/* packed map -> int8 (nvox, C) in {-1, 0, +1}. */
TK_API int tk_unpack(const uint8_t *x, int64_t nvox, int64_t channels, int8_t *out, int threads);
/* int8 weights (Cout, Cin, kd, kh, kw) in {-1, 0, +1} -> the kernels' packed filter layout. */
TK_API int tk_pack_weights(const int8_t *w, int64_t out_channels, int64_t in_channels, int32_t k_d,
                           int32_t k_h, int32_t k_w, uint64_t *out);

/* Ternary weights x ternary packed input. lo/hi are used by TK_EPILOGUE_TERNARY, scale/bias by
 * TK_EPILOGUE_FLOAT (others may be NULL). Output: packed map, float32 or int32 (out voxels, Cout). */
TK_API int tk_ternary_conv3d(const tk_conv_params *p, const uint8_t *x, const uint64_t *packed_w,
                             int epilogue, const int32_t *lo, const int32_t *hi, const float *scale,
                             const float *bias, void *out, int threads);

/* Float weights (Cout, Cin, kd, kh, kw) x float input (D, H, W, Cin): y = acc + bias[c]; then
 * TK_EPILOGUE_TERNARY packs y with lo/hi (as tk_pack), TK_EPILOGUE_FLOAT writes y. */
TK_API int tk_float_conv3d(const tk_conv_params *p, const float *x, const float *w,
                           const float *bias, int epilogue, const float *lo, const float *hi,
                           void *out, int threads);

/* 2x2x2 max pool, stride 2, output ceil(n/2) per axis (windows clipped at the far border). */
TK_API int tk_max_pool(const uint8_t *x, int64_t d, int64_t h, int64_t w, int64_t channels,
                       uint8_t *out, int threads);
/* Nearest-neighbour x2 upsampling to (od, oh, ow), each of which must be 2n-1 or 2n. */
TK_API int tk_upsample(const uint8_t *x, int64_t d, int64_t h, int64_t w, int64_t channels,
                       int64_t od, int64_t oh, int64_t ow, uint8_t *out, int threads);
/* Channel concatenation of two packed maps with nvox voxels: out channels = [a | b]. */
TK_API int tk_concat(const uint8_t *a, int64_t a_channels, const uint8_t *b, int64_t b_channels,
                     int64_t nvox, uint8_t *out, int threads);
/* Float classifier on a packed map (nvox voxels, C channels) with per-byte tables
 * (tables: (channel bytes, 65536, classes) float32; entry [g][mask | sign << 8] = the byte's partial
 * sum): out[v][k] = bias[k] + tables[0][code_0(v)][k] + tables[1][code_1(v)][k] + ..., in that
 * order, in float32 (so the result does not depend on the path or the threads). */
TK_API int tk_classify(const uint8_t *x, int64_t nvox, int64_t channels, const float *tables,
                       const float *bias, int64_t classes, float *out, int threads);

#ifdef __cplusplus
}
#endif
#endif
