/* tests/test_fp16.c — number formats: conversions, rounding, emulated arithmetic.
 *
 * Every check compares fp16.c with an independent reference written here with a different
 * algorithm: explicit integer significands, shifts, guard and sticky bits, exact integer sums
 * and quotients. By default a fixed slice runs (seconds); SDREF_EXHAUSTIVE=1 runs all 2^32
 * float32 inputs per format, all 2^32 binary16 operand pairs for add, mul and div, 2^27
 * bfloat16 pairs per operation and 10^8 fma triples per format (about 17 cpu-minutes). */
#include "test.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint32_t fbits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float ffrom(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static int is_nan_f(float f) { return f != f; }

/* ---- the reference format description ------------------------------------------------------ */

typedef struct ref_fmt {
    const char *name;
    int ebits, mbits, bias;
    int e4m3;          /* E4M3FN: no Inf, top exponent is normal except mantissa 111 = NaN */
} ref_fmt;
static const ref_fmt R_F16 = { "fp16", 5, 10, 15, 0 };
static const ref_fmt R_BF16 = { "bf16", 8, 7, 127, 0 };
static const ref_fmt R_TF32 = { "tf32", 8, 10, 127, 0 };
static const ref_fmt R_E4M3 = { "fp8e4m3", 4, 3, 7, 1 };
static const ref_fmt R_E5M2 = { "fp8e5m2", 5, 2, 15, 0 };

static uint32_t ref_nan(const ref_fmt *f, uint32_t sign) {
    uint32_t top = sign << (f->ebits + f->mbits);
    if (f->e4m3 || f->mbits == 2) return top | 0x7f;     /* FP8 NaN: all ones (as PyTorch) */
    return top | (((1u << f->ebits) - 1) << f->mbits) | (1u << (f->mbits - 1));   /* quiet */
}
static uint32_t ref_inf(const ref_fmt *f, uint32_t sign) {
    if (f->e4m3) return ref_nan(f, sign);   /* E4M3FN overflows to NaN (PyTorch) */
    return (sign << (f->ebits + f->mbits)) | (((1u << f->ebits) - 1) << f->mbits);
}

/* Position of the highest set bit of v != 0 (binary search). */
static int msb64(uint64_t v) {
    int r = 0;
    for (int s = 32; s; s >>= 1)
        if (v >> s) { v >>= s; r += s; }
    return r;
}

/* Round the exact value sign * mag * 2^scale (+ a sticky remainder below mag's last bit when
 * sticky != 0; mag must then have at least 2 bits below the rounding position) to the format,
 * returning its bits. Explicit guard/sticky logic on integers. mag is 128 bits: hi:lo. */
static uint32_t ref_round(const ref_fmt *f, uint32_t sign, uint64_t hi, uint64_t lo, int scale, int sticky) {
    if (hi == 0 && lo == 0) return sign << (f->ebits + f->mbits);
    int msb = hi ? 64 + msb64(hi) : msb64(lo);
    int emin = 1 - f->bias;
    int top = scale + msb;                                   /* exponent of the leading bit */
    int qexp = (top > emin ? top : emin) - f->mbits;         /* exponent of the last kept bit */
    int shift = qexp - scale;                                /* bits to drop */
    uint64_t q;
    if (shift <= 0) {
        q = lo << -shift;                                    /* exact; small values only */
    } else {
        int guard, rest;
        if (shift > 127) { q = 0; guard = 0; rest = 1; }
        else {
            /* q = mag >> shift; guard = bit shift-1; rest = bits below */
            if (shift >= 64) q = hi >> (shift - 64);
            else q = (lo >> shift) | (shift ? hi << (64 - shift) : 0);
            int g = shift - 1;
            guard = g >= 64 ? (int)((hi >> (g - 64)) & 1) : (int)((lo >> g) & 1);
            if (g >= 64) rest = lo != 0 || (hi & ((1ull << (g - 64)) - 1)) != 0;
            else rest = (lo & ((1ull << g) - 1)) != 0;
        }
        rest |= sticky;
        if (guard && (rest || (q & 1))) q++;
    }
    if (q >> (f->mbits + 1)) { q >>= 1; qexp++; }            /* carried into the next binade */
    int emax_field = (1 << f->ebits) - 1;
    if (q < (1ull << f->mbits))                              /* subnormal or zero */
        return (sign << (f->ebits + f->mbits)) | (uint32_t)q;
    int efield = qexp + f->mbits + f->bias;
    uint32_t mant = (uint32_t)(q - (1ull << f->mbits));
    if (f->e4m3) {
        if (efield > emax_field || (efield == emax_field && mant == 7)) return ref_nan(f, sign);
    } else if (efield >= emax_field) return ref_inf(f, sign);
    return (sign << (f->ebits + f->mbits)) | ((uint32_t)efield << f->mbits) | mant;
}

/* Reference float32 -> format bits. */
static uint32_t ref_from_f32(const ref_fmt *f, uint32_t u) {
    uint32_t sign = u >> 31, E = (u >> 23) & 255, M = u & 0x7fffff;
    if (E == 255) return M ? ref_nan(f, sign) : ref_inf(f, sign);
    if (E == 0) return ref_round(f, sign, 0, M, -149, 0);
    return ref_round(f, sign, 0, M | 0x800000, (int)E - 150, 0);
}

