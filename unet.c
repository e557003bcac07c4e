/* unet.c — the SD UNet: diffusers v0.30.3 UNet2DConditionModel as SD1.x and SD2.x use it.
 *
 * Reads top to bottom:
 *   1. the config (config.json; SD1.5's when a single-file checkpoint comes without one,
 *      SD2.x's changes recognised from the tensor shapes)
 *   2. file layouts: diffusers names, and the LDM/CompVis names mapped onto them
 *   3. loading: every size from the config, every tensor checked against it
 *   4. the forward pass, tracing every module's output under its diffusers name
 *   5. the `unet` command (with IP-Adapter)
 *
 * The architecture:
 *   time_proj (sinusoidal, float32) -> time_embedding (linear_1, SiLU, linear_2) = temb
 *   conv_in; down blocks: [resnet(temb), [Transformer2DModel]] x layers, stride-2 conv except
 *   the last; every output kept as a skip; mid block: resnet, transformer, resnet; up blocks:
 *   [cat([h, skip]), resnet(temb), [transformer]] x (layers+1), nearest 2x + conv except the
 *   last; conv_norm_out, SiLU, conv_out.
 *   Transformer2DModel: GroupNorm (eps 1e-6), proj_in (1x1 conv or linear), blocks of
 *   [LayerNorm, self-attention, +], [LayerNorm, cross-attention (+ IP-Adapter), +],
 *   [LayerNorm, GEGLU feed-forward, +], proj_out, + input.
 * Operations and their rounding come from ref.c; resnets and attention are ref.c's blocks. */
#include "sdref.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define UNET_MAX_LEVELS 8
#define UNET_MAX_SKIPS 128

/* ======================================================================================
 * 1. Config
 * ====================================================================================== */

typedef struct unet_config {
    int in_ch, out_ch, levels;
    int ch[UNET_MAX_LEVELS];         /* block_out_channels */
    int layers[UNET_MAX_LEVELS];     /* layers_per_block (down blocks; up blocks have one more) */
    int down_attn[UNET_MAX_LEVELS];  /* down block i is CrossAttnDownBlock2D */
    int up_attn[UNET_MAX_LEVELS];    /* up block i (up order) is CrossAttnUpBlock2D */
    int heads[UNET_MAX_LEVELS];      /* num_attention_heads or attention_head_dim, per level */
    int tlayers[UNET_MAX_LEVELS];    /* transformer_layers_per_block, per level */
    int cross[UNET_MAX_LEVELS];      /* cross_attention_dim, per level */
    int groups; float eps;           /* resnet and transformer GroupNorm groups; resnet eps */
    int linear_proj, upcast;         /* use_linear_projection, upcast_attention */
    int flip_sin_to_cos; float freq_shift;
    int conv_in_k, conv_out_k, down_pad, temb_dim;
} unet_config;

/* SD1.5's UNet (shared/spec/sd15_unet_config.json): what an LDM checkpoint without a config is. */
static void config_sd15(unet_config *c) {
    static const int ch[4] = { 320, 640, 1280, 1280 };
    memset(c, 0, sizeof *c);
    c->in_ch = 4; c->out_ch = 4; c->levels = 4;
    for (int i = 0; i < 4; i++) {
        c->ch[i] = ch[i];
        c->layers[i] = 2;
        c->down_attn[i] = i < 3;          /* CrossAttnDown x3, DownBlock2D */
        c->up_attn[i] = i > 0;            /* UpBlock2D, CrossAttnUp x3 */
        c->heads[i] = 8;
        c->tlayers[i] = 1;
        c->cross[i] = 768;
    }
    c->groups = 32; c->eps = 1e-5f;
    c->flip_sin_to_cos = 1; c->freq_shift = 0;
    c->conv_in_k = 3; c->conv_out_k = 3; c->down_pad = 1;
    c->temb_dim = 4 * ch[0];
}

/* An int, or a list of `n` ints, into out[n] ("key": 8 or "key": [5, 10, 20, 20]). */
static int cfg_per_level(const sd_json *j, const char *key, int n, int *out, const char *path) {
    const sd_json *v = json_get(j, key);
    if (!v || v->type == JSON_NULL) return 1;                /* absent: caller's default */
    if (v->type == JSON_NUMBER) {
        if (v->num < 1 || v->num > 1e6 || v->num != (int)v->num) goto bad;
        for (int i = 0; i < n; i++) out[i] = (int)v->num;
        return 0;
    }
    if (v->type != JSON_ARRAY || v->n != n) goto bad;
    for (int i = 0; i < n; i++) {
        const sd_json *e = &v->items[i];
        if (e->type != JSON_NUMBER || e->num < 1 || e->num > 1e6 || e->num != (int)e->num) goto bad;
        out[i] = (int)e->num;
    }
    return 0;
bad:
    sd_error("%s: '%s' must be a positive integer or a list of %d of them", path, key, n);
    return -1;
}

/* A key that must be absent or null (features of other UNets sdref does not implement). */
static int cfg_unsupported(const sd_json *j, const char *key, const char *what, const char *path) {
    const sd_json *v = json_get(j, key);
    if (!v || v->type == JSON_NULL) return 0;
    if (v->type == JSON_BOOL && !v->boolean) return 0;
    sd_error("%s: '%s' is set: %s is not supported (SD1.x/SD2.x UNets only)", path, key, what);
    return -1;
}

static int cfg_block_types(const sd_json *j, const char *key, int n, const char *plain, const char *cross,
                           int *out, const char *path) {
    const sd_json *a = json_get(j, key);
    if (!a || a->type != JSON_ARRAY || a->n != n) {
        sd_error("%s: '%s' must be a list of %d block types", path, key, n);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        const sd_json *e = &a->items[i];
        if (e->type == JSON_STRING && !strcmp(e->str, plain)) out[i] = 0;
        else if (e->type == JSON_STRING && !strcmp(e->str, cross)) out[i] = 1;
        else {
            sd_error("%s: %s[%d] is %s; only %s and %s are supported", path, key, i,
                     e->type == JSON_STRING ? e->str : "not a string", plain, cross);
            return -1;
        }
    }
    return 0;
}

