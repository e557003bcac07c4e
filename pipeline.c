/* pipeline.c — the main job: prompt (and optionally an image prompt) in, picture out.
 *
 *   text -> tokenizer -> CLIP text encoder -> [uncond, cond] context
 *   noise (torch-compatible RNG or a file) -> sampler loop: UNet on [uncond, cond] in one call,
 *   classifier-free guidance, scheduler step -> VAE decode -> PNG with A1111-style parameters.
 *
 * Models come from a single-file checkpoint (A1111/ComfyUI) or a diffusers folder. This follows
 * diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline step by step. */
#define _POSIX_C_SOURCE 200809L
#include "sdref.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

/* ======================================================================================
 * Model files: a single .safetensors checkpoint or a diffusers folder
 * ====================================================================================== */

static int is_dir(const char *p) {
    struct stat s;
    return stat(p, &s) == 0 && S_ISDIR(s.st_mode);
}

static int is_file(const char *p) {
    struct stat s;
    return stat(p, &s) == 0 && S_ISREG(s.st_mode);
}

static char *join(const char *a, const char *b) {
    size_t n = strlen(a) + strlen(b) + 2;
    char *s = sd_malloc(n);
    snprintf(s, n, "%s/%s", a, b);
    return s;
}

/* Where each part of a model lives. NULL config = the loader's default (SD1.5) or the folder's. */
typedef struct model_paths {
    char *unet, *vae, *text, *tokenizer, *scheduler_config;
    int diffusers;
} model_paths;

static void model_paths_free(model_paths *m) {
    free(m->unet); free(m->vae); free(m->text); free(m->tokenizer); free(m->scheduler_config);
    memset(m, 0, sizeof *m);
}

static int find_model(const char *path, model_paths *m) {
    memset(m, 0, sizeof *m);
    if (is_dir(path)) {
        char *index = join(path, "model_index.json"), *unet = join(path, "unet");
        int ok = is_file(index) && is_dir(unet);
        free(index);
        free(unet);
        if (!ok) {
            sd_error("%s: not a diffusers model folder (needs model_index.json and unet/, vae/, text_encoder/, "
                     "tokenizer/, scheduler/) and not a .safetensors checkpoint", path);
            return -1;
        }
        m->diffusers = 1;
        m->unet = join(path, "unet");
        m->vae = join(path, "vae");
        m->text = join(path, "text_encoder");
        m->tokenizer = join(path, "tokenizer");
        char *sc = join(path, "scheduler/scheduler_config.json");
        if (is_file(sc)) m->scheduler_config = sc;
        else free(sc);
        const char *need[3] = { m->vae, m->text, m->tokenizer };
        const char *what[3] = { "vae/", "text_encoder/", "tokenizer/" };
        for (int i = 0; i < 3; i++)
            if (!is_dir(need[i])) {
                sd_error("%s: diffusers folder without %s", path, what[i]);
                model_paths_free(m);
                return -1;
            }
        return 0;
    }
    if (!is_file(path)) {
        sd_error("%s: no such model file or folder", path);
        return -1;
    }
    m->unet = sd_strdup(path);   /* single file: every part from the same checkpoint */
    m->vae = sd_strdup(path);
    m->text = sd_strdup(path);
    return 0;
}

/* ======================================================================================
 * Progress on stderr
 * ====================================================================================== */

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void progress(int done, int total, double t0, int quiet) {
    if (quiet) return;
    double el = now_seconds() - t0, per = done ? el / done : 0;
    int width = 30, fill = total ? done * width / total : width;
    fprintf(stderr, "\r  [");
    for (int i = 0; i < width; i++) fputc(i < fill ? '#' : '.', stderr);
    fprintf(stderr, "] step %d/%d  %.2f s/step  elapsed %.1f s  ETA %.1f s ", done, total, per, el, per * (total - done));
    if (done == total) fputc('\n', stderr);
    fflush(stderr);
}

/* ======================================================================================
 * The job
 * ====================================================================================== */



static void trace_named(sd_trace *t, const char *name, const sd_tensor *x) {
    if (!t) return;
    sd_ctx c;
    memset(&c, 0, sizeof c);
    c.trace = t;
    c.prefix = "";
    sd_trace_tensor(&c, name, x);
}

static sd_ctx make_ctx(const sd_job *j, sd_model_kind k, const char *prefix) {
    sd_ctx c;
    memset(&c, 0, sizeof c);
    c.pol = j->prec.model[k];
    c.trace = j->trace;
    c.prefix = prefix;
    c.threads = j->threads;
    return c;
}

