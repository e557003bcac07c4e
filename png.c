/* png.c — zlib and gzip (inflate and deflate, written here) and PNG read/write.
 *
 * Reads top to bottom:
 *   1. checksums: CRC-32 (PNG chunks, gzip) and Adler-32 (zlib)
 *   2. inflate: a bit reader, table-driven Huffman decoding, stored/fixed/dynamic blocks
 *   3. the zlib (RFC 1950) and gzip (RFC 1952) wrappers around inflate
 *   4. deflate: LZ77 with hash chains and lazy matching, length-limited Huffman codes,
 *      each block sent as whichever of dynamic / fixed / stored is smallest
 *   5. PNG decoding: chunks, IHDR rules, PLTE/tRNS, unfiltering, Adam7, RGBA expansion
 *   6. PNG encoding: per-row filter choice, tEXt/iTXt, atomic output
 *   7. the `decode-png` command
 *
 * Everything is deterministic: the same input gives the same bytes on every platform.
 * Errors are one line through sd_error ("WHAT: problem") and a -1 return.
 */
#include "sdref.h"
#include <stdlib.h>
#include <string.h>

/* ======================================================================================
 * 1. Checksums
 * ====================================================================================== */

/* CRC-32 (reflected polynomial 0xEDB88320) as PNG and gzip use it. Long buffers use a byte
 * table built on the stack (no shared state, so any thread may call this). */
uint32_t sd_crc32(uint32_t crc, const uint8_t *p, size_t n) {
    crc = ~crc;
    if (n < 512) {
        for (size_t i = 0; i < n; i++) {
            crc ^= p[i];
            for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1)));
        }
        return ~crc;
    }
    uint32_t table[256];
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t c = b;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1)));
        table[b] = c;
    }
    for (size_t i = 0; i < n; i++) crc = table[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
    return ~crc;
}

/* Adler-32 of RFC 1950; sums reduced every 5552 bytes, the most that cannot overflow 32 bits. */
static uint32_t adler32(const uint8_t *p, size_t n) {
    uint32_t a = 1, b = 0;
    while (n > 0) {
        size_t chunk = n < 5552 ? n : 5552;
        n -= chunk;
        while (chunk--) { a += *p++; b += a; }
        a %= 65521;
        b %= 65521;
    }
    return (b << 16) | a;
}

static uint32_t be32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static void put_be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}

/* ======================================================================================
 * 2. Inflate (RFC 1951)
 * ====================================================================================== */

/* Base values and extra-bit counts of the 29 length codes (257..285) and 30 distance codes. */
static const uint16_t length_base[29] = { 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31,
                                          35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258 };
static const uint8_t length_extra[29] = { 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2,
                                          3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0 };
static const uint16_t dist_base[30] = { 1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385,
                                        513, 769, 1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577 };
static const uint8_t dist_extra[30] = { 0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7,
                                        8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13 };
/* The order in which code-length code lengths are sent. */
static const uint8_t codelen_order[19] = { 16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15 };

/* Bits are consumed from the low end of a 64-bit buffer. Past the end of the input the buffer
 * is fed zero bytes, counted in `pad`: a stream that consumed any of them ended early. */
typedef struct bitreader {
    const uint8_t *in;
    size_t len, pos;
    uint64_t buf;
    int cnt;        /* valid bits in buf (real or padding) */
    int pad;        /* zero bytes fed past the end, still in buf or consumed */
} bitreader;

static void br_refill(bitreader *b) {
    while (b->cnt <= 56) {
        uint64_t byte = 0;
        if (b->pos < b->len) byte = b->in[b->pos++];
        else b->pad++;
        b->buf |= byte << b->cnt;
        b->cnt += 8;
    }
}

/* 1 when bits beyond the end of the input were consumed. */
static int br_overrun(const bitreader *b) { return b->pad * 8 > b->cnt; }

static uint32_t br_bits(bitreader *b, int n) {
    if (b->cnt < n) br_refill(b);
    uint32_t v = (uint32_t)(b->buf & ((1ull << n) - 1));
    b->buf >>= n;
    b->cnt -= n;
    return v;
}

/* Skip to a byte boundary and hand the whole bytes still buffered back to the input, so the
 * next byte can be read directly at b->pos. -1 when the stream had already ended. */
static int br_rewind(bitreader *b) {
    int drop = b->cnt & 7;
    b->buf >>= drop;
    b->cnt -= drop;
    if (b->pad * 8 > b->cnt) return -1;
    b->pos -= (size_t)(b->cnt / 8 - b->pad);
    b->buf = 0;
    b->cnt = 0;
    b->pad = 0;
    return 0;
}

/* A Huffman decoding table: 2^bits entries indexed by the next `bits` input bits (codes are
 * sent bit-reversed, so the table is filled at reversed indices). Entry = symbol << 4 | length;
 * 0 marks a bit pattern no code starts with. */
typedef struct huff { uint16_t *table; int bits; } huff;

enum { HUFF_CODELEN, HUFF_LITLEN, HUFF_DIST };

static uint32_t reverse_bits(uint32_t code, int len) {
    uint32_t r = 0;
    for (int i = 0; i < len; i++) { r = (r << 1) | (code & 1); code >>= 1; }
    return r;
}

/* Build the table of a canonical code from its code lengths. Over-subscribed sets are refused;
 * incomplete ones too, except (as zlib allows) a single code of length 1 for literal/length or
 * distance codes, and no codes at all for distances (then any distance is an error). */
static const char *huff_build(huff *h, const uint8_t *lens, int n, int kind) {
    int count[16] = { 0 };
    for (int i = 0; i < n; i++) count[lens[i]]++;
    count[0] = 0;
    int max = 0;
    for (int l = 1; l <= 15; l++) if (count[l]) max = l;
    h->bits = max;
    h->table[0] = 0;
    if (max == 0) return kind == HUFF_DIST ? NULL : kind == HUFF_CODELEN ? "no code length codes" : "no literal/length codes";
    int left = 1;
    for (int l = 1; l <= 15; l++) {
        left = (left << 1) - count[l];
        if (left < 0)
            return kind == HUFF_CODELEN ? "over-subscribed code length code" :
                   kind == HUFF_LITLEN ? "over-subscribed literal/length code" : "over-subscribed distance code";
    }
    if (left > 0 && (kind == HUFF_CODELEN || max != 1))
        return kind == HUFF_CODELEN ? "incomplete code length code" :
               kind == HUFF_LITLEN ? "incomplete literal/length code" : "incomplete distance code";
    uint32_t next[16];
    uint32_t code = 0;
    for (int l = 1; l <= 15; l++) { code = (code + (uint32_t)count[l - 1]) << 1; next[l] = code; }
    size_t size = (size_t)1 << max;
    memset(h->table, 0, size * sizeof h->table[0]);
    for (int s = 0; s < n; s++) {
        int l = lens[s];
        if (!l) continue;
        uint32_t r = reverse_bits(next[l]++, l);
        for (size_t k = r; k < size; k += (size_t)1 << l) h->table[k] = (uint16_t)(s << 4 | l);
    }
    return NULL;
}

/* Decode one symbol; the caller has refilled the buffer. -1 for a pattern no code starts with. */
static int huff_decode(const huff *h, bitreader *b) {
    uint16_t e = h->table[b->buf & (((uint64_t)1 << h->bits) - 1)];
    int l = e & 15;
    if (!l) return -1;
    b->buf >>= l;
    b->cnt -= l;
    return e >> 4;
}

/* Growing output buffer bounded by `max`; `base` is where the current stream began (a
 * distance may not reach before it). */
typedef struct outbuf { uint8_t *p; size_t n, cap, max, base; } outbuf;

static outbuf build_outbuf(size_t max) {
    outbuf o = { sd_malloc(1), 0, 0, max, 0 };   /* never NULL, so p + n is always defined */
    return o;
}

static int out_reserve(outbuf *o, size_t extra) {
    if (extra > o->max - o->n) return -1;
    if (o->n + extra <= o->cap) return 0;
    size_t cap = o->cap < 65536 ? 65536 : o->cap;
    while (cap < o->n + extra) cap = cap > o->max / 2 ? o->max : cap * 2;
    if (cap > o->max) cap = o->max;
    o->p = sd_realloc(o->p, cap ? cap : 1);
    o->cap = cap;
    return 0;
}

