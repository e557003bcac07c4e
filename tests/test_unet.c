/* tests/test_unet.c — the UNet against the golden data of shared/golden/tiny_a (diffusers
 * UNet2DConditionModel in PyTorch): fp32 outputs from both file layouts and every dtype,
 * fp16 statistics against the oracle's own fp16 run, a walk through the golden trace naming the
 * first module that diverges, batches with per-element timesteps, thread independence,
 * IP-Adapter (base, scale 0.5, Plus, Full-face) and refused adapters, the command line and bad
 * input. With SDREF_FULL: an SD1.5-sized single-file checkpoint of random F16 weights. */
#include "test.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define TINY "golden/tiny_a/"
#define KEEP_PATH(var, expr) char var[4096]; snprintf(var, sizeof var, "%s", expr)

/* ---- small helpers ---- */


static int load_golden(const char *rel, sd_tensor *t) { return load_npy(shared_path(rel), t); }

static sd_policy policy(const char *spec, sd_model_kind k) {
    sd_precision p;
    if (sd_precision_parse(spec, &p) != 0) CHECK(0, "precision %s: %s", spec, sd_last_error());
    return p.model[k];
}

static sd_ctx make_ctx(const char *spec, const char *prefix, sd_trace *trace) {
    sd_ctx c;
    memset(&c, 0, sizeof c);
    c.pol = policy(spec, SD_UNET);
    c.prefix = prefix;
    c.trace = trace;
    return c;
}

static sd_unet *load_unet(const char *path, const char *config, const char *spec) {
    sd_clear_error();
    sd_policy pol = policy(spec, SD_UNET);
    sd_unet *u = unet_load(path, config, &pol);
    CHECK(u != NULL, "unet_load %s: %s", path, sd_last_error());
    return u;
}

static sd_unet *load_tiny(const char *spec) {
    KEEP_PATH(model, shared_path(TINY "unet.safetensors"));
    return load_unet(model, shared_path(TINY "unet_config.json"), spec);
}

/* The golden inputs: sample [1,4,8,8], timestep 501, context [1,77,32]. */
typedef struct unet_inputs { sd_tensor sample, context; float t; } unet_inputs;

static int load_inputs(unet_inputs *in) {
    sd_tensor ts;
    if (load_golden(TINY "unet_in_sample.npy", &in->sample)) return -1;
    if (load_golden(TINY "unet_in_encoder_hidden_states.npy", &in->context)) { tensor_free(&in->sample); return -1; }
    if (load_golden(TINY "unet_in_timestep.npy", &ts)) { tensor_free(&in->sample); tensor_free(&in->context); return -1; }
    in->t = ts.data[0];
    tensor_free(&ts);
    return 0;
}

static void free_inputs(unet_inputs *in) {
    tensor_free(&in->sample);
    tensor_free(&in->context);
}

/* max |x - golden| <= rel * max |golden| */
static void check_close(const char *what, const sd_tensor *x, const sd_tensor *g, double rel) {
    int same = tensor_numel(x) == tensor_numel(g) && x->shape[x->ndim - 1] == g->shape[g->ndim - 1];
    CHECK(same, "%s: shape [%d,%d,%d,%d], golden [%d,%d,%d,%d]", what, x->shape[0], x->shape[1], x->shape[2],
          x->shape[3], g->shape[0], g->shape[1], g->shape[2], g->shape[3]);
    if (!same) return;
    size_t n = tensor_numel(g);
    double d = max_diff(x->data, g->data, n), m = max_abs(g->data, n);
    CHECK(d <= rel * m, "%s: max |sdref - golden| = %.3g > %.0e x %.3g", what, d, rel, m);
    if (env_flag("SDREF_VERBOSE")) fprintf(stderr, "  %s: max abs err %.3g (%.3g of max |golden| %.3g)\n", what, d, d / m, m);
}

static void check_golden(const char *what, const sd_tensor *x, const char *rel_golden, double rel) {
    sd_tensor g;
    if (load_golden(rel_golden, &g) != 0) return;
    check_close(what, x, &g, rel);
    tensor_free(&g);
}

/* Copy a safetensors file, leaving out `drop` and giving `reshape` one element fewer, with
 * every floating tensor stored as `dtype`; `linear_proj`: proj_in/proj_out [C,C,1,1] -> [C,C]. */
static int rewrite_st_ex(const char *src, const char *dst, st_dtype dtype, const char *drop, const char *reshape,
                         int linear_proj) {
    sd_safetensors st;
    if (st_open(&st, src) != 0) return -1;
    st_writer w;
    st_writer_init(&w);
    for (int i = 0; i < st.n; i++) {
        const st_entry *e = &st.entries[i];
        if (drop && !strcmp(e->name, drop)) continue;
        size_t n = 1;
        for (int d = 0; d < e->ndim; d++) n *= (size_t)e->shape[d];
        float *x = malloc(n * sizeof(float) + 4);
        st_read_f32(&st, e, x);
        int64_t shape[8];
        int ndim = e->ndim;
        memcpy(shape, e->shape, sizeof shape);
        if (reshape && !strcmp(e->name, reshape)) { ndim = 1; shape[0] = (int64_t)n - 1; }
        if (linear_proj && ndim == 4 && (strstr(e->name, ".proj_in.") || strstr(e->name, ".proj_out."))) ndim = 2;
        if (dtype == ST_F16) st_writer_add_f16(&w, e->name, ndim, shape, x);
        else if (dtype == ST_BF16) st_writer_add_bf16(&w, e->name, ndim, shape, x);
        else st_writer_add_f32(&w, e->name, ndim, shape, x);
        free(x);
    }
    int rc = st_writer_write(&w, dst);
    st_writer_free(&w);
    st_close(&st);
    return rc;
}

static int rewrite_st(const char *src, const char *dst, st_dtype dtype, const char *drop, const char *reshape) {
    return rewrite_st_ex(src, dst, dtype, drop, reshape, 0);
}

static int file_exists(const char *path) {
    FILE *f = fopen(path, "rb");
    if (f) fclose(f);
    return f != NULL;
}


