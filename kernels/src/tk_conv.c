/* Convolution drivers: gather ("bit im2col") of a block of output voxels into packed rows, the
 * selected micro-kernel, and the fused epilogue. Also the float first-layer convolution. */
#include <stdlib.h>
#include <string.h>

#include "tk_internal.h"

/* Output voxels gathered per block: a multiple of TK_VOXEL_GROUP, sized so that the rows of one
 * block (2 planes x kw words each) stay near 16 KiB, in L1 beside the filters being applied. */
static int64_t block_voxels(int64_t kw, int64_t out_w) {
    int64_t vb = (16 * 1024) / (16 * kw);
    if (vb > 128) vb = 128;
    if (vb > out_w) vb = out_w;
    vb = (vb + TK_VOXEL_GROUP - 1) / TK_VOXEL_GROUP * TK_VOXEL_GROUP;
    return vb < TK_VOXEL_GROUP ? TK_VOXEL_GROUP : vb;
}

typedef struct geometry {
    int64_t od, oh, ow, taps, cb, kw, noct;
    int64_t pad_d, pad_h, pad_w;
} geometry;

static geometry conv_geometry(const tk_conv_params *p) {
    geometry g;
    g.od = tk_conv_out_size(p->in_d, p->stride_d);
    g.oh = tk_conv_out_size(p->in_h, p->stride_h);
    g.ow = tk_conv_out_size(p->in_w, p->stride_w);
    g.taps = (int64_t)p->k_d * p->k_h * p->k_w;
    g.cb = tk_channel_bytes(p->in_channels);
    g.kw = tk_k_words(p->in_channels, g.taps);
    g.noct = (p->out_channels + TK_OCTET - 1) / TK_OCTET;
    g.pad_d = (int64_t)p->dilation_d * (p->k_d - 1) / 2;
    g.pad_h = (int64_t)p->dilation_h * (p->k_h - 1) / 2;
    g.pad_w = (int64_t)p->dilation_w * (p->k_w - 1) / 2;
    return g;
}

/* Copy one tap of nx output voxels: source records are 2*cb bytes (mask | sign), destination rows
 * are 2*kw words (mask words | sign words). CB is a compile-time constant in the common cases. */
#define TK_GATHER_TAP(CB)                                                                      \
    for (int64_t x = x_lo; x < x_hi; ++x) {                                                    \
        const uint8_t *src = src_row + (x * sw + x_off) * 2 * (CB);                            \
        uint8_t *dst = (uint8_t *)(rows + (x - x0) * 2 * kw) + t * (CB);                       \
        tk_copy_bytes(dst, src, (CB));                                                            \
        tk_copy_bytes(dst + kw * 8, src + (CB), (CB));                                            \
    }

static void gather_block(const tk_conv_params *p, const geometry *g, const uint8_t *x_in,
                         int64_t oz, int64_t oy, int64_t x0, int64_t nx, uint64_t *rows) {
    const int64_t cb = g->cb, kw = g->kw, sw = p->stride_w;
    for (int64_t a = 0; a < p->k_d; ++a) {
        const int64_t iz = oz * p->stride_d - g->pad_d + a * p->dilation_d;
        for (int64_t b = 0; b < p->k_h; ++b) {
            const int64_t iy = oy * p->stride_h - g->pad_h + b * p->dilation_h;
            const int row_ok = iz >= 0 && iz < p->in_d && iy >= 0 && iy < p->in_h;
            const uint8_t *src_row = row_ok ? x_in + ((iz * p->in_h + iy) * p->in_w) * 2 * cb : NULL;
            for (int64_t c = 0; c < p->k_w; ++c) {
                const int64_t t = (a * p->k_h + b) * p->k_w + c;
                const int64_t x_off = c * p->dilation_w - g->pad_w; /* ix = x * sw + x_off */
                /* valid x: 0 <= x*sw + x_off < in_w */
                int64_t x_lo = x0, x_hi = x0 + nx;
                if (!row_ok) {
                    x_lo = x_hi;
                } else {
                    const int64_t first = x_off >= 0 ? 0 : (-x_off + sw - 1) / sw;
                    const int64_t last = (p->in_w - 1 - x_off) >= 0 ? (p->in_w - 1 - x_off) / sw + 1 : 0;
                    if (x_lo < first) x_lo = first;
                    if (x_hi > last) x_hi = last;
                    if (x_hi < x_lo) x_hi = x_lo;
                }
                /* zero the taps that fall into the padding: x in [x0, x_lo) and [x_hi, x0 + nx) */
                for (int64_t x = x0; x < x0 + nx; ++x) {
                    if (x == x_lo) x = x_hi;
                    if (x >= x0 + nx) break;
                    uint8_t *dst = (uint8_t *)(rows + (x - x0) * 2 * kw) + t * cb;
                    memset(dst, 0, (size_t)cb);
                    memset(dst + kw * 8, 0, (size_t)cb);
                }
                /* constant sizes: fixed moves (a runtime size becomes a memmove call per tap) */
                switch (cb) {
                case 1: TK_GATHER_TAP(1) break;
                case 2: TK_GATHER_TAP(2) break;
                case 3: TK_GATHER_TAP(3) break;
                case 4: TK_GATHER_TAP(4) break;
                case 6: TK_GATHER_TAP(6) break;
                case 8: TK_GATHER_TAP(8) break;
                case 12: TK_GATHER_TAP(12) break;   /* 96 channels: the decoder's concatenation */
                case 16: TK_GATHER_TAP(16) break;
                case 24: TK_GATHER_TAP(24) break;
                default: TK_GATHER_TAP(cb) break;
                }
            }
        }
    }
}

