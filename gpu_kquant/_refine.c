/*
 * Perceptual refinement of a dithered index map (direct binary search, issue 15): each pixel in turn
 * moves to one of its entry's palette neighbours when that lowers
 *     J = ||G * E||^2 + sum_p lam_p |E_p|^2,   E = palette[labels] - image,
 * G a Gaussian (the eye's blur, sigma 1 px), E zero outside the image. The first term is what a viewer
 * sees (the error of local means), the second keeps each pixel near its own colour (less dither noise).
 * g = dJ/dE / 2 = A E + lam E (per pixel), A = G^T G = a (x) a with a the 1-D autocorrelation of G's 1-D kernel;
 * moving pixel p by d changes J by 2 d.g_p + |d|^2 (a(0)^2 + lam_p), and g is then updated in the
 * (2R+1)^2 box around p (R the radius of a). Pixels are visited by phase: all (y, x) with
 * y = py (mod P), x = px (mod P), P = R + 1 > R apart, do not interact, so the result equals the
 * vectorised reference (gpu_kquant.refine._refine_torch) that updates a whole phase at once.
 *
 * refine(image, classes, palette, flags, neighbours, locked, labels, grad, a, lam, height, width, dims,
 *        entries, count, tol, sweeps) -> number of moves
 *   image      float32 (height, width, dims), the pixels in the fitting colour space
 *   classes    uint8   (height, width): 0 fully transparent (never moves), 1 opaque, 2 translucent
 *   palette    float32 (entries, dims)
 *   flags      uint8   (entries): bit 1 usable by opaque pixels, bit 2 by translucent pixels
 *   neighbours int32   (entries, count): each entry's candidates, nearest first
 *   locked     uint8   (height, width) or None: pixels that never move (next to hard edges)
 *   labels     int32   (height, width), read and written
 *   grad       float32 (height, width, dims), g for the given labels, read and written
 *   a          float32 (2R+1): the 1-D autocorrelation of the eye's kernel
 *   lam        float32 (height, width): the weight of each pixel's own error
 *   tol        a move must lower J by more than this
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#include "_buffers.h"

#define MAX_DIMS 4

typedef struct {
    const float *image, *palette, *a;
    const unsigned char *classes, *flags, *locked;
    const int *neighbours;
    int *labels;
    float *grad;
    int height, width, dims, entries, count, radius;
    const float *lam; /* per pixel */
    float tol;
} Problem;

/* The best move of pixel `at` (-1: none lowers J by more than tol). */
static int best_move(const Problem *q, size_t at) {
    const float center = q->a[q->radius] * q->a[q->radius] + q->lam[at];
    const int dims = q->dims, cur = q->labels[at];
    const unsigned char need = q->classes[at] == 1 ? 1 : 2;
    const float *g = q->grad + at * dims, *pc = q->palette + (size_t)cur * dims;
    int best = -1;
    float best_dj = -q->tol;
    for (int r = 0; r < q->count; r++) {
        const int c = q->neighbours[(size_t)cur * q->count + r];
        if (c < 0 || c == cur || !(q->flags[c] & need)) continue;
        const float *pn = q->palette + (size_t)c * dims;
        float lin = 0.0f, sq = 0.0f;
        for (int d = 0; d < dims; d++) {
            const float t = pn[d] - pc[d];
            lin += t * g[d];
            sq += t * t;
        }
        const float dj = 2.0f * lin + center * sq;
        if (dj < best_dj) {
            best_dj = dj;
            best = c;
        }
    }
    return best;
}

/* Move pixel (y, x) to entry c and update g in the box around it. */
static void move(const Problem *q, int y, int x, int c) {
    const int dims = q->dims, R = q->radius;
    const size_t at = (size_t)y * q->width + x;
    float delta[MAX_DIMS];
    for (int d = 0; d < dims; d++)
        delta[d] = q->palette[(size_t)c * dims + d] - q->palette[(size_t)q->labels[at] * dims + d];
    q->labels[at] = c;
    const int y0 = y - R < 0 ? 0 : y - R, y1 = y + R >= q->height ? q->height - 1 : y + R;
    const int x0 = x - R < 0 ? 0 : x - R, x1 = x + R >= q->width ? q->width - 1 : x + R;
    for (int v = y0; v <= y1; v++) {
        const float av = q->a[v - y + R];
        float *row = q->grad + ((size_t)v * q->width) * dims;
        for (int u = x0; u <= x1; u++) {
            const float w = av * q->a[u - x + R];
            for (int d = 0; d < dims; d++) row[(size_t)u * dims + d] += w * delta[d];
        }
    }
    for (int d = 0; d < dims; d++) q->grad[at * dims + d] += q->lam[at] * delta[d];
}

