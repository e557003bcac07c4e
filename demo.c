/* demo.c — `sdref demo`: the whole story in one command, with no files to download.
 *
 * It writes a small random-weight SD1.x-shaped model as a diffusers folder (UNet, VAE, CLIP text
 * encoder, a byte-level CLIP tokenizer, DDIM scheduler), whose VAE decoder carries its residual
 * stream 2^15 times larger than it needs from its second up block on — exactly what SDXL's VAE
 * does, and why its FP16 images come out black. GroupNorm undoes the scale, so in float32 nothing
 * changes. Then it renders one prompt under fp32, fp16 and fp16-vae32 (A1111's --no-half-vae),
 * finds the layer where fp16 overflows with a shadow run, and measures the pictures. */
#define _POSIX_C_SOURCE 200809L
#include "sdref.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__unix__) || defined(__APPLE__)
#include <errno.h>
#include <sys/stat.h>
/* mkdir -p of one level: an existing folder is fine */
static int make_dir(const char *p) {
    if (mkdir(p, 0777) == 0 || errno == EEXIST) return 0;
    sd_error("%s: cannot create the folder (%s)", p, strerror(errno));
    return -1;
}
#else
static int make_dir(const char *p) { (void)p; return 0; }   /* without POSIX: the folders must exist */
#endif

/* ======================================================================================
 * Random weights with the names and shapes of diffusers / transformers
 * ====================================================================================== */

typedef struct wgen { st_writer w; uint64_t state; const char *prefix; } wgen;

static double wrand(wgen *g) {                          /* xorshift64*: uniform in [-1, 1) */
    g->state ^= g->state >> 12;
    g->state ^= g->state << 25;
    g->state ^= g->state >> 27;
    return (double)((g->state * 0x2545F4914F6CDD1Dull) >> 11) * (2.0 / 9007199254740992.0) - 1.0;
}

/* A tensor of uniform values with the given standard deviation around `mean`. */
static void put(wgen *g, const char *name, int ndim, int d0, int d1, int d2, int d3, double mean, double std) {
    int64_t shape[4] = { d0, d1, d2, d3 };
    size_t n = 1;
    for (int i = 0; i < ndim; i++) n *= (size_t)shape[i];
    float *v = sd_malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) v[i] = (float)(mean + std * 1.7320508075688772 * wrand(g));
    char full[256];
    snprintf(full, sizeof full, "%s%s", g->prefix, name);
    st_writer_add_f32(&g->w, full, ndim, shape, v);
    free(v);
}

static void put_conv(wgen *g, const char *name, int cout, int cin, int k, double gain) {
    char b[320];
    snprintf(b, sizeof b, "%s.weight", name);
    put(g, b, 4, cout, cin, k, k, 0, gain / sqrt((double)cin * k * k));
    snprintf(b, sizeof b, "%s.bias", name);
    put(g, b, 1, cout, 1, 1, 1, 0, 0.02 * gain);
}

static void put_linear(wgen *g, const char *name, int out, int in, int bias) {
    char b[320];
    snprintf(b, sizeof b, "%s.weight", name);
    put(g, b, 2, out, in, 1, 1, 0, 1.0 / sqrt((double)in));
    if (!bias) return;
    snprintf(b, sizeof b, "%s.bias", name);
    put(g, b, 1, out, 1, 1, 1, 0, 0.02);
}

static void put_norm(wgen *g, const char *name, int ch) {
    char b[320];
    snprintf(b, sizeof b, "%s.weight", name);
    put(g, b, 1, ch, 1, 1, 1, 1.0, 0.1);
    snprintf(b, sizeof b, "%s.bias", name);
    put(g, b, 1, ch, 1, 1, 1, 0.0, 0.1);
}

/* ResnetBlock2D; conv2 (the residual write) scaled by `k` (1 = plain). */
static void put_resnet(wgen *g, const char *p, int cin, int cout, int temb, double k) {
    char b[256];
    snprintf(b, sizeof b, "%s.norm1", p); put_norm(g, b, cin);
    snprintf(b, sizeof b, "%s.conv1", p); put_conv(g, b, cout, cin, 3, 1.0);
    if (temb) { snprintf(b, sizeof b, "%s.time_emb_proj", p); put_linear(g, b, cout, temb, 1); }
    snprintf(b, sizeof b, "%s.norm2", p); put_norm(g, b, cout);
    snprintf(b, sizeof b, "%s.conv2", p); put_conv(g, b, cout, cout, 3, 0.5 * k);
    if (cin != cout) { snprintf(b, sizeof b, "%s.conv_shortcut", p); put_conv(g, b, cout, cin, 1, k); }
}

