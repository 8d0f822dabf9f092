/* hilc firmware: the generated model behind the serial protocol (hilc_protocol.h). */
#include <stdint.h>

#include "hilc_board.h"
#include "hilc_protocol.h"
#include "model.h"

static int8_t input_buf[MODEL_INPUT_SIZE];
static int8_t output_buf[MODEL_OUTPUT_SIZE];
static uint64_t layer_ticks[MODEL_NUM_LAYERS];
static uint64_t layer_start;
static int32_t profiling;
static uint8_t rx[HILC_MAX_PAYLOAD + 64];
static uint8_t tx[HILC_MAX_PAYLOAD + 64];
/* What the board holds, so that a reset (which zeroes .bss) is detected, never answered with
 * stale or zeroed data: bytes [0, input_valid) of the input written since boot, whether
 * output_buf answers that input, whether layer_ticks hold a profile. */
static uint32_t input_valid;
static int32_t output_valid;
static int32_t profile_valid;

void hilc_layer_hook(int32_t layer, int32_t phase) {
    if (!profiling) return;
    const uint64_t now = hilc_ticks();
    if (phase == 0) layer_start = now;
    else layer_ticks[layer] = now - layer_start;
}

static uint32_t crc32(const uint8_t *p, uint32_t n) {
    uint32_t crc = 0xFFFFFFFFu;
    for (uint32_t i = 0; i < n; i++) {
        crc ^= p[i];
        for (int32_t k = 0; k < 8; k++) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    return ~crc;
}

static void put_u16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put_u32(uint8_t *p, uint32_t v) { put_u16(p, v); put_u16(p + 2, v >> 16); }
static void put_u64(uint8_t *p, uint64_t v) { put_u32(p, (uint32_t)v); put_u32(p + 4, (uint32_t)(v >> 32)); }
static uint32_t get_u16(const uint8_t *p) { return (uint32_t)p[0] | ((uint32_t)p[1] << 8); }
static uint32_t get_u32(const uint8_t *p) { return get_u16(p) | (get_u16(p + 2) << 16); }

/* COBS-encode body[0..n) and send it with the 0x00 delimiter. */
static void send_frame(const uint8_t *body, uint32_t n) {
    uint32_t i = 0;
    while (i <= n) {
        uint32_t run = 0;
        while (i + run < n && body[i + run] != 0 && run < 254) run++;
        hilc_uart_putc((uint8_t)(run + 1));
        for (uint32_t k = 0; k < run; k++) hilc_uart_putc(body[i + k]);
        i += run;
        if (run < 254) i++; /* skip the zero that ended this run (or step past the end) */
    }
    hilc_uart_putc(0);
}

static void reply(uint8_t type, uint8_t seq, uint32_t len) { /* payload already at tx + 2 */
    tx[0] = type;
    tx[1] = seq;
    put_u32(tx + 2 + len, crc32(tx, 2 + len));
    send_frame(tx, 2 + len + 4);
}

static void error(uint8_t seq, uint8_t code) {
    tx[2] = code;
    reply(HILC_ERR, seq, 1);
}

/* Receive one frame and COBS-decode it into rx; returns its length, or -1 if it was malformed
 * (overlong, or cut by a delimiter inside a block). */
static int32_t recv_frame(void) {
    uint32_t n = 0;
    int32_t bad = 0, phantom = 0;
    for (;;) {
        const int32_t code = hilc_uart_getc();
        if (code == 0) {
            if (n == 0 && !bad) continue; /* idle delimiter */
            if (bad) return -1;
            return (int32_t)(phantom ? n - 1 : n); /* the last block's implied zero is not data */
        }
        for (int32_t k = 1; k < code; k++) {
            const int32_t c = hilc_uart_getc();
            if (c == 0) return -1;
            if (n < sizeof(rx)) rx[n++] = (uint8_t)c; else bad = 1;
        }
        phantom = code < 255;
        if (phantom) {
            if (n < sizeof(rx)) rx[n++] = 0; else bad = 1;
        }
    }
}

static void handle(int32_t n) {
    if (n < 6) return; /* malformed or too short to hold a seq: the host times out and resends */
    const uint8_t type = rx[0], seq = rx[1];
    const uint32_t len = (uint32_t)n - 6;
    const uint8_t *pl = rx + 2;
    if (crc32(rx, (uint32_t)n - 4) != get_u32(rx + n - 4)) {
        error(seq, HILC_E_CRC);
        return;
    }
    uint8_t *out = tx + 2;
    switch (type) {
    case HILC_INFO: {
        const char *name = HILC_BOARD_NAME;
        uint32_t k = 0;
        put_u32(out, HILC_PROTOCOL_VERSION);
        put_u64(out + 4, MODEL_HASH);
        put_u32(out + 12, MODEL_INPUT_SIZE);
        put_u32(out + 16, MODEL_OUTPUT_SIZE);
        put_u32(out + 20, MODEL_ARENA_SIZE);
        put_u32(out + 24, MODEL_NUM_LAYERS);
        put_u32(out + 28, HILC_TICK_HZ);
        out[32] = HILC_TIMER_KIND;
        while (name[k] && k < 64) { out[33 + k] = (uint8_t)name[k]; k++; }
        reply(type | 0x80, seq, 33 + k);
        return;
    }
    case HILC_WRITE_INPUT: {
        if (len < 4) break;
        const uint32_t off = get_u32(pl), cnt = len - 4;
        if (off > MODEL_INPUT_SIZE || cnt > MODEL_INPUT_SIZE - off) { error(seq, HILC_E_RANGE); return; }
        if (off <= input_valid) { /* else a gap: earlier bytes were lost (a reset); the reply says so */
            for (uint32_t i = 0; i < cnt; i++) input_buf[off + i] = (int8_t)pl[4 + i];
            input_valid = off + cnt; /* [0, off) held already; what lies beyond is no longer counted */
            output_valid = 0;
        }
        put_u32(out, input_valid);
        reply(type | 0x80, seq, 4);
        return;
    }
    case HILC_RUN: {
        if (input_valid < MODEL_INPUT_SIZE) { error(seq, HILC_E_NO_INPUT); return; }
        hilc_timer_sync();
        const uint64_t t0 = hilc_ticks();
        const int32_t status = model_run(input_buf, output_buf);
        const uint64_t t1 = hilc_ticks();
        output_valid = status == 0;
        put_u32(out, (uint32_t)status);
        put_u64(out + 4, t1 - t0);
        reply(type | 0x80, seq, 12);
        return;
    }
    case HILC_READ_OUTPUT: {
        if (len != 6) break;
        const uint32_t off = get_u32(pl), cnt = get_u16(pl + 4);
        if (off > MODEL_OUTPUT_SIZE || cnt > MODEL_OUTPUT_SIZE - off || cnt > HILC_MAX_PAYLOAD) {
            error(seq, HILC_E_RANGE);
            return;
        }
        if (!output_valid) { error(seq, HILC_E_NO_OUTPUT); return; }
        for (uint32_t i = 0; i < cnt; i++) out[i] = (uint8_t)output_buf[off + i];
        reply(type | 0x80, seq, cnt);
        return;
    }
    case HILC_PROFILE: {
        if (len != 2) break;
        const uint32_t first = get_u16(pl);
        static uint64_t total;
        if (first == 0) {
            if (input_valid < MODEL_INPUT_SIZE) { error(seq, HILC_E_NO_INPUT); return; }
            profiling = 1;
            hilc_timer_sync();
            const uint64_t t0 = hilc_ticks();
            output_valid = model_run(input_buf, output_buf) == 0;
            total = hilc_ticks() - t0;
            profiling = 0;
            profile_valid = 1;
        }
        if (first > MODEL_NUM_LAYERS) { error(seq, HILC_E_RANGE); return; }
        if (!profile_valid) { error(seq, HILC_E_NO_OUTPUT); return; }
        uint32_t count = MODEL_NUM_LAYERS - first;
        if (count > 100) count = 100;
        put_u64(out, total);
        put_u16(out + 8, MODEL_NUM_LAYERS);
        put_u16(out + 10, count);
        for (uint32_t i = 0; i < count; i++) put_u64(out + 12 + 8 * i, layer_ticks[first + i]);
        reply(type | 0x80, seq, 12 + 8 * count);
        return;
    }
    case HILC_RAW: {
        if (len != 4) break;
        const uint32_t count = get_u32(pl);
        reply(type | 0x80, seq, 0);
        uint32_t crc = 0xFFFFFFFFu;
        for (uint32_t i = 0; i < count; i++) {
            crc ^= (uint32_t)hilc_uart_getc();
            for (int32_t k = 0; k < 8; k++) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
        }
        put_u32(out, ~crc);
        reply(type | 0x80, seq, 4);
        return;
    }
    case HILC_RESET:
        reply(type | 0x80, seq, 0);
        hilc_reset();
        return;
    default:
        error(seq, HILC_E_COMMAND);
        return;
    }
    error(seq, HILC_E_LENGTH);
}

#ifndef HILC_FW_HOST /* the host fuzz harness (tests/fuzz) brings its own reset and main loop */
void hilc_reset(void) {
    HILC_AIRCR = 0x05FA0004u; /* VECTKEY | SYSRESETREQ */
    for (;;) {
    }
}

int main(void) {
    hilc_board_init();
    model_init();
    for (;;) handle(recv_frame());
}
#endif
