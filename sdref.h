/* sdref.h — the one public header of sdref.
 *
 * Stable Diffusion inference in portable C99 whose every result is bit-identical on every
 * platform, with FP32 or emulated FP16/BF16/TF32/FP8 arithmetic chosen per model and per kind
 * of operation. See DESIGN.md (../shared/DESIGN.md) for the ideas behind it.
 *
 * Map of the sources (each section below names its file):
 *   fp16.c       number formats, emulated arithmetic, the project's own math functions
 *   ref.c        tensors, operations under the precision policy, threads, tracing, weight loading
 *   io.c         safetensors, .npy, JSON, errors, atomic file output
 *   png.c        inflate/deflate (zlib, gzip) and PNG read/write
 *   tokenizer.c  CLIP's byte-level BPE tokenizer with its text clean-up
 *   clip.c       CLIP text encoder and CLIP vision encoder
 *   unet.c       UNet2DConditionModel
 *   vae.c        AutoencoderKL (SD1.x and SDXL)
 *   ipadapter.c  IP-Adapter image projections (base, Plus, Full-face)
 *   sampler.c    noise schedules, samplers, torch-compatible RNGs
 *   pipeline.c   txt2img and img2img: the whole job from the files users have
 *   demo.c       `sdref demo`: a model made on the spot, rendered under three precisions
 *   lab.c        compare results (arrays, images, traces), image metrics, shadow runs
 *   report.c     `sdref report`: one job under two precisions as one HTML page
 *   cli.c        command-line helpers shared by the commands
 *   main.c       the command line: dispatch to the commands
 *
 * Conventions. Public names are prefixed by their subsystem (st_, npy_, json_, png_, tok_,
 * vae_, unet_, ...); file-local helpers are `static`. Functions that can fail on bad input
 * return 0 on success and -1 on failure after recording one line with sd_error(); the command
 * line prints that line (sd_last_error()) and exits non-zero. Out of memory is fatal (sd_fatal).
 */
#ifndef SDREF_H
#define SDREF_H

#include <float.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* Bits are defined by the source only when float arithmetic is evaluated in float (not in the
 * x87's 80-bit registers). 32-bit x86: build with -msse2 -mfpmath=sse. */
#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD != 0 && FLT_EVAL_METHOD != -1
#error "sdref needs FLT_EVAL_METHOD == 0 (32-bit x86: -msse2 -mfpmath=sse; s390x: -fexcess-precision=fast)"
#endif

#define SDREF_VERSION "0.1.0"

/* ======================================================================================
 * Errors and small utilities (io.c)
 * ====================================================================================== */

/* Record the error line (printf-style). Keeps the first line only; no trailing newline. */
void sd_error(const char *fmt, ...);
/* The recorded error line ("" when none). */
const char *sd_last_error(void);
void sd_clear_error(void);
/* Print "sdref: <msg>" to stderr and exit(1). For out-of-memory and broken invariants. */
void sd_fatal(const char *fmt, ...);
/* malloc/calloc/realloc that call sd_fatal on failure. n*size overflow is also fatal. */
void *sd_malloc(size_t n);
void *sd_calloc(size_t n, size_t size);
void *sd_realloc(void *p, size_t n);
char *sd_strdup(const char *s);
/* Read a whole file into memory (NUL-terminated for convenience). 0 / -1 with sd_error. */
int sd_read_file(const char *path, uint8_t **data, size_t *len);
/* Output files are written under a temporary name and renamed into place on success. */
typedef struct sd_outfile { FILE *f; char *path; char *tmp_path; } sd_outfile;
int sd_out_open(sd_outfile *o, const char *path);   /* opens "<path>.tmp.<pid>" for writing */
int sd_out_commit(sd_outfile *o);                   /* fclose + check errors + rename */
void sd_out_abort(sd_outfile *o);                   /* fclose + remove the temporary */
/* Little-endian byte decoding, independent of the host's byte order. */
static inline uint16_t sd_le16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t sd_le32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static inline uint64_t sd_le64(const uint8_t *p) { return (uint64_t)sd_le32(p) | ((uint64_t)sd_le32(p + 4) << 32); }
/* float <-> bits without aliasing problems */
float sd_f32_from_bits(uint32_t u);
uint32_t sd_f32_bits(float f);
double sd_f64_from_bits(uint64_t u);
uint64_t sd_f64_bits(double d);

/* ======================================================================================
 * Number formats and deterministic math (fp16.c)
 * ====================================================================================== */

typedef enum sd_format {
    SD_F32 = 0,   /* IEEE binary32: no rounding */
    SD_F16,       /* IEEE binary16: 1-5-10, max 65504, subnormals, Inf, NaN */
    SD_BF16,      /* bfloat16: 1-8-7 */
    SD_TF32,      /* NVIDIA TF32: 1-8-10 (stored in 32 bits) */
    SD_E4M3,      /* OCP FP8 E4M3FN: 1-4-3, bias 7, max 448, no Inf, one NaN (0x7f/0xff) */
    SD_E5M2,      /* OCP FP8 E5M2: 1-5-2, IEEE-like, max 57344, Inf, NaN */
    SD_FORMAT_COUNT
} sd_format;

const char *sd_format_name(sd_format f);             /* "fp32", "fp16", "bf16", "tf32", "fp8e4m3", "fp8e5m2" */
int sd_format_parse(const char *s, sd_format *out);  /* accepts the names above (+ "f32","f16","fp8"=e4m3...); 0/-1 */

/* Conversions: float32 -> format bits with round-to-nearest-even, subnormals, overflow to Inf
 * (E4M3: |x| > 464 and Inf to NaN, as PyTorch does), NaN stays NaN with its sign (quiet:
 * 0x7e00 fp16, 0x7fc0 bf16, 0x7f fp8; sd_round gives 0x7fc00000 | sign). Format bits -> float32
 * is exact. */
uint16_t sd_f32_to_f16(float x);
float sd_f16_to_f32(uint16_t h);
uint16_t sd_f32_to_bf16(float x);
float sd_bf16_to_f32(uint16_t h);
uint8_t sd_f32_to_e4m3(float x);
float sd_e4m3_to_f32(uint8_t b);
uint8_t sd_f32_to_e5m2(float x);
float sd_e5m2_to_f32(uint8_t b);
float sd_round_tf32(float x);          /* round-to-nearest-even to 10 mantissa bits */
float sd_trunc_tf32(float x);          /* truncation (tensor cores fed raw float32) */

