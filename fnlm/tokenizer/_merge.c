/* BPE training's merge step on the short words, in C: `merge_words` is
 * `fnlm.tokenizer.train._merge_words_py` (the reference, used when this module is not built) on
 * the same Python objects, with the same result:
 *
 *   - each word listed in `where_list` that still holds the pair `k = a b` is rewritten with its
 *     occurrences (greedy, left to right, non-overlapping: `str.split`'s rule) replaced by `z`;
 *   - around each occurrence, the pairs `x a` and `b y` lose the word's count, and the new pairs
 *     `x z`, `z y` (and `z z` between two adjacent occurrences) gain it;
 *   - each new pair is pushed on `heap` as `(-count, token_key[first], token_key[second], pair)`,
 *     and its words are appended to `where[pair]`;
 *   - the return value maps each new pair to the indices of its words, once per occurrence.
 *
 * The differences are in how, not what: the occurrences are found by one scan of the word, the
 * new word is written directly, and the count changes are summed per neighbouring token in C
 * arrays first, so that `pair_counts` sees one update per distinct pair instead of one per
 * occurrence. On GCIDE (vocab 10,000) the loop rewrites 1.8 million words; in Python it took 3.6 s
 * of a 7 s training run.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static PyObject *heappush_fn = NULL;

/* Per-token scratch, indexed by the neighbouring token's id, grown as needed and kept between
 * calls; only the entries listed in `touched` are set during a call, and they are cleared after.
 * Each occurrence moves its word's count from `x a` to `x z` (from `b y` to `z y`), so one sum
 * serves as both the loss and the gain; a token was touched when its word list exists. */
typedef struct {
    Py_ssize_t cap;
    long long *sum_left, *sum_right;    /* count moved from `x a` to `x z`, from `b y` to `z y` */
    PyObject **list_left, **list_right; /* the words of `x z`, of `z y` */
    Py_UCS4 *touched_left, *touched_right;
    Py_ssize_t n_left, n_right;
} Scratch;

static Scratch sc = {0};

static int grow(Py_ssize_t need) {
    if (need <= sc.cap) return 0;
    Py_ssize_t cap = sc.cap ? sc.cap : 1024;
    while (cap < need) cap *= 2;
#define GROW(field, type)                                                        \
    do {                                                                         \
        type *p = PyMem_Realloc(sc.field, sizeof(type) * (size_t)cap);           \
        if (p == NULL) { PyErr_NoMemory(); return -1; }                         \
        memset(p + sc.cap, 0, sizeof(type) * (size_t)(cap - sc.cap));           \
        sc.field = p;                                                            \
    } while (0)
    GROW(sum_left, long long);
    GROW(sum_right, long long);
    GROW(list_left, PyObject *);
    GROW(list_right, PyObject *);
    GROW(touched_left, Py_UCS4);
    GROW(touched_right, Py_UCS4);
#undef GROW
    sc.cap = cap;
    return 0;
}

static PyObject *pair_key(Py_UCS4 c1, Py_UCS4 c2) {
    /* the exact maximum character: CPython compares and hashes a str by its compact kind */
    PyObject *s = PyUnicode_New(2, c1 > c2 ? c1 : c2);
    if (s == NULL) return NULL;
    int kind = PyUnicode_KIND(s);
    void *data = PyUnicode_DATA(s);
    PyUnicode_WRITE(kind, data, 0, c1);
    PyUnicode_WRITE(kind, data, 1, c2);
    return s;
}

/* pair_counts[c1 c2] += delta; with `must_exist`, a missing key is a KeyError (as `-=` is in
 * Python), else it starts at 0. */
static int add_count(PyObject *pair_counts, PyObject *key, long long delta, int must_exist) {
    PyObject *old = PyDict_GetItemWithError(pair_counts, key);
    if (old == NULL) {
        if (PyErr_Occurred()) return -1;
        if (must_exist) { PyErr_SetObject(PyExc_KeyError, key); return -1; }
    }
    PyObject *d = PyLong_FromLongLong(delta);
    if (d == NULL) return -1;
    Py_XINCREF(old); /* borrowed from the dict: `+` may run Python code that removes it */
    PyObject *val = old == NULL ? (Py_INCREF(d), d) : PyNumber_Add(old, d);
    Py_XDECREF(old);
    Py_DECREF(d);
    if (val == NULL) return -1;
    int rc = PyDict_SetItem(pair_counts, key, val);
    Py_DECREF(val);
    return rc;
}

