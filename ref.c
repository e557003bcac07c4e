/* ref.c — the engine core: tensors, parameters, the precision policy, threads, the operations
 * every model is built from, tracing, and weight loading.
 *
 * Every operation has one shape: its inputs are already values of the storage format; it
 * computes in float32 (or as the policy says) in an order written here; it rounds its result
 * once to the storage format. Threads split output elements, never a sum. */
#include "sdref.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* ======================================================================================
 * Threads
 * ====================================================================================== */

void sd_set_threads(int n) {
#ifdef _OPENMP
    if (n > 0) omp_set_num_threads(n);
#else
    (void)n;
#endif
}

/* Below this much work (roughly multiply-adds) a parallel region costs more than it saves. */
#define PARALLEL_MIN_WORK 32768.0

void sd_parallel_for_work(int64_t n, double work_per_item, sd_range_fn fn, void *arg) {
    if (n <= 0) return;
    (void)work_per_item;   /* only OpenMP builds share work */
#ifdef _OPENMP
    if (n > 1 && (double)n * work_per_item >= PARALLEL_MIN_WORK && !omp_in_parallel()) {
        _Pragma("omp parallel")
        {
            int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
            int64_t b = n * t / nt, e = n * (t + 1) / nt;
            if (b < e) fn(arg, b, e);
        }
        return;
    }
#endif
    fn(arg, 0, n);
}

void sd_parallel_for(int64_t n, sd_range_fn fn, void *arg) { sd_parallel_for_work(n, PARALLEL_MIN_WORK, fn, arg); }

/* ======================================================================================
 * Tensors and parameters
 * ====================================================================================== */

sd_tensor tensor_new(int ndim, int d0, int d1, int d2, int d3) {
    sd_tensor t;
    int d[4] = { d0, d1, d2, d3 };
    t.ndim = ndim;
    for (int i = 0; i < 4; i++) t.shape[i] = i < ndim ? d[i] : 1;
    size_t n = tensor_numel(&t);
    t.data = sd_calloc(n, sizeof(float));
    return t;
}

size_t tensor_numel(const sd_tensor *t) {
    size_t n = 1;
    for (int i = 0; i < 4; i++) n *= (size_t)t->shape[i];
    return n;
}

sd_tensor tensor_copy(const sd_tensor *t) {
    sd_tensor r = *t;
    size_t n = tensor_numel(t);
    r.data = sd_malloc(n * sizeof(float));
    memcpy(r.data, t->data, n * sizeof(float));
    return r;
}

void tensor_free(sd_tensor *t) {
    free(t->data);
    memset(t, 0, sizeof *t);
}

int tensor_same_shape(const sd_tensor *a, const sd_tensor *b) {
    for (int i = 0; i < 4; i++)
        if (a->shape[i] != b->shape[i]) return 0;
    return 1;
}

size_t param_numel(const sd_param *p) {
    size_t n = 1;
    for (int i = 0; i < p->ndim; i++) n *= (size_t)p->shape[i];
    return n;
}

void param_read(const sd_param *p, size_t off, size_t n, float *dst) {
    switch (p->fmt) {
    case SD_F16: { const uint16_t *s = (const uint16_t *)p->data + off; for (size_t i = 0; i < n; i++) dst[i] = sd_f16_to_f32(s[i]); break; }
    case SD_BF16: { const uint16_t *s = (const uint16_t *)p->data + off; for (size_t i = 0; i < n; i++) dst[i] = sd_bf16_to_f32(s[i]); break; }
    case SD_E4M3: { const uint8_t *s = (const uint8_t *)p->data + off; for (size_t i = 0; i < n; i++) dst[i] = sd_e4m3_to_f32(s[i]); break; }
    case SD_E5M2: { const uint8_t *s = (const uint8_t *)p->data + off; for (size_t i = 0; i < n; i++) dst[i] = sd_e5m2_to_f32(s[i]); break; }
    default: memcpy(dst, (const float *)p->data + off, n * sizeof(float)); break;
    }
}

/* The whole parameter as float32 (caller frees). */
static float *param_to_f32(const sd_param *p) {
    size_t n = param_numel(p);
    float *d = sd_malloc(n * sizeof(float));
    param_read(p, 0, n, d);
    return d;
}

void param_free(sd_param *p) {
    free(p->data);
    memset(p, 0, sizeof *p);
}

/* ======================================================================================
 * Precision policy
 * ====================================================================================== */

static const char *const model_names[SD_MODEL_COUNT] = { "text", "vision", "unet", "vae", "ipadapter" };

const char *sd_model_kind_name(sd_model_kind k) { return (unsigned)k < SD_MODEL_COUNT ? model_names[k] : "?"; }

/* The presets, each one policy applied to every model (fp16-vae32 then resets the VAE). */
typedef struct preset { const char *name; sd_policy pol; const char *what; } preset;
static const preset presets[] = {
    { "fp32",       { SD_F32,  SD_F32, SD_F32, 0, 1 }, "float32 everywhere (CPU PyTorch)" },
    { "fp16",       { SD_F16,  SD_F16, SD_F32, 0, 1 }, "fp16 weights and results, float32 accumulation (a .half() GPU pipeline)" },
    { "fp16-vae32", { SD_F16,  SD_F16, SD_F32, 0, 1 }, "fp16, but the VAE in float32 (A1111 --no-half-vae)" },
    { "bf16",       { SD_BF16, SD_BF16, SD_F32, 0, 1 }, "bfloat16 weights and results, float32 accumulation" },
    { "tf32",       { SD_F32,  SD_F32, SD_F32, 1, 1 }, "float32 with conv/matmul inputs rounded to TF32 (Ampere default)" },
    { "fp16-acc16", { SD_F16,  SD_F16, SD_F16, 0, 0 }, "fp16 with fp16 accumulation and fp16 attention (worst case)" },
    { "fp8",        { SD_E4M3, SD_F16, SD_F32, 0, 1 }, "FP8 E4M3 weights, fp16 compute" },
};
#define N_PRESETS (int)(sizeof presets / sizeof presets[0])

static const preset *find_preset(const char *s, size_t len) {
    for (int i = 0; i < N_PRESETS; i++)
        if (strlen(presets[i].name) == len && strncmp(presets[i].name, s, len) == 0) return &presets[i];
    return NULL;
}

static void apply_preset(sd_precision *p, const preset *pr) {
    for (int m = 0; m < SD_MODEL_COUNT; m++) p->model[m] = pr->pol;
    if (strcmp(pr->name, "fp16-vae32") == 0) p->model[SD_VAE] = presets[0].pol;
}

static int parse_bool(const char *s, int *out) {
    if (!strcmp(s, "1") || !strcmp(s, "on") || !strcmp(s, "true") || !strcmp(s, "yes")) { *out = 1; return 0; }
    if (!strcmp(s, "0") || !strcmp(s, "off") || !strcmp(s, "false") || !strcmp(s, "no")) { *out = 0; return 0; }
    return -1;
}

static void precision_help(const char *spec, const char *problem) {
    char list[256] = "";
    for (int i = 0; i < N_PRESETS; i++) {
        strcat(list, presets[i].name);
        if (i + 1 < N_PRESETS) strcat(list, " ");
    }
    sd_error("--precision '%s': %s. Valid: a preset (%s), or comma-separated MODEL=PRESET and "
             "MODEL.FIELD=VALUE with MODEL in text vision unet vae ipadapter all, FIELD in weights storage accum "
             "(fp32 fp16 bf16 tf32 fp8e4m3 fp8e5m2), tf32 upcast (0/1)", spec, problem, list);
}

