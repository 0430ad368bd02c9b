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
 * duration_ms(seconds) -> float
 *
 * round(seconds * 1000.0, 3), to the last bit as Python computes it: a result record's
 * duration_ms, which server_step computes with it.
 *
 * client_step(plain, pending, pending_fields, max_cached_text, side, data) -> 0 | 1 | 2
 * server_step(side, data) -> 0 | 1 | 2
 *
 * The proxy's one-step paths (agent/proxy.py ClientSide.data_received and
 * UpstreamSide.data_received around allowed_query and plain_reply), in one call each:
 * the same checks, the same writes to the transports, the same records queued and the
 * same session state moved on, read and written in the objects' __slots__. They answer 0
 * with nothing done whenever the Python would not try the one-step way, 1 when they took
 * it, and 2 when the session's general path is next: for client_step, the session
 * declined the bytes (a Query it reads in C, anything else its allowed_execute); for
 * server_step, it relayed the bytes and the session did not take them in one step.
 * tests/unit/test_proxy_fast.py holds them to the proxy's Python.
 *
 * agent/protocols/postgres.py (datarows) and agent/pgsession.py
 * (allowed_query, plain_reply, bound_execute) have the same in Python, used when this module
 * is not built; tests/unit/protocols/test_pgscan_native.py and
 * tests/unit/test_pgsession_fast.py hold each pair to the same answers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <openssl/evp.h>
#include <structmember.h>
#include <time.h>

#include "_msgpack.h" /* audit/_msgpack.h */

/* Fetched once: with OpenSSL 3, EVP_sha256() looks the digest up again on every use. One
 * context, made once and reset for each digest (EVP_Digest makes and frees one a call);
 * every use holds the GIL. */
static EVP_MD *sha256_md;
static EVP_MD_CTX *sha256_ctx;

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

/* allowed_query's answer for the message at p (size bytes): the record, None, or NULL with
 * an exception set. ``reused`` is a dict. */
