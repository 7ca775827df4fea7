/* Optional C kernels, loaded by `lora_tools.io.kernels.native` (each caller keeps a numpy
 * or torch path that gives the same bits).
 *
 * 1. One pass of an FP8 re-quantization: scale, round to e4m3fn, measure what survived.
 *
 * `lora_tools.io.fp8.requantize_measured` calls `requantize_rows` on rows of a merged
 * weight whose fresh block scales are already known (torch computes them, so they are
 * the same bits either way). Per element it does what the torch path does in eight
 * passes over memory (io/fp8.py: the scaling, the clamp, the cast; the dequantization
 * of the new code, the difference with W0, its square; the comparison of the codes):
 *
 *   y = x * f (or x / f), clamped to +-448;  code = e4m3fn(y), rounded to nearest even
 *   exactly as torch's cast (c10's fp8e4m3fn_from_fp32_value);  deq = value(code) * s;
 *   kept_sq += (deq - w0)^2 (double);  unchanged += (code == old code).
 *
 * value(code) is the rounded y itself, formed from the same bits as the code, so no
 * table lookup is needed. The loops are branch-free and vectorize (setup.py's flags); on
 * x86-64 Linux GCC builds an AVX2 clone next to the baseline one and picks at load time.
 * The GIL is released, so threads can take pieces of a block's rows at once. The values
 * must be finite (the merge checks them before): the clamp is done on their bits.
 *
 * 2. The block maxima of |value| and a finiteness check, in one read (`row_maxima`).
 * 3. float32 to bf16 bits, rounded to nearest even, in one pass (`bf16_round`), for the
 *    writers of io/encode.py (resize, convert, blend, extract write bf16 factors).
 * 4. e4m3fn codes times their block scales, in one pass (`decode_rows`), for every read of
 *    an FP8 weight's rows (io/fp8.py's RowDequantizer).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

/* type punning through a union: defined in C, and unlike memcpy it leaves the loop vectorizable */
typedef union { float f; uint32_t u; } pun;
static inline uint32_t bits_of(float f) { pun p = {.f = f}; return p.u; }
static inline float float_of(uint32_t u) { pun p = {.u = u}; return p.f; }

#define LIMIT_BITS UINT32_C(0x43E00000) /* 448, the largest finite e4m3fn */
#define DENORM_MAGIC (UINT32_C(141) << 23) /* 2^14: its ulp is e4m3fn's subnormal step 2^-9 */
#define SMALLEST_NORMAL (UINT32_C(121) << 23) /* 2^-6 */

/* Elements of a stretch handled at a time: the codes and differences of a chunk stay in
 * L1 between the three loops below, each of which GCC vectorizes (one loop mixing the
 * 8-, 32- and 64-bit work and a float reduction does not vectorize without -ffast-math,
 * whose reassociation would break the rounding below). */
#define CHUNK 256

/* codes[j] (e4m3fn, sign included, as uint32) and kept[j] = value(code)·s − w0[j] of
 * y[j] = x[j]·factor (or x[j]/factor), clamped to ±448. Values must be finite. */
#define ROUND_LOOP(SCALE_OP)                                                                                  \
    for (Py_ssize_t j = 0; j < m; j++) {                                                                     \
        uint32_t b = bits_of(x[j] SCALE_OP factor);                                                          \
        uint32_t sign = b & UINT32_C(0x80000000);                                                            \
        uint32_t a = b ^ sign;                                                                               \
        a = a > LIMIT_BITS ? LIMIT_BITS : a; /* |y| clamped to 448: finite floats order as their bits */    \
        /* normal range: the mantissa rounded to 3 bits, ties to even */                                     \
        uint32_t rounded = a + UINT32_C(0x7FFFF) + ((a >> 20) & 1u);                                         \
        uint32_t code_normal = (rounded - (UINT32_C(120) << 23)) >> 20;                                      \
        uint32_t value_normal = rounded & UINT32_C(0xFFF00000);                                              \
        /* below 2^-6: one float addition rounds to the subnormal grid */                                    \
        float t = float_of(a) + float_of(DENORM_MAGIC);                                                      \
        uint32_t code_small = bits_of(t) - DENORM_MAGIC;                                                     \
        uint32_t value_small = bits_of(t - float_of(DENORM_MAGIC));                                          \
        uint32_t small = a < SMALLEST_NORMAL;                                                                \
        codes[j] = (small ? code_small : code_normal) | (sign >> 24);                                        \
        kept[j] = float_of((small ? value_small : value_normal) | sign) * s - w0[j];                         \
    }