static long long sweep(const Problem *q) {
    const int P = q->radius + 1;
    long long moves = 0;
    for (int py = 0; py < P; py++)
        for (int px = 0; px < P; px++)
            for (int y = py; y < q->height; y += P)
                for (int x = px; x < q->width; x += P) {
                    const size_t at = (size_t)y * q->width + x;
                    if (q->classes[at] == 0 || (q->locked && q->locked[at])) continue;
                    const int c = best_move(q, at);
                    if (c >= 0) {
                        move(q, y, x, c);
                        moves++;
                    }
                }
    return moves;
}

static PyObject *py_refine(PyObject *self, PyObject *args) {
    PyObject *o[10];
    Problem q;
    int sweeps;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOiiiiifi", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7], &o[8], &o[9],
                          &q.height, &q.width, &q.dims, &q.entries, &q.count, &q.tol, &sweeps))
        return NULL;
    if (q.height < 1 || q.width < 1 || q.dims < 1 || q.dims > MAX_DIMS || q.entries < 1 || q.count < 1) {
        PyErr_SetString(PyExc_ValueError, "refine: bad shape");
        return NULL;
    }
    const Py_ssize_t n = (Py_ssize_t)q.height * q.width;
    Buf v[10];
    memset(v, 0, sizeof v);
    if (get(o[0], &v[0], n * q.dims, 4, 0, "image") || get(o[1], &v[1], n, 1, 0, "classes") ||
        get(o[2], &v[2], (Py_ssize_t)q.entries * q.dims, 4, 0, "palette") ||
        get(o[3], &v[3], q.entries, 1, 0, "flags") ||
        get(o[4], &v[4], (Py_ssize_t)q.entries * q.count, 4, 0, "neighbours") ||
        get(o[5], &v[5], n, 1, 0, "locked") || get(o[6], &v[6], n, 4, 1, "labels") ||
        get(o[7], &v[7], n * q.dims, 4, 1, "grad") || get(o[9], &v[9], n, 4, 0, "lam"))
        goto fail;
    if (PyObject_GetBuffer(o[8], &v[8].view, PyBUF_C_CONTIGUOUS) < 0) goto fail;
    v[8].held = 1;
    if (v[8].view.itemsize != 4 || v[8].view.len % 8 != 4) {
        PyErr_SetString(PyExc_ValueError, "refine: a must be an odd number of float32");
        goto fail;
    }
    q.radius = (int)(v[8].view.len / 4 / 2);
    q.image = v[0].view.buf;
    q.classes = v[1].view.buf;
    q.palette = v[2].view.buf;
    q.flags = v[3].view.buf;
    q.neighbours = v[4].view.buf;
    q.locked = v[5].held ? v[5].view.buf : NULL;
    q.labels = v[6].view.buf;
    q.grad = v[7].view.buf;
    q.a = v[8].view.buf;
    q.lam = v[9].view.buf;
    for (Py_ssize_t i = 0; i < n; i++)
        if (q.labels[i] < 0 || q.labels[i] >= q.entries) {
            PyErr_SetString(PyExc_ValueError, "refine: label out of range");
            goto fail;
        }
    for (Py_ssize_t i = 0; i < (Py_ssize_t)q.entries * q.count; i++)
        if (q.neighbours[i] >= q.entries) {
            PyErr_SetString(PyExc_ValueError, "refine: neighbour out of range");
            goto fail;
        }
    long long moves = 0;
    Py_BEGIN_ALLOW_THREADS for (int s = 0; s < sweeps; s++) moves += sweep(&q);
    Py_END_ALLOW_THREADS release(v, 10);
    return PyLong_FromLongLong(moves);
fail:
    release(v, 10);
    return NULL;
}

static PyMethodDef methods[] = {
    {"refine", py_refine, METH_VARARGS, "Perceptual refinement of a dithered index map (see the module source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_refine", "Dithered index map refinement.", -1, methods};

PyMODINIT_FUNC PyInit__refine(void) { return PyModule_Create(&module); }