static int decrement(PyObject *pair_counts, Py_UCS4 c1, Py_UCS4 c2, long long c) {
    PyObject *key = pair_key(c1, c2);
    if (key == NULL) return -1;
    int rc = add_count(pair_counts, key, -c, 1);
    Py_DECREF(key);
    return rc;
}

/* A new pair's words: counted in pair_counts and added to new_where (extending the list when
 * the pair is already there, which happens when `z` itself is a neighbour). */
static int gain(PyObject *pair_counts, PyObject *new_where, Py_UCS4 c1, Py_UCS4 c2, long long c, PyObject *lst) {
    PyObject *key = pair_key(c1, c2);
    if (key == NULL) return -1;
    int rc = add_count(pair_counts, key, c, 0);
    if (rc == 0) {
        PyObject *old = PyDict_GetItemWithError(new_where, key);
        if (old != NULL) {
            Py_ssize_t n = PyList_GET_SIZE(old);
            rc = PyList_SetSlice(old, n, n, lst);
        } else {
            rc = PyErr_Occurred() ? -1 : PyDict_SetItem(new_where, key, lst);
        }
    }
    Py_DECREF(key);
    return rc;
}

static int append_new(PyObject **slot, PyObject *wi) {
    if (*slot == NULL) {
        *slot = PyList_New(0);
        if (*slot == NULL) return -1;
    }
    return PyList_Append(*slot, wi);
}

/* Empty the scratch (after a call, successful or not). */
static void reset(void) {
    for (Py_ssize_t t = 0; t < sc.n_left; t++) {
        Py_UCS4 x = sc.touched_left[t];
        sc.sum_left[x] = 0;
        Py_CLEAR(sc.list_left[x]);
    }
    for (Py_ssize_t t = 0; t < sc.n_right; t++) {
        Py_UCS4 y = sc.touched_right[t];
        sc.sum_right[y] = 0;
        Py_CLEAR(sc.list_right[y]);
    }
    sc.n_left = sc.n_right = 0;
}

/* One occurrence next to token `c` (on the left or the right of the pair) in word `wi` of count
 * `cw`: add the count to the token's sum and the word to its list, noting the token the first
 * time. */
static int move(Py_UCS4 c, int left, long long cw, PyObject *wi) {
    if ((Py_ssize_t)c >= sc.cap && grow((Py_ssize_t)c + 1) < 0) return -1;
    PyObject **lists = left ? sc.list_left : sc.list_right;
    if (lists[c] == NULL) {
        if (left) sc.touched_left[sc.n_left++] = c;
        else sc.touched_right[sc.n_right++] = c;
    }
    (left ? sc.sum_left : sc.sum_right)[c] += cw;
    return append_new(&lists[c], wi);
}

/* A private tuple of a sequence's items. For a list, the tuple is allocated first and the list's
 * size read again after: an allocation may run the garbage collector, whose finalizers may change
 * the list (`PyList_AsTuple` would copy from the array it had before). */
static PyObject *private_tuple(PyObject *seq, const char *what) {
    if (!PyList_Check(seq)) return PySequence_Tuple(seq);
    Py_ssize_t n = PyList_GET_SIZE(seq);
    PyObject *copy = PyTuple_New(n);
    if (copy == NULL) return NULL;
    if (PyList_GET_SIZE(seq) != n) {
        Py_DECREF(copy);
        PyErr_Format(PyExc_RuntimeError, "%s changed while it was being read", what);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(seq, i);
        Py_INCREF(item);
        PyTuple_SET_ITEM(copy, i, item);
    }
    return copy;
}

/* The word indices as a private tuple of exact ints (a copy: Python code that runs later, e.g. a
 * finalizer during an allocation, cannot change what is iterated, and reading an exact int runs
 * no Python code, unlike `__index__`). */
static PyObject *index_copy(PyObject *where_list) {
    PyObject *todo = private_tuple(where_list, "where_list");
    if (todo == NULL) return NULL;
    for (Py_ssize_t e = 0; e < PyTuple_GET_SIZE(todo); e++) {
        if (!PyLong_CheckExact(PyTuple_GET_ITEM(todo, e))) {
            PyErr_Format(PyExc_TypeError, "where_list must hold ints, got %.80s", Py_TYPE(PyTuple_GET_ITEM(todo, e))->tp_name);
            Py_DECREF(todo);
            return NULL;
        }
    }
    return todo;
}

