/* tests/run.c — the test runner: runs every group (or those named on the command line) and
 * ends with the line "N passed, M failed". */
#define _POSIX_C_SOURCE 200809L
#include "test.h"
#include <math.h>
#include <stdint.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

int test_passed, test_failed;
const char *test_group = "";

/* The groups, one per test file (tests/test_<group>.c). */
#define TEST_GROUPS(X) \
    X(fp16) X(math) X(io) X(png) X(tokenizer) X(ops) X(policy) X(vae) X(unet) X(clip) \
    X(ipadapter) X(sampler) X(pipeline) X(lab) X(cli)
#define DECLARE(g) void test_##g(void);
TEST_GROUPS(DECLARE)
#define ENTRY(g) { #g, test_##g },
static const struct { const char *name; void (*fn)(void); } groups[] = { TEST_GROUPS(ENTRY) };

static char shared_dir[2048];
static char tmp_dir[2048];

const char *shared_path(const char *rel) {
    static char buf[32][4352];
    static int k;
    k = (k + 1) % 32;
    snprintf(buf[k], sizeof buf[k], "%s/%s", shared_dir, rel);
    return buf[k];
}

int have_shared(void) {
    struct stat s;
    return stat(shared_path("golden/tiny_a/manifest.json"), &s) == 0;
}

const char *test_tmpdir(void) {
    if (!tmp_dir[0]) {
        const char *base = getenv("TMPDIR");
        snprintf(tmp_dir, sizeof tmp_dir, "%s/sdref-test-XXXXXX", base && *base ? base : "/tmp");
        if (!mkdtemp(tmp_dir)) sd_fatal("cannot create a temporary directory");
    }
    return tmp_dir;
}

const char *tmp_path(const char *name) {
    static char buf[32][4352];
    static int k;
    k = (k + 1) % 32;
    snprintf(buf[k], sizeof buf[k], "%s/%s", test_tmpdir(), name);
    return buf[k];
}

int run_cmd(const char *fmt, ...) {
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    int rc = system(cmd);
    if (rc == -1) return -1;
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : 128;
}

int env_flag(const char *name) {
    const char *v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}

double max_abs(const float *a, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) m = fabs(a[i]) > m ? fabs(a[i]) : m;
    return m;
}

double max_diff(const float *a, const float *b, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d != d) return INFINITY;
        m = d > m ? d : m;
    }
    return m;
}

double rms_diff(const float *a, const float *b, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
    return n ? sqrt(s / (double)n) : 0;
}

/* FNV-1a of a name: each tensor's random values depend on its name only. */
static uint64_t spec_hash(const char *s) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 0x100000001b3ull;
    return h;
}

/* Plausible random values: weights ~ U with unit-variance fan-in scaling, norm weights near 1,
 * biases small, embeddings +-0.5. */
static void fill_random(float *v, size_t n, const char *name, int ndim, const int64_t *shape) {
    uint64_t s = spec_hash(name) | 1;
    double fan_in = 1;
    for (int d = 1; d < ndim; d++) fan_in *= (double)shape[d];
    int norm = ndim == 1 && strstr(name, "norm") && strstr(name, "weight");
    int bias = ndim == 1 && !norm;
    double amp = ndim >= 2 && !strstr(name, "embedding.weight") ? sqrt(3.0 / fan_in) : 0.5;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        double u = (double)(s >> 11) / 9007199254740992.0 * 2 - 1;
        v[i] = (float)(norm ? 1 + 0.1 * u : bias ? 0.02 * u : amp * u);
    }
}

int write_spec_file(const char *tsv, const char *prefix, const char *out) {
    uint8_t *text;
    size_t len;
    if (sd_read_file(shared_path(tsv), &text, &len)) return -1;
    st_writer w;
    st_writer_init(&w);
    int count = 0;
    for (char *line = (char *)text; line && *line; ) {
        char *nl = strchr(line, '\n');
        if (nl) *nl = 0;
        char *f[4] = { line, NULL, NULL, NULL };
        for (int k = 1; k < 4 && f[k - 1]; k++) {
            char *tab = strchr(f[k - 1], '\t');
            if (tab) { *tab = 0; f[k] = tab + 1; }
        }
        if (line[0] != '#' && f[3] && strcmp(f[0], "name") != 0 && !strncmp(f[0], prefix, strlen(prefix))) {
            int64_t shape[8];
            int nd = 0;
            for (char *q = f[2]; *q && nd < 8; ) {
                shape[nd++] = strtoll(q, &q, 10);
                if (*q == ',') q++;
            }
            size_t n = 1;
            for (int d = 0; d < nd; d++) n *= (size_t)shape[d];
            if (!strcmp(f[1], "I64")) {                          /* position_ids buffer: arange */
                uint8_t *b = calloc(n, 8);
                for (size_t k = 0; k < n; k++)
                    for (int by = 0; by < 8; by++) b[k * 8 + by] = (uint8_t)((uint64_t)k >> (8 * by));
                st_writer_add_raw(&w, f[0], ST_I64, nd, shape, b, n * 8);
                free(b);
            } else {
                const char *src = strchr(f[3], ':') ? strchr(f[3], ':') + 1 : f[0];
                float *v = malloc(n * sizeof(float));
                fill_random(v, n, src, nd, shape);
                st_writer_add_f16(&w, f[0], nd, shape, v);
                free(v);
            }
            count++;
        }
        line = nl ? nl + 1 : NULL;
    }
    free(text);
    if (st_writer_write(&w, out)) count = -1;
    st_writer_free(&w);
    return count;
}

