/* ipadapter.c — IP-Adapter: the image projections that turn a CLIP image embedding (or the
 * vision encoder's penultimate hidden states) into image-prompt tokens, and the to_k_ip /
 * to_v_ip weights the UNet's cross-attention layers use for them.
 *
 * Three layouts of the h94 files (image_proj.* + ip_adapter.N.*):
 *   base       ip-adapter_sd15:            tokens = LayerNorm(reshape(Linear(embeds), [T, D]))
 *   plus       ip-adapter-plus(-face)_sd15: the Resampler (perceiver attention over hidden states)
 *   full-face  ip-adapter-full-face_sd15:  tokens = LayerNorm(Linear(gelu(Linear(hidden))))
 * Trace names follow diffusers' encoder_hid_proj.image_projection_layers.0.* */
#include "sdref.h"
#include <stdlib.h>
#include <string.h>

typedef enum ip_kind { IP_BASE, IP_PLUS, IP_FULL } ip_kind;

/* One Resampler layer: PerceiverAttention (ln0 on the image features, ln1 on the latents,
 * q from the latents, k|v from both) and a feed-forward, each with a residual. */
typedef struct resampler_layer {
    sd_param ln0_w, ln0_b, ln1_w, ln1_b, to_q, to_k, to_v, to_out;
    sd_param ff_ln_w, ff_ln_b, ff_up, ff_down;
} resampler_layer;

struct sd_ipadapter {
    ip_kind kind;
    int input_dim;      /* image_embeds width (base) or hidden-state width (plus, full-face) */
    int token_dim;      /* output token width = the UNet's cross_attention_dim */
    int num_tokens;     /* base: tokens per image; plus: queries; full-face: one per input token */
    /* base */
    sd_param proj_w, proj_b, norm_w, norm_b;
    /* full-face: proj.0 (Linear), proj.2 (Linear), proj.3 (LayerNorm) */
    sd_param ff0_w, ff0_b, ff2_w, ff2_b;
    /* plus */
    sd_param latents, proj_in_w, proj_in_b, proj_out_w, proj_out_b, norm_out_w, norm_out_b;
    resampler_layer *layers;
    int depth, heads, dim;
    /* per attention processor index n: to_k_ip / to_v_ip (NULL data = absent) */
    sd_param *k_ip, *v_ip;
    int n_slots, n_layers;
};

static void free_layer(resampler_layer *r) {
    sd_param *p[] = { &r->ln0_w, &r->ln0_b, &r->ln1_w, &r->ln1_b, &r->to_q, &r->to_k, &r->to_v, &r->to_out,
                      &r->ff_ln_w, &r->ff_ln_b, &r->ff_up, &r->ff_down };
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) param_free(p[i]);
}

void ipadapter_free(sd_ipadapter *a) {
    if (!a) return;
    sd_param *p[] = { &a->proj_w, &a->proj_b, &a->norm_w, &a->norm_b, &a->ff0_w, &a->ff0_b, &a->ff2_w, &a->ff2_b,
                      &a->latents, &a->proj_in_w, &a->proj_in_b, &a->proj_out_w, &a->proj_out_b, &a->norm_out_w,
                      &a->norm_out_b };
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) param_free(p[i]);
    for (int i = 0; i < a->depth; i++) free_layer(&a->layers[i]);
    free(a->layers);
    for (int i = 0; i < a->n_slots; i++) {
        param_free(&a->k_ip[i]);
        param_free(&a->v_ip[i]);
    }
    free(a->k_ip);
    free(a->v_ip);
    free(a);
}

/* Shape of a tensor as ints (ndim returned; -1 when absent). */
static int shape_of(const sd_loader *l, const char *name, int *s) {
    int64_t s64[8];
    int nd = loader_shape(l, name, s64);
    for (int i = 0; i < nd && i < 4; i++) s[i] = (int)s64[i];
    return nd;
}