/* The scratch is shared: a call from Python code that runs inside a call (a `+` on a count, a
 * comparison in `heappush`, a finalizer) is refused instead of clearing it under the outer call. */
static int busy = 0;

static PyObject *merge_words_locked(PyObject *words, PyObject *counts, PyObject *todo, PyObject *pair_counts,
                                    PyObject *k, PyObject *z, PyObject *where, PyObject *heap, PyObject *token_key);

static PyObject *merge_words(PyObject *self, PyObject *args) {
    PyObject *words, *counts, *where_list, *pair_counts, *k, *z, *where, *heap, *token_key;
    if (!PyArg_ParseTuple(args, "O!O!O!O!UUO!O!O!:merge_words", &PyList_Type, &words, &PyList_Type, &counts,
                          &PyList_Type, &where_list, &PyDict_Type, &pair_counts, &k, &z, &PyDict_Type, &where,
                          &PyList_Type, &heap, &PyList_Type, &token_key))
        return NULL;
    if (PyUnicode_GET_LENGTH(k) != 2 || PyUnicode_GET_LENGTH(z) != 1) {
        PyErr_SetString(PyExc_ValueError, "merge_words needs a two-character pair and a one-character token");
        return NULL;
    }
    if (busy) {
        PyErr_SetString(PyExc_RuntimeError, "merge_words is not re-entrant (called from code it ran)");
        return NULL;
    }
    PyObject *todo = index_copy(where_list);
    if (todo == NULL) return NULL;
    busy = 1;
    PyObject *out = merge_words_locked(words, counts, todo, pair_counts, k, z, where, heap, token_key);
    busy = 0;
    Py_DECREF(todo);
    return out;
}

