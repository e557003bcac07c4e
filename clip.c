/* clip.c — CLIP text encoder (transformers CLIPTextModel), CLIP vision encoder
 * (CLIPVisionModelWithProjection, the IP-Adapter image encoder) and CLIP image preprocessing
 * (CLIPImageProcessor with Pillow's bicubic resize, bit for bit).
 *
 * Reads top to bottom:
 *   1. configuration: config.json (or a full CLIPConfig's text_config / vision_config), defaults
 *   2. the encoder layer both towers share: pre-norm self-attention and MLP
 *   3. the text encoder: layouts (transformers, LDM single file), load, forward, clip skip
 *   4. the vision encoder: load, forward (image_embeds and hidden states)
 *   5. preprocessing: convert to RGB, Pillow bicubic resize, centre crop, rescale, normalize
 *   6. the commands clip-text, clip-vision, preprocess
 *
 * Rounding points (DESIGN.md): every op_* result is rounded once to the policy's storage format.
 * transformers multiplies q by head_dim^-0.5 BEFORE q.k^T (q = q_proj(x) * scale, its own op),
 * so that product is a separate op_scale here and op_attention runs with scale 1 (exact).
 * The causal mask: transformers adds float32's lowest value to masked logits, op_attention sets
 * them to that value; both give exp(...) = 0 after the row maximum is subtracted, so softmax is
 * the same (the diagonal is never masked, so no row is all-masked).
 */
#include "sdref.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ======================================================================================
 * 1. Configuration
 * ====================================================================================== */

typedef enum clip_act { ACT_QUICK_GELU, ACT_GELU, ACT_GELU_TANH } clip_act;

/* The sizes of one transformer tower. */
typedef struct clip_cfg {
    int width, ffn, heads, layers;
    float eps;
    clip_act act;
    float attn_scale;       /* head_dim^-0.5 as transformers computes it, rounded to float */
} clip_cfg;

static int parse_act(const char *s, clip_act *out, const char *what) {
    if (!strcmp(s, "quick_gelu")) *out = ACT_QUICK_GELU;
    else if (!strcmp(s, "gelu")) *out = ACT_GELU;
    else if (!strcmp(s, "gelu_new") || !strcmp(s, "gelu_pytorch_tanh") || !strcmp(s, "gelu_fast")) *out = ACT_GELU_TANH;
    else {
        sd_error("%s: hidden_act '%s' is not supported (quick_gelu, gelu, gelu_new, gelu_pytorch_tanh)", what, s);
        return -1;
    }
    return 0;
}

static int cfg_check(clip_cfg *c, const char *what) {
    if (c->width <= 0 || c->width > 65536 || c->heads <= 0 || c->width % c->heads || c->layers <= 0 ||
        c->layers > 1024 || c->ffn <= 0 || c->ffn > 1 << 20 || !(c->eps > 0.0f && c->eps < 1.0f)) {
        sd_error("%s: implausible sizes (hidden_size %d, num_attention_heads %d, num_hidden_layers %d, "
                 "intermediate_size %d, layer_norm_eps %g)", what, c->width, c->heads, c->layers, c->ffn, (double)c->eps);
        return -1;
    }
    c->attn_scale = (float)(1.0 / sqrt((double)(c->width / c->heads)));
    return 0;
}

/* Read a tower's sizes from a config object, with transformers' defaults for absent keys. */
static int cfg_from_json(const sd_json *o, int vision, clip_cfg *c, const char *what) {
    c->width = json_int(o, "hidden_size", vision ? 768 : 512);
    c->ffn = json_int(o, "intermediate_size", vision ? 3072 : 2048);
    c->heads = json_int(o, "num_attention_heads", vision ? 12 : 8);
    c->layers = json_int(o, "num_hidden_layers", 12);
    c->eps = (float)json_num(o, "layer_norm_eps", 1e-5);
    if (parse_act(json_str(o, "hidden_act", "quick_gelu"), &c->act, what)) return -1;
    return cfg_check(c, what);
}

/* Open a config file and pick the tower's object: the file itself (model_type clip_text_model
 * / clip_vision_model) or a full CLIPConfig's text_config / vision_config. strict: refuse a
 * config of another kind (an explicit --config); else return 1 for "not ours" (a config.json
 * found next to the weights that belongs to something else). */
static int cfg_open(const char *path, int vision, int strict, sd_json *root, const sd_json **obj) {
    if (json_parse_file(path, root)) return -1;
    if (root->type != JSON_OBJECT) {
        json_free(root);
        sd_error("%s: not a JSON object", path);
        return -1;
    }
    const char *mt = json_str(root, "model_type", "");
    const sd_json *sub = json_get(root, vision ? "vision_config" : "text_config");
    const char *want = vision ? "clip_vision_model" : "clip_text_model";
    const char *other = vision ? "clip_text_model" : "clip_vision_model";
    if (sub && sub->type == JSON_OBJECT) *obj = sub;
    else if (!strcmp(mt, other) || (!strict && strcmp(mt, want) != 0)) {
        if (strict) sd_error("%s: model_type '%s' is not a CLIP %s encoder config", path, mt, vision ? "vision" : "text");
        json_free(root);
        return strict ? -1 : 1;
    } else *obj = root;
    return 0;
}

static int ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

/* Where the weights and the config are: PATH may be a folder (model.safetensors + config.json,
 * as in diffusers' text_encoder/ and h94's models/image_encoder/) or a file, whose sibling
 * config.json is consulted when no config is given. *sibling says the config was guessed. */
static void resolve_paths(const char *path, const char *config_path, char **file, char **cfg, int *sibling) {
    static const char *const names[] = { "model.safetensors", "model.fp16.safetensors" };
    char *near;
    int folder = sd_model_paths(path, names, 2, file, &near);
    *sibling = 0;
    if (config_path) {
        *cfg = sd_strdup(config_path);
        free(near);
    } else if (folder) {
        *cfg = near ? near : sd_path_join(path, "config.json");   /* a folder must have its config.json */
    } else {
        *cfg = near;                                            /* a file: the config.json beside it, if any */
        *sibling = near != NULL;
    }
}

