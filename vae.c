/* vae.c — AutoencoderKL as diffusers v0.30.3 computes it: the decoder (latent -> image) and
 * the encoder (image -> latent mean and log-variance) of the SD1.x and SDXL VAEs.
 *
 * Reads top to bottom:
 *   1. the config (config.json, or SD1.5's when a single-file checkpoint comes without one)
 *   2. file layouts: diffusers names, and the LDM/CompVis names renamed onto them
 *   3. loading: every size from the config, every tensor checked against it
 *   4. the forward passes, tracing each module's output under its diffusers name
 *   5. the `vae-decode` and `vae-encode` commands
 *
 * The architecture (diffusers Encoder / Decoder):
 *   encoder: conv_in, down blocks (resnets, then pad (0,1,0,1) + 3x3 stride-2 conv except the
 *            last), mid block (resnet, single-head attention with residual, resnet),
 *            conv_norm_out, SiLU, conv_out -> quant_conv -> split into mean and logvar
 *   decoder: post_quant_conv -> conv_in, mid block, up blocks (layers_per_block+1 resnets,
 *            then nearest 2x + 3x3 conv except the last), conv_norm_out, SiLU, conv_out
 * All GroupNorms use eps 1e-6. Operations and their rounding come from ref.c. */
#include "sdref.h"
#include <stdlib.h>
#include <string.h>

#define VAE_MAX_BLOCKS 8
#define VAE_EPS 1e-6f

/* ======================================================================================
 * 1. Config
 * ====================================================================================== */

typedef struct vae_config {
    int in_channels, out_channels, latent_channels;
    int n_blocks, block_out[VAE_MAX_BLOCKS];
    int layers_per_block, groups;
    int use_quant_conv, use_post_quant_conv, mid_attention;
    float scaling_factor, shift_factor;   /* shift 0 unless the config has one (SD3-style VAEs) */
} vae_config;

/* SD1.5's VAE (shared/spec/sd15_vae_config.json): what an LDM checkpoint without a config is. */
static void config_sd15(vae_config *c) {
    static const int blocks[4] = { 128, 256, 512, 512 };
    memset(c, 0, sizeof *c);
    c->in_channels = 3; c->out_channels = 3; c->latent_channels = 4;
    c->n_blocks = 4;
    memcpy(c->block_out, blocks, sizeof blocks);
    c->layers_per_block = 2; c->groups = 32;
    c->use_quant_conv = 1; c->use_post_quant_conv = 1; c->mid_attention = 1;
    c->scaling_factor = 0.18215f;
}

/* Every block type must be the plain encoder/decoder block AutoencoderKL is built from. */
static int check_block_types(const sd_json *j, const char *key, const char *want, int n, const char *path) {
    const sd_json *a = json_get(j, key);
    if (!a || a->type == JSON_NULL) return 0;
    if (a->type != JSON_ARRAY || a->n != n) {
        sd_error("%s: '%s' must be a list of %d block types", path, key, n);
        return -1;
    }
    for (int i = 0; i < n; i++)
        if (a->items[i].type != JSON_STRING || strcmp(a->items[i].str, want) != 0) {
            sd_error("%s: %s[%d] is not %s (only AutoencoderKL's own blocks are supported)", path, key, i, want);
            return -1;
        }
    return 0;
}

static int config_read(const char *path, vae_config *c) {
    sd_json j;
    if (json_parse_file(path, &j) != 0) return -1;
    int rc = -1;
    config_sd15(c);
    if (j.type != JSON_OBJECT) { sd_error("%s: not a JSON object", path); goto done; }
    const sd_json *boc = json_get(&j, "block_out_channels");
    if (boc) {
        if (boc->type != JSON_ARRAY || boc->n < 1 || boc->n > VAE_MAX_BLOCKS) {
            sd_error("%s: block_out_channels must be a list of 1 to %d numbers", path, VAE_MAX_BLOCKS);
            goto done;
        }
        c->n_blocks = boc->n;
        for (int i = 0; i < boc->n; i++) {
            const sd_json *v = &boc->items[i];
            if (v->type != JSON_NUMBER || v->num < 1 || v->num > 65536 || v->num != (int)v->num) {
                sd_error("%s: block_out_channels[%d] is not a channel count", path, i);
                goto done;
            }
            c->block_out[i] = (int)v->num;
        }
    }
    c->in_channels = json_int(&j, "in_channels", 3);
    c->out_channels = json_int(&j, "out_channels", 3);
    c->latent_channels = json_int(&j, "latent_channels", 4);
    c->layers_per_block = json_int(&j, "layers_per_block", 2);
    c->groups = json_int(&j, "norm_num_groups", 32);
    c->use_quant_conv = json_bool(&j, "use_quant_conv", 1);
    c->use_post_quant_conv = json_bool(&j, "use_post_quant_conv", 1);
    c->mid_attention = json_bool(&j, "mid_block_add_attention", 1);
    c->scaling_factor = (float)json_num(&j, "scaling_factor", 0.18215);
    c->shift_factor = (float)json_num(&j, "shift_factor", 0.0);
    const char *act = json_str(&j, "act_fn", "silu");
    if (strcmp(act, "silu") != 0) { sd_error("%s: act_fn '%s' is not supported (only silu)", path, act); goto done; }
    if (check_block_types(&j, "down_block_types", "DownEncoderBlock2D", c->n_blocks, path) ||
        check_block_types(&j, "up_block_types", "UpDecoderBlock2D", c->n_blocks, path)) goto done;
    if (c->in_channels < 1 || c->out_channels < 1 || c->latent_channels < 1 || c->in_channels > 4096 ||
        c->out_channels > 4096 || c->latent_channels > 4096) {
        sd_error("%s: in_channels, out_channels and latent_channels must be positive", path);
        goto done;
    }
    if (c->layers_per_block < 1 || c->layers_per_block > 64) {
        sd_error("%s: layers_per_block %d is out of range (1..64)", path, c->layers_per_block);
        goto done;
    }
    for (int i = 0; i < c->n_blocks; i++)
        if (c->groups < 1 || c->block_out[i] % c->groups) {
            sd_error("%s: block_out_channels[%d] = %d does not split into norm_num_groups = %d", path, i,
                     c->block_out[i], c->groups);
            goto done;
        }
    if (!(c->scaling_factor > 0)) { sd_error("%s: scaling_factor must be positive", path); goto done; }
    rc = 0;
done:
    json_free(&j);
    return rc;
}