/* The gather for 3-wide rows with 16 or 32 channels on the AVX2/AVX-512 paths: per voxel, one
 * load and shuffle per (kd, kh) row (tk_gather3_avx2) instead of six copies; border voxels and
 * voxels whose 16/32-byte loads would pass the end of the input take the per-tap route. base and
 * rp are scratch of k_d * k_h pointers. */
static int use_gather3(const tk_conv_params *p, const geometry *g) {
#if TK_HAVE_X86_PATHS
    return p->k_w == 3 && p->dilation_w == 1 && (g->cb == 2 || g->cb == 4) &&
           tk_current_path() >= TK_PATH_AVX2;
#else
    (void)p, (void)g;
    return 0;
#endif
}

#if TK_HAVE_X86_PATHS
static void gather_block3(const tk_conv_params *p, const geometry *g, const uint8_t *x_in,
                          int64_t oz, int64_t oy, int64_t x0, int64_t nx, uint64_t *rows,
                          const uint8_t **base, const uint8_t **rp) {
    const int64_t cb = g->cb, kw = g->kw, rec = 2 * cb, load = cb == 4 ? 32 : 16;
    const uint8_t *end = x_in + p->in_d * p->in_h * p->in_w * rec, *last = NULL;
    int64_t nab = 0;
    for (int64_t a = 0; a < p->k_d; ++a) {
        const int64_t iz = oz * p->stride_d - g->pad_d + a * p->dilation_d;
        for (int64_t b = 0; b < p->k_h; ++b, ++nab) {
            const int64_t iy = oy * p->stride_h - g->pad_h + b * p->dilation_h;
            const int ok = iz >= 0 && iz < p->in_d && iy >= 0 && iy < p->in_h;
            base[nab] = ok ? x_in + (iz * p->in_h + iy) * p->in_w * rec : NULL;
            if (ok) last = base[nab];
        }
    }
    for (int64_t x = x0; x < x0 + nx; ++x) {
        uint8_t *dm = (uint8_t *)(rows + (x - x0) * 2 * kw), *ds = dm + kw * 8;
        const int64_t ix0 = x * p->stride_w - g->pad_w;
        if (ix0 >= 0 && ix0 + 2 < p->in_w && (!last || end - (last + ix0 * rec) >= load)) {
            for (int64_t r = 0; r < nab; ++r) rp[r] = base[r] ? base[r] + ix0 * rec : NULL;
            tk_gather3_avx2(rp, nab, cb, dm, ds);
            continue;
        }
        for (int64_t r = 0; r < nab; ++r)
            for (int64_t c = 0; c < 3; ++c) {
                const int64_t t = r * 3 + c, ix = ix0 + c;
                if (base[r] && ix >= 0 && ix < p->in_w) {
                    tk_copy_bytes(dm + t * cb, base[r] + ix * rec, cb);
                    tk_copy_bytes(ds + t * cb, base[r] + ix * rec + cb, cb);
                } else {
                    memset(dm + t * cb, 0, (size_t)cb);
                    memset(ds + t * cb, 0, (size_t)cb);
                }
            }
    }
}
#endif

