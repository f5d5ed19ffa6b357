/*
 * Serpentine Floyd-Steinberg error diffusion onto a fixed palette, with pngquant-style
 * error clamping and optional per-pixel strength and hysteresis (adaptive dithering). The inner loop
 * is sequential by nature (each pixel depends on the error of the previous one), so it is written
 * in C; the GIL is released so that several images dither in parallel on Python threads.
 *
 * fs_dither(image, classes, palette, flags, bounds, out, strength, hysteresis, height, width, dims, entries,
 *           max_error, min_error)
 *   image   float32 (height, width, dims), the pixels in the fitting colour space
 *   classes uint8   (height, width): 0 fully transparent, 1 opaque, 2 translucent
 *   palette float32 (entries, dims), same space
 *   flags   uint8   (entries): bit 1 usable by opaque pixels, bit 2 by translucent
 *           pixels, bit 4 the entry fully transparent pixels take
 *   bounds  float32 (dims, 2): a target colour is clamped to [low, high] per channel
 *   out     int32   (height, width), written
 *   strength float32 (height, width) or None: the diffused error reaching a pixel is scaled by its
 *           strength (adaptive dithering: 0 next to hard edges); None means 1 everywhere
 *   hysteresis float32 (height, width) or None: h >= 0 per pixel; the entry is chosen for the pixel
 *           plus 1 / (1 + h) of the (scaled) diffused error, while the whole error target - entry is
 *           passed on: a pixel leaves its own nearest entry only once the error is large, and the
 *           local mean is kept (adaptive dithering in noisy areas); None means 0 everywhere
 *   max_error: quantization errors longer than this are damped by 0.75
 *   min_error: a scaled diffused error shorter than this is dropped (the pixel is mapped
 *           undithered, as pngquant does for negligible error: fewer isolated dots, smaller files)
 *
 * Nearest-entry search is exact: it starts from the previous pixel's entry g and walks
 * g's neighbours in order of distance, stopping once a neighbour is more than twice
 * as far from g as the pixel is (triangle inequality: nothing further can be nearer).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DIMS 4
#define MAX_SORTED_ENTRIES 2048

typedef struct {
    const float *palette;
    int entries, dims;
    float *pair_dist;  /* entries x entries, sorted per row, or NULL for brute force */
    int *pair_index;   /* entries x entries */
} Palette;

static float dist2(const float *a, const float *b, int dims) {
    float s = 0.0f;
    for (int d = 0; d < dims; d++) {
        float t = a[d] - b[d];
        s += t * t;
    }
    return s;
}

static const float *sort_key;
static int cmp_by_key(const void *a, const void *b) {
    float x = sort_key[*(const int *)a], y = sort_key[*(const int *)b];
    if (x < y) return -1;
    if (x > y) return 1;
    return (*(const int *)a) - (*(const int *)b);
}

static int build_neighbours(Palette *p) {
    int n = p->entries;
    if (n > MAX_SORTED_ENTRIES) {
        p->pair_dist = NULL;
        p->pair_index = NULL;
        return 0;
    }
    p->pair_dist = malloc(sizeof(float) * n * n);
    p->pair_index = malloc(sizeof(int) * n * n);
    float *row = malloc(sizeof(float) * n);
    if (!p->pair_dist || !p->pair_index || !row) {
        free(p->pair_dist);
        free(p->pair_index);
        free(row);
        return -1;
    }
    for (int g = 0; g < n; g++) {
        int *idx = p->pair_index + (size_t)g * n;
        for (int j = 0; j < n; j++) {
            row[j] = sqrtf(dist2(p->palette + (size_t)g * p->dims, p->palette + (size_t)j * p->dims, p->dims));
            idx[j] = j;
        }
        sort_key = row; /* single-threaded here: called before the GIL is released */
        qsort(idx, n, sizeof(int), cmp_by_key);
        for (int j = 0; j < n; j++) p->pair_dist[(size_t)g * n + j] = row[idx[j]];
    }
    free(row);
    return 0;
}

