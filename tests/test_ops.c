/* tests/test_ops.c — every operation of ref.c against a plain double-precision reference on
 * random shapes and inputs:
 *   fp32 policy: within the classical float32 error bound of each sum;
 *   fp16 policy: equal to the double reference rounded once to fp16, except where the float32
 *                arithmetic inside the op can decide a rounding (the exact value lies within the
 *                float32 error bound of an fp16 rounding boundary): there at most 1 fp16 ulp;
 *   threads:     1 and 2 threads give the same bits. */
#include "test.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- helpers ----------------------------------------------------------------------- */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static double urand(void) {                      /* xorshift64*: uniform in [0, 1) */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (double)((rng_state * 0x2545F4914F6CDD1Dull) >> 11) * (1.0 / 9007199254740992.0);
}
static float nrand(float scale) { return (float)((urand() * 2.0 - 1.0) * scale); }
static int irand(int lo, int hi) { return lo + (int)(urand() * (hi - lo + 1)); }

static sd_ctx make_ctx(const char *preset) {
    sd_precision p;
    sd_ctx c;
    memset(&c, 0, sizeof c);
    if (sd_precision_parse(preset, &p) != 0) sd_fatal("bad preset %s", preset);
    c.pol = p.model[SD_UNET];
    return c;
}

static sd_tensor rand_tensor(const sd_ctx *c, int ndim, int d0, int d1, int d2, int d3, float scale) {
    sd_tensor t = tensor_new(ndim, d0, d1, d2, d3);
    for (size_t i = 0; i < tensor_numel(&t); i++) t.data[i] = nrand(scale);
    op_round_storage(c, &t);
    return t;
}

/* A parameter in the policy's weight format, with its float values in *vals (caller frees). */
static sd_param rand_param(const sd_ctx *c, int ndim, const int *shape, float scale, float **vals) {
    sd_param p;
    memset(&p, 0, sizeof p);
    p.ndim = ndim;
    for (int i = 0; i < 4; i++) p.shape[i] = i < ndim ? shape[i] : 1;
    size_t n = param_numel(&p);
    float *v = sd_malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) v[i] = sd_round(nrand(scale), c->pol.weights);
    if (c->pol.weights == SD_F16) {
        uint16_t *h = sd_malloc(n * 2);
        for (size_t i = 0; i < n; i++) h[i] = sd_f32_to_f16(v[i]);
        p.data = h;
        p.fmt = SD_F16;
    } else {
        float *f = sd_malloc(n * sizeof(float));
        memcpy(f, v, n * sizeof(float));
        p.data = f;
        p.fmt = SD_F32;
    }
    *vals = v;
    return p;
}

/* fp16 ulp of the value v (spacing of fp16 numbers at |v|). */
static double f16_ulp(double v) {
    double a = fabs(v);
    if (a < 6.103515625e-05) return 5.960464477539063e-08;
    int e;
    frexp(a, &e);                                  /* a = m * 2^e, m in [0.5, 1) */
    return ldexp(1.0, e - 11);
}

/* Distance in fp16 ulps between two fp16 values. */
static double f16_ulps_apart(float a, float b) { return fabs((double)a - (double)b) / f16_ulp(fmin(fabs(a), fabs(b))); }

/* Distance from v to the nearest fp16 rounding boundary (midpoint between fp16 neighbours). */
static double dist_to_f16_midpoint(double v) {
    double u = f16_ulp(v);
    double r = fabs(v) / u;                        /* in ulps; midpoints at k + 0.5 */
    double frac = r - floor(r);
    return fabs(frac - 0.5) * u;
}

typedef struct op_check { const char *what; double max_err_rel; int worst_ok; size_t n, exact, near_boundary; double max_ulps; size_t float_err; } op_check;