/* ---- fp32 against golden: diffusers file, LDM checkpoint, and F16/BF16 files ---- */

static void test_fp32(void) {
    unet_inputs in;
    if (load_inputs(&in)) return;
    const char *models[2] = { TINY "unet.safetensors", TINY "checkpoint.safetensors" };
    const char *what[2] = { "fp32 (diffusers file)", "fp32 (LDM checkpoint)" };
    for (int k = 0; k < 2; k++) {
        KEEP_PATH(model, shared_path(models[k]));
        sd_unet *u = load_unet(model, shared_path(TINY "unet_config.json"), "fp32");
        if (!u) continue;
        CHECK(unet_in_channels(u) == 4 && unet_cross_attention_dim(u) == 32, "config: in %d, cross %d",
              unet_in_channels(u), unet_cross_attention_dim(u));
        sd_ctx c = make_ctx("fp32", "unet", NULL);
        sd_tensor out = unet_forward(u, &c, &in.sample, &in.t, &in.context, NULL);
        check_golden(what[k], &out, TINY "unet_out.npy", 1e-5);
        tensor_free(&out);
        unet_free(u);
    }
    free_inputs(&in);
}

/* The same weights stored as F16 (BF16) load to the same values as the F32 file under the
 * fp16 (bf16) policy, so the outputs are the same bits. */
static void test_dtypes(void) {
    unet_inputs in;
    if (load_inputs(&in)) return;
    KEEP_PATH(src, shared_path(TINY "unet.safetensors"));
    KEEP_PATH(config, shared_path(TINY "unet_config.json"));
    const st_dtype dts[2] = { ST_F16, ST_BF16 };
    const char *specs[2] = { "fp16", "bf16" }, *files[2] = { "unet_f16.safetensors", "unet_bf16.safetensors" };
    for (int k = 0; k < 2; k++) {
        KEEP_PATH(dst, tmp_path(files[k]));
        if (rewrite_st(src, dst, dts[k], NULL, NULL) != 0) { CHECK(0, "rewrite %s: %s", dst, sd_last_error()); continue; }
        sd_unet *a = load_unet(src, config, specs[k]), *b = load_unet(dst, config, specs[k]);
        if (a && b) {
            sd_ctx c = make_ctx(specs[k], "unet", NULL);
            sd_tensor oa = unet_forward(a, &c, &in.sample, &in.t, &in.context, NULL);
            sd_tensor ob = unet_forward(b, &c, &in.sample, &in.t, &in.context, NULL);
            CHECK(memcmp(oa.data, ob.data, tensor_numel(&oa) * sizeof(float)) == 0, "%s file under %s differs from the F32 file",
                  st_dtype_name(dts[k]), specs[k]);
            size_t bad = 0;
            for (size_t i = 0; i < tensor_numel(&ob); i++) bad += !sd_is_representable(ob.data[i], k ? SD_BF16 : SD_F16);
            CHECK(bad == 0, "%s output: %zu values not representable", specs[k], bad);
            tensor_free(&oa);
            tensor_free(&ob);
        }
        unet_free(a);
        unet_free(b);
    }
    free_inputs(&in);
}

/* use_linear_projection: proj_in/proj_out as Linear on tokens instead of 1x1 convs on the
 * image (SD2.x). Both sum over input channels in ascending order, so the tiny UNet rewritten
 * that way gives the same bits. */
static void test_linear_projection(void) {
    unet_inputs in;
    if (load_inputs(&in)) return;
    KEEP_PATH(src, shared_path(TINY "unet.safetensors"));
    KEEP_PATH(config, shared_path(TINY "unet_config.json"));
    KEEP_PATH(dst, tmp_path("unet_linear.safetensors"));
    KEEP_PATH(dst_cfg, tmp_path("unet_linear_config.json"));
    uint8_t *text;
    size_t len;
    char *at;
    if (sd_read_file(config, &text, &len) != 0 || !(at = strstr((char *)text, "\"use_linear_projection\": false"))) {
        CHECK(0, "unet_config.json: no use_linear_projection false");
        free_inputs(&in);
        return;
    }
    FILE *f = fopen(dst_cfg, "wb");
    if (f) {
        fprintf(f, "%.*s\"use_linear_projection\": true%s", (int)(at - (char *)text), (char *)text,
                at + strlen("\"use_linear_projection\": false"));
        fclose(f);
    }
    free(text);
    CHECK(rewrite_st_ex(src, dst, ST_F32, NULL, NULL, 1) == 0, "rewrite: %s", sd_last_error());
    sd_unet *a = load_unet(src, config, "fp32"), *b = load_unet(dst, dst_cfg, "fp32");
    if (a && b) {
        sd_trace tr;
        memset(&tr, 0, sizeof tr);
        sd_ctx c = make_ctx("fp32", "unet", NULL), cl = make_ctx("fp32", "unet", &tr);
        sd_tensor oa = unet_forward(a, &c, &in.sample, &in.t, &in.context, NULL);
        sd_tensor ob = unet_forward(b, &cl, &in.sample, &in.t, &in.context, NULL);
        CHECK(memcmp(oa.data, ob.data, tensor_numel(&oa) * sizeof(float)) == 0, "linear projection differs from 1x1 conv");
        const sd_trace_entry *e = trace_find(&tr, "unet.mid_block.attentions.0.proj_in");
        CHECK(e && e->ndim == 3 && e->shape[1] == 16 && e->shape[2] == 64, "linear proj_in is traced on tokens [1,16,64]");
        tensor_free(&oa);
        tensor_free(&ob);
        sd_trace_free(&tr);
    }
    unet_free(a);
    unet_free(b);
    free_inputs(&in);
}

/* ---- fp16 preset: statistics against the oracle's fp16ops run ---- */


