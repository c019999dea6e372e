/* Training kernels of the sparse backend: products over CSR/CSC weights and the GRU layer, forward and
 * backward (sparse_dm/sparse_backend/compiled.py binds them with ctypes).
 *
 * Activations are feature-major, (features, columns) with a row stride `ld` that is a multiple of LANES,
 * so one weight entry times a run of columns is a whole-vector FMA: a CSR row product walks the row's
 * entries and accumulates val * X[col] over up to MAX_CHUNKS vectors of columns at once (column blocks
 * outermost, so the block of X they read stays in L1/L2). The transpose product runs the same loop
 * over the CSC order of the same values, reading val[perm[p]]. The sampled product (SDDMM) is one dot
 * product over the columns per active entry, blocked by columns so both operands stay in L2.
 *
 * GRU layer (nn.GRU semantics, gate order r, z, n; b_hn inside r * (...)): columns are PyTorch's packed
 * order, each time step's block [offsets[t], offsets[t] + pad(sizes[t])) padded to whole vectors; both
 * directions are active on the same columns at time t, the reverse one walking t downwards. Forward
 * keeps, per direction, the state the step read (`hprev`, zero where a sequence starts) and r, z, n and
 * W_hn h + b_hn (`saved`), and zeroes every padding column it writes. Backward walks the steps in the
 * opposite order, writes the pre-activation gradients of the input and recurrent products (`dgi`,
 * `dgh`, zero in padding columns) and carries dL/dh through W_hh^T. The weight products of the whole
 * layer (input projection, its transpose, SDDMMs) are single calls over all columns, not per step.
 *
 * Threads: built with -fopenmp these are torch's own OpenMP workers (the process holds one
 * libgomp.so.1): a GRU layer runs its two directions on two threads; products split column blocks,
 * SDDMMs split entries. Without OpenMP, pthreads. Only GCC/Clang vector extensions (no intrinsics).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifndef _OPENMP
#include <pthread.h>
#endif

#define LANES 16
#define MAX_CHUNKS 4       /* up to 64 columns share one pass over a row's entries */
#define SDDMM_BLOCK 1024   /* columns per SDDMM block: 4 KiB of each operand row */

typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(LANES * sizeof(int32_t))));

#define INLINE static inline __attribute__((always_inline))

INLINE vf splat(float x) { return (vf){0} + x; }
INLINE vf load(const float *p) { return *(const vf *)p; }
INLINE void store(float *p, vf v) { *(vf *)p = v; }
INLINE vf lane_select(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }
INLINE float hsum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < LANES; i++) s += v[i];
    return s;
}
INLINE int64_t padded(int64_t n) { return (n + LANES - 1) / LANES * LANES; }

/* exp(x) for |x| <= 87: Cody-Waite reduction by ln 2 and the Cephes degree-6 polynomial (< 2 ulp). */
INLINE vf vexp(vf x) {
    const vf hi = splat(87.0f), lo = splat(-87.0f);
    x = lane_select(x > hi, hi, x);
    x = lane_select(x < lo, lo, x);
    const vf shifter = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    vf t = x * splat(1.44269504088896341f) + shifter;
    vi n = (vi)t - (vi)shifter;
    vf k = t - shifter;
    vf r = x - k * splat(0.693359375f);
    r = r - k * splat(-2.12194440e-4f);
    vf p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * r * r + r + splat(1.0f);
    vi scale = (n + 127) << 23;
    return p * (vf)scale;
}

INLINE vf vsigmoid(vf x) { return splat(1.0f) / (splat(1.0f) + vexp(-x)); }

/* tanh(x) = 1 - 2 / (1 + e^{2x}): no cancellation for large |x|; near 0 the absolute error is ~eps. */
INLINE vf vtanh(vf x) { return splat(1.0f) - splat(2.0f) / (splat(1.0f) + vexp(x + x)); }

/* acc[c] = sum_p value(p) * X[idx[p]][c-th vector] over `chunks` vectors, value(p) = val[p] or, with a
 * permutation, val[perm[p]]; two partial sums per vector hide the FMA latency. */
