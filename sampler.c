/* sampler.c — torch-compatible random numbers, SD's noise schedule and the samplers
 * (DDIM, Euler, Euler ancestral, DPM++ 2M) as diffusers computes them.
 *
 * Bits matter here: a sampler step that differs by an ulp from diffusers' makes the whole image
 * differ. So each formula follows diffusers operation by operation, in the precision diffusers
 * computes it: float32 where diffusers uses float32 torch tensors (the per-step arithmetic, the
 * alphas_cumprod table, the sigma table), float64 where it uses numpy (timestep lists, sigma
 * interpolation, Karras sigmas). Every float32 operation below is written as its own statement
 * or cast so that each result is rounded where torch rounds it (-ffp-contract=off does the rest). */
#include "sdref.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ======================================================================================
 * torch's CPU generator: mt19937 (at::mt19937, aten/src/ATen/core/MT19937RNGEngine.h)
 * ====================================================================================== */

/* torch seeds with the low 32 bits only (state_[0] = seed & 0xffffffff) and the usual
 * Knuth recurrence state[j] = 1812433253 * (state[j-1] ^ (state[j-1] >> 30)) + j. */
static void mt_seed(sd_rng *r, uint64_t seed) {
    r->mt[0] = (uint32_t)(seed & 0xffffffffu);
    for (uint32_t j = 1; j < 624; j++)
        r->mt[j] = 1812433253u * (r->mt[j - 1] ^ (r->mt[j - 1] >> 30)) + j;
    r->mt_left = 1;
    r->mt_next = 0;
}

/* Regenerate the 624 words (Matsumoto & Nishimura 1998). */
static void mt_twist(sd_rng *r) {
    for (int k = 0; k < 624; k++) {
        uint32_t y = (r->mt[k] & 0x80000000u) | (r->mt[(k + 1) % 624] & 0x7fffffffu);
        r->mt[k] = r->mt[(k + 397) % 624] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
    }
    r->mt_left = 624;
    r->mt_next = 0;
}

