/* CPython binding of the compiled driver-side virtqueue (vqdrv.c): ``DriverQueue``, the same
 * interface and behaviour as ivshmem_virtio.virtqueue.driver.DriverQueue (the reference), plus
 * the virtio-blk frontend's request path (``add_blk``, ``reap_blk``) and a spin for completions
 * that releases the GIL (``wait_used``). The Python tokens live here, beside the C state; the
 * free list and chains never live in shared memory. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <time.h>

#include "vqdrv.h"

static PyObject *RingError;

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int have_view;
    struct vqd q;
    int indirect;
    PyObject *mem;    /* the Region (tests and the driver read .mem) */
    PyObject *alloc;  /* indirect tables: the allocator's alloc/free, or None */
    PyObject *free;
    PyObject **tokens;  /* [size], per head, NULL: not in flight */
    uint64_t *table;    /* [size], per head: its indirect table + 1, 0: none */
    /* per head, requests placed by add_blk: where, how much comes back, into what */
    uint64_t *blk_base; /* + 1, 0: not a blk request (reap_blk leaves it to Python) */
    uint32_t *blk_in_len;
    uint32_t *blk_type;
    PyObject **blk_into;
} DrvQueue;

static void clear_arrays(DrvQueue *self)
{
    if (self->tokens) {
        for (uint32_t i = 0; i < self->q.size; i++) {
            Py_CLEAR(self->tokens[i]);
            Py_CLEAR(self->blk_into[i]);
        }
    }
    PyMem_Free(self->tokens);
    PyMem_Free(self->blk_into);
    PyMem_Free(self->table);
    PyMem_Free(self->blk_base);
    PyMem_Free(self->blk_in_len);
    PyMem_Free(self->blk_type);
    PyMem_Free(self->q.free);
    PyMem_Free(self->q.link);
    PyMem_Free(self->q.count);
    self->tokens = self->blk_into = NULL;
    self->table = self->blk_base = NULL;
    self->blk_in_len = self->blk_type = NULL;
    self->q.free = self->q.link = self->q.count = NULL;
}

static void DrvQueue_dealloc(DrvQueue *self)
{
    clear_arrays(self);
    if (self->have_view)
        PyBuffer_Release(&self->view);
    Py_CLEAR(self->mem);
    Py_CLEAR(self->alloc);
    Py_CLEAR(self->free);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int area_ok(uint64_t mem, uint64_t off, uint64_t len, uint64_t align)
{
    return off % align == 0 && off <= mem && len <= mem - off;
}

static int DrvQueue_init(DrvQueue *self, PyObject *args, PyObject *kwds)
{
    static char *kw[] = {"mem", "size", "desc", "avail", "used", "event_idx", "indirect",
                         "alloc", "free", NULL};
    PyObject *mem, *buf, *alloc = Py_None, *free_ = Py_None;
    unsigned int size;
    unsigned long long desc, avail, used;
    int event_idx = 0, indirect = 0;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OIKKK|$ppOO", kw, &mem, &size, &desc, &avail,
                                     &used, &event_idx, &indirect, &alloc, &free_))
        return -1;
    if (size == 0 || (size & (size - 1)) || size > VQD_MAX_QUEUE_SIZE) {
        PyErr_Format(PyExc_ValueError, "queue size %u is not a power of two", size);
        return -1;
    }
    clear_arrays(self);
    if (self->have_view) {
        PyBuffer_Release(&self->view);
        self->have_view = 0;
    }
    buf = PyObject_CallMethod(mem, "buffer", NULL);
    if (!buf)
        return -1;
    if (PyObject_GetBuffer(buf, &self->view, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0) {
        Py_DECREF(buf);
        return -1;
    }
    Py_DECREF(buf);
    self->have_view = 1;
    self->q.mem = self->view.buf;
    self->q.mem_size = (uint64_t)self->view.len;
    /* the areas are checked once here (the Python queue's views check them at setup too) */
    if (!area_ok(self->q.mem_size, desc, 16ull * size, 1)
        || !area_ok(self->q.mem_size, avail, 6ull + 2ull * size, 2)
        || !area_ok(self->q.mem_size, used, 6ull + 8ull * size, 2)) {
        PyErr_SetString(PyExc_ValueError, "queue areas outside the section");
        return -1;
    }
    self->q.desc = desc;
    self->q.avail = avail;
    self->q.used = used;
    self->q.size = size;
    self->q.event_idx = event_idx;
    self->indirect = indirect && alloc != Py_None;
    Py_INCREF(mem);
    Py_XSETREF(self->mem, mem);
    Py_INCREF(alloc);
    Py_XSETREF(self->alloc, alloc);
    Py_INCREF(free_);
    Py_XSETREF(self->free, free_);
    self->q.free = PyMem_Calloc(size, sizeof(uint16_t));
    self->q.link = PyMem_Calloc(size, sizeof(uint16_t));
    self->q.count = PyMem_Calloc(size, sizeof(uint16_t));
    self->tokens = PyMem_Calloc(size, sizeof(PyObject *));
    self->blk_into = PyMem_Calloc(size, sizeof(PyObject *));
    self->table = PyMem_Calloc(size, sizeof(uint64_t));
    self->blk_base = PyMem_Calloc(size, sizeof(uint64_t));
    self->blk_in_len = PyMem_Calloc(size, sizeof(uint32_t));
    self->blk_type = PyMem_Calloc(size, sizeof(uint32_t));
    if (!self->q.free || !self->q.link || !self->q.count || !self->tokens || !self->blk_into
        || !self->table || !self->blk_base || !self->blk_in_len || !self->blk_type) {
        clear_arrays(self);
        PyErr_NoMemory();
        return -1;
    }
    vqd_init(&self->q);
    return 0;
}

