/* tests/test_lab.c — the precision laboratory:
 *   compare: every figure against values computed by hand on small arrays (incl. ulps across
 *            zero and NaN), exit codes 0/1/2, the --json table; a golden trace against itself
 *            passes and a copy with one tensor perturbed fails, naming that tensor;
 *   image metrics on synthetic images with known answers;
 *   shadow run of tiny_a_overflow's VAE (fp16 against fp32): first overflow, Inf and NaN are the
 *            modules overflow_facts.json names;
 *   --nan-check and --nan-fallback on txt2img with that VAE;
 *   report: a self-contained HTML page with every section, rendered by headless Chromium when
 *            it is installed (no console errors, a screenshot that decodes). */
#define _POSIX_C_SOURCE 200809L
#include "test.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static int exists(const char *p) {
    struct stat s;
    return stat(p, &s) == 0;
}

static void write_f32(const char *path, const float *v, int n) {
    int64_t shape[1] = { n };
    if (npy_write(path, NPY_F32, 1, shape, v)) { CHECK(0, "write %s: %s", path, sd_last_error()); sd_clear_error(); }
}

static int near(double a, double b, double rel) { return fabs(a - b) <= rel * fabs(b) + 1e-300; }

/* the first tensor object of a compare --json file */
static int read_json(const char *path, sd_json *j) {
    if (json_parse_file(path, j)) { CHECK(0, "parse %s: %s", path, sd_last_error()); sd_clear_error(); return -1; }
    return 0;
}

static const sd_json *first_tensor(const sd_json *j) {
    const sd_json *t = json_get(j, "tensors");
    return t && t->type == JSON_ARRAY && t->n > 0 ? &t->items[0] : NULL;
}

/* ======================================================================================
 * compare on small arrays: figures computed by hand
 * ====================================================================================== */

