/* tests/test_ipadapter.c — IP-Adapter image projections against diffusers (tokens and every
 * traced sub-layer of the three adapters), the fp16 preset on the UNet with the adapter, the real
 * h94 layouts made on the spot (ip-adapter_sd15, -plus_sd15, -full-face_sd15), and the pairing
 * errors users meet. */
#include "test.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define TINY "golden/tiny_a/"

static sd_ctx ctx_for(const char *spec, const char *prefix, sd_model_kind k) {
    sd_precision p;
    sd_ctx c;
    memset(&c, 0, sizeof c);
    sd_precision_parse(spec, &p);
    c.pol = p.model[k];
    c.prefix = prefix;
    return c;
}

static int load_npy_tensor(const char *rel, sd_tensor *t) {
    float *d;
    int nd;
    int64_t s[8];
    size_t n;
    if (npy_read_f32(shared_path(rel), &d, &nd, s, &n)) {
        CHECK(0, "read %s: %s", rel, sd_last_error());
        sd_clear_error();
        return -1;
    }
    *t = tensor_new(nd > 4 ? 4 : nd, nd > 0 ? (int)s[0] : 1, nd > 1 ? (int)s[1] : 1, nd > 2 ? (int)s[2] : 1, nd > 3 ? (int)s[3] : 1);
    memcpy(t->data, d, n * sizeof(float));
    free(d);
    return 0;
}

/* Tokens of each adapter against diffusers, and its traced sub-layers against trace_ip_variants. */
static void test_tokens(void) {
    struct { const char *file, *input, *tokens, *prefix, *kind; } cases[] = {
        { TINY "ip_adapter.safetensors", TINY "unet_ip_in_image_embeds.npy", TINY "unet_ip_tokens.npy", "unet_ip", "base" },
        { TINY "ip_adapter_plus.safetensors", TINY "vision_hidden_states_penultimate.npy", TINY "unet_ipplus_tokens.npy", "unet_ipplus", "plus" },
        { TINY "ip_adapter_full_face.safetensors", TINY "vision_hidden_states_penultimate.npy", TINY "unet_ipfull_tokens.npy", "unet_ipfull", "full-face" },
    };
    sd_safetensors golden;
    int have_trace = st_open(&golden, shared_path(TINY "trace_ip_variants.safetensors")) == 0;
    CHECK(have_trace, "open trace_ip_variants.safetensors");
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        sd_ctx c = ctx_for("fp32", cases[i].prefix, SD_IPADAPTER);
        sd_ipadapter *a = ipadapter_load(shared_path(cases[i].file), NULL, &c.pol);
        CHECK(a != NULL, "load %s: %s", cases[i].file, sd_last_error());
        if (!a) { sd_clear_error(); continue; }
        CHECK(strcmp(ipadapter_kind(a), cases[i].kind) == 0, "%s is recognised as %s (%s)", cases[i].file, cases[i].kind, ipadapter_kind(a));
        sd_tensor x, want;
        if (load_npy_tensor(cases[i].input, &x) || load_npy_tensor(cases[i].tokens, &want)) { ipadapter_free(a); continue; }
        sd_trace tr;
        memset(&tr, 0, sizeof tr);
        tr.keep_data = 1;
        c.trace = &tr;
        sd_tensor t = ipadapter_tokens(a, &c, &x);
        CHECK(t.data && tensor_numel(&t) == tensor_numel(&want), "%s tokens have diffusers' shape", cases[i].kind);
        if (t.data && tensor_numel(&t) == tensor_numel(&want)) {
            double d = max_diff(t.data, want.data, tensor_numel(&t)), m = max_abs(want.data, tensor_numel(&want));
            CHECK(d <= 1e-5 * m, "%s tokens within 1e-5 x max|golden| (%.3g)", cases[i].kind, d / m);
            if (env_flag("SDREF_VERBOSE")) fprintf(stderr, "  ip %s tokens: %.3g x max\n", cases[i].kind, d / m);
        }
        /* every traced projection layer of diffusers has a same-named one here that agrees */
        int compared = 0;
        for (int k = 0; have_trace && k < golden.n; k++) {
            const st_entry *e = &golden.entries[k];
            size_t plen = strlen(cases[i].prefix);
            if (strncmp(e->name, cases[i].prefix, plen) || strncmp(e->name + plen, ".encoder_hid_proj", 17)) continue;
            const sd_trace_entry *o = NULL;
            for (int q = 0; q < tr.n && !o; q++)
                if (!strcmp(tr.e[q].name, e->name)) o = &tr.e[q];
            CHECK(o != NULL, "sdref traces %s", e->name);
            if (!o) continue;
            size_t n = 1;
            for (int d = 0; d < e->ndim; d++) n *= (size_t)e->shape[d];
            if (o->stats.n != (int64_t)n) { CHECK(0, "%s: %lld values, golden %zu", e->name, (long long)o->stats.n, n); continue; }
            float *g = sd_malloc(n * sizeof(float));
            st_read_f32(&golden, e, g);
            double d = max_diff(o->data, g, n), m = max_abs(g, n);
            CHECK(d <= 1e-4 * m, "%s within 1e-4 x max|golden| (%.3g)", e->name, d / m);
            free(g);
            compared++;
        }
        if (!strcmp(cases[i].kind, "plus")) CHECK(compared >= 40, "plus: %d projection layers compared", compared);
        if (!strcmp(cases[i].kind, "full-face")) CHECK(compared >= 4, "full-face: %d projection layers compared", compared);
        sd_trace_free(&tr);
        tensor_free(&t);
        tensor_free(&x);
        tensor_free(&want);
        ipadapter_free(a);
    }
    if (have_trace) st_close(&golden);
}

