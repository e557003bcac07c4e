/* lab.c — the precision laboratory: compare two results (arrays, images, whole traces) in
 * absolute, relative and ULP terms, and measure what reduced precision does to a picture
 * (PSNR, SSIM, luma, contrast, saturation). `sdref compare A B` is how another backend proves
 * it agrees with sdref: exit 0 within tolerance, 1 beyond it. */
#include "sdref.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ======================================================================================
 * Tensor comparison
 * ====================================================================================== */

/* float bits mapped to integers that order like the floats (-0 and +0 adjacent). */
static int64_t ordered32(float f) {
    uint32_t u = sd_f32_bits(f);
    return (u & 0x80000000u) ? -(int64_t)(u & 0x7fffffffu) : (int64_t)u;
}

static int64_t ordered16(float f) {
    uint16_t h = sd_f32_to_f16(f);
    return (h & 0x8000u) ? -(int64_t)(h & 0x7fffu) : (int64_t)h;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Median of n values (the array is reordered). */
static double median(double *v, size_t n) {
    if (!n) return 0;
    qsort(v, n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

void sd_compare_arrays(const float *a, const float *b, size_t n, sd_cmp_stats *s) {
    memset(s, 0, sizeof *s);
    s->n = n;
    double sab = 0, saa = 0, sbb = 0, sum_abs = 0, sum_sq = 0;
    double *u32 = sd_malloc((n ? n : 1) * sizeof(double)), *u16 = sd_malloc((n ? n : 1) * sizeof(double));
    size_t identical = 0;
    for (size_t i = 0; i < n; i++) {
        float x = a[i], y = b[i];
        int xn = x != x, yn = y != y;
        if (sd_f32_bits(x) == sd_f32_bits(y) || (xn && yn)) identical++;
        if (xn != yn) s->nan_mismatch++;
        if (xn || yn || isinf(x) || isinf(y)) {
            int same = (xn && yn) || x == y;
            u32[i] = u16[i] = same ? 0 : INFINITY;
            if (!same) s->max_abs = s->max_rel = INFINITY;
            continue;
        }
        double d = fabs((double)x - (double)y);
        if (fabs((double)y) > s->max_abs_ref) s->max_abs_ref = fabs((double)y);
        if (d > s->max_abs) s->max_abs = d;
        if (y != 0 && d / fabs((double)y) > s->max_rel) s->max_rel = d / fabs((double)y);
        if (y == 0 && d > 0) s->max_rel = INFINITY;
        sum_abs += d;
        sum_sq += d * d;
        sab += (double)x * y;
        saa += (double)x * x;
        sbb += (double)y * y;
        u32[i] = (double)llabs(ordered32(x) - ordered32(y));
        u16[i] = (double)llabs(ordered16(x) - ordered16(y));
    }
    for (size_t i = 0; i < n; i++) {
        if (u32[i] > s->ulp32_max) s->ulp32_max = u32[i];
        if (u16[i] > s->ulp16_max) s->ulp16_max = u16[i];
    }
    s->mean_abs = n ? sum_abs / (double)n : 0;
    s->rms = n ? sqrt(sum_sq / (double)n) : 0;
    s->cosine = saa > 0 && sbb > 0 ? sab / sqrt(saa * sbb) : (saa == sbb ? 1.0 : 0.0);
    s->identical = n ? (double)identical / (double)n : 1.0;
    s->ulp32_median = median(u32, n);
    s->ulp16_median = median(u16, n);
    free(u32);
    free(u16);
}

int sd_compare_within(const sd_cmp_stats *s, const sd_tolerance *t) {
    if (s->nan_mismatch) return 0;
    if (t->ulps >= 0 && s->ulp32_max <= t->ulps) return 1;
    return s->max_abs <= t->atol + t->rtol * s->max_abs_ref;
}

/* ======================================================================================
 * Image metrics (on 8-bit-range RGB as float [H][W][3])
 * ====================================================================================== */

static double luma(const float *p) { return 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2]; }

/* HSV saturation: (max - min) / max, 0 for black. */
static double saturation(const float *p) {
    double mx = p[0], mn = p[0];
    for (int c = 1; c < 3; c++) {
        if (p[c] > mx) mx = p[c];
        if (p[c] < mn) mn = p[c];
    }
    return mx > 0 ? (mx - mn) / mx : 0;
}

/* SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, on luma, L = 255, K1 0.01,
 * K2 0.03, averaged over every window that fits inside the image (the "valid" part). */
static double ssim_luma(const double *x, const double *y, int w, int h) {
    double g[11], gs = 0;
    for (int i = 0; i < 11; i++) gs += g[i] = sd_exp(-((i - 5) * (i - 5)) / (2 * 1.5 * 1.5));
    for (int i = 0; i < 11; i++) g[i] /= gs;
    const double C1 = (0.01 * 255) * (0.01 * 255), C2 = (0.03 * 255) * (0.03 * 255);
    if (w < 11 || h < 11) {                                  /* too small for the window: one global window */
        double mx = 0, my = 0, vx = 0, vy = 0, cxy = 0;
        size_t n = (size_t)w * h;
        for (size_t i = 0; i < n; i++) { mx += x[i]; my += y[i]; }
        mx /= n; my /= n;
        for (size_t i = 0; i < n; i++) {
            vx += (x[i] - mx) * (x[i] - mx); vy += (y[i] - my) * (y[i] - my); cxy += (x[i] - mx) * (y[i] - my);
        }
        vx /= n; vy /= n; cxy /= n;
        return ((2 * mx * my + C1) * (2 * cxy + C2)) / ((mx * mx + my * my + C1) * (vx + vy + C2));
    }
    double total = 0;
    size_t count = 0;
    for (int oy = 0; oy + 11 <= h; oy++)
        for (int ox = 0; ox + 11 <= w; ox++) {
            double mx = 0, my = 0, xx = 0, yy = 0, xy = 0;
            for (int i = 0; i < 11; i++)
                for (int j = 0; j < 11; j++) {
                    double wt = g[i] * g[j], a = x[(size_t)(oy + i) * w + ox + j], b = y[(size_t)(oy + i) * w + ox + j];
                    mx += wt * a; my += wt * b; xx += wt * a * a; yy += wt * b * b; xy += wt * a * b;
                }
            double vx = xx - mx * mx, vy = yy - my * my, cxy = xy - mx * my;
            total += ((2 * mx * my + C1) * (2 * cxy + C2)) / ((mx * mx + my * my + C1) * (vx + vy + C2));
            count++;
        }
    return total / (double)count;
}

void sd_image_metrics_compute(const float *a, const float *b, int w, int h, sd_image_metrics *m) {
    size_t n = (size_t)w * h;
    double *la = sd_malloc(n * sizeof(double)), *lb = sd_malloc(n * sizeof(double));
    double se = 0, sa = 0, sb = 0, qa = 0, qb = 0, ta = 0, tb = 0;
    for (size_t i = 0; i < n; i++) {
        for (int c = 0; c < 3; c++) {
            double d = (double)a[3 * i + c] - b[3 * i + c];
            se += d * d;
        }
        la[i] = luma(a + 3 * i);
        lb[i] = luma(b + 3 * i);
        sa += la[i]; sb += lb[i];
        ta += saturation(a + 3 * i);
        tb += saturation(b + 3 * i);
    }
    memset(m, 0, sizeof *m);
    double mse = se / (3.0 * (double)n);
    m->mse = mse;
    m->psnr = mse > 0 ? 10.0 * sd_log(255.0 * 255.0 / mse) / sd_log(10.0) : INFINITY;
    m->luma_a = sa / n;
    m->luma_b = sb / n;
    for (size_t i = 0; i < n; i++) {
        qa += (la[i] - m->luma_a) * (la[i] - m->luma_a);
        qb += (lb[i] - m->luma_b) * (lb[i] - m->luma_b);
    }
    m->contrast_a = sqrt(qa / n);
    m->contrast_b = sqrt(qb / n);
    m->saturation_a = ta / n;
    m->saturation_b = tb / n;
    m->ssim = ssim_luma(la, lb, w, h);
    free(la);
    free(lb);
}

/* ======================================================================================
 * Loading what `compare` reads: .npy, .png, or a safetensors trace (named tensors)
 * ====================================================================================== */

typedef struct named { char *name; int ndim; int64_t shape[8]; size_t n; float *data; } named;
typedef struct bundle { named *t; int n; int is_image; int width, height; } bundle;

static void bundle_free(bundle *b) {
    for (int i = 0; i < b->n; i++) {
        free(b->t[i].name);
        free(b->t[i].data);
    }
    free(b->t);
    memset(b, 0, sizeof *b);
}

static int ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && strcmp(s + a - b, suf) == 0;
}

static void bundle_add(bundle *b, const char *name, int ndim, const int64_t *shape, size_t n, float *data) {
    b->t = sd_realloc(b->t, (size_t)(b->n + 1) * sizeof *b->t);
    named *t = &b->t[b->n++];
    t->name = sd_strdup(name);
    t->ndim = ndim;
    for (int i = 0; i < 8; i++) t->shape[i] = i < ndim ? shape[i] : 1;
    t->n = n;
    t->data = data;
}

/* The "order" metadata of a trace (a JSON list in a string), to walk tensors in execution order. */
static char **trace_order(const sd_safetensors *st, int *count) {
    *count = 0;
    if (!st->metadata_json) return NULL;
    sd_json meta;
    if (json_parse(st->metadata_json, strlen(st->metadata_json), st->path, &meta)) {
        sd_clear_error();
        return NULL;
    }
    char **names = NULL;
    const char *order = json_str(&meta, "order", NULL);
    sd_json list;
    if (order && json_parse(order, strlen(order), st->path, &list) == 0) {
        if (list.type == JSON_ARRAY) {
            names = sd_calloc((size_t)list.n + 1, sizeof(char *));
            for (int i = 0; i < list.n; i++)
                if (list.items[i].type == JSON_STRING) names[(*count)++] = sd_strdup(list.items[i].str);
        }
        json_free(&list);
    }
    sd_clear_error();
    json_free(&meta);
    return names;
}

static int load_bundle(const char *path, bundle *b) {
    memset(b, 0, sizeof *b);
    if (ends_with(path, ".png") || ends_with(path, ".PNG")) {
        sd_image im;
        if (png_read_file(path, &im)) return -1;
        size_t n = (size_t)im.width * im.height;
        float *d = sd_malloc(n * 3 * sizeof(float));
        for (size_t i = 0; i < n * 3; i++) {
            size_t p = i / 3 * 4 + i % 3;       /* RGB of RGBA; 16-bit scaled to 0..255 */
            d[i] = im.depth == 16 ? ((const uint16_t *)im.pixels)[p] / 257.0f : ((const uint8_t *)im.pixels)[p];
        }
        int64_t shape[3] = { im.height, im.width, 3 };
        bundle_add(b, "image", 3, shape, n * 3, d);
        b->is_image = 1;
        b->width = im.width;
        b->height = im.height;
        sd_image_free(&im);
        return 0;
    }
    if (ends_with(path, ".npy")) {
        float *d;
        int ndim;
        int64_t shape[8];
        size_t n;
        if (npy_read_f32(path, &d, &ndim, shape, &n)) return -1;
        bundle_add(b, "array", ndim, shape, n, d);
        return 0;
    }
    sd_safetensors st;
    if (st_open(&st, path)) return -1;
    int n_order;
    char **order = trace_order(&st, &n_order);
    /* execution order first, then any tensor the order does not name, in file order */
    int *done = sd_calloc((size_t)st.n + 1, sizeof(int));
    for (int pass = 0; pass < 2; pass++) {
        int count = pass == 0 ? n_order : st.n;
        for (int i = 0; i < count; i++) {
            const st_entry *e = pass == 0 ? st_find(&st, order[i]) : &st.entries[i];
            if (!e) continue;
            int idx = (int)(e - st.entries);
            if (done[idx]) continue;
            done[idx] = 1;
            if (e->dtype != ST_F32 && e->dtype != ST_F16 && e->dtype != ST_BF16 && e->dtype != ST_F64) continue;
            size_t n = 1;
            for (int d = 0; d < e->ndim; d++) n *= (size_t)e->shape[d];
            float *d = sd_malloc((n ? n : 1) * sizeof(float));
            st_read_f32(&st, e, d);
            bundle_add(b, e->name, e->ndim, e->shape, n, d);
        }
    }
    free(done);
    for (int i = 0; i < n_order; i++) free(order[i]);
    free(order);
    st_close(&st);
    return 0;
}

static const named *bundle_find(const bundle *b, const char *name) {
    for (int i = 0; i < b->n; i++)
        if (strcmp(b->t[i].name, name) == 0) return &b->t[i];
    return NULL;
}

/* ======================================================================================
 * sdref compare A B
 * ====================================================================================== */

static int parse_double(const char *flag, const char *s, double *out) {
    char *end;
    *out = strtod(s, &end);
    if (end == s || *end || *out != *out || *out < 0) {
        sd_error("%s: '%s' is not a non-negative number", flag, s);
        return -1;
    }
    return 0;
}

static void json_num_out(FILE *f, const char *key, double v, int comma) {
    if (v != v || isinf(v)) fprintf(f, "\"%s\": null%s", key, comma ? ", " : "");
    else fprintf(f, "\"%s\": %.9g%s", key, v, comma ? ", " : "");
}

int cmd_compare(int argc, char **argv) {
    sd_args a;
    args_init(&a, argc, argv);
    const char *json_path = args_value(&a, "--json");
    const char *s_atol = args_value(&a, "--atol"), *s_rtol = args_value(&a, "--rtol"), *s_ulps = args_value(&a, "--ulps");
    int quiet = args_flag(&a, "--quiet");
    sd_tolerance tol = { 0.0, 0.0, -1.0 };
    if (s_atol && parse_double("--atol", s_atol, &tol.atol)) return 2;
    if (s_rtol && parse_double("--rtol", s_rtol, &tol.rtol)) return 2;
    if (s_ulps && parse_double("--ulps", s_ulps, &tol.ulps)) return 2;
    const char *pa = NULL, *pb = NULL;
    for (int i = 1; i < argc; i++) {
        if (a.used[i]) continue;
        if (argv[i][0] == '-' && argv[i][1]) continue;
        if (!pa) pa = argv[i];
        else if (!pb) pb = argv[i];
        else continue;
        a.used[i] = 1;
    }
    if (args_check_all_used(&a)) return 2;
    if (!pa || !pb) {
        sd_error("needs two files: sdref compare A B [--atol X] [--rtol R] [--ulps N] [--json OUT.json]");
        return 2;
    }
    bundle A, B;
    if (load_bundle(pa, &A)) return 2;
    if (load_bundle(pb, &B)) {
        bundle_free(&A);
        return 2;
    }
    if (A.n == 1 && B.n == 1 && strcmp(A.t[0].name, B.t[0].name) != 0) {   /* two single arrays: compare them */
        free(B.t[0].name);
        B.t[0].name = sd_strdup(A.t[0].name);
    }
    FILE *jf = NULL;
    sd_outfile jo;
    if (json_path) {
        if (sd_out_open(&jo, json_path)) {
            bundle_free(&A);
            bundle_free(&B);
            return 2;
        }
        jf = jo.f;
        fprintf(jf, "{\"a\": ");
        json_write_string(jf, pa);
        fprintf(jf, ", \"b\": ");
        json_write_string(jf, pb);
        fprintf(jf, ", \"atol\": %.9g, \"rtol\": %.9g, \"ulps\": %.9g, \"tensors\": [", tol.atol, tol.rtol, tol.ulps);
    }
    if (!quiet)
        printf("%-60s %10s %10s %10s %10s %10s %9s %9s %8s %8s  %s\n", "tensor", "max_abs", "max_rel", "mean_abs", "rms",
               "cosine", "ulp32max", "ulp32med", "ulp16max", "ident%", "");
    int compared = 0, failed = 0, missing = 0;
    const char *first_fail = NULL;
    for (int i = 0; i < A.n; i++) {
        const named *x = &A.t[i], *y = bundle_find(&B, x->name);
        if (!y) {
            missing++;
            continue;
        }
        sd_cmp_stats s;
        int ok;
        char note[64] = "";
        if (x->n != y->n) {
            ok = 0;
            memset(&s, 0, sizeof s);
            snprintf(note, sizeof note, "shape differs (%zu vs %zu elements)", x->n, y->n);
        } else {
            sd_compare_arrays(x->data, y->data, x->n, &s);
            ok = sd_compare_within(&s, &tol);
            if (s.nan_mismatch) snprintf(note, sizeof note, "%lld NaN mismatches", (long long)s.nan_mismatch);
        }
        compared++;
        if (!ok) {
            failed++;
            if (!first_fail) first_fail = x->name;
        }
        if (!quiet)
            printf("%-60s %10.3g %10.3g %10.3g %10.3g %10.7f %9.0f %9.1f %8.0f %8.2f  %s%s\n", x->name, s.max_abs, s.max_rel,
                   s.mean_abs, s.rms, s.cosine, s.ulp32_max, s.ulp32_median, s.ulp16_max, 100 * s.identical,
                   ok ? "ok" : "BEYOND TOLERANCE", note[0] ? note : "");
        if (jf) {
            fprintf(jf, "%s{\"name\": ", compared > 1 ? ", " : "");
            json_write_string(jf, x->name);
            fprintf(jf, ", \"n\": %zu, ", x->n);
            json_num_out(jf, "max_abs", s.max_abs, 1);
            json_num_out(jf, "max_rel", s.max_rel, 1);
            json_num_out(jf, "mean_abs", s.mean_abs, 1);
            json_num_out(jf, "rms", s.rms, 1);
            json_num_out(jf, "cosine", s.cosine, 1);
            json_num_out(jf, "ulp32_max", s.ulp32_max, 1);
            json_num_out(jf, "ulp32_median", s.ulp32_median, 1);
            json_num_out(jf, "ulp16_max", s.ulp16_max, 1);
            json_num_out(jf, "ulp16_median", s.ulp16_median, 1);
            json_num_out(jf, "identical", s.identical, 1);
            json_num_out(jf, "max_abs_ref", s.max_abs_ref, 1);
            fprintf(jf, "\"nan_mismatch\": %lld, \"within\": %s}", (long long)s.nan_mismatch, ok ? "true" : "false");
        }
    }
    sd_image_metrics im;
    int have_metrics = A.is_image && B.is_image && A.width == B.width && A.height == B.height;
    if (have_metrics) {
        sd_image_metrics_compute(A.t[0].data, B.t[0].data, A.width, A.height, &im);
        printf("image: PSNR %.2f dB, SSIM %.5f, mean luma %.2f vs %.2f (x%.4f), RMS contrast %.2f vs %.2f (x%.4f), "
               "saturation %.4f vs %.4f (x%.4f)\n", im.psnr, im.ssim, im.luma_a, im.luma_b, im.luma_b / (im.luma_a ? im.luma_a : 1),
               im.contrast_a, im.contrast_b, im.contrast_b / (im.contrast_a ? im.contrast_a : 1), im.saturation_a,
               im.saturation_b, im.saturation_b / (im.saturation_a ? im.saturation_a : 1));
    }
    if (jf) {
        fprintf(jf, "], \"compared\": %d, \"beyond_tolerance\": %d, \"missing_in_b\": %d, \"first_beyond\": ", compared, failed, missing);
        if (first_fail) json_write_string(jf, first_fail);
        else fprintf(jf, "null");
        if (have_metrics) {
            fprintf(jf, ", \"image\": {");
            json_num_out(jf, "psnr", im.psnr, 1);
            json_num_out(jf, "ssim", im.ssim, 1);
            json_num_out(jf, "luma_a", im.luma_a, 1);
            json_num_out(jf, "luma_b", im.luma_b, 1);
            json_num_out(jf, "contrast_a", im.contrast_a, 1);
            json_num_out(jf, "contrast_b", im.contrast_b, 1);
            json_num_out(jf, "saturation_a", im.saturation_a, 1);
            json_num_out(jf, "saturation_b", im.saturation_b, 0);
            fprintf(jf, "}");
        }
        fprintf(jf, "}\n");
    }
    printf("%d tensors compared, %d beyond tolerance (atol %g, rtol %g x max|B|%s), %d only in %s\n", compared, failed,
           tol.atol, tol.rtol, tol.ulps >= 0 ? ", or within --ulps" : "", missing, pa);
    if (first_fail) printf("first tensor beyond tolerance: %s\n", first_fail);
    int rc = 0;
    if (jf && sd_out_commit(&jo)) rc = 2;
    bundle_free(&A);
    bundle_free(&B);
    free(a.used);
    if (rc) return rc;
    if (!compared) {
        sd_error("no tensor of %s has a same-named tensor in %s", pa, pb);
        return 2;
    }
    return failed ? 1 : 0;
}

/* ======================================================================================
 * Shadow runs: the chosen policy against a reference policy, layer by layer.
 *   run 1: the reference policy, every traced tensor kept;
 *   run 2: the chosen policy, each traced tensor compared with run 1's (the error carried to
 *          that layer's output from everything before, and its Inf/NaN/overflow counts);
 *   run 3: the chosen policy with every traced tensor replaced by run 1's after it is
 *          compared: each layer is fed the reference input, so its error is its own.
 * ====================================================================================== */

double sd_format_max(sd_format f) {
    switch (f) {
    case SD_F16: return 65504.0;
    case SD_BF16: return 3.3895313892515355e38;
    case SD_E4M3: return 448.0;
    case SD_E5M2: return 57344.0;
    default: return 3.4028234663852886e38;
    }
}

static const sd_trace_entry *find_entry(const sd_trace *t, const char *name, int *cursor) {
    for (int k = 0; k < t->n; k++) {
        int i = (*cursor + k) % t->n;
        if (strcmp(t->e[i].name, name) == 0) {
            *cursor = i + 1;
            return &t->e[i];
        }
    }
    return NULL;
}

static double ref_rms(const sd_trace_stats *s) { return sqrt(s->mean * s->mean + s->std * s->std); }

int sd_shadow_run(sd_model_run run, void *arg, const sd_precision *test, const sd_precision *ref, double range_max,
                  sd_shadow_result *r) {
    memset(r, 0, sizeof *r);
    r->range_max = range_max;
    r->ref.keep_data = 1;
    if (run(arg, ref, &r->ref)) return -1;
    r->test.reference = &r->ref;
    if (run(arg, test, &r->test)) return -1;
    r->forced.reference = &r->ref;
    r->forced.force_reference = 1;
    if (run(arg, test, &r->forced)) return -1;
    /* one row per reference layer, in execution order */
    r->layers = sd_calloc((size_t)r->ref.n + 1, sizeof *r->layers);
    r->first_overflow = r->first_inf = r->first_nan = r->worst_local = -1;
    int ct = 0, cf = 0;
    double worst = -1;
    for (int i = 0; i < r->ref.n; i++) {
        const sd_trace_entry *re = &r->ref.e[i];
        sd_shadow_layer *L = &r->layers[r->n++];
        L->name = re->name;
        L->ref_max_abs = re->stats.max_abs;
        L->ref_rms = ref_rms(&re->stats);
        const sd_trace_entry *te = find_entry(&r->test, re->name, &ct), *fe = find_entry(&r->forced, re->name, &cf);
        if (te) {
            L->test = te->stats;
            L->has_test = 1;
            if (te->has_err) { L->carried = te->err; L->has_carried = 1; }
            if (r->first_inf < 0 && te->stats.n_inf) r->first_inf = r->n - 1;
            if (r->first_nan < 0 && te->stats.n_nan) r->first_nan = r->n - 1;
        }
        if (fe && fe->has_err) {
            L->local = fe->err;
            L->has_local = 1;
            double rel = L->ref_rms > 0 ? L->local.rms / L->ref_rms : L->local.rms;
            /* a layer that turns finite reference values into Inf/NaN adds the most of all */
            if (rel != rel || L->local.nan_mismatch || L->local.max_abs == INFINITY) rel = INFINITY;
            if (rel > worst) { worst = rel; r->worst_local = r->n - 1; }
        }
        if (r->first_overflow < 0 && re->stats.max_abs > range_max) r->first_overflow = r->n - 1;
    }
    return 0;
}

void sd_shadow_free(sd_shadow_result *r) {
    sd_trace_free(&r->ref);
    sd_trace_free(&r->test);
    sd_trace_free(&r->forced);
    free(r->layers);
    memset(r, 0, sizeof *r);
}

void sd_shadow_print(const sd_shadow_result *r, FILE *f) {
    fprintf(f, "%-64s %11s %11s %11s %11s %6s %6s\n", "layer (execution order)", "max|ref|", "carried rms", "local rms",
            "local rel", "Inf", "NaN");
    for (int i = 0; i < r->n; i++) {
        const sd_shadow_layer *L = &r->layers[i];
        fprintf(f, "%-64s %11.4g %11.4g %11.4g %11.4g %6lld %6lld%s\n", L->name, L->ref_max_abs,
                L->has_carried ? L->carried.rms : NAN, L->has_local ? L->local.rms : NAN,
                L->has_local && L->ref_rms > 0 ? L->local.rms / L->ref_rms : NAN, (long long)L->test.n_inf,
                (long long)L->test.n_nan, L->ref_max_abs > r->range_max ? "  beyond the format's range" : "");
    }
    if (r->first_overflow >= 0)
        fprintf(f, "first layer beyond the storage format's range (|x| > %g): %s (max |x| %.6g in the reference)\n", r->range_max,
                r->layers[r->first_overflow].name, r->layers[r->first_overflow].ref_max_abs);
    else fprintf(f, "no layer leaves the storage format's range (max %g)\n", r->range_max);
    if (r->first_inf >= 0) fprintf(f, "first Inf: %s\n", r->layers[r->first_inf].name);
    if (r->first_nan >= 0) fprintf(f, "first NaN: %s\n", r->layers[r->first_nan].name);
    if (r->worst_local >= 0)
        fprintf(f, "the layer that adds the most error by itself: %s (local rms %.4g = %.3g of its output's rms)\n",
                r->layers[r->worst_local].name, r->layers[r->worst_local].local.rms,
                r->layers[r->worst_local].ref_rms > 0 ? r->layers[r->worst_local].local.rms / r->layers[r->worst_local].ref_rms : 0);
}

int sd_shadow_write_report(const sd_shadow_result *r, const char *path) {
    sd_outfile o;
    if (sd_out_open(&o, path)) return -1;
    FILE *f = o.f;
    fprintf(f, "{\n  \"range_max\": %.9g,\n  \"first_overflow\": ", r->range_max);
    if (r->first_overflow >= 0) {
        fprintf(f, "{\"module\": ");
        json_write_string(f, r->layers[r->first_overflow].name);
        fprintf(f, ", \"max_abs_ref\": %.9g}", r->layers[r->first_overflow].ref_max_abs);
    } else fprintf(f, "null");
    const char *keys[3] = { "first_inf", "first_nan", "worst_layer" };
    int idx[3] = { r->first_inf, r->first_nan, r->worst_local };
    for (int k = 0; k < 3; k++) {
        fprintf(f, ",\n  \"%s\": ", keys[k]);
        if (idx[k] >= 0) {
            fprintf(f, "{\"module\": ");
            json_write_string(f, r->layers[idx[k]].name);
            fprintf(f, ", \"max_abs_ref\": %.9g}", r->layers[idx[k]].ref_max_abs);
        } else fprintf(f, "null");
    }
    fprintf(f, ",\n  \"layers\": [");
    for (int i = 0; i < r->n; i++) {
        const sd_shadow_layer *L = &r->layers[i];
        fprintf(f, "%s\n    {\"module\": ", i ? "," : "");
        json_write_string(f, L->name);
        fprintf(f, ", ");
        json_num_out(f, "max_abs_ref", L->ref_max_abs, 1);
        json_num_out(f, "max_abs_test", L->has_test ? L->test.max_abs : NAN, 1);
        fprintf(f, "\"inf\": %lld, \"nan\": %lld, \"over_range\": %s, ", (long long)L->test.n_inf, (long long)L->test.n_nan,
                L->ref_max_abs > r->range_max ? "true" : "false");
        json_num_out(f, "carried_rms", L->has_carried ? L->carried.rms : NAN, 1);
        json_num_out(f, "carried_max_abs", L->has_carried ? L->carried.max_abs : NAN, 1);
        json_num_out(f, "local_rms", L->has_local ? L->local.rms : NAN, 1);
        json_num_out(f, "local_max_abs", L->has_local ? L->local.max_abs : NAN, 1);
        json_num_out(f, "local_rel", L->has_local && L->ref_rms > 0 ? L->local.rms / L->ref_rms : NAN, 0);
        fprintf(f, "}");
    }
    fprintf(f, "\n  ]\n}\n");
    return sd_out_commit(&o);
}