INLINE void row_product(const int32_t *idx, const float *val, const int32_t *perm, int32_t begin, int32_t end,
                        const float *X, int64_t ld, int chunks, vf *acc) {
    vf a[MAX_CHUNKS] = {0}, b[MAX_CHUNKS] = {0};
    int32_t p = begin;
    for (; p + 1 < end; p += 2) {
        const vf v0 = splat(perm ? val[perm[p]] : val[p]), v1 = splat(perm ? val[perm[p + 1]] : val[p + 1]);
        const float *x0 = X + (int64_t)idx[p] * ld, *x1 = X + (int64_t)idx[p + 1] * ld;
        for (int c = 0; c < chunks; c++) {
            a[c] += v0 * load(x0 + c * LANES);
            b[c] += v1 * load(x1 + c * LANES);
        }
    }
    if (p < end) {
        const vf v0 = splat(perm ? val[perm[p]] : val[p]);
        const float *x0 = X + (int64_t)idx[p] * ld;
        for (int c = 0; c < chunks; c++) a[c] += v0 * load(x0 + c * LANES);
    }
    for (int c = 0; c < chunks; c++) acc[c] = a[c] + b[c];
}

/* Dispatch on `chunks` so each case keeps its sums in registers (the loop bounds become constants). */
INLINE void row_product_n(const int32_t *idx, const float *val, const int32_t *perm, int32_t begin, int32_t end,
                          const float *X, int64_t ld, int chunks, vf *acc) {
    switch (chunks) {
        case 1: row_product(idx, val, perm, begin, end, X, ld, 1, acc); break;
        case 2: row_product(idx, val, perm, begin, end, X, ld, 2, acc); break;
        case 3: row_product(idx, val, perm, begin, end, X, ld, 3, acc); break;
        default: row_product(idx, val, perm, begin, end, X, ld, 4, acc); break;
    }
}

/* Y[r][c0:c1] = (accumulate ? Y : bias[r] or 0) + sum_p value(p) X[idx[p]][c0:c1] for r < rows, over the
 * column range [c0, c1) (multiples of LANES). ptr/idx/perm: CSR (perm NULL) or CSC (perm = CSR position
 * of each CSC entry). */
static void product_range(int rows, const int32_t *ptr, const int32_t *idx, const float *val,
                          const int32_t *perm, const float *bias, const float *X, int64_t ldx, float *Y,
                          int64_t ldy, int64_t c0, int64_t c1, int accumulate) {
    for (int64_t b0 = c0; b0 < c1; b0 += MAX_CHUNKS * LANES) {
        const int64_t left = (c1 - b0) / LANES;
        const int chunks = left < MAX_CHUNKS ? (int)left : MAX_CHUNKS;
        for (int r = 0; r < rows; r++) {
            vf acc[MAX_CHUNKS];
            row_product_n(idx, val, perm, ptr[r], ptr[r + 1], X + b0, ldx, chunks, acc);
            float *dst = Y + (int64_t)r * ldy + b0;
            const vf base = splat(bias ? bias[r] : 0.0f);
            for (int c = 0; c < chunks; c++)
                store(dst + c * LANES, acc[c] + (accumulate ? load(dst + c * LANES) : base));
        }
    }
}

/* Column range of part `part` of `parts` (whole vectors). */
INLINE void split_columns(int64_t width, int part, int parts, int64_t *c0, int64_t *c1) {
    const int64_t vectors = width / LANES;
    *c0 = vectors * part / parts * LANES;
    *c1 = vectors * (part + 1) / parts * LANES;
}

/* Y (rows, width) = [bias +] W X, or Y += W X; `threads` split the columns. */
void sdm_spmm(int rows, const int32_t *ptr, const int32_t *idx, const float *val, const int32_t *perm,
              const float *bias, const float *X, int64_t ldx, float *Y, int64_t ldy, int64_t width, int accumulate,
              int threads) {
    const int parts = threads > 1 && width >= 2 * MAX_CHUNKS * LANES ? 2 : 1;
#ifdef _OPENMP
#pragma omp parallel for num_threads(parts) schedule(static, 1)
#endif
    for (int part = 0; part < parts; part++) {
        int64_t c0, c1;
        split_columns(width, part, parts, &c0, &c1);
        product_range(rows, ptr, idx, val, perm, bias, X, ldx, Y, ldy, c0, c1, accumulate);
    }
}