static PyObject *
query_record(const unsigned char *p, Py_ssize_t size, PyObject *reused, Py_ssize_t max_message,
             Py_ssize_t max_text, PyObject *plain)
{
    Py_ssize_t n, i;
    PyObject *shape = NULL, *known, *allowed = NULL, *policy = NULL, *record = NULL, *text;
    unsigned char *q;
    unsigned char digest[EVP_MAX_MD_SIZE];
    char hex[2 * EVP_MAX_MD_SIZE];
    unsigned int dlen = 0;
    int truth;
    uint32_t length;

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
    shape = PyObject_CallOneArg(plain, text);
    Py_DECREF(text);
    if (shape == NULL)
        goto fail;
    if (!PyTuple_Check(shape) || PyTuple_GET_SIZE(shape) < 1)
        goto none;
    known = PyDict_GetItemWithError(reused, PyTuple_GET_ITEM(shape, 0)); /* borrowed */
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
    if (EVP_DigestInit_ex(sha256_ctx, sha256_md, NULL) != 1
            || EVP_DigestUpdate(sha256_ctx, p + 5, (size_t)n) != 1
            || EVP_DigestFinal_ex(sha256_ctx, digest, &dlen) != 1) {
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
    return record;

none:
    Py_XDECREF(shape);
    Py_XDECREF(allowed);
    Py_RETURN_NONE;

fail:
    Py_XDECREF(shape);
    Py_XDECREF(allowed);
    Py_XDECREF(policy);
    Py_XDECREF(record);
    return NULL;
}

static PyObject *
allowed_query(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t max_message, max_text;
    PyObject *record;

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
    record = query_record((const unsigned char *)view.buf, view.len, args[1], max_message,
                          max_text, args[4]);
    PyBuffer_Release(&view);
    return record;
}

/* plain_reply's answer for the size bytes at p: (record, status), None, or NULL with an
 * exception set. */
static PyObject *
reply_record(const unsigned char *p, Py_ssize_t size, Py_ssize_t max_message, double duration)
{
    Py_ssize_t pos = 0, rows = 0, row_bytes = 0, end, i, tag_len, space = -1;
    const unsigned char *tag;
    PyObject *event;
    unsigned char *q;
    uint32_t length;
    uint64_t count, bits;
    char status;
    int counted;

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
    if (_PyBytes_Resize(&event, (Py_ssize_t)(q - (unsigned char *)PyBytes_AS_STRING(event))) < 0)
        return NULL;
    return Py_BuildValue("(NC)", event, (int)status);

none:
    Py_RETURN_NONE;

fail:
    return NULL;
}

static PyObject *
plain_reply(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t max_message;
    double duration;
    PyObject *reply;

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
    reply = reply_record((const unsigned char *)view.buf, view.len, max_message, duration);
    PyBuffer_Release(&view);
    return reply;
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

/* ------------------------------------------------------------------------------------
 * The proxy's one-step paths (agent/proxy.py ClientSide and UpstreamSide), compiled:
 * what their data_received does with the commonest bytes, in one call, reading and moving
 * on the same objects' state as their Python does. The fields it uses are __slots__ of
 * their classes, read and written here at their member descriptors' offsets. Whenever an
 * object is not as the one-step path needs (a field unset, a class whose field is not a
 * slot, a session not ready), a step does nothing and says so: the Python then takes the
 * bytes as it does without this.
 */

#define MAX_FIELDS 24

/* Where a class keeps the fields a step uses: their offsets in its instances. */
typedef struct {
    const char *const *names;
    int count;
    PyTypeObject *type; /* the class last seen (a reference: no other class reuses it) */
    int usable;         /* whether each field is a plain slot of that class */
    Py_ssize_t offset[MAX_FIELDS];
} Layout;

enum { C_CLOSED, C_EARLY, C_SESSION, C_PLAIN, C_DEFERRED, C_PROXY, C_UPSTREAM, C_TRANSPORT,
       C_LOOP, C_SESSION_ID, C_QUERY_LAST };
static const char *const client_fields[] = {
    "closed", "_early", "session", "_plain", "_deferred", "proxy", "upstream", "transport",
    "_loop", "session_id", "_query_last"};
enum { U_CLIENT, U_TRANSPORT };
static const char *const upstream_fields[] = {"client", "transport"};
enum { X_AUDIT };
static const char *const proxy_fields[] = {"audit"};
enum { A_LOOP, A_CLOSING, A_HEALTHY, A_UNENCODED, A_CHECK_AT, A_FLUSH_LOOP };
static const char *const audit_fields[] = {
    "_loop", "_closing", "_healthy", "_unencoded", "_check_at", "_flush_loop"};
enum { S_POLICY, S_PHASE, S_REPLICATION, S_RECORD_LEVEL, S_FRONTEND, S_BACKEND, S_SUBJECT,
       S_REUSED_SUBJECT, S_REUSED, S_REUSED_POLICY, S_MAX_STATEMENT, S_BYTES_FROM_CLIENT,
       S_SEGMENTS_SENT, S_STATEMENTS, S_PENDING, S_CLOCK, S_HELD, S_BLOCKED_PENDING,
       S_DESCRIBES, S_TOUCHED, S_TRANSACTION, S_SEGMENTS_DONE, S_BYTES_FROM_SERVER };
static const char *const session_fields[] = {
    "policy", "phase", "replication", "record_level", "frontend", "backend", "subject",
    "_reused_subject", "_reused", "_reused_policy", "max_statement", "bytes_from_client",
    "_segments_sent", "statements", "_pending", "clock", "_held", "_blocked_pending",
    "_describes", "_touched", "transaction", "_segments_done", "bytes_from_server"};
enum { F_BUFFER, F_STARTUP, F_COPY_REMAINING, F_PASS_REMAINING, F_BIND, F_MAX_MESSAGE };
static const char *const frontend_fields[] = {
    "_buffer", "_startup", "_copy_remaining", "_pass_remaining", "_bind", "max_message"};
enum { B_REMAINING, B_HEADER, B_ROWS, B_COPY_MESSAGES, B_MAX_MESSAGE };
static const char *const backend_fields[] = {
    "_remaining", "_header", "_rows", "_copy_messages", "max_message"};
enum { P_KIND, P_STARTED, P_ROWS, P_COMMAND_ROWS, P_COMMANDS, P_COPY_BYTES, P_ERROR,
       P_CHANGES };
static const char *const pending_fields[] = {
    "kind", "started", "rows", "command_rows", "commands", "copy_bytes", "error", "changes"};

#define LAYOUT(fields) {fields, (int)(sizeof fields / sizeof fields[0]), NULL, 0, {0}}
static Layout client_layout = LAYOUT(client_fields), upstream_layout = LAYOUT(upstream_fields),
    proxy_layout = LAYOUT(proxy_fields), audit_layout = LAYOUT(audit_fields),
    session_layout = LAYOUT(session_fields), frontend_layout = LAYOUT(frontend_fields),
    backend_layout = LAYOUT(backend_fields), pending_layout = LAYOUT(pending_fields);

/* Values made once. */
static PyObject *v_ready, *v_statements, *v_upstream_auth, *v_query, *v_result, *v_execute,
    *v_sync, *v_started_kw, *v_three, *v_one, *n_write, *n_round, *n_append, *n_clear,
    *n_audit_failed, *n_batch_step, *n_emit_packed, *n_failing, *n_reuses_decisions, *n_allowed_execute;

/* Where instances of type keep the attribute name: the offset of its slot (a writable
 * member holding any object), or -1 when it is no such slot. */
static Py_ssize_t
slot_offset(PyTypeObject *type, PyObject *name)
{
    PyObject *found = _PyType_Lookup(type, name); /* borrowed */
    PyMemberDef *member;

    if (found == NULL || !Py_IS_TYPE(found, &PyMemberDescr_Type))
        return -1;
    member = ((PyMemberDescrObject *)found)->d_member;
    return member->type == T_OBJECT_EX && !(member->flags & READONLY) ? member->offset : -1;
}

/* Whether obj's class keeps every field of the layout in a slot (finding their offsets when
 * the class is new to it): 1, 0, or -1 with an exception set. */
static int
laid_out(Layout *layout, PyObject *obj)
{
    PyTypeObject *type = Py_TYPE(obj);
    int i, usable = 1;

    if (layout->type == type)
        return layout->usable;
    for (i = 0; i < layout->count; i++) {
        PyObject *name = PyUnicode_InternFromString(layout->names[i]);

        if (name == NULL)
            return -1;
        layout->offset[i] = slot_offset(type, name);
        Py_DECREF(name);
        if (layout->offset[i] < 0) {
            usable = 0;
            break;
        }
    }
    Py_INCREF(type);
    Py_XSETREF(layout->type, type);
    layout->usable = usable;
    return usable;
}

/* A field of obj (borrowed; NULL when unset), its class laid out by the layout. */
#define FIELD(obj, layout, i) (*(PyObject **)((char *)(obj) + (layout).offset[i]))

/* Stores value (a new reference, stolen) in a field. */
static void
set_field(PyObject *obj, const Layout *layout, int i, PyObject *value)
{
    PyObject **at = (PyObject **)((char *)obj + layout->offset[i]);

    Py_XSETREF(*at, value);
}

/* Whether a field's value is true: 1, 0, or -1 (with an exception set by its __bool__). */
static int
truth_of(PyObject *value)
{
    if (value == Py_True)
        return 1;
    if (value == Py_False || value == Py_None)
        return 0;
    return PyObject_IsTrue(value);
}

/* field += amount (Python ints): 0, or -1 with an exception set. */
static int
add_to(PyObject *obj, const Layout *layout, int i, Py_ssize_t amount)
{
    PyObject *step, *sum, *value = FIELD(obj, *layout, i);

    if (value == NULL) {
        PyErr_Format(PyExc_AttributeError, "%s", layout->names[i]);
        return -1;
    }
    step = amount == 1 ? Py_NewRef(v_one) : PyLong_FromSsize_t(amount);
    if (step == NULL)
        return -1;
    sum = PyNumber_Add(value, step);
    Py_DECREF(step);
    if (sum == NULL)
        return -1;
    set_field(obj, layout, i, sum);
    return 0;
}

/* Whether a str field equals a str value: 1, 0 (also when unset), or -1. */
static int
equals(PyObject *value, PyObject *text)
{
    if (value == text)
        return 1;
    if (value == NULL || !PyUnicode_Check(value))
        return 0;
    return PyUnicode_Compare(value, text) == 0 ? 1 : (PyErr_Occurred() ? -1 : 0);
}

/* Python's time.time_ns(). */
static PyObject *
time_ns_now(void)
{
    struct timespec now;

    clock_gettime(CLOCK_REALTIME, &now);
    return PyLong_FromLongLong((long long)now.tv_sec * 1000000000LL + now.tv_nsec);
}

/* The audit queue of a client side whose state lets a one-step path run: its session on the
 * plain path (set up, no TLS), nothing deferred, the queue healthy (AuditProcess.healthy).
 * Borrowed references; 1, 0 when not so, -1 on an error. */
static int
plain_session(PyObject *side, PyObject **session, PyObject **audit)
{
    PyObject *proxy, *closed, *plain;
    int truth;

    if ((truth = laid_out(&client_layout, side)) <= 0)
        return truth;
    closed = FIELD(side, client_layout, C_CLOSED);
    plain = FIELD(side, client_layout, C_PLAIN);
    *session = FIELD(side, client_layout, C_SESSION);
    proxy = FIELD(side, client_layout, C_PROXY);
    if (closed == NULL || plain == NULL || *session == NULL || proxy == NULL
            || FIELD(side, client_layout, C_EARLY) != Py_None
            || FIELD(side, client_layout, C_DEFERRED) != Py_None || *session == Py_None)
        return 0;
    if ((truth = truth_of(closed)) != 0 || (truth = truth_of(plain)) <= 0)
        return truth < 0 ? -1 : 0;
    if ((truth = laid_out(&proxy_layout, proxy)) <= 0)
        return truth;
    *audit = FIELD(proxy, proxy_layout, X_AUDIT);
    if (*audit == NULL || (truth = laid_out(&audit_layout, *audit)) <= 0)
        return *audit == NULL ? 0 : truth;
    if (FIELD(*audit, audit_layout, A_HEALTHY) == NULL || FIELD(*audit, audit_layout, A_CLOSING) == NULL)
        return 0;
    if ((truth = truth_of(FIELD(*audit, audit_layout, A_HEALTHY))) <= 0
            || (truth = truth_of(FIELD(*audit, audit_layout, A_CLOSING))) != 0)
        return truth < 0 ? -1 : 0;
    return 1;
}

/* audit.emit_packed(type, record, side.session_id, side._loop, joins) (audit/process.py)
 * as it runs on the loop's thread: 0, or -1 with an exception set. */
static int
emit_packed(PyObject *audit, PyObject *side, PyObject *type, PyObject *record, int joins)
{
    PyObject *loop = FIELD(audit, audit_layout, A_LOOP), *caller, *sid, *ts, *item, *answer;
    PyObject *unencoded, *check_at, *flush_loop;
    int truth, late;

    caller = FIELD(side, client_layout, C_LOOP);
    sid = FIELD(side, client_layout, C_SESSION_ID);
    if (caller == NULL || sid == NULL) {
        PyErr_SetString(PyExc_AttributeError, "client side without _loop or session_id");
        return -1;
    }
    if ((truth = truth_of(FIELD(audit, audit_layout, A_CLOSING))) < 0)
        return -1;
    if (loop == NULL || loop == Py_None || truth || caller != loop) {
        /* Not this loop's queue as it stands: the method says what to do. */
        answer = PyObject_CallMethodObjArgs(audit, n_emit_packed, type, record, sid, caller,
                                            joins ? Py_True : Py_False, NULL);
        if (answer == NULL)
            return -1;
        Py_DECREF(answer);
        return 0;
    }
    unencoded = FIELD(audit, audit_layout, A_UNENCODED);
    if (unencoded == NULL || !PyList_Check(unencoded)) {
        PyErr_SetString(PyExc_TypeError, "the audit queue is not a list");
        return -1;
    }
    if ((ts = time_ns_now()) == NULL)
        return -1;
    item = joins ? PyTuple_Pack(5, type, sid, ts, record, Py_True)
                 : PyTuple_Pack(4, type, sid, ts, record);
    if (item == NULL || PyList_Append(unencoded, item) < 0)
        goto fail;
    Py_DECREF(item);
    item = NULL;
    check_at = FIELD(audit, audit_layout, A_CHECK_AT);
    flush_loop = FIELD(audit, audit_layout, A_FLUSH_LOOP);
    late = check_at == NULL ? 1 : PyObject_RichCompareBool(ts, check_at, Py_GE);
    if (late < 0)
        goto fail;
    if (late || flush_loop != loop) {
        answer = PyObject_CallMethodObjArgs(audit, n_batch_step, loop, ts, NULL);
        if (answer == NULL)
            goto fail;
        Py_DECREF(answer);
    }
    Py_DECREF(ts);
    ts = NULL;
    if ((truth = truth_of(FIELD(audit, audit_layout, A_HEALTHY))) < 0)
        return -1;
    if (!truth) {
        answer = PyObject_CallMethodNoArgs(audit, n_failing);
        if (answer != NULL) {
            PyErr_SetObject((PyObject *)Py_TYPE(answer), answer);
            Py_DECREF(answer);
        }
        return -1;
    }
    return 0;
fail:
    Py_XDECREF(item);
    Py_XDECREF(ts);
    return -1;
}

/* A record to the audit queue as ClientSide._emit_packed does: an Exception raised on the
 * way goes to side._audit_failed (which ends the session). 0, or -1 for anything else. */
static int
emit(PyObject *audit, PyObject *side, PyObject *type, PyObject *record, int joins)
{
    PyObject *kind, *error, *trace, *answer;

    if (emit_packed(audit, side, type, record, joins) == 0)
        return 0;
    if (!PyErr_ExceptionMatches(PyExc_Exception))
        return -1;
    PyErr_Fetch(&kind, &error, &trace);
    PyErr_NormalizeException(&kind, &error, &trace);
    if (trace != NULL)
        PyException_SetTraceback(error, trace);
    answer = PyObject_CallMethodOneArg(side, n_audit_failed, error);
    Py_XDECREF(kind);
    Py_XDECREF(error);
    Py_XDECREF(trace);
    if (answer == NULL)
        return -1;
    Py_DECREF(answer);
    return 0;
}

/* transport.write(data), unless transport is None (or unset). */
static int
write_to(PyObject *transport, PyObject *data)
{
    PyObject *answer;

    if (transport == NULL || transport == Py_None)
        return 0;
    answer = PyObject_CallMethodOneArg(transport, n_write, data);
    if (answer == NULL)
        return -1;
    Py_DECREF(answer);
    return 0;
}

/* Whether none of the fields from..to of obj is true: 1, 0 (also when one is unset), -1. */
static int
none_true(PyObject *obj, const Layout *layout, int from, int to)
{
    int i, truth;

    for (i = from; i <= to; i++) {
        PyObject *value = FIELD(obj, *layout, i);

        if (value == NULL)
            return 0;
        if ((truth = truth_of(value)) != 0)
            return truth < 0 ? -1 : 0;
    }
    return 1;
}

/* A Py_ssize_t field (-1 with an exception set when it is none). */
static Py_ssize_t
size_of_field(PyObject *obj, const Layout *layout, int i)
{
    PyObject *value = FIELD(obj, *layout, i);

    if (value == NULL) {
        PyErr_Format(PyExc_AttributeError, "%s", layout->names[i]);
        return -1;
    }
    return PyNumber_AsSsize_t(value, PyExc_OverflowError);
}

/* How the client step makes the session's pending item (agent/pgsession.py _Pending, a
 * dataclass with slots and nothing in its __init__ but its fields' defaults) without
 * running its __init__: for each field its offset and default, a value or a factory. */
typedef struct {
    PyObject *fields;   /* the (name, default, is_factory) tuple it was made from */
    PyTypeObject *type; /* (references to both: neither is reused for another) */
    int count, usable, kind_at, started_at;
    Py_ssize_t offset[MAX_FIELDS];
    PyObject *value[MAX_FIELDS]; /* borrowed from fields */
    int factory[MAX_FIELDS];
} Maker;
static Maker pending_maker;

/* Whether pending_maker can make instances of type from fields: 1, 0, or -1. */
static int
maker_for(PyObject *type, PyObject *fields)
{
    Maker *m = &pending_maker;
    Py_ssize_t i;

    if (m->fields == fields && (PyObject *)m->type == type)
        return m->usable;
    Py_XSETREF(m->fields, Py_NewRef(fields));
    Py_XSETREF(m->type, (PyTypeObject *)Py_NewRef(type));
    m->usable = 0;
    m->kind_at = m->started_at = -1;
    if (!PyType_Check(type) || !PyTuple_Check(fields) || PyTuple_GET_SIZE(fields) > MAX_FIELDS)
        return 0;
    m->count = (int)PyTuple_GET_SIZE(fields);
    for (i = 0; i < m->count; i++) {
        PyObject *entry = PyTuple_GET_ITEM(fields, i);
        int is_factory;

        if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 3
                || !PyUnicode_Check(PyTuple_GET_ITEM(entry, 0)))
            return 0;
        m->offset[i] = slot_offset((PyTypeObject *)type, PyTuple_GET_ITEM(entry, 0));
        if (m->offset[i] < 0)
            return 0;
        if ((is_factory = PyObject_IsTrue(PyTuple_GET_ITEM(entry, 2))) < 0)
            return -1;
        m->value[i] = PyTuple_GET_ITEM(entry, 1);
        m->factory[i] = is_factory;
        if (PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(entry, 0), "kind") == 0)
            m->kind_at = (int)i;
        else if (PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(entry, 0), "started") == 0)
            m->started_at = (int)i;
    }
    /* Every slot of the class must be one of the fields: none left unset. */
    if (m->kind_at < 0 || m->started_at < 0
            || ((PyTypeObject *)type)->tp_basicsize != (Py_ssize_t)sizeof(PyObject)
                                                      + m->count * (Py_ssize_t)sizeof(PyObject *))
        return 0;
    m->usable = 1;
    return 1;
}

