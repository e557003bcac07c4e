/* tests/test_clip.c — CLIP text encoder, CLIP vision encoder and CLIP preprocessing against the
 * golden data of shared/golden/tiny_a and shared/golden/clip_preprocess, real-size layouts from
 * shared/spec, thread independence, and the clip-text / clip-vision / preprocess commands. */
#include "test.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define GOLD(f) shared_path("golden/tiny_a/" f)

/* ---------- small helpers ---------- */

static float *read_f32(const char *path, size_t *n) {
    float *d = NULL;
    int nd;
    int64_t s[8];
    if (npy_read_f32(path, &d, &nd, s, n)) {
        fprintf(stderr, "  cannot read %s: %s\n", path, sd_last_error());
        return NULL;
    }
    return d;
}

static double rms_rel(const float *a, const float *ref, size_t n) {
    double e = 0, r = 0;
    for (size_t i = 0; i < n; i++) {
        e += ((double)a[i] - ref[i]) * ((double)a[i] - ref[i]);
        r += (double)ref[i] * ref[i];
    }
    return sqrt(e / (r > 0 ? r : 1));
}

/* got vs golden .npy within rel x max|golden|; prints the figures. */
static void check_golden(const char *what, const sd_tensor *got, const char *gold_path, double rel) {
    size_t n = 0;
    float *g = read_f32(gold_path, &n);
    CHECK(g != NULL, "%s: golden file missing", what);
    if (!g) return;
    CHECK(got->data && tensor_numel(got) == n, "%s: %zu values, golden has %zu", what, got->data ? tensor_numel(got) : 0, n);
    if (got->data && tensor_numel(got) == n) {
        double d = max_diff(got->data, g, n), m = max_abs(g, n);
        fprintf(stderr, "  %s: max|diff| %.3g, max|golden| %.3g (ratio %.2g)\n", what, d, m, d / m);
        CHECK(d <= rel * m, "%s: max|diff| %.3g > %.1g x %.3g", what, d, rel, m);
    }
    free(g);
}

static int *golden_ids(int *n) {
    sd_npy a;
    if (npy_read(GOLD("text_input_ids.npy"), &a)) return NULL;
    int *ids = malloc(a.n * sizeof(int));
    for (size_t i = 0; i < a.n; i++) ids[i] = (int)((const int64_t *)a.data)[i];
    *n = (int)a.n;
    npy_free(&a);
    return ids;
}

static sd_ctx make_ctx(const char *spec, sd_model_kind kind, const char *prefix, sd_trace *trace) {
    sd_precision p;
    sd_ctx c;
    memset(&c, 0, sizeof c);
    if (sd_precision_parse(spec, &p)) sd_fatal("bad precision %s", spec);
    c.pol = p.model[kind];
    c.prefix = prefix;
    c.trace = trace;
    return c;
}

static sd_tensor pixels_golden(void) {
    float *d;
    int nd;
    int64_t s[8];
    size_t n;
    sd_tensor t;
    memset(&t, 0, sizeof t);
    if (npy_read_f32(GOLD("vision_pixel_values.npy"), &d, &nd, s, &n) || nd != 4) return t;
    t.ndim = 4;
    for (int i = 0; i < 4; i++) t.shape[i] = (int)s[i];
    t.data = d;
    return t;
}

/* Every golden trace tensor whose name starts with prefix, compared with ours. */
static void check_trace(const sd_trace *mine, const char *prefix) {
    sd_safetensors st;
    CHECK(st_open(&st, GOLD("trace.safetensors")) == 0, "golden trace: %s", sd_last_error());
    int seen = 0;
    double worst = 0;
    for (int i = 0; i < st.n; i++) {
        const st_entry *e = &st.entries[i];
        if (strncmp(e->name, prefix, strlen(prefix)) != 0) continue;
        seen++;
        const sd_trace_entry *m = NULL;
        for (int k = 0; k < mine->n; k++)
            if (!strcmp(mine->e[k].name, e->name)) m = &mine->e[k];
        CHECK(m != NULL, "trace: %s missing from ours", e->name);
        if (!m) continue;
        size_t n = 1;
        for (int d = 0; d < e->ndim; d++) n *= (size_t)e->shape[d];
        CHECK((size_t)m->stats.n == n, "trace: %s has %lld values, golden %zu", e->name, (long long)m->stats.n, n);
        if ((size_t)m->stats.n != n) continue;
        float *g = malloc(n * sizeof(float));
        st_read_f32(&st, e, g);
        double d = max_diff(m->data, g, n), mx = max_abs(g, n);
        worst = d / mx > worst ? d / mx : worst;
        CHECK(d <= 1e-5 * mx, "trace: %s max|diff| %.3g (max|golden| %.3g)", e->name, d, mx);
        free(g);
    }
    fprintf(stderr, "  trace %s*: %d golden tensors, worst max|diff|/max|golden| %.2g\n", prefix, seen, worst);
    CHECK(seen >= 4, "trace: only %d golden tensors under %s", seen, prefix);
    st_close(&st);
}

/* ---------- text encoder ---------- */

