/* fp16.c — number formats, emulated arithmetic and the project's own math functions.
 *
 * Tensors are float32 in memory; every FP16/BF16/TF32/FP8 value is exactly a float32, so
 * "emulating" a format means rounding a float32 to the nearest value of that format. This file
 * gives:
 *   1. format names, and conversions float32 <-> format bits (round-to-nearest-even,
 *      subnormals, overflow to Inf — to NaN for E4M3 as PyTorch does — NaN stays NaN),
 *   2. sd_round / sd_round_buffer: float32 -> nearest format value, still as float32,
 *   3. correctly rounded binary16 / bfloat16 add, sub, mul, div, sqrt and fma,
 *   4. exp, log, erf, tanh, sin, cos (float32 and double) and pow, built only from
 *      + - * / sqrt so that results never depend on the C library.
 *
 * Everything here assumes IEEE arithmetic evaluated in the declared type (FLT_EVAL_METHOD 0:
 * SSE2, ARM, RISC-V, POWER ...). Compile with -ffp-contract=off and never with fast-math options.
 */
#include "sdref.h"
#include <math.h>
#include <string.h>

/* ---- bits --------------------------------------------------------------------------------- */

static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float f32_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint64_t f64_bits(double d) { uint64_t u; memcpy(&u, &d, 8); return u; }
static inline double f64_of(uint64_t u) { double d; memcpy(&d, &u, 8); return d; }

/* 2^e as a double, for -1022 <= e <= 1023 (exact, built from bits). */
static double pow2i(int e) { return f64_of((uint64_t)(e + 1023) << 52); }

#define F32_QNAN 0x7fc00000u

/* ---- names -------------------------------------------------------------------------------- */

static const char *const format_names[SD_FORMAT_COUNT] = { "fp32", "fp16", "bf16", "tf32", "fp8e4m3", "fp8e5m2" };

const char *sd_format_name(sd_format f) {
    return (unsigned)f < SD_FORMAT_COUNT ? format_names[f] : "?";
}

static int same_nocase(const char *a, const char *b) {
    for (; *a && *b; a++, b++) {
        char ca = (*a >= 'A' && *a <= 'Z') ? (char)(*a + 32) : *a;
        if (ca != *b) return 0;
    }
    return *a == *b;
}

int sd_format_parse(const char *s, sd_format *out) {
    static const struct { const char *name; sd_format f; } names[] = {
        { "fp32", SD_F32 }, { "f32", SD_F32 }, { "float32", SD_F32 }, { "float", SD_F32 },
        { "fp16", SD_F16 }, { "f16", SD_F16 }, { "half", SD_F16 }, { "float16", SD_F16 },
        { "bf16", SD_BF16 }, { "bfloat16", SD_BF16 },
        { "tf32", SD_TF32 },
        { "fp8e4m3", SD_E4M3 }, { "e4m3", SD_E4M3 }, { "fp8", SD_E4M3 }, { "fp8_e4m3", SD_E4M3 },
        { "float8_e4m3fn", SD_E4M3 }, { "e4m3fn", SD_E4M3 },
        { "fp8e5m2", SD_E5M2 }, { "e5m2", SD_E5M2 }, { "fp8_e5m2", SD_E5M2 }, { "float8_e5m2", SD_E5M2 },
    };
    for (size_t i = 0; s && i < sizeof names / sizeof names[0]; i++)
        if (same_nocase(s, names[i].name)) { *out = names[i].f; return 0; }
    sd_error("unknown number format '%s' (valid: fp32 fp16 bf16 tf32 fp8e4m3 fp8e5m2)", s ? s : "");
    return -1;
}

/* ---- float32 -> nearest format value, as float32 bits ---------------------------------------
 * Each takes a = |x| bits (sign removed) and returns the bits of the rounded magnitude.
 * Normal range: round-to-nearest-even at the format's last mantissa bit by integer addition
 * (a carry out of the mantissa correctly bumps the exponent). Subnormal range: adding a power
 * of two C whose ulp is the format's subnormal spacing makes the float32 adder do the rounding
 * (the sum stays in C's binade; it is stored in a float variable so that it is rounded even
 * where float expressions are evaluated in a wider format), and subtracting C again is exact.
 * Both are computed and one
 * is selected with a mask, so the loops in sd_round_buffer have no branches and vectorise. */

/* c ? a : b for c in {0, 1}, without a branch. */
static inline uint32_t select_u32(uint32_t c, uint32_t a, uint32_t b) {
    uint32_t m = 0u - c;
    return (a & m) | (b & ~m);
}

static inline uint32_t round_abs_f16(uint32_t a) {
    uint32_t n = (a + 0xfffu + ((a >> 13) & 1u)) & ~0x1fffu;         /* 10 mantissa bits */
    n = select_u32(n >= 0x47800000u, 0x7f800000u, n);                /* rounds to >= 2^16: Inf */
    float t = f32_of(a) + 0x1p-1f;                                   /* |x| < 2^-14: spacing 2^-24 */
    uint32_t s = f32_bits(t - 0x1p-1f);
    uint32_t r = select_u32(a < 0x38800000u, s, n);
    return select_u32(a > 0x7f800000u, F32_QNAN, r);
}

static inline uint32_t round_abs_bf16(uint32_t a) {
    /* Same exponent range as float32: one rule covers subnormals and overflow to Inf. */
    uint32_t n = (a + 0x7fffu + ((a >> 16) & 1u)) & 0xffff0000u;
    return select_u32(a > 0x7f800000u, F32_QNAN, n);
}

