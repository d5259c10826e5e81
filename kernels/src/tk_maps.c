/* Operations on packed ternary maps: pack / unpack, weight packing, max pool, upsample, concat,
 * the float classifier.
 * All are memory-bound and shared by every path. */
#include <stdlib.h>
#include <string.h>

#include "tk_internal.h"

#ifdef _OPENMP
#define TK_PARALLEL_FOR _Pragma("omp parallel for schedule(static) num_threads(nt)")
#else
#define TK_PARALLEL_FOR
#endif

int tk_pack(const float *x, int64_t nvox, int64_t channels, const float *lo, const float *hi,
            uint8_t *out, int threads) {
    const int64_t cb = tk_channel_bytes(channels);
    if (!x || !lo || !hi || !out || nvox <= 0 || !cb || !tk_mul_checked(nvox, channels))
        return TK_ERR_ARGUMENT;
    const int nt = tk_threads(threads);
    (void)nt;
    TK_PARALLEL_FOR
    for (int64_t v = 0; v < nvox; ++v) {
        uint8_t *om = out + v * 2 * cb;
        tk_pack_record_f(x + v * channels, channels, lo, hi, om, om + cb);
    }
    return TK_OK;
}

int tk_unpack(const uint8_t *x, int64_t nvox, int64_t channels, int8_t *out, int threads) {
    const int64_t cb = tk_channel_bytes(channels);
    if (!x || !out || nvox <= 0 || !cb || !tk_mul_checked(nvox, channels)) return TK_ERR_ARGUMENT;
    const int nt = tk_threads(threads);
    (void)nt;
    TK_PARALLEL_FOR
    for (int64_t v = 0; v < nvox; ++v) {
        const uint8_t *m = x + v * 2 * cb, *s = m + cb;
        int8_t *o = out + v * channels;
        for (int64_t c = 0; c < channels; ++c) {
            const int bit = (m[c >> 3] >> (c & 7)) & 1, neg = (s[c >> 3] >> (c & 7)) & 1;
            o[c] = (int8_t)(bit ? (neg ? -1 : 1) : 0);
        }
    }
    return TK_OK;
}

/* Filter f's K bits are the taps in (kd, kh, kw) order, each Cb bytes of its input channels (the
 * same bytes the gather copies from the input records); words are little-endian 8-byte groups of
 * that byte row, so the layout is the same on any byte order. Octet g, word k holds
 * [mask of filters 8g..8g+7 | sign of filters 8g..8g+7]. */
int tk_pack_weights(const int8_t *w, int64_t out_channels, int64_t in_channels, int32_t k_d,
                    int32_t k_h, int32_t k_w, uint64_t *out) {
    const int64_t words = tk_packed_weights_words(out_channels, in_channels, k_d, k_h, k_w);
    if (!w || !out || !words || k_d % 2 == 0 || k_h % 2 == 0 || k_w % 2 == 0)
        return TK_ERR_ARGUMENT;
    const int64_t taps = (int64_t)k_d * k_h * k_w, cb = tk_channel_bytes(in_channels);
    const int64_t kw = tk_k_words(in_channels, taps);
    if (!tk_mul_checked(tk_mul_checked(out_channels, in_channels), taps)) return TK_ERR_SIZE;
    for (int64_t i = 0; i < out_channels * in_channels * taps; ++i)
        if (w[i] < -1 || w[i] > 1) return TK_ERR_ARGUMENT;
    uint8_t *row = (uint8_t *)calloc((size_t)(2 * kw * 8), 1);
    if (!row) return TK_ERR_MEMORY;
    memset(out, 0, (size_t)words * sizeof(uint64_t));
    for (int64_t f = 0; f < out_channels; ++f) {
        memset(row, 0, (size_t)(2 * kw * 8));
        uint8_t *rm = row, *rs = row + kw * 8;
        for (int64_t c = 0; c < in_channels; ++c)
            for (int64_t t = 0; t < taps; ++t) {
                const int8_t v = w[(f * in_channels + c) * taps + t];
                const int64_t byte = t * cb + (c >> 3);
                if (v) rm[byte] |= (uint8_t)(1u << (c & 7));
                if (v < 0) rs[byte] |= (uint8_t)(1u << (c & 7));
            }
        const int64_t g = f / TK_OCTET, j = f % TK_OCTET;
        for (int64_t k = 0; k < kw; ++k)
            for (int plane = 0; plane < 2; ++plane) {
                const uint8_t *src = (plane ? rs : rm) + k * 8;
                uint64_t word = 0;
                for (int b = 7; b >= 0; --b) word = (word << 8) | src[b];
                out[((g * kw + k) * 2 + plane) * TK_OCTET + j] = word;
            }
    }
    free(row);
    return TK_OK;
}