/* One row's stretch of one column block: n values under one scaling and one scale s. */
CLONES static void stretch(const float *restrict x, const float *restrict w0, const uint8_t *restrict old,
                           uint8_t *restrict out, Py_ssize_t n, float factor, int divide, float s,
                           double *kept_sq, Py_ssize_t *unchanged)
{
    uint32_t codes[CHUNK];
    float kept[CHUNK];
    for (Py_ssize_t lo = 0; lo < n; lo += CHUNK, x += CHUNK, w0 += CHUNK, old += CHUNK, out += CHUNK) {
        Py_ssize_t m = n - lo < CHUNK ? n - lo : CHUNK;
        if (divide) {
            ROUND_LOOP(/)
        } else {
            ROUND_LOOP(*)
        }
        uint32_t same = 0;
        for (Py_ssize_t j = 0; j < m; j++) {
            uint8_t code = (uint8_t)codes[j];
            out[j] = code;
            same += code == old[j];
        }
        /* eight partial sums, each a lane of one vector: no reassociation needed */
        double part[8] = {0};
        Py_ssize_t whole = m - m % 8;
        for (Py_ssize_t j = 0; j < whole; j += 8)
            for (int l = 0; l < 8; l++)
                part[l] += (double)kept[j + l] * kept[j + l];
        double acc = 0.0;
        for (int l = 0; l < 8; l++)
            acc += part[l];
        for (Py_ssize_t j = whole; j < m; j++)
            acc += (double)kept[j] * kept[j];
        *kept_sq += acc;
        *unchanged += same;
    }
}

static int contiguous(Py_buffer *view, Py_ssize_t bytes, const char *what)
{
    if (!PyBuffer_IsContiguous(view, 'C') || view->len < bytes) {
        PyErr_Format(PyExc_ValueError, "%s: a C-contiguous buffer of at least %zd bytes is needed", what, bytes);
        return 0;
    }
    return 1;
}

/* The number of column blocks of a (rows, cols) matrix cut every block_cols columns, or
 * -1 with a ValueError set for a shape no kernel takes. */
static Py_ssize_t column_blocks(Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t block_cols)
{
    if (rows < 0 || cols < 0 || block_cols <= 0) {
        PyErr_SetString(PyExc_ValueError, "rows, cols must be >= 0 and block_cols > 0");
        return -1;
    }
    return (cols + block_cols - 1) / block_cols;
}

/* The columns of block g: its first (*lo) and how many (the last block may be partial). */
static inline Py_ssize_t block_width(Py_ssize_t g, Py_ssize_t cols, Py_ssize_t block_cols, Py_ssize_t *lo)
{
    *lo = g * block_cols;
    return *lo + block_cols <= cols ? block_cols : cols - *lo;
}

PyDoc_STRVAR(requantize_rows_doc,
"requantize_rows(values, factors, scales, base, old_codes, out_codes, rows, cols, block_cols, divide)\n"
"-> (kept_sq, unchanged)\n\n"
"values, base: float32 (rows, cols); factors, scales: float32 (rows, ceil(cols/block_cols)), each row's\n"
"scaling factor and stored scale (widened to float32) per column block; old_codes, out_codes: uint8\n"
"(rows, cols). Writes the e4m3fn codes of clamp(values * factors) (or / with divide) into out_codes.");

