/* fuzz/fuzz_safetensors.c — libFuzzer target: the bytes become a file, st_open must either
 * accept it (then every tensor is decoded) or fail with one line naming the file. */
#define _POSIX_C_SOURCE 200809L
#include "sdref.h"
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char path[64];
    snprintf(path, sizeof path, "/tmp/fuzz_st_%ld.safetensors", (long)getpid());
    FILE *f = fopen(path, "wb");
    if (!f) return 0;
    if (size) fwrite(data, 1, size, f);
    fclose(f);
    sd_safetensors st;
    sd_clear_error();
    if (st_open(&st, path) == 0) {
        for (int i = 0; i < st.n; i++) {
            const st_entry *e = &st.entries[i];
            if (st_find(&st, e->name) == NULL) abort();          /* every name can be found */
            size_t n = (size_t)(e->nbytes / st_dtype_size(e->dtype));
            float *v = malloc(n ? n * sizeof *v : 1);
            st_read_f32(&st, e, v);
            free(v);
        }
        st_close(&st);
    } else if (strncmp(sd_last_error(), path, strlen(path)) != 0) {
        abort();                                                 /* the message must name the file */
    }
    remove(path);
    return 0;
}
