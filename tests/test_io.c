/* tests/test_io.c — safetensors, .npy and JSON: round trips, the golden files, exact number
 * parsing, and a corpus of malformed files generated here, each of which must fail cleanly with
 * one line naming the file and the problem. (tmp_path() returns one of 8 rotating buffers, so
 * paths used across many calls are copied first.) */
#include "test.h"
#include <stdlib.h>
#include <string.h>

/* ---- helpers ------------------------------------------------------------------------------ */

static void write_bytes(const char *path, const void *p, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) sd_fatal("cannot write %s", path);
    if (n) fwrite(p, 1, n, f);
    fclose(f);
}

/* rc must be -1 and the error line must name the file and contain `what`. */
static void expect_fail(int rc, const char *path, const char *what, const char *label) {
    const char *e = sd_last_error();
    CHECK(rc == -1, "%s: expected failure, got %d", label, rc);
    CHECK(strstr(e, path) == e, "%s: error should begin with the path: '%s'", label, e);
    CHECK(strstr(e, what) != NULL, "%s: error should mention '%s': '%s'", label, what, e);
}

/* A safetensors file from a header text and `data_len` bytes of data (0, 1, 2, ...). */
static void write_st(const char *path, const char *header, size_t data_len) {
    size_t hl = strlen(header);
    uint8_t *b = sd_malloc(8 + hl + data_len);
    for (int k = 0; k < 8; k++) b[k] = (uint8_t)((uint64_t)hl >> (8 * k));
    memcpy(b + 8, header, hl);
    for (size_t i = 0; i < data_len; i++) b[8 + hl + i] = (uint8_t)i;
    write_bytes(path, b, 8 + hl + data_len);
    free(b);
}

static int st_try(const char *path) {
    sd_safetensors st;
    sd_clear_error();
    int rc = st_open(&st, path);
    if (rc == 0) st_close(&st);
    return rc;
}

static int npy_try(const char *path) {
    sd_npy a;
    sd_clear_error();
    int rc = npy_read(path, &a);
    if (rc == 0) npy_free(&a);
    return rc;
}

static int json_try(const char *text, size_t len) {
    sd_json j;
    sd_clear_error();
    int rc = json_parse(text, len, "doc.json", &j);
    if (rc == 0) json_free(&j);
    return rc;
}

/* ---- JSON --------------------------------------------------------------------------------- */

/* Correctly rounded values (from Python's float(), which rounds correctly). */
static const struct { const char *text; uint64_t bits; } json_numbers[] = {
    { "0.00085", 0x3f4bda5119ce075full },
    { "1e-05", 0x3ee4f8b588e368f1ull },
    { "0.012", 0x3f889374bc6a7efaull },
    { "0.1", 0x3fb999999999999aull },
    { "0.3", 0x3fd3333333333333ull },
    { "2.2250738585072011e-308", 0x000fffffffffffffull },
    { "2.2250738585072012e-308", 0x0010000000000000ull },
    { "4.9406564584124654e-324", 0x0000000000000001ull },
    { "2.4703282292062328e-324", 0x0000000000000001ull },
    { "1.7976931348623157e308", 0x7fefffffffffffffull },
    { "1.7976931348623158e308", 0x7fefffffffffffffull },
    { "9007199254740993", 0x4340000000000000ull },
    { "9007199254740995", 0x4340000000000002ull },
    { "123456789012345678901234567890", 0x45f8ee90ff6c373eull },
    { "1.00000000000000011102230246251565404236316680908203125", 0x3ff0000000000000ull },
    { "1.00000000000000011102230246251565404236316680908203126", 0x3ff0000000000001ull },
    { "1.000000000000000111022302462515654042363166809082031249999999999999", 0x3ff0000000000000ull },
    { "7.038531e-26", 0x3ab5c87fb0000000ull },
    { "1e23", 0x44b52d02c7e14af6ull },
    { "8.98846567431158e307", 0x7fe0000000000000ull },
    { "3.4028236692093846346337460743176821145e38", 0x47f0000000000000ull },
    { "0.000000000000000000000000000000000000000000001e-280", 0x0000000000000000ull },
    { "1e-400", 0x0000000000000000ull },
    { "-0", 0x8000000000000000ull },
    { "-1.5e-3", 0xbf589374bc6a7efaull },
    { "5e-324", 0x0000000000000001ull },
    { "2.5e-324", 0x0000000000000001ull },
    { "1e22", 0x4480f0cf064dd592ull },
    { "4.35E+2", 0x407b300000000000ull },
    { "1E+2", 0x4059000000000000ull },
    { "0.99999999999999994448884876874217297882", 0x3ff0000000000000ull },
    { "6.2e-322", 0x000000000000007dull },
    { "0", 0 },
    { "1000000000000000", 0x430c6bf526340000ull },
    { "0.0e999999999999999999", 0 },
};

/* 5^1075: 2^-1075 = 5^1075 x 10^-1075 is exactly halfway between 0 and the smallest subnormal */
static const char five_1075[] =
    "24703282292062327208828439643411068618252990130716238221279284125033775363510437593264991818081799618989828"
    "23477228588654633283551779698981993873980053909390631503565951557022639229085839244910518443593180284993653"
    "61525003193704576782492193656236698636584807570015857692699037063119282795585513329278343384093519780155312"
    "46597263579574622766465272827220056374006485499977096599470454020828166226237857393450736339007967761930577"
    "50674017632467360096895134053553745851666113422376667860416215968046191446729184030053005753084904876539171"
    "13865916462395249126236538818796362393732804238910186723484976682350898633885879256283027559956575244555072"
    "55189313690836254779186948667994968324049705821028513185451396213837722826145437693412532098591327667236328125";
/* 2^1024 - 2^970: halfway between the largest double and 2^1024 (rounds to even = overflow) */
static const char dbl_max_half[] =
    "17976931348623158079372897140530341507993413271003782693617377898044496829276475094664901797758720709633028"
    "64166928879109465555478519404026306574886715058206819089020007083836762738548458177115317644757302700698555"
    "71366959622842914819860834936475292719074168444365510704342711559699508093042880177904174497792";

static uint64_t parse_bits(const char *s, int *rc) {
    sd_json j;
    sd_clear_error();
    *rc = json_parse(s, strlen(s), "num", &j);
    uint64_t b = *rc == 0 && j.type == JSON_NUMBER ? sd_f64_bits(j.num) : 0xdeadull;
    if (*rc == 0) json_free(&j);
    return b;
}