/* ======================================================================================
 * 2. The encoder layer: x + out_proj(attn(ln1(x))), then x + fc2(act(fc1(ln2(x))))
 * ====================================================================================== */

typedef struct clip_layer {
    sd_param ln1_w, ln1_b, q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b, ln2_w, ln2_b, fc1_w, fc1_b, fc2_w, fc2_b;
} clip_layer;

static int layer_load(sd_loader *l, clip_layer *L, const clip_cfg *c, const char *prefix) {
    char b[256];
    int W = c->width;
    memset(L, 0, sizeof *L);
#define LOAD_LIN(w, bias, leaf, out, in) \
    (snprintf(b, sizeof b, "%s.%s", prefix, leaf), load_linear(l, &L->w, &L->bias, b, out, in, 1))
#define LOAD_NORM(w, bias, leaf) (snprintf(b, sizeof b, "%s.%s", prefix, leaf), load_norm(l, &L->w, &L->bias, b, W))
    if (LOAD_NORM(ln1_w, ln1_b, "layer_norm1") || LOAD_LIN(q_w, q_b, "self_attn.q_proj", W, W) ||
        LOAD_LIN(k_w, k_b, "self_attn.k_proj", W, W) || LOAD_LIN(v_w, v_b, "self_attn.v_proj", W, W) ||
        LOAD_LIN(o_w, o_b, "self_attn.out_proj", W, W) || LOAD_NORM(ln2_w, ln2_b, "layer_norm2") ||
        LOAD_LIN(fc1_w, fc1_b, "mlp.fc1", c->ffn, W) || LOAD_LIN(fc2_w, fc2_b, "mlp.fc2", W, c->ffn))
        return -1;
#undef LOAD_LIN
#undef LOAD_NORM
    return 0;
}

static void layer_free(clip_layer *L) {
    sd_param *p[] = { &L->ln1_w, &L->ln1_b, &L->q_w, &L->q_b, &L->k_w, &L->k_b, &L->v_w, &L->v_b,
                      &L->o_w, &L->o_b, &L->ln2_w, &L->ln2_b, &L->fc1_w, &L->fc1_b, &L->fc2_w, &L->fc2_b };
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) param_free(p[i]);
}

static int layers_load(sd_loader *l, clip_layer **out, const clip_cfg *c, const char *prefix) {
    *out = sd_calloc((size_t)c->layers, sizeof **out);
    for (int i = 0; i < c->layers; i++) {
        char b[200];
        snprintf(b, sizeof b, "%s.%d", prefix, i);
        if (layer_load(l, &(*out)[i], c, b)) return -1;
    }
    return 0;
}

static void layers_free(clip_layer *L, int n) {
    if (!L) return;
    for (int i = 0; i < n; i++) layer_free(&L[i]);
    free(L);
}

/* Replace *x by y, freeing the old tensor. */
static void replace(sd_tensor *x, sd_tensor y) {
    tensor_free(x);
    *x = y;
}

static sd_tensor activation(const sd_ctx *c, clip_act act, const sd_tensor *x) {
    if (act == ACT_QUICK_GELU) return op_quick_gelu(c, x);
    if (act == ACT_GELU_TANH) return op_gelu_tanh(c, x);
    return op_gelu(c, x);
}

/* One CLIPEncoderLayer on tokens x [B,T,W]; traced under transformers' module names. */
static sd_tensor layer_forward(const sd_ctx *c, const clip_cfg *cfg, const clip_layer *L, const sd_tensor *x,
                               int causal, const char *name) {
    sd_tensor h = op_layer_norm(c, x, cfg->eps, &L->ln1_w, &L->ln1_b);
    sd_trace_sub(c, name, "layer_norm1", &h);
    sd_tensor q = op_linear(c, &h, &L->q_w, &L->q_b);
    sd_trace_sub(c, name, "self_attn.q_proj", &q);
    replace(&q, op_scale(c, &q, cfg->attn_scale));           /* transformers: q_proj(x) * scale */
    sd_tensor k = op_linear(c, &h, &L->k_w, &L->k_b);
    sd_trace_sub(c, name, "self_attn.k_proj", &k);
    sd_tensor v = op_linear(c, &h, &L->v_w, &L->v_b);
    sd_trace_sub(c, name, "self_attn.v_proj", &v);
    tensor_free(&h);
    sd_tensor a = op_attention(c, &q, &k, &v, cfg->heads, 1.0f, causal);   /* q already scaled */
    tensor_free(&q);
    tensor_free(&k);
    tensor_free(&v);
    replace(&a, op_linear(c, &a, &L->o_w, &L->o_b));
    sd_trace_sub(c, name, "self_attn.out_proj", &a);
    sd_tensor r = op_add(c, x, &a);                           /* residual + attention */
    tensor_free(&a);
    h = op_layer_norm(c, &r, cfg->eps, &L->ln2_w, &L->ln2_b);
    sd_trace_sub(c, name, "layer_norm2", &h);
    replace(&h, op_linear(c, &h, &L->fc1_w, &L->fc1_b));
    sd_trace_sub(c, name, "mlp.fc1", &h);
    replace(&h, activation(c, cfg->act, &h));
    sd_trace_sub(c, name, "mlp.activation_fn", &h);
    replace(&h, op_linear(c, &h, &L->fc2_w, &L->fc2_b));
    sd_trace_sub(c, name, "mlp.fc2", &h);
    sd_tensor out = op_add(c, &r, &h);                        /* residual + MLP */
    tensor_free(&r);
    tensor_free(&h);
    sd_trace_sub(c, name, NULL, &out);
    return out;
}

