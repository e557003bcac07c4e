/* tests/test_pipeline.c — txt2img end to end on the golden tiny_a model laid out as a diffusers
 * folder: 4 DDIM steps at cfg 7.5 from the recorded noise and token ids must give diffusers'
 * final latents and image (within 1e-4 x max|golden|), step by step; the IP-Adapter run too;
 * and every kind of bad input gets one clear line, a non-zero exit and no output file. */
#include "test.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *G(const char *f) {
    static char buf[4][1024];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s", shared_path(f));
    return buf[k];
}

static int exists(const char *p) {
    struct stat s;
    return stat(p, &s) == 0;
}

/* max |a - b| / max |b| between two .npy files (inf when they cannot be read or differ in size) */
static double npy_rel_diff(const char *a, const char *b) {
    float *x, *y;
    int nx, ny;
    int64_t sx[8], sy[8];
    size_t n, m;
    if (npy_read_f32(a, &x, &nx, sx, &n)) { sd_clear_error(); return INFINITY; }
    if (npy_read_f32(b, &y, &ny, sy, &m)) { free(x); sd_clear_error(); return INFINITY; }
    double md = 0, mb = 0;
    if (n != m) md = INFINITY;
    for (size_t i = 0; i < n && n == m; i++) {
        double d = fabs((double)x[i] - y[i]);
        if (d > md || d != d) md = d != d ? INFINITY : d;
        if (fabs(y[i]) > mb) mb = fabs(y[i]);
    }
    free(x);
    free(y);
    return mb > 0 ? md / mb : md;
}

/* tiny_a as a diffusers folder, made of symlinks into the golden data */
static const char *make_diffusers_folder(void) {
    const char *dir = tmp_path("tiny_a_diffusers");
    if (exists(dir)) return dir;
    const char *g = G("golden/tiny_a");
    int rc = run_cmd("set -e; d='%s'; g=$(cd '%s' && pwd); mkdir -p $d/unet $d/vae $d/text_encoder $d/tokenizer $d/scheduler; "
                     "echo '{\"_class_name\": \"StableDiffusionPipeline\"}' > $d/model_index.json; "
                     "ln -s $g/unet.safetensors $d/unet/diffusion_pytorch_model.safetensors; ln -s $g/unet_config.json $d/unet/config.json; "
                     "ln -s $g/vae.safetensors $d/vae/diffusion_pytorch_model.safetensors; ln -s $g/vae_config.json $d/vae/config.json; "
                     "ln -s $g/text_encoder.safetensors $d/text_encoder/model.safetensors; ln -s $g/text_encoder_config.json $d/text_encoder/config.json; "
                     "ln -s $g/vocab.json $d/tokenizer/vocab.json; ln -s $g/merges.txt $d/tokenizer/merges.txt; "
                     "ln -s $g/scheduler_config.json $d/scheduler/scheduler_config.json", dir, g);
    CHECK(rc == 0, "lay out tiny_a as a diffusers folder");
    return dir;
}

/* the step latents of our trace against the golden trace, in order */
static void compare_steps(const char *ours, const char *prefix) {
    sd_safetensors a, b;
    if (st_open(&a, ours)) { CHECK(0, "open %s: %s", ours, sd_last_error()); sd_clear_error(); return; }
    if (st_open(&b, G("golden/tiny_a/trace.safetensors"))) { CHECK(0, "open golden trace"); st_close(&a); return; }
    int steps = 0;
    for (int i = 0; i < b.n; i++) {
        const st_entry *e = &b.entries[i];
        if (strncmp(e->name, prefix, strlen(prefix)) != 0 || strncmp(e->name + strlen(prefix), ".step", 5) != 0) continue;
        const st_entry *o = st_find(&a, e->name);
        CHECK(o != NULL, "our trace has %s", e->name);
        if (!o) continue;
        size_t n = 1;
        for (int d = 0; d < e->ndim; d++) n *= (size_t)e->shape[d];
        float *x = sd_malloc(n * 4), *y = sd_malloc(n * 4);
        st_read_f32(&a, o, x);
        st_read_f32(&b, e, y);
        double md = 0, mb = 0;
        for (size_t k = 0; k < n; k++) {
            double d = fabs((double)x[k] - y[k]);
            if (d > md) md = d;
            if (fabs(y[k]) > mb) mb = fabs(y[k]);
        }
        CHECK(md <= 1e-4 * mb, "%s: max diff %.3g (%.3g x max|golden|)", e->name, md, md / mb);
        free(x);
        free(y);
        steps++;
    }
    CHECK(steps >= 8, "%s: %d step tensors compared", prefix, steps);
    st_close(&a);
    st_close(&b);
}

