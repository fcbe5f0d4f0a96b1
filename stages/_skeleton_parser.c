/*
 * Fast parser for NTU RGB+D / Kinect v2 ".skeleton" text files.
 *
 * parse(data: bytes) -> either
 *   (declared_frames, body_counts, frame_index, body_ids, values, tracking)   on success, where
 *     body_counts  bytes of int32[F]       bodies per frame (F = declared frame count)
 *     frame_index  bytes of int32[R]       frame of each body record (R records)
 *     body_ids     bytes of uint64[R]      exact 17-digit bodyIDs
 *     values       bytes of float32[R,25,7] x y z depthX depthY colorX colorY
 *     tracking     bytes of uint8[R,25]    joint trackingState
 *   or (code, message) when the file is malformed.
 *
 * Numbers are converted to double exactly as Python's float() does (correctly rounded: Clinger's
 * exact fast path, strtod otherwise), then to float32, the same double rounding as
 * np.array(tokens, dtype=np.float32) in the reference readers. The GIL is released while parsing.
 * stages/skeleton_text.py holds a pure-Python twin with the same results and messages.
 *
 * A line ends at "\r\n", "\n" or a lone "\r" (old Mac files), as in Python's universal newlines.
 * After the last byte of the file's content, the trailing run of blanks, line ends, NUL bytes and
 * DOS end-of-file marks (0x1a) is padding: its NUL and 0x1a bytes read as blanks, not binary data.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NJ 25
#define NVAL 7
#define MAXTOK 16

typedef struct {
    const unsigned char *buf;
    Py_ssize_t len;
    Py_ssize_t pos;
    Py_ssize_t pad;      /* start of the trailing padding (see the top comment) */
    long line;           /* 1-based number of the line last returned */
    const unsigned char *ts[MAXTOK];
    const unsigned char *te[MAXTOK];
    int ntok;            /* number of tokens on the line (may exceed MAXTOK; only MAXTOK kept) */
} Scanner;

typedef struct {
    char code[32];
    char msg[256];
} Error;

static int set_error(Error *err, const char *code, const char *fmt, ...) {
    va_list ap;
    snprintf(err->code, sizeof err->code, "%s", code);
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    va_end(ap);
    return -1;
}

/* Character classes: 0 token byte, 1 blank, 2 line end ('\n' or '\r'), 3 binary (control or non-ASCII). */
static unsigned char CLASS[256];

static void init_classes(void) {
    for (int c = 0; c < 256; c++) CLASS[c] = (c < 0x20 || c >= 0x7f) ? 3 : 0;
    CLASS[' '] = CLASS['\t'] = CLASS['\f'] = CLASS['\v'] = 1;
    CLASS['\n'] = CLASS['\r'] = 2;
}

/* Where the trailing padding of buf[0, len) starts: blanks, line ends, NUL and 0x1a. */
static Py_ssize_t padding_start(const unsigned char *buf, Py_ssize_t len) {
    while (len > 0 && (CLASS[buf[len - 1]] == 1 || CLASS[buf[len - 1]] == 2 || buf[len - 1] == 0 ||
                       buf[len - 1] == 0x1a))
        len--;
    return len;
}

/* Past the line end at buf[pos] ("\r\n" is one line end, not two). */
static Py_ssize_t past_line_end(const unsigned char *buf, Py_ssize_t pos, Py_ssize_t len) {
    return pos + (buf[pos] == '\r' && pos + 1 < len && buf[pos + 1] == '\n' ? 2 : 1);
}