static void test_compare_figures(void) {
    /* A (tested) vs B (reference): differences 0, 0.5, 1, 0 */
    float a[4] = { 1.0f, 2.0f, -3.0f, 0.5f }, b[4] = { 1.0f, 2.5f, -2.0f, 0.5f };
    sd_cmp_stats s;
    sd_compare_arrays(a, b, 4, &s);
    double cosine = (1 + 5 + 6 + 0.25) / sqrt((1 + 4 + 9 + 0.25) * (1 + 6.25 + 4 + 0.25));
    CHECK(s.max_abs == 1.0, "max abs 1 (%g)", s.max_abs);
    CHECK(s.max_rel == 0.5, "max rel 1/2 (%g)", s.max_rel);
    CHECK(s.mean_abs == 0.375, "mean abs 1.5/4 (%g)", s.mean_abs);
    CHECK(near(s.rms, sqrt(1.25 / 4), 1e-15), "rms sqrt(1.25/4) (%.17g)", s.rms);
    CHECK(near(s.cosine, cosine, 1e-15), "cosine 12.25/sqrt(14.25*11.5) (%.17g vs %.17g)", s.cosine, cosine);
    /* 2.0 = 0x40000000, 2.5 = 0x40200000: 2^21 ulps; -3 vs -2: 2^22. fp16: 0x4000/0x4100 = 256, 0xc200/0xc000 = 512 */
    CHECK(s.ulp32_max == 4194304 && s.ulp32_median == 1048576, "fp32 ulps max 2^22, median (0+2^21)/2 (%g, %g)",
          s.ulp32_max, s.ulp32_median);
    CHECK(s.ulp16_max == 512 && s.ulp16_median == 128, "fp16 ulps max 512, median 128 (%g, %g)", s.ulp16_max, s.ulp16_median);
    CHECK(s.identical == 0.5 && s.max_abs_ref == 2.5 && s.nan_mismatch == 0, "half identical, max|B| 2.5 (%g, %g)", s.identical,
          s.max_abs_ref);

    /* across zero: -2^-24 vs 2^-24 (fp16's smallest subnormal: 2 fp16 ulps), -0 vs +0 (0 ulps, not
     * bit-identical), -2^-149 vs 2^-149 (2 fp32 ulps; both 0 in fp16) */
    float za[4] = { -0x1p-24f, -0.0f, 1.0f, -0x1p-149f }, zb[4] = { 0x1p-24f, 0.0f, 1.0f, 0x1p-149f };
    sd_compare_arrays(za, zb, 4, &s);
    CHECK(s.ulp32_max == 2.0 * 0x33800000 && s.ulp32_median == 1, "fp32 ulps across zero: max 2*0x33800000, median 1 (%g, %g)",
          s.ulp32_max, s.ulp32_median);
    CHECK(s.ulp16_max == 2 && s.ulp16_median == 0, "fp16 ulps across zero: max 2, median 0 (%g, %g)", s.ulp16_max, s.ulp16_median);
    CHECK(s.identical == 0.25, "-0 and +0 are not bit-identical (%g)", s.identical);
    CHECK(s.max_rel == 2 && s.max_abs == 0x1p-23, "max rel 2, max abs 2^-23 (%g, %g)", s.max_rel, s.max_abs);

    /* NaN: NaN = NaN is identical; NaN against a number is a mismatch, never within tolerance */
    float na[3] = { NAN, 1.0f, NAN }, nb[3] = { NAN, 1.0f, 2.0f };
    sd_compare_arrays(na, nb, 3, &s);
    sd_tolerance loose = { 1e30, 1, 1e30 };
    CHECK(s.nan_mismatch == 1 && near(s.identical, 2.0 / 3, 1e-15), "one NaN mismatch, 2/3 identical (%lld, %g)",
          (long long)s.nan_mismatch, s.identical);
    CHECK(!sd_compare_within(&s, &loose), "a NaN mismatch is beyond any tolerance");
    sd_compare_arrays(na, na, 3, &s);
    sd_tolerance exact = { 0, 0, -1 };
    CHECK(s.nan_mismatch == 0 && s.identical == 1 && sd_compare_within(&s, &exact), "NaN against NaN at the same places passes");

    /* the same through the command line */
    const char *pa = tmp_path("cmp_a.npy"), *pb = tmp_path("cmp_b.npy"), *js = tmp_path("cmp.json");
    write_f32(pa, a, 4);
    write_f32(pb, b, 4);
    int rc = run_cmd("./sdref compare %s %s --json %s --quiet >/dev/null", pa, pb, js);
    CHECK(rc == 1, "exact comparison of different arrays: exit 1 (%d)", rc);
    sd_json j;
    if (read_json(js, &j) == 0) {
        const sd_json *t = first_tensor(&j);
        CHECK(t != NULL, "--json has a tensors table");
        if (t) {
            CHECK(json_num(t, "max_abs", -1) == 1 && json_num(t, "max_rel", -1) == 0.5 && json_num(t, "mean_abs", -1) == 0.375,
                  "json max_abs 1, max_rel 0.5, mean_abs 0.375");
            CHECK(near(json_num(t, "rms", -1), sqrt(1.25 / 4), 1e-8) && near(json_num(t, "cosine", -1), cosine, 1e-8),
                  "json rms and cosine (%.9g, %.9g)", json_num(t, "rms", -1), json_num(t, "cosine", -1));
            CHECK(json_num(t, "ulp32_max", -1) == 4194304 && json_num(t, "ulp32_median", -1) == 1048576 &&
                  json_num(t, "ulp16_max", -1) == 512 && json_num(t, "ulp16_median", -1) == 128, "json ulp figures");
            CHECK(json_num(t, "identical", -1) == 0.5 && json_bool(t, "within", 1) == 0, "json identical 0.5, not within");
        }
        CHECK(json_int(&j, "beyond_tolerance", -1) == 1 && json_int(&j, "compared", -1) == 1, "json counts");
        json_free(&j);
    }
    /* tolerance edges: max_abs 1, max|B| 2.5... (B's largest finite |value| is 2.5), fp32 ulps 2^22 */
    struct { const char *opt; int rc; } tol[] = {
        { "--atol 1", 0 }, { "--atol 0.99", 1 }, { "--rtol 0.4", 0 }, { "--rtol 0.39", 1 },
        { "--ulps 4194304", 0 }, { "--ulps 4194303", 1 }, { "--atol 0.5 --rtol 0.2", 0 }, { "--atol 0.49 --rtol 0.2", 1 },
    };
    for (size_t i = 0; i < sizeof tol / sizeof tol[0]; i++) {
        rc = run_cmd("./sdref compare %s %s %s --quiet >/dev/null", pa, pb, tol[i].opt);
        CHECK(rc == tol[i].rc, "compare %s: exit %d (got %d)", tol[i].opt, tol[i].rc, rc);
    }
    rc = run_cmd("./sdref compare %s %s --quiet >/dev/null", pa, pa);
    CHECK(rc == 0, "an array against itself: exit 0 (%d)", rc);

    /* NaN through the command line: NaN = NaN passes, NaN vs a number fails; JSON writes non-finite as null */
    const char *pn = tmp_path("cmp_nan.npy"), *pm = tmp_path("cmp_nan2.npy"), *jn = tmp_path("cmp_nan.json");
    write_f32(pn, na, 3);
    write_f32(pm, nb, 3);
    CHECK(run_cmd("./sdref compare %s %s --quiet >/dev/null", pn, pn) == 0, "NaN at the same places: exit 0");
    rc = run_cmd("./sdref compare %s %s --atol 100 --json %s --quiet >/dev/null", pn, pm, jn);
    CHECK(rc == 1, "a NaN mismatch fails even at --atol 100 (%d)", rc);
    if (read_json(jn, &j) == 0) {
        const sd_json *t = first_tensor(&j);
        CHECK(t && json_int(t, "nan_mismatch", -1) == 1 && json_get(t, "max_abs") && json_get(t, "max_abs")->type == JSON_NULL,
              "json: nan_mismatch 1, max_abs null (infinite)");
        json_free(&j);
    }

    /* bad input: exit 2 with one line */
    const char *junk = tmp_path("junk.npy");
    FILE *f = fopen(junk, "wb");
    if (f) { fputs("not an npy file", f); fclose(f); }
    CHECK(run_cmd("./sdref compare %s %s 2>/dev/null >/dev/null", junk, pa) == 2, "a malformed .npy: exit 2");
    CHECK(run_cmd("./sdref compare %s %s 2>/dev/null >/dev/null", tmp_path("absent.npy"), pa) == 2, "a missing file: exit 2");
    CHECK(run_cmd("./sdref compare %s 2>/dev/null >/dev/null", pa) == 2, "one file only: exit 2");
    CHECK(run_cmd("./sdref compare %s %s --atol -1 2>/dev/null >/dev/null", pa, pb) == 2, "a negative --atol: exit 2");
    CHECK(run_cmd("./sdref compare %s %s --frobnicate 2>/dev/null >/dev/null", pa, pb) == 2, "an unknown option: exit 2");
    CHECK(run_cmd("./sdref compare %s %s 2>&1 | grep -q 'sdref compare: .*junk.npy'", junk, pa) == 0,
          "the error line names the file");
    CHECK(run_cmd("./sdref compare %s %s --quiet >/dev/null 2>&1", pa, pn) == 1, "different sizes: beyond tolerance (exit 1)");
}