/* Nearest usable entry to x; ties go to the lowest index, as argmin does. */
static int nearest(const Palette *p, const float *x, const unsigned char *flags, unsigned char need, int guess) {
    int best = -1;
    float best_d = INFINITY;
    if (guess < 0 || !(flags[guess] & need)) {
        guess = -1;
        for (int j = 0; j < p->entries; j++)
            if (flags[j] & need) {
                guess = j;
                break;
            }
        if (guess < 0) return 0;
    }
    if (p->pair_dist == NULL) {
        for (int j = 0; j < p->entries; j++) {
            if (!(flags[j] & need)) continue;
            float d = dist2(x, p->palette + (size_t)j * p->dims, p->dims);
            if (d < best_d) {
                best_d = d;
                best = j;
            }
        }
        return best;
    }
    float dg = sqrtf(dist2(x, p->palette + (size_t)guess * p->dims, p->dims));
    const float *pd = p->pair_dist + (size_t)guess * p->entries;
    const int *pi = p->pair_index + (size_t)guess * p->entries;
    for (int r = 0; r < p->entries; r++) {
        if (pd[r] > 2.0f * dg) break;
        int j = pi[r];
        if (!(flags[j] & need)) continue;
        float d = dist2(x, p->palette + (size_t)j * p->dims, p->dims);
        if (d < best_d || (d == best_d && j < best)) {
            best_d = d;
            best = j;
        }
    }
    return best;
}

typedef struct {
    int height, width;
    float max_error, min_error;
    const float *strength;   /* NULL: 1 everywhere */
    const float *hysteresis; /* NULL: 0 everywhere */
} Settings;

static void diffuse(const float *image, const unsigned char *classes, const Palette *p, const unsigned char *flags,
                    const float *bounds, int *out, const Settings *set, float *err_cur, float *err_next) {
    const int dims = p->dims, height = set->height, width = set->width;
    const float max_error2 = set->max_error * set->max_error, min_error2 = set->min_error * set->min_error;
    int transparent_entry = 0;
    for (int j = 0; j < p->entries; j++)
        if (flags[j] & 4) {
            transparent_entry = j;
            break;
        }
    memset(err_cur, 0, sizeof(float) * (width + 2) * dims);
    memset(err_next, 0, sizeof(float) * (width + 2) * dims);
    int guess = -1;
    for (int y = 0; y < height; y++) {
        const int forward = (y % 2 == 0);
        const int step = forward ? 1 : -1;
        for (int i = 0; i < width; i++) {
            const int x = forward ? i : width - 1 - i;
            const size_t at = (size_t)y * width + x;
            float *e_here = err_cur + (size_t)(x + 1) * dims;
            if (classes[at] == 0) {
                out[at] = transparent_entry;
                continue; /* invisible: takes no error and passes none on */
            }
            float target[MAX_DIMS], spread[MAX_DIMS], choice[MAX_DIMS];
            const float s = set->strength ? set->strength[at] : 1.0f;
            float s2 = 0.0f;
            for (int d = 0; d < dims; d++) {
                spread[d] = e_here[d] * s;
                s2 += spread[d] * spread[d];
            }
            const int keep = s2 >= min_error2;
            const float seen = 1.0f / (1.0f + (set->hysteresis ? set->hysteresis[at] : 0.0f));
            for (int d = 0; d < dims; d++) {
                float v = keep ? image[at * dims + d] + spread[d] : image[at * dims + d];
                float c = keep ? image[at * dims + d] + spread[d] * seen : image[at * dims + d];
                float lo = bounds[2 * d], hi = bounds[2 * d + 1];
                target[d] = v < lo ? lo : (v > hi ? hi : v);
                choice[d] = c < lo ? lo : (c > hi ? hi : c);
            }
            const unsigned char need = classes[at] == 1 ? 1 : 2;
            int j = nearest(p, choice, flags, need, guess);
            out[at] = j;
            guess = j;
            float err[MAX_DIMS];
            float e2 = 0.0f;
            for (int d = 0; d < dims; d++) {
                err[d] = target[d] - p->palette[(size_t)j * dims + d];
                e2 += err[d] * err[d];
            }
            if (e2 > max_error2)
                for (int d = 0; d < dims; d++) err[d] *= 0.75f;
            float *e_ahead = err_cur + (size_t)(x + 1 + step) * dims;
            float *e_below_behind = err_next + (size_t)(x + 1 - step) * dims;
            float *e_below = err_next + (size_t)(x + 1) * dims;
            float *e_below_ahead = err_next + (size_t)(x + 1 + step) * dims;
            for (int d = 0; d < dims; d++) {
                e_ahead[d] += err[d] * (7.0f / 16.0f);
                e_below_behind[d] += err[d] * (3.0f / 16.0f);
                e_below[d] += err[d] * (5.0f / 16.0f);
                e_below_ahead[d] += err[d] * (1.0f / 16.0f);
            }
        }
        float *t = err_cur;
        err_cur = err_next;
        err_next = t;
        memset(err_next, 0, sizeof(float) * (width + 2) * dims);
    }
}

