/* Host test harness: model_host INPUT.bin OUTPUT.bin
 * INPUT.bin holds N samples of MODEL_INPUT_SIZE int8 each; OUTPUT.bin receives N * MODEL_OUTPUT_SIZE int8. */
#include <stdio.h>
#include <stdlib.h>

#include "model.h"

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s INPUT.bin OUTPUT.bin\n", argv[0]);
        return 2;
    }
    FILE *fi = fopen(argv[1], "rb");
    FILE *fo = fopen(argv[2], "wb");
    if (!fi || !fo) {
        fprintf(stderr, "cannot open %s\n", !fi ? argv[1] : argv[2]);
        return 2;
    }
    static int8_t in[MODEL_INPUT_SIZE], out[MODEL_OUTPUT_SIZE];
    long n = 0;
    model_init();
    while (fread(in, 1, MODEL_INPUT_SIZE, fi) == MODEL_INPUT_SIZE) {
        if (model_run(in, out) != 0) return 1;
        if (fwrite(out, 1, MODEL_OUTPUT_SIZE, fo) != MODEL_OUTPUT_SIZE) return 1;
        n++;
    }
    fclose(fi);
    fclose(fo);
    fprintf(stderr, "%ld samples\n", n);
    return 0;
}