static inline uint32_t round_abs_tf32(uint32_t a) {
    uint32_t n = (a + 0xfffu + ((a >> 13) & 1u)) & ~0x1fffu;
    return select_u32(a > 0x7f800000u, F32_QNAN, n);
}

static inline uint32_t round_abs_e4m3(uint32_t a) {
    uint32_t n = (a + 0x7ffffu + ((a >> 20) & 1u)) & ~0xfffffu;      /* 3 mantissa bits */
    n = select_u32(n > 0x43e00000u, F32_QNAN, n);                    /* above 448 (i.e. > 464): NaN */
    float t = f32_of(a) + 0x1p14f;                                   /* |x| < 2^-6: spacing 2^-9 */
    uint32_t s = f32_bits(t - 0x1p14f);
    uint32_t r = select_u32(a < 0x3c800000u, s, n);
    return select_u32(a >= 0x7f800000u, F32_QNAN, r);                /* Inf and NaN: NaN */
}

static inline uint32_t round_abs_e5m2(uint32_t a) {
    uint32_t n = (a + 0xfffffu + ((a >> 21) & 1u)) & ~0x1fffffu;     /* 2 mantissa bits */
    n = select_u32(n >= 0x47800000u, 0x7f800000u, n);                /* rounds to >= 2^16: Inf */
    float t = f32_of(a) + 0x1p7f;                                    /* |x| < 2^-14: spacing 2^-16 */
    uint32_t s = f32_bits(t - 0x1p7f);
    uint32_t r = select_u32(a < 0x38800000u, s, n);
    return select_u32(a > 0x7f800000u, F32_QNAN, r);
}

static inline uint32_t round_bits(uint32_t u, sd_format f) {
    uint32_t sign = u & 0x80000000u, a = u ^ sign;
    switch (f) {
    case SD_F16:  return sign | round_abs_f16(a);
    case SD_BF16: return sign | round_abs_bf16(a);
    case SD_TF32: return sign | round_abs_tf32(a);
    case SD_E4M3: return sign | round_abs_e4m3(a);
    case SD_E5M2: return sign | round_abs_e5m2(a);
    default:      return u;
    }
}

float sd_round(float x, sd_format f) { return f32_of(round_bits(f32_bits(x), f)); }

float sd_round_tf32(float x) { return sd_round(x, SD_TF32); }

float sd_trunc_tf32(float x) {
    uint32_t u = f32_bits(x), a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return f32_of((u & 0x80000000u) | F32_QNAN);
    return f32_of(u & ~0x1fffu);   /* drop the 13 low mantissa bits (toward zero) */
}

/* One loop per format, each a plain integer loop. Blocks of 16 with a fixed trip count let
 * gcc -O2 (whose cheap cost model refuses loops needing a remainder loop) vectorise too. */
#define ROUND_ONE(fn, p) do { \
        uint32_t u_; memcpy(&u_, (p), 4); \
        uint32_t s_ = u_ & 0x80000000u; \
        u_ = s_ | fn(u_ ^ s_); \
        memcpy((p), &u_, 4); \
    } while (0)
#define ROUND_LOOP(fn) do { \
        size_t i = 0; \
        for (; i + 16 <= n; i += 16) \
            for (int j = 0; j < 16; j++) ROUND_ONE(fn, &x[i + j]); \
        for (; i < n; i++) ROUND_ONE(fn, &x[i]); \
    } while (0)

void sd_round_buffer(float *x, size_t n, sd_format f) {
    switch (f) {
    case SD_F16:  ROUND_LOOP(round_abs_f16);  break;
    case SD_BF16: ROUND_LOOP(round_abs_bf16); break;
    case SD_TF32: ROUND_LOOP(round_abs_tf32); break;
    case SD_E4M3: ROUND_LOOP(round_abs_e4m3); break;
    case SD_E5M2: ROUND_LOOP(round_abs_e5m2); break;
    default: break;
    }
}

int sd_is_representable(float x, sd_format f) {
    uint32_t u = f32_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 1;   /* every format has a NaN */
    return round_bits(u, f) == u;
}

/* ---- format bits <-> float32 ---------------------------------------------------------------
 * Encoding rounds first (above), then re-packs the now exactly representable value. */

/* Significand (with the implicit bit) and biased exponent of float32 magnitude bits a. */
static inline uint32_t sig_of(uint32_t a) { return (a & 0x7fffffu) | 0x800000u; }

uint16_t sd_f32_to_f16(float x) {
    uint32_t u = f32_bits(x), sign = (u >> 16) & 0x8000u, a = round_abs_f16(u & 0x7fffffffu);
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);                 /* quiet NaN */
    if (a == 0x7f800000u) return (uint16_t)(sign | 0x7c00u);                 /* Inf */
    if (a >= 0x38800000u) return (uint16_t)(sign | ((a - 0x38000000u) >> 13)); /* normal: rebias 127 -> 15 */
    if (a == 0) return (uint16_t)sign;
    return (uint16_t)(sign | (sig_of(a) >> (126 - (a >> 23))));             /* subnormal: |x| / 2^-24 */
}

float sd_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 31u, m = h & 0x3ffu;
    if (e == 31) return f32_of(sign | 0x7f800000u | (m << 13));              /* Inf, NaN (payload kept) */
    if (e == 0) {                                                            /* zero, subnormal: m * 2^-24 */
        float v = (float)m * 0x1p-24f;
        return sign ? -v : v;
    }
    return f32_of(sign | ((e + 112u) << 23) | (m << 13));
}