static PyObject *merge_words_locked(PyObject *words, PyObject *counts, PyObject *todo, PyObject *pair_counts,
                                    PyObject *k, PyObject *z, PyObject *where, PyObject *heap, PyObject *token_key) {
    Py_UCS4 a = PyUnicode_READ_CHAR(k, 0), b = PyUnicode_READ_CHAR(k, 1), zc = PyUnicode_READ_CHAR(z, 0);
    if (grow((Py_ssize_t)zc + 1) < 0) return NULL;
    PyObject *new_where = PyDict_New(), *zz_list = NULL, *w = NULL;
    if (new_where == NULL) return NULL;
    long long dec_ba = 0, inc_zz = 0;
    Py_ssize_t stack_pos[512];
    Py_ssize_t *pos = stack_pos, cap = 512;
    Py_ssize_t nwhere = PyTuple_GET_SIZE(todo);

    for (Py_ssize_t e = 0; e < nwhere; e++) {
        PyObject *wi = PyTuple_GET_ITEM(todo, e);
        Py_ssize_t idx = PyLong_AsSsize_t(wi);
        if (idx == -1 && PyErr_Occurred()) goto fail;
        if (idx < 0 || idx >= PyList_GET_SIZE(words) || idx >= PyList_GET_SIZE(counts)) {
            PyErr_Format(PyExc_IndexError, "word index %zd out of range", idx);
            goto fail;
        }
        Py_CLEAR(w);
        w = PyList_GET_ITEM(words, idx);
        if (!PyUnicode_CheckExact(w)) { w = NULL; PyErr_SetString(PyExc_TypeError, "words must be str"); goto fail; }
        Py_INCREF(w); /* held while its characters are read: Python code may replace it in `words` */
        Py_ssize_t n = PyUnicode_GET_LENGTH(w);
        int kind = PyUnicode_KIND(w);
        const void *data = PyUnicode_DATA(w);
        if (n / 2 + 1 > cap) {
            Py_ssize_t *grown = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(n / 2 + 1));
            if (grown == NULL) { PyErr_NoMemory(); goto fail; }
            if (pos != stack_pos) PyMem_Free(pos);
            pos = grown;
            cap = n / 2 + 1;
        }
        /* the occurrences, and the largest character that stays */
        Py_ssize_t m = 0, i = 0;
        Py_UCS4 maxchar = zc;
        while (i < n) {
            Py_UCS4 c = PyUnicode_READ(kind, data, i);
            if (c == a && i + 1 < n && PyUnicode_READ(kind, data, i + 1) == b) {
                pos[m++] = i;
                i += 2;
            } else {
                if (c > maxchar) maxchar = c;
                i += 1;
            }
        }
        if (m == 0) continue; /* stale */
        PyObject *count = PyList_GET_ITEM(counts, idx);
        if (!PyLong_CheckExact(count)) {
            PyErr_Format(PyExc_TypeError, "counts must hold ints, got %.80s", Py_TYPE(count)->tp_name);
            goto fail;
        }
        long long cw = PyLong_AsLongLong(count);
        if (cw == -1 && PyErr_Occurred()) goto fail;

        for (Py_ssize_t t = 0; t < m; t++) {
            Py_ssize_t at = pos[t];
            Py_ssize_t prev_end = t ? pos[t - 1] + 2 : 0;
            Py_ssize_t next_start = t + 1 < m ? pos[t + 1] : n;
            if (at > prev_end) {
                if (move(PyUnicode_READ(kind, data, at - 1), 1, cw, wi) < 0) goto fail;
            } else if (t) {
                inc_zz += cw;
                if (append_new(&zz_list, wi) < 0) goto fail;
            }
            if (at + 2 < next_start) {
                if (move(PyUnicode_READ(kind, data, at + 2), 0, cw, wi) < 0) goto fail;
            } else if (t + 1 < m) {
                dec_ba += cw;
            }
        }

        PyObject *nw = PyUnicode_New(n - m, maxchar);
        if (nw == NULL) goto fail;
        int nkind = PyUnicode_KIND(nw);
        void *ndata = PyUnicode_DATA(nw);
        Py_ssize_t out = 0, src = 0;
        for (Py_ssize_t t = 0; t < m; t++) {
            for (; src < pos[t]; src++) PyUnicode_WRITE(nkind, ndata, out++, PyUnicode_READ(kind, data, src));
            PyUnicode_WRITE(nkind, ndata, out++, zc);
            src += 2;
        }
        for (; src < n; src++) PyUnicode_WRITE(nkind, ndata, out++, PyUnicode_READ(kind, data, src));
        if (PyList_SetItem(words, idx, nw) < 0) goto fail; /* steals nw (also on failure), releases the old word */
    }
    Py_CLEAR(w);

    /* the count changes, one per distinct pair */
    for (Py_ssize_t t = 0; t < sc.n_left; t++) {
        Py_UCS4 x = sc.touched_left[t];
        if (decrement(pair_counts, x, a, sc.sum_left[x]) < 0) goto fail;
    }
    for (Py_ssize_t t = 0; t < sc.n_right; t++) {
        Py_UCS4 y = sc.touched_right[t];
        if (decrement(pair_counts, b, y, sc.sum_right[y]) < 0) goto fail;
    }
    if (dec_ba && decrement(pair_counts, b, a, dec_ba) < 0) goto fail;
    for (Py_ssize_t t = 0; t < sc.n_left; t++) {
        Py_UCS4 x = sc.touched_left[t];
        if (gain(pair_counts, new_where, x, zc, sc.sum_left[x], sc.list_left[x]) < 0) goto fail;
    }
    if (zz_list != NULL && gain(pair_counts, new_where, zc, zc, inc_zz, zz_list) < 0) goto fail;
    for (Py_ssize_t t = 0; t < sc.n_right; t++) {
        Py_UCS4 y = sc.touched_right[t];
        if (gain(pair_counts, new_where, zc, y, sc.sum_right[y], sc.list_right[y]) < 0) goto fail;
    }

    /* push each new pair with its count, and add its words to `where` */
    PyObject *nk, *lst;
    Py_ssize_t it = 0;
    while (PyDict_Next(new_where, &it, &nk, &lst)) {
        PyObject *nc = PyDict_GetItemWithError(pair_counts, nk);
        if (nc == NULL) { if (!PyErr_Occurred()) PyErr_SetObject(PyExc_KeyError, nk); goto fail; }
        Py_INCREF(nc); /* borrowed from the dict: `-` may run Python code that removes it */
        PyObject *neg = PyNumber_Negative(nc);
        Py_DECREF(nc);
        if (neg == NULL) goto fail;
        Py_ssize_t c0 = PyUnicode_READ_CHAR(nk, 0), c1 = PyUnicode_READ_CHAR(nk, 1);
        if (c0 >= PyList_GET_SIZE(token_key) || c1 >= PyList_GET_SIZE(token_key)) {
            Py_DECREF(neg);
            PyErr_SetString(PyExc_IndexError, "token_key is shorter than the token ids");
            goto fail;
        }
        PyObject *entry = PyTuple_Pack(4, neg, PyList_GET_ITEM(token_key, c0), PyList_GET_ITEM(token_key, c1), nk);
        Py_DECREF(neg);
        if (entry == NULL) goto fail;
        PyObject *r = PyObject_CallFunctionObjArgs(heappush_fn, heap, entry, NULL);
        Py_DECREF(entry);
        if (r == NULL) goto fail;
        Py_DECREF(r);
        PyObject *old = PyDict_GetItemWithError(where, nk); /* borrowed; nothing below runs Python code */
        if (old == NULL) {
            if (PyErr_Occurred() || PyDict_SetItem(where, nk, lst) < 0) goto fail;
        } else if (PyList_CheckExact(old)) {
            Py_ssize_t n = PyList_GET_SIZE(old);
            if (PyList_SetSlice(old, n, n, lst) < 0) goto fail;
        } else {
            PyErr_SetString(PyExc_TypeError, "where must map pairs to lists");
            goto fail;
        }
    }
    if (pos != stack_pos) PyMem_Free(pos);
    Py_XDECREF(zz_list);
    reset();
    return new_where;