/* Diffusers modules sdref does not trace: Dropout (identity) and to_out.1 (its dropout). */
static int untraced(const char *name) {
    size_t n = strlen(name);
    return (n > 8 && strcmp(name + n - 8, ".dropout") == 0) || (n > 9 && strcmp(name + n - 9, ".to_out.1") == 0);
}

const sd_trace_entry *trace_find(const sd_trace *t, const char *name) {
    for (int i = 0; i < t->n; i++)
        if (strcmp(t->e[i].name, name) == 0) return &t->e[i];
    return NULL;
}

/* A metadata value of a golden trace ("order", "aliases"), itself JSON text, parsed. */
static int golden_meta(const sd_safetensors *st, const char *key, sd_json *out) {
    sd_json meta;
    int rc = -1;
    if (!st->metadata_json || json_parse(st->metadata_json, strlen(st->metadata_json), "metadata", &meta) != 0) return -1;
    const char *text = json_str(&meta, key, NULL);
    if (text) rc = json_parse(text, strlen(text), key, out);
    json_free(&meta);
    return rc;
}

/* Compare each golden tensor whose name starts with `prefix` (in execution order, then the
 * aliases) with sdref's; name the first that diverges by more than rel x its max |golden|,
 * and check sdref traced them in the same order. */
void walk_golden_trace(const char *rel_trace, const char *prefix, const sd_trace *ours, double rel, const char *what) {
    sd_safetensors st;
    if (st_open(&st, shared_path(rel_trace)) != 0) {
        CHECK(0, "%s: %s", rel_trace, sd_last_error());
        return;
    }
    sd_json order, aliases;
    int have_aliases = golden_meta(&st, "aliases", &aliases) == 0 && aliases.type == JSON_OBJECT;
    if (golden_meta(&st, "order", &order) != 0 || order.type != JSON_ARRAY) {
        CHECK(0, "%s: no order metadata", rel_trace);
        st_close(&st);
        return;
    }
    int compared = 0, missing = 0, last_pos = -1, out_of_order = 0;
    const char *first_bad = NULL;
    double first_bad_err = 0, worst = 0;
    size_t pl = strlen(prefix);
    int total = order.n + (have_aliases ? aliases.n : 0);
    for (int i = 0; i < total; i++) {
        const char *name, *stored;
        if (i < order.n) name = stored = order.items[i].str;
        else {
            name = aliases.keys[i - order.n];
            stored = aliases.items[i - order.n].str;
        }
        if (!name || !stored || strncmp(name, prefix, pl) != 0 || untraced(name)) continue;
        const st_entry *e = st_find(&st, stored);
        const sd_trace_entry *t = trace_find(ours, name);
        if (!e || !t || !t->data) {
            if (!missing) CHECK(0, "%s: sdref's trace has no '%s'", what, name);
            missing++;
            continue;
        }
        if (i < order.n) {                                   /* execution order */
            int pos = (int)(t - ours->e);
            if (pos < last_pos && !out_of_order++) CHECK(0, "%s: '%s' traced before its predecessor", what, name);
            last_pos = pos;
        }
        size_t n = 1, tn = 1;
        for (int d = 0; d < e->ndim; d++) n *= (size_t)e->shape[d];
        for (int d = 0; d < 4; d++) tn *= (size_t)t->shape[d];
        if (n != tn) {                                       /* same values in the same order; layouts may differ */
            CHECK(0, "%s: '%s' has %zu elements, golden %zu", what, name, tn, n);
            continue;
        }
        float *g = malloc(n * sizeof(float) + 4);
        st_read_f32(&st, e, g);
        double m = max_abs(g, n), d = max_diff(t->data, g, n), r = m > 0 ? d / m : d;
        free(g);
        compared++;
        if (r > worst) worst = r;
        if (r > rel && !first_bad) {
            first_bad = name;
            first_bad_err = r;
        }
    }
    CHECK(compared > 0 && missing == 0, "%s: %d tensors compared, %d missing from sdref's trace", what, compared, missing);
    CHECK(!first_bad, "%s: first module to diverge: %s (max |diff| / max |golden| = %.3g)", what, first_bad ? first_bad : "",
          first_bad_err);
    if (env_flag("SDREF_VERBOSE")) fprintf(stderr, "  %s: %d tensors, worst relative error %.3g\n", what, compared, worst);
    json_free(&order);
    if (have_aliases) json_free(&aliases);
    st_close(&st);
}