/* x rounded to format f, returned as float32 (identity for SD_F32). */
float sd_round(float x, sd_format f);
/* Round a whole buffer in place: the routine run after every operation. */
void sd_round_buffer(float *x, size_t n, sd_format f);
/* 1 when x is exactly representable in f. */
int sd_is_representable(float x, sd_format f);

/* Emulated binary16 / bfloat16 arithmetic on values held in float32 (each operand must already
 * be a value of the format); results correctly rounded (round-to-nearest-even). A NaN result
 * is always 0x7fc00000 (hardware NaN signs differ between platforms). */
float sd_f16_add(float a, float b);
float sd_f16_sub(float a, float b);
float sd_f16_mul(float a, float b);
float sd_f16_div(float a, float b);
float sd_f16_sqrt(float a);
float sd_f16_fma(float a, float b, float c);   /* a*b+c rounded once */
float sd_bf16_add(float a, float b);
float sd_bf16_sub(float a, float b);
float sd_bf16_mul(float a, float b);
float sd_bf16_div(float a, float b);
float sd_bf16_sqrt(float a);
float sd_bf16_fma(float a, float b, float c);

/* The project's own math functions, built only from + - * / sqrt (fma only where written),
 * so results do not depend on the C library. float32 versions: at most 1 ulp from the exact
 * value over their useful domain. double versions: for schedulers and the RNG. */
float sd_expf(float x);
float sd_logf(float x);
float sd_erff(float x);
float sd_tanhf(float x);
/* GELU, x Phi(x), evaluated in double and rounded once: erf form (0.5 x (1 + erf(x / sqrt 2)),
 * with erfc for negative x, where float's 1 + erf(x) cancels) and tanh form (x sigmoid(2u)). */
float sd_gelu_erff(float x);
float sd_gelu_tanhf(float x);
float sd_sinf(float x);
float sd_cosf(float x);
double sd_exp(double x);
double sd_log(double x);
double sd_sin(double x);
double sd_cos(double x);
double sd_pow(double x, double y);   /* x > 0; within about 2 ulp */

/* ======================================================================================
 * Precision policy, tracing, context (ref.c)
 * ====================================================================================== */

/* Which model a policy applies to. */
typedef enum sd_model_kind { SD_TEXT = 0, SD_VISION, SD_UNET, SD_VAE, SD_IPADAPTER, SD_MODEL_COUNT } sd_model_kind;

/* Where rounding happens in one model (DESIGN.md, "The precision policy decides"). */
typedef struct sd_policy {
    sd_format weights;     /* parameters (and model inputs) are rounded to this on load */
    sd_format storage;     /* every operation's result is rounded once to this */
    sd_format accum;       /* SD_F32: dot products sum in float32; else round after every add */
    int tf32_inputs;       /* conv/matmul inputs rounded to TF32 first (Ampere default) */
    int upcast_attention;  /* attention scores and softmax in float32 (SDPA/flash kernels, PyTorch);
                              0: scores and probabilities rounded to storage too (fp16-acc16) */
} sd_policy;

typedef struct sd_precision { sd_policy model[SD_MODEL_COUNT]; } sd_precision;

/* Parse "fp16", "fp16-vae32", "unet=fp16,vae=fp32,vae.accum=fp16,unet.weights=fp8e4m3", ...
 * Presets: fp32 fp16 fp16-vae32 bf16 tf32 fp16-acc16 fp8. On error sd_error lists what is valid. */
int sd_precision_parse(const char *spec, sd_precision *out);
const char *sd_model_kind_name(sd_model_kind k);   /* "text","vision","unet","vae","ipadapter" */
/* Human-readable one-line description of a policy ("weights=fp16 storage=fp16 accum=fp32 ..."). */
void sd_policy_describe(const sd_policy *p, char *buf, size_t n);

/* Tracing: every named intermediate tensor's statistics, optionally its values. */
typedef struct sd_trace_stats {
    double min, max, max_abs, mean, std;
    int64_t n, n_inf, n_nan, n_over_f16, n_sub_f16;
} sd_trace_stats;
typedef struct sd_cmp_stats {
    size_t n;
    double max_abs, max_rel, mean_abs, rms, cosine;
    double ulp32_max, ulp32_median, ulp16_max, ulp16_median;
    double identical;          /* share of bit-identical elements (NaN = NaN) */
    double max_abs_ref;        /* max |b| over finite elements */
    int64_t nan_mismatch;      /* elements where exactly one side is NaN */
} sd_cmp_stats;
typedef struct sd_trace_entry {
    char *name; int ndim; int64_t shape[4]; float *data; /* NULL when stats only */
    sd_trace_stats stats;
    int has_err; sd_cmp_stats err;   /* against the reference trace's same-named tensor */
} sd_trace_entry;
typedef struct sd_trace {
    sd_trace_entry *e; int n, cap;
    int keep_data;          /* 0: statistics only */
    char *filter;           /* glob (* and ?), NULL = all */
    /* shadow runs: each traced tensor is compared with the reference run's tensor of the same
     * name (err); with force_reference it is then replaced by it, so every layer downstream is
     * fed the reference input and its own error shows alone. */
    const struct sd_trace *reference;
    int force_reference;
    int ref_cursor;
    int nan_check;          /* stop at the first tensor with Inf or NaN, naming it */
} sd_trace;
void sd_stats_compute(const float *x, size_t n, sd_trace_stats *s);
void sd_trace_free(sd_trace *t);
int sd_trace_write(const sd_trace *t, const char *path);   /* safetensors F32 + stats metadata */
int sd_glob_match(const char *pattern, const char *s);

/* The context every operation receives: the policy of the model being run, where to trace. */
typedef struct sd_ctx {
    sd_policy pol;
    sd_trace *trace;        /* NULL = no tracing */
    const char *prefix;     /* model prefix of traced names: "unet", "vae", "text_encoder", ... */
    int threads;            /* 0 = as OpenMP decides; 1 = serial */
} sd_ctx;

/* ======================================================================================
 * Tensors and parameters (ref.c)
 * ====================================================================================== */

/* Activations: float32, row-major (NCHW for images, [B,T,C] for tokens). Unused trailing
 * dimensions are 1 and ndim says how many are meaningful. */
typedef struct sd_tensor { int ndim; int shape[4]; float *data; } sd_tensor;

sd_tensor tensor_new(int ndim, int d0, int d1, int d2, int d3);   /* zero-filled */
sd_tensor tensor_copy(const sd_tensor *t);
void tensor_free(sd_tensor *t);                                   /* frees and zeroes */
size_t tensor_numel(const sd_tensor *t);
int tensor_same_shape(const sd_tensor *a, const sd_tensor *b);