/* One tempered 32-bit output (torch: CPUGeneratorImpl::random()). */
static uint32_t mt_next(sd_rng *r) {
    if (--r->mt_left == 0) mt_twist(r);
    uint32_t y = r->mt[r->mt_next++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
}

/* at::uniform_real_distribution<float>: the low 24 bits of one output times 2^-24 (exact). */
static float uniform_f32(sd_rng *r) { return (float)(mt_next(r) & 0xffffffu) * (1.0f / 16777216.0f); }

/* at::uniform_real_distribution<double>: random64() = (first << 32) | second, low 53 bits * 2^-53. */
static double uniform_f64(sd_rng *r) {
    uint64_t hi = mt_next(r), lo = mt_next(r);
    return (double)(((hi << 32) | lo) & ((1ull << 53) - 1)) * (1.0 / 9007199254740992.0);
}

/* at::normal_distribution<double> (aten/src/ATen/core/DistributionsHelper.h): Box-Muller on two
 * uniforms, u1 for the angle and u2 for the radius; returns r*cos and keeps r*sin in the
 * generator for the next call. torch uses this for fewer than 16 values. */
static double normal_f64(sd_rng *r) {
    if (r->has_cached) { r->has_cached = 0; return r->cached; }
    double u1 = uniform_f64(r), u2 = uniform_f64(r);
    double radius = sqrt(-2.0 * sd_log(1.0 - u2));
    double theta = 2.0 * 3.14159265358979323846 * u1;
    r->cached = radius * sd_sin(theta);
    r->has_cached = 1;
    return radius * sd_cos(theta);
}

/* ---- torch's vectorised Box-Muller (normal_fill_16_AVX2, aten/src/ATen/native/cpu/
 * DistributionTemplates.h) with log256_ps / sincos256_ps of avx_mathfun.h (Pommier's port of the
 * Cephes logf/sinf/cosf). torch's x86 wheels are built by GCC, which fuses each multiply feeding
 * an add into an FMA; the fmaf calls below sit exactly where those fusions are, which is what
 * makes the result bit-exact (measured against torch's own output, tests/test_sampler.c). */

/* Cephes logf: x = 2^e * m, m in [sqrt(1/2), sqrt(2)), log(1+t) by a degree-9 polynomial. */
static float cephes_logf(float x) {
    uint32_t b = sd_f32_bits(x);
    float e = (float)((int)(b >> 23) - 127);
    e = e + 1.0f;
    float m = sd_f32_from_bits((b & ~0x7f800000u) | 0x3f000000u);   /* mantissa in [0.5, 1) */
    float t;
    if (m < 0.707106781186547524f) { t = (m - 1.0f) + m; e = e - 1.0f; }
    else t = m - 1.0f;
    static const float p[9] = { 7.0376836292E-2f, -1.1514610310E-1f, 1.1676998740E-1f,
                                -1.2420140846E-1f, 1.4249322787E-1f, -1.6668057665E-1f,
                                2.0000714765E-1f, -2.4999993993E-1f, 3.3333331174E-1f };
    float z = t * t;
    float y = p[0];
    for (int k = 1; k < 9; k++) y = fmaf(y, t, p[k]);
    y = y * t;
    y = fmaf(y, z, e * -2.12194440e-4f);
    y = fmaf(-z, 0.5f, y);
    float s = t + y;
    return fmaf(e, 0.693359375f, s);
}

/* Cephes sinf and cosf together: j = nearest even octant, x reduced by pi/4 * j in three parts. */
static void cephes_sincosf(float x, float *sinx, float *cosx) {
    int neg = x < 0.0f;
    float ax = fabsf(x);
    int j = (int)(ax * 1.27323954473516f);     /* truncation, as cvttps */
    j = (j + 1) & ~1;
    float y = (float)j;
    int sin_flip = ((j & 4) != 0) ^ neg;
    int cos_flip = ((~(j - 2)) & 4) != 0;
    int sin_poly = (j & 2) == 0;                 /* octant pair where sin uses the sine polynomial */
    ax = fmaf(y, -0.78515625f, ax);
    ax = fmaf(y, -2.4187564849853515625e-4f, ax);
    ax = fmaf(y, -3.77489497744594108e-8f, ax);
    float z = ax * ax;
    float c = 2.443315711809948E-005f;           /* cos polynomial */
    c = fmaf(c, z, -1.388731625493765E-003f);
    c = fmaf(c, z, 4.166664568298827E-002f);
    c = c * z;
    c = fmaf(c, z, -(z * 0.5f));
    c = c + 1.0f;
    float s = -1.9515295891E-4f;                 /* sin polynomial */
    s = fmaf(s, z, 8.3321608736E-3f);
    s = fmaf(s, z, -1.6666654611E-1f);
    s = s * z;
    s = fmaf(s, ax, ax);
    float sv = sin_poly ? s : c, cv = sin_poly ? c : s;
    *sinx = sin_flip ? -sv : sv;
    *cosx = cos_flip ? -cv : cv;
}

/* 16 uniforms -> 16 normals: the first 8 give radius = sqrt(-2 log(1-u)), the next 8 the angle
 * 2 pi u; out[j] = radius cos, out[j+8] = radius sin, all in float32. */
static void box_muller_16(float *d) {
    const float two_pi = (float)(2.0 * 3.14159265358979323846);
    for (int j = 0; j < 8; j++) {
        float u1 = 1.0f - d[j];
        float radius = sqrtf(-2.0f * cephes_logf(u1));
        float theta = two_pi * d[j + 8];
        float s, c;
        cephes_sincosf(theta, &s, &c);
        d[j] = radius * c + 0.0f;            /* torch: fmadd(n, std=1, mean=0) */
        d[j + 8] = radius * s + 0.0f;
    }
}

/* torch.randn(n) on the CPU generator (normal_kernel): >= 16 values: all uniforms first, Box-Muller
 * in blocks of 16, and when n % 16 != 0 the last 16 are drawn afresh and recomputed; fewer than
 * 16: one normal_distribution<double> per value, in order. */
static void randn_cpu(sd_rng *r, float *out, size_t n) {
    if (n < 16) {
        for (size_t i = 0; i < n; i++) out[i] = (float)normal_f64(r);
        return;
    }
    for (size_t i = 0; i < n; i++) out[i] = uniform_f32(r);
    for (size_t i = 0; i + 16 <= n; i += 16) box_muller_16(out + i);
    if (n % 16 != 0) {
        float *tail = out + n - 16;
        for (int i = 0; i < 16; i++) tail[i] = uniform_f32(r);
        box_muller_16(tail);
    }
}

/* ======================================================================================
 * CUDA-style Philox 4x32-10 (Salmon et al. 2011), as A1111's modules/rng_philox.py uses it:
 * value i of draw k has counter (k, 0, i, 0), key (seed low, seed high); the first two output
 * words make one normal by Box-Muller (curand's _curand_box_muller, sine half) in float32.
 * ====================================================================================== */

static void philox_4x32_10(uint32_t ctr[4], uint32_t k0, uint32_t k1) {
    for (int round = 0; round < 10; round++) {
        uint64_t p0 = (uint64_t)ctr[0] * 0xD2511F53u, p1 = (uint64_t)ctr[2] * 0xCD9E8D57u;
        uint32_t c1 = ctr[1], c3 = ctr[3];
        ctr[0] = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
        ctr[1] = (uint32_t)p1;
        ctr[2] = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        ctr[3] = (uint32_t)p0;
        k0 += 0x9E3779B9u;   /* Weyl key schedule */
        k1 += 0xBB67AE85u;
    }
}

static void randn_philox(sd_rng *r, float *out, size_t n) {
    const float inv32 = 2.3283064365386963e-10f;              /* 2^-32 */
    const float inv32_2pi = (float)(6.283185307179586 / 4294967296.0);
    for (size_t i = 0; i < n; i++) {
        uint32_t c[4] = { r->offset, 0, (uint32_t)i, 0 };
        philox_4x32_10(c, (uint32_t)r->seed, (uint32_t)(r->seed >> 32));
        float u = (float)c[0] * inv32 + inv32 * 0.5f;           /* (0, 1] */
        float v = (float)c[1] * inv32_2pi + inv32_2pi * 0.5f;   /* (0, 2 pi] */
        float radius = sqrtf(-2.0f * sd_logf(u));
        out[i] = radius * sd_sinf(v);
    }
    r->offset++;
}

void sd_rng_init(sd_rng *r, sd_rng_kind kind, uint64_t seed) {
    memset(r, 0, sizeof *r);
    r->kind = kind;
    r->seed = seed;
    if (kind == SD_RNG_CPU) mt_seed(r, seed);
}

void sd_rng_randn(sd_rng *r, float *out, size_t n) {
    if (r->kind == SD_RNG_CPU) randn_cpu(r, out, n);
    else randn_philox(r, out, n);
}

void sd_randn(sd_rng_kind kind, uint64_t seed, float *out, size_t n) {
    sd_rng r;
    sd_rng_init(&r, kind, seed);
    sd_rng_randn(&r, out, n);
}

/* ======================================================================================
 * The schedule: betas -> alphas_cumprod, exactly as diffusers builds its float32 tensors.
 * ====================================================================================== */

/* torch.linspace(start, end, n, dtype=float32) as torch 1.13 computes it on x86 (aten/src/ATen/
 * native/cpu/RangeFactoriesKernel.cpp, vectorised with AVX2): step = (end - start) / (n - 1) in
 * double; blocks of 8 values, two blocks per loop turn, each block from a base rounded to float —
 * float(start + step*i) in the first half, float(end - step*(n-1-i)) in the second — its values
 * float(base + k*step); the values after the last whole pair of blocks one by one from the same
 * two formulas. (This reproduces the golden diffusers run bit for bit; later torch versions
 * compute step in float without blocks, which moves some betas by an ulp.) */
static void torch_linspace_f32(float start, float end, int n, float *out) {
    double step = n > 1 ? ((double)end - (double)start) / (double)(n - 1) : 0.0;
    int halfway = n / 2, i = 0;
    for (; i <= n - 16; i += 16) {
        for (int b = i; b < i + 16; b += 8) {
            float base = b < halfway ? (float)(start + step * b) : (float)(end - step * (n - b - 1));
            for (int k = 0; k < 8; k++) out[b + k] = (float)((double)base + k * step);
        }
    }
    for (; i < n; i++) out[i] = i < halfway ? (float)(start + step * i) : (float)(end - step * (n - i - 1));
}

/* diffusers DDPM/DDIM/Euler/DPM __init__: scaled_linear betas = linspace(sqrt(b0), sqrt(b1), T)^2
 * (torch pow with exponent 2 is x*x); linear betas = linspace(b0, b1, T); alphas = 1 - betas;
 * alphas_cumprod = torch.cumprod(alphas) — on the CPU torch accumulates a float cumprod in double
 * (acc_type<float> = double) and rounds each partial product to float. */
static void build_alphas_cumprod(const sd_sched_config *c, float *ac) {
    int T = c->num_train_timesteps;
    float *betas = sd_malloc((size_t)T * sizeof(float));
    if (c->scaled_linear) {
        torch_linspace_f32((float)sqrt(c->beta_start), (float)sqrt(c->beta_end), T, betas);
        for (int t = 0; t < T; t++) betas[t] = betas[t] * betas[t];
    } else {
        torch_linspace_f32((float)c->beta_start, (float)c->beta_end, T, betas);
    }
    double prod = 1.0;
    for (int t = 0; t < T; t++) {
        float alpha = 1.0f - betas[t];
        prod *= (double)alpha;
        ac[t] = (float)prod;
    }
    free(betas);
}

void sched_config_default(sd_sched_config *c) {
    memset(c, 0, sizeof *c);
    c->num_train_timesteps = 1000;
    c->beta_start = 0.00085;
    c->beta_end = 0.012;
    c->scaled_linear = 1;
    c->prediction = SD_PRED_EPSILON;
    c->spacing = SD_SPACING_LEADING;
    c->steps_offset = 1;
    c->set_alpha_to_one = 0;
    c->clip_sample = 0;
    c->clip_sample_range = 1.0f;
    c->karras = 0;
    c->eta = 0.0f;
}

int sched_config_load(sd_sched_config *c, const char *path) {
    sd_json j;
    if (json_parse_file(path, &j) != 0) return -1;
    int rc = -1;
    if (j.type != JSON_OBJECT) { sd_error("%s: not a JSON object", path); goto done; }
    c->num_train_timesteps = json_int(&j, "num_train_timesteps", c->num_train_timesteps);
    c->beta_start = json_num(&j, "beta_start", c->beta_start);
    c->beta_end = json_num(&j, "beta_end", c->beta_end);
    c->steps_offset = json_int(&j, "steps_offset", c->steps_offset);
    c->set_alpha_to_one = json_bool(&j, "set_alpha_to_one", c->set_alpha_to_one);
    c->clip_sample = json_bool(&j, "clip_sample", c->clip_sample);
    c->clip_sample_range = (float)json_num(&j, "clip_sample_range", c->clip_sample_range);
    c->karras = json_bool(&j, "use_karras_sigmas", c->karras);
    const char *bs = json_str(&j, "beta_schedule", c->scaled_linear ? "scaled_linear" : "linear");
    if (!strcmp(bs, "scaled_linear")) c->scaled_linear = 1;
    else if (!strcmp(bs, "linear")) c->scaled_linear = 0;
    else { sd_error("%s: unsupported beta_schedule \"%s\"", path, bs); goto done; }
    const char *pt = json_str(&j, "prediction_type", "epsilon");
    if (!strcmp(pt, "epsilon")) c->prediction = SD_PRED_EPSILON;
    else if (!strcmp(pt, "v_prediction")) c->prediction = SD_PRED_V;
    else if (!strcmp(pt, "sample")) c->prediction = SD_PRED_SAMPLE;
    else { sd_error("%s: unsupported prediction_type \"%s\"", path, pt); goto done; }
    const char *sp = json_str(&j, "timestep_spacing", "leading");
    if (!strcmp(sp, "leading")) c->spacing = SD_SPACING_LEADING;
    else if (!strcmp(sp, "trailing")) c->spacing = SD_SPACING_TRAILING;
    else if (!strcmp(sp, "linspace")) c->spacing = SD_SPACING_LINSPACE;
    else { sd_error("%s: unsupported timestep_spacing \"%s\"", path, sp); goto done; }
    const sd_json *tb = json_get(&j, "trained_betas");
    if (tb && tb->type != JSON_NULL) { sd_error("%s: trained_betas are not supported", path); goto done; }
    if (json_bool(&j, "thresholding", 0)) { sd_error("%s: thresholding is not supported", path); goto done; }
    if (json_bool(&j, "rescale_betas_zero_snr", 0)) {
        sd_error("%s: rescale_betas_zero_snr is not supported", path); goto done;
    }
    if (c->num_train_timesteps < 2 || c->num_train_timesteps > 100000 || !(c->beta_start > 0) ||
        !(c->beta_end > c->beta_start) || !(c->beta_end < 1) || c->steps_offset < 0 ||
        c->steps_offset >= c->num_train_timesteps) {
        sd_error("%s: impossible schedule values", path); goto done;
    }
    rc = 0;
done:
    json_free(&j);
    return rc;
}

int sched_parse_sampler(const char *name, sd_sampler_kind *kind, int *karras) {
    static const struct { const char *name; sd_sampler_kind kind; int karras; } names[] = {
        { "ddim", SD_DDIM, 0 }, { "euler", SD_EULER, 0 }, { "euler_a", SD_EULER_A, 0 },
        { "dpmpp_2m", SD_DPMPP_2M, 0 }, { "dpmpp_2m_karras", SD_DPMPP_2M, 1 } };
    for (size_t k = 0; k < sizeof names / sizeof names[0]; k++)
        if (!strcmp(name, names[k].name)) { *kind = names[k].kind; *karras = names[k].karras; return 0; }
    sd_error("unknown sampler \"%s\" (ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras)", name);
    return -1;
}

/* ======================================================================================
 * The scheduler object: timesteps, sigmas, and the per-step state of DPM++ 2M.
 * ====================================================================================== */

struct sd_scheduler {
    sd_sched_config cfg;
    sd_sampler_kind kind;
    int steps;
    float *alphas_cumprod;      /* [T] float32 */
    float final_alpha_cumprod;  /* DDIM: 1 or alphas_cumprod[0] */
    int *t_int;                 /* [steps] integer timesteps (DDIM) */
    float *timesteps;           /* [steps] as given to the UNet (float32) */
    float *sigmas;              /* [steps + 1] float32 (Euler, Euler a, DPM++ 2M) */
    float init_sigma;
    float *prev_x0;             /* DPM++ 2M: the previous step's x0 prediction */
    size_t prev_n;
    int have_prev;
};

/* numpy round(): half to even. */
static double round_half_even(double x) {
    double f = floor(x), d = x - f;
    if (d > 0.5) return f + 1.0;
    if (d < 0.5) return f;
    return fmod(f, 2.0) == 0.0 ? f : f + 1.0;
}

/* np.linspace(start, stop, n)[i] (endpoint included): i * ((stop - start) / (n - 1)) + start,
 * the last value exactly stop. */
static double np_linspace(double start, double stop, int n, int i) {
    if (n == 1) return start;
    if (i == n - 1) return stop;
    return (double)i * ((stop - start) / (double)(n - 1)) + start;
}

/* The discrete timestep list of diffusers' set_timesteps (DDIMScheduler, EulerDiscreteScheduler):
 * linspace: linspace(0, T-1, n) reversed; leading: arange(n) * (T // n) reversed + steps_offset;
 * trailing: arange(T, 0, -T/n) rounded - 1. `rounded` = 0 keeps linspace's fractions (Euler). */
static void discrete_timesteps(const sd_sched_config *c, int n, int rounded, double *t) {
    int T = c->num_train_timesteps;
    for (int i = 0; i < n; i++) {
        double v;
        if (c->spacing == SD_SPACING_LINSPACE) {
            v = np_linspace(0.0, (double)(T - 1), n, n - 1 - i);
            if (rounded) v = round_half_even(v);
        } else if (c->spacing == SD_SPACING_LEADING) {
            v = (double)((n - 1 - i) * (T / n) + c->steps_offset);
        } else {
            v = round_half_even((double)T - (double)i * ((double)T / (double)n)) - 1.0;
        }
        t[i] = v;
    }
}

/* DPMSolverMultistepScheduler.set_timesteps: the same spacings over n + 1 points with the last
 * (t = 0) dropped for linspace and leading (last_timestep = T: lambda_min_clipped = -inf). */
static void dpm_timesteps(const sd_sched_config *c, int n, double *t) {
    int T = c->num_train_timesteps;
    for (int i = 0; i < n; i++) {
        double v;
        if (c->spacing == SD_SPACING_LINSPACE)
            v = round_half_even(np_linspace(0.0, (double)(T - 1), n + 1, n - i));
        else if (c->spacing == SD_SPACING_LEADING)
            v = (double)((n - i) * (T / (n + 1)) + c->steps_offset);
        else
            v = round_half_even((double)T - (double)i * ((double)T / (double)n)) - 1.0;
        t[i] = v;
    }
}

/* The full sigma table of Euler/DPM: ((1 - ac) / ac) ** 0.5 on the float32 tensor. */
static float sigma_of_ac(float ac) { return sqrtf((1.0f - ac) / ac); }

/* np.interp(x, arange(T), table) in float64. */
static double interp_sigma(const float *table, int T, double x) {
    if (x <= 0.0) return table[0];
    if (x >= (double)(T - 1)) return table[T - 1];
    int j = (int)floor(x);
    double slope = ((double)table[j + 1] - (double)table[j]) / 1.0;
    return slope * (x - (double)j) + (double)table[j];
}

/* Karras et al. 2022 (EDM), eq. 5 with rho = 7; diffusers' _convert_to_karras in float64. */
static double karras_sigma(double sigma_min, double sigma_max, int n, int i) {
    double ramp = np_linspace(0.0, 1.0, n, i);
    double min_inv = sd_pow(sigma_min, 1.0 / 7.0), max_inv = sd_pow(sigma_max, 1.0 / 7.0);
    return sd_pow(max_inv + ramp * (min_inv - max_inv), 7.0);
}

/* diffusers' _sigma_to_t: interpolate log sigma in the table of log sigmas (numpy float32 log of
 * the float32 sigmas; ours is the correctly rounded float of sd_log). */
static double sigma_to_t(const float *log_sigmas, int T, double sigma) {
    double ls = sd_log(sigma > 1e-10 ? sigma : 1e-10);
    int low = 0;
    for (int k = 0; k < T; k++) if (ls - (double)log_sigmas[k] >= 0.0) low = k;
    if (low > T - 2) low = T - 2;
    double lo = log_sigmas[low], hi = log_sigmas[low + 1];
    double w = (lo - ls) / (lo - hi);
    if (w < 0.0) w = 0.0;
    if (w > 1.0) w = 1.0;
    return (1.0 - w) * (double)low + w * (double)(low + 1);
}

sd_scheduler *sched_new(const sd_sched_config *cfg, sd_sampler_kind kind, int steps) {
    int T = cfg->num_train_timesteps;
    if (steps < 1 || steps > T) { sd_error("steps must be between 1 and %d (got %d)", T, steps); return NULL; }
    sd_scheduler *s = sd_calloc(1, sizeof *s);
    s->cfg = *cfg;
    s->kind = kind;
    s->steps = steps;
    s->alphas_cumprod = sd_malloc((size_t)T * sizeof(float));
    build_alphas_cumprod(cfg, s->alphas_cumprod);
    s->timesteps = sd_malloc((size_t)steps * sizeof(float));
    s->t_int = sd_malloc((size_t)steps * sizeof(int));
    double *t = sd_malloc((size_t)(steps + 1) * sizeof(double));
    s->init_sigma = 1.0f;

    if (kind == SD_DDIM) {
        /* DDIMScheduler (Song et al. 2020, "Denoising Diffusion Implicit Models"). */
        s->final_alpha_cumprod = cfg->set_alpha_to_one ? 1.0f : s->alphas_cumprod[0];
        discrete_timesteps(cfg, steps, 1, t);
        for (int i = 0; i < steps; i++) {
            if (t[i] < 0 || t[i] > T - 1) { sd_error("timestep %g out of range", t[i]); free(t); sched_free(s); return NULL; }
            s->t_int[i] = (int)t[i];
            s->timesteps[i] = (float)t[i];
        }
        free(t);
        return s;
    }

    /* Euler-type samplers: sigma = sqrt((1 - ac) / ac) (Karras et al. 2022, VP -> VE). */
    float *table = sd_malloc((size_t)T * sizeof(float));
    float *log_table = sd_malloc((size_t)T * sizeof(float));
    for (int k = 0; k < T; k++) {
        table[k] = sigma_of_ac(s->alphas_cumprod[k]);
        log_table[k] = (float)sd_log((double)table[k]);
    }
    s->sigmas = sd_malloc((size_t)(steps + 1) * sizeof(float));
    double *sig = sd_malloc((size_t)steps * sizeof(double));
    if (kind == SD_DPMPP_2M) dpm_timesteps(cfg, steps, t);
    else discrete_timesteps(cfg, steps, 0, t);
    for (int i = 0; i < steps; i++) sig[i] = interp_sigma(table, T, t[i]);
    if (cfg->karras) {
        /* Euler: between the interpolated sigmas' ends; DPM: between the whole table's ends. */
        double smin = kind == SD_DPMPP_2M ? (double)table[0] : sig[steps - 1];
        double smax = kind == SD_DPMPP_2M ? (double)table[T - 1] : sig[0];
        for (int i = 0; i < steps; i++) {
            sig[i] = karras_sigma(smin, smax, steps, i);
            t[i] = sigma_to_t(log_table, T, sig[i]);
            if (kind == SD_DPMPP_2M) t[i] = round_half_even(t[i]);
        }
    }
    for (int i = 0; i < steps; i++) {
        s->sigmas[i] = (float)sig[i];
        s->timesteps[i] = (float)t[i];
        s->t_int[i] = (int)t[i];
    }
    s->sigmas[steps] = 0.0f;     /* Euler: appended 0; DPM: final_sigmas_type "zero" */
    if (kind != SD_DPMPP_2M) {
        /* EulerDiscreteScheduler.init_noise_sigma: max sigma for linspace/trailing, else
         * sqrt(max^2 + 1), in float32. */
        float mx = 0.0f;
        for (int i = 0; i <= steps; i++) if (s->sigmas[i] > mx) mx = s->sigmas[i];
        if (cfg->spacing == SD_SPACING_LEADING) { float sq = mx * mx; sq = sq + 1.0f; s->init_sigma = sqrtf(sq); }
        else s->init_sigma = mx;
    }
    free(sig);
    free(t);
    free(table);
    free(log_table);
    return s;
}

void sched_free(sd_scheduler *s) {
    if (!s) return;
    free(s->alphas_cumprod);
    free(s->t_int);
    free(s->timesteps);
    free(s->sigmas);
    free(s->prev_x0);
    free(s);
}

int sched_num_steps(const sd_scheduler *s) { return s->steps; }
float sched_timestep(const sd_scheduler *s, int i) { return s->timesteps[i]; }
float sched_init_noise_sigma(const sd_scheduler *s) { return s->init_sigma; }
const float *sched_alphas_cumprod(const sd_scheduler *s) { return s->alphas_cumprod; }
float sched_sigma(const sd_scheduler *s, int i) { return s->sigmas ? s->sigmas[i] : 0.0f; }

int sched_needs_noise(const sd_scheduler *s) {
    return s->kind == SD_EULER_A || (s->kind == SD_DDIM && s->cfg.eta > 0.0f);
}

void sched_scale_model_input(const sd_scheduler *s, int i, const float *x, float *out, size_t n) {
    if (s->kind == SD_EULER || s->kind == SD_EULER_A) {
        /* EulerDiscreteScheduler.scale_model_input: sample / ((sigma**2 + 1) ** 0.5), float32. */
        float sigma = s->sigmas[i];
        float d = sigma * sigma;
        d = sqrtf(d + 1.0f);
        for (size_t k = 0; k < n; k++) out[k] = x[k] / d;
    } else if (out != x) {
        memcpy(out, x, n * sizeof(float));
    }
}

void sched_cfg(const float *uncond, const float *cond, float g, float *out, size_t n) {
    /* StableDiffusionPipeline: noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond) */
    for (size_t k = 0; k < n; k++) {
        float diff = cond[k] - uncond[k];
        float scaled = g * diff;
        out[k] = uncond[k] + scaled;
    }
}

/* DDIMScheduler.step (eq. 12 of Song et al. 2020), float32 throughout: alpha_prod_t etc. are
 * 0-dim float32 tensors, `** 0.5` is sqrt. */
static void ddim_step(const sd_scheduler *s, int i, const float *m, float *x, const float *noise, size_t n) {
    int t = s->t_int[i];
    int prev = t - s->cfg.num_train_timesteps / s->steps;
    float a_t = s->alphas_cumprod[t];
    float a_prev = prev >= 0 ? s->alphas_cumprod[prev] : s->final_alpha_cumprod;
    float b_t = 1.0f - a_t;
    float sqrt_a = sqrtf(a_t), sqrt_b = sqrtf(b_t), sqrt_a_prev = sqrtf(a_prev);
    /* _get_variance: (beta_prev / beta_t) * (1 - alpha_t / alpha_prev) */
    float b_prev = 1.0f - a_prev;
    float variance = (b_prev / b_t) * (1.0f - a_t / a_prev);
    float std_dev = s->cfg.eta * sqrtf(variance);
    float dir_coef = sqrtf((1.0f - a_prev) - std_dev * std_dev);
    float lim = s->cfg.clip_sample_range;
    for (size_t k = 0; k < n; k++) {
        float x0, eps;
        if (s->cfg.prediction == SD_PRED_EPSILON) {
            float bm = sqrt_b * m[k];
            x0 = (x[k] - bm) / sqrt_a;
            eps = m[k];
        } else if (s->cfg.prediction == SD_PRED_SAMPLE) {
            x0 = m[k];
            float ax = sqrt_a * x0;
            eps = (x[k] - ax) / sqrt_b;
        } else {   /* v: x0 = sqrt(a) x - sqrt(b) v, eps = sqrt(a) v + sqrt(b) x (Salimans & Ho 2022) */
            float p = sqrt_a * x[k], q = sqrt_b * m[k];
            x0 = p - q;
            p = sqrt_a * m[k]; q = sqrt_b * x[k];
            eps = p + q;
        }
        if (s->cfg.clip_sample) x0 = x0 < -lim ? -lim : x0 > lim ? lim : x0;
        float dir = dir_coef * eps;
        float y = sqrt_a_prev * x0;
        y = y + dir;
        if (std_dev > 0.0f && noise) { float e = std_dev * noise[k]; y = y + e; }
        x[k] = y;
    }
}

/* x0 from the model output at sigma (EulerDiscreteScheduler.step's pred_original_sample), float32. */
static float euler_x0(sd_prediction pred, float sigma, float m, float x) {
    if (pred == SD_PRED_EPSILON) { float sm = sigma * m; return x - sm; }
    if (pred == SD_PRED_SAMPLE) return m;
    /* v: model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1)) */
    float s2 = sigma * sigma;
    s2 = s2 + 1.0f;
    float c = -sigma / sqrtf(s2);
    float a = m * c, b = x / s2;
    return a + b;
}

/* EulerDiscreteScheduler.step (Karras et al. 2022, Algorithm 2 with s_churn = 0) and
 * EulerAncestralDiscreteScheduler.step (k-diffusion's sample_euler_ancestral), float32. */
static void euler_step(const sd_scheduler *s, int i, const float *m, float *x, const float *noise, size_t n) {
    float sigma = s->sigmas[i], sigma_next = s->sigmas[i + 1];
    float dt, sigma_up = 0.0f;
    if (s->kind == SD_EULER_A) {
        /* sigma_up = (to^2 (from^2 - to^2) / from^2) ** 0.5, sigma_down = (to^2 - up^2) ** 0.5 */
        float f2 = sigma * sigma, t2 = sigma_next * sigma_next;
        float up2 = t2 * (f2 - t2);
        up2 = up2 / f2;
        sigma_up = sqrtf(up2);
        float down = sqrtf(t2 - sigma_up * sigma_up);
        dt = down - sigma;
    } else {
        dt = sigma_next - sigma;     /* sigma_hat = sigma * (gamma + 1) = sigma */
    }
    for (size_t k = 0; k < n; k++) {
        float x0 = euler_x0(s->cfg.prediction, sigma, m[k], x[k]);
        float d = (x[k] - x0) / sigma;
        float y = d * dt;
        y = x[k] + y;
        if (s->kind == SD_EULER_A && noise) { float e = noise[k] * sigma_up; y = y + e; }
        x[k] = y;
    }
}

/* DPMSolverMultistepScheduler._sigma_to_alpha_sigma_t: alpha = 1 / (sigma^2 + 1) ** 0.5, float32. */
static void dpm_alpha_sigma(float sigma, float *alpha_t, float *sigma_t, float *lambda) {
    float s2 = sigma * sigma;
    s2 = s2 + 1.0f;
    *alpha_t = 1.0f / sqrtf(s2);
    *sigma_t = sigma * *alpha_t;
    if (lambda) *lambda = sd_logf(*alpha_t) - sd_logf(*sigma_t);
}

/* DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), diffusers'
 * multistep_dpm_solver_second_order_update with solver_type "midpoint"; the first step and the
 * last (to sigma 0: lower_order_final / final_sigmas_type "zero") are first order. float32. */
static void dpm_step(sd_scheduler *s, int i, const float *m, float *x, size_t n) {
    float alpha_s0, sigma_s0, lambda_s0;
    dpm_alpha_sigma(s->sigmas[i], &alpha_s0, &sigma_s0, &lambda_s0);
    float *x0 = sd_malloc(n * sizeof(float));
    /* convert_model_output: the data prediction x0 */
    for (size_t k = 0; k < n; k++) {
        if (s->cfg.prediction == SD_PRED_EPSILON) { float q = sigma_s0 * m[k]; x0[k] = (x[k] - q) / alpha_s0; }
        else if (s->cfg.prediction == SD_PRED_SAMPLE) x0[k] = m[k];
        else { float p = alpha_s0 * x[k], q = sigma_s0 * m[k]; x0[k] = p - q; }
    }
    float sigma_next = s->sigmas[i + 1];
    if (sigma_next == 0.0f) {
        /* alpha_t = 1, sigma_t = 0, exp(-h) = 0: x_t = 0 * x + 1 * x0 */
        memcpy(x, x0, n * sizeof(float));
    } else {
        float alpha_t, sigma_t, lambda_t;
        dpm_alpha_sigma(sigma_next, &alpha_t, &sigma_t, &lambda_t);
        float h = lambda_t - lambda_s0;
        float ratio = sigma_t / sigma_s0;
        float em1 = sd_expf(-h) - 1.0f;
        float coef = alpha_t * em1;
        int second = s->have_prev && s->prev_n == n;
        float inv_r0 = 0.0f, half_coef = 0.5f * coef;
        if (second) {
            float alpha_s1, sigma_s1, lambda_s1;
            dpm_alpha_sigma(s->sigmas[i - 1], &alpha_s1, &sigma_s1, &lambda_s1);
            float h0 = lambda_s0 - lambda_s1;
            float r0 = h0 / h;
            inv_r0 = 1.0f / r0;
        }
        for (size_t k = 0; k < n; k++) {
            float a = ratio * x[k];
            float b = coef * x0[k];
            float y = a - b;
            if (second) {
                float d1 = x0[k] - s->prev_x0[k];
                d1 = inv_r0 * d1;
                float c = half_coef * d1;
                y = y - c;
            }
            x[k] = y;
        }
    }
    free(s->prev_x0);
    s->prev_x0 = x0;
    s->prev_n = n;
    s->have_prev = 1;
}

void sched_step(sd_scheduler *s, int i, const float *model_out, float *sample, const float *noise, size_t n) {
    if (i < 0 || i >= s->steps) sd_fatal("sched_step: step %d out of range", i);
    if (s->kind == SD_DDIM) ddim_step(s, i, model_out, sample, noise, n);
    else if (s->kind == SD_DPMPP_2M) dpm_step(s, i, model_out, sample, n);
    else euler_step(s, i, model_out, sample, noise, n);
}

int sched_img2img_start(const sd_scheduler *s, double strength) {
    /* StableDiffusionImg2ImgPipeline.get_timesteps: init_timestep = min(int(steps * strength),
     * steps); t_start = max(steps - init_timestep, 0) (all schedulers here have order 1). */
    if (strength < 0.0) strength = 0.0;
    if (strength > 1.0) strength = 1.0;
    int init = (int)((double)s->steps * strength);
    if (init > s->steps) init = s->steps;
    int start = s->steps - init;
    return start > 0 ? start : 0;
}

void sched_add_noise(const sd_scheduler *s, int i, const float *original, const float *noise, float *out, size_t n) {
    if (s->kind == SD_DDIM) {
        /* DDIMScheduler.add_noise: sqrt(ac_t) * x0 + sqrt(1 - ac_t) * noise (float32) */
        float ac = s->alphas_cumprod[s->t_int[i]];
        float sa = sqrtf(ac), sb = sqrtf(1.0f - ac);
        for (size_t k = 0; k < n; k++) { float a = sa * original[k], b = sb * noise[k]; out[k] = a + b; }
    } else if (s->kind == SD_DPMPP_2M) {
        /* DPMSolverMultistepScheduler.add_noise: alpha_t * x0 + sigma_t * noise */
        float alpha_t, sigma_t;
        dpm_alpha_sigma(s->sigmas[i], &alpha_t, &sigma_t, NULL);
        for (size_t k = 0; k < n; k++) { float a = alpha_t * original[k], b = sigma_t * noise[k]; out[k] = a + b; }
    } else {
        /* EulerDiscreteScheduler.add_noise: x0 + noise * sigma */
        float sigma = s->sigmas[i];
        for (size_t k = 0; k < n; k++) { float b = noise[k] * sigma; out[k] = original[k] + b; }
    }
}