static PyObject *requantize_rows(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer values, factors, scales, base, old, out;
    Py_ssize_t rows, cols, block_cols;
    int divide;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*w*nnnp", &values, &factors, &scales, &base, &old, &out, &rows, &cols,
                          &block_cols, &divide))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t grid = column_blocks(rows, cols, block_cols);
    if (grid < 0)
        goto done;
    Py_ssize_t elements = rows * cols;
    if (!contiguous(&values, elements * 4, "values") || !contiguous(&base, elements * 4, "base")
        || !contiguous(&factors, rows * grid * 4, "factors") || !contiguous(&scales, rows * grid * 4, "scales")
        || !contiguous(&old, elements, "old_codes") || !contiguous(&out, elements, "out_codes"))
        goto done;
    double kept_sq = 0.0;
    Py_ssize_t unchanged = 0;
    const float *x = values.buf, *w0 = base.buf, *f = factors.buf, *s = scales.buf;
    const uint8_t *o = old.buf;
    uint8_t *q = out.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < rows; i++) {
        for (Py_ssize_t g = 0; g < grid; g++) {
            Py_ssize_t lo, n = block_width(g, cols, block_cols, &lo);
            Py_ssize_t at = i * cols + lo;
            stretch(x + at, w0 + at, o + at, q + at, n, f[i * grid + g], divide, s[i * grid + g], &kept_sq,
                    &unchanged);
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(dn)", kept_sq, unchanged);
done:
    PyBuffer_Release(&values);
    PyBuffer_Release(&factors);
    PyBuffer_Release(&scales);
    PyBuffer_Release(&base);
    PyBuffer_Release(&old);
    PyBuffer_Release(&out);
    return result;
}

/* 2. The largest |value| of one stretch, as float32 bits (|x| orders as its bits), and
 * whether it is finite: one read, vectorized, where torch makes three passes. */
CLONES static uint32_t stretch_peak(const float *restrict x, Py_ssize_t n)
{
    uint32_t peak = 0;
    for (Py_ssize_t j = 0; j < n; j++) {
        uint32_t a = bits_of(x[j]) & UINT32_C(0x7FFFFFFF);
        peak = a > peak ? a : peak;
    }
    return peak;
}

PyDoc_STRVAR(row_maxima_doc,
"row_maxima(values, maxima, rows, cols, block_cols) -> finite\n\n"
"maxima[i, g] = max |values[i, g*block_cols : (g+1)*block_cols]| for float32 values (rows, cols) into\n"
"float32 maxima (rows, ceil(cols/block_cols)); False (maxima then meaningless) where a value is NaN or inf.");

static PyObject *row_maxima(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer values, maxima;
    Py_ssize_t rows, cols, block_cols;
    if (!PyArg_ParseTuple(args, "y*w*nnn", &values, &maxima, &rows, &cols, &block_cols))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t grid = column_blocks(rows, cols, block_cols);
    if (grid < 0)
        goto done;
    if (!contiguous(&values, rows * cols * 4, "values") || !contiguous(&maxima, rows * grid * 4, "maxima"))
        goto done;
    const float *x = values.buf;
    uint32_t *m = maxima.buf;
    uint32_t all = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < rows; i++) {
        for (Py_ssize_t g = 0; g < grid; g++) {
            Py_ssize_t lo, n = block_width(g, cols, block_cols, &lo);
            uint32_t peak = stretch_peak(x + i * cols + lo, n);
            m[i * grid + g] = peak;
            all = peak > all ? peak : all;
        }
    }
    Py_END_ALLOW_THREADS
    result = PyBool_FromLong(all < UINT32_C(0x7F800000)); /* inf and NaN have the largest bits */
done:
    PyBuffer_Release(&values);
    PyBuffer_Release(&maxima);
    return result;
}

/* 3. float32 to bf16, rounded to nearest even, in one pass (numpy takes six, and two more
 * to look for infinities): the bits of io/encode.py's `_round_bf16` for every finite value. */