/* ======================================================================================
 * trace against trace
 * ====================================================================================== */

/* Copy a trace with every tensor as float32, the metadata ("order") kept, one tensor scaled. */
static int perturbed_copy(const char *src, const char *dst, const char *victim, double *victim_max) {
    sd_safetensors st;
    if (st_open(&st, src)) return -1;
    st_writer w;
    st_writer_init(&w);
    if (st.metadata_json) st_writer_set_metadata(&w, st.metadata_json);
    for (int i = 0; i < st.n; i++) {
        const st_entry *e = &st.entries[i];
        size_t n = 1;
        for (int d = 0; d < e->ndim; d++) n *= (size_t)e->shape[d];
        float *x = sd_malloc((n ? n : 1) * sizeof(float));
        st_read_f32(&st, e, x);
        if (victim && strcmp(e->name, victim) == 0) {
            size_t at = 0;
            for (size_t k = 0; k < n; k++)
                if (fabsf(x[k]) > fabsf(x[at])) at = k;
            *victim_max = fabs(x[at]);
            x[at] *= 1.001f;                              /* 1e-3 x max|x|: far beyond 1e-5 relative */
        }
        st_writer_add_f32(&w, e->name, e->ndim, e->shape, x);
        free(x);
    }
    int rc = st_writer_write(&w, dst);
    st_writer_free(&w);
    st_close(&st);
    return rc;
}

static void test_compare_traces(void) {
    const char *golden = shared_path("golden/tiny_a/trace.safetensors");
    const char *js = tmp_path("trace_self.json");
    int rc = run_cmd("./sdref compare %s %s --rtol 1e-5 --json %s --quiet >/dev/null", golden, golden, js);
    CHECK(rc == 0, "the golden trace against itself: exit 0 (%d)", rc);
    sd_json j;
    int compared = 0;
    if (read_json(js, &j) == 0) {
        compared = json_int(&j, "compared", 0);
        CHECK(compared >= 200 && json_int(&j, "beyond_tolerance", -1) == 0, "every tensor compared and within (%d)", compared);
        CHECK(json_get(&j, "first_beyond") && json_get(&j, "first_beyond")->type == JSON_NULL, "first_beyond is null");
        json_free(&j);
    }
    /* the victim: a tensor in the middle of the execution order */
    sd_safetensors st;
    char victim[256] = "";
    if (st_open(&st, golden) == 0) {
        sd_json meta, order;
        if (st.metadata_json && json_parse(st.metadata_json, strlen(st.metadata_json), "meta", &meta) == 0) {
            const char *o = json_str(&meta, "order", NULL);
            if (o && json_parse(o, strlen(o), "order", &order) == 0) {
                if (order.type == JSON_ARRAY && order.n > 10) snprintf(victim, sizeof victim, "%s", order.items[order.n / 2].str);
                json_free(&order);
            }
            json_free(&meta);
        }
        st_close(&st);
    }
    sd_clear_error();
    CHECK(victim[0], "the golden trace has an execution order");
    if (!victim[0]) return;
    const char *copy = tmp_path("trace_perturbed.safetensors"), *jp = tmp_path("trace_perturbed.json"),
               *out = tmp_path("trace_perturbed.txt");
    double vmax = 0;
    CHECK(perturbed_copy(golden, copy, victim, &vmax) == 0, "write the perturbed copy: %s", sd_last_error());
    rc = run_cmd("./sdref compare %s %s --rtol 1e-5 --json %s > %s", copy, golden, jp, out);
    CHECK(rc == 1, "one tensor perturbed by 1e-3 x max|x|: exit 1 (%d)", rc);
    if (read_json(jp, &j) == 0) {
        const char *first = json_str(&j, "first_beyond", "");
        CHECK(strcmp(first, victim) == 0, "the first tensor beyond tolerance is the perturbed one (%s, expected %s)", first, victim);
        CHECK(json_int(&j, "beyond_tolerance", -1) == 1 && json_int(&j, "compared", 0) == compared,
              "exactly one tensor beyond tolerance (%d)", json_int(&j, "beyond_tolerance", -1));
        const sd_json *t = json_get(&j, "tensors");
        for (int i = 0; t && i < t->n; i++)
            if (strcmp(json_str(&t->items[i], "name", ""), victim) == 0)
                CHECK(near(json_num(&t->items[i], "max_abs", 0), vmax * 0.001, 1e-3), "its max abs is 1e-3 x max|x| (%g vs %g)",
                      json_num(&t->items[i], "max_abs", 0), vmax * 0.001);
        json_free(&j);
    }
    char grep_cmd[600];
    snprintf(grep_cmd, sizeof grep_cmd, "grep -qF 'first tensor beyond tolerance: %s' %s", victim, out);
    CHECK(run_cmd("%s", grep_cmd) == 0, "stdout names %s as the first tensor beyond tolerance", victim);
    /* within a loose tolerance the copy passes again */
    CHECK(run_cmd("./sdref compare %s %s --rtol 2e-3 --quiet >/dev/null", copy, golden) == 0, "within rtol 2e-3: exit 0");
}