/* A new pending item of pending_maker's class: kind, started, the rest their defaults. */
static PyObject *
new_pending(PyObject *kind, PyObject *started)
{
    Maker *m = &pending_maker;
    PyObject *obj = m->type->tp_alloc(m->type, 0);
    int i;

    if (obj == NULL)
        return NULL;
    for (i = 0; i < m->count; i++) {
        PyObject *value;

        if (i == m->kind_at)
            value = Py_NewRef(kind);
        else if (i == m->started_at)
            value = Py_NewRef(started);
        else if (m->factory[i])
            value = PyObject_CallNoArgs(m->value[i]);
        else
            value = Py_NewRef(m->value[i]);
        if (value == NULL) {
            Py_DECREF(obj);
            return NULL;
        }
        *(PyObject **)((char *)obj + m->offset[i]) = value;
    }
    return obj;
}

/* The session's query record of a lone Query when PostgresSession.allowed_query takes it,
 * its state moved on as that does; None when it does not (nothing changed); NULL with an
 * exception set. */
static PyObject *
session_query(PyObject *session, const unsigned char *p, Py_ssize_t size, PyObject *plain,
              PyObject *pending_type, PyObject *pending_fields, Py_ssize_t max_cached)
{
    PyObject *policy, *frontend, *reused, *subject, *current, *reuses, *record, *now, *item;
    PyObject *pending;
    PyObject *call[2];
    Py_ssize_t max_message, max_text;
    int truth;

    if ((truth = laid_out(&session_layout, session)) <= 0)
        goto decided;
    policy = FIELD(session, session_layout, S_POLICY);
    frontend = FIELD(session, session_layout, S_FRONTEND);
    subject = FIELD(session, session_layout, S_SUBJECT);
    reused = FIELD(session, session_layout, S_REUSED);
    if (policy == NULL || policy == Py_None || frontend == NULL || subject == NULL
            || FIELD(session, session_layout, S_REPLICATION) != Py_None
            || FIELD(session, session_layout, S_REUSED_SUBJECT) != subject
            || reused == NULL || !PyDict_Check(reused) || PyDict_GET_SIZE(reused) == 0)
        Py_RETURN_NONE;
    if ((truth = equals(FIELD(session, session_layout, S_PHASE), v_ready)) <= 0
            || (truth = equals(FIELD(session, session_layout, S_RECORD_LEVEL), v_statements)) <= 0
            || (truth = laid_out(&frontend_layout, frontend)) <= 0
            || (truth = none_true(frontend, &frontend_layout, F_BUFFER, F_PASS_REMAINING)) <= 0)
        goto decided;
    if (FIELD(frontend, frontend_layout, F_BIND) != Py_None)
        Py_RETURN_NONE;
    if ((current = PyObject_CallNoArgs(policy)) == NULL)
        return NULL;
    if (FIELD(session, session_layout, S_REUSED_POLICY) != current) {
        Py_DECREF(current);
        Py_RETURN_NONE;
    }
    reuses = PyObject_GetAttr(current, n_reuses_decisions);
    Py_DECREF(current);
    if (reuses == NULL)
        return NULL;
    truth = truth_of(reuses);
    Py_DECREF(reuses);
    if (truth <= 0)
        goto decided;
    if ((max_message = size_of_field(frontend, &frontend_layout, F_MAX_MESSAGE)) == -1
            && PyErr_Occurred())
        return NULL;
    if ((max_text = size_of_field(session, &session_layout, S_MAX_STATEMENT)) == -1
            && PyErr_Occurred())
        return NULL;
    if (max_text > max_cached)
        max_text = max_cached;
    record = query_record(p, size, reused, max_message, max_text, plain);
    if (record == NULL || record == Py_None)
        return record;
    pending = FIELD(session, session_layout, S_PENDING);
    if (pending == NULL || FIELD(session, session_layout, S_CLOCK) == NULL) {
        PyErr_SetString(PyExc_AttributeError, "session without _pending or clock");
        goto fail;
    }
    if (add_to(session, &session_layout, S_BYTES_FROM_CLIENT, size) < 0
            || add_to(session, &session_layout, S_SEGMENTS_SENT, 1) < 0
            || add_to(session, &session_layout, S_STATEMENTS, 1) < 0
            || (now = PyObject_CallNoArgs(FIELD(session, session_layout, S_CLOCK))) == NULL)
        goto fail;
    if ((truth = maker_for(pending_type, pending_fields)) < 0) {
        Py_DECREF(now);
        goto fail;
    }
    if (truth)
        item = new_pending(v_query, now);
    else { /* _Pending("query", started=now) */
        call[0] = v_query;
        call[1] = now;
        item = PyObject_Vectorcall(pending_type, call, 1, v_started_kw);
    }
    Py_DECREF(now);
    if (item == NULL)
        goto fail;
    now = PyObject_CallMethodOneArg(pending, n_append, item);
    Py_DECREF(item);
    if (now == NULL)
        goto fail;
    Py_DECREF(now);
    return record;

decided:
    if (truth < 0)
        return NULL;
    Py_RETURN_NONE;
fail:
    Py_DECREF(record);
    return NULL;
}

