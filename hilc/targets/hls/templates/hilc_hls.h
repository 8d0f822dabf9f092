/* hilc HLS runtime: the arithmetic contract of hilc/compiler/arith.py (and hilc/runtime_c/hilc_arith.h)
 * in ap_int types, for Vitis HLS synthesis and for C-simulation with g++.
 *
 * - Requantization: y = clamp(round(acc * b / 2^c) + zp), b < 2^31, 1 <= c <= 62, 64-bit product.
 * - Rounding: to nearest, ties to even, in integers only:
 *       (x + 2^(c-1) - 1 + ((x >> c) & 1)) >> c        ('>>' on a signed ap_int is arithmetic)
 * - No float and no division anywhere in the design.
 */
#ifndef HILC_HLS_H
#define HILC_HLS_H

/* Xilinx's ap_private reads members before assigning them in some constructors; g++ -O2 reports
 * that inside the headers. Those diagnostics belong to the headers, not to the generated design. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "ap_int.h"
#include "hls_stream.h"
#if defined(__has_include)
#if __has_include("ap_axi_sdata.h")
#include "ap_axi_sdata.h"
#define HILC_HAVE_AXI_SDATA 1
#endif
#endif
#pragma GCC diagnostic pop

/* AXI-Stream beat: one int8 container per beat, TLAST on the last element of a tensor. Vitis HLS
 * has hls::axis (side channels keep/strb/last); without it (C-simulation against the hls4ml
 * headers) a struct with the same fields stands in. */
#ifdef HILC_HAVE_AXI_SDATA
typedef hls::axis<ap_int<8>, 0, 0, 0> hilc_axis_t;
#else
struct hilc_axis_t {
    ap_int<8> data;
    ap_uint<1> keep;
    ap_uint<1> strb;
    ap_uint<1> last;
};
#endif

/* Constant tables (weights, biases, multipliers, lookup tables) are ROMs of the narrow ap type in
 * synthesis; C-simulation keeps them in a native container of the same values (static arrays of
 * ap_int need dynamic initialisation, which makes g++ crawl on big models). */
#ifdef __SYNTHESIS__
#define HILC_ROM(native, ap) ap
#else
#define HILC_ROM(native, ap) native
#endif

/* HLS directives reach Vitis HLS synthesis (which defines __SYNTHESIS__) through _Pragma; a plain C++
 * compiler sees nothing, so the design builds warning-free under -Wall (-Wunknown-pragmas). Loop labels
 * (names in the synthesis report) likewise: unused labels are -Wall warnings. */
#ifdef __SYNTHESIS__
#define HLS_PRAGMA(x) _Pragma(#x)
#define HLS_LOOP(name) name:
#else
#define HLS_PRAGMA(x)
#define HLS_LOOP(name)
#endif

typedef ap_int<64> hilc_i64;

static inline hilc_i64 hilc_round_shift(hilc_i64 x, int c) {
HLS_PRAGMA(HLS INLINE)
    const hilc_i64 q = x >> c;
    return (x + ((hilc_i64(1) << (c - 1)) - 1) + (q & 1)) >> c;
}

static inline int hilc_clamp(hilc_i64 y, int lo, int hi) {
HLS_PRAGMA(HLS INLINE)
    return y < lo ? lo : (y > hi ? hi : (int)y.to_int64());
}

/* acc fits 32 bits (the static accumulator bound proves it), b < 2^31: the product fits 63 bits. */
static inline int hilc_requant(ap_int<33> acc, ap_uint<31> b, int c, int zp, int lo, int hi) {
HLS_PRAGMA(HLS INLINE)
    const hilc_i64 p = acc * b;
    return hilc_clamp(hilc_round_shift(p, c) + zp, lo, hi);
}

/* Bit length of v (0 for 0): a priority encoder. */
static inline int hilc_bit_length(ap_uint<32> v) {
HLS_PRAGMA(HLS INLINE)
    int n = 0;
HLS_LOOP(BIT_LENGTH)
    for (int i = 0; i < 32; i++) {
HLS_PRAGMA(HLS UNROLL)
        if (v[i]) n = i + 1;
    }
    return n;
}

#endif