/* After loading: a tensor of the model's namespace that nothing asked for means the config
 * and the file disagree (e.g. more layers in the file than num_hidden_layers). */
static int check_unused(const sd_loader *l, const char *const *namespaces, int n_ns) {
    for (int i = 0; i < l->n; i++) {
        if (!l->names[i] || l->used[i]) continue;
        for (int k = 0; k < n_ns; k++)
            if (!strncmp(l->names[i], namespaces[k], strlen(namespaces[k]))) {
                sd_error("%s: unexpected tensor '%s' (does the config match this file?)", l->path, l->st->entries[i].name);
                return -1;
            }
    }
    return 0;
}

static sd_tensor no_tensor(void) {
    sd_tensor t;
    memset(&t, 0, sizeof t);
    return t;
}

/* ======================================================================================
 * 3. Text encoder
 * ====================================================================================== */

struct sd_clip_text {
    clip_cfg cfg;
    int vocab, max_pos;
    sd_param tok_emb, pos_emb, final_w, final_b;
    clip_layer *layers;
};

/* File keys -> transformers names (text_model.*). Layouts: transformers CLIPTextModel,
 * LDM single file (cond_stage_model.transformer.text_model.*), and old LDM files saved with
 * transformers < 4.x (cond_stage_model.transformer.{embeddings,encoder,final_layer_norm}.*).
 * position_ids buffers are ignored: positions are 0..T-1. */
static int text_rename(const char *key, char *out, size_t n, void *user) {
    static const char *const ldm = "cond_stage_model.transformer.";
    (void)user;
    if (ends_with(key, "embeddings.position_ids")) return 0;
    const char *rest = NULL;
    if (!strncmp(key, "text_model.", 11)) rest = key + 11;
    else if (!strncmp(key, ldm, strlen(ldm))) {
        rest = key + strlen(ldm);
        if (!strncmp(rest, "text_model.", 11)) rest += 11;
    }
    if (!rest) return 0;
    snprintf(out, n, "text_model.%s", rest);
    return 1;
}

/* SD1.5's text encoder (CLIP ViT-L/14 text tower, shared/spec/sd15_text_encoder_config.json):
 * assumed for single-file checkpoints given without a config. */
static void sd15_text_cfg(clip_cfg *c, int *vocab, int *max_pos) {
    c->width = 768; c->ffn = 3072; c->heads = 12; c->layers = 12; c->eps = 1e-5f; c->act = ACT_QUICK_GELU;
    *vocab = 49408;
    *max_pos = 77;
    cfg_check(c, "sd15");
}

sd_clip_text *clip_text_load(const char *path, const char *config_path, const sd_policy *pol) {
    char *file = NULL, *cfgp = NULL;
    int sibling;
    resolve_paths(path, config_path, &file, &cfgp, &sibling);
    sd_clip_text *m = sd_calloc(1, sizeof *m);
    sd_loader l;
    int loaded = 0, ok = 0;
    if (loader_open(&l, file, text_rename, NULL, pol)) goto done;
    loaded = 1;
    if (!loader_has(&l, "text_model.embeddings.token_embedding.weight")) {
        if (st_find(l.st, "cond_stage_model.model.token_embedding.weight"))
            sd_error("%s: OpenCLIP text encoder (SD2.x, cond_stage_model.model.*) is not supported", file);
        else
            sd_error("%s: no CLIP text encoder here (expected text_model.* or cond_stage_model.transformer.text_model.*)", file);
        goto done;
    }
    int ldm = st_find(l.st, "text_model.embeddings.token_embedding.weight") == NULL;
    sd_json root;
    const sd_json *obj = NULL;
    int rc = 1;
    if (cfgp && (!ldm || !sibling)) rc = cfg_open(cfgp, 0, !sibling, &root, &obj);
    if (rc < 0) goto done;
    if (rc == 0) {
        int bad = cfg_from_json(obj, 0, &m->cfg, cfgp);
        m->vocab = json_int(obj, "vocab_size", 49408);
        m->max_pos = json_int(obj, "max_position_embeddings", 77);
        json_free(&root);
        if (bad) goto done;
        if (m->vocab <= 0 || m->max_pos <= 0 || m->max_pos > 65536) {
            sd_error("%s: implausible vocab_size %d / max_position_embeddings %d", cfgp, m->vocab, m->max_pos);
            goto done;
        }
    } else if (ldm) {
        sd15_text_cfg(&m->cfg, &m->vocab, &m->max_pos);
        int64_t s[8];
        if (loader_shape(&l, "text_model.embeddings.token_embedding.weight", s) != 2 || s[0] != m->vocab || s[1] != m->cfg.width) {
            sd_error("%s: the text encoder is not SD1.x's (token embedding is not [49408,768]); pass --config", file);
            goto done;
        }
    } else {
        sd_error("%s: no config.json next to the weights; pass --config", file);
        goto done;
    }
    int ws[2] = { m->vocab, m->cfg.width }, ps[2] = { m->max_pos, m->cfg.width };
    if (loader_param(&l, &m->tok_emb, "text_model.embeddings.token_embedding.weight", 2, ws) ||
        loader_param(&l, &m->pos_emb, "text_model.embeddings.position_embedding.weight", 2, ps) ||
        layers_load(&l, &m->layers, &m->cfg, "text_model.encoder.layers") ||
        load_norm(&l, &m->final_w, &m->final_b, "text_model.final_layer_norm", m->cfg.width))
        goto done;
    static const char *const ns[] = { "text_model." };
    if (check_unused(&l, ns, 1)) goto done;
    ok = 1;
done:
    if (loaded) loader_close(&l);
    free(file);
    free(cfgp);
    if (!ok) {
        clip_text_free(m);
        return NULL;
    }
    return m;
}

