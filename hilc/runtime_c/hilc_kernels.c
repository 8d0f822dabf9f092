/* hilc portable int8 kernels: see hilc_kernels.h. Bit-exact with the Python simulator. */
#include "hilc_kernels.h"

#include "hilc_arith.h"
#include "hilc_dsp.h"

/* Portable kernels (the Cortex-M3 path; the DSP kernels unpack whole weight words into SIMD
 * lanes): packed 4/2-bit weight rows and/or packed 4-bit activations are read element by element
 * through hilc_weight_at / hilc_act4_at; at width 8 these helpers are plain loads and stores.
 * Generated code runs sub-byte layers through the faster column kernels below instead
 * (hilc_conv2d_s8_col); these element-wise ones need no scratch and stay the reference. */
static inline int32_t w_at(const int8_t *row, int32_t i, int32_t bits) {
    return hilc_packed(bits) ? hilc_weight_at(row, i, bits) : row[i];
}

static inline int32_t x_at(const int8_t *in, int32_t i, int32_t bits) {
    return bits == 4 ? hilc_act4_at(in, i) : in[i];
}

static inline void y_put(int8_t *out, int32_t i, int32_t bits, int8_t v) {
    if (bits == 4)
        hilc_act4_put(out, i, v);
    else
        out[i] = v;
}

static int32_t is_generic(int32_t weight_bits, int32_t in_bits, int32_t out_bits) {
    return hilc_packed(weight_bits) || in_bits == 4 || out_bits == 4;
}

/* One body for the portable conv (and one for dense), int8 and sub-byte. `sub` is a literal at
 * both call sites: with sub = 0 the widths are the constant 8, so w_at / x_at / y_put fold to plain
 * int8 loads and stores and that instance compiles to the former int8 loop (its inner loop is the
 * same 6 instructions on Cortex-M3/M4, no per-element width test). The helpers stay plain
 * `inline`: forced in as well, they make gcc lay out the sub-byte instance worse (resnet8 mixed
 * on qemu-mps2-an385: 312.6M instructions instead of 303.1M). */
static HILC_ALWAYS_INLINE void conv2d_portable(const hilc_conv_params *p, const int8_t *in, int8_t *out,
                                               const int32_t sub) {
    const int32_t cg = p->group_in, og = p->group_out;
    const int32_t wb = sub ? p->weight_bits : 8, ib = sub ? p->in_bits : 8, ob = sub ? p->out_bits : 8;
    const int32_t stride = hilc_packed(wb) ? p->weight_stride : p->k_h * p->k_w * cg;
    for (int32_t oy = 0; oy < p->out_h; oy++) {
        for (int32_t ox = 0; ox < p->out_w; ox++) {
            const int32_t o = (oy * p->out_w + ox) * p->out_c;
            for (int32_t g = 0, oc = 0; g < p->groups; g++) {
                for (int32_t j = 0; j < og; j++, oc++) {
                    const int8_t *row = p->weight + oc * stride;
                    int32_t acc = p->bias[oc];
                    for (int32_t ky = 0; ky < p->k_h; ky++) {
                        const int32_t iy = oy * p->stride_h - p->pad_t + ky * p->dil_h;
                        if (iy < 0 || iy >= p->in_h) continue; /* padding is real 0: x - zp = 0 */
                        for (int32_t kx = 0; kx < p->k_w; kx++) {
                            const int32_t ix = ox * p->stride_w - p->pad_l + kx * p->dil_w;
                            if (ix < 0 || ix >= p->in_w) continue;
                            const int32_t xi = (iy * p->in_w + ix) * p->in_c + g * cg;
                            const int32_t pos = (ky * p->k_w + kx) * cg;
                            for (int32_t ic = 0; ic < cg; ic++)
                                acc += (x_at(in, xi + ic, ib) - p->zp_in) * w_at(row, pos + ic, wb);
                        }
                    }
                    y_put(out, o + oc, ob, hilc_requant(acc, p->mult[oc], p->shift[oc], p->zp_out, p->lo, p->hi));
                }
            }
        }
    }
}

static HILC_ALWAYS_INLINE void dense_portable(const hilc_dense_params *p, const int8_t *in, int8_t *out,
                                              const int32_t sub) {
    const int32_t wb = sub ? p->weight_bits : 8, ib = sub ? p->in_bits : 8, ob = sub ? p->out_bits : 8;
    const int32_t k = p->in_features, stride = hilc_packed(wb) ? p->weight_stride : k;
    for (int32_t r = 0; r < p->rows; r++) {
        for (int32_t o = 0; o < p->out_features; o++) {
            const int8_t *row = p->weight + o * stride;
            int32_t acc = p->bias[o];
            for (int32_t i = 0; i < k; i++) acc += (x_at(in, r * k + i, ib) - p->zp_in) * w_at(row, i, wb);
            y_put(out, r * p->out_features + o, ob,
                  hilc_requant(acc, p->mult[o], p->shift[o], p->zp_out, p->lo, p->hi));
        }
    }
}

