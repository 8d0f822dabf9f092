/* hilc portable int8 kernels (C99). Layout: feature maps NHWC with the batch axis dropped
 * (the firmware runs one sample), conv weights OHWI, dense weights [out][in].
 * Every kernel follows hilc_arith.h exactly; the Python simulator is the reference.
 * No heap, no float, no division. */
#ifndef HILC_KERNELS_H
#define HILC_KERNELS_H

#include <stdint.h>

#define HILC_MAX_DIMS 4 /* non-batch axes of an elementwise / transpose / pad tensor */

/* HILC_DSP selects the SMLAD kernels for conv, depthwise, pointwise and dense: on by default where
 * the CPU has the DSP extension (Cortex-M4/M7), off elsewhere (Cortex-M3, portable C). Building
 * with -DHILC_DSP=1 on a host runs the same kernels through exact C stand-ins (hilc_dsp.h). */
#ifndef HILC_DSP
#if defined(__ARM_FEATURE_DSP) && __ARM_FEATURE_DSP
#define HILC_DSP 1
#else
#define HILC_DSP 0
#endif
#endif

typedef struct {
    int32_t in_h, in_w, in_c, out_h, out_w, out_c;
    int32_t k_h, k_w, stride_h, stride_w, dil_h, dil_w, pad_t, pad_l;
    int32_t groups, group_in, group_out; /* channels per group, given so no kernel divides */
    int32_t zp_in, zp_out, lo, hi;
    const int8_t *weight;  /* [out_c][k_h][k_w][group_in] */
    const int32_t *bias;   /* [out_c], scale s_in * s_w */
    const int32_t *mult;   /* [out_c] dyadic b */
    const int8_t *shift;   /* [out_c] dyadic c */
    int32_t weight_bits;   /* 0/8: int8 rows of k_h*k_w*group_in; 4/2: packed rows (hilc_arith.h) */
    int32_t weight_stride; /* bytes from one output channel's row to the next */
    int32_t in_bits, out_bits; /* 0/8: int8 activations; 4: packed two to a byte (hilc_arith.h) */
} hilc_conv_params;

typedef struct {
    int32_t rows, in_features, out_features;
    int32_t zp_in, zp_out, lo, hi;
    const int8_t *weight;  /* [out_features][in_features] */
    const int32_t *bias;
    const int32_t *mult;
    const int8_t *shift;
    int32_t weight_bits;   /* as in hilc_conv_params */
    int32_t weight_stride;
    int32_t in_bits, out_bits;
} hilc_dense_params;

typedef struct {
    int32_t in_h, in_w, c, out_h, out_w;
    int32_t k_h, k_w, stride_h, stride_w, dil_h, dil_w, pad_t, pad_l, pad_b, pad_r;
    int32_t count_include_pad, zp_in, zp_out, lo, hi;
    int32_t n_counts;
    const int32_t *counts; /* the distinct window sizes, ascending */
    const int32_t *mult;   /* dyadic pair per window size */
    const int8_t *shift;
} hilc_pool_params;

/* Elementwise binary op with broadcasting: strides are in elements, 0 on broadcast axes. */
typedef struct {
    int32_t dims[HILC_MAX_DIMS];
    int32_t a_strides[HILC_MAX_DIMS], b_strides[HILC_MAX_DIMS];
    int32_t zp_a, zp_b, zp_out, lo, hi;
    int32_t mult_a, mult_b, sign_a, sign_b; /* add: acc = sa*ba*(a-za) + sb*bb*(b-zb) */
    int32_t mult, shift;                     /* add: shared shift; mul: y = (a-za)(b-zb) * mult >> shift */
} hilc_binary_params;

typedef struct {
    int32_t outer, len, inner; /* softmax over the middle axis */
    int32_t k, zp_out;         /* output scale 1/k */
    const int32_t *exp_table;  /* [256] round(2^16 * exp(-s_in * d)) */
} hilc_softmax_params;

typedef struct {
    int32_t axis_len, zp_in, mult, shift;
    const int8_t *data;
} hilc_concat_input;

typedef struct {
    int32_t outer, inner, n_inputs, zp_out, lo, hi;
    const hilc_concat_input *inputs;
} hilc_concat_params;

typedef struct {
    int32_t in_dims[HILC_MAX_DIMS];
    int32_t perm[HILC_MAX_DIMS];
} hilc_transpose_params;

typedef struct {
    int32_t in_dims[HILC_MAX_DIMS];
    int32_t before[HILC_MAX_DIMS], after[HILC_MAX_DIMS];
    int32_t mode; /* 0 constant, 1 edge, 2 reflect */
    int32_t value;
} hilc_pad_params;