static void put_attention(wgen *g, const char *p, int q, int kv, int bias, int group_norm) {
    char b[256];
    if (group_norm) { snprintf(b, sizeof b, "%s.group_norm", p); put_norm(g, b, q); }
    snprintf(b, sizeof b, "%s.to_q", p); put_linear(g, b, q, q, bias);
    snprintf(b, sizeof b, "%s.to_k", p); put_linear(g, b, q, kv, bias);
    snprintf(b, sizeof b, "%s.to_v", p); put_linear(g, b, q, kv, bias);
    snprintf(b, sizeof b, "%s.to_out.0", p); put_linear(g, b, q, q, 1);
}

static void put_transformer(wgen *g, const char *p, int c, int cross) {
    char b[256];
    snprintf(b, sizeof b, "%s.norm", p); put_norm(g, b, c);
    snprintf(b, sizeof b, "%s.proj_in", p); put_conv(g, b, c, c, 1, 1.0);
    snprintf(b, sizeof b, "%s.transformer_blocks.0.norm1", p); put_norm(g, b, c);
    snprintf(b, sizeof b, "%s.transformer_blocks.0.attn1", p); put_attention(g, b, c, c, 0, 0);
    snprintf(b, sizeof b, "%s.transformer_blocks.0.norm2", p); put_norm(g, b, c);
    snprintf(b, sizeof b, "%s.transformer_blocks.0.attn2", p); put_attention(g, b, c, cross, 0, 0);
    snprintf(b, sizeof b, "%s.transformer_blocks.0.norm3", p); put_norm(g, b, c);
    snprintf(b, sizeof b, "%s.transformer_blocks.0.ff.net.0.proj", p); put_linear(g, b, 8 * c, c, 1);
    snprintf(b, sizeof b, "%s.transformer_blocks.0.ff.net.2", p); put_linear(g, b, c, 4 * c, 1);
    snprintf(b, sizeof b, "%s.proj_out", p); put_conv(g, b, c, c, 1, 1.0);
}

/* The demo's model sizes */
#define U_C0 32
#define U_C1 64
#define U_LAYERS 1
#define U_HEADS 4
#define X_DIM 32          /* text width = cross-attention width */
#define X_LAYERS 2
#define X_HEADS 2
#define X_VOCAB 514       /* 256 bytes, 256 bytes + </w>, BOS, EOS */
#define V_GROUPS 8
#define V_OVERFLOW_LOG2 15

static const int vae_ch[4] = { 16, 32, 32, 32 };

