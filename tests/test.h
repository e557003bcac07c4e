/* tests/test.h — the tiny test framework: CHECK records a pass or a failure with a message. */
#ifndef SDREF_TEST_H
#define SDREF_TEST_H
#include "sdref.h"
#include <stdio.h>

extern int test_passed, test_failed;
extern const char *test_group;

/* One assertion: counted as passed or failed; a failure prints where and why. */
#define CHECK(cond, ...) do { \
    if (cond) test_passed++; \
    else { test_failed++; fprintf(stderr, "FAIL %s:%d [%s] ", __FILE__, __LINE__, test_group); \
           fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); } \
} while (0)

/* Path of a file under the shared data folder ($SDREF_SHARED, default ../shared); 32 rotating buffers. */
const char *shared_path(const char *rel);
/* A fresh temporary directory for this run (created once, removed at exit). */
const char *test_tmpdir(void);
/* Path of a file inside test_tmpdir() (one of 32 rotating buffers: copy it to keep it). */
const char *tmp_path(const char *name);
/* 1 when the shared data folder exists (golden tests are skipped with a note otherwise). */
int have_shared(void);
/* Run a shell command, returning its exit status (for command-line tests of ./sdref). */
int run_cmd(const char *fmt, ...);
/* Environment flag (SDREF_EXHAUSTIVE, SDREF_FULL) set to a non-empty value other than 0. */
int env_flag(const char *name);
/* Array comparisons shared by the model tests: max |a|, max |a - b| (NaN anywhere: infinite),
 * root-mean-square of a - b. */
double max_abs(const float *a, size_t n);
double max_diff(const float *a, const float *b, size_t n);
double rms_diff(const float *a, const float *b, size_t n);
/* A random-weight F16 safetensors with exactly the names and shapes of a shared/spec .tsv (rows
 * whose name starts with `prefix`; I64 buffers as arange): the real layouts, made on the spot.
 * Returns the number of tensors written, -1 on failure. */
int write_spec_file(const char *tsv_rel, const char *prefix, const char *out);
/* Golden-trace walks: every tensor of a golden trace (shared path) whose name starts with
 * `prefix`, in execution order and then its aliases, against sdref's trace of the same run:
 * present, traced in the same order, within rel x its max |golden|; the first that diverges is
 * named. */
const sd_trace_entry *trace_find(const sd_trace *t, const char *name);
void walk_golden_trace(const char *rel_trace, const char *prefix, const sd_trace *ours, double rel, const char *what);
/* The fp16 preset's statistical check against the oracle (golden paths under shared/). */
void check_fp16_stats(const char *what, const float *x, size_t n, const char *rel_fp32, const char *rel_ops);
/* A float .npy (any numeric dtype) as a tensor of up to 4 dimensions; a failure is a CHECK. */
int load_npy(const char *path, sd_tensor *t);
#endif
