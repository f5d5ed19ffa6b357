/*
 * Buffer arguments of the C kernels (_kernels.c, _imagekernels.c): a C-contiguous buffer of
 * exactly `items` items of `itemsize` bytes (a numpy array or a CPU tensor's memory), or None.
 * get() fills a Buf and sets a ValueError naming the argument when the size is wrong;
 * release() gives back every buffer that was taken, whatever failed after it. get_all() takes
 * n buffers described by n Specs, and on failure gives back those it took.
 */
#ifndef GPU_KQUANT_BUFFERS_H
#define GPU_KQUANT_BUFFERS_H

#include <Python.h>

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

typedef struct {
    Py_ssize_t items, itemsize;
    int writable;
    const char *name;
} Spec;

static inline int get_all(PyObject *const *objs, Buf *bufs, const Spec *specs, int n) {
    for (int i = 0; i < n; i++) bufs[i].held = 0;
    for (int i = 0; i < n; i++) {
        if (get(objs[i], &bufs[i], specs[i].items, specs[i].itemsize, specs[i].writable, specs[i].name) < 0) {
            release(bufs, n);
            return -1;
        }
    }
    return 0;
}

#endif
