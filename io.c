/* io.c — errors, memory, files written atomically, and the file formats: safetensors, .npy, JSON.
 * Every parser validates everything it reads and reports one line naming the file and the problem. */
#define _POSIX_C_SOURCE 200809L
#if defined(__linux__)
#define _DEFAULT_SOURCE        /* madvise(MADV_DONTNEED): give back a tensor's pages once decoded */
#endif
#define _FILE_OFFSET_BITS 64   /* 64-bit off_t on 32-bit hosts: real checkpoints are 2-7 GB */
#include "sdref.h"
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#define SD_HAVE_POSIX 1
#endif

/* ---- errors ---------------------------------------------------------------------------- */

static char error_line[1024];

void sd_error(const char *fmt, ...) {
    if (error_line[0]) return;                   /* keep the first (most specific) line */
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(error_line, sizeof error_line, fmt, ap);
    va_end(ap);
    for (char *p = error_line; *p; p++)
        if (*p == '\n' || *p == '\r') *p = ' ';
}

const char *sd_last_error(void) { return error_line; }
void sd_clear_error(void) { error_line[0] = 0; }

void sd_fatal(const char *fmt, ...) {
    va_list ap;
    fputs("sdref: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

/* ---- memory ---------------------------------------------------------------------------- */

void *sd_malloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) sd_fatal("out of memory (%zu bytes)", n);
    return p;
}

void *sd_calloc(size_t n, size_t size) {
    if (size && n > (size_t)-1 / size) sd_fatal("out of memory (%zu x %zu bytes)", n, size);
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) sd_fatal("out of memory (%zu x %zu bytes)", n, size);
    return p;
}

void *sd_realloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) sd_fatal("out of memory (%zu bytes)", n);
    return q;
}

char *sd_strdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = sd_malloc(n);
    memcpy(d, s, n);
    return d;
}

/* ---- bits ------------------------------------------------------------------------------ */

float sd_f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
uint32_t sd_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
double sd_f64_from_bits(uint64_t u) { double d; memcpy(&d, &u, 8); return d; }
uint64_t sd_f64_bits(double d) { uint64_t u; memcpy(&u, &d, 8); return u; }

/* ---- files ----------------------------------------------------------------------------- */

int sd_read_file(const char *path, uint8_t **data, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        sd_error("%s: cannot open (%s)", path, strerror(errno));
        return -1;
    }
    size_t cap = 1 << 16, n = 0;
    uint8_t *buf = sd_malloc(cap);
    for (;;) {
        if (n + 1 >= cap) buf = sd_realloc(buf, cap *= 2);
        size_t got = fread(buf + n, 1, cap - n - 1, f);
        n += got;
        if (got == 0) break;
    }
    int err = ferror(f);
    fclose(f);
    if (err) {
        free(buf);
        sd_error("%s: read error", path);
        return -1;
    }
    buf[n] = 0;
    *data = buf;
    *len = n;
    return 0;
}

int sd_out_open(sd_outfile *o, const char *path) {
    size_t n = strlen(path) + 32;
    o->path = sd_strdup(path);
    o->tmp_path = sd_malloc(n);
#ifdef SD_HAVE_POSIX
    snprintf(o->tmp_path, n, "%s.tmp.%ld", path, (long)getpid());
#else
    snprintf(o->tmp_path, n, "%s.tmp", path);
#endif
    o->f = fopen(o->tmp_path, "wb");
    if (!o->f) {
        sd_error("%s: cannot write (%s)", path, strerror(errno));
        free(o->path);
        free(o->tmp_path);
        o->path = o->tmp_path = NULL;
        return -1;
    }
    return 0;
}

int sd_out_commit(sd_outfile *o) {
    int bad = ferror(o->f);
    bad |= fclose(o->f) != 0;
    o->f = NULL;
    if (bad) {
        sd_error("%s: write error", o->path);
        remove(o->tmp_path);
    } else {
#ifndef SD_HAVE_POSIX
        remove(o->path);   /* outside POSIX, rename may refuse to replace an existing file */
#endif
        if (rename(o->tmp_path, o->path) != 0) {
            sd_error("%s: cannot rename into place (%s)", o->path, strerror(errno));
            remove(o->tmp_path);
            bad = 1;
        }
    }
    free(o->path);
    free(o->tmp_path);
    o->path = o->tmp_path = NULL;
    return bad ? -1 : 0;
}

void sd_out_abort(sd_outfile *o) {
    if (o->f) fclose(o->f);
    o->f = NULL;
    if (o->tmp_path) remove(o->tmp_path);
    free(o->path);
    free(o->tmp_path);
    o->path = o->tmp_path = NULL;
}

/* ---- safetensors, .npy, JSON: below -------------------------------------------------- */

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#define SD_HAVE_MMAP 1
#endif

/* A growing byte buffer (NUL-terminated) for decoded strings and generated headers. */
typedef struct sbuf { char *s; size_t n, cap; } sbuf;

static void sbuf_put(sbuf *b, const void *p, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (b->n + n + 1 > cap) cap *= 2;
        b->s = sd_realloc(b->s, cap);
        b->cap = cap;
    }
    memcpy(b->s + b->n, p, n);
    b->n += n;
    b->s[b->n] = 0;
}

static void sbuf_putc(sbuf *b, char c) { sbuf_put(b, &c, 1); }

static void sbuf_printf(sbuf *b, const char *fmt, ...) {
    char tmp[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof tmp) sd_fatal("sbuf_printf: line too long");
    sbuf_put(b, tmp, (size_t)n);
}

/* a * b, or -1 when it does not fit in 64 bits */
static int mul_u64(uint64_t a, uint64_t b, uint64_t *r) {
    if (a && b > UINT64_MAX / a) return -1;
    *r = a * b;
    return 0;
}

/* "[2,3]" for messages */
static void shape_text(char *buf, size_t n, int ndim, const int64_t *shape) {
    size_t k = 0;
    buf[0] = 0;
    k += (size_t)snprintf(buf + k, n - k, "[");
    for (int i = 0; i < ndim && k < n; i++)
        k += (size_t)snprintf(buf + k, n - k, i ? ",%lld" : "%lld", (long long)shape[i]);
    if (k < n) snprintf(buf + k, n - k, "]");
}

/* ==== JSON ================================================================================
 * Strict RFC 8259. Choices: a leading byte order mark is refused (as Python's json.loads does);
 * a \u escape of a lone surrogate (\ud800 not followed by \udc00-\udfff, or a lone low half) is
 * refused; duplicate keys are kept in order and json_get returns the last (as Python does);
 * numbers that overflow double are refused, those below the smallest subnormal become 0. */

#define JSON_MAX_DEPTH 512

typedef struct json_parser { const uint8_t *s; size_t len, pos; const char *what; } json_parser;

static int json_fail(json_parser *p, const char *fmt, ...) {
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    sd_error("%s: byte %zu: %s", p->what, p->pos, msg);
    return -1;
}

