/* tests/test_png.c — inflate/deflate, gzip and PNG against golden files, hand-made broken
 * streams and round trips. */
#include "test.h"
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Deterministic test data (xorshift). */
static uint32_t rng_state = 12345;
static uint32_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 17;
    rng_state ^= rng_state << 5;
    return rng_state;
}

/* ---- golden PNG files --------------------------------------------------------------- */

/* For corrupt files whose name names the defect: a word the error line must contain. */
static const char *expected_word(const char *file) {
    static const char *map[][2] = {
        { "bad_crc_", "CRC mismatch" },            { "bad_filter_byte", "unknown filter type" },
        { "bad_adler32", "Adler-32" },             { "ihdr_huge", "exceeds the limit" },
        { "stored_len_nlen", "complement" },       { "deflate_reserved_btype", "block type 3" },
        { "unknown_critical", "unknown critical chunk CRIT" }, { "idat_stream_too_short", "IDAT data holds" },
        { "ihdr_width_zero", "width is 0" },       { "ihdr_height_2pow31", "exceeds 2^31-1" },
        { "ihdr_bad_bitdepth", "bit depth" },      { "ihdr_bad_colortype", "colour type" },
        { "ihdr_palette_16bit", "bit depth 16" },  { "ihdr_bad_compression", "compression method" },
        { "ihdr_bad_filter_method", "filter method" }, { "ihdr_bad_interlace", "interlace method" },
        { "ihdr_wrong_length", "IHDR chunk has length 14" }, { "missing_ihdr", "not IHDR" },
        { "no_idat", "no IDAT" },                  { "zero_length_idat", "IDAT chunks hold no data" },
        { "bad_zlib_header_fcheck", "FCHECK" },    { "bad_zlib_header_cm", "(CM)" },
        { "wrong_signature", "signature" },        { "empty_file", "empty" },
        { "palette_without_plte", "without a PLTE" }, { "chunk_length_overflow", "exceeds 2^31-1" },
        { "idat_zlib_truncated", "ends early" },   { "truncated_in_idat", "truncated" },
    };
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
        if (strstr(file, map[i][0])) return map[i][1];
    return NULL;
}

static void test_golden(void) {
    sd_json man;
    if (json_parse_file(shared_path("golden/png/manifest.json"), &man)) {
        CHECK(0, "cannot read the PNG manifest: %s", sd_last_error());
        return;
    }
    const sd_json *files = json_get(&man, "files");
    CHECK(files && files->type == JSON_ARRAY && files->n == 232, "manifest lists 232 files");
    int n_ok = 0, n_err = 0;
    for (int i = 0; files && i < files->n; i++) {
        const sd_json *f = &files->items[i];
        const char *name = json_str(f, "file", "");
        char path[4096];
        snprintf(path, sizeof path, "%s", shared_path("golden/png/"));
        strncat(path, name, sizeof path - strlen(path) - 1);
        sd_image im;
        sd_clear_error();
        int rc = png_read_file(path, &im);
        if (strcmp(json_str(f, "expect", ""), "ok") == 0) {
            n_ok++;
            CHECK(rc == 0, "%s: decode failed: %s", name, sd_last_error());
            if (rc) continue;
            char rgba[4096];
            snprintf(rgba, sizeof rgba, "%s", shared_path("golden/png/"));
            strncat(rgba, json_str(f, "rgba", ""), sizeof rgba - strlen(rgba) - 1);
            sd_npy want;
            if (npy_read(rgba, &want)) {
                CHECK(0, "%s: %s", name, sd_last_error());
                sd_image_free(&im);
                continue;
            }
            int is16 = want.dtype == NPY_U16;
            CHECK(want.ndim == 3 && want.shape[0] == im.height && want.shape[1] == im.width && want.shape[2] == 4 &&
                  im.channels == 4 && im.depth == (is16 ? 16 : 8),
                  "%s: got %dx%d depth %d", name, im.width, im.height, im.depth);
            if (want.ndim == 3 && want.shape[0] == im.height && want.shape[1] == im.width && im.depth == (is16 ? 16 : 8)) {
                size_t bytes = want.n * (is16 ? 2 : 1);
                CHECK(memcmp(want.data, im.pixels, bytes) == 0, "%s: pixels differ from %s", name, json_str(f, "rgba", ""));
            }
            npy_free(&want);
            sd_image_free(&im);
        } else {
            n_err++;
            const char *msg = sd_last_error();
            CHECK(rc == -1 && im.pixels == NULL, "%s: corrupt file accepted", name);
            CHECK(strstr(msg, name) != NULL, "%s: error line does not name the file: %s", name, msg);
            CHECK(strchr(msg, '\n') == NULL, "%s: error is more than one line", name);
            const char *word = expected_word(name);
            if (word) CHECK(strstr(msg, word) != NULL, "%s: error '%s' lacks '%s'", name, msg, word);
        }
    }
    CHECK(n_ok == 166 && n_err == 66, "%d valid and %d corrupt files", n_ok, n_err);
    json_free(&man);
}

