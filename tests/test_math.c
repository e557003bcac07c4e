/* tests/test_math.c — the project's own math functions against the C library's long double
 * functions (x86_64: 80-bit, 64-bit significand; used here only as the oracle).
 *
 * float functions: the error in ulps of every input of a strided sample (SDREF_EXHAUSTIVE=1:
 * every float32 input of the function's useful domain) must be at most 1 ulp; the measured
 * maximum and the count of results that are not correctly rounded are printed.
 * double functions: random inputs, max error in ulps printed and bounded. */
#include "test.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static float ffrom(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static uint32_t fbits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static uint64_t dbits(double d) { uint64_t u; memcpy(&u, &d, 8); return u; }

/* |got - exact| in units of the last place of the float nearest to exact. Results beyond the
 * float range must be the Inf that exact rounds to. */
static double ulp_err_f(float got, long double exact) {
    if (exact != exact) return got != got ? 0 : 1e30;
    float rf = (float)exact;
    if (rf - rf != 0) return got == rf ? 0 : 1e30;              /* rounds to +-Inf */
    if (got - got != 0) return 1e30;
    int e;
    frexpl(exact, &e);                                          /* |exact| in [2^(e-1), 2^e) */
    if (e - 1 < -126) e = -125;
    long double ulp = ldexpl(1.0L, e - 1 - 23);
    return (double)(fabsl((long double)got - exact) / ulp);
}

static double ulp_err_d(double got, long double exact) {
    if (exact != exact) return got != got ? 0 : 1e30;
    double rd = (double)exact;
    if (rd - rd != 0) return got == rd ? 0 : 1e30;
    if (got - got != 0) return 1e30;
    int e;
    frexpl(exact, &e);
    if (e - 1 < -1022) e = -1021;
    long double ulp = ldexpl(1.0L, e - 1 - 52);
    return (double)(fabsl((long double)got - exact) / ulp);
}

/* ---- float functions: scans ----------------------------------------------------------------- */

typedef struct ffunc {
    const char *name;
    float (*fn)(float);
    long double (*oracle)(long double);
    float lo, hi;           /* useful domain: the exhaustive scan covers lo <= x <= hi */
} ffunc;

static long double o_exp(long double x) { return expl(x); }
static long double o_log(long double x) { return logl(x); }
static long double o_erf(long double x) { return erfl(x); }
static long double o_tanh(long double x) { return tanhl(x); }
static long double o_sin(long double x) { return sinl(x); }
static long double o_cos(long double x) { return cosl(x); }

static const ffunc ffuncs[] = {
    { "sd_expf", sd_expf, o_exp, -104.0f, 89.0f },            /* beyond: 0 and Inf */
    { "sd_logf", sd_logf, o_log, 0.0f, 3.4028235e38f },        /* every positive float */
    { "sd_erff", sd_erff, o_erf, -4.0f, 4.0f },                /* beyond: +-1 */
    { "sd_tanhf", sd_tanhf, o_tanh, -10.0f, 10.0f },           /* beyond: +-1 */
    { "sd_sinf", sd_sinf, o_sin, -3.4028235e38f, 3.4028235e38f },
    { "sd_cosf", sd_cosf, o_cos, -3.4028235e38f, 3.4028235e38f },
};
#define N_FFUNCS (int)(sizeof ffuncs / sizeof ffuncs[0])

typedef struct scan_result { double max_err; float worst_x; uint64_t count, not_cr; } scan_result;

/* Scan bit patterns i = 0, step, 2 step, ... < 2^32 whose value lies in [lo, hi] (all finite
 * inputs when !restrict_domain). Chunks are reduced in order, so the result is deterministic. */
static scan_result scan(const ffunc *f, uint64_t step, int restrict_domain) {
    enum { CHUNK = 1 << 20 };
    int64_t n = (int64_t)((0x100000000ull + step - 1) / step), nchunks = (n + CHUNK - 1) / CHUNK;
    scan_result *part = calloc((size_t)nchunks, sizeof *part);
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1)
#endif
    for (int64_t c = 0; c < nchunks; c++) {
        scan_result r = { 0, 0, 0, 0 };
        for (int64_t i = c * CHUNK; i < (c + 1) * CHUNK && i < n; i++) {
            float x = ffrom((uint32_t)((uint64_t)i * step));
            if (x - x != 0) continue;                                  /* Inf, NaN: see specials */
            if (restrict_domain && !(x >= f->lo && x <= f->hi)) continue;
            if (f->fn == sd_logf && x < 0) continue;
            long double exact = f->oracle((long double)x);
            float got = f->fn(x);
            double e = ulp_err_f(got, exact);
            r.count++;
            if (fbits(got) != fbits((float)exact) && !(got != got && exact != exact)) r.not_cr++;
            if (e > r.max_err) { r.max_err = e; r.worst_x = x; }
        }
        part[c] = r;
    }
    scan_result t = { 0, 0, 0, 0 };
    for (int64_t c = 0; c < nchunks; c++) {
        t.count += part[c].count;
        t.not_cr += part[c].not_cr;
        if (part[c].max_err > t.max_err) { t.max_err = part[c].max_err; t.worst_x = part[c].worst_x; }
    }
    free(part);
    return t;
}

