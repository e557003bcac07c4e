/* report.c — `sdref report`: one job under two precisions, side by side, on one self-contained
 * HTML page (no external assets: images are PNG data URIs, charts inline SVG).
 *
 *   the job under --precision A (the reference) and --vs B (the one tested), same seed and noise,
 *   as a shadow run (lab.c): A's run, B's run, and B's run fed A's tensors layer by layer;
 *   -> the two pictures, an amplified difference heat map, the image metrics,
 *      the per-layer error chart, the activations against the format's range,
 *      the overflow table, and what it all means in plain words. */
#define _POSIX_C_SOURCE 200809L
#include "sdref.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ======================================================================================
 * Images: tensors to RGB8, PNG data URIs, the difference heat map
 * ====================================================================================== */

static char *base64(const uint8_t *p, size_t n) {
    static const char digits[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    char *s = sd_malloc((n + 2) / 3 * 4 + 1), *o = s;
    for (size_t i = 0; i < n; i += 3) {                  /* 3 bytes -> 4 digits, '=' pads the tail */
        uint32_t v = (uint32_t)p[i] << 16 | (i + 1 < n ? (uint32_t)p[i + 1] << 8 : 0) | (i + 2 < n ? p[i + 2] : 0);
        *o++ = digits[v >> 18 & 63];
        *o++ = digits[v >> 12 & 63];
        *o++ = i + 1 < n ? digits[v >> 6 & 63] : '=';
        *o++ = i + 2 < n ? digits[v & 63] : '=';
    }
    *o = 0;
    return s;
}

/* RGB8 pixels as "data:image/png;base64,..." (the PNG goes through a temporary file). */
static char *png_data_uri(const char *tmp_path, int w, int h, const uint8_t *rgb) {
    if (png_write_file(tmp_path, w, h, 3, rgb, 0, NULL, NULL)) return NULL;
    uint8_t *png;
    size_t len;
    int rc = sd_read_file(tmp_path, &png, &len);
    remove(tmp_path);
    if (rc) return NULL;
    char *b = base64(png, len);
    free(png);
    const char *head = "data:image/png;base64,";
    char *uri = sd_malloc(strlen(head) + strlen(b) + 1);
    strcpy(uri, head);
    strcat(uri, b);
    free(b);
    return uri;
}

static double nan_share(const sd_tensor *x) {
    size_t n = tensor_numel(x), bad = 0;
    for (size_t i = 0; i < n; i++) bad += !isfinite(x->data[i]);
    return n ? (double)bad / (double)n : 0;
}

/* An inferno-like colour map: black, purple, red, orange, pale yellow. */
static void heat_colour(double t, uint8_t *rgb) {
    static const double stops[5][3] = { { 0, 0, 4 }, { 87, 16, 110 }, { 188, 55, 84 }, { 249, 142, 9 }, { 252, 255, 164 } };
    t = t < 0 ? 0 : t > 1 ? 1 : t;
    int k = t >= 1 ? 3 : (int)(t * 4);
    double f = t * 4 - k;
    for (int c = 0; c < 3; c++) rgb[c] = (uint8_t)(stops[k][c] + f * (stops[k + 1][c] - stops[k][c]) + 0.5);
}

/* Per pixel, the largest channel difference, amplified so the largest difference is full scale. */
static uint8_t *heat_map(const uint8_t *a, const uint8_t *b, int w, int h, int *max_diff) {
    size_t n = (size_t)w * h;
    uint8_t *out = sd_malloc(n * 3);
    *max_diff = 0;
    for (size_t i = 0; i < 3 * n; i++) {
        int d = abs((int)a[i] - (int)b[i]);
        if (d > *max_diff) *max_diff = d;
    }
    for (size_t i = 0; i < n; i++) {
        int d = 0;
        for (int c = 0; c < 3; c++) {
            int e = abs((int)a[3 * i + c] - (int)b[3 * i + c]);
            if (e > d) d = e;
        }
        heat_colour(*max_diff ? (double)d / *max_diff : 0, out + 3 * i);
    }
    return out;
}

/* ======================================================================================
 * Layers: which model a traced name belongs to, and the band of the chart it falls in
 * ====================================================================================== */

static int starts_with(const char *s, const char *p) { return strncmp(s, p, strlen(p)) == 0; }

/* kind: the model (its storage format bounds the layer), or -1 for the sampler's float32
 * latents; label: the stage ("text encoder", "step 3", "VAE decoder"); *module: the name
 * inside the model. */
static int classify(const char *name, char *label, size_t n, const char **module) {
    static const struct { const char *prefix, *label; int kind; } models[] = {
        { "text_encoder.", "text encoder", SD_TEXT }, { "image_encoder.", "image encoder", SD_VISION },
        { "ipadapter.", "IP-Adapter", SD_IPADAPTER }, { "vae_fallback.", "VAE fallback", SD_VAE }, { "vae.", "VAE", SD_VAE },
    };
    for (size_t i = 0; i < sizeof models / sizeof models[0]; i++)
        if (starts_with(name, models[i].prefix)) {
            *module = name + strlen(models[i].prefix);
            int enc = starts_with(*module, "encoder") || starts_with(*module, "quant_conv");
            snprintf(label, n, "%s%s", models[i].label, models[i].kind != SD_VAE ? "" : enc ? " encoder" : " decoder");
            return models[i].kind;
        }
    const char *p = strstr(name, ".step");
    *module = name;
    if (!p) {
        snprintf(label, n, "sampler");
        return -1;
    }
    snprintf(label, n, "step %d", atoi(p + 5));
    const char *u = strstr(p, ".unet.");
    if (u) {
        *module = u + 6;
        return SD_UNET;
    }
    *module = p + 1;
    return strstr(p, ".unet_out") ? SD_UNET : -1;
}

/* The largest finite value of the storage format the tested policy gives this layer. */
static double layer_range(const sd_precision *test, const char *name) {
    char label[64];
    const char *module;
    int kind = classify(name, label, sizeof label, &module);
    return kind < 0 ? sd_format_max(SD_F32) : sd_format_max(test->model[kind].storage);
}

static double rel_err(const sd_cmp_stats *s, int has, double ref_rms) {
    if (!has) return NAN;
    if (s->nan_mismatch || isinf(s->max_abs) || s->rms != s->rms || isinf(s->rms)) return INFINITY;   /* Inf/NaN on one side only */
    return ref_rms > 0 ? s->rms / ref_rms : s->rms;
}

/* ======================================================================================
 * The page
 * ====================================================================================== */

typedef struct report {
    FILE *f;
    const sd_job *job;
    const char *spec_a, *spec_b;
    sd_precision prec_b;
    const sd_shadow_result *r;
    const char *filter; int filter_given;  /* the trace filter of the runs (NULL: every layer), --layers given */
    int first_overflow;                   /* against each layer's own format (not r->first_overflow) */
    int worst_local;                      /* the layer adding the most error by itself, Inf/NaN first */
    int w, h;
    uint8_t *rgb_a, *rgb_b;
    double nan_a, nan_b;
    sd_image_metrics m;
    int max_diff;
} report;

static void html_text(FILE *f, const char *s) {
    for (; s && *s; s++) {
        if (*s == '<') fputs("&lt;", f);
        else if (*s == '>') fputs("&gt;", f);
        else if (*s == '&') fputs("&amp;", f);
        else if (*s == '"') fputs("&quot;", f);
        else fputc(*s, f);
    }
}

static void module_html(FILE *f, const char *name) {
    char label[64];
    const char *module;
    classify(name, label, sizeof label, &module);
    fputs("<code>", f);
    html_text(f, module);
    fputs("</code> <span class=dim>(", f);
    html_text(f, label);
    fputs(")</span>", f);
}

/* numbers for people: 70255, 0.00123, 1.2e-07 */
static void num(FILE *f, double v) {
    if (v != v) fputs("&ndash;", f);
    else if (isinf(v)) fputs(v > 0 ? "&infin;" : "&minus;&infin;", f);
    else if (v != 0 && (fabs(v) < 1e-3 || fabs(v) >= 1e6)) fprintf(f, "%.3g", v);
    else if (fabs(v) >= 100) fprintf(f, "%.0f", v);
    else fprintf(f, "%.4g", v);
}

static const char *style =
    "*{box-sizing:border-box}"
    "body{font:15px/1.55 system-ui,-apple-system,'Segoe UI',Roboto,'Helvetica Neue',Arial,sans-serif;color:#1f2328;"
    "background:#f3f4f6;margin:0}"
    "main{max-width:1180px;margin:0 auto;padding:22px}"
    "header h1{font-size:25px;margin:6px 0 2px}header p{margin:2px 0;color:#57606a}"
    "section{background:#fff;border:1px solid #e1e4e8;border-radius:10px;padding:16px 22px;margin:16px 0}"
    "h2{font-size:18px;margin:2px 0 10px}"
    ".imgs{display:flex;gap:22px;flex-wrap:wrap;align-items:flex-start}"
    "figure{margin:0}figure img{display:block;image-rendering:pixelated;border-radius:6px;border:1px solid #d0d7de}"
    "figcaption{font-size:13px;color:#57606a;margin-top:6px;max-width:340px}"
    ".bar{height:10px;width:240px;border-radius:3px;margin-top:6px;"
    "background:linear-gradient(90deg,#000004,#57106e,#bc3754,#f98e09,#fcffa4)}"
    "table{border-collapse:collapse;font-size:14px;margin:4px 0}"
    "th,td{padding:5px 12px;border-bottom:1px solid #eaeef2;text-align:left;vertical-align:top}"
    "th{font-weight:600;color:#57606a;font-size:13px}td.n{text-align:right;font-variant-numeric:tabular-nums;"
    "font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px}"
    "code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px;background:#f0f2f4;"
    "padding:1px 5px;border-radius:4px}"
    ".dim{color:#6e7781;font-size:13px}"
    ".finding{border-left:4px solid #0969da;background:#f1f7ff;padding:8px 14px;margin:10px 0;border-radius:0 6px 6px 0}"
    ".finding.bad{border-color:#cf222e;background:#fff2f2}.finding.ok{border-color:#1a7f37;background:#effbf2}"
    ".legend span{display:inline-block;margin-right:18px;font-size:13px;color:#444}"
    ".legend i{display:inline-block;width:22px;height:3px;vertical-align:middle;margin-right:6px}"
    "svg{display:block;max-width:100%;height:auto}svg text{font:11px system-ui,sans-serif;fill:#57606a}"
    "footer{color:#6e7781;font-size:13px;margin:20px 4px}";

static void head(report *p) {
    FILE *f = p->f;
    const sd_job *j = p->job;
    fprintf(f, "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>\n"
               "<meta name=viewport content=\"width=device-width,initial-scale=1\">\n<link rel=icon href=\"data:,\">\n"
               "<title>sdref report: ");
    html_text(f, p->spec_a);
    fputs(" vs ", f);
    html_text(f, p->spec_b);
    fprintf(f, "</title>\n<style>%s</style></head>\n<body><main>\n<header><h1>Precision report: ", style);
    html_text(f, p->spec_a);
    fputs(" vs ", f);
    html_text(f, p->spec_b);
    fputs("</h1>\n<p>", f);
    fputs(j->init_path ? "img2img" : "txt2img", f);
    if (j->prompt) {
        fputs(" &ldquo;", f);
        html_text(f, j->prompt);
        fputs("&rdquo;", f);
    }
    fprintf(f, ", %dx%d, %d step%s of %s, cfg %g, ", p->w, p->h, j->steps, j->steps == 1 ? "" : "s", j->sampler_name, j->cfg);
    if (j->noise_path) {
        fputs("noise from <code>", f);
        html_text(f, j->noise_path);
        fputs("</code>", f);
    } else fprintf(f, "seed %llu (%s generator)", (unsigned long long)j->seed, j->rng == SD_RNG_CPU ? "CPU" : "CUDA");
    fputs(", model <code>", f);
    html_text(f, j->model_path);
    fputs("</code></p>\n<p>Reference <b>", f);
    html_text(f, p->spec_a);
    fputs("</b> against <b>", f);
    html_text(f, p->spec_b);
    fputs("</b>, the same job with the same noise. sdref rounds every operation's result to the policy's storage "
          "format, as a GPU does.</p></header>\n", f);
}

/* ---- findings in plain words ---------------------------------------------------------- */

static const char *norm_kind(const char *module) {
    if (strstr(module, "layer_norm") || strstr(module, "final_layer_norm")) return "LayerNorm";
    const char *d = strrchr(module, '.');
    d = d ? d + 1 : module;
    if (strstr(d, "norm")) return "GroupNorm";
    return NULL;
}

static void finding_overflow(report *p) {
    FILE *f = p->f;
    const sd_shadow_result *r = p->r;
    if (p->first_overflow < 0 && r->first_inf < 0 && r->first_nan < 0) {
        double best = 0, range = 0;
        int at = -1;
        for (int i = 0; i < r->n; i++) {
            double rg = layer_range(&p->prec_b, r->layers[i].name);
            if (rg < 1e38 && r->layers[i].ref_max_abs / rg > best) {
                best = r->layers[i].ref_max_abs / rg;
                at = i;
                range = rg;
            }
        }
        if (at < 0) return;                               /* no narrow format: nothing to say about range */
        fputs("<p class=\"finding ok\"><b>Range.</b> No layer leaves the storage format's range under ", f);
        html_text(f, p->spec_b);
        fputs(": the activation closest to the limit is ", f);
        module_html(f, r->layers[at].name);
        fputs(" at ", f);
        num(f, r->layers[at].ref_max_abs);
        fprintf(f, ", %.2g%% of the largest finite value ", 100 * best);
        num(f, range);
        fputs(".</p>\n", f);
        return;
    }
    fputs("<p class=\"finding bad\"><b>Overflow.</b> ", f);
    if (p->first_overflow >= 0) {
        const sd_shadow_layer *L = &p->r->layers[p->first_overflow];
        char label[64];
        const char *module;
        int kind = classify(L->name, label, sizeof label, &module);
        fputs("Under ", f);
        html_text(f, p->spec_b);
        fputs(" the ", f);
        html_text(f, label);
        fputs("'s <code>", f);
        html_text(f, module);
        fputs("</code> output reaches ", f);
        num(f, L->ref_max_abs);
        fputs(" (in the reference run), beyond ", f);
        fputs(sd_format_name(p->prec_b.model[kind < 0 ? SD_UNET : kind].storage), f);
        fputs("'s largest value ", f);
        num(f, layer_range(&p->prec_b, L->name));
        fputs(": ", f);
    }
    if (r->first_inf >= 0) {
        if (r->first_inf == p->first_overflow) fputs("it becomes Inf", f);
        else {
            fputs("the first Inf appears at ", f);
            module_html(f, r->layers[r->first_inf].name);
        }
    } else if (p->first_overflow >= 0) fputs("no Inf appears (a later operation brings it back into range)", f);
    if (r->first_nan >= 0) {
        const char *name = r->layers[r->first_nan].name, *module;
        char label[64];
        classify(name, label, sizeof label, &module);
        const char *nk = norm_kind(module);
        fputs(r->first_inf >= 0 ? ", " : "; ", f);
        if (nk && r->first_inf >= 0) fprintf(f, "the next %s (<code>", nk);
        else fputs("the first NaN appears at ", f);
        if (nk && r->first_inf >= 0) {
            html_text(f, module);
            fputs("</code>) turns it into NaN", f);
        } else module_html(f, name);
    }
    if (p->nan_b >= 0.999) fputs(", and the whole image is black (every value NaN).", f);
    else if (p->nan_b > 0) fprintf(f, ", and %.1f%% of the image's values are NaN (shown black).", 100 * p->nan_b);
    else fputs("; the image itself stays finite.", f);
    if (p->nan_b > 0 && !p->job->nan_fallback)
        fputs(" A1111 answers this with <code>--no-half-vae</code>; sdref with <code>--precision fp16-vae32</code> or "
              "<code>--nan-fallback fp32</code>.", f);
    fputs("</p>\n", f);
}

static void finding_picture(report *p) {
    FILE *f = p->f;
    const sd_image_metrics *m = &p->m;
    const char *verdict, *cls = "ok";
    if (p->nan_b >= 0.999 && p->nan_a < 0.999) { verdict = "the picture is lost"; cls = "bad"; }
    else if (isinf(m->psnr)) verdict = "the two images are identical, pixel for pixel";
    else if (m->psnr >= 40) verdict = "invisible";
    else if (m->psnr >= 30) verdict = "hard to see: it shows when flipping between the two";
    else if (m->psnr >= 20) { verdict = "visible"; cls = ""; }
    else { verdict = "a different picture"; cls = "bad"; }
    fprintf(f, "<p class=\"finding %s\"><b>The picture.</b> ", cls);
    html_text(f, p->spec_b);
    fputs(" changes the picture by PSNR ", f);
    if (isinf(m->psnr)) fputs("&infin;", f);
    else fprintf(f, "%.1f dB", m->psnr);
    fprintf(f, " (SSIM %.4f, largest pixel difference %d of 255): %s.</p>\n", m->ssim, p->max_diff, verdict);
}

static void finding_tone(report *p) {
    FILE *f = p->f;
    const sd_image_metrics *m = &p->m;
    if (p->nan_a >= 0.999 || p->nan_b >= 0.999) return;   /* a black image has no tone to compare */
    double lr = m->luma_a > 0 ? m->luma_b / m->luma_a : 1, cr = m->contrast_a > 0 ? m->contrast_b / m->contrast_a : 1,
           sr = m->saturation_a > 0 ? m->saturation_b / m->saturation_a : 1;
    int washed = sr < 0.97 || cr < 0.97, changed = fabs(lr - 1) > 0.03 || fabs(cr - 1) > 0.03 || fabs(sr - 1) > 0.03;
    fprintf(f, "<p class=\"finding %s\"><b>Brightness, contrast, colour.</b> Mean luma &times;%.3f, RMS contrast &times;%.3f, "
               "mean saturation &times;%.3f: ", washed ? "bad" : changed ? "" : "ok", lr, cr, sr);
    html_text(f, p->spec_b);
    if (washed) fputs(" makes the image washed out (less contrast or colour).</p>\n", f);
    else if (changed) fputs(" shifts the tone of the image by a few percent.</p>\n", f);
    else fputs(" does not wash the image out (every ratio within 3% of 1).</p>\n", f);
}

static void finding_origin(report *p) {
    FILE *f = p->f;
    const sd_shadow_result *r = p->r;
    if (p->worst_local >= 0) {
        const sd_shadow_layer *L = &r->layers[p->worst_local];
        double rel = rel_err(&L->local, L->has_local, L->ref_rms);
        fputs("<p class=finding><b>Where the error is born.</b> Fed the reference input, the layer that adds the most error "
              "by itself is ", f);
        module_html(f, L->name);
        fputs(": ", f);
        if (isinf(rel)) fputs("even fed the reference input, it yields Inf or NaN.", f);
        else fprintf(f, "its output is off by %.2g of its RMS.", rel);
        fputs(" Rounding each operation's result to the storage format adds a relative error of about half a unit in the "
              "last place per operation; these add up along the network.</p>\n", f);
    }
    int first = -1, last = -1, steps = 0;
    for (int i = 0; i < r->n; i++)
        if (strstr(r->layers[i].name, ".latents_after") && r->layers[i].has_carried) {
            if (first < 0) first = i;
            last = i;
            steps++;
        }
    if (last >= 0) {
        double a = rel_err(&r->layers[first].carried, 1, r->layers[first].ref_rms),
               b = rel_err(&r->layers[last].carried, 1, r->layers[last].ref_rms);
        fprintf(f, "<p class=finding><b>Through the sampler.</b> After the first step the latents differ from the reference "
                   "by %.2g of their RMS; after the last (%d steps) by %.2g: the difference %s from step to step.</p>\n",
                a, steps, b, b > 1.5 * a ? "grows" : b < a / 1.5 ? "shrinks" : "stays about the same");
    }
}

/* ---- charts --------------------------------------------------------------------------- */

#define CW 1120
#define CH 300
#define ML 58
#define MR 16
#define MT 30
#define MB 34

static double cx(int i, int n) { return ML + (CW - ML - MR) * (n > 1 ? (double)i / (n - 1) : 0.5); }

/* the stages as alternating background bands, labelled when wide enough */
static void chart_bands(FILE *f, const sd_shadow_result *r) {
    int start = 0, band = 0;
    for (int i = 1; i <= r->n; i++) {
        char a[64], b[64];
        const char *m;
        classify(r->layers[start].name, a, sizeof a, &m);
        if (i < r->n) classify(r->layers[i].name, b, sizeof b, &m);
        if (i < r->n && strcmp(a, b) == 0) continue;
        double x0 = cx(start, r->n) - (r->n > 1 ? 0.5 * (CW - ML - MR) / (r->n - 1) : 0), x1 = cx(i - 1, r->n) +
                    (r->n > 1 ? 0.5 * (CW - ML - MR) / (r->n - 1) : 0);
        if (x0 < ML) x0 = ML;
        if (x1 > CW - MR) x1 = CW - MR;
        fprintf(f, "<rect x=%.1f y=%d width=%.1f height=%d fill=\"%s\" />", x0, MT, x1 - x0, CH - MT - MB,
                band++ % 2 ? "#ffffff" : "#f1f3f6");
        if (x1 - x0 > 7.0 * strlen(a)) fprintf(f, "<text x=%.1f y=%d text-anchor=middle>%s</text>", 0.5 * (x0 + x1), MT - 8, a);
        start = i;
    }
}

static void chart_y_axis(FILE *f, int lo, int hi, const char *what) {
    for (int d = lo; d <= hi; d++) {
        double y = MT + (CH - MT - MB) * (double)(hi - d) / (hi - lo);
        fprintf(f, "<line x1=%d x2=%d y1=%.1f y2=%.1f stroke=\"#d8dee4\" stroke-width=0.6 />", ML, CW - MR, y, y);
        fprintf(f, "<text x=%d y=%.1f text-anchor=end>1e%d</text>", ML - 6, y + 4, d);
    }
    fprintf(f, "<text x=14 y=%d transform=\"rotate(-90 14 %d)\" text-anchor=middle>%s</text>", (CH - MB + MT) / 2,
            (CH - MB + MT) / 2, what);
    fprintf(f, "<text x=%d y=%d text-anchor=middle>layers in execution order (%s)</text>", (CW + ML) / 2, CH - 8,
            "hover a point for its name");
}

static double cy(double v, int lo, int hi) {
    double l = v > 0 ? log10(v) : lo;
    if (l < lo) l = lo;
    if (l > hi) l = hi;
    return MT + (CH - MT - MB) * (hi - l) / (hi - lo);
}

static void chart_marker(FILE *f, int i, int n, const char *colour, const char *text, int row) {
    if (i < 0) return;
    double x = cx(i, n);
    fprintf(f, "<line x1=%.1f x2=%.1f y1=%d y2=%d stroke=\"%s\" stroke-width=1.5 stroke-dasharray=\"4 3\" />", x, x, MT,
            CH - MB, colour);
    fprintf(f, "<text x=%.1f y=%d style=\"fill:%s;font-weight:600;paint-order:stroke;stroke:#fff;stroke-width:3px\" "
               "text-anchor=%s>%s</text>", x + (x > CW / 2 ? -4 : 4),
            MT + 14 + 13 * row, colour, x > CW / 2 ? "end" : "start", text);
}

/* one series as a polyline (values clipped to the axis), non-finite values as red dots on top */
static void chart_series(FILE *f, const double *v, int n, int lo, int hi, const char *colour, const sd_shadow_result *r) {
    fprintf(f, "<polyline fill=none stroke=\"%s\" stroke-width=1.3 stroke-linejoin=round points=\"", colour);
    for (int i = 0; i < n; i++)
        if (v[i] == v[i]) fprintf(f, "%.1f,%.1f ", cx(i, n), isinf(v[i]) ? (double)MT : cy(v[i], lo, hi));
    fputs("\" />", f);
    for (int i = 0; i < n; i++)
        if (isinf(v[i])) {
            fprintf(f, "<circle cx=%.1f cy=%d r=2.6 fill=\"#cf222e\"><title>", cx(i, n), MT);
            html_text(f, r->layers[i].name);
            fputs(": Inf/NaN</title></circle>", f);
        }
}

/* invisible hover targets: each layer's name and figures */
static void chart_hover(FILE *f, const sd_shadow_result *r, const double *carried, const double *local) {
    double wcol = r->n > 1 ? (double)(CW - ML - MR) / (r->n - 1) : 40;
    for (int i = 0; i < r->n; i++) {
        fprintf(f, "<rect x=%.1f y=%d width=%.2f height=%d fill=transparent><title>", cx(i, r->n) - wcol / 2, MT, wcol,
                CH - MT - MB);
        html_text(f, r->layers[i].name);
        fprintf(f, "\ncarried %.3g, local %.3g, max|ref| %.4g</title></rect>", carried[i], local[i], r->layers[i].ref_max_abs);
    }
}

static void chart_errors(report *p) {
    FILE *f = p->f;
    const sd_shadow_result *r = p->r;
    int n = r->n;
    double *carried = sd_malloc((size_t)(n + 1) * sizeof(double)), *local = sd_malloc((size_t)(n + 1) * sizeof(double));
    double mn = INFINITY, mx = 0;
    for (int i = 0; i < n; i++) {
        const sd_shadow_layer *L = &r->layers[i];
        carried[i] = rel_err(&L->carried, L->has_carried, L->ref_rms);
        local[i] = rel_err(&L->local, L->has_local, L->ref_rms);
        double v[2] = { carried[i], local[i] };
        for (int k = 0; k < 2; k++)
            if (v[k] > 0 && !isinf(v[k])) {
                if (v[k] < mn) mn = v[k];
                if (v[k] > mx) mx = v[k];
            }
    }
    int lo = mn < INFINITY ? (int)floor(log10(mn)) : -8, hi = mx > 0 ? (int)ceil(log10(mx)) : 0;
    if (lo < -9) lo = -9;
    if (hi < lo + 2) hi = lo + 2;
    if (hi > 2) hi = 2;
    fprintf(f, "<svg viewBox=\"0 0 %d %d\" width=%d height=%d role=img aria-label=\"relative error per layer\">", CW, CH, CW, CH);
    chart_bands(f, r);
    chart_y_axis(f, lo, hi, "error / RMS of the output");
    chart_series(f, carried, n, lo, hi, "#0969da", r);
    chart_series(f, local, n, lo, hi, "#8250df", r);
    chart_marker(f, p->first_overflow, n, "#bc4c00", "first beyond range", 0);
    chart_marker(f, r->first_inf, n, "#cf222e", "first Inf", 1);
    chart_marker(f, r->first_nan, n, "#82071e", "first NaN", 2);
    chart_hover(f, r, carried, local);
    fputs("</svg>\n<div class=legend><span><i style=\"background:#0969da\"></i>carried: the error arriving at the layer's "
          "output from everything before</span><span><i style=\"background:#8250df\"></i>local: the error the layer adds by "
          "itself, fed the reference input</span><span><i style=\"background:#cf222e;height:6px;width:6px;border-radius:3px\">"
          "</i>Inf or NaN</span></div>\n", f);
    free(carried);
    free(local);
}

static void chart_range(report *p) {
    FILE *f = p->f;
    const sd_shadow_result *r = p->r;
    int n = r->n;
    double mx = 1;
    for (int i = 0; i < n; i++)
        if (r->layers[i].ref_max_abs > mx && !isinf(r->layers[i].ref_max_abs)) mx = r->layers[i].ref_max_abs;
    int lo = -2, hi = (int)ceil(log10(mx * 1.5));
    if (hi < 5) hi = 5;
    fprintf(f, "<svg viewBox=\"0 0 %d %d\" width=%d height=%d role=img aria-label=\"largest activation per layer\">", CW, CH, CW, CH);
    chart_bands(f, r);
    chart_y_axis(f, lo, hi, "max |x| in the reference");
    /* the tested format's limit under each layer */
    for (int i = 0; i < n; i++) {
        double rg = layer_range(&p->prec_b, r->layers[i].name);
        if (rg > 1e38) continue;
        double half = n > 1 ? 0.5 * (CW - ML - MR) / (n - 1) : 20;
        fprintf(f, "<line x1=%.1f x2=%.1f y1=%.1f y2=%.1f stroke=\"#cf222e\" stroke-width=1.2 />", cx(i, n) - half,
                cx(i, n) + half, cy(rg, lo, hi), cy(rg, lo, hi));
    }
    fputs("<polyline fill=none stroke=\"#57606a\" stroke-width=1.1 stroke-linejoin=round points=\"", f);
    for (int i = 0; i < n; i++) fprintf(f, "%.1f,%.1f ", cx(i, n), cy(r->layers[i].ref_max_abs, lo, hi));
    fputs("\" />", f);
    for (int i = 0; i < n; i++)
        if (r->layers[i].ref_max_abs > layer_range(&p->prec_b, r->layers[i].name)) {
            fprintf(f, "<circle cx=%.1f cy=%.1f r=3 fill=\"#cf222e\"><title>", cx(i, n), cy(r->layers[i].ref_max_abs, lo, hi));
            html_text(f, r->layers[i].name);
            fprintf(f, ": %.6g</title></circle>", r->layers[i].ref_max_abs);
        }
    fputs("</svg>\n<div class=legend><span><i style=\"background:#57606a\"></i>largest |x| of each layer's output in the "
          "reference run</span><span><i style=\"background:#cf222e\"></i>the tested storage format's largest finite value "
          "(none drawn: the format's range is not in reach)</span></div>\n", f);
}

/* ---- tables --------------------------------------------------------------------------- */

static void table_metrics(report *p) {
    FILE *f = p->f;
    const sd_image_metrics *m = &p->m;
    fputs("<table><tr><th>metric</th><th>", f);
    html_text(f, p->spec_a);
    fputs("</th><th>", f);
    html_text(f, p->spec_b);
    fputs("</th><th>ratio</th></tr>\n", f);
    fputs("<tr><td>PSNR (dB)</td><td class=n colspan=2 style=\"text-align:center\">", f);
    num(f, m->psnr);
    fputs("</td><td></td></tr>\n<tr><td>SSIM (luma, 11&times;11 Gaussian &sigma; 1.5)</td><td class=n colspan=2 "
          "style=\"text-align:center\">", f);
    fprintf(f, "%.5f</td><td></td></tr>\n", m->ssim);
    fprintf(f, "<tr><td>mean squared error (0..255)</td><td class=n colspan=2 style=\"text-align:center\">%.4g</td><td></td></tr>\n",
            m->mse);
    const char *names[3] = { "mean luma (0..255)", "RMS contrast", "mean HSV saturation" };
    double va[3] = { m->luma_a, m->contrast_a, m->saturation_a }, vb[3] = { m->luma_b, m->contrast_b, m->saturation_b };
    for (int k = 0; k < 3; k++)
        fprintf(f, "<tr><td>%s</td><td class=n>%.4f</td><td class=n>%.4f</td><td class=n>&times;%.4f</td></tr>\n", names[k],
                va[k], vb[k], va[k] > 0 ? vb[k] / va[k] : 1.0);
    fputs("</table>\n", f);
}

static void overflow_row(report *p, const char *what, int i, const char *count) {
    FILE *f = p->f;
    fprintf(f, "<tr><td>%s</td><td>", what);
    if (i < 0) {
        fputs("none</td><td></td><td></td><td></td></tr>\n", f);
        return;
    }
    const sd_shadow_layer *L = &p->r->layers[i];
    module_html(f, L->name);
    fputs("</td><td class=n>", f);
    num(f, L->ref_max_abs);
    fputs("</td><td class=n>", f);
    num(f, layer_range(&p->prec_b, L->name));
    fputs("</td><td class=n>", f);
    if (!strcmp(count, "inf")) fprintf(f, "%lld Inf", (long long)L->test.n_inf);
    else if (!strcmp(count, "nan")) fprintf(f, "%lld NaN", (long long)L->test.n_nan);
    else fprintf(f, "%lld values", (long long)L->test.n_over_f16);
    fprintf(f, " of %lld</td></tr>\n", (long long)L->test.n);
}

static void table_overflow(report *p) {
    FILE *f = p->f;
    int over = 0;
    for (int i = 0; i < p->r->n; i++) over += p->r->layers[i].ref_max_abs > layer_range(&p->prec_b, p->r->layers[i].name);
    fputs("<table><tr><th></th><th>layer</th><th>max |x| in the reference</th><th>format's largest value</th>"
          "<th>in the tested run</th></tr>\n", f);
    overflow_row(p, "first beyond the storage format's range", p->first_overflow, "over");
    overflow_row(p, "first Inf", p->r->first_inf, "inf");
    overflow_row(p, "first NaN", p->r->first_nan, "nan");
    fprintf(f, "</table>\n<p class=dim>%d of %d traced layers exceed the tested format's range in the reference run. "
               "&ldquo;in the tested run&rdquo;: values beyond fp16's range / Inf / NaN in that layer's output under ", over,
            p->r->n);
    html_text(f, p->spec_b);
    fputs(".</p>\n", f);
}

static int cmp_desc(const void *a, const void *b) {
    double x = ((const double *)a)[0], y = ((const double *)b)[0];
    return x > y ? -1 : x < y;
}

static void table_worst(report *p) {
    FILE *f = p->f;
    const sd_shadow_result *r = p->r;
    double *rows = sd_malloc((size_t)(r->n + 1) * 2 * sizeof(double));   /* (local rel, index) */
    int k = 0, blown = 0;
    for (int i = 0; i < r->n; i++)
        if (r->layers[i].has_local) {
            double v = rel_err(&r->layers[i].local, 1, r->layers[i].ref_rms);
            if (isinf(v)) { blown++; continue; }           /* those are in the overflow table */
            rows[2 * k] = v;
            rows[2 * k + 1] = i;
            k++;
        }
    qsort(rows, (size_t)k, 2 * sizeof(double), cmp_desc);
    if (blown) fprintf(f, "<p class=dim>%d layers yield Inf or NaN by themselves, fed the reference input (see Overflow); "
                          "of the others:</p>\n", blown);
    fputs("<table><tr><th>layer</th><th>local error / RMS</th><th>carried error / RMS</th><th>max |x| (reference)</th></tr>\n", f);
    for (int t = 0; t < k && t < 8; t++) {
        const sd_shadow_layer *L = &r->layers[(int)rows[2 * t + 1]];
        fputs("<tr><td>", f);
        module_html(f, L->name);
        fputs("</td><td class=n>", f);
        num(f, rows[2 * t]);
        fputs("</td><td class=n>", f);
        num(f, rel_err(&L->carried, L->has_carried, L->ref_rms));
        fputs("</td><td class=n>", f);
        num(f, L->ref_max_abs);
        fputs("</td></tr>\n", f);
    }
    fputs("</table>\n", f);
    free(rows);
}

static int section_images(report *p, const char *tmp) {
    FILE *f = p->f;
    uint8_t *heat = heat_map(p->rgb_a, p->rgb_b, p->w, p->h, &p->max_diff);
    const uint8_t *imgs[3] = { p->rgb_a, p->rgb_b, heat };
    int shown = p->w < 320 ? 320 : p->w > 360 ? 360 : p->w;
    fputs("<section><h2>The two pictures</h2><div class=imgs>\n", f);
    for (int k = 0; k < 3; k++) {
        char *uri = png_data_uri(tmp, p->w, p->h, imgs[k]);
        if (!uri) { free(heat); return -1; }
        fprintf(f, "<figure><img alt=\"%s\" width=%d height=%d src=\"%s\"><figcaption>", k == 2 ? "difference" : "image", shown,
                shown * p->h / p->w, uri);
        free(uri);
        if (k < 2) {
            fputs(k == 0 ? "<b>reference</b> <code>" : "<b>tested</b> <code>", f);
            html_text(f, k == 0 ? p->spec_a : p->spec_b);
            fputs("</code>", f);
            double ns = k == 0 ? p->nan_a : p->nan_b;
            if (ns > 0) fprintf(f, " &mdash; %.1f%% of the values are NaN (black)", 100 * ns);
        } else if (p->max_diff)
            fprintf(f, "<b>difference</b>, amplified &times;%.3g: per pixel the largest channel difference, scaled so the "
                       "largest (%d of 255) is full scale<div class=bar></div>", 255.0 / p->max_diff, p->max_diff);
        else fputs("<b>difference</b>: none, the images are identical", f);
        fputs("</figcaption></figure>\n", f);
    }
    fputs("</div></section>\n", f);
    free(heat);
    return 0;
}

static int write_page(report *p, const char *tmp) {
    FILE *f = p->f;
    const sd_shadow_result *r = p->r;
    head(p);
    if (section_images(p, tmp)) return -1;
    fputs("<section><h2>What it means</h2>\n", f);
    finding_overflow(p);
    finding_picture(p);
    finding_tone(p);
    finding_origin(p);
    fputs("</section>\n<section><h2>Image metrics</h2>\n", f);
    table_metrics(p);
    fputs("</section>\n<section><h2>Overflow</h2>\n", f);
    table_overflow(p);
    fputs("</section>\n<section><h2>Error per layer</h2>\n<p class=dim>Each traced layer's output under ", f);
    html_text(f, p->spec_b);
    fputs(" compared with the reference run: RMS of the difference over the RMS of the reference output. ", f);
    if (!p->filter) fputs("Every traced layer of the job is shown.", f);
    else {
        fputs("Only layers matching <code>", f);
        html_text(f, p->filter);
        fputs(p->filter_given ? "</code> are traced (--layers)." : "</code> are traced: at this size the reference run would "
              "have to keep every tensor of every step (--layers GLOB chooses others).", f);
    }
    fputs("</p>\n", f);
    if (r->n) {
        chart_errors(p);
        fputs("<h2 style=\"margin-top:18px\">The layers that add the most error by themselves</h2>\n", f);
        table_worst(p);
    } else fputs("<p>No traced layer: the layer filter matched nothing.</p>\n", f);
    fputs("</section>\n", f);
    if (r->n) {
        fputs("<section><h2>Activations against the format's range</h2>\n", f);
        chart_range(p);
        fputs("</section>\n", f);
    }
    char ba[160], bb[160];
    fputs("<section><h2>The two policies</h2><table><tr><th>model</th><th>", f);
    html_text(f, p->spec_a);
    fputs("</th><th>", f);
    html_text(f, p->spec_b);
    fputs("</th></tr>\n", f);
    sd_model_kind kinds[3] = { SD_TEXT, SD_UNET, SD_VAE };
    for (int k = 0; k < 3; k++) {
        sd_policy_describe(&p->job->prec.model[kinds[k]], ba, sizeof ba);
        sd_policy_describe(&p->prec_b.model[kinds[k]], bb, sizeof bb);
        fprintf(f, "<tr><td>%s</td><td><code>%s</code></td><td><code>%s</code></td></tr>\n", sd_model_kind_name(kinds[k]), ba, bb);
    }
    fputs("</table></section>\n", f);
    fprintf(f, "<footer>Written by sdref %s (<code>sdref report</code>). Reduced-precision results also depend on the order "
               "of summation: two fp16 implementations differ from each other by about as much as fp16 differs from fp32. "
               "sdref's own bits are fixed by its source, on every platform.</footer>\n</main></body></html>\n", SDREF_VERSION);
    return 0;
}

/* ======================================================================================
 * sdref report
 * ====================================================================================== */

int cmd_report(int argc, char **argv) {
    sd_args a;
    args_init(&a, argc, argv);
    sd_job j;
    int rc = 2;
    if (sd_job_from_args(&a, &j, 1)) goto out;
    const char *spec_b = args_value(&a, "--vs"), *layers = args_value(&a, "--layers");
    if (args_check_all_used(&a)) goto out;
    if (!spec_b) {
        sd_error("--vs SPEC is required: the precision compared with --precision (e.g. --precision fp32 --vs fp16)");
        goto out;
    }
    if (j.latent_out || j.image_out) {
        sd_error("report writes one HTML page (-o REPORT.html); --latent-out and --image-out belong to txt2img/img2img");
        goto out;
    }
    if (sd_job_check(&j, 0)) goto out;
    const char *html = j.out_png ? j.out_png : "report.html";
    j.out_png = NULL;
    report p;
    memset(&p, 0, sizeof p);
    p.job = &j;
    p.spec_a = j.precision_spec ? j.precision_spec : "fp32";
    p.spec_b = spec_b;
    if (sd_precision_parse(spec_b, &p.prec_b)) goto out;
    /* every layer at small sizes; at real sizes the VAE only: the reference run keeps every traced tensor */
    const char *filter = layers;
    if (!filter && (long)j.width * j.height > 128 * 128) filter = "vae.*";
    p.filter = filter;
    p.filter_given = layers != NULL;

    sd_job_shadow s;
    memset(&s, 0, sizeof s);
    s.job = &j;
    s.filter = filter;
    s.write_outputs = -1;
    s.spec_ref = p.spec_a;
    s.spec_test = spec_b;
    sd_shadow_result r;
    if (!j.quiet) fprintf(stderr, "sdref report: the job under %s, under %s, and under %s fed %s's layers\n", p.spec_a, spec_b, spec_b, p.spec_a);
    rc = sd_shadow_run(sd_job_shadow_run, &s, &p.prec_b, &j.prec, sd_format_max(SD_F16), &r) ? 1 : 0;
    if (!rc && (!s.image[0].data || !s.image[1].data || !tensor_same_shape(&s.image[0], &s.image[1]))) {
        sd_error("report: the runs gave no image to compare");
        rc = 1;
    }
    if (!rc) {
        p.r = &r;
        p.first_overflow = p.worst_local = -1;
        double worst = -1;
        for (int i = 0; i < r.n; i++) {
            const sd_shadow_layer *L = &r.layers[i];
            if (p.first_overflow < 0 && L->ref_max_abs > layer_range(&p.prec_b, L->name)) p.first_overflow = i;
            double e = rel_err(&L->local, L->has_local, L->ref_rms);
            if (e > worst) { worst = e; p.worst_local = i; }
        }
        p.w = s.image[0].shape[3];
        p.h = s.image[0].shape[2];
        p.rgb_a = sd_image_rgb8(&s.image[0]);
        p.rgb_b = sd_image_rgb8(&s.image[1]);
        p.nan_a = nan_share(&s.image[0]);
        p.nan_b = nan_share(&s.image[1]);
        size_t n = (size_t)p.w * p.h * 3;
        float *fa = sd_malloc(n * sizeof(float)), *fb = sd_malloc(n * sizeof(float));
        for (size_t i = 0; i < n; i++) { fa[i] = p.rgb_a[i]; fb[i] = p.rgb_b[i]; }
        sd_image_metrics_compute(fa, fb, p.w, p.h, &p.m);   /* on the 8-bit images, as `compare a.png b.png` */
        free(fa);
        free(fb);
        size_t tl = strlen(html) + 16;
        char *tmp = sd_malloc(tl);
        snprintf(tmp, tl, "%s.img.png", html);
        sd_outfile o;
        rc = 1;
        if (sd_out_open(&o, html) == 0) {
            p.f = o.f;
            if (write_page(&p, tmp)) sd_out_abort(&o);
            else rc = sd_out_commit(&o) ? 1 : 0;
        }
        free(tmp);
        free(p.rgb_a);
        free(p.rgb_b);
        if (!rc && !j.quiet)
            fprintf(stderr, "sdref report: PSNR %.2f dB, SSIM %.5f%s%s; wrote %s\n", p.m.psnr, p.m.ssim,
                    p.first_overflow >= 0 ? ", first beyond range: " : "", p.first_overflow >= 0 ? r.layers[p.first_overflow].name : "",
                    html);
    }
    sd_shadow_free(&r);
    sd_job_shadow_free(&s);
out:
    free(a.used);
    return rc;
}