/* ======================================================================================
 * 2. File layouts
 *
 * diffusers: encoder.down_blocks.{i}.resnets.{j}.*, decoder.up_blocks.{i}.*, mid_block, ...
 *            (old files name the mid attention query/key/value/proj_attn)
 * LDM:       [first_stage_model.]encoder.down.{i}.block.{j}.*, decoder.up.{n-1-i}.*, mid.block_1,
 *            mid.attn_1.{norm,q,k,v,proj_out}, norm_out, nin_shortcut, downsample/upsample.conv
 * ====================================================================================== */

typedef enum vae_layout { LAYOUT_DIFFUSERS, LAYOUT_LDM } vae_layout;

typedef struct layout_info {
    vae_layout layout;
    const char *prefix;   /* "" or "first_stage_model." */
    int n_up;             /* LDM: number of decoder levels (its up.{k} run in reverse) */
} layout_info;

static int starts_with(const char *s, const char *p) { return strncmp(s, p, strlen(p)) == 0; }

/* Parse a decimal index at *s followed by '.', advancing past both. -1 when there is none. */
static int take_index(const char **s) {
    const char *p = *s;
    int v = 0, digits = 0;
    while (*p >= '0' && *p <= '9' && digits < 6) v = v * 10 + (*p++ - '0'), digits++;
    if (!digits || *p != '.') return -1;
    *s = p + 1;
    return v;
}

/* Resnet leaf names: LDM's nin_shortcut is diffusers' conv_shortcut; the rest agree. */
static int rename_resnet_leaf(const char *rest, char *out, size_t n) {
    if (starts_with(rest, "nin_shortcut.")) return snprintf(out, n, "conv_shortcut.%s", rest + 13) < (int)n;
    return snprintf(out, n, "%s", rest) < (int)n;
}

/* LDM mid attention: norm, q, k, v, proj_out -> group_norm, to_q, to_k, to_v, to_out.0 */
static int rename_attn_leaf(const char *rest, char *out, size_t n) {
    static const char *const from[] = { "norm.", "q.", "k.", "v.", "proj_out." };
    static const char *const to[] = { "group_norm.", "to_q.", "to_k.", "to_v.", "to_out.0." };
    for (int i = 0; i < 5; i++)
        if (starts_with(rest, from[i])) return snprintf(out, n, "%s%s", to[i], rest + strlen(from[i])) < (int)n;
    return 0;
}

/* One LDM key of the encoder or decoder (after "encoder." / "decoder.") -> diffusers suffix. */
static int rename_ldm_coder(const char *k, int decoder, int n_up, char *out, size_t n) {
    char leaf[256];
    if (starts_with(k, "conv_in.") || starts_with(k, "conv_out.")) return snprintf(out, n, "%s", k) < (int)n;
    if (starts_with(k, "norm_out.")) return snprintf(out, n, "conv_norm_out.%s", k + 9) < (int)n;
    if (starts_with(k, "mid.")) {
        const char *r = k + 4;
        if (starts_with(r, "block_1.") || starts_with(r, "block_2.")) {
            if (!rename_resnet_leaf(r + 8, leaf, sizeof leaf)) return 0;
            return snprintf(out, n, "mid_block.resnets.%d.%s", r[6] - '1', leaf) < (int)n;
        }
        if (starts_with(r, "attn_1.")) {
            if (!rename_attn_leaf(r + 7, leaf, sizeof leaf)) return 0;
            return snprintf(out, n, "mid_block.attentions.0.%s", leaf) < (int)n;
        }
        return 0;
    }
    const char *lvl = decoder ? "up." : "down.";
    if (!starts_with(k, lvl)) return 0;
    const char *r = k + strlen(lvl);
    int i = take_index(&r);
    if (i < 0) return 0;
    if (decoder) {
        if (i >= n_up) return 0;
        i = n_up - 1 - i;                                    /* LDM numbers decoder levels from the image side */
    }
    const char *blocks = decoder ? "up_blocks" : "down_blocks";
    if (starts_with(r, "block.")) {
        r += 6;
        int j = take_index(&r);
        if (j < 0 || !rename_resnet_leaf(r, leaf, sizeof leaf)) return 0;
        return snprintf(out, n, "%s.%d.resnets.%d.%s", blocks, i, j, leaf) < (int)n;
    }
    const char *sampler = decoder ? "upsample.conv." : "downsample.conv.";
    if (starts_with(r, sampler))
        return snprintf(out, n, "%s.%d.%s.0.conv.%s", blocks, i, decoder ? "upsamplers" : "downsamplers",
                        r + strlen(sampler)) < (int)n;
    return 0;
}