static void test_text_golden(void) {
    int n = 0;
    int *ids = golden_ids(&n);
    CHECK(ids && n == 77, "text_input_ids.npy: %d ids", n);
    if (!ids) return;
    sd_trace tr;
    memset(&tr, 0, sizeof tr);
    tr.keep_data = 1;
    sd_ctx c = make_ctx("fp32", SD_TEXT, "text_encoder", &tr);
    /* transformers layout */
    sd_clip_text *m = clip_text_load(GOLD("text_encoder.safetensors"), GOLD("text_encoder_config.json"), &c.pol);
    CHECK(m != NULL, "load text_encoder.safetensors: %s", sd_last_error());
    if (!m) { free(ids); return; }
    CHECK(clip_text_width(m) == 32 && clip_text_max_length(m) == 77 && clip_text_num_layers(m) == 2, "text sizes");
    sd_tensor y = clip_text_forward(m, &c, ids, 1, 77, 1);
    CHECK(y.ndim == 3 && y.shape[0] == 1 && y.shape[1] == 77 && y.shape[2] == 32, "text output shape");
    check_golden("text fp32 (transformers file)", &y, GOLD("text_last_hidden_state.npy"), 1e-5);
    check_trace(&tr, "text_encoder.");
    sd_trace_free(&tr);
    c.trace = NULL;

    /* single-file checkpoint, same weights: bit-identical */
    sd_clip_text *mc = clip_text_load(GOLD("checkpoint.safetensors"), GOLD("text_encoder_config.json"), &c.pol);
    CHECK(mc != NULL, "load checkpoint.safetensors: %s", sd_last_error());
    if (mc) {
        sd_tensor yc = clip_text_forward(mc, &c, ids, 1, 77, 1);
        check_golden("text fp32 (checkpoint file)", &yc, GOLD("text_last_hidden_state.npy"), 1e-5);
        CHECK(yc.data && !memcmp(yc.data, y.data, tensor_numel(&y) * sizeof(float)), "checkpoint and transformers layouts differ");
        tensor_free(&yc);
        clip_text_free(mc);
    }

    /* clip skip 2 = final_layer_norm(golden layers.0 output), the norm computed here in double */
    sd_tensor y2 = clip_text_forward(m, &c, ids, 1, 77, 2);
    sd_safetensors tst, wst;
    if (y2.data && st_open(&tst, GOLD("trace.safetensors")) == 0) {
        if (st_open(&wst, GOLD("text_encoder.safetensors")) == 0) {
            const st_entry *h = st_find(&tst, "text_encoder.text_model.encoder.layers.0");
            const st_entry *gw = st_find(&wst, "text_model.final_layer_norm.weight");
            const st_entry *gb = st_find(&wst, "text_model.final_layer_norm.bias");
            CHECK(h && gw && gb, "clip skip: golden tensors missing");
            if (h && gw && gb) {
                float *hv = malloc(77 * 32 * sizeof(float)), ga[32], be[32], *ref = malloc(77 * 32 * sizeof(float));
                st_read_f32(&tst, h, hv);
                st_read_f32(&wst, gw, ga);
                st_read_f32(&wst, gb, be);
                for (int t = 0; t < 77; t++) {
                    double mu = 0, var = 0;
                    for (int i = 0; i < 32; i++) mu += hv[t * 32 + i];
                    mu /= 32;
                    for (int i = 0; i < 32; i++) var += (hv[t * 32 + i] - mu) * (hv[t * 32 + i] - mu);
                    var /= 32;
                    for (int i = 0; i < 32; i++) ref[t * 32 + i] = (float)((hv[t * 32 + i] - mu) / sqrt(var + 1e-5) * ga[i] + be[i]);
                }
                double d = max_diff(y2.data, ref, 77 * 32), mx = max_abs(ref, 77 * 32);
                fprintf(stderr, "  clip skip 2 vs final_layer_norm(golden layers.0): max|diff| %.3g (max %.3g)\n", d, mx);
                CHECK(d <= 1e-5 * mx, "clip skip 2: max|diff| %.3g", d);
                CHECK(max_diff(y2.data, y.data, 77 * 32) > 1e-3, "clip skip 2 equals clip skip 1");
                free(hv);
                free(ref);
            }
            st_close(&wst);
        }
        st_close(&tst);
    }
    tensor_free(&y2);

    /* bad input: id outside the vocabulary, too many tokens, clip skip out of range */
    int bad[77];
    memcpy(bad, ids, sizeof bad);
    bad[5] = 578;
    sd_clear_error();
    sd_tensor yb = clip_text_forward(m, &c, bad, 1, 77, 1);
    CHECK(!yb.data && strstr(sd_last_error(), "vocabulary"), "id 578 accepted (%s)", sd_last_error());
    yb = clip_text_forward(m, &c, ids, 1, 77, 3);
    CHECK(!yb.data, "clip skip 3 of 2 layers accepted");
    int *many = calloc(78, sizeof(int));
    yb = clip_text_forward(m, &c, many, 1, 78, 1);
    CHECK(!yb.data, "78 tokens accepted");
    free(many);

    /* batch of 2: each row as alone */
    int *two = malloc(2 * 77 * sizeof(int));
    memcpy(two, ids, 77 * sizeof(int));
    for (int i = 0; i < 77; i++) two[77 + i] = (ids[i] * 7 + 3) % 578;
    sd_tensor yb2 = clip_text_forward(m, &c, two, 2, 77, 1);
    sd_tensor y1 = clip_text_forward(m, &c, two + 77, 1, 77, 1);
    CHECK(yb2.data && !memcmp(yb2.data, y.data, 77 * 32 * sizeof(float)) &&
          !memcmp(yb2.data + 77 * 32, y1.data, 77 * 32 * sizeof(float)), "batch of 2 differs from single runs");
    tensor_free(&yb2);
    tensor_free(&y1);
    free(two);

    /* causal: the first k outputs depend only on the first k tokens */
    int cut[77];
    memcpy(cut, ids, sizeof cut);
    for (int i = 10; i < 77; i++) cut[i] = 1;
    sd_tensor yc = clip_text_forward(m, &c, cut, 1, 77, 1);
    CHECK(yc.data && !memcmp(yc.data, y.data, 10 * 32 * sizeof(float)) && memcmp(yc.data, y.data, 77 * 32 * sizeof(float)),
          "causal mask: later tokens change earlier outputs (or nothing changed)");
    tensor_free(&yc);

    /* threads: 1 vs 2 bit-identical */
#ifdef _OPENMP
    int saved = omp_get_max_threads();
#endif
    sd_set_threads(1);
    sd_tensor t1 = clip_text_forward(m, &c, ids, 1, 77, 1);
    sd_set_threads(2);
    sd_tensor t2 = clip_text_forward(m, &c, ids, 1, 77, 1);
#ifdef _OPENMP
    omp_set_num_threads(saved);
#endif
    CHECK(t1.data && t2.data && !memcmp(t1.data, t2.data, tensor_numel(&t1) * sizeof(float)), "text: 1 vs 2 threads differ");
    tensor_free(&t1);
    tensor_free(&t2);

    /* fp16 preset: fp16 values, distance from fp32 */
    sd_ctx c16 = make_ctx("fp16", SD_TEXT, "text_encoder", NULL);
    sd_clip_text *m16 = clip_text_load(GOLD("text_encoder.safetensors"), GOLD("text_encoder_config.json"), &c16.pol);
    CHECK(m16 != NULL, "fp16 load: %s", sd_last_error());
    if (m16) {
        sd_tensor h = clip_text_forward(m16, &c16, ids, 1, 77, 1);
        size_t nn = tensor_numel(&h), nonrep = 0;
        for (size_t i = 0; i < nn; i++) nonrep += !sd_is_representable(h.data[i], SD_F16);
        double r = rms_rel(h.data, y.data, nn), d = max_diff(h.data, y.data, nn);
        fprintf(stderr, "  text fp16 preset vs fp32: RMS rel %.3g, max|diff| %.3g, %zu values not fp16\n", r, d, nonrep);
        CHECK(nonrep == 0, "fp16: %zu outputs not fp16-representable", nonrep);
        CHECK(r > 1e-5 && r < 1e-2, "fp16: RMS rel distance %.3g from fp32 outside (1e-5, 1e-2)", r);
        tensor_free(&h);
        clip_text_free(m16);
    }

    /* F16 and BF16 files: equal to the F32 file read with weights rounded to that format */
    sd_safetensors src;
    if (st_open(&src, GOLD("text_encoder.safetensors")) == 0) {
        st_writer w16, wb16;
        st_writer_init(&w16);
        st_writer_init(&wb16);
        for (int i = 0; i < src.n; i++) {
            const st_entry *e = &src.entries[i];
            size_t nn = 1;
            for (int d = 0; d < e->ndim; d++) nn *= (size_t)e->shape[d];
            float *v = malloc(nn * sizeof(float));
            st_read_f32(&src, e, v);
            st_writer_add_f16(&w16, e->name, e->ndim, e->shape, v);
            st_writer_add_bf16(&wb16, e->name, e->ndim, e->shape, v);
            free(v);
        }
        CHECK(st_writer_write(&w16, tmp_path("te_f16.safetensors")) == 0, "write f16: %s", sd_last_error());
        CHECK(st_writer_write(&wb16, tmp_path("te_bf16.safetensors")) == 0, "write bf16: %s", sd_last_error());
        st_writer_free(&w16);
        st_writer_free(&wb16);
        st_close(&src);
        const char *files[2] = { "te_f16.safetensors", "te_bf16.safetensors" };
        const char *specs[2] = { "fp32,text.weights=fp16", "fp32,text.weights=bf16" };
        for (int k = 0; k < 2; k++) {
            sd_ctx cf = make_ctx("fp32", SD_TEXT, "text_encoder", NULL), cw = make_ctx(specs[k], SD_TEXT, "text_encoder", NULL);
            sd_clip_text *a = clip_text_load(tmp_path(files[k]), GOLD("text_encoder_config.json"), &cf.pol);
            sd_clip_text *b = clip_text_load(GOLD("text_encoder.safetensors"), GOLD("text_encoder_config.json"), &cw.pol);
            CHECK(a && b, "load %s: %s", files[k], sd_last_error());
            if (a && b) {
                sd_tensor ya = clip_text_forward(a, &cf, ids, 1, 77, 1), yb3 = clip_text_forward(b, &cw, ids, 1, 77, 1);
                CHECK(ya.data && yb3.data && !memcmp(ya.data, yb3.data, tensor_numel(&ya) * sizeof(float)),
                      "%s file differs from weights rounded on load", files[k]);
                fprintf(stderr, "  text from %s: RMS rel %.3g from the F32 weights\n", files[k], rms_rel(ya.data, y.data, tensor_numel(&y)));
                tensor_free(&ya);
                tensor_free(&yb3);
            }
            clip_text_free(a);
            clip_text_free(b);
        }
    }

    /* a config that disagrees with the file is refused */
    FILE *f = fopen(tmp_path("te_1layer.json"), "w");
    if (f) {
        fprintf(f, "{\"model_type\": \"clip_text_model\", \"hidden_size\": 32, \"intermediate_size\": 128, "
                   "\"num_attention_heads\": 2, \"num_hidden_layers\": 1, \"vocab_size\": 578}\n");
        fclose(f);
        sd_clear_error();
        sd_clip_text *bad1 = clip_text_load(GOLD("text_encoder.safetensors"), tmp_path("te_1layer.json"), &c.pol);
        CHECK(!bad1 && strstr(sd_last_error(), "layers.1"), "1-layer config on a 2-layer file accepted (%s)", sd_last_error());
        clip_text_free(bad1);
    }
    sd_clear_error();
    sd_clip_text *none = clip_text_load(GOLD("image_encoder.safetensors"), GOLD("text_encoder_config.json"), &c.pol);
    CHECK(!none && strstr(sd_last_error(), "no CLIP text encoder"), "image encoder accepted as text encoder (%s)", sd_last_error());
    sd_clear_error();
    none = clip_text_load(GOLD("text_encoder.safetensors"), NULL, &c.pol);
    CHECK(!none && strstr(sd_last_error(), "--config"), "transformers file without config accepted (%s)", sd_last_error());
    sd_clear_error();
    none = clip_text_load(GOLD("text_encoder.safetensors"), GOLD("image_encoder_config.json"), &c.pol);
    CHECK(!none && sd_last_error()[0], "vision config accepted for the text encoder");
    sd_clear_error();
    /* tiny checkpoint without config: SD1.5's config assumed, so refused with a hint */
    none = clip_text_load(GOLD("checkpoint.safetensors"), NULL, &c.pol);
    CHECK(!none && strstr(sd_last_error(), "--config"), "tiny checkpoint without config accepted (%s)", sd_last_error());
    sd_clear_error();

    tensor_free(&y);
    clip_text_free(m);
    free(ids);
}

