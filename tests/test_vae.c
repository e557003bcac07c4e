/* tests/test_vae.c — the VAE against the golden data of shared/golden/tiny_a (diffusers
 * AutoencoderKL in PyTorch): fp32 outputs from both file layouts, fp16 statistics against the
 * oracle's own fp16 run, a walk through the golden trace naming the first module that
 * diverges, the fp16 overflow case, thread independence, the command line and bad input. */
#include "test.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- small helpers ---- */

/* shared_path() and tmp_path() return rotating buffers: keep a path in a local array. */
#define KEEP_PATH(var, expr) char var[4096]; snprintf(var, sizeof var, "%s", expr)

static int load_golden(const char *rel, sd_tensor *t) { return load_npy(shared_path(rel), t); }

static sd_ctx make_ctx(const char *spec, sd_trace *trace) {
    sd_precision p;
    sd_ctx c;
    memset(&c, 0, sizeof c);
    if (sd_precision_parse(spec, &p) != 0) CHECK(0, "precision %s: %s", spec, sd_last_error());
    c.pol = p.model[SD_VAE];
    c.prefix = "vae";
    c.trace = trace;
    return c;
}

static sd_vae *load_vae(const char *rel_model, const char *rel_config, const char *spec) {
    sd_precision p;
    sd_clear_error();
    if (sd_precision_parse(spec, &p) != 0) return NULL;
    sd_vae *v = vae_load(shared_path(rel_model), rel_config ? shared_path(rel_config) : NULL, &p.model[SD_VAE]);
    CHECK(v != NULL, "vae_load %s: %s", rel_model, sd_last_error());
    return v;
}

/* max |x - golden| <= 1e-5 * max |golden| */
static void check_close(const char *what, const sd_tensor *x, const sd_tensor *g, double rel) {
    CHECK(tensor_same_shape(x, g), "%s: shape [%d,%d,%d,%d], golden [%d,%d,%d,%d]", what, x->shape[0], x->shape[1],
          x->shape[2], x->shape[3], g->shape[0], g->shape[1], g->shape[2], g->shape[3]);
    if (!tensor_same_shape(x, g)) return;
    size_t n = tensor_numel(g);
    double d = max_diff(x->data, g->data, n), m = max_abs(g->data, n);
    CHECK(d <= rel * m, "%s: max |sdref - golden| = %.3g > %.0e x %.3g", what, d, rel, m);
    if (env_flag("SDREF_VERBOSE")) fprintf(stderr, "  %s: max abs err %.3g (max |golden| %.3g)\n", what, d, m);
}

/* ---- fp32 against golden, from the diffusers file and from the LDM checkpoint ---- */

static void test_fp32(const char *model, const char *what) {
    sd_vae *v = load_vae(model, "golden/tiny_a/vae_config.json", "fp32");
    if (!v) return;
    sd_ctx c = make_ctx("fp32", NULL);
    sd_tensor z, want, img, mean, logvar, gm, gl;
    if (load_golden("golden/tiny_a/vae_decode_in.npy", &z) == 0 && load_golden("golden/tiny_a/vae_decode_out.npy", &want) == 0) {
        img = vae_decode(v, &c, &z);
        char buf[128];
        snprintf(buf, sizeof buf, "decode (%s)", what);
        check_close(buf, &img, &want, 1e-5);
        tensor_free(&img);
        tensor_free(&want);
    }
    tensor_free(&z);
    if (load_golden("golden/tiny_a/vae_encode_in.npy", &z) == 0 && load_golden("golden/tiny_a/vae_encode_mean.npy", &gm) == 0 &&
        load_golden("golden/tiny_a/vae_encode_logvar.npy", &gl) == 0) {
        vae_encode(v, &c, &z, &mean, &logvar);
        char buf[128];
        snprintf(buf, sizeof buf, "encode mean (%s)", what);
        check_close(buf, &mean, &gm, 1e-5);
        snprintf(buf, sizeof buf, "encode logvar (%s)", what);
        check_close(buf, &logvar, &gl, 1e-5);
        tensor_free(&mean);
        tensor_free(&logvar);
        tensor_free(&gm);
        tensor_free(&gl);
    }
    tensor_free(&z);
    CHECK(fabsf(vae_scaling_factor(v) - 0.18215f) == 0 && vae_latent_channels(v) == 4, "config: scaling %g, latent %d",
          vae_scaling_factor(v), vae_latent_channels(v));
    vae_free(v);
}

/* ---- fp16 preset: statistics against the oracle's fp16ops run ---- */