static int ready(DrvQueue *self)
{
    if (!self->tokens) {
        PyErr_SetString(PyExc_ValueError, "DriverQueue not initialised");
        return 0;
    }
    return 1;
}

/* (addr, len) pairs of a sequence into segs; -1 with an exception set */
static int take_segs(PyObject *seq, struct vqd_seg *segs, Py_ssize_t room, Py_ssize_t *n)
{
    PyObject *fast = PySequence_Fast(seq, "buffers must be a sequence of (addr, len)");
    Py_ssize_t len;
    if (!fast)
        return -1;
    len = PySequence_Fast_GET_SIZE(fast);
    if (len > room) {
        Py_DECREF(fast);
        PyErr_SetString(RingError, "virtqueue full");
        return -1;
    }
    for (Py_ssize_t i = 0; i < len; i++) {
        unsigned long long addr;
        unsigned int length;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "KI", &addr, &length)) {
            Py_DECREF(fast);
            return -1;
        }
        segs[i].addr = addr;
        segs[i].len = length;
    }
    *n = len;
    Py_DECREF(fast);
    return 0;
}

static void set_token(DrvQueue *self, uint16_t head, PyObject *token)
{
    Py_INCREF(token);
    Py_XSETREF(self->tokens[head], token);
}

/* DriverQueue.add once the buffers are segments: direct, or through an indirect table when
 * the chain is long or the table is short of descriptors (as the Python add decides) */
static int add_chain(DrvQueue *self, const struct vqd_seg *segs, unsigned nout, unsigned nin,
                     PyObject *token, uint16_t *head)
{
    unsigned total = nout + nin;

    if (total == 0) {
        PyErr_SetString(PyExc_ValueError, "empty chain");
        return -1;
    }
    if (self->indirect && total > 1 && self->q.nfree
        && (total > VQD_INDIRECT_MIN || self->q.nfree < total)) {
        PyObject *t = PyObject_CallFunction(self->alloc, "I", 16u * total);
        unsigned long long table;
        PyObject *ok;
        if (!t)
            return -1;
        table = PyLong_AsUnsignedLongLong(t);
        Py_DECREF(t);
        if (PyErr_Occurred())
            return -1;
        /* the Region's own check, with its error (MemoryAccessError) */
        ok = PyObject_CallMethod(self->mem, "check", "KI", table, 16u * total);
        if (!ok)
            return -1;
        Py_DECREF(ok);
        if (table > self->q.mem_size || 16ull * total > self->q.mem_size - table) {
            PyErr_SetString(PyExc_ValueError, "indirect table outside the section");
            return -1;
        }
        vqd_add_indirect(&self->q, table, segs, nout, nin, head);
        self->table[*head] = table + 1;
    } else {
        if (vqd_add(&self->q, segs, nout, nin, head) != VQD_OK) {
            PyErr_SetString(RingError, "virtqueue full");
            return -1;
        }
        self->table[*head] = 0;
    }
    self->blk_base[*head] = 0;
    Py_CLEAR(self->blk_into[*head]);
    set_token(self, *head, token);
    return 0;
}