/* Every strict prefix of a valid file is refused cleanly (no crash, one error line). */
static void test_truncations(void) {
    const char *names[] = { "v0_rgba8_multi_idat_30x20.png", "v0_gray2_adam7_50x37.png", "v1_gray8_one_byte_idats_11x9.png" };
    for (int k = 0; k < 3; k++) {
        uint8_t *buf;
        size_t len;
        char path[4096];
        snprintf(path, sizeof path, "%s", shared_path("golden/png/"));
        strncat(path, names[k], sizeof path - strlen(path) - 1);
        if (sd_read_file(path, &buf, &len)) { CHECK(0, "%s", sd_last_error()); continue; }
        int refused = 0;
        for (size_t n = 0; n < len; n++) {
            sd_image im;
            sd_clear_error();
            refused += png_decode(buf, n, "cut.png", &im) == -1 && strstr(sd_last_error(), "cut.png: ") == sd_last_error();
        }
        CHECK(refused == (int)len, "%s: %d of %d prefixes refused with a message", names[k], refused, (int)len);
        free(buf);
    }
}

/* ---- deflate / inflate ------------------------------------------------------------------ */

static void fill(uint8_t *p, size_t n, int kind) {
    for (size_t i = 0; i < n; i++) {
        switch (kind) {
        case 0: p[i] = (uint8_t)rnd(); break;                                   /* random */
        case 1: p[i] = 0; break;                                                /* one value */
        case 2: p[i] = (uint8_t)("the quick brown fox jumps "[(i * 7 + i / 100) % 26]); break;   /* text-like */
        default: p[i] = (uint8_t)(rnd() % 4 == 0 ? rnd() : (i / 3) & 0xff); break; /* mixed */
        }
    }
}

static void test_deflate_roundtrip(void) {
    const size_t sizes[] = { 0, 1, 2, 3, 4, 257, 258, 259, 1000, 32768, 32769, 65535, 65536, 65537, 1 << 20 };
    const int levels[] = { 0, 1, 4, 6, 9 };
    int bad = 0, runs = 0;
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++)
        for (int kind = 0; kind < 4; kind++)
            for (int li = 0; li < 5; li++) {
                size_t n = sizes[si];
                if (n == (1 << 20) && levels[li] == 9) continue;
                uint8_t *in = sd_malloc(n + 1), *z, *z2, *back;
                size_t zn, zn2, bn;
                rng_state = (uint32_t)(n * 31 + (size_t)kind * 7 + 1);
                fill(in, n, kind);
                sd_zlib_deflate(in, n, levels[li], &z, &zn);
                sd_zlib_deflate(in, n, levels[li], &z2, &zn2);
                runs++;
                if (zn != zn2 || memcmp(z, z2, zn) != 0) { bad++; CHECK(0, "deflate not deterministic: n=%zu level %d", n, levels[li]); }
                if (sd_zlib_inflate(z, zn, &back, &bn, n)) {
                    bad++;
                    CHECK(0, "inflate of own deflate failed: n=%zu kind %d level %d: %s", n, kind, levels[li], sd_last_error());
                } else {
                    if (bn != n || (n && memcmp(back, in, n) != 0)) { bad++; CHECK(0, "round trip differs: n=%zu kind %d level %d", n, kind, levels[li]); }
                    free(back);
                }
                /* one byte less room than needed must be refused */
                if (n > 0 && sd_zlib_inflate(z, zn, &back, &bn, n - 1) == 0) { bad++; free(back); CHECK(0, "max_out ignored n=%zu", n); }
                /* repetitive data must really compress; level 0 stores */
                if (levels[li] > 0 && (kind == 1 || kind == 2) && n >= 1000 && zn * 10 > n) {
                    bad++;
                    CHECK(0, "poor compression: kind %d n=%zu level %d -> %zu", kind, n, levels[li], zn);
                }
                if (levels[li] == 0 && zn != n + 6 + 5 * (n / 65535 + (n % 65535 || n == 0))) {
                    bad++;
                    CHECK(0, "level 0 size %zu for n=%zu", zn, n);
                }
                free(in);
                free(z);
                free(z2);
            }
    CHECK(bad == 0, "%d of %d deflate round trips failed", bad, runs);
}