/* Parameters: kept in their weight format to save memory (F32 -> float, F16/BF16 -> uint16
 * bits, FP8 -> uint8 bits); values are always those of the policy's weight format. */
typedef struct sd_param {
    int ndim; int shape[4];
    sd_format fmt;          /* storage of `data`: SD_F32, SD_F16, SD_BF16, SD_E4M3, SD_E5M2 */
    void *data;             /* NULL = absent (optional bias) */
} sd_param;
size_t param_numel(const sd_param *p);
/* Decode elements [off, off+n) of a parameter into float32. */
void param_read(const sd_param *p, size_t off, size_t n, float *dst);
void param_free(sd_param *p);

/* ======================================================================================
 * Weight loading (ref.c on top of io.c)
 * ====================================================================================== */

struct sd_safetensors;
/* Maps a model's diffusers/transformers names onto one or more opened safetensors files. A
 * rename function (from the file layout: diffusers, LDM single-file, ...) turns each file key
 * into the diffusers name, or returns 0 to ignore the key. */
typedef int (*sd_rename_fn)(const char *file_key, char *out, size_t out_len, void *user);
typedef struct sd_loader {
    struct sd_safetensors *st;
    const char *path;       /* for messages */
    sd_policy pol;          /* parameters rounded to pol.weights */
    char **names;           /* diffusers names, index-parallel with file entries; NULL = ignored */
    int *used;
    int n;
} sd_loader;
int loader_open(sd_loader *l, const char *path, sd_rename_fn rename, void *user, const sd_policy *pol);
/* Where a model's weights and config.json are. PATH is a folder holding one of `names` (tried in
 * order, relative paths such as "unet/diffusion_pytorch_model.safetensors"), or a file. *file: the
 * weights (for a folder without any of the names, the first name, so errors say what is missing);
 * *config: the config.json beside *file, or NULL when there is none. Both malloc'ed. 1 = folder. */
int sd_model_paths(const char *path, const char *const *names, int n_names, char **file, char **config);
int sd_file_exists(const char *path);                     /* a file that opens for reading */
char *sd_path_join(const char *dir, const char *name);    /* "dir/name", malloc'ed */
void loader_close(sd_loader *l);
/* 1 when a tensor of that (diffusers) name exists. */
int loader_has(const sd_loader *l, const char *name);
/* Shape of a named tensor (ndim returned, -1 if absent). */
int loader_shape(const sd_loader *l, const char *name, int64_t shape[8]);
/* Load a named tensor whose shape must equal `shape` (ndim dims). Missing or mis-shaped:
 * -1 with sd_error naming file and tensor. A [C,C,1,1] tensor is accepted for an expected
 * [C,C] (LDM stores some linear layers as 1x1 convs). */
int loader_param(sd_loader *l, sd_param *out, const char *name, int ndim, const int *shape);
/* The same, but a missing tensor leaves out->data NULL and returns 0. */
int loader_param_opt(sd_loader *l, sd_param *out, const char *name, int ndim, const int *shape);

/* ======================================================================================
 * Operations (ref.c). All follow one shape: inputs already rounded, compute in float32 (or as
 * the policy says), round the result once to ctx->pol.storage, return a new tensor. Threads
 * split output elements; every reduction runs in an order fixed here.
 * ====================================================================================== */

/* conv2d: x [N,Cin,H,W], w [Cout,Cin,kh,kw], optional bias [Cout]. pad = {top, bottom, left, right}. */
sd_tensor op_conv2d(const sd_ctx *c, const sd_tensor *x, const sd_param *w, const sd_param *b,
                    int stride, const int pad[4]);
/* linear over the last dimension: x [..., K], w [M, K], optional bias [M] -> [..., M]. */
sd_tensor op_linear(const sd_ctx *c, const sd_tensor *x, const sd_param *w, const sd_param *b);
/* group norm over NCHW (or [N,C] / [N,C,L]) with affine. */
sd_tensor op_group_norm(const sd_ctx *c, const sd_tensor *x, int groups, float eps,
                        const sd_param *gamma, const sd_param *beta);
/* layer norm over the last dimension with affine. */
sd_tensor op_layer_norm(const sd_ctx *c, const sd_tensor *x, float eps, const sd_param *gamma, const sd_param *beta);
sd_tensor op_silu(const sd_ctx *c, const sd_tensor *x);
sd_tensor op_gelu(const sd_ctx *c, const sd_tensor *x);        /* erf form */
sd_tensor op_gelu_tanh(const sd_ctx *c, const sd_tensor *x);   /* tanh approximation */
sd_tensor op_quick_gelu(const sd_ctx *c, const sd_tensor *x);  /* x * sigmoid(1.702 x) */
/* softmax over the last dimension. */
sd_tensor op_softmax(const sd_ctx *c, const sd_tensor *x);
/* Multi-head scaled-dot-product attention as ONE operation: q [B,Tq,H*D], k/v [B,Tk,H*D]
 * -> [B,Tq,H*D]; scores q.k^T * scale, optional causal mask, softmax, weighted sum of v,
 * all in float32 (when pol.upcast_attention; else each step rounded to storage), rounded once.
 * Norm statistics are always computed precisely (PyTorch upcasts norms too). */
sd_tensor op_attention(const sd_ctx *c, const sd_tensor *q, const sd_tensor *k, const sd_tensor *v,
                       int heads, float scale, int causal);
sd_tensor op_upsample_nearest2x(const sd_ctx *c, const sd_tensor *x);
sd_tensor op_add(const sd_ctx *c, const sd_tensor *a, const sd_tensor *b);   /* same shape */
sd_tensor op_mul(const sd_ctx *c, const sd_tensor *a, const sd_tensor *b);   /* same shape */
sd_tensor op_scale(const sd_ctx *c, const sd_tensor *a, float s);
/* a + s*b as ONE rounding (IP-Adapter's h + scale*ip rounds twice: call op_scale then op_add). */
/* a [N,C,H,W] + b [N,C] broadcast over H,W (resnet: conv1(x) + temb). */
sd_tensor op_add_channel(const sd_ctx *c, const sd_tensor *a, const sd_tensor *b);
/* Channel concat of two NCHW tensors: [a, b]. */
sd_tensor op_concat_channels(const sd_tensor *a, const sd_tensor *b);
/* Layout changes (no rounding): [N,C,H,W] <-> [N,H*W,C]. */
sd_tensor op_nchw_to_tokens(const sd_tensor *x);
sd_tensor op_tokens_to_nchw(const sd_tensor *x, int h, int w);
/* Round a tensor in place to the storage (or weight) format of the context's policy. */
void op_round_storage(const sd_ctx *c, sd_tensor *x);
void op_round_weights(const sd_ctx *c, sd_tensor *x);