static int write_unet(const char *path) {
    wgen g = { { 0 }, 0x5EED0001ull, "" };
    st_writer_init(&g.w);
    char b[256];
    int ch[2] = { U_C0, U_C1 }, temb = 4 * U_C0;
    put_linear(&g, "time_embedding.linear_1", temb, U_C0, 1);
    put_linear(&g, "time_embedding.linear_2", temb, temb, 1);
    put_conv(&g, "conv_in", U_C0, 4, 3, 1.0);
    int cin = U_C0;
    for (int i = 0; i < 2; i++) {                        /* CrossAttnDownBlock2D, DownBlock2D */
        for (int j = 0; j < U_LAYERS; j++) {
            snprintf(b, sizeof b, "down_blocks.%d.resnets.%d", i, j);
            put_resnet(&g, b, j == 0 ? cin : ch[i], ch[i], temb, 1.0);
            if (i == 0) { snprintf(b, sizeof b, "down_blocks.%d.attentions.%d", i, j); put_transformer(&g, b, ch[i], X_DIM); }
        }
        if (i == 0) { snprintf(b, sizeof b, "down_blocks.%d.downsamplers.0.conv", i); put_conv(&g, b, ch[i], ch[i], 3, 1.0); }
        cin = ch[i];
    }
    put_resnet(&g, "mid_block.resnets.0", U_C1, U_C1, temb, 1.0);
    put_transformer(&g, "mid_block.attentions.0", U_C1, X_DIM);
    put_resnet(&g, "mid_block.resnets.1", U_C1, U_C1, temb, 1.0);
    /* up blocks: UpBlock2D (64), CrossAttnUpBlock2D (32); skips in reverse */
    int skips[8], ns = 0;
    skips[ns++] = U_C0;
    for (int i = 0; i < 2; i++) {
        for (int j = 0; j < U_LAYERS; j++) skips[ns++] = ch[i];
        if (i == 0) skips[ns++] = ch[i];
    }
    int prev = U_C1;
    for (int i = 0; i < 2; i++) {
        int out = ch[1 - i];
        for (int j = 0; j < U_LAYERS + 1; j++) {
            int skip = skips[--ns];
            snprintf(b, sizeof b, "up_blocks.%d.resnets.%d", i, j);
            put_resnet(&g, b, (j == 0 ? prev : out) + skip, out, temb, 1.0);
            if (i == 1) { snprintf(b, sizeof b, "up_blocks.%d.attentions.%d", i, j); put_transformer(&g, b, out, X_DIM); }
        }
        if (i == 0) { snprintf(b, sizeof b, "up_blocks.%d.upsamplers.0.conv", i); put_conv(&g, b, out, out, 3, 1.0); }
        prev = out;
    }
    put_norm(&g, "conv_norm_out", U_C0);
    put_conv(&g, "conv_out", 4, U_C0, 3, 1.0);
    int rc = st_writer_write(&g.w, path);
    st_writer_free(&g.w);
    return rc;
}

/* The VAE, its decoder scaled by K = 2^15 from up_blocks[1] on: the conv of up_blocks[0]'s
 * upsampler gets weight and bias * K; every later residual write (conv2) and the biases of
 * shortcuts and upsampler convs (whose inputs are already scaled) * K. */
static int write_vae(const char *path) {
    wgen g = { { 0 }, 0x5EED0002ull, "" };
    st_writer_init(&g.w);
    char b[256];
    double K = (double)(1 << V_OVERFLOW_LOG2);
    put_conv(&g, "encoder.conv_in", vae_ch[0], 3, 3, 1.0);
    int cin = vae_ch[0];
    for (int i = 0; i < 4; i++) {
        for (int j = 0; j < 2; j++) {
            snprintf(b, sizeof b, "encoder.down_blocks.%d.resnets.%d", i, j);
            put_resnet(&g, b, j == 0 ? cin : vae_ch[i], vae_ch[i], 0, 1.0);
        }
        if (i < 3) { snprintf(b, sizeof b, "encoder.down_blocks.%d.downsamplers.0.conv", i); put_conv(&g, b, vae_ch[i], vae_ch[i], 3, 1.0); }
        cin = vae_ch[i];
    }
    put_resnet(&g, "encoder.mid_block.resnets.0", 32, 32, 0, 1.0);
    put_attention(&g, "encoder.mid_block.attentions.0", 32, 32, 1, 1);
    put_resnet(&g, "encoder.mid_block.resnets.1", 32, 32, 0, 1.0);
    put_norm(&g, "encoder.conv_norm_out", 32);
    put_conv(&g, "encoder.conv_out", 8, 32, 3, 1.0);
    put_conv(&g, "quant_conv", 8, 8, 1, 1.0);
    put_conv(&g, "post_quant_conv", 4, 4, 1, 1.0);
    put_conv(&g, "decoder.conv_in", 32, 4, 3, 1.0);
    put_resnet(&g, "decoder.mid_block.resnets.0", 32, 32, 0, 1.0);
    put_attention(&g, "decoder.mid_block.attentions.0", 32, 32, 1, 1);
    put_resnet(&g, "decoder.mid_block.resnets.1", 32, 32, 0, 1.0);
    int prev = 32;
    for (int i = 0; i < 4; i++) {
        int out = vae_ch[3 - i];
        double k = i >= 1 ? K : 1.0;
        for (int j = 0; j < 3; j++) {
            snprintf(b, sizeof b, "decoder.up_blocks.%d.resnets.%d", i, j);
            int rin = j == 0 ? prev : out;
            put_resnet(&g, b, rin, out, 0, 1.0);
            if (k != 1.0) {                                   /* rescale what this resnet writes */
                st_writer *w = &g.w;
                for (int e = w->n - 1; e >= 0 && e >= w->n - 12; e--) {
                    const char *nm = w->entries[e].name;
                    int conv2 = strstr(nm, ".conv2.") != NULL, sc = strstr(nm, ".conv_shortcut.bias") != NULL;
                    if (strncmp(nm, b, strlen(b)) != 0 || !(conv2 || sc)) continue;
                    float *v = (float *)w->blobs[e];
                    for (uint64_t q = 0; q < w->entries[e].nbytes / 4; q++) v[q] = (float)(v[q] * k);
                }
            }
        }
        if (i < 3) {
            snprintf(b, sizeof b, "decoder.up_blocks.%d.upsamplers.0.conv", i);
            put_conv(&g, b, out, out, 3, 1.0);
            /* up_blocks[0]'s upsampler starts the scaled stream; later ones keep it (bias only) */
            st_writer *w = &g.w;
            for (int e = w->n - 2; e < w->n; e++) {
                int is_bias = strstr(w->entries[e].name, ".bias") != NULL;
                double s = i == 0 ? K : (is_bias ? K : 1.0);
                float *v = (float *)w->blobs[e];
                for (uint64_t q = 0; q < w->entries[e].nbytes / 4; q++) v[q] = (float)(v[q] * s);
            }
        }
        prev = out;
    }
    put_norm(&g, "decoder.conv_norm_out", vae_ch[0]);
    put_conv(&g, "decoder.conv_out", 3, vae_ch[0], 3, 1.0);
    int rc = st_writer_write(&g.w, path);
    st_writer_free(&g.w);
    return rc;
}

