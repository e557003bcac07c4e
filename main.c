/* main.c — the command line: `sdref COMMAND [options]`. Each command lives in the file of its
 * subsystem (cmd_vae_decode in vae.c, ...); this file dispatches and parses common options. */
#include "sdref.h"
#include <stdlib.h>
#include <string.h>

typedef struct command { const char *name; int (*fn)(int, char **); const char *usage; } command;

static const command commands[] = {
    { "demo", cmd_demo, "[--out DIR] [--threads N]   (no files needed: a small model made on the spot, fp32 vs fp16)" },
    { "vae-decode", cmd_vae_decode,
      "--model PATH [--config JSON] --latent IN.npy [--scaled] [--precision SPEC] [--threads N] [--trace T.safetensors] "
      "[--shadow SPEC [--overflow-report R.json]] [--nan-check] [--nan-fallback SPEC] -o OUT.npy|OUT.png" },
    { "vae-encode", cmd_vae_encode,
      "--model PATH [--config JSON] --image IN.npy|IN.png [--precision SPEC] [--threads N] [--trace T.safetensors] -o MEAN.npy "
      "[--logvar LOGVAR.npy]" },
    { "decode-png", cmd_decode_png, "IN.png -o OUT.npy" },
    { "unet", cmd_unet,
      "--model PATH [--config JSON] --sample IN.npy --timestep T --context CTX.npy [--precision SPEC] [--threads N] "
      "[--trace TRACE.safetensors] [--ip-adapter FILE (--ip-embeds E.npy | --ip-hidden HS.npy | --ip-image IN.png "
      "--image-encoder PATH [--image-encoder-config JSON]) [--ip-scale S] [--ip-tokens-out T.npy]] -o OUT.npy" },
    { "tokenize", cmd_tokenize, "--tokenizer DIR|FILE --prompt TEXT [--raw]" },
    { "clip-text", cmd_clip_text,
      "--model PATH [--config JSON] (--ids IDS.npy | --prompt TEXT --tokenizer DIR|FILE) [--clip-skip N] "
      "[--precision SPEC] [--threads N] [--trace T.safetensors] -o OUT.npy" },
    { "clip-vision", cmd_clip_vision,
      "--model PATH [--config JSON] (--pixels PX.npy | --image IN.png) [--penultimate HS.npy] [--last-hidden LH.npy] "
      "[--precision SPEC] [--threads N] [--trace T.safetensors] -o EMBEDS.npy" },
    { "preprocess", cmd_preprocess, "--image IN.png [--size S] [--resized-out RGB.npy] -o PIXELS.npy" },
    { "txt2img", cmd_txt2img,
      "--model PATH (--prompt TEXT [--negative TEXT] [--tokenizer PATH] | --ids-cond IDS.npy --ids-uncond IDS.npy) "
      "[--noise N.npy | --seed S [--rng cpu|cuda]] [--steps N] [--cfg G] [--sampler ddim|euler|euler_a|dpmpp_2m|dpmpp_2m_karras] "
      "[--width W --height H] [--vae PATH] [--clip-skip N] [--ip-adapter F (--ip-embeds E.npy | --ip-image IMG --image-encoder PATH) "
      "[--ip-scale S]] [--precision SPEC] [--threads N] [--trace T.safetensors [--trace-stats-only] [--trace-filter GLOB]] "
      "[--shadow SPEC [--overflow-report R.json]] [--nan-check] [--nan-fallback SPEC] "
      "[-o OUT.png] [--latent-out LAT.npy] [--image-out IMG.npy] [--quiet]" },
    { "img2img", cmd_img2img, "(as txt2img) --init IMG.png --strength S" },
    { "compare", cmd_compare,
      "A B [--atol X] [--rtol R] [--ulps N] [--json OUT.json] [--quiet]   (.npy, .png or traces .safetensors; exit 1 beyond tolerance)" },
    { "report", cmd_report,
      "(txt2img/img2img options) --precision A --vs B [--layers GLOB] [-o REPORT.html]   (one job under two precisions, "
      "as one self-contained HTML page)" },
};

static void usage(FILE *f) {
    fprintf(f, "sdref %s — Stable Diffusion reference inference, bit-identical everywhere\n\n", SDREF_VERSION);
    fprintf(f, "usage: sdref COMMAND [options]\n\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(f, "  sdref %s %s\n", commands[i].name, commands[i].usage);
    fprintf(f, "\nPrecision SPEC: a preset (fp32 fp16 fp16-vae32 bf16 tf32 fp16-acc16 fp8) or overrides such as\n"
               "  unet=fp16,vae=fp32,vae.accum=fp16,unet.weights=fp8e4m3\n");
}

int main(int argc, char **argv) {
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "help") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "--version") == 0) {
        printf("sdref %s\n", SDREF_VERSION);
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++) {
        if (strcmp(argv[1], commands[i].name) != 0) continue;
        for (int k = 2; k < argc; k++)
            if (strcmp(argv[k], "--help") == 0 || strcmp(argv[k], "-h") == 0) {
                printf("usage: sdref %s %s\n", commands[i].name, commands[i].usage);
                return 0;
            }
        int rc = commands[i].fn(argc - 1, argv + 1);
        if (rc != 0) {
            const char *e = sd_last_error();   /* no message: a verdict (compare beyond tolerance), not an error */
            if (e[0]) fprintf(stderr, "sdref %s: %s\n", commands[i].name, e);
            return rc > 0 ? rc : 1;
        }
        return 0;
    }
    fprintf(stderr, "sdref: unknown command '%s' (sdref --help lists them)\n", argv[1]);
    return 2;
}