/* Next non-blank line. Returns 1 with tokens filled, 0 at end of input, -1 on binary data. */
static int next_line(Scanner *s, Error *err) {
    const unsigned char *buf = s->buf;
    Py_ssize_t pos = s->pos, len = s->len;
    while (pos < len) {
        s->line++;
        int ntok = 0;
        while (pos < len) {
            unsigned char k = CLASS[buf[pos]];
            if (k == 3 && pos >= s->pad) k = 1; /* NUL or 0x1a in the trailing padding */
            if (k == 1) {
                pos++;
                continue;
            }
            if (k == 2) {
                pos = past_line_end(buf, pos, len);
                break;
            }
            Py_ssize_t start = pos;
            while (pos < len && (k = CLASS[buf[pos]]) == 0) pos++;
            if (pos < len && k == 3 && pos < s->pad) {
                s->pos = pos;
                return set_error(err, "binary",
                                 "binary data (byte 0x%02x at offset %zd, line %ld): not a text .skeleton file",
                                 buf[pos], pos, s->line);
            }
            if (ntok < MAXTOK) {
                s->ts[ntok] = buf + start;
                s->te[ntok] = buf + pos;
            }
            ntok++;
        }
        s->ntok = ntok;
        if (ntok > 0) {
            s->pos = pos;
            return 1;
        }
    }
    s->pos = pos;
    s->ntok = 0;
    return 0;
}

static const double POW10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
                               1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

/* Parse [s, e) as a decimal float. Returns 0 ok, 1 not a number, 2 non-finite (nan/inf). */
static int parse_double(const unsigned char *s, const unsigned char *e, double *out) {
    const unsigned char *p = s;
    int neg = 0;
    if (p < e && (*p == '+' || *p == '-')) {
        neg = (*p == '-');
        p++;
    }
    /* Accumulate every digit (leading zeros add nothing); more than 19 digits may overflow m,
       which the slow path below then handles. */
    uint64_t m = 0;
    const unsigned char *q = p;
    while (p < e && (unsigned)(*p - '0') < 10) m = m * 10 + (uint64_t)(*p++ - '0');
    int digits = (int)(p - q), exp10 = 0;
    if (p < e && *p == '.') {
        p++;
        q = p;
        while (p < e && (unsigned)(*p - '0') < 10) m = m * 10 + (uint64_t)(*p++ - '0');
        exp10 = -(int)(p - q);
        digits += (int)(p - q);
    }
    int exact = digits <= 19;
    if (digits == 0) goto special;
    if (p < e && (*p == 'e' || *p == 'E')) {
        p++;
        int eneg = 0, ed = 0;
        long ev = 0;
        if (p < e && (*p == '+' || *p == '-')) {
            eneg = (*p == '-');
            p++;
        }
        while (p < e && *p >= '0' && *p <= '9') {
            if (ev < 100000) ev = ev * 10 + (*p - '0');
            ed++;
            p++;
        }
        if (ed == 0) return 1;
        exp10 += (int)(eneg ? -ev : ev);
    }
    if (p != e) return 1;
    if (exact && m <= ((uint64_t)1 << 53) && exp10 >= -22 && exp10 <= 22) {
        double v = (double)m;
        v = exp10 < 0 ? v / POW10[-exp10] : v * POW10[exp10];
        *out = neg ? -v : v;
        return isfinite(*out) ? 0 : 2;
    }
    /* Slow path: the C library's correctly rounded conversion on a NUL-terminated copy. */
    {
        char tmp[128];
        size_t n = (size_t)(e - s);
        if (n >= sizeof tmp) return 1;
        memcpy(tmp, s, n);
        tmp[n] = '\0';
        char *endp;
        *out = strtod(tmp, &endp);
        if ((size_t)(endp - tmp) != n) return 1;
        return isfinite(*out) ? 0 : 2;
    }
special:
    /* nan / inf / infinity (any case), as float() accepts them: numbers, but not finite ones. */
    {
        size_t n = (size_t)(e - p);
        char low[10];
        if (n == 0 || n > 8) return 1;
        for (size_t i = 0; i < n; i++) {
            unsigned char c = p[i];
            low[i] = (char)((c >= 'A' && c <= 'Z') ? c + 32 : c);
        }
        low[n] = '\0';
        if (!strcmp(low, "nan") || !strcmp(low, "inf") || !strcmp(low, "infinity")) {
            *out = NAN; /* what it is does not matter: no stored field takes a non-finite value */
            return 2;
        }
        return 1;
    }
}

