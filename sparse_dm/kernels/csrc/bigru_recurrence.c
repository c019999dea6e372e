/* One bidirectional GRU layer of the sparse inference form (input projection and recurrence), compiled.
 *
 * Why C: at batch 64 a step's CSR product takes MKL ~30 us, most of it per-call set-up and a dense
 * operand whose width (the active columns) is not a multiple of the vector length, and the torch-op
 * loop adds six tensor ops per step. Here one call runs a whole layer on a column layout padded per
 * step to whole vectors (the caller pads; see sparse_gru.py): the input projection of every column,
 * then per step this direction's r, z and n rows times the previous step's state (read in place),
 * then the gates over whole vectors. The two directions are independent (paired input weight,
 * block-diagonal recurrent weight), so with two threads each direction runs on its own thread with
 * no synchronisation until the layer ends. Built with -fopenmp, those threads are torch's own
 * OpenMP workers (the process has one libgomp.so.1): a thread of our own would compete with them,
 * since they spin for milliseconds after every torch op before they sleep. For the same reason the
 * input projection is done here, not by MKL between layers. Without OpenMP it uses pthreads.
 *
 * Layouts: both weights are CSR with rows gate-major [r_f r_r z_f z_r n_f n_r], n rows doubled: the
 * input weight over the paired input `x` (K, Np), the recurrent weight over the shifted state
 * [u_f; u_r; 1] (biases ride on rows of ones); `gates_in` (6H, Np) is scratch for the input
 * projections of every padded column; `out` (4H + 1, Np) receives u in rows [0, 2H), keeps its
 * row of ones at 2H and receives the mirrored u in rows [2H + 1, 4H + 1). With those folds one step
 * is r = s(gi_r + W_r p), z = s(gi_z + W_z p), c = s(gi_n + r * W_n p), u' = c + z * (u - c), where
 * s is the logistic function. Padding columns hold finite values that never mix into real columns.
 *
 * Only GCC/Clang vector extensions are used (no intrinsics), so it builds for any target the
 * compiler supports; -march=native picks the instructions.
 */
#include <stdint.h>
#include <stdlib.h>
#ifndef _OPENMP
#include <pthread.h>
#endif

#define LANES 16
#define MAX_CHUNKS 4 /* up to 64 columns share one pass over a row's nonzeros */

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

/* acc[c] = sum_p val[p] * P[col[p]][c-th vector], for `chunks` vectors; two partial sums per vector
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
    for (int c = 0; c < chunks; c++) acc[c] = a[c] + b[c];
}

typedef struct {
    int hidden, steps, direction;
    const int32_t *offsets, *active; /* per step: first padded column, real columns */
    const float *x;
    const int32_t *in_crow, *in_col;
    const float *in_val;
    float *gates_in;
    int64_t ld; /* padded columns Np: the row stride of gates_in and out */
    const int32_t *crow, *col;
    const float *val;
    float *out;
    const int32_t *mirror; /* (Np,) padded column whose state column d of the mirrored rows holds */
    float h0;
    float *initial; /* (2H + 1, width of step 0) rows: h0, then ones */
    float *products; /* (3H, width of step 0): this direction's r, z, n rows of W p */
} Job;

/* This direction's rows of gates_in = W_in x over every padded column; column blocks outermost, so
 * the slice of x they read stays in cache across rows. */
static void project(const Job *job) {
    const int H = job->hidden, first = job->direction * H;
    for (int64_t c0 = 0; c0 < job->ld; c0 += MAX_CHUNKS * LANES) {
        const int64_t left = (job->ld - c0) / LANES;
        const int chunks = left < MAX_CHUNKS ? (int)left : MAX_CHUNKS;
        for (int gate = 0; gate < 3; gate++) {
            for (int unit = 0; unit < H; unit++) {
                const int row = gate * 2 * H + first + unit;
                const int32_t begin = job->in_crow[row], end = job->in_crow[row + 1];
                const float *x = job->x + c0;
                vf acc[MAX_CHUNKS];
                switch (chunks) {
                    case 1: row_product(job->in_col, job->in_val, begin, end, x, job->ld, 1, acc); break;
                    case 2: row_product(job->in_col, job->in_val, begin, end, x, job->ld, 2, acc); break;
                    case 3: row_product(job->in_col, job->in_val, begin, end, x, job->ld, 3, acc); break;
                    default: row_product(job->in_col, job->in_val, begin, end, x, job->ld, 4, acc); break;
                }
                float *dst = job->gates_in + (int64_t)row * job->ld + c0;
                for (int c = 0; c < chunks; c++) store(dst + c * LANES, acc[c]);
            }
        }
    }
}

