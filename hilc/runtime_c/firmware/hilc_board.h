/* What the protocol loop needs from a board: a byte UART and a monotonic tick counter. */
#ifndef HILC_BOARD_H
#define HILC_BOARD_H

#include <stdint.h>

void hilc_board_init(void);         /* clocks, UART pins, timer */
void hilc_uart_putc(uint8_t c);     /* blocking */
int32_t hilc_uart_getc(void);       /* blocking: 0..255 */
uint64_t hilc_ticks(void);          /* monotonic, HILC_TICK_HZ per second */
void hilc_timer_sync(void);         /* start a measurement on a tick boundary */
void hilc_reset(void);              /* system reset through SCB->AIRCR */

#define HILC_AIRCR (*(volatile uint32_t *)0xE000ED0CUL)
#define HILC_SYST_CSR (*(volatile uint32_t *)0xE000E010UL)
#define HILC_SYST_RVR (*(volatile uint32_t *)0xE000E014UL)
#define HILC_SYST_CVR (*(volatile uint32_t *)0xE000E018UL)
#define HILC_DEMCR (*(volatile uint32_t *)0xE000EDFCUL)
#define HILC_DWT_CTRL (*(volatile uint32_t *)0xE0001000UL)
#define HILC_DWT_CYCCNT (*(volatile uint32_t *)0xE0001004UL)

#endif