/* add(out, inn, token) -> head */
static PyObject *DrvQueue_add(DrvQueue *self, PyObject *const *args, Py_ssize_t nargs)
{
    struct vqd_seg *segs;
    Py_ssize_t nout, nin, room;
    uint16_t head;
    PyObject *result = NULL;

    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "add(out, inn, token)");
        return NULL;
    }
    if (!ready(self))
        return NULL;
    if (args[2] == Py_None) {
        PyErr_SetString(PyExc_ValueError, "a chain's token must not be None");
        return NULL;
    }
    room = (Py_ssize_t)self->q.size * 2 + 2;
    segs = PyMem_Malloc(sizeof(*segs) * (size_t)room);
    if (!segs)
        return PyErr_NoMemory();
    if (take_segs(args[0], segs, room, &nout) < 0
        || take_segs(args[1], segs + nout, room - nout, &nin) < 0)
        goto out;
    if (add_chain(self, segs, (unsigned)nout, (unsigned)nin, args[2], &head) < 0)
        goto out;
    result = PyLong_FromLong(head);
out:
    PyMem_Free(segs);
    return result;
}

/* add_blk(token, type, sector, base, payload, in_len, into) -> head: BlkClient._place for a
 * request whose data is one descriptor, then add. ``payload`` a buffer the device reads (or
 * None), ``into`` where readinto wants the data (or None; False: read_zerocopy, the data stays
 * in the bounce buffer). RingError when no room. */
static PyObject *DrvQueue_add_blk(DrvQueue *self, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned long type, in_len;
    unsigned long long sector, base;
    Py_buffer payload = {0};
    int have_payload = 0;
    struct vqd_seg segs[3];
    unsigned nout, nin;
    uint16_t head;
    PyObject *into;

    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError,
                        "add_blk(token, type, sector, base, payload, in_len, into)");
        return NULL;
    }
    if (!ready(self))
        return NULL;
    type = PyLong_AsUnsignedLong(args[1]);
    sector = PyLong_AsUnsignedLongLong(args[2]);
    base = PyLong_AsUnsignedLongLong(args[3]);
    in_len = PyLong_AsUnsignedLong(args[5]);
    if (PyErr_Occurred())
        return NULL;
    if (args[0] == Py_None || type > 0xFFFFFFFFul || in_len > 0xFFFFFFFFul) {
        PyErr_SetString(PyExc_ValueError, "bad request");
        return NULL;
    }
    into = args[6];
    if (args[4] != Py_None) {
        if (PyObject_GetBuffer(args[4], &payload, PyBUF_SIMPLE) < 0)
            return NULL;
        have_payload = 1;
        if ((uint64_t)payload.len > 0xFFFFFFFFull) {
            PyBuffer_Release(&payload);
            PyErr_SetString(PyExc_ValueError, "payload too large");
            return NULL;
        }
    }
    /* placed first, then added (BlkClient._pump checks can_add before) */
    if (!vqd_blk_place(&self->q, base, (uint32_t)type, sector, payload.buf,
                       have_payload ? (uint32_t)payload.len : 0, (uint32_t)in_len, segs, &nout,
                       &nin)) {
        if (have_payload)
            PyBuffer_Release(&payload);
        PyErr_SetString(PyExc_ValueError, "bounce buffer outside the section");
        return NULL;
    }
    if (have_payload)
        PyBuffer_Release(&payload);
    if (add_chain(self, segs, nout, nin, args[0], &head) < 0)
        return NULL;
    self->blk_base[head] = base + 1;
    self->blk_in_len[head] = (uint32_t)in_len;
    self->blk_type[head] = (uint32_t)type;
    if (into != Py_None) {
        Py_INCREF(into);
        Py_XSETREF(self->blk_into[head], into);
    }
    return PyLong_FromLong(head);
}

static PyObject *DrvQueue_kick_needed(DrvQueue *self, PyObject *Py_UNUSED(ignored))
{
    if (!ready(self))
        return NULL;
    return PyBool_FromLong(vqd_kick_needed(&self->q));
}

static PyObject *DrvQueue_has_used(DrvQueue *self, PyObject *Py_UNUSED(ignored))
{
    if (!ready(self))
        return NULL;
    return PyBool_FromLong(vqd_has_used(&self->q));
}