/* Rows [r0, r0+rows) of a 2-D parameter as a parameter of its own (to_kv -> to_k, to_v). */
static void param_rows(const sd_param *p, int r0, int rows, sd_param *out) {
    size_t esz = p->fmt == SD_F32 ? 4 : (p->fmt == SD_E4M3 || p->fmt == SD_E5M2) ? 1 : 2;
    size_t row = (size_t)p->shape[1] * esz;
    *out = *p;
    out->shape[0] = rows;
    out->data = sd_malloc((size_t)rows * row);
    memcpy(out->data, (const uint8_t *)p->data + (size_t)r0 * row, (size_t)rows * row);
}

static int load_resampler(sd_loader *l, sd_ipadapter *a) {
    int s[4], nd;
    if ((nd = shape_of(l, "image_proj.latents", s)) != 3 || s[0] != 1) {
        sd_error("%s: image_proj.latents must be [1, queries, width]", l->path);
        return -1;
    }
    a->num_tokens = s[1];
    a->dim = s[2];
    if (shape_of(l, "image_proj.proj_in.weight", s) != 2) {
        sd_error("%s: missing tensor 'image_proj.proj_in.weight'", l->path);
        return -1;
    }
    a->input_dim = s[1];
    if (s[0] != a->dim) {
        sd_error("%s: image_proj.proj_in.weight is [%d,%d], expected [%d, *]", l->path, s[0], s[1], a->dim);
        return -1;
    }
    if (shape_of(l, "image_proj.proj_out.weight", s) != 2) {
        sd_error("%s: missing tensor 'image_proj.proj_out.weight'", l->path);
        return -1;
    }
    a->token_dim = s[0];
    int ls[3] = { 1, a->num_tokens, a->dim };
    if (loader_param(l, &a->latents, "image_proj.latents", 3, ls)) return -1;
    if (load_linear(l, &a->proj_in_w, &a->proj_in_b, "image_proj.proj_in", a->dim, a->input_dim, 1)) return -1;
    if (load_linear(l, &a->proj_out_w, &a->proj_out_b, "image_proj.proj_out", a->token_dim, a->dim, 1)) return -1;
    if (load_norm(l, &a->norm_out_w, &a->norm_out_b, "image_proj.norm_out", a->token_dim)) return -1;
    /* depth counted from the keys; heads = to_q rows / 64 (diffusers fixes dim_head at 64) */
    char name[128];
    for (a->depth = 0;; a->depth++) {
        snprintf(name, sizeof name, "image_proj.layers.%d.0.to_q.weight", a->depth);
        if (!loader_has(l, name)) break;
    }
    if (a->depth == 0) {
        sd_error("%s: the Resampler has no layers (image_proj.layers.0.*)", l->path);
        return -1;
    }
    a->layers = sd_calloc((size_t)a->depth, sizeof *a->layers);
    for (int i = 0; i < a->depth; i++) {
        resampler_layer *r = &a->layers[i];
        char p[96];
        snprintf(name, sizeof name, "image_proj.layers.%d.0.to_q.weight", i);
        if (shape_of(l, name, s) != 2 || s[0] % 64) {
            sd_error("%s: %s must be [heads*64, %d]", l->path, name, a->dim);
            return -1;
        }
        int inner = s[0];
        if (i == 0) a->heads = inner / 64;
        else if (inner != a->heads * 64) {
            sd_error("%s: %s has %d rows, layer 0 has %d", l->path, name, inner, a->heads * 64);
            return -1;
        }
        sd_param kv, unused;
        snprintf(p, sizeof p, "image_proj.layers.%d.0.norm1", i);
        if (load_norm(l, &r->ln0_w, &r->ln0_b, p, a->dim)) return -1;
        snprintf(p, sizeof p, "image_proj.layers.%d.0.norm2", i);
        if (load_norm(l, &r->ln1_w, &r->ln1_b, p, a->dim)) return -1;
        snprintf(p, sizeof p, "image_proj.layers.%d.0.to_q", i);
        if (load_linear(l, &r->to_q, &unused, p, inner, a->dim, 0)) return -1;
        snprintf(p, sizeof p, "image_proj.layers.%d.0.to_kv", i);
        if (load_linear(l, &kv, &unused, p, 2 * inner, a->dim, 0)) return -1;
        param_rows(&kv, 0, inner, &r->to_k);         /* first half of to_kv: keys */
        param_rows(&kv, inner, inner, &r->to_v);     /* second half: values */
        param_free(&kv);
        snprintf(p, sizeof p, "image_proj.layers.%d.0.to_out", i);
        if (load_linear(l, &r->to_out, &unused, p, a->dim, inner, 0)) return -1;
        snprintf(p, sizeof p, "image_proj.layers.%d.1.0", i);
        if (load_norm(l, &r->ff_ln_w, &r->ff_ln_b, p, a->dim)) return -1;
        snprintf(name, sizeof name, "image_proj.layers.%d.1.1.weight", i);
        if (shape_of(l, name, s) != 2) {
            sd_error("%s: missing tensor '%s'", l->path, name);
            return -1;
        }
        int hidden = s[0];
        snprintf(p, sizeof p, "image_proj.layers.%d.1.1", i);
        if (load_linear(l, &r->ff_up, &unused, p, hidden, a->dim, 0)) return -1;
        snprintf(p, sizeof p, "image_proj.layers.%d.1.3", i);
        if (load_linear(l, &r->ff_down, &unused, p, a->dim, hidden, 0)) return -1;
    }
    return 0;
}