/* Reference format bits -> value (as double, via ldexp: an independent decoder). */
static double ref_value(const ref_fmt *f, uint32_t b) {
    uint32_t sign = (b >> (f->ebits + f->mbits)) & 1, e = (b >> f->mbits) & ((1u << f->ebits) - 1);
    uint32_t m = b & ((1u << f->mbits) - 1);
    double v;
    if (f->e4m3 && e == 15 && m == 7) return NAN;
    if (!f->e4m3 && e == (1u << f->ebits) - 1) v = m ? NAN : INFINITY;
    else if (e == 0) v = ldexp((double)m, 1 - f->bias - f->mbits);
    else v = ldexp((double)(m | (1u << f->mbits)), (int)e - f->bias - f->mbits);
    return sign ? -v : v;
}

/* ---- conversions ----------------------------------------------------------------------------- */

/* The fast routine's bits for format k, and the same value as rounded float32 bits. */
static uint32_t fast_bits(int k, float x) {
    switch (k) {
    case 0: return sd_f32_to_f16(x);
    case 1: return sd_f32_to_bf16(x);
    case 2: return fbits(sd_round_tf32(x)) >> 13;
    case 3: return sd_f32_to_e4m3(x);
    default: return sd_f32_to_e5m2(x);
    }
}
static const ref_fmt *const conv_fmt[5] = { &R_F16, &R_BF16, &R_TF32, &R_E4M3, &R_E5M2 };
static const sd_format conv_sd[5] = { SD_F16, SD_BF16, SD_TF32, SD_E4M3, SD_E5M2 };

/* Format bits -> float32 with fp16.c's decoders (checked on every pattern against the
 * reference decoder in test_round_trips). */
static float decode_bits(int k, uint32_t b) {
    switch (k) {
    case 0: return sd_f16_to_f32((uint16_t)b);
    case 1: return sd_bf16_to_f32((uint16_t)b);
    case 2: return ffrom(b << 13);
    case 3: return sd_e4m3_to_f32((uint8_t)b);
    default: return sd_e5m2_to_f32((uint8_t)b);
    }
}

/* One input: conversion bits equal the reference, and sd_round gives the same value. */
static int conv_ok(int k, uint32_t u) {
    float x = ffrom(u);
    uint32_t want = ref_from_f32(conv_fmt[k], u);
    if (k == 2) want &= 0x7ffff;                   /* tf32 as the top 19 bits of a float32 */
    if (fast_bits(k, x) != want) return 0;
    if (k == 2 && x == x && fbits(sd_trunc_tf32(x)) != (u & ~0x1fffu)) return 0;   /* truncation */
    float v = decode_bits(k, want), r = sd_round(x, conv_sd[k]);
    if (v != v) return is_nan_f(r) && (fbits(r) >> 31) == (u >> 31);
    return fbits(r) == fbits(v);
}

/* Check inputs lo, lo+step, ... below 2^32 for all formats (OpenMP over chunks). */
static void check_conversions_range(uint64_t step, uint64_t *bad, uint32_t *first_bad) {
    for (int k = 0; k < 5; k++) {
        uint64_t nbad = 0;
        uint32_t fb = 0;
        int64_t nchunks = (int64_t)((0x100000000ull / step + 65535) / 65536);
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 16) reduction(+:nbad)
#endif
        for (int64_t c = 0; c < nchunks; c++) {
            for (uint64_t i = (uint64_t)c * 65536; i < (uint64_t)(c + 1) * 65536; i++) {
                uint64_t u = i * step;
                if (u > 0xffffffffull) break;
                if (!conv_ok(k, (uint32_t)u)) {
                    nbad++;
#ifdef _OPENMP
#pragma omp critical
#endif
                    fb = (uint32_t)u;
                }
            }
        }
        bad[k] += nbad;
        if (nbad) first_bad[k] = fb;
    }
}

/* Edge regions: in every binade and both signs, the mantissas around each format's rounding
 * points (halfway patterns and their neighbours) and the ends of the binade. */
static void check_conversions_edges(uint64_t *bad, uint32_t *first_bad, uint64_t *count) {
    static const int drop[5] = { 13, 16, 13, 20, 21 };
    for (int k = 0; k < 5; k++) {
        for (uint32_t s = 0; s < 2; s++)
            for (uint32_t E = 0; E < 256; E++)
                for (uint32_t j = 0; j < 512; j++) {
                    uint32_t base = (s << 31) | (E << 23);
                    uint32_t pick[6];
                    uint32_t kk = (j * 2654435761u) & 0x7fffff;
                    uint32_t half = 1u << (drop[k] - 1);
                    uint32_t m = (kk & ~((half << 1) - 1)) | half;     /* exactly halfway at 'drop' */
                    pick[0] = m; pick[1] = m - 1; pick[2] = (m + 1) & 0x7fffff;
                    pick[3] = j; pick[4] = 0x7fffff - j;                /* binade ends */
                    pick[5] = (j << 14) & 0x7fffff;                     /* subnormal spacing patterns */
                    for (int p = 0; p < 6; p++) {
                        uint32_t u = base | (pick[p] & 0x7fffff);
                        (*count)++;
                        if (!conv_ok(k, u)) { bad[k]++; first_bad[k] = u; }
                    }
                }
    }
}