static void json_skip_ws(json_parser *p) {
    while (p->pos < p->len) {
        uint8_t c = p->s[p->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        p->pos++;
    }
}

static int json_peek(const json_parser *p) { return p->pos < p->len ? p->s[p->pos] : -1; }

/* Big unsigned integers (little-endian 32-bit words) for exact decimal -> double conversion.
 * Sizes: at most 801 significant digits times 10^1125 (the smallest exponent that can still
 * matter) shifted left by 64: under 4000 bits. */
#define BN_WORDS 132
typedef struct bignum { uint32_t w[BN_WORDS]; int n; } bignum;

static void bn_set(bignum *a, uint32_t v) { a->n = v ? 1 : 0; a->w[0] = v; }

static void bn_mul_add(bignum *a, uint32_t mul, uint32_t add) {   /* a = a*mul + add */
    uint64_t carry = add;
    for (int i = 0; i < a->n; i++) {
        uint64_t t = (uint64_t)a->w[i] * mul + carry;
        a->w[i] = (uint32_t)t;
        carry = t >> 32;
    }
    if (carry) {
        if (a->n >= BN_WORDS) sd_fatal("bignum overflow");
        a->w[a->n++] = (uint32_t)carry;
    }
}

static void bn_mul_pow10(bignum *a, int e) {
    for (; e >= 9; e -= 9) bn_mul_add(a, 1000000000u, 0);
    static const uint32_t p10[9] = { 1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000 };
    if (e > 0) bn_mul_add(a, p10[e], 0);
}

static int bn_bitlen(const bignum *a) {
    if (!a->n) return 0;
    int b = 32 * (a->n - 1);
    for (uint32_t top = a->w[a->n - 1]; top; top >>= 1) b++;
    return b;
}

static void bn_shl(bignum *a, int k) {
    if (!a->n || k <= 0) return;
    int words = k / 32, bits = k % 32;
    if (a->n + words + 1 > BN_WORDS) sd_fatal("bignum overflow");
    a->w[a->n + words] = 0;
    for (int i = a->n - 1; i >= 0; i--) {
        uint64_t v = (uint64_t)a->w[i] << bits;
        a->w[i + words + 1] |= (uint32_t)(v >> 32);
        a->w[i + words] = (uint32_t)v;
    }
    for (int i = 0; i < words; i++) a->w[i] = 0;
    a->n += words + 1;
    while (a->n && !a->w[a->n - 1]) a->n--;
}

static void bn_shr1(bignum *a) {
    for (int i = 0; i < a->n; i++) a->w[i] = (a->w[i] >> 1) | (i + 1 < a->n ? a->w[i + 1] << 31 : 0);
    while (a->n && !a->w[a->n - 1]) a->n--;
}

static int bn_cmp(const bignum *a, const bignum *b) {
    if (a->n != b->n) return a->n < b->n ? -1 : 1;
    for (int i = a->n - 1; i >= 0; i--)
        if (a->w[i] != b->w[i]) return a->w[i] < b->w[i] ? -1 : 1;
    return 0;
}

static void bn_sub(bignum *a, const bignum *b) {   /* a -= b, a >= b */
    int64_t borrow = 0;
    for (int i = 0; i < a->n; i++) {
        int64_t t = (int64_t)a->w[i] - (i < b->n ? b->w[i] : 0) - borrow;
        borrow = t < 0;
        a->w[i] = (uint32_t)(t + (borrow ? ((int64_t)1 << 32) : 0));
    }
    while (a->n && !a->w[a->n - 1]) a->n--;
}

/* The double nearest to the decimal digits[0..nd) x 10^dexp (ties to even), by exact integer
 * arithmetic: q = floor(N 10^dexp 2^p) with 2^63 <= q < 2^64, rounded to 53 bits with the
 * remainder as sticky bit. Returns the bits, or -1 (as all ones) on overflow. nd >= 1, first digit
 * non-zero, nd + dexp within [-324, 310]. */
static int decimal_to_double(const char *digits, int nd, int dexp, uint64_t *bits) {
    bignum a, b, d;   /* 1.6 KB: a leaf call, so recursion depth does not multiply it */
    bn_set(&a, 0);
    for (int i = 0; i < nd; i++) bn_mul_add(&a, 10, (uint32_t)(digits[i] - '0'));
    bn_set(&b, 1);
    if (dexp >= 0) bn_mul_pow10(&a, dexp);
    else bn_mul_pow10(&b, -dexp);
    int p = 63 - (bn_bitlen(&a) - bn_bitlen(&b));   /* now a 2^p / b lies in (2^62, 2^64) */
    if (p > 0) bn_shl(&a, p);
    else bn_shl(&b, -p);
    d = b;
    bn_shl(&d, 63);
    if (bn_cmp(&a, &d) < 0) { bn_shl(&a, 1); p++; }  /* into [2^63, 2^64) */
    uint64_t q = 0;                                   /* long division, one quotient bit at a time */
    for (int i = 63; i >= 0; i--) {
        if (bn_cmp(&a, &d) >= 0) { bn_sub(&a, &d); q |= (uint64_t)1 << i; }
        bn_shr1(&d);
    }
    int sticky = a.n != 0;
    int e2 = 63 - p;                                  /* value in [2^e2, 2^(e2+1)) */
    if (e2 > 1023) return -1;
    int shift = e2 >= -1022 ? 11 : -1011 - e2;        /* low bits of q below the last kept bit */
    if (shift > 64) { *bits = 0; return 0; }
    uint64_t m = shift == 64 ? 0 : q >> shift;
    uint64_t half = (q >> (shift - 1)) & 1;
    uint64_t below = shift == 1 ? 0 : q & (((uint64_t)1 << (shift - 1)) - 1);
    if (half && (below || sticky || (m & 1))) m++;    /* round to nearest, ties to even */
    if (e2 < -1022) { *bits = m; return 0; }          /* subnormal (m = 2^52: the smallest normal) */
    if (m == (uint64_t)1 << 53) { m >>= 1; e2++; }
    if (e2 > 1023) return -1;
    *bits = ((uint64_t)(e2 + 1023) << 52) | (m & (((uint64_t)1 << 52) - 1));
    return 0;
}

#define JSON_MAX_DIGITS 800

static int json_number(json_parser *p, double *out) {
    char dig[JSON_MAX_DIGITS + 1];
    int nd = 0, sticky = 0, neg = 0;
    long dexp = 0;                       /* value = digits x 10^dexp */
    size_t start = p->pos;
    #define DIGIT(q) ((q)->pos < (q)->len && (q)->s[(q)->pos] >= '0' && (q)->s[(q)->pos] <= '9')
    if (json_peek(p) == '-') { neg = 1; p->pos++; }
    if (!DIGIT(p)) return json_fail(p, "invalid number");
    if (p->s[p->pos] == '0') {
        p->pos++;
        if (DIGIT(p)) return json_fail(p, "number with a leading zero");
    } else {
        for (; DIGIT(p); p->pos++) {
            if (nd < JSON_MAX_DIGITS) dig[nd++] = (char)p->s[p->pos];
            else { dexp++; sticky |= p->s[p->pos] != '0'; }
        }
    }
    if (json_peek(p) == '.') {
        p->pos++;
        if (!DIGIT(p)) return json_fail(p, "number without digits after '.'");
        for (; DIGIT(p); p->pos++) {
            char c = (char)p->s[p->pos];
            if (nd == 0 && c == '0') dexp--;                     /* leading zeros of 0.000x */
            else if (nd < JSON_MAX_DIGITS) { dig[nd++] = c; dexp--; }
            else sticky |= c != '0';
        }
    }
    if (json_peek(p) == 'e' || json_peek(p) == 'E') {
        p->pos++;
        int eneg = 0;
        if (json_peek(p) == '+' || json_peek(p) == '-') eneg = p->s[p->pos++] == '-';
        if (!DIGIT(p)) return json_fail(p, "number without digits in the exponent");
        long e = 0;
        for (; DIGIT(p); p->pos++)
            if (e < 100000000) e = e * 10 + (p->s[p->pos] - '0');   /* saturates: far out of range anyway */
        dexp += eneg ? -e : e;
    }
    #undef DIGIT
    /* Beyond 800 digits only "something non-zero follows" matters: no halfway point between
     * two doubles needs more than 767 significant digits, so one extra digit 1 decides the same. */
    if (sticky) { dig[nd++] = '1'; dexp--; }
    while (nd > 0 && dig[nd - 1] == '0') { nd--; dexp++; }
    uint64_t bits = 0;
    if (nd > 0 && nd + dexp > 310) {
        p->pos = start;
        return json_fail(p, "number out of the range of double");
    }
    if (nd > 0 && nd + dexp >= -324) {
        if (dexp >= 0 && nd + dexp <= 15) {               /* small integers: exact in a uint64 */
            uint64_t v = 0;
            for (int i = 0; i < nd; i++) v = v * 10 + (uint64_t)(dig[i] - '0');
            for (long i = 0; i < dexp; i++) v *= 10;
            bits = sd_f64_bits((double)v);
        } else if (decimal_to_double(dig, nd, (int)dexp, &bits) != 0) {
            p->pos = start;
            return json_fail(p, "number out of the range of double");
        }
    }
    if (neg) bits |= (uint64_t)1 << 63;
    *out = sd_f64_from_bits(bits);
    return 0;
}

static int json_hex4(json_parser *p, unsigned *out) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        int c = json_peek(p), d;
        if (c >= '0' && c <= '9') d = c - '0';
        else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
        else return json_fail(p, "invalid \\u escape");
        v = v * 16 + (unsigned)d;
        p->pos++;
    }
    *out = v;
    return 0;
}

