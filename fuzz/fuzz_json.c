/* fuzz/fuzz_json.c — libFuzzer target: json_parse from memory must accept the bytes or fail
 * with "<what>: byte N: ..."; an accepted document's strings survive json_write_string. */
#define _POSIX_C_SOURCE 200809L
#include "sdref.h"
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Every string (keys too) written as a JSON literal parses back to itself. */
static void check_strings(const sd_json *j, FILE *f) {
    const char *s = j->type == JSON_STRING ? j->str : NULL;
    if (s && strlen(s) == j->str_len) {                 /* json_write_string takes C strings */
        rewind(f);
        json_write_string(f, s);
        long n = ftell(f);
        char *buf = malloc((size_t)n + 1);
        rewind(f);
        if (fread(buf, 1, (size_t)n, f) != (size_t)n) abort();
        sd_json back;
        if (json_parse(buf, (size_t)n, "back", &back) != 0 || back.type != JSON_STRING || strcmp(back.str, s) != 0) abort();
        json_free(&back);
        free(buf);
    }
    for (int i = 0; i < j->n; i++) {
        check_strings(&j->items[i], f);
        if (j->type == JSON_OBJECT && json_get(j, j->keys[i]) == NULL) abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static FILE *scratch;
    if (!scratch) scratch = tmpfile();
    sd_json j;
    sd_clear_error();
    if (json_parse((const char *)data, size, "fuzz", &j) == 0) {
        if (scratch) check_strings(&j, scratch);
        json_free(&j);
    } else if (strncmp(sd_last_error(), "fuzz: byte ", 11) != 0) {
        abort();
    }
    return 0;
}