void clip_text_free(sd_clip_text *m) {
    if (!m) return;
    param_free(&m->tok_emb);
    param_free(&m->pos_emb);
    param_free(&m->final_w);
    param_free(&m->final_b);
    layers_free(m->layers, m->cfg.layers);
    free(m);
}

int clip_text_width(const sd_clip_text *m) { return m->cfg.width; }
int clip_text_max_length(const sd_clip_text *m) { return m->max_pos; }
int clip_text_vocab_size(const sd_clip_text *m) { return m->vocab; }
int clip_text_num_layers(const sd_clip_text *m) { return m->cfg.layers; }

/* ids [batch*len] -> final_layer_norm(hidden_states[-clip_skip]) [batch,len,width]. */
sd_tensor clip_text_forward(const sd_clip_text *m, const sd_ctx *c, const int *ids, int batch, int len, int clip_skip) {
    int W = m->cfg.width;
    if (batch < 1 || len < 1 || len > m->max_pos) {
        sd_error("clip-text: %d x %d token ids; the model takes 1..%d tokens", batch, len, m->max_pos);
        return no_tensor();
    }
    if (clip_skip < 1 || clip_skip > m->cfg.layers) {
        sd_error("clip-text: clip skip %d is outside 1..%d (the number of layers)", clip_skip, m->cfg.layers);
        return no_tensor();
    }
    for (size_t i = 0; i < (size_t)batch * len; i++)
        if (ids[i] < 0 || ids[i] >= m->vocab) {
            sd_error("clip-text: token id %d at position %zu is outside the vocabulary (0..%d)", ids[i], i, m->vocab - 1);
            return no_tensor();
        }
    /* embeddings: token row + position row, one add (rounded once) */
    sd_tensor tok = tensor_new(3, batch, len, W, 1), pos = tensor_new(3, batch, len, W, 1);
    for (int b = 0; b < batch; b++)
        for (int t = 0; t < len; t++) {
            size_t row = ((size_t)b * len + t) * W;
            param_read(&m->tok_emb, (size_t)ids[(size_t)b * len + t] * W, (size_t)W, tok.data + row);
            param_read(&m->pos_emb, (size_t)t * W, (size_t)W, pos.data + row);
        }
    sd_tensor x = op_add(c, &tok, &pos);
    tensor_free(&tok);
    tensor_free(&pos);
    sd_trace_tensor(c, "text_model.embeddings", &x);
    /* clip skip N: stop after layer L-N (hidden_states[-N]), then the final norm (A1111) */
    int run = m->cfg.layers - (clip_skip - 1);
    for (int i = 0; i < run; i++) {
        char name[64];
        snprintf(name, sizeof name, "text_model.encoder.layers.%d", i);
        replace(&x, layer_forward(c, &m->cfg, &m->layers[i], &x, 1, name));
    }
    replace(&x, op_layer_norm(c, &x, m->cfg.eps, &m->final_w, &m->final_b));
    sd_trace_tensor(c, "text_model.final_layer_norm", &x);
    return x;
}

/* ======================================================================================
 * 4. Vision encoder
 * ====================================================================================== */

struct sd_clip_vision {
    clip_cfg cfg;
    int image_size, patch, channels, proj_dim, n_pos;
    sd_param class_emb, patch_w, pos_emb, pre_w, pre_b, post_w, post_b, proj_w;
    clip_layer *layers;
};

static int vision_rename(const char *key, char *out, size_t n, void *user) {
    (void)user;
    if (ends_with(key, "embeddings.position_ids")) return 0;
    if (strncmp(key, "vision_model.", 13) != 0 && strcmp(key, "visual_projection.weight") != 0) return 0;
    snprintf(out, n, "%s", key);
    return 1;
}

/* h94's image encoder for SD1.5 IP-Adapters: OpenCLIP ViT-H/14 (shared/spec/ip_adapter_image_encoder_config.json). */
static void vit_h_cfg(sd_clip_vision *m) {
    m->cfg.width = 1280; m->cfg.ffn = 5120; m->cfg.heads = 16; m->cfg.layers = 32; m->cfg.eps = 1e-5f;
    m->cfg.act = ACT_GELU;
    m->image_size = 224; m->patch = 14; m->channels = 3; m->proj_dim = 1024;
    cfg_check(&m->cfg, "vit-h");
}