static void utf8_put(sbuf *b, unsigned cp) {
    char u[4];
    size_t n;
    if (cp < 0x80) { u[0] = (char)cp; n = 1; }
    else if (cp < 0x800) { u[0] = (char)(0xC0 | (cp >> 6)); u[1] = (char)(0x80 | (cp & 63)); n = 2; }
    else if (cp < 0x10000) {
        u[0] = (char)(0xE0 | (cp >> 12)); u[1] = (char)(0x80 | ((cp >> 6) & 63)); u[2] = (char)(0x80 | (cp & 63)); n = 3;
    } else {
        u[0] = (char)(0xF0 | (cp >> 18)); u[1] = (char)(0x80 | ((cp >> 12) & 63));
        u[2] = (char)(0x80 | ((cp >> 6) & 63)); u[3] = (char)(0x80 | (cp & 63)); n = 4;
    }
    sbuf_put(b, u, n);
}

/* Length of the valid UTF-8 sequence at s[0..n) (1..4), or 0 when invalid: overlong forms,
 * UTF-16 surrogates (U+D800..DFFF) and code points above U+10FFFF are invalid. */
static int utf8_valid_len(const uint8_t *s, size_t n) {
    uint8_t c = s[0];
    if (c < 0x80) return 1;
    int len;
    uint8_t lo = 0x80, hi = 0xBF;            /* allowed range of the second byte */
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        if (c == 0xE0) lo = 0xA0;            /* overlong */
        if (c == 0xED) hi = 0x9F;            /* surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        if (c == 0xF0) lo = 0x90;            /* overlong */
        if (c == 0xF4) hi = 0x8F;            /* above U+10FFFF */
    } else return 0;
    if ((size_t)len > n || s[1] < lo || s[1] > hi) return 0;
    for (int i = 2; i < len; i++)
        if ((s[i] & 0xC0) != 0x80) return 0;
    return len;
}

static int json_string(json_parser *p, char **out, size_t *out_len) {
    sbuf b = { 0 };
    p->pos++;                                  /* opening quote */
    for (;;) {
        if (p->pos >= p->len) { free(b.s); return json_fail(p, "unterminated string"); }
        uint8_t c = p->s[p->pos];
        if (c == '"') { p->pos++; break; }
        if (c < 0x20) { free(b.s); return json_fail(p, "control character 0x%02x in string", c); }
        if (c == '\\') {
            p->pos++;
            int e = json_peek(p);
            const char *simple = "\"\\/bfnrt", *value = "\"\\/\b\f\n\r\t";
            const char *k = e > 0 ? strchr(simple, e) : NULL;
            if (k && e) { sbuf_putc(&b, value[k - simple]); p->pos++; continue; }
            if (e != 'u') { free(b.s); return json_fail(p, "invalid escape"); }
            p->pos++;
            unsigned cp = 0;
            if (json_hex4(p, &cp)) { free(b.s); return -1; }
            if (cp >= 0xDC00 && cp <= 0xDFFF) { free(b.s); return json_fail(p, "lone low surrogate \\u%04x", cp); }
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                unsigned lo = 0;
                if (p->pos + 1 >= p->len || p->s[p->pos] != '\\' || p->s[p->pos + 1] != 'u') {
                    free(b.s);
                    return json_fail(p, "lone high surrogate \\u%04x", cp);
                }
                p->pos += 2;
                if (json_hex4(p, &lo)) { free(b.s); return -1; }
                if (lo < 0xDC00 || lo > 0xDFFF) { free(b.s); return json_fail(p, "high surrogate \\u%04x not followed by a low one", cp); }
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            utf8_put(&b, cp);
            continue;
        }
        int n = utf8_valid_len(p->s + p->pos, p->len - p->pos);
        if (!n) { free(b.s); return json_fail(p, "invalid UTF-8 in string"); }
        sbuf_put(&b, p->s + p->pos, (size_t)n);
        p->pos += (size_t)n;
    }
    if (!b.s) b.s = sd_strdup("");
    *out = b.s;
    *out_len = b.n;
    return 0;
}

static int json_value(json_parser *p, sd_json *out, int depth);

/* Append one zeroed slot to an array/object under construction. */
static sd_json *json_push(sd_json *j, int *cap) {
    if (j->n == *cap) {
        *cap = *cap ? *cap * 2 : 4;
        j->items = sd_realloc(j->items, (size_t)*cap * sizeof *j->items);
        if (j->type == JSON_OBJECT) j->keys = sd_realloc(j->keys, (size_t)*cap * sizeof *j->keys);
    }
    memset(&j->items[j->n], 0, sizeof j->items[0]);
    if (j->type == JSON_OBJECT) j->keys[j->n] = NULL;
    return &j->items[j->n++];
}

static int json_container(json_parser *p, sd_json *out, int depth) {
    int is_obj = p->s[p->pos] == '{', cap = 0;
    char close = is_obj ? '}' : ']';
    if (depth >= JSON_MAX_DEPTH) return json_fail(p, "nesting deeper than %d", JSON_MAX_DEPTH);
    out->type = is_obj ? JSON_OBJECT : JSON_ARRAY;
    p->pos++;
    json_skip_ws(p);
    if (json_peek(p) == close) { p->pos++; return 0; }
    for (;;) {
        json_skip_ws(p);
        char *key = NULL;
        if (is_obj) {
            size_t klen;
            if (json_peek(p) != '"') return json_fail(p, "expected a string key");
            if (json_string(p, &key, &klen)) return -1;
            json_skip_ws(p);
            if (json_peek(p) != ':') { free(key); return json_fail(p, "expected ':'"); }
            p->pos++;
            json_skip_ws(p);
        }
        sd_json *item = json_push(out, &cap);
        if (is_obj) out->keys[out->n - 1] = key;
        if (json_value(p, item, depth + 1)) return -1;
        json_skip_ws(p);
        int c = json_peek(p);
        if (c == ',') { p->pos++; continue; }
        if (c == close) { p->pos++; return 0; }
        return json_fail(p, is_obj ? "expected ',' or '}'" : "expected ',' or ']'");
    }
}

static int json_literal(json_parser *p, const char *word) {
    size_t n = strlen(word);
    if (p->len - p->pos < n || memcmp(p->s + p->pos, word, n) != 0) return json_fail(p, "invalid literal");
    p->pos += n;
    return 0;
}

static int json_value(json_parser *p, sd_json *out, int depth) {
    int c = json_peek(p);
    switch (c) {
    case '{': case '[': return json_container(p, out, depth);
    case '"': out->type = JSON_STRING; return json_string(p, &out->str, &out->str_len);
    case 't': out->type = JSON_BOOL; out->boolean = 1; return json_literal(p, "true");
    case 'f': out->type = JSON_BOOL; return json_literal(p, "false");
    case 'n': out->type = JSON_NULL; return json_literal(p, "null");
    case -1: return json_fail(p, "unexpected end of input");
    default:
        if (c == '-' || (c >= '0' && c <= '9')) { out->type = JSON_NUMBER; return json_number(p, &out->num); }
        return json_fail(p, "unexpected character '%c' (0x%02x)", c >= 0x20 && c < 0x7f ? c : '?', c);
    }
}

