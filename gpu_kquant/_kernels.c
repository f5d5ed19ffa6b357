/* CPU k-means kernels: nearest centroid, fused Lloyd step, k-means++ updates.
 *
 * The definitions are those of gpu_kquant/kernels/reference.py: a squared distance is
 * summed coordinate by coordinate in index order in float32 with no fused multiply-add
 * (this file must be compiled with -ffp-contract=off), ties go to the lowest centroid
 * index, cluster sums are int64 fixed point. Points are copied tile by tile into a
 * structure-of-arrays buffer so the inner loop over points vectorises; centroids are
 * the outer loop and the running min / argmin / second-min stay in the tile buffers,
 * so no N x k matrix is ever written. Every entry point releases the GIL and runs on
 * one thread: the pipeline runs one quantizer per core.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_buffers.h"

/* Points per tile: 256 points x (D + 3) floats stay in L1 (measured fastest of
 * 64..1024 at D = 3 on a 2-core EPYC). */
#define TILE 256
#define MAX_DIM 64

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSION
#endif

/* Squared distances of one tile (SoA, n <= TILE points) to centroid c: out[i]. */
static inline void tile_dist(const float *restrict soa, int n, int d, const float *restrict c, float *restrict out) {
    const float c0 = c[0];
    for (int i = 0; i < n; i++) {
        float t = soa[i] - c0;
        out[i] = t * t;
    }
    for (int j = 1; j < d; j++) {
        const float cj = c[j];
        const float *restrict x = soa + (size_t)j * TILE;
        for (int i = 0; i < n; i++) {
            float t = x[i] - cj;
            float sq = t * t;
            out[i] = out[i] + sq;
        }
    }
}

static void to_soa(const float *restrict pts, int n, int d, float *restrict soa) {
    for (int i = 0; i < n; i++)
        for (int j = 0; j < d; j++) soa[(size_t)j * TILE + i] = pts[(size_t)i * d + j];
}

/* Nearest and (when second != NULL) second-nearest centroid of n <= TILE points. */
MULTIVERSION
static void tile_nearest(const float *restrict soa, int n, int d, const float *restrict cen, int k,
                         int32_t *restrict lab, float *restrict best, float *restrict second) {
    float dist[TILE];
    for (int i = 0; i < n; i++) {
        best[i] = INFINITY;
        lab[i] = 0;
    }
    if (second) {
        for (int i = 0; i < n; i++) second[i] = INFINITY;
    }
    int c = 0;
    if (d == 3 && !second) { /* the colour case: fused, two centroids per pass over the tile */
        for (; c + 1 < k; c += 2) {
            const float *restrict cc = cen + (size_t)c * 3;
            const float a0 = cc[0], a1 = cc[1], a2 = cc[2], b0 = cc[3], b1 = cc[4], b2 = cc[5];
            const int32_t ca = c, cb = c + 1;
            for (int i = 0; i < n; i++) {
                float x0 = soa[i], x1 = soa[TILE + i], x2 = soa[2 * TILE + i];
                float t0 = x0 - a0, t1 = x1 - a1, t2 = x2 - a2;
                float u0 = x0 - b0, u1 = x1 - b1, u2 = x2 - b2;
                float va = t0 * t0 + t1 * t1;
                float vb = u0 * u0 + u1 * u1;
                va = va + t2 * t2;
                vb = vb + u2 * u2;
                float bb = best[i];
                int32_t l = lab[i];
                int lt = va < bb;
                bb = lt ? va : bb;
                l = lt ? ca : l;
                lt = vb < bb;
                best[i] = lt ? vb : bb;
                lab[i] = lt ? cb : l;
            }
        }
    }
    if (d == 3 && second) { /* the colour case with the runner-up: fused, one pass per centroid */
        for (; c < k; c++) {
            const float c0 = cen[(size_t)c * 3], c1 = cen[(size_t)c * 3 + 1], c2 = cen[(size_t)c * 3 + 2];
            for (int i = 0; i < n; i++) {
                float t0 = soa[i] - c0, t1 = soa[TILE + i] - c1, t2 = soa[2 * TILE + i] - c2;
                float v = t0 * t0 + t1 * t1;
                v = v + t2 * t2;
                float b = best[i], s2 = second[i];
                int lt = v < b;
                second[i] = lt ? b : (v < s2 ? v : s2);
                best[i] = lt ? v : b;
                lab[i] = lt ? c : lab[i];
            }
        }
    }
    for (; c < k; c++) {
        const float *restrict cc = cen + (size_t)c * d;
        if (d == 3) {
            const float c0 = cc[0], c1 = cc[1], c2 = cc[2];
            for (int i = 0; i < n; i++) {
                float t0 = soa[i] - c0, t1 = soa[TILE + i] - c1, t2 = soa[2 * TILE + i] - c2;
                float s0 = t0 * t0, s1 = t1 * t1, s2 = t2 * t2;
                float s = s0 + s1;
                dist[i] = s + s2;
            }
        } else {
            tile_dist(soa, n, d, cc, dist);
        }
        if (second) {
            for (int i = 0; i < n; i++) {
                float v = dist[i], b = best[i], s = second[i];
                int lt = v < b;
                second[i] = lt ? b : (v < s ? v : s);
                best[i] = lt ? v : b;
                lab[i] = lt ? c : lab[i];
            }
        } else {
            for (int i = 0; i < n; i++) {
                float v = dist[i], b = best[i];
                int lt = v < b;
                best[i] = lt ? v : b;
                lab[i] = lt ? c : lab[i];
            }
        }
    }
}