/* ---------- vision encoder ---------- */

static void test_vision_golden(void) {
    sd_trace tr;
    memset(&tr, 0, sizeof tr);
    tr.keep_data = 1;
    sd_ctx c = make_ctx("fp32", SD_VISION, "image_encoder", &tr);
    sd_clip_vision *m = clip_vision_load(GOLD("image_encoder.safetensors"), GOLD("image_encoder_config.json"), &c.pol);
    CHECK(m != NULL, "load image_encoder.safetensors: %s", sd_last_error());
    if (!m) return;
    CHECK(clip_vision_image_size(m) == 32 && clip_vision_hidden_size(m) == 32 && clip_vision_projection_dim(m) == 24, "vision sizes");
    sd_tensor px = pixels_golden();
    CHECK(px.data != NULL, "vision_pixel_values.npy");
    if (!px.data) { clip_vision_free(m); return; }
    sd_tensor pen, last;
    sd_tensor emb = clip_vision_forward(m, &c, &px, &pen, &last);
    CHECK(emb.ndim == 2 && emb.shape[0] == 1 && emb.shape[1] == 24, "image_embeds shape");
    check_golden("vision image_embeds", &emb, GOLD("vision_image_embeds.npy"), 1e-5);
    check_golden("vision last_hidden_state", &last, GOLD("vision_last_hidden_state.npy"), 1e-5);
    check_golden("vision hidden_states[-2]", &pen, GOLD("vision_hidden_states_penultimate.npy"), 1e-5);
    check_trace(&tr, "image_encoder.");
    sd_trace_free(&tr);
    c.trace = NULL;

    /* threads and batch */
#ifdef _OPENMP
    int saved = omp_get_max_threads();
#endif
    sd_set_threads(1);
    sd_tensor e1 = clip_vision_forward(m, &c, &px, NULL, NULL);
    sd_set_threads(2);
    sd_tensor e2 = clip_vision_forward(m, &c, &px, NULL, NULL);
#ifdef _OPENMP
    omp_set_num_threads(saved);
#endif
    CHECK(e1.data && e2.data && !memcmp(e1.data, e2.data, 24 * sizeof(float)) && !memcmp(e1.data, emb.data, 24 * sizeof(float)),
          "vision: 1 vs 2 threads differ");
    tensor_free(&e1);
    tensor_free(&e2);
    sd_tensor px2 = tensor_new(4, 2, 3, 32, 32);
    size_t one = tensor_numel(&px);
    memcpy(px2.data, px.data, one * sizeof(float));
    for (size_t i = 0; i < one; i++) px2.data[one + i] = -px.data[i];
    sd_tensor eb = clip_vision_forward(m, &c, &px2, NULL, NULL);
    CHECK(eb.data && eb.shape[0] == 2 && !memcmp(eb.data, emb.data, 24 * sizeof(float)) && memcmp(eb.data + 24, emb.data, 24 * sizeof(float)),
          "vision batch of 2 differs from the single run");
    tensor_free(&eb);
    tensor_free(&px2);

    /* fp16 preset */
    sd_ctx c16 = make_ctx("fp16", SD_VISION, "image_encoder", NULL);
    sd_clip_vision *m16 = clip_vision_load(GOLD("image_encoder.safetensors"), GOLD("image_encoder_config.json"), &c16.pol);
    if (m16) {
        sd_tensor p16, l16;
        sd_tensor h = clip_vision_forward(m16, &c16, &px, &p16, &l16);
        size_t nonrep = 0;
        for (size_t i = 0; i < 24; i++) nonrep += !sd_is_representable(h.data[i], SD_F16);
        for (size_t i = 0; i < tensor_numel(&p16); i++) nonrep += !sd_is_representable(p16.data[i], SD_F16);
        double r = rms_rel(h.data, emb.data, 24), rl = rms_rel(l16.data, last.data, tensor_numel(&last));
        fprintf(stderr, "  vision fp16 preset vs fp32: image_embeds RMS rel %.3g, last_hidden RMS rel %.3g\n", r, rl);
        CHECK(nonrep == 0, "vision fp16: %zu values not fp16", nonrep);
        CHECK(r > 1e-6 && r < 1e-2 && rl < 1e-2, "vision fp16: RMS rel %.3g / %.3g", r, rl);
        tensor_free(&h);
        tensor_free(&p16);
        tensor_free(&l16);
        clip_vision_free(m16);
    }

    /* wrong pixel size is refused */
    sd_tensor small = tensor_new(4, 1, 3, 16, 16);
    sd_clear_error();
    sd_tensor es = clip_vision_forward(m, &c, &small, NULL, NULL);
    CHECK(!es.data && sd_last_error()[0], "16x16 pixels accepted by a 32x32 encoder");
    tensor_free(&small);
    sd_clear_error();

    tensor_free(&emb);
    tensor_free(&pen);
    tensor_free(&last);
    tensor_free(&px);
    clip_vision_free(m);
}