int sd_precision_parse(const char *spec, sd_precision *out) {
    sd_precision p;
    apply_preset(&p, &presets[0]);
    if (!spec || !*spec) { *out = p; return 0; }
    char *buf = sd_strdup(spec), *save = buf, *item;
    int rc = 0;
    for (item = buf; item && *item; ) {
        char *comma = strchr(item, ',');
        if (comma) *comma = 0;
        char *eq = strchr(item, '=');
        if (!eq) {
            const preset *pr = find_preset(item, strlen(item));
            if (!pr) { precision_help(spec, "unknown preset"); rc = -1; break; }
            apply_preset(&p, pr);
        } else {
            *eq = 0;
            const char *lhs = item, *rhs = eq + 1;
            const char *dot = strchr(lhs, '.');
            size_t mlen = dot ? (size_t)(dot - lhs) : strlen(lhs);
            int m0 = -1, m1 = -1;
            if (mlen == 3 && !strncmp(lhs, "all", 3)) { m0 = 0; m1 = SD_MODEL_COUNT - 1; }
            for (int m = 0; m < SD_MODEL_COUNT; m++)
                if (strlen(model_names[m]) == mlen && !strncmp(lhs, model_names[m], mlen)) m0 = m1 = m;
            if (m0 < 0) { precision_help(spec, "unknown model"); rc = -1; break; }
            for (int m = m0; m <= m1; m++) {
                sd_policy *pol = &p.model[m];
                if (!dot) {
                    const preset *pr = find_preset(rhs, strlen(rhs));
                    if (!pr) { precision_help(spec, "unknown preset"); rc = -1; break; }
                    *pol = strcmp(pr->name, "fp16-vae32") == 0 && m == SD_VAE ? presets[0].pol : pr->pol;
                    continue;
                }
                const char *field = dot + 1;
                sd_format f;
                if (!strcmp(field, "weights") || !strcmp(field, "storage") || !strcmp(field, "accum")) {
                    if (sd_format_parse(rhs, &f) != 0) { sd_clear_error(); precision_help(spec, "unknown format"); rc = -1; break; }
                    if (!strcmp(field, "weights")) pol->weights = f;
                    else if (!strcmp(field, "storage")) pol->storage = f;
                    else pol->accum = f;
                } else if (!strcmp(field, "tf32") || !strcmp(field, "upcast")) {
                    int b;
                    if (parse_bool(rhs, &b)) { precision_help(spec, "expected 0 or 1"); rc = -1; break; }
                    if (!strcmp(field, "tf32")) pol->tf32_inputs = b; else pol->upcast_attention = b;
                } else { precision_help(spec, "unknown field"); rc = -1; break; }
            }
            if (rc) break;
        }
        item = comma ? comma + 1 : NULL;
    }
    free(save);
    if (rc == 0) *out = p;
    return rc;
}

void sd_policy_describe(const sd_policy *p, char *buf, size_t n) {
    snprintf(buf, n, "weights=%s storage=%s accum=%s tf32=%d upcast=%d", sd_format_name(p->weights),
             sd_format_name(p->storage), sd_format_name(p->accum), p->tf32_inputs, p->upcast_attention);
}

/* ======================================================================================
 * Rounding helpers
 * ====================================================================================== */

void op_round_storage(const sd_ctx *c, sd_tensor *x) { sd_round_buffer(x->data, tensor_numel(x), c->pol.storage); }
void op_round_weights(const sd_ctx *c, sd_tensor *x) { sd_round_buffer(x->data, tensor_numel(x), c->pol.weights); }

/* Inputs to conv/matmul: rounded to TF32 when the policy asks (what Ampere tensor cores see). */
static void round_mm_inputs(const sd_ctx *c, float *x, size_t n) {
    if (c->pol.tf32_inputs) sd_round_buffer(x, n, SD_TF32);
}

/* ======================================================================================
 * GEMM: C[m][n] = sum_k A[m][k] B[k][n], k ascending, float32.
 * A tile of outputs is accumulated in registers; every output is the same sequence of
 * float32 multiply-then-add in k order, whatever the tiling, so the bits never change.
 * ====================================================================================== */

#define GEMM_MR 4
#define GEMM_NR 64

static void gemm_tile(int mr, int nr, int K, const float *A, int lda, const float *B, int ldb, float *C, int ldc) {
    float acc[GEMM_MR][GEMM_NR];
    memset(acc, 0, sizeof acc);
    if (mr == GEMM_MR && nr == GEMM_NR) {
        for (int k = 0; k < K; k++) {                      /* full tile: the hot loop */
            const float *b = B + (size_t)k * ldb;
            float a0 = A[k], a1 = A[(size_t)lda + k], a2 = A[2 * (size_t)lda + k], a3 = A[3 * (size_t)lda + k];
            for (int j = 0; j < GEMM_NR; j++) {
                float bj = b[j];
                acc[0][j] += a0 * bj;
                acc[1][j] += a1 * bj;
                acc[2][j] += a2 * bj;
                acc[3][j] += a3 * bj;
            }
        }
    } else {
        for (int k = 0; k < K; k++) {                      /* edge tile: same arithmetic */
            const float *b = B + (size_t)k * ldb;
            for (int i = 0; i < mr; i++) {
                float a = A[(size_t)i * lda + k];
                for (int j = 0; j < nr; j++) acc[i][j] += a * b[j];
            }
        }
    }
    for (int i = 0; i < mr; i++) memcpy(C + (size_t)i * ldc, acc[i], (size_t)nr * sizeof(float));
}

void sd_gemm(int M, int N, int K, const float *A, int lda, const float *B, int ldb, float *C, int ldc) {
    for (int n0 = 0; n0 < N; n0 += GEMM_NR)
        for (int m0 = 0; m0 < M; m0 += GEMM_MR) {
            int mr = M - m0 < GEMM_MR ? M - m0 : GEMM_MR;
            int nr = N - n0 < GEMM_NR ? N - n0 : GEMM_NR;
            gemm_tile(mr, nr, K, A + (size_t)m0 * lda, lda, B + n0, ldb, C + (size_t)m0 * ldc + n0, ldc);
        }
}

/* The same product with the accumulator rounded to `acc` after every add (k ascending). */
static void gemm_acc_rounded(int M, int N, int K, const float *A, int lda, const float *B, int ldb, float *C, int ldc,
                             sd_format acc) {
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            float s = 0.0f;
            for (int k = 0; k < K; k++) {
                float a = A[(size_t)m * lda + k], b = B[(size_t)k * ldb + n];
                /* s = round(s + a*b) from the exact value, as a narrow-accumulating MAC unit does */
                s = acc == SD_F16 ? sd_f16_fma(a, b, s) : acc == SD_BF16 ? sd_bf16_fma(a, b, s) : sd_round(s + a * b, acc);
            }
            C[(size_t)m * ldc + n] = s;
        }
}

static void gemm_policy(const sd_ctx *c, int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                        float *C, int ldc) {
    if (c->pol.accum == SD_F32) sd_gemm(M, N, K, A, lda, B, ldb, C, ldc);
    else gemm_acc_rounded(M, N, K, A, lda, B, ldb, C, ldc, c->pol.accum);
}

/* Bias add and the one rounding of an operation's result. The bias add rounds with the
 * accumulator when accumulation is in a narrow format (it is one more add). */
static float finish(const sd_ctx *c, float sum, float bias) {
    float v = sum + bias;
    if (c->pol.accum != SD_F32) v = sd_round(v, c->pol.accum);
    return sd_round(v, c->pol.storage);
}

/* ======================================================================================
 * conv2d via column blocks: each block of output pixels gets its own im2col panel
 * B[K][nb] (K = Cin*kh*kw in that order), then C = W[Cout][K] * B.
 * ====================================================================================== */

#define CONV_NB 256

typedef struct conv_job {
    const sd_ctx *c; const sd_tensor *x; float *wt; const float *bias; float *out;
    int cin, h, w, cout, kh, kw, stride, pad[4], oh, ow, n_blocks_per_image;
} conv_job;