static void test_fp16(void) {
    sd_vae *v = load_vae("golden/tiny_a/vae.safetensors", "golden/tiny_a/vae_config.json", "fp16");
    if (!v) return;
    sd_ctx c = make_ctx("fp16", NULL);
    sd_tensor z, img, mean, logvar;
    if (load_golden("golden/tiny_a/vae_decode_in.npy", &z) == 0) {
        img = vae_decode(v, &c, &z);
        check_fp16_stats("fp16 decode", img.data, tensor_numel(&img), "golden/tiny_a/vae_decode_out.npy", "golden/tiny_a/vae_decode_out_fp16ops.npy");
        tensor_free(&img);
    }
    tensor_free(&z);
    if (load_golden("golden/tiny_a/vae_encode_in.npy", &z) == 0) {
        vae_encode(v, &c, &z, &mean, &logvar);
        check_fp16_stats("fp16 encode mean", mean.data, tensor_numel(&mean), "golden/tiny_a/vae_encode_mean.npy",
                         "golden/tiny_a/vae_encode_mean_fp16ops.npy");
        tensor_free(&mean);
        tensor_free(&logvar);
    }
    tensor_free(&z);
    vae_free(v);
}

/* ---- trace walk: every golden vae.* tensor in execution order ---- */


static void test_trace(void) {
    sd_vae *v = load_vae("golden/tiny_a/vae.safetensors", "golden/tiny_a/vae_config.json", "fp32");
    if (!v) return;
    sd_trace tr;
    memset(&tr, 0, sizeof tr);
    tr.keep_data = 1;
    sd_ctx c = make_ctx("fp32", &tr);
    sd_tensor z, img, mean, logvar;
    if (load_golden("golden/tiny_a/vae_decode_in.npy", &z) == 0) {
        img = vae_decode(v, &c, &z);
        tensor_free(&img);
    }
    tensor_free(&z);
    if (load_golden("golden/tiny_a/vae_encode_in.npy", &z) == 0) {
        vae_encode(v, &c, &z, &mean, &logvar);
        tensor_free(&mean);
        tensor_free(&logvar);
    }
    tensor_free(&z);
    walk_golden_trace("golden/tiny_a/trace.safetensors", "vae.", &tr, 1e-4, "tiny_a trace");
    /* the trace file round trip: written, then readable with every name */
    const char *path = tmp_path("vae_trace.safetensors");
    CHECK(sd_trace_write(&tr, path) == 0, "sd_trace_write: %s", sd_last_error());
    sd_safetensors st;
    if (st_open(&st, path) == 0) {
        CHECK(st.n == tr.n && st_find(&st, "vae.decoder.up_blocks.1.resnets.2") && st_find(&st, "vae.quant_conv"),
              "written trace has %d of %d tensors", st.n, tr.n);
        st_close(&st);
    } else {
        CHECK(0, "written trace unreadable: %s", sd_last_error());
    }
    sd_trace_free(&tr);
    vae_free(v);
}

/* ---- the fp16 overflow case ---- */

static const char *first_where(const sd_trace *t, int what) {   /* 0: |x| > 65504, 1: Inf, 2: NaN */
    for (int i = 0; i < t->n; i++) {
        const sd_trace_stats *s = &t->e[i].stats;
        if ((what == 0 && s->n_over_f16 > 0) || (what == 1 && s->n_inf > 0) || (what == 2 && s->n_nan > 0)) return t->e[i].name;
    }
    return "(none)";
}