/* ---------- preprocessing ---------- */

static void test_preprocess(void) {
    sd_json man;
    CHECK(json_parse_file(shared_path("golden/clip_preprocess/manifest.json"), &man) == 0, "manifest: %s", sd_last_error());
    if (sd_last_error()[0]) return;
    const sd_json *cases = json_get(&man, "cases");
    int total_px_diff = 0, ncase = 0;
    for (int i = 0; cases && i < cases->n; i++) {
        const sd_json *cs = &cases->items[i];
        char p[512];
        const char *name = json_str(cs, "name", "?");
        snprintf(p, sizeof p, "golden/clip_preprocess/%s", json_str(cs, "input", ""));
        sd_image im;
        if (png_read_file(shared_path(p), &im)) {
            CHECK(0, "%s: %s", name, sd_last_error());
            continue;
        }
        sd_tensor px;
        uint8_t *rgb = NULL;
        int rc = clip_preprocess(&im, 224, &px, &rgb);
        sd_image_free(&im);
        CHECK(rc == 0, "%s: preprocess failed: %s", name, sd_last_error());
        if (rc) continue;
        ncase++;
        /* the resized image (whole, then cropped here; or already cropped) */
        const char *rc_file = json_str(cs, "resized_cropped", NULL), *r_file = json_str(cs, "resized", NULL);
        snprintf(p, sizeof p, "golden/clip_preprocess/%s", rc_file ? rc_file : r_file ? r_file : "");
        sd_npy g;
        int differ = 0, maxd = 0;
        if (npy_read(shared_path(p), &g) == 0 && g.dtype == NPY_U8 && g.ndim == 3 && g.shape[2] == 3) {
            int top = rc_file ? 0 : json_int(cs, "crop_top", 0), left = rc_file ? 0 : json_int(cs, "crop_left", 0);
            int gw = (int)g.shape[1];
            CHECK(g.shape[0] >= top + 224 && gw >= left + 224, "%s: golden resized too small", name);
            if (g.shape[0] >= top + 224 && gw >= left + 224) {
                if (!rc_file) CHECK(g.shape[1] == json_int(cs, "resized_width", 0) && g.shape[0] == json_int(cs, "resized_height", 0),
                                    "%s: golden resized shape", name);
                for (int y = 0; y < 224; y++)
                    for (int x = 0; x < 224; x++) {
                        int pd = 0;
                        for (int ch = 0; ch < 3; ch++) {
                            int d = abs((int)rgb[(y * 224 + x) * 3 + ch] - ((const uint8_t *)g.data)[((size_t)(top + y) * gw + left + x) * 3 + ch]);
                            pd |= d != 0;
                            maxd = d > maxd ? d : maxd;
                        }
                        differ += pd;
                    }
            }
            npy_free(&g);
        } else {
            CHECK(0, "%s: cannot read %s", name, p);
        }
        /* pixel values */
        snprintf(p, sizeof p, "golden/clip_preprocess/%s", json_str(cs, "pixel_values", ""));
        size_t n = 0;
        float *pv = read_f32(shared_path(p), &n);
        double d = 1;
        size_t bits = 0;
        if (pv && n == tensor_numel(&px)) {
            d = max_diff(px.data, pv, n);
            for (size_t k = 0; k < n; k++) bits += sd_f32_bits(px.data[k]) != sd_f32_bits(pv[k]);
        }
        fprintf(stderr, "  preprocess %-20s resized: %d of 50176 pixels differ (max %d levels); pixel_values max|diff| %.3g, %zu not bit-equal\n",
                name, differ, maxd, d, bits);
        CHECK(differ == 0, "%s: %d resized pixels differ from Pillow (max %d levels)", name, differ, maxd);
        CHECK(d <= 1e-6, "%s: pixel_values max|diff| %.3g", name, d);
        total_px_diff += differ;
        free(pv);
        free(rgb);
        tensor_free(&px);
    }
    CHECK(ncase == 9, "preprocess: %d cases ran, expected 9", ncase);
    fprintf(stderr, "  preprocess: %d cases, %d resized pixels differ in total\n", ncase, total_px_diff);
    json_free(&man);

    /* no-resize path (224x224 in), 16-bit input (high byte), and bounds */
    sd_image im;
    im.width = 224; im.height = 224; im.depth = 8; im.channels = 4;
    im.pixels = malloc(224 * 224 * 4);
    for (int k = 0; k < 224 * 224 * 4; k++) ((uint8_t *)im.pixels)[k] = (uint8_t)(k * 37 + (k >> 10));
    sd_tensor px;
    uint8_t *rgb;
    CHECK(clip_preprocess(&im, 224, &px, &rgb) == 0, "224x224: %s", sd_last_error());
    int same = 1;
    for (int k = 0; k < 224 * 224; k++)
        for (int ch = 0; ch < 3; ch++) same &= rgb[k * 3 + ch] == ((uint8_t *)im.pixels)[k * 4 + ch];
    CHECK(same, "224x224 input is not passed through unchanged");
    CHECK(px.data[0] == (float)(((float)((double)rgb[0] * (1.0 / 255.0)) - 0.48145466f) / 0.26862954f), "normalisation of pixel 0");
    tensor_free(&px);
    free(rgb);
    sd_image im16 = im;
    im16.depth = 16;
    im16.pixels = malloc(224 * 224 * 4 * 2);
    for (int k = 0; k < 224 * 224 * 4; k++) ((uint16_t *)im16.pixels)[k] = (uint16_t)(((uint8_t *)im.pixels)[k] * 256 + 77);
    sd_tensor px16, px8;
    CHECK(clip_preprocess(&im16, 224, &px16, NULL) == 0 && clip_preprocess(&im, 224, &px8, NULL) == 0, "16-bit preprocess");
    CHECK(!memcmp(px16.data, px8.data, tensor_numel(&px8) * sizeof(float)), "16-bit input differs from its high byte");
    tensor_free(&px16);
    tensor_free(&px8);
    free(im16.pixels);
    im.width = 1; im.height = 30000000;
    sd_clear_error();
    CHECK(clip_preprocess(&im, 224, &px, NULL) != 0, "a 1x30000000 image accepted");
    sd_clear_error();
    free(im.pixels);
}

