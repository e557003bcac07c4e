/* tools/random_vae.c — write a random-weight VAE with exactly the tensor names and shapes of a
 * spec table (shared/spec/sd15_vae_diffusers.tsv: "name dtype shape source" per line), and
 * optionally a random latent, to measure real-size speed and memory without downloading the
 * real weights. Deterministic (splitmix64). Not part of the build:
 *
 *   cc -O2 -std=c99 -I. tools/random_vae.c io.c fp16.c -o random_vae -lm
 *   ./random_vae ../shared/spec/sd15_vae_diffusers.tsv OUT.safetensors [--f16] [--latent LAT.npy H W]
 *
 * Weights: conv/linear uniform with standard deviation 1/sqrt(fan_in) (activations stay of
 * order one through the network), norm scales 1, biases uniform in [-0.01, 0.01]. */
#include "sdref.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rng_state = 0x5d3f0a11c2b9e871ull;

/* splitmix64: a fixed sequence on every platform */
static uint64_t next_u64(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* uniform in [-1, 1) */
static float uniform(void) { return (float)((double)(next_u64() >> 11) * (1.0 / 4503599627370496.0) - 1.0); }

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: random_vae SPEC.tsv OUT.safetensors [--f16] [--latent LAT.npy H W]\n");
        return 2;
    }
    int f16 = 0;
    const char *latent = NULL;
    int lh = 64, lw = 64;
    for (int i = 3; i < argc; i++) {
        if (!strcmp(argv[i], "--f16")) f16 = 1;
        else if (!strcmp(argv[i], "--latent") && i + 3 < argc) {
            latent = argv[i + 1];
            lh = atoi(argv[i + 2]);
            lw = atoi(argv[i + 3]);
            i += 3;
        } else {
            fprintf(stderr, "random_vae: unknown argument '%s'\n", argv[i]);
            return 2;
        }
    }
    uint8_t *text;
    size_t len;
    if (sd_read_file(argv[1], &text, &len) != 0) {
        fprintf(stderr, "random_vae: %s\n", sd_last_error());
        return 1;
    }
    st_writer w;
    st_writer_init(&w);
    size_t total = 0;
    int count = 0;
    for (char *line = strtok((char *)text, "\n"); line; line = strtok(NULL, "\n")) {
        char name[512], dtype[16], shape_text[128];
        if (line[0] == '#' || sscanf(line, "%511s %15s %127s", name, dtype, shape_text) != 3 || !strcmp(name, "name")) continue;
        int64_t shape[8];
        int ndim = 0;
        size_t n = 1;
        for (char *p = shape_text; *p && ndim < 8;) {
            shape[ndim] = strtoll(p, &p, 10);
            n *= (size_t)shape[ndim++];
            if (*p == ',') p++;
            else break;
        }
        float *x = sd_malloc(n * sizeof(float));
        int is_norm = strstr(name, "norm") != NULL;
        double fan_in = ndim > 1 ? (double)n / (double)shape[0] : 1.0;
        float scale = (float)(sqrt(3.0) / sqrt(fan_in));    /* uniform(-a, a) has std a / sqrt(3) */
        for (size_t i = 0; i < n; i++) {
            if (ends_with(name, ".bias")) x[i] = 0.01f * uniform();
            else if (is_norm) x[i] = 1.0f;
            else x[i] = scale * uniform();
        }
        if (f16) st_writer_add_f16(&w, name, ndim, shape, x);
        else st_writer_add_f32(&w, name, ndim, shape, x);
        free(x);
        total += n;
        count++;
    }
    free(text);
    int rc = st_writer_write(&w, argv[2]);
    st_writer_free(&w);
    if (rc != 0) {
        fprintf(stderr, "random_vae: %s\n", sd_last_error());
        return 1;
    }
    fprintf(stderr, "random_vae: %d tensors, %zu parameters -> %s\n", count, total, argv[2]);
    if (latent) {
        int64_t shape[4] = { 1, 4, lh, lw };
        size_t n = (size_t)4 * lh * lw;
        float *z = sd_malloc(n * sizeof(float));
        for (size_t i = 0; i < n; i++) z[i] = 3.0f * uniform();
        rc = npy_write(latent, NPY_F32, 4, shape, z);
        free(z);
        if (rc != 0) {
            fprintf(stderr, "random_vae: %s\n", sd_last_error());
            return 1;
        }
    }
    return 0;
}