/* Record a named tensor in the context's trace ("<prefix>.<name>"); no-op without a trace. */
void sd_trace_tensor(const sd_ctx *c, const char *name, const sd_tensor *x);

/* Threads: set the OpenMP thread count (ignored without OpenMP). */
void sd_set_threads(int n);
/* Run fn(arg, begin, end) over [0, n) split into contiguous ranges, one per thread. Callers
 * make each item's result independent of the split, so bits never depend on thread count. */
typedef void (*sd_range_fn)(void *arg, int64_t begin, int64_t end);
void sd_parallel_for(int64_t n, sd_range_fn fn, void *arg);
/* The same, run serially when n * work_per_item (about multiply-adds) is too little to share. */
void sd_parallel_for_work(int64_t n, double work_per_item, sd_range_fn fn, void *arg);
/* C[m][n] = sum over k ascending of A[m][k] * B[k][n] in float32 (+= when accumulate). The
 * order of every sum is fixed: bits independent of blocking, threads and platform. */
void sd_gemm(int M, int N, int K, const float *A, int lda, const float *B, int ldb, float *C, int ldc);

/* ======================================================================================
 * Layers shared by several models (ref.c): loaders for conv/linear/norm parameters,
 * diffusers' ResnetBlock2D and Attention. Each forward traces its sub-layers under
 * "<name>.<leaf>" and its output under "<name>".
 * ====================================================================================== */

int load_linear(sd_loader *l, sd_param *w, sd_param *b, const char *prefix, int out, int in, int bias);
int load_norm(sd_loader *l, sd_param *w, sd_param *b, const char *prefix, int ch);
void sd_trace_sub(const sd_ctx *c, const char *name, const char *leaf, const sd_tensor *x);

typedef struct sd_resnet {
    int cin, cout, groups, temb_dim; float eps;
    sd_param norm1_w, norm1_b, conv1_w, conv1_b, temb_w, temb_b, norm2_w, norm2_b, conv2_w, conv2_b, short_w, short_b;
} sd_resnet;
/* temb_dim 0: no time embedding (VAE). conv_shortcut (1x1) when cin != cout. */
int resnet_load(sd_loader *l, sd_resnet *r, const char *prefix, int cin, int cout, int temb_dim, int groups, float eps);
void resnet_free(sd_resnet *r);
/* norm1, SiLU, conv1, [+ time_emb_proj(SiLU(temb))], norm2, SiLU, conv2, + shortcut(x).
 * temb: the raw time embedding [N, temb_dim] (NULL for the VAE). */
sd_tensor resnet_forward(const sd_ctx *c, const sd_resnet *r, const sd_tensor *x, const sd_tensor *temb, const char *name);

typedef struct sd_attn {
    int qdim, kvdim, inner, heads, groups, residual; float eps;
    sd_param norm_w, norm_b, q_w, q_b, k_w, k_b, v_w, v_b, out_w, out_b;
} sd_attn;
/* IP-Adapter's extra key/value projections for one cross-attention layer. */
typedef struct sd_attn_ip { const sd_param *k_w, *v_w; const sd_tensor *tokens; float scale; } sd_attn_ip;
/* diffusers Attention: [group_norm], to_q/to_k/to_v (bias when qkv_bias), heads, to_out.0,
 * [+ residual]. groups 0 = no group norm. */
int attn_load(sd_loader *l, sd_attn *a, const char *prefix, int qdim, int kvdim, int heads, int head_dim,
              int qkv_bias, int groups, float eps, int residual);
void attn_free(sd_attn *a);
/* x: tokens [B,T,qdim] or an image [B,qdim,H,W] (returned in the same layout); context
 * [B,Tk,kvdim] or NULL for self-attention; ip NULL unless an IP-Adapter is attached. */
sd_tensor attn_forward(const sd_ctx *c, const sd_attn *a, const sd_tensor *x, const sd_tensor *context,
                       const sd_attn_ip *ip, const char *name);

/* ======================================================================================
 * File formats (io.c)
 * ====================================================================================== */

/* safetensors dtypes */
typedef enum st_dtype { ST_F64, ST_F32, ST_F16, ST_BF16, ST_I64, ST_I32, ST_I16, ST_I8, ST_U8, ST_BOOL,
                        ST_F8_E4M3, ST_F8_E5M2, ST_DTYPE_COUNT } st_dtype;
typedef struct st_entry {
    char *name; st_dtype dtype; int ndim; int64_t shape[8];
    uint64_t offset, nbytes;        /* relative to the data section */
} st_entry;
typedef struct sd_safetensors {
    char *path;
    st_entry *entries; int n;
    char *metadata_json;            /* "__metadata__" as compact JSON text {"k":"v",...}, or NULL */
    const uint8_t *data;            /* start of the data section */
    uint64_t data_len;
    void *map; uint64_t map_len; int mapped;   /* mmap'ed, or malloc'ed when mmap is absent */
} sd_safetensors;
/* Open and fully validate (header length bound, JSON, dtypes, shapes x dtype = size, offsets
 * inside the file, no overlap, no duplicates). -1 with "FILE: problem" on error. */
int st_open(sd_safetensors *st, const char *path);
void st_close(sd_safetensors *st);
const st_entry *st_find(const sd_safetensors *st, const char *name);
/* Decode a tensor (any float or integer dtype) to float32, bytewise little-endian. */
void st_read_f32(const sd_safetensors *st, const st_entry *e, float *dst);
/* A tensor's bytes are no longer needed (decoded into the model): let the OS take its pages back,
 * so peak memory is the model, not the model plus the mapped file. No-op where unsupported. */
void st_release(const sd_safetensors *st, const st_entry *e);
size_t st_dtype_size(st_dtype d);
const char *st_dtype_name(st_dtype d);
/* Writer: collects tensors, writes one file atomically. Data is copied. */
typedef struct st_writer { st_entry *entries; uint8_t **blobs; int n, cap; char *metadata_json; } st_writer;
void st_writer_init(st_writer *w);
void st_writer_add_f32(st_writer *w, const char *name, int ndim, const int64_t *shape, const float *data);
void st_writer_add_f16(st_writer *w, const char *name, int ndim, const int64_t *shape, const float *data);
void st_writer_add_bf16(st_writer *w, const char *name, int ndim, const int64_t *shape, const float *data);
void st_writer_add_raw(st_writer *w, const char *name, st_dtype dt, int ndim, const int64_t *shape,
                       const void *le_bytes, size_t nbytes);
