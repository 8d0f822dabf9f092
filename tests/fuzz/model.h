/* A stand-in model for the protocol fuzz harness (fw_fuzz.c): sizes chosen so that every paging
 * path of the firmware is reachable (output and profile larger than one frame). */
#ifndef MODEL_H
#define MODEL_H

#include <stdint.h>

#define MODEL_INPUT_SIZE 600
#define MODEL_OUTPUT_SIZE 1100
#define MODEL_ARENA_SIZE 4096
#define MODEL_NUM_LAYERS 130
#define MODEL_HASH 0x0123456789ABCDEFULL

int model_init(void);
int model_run(const int8_t *input, int8_t *output);
void hilc_layer_hook(int32_t layer, int32_t phase);

#endif
