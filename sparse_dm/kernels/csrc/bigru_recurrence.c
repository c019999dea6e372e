/* One bidirectional GRU layer of the sparse inference form (input projection and recurrence), compiled.
 *
 * Why C: at batch 64 a step's CSR product takes MKL ~30 us, most of it per-call set-up and a dense
 * operand whose width (the active columns) is not a multiple of the vector length, and the torch-op
 * loop adds six tensor ops per step. Here one call runs a whole layer on a column layout padded per
 * step to whole vectors (the caller pads; see sparse_gru.py). The two directions are independent
 * (paired input weight, block-diagonal recurrent weight), so with two threads each direction runs on
 * its own thread with no synchronisation until the layer ends. Built with -fopenmp, those threads are
 * torch's own OpenMP workers (the process has one libgomp.so.1): a thread of our own would compete
 * with them, since they spin for milliseconds after every torch op before they sleep. Without
 * OpenMP it uses pthreads.
 *
 * One pass per step and unit: the unit's r, z and n rows of the input weight times this step's input
 * columns, its rows of the recurrent weight times the previous state, and the gates, all in
 * registers; only u' is stored. (Measured on an Intel Xeon, AVX-512, 1 thread, the default
 * ChiroDiff at S = 0.9, batch 64: projecting every column first and keeping the per-step products
 * in scratch cost 7.7 ms per 3 layers against 5.1 ms fused - the 6H x Np input projection, 5.7 MB,
 * left the 2 MB L2 before the steps read it back.)
 *
 * Layouts: both weights are CSR with rows gate-major [r_f r_r z_f z_r n_f n_r], n rows doubled: the
 * input weight over the paired input `x` (K, Np), the recurrent weight over the shifted state
 * [u_f; u_r; 1] (biases ride on rows of ones); `out` (4H + 1, Np) receives u in rows [0, 2H), keeps
 * its row of ones at 2H and receives the mirrored u in rows [2H + 1, 4H + 1). With those folds one
 * step is r = s(W_r x + W_r' p), z = s(W_z x + W_z' p), c = s(W_n x + r * W_n' p),
 * u' = c + z * (u - c), where s is the logistic function. Padding columns hold finite values that
 * never mix into real columns.
 *
 * Only GCC/Clang vector extensions are used (no intrinsics), so it builds for any target the
 * compiler supports; -march picks the instructions and LANES follows the target's vector registers:
 * a vector type wider than the registers is lowered through memory (measured: 16 lanes built for
 * AVX2 ran 8x slower than 8 lanes).
 */
#include <stdint.h>
#include <stdlib.h>
#ifndef _OPENMP
#include <pthread.h>
#endif

#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4 /* SSE2, NEON and other 16-byte vector units */
#endif
#define MAX_CHUNKS 4 /* up to 4 vectors of columns share one pass over a row's nonzeros */

typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(LANES * sizeof(int32_t))));

static inline vf splat(float x) { return (vf){0} + x; }