/* metadata: a JSON object text of string values, e.g. {"order": "[...]"}; copied. */
void st_writer_set_metadata(st_writer *w, const char *json_object);
int st_writer_write(st_writer *w, const char *path);
void st_writer_free(st_writer *w);

/* .npy */
typedef enum npy_dtype { NPY_F32, NPY_F64, NPY_I64, NPY_I32, NPY_U8, NPY_U16, NPY_F16 } npy_dtype;
typedef struct sd_npy {
    npy_dtype dtype; int ndim; int64_t shape[8];
    size_t n;               /* element count */
    void *data;             /* host-order values of dtype */
} sd_npy;
int npy_read(const char *path, sd_npy *out);       /* either byte order; Fortran order refused */
void npy_free(sd_npy *a);
/* Read a float .npy (f32, f64, f16 or integer) as float32. */
int npy_read_f32(const char *path, float **data, int *ndim, int64_t shape[8], size_t *n);
int npy_write(const char *path, npy_dtype dt, int ndim, const int64_t *shape, const void *data);
int npy_write_tensor(const char *path, const sd_tensor *t);

/* JSON (config.json, vocab.json, trace metadata) */
typedef enum json_type { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT } json_type;
typedef struct sd_json {
    json_type type;
    double num; int boolean;
    char *str; size_t str_len;                 /* UTF-8, NUL-terminated */
    struct sd_json *items; char **keys; int n; /* array items / object members */
} sd_json;
/* Parse strictly (RFC 8259, UTF-8 validated, depth bounded). -1 with sd_error("<what>: ...") */
int json_parse(const char *text, size_t len, const char *what, sd_json *out);
int json_parse_file(const char *path, sd_json *out);
void json_free(sd_json *j);
const sd_json *json_get(const sd_json *obj, const char *key);        /* NULL if absent */
/* Typed getters with defaults (absent or null -> default). */
double json_num(const sd_json *obj, const char *key, double def);
int json_int(const sd_json *obj, const char *key, int def);
int json_bool(const sd_json *obj, const char *key, int def);
const char *json_str(const sd_json *obj, const char *key, const char *def);
/* Write a string as a JSON literal (quotes and escapes). */
void json_write_string(FILE *f, const char *s);

/* ======================================================================================
 * zlib / gzip / PNG (png.c)
 * ====================================================================================== */

/* Inflate a zlib stream (header, Adler-32 checked; bytes after the stream are an error). *out
 * malloc'ed (also when empty). max_out bounds the size: a larger output is an error. */
int sd_zlib_inflate(const uint8_t *in, size_t in_len, uint8_t **out, size_t *out_len, size_t max_out);
/* Deflate with real compression (LZ77 + Huffman); zlib wrapper. level 0 (stored) .. 9; below 0
 * means 6. Deterministic: the same input and level give the same bytes everywhere. */
int sd_zlib_deflate(const uint8_t *in, size_t in_len, int level, uint8_t **out, size_t *out_len);
/* Gunzip a .gz file's content (header CRC, CRC-32 and ISIZE checked; concatenated members). */
int sd_gunzip(const uint8_t *in, size_t in_len, uint8_t **out, size_t *out_len, size_t max_out);
uint32_t sd_crc32(uint32_t crc, const uint8_t *p, size_t n);

typedef struct sd_image {
    int width, height;
    int depth;              /* 8 or 16 */
    int channels;           /* always 4 after decode: RGBA */
    void *pixels;           /* uint8_t or uint16_t (host order), row-major [H][W][4] */
} sd_image;
/* Decode any standard PNG to RGBA (8-bit for depth <= 8, 16-bit for 16). -1 with sd_error
 * naming `what` (usually the path). Dimensions bounded (SD_PNG_MAX_PIXELS). Strict: every
 * chunk's CRC is checked and the IDAT data must inflate to exactly the image's size. */
#define SD_PNG_MAX_PIXELS (1u << 28)
int png_decode(const uint8_t *buf, size_t len, const char *what, sd_image *out);
int png_read_file(const char *path, sd_image *out);
void sd_image_free(sd_image *im);
/* Write 8-bit RGB (channels 3) or RGBA (4) with optional text chunks (keys[i] = values[i], both
 * UTF-8; keys must be Latin-1, 1..79 characters). A value of Latin-1 characters only goes into
 * tEXt (as Latin-1 bytes), any other into an uncompressed iTXt (UTF-8), as Pillow/A1111 do. */
int png_write_file(const char *path, int width, int height, int channels, const uint8_t *pixels,
                   int n_text, const char *const *keys, const char *const *values);

/* ======================================================================================
 * CLIP tokenizer (tokenizer.c)
 * ====================================================================================== */

typedef struct sd_tokenizer sd_tokenizer;
/* DIR (vocab.json + merges.txt, tokenizer_config.json / special_tokens_map.json optional),
 * or a vocab.json / merges.txt file path, or OpenAI's bpe_simple_vocab_16e6.txt.gz. */
sd_tokenizer *tok_load(const char *path);        /* NULL with sd_error */
void tok_free(sd_tokenizer *t);
/* ftfy fix_text + html unescape + whitespace + lower-case, as OpenAI's simple_tokenizer. */
int tok_clean_text(const char *utf8, char **out);
/* Full encoding: BOS, tokens, EOS (no truncation). *ids malloc'ed. -1 on invalid UTF-8. */
int tok_encode(const sd_tokenizer *t, const char *utf8, int **ids, int *n);
/* SD's 77 ids: BOS + first 75 + EOS, padded with the pad token. */
int tok_encode_padded(const sd_tokenizer *t, const char *utf8, int max_len, int *ids);
int tok_bos(const sd_tokenizer *t);
int tok_eos(const sd_tokenizer *t);
int tok_pad(const sd_tokenizer *t);
/* Pre-tokenize and BPE text that is already clean (no BOS/EOS, no clean-up). *ids malloc'ed. */
int tok_encode_clean(const sd_tokenizer *t, const char *clean_utf8, int **ids, int *n);
/* The vocabulary string of an id (byte-level symbols, "</w>" = end of word), NULL if out of range. */
const char *tok_token_text(const sd_tokenizer *t, int id);