uint16_t sd_f32_to_bf16(float x) {
    uint32_t u = f32_bits(x), sign = u & 0x80000000u, a = round_abs_bf16(u ^ sign);
    return (uint16_t)((sign | a) >> 16);
}

float sd_bf16_to_f32(uint16_t h) { return f32_of((uint32_t)h << 16); }

uint8_t sd_f32_to_e4m3(float x) {
    uint32_t u = f32_bits(x), sign = (u >> 24) & 0x80u, a = round_abs_e4m3(u & 0x7fffffffu);
    if (a > 0x7f800000u) return (uint8_t)(sign | 0x7fu);                     /* the only NaN */
    if (a >= 0x3c800000u) return (uint8_t)(sign | ((a - 0x3c000000u) >> 20)); /* normal: rebias 127 -> 7 */
    if (a == 0) return (uint8_t)sign;
    return (uint8_t)(sign | (sig_of(a) >> (141 - (a >> 23))));              /* subnormal: |x| / 2^-9 */
}

float sd_e4m3_to_f32(uint8_t b) {
    uint32_t sign = (uint32_t)(b & 0x80u) << 24, e = (b >> 3) & 15u, m = b & 7u;
    if (e == 15 && m == 7) return f32_of(sign | F32_QNAN);
    if (e == 0) {
        float v = (float)m * 0x1p-9f;
        return sign ? -v : v;
    }
    return f32_of(sign | ((e + 120u) << 23) | (m << 20));
}

uint8_t sd_f32_to_e5m2(float x) {
    uint32_t u = f32_bits(x), sign = (u >> 24) & 0x80u, a = round_abs_e5m2(u & 0x7fffffffu);
    if (a > 0x7f800000u) return (uint8_t)(sign | 0x7fu);
    if (a == 0x7f800000u) return (uint8_t)(sign | 0x7cu);
    if (a >= 0x38800000u) return (uint8_t)(sign | ((a - 0x38000000u) >> 21));
    if (a == 0) return (uint8_t)sign;
    return (uint8_t)(sign | (sig_of(a) >> (134 - (a >> 23))));              /* subnormal: |x| / 2^-16 */
}

float sd_e5m2_to_f32(uint8_t b) {
    uint32_t sign = (uint32_t)(b & 0x80u) << 24, e = (b >> 2) & 31u, m = b & 3u;
    if (e == 31) return f32_of(sign | 0x7f800000u | (m << 21));
    if (e == 0) {
        float v = (float)m * 0x1p-16f;
        return sign ? -v : v;
    }
    return f32_of(sign | ((e + 112u) << 23) | (m << 21));
}

/* ---- double -> format rounding (for the emulated arithmetic) ---------------------------------
 * Rounds a double to the nearest value of a format (mant mantissa bits, min normal exponent
 * emin, largest finite value max), with ties to even. *tie tells whether x was exactly halfway
 * between two neighbours (the fma needs to know). */
typedef struct fmt_info { int mant, emin; double max; } fmt_info;
static const fmt_info F16_INFO = { 10, -14, 65504.0 };
static const fmt_info BF16_INFO = { 7, -126, 0x1.fep127 };

static double round_double_to(double x, const fmt_info *f, int *tie) {
    uint64_t u = f64_bits(x), sign = u & 0x8000000000000000ull, a = u ^ sign;
    *tie = 0;
    if (a >= 0x7ff0000000000000ull) return x;                       /* Inf, NaN */
    if (a == 0) return x;
    int e = (int)(a >> 52) - 1023;                                  /* x = sig * 2^(e-52) */
    uint64_t sig = (a & 0xfffffffffffffull) | 0x10000000000000ull;
    if (e == -1023) { e = -1022; sig &= 0xfffffffffffffull; }       /* double subnormal */
    int drop = 52 - f->mant + (e < f->emin ? f->emin - e : 0);      /* low bits of sig to round off */
    int qe = e - 52 + drop;                                         /* exponent of the result's last bit */
    uint64_t q;
    if (drop >= 54) q = 0;                                          /* below half the spacing */
    else {
        uint64_t half = 1ull << (drop - 1), rem = sig & ((half << 1) - 1);
        q = sig >> drop;
        *tie = rem == half;
        if (rem > half || (rem == half && (q & 1))) q++;
    }
    double r = (double)q * pow2i(qe);                               /* exact: q has <= mant+2 bits */
    if (r > f->max) r = HUGE_VAL;                                   /* overflow: Inf */
    return sign ? -r : r;
}

/* Canonical result NaN (quiet, positive): hardware NaN signs differ between platforms. */
static float rounded_result(double r, const fmt_info *f) {
    int tie;
    double v = round_double_to(r, f, &tie);
    return v != v ? f32_of(F32_QNAN) : (float)v;
}

/* ---- emulated binary16 / bfloat16 arithmetic ------------------------------------------------
 * For + - * / sqrt the operation is done in double and rounded once to the format. Sums and
 * products of two binary16 values, and products of two bfloat16 values, are exact in double;
 * otherwise the double result is rounded twice (to double, then to the format), which gives the
 * correctly rounded result because 53 >= 2p + 2 (p = 11 or 8) and double neither overflows nor
 * underflows on these operands (Figueroa, "When is double rounding innocuous?", 1995). */