/* Compare one output element: got (from sdref) against ref (double), with err_bound an upper
 * bound on the float32 arithmetic error of the op at this element.
 *   fp32:  |got - ref| <= err_bound.
 *   fp16:  got == ref rounded once to fp16 ("exact"); or, where the float32 arithmetic can decide
 *          the rounding (ref within err_bound of an fp16 rounding boundary), 1 ulp away; or, where
 *          the float32 error itself exceeds an fp16 ulp (cancellation, e.g. 1 + erf(x) for
 *          x << 0 as PyTorch computes GELU), within err_bound plus the one rounding. */
static void check_elem(op_check *k, const sd_ctx *c, float got, double ref, double err_bound) {
    k->n++;
    if (c->pol.storage == SD_F32) {
        double e = fabs((double)got - ref);
        if (e <= err_bound + 1e-300) { k->exact++; return; }
        if (k->worst_ok) {
            CHECK(0, "%s fp32: got %.9g, reference %.17g, error %.3g > bound %.3g", k->what, got, ref, e, err_bound);
            k->worst_ok = 0;
        }
        return;
    }
    float want = sd_round((float)ref, SD_F16);
    /* ref -> float -> fp16 can double-round only within float32 ulps of a midpoint: count those as near */
    double near = err_bound + fabs(ref) * 1.2e-7;
    if (got == want || (got != got && want != want)) { k->exact++; return; }
    double ulps = f16_ulps_apart(got, want);
    if (ulps > k->max_ulps) k->max_ulps = ulps;
    if (dist_to_f16_midpoint(ref) <= near && ulps <= 1.0) { k->near_boundary++; return; }
    if (fabs((double)got - ref) <= err_bound + f16_ulp(ref) && err_bound > 0.5 * f16_ulp(ref)) { k->float_err++; return; }
    if (k->worst_ok) {
        CHECK(0, "%s fp16: got %.9g, want %.9g (reference %.17g, %.1f ulps, %.3g from a rounding boundary, bound %.3g)",
              k->what, got, want, ref, ulps, dist_to_f16_midpoint(ref), near);
        k->worst_ok = 0;
    }
}

static void report(op_check *k) {
    CHECK(k->worst_ok, "%s: mismatches (see above)", k->what);
    if (k->worst_ok) CHECK(k->exact + k->near_boundary + k->float_err == k->n, "%s: counting error", k->what);
    fprintf(stderr, "  %-24s %7zu values: %7zu exact, %4zu 1 ulp at a rounding boundary, %4zu float32 error > 1/2 ulp (max %.0f ulps)\n",
            k->what, k->n, k->exact, k->near_boundary, k->float_err, k->max_ulps);
}

static const double EPS32 = 5.9604644775390625e-08;   /* 2^-24: unit roundoff of float32 */

/* Same bits with 1 and 2 threads. */
#define SAME_BITS(expr_out, what) do { \
    sd_set_threads(1); sd_tensor o1 = (expr_out); \
    sd_set_threads(2); sd_tensor o2 = (expr_out); \
    CHECK(tensor_numel(&o1) == tensor_numel(&o2) && memcmp(o1.data, o2.data, tensor_numel(&o1) * 4) == 0, \
          "%s: 1 and 2 threads differ", what); \
    tensor_free(&o1); tensor_free(&o2); \
} while (0)

/* ---- conv2d -------------------------------------------------------------------------- */