static void test_conversions(void) {
    int exhaustive = env_flag("SDREF_EXHAUSTIVE");
    uint64_t bad[5] = { 0 }, edge_count = 0;
    uint32_t first_bad[5] = { 0 };
    uint64_t step = exhaustive ? 1 : 997;
    clock_t t0 = clock();
    check_conversions_range(step, bad, first_bad);
    check_conversions_edges(bad, first_bad, &edge_count);
    double cpu = (double)(clock() - t0) / CLOCKS_PER_SEC;
    for (int k = 0; k < 5; k++)
        CHECK(bad[k] == 0, "%s conversion: %llu inputs differ from the reference (e.g. 0x%08x)",
              conv_fmt[k]->name, (unsigned long long)bad[k], first_bad[k]);
    fprintf(stderr, "  fp16: conversions f32->{fp16,bf16,tf32,e4m3,e5m2}: %llu inputs each (every %lluth of 2^32) "
            "+ %llu edge inputs, all equal to the reference (%.1f s cpu)\n",
            (unsigned long long)(0x100000000ull / step), (unsigned long long)step,
            (unsigned long long)edge_count / 5, cpu);
}

/* Specific values named in the format definitions. */
static void test_conversion_values(void) {
    CHECK(sd_f32_to_f16(65504.0f) == 0x7bff, "65504 -> 0x7bff");
    CHECK(sd_f32_to_f16(65519.99f) == 0x7bff, "65519.99 stays finite");
    CHECK(sd_f32_to_f16(65520.0f) == 0x7c00, "65520 -> Inf");
    CHECK(sd_f32_to_f16(0x1p-24f) == 0x0001, "min subnormal");
    CHECK(sd_f32_to_f16(0x1p-25f) == 0x0000, "2^-25 ties to 0");
    CHECK(sd_f32_to_f16(0x1.000002p-25f) == 0x0001, "just above 2^-25 -> min subnormal");
    CHECK(sd_f32_to_f16(-0.0f) == 0x8000, "-0");
    CHECK(sd_f32_to_f16(-NAN) == 0xfe00 && sd_f32_to_f16(NAN) == 0x7e00, "NaN keeps sign, quiet");
    CHECK(sd_f32_to_f16(ffrom(0x7f800001)) == 0x7e00, "signalling NaN -> quiet NaN");
    CHECK(sd_f32_to_bf16(1.00390625f) == 0x3f80, "bf16 tie to even (down)");
    CHECK(sd_f32_to_bf16(1.01171875f) == 0x3f82, "bf16 tie to even (up)");
    CHECK(sd_f32_to_bf16(ffrom(0x7f7fffff)) == 0x7f80, "bf16 overflow -> Inf");
    CHECK(sd_f32_to_bf16(ffrom(0x00008000)) == 0x0000 && sd_f32_to_bf16(ffrom(0x00018000)) == 0x0002,
          "bf16 subnormal ties");
    /* E4M3FN: max 448; 464 is the tie between 448 and the (NaN) encoding 480: even -> 448;
     * anything above 464 becomes NaN, as PyTorch's fp8e4m3fn_from_fp32_value does. */
    CHECK(sd_f32_to_e4m3(448.0f) == 0x7e, "e4m3 448");
    CHECK(sd_f32_to_e4m3(464.0f) == 0x7e, "e4m3 464 -> 448");
    CHECK(sd_f32_to_e4m3(464.01f) == 0x7f, "e4m3 464.01 -> NaN");
    CHECK(sd_f32_to_e4m3(-1e6f) == 0xff, "e4m3 -1e6 -> NaN with sign");
    CHECK(sd_f32_to_e4m3(INFINITY) == 0x7f, "e4m3 Inf -> NaN");
    CHECK(sd_f32_to_e4m3(0x1p-9f) == 0x01 && sd_f32_to_e4m3(0x1p-10f) == 0x00 && sd_f32_to_e4m3(0x1.8p-10f) == 0x01,
          "e4m3 subnormals");
    CHECK(sd_e4m3_to_f32(0x7e) == 448.0f && is_nan_f(sd_e4m3_to_f32(0x7f)) && sd_e4m3_to_f32(0x01) == 0x1p-9f,
          "e4m3 decode");
    CHECK(sd_f32_to_e5m2(57344.0f) == 0x7b && sd_f32_to_e5m2(61439.0f) == 0x7b && sd_f32_to_e5m2(61440.0f) == 0x7c,
          "e5m2 max, overflow at 61440 -> Inf");
    CHECK(sd_f32_to_e5m2(0x1p-16f) == 0x01 && is_nan_f(sd_e5m2_to_f32(0x7d)), "e5m2 subnormal, NaN");
    CHECK(sd_round_tf32(1.0f + 0x1p-11f) == 1.0f && sd_round_tf32(1.0f + 0x1.8p-10f) == 1.0f + 0x1p-9f,
          "tf32 ties to even");
    CHECK(sd_trunc_tf32(1.0f + 0x1.ffp-10f) == 1.0f + 0x1p-10f && sd_trunc_tf32(-1.0f - 0x1.ffp-10f) == -1.0f - 0x1p-10f,
          "tf32 truncation toward zero");
    CHECK(sd_round(1.0f + 0x1p-23f, SD_F32) == 1.0f + 0x1p-23f, "fp32 identity");
}