static int rename_ldm(const char *key, char *out, size_t n, void *user) {
    const layout_info *li = user;
    if (!starts_with(key, li->prefix)) return 0;             /* the UNet and text encoder of a checkpoint */
    const char *k = key + strlen(li->prefix);
    char tail[256];
    if (starts_with(k, "quant_conv.") || starts_with(k, "post_quant_conv.")) return snprintf(out, n, "%s", k) < (int)n;
    if (starts_with(k, "encoder.") && rename_ldm_coder(k + 8, 0, li->n_up, tail, sizeof tail))
        return snprintf(out, n, "encoder.%s", tail) < (int)n;
    if (starts_with(k, "decoder.") && rename_ldm_coder(k + 8, 1, li->n_up, tail, sizeof tail))
        return snprintf(out, n, "decoder.%s", tail) < (int)n;
    return 0;
}

/* diffusers names pass through; the deprecated attention names of old files are renamed. */
static int rename_diffusers(const char *key, char *out, size_t n, void *user) {
    static const char *const from[] = { ".query.", ".key.", ".value.", ".proj_attn." };
    static const char *const to[] = { ".to_q.", ".to_k.", ".to_v.", ".to_out.0." };
    (void)user;
    const char *att = strstr(key, "mid_block.attentions.0.");
    if (att) {
        const char *leaf = att + strlen("mid_block.attentions.0");
        for (int i = 0; i < 4; i++)
            if (starts_with(leaf, from[i]))
                return snprintf(out, n, "%.*s%s%s", (int)(leaf - key), key, to[i], leaf + strlen(from[i])) < (int)n;
    }
    return snprintf(out, n, "%s", key) < (int)n;
}

/* Decide the layout from the file's keys. */
static int detect_layout(const char *path, layout_info *li) {
    sd_safetensors st;
    if (st_open(&st, path) != 0) return -1;
    int ldm_prefixed = 0, ldm = 0, diffusers = 0, max_up = -1;
    for (int i = 0; i < st.n; i++) {
        const char *k = st.entries[i].name;
        if (starts_with(k, "first_stage_model.")) {
            ldm_prefixed = 1;
            k += strlen("first_stage_model.");
        }
        if (starts_with(k, "decoder.up_blocks.") || starts_with(k, "encoder.down_blocks.") ||
            starts_with(k, "decoder.mid_block.") || starts_with(k, "encoder.mid_block."))
            diffusers = 1;
        if (starts_with(k, "decoder.up.") || starts_with(k, "encoder.down.") || starts_with(k, "decoder.mid.") ||
            starts_with(k, "encoder.mid.")) {
            ldm = 1;
            const char *r = k + strlen("decoder.up.");
            int idx = starts_with(k, "decoder.up.") ? take_index(&r) : -1;
            if (idx > max_up) max_up = idx;
        }
    }
    st_close(&st);
    memset(li, 0, sizeof *li);
    li->prefix = "";
    if (ldm_prefixed || (ldm && !diffusers)) {
        li->layout = LAYOUT_LDM;
        li->prefix = ldm_prefixed ? "first_stage_model." : "";
        li->n_up = max_up + 1;
        return 0;
    }
    if (diffusers) {
        li->layout = LAYOUT_DIFFUSERS;
        return 0;
    }
    sd_error("%s: no VAE weights found (expected diffusers keys such as decoder.up_blocks.*, or LDM keys such as "
             "decoder.up.* or first_stage_model.decoder.up.*)", path);
    return -1;
}

/* ======================================================================================
 * 3. Loading
 * ====================================================================================== */

typedef struct vae_mid { sd_resnet res[2]; sd_attn attn; int has_attn; } vae_mid;

/* One down block of the encoder or up block of the decoder. */
typedef struct vae_level {
    sd_resnet *res; int n_res;
    int has_sampler; sd_param sampler_w, sampler_b;   /* downsamplers.0.conv / upsamplers.0.conv */
} vae_level;

/* The Encoder or the Decoder. */
typedef struct vae_coder {
    sd_param in_w, in_b;
    vae_level *levels; int n_levels;
    vae_mid mid;
    sd_param norm_w, norm_b, out_w, out_b;
} vae_coder;

struct sd_vae {
    vae_config cfg;
    vae_coder enc, dec;
    sd_param quant_w, quant_b, post_w, post_b;   /* absent (NULL data) when the config says so */
};

static int load_conv(sd_loader *l, sd_param *w, sd_param *b, const char *name, int cout, int cin, int k) {
    char buf[320];
    int ws[4] = { cout, cin, k, k }, bs[1] = { cout };
    snprintf(buf, sizeof buf, "%s.weight", name);
    if (loader_param(l, w, buf, 4, ws)) return -1;
    snprintf(buf, sizeof buf, "%s.bias", name);
    return loader_param(l, b, buf, 1, bs);
}

static int load_mid(sd_loader *l, vae_mid *m, const char *coder, int ch, const vae_config *c) {
    char buf[256];
    for (int r = 0; r < 2; r++) {
        snprintf(buf, sizeof buf, "%s.mid_block.resnets.%d", coder, r);
        if (resnet_load(l, &m->res[r], buf, ch, ch, 0, c->groups, VAE_EPS)) return -1;
    }
    m->has_attn = c->mid_attention;
    snprintf(buf, sizeof buf, "%s.mid_block.attentions.0", coder);
    return m->has_attn ? attn_load(l, &m->attn, buf, ch, ch, 1, ch, 1, c->groups, VAE_EPS, 1) : 0;
}

