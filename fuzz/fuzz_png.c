/* fuzz/fuzz_png.c — libFuzzer target: png_decode on arbitrary bytes must either fail with one
 * error line naming the input or return an image whose every pixel can be read. Each input is
 * decoded twice: as it is, and with every chunk's CRC recomputed, so that mutations reach the
 * chunk parsers, inflate and the unfilter code instead of stopping at a CRC mismatch. */
#include "sdref.h"
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void decode(const uint8_t *data, size_t size) {
    sd_image im;
    sd_clear_error();
    if (png_decode(data, size, "fuzz.png", &im) == 0) {
        size_t bytes = (size_t)im.width * (size_t)im.height * 4 * (im.depth == 16 ? 2 : 1);
        unsigned sum = 0;
        for (size_t i = 0; i < bytes; i++) sum += ((const uint8_t *)im.pixels)[i];   /* every byte written */
        if (im.channels != 4 || (im.depth != 8 && im.depth != 16) || sum == 0xdeadbeefu) abort();
        sd_image_free(&im);
    } else if (strncmp(sd_last_error(), "fuzz.png: ", 10) != 0) {
        abort();   /* every error names the input */
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    decode(data, size);
    uint8_t *fixed = malloc(size ? size : 1);
    if (size) memcpy(fixed, data, size);
    for (size_t pos = 8; size >= 8 && pos + 12 <= size;) {
        size_t len = (size_t)fixed[pos] << 24 | (size_t)fixed[pos + 1] << 16 | (size_t)fixed[pos + 2] << 8 | fixed[pos + 3];
        if (len > size - pos - 12) break;
        uint32_t crc = sd_crc32(0, fixed + pos + 4, len + 4);
        uint8_t *c = fixed + pos + 8 + len;
        c[0] = (uint8_t)(crc >> 24); c[1] = (uint8_t)(crc >> 16); c[2] = (uint8_t)(crc >> 8); c[3] = (uint8_t)crc;
        pos += len + 12;
    }
    decode(fixed, size);
    free(fixed);
    return 0;
}