static void test_json_numbers(void) {
    int rc;
    for (size_t i = 0; i < sizeof json_numbers / sizeof json_numbers[0]; i++) {
        uint64_t b = parse_bits(json_numbers[i].text, &rc);
        CHECK(rc == 0 && b == json_numbers[i].bits, "json number %s: got %016llx want %016llx (%s)", json_numbers[i].text,
              (unsigned long long)b, (unsigned long long)json_numbers[i].bits, sd_last_error());
    }
    /* exact halfway cases with hundreds of digits, and the sticky digit beyond 800 digits */
    char *s = sd_malloc(2000);
    snprintf(s, 2000, "%se-1075", five_1075);
    CHECK(parse_bits(s, &rc) == 0 && rc == 0, "2^-1075 exactly halfway: rounds to even (0)");
    snprintf(s, 2000, "%s%0100d1e-1176", five_1075, 0);
    CHECK(parse_bits(s, &rc) == 1 && rc == 0, "2^-1075 + tiny (digit 853): rounds up to the smallest subnormal");
    snprintf(s, 2000, "%s%0100de-1175", five_1075, 0);
    CHECK(parse_bits(s, &rc) == 0 && rc == 0, "2^-1075 with trailing zeros past 800 digits: still 0");
    snprintf(s, 2000, "%s", dbl_max_half);
    parse_bits(s, &rc);
    CHECK(rc == -1 && strstr(sd_last_error(), "range"), "2^1024-2^970 rounds to 2^1024: out of range (%s)", sd_last_error());
    s[strlen(s) - 1] = '1';
    CHECK(parse_bits(s, &rc) == 0x7fefffffffffffffull && rc == 0, "just below the overflow midpoint: DBL_MAX");
    /* property: every double printed with 17 significant digits parses back to itself */
    uint64_t x = 0x9E3779B97F4A7C15ull;
    int bad = 0;
    for (int i = 0; i < 20000; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        uint64_t bits = i < 10000 ? x : (x & 0x800fffffffffffffull) | ((uint64_t)(i % 2046 + 1) << 52);
        if (i % 7 == 0) bits &= 0x800fffffffffffffull;    /* subnormals */
        double d = sd_f64_from_bits(bits);
        if (d != d || d - d != 0) continue;               /* NaN, Inf: not JSON */
        snprintf(s, 2000, "%.17g", d);
        uint64_t got = parse_bits(s, &rc);
        if (rc != 0 || got != bits) {
            if (bad++ < 5) CHECK(0, "round trip of %s: got %016llx want %016llx", s, (unsigned long long)got, (unsigned long long)bits);
        }
    }
    CHECK(bad == 0, "%d of 20000 doubles did not survive %%.17g -> json_parse", bad);
    free(s);
}

static void test_json_syntax(void) {
    static const char *bad[] = {
        "", " ", "{", "}", "[1,]", "{\"a\":1,}", "01", "-01", "1.", ".5", "-", "1e", "1e+", "+1", "NaN", "Infinity",
        "-Infinity", "'a'", "\"\\x\"", "\"a\tb\"", "\"\n\"", "[1] x", "[1]]", "tru", "nul", "True", "\"\\ud800\"",
        "\"\\udc00\"", "\"\\ud800\\u0041\"", "\"\\ud800x\"", "\"\\u12\"", "\"\\u12g4\"", "\"\xc0\xaf\"", "\"\xc1\xbf\"",
        "\"\xe0\x80\xaf\"", "\"\xed\xa0\x80\"", "\"\xed\xbf\xbf\"", "\"\xf0\x80\x80\xaf\"", "\"\xf4\x90\x80\x80\"",
        "\"\xf5\x80\x80\x80\"", "\"\x80\"", "\"\xe2\x82\"", "\"\xff\"", "\xef\xbb\xbf{}", "1e400", "-1e400", "{\"a\" 1}",
        "{\"a\":}", "{1:2}", "[1 2]", "\"abc", "[", "{\"a\":1 \"b\":2}", "/*c*/1", "1 // c", "[1,,2]", "0x10",
        "\"\\u0000\" \"x\"", "\v1", "\xa0\x31",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int rc = json_try(bad[i], strlen(bad[i]));
        CHECK(rc == -1 && strstr(sd_last_error(), "doc.json: byte ") == sd_last_error(),
              "invalid JSON #%zu '%s' must fail with 'doc.json: byte N': rc %d, '%s'", i, bad[i], rc, sd_last_error());
    }
    /* an embedded NUL outside strings, and the byte offset reported */
    CHECK(json_try("[1]\0", 4) == -1 && strstr(sd_last_error(), "byte 3"), "NUL after value: byte 3 (%s)", sd_last_error());
    CHECK(json_try("[1, 2, x]", 9) == -1 && strstr(sd_last_error(), "byte 7"), "bad token at byte 7 (%s)", sd_last_error());
    /* nesting: 512 levels fine, 513 refused */
    char deep[1100];
    for (int d = 512; d <= 513; d++) {
        for (int i = 0; i < d; i++) { deep[i] = '['; deep[2 * d - 1 - i] = ']'; }
        int rc = json_try(deep, 2 * (size_t)d);
        CHECK(d == 512 ? rc == 0 : (rc == -1 && strstr(sd_last_error(), "nesting")), "depth %d: rc %d %s", d, rc, sd_last_error());
    }
    static const char *good[] = { "0", "-0.0e-0", "1E5", "true", "false", "null", "\"\"", "[]", "{}", " \t\r\n[ 1 , {} ] \n",
                                  "\"\xf4\x8f\xbf\xbf\"", "\"\xed\x9f\xbf\xee\x80\x80\"", "\"\\ud83d\\ude00\"", "\"\x7f\"" };
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++)
        CHECK(json_try(good[i], strlen(good[i])) == 0, "valid JSON '%s' refused: %s", good[i], sd_last_error());
}

static void test_json_values(void) {
    const char *doc = "{\"b\": [1, 2.5, \"x\"], \"a\": true, \"s\": \"a\\u00e9\\ud83d\\ude00\\n\\/\\\"\\\\\", "
                      "\"a\": false, \"z\": \"n\\u0000ul\", \"n\": null, \"i\": 42, \"big\": 3e10}";
    sd_json j;
    sd_clear_error();
    CHECK(json_parse(doc, strlen(doc), "doc", &j) == 0, "parse: %s", sd_last_error());
    if (j.type != JSON_OBJECT) return;
    CHECK(j.n == 8 && strcmp(j.keys[0], "b") == 0 && strcmp(j.keys[1], "a") == 0 && strcmp(j.keys[3], "a") == 0,
          "object keeps member order and duplicates");
    CHECK(json_get(&j, "a")->type == JSON_BOOL && json_get(&j, "a")->boolean == 0, "duplicate key: the last wins");
    CHECK(json_bool(&j, "a", 1) == 0 && json_bool(&j, "missing", 1) == 1, "json_bool");
    const sd_json *b = json_get(&j, "b");
    CHECK(b && b->type == JSON_ARRAY && b->n == 3 && b->items[1].num == 2.5 && b->items[2].type == JSON_STRING, "array");
    CHECK(strcmp(json_str(&j, "s", ""), "a\xc3\xa9\xf0\x9f\x98\x80\n/\"\\") == 0, "escapes decode: '%s'", json_str(&j, "s", ""));
    const sd_json *z = json_get(&j, "z");
    CHECK(z && z->str_len == 4 && memcmp(z->str, "n\0ul", 5) == 0, "\\u0000 kept, str_len counts it");
    CHECK(json_int(&j, "i", 0) == 42 && json_int(&j, "n", 7) == 7 && json_int(&j, "big", 7) == 7 && json_int(&j, "s", 7) == 7,
          "json_int: value, null -> default, out of range -> default, wrong type -> default");
    CHECK(json_num(&j, "big", 0) == 3e10 && json_num(&j, "nope", -1) == -1, "json_num");
    CHECK(json_str(&j, "i", "d")[0] == 'd' && json_get(&j, "nope") == NULL && json_get(b, "a") == NULL, "absent / not an object");
    json_free(&j);

    /* json_write_string: what it writes parses back to the same string */
    const char *s = "q\"b\\s/\x01\x1f\x7f\t\n\r\b\f \xc3\xa9\xf0\x9f\x98\x80 end";
    const char *path = tmp_path("str.json");
    FILE *f = fopen(path, "wb");
    if (!f) return;
    json_write_string(f, s);
    fclose(f);
    sd_clear_error();
    CHECK(json_parse_file(path, &j) == 0 && j.type == JSON_STRING && strcmp(j.str, s) == 0,
          "json_write_string round trip: %s", sd_last_error());
    json_free(&j);
    sd_clear_error();
    CHECK(json_parse_file(tmp_path("nope.json"), &j) == -1 && strstr(sd_last_error(), "nope.json"), "missing file named");
}