/* A hand-made bit stream for broken deflate data. */
typedef struct bits { uint8_t b[256]; int n; } bits;
static void put(bits *s, unsigned v, int n) {   /* LSB first: header fields and extra bits */
    for (int i = 0; i < n; i++, s->n++) if ((v >> i) & 1) s->b[s->n / 8] |= (uint8_t)(1 << (s->n % 8));
}
static void put_code(bits *s, unsigned code, int len) {   /* Huffman codes: MSB first */
    for (int i = len - 1; i >= 0; i--) put(s, (code >> i) & 1, 1);
}

/* Wrap raw deflate bits in a zlib header and the Adler-32 of `expect`. */
static int inflate_bits(const bits *s, const char *expect, size_t max_out) {
    uint8_t buf[300];
    size_t nb = (size_t)(s->n + 7) / 8;
    buf[0] = 0x78; buf[1] = 0x9c;
    memcpy(buf + 2, s->b, nb);
    uint32_t a = 1, b = 0;
    for (const char *p = expect; *p; p++) { a = (a + (uint8_t)*p) % 65521; b = (b + a) % 65521; }
    uint32_t ad = (b << 16) | a;
    buf[2 + nb] = (uint8_t)(ad >> 24); buf[3 + nb] = (uint8_t)(ad >> 16); buf[4 + nb] = (uint8_t)(ad >> 8); buf[5 + nb] = (uint8_t)ad;
    uint8_t *out;
    size_t on;
    sd_clear_error();
    int rc = sd_zlib_inflate(buf, nb + 6, &out, &on, max_out);
    if (rc == 0) {
        rc = on == strlen(expect) && memcmp(out, expect, on) == 0 ? 0 : -2;
        free(out);
    }
    return rc;
}

