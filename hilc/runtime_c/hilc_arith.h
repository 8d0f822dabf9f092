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

/* Sub-byte weights (mirrors arith.pack_weights): rows of 32-bit words, each holding 32/bits weights;
 * byte i of a word carries weights i, 4+i, 8+i, 12+i from its top bits down. Weight p of a row: */
static inline int32_t hilc_weight_at(const int8_t *row, int32_t p, int32_t bits) {
    const int32_t lg = bits == 4 ? 3 : 4; /* log2(weights per word) */
    const int32_t j = p & ((1 << lg) - 1);
    const uint8_t byte = (uint8_t)row[((p >> lg) << 2) + (j & 3)];
    const uint8_t top = (uint8_t)((uint32_t)byte << (bits * (j >> 2))); /* weight in the top bits */
    return (int32_t)(int8_t)(top & (uint8_t)(0xFFu << (8 - bits))) >> (8 - bits);
}

/* 4-bit activations packed in the arena (tensor dtype "int4"): element i in byte i/2, the low
 * nibble for even i, the high one for odd i, two's complement. */
static inline int32_t hilc_act4_at(const int8_t *base, int32_t i) {
    const uint8_t b = (uint8_t)base[i >> 1];
    return (int32_t)(int8_t)(uint8_t)(b << ((~i & 1) << 2)) >> 4;
}

static inline void hilc_act4_put(int8_t *base, int32_t i, int32_t v) {
    uint8_t *p = (uint8_t *)base + (i >> 1);
    *p = (i & 1) ? (uint8_t)((*p & 0x0Fu) | ((uint32_t)v << 4)) : (uint8_t)((*p & 0xF0u) | ((uint32_t)v & 0x0Fu));
}

/* A params struct's weight_bits: 0 or 8 mean plain int8 weights, 4 and 2 packed rows. */
static inline int32_t hilc_packed(int32_t weight_bits) { return weight_bits == 4 || weight_bits == 2; }

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