static void test_fp16(void) {
    unet_inputs in;
    if (load_inputs(&in)) return;
    sd_unet *u = load_tiny("fp16");
    if (u) {
        sd_ctx c = make_ctx("fp16", "unet", NULL);
        sd_tensor out = unet_forward(u, &c, &in.sample, &in.t, &in.context, NULL);
        check_fp16_stats("fp16 unet", out.data, tensor_numel(&out), TINY "unet_out.npy", TINY "unet_out_fp16ops.npy");
        tensor_free(&out);
    }
    unet_free(u);
    free_inputs(&in);
}

/* ---- trace walk: every golden unet.* tensor in execution order ---- */


static void test_trace(void) {
    unet_inputs in;
    if (load_inputs(&in)) return;
    sd_unet *u = load_tiny("fp32");
    if (u) {
        sd_trace tr;
        memset(&tr, 0, sizeof tr);
        tr.keep_data = 1;
        sd_ctx c = make_ctx("fp32", "unet", &tr);
        sd_tensor out = unet_forward(u, &c, &in.sample, &in.t, &in.context, NULL);
        walk_golden_trace(TINY "trace.safetensors", "unet.", &tr, 1e-4, "tiny_a unet trace");
        const sd_trace_entry *last = tr.n ? &tr.e[tr.n - 1] : NULL;
        CHECK(last && !strcmp(last->name, "unet.conv_out") && !memcmp(last->data, out.data, tensor_numel(&out) * sizeof(float)),
              "the last traced tensor is the output (unet.conv_out)");
        tensor_free(&out);
        sd_trace_free(&tr);
    }
    unet_free(u);
    free_inputs(&in);
}

/* ---- batches: per-element timesteps and contexts; thread independence ---- */

static sd_tensor stack2(const sd_tensor *a, const sd_tensor *b) {
    sd_tensor y = *a;
    size_t n = tensor_numel(a);
    y.shape[0] = 2;
    y.data = malloc(2 * n * sizeof(float));
    memcpy(y.data, a->data, n * sizeof(float));
    memcpy(y.data + n, b->data, n * sizeof(float));
    return y;
}

static void test_batch_threads(void) {
    unet_inputs in;
    if (load_inputs(&in)) return;
    sd_unet *u = load_tiny("fp16");
    if (!u) { free_inputs(&in); return; }
    sd_ctx c = make_ctx("fp16", "unet", NULL);
    /* element 1: another timestep and the context reversed in sign */
    sd_tensor ctx2 = tensor_copy(&in.context);
    for (size_t i = 0; i < tensor_numel(&ctx2); i++) ctx2.data[i] = -ctx2.data[i];
    float ts[2] = { in.t, 21.0f };
    sd_tensor s2 = stack2(&in.sample, &in.sample), c2 = stack2(&in.context, &ctx2);
    sd_set_threads(1);
    sd_tensor a = unet_forward(u, &c, &in.sample, &ts[0], &in.context, NULL);
    sd_tensor b = unet_forward(u, &c, &in.sample, &ts[1], &ctx2, NULL);
    sd_tensor both1 = unet_forward(u, &c, &s2, ts, &c2, NULL);
    sd_set_threads(2);
    sd_tensor both2 = unet_forward(u, &c, &s2, ts, &c2, NULL);
    size_t n = tensor_numel(&a);
    CHECK(both1.shape[0] == 2 && tensor_numel(&both1) == 2 * n, "batch 2 output shape");
    CHECK(memcmp(both1.data, a.data, n * sizeof(float)) == 0, "batch element 0 differs from its own run");
    CHECK(memcmp(both1.data + n, b.data, n * sizeof(float)) == 0, "batch element 1 (t=21) differs from its own run");
    CHECK(max_diff(a.data, b.data, n) > 1e-3, "the second element's timestep and context change nothing");
    CHECK(memcmp(both1.data, both2.data, 2 * n * sizeof(float)) == 0, "output differs between 1 and 2 threads");
    sd_set_threads(0);
    tensor_free(&a); tensor_free(&b); tensor_free(&both1); tensor_free(&both2);
    tensor_free(&s2); tensor_free(&c2); tensor_free(&ctx2);
    unet_free(u);
    free_inputs(&in);
}

/* Non-square latents and sizes not divisible by 2 (diffusers' upsample_size path): the output
 * has the sample's shape; a 16x8 latent made of two copies of an 8x8 one side by side gives,
 * away from the seam, not the 8x8 result (the receptive field is global through attention),
 * so only shapes and finiteness are asserted, plus invariance to the batch position. */
static void test_shapes(void) {
    unet_inputs in;
    if (load_inputs(&in)) return;
    sd_unet *u = load_tiny("fp32");
    if (!u) { free_inputs(&in); return; }
    sd_ctx c = make_ctx("fp32", "unet", NULL);
    const int sizes[3][2] = { { 8, 12 }, { 7, 9 }, { 1, 3 } };
    for (int k = 0; k < 3; k++) {
        int H = sizes[k][0], W = sizes[k][1];
        sd_tensor s = tensor_new(4, 1, 4, H, W);
        for (size_t i = 0; i < tensor_numel(&s); i++) s.data[i] = in.sample.data[i % tensor_numel(&in.sample)];
        CHECK(unet_check(u, &s, &in.context, NULL) == 0, "%dx%d: %s", W, H, sd_last_error());
        sd_tensor o = unet_forward(u, &c, &s, &in.t, &in.context, NULL);
        size_t bad = 0;
        for (size_t i = 0; i < tensor_numel(&o); i++) bad += !(fabsf(o.data[i]) < 1e6f);
        CHECK(o.shape[0] == 1 && o.shape[1] == 4 && o.shape[2] == H && o.shape[3] == W && bad == 0,
              "%dx%d latent: output [%d,%d,%d,%d], %zu non-finite", W, H, o.shape[0], o.shape[1], o.shape[2], o.shape[3], bad);
        tensor_free(&o);
        tensor_free(&s);
    }
    /* bad shapes are refused by unet_check with a message */
    sd_tensor wide = tensor_new(3, 1, 77, 48, 1);
    sd_clear_error();
    CHECK(unet_check(u, &in.sample, &wide, NULL) != 0 && strstr(sd_last_error(), "32"), "context width 48 accepted (%s)",
          sd_last_error());
    sd_tensor five = tensor_new(4, 1, 5, 8, 8);
    sd_clear_error();
    CHECK(unet_check(u, &five, &in.context, NULL) != 0, "a 5-channel sample accepted");
    tensor_free(&wide);
    tensor_free(&five);
    unet_free(u);
    free_inputs(&in);
}