/* Fused fast path for the common case, a regular 12-field joint line: numbers are converted while
   they are scanned (one pass over the bytes). Returns 1 when the line was consumed; 0 leaves the
   scanner untouched so the general path re-reads the line and reports any problem precisely. */
static int fast_joint_line(Scanner *s, float *dst, uint8_t *trk) {
    const unsigned char *p = s->buf + s->pos, *end = s->buf + s->len;
    for (int i = 0; i < 12; i++) {
        while (p < end && CLASS[*p] == 1) p++;
        int neg = 0;
        if (p < end && (*p == '-' || *p == '+')) neg = (*p++ == '-');
        const unsigned char *q = p;
        uint64_t m = 0;
        while (p < end && (unsigned)(*p - '0') < 10) m = m * 10 + (uint64_t)(*p++ - '0');
        int digits = (int)(p - q), exp10 = 0;
        if (p < end && *p == '.') {
            q = ++p;
            while (p < end && (unsigned)(*p - '0') < 10) m = m * 10 + (uint64_t)(*p++ - '0');
            exp10 = -(int)(p - q);
            digits += (int)(p - q);
        }
        if (digits == 0 || digits > 19) return 0;
        if (p < end && (*p == 'e' || *p == 'E')) {
            p++;
            int eneg = 0, ev = 0;
            if (p < end && (*p == '-' || *p == '+')) eneg = (*p++ == '-');
            q = p;
            while (p < end && (unsigned)(*p - '0') < 10 && p - q < 4) ev = ev * 10 + (*p++ - '0');
            if (p == q) return 0;
            exp10 += eneg ? -ev : ev;
        }
        if (p < end && CLASS[*p] != 1 && CLASS[*p] != 2) return 0;
        if (m > ((uint64_t)1 << 53) || exp10 < -22 || exp10 > 22) return 0;
        double v = exp10 < 0 ? (double)m / POW10[-exp10] : (double)m * POW10[exp10];
        if (neg) v = -v;
        if (i < NVAL && fabs(v) > FLT_MAX) return 0; /* the general path reports it */
        if (i < NVAL) dst[i] = (float)v;
        else if (i == 11) *trk = (uint8_t)(v >= 0 && v <= 255 ? v : 0);
    }
    while (p < end && CLASS[*p] == 1) p++;
    if (p < end && CLASS[*p] != 2) return 0; /* more fields, or binary: let the general path say so */
    s->pos = p < end ? past_line_end(s->buf, p - s->buf, s->len) : s->len;
    s->line++;
    return 1;
}

static void token_repr(const unsigned char *s, const unsigned char *e, char *out, size_t cap) {
    size_t n = (size_t)(e - s);
    if (n > cap - 4) {
        memcpy(out, s, cap - 4);
        memcpy(out + cap - 4, "...", 4);
    } else {
        memcpy(out, s, n);
        out[n] = '\0';
    }
}

/* A non-negative integer count (frame, body or joint count). */
static int parse_count(Scanner *s, const char *what, long *out, Error *err) {
    char tok[40];
    if (s->ntok != 1)
        return set_error(err, "bad_field_count", "line %ld: expected the %s (1 field), found %d fields",
                         s->line, what, s->ntok);
    const unsigned char *p = s->ts[0], *e = s->te[0];
    long v = 0;
    if (p == e || e - p > 9) goto bad;
    for (; p < e; p++) {
        if (*p < '0' || *p > '9') goto bad;
        v = v * 10 + (*p - '0');
    }
    *out = v;
    return 0;
bad:
    token_repr(s->ts[0], s->te[0], tok, sizeof tok);
    return set_error(err, "bad_count", "line %ld: %s '%s' is not a non-negative integer", s->line, what, tok);
}

/* Field i of the line as a number. Non-finite values (nan, inf, 1e999) are refused in the fields
   the parser stores (stored != 0) and let through in the others, which nothing reads (a Kinect
   writes e.g. an orientation it could not compute as such): a file is not lost for them. */