/* Every bit pattern of the 16- and 8-bit formats decodes exactly and re-encodes to itself. */
static void test_round_trips(void) {
    int bad16 = 0, badb = 0, bad8 = 0, badv = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float x = sd_f16_to_f32((uint16_t)h);
        double v = ref_value(&R_F16, h);
        if (v == v ? (double)x != v || (fbits(x) >> 31) != (h >> 15) : !is_nan_f(x)) badv++;
        uint16_t back = sd_f32_to_f16(x);
        if (v == v ? back != h : ((back & 0x7c00) != 0x7c00 || !(back & 0x3ff))) bad16++;
        float y = sd_bf16_to_f32((uint16_t)h);
        double w = ref_value(&R_BF16, h);
        if (w == w ? (double)y != w : !is_nan_f(y)) badv++;
        uint16_t bb = sd_f32_to_bf16(y);
        if (w == w ? bb != h : ((bb & 0x7f80) != 0x7f80 || !(bb & 0x7f))) badb++;
        if (!sd_is_representable(x, SD_F16) || !sd_is_representable(y, SD_BF16)) badv++;
    }
    for (uint32_t b = 0; b < 256; b++) {
        float x = sd_e4m3_to_f32((uint8_t)b), y = sd_e5m2_to_f32((uint8_t)b);
        double vx = ref_value(&R_E4M3, b), vy = ref_value(&R_E5M2, b);
        if (vx == vx ? (double)x != vx || sd_f32_to_e4m3(x) != b : !is_nan_f(x) || (sd_f32_to_e4m3(x) & 0x7f) != 0x7f) bad8++;
        if (vy == vy ? (double)y != vy || sd_f32_to_e5m2(y) != b : !is_nan_f(y) || (sd_f32_to_e5m2(y) & 0x7c) != 0x7c) bad8++;
        if (!sd_is_representable(x, SD_E4M3) || !sd_is_representable(y, SD_E5M2)) badv++;
    }
    CHECK(bad16 == 0, "fp16 round trip: %d patterns changed", bad16);
    CHECK(badb == 0, "bf16 round trip: %d patterns changed", badb);
    CHECK(bad8 == 0, "fp8 round trip: %d patterns changed", bad8);
    CHECK(badv == 0, "decoded values differ from the reference decoder: %d", badv);
    CHECK(!sd_is_representable(1.0f + 0x1p-11f, SD_F16) && !sd_is_representable(65536.0f, SD_F16) &&
          sd_is_representable(INFINITY, SD_F16) && !sd_is_representable(INFINITY, SD_E4M3) &&
          !sd_is_representable(0x1p-25f, SD_F16) && sd_is_representable(0x1p-133f, SD_BF16),
          "sd_is_representable on chosen values");
}

/* sd_round_buffer equals sd_round element by element, for lengths that exercise the tail. */
static void test_round_buffer(void) {
    enum { N = 4099 };
    static float buf[N], want[N];
    uint32_t s = 12345;
    int bad = 0;
    for (int k = 0; k < 6; k++) {
        for (int i = 0; i < N; i++) {
            s = s * 1664525u + 1013904223u;
            uint32_t u = s;
            if (i % 3 == 0) u = (u & 0x807fffffu) | ((100u + (u >> 24) % 60u) << 23);   /* near 1 */
            buf[i] = ffrom(u);
            want[i] = sd_round(buf[i], (sd_format)k);
        }
        sd_round_buffer(buf, N - k, (sd_format)k);      /* the last k elements stay as they are */
        /* NaN == NaN: on i386 a float returned by a function passes through the x87, which quiets
         * a signaling NaN, so sd_round(sNaN, fp32) can come back quiet there */
        for (int i = 0; i < N - k; i++)
            if (fbits(buf[i]) != fbits(want[i]) && !(buf[i] != buf[i] && want[i] != want[i])) bad++;
    }
    CHECK(bad == 0, "sd_round_buffer differs from sd_round in %d elements", bad);
    /* speed, for the record */
    static float big[1 << 20];
    for (int i = 0; i < (1 << 20); i++) big[i] = (float)i * 0.37f - 1000.0f;
    clock_t t0 = clock();
    for (int r = 0; r < 20; r++) sd_round_buffer(big, 1 << 20, SD_F16);
    double ns = (double)(clock() - t0) / CLOCKS_PER_SEC * 1e9 / (20.0 * (1 << 20));
    fprintf(stderr, "  fp16: sd_round_buffer(fp16): %.2f ns/element\n", ns);
}

