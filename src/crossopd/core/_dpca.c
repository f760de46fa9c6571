/* Native fast path of Dual-Pointer Chunk Alignment (the numpy path in align.py is the
 * reference and the fallback; tests check both give identical chunks).
 *
 * One call does what the common case needs: check every id is in the vocabulary, check the two
 * sides spell the same bytes (memcmp of token spans, no concatenation), and number the minimal
 * chunks by walking both token streams with two pointers over byte end offsets. O(m + k + bytes).
 * Byteless (special) tokens get chunk -1. When the byte strings differ the caller falls back to
 * the byte-diff path in Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    const uint8_t *flat;
    const int64_t *start;
    const int32_t *len;
    int64_t vocab_size;
} vocab_t;

/* Returns 1 when the spelled bytes are equal, 0 when not, -1 - index for a bad student id,
 * -1 - m - index for a bad teacher id. */
static int64_t bytes_equal(const int64_t *s, int64_t m, const vocab_t *sv,
                           const int64_t *t, int64_t k, const vocab_t *tv) {
    for (int64_t i = 0; i < m; i++)
        if (s[i] < 0 || s[i] >= sv->vocab_size) return -1 - i;
    for (int64_t j = 0; j < k; j++)
        if (t[j] < 0 || t[j] >= tv->vocab_size) return -1 - m - j;
    int64_t j = 0, tb = 0; /* teacher token and byte inside it */
    for (int64_t i = 0; i < m; i++) {
        const uint8_t *sp = sv->flat + sv->start[s[i]];
        int64_t sl = sv->len[s[i]];
        while (sl > 0) {
            while (j < k && tb == tv->len[t[j]]) { j++; tb = 0; }
            if (j == k) return 0;
            int64_t avail = tv->len[t[j]] - tb;
            int64_t n = sl < avail ? sl : avail;
            if (memcmp(sp, tv->flat + tv->start[t[j]] + tb, (size_t)n) != 0) return 0;
            sp += n; sl -= n; tb += n;
        }
    }
    while (j < k && tb == tv->len[t[j]]) { j++; tb = 0; }
    return j == k;
}

static int64_t number_chunks(const int64_t *s, int64_t m, const vocab_t *sv,
                             const int64_t *t, int64_t k, const vocab_t *tv,
                             int64_t *s_chunk, int64_t *t_chunk) {
    int64_t i = 0, j = 0, s_end = 0, t_end = 0, chunk = 0;
    int64_t s_next = -1, t_next = -1; /* end offset of token i / j once read */
    while (i < m || j < k) {
        if (i < m && sv->len[s[i]] == 0) { s_chunk[i++] = -1; continue; }
        if (j < k && tv->len[t[j]] == 0) { t_chunk[j++] = -1; continue; }
        if (i < m && s_next < 0) s_next = s_end + sv->len[s[i]];
        if (j < k && t_next < 0) t_next = t_end + tv->len[t[j]];
        if (i < m && j < k && s_next == t_next) { /* a sync point closes the chunk */
            s_chunk[i++] = chunk; t_chunk[j++] = chunk; chunk++;
            s_end = s_next; t_end = t_next; s_next = t_next = -1;
        } else if (j >= k || (i < m && s_next < t_next)) {
            s_chunk[i++] = chunk; s_end = s_next; s_next = -1;
        } else {
            t_chunk[j++] = chunk; t_end = t_next; t_next = -1;
        }
    }
    return chunk;
}

static int get_vocab(Py_buffer *flat, Py_buffer *start, Py_buffer *len, vocab_t *v) {
    if (start->len / 8 != len->len / 4) {
        PyErr_SetString(PyExc_ValueError, "vocab start (int64) and len (int32) sizes differ");
        return 0;
    }
    v->flat = flat->buf; v->start = start->buf; v->len = len->buf;
    v->vocab_size = (int64_t)(len->len / 4);
    return 1;
}

/* align_equal(s_ids, t_ids, s_flat, s_start, s_len, t_flat, t_start, t_len, s_out, t_out)
 *   -> (status, num_chunks): status 1 = aligned, 0 = bytes differ, <0 = bad id (see above). */
