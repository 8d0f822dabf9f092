/* CMSDK APB UART (ARM MPS2 boards, as emulated by QEMU). */
#include "hilc_board.h"

#ifndef HILC_UART_BASE
#define HILC_UART_BASE 0x40004000UL
#endif
#define UART_DATA (*(volatile uint32_t *)(HILC_UART_BASE + 0x00))
#define UART_STATE (*(volatile uint32_t *)(HILC_UART_BASE + 0x04))
#define UART_CTRL (*(volatile uint32_t *)(HILC_UART_BASE + 0x08))
#define UART_BAUDDIV (*(volatile uint32_t *)(HILC_UART_BASE + 0x10))

void hilc_timer_init(void);

void hilc_board_init(void) {
    UART_BAUDDIV = HILC_CLOCK_HZ / HILC_BAUD;
    UART_CTRL = 3u; /* TX and RX enable */
    hilc_timer_init();
}

void hilc_uart_putc(uint8_t c) {
    while (UART_STATE & 1u) {
    }
    UART_DATA = c;
}

int32_t hilc_uart_getc(void) {
    while (!(UART_STATE & 2u)) {
    }
    return (int32_t)(UART_DATA & 0xFFu);
}