static void test_conv(const char *preset) {
    sd_ctx c = make_ctx(preset);
    op_check k = { "conv2d", 0, 1, 0, 0, 0, 0, 0 };
    char what[64];
    snprintf(what, sizeof what, "conv2d [%s]", preset);
    k.what = what;
    for (int trial = 0; trial < 12; trial++) {
        int N = irand(1, 2), Cin = irand(1, 9), Cout = irand(1, 11), H = irand(1, 13), W = irand(1, 13);
        int ks = trial % 3 == 0 ? 1 : 3, stride = irand(1, 2);
        int pad[4] = { irand(0, 1), irand(0, 1), irand(0, 1), irand(0, 1) };
        if (H + pad[0] + pad[1] < ks || W + pad[2] + pad[3] < ks) continue;
        sd_tensor x = rand_tensor(&c, 4, N, Cin, H, W, 2.0f);
        int ws[4] = { Cout, Cin, ks, ks }, bs[1] = { Cout };
        float *wv, *bv;
        sd_param w = rand_param(&c, 4, ws, 0.5f, &wv), b = rand_param(&c, 1, bs, 0.5f, &bv);
        sd_tensor y = op_conv2d(&c, &x, &w, trial % 4 == 1 ? NULL : &b, stride, pad);
        int OH = (H + pad[0] + pad[1] - ks) / stride + 1, OW = (W + pad[2] + pad[3] - ks) / stride + 1;
        CHECK(y.shape[0] == N && y.shape[1] == Cout && y.shape[2] == OH && y.shape[3] == OW, "conv2d output shape");
        for (int n = 0; n < N; n++)
            for (int co = 0; co < Cout; co++)
                for (int oy = 0; oy < OH; oy++)
                    for (int ox = 0; ox < OW; ox++) {
                        double s = 0, sa = 0;
                        int terms = 0;
                        for (int ci = 0; ci < Cin; ci++)
                            for (int ky = 0; ky < ks; ky++)
                                for (int kx = 0; kx < ks; kx++) {
                                    int iy = oy * stride - pad[0] + ky, ix = ox * stride - pad[2] + kx;
                                    if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
                                    double t = (double)x.data[(((size_t)n * Cin + ci) * H + iy) * W + ix] *
                                               wv[((co * Cin + ci) * ks + ky) * ks + kx];
                                    s += t;
                                    sa += fabs(t);
                                    terms++;
                                }
                        double bias = trial % 4 == 1 ? 0 : bv[co];
                        s += bias;
                        sa += fabs(bias);
                        double bound = (Cin * ks * ks + 2) * EPS32 * sa * 1.01;
                        check_elem(&k, &c, y.data[(((size_t)n * Cout + co) * OH + oy) * OW + ox], s, bound);
                    }
        SAME_BITS(op_conv2d(&c, &x, &w, &b, stride, pad), "conv2d");
        tensor_free(&x);
        tensor_free(&y);
        param_free(&w);
        param_free(&b);
        free(wv);
        free(bv);
    }
    /* a conv wide enough to span several column blocks and threads */
    {
        sd_tensor x = rand_tensor(&c, 4, 1, 3, 40, 37, 1.0f);
        int ws[4] = { 5, 3, 3, 3 }, bs[1] = { 5 }, pad[4] = { 1, 1, 1, 1 };
        float *wv, *bv;
        sd_param w = rand_param(&c, 4, ws, 0.5f, &wv), b = rand_param(&c, 1, bs, 0.5f, &bv);
        SAME_BITS(op_conv2d(&c, &x, &w, &b, 1, pad), "conv2d (multi-block)");
        tensor_free(&x);
        param_free(&w);
        param_free(&b);
        free(wv);
        free(bv);
    }
    report(&k);
}

/* ---- linear -------------------------------------------------------------------------- */