sd_clip_vision *clip_vision_load(const char *path, const char *config_path, const sd_policy *pol) {
    char *file = NULL, *cfgp = NULL;
    int sibling;
    resolve_paths(path, config_path, &file, &cfgp, &sibling);
    sd_clip_vision *m = sd_calloc(1, sizeof *m);
    sd_loader l;
    int loaded = 0, ok = 0;
    if (loader_open(&l, file, vision_rename, NULL, pol)) goto done;
    loaded = 1;
    if (!loader_has(&l, "vision_model.embeddings.class_embedding")) {
        sd_error("%s: no CLIP vision encoder here (expected vision_model.* and visual_projection.weight)", file);
        goto done;
    }
    sd_json root;
    const sd_json *obj = NULL;
    int rc = cfgp ? cfg_open(cfgp, 1, !sibling, &root, &obj) : 1;
    if (rc < 0) goto done;
    if (rc == 0) {
        int bad = cfg_from_json(obj, 1, &m->cfg, cfgp);
        m->image_size = json_int(obj, "image_size", 224);
        m->patch = json_int(obj, "patch_size", 32);
        m->channels = json_int(obj, "num_channels", 3);
        m->proj_dim = json_int(obj, "projection_dim", 512);
        json_free(&root);
        if (bad) goto done;
        if (m->patch <= 0 || m->image_size < m->patch || m->image_size > 4096 || m->channels <= 0 ||
            m->channels > 16 || m->proj_dim <= 0 || m->proj_dim > 65536) {
            sd_error("%s: implausible image_size %d / patch_size %d / num_channels %d / projection_dim %d", cfgp,
                     m->image_size, m->patch, m->channels, m->proj_dim);
            goto done;
        }
    } else {
        int64_t s[8];
        vit_h_cfg(m);
        if (loader_shape(&l, "vision_model.embeddings.class_embedding", s) != 1 || s[0] != 1280) {
            sd_error("%s: no config.json next to the weights and not a ViT-H/14 encoder; pass --config", file);
            goto done;
        }
    }
    int g = m->image_size / m->patch, W = m->cfg.width;
    m->n_pos = g * g + 1;
    int cs[1] = { W }, pw[4] = { W, m->channels, m->patch, m->patch }, ps[2] = { m->n_pos, W };
    int prs[2] = { m->proj_dim, W };
    if (loader_param(&l, &m->class_emb, "vision_model.embeddings.class_embedding", 1, cs) ||
        loader_param(&l, &m->patch_w, "vision_model.embeddings.patch_embedding.weight", 4, pw) ||
        loader_param(&l, &m->pos_emb, "vision_model.embeddings.position_embedding.weight", 2, ps) ||
        load_norm(&l, &m->pre_w, &m->pre_b, "vision_model.pre_layrnorm", W) ||
        layers_load(&l, &m->layers, &m->cfg, "vision_model.encoder.layers") ||
        load_norm(&l, &m->post_w, &m->post_b, "vision_model.post_layernorm", W) ||
        loader_param(&l, &m->proj_w, "visual_projection.weight", 2, prs))
        goto done;
    static const char *const ns[] = { "vision_model.", "visual_projection." };
    if (check_unused(&l, ns, 2)) goto done;
    ok = 1;
done:
    if (loaded) loader_close(&l);
    free(file);
    free(cfgp);
    if (!ok) {
        clip_vision_free(m);
        return NULL;
    }
    return m;
}

void clip_vision_free(sd_clip_vision *m) {
    if (!m) return;
    sd_param *p[] = { &m->class_emb, &m->patch_w, &m->pos_emb, &m->pre_w, &m->pre_b, &m->post_w, &m->post_b, &m->proj_w };
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) param_free(p[i]);
    layers_free(m->layers, m->cfg.layers);
    free(m);
}

int clip_vision_image_size(const sd_clip_vision *m) { return m->image_size; }
int clip_vision_hidden_size(const sd_clip_vision *m) { return m->cfg.width; }
int clip_vision_projection_dim(const sd_clip_vision *m) { return m->proj_dim; }

sd_tensor clip_vision_forward(const sd_clip_vision *m, const sd_ctx *c, const sd_tensor *pixels,
                              sd_tensor *penultimate, sd_tensor *last_hidden) {
    static const int pad0[4] = { 0, 0, 0, 0 };
    int N = pixels->shape[0], W = m->cfg.width, T = m->n_pos;
    if (penultimate) *penultimate = no_tensor();
    if (last_hidden) *last_hidden = no_tensor();
    if (pixels->ndim != 4 || pixels->shape[1] != m->channels || pixels->shape[2] != m->image_size ||
        pixels->shape[3] != m->image_size || N < 1) {
        sd_error("clip-vision: pixels must be [N,%d,%d,%d], got [%d,%d,%d,%d]", m->channels, m->image_size, m->image_size,
                 pixels->shape[0], pixels->shape[1], pixels->shape[2], pixels->shape[3]);
        return no_tensor();
    }
    sd_tensor px = tensor_copy(pixels);                       /* the model input, in the storage format */
    op_round_storage(c, &px);
    sd_tensor patches = op_conv2d(c, &px, &m->patch_w, NULL, m->patch, pad0);   /* [N,W,g,g], no bias */
    tensor_free(&px);
    replace(&patches, op_nchw_to_tokens(&patches));          /* [N,g*g,W] */
    /* [class, patches...] + positions: one add */
    sd_tensor tok = tensor_new(3, N, T, W, 1), pos = tensor_new(3, N, T, W, 1);
    for (int n = 0; n < N; n++) {
        float *dst = tok.data + (size_t)n * T * W;
        param_read(&m->class_emb, 0, (size_t)W, dst);
        memcpy(dst + W, patches.data + (size_t)n * (T - 1) * W, (size_t)(T - 1) * W * sizeof(float));
        param_read(&m->pos_emb, 0, (size_t)T * W, pos.data + (size_t)n * T * W);
    }
    tensor_free(&patches);
    sd_tensor x = op_add(c, &tok, &pos);
    tensor_free(&tok);
    tensor_free(&pos);
    sd_trace_tensor(c, "vision_model.embeddings", &x);
    replace(&x, op_layer_norm(c, &x, m->cfg.eps, &m->pre_w, &m->pre_b));
    sd_trace_tensor(c, "vision_model.pre_layrnorm", &x);
    for (int i = 0; i < m->cfg.layers; i++) {
        char name[64];
        if (i == m->cfg.layers - 1 && penultimate) *penultimate = tensor_copy(&x);   /* hidden_states[-2] */
        snprintf(name, sizeof name, "vision_model.encoder.layers.%d", i);
        replace(&x, layer_forward(c, &m->cfg, &m->layers[i], &x, 0, name));
    }
    /* pooled = post_layernorm(last_hidden_state[:, 0]); image_embeds = visual_projection(pooled) */
    sd_tensor cls = tensor_new(2, N, W, 1, 1);
    for (int n = 0; n < N; n++) memcpy(cls.data + (size_t)n * W, x.data + (size_t)n * T * W, (size_t)W * sizeof(float));
    if (last_hidden) *last_hidden = x;
    else tensor_free(&x);
    replace(&cls, op_layer_norm(c, &cls, m->cfg.eps, &m->post_w, &m->post_b));
    sd_trace_tensor(c, "vision_model.post_layernorm", &cls);
    sd_tensor emb = op_linear(c, &cls, &m->proj_w, NULL);
    tensor_free(&cls);
    sd_trace_tensor(c, "visual_projection", &emb);
    return emb;
}