int json_parse(const char *text, size_t len, const char *what, sd_json *out) {
    json_parser p = { (const uint8_t *)text, len, 0, what };
    memset(out, 0, sizeof *out);
    if (len >= 3 && memcmp(text, "\xEF\xBB\xBF", 3) == 0) return json_fail(&p, "UTF-8 byte order mark not allowed");
    json_skip_ws(&p);
    if (json_value(&p, out, 0) == 0) {
        json_skip_ws(&p);
        if (p.pos == p.len) return 0;
        json_fail(&p, "unexpected characters after the JSON value");
    }
    json_free(out);
    return -1;
}

int json_parse_file(const char *path, sd_json *out) {
    uint8_t *buf;
    size_t len;
    memset(out, 0, sizeof *out);
    if (sd_read_file(path, &buf, &len)) return -1;
    int rc = json_parse((const char *)buf, len, path, out);
    free(buf);
    return rc;
}

void json_free(sd_json *j) {
    if (!j) return;
    for (int i = 0; i < j->n; i++) {
        json_free(&j->items[i]);
        if (j->keys) free(j->keys[i]);
    }
    free(j->items);
    free(j->keys);
    free(j->str);
    memset(j, 0, sizeof *j);
}

const sd_json *json_get(const sd_json *obj, const char *key) {
    if (!obj || obj->type != JSON_OBJECT) return NULL;
    for (int i = obj->n - 1; i >= 0; i--)            /* the last of duplicate keys wins */
        if (strcmp(obj->keys[i], key) == 0) return &obj->items[i];
    return NULL;
}

/* Typed getters: a member that is absent, null or of another type gives the default. */
double json_num(const sd_json *obj, const char *key, double def) {
    const sd_json *v = json_get(obj, key);
    return v && v->type == JSON_NUMBER ? v->num : def;
}

int json_int(const sd_json *obj, const char *key, int def) {
    const sd_json *v = json_get(obj, key);
    if (!v || v->type != JSON_NUMBER || !(v->num >= -2147483648.0 && v->num <= 2147483647.0)) return def;
    return (int)v->num;
}

int json_bool(const sd_json *obj, const char *key, int def) {
    const sd_json *v = json_get(obj, key);
    return v && v->type == JSON_BOOL ? v->boolean : def;
}

const char *json_str(const sd_json *obj, const char *key, const char *def) {
    const sd_json *v = json_get(obj, key);
    return v && v->type == JSON_STRING ? v->str : def;
}

/* A JSON string literal: quotes, backslash and control characters escaped, UTF-8 kept. */
static void json_escape(sbuf *b, const char *s, size_t n) {
    sbuf_putc(b, '"');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        static const char special[] = "\"\\\b\f\n\r\t", letter[] = "\"\\bfnrt";
        const char *k = c ? strchr(special, c) : NULL;
        if (k) { sbuf_putc(b, '\\'); sbuf_putc(b, letter[k - special]); }
        else if (c < 0x20 || c == 0x7f) sbuf_printf(b, "\\u%04x", c);
        else sbuf_putc(b, (char)c);
    }
    sbuf_putc(b, '"');
}

void json_write_string(FILE *f, const char *s) {
    sbuf b = { 0 };
    json_escape(&b, s, strlen(s));
    fwrite(b.s, 1, b.n, f);
    free(b.s);
}

/* Compact text of an object whose members are all strings ({"k":"v",...}); -1 otherwise. */
static int json_string_object_text(const sd_json *j, sbuf *out) {
    if (j->type != JSON_OBJECT) return -1;
    sbuf_putc(out, '{');
    for (int i = 0; i < j->n; i++) {
        if (j->items[i].type != JSON_STRING) return -1;
        if (i) sbuf_putc(out, ',');
        json_escape(out, j->keys[i], strlen(j->keys[i]));
        sbuf_putc(out, ':');
        json_escape(out, j->items[i].str, j->items[i].str_len);
    }
    sbuf_putc(out, '}');
    return 0;
}

/* ==== safetensors ===========================================================================
 * Layout: 8-byte little-endian header length N, N bytes of JSON header
 * {"name": {"dtype": "F32", "shape": [2,3], "data_offsets": [begin, end]}, "__metadata__": {...}},
 * then the data section; offsets are relative to its start. */

#define ST_MAX_HEADER ((uint64_t)100 * 1000 * 1000)

static const char *const st_dtype_names[ST_DTYPE_COUNT] = {
    "F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"
};
static const unsigned char st_dtype_sizes[ST_DTYPE_COUNT] = { 8, 4, 2, 2, 8, 4, 2, 1, 1, 1, 1, 1 };

size_t st_dtype_size(st_dtype d) { return (unsigned)d < ST_DTYPE_COUNT ? st_dtype_sizes[d] : 0; }
const char *st_dtype_name(st_dtype d) { return (unsigned)d < ST_DTYPE_COUNT ? st_dtype_names[d] : "?"; }

/* Bring the whole file into memory: mmap where the platform has it, else read it. */
static int st_load_bytes(sd_safetensors *st, const char *path) {
#ifdef SD_HAVE_MMAP
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        sd_error("%s: cannot open (%s)", path, strerror(errno));
        return -1;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        sd_error("%s: cannot stat (%s)", path, strerror(errno));
        close(fd);
        return -1;
    }
    if (!S_ISREG(sb.st_mode)) {
        sd_error("%s: not a regular file", path);
        close(fd);
        return -1;
    }
    uint64_t size = (uint64_t)sb.st_size;
    if (size > (uint64_t)SIZE_MAX) {
        sd_error("%s: file is %llu bytes, larger than this machine's address space", path, (unsigned long long)size);
        close(fd);
        return -1;
    }
    if (size < 8) {
        sd_error("%s: file is %llu bytes, too short for a safetensors header", path, (unsigned long long)size);
        close(fd);
        return -1;
    }
    void *m = mmap(NULL, (size_t)size, PROT_READ, MAP_PRIVATE, fd, 0);
    int err = errno;
    close(fd);
    if (m == MAP_FAILED) {
        sd_error("%s: cannot map %llu bytes into memory (%s)", path, (unsigned long long)size, strerror(err));
        return -1;
    }
    st->map = m;
    st->map_len = size;
    st->mapped = 1;
#else
    uint8_t *buf;
    size_t len;
    if (sd_read_file(path, &buf, &len)) return -1;
    st->map = buf;
    st->map_len = len;
    st->mapped = 0;
    if (len < 8) {
        sd_error("%s: file is %zu bytes, too short for a safetensors header", path, len);
        return -1;
    }
#endif
    return 0;
}

/* A JSON number that is a non-negative integer below 2^53 (exactly representable). */
static int json_u53(const sd_json *j, uint64_t *out) {
    if (j->type != JSON_NUMBER || !(j->num >= 0 && j->num <= 9007199254740992.0) || j->num != (double)(uint64_t)j->num)
        return -1;
    *out = (uint64_t)j->num;
    return 0;
}