/* The fp16 preset against the oracle: every value fp16-representable; RMS from the fp32 golden
 * within +-30% of the oracle's own fp16ops run; RMS from that run at most 1.6x it. */
void check_fp16_stats(const char *what, const float *x, size_t n, const char *rel_fp32, const char *rel_ops) {
    float *g32, *gops;
    int nd;
    int64_t s[8];
    size_t n32, nops;
    if (npy_read_f32(shared_path(rel_fp32), &g32, &nd, s, &n32)) { CHECK(0, "%s: %s", what, sd_last_error()); sd_clear_error(); return; }
    if (npy_read_f32(shared_path(rel_ops), &gops, &nd, s, &nops)) { CHECK(0, "%s: %s", what, sd_last_error()); sd_clear_error(); free(g32); return; }
    CHECK(n == n32 && n == nops, "%s: size", what);
    if (n == n32 && n == nops) {
        size_t bad = 0;
        for (size_t i = 0; i < n; i++) bad += !sd_is_representable(x[i], SD_F16);
        double oracle = rms_diff(gops, g32, n), ours = rms_diff(x, g32, n), to_ops = rms_diff(x, gops, n);
        CHECK(bad == 0, "%s: %zu values not fp16-representable", what, bad);
        CHECK(ours >= 0.7 * oracle && ours <= 1.3 * oracle, "%s: RMS from fp32 %.3g, oracle's fp16ops %.3g (allowed +-30%%)",
              what, ours, oracle);
        CHECK(to_ops <= 1.6 * oracle, "%s: RMS from fp16ops %.3g > 1.6 x %.3g", what, to_ops, oracle);
        fprintf(stderr, "  %s: RMS vs fp32 %.4g (oracle %.4g, ratio %.3f); vs fp16ops %.4g (%.3f x)\n", what, ours, oracle,
                ours / oracle, to_ops, to_ops / oracle);
    }
    free(g32);
    free(gops);
}

int load_npy(const char *path, sd_tensor *t) {
    float *data;
    int ndim;
    int64_t shape[8];
    size_t n;
    memset(t, 0, sizeof *t);
    if (npy_read_f32(path, &data, &ndim, shape, &n) != 0) {
        CHECK(0, "cannot read %s: %s", path, sd_last_error());
        return -1;
    }
    t->ndim = ndim;
    for (int d = 0; d < 4; d++) t->shape[d] = d < ndim ? (int)shape[d] : 1;
    t->data = data;
    return 0;
}

static void cleanup(void) {
    if (tmp_dir[0] && !env_flag("SDREF_KEEP_TMP")) {
        char cmd[4200];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp_dir);
        if (system(cmd) != 0) fprintf(stderr, "warning: could not remove %s\n", tmp_dir);
    }
}

uint64_t ops_checksum(void);

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "--checksum") == 0) {   /* CI compares this across builds */
        printf("ops checksum %016llx\n", (unsigned long long)ops_checksum());
        return 0;
    }
    const char *s = getenv("SDREF_SHARED");
    snprintf(shared_dir, sizeof shared_dir, "%s", s && *s ? s : "../shared");
    atexit(cleanup);
    if (!have_shared())
        fprintf(stderr, "note: %s not found; golden-data tests will fail (set SDREF_SHARED)\n", shared_dir);
    int ran = 0;
    for (size_t i = 0; i < sizeof groups / sizeof groups[0]; i++) {
        int want = argc < 2;
        for (int a = 1; a < argc; a++) want |= strcmp(argv[a], groups[i].name) == 0;
        if (!want) continue;
        int p0 = test_passed, f0 = test_failed;
        test_group = groups[i].name;
        groups[i].fn();
        fprintf(stderr, "[%s] %d passed, %d failed\n", groups[i].name, test_passed - p0, test_failed - f0);
        ran++;
    }
    if (!ran) fprintf(stderr, "no test group matched\n");
    printf("%d passed, %d failed\n", test_passed, test_failed);
    return test_failed ? 1 : 0;
}
