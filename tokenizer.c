/* tokenizer.c — CLIP's byte-level BPE tokenizer with OpenAI's text clean-up.
 *
 * What "correct" means is OpenAI's clip/simple_tokenizer.py with ftfy 6.3.1, python-regex 2.5.123
 * and CPython 3.11 (shared/tokenizer/README.md):
 *   ftfy.fix_text -> html.unescape twice -> strip -> \s+ to one space -> strip -> str.lower
 *   -> regex pre-tokenization -> UTF-8 bytes as bytes_to_unicode symbols -> BPE by lowest merge rank.
 * Text is handled as arrays of code points (like a Python str); the character data comes from
 * unicode_tables.h, made by tools/gen_unicode_tables.py from that same Python.
 */
#include "sdref.h"
#include "unicode_tables.h"
#include <stdlib.h>
#include <string.h>

#define COUNT(a) (sizeof(a) / sizeof((a)[0]))

/* ======================================================================================
 * Code point strings
 * ====================================================================================== */

typedef struct ustr { uint32_t *c; size_t n, cap; } ustr;

static void us_push(ustr *s, uint32_t c) {
    if (s->n == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 64;
        s->c = sd_realloc(s->c, s->cap * sizeof(uint32_t));
    }
    s->c[s->n++] = c;
}

static void us_push_n(ustr *s, const uint32_t *c, size_t n) {
    for (size_t i = 0; i < n; i++) us_push(s, c[i]);
}

static void us_free(ustr *s) { free(s->c); s->c = NULL; s->n = s->cap = 0; }

/* Replace *dst by *src (src is emptied). */
static void us_move(ustr *dst, ustr *src) { us_free(dst); *dst = *src; memset(src, 0, sizeof *src); }

static int us_equal(const ustr *a, const ustr *b) {
    return a->n == b->n && (a->n == 0 || memcmp(a->c, b->c, a->n * sizeof(uint32_t)) == 0);
}

/* Strict UTF-8 (as Python decodes bytes): no overlong forms, no surrogates, nothing above U+10FFFF.
 * `variants` adds ftfy's "utf-8-variants": C0 80 is U+0000 and CESU-8 surrogate pairs decode.
 * Returns the byte offset of the first error, or -1 when all decoded. */
static long utf8_decode(const uint8_t *p, size_t n, int variants, ustr *out) {
    size_t i = 0;
    while (i < n) {
        uint8_t b = p[i];
        if (b < 0x80) { us_push(out, b); i++; continue; }
        if (variants && b == 0xC0 && i + 1 < n && p[i + 1] == 0x80) { us_push(out, 0); i += 2; continue; }
        if (variants && b == 0xED && i + 5 < n && p[i + 1] >= 0xA0 && p[i + 1] <= 0xAF && (p[i + 2] & 0xC0) == 0x80 &&
            p[i + 3] == 0xED && p[i + 4] >= 0xB0 && p[i + 4] <= 0xBF && (p[i + 5] & 0xC0) == 0x80) {
            us_push(out, 0x10000 + ((uint32_t)(p[i + 1] & 0x0F) << 16) + ((uint32_t)(p[i + 2] & 0x3F) << 10) +
                             ((uint32_t)(p[i + 4] & 0x0F) << 6) + (p[i + 5] & 0x3F));
            i += 6;
            continue;
        }
        int len = b >= 0xF0 ? 4 : b >= 0xE0 ? 3 : 2;
        uint32_t lo = 0x80, hi = 0xBF;      /* allowed range of the second byte */
        if (b < 0xC2 || b > 0xF4) return (long)i;
        if (b == 0xE0) lo = 0xA0;
        if (b == 0xED) hi = 0x9F;
        if (b == 0xF0) lo = 0x90;
        if (b == 0xF4) hi = 0x8F;
        if (i + (size_t)len > n || p[i + 1] < lo || p[i + 1] > hi) return (long)i;
        uint32_t c = b & (0xFF >> (len + 1));
        for (int k = 1; k < len; k++) {
            if ((p[i + k] & 0xC0) != 0x80) return (long)i;
            c = (c << 6) | (p[i + k] & 0x3F);
        }
        us_push(out, c);
        i += (size_t)len;
    }
    return -1;
}

/* Append the UTF-8 bytes of c to buf (4 bytes room needed); returns the count. */
static int utf8_put(uint32_t c, char *buf) {
    if (c < 0x80) { buf[0] = (char)c; return 1; }
    if (c < 0x800) { buf[0] = (char)(0xC0 | (c >> 6)); buf[1] = (char)(0x80 | (c & 0x3F)); return 2; }
    if (c < 0x10000) {
        buf[0] = (char)(0xE0 | (c >> 12)); buf[1] = (char)(0x80 | ((c >> 6) & 0x3F));
        buf[2] = (char)(0x80 | (c & 0x3F));
        return 3;
    }
    buf[0] = (char)(0xF0 | (c >> 18)); buf[1] = (char)(0x80 | ((c >> 12) & 0x3F));
    buf[2] = (char)(0x80 | ((c >> 6) & 0x3F)); buf[3] = (char)(0x80 | (c & 0x3F));
    return 4;
}

/* Code points -> malloc'ed NUL-terminated UTF-8; *len (optional) gets the byte count. */
static char *utf8_encode(const uint32_t *c, size_t n, size_t *len) {
    char *s = sd_malloc(4 * n + 1);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) k += (size_t)utf8_put(c[i], s + k);
    s[k] = 0;
    if (len) *len = k;
    return s;
}

/* Append a UTF-8 literal from the tables (always valid). */
static void us_push_utf8(ustr *s, const char *utf8) {
    utf8_decode((const uint8_t *)utf8, strlen(utf8), 0, s);
}

/* ======================================================================================
 * Character properties (binary searches in unicode_tables.h)
 * ====================================================================================== */

static int in_ranges(const uint32_t (*r)[2], size_t n, uint32_t c) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (c < r[mid][0]) hi = mid;
        else if (c > r[mid][1]) lo = mid + 1;
        else return 1;
    }
    return 0;
}
#define IN_RANGES(table, c) in_ranges(table, COUNT(table), (c))

static int is_letter(uint32_t c) { return c < 0x80 ? ((c | 32) >= 'a' && (c | 32) <= 'z') : IN_RANGES(uni_letter, c); }
static int is_number(uint32_t c) { return c < 0x80 ? (c >= '0' && c <= '9') : IN_RANGES(uni_number, c); }
static int is_space_regex(uint32_t c) { return IN_RANGES(uni_space_regex, c); }   /* python-regex \s */
static int is_space_py(uint32_t c) { return IN_RANGES(uni_space_py, c); }         /* str.isspace, re \s */
static int is_word_re(uint32_t c) { return IN_RANGES(uni_word_re, c); }           /* re \w */
static int is_ascii_lower(uint32_t c) { return c >= 'a' && c <= 'z'; }
static int is_ascii_alpha(uint32_t c) { return (c | 32) >= 'a' && (c | 32) <= 'z'; }

/* ======================================================================================
 * str.lower (full mappings, final sigma)
 * ====================================================================================== */

static uint32_t lower_simple(uint32_t c) {
    size_t lo = 0, hi = COUNT(uni_lower_runs);      /* find the last run with first <= c */
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (uni_lower_runs[mid].first <= c) lo = mid + 1; else hi = mid;
    }
    if (lo == 0) return c;
    lo--;
    uint32_t first = uni_lower_runs[lo].first, stride = uni_lower_runs[lo].stride;
    if (c > uni_lower_runs[lo].last || (stride == 0 ? c != first : (c - first) % stride != 0)) return c;
    return (uint32_t)((int32_t)c + uni_lower_runs[lo].delta);
}

/* U+03A3 becomes final sigma after a cased letter (case-ignorables skipped) when no cased letter
 * follows (case-ignorables skipped): CPython's handle_capital_sigma. */
static int final_sigma(const uint32_t *s, size_t n, size_t i) {
    size_t j = i;
    while (j > 0 && IN_RANGES(uni_case_ignorable, s[j - 1])) j--;
    if (j == 0 || !IN_RANGES(uni_cased, s[j - 1])) return 0;
    j = i + 1;
    while (j < n && IN_RANGES(uni_case_ignorable, s[j])) j++;
    return j == n || !IN_RANGES(uni_cased, s[j]);
}

static void str_lower(const ustr *in, ustr *out) {
    for (size_t i = 0; i < in->n; i++) {
        uint32_t c = in->c[i];
        if (c < 0x80) { us_push(out, c >= 'A' && c <= 'Z' ? c + 32 : c); continue; }
        if (c == 0x3A3) { us_push(out, final_sigma(in->c, in->n, i) ? 0x3C2 : 0x3C3); continue; }
        size_t k = 0;
        while (k < COUNT(uni_lower_multi) && uni_lower_multi[k].cp != c) k++;
        if (k < COUNT(uni_lower_multi)) us_push_utf8(out, uni_lower_multi[k].utf8);
        else us_push(out, lower_simple(c));
    }
}