/* The UNet with the base adapter under the fp16 preset: statistics against the oracle's fp16 run
 * (not bits: two correct fp16 implementations differ as much as fp16 differs from fp32). */
static void test_fp16_unet_ip(void) {
    sd_ctx c = ctx_for("fp16", "unet_ip", SD_UNET);
    sd_unet *u = unet_load(shared_path(TINY "unet.safetensors"), shared_path(TINY "unet_config.json"), &c.pol);
    sd_ipadapter *a = ipadapter_load(shared_path(TINY "ip_adapter.safetensors"), NULL, &c.pol);
    CHECK(u && a, "load the UNet and the adapter under fp16");
    sd_tensor x, ctx, emb, t;
    if (!u || !a || load_npy_tensor(TINY "unet_in_sample.npy", &x) || load_npy_tensor(TINY "unet_in_encoder_hidden_states.npy", &ctx) ||
        load_npy_tensor(TINY "unet_ip_in_image_embeds.npy", &emb) || load_npy_tensor(TINY "unet_in_timestep.npy", &t)) {
        unet_free(u);
        ipadapter_free(a);
        return;
    }
    sd_tensor tok = ipadapter_tokens(a, &c, &emb);
    sd_unet_ip ip = { a, &tok, 1.0f };
    sd_tensor y = unet_forward(u, &c, &x, t.data, &ctx, &ip);
    check_fp16_stats("UNet+IP fp16", y.data, tensor_numel(&y), TINY "unet_ip_out.npy", TINY "unet_ip_out_fp16ops.npy");
    tensor_free(&y); tensor_free(&tok); tensor_free(&x); tensor_free(&ctx); tensor_free(&emb); tensor_free(&t);
    unet_free(u);
    ipadapter_free(a);
}

/* The real h94 layouts (F16, random values), made here from shared/spec: each loads, has its 16
 * cross-attention layers numbered 1..31 with SD1.5's widths, and makes tokens of the right shape. */
