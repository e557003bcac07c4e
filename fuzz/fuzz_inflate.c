/* fuzz/fuzz_inflate.c — libFuzzer target for zlib/gzip. The first byte picks what the rest is:
 *   0: a zlib stream for sd_zlib_inflate
 *   1: a .gz file for sd_gunzip
 *   2: raw deflate data (a valid zlib header is put in front), to reach the block decoder
 *   3: data to compress with sd_zlib_deflate at level data[1] % 10; it must inflate back. */
#include "sdref.h"
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    uint8_t *out = NULL, *buf;
    size_t out_len, max_out = (size_t)1 << 22;
    int mode = data[0] % 4;
    data++;
    size--;
    sd_clear_error();
    switch (mode) {
    case 0:
        if (sd_zlib_inflate(data, size, &out, &out_len, max_out) == 0) free(out);
        break;
    case 1:
        if (sd_gunzip(data, size, &out, &out_len, max_out) == 0) free(out);
        break;
    case 2:
        buf = malloc(size + 2);
        buf[0] = 0x78;
        buf[1] = 0x9c;
        memcpy(buf + 2, data, size);
        if (sd_zlib_inflate(buf, size + 2, &out, &out_len, max_out) == 0) free(out);
        free(buf);
        break;
    default: {
        int level = size ? data[0] % 10 : 6;
        uint8_t *z;
        size_t zn;
        sd_zlib_deflate(data, size, level, &z, &zn);
        if (sd_zlib_inflate(z, zn, &out, &out_len, size) != 0 || out_len != size || (size && memcmp(out, data, size) != 0))
            abort();   /* deflate produced something inflate does not give back */
        free(out);
        free(z);
        break;
    }
    }
    return 0;
}
