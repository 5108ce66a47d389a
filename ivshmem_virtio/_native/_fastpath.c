/* CPython binding of the compiled blk data path (vqblk.c). One BlkQueue per enabled queue,
 * holding the section's buffer for as long as the DeviceQueue it mirrors. The queue indices
 * stay the Python DeviceQueue's: they are passed in and returned, so both paths can serve
 * the same ring one after the other. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "vqblk.h"

#include <limits.h>

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int have_view;
    struct vq q;
    struct blk b;
} BlkQueue;

static void BlkQueue_dealloc(BlkQueue *self)
{
    if (self->have_view)
        PyBuffer_Release(&self->view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int area_ok(uint64_t mem, uint64_t off, uint64_t len, uint64_t align)
{
    return off % align == 0 && off <= mem && len <= mem - off;
}

static int BlkQueue_init(BlkQueue *self, PyObject *args, PyObject *kwds)
{
    static char *kw[] = {"buf", "size", "desc", "avail", "used", "indirect", "fd",
                         "read_only", "capacity", "max_data", NULL};
    PyObject *buf;
    unsigned int size;
    unsigned long long desc, avail, used, capacity, max_data;
    int indirect, fd, read_only;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OIKKKpipKK", kw, &buf, &size, &desc, &avail,
                                     &used, &indirect, &fd, &read_only, &capacity, &max_data))
        return -1;
    if (self->have_view) {
        PyBuffer_Release(&self->view);
        self->have_view = 0;
    }
    if (PyObject_GetBuffer(buf, &self->view, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0)
        return -1;
    self->have_view = 1;
    self->q.mem = self->view.buf;
    self->q.mem_size = (uint64_t)self->view.len;
    /* checked again here (DeviceQueue checked them first): this object trusts them per request */
    if (size == 0 || (size & (size - 1)) || size > VQ_MAX_QUEUE_SIZE
        || !area_ok(self->q.mem_size, desc, 16ull * size, 16)
        || !area_ok(self->q.mem_size, avail, 6ull + 2ull * size, 2)
        || !area_ok(self->q.mem_size, used, 6ull + 8ull * size, 4) || fd < 0) {
        PyErr_SetString(PyExc_ValueError, "queue geometry outside the section");
        return -1;
    }
    self->q.desc = desc;
    self->q.avail = avail;
    self->q.used = used;
    self->q.size = size;
    self->q.indirect = indirect;
    self->b.fd = fd;
    self->b.read_only = read_only;
    self->b.capacity = capacity;
    self->b.max_data = max_data;
    return 0;
}

static int ready(BlkQueue *self)
{
    if (!self->have_view) {
        PyErr_SetString(PyExc_ValueError, "BlkQueue released");
        return 0;
    }
    return 1;
}

/* serve(last_avail, next_used, limit[, until_ns]) -> (served, last_avail, next_used, stop,
 * read_count, read_bytes, write_count, write_bytes, io_fails); the GIL is released while it
 * runs. until_ns: time.monotonic_ns() past which no further request is started (0: none). */
static PyObject *BlkQueue_serve(BlkQueue *self, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned long last, used, limit;
    unsigned long long until = 0;
    uint16_t l16, u16;
    struct blk_counters cnt = {0};
    unsigned served;
    int stop;

    if (nargs != 3 && nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "serve(last_avail, next_used, limit[, until_ns])");
        return NULL;
    }
    last = PyLong_AsUnsignedLong(args[0]);
    used = PyLong_AsUnsignedLong(args[1]);
    limit = PyLong_AsUnsignedLong(args[2]);
    if (nargs == 4)
        until = PyLong_AsUnsignedLongLong(args[3]);
    if (PyErr_Occurred() || !ready(self))
        return NULL;
    if (last > 0xFFFF || used > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "ring index out of range");
        return NULL;
    }
    l16 = (uint16_t)last;
    u16 = (uint16_t)used;
    if (limit > 0xFFFFu)
        limit = 0xFFFFu;
    Py_BEGIN_ALLOW_THREADS
    served = blk_serve(&self->q, &self->b, &l16, &u16, (unsigned)limit, (uint64_t)until, &cnt,
                       &stop);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(IHHiKKKKK)", served, l16, u16, stop,
                         (unsigned long long)cnt.read_count, (unsigned long long)cnt.read_bytes,
                         (unsigned long long)cnt.write_count, (unsigned long long)cnt.write_bytes,
                         (unsigned long long)cnt.io_fails);
}

/* poll(last_avail, next_used, signalled_used, event_idx, limit, until_ns, watch_off) ->
 * (served, last_avail, next_used, signalled_used, why, read_count, read_bytes, write_count,
 * write_bytes, io_fails): blk_poll, the GIL released while it spins and serves. */