/* diffusers Encoder: down block i maps block_out[i-1] (block_out[0] for i = 0) to block_out[i]. */
static int load_encoder(sd_loader *l, vae_coder *e, const vae_config *c) {
    char buf[256];
    int top = c->block_out[c->n_blocks - 1];
    if (load_conv(l, &e->in_w, &e->in_b, "encoder.conv_in", c->block_out[0], c->in_channels, 3)) return -1;
    e->n_levels = c->n_blocks;
    e->levels = sd_calloc((size_t)c->n_blocks, sizeof *e->levels);
    for (int i = 0; i < c->n_blocks; i++) {
        vae_level *lv = &e->levels[i];
        int cin = c->block_out[i > 0 ? i - 1 : 0], cout = c->block_out[i];
        lv->n_res = c->layers_per_block;
        lv->res = sd_calloc((size_t)lv->n_res, sizeof *lv->res);
        for (int r = 0; r < lv->n_res; r++) {
            snprintf(buf, sizeof buf, "encoder.down_blocks.%d.resnets.%d", i, r);
            if (resnet_load(l, &lv->res[r], buf, r == 0 ? cin : cout, cout, 0, c->groups, VAE_EPS)) return -1;
        }
        lv->has_sampler = i + 1 < c->n_blocks;
        snprintf(buf, sizeof buf, "encoder.down_blocks.%d.downsamplers.0.conv", i);
        if (lv->has_sampler && load_conv(l, &lv->sampler_w, &lv->sampler_b, buf, cout, cout, 3)) return -1;
    }
    if (load_mid(l, &e->mid, "encoder", top, c)) return -1;
    if (load_norm(l, &e->norm_w, &e->norm_b, "encoder.conv_norm_out", top)) return -1;
    return load_conv(l, &e->out_w, &e->out_b, "encoder.conv_out", 2 * c->latent_channels, top, 3);
}

/* diffusers Decoder: up block i maps the previous width to reversed block_out[i], with
 * layers_per_block + 1 resnets. */
static int load_decoder(sd_loader *l, vae_coder *d, const vae_config *c) {
    char buf[256];
    int n = c->n_blocks, top = c->block_out[n - 1];
    if (load_conv(l, &d->in_w, &d->in_b, "decoder.conv_in", top, c->latent_channels, 3)) return -1;
    if (load_mid(l, &d->mid, "decoder", top, c)) return -1;
    d->n_levels = n;
    d->levels = sd_calloc((size_t)n, sizeof *d->levels);
    int prev = top;
    for (int i = 0; i < n; i++) {
        vae_level *lv = &d->levels[i];
        int cout = c->block_out[n - 1 - i];
        lv->n_res = c->layers_per_block + 1;
        lv->res = sd_calloc((size_t)lv->n_res, sizeof *lv->res);
        for (int r = 0; r < lv->n_res; r++) {
            snprintf(buf, sizeof buf, "decoder.up_blocks.%d.resnets.%d", i, r);
            if (resnet_load(l, &lv->res[r], buf, r == 0 ? prev : cout, cout, 0, c->groups, VAE_EPS)) return -1;
        }
        lv->has_sampler = i + 1 < n;
        snprintf(buf, sizeof buf, "decoder.up_blocks.%d.upsamplers.0.conv", i);
        if (lv->has_sampler && load_conv(l, &lv->sampler_w, &lv->sampler_b, buf, cout, cout, 3)) return -1;
        prev = cout;
    }
    if (load_norm(l, &d->norm_w, &d->norm_b, "decoder.conv_norm_out", c->block_out[0])) return -1;
    return load_conv(l, &d->out_w, &d->out_b, "decoder.conv_out", c->out_channels, c->block_out[0], 3);
}

static void free_coder(vae_coder *e) {
    for (int i = 0; i < e->n_levels; i++) {
        vae_level *lv = &e->levels[i];
        for (int r = 0; lv->res && r < lv->n_res; r++) resnet_free(&lv->res[r]);
        free(lv->res);
        param_free(&lv->sampler_w);
        param_free(&lv->sampler_b);
    }
    free(e->levels);
    for (int r = 0; r < 2; r++) resnet_free(&e->mid.res[r]);
    attn_free(&e->mid.attn);
    param_free(&e->in_w); param_free(&e->in_b);
    param_free(&e->norm_w); param_free(&e->norm_b);
    param_free(&e->out_w); param_free(&e->out_b);
}

void vae_free(sd_vae *v) {
    if (!v) return;
    free_coder(&v->enc);
    free_coder(&v->dec);
    param_free(&v->quant_w); param_free(&v->quant_b);
    param_free(&v->post_w); param_free(&v->post_b);
    free(v);
}

/* The weights file and config of PATH: a diffusers folder (diffusion_pytorch_model
 * .safetensors + config.json), a diffusers file (config.json next to it, if any), or an
 * LDM file (SD1.5's config unless --config says otherwise). */