static void conv_range(void *arg, int64_t begin, int64_t end) {
    conv_job *j = arg;
    int K = j->cin * j->kh * j->kw, P = j->oh * j->ow;
    float *panel = sd_malloc((size_t)K * CONV_NB * sizeof(float));
    float *res = sd_malloc((size_t)j->cout * CONV_NB * sizeof(float));
    for (int64_t blk = begin; blk < end; blk++) {
        int n = (int)(blk / j->n_blocks_per_image);
        int p0 = (int)(blk % j->n_blocks_per_image) * CONV_NB;
        int nb = P - p0 < CONV_NB ? P - p0 : CONV_NB;
        const float *xin = j->x->data + (size_t)n * j->cin * j->h * j->w;
        for (int ci = 0; ci < j->cin; ci++)                  /* im2col: zero outside the image */
            for (int ky = 0; ky < j->kh; ky++)
                for (int kx = 0; kx < j->kw; kx++) {
                    float *row = panel + ((size_t)(ci * j->kh + ky) * j->kw + kx) * nb;
                    for (int q = 0; q < nb; q++) {
                        int p = p0 + q, oy = p / j->ow, ox = p % j->ow;
                        int iy = oy * j->stride - j->pad[0] + ky, ix = ox * j->stride - j->pad[2] + kx;
                        row[q] = (iy >= 0 && iy < j->h && ix >= 0 && ix < j->w)
                                     ? xin[((size_t)ci * j->h + iy) * j->w + ix] : 0.0f;
                    }
                }
        round_mm_inputs(j->c, panel, (size_t)K * nb);
        gemm_policy(j->c, j->cout, nb, K, j->wt, K, panel, nb, res, nb);
        for (int co = 0; co < j->cout; co++) {
            float *o = j->out + ((size_t)n * j->cout + co) * P + p0;
            float b = j->bias ? j->bias[co] : 0.0f;
            for (int q = 0; q < nb; q++) o[q] = finish(j->c, res[(size_t)co * nb + q], b);
        }
    }
    free(panel);
    free(res);
}

sd_tensor op_conv2d(const sd_ctx *c, const sd_tensor *x, const sd_param *w, const sd_param *b, int stride,
                    const int pad[4]) {
    conv_job j;
    j.c = c; j.x = x;
    j.cin = x->shape[1]; j.h = x->shape[2]; j.w = x->shape[3];
    j.cout = w->shape[0]; j.kh = w->shape[2]; j.kw = w->shape[3]; j.stride = stride;
    memcpy(j.pad, pad, sizeof j.pad);
    if (w->shape[1] != j.cin) sd_fatal("conv2d: weight expects %d input channels, got %d", w->shape[1], j.cin);
    j.oh = (j.h + pad[0] + pad[1] - j.kh) / stride + 1;
    j.ow = (j.w + pad[2] + pad[3] - j.kw) / stride + 1;
    sd_tensor out = tensor_new(4, x->shape[0], j.cout, j.oh, j.ow);
    j.wt = param_to_f32(w);
    round_mm_inputs(c, j.wt, param_numel(w));
    float *bias = b && b->data ? param_to_f32(b) : NULL;
    j.bias = bias;
    j.out = out.data;
    j.n_blocks_per_image = (j.oh * j.ow + CONV_NB - 1) / CONV_NB;
    sd_parallel_for_work((int64_t)x->shape[0] * j.n_blocks_per_image, (double)j.cout * j.cin * j.kh * j.kw * CONV_NB, conv_range, &j);
    free(j.wt);
    free(bias);
    return out;
}

/* ======================================================================================
 * linear: y[r][m] = sum_k x[r][k] w[m][k] + b[m], k ascending. W is transposed once to
 * [K][M] so the inner loop runs over outputs.
 * ====================================================================================== */

#define LIN_RB 16

typedef struct lin_job { const sd_ctx *c; const float *x; const float *wt; const float *bias; float *y; int R, K, M; } lin_job;

static void linear_range(void *arg, int64_t begin, int64_t end) {
    lin_job *j = arg;
    float *xr = sd_malloc((size_t)LIN_RB * j->K * sizeof(float));
    for (int64_t rb = begin; rb < end; rb++) {
        int r0 = (int)rb * LIN_RB, nr = j->R - r0 < LIN_RB ? j->R - r0 : LIN_RB;
        memcpy(xr, j->x + (size_t)r0 * j->K, (size_t)nr * j->K * sizeof(float));
        round_mm_inputs(j->c, xr, (size_t)nr * j->K);
        float *y = j->y + (size_t)r0 * j->M;
        gemm_policy(j->c, nr, j->M, j->K, xr, j->K, j->wt, j->M, y, j->M);
        for (int r = 0; r < nr; r++)
            for (int m = 0; m < j->M; m++) y[(size_t)r * j->M + m] = finish(j->c, y[(size_t)r * j->M + m], j->bias ? j->bias[m] : 0.0f);
    }
    free(xr);
}

sd_tensor op_linear(const sd_ctx *c, const sd_tensor *x, const sd_param *w, const sd_param *b) {
    int K = x->shape[x->ndim - 1], M = w->shape[0];
    if (w->shape[1] != K) sd_fatal("linear: weight expects %d inputs, got %d", w->shape[1], K);
    sd_tensor y = *x;
    y.shape[y.ndim - 1] = M;
    y.data = sd_malloc(tensor_numel(&y) * sizeof(float));
    int R = (int)(tensor_numel(x) / (size_t)K);
    float *wf = param_to_f32(w), *wt = sd_malloc((size_t)K * M * sizeof(float));
    for (int m = 0; m < M; m++)
        for (int k = 0; k < K; k++) wt[(size_t)k * M + m] = wf[(size_t)m * K + k];
    free(wf);
    round_mm_inputs(c, wt, (size_t)K * M);
    float *bias = b && b->data ? param_to_f32(b) : NULL;
    lin_job j = { c, x->data, wt, bias, y.data, R, K, M };
    sd_parallel_for_work((R + LIN_RB - 1) / LIN_RB, (double)LIN_RB * K * M, linear_range, &j);
    free(wt);
    free(bias);
    return y;
}

/* ======================================================================================
 * Normalisation. Statistics in double (sequential sums; mean, then the mean of squared
 * deviations), so they are exact to float32 precision at any size; PyTorch upcasts norms
 * under fp16 as well. The normalised value is formed in float32 and rounded once.
 * ====================================================================================== */

static void norm_stats(const float *x, size_t n, size_t stride_outer, size_t inner, size_t count_outer,
                       double *mean, double *rstd, float eps) {
    /* elements: for o < count_outer, i < inner: x[o*stride_outer + i] */
    double s = 0.0;
    for (size_t o = 0; o < count_outer; o++)
        for (size_t i = 0; i < inner; i++) s += x[o * stride_outer + i];
    double m = s / (double)n, v = 0.0;
    for (size_t o = 0; o < count_outer; o++)
        for (size_t i = 0; i < inner; i++) {
            double d = x[o * stride_outer + i] - m;
            v += d * d;
        }
    v /= (double)n;
    *mean = m;
    *rstd = 1.0 / sqrt(v + (double)eps);
}

typedef struct gn_job {
    const sd_ctx *c; const sd_tensor *x; float *y; const float *g, *b; int C, groups; size_t HW; float eps;
} gn_job;

static void group_norm_range(void *arg, int64_t begin, int64_t end) {
    gn_job *j = arg;
    int cpg = j->C / j->groups;
    for (int64_t t = begin; t < end; t++) {                 /* one (batch, group) per item */
        int n = (int)(t / j->groups), grp = (int)(t % j->groups);
        size_t base = ((size_t)n * j->C + (size_t)grp * cpg) * j->HW;
        double mean, rstd;
        norm_stats(j->x->data + base, (size_t)cpg * j->HW, j->HW, j->HW, (size_t)cpg, &mean, &rstd, j->eps);
        for (int ci = 0; ci < cpg; ci++) {
            int ch = grp * cpg + ci;
            double ga = j->g ? j->g[ch] : 1.0, be = j->b ? j->b[ch] : 0.0;
            for (size_t i = 0; i < j->HW; i++) {
                size_t k = base + (size_t)ci * j->HW + i;
                j->y[k] = sd_round((float)((j->x->data[k] - mean) * rstd * ga + be), j->c->pol.storage);
            }
        }
    }
}

sd_tensor op_group_norm(const sd_ctx *c, const sd_tensor *x, int groups, float eps, const sd_param *gamma,
                        const sd_param *beta) {
    int C = x->shape[1];
    if (groups <= 0 || C % groups) sd_fatal("group_norm: %d channels do not split into %d groups", C, groups);
    sd_tensor y = *x;
    y.data = sd_malloc(tensor_numel(x) * sizeof(float));
    float *g = gamma && gamma->data ? param_to_f32(gamma) : NULL, *b = beta && beta->data ? param_to_f32(beta) : NULL;
    gn_job j = { c, x, y.data, g, b, C, groups, tensor_numel(x) / ((size_t)x->shape[0] * C), eps };
    sd_parallel_for_work((int64_t)x->shape[0] * groups, 3.0 * (double)(C / groups) * j.HW, group_norm_range, &j);
    free(g);
    free(b);
    return y;
}