static void test_overflow(void) {
    const char *dir = "golden/tiny_a_overflow/";
    char model[256], config[256];
    snprintf(model, sizeof model, "%svae.safetensors", dir);
    snprintf(config, sizeof config, "%svae_config.json", dir);
    sd_json facts;
    if (json_parse_file(shared_path("golden/tiny_a_overflow/overflow_facts.json"), &facts) != 0) {
        CHECK(0, "overflow_facts.json: %s", sd_last_error());
        return;
    }
    const sd_json *f32 = json_get(&facts, "fp32"), *f16 = json_get(&facts, "fp16ops");
    const char *want_over = json_str(f32, "first_module_over_fp16_max_trace_name", "?");
    const char *want_inf = json_str(f16, "first_module_with_inf_trace_name", "?");
    const char *want_nan = json_str(f16, "first_module_with_nan_trace_name", "?");
    sd_tensor z, want, want16, img;
    if (load_golden("golden/tiny_a_overflow/vae_decode_in.npy", &z) || load_golden("golden/tiny_a_overflow/vae_decode_out.npy", &want) ||
        load_golden("golden/tiny_a_overflow/vae_decode_out_fp16ops.npy", &want16)) {
        json_free(&facts);
        return;
    }
    const char *specs[2] = { "fp32", "fp16" };
    for (int k = 0; k < 2; k++) {
        sd_vae *v = load_vae(model, config, specs[k]);
        if (!v) continue;
        sd_trace tr;
        memset(&tr, 0, sizeof tr);
        tr.keep_data = k == 0;
        sd_ctx c = make_ctx(specs[k], &tr);
        img = vae_decode(v, &c, &z);
        if (k == 0) {
            check_close("overflow fp32 decode", &img, &want, 1e-5);
            walk_golden_trace("golden/tiny_a_overflow/trace.safetensors", "vae.", &tr, 1e-4, "overflow fp32 trace (every leaf)");
            CHECK(strcmp(first_where(&tr, 0), want_over) == 0, "fp32: first |x| > 65504 at %s, golden %s", first_where(&tr, 0), want_over);
        } else {
            size_t n = tensor_numel(&img), nan = 0, gnan = 0;
            for (size_t i = 0; i < n; i++) nan += img.data[i] != img.data[i];
            for (size_t i = 0; i < tensor_numel(&want16); i++) gnan += want16.data[i] != want16.data[i];
            CHECK(nan == gnan && gnan == n, "fp16 overflow: %zu NaN of %zu, golden's fp16ops run %zu", nan, n, gnan);
            CHECK(strcmp(first_where(&tr, 0), want_inf) == 0, "fp16: first |x| > 65504 at %s, golden %s", first_where(&tr, 0), want_inf);
            CHECK(strcmp(first_where(&tr, 1), want_inf) == 0, "fp16: first Inf at %s, golden %s", first_where(&tr, 1), want_inf);
            CHECK(strcmp(first_where(&tr, 2), want_nan) == 0, "fp16: first NaN at %s, golden %s", first_where(&tr, 2), want_nan);
        }
        tensor_free(&img);
        sd_trace_free(&tr);
        vae_free(v);
    }
    tensor_free(&z);
    tensor_free(&want);
    tensor_free(&want16);
    json_free(&facts);
}

/* ---- 1 vs 2 threads: identical bits ---- */

static void test_threads(void) {
    sd_vae *v = load_vae("golden/tiny_a/vae.safetensors", "golden/tiny_a/vae_config.json", "fp16");
    sd_tensor z;
    if (!v || load_golden("golden/tiny_a/vae_decode_in.npy", &z)) {
        vae_free(v);
        return;
    }
    sd_ctx c = make_ctx("fp16", NULL);
    sd_set_threads(1);
    sd_tensor a = vae_decode(v, &c, &z);
    sd_set_threads(2);
    sd_tensor b = vae_decode(v, &c, &z);
    CHECK(memcmp(a.data, b.data, tensor_numel(&a) * sizeof(float)) == 0, "decode differs between 1 and 2 threads");
    tensor_free(&a);
    tensor_free(&b);
    tensor_free(&z);
    vae_free(v);
}

/* ---- any size, any batch: odd latent sizes decode to 8x, a batch is its images decoded alone ---- */

static void test_shapes(void) {
    sd_vae *v = load_vae("golden/tiny_a/vae.safetensors", "golden/tiny_a/vae_config.json", "fp32");
    sd_tensor g;
    if (!v || load_golden("golden/tiny_a/vae_decode_in.npy", &g)) {
        vae_free(v);
        return;
    }
    sd_ctx c = make_ctx("fp32", NULL);
    /* a batch of 2: the golden latent and its negation */
    size_t n = tensor_numel(&g);
    sd_tensor two = tensor_new(4, 2, g.shape[1], g.shape[2], g.shape[3]), neg = tensor_copy(&g);
    for (size_t i = 0; i < n; i++) {
        neg.data[i] = -g.data[i];
        two.data[i] = g.data[i];
        two.data[n + i] = -g.data[i];
    }
    sd_tensor a = vae_decode(v, &c, &g), b = vae_decode(v, &c, &neg), ab = vae_decode(v, &c, &two);
    size_t m = tensor_numel(&a);
    CHECK(ab.shape[0] == 2 && tensor_numel(&ab) == 2 * m && memcmp(ab.data, a.data, m * sizeof(float)) == 0 &&
              memcmp(ab.data + m, b.data, m * sizeof(float)) == 0, "a batch of 2 differs from its images decoded alone");
    sd_tensor mean, logvar, mean2, logvar2;
    vae_encode(v, &c, &ab, &mean2, &logvar2);
    vae_encode(v, &c, &b, &mean, &logvar);
    size_t q = tensor_numel(&mean);
    CHECK(mean2.shape[0] == 2 && memcmp(mean2.data + q, mean.data, q * sizeof(float)) == 0 &&
              memcmp(logvar2.data + q, logvar.data, q * sizeof(float)) == 0, "a batch of 2 encodes differently from one image");
    tensor_free(&mean); tensor_free(&logvar); tensor_free(&mean2); tensor_free(&logvar2);
    tensor_free(&a); tensor_free(&b); tensor_free(&ab); tensor_free(&two); tensor_free(&neg);
    /* a 5x7 latent -> 40x56 image -> 5x7 latent; an odd 37x21 image as torch sizes it */
    sd_tensor z = tensor_new(4, 1, 4, 5, 7);
    for (size_t i = 0; i < tensor_numel(&z); i++) z.data[i] = g.data[i % n];
    a = vae_decode(v, &c, &z);
    size_t bad = 0;
    for (size_t i = 0; i < tensor_numel(&a); i++) bad += !(fabsf(a.data[i]) < 100.0f);
    CHECK(a.shape[1] == 3 && a.shape[2] == 40 && a.shape[3] == 56 && bad == 0, "5x7 latent decodes to [%d,%d,%d], %zu bad values",
          a.shape[1], a.shape[2], a.shape[3], bad);
    vae_encode(v, &c, &a, &mean, &logvar);
    CHECK(mean.shape[1] == 4 && mean.shape[2] == 5 && mean.shape[3] == 7, "40x56 image encodes to %dx%d", mean.shape[2], mean.shape[3]);
    tensor_free(&mean); tensor_free(&logvar); tensor_free(&a);
    sd_tensor odd = tensor_new(4, 1, 3, 37, 21);
    for (size_t i = 0; i < tensor_numel(&odd); i++) odd.data[i] = (float)((int)(i * 7 % 13) - 6) / 6.0f;
    /* torch: out = floor((H + 1 - 3) / 2) + 1 per downsampler: 37 -> 18 -> 9 -> 4, 21 -> 10 -> 5 -> 2 */
    vae_encode(v, &c, &odd, &mean, &logvar);
    CHECK(mean.shape[2] == 4 && mean.shape[3] == 2, "37x21 image encodes to %dx%d, torch gives 4x2", mean.shape[2], mean.shape[3]);
    tensor_free(&mean); tensor_free(&logvar); tensor_free(&odd); tensor_free(&z); tensor_free(&g);
    vae_free(v);
}