/* ======================================================================================
 * image metrics on synthetic images
 * ====================================================================================== */

static float *pattern(int w, int h) {
    float *p = sd_malloc((size_t)w * h * 3 * sizeof(float));
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) {
            float *q = p + ((size_t)y * w + x) * 3;
            q[0] = (float)(20 + (x * 37 + y * 11) % 200);     /* colourful, inside 20..219 */
            q[1] = (float)(20 + (x * 13 + y * 29) % 200);
            q[2] = (float)(20 + (x * 7 + y * 5 + 90) % 200);
        }
    return p;
}

static void test_image_metrics(void) {
    int w = 40, h = 32;
    size_t n = (size_t)w * h * 3;
    float *a = pattern(w, h), *b = sd_malloc(n * sizeof(float));
    sd_image_metrics m;
    sd_image_metrics_compute(a, a, w, h, &m);
    CHECK(isinf(m.psnr) && m.psnr > 0 && m.mse == 0, "identical images: PSNR inf, MSE 0 (%g)", m.psnr);
    CHECK(fabs(m.ssim - 1) < 1e-12, "identical images: SSIM 1 (%.15g)", m.ssim);
    CHECK(m.luma_a == m.luma_b && m.contrast_a == m.contrast_b && m.saturation_a == m.saturation_b, "identical: equal tone figures");

    for (size_t i = 0; i < n; i++) b[i] = a[i] + 10;     /* a constant offset: MSE 100 */
    sd_image_metrics_compute(a, b, w, h, &m);
    CHECK(near(m.mse, 100, 1e-12), "offset 10: MSE 100 (%.15g)", m.mse);
    CHECK(near(m.psnr, 10 * log10(255.0 * 255.0 / 100), 1e-9), "offset 10: PSNR 10 log10(65025/100) = 28.1308 (%.12g)", m.psnr);
    CHECK(near(m.luma_b - m.luma_a, 10, 1e-9) && near(m.contrast_b, m.contrast_a, 1e-9),
          "offset 10: luma +10, contrast unchanged (%g, %g vs %g)", m.luma_b - m.luma_a, m.contrast_b, m.contrast_a);
    CHECK(m.ssim < 1 && m.ssim > 0.9, "offset 10: SSIM a little below 1 (%g)", m.ssim);

    for (size_t i = 0; i < n / 3; i++) {                /* halfway to grey: the same luma, half the chroma */
        double l = 0.299 * a[3 * i] + 0.587 * a[3 * i + 1] + 0.114 * a[3 * i + 2];
        for (int c = 0; c < 3; c++) b[3 * i + c] = (float)(0.5 * a[3 * i + c] + 0.5 * l);
    }
    sd_image_metrics_compute(a, b, w, h, &m);
    CHECK(m.saturation_b < 0.75 * m.saturation_a, "desaturated: saturation ratio < 1 (%g / %g)", m.saturation_b, m.saturation_a);
    CHECK(near(m.luma_b, m.luma_a, 1e-6), "desaturated: same mean luma (%g vs %g)", m.luma_b, m.luma_a);

    /* the same figures from `sdref compare` on PNGs */
    uint8_t *pa = sd_malloc(n), *pb = sd_malloc(n);
    for (size_t i = 0; i < n; i++) { pa[i] = (uint8_t)a[i]; pb[i] = (uint8_t)(a[i] + 10); }
    const char *fa = tmp_path("metrics_a.png"), *fb = tmp_path("metrics_b.png"), *js = tmp_path("metrics.json");
    CHECK(png_write_file(fa, w, h, 3, pa, 0, NULL, NULL) == 0 && png_write_file(fb, w, h, 3, pb, 0, NULL, NULL) == 0, "write PNGs");
    int rc = run_cmd("./sdref compare %s %s --json %s --quiet >/dev/null", fb, fa, js);
    CHECK(rc == 1, "PNGs 10 levels apart: beyond exact tolerance (%d)", rc);
    sd_json j;
    if (read_json(js, &j) == 0) {
        const sd_json *im = json_get(&j, "image");
        CHECK(im && near(json_num(im, "psnr", 0), 10 * log10(650.25), 1e-8), "compare's PSNR of the PNGs is 28.1308 (%.9g)",
              im ? json_num(im, "psnr", 0) : 0);
        json_free(&j);
    }
    free(pa);
    free(pb);
    free(a);
    free(b);
}