static PyObject *BlkQueue_poll(BlkQueue *self, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned long last, used, sig, limit;
    unsigned long long until, watch;
    uint16_t l16, u16, s16;
    struct blk_counters cnt = {0};
    unsigned served;
    int ev, why;

    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "poll(last_avail, next_used, signalled_used, "
                                         "event_idx, limit, until_ns, watch_off)");
        return NULL;
    }
    last = PyLong_AsUnsignedLong(args[0]);
    used = PyLong_AsUnsignedLong(args[1]);
    sig = PyLong_AsUnsignedLong(args[2]);
    ev = PyObject_IsTrue(args[3]);
    limit = PyLong_AsUnsignedLong(args[4]);
    until = PyLong_AsUnsignedLongLong(args[5]);
    watch = PyLong_AsUnsignedLongLong(args[6]);
    if (PyErr_Occurred() || ev < 0 || !ready(self))
        return NULL;
    if (last > 0xFFFF || used > 0xFFFF || sig > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "ring index out of range");
        return NULL;
    }
    if (!area_ok(self->q.mem_size, watch, 4, 4)) {
        PyErr_SetString(PyExc_ValueError, "watched register outside the section");
        return NULL;
    }
    if (limit == 0) {
        PyErr_SetString(PyExc_ValueError, "limit must be at least 1");
        return NULL;
    }
    if (limit > 0xFFFFu)
        limit = 0xFFFFu;
    l16 = (uint16_t)last;
    u16 = (uint16_t)used;
    s16 = (uint16_t)sig;
    Py_BEGIN_ALLOW_THREADS
    served = blk_poll(&self->q, &self->b, &l16, &u16, &s16, ev, (unsigned)limit, (uint64_t)until,
                      (uint64_t)watch, &cnt, &why);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(IHHHiKKKKK)", served, l16, u16, s16, why,
                         (unsigned long long)cnt.read_count, (unsigned long long)cnt.read_bytes,
                         (unsigned long long)cnt.write_count, (unsigned long long)cnt.write_bytes,
                         (unsigned long long)cnt.io_fails);
}

/* run(last_avail, next_used, signalled_used, event_idx, until_ns, slice_ns, watch_off, yield,
 * event_off, ring_fd, ring_reg, ring_off, ring_value) -> (served, last_avail, next_used,
 * signalled_used, why, rung, read_count, read_bytes, write_count, write_bytes, io_fails):
 * blk_run, the GIL released throughout. ring_reg: None, or a writable buffer (the register
 * page) whose u32 at ring_off is the doorbell. */
static PyObject *BlkQueue_run(BlkQueue *self, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned long last, used, sig, value;
    unsigned long long until, slice, watch, event, roff;
    uint16_t l16, u16, s16;
    struct blk_counters cnt = {0};
    struct ring ring = {0};
    Py_buffer view = {0};
    unsigned served, rung;
    long lfd;
    int ev, yield, why, have_view = 0;

    if (nargs != 13) {
        PyErr_SetString(PyExc_TypeError, "run(last_avail, next_used, signalled_used, event_idx, "
                                         "until_ns, slice_ns, watch_off, yield, event_off, "
                                         "ring_fd, ring_reg, ring_off, ring_value)");
        return NULL;
    }
    last = PyLong_AsUnsignedLong(args[0]);
    used = PyLong_AsUnsignedLong(args[1]);
    sig = PyLong_AsUnsignedLong(args[2]);
    ev = PyObject_IsTrue(args[3]);
    until = PyLong_AsUnsignedLongLong(args[4]);
    slice = PyLong_AsUnsignedLongLong(args[5]);
    watch = PyLong_AsUnsignedLongLong(args[6]);
    yield = PyObject_IsTrue(args[7]);
    event = PyLong_AsUnsignedLongLong(args[8]);
    lfd = PyLong_AsLong(args[9]);
    roff = PyLong_AsUnsignedLongLong(args[11]);
    value = PyLong_AsUnsignedLong(args[12]);
    if (PyErr_Occurred() || ev < 0 || yield < 0 || !ready(self))
        return NULL;
    if (last > 0xFFFF || used > 0xFFFF || sig > 0xFFFF || value > 0xFFFFFFFFul) {
        PyErr_SetString(PyExc_ValueError, "ring index or doorbell value out of range");
        return NULL;
    }
    if (!area_ok(self->q.mem_size, watch, 4, 4) || !area_ok(self->q.mem_size, event, 1, 1)) {
        PyErr_SetString(PyExc_ValueError, "watched register or queue_event outside the section");
        return NULL;
    }
    if (slice == 0) {
        PyErr_SetString(PyExc_ValueError, "slice_ns must be at least 1");
        return NULL;
    }
    if (args[10] != Py_None) {
        if (PyObject_GetBuffer(args[10], &view, PyBUF_WRITABLE) < 0)
            return NULL;
        have_view = 1;
        if (!area_ok((uint64_t)view.len, roff, 4, 4)) {
            PyBuffer_Release(&view);
            PyErr_SetString(PyExc_ValueError, "doorbell register outside its page");
            return NULL;
        }
        ring.reg = (volatile uint32_t *)((uint8_t *)view.buf + roff);
    }
    ring.event_off = event;
    ring.fd = have_view || lfd < 0 || lfd > INT_MAX ? -1 : (int)lfd;
    ring.value = (uint32_t)value;
    l16 = (uint16_t)last;
    u16 = (uint16_t)used;
    s16 = (uint16_t)sig;
    Py_BEGIN_ALLOW_THREADS
    served = blk_run(&self->q, &self->b, &l16, &u16, &s16, ev, (uint64_t)until, (uint64_t)slice,
                     (uint64_t)watch, &ring, yield, &cnt, &why, &rung);
    Py_END_ALLOW_THREADS
    if (have_view)
        PyBuffer_Release(&view);
    return Py_BuildValue("(IHHHiIKKKKK)", served, l16, u16, s16, why, rung,
                         (unsigned long long)cnt.read_count, (unsigned long long)cnt.read_bytes,
                         (unsigned long long)cnt.write_count, (unsigned long long)cnt.write_bytes,
                         (unsigned long long)cnt.io_fails);
}