/* Portable sub-byte kernels with a column (the Cortex-M3 path when the model has sub-byte layers):
 * per output pixel and group one int16 column of (x - zp) (0 in the padding; packed 4-bit inputs
 * unpacked once here, not once per output channel), then per output channel a dot product that
 * loads one word of weights and takes its lanes with constant-position signed bit-field extracts
 * (one SBFX each on ARMv7-M): a multiply-accumulate costs a halfword load, an extract and an MLA,
 * whatever the weight width. Same integers as conv2d_portable; `col` holds k int16. Portable
 * builds reach them through hilc_conv2d / hilc_dense. */
static inline int32_t sbits(uint32_t u, int32_t lsb, int32_t width) {
    return (int32_t)(u << (32 - lsb - width)) >> (32 - width);
}

/* acc + sum_i col[i] * w[i], w a row of int8 (BITS 8) or packed weights (BITS 4, 2: byte j of a
 * word holds weights j, 4+j, 8+j, 12+j from its top bits down, hilc_arith.h). BITS a literal; the
 * lanes are written out (gcc -O2 does not unroll the loop over them), so each lane's position is
 * a constant and its term is LDRSH, SBFX (or ASR), MLA. */
#define HILC_COL_LANE(BITS, s, j) acc += c[4 * (s) + (j)] * sbits(u, 8 * (j) + 8 - (BITS) * ((s) + 1), (BITS))
#define HILC_COL_LANES4(BITS, s)                                                                         \
    do {                                                                                                 \
        HILC_COL_LANE(BITS, s, 0);                                                                       \
        HILC_COL_LANE(BITS, s, 1);                                                                       \
        HILC_COL_LANE(BITS, s, 2);                                                                       \
        HILC_COL_LANE(BITS, s, 3);                                                                       \
    } while (0)
#define HILC_DEFINE_DOT_COL(BITS)                                                                      \
    static int32_t dot_col_##BITS(const int16_t *col, const int8_t *row, int32_t k, int32_t acc) {     \
        int32_t i = 0;                                                                                 \
        for (; i + 32 / (BITS) <= k; i += 32 / (BITS)) {                                               \
            const int16_t *c = col + i;                                                                \
            uint32_t u;                                                                                \
            memcpy(&u, row + (i >> ((BITS) == 8 ? 0 : (BITS) == 4 ? 1 : 2)), 4);                       \
            HILC_COL_LANES4(BITS, 0);                                                                  \
            if ((BITS) <= 4) HILC_COL_LANES4(BITS, 1);                                                 \
            if ((BITS) == 2) {                                                                         \
                HILC_COL_LANES4(BITS, 2);                                                              \
                HILC_COL_LANES4(BITS, 3);                                                              \
            }                                                                                          \
        }                                                                                              \
        for (; i < k; i++) acc += col[i] * ((BITS) == 8 ? row[i] : hilc_weight_at(row, i, BITS));     \
        return acc;                                                                                    \
    }

HILC_DEFINE_DOT_COL(8)
HILC_DEFINE_DOT_COL(4)
HILC_DEFINE_DOT_COL(2)

static inline int32_t dot_col(const int16_t *col, const int8_t *row, int32_t k, int32_t bits, int32_t acc) {
    return bits == 4 ? dot_col_4(col, row, k, acc) : bits == 2 ? dot_col_2(col, row, k, acc) : dot_col_8(col, row, k, acc);
}

/* col[0..n) = x - zp for n activations from element xi of `in` (packed 4-bit when bits == 4). */
static inline void col_fill(int16_t *col, const int8_t *in, int32_t xi, int32_t n, int32_t bits, int32_t zp) {
    int32_t i = 0;
    if (bits == 4) {
        if (xi & 1) { col[0] = (int16_t)(hilc_act4_at(in, xi) - zp); i = 1; }
        const uint8_t *xb = (const uint8_t *)in + ((xi + i) >> 1);
        for (; i + 2 <= n; i += 2) { /* two channels per byte load */
            const uint32_t b = *xb++;
            col[i] = (int16_t)(((int32_t)(int8_t)(uint8_t)(b << 4) >> 4) - zp);
            col[i + 1] = (int16_t)(((int32_t)(int8_t)(uint8_t)b >> 4) - zp);
        }
        if (i < n) col[i] = (int16_t)(hilc_act4_at(in, xi + i) - zp);
    } else {
        for (; i < n; i++) col[i] = (int16_t)(in[xi + i] - zp);
    }
}