static void test_json_golden(void) {
    sd_json j;
    sd_clear_error();
    CHECK(json_parse_file(shared_path("golden/tiny_a/scheduler_config.json"), &j) == 0, "scheduler_config: %s", sd_last_error());
    CHECK(sd_f64_bits(json_num(&j, "beta_start", 0)) == 0x3f4bda5119ce075full, "beta_start == 0.00085 exactly");
    CHECK(sd_f64_bits(json_num(&j, "beta_end", 0)) == 0x3f889374bc6a7efaull, "beta_end == 0.012 exactly");
    CHECK(json_int(&j, "num_train_timesteps", 0) == 1000 && json_bool(&j, "set_alpha_to_one", 1) == 0 &&
          strcmp(json_str(&j, "timestep_spacing", ""), "leading") == 0 && json_get(&j, "trained_betas")->type == JSON_NULL,
          "scheduler_config values");
    json_free(&j);
    CHECK(json_parse_file(shared_path("golden/tiny_a/unet_config.json"), &j) == 0, "unet_config: %s", sd_last_error());
    const sd_json *boc = json_get(&j, "block_out_channels");
    CHECK(boc && boc->n == 2 && boc->items[0].num == 32 && boc->items[1].num == 64 && json_int(&j, "cross_attention_dim", 0) == 32,
          "unet_config values");
    json_free(&j);
    CHECK(json_parse_file(shared_path("golden/tiny_a/vocab.json"), &j) == 0 && j.type == JSON_OBJECT && j.n > 512,
          "vocab.json parses (%d entries) %s", j.n, sd_last_error());
    CHECK(json_int(&j, "<|endoftext|>", -1) == j.n - 1, "vocab: <|endoftext|> is the last id");
    json_free(&j);
}

/* ---- safetensors -------------------------------------------------------------------------- */

