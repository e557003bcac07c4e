/* tests/test_policy.c — precision specs: presets, per-model overrides, errors that list what is valid. */
#include "test.h"
#include <string.h>

static int same_policy(const sd_policy *a, sd_format w, sd_format s, sd_format acc, int tf32, int up) {
    return a->weights == w && a->storage == s && a->accum == acc && a->tf32_inputs == tf32 && a->upcast_attention == up;
}

void test_policy(void) {
    sd_precision p;
    CHECK(sd_precision_parse("fp32", &p) == 0, "fp32 parses");
    for (int m = 0; m < SD_MODEL_COUNT; m++) CHECK(same_policy(&p.model[m], SD_F32, SD_F32, SD_F32, 0, 1), "fp32 preset, model %d", m);
    CHECK(sd_precision_parse("fp16", &p) == 0 && same_policy(&p.model[SD_UNET], SD_F16, SD_F16, SD_F32, 0, 1) &&
          same_policy(&p.model[SD_VAE], SD_F16, SD_F16, SD_F32, 0, 1), "fp16 preset: fp16 weights and storage, fp32 accumulation");
    CHECK(sd_precision_parse("fp16-vae32", &p) == 0 && same_policy(&p.model[SD_UNET], SD_F16, SD_F16, SD_F32, 0, 1) &&
          same_policy(&p.model[SD_VAE], SD_F32, SD_F32, SD_F32, 0, 1), "fp16-vae32: VAE in fp32, the rest fp16");
    CHECK(sd_precision_parse("bf16", &p) == 0 && same_policy(&p.model[SD_TEXT], SD_BF16, SD_BF16, SD_F32, 0, 1), "bf16 preset");
    CHECK(sd_precision_parse("tf32", &p) == 0 && same_policy(&p.model[SD_UNET], SD_F32, SD_F32, SD_F32, 1, 1), "tf32 preset");
    CHECK(sd_precision_parse("fp16-acc16", &p) == 0 && same_policy(&p.model[SD_UNET], SD_F16, SD_F16, SD_F16, 0, 0), "fp16-acc16 preset");
    CHECK(sd_precision_parse("fp8", &p) == 0 && same_policy(&p.model[SD_UNET], SD_E4M3, SD_F16, SD_F32, 0, 1), "fp8 preset: E4M3 weights, fp16 compute");
    CHECK(sd_precision_parse("unet=fp16,vae=fp32,vae.accum=fp16,unet.weights=fp8e4m3", &p) == 0, "override spec parses");
    CHECK(same_policy(&p.model[SD_UNET], SD_E4M3, SD_F16, SD_F32, 0, 1), "unet=fp16 then unet.weights=fp8e4m3");
    CHECK(same_policy(&p.model[SD_VAE], SD_F32, SD_F32, SD_F16, 0, 1), "vae=fp32 then vae.accum=fp16");
    CHECK(same_policy(&p.model[SD_TEXT], SD_F32, SD_F32, SD_F32, 0, 1), "untouched models stay fp32");
    CHECK(sd_precision_parse("fp16,text=fp32,all.tf32=1", &p) == 0 && same_policy(&p.model[SD_TEXT], SD_F32, SD_F32, SD_F32, 1, 1) &&
          same_policy(&p.model[SD_IPADAPTER], SD_F16, SD_F16, SD_F32, 1, 1), "a preset, then overrides, then all.FIELD");
    CHECK(sd_precision_parse("vision.upcast=0,ipadapter.storage=bf16", &p) == 0 && p.model[SD_VISION].upcast_attention == 0 &&
          p.model[SD_IPADAPTER].storage == SD_BF16, "upcast and storage fields");
    const char *bad[] = { "fp17", "unet=fp17", "uent=fp16", "unet.weigths=fp16", "vae.accum=int8", "unet.tf32=maybe", "=fp16" };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        sd_clear_error();
        int rc = sd_precision_parse(bad[i], &p);
        const char *e = sd_last_error();
        CHECK(rc == -1 && strstr(e, bad[i]) && strstr(e, "fp16-vae32") && strstr(e, "fp8e4m3") && strstr(e, "unet"),
              "'%s' is refused with a message listing what is valid (got: %s)", bad[i], e);
    }
    sd_clear_error();
    char buf[128];
    sd_precision_parse("fp16", &p);
    sd_policy_describe(&p.model[SD_UNET], buf, sizeof buf);
    CHECK(strstr(buf, "weights=fp16") && strstr(buf, "accum=fp32"), "policy description: %s", buf);
}
