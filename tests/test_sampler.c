/* tests/test_sampler.c — the RNGs against torch's own output, the schedule and the samplers
 * against formulas written out here in double precision, and the DDIM + CFG chain of the
 * golden txt2img run (from its recorded UNet outputs, no UNet needed). */
#include "test.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Distance in ulps between two floats (same sign assumed close to each other). */
static long ulp_diff(float a, float b) {
    int64_t ia = sd_f32_bits(a), ib = sd_f32_bits(b);
    if (ia & 0x80000000) ia = 0x80000000LL - ia;
    if (ib & 0x80000000) ib = 0x80000000LL - ib;
    return (long)(ia > ib ? ia - ib : ib - ia);
}

/* Largest |a-b| / max|b|. */
static double rel_err(const float *a, const double *b, size_t n) {
    double emax = 0, bmax = 0;
    for (size_t k = 0; k < n; k++) {
        double e = fabs((double)a[k] - b[k]);
        if (e > emax) emax = e;
        if (fabs(b[k]) > bmax) bmax = fabs(b[k]);
    }
    return bmax > 0 ? emax / bmax : emax;
}

/* ---- RNG ------------------------------------------------------------------------------ */

/* Compare sd_randn with every file of one list in golden/rng/index.json; returns ulps max. */
static void check_rng_list(const sd_json *list, sd_rng_kind kind, long *max_ulps, size_t *exact, size_t *total) {
    for (int e = 0; e < list->n; e++) {
        const sd_json *it = &list->items[e];
        const char *file = json_str(it, "file", "");
        double seed = json_num(it, "seed", -1);
        char rel[256];
        snprintf(rel, sizeof rel, "golden/rng/%s", file);
        sd_npy g;
        if (npy_read(shared_path(rel), &g) != 0 || g.dtype != NPY_F32) {
            CHECK(0, "cannot read %s: %s", rel, sd_last_error());
            continue;
        }
        float *got = sd_malloc(g.n * sizeof(float));
        sd_rng r;
        sd_rng_init(&r, kind, (uint64_t)seed);
        if (kind == SD_RNG_CUDA) r.offset = (uint32_t)json_int(it, "offset", 0);
        sd_rng_randn(&r, got, g.n);
        const float *want = g.data;
        size_t same = 0;
        long worst = 0;
        for (size_t k = 0; k < g.n; k++) {
            if (sd_f32_bits(got[k]) == sd_f32_bits(want[k])) same++;
            long u = ulp_diff(got[k], want[k]);
            if (u > worst) worst = u;
        }
        if (kind == SD_RNG_CPU)
            CHECK(same == g.n, "%s: %zu of %zu bit-exact (max %ld ulps)", file, same, g.n, worst);
        if (worst > *max_ulps) *max_ulps = worst;
        *exact += same;
        *total += g.n;
        free(got);
        npy_free(&g);
    }
}