static int write_text_encoder(const char *path) {
    wgen g = { { 0 }, 0x5EED0003ull, "text_model." };
    st_writer_init(&g.w);
    char b[256];
    put(&g, "embeddings.token_embedding.weight", 2, X_VOCAB, X_DIM, 1, 1, 0, 0.5);
    put(&g, "embeddings.position_embedding.weight", 2, 77, X_DIM, 1, 1, 0, 0.1);
    for (int i = 0; i < X_LAYERS; i++) {
        const char *lin[4] = { "q_proj", "k_proj", "v_proj", "out_proj" };
        for (int k = 0; k < 4; k++) { snprintf(b, sizeof b, "encoder.layers.%d.self_attn.%s", i, lin[k]); put_linear(&g, b, X_DIM, X_DIM, 1); }
        snprintf(b, sizeof b, "encoder.layers.%d.layer_norm1", i); put_norm(&g, b, X_DIM);
        snprintf(b, sizeof b, "encoder.layers.%d.mlp.fc1", i); put_linear(&g, b, 4 * X_DIM, X_DIM, 1);
        snprintf(b, sizeof b, "encoder.layers.%d.mlp.fc2", i); put_linear(&g, b, X_DIM, 4 * X_DIM, 1);
        snprintf(b, sizeof b, "encoder.layers.%d.layer_norm2", i); put_norm(&g, b, X_DIM);
    }
    put_norm(&g, "final_layer_norm", X_DIM);
    int rc = st_writer_write(&g.w, path);
    st_writer_free(&g.w);
    return rc;
}

/* ======================================================================================
 * Configs and the byte-level tokenizer
 * ====================================================================================== */

static int write_text(const char *path, const char *text) {
    sd_outfile o;
    if (sd_out_open(&o, path)) return -1;
    fputs(text, o.f);
    return sd_out_commit(&o);
}

static const char unet_config[] =
    "{\"_class_name\": \"UNet2DConditionModel\", \"act_fn\": \"silu\", \"attention_head_dim\": 4,\n"
    " \"block_out_channels\": [32, 64], \"center_input_sample\": false, \"cross_attention_dim\": 32,\n"
    " \"down_block_types\": [\"CrossAttnDownBlock2D\", \"DownBlock2D\"], \"downsample_padding\": 1,\n"
    " \"flip_sin_to_cos\": true, \"freq_shift\": 0, \"in_channels\": 4, \"layers_per_block\": 1,\n"
    " \"mid_block_scale_factor\": 1, \"norm_eps\": 1e-05, \"norm_num_groups\": 8, \"out_channels\": 4,\n"
    " \"sample_size\": 16, \"up_block_types\": [\"UpBlock2D\", \"CrossAttnUpBlock2D\"],\n"
    " \"upcast_attention\": false, \"use_linear_projection\": false}\n";