/* ======================================================================================
 * NFC (canonical decomposition, canonical order, canonical composition; Hangul by formula)
 * ====================================================================================== */

enum { HANGUL_S = 0xAC00, HANGUL_L = 0x1100, HANGUL_V = 0x1161, HANGUL_T = 0x11A7,
       HANGUL_LCOUNT = 19, HANGUL_VCOUNT = 21, HANGUL_TCOUNT = 28, HANGUL_SCOUNT = 11172 };

static int ccc_of(uint32_t c) {
    if (c < 0x300) return 0;
    size_t lo = 0, hi = COUNT(uni_ccc);
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (c < uni_ccc[mid].lo) hi = mid;
        else if (c > uni_ccc[mid].hi) lo = mid + 1;
        else return uni_ccc[mid].ccc;
    }
    return 0;
}

static long decomp_index(uint32_t c) {
    size_t lo = 0, hi = COUNT(uni_decomp);
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (c < uni_decomp[mid][0]) hi = mid;
        else if (c > uni_decomp[mid][0]) lo = mid + 1;
        else return (long)mid;
    }
    return -1;
}

static void decompose_push(ustr *out, uint32_t c) {
    if (c >= HANGUL_S && c < HANGUL_S + HANGUL_SCOUNT) {
        uint32_t s = c - HANGUL_S;
        us_push(out, HANGUL_L + s / (HANGUL_VCOUNT * HANGUL_TCOUNT));
        us_push(out, HANGUL_V + (s % (HANGUL_VCOUNT * HANGUL_TCOUNT)) / HANGUL_TCOUNT);
        if (s % HANGUL_TCOUNT) us_push(out, HANGUL_T + s % HANGUL_TCOUNT);
        return;
    }
    long k = c < 0xC0 ? -1 : decomp_index(c);
    if (k < 0) { us_push(out, c); return; }
    decompose_push(out, uni_decomp[k][1]);
    if (uni_decomp[k][2]) decompose_push(out, uni_decomp[k][2]);
}

/* The primary composite of (a, b), or 0. */
static uint32_t compose_pair(uint32_t a, uint32_t b) {
    if (a >= HANGUL_L && a < HANGUL_L + HANGUL_LCOUNT && b >= HANGUL_V && b < HANGUL_V + HANGUL_VCOUNT)
        return HANGUL_S + ((a - HANGUL_L) * HANGUL_VCOUNT + (b - HANGUL_V)) * HANGUL_TCOUNT;
    if (a >= HANGUL_S && a < HANGUL_S + HANGUL_SCOUNT && (a - HANGUL_S) % HANGUL_TCOUNT == 0 &&
        b > HANGUL_T && b < HANGUL_T + HANGUL_TCOUNT)
        return a + (b - HANGUL_T);
    if (!IN_RANGES(uni_comp_second, b)) return 0;
    for (size_t k = 0; k < COUNT(uni_decomp); k++) {     /* rare: b is a combining mark */
        if (uni_decomp[k][1] != a || uni_decomp[k][2] != b) continue;
        for (size_t e = 0; e < COUNT(uni_comp_excluded); e++)
            if (uni_comp_excluded[e] == uni_decomp[k][0]) return 0;
        return uni_decomp[k][0];
    }
    return 0;
}

static void nfc(ustr *s) {
    size_t i;
    for (i = 0; i < s->n && s->c[i] < 0x300; i++) {}
    if (i == s->n) return;          /* nothing below U+0300 decomposes differently or composes */
    ustr d = {0};
    for (i = 0; i < s->n; i++) decompose_push(&d, s->c[i]);
    for (i = 1; i < d.n; i++) {     /* canonical order: stable sort of each run of non-starters */
        int cc = ccc_of(d.c[i]);
        if (cc == 0) continue;
        for (size_t j = i; j > 0 && ccc_of(d.c[j - 1]) > cc; j--) {
            uint32_t t = d.c[j]; d.c[j] = d.c[j - 1]; d.c[j - 1] = t;
        }
    }
    ustr out = {0};
    long starter = -1;
    int last_cc = 0;
    for (i = 0; i < d.n; i++) {
        uint32_t c = d.c[i];
        int cc = ccc_of(c);
        if (starter >= 0) {
            int adjacent = (size_t)starter == out.n - 1;
            if (adjacent || (last_cc != 0 && last_cc < cc)) {
                uint32_t comp = compose_pair(out.c[starter], c);
                if (comp) { out.c[starter] = comp; continue; }
            }
        }
        if (cc == 0) starter = (long)out.n;
        last_cc = cc;
        us_push(&out, c);
    }
    us_free(&d);
    us_move(s, &out);
}

/* ======================================================================================
 * HTML character references
 * ====================================================================================== */

/* Index of an html5 entity name (without ';'), or -1. Non-ASCII names never match. */
static long html5_find(const char *name) {
    size_t lo = 0, hi = COUNT(html5_entities);
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        int d = strcmp(name, html5_entities[mid].name);
        if (d == 0) return (long)mid;
        if (d < 0) hi = mid; else lo = mid + 1;
    }
    return -1;
}

static void push_entity(ustr *out, long k) {
    us_push(out, html5_entities[k].cp[0]);
    if (html5_entities[k].cp[1]) us_push(out, html5_entities[k].cp[1]);
}

/* Python html.unescape's numeric rule for code point `num` (saturated above 0x10FFFF). */
static void push_charref(ustr *out, uint32_t num) {
    for (size_t k = 0; k < COUNT(html_invalid_charrefs); k++)
        if (html_invalid_charrefs[k][0] == num) { us_push(out, html_invalid_charrefs[k][1]); return; }
    if ((num >= 0xD800 && num <= 0xDFFF) || num > 0x10FFFF) { us_push(out, 0xFFFD); return; }
    if (IN_RANGES(html_invalid_codepoints, num)) return;
    us_push(out, num);
}

static int hex_value(uint32_t c) {
    if (c >= '0' && c <= '9') return (int)(c - '0');
    if ((c | 32) >= 'a' && (c | 32) <= 'f') return (int)((c | 32) - 'a' + 10);
    return -1;
}

/* Parse digits (base 10 or 16) of s[i..]: returns the count, the value saturated at 0x110000. */
static size_t parse_number(const uint32_t *s, size_t n, size_t i, int base, uint32_t *value) {
    size_t k = i;
    uint32_t v = 0;
    while (k < n) {
        int d = base == 16 ? hex_value(s[k]) : (s[k] >= '0' && s[k] <= '9' ? (int)(s[k] - '0') : -1);
        if (d < 0) break;
        v = v * (uint32_t)base + (uint32_t)d;     /* v <= 0x110000 before, so no overflow */
        if (v > 0x110000) v = 0x110000;
        k++;
    }
    *value = v;
    return k - i;
}

/* Python's html.unescape: regex &(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?), named
 * references by exact name, else the longest legacy (no ';') prefix of at least 2 characters. */
static void html_unescape(const ustr *in, ustr *out) {
    const uint32_t *s = in->c;
    size_t n = in->n, i = 0;
    while (i < n) {
        if (s[i] != '&') { us_push(out, s[i++]); continue; }
        size_t j = i + 1;
        if (j < n && s[j] == '#') {
            uint32_t num;
            size_t nd;
            if ((nd = parse_number(s, n, j + 1, 10, &num)) > 0) j = j + 1 + nd;
            else if (j + 1 < n && (s[j + 1] | 32) == 'x' && (nd = parse_number(s, n, j + 2, 16, &num)) > 0) j = j + 2 + nd;
            else { us_push(out, s[i++]); continue; }
            if (j < n && s[j] == ';') j++;
            push_charref(out, num);
            i = j;
            continue;
        }
        char name[34];
        size_t len = 0;
        while (j < n && len < 32 && s[j] != '\t' && s[j] != '\n' && s[j] != '\f' && s[j] != ' ' && s[j] != '<' &&
               s[j] != '&' && s[j] != '#' && s[j] != ';') {
            name[len++] = s[j] < 0x80 ? (char)s[j] : '\x01';
            j++;
        }
        if (len == 0) { us_push(out, s[i++]); continue; }
        int semicolon = j < n && s[j] == ';';
        name[len] = 0;
        long k = html5_find(name);
        if (k >= 0 && (semicolon || (html5_entities[k].flags & 1))) {
            push_entity(out, k);
            i = j + (size_t)semicolon;
            continue;
        }
        /* the longest legacy prefix: s[:x] for x from len(s)-1 down to 2 (s counts the ';') */
        size_t x = len + (size_t)semicolon - 1;
        if (x > len) x = len;
        for (; x >= 2; x--) {
            char c = name[x];
            name[x] = 0;
            k = html5_find(name);
            name[x] = c;
            if (k >= 0 && (html5_entities[k].flags & 1)) break;
        }
        if (x >= 2) {
            push_entity(out, k);
            i = i + 1 + x;          /* the rest of the match is kept as text */
        } else {
            us_push(out, s[i++]);   /* '&' + s: unchanged */
        }
    }
}