static void test_rng_golden(void) {
    sd_json idx;
    if (json_parse_file(shared_path("golden/rng/index.json"), &idx) != 0) { CHECK(0, "index.json: %s", sd_last_error()); return; }
    long ulps = 0;
    size_t exact = 0, total = 0;
    const sd_json *cpu = json_get(&idx, "cpu"), *philox = json_get(&idx, "philox");
    CHECK(cpu && cpu->type == JSON_ARRAY && cpu->n >= 40, "index.json: cpu list");
    CHECK(philox && philox->type == JSON_ARRAY && philox->n >= 40, "index.json: philox list");
    if (cpu) check_rng_list(cpu, SD_RNG_CPU, &ulps, &exact, &total);
    CHECK(exact == total && total > 80000, "torch CPU randn: %zu of %zu bit-exact", exact, total);
    if (env_flag("SDREF_VERBOSE")) fprintf(stderr, "rng cpu: %zu/%zu bit-exact\n", exact, total);
    ulps = 0; exact = total = 0;
    if (philox) check_rng_list(philox, SD_RNG_CUDA, &ulps, &exact, &total);
    /* The oracle's float32 log/sin are not ours; measured: 80% bit-exact, max 4 ulps. */
    CHECK(total > 80000 && ulps <= 4 && exact * 10 >= total * 7,
          "philox randn: %zu of %zu bit-exact, max %ld ulps (bound 4)", exact, total, ulps);
    if (env_flag("SDREF_VERBOSE")) fprintf(stderr, "rng philox: %zu/%zu bit-exact, max %ld ulps\n", exact, total, ulps);
    json_free(&idx);

    /* Two consecutive draws from one CPU generator (seed 7, 256 values each). */
    sd_rng r;
    sd_rng_init(&r, SD_RNG_CPU, 7);
    for (int d = 1; d <= 2; d++) {
        char rel[128];
        snprintf(rel, sizeof rel, "golden/rng/torch_cpu_seed7_two_draws_%d.npy", d);
        sd_npy g;
        if (npy_read(shared_path(rel), &g) != 0) { CHECK(0, "%s: %s", rel, sd_last_error()); continue; }
        float *got = sd_malloc(g.n * sizeof(float));
        sd_rng_randn(&r, got, g.n);
        size_t same = 0;
        for (size_t k = 0; k < g.n; k++) same += sd_f32_bits(got[k]) == sd_f32_bits(((float *)g.data)[k]);
        CHECK(same == g.n, "%s: %zu of %zu bit-exact", rel, same, g.n);
        free(got);
        npy_free(&g);
    }
    /* Philox: the second draw of a generator uses counter offset 1. */
    sd_npy g;
    if (npy_read(shared_path("golden/rng/philox_seed7_offset1_1x4x8x8.npy"), &g) == 0) {
        float first[256], got[256];
        sd_rng_init(&r, SD_RNG_CUDA, 7);
        sd_rng_randn(&r, first, 256);
        sd_rng_randn(&r, got, 256);
        long worst = 0;
        for (size_t k = 0; k < g.n && k < 256; k++) {
            long u = ulp_diff(got[k], ((float *)g.data)[k]);
            if (u > worst) worst = u;
        }
        CHECK(g.n == 256 && worst <= 4, "philox offset 1: max %ld ulps", worst);
        npy_free(&g);
    } else CHECK(0, "philox offset file: %s", sd_last_error());
}

/* Properties that need no golden files: determinism, the seed folding, N(0,1) moments. */
static void test_rng_properties(void) {
    float a[40], b[40];
    sd_randn(SD_RNG_CPU, 42, a, 40);
    sd_randn(SD_RNG_CPU, 42, b, 40);
    CHECK(memcmp(a, b, sizeof a) == 0, "same seed, same numbers");
    sd_randn(SD_RNG_CPU, 42 + (1ull << 32), b, 40);
    CHECK(memcmp(a, b, sizeof a) == 0, "torch's CPU generator uses the seed's low 32 bits");
    sd_randn(SD_RNG_CUDA, 42 + (1ull << 32), b, 40);
    sd_randn(SD_RNG_CUDA, 42, a, 40);
    CHECK(memcmp(a, b, sizeof a) != 0, "philox keys on all 64 bits of the seed");
    /* Moments of 2^16 values from each generator. */
    for (int kind = 0; kind < 2; kind++) {
        size_t n = 1 << 16;
        float *x = sd_malloc(n * sizeof(float));
        sd_randn((sd_rng_kind)kind, 1234, x, n);
        double m = 0, v = 0;
        for (size_t k = 0; k < n; k++) m += x[k];
        m /= (double)n;
        for (size_t k = 0; k < n; k++) v += (x[k] - m) * (x[k] - m);
        v /= (double)n;
        CHECK(fabs(m) < 0.02 && fabs(v - 1.0) < 0.03, "rng %d: mean %g var %g", kind, m, v);
        free(x);
    }
}

/* ---- schedule and timesteps ---------------------------------------------------------- */

static void check_timesteps(sd_sampler_kind kind, sd_spacing sp, int steps, const int *want, int nwant, const char *what) {
    sd_sched_config c;
    sched_config_default(&c);
    c.spacing = sp;
    sd_scheduler *s = sched_new(&c, kind, steps);
    if (!s) { CHECK(0, "%s: %s", what, sd_last_error()); return; }
    int ok = sched_num_steps(s) == steps;
    for (int i = 0; i < nwant && i < steps; i++) ok &= sched_timestep(s, i) == (float)want[i];
    CHECK(ok, "%s: timesteps %g %g ... differ from diffusers'", what, sched_timestep(s, 0),
          steps > 1 ? sched_timestep(s, 1) : 0.0);
    sched_free(s);
}