static void test_names(void) {
    sd_format f;
    int ok = 1;
    for (int k = 0; k < SD_FORMAT_COUNT; k++)
        ok &= sd_format_parse(sd_format_name((sd_format)k), &f) == 0 && f == (sd_format)k;
    CHECK(ok, "format names parse back");
    CHECK(sd_format_parse("half", &f) == 0 && f == SD_F16, "half");
    CHECK(sd_format_parse("bfloat16", &f) == 0 && f == SD_BF16, "bfloat16");
    CHECK(sd_format_parse("fp8", &f) == 0 && f == SD_E4M3, "fp8 = e4m3");
    CHECK(sd_format_parse("e5m2", &f) == 0 && f == SD_E5M2, "e5m2");
    CHECK(sd_format_parse("float32", &f) == 0 && f == SD_F32, "float32");
    CHECK(sd_format_parse("fp12", &f) == -1, "unknown format refused");
    sd_clear_error();
}

/* ---- arithmetic references ------------------------------------------------------------------- */

/* Exact decomposition of a finite float: |x| = sig * 2^exp. */
static void decompose(float x, uint32_t *sign, uint64_t *sig, int *exp) {
    uint32_t u = fbits(x), E = (u >> 23) & 255;
    *sign = u >> 31;
    *sig = E ? (u & 0x7fffff) | 0x800000 : (u & 0x7fffff);
    *exp = E ? (int)E - 150 : -149;
}

static int fin(float x) { return x - x == 0; }

/* 128-bit helpers for the exact sums. */
typedef struct u128 { uint64_t hi, lo; } u128;
static u128 u128_shl(uint64_t v, int s) {      /* v << s, 0 <= s < 128 - 64 */
    u128 r;
    if (s == 0) { r.hi = 0; r.lo = v; }
    else if (s < 64) { r.hi = v >> (64 - s); r.lo = v << s; }
    else { r.hi = v << (s - 64); r.lo = 0; }
    return r;
}
static int u128_cmp(u128 a, u128 b) { return a.hi != b.hi ? (a.hi < b.hi ? -1 : 1) : (a.lo < b.lo ? -1 : a.lo > b.lo); }
static u128 u128_add(u128 a, u128 b) { u128 r; r.lo = a.lo + b.lo; r.hi = a.hi + b.hi + (r.lo < a.lo); return r; }
static u128 u128_sub(u128 a, u128 b) { u128 r; r.lo = a.lo - b.lo; r.hi = a.hi - b.hi - (a.lo < b.lo); return r; }


/* Exact a*b + c rounded once to format f (bits), by integer arithmetic. */
static uint32_t ref_fma_bits(const ref_fmt *f, float a, float b, float c) {
    if (!fin(a) || !fin(b) || !fin(c)) {
        double r = (double)a * (double)b + (double)c;      /* IEEE special-value rules */
        if (r != r) return ref_nan(f, 0);
        return ref_inf(f, r < 0);
    }
    uint32_t sa, sb, sc; uint64_t A, B, C; int ea, eb, ec;
    decompose(a, &sa, &A, &ea); decompose(b, &sb, &B, &eb); decompose(c, &sc, &C, &ec);
    uint32_t sp = sa ^ sb;
    uint64_t P = A * B;                                    /* < 2^48 */
    int ep = ea + eb;
    if (P == 0 && C == 0) return ((sp & sc) << (f->ebits + f->mbits));   /* +0 unless both -0 */
    if (P == 0) return ref_round(f, sc, 0, C, ec, 0);
    if (C == 0) return ref_round(f, sp, 0, P, ep, 0);
    /* X = the term with the higher leading bit; scale s so X's leading bit is bit 100. */
    int tp = ep + msb64(P), tc = ec + msb64(C);
    uint64_t X = P, Y = C; int ex = ep, ey = ec; uint32_t sx = sp, sy = sc;
    if (tc > tp) { X = C; Y = P; ex = ec; ey = ep; sx = sc; sy = sp; }
    int s = ex + msb64(X) - 100;
    u128 xm = u128_shl(X, ex - s + 1);                     /* one extra bit for the sticky jam */
    u128 ym;
    if (ey >= s) ym = u128_shl(Y, ey - s + 1);
    else {
        int d = s - ey;                                    /* Y's bits below 2^s are jammed */
        uint64_t q = d >= 64 ? 0 : Y >> d;
        int rem = d >= 64 ? 1 : (Y & ((1ull << d) - 1)) != 0;
        ym = u128_shl(q, 1);
        ym.lo |= (uint64_t)rem;
    }
    u128 r; uint32_t sr;
    if (sx == sy) { r = u128_add(xm, ym); sr = sx; }
    else {
        int cmp = u128_cmp(xm, ym);
        if (cmp == 0) return 0;                            /* exact cancellation: +0 */
        r = cmp > 0 ? u128_sub(xm, ym) : u128_sub(ym, xm);
        sr = cmp > 0 ? sx : sy;
    }
    return ref_round(f, sr, r.hi, r.lo, s - 1, 0);
}