/* wait_used(seconds) -> bool: spin for a used entry, without the GIL */
static PyObject *DrvQueue_wait_used(DrvQueue *self, PyObject *arg)
{
    double seconds = PyFloat_AsDouble(arg);
    struct timespec ts;
    uint64_t deadline;
    int got;

    if ((seconds == -1.0 && PyErr_Occurred()) || !ready(self))
        return NULL;
    if (vqd_has_used(&self->q))
        Py_RETURN_TRUE;
    if (!(seconds > 0))
        Py_RETURN_FALSE;
    if (seconds > 10.0)
        seconds = 10.0;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    deadline = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec
               + (uint64_t)(seconds * 1e9);
    Py_BEGIN_ALLOW_THREADS
    got = vqd_wait_used(&self->q, deadline);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(got);
}

static int used_count(DrvQueue *self, unsigned *n)
{
    unsigned in_flight;
    if (vqd_used_count(&self->q, n, &in_flight) != VQD_OK) {
        PyErr_Format(RingError, "device reports %u used entries with only %u in flight", *n,
                     in_flight);
        return -1;
    }
    return 0;
}

/* one used element off the ring: its token (a new reference) or NULL with RingError */
static PyObject *pop_one(DrvQueue *self, uint16_t *head, uint32_t *len)
{
    uint32_t id;
    PyObject *token;
    if (vqd_pop_used(&self->q, &id, len) != VQD_OK || !self->tokens[id]) {
        PyErr_Format(RingError, "device completed descriptor %lu, which is not in flight",
                     (unsigned long)id);
        return NULL;
    }
    *head = (uint16_t)id;
    token = self->tokens[id];
    self->tokens[id] = NULL;
    return token;
}

