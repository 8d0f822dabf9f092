/* Firmware stub that links the model for size and symbol checks: one inference on a static buffer. */
#include "model.h"

static int8_t input_buf[MODEL_INPUT_SIZE];
static int8_t output_buf[MODEL_OUTPUT_SIZE];
volatile int8_t hilc_sink;

int main(void) {
    model_init();
    model_run(input_buf, output_buf);
    hilc_sink = output_buf[0];
    return 0;
}