/* out[p] (+)= sum_c A[row[p]][c] B[col[p]][c] for p in [p0, p1), c < width (a multiple of LANES). */
static void sddmm_range(int32_t p0, int32_t p1, const int32_t *row, const int32_t *col, const float *A,
                        int64_t lda, const float *B, int64_t ldb, int64_t width, float *out, int accumulate) {
    if (!accumulate)
        for (int32_t p = p0; p < p1; p++) out[p] = 0.0f;
    for (int64_t b0 = 0; b0 < width; b0 += SDDMM_BLOCK) {
        const int64_t b1 = b0 + SDDMM_BLOCK < width ? b0 + SDDMM_BLOCK : width;
        for (int32_t p = p0; p < p1; p++) {
            const float *a = A + (int64_t)row[p] * lda, *b = B + (int64_t)col[p] * ldb;
            vf s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
            int64_t c = b0;
            for (; c + 4 * LANES <= b1; c += 4 * LANES) {
                s0 += load(a + c) * load(b + c);
                s1 += load(a + c + LANES) * load(b + c + LANES);
                s2 += load(a + c + 2 * LANES) * load(b + c + 2 * LANES);
                s3 += load(a + c + 3 * LANES) * load(b + c + 3 * LANES);
            }
            for (; c < b1; c += LANES) s0 += load(a + c) * load(b + c);
            out[p] += hsum((s0 + s1) + (s2 + s3));
        }
    }
}

void sdm_sddmm(int32_t nnz, const int32_t *row, const int32_t *col, const float *A, int64_t lda, const float *B,
               int64_t ldb, int64_t width, float *out, int accumulate, int threads) {
    const int parts = threads > 1 && nnz >= 64 ? 2 : 1;
#ifdef _OPENMP
#pragma omp parallel for num_threads(parts) schedule(static, 1)
#endif
    for (int part = 0; part < parts; part++) {
        const int32_t p0 = (int32_t)((int64_t)nnz * part / parts), p1 = (int32_t)((int64_t)nnz * (part + 1) / parts);
        sddmm_range(p0, p1, row, col, A, lda, B, ldb, width, out, accumulate);
    }
}

/* ---- GRU layer ---------------------------------------------------------------------------------- */

typedef struct {
    int hidden, steps, direction;
    const int32_t *offsets, *sizes; /* per time step: first padded column, real columns */
    int64_t ld;                     /* padded columns: the row stride of every (rows, ld) buffer */
    /* forward */
    const float *gi;                /* (3H, ld) input projection of this direction, b_ih included */
    const int32_t *crow, *col;      /* W_hh CSR (3H x H) */
    const float *val, *bias_hh;
    float *out;                     /* (H, ld) this direction's rows of the layer output */
    float *hprev;                   /* (H, ld) the state each step read */
    float *saved;                   /* (4H, ld) r, z, n, W_hn h + b_hn */
    /* backward */
    const float *grad_out;          /* (H, ld) this direction's rows of dL/d(output) */
    const int32_t *ccol, *csc_row, *perm; /* W_hh CSC (through perm into val) */
    float *dgi, *dgh;               /* (3H, ld) dL/d(W_ih x + b_ih), dL/d(W_hh h + b_hh) */
    float *bias_grad;               /* (4H,) column sums of dgi (r, z, n) and of dgh's n rows */
    float *scratch;                 /* (3H, width of step 0) or (2H, ...) workspace */
    vf *sums;                       /* (4H,) vector partial sums of bias_grad */
    int64_t width0;                 /* padded columns of the widest step */
} GruJob;

/* The step this direction's recurrence runs right before time t (-1 if none). */
INLINE int before(const GruJob *j, int t) {
    const int s = j->direction ? t + 1 : t - 1;
    return s >= 0 && s < j->steps ? s : -1;
}
INLINE int min_int(int a, int b) { return a < b ? a : b; }