static int config_read(const char *path, unet_config *c) {
    sd_json j;
    if (json_parse_file(path, &j) != 0) return -1;
    int rc = -1;
    memset(c, 0, sizeof *c);
    if (j.type != JSON_OBJECT) { sd_error("%s: not a JSON object", path); goto done; }
    const sd_json *boc = json_get(&j, "block_out_channels");
    if (!boc || boc->type != JSON_ARRAY || boc->n < 1 || boc->n > UNET_MAX_LEVELS) {
        sd_error("%s: block_out_channels must be a list of 1 to %d numbers", path, UNET_MAX_LEVELS);
        goto done;
    }
    int L = c->levels = boc->n;
    for (int i = 0; i < L; i++) {
        const sd_json *v = &boc->items[i];
        if (v->type != JSON_NUMBER || v->num < 1 || v->num > 65536 || v->num != (int)v->num) {
            sd_error("%s: block_out_channels[%d] is not a channel count", path, i);
            goto done;
        }
        c->ch[i] = (int)v->num;
    }
    if (cfg_block_types(&j, "down_block_types", L, "DownBlock2D", "CrossAttnDownBlock2D", c->down_attn, path) ||
        cfg_block_types(&j, "up_block_types", L, "UpBlock2D", "CrossAttnUpBlock2D", c->up_attn, path))
        goto done;
    const char *mid = json_str(&j, "mid_block_type", "UNetMidBlock2DCrossAttn");
    if (strcmp(mid, "UNetMidBlock2DCrossAttn") != 0) {
        sd_error("%s: mid_block_type %s is not supported (UNetMidBlock2DCrossAttn only)", path, mid);
        goto done;
    }
    if (cfg_unsupported(&j, "addition_embed_type", "an added (SDXL text_time) embedding", path) ||
        cfg_unsupported(&j, "class_embed_type", "a class embedding", path) ||
        cfg_unsupported(&j, "num_class_embeds", "a class embedding", path) ||
        cfg_unsupported(&j, "time_cond_proj_dim", "a timestep condition (LCM)", path) ||
        cfg_unsupported(&j, "timestep_post_act", "a post-activation of the time embedding", path) ||
        cfg_unsupported(&j, "time_embedding_act_fn", "a time embedding activation", path) ||
        cfg_unsupported(&j, "encoder_hid_dim", "an encoder_hid_proj of the text", path) ||
        cfg_unsupported(&j, "reverse_transformer_layers_per_block", "per-layer up-block transformer depths", path) ||
        cfg_unsupported(&j, "center_input_sample", "center_input_sample", path) ||
        cfg_unsupported(&j, "dual_cross_attention", "dual cross-attention", path) ||
        cfg_unsupported(&j, "only_cross_attention", "only_cross_attention", path) ||
        cfg_unsupported(&j, "mid_block_only_cross_attention", "mid_block_only_cross_attention", path) ||
        cfg_unsupported(&j, "cross_attention_norm", "a cross-attention norm", path))
        goto done;
    const char *hid = json_str(&j, "encoder_hid_dim_type", NULL);
    if (hid && strcmp(hid, "ip_image_proj") != 0) {         /* ip_image_proj: an attached IP-Adapter */
        sd_error("%s: encoder_hid_dim_type %s is not supported", path, hid);
        goto done;
    }
    struct { const char *key, *want; } strs[] = {
        { "act_fn", "silu" }, { "time_embedding_type", "positional" }, { "resnet_time_scale_shift", "default" },
        { "attention_type", "default" },
    };
    for (size_t i = 0; i < sizeof strs / sizeof strs[0]; i++) {
        const char *s = json_str(&j, strs[i].key, strs[i].want);
        if (strcmp(s, strs[i].want) != 0) {
            sd_error("%s: %s '%s' is not supported (only '%s')", path, strs[i].key, s, strs[i].want);
            goto done;
        }
    }
    if (json_num(&j, "mid_block_scale_factor", 1) != 1 || json_num(&j, "resnet_out_scale_factor", 1) != 1 ||
        json_bool(&j, "resnet_skip_time_act", 0)) {
        sd_error("%s: mid_block_scale_factor, resnet_out_scale_factor must be 1 and resnet_skip_time_act false", path);
        goto done;
    }
    c->in_ch = json_int(&j, "in_channels", 4);
    c->out_ch = json_int(&j, "out_channels", 4);
    c->groups = json_int(&j, "norm_num_groups", 32);
    c->eps = (float)json_num(&j, "norm_eps", 1e-5);
    c->linear_proj = json_bool(&j, "use_linear_projection", 0);
    c->upcast = json_bool(&j, "upcast_attention", 0);
    c->flip_sin_to_cos = json_bool(&j, "flip_sin_to_cos", 1);
    c->freq_shift = (float)json_num(&j, "freq_shift", 0);
    c->conv_in_k = json_int(&j, "conv_in_kernel", 3);
    c->conv_out_k = json_int(&j, "conv_out_kernel", 3);
    c->down_pad = json_int(&j, "downsample_padding", 1);
    c->temb_dim = json_int(&j, "time_embedding_dim", 4 * c->ch[0]);
    for (int i = 0; i < L; i++) { c->layers[i] = 2; c->tlayers[i] = 1; c->heads[i] = 8; c->cross[i] = 1280; }
    int r;
    if ((r = cfg_per_level(&j, "layers_per_block", L, c->layers, path)) < 0) goto done;
    if ((r = cfg_per_level(&j, "transformer_layers_per_block", L, c->tlayers, path)) < 0) goto done;
    if ((r = cfg_per_level(&j, "cross_attention_dim", L, c->cross, path)) < 0) goto done;
    /* diffusers: num_attention_heads = num_attention_heads or attention_head_dim (a head COUNT) */
    if ((r = cfg_per_level(&j, "num_attention_heads", L, c->heads, path)) < 0) goto done;
    if (r == 1 && cfg_per_level(&j, "attention_head_dim", L, c->heads, path) < 0) goto done;
    if (c->in_ch < 1 || c->out_ch < 1 || c->groups < 1 || !(c->eps > 0) || c->temb_dim < 1 ||
        c->conv_in_k < 1 || c->conv_in_k % 2 == 0 || c->conv_out_k < 1 || c->conv_out_k % 2 == 0 ||
        (c->down_pad != 0 && c->down_pad != 1)) {
        sd_error("%s: in/out_channels, norm_num_groups, norm_eps, time_embedding_dim, odd conv kernels and "
                 "downsample_padding 0 or 1 are required", path);
        goto done;
    }
    for (int i = 0; i < L; i++) {
        if (c->ch[i] % c->groups) {
            sd_error("%s: block_out_channels[%d] = %d does not split into %d groups", path, i, c->ch[i], c->groups);
            goto done;
        }
        if (c->ch[i] % c->heads[i]) {
            sd_error("%s: %d channels at level %d do not split into %d attention heads", path, c->ch[i], i, c->heads[i]);
            goto done;
        }
    }
    rc = 0;
done:
    json_free(&j);
    return rc;
}

/* ======================================================================================
 * 2. File layouts. diffusers names are used as they are; the LDM single-file layout
 * (model.diffusion_model.*) is mapped as diffusers' converter does, from the config:
 *   time_embed.{0,2} -> time_embedding.linear_{1,2}; input_blocks.0.0 -> conv_in;
 *   input_blocks.k.{0,1}: resnet / attention j of down level i (k counts 1.. over levels,
 *   each with layers[i] entries then one downsampler entry `k.0.op` except the last level);
 *   middle_block.{0,1,2} -> mid_block.resnets.0, attentions.0, resnets.1;
 *   output_blocks.k.{0,1,2}: resnet j, attention j (or the upsampler when `.1.conv`),
 *   upsampler (`.2.conv`) of up block u (layers[L-1-u]+1 entries each);
 *   out.{0,2} -> conv_norm_out, conv_out; resnet parts in_layers.{0,2}, emb_layers.1,
 *   out_layers.{0,3}, skip_connection -> norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut.
 * ====================================================================================== */

#define LDM_PREFIX "model.diffusion_model."

typedef struct ldm_map {
    int n_in, in_level[512], in_j[512];     /* input_blocks.k: level and layer (-1 = downsampler) */
    int n_out, out_level[512], out_j[512];  /* output_blocks.k: up block and layer */
} ldm_map;

static void ldm_map_build(const unet_config *c, ldm_map *m) {
    int k = 1;
    for (int i = 0; i < c->levels; i++) {
        for (int j = 0; j < c->layers[i] && k < 512; j++, k++) { m->in_level[k] = i; m->in_j[k] = j; }
        if (i < c->levels - 1 && k < 512) { m->in_level[k] = i; m->in_j[k] = -1; k++; }
    }
    m->n_in = k;
    k = 0;
    for (int u = 0; u < c->levels; u++)
        for (int j = 0; j < c->layers[c->levels - 1 - u] + 1 && k < 512; j++, k++) { m->out_level[k] = u; m->out_j[k] = j; }
    m->n_out = k;
}

/* Resnet parts: LDM ResBlock names -> diffusers ResnetBlock2D names. */
static const char *ldm_resnet_part(const char *rest, const char **tail) {
    static const struct { const char *ldm, *diff; } parts[] = {
        { "in_layers.0.", "norm1." }, { "in_layers.2.", "conv1." }, { "emb_layers.1.", "time_emb_proj." },
        { "out_layers.0.", "norm2." }, { "out_layers.3.", "conv2." }, { "skip_connection.", "conv_shortcut." },
    };
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++) {
        size_t n = strlen(parts[i].ldm);
        if (!strncmp(rest, parts[i].ldm, n)) { *tail = rest + n; return parts[i].diff; }
    }
    return NULL;
}

/* Parse "<k>.<sub>.<rest>" at s. */
static int parse_two(const char *s, int *k, int *sub, const char **rest) {
    char *end;
    long a = strtol(s, &end, 10);
    if (end == s || *end != '.' || a < 0 || a > 100000) return 0;
    s = end + 1;
    long b = strtol(s, &end, 10);
    if (end == s || *end != '.' || b < 0 || b > 100000) return 0;
    *k = (int)a; *sub = (int)b; *rest = end + 1;
    return 1;
}