static int check_number(Scanner *s, int i, double *out, Error *err, int stored) {
    char tok[40];
    int r = parse_double(s->ts[i], s->te[i], out);
    if (r == 0 || (r == 2 && !stored)) return 0;
    token_repr(s->ts[i], s->te[i], tok, sizeof tok);
    if (r == 2)
        return set_error(err, "non_finite", "line %ld field %d: non-finite value '%s'", s->line, i + 1, tok);
    return set_error(err, "non_numeric", "line %ld field %d: '%s' is not a number", s->line, i + 1, tok);
}

typedef struct {
    int32_t *counts;
    int32_t *frame;
    uint64_t *ids;
    float *values;
    uint8_t *tracking;
    Py_ssize_t n, cap;
} Out;

static int grow(Out *o, Error *err) {
    Py_ssize_t cap = o->cap ? o->cap * 2 : 64;
    int32_t *frame = realloc(o->frame, (size_t)cap * sizeof *frame);
    if (frame) o->frame = frame;
    uint64_t *ids = realloc(o->ids, (size_t)cap * sizeof *ids);
    if (ids) o->ids = ids;
    float *values = realloc(o->values, (size_t)cap * NJ * NVAL * sizeof *values);
    if (values) o->values = values;
    uint8_t *tracking = realloc(o->tracking, (size_t)cap * NJ);
    if (tracking) o->tracking = tracking;
    if (!frame || !ids || !values || !tracking) return set_error(err, "memory", "out of memory");
    o->cap = cap;
    return 0;
}

static int parse_body_id(Scanner *s, uint64_t *out, Error *err) {
    char tok[40];
    const unsigned char *p = s->ts[0], *e = s->te[0];
    uint64_t v = 0;
    if (p == e || e - p > 20) goto bad;
    for (; p < e; p++) {
        if (*p < '0' || *p > '9') goto bad;
        uint64_t d = (uint64_t)(*p - '0');
        if (v > (UINT64_MAX - d) / 10) goto bad;
        v = v * 10 + d;
    }
    *out = v;
    return 0;
bad:
    token_repr(s->ts[0], s->te[0], tok, sizeof tok);
    return set_error(err, "bad_body_id", "line %ld: bodyID '%s' is not an unsigned 64-bit integer", s->line,
                     tok);
}