static void test_linear(const char *preset) {
    sd_ctx c = make_ctx(preset);
    char what[64];
    snprintf(what, sizeof what, "linear [%s]", preset);
    op_check k = { what, 0, 1, 0, 0, 0, 0, 0 };
    for (int trial = 0; trial < 10; trial++) {
        int B = irand(1, 2), T = irand(1, 40), K = irand(1, 70), M = irand(1, 90);
        sd_tensor x = rand_tensor(&c, 3, B, T, K, 1, 2.0f);
        int ws[2] = { M, K }, bs[1] = { M };
        float *wv, *bv;
        sd_param w = rand_param(&c, 2, ws, 0.5f, &wv), b = rand_param(&c, 1, bs, 0.5f, &bv);
        int use_bias = trial % 3 != 0;
        sd_tensor y = op_linear(&c, &x, &w, use_bias ? &b : NULL);
        CHECK(y.ndim == 3 && y.shape[0] == B && y.shape[1] == T && y.shape[2] == M, "linear output shape");
        for (int r = 0; r < B * T; r++)
            for (int m = 0; m < M; m++) {
                double s = 0, sa = 0;
                for (int kk = 0; kk < K; kk++) {
                    double t = (double)x.data[(size_t)r * K + kk] * wv[(size_t)m * K + kk];
                    s += t;
                    sa += fabs(t);
                }
                if (use_bias) { s += bv[m]; sa += fabs(bv[m]); }
                check_elem(&k, &c, y.data[(size_t)r * M + m], s, (K + 2) * EPS32 * sa * 1.01);
            }
        SAME_BITS(op_linear(&c, &x, &w, &b), "linear");
        tensor_free(&x);
        tensor_free(&y);
        param_free(&w);
        param_free(&b);
        free(wv);
        free(bv);
    }
    report(&k);
}

/* ---- norms --------------------------------------------------------------------------- */

static void test_norms(const char *preset) {
    sd_ctx c = make_ctx(preset);
    char w1[64], w2[64];
    snprintf(w1, sizeof w1, "group_norm [%s]", preset);
    snprintf(w2, sizeof w2, "layer_norm [%s]", preset);
    op_check kg = { w1, 0, 1, 0, 0, 0, 0, 0 }, kl = { w2, 0, 1, 0, 0, 0, 0, 0 };
    for (int trial = 0; trial < 8; trial++) {
        int groups = irand(1, 4), cpg = irand(1, 4), N = irand(1, 2), H = irand(1, 9), W = irand(1, 9);
        int C = groups * cpg;
        sd_tensor x = rand_tensor(&c, 4, N, C, H, W, 3.0f);
        for (size_t i = 0; i < tensor_numel(&x); i++) x.data[i] = sd_round(x.data[i] + 1.5f, c.pol.storage);  /* non-zero mean */
        int cs[1] = { C };
        float *gv, *bv;
        sd_param g = rand_param(&c, 1, cs, 2.0f, &gv), b = rand_param(&c, 1, cs, 1.0f, &bv);
        float eps = trial % 2 ? 1e-6f : 1e-5f;
        sd_tensor y = op_group_norm(&c, &x, groups, eps, &g, &b);
        size_t HW = (size_t)H * W;
        for (int n = 0; n < N; n++)
            for (int gr = 0; gr < groups; gr++) {
                double s = 0, v = 0;
                size_t base = ((size_t)n * C + (size_t)gr * cpg) * HW, cnt = (size_t)cpg * HW;
                for (size_t i = 0; i < cnt; i++) s += x.data[base + i];
                double m = s / cnt;
                for (size_t i = 0; i < cnt; i++) v += (x.data[base + i] - m) * (x.data[base + i] - m);
                double rstd = 1.0 / sqrt(v / cnt + eps);
                for (size_t i = 0; i < cnt; i++) {
                    int ch = gr * cpg + (int)(i / HW);
                    double ref = (x.data[base + i] - m) * rstd * gv[ch] + bv[ch];
                    double bound = 8 * EPS32 * (fabs((x.data[base + i] - m) * rstd * gv[ch]) + fabs(bv[ch]));
                    check_elem(&kg, &c, y.data[base + i], ref, bound);
                }
            }
        SAME_BITS(op_group_norm(&c, &x, groups, eps, &g, &b), "group_norm");
        tensor_free(&x);
        tensor_free(&y);
        param_free(&g);
        param_free(&b);
        free(gv);
        free(bv);

        int D = irand(1, 50), R = irand(1, 20);
        sd_tensor t = rand_tensor(&c, 3, 1, R, D, 1, 2.0f);
        int ds[1] = { D };
        g = rand_param(&c, 1, ds, 2.0f, &gv);
        b = rand_param(&c, 1, ds, 1.0f, &bv);
        y = op_layer_norm(&c, &t, 1e-5f, &g, &b);
        for (int r = 0; r < R; r++) {
            double s = 0, v = 0;
            for (int i = 0; i < D; i++) s += t.data[(size_t)r * D + i];
            double m = s / D;
            for (int i = 0; i < D; i++) v += (t.data[(size_t)r * D + i] - m) * (t.data[(size_t)r * D + i] - m);
            double rstd = 1.0 / sqrt(v / D + 1e-5);
            for (int i = 0; i < D; i++) {
                double ref = (t.data[(size_t)r * D + i] - m) * rstd * gv[i] + bv[i];
                check_elem(&kl, &c, y.data[(size_t)r * D + i], ref,
                           8 * EPS32 * (fabs((t.data[(size_t)r * D + i] - m) * rstd * gv[i]) + fabs(bv[i])));
            }
        }
        SAME_BITS(op_layer_norm(&c, &t, 1e-5f, &g, &b), "layer_norm");
        tensor_free(&t);
        tensor_free(&y);
        param_free(&g);
        param_free(&b);
        free(gv);
        free(bv);
    }
    report(&kg);
    report(&kl);
}