static int check_dims(int b, int n, int k, int d) {
    if (b < 0 || n < 0 || k < 1 || d < 1 || d > MAX_DIM) {
        PyErr_Format(PyExc_ValueError, "bad shape: B=%d N=%d k=%d D=%d (1 <= D <= %d)", b, n, k, d, MAX_DIM);
        return -1;
    }
    return 0;
}

/* Assignment of one problem's n points, optionally with fixed-point sums (qx/qw given). */
static void assign_one(const float *pp, const float *cp, int n, int k, int d, int64_t *labels, float *d2, float *d2nd,
                       const int64_t *qx, const int64_t *qw, int64_t *sums, int64_t *mass) {
    float soa[MAX_DIM * TILE];
    int32_t lab[TILE];
    for (int s = 0; s < n; s += TILE) {
        int m = n - s < TILE ? n - s : TILE;
        to_soa(pp + (size_t)s * d, m, d, soa);
        tile_nearest(soa, m, d, cp, k, lab, d2 + s, d2nd ? d2nd + s : NULL);
        for (int i = 0; i < m; i++) labels[s + i] = lab[i];
        if (!sums) continue;
        for (int i = 0; i < m; i++) {
            int64_t *dst = sums + (size_t)lab[i] * d;
            const int64_t *src = qx + ((size_t)s + i) * d;
            for (int j = 0; j < d; j++) dst[j] += src[j];
            mass[lab[i]] += qw[s + i];
        }
    }
}

static void assign_all(const float *pts, const float *cen, int b, int n, int k, int d, int64_t *labels, float *d2,
                       float *d2nd, const int64_t *qx, const int64_t *qw, int64_t *sums, int64_t *mass) {
    for (int p = 0; p < b; p++) {
        size_t off = (size_t)p * n;
        assign_one(pts + off * d, cen + (size_t)p * k * d, n, k, d, labels + off, d2 + off, d2nd ? d2nd + off : NULL,
                   qx ? qx + off * d : NULL, qw ? qw + off : NULL, sums ? sums + (size_t)p * k * d : NULL,
                   mass ? mass + (size_t)p * k : NULL);
    }
}