float sd_f16_add(float a, float b) { return rounded_result((double)a + (double)b, &F16_INFO); }
float sd_f16_sub(float a, float b) { return rounded_result((double)a - (double)b, &F16_INFO); }
float sd_f16_mul(float a, float b) { return rounded_result((double)a * (double)b, &F16_INFO); }
float sd_f16_div(float a, float b) { return rounded_result((double)a / (double)b, &F16_INFO); }
float sd_f16_sqrt(float a) { return rounded_result(sqrt((double)a), &F16_INFO); }
float sd_bf16_add(float a, float b) { return rounded_result((double)a + (double)b, &BF16_INFO); }
float sd_bf16_sub(float a, float b) { return rounded_result((double)a - (double)b, &BF16_INFO); }
float sd_bf16_mul(float a, float b) { return rounded_result((double)a * (double)b, &BF16_INFO); }
float sd_bf16_div(float a, float b) { return rounded_result((double)a / (double)b, &BF16_INFO); }
float sd_bf16_sqrt(float a) { return rounded_result(sqrt((double)a), &BF16_INFO); }

/* s + err == a + b exactly (Knuth's TwoSum; no overflow possible for our operands). */
static double two_sum(double a, double b, double *err) {
    double s = a + b, bb = s - a;
    *err = (a - (s - bb)) + (b - bb);
    return s;
}

/* fma: a*b is exact in double, but a*b + c is not (the exponents may be far apart), and the
 * double-rounding argument above does not cover three operands: rounding a*b + c to double can
 * land exactly on a halfway point of the format (or move off one), flipping the final rounding.
 * So: s = fl(a*b + c) and its exact error t (TwoSum), a*b + c == s + t with |t| <= ulp(s)/2.
 * If s is not a halfway point of the format, s + t rounds like s (a halfway point is itself a
 * double, so s + t cannot lie beyond one that s does not). If s is a halfway point and t != 0,
 * the exact value lies on t's side: step s one double ulp toward t, then round. */
static float fma_in(float a, float b, float c, const fmt_info *f) {
    double p = (double)a * (double)b;                    /* exact */
    double t, s = two_sum(p, (double)c, &t);
    if (!(s - s == 0) || !(p - p == 0)) return rounded_result(p + (double)c, f);   /* Inf, NaN */
    int tie;
    double r = round_double_to(s, f, &tie);
    if (tie && t != 0) {
        uint64_t u = f64_bits(s);
        u = ((s > 0) == (t > 0)) ? u + 1 : u - 1;        /* away from zero when t has s's sign */
        r = round_double_to(f64_of(u), f, &tie);
    }
    return (float)r;
}

float sd_f16_fma(float a, float b, float c) { return fma_in(a, b, c, &F16_INFO); }
float sd_bf16_fma(float a, float b, float c) { return fma_in(a, b, c, &BF16_INFO); }

/* ==============================================================================================
 * Deterministic math. Each function is computed in double from + - * / (and sqrt) in a fixed
 * order; float versions round the double result once, which makes them correctly rounded except
 * when the exact value lies within about 1e-15 (relative) of a float halfway point.
 * ============================================================================================== */

static const double LN2_HI = 0x1.62e42feep-1;          /* 32 bits: k * LN2_HI exact for |k| < 2^21 */
static const double LN2_LO = 0x1.a39ef35793c76p-33;
static const double INV_LN2 = 0x1.71547652b82fep+0;

/* x * 2^k for any integer k in [-2200, 2200], rounded once. */
static double scale2(double x, int k) {
    if (k > 1023) { x *= pow2i(1023); k -= 1023; if (k > 1023) { x *= pow2i(1023); k -= 1023; if (k > 1023) k = 1023; } }
    if (k < -1022) { x *= pow2i(-1022 + 600); k += 1022 - 600; }   /* keep the value normal ... */
    if (k < -1022) { x *= pow2i(-600); k += 600; if (k < -1022) k = -1022; }
    return x * pow2i(k);                                           /* ... and round only here */
}

/* exp(rh + rl) for |rh| <= 0.35, |rl| tiny: Taylor series to degree 13 (remainder < 2^-60
 * relative); 1 + rh is summed exactly so that only the small terms carry rounding errors. */
static double exp_kernel(double rh, double rl) {
    double r = rh + rl;
    double p = 0x1.6124613a86d09p-33;                   /* 1/13! */
    p = p * r + 0x1.1eed8eff8d898p-29;                  /* 1/12! */
    p = p * r + 0x1.ae64567f544e4p-26;                  /* 1/11! */
    p = p * r + 0x1.27e4fb7789f5cp-22;                  /* 1/10! */
    p = p * r + 0x1.71de3a556c734p-19;                  /* 1/9!  */
    p = p * r + 0x1.a01a01a01a01ap-16;                  /* 1/8!  */
    p = p * r + 0x1.a01a01a01a01ap-13;                  /* 1/7!  */
    p = p * r + 0x1.6c16c16c16c17p-10;                  /* 1/6!  */
    p = p * r + 0x1.1111111111111p-7;                   /* 1/5!  */
    p = p * r + 0x1.5555555555555p-5;                   /* 1/4!  */
    p = p * r + 0x1.5555555555555p-3;                   /* 1/3!  */
    p = p * r + 0.5;
    double q = r * r * p;                               /* exp(r) - 1 - r */
    double ae, a = two_sum(1.0, rh, &ae);
    return a + (ae + (rl + q));
}