/* ---------- real-size layouts from shared/spec (random F16 weights) ---------- */

static uint64_t hash_str(const char *s) {
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return h;
}

/* Deterministic values for a tensor, seeded by its (transformers) name: unit-gain linear
 * weights, norms near 1, small biases and embeddings. */

/* Write the rows of a spec TSV whose name starts with `prefix` as an F16 safetensors file
 * (I64 rows as arange). The RNG is seeded by the transformers name (the source column of
 * the LDM spec), so both layouts hold the same values. Returns the tensor count. */

/* The SD1.5 text encoder at real size: the cond_stage_model.* part of the LDM checkpoint spec
 * (loaded without a config: SD1.5's is assumed) on 77 tokens; with `full` also the
 * transformers layout, which must give the same bits. */
static void test_text_real_size(int full) {
    char tf[1024], ck[1024];
    snprintf(tf, sizeof tf, "%s", tmp_path("sd15_te.safetensors"));
    snprintf(ck, sizeof ck, "%s", tmp_path("sd15_ckpt_te.safetensors"));
    int n2 = write_spec_file("spec/sd15_checkpoint_ldm.tsv", "cond_stage_model.", ck);
    int n1 = full ? write_spec_file("spec/sd15_text_encoder_transformers.tsv", "text_model.", tf) : 197;
    CHECK(n1 == 197 && n2 == 197, "real-size text files: %d and %d tensors written (%s)", n1, n2, sd_last_error());
    sd_ctx c = make_ctx("fp32", SD_TEXT, "text_encoder", NULL);
    sd_clip_text *b = clip_text_load(ck, NULL, &c.pol);                    /* SD1.5 config assumed */
    CHECK(b != NULL, "load real-size checkpoint text encoder: %s", sd_last_error());
    sd_clip_text *a = NULL;
    if (full) {
        a = clip_text_load(tf, shared_path("spec/sd15_text_encoder_config.json"), &c.pol);
        CHECK(a != NULL, "load real-size transformers text encoder: %s", sd_last_error());
    }
    if (b) {
        int ids[77];
        ids[0] = 49406;
        for (int i = 1; i < 77; i++) ids[i] = i < 12 ? (int)((hash_str("tok") % 49000 + (uint64_t)i * 97) % 49406) : 49407;
        sd_tensor yb = clip_text_forward(b, &c, ids, 1, 77, 1);
        CHECK(yb.data && yb.shape[1] == 77 && yb.shape[2] == 768, "real-size text output shape");
        size_t n = yb.data ? tensor_numel(&yb) : 0, finite = 0;
        for (size_t i = 0; i < n; i++) finite += isfinite(yb.data[i]) != 0;
        double m = n ? max_abs(yb.data, n) : 0;
        fprintf(stderr, "  real-size SD1.5 text encoder (LDM layout, F16 file, fp32 run): [1,77,768], max|y| %.3g\n", m);
        CHECK(n && finite == n && m > 0.1 && m < 100, "real-size text output not sane (%zu/%zu finite, max %.3g)", finite, n, m);
        if (a) {
            sd_tensor ya = clip_text_forward(a, &c, ids, 1, 77, 1);
            CHECK(ya.data && n && !memcmp(ya.data, yb.data, n * sizeof(float)), "real-size: checkpoint and transformers layouts differ");
            tensor_free(&ya);
        }
        tensor_free(&yb);
    }
    clip_text_free(a);
    clip_text_free(b);
    remove(tf);
    remove(ck);
}