void hilc_conv2d_s8_col(const hilc_conv_params *p, const int8_t *in, int8_t *out, int16_t *col) {
    const int32_t cg = p->group_in, og = p->group_out, k = p->k_h * p->k_w * cg;
    const int32_t wb = hilc_packed(p->weight_bits) ? p->weight_bits : 8;
    const int32_t stride = wb != 8 ? p->weight_stride : k;
    for (int32_t oy = 0; oy < p->out_h; oy++) {
        for (int32_t ox = 0; ox < p->out_w; ox++) {
            const int32_t o = (oy * p->out_w + ox) * p->out_c;
            for (int32_t g = 0, oc = 0; g < p->groups; g++) {
                int32_t pos = 0;
                for (int32_t ky = 0; ky < p->k_h; ky++) {
                    const int32_t iy = oy * p->stride_h - p->pad_t + ky * p->dil_h;
                    for (int32_t kx = 0; kx < p->k_w; kx++, pos += cg) {
                        const int32_t ix = ox * p->stride_w - p->pad_l + kx * p->dil_w;
                        if (iy < 0 || iy >= p->in_h || ix < 0 || ix >= p->in_w) /* padding is real 0 */
                            for (int32_t ic = 0; ic < cg; ic++) col[pos + ic] = 0;
                        else
                            col_fill(col + pos, in, (iy * p->in_w + ix) * p->in_c + g * cg, cg, p->in_bits, p->zp_in);
                    }
                }
                for (int32_t j = 0; j < og; j++, oc++) {
                    const int32_t acc = dot_col(col, p->weight + oc * stride, k, wb, p->bias[oc]);
                    y_put(out, o + oc, p->out_bits, hilc_requant(acc, p->mult[oc], p->shift[oc], p->zp_out, p->lo, p->hi));
                }
            }
        }
    }
}

void hilc_dense_s8_col(const hilc_dense_params *p, const int8_t *in, int8_t *out, int16_t *col) {
    const int32_t k = p->in_features, wb = hilc_packed(p->weight_bits) ? p->weight_bits : 8;
    const int32_t stride = wb != 8 ? p->weight_stride : k;
    for (int32_t r = 0; r < p->rows; r++) {
        col_fill(col, in, r * k, k, p->in_bits, p->zp_in);
        for (int32_t o = 0; o < p->out_features; o++) {
            const int32_t acc = dot_col(col, p->weight + o * stride, k, wb, p->bias[o]);
            y_put(out, r * p->out_features + o, p->out_bits,
                  hilc_requant(acc, p->mult[o], p->shift[o], p->zp_out, p->lo, p->hi));
        }
    }
}

void hilc_conv2d_s8(const hilc_conv_params *p, const int8_t *in, int8_t *out) {
    if (is_generic(p->weight_bits, p->in_bits, p->out_bits))
        conv2d_portable(p, in, out, 1);
    else
        conv2d_portable(p, in, out, 0);
}

void hilc_dense_s8(const hilc_dense_params *p, const int8_t *in, int8_t *out) {
    if (is_generic(p->weight_bits, p->in_bits, p->out_bits))
        dense_portable(p, in, out, 1);
    else
        dense_portable(p, in, out, 0);
}

/* DSP conv: per output pixel and group, one int16 column of (x - zp) (0 in the padding), then a
 * SMLAD dot product per output channel. Depthwise (group_in == 1) gathers the taps of one channel;
 * 1x1 (pointwise) columns are just the pixel's channels. Same integers as the portable kernel. */