typedef struct inflater { huff lit, dist, codelen; } inflater;

static void build_inflater(inflater *z) {
    z->lit.table = sd_malloc(sizeof(uint16_t) << 15);
    z->dist.table = sd_malloc(sizeof(uint16_t) << 15);
    z->codelen.table = sd_malloc(sizeof(uint16_t) << 7);
}

static void free_inflater(inflater *z) {
    free(z->lit.table);
    free(z->dist.table);
    free(z->codelen.table);
}

static const char *msg_early = "stream ends early";

/* Read the code lengths of a dynamic block and build its two tables. */
static const char *read_dynamic_tables(inflater *z, bitreader *b) {
    br_refill(b);
    int hlit = (int)br_bits(b, 5) + 257, hdist = (int)br_bits(b, 5) + 1, hclen = (int)br_bits(b, 4) + 4;
    if (hlit > 286) return "too many literal/length codes (HLIT > 29)";
    if (hdist > 30) return "too many distance codes (HDIST > 29)";
    uint8_t cl[19] = { 0 };
    for (int i = 0; i < hclen; i++) cl[codelen_order[i]] = (uint8_t)br_bits(b, 3);
    if (br_overrun(b)) return msg_early;
    const char *err = huff_build(&z->codelen, cl, 19, HUFF_CODELEN);
    if (err) return err;
    uint8_t lens[286 + 30];
    int total = hlit + hdist;
    for (int i = 0; i < total;) {
        br_refill(b);
        int sym = huff_decode(&z->codelen, b);
        if (sym < 0) return "invalid code length code";
        int rep, val;
        if (sym < 16) { lens[i++] = (uint8_t)sym; continue; }
        if (sym == 16) {
            if (i == 0) return "code length repeat with no previous length";
            val = lens[i - 1];
            rep = 3 + (int)br_bits(b, 2);
        } else if (sym == 17) {
            val = 0;
            rep = 3 + (int)br_bits(b, 3);
        } else {
            val = 0;
            rep = 11 + (int)br_bits(b, 7);
        }
        if (rep > total - i) return "code length repeat past the last code";
        while (rep--) lens[i++] = (uint8_t)val;
    }
    if (br_overrun(b)) return msg_early;
    if (lens[256] == 0) return "no end-of-block code";
    err = huff_build(&z->lit, lens, hlit, HUFF_LITLEN);
    if (!err) err = huff_build(&z->dist, lens + hlit, hdist, HUFF_DIST);
    return err;
}

static void build_fixed_tables(inflater *z) {
    uint8_t lens[288];
    for (int i = 0; i < 288; i++) lens[i] = i < 144 ? 8 : i < 256 ? 9 : i < 280 ? 7 : 8;
    huff_build(&z->lit, lens, 288, HUFF_LITLEN);
    for (int i = 0; i < 32; i++) lens[i] = 5;
    huff_build(&z->dist, lens, 32, HUFF_DIST);   /* 30, 31 get codes, refused when decoded */
}

/* Decode the symbols of one Huffman block until end-of-block. One refill per symbol gives at
 * least 57 bits: enough for a length code, its extra bits, a distance code and its extra bits. */
static const char *inflate_codes(inflater *z, bitreader *b, outbuf *o) {
    for (;;) {
        br_refill(b);
        int sym = huff_decode(&z->lit, b);
        if (sym < 0) return "invalid literal/length code";
        if (sym < 256) {
            if (br_overrun(b)) return msg_early;
            if (o->n == o->cap && out_reserve(o, 1)) return "output larger than the limit";
            o->p[o->n++] = (uint8_t)sym;
            continue;
        }
        if (sym == 256) return br_overrun(b) ? msg_early : NULL;
        sym -= 257;
        if (sym >= 29) return "invalid literal/length symbol (286 or 287)";
        size_t len = length_base[sym] + br_bits(b, length_extra[sym]);
        int dsym = huff_decode(&z->dist, b);
        if (dsym < 0) return "invalid distance code";
        if (dsym >= 30) return "invalid distance symbol (30 or 31)";
        size_t dist = dist_base[dsym] + br_bits(b, dist_extra[dsym]);
        if (br_overrun(b)) return msg_early;
        if (dist > o->n - o->base) return "distance too far back";
        if (out_reserve(o, len)) return "output larger than the limit";
        uint8_t *dst = o->p + o->n;
        const uint8_t *src = dst - dist;
        for (size_t i = 0; i < len; i++) dst[i] = src[i];   /* byte by byte: the copy may overlap itself */
        o->n += len;
    }
}

/* Inflate one raw deflate stream from in[0..len), appending to o. *used = bytes consumed
 * (the stream ends on a byte boundary). Returns NULL or the problem. */
static const char *inflate_raw(const uint8_t *in, size_t len, size_t *used, outbuf *o) {
    bitreader b = { in, len, 0, 0, 0, 0 };
    inflater z;
    build_inflater(&z);
    const char *err = NULL;
    o->base = o->n;
    int final = 0;
    while (!final && !err) {
        br_refill(&b);
        final = (int)br_bits(&b, 1);
        int type = (int)br_bits(&b, 2);
        if (br_overrun(&b)) { err = msg_early; break; }
        if (type == 0) {
            if (br_rewind(&b) || len - b.pos < 4) { err = msg_early; break; }
            unsigned n = sd_le16(in + b.pos), nn = sd_le16(in + b.pos + 2);
            if (n != (~nn & 0xffffu)) { err = "stored block length does not match its complement"; break; }
            b.pos += 4;
            if (len - b.pos < n) { err = msg_early; break; }
            if (out_reserve(o, n)) { err = "output larger than the limit"; break; }
            memcpy(o->p + o->n, in + b.pos, n);
            o->n += n;
            b.pos += n;
        } else if (type == 1) {
            build_fixed_tables(&z);
            err = inflate_codes(&z, &b, o);
        } else if (type == 2) {
            err = read_dynamic_tables(&z, &b);
            if (!err) err = inflate_codes(&z, &b, o);
        } else {
            err = "invalid block type 3";
        }
    }
    if (!err && br_rewind(&b)) err = msg_early;
    free_inflater(&z);
    *used = b.pos;
    return err;
}

/* ======================================================================================
 * 3. zlib and gzip wrappers
 * ====================================================================================== */

/* The zlib stream in[0..len) into o. NULL or the problem. */
static const char *zlib_inflate_into(const uint8_t *in, size_t len, outbuf *o) {
    if (len < 2) return "stream ends early (no zlib header)";
    unsigned cmf = in[0], flg = in[1];
    if ((cmf & 15) != 8) return "zlib compression method (CM) is not deflate (8)";
    if ((cmf >> 4) > 7) return "zlib window size field CINFO > 7";
    if ((cmf * 256 + flg) % 31 != 0) return "zlib header check bits (FCHECK) wrong";
    if (flg & 0x20) return "zlib preset dictionary (FDICT) not supported";
    size_t used;
    const char *err = inflate_raw(in + 2, len - 2, &used, o);
    if (err) return err;
    size_t pos = 2 + used;
    if (len - pos < 4) return "stream ends early (no Adler-32)";
    if (be32(in + pos) != adler32(o->p + o->base, o->n - o->base)) return "Adler-32 checksum mismatch";
    if (len - pos > 4) return "data after the end of the zlib stream";
    return NULL;
}

int sd_zlib_inflate(const uint8_t *in, size_t in_len, uint8_t **out, size_t *out_len, size_t max_out) {
    outbuf o = build_outbuf(max_out);
    const char *err = zlib_inflate_into(in, in_len, &o);
    if (err) {
        free(o.p);
        sd_error("zlib stream: %s", err);
        return -1;
    }
    *out = o.p;
    *out_len = o.n;
    return 0;
}