typedef struct ln_job { const sd_ctx *c; const float *x; float *y; const float *g, *b; int D; float eps; } ln_job;

static void layer_norm_range(void *arg, int64_t begin, int64_t end) {
    ln_job *j = arg;
    for (int64_t r = begin; r < end; r++) {
        const float *x = j->x + (size_t)r * j->D;
        double mean, rstd;
        norm_stats(x, (size_t)j->D, 0, (size_t)j->D, 1, &mean, &rstd, j->eps);
        for (int i = 0; i < j->D; i++) {
            double ga = j->g ? j->g[i] : 1.0, be = j->b ? j->b[i] : 0.0;
            j->y[(size_t)r * j->D + i] = sd_round((float)((x[i] - mean) * rstd * ga + be), j->c->pol.storage);
        }
    }
}

sd_tensor op_layer_norm(const sd_ctx *c, const sd_tensor *x, float eps, const sd_param *gamma, const sd_param *beta) {
    int D = x->shape[x->ndim - 1];
    sd_tensor y = *x;
    y.data = sd_malloc(tensor_numel(x) * sizeof(float));
    float *g = gamma && gamma->data ? param_to_f32(gamma) : NULL, *b = beta && beta->data ? param_to_f32(beta) : NULL;
    ln_job j = { c, x->data, y.data, g, b, D, eps };
    sd_parallel_for_work((int64_t)(tensor_numel(x) / (size_t)D), 3.0 * D, layer_norm_range, &j);
    free(g);
    free(b);
    return y;
}

/* ======================================================================================
 * Elementwise operations: float32 from the (rounded) inputs, one rounding.
 * ====================================================================================== */

typedef enum unary_kind { U_SILU, U_GELU, U_GELU_TANH, U_QUICK_GELU, U_SCALE } unary_kind;
typedef struct unary_job { const sd_ctx *c; const float *x; float *y; unary_kind kind; float s; } unary_job;

static float sigmoidf(float z) { return 1.0f / (1.0f + sd_expf(-z)); }

static void unary_range(void *arg, int64_t begin, int64_t end) {
    unary_job *j = arg;
    for (int64_t i = begin; i < end; i++) {
        float x = j->x[i], y;
        switch (j->kind) {
        case U_SILU: y = x / (1.0f + sd_expf(-x)); break;                                   /* x * sigmoid(x) */
        case U_GELU: y = sd_gelu_erff(x); break;                                  /* exact (erf) GELU */
        case U_GELU_TANH: y = sd_gelu_tanhf(x); break;                              /* tanh approximation */
        case U_QUICK_GELU: y = x * sigmoidf(1.702f * x); break;                             /* CLIP's quick_gelu */
        default: y = x * j->s; break;
        }
        j->y[i] = sd_round(y, j->c->pol.storage);
    }
}

static sd_tensor unary(const sd_ctx *c, const sd_tensor *x, unary_kind kind, float s) {
    sd_tensor y = *x;
    size_t n = tensor_numel(x);
    y.data = sd_malloc(n * sizeof(float));
    unary_job j = { c, x->data, y.data, kind, s };
    sd_parallel_for_work((int64_t)n, 8.0, unary_range, &j);
    return y;
}

sd_tensor op_silu(const sd_ctx *c, const sd_tensor *x) { return unary(c, x, U_SILU, 0); }
sd_tensor op_gelu(const sd_ctx *c, const sd_tensor *x) { return unary(c, x, U_GELU, 0); }
sd_tensor op_gelu_tanh(const sd_ctx *c, const sd_tensor *x) { return unary(c, x, U_GELU_TANH, 0); }
sd_tensor op_quick_gelu(const sd_ctx *c, const sd_tensor *x) { return unary(c, x, U_QUICK_GELU, 0); }
sd_tensor op_scale(const sd_ctx *c, const sd_tensor *a, float s) { return unary(c, a, U_SCALE, s); }

typedef struct binary_job { const sd_ctx *c; const float *a, *b; float *y; int mul; size_t inner, bc; } binary_job;

static void binary_range(void *arg, int64_t begin, int64_t end) {
    binary_job *j = arg;
    for (int64_t i = begin; i < end; i++) {
        /* inner > 0: b is broadcast [N,C] over the inner H*W elements */
        float b = j->inner ? j->b[(size_t)i / j->inner] : j->b[i];
        j->y[i] = sd_round(j->mul ? j->a[i] * b : j->a[i] + b, j->c->pol.storage);
    }
}

static sd_tensor binary(const sd_ctx *c, const sd_tensor *a, const sd_tensor *b, int mul, size_t inner) {
    sd_tensor y = *a;
    size_t n = tensor_numel(a);
    y.data = sd_malloc(n * sizeof(float));
    binary_job j = { c, a->data, b->data, y.data, mul, inner, 0 };
    sd_parallel_for_work((int64_t)n, 1.0, binary_range, &j);
    return y;
}

sd_tensor op_add(const sd_ctx *c, const sd_tensor *a, const sd_tensor *b) {
    if (tensor_numel(a) != tensor_numel(b)) sd_fatal("add: shapes differ");
    return binary(c, a, b, 0, 0);
}

sd_tensor op_mul(const sd_ctx *c, const sd_tensor *a, const sd_tensor *b) {
    if (tensor_numel(a) != tensor_numel(b)) sd_fatal("mul: shapes differ");
    return binary(c, a, b, 1, 0);
}

sd_tensor op_add_channel(const sd_ctx *c, const sd_tensor *a, const sd_tensor *b) {
    if (tensor_numel(b) != (size_t)a->shape[0] * a->shape[1]) sd_fatal("add_channel: shapes differ");
    return binary(c, a, b, 0, (size_t)a->shape[2] * a->shape[3]);
}

/* softmax over the last dimension: max, exp(x - max) summed in order, divided. */
static void softmax_row(float *x, int n, sd_format round_to) {
    float m = x[0];
    for (int i = 1; i < n; i++) m = x[i] > m ? x[i] : m;
    float s = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = sd_expf(x[i] - m);
        s += x[i];
    }
    for (int i = 0; i < n; i++) x[i] = sd_round(x[i] / s, round_to);
}

sd_tensor op_softmax(const sd_ctx *c, const sd_tensor *x) {
    sd_tensor y = tensor_copy(x);
    int D = x->shape[x->ndim - 1];
    size_t rows = tensor_numel(x) / (size_t)D;
    for (size_t r = 0; r < rows; r++) softmax_row(y.data + r * D, D, c->pol.storage);
    return y;
}

/* ======================================================================================
 * Attention as one operation. Per (batch, head, block of query rows): scores = q.k^T (d in
 * order) * scale, masked, softmax, then probs . v (keys in order); rounded once at the end.
 * ====================================================================================== */

#define ATT_QB 32

typedef struct att_job {
    const sd_ctx *c; const float *q, *k, *v; float *o; int B, Tq, Tk, H, D, causal; float scale;
    int qblocks; float *kt;   /* k transposed per (batch, head): [B*H][D][Tk] */
} att_job;