/* ======================================================================================
 * Models (vae.c, unet.c, clip.c, ipadapter.c): each has
 *   X *x_load(const char *path, const char *config_path, const sd_policy *pol);  NULL + sd_error
 *   void x_free(X *);
 *   forward functions taking an sd_ctx and tensors, returning tensors.
 * and a command function int cmd_x(int argc, char **argv) used by main.c.
 * ====================================================================================== */

typedef struct sd_vae sd_vae;
sd_vae *vae_load(const char *path, const char *config_path, const sd_policy *pol);
void vae_free(sd_vae *v);
float vae_scaling_factor(const sd_vae *v);
int vae_latent_channels(const sd_vae *v);
sd_tensor vae_decode(const sd_vae *v, const sd_ctx *c, const sd_tensor *latent);   /* [N,4,h,w] -> [N,3,8h,8w] */
/* -> mean and logvar [N,4,h/8,w/8] (logvar clamped to [-30, 20]). */
void vae_encode(const sd_vae *v, const sd_ctx *c, const sd_tensor *image, sd_tensor *mean, sd_tensor *logvar);
/* One decode as a shadow run's model (an sd_model_run; arg = sd_vae_decode_job *): loads the VAE
 * under the given precision and decodes z, tracing under the "vae" prefix. */
typedef struct sd_vae_decode_job { const char *model, *config; const sd_tensor *z; int threads; } sd_vae_decode_job;
int vae_decode_run(void *arg, const sd_precision *prec, sd_trace *trace);

typedef struct sd_unet sd_unet;
typedef struct sd_ipadapter sd_ipadapter;
sd_unet *unet_load(const char *path, const char *config_path, const sd_policy *pol);
void unet_free(sd_unet *u);
int unet_cross_attention_dim(const sd_unet *u);
int unet_in_channels(const sd_unet *u);
/* IP-Adapter attached to a UNet's cross-attention layers (NULL tokens = none). */
typedef struct sd_unet_ip {
    const sd_ipadapter *adapter;  /* to_k_ip / to_v_ip weights */
    const sd_tensor *tokens;      /* [N, T_ip, cross_dim] image prompt tokens */
    float scale;
} sd_unet_ip;
/* sample [N,C,h,w], timestep per batch element, context [N,T,cross_dim] -> [N,C,h,w].
 * Inputs that do not fit (see unet_check) are a broken invariant: fatal. */
sd_tensor unet_forward(const sd_unet *u, const sd_ctx *c, const sd_tensor *sample, const float *timesteps,
                       const sd_tensor *context, const sd_unet_ip *ip);
/* Do the inputs fit the UNet (channels, sizes, context [N,T,cross_dim], IP tokens [N,T,cross_dim]
 * and adapter)? 0, or -1 with sd_error naming the problem. */
int unet_check(const sd_unet *u, const sd_tensor *sample, const sd_tensor *context, const sd_unet_ip *ip);
/* Does an IP-Adapter fit this UNet (token width = cross-attention width, one to_k_ip/to_v_ip
 * pair of the right shape per cross-attention layer)? 0, or -1 with sd_error saying which
 * pair is expected (token width 768 = SD1.x, 1024 = SD2.x, 2048 = SDXL). */
int unet_ip_fits(const sd_unet *u, const sd_ipadapter *a);

typedef struct sd_clip_text sd_clip_text;
/* PATH: a .safetensors file (transformers text_model.* or LDM cond_stage_model.transformer.*)
 * or a folder with model.safetensors + config.json. config_path NULL: config.json next to
 * the file, or SD1.5's config for a single-file checkpoint. */
sd_clip_text *clip_text_load(const char *path, const char *config_path, const sd_policy *pol);
void clip_text_free(sd_clip_text *m);
int clip_text_width(const sd_clip_text *m);
int clip_text_max_length(const sd_clip_text *m);      /* max_position_embeddings (77) */
int clip_text_vocab_size(const sd_clip_text *m);
int clip_text_num_layers(const sd_clip_text *m);
/* ids [N*T] -> [N,T,width]; clip_skip 1 = last layer (default), 2 = penultimate + final norm.
 * Ids outside the vocabulary, T > max length or a bad clip_skip: sd_error, data NULL. */
sd_tensor clip_text_forward(const sd_clip_text *m, const sd_ctx *c, const int *ids, int batch, int len, int clip_skip);

typedef struct sd_clip_vision sd_clip_vision;
sd_clip_vision *clip_vision_load(const char *path, const char *config_path, const sd_policy *pol);
void clip_vision_free(sd_clip_vision *m);
int clip_vision_image_size(const sd_clip_vision *m);    /* input side S (224 for ViT-H/14) */
int clip_vision_hidden_size(const sd_clip_vision *m);   /* E: width of the hidden states (1280) */
int clip_vision_projection_dim(const sd_clip_vision *m);/* P: width of image_embeds (1024) */
/* pixels [N,3,S,S] -> image_embeds [N,P]; optional penultimate hidden states [N,T,E] and
 * last hidden state [N,T,E] (before post_layernorm). Wrong pixel shape: sd_error, data NULL. */
sd_tensor clip_vision_forward(const sd_clip_vision *m, const sd_ctx *c, const sd_tensor *pixels,
                              sd_tensor *penultimate, sd_tensor *last_hidden);
/* CLIPImageProcessor for IP-Adapter: RGB, bicubic shortest side -> 224, centre crop, normalize.
 * pixels [1,3,size,size]; resized_cropped_rgb (NULL to skip): the uint8 [size][size][3] crop
 * of Pillow's resize, malloc'ed. */
int clip_preprocess(const sd_image *im, int size, sd_tensor *pixels, uint8_t **resized_cropped_rgb);

sd_ipadapter *ipadapter_load(const char *path, const char *config_path, const sd_policy *pol);
void ipadapter_free(sd_ipadapter *a);
/* Image prompt tokens [N,T,token_dim]: base adapter from image_embeds [N,P]; Plus / Full-face
 * from the penultimate hidden states [N,T,E]. A wrong input width: data NULL + sd_error saying
 * which image encoder the adapter pairs with. */
sd_tensor ipadapter_tokens(const sd_ipadapter *a, const sd_ctx *c, const sd_tensor *input);
int ipadapter_wants_hidden_states(const sd_ipadapter *a);
/* to_k_ip / to_v_ip of the attention processor with index n (ip_adapter.n.*: the numbering of
 * diffusers' unet.attn_processors: down blocks, up blocks, then the mid block; attn1 even,
 * attn2 odd). 0 when present, -1 when the adapter has no such layer. */