static PyObject *
client_step(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *side, *data, *session = NULL, *audit = NULL, *record, *upstream;
    Py_ssize_t max_cached;
    int ready;

    (void)module;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "client_step(plain, pending, pending_fields, "
                                         "max_cached_text, side, data) takes 6 arguments");
        return NULL;
    }
    side = args[4];
    data = args[5];
    if (!PyBytes_Check(data) || PyBytes_GET_SIZE(data) < 1)
        return PyLong_FromLong(0);
    max_cached = PyNumber_AsSsize_t(args[3], PyExc_OverflowError);
    if (max_cached == -1 && PyErr_Occurred())
        return NULL;
    if ((ready = plain_session(side, &session, &audit)) <= 0)
        return ready < 0 ? NULL : PyLong_FromLong(0);
    /* ClientSide._write_server's upstream, asked before anything moves: the bytes go to its
     * transport (no TLS on the plain path), when there is one. */
    upstream = FIELD(side, client_layout, C_UPSTREAM);
    if (upstream == NULL)
        return PyLong_FromLong(0);
    if (upstream != Py_None && (ready = laid_out(&upstream_layout, upstream)) <= 0)
        return ready < 0 ? NULL : PyLong_FromLong(0);
    Py_INCREF(session);
    Py_INCREF(audit);
    Py_INCREF(upstream);
    if (PyBytes_AS_STRING(data)[0] == 'Q')
        record = session_query(session, (const unsigned char *)PyBytes_AS_STRING(data),
                               PyBytes_GET_SIZE(data), args[0], args[1], args[2], max_cached);
    else /* the extended protocol's one step stays the session's own (Python) */
        record = PyObject_CallMethodOneArg(session, n_allowed_execute, data);
    Py_DECREF(session);
    if (record == NULL || record == Py_None) {
        Py_DECREF(audit);
        Py_DECREF(upstream);
        return record == NULL ? NULL : (Py_DECREF(record), PyLong_FromLong(2));
    }
    if (!PyBytes_Check(record)) {
        PyErr_SetString(PyExc_TypeError, "a one-step query record must be bytes");
        goto fail;
    }
    if (upstream != Py_None && write_to(FIELD(upstream, upstream_layout, U_TRANSPORT), data) < 0)
        goto fail;
    if (emit(audit, side, v_query, record, 0) < 0)
        goto fail;
    set_field(side, &client_layout, C_QUERY_LAST, Py_NewRef(Py_True));
    Py_DECREF(audit);
    Py_DECREF(upstream);
    Py_DECREF(record);
    return PyLong_FromLong(1);
