/* The PostgreSQL data path's commonest steps, compiled.
 *
 * datarows(data, pos) -> (end, rows, row_bytes)
 *
 * Starting at offset ``pos`` of ``data`` (any bytes-like object), counts the
 * whole DataRow messages ('D', then a big-endian int32 length that counts
 * itself) that follow one another, and returns where the run ends, how many
 * there were and how many bytes they took, type bytes included. The run ends
 * at the first message of another type, at a DataRow not whole in ``data``,
 * at one whose length is below 4 (invalid: the caller's general path reports
 * it), or at the end of ``data``. Nothing is copied and nothing is decoded.
 *
 * allowed_query(data, reused, max_message, max_text, plain) -> bytes | None
 *
 * The query record of ``data`` when it is exactly one whole simple Query
 * message whose text is ASCII, holds no NUL before its end, is at most
 * ``max_text`` bytes and has a plain shape (``plain(text)`` returns a tuple
 * whose first item is the key) found in the dict ``reused`` with a true
 * ``allowed``; None for anything else. The record is the one the session
 * builds, already encoded as msgpack: length, sha256 (of the text), protocol,
 * text, truncated, and ``policy`` the entry's ``encoded`` (msgpack) record.
 *
 * plain_reply(data, max_message, duration_ms) -> (record, status) | None
 *
 * When ``data`` is exactly the commonest answer to a simple Query: an optional
 * RowDescription, any DataRows, one CommandComplete whose tag is ASCII, then
 * ReadyForQuery, each whole and within bounds: the statement's result record,
 * encoded as msgpack (duration_ms, rows: the tag's count when it ends in one,
 * else the DataRows counted; command_tag, commands, outcome), and the
 * transaction status; None for anything else.
 *
 * bound_execute(data, max_message) -> (parse, portal, statement, formats, values) | None
 *
 * When ``data`` is exactly an optional Parse, a Bind, an optional Describe of
 * a portal, an Execute of the portal bound and a Sync, each whole and at most
 * ``max_message`` bytes, with nothing after any message's fields: the Bind's
 * portal and statement names (decoded as UTF-8, errors replaced), its
 * parameter format codes (a tuple) and its values (a list of bytes, None for
 * NULL), and ``parse`` the Parse's (name, text, parameter types) or None.
 * None for anything else.
 *
 * agent/protocols/postgres.py (datarows) and agent/pgsession.py
 * (allowed_query, plain_reply, bound_execute) have the same in Python, used when this module
 * is not built; tests/unit/protocols/test_pgscan_native.py and
 * tests/unit/test_pgsession_fast.py hold each pair to the same answers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <openssl/evp.h>

#include "_msgpack.h" /* audit/_msgpack.h */

/* Fetched once: with OpenSSL 3, EVP_sha256() looks the digest up again on every use. */
static EVP_MD *sha256_md;

/* Names made once: the entry's attributes. */
static PyObject *s_allowed, *s_encoded;

/* A message's int32 length (big-endian, counting itself). */
static uint32_t
length_at(const unsigned char *p)
{
    return (uint32_t)get_be(p, 4);
}

/* The (data, n) arguments of datarows and plain_reply: a buffer on data, and n. */
static int
data_and_size(PyObject *const *args, Py_ssize_t nargs, const char *usage, Py_buffer *view,
              Py_ssize_t *n)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "%s takes exactly 2 arguments", usage);
        return -1;
    }
    *n = PyNumber_AsSsize_t(args[1], PyExc_OverflowError);
    if (*n == -1 && PyErr_Occurred())
        return -1;
    return PyObject_GetBuffer(args[0], view, PyBUF_SIMPLE);
}

/* The end of the run of whole DataRows at pos (see datarows above), adding their count
 * and size to *rows and *row_bytes. */
static Py_ssize_t
run_of_datarows(const unsigned char *p, Py_ssize_t size, Py_ssize_t pos, Py_ssize_t *rows,
                Py_ssize_t *row_bytes)
{
    while (size - pos >= 5 && p[pos] == 'D') {
        int32_t length = (int32_t)length_at(p + pos + 1);
        if (length < 4 || size - pos - 1 < (Py_ssize_t)length)
            break;
        *rows += 1;
        *row_bytes += (Py_ssize_t)length + 1;
        pos += (Py_ssize_t)length + 1;
    }
    return pos;
}

