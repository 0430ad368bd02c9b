/* The audit writer's per-record work, compiled: envelopes, the hash chain and the
 * Merkle tree's new nodes for one batch.
 *
 * link(batch, seq, prev, stack, size, version, enc_type, enc_sid, encode_names,
 *      counters, session_start, session_end)
 *   -> (records, nodes, sessions, marks, prev, size)
 *
 * The same answer as audit.log._link_py, its Python twin (used when this module
 * is not built; tests/unit/audit/test_link_native.py holds the two to the same
 * answers, and `ringfence audit verify` re-checks every stored hash with the
 * Python code). For each item (type, session_id, ts, data, waiter) of ``batch``,
 * record number ``seq`` onwards:
 *
 *   envelope = 0x99, version, 0xCF seq, 0xCF ts, 0xC4 0x20 prev,
 *              names (msgpack of type, host, session_id: enc_type[type] +
 *              enc_sid[session_id], or encode_names(type, session_id) when
 *              either is not cached), 0xC0 or 0xCF index, data
 *   prev = leaf = SHA-256(0x00 || envelope)
 *
 * where index is the record's number within its session (``counters``, a dict
 * by session id, advanced here; a session_end record removes its session).
 * Each leaf closes one subtree per trailing 1 bit of the tree's size; the node
 * of each is SHA-256(0x01 || left || right), left popped from ``stack`` (a list
 * of hashes, changed in place). Returned: records [(key, envelope)], the leaves
 * and nodes in the order made (one bytes), sessions [(session_id as UTF-8, key)]
 * of session_start records, marks [(position in batch, seq)] of items whose
 * waiter is not None, the last leaf and the new size. Keys are seq as 8
 * big-endian bytes.
 *
 * batch_frame(records, pack) writes an agent's batch of records as the frame the
 * writer receives, and batch_items(body, types) reads it straight into the writer's
 * queue items, a result joined to its query where the agent says it answers it (see
 * their comments below); their Python twins are in audit/log.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <openssl/evp.h>

#include "_msgpack.h"

#define HASH 32
#define HEAD 22

/* Fetched once: with OpenSSL 3, EVP_sha256() makes every EVP_DigestInit_ex look the
 * implementation up again, which costs more than hashing a record. */
static EVP_MD *sha256_md;

static int
digest(EVP_MD_CTX *ctx, unsigned char tag, const unsigned char *a, size_t alen,
       const unsigned char *b, size_t blen, unsigned char *out)
{
    unsigned int len = 0;
    if (EVP_DigestInit_ex(ctx, sha256_md, NULL) != 1
        || EVP_DigestUpdate(ctx, &tag, 1) != 1
        || EVP_DigestUpdate(ctx, a, alen) != 1
        || (blen && EVP_DigestUpdate(ctx, b, blen) != 1)
        || EVP_DigestFinal_ex(ctx, out, &len) != 1 || len != HASH) {
        PyErr_SetString(PyExc_RuntimeError, "link: SHA-256 failed");
        return -1;
    }
    return 0;
}

static PyObject *
key_of(uint64_t seq)
{
    unsigned char k[8];
    put_be(k, seq, 8);
    return PyBytes_FromStringAndSize((const char *)k, 8);
}

/* Appends the pair (a, b) to list, taking over both references; a NULL (from a failed
 * call, its error set) fails this one. Returns -1 on error. */
static int
append_pair(PyObject *list, PyObject *a, PyObject *b)
{
    PyObject *pair = (a != NULL && b != NULL) ? PyTuple_Pack(2, a, b) : NULL;
    int rc = pair != NULL ? PyList_Append(list, pair) : -1;
    Py_XDECREF(a);
    Py_XDECREF(b);
    Py_XDECREF(pair);
    return rc;
}

/* The names of a record: borrowed cached halves in *type_names and *sid_names, or
 * (when either is not cached) a new reference from encode_names in *fresh.
 * Returns -1 with an error set. */