/* One gzip member at in[0..len): header, deflate data, CRC-32 and ISIZE. */
static const char *gunzip_member(const uint8_t *in, size_t len, size_t *used, outbuf *o) {
    if (len < 10) return "stream ends early (gzip header)";
    if (in[0] != 0x1f || in[1] != 0x8b) return "not gzip data (bad magic bytes)";
    if (in[2] != 8) return "gzip compression method is not deflate (8)";
    unsigned flg = in[3];
    if (flg & 0xe0) return "reserved gzip header flags set";
    size_t pos = 10;
    if (flg & 4) {   /* FEXTRA: two-byte length, then that many bytes */
        if (len - pos < 2) return "stream ends early (gzip extra field)";
        size_t xlen = sd_le16(in + pos);
        pos += 2;
        if (len - pos < xlen) return "stream ends early (gzip extra field)";
        pos += xlen;
    }
    for (unsigned bit = 8; bit <= 16; bit <<= 1) {   /* FNAME, FCOMMENT: zero-terminated */
        if (!(flg & bit)) continue;
        const uint8_t *z = memchr(in + pos, 0, len - pos);
        if (!z) return "stream ends early (gzip file name or comment)";
        pos = (size_t)(z - in) + 1;
    }
    if (flg & 2) {   /* FHCRC: low 16 bits of the CRC-32 of the header so far */
        if (len - pos < 2) return "stream ends early (gzip header CRC)";
        if (sd_le16(in + pos) != (sd_crc32(0, in, pos) & 0xffff)) return "gzip header CRC mismatch";
        pos += 2;
    }
    size_t start = o->n, n;
    const char *err = inflate_raw(in + pos, len - pos, &n, o);
    if (err) return err;
    pos += n;
    if (len - pos < 8) return "stream ends early (no gzip trailer)";
    if (sd_le32(in + pos) != sd_crc32(0, o->p + start, o->n - start)) return "CRC-32 mismatch";
    if (sd_le32(in + pos + 4) != (uint32_t)(o->n - start)) return "gzip size field (ISIZE) mismatch";
    *used = pos + 8;
    return NULL;
}

/* Concatenated members are inflated one after the other into one output. */
int sd_gunzip(const uint8_t *in, size_t in_len, uint8_t **out, size_t *out_len, size_t max_out) {
    outbuf o = build_outbuf(max_out);
    size_t pos = 0;
    const char *err = NULL;
    do {
        size_t used = 0;
        err = gunzip_member(in + pos, in_len - pos, &used, &o);
        pos += used;
    } while (!err && pos < in_len);
    if (err) {
        free(o.p);
        sd_error("gzip stream: %s", err);
        return -1;
    }
    *out = o.p;
    *out_len = o.n;
    return 0;
}

/* ======================================================================================
 * 4. Deflate
 * ====================================================================================== */

#define WINDOW_SIZE 32768
#define WINDOW_MASK (WINDOW_SIZE - 1)
#define HASH_BITS 15
#define MIN_MATCH 3
#define MAX_MATCH 258
#define BLOCK_SYMBOLS 16384   /* symbols per block before its codes are rebuilt */

/* Bits are written from the low end of a 64-bit accumulator into a growing byte array. */
typedef struct bitwriter { uint8_t *buf; size_t n, cap; uint64_t acc; int cnt; } bitwriter;

static void bw_byte(bitwriter *w, uint8_t v) {
    if (w->n == w->cap) w->buf = sd_realloc(w->buf, w->cap = w->cap ? w->cap * 2 : 4096);
    w->buf[w->n++] = v;
}

static void bw_put(bitwriter *w, uint32_t bits, int n) {
    w->acc |= (uint64_t)bits << w->cnt;
    w->cnt += n;
    while (w->cnt >= 8) { bw_byte(w, (uint8_t)w->acc); w->acc >>= 8; w->cnt -= 8; }
}

static void bw_align(bitwriter *w) {
    if (w->cnt > 0) bw_put(w, 0, 8 - w->cnt);
}

/* Search parameters per level, after zlib's table: stop looking once a match is `nice` long,
 * follow at most `chain` candidates (a quarter of that once the current match is `good`), and
 * look one position ahead (lazy matching) while the current match is shorter than `lazy`. */
typedef struct level_config { int good, lazy, nice, chain; } level_config;
static const level_config level_configs[10] = {
    { 0, 0, 0, 0 },          /* 0: stored only */
    { 4, 0, 8, 4 },     { 4, 0, 16, 8 },     { 4, 0, 32, 32 },
    { 4, 4, 16, 16 },   { 8, 16, 32, 32 },   { 8, 16, 128, 128 },
    { 8, 32, 128, 256 }, { 32, 128, 258, 1024 }, { 32, 258, 258, 4096 },
};

/* The compressor: input, hash chains over absolute positions (+1; 0 = none), the symbols of
 * the current block (dist 0 = a literal in `lit`, else a match of length `lit`). */
typedef struct deflater {
    const uint8_t *in;
    size_t n;
    level_config cfg;
    size_t *head, *prev;
    size_t inserted;           /* positions below this are in the hash chains */
    uint16_t *lit, *dist;
    int nsym;
    size_t block_start;        /* first input byte of the current block */
    bitwriter w;
} deflater;

static uint32_t hash3(const uint8_t *p) {
    uint32_t v = (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16);
    return (v * 2654435761u) >> (32 - HASH_BITS);
}

static void insert_until(deflater *d, size_t q) {
    for (; d->inserted < q; d->inserted++) {
        size_t p = d->inserted;
        if (p + MIN_MATCH > d->n) continue;
        uint32_t h = hash3(d->in + p);
        d->prev[p & WINDOW_MASK] = d->head[h];
        d->head[h] = p + 1;
    }
}

/* Longest earlier match for position p within the window; 0 if none of at least 3 bytes.
 * Short far matches (3 bytes more than 4096 back) cost more than literals and are dropped. */
static int longest_match(const deflater *d, size_t p, int chain, size_t *dist) {
    if (d->n - p < MIN_MATCH) return 0;
    int max_len = d->n - p < MAX_MATCH ? (int)(d->n - p) : MAX_MATCH;
    const uint8_t *cur = d->in + p;
    int best = MIN_MATCH - 1;
    size_t c = d->head[hash3(cur)];
    while (c && chain-- > 0) {
        size_t cand = c - 1;
        if (cand >= p || p - cand > WINDOW_SIZE) break;
        const uint8_t *m = d->in + cand;
        if (m[best] == cur[best] && m[0] == cur[0]) {
            int len = 0;
            while (len < max_len && m[len] == cur[len]) len++;
            if (len > best) {
                best = len;
                *dist = p - cand;
                if (len >= d->cfg.nice || len == max_len) break;
            }
        }
        size_t next = d->prev[cand & WINDOW_MASK];
        if (next >= c) break;   /* chains only go back in time */
        c = next;
    }
    if (best < MIN_MATCH || (best == MIN_MATCH && *dist > 4096)) return 0;
    return best;
}

/* Length-limited Huffman code lengths for freq[0..n): a Huffman tree (two-queue method over
 * symbols sorted by frequency, ties by symbol), depths over `limit` folded back while keeping
 * the Kraft sum exact, lengths then given to symbols from the rarest up. At least two symbols
 * get codes (as zlib does) so every code is complete. */