/* nearest(points, centroids, labels, d2, d2nd_or_None, B, N, k, D) */
static PyObject *py_nearest(PyObject *self, PyObject *args) {
    PyObject *o[5];
    int b, n, k, d;
    if (!PyArg_ParseTuple(args, "OOOOOiiii", &o[0], &o[1], &o[2], &o[3], &o[4], &b, &n, &k, &d)) return NULL;
    if (check_dims(b, n, k, d) < 0) return NULL;
    Buf v[5];
    memset(v, 0, sizeof(v));
    Py_ssize_t bn = (Py_ssize_t)b * n;
    if (get(o[0], &v[0], bn * d, 4, 0, "points") < 0 || get(o[1], &v[1], (Py_ssize_t)b * k * d, 4, 0, "centroids") < 0 ||
        get(o[2], &v[2], bn, 8, 1, "labels") < 0 || get(o[3], &v[3], bn, 4, 1, "d2") < 0 ||
        get(o[4], &v[4], bn, 4, 1, "d2nd") < 0) {
        release(v, 5);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS assign_all(v[0].view.buf, v[1].view.buf, b, n, k, d, v[2].view.buf, v[3].view.buf,
                                      v[4].held ? v[4].view.buf : NULL, NULL, NULL, NULL, NULL);
    Py_END_ALLOW_THREADS release(v, 5);
    Py_RETURN_NONE;
}

/* lloyd_step(points, qx, qw, centroids, labels, d2, sums, mass, B, N, k, D); sums/mass zeroed by the caller */
static PyObject *py_lloyd_step(PyObject *self, PyObject *args) {
    PyObject *o[8];
    int b, n, k, d;
    if (!PyArg_ParseTuple(args, "OOOOOOOOiiii", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7], &b, &n, &k, &d))
        return NULL;
    if (check_dims(b, n, k, d) < 0) return NULL;
    Buf v[8];
    memset(v, 0, sizeof(v));
    Py_ssize_t bn = (Py_ssize_t)b * n, bk = (Py_ssize_t)b * k;
    if (get(o[0], &v[0], bn * d, 4, 0, "points") < 0 || get(o[1], &v[1], bn * d, 8, 0, "qx") < 0 ||
        get(o[2], &v[2], bn, 8, 0, "qw") < 0 || get(o[3], &v[3], bk * d, 4, 0, "centroids") < 0 ||
        get(o[4], &v[4], bn, 8, 1, "labels") < 0 || get(o[5], &v[5], bn, 4, 1, "d2") < 0 ||
        get(o[6], &v[6], bk * d, 8, 1, "sums") < 0 || get(o[7], &v[7], bk, 8, 1, "mass") < 0) {
        release(v, 8);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS assign_all(v[0].view.buf, v[3].view.buf, b, n, k, d, v[4].view.buf, v[5].view.buf, NULL,
                                      v[1].view.buf, v[2].view.buf, v[6].view.buf, v[7].view.buf);
    Py_END_ALLOW_THREADS release(v, 8);
    Py_RETURN_NONE;
}

MULTIVERSION
static void kpp_all(const float *pts, const float *w, const float *closest, const float *cand, int b, int n, int l,
                    int d, double *pot) {
    float soa[MAX_DIM * TILE], dist[TILE];
    for (int p = 0; p < b; p++) {
        for (int s = 0; s < n; s += TILE) {
            int m = n - s < TILE ? n - s : TILE;
            size_t off = (size_t)p * n + s;
            to_soa(pts + off * d, m, d, soa);
            for (int c = 0; c < l; c++) {
                tile_dist(soa, m, d, cand + ((size_t)p * l + c) * d, dist);
                double acc = 0.0;
                for (int i = 0; i < m; i++) {
                    float v = dist[i] < closest[off + i] ? dist[i] : closest[off + i];
                    acc += (double)(w[off + i] * v);
                }
                pot[(size_t)p * l + c] += acc;
            }
        }
    }
}

/* kpp_potential(points, weights, closest, candidates, potential, B, N, L, D); potential zeroed by the caller */
static PyObject *py_kpp_potential(PyObject *self, PyObject *args) {
    PyObject *o[5];
    int b, n, l, d;
    if (!PyArg_ParseTuple(args, "OOOOOiiii", &o[0], &o[1], &o[2], &o[3], &o[4], &b, &n, &l, &d)) return NULL;
    if (check_dims(b, n, l, d) < 0) return NULL;
    Buf v[5];
    memset(v, 0, sizeof(v));
    Py_ssize_t bn = (Py_ssize_t)b * n;
    if (get(o[0], &v[0], bn * d, 4, 0, "points") < 0 || get(o[1], &v[1], bn, 4, 0, "weights") < 0 ||
        get(o[2], &v[2], bn, 4, 0, "closest") < 0 || get(o[3], &v[3], (Py_ssize_t)b * l * d, 4, 0, "candidates") < 0 ||
        get(o[4], &v[4], (Py_ssize_t)b * l, 8, 1, "potential") < 0) {
        release(v, 5);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS kpp_all(v[0].view.buf, v[1].view.buf, v[2].view.buf, v[3].view.buf, b, n, l, d,
                                   v[4].view.buf);
    Py_END_ALLOW_THREADS release(v, 5);
    Py_RETURN_NONE;
}

MULTIVERSION
static void min_all(const float *pts, const float *centre, float *closest, int b, int n, int d) {
    float soa[MAX_DIM * TILE], dist[TILE];
    for (int p = 0; p < b; p++) {
        for (int s = 0; s < n; s += TILE) {
            int m = n - s < TILE ? n - s : TILE;
            size_t off = (size_t)p * n + s;
            to_soa(pts + off * d, m, d, soa);
            tile_dist(soa, m, d, centre + (size_t)p * d, dist);
            float *restrict cl = closest + off;
            for (int i = 0; i < m; i++) cl[i] = dist[i] < cl[i] ? dist[i] : cl[i];
        }
    }
}

/* min_update(points, centre, closest, B, N, D): closest updated in place */
static PyObject *py_min_update(PyObject *self, PyObject *args) {
    PyObject *o[3];
    int b, n, d;
    if (!PyArg_ParseTuple(args, "OOOiii", &o[0], &o[1], &o[2], &b, &n, &d)) return NULL;
    if (check_dims(b, n, 1, d) < 0) return NULL;
    Buf v[3];
    memset(v, 0, sizeof(v));
    Py_ssize_t bn = (Py_ssize_t)b * n;
    if (get(o[0], &v[0], bn * d, 4, 0, "points") < 0 || get(o[1], &v[1], (Py_ssize_t)b * d, 4, 0, "centre") < 0 ||
        get(o[2], &v[2], bn, 4, 1, "closest") < 0) {
        release(v, 3);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS min_all(v[0].view.buf, v[1].view.buf, v[2].view.buf, b, n, d);
    Py_END_ALLOW_THREADS release(v, 3);
    Py_RETURN_NONE;
}

/* ---- Whole fits per problem: k-means++ seeding and the Lloyd loop, with no Python in
 * between iterations (the per-iteration torch ops cost more than the distances on small
 * colour sets). They follow gpu_kquant/kmeans.py's torch loop step for step. */

/* searchsorted(cum, min(u * total, nextafter(total, 0)), right=True), clamped to n - 1. */
static int sample_index(const double *cum, int n, double u) {
    double total = cum[n - 1];
    double target = u * total;
    double below = nextafter(total, 0.0);
    if (target > below) target = below;
    int lo = 0, hi = n; /* first index with cum > target */
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        if (cum[mid] > target) hi = mid; else lo = mid + 1;
    }
    return lo < n - 1 ? lo : n - 1;
}

MULTIVERSION
static void dist_to(const float *x, int n, int d, const float *c, float *out) {
    float soa[MAX_DIM * TILE];
    for (int s = 0; s < n; s += TILE) {
        int m = n - s < TILE ? n - s : TILE;
        to_soa(x + (size_t)s * d, m, d, soa);
        tile_dist(soa, m, d, c, out + s);
    }
}

/* Weighted greedy k-means++ of one problem; scratch: closest, tmp (n floats), cum (n doubles). */
MULTIVERSION
static int kpp_one(const float *x, const float *w, int n, int k, int nc, int d, const double *u, float *cen,
                   float *closest, float *tmp, double *cum, double *pot, const volatile uint8_t *stop) {
    double acc = 0.0;
    for (int i = 0; i < n; i++) cum[i] = acc += (double)w[i];
    int first = sample_index(cum, n, u[0]);
    memcpy(cen, x + (size_t)first * d, sizeof(float) * d);
    dist_to(x, n, d, cen, closest);
    int n_eff = 1;
    for (int c = 1; c < k; c++) {
        if (stop && *stop) break; /* the caller raises; the centres are not used */
        acc = 0.0;
        for (int i = 0; i < n; i++) cum[i] = acc += (double)(w[i] * closest[i]);
        int alive = cum[n - 1] > 0;
        int best = 0, cand[64];
        for (int l = 0; l < nc; l++) {
            cand[l] = sample_index(cum, n, u[(size_t)c * nc + l]);
            dist_to(x, n, d, x + (size_t)cand[l] * d, tmp);
            double part[4] = {0.0, 0.0, 0.0, 0.0}; /* four fixed lanes: vectorises, same order every time */
            int i = 0;
            for (; i + 3 < n; i += 4)
                for (int q = 0; q < 4; q++)
                    part[q] += (double)(w[i + q] * (tmp[i + q] < closest[i + q] ? tmp[i + q] : closest[i + q]));
            for (; i < n; i++) part[0] += (double)(w[i] * (tmp[i] < closest[i] ? tmp[i] : closest[i]));
            double p = (part[0] + part[1]) + (part[2] + part[3]);
            pot[l] = p;
            if (p < pot[best]) best = l;
        }
        first = cand[best];
        const float *bx = x + (size_t)first * d;
        memcpy(cen + (size_t)c * d, alive ? bx : cen + (size_t)(c - 1) * d, sizeof(float) * d);
        dist_to(x, n, d, bx, tmp);
        for (int i = 0; i < n; i++) closest[i] = tmp[i] < closest[i] ? tmp[i] : closest[i];
        n_eff += alive;
    }
    return n_eff;
}

/* kmeans_pp(points, weights, uniforms, centres, n_eff, B, N, k, L, D[, stop]); ``stop``: a one-byte
 * buffer (or None) polled before every centre, as in lloyd */
static PyObject *py_kmeans_pp(PyObject *self, PyObject *args) {
    PyObject *o[6];
    int b, n, k, l, d;
    o[5] = Py_None;
    if (!PyArg_ParseTuple(args, "OOOOOiiiii|O", &o[0], &o[1], &o[2], &o[3], &o[4], &b, &n, &k, &l, &d, &o[5]))
        return NULL;
    if (check_dims(b, n, k, d) < 0) return NULL;
    if (l < 1 || l > 64) return PyErr_Format(PyExc_ValueError, "candidates per step must be 1..64, got %d", l);
    Buf v[6];
    memset(v, 0, sizeof(v));
    Py_ssize_t bn = (Py_ssize_t)b * n;
    if (get(o[0], &v[0], bn * d, 4, 0, "points") < 0 || get(o[1], &v[1], bn, 4, 0, "weights") < 0 ||
        get(o[2], &v[2], (Py_ssize_t)b * k * l, 8, 0, "uniforms") < 0 ||
        get(o[3], &v[3], (Py_ssize_t)b * k * d, 4, 1, "centres") < 0 || get(o[4], &v[4], b, 8, 1, "n_eff") < 0 ||
        get(o[5], &v[5], 1, 1, 0, "stop") < 0) {
        release(v, 6);
        return NULL;
    }
    const volatile uint8_t *stop = v[5].held ? (const volatile uint8_t *)v[5].view.buf : NULL;
    float *scratch = malloc(sizeof(float) * 2 * (size_t)(n > 0 ? n : 1));
    double *cum = malloc(sizeof(double) * ((size_t)(n > 0 ? n : 1) + (size_t)l));
    if (!scratch || !cum) {
        free(scratch), free(cum), release(v, 6);
        return PyErr_NoMemory();
    }
    const float *pts = v[0].view.buf, *w = v[1].view.buf;
    const double *u = v[2].view.buf;
    float *cen = v[3].view.buf;
    int64_t *n_eff = v[4].view.buf;
    Py_BEGIN_ALLOW_THREADS for (int p = 0; p < b; p++) {
        size_t off = (size_t)p * n;
        n_eff[p] = kpp_one(pts + off * d, w + off, n, k, l, d, u + (size_t)p * k * l, cen + (size_t)p * k * d, scratch,
                           scratch + n, cum, cum + n, stop);
    }
    Py_END_ALLOW_THREADS free(scratch);
    free(cum);
    release(v, 6);
    Py_RETURN_NONE;
}

typedef struct {
    const float *x, *w;
    const int64_t *qx, *qw;
    int n, k, d, k_eff, max_iter;
    double tol, sx, sw;
    const volatile uint8_t *stop; /* a cooperative stop flag, polled between iterations; NULL: none */
} Problem;

/* Move each empty cluster onto a distinct worst-fit point (largest d2, lowest index first). */
static int reseed(const Problem *pr, const float *d2, const int64_t *mass, float *cen, int64_t *taken) {
    int n_empty = 0, moved = 0;
    for (int c = 0; c < pr->k_eff; c++) n_empty += mass[c] == 0;
    if (!n_empty) return 0;
    int top = n_empty < pr->n ? n_empty : pr->n;
    for (int r = 0; r < top; r++) { /* r-th worst point: a selection pass per empty cluster */
        int64_t best = -1;
        for (int i = 0; i < pr->n; i++) {
            if (!(pr->w[i] > 0)) continue;
            int used = 0;
            for (int q = 0; q < r; q++) used |= taken[q] == i;
            if (used) continue;
            if (best < 0 || d2[i] > d2[best]) best = i;
        }
        taken[r] = best;
    }
    int rank = 0;
    for (int c = 0; c < pr->k_eff; c++) {
        if (mass[c] != 0) continue;
        int r = rank < top - 1 ? rank : top - 1;
        rank++;
        int64_t i = taken[r];
        if (i < 0 || !(d2[i] > 0)) continue;
        memcpy(cen + (size_t)c * pr->d, pr->x + (size_t)i * pr->d, sizeof(float) * pr->d);
        moved++;
    }
    return moved;
}

/* New centroids from the cluster sums (empty ones stay), then re-seeding; returns the
 * number re-seeded and the summed squared shift. */
static int update(const Problem *pr, const float *cen, const float *d2, const int64_t *sums, const int64_t *mass,
                  float *newc, int64_t *taken, double *shift) {
    int k = pr->k, d = pr->d;
    for (int c = 0; c < k; c++) {
        double m = (double)mass[c] / pr->sw;
        for (int j = 0; j < d; j++) {
            size_t e = (size_t)c * d + j;
            newc[e] = mass[c] > 0 ? (float)(((double)sums[e] / pr->sx) / m) : cen[e];
        }
    }
    int moved = reseed(pr, d2, mass, newc, taken);
    double total = 0.0;
    for (size_t e = 0; e < (size_t)k * d; e++) {
        float t = newc[e] - cen[e];
        total += (double)(t * t);
    }
    *shift = total;
    return moved;
}

/* Squared distance of one point to one centre, in the kernels' order. */
static inline float pdist(const float *x, const float *c, int d) {
    float t = x[0] - c[0];
    float s = t * t;
    for (int j = 1; j < d; j++) {
        t = x[j] - c[j];
        s = s + t * t;
    }
    return s;
}

/* Hamerly's bounds for one problem: upper[i] bounds the distance to the assigned centre,
 * lower[i] the distance to every other one; sums and mass are kept up to date as labels
 * change. A point is skipped only when its bounds clear a margin larger than float32
 * rounding, so the labels are exactly those of a full search. */
typedef struct {
    double *upper, *lower, *half_sep, *move;
    int *todo;
    float *buf;
} Bounds;

static double margin(double u) { return 1e-4 + 1e-5 * u; }

static void bounds_init(const Problem *pr, const float *cen, int64_t *labels, float *d2, Bounds *bd) {
    int n = pr->n, k = pr->k, d = pr->d;
    float *d2nd = bd->buf + (size_t)TILE * d;
    (void)k;
    for (int s = 0; s < n; s += TILE) {
        int m = n - s < TILE ? n - s : TILE;
        float soa[MAX_DIM * TILE];
        int32_t lab[TILE];
        to_soa(pr->x + (size_t)s * d, m, d, soa);
        tile_nearest(soa, m, d, cen, pr->k, lab, d2 + s, d2nd);
        for (int i = 0; i < m; i++) {
            labels[s + i] = lab[i];
            bd->upper[s + i] = sqrt((double)d2[s + i]);
            bd->lower[s + i] = sqrt((double)d2nd[i]);
        }
    }
}

/* Full search of the listed points; returns whether a positive-weight label changed. */
static int bounds_search(const Problem *pr, const float *cen, int64_t *labels, int64_t *sums, int64_t *mass, Bounds *bd,
                         int count) {
    int d = pr->d, changed = 0;
    float soa[MAX_DIM * TILE], best[TILE], second[TILE];
    int32_t lab[TILE];
    for (int s = 0; s < count; s += TILE) {
        int m = count - s < TILE ? count - s : TILE;
        for (int q = 0; q < m; q++) memcpy(bd->buf + (size_t)q * d, pr->x + (size_t)bd->todo[s + q] * d, 4 * d);
        to_soa(bd->buf, m, d, soa);
        tile_nearest(soa, m, d, cen, pr->k, lab, best, second);
        for (int q = 0; q < m; q++) {
            int i = bd->todo[s + q], a = (int)labels[i], b = lab[q];
            bd->upper[i] = sqrt((double)best[q]);
            bd->lower[i] = sqrt((double)second[q]);
            if (a == b) continue;
            changed |= pr->w[i] > 0;
            for (int j = 0; j < d; j++) {
                sums[(size_t)a * d + j] -= pr->qx[(size_t)i * d + j];
                sums[(size_t)b * d + j] += pr->qx[(size_t)i * d + j];
            }
            mass[a] -= pr->qw[i];
            mass[b] += pr->qw[i];
            labels[i] = b;
        }
    }
    return changed;
}

/* One bounded assignment after the centres moved from old to cen; returns "changed". */
static int bounds_step(const Problem *pr, const float *old, const float *cen, int64_t *labels, int64_t *sums,
                       int64_t *mass, Bounds *bd) {
    int n = pr->n, k = pr->k, d = pr->d, far = 0;
    double most = 0.0, next = 0.0;
    for (int c = 0; c < k; c++) {
        double mv = 0.0;
        for (int j = 0; j < d; j++) {
            double t = (double)cen[(size_t)c * d + j] - (double)old[(size_t)c * d + j];
            mv += t * t;
        }
        bd->move[c] = sqrt(mv);
        if (bd->move[c] > most) next = most, most = bd->move[c], far = c;
        else if (bd->move[c] > next) next = bd->move[c];
        double sep = INFINITY;
        for (int e = 0; e < k; e++) {
            if (e == c) continue;
            double dd = 0.0;
            for (int j = 0; j < d; j++) {
                double t = (double)cen[(size_t)c * d + j] - (double)cen[(size_t)e * d + j];
                dd += t * t;
            }
            sep = dd < sep ? dd : sep;
        }
        bd->half_sep[c] = 0.5 * sqrt(sep);
    }
    int count = 0;
    for (int i = 0; i < n; i++) {
        int a = (int)labels[i];
        bd->upper[i] += bd->move[a];
        bd->lower[i] -= a == far ? next : most;
        double m = bd->half_sep[a] > bd->lower[i] ? bd->half_sep[a] : bd->lower[i];
        if (bd->upper[i] + margin(bd->upper[i]) < m) continue;
        bd->upper[i] = sqrt((double)pdist(pr->x + (size_t)i * d, cen + (size_t)a * d, d));
        if (bd->upper[i] + margin(bd->upper[i]) < m) continue;
        bd->todo[count++] = i;
    }
    return bounds_search(pr, cen, labels, sums, mass, bd, count);
}

static void exact_d2(const Problem *pr, const float *cen, const int64_t *labels, float *d2) {
    for (int i = 0; i < pr->n; i++) d2[i] = pdist(pr->x + (size_t)i * pr->d, cen + (size_t)labels[i] * pr->d, pr->d);
}

/* Smallest k for which the bounds pay off (brute force vectorises better below it). */
#define BOUNDS_MIN_K 32

/* The Lloyd loop of one problem; returns the iterations run, sets *converged. */
MULTIVERSION
static int lloyd_one(const Problem *pr, float *cen, int64_t *labels, float *d2, int64_t *scratch, float *newc,
                     int *converged, Bounds *bd) {
    int n = pr->n, k = pr->k, d = pr->d, use_bounds = bd != NULL;
    int64_t *sums = scratch, *mass = sums + (size_t)k * d, *lab2 = mass + k, *taken = lab2 + n;
    float *old = newc + (size_t)k * d;
    memset(sums, 0, sizeof(int64_t) * (size_t)k * (d + 1));
    if (use_bounds) {
        bounds_init(pr, cen, labels, d2, bd);
        for (int i = 0; i < n; i++) {
            for (int j = 0; j < d; j++) sums[labels[i] * d + j] += pr->qx[(size_t)i * d + j];
            mass[labels[i]] += pr->qw[i];
        }
    } else {
        assign_one(pr->x, cen, n, k, d, labels, d2, NULL, pr->qx, pr->qw, sums, mass);
    }
    *converged = 0;
    int it = 1, empties = 0;
    for (; it <= pr->max_iter; it++) {
        double shift;
        if (pr->stop && *pr->stop) break; /* the caller raises; the results are not used */
        if (use_bounds && empties) exact_d2(pr, cen, labels, d2); /* re-seeding needs every distance */
        int moved = update(pr, cen, d2, sums, mass, newc, taken, &shift);
        memcpy(old, cen, sizeof(float) * (size_t)k * d);
        memcpy(cen, newc, sizeof(float) * (size_t)k * d);
        int changed = 0;
        if (use_bounds) {
            changed = bounds_step(pr, old, cen, labels, sums, mass, bd);
        } else {
            memset(sums, 0, sizeof(int64_t) * (size_t)k * (d + 1));
            assign_one(pr->x, cen, n, k, d, lab2, d2, NULL, pr->qx, pr->qw, sums, mass);
            for (int i = 0; i < n; i++) {
                changed |= (lab2[i] != labels[i]) & (pr->w[i] > 0);
                labels[i] = lab2[i];
            }
        }
        empties = 0;
        for (int c = 0; c < pr->k_eff; c++) empties += mass[c] == 0;
        if ((shift <= pr->tol || !changed) && moved == 0) {
            *converged = 1;
            break;
        }
    }
    if (use_bounds) exact_d2(pr, cen, labels, d2);
    return it <= pr->max_iter ? it : pr->max_iter;
}

/* lloyd(points, weights, qx, qw, centroids, n_eff, tol, scale_x, scale_w, labels, d2, n_iter, converged,
 *       B, N, k, D, max_iter[, stop]); centroids updated in place. ``stop``: a one-byte buffer (or None)
 *       that another thread sets to 1 to end the loop after the current iteration. */
static PyObject *py_lloyd(PyObject *self, PyObject *args) {
    PyObject *o[14];
    int b, n, k, d, max_iter;
    o[13] = Py_None;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOOiiiii|O", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7],
                          &o[8], &o[9], &o[10], &o[11], &o[12], &b, &n, &k, &d, &max_iter, &o[13]))
        return NULL;
    if (check_dims(b, n, k, d) < 0) return NULL;
    Buf v[14];
    Py_ssize_t bn = (Py_ssize_t)b * n;
    const Spec specs[14] = {{bn * d, 4, 0, "points"}, {bn, 4, 0, "weights"}, {bn * d, 8, 0, "qx"},
                            {bn, 8, 0, "qw"}, {(Py_ssize_t)b * k * d, 4, 1, "centroids"}, {b, 8, 0, "n_eff"},
                            {b, 8, 0, "tol"}, {b, 8, 0, "scale_x"}, {b, 8, 0, "scale_w"}, {bn, 8, 1, "labels"},
                            {bn, 4, 1, "d2"}, {b, 8, 1, "n_iter"}, {b, 1, 1, "converged"}, {1, 1, 0, "stop"}};
    if (get_all(o, v, specs, 14) < 0) return NULL;
    const volatile uint8_t *stop = v[13].held ? (const volatile uint8_t *)v[13].view.buf : NULL;
    int64_t *scratch = malloc(sizeof(int64_t) * ((size_t)k * (d + 1) + 2 * (size_t)n + (size_t)k + 1));
    float *newc = malloc(sizeof(float) * 2 * (size_t)k * d);
    Bounds bounds, *bd = NULL;
    double *dbl = NULL;
    if (k >= BOUNDS_MIN_K) {
        dbl = malloc(sizeof(double) * (2 * (size_t)n + 2 * (size_t)k));
        bounds.todo = malloc(sizeof(int) * ((size_t)n + 1));
        bounds.buf = malloc(sizeof(float) * (size_t)TILE * (d + 1));
        if (dbl && bounds.todo && bounds.buf) {
            bounds.upper = dbl, bounds.lower = dbl + n, bounds.half_sep = dbl + 2 * (size_t)n;
            bounds.move = bounds.half_sep + k;
            bd = &bounds;
        }
    }
    if (!scratch || !newc || (k >= BOUNDS_MIN_K && !bd)) {
        free(scratch), free(newc), free(dbl), release(v, 14);
        if (k >= BOUNDS_MIN_K) free(bounds.todo), free(bounds.buf);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS for (int p = 0; p < b; p++) {
        size_t off = (size_t)p * n;
        if (stop && *stop) break;
        Problem pr = {(const float *)v[0].view.buf + off * d, (const float *)v[1].view.buf + off,
                      (const int64_t *)v[2].view.buf + off * d, (const int64_t *)v[3].view.buf + off, n, k, d,
                      (int)((const int64_t *)v[5].view.buf)[p], max_iter, ((const double *)v[6].view.buf)[p],
                      ((const double *)v[7].view.buf)[p], ((const double *)v[8].view.buf)[p], stop};
        int conv = 0;
        int iters = lloyd_one(&pr, (float *)v[4].view.buf + (size_t)p * k * d, (int64_t *)v[9].view.buf + off,
                              (float *)v[10].view.buf + off, scratch, newc, &conv, bd);
        ((int64_t *)v[11].view.buf)[p] = iters;
        ((uint8_t *)v[12].view.buf)[p] = (uint8_t)conv;
    }
    Py_END_ALLOW_THREADS free(scratch);
    free(newc);
    if (bd) free(dbl), free(bounds.todo), free(bounds.buf);
    release(v, 14);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"nearest", py_nearest, METH_VARARGS, "Nearest (and second-nearest) centroid of every point."},
    {"lloyd_step", py_lloyd_step, METH_VARARGS, "Assignment plus fixed-point cluster sums."},
    {"kpp_potential", py_kpp_potential, METH_VARARGS, "k-means++ potential of candidate centres."},
    {"min_update", py_min_update, METH_VARARGS, "min(closest, squared distance to a centre)."},
    {"kmeans_pp", py_kmeans_pp, METH_VARARGS, "Weighted greedy k-means++ seeding, per problem."},
    {"lloyd", py_lloyd, METH_VARARGS, "The whole Lloyd loop, per problem."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "CPU k-means kernels.", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