static PyObject *align_equal(PyObject *self, PyObject *args) {
    Py_buffer b[10];
    memset(b, 0, sizeof(b));
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*y*y*w*w*", &b[0], &b[1], &b[2], &b[3], &b[4],
                          &b[5], &b[6], &b[7], &b[8], &b[9]))
        return NULL;
    PyObject *result = NULL;
    vocab_t sv, tv;
    int64_t m = b[0].len / 8, k = b[1].len / 8;
    if (!get_vocab(&b[2], &b[3], &b[4], &sv) || !get_vocab(&b[5], &b[6], &b[7], &tv)) goto done;
    if (b[8].len / 8 != m || b[9].len / 8 != k) {
        PyErr_SetString(PyExc_ValueError, "output buffers must match the id arrays");
        goto done;
    }
    int64_t status, n = 0;
    Py_BEGIN_ALLOW_THREADS
    status = bytes_equal(b[0].buf, m, &sv, b[1].buf, k, &tv);
    if (status == 1) n = number_chunks(b[0].buf, m, &sv, b[1].buf, k, &tv, b[8].buf, b[9].buf);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(LL)", (long long)status, (long long)n);
done:
    for (int i = 0; i < 10; i++)
        if (b[i].obj) PyBuffer_Release(&b[i]);
    return result;
}

/* credit_full(s_chunk, t_chunk, s_lp, t_lp, rule, out): credit for a fully aligned pair (every
 * token in a chunk, chunks contiguous and ascending on both sides), one streaming pass per side.
 * rule: 0 proportional, 1 uniform, 2 last. Mirrors credit.py; tests compare the two. */
static PyObject *credit_full(PyObject *self, PyObject *args) {
    Py_buffer b[5];
    int rule;
    memset(b, 0, sizeof(b));
    if (!PyArg_ParseTuple(args, "y*y*y*y*iw*", &b[0], &b[1], &b[2], &b[3], &rule, &b[4]))
        return NULL;
    PyObject *result = NULL;
    const int64_t *sc = b[0].buf, *tc = b[1].buf;
    const double *slp = b[2].buf, *tlp = b[3].buf;
    double *q = b[4].buf;
    int64_t m = b[0].len / 8, k = b[1].len / 8;
    if (b[2].len / 8 != m || b[3].len / 8 != k || b[4].len / 8 != m) {
        PyErr_SetString(PyExc_ValueError, "credit_full: array sizes do not match");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    int64_t i = 0, j = 0;
    while (i < m) {
        int64_t c = sc[i], i1 = i;
        double ls = 0.0, lt = 0.0;
        while (i1 < m && sc[i1] == c) ls += slp[i1++];
        while (j < k && tc[j] == c) lt += tlp[j++];
        int64_t cnt = i1 - i;
        if (rule == 2) {
            for (int64_t x = i; x < i1 - 1; x++) q[x] = slp[x];
            q[i1 - 1] = lt - (ls - slp[i1 - 1]);
        } else if (rule == 1 || cnt == 1 || (ls < 1e-8 && ls > -1e-8)) {
            /* cnt == 1: lt itself, so a 1:1 chunk gets the teacher's log-prob bit for bit */
            for (int64_t x = i; x < i1; x++) q[x] = lt / (double)cnt;
        } else {
            double ratio = lt / ls;
            for (int64_t x = i; x < i1; x++) q[x] = ratio * slp[x];
        }
        i = i1;
    }
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    result = Py_None;
done:
    for (int x = 0; x < 5; x++)
        if (b[x].obj) PyBuffer_Release(&b[x]);
    return result;
}

static PyMethodDef methods[] = {
    {"align_equal", align_equal, METH_VARARGS, "DPCA fast path for equal byte strings."},
    {"credit_full", credit_full, METH_VARARGS, "Credit for a fully aligned pair."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_dpca", NULL, -1, methods};

PyMODINIT_FUNC PyInit__dpca(void) { return PyModule_Create(&module); }