static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void huff_lengths(const uint32_t *freq, int n, int limit, uint8_t *lens) {
    uint64_t key[320];
    int m = 0;
    memset(lens, 0, (size_t)n);
    for (int s = 0; s < n; s++) if (freq[s]) key[m++] = ((uint64_t)freq[s] << 16) | (uint64_t)s;
    for (int s = 0; m < 2 && s < n; s++) if (!freq[s]) key[m++] = (uint64_t)s;   /* weight 0 dummies */
    qsort(key, (size_t)m, sizeof key[0], cmp_u64);
    uint64_t weight[640];
    int parent[640], depth[640];
    for (int i = 0; i < m; i++) weight[i] = key[i] >> 16;
    int leaf = 0, node = m;   /* next leaf, next internal node to combine */
    for (int k = m; k < 2 * m - 1; k++) {
        int pick[2];
        for (int t = 0; t < 2; t++) {
            if (leaf < m && (node >= k || weight[leaf] <= weight[node])) pick[t] = leaf++;
            else pick[t] = node++;
        }
        weight[k] = weight[pick[0]] + weight[pick[1]];
        parent[pick[0]] = parent[pick[1]] = k;
    }
    depth[2 * m - 2] = 0;
    for (int k = 2 * m - 3; k >= 0; k--) depth[k] = depth[parent[k]] + 1;
    int count[16] = { 0 };
    for (int i = 0; i < m; i++) count[depth[i] > limit ? limit : depth[i]]++;
    uint32_t kraft = 0;
    for (int l = 1; l <= limit; l++) kraft += (uint32_t)count[l] << (limit - l);
    while (kraft > (1u << limit)) {   /* drop a leaf from the bottom, split a shallower one */
        count[limit]--;
        for (int l = limit - 1; l > 0; l--)
            if (count[l]) { count[l]--; count[l + 1] += 2; break; }
        kraft--;
    }
    int i = 0;
    for (int l = limit; l >= 1; l--)
        for (int c = 0; c < count[l]; c++) lens[key[i++] & 0xffff] = (uint8_t)l;
}

/* Canonical codes for lengths, bit-reversed for LSB-first output. */
static void huff_codes(const uint8_t *lens, int n, uint16_t *codes) {
    int count[16] = { 0 };
    for (int i = 0; i < n; i++) count[lens[i]]++;
    count[0] = 0;
    uint32_t next[16], code = 0;
    for (int l = 1; l <= 15; l++) { code = (code + (uint32_t)count[l - 1]) << 1; next[l] = code; }
    for (int s = 0; s < n; s++) codes[s] = lens[s] ? (uint16_t)reverse_bits(next[lens[s]]++, lens[s]) : 0;
}

static int length_code(int len) { int c = 28; while (length_base[c] > len) c--; return c; }
static int dist_code(int dist) { int c = 29; while (dist_base[c] > dist) c--; return c; }

/* One Huffman block's codes. */
typedef struct block_codes {
    uint8_t lit_len[288], dist_len[32];
    uint16_t lit_code[288], dist_code[32];
} block_codes;

static void fixed_codes(block_codes *bc) {
    for (int i = 0; i < 288; i++) bc->lit_len[i] = i < 144 ? 8 : i < 256 ? 9 : i < 280 ? 7 : 8;
    for (int i = 0; i < 32; i++) bc->dist_len[i] = 5;
    huff_codes(bc->lit_len, 288, bc->lit_code);
    huff_codes(bc->dist_len, 32, bc->dist_code);
}

/* Bits of the block's symbols (without headers) under the given codes. */
static uint64_t symbols_cost(const uint32_t *lf, const uint32_t *df, const block_codes *bc) {
    uint64_t bits = 0;
    for (int s = 0; s < 286; s++) bits += (uint64_t)lf[s] * (bc->lit_len[s] + (s > 256 ? length_extra[s - 257] : 0));
    for (int s = 0; s < 30; s++) bits += (uint64_t)df[s] * (bc->dist_len[s] + dist_extra[s]);
    return bits;
}

static void write_symbols(deflater *d, const block_codes *bc) {
    bitwriter *w = &d->w;
    for (int i = 0; i < d->nsym; i++) {
        int v = d->lit[i], dist = d->dist[i];
        if (!dist) { bw_put(w, bc->lit_code[v], bc->lit_len[v]); continue; }
        int lc = length_code(v), dc = dist_code(dist);
        bw_put(w, bc->lit_code[257 + lc], bc->lit_len[257 + lc]);
        bw_put(w, (uint32_t)(v - length_base[lc]), length_extra[lc]);
        bw_put(w, bc->dist_code[dc], bc->dist_len[dc]);
        bw_put(w, (uint32_t)(dist - dist_base[dc]), dist_extra[dc]);
    }
    bw_put(w, bc->lit_code[256], bc->lit_len[256]);
}

/* Input bytes [from, to) as stored blocks of at most 65535 bytes. */
static void write_stored(bitwriter *w, const uint8_t *in, size_t from, size_t to, int final) {
    do {
        size_t n = to - from < 65535 ? to - from : 65535;
        bw_put(w, (final && from + n == to) ? 1 : 0, 3);
        bw_align(w);
        bw_put(w, (uint32_t)n, 16);
        bw_put(w, (uint32_t)(~n & 0xffff), 16);
        for (size_t i = 0; i < n; i++) bw_byte(w, in[from + i]);
        from += n;
    } while (from < to);
}

/* Send the collected symbols (input bytes [block_start, end)) as the cheapest of a dynamic
 * Huffman block, a fixed one and stored blocks. */
static void flush_block(deflater *d, size_t end, int final) {
    uint32_t lf[286] = { 0 }, df[30] = { 0 };
    for (int i = 0; i < d->nsym; i++) {
        if (!d->dist[i]) { lf[d->lit[i]]++; continue; }
        lf[257 + length_code(d->lit[i])]++;
        df[dist_code(d->dist[i])]++;
    }
    lf[256] = 1;

    block_codes dyn;
    memset(&dyn, 0, sizeof dyn);
    huff_lengths(lf, 286, 15, dyn.lit_len);
    huff_lengths(df, 30, 15, dyn.dist_len);
    huff_codes(dyn.lit_len, 286, dyn.lit_code);
    huff_codes(dyn.dist_len, 30, dyn.dist_code);
    int hlit = 286, hdist = 30;
    while (hlit > 257 && !dyn.lit_len[hlit - 1]) hlit--;
    while (hdist > 1 && !dyn.dist_len[hdist - 1]) hdist--;

    /* The code lengths, run-length coded with symbols 16 (repeat previous 3..6), 17 (3..10
     * zeros) and 18 (11..138 zeros). */
    uint8_t all[286 + 30], rle_sym[316], rle_extra[316];
    int total = hlit + hdist, nrle = 0;
    memcpy(all, dyn.lit_len, (size_t)hlit);
    memcpy(all + hlit, dyn.dist_len, (size_t)hdist);
    for (int i = 0; i < total;) {
        int v = all[i], run = 1;
        while (i + run < total && all[i + run] == v) run++;
        if (v == 0 && run >= 3) {
            int r = run > 138 ? 138 : run;
            rle_sym[nrle] = r >= 11 ? 18 : 17;
            rle_extra[nrle++] = (uint8_t)(r >= 11 ? r - 11 : r - 3);
            i += r;
        } else if (v != 0 && run >= 4) {
            rle_sym[nrle] = (uint8_t)v;
            rle_extra[nrle++] = 0;
            int r = run - 1 > 6 ? 6 : run - 1;
            rle_sym[nrle] = 16;
            rle_extra[nrle++] = (uint8_t)(r - 3);
            i += 1 + r;
        } else {
            rle_sym[nrle] = (uint8_t)v;
            rle_extra[nrle++] = 0;
            i++;
        }
    }
    uint32_t cf[19] = { 0 };
    for (int i = 0; i < nrle; i++) cf[rle_sym[i]]++;
    uint8_t cl_len[19];
    uint16_t cl_code[19];
    huff_lengths(cf, 19, 7, cl_len);
    huff_codes(cl_len, 19, cl_code);
    int hclen = 19;
    while (hclen > 4 && !cl_len[codelen_order[hclen - 1]]) hclen--;

    static const uint8_t rle_extra_bits[19] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 3, 7 };
    uint64_t dyn_bits = 3 + 5 + 5 + 4 + 3 * (uint64_t)hclen + symbols_cost(lf, df, &dyn);
    for (int s = 0; s < 19; s++) dyn_bits += (uint64_t)cf[s] * (cl_len[s] + rle_extra_bits[s]);
    block_codes fix;
    fixed_codes(&fix);
    uint64_t fixed_bits = 3 + symbols_cost(lf, df, &fix);
    size_t nbytes = end - d->block_start;
    uint64_t stored_bits = 8 * (uint64_t)nbytes + (3 + 7 + 32) * (uint64_t)(nbytes / 65535 + 1);

    bitwriter *w = &d->w;
    if (stored_bits < dyn_bits && stored_bits < fixed_bits) {
        write_stored(w, d->in, d->block_start, end, final);
    } else if (fixed_bits <= dyn_bits) {
        bw_put(w, (uint32_t)final | (1u << 1), 3);
        write_symbols(d, &fix);
    } else {
        bw_put(w, (uint32_t)final | (2u << 1), 3);
        bw_put(w, (uint32_t)(hlit - 257), 5);
        bw_put(w, (uint32_t)(hdist - 1), 5);
        bw_put(w, (uint32_t)(hclen - 4), 4);
        for (int i = 0; i < hclen; i++) bw_put(w, cl_len[codelen_order[i]], 3);
        for (int i = 0; i < nrle; i++) {
            bw_put(w, cl_code[rle_sym[i]], cl_len[rle_sym[i]]);
            bw_put(w, rle_extra[i], rle_extra_bits[rle_sym[i]]);
        }
        write_symbols(d, &dyn);
    }
    d->nsym = 0;
    d->block_start = end;
}