static int
names_of(PyObject *type, PyObject *sid, PyObject *enc_type, PyObject *enc_sid,
         PyObject *encode_names, PyObject **type_names, PyObject **sid_names, PyObject **fresh)
{
    PyObject *t = PyDict_GetItemWithError(enc_type, type);
    PyObject *s = NULL;
    *fresh = NULL;
    if (t == NULL && PyErr_Occurred())
        return -1;
    if (t != NULL) {
        s = PyDict_GetItemWithError(enc_sid, sid);
        if (s == NULL && PyErr_Occurred())
            return -1;
    }
    if (t == NULL || s == NULL) {
        PyObject *names = PyObject_CallFunctionObjArgs(encode_names, type, sid, NULL);
        if (names == NULL)
            return -1;
        if (!PyBytes_Check(names)) {
            Py_DECREF(names);
            PyErr_SetString(PyExc_TypeError, "link: encode_names must return bytes");
            return -1;
        }
        *fresh = names;
        return 0;
    }
    if (!PyBytes_Check(t) || !PyBytes_Check(s)) {
        PyErr_SetString(PyExc_TypeError, "link: cached names must be bytes");
        return -1;
    }
    *type_names = t;
    *sid_names = s;
    return 0;
}

static PyObject *
link_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *batch, *prev_obj, *stack, *enc_type, *enc_sid, *encode_names, *counters;
    PyObject *session_start, *session_end;
    PyObject *records = NULL, *sessions = NULL, *marks = NULL, *nodes = NULL, *result = NULL;
    PyObject *items = NULL;
    unsigned char prev[HASH];
    uint64_t seq, size;
    long version;
    Py_ssize_t count, i, node_count = 0, node_cap;
    EVP_MD_CTX *ctx = NULL;

    (void)module;
    if (nargs != 12) {
        PyErr_SetString(PyExc_TypeError, "link() takes exactly 12 arguments");
        return NULL;
    }
    batch = args[0];
    prev_obj = args[2];
    stack = args[3];
    enc_type = args[6];
    enc_sid = args[7];
    encode_names = args[8];
    counters = args[9];
    session_start = args[10];
    session_end = args[11];
    if (!PyList_Check(stack) || !PyDict_Check(enc_type)
        || !PyDict_Check(enc_sid) || !PyDict_Check(counters) || !PyBytes_Check(prev_obj)
        || PyBytes_GET_SIZE(prev_obj) != HASH || !PyUnicode_Check(session_start)
        || !PyUnicode_Check(session_end)) {
        PyErr_SetString(PyExc_TypeError, "link: bad argument types");
        return NULL;
    }
    seq = PyLong_AsUnsignedLongLong(args[1]);
    if (seq == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    size = PyLong_AsUnsignedLongLong(args[4]);
    if (size == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    version = PyLong_AsLong(args[5]);
    if (version == -1 && PyErr_Occurred())
        return NULL;
    if (version < 0 || version > 127) {
        PyErr_SetString(PyExc_ValueError, "link: version must be a positive fixint");
        return NULL;
    }
    memcpy(prev, PyBytes_AS_STRING(prev_obj), HASH);
    /* Our own reference to every item, whatever encode_names does meanwhile. */
    items = PySequence_Tuple(batch);
    if (items == NULL)
        return NULL;
    count = PyTuple_GET_SIZE(items);
    /* Every leaf adds one hash and closes at most 64 subtrees; grown as needed. */
    node_cap = count * 2 + 64;
    nodes = PyBytes_FromStringAndSize(NULL, node_cap * HASH);
    records = PyList_New(0);
    sessions = PyList_New(0);
    marks = PyList_New(0);
    ctx = EVP_MD_CTX_new();
    if (nodes == NULL || records == NULL || sessions == NULL || marks == NULL || ctx == NULL) {
        if (ctx == NULL && !PyErr_Occurred())
            PyErr_NoMemory();
        goto done;
    }

    for (i = 0; i < count; i++) {
        PyObject *item = PyTuple_GET_ITEM(items, i);
        PyObject *type, *sid, *data, *waiter, *raw;
        PyObject *type_names = NULL, *sid_names = NULL, *fresh = NULL;
        Py_ssize_t names_len;
        uint64_t ts;
        int has_index = 0;
        uint64_t index = 0;
        unsigned char hash[HASH];
        Py_ssize_t raw_len;
        unsigned char *p;
        uint64_t m;

        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 5) {
            PyErr_SetString(PyExc_TypeError, "link: batch items are 5-tuples");
            goto done;
        }
        type = PyTuple_GET_ITEM(item, 0);
        sid = PyTuple_GET_ITEM(item, 1);
        data = PyTuple_GET_ITEM(item, 3);
        waiter = PyTuple_GET_ITEM(item, 4);
        if (!PyUnicode_Check(type) || !PyBytes_Check(data)
            || (sid != Py_None && !PyUnicode_Check(sid))) {
            PyErr_SetString(PyExc_TypeError, "link: item is (str, str | None, int, bytes, waiter)");
            goto done;
        }
        ts = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(item, 2));
        if (ts == (uint64_t)-1 && PyErr_Occurred())
            goto done;

        if (sid != Py_None) {
            PyObject *known = PyDict_GetItemWithError(counters, sid);
            int is_end, is_start;
            if (known == NULL && PyErr_Occurred())
                goto done;
            if (known != NULL) {
                index = PyLong_AsUnsignedLongLong(known);
                if (index == (uint64_t)-1 && PyErr_Occurred())
                    goto done;
            }
            has_index = 1;
            is_end = PyUnicode_Compare(type, session_end) == 0;
            if (is_end) {
                if (known != NULL && PyDict_DelItem(counters, sid) < 0)
                    goto done;
            } else {
                PyObject *next = PyLong_FromUnsignedLongLong(index + 1);
                if (next == NULL || PyDict_SetItem(counters, sid, next) < 0) {
                    Py_XDECREF(next);
                    goto done;
                }
                Py_DECREF(next);
            }
            is_start = PyUnicode_Compare(type, session_start) == 0;
            if (is_start) {
                PyObject *sid_bytes = PyUnicode_AsUTF8String(sid);
                if (sid_bytes == NULL || append_pair(sessions, sid_bytes, key_of(seq)) < 0)
                    goto done;
            }
        }
        if (waiter != Py_None) {
            PyObject *at = PyLong_FromSsize_t(i);
            if (at == NULL || append_pair(marks, at, PyLong_FromUnsignedLongLong(seq)) < 0)
                goto done;
        }

        if (names_of(type, sid, enc_type, enc_sid, encode_names, &type_names, &sid_names,
                     &fresh) < 0)
            goto done;
        if (fresh != NULL) {
            type_names = fresh;
            sid_names = NULL;
        }
        names_len = PyBytes_GET_SIZE(type_names) + (sid_names ? PyBytes_GET_SIZE(sid_names) : 0);
        raw_len = HEAD + HASH + names_len + (has_index ? 9 : 1) + PyBytes_GET_SIZE(data);
        raw = PyBytes_FromStringAndSize(NULL, raw_len);
        if (raw == NULL) {
            Py_XDECREF(fresh);
            goto done;
        }
        p = (unsigned char *)PyBytes_AS_STRING(raw);
        p[0] = 0x99;
        p[1] = (unsigned char)version;
        p[2] = 0xCF;
        put_be(p + 3, seq, 8);
        p[11] = 0xCF;
        put_be(p + 12, ts, 8);
        p[20] = 0xC4;
        p[21] = HASH;
        p += HEAD;
        memcpy(p, prev, HASH);
        p += HASH;
        memcpy(p, PyBytes_AS_STRING(type_names), (size_t)PyBytes_GET_SIZE(type_names));
        p += PyBytes_GET_SIZE(type_names);
        if (sid_names != NULL) {
            memcpy(p, PyBytes_AS_STRING(sid_names), (size_t)PyBytes_GET_SIZE(sid_names));
            p += PyBytes_GET_SIZE(sid_names);
        }
        Py_XDECREF(fresh);
        if (has_index) {
            *p++ = 0xCF;
            put_be(p, index, 8);
            p += 8;
        } else {
            *p++ = 0xC0;
        }
        memcpy(p, PyBytes_AS_STRING(data), (size_t)PyBytes_GET_SIZE(data));

        if (digest(ctx, 0x00, (const unsigned char *)PyBytes_AS_STRING(raw), (size_t)raw_len,
                   NULL, 0, hash) < 0) {
            Py_DECREF(raw);
            goto done;
        }
        memcpy(prev, hash, HASH);
        if (append_pair(records, key_of(seq), raw) < 0)
            goto done;

        if (node_count + 65 > node_cap) {
            node_cap *= 2;
            if (_PyBytes_Resize(&nodes, node_cap * HASH) < 0)
                goto done;
        }
        memcpy(PyBytes_AS_STRING(nodes) + node_count * HASH, hash, HASH);
        node_count++;
        for (m = size; m & 1; m >>= 1) {
            Py_ssize_t top = PyList_GET_SIZE(stack);
            PyObject *left;
            unsigned char joined[2 * HASH];
            if (top == 0) {
                PyErr_SetString(PyExc_ValueError, "link: the frontier is shorter than the size says");
                goto done;
            }
            left = PyList_GET_ITEM(stack, top - 1);
            if (!PyBytes_Check(left) || PyBytes_GET_SIZE(left) != HASH) {
                PyErr_SetString(PyExc_TypeError, "link: frontier hashes are 32 bytes");
                goto done;
            }
            memcpy(joined, PyBytes_AS_STRING(left), HASH);
            memcpy(joined + HASH, hash, HASH);
            if (PyList_SetSlice(stack, top - 1, top, NULL) < 0)
                goto done;
            if (digest(ctx, 0x01, joined, sizeof joined, NULL, 0, hash) < 0)
                goto done;
            memcpy(PyBytes_AS_STRING(nodes) + node_count * HASH, hash, HASH);
            node_count++;
        }
        {
            PyObject *top_hash = PyBytes_FromStringAndSize((const char *)hash, HASH);
            if (top_hash == NULL || PyList_Append(stack, top_hash) < 0) {
                Py_XDECREF(top_hash);
                goto done;
            }
            Py_DECREF(top_hash);
        }
        size++;
        seq++;
    }
    if (_PyBytes_Resize(&nodes, node_count * HASH) < 0)
        goto done;
    result = Py_BuildValue("(OOOOy#K)", records, nodes, sessions, marks, (const char *)prev,
                           (Py_ssize_t)HASH, (unsigned long long)size);