static void *gru_forward_direction(void *arg) {
    const GruJob *j = (const GruJob *)arg;
    const int H = j->hidden;
    const int64_t ld = j->ld;
    float *gh = j->scratch; /* (3H, w) W_hh h of the current step */
    for (int i = 0; i < j->steps; i++) {
        const int t = j->direction ? j->steps - 1 - i : i;
        const int b = j->sizes[t];
        const int64_t w = padded(b), off = j->offsets[t];
        const int prev = before(j, t);
        const int valid = prev < 0 ? 0 : min_int(b, j->sizes[prev]);
        for (int u = 0; u < H; u++) {
            float *dst = j->hprev + (int64_t)u * ld + off;
            if (valid) memcpy(dst, j->out + (int64_t)u * ld + j->offsets[prev], (size_t)valid * sizeof(float));
            memset(dst + valid, 0, (size_t)(w - valid) * sizeof(float));
        }
        product_range(3 * H, j->crow, j->col, j->val, NULL, j->bias_hh, j->hprev + off, ld, gh, w, 0, w, 0);
        for (int u = 0; u < H; u++) {
            const float *gi_r = j->gi + (int64_t)u * ld + off, *gi_z = j->gi + (int64_t)(H + u) * ld + off;
            const float *gi_n = j->gi + (int64_t)(2 * H + u) * ld + off;
            const float *gh_r = gh + (int64_t)u * w, *gh_z = gh + (int64_t)(H + u) * w, *gh_n = gh + (int64_t)(2 * H + u) * w;
            const float *h = j->hprev + (int64_t)u * ld + off;
            float *s_r = j->saved + (int64_t)u * ld + off, *s_z = j->saved + (int64_t)(H + u) * ld + off;
            float *s_n = j->saved + (int64_t)(2 * H + u) * ld + off, *s_hn = j->saved + (int64_t)(3 * H + u) * ld + off;
            float *next = j->out + (int64_t)u * ld + off;
            for (int64_t c = 0; c < w; c += LANES) {
                const vf r = vsigmoid(load(gi_r + c) + load(gh_r + c));
                const vf z = vsigmoid(load(gi_z + c) + load(gh_z + c));
                const vf hn = load(gh_n + c);
                const vf n = vtanh(load(gi_n + c) + r * hn);
                store(s_r + c, r);
                store(s_z + c, z);
                store(s_n + c, n);
                store(s_hn + c, hn);
                store(next + c, n + z * (load(h + c) - n));
            }
            for (int64_t c = b; c < w; c++) next[c] = 0.0f; /* padding never leaks into a real column */
        }
    }
    return NULL;
}