void hilc_conv2d_s8_dsp(const hilc_conv_params *p, const int8_t *in, int8_t *out, int16_t *col) {
    const int32_t cg = p->group_in, og = p->group_out;
    const int32_t k = p->k_h * p->k_w * cg, k4 = k & ~3;
    const int32_t packed = hilc_packed(p->weight_bits);
    for (int32_t oy = 0; oy < p->out_h; oy++) {
        for (int32_t ox = 0; ox < p->out_w; ox++) {
            const int32_t o = (oy * p->out_w + ox) * p->out_c;
            for (int32_t g = 0, oc = 0; g < p->groups; g++) {
                int32_t pos = 0;
                for (int32_t ky = 0; ky < p->k_h; ky++) {
                    const int32_t iy = oy * p->stride_h - p->pad_t + ky * p->dil_h;
                    for (int32_t kx = 0; kx < p->k_w; kx++) {
                        const int32_t ix = ox * p->stride_w - p->pad_l + kx * p->dil_w;
                        if (iy < 0 || iy >= p->in_h || ix < 0 || ix >= p->in_w) {
                            for (int32_t ic = 0; ic < cg; ic++, pos++) col[hilc_col_slot(pos, k4)] = 0;
                        } else if (p->in_bits == 4) { /* packed 4-bit input: im2col unpacks it */
                            const int32_t xi = (iy * p->in_w + ix) * p->in_c + g * cg;
                            int32_t ic = 0;
                            if ((xi & 1) == 0) { /* byte-aligned run: two channels per byte load */
                                const uint8_t *xb = (const uint8_t *)in + (xi >> 1);
                                for (; ic + 2 <= cg; ic += 2, pos += 2) {
                                    const uint32_t b = *xb++;
                                    col[hilc_col_slot(pos, k4)] = (int16_t)(((int32_t)(int8_t)(uint8_t)(b << 4) >> 4) - p->zp_in);
                                    col[hilc_col_slot(pos + 1, k4)] = (int16_t)(((int32_t)(int8_t)(uint8_t)b >> 4) - p->zp_in);
                                }
                            }
                            for (; ic < cg; ic++, pos++)
                                col[hilc_col_slot(pos, k4)] = (int16_t)(hilc_act4_at(in, xi + ic) - p->zp_in);
                        } else {
                            const int8_t *x = in + (iy * p->in_w + ix) * p->in_c + g * cg;
                            for (int32_t ic = 0; ic < cg; ic++, pos++)
                                col[hilc_col_slot(pos, k4)] = (int16_t)(x[ic] - p->zp_in);
                        }
                    }
                }
                for (int32_t j = 0; j < og; j++, oc++) {
                    const int32_t acc = packed ? p->bias[oc] + hilc_dot_s16_packed(col, p->weight + oc * p->weight_stride, k,
                                                                                   p->weight_bits)
                                               : hilc_dot_s16_s8(col, p->weight + oc * k, k, p->bias[oc]);
                    const int8_t y = hilc_requant(acc, p->mult[oc], p->shift[oc], p->zp_out, p->lo, p->hi);
                    if (p->out_bits == 4)
                        hilc_act4_put(out, o + oc, y);
                    else
                        out[o + oc] = y;
                }
            }
        }
    }
}

void hilc_dense_s8_dsp(const hilc_dense_params *p, const int8_t *in, int8_t *out, int16_t *col) {
    const int32_t k = p->in_features, k4 = k & ~3;
    const int32_t packed = hilc_packed(p->weight_bits);
    for (int32_t r = 0; r < p->rows; r++) {
        const int8_t *x = in + r * k;
        if (p->in_bits == 4)
            for (int32_t i = 0; i < k; i++) col[hilc_col_slot(i, k4)] = (int16_t)(hilc_act4_at(in, r * k + i) - p->zp_in);
        else
            for (int32_t i = 0; i < k; i++) col[hilc_col_slot(i, k4)] = (int16_t)(x[i] - p->zp_in);
        for (int32_t o = 0; o < p->out_features; o++) {
            const int32_t acc = packed ? p->bias[o] + hilc_dot_s16_packed(col, p->weight + o * p->weight_stride, k,
                                                                          p->weight_bits)
                                       : hilc_dot_s16_s8(col, p->weight + o * k, k, p->bias[o]);
            const int8_t y = hilc_requant(acc, p->mult[o], p->shift[o], p->zp_out, p->lo, p->hi);
            if (p->out_bits == 4)
                hilc_act4_put(out, r * p->out_features + o, y);
            else
                out[r * p->out_features + o] = y;
        }
    }
}

#if !HILC_DSP
/* packed (4- or 2-bit) weights, or a 4-bit map in or out */
static int subbyte(int32_t weight_bits, int32_t in_bits, int32_t out_bits) {
    return weight_bits == 4 || weight_bits == 2 || in_bits == 4 || out_bits == 4;
}
#endif

void hilc_conv2d(const hilc_conv_params *p, const int8_t *in, int8_t *out, int16_t *col) {
#if HILC_DSP
    hilc_conv2d_s8_dsp(p, in, out, col);
#else
    /* The column kernel unpacks packed weights and 4-bit maps once per pixel instead of once per
     * MAC, so sub-byte layers always take it; int8 layers too (one word load gives four weights,
     * LDRSH + extract + MLA per MAC instead of the element loop's ~6 instructions) once the column
     * is shared by at least two output channels: a depthwise layer (one channel per group) would
     * fill a column for a single dot product. A caller without scratch keeps the element loop. */
    if (col && (p->group_out >= 2 || subbyte(p->weight_bits, p->in_bits, p->out_bits)))
        hilc_conv2d_s8_col(p, in, out, col);
    else
        hilc_conv2d_s8(p, in, out);
#endif
}

void hilc_dense(const hilc_dense_params *p, const int8_t *in, int8_t *out, int16_t *col) {
#if HILC_DSP
    hilc_dense_s8_dsp(p, in, out, col);
#else
    if (col && (p->out_features >= 2 || subbyte(p->weight_bits, p->in_bits, p->out_bits))) /* as hilc_conv2d */
        hilc_dense_s8_col(p, in, out, col);
    else
        hilc_dense_s8(p, in, out);
#endif
}

