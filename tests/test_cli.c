/* tests/test_cli.c — the command line as users meet it: help, unknown commands, the demo, and
 * the overflow hunt on the golden SDXL-like VAE (`vae-decode --precision fp16 --shadow fp32
 * --overflow-report`) against overflow_facts.json. */
#include "test.h"
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static int exists(const char *p) {
    struct stat s;
    return stat(p, &s) == 0;
}

/* The string value of obj[k1][k2] ("" when absent). */
static const char *get2(const sd_json *j, const char *k1, const char *k2) {
    const sd_json *a = json_get(j, k1);
    return a ? json_str(a, k2, "") : "";
}

static void test_overflow_report(void) {
    char dir[1024], out[1100], rep[1100], facts[1100], cmd[8192];
    snprintf(dir, sizeof dir, "%s", shared_path("golden/tiny_a_overflow"));
    snprintf(out, sizeof out, "%s", tmp_path("ovf.npy"));
    snprintf(rep, sizeof rep, "%s", tmp_path("ovf_report.json"));
    snprintf(facts, sizeof facts, "%s/overflow_facts.json", dir);
    snprintf(cmd, sizeof cmd, "./sdref vae-decode --model %s/vae.safetensors --config %s/vae_config.json --latent %s/vae_decode_in.npy "
             "--precision fp16 --shadow fp32 --overflow-report %s -o %s 2>/dev/null", dir, dir, dir, rep, out);
    CHECK(run_cmd("%s", cmd) == 0, "vae-decode --shadow fp32 --overflow-report runs");
    sd_json r, f;
    if (json_parse_file(rep, &r)) { CHECK(0, "overflow report parses: %s", sd_last_error()); sd_clear_error(); return; }
    if (json_parse_file(facts, &f)) { CHECK(0, "facts parse"); json_free(&r); return; }
    const sd_json *fp32 = json_get(&f, "fp32"), *fp16 = json_get(&f, "fp16ops");
    const char *want_over = json_str(fp32, "first_module_over_fp16_max_trace_name", "?");
    const char *want_inf = json_str(fp16, "first_module_with_inf_trace_name", "?");
    const char *want_nan = json_str(fp16, "first_module_with_nan_trace_name", "?");
    CHECK(strcmp(get2(&r, "first_overflow", "module"), want_over) == 0, "first overflow %s (facts: %s)", get2(&r, "first_overflow", "module"), want_over);
    CHECK(strcmp(get2(&r, "first_inf", "module"), want_inf) == 0, "first Inf %s (facts: %s)", get2(&r, "first_inf", "module"), want_inf);
    CHECK(strcmp(get2(&r, "first_nan", "module"), want_nan) == 0, "first NaN %s (facts: %s)", get2(&r, "first_nan", "module"), want_nan);
    double got = json_num(json_get(&r, "first_overflow"), "max_abs_ref", 0);
    double want = json_num(fp32, "first_module_over_fp16_max_max_abs", -1);
    CHECK(got > 0 && (got - want) / want < 1e-5 && (want - got) / want < 1e-5, "magnitude there %.2f (facts: %.2f)", got, want);
    const sd_json *layers = json_get(&r, "layers");
    CHECK(layers && layers->type == JSON_ARRAY && layers->n > 50, "the report lists every layer (%d)", layers ? layers->n : 0);
    json_free(&r);
    json_free(&f);

    /* --nan-check stops at the first Inf/NaN (exit 3), writes nothing */
    char out2[1100];
    snprintf(out2, sizeof out2, "%s", tmp_path("ovf_check.npy"));
    int rc = run_cmd("./sdref vae-decode --model %s/vae.safetensors --config %s/vae_config.json --latent %s/vae_decode_in.npy "
                     "--precision fp16 --nan-check -o %s 2>/dev/null", dir, dir, dir, out2);
    CHECK(rc == 3 && !exists(out2), "--nan-check stops with exit 3 and no output (exit %d)", rc);
    /* --nan-fallback fp32 gives the float32 picture */
    rc = run_cmd("./sdref vae-decode --model %s/vae.safetensors --config %s/vae_config.json --latent %s/vae_decode_in.npy "
                 "--precision fp16 --nan-fallback fp32 -o %s 2>/dev/null", dir, dir, dir, out2);
    CHECK(rc == 0, "--nan-fallback fp32 runs");
    rc = run_cmd("./sdref compare %s %s/vae_decode_out.npy --rtol 1e-5 --quiet > /dev/null", out2, dir);
    CHECK(rc == 0, "--nan-fallback fp32 decodes like the float32 golden output");
}