done:
    if (ctx != NULL)
        EVP_MD_CTX_free(ctx);
    Py_XDECREF(items);
    Py_XDECREF(records);
    Py_XDECREF(nodes);
    Py_XDECREF(sessions);
    Py_XDECREF(marks);
    return result;
}

/* msgpack, read just far enough for a batch frame: each reader checks that its value
 * is whole in [*p, end), returns -1 when it is not or is of another kind, and moves *p
 * past it. */
static int
read_count(const unsigned char **p, const unsigned char *end, uint64_t *count)
{
    const unsigned char *q = *p;
    if (q >= end)
        return -1;
    if ((*q & 0xF0) == 0x90) {
        *count = *q & 0x0F;
        *p = q + 1;
        return 0;
    }
    if (*q == 0xDC && end - q >= 3) {
        *count = get_be(q + 1, 2);
        *p = q + 3;
        return 0;
    }
    if (*q == 0xDD && end - q >= 5) {
        *count = get_be(q + 1, 4);
        *p = q + 5;
        return 0;
    }
    return -1;
}

/* A str (kind 0) or bin (kind 1) of any width: its bytes in *at and *len. */
static int
read_raw(const unsigned char **p, const unsigned char *end, int kind, const unsigned char **at,
         size_t *len)
{
    const unsigned char *q = *p;
    size_t width, n = 0;
    if (q >= end)
        return -1;
    if (kind == 0 && (*q & 0xE0) == 0xA0) {
        n = *q & 0x1F;
        width = 0;
    } else if (*q == (kind == 0 ? 0xD9 : 0xC4)) {
        width = 1;
    } else if (*q == (kind == 0 ? 0xDA : 0xC5)) {
        width = 2;
    } else if (*q == (kind == 0 ? 0xDB : 0xC6)) {
        width = 4;
    } else {
        return -1;
    }
    q++;
    if ((size_t)(end - q) < width)
        return -1;
    if (width > 0)
        n = (size_t)get_be(q, (int)width);
    q += width;
    if ((size_t)(end - q) < n)
        return -1;
    *at = q;
    *len = n;
    *p = q + n;
    return 0;
}