/* ---- elementwise --------------------------------------------------------------------- */

static void test_elementwise(const char *preset) {
    sd_ctx c = make_ctx(preset);
    const char *names[] = { "silu", "gelu", "gelu_tanh", "quick_gelu", "add", "mul", "scale", "add_channel" };
    for (int op = 0; op < 8; op++) {
        char what[64];
        snprintf(what, sizeof what, "%s [%s]", names[op], preset);
        op_check k = { what, 0, 1, 0, 0, 0, 0, 0 };
        sd_tensor a = rand_tensor(&c, 4, 2, 3, 17, 13, 6.0f), b = rand_tensor(&c, 4, 2, 3, 17, 13, 6.0f);
        sd_tensor bc = rand_tensor(&c, 2, 2, 3, 1, 1, 3.0f);
        sd_tensor y;
        switch (op) {
        case 0: y = op_silu(&c, &a); break;
        case 1: y = op_gelu(&c, &a); break;
        case 2: y = op_gelu_tanh(&c, &a); break;
        case 3: y = op_quick_gelu(&c, &a); break;
        case 4: y = op_add(&c, &a, &b); break;
        case 5: y = op_mul(&c, &a, &b); break;
        case 6: y = op_scale(&c, &a, 0.7071f); break;
        default: y = op_add_channel(&c, &a, &bc); break;
        }
        for (size_t i = 0; i < tensor_numel(&a); i++) {
            double x = a.data[i], ref, bound;
            switch (op) {
            case 0: ref = x / (1 + exp(-x)); bound = 8 * EPS32 * fabs(ref) + 1e-30; break;
            /* GELU is evaluated in double (erfc for x < 0): one float rounding of the exact value */
            case 1: ref = x < 0 ? 0.5 * x * erfc(-x / sqrt(2.0)) : 0.5 * x * (1 + erf(x / sqrt(2.0)));
                    bound = 2 * EPS32 * fabs(ref) + 1e-45; break;
            case 2: ref = x / (1 + exp(-2 * 0.7978845608028654 * (x + 0.044715 * x * x * x)));
                    bound = 2 * EPS32 * fabs(ref) + 1e-45; break;
            case 3: ref = x / (1 + exp(-1.702 * x)); bound = 8 * EPS32 * fabs(x) + 1e-30; break;
            case 4: ref = x + b.data[i]; bound = EPS32 * fabs(ref); break;
            case 5: ref = x * b.data[i]; bound = EPS32 * fabs(ref); break;
            case 6: ref = x * (double)0.7071f; bound = EPS32 * fabs(ref); break;
            default: ref = x + bc.data[i / (17 * 13)]; bound = EPS32 * fabs(ref); break;
            }
            check_elem(&k, &c, y.data[i], ref, bound);
        }
        tensor_free(&y);
        if (op == 0) SAME_BITS(op_silu(&c, &a), "silu");
        if (op == 4) SAME_BITS(op_add(&c, &a, &b), "add");
        tensor_free(&a);
        tensor_free(&b);
        tensor_free(&bc);
        report(&k);
    }
}