static void test_timesteps(void) {
    /* diffusers DDIMScheduler.set_timesteps with SD1.5's config: 50 steps, leading, offset 1. */
    int lead50[50];
    for (int i = 0; i < 50; i++) lead50[i] = 981 - 20 * i;
    check_timesteps(SD_DDIM, SD_SPACING_LEADING, 50, lead50, 50, "ddim leading 50");
    int lead4[4] = { 751, 501, 251, 1 };
    check_timesteps(SD_DDIM, SD_SPACING_LEADING, 4, lead4, 4, "ddim leading 4");
    int lead10[10] = { 901, 801, 701, 601, 501, 401, 301, 201, 101, 1 };
    check_timesteps(SD_EULER, SD_SPACING_LEADING, 10, lead10, 10, "euler leading 10");
    int trail10[10] = { 999, 899, 799, 699, 599, 499, 399, 299, 199, 99 };
    check_timesteps(SD_DDIM, SD_SPACING_TRAILING, 10, trail10, 10, "ddim trailing 10");
    int trail3[3] = { 999, 666, 332 };   /* round(1000, 666.67, 333.33) - 1 */
    check_timesteps(SD_DDIM, SD_SPACING_TRAILING, 3, trail3, 3, "ddim trailing 3");
    int lin10[10] = { 999, 888, 777, 666, 555, 444, 333, 222, 111, 0 };
    check_timesteps(SD_DDIM, SD_SPACING_LINSPACE, 10, lin10, 10, "ddim linspace 10");
    int lin7[7] = { 999, 832, 666, 500, 333, 166, 0 };   /* 832.5 -> 832, 499.5 -> 500: half to even */
    check_timesteps(SD_DDIM, SD_SPACING_LINSPACE, 7, lin7, 7, "ddim linspace 7 (half-even)");
    /* Euler keeps linspace's fractions: linspace(0, 999, 7) = ..., 832.5, ... */
    sd_sched_config c;
    sched_config_default(&c);
    c.spacing = SD_SPACING_LINSPACE;
    sd_scheduler *s = sched_new(&c, SD_EULER, 7);
    CHECK(s && sched_timestep(s, 1) == 832.5f && sched_timestep(s, 3) == 499.5f, "euler linspace keeps 832.5");
    sched_free(s);
    /* DPMSolverMultistepScheduler, leading, 20 steps: arange(21) * (1000 // 21) reversed, last
     * dropped, + 1 -> 941, 894, ..., 48. */
    int dpm20[20];
    for (int i = 0; i < 20; i++) dpm20[i] = 941 - 47 * i;
    check_timesteps(SD_DPMPP_2M, SD_SPACING_LEADING, 20, dpm20, 20, "dpm++ leading 20");
    CHECK(sched_new(&c, SD_DDIM, 0) == NULL && strstr(sd_last_error(), "steps"), "0 steps refused");
    sd_clear_error();

    /* The golden run's timesteps. */
    sd_npy g;
    if (npy_read(shared_path("golden/tiny_a/txt2img_timesteps.npy"), &g) == 0) {
        sched_config_default(&c);
        s = sched_new(&c, SD_DDIM, (int)g.n);
        int ok = s != NULL && g.dtype == NPY_I64;
        for (size_t i = 0; ok && i < g.n; i++) ok = sched_timestep(s, (int)i) == (float)((int64_t *)g.data)[i];
        CHECK(ok, "golden txt2img timesteps");
        sched_free(s);
        npy_free(&g);
    } else CHECK(0, "txt2img_timesteps.npy: %s", sd_last_error());
}