static PyObject *
datarows(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t pos, size, rows = 0, row_bytes = 0;
    const unsigned char *p;

    (void)module;
    if (data_and_size(args, nargs, "datarows(data, pos)", &view, &pos) < 0)
        return NULL;
    p = (const unsigned char *)view.buf;
    size = view.len;
    if (pos < 0 || pos > size) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "datarows: pos is outside data");
        return NULL;
    }
    pos = run_of_datarows(p, size, pos, &rows, &row_bytes);
    PyBuffer_Release(&view);
    return Py_BuildValue("(nnn)", pos, rows, row_bytes);
}

static PyObject *
allowed_query(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t size, n, i, max_message, max_text;
    const unsigned char *p;
    PyObject *shape = NULL, *known, *allowed = NULL, *policy = NULL, *record = NULL, *text;
    unsigned char *q;
    unsigned char digest[EVP_MAX_MD_SIZE];
    char hex[2 * EVP_MAX_MD_SIZE];
    unsigned int dlen = 0;
    int truth;
    uint32_t length;

    (void)module;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "allowed_query(data, reused, max_message, max_text, plain) takes 5 arguments");
        return NULL;
    }
    if (!PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "allowed_query: reused must be a dict");
        return NULL;
    }
    max_message = PyNumber_AsSsize_t(args[2], PyExc_OverflowError);
    if (max_message == -1 && PyErr_Occurred())
        return NULL;
    max_text = PyNumber_AsSsize_t(args[3], PyExc_OverflowError);
    if (max_text == -1 && PyErr_Occurred())
        return NULL;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    p = (const unsigned char *)view.buf;
    size = view.len;
    if (size < 6 || p[0] != 'Q' || p[size - 1] != 0)
        goto none;
    length = length_at(p + 1);
    if ((Py_ssize_t)length != size - 1 || (Py_ssize_t)length > max_message)
        goto none;
    n = size - 6; /* the text, between the length and the closing NUL */
    if (n > max_text)
        goto none;
    for (i = 0; i < n; i++) {
        if (p[5 + i] == 0 || p[5 + i] >= 0x80)
            goto none;
    }
    text = PyUnicode_DecodeASCII((const char *)p + 5, n, "strict");
    if (text == NULL)
        goto fail;
    shape = PyObject_CallOneArg(args[4], text);
    Py_DECREF(text);
    if (shape == NULL)
        goto fail;
    if (!PyTuple_Check(shape) || PyTuple_GET_SIZE(shape) < 1)
        goto none;
    known = PyDict_GetItemWithError(args[1], PyTuple_GET_ITEM(shape, 0)); /* borrowed */
    if (known == NULL) {
        if (PyErr_Occurred())
            goto fail;
        goto none;
    }
    allowed = PyObject_GetAttr(known, s_allowed);
    if (allowed == NULL)
        goto fail;
    truth = PyObject_IsTrue(allowed);
    if (truth < 0)
        goto fail;
    if (!truth)
        goto none;
    policy = PyObject_GetAttr(known, s_encoded);
    if (policy == NULL)
        goto fail;
    if (!PyBytes_Check(policy)) {
        PyErr_SetString(PyExc_TypeError, "allowed_query: an entry's encoded record must be bytes");
        goto fail;
    }
    if (EVP_Digest(p + 5, (size_t)n, digest, &dlen, sha256_md, NULL) != 1) {
        PyErr_SetString(PyExc_RuntimeError, "allowed_query: SHA-256 failed in OpenSSL");
        goto fail;
    }
    for (i = 0; i < (Py_ssize_t)dlen; i++) {
        hex[2 * i] = "0123456789abcdef"[digest[i] >> 4];
        hex[2 * i + 1] = "0123456789abcdef"[digest[i] & 15];
    }
    /* The session's record (agent/pgsession.py, _query_record), keys in its order. */
    record = PyBytes_FromStringAndSize(NULL, 64 + 3 * HEAD_MAX + 2 * (Py_ssize_t)dlen + n
                                             + PyBytes_GET_SIZE(policy));
    if (record == NULL)
        goto fail;
    q = (unsigned char *)PyBytes_AS_STRING(record);
    *q++ = 0x86;
    q = PUT_KEY(q, "length");
    q = put_uint(q, (uint64_t)n);
    q = PUT_KEY(q, "sha256");
    q = put_str(q, hex, 2 * (size_t)dlen);
    q = PUT_KEY(q, "protocol");
    q = PUT_KEY(q, "simple");
    q = PUT_KEY(q, "text");
    q = put_str(q, p + 5, (size_t)n);
    q = PUT_KEY(q, "truncated");
    *q++ = 0xC2;
    q = PUT_KEY(q, "policy");
    memcpy(q, PyBytes_AS_STRING(policy), (size_t)PyBytes_GET_SIZE(policy));
    q += PyBytes_GET_SIZE(policy);
    if (_PyBytes_Resize(&record, (Py_ssize_t)(q - (unsigned char *)PyBytes_AS_STRING(record))) < 0)
        goto fail;
    Py_DECREF(shape);
    Py_DECREF(allowed);
    Py_DECREF(policy);
    PyBuffer_Release(&view);
    return record;