/* token ids of one prompt (or an ids .npy) */
static int get_ids(const char *npy_path, const char *text, const sd_tokenizer *tok, int len, int *ids) {
    if (npy_path) {
        float *d;
        int nd;
        int64_t shape[8];
        size_t n;
        if (npy_read_f32(npy_path, &d, &nd, shape, &n)) return -1;
        if ((int)n != len) {
            sd_error("%s: expected %d token ids, found %zu", npy_path, len, n);
            free(d);
            return -1;
        }
        for (int i = 0; i < len; i++) ids[i] = (int)d[i];
        free(d);
        return 0;
    }
    return tok_encode_padded(tok, text, len, ids);
}

/* The context [uncond, cond] for classifier-free guidance. */
static int encode_prompts(sd_job *j, const model_paths *m, const char *tokenizer_path, sd_tensor *context) {
    double t0 = now_seconds();
    sd_clip_text *te = clip_text_load(m->text, NULL, &j->prec.model[SD_TEXT]);
    if (!te) return -1;
    int len = clip_text_max_length(te);
    sd_tokenizer *tok = NULL;
    if (!j->ids_cond_path) {
        if (!tokenizer_path) {
            sd_error("--prompt needs a tokenizer: pass --tokenizer DIR|bpe_simple_vocab_16e6.txt.gz (a single-file "
                     "checkpoint carries none), or --ids-cond/--ids-uncond");
            clip_text_free(te);
            return -1;
        }
        tok = tok_load(tokenizer_path);
        if (!tok) {
            clip_text_free(te);
            return -1;
        }
    }
    int *ids = sd_malloc((size_t)2 * len * sizeof(int));
    int rc = get_ids(j->ids_uncond_path, j->negative ? j->negative : "", tok, len, ids);
    if (!rc) rc = get_ids(j->ids_cond_path, j->prompt, tok, len, ids + len);
    if (tok) tok_free(tok);
    if (!rc) {
        for (int i = 0; i < 2 * len && !rc; i++)
            if (ids[i] < 0 || ids[i] >= clip_text_vocab_size(te)) {
                sd_error("token id %d is outside the text encoder's vocabulary (%d)", ids[i], clip_text_vocab_size(te));
                rc = -1;
            }
    }
    if (!rc) {
        sd_ctx c = make_ctx(j, SD_TEXT, "text_encoder");
        *context = clip_text_forward(te, &c, ids, 2, len, j->clip_skip);
    }
    free(ids);
    clip_text_free(te);
    j->seconds_text = now_seconds() - t0;
    return rc;
}

/* IP-Adapter tokens for [uncond, cond]: the uncond half as diffusers makes it (base: the
 * projection of a zero embedding; Plus / Full-face: the hidden states of an all-zero image). */
static int ip_tokens(sd_job *j, const sd_ipadapter *ad, sd_tensor *tokens) {
    sd_ctx cv = make_ctx(j, SD_VISION, "image_encoder"), ci = make_ctx(j, SD_IPADAPTER, "ipadapter");
    sd_tensor input;                                          /* [2, ...]: zeros, then the image's */
    memset(&input, 0, sizeof input);
    if (j->ip_embeds_path) {
        float *d;
        int nd;
        int64_t shape[8];
        size_t n;
        if (npy_read_f32(j->ip_embeds_path, &d, &nd, shape, &n)) return -1;
        if (ipadapter_wants_hidden_states(ad)) {
            int T = nd >= 2 ? (int)shape[nd - 2] : 1, E = (int)shape[nd - 1];
            input = tensor_new(3, 2, T, E, 1);
            if ((size_t)T * E != n) { free(d); sd_error("%s: expected hidden states [1, T, E]", j->ip_embeds_path); return -1; }
            memcpy(input.data + (size_t)T * E, d, n * sizeof(float));
            sd_error("%s: this %s IP-Adapter needs the encoder's hidden states of an all-zero image for the "
                     "unconditional half: pass --ip-image with --image-encoder", j->ip_embeds_path, ipadapter_kind(ad));
            free(d);
            tensor_free(&input);
            return -1;
        }
        input = tensor_new(2, 2, (int)n, 1, 1);
        memcpy(input.data + n, d, n * sizeof(float));
        free(d);
    } else {
        sd_image im;
        if (!j->image_encoder_path) {
            sd_error("--ip-image needs --image-encoder PATH (h94's models/image_encoder)");
            return -1;
        }
        if (png_read_file(j->ip_image_path, &im)) return -1;
        sd_clip_vision *enc = clip_vision_load(j->image_encoder_path, j->image_encoder_config, &j->prec.model[SD_VISION]);
        if (!enc) { sd_image_free(&im); return -1; }
        sd_tensor px;
        int S = clip_vision_image_size(enc);
        if (clip_preprocess(&im, S, &px, NULL)) { sd_image_free(&im); clip_vision_free(enc); return -1; }
        sd_image_free(&im);
        sd_tensor both = tensor_new(4, 2, 3, S, S);           /* an all-zero image, then ours */
        memcpy(both.data + (size_t)3 * S * S, px.data, (size_t)3 * S * S * sizeof(float));
        tensor_free(&px);
        sd_tensor pen, embeds = clip_vision_forward(enc, &cv, &both, &pen, NULL);
        tensor_free(&both);
        clip_vision_free(enc);
        if (!embeds.data) return -1;
        if (ipadapter_wants_hidden_states(ad)) {
            input = pen;
            tensor_free(&embeds);
        } else {
            input = embeds;
            tensor_free(&pen);
            memset(input.data, 0, tensor_numel(&input) / 2 * sizeof(float));   /* zero embeds for uncond */
        }
    }
    *tokens = ipadapter_tokens(ad, &ci, &input);
    tensor_free(&input);
    return tokens->data ? 0 : -1;
}

