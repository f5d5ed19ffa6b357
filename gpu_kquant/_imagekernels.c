/* CPU per-image kernels: colour sets, histogram bins, pixel -> palette lookup, error.
 *
 * The definitions are those of the torch code in gpu_kquant/colors.py and quantize.py,
 * bit for bit: a packed key holds channel i in bits 8i..8i+7 and keys are ordered as
 * signed int32 (RGBA keys with alpha >= 128 are negative); bins are numbered in
 * ascending bin-key order; bin means are int64 fixed-point sums with the scales the
 * caller computed (reduce.fixed_point_scales), divided as FixedPointSums.to_means
 * does. Compile with -ffp-contract=off. Every entry point releases the GIL and runs on
 * one thread: the pipeline runs one quantizer per core.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_buffers.h"

#define N_RGB_KEYS (1 << 24)


/* ------------------------------------------------------------------ radix sort */

/* Stable LSD radix sort of n keys (with optional payload) by their low `bits` bits,
 * one 8-bit digit per pass; a pass whose digit is the same for every key is skipped.
 * tk/tv are scratch of n items; the result is left in keys/vals. */
static void radix_sort(uint32_t *keys, uint32_t *vals, uint32_t *tk, uint32_t *tv, size_t n, int bits) {
    size_t hist[4][256];
    int passes = (bits + 7) / 8;
    memset(hist, 0, sizeof hist);
    for (size_t i = 0; i < n; i++) {
        uint32_t k = keys[i];
        for (int p = 0; p < passes; p++) hist[p][(k >> (8 * p)) & 255]++;
    }
    uint32_t *src = keys, *dst = tk, *vsrc = vals, *vdst = tv;
    for (int p = 0; p < passes; p++) {
        size_t *h = hist[p], sum = 0;
        int trivial = 0;
        for (int j = 0; j < 256; j++) {
            if (h[j] == n) trivial = 1;
            size_t c = h[j];
            h[j] = sum;
            sum += c;
        }
        if (trivial) continue;
        int shift = 8 * p;
        if (vsrc) {
            for (size_t i = 0; i < n; i++) {
                size_t at = h[(src[i] >> shift) & 255]++;
                dst[at] = src[i];
                vdst[at] = vsrc[i];
            }
        } else {
            for (size_t i = 0; i < n; i++) dst[h[(src[i] >> shift) & 255]++] = src[i];
        }
        uint32_t *t = src;
        src = dst;
        dst = t;
        t = vsrc;
        vsrc = vdst;
        vdst = t;
    }
    if (src != keys) {
        memcpy(keys, src, n * sizeof *keys);
        if (vals) memcpy(vals, vsrc, n * sizeof *vals);
    }
}

static inline uint32_t pixel_key(const uint8_t *p, int c) {
    uint32_t k = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16;
    return c == 4 ? k | (uint32_t)p[3] << 24 : k;
}

/* ------------------------------------------------------------------ colour set */

/* RGB pixels counted bucket by bucket: pixels are first scattered by their blue byte (the
 * key's top byte) into 256 buckets of 16-bit red-green keys, then each bucket is counted
 * in a 256 KB table that stays in L2 and its distinct keys are radix sorted. Measured on
 * a 4-MP photo mosaic (649k colours, 1 thread): 80 ms for counting in one 64 MB table,
 * whose random accesses miss the cache and TLB on nearly every pixel. */
static int64_t color_set_rgb_buckets(const uint8_t *px, size_t n, uint32_t *keys, int64_t *counts) {
    size_t start[257];
    memset(start, 0, sizeof start);
    for (size_t i = 0; i < n; i++) start[px[i * 3 + 2] + 1]++;
    for (int b = 0; b < 256; b++) start[b + 1] += start[b];
    uint16_t *low = malloc((n ? n : 1) * sizeof *low);
    uint32_t *count = calloc(1 << 16, sizeof *count);
    uint32_t *uniq = malloc(((size_t)1 << 17) * sizeof *uniq); /* distinct keys of one bucket + scratch */
    size_t pos[256];
    if (!low || !count || !uniq) {
        free(low);
        free(count);
        free(uniq);
        return -1;
    }
    memcpy(pos, start, sizeof pos);
    for (size_t i = 0; i < n; i++) {
        const uint8_t *p = px + i * 3;
        low[pos[p[2]]++] = (uint16_t)(p[0] | p[1] << 8);
    }
    size_t m = 0;
    for (int b = 0; b < 256; b++) {
        size_t u = 0;
        for (size_t i = start[b]; i < start[b + 1]; i++)
            if (count[low[i]]++ == 0) uniq[u++] = low[i];
        radix_sort(uniq, NULL, uniq + ((size_t)1 << 16), NULL, u, 16);
        for (size_t j = 0; j < u; j++) {
            keys[m] = (uint32_t)b << 16 | uniq[j];
            counts[m++] = count[uniq[j]];
            count[uniq[j]] = 0;
        }
    }
    free(low);
    free(count);
    free(uniq);
    return (int64_t)m;
}