/* Validate one header entry and fill e (name owned by the caller). */
static int st_parse_entry(const char *path, const char *name, const sd_json *v, uint64_t data_len, st_entry *e) {
    if (v->type != JSON_OBJECT) {
        sd_error("%s: tensor '%s': header entry is not a JSON object", path, name);
        return -1;
    }
    const sd_json *dt = NULL, *shape = NULL, *offs = NULL;
    for (int i = 0; i < v->n; i++) {
        const char *k = v->keys[i];
        const sd_json **slot = strcmp(k, "dtype") == 0 ? &dt : strcmp(k, "shape") == 0 ? &shape
                             : strcmp(k, "data_offsets") == 0 ? &offs : NULL;
        if (!slot) {
            sd_error("%s: tensor '%s': unexpected key '%s'", path, name, k);
            return -1;
        }
        if (*slot) {
            sd_error("%s: tensor '%s': key '%s' given twice", path, name, k);
            return -1;
        }
        *slot = &v->items[i];
    }
    if (!dt || !shape || !offs) {
        sd_error("%s: tensor '%s': missing '%s'", path, name, !dt ? "dtype" : !shape ? "shape" : "data_offsets");
        return -1;
    }
    if (dt->type != JSON_STRING) {
        sd_error("%s: tensor '%s': dtype is not a string", path, name);
        return -1;
    }
    int d = 0;
    while (d < ST_DTYPE_COUNT && strcmp(dt->str, st_dtype_names[d]) != 0) d++;
    if (d == ST_DTYPE_COUNT) {
        sd_error("%s: tensor '%s': unknown dtype '%s'", path, name, dt->str);
        return -1;
    }
    e->dtype = (st_dtype)d;
    if (shape->type != JSON_ARRAY) {
        sd_error("%s: tensor '%s': shape is not an array", path, name);
        return -1;
    }
    if (shape->n > 8) {
        sd_error("%s: tensor '%s': shape has %d dimensions (at most 8 supported)", path, name, shape->n);
        return -1;
    }
    e->ndim = shape->n;
    uint64_t numel = 1, nbytes = 0;
    int absurd = 0;
    for (int i = 0; i < shape->n; i++) {
        uint64_t dim;
        if (json_u53(&shape->items[i], &dim)) {
            sd_error("%s: tensor '%s': shape entry %d is not a non-negative integer", path, name, i);
            return -1;
        }
        e->shape[i] = (int64_t)dim;
        absurd |= mul_u64(numel, dim, &numel) != 0;
    }
    absurd |= mul_u64(numel, st_dtype_sizes[d], &nbytes) != 0;
    char shp[160];
    shape_text(shp, sizeof shp, e->ndim, e->shape);
    if (absurd) {
        sd_error("%s: tensor '%s': shape %s is absurdly large", path, name, shp);
        return -1;
    }
    uint64_t b, end;
    if (offs->type != JSON_ARRAY || offs->n != 2 || json_u53(&offs->items[0], &b) || json_u53(&offs->items[1], &end)) {
        sd_error("%s: tensor '%s': data_offsets is not a pair of non-negative integers", path, name);
        return -1;
    }
    if (end < b) {
        sd_error("%s: tensor '%s': data_offsets [%llu, %llu] end before they begin", path, name,
                 (unsigned long long)b, (unsigned long long)end);
        return -1;
    }
    if (end > data_len) {
        sd_error("%s: tensor '%s': data_offsets [%llu, %llu] run past the end of the data (%llu bytes)", path, name,
                 (unsigned long long)b, (unsigned long long)end, (unsigned long long)data_len);
        return -1;
    }
    if (end - b != nbytes) {
        sd_error("%s: tensor '%s': data_offsets [%llu, %llu] do not match shape %s x %s (%llu bytes)", path, name,
                 (unsigned long long)b, (unsigned long long)end, shp, st_dtype_names[d], (unsigned long long)nbytes);
        return -1;
    }
    e->offset = b;
    e->nbytes = nbytes;
    return 0;
}

static int cmp_entry_name(const void *a, const void *b) {
    return strcmp((*(const st_entry *const *)a)->name, (*(const st_entry *const *)b)->name);
}

static int cmp_entry_offset(const void *a, const void *b) {
    const st_entry *x = *(const st_entry *const *)a, *y = *(const st_entry *const *)b;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    if (x->nbytes != y->nbytes) return x->nbytes < y->nbytes ? -1 : 1;
    return 0;
}

/* No two names alike, no two tensors sharing a byte: sort and compare neighbours. */
static int st_check_layout(const sd_safetensors *st) {
    if (st->n < 2) return 0;
    const st_entry **v = sd_malloc((size_t)st->n * sizeof *v);
    int rc = 0;
    for (int i = 0; i < st->n; i++) v[i] = &st->entries[i];
    qsort(v, (size_t)st->n, sizeof *v, cmp_entry_name);
    for (int i = 1; i < st->n && !rc; i++)
        if (strcmp(v[i - 1]->name, v[i]->name) == 0) {
            sd_error("%s: tensor '%s' appears twice in the header", st->path, v[i]->name);
            rc = -1;
        }
    qsort(v, (size_t)st->n, sizeof *v, cmp_entry_offset);
    for (int i = 1; i < st->n && !rc; i++)
        if (v[i - 1]->offset + v[i - 1]->nbytes > v[i]->offset) {
            sd_error("%s: tensors '%s' [%llu, %llu] and '%s' [%llu, %llu] overlap", st->path,
                     v[i - 1]->name, (unsigned long long)v[i - 1]->offset,
                     (unsigned long long)(v[i - 1]->offset + v[i - 1]->nbytes), v[i]->name,
                     (unsigned long long)v[i]->offset, (unsigned long long)(v[i]->offset + v[i]->nbytes));
            rc = -1;
        }
    free(v);
    return rc;
}

static int st_parse_header(sd_safetensors *st) {
    const char *path = st->path;
    const uint8_t *p = st->map;
    uint64_t hlen = sd_le64(p);
    if (hlen > ST_MAX_HEADER) {
        sd_error("%s: header length %llu exceeds the limit of %llu bytes (not a safetensors file?)", path,
                 (unsigned long long)hlen, (unsigned long long)ST_MAX_HEADER);
        return -1;
    }
    if (hlen > st->map_len - 8) {
        sd_error("%s: header length %llu runs past the end of the file (%llu bytes)", path,
                 (unsigned long long)hlen, (unsigned long long)st->map_len);
        return -1;
    }
    st->data = p + 8 + hlen;
    st->data_len = st->map_len - 8 - hlen;
    size_t wlen = strlen(path) + 16;
    char *what = sd_malloc(wlen);
    snprintf(what, wlen, "%s: header", path);
    sd_json h;
    int rc = json_parse((const char *)p + 8, (size_t)hlen, what, &h);
    free(what);
    if (rc) return -1;
    if (h.type != JSON_OBJECT) {
        sd_error("%s: header is not a JSON object", path);
        json_free(&h);
        return -1;
    }
    st->entries = sd_calloc((size_t)h.n + 1, sizeof *st->entries);
    for (int i = 0; i < h.n && rc == 0; i++) {
        const char *key = h.keys[i];
        if (strcmp(key, "__metadata__") == 0) {
            sbuf text = { 0 };
            if (st->metadata_json) {
                sd_error("%s: __metadata__ appears twice in the header", path);
                rc = -1;
            } else if (json_string_object_text(&h.items[i], &text) != 0) {
                sd_error("%s: __metadata__ is not an object of string values", path);
                rc = -1;
            }
            if (rc) free(text.s);
            else st->metadata_json = text.s;
            continue;
        }
        st_entry *e = &st->entries[st->n];
        if (st_parse_entry(path, key, &h.items[i], st->data_len, e)) { rc = -1; break; }
        e->name = sd_strdup(key);
        st->n++;
    }
    json_free(&h);
    if (rc == 0) rc = st_check_layout(st);
    return rc;
}

int st_open(sd_safetensors *st, const char *path) {
    memset(st, 0, sizeof *st);
    st->path = sd_strdup(path);
    if (st_load_bytes(st, path) != 0 || st_parse_header(st) != 0) {
        st_close(st);
        return -1;
    }
    return 0;
}

void st_close(sd_safetensors *st) {
    if (st->map) {
#ifdef SD_HAVE_MMAP
        if (st->mapped) munmap(st->map, (size_t)st->map_len);
        else free(st->map);
#else
        free(st->map);
#endif
    }
    for (int i = 0; i < st->n; i++) free(st->entries[i].name);
    free(st->entries);
    free(st->metadata_json);
    free(st->path);
    memset(st, 0, sizeof *st);
}

const st_entry *st_find(const sd_safetensors *st, const char *name) {
    for (int i = 0; i < st->n; i++)
        if (strcmp(st->entries[i].name, name) == 0) return &st->entries[i];
    return NULL;
}