/* ---- file layouts and dtypes: the same weights written other ways load to the same bits ---- */

/* Copy a safetensors file, renaming keys (strip `strip` prefix; keys without it dropped when
 * strip is non-empty), converting to dtype, leaving out `drop`, reshaping `reshape` to [n]. */
static int rewrite_st(const char *src, const char *dst, const char *strip, st_dtype dtype, const char *drop,
                      const char *reshape) {
    sd_safetensors st;
    if (st_open(&st, src) != 0) return -1;
    st_writer w;
    st_writer_init(&w);
    size_t sl = strlen(strip);
    for (int i = 0; i < st.n; i++) {
        const st_entry *e = &st.entries[i];
        if (strncmp(e->name, strip, sl) != 0 || (drop && strcmp(e->name + sl, drop) == 0)) continue;
        if (e->dtype != ST_F32) continue;
        size_t n = 1;
        for (int d = 0; d < e->ndim; d++) n *= (size_t)e->shape[d];
        float *x = malloc(n * sizeof(float) + 4);
        st_read_f32(&st, e, x);
        int64_t shape[8];
        int ndim = e->ndim;
        memcpy(shape, e->shape, sizeof shape);
        if (reshape && strcmp(e->name + sl, reshape) == 0) { ndim = 1; shape[0] = (int64_t)n - 1; }
        if (dtype == ST_F16) st_writer_add_f16(&w, e->name + sl, ndim, shape, x);
        else if (dtype == ST_BF16) st_writer_add_bf16(&w, e->name + sl, ndim, shape, x);
        else st_writer_add_f32(&w, e->name + sl, ndim, shape, x);
        free(x);
    }
    int rc = st_writer_write(&w, dst);
    st_writer_free(&w);
    st_close(&st);
    return rc;
}

static sd_tensor decode_with(const char *path, const char *config, const char *spec, int *ok) {
    sd_precision p;
    sd_precision_parse(spec, &p);
    sd_clear_error();
    sd_vae *v = vae_load(path, config, &p.model[SD_VAE]);
    sd_tensor z, img = { 0, { 0, 0, 0, 0 }, NULL };
    *ok = 0;
    CHECK(v != NULL, "load %s: %s", path, sd_last_error());
    if (v && load_golden("golden/tiny_a/vae_decode_in.npy", &z) == 0) {
        sd_ctx c = make_ctx(spec, NULL);
        img = vae_decode(v, &c, &z);
        tensor_free(&z);
        *ok = 1;
    }
    vae_free(v);
    return img;
}

static int same_bits(const sd_tensor *a, const sd_tensor *b) {
    return tensor_same_shape(a, b) && memcmp(a->data, b->data, tensor_numel(a) * sizeof(float)) == 0;
}