/* ---- attention ----------------------------------------------------------------------- */

static void test_attention(const char *preset) {
    sd_ctx c = make_ctx(preset);
    char what[64];
    snprintf(what, sizeof what, "attention [%s]", preset);
    op_check k = { what, 0, 1, 0, 0, 0, 0, 0 };
    for (int trial = 0; trial < 8; trial++) {
        int B = irand(1, 2), H = irand(1, 4), D = irand(1, 9), Tq = irand(1, 70), Tk = irand(1, 40);
        int causal = trial % 3 == 2;
        if (causal) Tk = Tq;
        sd_tensor q = rand_tensor(&c, 3, B, Tq, H * D, 1, 2.0f), kk = rand_tensor(&c, 3, B, Tk, H * D, 1, 2.0f),
                  v = rand_tensor(&c, 3, B, Tk, H * D, 1, 2.0f);
        float scale = (float)(1.0 / sqrt((double)D));
        sd_tensor o = op_attention(&c, &q, &kk, &v, H, scale, causal);
        double *p = sd_malloc((size_t)Tk * sizeof(double));
        for (int b = 0; b < B; b++)
            for (int h = 0; h < H; h++)
                for (int i = 0; i < Tq; i++) {
                    int valid = causal ? i + 1 : Tk;
                    double mx = -1e300, sum = 0, sdot = 0;
                    for (int t = 0; t < valid; t++) {
                        double s = 0;
                        for (int d = 0; d < D; d++)
                            s += (double)q.data[((size_t)b * Tq + i) * H * D + h * D + d] * kk.data[((size_t)b * Tk + t) * H * D + h * D + d];
                        p[t] = s * scale;
                        sdot += fabs(s);
                        if (p[t] > mx) mx = p[t];
                    }
                    for (int t = 0; t < valid; t++) { p[t] = exp(p[t] - mx); sum += p[t]; }
                    for (int d = 0; d < D; d++) {
                        double r = 0, ra = 0;
                        for (int t = 0; t < valid; t++) {
                            double vv = v.data[((size_t)b * Tk + t) * H * D + h * D + d];
                            r += p[t] / sum * vv;
                            ra += p[t] / sum * fabs(vv);
                        }
                        /* float32 error: scores (D terms, scaled), exp and softmax sum, then the
                         * weighted sum; the score error moves probabilities by ~|s| relatively */
                        double bound = ((D + 4) * EPS32 * sdot / (valid ? 1 : 1) * scale + (valid + 8) * EPS32) * ra * 4 + 1e-30;
                        check_elem(&k, &c, o.data[((size_t)b * Tq + i) * H * D + h * D + d], r, bound);
                    }
                }
        free(p);
        SAME_BITS(op_attention(&c, &q, &kk, &v, H, scale, causal), "attention");
        tensor_free(&q);
        tensor_free(&kk);
        tensor_free(&v);
        tensor_free(&o);
    }
    report(&k);
}

/* ---- value-preserving operations ----------------------------------------------------- */