static void test_schedule(void) {
    sd_sched_config c;
    sched_config_default(&c);
    sd_scheduler *s = sched_new(&c, SD_DDIM, 10);
    const float *ac = sched_alphas_cumprod(s);
    /* The first beta is exactly float(sqrt(0.00085))^2: linspace's ends are exact. */
    float b0 = (float)sqrt(0.00085);
    b0 = b0 * b0;
    CHECK(ac[0] == 1.0f - b0, "alphas_cumprod[0] = 1 - beta_0 exactly (%.9g)", ac[0]);
    /* Against the schedule in double: relative error of a float32 table stays ~1e-6. */
    double prod = 1.0, worst = 0;
    for (int t = 0; t < 1000; t++) {
        double sb = sqrt(0.00085) + (sqrt(0.012) - sqrt(0.00085)) * t / 999.0;
        prod *= 1.0 - sb * sb;
        double e = fabs(ac[t] - prod) / prod;
        if (e > worst) worst = e;
    }
    CHECK(worst < 2e-6, "scaled_linear alphas_cumprod vs double: rel err %g", worst);
    sched_free(s);
    c.scaled_linear = 0;
    c.beta_start = 0.0001; c.beta_end = 0.02;
    s = sched_new(&c, SD_DDIM, 10);
    ac = sched_alphas_cumprod(s);
    prod = 1.0; worst = 0;
    for (int t = 0; t < 1000; t++) {
        prod *= 1.0 - (0.0001 + (0.02 - 0.0001) * t / 999.0);
        double e = fabs(ac[t] - prod) / prod;
        if (e > worst) worst = e;
    }
    CHECK(worst < 1e-5, "linear alphas_cumprod vs double: rel err %g", worst);
    sched_free(s);

    /* Config loading: the golden config is SD1.5's; bad values are refused with one line. */
    sched_config_default(&c);
    c.steps_offset = 0;
    CHECK(sched_config_load(&c, shared_path("golden/tiny_a/scheduler_config.json")) == 0, "load: %s", sd_last_error());
    CHECK(c.steps_offset == 1 && c.scaled_linear && c.spacing == SD_SPACING_LEADING && !c.set_alpha_to_one &&
          c.prediction == SD_PRED_EPSILON && c.num_train_timesteps == 1000 && c.beta_end == 0.012, "golden config values");
    const char *bad = tmp_path("sched_bad.json");
    FILE *f = fopen(bad, "w");
    if (f) { fputs("{\"beta_schedule\": \"squaredcos_cap_v2\"}", f); fclose(f); }
    sd_clear_error();
    CHECK(sched_config_load(&c, bad) == -1 && strstr(sd_last_error(), "beta_schedule"), "bad beta_schedule: %s", sd_last_error());
    f = fopen(bad, "w");
    if (f) { fputs("{\"prediction_type\": \"v_prediction\", \"timestep_spacing\": \"trailing\"}", f); fclose(f); }
    sd_clear_error();
    sched_config_default(&c);
    CHECK(sched_config_load(&c, bad) == 0 && c.prediction == SD_PRED_V && c.spacing == SD_SPACING_TRAILING, "v/trailing config");
    f = fopen(bad, "w");
    if (f) { fputs("{\"beta_start\": 0.5, \"beta_end\": 0.1}", f); fclose(f); }
    sd_clear_error();
    CHECK(sched_config_load(&c, bad) == -1, "impossible betas refused");
    sd_clear_error();
    CHECK(sched_config_load(&c, tmp_path("no_such.json")) == -1 && sd_last_error()[0], "missing file refused");
    sd_clear_error();

    sd_sampler_kind k;
    int karras;
    CHECK(sched_parse_sampler("dpmpp_2m_karras", &k, &karras) == 0 && k == SD_DPMPP_2M && karras, "parse dpmpp_2m_karras");
    CHECK(sched_parse_sampler("euler_a", &k, &karras) == 0 && k == SD_EULER_A && !karras, "parse euler_a");
    CHECK(sched_parse_sampler("plms", &k, &karras) == -1 && strstr(sd_last_error(), "plms"), "unknown sampler refused");
    sd_clear_error();
}

/* ---- sampler steps against the published formulas in double ---------------------------- */

#define N 64

static void fill(uint64_t seed, float *x, float scale) {
    sd_randn(SD_RNG_CPU, seed, x, N);
    for (int k = 0; k < N; k++) x[k] *= scale;
}