static void test_vision_real_size(void) {
    char vf[4096];
    snprintf(vf, sizeof vf, "%s", tmp_path("vit_h.safetensors"));
    int n = write_spec_file("spec/ip_adapter_image_encoder_transformers.tsv", "v", vf);
    CHECK(n == 3 + 2 + 32 * 16 + 2 + 1 + 1, "real-size vision file: %d tensors (%s)", n, sd_last_error());
    sd_ctx c = make_ctx("fp16", SD_VISION, "image_encoder", NULL);       /* fp16 weights in memory: 1.3 GB */
    sd_clip_vision *m = clip_vision_load(vf, NULL, &c.pol);                 /* ViT-H config assumed */
    CHECK(m != NULL, "load real-size ViT-H/14: %s", sd_last_error());
    if (m) {
        CHECK(clip_vision_image_size(m) == 224 && clip_vision_hidden_size(m) == 1280 && clip_vision_projection_dim(m) == 1024, "ViT-H sizes");
        sd_tensor px = tensor_new(4, 1, 3, 224, 224);
        for (size_t i = 0; i < tensor_numel(&px); i++) px.data[i] = (float)((i * 2654435761u) % 1000) / 400.0f - 1.25f;
        sd_tensor pen, last;
        sd_tensor e = clip_vision_forward(m, &c, &px, &pen, &last);
        CHECK(e.data && e.shape[1] == 1024 && pen.shape[1] == 257 && pen.shape[2] == 1280, "ViT-H output shapes");
        size_t fin = 0;
        for (int i = 0; e.data && i < 1024; i++) fin += isfinite(e.data[i]) != 0;
        fprintf(stderr, "  real-size ViT-H/14 (F16 file, fp16 run): image_embeds [1,1024], %zu finite, max %.3g\n", fin,
                e.data ? max_abs(e.data, 1024) : 0.0);
        CHECK(fin == 1024, "ViT-H: %zu of 1024 embeds finite", fin);
        tensor_free(&e);
        tensor_free(&pen);
        tensor_free(&last);
        tensor_free(&px);
        clip_vision_free(m);
    }
    remove(vf);
}

/* Copy a file (for folder layouts made in tmp). */
static int copy_file(const char *from, const char *to) {
    uint8_t *d;
    size_t n;
    if (sd_read_file(from, &d, &n)) return -1;
    FILE *f = fopen(to, "wb");
    int ok = f && fwrite(d, 1, n, f) == n;
    if (f) ok &= fclose(f) == 0;
    free(d);
    return ok ? 0 : -1;
}

/* A diffusers/h94-style folder (model.safetensors + config.json) and a file with its sibling
 * config.json load without --config. */