/* ======================================================================================
 * shadow run: tiny_a_overflow's VAE decoder, fp16 against fp32
 * ====================================================================================== */

typedef struct vae_job { const char *model, *config, *latent; } vae_job;

static int vae_run(void *arg, const sd_precision *prec, sd_trace *trace) {
    vae_job *k = arg;
    sd_vae *v = vae_load(k->model, k->config, &prec->model[SD_VAE]);
    if (!v) return -1;
    float *d;
    int nd;
    int64_t shape[8];
    size_t n;
    if (npy_read_f32(k->latent, &d, &nd, shape, &n) || nd != 4) { vae_free(v); return -1; }
    sd_tensor z = tensor_new(4, (int)shape[0], (int)shape[1], (int)shape[2], (int)shape[3]);
    memcpy(z.data, d, n * sizeof(float));
    free(d);
    sd_ctx c;
    memset(&c, 0, sizeof c);
    c.pol = prec->model[SD_VAE];
    c.trace = trace;
    c.prefix = "vae";
    sd_tensor img = vae_decode(v, &c, &z);
    int rc = img.data ? 0 : -1;
    tensor_free(&img);
    tensor_free(&z);
    vae_free(v);
    return rc;
}

static void test_shadow_overflow(void) {
    sd_json facts;
    if (json_parse_file(shared_path("golden/tiny_a_overflow/overflow_facts.json"), &facts)) {
        CHECK(0, "read overflow_facts.json: %s", sd_last_error());
        sd_clear_error();
        return;
    }
    const sd_json *f32 = json_get(&facts, "fp32"), *f16 = json_get(&facts, "fp16ops");
    const char *want_over = json_str(f32, "first_module_over_fp16_max_trace_name", "?");
    const char *want_inf = json_str(f16, "first_module_with_inf_trace_name", "?");
    const char *want_nan = json_str(f16, "first_module_with_nan_trace_name", "?");
    double want_max = json_num(f32, "first_module_over_fp16_max_max_abs", 0);
    vae_job k = { shared_path("golden/tiny_a_overflow/vae.safetensors"), shared_path("golden/tiny_a_overflow/vae_config.json"),
                  shared_path("golden/tiny_a_overflow/vae_decode_in.npy") };
    sd_precision fp16, fp32;
    sd_precision_parse("fp16", &fp16);
    sd_precision_parse("fp32", &fp32);
    sd_shadow_result r;
    int rc = sd_shadow_run(vae_run, &k, &fp16, &fp32, sd_format_max(SD_F16), &r);
    CHECK(rc == 0, "shadow run of the overflow VAE: %s", sd_last_error());
    if (rc == 0) {
        const char *over = r.first_overflow >= 0 ? r.layers[r.first_overflow].name : "none";
        const char *inf = r.first_inf >= 0 ? r.layers[r.first_inf].name : "none";
        const char *nan = r.first_nan >= 0 ? r.layers[r.first_nan].name : "none";
        CHECK(strcmp(over, want_over) == 0, "first beyond fp16's range: %s (facts: %s)", over, want_over);
        CHECK(strcmp(inf, want_inf) == 0, "first Inf: %s (facts: %s)", inf, want_inf);
        CHECK(strcmp(nan, want_nan) == 0, "first NaN: %s (facts: %s)", nan, want_nan);
        CHECK(r.first_overflow >= 0 && near(r.layers[r.first_overflow].ref_max_abs, want_max, 1e-4),
              "its reference magnitude is %g (%g)", want_max, r.first_overflow >= 0 ? r.layers[r.first_overflow].ref_max_abs : 0);
        /* every earlier layer: the fp16 run's error is small (a few fp16 ulps of the scale), not Inf */
        int small = 1;
        for (int i = 0; i < r.first_overflow; i++)
            if (r.layers[i].has_local && !(r.layers[i].local.rms <= 1e-2 * (r.layers[i].ref_rms + 1e-3))) small = 0;
        CHECK(small, "before the overflow every layer's own error is within 1e-2 of its RMS");
        const char *rp = tmp_path("overflow_report.json");
        CHECK(sd_shadow_write_report(&r, rp) == 0, "write the overflow report");
        sd_json j;
        if (read_json(rp, &j) == 0) {
            const sd_json *fo = json_get(&j, "first_overflow"), *fi = json_get(&j, "first_inf"), *fn = json_get(&j, "first_nan");
            CHECK(fo && !strcmp(json_str(fo, "module", ""), want_over) && near(json_num(fo, "max_abs_ref", 0), want_max, 1e-4),
                  "report: first_overflow {module, max_abs_ref}");
            CHECK(fi && !strcmp(json_str(fi, "module", ""), want_inf), "report: first_inf module");
            CHECK(fn && !strcmp(json_str(fn, "module", ""), want_nan), "report: first_nan module");
            const sd_json *layers = json_get(&j, "layers");
            CHECK(layers && layers->type == JSON_ARRAY && layers->n == r.n, "report: one row per layer (%d)", r.n);
            json_free(&j);
        }
    }
    sd_shadow_free(&r);
    json_free(&facts);
}