fail:
    if (pos != stack_pos) PyMem_Free(pos);
    Py_XDECREF(w);
    Py_XDECREF(zz_list);
    reset();
    Py_DECREF(new_where);
    return NULL;
}


/* ---- Encoding: BPE of many short pre-tokens (`bpe_many`) ----------------------------------
 *
 * `make_table(byte_ids, ranks, merged)` packs a tokenizer's merges into a capsule: the 256 byte
 * ids, and an open-addressing hash from `(left id, right id)` to the merge's rank, with
 * `merged[rank]` the id it makes. `bpe_many(table, pieces)` returns, for each byte string, the
 * tuple of ids that `fnlm.tokenizer.bpe.bpe_word` gives: one symbol per byte, then, while an
 * adjacent pair is a merge, merge the pair of lowest rank (the leftmost on a tie). Quadratic in a
 * piece's length: the tokenizer sends only short pieces here (long ones go to `bpe_long`).
 */

typedef struct {
    long byte_ids[256];
    Py_ssize_t n_merges;
    long *merged;
    unsigned long long *keys; /* (left << 32 | right) + 1; 0 = empty */
    long *ranks;
    size_t mask;
} Table;

static void table_free(PyObject *capsule) {
    Table *t = PyCapsule_GetPointer(capsule, "fnlm.bpe_table");
    if (t == NULL) return;
    PyMem_Free(t->merged);
    PyMem_Free(t->keys);
    PyMem_Free(t->ranks);
    PyMem_Free(t);
}

static inline size_t slot_of(unsigned long long key, size_t mask) {
    return (size_t)((key * 0x9E3779B97F4A7C15ULL) >> 20) & mask;
}

static inline long rank_of(const Table *t, long left, long right) {
    unsigned long long key = (((unsigned long long)left << 32) | (unsigned long long)(unsigned int)right) + 1;
    for (size_t i = slot_of(key, t->mask);; i = (i + 1) & t->mask) {
        if (t->keys[i] == key) return t->ranks[i];
        if (t->keys[i] == 0) return -1;
    }
}

/* Token ids in the table must fit the 32-bit halves of a pair key (and Python's check the same). */
#define MAX_ID 0x7FFFFFFFL

/* An id or rank from a Python int (or int subclass, whose value is read without running Python
 * code: an object with only `__index__` is refused, since its code could change the inputs). */
static int read_id(PyObject *obj, long hi, const char *what, long *out) {
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be ints, got %.80s", what, Py_TYPE(obj)->tp_name);
        return -1;
    }
    int overflow = 0;
    long v = PyLong_AsLongAndOverflow(obj, &overflow);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (overflow || v < 0 || v > hi) {
        PyErr_Format(PyExc_ValueError, "%s must lie in [0, %ld], got %R", what, hi, obj);
        return -1;
    }
    *out = v;
    return 0;
}

static void table_release(Table *t) {
    PyMem_Free(t->merged);
    PyMem_Free(t->keys);
    PyMem_Free(t->ranks);
    PyMem_Free(t);
}