/* Lane-wise `mask ? a : b` (C has no vector ternary); mask lanes are all ones or all zeros. */
static inline vf lane_select(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

static inline vf load(const float *p) { return *(const vf *)p; }

static inline void store(float *p, vf v) { *(vf *)p = v; }

/* exp(x) for |x| <= 87: Cody-Waite reduction by ln 2 and the Cephes degree-6 polynomial (< 2 ulp). */
static inline vf vexp(vf x) {
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

static inline vf vsigmoid(vf x) { return splat(1.0f) / (splat(1.0f) + vexp(-x)); }

#define INLINE static inline __attribute__((always_inline))

/* acc[c] += sum_p val[p] * P[col[p]][c-th vector], for `chunks` vectors; two partial sums per vector
 * hide the FMA latency. Inlined into a switch on `chunks`, so each case keeps its sums in registers. */
INLINE void row_product(const int32_t *col, const float *val, int32_t begin, int32_t end, const float *P,
                        int64_t ld, int chunks, vf *acc) {
    vf a[MAX_CHUNKS] = {0}, b[MAX_CHUNKS] = {0};
    int32_t p = begin;
    for (; p + 1 < end; p += 2) {
        const vf v0 = splat(val[p]), v1 = splat(val[p + 1]);
        const float *x0 = P + (int64_t)col[p] * ld, *x1 = P + (int64_t)col[p + 1] * ld;
        for (int c = 0; c < chunks; c++) {
            a[c] += v0 * load(x0 + c * LANES);
            b[c] += v1 * load(x1 + c * LANES);
        }
    }
    if (p < end) {
        const vf v0 = splat(val[p]);
        const float *x0 = P + (int64_t)col[p] * ld;
        for (int c = 0; c < chunks; c++) a[c] += v0 * load(x0 + c * LANES);
    }
    for (int c = 0; c < chunks; c++) acc[c] += a[c] + b[c];
}

typedef struct {
    int hidden, steps, direction;
    const int32_t *offsets, *active; /* per step: first padded column, real columns */
    const float *x;
    const int32_t *in_crow, *in_col;
    const float *in_val;
    int64_t ld; /* padded columns Np: the row stride of x and out */
    const int32_t *crow, *col;
    const float *val;
    float *out;
    const int32_t *mirror; /* (Np,) padded column whose state column d of the mirrored rows holds */
    const float *initial;  /* (2H + 1, width of step 0) rows: h0, then ones */
} Job;

/* u' of unit g over `chunks` vectors: x and p point at the block's first column of this step's input
 * and of the previous state (row strides ld and stride), next at its first column of u'. */
INLINE void unit_block(const Job *job, int g, const float *x, const float *p, int64_t stride, float *next,
                       int chunks) {
    const int H = job->hidden, rows[3] = {g, 2 * H + g, 4 * H + g}; /* r, z, n */
    const int32_t *in_crow = job->in_crow, *crow = job->crow;
    vf r[MAX_CHUNKS] = {0}, z[MAX_CHUNKS] = {0}, gi_n[MAX_CHUNKS] = {0}, gh_n[MAX_CHUNKS] = {0};
    row_product(job->in_col, job->in_val, in_crow[rows[0]], in_crow[rows[0] + 1], x, job->ld, chunks, r);
    row_product(job->col, job->val, crow[rows[0]], crow[rows[0] + 1], p, stride, chunks, r);
    row_product(job->in_col, job->in_val, in_crow[rows[1]], in_crow[rows[1] + 1], x, job->ld, chunks, z);
    row_product(job->col, job->val, crow[rows[1]], crow[rows[1] + 1], p, stride, chunks, z);
    row_product(job->in_col, job->in_val, in_crow[rows[2]], in_crow[rows[2] + 1], x, job->ld, chunks, gi_n);
    row_product(job->col, job->val, crow[rows[2]], crow[rows[2] + 1], p, stride, chunks, gh_n);
    const float *u = p + (int64_t)g * stride;
    for (int c = 0; c < chunks; c++) {
        const vf reset = vsigmoid(r[c]), update = vsigmoid(z[c]);
        const vf cand = vsigmoid(gi_n[c] + reset * gh_n[c]);
        const vf previous = load(u + c * LANES);
        store(next + c * LANES, cand + update * (previous - cand));
    }
}

/* Every unit of this direction at `step`, in blocks of up to MAX_CHUNKS vectors of columns. */
static void run_step(const Job *job, int step) {
    const int H = job->hidden, first = job->direction * H;
    const int64_t width = (job->active[step] + LANES - 1) / LANES * LANES;
    const int64_t offset = job->offsets[step];
    /* the previous state, read in place: step s - 1's block of out (or the initial state) */
    const float *p = step == 0 ? job->initial : job->out + job->offsets[step - 1];
    const int64_t stride = step == 0 ? width : job->ld;
    for (int64_t c0 = 0; c0 < width; c0 += MAX_CHUNKS * LANES) {
        const int64_t left = (width - c0) / LANES;
        const int chunks = left < MAX_CHUNKS ? (int)left : MAX_CHUNKS;
        const float *x = job->x + offset + c0;
        for (int g = first; g < first + H; g++) {
            float *next = job->out + (int64_t)g * job->ld + offset + c0;
            switch (chunks) {
                case 1: unit_block(job, g, x, p + c0, stride, next, 1); break;
                case 2: unit_block(job, g, x, p + c0, stride, next, 2); break;
                case 3: unit_block(job, g, x, p + c0, stride, next, 3); break;
                default: unit_block(job, g, x, p + c0, stride, next, MAX_CHUNKS); break;
            }
        }
    }
}

/* mirrored[d] = state[mirror[d]]; restrict and an int index let the compiler use vector gathers. */
static void gather(const float *restrict state, float *restrict mirrored, const int32_t *restrict mirror,
                   int columns) {
    for (int d = 0; d < columns; d++) mirrored[d] = state[mirror[d]];
}

static void *run_direction(void *arg) {
    const Job *job = (const Job *)arg;
    const int H = job->hidden, first = job->direction * H;
    for (int step = 0; step < job->steps; step++) run_step(job, step);
    for (int g = first; g < first + H; g++)
        gather(job->out + (int64_t)g * job->ld, job->out + (int64_t)(2 * H + 1 + g) * job->ld, job->mirror,
               (int)job->ld);
    return NULL;
}

/* Runs one layer (input projection and every step); returns 0, or 1 when memory or a thread could
 * not be had. */
int sdm_bigru_layer(int hidden, int steps, const int32_t *offsets, const int32_t *active, const float *x,
                    const int32_t *in_crow, const int32_t *in_col, const float *in_val, int64_t ld,
                    const int32_t *crow, const int32_t *col, const float *val, float *out,
                    const int32_t *mirror, float h0, int threads) {
    if (steps == 0) return 0;
    const int64_t width = (active[0] + LANES - 1) / LANES * LANES;
    const size_t bytes = (size_t)(2 * hidden + 1) * (size_t)width * sizeof(float);
    float *initial = aligned_alloc(64, (bytes + 63) / 64 * 64); /* C11: a multiple of the alignment */
    if (initial == NULL) return 1;
    for (int64_t i = 0; i < 2 * hidden * width; i++) initial[i] = h0;
    for (int64_t i = 2 * hidden * width; i < (2 * hidden + 1) * width; i++) initial[i] = 1.0f;
    Job jobs[2];
    for (int d = 0; d < 2; d++)
        jobs[d] = (Job){hidden, steps, d,   offsets, active, x,      in_crow, in_col,
                        in_val, ld,    crow, col,    val,    out,    mirror,  initial};
    int status = 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads > 1 ? 2 : 1) schedule(static, 1)
    for (int d = 0; d < 2; d++) run_direction(&jobs[d]);
#else
    pthread_t worker;
    if (threads > 1 && pthread_create(&worker, NULL, run_direction, &jobs[1]) == 0) {
        run_direction(&jobs[0]);
        status = pthread_join(worker, NULL) != 0;
    } else {
        run_direction(&jobs[0]);
        run_direction(&jobs[1]);
    }
#endif
    free(initial);
    return status;
}

/* The caller pads every step's columns to a multiple of this. */
int sdm_bigru_lanes(void) { return LANES; }