static void push_symbol(deflater *d, int lit, size_t dist, size_t end) {
    d->lit[d->nsym] = (uint16_t)lit;
    d->dist[d->nsym] = (uint16_t)dist;
    if (++d->nsym == BLOCK_SYMBOLS) flush_block(d, end, 0);
}

/* LZ77 parse with lazy matching: a match found at p is kept only if p+1 has no longer one;
 * otherwise p becomes a literal and the match at p+1 is considered next. */
static void deflate_body(deflater *d) {
    size_t p = 0, cached_p = (size_t)-1, cached_dist = 0, dist = 0;
    int cached_len = 0;
    while (p < d->n) {
        int len;
        if (p == cached_p) {
            len = cached_len;
            dist = cached_dist;
        } else {
            insert_until(d, p);
            len = longest_match(d, p, d->cfg.chain, &dist);
        }
        if (len && len < d->cfg.lazy && p + 1 < d->n) {
            insert_until(d, p + 1);
            size_t dist2 = 0;
            int len2 = longest_match(d, p + 1, len >= d->cfg.good ? d->cfg.chain >> 2 : d->cfg.chain, &dist2);
            if (len2 > len) {
                cached_p = p + 1;
                cached_len = len2;
                cached_dist = dist2;
                push_symbol(d, d->in[p], 0, p + 1);
                p++;
                continue;
            }
        }
        if (len) {
            push_symbol(d, len, dist, p + (size_t)len);
            p += (size_t)len;
        } else {
            push_symbol(d, d->in[p], 0, p + 1);
            p++;
        }
    }
    flush_block(d, d->n, 1);
}

int sd_zlib_deflate(const uint8_t *in, size_t in_len, int level, uint8_t **out, size_t *out_len) {
    if (level < 0) level = 6;
    if (level > 9) level = 9;
    deflater d;
    memset(&d, 0, sizeof d);
    d.in = in;
    d.n = in_len;
    d.cfg = level_configs[level];
    /* zlib header: 32K window, deflate; FLEVEL says roughly how hard we tried */
    unsigned cmf = 0x78, flevel = level < 2 ? 0 : level < 6 ? 1 : level == 6 ? 2 : 3;
    unsigned flg = flevel << 6;
    if ((cmf * 256 + flg) % 31) flg += 31 - (cmf * 256 + flg) % 31;
    bw_byte(&d.w, (uint8_t)cmf);
    bw_byte(&d.w, (uint8_t)flg);
    if (level == 0) {
        write_stored(&d.w, in, 0, in_len, 1);
    } else {
        d.head = sd_calloc((size_t)1 << HASH_BITS, sizeof(size_t));
        d.prev = sd_calloc(WINDOW_SIZE, sizeof(size_t));
        d.lit = sd_malloc(BLOCK_SYMBOLS * sizeof(uint16_t));
        d.dist = sd_malloc(BLOCK_SYMBOLS * sizeof(uint16_t));
        deflate_body(&d);
        free(d.head);
        free(d.prev);
        free(d.lit);
        free(d.dist);
    }
    bw_align(&d.w);
    uint8_t trailer[4];
    put_be32(trailer, adler32(in, in_len));
    for (int i = 0; i < 4; i++) bw_byte(&d.w, trailer[i]);
    *out = d.w.buf;
    *out_len = d.w.n;
    return 0;
}

/* ======================================================================================
 * 5. PNG decoding
 * ====================================================================================== */

static const uint8_t png_signature[8] = { 137, 80, 78, 71, 13, 10, 26, 10 };

/* What IHDR, PLTE and tRNS say. */
typedef struct png_header {
    uint32_t width, height;
    int depth, color, interlace;
    int channels;                /* samples per pixel as stored: 1, 2, 3 or 4 */
    uint8_t palette[256][3];
    int n_palette;               /* 0 = no PLTE */
    uint8_t palette_alpha[256];  /* tRNS for colour type 3 (255 beyond its length) */
    int has_key;                 /* tRNS for grey / RGB: this sample value is transparent */
    unsigned key[3];
} png_header;

/* Adam7 passes: first column and row, column and row steps. A single pass covers a
 * non-interlaced image. */
static const int adam7[7][4] = { { 0, 0, 8, 8 }, { 4, 0, 8, 8 }, { 0, 4, 4, 8 }, { 2, 0, 4, 4 },
                                 { 0, 2, 2, 4 }, { 1, 0, 2, 2 }, { 0, 1, 1, 2 } };
static const int no_interlace[1][4] = { { 0, 0, 1, 1 } };

static int png_ihdr(png_header *h, const uint8_t *d, uint32_t len, const char *what) {
    if (len != 13) { sd_error("%s: IHDR chunk has length %u, not 13", what, (unsigned)len); return -1; }
    h->width = be32(d);
    h->height = be32(d + 4);
    h->depth = d[8];
    h->color = d[9];
    h->interlace = d[12];
    if (h->width == 0 || h->height == 0) {
        sd_error("%s: image %s is 0", what, h->width == 0 ? "width" : "height");
        return -1;
    }
    if (h->width > 0x7fffffffu || h->height > 0x7fffffffu) {
        sd_error("%s: image %s %lu exceeds 2^31-1", what, h->width > 0x7fffffffu ? "width" : "height",
                 (unsigned long)(h->width > 0x7fffffffu ? h->width : h->height));
        return -1;
    }
    static const int channels_of[7] = { 1, 0, 3, 1, 2, 0, 4 };
    if (h->color > 6 || channels_of[h->color] == 0) { sd_error("%s: invalid colour type %d", what, h->color); return -1; }
    h->channels = channels_of[h->color];
    int dp = h->depth;
    int ok = h->color == 0 ? (dp == 1 || dp == 2 || dp == 4 || dp == 8 || dp == 16)
           : h->color == 3 ? (dp == 1 || dp == 2 || dp == 4 || dp == 8)
           : (dp == 8 || dp == 16);
    if (!ok) { sd_error("%s: bit depth %d is not allowed for colour type %d", what, dp, h->color); return -1; }
    if (d[10] != 0) { sd_error("%s: unknown compression method %d", what, d[10]); return -1; }
    if (d[11] != 0) { sd_error("%s: unknown filter method %d", what, d[11]); return -1; }
    if (h->interlace > 1) { sd_error("%s: unknown interlace method %d", what, h->interlace); return -1; }
    if ((uint64_t)h->width * h->height > SD_PNG_MAX_PIXELS) {
        sd_error("%s: image %lux%lu exceeds the limit of %lu pixels", what, (unsigned long)h->width,
                 (unsigned long)h->height, (unsigned long)SD_PNG_MAX_PIXELS);
        return -1;
    }
    return 0;
}

static int png_plte(png_header *h, const uint8_t *d, uint32_t len, const char *what) {
    if (h->color == 0 || h->color == 4) { sd_error("%s: PLTE chunk in a greyscale image", what); return -1; }
    if (h->n_palette) { sd_error("%s: more than one PLTE chunk", what); return -1; }
    if (len == 0 || len % 3 != 0 || len > 768) {
        sd_error("%s: PLTE chunk length %u is not 3 x (1..256)", what, (unsigned)len);
        return -1;
    }
    int n = (int)(len / 3);
    if (h->color == 3 && n > (1 << h->depth)) {
        sd_error("%s: PLTE has %d entries, more than bit depth %d allows", what, n, h->depth);
        return -1;
    }
    memcpy(h->palette, d, len);
    h->n_palette = n;
    return 0;
}

