/* cli.c — command-line helpers shared by every command: "--flag VALUE" lookup, unknown
 * arguments refused, the common --precision and --threads options. */
#include "sdref.h"
#include <stdlib.h>
#include <string.h>

void args_init(sd_args *a, int argc, char **argv) {
    a->argc = argc;
    a->argv = argv;
    a->used = sd_calloc((size_t)(argc > 0 ? argc : 1), sizeof(int));
    if (argc > 0) a->used[0] = 1;
}

const char *args_value(sd_args *a, const char *flag) {
    for (int i = 1; i < a->argc; i++) {
        if (strcmp(a->argv[i], flag) != 0) continue;
        a->used[i] = 1;
        if (i + 1 >= a->argc) {
            sd_error("%s needs a value", flag);
            return NULL;
        }
        a->used[i + 1] = 1;
        return a->argv[i + 1];
    }
    return NULL;
}

int args_flag(sd_args *a, const char *flag) {
    for (int i = 1; i < a->argc; i++)
        if (strcmp(a->argv[i], flag) == 0) { a->used[i] = 1; return 1; }
    return 0;
}

int args_check_all_used(sd_args *a) {
    if (sd_last_error()[0]) return -1;
    for (int i = 1; i < a->argc; i++)
        if (!a->used[i]) {
            sd_error("unknown or misplaced argument '%s' (see sdref %s --help)", a->argv[i], a->argv[0]);
            return -1;
        }
    return 0;
}

int args_precision(sd_args *a, sd_precision *p) {
    const char *spec = args_value(a, "--precision");
    return sd_precision_parse(spec ? spec : "fp32", p);
}

int args_threads(sd_args *a, int *threads) {
    const char *s = args_value(a, "--threads");
    *threads = 0;
    if (!s) return 0;
    char *end;
    long n = strtol(s, &end, 10);
    if (*end || n < 1 || n > 1024) {
        sd_error("--threads: '%s' is not a thread count (1..1024)", s);
        return -1;
    }
    *threads = (int)n;
    sd_set_threads((int)n);
    return 0;
}

int args_trace(sd_args *a, sd_trace *t, const char **path) {
    memset(t, 0, sizeof *t);
    *path = args_value(a, "--trace");
    int stats_only = args_flag(a, "--trace-stats-only");
    const char *filter = args_value(a, "--trace-filter");
    if (!*path) {
        if (stats_only || filter) {
            sd_error("--trace-stats-only and --trace-filter need --trace FILE.safetensors");
            return -1;
        }
        return 0;
    }
    t->keep_data = !stats_only;
    t->filter = (char *)filter;   /* borrowed from argv */
    return 1;
}

int args_shadow(sd_args *a, sd_precision *ref, const char **report_path, int *nan_check) {
    const char *spec = args_value(a, "--shadow");
    *report_path = args_value(a, "--overflow-report");
    *nan_check = args_flag(a, "--nan-check");
    if (!spec) {
        if (*report_path) {
            sd_error("--overflow-report needs --shadow SPEC (the reference precision, e.g. fp32)");
            return -1;
        }
        return 0;
    }
    if (sd_precision_parse(spec, ref)) return -1;
    return 1;
}

int args_trace_options(sd_args *a, const char *trace_path, sd_trace *t) {
    int stats_only = args_flag(a, "--trace-stats-only");
    const char *filter = args_value(a, "--trace-filter");
    if (!trace_path && (stats_only || filter)) {
        sd_error("--trace-stats-only and --trace-filter need --trace FILE.safetensors");
        return -1;
    }
    t->keep_data = !stats_only;
    t->filter = (char *)filter;   /* borrowed from argv */
    return 0;
}