static void test_inflate_errors(void) {
    /* a valid fixed block "abc": literals 'a'..'c' are 8-bit codes 0x30 + value */
    bits s;
    memset(&s, 0, sizeof s);
    put(&s, 1, 1); put(&s, 1, 2);
    for (const char *p = "abc"; *p; p++) put_code(&s, 0x30 + (unsigned)*p, 8);
    put_code(&s, 0, 7);   /* end of block */
    CHECK(inflate_bits(&s, "abc", 100) == 0, "fixed block 'abc': %s", sd_last_error());
    CHECK(inflate_bits(&s, "abc", 2) == -1 && strstr(sd_last_error(), "limit"), "output beyond max_out refused: %s", sd_last_error());
    CHECK(inflate_bits(&s, "abd", 100) == -1 && strstr(sd_last_error(), "Adler-32"), "Adler-32 checked: %s", sd_last_error());

    /* a match before any output: distance too far back */
    memset(&s, 0, sizeof s);
    put(&s, 1, 1); put(&s, 1, 2);
    put_code(&s, 1, 7);   /* 257: length 3 */
    put_code(&s, 0, 5);   /* distance 1 */
    put_code(&s, 0, 7);
    CHECK(inflate_bits(&s, "", 100) == -1 && strstr(sd_last_error(), "too far back"), "distance too far: %s", sd_last_error());

    /* 'a' then a length-4 match at distance 1: "aaaaa" (overlapping copy) */
    memset(&s, 0, sizeof s);
    put(&s, 1, 1); put(&s, 1, 2);
    put_code(&s, 0x30 + 'a', 8);
    put_code(&s, 2, 7);   /* 258: length 4 */
    put_code(&s, 0, 5);
    put_code(&s, 0, 7);
    CHECK(inflate_bits(&s, "aaaaa", 100) == 0, "overlapping match: %s", sd_last_error());

    /* distance symbol 30 in a fixed block */
    memset(&s, 0, sizeof s);
    put(&s, 1, 1); put(&s, 1, 2);
    put_code(&s, 0x30 + 'a', 8);
    put_code(&s, 1, 7);
    put_code(&s, 30, 5);
    put_code(&s, 0, 7);
    CHECK(inflate_bits(&s, "", 100) == -1 && strstr(sd_last_error(), "distance symbol"), "distance 30: %s", sd_last_error());

    /* literal/length symbol 286 (fixed code 11000110) */
    memset(&s, 0, sizeof s);
    put(&s, 1, 1); put(&s, 1, 2);
    put_code(&s, 0xc6, 8);
    CHECK(inflate_bits(&s, "", 100) == -1 && strstr(sd_last_error(), "286"), "symbol 286: %s", sd_last_error());

    /* reserved block type */
    memset(&s, 0, sizeof s);
    put(&s, 1, 1); put(&s, 3, 2);
    CHECK(inflate_bits(&s, "", 100) == -1 && strstr(sd_last_error(), "block type 3"), "btype 3: %s", sd_last_error());

    /* stored block: LEN / NLEN mismatch, and a good one */
    memset(&s, 0, sizeof s);
    put(&s, 1, 1); put(&s, 0, 2); put(&s, 0, 5);
    put(&s, 2, 16); put(&s, 0xfffc, 16); put(&s, 'h', 8); put(&s, 'i', 8);
    CHECK(inflate_bits(&s, "", 100) == -1 && strstr(sd_last_error(), "complement"), "NLEN: %s", sd_last_error());
    memset(&s, 0, sizeof s);
    put(&s, 1, 1); put(&s, 0, 2); put(&s, 0, 5);
    put(&s, 2, 16); put(&s, 0xfffd, 16); put(&s, 'h', 8); put(&s, 'i', 8);
    CHECK(inflate_bits(&s, "hi", 100) == 0, "stored 'hi': %s", sd_last_error());

    /* dynamic header: every code length code of length 1 is over-subscribed */
    memset(&s, 0, sizeof s);
    put(&s, 1, 1); put(&s, 2, 2);
    put(&s, 0, 5); put(&s, 0, 5); put(&s, 15, 4);
    for (int i = 0; i < 19; i++) put(&s, 1, 3);
    CHECK(inflate_bits(&s, "", 100) == -1 && strstr(sd_last_error(), "over-subscribed"), "over-subscribed: %s", sd_last_error());
    /* one code length code of length 2: incomplete */
    memset(&s, 0, sizeof s);
    put(&s, 1, 1); put(&s, 2, 2);
    put(&s, 0, 5); put(&s, 0, 5); put(&s, 0, 4);
    put(&s, 2, 3); put(&s, 0, 3); put(&s, 0, 3); put(&s, 0, 3);
    CHECK(inflate_bits(&s, "", 100) == -1 && strstr(sd_last_error(), "incomplete"), "incomplete: %s", sd_last_error());
    /* code lengths 16 (repeat) first: nothing to repeat. Code length codes: 16 and 0 of length 1. */
    memset(&s, 0, sizeof s);
    put(&s, 1, 1); put(&s, 2, 2);
    put(&s, 0, 5); put(&s, 0, 5); put(&s, 0, 4);
    put(&s, 1, 3); put(&s, 0, 3); put(&s, 0, 3); put(&s, 1, 3);   /* order 16 17 18 0 */
    put_code(&s, 1, 1);   /* symbol 16 (codes: 0 -> '0', 16 -> '1') */
    put(&s, 0, 2);
    CHECK(inflate_bits(&s, "", 100) == -1 && strstr(sd_last_error(), "no previous"), "repeat first: %s", sd_last_error());

    /* zlib header checks */
    uint8_t hdr[][8] = { { 0x77, 0x85, 3, 0, 0, 0, 0, 1 },    /* CM 7 */
                         { 0x88, 0x98, 3, 0, 0, 0, 0, 1 },    /* CINFO 8 */
                         { 0x78, 0x9d, 3, 0, 0, 0, 0, 1 },    /* FCHECK */
                         { 0x78, 0xbb, 3, 0, 0, 0, 0, 1 } };  /* FDICT */
    const char *words[] = { "(CM)", "CINFO", "FCHECK", "FDICT" };
    for (int i = 0; i < 4; i++) {
        uint8_t *out;
        size_t on;
        sd_clear_error();
        CHECK(sd_zlib_inflate(hdr[i], 8, &out, &on, 100) == -1 && strstr(sd_last_error(), words[i]),
              "zlib header %d: %s", i, sd_last_error());
    }
    /* the empty stream 78 9c 03 00 00 00 00 01 is fine; any prefix of it or extra byte is not */
    uint8_t empty[9] = { 0x78, 0x9c, 3, 0, 0, 0, 0, 1, 0 };
    uint8_t *out;
    size_t on;
    CHECK(sd_zlib_inflate(empty, 8, &out, &on, 0) == 0 && on == 0, "empty zlib stream: %s", sd_last_error());
    if (on == 0) free(out);
    int refused = 0;
    for (size_t n = 0; n < 8; n++) refused += sd_zlib_inflate(empty, n, &out, &on, 100) == -1;
    CHECK(refused == 8, "prefixes of the empty stream refused (%d of 8)", refused);
    CHECK(sd_zlib_inflate(empty, 9, &out, &on, 100) == -1, "data after the stream refused");

    /* every prefix of a real multi-block stream is refused */
    size_t n = 70000, zn, bad = 0;
    uint8_t *in = sd_malloc(n), *z;
    rng_state = 99;
    fill(in, n, 3);
    sd_zlib_deflate(in, n, 6, &z, &zn);
    for (size_t cut = 0; cut < zn; cut += 1 + cut / 64)
        if (sd_zlib_inflate(z, cut, &out, &on, n) == 0) { bad++; free(out); }
    CHECK(bad == 0, "%zu prefixes of a %zu-byte stream accepted", bad, zn);
    free(in);
    free(z);
}