/* Backward through time: dh = dL/dh_t (output gradient plus what the step after t carried back). */
static void *gru_backward_direction(void *arg) {
    const GruJob *j = (const GruJob *)arg;
    const int H = j->hidden;
    const int64_t ld = j->ld, W0 = j->width0;
    float *carry = j->scratch, *dh = j->scratch + (int64_t)H * W0; /* (H, W0) each, row stride W0 */
    int carried = 0; /* real columns of `carry` (from the step processed before, in backward order) */
    for (int i = 0; i < j->steps; i++) {
        const int t = j->direction ? i : j->steps - 1 - i;
        const int b = j->sizes[t];
        const int64_t w = padded(b), off = j->offsets[t];
        const int valid = min_int(b, carried);
        for (int u = 0; u < H; u++) {
            const float *go = j->grad_out + (int64_t)u * ld + off, *cr = carry + (int64_t)u * W0;
            float *d = dh + (int64_t)u * W0;
            for (int64_t c = 0; c < valid; c++) d[c] = go[c] + cr[c];
            for (int64_t c = valid; c < b; c++) d[c] = go[c];
            for (int64_t c = b; c < w; c++) d[c] = 0.0f;
        }
        for (int u = 0; u < H; u++) {
            const float *r_ = j->saved + (int64_t)u * ld + off, *z_ = j->saved + (int64_t)(H + u) * ld + off;
            const float *n_ = j->saved + (int64_t)(2 * H + u) * ld + off, *hn_ = j->saved + (int64_t)(3 * H + u) * ld + off;
            const float *h = j->hprev + (int64_t)u * ld + off, *d = dh + (int64_t)u * W0;
            float *gi_r = j->dgi + (int64_t)u * ld + off, *gi_z = j->dgi + (int64_t)(H + u) * ld + off;
            float *gi_n = j->dgi + (int64_t)(2 * H + u) * ld + off;
            float *gh_r = j->dgh + (int64_t)u * ld + off, *gh_z = j->dgh + (int64_t)(H + u) * ld + off;
            float *gh_n = j->dgh + (int64_t)(2 * H + u) * ld + off;
            vf sum_r = j->sums[u], sum_z = j->sums[H + u], sum_n = j->sums[2 * H + u], sum_hn = j->sums[3 * H + u];
            for (int64_t c = 0; c < w; c += LANES) {
                const vf r = load(r_ + c), z = load(z_ + c), n = load(n_ + c), hn = load(hn_ + c);
                const vf g = load(d + c);
                const vf one = splat(1.0f);
                const vf a_n = g * (one - z) * (one - n * n);
                const vf a_z = g * (load(h + c) - n) * z * (one - z);
                const vf a_r = a_n * hn * r * (one - r);
                store(gi_r + c, a_r);
                store(gi_z + c, a_z);
                store(gi_n + c, a_n);
                store(gh_r + c, a_r);
                store(gh_z + c, a_z);
                store(gh_n + c, a_n * r);
                sum_r += a_r, sum_z += a_z, sum_n += a_n, sum_hn += a_n * r;
            }
            j->sums[u] = sum_r, j->sums[H + u] = sum_z, j->sums[2 * H + u] = sum_n, j->sums[3 * H + u] = sum_hn;
        }
        /* carry = W_hh^T dgh + z * dh over this step's columns (dgh and dh are 0 in padding columns) */
        for (int64_t b0 = 0; b0 < w; b0 += MAX_CHUNKS * LANES) {
            const int64_t left = (w - b0) / LANES;
            const int chunks = left < MAX_CHUNKS ? (int)left : MAX_CHUNKS;
            for (int k = 0; k < H; k++) {
                vf acc[MAX_CHUNKS];
                row_product_n(j->csc_row, j->val, j->perm, j->ccol[k], j->ccol[k + 1], j->dgh + off + b0, ld,
                              chunks, acc);
                const float *z_ = j->saved + (int64_t)(H + k) * ld + off + b0, *d = dh + (int64_t)k * W0 + b0;
                float *dst = carry + (int64_t)k * W0 + b0;
                for (int c = 0; c < chunks; c++)
                    store(dst + c * LANES, acc[c] + load(z_ + c * LANES) * load(d + c * LANES));
            }
        }
        carried = b;
    }
    for (int i = 0; i < 4 * H; i++) j->bias_grad[i] = hsum(j->sums[i]);
    return NULL;
}

/* Run both directions' jobs: on two threads when `threads` > 1. Returns 0, or 1 if a thread failed. */
static int run_pair(void *(*fn)(void *), GruJob *jobs, int threads) {
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads > 1 ? 2 : 1) schedule(static, 1)
    for (int d = 0; d < 2; d++) fn(&jobs[d]);
    return 0;
#else
    pthread_t worker;
    if (threads > 1 && pthread_create(&worker, NULL, fn, &jobs[1]) == 0) {
        fn(&jobs[0]);
        return pthread_join(worker, NULL) != 0;
    }
    fn(&jobs[0]);
    fn(&jobs[1]);
    return 0;
#endif
}

/* One layer, both directions. gi: (2, 3H, ld), both directions' input projections (b_ih included);
 * out, hprev: (2H, ld), forward rows first; saved: (2, 4H, ld). W_hh of direction d: crow[d], col[d],
 * val[d]; bias_hh[d]. Returns 0, or 1 when scratch memory or a thread could not be had. */