static void test_basics(void) {
    CHECK(run_cmd("./sdref --help > /dev/null") == 0, "--help exits 0");
    CHECK(run_cmd("./sdref > /dev/null 2>&1") == 2, "no command: usage, exit 2");
    CHECK(run_cmd("./sdref frobnicate > /dev/null 2>&1") == 2, "unknown command: exit 2");
    CHECK(run_cmd("./sdref vae-decode --help | grep -q -- --latent") == 0, "per-command --help shows its options");
    CHECK(run_cmd("./sdref vae-decode --model x --latent y -o z.npy --precision fp17 2> %s", tmp_path("p.err")) == 2 ||
          run_cmd("./sdref vae-decode --model x --latent y -o z.npy --precision fp17 2>/dev/null") != 0, "a bad precision spec is refused");
    uint8_t *e;
    size_t n;
    if (sd_read_file(tmp_path("p.err"), &e, &n) == 0) {
        CHECK(strstr((char *)e, "fp16-vae32") != NULL, "the precision error lists what is valid: %s", (char *)e);
        free(e);
    }
}

/* The README's first command: `./sdref demo` must run without any file and tell its story. */
static void test_demo(void) {
    char dir[1100], log[1100];
    snprintf(dir, sizeof dir, "%s", tmp_path("demo"));
    snprintf(log, sizeof log, "%s", tmp_path("demo.log"));
    int rc = run_cmd("./sdref demo --out %s > %s 2>&1", dir, log);
    CHECK(rc == 0, "sdref demo runs (exit %d)", rc);
    uint8_t *t = NULL;
    size_t n = 0;
    if (sd_read_file(log, &t, &n) == 0) {
        const char *s = (const char *)t;
        CHECK(strstr(s, "first layer beyond fp16's largest value 65504") != NULL, "the demo names where fp16 overflowed");
        CHECK(strstr(s, "first NaN") != NULL, "the demo names the first NaN");
        CHECK(strstr(s, "PSNR") != NULL, "the demo measures the pictures");
        CHECK(strstr(s, "txt2img --model") != NULL, "the demo says how to run a real checkpoint");
        free(t);
    }
    const char *pngs[3] = { "fp32.png", "fp16.png", "fp16-vae32.png" };
    for (int i = 0; i < 3; i++) {
        char p[1200];
        snprintf(p, sizeof p, "%s/%s", dir, pngs[i]);
        sd_image im;
        int ok = png_read_file(p, &im) == 0;
        CHECK(ok && im.width == 128 && im.height == 128, "demo wrote %s (a 128x128 PNG)", pngs[i]);
        if (ok) sd_image_free(&im);
        uint8_t *d;
        size_t len;
        if (sd_read_file(p, &d, &len) == 0) {
            int found = 0;
            for (size_t k = 0; k + 12 < len; k++) found |= memcmp(d + k, "parameters", 10) == 0;
            CHECK(found, "%s carries its generation parameters", pngs[i]);
            free(d);
        }
    }
}

void test_cli(void) {
    if (!exists("./sdref")) { CHECK(0, "./sdref not built"); return; }
    test_basics();
    if (have_shared()) test_overflow_report();
    test_demo();
}