none:
    Py_XDECREF(shape);
    Py_XDECREF(allowed);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;

fail:
    Py_XDECREF(shape);
    Py_XDECREF(allowed);
    Py_XDECREF(policy);
    Py_XDECREF(record);
    PyBuffer_Release(&view);
    return NULL;
}

static PyObject *
plain_reply(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t size, pos = 0, rows = 0, row_bytes = 0, max_message, end, i, tag_len, space = -1;
    const unsigned char *p, *tag;
    PyObject *event;
    unsigned char *q;
    uint32_t length;
    uint64_t count, bits;
    double duration;
    char status;
    int counted;

    (void)module;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "plain_reply(data, max_message, duration_ms) takes 3 arguments");
        return NULL;
    }
    duration = PyFloat_AsDouble(args[2]);
    if (duration == -1.0 && PyErr_Occurred())
        return NULL;
    if (data_and_size(args, 2, "plain_reply(data, max_message, duration_ms)", &view, &max_message) < 0)
        return NULL;
    p = (const unsigned char *)view.buf;
    size = view.len;
    if (size - pos >= 5 && p[pos] == 'T') {
        length = length_at(p + pos + 1);
        if (length < 6 || (Py_ssize_t)length > max_message || (Py_ssize_t)length > size - pos - 1)
            goto none;
        pos += (Py_ssize_t)length + 1;
    }
    /* (A DataRow not whole ends the run there: then no CommandComplete follows it.) */
    pos = run_of_datarows(p, size, pos, &rows, &row_bytes);
    /* CommandComplete: a NUL-terminated ASCII tag */
    if (size - pos < 5 || p[pos] != 'C')
        goto none;
    length = length_at(p + pos + 1);
    if (length < 5 || (Py_ssize_t)length > max_message || (Py_ssize_t)length > size - pos - 1)
        goto none;
    end = pos + 1 + (Py_ssize_t)length;
    tag = p + pos + 5;
    for (tag_len = 0; tag + tag_len < p + end && tag[tag_len] != 0; tag_len++) {
        if (tag[tag_len] >= 0x80)
            goto none;
        if (tag[tag_len] == ' ')
            space = tag_len;
    }
    if (tag + tag_len == p + end)
        goto none; /* not NUL-terminated */
    pos = end;
    /* ReadyForQuery, ending the data */
    if (size - pos != 6 || p[pos] != 'Z' || length_at(p + pos + 1) != 5)
        goto none;
    status = (char)p[pos + 5];
    if (status != 'I' && status != 'T' && status != 'E')
        goto none;
    /* The tag's count: its last word, when all digits and not the only word. */
    counted = space >= 0 && space + 1 < tag_len;
    for (i = space + 1; counted && i < tag_len; i++) {
        if (tag[i] < '0' || tag[i] > '9')
            counted = 0;
    }
    count = (uint64_t)rows;
    if (counted) {
        count = 0;
        for (i = space + 1; i < tag_len; i++) {
            uint64_t digit = (uint64_t)(tag[i] - '0');
            if (count > (UINT64_MAX - digit) / 10)
                goto none; /* more than a record's uint64 holds: the general path says so */
            count = count * 10 + digit;
        }
    }
    /* The result record (agent/pgsession.py, _result_record), keys in its order. */
    event = PyBytes_FromStringAndSize(NULL, 80 + 2 * (HEAD_MAX + tag_len));
    if (event == NULL)
        goto fail;
    q = (unsigned char *)PyBytes_AS_STRING(event);
    *q++ = 0x85;
    q = PUT_KEY(q, "duration_ms");
    *q++ = 0xCB;
    memcpy(&bits, &duration, sizeof bits);
    q = put_be(q, bits, 8);
    q = PUT_KEY(q, "rows");
    q = put_uint(q, count);
    q = PUT_KEY(q, "command_tag");
    q = put_str(q, tag, (size_t)tag_len);
    q = PUT_KEY(q, "commands");
    *q++ = 0x91;
    q = put_str(q, tag, (size_t)tag_len);
    q = PUT_KEY(q, "outcome");
    q = PUT_KEY(q, "success");
    PyBuffer_Release(&view);
    if (_PyBytes_Resize(&event, (Py_ssize_t)(q - (unsigned char *)PyBytes_AS_STRING(event))) < 0)
        return NULL;
    return Py_BuildValue("(NC)", event, (int)status);