fail:
    Py_DECREF(audit);
    Py_DECREF(upstream);
    Py_DECREF(record);
    return NULL;
}

/* The start of the answer to one execution after the ParseComplete, BindComplete and
 * NoData that may lead it (agent/pgsession.py _without_execution_head). */
static Py_ssize_t
execution_answer(const unsigned char *p, Py_ssize_t size)
{
    static const unsigned char heads[3] = {'1', '2', 'n'};
    Py_ssize_t pos = 0;
    int i;

    for (i = 0; i < 3; i++) {
        if (size - pos >= 5 && p[pos] == heads[i] && p[pos + 1] == 0 && p[pos + 2] == 0
                && p[pos + 3] == 0 && p[pos + 4] == 4)
            pos += 5;
    }
    return pos;
}

/* round(seconds * 1000.0, 3), exactly as Python rounds it, into *out: 0, or -1 with an
 * exception set. Python rounds the double's exact value half to even in decimal and reads
 * the digits back. Below 10^6 ms, scaling by 1000 more errs by under 2^-23, so unless the
 * thousandths' remainder lies within 10^-6 of a half, the integer of thousandths is the
 * one Python finds, and dividing it by 1000 gives the double nearest that decimal, as
 * reading the digits does. Anything else (a near tie, a negative, a long or odd value)
 * asks float.__round__. */
