/* The three Cortex-M DSP-extension operations the optimised kernels use, as ACLE intrinsics on
 * ARMv7E-M (Cortex-M4/M7/M33) and as exact portable C elsewhere, so the same kernel code also
 * builds and is tested bit for bit on the host. */
#ifndef HILC_DSP_H
#define HILC_DSP_H

#include <stdint.h>
#include <string.h>

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

#endif
