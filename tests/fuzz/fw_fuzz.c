/* libFuzzer harness for the board firmware's frame parser and command dispatcher
 * (hilc/runtime_c/firmware/hilc_fw.c), built for the host with ASan and UBSan.
 *
 * The fuzz input is the byte stream the board's UART receives, or (structured mode, see
 * frame_bodies) a list of frame bodies the harness frames with a correct CRC. The board hooks are stubbed here:
 * hilc_uart_getc reads the input and ends the run when it is used up, hilc_uart_putc collects the
 * answer, hilc_reset reboots (zeroes the firmware's state) and goes on with the rest of the input.
 * Beyond the sanitizers, every run checks two oracles and abort()s on a violation:
 *   - the parser: every frame recv_frame() accepts equals an independent COBS decoding of the
 *     bytes it consumed, and it refuses exactly the malformed ones;
 *   - the answers: every frame the board sends is well formed COBS with a correct CRC-32, of an
 *     answer type to the request (or HILC_ERR), with the request's sequence number.
 * The same file also builds with gcc and fw_replay.c into a plain program that replays a corpus. */
#include <setjmp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define HILC_FW_HOST 1
#define HILC_LAYER_HOOK 1
#define HILC_TICK_HZ 25000000u
#define HILC_TIMER_KIND 0
#define HILC_BOARD_NAME "fuzz-host"
#include "hilc_fw.c" /* included, not linked: the harness resets its static state */

static const uint8_t *feed;
static size_t feed_len, feed_pos;
static jmp_buf out_of_input;
static uint8_t sent[2 * (HILC_MAX_PAYLOAD + 64) + 16]; /* the answer frame being sent */
static size_t sent_len;
static int32_t expect_type = -1, expect_seq = -1; /* of the request being handled */

static void fail(const char *what) {
    fprintf(stderr, "fw_fuzz: %s\n", what);
    abort();
}

/* --- board hooks ---------------------------------------------------------------------------- */
void hilc_board_init(void) {}
void hilc_timer_sync(void) {}
uint64_t hilc_ticks(void) {
    static uint64_t t;
    return t += 40;
}
int32_t hilc_uart_getc(void) {
    if (feed_pos >= feed_len) longjmp(out_of_input, 1);
    return feed[feed_pos++];
}
static void reboot(void) { /* what a reset does to .bss */
    memset(input_buf, 0, sizeof(input_buf));
    memset(output_buf, 0, sizeof(output_buf));
    memset(layer_ticks, 0, sizeof(layer_ticks));
    layer_start = 0;
    profiling = 0;
    input_valid = 0;
    output_valid = 0;
    profile_valid = 0;
}
static jmp_buf rebooted;
void hilc_reset(void) { longjmp(rebooted, 1); }

static uint32_t ref_crc32(const uint8_t *p, size_t n) {
    uint32_t crc = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) {
        crc ^= p[i];
        for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    return ~crc;
}

/* Independent COBS decoding of s[0..n) (no delimiter inside) into out; returns the decoded length,
 * -1 if a block runs past the end, -2 if the result (with the implied zeros) exceeds cap. */
static long cobs_decode(const uint8_t *s, size_t n, uint8_t *out, size_t cap) {
    size_t i = 0, o = 0;
    while (i < n) {
        const size_t code = s[i++];
        if (code == 0) return -1;
        if (i + code - 1 > n) return -1;
        for (size_t k = 1; k < code; k++) {
            if (o >= cap) return -2;
            out[o++] = s[i++];
        }
        if (code < 255) {
            if (o >= cap) return -2;
            out[o++] = 0;
            if (i == n) return (long)o - 1; /* the last block's zero is implied, not data */
        }
    }
    return (long)o;
}

static void check_answer(void) {
    static uint8_t body[HILC_MAX_PAYLOAD + 64];
    const long n = cobs_decode(sent, sent_len, body, sizeof(body));
    if (n < 6) fail("the board sent a malformed or short frame");
    if (ref_crc32(body, (size_t)n - 4) != ((uint32_t)body[n - 4] | (uint32_t)body[n - 3] << 8 |
                                            (uint32_t)body[n - 2] << 16 | (uint32_t)body[n - 1] << 24))
        fail("the board sent a frame with a wrong CRC");
    if (body[1] != expect_seq) fail("the answer's seq is not the request's");
    if (body[0] != HILC_ERR && body[0] != (uint8_t)(expect_type | 0x80)) fail("the answer's type is wrong");
    if (body[0] == HILC_ERR && (n != 7 || body[2] < HILC_E_CRC || body[2] > HILC_E_NO_OUTPUT))
        fail("malformed error answer");
    if (body[0] == (HILC_READ_OUTPUT | 0x80) && !output_valid) fail("output sent that no run since boot made");
}