static int
milliseconds(double seconds, double *out)
{
    double ms = seconds * 1000.0, scaled = ms * 1000.0, whole, rest;
    PyObject *value, *rounded;

    if (!signbit(ms) && ms < 1e6) {
        whole = floor(scaled);
        rest = scaled - whole;
        if (fabs(rest - 0.5) > 1e-6) {
            *out = (whole + (rest > 0.5 ? 1.0 : 0.0)) / 1000.0;
            return 0;
        }
    }
    if ((value = PyFloat_FromDouble(ms)) == NULL)
        return -1;
    rounded = PyObject_CallMethodOneArg(value, n_round, v_three);
    Py_DECREF(value);
    if (rounded == NULL)
        return -1;
    *out = PyFloat_AsDouble(rounded);
    Py_DECREF(rounded);
    return *out == -1.0 && PyErr_Occurred() ? -1 : 0;
}

static PyObject *
duration_ms(PyObject *module, PyObject *seconds)
{
    double value, rounded;

    (void)module;
    value = PyFloat_AsDouble(seconds);
    if ((value == -1.0 && PyErr_Occurred()) || milliseconds(value, &rounded) < 0)
        return NULL;
    return PyFloat_FromDouble(rounded);
}

/* The result record of PostgresSession.plain_reply for bytes already relayed, the
 * session's state moved on as that does; None when it does not take them (nothing changed);
 * NULL with an exception set. */