/* ---- gzip ---------------------------------------------------------------------------- */

static void le32(uint8_t *p, uint32_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24); }

/* A gzip member of text with the given header flags, from our own deflate. */
static size_t make_gzip(uint8_t *dst, const char *text, unsigned flags) {
    uint8_t *z;
    size_t zn, n = 0, len = strlen(text);
    sd_zlib_deflate((const uint8_t *)text, len, 6, &z, &zn);
    uint8_t head[10] = { 0x1f, 0x8b, 8, (uint8_t)flags, 1, 2, 3, 4, 0, 3 };
    memcpy(dst, head, 10);
    n = 10;
    if (flags & 4) { dst[n++] = 3; dst[n++] = 0; memcpy(dst + n, "xyz", 3); n += 3; }
    if (flags & 8) { memcpy(dst + n, "name.txt", 9); n += 9; }
    if (flags & 16) { memcpy(dst + n, "a comment", 10); n += 10; }
    if (flags & 2) { uint32_t c = sd_crc32(0, dst, n); dst[n++] = (uint8_t)c; dst[n++] = (uint8_t)(c >> 8); }
    memcpy(dst + n, z + 2, zn - 6);   /* raw deflate data without the zlib wrapper */
    n += zn - 6;
    le32(dst + n, sd_crc32(0, (const uint8_t *)text, len));
    le32(dst + n + 4, (uint32_t)len);
    free(z);
    return n + 8;
}