static void attention_range(void *arg, int64_t begin, int64_t end) {
    att_job *j = arg;
    int HD = j->H * j->D;
    int upcast = j->c->pol.upcast_attention;
    sd_format sf = upcast ? SD_F32 : j->c->pol.storage;
    float *s = sd_malloc((size_t)ATT_QB * j->Tk * sizeof(float));
    float *qb = sd_malloc((size_t)ATT_QB * j->D * sizeof(float));
    float *ob = sd_malloc((size_t)ATT_QB * j->D * sizeof(float));
    for (int64_t item = begin; item < end; item++) {
        int bh = (int)(item / j->qblocks), b = bh / j->H, h = bh % j->H;
        int q0 = (int)(item % j->qblocks) * ATT_QB, nq = j->Tq - q0 < ATT_QB ? j->Tq - q0 : ATT_QB;
        for (int i = 0; i < nq; i++)
            memcpy(qb + (size_t)i * j->D, j->q + ((size_t)b * j->Tq + q0 + i) * HD + (size_t)h * j->D, (size_t)j->D * sizeof(float));
        round_mm_inputs(j->c, qb, (size_t)nq * j->D);
        gemm_policy(j->c, nq, j->Tk, j->D, qb, j->D, j->kt + (size_t)bh * j->D * j->Tk, j->Tk, s, j->Tk);
        for (int i = 0; i < nq; i++) {
            float *row = s + (size_t)i * j->Tk;
            int valid = j->causal ? q0 + i + 1 : j->Tk;
            for (int t = 0; t < j->Tk; t++) row[t] = sd_round(row[t] * j->scale, sf);
            /* causal: masked logits get float32's lowest value (transformers' CLIP), exp -> 0 */
            for (int t = valid; t < j->Tk; t++) row[t] = -3.4028234663852886e38f;
            softmax_row(row, j->Tk, sf);
        }
        round_mm_inputs(j->c, s, (size_t)nq * j->Tk);
        gemm_policy(j->c, nq, j->D, j->Tk, s, j->Tk, j->v + (size_t)b * j->Tk * HD + (size_t)h * j->D, HD, ob, j->D);
        for (int i = 0; i < nq; i++)
            for (int d = 0; d < j->D; d++)
                j->o[((size_t)b * j->Tq + q0 + i) * HD + (size_t)h * j->D + d] = sd_round(ob[(size_t)i * j->D + d], j->c->pol.storage);
    }
    free(s);
    free(qb);
    free(ob);
}

sd_tensor op_attention(const sd_ctx *c, const sd_tensor *q, const sd_tensor *k, const sd_tensor *v, int heads,
                       float scale, int causal) {
    att_job j;
    j.c = c; j.q = q->data; j.k = k->data; j.v = v->data;
    j.B = q->shape[0]; j.Tq = q->shape[1]; j.Tk = k->shape[1]; j.H = heads; j.D = q->shape[2] / heads;
    j.causal = causal; j.scale = scale;
    if (q->shape[2] != heads * j.D || k->shape[2] != q->shape[2] || v->shape[2] != q->shape[2] || v->shape[1] != j.Tk)
        sd_fatal("attention: q/k/v shapes do not agree");
    int HD = heads * j.D;
    j.kt = sd_malloc((size_t)j.B * heads * j.D * j.Tk * sizeof(float));
    for (int b = 0; b < j.B; b++)
        for (int h = 0; h < heads; h++)
            for (int d = 0; d < j.D; d++)
                for (int t = 0; t < j.Tk; t++)
                    j.kt[(((size_t)b * heads + h) * j.D + d) * j.Tk + t] = k->data[((size_t)b * j.Tk + t) * HD + (size_t)h * j.D + d];
    round_mm_inputs(c, j.kt, (size_t)j.B * heads * j.D * j.Tk);
    sd_tensor vr = *v;
    if (c->pol.tf32_inputs) {
        vr = tensor_copy(v);
        round_mm_inputs(c, vr.data, tensor_numel(&vr));
        j.v = vr.data;
    }
    sd_tensor o = tensor_new(3, j.B, j.Tq, HD, 1);
    j.o = o.data;
    j.qblocks = (j.Tq + ATT_QB - 1) / ATT_QB;
    sd_parallel_for_work((int64_t)j.B * heads * j.qblocks, (double)ATT_QB * j.Tk * (2.0 * j.D + 8), attention_range, &j);
    free(j.kt);
    if (c->pol.tf32_inputs) tensor_free(&vr);
    return o;
}

/* ======================================================================================
 * Value-preserving operations (no rounding)
 * ====================================================================================== */

sd_tensor op_upsample_nearest2x(const sd_ctx *c, const sd_tensor *x) {
    (void)c;
    int N = x->shape[0], C = x->shape[1], H = x->shape[2], W = x->shape[3];
    sd_tensor y = tensor_new(4, N, C, 2 * H, 2 * W);
    for (size_t nc = 0; nc < (size_t)N * C; nc++)
        for (int oy = 0; oy < 2 * H; oy++)
            for (int ox = 0; ox < 2 * W; ox++)
                y.data[(nc * 2 * H + oy) * 2 * W + ox] = x->data[(nc * H + oy / 2) * W + ox / 2];
    return y;
}

sd_tensor op_concat_channels(const sd_tensor *a, const sd_tensor *b) {
    int N = a->shape[0], Ca = a->shape[1], Cb = b->shape[1];
    size_t HW = (size_t)a->shape[2] * a->shape[3];
    if (b->shape[0] != N || (size_t)b->shape[2] * b->shape[3] != HW) sd_fatal("concat: shapes differ");
    sd_tensor y = tensor_new(4, N, Ca + Cb, a->shape[2], a->shape[3]);
    for (int n = 0; n < N; n++) {
        memcpy(y.data + (size_t)n * (Ca + Cb) * HW, a->data + (size_t)n * Ca * HW, (size_t)Ca * HW * sizeof(float));
        memcpy(y.data + ((size_t)n * (Ca + Cb) + Ca) * HW, b->data + (size_t)n * Cb * HW, (size_t)Cb * HW * sizeof(float));
    }
    return y;
}

sd_tensor op_nchw_to_tokens(const sd_tensor *x) {
    int N = x->shape[0], C = x->shape[1], HW = x->shape[2] * x->shape[3];
    sd_tensor y = tensor_new(3, N, HW, C, 1);
    for (int n = 0; n < N; n++)
        for (int ch = 0; ch < C; ch++)
            for (int p = 0; p < HW; p++) y.data[((size_t)n * HW + p) * C + ch] = x->data[((size_t)n * C + ch) * HW + p];
    return y;
}

sd_tensor op_tokens_to_nchw(const sd_tensor *x, int h, int w) {
    int N = x->shape[0], HW = x->shape[1], C = x->shape[2];
    if (HW != h * w) sd_fatal("tokens_to_nchw: %d tokens are not %dx%d", HW, h, w);
    sd_tensor y = tensor_new(4, N, C, h, w);
    for (int n = 0; n < N; n++)
        for (int p = 0; p < HW; p++)
            for (int ch = 0; ch < C; ch++) y.data[((size_t)n * C + ch) * HW + p] = x->data[((size_t)n * HW + p) * C + ch];
    return y;
}

/* ======================================================================================
 * Tracing
 * ====================================================================================== */

int sd_glob_match(const char *p, const char *s) {
    if (!*p) return !*s;
    if (*p == '*') {
        for (;; s++) {
            if (sd_glob_match(p + 1, s)) return 1;
            if (!*s) return 0;
        }
    }
    if (!*s) return 0;
    return (*p == '?' || *p == *s) && sd_glob_match(p + 1, s + 1);
}

void sd_stats_compute(const float *x, size_t n, sd_trace_stats *st) {
    memset(st, 0, sizeof *st);
    st->n = (int64_t)n;
    double sum = 0, sq = 0;
    int64_t finite = 0;
    st->min = INFINITY;
    st->max = -INFINITY;
    for (size_t i = 0; i < n; i++) {
        float v = x[i];
        if (v != v) { st->n_nan++; continue; }
        if (v == INFINITY || v == -INFINITY) st->n_inf++;
        double a = fabs((double)v);
        if (v < st->min) st->min = v;
        if (v > st->max) st->max = v;
        if (a > st->max_abs) st->max_abs = a;
        if (a > 65504.0) st->n_over_f16++;
        if (a != 0 && a < 6.103515625e-05) st->n_sub_f16++;
        if (a != INFINITY) { sum += v; finite++; }
    }
    st->mean = finite ? sum / (double)finite : 0;
    for (size_t i = 0; i < n; i++) {
        float v = x[i];
        if (v == v && v != INFINITY && v != -INFINITY) sq += (v - st->mean) * (v - st->mean);
    }
    st->std = finite ? sqrt(sq / (double)finite) : 0;
    if (!finite && !st->n_inf) st->min = st->max = 0;
}

/* The reference run's entry of that name: searched from where the last match was, so repeated
 * names pair up in execution order. */