static int load_projection(sd_loader *l, sd_ipadapter *a) {
    int s[4];
    if (loader_has(l, "image_proj.latents")) {
        a->kind = IP_PLUS;
        return load_resampler(l, a);
    }
    if (loader_has(l, "image_proj.proj.0.weight") && loader_has(l, "image_proj.proj.3.weight")) {
        a->kind = IP_FULL;                                   /* Linear(0), GELU(1), Linear(2), LayerNorm(3) */
        shape_of(l, "image_proj.proj.0.weight", s);
        int hidden = s[0];
        a->input_dim = s[1];
        if (shape_of(l, "image_proj.proj.2.weight", s) != 2) {
            sd_error("%s: missing tensor 'image_proj.proj.2.weight'", l->path);
            return -1;
        }
        a->token_dim = s[0];
        a->num_tokens = 0;                                   /* one per input token */
        if (load_linear(l, &a->ff0_w, &a->ff0_b, "image_proj.proj.0", hidden, a->input_dim, 1)) return -1;
        if (load_linear(l, &a->ff2_w, &a->ff2_b, "image_proj.proj.2", a->token_dim, hidden, 1)) return -1;
        return load_norm(l, &a->norm_w, &a->norm_b, "image_proj.proj.3", a->token_dim);
    }
    if (loader_has(l, "image_proj.proj.weight") && loader_has(l, "image_proj.norm.weight")) {
        a->kind = IP_BASE;
        int ns[4];
        shape_of(l, "image_proj.proj.weight", s);
        shape_of(l, "image_proj.norm.weight", ns);
        a->input_dim = s[1];
        a->token_dim = ns[0];
        if (a->token_dim <= 0 || s[0] % a->token_dim) {
            sd_error("%s: image_proj.proj.weight rows (%d) are not a multiple of the token width %d", l->path, s[0], a->token_dim);
            return -1;
        }
        a->num_tokens = s[0] / a->token_dim;
        if (load_linear(l, &a->proj_w, &a->proj_b, "image_proj.proj", s[0], a->input_dim, 1)) return -1;
        return load_norm(l, &a->norm_w, &a->norm_b, "image_proj.norm", a->token_dim);
    }
    sd_error("%s: not an IP-Adapter file of a known layout (expected image_proj.proj.* (ip-adapter_sd15), "
             "image_proj.latents (ip-adapter-plus) or image_proj.proj.0/3.* (ip-adapter-full-face))", l->path);
    return -1;
}