void hilc_uart_putc(uint8_t c) {
    if (expect_seq < 0) fail("the board sent a byte without a request");
    if (c == 0) {
        check_answer();
        sent_len = 0;
        return;
    }
    if (sent_len >= sizeof(sent)) fail("the board sent an overlong frame");
#ifdef FW_FUZZ_SELFTEST /* a deliberately broken UART, to show the oracle catches it */
    if (sent_len == 3) c = (uint8_t)(c == 0x5A ? 0x5B : 0x5A);
#endif
    sent[sent_len++] = c;
}

/* --- the stand-in model ------------------------------------------------------------------------- */
int model_init(void) { return 0; }
int model_run(const int8_t *input, int8_t *output) {
    for (int32_t l = 0; l < MODEL_NUM_LAYERS; l++) {
        hilc_layer_hook(l, 0);
        hilc_layer_hook(l, 1);
    }
    for (int32_t i = 0; i < MODEL_OUTPUT_SIZE; i++) output[i] = (int8_t)(input[i % MODEL_INPUT_SIZE] ^ i);
    return 0;
}

/* --- one run ------------------------------------------------------------------------------------- */
static void step(void) {
    const size_t start = feed_pos;
    const int32_t n = recv_frame();
    /* what the parser consumed: idle delimiters, the frame, its delimiter */
    size_t a = start, b = feed_pos - 1;
    while (a < b && feed[a] == 0) a++;
    static uint8_t ref[sizeof(rx)];
    long want = -1;
    if (memchr(feed + a, 0, b - a) == NULL) want = cobs_decode(feed + a, b - a, ref, sizeof(ref));
    if (n >= 0 && (want != n || memcmp(ref, rx, (size_t)n) != 0)) fail("parser accepted a frame wrongly");
    if (n < 0 && want >= 0) fail("parser refused a well-formed frame");
    expect_type = n >= 2 ? rx[0] : -1;
    expect_seq = n >= 2 ? rx[1] : -1;
    sent_len = 0;
    handle(n);
    if (sent_len != 0) fail("the board left an answer unfinished");
    expect_seq = -1;
}

/* Structured mode: the input is a list of frame bodies (u16 length, then type, seq, payload) that
 * the harness frames itself (CRC-32 and COBS), so mutations reach the dispatcher behind the CRC
 * check instead of dying at it. */
static size_t frame_bodies(const uint8_t *data, size_t size, uint8_t *out, size_t cap) {
    size_t i = 0, o = 0;
    static uint8_t body[HILC_MAX_PAYLOAD + 64 + 4];
    while (i + 2 <= size) {
        size_t n = ((size_t)data[i] | (size_t)data[i + 1] << 8) % (HILC_MAX_PAYLOAD + 64 - 4 + 1);
        i += 2;
        if (n > size - i) n = size - i;
        memcpy(body, data + i, n);
        i += n;
        const uint32_t crc = ref_crc32(body, n);
        for (int k = 0; k < 4; k++) body[n + (size_t)k] = (uint8_t)(crc >> (8 * k));
        n += 4;
        if (o + n + n / 254 + 3 > cap) break;
        size_t code_at = o++, run = 0; /* COBS */
        for (size_t k = 0; k < n; k++) {
            if (run == 254) { /* a full block: code 255, no implied zero */
                out[code_at] = 255;
                code_at = o++;
                run = 0;
            }
            if (body[k] == 0) {
                out[code_at] = (uint8_t)(run + 1);
                code_at = o++;
                run = 0;
                continue;
            }
            out[o++] = body[k];
            run++;
        }
        out[code_at] = (uint8_t)(run + 1);
        out[o++] = 0;
    }
    return o;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* first byte: bit 0 selects the mode, raw UART bytes (0) or frame bodies (1) */
    static uint8_t framed[64 * 1024];
    if (size == 0) return 0;
    if (data[0] & 1) {
        feed = framed;
        feed_len = frame_bodies(data + 1, size - 1, framed, sizeof(framed));
    } else {
        feed = data + 1;
        feed_len = size - 1;
    }
    feed_pos = 0;
    reboot();
    if (setjmp(out_of_input)) return 0;
    if (setjmp(rebooted)) {
        if (sent_len != 0) fail("reset before the answer was complete");
        expect_seq = -1;
        reboot();
    }
    for (;;) step();
}