static PyObject *
session_reply(PyObject *session, const unsigned char *p, Py_ssize_t size)
{
    PyObject *pending, *head, *backend, *now, *elapsed, *reply, *answer;
    Py_ssize_t count, skip = 0, max_message;
    double seconds, duration;
    int truth;

    /* (Its bytes were relayed, which may have run flow control: all asked again.) */
    pending = FIELD(session, session_layout, S_PENDING);
    backend = FIELD(session, session_layout, S_BACKEND);
    if (pending == NULL || backend == NULL || FIELD(session, session_layout, S_HELD) != Py_None
            || FIELD(session, session_layout, S_CLOCK) == NULL)
        Py_RETURN_NONE;
    if ((truth = equals(FIELD(session, session_layout, S_PHASE), v_ready)) <= 0
            || (truth = none_true(session, &session_layout, S_BLOCKED_PENDING, S_TOUCHED)) <= 0
            || (truth = laid_out(&backend_layout, backend)) <= 0
            || (truth = none_true(backend, &backend_layout, B_REMAINING, B_COPY_MESSAGES)) <= 0)
        goto decided;
    if ((count = PyObject_Length(pending)) < 0)
        return NULL;
    if (count < 1 || count > 2)
        Py_RETURN_NONE;
    if ((head = PySequence_GetItem(pending, 0)) == NULL)
        return NULL;
    if ((truth = laid_out(&pending_layout, head)) <= 0
            || (truth = none_true(head, &pending_layout, P_ROWS, P_COPY_BYTES)) <= 0
            || (truth = none_true(head, &pending_layout, P_CHANGES, P_CHANGES)) <= 0)
        goto decided_head;
    if (FIELD(head, pending_layout, P_ERROR) != Py_None)
        goto none_head;
    if ((truth = equals(FIELD(head, pending_layout, P_KIND), v_query)) < 0)
        goto fail_head;
    if (truth) {
        if (count != 1)
            goto none_head;
    }
    else {
        PyObject *second;

        if ((truth = equals(FIELD(head, pending_layout, P_KIND), v_execute)) <= 0 || count != 2)
            goto decided_head;
        if ((second = PySequence_GetItem(pending, 1)) == NULL)
            goto fail_head;
        truth = laid_out(&pending_layout, second);
        if (truth > 0)
            truth = equals(FIELD(second, pending_layout, P_KIND), v_sync);
        Py_DECREF(second);
        if (truth <= 0)
            goto decided_head;
        skip = execution_answer(p, size);
    }
    /* duration_ms: round((clock() - started) * 1000.0, 3), as Python rounds it. */
    if (FIELD(head, pending_layout, P_STARTED) == NULL)
        goto none_head;
    if ((now = PyObject_CallNoArgs(FIELD(session, session_layout, S_CLOCK))) == NULL)
        goto fail_head;
    elapsed = PyNumber_Subtract(now, FIELD(head, pending_layout, P_STARTED));
    Py_DECREF(now);
    Py_DECREF(head);
    if (elapsed == NULL)
        return NULL;
    seconds = PyFloat_AsDouble(elapsed);
    Py_DECREF(elapsed);
    if (seconds == -1.0 && PyErr_Occurred())
        return NULL;
    if (milliseconds(seconds, &duration) < 0)
        return NULL;
    if ((max_message = size_of_field(backend, &backend_layout, B_MAX_MESSAGE)) == -1
            && PyErr_Occurred())
        return NULL;
    if ((reply = reply_record(p + skip, size - skip, max_message, duration)) == NULL
            || reply == Py_None)
        return reply;
    if (add_to(session, &session_layout, S_BYTES_FROM_SERVER, size) < 0
            || (answer = PyObject_CallMethodNoArgs(pending, n_clear)) == NULL) {
        Py_DECREF(reply);
        return NULL;
    }
    Py_DECREF(answer);
    set_field(session, &session_layout, S_TRANSACTION, Py_NewRef(PyTuple_GET_ITEM(reply, 1)));
    if (add_to(session, &session_layout, S_SEGMENTS_DONE, 1) < 0) {
        Py_DECREF(reply);
        return NULL;
    }
    answer = Py_NewRef(PyTuple_GET_ITEM(reply, 0));
    Py_DECREF(reply);
    return answer;

decided_head:
    if (truth < 0)
        goto fail_head;
none_head:
    Py_DECREF(head);
    Py_RETURN_NONE;
fail_head:
    Py_DECREF(head);
    return NULL;
decided:
    if (truth < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
server_step(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *side, *data, *client, *session = NULL, *audit = NULL, *record;
    int ready, truth, joins;

    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "server_step(side, data) takes 2 arguments");
        return NULL;
    }
    side = args[0];
    data = args[1];
    if (!PyBytes_Check(data) || (truth = laid_out(&upstream_layout, side)) == 0)
        return PyLong_FromLong(0);
    if (truth < 0)
        return NULL;
    client = FIELD(side, upstream_layout, U_CLIENT);
    if (client == NULL)
        return PyLong_FromLong(0);
    if ((ready = plain_session(client, &session, &audit)) <= 0)
        return ready < 0 ? NULL : PyLong_FromLong(0);
    /* PostgresSession.relays_server_bytes */
    if ((truth = laid_out(&session_layout, session)) <= 0
            || FIELD(session, session_layout, S_HELD) != Py_None
            || FIELD(session, session_layout, S_BLOCKED_PENDING) == NULL
            || (truth = truth_of(FIELD(session, session_layout, S_BLOCKED_PENDING))) != 0
            || (truth = equals(FIELD(session, session_layout, S_PHASE), v_upstream_auth)) != 0)
        return truth < 0 ? NULL : PyLong_FromLong(0);
    Py_INCREF(client);
    Py_INCREF(session);
    Py_INCREF(audit);
    /* Unchanged bytes go to the client before they are scanned and recorded (no TLS on the
     * plain path). */
    if (write_to(FIELD(client, client_layout, C_TRANSPORT), data) < 0)
        goto fail;
    record = session_reply(session, (const unsigned char *)PyBytes_AS_STRING(data),
                           PyBytes_GET_SIZE(data));
    if (record == NULL)
        goto fail;
    if (record == Py_None) {
        Py_DECREF(record);
        Py_DECREF(client);
        Py_DECREF(session);
        Py_DECREF(audit);
        return PyLong_FromLong(2);
    }
    /* ClientSide._emit_result */
    joins = truth_of(FIELD(client, client_layout, C_QUERY_LAST));
    if (joins >= 0) {
        set_field(client, &client_layout, C_QUERY_LAST, Py_NewRef(Py_False));
        joins = emit(audit, client, v_result, record, joins);
    }
    Py_DECREF(record);
    Py_DECREF(client);
    Py_DECREF(session);
    Py_DECREF(audit);
    return joins < 0 ? NULL : PyLong_FromLong(1);
fail:
    Py_DECREF(client);
    Py_DECREF(session);
    Py_DECREF(audit);
    return NULL;
}