/* ---- IP-Adapter ---- */

static sd_ipadapter *load_adapter(const char *path) {
    sd_policy pol = policy("fp32", SD_IPADAPTER);
    sd_clear_error();
    sd_ipadapter *a = ipadapter_load(path, NULL, &pol);
    CHECK(a != NULL, "ipadapter_load %s: %s", path, sd_last_error());
    return a;
}

static void run_ip(sd_unet *u, const unet_inputs *in, const char *adapter, const char *input, const char *prefix,
                   float scale, const char *golden, const char *golden_tokens, const char *trace_prefix) {
    KEEP_PATH(apath, shared_path(adapter));
    sd_ipadapter *a = load_adapter(apath);
    sd_tensor x;
    if (!a || load_golden(input, &x) != 0) { ipadapter_free(a); return; }
    sd_trace tr;
    memset(&tr, 0, sizeof tr);
    tr.keep_data = 1;
    sd_ctx c = make_ctx("fp32", prefix, trace_prefix ? &tr : NULL);
    CHECK(unet_ip_fits(u, a) == 0, "%s does not fit: %s", adapter, sd_last_error());
    sd_tensor tok = ipadapter_tokens(a, &c, &x);
    CHECK(tok.data != NULL, "%s tokens: %s", adapter, sd_last_error());
    if (tok.data) {
        if (golden_tokens) check_golden(golden_tokens, &tok, golden_tokens, 1e-5);
        sd_unet_ip ip = { a, &tok, scale };
        sd_tensor out = unet_forward(u, &c, &in->sample, &in->t, &in->context, &ip);
        check_golden(golden, &out, golden, 1e-5);
        if (trace_prefix) walk_golden_trace(TINY "trace.safetensors", trace_prefix, &tr, 1e-4, "IP-Adapter trace (attn2 with IP)");
        tensor_free(&out);
    }
    sd_trace_free(&tr);
    tensor_free(&tok);
    tensor_free(&x);
    ipadapter_free(a);
}

/* An adapter file of base layout with tokens `width` wide and the given layers, zero weights. */
static int write_fake_adapter(const char *path, int width, int n_layers, const int *ns, const int *chs) {
    st_writer w;
    st_writer_init(&w);
    float *z = calloc((size_t)4 * width * 1280 + 4, sizeof(float));
    int64_t pw[2] = { 4 * width, 24 }, pb[1] = { 4 * width }, nw[1] = { width };
    st_writer_add_f32(&w, "image_proj.proj.weight", 2, pw, z);
    st_writer_add_f32(&w, "image_proj.proj.bias", 1, pb, z);
    st_writer_add_f32(&w, "image_proj.norm.weight", 1, nw, z);
    st_writer_add_f32(&w, "image_proj.norm.bias", 1, nw, z);
    for (int i = 0; i < n_layers; i++) {
        char name[64];
        int64_t s[2] = { chs[i], width };
        snprintf(name, sizeof name, "ip_adapter.%d.to_k_ip.weight", ns[i]);
        st_writer_add_f32(&w, name, 2, s, z);
        snprintf(name, sizeof name, "ip_adapter.%d.to_v_ip.weight", ns[i]);
        st_writer_add_f32(&w, name, 2, s, z);
    }
    int rc = st_writer_write(&w, path);
    st_writer_free(&w);
    free(z);
    return rc;
}

static void test_ip(void) {
    unet_inputs in;
    if (load_inputs(&in)) return;
    sd_unet *u = load_tiny("fp32");
    if (!u) { free_inputs(&in); return; }
    run_ip(u, &in, TINY "ip_adapter.safetensors", TINY "unet_ip_in_image_embeds.npy", "unet_ip", 1.0f,
           TINY "unet_ip_out.npy", TINY "unet_ip_tokens.npy", "unet_ip.");
    run_ip(u, &in, TINY "ip_adapter.safetensors", TINY "unet_ip_in_image_embeds.npy", "unet_ip", 0.5f,
           TINY "unet_ip_out_scale0.5.npy", NULL, NULL);
    run_ip(u, &in, TINY "ip_adapter_plus.safetensors", TINY "vision_hidden_states_penultimate.npy", "unet_ipplus", 1.0f,
           TINY "unet_ipplus_out.npy", TINY "unet_ipplus_tokens.npy", NULL);
    run_ip(u, &in, TINY "ip_adapter_full_face.safetensors", TINY "vision_hidden_states_penultimate.npy", "unet_ipfull", 1.0f,
           TINY "unet_ipfull_out.npy", TINY "unet_ipfull_tokens.npy", NULL);

    /* adapters made for another UNet are refused, saying which pair is expected */
    const int ns[6] = { 1, 3, 5, 7, 9, 11 }, chs[6] = { 32, 32, 32, 32, 32, 64 }, bad_chs[6] = { 32, 32, 64, 32, 32, 64 };
    const int wrong_ns[6] = { 1, 3, 5, 7, 9, 13 };
    struct { const char *file, *want; int width; const int *ns, *chs; int n; } cases[] = {
        { "ip_w48.safetensors", "width 48", 48, ns, chs, 6 },            /* token width 48, UNet 32 */
        { "ip_5layers.safetensors", "5 cross-attention layers", 32, ns, chs, 5 },
        { "ip_badch.safetensors", "ip_adapter.5", 32, ns, bad_chs, 6 },   /* layer 5 has the mid block's width */
        { "ip_badn.safetensors", "ip_adapter.11", 32, wrong_ns, chs, 6 }, /* numbered as if mid came first */
        { "ip_ok.safetensors", NULL, 32, ns, chs, 6 },
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        KEEP_PATH(p, tmp_path(cases[k].file));
        if (write_fake_adapter(p, cases[k].width, cases[k].n, cases[k].ns, cases[k].chs) != 0) {
            CHECK(0, "write %s: %s", p, sd_last_error());
            continue;
        }
        sd_ipadapter *a = load_adapter(p);
        if (!a) continue;
        sd_clear_error();
        int rc = unet_ip_fits(u, a);
        if (cases[k].want)
            CHECK(rc != 0 && strstr(sd_last_error(), cases[k].want), "%s: accepted or unclear message: '%s'", cases[k].file,
                  sd_last_error());
        else CHECK(rc == 0, "%s refused: %s", cases[k].file, sd_last_error());
        if (k == 0) CHECK(strstr(sd_last_error(), "768 = SD1.x") != NULL, "the width message names the pairs: %s", sd_last_error());
        ipadapter_free(a);
    }
    unet_free(u);
    free_inputs(&in);
}

