/* Tick counter from SysTick (processor clock, 24-bit down counter) extended to 64 bits by counting
 * wraps in its interrupt. Under QEMU with -icount shift=0 the counts are deterministic. */
#include "hilc_board.h"

static volatile uint32_t wraps;

void SysTick_Handler(void) { wraps++; }

void hilc_timer_init(void) {
    HILC_SYST_RVR = 0xFFFFFFu;
    HILC_SYST_CVR = 0;
    HILC_SYST_CSR = 7u; /* processor clock, interrupt, enable */
}

uint64_t hilc_ticks(void) {
    uint32_t hi, lo;
    do {
        hi = wraps;
        lo = HILC_SYST_CVR;
    } while (hi != wraps);
    return ((uint64_t)hi << 24) + (0xFFFFFFu - lo);
}

/* Align the counter to a tick boundary before a measurement: host bytes arrive at a real-time
 * instant, so without this the sub-tick phase (and a +-1 in per-layer counts) would vary. */
void hilc_timer_sync(void) {
    HILC_SYST_CVR = 0; /* clears the count; the next tick reloads RVR */
    while (HILC_SYST_CVR == 0) {
    }
}