static void test_layout(void) {
    sd_ctx c = make_ctx("fp32");
    sd_tensor x = rand_tensor(&c, 4, 2, 3, 4, 5, 1.0f), y = rand_tensor(&c, 4, 2, 2, 4, 5, 1.0f);
    sd_tensor u = op_upsample_nearest2x(&c, &x);
    int ok = u.shape[2] == 8 && u.shape[3] == 10;
    for (int n = 0; n < 2; n++)
        for (int ch = 0; ch < 3; ch++)
            for (int i = 0; i < 8; i++)
                for (int j = 0; j < 10; j++)
                    ok &= u.data[((n * 3 + ch) * 8 + i) * 10 + j] == x.data[((n * 3 + ch) * 4 + i / 2) * 5 + j / 2];
    CHECK(ok, "upsample_nearest2x copies each pixel to a 2x2 block");
    sd_tensor cat = op_concat_channels(&x, &y);
    ok = cat.shape[1] == 5;
    for (int n = 0; n < 2; n++)
        for (int ch = 0; ch < 5; ch++)
            for (int p = 0; p < 20; p++)
                ok &= cat.data[(n * 5 + ch) * 20 + p] == (ch < 3 ? x.data[(n * 3 + ch) * 20 + p] : y.data[(n * 2 + ch - 3) * 20 + p]);
    CHECK(ok, "concat_channels puts a's channels first");
    sd_tensor t = op_nchw_to_tokens(&x), back = op_tokens_to_nchw(&t, 4, 5);
    CHECK(t.shape[1] == 20 && t.shape[2] == 3 && t.data[(1 * 20 + 7) * 3 + 2] == x.data[(1 * 3 + 2) * 20 + 7], "nchw_to_tokens layout");
    CHECK(memcmp(back.data, x.data, tensor_numel(&x) * 4) == 0, "tokens_to_nchw inverts nchw_to_tokens");
    sd_tensor s = tensor_new(2, 3, 7, 1, 1);
    for (int i = 0; i < 21; i++) s.data[i] = nrand(5);
    sd_tensor sm = op_softmax(&c, &s);
    for (int r = 0; r < 3; r++) {
        double sum = 0;
        for (int i = 0; i < 7; i++) sum += sm.data[r * 7 + i];
        CHECK(fabs(sum - 1) < 1e-6, "softmax rows sum to 1 (%.9g)", sum);
    }
    tensor_free(&x); tensor_free(&y); tensor_free(&u); tensor_free(&cat); tensor_free(&t); tensor_free(&back);
    tensor_free(&s); tensor_free(&sm);
}

/* fp16 accumulation: every add rounded. Checked against an independent loop over sd_f16_fma. */
static void test_acc16(void) {
    sd_ctx c = make_ctx("fp16-acc16");
    sd_tensor x = rand_tensor(&c, 3, 1, 5, 37, 1, 2.0f);
    int ws[2] = { 6, 37 }, bs[1] = { 6 };
    float *wv, *bv;
    sd_param w = rand_param(&c, 2, ws, 0.5f, &wv), b = rand_param(&c, 1, bs, 0.5f, &bv);
    sd_tensor y = op_linear(&c, &x, &w, &b);
    int ok = 1;
    for (int r = 0; r < 5; r++)
        for (int m = 0; m < 6; m++) {
            float s = 0;
            for (int k = 0; k < 37; k++) s = sd_f16_fma(x.data[r * 37 + k], wv[m * 37 + k], s);
            s = sd_f16_add(s, bv[m]);
            ok &= y.data[r * 6 + m] == s;
        }
    CHECK(ok, "fp16-acc16 linear = sequential fp16 fused multiply-adds, then the bias");
    tensor_free(&x); tensor_free(&y); param_free(&w); param_free(&b); free(wv); free(bv);
}

void test_ops(void) {
    const char *presets[] = { "fp32", "fp16" };
    for (int p = 0; p < 2; p++) {
        test_conv(presets[p]);
        test_linear(presets[p]);
        test_norms(presets[p]);
        test_elementwise(presets[p]);
        test_attention(presets[p]);
    }
    test_layout();
    test_acc16();
    sd_set_threads(0);
}

