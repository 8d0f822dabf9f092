/* hilc arithmetic contract, C side (mirrors hilc/compiler/arith.py; the simulator is the reference).
 *
 * - Requantization: y = clamp(round(acc * b / 2^c) + zp), b < 2^31, 1 <= c <= 62, int64 product.
 * - Rounding: to nearest, ties to even, in integers only:
 *       (x + 2^(c-1) - 1 + ((x >> c) & 1)) >> c
 *   '>>' on negative int64 must be an arithmetic shift (gcc and clang guarantee it).
 * - No float and no division anywhere on the inference path.
 */
#ifndef HILC_ARITH_H
#define HILC_ARITH_H

#include <stdint.h>

static inline int64_t hilc_round_shift(int64_t x, int32_t c) {
    return (x + (((int64_t)1 << (c - 1)) - 1) + ((x >> c) & 1)) >> c;
}

static inline int32_t hilc_clamp(int64_t y, int32_t lo, int32_t hi) {
    return y < lo ? lo : (y > hi ? hi : (int32_t)y);
}

static inline int8_t hilc_requant(int32_t acc, int32_t b, int32_t c, int32_t zp, int32_t lo, int32_t hi) {
    return (int8_t)hilc_clamp(hilc_round_shift((int64_t)acc * b, c) + zp, lo, hi);
}

/* Bit length of v > 0 (a count-leading-zeros). */
static inline int32_t hilc_bit_length(uint32_t v) {
#if defined(__GNUC__)
    return v ? 32 - __builtin_clz(v) : 0;
#else
    int32_t n = 0;
    while (v) { n++; v >>= 1; }
    return n;
#endif
}

#endif