void hilc_dwconv_inplace_s8(const hilc_conv_params *p, int8_t *buf, int8_t *plane) {
    const int32_t hw = p->in_h * p->in_w, c_n = p->in_c;
    for (int32_t c = 0; c < c_n; c++) {
        for (int32_t i = 0; i < hw; i++) plane[i] = buf[i * c_n + c];
        for (int32_t oy = 0; oy < p->out_h; oy++) {
            for (int32_t ox = 0; ox < p->out_w; ox++) {
                int32_t acc = p->bias[c];
                for (int32_t ky = 0; ky < p->k_h; ky++) {
                    const int32_t iy = oy * p->stride_h - p->pad_t + ky * p->dil_h;
                    if (iy < 0 || iy >= p->in_h) continue; /* padding is real 0: x - zp = 0 */
                    for (int32_t kx = 0; kx < p->k_w; kx++) {
                        const int32_t ix = ox * p->stride_w - p->pad_l + kx * p->dil_w;
                        if (ix < 0 || ix >= p->in_w) continue;
                        acc += (plane[iy * p->in_w + ix] - p->zp_in) * p->weight[(c * p->k_h + ky) * p->k_w + kx];
                    }
                }
                buf[(oy * p->out_w + ox) * c_n + c] = hilc_requant(acc, p->mult[c], p->shift[c], p->zp_out, p->lo, p->hi);
            }
        }
    }
}

void hilc_maxpool_s8(const hilc_pool_params *p, const int8_t *in, int8_t *out) {
    for (int32_t oy = 0; oy < p->out_h; oy++) {
        for (int32_t ox = 0; ox < p->out_w; ox++) {
            for (int32_t c = 0; c < p->c; c++) {
                int32_t m = -128;
                for (int32_t ky = 0; ky < p->k_h; ky++) {
                    const int32_t iy = oy * p->stride_h - p->pad_t + ky * p->dil_h;
                    if (iy < 0 || iy >= p->in_h) continue;
                    for (int32_t kx = 0; kx < p->k_w; kx++) {
                        const int32_t ix = ox * p->stride_w - p->pad_l + kx * p->dil_w;
                        if (ix < 0 || ix >= p->in_w) continue;
                        const int32_t v = in[(iy * p->in_w + ix) * p->c + c];
                        if (v > m) m = v;
                    }
                }
                out[(oy * p->out_w + ox) * p->c + c] = (int8_t)m;
            }
        }
    }
}

static int32_t span(int32_t start, int32_t len, int32_t lo, int32_t hi) {
    const int32_t a = start > lo ? start : lo, b = start + len < hi ? start + len : hi;
    return b > a ? b - a : 0;
}

void hilc_avgpool_s8(const hilc_pool_params *p, const int8_t *in, int8_t *out) {
    for (int32_t oy = 0; oy < p->out_h; oy++) {
        const int32_t y0 = oy * p->stride_h - p->pad_t;
        for (int32_t ox = 0; ox < p->out_w; ox++) {
            const int32_t x0 = ox * p->stride_w - p->pad_l;
            int32_t count;
            if (p->count_include_pad)
                count = span(y0, p->k_h, -p->pad_t, p->in_h + p->pad_b) * span(x0, p->k_w, -p->pad_l, p->in_w + p->pad_r);
            else
                count = span(y0, p->k_h, 0, p->in_h) * span(x0, p->k_w, 0, p->in_w);
            int32_t i = 0;
            while (i < p->n_counts - 1 && p->counts[i] != count) i++;
            for (int32_t c = 0; c < p->c; c++) {
                int32_t acc = 0;
                for (int32_t ky = 0; ky < p->k_h; ky++) {
                    const int32_t iy = y0 + ky;
                    if (iy < 0 || iy >= p->in_h) continue;
                    for (int32_t kx = 0; kx < p->k_w; kx++) {
                        const int32_t ix = x0 + kx;
                        if (ix < 0 || ix >= p->in_w) continue;
                        acc += in[(iy * p->in_w + ix) * p->c + c] - p->zp_in;
                    }
                }
                out[(oy * p->out_w + ox) * p->c + c] = hilc_requant(acc, p->mult[i], p->shift[i], p->zp_out, p->lo, p->hi);
            }
        }
    }
}

/* Walk a broadcast 4-D index space, calling BODY with the flat output index and both input offsets. */
#define HILC_BROADCAST_LOOP(p, BODY)                                                                      \
    do {                                                                                                  \
        int32_t idx = 0;                                                                                  \
        for (int32_t i0 = 0; i0 < (p)->dims[0]; i0++)                                                     \
            for (int32_t i1 = 0; i1 < (p)->dims[1]; i1++)                                                 \
                for (int32_t i2 = 0; i2 < (p)->dims[2]; i2++)                                             \
                    for (int32_t i3 = 0; i3 < (p)->dims[3]; i3++, idx++) {                                \
                        const int32_t ia = i0 * (p)->a_strides[0] + i1 * (p)->a_strides[1] +              \
                                           i2 * (p)->a_strides[2] + i3 * (p)->a_strides[3];               \
                        const int32_t ib = i0 * (p)->b_strides[0] + i1 * (p)->b_strides[1] +              \
                                           i2 * (p)->b_strides[2] + i3 * (p)->b_strides[3];               \
                        BODY;                                                                             \
                    }                                                                                     \
    } while (0)