/* ======================================================================================
 * 5. Preprocessing: transformers CLIPImageProcessor (IP-Adapter settings) on Pillow 9.4.
 * See shared/golden/clip_preprocess/README.md; only the crop window is computed (each
 * output sample of Pillow's resize depends on its own index only, so this is bit-equal).
 * ====================================================================================== */

#define PIL_PRECISION_BITS 22   /* Pillow: 32 - 8 - 2 */

/* Pillow's bicubic kernel, a = -0.5, in Pillow's exact arithmetic form. */
static double pil_bicubic(double x) {
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

/* Fixed-point taps of one resampling pass, for `count` output indices from `first`. */
typedef struct resample_taps { int *start, *n; int32_t *k; int ksize; } resample_taps;

static void taps_build(resample_taps *t, int in_size, int out_size, int first, int count) {
    double scale = (double)(float)in_size / out_size;         /* Pillow: (double)(in1 - in0) / outSize */
    double fscale = scale < 1.0 ? 1.0 : scale;
    double support = 2.0 * fscale;                            /* bicubic support 2, widened when reducing */
    double ss = 1.0 / fscale;
    t->ksize = (int)ceil(support) * 2 + 1;
    t->start = sd_malloc((size_t)count * sizeof(int));
    t->n = sd_malloc((size_t)count * sizeof(int));
    t->k = sd_calloc((size_t)count * t->ksize, sizeof(int32_t));
    double *w = sd_malloc((size_t)t->ksize * sizeof(double));
    for (int i = 0; i < count; i++) {
        int xx = first + i;
        double center = (xx + 0.5) * scale, ww = 0.0;
        int xmin = (int)(center - support + 0.5), xmax = (int)(center + support + 0.5);
        if (xmin < 0) xmin = 0;
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        for (int x = 0; x < xmax; x++) {                      /* weights, summed left to right */
            w[x] = pil_bicubic((x + xmin - center + 0.5) * ss);
            ww += w[x];
        }
        for (int x = 0; x < xmax; x++) {                      /* normalise, then 22-bit fixed point */
            double v = ww != 0.0 ? w[x] / ww : w[x];
            t->k[(size_t)i * t->ksize + x] = v < 0 ? (int32_t)(-0.5 + v * (1 << PIL_PRECISION_BITS))
                                                   : (int32_t)(0.5 + v * (1 << PIL_PRECISION_BITS));
        }
        t->start[i] = xmin;
        t->n[i] = xmax;
    }
    free(w);
}

static void taps_free(resample_taps *t) {
    free(t->start);
    free(t->n);
    free(t->k);
}

/* Pillow's clip8: round (the 1/2 was added up front), shift, clamp to 0..255. */
static uint8_t pil_clip8(int64_t acc) {
    int64_t v = acc >> PIL_PRECISION_BITS;
    return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
}

/* convert("RGB") of one sample: alpha dropped (no compositing); grey is already replicated by
 * the PNG decoder; 16-bit samples keep their high byte (Pillow's ;16B unpackers). */
static uint8_t rgb_sample(const sd_image *im, size_t pixel, int ch) {
    if (im->depth == 16) return (uint8_t)(((const uint16_t *)im->pixels)[pixel * 4 + ch] >> 8);
    return ((const uint8_t *)im->pixels)[pixel * 4 + ch];
}

/* Horizontal pass over source rows row0..row0+rows-1: out[r][i] = clip8(sum_j k[i][j] *
 * in[row0+r][start_i + j]), j ascending, per channel (Pillow's ImagingResampleHorizontal_8bpc). */
static void resample_h(const sd_image *im, int row0, int rows, const resample_taps *t, int count, uint8_t *out) {
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < count; i++) {
            const int32_t *k = t->k + (size_t)i * t->ksize;
            size_t base = (size_t)(row0 + r) * im->width + t->start[i];
            for (int ch = 0; ch < 3; ch++) {
                int64_t acc = 1 << (PIL_PRECISION_BITS - 1);
                for (int j = 0; j < t->n[i]; j++) acc += (int64_t)rgb_sample(im, base + j, ch) * k[j];
                out[((size_t)r * count + i) * 3 + ch] = pil_clip8(acc);
            }
        }
}

/* Vertical pass: out[i][x] = clip8(sum_j k[i][j] * in[start_i + j - row0][x]); `in` holds
 * the source rows from row0 on (what the horizontal pass produced). */
static void resample_v(const uint8_t *in, int width, int row0, const resample_taps *t, int count, uint8_t *out) {
    for (int i = 0; i < count; i++) {
        const int32_t *k = t->k + (size_t)i * t->ksize;
        for (int x = 0; x < width * 3; x++) {
            int64_t acc = 1 << (PIL_PRECISION_BITS - 1);
            for (int j = 0; j < t->n[i]; j++) acc += (int64_t)in[(size_t)(t->start[i] - row0 + j) * width * 3 + x] * k[j];
            out[(size_t)i * width * 3 + x] = pil_clip8(acc);
        }
    }
}

