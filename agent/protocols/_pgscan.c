/* The PostgreSQL reply scanner's innermost loop, compiled.
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
 * agent/protocols/postgres.py has the same loop in Python (used when this
 * module is not built); tests/unit/protocols/test_pgscan_native.py holds the
 * two to the same answers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static PyObject *
datarows(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t pos, size, rows = 0, row_bytes = 0;
    const unsigned char *p;

    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "datarows(data, pos) takes exactly 2 arguments");
        return NULL;
    }
    pos = PyNumber_AsSsize_t(args[1], PyExc_OverflowError);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    p = (const unsigned char *)view.buf;
    size = view.len;
    if (pos < 0 || pos > size) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "datarows: pos is outside data");
        return NULL;
    }
    while (size - pos >= 5 && p[pos] == 'D') {
        int32_t length = (int32_t)(((uint32_t)p[pos + 1] << 24) | ((uint32_t)p[pos + 2] << 16)
                                   | ((uint32_t)p[pos + 3] << 8) | (uint32_t)p[pos + 4]);
        if (length < 4 || size - pos - 1 < (Py_ssize_t)length)
            break;
        rows += 1;
        row_bytes += (Py_ssize_t)length + 1;
        pos += (Py_ssize_t)length + 1;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(nnn)", pos, rows, row_bytes);
}

static PyMethodDef methods[] = {
    {"datarows", (PyCFunction)(void (*)(void))datarows, METH_FASTCALL,
     "datarows(data, pos) -> (end, rows, row_bytes): the run of whole DataRow messages at pos."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "agent.protocols._pgscan",
    "The PostgreSQL reply scanner's DataRow loop, compiled.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__pgscan(void)
{
    return PyModule_Create(&module);
}