void hilc_add_s8(const hilc_binary_params *p, const int8_t *a, const int8_t *b, int8_t *out) {
    HILC_BROADCAST_LOOP(p, {
        const int64_t acc = (int64_t)p->sign_a * p->mult_a * (a[ia] - p->zp_a) +
                            (int64_t)p->sign_b * p->mult_b * (b[ib] - p->zp_b);
        out[idx] = (int8_t)hilc_clamp(hilc_round_shift(acc, p->shift) + p->zp_out, p->lo, p->hi);
    });
}

void hilc_mul_s8(const hilc_binary_params *p, const int8_t *a, const int8_t *b, int8_t *out) {
    HILC_BROADCAST_LOOP(p, {
        const int32_t prod = (a[ia] - p->zp_a) * (b[ib] - p->zp_b);
        out[idx] = hilc_requant(prod, p->mult, p->shift, p->zp_out, p->lo, p->hi);
    });
}

void hilc_clamp_s8(int32_t n, int32_t lo, int32_t hi, const int8_t *in, int8_t *out) {
    for (int32_t i = 0; i < n; i++) out[i] = (int8_t)hilc_clamp(in[i], lo, hi);
}

void hilc_requant_s8(int32_t n, int32_t zp_in, int32_t mult, int32_t shift, int32_t zp_out, int32_t lo, int32_t hi,
                     const int8_t *in, int8_t *out) {
    for (int32_t i = 0; i < n; i++) out[i] = hilc_requant(in[i] - zp_in, mult, shift, zp_out, lo, hi);
}

void hilc_lut_s8(int32_t n, const int8_t *table, const int8_t *in, int8_t *out) {
    for (int32_t i = 0; i < n; i++) out[i] = table[in[i] + 128];
}

/* Softmax: exp table, integer sum, Newton-Raphson reciprocal (hilc/compiler/ops/softmax.py). */
#define HILC_NR_C1 3031741621LL /* round(48/17 * 2^30) */
#define HILC_NR_C2 2021161080LL /* round(32/17 * 2^30) */

void hilc_softmax_s8(const hilc_softmax_params *p, const int8_t *in, int8_t *out) {
    for (int32_t o = 0; o < p->outer; o++) {
        for (int32_t i = 0; i < p->inner; i++) {
            const int8_t *x = in + o * p->len * p->inner + i;
            int8_t *y = out + o * p->len * p->inner + i;
            int32_t mx = -128;
            for (int32_t k = 0; k < p->len; k++) if (x[k * p->inner] > mx) mx = x[k * p->inner];
            int32_t sum = 0;
            for (int32_t k = 0; k < p->len; k++) sum += p->exp_table[mx - x[k * p->inner]];
            const int32_t n = hilc_bit_length((uint32_t)sum);
            const int64_t a = (int64_t)sum << (31 - n);
            int64_t r = HILC_NR_C1 - ((HILC_NR_C2 * a) >> 31);
            for (int32_t step = 0; step < 3; step++) {
                const int64_t t = (a * r) >> 31;
                r = (r * (((int64_t)1 << 31) - t)) >> 30;
            }
            for (int32_t k = 0; k < p->len; k++) {
                const int64_t e = p->exp_table[mx - x[k * p->inner]];
                y[k * p->inner] = (int8_t)hilc_clamp(hilc_round_shift(e * r * p->k, n + 30) + p->zp_out, -128, 127);
            }
        }
    }
}

void hilc_concat_s8(const hilc_concat_params *p, int8_t *out) {
    int32_t out_len = 0;
    for (int32_t j = 0; j < p->n_inputs; j++) out_len += p->inputs[j].axis_len;
    int32_t offset = 0;
    for (int32_t j = 0; j < p->n_inputs; j++) {
        const hilc_concat_input *in = &p->inputs[j];
        const int32_t block = in->axis_len * p->inner;
        for (int32_t o = 0; o < p->outer; o++) {
            const int8_t *src = in->data + o * block;
            int8_t *dst = out + o * out_len * p->inner + offset * p->inner;
            for (int32_t k = 0; k < block; k++)
                dst[k] = hilc_requant(src[k] - in->zp_in, in->mult, in->shift, p->zp_out, p->lo, p->hi);
        }
        offset += in->axis_len;
    }
}