sd_vae *vae_load(const char *path, const char *config_path, const sd_policy *pol) {
    static const char *const weight_names[] = { "diffusion_pytorch_model.safetensors",
                                                "diffusion_pytorch_model.fp16.safetensors" };
    char *file, *near_cfg, *config = config_path ? sd_strdup(config_path) : NULL;
    int is_dir = sd_model_paths(path, weight_names, 2, &file, &near_cfg);
    layout_info li;
    sd_vae *v = NULL;
    sd_loader l;
    memset(&l, 0, sizeof l);
    if (detect_layout(file, &li) != 0) goto fail;
    if (!config && li.layout == LAYOUT_DIFFUSERS) {           /* the folder's config.json */
        config = near_cfg;
        near_cfg = NULL;
        if (!config && is_dir) {
            sd_error("%s: no config.json in the folder (pass --config)", path);
            goto fail;
        }
    }
    v = sd_calloc(1, sizeof *v);
    if (config) {
        if (config_read(config, &v->cfg) != 0) goto fail;
    } else {
        config_sd15(&v->cfg);
    }
    if (li.layout == LAYOUT_LDM && li.n_up > 0 && li.n_up != v->cfg.n_blocks) {
        sd_error("%s: the file has %d decoder levels, the config %d", file, li.n_up, v->cfg.n_blocks);
        goto fail;
    }
    if (loader_open(&l, file, li.layout == LAYOUT_LDM ? rename_ldm : rename_diffusers, &li, pol) != 0) goto fail;
    const vae_config *c = &v->cfg;
    int L2 = 2 * c->latent_channels;
    if (load_encoder(&l, &v->enc, c) || load_decoder(&l, &v->dec, c) ||
        (c->use_quant_conv && load_conv(&l, &v->quant_w, &v->quant_b, "quant_conv", L2, L2, 1)) ||
        (c->use_post_quant_conv &&
         load_conv(&l, &v->post_w, &v->post_b, "post_quant_conv", c->latent_channels, c->latent_channels, 1))) {
        if (!config) {                                       /* say which config the shapes were checked against */
            char msg[1024];
            snprintf(msg, sizeof msg, "%s", sd_last_error());
            sd_clear_error();
            sd_error("%s (no config given: SD1.5's VAE assumed; pass --config)", msg);
        }
        goto fail;
    }
    loader_close(&l);
    free(file);
    free(near_cfg);
    free(config);
    return v;
fail:
    if (l.st) loader_close(&l);
    vae_free(v);
    free(file);
    free(near_cfg);
    free(config);
    return NULL;
}

float vae_scaling_factor(const sd_vae *v) { return v->cfg.scaling_factor; }
int vae_latent_channels(const sd_vae *v) { return v->cfg.latent_channels; }

/* ======================================================================================
 * 4. Forward passes. Each module's output is traced under its diffusers path; a module
 * whose output is its last child's (an up block, the mid block) is traced under both names,
 * as diffusers' forward hooks see it.
 * ====================================================================================== */

static const int PAD0[4] = { 0, 0, 0, 0 }, PAD1[4] = { 1, 1, 1, 1 };

/* Replace *x by y, freeing the old tensor (each activation freed once it is read). */
static void replace(sd_tensor *x, sd_tensor y) {
    tensor_free(x);
    *x = y;
}

static void conv_step(const sd_ctx *c, sd_tensor *x, const sd_param *w, const sd_param *b, int stride,
                      const int pad[4], const char *name) {
    replace(x, op_conv2d(c, x, w, b, stride, pad));
    sd_trace_tensor(c, name, x);
}

/* conv_norm_out, SiLU (conv_act), conv_out: the tail of the encoder and the decoder. */
static void coder_tail(const sd_ctx *c, const vae_config *cfg, const vae_coder *e, sd_tensor *x, const char *coder) {
    char name[256];
    replace(x, op_group_norm(c, x, cfg->groups, VAE_EPS, &e->norm_w, &e->norm_b));
    snprintf(name, sizeof name, "%s.conv_norm_out", coder);
    sd_trace_tensor(c, name, x);
    replace(x, op_silu(c, x));
    snprintf(name, sizeof name, "%s.conv_act", coder);
    sd_trace_tensor(c, name, x);
    snprintf(name, sizeof name, "%s.conv_out", coder);
    conv_step(c, x, &e->out_w, &e->out_b, 1, PAD1, name);
    sd_trace_tensor(c, coder, x);
}

/* UNetMidBlock2D: resnet, attention (group norm, one head, + residual), resnet. */
static void mid_forward(const sd_ctx *c, const vae_mid *m, sd_tensor *x, const char *coder) {
    char name[256];
    snprintf(name, sizeof name, "%s.mid_block.resnets.0", coder);
    replace(x, resnet_forward(c, &m->res[0], x, NULL, name));
    if (m->has_attn) {
        snprintf(name, sizeof name, "%s.mid_block.attentions.0", coder);
        replace(x, attn_forward(c, &m->attn, x, NULL, NULL, name));
    }
    snprintf(name, sizeof name, "%s.mid_block.resnets.1", coder);
    replace(x, resnet_forward(c, &m->res[1], x, NULL, name));
    snprintf(name, sizeof name, "%s.mid_block", coder);
    sd_trace_tensor(c, name, x);
}

static void run_resnets(const sd_ctx *c, const vae_level *lv, sd_tensor *x, const char *block) {
    char name[256];
    for (int r = 0; r < lv->n_res; r++) {
        snprintf(name, sizeof name, "%s.resnets.%d", block, r);
        replace(x, resnet_forward(c, &lv->res[r], x, NULL, name));
    }
}

