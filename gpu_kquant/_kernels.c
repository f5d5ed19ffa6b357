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
#include <string.h>

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

typedef struct {
    Py_buffer view;
    int held;
} Buf;

static int get(PyObject *obj, Buf *b, Py_ssize_t items, Py_ssize_t itemsize, int writable, const char *name) {
    b->held = 0;
    if (obj == Py_None) return 0;
    if (PyObject_GetBuffer(obj, &b->view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0) return -1;
    b->held = 1;
    if (b->view.itemsize != itemsize || b->view.len != items * itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd items of %zd bytes", name, items, itemsize);
        return -1;
    }
    return 0;
}

static void release(Buf *bufs, int n) {
    for (int i = 0; i < n; i++)
        if (bufs[i].held) PyBuffer_Release(&bufs[i].view);
}

static int check_dims(int b, int n, int k, int d) {
    if (b < 0 || n < 0 || k < 1 || d < 1 || d > MAX_DIM) {
        PyErr_Format(PyExc_ValueError, "bad shape: B=%d N=%d k=%d D=%d (1 <= D <= %d)", b, n, k, d, MAX_DIM);
        return -1;
    }
    return 0;
}

/* Assignment of every point, optionally with fixed-point sums (qx/qw given). */
static void assign_all(const float *pts, const float *cen, int b, int n, int k, int d, int64_t *labels, float *d2,
                       float *d2nd, const int64_t *qx, const int64_t *qw, int64_t *sums, int64_t *mass) {
    float soa[MAX_DIM * TILE];
    int32_t lab[TILE];
    for (int p = 0; p < b; p++) {
        const float *pp = pts + (size_t)p * n * d;
        const float *cp = cen + (size_t)p * k * d;
        for (int s = 0; s < n; s += TILE) {
            int m = n - s < TILE ? n - s : TILE;
            size_t off = (size_t)p * n + s;
            to_soa(pp + (size_t)s * d, m, d, soa);
            tile_nearest(soa, m, d, cp, k, lab, d2 + off, d2nd ? d2nd + off : NULL);
            for (int i = 0; i < m; i++) labels[off + i] = lab[i];
            if (!sums) continue;
            for (int i = 0; i < m; i++) {
                int64_t *dst = sums + ((size_t)p * k + lab[i]) * d;
                const int64_t *src = qx + (off + i) * d;
                for (int j = 0; j < d; j++) dst[j] += src[j];
                mass[(size_t)p * k + lab[i]] += qw[off + i];
            }
        }
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

static PyMethodDef methods[] = {
    {"nearest", py_nearest, METH_VARARGS, "Nearest (and second-nearest) centroid of every point."},
    {"lloyd_step", py_lloyd_step, METH_VARARGS, "Assignment plus fixed-point cluster sums."},
    {"kpp_potential", py_kpp_potential, METH_VARARGS, "k-means++ potential of candidate centres."},
    {"min_update", py_min_update, METH_VARARGS, "min(closest, squared distance to a centre)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "CPU k-means kernels.", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