int ipadapter_layer(const sd_ipadapter *a, int n, const sd_param **k_w, const sd_param **v_w);
int ipadapter_num_layers(const sd_ipadapter *a);          /* number of (k, v) pairs in the file */
int ipadapter_token_dim(const sd_ipadapter *a);           /* width of the image tokens (= UNet cross_attention_dim) */
int ipadapter_input_dim(const sd_ipadapter *a);           /* image_embeds width, or hidden-state width (Plus/Full-face) */
const char *ipadapter_kind(const sd_ipadapter *a);        /* "base", "plus", "full-face" */

/* ======================================================================================
 * Sampling (sampler.c)
 * ====================================================================================== */

/* torch-compatible normal noise.
 * SD_RNG_CPU: torch.randn on torch.Generator("cpu").manual_seed(seed) (mt19937; x86 AVX2 layout
 *   for >= 16 values, the double-precision scalar path below 16): bit-exact.
 * SD_RNG_CUDA: torch.randn on CUDA as A1111 imitates it (Philox 4x32-10, Box-Muller, one value
 *   per counter), in float32: 80% bit-exact with the golden files, the rest within 4 ulps. */
typedef enum sd_rng_kind { SD_RNG_CPU, SD_RNG_CUDA } sd_rng_kind;
/* A generator that keeps its state between draws, as diffusers' generator does. */
typedef struct sd_rng {
    sd_rng_kind kind;
    uint64_t seed;
    uint32_t mt[624]; int mt_left, mt_next;    /* CPU: mt19937 */
    int has_cached; double cached;            /* CPU: normal_distribution's second value */
    uint32_t offset;                          /* CUDA: counter offset, +1 per draw */
} sd_rng;
void sd_rng_init(sd_rng *r, sd_rng_kind kind, uint64_t seed);      /* = manual_seed(seed) */
void sd_rng_randn(sd_rng *r, float *out, size_t n);                /* one torch.randn(n) */
/* Fill n floats like torch.randn(n, generator=Generator(device).manual_seed(seed)). */
void sd_randn(sd_rng_kind kind, uint64_t seed, float *out, size_t n);

/* Noise schedule and samplers, as diffusers computes them (float32 where diffusers uses float32
 * tensors, float64 where it uses numpy). */
typedef enum sd_sampler_kind { SD_DDIM, SD_EULER, SD_EULER_A, SD_DPMPP_2M } sd_sampler_kind;
typedef enum sd_prediction { SD_PRED_EPSILON, SD_PRED_V, SD_PRED_SAMPLE } sd_prediction;
typedef enum sd_spacing { SD_SPACING_LEADING, SD_SPACING_TRAILING, SD_SPACING_LINSPACE } sd_spacing;
typedef struct sd_sched_config {
    int num_train_timesteps;       /* 1000 */
    double beta_start, beta_end;   /* 0.00085, 0.012 */
    int scaled_linear;             /* beta_schedule: 1 "scaled_linear", 0 "linear" */
    sd_prediction prediction;      /* prediction_type */
    sd_spacing spacing;            /* timestep_spacing */
    int steps_offset;              /* 1 */
    int set_alpha_to_one;          /* DDIM: 0 -> the last step goes to alphas_cumprod[0] */
    int clip_sample;               /* DDIM: clamp x0 to +-clip_sample_range */
    float clip_sample_range;
    int karras;                    /* use_karras_sigmas (Euler, Euler a, DPM++ 2M) */
    float eta;                     /* DDIM eta (not in the json; 0) */
} sd_sched_config;
void sched_config_default(sd_sched_config *c);                      /* SD1.5's scheduler */
/* Read scheduler_config.json over the defaults. -1 + sd_error on bad or unsupported values. */
int sched_config_load(sd_sched_config *c, const char *path);
/* "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras" -> kind (+ karras). -1 + sd_error. */
int sched_parse_sampler(const char *name, sd_sampler_kind *kind, int *karras);

typedef struct sd_scheduler sd_scheduler;
sd_scheduler *sched_new(const sd_sched_config *cfg, sd_sampler_kind kind, int steps);   /* NULL + sd_error */
void sched_free(sd_scheduler *s);
int sched_num_steps(const sd_scheduler *s);
float sched_timestep(const sd_scheduler *s, int i);        /* the t given to the UNet at step i */
float sched_init_noise_sigma(const sd_scheduler *s);       /* initial latents = noise * this */
/* The UNet's input at step i: x / sqrt(sigma^2+1) for Euler-type samplers, x otherwise. */
void sched_scale_model_input(const sd_scheduler *s, int i, const float *x, float *out, size_t n);
/* 1 when sched_step needs fresh N(0,1) noise (Euler a; DDIM with eta > 0). */
int sched_needs_noise(const sd_scheduler *s);
/* One step i: sample <- x_{i+1} from the model output. noise: n values or NULL. Steps run in order. */
void sched_step(sd_scheduler *s, int i, const float *model_out, float *sample, const float *noise, size_t n);
/* Classifier-free guidance, as diffusers: out = uncond + g * (cond - uncond) in float32. */
void sched_cfg(const float *uncond, const float *cond, float g, float *out, size_t n);
/* img2img (diffusers get_timesteps): the first step to run for a strength in [0,1]. */
int sched_img2img_start(const sd_scheduler *s, double strength);
/* img2img: noise the encoded image for step i (the first step run). */
void sched_add_noise(const sd_scheduler *s, int i, const float *original, const float *noise,
                     float *out, size_t n);
/* The float32 schedule itself (num_train_timesteps values), and sigma at step i (0 for DDIM). */
const float *sched_alphas_cumprod(const sd_scheduler *s);
float sched_sigma(const sd_scheduler *s, int i);

/* ======================================================================================
 * The pipeline (pipeline.c): txt2img / img2img as one job
 * ====================================================================================== */