static void test_txt2img_golden(void) {
    const char *dir = make_diffusers_folder(), *g = G("golden/tiny_a");
    const char *lat = tmp_path("t2i_lat.npy"), *img = tmp_path("t2i_img.npy"), *png = tmp_path("t2i.png"), *tr = tmp_path("t2i_trace.safetensors");
    int rc = run_cmd("./sdref txt2img --model %s --ids-cond %s/txt2img_ids_cond.npy --ids-uncond %s/txt2img_ids_uncond.npy "
                     "--noise %s/txt2img_noise.npy --steps 4 --cfg 7.5 --sampler ddim --width 64 --height 64 "
                     "--latent-out %s --image-out %s -o %s --trace %s --quiet", dir, g, g, g, lat, img, png, tr);
    CHECK(rc == 0, "txt2img on the tiny_a diffusers folder runs (exit %d)", rc);
    double dl = npy_rel_diff(lat, G("golden/tiny_a/txt2img_latent_out.npy"));
    double di = npy_rel_diff(img, G("golden/tiny_a/txt2img_image.npy"));
    CHECK(dl <= 1e-4, "txt2img latents within 1e-4 x max|golden| (%.3g)", dl);
    CHECK(di <= 1e-4, "txt2img image within 1e-4 x max|golden| (%.3g)", di);
    fprintf(stderr, "  txt2img fp32: latents %.3g, image %.3g (max diff / max|golden|)\n", dl, di);
    compare_steps(tr, "txt2img");
    /* the PNG carries its parameters */
    sd_image im;
    CHECK(png_read_file(png, &im) == 0 && im.width == 64 && im.height == 64, "txt2img PNG decodes at 64x64");
    if (im.pixels) sd_image_free(&im);
    uint8_t *data;
    size_t len;
    if (sd_read_file(png, &data, &len) == 0) {
        int found = 0;
        for (size_t i = 0; i + 20 < len; i++)
            if (memcmp(data + i, "parameters", 10) == 0 && strstr((const char *)data + i + 11, "Steps: 4") != NULL) found = 1;
        CHECK(found, "the PNG has a 'parameters' text chunk in A1111's format");
        free(data);
    }

    /* with the IP-Adapter (zero image embeds for the unconditional half) */
    const char *lat2 = tmp_path("t2i_ip_lat.npy"), *img2 = tmp_path("t2i_ip_img.npy"), *tr2 = tmp_path("t2i_ip_trace.safetensors");
    rc = run_cmd("./sdref txt2img --model %s --ids-cond %s/txt2img_ids_cond.npy --ids-uncond %s/txt2img_ids_uncond.npy "
                 "--noise %s/txt2img_noise.npy --steps 4 --cfg 7.5 --width 64 --height 64 --ip-adapter %s/ip_adapter.safetensors "
                 "--ip-embeds %s/unet_ip_in_image_embeds.npy --ip-scale 1.0 --latent-out %s --image-out %s --trace %s --quiet",
                 dir, g, g, g, g, g, lat2, img2, tr2);
    CHECK(rc == 0, "txt2img with IP-Adapter runs (exit %d)", rc);
    dl = npy_rel_diff(lat2, G("golden/tiny_a/txt2img_ip_latent_out.npy"));
    di = npy_rel_diff(img2, G("golden/tiny_a/txt2img_ip_image.npy"));
    CHECK(dl <= 1e-4, "txt2img+IP latents within 1e-4 x max|golden| (%.3g)", dl);
    CHECK(di <= 1e-4, "txt2img+IP image within 1e-4 x max|golden| (%.3g)", di);
    fprintf(stderr, "  txt2img+IP fp32: latents %.3g, image %.3g\n", dl, di);
    compare_steps(tr2, "txt2img_ip");

    /* from the single-file checkpoint: same numbers */
    const char *lat3 = tmp_path("t2i_ckpt_lat.npy");
    rc = run_cmd("./sdref txt2img --model %s/checkpoint.safetensors --ids-cond %s/txt2img_ids_cond.npy --ids-uncond %s/txt2img_ids_uncond.npy "
                 "--noise %s/txt2img_noise.npy --steps 4 --width 64 --height 64 --latent-out %s --quiet 2>/dev/null",
                 g, g, g, g, lat3);
    /* the checkpoint's components use SD1.5's configs unless told otherwise, which do not fit the
     * tiny model: the run must refuse cleanly (the diffusers folder is the way to give configs) */
    CHECK(rc != 0 && !exists(lat3), "a tiny checkpoint without configs is refused cleanly, not misread");
}