static int rename_ldm(const char *key, char *out, size_t out_len, void *user) {
    const ldm_map *m = user;
    if (strncmp(key, LDM_PREFIX, strlen(LDM_PREFIX)) != 0) return 0;
    const char *s = key + strlen(LDM_PREFIX), *rest, *tail, *part;
    int k, sub, n = 0;
    if (!strncmp(s, "time_embed.0.", 13)) n = snprintf(out, out_len, "time_embedding.linear_1.%s", s + 13);
    else if (!strncmp(s, "time_embed.2.", 13)) n = snprintf(out, out_len, "time_embedding.linear_2.%s", s + 13);
    else if (!strncmp(s, "out.0.", 6)) n = snprintf(out, out_len, "conv_norm_out.%s", s + 6);
    else if (!strncmp(s, "out.2.", 6)) n = snprintf(out, out_len, "conv_out.%s", s + 6);
    else if (!strncmp(s, "input_blocks.", 13) && parse_two(s + 13, &k, &sub, &rest)) {
        if (k == 0 && sub == 0) n = snprintf(out, out_len, "conv_in.%s", rest);
        else if (k <= 0 || k >= m->n_in) return 0;
        else if (m->in_j[k] < 0 && sub == 0 && !strncmp(rest, "op.", 3))
            n = snprintf(out, out_len, "down_blocks.%d.downsamplers.0.conv.%s", m->in_level[k], rest + 3);
        else if (m->in_j[k] >= 0 && sub == 0 && (part = ldm_resnet_part(rest, &tail)))
            n = snprintf(out, out_len, "down_blocks.%d.resnets.%d.%s%s", m->in_level[k], m->in_j[k], part, tail);
        else if (m->in_j[k] >= 0 && sub == 1)
            n = snprintf(out, out_len, "down_blocks.%d.attentions.%d.%s", m->in_level[k], m->in_j[k], rest);
        else return 0;
    } else if (!strncmp(s, "middle_block.", 13)) {
        char *end;
        long b = strtol(s + 13, &end, 10);
        if (end == s + 13 || *end != '.') return 0;
        rest = end + 1;
        if ((b == 0 || b == 2) && (part = ldm_resnet_part(rest, &tail)))
            n = snprintf(out, out_len, "mid_block.resnets.%d.%s%s", b == 0 ? 0 : 1, part, tail);
        else if (b == 1) n = snprintf(out, out_len, "mid_block.attentions.0.%s", rest);
        else return 0;
    } else if (!strncmp(s, "output_blocks.", 14) && parse_two(s + 14, &k, &sub, &rest)) {
        if (k >= m->n_out) return 0;
        int u = m->out_level[k], j = m->out_j[k];
        if (sub == 0 && (part = ldm_resnet_part(rest, &tail)))
            n = snprintf(out, out_len, "up_blocks.%d.resnets.%d.%s%s", u, j, part, tail);
        else if ((sub == 1 || sub == 2) && !strncmp(rest, "conv.", 5))
            n = snprintf(out, out_len, "up_blocks.%d.upsamplers.0.%s", u, rest);
        else if (sub == 1) n = snprintf(out, out_len, "up_blocks.%d.attentions.%d.%s", u, j, rest);
        else return 0;
    } else return 0;
    return n > 0 && (size_t)n < out_len;
}

/* ======================================================================================
 * 3. Loading
 * ====================================================================================== */

/* BasicTransformerBlock */
typedef struct unet_tblock {
    sd_param norm1_w, norm1_b, norm2_w, norm2_b, norm3_w, norm3_b;
    sd_attn attn1, attn2;
    sd_param ff_in_w, ff_in_b, ff_out_w, ff_out_b;   /* ff.net.0.proj [8C,C], ff.net.2 [C,4C] */
    int ip_index;                                    /* attn2's index in diffusers' attn_processors */
} unet_tblock;

/* Transformer2DModel */
typedef struct unet_transformer {
    char name[96];
    int ch, n_blocks, cross;
    sd_param norm_w, norm_b, proj_in_w, proj_in_b, proj_out_w, proj_out_b;
    unet_tblock *blocks;
} unet_transformer;

/* One down or up block: resnets, optional transformers, optional resampling conv. */
typedef struct unet_block {
    int n;                                           /* resnets */
    sd_resnet *resnets;
    unet_transformer *attns;                         /* NULL: no attention (Down/UpBlock2D) */
    int has_resample;
    sd_param resample_w, resample_b;                 /* downsamplers.0.conv / upsamplers.0.conv */
} unet_block;

struct sd_unet {
    unet_config cfg;
    sd_param time1_w, time1_b, time2_w, time2_b, conv_in_w, conv_in_b;
    sd_param norm_out_w, norm_out_b, conv_out_w, conv_out_b;
    unet_block down[UNET_MAX_LEVELS], up[UNET_MAX_LEVELS];
    sd_resnet mid_res[2];
    unet_transformer mid_attn;
    int n_cross;                                     /* cross-attention layers (IP-Adapter slots) */
};

static int load_conv(sd_loader *l, sd_param *w, sd_param *b, const char *prefix, int cout, int cin, int k) {
    char buf[256];
    int ws[4] = { cout, cin, k, k }, bs[1] = { cout };
    snprintf(buf, sizeof buf, "%s.weight", prefix);
    if (loader_param(l, w, buf, 4, ws)) return -1;
    snprintf(buf, sizeof buf, "%s.bias", prefix);
    return loader_param(l, b, buf, 1, bs);
}

static void transformer_free(unet_transformer *t) {
    sd_param *p[] = { &t->norm_w, &t->norm_b, &t->proj_in_w, &t->proj_in_b, &t->proj_out_w, &t->proj_out_b };
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) param_free(p[i]);
    for (int k = 0; k < t->n_blocks && t->blocks; k++) {
        unet_tblock *b = &t->blocks[k];
        sd_param *q[] = { &b->norm1_w, &b->norm1_b, &b->norm2_w, &b->norm2_b, &b->norm3_w, &b->norm3_b,
                          &b->ff_in_w, &b->ff_in_b, &b->ff_out_w, &b->ff_out_b };
        for (size_t i = 0; i < sizeof q / sizeof q[0]; i++) param_free(q[i]);
        attn_free(&b->attn1);
        attn_free(&b->attn2);
    }
    free(t->blocks);
    memset(t, 0, sizeof *t);
}

/* `ip_next` counts attention layers in diffusers' attn_processors order: attn1 even, attn2 odd. */
static int transformer_load(sd_loader *l, const unet_config *c, unet_transformer *t, const char *name, int ch,
                            int heads, int n_blocks, int cross, int *ip_next) {
    char p[192], q[224];
    snprintf(t->name, sizeof t->name, "%s", name);
    t->ch = ch; t->cross = cross;
    t->blocks = sd_calloc((size_t)n_blocks, sizeof *t->blocks);
    t->n_blocks = n_blocks;
    snprintf(p, sizeof p, "%s.norm", name);
    if (load_norm(l, &t->norm_w, &t->norm_b, p, ch)) return -1;
    snprintf(p, sizeof p, "%s.proj_in", name);
    if (c->linear_proj ? load_linear(l, &t->proj_in_w, &t->proj_in_b, p, ch, ch, 1)
                       : load_conv(l, &t->proj_in_w, &t->proj_in_b, p, ch, ch, 1)) return -1;
    for (int k = 0; k < n_blocks; k++) {
        unet_tblock *b = &t->blocks[k];
        snprintf(p, sizeof p, "%s.transformer_blocks.%d", name, k);
        snprintf(q, sizeof q, "%s.norm1", p);
        if (load_norm(l, &b->norm1_w, &b->norm1_b, q, ch)) return -1;
        snprintf(q, sizeof q, "%s.attn1", p);
        if (attn_load(l, &b->attn1, q, ch, ch, heads, ch / heads, 0, 0, 0, 0)) return -1;
        snprintf(q, sizeof q, "%s.norm2", p);
        if (load_norm(l, &b->norm2_w, &b->norm2_b, q, ch)) return -1;
        snprintf(q, sizeof q, "%s.attn2", p);
        if (attn_load(l, &b->attn2, q, ch, cross, heads, ch / heads, 0, 0, 0, 0)) return -1;
        snprintf(q, sizeof q, "%s.norm3", p);
        if (load_norm(l, &b->norm3_w, &b->norm3_b, q, ch)) return -1;
        snprintf(q, sizeof q, "%s.ff.net.0.proj", p);
        if (load_linear(l, &b->ff_in_w, &b->ff_in_b, q, 8 * ch, ch, 1)) return -1;
        snprintf(q, sizeof q, "%s.ff.net.2", p);
        if (load_linear(l, &b->ff_out_w, &b->ff_out_b, q, ch, 4 * ch, 1)) return -1;
        b->ip_index = *ip_next + 1;
        *ip_next += 2;
    }
    snprintf(p, sizeof p, "%s.proj_out", name);
    return c->linear_proj ? load_linear(l, &t->proj_out_w, &t->proj_out_b, p, ch, ch, 1)
                          : load_conv(l, &t->proj_out_w, &t->proj_out_b, p, ch, ch, 1);
}