/*
 * Epilogue (derivation once, see also docs/kernels.md). The accumulator is the exact integer
 * dot product acc = sum w*x over taps and input channels, w, x in {-1, 0, +1}. Training computes
 * y = gamma * (alpha * acc + conv_bias - mean) / sqrt(var + eps) + beta = a * acc + b and the next
 * activation is +1 if y > 1/2, -1 if y < -1/2, else 0. For a > 0 and integer acc:
 *     y > 1/2  <=>  acc > (1/2 - b) / a  <=>  acc > hi := floor((1/2 - b) / a)
 *     y < -1/2 <=>  acc < (-1/2 - b) / a <=>  acc < lo := ceil((-1/2 - b) / a)
 * (a < 0 is folded by negating the filter's weights offline; a == 0 gives a constant output,
 * expressed with hi = INT32_MIN or lo = INT32_MAX.) The kernel only sees the integer pair; a value
 * above hi is +1 even when it is also below lo. The optimised epilogues in tk_gemm_x86.c compute
 * the same comparisons with vector compares.
 */
void tk_epilogue_ternary_portable(const int32_t *acc, int64_t ldacc, int64_t nv, int64_t cout,
                                  const int32_t *lo, const int32_t *hi, uint8_t *out) {
    const int64_t cbo = tk_channel_bytes(cout);
    for (int64_t v = 0; v < nv; ++v) {
        const int32_t *av = acc + v * ldacc;
        uint8_t *om = out + v * 2 * cbo, *os = om + cbo;
        for (int64_t byte = 0; byte < cbo; ++byte) {
            unsigned m = 0, s = 0;
            const int64_t c0 = byte * 8, c1 = c0 + 8 < cout ? c0 + 8 : cout;
            for (int64_t c = c0; c < c1; ++c) {
                const unsigned pos = av[c] > hi[c], neg = av[c] < lo[c] && !pos;
                m |= (pos | neg) << (c - c0);
                s |= neg << (c - c0);
            }
            om[byte] = (uint8_t)m;
            os[byte] = (uint8_t)s;
        }
    }
}

int tk_ternary_conv3d(const tk_conv_params *p, const uint8_t *x, const uint64_t *packed_w,
                      int epilogue, const int32_t *lo, const int32_t *hi, const float *scale,
                      const float *bias, void *out, int threads) {
    int status = tk_check_conv_params(p);
    if (status != TK_OK) return status;
    if (!x || !packed_w || !out) return TK_ERR_ARGUMENT;
    if (epilogue == TK_EPILOGUE_TERNARY && (!lo || !hi)) return TK_ERR_ARGUMENT;
    if (epilogue == TK_EPILOGUE_FLOAT && (!scale || !bias)) return TK_ERR_ARGUMENT;
    if (epilogue < TK_EPILOGUE_TERNARY || epilogue > TK_EPILOGUE_INT32) return TK_ERR_ARGUMENT;

    const geometry g = conv_geometry(p);
    const int64_t cout = p->out_channels, ldacc = g.noct * TK_OCTET;
    const int64_t vb = block_voxels(g.kw, g.ow);
    const int64_t blocks_per_row = (g.ow + vb - 1) / vb;
    const int64_t items = g.od * g.oh * blocks_per_row;
    const int64_t cbo = tk_channel_bytes(cout);
    const tk_gemm_fn gemm = tk_selected_gemm();
    const tk_epilogue_fn epilogue_ternary = tk_selected_epilogue();
    const int gather3 = use_gather3(p, &g);
    int failed = 0;

#ifdef _OPENMP
#pragma omp parallel num_threads(tk_threads(threads))
#endif
    {
        uint64_t *rows = (uint64_t *)calloc((size_t)(vb * 2 * g.kw), sizeof(uint64_t));
        int32_t *acc = (int32_t *)malloc((size_t)(vb * ldacc) * sizeof(int32_t));
        const uint8_t **ptrs = (const uint8_t **)malloc((size_t)(2 * p->k_d * p->k_h) * sizeof(uint8_t *));
        if (!rows || !acc || !ptrs) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            failed = 1;
        }
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t item = 0; item < items; ++item) {
            if (!rows || !acc || !ptrs) continue;
            const int64_t row = item / blocks_per_row, x0 = (item % blocks_per_row) * vb;
            const int64_t oz = row / g.oh, oy = row % g.oh;
            const int64_t nx = g.ow - x0 < vb ? g.ow - x0 : vb;
            const int64_t nvpad = (nx + TK_VOXEL_GROUP - 1) / TK_VOXEL_GROUP * TK_VOXEL_GROUP;
#if TK_HAVE_X86_PATHS
            if (gather3)
                gather_block3(p, &g, x, oz, oy, x0, nx, rows, ptrs, ptrs + p->k_d * p->k_h);
            else
#endif
                gather_block(p, &g, x, oz, oy, x0, nx, rows);
            memset(rows + nx * 2 * g.kw, 0, (size_t)((nvpad - nx) * 2 * g.kw) * sizeof(uint64_t));
            gemm(rows, nvpad, packed_w, g.noct, g.kw, acc);
            const int64_t ov = (oz * g.oh + oy) * g.ow + x0;
            if (epilogue == TK_EPILOGUE_TERNARY) {
                epilogue_ternary(acc, ldacc, nx, cout, lo, hi, (uint8_t *)out + ov * 2 * cbo);
            } else if (epilogue == TK_EPILOGUE_FLOAT) {
                float *o = (float *)out + ov * cout;
                for (int64_t v = 0; v < nx; ++v)
                    for (int64_t c = 0; c < cout; ++c)
                        o[v * cout + c] = scale[c] * (float)acc[v * ldacc + c] + bias[c];
            } else {
                int32_t *o = (int32_t *)out + ov * cout;
                for (int64_t v = 0; v < nx; ++v)
                    memcpy(o + v * cout, acc + v * ldacc, (size_t)cout * sizeof(int32_t));
            }
        }
        free(rows);
        free(acc);
        free((void *)ptrs);
    }
    return failed ? TK_ERR_MEMORY : TK_OK;
}