/* ip_adapter.N.to_k_ip.weight / to_v_ip.weight: [inner width of that layer, token_dim]. */
static int load_ip_layers(sd_loader *l, sd_ipadapter *a) {
    int max_n = -1;
    for (int i = 0; i < l->n; i++) {
        const char *k = l->names[i];
        int n;
        char rest[64];
        if (k && sscanf(k, "ip_adapter.%d.%63s", &n, rest) == 2 && n >= 0 && n < 4096 && n > max_n) max_n = n;
    }
    if (max_n < 0) {
        sd_error("%s: no ip_adapter.N.to_k_ip / to_v_ip weights", l->path);
        return -1;
    }
    a->n_slots = max_n + 1;
    a->k_ip = sd_calloc((size_t)a->n_slots, sizeof(sd_param));
    a->v_ip = sd_calloc((size_t)a->n_slots, sizeof(sd_param));
    for (int n = 0; n < a->n_slots; n++) {
        char kn[96], vn[96];
        int s[4];
        snprintf(kn, sizeof kn, "ip_adapter.%d.to_k_ip.weight", n);
        snprintf(vn, sizeof vn, "ip_adapter.%d.to_v_ip.weight", n);
        if (!loader_has(l, kn) && !loader_has(l, vn)) continue;
        if (shape_of(l, kn, s) != 2) {
            sd_error("%s: '%s' is missing or not a matrix", l->path, kn);
            return -1;
        }
        int shp[2] = { s[0], a->token_dim };
        if (loader_param(l, &a->k_ip[n], kn, 2, shp) || loader_param(l, &a->v_ip[n], vn, 2, shp)) return -1;
        a->n_layers++;
    }
    return 0;
}

sd_ipadapter *ipadapter_load(const char *path, const char *config_path, const sd_policy *pol) {
    (void)config_path;   /* the real files have no config: every size comes from the shapes */
    sd_loader l;
    if (loader_open(&l, path, NULL, NULL, pol)) return NULL;
    sd_ipadapter *a = sd_calloc(1, sizeof *a);
    if (load_projection(&l, a) || load_ip_layers(&l, a)) {
        loader_close(&l);
        ipadapter_free(a);
        return NULL;
    }
    loader_close(&l);
    return a;
}

int ipadapter_layer(const sd_ipadapter *a, int n, const sd_param **k_w, const sd_param **v_w) {
    if (n < 0 || n >= a->n_slots || !a->k_ip[n].data) return -1;
    *k_w = &a->k_ip[n];
    *v_w = &a->v_ip[n];
    return 0;
}

int ipadapter_num_layers(const sd_ipadapter *a) { return a->n_layers; }
int ipadapter_token_dim(const sd_ipadapter *a) { return a->token_dim; }
int ipadapter_input_dim(const sd_ipadapter *a) { return a->input_dim; }
int ipadapter_wants_hidden_states(const sd_ipadapter *a) { return a->kind != IP_BASE; }
const char *ipadapter_kind(const sd_ipadapter *a) { return a->kind == IP_BASE ? "base" : a->kind == IP_PLUS ? "plus" : "full-face"; }

/* ---- forward ----------------------------------------------------------------------- */

#define PROJ "encoder_hid_proj.image_projection_layers.0"

static void replace(sd_tensor *x, sd_tensor y) {
    tensor_free(x);
    *x = y;
}

/* Concatenate token sequences [N,Ta,C] and [N,Tb,C] -> [N,Ta+Tb,C]. */
static sd_tensor concat_tokens(const sd_tensor *a, const sd_tensor *b) {
    int N = a->shape[0], Ta = a->shape[1], Tb = b->shape[1], C = a->shape[2];
    sd_tensor y = tensor_new(3, N, Ta + Tb, C, 1);
    for (int n = 0; n < N; n++) {
        memcpy(y.data + (size_t)n * (Ta + Tb) * C, a->data + (size_t)n * Ta * C, (size_t)Ta * C * sizeof(float));
        memcpy(y.data + ((size_t)n * (Ta + Tb) + Ta) * C, b->data + (size_t)n * Tb * C, (size_t)Tb * C * sizeof(float));
    }
    return y;
}