/* Distinct keys of n pixels, ascending as int32, with counts and colours; returns their
 * number or -1. Large RGB images are counted bucket by bucket; the others sort all keys. */
static int64_t color_set(const uint8_t *px, size_t n, int c, int buckets, uint32_t *keys, int64_t *counts,
                         uint8_t *colors) {
    int64_t m = 0;
    if (buckets && c == 3) {
        m = color_set_rgb_buckets(px, n, keys, counts);
        if (m < 0) return -1;
    } else {
        uint32_t *all = malloc((n ? n : 1) * 2 * sizeof *all);
        if (!all) return -1;
        /* Flipping the sign bit makes unsigned order the signed int32 order. */
        uint32_t flip = c == 4 ? 0x80000000u : 0;
        for (size_t i = 0; i < n; i++) all[i] = pixel_key(px + i * c, c) ^ flip;
        radix_sort(all, NULL, all + n, NULL, n, c == 4 ? 32 : 24);
        for (size_t i = 0; i < n;) {
            size_t j = i + 1;
            while (j < n && all[j] == all[i]) j++;
            keys[m] = all[i] ^ flip;
            counts[m++] = (int64_t)(j - i);
            i = j;
        }
        free(all);
    }
    for (int64_t i = 0; i < m; i++)
        for (int j = 0; j < c; j++) colors[i * c + j] = (uint8_t)(keys[i] >> (8 * j));
    return m;
}

/* color_set(pixels, keys_out, counts_out, colors_out, N, C, buckets) -> M; outputs hold N items. */
static PyObject *py_color_set(PyObject *self, PyObject *args) {
    PyObject *o[4];
    Py_ssize_t n;
    int c, buckets;
    if (!PyArg_ParseTuple(args, "OOOOnip", &o[0], &o[1], &o[2], &o[3], &n, &c, &buckets)) return NULL;
    if (n < 0 || n > INT32_MAX || (c != 3 && c != 4)) {
        PyErr_SetString(PyExc_ValueError, "color_set: bad shape");
        return NULL;
    }
    Buf v[4];
    memset(v, 0, sizeof v);
    int64_t m = 0;
    if (get(o[0], &v[0], n * c, 1, 0, "pixels") || get(o[1], &v[1], n, 4, 1, "keys") ||
        get(o[2], &v[2], n, 8, 1, "counts") || get(o[3], &v[3], n * c, 1, 1, "colors"))
        goto fail;
    Py_BEGIN_ALLOW_THREADS m =
        color_set(v[0].view.buf, (size_t)n, c, buckets, v[1].view.buf, v[2].view.buf, v[3].view.buf);
    Py_END_ALLOW_THREADS if (m < 0) {
        PyErr_NoMemory();
        goto fail;
    }
    release(v, 4);
    return PyLong_FromLongLong(m);
fail:
    release(v, 4);
    return NULL;
}

/* ------------------------------------------------------------------ lookup */

static inline int64_t load_value(const uint8_t *values, size_t j, int size) {
    if (size == 1) return values[j];
    if (size == 2) return ((const int16_t *)values)[j];
    return ((const int32_t *)values)[j];
}

static inline void store_value(uint8_t *out, size_t i, int size, int64_t v) {
    if (size == 1) out[i] = (uint8_t)v;
    else if (size == 2) ((int16_t *)out)[i] = (int16_t)v;
    else ((int32_t *)out)[i] = (int32_t)v;
}

/* RGB: the values go into a dense table of values (entries of other colours are stale but
 * never read), then each pixel reads its own: one byte per entry for uint8 values keeps
 * the table at 16 MB. */
#define TABLE_LOOKUP(T)                                                                                        \
    do {                                                                                                       \
        T *tab = (T *)table, *dst = (T *)out;                                                                  \
        const T *val = (const T *)values;                                                                      \
        for (size_t j = 0; j < m; j++) tab[keys[j]] = val[j];                                                  \
        for (size_t i = 0; i < n; i++) dst[i] = tab[pixel_key(px + i * 3, 3)];                                 \
    } while (0)

/* out[i] = values[j] where keys[j] is pixel i's key: `size`-byte values (1, 2 or 4).
 * RGB uses `table` (2**24 entries of `size` bytes); RGBA searches the sorted keys,
 * reusing the last hit. */