static void test_gzip(void) {
    const char *text = "hello hello hello gzip world";
    uint8_t g[512], *out;
    size_t on;
    for (unsigned flags = 0; flags < 32; flags += 2) {   /* FHCRC, FEXTRA, FNAME, FCOMMENT in all combinations */
        size_t n = make_gzip(g, text, flags);
        int rc = sd_gunzip(g, n, &out, &on, 1000);
        CHECK(rc == 0 && on == strlen(text) && memcmp(out, text, on) == 0, "gzip flags %u: %s", flags, sd_last_error());
        if (rc == 0) free(out);
    }
    size_t n = make_gzip(g, text, 2 | 8);
    g[13] ^= 1;   /* inside the file name: header CRC no longer matches */
    sd_clear_error();
    CHECK(sd_gunzip(g, n, &out, &on, 1000) == -1 && strstr(sd_last_error(), "header CRC"), "FHCRC: %s", sd_last_error());
    n = make_gzip(g, text, 0);
    g[n - 8] ^= 1;
    sd_clear_error();
    CHECK(sd_gunzip(g, n, &out, &on, 1000) == -1 && strstr(sd_last_error(), "CRC-32"), "CRC-32: %s", sd_last_error());
    n = make_gzip(g, text, 0);
    g[n - 4] ^= 1;
    sd_clear_error();
    CHECK(sd_gunzip(g, n, &out, &on, 1000) == -1 && strstr(sd_last_error(), "ISIZE"), "ISIZE: %s", sd_last_error());
    n = make_gzip(g, text, 0);
    g[3] = 0x20;
    sd_clear_error();
    CHECK(sd_gunzip(g, n, &out, &on, 1000) == -1 && strstr(sd_last_error(), "reserved"), "reserved flags: %s", sd_last_error());
    /* two members concatenated */
    n = make_gzip(g, "first ", 8);
    n += make_gzip(g + n, "second", 0);
    CHECK(sd_gunzip(g, n, &out, &on, 1000) == 0 && on == 12 && memcmp(out, "first second", 12) == 0,
          "concatenated members: %s", sd_last_error());
    if (on == 12) free(out);
    CHECK(sd_gunzip(g, n - 1, &out, &on, 1000) == -1, "truncated second member refused");
    sd_clear_error();
    CHECK(sd_gunzip(g, n, &out, &on, 11) == -1 && strstr(sd_last_error(), "limit"), "max_out over members");

    /* CLIP's vocabulary: 1.3 MB -> 3.2 MB */
    uint8_t *gz;
    size_t gn;
    if (sd_read_file(shared_path("tokenizer/clip/bpe_simple_vocab_16e6.txt.gz"), &gz, &gn)) {
        CHECK(0, "%s", sd_last_error());
        return;
    }
    clock_t t0 = clock();
    int rc = sd_gunzip(gz, gn, &out, &on, (size_t)64 << 20);
    double secs = (double)(clock() - t0) / CLOCKS_PER_SEC;
    CHECK(rc == 0, "gunzip CLIP vocabulary: %s", sd_last_error());
    if (rc == 0) {
        size_t lines = 0;
        for (size_t i = 0; i < on; i++) lines += out[i] == '\n';
        const char *head = "\"bpe_simple_vocab_16e6.txt#version: 0.2";
        CHECK(on == 3194984 && lines == 262145 && memcmp(out, head, strlen(head)) == 0,
              "CLIP vocabulary: %zu bytes, %zu lines", on, lines);
        CHECK(secs < 2.0, "gunzip of 1.3 MB took %.2f s", secs);
        fprintf(stderr, "  gunzip %zu -> %zu bytes in %.3f s\n", gn, on, secs);
        free(out);
    }
    free(gz);
}

/* ---- PNG writer -------------------------------------------------------------------------- */

/* Smooth gradients plus a little noise: what photographs look like to a compressor. */
static void photo_like(uint8_t *p, int w, int h, int ch) {
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++)
            for (int c = 0; c < ch; c++) {
                int v = (x * (c + 1) * 255) / (w + 1) / 2 + (y * 255) / (h + 1) / 2 + (int)(rnd() % 9) - 4;
                if (c == 3) v = 128 + (x + y) % 100 + (int)(rnd() % 3);
                p[((size_t)y * w + x) * ch + c] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
            }
}