/* DDIM (Song et al. 2020, eq. 12): x' = sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s z,
 * s = eta sqrt((1-a')/(1-a) (1 - a/a')). */
static void test_ddim_formula(void) {
    for (int pred = 0; pred < 3; pred++) {
        for (int with_eta = 0; with_eta < 2; with_eta++) {
            sd_sched_config c;
            sched_config_default(&c);
            c.prediction = (sd_prediction)pred;
            c.eta = with_eta ? 0.7f : 0.0f;
            sd_scheduler *s = sched_new(&c, SD_DDIM, 10);
            CHECK(sched_needs_noise(s) == with_eta, "ddim needs noise iff eta > 0");
            const float *ac = sched_alphas_cumprod(s);
            float x[N], m[N], z[N];
            fill(1, x, 1.0f);
            double worst = 0;
            for (int i = 0; i < 10; i++) {
                fill(100 + i, m, 1.0f);
                fill(200 + i, z, 1.0f);
                int t = (int)sched_timestep(s, i), tp = t - 100;
                double a = ac[t], ap = tp >= 0 ? ac[tp] : ac[0];
                double ref[N];
                double sd = c.eta * sqrt((1 - ap) / (1 - a) * (1 - a / ap));
                for (int k = 0; k < N; k++) {
                    double x0, eps;
                    if (pred == SD_PRED_EPSILON) { eps = m[k]; x0 = (x[k] - sqrt(1 - a) * eps) / sqrt(a); }
                    else if (pred == SD_PRED_SAMPLE) { x0 = m[k]; eps = (x[k] - sqrt(a) * x0) / sqrt(1 - a); }
                    else { x0 = sqrt(a) * x[k] - sqrt(1 - a) * m[k]; eps = sqrt(a) * m[k] + sqrt(1 - a) * x[k]; }
                    ref[k] = sqrt(ap) * x0 + sqrt(1 - ap - sd * sd) * eps + sd * z[k];
                }
                sched_step(s, i, m, x, z, N);
                double e = rel_err(x, ref, N);
                if (e > worst) worst = e;
                for (int k = 0; k < N; k++) x[k] = (float)ref[k];   /* next step from the exact state */
            }
            /* pred "sample" divides by sqrt(1 - a) ~ 0.03 at t = 1: allow its larger float error. */
            CHECK(worst < (pred == SD_PRED_SAMPLE ? 1e-4 : 1e-5), "ddim pred %d eta %d: rel err %g", pred, with_eta, worst);
            sched_free(s);
        }
    }
}

/* Euler (Karras et al. 2022, Alg. 2, no churn): x' = x + (x - x0)/sigma (sigma' - sigma);
 * ancestral: sigma_up = sqrt(s'^2 (s^2 - s'^2) / s^2), sigma_down = sqrt(s'^2 - up^2),
 * x' = x + (x - x0)/sigma (down - sigma) + up z. Sigmas sqrt((1-a)/a) at the timesteps. */