/* Decode bytewise (little-endian, whatever the host) and convert to float32. */
void st_release(const sd_safetensors *st, const st_entry *e) {
#if defined(SD_HAVE_MMAP) && defined(MADV_DONTNEED)
    /* the mapping is read-only and file-backed: dropped pages come back from the file if read again */
    if (!st->mapped || !e->nbytes) return;
    long page = sysconf(_SC_PAGESIZE);
    if (page <= 0) return;
    uintptr_t a = (uintptr_t)(st->data + e->offset), b = a + (uintptr_t)e->nbytes;
    a = (a + (uintptr_t)page - 1) / (uintptr_t)page * (uintptr_t)page;   /* whole pages inside the tensor only */
    b = b / (uintptr_t)page * (uintptr_t)page;
    if (b > a) madvise((void *)a, (size_t)(b - a), MADV_DONTNEED);
#else
    (void)st;
    (void)e;
#endif
}

void st_read_f32(const sd_safetensors *st, const st_entry *e, float *dst) {
    const uint8_t *p = st->data + e->offset;
    size_t n = (size_t)(e->nbytes / st_dtype_sizes[e->dtype]);
    for (size_t i = 0; i < n; i++) {
        switch (e->dtype) {
        case ST_F64: dst[i] = (float)sd_f64_from_bits(sd_le64(p + 8 * i)); break;
        case ST_F32: dst[i] = sd_f32_from_bits(sd_le32(p + 4 * i)); break;
        case ST_F16: dst[i] = sd_f16_to_f32(sd_le16(p + 2 * i)); break;
        case ST_BF16: dst[i] = sd_bf16_to_f32(sd_le16(p + 2 * i)); break;
        case ST_I64: dst[i] = (float)(int64_t)sd_le64(p + 8 * i); break;
        case ST_I32: dst[i] = (float)(int32_t)sd_le32(p + 4 * i); break;
        case ST_I16: dst[i] = (float)(int16_t)sd_le16(p + 2 * i); break;
        case ST_I8: dst[i] = (float)(int8_t)p[i]; break;
        case ST_U8: dst[i] = (float)p[i]; break;
        case ST_BOOL: dst[i] = p[i] ? 1.0f : 0.0f; break;
        case ST_F8_E4M3: dst[i] = sd_e4m3_to_f32(p[i]); break;
        case ST_F8_E5M2: dst[i] = sd_e5m2_to_f32(p[i]); break;
        default: sd_fatal("st_read_f32: bad dtype");
        }
    }
}

/* ---- safetensors writer ---- */

void st_writer_init(st_writer *w) { memset(w, 0, sizeof *w); }

void st_writer_add_raw(st_writer *w, const char *name, st_dtype dt, int ndim, const int64_t *shape,
                       const void *le_bytes, size_t nbytes) {
    uint64_t numel = 1;
    if ((unsigned)dt >= ST_DTYPE_COUNT || ndim < 0 || ndim > 8) sd_fatal("st_writer_add_raw(%s): bad dtype or ndim", name);
    for (int i = 0; i < ndim; i++)
        if (shape[i] < 0 || mul_u64(numel, (uint64_t)shape[i], &numel)) sd_fatal("st_writer_add_raw(%s): bad shape", name);
    if (numel * st_dtype_sizes[dt] != nbytes) sd_fatal("st_writer_add_raw(%s): %zu bytes do not match the shape", name, nbytes);
    if (w->n == w->cap) {
        w->cap = w->cap ? w->cap * 2 : 16;
        w->entries = sd_realloc(w->entries, (size_t)w->cap * sizeof *w->entries);
        w->blobs = sd_realloc(w->blobs, (size_t)w->cap * sizeof *w->blobs);
    }
    st_entry *e = &w->entries[w->n];
    memset(e, 0, sizeof *e);
    e->name = sd_strdup(name);
    e->dtype = dt;
    e->ndim = ndim;
    for (int i = 0; i < ndim; i++) e->shape[i] = shape[i];
    e->nbytes = nbytes;
    w->blobs[w->n] = sd_malloc(nbytes);
    if (nbytes) memcpy(w->blobs[w->n], le_bytes, nbytes);
    w->n++;
}

/* numel of a shape given to a writer (negative entries are programmer errors) */
static size_t shape_numel(const char *name, int ndim, const int64_t *shape) {
    uint64_t numel = 1;
    for (int i = 0; i < ndim; i++)
        if (shape[i] < 0 || mul_u64(numel, (uint64_t)shape[i], &numel) || numel > SIZE_MAX / 8)
            sd_fatal("st_writer (%s): bad shape", name);
    return (size_t)numel;
}

void st_writer_add_f32(st_writer *w, const char *name, int ndim, const int64_t *shape, const float *data) {
    size_t n = shape_numel(name, ndim, shape);
    uint8_t *b = sd_malloc(4 * n);
    for (size_t i = 0; i < n; i++) {
        uint32_t u = sd_f32_bits(data[i]);
        if ((u & 0x7fffffffu) > 0x7f800000u) u = 0x7fc00000u;   /* one NaN: its sign and payload differ by CPU */
        for (int k = 0; k < 4; k++) b[4 * i + (size_t)k] = (uint8_t)(u >> (8 * k));
    }
    st_writer_add_raw(w, name, ST_F32, ndim, shape, b, 4 * n);
    free(b);
}

static void st_writer_add_16(st_writer *w, const char *name, int ndim, const int64_t *shape, const float *data,
                             st_dtype dt) {
    size_t n = shape_numel(name, ndim, shape);
    uint8_t *b = sd_malloc(2 * n);
    for (size_t i = 0; i < n; i++) {
        uint16_t h = dt == ST_F16 ? sd_f32_to_f16(data[i]) : sd_f32_to_bf16(data[i]);
        b[2 * i] = (uint8_t)h;
        b[2 * i + 1] = (uint8_t)(h >> 8);
    }
    st_writer_add_raw(w, name, dt, ndim, shape, b, 2 * n);
    free(b);
}

void st_writer_add_f16(st_writer *w, const char *name, int ndim, const int64_t *shape, const float *data) {
    st_writer_add_16(w, name, ndim, shape, data, ST_F16);
}

void st_writer_add_bf16(st_writer *w, const char *name, int ndim, const int64_t *shape, const float *data) {
    st_writer_add_16(w, name, ndim, shape, data, ST_BF16);
}

void st_writer_set_metadata(st_writer *w, const char *json_object) {
    free(w->metadata_json);
    w->metadata_json = json_object ? sd_strdup(json_object) : NULL;
}

/* Header: {"__metadata__":{...},"name":{"dtype":..,"shape":[..],"data_offsets":[b,e]},...} in
 * insertion order, data contiguous in the same order, padded with spaces so the data section
 * starts at a multiple of 8 (as the Rust safetensors library does). */
int st_writer_write(st_writer *w, const char *path) {
    sbuf h = { 0 };
    sbuf_putc(&h, '{');
    if (w->metadata_json) {
        sd_json m;
        size_t wlen = strlen(path) + 16;
        char *what = sd_malloc(wlen);
        snprintf(what, wlen, "%s: metadata", path);
        int bad = json_parse(w->metadata_json, strlen(w->metadata_json), what, &m) != 0;
        free(what);
        sbuf_put(&h, "\"__metadata__\":", 15);
        if (!bad && json_string_object_text(&m, &h) != 0) {
            sd_error("%s: metadata is not a JSON object of string values", path);
            bad = 1;
        }
        json_free(&m);
        if (bad) {
            free(h.s);
            return -1;
        }
    }
    uint64_t off = 0;
    for (int i = 0; i < w->n; i++) {
        const st_entry *e = &w->entries[i];
        for (int j = 0; j < i; j++)
            if (strcmp(w->entries[j].name, e->name) == 0) {
                free(h.s);
                sd_error("%s: tensor '%s' added twice", path, e->name);
                return -1;
            }
        if (h.n > 1) sbuf_putc(&h, ',');
        json_escape(&h, e->name, strlen(e->name));
        sbuf_printf(&h, ":{\"dtype\":\"%s\",\"shape\":[", st_dtype_names[e->dtype]);
        for (int k = 0; k < e->ndim; k++) sbuf_printf(&h, k ? ",%lld" : "%lld", (long long)e->shape[k]);
        sbuf_printf(&h, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)off, (unsigned long long)(off + e->nbytes));
        off += e->nbytes;
    }
    sbuf_putc(&h, '}');
    while (h.n % 8) sbuf_putc(&h, ' ');
    uint8_t len8[8];
    for (int k = 0; k < 8; k++) len8[k] = (uint8_t)((uint64_t)h.n >> (8 * k));
    sd_outfile o;
    if (sd_out_open(&o, path)) {
        free(h.s);
        return -1;
    }
    fwrite(len8, 1, 8, o.f);
    fwrite(h.s, 1, h.n, o.f);
    free(h.s);
    for (int i = 0; i < w->n; i++)
        if (w->entries[i].nbytes) fwrite(w->blobs[i], 1, (size_t)w->entries[i].nbytes, o.f);
    return sd_out_commit(&o);
}