static void test_layouts(void) {
    KEEP_PATH(cfg, shared_path("golden/tiny_a/vae_config.json"));
    KEEP_PATH(diff16, tmp_path("vae_f16.safetensors"));
    KEEP_PATH(ldm16, tmp_path("vae_ldm_f16.safetensors"));
    KEEP_PATH(ldmbf, tmp_path("vae_ldm_bf16.safetensors"));
    KEEP_PATH(diffbf, tmp_path("vae_bf16.safetensors"));
    CHECK(rewrite_st(shared_path("golden/tiny_a/vae.safetensors"), diff16, "", ST_F16, NULL, NULL) == 0 &&
          rewrite_st(shared_path("golden/tiny_a/checkpoint.safetensors"), ldm16, "first_stage_model.", ST_F16, NULL, NULL) == 0 &&
          rewrite_st(shared_path("golden/tiny_a/vae.safetensors"), diffbf, "", ST_BF16, NULL, NULL) == 0 &&
          rewrite_st(shared_path("golden/tiny_a/checkpoint.safetensors"), ldmbf, "first_stage_model.", ST_BF16, NULL, NULL) == 0,
          "writing test files: %s", sd_last_error());
    int ok1, ok2;
    /* F16 files: the standalone LDM layout (no prefix) equals the diffusers layout, bit for bit */
    sd_tensor a = decode_with(diff16, cfg, "fp16", &ok1), b = decode_with(ldm16, cfg, "fp16", &ok2);
    CHECK(ok1 && ok2 && same_bits(&a, &b), "F16 diffusers file and F16 standalone LDM file decode differently");
    tensor_free(&b);
    /* an F16 file under the fp16 policy is the F32 file under it (weights rounded alike) */
    b = decode_with(shared_path("golden/tiny_a/vae.safetensors"), cfg, "fp16", &ok2);
    CHECK(ok2 && same_bits(&a, &b), "F16 file and F32 file under fp16 decode differently");
    tensor_free(&a);
    tensor_free(&b);
    a = decode_with(diffbf, cfg, "bf16", &ok1);
    b = decode_with(ldmbf, cfg, "bf16", &ok2);
    CHECK(ok1 && ok2 && same_bits(&a, &b), "BF16 diffusers and LDM files decode differently");
    tensor_free(&b);
    /* bf16 weights under an fp32 policy: close to golden, not equal (a real property of bf16) */
    b = decode_with(ldmbf, cfg, "fp32", &ok2);
    sd_tensor want;
    if (ok2 && load_golden("golden/tiny_a/vae_decode_out.npy", &want) == 0) {
        double d = max_diff(b.data, want.data, tensor_numel(&want)), m = max_abs(want.data, tensor_numel(&want));
        CHECK(d > 1e-5 * m && d < 0.1 * m, "BF16 file in fp32: max diff %.3g of %.3g", d, m);
        tensor_free(&want);
    }
    tensor_free(&a);
    tensor_free(&b);
}

/* A diffusers folder: diffusion_pytorch_model.safetensors + config.json, no --config. */
static void test_folder(void) {
    KEEP_PATH(dir, tmp_path("vae_folder"));
    char wpath[4200], cpath[4200];
    run_cmd("mkdir -p '%s'", dir);
    snprintf(wpath, sizeof wpath, "%s/diffusion_pytorch_model.safetensors", dir);
    snprintf(cpath, sizeof cpath, "%s/config.json", dir);
    run_cmd("cp '%s' '%s' && sed 's/0.18215/0.13025/' '%s' > '%s'", shared_path("golden/tiny_a/vae.safetensors"), wpath,
            shared_path("golden/tiny_a/vae_config.json"), cpath);
    sd_precision p;
    sd_precision_parse("fp32", &p);
    sd_vae *v = vae_load(dir, NULL, &p.model[SD_VAE]);
    CHECK(v != NULL, "diffusers folder: %s", sd_last_error());
    if (v) CHECK(vae_scaling_factor(v) == 0.13025f, "folder config.json not read: scaling %g", vae_scaling_factor(v));
    vae_free(v);
    /* the file itself, with config.json beside it */
    v = vae_load(wpath, NULL, &p.model[SD_VAE]);
    CHECK(v != NULL && vae_scaling_factor(v) == 0.13025f, "diffusers file with config.json beside it: %s", sd_last_error());
    vae_free(v);
    /* an LDM checkpoint without --config is SD1.5's VAE: the tiny one is refused, naming a tensor */
    sd_clear_error();
    v = vae_load(shared_path("golden/tiny_a/checkpoint.safetensors"), NULL, &p.model[SD_VAE]);
    CHECK(v == NULL && strstr(sd_last_error(), "expected") && strstr(sd_last_error(), "encoder.conv_in.weight") &&
              strstr(sd_last_error(), "--config"),
          "tiny checkpoint as SD1.5: '%s'", sd_last_error());
    vae_free(v);
}