sd_tensor vae_decode(const sd_vae *v, const sd_ctx *c, const sd_tensor *latent) {
    const vae_config *cfg = &v->cfg;
    if (latent->ndim != 4 || latent->shape[1] != cfg->latent_channels)
        sd_fatal("vae_decode: latent must be [N,%d,h,w]", cfg->latent_channels);
    char name[256];
    sd_tensor x = tensor_copy(latent);
    op_round_storage(c, &x);                                 /* the model input in the storage format */
    if (v->post_w.data) conv_step(c, &x, &v->post_w, &v->post_b, 1, PAD0, "post_quant_conv");
    const vae_coder *d = &v->dec;
    conv_step(c, &x, &d->in_w, &d->in_b, 1, PAD1, "decoder.conv_in");
    mid_forward(c, &d->mid, &x, "decoder");
    for (int i = 0; i < d->n_levels; i++) {
        const vae_level *lv = &d->levels[i];
        char block[128];
        snprintf(block, sizeof block, "decoder.up_blocks.%d", i);
        run_resnets(c, lv, &x, block);
        if (lv->has_sampler) {                               /* Upsample2D: nearest 2x, then 3x3 conv */
            replace(&x, op_upsample_nearest2x(c, &x));
            snprintf(name, sizeof name, "%s.upsamplers.0.conv", block);
            conv_step(c, &x, &lv->sampler_w, &lv->sampler_b, 1, PAD1, name);
            snprintf(name, sizeof name, "%s.upsamplers.0", block);
            sd_trace_tensor(c, name, &x);
        }
        sd_trace_tensor(c, block, &x);
    }
    coder_tail(c, cfg, d, &x, "decoder");
    return x;
}

void vae_encode(const sd_vae *v, const sd_ctx *c, const sd_tensor *image, sd_tensor *mean, sd_tensor *logvar) {
    static const int pad_down[4] = { 0, 1, 0, 1 };           /* F.pad(x, (0, 1, 0, 1)): bottom and right */
    const vae_config *cfg = &v->cfg;
    if (image->ndim != 4 || image->shape[1] != cfg->in_channels)
        sd_fatal("vae_encode: image must be [N,%d,H,W]", cfg->in_channels);
    char name[256];
    sd_tensor x = tensor_copy(image);
    op_round_storage(c, &x);
    const vae_coder *e = &v->enc;
    conv_step(c, &x, &e->in_w, &e->in_b, 1, PAD1, "encoder.conv_in");
    for (int i = 0; i < e->n_levels; i++) {
        const vae_level *lv = &e->levels[i];
        char block[128];
        snprintf(block, sizeof block, "encoder.down_blocks.%d", i);
        run_resnets(c, lv, &x, block);
        if (lv->has_sampler) {                               /* Downsample2D: pad (0,1,0,1), 3x3 stride 2, no padding */
            if (x.shape[2] < 2 || x.shape[3] < 2) sd_fatal("vae_encode: image too small for %d levels", e->n_levels);
            snprintf(name, sizeof name, "%s.downsamplers.0.conv", block);
            conv_step(c, &x, &lv->sampler_w, &lv->sampler_b, 2, pad_down, name);
            snprintf(name, sizeof name, "%s.downsamplers.0", block);
            sd_trace_tensor(c, name, &x);
        }
        sd_trace_tensor(c, block, &x);
    }
    mid_forward(c, &e->mid, &x, "encoder");
    coder_tail(c, cfg, e, &x, "encoder");
    if (v->quant_w.data) conv_step(c, &x, &v->quant_w, &v->quant_b, 1, PAD0, "quant_conv");
    /* DiagonalGaussianDistribution: channel halves = mean, logvar; logvar clamped to [-30, 20] */
    int N = x.shape[0], L = cfg->latent_channels, h = x.shape[2], w = x.shape[3];
    size_t plane = (size_t)L * h * w;
    *mean = tensor_new(4, N, L, h, w);
    *logvar = tensor_new(4, N, L, h, w);
    for (int n = 0; n < N; n++) {
        const float *src = x.data + (size_t)n * 2 * plane;
        memcpy(mean->data + (size_t)n * plane, src, plane * sizeof(float));
        for (size_t i = 0; i < plane; i++) {
            float lv = src[plane + i];
            logvar->data[(size_t)n * plane + i] = lv < -30.0f ? -30.0f : lv > 20.0f ? 20.0f : lv;   /* NaN stays NaN */
        }
    }
    tensor_free(&x);
}

/* The smallest image side the encoder takes: every downsampler needs 2 rows after padding. */
static int encoder_fits(const sd_vae *v, int H, int W) {
    for (int i = 0; i + 1 < v->cfg.n_blocks; i++) {
        if (H < 2 || W < 2) return 0;
        H = (H - 2) / 2 + 1;
        W = (W - 2) / 2 + 1;
    }
    return 1;
}

/* ======================================================================================
 * 5. Commands
 * ====================================================================================== */

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    if (n < k) return 0;
    for (size_t i = 0; i < k; i++) {
        char a = s[n - k + i];
        if (a >= 'A' && a <= 'Z') a = (char)(a - 'A' + 'a');
        if (a != suffix[i]) return 0;
    }
    return 1;
}

/* An NCHW float tensor from .npy: [N,C,H,W], or [C,H,W] taken as batch 1. */
static int read_nchw(const char *path, int channels, sd_tensor *t) {
    float *data;
    int ndim;
    int64_t shape[8];
    size_t n;
    if (npy_read_f32(path, &data, &ndim, shape, &n) != 0) return -1;
    if (ndim == 3) {
        memmove(shape + 1, shape, 3 * sizeof shape[0]);
        shape[0] = 1;
        ndim = 4;
    }
    int ok = ndim == 4 && shape[1] == channels;
    for (int d = 0; ok && d < 4; d++) ok = shape[d] >= 1 && shape[d] <= (1 << 20);
    if (!ok) {
        sd_error("%s: expected a float array of shape [N,%d,H,W], got %d dimensions", path, channels, ndim);
        free(data);
        return -1;
    }
    t->ndim = 4;
    for (int d = 0; d < 4; d++) t->shape[d] = (int)shape[d];
    t->data = data;
    return 0;
}