static int png_trns(png_header *h, const uint8_t *d, uint32_t len, const char *what) {
    if (h->color == 3) {
        if (!h->n_palette) { sd_error("%s: tRNS chunk before PLTE", what); return -1; }
        if ((int)len > h->n_palette) {
            sd_error("%s: tRNS has %u entries, more than the %d of PLTE", what, (unsigned)len, h->n_palette);
            return -1;
        }
        memcpy(h->palette_alpha, d, len);
        return 0;
    }
    if (h->color == 4 || h->color == 6) { sd_error("%s: tRNS chunk in an image with an alpha channel", what); return -1; }
    uint32_t want = h->color == 0 ? 2 : 6;
    if (len != want) { sd_error("%s: tRNS chunk length %u, expected %u", what, (unsigned)len, (unsigned)want); return -1; }
    for (int i = 0; i < (int)want / 2; i++) h->key[i] = (unsigned)(d[2 * i] << 8 | d[2 * i + 1]);
    h->has_key = 1;
    return 0;
}

/* Filtered size of each pass: rows of 1 filter byte + ceil(width * bits / 8) bytes. */
static size_t pass_rowbytes(const png_header *h, uint32_t pw) {
    return (size_t)(((uint64_t)pw * (uint64_t)(h->channels * h->depth) + 7) / 8);
}

static void pass_size(const png_header *h, const int *ps, uint32_t *pw, uint32_t *ph) {
    *pw = h->width > (uint32_t)ps[0] ? (h->width - (uint32_t)ps[0] + (uint32_t)ps[2] - 1) / (uint32_t)ps[2] : 0;
    *ph = h->height > (uint32_t)ps[1] ? (h->height - (uint32_t)ps[1] + (uint32_t)ps[3] - 1) / (uint32_t)ps[3] : 0;
}

static int paeth(int a, int b, int c) {
    int p = a + b - c, pa = abs(p - a), pb = abs(p - b), pc = abs(p - c);
    return (pa <= pb && pa <= pc) ? a : pb <= pc ? b : c;
}

/* Undo one row's filter in place. prev = the previous row of the pass, already unfiltered
 * (all zero for its first row). bpp = bytes per complete pixel, at least 1. */
static void unfilter_row(int type, uint8_t *row, const uint8_t *prev, size_t n, size_t bpp) {
    switch (type) {
    case 1: for (size_t i = bpp; i < n; i++) row[i] = (uint8_t)(row[i] + row[i - bpp]); break;
    case 2: for (size_t i = 0; i < n; i++) row[i] = (uint8_t)(row[i] + prev[i]); break;
    case 3:
        for (size_t i = 0; i < n; i++) row[i] = (uint8_t)(row[i] + (((i >= bpp ? row[i - bpp] : 0) + prev[i]) >> 1));
        break;
    case 4:
        for (size_t i = 0; i < n; i++)
            row[i] = (uint8_t)(row[i] + paeth(i >= bpp ? row[i - bpp] : 0, prev[i], i >= bpp ? prev[i - bpp] : 0));
        break;
    default: break;
    }
}

/* Sample k of an unfiltered row (bit depths below 8 pack pixels from the high bits). */
static unsigned get_sample(const uint8_t *row, size_t k, int depth) {
    if (depth == 8) return row[k];
    if (depth == 16) return (unsigned)(row[2 * k] << 8 | row[2 * k + 1]);
    size_t bit = k * (size_t)depth;
    return (unsigned)(row[bit >> 3] >> (8 - depth - (int)(bit & 7))) & ((1u << depth) - 1);
}

/* Expand one unfiltered row of a pass to RGBA at pixels (x0 + i*dx, y). Grey is replicated,
 * samples below 8 bits scaled to 0..255 (x255, x85, x17), alpha from the alpha channel, tRNS
 * (a key is compared at full depth before scaling) or the maximum. */
static int expand_row(const png_header *h, const uint8_t *row, uint32_t pw, uint32_t y, int x0, int dx,
                      sd_image *im, const char *what) {
    unsigned maxv = (1u << h->depth) - 1;
    unsigned scale = h->depth < 8 ? 255 / maxv : 1;
    unsigned opaque = h->depth == 16 ? 65535 : 255;
    for (uint32_t i = 0; i < pw; i++) {
        unsigned v[4];
        size_t k = (size_t)i * (size_t)h->channels;
        switch (h->color) {
        case 0:
            v[0] = v[1] = v[2] = get_sample(row, k, h->depth);
            v[3] = h->has_key && v[0] == h->key[0] ? 0 : opaque;
            v[0] = v[1] = v[2] = v[0] * scale;
            break;
        case 2:
            for (int c = 0; c < 3; c++) v[c] = get_sample(row, k + (size_t)c, h->depth);
            v[3] = h->has_key && v[0] == h->key[0] && v[1] == h->key[1] && v[2] == h->key[2] ? 0 : opaque;
            break;
        case 3: {
            unsigned idx = get_sample(row, k, h->depth);
            if ((int)idx >= h->n_palette) {
                sd_error("%s: palette index %u out of range (PLTE has %d entries) at pixel (%lu, %lu)", what, idx,
                         h->n_palette, (unsigned long)((uint32_t)x0 + i * (uint32_t)dx), (unsigned long)y);
                return -1;
            }
            for (int c = 0; c < 3; c++) v[c] = h->palette[idx][c];
            v[3] = h->palette_alpha[idx];
            break;
        }
        case 4:
            v[0] = v[1] = v[2] = get_sample(row, k, h->depth);
            v[3] = get_sample(row, k + 1, h->depth);
            break;
        default:
            for (int c = 0; c < 4; c++) v[c] = get_sample(row, k + (size_t)c, h->depth);
            break;
        }
        size_t at = ((size_t)y * h->width + (size_t)x0 + (size_t)i * (size_t)dx) * 4;
        if (h->depth == 16) {
            uint16_t *px = (uint16_t *)im->pixels + at;
            for (int c = 0; c < 4; c++) px[c] = (uint16_t)v[c];
        } else {
            uint8_t *px = (uint8_t *)im->pixels + at;
            for (int c = 0; c < 4; c++) px[c] = (uint8_t)v[c];
        }
    }
    return 0;
}

/* Unfilter the inflated data pass by pass and expand it into im. */
static int png_unfilter_expand(const png_header *h, uint8_t *data, sd_image *im, const char *what) {
    const int (*passes)[4] = h->interlace ? adam7 : no_interlace;
    int npasses = h->interlace ? 7 : 1;
    size_t bpp = (size_t)(h->channels * h->depth + 7) / 8;
    uint8_t *zero = sd_calloc(pass_rowbytes(h, h->width) + 1, 1);
    size_t pos = 0, row_index = 0;
    for (int p = 0; p < npasses; p++) {
        uint32_t pw, ph;
        pass_size(h, passes[p], &pw, &ph);
        if (!pw || !ph) continue;
        size_t rb = pass_rowbytes(h, pw);
        const uint8_t *prev = zero;
        for (uint32_t r = 0; r < ph; r++, row_index++) {
            int type = data[pos];
            uint8_t *row = data + pos + 1;
            if (type > 4) {
                if (h->interlace)
                    sd_error("%s: unknown filter type %d in row %lu (Adam7 pass %d, row %lu)", what, type,
                             (unsigned long)row_index, p + 1, (unsigned long)r);
                else
                    sd_error("%s: unknown filter type %d in row %lu", what, type, (unsigned long)row_index);
                free(zero);
                return -1;
            }
            unfilter_row(type, row, prev, rb, bpp);
            uint32_t y = (uint32_t)passes[p][1] + r * (uint32_t)passes[p][3];
            if (expand_row(h, row, pw, y, passes[p][0], passes[p][2], im, what)) { free(zero); return -1; }
            prev = row;
            pos += rb + 1;
        }
    }
    free(zero);
    return 0;
}