/* Find a chunk of the given type in a PNG file; returns its data and length, or NULL. */
static const uint8_t *find_chunk(const uint8_t *f, size_t n, const char *type, size_t *len, int which) {
    for (size_t pos = 8; pos + 12 <= n;) {
        size_t l = (size_t)f[pos] << 24 | (size_t)f[pos + 1] << 16 | (size_t)f[pos + 2] << 8 | f[pos + 3];
        if (memcmp(f + pos + 4, type, 4) == 0 && which-- == 0) { *len = l; return f + pos + 8; }
        pos += l + 12;
    }
    return NULL;
}

static void test_writer(void) {
    const int sizes[][2] = { { 1, 1 }, { 1, 7 }, { 7, 1 }, { 2, 2 }, { 3, 5 }, { 64, 64 }, { 257, 131 } };
    int bad = 0;
    for (int si = 0; si < 7; si++)
        for (int ch = 3; ch <= 4; ch++)
            for (int kind = 0; kind < 2; kind++) {
                sd_clear_error();
                int w = sizes[si][0], h = sizes[si][1];
                uint8_t *px = sd_malloc((size_t)w * h * ch);
                rng_state = (uint32_t)(w * 1000 + h + ch);
                if (kind == 0) for (size_t i = 0; i < (size_t)w * h * ch; i++) px[i] = (uint8_t)rnd();
                else photo_like(px, w, h, ch);
                const char *path = tmp_path("rt.png");
                sd_image im;
                if (png_write_file(path, w, h, ch, px, 0, NULL, NULL) || png_read_file(path, &im)) {
                    bad++;
                    CHECK(0, "write/read %dx%dx%d: %s", w, h, ch, sd_last_error());
                    free(px);
                    continue;
                }
                int same = im.width == w && im.height == h && im.depth == 8;
                for (size_t i = 0; same && i < (size_t)w * h; i++)
                    for (int c = 0; c < 4; c++)
                        same &= ((uint8_t *)im.pixels)[i * 4 + c] == (c < ch ? px[i * ch + c] : 255);
                if (!same) { bad++; CHECK(0, "round trip %dx%dx%d kind %d differs", w, h, ch, kind); }
                sd_image_free(&im);
                free(px);
            }
    CHECK(bad == 0, "%d PNG round trips failed", bad);

    /* photographic content compresses below stored-block size */
    int w = 256, h = 256;
    uint8_t *px = sd_malloc((size_t)w * h * 3), *file;
    size_t fn;
    rng_state = 7;
    photo_like(px, w, h, 3);
    const char *path = tmp_path("photo.png");
    CHECK(png_write_file(path, w, h, 3, px, 0, NULL, NULL) == 0, "write photo: %s", sd_last_error());
    if (sd_read_file(path, &file, &fn) == 0) {
        size_t raw = (size_t)h * (1 + (size_t)w * 3), stored = raw + 6 + 5 * (raw / 65535 + 1) + 57;
        CHECK(fn * 10 < stored * 8, "photo-like PNG %zu bytes, stored would be %zu", fn, stored);
        fprintf(stderr, "  photo-like 256x256 RGB: %zu bytes vs %zu stored (%.1f%%)\n", fn, stored, 100.0 * fn / stored);
        free(file);
    }
    free(px);

    /* text chunks: Latin-1 values as tEXt (Latin-1 bytes), others as iTXt (UTF-8) */
    uint8_t one[4] = { 1, 2, 3, 4 };
    const char *keys[] = { "parameters", "Comment" }, *vals[] = { "caf\xc3\xa9 steps: 20", "\xe6\x97\xa5\xe6\x9c\xac" };
    path = tmp_path("text.png");
    CHECK(png_write_file(path, 1, 1, 4, one, 2, keys, vals) == 0, "write with text: %s", sd_last_error());
    if (sd_read_file(path, &file, &fn) == 0) {
        size_t len;
        const uint8_t *t = find_chunk(file, fn, "tEXt", &len, 0);
        CHECK(t && len == 11 + 14 && memcmp(t, "parameters\0caf\xe9 steps: 20", len) == 0, "tEXt chunk holds Latin-1");
        t = find_chunk(file, fn, "iTXt", &len, 0);
        CHECK(t && len == 7 + 5 + 6 && memcmp(t, "Comment\0\0\0\0\0\xe6\x97\xa5\xe6\x9c\xac", len) == 0, "iTXt chunk holds UTF-8");
        sd_image im;
        CHECK(png_decode(file, fn, "text.png", &im) == 0 && memcmp(im.pixels, one, 4) == 0, "text PNG decodes");
        sd_image_free(&im);
        free(file);
    }
    const char *badkeys[] = { "", " lead", "a  b", "\xff", "0123456789012345678901234567890123456789012345678901234567890123456789012345678X9" };
    const char *v1[] = { "x" };
    for (int i = 0; i < 5; i++) {
        const char *p = tmp_path("badkey.png");
        sd_clear_error();
        CHECK(png_write_file(p, 1, 1, 4, one, 1, &badkeys[i], v1) == -1 && strstr(sd_last_error(), "badkey.png"),
              "bad keyword %d refused: %s", i, sd_last_error());
        uint8_t *d;
        size_t dn;
        CHECK(sd_read_file(p, &d, &dn) == -1, "no file left behind for bad keyword %d", i);
    }
    CHECK(png_write_file(tmp_path("x.png"), 0, 1, 4, one, 0, NULL, NULL) == -1, "0-width image refused");
    CHECK(png_write_file(tmp_path("x.png"), 1, 1, 2, one, 0, NULL, NULL) == -1, "2 channels refused");
}