/* latents [1,4,h,w] of noise: a file, or the torch-compatible generator */
static int initial_noise(sd_job *j, sd_rng *rng, int C, int h, int w, sd_tensor *noise) {
    *noise = tensor_new(4, 1, C, h, w);
    if (j->noise_path) {
        float *d;
        int nd;
        int64_t shape[8];
        size_t n;
        if (npy_read_f32(j->noise_path, &d, &nd, shape, &n)) { tensor_free(noise); return -1; }
        if (n != tensor_numel(noise)) {
            sd_error("%s: noise has %zu values, the latents [1,%d,%d,%d] need %zu", j->noise_path, n, C, h, w, tensor_numel(noise));
            free(d);
            tensor_free(noise);
            return -1;
        }
        memcpy(noise->data, d, n * sizeof(float));
        free(d);
        return 0;
    }
    sd_rng_randn(rng, noise->data, tensor_numel(noise));
    return 0;
}

/* The A1111 "parameters" text: prompt, negative prompt, then "Key: value, ..." */
static char *a1111_parameters(const sd_job *j, const char *model_path) {
    char *s = sd_malloc(8192 + (j->prompt ? strlen(j->prompt) : 0) + (j->negative ? strlen(j->negative) : 0));
    const char *base = strrchr(model_path, '/');
    base = base && base[1] ? base + 1 : model_path;
    static const char *names[] = { "DDIM", "Euler", "Euler a", "DPM++ 2M" };
    int k = sprintf(s, "%s\n", j->prompt ? j->prompt : "");
    if (j->negative && *j->negative) k += sprintf(s + k, "Negative prompt: %s\n", j->negative);
    k += sprintf(s + k, "Steps: %d, Sampler: %s%s, Schedule type: %s, CFG scale: %g, Seed: %llu, Size: %dx%d, Model: %s",
                 j->steps, names[j->sampler], j->karras ? " Karras" : "", j->karras ? "Karras" : "Automatic", j->cfg,
                 (unsigned long long)j->seed, j->width, j->height, base);
    if (j->init_path) k += sprintf(s + k, ", Denoising strength: %g", j->strength);
    if (j->clip_skip > 1) k += sprintf(s + k, ", Clip skip: %d", j->clip_skip);
    if (j->ip_path) k += sprintf(s + k, ", IP-Adapter weight: %g", j->ip_scale);
    k += sprintf(s + k, ", RNG: %s, Version: sdref %s, sdref precision: %s", j->rng == SD_RNG_CPU ? "CPU" : "NV", SDREF_VERSION,
                 j->precision_spec ? j->precision_spec : "fp32");
    if (j->nan_fallback_used) sprintf(s + k, ", sdref VAE fallback: %s", j->fallback_spec);
    return s;
}

/* image [1,3,H,W] in [-1,1] -> clamp(x/2 + 0.5, 0, 1) as float [1,3,H,W] */
static sd_tensor to_unit_range(const sd_tensor *x) {
    sd_tensor y = tensor_copy(x);
    for (size_t i = 0; i < tensor_numel(&y); i++) {
        float v = y.data[i] / 2 + 0.5f;
        y.data[i] = v != v ? v : v < 0 ? 0 : v > 1 ? 1 : v;
    }
    return y;
}