/* Makes the names and values the one-step paths use; -1 on failure. */
static int
make_names(void)
{
    static const struct {
        PyObject **name;
        const char *text;
    } names[] = {
        {&v_ready, "ready"}, {&v_statements, "statements"}, {&v_upstream_auth, "upstream-auth"},
        {&v_query, "query"}, {&v_result, "result"}, {&v_execute, "execute"}, {&v_sync, "sync"},
        {&n_write, "write"}, {&n_round, "__round__"}, {&n_append, "append"}, {&n_clear, "clear"},
        {&n_audit_failed, "_audit_failed"}, {&n_batch_step, "_batch_step"},
        {&n_emit_packed, "emit_packed"}, {&n_failing, "_failing"},
        {&n_reuses_decisions, "reuses_decisions"}, {&n_allowed_execute, "allowed_execute"},
    };
    size_t i;

    for (i = 0; i < sizeof names / sizeof names[0]; i++) {
        if ((*names[i].name = PyUnicode_InternFromString(names[i].text)) == NULL)
            return -1;
    }
    v_started_kw = Py_BuildValue("(s)", "started");
    v_three = PyLong_FromLong(3);
    v_one = PyLong_FromLong(1);
    return v_started_kw == NULL || v_three == NULL || v_one == NULL ? -1 : 0;
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
    {"duration_ms", (PyCFunction)duration_ms, METH_O,
     "duration_ms(seconds) -> float: round(seconds * 1000.0, 3), as the result record's "
     "duration_ms is computed."},
    {"client_step", (PyCFunction)(void (*)(void))client_step, METH_FASTCALL,
     "client_step(plain, pending, pending_fields, max_cached_text, side, data) -> int: "
     "ClientSide's one-step path: 0 nothing done, 1 taken, 2 declined by the session (its "
     "general path is next)."},
    {"server_step", (PyCFunction)(void (*)(void))server_step, METH_FASTCALL,
     "server_step(side, data) -> int: UpstreamSide's one-step path: 0 nothing done, 1 taken, "
     "2 the bytes relayed to the client and the rest left to the session."},
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
        if (s_allowed == NULL || s_encoded == NULL || make_names() < 0)
            return NULL;
    }
    if (sha256_md == NULL) {
        sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
        if (sha256_md == NULL) {
            PyErr_SetString(PyExc_ImportError, "OpenSSL has no SHA-256");
            return NULL;
        }
    }
    if (sha256_ctx == NULL && (sha256_ctx = EVP_MD_CTX_new()) == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    return PyModule_Create(&module);
}