/* ------------------------------------------------------------------ float first-layer conv */

/* The float convolution of one output voxel for NB output channels (NB a multiple of 8, a
 * compile-time constant so the sums stay in vector registers). rows[r] points at the input row of
 * the r-th in-bounds (kd, kh) pair and taps[r] is that pair's first tap index; wt is
 * [tap][cin][cout8], cout8 = cout rounded up to 8, zero-filled. No FMA contraction
 * (-ffp-contract=off): every build rounds the same way, acc += w * x tap by tap, channel by channel
 * (the numpy reference's order). */
#define TK_FLOAT_VOXEL(NB)                                                                         \
    static TK_ALWAYS_INLINE void float_voxel_##NB(const tk_conv_params *p, const float *const *rows, \
                                                  const int64_t *taps, int64_t nrows,              \
                                                  const float *wt, int64_t cout8, int64_t ix0,     \
                                                  float *acc) {                                    \
        const int64_t cin = p->in_channels;                                                        \
        float s[NB] = {0.0f};                                                                      \
        for (int64_t r = 0; r < nrows; ++r) {                                                      \
            for (int64_t c = 0; c < p->k_w; ++c) {                                                 \
                const int64_t ix = ix0 + c * p->dilation_w;                                        \
                if (ix < 0 || ix >= p->in_w) continue;                                             \
                const float *xi = rows[r] + ix * cin;                                              \
                const float *wv = wt + (taps[r] + c) * cin * cout8;                                \
                for (int64_t ci = 0; ci < cin; ++ci, wv += cout8) {                                \
                    const float v = xi[ci];                                                        \
                    for (int j = 0; j < (NB); ++j) s[j] += wv[j] * v;                              \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (int j = 0; j < (NB); ++j) acc[j] = s[j];                                              \
    }

/* The same sums for a voxel whose taps are all inside the volume: one flat list of (input offset,
 * weight row) per tap, no bounds checks; identical arithmetic in identical order. */
#define TK_FLOAT_VOXEL_INTERIOR(NB)                                                                \
    static TK_ALWAYS_INLINE void float_voxel_interior_##NB(                                        \
        const float *x0, const int64_t *offsets, const float *const *wrows, int64_t ntaps,         \
        int64_t cin, int64_t cout8, int64_t c0, float *acc) {                                      \
        float s[NB] = {0.0f};                                                                      \
        for (int64_t e = 0; e < ntaps; ++e) {                                                      \
            const float *xi = x0 + offsets[e], *wv = wrows[e] + c0;                                \
            for (int64_t ci = 0; ci < cin; ++ci, wv += cout8) {                                    \
                const float v = xi[ci];                                                            \
                for (int j = 0; j < (NB); ++j) s[j] += wv[j] * v;                                  \
            }                                                                                      \
        }                                                                                          \
        for (int j = 0; j < (NB); ++j) acc[j] = s[j];                                              \
    }

/* Four interior voxels of one row at once (x0, x0 + xstep, ...), sharing each weight load: four
 * independent accumulator sets hide the add latency that bounds the one-voxel loop. Per voxel, the
 * arithmetic and its order are exactly float_voxel_interior's (lane-wise IEEE multiplies and adds,
 * no contraction). GCC/Clang vector types: AVX registers in the AVX2 build, SSE/NEON pairs
 * elsewhere. acc: 4 records of ldacc floats. NV = NB / 8 vectors per voxel. */
typedef float tk_v8f __attribute__((vector_size(32)));


#define TK_FLOAT_VOXEL_INTERIOR4(NB)                                                               \
    static TK_ALWAYS_INLINE void float_voxel_interior4_##NB(                                       \
        const float *x0, int64_t xstep, const int64_t *offsets, const float *const *wrows,         \
        int64_t ntaps, int64_t cin, int64_t cout8, float *acc, int64_t ldacc) {                    \
        enum { NV = (NB) / 8 };                                                                    \
        tk_v8f s0[NV], s1[NV], s2[NV], s3[NV];                                                     \
        for (int j = 0; j < NV; ++j) s0[j] = s1[j] = s2[j] = s3[j] = (tk_v8f){0};                  \
        for (int64_t e = 0; e < ntaps; ++e) {                                                      \
            const float *xi = x0 + offsets[e], *wv = wrows[e];                                     \
            for (int64_t ci = 0; ci < cin; ++ci, wv += cout8) {                                    \
                const float v0 = xi[ci], v1 = xi[xstep + ci], v2 = xi[2 * xstep + ci],             \
                            v3 = xi[3 * xstep + ci];                                               \
                for (int j = 0; j < NV; ++j) {                                                     \
                    tk_v8f w;                                                                      \
                    memcpy(&w, wv + 8 * j, sizeof w);                                              \
                    s0[j] += w * v0;                                                               \
                    s1[j] += w * v1;                                                               \
                    s2[j] += w * v2;                                                               \
                    s3[j] += w * v3;                                                               \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (int j = 0; j < NV; ++j) {                                                             \
            memcpy(acc + 8 * j, &s0[j], sizeof s0[j]);                                             \
            memcpy(acc + ldacc + 8 * j, &s1[j], sizeof s1[j]);                                     \
            memcpy(acc + 2 * ldacc + 8 * j, &s2[j], sizeof s2[j]);                                 \
            memcpy(acc + 3 * ldacc + 8 * j, &s3[j], sizeof s3[j]);                                 \
        }                                                                                          \
    }

TK_FLOAT_VOXEL(8)
TK_FLOAT_VOXEL(16)
TK_FLOAT_VOXEL(24)
TK_FLOAT_VOXEL(32)
TK_FLOAT_VOXEL_INTERIOR(8)
TK_FLOAT_VOXEL_INTERIOR(16)
TK_FLOAT_VOXEL_INTERIOR(24)
TK_FLOAT_VOXEL_INTERIOR(32)
TK_FLOAT_VOXEL_INTERIOR4(8)
TK_FLOAT_VOXEL_INTERIOR4(16)

/* One output row (oz, oy) of the float convolution, then its epilogue (y = acc + bias).
 * scratch: rows/taps of k_d*k_h entries, offsets/wrows of k_d*k_h*k_w entries. */
typedef struct float_scratch {
    float *acc;
    const float **rows;
    int64_t *taps;
    int64_t *offsets;
    const float **wrows;
} float_scratch;

/* y = acc + bias, written as float or packed with lo/hi at output voxel ov. */
static TK_ALWAYS_INLINE void float_epilogue(float *acc, int64_t cout, const float *bias, int epilogue,
                                            const float *lo, const float *hi, void *out, int64_t ov,
                                            int64_t cbo) {
    for (int64_t co = 0; co < cout; ++co) acc[co] += bias[co];
    if (epilogue == TK_EPILOGUE_FLOAT) {
        memcpy((float *)out + ov * cout, acc, (size_t)cout * sizeof(float));
    } else {
        uint8_t *om = (uint8_t *)out + ov * 2 * cbo;
        tk_pack_record_f(acc, cout, lo, hi, om, om + cbo);
    }
}

static TK_ALWAYS_INLINE void float_conv_row(const tk_conv_params *p, const geometry *g,
                                            const float *x, const float *wt, const float *bias,
                                            int epilogue, const float *lo, const float *hi,
                                            void *out, int64_t oz, int64_t oy, float_scratch *sc,
                                            int four) {
    const int64_t cin = p->in_channels, cout = p->out_channels, cbo = tk_channel_bytes(cout);
    const int64_t cout8 = (cout + 7) / 8 * 8;
    float *acc = sc->acc;
    int64_t nrows = 0, ntaps = 0;
    for (int64_t a = 0; a < p->k_d; ++a) {
        const int64_t iz = oz * p->stride_d - g->pad_d + a * p->dilation_d;
        for (int64_t b = 0; b < p->k_h; ++b) {
            const int64_t iy = oy * p->stride_h - g->pad_h + b * p->dilation_h;
            if (iz < 0 || iz >= p->in_d || iy < 0 || iy >= p->in_h) continue;
            sc->rows[nrows] = x + (iz * p->in_h + iy) * p->in_w * cin;
            sc->taps[nrows] = (a * p->k_h + b) * p->k_w;
            for (int64_t c = 0; c < p->k_w; ++c) {
                sc->offsets[ntaps] = (sc->rows[nrows] - x) + c * p->dilation_w * cin;
                sc->wrows[ntaps++] = wt + (sc->taps[nrows] + c) * cin * cout8;
            }
            ++nrows;
        }
    }
    const int64_t reach = (int64_t)(p->k_w - 1) * p->dilation_w;
    const int64_t xstep = (int64_t)p->stride_w * cin;
    for (int64_t ox = 0; ox < g->ow; ++ox) {
        const int64_t ix0 = ox * p->stride_w - g->pad_w;
        const int interior = ix0 >= 0 && ix0 + reach < p->in_w;
        if (four && cout8 <= 16 && interior && ox + 3 < g->ow && ix0 + 3 * p->stride_w + reach < p->in_w) {
            const float *x0 = x + ix0 * cin;  /* four interior voxels ox .. ox + 3 */
            if (cout8 == 8)
                float_voxel_interior4_8(x0, xstep, sc->offsets, sc->wrows, ntaps, cin, cout8, acc, cout8);
            else
                float_voxel_interior4_16(x0, xstep, sc->offsets, sc->wrows, ntaps, cin, cout8, acc, cout8);
            for (int k = 0; k < 4; ++k)
                float_epilogue(acc + k * cout8, cout, bias, epilogue, lo, hi, out,
                               (oz * g->oh + oy) * g->ow + ox + k, cbo);
            ox += 3;
            continue;
        }
        for (int64_t c0 = 0; c0 < cout8; c0 += 32) {
            const int64_t nb = cout8 - c0 < 32 ? cout8 - c0 : 32;
            if (interior) {
                const float *x0 = x + ix0 * cin;
                switch (nb) {
                case 8: float_voxel_interior_8(x0, sc->offsets, sc->wrows, ntaps, cin, cout8, c0, acc + c0); break;
                case 16: float_voxel_interior_16(x0, sc->offsets, sc->wrows, ntaps, cin, cout8, c0, acc + c0); break;
                case 24: float_voxel_interior_24(x0, sc->offsets, sc->wrows, ntaps, cin, cout8, c0, acc + c0); break;
                default: float_voxel_interior_32(x0, sc->offsets, sc->wrows, ntaps, cin, cout8, c0, acc + c0); break;
                }
            } else {
                const float *w0 = wt + c0;
                switch (nb) {
                case 8: float_voxel_8(p, sc->rows, sc->taps, nrows, w0, cout8, ix0, acc + c0); break;
                case 16: float_voxel_16(p, sc->rows, sc->taps, nrows, w0, cout8, ix0, acc + c0); break;
                case 24: float_voxel_24(p, sc->rows, sc->taps, nrows, w0, cout8, ix0, acc + c0); break;
                default: float_voxel_32(p, sc->rows, sc->taps, nrows, w0, cout8, ix0, acc + c0); break;
                }
            }
        }
        float_epilogue(acc, cout, bias, epilogue, lo, hi, out, (oz * g->oh + oy) * g->ow + ox, cbo);
    }
}

static void float_conv_rows_plain(const tk_conv_params *p, const geometry *g, const float *x,
                                  const float *wt, const float *bias, int epilogue,
                                  const float *lo, const float *hi, void *out, int64_t oz,
                                  int64_t oy, float_scratch *sc) {
    float_conv_row(p, g, x, wt, bias, epilogue, lo, hi, out, oz, oy, sc, 0);
}

#if TK_HAVE_X86_PATHS
/* AVX2 without FMA: the same multiplies and adds in the same order, 8 lanes wide. */
__attribute__((target("avx2"))) static void float_conv_rows_avx2(
    const tk_conv_params *p, const geometry *g, const float *x, const float *wt, const float *bias,
    int epilogue, const float *lo, const float *hi, void *out, int64_t oz, int64_t oy,
    float_scratch *sc) {
    float_conv_row(p, g, x, wt, bias, epilogue, lo, hi, out, oz, oy, sc, 1);
}
#endif

int tk_float_conv3d(const tk_conv_params *p, const float *x, const float *w, const float *bias,
                    int epilogue, const float *lo, const float *hi, void *out, int threads) {
    int status = tk_check_conv_params(p);
    if (status != TK_OK) return status;
    if (!x || !w || !bias || !out) return TK_ERR_ARGUMENT;
    if (epilogue == TK_EPILOGUE_TERNARY) {
        if (!lo || !hi) return TK_ERR_ARGUMENT;
    } else if (epilogue != TK_EPILOGUE_FLOAT) {
        return TK_ERR_ARGUMENT;
    }
    const geometry g = conv_geometry(p);
    const int64_t cin = p->in_channels, cout = p->out_channels;
    const int64_t cout8 = (cout + 7) / 8 * 8;
    const int64_t wsize = tk_mul_checked(tk_mul_checked(g.taps, cin), cout8);
    if (!wsize) return TK_ERR_SIZE;
    float *wt = (float *)calloc((size_t)wsize, sizeof(float));
    if (!wt) return TK_ERR_MEMORY;
    for (int64_t co = 0; co < cout; ++co)
        for (int64_t ci = 0; ci < cin; ++ci)
            for (int64_t t = 0; t < g.taps; ++t)
                wt[(t * cin + ci) * cout8 + co] = w[(co * cin + ci) * g.taps + t];

    void (*rows_fn)(const tk_conv_params *, const geometry *, const float *, const float *,
                    const float *, int, const float *, const float *, void *, int64_t, int64_t,
                    float_scratch *) = float_conv_rows_plain;
#if TK_HAVE_X86_PATHS
    if (tk_current_path() >= TK_PATH_AVX2) rows_fn = float_conv_rows_avx2;
#endif
    const int64_t items = g.od * g.oh;
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(tk_threads(threads))
#endif
    {
        const int64_t kdh = (int64_t)p->k_d * p->k_h;
        float_scratch sc;
        sc.acc = (float *)malloc((size_t)(4 * cout8) * sizeof(float));  /* 4 voxels' records */
        sc.rows = (const float **)malloc((size_t)kdh * sizeof(float *));
        sc.taps = (int64_t *)malloc((size_t)kdh * sizeof(int64_t));
        sc.offsets = (int64_t *)malloc((size_t)g.taps * sizeof(int64_t));
        sc.wrows = (const float **)malloc((size_t)g.taps * sizeof(float *));
        const int ok = sc.acc && sc.rows && sc.taps && sc.offsets && sc.wrows;
        if (!ok) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            failed = 1;
        }
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t item = 0; item < items; ++item) {
            if (!ok) continue;
            rows_fn(p, &g, x, wt, bias, epilogue, lo, hi, out, item / g.oh, item % g.oh, &sc);
        }
        free(sc.acc);
        free((void *)sc.rows);
        free(sc.taps);
        free(sc.offsets);
        free((void *)sc.wrows);
    }
    free(wt);
    return failed ? TK_ERR_MEMORY : TK_OK;
}