static const char vae_config[] =
    "{\"_class_name\": \"AutoencoderKL\", \"act_fn\": \"silu\", \"block_out_channels\": [16, 32, 32, 32],\n"
    " \"down_block_types\": [\"DownEncoderBlock2D\", \"DownEncoderBlock2D\", \"DownEncoderBlock2D\", \"DownEncoderBlock2D\"],\n"
    " \"in_channels\": 3, \"latent_channels\": 4, \"layers_per_block\": 2, \"norm_num_groups\": 8, \"out_channels\": 3,\n"
    " \"sample_size\": 128, \"scaling_factor\": 0.18215,\n"
    " \"up_block_types\": [\"UpDecoderBlock2D\", \"UpDecoderBlock2D\", \"UpDecoderBlock2D\", \"UpDecoderBlock2D\"]}\n";

static const char text_config[] =
    "{\"architectures\": [\"CLIPTextModel\"], \"hidden_act\": \"quick_gelu\", \"hidden_size\": 32,\n"
    " \"intermediate_size\": 128, \"layer_norm_eps\": 1e-05, \"max_position_embeddings\": 77,\n"
    " \"model_type\": \"clip_text_model\", \"num_attention_heads\": 2, \"num_hidden_layers\": 2,\n"
    " \"bos_token_id\": 512, \"eos_token_id\": 513, \"pad_token_id\": 513, \"vocab_size\": 514}\n";

static const char scheduler_config[] =
    "{\"_class_name\": \"DDIMScheduler\", \"beta_end\": 0.012, \"beta_schedule\": \"scaled_linear\", \"beta_start\": 0.00085,\n"
    " \"clip_sample\": false, \"num_train_timesteps\": 1000, \"prediction_type\": \"epsilon\", \"set_alpha_to_one\": false,\n"
    " \"steps_offset\": 1, \"timestep_spacing\": \"leading\"}\n";

/* CLIP's byte-to-character table (bytes_to_unicode): printable Latin-1 maps to itself, the
 * other 68 bytes to U+0100.. in byte order; the vocabulary lists bytes in that table's order. */
static void byte_chars(int order[256], int cp[256]) {
    int n = 0, extra = 0;
    for (int b = 0; b < 256; b++)
        if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)) { order[n++] = b; cp[b] = b; }
    for (int b = 0; b < 256; b++)
        if (!((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF))) { order[n++] = b; cp[b] = 256 + extra++; }
}

static void put_utf8(FILE *f, int c) {
    if (c < 0x80) { if (c == '"' || c == '\\') fputc('\\', f); fputc(c, f); }
    else if (c < 0x800) { fputc(0xC0 | (c >> 6), f); fputc(0x80 | (c & 63), f); }
    else { fputc(0xE0 | (c >> 12), f); fputc(0x80 | ((c >> 6) & 63), f); fputc(0x80 | (c & 63), f); }
}

static int write_tokenizer(const char *dir) {
    char path[2112];
    int order[256], cp[256];
    byte_chars(order, cp);
    snprintf(path, sizeof path, "%s/vocab.json", dir);
    sd_outfile o;
    if (sd_out_open(&o, path)) return -1;
    fputc('{', o.f);
    int id = 0;
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < 256; i++) {
            fputs(id ? ", \"" : "\"", o.f);
            put_utf8(o.f, cp[order[i]]);
            fprintf(o.f, "%s\": %d", pass ? "</w>" : "", id++);
        }
    fprintf(o.f, ", \"<|startoftext|>\": %d, \"<|endoftext|>\": %d}", id, id + 1);
    if (sd_out_commit(&o)) return -1;
    snprintf(path, sizeof path, "%s/merges.txt", dir);
    return write_text(path, "#version: 0.2\n");
}

