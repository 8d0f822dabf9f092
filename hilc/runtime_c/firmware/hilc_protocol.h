/* hilc serial protocol, shared by the firmware and (mirrored) hilc/hil/protocol.py.
 *
 * Frame on the wire: COBS(body) followed by 0x00. body = type, seq, payload..., CRC-32 (IEEE,
 * little-endian) of type..payload. A request of type T is answered by type T | 0x80 with the same
 * seq, or by HILC_ERR with an error code. Every request is idempotent, so the host may resend it. */
#ifndef HILC_PROTOCOL_H
#define HILC_PROTOCOL_H

#define HILC_PROTOCOL_VERSION 1
#define HILC_MAX_PAYLOAD 1024

enum {
    HILC_INFO = 0x01,        /* -> version u32, model hash u64, input u32, output u32, arena u32, layers u32,
                                tick_hz u32, timer kind u8 (0 SysTick, 1 DWT), board name */
    HILC_WRITE_INPUT = 0x02, /* offset u32, bytes -> total written so far u32 (the board holds bytes
                                [0, total) since boot: offset + length, or less after a reset, when a gap is
                                not stored) */
    HILC_RUN = 0x03,         /* -> status u32, ticks u64 */
    HILC_READ_OUTPUT = 0x04, /* offset u32, length u16 -> bytes */
    HILC_PROFILE = 0x05,     /* first layer u16 (0 runs an inference) -> total ticks u64, layers u16,
                                count u16, count x ticks u64 */
    HILC_RESET = 0x06,       /* -> empty, then the board resets */
    HILC_RAW = 0x07,         /* count u32 -> empty; then count raw unframed bytes -> their CRC-32 u32
                                (measures the bare link for the protocol-overhead benchmark) */
    HILC_ERR = 0xEE,         /* code u8 */
};

enum { HILC_E_CRC = 1, HILC_E_COMMAND = 2, HILC_E_LENGTH = 3, HILC_E_RANGE = 4, HILC_E_FRAME = 5, HILC_E_MODEL = 6,
       /* the board does not hold what the request needs, which after a board reset is the case:
          RUN / PROFILE before the whole input was written since boot, READ_OUTPUT / PROFILE pages
          before a run since boot (or since the input last changed) */
       HILC_E_NO_INPUT = 7, HILC_E_NO_OUTPUT = 8 };

#endif