double sd_exp(double x) {
    if (x != x) return x;
    if (x > 709.8) return HUGE_VAL;
    if (x < -745.2) return 0.0;
    /* x = k ln2 + r, |r| <= ln2/2 (Cody–Waite: k * LN2_HI and x - k * LN2_HI are exact). */
    double k = floor(x * INV_LN2 + 0.5);
    return scale2(exp_kernel(x - k * LN2_HI, -(k * LN2_LO)), (int)k);
}

float sd_expf(float x) { return (float)sd_exp((double)x); }

/* expm1(x) = exp(x) - 1 without cancellation near 0. */
static double expm1_d(double x) {
    if (x > -0.5 && x < 0.5) {
        /* Taylor to degree 17 (remainder < 2^-62 relative on |x| < 0.5). */
        double p = 0x1.952c77030ad4ap-49;               /* 1/17! */
        p = p * x + 0x1.ae7f3e733b81fp-45;              /* 1/16! */
        p = p * x + 0x1.ae7f3e733b81fp-41;              /* 1/15! */
        p = p * x + 0x1.93974a8c07c9dp-37;              /* 1/14! */
        p = p * x + 0x1.6124613a86d09p-33;
        p = p * x + 0x1.1eed8eff8d898p-29;
        p = p * x + 0x1.ae64567f544e4p-26;
        p = p * x + 0x1.27e4fb7789f5cp-22;
        p = p * x + 0x1.71de3a556c734p-19;
        p = p * x + 0x1.a01a01a01a01ap-16;
        p = p * x + 0x1.a01a01a01a01ap-13;
        p = p * x + 0x1.6c16c16c16c17p-10;
        p = p * x + 0x1.1111111111111p-7;
        p = p * x + 0x1.5555555555555p-5;
        p = p * x + 0x1.5555555555555p-3;
        p = p * x + 0.5;
        return x + x * x * p;
    }
    return sd_exp(x) - 1.0;
}

/* a * b == hi + lo exactly (Dekker, with Veltkamp splitting; no fma). */
static double two_prod(double a, double b, double *lo) {
    const double split = 134217729.0;                   /* 2^27 + 1 */
    double ca = split * a, ah = ca - (ca - a), al = a - ah;
    double cb = split * b, bh = cb - (cb - b), bl = b - bh;
    double p = a * b;
    *lo = ((ah * bh - p) + ah * bl + al * bh) + al * bl;
    return p;
}

/* log(x) for finite x > 0 as hi + lo (|lo| <= ulp(hi)/2, about 2^-60 relative error). */
static double log_hilo(double x, double *lo_out) {
    uint64_t xb = f64_bits(x);
    int e = 0;
    if (xb < 0x0010000000000000ull) { xb = f64_bits(x * 0x1p54); e = -54; }   /* subnormal */
    e += (int)(xb >> 52) - 1023;
    uint64_t mbits = (xb & 0xfffffffffffffull) | 0x3ff0000000000000ull;     /* m in [1, 2) */
    if (mbits > 0x3ff6a09e667f3bcdull) { mbits -= 0x0010000000000000ull; e++; }   /* m in [sqrt(1/2), sqrt(2)) */
    double f = f64_of(mbits) - 1.0;                     /* exact */
    /* log(1+f) = 2 atanh(s) = 2s + s R, s = f/(2+f), R = 2s^2/3 + 2s^4/5 + ... (|s| < 0.172).
     * u = 2s is formed as a double-double (u + ulo) from the exact residual of the division. */
    double d = 2.0 + f, dlo = (2.0 - d) + f;             /* 2 + f == d + dlo exactly */
    double u = (f + f) / d, pe, p = two_prod(u, d, &pe);
    double ulo = ((((f + f) - p) - pe) - u * dlo) / d;   /* (2f - u (d + dlo)) / (d + dlo) */
    /* The rest, s R = (2/3) s^3 + s^5 Q(z): the leading term is a double-double too (with
     * s^3's dependence on ulo), leaving rounding errors only in s^5 Q < 6e-5. */
    double s = 0.5 * u, zl, z = two_prod(s, s, &zl);    /* s^2 = z + zl */
    double cl, c = two_prod(s, z, &cl);                 /* s^3 = c + cl */
    cl += s * zl;
    double tl, t = two_prod(c, 0x1.5555555555555p-1, &tl);   /* (2/3) s^3 = t + tl */
    tl += cl * 0x1.5555555555555p-1 + c * 0x1.5555555555555p-55;
    double Q = 0x1.47ae147ae147bp-4;                    /* 2/25 */
    Q = Q * z + 0x1.642c8590b2164p-4;                   /* 2/23 */
    Q = Q * z + 0x1.8618618618618p-4;                   /* 2/21 */
    Q = Q * z + 0x1.af286bca1af28p-4;                   /* 2/19 */
    Q = Q * z + 0x1.e1e1e1e1e1e1ep-4;                   /* 2/17 */
    Q = Q * z + 0x1.1111111111111p-3;                   /* 2/15 */
    Q = Q * z + 0x1.3b13b13b13b14p-3;                   /* 2/13 */
    Q = Q * z + 0x1.745d1745d1746p-3;                   /* 2/11 */
    Q = Q * z + 0x1.c71c71c71c71cp-3;                   /* 2/9 */
    Q = Q * z + 0x1.2492492492492p-2;                   /* 2/7 */
    Q = Q * z + 0x1.999999999999ap-2;                   /* 2/5 */
    double rest = (s * z) * z * Q;
    double de = (double)e, err1, err2;
    double hi = two_sum(de * LN2_HI, u, &err1);         /* de * LN2_HI exact */
    hi = two_sum(hi, t, &err2);
    double lo = (((err1 + err2) + de * LN2_LO) + (ulo + z * ulo)) + (tl + rest);
    double h = hi + lo;
    *lo_out = lo - (h - hi);
    return h;
}

