/* fuzz/fuzz_npy.c — libFuzzer target: the bytes become a .npy file; npy_read and npy_read_f32
 * must either accept it or fail with one line naming the file. */
#define _POSIX_C_SOURCE 200809L
#include "sdref.h"
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char path[64];
    snprintf(path, sizeof path, "/tmp/fuzz_npy_%ld.npy", (long)getpid());
    FILE *f = fopen(path, "wb");
    if (!f) return 0;
    if (size) fwrite(data, 1, size, f);
    fclose(f);
    sd_npy a;
    sd_clear_error();
    int rc = npy_read(path, &a);
    if (rc == 0) {
        size_t n = 1;
        for (int i = 0; i < a.ndim; i++) n *= (size_t)a.shape[i];
        if (n != a.n) abort();
        npy_free(&a);
        float *v;
        int nd;
        int64_t shape[8];
        if (npy_read_f32(path, &v, &nd, shape, &n) != 0) abort();   /* same file: must succeed again */
        free(v);
    } else if (strncmp(sd_last_error(), path, strlen(path)) != 0) {
        abort();
    }
    remove(path);
    return 0;
}