static void test_st_roundtrip(void) {
    char path[4096];
    snprintf(path, sizeof path, "%s", tmp_path("rt.safetensors"));
    st_writer w;
    st_writer_init(&w);
    /* every dtype, raw little-endian bytes with known values */
    static const uint8_t f64[16] = { 0x9a, 0x99, 0x99, 0x99, 0x99, 0x99, 0xb9, 0x3f, 0, 0, 0, 0, 0, 0, 0xf0, 0xbf };  /* 0.1, -1 */
    static const uint8_t i64[16] = { 0xfb, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 1 };     /* -5, 2^56 */
    static const uint8_t i32[8] = { 0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0x80 };                                     /* INT32_MAX, MIN */
    static const uint8_t i16[4] = { 0x00, 0x80, 0x39, 0x30 };                                                    /* -32768, 12345 */
    static const uint8_t i8[3] = { 0x80, 0x7f, 0xff };                                                           /* -128, 127, -1 */
    static const uint8_t u8[2] = { 0xff, 0x00 };
    static const uint8_t bl[3] = { 1, 0, 1 };
    static const uint8_t f16[4] = { 0x00, 0x3c, 0xff, 0x7b };                                                    /* 1, 65504 */
    static const uint8_t bf16[4] = { 0x80, 0x3f, 0x49, 0xc0 };                                                   /* 1, -3.140625 */
    static const uint8_t e4m3[3] = { 0x38, 0x7e, 0x01 };                                                         /* 1, 448, 2^-9 */
    static const uint8_t e5m2[3] = { 0x3c, 0x7b, 0x7c };                                                         /* 1, 57344, inf */
    static const float f32[6] = { 1.5f, -2.0f, 0.0f, 3.25f, -0.0f, 1e-40f };
    int64_t s2[1] = { 2 }, s3[1] = { 3 }, s23[2] = { 2, 3 }, s0[2] = { 0, 3 }, s4[3] = { 1, 2, 2 };
    st_writer_add_raw(&w, "f64", ST_F64, 1, s2, f64, 16);
    st_writer_add_f32(&w, "f32", 2, s23, f32);
    st_writer_add_raw(&w, "f16", ST_F16, 1, s2, f16, 4);
    st_writer_add_raw(&w, "bf16", ST_BF16, 1, s2, bf16, 4);
    st_writer_add_raw(&w, "i64", ST_I64, 1, s2, i64, 16);
    st_writer_add_raw(&w, "i32", ST_I32, 1, s2, i32, 8);
    st_writer_add_raw(&w, "i16", ST_I16, 1, s2, i16, 4);
    st_writer_add_raw(&w, "i8", ST_I8, 1, s3, i8, 3);
    st_writer_add_raw(&w, "u8", ST_U8, 1, s2, u8, 2);
    st_writer_add_raw(&w, "bool", ST_BOOL, 1, s3, bl, 3);
    st_writer_add_raw(&w, "e4m3", ST_F8_E4M3, 1, s3, e4m3, 3);
    st_writer_add_raw(&w, "e5m2", ST_F8_E5M2, 1, s3, e5m2, 3);
    st_writer_add_f32(&w, "scalar", 0, NULL, f32 + 3);
    st_writer_add_f32(&w, "empty", 2, s0, f32);
    static const float h[4] = { 1.0f, 65504.0f, -0.5f, 3.0f };
    st_writer_add_f16(&w, "as_f16", 3, s4, h);
    st_writer_add_bf16(&w, "as_bf16", 3, s4, h);
    st_writer_add_f32(&w, "we\"ird\\ \xc3\xa9 name", 1, s2, f32);
    st_writer_set_metadata(&w, "{\"format\": \"pt\", \"q\": \"a\\\"b\"}");
    sd_clear_error();
    CHECK(st_writer_write(&w, path) == 0, "write: %s", sd_last_error());

    sd_safetensors st;
    sd_clear_error();
    CHECK(st_open(&st, path) == 0, "reopen: %s", sd_last_error());
    CHECK(st.n == w.n, "entry count %d want %d", st.n, w.n);
    for (int i = 0; i < st.n && i < w.n; i++) {
        const st_entry *a = &st.entries[i], *b = &w.entries[i];
        int same = strcmp(a->name, b->name) == 0 && a->dtype == b->dtype && a->ndim == b->ndim && a->nbytes == b->nbytes &&
                   memcmp(st.data + a->offset, w.blobs[i], (size_t)a->nbytes) == 0;
        for (int k = 0; k < a->ndim; k++) same &= a->shape[k] == b->shape[k];
        CHECK(same, "entry %d (%s) survives the round trip in order", i, b->name);
    }
    /* the header: length field + JSON padded with spaces so the data starts at a multiple of 8 */
    uint8_t *file;
    size_t len;
    if (sd_read_file(path, &file, &len) == 0) {
        uint64_t hl = sd_le64(file);
        size_t close = (size_t)hl;
        while (close > 0 && file[8 + close - 1] == ' ') close--;
        CHECK(close > 0 && file[8 + close - 1] == '}' && hl - close < 8, "header JSON then fewer than 8 spaces of padding");
        CHECK(hl % 8 == 0, "header length %llu is a multiple of 8", (unsigned long long)hl);
        CHECK(memcmp(file + 8, "{\"__metadata__\":{\"format\":\"pt\",\"q\":\"a\\\"b\"},\"f64\":{\"dtype\":\"F64\",\"shape\":[2],"
                               "\"data_offsets\":[0,16]},\"f32\":{", 103) == 0, "header text: %.110s", (const char *)file + 8);
        free(file);
    }
    const st_entry *e;
    float v[8];
    struct { const char *name; int n; float want[6]; } dec[] = {
        { "f64", 2, { 0.1f, -1.0f } }, { "i64", 2, { -5.0f, 72057594037927936.0f } },
        { "i32", 2, { 2147483648.0f, -2147483648.0f } }, { "i16", 2, { -32768.0f, 12345.0f } },
        { "i8", 3, { -128.0f, 127.0f, -1.0f } }, { "u8", 2, { 255.0f, 0.0f } }, { "bool", 3, { 1.0f, 0.0f, 1.0f } },
        { "f16", 2, { 1.0f, 65504.0f } }, { "bf16", 2, { 1.0f, -3.140625f } }, { "e4m3", 3, { 1.0f, 448.0f, 0.001953125f } },
        { "e5m2", 2, { 1.0f, 57344.0f } }, { "scalar", 1, { 3.25f } }, { "as_f16", 4, { 1.0f, 65504.0f, -0.5f, 3.0f } },
        { "as_bf16", 4, { 1.0f, 65536.0f, -0.5f, 3.0f } }, { "f32", 6, { 1.5f, -2.0f, 0.0f, 3.25f, -0.0f, 1e-40f } },
    };
    for (size_t i = 0; i < sizeof dec / sizeof dec[0]; i++) {
        e = st_find(&st, dec[i].name);
        CHECK(e != NULL, "st_find(%s)", dec[i].name);
        if (!e) continue;
        st_read_f32(&st, e, v);
        int ok = 1;
        for (int k = 0; k < dec[i].n; k++) ok &= sd_f32_bits(v[k]) == sd_f32_bits(dec[i].want[k]);
        CHECK(ok, "st_read_f32(%s): %g %g want %g %g", dec[i].name, v[0], v[1], dec[i].want[0], dec[i].want[1]);
    }
    e = st_find(&st, "e5m2");
    if (e) { st_read_f32(&st, e, v); CHECK(v[2] > 3e38f, "e5m2 0x7c is +inf"); }
    e = st_find(&st, "scalar");
    CHECK(e && e->ndim == 0 && e->nbytes == 4, "0-d tensor: shape [] and 4 bytes");
    e = st_find(&st, "empty");
    CHECK(e && e->ndim == 2 && e->shape[0] == 0 && e->nbytes == 0, "zero-size tensor [0,3]");
    CHECK(st_find(&st, "we\"ird\\ \xc3\xa9 name") != NULL, "names with quotes, backslash and UTF-8 are escaped and recovered");
    CHECK(st_find(&st, "nope") == NULL, "st_find of an absent name is NULL");
    sd_json m;
    CHECK(st.metadata_json && json_parse(st.metadata_json, strlen(st.metadata_json), "m", &m) == 0 &&
          strcmp(json_str(&m, "format", ""), "pt") == 0 && strcmp(json_str(&m, "q", ""), "a\"b") == 0, "metadata round trip");
    if (st.metadata_json) json_free(&m);
    st_close(&st);
    CHECK(st_dtype_size(ST_BF16) == 2 && strcmp(st_dtype_name(ST_F8_E4M3), "F8_E4M3") == 0, "dtype tables");

    /* writer errors: bad metadata and duplicate names fail without leaving a file */
    char p2[4096];
    snprintf(p2, sizeof p2, "%s", tmp_path("bad_meta.safetensors"));
    st_writer_set_metadata(&w, "{\"a\": 1}");
    sd_clear_error();
    CHECK(st_writer_write(&w, p2) == -1 && strstr(sd_last_error(), p2) && strstr(sd_last_error(), "metadata"),
          "metadata of non-strings refused: %s", sd_last_error());
    st_writer_set_metadata(&w, NULL);
    st_writer_add_f32(&w, "f32", 2, s23, f32);
    sd_clear_error();
    CHECK(st_writer_write(&w, p2) == -1 && strstr(sd_last_error(), "added twice"), "duplicate name refused: %s", sd_last_error());
    FILE *f = fopen(p2, "rb");
    CHECK(f == NULL, "no output file after a refused write");
    if (f) fclose(f);
    st_writer_free(&w);
}

