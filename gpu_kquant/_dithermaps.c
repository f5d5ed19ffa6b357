/* CPU kernels for the per-pixel maps of adaptive dithering (gpu_kquant/dither.py).
 *
 * noise_ramp and local_variance compute what the torch code of dither.noise_ramp and
 * metrics.local_variance computes, in one pass each over an (H, W, D) float32 image,
 * with float64 sums (so the results agree with the float32 torch code to about 1e-6 of the
 * values, not bit for bit; an adaptive quantize's labels differed in 0-4 pixels of 0.13-0.27 MP on
 * 10 photo cases). Measured on a 1-MP photo, one thread, the other core busy: noise ramp 0.016 s
 * against 0.13 s in torch, local variance 0.07 s against 0.22 s. run_gate and hard_edges compute
 * dither.run_gate's and dither.hard_edges' numpy definitions exactly (float32 steps, as numpy). Every entry point releases the GIL and runs on one thread.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "_buffers.h"
#include "_clones.h"

#define MAX_RADIUS 32

/* Index i of a line of n samples, mirrored at the ends without repeating them (torch's
 * "reflect" padding), or clamped (replicate) where the line is too short to mirror. */
INLINE Py_ssize_t border(Py_ssize_t i, Py_ssize_t n, int reflect) {
    if (i < 0) return reflect ? -i : 0;
    if (i >= n) return reflect ? 2 * (n - 1) - i : n - 1;
    return i;
}

/* ------------------------------------------------------------------ noise ramp */

/* out[y, x] = clamp((noise / level - low) / (high - low), 0, 1), where noise is the mean over
 * a (2r + 1)^2 box (replicated borders) of (|horizontal| + |vertical| second difference) / 2,
 * each averaged over the D channels (replicated borders). */
CPU_CLONES static void noise_ramp(const float *p, float *out, Py_ssize_t h, Py_ssize_t w, int d, int r, double level,
                                  double low, double high, double *rough, double *rows) {
    for (Py_ssize_t y = 0; y < h; y++) {
        const float *up = p + border(y - 1, h, 0) * w * d, *row = p + y * w * d, *down = p + border(y + 1, h, 0) * w * d;
        for (Py_ssize_t x = 0; x < w; x++) {
            Py_ssize_t l = border(x - 1, w, 0) * d, c = x * d, rr = border(x + 1, w, 0) * d;
            double dx = 0.0, dy = 0.0;
            for (int k = 0; k < d; k++) {
                double v2 = 2.0 * row[c + k];
                dx += fabs((double)row[l + k] + row[rr + k] - v2);
                dy += fabs((double)up[c + k] + down[c + k] - v2);
            }
            rough[y * w + x] = (dx + dy) / (2.0 * d);
        }
    }
    for (Py_ssize_t y = 0; y < h; y++) { /* the box, by running sums: rows first */
        const double *src = rough + y * w;
        double s = 0.0;
        for (int i = -r; i <= r; i++) s += src[border(i, w, 0)];
        for (Py_ssize_t x = 0; x < w; x++) {
            rows[y * w + x] = s;
            s += src[border(x + r + 1, w, 0)] - src[border(x - r, w, 0)];
        }
    }
    double area = (double)(2 * r + 1) * (2 * r + 1), scale = 1.0 / (level * (high - low)), offset = low / (high - low);
    double *cols = rough; /* the rough values are no longer needed: the first row of it holds column sums */
    for (Py_ssize_t x = 0; x < w; x++) cols[x] = 0.0;
    for (int i = -r; i <= r; i++)
        for (Py_ssize_t x = 0; x < w; x++) cols[x] += rows[border(i, h, 0) * w + x];
    for (Py_ssize_t y = 0; y < h; y++) { /* then columns */
        const double *add = rows + border(y + r + 1, h, 0) * w, *drop = rows + border(y - r, h, 0) * w;
        for (Py_ssize_t x = 0; x < w; x++) {
            double t = (cols[x] / area) * scale - offset;
            out[y * w + x] = (float)(t < 0.0 ? 0.0 : t > 1.0 ? 1.0 : t);
            cols[x] += add[x] - drop[x];
        }
    }
}