static int is_letter(uint8_t c) { return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z'); }

int png_decode(const uint8_t *buf, size_t len, const char *what, sd_image *out) {
    memset(out, 0, sizeof *out);
    if (len == 0) { sd_error("%s: empty file, not a PNG", what); return -1; }
    if (len < 8 || memcmp(buf, png_signature, 8) != 0) { sd_error("%s: not a PNG file (bad signature)", what); return -1; }
    png_header h;
    memset(&h, 0, sizeof h);
    memset(h.palette_alpha, 255, sizeof h.palette_alpha);
    uint8_t *idat = NULL;
    size_t idat_len = 0, idat_cap = 0, pos = 8;
    int seen_ihdr = 0, idat_state = 0;   /* 0 none yet, 1 in the IDAT run, 2 after it */
    for (;;) {
        if (pos == len) {
            sd_error(seen_ihdr ? "%s: file ends without an IEND chunk (truncated?)" : "%s: file ends after the PNG signature", what);
            goto fail;
        }
        if (len - pos < 12) { sd_error("%s: file truncated inside a chunk header at offset %lu", what, (unsigned long)pos); goto fail; }
        uint32_t clen = be32(buf + pos);
        const uint8_t *type = buf + pos + 4, *data = buf + pos + 8;
        char name[5] = { 0 };
        if (!is_letter(type[0]) || !is_letter(type[1]) || !is_letter(type[2]) || !is_letter(type[3])) {
            sd_error("%s: invalid chunk type %02x %02x %02x %02x at offset %lu", what, type[0], type[1], type[2],
                     type[3], (unsigned long)pos);
            goto fail;
        }
        memcpy(name, type, 4);
        if (clen > 0x7fffffffu) { sd_error("%s: %s chunk length %lu exceeds 2^31-1", what, name, (unsigned long)clen); goto fail; }
        if (clen > len - pos - 12) {
            sd_error("%s: file truncated inside the %s chunk (%lu bytes declared, %lu present)", what, name,
                     (unsigned long)clen, (unsigned long)(len - pos - 12));
            goto fail;
        }
        if (be32(data + clen) != sd_crc32(0, type, (size_t)clen + 4)) { sd_error("%s: CRC mismatch in %s chunk", what, name); goto fail; }
        pos += (size_t)clen + 12;
        if (!seen_ihdr && strcmp(name, "IHDR") != 0) { sd_error("%s: first chunk is %s, not IHDR", what, name); goto fail; }
        if (idat_state == 1 && strcmp(name, "IDAT") != 0) idat_state = 2;
        if (strcmp(name, "IHDR") == 0) {
            if (seen_ihdr) { sd_error("%s: more than one IHDR chunk", what); goto fail; }
            if (png_ihdr(&h, data, clen, what)) goto fail;
            seen_ihdr = 1;
        } else if (strcmp(name, "PLTE") == 0) {
            if (idat_state) { sd_error("%s: PLTE chunk after IDAT", what); goto fail; }
            if (png_plte(&h, data, clen, what)) goto fail;
        } else if (strcmp(name, "tRNS") == 0) {
            if (idat_state) { sd_error("%s: tRNS chunk after IDAT", what); goto fail; }
            if (png_trns(&h, data, clen, what)) goto fail;
        } else if (strcmp(name, "IDAT") == 0) {
            if (idat_state == 2) { sd_error("%s: IDAT chunks are not consecutive", what); goto fail; }
            if (h.color == 3 && !h.n_palette) { sd_error("%s: colour type 3 (palette) without a PLTE chunk before IDAT", what); goto fail; }
            idat_state = 1;
            if (idat_len + clen + 1 > idat_cap) {   /* grow geometrically: files may hold many tiny IDATs */
                while (idat_len + clen + 1 > idat_cap) idat_cap = idat_cap ? 2 * idat_cap : 4096;
                idat = sd_realloc(idat, idat_cap);
            }
            memcpy(idat + idat_len, data, clen);
            idat_len += clen;
        } else if (strcmp(name, "IEND") == 0) {
            if (clen != 0) { sd_error("%s: IEND chunk has length %lu, not 0", what, (unsigned long)clen); goto fail; }
            break;   /* bytes after IEND are ignored */
        } else if (!(type[0] & 0x20)) {
            sd_error("%s: unknown critical chunk %s", what, name);
            goto fail;
        }
        /* other ancillary chunks (gAMA, tEXt, private ones, ...) do not change the samples */
    }
    if (!idat_state) { sd_error("%s: no IDAT chunk", what); goto fail; }
    if (idat_len == 0) { sd_error("%s: IDAT chunks hold no data", what); goto fail; }

    /* The inflated data must be exactly the filtered rows of every (non-empty) pass. */
    const int (*passes)[4] = h.interlace ? adam7 : no_interlace;
    uint64_t expected = 0;
    for (int p = 0; p < (h.interlace ? 7 : 1); p++) {
        uint32_t pw, ph;
        pass_size(&h, passes[p], &pw, &ph);
        if (pw && ph) expected += (uint64_t)ph * (1 + pass_rowbytes(&h, pw));
    }
    if (expected > (uint64_t)(size_t)-1 / 2) { sd_error("%s: image too large for this machine", what); goto fail; }
    outbuf o = build_outbuf((size_t)expected);
    const char *err = zlib_inflate_into(idat, idat_len, &o);
    free(idat);
    idat = NULL;
    if (err) {
        free(o.p);
        if (strcmp(err, "output larger than the limit") == 0)
            sd_error("%s: IDAT data inflates to more than the %lu bytes the image needs", what, (unsigned long)expected);
        else
            sd_error("%s: IDAT zlib data: %s", what, err);
        return -1;
    }
    if (o.n != expected) {
        free(o.p);
        sd_error("%s: IDAT data holds %lu bytes, the image needs %lu", what, (unsigned long)o.n, (unsigned long)expected);
        return -1;
    }
    out->width = (int)h.width;
    out->height = (int)h.height;
    out->depth = h.depth == 16 ? 16 : 8;
    out->channels = 4;
    out->pixels = sd_malloc((size_t)h.width * h.height * 4 * (h.depth == 16 ? 2 : 1));
    if (png_unfilter_expand(&h, o.p, out, what)) {
        free(o.p);
        sd_image_free(out);
        return -1;
    }
    free(o.p);
    return 0;
fail:
    free(idat);
    return -1;
}

int png_read_file(const char *path, sd_image *out) {
    uint8_t *buf;
    size_t len;
    memset(out, 0, sizeof *out);
    if (sd_read_file(path, &buf, &len)) return -1;
    int rc = png_decode(buf, len, path, out);
    free(buf);
    return rc;
}

void sd_image_free(sd_image *im) {
    free(im->pixels);
    memset(im, 0, sizeof *im);
}

/* ======================================================================================
 * 6. PNG encoding
 * ====================================================================================== */

/* A growing byte array for the file being built. */
typedef struct bytes { uint8_t *p; size_t n, cap; } bytes;

static void bytes_add(bytes *b, const void *src, size_t n) {
    if (b->n + n > b->cap) {
        while (b->n + n > b->cap) b->cap = b->cap ? b->cap * 2 : 4096;
        b->p = sd_realloc(b->p, b->cap);
    }
    if (n) memcpy(b->p + b->n, src, n);
    b->n += n;
}

/* length, type, data, CRC of type + data */
static void add_chunk(bytes *b, const char *type, const uint8_t *data, size_t n) {
    uint8_t head[8], crc[4];
    put_be32(head, (uint32_t)n);
    memcpy(head + 4, type, 4);
    bytes_add(b, head, 8);
    size_t at = b->n;
    bytes_add(b, data, n);
    put_be32(crc, sd_crc32(sd_crc32(0, (const uint8_t *)type, 4), b->p + at, n));
    bytes_add(b, crc, 4);
}

/* Decode UTF-8 (strictly: no overlongs, surrogates or values past U+10FFFF). Returns the code
 * point count, or -1 when the text is not valid UTF-8. cps may be NULL. */
static long utf8_decode(const char *s, uint32_t *cps) {
    const uint8_t *p = (const uint8_t *)s;
    long n = 0;
    while (*p) {
        uint32_t c = *p++;
        int more = c < 0x80 ? 0 : (c & 0xe0) == 0xc0 ? 1 : (c & 0xf0) == 0xe0 ? 2 : (c & 0xf8) == 0xf0 ? 3 : -1;
        if (more < 0) return -1;
        c &= more == 0 ? 0x7f : more == 1 ? 0x1f : more == 2 ? 0x0f : 0x07;
        for (int k = 0; k < more; k++) {
            if ((*p & 0xc0) != 0x80) return -1;
            c = (c << 6) | (*p++ & 0x3f);
        }
        static const uint32_t min_of[4] = { 0, 0x80, 0x800, 0x10000 };
        if (c < min_of[more] || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff)) return -1;
        if (cps) cps[n] = c;
        n++;
    }
    return n;
}