static void test_st_golden(void) {
    sd_safetensors st;
    const st_entry *e;
    float v[80];
    sd_clear_error();
    CHECK(st_open(&st, shared_path("golden/tiny_a/unet.safetensors")) == 0, "unet.safetensors: %s", sd_last_error());
    CHECK(st.n == 304, "unet: 304 tensors, got %d", st.n);
    CHECK(st.metadata_json && strcmp(st.metadata_json, "{\"format\":\"pt\"}") == 0, "unet metadata: %s", st.metadata_json ? st.metadata_json : "(none)");
    e = st_find(&st, "conv_in.weight");
    CHECK(e && e->dtype == ST_F32 && e->ndim == 4 && e->shape[0] == 32 && e->shape[1] == 4 && e->shape[2] == 3 && e->shape[3] == 3 &&
          e->offset == 128 && e->nbytes == 4608, "conv_in.weight [32,4,3,3] F32 at 128");
    e = st_find(&st, "conv_in.bias");
    if (e) {
        st_read_f32(&st, e, v);
        CHECK(v[0] == (float)-0.10414807498455048 && v[1] == (float)-0.06126363202929497 && v[3] == (float)-0.009591332636773586,
              "conv_in.bias values %.9g %.9g", v[0], v[1]);
    }
    st_close(&st);

    CHECK(st_open(&st, shared_path("golden/tiny_a/checkpoint.safetensors")) == 0, "checkpoint: %s", sd_last_error());
    CHECK(st.n == 599 && st.metadata_json == NULL, "checkpoint: 599 tensors, no metadata (got %d)", st.n);
    e = st_find(&st, "cond_stage_model.transformer.text_model.embeddings.position_ids");
    CHECK(e && e->dtype == ST_I64 && e->ndim == 2 && e->shape[1] == 77, "position_ids I64 [1,77]");
    if (e) {
        st_read_f32(&st, e, v);
        int ok = 1;
        for (int i = 0; i < 77; i++) ok &= v[i] == (float)i;
        CHECK(ok, "position_ids are 0..76");
    }
    e = st_find(&st, "model_ema.num_updates");
    CHECK(e && e->dtype == ST_I32 && e->ndim == 1 && e->shape[0] == 1 && e->nbytes == 4, "model_ema.num_updates I32 [1]");
    if (e) { st_read_f32(&st, e, v); CHECK(v[0] == 0.0f, "num_updates = 0"); }
    e = st_find(&st, "model_ema.decay");
    CHECK(e && e->dtype == ST_F32 && e->ndim == 1, "model_ema.decay F32");
    if (e) { st_read_f32(&st, e, v); CHECK(sd_f32_bits(v[0]) == 0x3f7ff972u, "decay = 0.9999"); }
    st_close(&st);

    CHECK(st_open(&st, shared_path("golden/tiny_a/trace.safetensors")) == 0, "trace: %s", sd_last_error());
    CHECK(st.n == 223, "trace: 223 tensors, got %d", st.n);
    sd_json m, order, aliases;
    if (st.metadata_json && json_parse(st.metadata_json, strlen(st.metadata_json), "meta", &m) == 0) {
        const char *o = json_str(&m, "order", "");
        const char *a = json_str(&m, "aliases", "");
        CHECK(json_parse(o, strlen(o), "order", &order) == 0 && order.type == JSON_ARRAY && order.n == 223 &&
              strcmp(order.items[0].str, "text_encoder.text_model.embeddings") == 0, "trace metadata 'order'");
        int all = order.type == JSON_ARRAY;
        for (int i = 0; all && i < order.n; i++) all = order.items[i].type == JSON_STRING && st_find(&st, order.items[i].str);
        CHECK(all, "every name in 'order' is a tensor of the file");
        json_free(&order);
        CHECK(json_parse(a, strlen(a), "aliases", &aliases) == 0 && aliases.n == 10 &&
              strcmp(json_str(&aliases, "unet.down_blocks.0", ""), "unet.down_blocks.0.downsamplers.0") == 0, "trace 'aliases'");
        json_free(&aliases);
        CHECK(strncmp(json_str(&m, "doc", ""), "forward output", 14) == 0, "trace 'doc'");
        json_free(&m);
    } else {
        CHECK(0, "trace metadata parses: %s", sd_last_error());
    }
    st_close(&st);
}