static void block_free(unet_block *b) {
    for (int j = 0; j < b->n; j++) {
        if (b->resnets) resnet_free(&b->resnets[j]);
        if (b->attns) transformer_free(&b->attns[j]);
    }
    free(b->resnets);
    free(b->attns);
    param_free(&b->resample_w);
    param_free(&b->resample_b);
    memset(b, 0, sizeof *b);
}

void unet_free(sd_unet *u) {
    if (!u) return;
    sd_param *p[] = { &u->time1_w, &u->time1_b, &u->time2_w, &u->time2_b, &u->conv_in_w, &u->conv_in_b,
                      &u->norm_out_w, &u->norm_out_b, &u->conv_out_w, &u->conv_out_b };
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) param_free(p[i]);
    for (int i = 0; i < UNET_MAX_LEVELS; i++) {
        block_free(&u->down[i]);
        block_free(&u->up[i]);
    }
    resnet_free(&u->mid_res[0]);
    resnet_free(&u->mid_res[1]);
    transformer_free(&u->mid_attn);
    free(u);
}

/* Down blocks, up blocks, then the mid block: the order of diffusers' attn_processors
 * (module registration order), which IP-Adapter's ip_adapter.N numbering follows. */
static int unet_load_weights(sd_unet *u, sd_loader *l) {
    const unet_config *c = &u->cfg;
    int L = c->levels, T = c->temb_dim, ip_next = 0;
    char p[160];
    if (load_linear(l, &u->time1_w, &u->time1_b, "time_embedding.linear_1", T, c->ch[0], 1) ||
        load_linear(l, &u->time2_w, &u->time2_b, "time_embedding.linear_2", T, T, 1) ||
        load_conv(l, &u->conv_in_w, &u->conv_in_b, "conv_in", c->ch[0], c->in_ch, c->conv_in_k))
        return -1;
    for (int i = 0; i < L; i++) {                            /* down block i: level i */
        unet_block *b = &u->down[i];
        int cin = i ? c->ch[i - 1] : c->ch[0], cout = c->ch[i];
        b->n = c->layers[i];
        b->resnets = sd_calloc((size_t)b->n, sizeof *b->resnets);
        if (c->down_attn[i]) b->attns = sd_calloc((size_t)b->n, sizeof *b->attns);
        for (int j = 0; j < b->n; j++) {
            snprintf(p, sizeof p, "down_blocks.%d.resnets.%d", i, j);
            if (resnet_load(l, &b->resnets[j], p, j ? cout : cin, cout, T, c->groups, c->eps)) return -1;
            snprintf(p, sizeof p, "down_blocks.%d.attentions.%d", i, j);
            if (b->attns && transformer_load(l, c, &b->attns[j], p, cout, c->heads[i], c->tlayers[i], c->cross[i], &ip_next))
                return -1;
        }
        if ((b->has_resample = i < L - 1)) {
            snprintf(p, sizeof p, "down_blocks.%d.downsamplers.0.conv", i);
            if (load_conv(l, &b->resample_w, &b->resample_b, p, cout, cout, 3)) return -1;
        }
    }
    for (int ui = 0; ui < L; ui++) {                         /* up block ui: level L-1-ui */
        unet_block *b = &u->up[ui];
        int lv = L - 1 - ui, cout = c->ch[lv];
        int prev = ui ? c->ch[L - ui] : c->ch[L - 1];        /* previous up block's output */
        int skip_in = c->ch[lv > 0 ? lv - 1 : 0];            /* the level's input channels */
        b->n = c->layers[lv] + 1;
        b->resnets = sd_calloc((size_t)b->n, sizeof *b->resnets);
        if (c->up_attn[ui]) b->attns = sd_calloc((size_t)b->n, sizeof *b->attns);
        for (int j = 0; j < b->n; j++) {
            int res_in = j == 0 ? prev : cout, skip = j == b->n - 1 ? skip_in : cout;
            snprintf(p, sizeof p, "up_blocks.%d.resnets.%d", ui, j);
            if (resnet_load(l, &b->resnets[j], p, res_in + skip, cout, T, c->groups, c->eps)) return -1;
            snprintf(p, sizeof p, "up_blocks.%d.attentions.%d", ui, j);
            if (b->attns && transformer_load(l, c, &b->attns[j], p, cout, c->heads[lv], c->tlayers[lv], c->cross[lv], &ip_next))
                return -1;
        }
        if ((b->has_resample = ui < L - 1)) {
            snprintf(p, sizeof p, "up_blocks.%d.upsamplers.0.conv", ui);
            if (load_conv(l, &b->resample_w, &b->resample_b, p, cout, cout, 3)) return -1;
        }
    }
    int top = c->ch[L - 1];
    if (resnet_load(l, &u->mid_res[0], "mid_block.resnets.0", top, top, T, c->groups, c->eps) ||
        transformer_load(l, c, &u->mid_attn, "mid_block.attentions.0", top, c->heads[L - 1], c->tlayers[L - 1],
                         c->cross[L - 1], &ip_next) ||
        resnet_load(l, &u->mid_res[1], "mid_block.resnets.1", top, top, T, c->groups, c->eps))
        return -1;
    u->n_cross = ip_next / 2;
    if (load_norm(l, &u->norm_out_w, &u->norm_out_b, "conv_norm_out", c->ch[0]) ||
        load_conv(l, &u->conv_out_w, &u->conv_out_b, "conv_out", c->out_ch, c->ch[0], c->conv_out_k))
        return -1;
    return 0;
}

/* An LDM file without a config is SD1.5, unless its shapes say otherwise: SD2.x has
 * cross-attention width 1024 and linear proj_in/proj_out, with heads of size 64. */
static void config_from_ldm_shapes(sd_loader *l, unet_config *c) {
    int64_t s[8];
    if (loader_shape(l, "conv_in.weight", s) == 4) c->in_ch = (int)s[1];
    if (loader_shape(l, "conv_out.weight", s) == 4) c->out_ch = (int)s[0];
    if (loader_shape(l, "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight", s) == 2)
        for (int i = 0; i < c->levels; i++) c->cross[i] = (int)s[1];
    if (loader_shape(l, "down_blocks.0.attentions.0.proj_in.weight", s) == 2) {
        c->linear_proj = 1;
        for (int i = 0; i < c->levels; i++) c->heads[i] = c->ch[i] / 64;   /* SD2.x: [5, 10, 20, 20] */
    }
}

/* 1 when the file has LDM keys, 0 when diffusers keys, -1 (with sd_error) otherwise. */
static int detect_layout(const char *path) {
    sd_safetensors st;
    if (st_open(&st, path) != 0) return -1;
    int ldm = 0, diff = 0;
    for (int i = 0; i < st.n; i++) {
        if (!strncmp(st.entries[i].name, LDM_PREFIX, strlen(LDM_PREFIX))) ldm = 1;
        if (!strcmp(st.entries[i].name, "conv_in.weight")) diff = 1;
    }
    st_close(&st);
    if (ldm) return 1;
    if (diff) return 0;
    sd_error("%s: not a UNet: neither diffusers names (conv_in.weight, ...) nor a single-file checkpoint (%s*)",
             path, LDM_PREFIX);
    return -1;
}

/* PATH: a diffusers folder (diffusion_pytorch_model[.fp16].safetensors + config.json, or a
 * pipeline folder with unet/), a diffusers file (config from --config or next to it), or an
 * LDM single-file checkpoint (SD1.5 config unless --config). */