/* the chain's indirect table back to the allocator (DriverQueue._free_table) */
static int free_table(DrvQueue *self, uint16_t head)
{
    uint64_t t = self->table[head];
    PyObject *r;
    if (!t || self->free == Py_None)
        return 0;
    self->table[head] = 0;
    r = PyObject_CallFunction(self->free, "K", (unsigned long long)(t - 1));
    if (!r)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* The next used element of a batch into *token (a new reference): 1; 0 when it names what is
 * not in flight after real completions were taken (they are returned, the bad entry stays for
 * the next call, which raises: get_used's rule); -1 with RingError when it is the first. */
static int next_used(DrvQueue *self, PyObject *out, uint16_t *head, uint32_t *len,
                     PyObject **token)
{
    *token = pop_one(self, head, len);
    if (*token)
        return 1;
    if (PyList_GET_SIZE(out) == 0)
        return -1;
    PyErr_Clear();
    return 0;
}

/* Hand one completion on (a reference to item is stolen) and return its indirect table. */
static int append_done(DrvQueue *self, PyObject *out, uint16_t head, PyObject *item)
{
    int rc = item ? PyList_Append(out, item) : -1;
    Py_XDECREF(item);
    if (rc < 0)
        return -1;
    return free_table(self, head);
}

/* One element of a batch, from its token (a reference stolen) and used length: the tuple handed
 * on, or NULL with an exception set. */
typedef PyObject *(*used_item)(DrvQueue *self, uint16_t head, uint32_t len, PyObject *token);

/* The batch loop of get_used and reap_blk: every used element through `item`, each chain's
 * indirect table back to the allocator, the interrupt re-armed. */
static PyObject *collect_used(DrvQueue *self, used_item item)
{
    unsigned n;
    PyObject *out;

    if (!ready(self) || used_count(self, &n) < 0)
        return NULL;
    out = PyList_New(0);
    if (!out)
        return NULL;
    for (unsigned i = 0; i < n; i++) {
        uint16_t head;
        uint32_t len;
        PyObject *token;
        int popped = next_used(self, out, &head, &len, &token);
        if (popped < 0)
            goto fail;
        if (!popped)
            break;
        if (append_done(self, out, head, item(self, head, len, token)) < 0)
            goto fail;
    }
    vqd_rearm(&self->q);
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

/* get_used's element: (token, used_len); what add_blk kept for the chain is dropped. */
static PyObject *plain_item(DrvQueue *self, uint16_t head, uint32_t len, PyObject *token)
{
    Py_CLEAR(self->blk_into[head]);
    self->blk_base[head] = 0;
    return Py_BuildValue("(Nk)", token, (unsigned long)len);
}

/* reap_blk's element: (token, used_len, status, data). For a request add_blk placed,
 * BlkClient.on_used's check (status byte, short read = IOERR) and its copy: ``data`` the
 * returned bytes (b"" when none), or None when they went into the request's ``into`` (only on
 * success; into False: read_zerocopy, the data stays where it is). status -1 and data None: not
 * placed by add_blk, on_used decides. */
static PyObject *blk_item(DrvQueue *self, uint16_t head, uint32_t len, PyObject *token)
{
    uint64_t base = self->blk_base[head];
    PyObject *into = self->blk_into[head], *data = Py_None;
    uint32_t got = 0;
    long status = -1;

    self->blk_into[head] = NULL;
    self->blk_base[head] = 0;
    if (base) {
        base -= 1; /* inside: add_blk placed base + 64 + in_len there */
        status = (long)vqd_blk_status(&self->q, base, len, self->blk_in_len[head],
                                      self->blk_type[head], &got);
        if (into == NULL) {
            data = PyBytes_FromStringAndSize(
                (const char *)self->q.mem + base + VQD_BLK_DATA, (Py_ssize_t)got);
        } else if (status == 0 && got && into != Py_False) {
            Py_buffer dst;
            if (PyObject_GetBuffer(into, &dst, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0) {
                data = NULL;
            } else {
                if ((uint64_t)dst.len <= self->blk_in_len[head]) {
                    memcpy(dst.buf, self->q.mem + base + VQD_BLK_DATA, (size_t)dst.len);
                } else {
                    PyErr_SetString(PyExc_ValueError, "readinto buffer larger than read");
                    data = NULL;
                }
                PyBuffer_Release(&dst);
            }
        }
    }
    Py_XDECREF(into);
    if (!data) {
        Py_DECREF(token);
        return NULL;
    }
    if (data == Py_None)
        Py_INCREF(data);
    return Py_BuildValue("(NklN)", token, (unsigned long)len, status, data);
}

/* get_used() -> [(token, used_len)] */
static PyObject *DrvQueue_get_used(DrvQueue *self, PyObject *Py_UNUSED(ignored))
{
    return collect_used(self, plain_item);
}

/* reap_blk() -> [(token, used_len, status, data)]: get_used with blk_item's check and copy for
 * each request add_blk placed. */
static PyObject *DrvQueue_reap_blk(DrvQueue *self, PyObject *Py_UNUSED(ignored))
{
    return collect_used(self, blk_item);
}

static PyObject *DrvQueue_in_flight(DrvQueue *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *out;
    if (!ready(self))
        return NULL;
    out = PyList_New(0);
    if (!out)
        return NULL;
    for (uint32_t i = 0; i < self->q.size; i++) {
        if (self->tokens[i] && PyList_Append(out, self->tokens[i]) < 0) {
            Py_DECREF(out);
            return NULL;
        }
    }
    return out;
}

static PyObject *DrvQueue_suppress_interrupts(DrvQueue *self, PyObject *arg)
{
    int s = PyObject_IsTrue(arg);
    if (s < 0 || !ready(self))
        return NULL;
    vqd_suppress(&self->q, s);
    Py_RETURN_NONE;
}

static PyObject *DrvQueue_can_add(DrvQueue *self, PyObject *arg)
{
    long n = PyLong_AsLong(arg);
    if ((n == -1 && PyErr_Occurred()) || !ready(self))
        return NULL;
    if (self->indirect && n > 1)
        return PyBool_FromLong(self->q.nfree >= 1);
    return PyBool_FromLong((long)self->q.nfree >= n);
}

/* read-only attributes, as the Python DriverQueue has them */
#define GETTER(name, make, value) \
    static PyObject *get_##name(DrvQueue *self, void *Py_UNUSED(c)) { return make(value); }
GETTER(num_free, PyLong_FromUnsignedLong, self->q.nfree)
GETTER(size, PyLong_FromUnsignedLong, self->q.size)
GETTER(desc, PyLong_FromUnsignedLongLong, self->q.desc)
GETTER(avail, PyLong_FromUnsignedLongLong, self->q.avail)
GETTER(used, PyLong_FromUnsignedLongLong, self->q.used)
GETTER(avail_idx, PyLong_FromLong, self->q.avail_idx)
GETTER(kicked_idx, PyLong_FromLong, self->q.kicked_idx)
GETTER(last_used, PyLong_FromLong, self->q.last_used)
GETTER(interrupts_on, PyBool_FromLong, self->q.interrupts_on)
GETTER(event_idx, PyBool_FromLong, self->q.event_idx)
GETTER(indirect, PyBool_FromLong, self->indirect)
#undef GETTER

static PyObject *get_mem(DrvQueue *self, void *Py_UNUSED(c))
{
    PyObject *m = self->mem ? self->mem : Py_None;
    Py_INCREF(m);
    return m;
}

static PyGetSetDef DrvQueue_getset[] = {
    {"num_free", (getter)get_num_free, NULL, NULL, NULL},
    {"size", (getter)get_size, NULL, NULL, NULL},
    {"desc", (getter)get_desc, NULL, NULL, NULL},
    {"avail", (getter)get_avail, NULL, NULL, NULL},
    {"used", (getter)get_used, NULL, NULL, NULL},
    {"avail_idx", (getter)get_avail_idx, NULL, NULL, NULL},
    {"kicked_idx", (getter)get_kicked_idx, NULL, NULL, NULL},
    {"last_used", (getter)get_last_used, NULL, NULL, NULL},
    {"interrupts_on", (getter)get_interrupts_on, NULL, NULL, NULL},
    {"event_idx", (getter)get_event_idx, NULL, NULL, NULL},
    {"indirect", (getter)get_indirect, NULL, NULL, NULL},
    {"mem", (getter)get_mem, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef DrvQueue_methods[] = {
    {"add", (PyCFunction)(void (*)(void))DrvQueue_add, METH_FASTCALL,
     "Make one chain available: out the device reads, inn it writes. Returns the head."},
    {"add_blk", (PyCFunction)(void (*)(void))DrvQueue_add_blk, METH_FASTCALL,
     "Place one virtio-blk request in its bounce buffer and make it available."},
    {"kick_needed", (PyCFunction)DrvQueue_kick_needed, METH_NOARGS,
     "After adding a batch: must the device be notified?"},
    {"has_used", (PyCFunction)DrvQueue_has_used, METH_NOARGS, "A used entry to collect?"},
    {"wait_used", (PyCFunction)DrvQueue_wait_used, METH_O,
     "Spin up to the given seconds for a used entry, without the GIL."},
    {"get_used", (PyCFunction)DrvQueue_get_used, METH_NOARGS,
     "Collect completed chains as (token, used_len)."},
    {"reap_blk", (PyCFunction)DrvQueue_reap_blk, METH_NOARGS,
     "Collect completed chains with add_blk's requests checked and copied out."},
    {"in_flight", (PyCFunction)DrvQueue_in_flight, METH_NOARGS, "The tokens in flight."},
    {"suppress_interrupts", (PyCFunction)DrvQueue_suppress_interrupts, METH_O,
     "While the driver polls used entries it does not need interrupts."},
    {"can_add", (PyCFunction)DrvQueue_can_add, METH_O, "Room for a chain of n buffers?"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject DrvQueueType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ivshmem_virtio._native._frontpath.DriverQueue",
    .tp_basicsize = sizeof(DrvQueue),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The compiled driver side of one split virtqueue (virtqueue.driver.DriverQueue).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)DrvQueue_init,
    .tp_dealloc = (destructor)DrvQueue_dealloc,
    .tp_methods = DrvQueue_methods,
    .tp_getset = DrvQueue_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_frontpath",
    "Compiled driver-side virtqueue and blk request path (vqdrv.c).", -1, NULL, NULL, NULL,
    NULL, NULL,
};

PyMODINIT_FUNC PyInit__frontpath(void)
{
    PyObject *m, *errors;
    if (PyType_Ready(&DrvQueueType) < 0)
        return NULL;
    errors = PyImport_ImportModule("ivshmem_virtio.errors");
    if (!errors)
        return NULL;
    RingError = PyObject_GetAttrString(errors, "RingError");
    Py_DECREF(errors);
    if (!RingError)
        return NULL;
    m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&DrvQueueType);
    if (PyModule_AddObject(m, "DriverQueue", (PyObject *)&DrvQueueType) < 0) {
        Py_DECREF(&DrvQueueType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