static const sd_trace_entry *reference_entry(sd_trace *t, const char *name) {
    const sd_trace *r = t->reference;
    for (int k = 0; k < r->n; k++) {
        int i = (t->ref_cursor + k) % r->n;
        if (strcmp(r->e[i].name, name) == 0) {
            t->ref_cursor = i + 1;
            return &r->e[i];
        }
    }
    return NULL;
}

void sd_trace_tensor(const sd_ctx *c, const char *name, const sd_tensor *x) {
    sd_trace *t = c ? c->trace : NULL;
    if (!t) return;
    char full[512];
    snprintf(full, sizeof full, "%s%s%s", c->prefix ? c->prefix : "", c->prefix && *c->prefix ? "." : "", name);
    if (t->filter && !sd_glob_match(t->filter, full)) return;
    if (t->n == t->cap) {
        t->cap = t->cap ? 2 * t->cap : 64;
        t->e = sd_realloc(t->e, (size_t)t->cap * sizeof *t->e);
    }
    sd_trace_entry *e = &t->e[t->n++];
    memset(e, 0, sizeof *e);
    e->name = sd_strdup(full);
    e->ndim = x->ndim;
    for (int i = 0; i < 4; i++) e->shape[i] = x->shape[i];
    size_t n = tensor_numel(x);
    sd_stats_compute(x->data, n, &e->stats);
    if (t->nan_check && (e->stats.n_inf || e->stats.n_nan)) {
        fprintf(stderr, "sdref: --nan-check: first Inf/NaN at %s (%lld Inf, %lld NaN of %lld values)\n", full,
                (long long)e->stats.n_inf, (long long)e->stats.n_nan, (long long)e->stats.n);
        exit(3);
    }
    if (t->keep_data) {
        e->data = sd_malloc(n * sizeof(float));
        memcpy(e->data, x->data, n * sizeof(float));
    }
    if (t->reference) {
        const sd_trace_entry *r = reference_entry(t, full);
        if (r && r->data && r->stats.n == (int64_t)n) {
            sd_compare_arrays(x->data, r->data, n, &e->err);
            e->has_err = 1;
            if (t->force_reference) memcpy(x->data, r->data, n * sizeof(float));   /* teacher forcing */
        }
    }
}

void sd_trace_free(sd_trace *t) {
    for (int i = 0; i < t->n; i++) {
        free(t->e[i].name);
        free(t->e[i].data);
    }
    free(t->e);
    t->e = NULL;
    t->n = t->cap = 0;
}

/* A double as JSON (non-finite values as strings, which JSON cannot hold otherwise). */
static void json_double(char **buf, size_t *len, size_t *cap, double v);

static void sb_append(char **buf, size_t *len, size_t *cap, const char *s) {
    size_t n = strlen(s);
    if (*len + n + 1 > *cap) {
        while (*len + n + 1 > *cap) *cap = *cap ? 2 * *cap : 4096;
        *buf = sd_realloc(*buf, *cap);
    }
    memcpy(*buf + *len, s, n + 1);
    *len += n;
}

static void json_double(char **buf, size_t *len, size_t *cap, double v) {
    char tmp[64];
    if (v != v) snprintf(tmp, sizeof tmp, "\"nan\"");
    else if (v == INFINITY) snprintf(tmp, sizeof tmp, "\"inf\"");
    else if (v == -INFINITY) snprintf(tmp, sizeof tmp, "\"-inf\"");
    else snprintf(tmp, sizeof tmp, "%.9g", v);
    sb_append(buf, len, cap, tmp);
}

/* Escape a string for inclusion inside a JSON string (names are plain ASCII paths). */
static void sb_json_str(char **buf, size_t *len, size_t *cap, const char *s, int inner) {
    char tmp[8];
    sb_append(buf, len, cap, inner ? "\\\"" : "\"");
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') { snprintf(tmp, sizeof tmp, inner ? "\\\\\\%c" : "\\%c", *s); }
        else { tmp[0] = *s; tmp[1] = 0; }
        sb_append(buf, len, cap, tmp);
    }
    sb_append(buf, len, cap, inner ? "\\\"" : "\"");
}

int sd_trace_write(const sd_trace *t, const char *path) {
    st_writer w;
    st_writer_init(&w);
    char *meta = NULL;
    size_t len = 0, cap = 0;
    /* metadata values must be strings: "order" is a JSON list, "stats" a JSON object, both as text */
    sb_append(&meta, &len, &cap, "{\"order\": \"[");
    for (int i = 0; i < t->n; i++) {
        if (i) sb_append(&meta, &len, &cap, ", ");
        sb_json_str(&meta, &len, &cap, t->e[i].name, 1);
    }
    sb_append(&meta, &len, &cap, "]\", \"stats\": \"{");
    for (int i = 0; i < t->n; i++) {
        const sd_trace_entry *e = &t->e[i];
        char tmp[256];
        if (i) sb_append(&meta, &len, &cap, ", ");
        sb_json_str(&meta, &len, &cap, e->name, 1);
        sb_append(&meta, &len, &cap, ": {\\\"shape\\\": [");
        for (int d = 0; d < e->ndim; d++) {
            snprintf(tmp, sizeof tmp, "%s%lld", d ? ", " : "", (long long)e->shape[d]);
            sb_append(&meta, &len, &cap, tmp);
        }
        const char *keys[5] = { "min", "max", "max_abs", "mean", "std" };
        double vals[5] = { e->stats.min, e->stats.max, e->stats.max_abs, e->stats.mean, e->stats.std };
        sb_append(&meta, &len, &cap, "]");
        for (int k = 0; k < 5; k++) {
            snprintf(tmp, sizeof tmp, ", \\\"%s\\\": ", keys[k]);
            sb_append(&meta, &len, &cap, tmp);
            char *num = NULL;
            size_t nl = 0, nc = 0;
            json_double(&num, &nl, &nc, vals[k]);
            for (char *q = num; *q; q++)
                if (*q == '"') { memmove(q + 1, q, strlen(q) + 1); *q = '\\'; q++; }
            sb_append(&meta, &len, &cap, num);
            free(num);
        }
        snprintf(tmp, sizeof tmp, ", \\\"n\\\": %lld, \\\"inf\\\": %lld, \\\"nan\\\": %lld, \\\"over_fp16\\\": %lld, \\\"subnormal_fp16\\\": %lld}",
                 (long long)e->stats.n, (long long)e->stats.n_inf, (long long)e->stats.n_nan,
                 (long long)e->stats.n_over_f16, (long long)e->stats.n_sub_f16);
        sb_append(&meta, &len, &cap, tmp);
        if (e->data) {
            int64_t shape[4];
            for (int d = 0; d < 4; d++) shape[d] = e->shape[d];
            st_writer_add_f32(&w, e->name, e->ndim, shape, e->data);
        }
    }
    sb_append(&meta, &len, &cap, "}\"}");
    st_writer_set_metadata(&w, meta);
    free(meta);
    int rc = st_writer_write(&w, path);
    st_writer_free(&w);
    return rc;
}

/* ======================================================================================
 * Weight loading: names mapped from the file's layout onto diffusers names, tensors
 * decoded from any dtype, rounded to the policy's weight format, kept in that format.
 * ====================================================================================== */

int sd_file_exists(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    fclose(f);
    return 1;
}

char *sd_path_join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = sd_malloc(n);
    snprintf(p, n, "%s/%s", dir, name);
    return p;
}

/* The folder part of a file path ("." when there is none). */
static char *path_dir(const char *file) {
    const char *slash = strrchr(file, '/');
    if (!slash) return sd_strdup(".");
    char *d = sd_strdup(file);
    d[slash - file] = 0;
    return d;
}

int sd_model_paths(const char *path, const char *const *names, int n_names, char **file, char **config) {
    *file = *config = NULL;
    for (int i = 0; i < n_names && !*file; i++) {
        char *p = sd_path_join(path, names[i]);
        if (sd_file_exists(p)) *file = p;
        else free(p);
    }
    int folder = *file != NULL;
    if (!folder) {
        /* a folder without any of the names: name the first, so the error says what is missing */
        char *probe = sd_path_join(path, ".");
        FILE *f = fopen(probe, "rb");
        free(probe);
        if (f) {
            fclose(f);
            *file = sd_path_join(path, names[0]);
            folder = 1;
        } else {
            *file = sd_strdup(path);
        }
    }
    char *dir = path_dir(*file), *c = sd_path_join(dir, "config.json");
    free(dir);
    if (sd_file_exists(c)) *config = c;
    else free(c);
    return folder;
}