int clip_preprocess(const sd_image *im, int size, sd_tensor *pixels, uint8_t **resized_cropped_rgb) {
    static const double mean[3] = { 0.48145466, 0.4578275, 0.40821073 };
    static const double std[3] = { 0.26862954, 0.26130258, 0.27577711 };
    int W = im->width, H = im->height;
    if (W < 1 || H < 1 || size < 1 || size > 4096 || !im->pixels || im->channels != 4) {
        sd_error("preprocess: bad image (%dx%d, %d channels) or size %d", W, H, im->channels, size);
        return -1;
    }
    /* 1. shortest edge -> size: (short, long) -> (size, int(size * long / short)) */
    int sh = W <= H ? W : H, lg = W <= H ? H : W;
    double new_long = (double)size * lg / sh;
    if (new_long > 1e8) {
        sd_error("preprocess: a %dx%d image is too elongated", W, H);
        return -1;
    }
    int rw = W <= H ? size : (int)new_long, rh = W <= H ? (int)new_long : size;
    /* 2. centre crop window of the resized image; 3. convert("RGB") while resampling */
    int top = (rh - size) / 2, left = (rw - size) / 2;
    /* horizontal pass (only the crop's columns, only the rows the vertical pass reads) */
    int row0 = top, nrows = size;                             /* source rows needed */
    resample_taps tv;
    memset(&tv, 0, sizeof tv);
    if (rh != H) {
        taps_build(&tv, H, rh, top, size);
        row0 = tv.start[0];
        nrows = tv.start[size - 1] + tv.n[size - 1] - row0;
    }
    uint8_t *hpass = sd_malloc((size_t)nrows * size * 3);
    if (rw != W) {
        resample_taps th;
        taps_build(&th, W, rw, left, size);
        resample_h(im, row0, nrows, &th, size, hpass);
        taps_free(&th);
    } else {
        for (int r = 0; r < nrows; r++)
            for (int x = 0; x < size; x++)
                for (int ch = 0; ch < 3; ch++)
                    hpass[((size_t)r * size + x) * 3 + ch] = rgb_sample(im, (size_t)(row0 + r) * W + left + x, ch);
    }
    uint8_t *out = sd_malloc((size_t)size * size * 3);
    if (rh != H) {
        resample_v(hpass, size, row0, &tv, size, out);
        taps_free(&tv);
    } else {
        memcpy(out, hpass, (size_t)size * size * 3);
    }
    free(hpass);
    /* 4.-5. x = float32(float64(p) * (1/255)); (x - float32(mean)) / float32(std); HWC -> CHW */
    *pixels = tensor_new(4, 1, 3, size, size);
    for (int ch = 0; ch < 3; ch++) {
        float m = (float)mean[ch], s = (float)std[ch];
        for (size_t p = 0; p < (size_t)size * size; p++) {
            float x = (float)((double)out[p * 3 + ch] * (1.0 / 255.0));
            float d = x - m;
            pixels->data[(size_t)ch * size * size + p] = d / s;
        }
    }
    if (resized_cropped_rgb) *resized_cropped_rgb = out;
    else free(out);
    return 0;
}

/* ======================================================================================
 * 6. Commands
 * ====================================================================================== */

/* Write several outputs; if one fails, remove those already written (no partial result). */
static int write_outputs(int n, const char *const *paths, const sd_tensor *const *t) {
    for (int i = 0; i < n; i++) {
        if (!paths[i]) continue;
        if (npy_write_tensor(paths[i], t[i]) != 0) {
            for (int k = 0; k < i; k++)
                if (paths[k]) remove(paths[k]);
            return -1;
        }
    }
    return 0;
}

/* Token ids from an integer .npy: [T] or [N,T]. */
static int read_ids(const char *path, int **ids, int *batch, int *len) {
    sd_npy a;
    if (npy_read(path, &a)) return -1;
    int rc = -1;
    if (a.dtype != NPY_I64 && a.dtype != NPY_I32) sd_error("%s: token ids must be an int64 or int32 array", path);
    else if ((a.ndim != 1 && a.ndim != 2) || a.n == 0 || a.shape[a.ndim - 1] > 65536 || (a.ndim == 2 && a.shape[0] > 65536))
        sd_error("%s: token ids must have shape [T] or [N,T]", path);
    else {
        *len = (int)a.shape[a.ndim - 1];
        *batch = a.ndim == 2 ? (int)a.shape[0] : 1;
        *ids = sd_malloc(a.n * sizeof(int));
        rc = 0;
        for (size_t i = 0; i < a.n; i++) {
            int64_t v = a.dtype == NPY_I64 ? ((const int64_t *)a.data)[i] : ((const int32_t *)a.data)[i];
            if (v < 0 || v > 0x7fffffff) {
                sd_error("%s: token id %lld at position %zu is negative or too large", path, (long long)v, i);
                rc = -1;
                break;
            }
            (*ids)[i] = (int)v;
        }
        if (rc) { free(*ids); *ids = NULL; }
    }
    npy_free(&a);
    return rc;
}

static int parse_int(const char *flag, const char *s, int lo, int hi, int *out) {
    char *end;
    long v = strtol(s, &end, 10);
    if (!*s || *end || v < lo || v > hi) {
        sd_error("%s: '%s' is not an integer in %d..%d", flag, s, lo, hi);
        return -1;
    }
    *out = (int)v;
    return 0;
}