static int
read_uint(const unsigned char **p, const unsigned char *end, uint64_t *value)
{
    const unsigned char *q = *p;
    size_t width;
    if (q >= end)
        return -1;
    if (*q < 0x80) {
        *value = *q;
        *p = q + 1;
        return 0;
    }
    switch (*q) {
    case 0xCC: width = 1; break;
    case 0xCD: width = 2; break;
    case 0xCE: width = 4; break;
    case 0xCF: width = 8; break;
    default: return -1;
    }
    q++;
    if ((size_t)(end - q) < width)
        return -1;
    *value = get_be(q, (int)width);
    *p = q + width;
    return 0;
}

/* What batch_items remembers of each item it queued: where its session id is in the
 * frame (NULL for nil) and whether it is a query without a result yet. */
struct seen {
    const unsigned char *sid;
    size_t sid_len;
    int open_query;
};

#define JOIN_LOOKBACK 64 /* audit.log.JOIN_LOOKBACK */
#define RESULT_KEY "\xA6result"

/* Joins a result (msgpack map at data, len) to the query item at index j of items when
 * both are maps of fewer than 15 fields: the query's map with the field "result" added
 * (audit.schema.with_result). Returns 1 when joined, 0 when not, -1 on error. */
static int
join_result(PyObject *items, Py_ssize_t j, const unsigned char *data, size_t len)
{
    PyObject *query = PyList_GET_ITEM(items, j), *old = PyTuple_GET_ITEM(query, 3), *joined, *item;
    const unsigned char *q = (const unsigned char *)PyBytes_AS_STRING(old);
    Py_ssize_t qlen = PyBytes_GET_SIZE(old);
    unsigned char *m;
    if (qlen < 1 || q[0] < 0x80 || q[0] >= 0x8F || len < 1 || data[0] < 0x80 || data[0] > 0x8F)
        return 0;
    joined = PyBytes_FromStringAndSize(NULL, qlen + (Py_ssize_t)(sizeof RESULT_KEY - 1) + (Py_ssize_t)len);
    if (joined == NULL)
        return -1;
    m = (unsigned char *)PyBytes_AS_STRING(joined);
    m[0] = (unsigned char)(q[0] + 1);
    memcpy(m + 1, q + 1, (size_t)qlen - 1);
    memcpy(m + qlen, RESULT_KEY, sizeof RESULT_KEY - 1);
    memcpy(m + qlen + sizeof RESULT_KEY - 1, data, len);
    item = PyTuple_Pack(5, PyTuple_GET_ITEM(query, 0), PyTuple_GET_ITEM(query, 1),
                        PyTuple_GET_ITEM(query, 2), joined, Py_None);
    Py_DECREF(joined);
    if (item == NULL)
        return -1;
    PyList_SetItem(items, j, item); /* steals item, releases the query's tuple */
    return 1;
}