/* The 256 byte ids and `merged[rank]` from private tuples (copies: nothing can change them while read). */
static int fill_ids(Table *t, PyObject *bseq, PyObject *mseq) {
    if (PyTuple_GET_SIZE(bseq) != 256) {
        PyErr_SetString(PyExc_ValueError, "byte_ids must hold 256 ids");
        return -1;
    }
    for (int b = 0; b < 256; b++)
        if (read_id(PyTuple_GET_ITEM(bseq, b), MAX_ID, "byte ids", &t->byte_ids[b]) < 0) return -1;
    t->n_merges = PyTuple_GET_SIZE(mseq);
    t->merged = PyMem_Malloc(sizeof(long) * (size_t)(t->n_merges + 1));
    if (t->merged == NULL) { PyErr_NoMemory(); return -1; }
    for (Py_ssize_t r = 0; r < t->n_merges; r++)
        if (read_id(PyTuple_GET_ITEM(mseq, r), MAX_ID, "merged ids", &t->merged[r]) < 0) return -1;
    return 0;
}

/* The open-addressing hash of `ranks`; reading exact values runs no Python code, so the dict
 * cannot change while it is walked. */
static int fill_ranks(Table *t, PyObject *ranks) {
    size_t size = 16;
    while (size < 4 * (size_t)PyDict_GET_SIZE(ranks)) size *= 2;
    t->mask = size - 1;
    t->keys = PyMem_Calloc(size, sizeof(unsigned long long));
    t->ranks = PyMem_Malloc(sizeof(long) * size);
    if (t->keys == NULL || t->ranks == NULL) { PyErr_NoMemory(); return -1; }
    PyObject *pair, *rank;
    Py_ssize_t pos = 0;
    while (PyDict_Next(ranks, &pos, &pair, &rank)) {
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "ranks must map (left, right) tuples to ranks");
            return -1;
        }
        long left, right, r;
        if (read_id(PyTuple_GET_ITEM(pair, 0), MAX_ID, "pair ids", &left) < 0 ||
            read_id(PyTuple_GET_ITEM(pair, 1), MAX_ID, "pair ids", &right) < 0) {
            if (PyErr_ExceptionMatches(PyExc_ValueError)) {
                PyErr_Clear();
                PyErr_SetString(PyExc_ValueError, "a pair id or rank is out of range");
            }
            return -1;
        }
        if (t->n_merges == 0 || read_id(rank, (long)(t->n_merges - 1), "ranks", &r) < 0) {
            if (t->n_merges == 0 || PyErr_ExceptionMatches(PyExc_ValueError)) {
                PyErr_Clear();
                PyErr_SetString(PyExc_ValueError, "a pair id or rank is out of range");
            }
            return -1;
        }
        unsigned long long key = (((unsigned long long)left << 32) | (unsigned long long)right) + 1;
        size_t i = slot_of(key, t->mask);
        while (t->keys[i] != 0 && t->keys[i] != key) i = (i + 1) & t->mask;
        t->keys[i] = key;
        t->ranks[i] = r;
    }
    return 0;
}

static PyObject *make_table(PyObject *self, PyObject *args) {
    PyObject *byte_ids, *ranks, *merged;
    if (!PyArg_ParseTuple(args, "OO!O:make_table", &byte_ids, &PyDict_Type, &ranks, &merged)) return NULL;
    PyObject *bseq = private_tuple(byte_ids, "byte_ids");
    if (bseq == NULL) return NULL;
    PyObject *mseq = private_tuple(merged, "merged");
    if (mseq == NULL) { Py_DECREF(bseq); return NULL; }
    Table *t = PyMem_Calloc(1, sizeof(Table));
    PyObject *capsule = NULL;
    if (t == NULL) PyErr_NoMemory();
    else if (fill_ids(t, bseq, mseq) < 0 || fill_ranks(t, ranks) < 0) table_release(t);
    else if ((capsule = PyCapsule_New(t, "fnlm.bpe_table", table_free)) == NULL) table_release(t);
    Py_DECREF(bseq);
    Py_DECREF(mseq);
    return capsule;
}

static PyObject *bpe_tuple(Table *t, PyObject *pieces);

static PyObject *bpe_many(PyObject *self, PyObject *args) {
    PyObject *capsule, *pieces;
    if (!PyArg_ParseTuple(args, "OO!:bpe_many", &capsule, &PyList_Type, &pieces)) return NULL;
    Table *t = PyCapsule_GetPointer(capsule, "fnlm.bpe_table");
    if (t == NULL) return NULL;
    /* a private copy: a finalizer run by an allocation below cannot shrink what is iterated */
    PyObject *items = private_tuple(pieces, "pieces");
    if (items == NULL) return NULL;
    PyObject *result = bpe_tuple(t, items);
    Py_DECREF(items);
    return result;
}