/* ftfy's unescape_html: &#?[0-9A-Za-z]{1,24}; replaced when it is an html5 name with ';', an
 * upper-cased one that ftfy accepts, or a numeric reference html.unescape decodes completely. */
static void ftfy_unescape_html(const ustr *in, ustr *out) {
    const uint32_t *s = in->c;
    size_t n = in->n, i = 0;
    while (i < n) {
        if (s[i] != '&') { us_push(out, s[i++]); continue; }
        size_t j = i + 1;
        int numeric = j < n && s[j] == '#';
        if (numeric) j++;
        size_t start = j;
        while (j < n && j - start < 24 && s[j] < 0x80 && (is_ascii_alpha(s[j]) || (s[j] >= '0' && s[j] <= '9'))) j++;
        if (j == start || j >= n || s[j] != ';') { us_push(out, s[i++]); continue; }
        size_t end = j + 1;         /* the match is s[i..end) */
        if (!numeric) {
            char name[25];
            size_t len = j - start;
            for (size_t k = 0; k < len; k++) name[k] = (char)s[start + k];
            name[len] = 0;
            long k = html5_find(name);
            if (k >= 0) push_entity(out, k);
            else {
                char lower[25];
                int all_upper = 1;
                for (size_t q = 0; q <= len; q++) {
                    lower[q] = (name[q] >= 'A' && name[q] <= 'Z') ? (char)(name[q] + 32) : name[q];
                    if (name[q] >= 'a' && name[q] <= 'z') all_upper = 0;
                }
                k = all_upper ? html5_find(lower) : -1;
                if (k >= 0 && (html5_entities[k].flags & 2)) {
                    size_t q = 0;
                    while (q < COUNT(ftfy_upper_values) && strcmp(ftfy_upper_values[q].name, lower) != 0) q++;
                    if (q < COUNT(ftfy_upper_values))
                        for (int r = 0; r < 3 && ftfy_upper_values[q].cp[r]; r++) us_push(out, ftfy_upper_values[q].cp[r]);
                    else push_entity(out, k);
                } else {
                    us_push_n(out, s + i, end - i);
                }
            }
        } else {
            ustr one = {0}, dec = {0};
            us_push_n(&one, s + i, end - i);
            html_unescape(&one, &dec);
            int has_semicolon = 0;
            for (size_t q = 0; q < dec.n; q++) has_semicolon |= dec.c[q] == ';';
            if (has_semicolon) us_push_n(out, s + i, end - i);
            else us_push_n(out, dec.c, dec.n);
            us_free(&one);
            us_free(&dec);
        }
        i = end;
    }
}

/* ======================================================================================
 * ftfy 6.3.1: mojibake detection (badness.py) and repair (fix_encoding)
 * ====================================================================================== */

static uint32_t ft(uint32_t c) {     /* the FT_* class bits of a character */
    if (c < 0x80) return 0;
    size_t lo = 0, hi = COUNT(ftfy_class);
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (c < ftfy_class[mid][0]) hi = mid;
        else if (c > ftfy_class[mid][0]) lo = mid + 1;
        else return ftfy_class[mid][1];
    }
    return 0;
}

/* 1 when c is one of the characters of the UTF-8 literal set. */
static int one_of(uint32_t c, const char *set) {
    ustr u = {0};
    us_push_utf8(&u, set);
    int found = 0;
    for (size_t i = 0; i < u.n && !found; i++) found = u.c[i] == c;
    us_free(&u);
    return found;
}

#define FT_ACCENTED (FT_LOWER_ACCENTED | FT_UPPER_ACCENTED)
#define FT_PUNCT (FT_START_PUNCTUATION | FT_END_PUNCTUATION)

/* Does ftfy's BADNESS_RE match at position i? Each alternative of the regex in turn. */
static int bad_at(const uint32_t *s, size_t n, size_t i) {
    uint32_t a = s[i], b = i + 1 < n ? s[i + 1] : 0, c = i + 2 < n ? s[i + 2] : 0;
    uint32_t A = ft(a), B = i + 1 < n ? ft(b) : 0, C = i + 2 < n ? ft(c) : 0;
    int has2 = i + 1 < n, has3 = i + 2 < n, has4 = i + 3 < n;
    if (A & FT_C1) return 1;
    if (has2 && (A & (FT_BAD | FT_ACCENTED | FT_BOX | FT_PUNCT | FT_CURRENCY | FT_NUMERIC | FT_LAW)) && (B & FT_BAD)) return 1;
    if (has3 && is_ascii_alpha(a) && (B & (FT_LOWER_COMMON | FT_UPPER_COMMON)) && (C & FT_BAD)) return 1;
    if (has2 && (A & FT_BAD) && (B & (FT_ACCENTED | FT_BOX | FT_PUNCT | FT_CURRENCY | FT_NUMERIC | FT_LAW))) return 1;
    if (has2 && (A & (FT_LOWER_ACCENTED | FT_LOWER_COMMON | FT_BOX | FT_END_PUNCTUATION | FT_CURRENCY | FT_NUMERIC)) &&
        (B & FT_UPPER_ACCENTED)) return 1;
    if (has2 && (A & (FT_BOX | FT_END_PUNCTUATION | FT_CURRENCY | FT_NUMERIC)) && (B & FT_LOWER_ACCENTED)) return 1;
    if (has2 && (A & (FT_LOWER_ACCENTED | FT_BOX | FT_END_PUNCTUATION)) && (B & FT_CURRENCY)) return 1;
    if (has3 && is_space_py(a) && (B & FT_UPPER_ACCENTED) && (C & FT_CURRENCY)) return 1;
    if (has2 && (A & (FT_UPPER_ACCENTED | FT_BOX)) && (B & (FT_NUMERIC | FT_LAW))) return 1;
    if (has3 && (A & (FT_ACCENTED | FT_BOX | FT_CURRENCY | FT_END_PUNCTUATION)) && (B & FT_START_PUNCTUATION) &&
        (C & FT_NUMERIC)) return 1;
    if (has3 && (A & (FT_ACCENTED | FT_CURRENCY | FT_NUMERIC | FT_BOX | FT_LAW)) && (B & FT_END_PUNCTUATION) &&
        (C & FT_START_PUNCTUATION)) return 1;
    if (has2 && (A & (FT_CURRENCY | FT_NUMERIC | FT_BOX)) && (B & FT_START_PUNCTUATION)) return 1;
    if (has3 && is_ascii_lower(a) && (B & FT_UPPER_ACCENTED) && (C & (FT_START_PUNCTUATION | FT_CURRENCY))) return 1;
    if (has2 && (A & FT_BOX) && (B & FT_KAOMOJI)) return 1;
    if (has2 && (A & (FT_ACCENTED | FT_CURRENCY | FT_NUMERIC | FT_PUNCT | FT_LAW)) && (B & FT_BOX)) return 1;
    if (has2 && (A & FT_BOX) && (B & FT_END_PUNCTUATION)) return 1;
    if (has3 && (A & FT_ACCENTED) && (B & FT_PUNCT) && is_word_re(c)) return 1;
    if (has2 && (a == 0x152 || a == 0x153) && !is_ascii_alpha(b)) return 1;          /* [Œœ][^A-Za-z] */
    if (has2 && (A & FT_UPPER_ACCENTED) && b == 0xB0) return 1;                        /* [upper]° */
    if (has2 && (A & FT_AHAT_LEAD) && (B & FT_AHAT_NEXT)) return 1;
    if (has2 && a == 0xD7 && (b == 0xB2 || b == 0xB3)) return 1;                       /* ×[²³] */
    if (has4 && (A & FT_ARABIC_LEAD) && (B & FT_ARABIC_NEXT) && (C & FT_ARABIC_LEAD) && (ft(s[i + 3]) & FT_ARABIC_NEXT))
        return 1;
    if (has2 && a == 0xE0 && one_of(b, "\xc2\xb2\xc2\xb5\xc2\xb9\xc2\xbc\xc2\xbd\xc2\xbe")) return 1;   /* à[²µ¹¼½¾] */
    if (has2 && a == 0x221A && one_of(b, "\xc2\xb1\xe2\x88\x82\xe2\x80\xa0\xe2\x89\xa0\xc2\xae\xe2\x84\xa2\xc2\xb4"
                                         "\xe2\x89\xa4\xe2\x89\xa5\xc2\xa5\xc2\xb5\xc3\xb8")) return 1;  /* √[±∂†≠®™´≤≥¥µø] */
    if (has2 && a == 0x2248 && (b == 0xB0 || b == 0xA2)) return 1;                     /* ≈[°¢] */
    if (has3 && a == 0x201A && b == 0xC4 &&
        one_of(c, "\xc3\xac\xc3\xae\xc3\xaf\xc3\xb2\xc3\xb4\xc3\xba\xc3\xb9\xc3\xbb\xe2\x80\xa0\xc2\xb0\xc2\xa2\xcf\x80"))
        return 1;                                                                      /* ‚Ä[ìîïòôúùû†°¢π] */
    if (has3 && a == 0x201A && (b == 0xE2 || b == 0xF3) && (c == 0xE0 || c == 0xE4 || c == 0xB0 || c == 0xEA))
        return 1;                                                                      /* ‚[âó][àä°ê] */
    if (has2 && a == 0x432 && b == 0x402) return 1;                                    /* вЂ */
    if (has3 && (A & FT_CYR_LEAD) && (B & FT_CYR_MID) && (C & FT_CYR_LEAD)) return 1;
    if (i + 6 < n && a == 0x413 && b == 0x45E && c == 0x412 && s[i + 3] == 0x402 && s[i + 4] == 0x412 &&
        s[i + 5] != '\n' && (is_ascii_alpha(s[i + 6]) || s[i + 6] == ' ')) return 1;  /* ГўВЂВ.[A-Za-z ] */
    if (has2 && a == 0xC3 && (b == 0xA0 || b == 0xA1)) return 1;                       /* Ã[\xa0¡] */
    if (is_ascii_lower(a)) {                                                           /* [a-z]\s?[ÃÂ][ ] */
        if (has3 && (b == 0xC3 || b == 0xC2) && c == ' ') return 1;
        if (has4 && is_space_py(b) && (c == 0xC3 || c == 0xC2) && s[i + 3] == ' ') return 1;
    }
    if (i == 0 && has2 && (a == 0xC3 || a == 0xC2) && b == ' ') return 1;             /* ^[ÃÂ][ ] */
    if (has3 && (is_ascii_lower(a) || a == '.' || a == ',' || a == '?' || a == '!' || (A & FT_END_PUNCTUATION)) &&
        b == 0xC2 && (c == ' ' || (C & FT_PUNCT))) return 1;                            /* [a-z.,?!end]Â[ start end] */
    if (has3 && a == 0x3B2 && b == 0x20AC && (c == 0x2122 || c == 0xA0 || c == 0x386 || c == 0xAD || c == 0xAE || c == 0xB0))
        return 1;                                                                      /* β€[™\xa0Ά\xad®°] */
    if (has3 && (A & FT_GRK_LEAD) && (B & FT_GRK_MID) && (C & FT_GRK_LEAD)) return 1;
    if (has2 && a == 0x101 && b == 0x20AC) return 1;                                   /* ā€ */
    return 0;
}