static void test_euler_formula(void) {
    for (int anc = 0; anc < 2; anc++) {
        for (int karras = 0; karras < 2; karras++) {
            for (int pred = 0; pred < 2; pred++) {
                sd_sched_config c;
                sched_config_default(&c);
                c.karras = karras;
                c.prediction = pred ? SD_PRED_V : SD_PRED_EPSILON;
                sd_scheduler *s = sched_new(&c, anc ? SD_EULER_A : SD_EULER, 12);
                const float *ac = sched_alphas_cumprod(s);
                /* the sigma schedule */
                int ok = sched_sigma(s, 12) == 0.0f;
                for (int i = 0; i < 12 && !karras; i++) {
                    int t = (int)sched_timestep(s, i);
                    ok &= sched_sigma(s, i) == (float)sqrtf((1.0f - ac[t]) / ac[t]);
                }
                if (karras) {
                    double lo = sched_sigma(s, 11), hi = sched_sigma(s, 0);
                    for (int i = 0; i < 12; i++) {
                        double r = i / 11.0;
                        double want = pow(pow(hi, 1 / 7.0) + r * (pow(lo, 1 / 7.0) - pow(hi, 1 / 7.0)), 7.0);
                        ok &= fabs(sched_sigma(s, i) - want) <= 2e-6 * want;
                        if (i) ok &= sched_timestep(s, i) < sched_timestep(s, i - 1);
                    }
                    /* Karras ends are the sigmas at the leading timesteps' ends: 11 * (1000 // 12) + 1 = 914 and 1. */
                    ok &= fabs(hi - sqrt((1.0 - ac[914]) / ac[914])) < 1e-5 * hi && fabs(lo - sqrt((1.0 - ac[1]) / ac[1])) < 1e-5 * lo;
                    ok &= fabs(sched_timestep(s, 0) - 914.0f) < 0.01f && fabs(sched_timestep(s, 11) - 1.0f) < 0.01f;
                }
                CHECK(ok, "euler%s karras %d: sigmas", anc ? "_a" : "", karras);
                double s0 = sched_sigma(s, 0);
                CHECK(fabs(sched_init_noise_sigma(s) - sqrt(s0 * s0 + 1)) < 1e-6 * s0, "init_noise_sigma %g", sched_init_noise_sigma(s));
                CHECK(sched_needs_noise(s) == anc, "euler needs noise iff ancestral");
                float x[N], m[N], z[N], in[N];
                fill(3, x, (float)s0);
                double worst = 0, worst_in = 0;
                for (int i = 0; i < 12; i++) {
                    fill(300 + i, m, 1.0f);
                    fill(400 + i, z, 1.0f);
                    double sg = sched_sigma(s, i), sn = sched_sigma(s, i + 1), ref[N], refin[N];
                    sched_scale_model_input(s, i, x, in, N);
                    for (int k = 0; k < N; k++) refin[k] = x[k] / sqrt(sg * sg + 1);
                    double e = rel_err(in, refin, N);
                    if (e > worst_in) worst_in = e;
                    double up = anc ? sqrt(sn * sn * (sg * sg - sn * sn) / (sg * sg)) : 0;
                    double down = anc ? sqrt(sn * sn - up * up) : sn;
                    for (int k = 0; k < N; k++) {
                        double x0 = pred ? m[k] * (-sg / sqrt(sg * sg + 1)) + x[k] / (sg * sg + 1) : x[k] - sg * m[k];
                        ref[k] = x[k] + (x[k] - x0) / sg * (down - sg) + up * z[k];
                    }
                    sched_step(s, i, m, x, z, N);
                    e = rel_err(x, ref, N);
                    if (e > worst) worst = e;
                    for (int k = 0; k < N; k++) x[k] = (float)ref[k];
                }
                CHECK(worst < 2e-5 && worst_in < 1e-6, "euler%s karras %d pred %d: rel err %g (input %g)",
                      anc ? "_a" : "", karras, pred, worst, worst_in);
                sched_free(s);
            }
        }
    }
}

/* DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in the VP parameterisation: alpha = 1/sqrt(1+s^2),
 * sigma_t = s alpha, lambda = log(alpha/sigma_t), h = lambda' - lambda; D = x0 (first step,
 * last step to sigma 0) or x0 + (x0 - x0_prev) / (2 r), r = h_prev / h;
 * x' = (sigma'/sigma) x - alpha' (e^-h - 1) D. */