static void test_st_malformed(void) {
    /* a valid base file, then every truncation of it */
    char base[4096], tp[4096];
    snprintf(base, sizeof base, "%s", tmp_path("base.safetensors"));
    snprintf(tp, sizeof tp, "%s", tmp_path("trunc.safetensors"));
    st_writer w;
    st_writer_init(&w);
    float d[6] = { 1, 2, 3, 4, 5, 6 };
    int64_t s23[2] = { 2, 3 }, s1[1] = { 1 };
    st_writer_add_f32(&w, "x.weight", 2, s23, d);
    st_writer_add_f16(&w, "x.bias", 1, s1, d);
    st_writer_set_metadata(&w, "{\"k\":\"v\"}");
    sd_clear_error();
    CHECK(st_writer_write(&w, base) == 0, "base: %s", sd_last_error());
    st_writer_free(&w);
    uint8_t *file;
    size_t len;
    if (sd_read_file(base, &file, &len)) return;
    uint64_t hl = sd_le64(file);
    int fails = 0;
    for (size_t n = 0; n < len; n++) {
        write_bytes(tp, file, n);
        int rc = st_try(tp);
        const char *want = n < 8 ? "too short" : n < 8 + hl ? "runs past the end of the file" : "run past the end of the data";
        if (rc != -1 || strstr(sd_last_error(), tp) != sd_last_error() || !strstr(sd_last_error(), want)) {
            if (fails++ < 3) CHECK(0, "truncated at %zu: rc %d '%s' (want '%s')", n, rc, sd_last_error(), want);
        }
    }
    CHECK(fails == 0, "all %zu truncations of a valid file fail naming the file and the problem", len);
    /* header length past the end, and huge */
    uint8_t tmp[16];
    memcpy(tmp, file, 8);
    for (int k = 0; k < 8; k++) tmp[k] = (uint8_t)((uint64_t)len >> (8 * k));
    memcpy(file, tmp, 8);
    write_bytes(tp, file, len);
    expect_fail(st_try(tp), tp, "header length", "header length = file size");
    for (int k = 0; k < 8; k++) file[k] = k == 5 ? 1 : 0;   /* 2^40 */
    write_bytes(tp, file, len);
    expect_fail(st_try(tp), tp, "exceeds the limit", "header length 2^40");
    for (int k = 0; k < 8; k++) file[k] = 0xff;
    write_bytes(tp, file, len);
    expect_fail(st_try(tp), tp, "exceeds the limit", "header length 2^64-1");
    free(file);

    /* crafted headers */
    static const struct { const char *header; size_t data; const char *want; } cases[] = {
        { "{\"x\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,12]}}", 24,
          "tensor 'x': data_offsets [0, 12] do not match shape [2,3] x F32 (24 bytes)" },
        { "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4, "run past the end of the data" },
        { "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[9007199254740984,9007199254740992]}}", 8, "run past the end" },
        { "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
          16, "overlap" },
        { "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[2,6]},\"b\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[3,3]}}",
          8, "overlap" },
        { "{\"x\":{\"dtype\":\"F4\",\"shape\":[2],\"data_offsets\":[0,1]}}", 8, "unknown dtype 'F4'" },
        { "{\"x\":{\"dtype\":\"f32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "unknown dtype 'f32'" },
        { "{\"x\":{\"dtype\":7,\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "dtype is not a string" },
        { "{\"x\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]},\"x\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[2,4]}}",
          8, "'x' appears twice" },
        { "{\"x\":{\"dtype\":\"U8\",\"shape\":[-1],\"data_offsets\":[0,0]}}", 8, "shape entry 0 is not a non-negative integer" },
        { "{\"x\":{\"dtype\":\"U8\",\"shape\":[1.5],\"data_offsets\":[0,0]}}", 8, "not a non-negative integer" },
        { "{\"x\":{\"dtype\":\"U8\",\"shape\":[\"2\"],\"data_offsets\":[0,2]}}", 8, "not a non-negative integer" },
        { "{\"x\":{\"dtype\":\"F64\",\"shape\":[4294967296,4294967296,4294967296],\"data_offsets\":[0,8]}}", 8, "absurdly large" },
        { "{\"x\":{\"dtype\":\"F64\",\"shape\":[4503599627370496,4503599627370496],\"data_offsets\":[0,8]}}", 8, "absurdly large" },
        { "{\"x\":{\"dtype\":\"U8\",\"shape\":[1e300],\"data_offsets\":[0,8]}}", 8, "not a non-negative integer" },
        { "{\"x\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}", 8, "9 dimensions" },
        { "{\"x\":{\"dtype\":\"U8\",\"shape\":2,\"data_offsets\":[0,2]}}", 8, "shape is not an array" },
        { "{\"x\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0]}}", 8, "data_offsets is not a pair" },
        { "{\"x\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2,4]}}", 8, "data_offsets is not a pair" },
        { "{\"x\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[-2,0]}}", 8, "data_offsets is not a pair" },
        { "{\"x\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[4,2]}}", 8, "end before they begin" },
        { "{\"x\":{\"dtype\":\"U8\",\"shape\":[2]}}", 8, "missing 'data_offsets'" },
        { "{\"x\":{\"shape\":[2],\"data_offsets\":[0,2]}}", 8, "missing 'dtype'" },
        { "{\"x\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2],\"extra\":1}}", 8, "unexpected key 'extra'" },
        { "{\"x\":{\"dtype\":\"U8\",\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}}", 8, "given twice" },
        { "{\"x\":[1,2]}", 8, "'x': header entry is not a JSON object" },
        { "[1,2]", 8, "header is not a JSON object" },
        { "\"x\"", 8, "header is not a JSON object" },
        { "{\"x\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]},}", 8, "header: byte " },
        { "{\"x\":{\"dtype\":\"U8\" \"shape\":[2]}}", 8, "header: byte 19" },
        { "{\"x\xff\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}}", 8, "invalid UTF-8" },
        { "{\"x\xc0\x80\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}}", 8, "invalid UTF-8" },
        { "{\"__metadata__\":{\"a\":1}}", 8, "__metadata__ is not an object of string values" },
        { "{\"__metadata__\":\"a\"}", 8, "__metadata__ is not an object" },
        { "{\"__metadata__\":{},\"__metadata__\":{}}", 8, "__metadata__ appears twice" },
        { "", 8, "header: byte 0" },
        { "{}x", 8, "after the JSON value" },
    };
    char label[64];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char name[64];
        snprintf(name, sizeof name, "model%zu.safetensors", i);
        const char *p = tmp_path(name);
        write_st(p, cases[i].header, cases[i].data);
        snprintf(label, sizeof label, "safetensors case %zu", i);
        expect_fail(st_try(p), p, cases[i].want, label);
    }
    /* files that are fine: gaps between tensors, empty header object, spaces after the JSON */
    char ok[4096];
    snprintf(ok, sizeof ok, "%s", tmp_path("ok.safetensors"));
    write_st(ok, "{\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[4,6]},\"b\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[6,6]}}   ", 8);
    CHECK(st_try(ok) == 0, "gaps and trailing spaces accepted: %s", sd_last_error());
    write_st(ok, "{}", 0);
    CHECK(st_try(ok) == 0, "empty safetensors accepted: %s", sd_last_error());
    /* not a file */
    expect_fail(st_try(test_tmpdir()), test_tmpdir(), "not a regular file", "directory");
    expect_fail(st_try(tmp_path("absent.safetensors")), tmp_path("absent.safetensors"), "cannot open", "absent");
    /* truncated copies of a golden file */
    uint8_t *g;
    size_t glen;
    if (sd_read_file(shared_path("golden/tiny_a/unet.safetensors"), &g, &glen) == 0) {
        size_t cuts[] = { 0, 7, 8, 100, 34047, 34048, glen / 2, glen - 1 };
        for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
            write_bytes(tp, g, cuts[i]);
            snprintf(label, sizeof label, "unet truncated to %zu", cuts[i]);
            expect_fail(st_try(tp), tp, cuts[i] < 8 ? "too short" : cuts[i] < 34048 ? "header length" : "past the end of the data", label);
        }
        free(g);
    }
}

/* ---- .npy --------------------------------------------------------------------------------- */

/* A .npy file from a version, header dict text (padded here) and raw data bytes. */
static void write_npy(const char *path, int major, const char *dict, const void *data, size_t n) {
    size_t dl = strlen(dict), pre = major == 1 ? 10 : 12;
    size_t hl = dl + 1;
    while ((pre + hl) % 64) hl++;
    uint8_t *b = sd_malloc(pre + hl + n);
    memcpy(b, "\x93NUMPY", 6);
    b[6] = (uint8_t)major;
    b[7] = 0;
    for (size_t k = 0; k < pre - 8; k++) b[8 + k] = (uint8_t)(hl >> (8 * k));
    memset(b + pre, ' ', hl);
    memcpy(b + pre, dict, dl);
    b[pre + hl - 1] = '\n';
    if (n) memcpy(b + pre + hl, data, n);
    write_bytes(path, b, pre + hl + n);
    free(b);
}

static void test_npy_roundtrip(void) {
    const char *p = tmp_path("rt.npy");
    float f32[6] = { 1.5f, -2.0f, 1e-40f, 3.0e38f, -0.0f, 7.0f };
    double f64[6] = { 0.1, -1e300, 4.9e-324, 2.0, -0.0, 3.5 };
    int64_t i64[6] = { -1, INT64_MIN, INT64_MAX, 0, 77, 1 };
    int32_t i32[6] = { -1, INT32_MIN, INT32_MAX, 0, 77, 1 };
    uint8_t u8[6] = { 0, 255, 1, 2, 3, 128 };
    uint16_t u16[6] = { 0, 65535, 1, 256, 3, 0x8000 };
    uint16_t f16[6] = { 0x3c00, 0x7bff, 0x0001, 0xfc00, 0x8000, 0x4000 };
    const void *datas[7] = { f32, f64, i64, i32, u8, u16, f16 };
    const size_t sizes[7] = { 4, 8, 8, 4, 1, 2, 2 };
    const float as_f32[7][2] = { { 1.5f, -2.0f }, { 0.1f, -1e300 > 0 ? 0 : -(float)1e30 * 1e30f }, { -1.0f, -9.223372036854775808e18f },
                                 { -1.0f, -2147483648.0f }, { 0.0f, 255.0f }, { 0.0f, 65535.0f }, { 1.0f, 65504.0f } };
    int64_t shapes[4][3] = { { 0 }, { 6 }, { 2, 3 }, { 1, 2, 3 } };
    const int ndims[4] = { 0, 1, 2, 3 };
    for (int dt = 0; dt < 7; dt++) {
        for (int s = 0; s < 4; s++) {
            sd_clear_error();
            int rc = npy_write(p, (npy_dtype)dt, ndims[s], shapes[s], datas[dt]);
            sd_npy a;
            rc |= npy_read(p, &a);
            size_t n = ndims[s] == 0 ? 1 : 6;
            int ok = rc == 0 && a.dtype == (npy_dtype)dt && a.ndim == ndims[s] && a.n == n &&
                     memcmp(a.data, datas[dt], n * sizes[dt]) == 0;
            for (int k = 0; ok && k < a.ndim; k++) ok = a.shape[k] == shapes[s][k];
            CHECK(ok, "npy round trip dtype %d ndim %d: %s", dt, ndims[s], sd_last_error());
            if (rc == 0) npy_free(&a);
            /* numpy's layout: data starts at a multiple of 64, header ends in '\n' */
            uint8_t *file;
            size_t len;
            if (sd_read_file(p, &file, &len) == 0) {
                size_t hl = sd_le16(file + 8);
                CHECK((10 + hl) % 64 == 0 && file[9 + hl] == '\n' && len == 10 + hl + n * sizes[dt],
                      "npy layout dtype %d ndim %d", dt, ndims[s]);
                free(file);
            }
        }
        float *f;
        int nd;
        int64_t sh[8];
        size_t n;
        sd_clear_error();
        CHECK(npy_read_f32(p, &f, &nd, sh, &n) == 0 && nd == 3 && n == 6 && sh[2] == 3, "npy_read_f32 dtype %d: %s", dt, sd_last_error());
        if (sd_last_error()[0] == 0) {
            CHECK(f[0] == as_f32[dt][0] && (dt == 1 ? f[1] < -3e38f : f[1] == as_f32[dt][1]),
                  "npy_read_f32 dtype %d converts: %g %g", dt, f[0], f[1]);
            free(f);
        }
    }
    /* zero-size arrays */
    int64_t z[2] = { 0, 5 };
    sd_npy a;
    sd_clear_error();
    CHECK(npy_write(p, NPY_F32, 2, z, f32) == 0 && npy_read(p, &a) == 0 && a.n == 0 && a.ndim == 2 && a.shape[1] == 5,
          "zero-size array: %s", sd_last_error());
    npy_free(&a);
    /* npy_write_tensor */
    sd_tensor t = { 3, { 1, 2, 3, 1 }, f32 };
    CHECK(npy_write_tensor(p, &t) == 0 && npy_read(p, &a) == 0 && a.ndim == 3 && a.shape[2] == 3 && a.n == 6 &&
          memcmp(a.data, f32, 24) == 0, "npy_write_tensor");
    npy_free(&a);
}

static void test_npy_golden(void) {
    sd_npy a;
    sd_clear_error();
    CHECK(npy_read(shared_path("golden/tiny_a/text_input_ids.npy"), &a) == 0, "text_input_ids: %s", sd_last_error());
    CHECK(a.dtype == NPY_I64 && a.ndim == 2 && a.shape[0] == 1 && a.shape[1] == 77 && a.n == 77, "text_input_ids int64 [1,77]");
    if (a.dtype == NPY_I64 && a.n == 77) {
        const int64_t *v = a.data;
        CHECK(v[0] == 576 && v[1] == 320 && v[13] == 337 && v[14] == 577 && v[76] == 577, "text_input_ids values");
        /* our writer reproduces numpy's bytes exactly */
        const char *p = tmp_path("ids.npy");
        uint8_t *x = NULL, *y = NULL;
        size_t nx, ny;
        CHECK(npy_write(p, NPY_I64, a.ndim, a.shape, a.data) == 0 && sd_read_file(p, &x, &nx) == 0 &&
              sd_read_file(shared_path("golden/tiny_a/text_input_ids.npy"), &y, &ny) == 0 && nx == ny && memcmp(x, y, nx) == 0,
              "npy_write output is byte-identical to numpy's (int64 [1,77])");
        free(x);
        free(y);
    }
    npy_free(&a);
    CHECK(npy_read(shared_path("golden/tiny_a/unet_in_timestep.npy"), &a) == 0 && a.ndim == 0 && a.n == 1 && a.dtype == NPY_F32 &&
          ((uint32_t *)a.data)[0] == 0x43fa8000u, "0-d float32 timestep = 501");
    if (a.n == 1) {
        const char *p = tmp_path("t.npy");
        uint8_t *x = NULL, *y = NULL;
        size_t nx, ny;
        CHECK(npy_write(p, NPY_F32, 0, a.shape, a.data) == 0 && sd_read_file(p, &x, &nx) == 0 &&
              sd_read_file(shared_path("golden/tiny_a/unet_in_timestep.npy"), &y, &ny) == 0 && nx == ny && memcmp(x, y, nx) == 0,
              "npy_write output is byte-identical to numpy's (0-d float32)");
        free(x);
        free(y);
    }
    npy_free(&a);
    float *f;
    int nd;
    int64_t sh[8];
    size_t n;
    CHECK(npy_read_f32(shared_path("golden/tiny_a/vae_decode_in.npy"), &f, &nd, sh, &n) == 0 && nd == 4 && n == (size_t)(sh[0] * sh[1] * sh[2] * sh[3]),
          "vae_decode_in.npy as float: %s", sd_last_error());
    if (!sd_last_error()[0]) free(f);
}

static void test_npy_handmade(void) {
    const char *p = tmp_path("be.npy");
    /* big-endian, by hand */
    static const uint8_t be_f4[8] = { 0x3f, 0xc0, 0, 0, 0xc0, 0x00, 0, 0 };                 /* 1.5, -2 */
    static const uint8_t be_f8[8] = { 0x3f, 0xb9, 0x99, 0x99, 0x99, 0x99, 0x99, 0x9a };     /* 0.1 */
    static const uint8_t be_i8[16] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfb, 0, 0, 0, 0, 0, 0, 1, 0 }; /* -5, 256 */
    static const uint8_t be_i4[8] = { 0x80, 0, 0, 0, 0, 0, 0x01, 0x02 };                   /* INT32_MIN, 258 */
    static const uint8_t be_u2[4] = { 0x12, 0x34, 0xff, 0x00 };
    static const uint8_t be_f2[4] = { 0x3c, 0x00, 0xc0, 0x00 };                             /* 1, -2 */
    static const uint8_t b1[3] = { 1, 0, 1 };
    sd_npy a;
    write_npy(p, 1, "{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", be_f4, 8);
    sd_clear_error();
    CHECK(npy_read(p, &a) == 0 && a.dtype == NPY_F32 && a.n == 2 && ((float *)a.data)[0] == 1.5f && ((float *)a.data)[1] == -2.0f,
          ">f4: %s", sd_last_error());
    npy_free(&a);
    write_npy(p, 2, "{\"descr\": \">f8\", \"shape\": (1, 1), \"fortran_order\": False}", be_f8, 8);
    CHECK(npy_read(p, &a) == 0 && a.dtype == NPY_F64 && a.ndim == 2 && ((double *)a.data)[0] == 0.1,
          "version 2.0, >f8, double quotes, keys in another order: %s", sd_last_error());
    npy_free(&a);
    write_npy(p, 3, "{'descr': '>i8', 'fortran_order': False, 'shape': (2L,)}", be_i8, 16);
    CHECK(npy_read(p, &a) == 0 && a.dtype == NPY_I64 && ((int64_t *)a.data)[0] == -5 && ((int64_t *)a.data)[1] == 256,
          "version 3.0, >i8, Python 2 long: %s", sd_last_error());
    npy_free(&a);
    write_npy(p, 1, "{'descr': '>i4', 'fortran_order': False, 'shape': (2,), }", be_i4, 8);
    CHECK(npy_read(p, &a) == 0 && a.dtype == NPY_I32 && ((int32_t *)a.data)[0] == INT32_MIN && ((int32_t *)a.data)[1] == 258,
          ">i4: %s", sd_last_error());
    npy_free(&a);
    write_npy(p, 1, "{'descr': '>u2', 'fortran_order': False, 'shape': (2,), }", be_u2, 4);
    CHECK(npy_read(p, &a) == 0 && a.dtype == NPY_U16 && ((uint16_t *)a.data)[0] == 0x1234 && ((uint16_t *)a.data)[1] == 0xff00,
          ">u2: %s", sd_last_error());
    npy_free(&a);
    write_npy(p, 1, "{'descr': '>f2', 'fortran_order': False, 'shape': (2,), }", be_f2, 4);
    float *f;
    size_t n;
    CHECK(npy_read_f32(p, &f, NULL, NULL, &n) == 0 && n == 2 && f[0] == 1.0f && f[1] == -2.0f, ">f2 as float: %s", sd_last_error());
    if (!sd_last_error()[0]) free(f);
    write_npy(p, 1, "{'descr': '|b1', 'fortran_order': False, 'shape': (3,), }", b1, 3);
    CHECK(npy_read(p, &a) == 0 && a.dtype == NPY_U8 && ((uint8_t *)a.data)[2] == 1, "|b1 -> U8: %s", sd_last_error());
    npy_free(&a);

    /* malformed */
    static const uint8_t four[4] = { 0 };
    static const struct { int major; const char *dict; size_t n; const char *want; } cases[] = {
        { 1, "{'descr': '<f4', 'fortran_order': True, 'shape': (1,), }", 4, "Fortran order not supported" },
        { 1, "{'descr': '<c8', 'fortran_order': False, 'shape': (1,), }", 4, "unsupported .npy dtype '<c8'" },
        { 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", 4, "(truncated file)" },
        { 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (), }", 0, "(truncated file)" },
        { 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (0,), }", 4, "data is 4 bytes but shape [0] x '<f4' needs 0" },
        { 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1), }", 4, "trailing comma" },
        { 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }", 4, "not a non-negative integer" },
        { 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1 2), }", 4, "expected ',' or ')'" },
        { 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 4294967296), }", 4, "absurdly large" },
        { 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }", 4, "absurdly large" },
        { 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1,1,1,1,1,1,1,1,1), }", 4, "more than 8" },
        { 1, "{'descr': '<f4', 'fortran_order': False, }", 4, "lacks 'shape'" },
        { 1, "{'descr': '<f4', 'shape': (1,), }", 4, "lacks 'fortran_order'" },
        { 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'x': 1}", 4, "unexpected or repeated key" },
        { 1, "{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", 4, "unexpected or repeated key" },
        { 1, "{'descr': '<f4', 'fortran_order': 0, 'shape': (1,), }", 4, "not True or False" },
        { 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), } x", 4, "after the header dict" },
        { 1, "['descr', '<f4']", 4, "not a dict" },
        { 1, "{'descr': '<f4' 'fortran_order': False, 'shape': (1,), }", 4, "expected ',' or '}'" },
        { 1, "{'descr: '<f4', 'fortran_order': False, 'shape': (1,), }", 4, "expected ':'" },
    };
    char label[64];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char name[64];
        snprintf(name, sizeof name, "bad%zu.npy", i);
        const char *q = tmp_path(name);
        write_npy(q, cases[i].major, cases[i].dict, four, cases[i].n);
        snprintf(label, sizeof label, "npy case %zu", i);
        expect_fail(npy_try(q), q, cases[i].want, label);
    }
    /* magic, version, header length */
    uint8_t raw[80];
    const char *q = tmp_path("raw.npy");
    write_npy(q, 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", four, 4);
    uint8_t *file;
    size_t len;
    if (sd_read_file(q, &file, &len) == 0) {
        memcpy(raw, file, sizeof raw);
        raw[1] = 'n';
        write_bytes(q, raw, sizeof raw);
        expect_fail(npy_try(q), q, "bad magic", "bad magic");
        memcpy(raw, file, sizeof raw);
        raw[6] = 4;
        write_bytes(q, raw, sizeof raw);
        expect_fail(npy_try(q), q, "unsupported .npy version 4.0", "version 4.0");
        raw[6] = 1;
        raw[7] = 1;
        write_bytes(q, raw, sizeof raw);
        expect_fail(npy_try(q), q, "version 1.1", "version 1.1");
        raw[7] = 0;
        raw[8] = 0xff;
        raw[9] = 0xff;
        write_bytes(q, raw, sizeof raw);
        expect_fail(npy_try(q), q, "header length 65535 runs past the end", "header length past end");
        /* every truncation */
        int fails = 0;
        for (size_t k = 0; k < len; k++) {
            write_bytes(q, file, k);
            int rc = npy_try(q);
            if (rc != -1 || strstr(sd_last_error(), q) != sd_last_error()) {
                if (fails++ < 3) CHECK(0, "npy truncated at %zu: rc %d '%s'", k, rc, sd_last_error());
            }
        }
        CHECK(fails == 0, "all %zu truncations of a .npy fail naming the file", len);
        free(file);
    }
    expect_fail(npy_try(tmp_path("absent.npy")), tmp_path("absent.npy"), "cannot open", "absent npy");
}

void test_io(void) {
    test_json_numbers();
    test_json_syntax();
    test_json_values();
    test_st_roundtrip();
    test_st_malformed();
    test_npy_roundtrip();
    test_npy_handmade();
    if (have_shared()) {
        test_json_golden();
        test_st_golden();
        test_npy_golden();
    } else {
        fprintf(stderr, "note: io golden tests skipped (no shared data)\n");
    }
}