static void test_float_functions(int exhaustive) {
    for (int k = 0; k < N_FFUNCS; k++) {
        const ffunc *f = &ffuncs[k];
        time_t w0 = time(NULL);
        clock_t t0 = clock();
        scan_result r = scan(f, exhaustive ? 1 : 4099, exhaustive);
        if (exhaustive) {                   /* outside the useful domain: a sample is enough */
            scan_result o = scan(f, 257, 0);
            if (o.max_err > r.max_err) { r.max_err = o.max_err; r.worst_x = o.worst_x; }
            r.not_cr += o.not_cr;
        }
        CHECK(r.max_err <= 1.0, "%s: max error %.4f ulp at x = %a (%.9g)", f->name, r.max_err, r.worst_x, r.worst_x);
        fprintf(stderr, "  math: %-9s max error %.6f ulp (at %a) over %llu inputs (%s), %llu not correctly rounded; "
                "%.1f s cpu, %.0f s wall\n",
                f->name, r.max_err, r.worst_x, (unsigned long long)r.count,
                exhaustive ? "every float of the domain" : "every 4099th float", (unsigned long long)r.not_cr,
                (double)(clock() - t0) / CLOCKS_PER_SEC, difftime(time(NULL), w0));
    }
}

static int same_f(float a, float b) { return fbits(a) == fbits(b); }

static void test_float_specials(void) {
    const float inf = INFINITY, nan = NAN, tiny = ffrom(1);
    CHECK(same_f(sd_expf(0.0f), 1.0f) && same_f(sd_expf(-0.0f), 1.0f), "expf(+-0) = 1");
    CHECK(same_f(sd_expf(-inf), 0.0f) && sd_expf(inf) == inf && sd_expf(nan) != sd_expf(nan), "expf specials");
    CHECK(sd_expf(88.72283f) < inf && sd_expf(88.7228394f) == inf, "expf overflow threshold");
    CHECK(sd_expf(-103.5f) == tiny && same_f(sd_expf(-104.0f), 0.0f), "expf underflow to subnormal / 0");
    CHECK(sd_expf(1.0f) == 2.71828183f, "expf(1) = e");
    CHECK(same_f(sd_logf(1.0f), 0.0f) && sd_logf(0.0f) == -inf && sd_logf(-0.0f) == -inf, "logf(1), logf(+-0)");
    CHECK(sd_logf(-1.0f) != sd_logf(-1.0f) && sd_logf(-inf) != sd_logf(-inf) && sd_logf(nan) != sd_logf(nan), "logf(<0) NaN");
    CHECK(sd_logf(inf) == inf && ulp_err_f(sd_logf(tiny), logl((long double)tiny)) <= 0.5, "logf(Inf), logf(min subnormal)");
    CHECK(same_f(sd_erff(0.0f), 0.0f) && same_f(sd_erff(-0.0f), -0.0f) && sd_erff(inf) == 1.0f && sd_erff(-inf) == -1.0f,
          "erff specials");
    CHECK(same_f(sd_erff(tiny), tiny) && same_f(sd_erff(-0x1p-140f), -0x1.20dd76p-140f), "erff(subnormal) = 2x/sqrt(pi)");
    CHECK(same_f(sd_tanhf(-0.0f), -0.0f) && sd_tanhf(inf) == 1.0f && sd_tanhf(-inf) == -1.0f && sd_tanhf(-20.0f) == -1.0f,
          "tanhf specials");
    CHECK(same_f(sd_sinf(-0.0f), -0.0f) && same_f(sd_cosf(0.0f), 1.0f) && sd_sinf(inf) != sd_sinf(inf) &&
          sd_cosf(-inf) != sd_cosf(-inf) && sd_sinf(nan) != sd_sinf(nan), "sin/cos specials");
    CHECK(same_f(sd_sinf(tiny), tiny) && same_f(sd_sinf(-tiny), -tiny), "sinf(subnormal) = x");
    float big = 3.4028235e38f;
    CHECK(ulp_err_f(sd_sinf(big), sinl((long double)big)) <= 0.5 &&
          ulp_err_f(sd_cosf(-big), cosl(-(long double)big)) <= 0.5, "sin/cos of FLT_MAX");
    /* the float closest to a multiple of pi/2 in the whole range is a hard case for argument
     * reduction (x = 0x1.2d97c8p+3 ... near 3 pi); check a few classic ones */
    static const float hard[] = { 0x1.921fb6p+0f, 0x1.921fb6p+1f, 0x1.2d97c8p+3f, 0x1.5fdbbep+22f, 0x1.3b7e8p+62f,
                                  0x1.3f19e4p+104f, 0x1p+127f, 0x1.fffffep+127f, 0x1.c463acp+17f };
    double worst = 0;
    for (size_t i = 0; i < sizeof hard / sizeof hard[0]; i++) {
        double e1 = ulp_err_f(sd_sinf(hard[i]), sinl((long double)hard[i]));
        double e2 = ulp_err_f(sd_cosf(hard[i]), cosl((long double)hard[i]));
        if (e1 > worst) worst = e1;
        if (e2 > worst) worst = e2;
    }
    CHECK(worst <= 0.5 + 1e-6, "sin/cos near multiples of pi/2: %.6f ulp", worst);
}