void hilc_conv2d_s8(const hilc_conv_params *p, const int8_t *in, int8_t *out);
void hilc_dense_s8(const hilc_dense_params *p, const int8_t *in, int8_t *out);
/* DSP variants: `col` is scratch for one int16 im2col column (k_h * k_w * group_in, or in_features). */
void hilc_conv2d_s8_dsp(const hilc_conv_params *p, const int8_t *in, int8_t *out, int16_t *col);
void hilc_dense_s8_dsp(const hilc_dense_params *p, const int8_t *in, int8_t *out, int16_t *col);
/* The kernel the build selects (HILC_DSP); portable builds use the column kernels below when `col`
 * is given and the layer is sub-byte or shares the column by two or more output channels, else
 * the element-wise ones. */
void hilc_conv2d(const hilc_conv_params *p, const int8_t *in, int8_t *out, int16_t *col);
void hilc_dense(const hilc_dense_params *p, const int8_t *in, int8_t *out, int16_t *col);
/* Portable kernels for layers with packed weights and/or 4-bit activations: per output pixel (dense:
 * per row) one int16 column of x - zp in `col` (k_h * k_w * group_in, or in_features elements), then
 * word-wise dot products over the packed rows; same integers as hilc_conv2d_s8 / hilc_dense_s8. */
void hilc_conv2d_s8_col(const hilc_conv_params *p, const int8_t *in, int8_t *out, int16_t *col);
void hilc_dense_s8_col(const hilc_dense_params *p, const int8_t *in, int8_t *out, int16_t *col);
/* In-place depthwise conv (out shape == in shape, groups == channels): channel by channel, the input
 * plane is saved to `plane` (in_h * in_w bytes) and the output channel written over it in `buf`. */
void hilc_dwconv_inplace_s8(const hilc_conv_params *p, int8_t *buf, int8_t *plane);
void hilc_maxpool_s8(const hilc_pool_params *p, const int8_t *in, int8_t *out);
void hilc_avgpool_s8(const hilc_pool_params *p, const int8_t *in, int8_t *out);
void hilc_add_s8(const hilc_binary_params *p, const int8_t *a, const int8_t *b, int8_t *out);
void hilc_mul_s8(const hilc_binary_params *p, const int8_t *a, const int8_t *b, int8_t *out);
void hilc_clamp_s8(int32_t n, int32_t lo, int32_t hi, const int8_t *in, int8_t *out);
void hilc_requant_s8(int32_t n, int32_t zp_in, int32_t mult, int32_t shift, int32_t zp_out, int32_t lo, int32_t hi,
                     const int8_t *in, int8_t *out);
void hilc_lut_s8(int32_t n, const int8_t *table, const int8_t *in, int8_t *out);
void hilc_softmax_s8(const hilc_softmax_params *p, const int8_t *in, int8_t *out);
void hilc_concat_s8(const hilc_concat_params *p, int8_t *out);
void hilc_transpose_s8(const hilc_transpose_params *p, const int8_t *in, int8_t *out);
void hilc_pad_s8(const hilc_pad_params *p, const int8_t *in, int8_t *out);
void hilc_copy_s8(int32_t n, const int8_t *in, int8_t *out);

/* --- transformers (hilc/compiler/ops/matmul.py, layernorm.py, reduce.py) --- */
typedef struct {
    int32_t batch, m, k, n;      /* a [batch][m][k] times b^T, b stored [batch][n][k] */
    int32_t zp_a, zp_b, zp_out, mult, shift, lo, hi;
} hilc_matmul_params;

typedef struct {
    int32_t rows, n;             /* normalise each row of n values */
    int32_t zp_in, zp_out, lo, hi;
    int64_t eps;                 /* max(1, round(n^3 * epsilon / s_in^2)) */
    const int32_t *mult;         /* [n] signed dyadic b of gamma * sqrt(n) / (s_out * 2^24) */
    const int8_t *shift;         /* [n] dyadic c */
    const int64_t *bias;         /* [n] round(beta / s_out * 2^shift) */
} hilc_layernorm_params;

typedef struct {
    int32_t outer, len, inner;   /* mean over the middle axis */
    int32_t zp_in, zp_out, mult, shift, lo, hi;
} hilc_reduce_params;

void hilc_matmul_s8(const hilc_matmul_params *p, const int8_t *a, const int8_t *b, int8_t *out);
/* DSP variant: `col` holds one int16 row of a - zp_a (k elements). */
void hilc_matmul_s8_dsp(const hilc_matmul_params *p, const int8_t *a, const int8_t *b, int8_t *out, int16_t *col);
void hilc_matmul(const hilc_matmul_params *p, const int8_t *a, const int8_t *b, int8_t *out, int16_t *col);
void hilc_layernorm_s8(const hilc_layernorm_params *p, const int8_t *in, int8_t *out);
void hilc_reduce_mean_s8(const hilc_reduce_params *p, const int8_t *in, int8_t *out);

/* embedding: y[t] = table[index[in[t] + 128]] (rows of d); gather: copy the selected slices */
void hilc_embedding_s8(int32_t n_tokens, int32_t d, const int32_t *index, const int8_t *table, const int8_t *in,
                       int8_t *out);
void hilc_gather_s8(int32_t outer, int32_t len, int32_t inner, int32_t n_idx, const int32_t *indices, const int8_t *in,
                    int8_t *out);

#endif