void hilc_transpose_s8(const hilc_transpose_params *p, const int8_t *in, int8_t *out) {
    int32_t in_strides[HILC_MAX_DIMS], out_dims[HILC_MAX_DIMS];
    in_strides[HILC_MAX_DIMS - 1] = 1;
    for (int32_t d = HILC_MAX_DIMS - 2; d >= 0; d--) in_strides[d] = in_strides[d + 1] * p->in_dims[d + 1];
    for (int32_t d = 0; d < HILC_MAX_DIMS; d++) out_dims[d] = p->in_dims[p->perm[d]];
    int32_t idx = 0;
    for (int32_t i0 = 0; i0 < out_dims[0]; i0++)
        for (int32_t i1 = 0; i1 < out_dims[1]; i1++)
            for (int32_t i2 = 0; i2 < out_dims[2]; i2++)
                for (int32_t i3 = 0; i3 < out_dims[3]; i3++, idx++)
                    out[idx] = in[i0 * in_strides[p->perm[0]] + i1 * in_strides[p->perm[1]] +
                                  i2 * in_strides[p->perm[2]] + i3 * in_strides[p->perm[3]]];
}

/* Source coordinate of output coordinate i along an axis of length n padded by `before`; -1 means "pad value". */
static int32_t pad_source(int32_t i, int32_t before, int32_t n, int32_t mode) {
    int32_t s = i - before;
    if (s >= 0 && s < n) return s;
    if (mode == 0) return -1;
    if (mode == 1 || n == 1) return s < 0 ? 0 : n - 1;
    while (s < 0 || s >= n) s = s < 0 ? -s : 2 * (n - 1) - s; /* reflect, edge not repeated */
    return s;
}

void hilc_pad_s8(const hilc_pad_params *p, const int8_t *in, int8_t *out) {
    int32_t od[HILC_MAX_DIMS], st[HILC_MAX_DIMS];
    for (int32_t d = 0; d < HILC_MAX_DIMS; d++) od[d] = p->before[d] + p->in_dims[d] + p->after[d];
    st[HILC_MAX_DIMS - 1] = 1;
    for (int32_t d = HILC_MAX_DIMS - 2; d >= 0; d--) st[d] = st[d + 1] * p->in_dims[d + 1];
    int32_t idx = 0;
    for (int32_t i0 = 0; i0 < od[0]; i0++)
        for (int32_t i1 = 0; i1 < od[1]; i1++)
            for (int32_t i2 = 0; i2 < od[2]; i2++)
                for (int32_t i3 = 0; i3 < od[3]; i3++, idx++) {
                    const int32_t s0 = pad_source(i0, p->before[0], p->in_dims[0], p->mode);
                    const int32_t s1 = pad_source(i1, p->before[1], p->in_dims[1], p->mode);
                    const int32_t s2 = pad_source(i2, p->before[2], p->in_dims[2], p->mode);
                    const int32_t s3 = pad_source(i3, p->before[3], p->in_dims[3], p->mode);
                    out[idx] = (s0 < 0 || s1 < 0 || s2 < 0 || s3 < 0)
                                   ? (int8_t)p->value
                                   : in[s0 * st[0] + s1 * st[1] + s2 * st[2] + s3 * st[3]];
                }
}

void hilc_copy_s8(int32_t n, const int8_t *in, int8_t *out) {
    if (in == out) return;
    for (int32_t i = 0; i < n; i++) out[i] = in[i];
}

/* --- transformers -------------------------------------------------------------------------- */

void hilc_matmul_s8(const hilc_matmul_params *p, const int8_t *a, const int8_t *b, int8_t *out) {
    for (int32_t t = 0; t < p->batch; t++) {
        const int8_t *at = a + t * p->m * p->k, *bt = b + t * p->n * p->k;
        int8_t *ot = out + t * p->m * p->n;
        for (int32_t i = 0; i < p->m; i++) {
            for (int32_t j = 0; j < p->n; j++) {
                int32_t acc = 0;
                for (int32_t k = 0; k < p->k; k++) acc += (at[i * p->k + k] - p->zp_a) * (bt[j * p->k + k] - p->zp_b);
                ot[i * p->n + j] = hilc_requant(acc, p->mult, p->shift, p->zp_out, p->lo, p->hi);
            }
        }
    }
}

/* sum_k (a - zp_a)(b - zp_b) = sum_k (a - zp_a) * b - zp_b * sum_k (a - zp_a): the raw int8 rows of b
 * go through SXTB16 like weights, two multiply-accumulates per SMLAD. */
