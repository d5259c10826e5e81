"""cffi declarations of kernels/include/ternary_kernels.h.

Used by the API-mode build (kernels/build_cffi.py, where the C compiler checks every declaration
against the real header) and by the ABI-mode loader for the CMake-built shared library.
"""

CDEF = """
typedef struct tk_conv_params {
    int64_t in_d, in_h, in_w;
    int64_t in_channels;
    int64_t out_channels;
    int32_t k_d, k_h, k_w;
    int32_t stride_d, stride_h, stride_w;
    int32_t dilation_d, dilation_h, dilation_w;
} tk_conv_params;

int tk_abi_version(void);
int tk_supported_paths(void);
int tk_select_path(int path);
int tk_current_path(void);
int tk_max_threads(void);
int64_t tk_channel_bytes(int64_t channels);
int64_t tk_conv_out_size(int64_t in, int32_t stride);
int64_t tk_packed_weights_words(int64_t out_channels, int64_t in_channels, int32_t k_d,
                                int32_t k_h, int32_t k_w);
int tk_pack(const float *x, int64_t nvox, int64_t channels, const float *lo, const float *hi,
            uint8_t *out, int threads);
int tk_unpack(const uint8_t *x, int64_t nvox, int64_t channels, int8_t *out, int threads);
int tk_pack_weights(const int8_t *w, int64_t out_channels, int64_t in_channels, int32_t k_d,
                    int32_t k_h, int32_t k_w, uint64_t *out);
int tk_ternary_conv3d(const tk_conv_params *p, const uint8_t *x, const uint64_t *packed_w,
                      int epilogue, const int32_t *lo, const int32_t *hi, const float *scale,
                      const float *bias, void *out, int threads);
int tk_float_conv3d(const tk_conv_params *p, const float *x, const float *w, const float *bias,
                    int epilogue, const float *lo, const float *hi, void *out, int threads);
int tk_max_pool(const uint8_t *x, int64_t d, int64_t h, int64_t w, int64_t channels,
                uint8_t *out, int threads);
int tk_upsample(const uint8_t *x, int64_t d, int64_t h, int64_t w, int64_t channels,
                int64_t od, int64_t oh, int64_t ow, uint8_t *out, int threads);
int tk_concat(const uint8_t *a, int64_t a_channels, const uint8_t *b, int64_t b_channels,
              int64_t nvox, uint8_t *out, int threads);
int tk_classify(const uint8_t *x, int64_t nvox, int64_t channels, const float *tables,
                const float *bias, int64_t classes, float *out, int threads);
"""