int sdm_gru_forward(int hidden, int steps, const int32_t *offsets, const int32_t *sizes, int64_t ld,
                    const float *gi, const int32_t *crow_f, const int32_t *col_f, const float *val_f,
                    const float *bias_f, const int32_t *crow_r, const int32_t *col_r, const float *val_r,
                    const float *bias_r, float *out, float *hprev, float *saved, int threads) {
    if (steps == 0) return 0;
    const int64_t W0 = padded(sizes[0]), H = hidden;
    const size_t bytes = (size_t)(3 * H * W0) * sizeof(float);
    GruJob jobs[2];
    for (int d = 0; d < 2; d++) {
        memset(&jobs[d], 0, sizeof(GruJob));
        GruJob *j = &jobs[d];
        j->hidden = hidden, j->steps = steps, j->direction = d, j->offsets = offsets, j->sizes = sizes, j->ld = ld;
        j->gi = gi + d * 3 * H * ld;
        j->crow = d ? crow_r : crow_f, j->col = d ? col_r : col_f, j->val = d ? val_r : val_f;
        j->bias_hh = d ? bias_r : bias_f;
        j->out = out + d * H * ld, j->hprev = hprev + d * H * ld, j->saved = saved + d * 4 * H * ld;
        j->width0 = W0;
        j->scratch = aligned_alloc(64, bytes);
    }
    int status = jobs[0].scratch == NULL || jobs[1].scratch == NULL;
    if (!status) status = run_pair(gru_forward_direction, jobs, threads);
    free(jobs[0].scratch);
    free(jobs[1].scratch);
    return status;
}

/* Backward of sdm_gru_forward: grad_out (2H, ld) -> dgi, dgh (2, 3H, ld) and bias_grad (2, 4H): per
 * direction the gradients of b_ih (r, z, n) and of b_hh's n part (its r, z parts equal b_ih's). W_hh of
 * direction d in CSC: ccol[d], csc_row[d], perm[d] (CSR position of each entry) into val[d]. */
int sdm_gru_backward(int hidden, int steps, const int32_t *offsets, const int32_t *sizes, int64_t ld,
                     const float *grad_out, const float *hprev, const float *saved, const int32_t *ccol_f,
                     const int32_t *row_f, const int32_t *perm_f, const float *val_f, const int32_t *ccol_r,
                     const int32_t *row_r, const int32_t *perm_r, const float *val_r, float *dgi, float *dgh,
                     float *bias_grad, int threads) {
    if (steps == 0) return 0;
    const int64_t W0 = padded(sizes[0]), H = hidden;
    const size_t bytes = (size_t)(2 * H * W0) * sizeof(float);
    GruJob jobs[2];
    for (int d = 0; d < 2; d++) {
        memset(&jobs[d], 0, sizeof(GruJob));
        GruJob *j = &jobs[d];
        j->hidden = hidden, j->steps = steps, j->direction = d, j->offsets = offsets, j->sizes = sizes, j->ld = ld;
        j->grad_out = grad_out + d * H * ld;
        j->hprev = (float *)(hprev + d * H * ld), j->saved = (float *)(saved + d * 4 * H * ld); /* read only */
        j->ccol = d ? ccol_r : ccol_f, j->csc_row = d ? row_r : row_f, j->perm = d ? perm_r : perm_f;
        j->val = d ? val_r : val_f;
        j->dgi = dgi + d * 3 * H * ld, j->dgh = dgh + d * 3 * H * ld, j->bias_grad = bias_grad + d * 4 * H;
        j->width0 = W0;
        j->scratch = aligned_alloc(64, bytes);
        j->sums = aligned_alloc(64, (size_t)(4 * H) * sizeof(vf));
        if (j->sums) memset(j->sums, 0, (size_t)(4 * H) * sizeof(vf));
    }
    int status = !jobs[0].scratch || !jobs[1].scratch || !jobs[0].sums || !jobs[1].sums;
    if (!status) status = run_pair(gru_backward_direction, jobs, threads);
    for (int d = 0; d < 2; d++) {
        free(jobs[d].scratch);
        free(jobs[d].sums);
    }
    return status;
}

/* Activations passed to these kernels have row strides and column offsets in multiples of this. */
int sdm_train_lanes(void) { return LANES; }
