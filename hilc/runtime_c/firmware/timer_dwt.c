/* Cycle counter from DWT->CYCCNT (real boards; it reads 0 under QEMU), extended to 64 bits on read.
 * Reads happen at least once per layer, far more often than the 32-bit counter wraps. */
#include "hilc_board.h"

static uint32_t last;
static uint64_t high;

void hilc_timer_init(void) {
    HILC_DEMCR |= 1u << 24; /* TRCENA */
    HILC_DWT_CYCCNT = 0;
    HILC_DWT_CTRL |= 1u;    /* CYCCNTENA */
}

uint64_t hilc_ticks(void) {
    const uint32_t now = HILC_DWT_CYCCNT;
    if (now < last) high += (uint64_t)1 << 32;
    last = now;
    return high | now;
}

void hilc_timer_sync(void) { (void)hilc_ticks(); }