static void test_bad_input(void) {
    const char *dir = make_diffusers_folder(), *g = G("golden/tiny_a");
    char out[4400];
    snprintf(out, sizeof out, "%s", tmp_path("bad.png"));   /* tmp_path's buffers rotate */
    struct { const char *args; const char *what; } cases[] = {
        { "--model /nonexistent/model.safetensors --prompt x", "missing model file" },
        { "--model %s --prompt x", "a folder that is not a diffusers model" },
        { "--model %s --ids-cond %s/txt2img_ids_cond.npy --ids-uncond %s/txt2img_ids_uncond.npy --width 60 --height 64", "width not a multiple of 8" },
        { "--model %s --ids-cond %s/txt2img_ids_cond.npy --ids-uncond %s/txt2img_ids_uncond.npy --sampler heun", "unknown sampler" },
        { "--model %s --ids-cond %s/txt2img_ids_cond.npy --ids-uncond %s/txt2img_ids_uncond.npy --steps 0", "zero steps" },
        { "--model %s --ids-cond %s/txt2img_ids_cond.npy --ids-uncond %s/txt2img_ids_uncond.npy --bogus 1", "unknown option" },
        { "--model %s --ids-cond %s/txt2img_ids_cond.npy --ids-uncond %s/txt2img_ids_uncond.npy --noise %s/unet_out.npy --width 128 --height 128", "noise of the wrong size" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char args[2048];
        const char *first = i == 1 ? g : dir;
        snprintf(args, sizeof args, cases[i].args, first, g, g, g);
        remove(out);
        char errf[64];
        snprintf(errf, sizeof errf, "bad%zu.err", i);
        int rc = run_cmd("./sdref txt2img %s -o %s --quiet 2>%s", args, out, tmp_path(errf));
        uint8_t *err = NULL;
        size_t len = 0;
        sd_read_file(tmp_path(errf), &err, &len);
        int lines = 0;
        for (size_t k = 0; k < len; k++) lines += err[k] == '\n';
        CHECK(rc != 0 && rc < 128, "%s: non-zero exit without a crash (%d)", cases[i].what, rc);
        CHECK(lines == 1 && strncmp((const char *)err, "sdref txt2img: ", 15) == 0, "%s: one clear line (%s)", cases[i].what,
              err ? (const char *)err : "");
        CHECK(!exists(out), "%s: no output file", cases[i].what);
        free(err);
    }
    /* img2img with an unreadable init image */
    const char *notpng = tmp_path("not_a_png.png");
    FILE *f = fopen(notpng, "wb");
    if (f) { fputs("this is not a PNG", f); fclose(f); }
    int rc = run_cmd("./sdref img2img --model %s --ids-cond %s/txt2img_ids_cond.npy --ids-uncond %s/txt2img_ids_uncond.npy "
                     "--init %s --strength 0.5 -o %s --quiet 2>/dev/null", dir, g, g, notpng, out);
    CHECK(rc != 0 && rc < 128 && !exists(out), "img2img: an unreadable init image is refused (exit %d)", rc);
}

static void test_img2img(void) {
    const char *dir = make_diffusers_folder(), *g = G("golden/tiny_a");
    const char *init = tmp_path("init.png"), *out = tmp_path("i2i.png"), *lat = tmp_path("i2i_lat.npy");
    /* an init image: the golden txt2img image as PNG */
    int rc = run_cmd("./sdref txt2img --model %s --ids-cond %s/txt2img_ids_cond.npy --ids-uncond %s/txt2img_ids_uncond.npy "
                     "--noise %s/txt2img_noise.npy --steps 4 --width 64 --height 64 -o %s --quiet", dir, g, g, g, init);
    CHECK(rc == 0, "make an init image");
    rc = run_cmd("./sdref img2img --model %s --ids-cond %s/txt2img_ids_cond.npy --ids-uncond %s/txt2img_ids_uncond.npy "
                 "--init %s --strength 0.5 --steps 4 --seed 7 -o %s --latent-out %s --quiet", dir, g, g, init, out, lat);
    CHECK(rc == 0 && exists(out) && exists(lat), "img2img runs (exit %d)", rc);
    /* strength 0 runs no step: the latents are the encoded image sample */
    const char *lat0 = tmp_path("i2i_lat0.npy");
    rc = run_cmd("./sdref img2img --model %s --ids-cond %s/txt2img_ids_cond.npy --ids-uncond %s/txt2img_ids_uncond.npy "
                 "--init %s --strength 0 --steps 4 --seed 7 --latent-out %s --quiet", dir, g, g, init, lat0);
    CHECK(rc == 0 && exists(lat0), "img2img at strength 0 runs");
}

void test_pipeline(void) {
    if (!have_shared()) { CHECK(0, "golden data not found"); return; }
    if (!exists("./sdref")) { CHECK(0, "./sdref not built (make sdref)"); return; }
    test_txt2img_golden();
    test_img2img();
    test_bad_input();
}