double sd_log(double x) {
    if (x != x) return x;
    if (x < 0) return f64_of(0x7ff8000000000000ull);    /* NaN */
    if (x == 0) return -HUGE_VAL;
    if (x == HUGE_VAL) return x;
    double lo;
    return log_hilo(x, &lo);
}

float sd_logf(float x) { return (float)sd_log((double)x); }

/* x^y = exp(y log x) with log x and y log x as double-doubles (log to about 2^-64). */
double sd_pow(double x, double y) {
    if (x != x || y != y) return x + y;
    if (y == 0 || x == 1) return 1.0;
    if (x < 0) return f64_of(0x7ff8000000000000ull);
    if (x == 0) return y > 0 ? 0.0 : HUGE_VAL;
    if (x == HUGE_VAL) return y > 0 ? HUGE_VAL : 0.0;
    double llo, lhi = log_hilo(x, &llo);
    double t = y * lhi;
    if (t > 710) return HUGE_VAL;
    if (t < -746) return 0.0;
    double tlo, thi = two_prod(y, lhi, &tlo);           /* y log x = thi + tlo, to ~2^-100 */
    tlo += y * llo;
    double e = sd_exp(thi);
    return e + e * tlo;                                 /* exp(thi + tlo) = exp(thi)(1 + tlo) */
}

/* ---- erf, tanh ------------------------------------------------------------------------------ */

float sd_erff(float xf) {
    double x = (double)xf;
    if (x != x) return xf;
    int neg = (f32_bits(xf) >> 31) != 0;
    double a = neg ? -x : x;
    double r;
    if (a == 0) return xf;                              /* +-0 */
    if (a >= 4.0) r = 1.0;                              /* erf(4) = 1 - 1.5e-8: 1.0f */
    else {
        /* erf(a) = 2/sqrt(pi) exp(-a^2) sum_n a (2a^2)^n / (1*3*...*(2n+1)): positive terms,
         * no cancellation. a^2 is exact in double (a has 24 bits). */
        double a2 = a * a, two_a2 = a2 + a2, term = a, sum = a;
        for (int n = 1; n < 200; n++) {
            term = term * two_a2 / (double)(2 * n + 1);
            sum += term;
            if (term < sum * 0x1p-58) break;
        }
        r = 0x1.20dd750429b6dp+0 * sum * sd_exp(-a2);
    }
    float f = (float)r;
    return neg ? -f : f;
}

/* erf(a), a >= 0, in double: the series above (positive terms, no cancellation). */
static double erf_series(double a) {
    double a2 = a * a, two_a2 = a2 + a2, term = a, sum = a;
    for (int n = 1; n < 400; n++) {
        term = term * two_a2 / (double)(2 * n + 1);
        sum += term;
        if (term < sum * 0x1p-58) break;
    }
    return 0x1.20dd750429b6dp+0 * sum * sd_exp(-a2);
}

/* erfc(a), a >= 0, in double. Below 3: 1 - erf (erfc(3) = 2.2e-5, so at most ~1e-11 relative is
 * lost); from 3 on the continued fraction erfc(a) = exp(-a^2)/sqrt(pi) / (a + (1/2)/(a + 1/(a +
 * (3/2)/(a + ...)))), evaluated backwards, which has no cancellation at all. */
static double erfc_pos(double a) {
    if (a < 3.0) return 1.0 - erf_series(a);
    double t = a;
    for (int k = 120; k >= 1; k--) t = a + (k * 0.5) / t;
    return sd_exp(-a * a) / (0x1.c5bf891b4ef6bp+0 * t);   /* sqrt(pi) */
}

float sd_gelu_erff(float xf) {
    double x = (double)xf;
    if (x != x) return xf;
    if (x == 0) return xf;
    if (x > 10.0) return xf;                             /* Phi(10) = 1 - 7.6e-24 */
    if (x < -40.0) return -0.0f;                         /* x Phi(x) below the smallest float */
    double a = (x < 0 ? -x : x) * 0x1.6a09e667f3bcdp-1;  /* |x| / sqrt 2 */
    double phi = x < 0 ? 0.5 * erfc_pos(a) : 1.0 - 0.5 * erfc_pos(a);
    return (float)(x * phi);
}

float sd_gelu_tanhf(float xf) {
    double x = (double)xf;
    if (x != x) return xf;
    double u = 0x1.9884533d43651p-1 * (x + 0.044715 * x * x * x);   /* sqrt(2/pi) (x + 0.044715 x^3) */
    if (u < -300.0) return x < 0 ? -0.0f : 0.0f;
    return (float)(x / (1.0 + sd_exp(-2.0 * u)));    /* 0.5 x (1 + tanh u) = x sigmoid(2u) */
}