static size_t count_non_finite(const sd_tensor *x) {
    size_t bad = 0;
    for (size_t i = 0; i < tensor_numel(x); i++) bad += !isfinite(x->data[i]);
    return bad;
}

/* [1,3,H,W] in [0,1] -> RGB8, as numpy's (x * 255).round() (half to even); NaN black */
uint8_t *sd_image_rgb8(const sd_tensor *x) {
    int H = x->shape[2], W = x->shape[3];
    uint8_t *p = sd_malloc((size_t)H * W * 3);
    for (int c = 0; c < 3; c++)
        for (int i = 0; i < H * W; i++) {
            float v = x->data[(size_t)c * H * W + i] * 255.0f;
            double r = v != v ? 0 : floor((double)v + 0.5);
            if (r - v == 0.5 && fmod(r, 2.0) != 0) r -= 1;       /* ties to even */
            p[(size_t)i * 3 + c] = (uint8_t)(r < 0 ? 0 : r > 255 ? 255 : r);
        }
    return p;
}

int sd_job_run(sd_job *j) {
    const char *model_path = j->model_path, *vae_path = j->vae_path, *tokenizer_path = j->tokenizer_path;
    model_paths m;
    if (find_model(model_path, &m)) return -1;
    if (!tokenizer_path) tokenizer_path = m.tokenizer;
    int rc = -1;
    sd_unet *unet = NULL;
    sd_vae *vae = NULL;
    sd_ipadapter *ad = NULL;
    sd_scheduler *sch = NULL;
    sd_tensor context = { 0, { 0, 0, 0, 0 }, NULL }, iptok = context, latents = context, noise = context;
    sd_sched_config cfg;
    sched_config_default(&cfg);
    if (m.scheduler_config && sched_config_load(&cfg, m.scheduler_config)) goto done;
    if (j->karras) cfg.karras = 1;
    sch = sched_new(&cfg, j->sampler, j->steps);
    if (!sch) goto done;

    /* 1. the prompts */
    if (encode_prompts(j, &m, tokenizer_path, &context)) goto done;
    /* 2. the models */
    unet = unet_load(m.unet, NULL, &j->prec.model[SD_UNET]);
    if (!unet) goto done;
    vae = vae_load(vae_path ? vae_path : m.vae, NULL, &j->prec.model[SD_VAE]);
    if (!vae) goto done;
    if (context.shape[2] != unet_cross_attention_dim(unet)) {
        sd_error("the text encoder's width %d does not match the UNet's cross-attention width %d", context.shape[2],
                 unet_cross_attention_dim(unet));
        goto done;
    }
    if (j->ip_path) {
        ad = ipadapter_load(j->ip_path, NULL, &j->prec.model[SD_IPADAPTER]);
        if (!ad || unet_ip_fits(unet, ad) != 0 || ip_tokens(j, ad, &iptok)) goto done;
    }
    /* 3. the initial latents (txt2img: noise * init sigma; img2img: the encoded image, noised) */
    int C = unet_in_channels(unet), h = j->height / 8, w = j->width / 8;
    sd_rng rng;
    sd_rng_init(&rng, j->rng, j->seed);
    int first = 0;
    if (j->init_path) {
        sd_image im;
        if (png_read_file(j->init_path, &im)) goto done;
        if (im.width % 8 || im.height % 8) {
            sd_error("%s: %dx%d is not a multiple of 8 (the VAE downsamples by 8)", j->init_path, im.width, im.height);
            sd_image_free(&im);
            goto done;
        }
        j->width = im.width;
        j->height = im.height;
        h = im.height / 8;
        w = im.width / 8;
        sd_tensor img = tensor_new(4, 1, 3, im.height, im.width);   /* [0,255] -> [-1,1] */
        for (int c = 0; c < 3; c++)
            for (int i = 0; i < im.width * im.height; i++) {
                double v = im.depth == 16 ? ((uint16_t *)im.pixels)[(size_t)i * 4 + c] / 257.0 : ((uint8_t *)im.pixels)[(size_t)i * 4 + c];
                img.data[(size_t)c * im.width * im.height + i] = (float)(v / 255.0 * 2.0 - 1.0);
            }
        sd_image_free(&im);
        sd_ctx cv = make_ctx(j, SD_VAE, "vae");
        sd_tensor mean, logvar;
        double t0 = now_seconds();
        vae_encode(vae, &cv, &img, &mean, &logvar);
        j->seconds_vae += now_seconds() - t0;
        tensor_free(&img);
        /* latent_dist.sample(generator): mean + exp(0.5 logvar) * randn, then * scaling_factor */
        sd_tensor eps = tensor_new(4, 1, C, h, w);
        sd_rng_randn(&rng, eps.data, tensor_numel(&eps));
        latents = tensor_new(4, 1, C, h, w);
        float sf = vae_scaling_factor(vae);
        for (size_t i = 0; i < tensor_numel(&latents); i++)
            latents.data[i] = (mean.data[i] + sd_expf(0.5f * logvar.data[i]) * eps.data[i]) * sf;
        tensor_free(&eps);
        tensor_free(&mean);
        tensor_free(&logvar);
        first = sched_img2img_start(sch, j->strength);
        if (initial_noise(j, &rng, C, h, w, &noise)) goto done;
        if (first < sched_num_steps(sch)) {
            sd_tensor noised = tensor_new(4, 1, C, h, w);
            sched_add_noise(sch, first, latents.data, noise.data, noised.data, tensor_numel(&noised));
            tensor_free(&latents);
            latents = noised;
        }
    } else {
        if (initial_noise(j, &rng, C, h, w, &noise)) goto done;
        latents = tensor_copy(&noise);
        float s0 = sched_init_noise_sigma(sch);
        for (size_t i = 0; i < tensor_numel(&latents); i++) latents.data[i] *= s0;
    }
    trace_named(j->trace, j->init_path ? "img2img.latents_initial" : "txt2img.latents_initial", &latents);

    /* 4. the sampler loop: UNet on [uncond, cond], guidance, step */
    size_t n = tensor_numel(&latents);
    /* trace names as diffusers' golden runs: txt2img / txt2img_ip / img2img / img2img_ip */
    const char *what = j->init_path ? (ad ? "img2img_ip" : "img2img") : (ad ? "txt2img_ip" : "txt2img");
    double t0 = now_seconds();
    int total = sched_num_steps(sch) - first;
    if (!j->quiet) fprintf(stderr, "sdref %s: %d steps of %s at %dx%d, cfg %g, precision %s\n", what, total,
                           j->sampler_name, j->width, j->height, j->cfg, j->precision_spec ? j->precision_spec : "fp32");
    for (int i = first; i < sched_num_steps(sch); i++) {
        float t = sched_timestep(sch, i);
        sd_tensor x2 = tensor_new(4, 2, C, h, w);
        sched_scale_model_input(sch, i, latents.data, x2.data, n);
        memcpy(x2.data + n, x2.data, n * sizeof(float));
        float ts[2] = { t, t };
        char prefix[64];
        snprintf(prefix, sizeof prefix, "%s.step%d.unet", what, i);
        sd_ctx cu = make_ctx(j, SD_UNET, prefix);
        sd_unet_ip ip = { ad, iptok.data ? &iptok : NULL, j->ip_scale };
        sd_tensor out = unet_forward(unet, &cu, &x2, ts, &context, ad ? &ip : NULL);
        tensor_free(&x2);
        char name[96];
        snprintf(name, sizeof name, "%s.step%d.unet_out_uncond_cond", what, i);
        trace_named(j->trace, name, &out);
        float *guided = sd_malloc(n * sizeof(float));
        sched_cfg(out.data, out.data + n, j->cfg, guided, n);
        tensor_free(&out);
        float *step_noise = NULL;
        if (sched_needs_noise(sch)) {
            step_noise = sd_malloc(n * sizeof(float));
            sd_rng_randn(&rng, step_noise, n);
        }
        sched_step(sch, i, guided, latents.data, step_noise, n);
        free(guided);
        free(step_noise);
        snprintf(name, sizeof name, "%s.step%d.t%d.latents_after", what, i, (int)t);
        trace_named(j->trace, name, &latents);
        progress(i - first + 1, total, t0, j->quiet);
    }
    j->seconds_unet = now_seconds() - t0;
    if (j->latent_out && npy_write_tensor(j->latent_out, &latents)) goto done;

    /* 5. decode: latents / scaling_factor -> image */
    {
        sd_tensor z = tensor_copy(&latents);
        float sf = vae_scaling_factor(vae);
        for (size_t i = 0; i < n; i++) z.data[i] /= sf;
        sd_ctx cv = make_ctx(j, SD_VAE, "vae");
        double tv = now_seconds();
        sd_tensor img = vae_decode(vae, &cv, &z);
        size_t bad = count_non_finite(&img);
        if (bad && j->nan_fallback) {                         /* A1111's "revert VAE to 32-bit" */
            if (!j->quiet)
                fprintf(stderr, "sdref %s: the decoded image has %zu Inf/NaN values; decoding again with the VAE in %s "
                                "(--nan-fallback)\n", what, bad, j->fallback_spec);
            vae_free(vae);
            vae = vae_load(vae_path ? vae_path : m.vae, NULL, &j->fallback_prec.model[SD_VAE]);
            if (!vae) { tensor_free(&z); tensor_free(&img); goto done; }
            tensor_free(&img);
            cv.pol = j->fallback_prec.model[SD_VAE];
            cv.prefix = "vae_fallback";
            img = vae_decode(vae, &cv, &z);
            bad = count_non_finite(&img);
            j->nan_fallback_used = 1;
        }
        j->seconds_vae += now_seconds() - tv;
        tensor_free(&z);
        sd_tensor unit = to_unit_range(&img);
        tensor_free(&img);
        if (bad && !j->quiet)
            fprintf(stderr, "sdref %s: warning: %zu Inf/NaN values in the decoded image (an fp16 VAE overflow? try "
                            "--precision fp16-vae32 or --nan-fallback fp32)\n", what, bad);
        if (j->image_out && npy_write_tensor(j->image_out, &unit)) { tensor_free(&unit); goto done; }
        if (j->keep_image) {                                  /* for callers (report, demo) */
            tensor_free(&j->image);
            j->image = tensor_copy(&unit);
        }
        if (j->out_png) {
            uint8_t *rgb = sd_image_rgb8(&unit);
            char *params = a1111_parameters(j, model_path);
            const char *keys[1] = { "parameters" }, *vals[1] = { params };
            int prc = png_write_file(j->out_png, unit.shape[3], unit.shape[2], 3, rgb, 1, keys, vals);
            free(rgb);
            free(params);
            if (prc) { tensor_free(&unit); goto done; }
        }
        tensor_free(&unit);
    }
    rc = 0;
done:
    tensor_free(&context);
    tensor_free(&iptok);
    tensor_free(&latents);
    tensor_free(&noise);
    if (sch) sched_free(sch);
    if (unet) unet_free(unet);
    if (vae) vae_free(vae);
    if (ad) ipadapter_free(ad);
    model_paths_free(&m);
    return rc;
}