int loader_open(sd_loader *l, const char *path, sd_rename_fn rename, void *user, const sd_policy *pol) {
    memset(l, 0, sizeof *l);
    l->st = sd_malloc(sizeof *l->st);
    if (st_open(l->st, path) != 0) {
        free(l->st);
        l->st = NULL;
        return -1;
    }
    l->path = l->st->path;
    l->pol = *pol;
    l->n = l->st->n;
    l->names = sd_calloc((size_t)l->n, sizeof(char *));
    l->used = sd_calloc((size_t)l->n, sizeof(int));
    for (int i = 0; i < l->n; i++) {
        char buf[512];
        if (!rename) l->names[i] = sd_strdup(l->st->entries[i].name);
        else if (rename(l->st->entries[i].name, buf, sizeof buf, user)) l->names[i] = sd_strdup(buf);
    }
    return 0;
}

void loader_close(sd_loader *l) {
    if (l->st) {
        st_close(l->st);
        free(l->st);
    }
    for (int i = 0; i < l->n; i++) free(l->names[i]);
    free(l->names);
    free(l->used);
    memset(l, 0, sizeof *l);
}

static int loader_index(const sd_loader *l, const char *name) {
    for (int i = 0; i < l->n; i++)
        if (l->names[i] && strcmp(l->names[i], name) == 0) return i;
    return -1;
}

int loader_has(const sd_loader *l, const char *name) { return loader_index(l, name) >= 0; }

int loader_shape(const sd_loader *l, const char *name, int64_t shape[8]) {
    int i = loader_index(l, name);
    if (i < 0) return -1;
    const st_entry *e = &l->st->entries[i];
    for (int d = 0; d < e->ndim; d++) shape[d] = e->shape[d];
    return e->ndim;
}

static void shape_str(char *buf, size_t n, int ndim, const int64_t *s) {
    size_t k = 0;
    k += (size_t)snprintf(buf + k, n - k, "[");
    for (int d = 0; d < ndim && k < n; d++) k += (size_t)snprintf(buf + k, n - k, "%s%lld", d ? "," : "", (long long)s[d]);
    if (k < n) snprintf(buf + k, n - k, "]");
}

static int load_param(sd_loader *l, sd_param *out, const char *name, int ndim, const int *shape, int optional) {
    memset(out, 0, sizeof *out);
    int i = loader_index(l, name);
    if (i < 0) {
        if (optional) return 0;
        sd_error("%s: missing tensor '%s'", l->path, name);
        return -1;
    }
    const st_entry *e = &l->st->entries[i];
    int64_t want[8] = { 0 };
    for (int d = 0; d < ndim; d++) want[d] = shape[d];
    int ok = e->ndim == ndim;
    for (int d = 0; ok && d < ndim; d++) ok = e->shape[d] == want[d];
    /* LDM stores some linear layers as 1x1 convolutions: [M,K,1,1] for [M,K] */
    if (!ok && ndim == 2 && e->ndim == 4 && e->shape[0] == want[0] && e->shape[1] == want[1] && e->shape[2] == 1 && e->shape[3] == 1)
        ok = 1;
    if (!ok || (e->dtype != ST_F32 && e->dtype != ST_F16 && e->dtype != ST_BF16 && e->dtype != ST_F64 &&
                e->dtype != ST_F8_E4M3 && e->dtype != ST_F8_E5M2)) {
        char a[128], b[128];
        shape_str(a, sizeof a, e->ndim, e->shape);
        shape_str(b, sizeof b, ndim, want);
        if (!ok) sd_error("%s: tensor '%s' (file key '%s') has shape %s, expected %s", l->path, name, e->name, a, b);
        else sd_error("%s: tensor '%s' has dtype %s, expected a floating-point tensor", l->path, name, st_dtype_name(e->dtype));
        return -1;
    }
    l->used[i] = 1;
    out->ndim = ndim;
    for (int d = 0; d < 4; d++) out->shape[d] = d < ndim ? shape[d] : 1;
    size_t n = 1;
    for (int d = 0; d < ndim; d++) n *= (size_t)shape[d];
    float *f = sd_malloc(n * sizeof(float));
    st_read_f32(l->st, e, f);
    st_release(l->st, e);
    sd_format wf = l->pol.weights;
    switch (wf) {
    case SD_F16: case SD_BF16: {
        uint16_t *h = sd_malloc(n * sizeof(uint16_t));
        for (size_t k = 0; k < n; k++) h[k] = wf == SD_F16 ? sd_f32_to_f16(f[k]) : sd_f32_to_bf16(f[k]);
        free(f);
        out->data = h;
        out->fmt = wf;
        break;
    }
    case SD_E4M3: case SD_E5M2: {
        uint8_t *b8 = sd_malloc(n);
        for (size_t k = 0; k < n; k++) b8[k] = wf == SD_E4M3 ? sd_f32_to_e4m3(f[k]) : sd_f32_to_e5m2(f[k]);
        free(f);
        out->data = b8;
        out->fmt = wf;
        break;
    }
    default:
        sd_round_buffer(f, n, wf);   /* F32: identity; TF32: rounded, kept in float */
        out->data = f;
        out->fmt = SD_F32;
        break;
    }
    return 0;
}

int loader_param(sd_loader *l, sd_param *out, const char *name, int ndim, const int *shape) {
    return load_param(l, out, name, ndim, shape, 0);
}

int loader_param_opt(sd_loader *l, sd_param *out, const char *name, int ndim, const int *shape) {
    return load_param(l, out, name, ndim, shape, 1);
}

/* ======================================================================================
 * Blocks shared by the VAE and the UNet: diffusers' ResnetBlock2D and Attention.
 * ====================================================================================== */

static int load_conv(sd_loader *l, sd_param *w, sd_param *b, const char *prefix, const char *name, int cout, int cin, int k) {
    char buf[320];
    int ws[4] = { cout, cin, k, k }, bs[1] = { cout };
    snprintf(buf, sizeof buf, "%s.%s.weight", prefix, name);
    if (loader_param(l, w, buf, 4, ws)) return -1;
    snprintf(buf, sizeof buf, "%s.%s.bias", prefix, name);
    return loader_param(l, b, buf, 1, bs);
}

int load_linear(sd_loader *l, sd_param *w, sd_param *b, const char *prefix, int out, int in, int bias) {
    char buf[320];
    int ws[2] = { out, in }, bs[1] = { out };
    snprintf(buf, sizeof buf, "%s.weight", prefix);
    if (loader_param(l, w, buf, 2, ws)) return -1;
    memset(b, 0, sizeof *b);
    if (!bias) return 0;
    snprintf(buf, sizeof buf, "%s.bias", prefix);
    return loader_param(l, b, buf, 1, bs);
}

int load_norm(sd_loader *l, sd_param *w, sd_param *b, const char *prefix, int ch) {
    char buf[320];
    int s[1] = { ch };
    snprintf(buf, sizeof buf, "%s.weight", prefix);
    if (loader_param(l, w, buf, 1, s)) return -1;
    snprintf(buf, sizeof buf, "%s.bias", prefix);
    return loader_param(l, b, buf, 1, s);
}

int resnet_load(sd_loader *l, sd_resnet *r, const char *prefix, int cin, int cout, int temb_dim, int groups, float eps) {
    char buf[256];
    memset(r, 0, sizeof *r);
    r->cin = cin; r->cout = cout; r->groups = groups; r->eps = eps; r->temb_dim = temb_dim;
    snprintf(buf, sizeof buf, "%s.norm1", prefix);
    if (load_norm(l, &r->norm1_w, &r->norm1_b, buf, cin)) return -1;
    if (load_conv(l, &r->conv1_w, &r->conv1_b, prefix, "conv1", cout, cin, 3)) return -1;
    if (temb_dim > 0) {
        snprintf(buf, sizeof buf, "%s.time_emb_proj", prefix);
        if (load_linear(l, &r->temb_w, &r->temb_b, buf, cout, temb_dim, 1)) return -1;
    }
    snprintf(buf, sizeof buf, "%s.norm2", prefix);
    if (load_norm(l, &r->norm2_w, &r->norm2_b, buf, cout)) return -1;
    if (load_conv(l, &r->conv2_w, &r->conv2_b, prefix, "conv2", cout, cout, 3)) return -1;
    if (cin != cout && load_conv(l, &r->short_w, &r->short_b, prefix, "conv_shortcut", cout, cin, 1)) return -1;
    return 0;
}