static int is_bad(const uint32_t *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (bad_at(s, n, i)) return 1;
    return 0;
}

/* The byte of c in charmap e, or -1 when c cannot be encoded (sloppy maps: U+FFFD is 0x1A). */
static int charmap_byte(int e, uint32_t c) {
    if (c == 0x1A) return charmap_sloppy[e] ? -1 : 0x1A;
    if (c < 0x80) return (int)c;
    if (c == 0xFFFD && charmap_sloppy[e]) return 0x1A;
    for (int b = 0; b < 128; b++)
        if (charmap_high[e][b] == c) return 0x80 + b;
    return -1;
}

/* Encode the whole text in charmap e; NULL when some character has no byte. */
static uint8_t *charmap_encode(int e, const uint32_t *s, size_t n) {
    uint8_t *out = sd_malloc(n + 1);
    for (size_t i = 0; i < n; i++) {
        int b = charmap_byte(e, s[i]);
        if (b < 0) { free(out); return NULL; }
        out[i] = (uint8_t)b;
    }
    return out;
}

static int is_utf8_cont_a0(uint8_t b) { return (b >= 0x80 && b <= 0x84) || (b >= 0x86 && b <= 0x9F) || (b >= 0xA1 && b <= 0xBF); }
static int is_cont(uint8_t b) { return b >= 0x80 && b <= 0xBF; }

/* Length of an ALTERED_UTF8_RE match at p[i] (a UTF-8 sequence whose 0xA0 became a space), or 0. */
static size_t altered_utf8_at(const uint8_t *p, size_t n, size_t i) {
    uint8_t a = p[i];
    if (i + 1 < n && (a == 0xC2 || a == 0xC3 || a == 0xC5 || a == 0xCE || a == 0xD0 || a == 0xD9) && p[i + 1] == ' ')
        return 2;
    if (i + 2 < n && (a == 0xE2 || a == 0xE3) && p[i + 1] == ' ' && is_utf8_cont_a0(p[i + 2])) return 3;
    if (i + 2 < n && a >= 0xE0 && a <= 0xE3 && is_utf8_cont_a0(p[i + 1]) && p[i + 2] == ' ') return 3;
    if (i + 3 < n && a == 0xF0) {
        int spaces = 0, ok = 1;
        for (int k = 1; k <= 3; k++) {
            if (p[i + k] == ' ') spaces++;
            else if (!is_cont(p[i + k])) ok = 0;
        }
        if (ok && spaces == 1) return 4;
    }
    return 0;
}

/* fixes.restore_byte_a0: "\xc3 " before a word becomes "\xc3\xa0 " (except before " ", "quele",
 * "quela", "quilo", "s "), then spaces inside ALTERED_UTF8_RE matches become 0xA0. */
static void restore_byte_a0(uint8_t **bytes, size_t *len) {
    const uint8_t *p = *bytes;
    size_t n = *len, k = 0;
    uint8_t *q = sd_malloc(2 * n + 1);
    for (size_t i = 0; i < n; i++) {
        q[k++] = p[i];
        if (p[i] == 0xC3 && i + 1 < n && p[i + 1] == ' ') {
            const uint8_t *r = p + i + 2;
            size_t rest = n - i - 2;
            int keep = (rest >= 1 && r[0] == ' ') || (rest >= 5 && (!memcmp(r, "quele", 5) || !memcmp(r, "quela", 5) ||
                       !memcmp(r, "quilo", 5))) || (rest >= 2 && !memcmp(r, "s ", 2));
            if (!keep) { q[k++] = 0xA0; q[k++] = ' '; i++; }
        }
    }
    for (size_t i = 0; i < k;) {
        size_t m = altered_utf8_at(q, k, i);
        if (!m) { i++; continue; }
        for (size_t j = i; j < i + m; j++) if (q[j] == ' ') q[j] = 0xA0;
        i += m;
    }
    free(*bytes);
    *bytes = q;
    *len = k;
}

/* Length of a LOSSY_UTF8_RE match at p[i] (a UTF-8 sequence with a byte lost as 0x1A or '?'), or 0. */
static size_t lossy_at(const uint8_t *p, size_t n, size_t i) {
#define AT(k) (i + (k) < n ? p[i + (k)] : 0x100)
#define SUB(x) ((x) == 0x1A)
#define LOST(x) ((x) == 0x1A || (x) == '?')
#define SUBCONT(x) ((x) == 0x1A || ((x) >= 0x80 && (x) <= 0xBF))
#define ANY(x) ((x) == 0x1A || (x) == '?' || ((x) >= 0x80 && (x) <= 0xBF))
    unsigned a = AT(0), b = AT(1), c = AT(2), d = AT(3), e = AT(4), f = AT(5);
    if (a >= 0xC2 && a <= 0xDF && SUB(b)) return 2;
    if ((a == 0xC2 || a == 0xC3) && b == '?') return 2;
    if (a == 0xED && b >= 0xA0 && b <= 0xAF && LOST(c) && d == 0xED && e >= 0xB0 && e <= 0xBF && ANY(f)) return 6;
    if (a == 0xED && b >= 0xA0 && b <= 0xAF && ANY(c) && d == 0xED && e >= 0xB0 && e <= 0xBF && LOST(f)) return 6;
    if (a >= 0xE0 && a <= 0xEF && LOST(b) && SUBCONT(c)) return 3;
    if (a >= 0xE0 && a <= 0xEF && SUBCONT(b) && LOST(c)) return 3;
    if (a >= 0xF0 && a <= 0xF4 && LOST(b) && SUBCONT(c) && SUBCONT(d)) return 4;
    if (a >= 0xF0 && a <= 0xF4 && SUBCONT(b) && LOST(c) && SUBCONT(d)) return 4;
    if (a >= 0xF0 && a <= 0xF4 && SUBCONT(b) && SUBCONT(c) && LOST(d)) return 4;
    if (SUB(a)) return 1;
    return 0;
#undef AT
#undef SUB
#undef LOST
#undef SUBCONT
#undef ANY
}

