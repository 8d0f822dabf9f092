/* nRF52840 UART0 (legacy, byte-wise) on the DK's interface-MCU pins P0.06 (TX) and P0.08 (RX). */
#include "hilc_board.h"

#define UART0 0x40002000UL
#define REG(off) (*(volatile uint32_t *)(UART0 + (off)))

void hilc_timer_init(void);

void hilc_board_init(void) {
    REG(0x50C) = HILC_TX_PIN;   /* PSEL.TXD */
    REG(0x514) = HILC_RX_PIN;   /* PSEL.RXD */
    REG(0x524) = HILC_NRF_BAUD; /* BAUDRATE */
    REG(0x500) = 4;             /* ENABLE */
    REG(0x000) = 1;             /* TASKS_STARTRX */
    REG(0x008) = 1;             /* TASKS_STARTTX */
    hilc_timer_init();
}

void hilc_uart_putc(uint8_t c) {
    REG(0x11C) = 0;             /* EVENTS_TXDRDY */
    REG(0x51C) = c;             /* TXD */
    while (!REG(0x11C)) {
    }
}

int32_t hilc_uart_getc(void) {
    while (!REG(0x108)) {       /* EVENTS_RXDRDY */
    }
    REG(0x108) = 0;
    return (int32_t)(REG(0x518) & 0xFFu); /* RXD */
}