/* Exact a / b rounded once, by integer long division with a sticky remainder. */
static uint32_t ref_div_bits(const ref_fmt *f, float a, float b) {
    if (!fin(a) || !fin(b) || b == 0 || a == 0) {
        double r = (double)a / (double)b;
        if (r != r) return ref_nan(f, 0);
        if (r == 0) return (uint32_t)(fbits((float)r) >> 31) << (f->ebits + f->mbits);
        return ref_inf(f, r < 0);
    }
    uint32_t sa, sb; uint64_t A, B; int ea, eb;
    decompose(a, &sa, &A, &ea); decompose(b, &sb, &B, &eb);
    uint64_t num = A << (63 - msb64(A));                   /* numerator normalised to 64 bits */
    int en = ea - (63 - msb64(A));
    uint64_t q = num / B, rem = num % B;                   /* q has >= 40 bits */
    /* value = (2q + sticky) * 2^(en - eb - 1) */
    return ref_round(f, sa ^ sb, 0, (q << 1) | (rem != 0), en - eb - 1, 0);
}

/* Exact sqrt(a) rounded once: integer square root of the scaled significand. */
static uint32_t ref_sqrt_bits(const ref_fmt *f, float a) {
    if (a != a || a < 0) return ref_nan(f, 0);
    if (a == 0) return (fbits(a) >> 31) << (f->ebits + f->mbits);
    if (!fin(a)) return ref_inf(f, 0);
    uint32_t sa; uint64_t A; int ea;
    decompose(a, &sa, &A, &ea);
    int sh = 60 - msb64(A);                                /* A << sh has 61 bits */
    if ((ea - sh) & 1) sh--;                               /* make the exponent even */
    uint64_t n = A << sh, r = 0, bit = 1ull << 62;
    while (bit > n) bit >>= 2;
    while (bit) {                                          /* bitwise integer square root */
        if (n >= r + bit) { n -= r + bit; r = (r >> 1) + bit; } else r >>= 1;
        bit >>= 2;
    }
    return ref_round(f, 0, 0, (r << 1) | (n != 0), (ea - sh) / 2 - 1, 0);
}

/* The result bits of an emulated operation in format f. */
static uint32_t to_bits(const ref_fmt *f, float x) {
    return f == &R_F16 ? sd_f32_to_f16(x) : sd_f32_to_bf16(x);
}
static int same_result(const ref_fmt *f, float got, uint32_t want) {
    double v = ref_value(f, want);
    if (v != v) return is_nan_f(got);
    return to_bits(f, got) == want && fbits(got) == fbits(sd_round(got, f == &R_F16 ? SD_F16 : SD_BF16));
}

typedef float (*binop_fn)(float, float);

/* op index: 0 add, 1 sub, 2 mul, 3 div */
static int binop_ok(const ref_fmt *f, int op, float a, float b) {
    int h = f == &R_F16;
    static const binop_fn f16ops[4] = { sd_f16_add, sd_f16_sub, sd_f16_mul, sd_f16_div };
    static const binop_fn bf16ops[4] = { sd_bf16_add, sd_bf16_sub, sd_bf16_mul, sd_bf16_div };
    float got = (h ? f16ops : bf16ops)[op](a, b);
    uint32_t want;
    switch (op) {
    case 0: want = ref_fma_bits(f, a, 1.0f, b); break;
    case 1: want = ref_fma_bits(f, b, -1.0f, a); break;
    case 2: want = ref_fma_bits(f, a, b, -0.0f); break;
    default: want = ref_div_bits(f, a, b); break;
    }
    return same_result(f, got, want);
}

static float fmt_value(const ref_fmt *f, uint32_t bits) {
    return f == &R_F16 ? sd_f16_to_f32((uint16_t)bits) : sd_bf16_to_f32((uint16_t)bits);
}

/* Operand pairs: mode 1 = all 2^32 (sub: as mode 0, being add with -b); mode 2 = every a with
 * 2048 b's (every 32nd pattern, shifted per a); mode 0 = every a with 128 b's chosen by a hash;
 * plus all pairs of 32 chosen values (zeros, subnormal edges, max, Inf, NaN, near 1). */