int cmd_clip_text(int argc, char **argv) {
    sd_args a;
    args_init(&a, argc, argv);
    const char *model = args_value(&a, "--model"), *config = args_value(&a, "--config");
    const char *ids_path = args_value(&a, "--ids"), *prompt = args_value(&a, "--prompt");
    const char *tok_path = args_value(&a, "--tokenizer"), *skip_s = args_value(&a, "--clip-skip");
    const char *trace_path = args_value(&a, "--trace"), *out = args_value(&a, "-o");
    sd_precision prec;
    int threads = 0, skip = 1, rc = -1, batch = 0, len = 0;
    int *ids = NULL;
    sd_clip_text *m = NULL;
    sd_tensor y = no_tensor();
    sd_trace trace;
    memset(&trace, 0, sizeof trace);
    if (args_trace_options(&a, trace_path, &trace) || args_precision(&a, &prec) || args_threads(&a, &threads) ||
        args_check_all_used(&a))
        goto done;
    if (!model || !out) { sd_error("--model and -o are required"); goto done; }
    if (!ids_path == !prompt) { sd_error("give either --ids IDS.npy or --prompt TEXT (with --tokenizer)"); goto done; }
    if (prompt && !tok_path) { sd_error("--prompt needs --tokenizer DIR|FILE"); goto done; }
    if (skip_s && parse_int("--clip-skip", skip_s, 1, 1024, &skip)) goto done;
    sd_ctx c;
    memset(&c, 0, sizeof c);
    c.pol = prec.model[SD_TEXT];
    c.prefix = "text_encoder";
    c.threads = threads;
    if (trace_path) c.trace = &trace;
    if (!(m = clip_text_load(model, config, &c.pol))) goto done;
    if (ids_path) {
        if (read_ids(ids_path, &ids, &batch, &len)) goto done;
    } else {
        sd_tokenizer *tk = tok_load(tok_path);
        if (!tk) goto done;
        batch = 1;
        len = m->max_pos;
        ids = sd_malloc((size_t)len * sizeof(int));
        int bad = tok_encode_padded(tk, prompt, len, ids);
        tok_free(tk);
        if (bad) goto done;
    }
    y = clip_text_forward(m, &c, ids, batch, len, skip);
    if (!y.data) goto done;
    if (trace_path && sd_trace_write(&trace, trace_path)) goto done;
    const char *paths[1] = { out };
    const sd_tensor *ts[1] = { &y };
    rc = write_outputs(1, paths, ts);
    if (rc && trace_path) remove(trace_path);
done:
    tensor_free(&y);
    free(ids);
    clip_text_free(m);
    sd_trace_free(&trace);
    free(a.used);
    return rc;
}

/* Read a PNG and preprocess it to [1,3,size,size]. */
static int image_to_pixels(const char *path, int size, sd_tensor *px, uint8_t **rgb) {
    sd_image im;
    if (png_read_file(path, &im)) return -1;
    int rc = clip_preprocess(&im, size, px, rgb);
    sd_image_free(&im);
    return rc;
}

int cmd_clip_vision(int argc, char **argv) {
    sd_args a;
    args_init(&a, argc, argv);
    const char *model = args_value(&a, "--model"), *config = args_value(&a, "--config");
    const char *px_path = args_value(&a, "--pixels"), *img_path = args_value(&a, "--image");
    const char *pen_path = args_value(&a, "--penultimate"), *last_path = args_value(&a, "--last-hidden");
    const char *trace_path = args_value(&a, "--trace"), *out = args_value(&a, "-o");
    sd_precision prec;
    int threads = 0, rc = -1;
    sd_clip_vision *m = NULL;
    sd_tensor px = no_tensor(), emb = no_tensor(), pen = no_tensor(), last = no_tensor();
    sd_trace trace;
    memset(&trace, 0, sizeof trace);
    if (args_trace_options(&a, trace_path, &trace) || args_precision(&a, &prec) || args_threads(&a, &threads) ||
        args_check_all_used(&a))
        goto done;
    if (!model || !out) { sd_error("--model and -o are required"); goto done; }
    if (!px_path == !img_path) { sd_error("give either --pixels PX.npy or --image IN.png"); goto done; }
    sd_ctx c;
    memset(&c, 0, sizeof c);
    c.pol = prec.model[SD_VISION];
    c.prefix = "image_encoder";
    c.threads = threads;
    if (trace_path) c.trace = &trace;
    if (!(m = clip_vision_load(model, config, &c.pol))) goto done;
    if (px_path) {
        float *d;
        int nd;
        int64_t s[8];
        size_t n;
        if (npy_read_f32(px_path, &d, &nd, s, &n)) goto done;
        int S = m->image_size, C = m->channels;
        if (!((nd == 4 && s[1] == C && s[2] == S && s[3] == S && s[0] >= 1 && s[0] <= 4096) ||
              (nd == 3 && s[0] == C && s[1] == S && s[2] == S))) {
            free(d);
            sd_error("%s: pixels must be [N,%d,%d,%d] (or [%d,%d,%d]) for this encoder", px_path, C, S, S, C, S, S);
            goto done;
        }
        px.ndim = 4;
        px.shape[0] = nd == 4 ? (int)s[0] : 1; px.shape[1] = C; px.shape[2] = S; px.shape[3] = S;
        px.data = d;
    } else if (image_to_pixels(img_path, m->image_size, &px, NULL)) {
        goto done;
    }
    emb = clip_vision_forward(m, &c, &px, pen_path ? &pen : NULL, &last);
    if (!emb.data) goto done;
    if (trace_path && sd_trace_write(&trace, trace_path)) goto done;
    const char *paths[3] = { out, pen_path, last_path };
    const sd_tensor *ts[3] = { &emb, &pen, &last };
    rc = write_outputs(3, paths, ts);
    if (rc && trace_path) remove(trace_path);
done:
    tensor_free(&px);
    tensor_free(&emb);
    tensor_free(&pen);
    tensor_free(&last);
    clip_vision_free(m);
    sd_trace_free(&trace);
    free(a.used);
    return rc;
}

int cmd_preprocess(int argc, char **argv) {
    sd_args a;
    args_init(&a, argc, argv);
    const char *img = args_value(&a, "--image"), *out = args_value(&a, "-o");
    const char *size_s = args_value(&a, "--size"), *rgb_out = args_value(&a, "--resized-out");
    int size = 224, rc = -1;
    sd_tensor px = no_tensor();
    uint8_t *rgb = NULL;
    if (args_check_all_used(&a)) goto done;
    if (!img || !out) { sd_error("--image and -o are required"); goto done; }
    if (size_s && parse_int("--size", size_s, 1, 4096, &size)) goto done;
    if (image_to_pixels(img, size, &px, rgb_out ? &rgb : NULL)) goto done;
    if (npy_write_tensor(out, &px)) goto done;
    if (rgb_out) {
        int64_t shape[3] = { size, size, 3 };
        if (npy_write(rgb_out, NPY_U8, 3, shape, rgb)) { remove(out); goto done; }
    }
    rc = 0;
done:
    tensor_free(&px);
    free(rgb);
    free(a.used);
    return rc;
}