/* Ternary max over a window, per channel bit: the result is +1 if any value is +1, -1 if all are
 * -1, 0 otherwise. With pos = OR(mask & ~sign) and all_neg = AND(mask & sign):
 * mask_out = pos | all_neg, sign_out = all_neg (all_neg excludes pos). Padding channels stay 0. */
int tk_max_pool(const uint8_t *x, int64_t d, int64_t h, int64_t w, int64_t channels, uint8_t *out,
                int threads) {
    const int64_t cb = tk_channel_bytes(channels);
    if (!x || !out || d <= 0 || h <= 0 || w <= 0 || !cb ||
        !tk_mul_checked(tk_mul_checked(tk_mul_checked(d, h), w), 2 * cb))
        return TK_ERR_ARGUMENT;
    const int64_t od = (d + 1) / 2, oh = (h + 1) / 2, ow = (w + 1) / 2;
    const int nt = tk_threads(threads);
    (void)nt;
    TK_PARALLEL_FOR
    for (int64_t row = 0; row < od * oh; ++row) {
        const int64_t oz = row / oh, oy = row % oh;
        for (int64_t ox = 0; ox < ow; ++ox) {
            uint8_t *om = out + ((oz * oh + oy) * ow + ox) * 2 * cb, *os = om + cb;
            for (int64_t byte = 0; byte < cb; ++byte) {
                unsigned pos = 0, all_neg = 0xFF;
                for (int64_t z = 2 * oz; z < 2 * oz + 2 && z < d; ++z)
                    for (int64_t y = 2 * oy; y < 2 * oy + 2 && y < h; ++y)
                        for (int64_t xx = 2 * ox; xx < 2 * ox + 2 && xx < w; ++xx) {
                            const uint8_t *r = x + ((z * h + y) * w + xx) * 2 * cb;
                            pos |= r[byte] & ~r[cb + byte];
                            all_neg &= r[byte] & r[cb + byte];
                        }
                om[byte] = (uint8_t)((pos | all_neg) & 0xFF);
                os[byte] = (uint8_t)(all_neg & 0xFF);
            }
        }
    }
    return TK_OK;
}

int tk_upsample(const uint8_t *x, int64_t d, int64_t h, int64_t w, int64_t channels, int64_t od,
                int64_t oh, int64_t ow, uint8_t *out, int threads) {
    const int64_t cb = tk_channel_bytes(channels);
    if (!x || !out || d <= 0 || h <= 0 || w <= 0 || !cb) return TK_ERR_ARGUMENT;
    if ((od + 1) / 2 != d || (oh + 1) / 2 != h || (ow + 1) / 2 != w || od <= 0 || oh <= 0 || ow <= 0)
        return TK_ERR_ARGUMENT;
    if (!tk_mul_checked(tk_mul_checked(tk_mul_checked(od, oh), ow), 2 * cb)) return TK_ERR_SIZE;
    const int nt = tk_threads(threads);
    (void)nt;
    const int64_t rb = 2 * cb;
    TK_PARALLEL_FOR
    for (int64_t row = 0; row < od * oh; ++row) {
        const int64_t oz = row / oh, oy = row % oh;
        const uint8_t *src = x + ((oz / 2) * h + oy / 2) * w * rb;
        uint8_t *dst = out + row * ow * rb;
        for (int64_t ox = 0; ox < ow; ++ox) tk_copy_record(dst + ox * rb, src + (ox / 2) * rb, rb);
    }
    return TK_OK;
}