static void test_binops(const ref_fmt *f, int mode) {
    static const char *names[4] = { "add", "sub", "mul", "div" };
    static const uint16_t special16[] = { 0x0000, 0x8000, 0x0001, 0x8001, 0x03ff, 0x0400, 0x0401, 0x07ff,
        0x3bff, 0x3c00, 0x3c01, 0x3e00, 0x4000, 0x7bff, 0x7bfe, 0x7c00, 0xfc00, 0x7e00, 0x5bff, 0x1400,
        0x0200, 0x0002, 0x3555, 0x7800, 0xfbff, 0xbc00, 0xbc01, 0x8400, 0x83ff, 0x2000, 0x5800, 0x0003 };
    static const uint16_t specialb[] = { 0x0000, 0x8000, 0x0001, 0x8001, 0x007f, 0x0080, 0x0081, 0x00ff,
        0x3f7f, 0x3f80, 0x3f81, 0x3fc0, 0x4000, 0x7f7f, 0x7f7e, 0x7f80, 0xff80, 0x7fc0, 0x5f7f, 0x2000,
        0x0040, 0x0002, 0x3eab, 0x7f00, 0xff7f, 0xbf80, 0xbf81, 0x8080, 0x807f, 0x0100, 0x7e00, 0x0003 };
    const uint16_t *sp = f == &R_F16 ? special16 : specialb;
    int nsp = 32;
    for (int op = 0; op < 4; op++) {
        uint64_t bad = 0, count = 0;
        uint32_t fa = 0, fb = 0;
        clock_t t0 = clock();
        int all = mode == 1 && op != 1, dense = mode == 2;
        int64_t rows = 65536;
        int per_row = all ? 65536 : dense ? 2048 : 128;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 64) reduction(+:bad, count)
#endif
        for (int64_t i = 0; i < rows; i++) {
            float a = fmt_value(f, (uint32_t)i);
            for (int j = 0; j < per_row; j++) {
                uint32_t jb = all ? (uint32_t)j
                            : dense ? (uint32_t)(j * 32 + i % 32)
                            : (uint32_t)((i * 40503u + (uint64_t)j * 2654435761u) >> 7) & 0xffff;
                float b = fmt_value(f, jb);
                count++;
                if (!binop_ok(f, op, a, b)) {
                    bad++;
#ifdef _OPENMP
#pragma omp critical
#endif
                    { fa = (uint32_t)i; fb = jb; }
                }
            }
        }
        for (int i = 0; i < nsp; i++)
            for (int j = 0; j < nsp; j++) {
                count++;
                if (!binop_ok(f, op, fmt_value(f, sp[i]), fmt_value(f, sp[j]))) { bad++; fa = sp[i]; fb = sp[j]; }
            }
        CHECK(bad == 0, "%s %s: %llu of %llu pairs differ from the exact reference (e.g. 0x%04x, 0x%04x)",
              f->name, names[op], (unsigned long long)bad, (unsigned long long)count, fa, fb);
        fprintf(stderr, "  fp16: %s %s: %llu operand pairs equal the exact integer reference (%.1f s cpu)\n",
                f->name, names[op], (unsigned long long)count, (double)(clock() - t0) / CLOCKS_PER_SEC);
    }
    /* sqrt over every value */
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float a = fmt_value(f, h);
        float got = f == &R_F16 ? sd_f16_sqrt(a) : sd_bf16_sqrt(a);
        if (!same_result(f, got, ref_sqrt_bits(f, a))) bad++;
    }
    CHECK(bad == 0, "%s sqrt: %d of 65536 values differ from the integer square root", f->name, bad);
}