/* ---- the command line and bad input ---- */

static void test_cli(void) {
    if (!file_exists("./sdref")) { CHECK(0, "./sdref not built (make sdref)"); return; }
    KEEP_PATH(model, shared_path(TINY "unet.safetensors"));
    KEEP_PATH(ckpt, shared_path(TINY "checkpoint.safetensors"));
    KEEP_PATH(config, shared_path(TINY "unet_config.json"));
    KEEP_PATH(sample, shared_path(TINY "unet_in_sample.npy"));
    KEEP_PATH(ctx, shared_path(TINY "unet_in_encoder_hidden_states.npy"));
    KEEP_PATH(out, tmp_path("cli_unet.npy"));
    KEEP_PATH(trace, tmp_path("cli_unet_trace.safetensors"));
    KEEP_PATH(err, tmp_path("cli_unet.err"));
    int rc = run_cmd("./sdref unet --model '%s' --config '%s' --sample '%s' --timestep 501 --context '%s' --threads 2 "
                     "--trace '%s' -o '%s' 2>'%s'", model, config, sample, ctx, trace, out, err);
    CHECK(rc == 0, "sdref unet exited %d", rc);
    sd_tensor o;
    if (rc == 0 && load_npy(out, &o) == 0) {
        check_golden("sdref unet (CLI)", &o, TINY "unet_out.npy", 1e-5);
        tensor_free(&o);
        sd_safetensors st;
        if (st_open(&st, trace) == 0) {
            CHECK(st_find(&st, "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0") && st_find(&st, "unet.time_proj"),
                  "the CLI trace lacks unet.* names");
            st_close(&st);
        } else CHECK(0, "trace: %s", sd_last_error());
    }
    /* LDM checkpoint without --config: the SD1.5 config is assumed, and refused by shape */
    remove(out);
    rc = run_cmd("./sdref unet --model '%s' --sample '%s' --timestep 501 --context '%s' -o '%s' 2>'%s'", ckpt, sample, ctx, out, err);
    CHECK(rc != 0 && !file_exists(out), "a tiny checkpoint under the SD1.5 config: exit %d", rc);
    /* IP-Adapter through the command line */
    KEEP_PATH(ipa, shared_path(TINY "ip_adapter.safetensors"));
    KEEP_PATH(emb, shared_path(TINY "unet_ip_in_image_embeds.npy"));
    KEEP_PATH(tok, tmp_path("cli_ip_tokens.npy"));
    rc = run_cmd("./sdref unet --model '%s' --config '%s' --sample '%s' --timestep 501 --context '%s' --ip-adapter '%s' "
                 "--ip-embeds '%s' --ip-scale 0.5 --ip-tokens-out '%s' -o '%s' 2>'%s'", ckpt, config, sample, ctx, ipa, emb,
                 tok, out, err);
    CHECK(rc == 0, "sdref unet --ip-adapter exited %d", rc);
    if (rc == 0 && load_npy(out, &o) == 0) {
        check_golden("sdref unet --ip-adapter --ip-scale 0.5 (CLI)", &o, TINY "unet_ip_out_scale0.5.npy", 1e-5);
        tensor_free(&o);
        if (load_npy(tok, &o) == 0) {
            check_golden("--ip-tokens-out", &o, TINY "unet_ip_tokens.npy", 1e-5);
            tensor_free(&o);
        }
    }

    /* --ip-image: PNG -> CLIP preprocessing -> vision encoder -> adapter -> UNet, the same bits as in-process */
    KEEP_PATH(png, shared_path("golden/clip_preprocess/gray_350x250.png"));
    KEEP_PATH(enc, shared_path(TINY "image_encoder.safetensors"));
    KEEP_PATH(enc_cfg, shared_path(TINY "image_encoder_config.json"));
    remove(out);
    rc = run_cmd("./sdref unet --model '%s' --config '%s' --sample '%s' --timestep 501 --context '%s' --ip-adapter '%s' "
                 "--ip-image '%s' --image-encoder '%s' --image-encoder-config '%s' -o '%s' 2>'%s'", model, config, sample, ctx,
                 ipa, png, enc, enc_cfg, out, err);
    CHECK(rc == 0, "sdref unet --ip-image exited %d", rc);
    sd_policy p32 = policy("fp32", SD_VISION);
    sd_clip_vision *vm = clip_vision_load(enc, enc_cfg, &p32);
    sd_ipadapter *ad = load_adapter(ipa);
    sd_unet *u = load_unet(model, config, "fp32");
    sd_image im;
    unet_inputs in;
    if (rc == 0 && vm && ad && u && png_read_file(png, &im) == 0) {
        sd_tensor px, emb, tk, want;
        sd_ctx c = make_ctx("fp32", "unet", NULL);
        if (clip_preprocess(&im, clip_vision_image_size(vm), &px, NULL) == 0 && load_inputs(&in) == 0) {
            emb = clip_vision_forward(vm, &c, &px, NULL, NULL);
            tk = ipadapter_tokens(ad, &c, &emb);
            sd_unet_ip ip = { ad, &tk, 1.0f };
            want = unet_forward(u, &c, &in.sample, &in.t, &in.context, &ip);
            if (load_npy(out, &o) == 0) {
                CHECK(tensor_numel(&o) == tensor_numel(&want) &&
                      !memcmp(o.data, want.data, tensor_numel(&want) * sizeof(float)), "--ip-image differs from the in-process chain");
                tensor_free(&o);
            }
            tensor_free(&want); tensor_free(&tk); tensor_free(&emb); tensor_free(&px);
            free_inputs(&in);
        } else CHECK(0, "preprocess: %s", sd_last_error());
        sd_image_free(&im);
    } else CHECK(0, "--ip-image chain: %s", sd_last_error());
    clip_vision_free(vm);
    ipadapter_free(ad);
    unet_free(u);

    /* bad input: non-zero exit, one line naming the problem, no output file */
    KEEP_PATH(missing, tmp_path("unet_missing.safetensors"));
    KEEP_PATH(misshaped, tmp_path("unet_misshaped.safetensors"));
    KEEP_PATH(wide, tmp_path("ctx_wide.npy"));
    const char *gone = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight";
    CHECK(rewrite_st(model, missing, ST_F32, gone, NULL) == 0, "rewrite: %s", sd_last_error());
    CHECK(rewrite_st(model, misshaped, ST_F32, NULL, "up_blocks.1.resnets.2.conv1.bias") == 0, "rewrite: %s", sd_last_error());
    float *z = calloc(77 * 48, sizeof(float));
    int64_t ws[3] = { 1, 77, 48 };
    CHECK(npy_write(wide, NPY_F32, 3, ws, z) == 0, "npy_write: %s", sd_last_error());
    free(z);
    struct { const char *what, *model, *ctx, *extra, *want; } bad[] = {
        { "missing tensor", missing, ctx, "", gone },
        { "mis-shaped tensor", misshaped, ctx, "", "up_blocks.1.resnets.2.conv1.bias" },
        { "wrong context width", model, wide, "", "48" },
        { "no such model", "/nonexistent/unet.safetensors", ctx, "", "nonexistent" },
        { "bad timestep", model, ctx, "--timestep abc", "timestep" },
        { "unknown option", model, ctx, "--frobnicate 1", "frobnicate" },
        { "IP option without adapter", model, ctx, "--ip-scale 0.5", "--ip-adapter" },
    };
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        remove(out);
        rc = run_cmd("./sdref unet --model '%s' --config '%s' --sample '%s' %s --context '%s' %s -o '%s' 2>'%s'",
                     bad[k].model, config, sample, strstr(bad[k].extra, "--timestep") ? "" : "--timestep 501", bad[k].ctx,
                     bad[k].extra, out, err);
        uint8_t *msg = NULL;
        size_t len = 0;
        int have = sd_read_file(err, &msg, &len) == 0;
        CHECK(rc != 0 && rc < 128, "%s: exit %d", bad[k].what, rc);
        CHECK(!file_exists(out), "%s: an output file was written", bad[k].what);
        CHECK(have && strstr((const char *)msg, bad[k].want), "%s: message '%s' does not name '%s'", bad[k].what,
              have ? (const char *)msg : "", bad[k].want);
        free(msg);
    }
    remove(out);
    KEEP_PATH(hs, shared_path(TINY "vision_hidden_states_penultimate.npy"));
    rc = run_cmd("./sdref unet --model '%s' --config '%s' --sample '%s' --timestep 501 --context '%s' --ip-adapter '%s' "
                 "--ip-hidden '%s' -o '%s' 2>'%s'", model, config, sample, ctx, ipa, hs, out, err);
    CHECK(rc != 0 && !file_exists(out), "a base adapter given hidden states: exit %d", rc);
}