/* Image [-1,1] -> 8-bit RGB as diffusers' image processor: (x/2 + 0.5).clamp(0, 1), then
 * numpy's (x * 255).round() (half to even), all in float32. NaN becomes 0. */
static uint8_t pixel_from_unit(float x) {
    float v = x / 2.0f + 0.5f;
    if (!(v > 0.0f)) v = 0.0f;                                /* also NaN */
    if (v > 1.0f) v = 1.0f;
    v *= 255.0f;
    float f = (float)(int)v, frac = v - f;                   /* v in [0, 255]: truncation = floor */
    int r = (int)f;
    if (frac > 0.5f || (frac == 0.5f && (r & 1))) r++;
    return (uint8_t)r;
}

static int write_png_image(const char *path, const sd_tensor *img) {
    int C = img->shape[1], H = img->shape[2], W = img->shape[3];
    if (img->shape[0] != 1 || (C != 3 && C != 1)) {
        sd_error("%s: a PNG holds one RGB image; this output is [%d,%d,%d,%d] (write .npy instead)", path,
                 img->shape[0], C, H, W);
        return -1;
    }
    uint8_t *rgb = sd_malloc((size_t)H * W * 3);
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++)
            for (int ch = 0; ch < 3; ch++)
                rgb[((size_t)y * W + x) * 3 + ch] = pixel_from_unit(img->data[((size_t)(C == 3 ? ch : 0) * H + y) * W + x]);
    int rc = png_write_file(path, W, H, 3, rgb, 0, NULL, NULL);
    free(rgb);
    return rc;
}

/* PNG -> [1,3,H,W] in [-1,1] as diffusers: RGB (alpha dropped, as PIL's convert("RGB")),
 * x / 255 then 2x - 1 in float32. 16-bit files: the high byte, as PIL reads 16-bit RGB. */
static int read_png_image(const char *path, sd_tensor *t) {
    sd_image im;
    if (png_read_file(path, &im) != 0) return -1;
    *t = tensor_new(4, 1, 3, im.height, im.width);
    size_t HW = (size_t)im.height * im.width;
    for (size_t p = 0; p < HW; p++)
        for (int ch = 0; ch < 3; ch++) {
            int px = im.depth == 16 ? ((const uint16_t *)im.pixels)[p * 4 + ch] >> 8 : ((const uint8_t *)im.pixels)[p * 4 + ch];
            float v = (float)px / 255.0f;
            t->data[(size_t)ch * HW + p] = 2.0f * v - 1.0f;
        }
    sd_image_free(&im);
    return 0;
}

/* The options both commands share, parsed and checked before any work is done. */
typedef struct vae_cmd {
    sd_args args;
    const char *model, *config, *input, *out, *trace_path;
    sd_precision prec;
    int threads;
    sd_trace trace;
    sd_ctx ctx;
    sd_vae *vae;
} vae_cmd;

static int cmd_begin(vae_cmd *k, int argc, char **argv, const char *input_flag) {
    memset(k, 0, sizeof *k);
    args_init(&k->args, argc, argv);
    k->model = args_value(&k->args, "--model");
    k->config = args_value(&k->args, "--config");
    k->input = args_value(&k->args, input_flag);
    k->out = args_value(&k->args, "-o");
    k->trace_path = args_value(&k->args, "--trace");
    if (args_trace_options(&k->args, k->trace_path, &k->trace)) return -1;
    if (args_precision(&k->args, &k->prec) || args_threads(&k->args, &k->threads)) return -1;
    return 0;
}

/* After the command's own options: every argument known, inputs and outputs named. */
static int cmd_check(vae_cmd *k, const char *input_flag) {
    if (args_check_all_used(&k->args)) return -1;
    if (!k->model || !k->input || !k->out) {
        sd_error("needs --model PATH, %s FILE and -o FILE", input_flag);
        return -1;
    }
    if (k->trace_path && !ends_with(k->trace_path, ".safetensors")) {
        sd_error("--trace %s: the trace is written as .safetensors", k->trace_path);
        return -1;
    }
    return 0;
}

/* Load the model under the VAE's policy and set up the context (tracing when asked). */
static int cmd_load(vae_cmd *k) {
    const sd_policy *pol = &k->prec.model[SD_VAE];
    k->vae = vae_load(k->model, k->config, pol);
    if (!k->vae) return -1;
    k->ctx.pol = *pol;
    k->ctx.prefix = "vae";
    k->ctx.threads = k->threads;
    if (k->trace_path) k->ctx.trace = &k->trace;
    return 0;
}

static int cmd_end(vae_cmd *k, int rc) {
    if (rc == 0 && k->trace_path) rc = sd_trace_write(&k->trace, k->trace_path);
    sd_trace_free(&k->trace);
    vae_free(k->vae);
    free(k->args.used);
    return rc;
}

int vae_decode_run(void *arg, const sd_precision *prec, sd_trace *trace) {
    const sd_vae_decode_job *r = arg;
    sd_vae *v = vae_load(r->model, r->config, &prec->model[SD_VAE]);
    if (!v) return -1;
    sd_ctx c;
    memset(&c, 0, sizeof c);
    c.pol = prec->model[SD_VAE];
    c.trace = trace;
    c.prefix = "vae";
    c.threads = r->threads;
    sd_tensor img = vae_decode(v, &c, r->z);
    tensor_free(&img);
    vae_free(v);
    return 0;
}