static int write_model(const char *dir) {
    static const char *sub[] = { "", "/unet", "/vae", "/text_encoder", "/tokenizer", "/scheduler" };
    char p[2048];
    for (size_t i = 0; i < sizeof sub / sizeof sub[0]; i++) {
        snprintf(p, sizeof p, "%s%s", dir, sub[i]);
        if (make_dir(p)) return -1;
    }
    struct { const char *file, *text; } cfg[] = {
        { "model_index.json", "{\"_class_name\": \"StableDiffusionPipeline\", \"_sdref\": \"sdref demo: random weights\"}\n" },
        { "unet/config.json", unet_config }, { "vae/config.json", vae_config },
        { "text_encoder/config.json", text_config }, { "scheduler/scheduler_config.json", scheduler_config },
    };
    for (size_t i = 0; i < sizeof cfg / sizeof cfg[0]; i++) {
        snprintf(p, sizeof p, "%s/%s", dir, cfg[i].file);
        if (write_text(p, cfg[i].text)) return -1;
    }
    snprintf(p, sizeof p, "%s/unet/diffusion_pytorch_model.safetensors", dir);
    if (write_unet(p)) return -1;
    snprintf(p, sizeof p, "%s/vae/diffusion_pytorch_model.safetensors", dir);
    if (write_vae(p)) return -1;
    snprintf(p, sizeof p, "%s/text_encoder/model.safetensors", dir);
    if (write_text_encoder(p)) return -1;
    snprintf(p, sizeof p, "%s/tokenizer", dir);
    return write_tokenizer(p);
}

/* ======================================================================================
 * The demo
 * ====================================================================================== */