/* fixes.replace_lossy_sequences: each lossy sequence becomes the UTF-8 of U+FFFD. */
static void replace_lossy(uint8_t **bytes, size_t *len) {
    const uint8_t *p = *bytes;
    size_t n = *len, k = 0;
    uint8_t *q = sd_malloc(3 * n + 1);
    for (size_t i = 0; i < n;) {
        size_t m = lossy_at(p, n, i);
        if (!m) { q[k++] = p[i++]; continue; }
        q[k++] = 0xEF; q[k++] = 0xBF; q[k++] = 0xBD;
        i += m;
    }
    free(*bytes);
    *bytes = q;
    *len = k;
}

static void fix_encoding(ustr *text);

/* s[j+1..j+need] are all UTF-8 continuation look-alikes (or spaces standing for 0xA0). */
static int cont_run(const uint32_t *s, size_t n, size_t j, size_t need) {
    if (j + need >= n) return 0;
    for (size_t k = 1; k <= need; k++)
        if (s[j + k] != ' ' && !(ft(s[j + k]) & FT_U8_CONT)) return 0;
    return 1;
}

/* fixes.decode_inconsistent_utf8: runs that look like UTF-8 read as a single-byte encoding
 * (UTF8_DETECTOR_RE) are fixed on their own when they look bad. Returns 1 when some run matched. */
static int decode_inconsistent_utf8(const ustr *in, ustr *out) {
    const uint32_t *s = in->c;
    size_t n = in->n, i = 0;
    int matched = 0;
    while (i < n) {
        size_t j = i;
        if (i == 0 || !(ft(s[i - 1]) & FT_U8_CONT_STRICT)) {
            for (;;) {      /* ( first2 cont | first3 cont{2} | first4 cont{3} )+ */
                uint32_t f = j < n ? ft(s[j]) : 0;
                size_t step = 0;
                if ((f & FT_U8_FIRST2) && cont_run(s, n, j, 1)) step = 2;
                else if ((f & FT_U8_FIRST3) && cont_run(s, n, j, 2)) step = 3;
                else if ((f & FT_U8_FIRST4) && cont_run(s, n, j, 3)) step = 4;
                if (!step) break;
                j += step;
            }
        }
        if (j == i) { us_push(out, s[i++]); continue; }
        matched = 1;
        if (j - i < n && is_bad(s + i, j - i)) {
            ustr sub = {0};
            us_push_n(&sub, s + i, j - i);
            fix_encoding(&sub);
            us_push_n(out, sub.c, sub.n);
            us_free(&sub);
        } else {
            us_push_n(out, s + i, j - i);
        }
        i = j;
    }
    return matched;
}

/* One step of ftfy's fix_encoding: re-encode in the first single-byte encoding that can hold the
 * text and decode as UTF-8; else fix embedded runs; else Latin-1 read as Windows-1252; else C1. */
static void fix_encoding_one_step(ustr *text) {
    const uint32_t *s = text->c;
    size_t n = text->n, i;
    for (i = 0; i < n && s[i] < 0x80; i++) {}
    if (i == n || !is_bad(s, n)) return;
    int latin1_possible = 0;
    for (int e = 0; e < N_CHARMAPS; e++) {
        uint8_t *bytes = charmap_encode(e, s, n);
        if (!bytes) continue;
        size_t len = n;
        if (e == 0) latin1_possible = 1;
        if (strcmp(charmap_names[e], "macroman") != 0) {
            int altered = 0;
            for (size_t k = 0; k < len && !altered; k++) altered = altered_utf8_at(bytes, len, k) > 0;
            if (altered) restore_byte_a0(&bytes, &len);
        }
        if (charmap_sloppy[e]) replace_lossy(&bytes, &len);
        int variants = memchr(bytes, 0xED, len) != NULL || memchr(bytes, 0xC0, len) != NULL;
        ustr fixed = {0};
        long bad = utf8_decode(bytes, len, variants, &fixed);
        free(bytes);
        if (bad < 0) { us_move(text, &fixed); return; }
        us_free(&fixed);
    }
    ustr fixed = {0};
    if (decode_inconsistent_utf8(text, &fixed) && !us_equal(&fixed, text)) { us_move(text, &fixed); return; }
    us_free(&fixed);
    if (latin1_possible) {      /* Latin-1 meant as strict Windows-1252 */
        int holes = 0, changed = 0;
        for (i = 0; i < n; i++) {
            for (size_t h = 0; h < sizeof cp1252_holes; h++) holes |= s[i] == cp1252_holes[h];
            changed |= s[i] >= 0x80 && s[i] <= 0x9F;
        }
        if (!holes && changed) {
            for (i = 0; i < n; i++) if (s[i] >= 0x80 && s[i] <= 0xFF) text->c[i] = charmap_high[1][s[i] - 0x80];
            return;
        }
    }
    for (i = 0; i < n; i++)     /* fix_c1_controls */
        if (s[i] >= 0x80 && s[i] <= 0x9F) text->c[i] = charmap_high[1][s[i] - 0x80];
}

/* ftfy.fix_encoding: one step at a time until nothing changes. */
static void fix_encoding(ustr *text) {
    for (;;) {
        ustr before = {0};
        us_push_n(&before, text->c, text->n);
        fix_encoding_one_step(text);
        int same = us_equal(&before, text);
        us_free(&before);
        if (same) return;
    }
}

/* ======================================================================================
 * ftfy 6.3.1 fix_text: the character fixers, then the per-line driver
 * ====================================================================================== */

/* The character fixers of fix_and_explain, in ftfy's order (fix_surrogates cannot apply to text
 * that came from valid UTF-8). */
static void ftfy_fixers(ustr *text) {
    ustr out = {0};
    const uint32_t *s = text->c;
    size_t n = text->n;
    for (size_t i = 0; i < n; i++) {
        uint32_t c = s[i];
        if (c >= 0x80 && c <= 0x9F) c = charmap_high[1][c - 0x80];          /* fix_c1_controls */
        const char *rep = NULL;
        for (size_t k = 0; k < COUNT(ftfy_ligatures) && !rep; k++)             /* fix_latin_ligatures */
            if (ftfy_ligatures[k].cp == c) rep = ftfy_ligatures[k].utf8;
        if (rep) { us_push_utf8(&out, rep); continue; }
        us_push(&out, c);
    }
    us_move(text, &out);
    for (size_t i = 0; i < text->n; i++) {                                     /* fix_character_width */
        uint32_t c = text->c[i];
        if (c != 0x3000 && (c < 0xFF01 || c > 0xFFEF)) { us_push(&out, c); continue; }
        const char *rep = NULL;
        for (size_t k = 0; k < COUNT(ftfy_width) && !rep; k++)
            if (ftfy_width[k].cp == c) rep = ftfy_width[k].utf8;
        if (rep) us_push_utf8(&out, rep); else us_push(&out, c);
    }
    us_move(text, &out);
    for (size_t i = 0; i < text->n; i++) {
        uint32_t c = text->c[i];
        if (c == 0x2BC || (c >= 0x2018 && c <= 0x201B)) c = '\'';               /* uncurl_quotes */
        else if (c >= 0x201C && c <= 0x201F) c = '"';
        if (c == '\r' && i + 1 < text->n && text->c[i + 1] == '\n') continue;   /* fix_line_breaks */
        if (c == '\r' || c == 0x2028 || c == 0x2029 || c == 0x85) c = '\n';
        us_push(&out, c);
    }
    us_move(text, &out);
    for (size_t i = 0; i < text->n; i++) {                                     /* remove_terminal_escapes */
        if (text->c[i] == 0x1B && i + 1 < text->n && text->c[i + 1] == '[') {
            size_t j = i + 2;       /* \033\[(\d|;)*[a-zA-Z] */
            while (j < text->n && (text->c[j] == ';' || IN_RANGES(uni_decimal_re, text->c[j]))) j++;
            if (j < text->n && is_ascii_alpha(text->c[j])) { i = j; continue; }
        }
        us_push(&out, text->c[i]);
    }
    us_move(text, &out);
    for (size_t i = 0; i < text->n; i++) {                                     /* remove_control_chars */
        uint32_t c = text->c[i];
        if (c <= 0x08 || c == 0x0B || (c >= 0x0E && c <= 0x1F) || c == 0x7F || (c >= 0x206A && c <= 0x206F) ||
            c == 0xFEFF || (c >= 0xFFF9 && c <= 0xFFFC)) continue;
        us_push(&out, c);
    }
    us_move(text, &out);
}