/* ---- double functions ------------------------------------------------------------------------ */

static uint64_t splitmix(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static double uniform(uint64_t *s, double lo, double hi) {
    return lo + (hi - lo) * ((double)(splitmix(s) >> 11) * 0x1p-53);
}
static double random_double_bits(uint64_t *s) {     /* random finite double, any exponent */
    uint64_t u;
    do u = splitmix(s); while (((u >> 52) & 0x7ff) == 0x7ff);
    double d; memcpy(&d, &u, 8);
    return d;
}

static void report_d(const char *name, double max, double at, long n, double limit) {
    CHECK(max <= limit, "%s: max error %.3f ulp at %a (limit %.1f)", name, max, at, limit);
    fprintf(stderr, "  math: %-7s max error %.3f ulp (at %a) over %ld random inputs\n", name, max, at, n);
}

static void test_double_functions(int exhaustive) {
    long n = exhaustive ? 4000000 : 300000;
    uint64_t s = 42;
    double m[6] = { 0 }, at[6] = { 0 };
#define TRACK(k, x, e) do { double e_ = (e); if (e_ > m[k]) { m[k] = e_; at[k] = (x); } } while (0)
    for (long i = 0; i < n; i++) {
        double x = (i & 1) ? uniform(&s, -745.2, 709.8) : uniform(&s, -2, 2);
        TRACK(0, x, ulp_err_d(sd_exp(x), expl((long double)x)));
        x = (i & 1) ? fabs(random_double_bits(&s)) : uniform(&s, 0.25, 4);
        TRACK(1, x, ulp_err_d(sd_log(x), logl((long double)x)));
        x = (i % 3 == 0) ? uniform(&s, -8, 8) : (i % 3 == 1) ? uniform(&s, -1e6, 1e6) : random_double_bits(&s);
        TRACK(2, x, ulp_err_d(sd_sin(x), sinl((long double)x)));
        TRACK(3, x, ulp_err_d(sd_cos(x), cosl((long double)x)));
        double px = exp(uniform(&s, -7, 7)), py = uniform(&s, -20, 20);   /* libm only to make inputs */
        TRACK(4, px, ulp_err_d(sd_pow(px, py), powl((long double)px, (long double)py)));
        double qx = uniform(&s, 0.5, 2), qy = uniform(&s, -1000, 1000);
        TRACK(5, qx, ulp_err_d(sd_pow(qx, qy), powl((long double)qx, (long double)qy)));
    }
#undef TRACK
    report_d("sd_exp", m[0], at[0], n, 1.5);
    report_d("sd_log", m[1], at[1], n, 1.0);
    report_d("sd_sin", m[2], at[2], n, 1.5);
    report_d("sd_cos", m[3], at[3], n, 1.5);
    report_d("sd_pow", m[4], at[4], n, 3.0);
    report_d("sd_pow (y in +-1000)", m[5], at[5], n, 4.0);
    /* specials */
    CHECK(sd_exp(0) == 1 && sd_exp(-INFINITY) == 0 && sd_exp(710) == INFINITY && sd_exp(-746) == 0, "exp specials");
    CHECK(sd_exp(-745.0) > 0 && sd_exp(709.78) < INFINITY, "exp near the limits");
    CHECK(sd_log(1) == 0 && sd_log(0) == -INFINITY && sd_log(-1) != sd_log(-1) && sd_log(INFINITY) == INFINITY, "log specials");
    CHECK(ulp_err_d(sd_log(4.9406564584124654e-324), logl(4.9406564584124654e-324L)) <= 1, "log(min subnormal)");
    CHECK(sd_pow(2, 10) == 1024 && sd_pow(4, 0.5) == 2 && sd_pow(10, -2) == 0.01 && sd_pow(7, 0) == 1 &&
          sd_pow(1, 1e300) == 1, "pow exact cases");
    CHECK(sd_sin(0) == 0 && (dbits(sd_sin(-0.0)) >> 63) && sd_cos(0) == 1 && sd_sin(INFINITY) != sd_sin(INFINITY), "sin/cos specials");
}

void test_math(void) {
    int exhaustive = env_flag("SDREF_EXHAUSTIVE");
    test_float_specials();
    test_double_functions(exhaustive);
    test_float_functions(exhaustive);
}