/* ---- fma -------------------------------------------------------------------------------------- */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rng_next(uint64_t *s) {      /* splitmix64 */
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static int fma_ok(const ref_fmt *f, float a, float b, float c) {
    float got = f == &R_F16 ? sd_f16_fma(a, b, c) : sd_bf16_fma(a, b, c);
    uint32_t want = ref_fma_bits(f, a, b, c);
    if (!same_result(f, got, want)) return 0;
    if (ref_value(f, want) == 0) return (fbits(got) >> 31) == (want >> (f->ebits + f->mbits));  /* zero sign */
    return 1;
}

/* A random triple of format values; several kinds so that cancellation, ties and sticky
 * bits near the rounding point are common, not just random exponents. */
static void random_triple(const ref_fmt *f, uint64_t *s, float *a, float *b, float *c) {
    uint64_t r = rng_next(s);
    uint32_t mask = 0xffff;
    *a = fmt_value(f, (uint32_t)r & mask);
    *b = fmt_value(f, (uint32_t)(r >> 16) & mask);
    uint32_t kind = (uint32_t)(r >> 60);
    float p = (float)((double)*a * (double)*b);
    if (kind < 4 || !fin(p) || p == 0) *c = fmt_value(f, (uint32_t)(r >> 32) & mask);
    else {
        /* c near -a*b (cancellation) or a few binades below it (sticky/tie region) */
        int shift = kind < 8 ? 0 : (int)((r >> 32) % (uint64_t)(f->mbits + 8));
        float base = sd_round(-ldexpf(p, -shift), f == &R_F16 ? SD_F16 : SD_BF16);
        uint32_t bits = to_bits(f, base) + (uint32_t)((int)((r >> 40) & 7) - 3);
        *c = fmt_value(f, bits & mask);
        if (kind >= 12) *c = -*c;
    }
    if (is_nan_f(*c) && (r & 1)) *c = 0;
}

static void test_fma(const ref_fmt *f, int exhaustive) {
    sd_format sf = f == &R_F16 ? SD_F16 : SD_BF16;
    float (*fma_fn)(float, float, float) = f == &R_F16 ? sd_f16_fma : sd_bf16_fma;
    /* edge cases */
    float one = 1.0f, eps = f == &R_F16 ? 0x1p-10f : 0x1p-7f, tiny = f == &R_F16 ? 0x1p-24f : 0x1p-133f;
    float big = f == &R_F16 ? 65504.0f : ffrom(0x7f7f0000);
    CHECK(fbits(fma_fn(2.0f, 3.0f, -6.0f)) == 0, "%s fma exact cancellation -> +0", f->name);
    CHECK(fbits(fma_fn(-0.0f, 1.0f, -0.0f)) == 0x80000000u, "%s fma -0*1 + -0 = -0", f->name);
    CHECK(fbits(fma_fn(0.0f, -1.0f, 0.0f)) == 0, "%s fma 0*-1 + 0 = +0", f->name);
    CHECK(is_nan_f(fma_fn(INFINITY, 0.0f, 1.0f)), "%s fma Inf*0 = NaN", f->name);
    CHECK(is_nan_f(fma_fn(INFINITY, 1.0f, -INFINITY)), "%s fma Inf - Inf = NaN", f->name);
    CHECK(fma_fn(big, 2.0f, -big) == big, "%s fma: big*2 - big exact", f->name);
    CHECK(fma_fn(big, big, 0.0f) == INFINITY, "%s fma overflow", f->name);
    CHECK(fma_fn(tiny, 0.5f, 0.0f) == 0.0f && fma_fn(tiny, 0.75f, 0.0f) == tiny, "%s fma subnormal tie/round", f->name);
    CHECK(fma_fn(tiny, -0.5f, 0.0f) == 0.0f && (fbits(fma_fn(tiny, -0.5f, -0.0f)) >> 31) == 1, "%s fma tiny negative", f->name);
    /* a tie that only c's tiny contribution breaks: 1 + eps/2 (+ tiny) */
    CHECK(fma_fn(one + eps, one, eps * 0.5f) == one + 2 * eps, "%s fma tie to even (up)", f->name);
    CHECK(fma_fn(one, one, eps * 0.5f) == one, "%s fma tie to even (down)", f->name);
    /* find products that are exactly halfway and add +-tiny: the naive double route
     * (round(double(a*b + c))) fails on some of these for bf16; the fma must not. */
    int found = 0, naive_wrong = 0, bad_tie = 0;
    for (uint32_t ia = 0; ia < 128 && found < 2000; ia++)
        for (uint32_t ib = 0; ib < 128 && found < 2000; ib++) {
            float a = fmt_value(f, to_bits(f, 1.0f) + ia), b = fmt_value(f, to_bits(f, 1.0f) + ib);
            float p = (float)((double)a * (double)b);             /* exact */
            float r1 = sd_round(p, sf), other = 2 * p - r1;        /* the neighbours if p is halfway */
            if (r1 == p || other == r1 || !sd_is_representable(other, sf)) continue;
            for (int sg = -1; sg <= 1; sg += 2) {
                float c = sg * tiny;
                found++;
                if (!fma_ok(f, a, b, c)) bad_tie++;
                float naive = sd_round((float)((double)p + (double)c), sf);
                if (fbits(naive) != fbits(fma_fn(a, b, c))) naive_wrong++;
            }
        }
    CHECK(found > 20 && bad_tie == 0, "%s fma halfway products + tiny: %d of %d wrong", f->name, bad_tie, found);
    if (f == &R_BF16) CHECK(naive_wrong > 0, "bf16: the test must catch a naive double-rounded fma (%d)", naive_wrong);
    /* random triples */
    uint64_t n = exhaustive ? 100000000ull : 1000000ull, bad = 0;
    float ba = 0, bb = 0, bc = 0;
    clock_t t0 = clock();
    int64_t chunks = (int64_t)(n / 100000);
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 4) reduction(+:bad)
#endif
    for (int64_t ch = 0; ch < chunks; ch++) {
        uint64_t s = rng_state ^ ((uint64_t)ch * 0xd1342543de82ef95ull) ^ (f == &R_F16 ? 0 : 0x5555);
        for (int i = 0; i < 100000; i++) {
            float a, b, c;
            random_triple(f, &s, &a, &b, &c);
            if (!fma_ok(f, a, b, c)) {
                bad++;
#ifdef _OPENMP
#pragma omp critical
#endif
                { ba = a; bb = b; bc = c; }
            }
        }
    }
    CHECK(bad == 0, "%s fma: %llu of %llu random triples differ from exact integer arithmetic (e.g. %a*%a+%a)",
          f->name, (unsigned long long)bad, (unsigned long long)n, ba, bb, bc);
    fprintf(stderr, "  fp16: %s fma: %llu random triples + %d halfway cases equal exact integer arithmetic (%.1f s cpu)\n",
            f->name, (unsigned long long)n, found, (double)(clock() - t0) / CLOCKS_PER_SEC);
}

void test_fp16(void) {
    int exhaustive = env_flag("SDREF_EXHAUSTIVE");
    test_names();
    test_conversion_values();
    test_round_trips();
    test_round_buffer();
    test_conversions();
    test_binops(&R_F16, exhaustive ? 1 : 0);
    test_binops(&R_BF16, exhaustive ? 2 : 0);
    test_fma(&R_F16, exhaustive);
    test_fma(&R_BF16, exhaustive);
}