static void test_dpm_formula(void) {
    for (int karras = 0; karras < 2; karras++) {
        for (int pred = 0; pred < 2; pred++) {
            sd_sched_config c;
            sched_config_default(&c);
            c.karras = karras;
            c.prediction = pred ? SD_PRED_V : SD_PRED_EPSILON;
            const int steps = 8;
            sd_scheduler *s = sched_new(&c, SD_DPMPP_2M, steps);
            const float *ac = sched_alphas_cumprod(s);
            CHECK(sched_init_noise_sigma(s) == 1.0f && !sched_needs_noise(s), "dpm init sigma 1");
            if (karras) {
                double hi = sqrt((1.0 - ac[999]) / ac[999]), lo = sqrt((1.0 - ac[0]) / ac[0]);
                CHECK(fabs(sched_sigma(s, 0) - hi) < 1e-5 * hi && fabs(sched_sigma(s, steps - 1) - lo) < 1e-5 * lo,
                      "dpm karras spans the whole table: %g %g", sched_sigma(s, 0), sched_sigma(s, steps - 1));
                CHECK(sched_timestep(s, 0) == 999.0f && sched_timestep(s, steps - 1) == 0.0f, "dpm karras timesteps integral ends");
            }
            float x[N], m[N];
            double x0prev[N], worst = 0, hprev = 0;
            fill(5, x, 1.0f);
            for (int i = 0; i < steps; i++) {
                fill(500 + i, m, 1.0f);
                double sg = sched_sigma(s, i), sn = sched_sigma(s, i + 1), ref[N], x0[N];
                double a = 1 / sqrt(1 + sg * sg), st = sg * a;
                double an = 1 / sqrt(1 + sn * sn), stn = sn * an;
                double h = sn > 0 ? log(an / stn) - log(a / st) : 0;
                for (int k = 0; k < N; k++) {
                    x0[k] = pred ? a * x[k] - st * m[k] : (x[k] - st * m[k]) / a;
                    if (sn == 0) { ref[k] = x0[k]; continue; }
                    double D = x0[k];
                    if (i > 0) D = x0[k] + (x0[k] - x0prev[k]) * h / (2 * hprev);
                    ref[k] = stn / st * x[k] - an * (exp(-h) - 1) * D;
                }
                sched_step(s, i, m, x, NULL, N);
                double e = rel_err(x, ref, N);
                if (e > worst) worst = e;
                for (int k = 0; k < N; k++) { x[k] = (float)ref[k]; x0prev[k] = x0[k]; }
                hprev = h;
            }
            CHECK(worst < 2e-5, "dpm++ 2m karras %d pred %d: rel err %g", karras, pred, worst);
            sched_free(s);
        }
    }
}

static void test_img2img(void) {
    sd_sched_config c;
    sched_config_default(&c);
    sd_scheduler *s = sched_new(&c, SD_DDIM, 50);
    CHECK(sched_img2img_start(s, 0.75) == 13, "strength 0.75 of 50 steps starts at 13 (int(37.5) = 37 run)");
    CHECK(sched_img2img_start(s, 1.0) == 0 && sched_img2img_start(s, 0.0) == 50, "strength 1 / 0");
    CHECK(sched_img2img_start(s, 0.3) == 35, "strength 0.3 -> int(15.0) steps");
    float x[N], z[N], out[N];
    double ref[N];
    fill(7, x, 1.0f);
    fill(8, z, 1.0f);
    int i = 13, t = (int)sched_timestep(s, i);
    CHECK(t == 981 - 20 * 13, "img2img timestep %d", t);
    double a = sched_alphas_cumprod(s)[t];
    sched_add_noise(s, i, x, z, out, N);
    for (int k = 0; k < N; k++) ref[k] = sqrt(a) * x[k] + sqrt(1 - a) * z[k];
    CHECK(rel_err(out, ref, N) < 1e-6, "ddim add_noise");
    sched_free(s);
    s = sched_new(&c, SD_EULER, 20);
    double sg = sched_sigma(s, 5);
    sched_add_noise(s, 5, x, z, out, N);
    for (int k = 0; k < N; k++) ref[k] = x[k] + sg * z[k];
    CHECK(rel_err(out, ref, N) < 1e-6, "euler add_noise");
    sched_free(s);
    s = sched_new(&c, SD_DPMPP_2M, 20);
    sg = sched_sigma(s, 5);
    sched_add_noise(s, 5, x, z, out, N);
    for (int k = 0; k < N; k++) ref[k] = (x[k] + sg * z[k]) / sqrt(1 + sg * sg);
    CHECK(rel_err(out, ref, N) < 1e-6, "dpm add_noise");
    sched_free(s);
}

/* ---- the golden DDIM chain: CFG 7.5 + DDIM step from the recorded UNet outputs ---------- */