static void test_folder_layouts(void) {
    char dir[1024], cmd[2048];
    snprintf(dir, sizeof dir, "%s", tmp_path("text_encoder"));
    snprintf(cmd, sizeof cmd, "mkdir -p '%s' '%s'", dir, tmp_path("image_encoder"));
    CHECK(run_cmd("%s", cmd) == 0, "mkdir");
    char a[1100], b[1100];
    snprintf(a, sizeof a, "%s/model.safetensors", dir);
    snprintf(b, sizeof b, "%s/config.json", dir);
    CHECK(copy_file(GOLD("text_encoder.safetensors"), a) == 0 && copy_file(GOLD("text_encoder_config.json"), b) == 0, "copy text");
    sd_ctx c = make_ctx("fp32", SD_TEXT, "text_encoder", NULL);
    int n = 0;
    int *ids = golden_ids(&n);
    sd_clip_text *t1 = clip_text_load(dir, NULL, &c.pol), *t2 = clip_text_load(a, NULL, &c.pol);
    CHECK(t1 && t2, "text folder / sibling config: %s", sd_last_error());
    if (t1 && t2 && ids) {
        sd_tensor y1 = clip_text_forward(t1, &c, ids, 1, 77, 1), y2 = clip_text_forward(t2, &c, ids, 1, 77, 1);
        check_golden("text from a folder", &y1, GOLD("text_last_hidden_state.npy"), 1e-5);
        check_golden("text with sibling config.json", &y2, GOLD("text_last_hidden_state.npy"), 1e-5);
        tensor_free(&y1);
        tensor_free(&y2);
    }
    clip_text_free(t1);
    clip_text_free(t2);
    free(ids);
    snprintf(dir, sizeof dir, "%s", tmp_path("image_encoder"));
    snprintf(a, sizeof a, "%s/model.safetensors", dir);
    snprintf(b, sizeof b, "%s/config.json", dir);
    CHECK(copy_file(GOLD("image_encoder.safetensors"), a) == 0 && copy_file(GOLD("image_encoder_config.json"), b) == 0, "copy vision");
    sd_clip_vision *v = clip_vision_load(dir, NULL, &c.pol);
    CHECK(v != NULL, "vision folder: %s", sd_last_error());
    sd_tensor px = pixels_golden();
    if (v && px.data) {
        sd_tensor e = clip_vision_forward(v, &c, &px, NULL, NULL);
        check_golden("vision from a folder", &e, GOLD("vision_image_embeds.npy"), 1e-5);
        tensor_free(&e);
    }
    tensor_free(&px);
    clip_vision_free(v);
    /* a folder without config.json is refused with the file named */
    remove(b);
    sd_clear_error();
    v = clip_vision_load(dir, NULL, &c.pol);
    CHECK(!v && strstr(sd_last_error(), "config.json"), "vision folder without config accepted (%s)", sd_last_error());
    sd_clear_error();
}

/* ---------- command line ---------- */

static int file_exists(const char *p) {
    FILE *f = fopen(p, "rb");
    if (f) fclose(f);
    return f != NULL;
}

static void check_npy_output(const char *what, const char *path, const char *gold) {
    size_t n = 0, ng = 0;
    float *a = read_f32(path, &n), *g = read_f32(gold, &ng);
    CHECK(a && g && n == ng, "%s: output missing or wrong size", what);
    if (a && g && n == ng) {
        double d = max_diff(a, g, n), m = max_abs(g, n);
        CHECK(d <= 1e-5 * m, "%s: max|diff| %.3g (max %.3g)", what, d, m);
    }
    free(a);
    free(g);
}

/* A failing command: non-zero exit, one "sdref CMD: ..." line, no output file. */
static void check_fails(const char *what, const char *cmd, const char *out) {
    char err[4096];
    snprintf(err, sizeof err, "%s", tmp_path("err.txt"));
    remove(out);
    int rc = run_cmd("%s > /dev/null 2> %s", cmd, err);
    uint8_t *t = NULL;
    size_t len = 0;
    int has_msg = sd_read_file(err, &t, &len) == 0 && len > 8 && !strncmp((char *)t, "sdref ", 6) && strchr((char *)t, '\n') == (char *)t + len - 1;
    CHECK(rc != 0 && rc != 128 && has_msg && !file_exists(out), "%s: rc %d, message '%s', output %s", what, rc,
          t ? (char *)t : "", file_exists(out) ? "written" : "absent");
    free(t);
}