static PyObject *bpe_tuple(Table *t, PyObject *pieces) {
    Py_ssize_t n_pieces = PyTuple_GET_SIZE(pieces);
    PyObject *out = PyList_New(n_pieces);
    if (out == NULL) return NULL;
    long stack_ids[512], stack_ranks[512];
    long *ids = stack_ids, *pr = stack_ranks;
    Py_ssize_t cap = 512;
    for (Py_ssize_t w = 0; w < n_pieces; w++) {
        PyObject *piece = PyTuple_GET_ITEM(pieces, w);
        if (!PyBytes_Check(piece)) {
            PyErr_SetString(PyExc_TypeError, "pieces must be bytes");
            goto fail;
        }
        Py_ssize_t n = PyBytes_GET_SIZE(piece);
        const unsigned char *raw = (const unsigned char *)PyBytes_AS_STRING(piece);
        if (n > cap) {
            long *gi = PyMem_Malloc(sizeof(long) * (size_t)n), *gr = PyMem_Malloc(sizeof(long) * (size_t)n);
            if (gi == NULL || gr == NULL) { PyMem_Free(gi); PyMem_Free(gr); PyErr_NoMemory(); goto fail; }
            if (ids != stack_ids) { PyMem_Free(ids); PyMem_Free(pr); }
            ids = gi; pr = gr; cap = n;
        }
        for (Py_ssize_t i = 0; i < n; i++) ids[i] = t->byte_ids[raw[i]];
        for (Py_ssize_t i = 0; i + 1 < n; i++) pr[i] = rank_of(t, ids[i], ids[i + 1]);
        Py_ssize_t len = n;
        while (len > 1) {
            Py_ssize_t best = -1;
            long best_rank = 0;
            for (Py_ssize_t i = 0; i + 1 < len; i++) {
                if (pr[i] >= 0 && (best < 0 || pr[i] < best_rank)) { best = i; best_rank = pr[i]; }
            }
            if (best < 0) break;
            ids[best] = t->merged[best_rank];
            memmove(ids + best + 1, ids + best + 2, sizeof(long) * (size_t)(len - best - 2));
            memmove(pr + best, pr + best + 1, sizeof(long) * (size_t)(len - best - 2));
            len -= 1;
            if (best > 0) pr[best - 1] = rank_of(t, ids[best - 1], ids[best]);
            if (best + 1 < len) pr[best] = rank_of(t, ids[best], ids[best + 1]);
        }
        PyObject *tup = PyTuple_New(len);
        if (tup == NULL) goto fail;
        for (Py_ssize_t i = 0; i < len; i++) {
            PyObject *v = PyLong_FromLong(ids[i]);
            if (v == NULL) { Py_DECREF(tup); goto fail; }
            PyTuple_SET_ITEM(tup, i, v);
        }
        PyList_SET_ITEM(out, w, tup);
    }
    if (ids != stack_ids) { PyMem_Free(ids); PyMem_Free(pr); }
    return out;

fail:
    if (ids != stack_ids) { PyMem_Free(ids); PyMem_Free(pr); }
    Py_DECREF(out);
    return NULL;
}

static PyMethodDef methods[] = {
    {"merge_words", merge_words, METH_VARARGS,
     "merge_words(words, counts, where_list, pair_counts, pair, token, where, heap, token_key) -> new_where\n\n"
     "One BPE merge `pair -> token` on the words listed in `where_list`; see "
     "fnlm.tokenizer.train._merge_words_py, which it equals."},
    {"make_table", make_table, METH_VARARGS,
     "make_table(byte_ids, ranks, merged) -> table: a tokenizer's merges for bpe_many."},
    {"bpe_many", bpe_many, METH_VARARGS,
     "bpe_many(table, pieces) -> list of id tuples: fnlm.tokenizer.bpe.bpe_word of each byte string."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_merge", "BPE's inner loops in C: training's merge step and encoding's merges.", -1, methods};

PyMODINIT_FUNC PyInit__merge(void) {
    PyObject *heapq = PyImport_ImportModule("heapq");
    if (heapq == NULL) return NULL;
    heappush_fn = PyObject_GetAttrString(heapq, "heappush");
    Py_DECREF(heapq);
    if (heappush_fn == NULL) return NULL;
    return PyModule_Create(&module);
}
