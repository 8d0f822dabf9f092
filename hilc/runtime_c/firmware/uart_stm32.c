/* STM32F4/F7 USART on its ST-LINK virtual COM port pins, at the reset clock (HSI 16 MHz).
 * Register level; the board file gives the USART base, GPIO port, pins and alternate function. */
#include "hilc_board.h"

#define RCC_BASE HILC_RCC_BASE
#define REG(a) (*(volatile uint32_t *)(a))

void hilc_timer_init(void);

static void gpio_af(uint32_t port, uint32_t pin, uint32_t af) {
    REG(port + 0x00) = (REG(port + 0x00) & ~(3u << (2 * pin))) | (2u << (2 * pin)); /* MODER: alternate */
    const uint32_t afr = port + (pin < 8 ? 0x20 : 0x24);
    const uint32_t sh = 4 * (pin & 7);
    REG(afr) = (REG(afr) & ~(0xFu << sh)) | (af << sh);
}

void hilc_board_init(void) {
    REG(RCC_BASE + HILC_RCC_GPIO_EN_OFF) |= HILC_RCC_GPIO_EN_BITS;
    REG(RCC_BASE + HILC_RCC_UART_EN_OFF) |= HILC_RCC_UART_EN_BIT;
    gpio_af(HILC_GPIO_TX_PORT, HILC_TX_PIN, HILC_UART_AF);
    gpio_af(HILC_GPIO_RX_PORT, HILC_RX_PIN, HILC_UART_AF);
    REG(HILC_UART_BASE + HILC_USART_BRR) = (HILC_CLOCK_HZ + HILC_BAUD / 2) / HILC_BAUD;
    REG(HILC_UART_BASE + HILC_USART_CR1) = HILC_USART_CR1_ENABLE;
    hilc_timer_init();
}

void hilc_uart_putc(uint8_t c) {
    while (!(REG(HILC_UART_BASE + HILC_USART_SR) & (1u << 7))) {
    }
    REG(HILC_UART_BASE + HILC_USART_TDR) = c;
}

int32_t hilc_uart_getc(void) {
    while (!(REG(HILC_UART_BASE + HILC_USART_SR) & (1u << 5))) {
        if (REG(HILC_UART_BASE + HILC_USART_SR) & (1u << 3)) (void)REG(HILC_UART_BASE + HILC_USART_RDR); /* ORE */
    }
    return (int32_t)(REG(HILC_UART_BASE + HILC_USART_RDR) & 0xFFu);
}