/* batch_items(body, types) -> [(type, session_id, ts, data, None), ...] | None
 *
 * The records of an agent's batch frame, msgpack ["b", [[type, session_id, ts, data],
 * ...]], as the writer queues them; None when ``body`` is anything else: another frame,
 * a value of another kind (session_id is a str or nil, ts an unsigned int, data a bin),
 * text that is not UTF-8, bytes left over, or a type not in the set ``types``. The
 * writer then decodes the frame the general way, which says what is wrong.
 *
 * A record may have a fifth field, a bool; a "result" with true there answers the query
 * record its session sent last, and when that is in this frame (within JOIN_LOOKBACK
 * items) with no result yet, the two become one item (audit.log.joined_items). */
static PyObject *
batch_items(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    const unsigned char *p, *end, *at, *sid_at;
    uint64_t count, fields, ts, i;
    size_t len, sid_len, type_len;
    PyObject *items = NULL, *types;
    struct seen *seen = NULL;

    (void)module;
    if (nargs != 2 || !PyAnySet_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "batch_items(body, types) takes bytes and a set");
        return NULL;
    }
    types = args[1];
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    p = (const unsigned char *)view.buf;
    end = p + view.len;
    if (end - p < 3 || p[0] != 0x92 || p[1] != 0xA1 || p[2] != 'b')
        goto none;
    p += 3;
    if (read_count(&p, end, &count) < 0 || count > (uint64_t)(end - p))
        goto none;
    items = PyList_New(0);
    seen = PyMem_Malloc(sizeof *seen * ((size_t)count + 1));
    if (items == NULL || seen == NULL) {
        if (seen == NULL)
            PyErr_NoMemory();
        goto fail;
    }
    for (i = 0; i < count; i++) {
        PyObject *type = NULL, *sid = NULL, *stamp = NULL, *data = NULL, *item;
        const unsigned char *type_at;
        int known, joins = 0, rc;
        if (read_count(&p, end, &fields) < 0 || (fields != 4 && fields != 5)
            || read_raw(&p, end, 0, &at, &len) < 0)
            goto none;
        type_at = at;
        type_len = len;
        type = PyUnicode_DecodeUTF8((const char *)at, (Py_ssize_t)len, NULL);
        if (type == NULL)
            goto bad_text;
        known = PySet_Contains(types, type);
        if (known <= 0) {
            Py_DECREF(type);
            if (known < 0)
                goto fail;
            goto none;
        }
        if (p < end && *p == 0xC0) {
            p++;
            sid = Py_NewRef(Py_None);
            sid_at = NULL;
            sid_len = 0;
        } else if (read_raw(&p, end, 0, &at, &len) == 0) {
            sid = PyUnicode_DecodeUTF8((const char *)at, (Py_ssize_t)len, NULL);
            if (sid == NULL) {
                Py_DECREF(type);
                goto bad_text;
            }
            sid_at = at;
            sid_len = len;
        } else {
            Py_DECREF(type);
            goto none;
        }
        if (read_uint(&p, end, &ts) < 0 || read_raw(&p, end, 1, &at, &len) < 0
            || (fields == 5 && (p >= end || (*p != 0xC2 && *p != 0xC3)))) {
            Py_DECREF(type);
            Py_DECREF(sid);
            goto none;
        }
        if (fields == 5)
            joins = *p++ == 0xC3;
        if (joins && type_len == 6 && memcmp(type_at, "result", 6) == 0) {
            /* The session's last item in this frame: when it is a query without a result,
             * the result joins it. */
            Py_ssize_t n = PyList_GET_SIZE(items), j, stop = n > JOIN_LOOKBACK ? n - JOIN_LOOKBACK : 0;
            for (j = n - 1; j >= stop; j--) {
                if ((seen[j].sid == NULL) == (sid_at == NULL) && seen[j].sid_len == sid_len
                    && (sid_at == NULL || memcmp(seen[j].sid, sid_at, sid_len) == 0))
                    break;
            }
            if (j >= stop && seen[j].open_query) {
                rc = join_result(items, j, at, len);
                if (rc != 0) {
                    Py_DECREF(type);
                    Py_DECREF(sid);
                    if (rc < 0)
                        goto fail;
                    seen[j].open_query = 0;
                    continue;
                }
            }
        }
        stamp = PyLong_FromUnsignedLongLong(ts);
        data = stamp != NULL ? PyBytes_FromStringAndSize((const char *)at, (Py_ssize_t)len) : NULL;
        item = data != NULL ? PyTuple_Pack(5, type, sid, stamp, data, Py_None) : NULL;
        Py_DECREF(type);
        Py_DECREF(sid);
        Py_XDECREF(stamp);
        Py_XDECREF(data);
        if (item == NULL)
            goto fail;
        seen[PyList_GET_SIZE(items)] = (struct seen){
            sid_at, sid_len, type_len == 5 && memcmp(type_at, "query", 5) == 0};
        rc = PyList_Append(items, item);
        Py_DECREF(item);
        if (rc < 0)
            goto fail;
    }
    if (p != end)
        goto none;
    PyMem_Free(seen);
    PyBuffer_Release(&view);
    return items;