/* ======================================================================================
 * the pipeline's --nan-check and --nan-fallback, with the overflowing VAE
 * ====================================================================================== */

/* tiny_a as a diffusers folder of symlinks (as tests/test_pipeline.c), and the overflow VAE as a folder */
static const char *model_folder(void) {
    const char *dir = tmp_path("lab_tiny_a");
    if (exists(dir)) return dir;
    const char *g = shared_path("golden/tiny_a"), *o = shared_path("golden/tiny_a_overflow");
    /* absolute link targets (cd + pwd), so the links work from anywhere */
    int rc = run_cmd("set -e; d='%s'; g=$(cd '%s' && pwd -P); o=$(cd '%s' && pwd -P); mkdir -p $d/unet $d/vae $d/text_encoder $d/tokenizer $d/scheduler $d/ovae; "
                     "echo '{\"_class_name\": \"StableDiffusionPipeline\"}' > $d/model_index.json; "
                     "ln -s $g/unet.safetensors $d/unet/diffusion_pytorch_model.safetensors; ln -s $g/unet_config.json $d/unet/config.json; "
                     "ln -s $g/vae.safetensors $d/vae/diffusion_pytorch_model.safetensors; ln -s $g/vae_config.json $d/vae/config.json; "
                     "ln -s $g/text_encoder.safetensors $d/text_encoder/model.safetensors; ln -s $g/text_encoder_config.json $d/text_encoder/config.json; "
                     "ln -s $g/vocab.json $d/tokenizer/vocab.json; ln -s $g/merges.txt $d/tokenizer/merges.txt; "
                     "ln -s $g/scheduler_config.json $d/scheduler/scheduler_config.json; "
                     "ln -s $o/vae.safetensors $d/ovae/diffusion_pytorch_model.safetensors; ln -s $o/vae_config.json $d/ovae/config.json",
                     dir, g, o);
    CHECK(rc == 0, "lay out tiny_a as a diffusers folder");
    return dir;
}

#define JOB "--ids-cond %s/txt2img_ids_cond.npy --ids-uncond %s/txt2img_ids_uncond.npy --noise %s/txt2img_noise.npy " \
            "--width 64 --height 64 --cfg 7.5 --sampler ddim"

static int read_file_text(const char *path, char **text) {
    uint8_t *d;
    size_t n;
    if (sd_read_file(path, &d, &n)) { sd_clear_error(); *text = NULL; return -1; }
    *text = (char *)d;
    return 0;
}

static void test_nan_handling(void) {
    const char *dir = model_folder(), *g = shared_path("golden/tiny_a");
    const char *err = tmp_path("nancheck.err"), *png = tmp_path("nancheck.png");
    int rc = run_cmd("./sdref txt2img --model %s --vae %s/ovae " JOB " --steps 1 --precision fp16 --nan-check --quiet -o %s 2>%s",
                     dir, dir, g, g, g, png, err);
    CHECK(rc == 3, "--nan-check stops at the first Inf/NaN (exit 3, got %d)", rc);
    CHECK(!exists(png), "--nan-check: no image written");
    char *text;
    if (read_file_text(err, &text) == 0) {
        CHECK(strstr(text, "first Inf/NaN at vae.decoder.up_blocks.") != NULL, "--nan-check names the VAE layer: %s", text);
        free(text);
    }
    /* the same job without the overflow passes --nan-check */
    rc = run_cmd("./sdref txt2img --model %s " JOB " --steps 1 --precision fp16 --nan-check --quiet --image-out %s 2>/dev/null",
                 dir, g, g, g, tmp_path("nancheck_ok.npy"));
    CHECK(rc == 0, "--nan-check on a finite run: exit 0 (%d)", rc);

    /* --nan-fallback fp32: the VAE decoded again in fp32 = the fp16-vae32 preset, bit for bit */
    const char *fb = tmp_path("fallback.npy"), *ref = tmp_path("vae32.npy"), *fberr = tmp_path("fallback.err");
    rc = run_cmd("./sdref txt2img --model %s --vae %s/ovae " JOB " --steps 1 --precision fp16 --nan-fallback fp32 --image-out %s 2>%s",
                 dir, dir, g, g, g, fb, fberr);
    CHECK(rc == 0, "--nan-fallback fp32 runs (%d)", rc);
    if (read_file_text(fberr, &text) == 0) {
        CHECK(strstr(text, "decoding again with the VAE in fp32") != NULL, "--nan-fallback says so on stderr");
        free(text);
    }
    rc = run_cmd("./sdref txt2img --model %s --vae %s/ovae " JOB " --steps 1 --precision fp16-vae32 --image-out %s --quiet",
                 dir, dir, g, g, g, ref);
    CHECK(rc == 0, "fp16-vae32 runs (%d)", rc);
    CHECK(run_cmd("./sdref compare %s %s --quiet >/dev/null", fb, ref) == 0, "the fallback image equals fp16-vae32's, bit for bit");
    float *x;
    int nd;
    int64_t sh[8];
    size_t n;
    if (npy_read_f32(fb, &x, &nd, sh, &n) == 0) {
        size_t bad = 0;
        for (size_t i = 0; i < n; i++) bad += !isfinite(x[i]);
        CHECK(n == 3 * 64 * 64 && bad == 0, "the fallback image is finite (%zu bad of %zu)", bad, n);
        free(x);
    } else sd_clear_error();
}