static int get(PyObject *obj, Py_buffer *view, Py_ssize_t expected, int writable, const char *name) {
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS : PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (view->len != expected) {
        PyErr_Format(PyExc_ValueError, "%s has %zd bytes, expected %zd", name, view->len, expected);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *fs_dither(PyObject *self, PyObject *args) {
    PyObject *o_image, *o_classes, *o_palette, *o_flags, *o_bounds, *o_out, *o_strength, *o_hysteresis;
    int height, width, dims, entries;
    float max_error, min_error;
    if (!PyArg_ParseTuple(args, "OOOOOOOOiiiiff", &o_image, &o_classes, &o_palette, &o_flags, &o_bounds, &o_out,
                          &o_strength, &o_hysteresis, &height, &width, &dims, &entries, &max_error, &min_error))
        return NULL;
    if (dims < 1 || dims > MAX_DIMS || entries < 1 || height < 1 || width < 1) {
        PyErr_SetString(PyExc_ValueError, "bad dimensions");
        return NULL;
    }
    Py_buffer b_image, b_classes, b_palette, b_flags, b_bounds, b_out;
    const Py_ssize_t n = (Py_ssize_t)height * width;
    if (get(o_image, &b_image, n * dims * 4, 0, "image") < 0) return NULL;
    if (get(o_classes, &b_classes, n, 0, "classes") < 0) goto fail_image;
    if (get(o_palette, &b_palette, (Py_ssize_t)entries * dims * 4, 0, "palette") < 0) goto fail_classes;
    if (get(o_flags, &b_flags, entries, 0, "flags") < 0) goto fail_palette;
    if (get(o_bounds, &b_bounds, (Py_ssize_t)dims * 2 * 4, 0, "bounds") < 0) goto fail_flags;
    if (get(o_out, &b_out, n * 4, 1, "out") < 0) goto fail_bounds;
    Py_buffer b_strength = {0};
    const int has_strength = o_strength != Py_None;
    if (has_strength && get(o_strength, &b_strength, n * 4, 0, "strength") < 0) goto fail_out;
    Py_buffer b_hysteresis = {0};
    const int has_hysteresis = o_hysteresis != Py_None;
    if (has_hysteresis && get(o_hysteresis, &b_hysteresis, n * 4, 0, "hysteresis") < 0) goto fail_strength;
    Settings set = {height, width, max_error, min_error, has_strength ? (const float *)b_strength.buf : NULL,
                    has_hysteresis ? (const float *)b_hysteresis.buf : NULL};

    Palette p = {(const float *)b_palette.buf, entries, dims, NULL, NULL};
    float *err_cur = malloc(sizeof(float) * (width + 2) * dims);
    float *err_next = malloc(sizeof(float) * (width + 2) * dims);
    if (!err_cur || !err_next || build_neighbours(&p) < 0) {
        free(err_cur);
        free(err_next);
        PyErr_NoMemory();
        goto fail_hysteresis;
    }
    Py_BEGIN_ALLOW_THREADS diffuse((const float *)b_image.buf, (const unsigned char *)b_classes.buf, &p,
                                   (const unsigned char *)b_flags.buf, (const float *)b_bounds.buf, (int *)b_out.buf,
                                   &set, err_cur, err_next);
    Py_END_ALLOW_THREADS free(err_cur);
    free(err_next);
    free(p.pair_dist);
    free(p.pair_index);
    if (has_hysteresis) PyBuffer_Release(&b_hysteresis);
    if (has_strength) PyBuffer_Release(&b_strength);
    PyBuffer_Release(&b_out);
    PyBuffer_Release(&b_bounds);
    PyBuffer_Release(&b_flags);
    PyBuffer_Release(&b_palette);
    PyBuffer_Release(&b_classes);
    PyBuffer_Release(&b_image);
    Py_RETURN_NONE;

fail_hysteresis:
    if (has_hysteresis) PyBuffer_Release(&b_hysteresis);
fail_strength:
    if (has_strength) PyBuffer_Release(&b_strength);
fail_out:
    PyBuffer_Release(&b_out);
fail_bounds:
    PyBuffer_Release(&b_bounds);
fail_flags:
    PyBuffer_Release(&b_flags);
fail_palette:
    PyBuffer_Release(&b_palette);
fail_classes:
    PyBuffer_Release(&b_classes);
fail_image:
    PyBuffer_Release(&b_image);
    return NULL;
}

static PyMethodDef methods[] = {
    {"fs_dither", fs_dither, METH_VARARGS, "Serpentine Floyd-Steinberg onto a palette (see the module source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fsdither", "Floyd-Steinberg dithering kernel.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__fsdither(void) { return PyModule_Create(&module); }