static void test_real_layouts(void) {
    struct { const char *tsv, *kind; int in_tokens, in_width, out_tokens; } cases[] = {
        { "spec/ip_adapter_sd15.tsv", "base", 0, 1024, 4 },
        { "spec/ip_adapter_plus_sd15.tsv", "plus", 257, 1280, 16 },
        { "spec/ip_adapter_full_face_sd15.tsv", "full-face", 257, 1280, 257 },
    };
    /* SD1.5's attn2 inner widths by processor index 1, 3, ..., 31 (down, up, then mid) */
    static const int widths[16] = { 320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280 };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char path[1100];
        snprintf(path, sizeof path, "%s", tmp_path(cases[i].kind));
        int n = write_spec_file(cases[i].tsv, "", path);
        CHECK(n > 0, "write the %s layout (%d tensors)", cases[i].kind, n);
        sd_ctx c = ctx_for("fp16", "ipadapter", SD_IPADAPTER);
        sd_ipadapter *a = ipadapter_load(path, NULL, &c.pol);
        CHECK(a != NULL, "the real %s layout loads: %s", cases[i].kind, sd_last_error());
        if (!a) { sd_clear_error(); continue; }
        CHECK(!strcmp(ipadapter_kind(a), cases[i].kind) && ipadapter_token_dim(a) == 768 && ipadapter_input_dim(a) == cases[i].in_width &&
              ipadapter_num_layers(a) == 16, "%s: kind %s, tokens of width %d from input width %d, %d layers", cases[i].kind,
              ipadapter_kind(a), ipadapter_token_dim(a), ipadapter_input_dim(a), ipadapter_num_layers(a));
        int ok = 1;
        for (int k = 0; k < 16; k++) {
            const sd_param *kw, *vw;
            ok &= ipadapter_layer(a, 2 * k + 1, &kw, &vw) == 0 && kw->shape[0] == widths[k] && kw->shape[1] == 768 &&
                  vw->shape[0] == widths[k] && ipadapter_layer(a, 2 * k, &kw, &vw) != 0;
        }
        CHECK(ok, "%s: ip_adapter.1..31 (odd) with SD1.5's attn2 widths, no even ones", cases[i].kind);
        sd_tensor x = cases[i].in_tokens ? tensor_new(3, 1, cases[i].in_tokens, cases[i].in_width, 1) : tensor_new(2, 1, cases[i].in_width, 1, 1);
        for (size_t k = 0; k < tensor_numel(&x); k++) x.data[k] = (float)((k * 2654435761u) % 2001) / 1000.0f - 1.0f;
        sd_tensor t = ipadapter_tokens(a, &c, &x);
        CHECK(t.data && t.ndim == 3 && t.shape[0] == 1 && t.shape[1] == cases[i].out_tokens && t.shape[2] == 768,
              "%s makes [1, %d, 768] tokens", cases[i].kind, cases[i].out_tokens);
        int finite = t.data != NULL;
        for (size_t k = 0; t.data && k < tensor_numel(&t); k++) finite &= t.data[k] - t.data[k] == 0;
        CHECK(finite, "%s tokens are finite", cases[i].kind);
        tensor_free(&t);
        /* the pairing error: this adapter fed the other encoder's width */
        sd_tensor wrong = cases[i].in_tokens ? tensor_new(3, 1, 257, 1024, 1) : tensor_new(2, 1, 1280, 1, 1);
        sd_clear_error();
        t = ipadapter_tokens(a, &c, &wrong);
        CHECK(t.data == NULL && strstr(sd_last_error(), "encoder") != NULL, "%s refuses the wrong encoder's output, saying which: %s",
              cases[i].kind, sd_last_error());
        sd_clear_error();
        tensor_free(&wrong);
        tensor_free(&x);
        ipadapter_free(a);
        remove(path);
    }
    /* not an adapter at all */
    sd_ctx c = ctx_for("fp32", "ipadapter", SD_IPADAPTER);
    sd_clear_error();
    sd_ipadapter *a = ipadapter_load(shared_path(TINY "vae.safetensors"), NULL, &c.pol);
    CHECK(a == NULL && strstr(sd_last_error(), "not an IP-Adapter") != NULL, "a VAE file is refused as an adapter: %s", sd_last_error());
    sd_clear_error();
}

void test_ipadapter(void) {
    if (!have_shared()) { CHECK(0, "golden data not found"); return; }
    test_tokens();
    test_fp16_unet_ip();
    test_real_layouts();
}