static int parse_all(Scanner *s, Out *o, long *frames_out, Error *err) {
    long frames, bodies, joints;
    double v;
    s->pad = padding_start(s->buf, s->len);
    int r = next_line(s, err);
    if (r < 0) return -1;
    if (r == 0) return set_error(err, "empty_file", "file is empty");
    if (parse_count(s, "frame count", &frames, err)) return -1;
    if (frames == 0) return set_error(err, "zero_frames", "file declares 0 frames");
    if (frames > s->len / 2) /* every frame takes at least 2 bytes: bound the allocation below */
        return set_error(err, "truncated", "file declares %ld frames but holds only %zd bytes", frames, s->len);
    o->counts = malloc((size_t)frames * sizeof *o->counts);
    if (!o->counts) return set_error(err, "memory", "out of memory");
    *frames_out = frames;
    for (long f = 0; f < frames; f++) {
        r = next_line(s, err);
        if (r < 0) return -1;
        if (r == 0)
            return set_error(err, "truncated", "file ends before frame %ld of %ld (after line %ld)", f + 1,
                             frames, s->line);
        if (parse_count(s, "body count", &bodies, err)) return -1;
        o->counts[f] = (int32_t)bodies;
        for (long b = 0; b < bodies; b++) {
            r = next_line(s, err);
            if (r < 0) return -1;
            if (r == 0)
                return set_error(err, "truncated", "file ends inside frame %ld of %ld (body %ld of %ld)", f + 1,
                                 frames, b + 1, bodies);
            if (s->ntok != 10)
                return set_error(err, "bad_field_count", "line %ld: expected a 10-field body line, found %d fields",
                                 s->line, s->ntok);
            if (o->n == o->cap && grow(o, err)) return -1;
            if (parse_body_id(s, &o->ids[o->n], err)) return -1;
            for (int i = 1; i < 10; i++)
                if (check_number(s, i, &v, err, 0)) return -1;
            r = next_line(s, err);
            if (r < 0) return -1;
            if (r == 0)
                return set_error(err, "truncated", "file ends inside frame %ld of %ld (body %ld of %ld)", f + 1,
                                 frames, b + 1, bodies);
            if (parse_count(s, "joint count", &joints, err)) return -1;
            if (joints != NJ)
                return set_error(err, "bad_joint_count", "line %ld: body has %ld joints, expected 25", s->line,
                                 joints);
            float *dst = o->values + (size_t)o->n * NJ * NVAL;
            uint8_t *trk = o->tracking + (size_t)o->n * NJ;
            for (int j = 0; j < NJ; j++) {
                if (fast_joint_line(s, dst + j * NVAL, trk + j)) continue;
                r = next_line(s, err);
                if (r < 0) return -1;
                if (r == 0)
                    return set_error(err, "truncated", "file ends inside frame %ld of %ld (joint %d of 25)", f + 1,
                                     frames, j + 1);
                if (s->ntok != 12)
                    return set_error(err, "bad_field_count",
                                     "line %ld: expected a 12-field joint line, found %d fields", s->line, s->ntok);
                for (int i = 0; i < 12; i++) {
                    if (check_number(s, i, &v, err, i < NVAL)) return -1;
                    if (i < NVAL && fabs(v) > FLT_MAX) {
                        char tok[40];
                        token_repr(s->ts[i], s->te[i], tok, sizeof tok);
                        return set_error(err, "non_finite", "line %ld field %d: '%s' is out of float32 range",
                                         s->line, i + 1, tok);
                    }
                    if (i < NVAL) dst[j * NVAL + i] = (float)v;
                    else if (i == 11) trk[j] = (uint8_t)(v >= 0 && v <= 255 ? v : 0);
                }
            }
            o->frame[o->n] = (int32_t)f;
            o->n++;
        }
    }
    r = next_line(s, err);
    if (r < 0) return -1;
    if (r > 0) {
        char tok[40];
        token_repr(s->ts[0], s->te[0], tok, sizeof tok);
        return set_error(err, "trailing_data",
                         "declared %ld frames but the data goes on at line %ld with %d field%s: '%s%s'", frames,
                         s->line, s->ntok, s->ntok == 1 ? "" : "s", tok, s->ntok == 1 ? "" : " ...");
    }
    return 0;
}

static PyObject *py_parse(PyObject *self, PyObject *args) {
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "y*", &view)) return NULL;
    Scanner s = {.buf = view.buf, .len = view.len, .pos = 0, .line = 0, .ntok = 0};
    Out o = {0};
    Error err = {{0}, {0}};
    long frames = 0;
    int status;
    Py_BEGIN_ALLOW_THREADS status = parse_all(&s, &o, &frames, &err);
    Py_END_ALLOW_THREADS PyBuffer_Release(&view);
    PyObject *result;
    if (status != 0) {
        result = Py_BuildValue("(ss)", err.code, err.msg);
    } else {
        result = Py_BuildValue(
            "(ly#y#y#y#y#)", frames, (const char *)o.counts, (Py_ssize_t)(frames * sizeof(int32_t)),
            (const char *)o.frame, (Py_ssize_t)(o.n * sizeof(int32_t)), (const char *)o.ids,
            (Py_ssize_t)(o.n * sizeof(uint64_t)), (const char *)o.values,
            (Py_ssize_t)(o.n * NJ * NVAL * sizeof(float)), (const char *)o.tracking, (Py_ssize_t)(o.n * NJ));
    }
    free(o.counts);
    free(o.frame);
    free(o.ids);
    free(o.values);
    free(o.tracking);
    return result;
}

static PyMethodDef methods[] = {
    {"parse", py_parse, METH_VARARGS, "Parse .skeleton bytes; see the module comment for the result."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_skeleton_parser",
                                    "Fast NTU .skeleton text parser.", -1, methods};

PyMODINIT_FUNC PyInit__skeleton_parser(void) {
    init_classes();
    return PyModule_Create(&module);
}