/* products[row] = W[row] p over `width` columns (a multiple of LANES) of p, row stride `stride`. */
static void multiply(const Job *job, const float *p, int64_t stride, int64_t width) {
    const int H = job->hidden, first = job->direction * H;
    for (int gate = 0; gate < 3; gate++) {
        for (int unit = 0; unit < H; unit++) {
            const int row = gate * 2 * H + first + unit;
            float *dst = job->products + (int64_t)(gate * H + unit) * width;
            const int32_t begin = job->crow[row], end = job->crow[row + 1];
            for (int64_t c0 = 0; c0 < width; c0 += MAX_CHUNKS * LANES) {
                const int64_t left = (width - c0) / LANES;
                const int chunks = left < MAX_CHUNKS ? (int)left : MAX_CHUNKS;
                vf acc[MAX_CHUNKS];
                switch (chunks) {
                    case 1: row_product(job->col, job->val, begin, end, p + c0, stride, 1, acc); break;
                    case 2: row_product(job->col, job->val, begin, end, p + c0, stride, 2, acc); break;
                    case 3: row_product(job->col, job->val, begin, end, p + c0, stride, 3, acc); break;
                    default: row_product(job->col, job->val, begin, end, p + c0, stride, 4, acc); break;
                }
                for (int c = 0; c < chunks; c++) store(dst + c0 + c * LANES, acc[c]);
            }
        }
    }
}

/* u' of this direction's units over `width` padded columns from `offset`; u is read from p. */
static void gates(const Job *job, const float *p, int64_t stride, int64_t offset, int64_t width) {
    const int H = job->hidden, first = job->direction * H;
    for (int unit = 0; unit < H; unit++) {
        const int g = first + unit;
        const float *gi_r = job->gates_in + (int64_t)g * job->ld + offset;
        const float *gi_z = job->gates_in + (int64_t)(2 * H + g) * job->ld + offset;
        const float *gi_n = job->gates_in + (int64_t)(4 * H + g) * job->ld + offset;
        const float *w_r = job->products + (int64_t)unit * width;
        const float *w_z = job->products + (int64_t)(H + unit) * width;
        const float *w_n = job->products + (int64_t)(2 * H + unit) * width;
        const float *u = p + (int64_t)g * stride;
        float *next = job->out + (int64_t)g * job->ld + offset;
        for (int64_t c = 0; c < width; c += LANES) {
            const vf r = vsigmoid(load(gi_r + c) + load(w_r + c));
            const vf z = vsigmoid(load(gi_z + c) + load(w_z + c));
            const vf cand = vsigmoid(load(gi_n + c) + r * load(w_n + c));
            const vf previous = load(u + c);
            store(next + c, cand + z * (previous - cand));
        }
    }
}

static void *run_direction(void *arg) {
    const Job *job = (const Job *)arg;
    const int H = job->hidden, first = job->direction * H;
    project(job);
    for (int step = 0; step < job->steps; step++) {
        const int64_t width = (job->active[step] + LANES - 1) / LANES * LANES;
        const int64_t offset = job->offsets[step];
        /* the previous state, read in place: step s - 1's block of out (or the initial state) */
        const float *p = step == 0 ? job->initial : job->out + job->offsets[step - 1];
        const int64_t stride = step == 0 ? width : job->ld;
        multiply(job, p, stride, width);
        gates(job, p, stride, offset, width);
    }
    for (int g = first; g < first + H; g++) {
        const float *state = job->out + (int64_t)g * job->ld;
        float *mirrored = job->out + (int64_t)(2 * H + 1 + g) * job->ld;
        for (int64_t d = 0; d < job->ld; d++) mirrored[d] = state[job->mirror[d]];
    }
    return NULL;
}

/* Runs one layer (input projection and every step); returns 0, or 1 when memory or a thread could
 * not be had. */
int sdm_bigru_layer(int hidden, int steps, const int32_t *offsets, const int32_t *active, const float *x,
                    const int32_t *in_crow, const int32_t *in_col, const float *in_val, float *gates_in,
                    int64_t ld, const int32_t *crow, const int32_t *col, const float *val, float *out,
                    const int32_t *mirror, float h0, int threads) {
    if (steps == 0) return 0;
    const int64_t width = (active[0] + LANES - 1) / LANES * LANES;
    const size_t initial_bytes = (size_t)(2 * hidden + 1) * (size_t)width * sizeof(float);
    const size_t product_bytes = (size_t)(3 * hidden) * (size_t)width * sizeof(float);
    float *initial = aligned_alloc(64, initial_bytes);
    Job jobs[2];
    for (int d = 0; d < 2; d++)
        jobs[d] = (Job){hidden,   steps,  d,      offsets, active, x,       in_crow,
                        in_col,   in_val, gates_in, ld,    crow,   col,     val,
                        out,      mirror, h0,      initial, aligned_alloc(64, product_bytes)};
    int status = initial == NULL || jobs[0].products == NULL || jobs[1].products == NULL;
    if (!status) {
        for (int64_t i = 0; i < 2 * hidden * width; i++) initial[i] = h0;
        for (int64_t i = 2 * hidden * width; i < (2 * hidden + 1) * width; i++) initial[i] = 1.0f;
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
    }
    free(initial);
    free(jobs[0].products);
    free(jobs[1].products);
    return status;
}

/* The caller pads every step's columns to a multiple of this. */
int sdm_bigru_lanes(void) { return LANES; }