static void test_commands(void) {
    if (!file_exists("./sdref")) {
        CHECK(0, "./sdref not built (make sdref)");
        return;
    }
    char o[1024], pen[1024], te[1024], tc[1024], ie[1024], ic[1024];   /* tmp_path/shared_path reuse their buffers */
    snprintf(o, sizeof o, "%s", tmp_path("cli_out.npy"));
    snprintf(pen, sizeof pen, "%s", tmp_path("cli_pen.npy"));
    snprintf(te, sizeof te, "%s", GOLD("text_encoder.safetensors"));
    snprintf(tc, sizeof tc, "%s", GOLD("text_encoder_config.json"));
    snprintf(ie, sizeof ie, "%s", GOLD("image_encoder.safetensors"));
    snprintf(ic, sizeof ic, "%s", GOLD("image_encoder_config.json"));
    int rc = run_cmd("./sdref clip-text --model '%s' --config '%s' --ids '%s' --threads 2 -o '%s'", te, tc, GOLD("text_input_ids.npy"), o);
    CHECK(rc == 0, "clip-text --ids: exit %d", rc);
    check_npy_output("clip-text --ids", o, GOLD("text_last_hidden_state.npy"));
    remove(o);
    rc = run_cmd("./sdref clip-text --model '%s' --config '%s' --prompt 'a photo of a cat sitting on a red chair' --tokenizer '%s' -o '%s'",
                 GOLD("checkpoint.safetensors"), tc, shared_path("golden/tiny_a"), o);
    CHECK(rc == 0, "clip-text --prompt (checkpoint file): exit %d", rc);
    check_npy_output("clip-text --prompt", o, GOLD("text_last_hidden_state.npy"));
    remove(o);
    rc = run_cmd("./sdref clip-vision --model '%s' --config '%s' --pixels '%s' --penultimate '%s' -o '%s'", ie, ic,
                 GOLD("vision_pixel_values.npy"), pen, o);
    CHECK(rc == 0, "clip-vision --pixels: exit %d", rc);
    check_npy_output("clip-vision image_embeds", o, GOLD("vision_image_embeds.npy"));
    check_npy_output("clip-vision --penultimate", pen, GOLD("vision_hidden_states_penultimate.npy"));
    remove(o);
    remove(pen);
    rc = run_cmd("./sdref preprocess --image '%s' -o '%s'", shared_path("golden/clip_preprocess/large_900x600.png"), o);
    CHECK(rc == 0, "preprocess: exit %d", rc);
    check_npy_output("preprocess", o, shared_path("golden/clip_preprocess/large_900x600.pixel_values.npy"));
    remove(o);
    rc = run_cmd("./sdref clip-vision --model '%s' --config '%s' --image '%s' -o '%s'", ie, ic,
                 shared_path("golden/clip_preprocess/tiny_16x9.png"), o);
    CHECK(rc == 0 && file_exists(o), "clip-vision --image: exit %d", rc);
    remove(o);

    /* bad input */
    char cmd[8192], bad_ids[1024], f_ids[1024], junk[1024];
    snprintf(bad_ids, sizeof bad_ids, "%s", tmp_path("bad_ids.npy"));
    snprintf(f_ids, sizeof f_ids, "%s", tmp_path("float_ids.npy"));
    snprintf(junk, sizeof junk, "%s", tmp_path("junk.png"));
    int64_t sh[2] = { 1, 77 };
    int64_t v[77];
    for (int i = 0; i < 77; i++) v[i] = i == 3 ? 100000 : 1;
    npy_write(bad_ids, NPY_I64, 2, sh, v);
    float fv[77] = { 0 };
    npy_write(f_ids, NPY_F32, 2, sh, fv);
    FILE *f = fopen(junk, "wb");
    if (f) { fputs("not a png at all", f); fclose(f); }
    snprintf(cmd, sizeof cmd, "./sdref clip-text --model '%s' --config '%s' --ids '%s' -o '%s'", te, tc, bad_ids, o);
    check_fails("clip-text id out of range", cmd, o);
    snprintf(cmd, sizeof cmd, "./sdref clip-text --model '%s' --config '%s' --ids '%s' -o '%s'", te, tc, f_ids, o);
    check_fails("clip-text float ids", cmd, o);
    snprintf(cmd, sizeof cmd, "./sdref clip-text --model '%s' --config '%s' --ids '%s' --clip-skip 0 -o '%s'", te, tc, GOLD("text_input_ids.npy"), o);
    check_fails("clip-text --clip-skip 0", cmd, o);
    snprintf(cmd, sizeof cmd, "./sdref clip-text --model '%s' --config '%s' --ids '%s' --prompt x -o '%s'", te, tc, GOLD("text_input_ids.npy"), o);
    check_fails("clip-text --ids and --prompt", cmd, o);
    snprintf(cmd, sizeof cmd, "./sdref clip-text --model '%s' --config '%s' --ids '%s' --bogus -o '%s'", te, tc, GOLD("text_input_ids.npy"), o);
    check_fails("clip-text unknown flag", cmd, o);
    snprintf(cmd, sizeof cmd, "./sdref clip-text --model '%s' --ids '%s' -o '%s'", tmp_path("nonexistent.safetensors"), GOLD("text_input_ids.npy"), o);
    check_fails("clip-text missing model", cmd, o);
    snprintf(cmd, sizeof cmd, "./sdref clip-text --model '%s' --config '%s' --ids '%s' --precision fp17 -o '%s'", te, tc, GOLD("text_input_ids.npy"), o);
    check_fails("clip-text bad precision", cmd, o);
    snprintf(cmd, sizeof cmd, "./sdref clip-vision --model '%s' --config '%s' --pixels '%s' -o '%s'", ie, ic, shared_path("golden/clip_preprocess/tiny_16x9.pixel_values.npy"), o);
    check_fails("clip-vision 224 pixels into a 32 model", cmd, o);
    snprintf(cmd, sizeof cmd, "./sdref clip-vision --model '%s' --config '%s' --image '%s' -o '%s'", ie, ic, junk, o);
    check_fails("clip-vision bad png", cmd, o);
    snprintf(cmd, sizeof cmd, "./sdref clip-vision --model '%s' --config '%s' --pixels '%s' -o '%s'", te, tc, GOLD("vision_pixel_values.npy"), o);
    check_fails("clip-vision given the text encoder", cmd, o);
    snprintf(cmd, sizeof cmd, "./sdref preprocess --image '%s' -o '%s'", junk, o);
    check_fails("preprocess bad png", cmd, o);
    snprintf(cmd, sizeof cmd, "./sdref preprocess -o '%s'", o);
    check_fails("preprocess without --image", cmd, o);
}

void test_clip(void) {
    time_t t0 = time(NULL);
    test_text_golden();
    test_vision_golden();
    test_preprocess();
    test_folder_layouts();
    test_commands();
    time_t t1 = time(NULL);
    test_text_real_size(env_flag("SDREF_FULL"));
    time_t t2 = time(NULL);
    if (env_flag("SDREF_FULL")) test_vision_real_size();
    fprintf(stderr, "  clip timing: golden+cli %ds, real-size text %ds, real-size vision %ds\n", (int)(t1 - t0), (int)(t2 - t1),
            (int)(time(NULL) - t2));
}