/* ======================================================================================
 * sdref report
 * ====================================================================================== */

static int b64_value(int c) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    return c == '+' ? 62 : c == '/' ? 63 : -1;
}

/* decode the base64 PNG that starts at s (after "base64,") and read it */
static int decode_data_uri(const char *s, sd_image *im) {
    size_t n = strcspn(s, "\"");
    uint8_t *out = sd_malloc(n + 1);
    size_t k = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n && s[i] != '='; i++) {
        int v = b64_value((unsigned char)s[i]);
        if (v < 0) { free(out); return -1; }
        acc = acc << 6 | (uint32_t)v;
        bits += 6;
        if (bits >= 8) { bits -= 8; out[k++] = (uint8_t)(acc >> bits); }
    }
    int rc = png_decode(out, k, "data URI", im);
    free(out);
    return rc;
}

static int count(const char *hay, const char *needle) {
    int c = 0;
    for (const char *p = strstr(hay, needle); p; p = strstr(p + 1, needle)) c++;
    return c;
}

/* no external reference: no URL, every src/href a data: URI, no script, no CSS url() */
static void check_self_contained(const char *html, const char *what) {
    CHECK(!strstr(html, "http://") && !strstr(html, "https://") && !strstr(html, "file:"), "%s: no URL", what);
    CHECK(!strstr(html, "<script") && !strstr(html, "url("), "%s: no script, no CSS url()", what);
    int bad = 0;
    const char *attrs[2] = { "src=", "href=" };
    for (int a = 0; a < 2; a++)
        for (const char *p = strstr(html, attrs[a]); p; p = strstr(p + 1, attrs[a])) {
            const char *v = p + strlen(attrs[a]);
            if (*v == '"' || *v == '\'') v++;
            if (strncmp(v, "data:", 5) != 0) bad++;
        }
    CHECK(bad == 0, "%s: every src= and href= is a data: URI (%d are not)", what, bad);
}

/* headless Chromium, when installed: loads without console errors, the screenshot decodes */
static void render(const char *html_path, const char *shot) {
    if (run_cmd("command -v chromium >/dev/null 2>&1") != 0) {
        fprintf(stderr, "  note: chromium is not installed: the report is checked structurally only\n");
        return;
    }
    const char *err = tmp_path("chromium.err");
    int rc = run_cmd("d=$(mktemp -d) && timeout 120 chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run "
                     "--disable-background-networking --disable-component-update --disable-sync --user-data-dir=$d "
                     "--enable-logging=stderr --v=0 --screenshot=%s --window-size=1280,2000 file://%s >/dev/null 2>%s; r=$?; "
                     "rm -rf $d; exit $r", shot, html_path, err);
    CHECK(rc == 0, "chromium renders the report (exit %d)", rc);
    CHECK(run_cmd("grep -qiE 'CONSOLE|Uncaught' %s", err) != 0, "no console message or error while loading the page (%s)", err);
    sd_image im;
    if (png_read_file(shot, &im) == 0) {
        CHECK(im.width == 1280 && im.height == 2000, "the screenshot is 1280x2000 (%dx%d)", im.width, im.height);
        /* not a blank page: many pixels that are neither the page background nor white */
        size_t inked = 0, n = (size_t)im.width * im.height;
        const uint8_t *p = im.pixels;
        for (size_t i = 0; i < n && im.depth == 8; i++) {
            const uint8_t *q = p + 4 * i;
            int bg = (q[0] == 0xf3 && q[1] == 0xf4 && q[2] == 0xf6) || (q[0] == 255 && q[1] == 255 && q[2] == 255);
            inked += !bg;
        }
        CHECK(inked > n / 20, "the screenshot shows the page (%zu of %zu pixels inked)", inked, n);
        sd_image_free(&im);
    } else {
        CHECK(0, "the screenshot decodes: %s", sd_last_error());
        sd_clear_error();
    }
}

