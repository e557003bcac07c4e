/* tests/test_tokenizer.c — the CLIP tokenizer against OpenAI's simple_tokenizer + ftfy 6.3.1
 * (shared/tokenizer/cases.json: clean-up, BPE and ids separately for every case) and against
 * transformers' CLIPTokenizer on the tiny vocabulary (golden/tiny_a/tokenizer_cases.json). */
#include "test.h"
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ids of a JSON array equal to ids[0..n) */
static int same_ids(const sd_json *arr, const int *ids, int n) {
    if (!arr || arr->type != JSON_ARRAY || arr->n != n) return 0;
    for (int i = 0; i < n; i++)
        if (arr->items[i].type != JSON_NUMBER || (int)arr->items[i].num != ids[i]) return 0;
    return 1;
}

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    if (!f) { CHECK(0, "cannot write %s", path); return; }
    fputs(text, f);
    fclose(f);
}

static void copy_file(const char *from, const char *to) {
    uint8_t *d;
    size_t n;
    if (sd_read_file(from, &d, &n) != 0) { CHECK(0, "cannot read %s", from); return; }
    FILE *f = fopen(to, "wb");
    if (f) { fwrite(d, 1, n, f); fclose(f); }
    free(d);
}

/* Every case of cases.json: (a) clean-up, (b) BPE of clean_text, (c) full ids and the 77 form. */
static void check_cases(const sd_tokenizer *t, const char *label, int check_tokens) {
    sd_json doc;
    if (json_parse_file(shared_path("tokenizer/cases.json"), &doc) != 0) { CHECK(0, "cases.json: %s", sd_last_error()); return; }
    const sd_json *cases = json_get(&doc, "cases");
    int n_cases = cases ? cases->n : 0, ok_clean = 0, ok_bpe = 0, ok_ids = 0, ok_77 = 0;
    CHECK(n_cases >= 200, "cases.json has %d cases", n_cases);
    for (int k = 0; k < n_cases; k++) {
        const sd_json *c = &cases->items[k];
        const char *id = json_str(c, "id", "?"), *clean = json_str(c, "clean_text", "");
        /* A C string cannot hold U+0000: such prompts are given without it (ftfy deletes it anyway). */
        const sd_json *pj = json_get(c, "prompt");
        char prompt[4096];
        size_t plen = 0;
        for (size_t i = 0; pj && i < pj->str_len && plen + 1 < sizeof prompt; i++)
            if (pj->str[i]) prompt[plen++] = pj->str[i];
        prompt[plen] = 0;
        const sd_json *want = json_get(c, "ids"), *want77 = json_get(c, "ids_77"), *tokens = json_get(c, "tokens");
        char *got_clean = NULL;
        int good = tok_clean_text(prompt, &got_clean) == 0 && strcmp(got_clean, clean) == 0;
        ok_clean += good;
        CHECK(good, "%s clean-up of case %s: got '%s' want '%s'", label, id, got_clean ? got_clean : sd_last_error(), clean);
        free(got_clean);
        /* content ids (want without BOS/EOS) and, when asked, the token strings */
        int *ids = NULL, n = 0;
        good = tok_encode_clean(t, clean, &ids, &n) == 0 && want && n == want->n - 2;
        for (int i = 0; good && i < n; i++) good = (int)want->items[1 + i].num == ids[i];
        if (good && check_tokens) {
            good = tokens && tokens->n == n;
            for (int i = 0; good && i < n; i++) good = strcmp(tok_token_text(t, ids[i]), tokens->items[i].str) == 0;
        }
        ok_bpe += good;
        CHECK(good, "%s BPE of case %s (%d ids)", label, id, n);
        free(ids);
        good = tok_encode(t, prompt, &ids, &n) == 0 && same_ids(want, ids, n);
        ok_ids += good;
        CHECK(good, "%s full ids of case %s", label, id);
        free(ids);
        int ids77[77];
        good = tok_encode_padded(t, prompt, 77, ids77) == 0 && same_ids(want77, ids77, 77);
        ok_77 += good;
        CHECK(good, "%s 77 ids of case %s", label, id);
    }
    fprintf(stderr, "  %s: %d cases: clean-up %d, BPE %d, ids %d, ids_77 %d passed\n", label, n_cases, ok_clean, ok_bpe,
            ok_ids, ok_77);
    json_free(&doc);
}