/* publish(next_used, signalled_used, event_idx) -> bool: DeviceQueue.publish's work */
static PyObject *BlkQueue_publish(BlkQueue *self, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned long nu, su;
    int ev;

    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "publish(next_used, signalled_used, event_idx)");
        return NULL;
    }
    nu = PyLong_AsUnsignedLong(args[0]);
    su = PyLong_AsUnsignedLong(args[1]);
    ev = PyObject_IsTrue(args[2]);
    if (PyErr_Occurred() || ev < 0 || !ready(self))
        return NULL;
    if (nu > 0xFFFF || su > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "ring index out of range");
        return NULL;
    }
    return PyBool_FromLong(vq_publish(&self->q, (uint16_t)nu, (uint16_t)su, ev));
}

static PyObject *BlkQueue_release(BlkQueue *self, PyObject *Py_UNUSED(ignored))
{
    if (self->have_view) {
        PyBuffer_Release(&self->view);
        self->have_view = 0;
    }
    Py_RETURN_NONE;
}

static PyMethodDef BlkQueue_methods[] = {
    {"serve", (PyCFunction)(void (*)(void))BlkQueue_serve, METH_FASTCALL,
     "Serve the usual reads and writes; stop at the first other chain."},
    {"poll", (PyCFunction)(void (*)(void))BlkQueue_poll, METH_FASTCALL,
     "Spin, serve and publish until a deadline or until Python has work."},
    {"run", (PyCFunction)(void (*)(void))BlkQueue_run, METH_FASTCALL,
     "A worker's stretch: poll, serve, publish and ring the driver until a deadline."},
    {"publish", (PyCFunction)(void (*)(void))BlkQueue_publish, METH_FASTCALL,
     "Store used->idx and decide on the interrupt."},
    {"release", (PyCFunction)BlkQueue_release, METH_NOARGS, "Let the section's buffer go."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject BlkQueueType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ivshmem_virtio._native._fastpath.BlkQueue",
    .tp_basicsize = sizeof(BlkQueue),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The compiled blk data path over one enabled queue.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)BlkQueue_init,
    .tp_dealloc = (destructor)BlkQueue_dealloc,
    .tp_methods = BlkQueue_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastpath", "Compiled virtio-blk data path (vqblk.c).", -1, NULL,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastpath(void)
{
    PyObject *m;
    if (PyType_Ready(&BlkQueueType) < 0)
        return NULL;
    m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&BlkQueueType);
    if (PyModule_AddObject(m, "BlkQueue", (PyObject *)&BlkQueueType) < 0) {
        Py_DECREF(&BlkQueueType);
        Py_DECREF(m);
        return NULL;
    }
    /* why a poll ended (BlkQueue.poll's fifth value) */
    if (PyModule_AddIntConstant(m, "POLL_IDLE", POLL_IDLE) < 0
        || PyModule_AddIntConstant(m, "POLL_TIME", POLL_TIME) < 0
        || PyModule_AddIntConstant(m, "POLL_NOTIFY", POLL_NOTIFY) < 0
        || PyModule_AddIntConstant(m, "POLL_STOP", POLL_STOP) < 0
        || PyModule_AddIntConstant(m, "POLL_WATCH", POLL_WATCH) < 0
        || PyModule_AddIntConstant(m, "POLL_LIMIT", POLL_LIMIT) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