sd_unet *unet_load(const char *path, const char *config_path, const sd_policy *pol) {
    static const char *const names[] = { "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                                         "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors" };
    char *file, *near_cfg;
    int is_dir = sd_model_paths(path, names, (int)(sizeof names / sizeof names[0]), &file, &near_cfg);
    char *cfg_file = NULL;
    sd_unet *u = sd_calloc(1, sizeof *u);
    ldm_map *map = NULL;
    sd_loader l;
    memset(&l, 0, sizeof l);
    int ldm = detect_layout(file);
    if (ldm < 0) goto fail;
    if (is_dir && ldm) { sd_error("%s: the folder's UNet file has LDM names", path); goto fail; }
    if (!config_path && !ldm) {                              /* a diffusers file: its config.json beside it */
        if (!near_cfg) {
            sd_error("%s: a diffusers UNet file needs its config.json (pass --config)", path);
            goto fail;
        }
        cfg_file = near_cfg;
        near_cfg = NULL;
    }
    const char *cfg = config_path ? config_path : cfg_file;
    if (cfg) {
        if (config_read(cfg, &u->cfg) != 0) goto fail;
    } else {
        config_sd15(&u->cfg);
    }
    if (ldm) {
        map = sd_calloc(1, sizeof *map);
        ldm_map_build(&u->cfg, map);
    }
    if (loader_open(&l, file, ldm ? rename_ldm : NULL, map, pol) != 0) goto fail;
    if (ldm && !cfg) config_from_ldm_shapes(&l, &u->cfg);
    if (unet_load_weights(u, &l) != 0) goto fail;
    for (int i = 0; i < l.n; i++)                            /* a UNet tensor the config has no place for */
        if (l.names[i] && !l.used[i]) {
            sd_error("%s: tensor '%s' is not part of the UNet %s describes (wrong config?)", path, l.st->entries[i].name,
                     cfg ? cfg : "the SD1.5 config");
            goto fail;
        }
    loader_close(&l);
    free(map);
    free(file);
    free(cfg_file);
    free(near_cfg);
    return u;
fail:
    if (l.st) loader_close(&l);
    free(map);
    free(file);
    free(cfg_file);
    free(near_cfg);
    unet_free(u);
    return NULL;
}

int unet_cross_attention_dim(const sd_unet *u) { return u->cfg.cross[0]; }
int unet_in_channels(const sd_unet *u) { return u->cfg.in_ch; }

/* ======================================================================================
 * 4. Forward
 * ====================================================================================== */

static void replace(sd_tensor *x, sd_tensor y) {
    tensor_free(x);
    *x = y;
}

/* Timesteps: diffusers' get_timestep_embedding in float32 — exponent = -ln(10000) * i /
 * (half - freq_shift), arg = t * exp(exponent), [sin, cos] (flipped to [cos, sin]) — then
 * rounded once to the storage format (t_emb.to(sample.dtype)). */
static sd_tensor time_proj(const sd_ctx *c, const unet_config *cfg, const float *timesteps, int N) {
    int dim = cfg->ch[0], half = dim / 2;
    sd_tensor e = tensor_new(2, N, dim, 1, 1);
    const float neg_log_max = (float)-9.210340371976184;    /* -math.log(10000) as a float32 scalar */
    float denom = (float)half - cfg->freq_shift;
    for (int n = 0; n < N; n++)
        for (int i = 0; i < half; i++) {
            float ex = (float)i * neg_log_max;
            ex = ex / denom;
            float arg = timesteps[n] * sd_expf(ex);
            float s = sd_sinf(arg), co = sd_cosf(arg);
            e.data[(size_t)n * dim + (cfg->flip_sin_to_cos ? half + i : i)] = s;
            e.data[(size_t)n * dim + (cfg->flip_sin_to_cos ? i : half + i)] = co;
        }                                                    /* odd dim: the last column stays 0 */
    op_round_storage(c, &e);
    return e;
}

/* GEGLU's chunk(2, dim=-1): [..., 2n] -> value [..., n] (first half) and gate (second half). */
static void split_last(const sd_tensor *x, sd_tensor *value, sd_tensor *gate) {
    int D = x->shape[x->ndim - 1], h = D / 2;
    size_t rows = tensor_numel(x) / (size_t)D;
    *value = *x;
    value->shape[value->ndim - 1] = h;
    *gate = *value;
    value->data = sd_malloc(rows * h * sizeof(float));
    gate->data = sd_malloc(rows * h * sizeof(float));
    for (size_t r = 0; r < rows; r++) {
        memcpy(value->data + r * h, x->data + r * D, (size_t)h * sizeof(float));
        memcpy(gate->data + r * h, x->data + r * D + h, (size_t)h * sizeof(float));
    }
}

/* Nearest resize to (oh, ow) as PyTorch's F.interpolate(mode="nearest"): exact 2x takes
 * index >> 1; other sizes floor(dst * (float)in/out) (diffusers' upsample_size path when the
 * latent is not divisible by 2^(levels-1)). */
static sd_tensor upsample_to(const sd_ctx *c, const sd_tensor *x, int oh, int ow) {
    int N = x->shape[0], C = x->shape[1], H = x->shape[2], W = x->shape[3];
    if (oh == 2 * H && ow == 2 * W) return op_upsample_nearest2x(c, x);
    sd_tensor y = tensor_new(4, N, C, oh, ow);
    float sy = (float)H / (float)oh, sx = (float)W / (float)ow;
    for (size_t nc = 0; nc < (size_t)N * C; nc++)
        for (int oy = 0; oy < oh; oy++) {
            int iy = oh == 2 * H ? oy >> 1 : oh == H ? oy : (int)floorf((float)oy * sy);
            if (iy > H - 1) iy = H - 1;
            for (int ox = 0; ox < ow; ox++) {
                int ix = ow == 2 * W ? ox >> 1 : ow == W ? ox : (int)floorf((float)ox * sx);
                if (ix > W - 1) ix = W - 1;
                y.data[(nc * oh + oy) * ow + ox] = x->data[(nc * H + iy) * W + ix];
            }
        }
    return y;
}

/* What unet_forward needs besides the weights: the attention context, the IP-Adapter. */
typedef struct unet_run {
    const sd_unet *u;
    const sd_ctx *c;        /* the caller's context */
    sd_ctx ac;              /* the same for attention (upcast when the config says so) */
    const sd_tensor *context;
    const sd_unet_ip *ip;
    const sd_tensor *ip_tokens;
} unet_run;

/* BasicTransformerBlock: x + attn1(norm1 x), + attn2(norm2 x, context), + ff(norm3 x). */
static sd_tensor tblock_forward(const unet_run *r, const unet_tblock *b, const sd_tensor *x, const char *name) {
    const sd_ctx *c = r->c;
    char nm[256];
    sd_tensor n = op_layer_norm(c, x, 1e-5f, &b->norm1_w, &b->norm1_b);
    sd_trace_sub(c, name, "norm1", &n);
    snprintf(nm, sizeof nm, "%s.attn1", name);
    sd_tensor a = attn_forward(&r->ac, &b->attn1, &n, NULL, NULL, nm);
    sd_tensor h = op_add(c, &a, x);                          /* attn_output + hidden_states */
    tensor_free(&a);
    replace(&n, op_layer_norm(c, &h, 1e-5f, &b->norm2_w, &b->norm2_b));
    sd_trace_sub(c, name, "norm2", &n);
    snprintf(nm, sizeof nm, "%s.attn2", name);
    sd_attn_ip ipa, *ipp = NULL;
    if (r->ip_tokens) {                                      /* IP-Adapter: decoupled cross-attention */
        const sd_param *kw, *vw;
        if (ipadapter_layer(r->ip->adapter, b->ip_index, &kw, &vw) != 0)
            sd_fatal("IP-Adapter has no layer ip_adapter.%d for %s (checked by unet_check)", b->ip_index, nm);
        ipa.k_w = kw; ipa.v_w = vw; ipa.tokens = r->ip_tokens; ipa.scale = r->ip->scale;
        ipp = &ipa;
    }
    a = attn_forward(&r->ac, &b->attn2, &n, r->context, ipp, nm);
    replace(&h, op_add(c, &a, &h));
    tensor_free(&a);
    replace(&n, op_layer_norm(c, &h, 1e-5f, &b->norm3_w, &b->norm3_b));
    sd_trace_sub(c, name, "norm3", &n);
    sd_tensor p = op_linear(c, &n, &b->ff_in_w, &b->ff_in_b);  /* GEGLU: value * gelu(gate) */
    tensor_free(&n);
    snprintf(nm, sizeof nm, "%s.ff", name);
    sd_trace_sub(c, nm, "net.0.proj", &p);
    sd_tensor value, gate;
    split_last(&p, &value, &gate);
    tensor_free(&p);
    replace(&gate, op_gelu(c, &gate));
    sd_tensor g = op_mul(c, &value, &gate);
    tensor_free(&value);
    tensor_free(&gate);
    sd_trace_sub(c, nm, "net.0", &g);
    replace(&g, op_linear(c, &g, &b->ff_out_w, &b->ff_out_b));
    sd_trace_sub(c, nm, "net.2", &g);
    sd_trace_sub(c, nm, NULL, &g);
    replace(&h, op_add(c, &g, &h));                          /* ff_output + hidden_states */
    tensor_free(&g);
    sd_trace_sub(c, name, NULL, &h);
    return h;
}

/* Transformer2DModel: norm, proj_in, blocks, proj_out, + x. */
static sd_tensor transformer_forward(const unet_run *r, const unet_transformer *t, const sd_tensor *x) {
    const sd_ctx *c = r->c;
    static const int pad0[4] = { 0, 0, 0, 0 };
    int H = x->shape[2], W = x->shape[3];
    char nm[192];
    sd_tensor h = op_group_norm(c, x, r->u->cfg.groups, 1e-6f, &t->norm_w, &t->norm_b);
    sd_trace_sub(c, t->name, "norm", &h);
    sd_tensor tok;
    if (r->u->cfg.linear_proj) {                             /* tokens, then Linear */
        tok = op_nchw_to_tokens(&h);
        replace(&tok, op_linear(c, &tok, &t->proj_in_w, &t->proj_in_b));
        sd_trace_sub(c, t->name, "proj_in", &tok);
    } else {                                                 /* 1x1 conv, then tokens */
        replace(&h, op_conv2d(c, &h, &t->proj_in_w, &t->proj_in_b, 1, pad0));
        sd_trace_sub(c, t->name, "proj_in", &h);
        tok = op_nchw_to_tokens(&h);
    }
    tensor_free(&h);
    for (int k = 0; k < t->n_blocks; k++) {
        snprintf(nm, sizeof nm, "%s.transformer_blocks.%d", t->name, k);
        replace(&tok, tblock_forward(r, &t->blocks[k], &tok, nm));
    }
    if (r->u->cfg.linear_proj) {
        replace(&tok, op_linear(c, &tok, &t->proj_out_w, &t->proj_out_b));
        sd_trace_sub(c, t->name, "proj_out", &tok);
        h = op_tokens_to_nchw(&tok, H, W);
    } else {
        h = op_tokens_to_nchw(&tok, H, W);
        replace(&h, op_conv2d(c, &h, &t->proj_out_w, &t->proj_out_b, 1, pad0));
        sd_trace_sub(c, t->name, "proj_out", &h);
    }
    tensor_free(&tok);
    replace(&h, op_add(c, &h, x));                           /* hidden_states + residual */
    sd_trace_sub(c, t->name, NULL, &h);
    return h;
}

static const char *width_name(int d) {
    return d == 768 ? " (SD1.x)" : d == 1024 ? " (SD2.x)" : d == 2048 ? " (SDXL)" : "";
}

/* Does the adapter's every to_k_ip / to_v_ip fit the cross-attention layer it belongs to? */
static int check_transformer_ip(const sd_unet *u, const unet_transformer *t, const sd_ipadapter *a) {
    for (int k = 0; k < t->n_blocks; k++) {
        const sd_param *kw, *vw;
        int n = t->blocks[k].ip_index;
        if (ipadapter_layer(a, n, &kw, &vw) != 0) {
            sd_error("IP-Adapter has no ip_adapter.%d (for %s.transformer_blocks.%d.attn2): it was made for another UNet "
                     "(this one has %d cross-attention layers%s)", n, t->name, k, u->n_cross, width_name(u->cfg.cross[0]));
            return -1;
        }
        if (kw->shape[0] != t->ch || kw->shape[1] != t->cross || vw->shape[0] != t->ch || vw->shape[1] != t->cross) {
            sd_error("IP-Adapter's ip_adapter.%d.to_k_ip is [%d,%d], but %s.transformer_blocks.%d.attn2 needs [%d,%d]: "
                     "the adapter was made for another UNet", n, kw->shape[0], kw->shape[1], t->name, k, t->ch, t->cross);
            return -1;
        }
    }
    return 0;
}

int unet_ip_fits(const sd_unet *u, const sd_ipadapter *a) {
    int td = ipadapter_token_dim(a), cd = u->cfg.cross[0];
    if (td != cd) {
        sd_error("IP-Adapter makes image tokens of width %d%s, but this UNet's cross-attention width is %d%s: pair the "
                 "adapter with the UNet it was trained for (token width 768 = SD1.x, 1024 = SD2.x, 2048 = SDXL)",
                 td, width_name(td), cd, width_name(cd));
        return -1;
    }
    if (ipadapter_num_layers(a) != u->n_cross) {
        sd_error("IP-Adapter has %d cross-attention layers, this UNet has %d (SD1.x adapters have 16, SDXL adapters 70): "
                 "it was made for another UNet", ipadapter_num_layers(a), u->n_cross);
        return -1;
    }
    for (int i = 0; i < u->cfg.levels; i++) {
        for (int j = 0; u->down[i].attns && j < u->down[i].n; j++)
            if (check_transformer_ip(u, &u->down[i].attns[j], a)) return -1;
        for (int j = 0; u->up[i].attns && j < u->up[i].n; j++)
            if (check_transformer_ip(u, &u->up[i].attns[j], a)) return -1;
    }
    return check_transformer_ip(u, &u->mid_attn, a);
}

int unet_check(const sd_unet *u, const sd_tensor *sample, const sd_tensor *context, const sd_unet_ip *ip) {
    const unet_config *c = &u->cfg;
    if (sample->ndim != 4 || sample->shape[1] != c->in_ch || sample->shape[0] < 1) {
        sd_error("the sample must be [N,%d,h,w]; got %d dimensions [%d,%d,%d,%d]", c->in_ch, sample->ndim,
                 sample->shape[0], sample->shape[1], sample->shape[2], sample->shape[3]);
        return -1;
    }
    if (sample->shape[2] < 1 || sample->shape[3] < 1 || sample->shape[2] > 65536 || sample->shape[3] > 65536) {
        sd_error("a %dx%d latent is not a size this UNet can run", sample->shape[3], sample->shape[2]);
        return -1;
    }
    if (!context || context->ndim != 3 || context->shape[0] != sample->shape[0] || context->shape[2] != c->cross[0] ||
        context->shape[1] < 1) {
        sd_error("the context must be [%d, tokens, %d] (this UNet's cross-attention width%s); got [%d,%d,%d]",
                 sample->shape[0], c->cross[0], width_name(c->cross[0]), context ? context->shape[0] : 0,
                 context ? context->shape[1] : 0, context ? context->shape[2] : 0);
        return -1;
    }
    if (ip && ip->tokens) {
        if (!ip->adapter) { sd_error("IP-Adapter tokens without an adapter"); return -1; }
        if (unet_ip_fits(u, ip->adapter) != 0) return -1;
        const sd_tensor *t = ip->tokens;
        if (t->ndim != 3 || t->shape[0] != sample->shape[0] || t->shape[2] != c->cross[0] || t->shape[1] < 1) {
            sd_error("IP-Adapter image tokens must be [%d, tokens, %d]; got [%d,%d,%d]", sample->shape[0], c->cross[0],
                     t->shape[0], t->shape[1], t->shape[2]);
            return -1;
        }
    }
    return 0;
}

/* Inputs rounded to the storage format, as a .half() pipeline feeds them. */
static sd_tensor rounded_copy(const sd_ctx *c, const sd_tensor *x) {
    sd_tensor y = tensor_copy(x);
    op_round_storage(c, &y);
    return y;
}

sd_tensor unet_forward(const sd_unet *u, const sd_ctx *c, const sd_tensor *sample, const float *timesteps,
                       const sd_tensor *context, const sd_unet_ip *ip) {
    static const int pad1[4] = { 1, 1, 1, 1 }, pad_asym[4] = { 0, 1, 0, 1 };
    const unet_config *cfg = &u->cfg;
    if (unet_check(u, sample, context, ip) != 0) sd_fatal("unet_forward: %s", sd_last_error());
    int N = sample->shape[0], L = cfg->levels;
    char nm[160];
    unet_run r;
    r.u = u; r.c = c; r.ac = *c; r.ip = ip;
    if (cfg->upcast) r.ac.pol.upcast_attention = 1;
    sd_tensor ctx = rounded_copy(c, context), ipt = { 0, { 0, 0, 0, 0 }, NULL };
    r.context = &ctx;
    r.ip_tokens = NULL;
    if (ip && ip->tokens) {
        ipt = rounded_copy(c, ip->tokens);
        r.ip_tokens = &ipt;
    }

    /* time embedding */
    sd_tensor temb = time_proj(c, cfg, timesteps, N);
    sd_trace_tensor(c, "time_proj", &temb);
    replace(&temb, op_linear(c, &temb, &u->time1_w, &u->time1_b));
    sd_trace_tensor(c, "time_embedding.linear_1", &temb);
    replace(&temb, op_silu(c, &temb));
    sd_trace_tensor(c, "time_embedding.act", &temb);
    replace(&temb, op_linear(c, &temb, &u->time2_w, &u->time2_b));
    sd_trace_tensor(c, "time_embedding.linear_2", &temb);
    sd_trace_tensor(c, "time_embedding", &temb);

    /* conv_in and the down blocks; every block output is kept as a skip until an up block reads it */
    sd_tensor skips[UNET_MAX_SKIPS];
    int ns = 0;
    sd_tensor x = rounded_copy(c, sample);
    int kin = cfg->conv_in_k / 2, pin[4] = { kin, kin, kin, kin };
    skips[ns] = op_conv2d(c, &x, &u->conv_in_w, &u->conv_in_b, 1, pin);
    tensor_free(&x);
    sd_trace_tensor(c, "conv_in", &skips[ns++]);
    for (int i = 0; i < L; i++) {
        const unet_block *b = &u->down[i];
        for (int j = 0; j < b->n; j++) {
            snprintf(nm, sizeof nm, "down_blocks.%d.resnets.%d", i, j);
            sd_tensor h = resnet_forward(c, &b->resnets[j], &skips[ns - 1], &temb, nm);
            if (b->attns) replace(&h, transformer_forward(&r, &b->attns[j], &h));
            skips[ns++] = h;
        }
        if (b->has_resample) {                               /* stride-2 conv, padding 1 (or (0,1,0,1)) */
            sd_tensor d = op_conv2d(c, &skips[ns - 1], &b->resample_w, &b->resample_b, 2, cfg->down_pad ? pad1 : pad_asym);
            snprintf(nm, sizeof nm, "down_blocks.%d.downsamplers.0", i);
            sd_trace_tensor(c, nm, &d);
            skips[ns++] = d;
        }
        snprintf(nm, sizeof nm, "down_blocks.%d", i);
        sd_trace_tensor(c, nm, &skips[ns - 1]);
    }

    /* mid block: resnet, transformer, resnet */
    sd_tensor h = resnet_forward(c, &u->mid_res[0], &skips[ns - 1], &temb, "mid_block.resnets.0");
    replace(&h, transformer_forward(&r, &u->mid_attn, &h));
    replace(&h, resnet_forward(c, &u->mid_res[1], &h, &temb, "mid_block.resnets.1"));
    sd_trace_tensor(c, "mid_block", &h);

    /* up blocks: each resnet reads cat([h, skip]) with the most recent skip */
    for (int ui = 0; ui < L; ui++) {
        const unet_block *b = &u->up[ui];
        for (int j = 0; j < b->n; j++) {
            sd_tensor s = skips[--ns];
            sd_tensor cat = op_concat_channels(&h, &s);
            tensor_free(&h);
            tensor_free(&s);
            snprintf(nm, sizeof nm, "up_blocks.%d.resnets.%d", ui, j);
            h = resnet_forward(c, &b->resnets[j], &cat, &temb, nm);
            tensor_free(&cat);
            if (b->attns) replace(&h, transformer_forward(&r, &b->attns[j], &h));
        }
        if (b->has_resample) {                               /* nearest to the next skip's size (2x), conv */
            replace(&h, upsample_to(c, &h, skips[ns - 1].shape[2], skips[ns - 1].shape[3]));
            replace(&h, op_conv2d(c, &h, &b->resample_w, &b->resample_b, 1, pad1));
            snprintf(nm, sizeof nm, "up_blocks.%d.upsamplers.0", ui);
            sd_trace_tensor(c, nm, &h);
        }
        snprintf(nm, sizeof nm, "up_blocks.%d", ui);
        sd_trace_tensor(c, nm, &h);
    }
    if (ns != 0) sd_fatal("unet_forward: %d skip connections left over", ns);

    /* conv_norm_out, SiLU, conv_out */
    replace(&h, op_group_norm(c, &h, cfg->groups, cfg->eps, &u->norm_out_w, &u->norm_out_b));
    sd_trace_tensor(c, "conv_norm_out", &h);
    replace(&h, op_silu(c, &h));
    sd_trace_tensor(c, "conv_act", &h);
    int kout = cfg->conv_out_k / 2, pout[4] = { kout, kout, kout, kout };
    replace(&h, op_conv2d(c, &h, &u->conv_out_w, &u->conv_out_b, 1, pout));
    sd_trace_tensor(c, "conv_out", &h);
    tensor_free(&temb);
    tensor_free(&ctx);
    tensor_free(&ipt);
    return h;
}

/* ======================================================================================
 * 5. The `unet` command
 *   sdref unet --model PATH [--config JSON] --sample IN.npy --timestep T --context CTX.npy
 *        [--precision SPEC] [--threads N] [--trace TRACE.safetensors] -o OUT.npy
 *        [--ip-adapter FILE (--ip-embeds E.npy | --ip-hidden HS.npy | --ip-image IN.png
 *         --image-encoder PATH [--image-encoder-config JSON]) [--ip-scale S] [--ip-tokens-out T.npy]]
 * ====================================================================================== */

static int ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

/* A float .npy as a tensor of `want_ndim` dimensions; one fewer means batch 1. */
static int read_npy_tensor(const char *path, int want_ndim, const char *what, sd_tensor *t) {
    float *data;
    int ndim;
    int64_t shape[8];
    size_t n;
    if (npy_read_f32(path, &data, &ndim, shape, &n) != 0) return -1;
    int64_t s[4] = { 1, 1, 1, 1 };
    if (ndim == want_ndim) for (int i = 0; i < ndim; i++) s[i] = shape[i];
    else if (ndim == want_ndim - 1) for (int i = 0; i < ndim; i++) s[i + 1] = shape[i];
    else {
        sd_error("%s: %s must have %d dimensions, has %d", path, what, want_ndim, ndim);
        free(data);
        return -1;
    }
    for (int i = 0; i < want_ndim; i++)
        if (s[i] < 1 || s[i] > (1 << 24)) {
            sd_error("%s: %s has an empty or impossible dimension", path, what);
            free(data);
            return -1;
        }
    for (size_t i = 0; i < n; i++)
        if (data[i] != data[i] || data[i] == INFINITY || data[i] == -INFINITY) {
            sd_error("%s: %s holds Inf or NaN at element %zu", path, what, i);
            free(data);
            return -1;
        }
    t->ndim = want_ndim;
    for (int i = 0; i < 4; i++) t->shape[i] = (int)s[i];
    t->data = data;
    return 0;
}

/* --timestep: a number (every batch element), "T1,T2,..." (one per element), or a .npy. */
static int parse_timesteps(const char *s, int N, float **out) {
    float *t = sd_calloc((size_t)N, sizeof(float));
    int n = 0;
    if (ends_with(s, ".npy")) {
        float *d;
        int ndim;
        int64_t shape[8];
        size_t cnt;
        if (npy_read_f32(s, &d, &ndim, shape, &cnt) != 0) { free(t); return -1; }
        if (cnt != 1 && cnt != (size_t)N) {
            sd_error("%s: %zu timesteps for a batch of %d", s, cnt, N);
            free(d); free(t);
            return -1;
        }
        for (int i = 0; i < N; i++) t[i] = d[cnt == 1 ? 0 : i];
        free(d);
        n = N;
    } else {
        const char *p = s;
        while (*p) {
            char *end;
            double v = strtod(p, &end);
            if (end == p || !(v >= -1e7 && v <= 1e7) || n >= N || (*end && *end != ',')) {
                sd_error("--timestep '%s': expected a number or one per batch element (%d), comma-separated", s, N);
                free(t);
                return -1;
            }
            t[n++] = (float)v;
            p = *end ? end + 1 : end;
        }
        if (n == 1) for (int i = 1; i < N; i++) t[i] = t[0];
        else if (n != N) {
            sd_error("--timestep '%s': %d values for a batch of %d", s, n, N);
            free(t);
            return -1;
        }
    }
    *out = t;
    return 0;
}

/* Repeat a batch-1 tensor to batch N (one image prompt for every batch element). */
static void repeat_batch(sd_tensor *t, int N) {
    if (t->shape[0] != 1 || N == 1) return;
    size_t n = tensor_numel(t);
    sd_tensor y = *t;
    y.shape[0] = N;
    y.data = sd_malloc(n * N * sizeof(float));
    for (int i = 0; i < N; i++) memcpy(y.data + n * i, t->data, n * sizeof(float));
    replace(t, y);
}

/* The IP-Adapter's input options. */
typedef struct ip_opts { const char *embeds, *hidden, *image, *encoder, *encoder_cfg; } ip_opts;

/* IP-Adapter input: image embeds, hidden states, or a PNG through the CLIP vision encoder. */
static int ip_input(const ip_opts *o, const sd_precision *prec, const sd_ipadapter *ad, const sd_ctx *base, sd_tensor *in) {
    if (!!o->embeds + !!o->hidden + !!o->image != 1) {
        sd_error("--ip-adapter needs exactly one of --ip-embeds E.npy, --ip-hidden HS.npy, --ip-image IN.png");
        return -1;
    }
    int wants_hidden = ipadapter_wants_hidden_states(ad);
    if (o->embeds || o->hidden) {
        if (o->embeds && wants_hidden) {
            sd_error("this IP-Adapter (%s) reads the image encoder's penultimate hidden states: pass --ip-hidden or --ip-image",
                     ipadapter_kind(ad));
            return -1;
        }
        if (o->hidden && !wants_hidden) {
            sd_error("this IP-Adapter (base) reads image embeds: pass --ip-embeds or --ip-image");
            return -1;
        }
        return read_npy_tensor(o->embeds ? o->embeds : o->hidden, o->embeds ? 2 : 3,
                               o->embeds ? "the image embeds" : "the hidden states", in);
    }
    if (!o->encoder) {
        sd_error("--ip-image needs --image-encoder PATH");
        return -1;
    }
    sd_image im;
    sd_tensor px = { 0, { 0, 0, 0, 0 }, NULL }, pen = px;
    sd_clip_vision *m = clip_vision_load(o->encoder, o->encoder_cfg, &prec->model[SD_VISION]);
    if (!m) return -1;
    if (png_read_file(o->image, &im) != 0) { clip_vision_free(m); return -1; }
    int rc = clip_preprocess(&im, clip_vision_image_size(m), &px, NULL);
    sd_image_free(&im);
    if (rc != 0) { clip_vision_free(m); return -1; }
    sd_ctx vc = *base;
    vc.pol = prec->model[SD_VISION];
    vc.prefix = "image_encoder";
    sd_tensor emb = clip_vision_forward(m, &vc, &px, wants_hidden ? &pen : NULL, NULL);
    clip_vision_free(m);
    tensor_free(&px);
    if (!emb.data) { tensor_free(&pen); return -1; }
    if (wants_hidden) { tensor_free(&emb); *in = pen; }
    else *in = emb;
    return 0;
}

int cmd_unet(int argc, char **argv) {
    sd_args a;
    sd_precision prec;
    int threads, rc = -1;
    sd_trace trace;
    memset(&trace, 0, sizeof trace);
    sd_tensor none = { 0, { 0, 0, 0, 0 }, NULL }, sample = none, context = none, out = none, ip_in = none, tokens = none;
    float *timesteps = NULL;
    sd_unet *u = NULL;
    sd_ipadapter *ad = NULL;
    args_init(&a, argc, argv);
    const char *model = args_value(&a, "--model"), *config = args_value(&a, "--config");
    const char *sample_path = args_value(&a, "--sample"), *t_arg = args_value(&a, "--timestep");
    const char *ctx_path = args_value(&a, "--context"), *out_path = args_value(&a, "-o");
    const char *trace_path = args_value(&a, "--trace"), *ip_path = args_value(&a, "--ip-adapter");
    const char *ip_scale_s = args_value(&a, "--ip-scale"), *tokens_out = args_value(&a, "--ip-tokens-out");
    ip_opts ipo = { args_value(&a, "--ip-embeds"), args_value(&a, "--ip-hidden"), args_value(&a, "--ip-image"),
                    args_value(&a, "--image-encoder"), args_value(&a, "--image-encoder-config") };
    if (args_trace_options(&a, trace_path, &trace) || args_precision(&a, &prec) || args_threads(&a, &threads) ||
        args_check_all_used(&a))
        goto done;
    if (!ip_path && (ipo.embeds || ipo.hidden || ipo.image || ipo.encoder || ipo.encoder_cfg || ip_scale_s || tokens_out)) {
        sd_error("--ip-embeds, --ip-hidden, --ip-image, --image-encoder, --ip-scale and --ip-tokens-out need --ip-adapter FILE");
        goto done;
    }
    sd_ctx c;
    memset(&c, 0, sizeof c);
    c.threads = threads;
    if (trace_path) c.trace = &trace;
    float ip_scale = 1.0f;
    if (ip_scale_s) {
        char *end;
        double v = strtod(ip_scale_s, &end);
        if (end == ip_scale_s || *end || !(v >= -1e4 && v <= 1e4)) { sd_error("--ip-scale '%s' is not a number", ip_scale_s); goto done; }
        ip_scale = (float)v;
    }
    if (!model || !sample_path || !t_arg || !ctx_path || !out_path) {
        sd_error("needs --model PATH, --sample IN.npy, --timestep T, --context CTX.npy and -o OUT.npy");
        goto done;
    }
    if (!ends_with(out_path, ".npy") || (tokens_out && !ends_with(tokens_out, ".npy"))) {
        sd_error("the outputs (-o, --ip-tokens-out) must be .npy files");
        goto done;
    }
    if (trace_path && !ends_with(trace_path, ".safetensors")) {
        sd_error("--trace %s: the trace is written as .safetensors", trace_path);
        goto done;
    }
    if (ip_path) {
        ad = ipadapter_load(ip_path, NULL, &prec.model[SD_IPADAPTER]);
        if (!ad || ip_input(&ipo, &prec, ad, &c, &ip_in) != 0) goto done;
    }
    if (read_npy_tensor(sample_path, 4, "the sample", &sample) || read_npy_tensor(ctx_path, 3, "the context", &context))
        goto done;
    int N = sample.shape[0];
    if (parse_timesteps(t_arg, N, &timesteps) != 0) goto done;
    u = unet_load(model, config, &prec.model[SD_UNET]);
    if (!u) goto done;
    if (sample.shape[1] != unet_in_channels(u)) {
        sd_error("%s: the sample has %d channels, this UNet takes %d", sample_path, sample.shape[1], unet_in_channels(u));
        goto done;
    }
    if (context.shape[2] != unet_cross_attention_dim(u)) {
        sd_error("%s: the context is %d wide, this UNet's cross-attention width is %d%s", ctx_path, context.shape[2],
                 unet_cross_attention_dim(u), width_name(unet_cross_attention_dim(u)));
        goto done;
    }
    if (context.shape[0] == 1) repeat_batch(&context, N);
    const char *prefix = "unet";
    if (ad) {
        if (unet_ip_fits(u, ad) != 0) goto done;
        prefix = !strcmp(ipadapter_kind(ad), "plus") ? "unet_ipplus" : !strcmp(ipadapter_kind(ad), "full-face") ? "unet_ipfull" : "unet_ip";
        sd_ctx ic = c;
        ic.pol = prec.model[SD_IPADAPTER];
        ic.prefix = prefix;
        tokens = ipadapter_tokens(ad, &ic, &ip_in);
        if (!tokens.data) goto done;
        repeat_batch(&tokens, N);
    }
    c.pol = prec.model[SD_UNET];
    c.prefix = prefix;
    sd_unet_ip ip = { ad, tokens.data ? &tokens : NULL, ip_scale };
    if (unet_check(u, &sample, &context, &ip) != 0) goto done;
    out = unet_forward(u, &c, &sample, timesteps, &context, &ip);
    rc = trace_path ? sd_trace_write(&trace, trace_path) : 0;   /* the main output last: none unless all succeed */
    if (rc == 0 && tokens_out) rc = npy_write_tensor(tokens_out, &tokens);
    if (rc == 0) rc = npy_write_tensor(out_path, &out);
done:
    sd_trace_free(&trace);
    tensor_free(&sample);
    tensor_free(&context);
    tensor_free(&out);
    tensor_free(&ip_in);
    tensor_free(&tokens);
    free(timesteps);
    unet_free(u);
    ipadapter_free(ad);
    free(a.used);
    return rc;
}