static void test_report(void) {
    const char *dir = model_folder(), *g = shared_path("golden/tiny_a");
    const char *html = tmp_path("report.html");
    /* the golden txt2img job (4 DDIM steps): the reference picture in the page is diffusers' image */
    int rc = run_cmd("./sdref report --model %s " JOB " --steps 4 --precision fp32 --vs fp16 -o %s --quiet", dir, g, g, g, html);
    CHECK(rc == 0, "sdref report runs (exit %d)", rc);
    char *text;
    if (read_file_text(html, &text)) { CHECK(0, "the report %s exists", html); return; }
    check_self_contained(text, "report");
    const char *sections[] = { "<!DOCTYPE html>", "The two pictures", "What it means", "Image metrics", "Overflow",
                               "Error per layer", "Activations against the format", "The two policies", "PSNR", "SSIM",
                               "mean luma", "RMS contrast", "mean HSV saturation", "The picture.", "first Inf", "first NaN",
                               "first beyond the storage format", "</html>" };
    for (size_t i = 0; i < sizeof sections / sizeof sections[0]; i++)
        CHECK(strstr(text, sections[i]) != NULL, "the report has '%s'", sections[i]);
    CHECK(count(text, "<svg") == 2 && count(text, "</svg>") == 2 && count(text, "<polyline") == 3, "two inline SVG charts, three series");
    CHECK(count(text, "src=\"data:image/png;base64,") == 3, "three embedded PNGs (two pictures, the heat map)");
    CHECK(strstr(text, "invisible") != NULL, "fp16 on tiny_a: the change is called invisible");
    /* the reference picture is diffusers' fp32 image (within one level of 255) */
    const char *p = strstr(text, "base64,");
    sd_image im;
    float *gold;
    int nd;
    int64_t sh[8];
    size_t n;
    if (p && decode_data_uri(p + 7, &im) == 0 && npy_read_f32(shared_path("golden/tiny_a/txt2img_image.npy"), &gold, &nd, sh, &n) == 0) {
        int worst = 0;
        CHECK(im.width == 64 && im.height == 64 && n == 3 * 64 * 64, "the reference picture is 64x64");
        for (int c = 0; c < 3 && n == 3 * 64 * 64 && im.width == 64; c++)
            for (int i = 0; i < 64 * 64; i++) {
                int d = abs((int)((uint8_t *)im.pixels)[4 * i + c] - (int)floor(gold[c * 64 * 64 + i] * 255.0 + 0.5));
                if (d > worst) worst = d;
            }
        CHECK(worst <= 1, "the page's reference picture is diffusers' image (largest difference %d of 255)", worst);
        sd_image_free(&im);
        free(gold);
    } else {
        CHECK(0, "decode the first embedded picture: %s", sd_last_error());
        sd_clear_error();
    }
    free(text);
    const char *shot = tmp_path("report.png");
    render(html, shot);
    if (env_flag("SDREF_KEEP_TMP")) fprintf(stderr, "  report: %s, screenshot: %s\n", html, shot);

    /* the overflowing VAE: the page tells the story in words */
    const char *html2 = tmp_path("report_overflow.html");
    rc = run_cmd("./sdref report --model %s --vae %s/ovae " JOB " --steps 1 --precision fp32 --vs fp16 --layers 'vae.*' -o %s --quiet",
                 dir, dir, g, g, g, html2);
    CHECK(rc == 0, "sdref report with the overflowing VAE runs (exit %d)", rc);
    if (read_file_text(html2, &text) == 0) {
        check_self_contained(text, "overflow report");
        CHECK(strstr(text, "<b>Overflow.</b> Under fp16 the VAE decoder's <code>decoder.up_blocks.") != NULL,
              "the overflow finding names the VAE decoder's layer");
        CHECK(strstr(text, "beyond fp16's largest value 65504: it becomes Inf") != NULL, "... beyond 65504, it becomes Inf");
        CHECK(strstr(text, "turns it into NaN") && strstr(text, "the whole image is black"), "... NaN, the whole image black");
        CHECK(strstr(text, "the picture is lost") != NULL, "the picture finding says the picture is lost");
        CHECK(strstr(text, "Only layers matching <code>vae.*</code>") != NULL, "the page says which layers are traced");
        free(text);
    }
    render(html2, tmp_path("report_overflow.png"));

    /* bad input: one line, exit 2, no page */
    const char *html3 = tmp_path("report_bad.html");
    CHECK(run_cmd("./sdref report --model %s " JOB " --steps 1 -o %s 2>/dev/null", dir, g, g, g, html3) == 2 && !exists(html3),
          "report without --vs: exit 2, no page");
    CHECK(run_cmd("./sdref report --model %s " JOB " --steps 1 --vs fp17 -o %s 2>/dev/null", dir, g, g, g, html3) == 2 && !exists(html3),
          "report with a bad --vs: exit 2, no page");
}

void test_lab(void) {
    test_compare_figures();
    test_image_metrics();
    if (!have_shared()) {
        CHECK(0, "the golden data is needed (set SDREF_SHARED)");
        return;
    }
    test_compare_traces();
    test_shadow_overflow();
    test_nan_handling();
    test_report();
}