static void lookup(const uint8_t *px, size_t n, int c, const int32_t *keys, size_t m, const uint8_t *values,
                   int size, uint8_t *table, uint8_t *out) {
    if (table) {
        if (size == 1) TABLE_LOOKUP(uint8_t);
        else if (size == 2) TABLE_LOOKUP(int16_t);
        else TABLE_LOOKUP(int32_t);
        return;
    }
    int32_t last_key = 0;
    size_t last = m; /* none yet */
    for (size_t i = 0; i < n; i++) {
        int32_t k = (int32_t)pixel_key(px + i * c, c);
        if (last == m || k != last_key) {
            size_t lo = 0, hi = m;
            while (lo < hi) {
                size_t mid = (lo + hi) / 2;
                if (keys[mid] < k) lo = mid + 1;
                else hi = mid;
            }
            last = lo < m ? lo : m - 1; /* every key belongs to the set */
            last_key = k;
        }
        store_value(out, i, size, load_value(values, last, size));
    }
}

/* lookup(pixels, keys, values, table_or_None, out, N, M, C, value_size) */
static PyObject *py_lookup(PyObject *self, PyObject *args) {
    PyObject *o[5];
    Py_ssize_t n, m;
    int c, size;
    if (!PyArg_ParseTuple(args, "OOOOOnnii", &o[0], &o[1], &o[2], &o[3], &o[4], &n, &m, &c, &size)) return NULL;
    if (n < 0 || m < 1 || (c != 3 && c != 4) || (size != 1 && size != 2 && size != 4) ||
        (c == 4 && o[3] != Py_None)) {
        PyErr_SetString(PyExc_ValueError, "lookup: bad shape, value size, or a table with RGBA");
        return NULL;
    }
    Buf v[5];
    memset(v, 0, sizeof v);
    if (get(o[0], &v[0], n * c, 1, 0, "pixels") || get(o[1], &v[1], m, 4, 0, "keys") ||
        get(o[2], &v[2], m, size, 0, "values") || get(o[3], &v[3], N_RGB_KEYS, size, 1, "table") ||
        get(o[4], &v[4], n, size, 1, "out")) {
        release(v, 5);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS lookup(v[0].view.buf, (size_t)n, c, v[1].view.buf, (size_t)m, v[2].view.buf, size,
                                  v[3].held ? v[3].view.buf : NULL, v[4].view.buf);
    Py_END_ALLOW_THREADS release(v, 5);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ histogram bins */

typedef struct {
    const uint8_t *colors;
    const int64_t *counts;
    const float *points;
    size_t m;
    int c, d, bits;
    double scale_x, scale_w;
} BinInput;

/* Bins of m weighted colours (see colors.bin_colors); returns the number of bins or -1.
 * Outputs hold m items: inverse (m), means (Q, d), bin_counts (Q), corners (Q, c). */
static int64_t bin_colors(const BinInput *in, int64_t *inverse, float *means, int64_t *bin_counts, uint8_t *corners) {
    size_t m = in->m;
    int c = in->c, d = in->d, bits = in->bits, drop = 8 - in->bits;
    uint32_t *buf = malloc((m ? m : 1) * 4 * sizeof *buf);
    int64_t *sums = malloc(((m ? m : 1) * (size_t)d + (m ? m : 1)) * sizeof *sums);
    if (!buf || !sums) {
        free(buf);
        free(sums);
        return -1;
    }
    uint32_t *key = buf, *idx = buf + m, *tk = buf + 2 * m, *tv = buf + 3 * m;
    for (size_t i = 0; i < m; i++) {
        uint32_t k = 0;
        for (int j = 0; j < c; j++) k |= (uint32_t)(in->colors[i * c + j] >> drop) << (bits * j);
        key[i] = k;
        idx[i] = (uint32_t)i;
    }
    radix_sort(key, idx, tk, tv, m, bits * c);
    int64_t *mass = sums + m * (size_t)d;
    int64_t q = -1;
    for (size_t r = 0; r < m; r++) {
        if (r == 0 || key[r] != key[r - 1]) {
            q++;
            memset(sums + (size_t)q * d, 0, d * sizeof *sums);
            mass[q] = 0;
            bin_counts[q] = 0;
            for (int j = 0; j < c; j++) corners[q * c + j] = (uint8_t)(((key[r] >> (bits * j)) & ((1u << bits) - 1)) << drop);
        }
        size_t i = idx[r];
        double w = (double)in->counts[i];
        for (int j = 0; j < d; j++) sums[q * d + j] += (int64_t)nearbyint(((double)in->points[i * d + j] * w) * in->scale_x);
        mass[q] += (int64_t)nearbyint(w * in->scale_w);
        bin_counts[q] += in->counts[i];
        inverse[i] = q;
    }
    for (int64_t b = 0; b <= q; b++) {
        double mf = (double)mass[b] / in->scale_w;
        for (int j = 0; j < d; j++) means[b * d + j] = (float)(((double)sums[b * d + j] / in->scale_x) / mf);
    }
    free(buf);
    free(sums);
    return q + 1;
}

/* bin_colors(colors, counts, points, inverse, means, bin_counts, corners, M, C, D, bits, scale_x, scale_w) -> Q */
static PyObject *py_bin_colors(PyObject *self, PyObject *args) {
    PyObject *o[7];
    Py_ssize_t m;
    int c, d, bits;
    double sx, sw;
    if (!PyArg_ParseTuple(args, "OOOOOOOniiidd", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &m, &c, &d, &bits,
                          &sx, &sw))
        return NULL;
    if (m < 0 || m > INT32_MAX || c < 1 || c > 4 || d < 1 || d > 64 || bits < 1 || bits > 8) {
        PyErr_SetString(PyExc_ValueError, "bin_colors: bad shape or bits");
        return NULL;
    }
    Buf v[7];
    memset(v, 0, sizeof v);
    int64_t q = 0;
    if (get(o[0], &v[0], m * c, 1, 0, "colors") || get(o[1], &v[1], m, 8, 0, "counts") ||
        get(o[2], &v[2], m * d, 4, 0, "points") || get(o[3], &v[3], m, 8, 1, "inverse") ||
        get(o[4], &v[4], m * d, 4, 1, "means") || get(o[5], &v[5], m, 8, 1, "bin_counts") ||
        get(o[6], &v[6], m * c, 1, 1, "corners"))
        goto fail;
    BinInput in = {v[0].view.buf, v[1].view.buf, v[2].view.buf, (size_t)m, c, d, bits, sx, sw};
    Py_BEGIN_ALLOW_THREADS q = bin_colors(&in, v[3].view.buf, v[4].view.buf, v[5].view.buf, v[6].view.buf);
    Py_END_ALLOW_THREADS if (q < 0) {
        PyErr_NoMemory();
        goto fail;
    }
    release(v, 7);
    return PyLong_FromLongLong(q);
fail:
    release(v, 7);
    return NULL;
}

/* ------------------------------------------------------------------ error and usage */

/* Exact squared error of m RGB colours against their palette entries, weighted by
 * counts, and each entry's pixel count (usage, P items, added to). */
static int64_t rgb_error(const uint8_t *colors, const int64_t *counts, const int64_t *labels, const uint8_t *palette,
                         size_t m, int64_t *usage) {
    int64_t total = 0;
    for (size_t i = 0; i < m; i++) {
        const uint8_t *a = colors + i * 3, *b = palette + labels[i] * 3;
        int64_t e = 0;
        for (int j = 0; j < 3; j++) e += ((int64_t)a[j] - b[j]) * ((int64_t)a[j] - b[j]);
        total += e * counts[i];
        usage[labels[i]] += counts[i];
    }
    return total;
}

/* rgb_error(colors, counts, labels, palette, usage, M, P) -> total squared error (int) */
static PyObject *py_rgb_error(PyObject *self, PyObject *args) {
    PyObject *o[5];
    Py_ssize_t m, p;
    if (!PyArg_ParseTuple(args, "OOOOOnn", &o[0], &o[1], &o[2], &o[3], &o[4], &m, &p)) return NULL;
    Buf v[5];
    memset(v, 0, sizeof v);
    if (m < 0 || p < 1 || get(o[0], &v[0], m * 3, 1, 0, "colors") || get(o[1], &v[1], m, 8, 0, "counts") ||
        get(o[2], &v[2], m, 8, 0, "labels") || get(o[3], &v[3], p * 3, 1, 0, "palette") ||
        get(o[4], &v[4], p, 8, 1, "usage")) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "rgb_error: bad shape");
        release(v, 5);
        return NULL;
    }
    const int64_t *lab = v[2].view.buf;
    for (Py_ssize_t i = 0; i < m; i++)
        if (lab[i] < 0 || lab[i] >= p) {
            release(v, 5);
            PyErr_SetString(PyExc_ValueError, "rgb_error: label out of range");
            return NULL;
        }
    int64_t total;
    Py_BEGIN_ALLOW_THREADS total = rgb_error(v[0].view.buf, v[1].view.buf, lab, v[3].view.buf, (size_t)m, v[4].view.buf);
    Py_END_ALLOW_THREADS release(v, 5);
    return PyLong_FromLongLong(total);
}

static PyMethodDef methods[] = {
    {"color_set", py_color_set, METH_VARARGS, "Distinct colours of uint8 pixels with counts."},
    {"lookup", py_lookup, METH_VARARGS, "Per-pixel value of each pixel's colour."},
    {"bin_colors", py_bin_colors, METH_VARARGS, "Weighted colours merged into histogram bins."},
    {"rgb_error", py_rgb_error, METH_VARARGS, "Exact squared error and palette usage of RGB colours."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_imagekernels", "CPU per-image kernels.", -1, methods};

PyMODINIT_FUNC PyInit__imagekernels(void) { return PyModule_Create(&module); }
