/* tests/bench.c — `make bench`: throughput of the operations at Stable Diffusion's sizes, under
 * the fp32 and fp16 policies, with 1 and 2 threads. Numbers depend on the machine: quote them
 * with the machine they ran on, or as ratios. */
#define _POSIX_C_SOURCE 200809L
#include "sdref.h"
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + t.tv_nsec * 1e-9;
}

static sd_tensor filled(int nd, int a, int b, int c, int d) {
    sd_tensor t = tensor_new(nd, a, b, c, d);
    for (size_t i = 0; i < tensor_numel(&t); i++) t.data[i] = (float)((i * 7919) % 1000) / 1000.0f - 0.5f;
    return t;
}

static sd_param param(int nd, int a, int b, int c, int d) {
    sd_param p;
    memset(&p, 0, sizeof p);
    p.ndim = nd;
    p.shape[0] = a; p.shape[1] = b; p.shape[2] = c; p.shape[3] = d;
    size_t n = param_numel(&p);
    float *v = sd_malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) v[i] = 0.01f * (float)((int)(i % 13) - 6);
    p.data = v;
    p.fmt = SD_F32;
    return p;
}

int main(void) {
    const char *pols[2] = { "fp32", "fp16" };
    printf("%-46s %-5s %7s %10s %10s\n", "operation (SD1.5 size)", "pol", "threads", "seconds", "GFLOP/s");
    for (int p = 0; p < 2; p++)
        for (int th = 1; th <= 2; th++) {
            sd_set_threads(th);
            sd_precision prec;
            sd_precision_parse(pols[p], &prec);
            sd_ctx c;
            memset(&c, 0, sizeof c);
            c.pol = prec.model[SD_UNET];
            int pad[4] = { 1, 1, 1, 1 };
            /* conv 320 -> 320, 3x3, at a 32x32 latent */
            sd_tensor x = filled(4, 1, 320, 32, 32);
            op_round_storage(&c, &x);
            sd_param w = param(4, 320, 320, 3, 3);
            double t0 = now();
            sd_tensor y = op_conv2d(&c, &x, &w, NULL, 1, pad);
            double t = now() - t0;
            printf("%-46s %-5s %7d %10.3f %10.2f\n", "conv2d 320->320 3x3 at 32x32", pols[p], th, t, 2.0 * 320 * 320 * 9 * 1024 / t / 1e9);
            tensor_free(&y);
            /* linear 320 -> 2560 (GEGLU) over 1024 tokens */
            sd_tensor tok = op_nchw_to_tokens(&x);
            sd_param lw = param(2, 2560, 320, 1, 1);
            t0 = now();
            y = op_linear(&c, &tok, &lw, NULL);
            t = now() - t0;
            printf("%-46s %-5s %7d %10.3f %10.2f\n", "linear 320->2560 over 1024 tokens", pols[p], th, t, 2.0 * 320 * 2560 * 1024 / t / 1e9);
            tensor_free(&y);
            /* self-attention, 8 heads of 40, 1024 tokens */
            t0 = now();
            y = op_attention(&c, &tok, &tok, &tok, 8, 0.158f, 0);
            t = now() - t0;
            printf("%-46s %-5s %7d %10.3f %10.2f\n", "attention 1024 tokens, 8 heads x 40", pols[p], th, t, 4.0 * 1024 * 1024 * 320 / t / 1e9);
            tensor_free(&y);
            /* group norm, 32 groups */
            t0 = now();
            y = op_group_norm(&c, &x, 32, 1e-5f, NULL, NULL);
            t = now() - t0;
            printf("%-46s %-5s %7d %10.3f %10s\n", "group_norm 320 channels at 32x32", pols[p], th, t, "-");
            tensor_free(&y);
            tensor_free(&tok);
            tensor_free(&x);
            param_free(&w);
            param_free(&lw);
        }
    return 0;
}