/* ---- real size (SDREF_FULL): SD1.5's single-file layout with random F16 weights ---- */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static float rng_uniform(void) {                             /* xorshift64*, [-1, 1) */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    uint64_t r = rng_state * 0x2545f4914f6cdd1dull;
    return (float)((double)(r >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

typedef struct spec_row { char name[200]; char dtype[8]; int ndim; int64_t shape[4]; } spec_row;

/* The rows of a shared/spec .tsv file (name, dtype, comma-separated shape). */
static spec_row *read_spec(const char *rel, int *n) {
    uint8_t *text;
    size_t len;
    *n = 0;
    if (sd_read_file(shared_path(rel), &text, &len) != 0) { CHECK(0, "%s: %s", rel, sd_last_error()); return NULL; }
    spec_row *rows = calloc(4096, sizeof *rows);
    char *next;
    for (char *line = (char *)text; line && *line && *n < 4096; line = next) {
        next = strchr(line, '\n');
        if (next) *next++ = 0;
        if (line[0] == '#' || !strncmp(line, "name\t", 5)) continue;
        char *t1 = strchr(line, '\t'), *t2 = t1 ? strchr(t1 + 1, '\t') : NULL;
        if (!t1 || !t2) continue;
        spec_row *r = &rows[(*n)++];
        snprintf(r->name, sizeof r->name, "%.*s", (int)(t1 - line), line);
        snprintf(r->dtype, sizeof r->dtype, "%.*s", (int)(t2 - t1 - 1), t1 + 1);
        char *s = t2 + 1;
        r->ndim = 0;
        while (*s && *s != '\t' && r->ndim < 4) {
            r->shape[r->ndim++] = strtoll(s, &s, 10);
            if (*s == ',') s++;
        }
    }
    free(text);
    return rows;
}

/* Write the spec as a safetensors file, streaming: floating tensors F16 with random values
 * (weights ~ U(-1,1) sqrt(3/fan_in), norm scales near 1, biases small), integer buffers zero. */
static int write_random_st(const char *path, const spec_row *rows, int n) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t cap = 1 << 20, hl = 0;
    char *h = malloc(cap);
    uint64_t off = 0;
    hl += (size_t)snprintf(h + hl, cap - hl, "{");
    for (int i = 0; i < n; i++) {
        const spec_row *r = &rows[i];
        const char *dt = !strcmp(r->dtype, "I64") ? "I64" : !strcmp(r->dtype, "I32") ? "I32" : "F16";
        uint64_t cnt = 1;
        for (int d = 0; d < r->ndim; d++) cnt *= (uint64_t)r->shape[d];
        uint64_t bytes = cnt * (!strcmp(dt, "I64") ? 8 : !strcmp(dt, "I32") ? 4 : 2);
        hl += (size_t)snprintf(h + hl, cap - hl, "%s\"%s\":{\"dtype\":\"%s\",\"shape\":[", i ? "," : "", r->name, dt);
        for (int d = 0; d < r->ndim; d++) hl += (size_t)snprintf(h + hl, cap - hl, "%s%lld", d ? "," : "", (long long)r->shape[d]);
        hl += (size_t)snprintf(h + hl, cap - hl, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)off,
                               (unsigned long long)(off + bytes));
        off += bytes;
    }
    hl += (size_t)snprintf(h + hl, cap - hl, "}");
    while (hl % 8) h[hl++] = ' ';
    uint8_t le[8];
    for (int k = 0; k < 8; k++) le[k] = (uint8_t)((uint64_t)hl >> (8 * k));
    fwrite(le, 1, 8, f);
    fwrite(h, 1, hl, f);
    free(h);
    uint8_t *buf = malloc(1 << 20);
    for (int i = 0; i < n; i++) {
        const spec_row *r = &rows[i];
        uint64_t cnt = 1, fan_in = 1;
        for (int d = 0; d < r->ndim; d++) cnt *= (uint64_t)r->shape[d];
        for (int d = 1; d < r->ndim; d++) fan_in *= (uint64_t)r->shape[d];
        size_t nlen = strlen(r->name);
        int is_int = !strcmp(r->dtype, "I64") || !strcmp(r->dtype, "I32");
        int esz = !strcmp(r->dtype, "I64") ? 8 : !strcmp(r->dtype, "I32") ? 4 : 2;
        int gamma = r->ndim == 1 && nlen > 7 && !strcmp(r->name + nlen - 7, ".weight");
        float a = r->ndim >= 2 ? sqrtf(3.0f / (float)fan_in) : 0.1f;
        for (uint64_t done = 0; done < cnt;) {
            size_t chunk = (size_t)((cnt - done) < (uint64_t)((1 << 20) / esz) ? (cnt - done) : (uint64_t)((1 << 20) / esz));
            if (is_int) memset(buf, 0, chunk * esz);
            else
                for (size_t k = 0; k < chunk; k++) {
                    uint16_t v = sd_f32_to_f16((gamma ? 1.0f : 0.0f) + a * rng_uniform());
                    buf[2 * k] = (uint8_t)v;
                    buf[2 * k + 1] = (uint8_t)(v >> 8);
                }
            fwrite(buf, (size_t)esz, chunk, f);
            done += chunk;
        }
    }
    free(buf);
    return fclose(f) == 0 ? 0 : -1;
}

static void check_shape(const sd_trace *t, const char *name, int d0, int d1, int d2, int d3) {
    const sd_trace_entry *e = trace_find(t, name);
    int want[4] = { d0, d1, d2, d3 };
    int ok = e != NULL;
    for (int d = 0; ok && d < 4; d++) ok = e->shape[d] == want[d];
    CHECK(ok, "SD1.5 %s: shape [%d,%d,%d,%d], expected [%d,%d,%d,%d]", name, e ? (int)e->shape[0] : -1,
          e ? (int)e->shape[1] : -1, e ? (int)e->shape[2] : -1, e ? (int)e->shape[3] : -1, d0, d1, d2, d3);
}

/* SD2.x recognised from shapes in a single file without a config: the SD1.5 layout with
 * cross-attention width 1024 and linear proj_in/proj_out (heads of size 64). */
static void test_full_sd2(const spec_row *rows15, int n15) {
    spec_row *rows = calloc((size_t)n15, sizeof *rows);
    int n = 0;
    for (int i = 0; i < n15; i++) {
        const spec_row *r = &rows15[i];
        if (strncmp(r->name, "model.diffusion_model.", 22) != 0) continue;
        rows[n] = *r;
        if (strstr(r->name, ".attn2.to_k.") || strstr(r->name, ".attn2.to_v.")) rows[n].shape[1] = 1024;
        if ((strstr(r->name, ".proj_in.weight") || strstr(r->name, ".proj_out.weight")) && r->ndim == 4) rows[n].ndim = 2;
        n++;
    }
    KEEP_PATH(path, tmp_path("sd2_random_f16.safetensors"));
    if (write_random_st(path, rows, n) != 0) { CHECK(0, "cannot write %s", path); free(rows); return; }
    free(rows);
    sd_unet *u = load_unet(path, NULL, "fp16");
    if (u) {
        CHECK(unet_cross_attention_dim(u) == 1024, "SD2.x file: cross-attention width %d", unet_cross_attention_dim(u));
        sd_trace tr;
        memset(&tr, 0, sizeof tr);
        sd_ctx c = make_ctx("fp16", "unet", &tr);
        sd_tensor s = tensor_new(4, 2, 4, 8, 16), ctx = tensor_new(3, 2, 77, 1024, 1);
        for (size_t i = 0; i < tensor_numel(&s); i++) s.data[i] = rng_uniform();
        for (size_t i = 0; i < tensor_numel(&ctx); i++) ctx.data[i] = rng_uniform();
        float t[2] = { 999, 1 };
        sd_tensor o = unet_forward(u, &c, &s, t, &ctx, NULL);
        size_t bad = 0;
        for (int i = 0; i < tr.n; i++) bad += (size_t)(tr.e[i].stats.n_inf + tr.e[i].stats.n_nan);
        CHECK(bad == 0, "SD2.x random weights: %zu Inf/NaN values in the trace", bad);
        check_shape(&tr, "unet.down_blocks.0.attentions.0.proj_in", 2, 128, 320, 1);
        check_shape(&tr, "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2", 2, 8, 1280, 1);
        check_shape(&tr, "unet.conv_out", 2, 4, 8, 16);
        tensor_free(&o);
        tensor_free(&s);
        tensor_free(&ctx);
        sd_trace_free(&tr);
        unet_free(u);
    }
    remove(path);
}

static void test_full(void) {
    int n, nip;
    spec_row *rows = read_spec("spec/sd15_checkpoint_ldm.tsv", &n);
    spec_row *iprows = read_spec("spec/ip_adapter_sd15.tsv", &nip);
    KEEP_PATH(ck, tmp_path("sd15_random_f16.safetensors"));
    KEEP_PATH(ipf, tmp_path("ip_adapter_sd15_random.safetensors"));
    CHECK(rows && n > 1100 && iprows && nip == 36, "spec rows: %d, %d", n, nip);
    if (!rows || !iprows || write_random_st(ck, rows, n) != 0 || write_random_st(ipf, iprows, nip) != 0) {
        CHECK(0, "cannot write the SD1.5-sized files");
        free(rows);
        free(iprows);
        return;
    }
    free(iprows);
    test_full_sd2(rows, n);
    free(rows);
    sd_unet *u = load_unet(ck, NULL, "fp16");
    if (!u) return;
    CHECK(unet_in_channels(u) == 4 && unet_cross_attention_dim(u) == 768, "SD1.5: in %d, cross %d", unet_in_channels(u),
          unet_cross_attention_dim(u));
    sd_trace tr;
    memset(&tr, 0, sizeof tr);
    sd_ctx c = make_ctx("fp16", "unet", &tr);
    sd_tensor s = tensor_new(4, 1, 4, 8, 8), ctx = tensor_new(3, 1, 77, 768, 1);
    for (size_t i = 0; i < tensor_numel(&s); i++) s.data[i] = rng_uniform();
    for (size_t i = 0; i < tensor_numel(&ctx); i++) ctx.data[i] = rng_uniform();
    float t = 500;
    sd_policy ipol = policy("fp16", SD_IPADAPTER);
    sd_ipadapter *a = ipadapter_load(ipf, NULL, &ipol);
    CHECK(a && unet_ip_fits(u, a) == 0, "ip-adapter_sd15 layout on the SD1.5 UNet: %s", sd_last_error());
    sd_tensor emb = tensor_new(2, 1, 1024, 1, 1), tok = { 0, { 0, 0, 0, 0 }, NULL };
    if (a) tok = ipadapter_tokens(a, &c, &emb);
    sd_unet_ip ip = { a, tok.data ? &tok : NULL, 1.0f };
    sd_tensor o = unet_forward(u, &c, &s, &t, &ctx, &ip);
    size_t bad = 0;
    for (int i = 0; i < tr.n; i++) bad += (size_t)(tr.e[i].stats.n_inf + tr.e[i].stats.n_nan);
    CHECK(bad == 0, "SD1.5 random weights: %zu Inf/NaN values in the trace", bad);
    check_shape(&tr, "unet.time_proj", 1, 320, 1, 1);
    check_shape(&tr, "unet.time_embedding", 1, 1280, 1, 1);
    check_shape(&tr, "unet.conv_in", 1, 320, 8, 8);
    check_shape(&tr, "unet.down_blocks.0.attentions.1.transformer_blocks.0.attn2", 1, 64, 320, 1);
    check_shape(&tr, "unet.down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0", 1, 64, 1280, 1);
    check_shape(&tr, "unet.down_blocks.0", 1, 320, 4, 4);
    check_shape(&tr, "unet.down_blocks.1", 1, 640, 2, 2);
    check_shape(&tr, "unet.down_blocks.2", 1, 1280, 1, 1);
    check_shape(&tr, "unet.down_blocks.2.attentions.0.transformer_blocks.0.attn1", 1, 4, 1280, 1);
    check_shape(&tr, "unet.down_blocks.3", 1, 1280, 1, 1);
    check_shape(&tr, "unet.mid_block.attentions.0.transformer_blocks.0.attn2", 1, 1, 1280, 1);
    check_shape(&tr, "unet.mid_block", 1, 1280, 1, 1);
    check_shape(&tr, "unet.up_blocks.0.resnets.0.norm1", 1, 2560, 1, 1);
    check_shape(&tr, "unet.up_blocks.0", 1, 1280, 2, 2);
    check_shape(&tr, "unet.up_blocks.1.resnets.2.norm1", 1, 1920, 2, 2);
    check_shape(&tr, "unet.up_blocks.1", 1, 1280, 4, 4);
    check_shape(&tr, "unet.up_blocks.2.resnets.0.norm1", 1, 1920, 4, 4);
    check_shape(&tr, "unet.up_blocks.2.resnets.2.norm1", 1, 960, 4, 4);
    check_shape(&tr, "unet.up_blocks.2", 1, 640, 8, 8);
    check_shape(&tr, "unet.up_blocks.3.resnets.0.norm1", 1, 960, 8, 8);
    check_shape(&tr, "unet.up_blocks.3.resnets.2.norm1", 1, 640, 8, 8);
    check_shape(&tr, "unet.up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0", 1, 64, 1280, 1);
    check_shape(&tr, "unet.up_blocks.3", 1, 320, 8, 8);
    check_shape(&tr, "unet.conv_out", 1, 4, 8, 8);
    CHECK(trace_find(&tr, "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.processor.to_k_ip") != NULL,
          "the IP-Adapter path ran in the last cross-attention layer");
    tensor_free(&o);
    tensor_free(&s);
    tensor_free(&ctx);
    tensor_free(&emb);
    tensor_free(&tok);
    ipadapter_free(a);
    sd_trace_free(&tr);
    unet_free(u);
}

void test_unet(void) {
    if (!have_shared()) { CHECK(0, "shared golden data not found (set SDREF_SHARED)"); return; }
    test_fp32();
    test_dtypes();
    test_linear_projection();
    test_fp16();
    test_trace();
    test_batch_threads();
    test_shapes();
    test_ip();
    test_cli();
    if (env_flag("SDREF_FULL")) test_full();
}