/* One text chunk. The keyword must be Latin-1 (1..79 printable characters, no leading,
 * trailing or double spaces). The value goes into tEXt when every character is Latin-1
 * (written as Latin-1 bytes, as Pillow and so A1111 do), else into an uncompressed iTXt with
 * the UTF-8 text and empty language tag and translated keyword. */
static int add_text_chunk(bytes *b, const char *key, const char *value, const char *path) {
    long nk = utf8_decode(key, NULL), nv = utf8_decode(value, NULL);
    if (nk < 0) { sd_error("%s: text keyword is not valid UTF-8", path); return -1; }
    if (nv < 0) { sd_error("%s: text for keyword '%s' is not valid UTF-8", path, key); return -1; }
    if (nk < 1 || nk > 79) { sd_error("%s: text keyword '%s' must have 1..79 characters", path, key); return -1; }
    uint32_t *kc = sd_malloc((size_t)nk * sizeof *kc), *vc = sd_malloc((size_t)(nv + 1) * sizeof *vc);
    utf8_decode(key, kc);
    utf8_decode(value, vc);
    uint8_t kw[80];
    for (long i = 0; i < nk; i++) {
        uint32_t c = kc[i];
        int printable = (c >= 32 && c <= 126) || (c >= 161 && c <= 255);
        int bad_space = c == 32 && (i == 0 || i == nk - 1 || kc[i - 1] == 32);
        if (!printable || bad_space) {
            free(kc);
            free(vc);
            sd_error("%s: text keyword '%s' is not 1..79 printable Latin-1 characters without extra spaces", path, key);
            return -1;
        }
        kw[i] = (uint8_t)c;
    }
    int latin1 = 1;
    for (long i = 0; i < nv; i++) latin1 &= vc[i] <= 255;
    bytes chunk = { NULL, 0, 0 };
    bytes_add(&chunk, kw, (size_t)nk);
    bytes_add(&chunk, "\0", 1);
    if (latin1) {
        for (long i = 0; i < nv; i++) { uint8_t c = (uint8_t)vc[i]; bytes_add(&chunk, &c, 1); }
        add_chunk(b, "tEXt", chunk.p, chunk.n);
    } else {
        bytes_add(&chunk, "\0\0\0\0", 4);   /* not compressed, method 0, "" language, "" translation */
        bytes_add(&chunk, value, strlen(value));
        add_chunk(b, "iTXt", chunk.p, chunk.n);
    }
    free(chunk.p);
    free(kc);
    free(vc);
    return 0;
}

/* Filter one row with type t into dst (without the type byte). */
static void filter_row(int t, const uint8_t *row, const uint8_t *prev, size_t n, size_t bpp, uint8_t *dst) {
    for (size_t i = 0; i < n; i++) {
        int a = i >= bpp ? row[i - bpp] : 0, b = prev[i], c = i >= bpp ? prev[i - bpp] : 0;
        int pred = t == 0 ? 0 : t == 1 ? a : t == 2 ? b : t == 3 ? (a + b) >> 1 : paeth(a, b, c);
        dst[i] = (uint8_t)(row[i] - pred);
    }
}

int png_write_file(const char *path, int width, int height, int channels, const uint8_t *pixels,
                   int n_text, const char *const *keys, const char *const *values) {
    if (channels != 3 && channels != 4) { sd_error("%s: PNG writer takes 3 or 4 channels, not %d", path, channels); return -1; }
    if (width < 1 || height < 1 || (uint64_t)width * (uint64_t)height > SD_PNG_MAX_PIXELS) {
        sd_error("%s: cannot write a %dx%d image", path, width, height);
        return -1;
    }
    bytes file = { NULL, 0, 0 };
    bytes_add(&file, png_signature, 8);
    uint8_t ihdr[13];
    put_be32(ihdr, (uint32_t)width);
    put_be32(ihdr + 4, (uint32_t)height);
    ihdr[8] = 8;
    ihdr[9] = channels == 4 ? 6 : 2;
    ihdr[10] = ihdr[11] = ihdr[12] = 0;
    add_chunk(&file, "IHDR", ihdr, 13);
    for (int i = 0; i < n_text; i++)
        if (add_text_chunk(&file, keys[i], values[i], path)) { free(file.p); return -1; }

    /* Each row gets the filter whose output has the smallest sum of |signed byte| (libpng's
     * heuristic; ties go to the lower type). */
    size_t rb = (size_t)width * (size_t)channels;
    uint8_t *filtered = sd_malloc((rb + 1) * (size_t)height);
    uint8_t *zero = sd_calloc(rb, 1), *trial = sd_malloc(rb);
    for (int y = 0; y < height; y++) {
        const uint8_t *row = pixels + (size_t)y * rb, *prev = y ? row - rb : zero;
        uint8_t *dst = filtered + (size_t)y * (rb + 1);
        uint64_t best = UINT64_MAX;
        for (int t = 0; t < 5; t++) {
            filter_row(t, row, prev, rb, (size_t)channels, trial);
            uint64_t sum = 0;
            for (size_t i = 0; i < rb; i++) sum += trial[i] < 128 ? trial[i] : 256u - trial[i];
            if (sum < best) { best = sum; dst[0] = (uint8_t)t; memcpy(dst + 1, trial, rb); }
        }
    }
    free(zero);
    free(trial);
    uint8_t *z;
    size_t zn;
    sd_zlib_deflate(filtered, (rb + 1) * (size_t)height, 6, &z, &zn);
    free(filtered);
    for (size_t at = 0; at < zn; at += 1 << 16)   /* IDAT chunks of 64 KiB */
        add_chunk(&file, "IDAT", z + at, zn - at < (1 << 16) ? zn - at : (1 << 16));
    free(z);
    add_chunk(&file, "IEND", NULL, 0);

    sd_outfile o;
    if (sd_out_open(&o, path)) { free(file.p); return -1; }
    if (fwrite(file.p, 1, file.n, o.f) != file.n) {
        sd_out_abort(&o);
        free(file.p);
        sd_error("%s: write error", path);
        return -1;
    }
    free(file.p);
    return sd_out_commit(&o);
}

/* ======================================================================================
 * 7. sdref decode-png IN.png -o OUT.npy
 * ====================================================================================== */

int cmd_decode_png(int argc, char **argv) {
    sd_args a;
    args_init(&a, argc, argv);
    const char *out_path = args_value(&a, "-o");
    const char *in_path = NULL;
    for (int i = 1; i < argc && !in_path; i++)
        if (!a.used[i] && argv[i][0] != '-') { in_path = argv[i]; a.used[i] = 1; }
    int rc = args_check_all_used(&a);
    free(a.used);
    if (rc) return -1;
    if (!in_path || !out_path) { sd_error("usage: sdref decode-png IN.png -o OUT.npy"); return -1; }
    sd_image im;
    if (png_read_file(in_path, &im)) return -1;
    int64_t shape[3] = { im.height, im.width, 4 };
    rc = npy_write(out_path, im.depth == 16 ? NPY_U16 : NPY_U8, 3, shape, im.pixels);
    sd_image_free(&im);
    return rc;
}