/* base: LayerNorm(reshape(proj(embeds), [N, T, D])) */
static sd_tensor tokens_base(const sd_ipadapter *a, const sd_ctx *c, const sd_tensor *embeds) {
    int N = embeds->shape[0];
    sd_tensor x = tensor_copy(embeds);
    x.ndim = 2;
    x.shape[1] = (int)(tensor_numel(embeds) / (size_t)N);
    x.shape[2] = x.shape[3] = 1;
    sd_tensor p = op_linear(c, &x, &a->proj_w, &a->proj_b);
    tensor_free(&x);
    p.ndim = 3;
    p.shape[1] = a->num_tokens;
    p.shape[2] = a->token_dim;
    sd_trace_tensor(c, PROJ ".image_embeds", &p);
    sd_tensor t = op_layer_norm(c, &p, 1e-5f, &a->norm_w, &a->norm_b);
    tensor_free(&p);
    sd_trace_tensor(c, PROJ ".norm", &t);
    sd_trace_tensor(c, "encoder_hid_proj", &t);
    return t;
}

/* full-face: LayerNorm(Linear(gelu(Linear(hidden)))) per token */
static sd_tensor tokens_full(const sd_ipadapter *a, const sd_ctx *c, const sd_tensor *hidden) {
    sd_tensor h = op_linear(c, hidden, &a->ff0_w, &a->ff0_b);
    sd_trace_tensor(c, PROJ ".ff.net.0.proj", &h);
    replace(&h, op_gelu(c, &h));
    sd_trace_tensor(c, PROJ ".ff.net.0", &h);
    replace(&h, op_linear(c, &h, &a->ff2_w, &a->ff2_b));
    sd_trace_tensor(c, PROJ ".ff.net.2", &h);
    replace(&h, op_layer_norm(c, &h, 1e-5f, &a->norm_w, &a->norm_b));
    sd_trace_tensor(c, PROJ ".norm", &h);
    sd_trace_tensor(c, "encoder_hid_proj", &h);
    return h;
}