void hilc_matmul_s8_dsp(const hilc_matmul_params *p, const int8_t *a, const int8_t *b, int8_t *out, int16_t *col) {
    const int32_t k = p->k, k4 = k & ~3;
    for (int32_t t = 0; t < p->batch; t++) {
        const int8_t *at = a + t * p->m * k, *bt = b + t * p->n * k;
        int8_t *ot = out + t * p->m * p->n;
        for (int32_t i = 0; i < p->m; i++) {
            int32_t sum_a = 0;
            for (int32_t q = 0; q < k; q++) {
                const int32_t d = at[i * k + q] - p->zp_a;
                col[hilc_col_slot(q, k4)] = (int16_t)d;
                sum_a += d;
            }
            const int32_t offset = -p->zp_b * sum_a;
            for (int32_t j = 0; j < p->n; j++) {
                const int32_t acc = hilc_dot_s16_s8(col, bt + j * k, k, offset);
                ot[i * p->n + j] = hilc_requant(acc, p->mult, p->shift, p->zp_out, p->lo, p->hi);
            }
        }
    }
}

void hilc_matmul(const hilc_matmul_params *p, const int8_t *a, const int8_t *b, int8_t *out, int16_t *col) {
#if HILC_DSP
    hilc_matmul_s8_dsp(p, a, b, out, col);
#else
    (void)col;
    hilc_matmul_s8(p, a, b, out);
#endif
}

static int32_t hilc_bit_length64(uint64_t v) {
    const uint32_t hi = (uint32_t)(v >> 32);
    return hi ? 32 + hilc_bit_length(hi) : hilc_bit_length((uint32_t)v);
}

/* floor(sqrt(v)) for 0 <= v < 2^62, digit by digit: shifts, adds and compares only. */
static int64_t hilc_isqrt62(int64_t v) {
    int64_t res = 0, bit = (int64_t)1 << 60;
    for (int32_t i = 0; i < 31; i++) {
        const int64_t t = res + bit;
        if (v >= t) {
            v -= t;
            res = (res >> 1) + bit;
        } else {
            res >>= 1;
        }
        bit >>= 2;
    }
    return res;
}

/* LayerNorm (hilc/compiler/ops/layernorm.py): c_i = n*d_i - sum d, V = sum c^2 + eps,
 * 1/sqrt(V) by isqrt of V normalised to [2^60, 2^62) and the Newton-Raphson reciprocal. */
void hilc_layernorm_s8(const hilc_layernorm_params *p, const int8_t *in, int8_t *out) {
    const int32_t n = p->n;
    for (int32_t r = 0; r < p->rows; r++) {
        const int8_t *x = in + r * n;
        int8_t *y = out + r * n;
        int32_t s = 0;
        for (int32_t i = 0; i < n; i++) s += x[i] - p->zp_in;
        int64_t v = p->eps;
        for (int32_t i = 0; i < n; i++) {
            const int64_t c = (int64_t)n * (x[i] - p->zp_in) - s;
            v += c * c;
        }
        const int32_t k = (62 - hilc_bit_length64((uint64_t)v)) >> 1;
        const int64_t a = hilc_isqrt62(v << (2 * k)); /* in [2^30, 2^31) */
        int64_t inv = HILC_NR_C1 - ((HILC_NR_C2 * a) >> 31);
        for (int32_t step = 0; step < 3; step++) {
            const int64_t t = (a * inv) >> 31;
            inv = (inv * (((int64_t)1 << 31) - t)) >> 30;
        }
        for (int32_t i = 0; i < n; i++) {
            const int64_t c = (int64_t)n * (x[i] - p->zp_in) - s;
            const int64_t z = hilc_round_shift(c * inv, 37 - k); /* Q24 of c / sqrt(V) */
            const int64_t q = hilc_round_shift(z * p->mult[i] + p->bias[i], p->shift[i]) + p->zp_out;
            y[i] = (int8_t)hilc_clamp(q, p->lo, p->hi);
        }
    }
}

void hilc_reduce_mean_s8(const hilc_reduce_params *p, const int8_t *in, int8_t *out) {
    for (int32_t o = 0; o < p->outer; o++) {
        for (int32_t i = 0; i < p->inner; i++) {
            const int8_t *x = in + o * p->len * p->inner + i;
            int32_t acc = 0;
            for (int32_t k = 0; k < p->len; k++) acc += x[k * p->inner] - p->zp_in;
            out[o * p->inner + i] = hilc_requant(acc, p->mult, p->shift, p->zp_out, p->lo, p->hi);
        }
    }
}

void hilc_embedding_s8(int32_t n_tokens, int32_t d, const int32_t *index, const int8_t *table, const int8_t *in,
                       int8_t *out) {
    for (int32_t t = 0; t < n_tokens; t++) {
        const int8_t *row = table + index[in[t] + 128] * d;
        for (int32_t i = 0; i < d; i++) out[t * d + i] = row[i];
    }
}

void hilc_gather_s8(int32_t outer, int32_t len, int32_t inner, int32_t n_idx, const int32_t *indices, const int8_t *in,
                    int8_t *out) {
    for (int32_t o = 0; o < outer; o++)
        for (int32_t j = 0; j < n_idx; j++)
            for (int32_t i = 0; i < inner; i++)
                *out++ = in[(o * len + indices[j]) * inner + i];
}