static double seconds(void) {   /* wall clock */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* [1,3,H,W] in [0,1] -> [H][W][3] in 0..255 for the metrics (NaN as 0: what a PNG shows) */
static float *to_hwc255(const sd_tensor *x) {
    int H = x->shape[2], W = x->shape[3];
    float *p = sd_malloc((size_t)H * W * 3 * sizeof(float));
    for (int c = 0; c < 3; c++)
        for (int i = 0; i < H * W; i++) {
            float v = x->data[(size_t)c * H * W + i];
            p[(size_t)i * 3 + c] = v != v ? 0.0f : v * 255.0f;
        }
    return p;
}

int cmd_demo(int argc, char **argv) {
    sd_args a;
    args_init(&a, argc, argv);
    const char *out = args_value(&a, "--out");
    int threads;
    if (args_threads(&a, &threads) || args_check_all_used(&a)) return 2;
    if (!out) out = "sdref-demo";
    char model[900], png[3][1100], lat[1100];
    snprintf(model, sizeof model, "%s/model", out);
    printf("sdref demo: Stable Diffusion arithmetic under three precisions, on a model made here\n\n");
    if (make_dir(out) || write_model(model)) return 1;
    printf("  model      a random-weight SD1.x-shaped model (UNet 32/64 channels, VAE 16/32/32/32, CLIP text 2 layers)\n"
           "             written to %s as a diffusers folder; its VAE decoder carries a residual stream 2^%d\n"
           "             times larger than needed, as SDXL's VAE does (GroupNorm hides it in float32)\n", model, V_OVERFLOW_LOG2);
    const char *precisions[3] = { "fp32", "fp16", "fp16-vae32" };
    const char *what[3] = { "float32 everywhere (CPU PyTorch)", "fp16 everywhere (a .half() GPU pipeline)",
                            "fp16, VAE in float32 (A1111 --no-half-vae)" };
    sd_tensor images[3];
    const char *prompt = "a red cat sitting on a blue chair";
    printf("  job        txt2img \"%s\", 128x128, 8 DDIM steps, cfg 7.5, seed 42\n\n", prompt);
    snprintf(lat, sizeof lat, "%s/latents_fp32.npy", out);
    for (int k = 0; k < 3; k++) {
        sd_job j;
        memset(&j, 0, sizeof j);
        snprintf(png[k], sizeof png[k], "%s/%s.png", out, precisions[k]);
        j.model_path = model;
        j.prompt = prompt;
        j.negative = "";
        j.width = j.height = 128;
        j.steps = 8;
        j.cfg = 7.5f;
        j.clip_skip = 1;
        j.sampler = SD_DDIM;
        j.sampler_name = "ddim";
        j.seed = 42;
        j.seed_given = 1;
        j.rng = SD_RNG_CPU;
        j.precision_spec = precisions[k];
        if (sd_precision_parse(precisions[k], &j.prec)) return 1;
        j.threads = threads;
        j.quiet = 1;
        j.out_png = png[k];
        j.latent_out = k == 0 ? lat : NULL;
        j.keep_image = 1;
        double t0 = seconds();
        if (sd_job_run(&j)) return 1;
        images[k] = j.image;
        size_t n = tensor_numel(&j.image), nan = 0;
        for (size_t i = 0; i < n; i++) nan += j.image.data[i] != j.image.data[i];
        printf("  %-11s %-44s %5.1f s  -> %s", precisions[k], what[k], seconds() - t0, png[k]);
        if (nan) printf("   %zu of %zu values NaN: a black picture", nan, n);
        printf("\n");
    }

    /* where fp16 broke: a shadow run of the VAE decoder on the fp32 latents */
    printf("\nWhere fp16 broke (the VAE decoder run in fp16 and in fp32 side by side, layer by layer):\n");
    float *zd;
    int nd;
    int64_t shape[8];
    size_t zn;
    if (npy_read_f32(lat, &zd, &nd, shape, &zn)) return 1;
    sd_tensor z = tensor_new(4, (int)shape[0], (int)shape[1], (int)shape[2], (int)shape[3]);
    for (size_t i = 0; i < zn; i++) z.data[i] = zd[i] / 0.18215f;
    free(zd);
    char vae_path[1100];
    snprintf(vae_path, sizeof vae_path, "%s/vae", model);
    sd_vae_decode_job vr = { vae_path, NULL, &z, threads };
    sd_precision p16, p32;
    sd_precision_parse("fp16", &p16);
    sd_precision_parse("fp32", &p32);
    sd_shadow_result sr;
    if (sd_shadow_run(vae_decode_run, &vr, &p16, &p32, sd_format_max(SD_F16), &sr)) return 1;
    if (sr.first_overflow >= 0)
        printf("  first layer beyond fp16's largest value 65504:  %s (max |x| = %.0f in float32)\n",
               sr.layers[sr.first_overflow].name, sr.layers[sr.first_overflow].ref_max_abs);
    if (sr.first_inf >= 0) printf("  first Inf in the fp16 run:                      %s\n", sr.layers[sr.first_inf].name);
    if (sr.first_nan >= 0) printf("  first NaN in the fp16 run:                      %s (GroupNorm of a group holding Inf)\n",
                                  sr.layers[sr.first_nan].name);
    if (sr.first_overflow < 0) printf("  no layer left fp16's range\n");
    char report[1100];
    snprintf(report, sizeof report, "%s/overflow_report.json", out);
    if (sd_shadow_write_report(&sr, report)) return 1;
    printf("  every layer's magnitude and error: %s\n", report);
    sd_shadow_free(&sr);
    tensor_free(&z);

    /* how far the pictures are apart */
    printf("\nHow far each picture is from the float32 one:\n");
    float *ref = to_hwc255(&images[0]);
    for (int k = 1; k < 3; k++) {
        float *x = to_hwc255(&images[k]);
        sd_image_metrics m;
        sd_image_metrics_compute(x, ref, images[0].shape[3], images[0].shape[2], &m);
        printf("  %-11s PSNR %6.2f dB  SSIM %.4f  mean luma %6.2f vs %6.2f  contrast x%.3f  saturation x%.3f\n", precisions[k],
               m.psnr, m.ssim, m.luma_a, m.luma_b, m.contrast_b > 0 ? m.contrast_a / m.contrast_b : 0,
               m.saturation_b > 0 ? m.saturation_a / m.saturation_b : 0);
        free(x);
    }
    free(ref);
    for (int k = 0; k < 3; k++) tensor_free(&images[k]);
    printf("\nRun a real checkpoint the same way (SD1.5 single file, OpenAI's tokenizer file):\n"
           "  ./sdref txt2img --model v1-5-pruned-emaonly.safetensors --tokenizer bpe_simple_vocab_16e6.txt.gz \\\n"
           "      --prompt \"%s\" --seed 42 --precision fp16 -o cat.png\n"
           "  ./sdref vae-decode --model vae.safetensors --latent z.npy --precision fp16 --shadow fp32 --overflow-report r.json -o x.png\n",
           prompt);
    return 0;
}