/* ======================================================================================
 * Command lines
 * ====================================================================================== */

static int parse_int(const char *flag, const char *s, long lo, long hi, long *out) {
    char *end;
    long v = strtol(s, &end, 10);
    if (end == s || *end || v < lo || v > hi) {
        sd_error("%s: '%s' is not an integer in %ld..%ld", flag, s, lo, hi);
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_float(const char *flag, const char *s, double lo, double hi, double *out) {
    char *end;
    double v = strtod(s, &end);
    if (end == s || *end || !(v >= lo && v <= hi)) {
        sd_error("%s: '%s' is not a number in %g..%g", flag, s, lo, hi);
        return -1;
    }
    *out = v;
    return 0;
}

int sd_job_from_args(sd_args *a, sd_job *j, int img2img) {
    memset(j, 0, sizeof *j);
    j->model_path = args_value(a, "--model");
    j->vae_path = args_value(a, "--vae");
    j->tokenizer_path = args_value(a, "--tokenizer");
    j->prompt = args_value(a, "--prompt");
    j->negative = args_value(a, "--negative");
    j->ids_cond_path = args_value(a, "--ids-cond");
    j->ids_uncond_path = args_value(a, "--ids-uncond");
    j->noise_path = args_value(a, "--noise");
    j->ip_path = args_value(a, "--ip-adapter");
    j->ip_embeds_path = args_value(a, "--ip-embeds");
    j->ip_image_path = args_value(a, "--ip-image");
    j->image_encoder_path = args_value(a, "--image-encoder");
    j->image_encoder_config = args_value(a, "--image-encoder-config");
    j->out_png = args_value(a, "-o");
    j->latent_out = args_value(a, "--latent-out");
    j->image_out = args_value(a, "--image-out");
    j->init_path = img2img ? args_value(a, "--init") : NULL;
    j->quiet = args_flag(a, "--quiet");
    const char *s_steps = args_value(a, "--steps"), *s_cfg = args_value(a, "--cfg"), *s_seed = args_value(a, "--seed");
    const char *s_w = args_value(a, "--width"), *s_h = args_value(a, "--height"), *s_sampler = args_value(a, "--sampler");
    const char *s_rng = args_value(a, "--rng"), *s_ipscale = args_value(a, "--ip-scale"), *s_skip = args_value(a, "--clip-skip");
    const char *s_strength = img2img ? args_value(a, "--strength") : NULL;
    j->precision_spec = args_value(a, "--precision");
    if (sd_precision_parse(j->precision_spec ? j->precision_spec : "fp32", &j->prec)) return -1;
    j->fallback_spec = args_value(a, "--nan-fallback");
    if (j->fallback_spec) {
        if (sd_precision_parse(j->fallback_spec, &j->fallback_prec)) return -1;
        j->nan_fallback = 1;
    }
    if (args_threads(a, &j->threads)) return -1;
    long v;
    double d;
    j->steps = 20; j->cfg = 7.5f; j->width = j->height = 512; j->clip_skip = 1; j->ip_scale = 1.0f; j->strength = 0.75;
    j->rng = SD_RNG_CPU;
    j->sampler_name = "ddim";
    if (s_steps) { if (parse_int("--steps", s_steps, 1, 1000, &v)) return -1; j->steps = (int)v; }
    if (s_cfg) { if (parse_float("--cfg", s_cfg, 0, 100, &d)) return -1; j->cfg = (float)d; }
    if (s_seed) { char *end; unsigned long long sv = strtoull(s_seed, &end, 10);
                  if (end == s_seed || *end || s_seed[0] == '-') { sd_error("--seed: '%s' is not a non-negative integer", s_seed); return -1; }
                  j->seed = sv; j->seed_given = 1; }
    if (s_w) { if (parse_int("--width", s_w, 8, 16384, &v)) return -1; j->width = (int)v; }
    if (s_h) { if (parse_int("--height", s_h, 8, 16384, &v)) return -1; j->height = (int)v; }
    if (s_skip) { if (parse_int("--clip-skip", s_skip, 1, 12, &v)) return -1; j->clip_skip = (int)v; }
    if (s_ipscale) { if (parse_float("--ip-scale", s_ipscale, -10, 10, &d)) return -1; j->ip_scale = (float)d; }
    if (s_strength) { if (parse_float("--strength", s_strength, 0, 1, &d)) return -1; j->strength = d; }
    if (s_sampler) { if (sched_parse_sampler(s_sampler, &j->sampler, &j->karras)) return -1; j->sampler_name = s_sampler; }
    if (s_rng) {
        if (!strcmp(s_rng, "cpu")) j->rng = SD_RNG_CPU;
        else if (!strcmp(s_rng, "cuda")) j->rng = SD_RNG_CUDA;
        else { sd_error("--rng: '%s' is not cpu or cuda", s_rng); return -1; }
    }
    if (sd_last_error()[0]) return -1;
    return 0;
}

int sd_job_check(const sd_job *j, int img2img) {
    if (!j->model_path) { sd_error("--model PATH is required (a .safetensors checkpoint or a diffusers folder)"); return -1; }
    if (!j->prompt && !j->ids_cond_path) { sd_error("--prompt TEXT (or --ids-cond IDS.npy --ids-uncond IDS.npy) is required"); return -1; }
    if (!!j->ids_cond_path != !!j->ids_uncond_path) { sd_error("--ids-cond and --ids-uncond go together"); return -1; }
    if (j->width % 8 || j->height % 8) { sd_error("--width/--height %dx%d: both must be multiples of 8", j->width, j->height); return -1; }
    if (j->noise_path && j->seed_given) { sd_error("--noise and --seed exclude each other"); return -1; }
    if (j->ip_path && !j->ip_embeds_path && !j->ip_image_path) { sd_error("--ip-adapter needs --ip-embeds E.npy or --ip-image IMG"); return -1; }
    if (!j->ip_path && (j->ip_embeds_path || j->ip_image_path)) { sd_error("--ip-embeds/--ip-image need --ip-adapter FILE"); return -1; }
    if (img2img && !j->init_path) { sd_error("img2img needs --init IMG.png"); return -1; }
    return 0;
}

/* The job under one precision of a shadow run: a copy of it, tracing, its image kept. */
int sd_job_shadow_run(void *arg, const sd_precision *prec, sd_trace *trace) {
    sd_job_shadow *s = arg;
    sd_job j = *s->job;
    int call = s->calls++;
    j.prec = *prec;
    j.trace = trace;
    trace->filter = (char *)s->filter;
    j.keep_image = 1;
    memset(&j.image, 0, sizeof j.image);
    if (call != s->write_outputs) j.out_png = j.latent_out = j.image_out = NULL;
    const char *spec = call == 0 ? s->spec_ref : s->spec_test;
    if (spec) j.precision_spec = spec;
    int rc = sd_job_run(&j);
    if (call < 3) s->image[call] = j.image;
    else tensor_free(&j.image);
    return rc;
}

void sd_job_shadow_free(sd_job_shadow *s) {
    for (int i = 0; i < 3; i++) tensor_free(&s->image[i]);
}

/* The narrowest storage format of the models a job runs: the range a shadow run checks. */
static double job_range_max(const sd_job *j) {
    sd_model_kind used[5] = { SD_TEXT, SD_UNET, SD_VAE, SD_VISION, SD_IPADAPTER };
    double m = sd_format_max(SD_F32);
    for (int i = 0; i < (j->ip_path ? 5 : 3); i++) {
        double r = sd_format_max(j->prec.model[used[i]].storage);
        if (r < m) m = r;
    }
    return m;
}

/* --shadow SPEC: the job under SPEC (the reference) and under --precision in lockstep, the
 * per-layer table on stderr; the test run writes the job's outputs (and --trace). */
static int shadow_command(sd_job *j, const sd_precision *ref, const char *spec_ref, const char *report_path, sd_trace *trace, const char *trace_path) {
    sd_job_shadow s;
    memset(&s, 0, sizeof s);
    s.job = j;
    s.filter = trace_path ? trace->filter : NULL;
    s.write_outputs = 1;
    s.spec_ref = spec_ref;
    sd_shadow_result r;
    int rc = sd_shadow_run(sd_job_shadow_run, &s, &j->prec, ref, job_range_max(j), &r);
    if (!rc) sd_shadow_print(&r, stderr);
    if (!rc && report_path) rc = sd_shadow_write_report(&r, report_path);
    if (!rc && trace_path) rc = sd_trace_write(&r.test, trace_path);   /* the tested run: statistics and errors */
    sd_shadow_free(&r);
    sd_job_shadow_free(&s);
    return rc;
}

static int pipeline_command(int argc, char **argv, int img2img) {
    sd_args a;
    args_init(&a, argc, argv);
    sd_job j;
    if (sd_job_from_args(&a, &j, img2img)) return 2;
    sd_trace trace;
    const char *trace_path = NULL;
    int want_trace = args_trace(&a, &trace, &trace_path);
    if (want_trace < 0) return 2;
    sd_precision ref;
    const char *report_path;
    int nan_check, want_shadow = args_shadow(&a, &ref, &report_path, &nan_check);
    if (want_shadow < 0) return 2;
    if (want_shadow && nan_check) {
        sd_error("--nan-check and --shadow exclude each other (a shadow run reports the first Inf/NaN itself)");
        return 2;
    }
    if (args_check_all_used(&a) || sd_job_check(&j, img2img)) return 2;
    if (!j.out_png && !j.latent_out && !j.image_out) j.out_png = img2img ? "img2img.png" : "txt2img.png";
    if (want_trace) j.trace = &trace;
    if (nan_check) {                                          /* a statistics-only trace that stops at the first Inf/NaN */
        trace.nan_check = 1;
        j.trace = &trace;
    }
    double t0 = now_seconds();
    int rc;
    if (want_shadow) rc = shadow_command(&j, &ref, args_value(&a, "--shadow"), report_path, &trace, want_trace ? trace_path : NULL);
    else rc = sd_job_run(&j);
    if (rc == 0 && want_trace && !want_shadow) rc = sd_trace_write(&trace, trace_path);
    sd_trace_free(&trace);
    free(a.used);
    if (rc) return 1;
    if (!j.quiet)
        fprintf(stderr, "sdref %s: done in %.1f s (text %.1f s, unet %.1f s, vae %.1f s)%s%s\n", img2img ? "img2img" : "txt2img",
                now_seconds() - t0, j.seconds_text, j.seconds_unet, j.seconds_vae, j.out_png ? ", wrote " : "",
                j.out_png ? j.out_png : "");
    return 0;
}

int cmd_txt2img(int argc, char **argv) { return pipeline_command(argc, argv, 0); }
int cmd_img2img(int argc, char **argv) { return pipeline_command(argc, argv, 1); }