void resnet_free(sd_resnet *r) {
    sd_param *p[] = { &r->norm1_w, &r->norm1_b, &r->conv1_w, &r->conv1_b, &r->temb_w, &r->temb_b,
                      &r->norm2_w, &r->norm2_b, &r->conv2_w, &r->conv2_b, &r->short_w, &r->short_b };
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) param_free(p[i]);
}

/* Trace a tensor under "<name>.<leaf>" (or "<name>" when leaf is NULL). */
void sd_trace_sub(const sd_ctx *c, const char *name, const char *leaf, const sd_tensor *x) {
    if (!c->trace) return;
    char buf[512];
    if (leaf) snprintf(buf, sizeof buf, "%s.%s", name, leaf);
    else snprintf(buf, sizeof buf, "%s", name);
    sd_trace_tensor(c, buf, x);
}

/* Replace *x by y, freeing the old tensor (activations freed as soon as they are read). */
static void replace(sd_tensor *x, sd_tensor y) {
    tensor_free(x);
    *x = y;
}

sd_tensor resnet_forward(const sd_ctx *c, const sd_resnet *r, const sd_tensor *x, const sd_tensor *temb, const char *name) {
    static const int pad1[4] = { 1, 1, 1, 1 }, pad0[4] = { 0, 0, 0, 0 };
    sd_tensor h = op_group_norm(c, x, r->groups, r->eps, &r->norm1_w, &r->norm1_b);
    sd_trace_sub(c, name, "norm1", &h);
    replace(&h, op_silu(c, &h));
    sd_trace_sub(c, name, "nonlinearity", &h);
    replace(&h, op_conv2d(c, &h, &r->conv1_w, &r->conv1_b, 1, pad1));
    sd_trace_sub(c, name, "conv1", &h);
    int act = 2;   /* diffusers' resnets share one SiLU module: its calls are numbered */
    if (temb && r->temb_dim > 0) {
        sd_tensor t = op_silu(c, temb);                      /* time_emb_proj(silu(temb)) */
        sd_trace_sub(c, name, "nonlinearity#2", &t);
        act = 3;
        replace(&t, op_linear(c, &t, &r->temb_w, &r->temb_b));
        sd_trace_sub(c, name, "time_emb_proj", &t);
        replace(&h, op_add_channel(c, &h, &t));              /* conv1(x) + temb[:, :, None, None] */
        tensor_free(&t);
    }
    replace(&h, op_group_norm(c, &h, r->groups, r->eps, &r->norm2_w, &r->norm2_b));
    sd_trace_sub(c, name, "norm2", &h);
    replace(&h, op_silu(c, &h));
    sd_trace_sub(c, name, act == 2 ? "nonlinearity#2" : "nonlinearity#3", &h);
    replace(&h, op_conv2d(c, &h, &r->conv2_w, &r->conv2_b, 1, pad1));
    sd_trace_sub(c, name, "conv2", &h);
    sd_tensor out;
    if (r->short_w.data) {
        sd_tensor s = op_conv2d(c, x, &r->short_w, &r->short_b, 1, pad0);
        sd_trace_sub(c, name, "conv_shortcut", &s);
        out = op_add(c, &s, &h);                             /* (shortcut(x) + h) / 1.0 */
        tensor_free(&s);
    } else {
        out = op_add(c, x, &h);
    }
    tensor_free(&h);
    sd_trace_sub(c, name, NULL, &out);
    return out;
}

int attn_load(sd_loader *l, sd_attn *a, const char *prefix, int qdim, int kvdim, int heads, int head_dim,
              int qkv_bias, int groups, float eps, int residual) {
    char buf[256];
    memset(a, 0, sizeof *a);
    a->qdim = qdim; a->kvdim = kvdim; a->heads = heads; a->inner = heads * head_dim;
    a->groups = groups; a->eps = eps; a->residual = residual;
    if (groups > 0) {
        snprintf(buf, sizeof buf, "%s.group_norm", prefix);
        if (load_norm(l, &a->norm_w, &a->norm_b, buf, qdim)) return -1;
    }
    snprintf(buf, sizeof buf, "%s.to_q", prefix);
    if (load_linear(l, &a->q_w, &a->q_b, buf, a->inner, qdim, qkv_bias)) return -1;
    snprintf(buf, sizeof buf, "%s.to_k", prefix);
    if (load_linear(l, &a->k_w, &a->k_b, buf, a->inner, kvdim, qkv_bias)) return -1;
    snprintf(buf, sizeof buf, "%s.to_v", prefix);
    if (load_linear(l, &a->v_w, &a->v_b, buf, a->inner, kvdim, qkv_bias)) return -1;
    snprintf(buf, sizeof buf, "%s.to_out.0", prefix);
    return load_linear(l, &a->out_w, &a->out_b, buf, qdim, a->inner, 1);
}

void attn_free(sd_attn *a) {
    sd_param *p[] = { &a->norm_w, &a->norm_b, &a->q_w, &a->q_b, &a->k_w, &a->k_b, &a->v_w, &a->v_b, &a->out_w, &a->out_b };
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) param_free(p[i]);
}

sd_tensor attn_forward(const sd_ctx *c, const sd_attn *a, const sd_tensor *x, const sd_tensor *context,
                       const sd_attn_ip *ip, const char *name) {
    int spatial = x->ndim == 4, H = x->shape[2], W = x->shape[3];
    sd_tensor h;
    if (a->groups > 0) {                                     /* VAE: group norm on the image */
        sd_tensor n = op_group_norm(c, x, a->groups, a->eps, &a->norm_w, &a->norm_b);
        sd_trace_sub(c, name, "group_norm", &n);
        h = spatial ? op_nchw_to_tokens(&n) : tensor_copy(&n);
        tensor_free(&n);
    } else {
        h = spatial ? op_nchw_to_tokens(x) : tensor_copy(x);
    }
    const sd_tensor *ctx = context ? context : &h;
    sd_tensor q = op_linear(c, &h, &a->q_w, &a->q_b);
    sd_trace_sub(c, name, "to_q", &q);
    sd_tensor k = op_linear(c, ctx, &a->k_w, &a->k_b);
    sd_trace_sub(c, name, "to_k", &k);
    sd_tensor v = op_linear(c, ctx, &a->v_w, &a->v_b);
    sd_trace_sub(c, name, "to_v", &v);
    tensor_free(&h);
    float scale = 1.0f / sqrtf((float)(a->inner / a->heads));
    sd_tensor o = op_attention(c, &q, &k, &v, a->heads, scale, 0);
    tensor_free(&k);
    tensor_free(&v);
    if (ip && ip->tokens) {                                  /* IP-Adapter: + scale * attn(q, k_ip, v_ip) */
        sd_tensor ki = op_linear(c, ip->tokens, ip->k_w, NULL);
        sd_trace_sub(c, name, "processor.to_k_ip", &ki);
        sd_tensor vi = op_linear(c, ip->tokens, ip->v_w, NULL);
        sd_trace_sub(c, name, "processor.to_v_ip", &vi);
        sd_tensor oi = op_attention(c, &q, &ki, &vi, a->heads, scale, 0);
        tensor_free(&ki);
        tensor_free(&vi);
        replace(&oi, op_scale(c, &oi, ip->scale));
        replace(&o, op_add(c, &o, &oi));
        tensor_free(&oi);
    }
    tensor_free(&q);
    replace(&o, op_linear(c, &o, &a->out_w, &a->out_b));
    sd_trace_sub(c, name, "to_out.0", &o);
    if (spatial) replace(&o, op_tokens_to_nchw(&o, H, W));
    if (a->residual) replace(&o, op_add(c, &o, x));
    sd_trace_sub(c, name, NULL, &o);
    return o;
}