/* plus: the Resampler (diffusers IPAdapterPlusImageProjection.forward) */
static sd_tensor tokens_plus(const sd_ipadapter *a, const sd_ctx *c, const sd_tensor *hidden) {
    int N = hidden->shape[0], Q = a->num_tokens;
    char name[160];
    sd_tensor lat = tensor_new(3, N, Q, a->dim, 1);          /* learned latents, repeated per image */
    for (int n = 0; n < N; n++) param_read(&a->latents, 0, (size_t)Q * a->dim, lat.data + (size_t)n * Q * a->dim);
    sd_tensor x = op_linear(c, hidden, &a->proj_in_w, &a->proj_in_b);
    sd_trace_tensor(c, PROJ ".proj_in", &x);
    for (int i = 0; i < a->depth; i++) {
        const resampler_layer *r = &a->layers[i];
        /* attention: q from ln1(latents); k, v from cat[ln0(x), ln1(latents)]; + latents */
        sd_tensor fx = op_layer_norm(c, &x, 1e-5f, &r->ln0_w, &r->ln0_b);
        snprintf(name, sizeof name, PROJ ".layers.%d.ln0", i);
        sd_trace_tensor(c, name, &fx);
        sd_tensor fl = op_layer_norm(c, &lat, 1e-5f, &r->ln1_w, &r->ln1_b);
        snprintf(name, sizeof name, PROJ ".layers.%d.ln1", i);
        sd_trace_tensor(c, name, &fl);
        sd_tensor kv_in = concat_tokens(&fx, &fl);
        tensor_free(&fx);
        sd_tensor q = op_linear(c, &fl, &r->to_q, NULL);
        tensor_free(&fl);
        snprintf(name, sizeof name, PROJ ".layers.%d.attn.to_q", i);
        sd_trace_tensor(c, name, &q);
        sd_tensor k = op_linear(c, &kv_in, &r->to_k, NULL);
        snprintf(name, sizeof name, PROJ ".layers.%d.attn.to_k", i);
        sd_trace_tensor(c, name, &k);
        sd_tensor v = op_linear(c, &kv_in, &r->to_v, NULL);
        snprintf(name, sizeof name, PROJ ".layers.%d.attn.to_v", i);
        sd_trace_tensor(c, name, &v);
        tensor_free(&kv_in);
        sd_tensor o = op_attention(c, &q, &k, &v, a->heads, 0.125f, 0);   /* 1/sqrt(64) */
        tensor_free(&q);
        tensor_free(&k);
        tensor_free(&v);
        replace(&o, op_linear(c, &o, &r->to_out, NULL));
        snprintf(name, sizeof name, PROJ ".layers.%d.attn.to_out.0", i);
        sd_trace_tensor(c, name, &o);
        replace(&lat, op_add(c, &o, &lat));
        tensor_free(&o);
        /* feed-forward: LayerNorm, Linear, GELU, Linear; + latents */
        sd_tensor f = op_layer_norm(c, &lat, 1e-5f, &r->ff_ln_w, &r->ff_ln_b);
        snprintf(name, sizeof name, PROJ ".layers.%d.ff.0", i);
        sd_trace_tensor(c, name, &f);
        replace(&f, op_linear(c, &f, &r->ff_up, NULL));
        snprintf(name, sizeof name, PROJ ".layers.%d.ff.1.net.0.proj", i);
        sd_trace_tensor(c, name, &f);
        replace(&f, op_gelu(c, &f));
        snprintf(name, sizeof name, PROJ ".layers.%d.ff.1.net.0", i);
        sd_trace_tensor(c, name, &f);
        replace(&f, op_linear(c, &f, &r->ff_down, NULL));
        snprintf(name, sizeof name, PROJ ".layers.%d.ff.1.net.2", i);
        sd_trace_tensor(c, name, &f);
        replace(&lat, op_add(c, &f, &lat));
        tensor_free(&f);
        snprintf(name, sizeof name, PROJ ".layers.%d", i);
        sd_trace_tensor(c, name, &lat);
    }
    tensor_free(&x);
    replace(&lat, op_linear(c, &lat, &a->proj_out_w, &a->proj_out_b));
    sd_trace_tensor(c, PROJ ".proj_out", &lat);
    replace(&lat, op_layer_norm(c, &lat, 1e-5f, &a->norm_out_w, &a->norm_out_b));
    sd_trace_tensor(c, PROJ ".norm_out", &lat);
    sd_trace_tensor(c, "encoder_hid_proj", &lat);
    return lat;
}

sd_tensor ipadapter_tokens(const sd_ipadapter *a, const sd_ctx *c, const sd_tensor *input) {
    int width = input->shape[input->ndim - 1];
    if (a->kind == IP_BASE ? width != a->input_dim || input->ndim > 3
                           : input->ndim != 3 || width != a->input_dim) {
        sd_tensor none;
        memset(&none, 0, sizeof none);
        if (a->kind == IP_BASE)
            sd_error("IP-Adapter (%s) expects image embeds of width %d (the image encoder's projection_dim), got %d%s",
                     ipadapter_kind(a), a->input_dim, width,
                     a->input_dim == 1024 ? " (ip-adapter_sd15 pairs with the ViT-H/14 encoder, models/image_encoder)" :
                     a->input_dim == 1280 ? " (this adapter pairs with the ViT-bigG encoder, sdxl_models/image_encoder)" : "");
        else
            sd_error("IP-Adapter (%s) expects the image encoder's penultimate hidden states [N, tokens, %d], got width %d%s",
                     ipadapter_kind(a), a->input_dim, width,
                     a->input_dim == 1280 ? " (this adapter pairs with the ViT-H/14 encoder, hidden size 1280)" : "");
        return none;
    }
    sd_tensor x = tensor_copy(input);
    op_round_storage(c, &x);                                 /* model input in the storage format */
    sd_tensor t;
    switch (a->kind) {
    case IP_BASE: t = tokens_base(a, c, &x); break;
    case IP_FULL: t = tokens_full(a, c, &x); break;
    default: t = tokens_plus(a, c, &x); break;
    }
    tensor_free(&x);
    return t;
}