/* ---- real SD1.5 names and shapes (shared/spec), both layouts, no config: SDREF_FULL ---- */

static void test_real_size_layouts(void) {
    KEEP_PATH(diff, tmp_path("sd15_vae_f16.safetensors"));
    KEEP_PATH(ldm, tmp_path("sd15_ckpt_vae_f16.safetensors"));
    CHECK(write_spec_file("spec/sd15_vae_diffusers.tsv", "", diff) > 0 && write_spec_file("spec/sd15_checkpoint_ldm.tsv", "first_stage_model.", ldm) > 0,
          "writing SD1.5-shaped files: %s", sd_last_error());
    sd_precision p;
    sd_precision_parse("fp32", &p);
    sd_tensor z = tensor_new(4, 1, 4, 4, 4), img[2], mean[2], logvar[2];
    for (size_t i = 0; i < tensor_numel(&z); i++) z.data[i] = (float)((int)(i * 37 % 11) - 5) * 0.3f;
    sd_tensor x = tensor_new(4, 1, 3, 16, 16);
    for (size_t i = 0; i < tensor_numel(&x); i++) x.data[i] = (float)((int)(i * 13 % 17) - 8) / 8.0f;
    const char *files[2] = { diff, ldm };
    int ok = 1;
    for (int k = 0; k < 2; k++) {
        sd_clear_error();
        sd_vae *v = vae_load(files[k], NULL, &p.model[SD_VAE]);
        CHECK(v != NULL, "SD1.5-shaped %s file without config: %s", k ? "LDM" : "diffusers", sd_last_error());
        if (!v) { ok = 0; continue; }
        CHECK(vae_scaling_factor(v) == 0.18215f, "SD1.5 scaling factor");
        sd_ctx c = make_ctx("fp32", NULL);
        img[k] = vae_decode(v, &c, &z);
        vae_encode(v, &c, &x, &mean[k], &logvar[k]);
        vae_free(v);
    }
    if (ok) {
        CHECK(img[0].shape[1] == 3 && img[0].shape[2] == 32 && img[0].shape[3] == 32, "SD1.5 decode of 4x4 is %dx%d", img[0].shape[2], img[0].shape[3]);
        CHECK(mean[0].shape[1] == 4 && mean[0].shape[2] == 2, "SD1.5 encode of 16x16 is %dx%d", mean[0].shape[2], mean[0].shape[3]);
        CHECK(same_bits(&img[0], &img[1]) && same_bits(&mean[0], &mean[1]) && same_bits(&logvar[0], &logvar[1]),
              "SD1.5 diffusers and LDM layouts give different results");
        size_t bad = 0;
        for (size_t i = 0; i < tensor_numel(&img[0]); i++) bad += !(fabsf(img[0].data[i]) < 1e6f);
        CHECK(bad == 0, "SD1.5-shaped decode: %zu non-finite values", bad);
        for (int k = 0; k < 2; k++) {
            tensor_free(&img[k]);
            tensor_free(&mean[k]);
            tensor_free(&logvar[k]);
        }
    }
    tensor_free(&z);
    tensor_free(&x);
}

/* ---- command line ---- */

static int file_exists(const char *path) {
    FILE *f = fopen(path, "rb");
    if (f) fclose(f);
    return f != NULL;
}

/* numpy's round-half-to-even of a value in [0, 255] */
static int round_even(float v) {
    float f = floorf(v);
    int r = (int)f;
    if (v - f > 0.5f || (v - f == 0.5f && (r & 1))) r++;
    return r;
}