static void test_ddim_golden(void) {
    sd_safetensors st;
    if (st_open(&st, shared_path("golden/tiny_a/trace.safetensors")) != 0) { CHECK(0, "trace: %s", sd_last_error()); return; }
    float *lat;
    int nd;
    int64_t shape[8];
    size_t n;
    if (npy_read_f32(shared_path("golden/tiny_a/txt2img_noise.npy"), &lat, &nd, shape, &n) != 0) {
        CHECK(0, "noise: %s", sd_last_error());
        st_close(&st);
        return;
    }
    sd_sched_config c;
    sched_config_default(&c);
    if (sched_config_load(&c, shared_path("golden/tiny_a/scheduler_config.json")) != 0) CHECK(0, "%s", sd_last_error());
    sd_scheduler *s = sched_new(&c, SD_DDIM, 4);
    float *chain = sd_malloc(n * sizeof(float)), *step_in = sd_malloc(n * sizeof(float));
    float *uc = sd_malloc(2 * n * sizeof(float)), *g = sd_malloc(n * sizeof(float)), *want = sd_malloc(n * sizeof(float));
    float sigma0 = sched_init_noise_sigma(s);
    for (size_t k = 0; k < n; k++) chain[k] = step_in[k] = lat[k] * sigma0;
    for (int i = 0; i < 4; i++) {
        char name[128];
        snprintf(name, sizeof name, "txt2img.step%d.unet_out_uncond_cond", i);
        const st_entry *eo = st_find(&st, name);
        snprintf(name, sizeof name, "txt2img.step%d.t%d.latents_after", i, (int)sched_timestep(s, i));
        const st_entry *el = st_find(&st, name);
        if (!eo || !el || eo->nbytes != 2 * n * 4 || el->nbytes != n * 4) { CHECK(0, "trace entry for step %d", i); break; }
        st_read_f32(&st, eo, uc);
        st_read_f32(&st, el, want);
        sched_cfg(uc, uc + n, 7.5f, g, n);
        sched_step(s, i, g, step_in, NULL, n);    /* from the golden previous latents */
        double emax = 0, gmax = 0, cmax = 0;
        size_t exact = 0;
        for (size_t k = 0; k < n; k++) {
            emax = fmax(emax, fabs(step_in[k] - want[k]));
            gmax = fmax(gmax, fabs(want[k]));
            exact += sd_f32_bits(step_in[k]) == sd_f32_bits(want[k]);
        }
        /* torch's float32 step reproduced operation by operation: bit-exact. */
        CHECK(exact == n && emax <= 1e-6 * gmax, "ddim golden step %d: max err %g of %g (%zu/%zu bit-exact)", i, emax, gmax, exact, n);
        if (env_flag("SDREF_VERBOSE")) fprintf(stderr, "ddim step %d: %zu/%zu bit-exact, max err %g\n", i, exact, n, emax);
        /* The free-running chain (our own previous latents); the next step-wise check starts
         * from the golden latents. */
        memcpy(step_in, want, n * sizeof(float));
        sched_step(s, i, g, chain, NULL, n);
        for (size_t k = 0; k < n; k++) cmax = fmax(cmax, fabs(chain[k] - want[k]));
        CHECK(cmax == 0.0, "ddim golden chain after step %d: max err %g", i, cmax);
    }
    sd_npy out;
    if (npy_read(shared_path("golden/tiny_a/txt2img_latent_out.npy"), &out) == 0) {
        double emax = 0, gmax = 0;
        for (size_t k = 0; k < n && k < out.n; k++) {
            emax = fmax(emax, fabs(chain[k] - ((float *)out.data)[k]));
            gmax = fmax(gmax, fabs(((float *)out.data)[k]));
        }
        CHECK(out.n == n && emax == 0.0 && gmax > 0, "txt2img_latent_out from the recorded UNet outputs: %g", emax);
        npy_free(&out);
    }
    free(chain); free(step_in); free(uc); free(g); free(want); free(lat);
    sched_free(s);
    st_close(&st);
}

void test_sampler(void) {
    test_rng_properties();
    test_timesteps();
    test_schedule();
    test_ddim_formula();
    test_euler_formula();
    test_dpm_formula();
    test_img2img();
    if (!have_shared()) { fprintf(stderr, "sampler: golden data absent, golden checks skipped\n"); return; }
    test_rng_golden();
    test_ddim_golden();
}
