/* The three Cortex-M DSP-extension operations the optimised kernels use, as ACLE intrinsics on
 * ARMv7E-M (Cortex-M4/M7/M33) and as exact portable C elsewhere, so the same kernel code also
 * builds and is tested bit for bit on the host. */
#ifndef HILC_DSP_H
#define HILC_DSP_H

#include <stdint.h>
#include <string.h>

#include "hilc_arith.h"

#if defined(__ARM_FEATURE_SIMD32) && __ARM_FEATURE_SIMD32
#include <arm_acle.h>
/* acc + lo(a)*lo(b) + hi(a)*hi(b) on signed 16-bit halves */
static inline int32_t hilc_smlad(uint32_t a, uint32_t b, int32_t acc) { return __smlad(a, b, acc); }
/* sign-extend bytes 0 and 2 into the two 16-bit halves */
static inline uint32_t hilc_sxtb16(uint32_t x) { return __sxtb16(x); }
#else
static inline int32_t hilc_smlad(uint32_t a, uint32_t b, int32_t acc) {
    return acc + (int16_t)(a & 0xFFFF) * (int16_t)(b & 0xFFFF) + (int16_t)(a >> 16) * (int16_t)(b >> 16);
}
static inline uint32_t hilc_sxtb16(uint32_t x) {
    return (uint32_t)(uint16_t)(int16_t)(int8_t)(x & 0xFF) | ((uint32_t)(uint16_t)(int16_t)(int8_t)((x >> 16) & 0xFF) << 16);
}
#endif
/* rotate right by 8 (gcc emits one ROR) */
static inline uint32_t hilc_ror8(uint32_t x) { return (x >> 8) | (x << 24); }

/* Slot of element p in a column buffer of k4 = k & ~3 interleaved elements: each group of four
 * is stored as x0 x2 x1 x3, matching the byte pairs SXTB16 takes from four packed weights. */
static inline int32_t hilc_col_slot(int32_t p, int32_t k4) {
    return p < k4 ? ((p & ~3) | ((p & 1) << 1) | ((p >> 1) & 1)) : p;
}

/* acc + sum_i col[i] * w[i] over k terms, two 16x16 multiply-accumulates per SMLAD. */
static inline int32_t hilc_dot_s16_s8(const int16_t *col, const int8_t *w, int32_t k, int32_t acc) {
    int32_t i = 0;
    for (; i + 4 <= k; i += 4) {
        uint32_t wq, x02, x13;
        memcpy(&wq, w + i, 4); /* one unaligned word load on Cortex-M4 */
        memcpy(&x02, col + i, 4);
        memcpy(&x13, col + i + 2, 4);
        acc = hilc_smlad(x02, hilc_sxtb16(wq), acc);
        acc = hilc_smlad(x13, hilc_sxtb16(hilc_ror8(wq)), acc);
    }
    for (; i < k; i++) acc += col[i] * w[i];
    return acc;
}

/* Forces a helper into each of its callers, so that a width passed as a literal folds to
 * constants as in a hand-specialised copy (hilc_kernels.c's portable conv and dense). */
#if defined(__GNUC__)
#define HILC_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define HILC_ALWAYS_INLINE inline
#endif

/* Packed sub-byte weights (hilc_arith.h), BITS = 4 or 2: one word load gives 32/BITS weights.
 * Masking the word, shifted left by 0, BITS, 2*BITS, ..., with 0xF0F0F0F0 / 0xC0C0C0C0 leaves four
 * weights as int8 lanes scaled by 2^(8-BITS), which SXTB16 widens into SMLAD lanes as for int8
 * weights: no per-element unpacking. The scaled sum is an exact multiple of 2^(8-BITS) (the
 * compiler proves it fits int32), so an arithmetic shift recovers the dot product; the tail past
 * the last whole word is read element by element. hilc_dot_s16_p4 / hilc_dot_s16_p2 return
 * sum_i col[i] * w[i] (no bias).
 *
 * One definition for both widths, instantiated per width with BITS a literal. Not a function
 * taking the width: gcc folds such a parameter only after it has shaped the word loop, which then
 * keeps a separate index (23 instead of 21 instructions a 4-bit word on Cortex-M4, gcc 12 -O2),
 * and its different size estimate changes which kernels the dot products get inlined into. This
 * way both widths compile to the same code as the two hand-written copies did. */
#define HILC_PACKED_LANES(u, s, mask, c)                                          \
    do {                                                                          \
        const uint32_t wq_ = ((u) << (s)) & (mask);                               \
        uint32_t x02_, x13_;                                                      \
        memcpy(&x02_, (c), 4);                                                    \
        memcpy(&x13_, (c) + 2, 4);                                                \
        scaled = hilc_smlad(x02_, hilc_sxtb16(wq_), scaled);                      \
        scaled = hilc_smlad(x13_, hilc_sxtb16(hilc_ror8(wq_)), scaled);           \
    } while (0)

#define HILC_DEFINE_DOT_PACKED(BITS)                                                                 \
    static inline int32_t hilc_dot_s16_p##BITS(const int16_t *col, const int8_t *row, int32_t k,     \
                                               int32_t k4) {                                         \
        const uint32_t mask = 0x01010101u * (uint8_t)(0xFFu << (8 - BITS)); /* 0xF0F0F0F0, 0xC0C0C0C0 */ \
        int32_t scaled = 0, i = 0;                                                                   \
        const int8_t *w = row;                                                                       \
        for (; i + (BITS == 4 ? 8 : 16) <= k; i += (BITS == 4 ? 8 : 16), w += 4) {                   \
            uint32_t u;                                                                              \
            memcpy(&u, w, 4);                                                                        \
            HILC_PACKED_LANES(u, 0, mask, col + i);                                                  \
            HILC_PACKED_LANES(u, BITS, mask, col + i + 4);                                           \
            if (BITS == 2) { /* a 2-bit word holds two more groups of four */                        \
                HILC_PACKED_LANES(u, 4, mask, col + i + 8);                                          \
                HILC_PACKED_LANES(u, 6, mask, col + i + 12);                                         \
            }                                                                                        \
        }                                                                                            \
        int32_t acc = scaled >> (8 - BITS);                                                          \
        for (; i < k; i++) acc += col[hilc_col_slot(i, k4)] * hilc_weight_at(row, i, BITS);          \
        return acc;                                                                                  \
    }

HILC_DEFINE_DOT_PACKED(4)
HILC_DEFINE_DOT_PACKED(2)

static inline int32_t hilc_dot_s16_packed(const int16_t *col, const int8_t *row, int32_t k, int32_t bits) {
    const int32_t k4 = k & ~3;
    return bits == 4 ? hilc_dot_s16_p4(col, row, k, k4) : hilc_dot_s16_p2(col, row, k, k4);
}

#endif