CLONES static uint32_t bf16_span(const float *restrict x, uint16_t *restrict out, Py_ssize_t n)
{
    uint32_t bad = 0;
    for (Py_ssize_t j = 0; j < n; j++) {
        uint32_t b = bits_of(x[j]);
        uint32_t r = (b + UINT32_C(0x7FFF) + ((b >> 16) & 1u)) >> 16;
        out[j] = (uint16_t)r;
        bad |= ((b & UINT32_C(0x7F800000)) == UINT32_C(0x7F800000)) | ((r & 0x7F80u) == 0x7F80u);
    }
    return bad;
}

PyDoc_STRVAR(bf16_round_doc,
"bf16_round(values, out) -> finite\n\n"
"out[i] = the bf16 bits of float32 values[i], rounded to nearest even (out: uint16, as many elements);\n"
"False where a value is NaN or infinite or rounds past bf16's largest (then out is not to be used).");

static PyObject *bf16_round(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer values, out;
    if (!PyArg_ParseTuple(args, "y*w*", &values, &out))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = values.len / 4;
    if (!contiguous(&values, n * 4, "values") || !contiguous(&out, n * 2, "out"))
        goto done;
    uint32_t bad;
    Py_BEGIN_ALLOW_THREADS
    bad = bf16_span(values.buf, out.buf, n);
    Py_END_ALLOW_THREADS
    result = PyBool_FromLong(!bad);
done:
    PyBuffer_Release(&values);
    PyBuffer_Release(&out);
    return result;
}

/* 4. e4m3fn codes to their values times their block's scale, in one pass (torch's widening
 * by bits takes four): value = (1 + m/8)·2^(e−7), or m·2^-9 for e = 0, formed from normal
 * floats only; times s, one rounding, as torch's cast times the scale. Codes 0x7F and 0xFF
 * are NaN. */
CLONES static void decode_span(const uint8_t *restrict q, float *restrict out, Py_ssize_t n, float s)
{
    for (Py_ssize_t j = 0; j < n; j++) {
        uint32_t c = q[j];
        uint32_t sign = (c & 0x80u) << 24;
        uint32_t e = (c >> 3) & 0xFu, m = c & 7u;
        float normal = float_of(((e + 120u) << 23) | (m << 20));
        float small = (float)m * 0.001953125f;
        uint32_t value = bits_of(e ? normal : small) | sign;
        value = (c & 0x7Fu) == 0x7Fu ? UINT32_C(0x7FC00000) : value;
        out[j] = float_of(value) * s;
    }
}

PyDoc_STRVAR(decode_rows_doc,
"decode_rows(codes, scales, out, rows, cols, block_cols)\n\n"
"out = the values of e4m3fn codes (uint8, (rows, cols)) times their scale (float32 (rows, ceil(cols/block_cols)),\n"
"one per row and column block), into float32 out (rows, cols).");

static PyObject *decode_rows(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer codes, scales, out;
    Py_ssize_t rows, cols, block_cols;
    if (!PyArg_ParseTuple(args, "y*y*w*nnn", &codes, &scales, &out, &rows, &cols, &block_cols))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t grid = column_blocks(rows, cols, block_cols);
    if (grid < 0)
        goto done;
    if (!contiguous(&codes, rows * cols, "codes") || !contiguous(&scales, rows * grid * 4, "scales")
        || !contiguous(&out, rows * cols * 4, "out"))
        goto done;
    const uint8_t *q = codes.buf;
    const float *s = scales.buf;
    float *o = out.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < rows; i++) {
        for (Py_ssize_t g = 0; g < grid; g++) {
            Py_ssize_t lo, n = block_width(g, cols, block_cols, &lo);
            decode_span(q + i * cols + lo, o + i * cols + lo, n, s[i * grid + g]);
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&codes);
    PyBuffer_Release(&scales);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"requantize_rows", requantize_rows, METH_VARARGS, requantize_rows_doc},
    {"row_maxima", row_maxima, METH_VARARGS, row_maxima_doc},
    {"bf16_round", bf16_round, METH_VARARGS, bf16_round_doc},
    {"decode_rows", decode_rows, METH_VARARGS, decode_rows_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels", "Optional C kernels (see lora_tools/io/kernels.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