float sd_tanhf(float xf) {
    double x = (double)xf;
    if (x != x) return xf;
    int neg = (f32_bits(xf) >> 31) != 0;
    double a = neg ? -x : x, r;
    if (a > 10.0) r = 1.0;                              /* 1 - tanh(10) < 2^-25: 1.0f */
    else {
        double e = expm1_d(a + a);                      /* tanh a = (e^2a - 1) / (e^2a + 1) */
        r = e / (e + 2.0);
    }
    float f = (float)r;
    return neg ? -f : f;
}

/* ---- sin, cos ------------------------------------------------------------------------------- */

/* 2/pi: bits 1..1344 of its binary fraction, 32 per word (for Payne–Hanek reduction). */
static const uint32_t TWO_OVER_PI[42] = {
    0xa2f9836e, 0x4e441529, 0xfc2757d1, 0xf534ddc0, 0xdb629599, 0x3c439041, 0xfe5163ab,
    0xdebbc561, 0xb7246e3a, 0x424dd2e0, 0x06492eea, 0x09d1921c, 0xfe1deb1c, 0xb129a73e,
    0xe88235f5, 0x2ebb4484, 0xe99c7026, 0xb45f7e41, 0x3991d639, 0x835339f4, 0x9c845f8b,
    0xbdf9283b, 0x1ff897ff, 0xde05980f, 0xef2f118b, 0x5a0a6d1f, 0x6d367ecf, 0x27cb09b7,
    0x4f463f66, 0x9e5fea2d, 0x7527bac7, 0xebe5f17b, 0x3d0739f7, 0x8a5292ea, 0x6bfb5fb1,
    0x1f8d5d08, 0x56033046, 0xfc7b6bab, 0xf0cfbc20, 0x9af4361d, 0xa9e39161, 0x5ee61b08,
};
/* pi/2 = PIO2_1 + PIO2_2 + PIO2_3 + PIO2_3T; the first three have 33 bits, so k * PIO2_i is
 * exact for |k| < 2^20. */
static const double PIO2_1 = 0x1.921fb544p+0, PIO2_2 = 0x1.0b4611a6p-34, PIO2_3 = 0x1.3198a2ep-69;
static const double PIO2_3T = 0x1.b839a252049c1p-104;
static const double PIO2_HI = 0x1.921fb54442d18p+0, PIO2_LO = 0x1.1a62633145c07p-54;
static const double TWO_OVER_PI_D = 0x1.45f306dc9c883p-1;

/* Payne–Hanek: |x| >= 2^20 finite. x = m 2^E; x * 2/pi = m * (bits of 2/pi) * 2^E, of which
 * only the integer part mod 4 and the fraction matter: bits of 2/pi of weight 2^-j with
 * j <= E - 2 give multiples of 4 and are skipped. 8 words (256 bits) of 2/pi from there on
 * leave a truncation error below 2^-170 in the fraction. */
static int rem_pio2_large(double x, double *hi, double *lo) {
    uint64_t u = f64_bits(x);
    int E = (int)((u >> 52) & 0x7ff) - 1075;
    uint64_t m = (u & 0xfffffffffffffull) | 0x10000000000000ull;
    int w0 = E - 2 >= 0 ? (E - 2) / 32 : 0;
    /* P = m * B, B = words w0 .. w0+7 (big-endian in the table), little-endian 32-bit limbs. */
    uint32_t P[10] = { 0 };
    uint32_t m0 = (uint32_t)m, m1 = (uint32_t)(m >> 32);
    for (int i = 0; i < 8; i++) {
        uint64_t b = TWO_OVER_PI[w0 + 7 - i];            /* limb i of B */
        uint64_t carry = 0;
        for (int j = 0; j < 2; j++) {
            uint64_t t = (uint64_t)P[i + j] + b * (j ? m1 : m0) + carry;
            P[i + j] = (uint32_t)t;
            carry = t >> 32;
        }
        for (int k = i + 2; carry && k < 10; k++) {
            uint64_t t = (uint64_t)P[k] + carry;
            P[k] = (uint32_t)t;
            carry = t >> 32;
        }
    }
    int sh = 32 * (w0 + 8) - E;                         /* x * 2/pi = P / 2^sh (+ tiny) */
    #define PBIT(pos) ((P[(pos) >> 5] >> ((pos) & 31)) & 1u)
    int q = (int)(PBIT(sh) | (PBIT(sh + 1) << 1));
    /* The fraction's top 192 bits as 6 limbs (F[5] most significant). */
    uint32_t F[6];
    for (int i = 0; i < 6; i++) {
        int pos = sh - 192 + 32 * i, limb = pos >> 5, off = pos & 31;
        uint64_t v = (uint64_t)P[limb] | ((limb + 1 < 10 ? (uint64_t)P[limb + 1] : 0) << 32);
        F[i] = (uint32_t)(v >> off);
    }
    #undef PBIT
    int negative = 0;
    if (F[5] & 0x80000000u) {                           /* fraction >= 1/2: use fraction - 1 */
        negative = 1; q = (q + 1) & 3;
        uint64_t borrow = 0;
        for (int i = 0; i < 6; i++) {                   /* F = 2^192 - F */
            uint64_t t = 0 - (uint64_t)F[i] - borrow;
            F[i] = (uint32_t)t;
            borrow = (t >> 32) & 1u;
        }
    }
    /* Normalise: shift so the leading one is bit 191, then split into 53 + 53 bits. */
    int lz = 0;
    while (lz < 160 && !(F[5 - lz / 32] & (0x80000000u >> (lz % 32)))) lz++;
    uint64_t top = 0, next = 0;                         /* bits 191-lz .. : 64 + 64 bits */
    for (int b = 0; b < 128; b++) {
        int pos = 191 - lz - b;
        uint32_t bit = pos >= 0 ? (F[pos >> 5] >> (pos & 31)) & 1u : 0;
        if (b < 64) top = (top << 1) | bit; else next = (next << 1) | bit;
    }
    double fh = (double)(top >> 11) * pow2i(-53 - lz);                                   /* 53 bits */
    double fl = (double)(((top & 0x7ffull) << 42) | (next >> 22)) * pow2i(-106 - lz);    /* 53 bits */
    double plo, ph = two_prod(fh, PIO2_HI, &plo);
    plo += fh * PIO2_LO + fl * PIO2_HI;
    double h = ph + plo;
    double l = plo - (h - ph);
    if (negative) { h = -h; l = -l; }
    if (x < 0) { h = -h; l = -l; q = (4 - q) & 3; }
    *hi = h; *lo = l;
    return q;
}