static int has_nonfinite(const sd_tensor *t) {
    for (size_t i = 0; i < tensor_numel(t); i++)
        if (t->data[i] != t->data[i] || t->data[i] - t->data[i] != 0) return 1;
    return 0;
}

int cmd_vae_decode(int argc, char **argv) {
    vae_cmd k;
    sd_tensor z = { 0, { 0, 0, 0, 0 }, NULL }, img = z;
    int rc = -1;
    sd_precision ref, fallback;
    const char *report = NULL, *fallback_spec = NULL;
    int nan_check = 0, shadow = 0;
    if (cmd_begin(&k, argc, argv, "--latent") != 0) goto done;
    int scaled = args_flag(&k.args, "--scaled");
    shadow = args_shadow(&k.args, &ref, &report, &nan_check);
    fallback_spec = args_value(&k.args, "--nan-fallback");
    if (shadow < 0 || (fallback_spec && sd_precision_parse(fallback_spec, &fallback))) goto done;
    if (cmd_check(&k, "--latent") != 0) goto done;
    int png = ends_with(k.out, ".png");
    if (!png && !ends_with(k.out, ".npy")) { sd_error("-o %s: the output must be .npy or .png", k.out); goto done; }
    if (cmd_load(&k) != 0) goto done;
    if (read_nchw(k.input, vae_latent_channels(k.vae), &z) != 0) goto done;
    if (scaled) {                                            /* the pipeline's latents / scaling_factor (+ shift) */
        size_t n = tensor_numel(&z);
        for (size_t i = 0; i < n; i++) z.data[i] = z.data[i] / k.vae->cfg.scaling_factor + k.vae->cfg.shift_factor;
    }
    sd_trace check;                                          /* --nan-check: statistics only, stop at the first Inf/NaN */
    memset(&check, 0, sizeof check);
    check.nan_check = 1;
    if (nan_check && !k.ctx.trace) k.ctx.trace = &check;
    else if (nan_check) k.trace.nan_check = 1;
    img = vae_decode(k.vae, &k.ctx, &z);
    sd_trace_free(&check);
    if (k.ctx.trace == &check) k.ctx.trace = NULL;
    if (fallback_spec && has_nonfinite(&img)) {              /* A1111's "revert the VAE to 32-bit" */
        fprintf(stderr, "sdref vae-decode: the decoded image has Inf/NaN with %s storage; decoding again under %s "
                        "(--nan-fallback)\n", sd_format_name(k.prec.model[SD_VAE].storage), fallback_spec);
        sd_vae *v2 = vae_load(k.model, k.config, &fallback.model[SD_VAE]);
        if (!v2) goto done;
        sd_ctx c2 = k.ctx;
        c2.pol = fallback.model[SD_VAE];
        c2.trace = NULL;
        tensor_free(&img);
        img = vae_decode(v2, &c2, &z);
        vae_free(v2);
    }
    if (shadow) {                                            /* the chosen policy against the reference, layer by layer */
        sd_vae_decode_job r = { k.model, k.config, &z, k.threads };
        sd_shadow_result s;
        if (sd_shadow_run(vae_decode_run, &r, &k.prec, &ref, sd_format_max(k.prec.model[SD_VAE].storage), &s)) goto done;
        sd_shadow_print(&s, stderr);
        int wrc = report ? sd_shadow_write_report(&s, report) : 0;
        sd_shadow_free(&s);
        if (wrc) goto done;
    }
    rc = png ? write_png_image(k.out, &img) : npy_write_tensor(k.out, &img);
done:
    tensor_free(&z);
    tensor_free(&img);
    return cmd_end(&k, rc);
}

int cmd_vae_encode(int argc, char **argv) {
    vae_cmd k;
    sd_tensor x = { 0, { 0, 0, 0, 0 }, NULL }, mean = x, logvar = x;
    int rc = -1;
    if (cmd_begin(&k, argc, argv, "--image") != 0) goto done;
    const char *logvar_path = args_value(&k.args, "--logvar");
    if (cmd_check(&k, "--image") != 0) goto done;
    if (!ends_with(k.out, ".npy") || (logvar_path && !ends_with(logvar_path, ".npy"))) {
        sd_error("the outputs (-o, --logvar) must be .npy files");
        goto done;
    }
    if (cmd_load(&k) != 0) goto done;
    if (ends_with(k.input, ".png")) {
        if (k.vae->cfg.in_channels != 3) { sd_error("%s: this VAE takes %d channels, a PNG gives 3", k.input, k.vae->cfg.in_channels); goto done; }
        if (read_png_image(k.input, &x) != 0) goto done;
    } else if (read_nchw(k.input, k.vae->cfg.in_channels, &x) != 0) {
        goto done;
    }
    if (!encoder_fits(k.vae, x.shape[2], x.shape[3])) {
        sd_error("%s: a %dx%d image is too small for the encoder's %d levels", k.input, x.shape[3], x.shape[2],
                 k.vae->cfg.n_blocks);
        goto done;
    }
    vae_encode(k.vae, &k.ctx, &x, &mean, &logvar);
    rc = npy_write_tensor(k.out, &mean);
    if (rc == 0 && logvar_path) rc = npy_write_tensor(logvar_path, &logvar);
done:
    tensor_free(&x);
    tensor_free(&mean);
    tensor_free(&logvar);
    return cmd_end(&k, rc);
}