/* ---- the decode-png command ------------------------------------------------------------ */

static void test_command(void) {
    char in[4096], out[4096], want_path[4096];
    snprintf(in, sizeof in, "%s", shared_path("golden/png/v0_gray16_trns_adam7_17x33.png"));
    snprintf(want_path, sizeof want_path, "%s", shared_path("golden/png/v0_gray16_trns_adam7_17x33.rgba.npy"));
    snprintf(out, sizeof out, "%s", tmp_path("cmd.npy"));
    char *argv[] = { "decode-png", in, "-o", out, NULL };
    sd_clear_error();
    CHECK(cmd_decode_png(4, argv) == 0, "decode-png: %s", sd_last_error());
    sd_npy got, want;
    if (npy_read(out, &got) == 0 && npy_read(want_path, &want) == 0) {
        CHECK(got.dtype == NPY_U16 && got.n == want.n && memcmp(got.data, want.data, got.n * 2) == 0,
              "decode-png output equals the golden 16-bit RGBA");
        npy_free(&got);
        npy_free(&want);
    } else {
        CHECK(0, "decode-png output: %s", sd_last_error());
    }
    snprintf(in, sizeof in, "%s", shared_path("golden/png/v0_bad_bad_crc_idat.png"));
    snprintf(out, sizeof out, "%s", tmp_path("bad.npy"));
    char *argv2[] = { "decode-png", in, "-o", out, NULL };
    sd_clear_error();
    CHECK(cmd_decode_png(4, argv2) != 0 && strstr(sd_last_error(), "CRC mismatch in IDAT"), "decode-png refuses: %s", sd_last_error());
    uint8_t *d;
    size_t dn;
    CHECK(sd_read_file(out, &d, &dn) == -1, "no output file for a corrupt PNG");
    char *argv3[] = { "decode-png", in, NULL };
    sd_clear_error();
    CHECK(cmd_decode_png(2, argv3) != 0, "decode-png without -o refused");
    sd_clear_error();
}

void test_png(void) {
    sd_clear_error();
    if (!have_shared()) {
        CHECK(0, "shared data missing: golden PNG tests cannot run");
    } else {
        sd_clear_error();
        test_golden();
        sd_clear_error();
        test_truncations();
        sd_clear_error();
        test_gzip();
        sd_clear_error();
        test_command();
    }
    sd_clear_error();
    test_deflate_roundtrip();
    sd_clear_error();
    test_inflate_errors();
    sd_clear_error();
    test_writer();
}