void st_writer_free(st_writer *w) {
    for (int i = 0; i < w->n; i++) {
        free(w->entries[i].name);
        free(w->blobs[i]);
    }
    free(w->entries);
    free(w->blobs);
    free(w->metadata_json);
    memset(w, 0, sizeof *w);
}

/* ==== .npy ==================================================================================
 * "\x93NUMPY", version (1.0: 2-byte header length; 2.0 and 3.0: 4-byte), then a Python dict
 * literal {'descr': '<f4', 'fortran_order': False, 'shape': (1, 77), } padded with spaces and
 * '\n', then the array in C order. */

typedef struct npy_descr { const char *text; npy_dtype dt; int size, big; } npy_descr;
static const npy_descr npy_descrs[] = {
    { "<f4", NPY_F32, 4, 0 }, { ">f4", NPY_F32, 4, 1 }, { "<f8", NPY_F64, 8, 0 }, { ">f8", NPY_F64, 8, 1 },
    { "<i8", NPY_I64, 8, 0 }, { ">i8", NPY_I64, 8, 1 }, { "<i4", NPY_I32, 4, 0 }, { ">i4", NPY_I32, 4, 1 },
    { "|u1", NPY_U8, 1, 0 },  { "|b1", NPY_U8, 1, 0 },  { "<u2", NPY_U16, 2, 0 }, { ">u2", NPY_U16, 2, 1 },
    { "<f2", NPY_F16, 2, 0 }, { ">f2", NPY_F16, 2, 1 },
};
#define NPY_NDESCR ((int)(sizeof npy_descrs / sizeof npy_descrs[0]))

static int npy_size(npy_dtype dt) {
    switch (dt) {
    case NPY_F64: case NPY_I64: return 8;
    case NPY_F32: case NPY_I32: return 4;
    case NPY_U16: case NPY_F16: return 2;
    default: return 1;
    }
}

typedef struct npy_lexer { const char *path; const uint8_t *s; size_t len, pos; } npy_lexer;

static int npy_fail(const npy_lexer *x, const char *msg) {
    sd_error("%s: .npy header byte %zu: %s", x->path, x->pos, msg);
    return -1;
}

static void npy_ws(npy_lexer *x) {
    while (x->pos < x->len && (x->s[x->pos] == ' ' || x->s[x->pos] == '\t' || x->s[x->pos] == '\n' || x->s[x->pos] == '\r'))
        x->pos++;
}

static int npy_expect(npy_lexer *x, char c, const char *msg) {
    npy_ws(x);
    if (x->pos >= x->len || x->s[x->pos] != c) return npy_fail(x, msg);
    x->pos++;
    return 0;
}

/* A quoted Python string ('...' or "...", printable ASCII, no escapes) into buf. */
static int npy_quoted(npy_lexer *x, char *buf, size_t n) {
    npy_ws(x);
    if (x->pos >= x->len || (x->s[x->pos] != '\'' && x->s[x->pos] != '"')) return npy_fail(x, "expected a quoted string");
    uint8_t q = x->s[x->pos++];
    size_t k = 0;
    while (x->pos < x->len && x->s[x->pos] != q) {
        uint8_t c = x->s[x->pos];
        if (c < 0x20 || c > 0x7e || c == '\\' || k + 1 >= n) return npy_fail(x, "unexpected string");
        buf[k++] = (char)c;
        x->pos++;
    }
    if (x->pos >= x->len) return npy_fail(x, "unterminated string");
    x->pos++;
    buf[k] = 0;
    return 0;
}

/* shape: () or (a,) or (a, b, ...) with an optional trailing comma; Python 2's 3L accepted. */
static int npy_shape(npy_lexer *x, int *ndim, int64_t shape[8]) {
    int comma = 0;                       /* the last entry was followed by ',' */
    if (npy_expect(x, '(', "shape is not a tuple")) return -1;
    *ndim = 0;
    for (;;) {
        npy_ws(x);
        if (x->pos < x->len && x->s[x->pos] == ')') {
            /* "(5)" is an int in Python, not a tuple; numpy writes "(5,)" */
            if (*ndim == 1 && !comma) return npy_fail(x, "a one-dimensional shape needs a trailing comma");
            x->pos++;
            return 0;
        }
        if (*ndim > 0 && !comma) return npy_fail(x, "expected ',' or ')' in shape");
        if (*ndim == 8) return npy_fail(x, "more than 8 dimensions");
        if (x->pos >= x->len || x->s[x->pos] < '0' || x->s[x->pos] > '9') return npy_fail(x, "shape entry is not a non-negative integer");
        uint64_t v = 0;
        while (x->pos < x->len && x->s[x->pos] >= '0' && x->s[x->pos] <= '9') {
            v = v * 10 + (uint64_t)(x->s[x->pos++] - '0');
            if (v > ((uint64_t)1 << 53)) return npy_fail(x, "shape entry is absurdly large");
        }
        if (x->pos < x->len && x->s[x->pos] == 'L') x->pos++;
        shape[(*ndim)++] = (int64_t)v;
        npy_ws(x);
        comma = x->pos < x->len && x->s[x->pos] == ',';
        if (comma) x->pos++;
    }
}

static int npy_parse_header(npy_lexer *x, const npy_descr **descr, int *ndim, int64_t shape[8]) {
    int have_descr = 0, have_fortran = 0, have_shape = 0;
    if (npy_expect(x, '{', "header is not a dict")) return -1;
    for (;;) {
        char key[32], val[32];
        npy_ws(x);
        if (x->pos < x->len && x->s[x->pos] == '}') { x->pos++; break; }
        if (npy_quoted(x, key, sizeof key) || npy_expect(x, ':', "expected ':'")) return -1;
        if (strcmp(key, "descr") == 0 && !have_descr) {
            have_descr = 1;
            if (npy_quoted(x, val, sizeof val)) return -1;
            int i = 0;
            while (i < NPY_NDESCR && strcmp(val, npy_descrs[i].text) != 0) i++;
            if (i == NPY_NDESCR) {
                sd_error("%s: unsupported .npy dtype '%s'", x->path, val);
                return -1;
            }
            *descr = &npy_descrs[i];
        } else if (strcmp(key, "fortran_order") == 0 && !have_fortran) {
            have_fortran = 1;
            npy_ws(x);
            if (x->len - x->pos >= 4 && memcmp(x->s + x->pos, "True", 4) == 0) {
                sd_error("%s: Fortran order not supported (save the array in C order)", x->path);
                return -1;
            }
            if (x->len - x->pos < 5 || memcmp(x->s + x->pos, "False", 5) != 0) return npy_fail(x, "fortran_order is not True or False");
            x->pos += 5;
        } else if (strcmp(key, "shape") == 0 && !have_shape) {
            have_shape = 1;
            if (npy_shape(x, ndim, shape)) return -1;
        } else {
            return npy_fail(x, "unexpected or repeated key in the header dict");
        }
        npy_ws(x);
        if (x->pos < x->len && x->s[x->pos] == ',') { x->pos++; continue; }
        if (x->pos < x->len && x->s[x->pos] == '}') { x->pos++; break; }
        return npy_fail(x, "expected ',' or '}'");
    }
    npy_ws(x);
    if (x->pos != x->len) return npy_fail(x, "unexpected characters after the header dict");
    if (!have_descr || !have_shape || !have_fortran) {
        sd_error("%s: .npy header lacks '%s'", x->path, !have_descr ? "descr" : !have_shape ? "shape" : "fortran_order");
        return -1;
    }
    return 0;
}