static void test_tiny(void) {
    sd_tokenizer *t = tok_load(shared_path("golden/tiny_a"));
    CHECK(t != NULL, "tiny_a tokenizer: %s", sd_last_error());
    if (!t) return;
    sd_json doc;
    if (json_parse_file(shared_path("golden/tiny_a/tokenizer_cases.json"), &doc) != 0) { tok_free(t); CHECK(0, "%s", sd_last_error()); return; }
    CHECK(tok_bos(t) == json_int(&doc, "bos", -1) && tok_eos(t) == json_int(&doc, "eos", -1) &&
          tok_pad(t) == json_int(&doc, "pad", -1), "tiny specials %d %d %d", tok_bos(t), tok_eos(t), tok_pad(t));
    const sd_json *cases = json_get(&doc, "cases");
    CHECK(cases && cases->n >= 7, "tiny cases");
    for (int k = 0; cases && k < cases->n; k++) {
        const char *text = json_str(&cases->items[k], "text", "");
        int *ids, n, ids77[77];
        CHECK(tok_encode(t, text, &ids, &n) == 0 && same_ids(json_get(&cases->items[k], "ids"), ids, n),
              "tiny ids of '%s'", text);
        free(ids);
        CHECK(tok_encode_padded(t, text, 77, ids77) == 0 && same_ids(json_get(&cases->items[k], "ids_padded77"), ids77, 77),
              "tiny 77 ids of '%s'", text);
    }
    json_free(&doc);
    tok_free(t);

    /* the same files named directly, and an SD2-style tokenizer that pads with "!" (id 0) */
    t = tok_load(shared_path("golden/tiny_a/merges.txt"));
    CHECK(t && tok_eos(t) == 577, "tiny via merges.txt path");
    tok_free(t);
    copy_file(shared_path("golden/tiny_a/vocab.json"), tmp_path("vocab.json"));
    copy_file(shared_path("golden/tiny_a/merges.txt"), tmp_path("merges.txt"));
    write_text(tmp_path("tokenizer_config.json"), "{\"pad_token\": \"!\", \"model_max_length\": 77}");
    t = tok_load(tmp_path("vocab.json"));
    CHECK(t && tok_pad(t) == 0, "pad_token from tokenizer_config.json: %d", t ? tok_pad(t) : -1);
    if (t) {
        int ids[77];
        CHECK(tok_encode_padded(t, "a photo of a cat", 77, ids) == 0 && ids[6] == 577 && ids[7] == 0 && ids[76] == 0,
              "SD2 padding: EOS then '!' ids");
    }
    tok_free(t);
    write_text(tmp_path("special_tokens_map.json"), "{\"pad_token\": {\"content\": \"<|endoftext|>\", \"lstrip\": false}}");
    t = tok_load(test_tmpdir());
    CHECK(t && tok_pad(t) == 577, "pad_token object from special_tokens_map.json wins");
    tok_free(t);
    write_text(tmp_path("special_tokens_map.json"), "{\"pad_token\": \"<notthere>\"}");
    t = tok_load(test_tmpdir());
    CHECK(!t && strstr(sd_last_error(), "pad_token"), "unknown pad token refused: %s", sd_last_error());
    tok_free(t);
    sd_clear_error();
}

static void test_units(const sd_tokenizer *t) {
    char *out = (char *)1;
    sd_clear_error();
    CHECK(tok_clean_text("caf\xc3", &out) == -1 && out == NULL && strstr(sd_last_error(), "UTF-8"),
          "truncated UTF-8 refused: %s", sd_last_error());
    sd_clear_error();
    int *ids = NULL, n = 0, ids77[77];
    CHECK(tok_encode(t, "a\xed\xa0\x80 b", &ids, &n) == -1 && ids == NULL, "encoded surrogate refused");
    sd_clear_error();
    CHECK(tok_encode_padded(t, "\xc0\xaf", 77, ids77) == -1, "overlong UTF-8 refused");
    sd_clear_error();
    CHECK(tok_clean_text("\xf4\x90\x80\x80", &out) == -1, "code point above U+10FFFF refused");
    sd_clear_error();

    /* 100 words of one token each: the 77 form keeps 75, ends with EOS */
    char long_prompt[1000] = "";
    for (int i = 0; i < 100; i++) strcat(long_prompt, "cat ");
    CHECK(tok_encode(t, long_prompt, &ids, &n) == 0 && n == 102, "100 words -> 102 ids (%d)", n);
    int ok = tok_encode_padded(t, long_prompt, 77, ids77) == 0 && ids77[0] == tok_bos(t) && ids77[76] == tok_eos(t);
    for (int i = 1; ok && i < 76; i++) ok = ids77[i] == ids[i];
    CHECK(ok, "truncated to exactly 77 with a final EOS");
    free(ids);
    CHECK(tok_encode_padded(t, "", 77, ids77) == 0 && ids77[0] == 49406 && ids77[1] == 49407 && ids77[76] == 49407,
          "empty prompt: BOS EOS then padding");
    CHECK(tok_bos(t) == 49406 && tok_eos(t) == 49407 && tok_pad(t) == 49407, "SD1.5 specials");

    /* rules the golden cases may not reach */
    const struct { const char *in, *want; } rules[] = {
        { "\xce\xa3\xce\xa3 \xcf\x83\xce\xa3.", "\xcf\x83\xcf\x82 \xcf\x83\xcf\x82." },   /* ΣΣ σΣ. -> σς σς. */
        { "&notanentity; &amp", "\xc2\xac" "anentity; &" },                                /* legacy entities */
        { "&#128; &#x110000; &#0;", "\xe2\x82\xac \xef\xbf\xbd \xef\xbf\xbd" },
        { "&EACUTE;cole", "\xc3\xa9" "cole" },                                              /* ftfy upper-case entity */
        { "\xef\xbc\xa8\xef\xbd\x89", "hi" },                                               /* full-width */
        { "e\xcc\x81\xcc\xa3", "\xe1\xba\xb9\xcc\x81" },                                    /* NFC reorders, composes */
        { "\xe1\x84\x80\xe1\x85\xa1\xe1\x86\xa8", "\xea\xb0\x81" },                         /* Hangul jamo -> 각 */
        { "sch\xc3\x83\xc2\xb6n", "sch\xc3\xb6n" },                                         /* schÃ¶n -> schön */
        { "voil\xc3\x83 le travail", "voil\xc3\xa0 le travail" },                           /* byte A0 restored */
    };
    for (size_t i = 0; i < sizeof rules / sizeof rules[0]; i++) {
        out = NULL;
        CHECK(tok_clean_text(rules[i].in, &out) == 0 && strcmp(out, rules[i].want) == 0, "clean '%s' -> '%s' (want '%s')",
              rules[i].in, out ? out : "?", rules[i].want);
        free(out);
    }
}