static PyObject *py_noise_ramp(PyObject *self, PyObject *args) {
    PyObject *o[2];
    Py_ssize_t h, w;
    int d, r;
    double level, low, high;
    if (!PyArg_ParseTuple(args, "OOnniiddd", &o[0], &o[1], &h, &w, &d, &r, &level, &low, &high)) return NULL;
    (void)self;
    if (h < 1 || w < 1 || d < 1 || r < 0 || r > MAX_RADIUS || !(level > 0.0) || !(high > low)) {
        PyErr_SetString(PyExc_ValueError, "noise_ramp: bad sizes or levels");
        return NULL;
    }
    Buf b[2];
    const Spec specs[2] = {{h * w * d, 4, 0, "points"}, {h * w, 4, 1, "out"}};
    if (get_all(o, b, specs, 2) < 0) return NULL;
    double *scratch = malloc(2 * (size_t)h * w * sizeof *scratch);
    if (!scratch) {
        release(b, 2);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    noise_ramp(b[0].view.buf, b[1].view.buf, h, w, d, r, level, low, high, scratch, scratch + (size_t)h * w);
    Py_END_ALLOW_THREADS
    free(scratch);
    release(b, 2);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ local variance */

/* The horizontal pass of source row y: for each of the D + 1 maps (the channels and the sum of
 * their squares), the separable kernel along the row; out holds W * (D + 1) values, map-major. */
INLINE void blur_row(const float *row, double *out, Py_ssize_t w, int d, const double *kernel, int r, double *maps) {
    int m = d + 1, reflect = w > r;
    for (Py_ssize_t x = 0; x < w; x++) {
        double sq = 0.0;
        for (int k = 0; k < d; k++) {
            double v = row[x * d + k];
            maps[k * w + x] = v;
            sq += v * v;
        }
        maps[d * w + x] = sq;
    }
    for (int k = 0; k < m; k++) { /* tap by tap over the whole row, so the inner loop vectorises */
        const double *src = maps + k * w;
        double *dst = out + k * w;
        Py_ssize_t lo = r < w ? r : w, hi = w - r > lo ? w - r : lo; /* [lo, hi): every tap inside the row */
        for (Py_ssize_t x = lo; x < hi; x++) dst[x] = 0.0;
        for (int i = -r; i <= r; i++) {
            double c = kernel[i + r];
            for (Py_ssize_t x = lo; x < hi; x++) dst[x] += c * src[x + i];
        }
        for (Py_ssize_t x = 0; x < w; x++) {
            if (x == lo) x = hi;
            if (x >= w) break;
            double s = 0.0;
            for (int i = -r; i <= r; i++) s += kernel[i + r] * src[border(x + i, w, reflect)];
            dst[x] = s;
        }
    }
}

/* out[y, x] = (blur(sum of squares) - sum over channels of blur(channel)^2) / D, at least 0;
 * blur: the separable kernel of 2r + 1 taps, reflected borders (replicated where a side is
 * not longer than r). The horizontal passes of the 2r + 1 rows in reach are kept in a ring. */
CPU_CLONES static void local_variance(const float *p, float *out, Py_ssize_t h, Py_ssize_t w, int d,
                                      const double *kernel, int r, double *ring, Py_ssize_t *tags, double *maps,
                                      double *sums) {
    int taps = 2 * r + 1, m = d + 1, reflect = h > r;
    size_t stride = (size_t)w * m;
    for (int i = 0; i < taps; i++) tags[i] = -1;
    for (Py_ssize_t y = 0; y < h; y++) {
        const double *src[2 * MAX_RADIUS + 1];
        for (int i = -r; i <= r; i++) { /* the rows in reach lie within 2r + 1 consecutive ones */
            Py_ssize_t sy = border(y + i, h, reflect);
            int slot = (int)(sy % taps);
            if (tags[slot] != sy) {
                blur_row(p + sy * w * d, ring + slot * stride, w, d, kernel, r, maps);
                tags[slot] = sy;
            }
            src[i + r] = ring + slot * stride;
        }
        for (int k = 0; k < m; k++) { /* the vertical pass, tap by tap over the row */
            double *acc = sums + k * w;
            for (Py_ssize_t x = 0; x < w; x++) acc[x] = 0.0;
            for (int i = 0; i < taps; i++) {
                const double *s = src[i] + k * w;
                double c = kernel[i];
                for (Py_ssize_t x = 0; x < w; x++) acc[x] += c * s[x];
            }
        }
        for (Py_ssize_t x = 0; x < w; x++) {
            double means = 0.0;
            for (int k = 0; k < d; k++) means += sums[k * w + x] * sums[k * w + x];
            double v = (sums[d * w + x] - means) / d;
            out[y * w + x] = (float)(v > 0.0 ? v : 0.0);
        }
    }
}

static PyObject *py_local_variance(PyObject *self, PyObject *args) {
    PyObject *o[3];
    Py_ssize_t h, w;
    int d, r;
    if (!PyArg_ParseTuple(args, "OOOnnii", &o[0], &o[1], &o[2], &h, &w, &d, &r)) return NULL;
    (void)self;
    if (h < 1 || w < 1 || d < 1 || r < 0 || r > MAX_RADIUS) {
        PyErr_SetString(PyExc_ValueError, "local_variance: bad sizes");
        return NULL;
    }
    Buf b[3];
    const Spec specs[3] = {{h * w * d, 4, 0, "points"}, {2 * r + 1, 8, 0, "kernel"}, {h * w, 4, 1, "out"}};
    if (get_all(o, b, specs, 3) < 0) return NULL;
    size_t ring_items = (size_t)(2 * r + 1) * w * (d + 1), map_items = (size_t)w * (d + 1);
    double *scratch = malloc((ring_items + 2 * map_items) * sizeof *scratch);
    Py_ssize_t *tags = malloc((size_t)(2 * r + 1) * sizeof *tags);
    if (!scratch || !tags) {
        free(scratch);
        free(tags);
        release(b, 3);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    local_variance(b[0].view.buf, b[2].view.buf, h, w, d, b[1].view.buf, r, scratch, tags, scratch + ring_items,
                   scratch + ring_items + map_items);
    Py_END_ALLOW_THREADS
    free(scratch);
    free(tags);
    release(b, 3);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ run gate */

/* out[y, x] = 1 - 20 / (20 + 10 n + 15 m) for the horizontal run of equal labels holding (y, x): n its
 * length, m how many of its pixels' labels equal the one directly above, plus those equal to the one
 * below (dither.run_gate's definition, in double as numpy sums it, then float32). */
static void run_gate(const long long *labels, float *out, Py_ssize_t h, Py_ssize_t w) {
    for (Py_ssize_t y = 0; y < h; y++) {
        const long long *row = labels + y * w, *up = y > 0 ? row - w : NULL, *down = y + 1 < h ? row + w : NULL;
        for (Py_ssize_t x0 = 0, x1; x0 < w; x0 = x1) {
            long long same = 0;
            for (x1 = x0; x1 < w && row[x1] == row[x0]; x1++)
                same += (up && up[x1] == row[x1]) + (down && down[x1] == row[x1]);
            const float g = (float)(1.0 - 20.0 / (20.0 + 10.0 * (double)(x1 - x0) + 15.0 * (double)same));
            for (Py_ssize_t x = x0; x < x1; x++) out[y * w + x] = g;
        }
    }
}

static PyObject *py_run_gate(PyObject *self, PyObject *args) {
    PyObject *o[2];
    Py_ssize_t h, w;
    if (!PyArg_ParseTuple(args, "OOnn", &o[0], &o[1], &h, &w)) return NULL;
    (void)self;
    if (h < 1 || w < 1) {
        PyErr_SetString(PyExc_ValueError, "run_gate: bad sizes");
        return NULL;
    }
    Buf b[2];
    const Spec specs[2] = {{h * w, 8, 0, "labels"}, {h * w, 4, 1, "out"}};
    if (get_all(o, b, specs, 2) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    run_gate(b[0].view.buf, b[1].view.buf, h, w);
    Py_END_ALLOW_THREADS
    release(b, 2);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ hard edges */

/* The largest channel of |b - a| over d channels, in float32 as numpy computes it. */
INLINE float largest_step(const float *a, const float *b, int d) {
    float m = fabsf(b[0] - a[0]);
    for (int c = 1; c < d; c++) {
        const float t = fabsf(b[c] - a[c]);
        m = t > m ? t : m;
    }
    return m;
}

/* Whether step s (between samples i and i + 1) is hard: at least `step`, and the steps before and
 * after it (0 beyond the ends) at most flat x s. */
INLINE int hard(float before, float s, float after, float step, float flat) {
    return s >= step && before <= flat * s && after <= flat * s;
}

/* out[y, x] = 1 where a hard step (dither.hard_edges' definition, before the dilation) touches the
 * pixel, down the columns or along the rows. steps: 3 x w floats of scratch. */
static void hard_edges(const float *p, unsigned char *out, Py_ssize_t h, Py_ssize_t w, int d, float step, float flat,
                       float *steps) {
    memset(out, 0, (size_t)h * w);
    float *before = steps, *here = steps + w, *after = steps + 2 * w;
    for (Py_ssize_t x = 0; x < w; x++) before[x] = 0.0f;
    if (h > 1)
        for (Py_ssize_t x = 0; x < w; x++) here[x] = largest_step(p + x * d, p + (w + x) * d, d);
    for (Py_ssize_t y = 0; y + 1 < h; y++) { /* here: the steps between rows y and y + 1 */
        for (Py_ssize_t x = 0; x < w; x++)
            after[x] = y + 2 < h ? largest_step(p + ((y + 1) * w + x) * d, p + ((y + 2) * w + x) * d, d) : 0.0f;
        for (Py_ssize_t x = 0; x < w; x++)
            if (hard(before[x], here[x], after[x], step, flat)) out[y * w + x] = out[(y + 1) * w + x] = 1;
        float *t = before;
        before = here;
        here = after;
        after = t;
    }
    for (Py_ssize_t y = 0; y < h; y++) {
        const float *row = p + y * w * d;
        float *s = steps; /* the w - 1 steps along the row */
        for (Py_ssize_t x = 0; x + 1 < w; x++) s[x] = largest_step(row + x * d, row + (x + 1) * d, d);
        for (Py_ssize_t x = 0; x + 1 < w; x++) {
            const float prev = x > 0 ? s[x - 1] : 0.0f, next = x + 2 < w ? s[x + 1] : 0.0f;
            if (hard(prev, s[x], next, step, flat)) out[y * w + x] = out[y * w + x + 1] = 1;
        }
    }
}

static PyObject *py_hard_edges(PyObject *self, PyObject *args) {
    PyObject *o[2];
    Py_ssize_t h, w;
    int d;
    double step, flat;
    if (!PyArg_ParseTuple(args, "OOnnidd", &o[0], &o[1], &h, &w, &d, &step, &flat)) return NULL;
    (void)self;
    if (h < 1 || w < 1 || d < 1) {
        PyErr_SetString(PyExc_ValueError, "hard_edges: bad sizes");
        return NULL;
    }
    Buf b[2];
    const Spec specs[2] = {{h * w * d, 4, 0, "points"}, {h * w, 1, 1, "out"}};
    if (get_all(o, b, specs, 2) < 0) return NULL;
    float *steps = malloc(sizeof(float) * 3 * (size_t)w);
    if (!steps) {
        release(b, 2);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    hard_edges(b[0].view.buf, b[1].view.buf, h, w, d, (float)step, (float)flat, steps);
    Py_END_ALLOW_THREADS
    free(steps);
    release(b, 2);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"noise_ramp", py_noise_ramp, METH_VARARGS,
     "noise_ramp(points, out, h, w, d, radius, level, low, high): adaptive dithering's noise ramp (float32)"},
    {"local_variance", py_local_variance, METH_VARARGS,
     "local_variance(points, kernel, out, h, w, d, radius): channel-mean variance in a separable window (float32)"},
    {"run_gate", py_run_gate, METH_VARARGS, "run_gate(labels, out, h, w): pngquant's run gate of int64 labels (float32)"},
    {"hard_edges", py_hard_edges, METH_VARARGS,
     "hard_edges(points, out, h, w, d, step, flat): pixels touching a hard step (uint8), before the dilation"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_dithermaps", "Per-pixel maps of adaptive dithering.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__dithermaps(void) { return PyModule_Create(&module); }