static void test_cli(void) {
    KEEP_PATH(model, shared_path("golden/tiny_a/vae.safetensors"));
    KEEP_PATH(cfg, shared_path("golden/tiny_a/vae_config.json"));
    KEEP_PATH(lat, shared_path("golden/tiny_a/vae_decode_in.npy"));
    KEEP_PATH(ckpt, shared_path("golden/tiny_a/checkpoint.safetensors"));
    KEEP_PATH(enc_in, shared_path("golden/tiny_a/vae_encode_in.npy"));
    KEEP_PATH(out_npy, tmp_path("dec.npy"));
    KEEP_PATH(out_png, tmp_path("dec.png"));
    KEEP_PATH(err, tmp_path("err.txt"));
    int rc = run_cmd("./sdref vae-decode --model '%s' --config '%s' --latent '%s' -o '%s'", model, cfg, lat, out_npy);
    CHECK(rc == 0, "vae-decode .npy: exit %d", rc);
    sd_tensor got, want;
    float *data;
    int ndim;
    int64_t shape[8];
    size_t n;
    if (rc == 0 && npy_read_f32(out_npy, &data, &ndim, shape, &n) == 0 && load_golden("golden/tiny_a/vae_decode_out.npy", &want) == 0) {
        got = want;
        got.data = data;
        CHECK(n == tensor_numel(&want) && ndim == 4, "vae-decode output shape");
        if (n == tensor_numel(&want)) check_close("cli decode", &got, &want, 1e-5);
        /* .png: diffusers' postprocessing of the same output */
        rc = run_cmd("./sdref vae-decode --model '%s' --config '%s' --latent '%s' --threads 2 -o '%s'", model, cfg, lat, out_png);
        CHECK(rc == 0, "vae-decode .png: exit %d", rc);
        sd_image im;
        if (rc == 0 && png_read_file(out_png, &im) == 0) {
            int H = want.shape[2], W = want.shape[3], wrong = 0, far = 0;
            CHECK(im.width == W && im.height == H && im.depth == 8, "png size %dx%d", im.width, im.height);
            for (int y = 0; y < H && im.width == W && im.height == H; y++)
                for (int x = 0; x < W; x++)
                    for (int ch = 0; ch < 3; ch++) {
                        size_t k = ((size_t)ch * H + y) * W + x;
                        float v = data[k] / 2.0f + 0.5f;
                        v = v < 0 ? 0 : v > 1 ? 1 : v;
                        int px = ((const uint8_t *)im.pixels)[((size_t)y * W + x) * 4 + ch];
                        wrong += px != round_even(v * 255.0f);
                        float g = want.data[k] / 2.0f + 0.5f;
                        g = g < 0 ? 0 : g > 1 ? 1 : g;
                        far += abs(px - round_even(g * 255.0f)) > 1;
                    }
            CHECK(wrong == 0 && far == 0, "png pixels: %d differ from the .npy output, %d by > 1 from golden", wrong, far);
            sd_image_free(&im);
        } else if (rc == 0) {
            CHECK(0, "png unreadable: %s", sd_last_error());
        }
        free(data);
        tensor_free(&want);
    }
    /* --scaled: the pipeline's latent (x scaling_factor) divided back */
    sd_tensor z;
    if (load_golden("golden/tiny_a/vae_decode_in.npy", &z) == 0) {
        for (size_t i = 0; i < tensor_numel(&z); i++) z.data[i] *= 0.18215f;
        KEEP_PATH(scaled, tmp_path("scaled.npy"));
        KEEP_PATH(out_s, tmp_path("dec_scaled.npy"));
        npy_write_tensor(scaled, &z);
        rc = run_cmd("./sdref vae-decode --model '%s' --config '%s' --latent '%s' --scaled -o '%s'", model, cfg, scaled, out_s);
        CHECK(rc == 0, "vae-decode --scaled: exit %d", rc);
        if (rc == 0 && npy_read_f32(out_s, &data, &ndim, shape, &n) == 0 && load_golden("golden/tiny_a/vae_decode_out.npy", &want) == 0) {
            got = want;
            got.data = data;
            if (n == tensor_numel(&want)) check_close("cli decode --scaled", &got, &want, 1e-4);
            free(data);
            tensor_free(&want);
        }
        tensor_free(&z);
    }
    /* vae-encode from .npy, with --logvar, from the LDM checkpoint */
    KEEP_PATH(mean, tmp_path("mean.npy"));
    KEEP_PATH(logvar, tmp_path("logvar.npy"));
    rc = run_cmd("./sdref vae-encode --model '%s' --config '%s' --image '%s' -o '%s' --logvar '%s'", ckpt, cfg, enc_in, mean, logvar);
    CHECK(rc == 0, "vae-encode: exit %d", rc);
    const char *outs[2] = { mean, logvar }, *gold[2] = { "golden/tiny_a/vae_encode_mean.npy", "golden/tiny_a/vae_encode_logvar.npy" };
    for (int k = 0; k < 2 && rc == 0; k++)
        if (npy_read_f32(outs[k], &data, &ndim, shape, &n) == 0 && load_golden(gold[k], &want) == 0) {
            got = want;
            got.data = data;
            if (n == tensor_numel(&want)) check_close(k ? "cli encode logvar" : "cli encode mean", &got, &want, 1e-5);
            free(data);
            tensor_free(&want);
        }
    /* vae-encode from a PNG: pixels p -> 2 (p / 255) - 1, RGBA's alpha dropped */
    if (load_golden("golden/tiny_a/vae_encode_in.npy", &z) == 0) {
        int H = z.shape[2], W = z.shape[3];
        uint8_t *rgba = malloc((size_t)H * W * 4);
        sd_tensor x = tensor_new(4, 1, 3, H, W);
        for (int p = 0; p < H * W; p++) {
            for (int ch = 0; ch < 3; ch++) {
                int v = round_even((z.data[(size_t)ch * H * W + p] / 2.0f + 0.5f) * 255.0f);
                v = v < 0 ? 0 : v > 255 ? 255 : v;
                rgba[(size_t)p * 4 + ch] = (uint8_t)v;
                x.data[(size_t)ch * H * W + p] = 2.0f * ((float)v / 255.0f) - 1.0f;
            }
            rgba[(size_t)p * 4 + 3] = (uint8_t)(p * 7);
        }
        KEEP_PATH(png, tmp_path("enc_in.png"));
        KEEP_PATH(mean_png, tmp_path("mean_png.npy"));
        CHECK(png_write_file(png, W, H, 4, rgba, 0, NULL, NULL) == 0, "png_write_file: %s", sd_last_error());
        rc = run_cmd("./sdref vae-encode --model '%s' --config '%s' --image '%s' -o '%s'", model, cfg, png, mean_png);
        CHECK(rc == 0, "vae-encode .png: exit %d", rc);
        sd_vae *v = load_vae("golden/tiny_a/vae.safetensors", "golden/tiny_a/vae_config.json", "fp32");
        if (rc == 0 && v && npy_read_f32(mean_png, &data, &ndim, shape, &n) == 0) {
            sd_ctx c = make_ctx("fp32", NULL);
            sd_tensor m, lv;
            vae_encode(v, &c, &x, &m, &lv);
            CHECK(n == tensor_numel(&m) && memcmp(m.data, data, n * sizeof(float)) == 0, "vae-encode of a PNG differs from its pixels");
            tensor_free(&m);
            tensor_free(&lv);
            free(data);
        }
        vae_free(v);
        free(rgba);
        tensor_free(&x);
        tensor_free(&z);
    }

    /* bad input: one clear line, non-zero exit, no output file */
    KEEP_PATH(bad_out, tmp_path("bad_out.npy"));
    KEEP_PATH(bad_txt, tmp_path("bad_out.txt"));
    KEEP_PATH(missing, tmp_path("vae_missing.safetensors"));
    KEEP_PATH(misshaped, tmp_path("vae_misshaped.safetensors"));
    CHECK(rewrite_st(model, missing, "", ST_F32, "decoder.up_blocks.1.resnets.2.conv1.bias", NULL) == 0 &&
          rewrite_st(model, misshaped, "", ST_F32, NULL, "decoder.conv_in.weight") == 0, "writing bad files: %s", sd_last_error());
    struct { const char *model, *latent, *out, *expect; } bad[] = {
        { missing, lat, bad_out, "decoder.up_blocks.1.resnets.2.conv1.bias" },
        { misshaped, lat, bad_out, "decoder.conv_in.weight" },
        { "/nonexistent/vae.safetensors", lat, bad_out, "/nonexistent/vae.safetensors" },
        { model, "/nonexistent/latent.npy", bad_out, "/nonexistent/latent.npy" },
        { model, enc_in, bad_out, "[N,4,H,W]" },   /* 3 channels, not 4 */
        { model, lat, bad_txt, ".npy or .png" },
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        rc = run_cmd("./sdref vae-decode --model '%s' --config '%s' --latent '%s' -o '%s' 2> '%s'", bad[i].model, cfg, bad[i].latent,
                     bad[i].out, err);
        uint8_t *msg = NULL;
        size_t len = 0;
        int have = sd_read_file(err, &msg, &len) == 0;
        int lines = 0;
        for (size_t k = 0; have && k < len; k++) lines += msg[k] == '\n';
        CHECK(rc != 0 && rc < 128 && !file_exists(bad[i].out), "bad input %zu: exit %d, output %s", i, rc,
              file_exists(bad[i].out) ? "written" : "absent");
        CHECK(have && lines == 1 && strstr((const char *)msg, bad[i].expect), "bad input %zu: message '%s' should name '%s'", i,
              have ? (const char *)msg : "", bad[i].expect);
        free(msg);
    }
    rc = run_cmd("./sdref vae-encode --model '%s' --config '%s' --image '%s' -o '%s' --bogus 2> /dev/null", model, cfg, enc_in,
                 bad_out);
    CHECK(rc != 0 && !file_exists(bad_out), "unknown option accepted");
}

void test_vae(void) {
    if (!have_shared()) {
        CHECK(0, "shared data not found (set SDREF_SHARED)");
        return;
    }
    test_fp32("golden/tiny_a/vae.safetensors", "diffusers file");
    test_fp32("golden/tiny_a/checkpoint.safetensors", "LDM checkpoint");
    test_fp16();
    test_trace();
    test_overflow();
    test_threads();
    test_shapes();
    test_layouts();
    test_folder();
    test_cli();
    if (env_flag("SDREF_FULL")) test_real_size_layouts();
}