int npy_read(const char *path, sd_npy *out) {
    uint8_t *buf;
    size_t len;
    memset(out, 0, sizeof *out);
    if (sd_read_file(path, &buf, &len)) return -1;
    int rc = -1;
    size_t hstart;
    uint64_t hlen;
    const npy_descr *d = NULL;
    if (len < 10 || memcmp(buf, "\x93NUMPY", 6) != 0) {
        sd_error("%s: not a .npy file (bad magic)", path);
        goto done;
    }
    if ((buf[6] != 1 && buf[6] != 2 && buf[6] != 3) || buf[7] != 0) {
        sd_error("%s: unsupported .npy version %d.%d", path, buf[6], buf[7]);
        goto done;
    }
    hstart = buf[6] == 1 ? 10 : 12;
    if (len < hstart) {
        sd_error("%s: truncated .npy header", path);
        goto done;
    }
    hlen = buf[6] == 1 ? sd_le16(buf + 8) : sd_le32(buf + 8);
    if (hlen > len - hstart) {
        sd_error("%s: .npy header length %llu runs past the end of the file (%zu bytes)", path, (unsigned long long)hlen, len);
        goto done;
    }
    npy_lexer x = { path, buf + hstart, (size_t)hlen, 0 };
    if (npy_parse_header(&x, &d, &out->ndim, out->shape)) goto done;
    uint64_t n = 1, nbytes = 0;
    int absurd = 0;
    for (int i = 0; i < out->ndim; i++) absurd |= mul_u64(n, (uint64_t)out->shape[i], &n);
    absurd |= mul_u64(n, (uint64_t)d->size, &nbytes);
    size_t have = len - hstart - (size_t)hlen;
    char shp[160];
    shape_text(shp, sizeof shp, out->ndim, out->shape);
    if (absurd) {
        sd_error("%s: .npy shape %s is absurdly large", path, shp);
        goto done;
    }
    if (nbytes != have) {
        sd_error("%s: .npy data is %zu bytes but shape %s x '%s' needs %llu%s", path, have, shp, d->text,
                 (unsigned long long)nbytes, nbytes > have ? " (truncated file)" : "");
        goto done;
    }
    out->dtype = d->dt;
    out->n = (size_t)n;
    out->data = sd_malloc((size_t)nbytes);
    /* bytewise decode of either byte order into host order */
    const uint8_t *src = buf + hstart + hlen;
    for (size_t i = 0; i < out->n; i++) {
        uint64_t v = 0;
        for (int k = 0; k < d->size; k++) {
            int byte = d->big ? d->size - 1 - k : k;   /* significance of the k-th byte */
            v |= (uint64_t)src[i * (size_t)d->size + (size_t)k] << (8 * byte);
        }
        switch (d->size) {
        case 8: ((uint64_t *)out->data)[i] = v; break;
        case 4: ((uint32_t *)out->data)[i] = (uint32_t)v; break;
        case 2: ((uint16_t *)out->data)[i] = (uint16_t)v; break;
        default: ((uint8_t *)out->data)[i] = strcmp(d->text, "|b1") == 0 ? (v != 0) : (uint8_t)v;
        }
    }
    rc = 0;
done:
    free(buf);
    return rc;
}

void npy_free(sd_npy *a) {
    free(a->data);
    memset(a, 0, sizeof *a);
}

int npy_read_f32(const char *path, float **data, int *ndim, int64_t shape[8], size_t *n) {
    sd_npy a;
    if (npy_read(path, &a)) return -1;
    float *f = sd_malloc(a.n * sizeof *f);
    for (size_t i = 0; i < a.n; i++) {
        switch (a.dtype) {
        case NPY_F32: f[i] = sd_f32_from_bits(((uint32_t *)a.data)[i]); break;
        case NPY_F64: f[i] = (float)sd_f64_from_bits(((uint64_t *)a.data)[i]); break;
        case NPY_I64: f[i] = (float)(int64_t)((uint64_t *)a.data)[i]; break;
        case NPY_I32: f[i] = (float)(int32_t)((uint32_t *)a.data)[i]; break;
        case NPY_U8: f[i] = (float)((uint8_t *)a.data)[i]; break;
        case NPY_U16: f[i] = (float)((uint16_t *)a.data)[i]; break;
        case NPY_F16: f[i] = sd_f16_to_f32(((uint16_t *)a.data)[i]); break;
        }
    }
    *data = f;
    if (ndim) *ndim = a.ndim;
    if (shape) memcpy(shape, a.shape, sizeof a.shape);
    if (n) *n = a.n;
    npy_free(&a);
    return 0;
}

/* Version 1.0, little-endian, header padded as numpy pads it: room for the first dimension to
 * grow to 21 digits, then spaces to a multiple of 64 bytes, ending in '\n'. */
int npy_write(const char *path, npy_dtype dt, int ndim, const int64_t *shape, const void *data) {
    static const char *const descr[] = { "<f4", "<f8", "<i8", "<i4", "|u1", "<u2", "<f2" };
    if ((unsigned)dt > NPY_F16 || ndim < 0 || ndim > 8) sd_fatal("npy_write: bad dtype or ndim");
    sbuf h = { 0 };
    sbuf_printf(&h, "{'descr': '%s', 'fortran_order': False, 'shape': (", descr[dt]);
    size_t n = 1;
    for (int i = 0; i < ndim; i++) {
        sbuf_printf(&h, i ? ", %lld" : "%lld", (long long)shape[i]);
        n *= (size_t)shape[i];
    }
    sbuf_printf(&h, "%s), }", ndim == 1 ? "," : "");
    if (ndim > 0) {
        char first[32];
        int digits = snprintf(first, sizeof first, "%lld", (long long)shape[0]);
        for (int i = digits; i < 21; i++) sbuf_putc(&h, ' ');
    }
    while ((10 + h.n + 1) % 64) sbuf_putc(&h, ' ');
    sbuf_putc(&h, '\n');
    uint8_t pre[10] = { 0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (uint8_t)h.n, (uint8_t)(h.n >> 8) };
    sd_outfile o;
    if (sd_out_open(&o, path)) {
        free(h.s);
        return -1;
    }
    fwrite(pre, 1, 10, o.f);
    fwrite(h.s, 1, h.n, o.f);
    free(h.s);
    int size = npy_size(dt);
    uint8_t chunk[4096];
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {   /* little-endian bytes whatever the host */
        uint64_t v;
        switch (size) {
        case 8: v = ((const uint64_t *)data)[i]; break;
        case 4: v = ((const uint32_t *)data)[i]; break;
        case 2: v = ((const uint16_t *)data)[i]; break;
        default: v = ((const uint8_t *)data)[i];
        }
        for (int b = 0; b < size; b++) chunk[k++] = (uint8_t)(v >> (8 * b));
        if (k + 8 > sizeof chunk) { fwrite(chunk, 1, k, o.f); k = 0; }
    }
    fwrite(chunk, 1, k, o.f);
    return sd_out_commit(&o);
}

int npy_write_tensor(const char *path, const sd_tensor *t) {
    int64_t shape[4];
    for (int i = 0; i < t->ndim; i++) shape[i] = t->shape[i];
    /* NaN written as one pattern (0x7fc00000): arithmetic makes NaNs whose sign differs between
     * x86 and ARM, and the files must be the same on every machine */
    size_t n = tensor_numel(t), nan = 0;
    for (size_t i = 0; i < n; i++) nan += t->data[i] != t->data[i];
    if (!nan) return npy_write(path, NPY_F32, t->ndim, shape, t->data);
    float *c = sd_malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) c[i] = t->data[i] != t->data[i] ? sd_f32_from_bits(0x7fc00000u) : t->data[i];
    int rc = npy_write(path, NPY_F32, t->ndim, shape, c);
    free(c);
    return rc;
}