/* ftfy.fix_and_explain on one segment: all fixes, repeated until the text stops changing. */
static void ftfy_fix_segment(ustr *text, int unescape) {
    for (;;) {
        ustr orig = {0};
        us_push_n(&orig, text->c, text->n);
        if (unescape) {
            ustr out = {0};
            ftfy_unescape_html(text, &out);
            us_move(text, &out);
        }
        fix_encoding(text);
        ftfy_fixers(text);
        nfc(text);
        int same = us_equal(&orig, text);
        us_free(&orig);
        if (same) return;
    }
}

/* ftfy.fix_text: line by line (each segment ends after '\n'); HTML unescaping ("auto") stops for
 * good at the first line that contains '<'. */
static void ftfy_fix_text(ustr *text) {
    ustr out = {0};
    int unescape = 1;
    size_t pos = 0;
    while (pos < text->n) {
        size_t end = pos;
        while (end < text->n && text->c[end] != '\n') end++;
        if (end < text->n) end++;
        if (end - pos > 1000000) end = pos + 1000000;   /* max_decode_length */
        ustr seg = {0};
        us_push_n(&seg, text->c + pos, end - pos);
        for (size_t i = 0; i < seg.n && unescape; i++) if (seg.c[i] == '<') unescape = 0;
        ftfy_fix_segment(&seg, unescape);
        us_push_n(&out, seg.c, seg.n);
        us_free(&seg);
        pos = end;
    }
    us_move(text, &out);
}

/* basic_clean + whitespace_clean + lower, on code points. */
static void clean_codepoints(ustr *text) {
    ftfy_fix_text(text);
    for (int k = 0; k < 2; k++) {
        ustr out = {0};
        html_unescape(text, &out);
        us_move(text, &out);
    }
    size_t a = 0, b = text->n;          /* strip (str.isspace) */
    while (a < b && is_space_py(text->c[a])) a++;
    while (b > a && is_space_py(text->c[b - 1])) b--;
    ustr out = {0};
    for (size_t i = a; i < b; i++) {    /* regex \s+ -> one space */
        if (is_space_regex(text->c[i])) {
            while (i + 1 < b && is_space_regex(text->c[i + 1])) i++;
            us_push(&out, ' ');
        } else {
            us_push(&out, text->c[i]);
        }
    }
    a = 0, b = out.n;                   /* strip again */
    while (a < b && is_space_py(out.c[a])) a++;
    while (b > a && is_space_py(out.c[b - 1])) b--;
    ustr stripped = {0};
    us_push_n(&stripped, out.c ? out.c + a : NULL, b - a);
    us_free(&out);
    ustr lowered = {0};
    str_lower(&stripped, &lowered);
    us_free(&stripped);
    us_move(text, &lowered);
}

static int decode_prompt(const char *utf8, ustr *out) {
    long bad = utf8_decode((const uint8_t *)utf8, strlen(utf8), 0, out);
    if (bad >= 0) {
        us_free(out);
        sd_error("prompt: invalid UTF-8 at byte %ld", bad);
        return -1;
    }
    return 0;
}

int tok_clean_text(const char *utf8, char **out) {
    ustr text = {0};
    *out = NULL;
    if (decode_prompt(utf8, &text) != 0) return -1;
    clean_codepoints(&text);
    *out = utf8_encode(text.c, text.n, NULL);
    us_free(&text);
    return 0;
}

/* ======================================================================================
 * Vocabulary, merges, BPE
 * ====================================================================================== */

/* Symbols are vocabulary ids (0..n_vocab-1) or, for strings that merges.txt makes but the
 * vocabulary lacks, ids from n_vocab on. */
struct sd_tokenizer {
    char **sym;             /* symbol strings */
    int n_sym, cap_sym, n_vocab;
    int *sym_hash;          /* open addressing: symbol id + 1, 0 = empty */
    size_t sym_hash_cap;
    uint64_t *merge_key;    /* (left << 32 | right) + 1, 0 = empty */
    int *merge_rank, *merge_result;
    size_t merge_cap;
    int byte_sym[256], byte_sym_end[256];   /* bytes_to_unicode(b), and with "</w>" */
    int bos, eos, pad;
};

static uint64_t hash_bytes(const char *s) {
    uint64_t h = 1469598103934665603ull;      /* FNV-1a */
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return h;
}

static uint64_t hash_pair(uint64_t key) {
    key ^= key >> 33; key *= 0xff51afd7ed558ccdull; key ^= key >> 33;
    return key;
}

static int sym_find(const sd_tokenizer *t, const char *s) {
    size_t mask = t->sym_hash_cap - 1;
    for (size_t h = hash_bytes(s) & mask;; h = (h + 1) & mask) {
        int v = t->sym_hash[h];
        if (v == 0) return -1;
        if (strcmp(t->sym[v - 1], s) == 0) return v - 1;
    }
}

static void sym_hash_insert(sd_tokenizer *t, int id) {
    size_t mask = t->sym_hash_cap - 1;
    size_t h = hash_bytes(t->sym[id]) & mask;
    while (t->sym_hash[h]) h = (h + 1) & mask;
    t->sym_hash[h] = id + 1;
}

static void sym_rehash(sd_tokenizer *t, size_t cap) {
    free(t->sym_hash);
    t->sym_hash_cap = cap;
    t->sym_hash = sd_calloc(cap, sizeof(int));
    for (int i = 0; i < t->n_sym; i++) if (t->sym[i]) sym_hash_insert(t, i);
}

/* The id of a symbol string, adding it (as a non-vocabulary symbol) when absent. */
static int sym_intern(sd_tokenizer *t, const char *s) {
    int id = sym_find(t, s);
    if (id >= 0) return id;
    if (t->n_sym == t->cap_sym) {
        t->cap_sym = 2 * t->cap_sym + 16;
        t->sym = sd_realloc(t->sym, (size_t)t->cap_sym * sizeof(char *));
    }
    id = t->n_sym++;
    t->sym[id] = sd_strdup(s);
    if (2 * (size_t)t->n_sym > t->sym_hash_cap) sym_rehash(t, 2 * t->sym_hash_cap);
    else sym_hash_insert(t, id);
    return id;
}

static long merge_slot(const sd_tokenizer *t, int a, int b) {
    uint64_t key = (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
    size_t mask = t->merge_cap - 1;
    for (size_t h = hash_pair(key) & mask;; h = (h + 1) & mask) {
        if (t->merge_key[h] == key || t->merge_key[h] == 0) return (long)h;
    }
}

/* bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other 68 take U+0100.. in order. */
static uint32_t byte_char(int b) {
    if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)) return (uint32_t)b;
    int k = 0;
    for (int x = 0; x < b; x++)
        if (!((x >= '!' && x <= '~') || (x >= 0xA1 && x <= 0xAC) || (x >= 0xAE && x <= 0xFF))) k++;
    return 0x100 + (uint32_t)k;
}

void tok_free(sd_tokenizer *t) {
    if (!t) return;
    for (int i = 0; i < t->n_sym; i++) free(t->sym[i]);
    free(t->sym);
    free(t->sym_hash);
    free(t->merge_key);
    free(t->merge_rank);
    free(t->merge_result);
    free(t);
}

/* Set up the symbol table with n_vocab vocabulary strings (id order); NULL entries are errors. */
static sd_tokenizer *new_tokenizer(int n_vocab) {
    sd_tokenizer *t = sd_calloc(1, sizeof *t);
    t->cap_sym = n_vocab + 1024;
    t->sym = sd_calloc((size_t)t->cap_sym, sizeof(char *));
    t->n_sym = t->n_vocab = n_vocab;
    size_t cap = 1024;
    while (cap < 2 * (size_t)n_vocab + 2048) cap *= 2;
    t->sym_hash_cap = cap;
    t->sym_hash = sd_calloc(cap, sizeof(int));
    return t;
}

/* Add the merges (each "left right"), rank = index; a repeated pair keeps its last rank as a
 * Python dict built from the list would. Then the byte symbols and the special tokens. */