/* ---- checksum of every operation on fixed inputs under every preset -------------------
 * `tests/run --checksum` prints one hash; CI builds with gcc and clang, -O0 and -O2, with and
 * without OpenMP, and requires the same line from all of them. */

static uint64_t fnv(uint64_t h, const sd_tensor *t) {
    for (size_t i = 0; i < tensor_numel(t); i++) {
        uint32_t u = sd_f32_bits(t->data[i]);
        for (int b = 0; b < 4; b++) h = (h ^ ((u >> (8 * b)) & 0xff)) * 0x100000001b3ull;
    }
    return h;
}

uint64_t ops_checksum(void) {
    const char *presets[] = { "fp32", "fp16", "bf16", "tf32", "fp16-acc16", "fp8" };
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t p = 0; p < sizeof presets / sizeof presets[0]; p++) {
        rng_state = 0x9E3779B97F4A7C15ull + p;
        sd_ctx c = make_ctx(presets[p]);
        sd_tensor x = rand_tensor(&c, 4, 2, 6, 19, 23, 2.0f);
        int ws[4] = { 8, 6, 3, 3 }, bs[1] = { 8 }, pad[4] = { 1, 1, 0, 1 }, cs[1] = { 6 }, ls[2] = { 12, 23 };
        float *v1, *v2, *v3, *v4, *v5, *v6;
        sd_param w = rand_param(&c, 4, ws, 0.5f, &v1), b = rand_param(&c, 1, bs, 0.5f, &v2);
        sd_param g = rand_param(&c, 1, cs, 1.0f, &v3), be = rand_param(&c, 1, cs, 1.0f, &v4);
        sd_param lw = rand_param(&c, 2, ls, 0.5f, &v5), lb = rand_param(&c, 1, ls, 0.5f, &v6);
        sd_tensor outs[12];
        outs[0] = op_conv2d(&c, &x, &w, &b, 2, pad);
        outs[1] = op_group_norm(&c, &x, 3, 1e-5f, &g, &be);
        outs[2] = op_silu(&c, &x);
        outs[3] = op_gelu(&c, &x);
        outs[4] = op_quick_gelu(&c, &x);
        outs[5] = op_linear(&c, &x, &lw, &lb);
        outs[6] = op_layer_norm(&c, &x, 1e-5f, NULL, NULL);
        sd_tensor t = op_nchw_to_tokens(&x);
        outs[7] = op_attention(&c, &t, &t, &t, 2, 0.5f, 0);
        outs[8] = op_attention(&c, &t, &t, &t, 3, 0.3f, 1);
        outs[9] = op_upsample_nearest2x(&c, &x);
        outs[10] = op_add(&c, &x, &outs[2]);
        outs[11] = op_gelu_tanh(&c, &x);
        for (int i = 0; i < 12; i++) {
            h = fnv(h, &outs[i]);
            tensor_free(&outs[i]);
        }
        tensor_free(&t);
        tensor_free(&x);
        param_free(&w); param_free(&b); param_free(&g); param_free(&be); param_free(&lw); param_free(&lb);
        free(v1); free(v2); free(v3); free(v4); free(v5); free(v6);
    }
    /* the math functions over a fixed spread of arguments */
    sd_tensor m = tensor_new(1, 6 * 4096, 1, 1, 1);
    for (int i = 0; i < 4096; i++) {
        float a = (float)(i - 2048) / 97.0f;
        m.data[i] = sd_expf(a);
        m.data[4096 + i] = sd_logf(fabsf(a) + 1e-3f);
        m.data[2 * 4096 + i] = sd_erff(a);
        m.data[3 * 4096 + i] = sd_tanhf(a);
        m.data[4 * 4096 + i] = sd_sinf(a * 1000.0f);
        m.data[5 * 4096 + i] = sd_cosf(a * 1000.0f);
    }
    h = fnv(h, &m);
    tensor_free(&m);
    return h;
}