/* x = q pi/2 + (hi + lo), |hi + lo| <= about pi/4; returns q mod 4. */
static int rem_pio2(double x, double *hi, double *lo) {
    double ax = x < 0 ? -x : x;
    if (ax <= 0x1.921fb54442d18p-1) { *hi = x; *lo = 0; return 0; }
    if (ax < 0x1p20) {
        /* Cody–Waite in four parts; x - k PIO2_1 is exact (Sterbenz), the rest is tracked
         * as a double-double. */
        double k = floor(x * TWO_OVER_PI_D + 0.5);
        double t = x - k * PIO2_1;
        double err, s = two_sum(t, -(k * PIO2_2), &err);
        double l = (err - k * PIO2_3) - k * PIO2_3T;
        double h = two_sum(s, l, &l);
        *hi = h; *lo = l;
        return (((int)k % 4) + 4) % 4;
    }
    return rem_pio2_large(x, hi, lo);
}

/* sin(x + y) for |x| <= ~pi/4, |y| tiny: Taylor series to x^21. */
static double sin_kernel(double x, double y) {
    double z = x * x;
    double p = 0x1.71b8ef6dcf572p-66;                   /* 1/21! */
    p = p * z - 0x1.2f49b46814157p-57;                  /* -1/19! */
    p = p * z + 0x1.952c77030ad4ap-49;                  /* 1/17! */
    p = p * z - 0x1.ae7f3e733b81fp-41;                  /* -1/15! */
    p = p * z + 0x1.6124613a86d09p-33;                  /* 1/13! */
    p = p * z - 0x1.ae64567f544e4p-26;                  /* -1/11! */
    p = p * z + 0x1.71de3a556c734p-19;                  /* 1/9! */
    p = p * z - 0x1.a01a01a01a01ap-13;                  /* -1/7! */
    p = p * z + 0x1.1111111111111p-7;                   /* 1/5! */
    p = p * z - 0x1.5555555555555p-3;                   /* -1/3! */
    return x + (x * z * p + y * (1.0 - 0.5 * z));      /* sin x + y cos x */
}

/* cos(x + y) for |x| <= ~pi/4: Taylor series to x^22; 1 - x^2/2 is summed with its error. */
static double cos_kernel(double x, double y) {
    double z = x * x;
    double p = -0x1.0ce396db7f853p-70;                  /* -1/22! */
    p = p * z + 0x1.e542ba4020225p-62;                  /* 1/20! */
    p = p * z - 0x1.6827863b97d97p-53;                  /* -1/18! */
    p = p * z + 0x1.ae7f3e733b81fp-45;                  /* 1/16! */
    p = p * z - 0x1.93974a8c07c9dp-37;                  /* -1/14! */
    p = p * z + 0x1.1eed8eff8d898p-29;                  /* 1/12! */
    p = p * z - 0x1.27e4fb7789f5cp-22;                  /* -1/10! */
    p = p * z + 0x1.a01a01a01a01ap-16;                  /* 1/8! */
    p = p * z - 0x1.6c16c16c16c17p-10;                  /* -1/6! */
    p = p * z + 0x1.5555555555555p-5;                   /* 1/4! */
    double hz = 0.5 * z, w = 1.0 - hz;
    return w + (((1.0 - w) - hz) + (z * z * p - x * y));
}

double sd_sin(double x) {
    double ax = x < 0 ? -x : x;
    if (ax < 0x1p-26) return x;                         /* sin x = x to double precision (keeps -0) */
    if (!(x - x == 0)) return f64_of(0x7ff8000000000000ull);   /* Inf, NaN */
    double hi, lo;
    switch (rem_pio2(x, &hi, &lo)) {
    case 0: return sin_kernel(hi, lo);
    case 1: return cos_kernel(hi, lo);
    case 2: return -sin_kernel(hi, lo);
    default: return -cos_kernel(hi, lo);
    }
}

double sd_cos(double x) {
    if (!(x - x == 0)) return f64_of(0x7ff8000000000000ull);
    double hi, lo;
    switch (rem_pio2(x, &hi, &lo)) {
    case 0: return cos_kernel(hi, lo);
    case 1: return -sin_kernel(hi, lo);
    case 2: return -cos_kernel(hi, lo);
    default: return sin_kernel(hi, lo);
    }
}

float sd_sinf(float x) { return (float)sd_sin((double)x); }
float sd_cosf(float x) { return (float)sd_cos((double)x); }