bad_text:
    if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
        goto fail;
    PyErr_Clear();
none:
    Py_XDECREF(items);
    PyMem_Free(seen);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
fail:
    Py_XDECREF(items);
    PyMem_Free(seen);
    PyBuffer_Release(&view);
    return NULL;
}

/* batch_frame(records, pack) -> bytes
 *
 * The agent's batch frame, msgpack ["b", [[type, session_id, ts, data], ...]], of
 * ``records`` (type, session_id, ts, event): data is the event itself when it is bytes
 * (already encoded), else ``pack(event)``. Byte for byte what msgpack's Packer makes of
 * the same (audit.log._batch_frame_py); errors from ``pack`` and values of other kinds
 * are raised. A record may be a 5-tuple ending in True, a result that joins its query
 * (see batch_items): written as [type, session_id, ts, data, true]. */
static PyObject *
batch_frame(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *records, *pack, *datas = NULL, *frame = NULL;
    Py_ssize_t count, i, size = 3 + 5;
    unsigned char *q;

    (void)module;
    if (nargs != 2 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "batch_frame(records, pack) takes a list and a callable");
        return NULL;
    }
    records = args[0];
    pack = args[1];
    count = PyList_GET_SIZE(records);
    datas = PyList_New(count);
    if (datas == NULL)
        return NULL;
    /* First the events' bytes and the frame's size, then the frame. */
    for (i = 0; i < count; i++) {
        PyObject *record = PyList_GET_ITEM(records, i), *type, *sid, *data;
        Py_ssize_t len;
        if (!PyTuple_Check(record) || PyTuple_GET_SIZE(record) < 4 || PyTuple_GET_SIZE(record) > 5
            || (PyTuple_GET_SIZE(record) == 5 && PyTuple_GET_ITEM(record, 4) != Py_True)) {
            PyErr_SetString(PyExc_TypeError,
                            "batch_frame: records are 4-tuples, or 5-tuples ending in True");
            goto done;
        }
        type = PyTuple_GET_ITEM(record, 0);
        sid = PyTuple_GET_ITEM(record, 1);
        if (!PyUnicode_Check(type) || (sid != Py_None && !PyUnicode_Check(sid))) {
            PyErr_SetString(PyExc_TypeError, "batch_frame: type and session id are str");
            goto done;
        }
        data = PyTuple_GET_ITEM(record, 3);
        if (PyBytes_CheckExact(data)) {
            Py_INCREF(data);
        } else {
            data = PyObject_CallOneArg(pack, data);
            if (data == NULL)
                goto done;
            if (!PyBytes_Check(data)) {
                Py_DECREF(data);
                PyErr_SetString(PyExc_TypeError, "batch_frame: pack must return bytes");
                goto done;
            }
        }
        PyList_SET_ITEM(datas, i, data);
        if (PyUnicode_AsUTF8AndSize(type, &len) == NULL)
            goto done;
        size += 1 + 3 * HEAD_MAX + len + PyBytes_GET_SIZE(data) + 1;
        if (sid != Py_None) {
            if (PyUnicode_AsUTF8AndSize(sid, &len) == NULL)
                goto done;
            size += len;
        }
    }
    frame = PyBytes_FromStringAndSize(NULL, size);
    if (frame == NULL)
        goto done;
    q = (unsigned char *)PyBytes_AS_STRING(frame);
    *q++ = 0x92;
    *q++ = 0xA1;
    *q++ = 'b';
    if (count < 16) {
        *q++ = (unsigned char)(0x90 | count);
    } else if (count <= 0xffff) {
        *q++ = 0xDC;
        q = put_be(q, (uint64_t)count, 2);
    } else {
        *q++ = 0xDD;
        q = put_be(q, (uint64_t)count, 4);
    }
    for (i = 0; i < count; i++) {
        PyObject *record = PyList_GET_ITEM(records, i), *sid, *data;
        const char *text;
        Py_ssize_t len;
        uint64_t ts;
        sid = PyTuple_GET_ITEM(record, 1);
        data = PyList_GET_ITEM(datas, i);
        ts = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(record, 2));
        if (ts == (uint64_t)-1 && PyErr_Occurred())
            goto fail;
        *q++ = (unsigned char)(0x90 | PyTuple_GET_SIZE(record));
        text = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(record, 0), &len);
        q = put_str(q, text, (size_t)len);
        if (sid == Py_None) {
            *q++ = 0xC0;
        } else {
            text = PyUnicode_AsUTF8AndSize(sid, &len);
            q = put_str(q, text, (size_t)len);
        }
        q = put_uint(q, ts);
        q = put_raw(q, PyBytes_AS_STRING(data), (size_t)PyBytes_GET_SIZE(data), 1);
        if (PyTuple_GET_SIZE(record) == 5)
            *q++ = 0xC3; /* a result that joins its query (batch_items) */
    }
    if (_PyBytes_Resize(&frame, (Py_ssize_t)(q - (unsigned char *)PyBytes_AS_STRING(frame))) < 0)
        goto done;
    goto done;

fail:
    Py_CLEAR(frame);
done:
    Py_DECREF(datas);
    return frame;
}

static PyMethodDef methods[] = {
    {"link", (PyCFunction)(void (*)(void))link_batch, METH_FASTCALL,
     "link(...) -> (records, nodes, sessions, marks, prev, size): one batch's envelopes and hashes."},
    {"batch_frame", (PyCFunction)(void (*)(void))batch_frame, METH_FASTCALL,
     "batch_frame(records, pack) -> bytes: an agent's batch frame of records."},
    {"batch_items", (PyCFunction)(void (*)(void))batch_items, METH_FASTCALL,
     "batch_items(body, types) -> list | None: the records of an agent's batch frame, checked."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "audit._link",
    "The audit writer's per-record work (envelopes, hash chain, Merkle nodes), compiled.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__link(void)
{
    if (sha256_md == NULL) {
        sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
        if (sha256_md == NULL) {
            PyErr_SetString(PyExc_ImportError, "audit._link: OpenSSL has no SHA-256");
            return NULL;
        }
    }
    return PyModule_Create(&module);
}