none:
    PyBuffer_Release(&view);
    Py_RETURN_NONE;

fail:
    PyBuffer_Release(&view);
    return NULL;
}

/* A big-endian int16 at p. */
static int
int16_at(const unsigned char *p)
{
    return (int16_t)(uint16_t)get_be(p, 2);
}

/* The NUL ending the string at pos, before end; -1 when there is none. */
static Py_ssize_t
nul_in(const unsigned char *p, Py_ssize_t pos, Py_ssize_t end)
{
    const unsigned char *nul;

    if (pos >= end)
        return -1;
    nul = memchr(p + pos, 0, (size_t)(end - pos));
    return nul == NULL ? -1 : nul - p;
}

/* A message's end when a whole one of ``kind`` starts at pos, its length within
 * [minimum, max_message]; -1 otherwise. */
static Py_ssize_t
message_end(const unsigned char *p, Py_ssize_t size, Py_ssize_t pos, unsigned char kind,
            int32_t minimum, Py_ssize_t max_message)
{
    int32_t length;

    if (size - pos < 5 || p[pos] != kind)
        return -1;
    length = (int32_t)length_at(p + pos + 1);
    if (length < minimum || (Py_ssize_t)length > max_message || size - pos - 1 < (Py_ssize_t)length)
        return -1;
    return pos + 1 + (Py_ssize_t)length;
}

static PyObject *
text_of(const unsigned char *p, Py_ssize_t start, Py_ssize_t end)
{
    return PyUnicode_DecodeUTF8((const char *)p + start, end - start, "replace");
}