static void test_cli_tokenize(void) {
    const char *o = tmp_path("tokenize.txt");
    int rc = run_cmd("./sdref tokenize --tokenizer '%s' --prompt 'a photo of a cat sitting on a red chair' > '%s' 2>/dev/null",
                     shared_path("golden/tiny_a"), o);
    uint8_t *d = NULL;
    size_t n = 0;
    if (rc != 0 || sd_read_file(o, &d, &n) != 0) { CHECK(0, "./sdref tokenize failed (rc %d)", rc); return; }
    const char *want = "576 320 522 515 320 536 561 513 320 570 66 71 517 337 577";
    CHECK(strncmp((char *)d, want, strlen(want)) == 0 && n == strlen(want) + 62 * 4 + 1 && d[n - 1] == '\n',
          "./sdref tokenize prints the 77 ids: %.80s", (char *)d);
    free(d);
    rc = run_cmd("./sdref tokenize --tokenizer '%s' --prompt 'a cat' --raw > '%s' 2>/dev/null", shared_path("golden/tiny_a"), o);
    if (rc == 0 && sd_read_file(o, &d, &n) == 0) {
        CHECK(strcmp((char *)d, "576 320 536 577\n") == 0, "--raw: %s", (char *)d);
        free(d);
    } else CHECK(0, "./sdref tokenize --raw failed");
    rc = run_cmd("./sdref tokenize --tokenizer '%s' --prompt \"$(printf 'bad\\377')\" > /dev/null 2>&1", shared_path("golden/tiny_a"));
    CHECK(rc != 0, "invalid UTF-8 prompt: non-zero exit");
}

void test_tokenizer(void) {
    if (!have_shared()) { CHECK(0, "shared data missing"); return; }
    clock_t t0 = clock();
    sd_tokenizer *t = tok_load(shared_path("tokenizer/clip"));
    double secs = (double)(clock() - t0) / CLOCKS_PER_SEC;
    CHECK(t != NULL, "clip tokenizer: %s", sd_last_error());
    if (!t) return;
    fprintf(stderr, "  vocab.json + merges.txt loaded in %.3f s\n", secs);
    CHECK(secs < 5.0, "loading took %.2f s", secs);
    check_cases(t, "vocab.json", 1);
    test_units(t);
    tok_free(t);

    t0 = clock();
    t = tok_load(shared_path("tokenizer/clip/bpe_simple_vocab_16e6.txt.gz"));
    secs = (double)(clock() - t0) / CLOCKS_PER_SEC;
    CHECK(t != NULL, "bpe_simple_vocab_16e6.txt.gz: %s", sd_last_error());
    if (t) {
        fprintf(stderr, "  bpe_simple_vocab_16e6.txt.gz loaded in %.3f s\n", secs);
        CHECK(tok_bos(t) == 49406 && tok_eos(t) == 49407 && tok_pad(t) == 49407, "gz specials");
        check_cases(t, ".gz", 1);
        tok_free(t);
    }
    test_tiny();
    test_cli_tokenize();
}