typedef struct sd_job {
    const char *model_path, *vae_path, *tokenizer_path;   /* checkpoint file or diffusers folder */
    const char *prompt, *negative;
    const char *ids_cond_path, *ids_uncond_path;          /* token ids instead of text */
    int width, height, steps, clip_skip;
    float cfg;
    sd_sampler_kind sampler; int karras; const char *sampler_name;
    uint64_t seed; int seed_given; sd_rng_kind rng; const char *noise_path;
    const char *init_path; double strength;               /* img2img */
    const char *ip_path, *ip_embeds_path, *ip_image_path, *image_encoder_path, *image_encoder_config;
    float ip_scale;
    sd_precision prec; const char *precision_spec;
    int threads, quiet;
    const char *out_png, *latent_out, *image_out;        /* outputs written when set */
    sd_trace *trace;                                       /* every model's trace, when set */
    int keep_image; sd_tensor image;                       /* keep_image: the [1,3,H,W] image in [0,1] */
    int nan_fallback; sd_precision fallback_prec;          /* --nan-fallback SPEC: an image with Inf/NaN is decoded */
    const char *fallback_spec; int nan_fallback_used;      /*   again under SPEC's VAE policy (used: it happened) */
    double seconds_text, seconds_unet, seconds_vae;        /* what it took */
} sd_job;
/* txt2img/img2img options (everything but --trace) into a job with the defaults filled in. */
struct sd_args;
int sd_job_from_args(struct sd_args *a, sd_job *j, int img2img);
/* The checks once every option is known (--model, a prompt, sizes, ...): 0, or -1 with sd_error. */
int sd_job_check(const sd_job *j, int img2img);
/* Run it: 0, or -1 with sd_error. */
int sd_job_run(sd_job *j);
/* An image [1,3,H,W] in [0,1] as RGB8 [H][W][3], as diffusers' (x * 255).round(): half to even, NaN black. */
uint8_t *sd_image_rgb8(const sd_tensor *x);
/* A whole job as lab.c's sd_shadow_run runs a model (an sd_model_run with arg = sd_job_shadow *):
 * each call runs a copy of `job` under `prec` into `trace` (filter: every run's trace filter),
 * keeping its image in image[call] (0 reference, 1 test, 2 test fed the reference); only call
 * `write_outputs` (-1: none) writes the job's files. spec_ref/spec_test: names for messages. */
typedef struct sd_job_shadow {
    const sd_job *job;
    const char *filter, *spec_ref, *spec_test; int write_outputs;
    int calls; sd_tensor image[3];
} sd_job_shadow;
int sd_job_shadow_run(void *arg, const sd_precision *prec, sd_trace *trace);
void sd_job_shadow_free(sd_job_shadow *s);

/* ======================================================================================
 * The precision laboratory (lab.c)
 * ====================================================================================== */

/* Compare a (tested) with b (reference), element by element. */
void sd_compare_arrays(const float *a, const float *b, size_t n, sd_cmp_stats *s);
/* Within tolerance: max|a-b| <= atol + rtol * max|b| (rtol is relative to the tensor's scale, as
 * the project's "1e-5 x max|golden|"), or every element within `ulps` float32 ulps (ulps >= 0). */
typedef struct sd_tolerance { double atol, rtol, ulps; } sd_tolerance;
int sd_compare_within(const sd_cmp_stats *s, const sd_tolerance *t);

/* Image metrics between two RGB images as float [H][W][3] in 0..255. */
typedef struct sd_image_metrics {
    double mse, psnr, ssim;
    double luma_a, luma_b, contrast_a, contrast_b, saturation_a, saturation_b;
} sd_image_metrics;
void sd_image_metrics_compute(const float *a, const float *b, int w, int h, sd_image_metrics *m);

/* Shadow runs (DESIGN.md "Every run can be observed"). `run` loads and runs one model under a
 * precision, recording into `trace` (which it must pass as the context's trace). */
typedef int (*sd_model_run)(void *arg, const sd_precision *prec, sd_trace *trace);
typedef struct sd_shadow_layer {
    const char *name;                  /* trace name, in the reference's execution order */
    double ref_max_abs, ref_rms;
    sd_trace_stats test; int has_test; /* the chosen policy's output statistics */
    sd_cmp_stats carried; int has_carried;  /* error carried to this output from everything before */
    sd_cmp_stats local; int has_local;      /* error this layer adds, fed the reference input */
} sd_shadow_layer;
typedef struct sd_shadow_result {
    sd_trace ref, test, forced;
    sd_shadow_layer *layers; int n;
    double range_max;                  /* the storage format's largest finite value */
    int first_overflow, first_inf, first_nan, worst_local;   /* layer index or -1 */
} sd_shadow_result;
double sd_format_max(sd_format f);
int sd_shadow_run(sd_model_run run, void *arg, const sd_precision *test, const sd_precision *ref, double range_max,
                  sd_shadow_result *r);
void sd_shadow_print(const sd_shadow_result *r, FILE *f);
/* --overflow-report: {"first_overflow": {"module", "max_abs_ref"}, "first_inf", "first_nan", "layers": [...]} */
int sd_shadow_write_report(const sd_shadow_result *r, const char *path);
void sd_shadow_free(sd_shadow_result *r);

/* The command functions (each in the file of its subsystem). */
int cmd_vae_decode(int argc, char **argv);
int cmd_vae_encode(int argc, char **argv);
int cmd_decode_png(int argc, char **argv);
int cmd_unet(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);
int cmd_clip_text(int argc, char **argv);
int cmd_clip_vision(int argc, char **argv);
int cmd_preprocess(int argc, char **argv);
int cmd_compare(int argc, char **argv);
int cmd_txt2img(int argc, char **argv);
int cmd_img2img(int argc, char **argv);
int cmd_report(int argc, char **argv);
int cmd_demo(int argc, char **argv);

/* Command-line helpers (cli.c) */
typedef struct sd_args { int argc; char **argv; int *used; } sd_args;
void args_init(sd_args *a, int argc, char **argv);
const char *args_value(sd_args *a, const char *flag);        /* "--flag VALUE", NULL if absent */
int args_flag(sd_args *a, const char *flag);                 /* "--flag" present */
/* After all lookups: -1 with sd_error naming the first unknown argument. */
int args_check_all_used(sd_args *a);
/* Common: --precision SPEC, --threads N. */
int args_precision(sd_args *a, sd_precision *p);
int args_threads(sd_args *a, int *threads);
/* --trace FILE.safetensors [--trace-stats-only] [--trace-filter GLOB]: 1 when tracing (t set up,
 * *path = FILE), 0 when not asked, -1 on a bad combination. Write with sd_trace_write(t, *path). */
int args_trace(sd_args *a, sd_trace *t, const char **path);
/* For commands that read --trace themselves: --trace-stats-only and --trace-filter GLOB into t
 * (keep_data, filter). -1 when they are given without a trace path. */
int args_trace_options(sd_args *a, const char *trace_path, sd_trace *t);
/* --shadow SPEC [--overflow-report R.json] and --nan-check: 1 when a shadow run is asked (ref
 * set), 0 when not, -1 on error. */
int args_shadow(sd_args *a, sd_precision *ref, const char **report_path, int *nan_check);

#endif /* SDREF_H */