static PyObject *
bound_execute(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t size, max_message, pos = 0, end, at, name_end, text_end, portal_end, portal_len;
    Py_ssize_t i, count;
    const unsigned char *p;
    PyObject *parse = NULL, *portal = NULL, *statement = NULL, *formats = NULL, *values = NULL;
    PyObject *item;

    (void)module;
    if (data_and_size(args, nargs, "bound_execute(data, max_message)", &view, &max_message) < 0)
        return NULL;
    p = (const unsigned char *)view.buf;
    size = view.len;
    if (size >= 1 && p[0] == 'P') {
        PyObject *types;

        end = message_end(p, size, 0, 'P', 4, max_message);
        if (end < 0 || (name_end = nul_in(p, 5, end)) < 0
                || (text_end = nul_in(p, name_end + 1, end)) < 0 || end - text_end < 3)
            goto none;
        count = int16_at(p + text_end + 1);
        if (count < 0 || end - text_end - 3 != 4 * count)
            goto none;
        types = PyTuple_New(count);
        if (types == NULL)
            goto fail;
        for (i = 0; i < count; i++) {
            item = PyLong_FromUnsignedLong((unsigned long)length_at(p + text_end + 3 + 4 * i));
            if (item == NULL) {
                Py_DECREF(types);
                goto fail;
            }
            PyTuple_SET_ITEM(types, i, item);
        }
        parse = Py_BuildValue("(NNN)", text_of(p, 5, name_end),
                              text_of(p, name_end + 1, text_end), types);
        if (parse == NULL)
            goto fail;
        pos = end;
    }
    end = message_end(p, size, pos, 'B', 4, max_message);
    if (end < 0 || (portal_end = nul_in(p, pos + 5, end)) < 0
            || (name_end = nul_in(p, portal_end + 1, end)) < 0)
        goto none;
    at = name_end + 1;
    if (end - at < 2)
        goto none;
    count = int16_at(p + at);
    at += 2;
    if (count < 0 || end - at < 2 * count + 2)
        goto none;
    formats = PyTuple_New(count);
    if (formats == NULL)
        goto fail;
    for (i = 0; i < count; i++) {
        item = PyLong_FromLong(int16_at(p + at + 2 * i));
        if (item == NULL)
            goto fail;
        PyTuple_SET_ITEM(formats, i, item);
    }
    at += 2 * count;
    count = int16_at(p + at);
    at += 2;
    values = PyList_New(0);
    if (values == NULL)
        goto fail;
    for (i = 0; i < count; i++) {
        int32_t value_length;

        if (end - at < 4)
            goto none;
        value_length = (int32_t)length_at(p + at);
        at += 4;
        if (value_length == -1) {
            if (PyList_Append(values, Py_None) < 0)
                goto fail;
            continue;
        }
        if (value_length < 0 || end - at < (Py_ssize_t)value_length)
            goto none;
        item = PyBytes_FromStringAndSize((const char *)p + at, value_length);
        if (item == NULL || PyList_Append(values, item) < 0) {
            Py_XDECREF(item);
            goto fail;
        }
        Py_DECREF(item);
        at += value_length;
    }
    if (end - at < 2)
        goto none;
    count = int16_at(p + at);
    if (count < 0 || end - at - 2 != 2 * count)
        goto none;
    portal_len = portal_end - pos - 5;
    pos = end;
    if (size - pos >= 6 && p[pos] == 'D' && p[pos + 5] == 'P') {  /* Describe (portal) */
        end = message_end(p, size, pos, 'D', 6, max_message);
        if (end < 0 || nul_in(p, pos + 6, end) != end - 1)
            goto none;
        pos = end;
    }
    /* Execute of the portal bound, then Sync, and nothing after. */
    end = pos + portal_len + 10;
    if (size != end + 5 || message_end(p, size, pos, 'E', 4, max_message) != end
            || memcmp(p + pos + 5, p + portal_end - portal_len, (size_t)portal_len) != 0
            || p[pos + 5 + portal_len] != 0 || memcmp(p + end, "S\0\0\0\4", 5) != 0)
        goto none;
    portal = text_of(p, portal_end - portal_len, portal_end);
    statement = text_of(p, portal_end + 1, name_end);
    if (portal == NULL || statement == NULL)
        goto fail;
    PyBuffer_Release(&view);
    return Py_BuildValue("(NNNNN)", parse != NULL ? parse : Py_NewRef(Py_None), portal,
                         statement, formats, values);

none:
    PyBuffer_Release(&view);
    Py_XDECREF(parse);
    Py_XDECREF(formats);
    Py_XDECREF(values);
    Py_RETURN_NONE;

fail:
    PyBuffer_Release(&view);
    Py_XDECREF(parse);
    Py_XDECREF(portal);
    Py_XDECREF(statement);
    Py_XDECREF(formats);
    Py_XDECREF(values);
    return NULL;
}

static PyMethodDef methods[] = {
    {"datarows", (PyCFunction)(void (*)(void))datarows, METH_FASTCALL,
     "datarows(data, pos) -> (end, rows, row_bytes): the run of whole DataRow messages at pos."},
    {"allowed_query", (PyCFunction)(void (*)(void))allowed_query, METH_FASTCALL,
     "allowed_query(data, reused, max_message, max_text, plain) -> bytes | None: the record "
     "(msgpack) of a lone Query whose shape the session already allowed."},
    {"plain_reply", (PyCFunction)(void (*)(void))plain_reply, METH_FASTCALL,
     "plain_reply(data, max_message, duration_ms) -> (record, status) | None: the result record "
     "(msgpack) of a whole ordinary answer to a simple Query."},
    {"bound_execute", (PyCFunction)(void (*)(void))bound_execute, METH_FASTCALL,
     "bound_execute(data, max_message) -> (parse, portal, statement, formats, values) | None: "
     "a statement run once in the extended protocol, read."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "agent.protocols._pgscan",
    "The PostgreSQL data path's commonest steps, compiled.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__pgscan(void)
{
    if (s_encoded == NULL) {
        s_allowed = PyUnicode_InternFromString("allowed");
        s_encoded = PyUnicode_InternFromString("encoded");
        if (s_allowed == NULL || s_encoded == NULL)
            return NULL;
    }
    if (sha256_md == NULL) {
        sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
        if (sha256_md == NULL) {
            PyErr_SetString(PyExc_ImportError, "OpenSSL has no SHA-256");
            return NULL;
        }
    }
    return PyModule_Create(&module);
}
