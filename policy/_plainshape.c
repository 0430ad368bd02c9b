/* The shape key of a plain statement text, compiled.
 *
 * plain(text) -> (key, start, end) | None | False
 *
 * The same answer as policy.classify._plain_text (its Python twin, used when
 * this module is not built; tests/unit/policy/test_plainshape_native.py holds
 * the two to the same answers):
 *
 *   False  the text is not plain: not ASCII, or it holds a quote, a double
 *          quote, a dollar sign, a backslash, "--" or a slash and a star (the scanner must
 *          read it);
 *   None   plain, but not exactly one statement (a ';' before the end, or
 *          nothing but blanks and a ';');
 *   tuple  b"p" + the text with every integer literal (a run of at most nine
 *          digits, neither preceded nor followed by a letter, digit, '_' or
 *          '.') replaced by NUL 'i', as ASCII bytes; and where the statement
 *          starts (after leading blanks) and ends (before trailing blanks and
 *          one closing ';'). Blanks are the ASCII characters str.isspace()
 *          accepts.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static inline int
is_blank(unsigned char c)
{
    return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f);
}

static inline int
continues_token(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z')
           || c == '_' || c == '.';
}

static PyObject *
plain(PyObject *module, PyObject *text)
{
    const unsigned char *s;
    Py_ssize_t n, i, start, end, body, size;
    PyObject *key;
    char *out;

    (void)module;
    if (!PyUnicode_Check(text)) {
        PyErr_SetString(PyExc_TypeError, "plain() takes a str");
        return NULL;
    }
    if (PyUnicode_READY(text) < 0)
        return NULL;
    if (!PyUnicode_IS_ASCII(text))
        Py_RETURN_FALSE;
    s = (const unsigned char *)PyUnicode_DATA(text);
    n = PyUnicode_GET_LENGTH(text);
    for (i = 0; i < n; i++) {
        unsigned char c = s[i];
        if (c == '\'' || c == '"' || c == '$' || c == '\\')
            Py_RETURN_FALSE;
        if (i + 1 < n && ((c == '-' && s[i + 1] == '-') || (c == '/' && s[i + 1] == '*')))
            Py_RETURN_FALSE;
    }
    body = n;
    while (body > 0 && is_blank(s[body - 1]))
        body--;
    end = body;
    if (end > 0 && s[end - 1] == ';')
        end--;
    if (memchr(s, ';', (size_t)end) != NULL)
        Py_RETURN_NONE; /* more than one statement */
    start = 0;
    while (start < n && is_blank(s[start]))
        start++;
    if (start >= end)
        Py_RETURN_NONE;

    /* The key's size first: 'p', the text, and each literal's digits become two bytes. */
    size = 1 + n;
    for (i = 0; i < n;) {
        Py_ssize_t run;
        if (s[i] < '0' || s[i] > '9') {
            i++;
            continue;
        }
        run = i;
        while (run < n && s[run] >= '0' && s[run] <= '9')
            run++;
        if (run - i <= 9 && (i == 0 || !continues_token(s[i - 1]))
            && (run == n || !continues_token(s[run])))
            size += 2 - (run - i);
        i = run;
    }

    key = PyBytes_FromStringAndSize(NULL, size);
    if (key == NULL)
        return NULL;
    out = PyBytes_AS_STRING(key);
    *out++ = 'p';
    for (i = 0; i < n;) {
        Py_ssize_t run;
        if (s[i] < '0' || s[i] > '9') {
            *out++ = (char)s[i++];
            continue;
        }
        run = i;
        while (run < n && s[run] >= '0' && s[run] <= '9')
            run++;
        if (run - i <= 9 && (i == 0 || !continues_token(s[i - 1]))
            && (run == n || !continues_token(s[run]))) {
            *out++ = '\0';
            *out++ = 'i';
        } else {
            memcpy(out, s + i, (size_t)(run - i));
            out += run - i;
        }
        i = run;
    }
    if (out - PyBytes_AS_STRING(key) != size) {
        Py_DECREF(key);
        PyErr_SetString(PyExc_SystemError, "plain(): shape key size mismatch");
        return NULL;
    }
    return Py_BuildValue("(Nnn)", key, start, end);
}

static PyMethodDef methods[] = {
    {"plain", plain, METH_O,
     "plain(text) -> (key, start, end) | None | False: the shape key of a plain text."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "policy._plainshape",
    "The shape key of a plain statement text, compiled.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__plainshape(void)
{
    return PyModule_Create(&module);
}