/* Bits of b are shifted to start at channel a_channels; the byte-aligned case is two memcpys. */
int tk_concat(const uint8_t *a, int64_t a_channels, const uint8_t *b, int64_t b_channels,
              int64_t nvox, uint8_t *out, int threads) {
    const int64_t ca = tk_channel_bytes(a_channels), cbb = tk_channel_bytes(b_channels);
    const int64_t co = tk_channel_bytes(a_channels + b_channels);
    if (!a || !b || !out || nvox <= 0 || !ca || !cbb || !tk_mul_checked(nvox, 2 * co))
        return TK_ERR_ARGUMENT;
    const int64_t shift = a_channels & 7, base = a_channels >> 3;
    const int nt = tk_threads(threads);
    (void)nt;
    if (shift == 0) {  /* byte-aligned: every output byte is a copied byte (co == ca + cbb) */
        TK_PARALLEL_FOR
        for (int64_t v = 0; v < nvox; ++v) {
            const uint8_t *ra = a + v * 2 * ca, *rb = b + v * 2 * cbb;
            uint8_t *ro = out + v * 2 * co;
            tk_copy_record(ro, ra, ca);
            tk_copy_record(ro + ca, rb, cbb);
            tk_copy_record(ro + co, ra + ca, ca);
            tk_copy_record(ro + co + ca, rb + cbb, cbb);
        }
        return TK_OK;
    }
    TK_PARALLEL_FOR
    for (int64_t v = 0; v < nvox; ++v) {
        const uint8_t *ra = a + v * 2 * ca, *rb = b + v * 2 * cbb;
        uint8_t *ro = out + v * 2 * co;
        for (int plane = 0; plane < 2; ++plane) {
            uint8_t *o = ro + plane * co;
            const uint8_t *pa = ra + plane * ca, *pb = rb + plane * cbb;
            memset(o, 0, (size_t)co);
            memcpy(o, pa, (size_t)ca);
            for (int64_t i = 0; i < cbb; ++i) {
                o[base + i] |= (uint8_t)(pb[i] << shift);
                if (base + i + 1 < co) o[base + i + 1] |= (uint8_t)(pb[i] >> (8 - shift));
            }
        }
    }
    return TK_OK;
}

int tk_classify(const uint8_t *x, int64_t nvox, int64_t channels, const float *tables,
                const float *bias, int64_t classes, float *out, int threads) {
    const int64_t cb = tk_channel_bytes(channels);
    if (!x || !tables || !bias || !out || nvox <= 0 || !cb || classes <= 0) return TK_ERR_ARGUMENT;
    if (!tk_mul_checked(nvox, 2 * cb) || !tk_mul_checked(nvox, classes) ||
        !tk_mul_checked(tk_mul_checked(cb, 65536), classes))
        return TK_ERR_SIZE;
    const int nt = tk_threads(threads);
    (void)nt;
    TK_PARALLEL_FOR
    for (int64_t v = 0; v < nvox; ++v) {
        const uint8_t *mask = x + v * 2 * cb, *sign = mask + cb;
        float *o = out + v * classes;
        for (int64_t k = 0; k < classes; ++k) o[k] = bias[k];
        for (int64_t g = 0; g < cb; ++g) {
            const float *t = tables + (g * 65536 + (mask[g] | (int64_t)sign[g] << 8)) * classes;
            for (int64_t k = 0; k < classes; ++k) o[k] += t[k];
        }
    }
    return TK_OK;
}