static int finish_tokenizer(sd_tokenizer *t, char **lines, int n_lines, const char *what) {
    size_t cap = 1024;
    while (cap < 2 * (size_t)n_lines + 16) cap *= 2;
    t->merge_cap = cap;
    t->merge_key = sd_calloc(cap, sizeof(uint64_t));
    t->merge_rank = sd_calloc(cap, sizeof(int));
    t->merge_result = sd_calloc(cap, sizeof(int));
    for (int r = 0; r < n_lines; r++) {
        char *line = lines[r], *sp = strchr(line, ' ');
        if (!sp || sp == line || !sp[1] || strchr(sp + 1, ' ')) {
            sd_error("%s: merge line %d is not two symbols: '%.40s'", what, r + 2, line);
            return -1;
        }
        *sp = 0;
        int a = sym_intern(t, line), b = sym_intern(t, sp + 1);
        *sp = ' ';
        size_t la = (size_t)(sp - line), lb = strlen(sp + 1);
        char *joined = sd_malloc(la + lb + 1);
        memcpy(joined, line, la);
        memcpy(joined + la, sp + 1, lb + 1);
        int m = sym_intern(t, joined);
        free(joined);
        long h = merge_slot(t, a, b);
        t->merge_key[h] = (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
        t->merge_rank[h] = r;
        t->merge_result[h] = m;
    }
    for (int b = 0; b < 256; b++) {
        char buf[12];
        int k = utf8_put(byte_char(b), buf);
        buf[k] = 0;
        t->byte_sym[b] = sym_intern(t, buf);
        memcpy(buf + k, "</w>", 5);
        t->byte_sym_end[b] = sym_intern(t, buf);
    }
    t->bos = sym_find(t, "<|startoftext|>");
    t->eos = sym_find(t, "<|endoftext|>");
    if (t->bos < 0 || t->bos >= t->n_vocab || t->eos < 0 || t->eos >= t->n_vocab) {
        sd_error("%s: the vocabulary has no <|startoftext|> / <|endoftext|>", what);
        return -1;
    }
    t->pad = t->eos;
    return 0;
}

/* Split text into lines (LF); *n lines; the array points into text. */
static char **split_lines(char *text, int *n) {
    int cap = 1024, k = 0;
    char **lines = sd_malloc((size_t)cap * sizeof(char *));
    char *p = text;
    for (;;) {
        if (k == cap) { cap *= 2; lines = sd_realloc(lines, (size_t)cap * sizeof(char *)); }
        lines[k++] = p;
        char *nl = strchr(p, '\n');
        if (!nl) break;
        *nl = 0;
        p = nl + 1;
    }
    *n = k;
    return lines;
}

#define CLIP_MAX_MERGES (49152 - 256 - 2)   /* lines 1..48894 of the merges file */

/* OpenAI's bpe_simple_vocab_16e6.txt.gz: the vocabulary is the byte symbols, the same with
 * "</w>", the merged pairs in order, then <|startoftext|> and <|endoftext|>. */
static sd_tokenizer *load_openai_gz(const char *path) {
    uint8_t *gz, *raw;
    size_t gz_len, raw_len;
    if (sd_read_file(path, &gz, &gz_len) != 0) return NULL;
    int rc = sd_gunzip(gz, gz_len, &raw, &raw_len, (size_t)64 << 20);
    free(gz);
    if (rc != 0) return NULL;
    char *text = sd_malloc(raw_len + 1);
    memcpy(text, raw, raw_len);
    text[raw_len] = 0;
    free(raw);
    int n_lines;
    char **lines = split_lines(text, &n_lines);
    int n_merges = n_lines - 1 < CLIP_MAX_MERGES ? n_lines - 1 : CLIP_MAX_MERGES;
    if (n_merges < 0) n_merges = 0;
    sd_tokenizer *t = new_tokenizer(512 + n_merges + 2);
    int id = 0;
    for (int pass = 0; pass < 2; pass++)      /* bytes_to_unicode's values in dict order = by code point */
        for (uint32_t c = 0x21; c < 0x144; c++) {
            if (c < 0x100 && byte_char((int)c) != c) continue;
            char buf[12];
            int k = utf8_put(c, buf);
            memcpy(buf + k, pass ? "</w>" : "", pass ? 5 : 1);
            t->sym[id++] = sd_strdup(buf);
        }
    for (int r = 0; r < n_merges; r++) {
        char *line = lines[1 + r], *sp = strchr(line, ' ');
        size_t len = strlen(line);
        char *joined = sd_malloc(len + 1);
        if (sp) { memcpy(joined, line, (size_t)(sp - line)); strcpy(joined + (sp - line), sp + 1); }
        else strcpy(joined, line);
        t->sym[id++] = joined;
    }
    t->sym[id++] = sd_strdup("<|startoftext|>");
    t->sym[id++] = sd_strdup("<|endoftext|>");
    for (int i = 0; i < id; i++) {
        if (sym_find(t, t->sym[i]) >= 0) {
            sd_error("%s: symbol '%.40s' appears twice in the vocabulary", path, t->sym[i]);
            free(lines); free(text); tok_free(t);
            return NULL;
        }
        sym_hash_insert(t, i);
    }
    rc = finish_tokenizer(t, lines + 1, n_merges, path);
    free(lines);
    free(text);
    if (rc != 0) { tok_free(t); return NULL; }
    return t;
}

/* The directory part of a path ("" or ending in '/'). */
static char *dir_of(const char *path) {
    const char *slash = strrchr(path, '/');
    size_t n = slash ? (size_t)(slash - path + 1) : 0;
    char *d = sd_malloc(n + 1);
    memcpy(d, path, n);
    d[n] = 0;
    return d;
}

static char *join_path(const char *dir, const char *name) {
    size_t a = strlen(dir), b = strlen(name);
    char *p = sd_malloc(a + b + 2);
    memcpy(p, dir, a);
    if (a && dir[a - 1] != '/') p[a++] = '/';
    memcpy(p + a, name, b + 1);
    return p;
}

static int ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

static int file_exists(const char *path) {
    FILE *f = fopen(path, "rb");
    if (f) fclose(f);
    return f != NULL;
}

/* pad_token from special_tokens_map.json (which transformers lets win) or tokenizer_config.json:
 * a string, or an object with "content". */
static int read_pad_token(sd_tokenizer *t, const char *dir) {
    const char *files[2] = { "special_tokens_map.json", "tokenizer_config.json" };
    for (int f = 0; f < 2; f++) {
        char *path = join_path(dir, files[f]);
        if (!file_exists(path)) { free(path); continue; }
        sd_json j;
        if (json_parse_file(path, &j) != 0) { free(path); return -1; }
        const sd_json *pad = j.type == JSON_OBJECT ? json_get(&j, "pad_token") : NULL;
        const char *name = NULL;
        if (pad && pad->type == JSON_STRING) name = pad->str;
        if (pad && pad->type == JSON_OBJECT) name = json_str(pad, "content", NULL);
        int rc = 0, found = name != NULL;
        if (name) {
            int id = sym_find(t, name);
            if (id < 0 || id >= t->n_vocab) { sd_error("%s: pad_token '%.40s' is not in the vocabulary", path, name); rc = -1; }
            else t->pad = id;
        }
        json_free(&j);
        free(path);
        if (rc != 0 || found) return rc;
    }
    return 0;
}

/* A diffusers/transformers tokenizer: vocab.json (token -> id) and merges.txt. */
static sd_tokenizer *load_hf(const char *vocab_path, const char *merges_path, const char *dir) {
    sd_json v;
    if (json_parse_file(vocab_path, &v) != 0) return NULL;
    if (v.type != JSON_OBJECT || v.n <= 0) {
        sd_error("%s: not a JSON object of token ids", vocab_path);
        json_free(&v);
        return NULL;
    }
    sd_tokenizer *t = new_tokenizer(v.n);
    for (int i = 0; i < v.n; i++) {
        double id = v.items[i].type == JSON_NUMBER ? v.items[i].num : -1;
        if (!(id >= 0 && id < v.n) || id != (double)(int)id || t->sym[(int)id]) {
            sd_error("%s: token '%.40s' has a bad or repeated id (ids must be 0..%d, each once)", vocab_path, v.keys[i], v.n - 1);
            json_free(&v); tok_free(t);
            return NULL;
        }
        t->sym[(int)id] = sd_strdup(v.keys[i]);
    }
    json_free(&v);
    for (int i = 0; i < t->n_vocab; i++) {
        if (sym_find(t, t->sym[i]) >= 0) {
            sd_error("%s: token '%.40s' appears twice", vocab_path, t->sym[i]);
            tok_free(t);
            return NULL;
        }
        sym_hash_insert(t, i);
    }
    uint8_t *raw;
    size_t raw_len;
    if (sd_read_file(merges_path, &raw, &raw_len) != 0) { tok_free(t); return NULL; }
    char *text = (char *)raw;       /* transformers: read().strip().split("\n")[1:48895] */
    size_t a = 0, b = raw_len;
    while (a < b && is_space_py((uint8_t)text[a])) a++;
    while (b > a && is_space_py((uint8_t)text[b - 1])) b--;
    text[b] = 0;
    int n_lines;
    char **lines = split_lines(text + a, &n_lines);
    int n_merges = n_lines - 1 < CLIP_MAX_MERGES ? n_lines - 1 : CLIP_MAX_MERGES;
    if (b == a) n_merges = 0;
    for (int r = 0; r < n_merges; r++) {       /* merge.split(): tolerate CR and extra blanks */
        char *l = lines[1 + r];
        size_t len = strlen(l);
        while (len && (l[len - 1] == '\r' || l[len - 1] == ' ' || l[len - 1] == '\t')) l[--len] = 0;
    }
    int rc = finish_tokenizer(t, lines + 1, n_merges, merges_path);
    free(lines);
    free(raw);
    if (rc == 0) rc = read_pad_token(t, dir);
    if (rc != 0) { tok_free(t); return NULL; }
    return t;
}

sd_tokenizer *tok_load(const char *path) {
    if (ends_with(path, ".gz")) return load_openai_gz(path);
    char *dir, *vocab, *merges;
    if (ends_with(path, ".json") || ends_with(path, ".txt")) {
        dir = dir_of(path);
        vocab = ends_with(path, ".json") ? sd_strdup(path) : join_path(dir, "vocab.json");
        merges = ends_with(path, ".txt") ? sd_strdup(path) : join_path(dir, "merges.txt");
    } else {
        dir = sd_strdup(path);
        vocab = join_path(dir, "vocab.json");
        merges = join_path(dir, "merges.txt");
    }
    sd_tokenizer *t = NULL;
    if (!file_exists(vocab)) sd_error("%s: no vocab.json there (a tokenizer is a folder with vocab.json + merges.txt, "
                                      "one of those files, or bpe_simple_vocab_16e6.txt.gz)", vocab);
    else if (!file_exists(merges)) sd_error("%s: not found (needed beside vocab.json)", merges);
    else t = load_hf(vocab, merges, dir);
    free(dir);
    free(vocab);
    free(merges);
    return t;
}

int tok_bos(const sd_tokenizer *t) { return t->bos; }
int tok_eos(const sd_tokenizer *t) { return t->eos; }
int tok_pad(const sd_tokenizer *t) { return t->pad; }
const char *tok_token_text(const sd_tokenizer *t, int id) { return id >= 0 && id < t->n_vocab ? t->sym[id] : NULL; }

/* ---- growable int list ---- */
typedef struct ilist { int *v; int n, cap; } ilist;
static void il_push(ilist *l, int x) {
    if (l->n == l->cap) { l->cap = 2 * l->cap + 32; l->v = sd_realloc(l->v, (size_t)l->cap * sizeof(int)); }
    l->v[l->n++] = x;
}

/* BPE of one pre-token (its UTF-8 bytes): repeatedly merge every occurrence, left to right, of
 * the adjacent pair with the lowest rank. */
static int bpe_word(const sd_tokenizer *t, const uint8_t *bytes, size_t n, ilist *out) {
    int *w = sd_malloc(n * sizeof(int));
    size_t m = n;
    for (size_t i = 0; i < n; i++) w[i] = i + 1 < n ? t->byte_sym[bytes[i]] : t->byte_sym_end[bytes[i]];
    while (m > 1) {
        int best_rank = -1, first = 0, second = 0, result = 0;
        for (size_t i = 0; i + 1 < m; i++) {    /* the lowest-ranked pair present */
            long h = merge_slot(t, w[i], w[i + 1]);
            if (t->merge_key[h] && (best_rank < 0 || t->merge_rank[h] < best_rank)) {
                best_rank = t->merge_rank[h]; first = w[i]; second = w[i + 1]; result = t->merge_result[h];
            }
        }
        if (best_rank < 0) break;
        size_t k = 0;
        for (size_t i = 0; i < m;) {            /* merge all its occurrences, left to right */
            if (i + 1 < m && w[i] == first && w[i + 1] == second) { w[k++] = result; i += 2; }
            else w[k++] = w[i++];
        }
        m = k;
    }
    int rc = 0;
    for (size_t i = 0; i < m && rc == 0; i++) {
        if (w[i] >= t->n_vocab) {
            sd_error("tokenizer: BPE token '%.40s' is not in the vocabulary", t->sym[w[i]]);
            rc = -1;
        } else {
            il_push(out, w[i]);
        }
    }
    free(w);
    return rc;
}

/* The letters of the special tokens and contractions, as python-regex IGNORECASE matches them
 * (simple case folding: 's' also matches U+017F LONG S). */
static int same_letter(uint32_t c, char want) {
    if (c == (uint32_t)want || (want >= 'a' && want <= 'z' && c == (uint32_t)(want - 32))) return 1;
    return want == 's' && c == 0x17F;
}

static size_t match_literal(const uint32_t *s, size_t n, size_t i, const char *lit) {
    size_t k = 0;
    for (; lit[k]; k++)
        if (i + k >= n || !same_letter(s[i + k], lit[k])) return 0;
    return k;
}

/* [^\s\p{L}\p{N}] as python-regex matches it under IGNORECASE (U+0345 matches no class at all). */
static int is_other(uint32_t c) {
    return !is_space_regex(c) && !is_letter(c) && !is_number(c) && !IN_RANGES(uni_unmatched_ignorecase, c);
}

/* Pre-tokenize clean text with CLIP's pattern and BPE each piece: appends ids (no BOS/EOS). */
static int encode_clean(const sd_tokenizer *t, const ustr *text, ilist *ids) {
    static const char *const contractions[] = { "'s", "'t", "'re", "'ve", "'m", "'ll", "'d" };
    const uint32_t *s = text->c;
    size_t n = text->n, i = 0;
    while (i < n) {
        size_t len = match_literal(s, n, i, "<|startoftext|>");      /* the alternatives in order */
        if (!len) len = match_literal(s, n, i, "<|endoftext|>");
        for (size_t k = 0; k < COUNT(contractions) && !len; k++) len = match_literal(s, n, i, contractions[k]);
        if (!len && is_letter(s[i])) {
            while (i + len < n && is_letter(s[i + len])) len++;
        } else if (!len && is_number(s[i])) {
            len = 1;
        } else if (!len) {
            while (i + len < n && is_other(s[i + len])) len++;
        }
        if (!len) { i++; continue; }
        size_t nbytes;
        char *piece = utf8_encode(s + i, len, &nbytes);
        int rc = 0;
        if (strcmp(piece, "<|startoftext|>") == 0) il_push(ids, t->bos);
        else if (strcmp(piece, "<|endoftext|>") == 0) il_push(ids, t->eos);
        else rc = bpe_word(t, (const uint8_t *)piece, nbytes, ids);
        free(piece);
        if (rc != 0) return -1;
        i += len;
    }
    return 0;
}

int tok_encode_clean(const sd_tokenizer *t, const char *clean_utf8, int **ids, int *n) {
    ustr text = {0};
    ilist l = {0};
    *ids = NULL;
    *n = 0;
    if (decode_prompt(clean_utf8, &text) != 0) return -1;
    int rc = encode_clean(t, &text, &l);
    us_free(&text);
    if (rc != 0) { free(l.v); return -1; }
    *ids = l.v ? l.v : sd_malloc(sizeof(int));
    *n = l.n;
    return 0;
}

int tok_encode(const sd_tokenizer *t, const char *utf8, int **ids, int *n) {
    ustr text = {0};
    ilist l = {0};
    *ids = NULL;
    *n = 0;
    if (decode_prompt(utf8, &text) != 0) return -1;
    clean_codepoints(&text);
    il_push(&l, t->bos);
    int rc = encode_clean(t, &text, &l);
    us_free(&text);
    if (rc != 0) { free(l.v); return -1; }
    il_push(&l, t->eos);
    *ids = l.v;
    *n = l.n;
    return 0;
}

int tok_encode_padded(const sd_tokenizer *t, const char *utf8, int max_len, int *ids) {
    if (max_len < 2) { sd_error("tokenizer: max_len %d is below 2", max_len); return -1; }
    int *all, n;
    if (tok_encode(t, utf8, &all, &n) != 0) return -1;
    int keep = n - 2 < max_len - 2 ? n - 2 : max_len - 2;      /* content ids kept */
    ids[0] = t->bos;
    for (int i = 0; i < keep; i++) ids[1 + i] = all[1 + i];
    ids[1 + keep] = t->eos;
    for (int i = 2 + keep; i < max_len; i++) ids[i] = t->pad;
    free(all);
    return 0;
}

/* sdref tokenize --tokenizer DIR|FILE --prompt TEXT [--raw] */
int cmd_tokenize(int argc, char **argv) {
    sd_args a;
    args_init(&a, argc, argv);
    const char *path = args_value(&a, "--tokenizer");
    const char *prompt = args_value(&a, "--prompt");
    int raw = args_flag(&a, "--raw");
    int rc = args_check_all_used(&a);
    free(a.used);
    if (rc != 0) return -1;
    if (!path || !prompt) { sd_error("needs --tokenizer DIR|FILE and --prompt TEXT"); return -1; }
    sd_tokenizer *t = tok_load(path);
    if (!t) return -1;
    int *ids = NULL, n = 77;
    if (raw) rc = tok_encode(t, prompt, &ids, &n);
    else { ids = sd_malloc(77 * sizeof(int)); rc = tok_encode_padded(t, prompt, 77, ids); }
    if (rc == 0) {
        for (int i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
        printf("\n");
    }
    free(ids);
    tok_free(t);
    return rc;
}
