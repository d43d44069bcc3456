/* Attention reads over quantized KV codes, and over a ragged layer's full-precision rows: one
 * fused loop per op (effllm.native).
 *
 * Built on first use by effllm/native/__init__.py with the system C compiler and called
 * through ctypes. Arrays are float32 / uint8 / int64 and C-contiguous unless a stride is passed;
 * "bh" runs over batch * kv heads, "r" over the query rows of a head group (at most MAX_ROWS),
 * "t" over coded tokens. The Python side checks every shape; nothing here allocates.
 * Parallel (when built with OpenMP): each head's chunks, groups or tokens are cut into `parts`
 * equal ranges, and the (head, part) items shared by the threads of torch's own OpenMP team
 * (the process loads one libgomp: torch's), so no second pool spins against torch's. parts == 1
 * runs serially; the Python side picks parts (the thread count, or 1 for small work).
 * Sums over the last dim use independent lanes, so results do not depend on -ffast-math.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* 1 when built with OpenMP (the loops then run on torch's threads), else 0. */
int built_with_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Range `part` of n units cut into `parts` near-equal ranges: [lo, hi). */
static inline void part_range(int64_t n, int64_t parts, int64_t part, int64_t *lo, int64_t *hi) {
    *lo = n * part / parts;
    *hi = n * (part + 1) / parts;
}

#define MAX_ROWS 64
#define MAX_DIM 256
#define MAX_SLOTS 512

/* 8 float lanes (GCC/clang vector extension): one AVX register, or two SSE ones. */
typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }
static inline float sum8(v8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

typedef int32_t i8v __attribute__((vector_size(32)));

/* 2^x for 8 lanes, |x| < 126: 2^round(x) times a degree-7 Taylor polynomial of 2^f, |f| <= 1/2
 * (truncation error below 1e-8 relative, under one float32 ulp). */
static inline v8 exp2_8(v8 x) {
    const v8 magic = {12582912.f, 12582912.f, 12582912.f, 12582912.f, 12582912.f, 12582912.f, 12582912.f, 12582912.f};
    const v8 r = (x + magic) - magic; /* round to nearest (|x| < 2^22) */
    const v8 f = (x - r) * 0.69314718055994531f; /* 2^f = e^(f ln 2) */
    v8 p = 1.f + f * (1.f + f * (1.f / 2 + f * (1.f / 6 + f * (1.f / 24 + f * (1.f / 120 + f * (1.f / 720 + f * (1.f / 5040)))))));
    i8v bits;
    memcpy(&bits, &p, sizeof bits);
    bits += __builtin_convertvector(r, i8v) << 23; /* times 2^round(x): add to the exponent */
    memcpy(&p, &bits, sizeof p);
    return p;
}

/* Lanes as all-ones / zero int masks (GCC vector compares), and selection by them. */
static inline v8 select8(i8v mask, v8 a, v8 b) {
    i8v ai, bi;
    memcpy(&ai, &a, sizeof ai);
    memcpy(&bi, &b, sizeof bi);
    ai = (ai & mask) | (bi & ~mask);
    memcpy(&a, &ai, sizeof a);
    return a;
}

/* s[i] = e^(s[i] - top) for i < n, in place (top: the largest of them); returns their sum. A
 * term under 2^-125 of the largest (a -inf logit too) is 0, where float32's exp gives at most a
 * few denormals. Only the n floats are written. */
static inline float exp_in_place(float *s, int64_t n, float top) {
    const float log2e = 1.4426950408889634f;
    const v8 floor8 = {-125.f, -125.f, -125.f, -125.f, -125.f, -125.f, -125.f, -125.f}, zero = {0};
    v8 total = {0};
    for (int64_t t = 0; t < n; t += 8) {
        const int64_t lanes = n - t < 8 ? n - t : 8;
        v8 x;
        for (int l = 0; l < 8; ++l) {
            const float y = l < lanes ? (s[t + l] - top) * log2e : -200.f;
            x[l] = y > -125.f ? y : -125.f; /* within exp2_8's range; such lanes are zeroed below */
        }
        const v8 p = select8(x > floor8, exp2_8(x), zero);
        total += p;
        if (lanes == 8) store8(s + t, p);
        else for (int l = 0; l < lanes; ++l) s[t + l] = p[l];
    }
    return sum8(total);
}

/* Decoded scales of the n <= BLOCK tokens at codes sc (n, 2) of one chunk with grid
 * (lo_a, step_a, lo_b, step_b): a[i] = 2^(lo_a + step_a * code_a), the same for b. */
#define BLOCK 256
static void decode_scales(const uint8_t *restrict sc, const float *restrict grid, int64_t n,
                          float *restrict a, float *restrict b) {
    for (int64_t i = 0; i < n; i += 8) {
        v8 ca, cb;
        for (int k = 0; k < 8; ++k) {
            const int64_t t = i + k < n ? i + k : n - 1;
            ca[k] = (float)sc[2 * t];
            cb[k] = (float)sc[2 * t + 1];
        }
        store8(a + i, exp2_8(grid[0] + grid[1] * ca));
        store8(b + i, exp2_8(grid[2] + grid[3] * cb));
    }
}

/* The token span [first, first + n) of chunk c: chunks hold chunk_len tokens, or counts[c] after
 * an eviction left rows ragged (tokens stay in chunk order). */
static inline int64_t chunk_size(const int32_t *counts, int64_t c, int64_t chunk_len, int64_t tokens, int64_t first) {
    const int64_t n = counts ? counts[c] : chunk_len;
    return n < tokens - first ? n : tokens - first;
}

/* The first token of chunk c_begin (the chunks before it summed as chunk_size does). */
static inline int64_t chunk_first(const int32_t *counts, int64_t c_begin, int64_t chunk_len, int64_t tokens) {
    int64_t first = 0;
    for (int64_t c = 0; c < c_begin && first < tokens; ++c) first += chunk_size(counts, c, chunk_len, tokens, first);
    return first;
}

/* One head's NSNQuant codes. With `each` NULL, every head lies in the arrays passed, `tokens`
 * tokens and `chunks` chunks a head; otherwise (rows of different lengths, each in tensors of its
 * own: effllm.kv.quantized_rows) head bh is each[bh * 6 ..] = {codes, scales, grid, counts or 0
 * (addresses), tokens, chunks}. */
typedef struct {
    const uint8_t *codes, *scales;
    const float *grid;
    const int32_t *counts;
    int64_t tokens, chunks;
} head_codes;

static inline head_codes head_at(const int64_t *each, int64_t bh, const uint8_t *codes, const uint8_t *scales,
                                 const float *grid, const int32_t *counts, int64_t tokens, int64_t chunks,
                                 int64_t slots) {
    head_codes h;
    if (each) {
        const int64_t *e = each + bh * 6;
        h.codes = (const uint8_t *)(intptr_t)e[0];
        h.scales = (const uint8_t *)(intptr_t)e[1];
        h.grid = (const float *)(intptr_t)e[2];
        h.counts = (const int32_t *)(intptr_t)e[3];
        h.tokens = e[4];
        h.chunks = e[5];
    } else {
        h.codes = codes + bh * tokens * slots;
        h.scales = scales + bh * tokens * 2;
        h.grid = grid + bh * chunks * 4;
        h.counts = counts ? counts + bh * chunks : 0;
        h.tokens = tokens;
        h.chunks = chunks;
    }
    return h;
}

/* 4 float lanes: the query rows of one table entry (rows padded to a multiple of 4). */
typedef float v4 __attribute__((vector_size(16)));

static inline v4 load4(const float *p) { v4 v; memcpy(&v, p, sizeof v); return v; }

/* NSNQuant scores:
 *   out[bh, r, t] (row stride ld) = a_t * (sum_s T[s, code0_s, r] + beta * sum_s T[s, code1_s, r])
 *                                 + b_t * qmu[bh, r, chunk(t)]
 * with T[s, k, r] = <rotated[bh, r, s * 8 : s * 8 + 8], vectors[k]>, built by each thread into
 * its own table of scratch (parts, subs * book * padded rows floats, rows innermost: one 16-byte
 * load reads four rows' entries) when its next item is another head's. rotated (bh, rows, subs * 8): the Hadamard-rotated query rows; codes (bh, tokens,
 * stages * subs), stage-major; scales (bh, tokens, 2) uint8 log codes of (a, b); grid (bh, chunks,
 * 4) their (lo, step) pairs; counts (bh, chunks) int32 or NULL; each: see head_codes (then qmu's
 * rows are `chunks` long, head bh's first each[bh].chunks of them used, and out's first
 * each[bh].tokens columns written). */
void nsn_scores(const float *restrict rotated, const float *restrict vectors, float *restrict scratch,
                const uint8_t *restrict codes, const uint8_t *restrict scales, const float *restrict grid,
                const int32_t *restrict counts, int64_t chunk_len, const float *restrict qmu, float beta,
                float *restrict out, int64_t ld, int64_t bh_count, int64_t rows, int64_t tokens, int64_t stages,
                int64_t subs, int64_t book, int64_t chunks, int64_t parts, const int64_t *restrict each) {
    const int64_t slots = stages * subs, padded = (rows + 3) / 4 * 4, quads = padded / 4;
    const int64_t dim = subs * 8, table = subs * book * padded;
#pragma omp parallel num_threads(parts) if (parts > 1)
    {
#ifdef _OPENMP
    float *tables = scratch + omp_get_thread_num() * table;
#else
    float *tables = scratch;
#endif
    int64_t built = -1; /* the head whose table this thread holds */
#pragma omp for schedule(static)
    for (int64_t item = 0; item < bh_count * parts; ++item) {
        const int64_t bh = item / parts;
        const head_codes h = head_at(each, bh, codes, scales, grid, counts, tokens, chunks, slots);
        int64_t c_begin, c_end;
        part_range(h.chunks, parts, item % parts, &c_begin, &c_end);
        if (bh != built) {
            const float *rot = rotated + bh * rows * dim;
            for (int64_t s = 0; s < subs; ++s)
                for (int64_t k = 0; k < book; ++k) {
                    const v8 v = load8(vectors + k * 8);
                    float *entry = tables + (s * book + k) * padded;
                    for (int64_t r = 0; r < padded; ++r) entry[r] = r < rows ? sum8(load8(rot + r * dim + s * 8) * v) : 0.f;
                }
            built = bh;
        }
        float a[BLOCK], b[BLOCK];
        int32_t index[MAX_SLOTS];
        const float *mus = qmu + bh * rows * chunks;
        float *dst = out + bh * rows * ld;
        int64_t first = chunk_first(h.counts, c_begin, chunk_len, h.tokens);
        for (int64_t c = c_begin; c < c_end && first < h.tokens; ++c) {
            const int64_t size = chunk_size(h.counts, c, chunk_len, h.tokens, first);
            for (int64_t block = first; block < first + size; block += BLOCK) {
                const int64_t n = first + size - block < BLOCK ? first + size - block : BLOCK;
                decode_scales(h.scales + 2 * block, h.grid + c * 4, n, a, b);
                for (int64_t i = 0; i < n; ++i) {
                    const int64_t t = block + i;
                    const uint8_t *ct = h.codes + t * slots;
                    for (int64_t st = 0; st < stages; ++st)
                        for (int64_t s = 0; s < subs; ++s)
                            index[st * subs + s] = (int32_t)((s * book + ct[st * subs + s]) * padded);
                    for (int64_t q = 0; q < quads; ++q) {
                        /* two sums a stage (shorter add chains); four rows a vector */
                        v4 d0 = {0}, d1 = {0}, e0 = {0}, e1 = {0};
                        const float *tq = tables + 4 * q;
                        int64_t s = 0;
                        for (; s + 1 < subs; s += 2) { d0 += load4(tq + index[s]); d1 += load4(tq + index[s + 1]); }
                        if (s < subs) d0 += load4(tq + index[s]);
                        if (stages == 2) {
                            const int32_t *i2 = index + subs;
                            for (s = 0; s + 1 < subs; s += 2) { e0 += load4(tq + i2[s]); e1 += load4(tq + i2[s + 1]); }
                            if (s < subs) e0 += load4(tq + i2[s]);
                        }
                        const v4 dot = (d0 + d1) + beta * (e0 + e1);
                        for (int64_t k = 0; k < 4 && 4 * q + k < rows; ++k) {
                            const int64_t r = 4 * q + k;
                            dst[r * ld + t] = a[i] * dot[k] + b[i] * mus[r * chunks + c];
                        }
                    }
                }
            }
            first += size;
        }
    }
    }
}

/* NSNQuant values, in the rotated domain (8-dim sub-vectors):
 *   out[bh, r, s * 8 + e] = sum_t w[bh, r, t] * a_t * (vectors[code0, e] + beta * vectors[code1, e])
 *   chunk_w[bh, r, c]     = sum_{t in chunk c} w[bh, r, t] * b_t   (the caller multiplies by the shifts)
 * w (bh, rows, tokens) with row stride ld; codes, scales, grid, counts, each as nsn_scores (with
 * each, chunk_w's rows are `chunks` long and zero past each[bh].chunks). out is
 * (parts, bh, rows, subs * 8): each item's sum over its chunks (the caller adds the parts).
 * Per block of tokens: each token's gain w * a per row first, then, a sub-vector and four rows
 * at a time, the sum over the block's tokens in registers (no store per token). */
#define ROW_TILE 4
void nsn_values(const float *restrict w, int64_t ld, const uint8_t *restrict codes, const uint8_t *restrict scales,
                const float *restrict grid, const int32_t *restrict counts, int64_t chunk_len,
                const float *restrict vectors, float beta, float *restrict out, float *restrict chunk_w,
                int64_t bh_count, int64_t rows, int64_t tokens, int64_t stages, int64_t subs, int64_t chunks,
                int64_t parts, const int64_t *restrict each) {
    const int64_t slots = stages * subs, dim = subs * 8;
    const int64_t tiles = (rows + ROW_TILE - 1) / ROW_TILE;
#pragma omp parallel for schedule(static) num_threads(parts) if (parts > 1)
    for (int64_t item = 0; item < bh_count * parts; ++item) {
        const int64_t bh = item / parts, part = item % parts;
        const head_codes h = head_at(each, bh, codes, scales, grid, counts, tokens, chunks, slots);
        int64_t c_begin, c_end;
        part_range(h.chunks, parts, part, &c_begin, &c_end);
        float a[BLOCK], b[BLOCK], gain[(MAX_ROWS + ROW_TILE) * BLOCK];
        const float *wr = w + bh * rows * ld;
        float *acc = out + (part * bh_count + bh) * rows * dim;
        float *cw = chunk_w + bh * rows * chunks;
        memset(acc, 0, sizeof(float) * rows * dim);
        for (int64_t r = 0; r < rows; ++r) {
            memset(cw + r * chunks + c_begin, 0, sizeof(float) * (c_end - c_begin));
            if (part == parts - 1) /* chunk weights past the head's chunks (each: rows of other lengths) */
                memset(cw + r * chunks + h.chunks, 0, sizeof(float) * (chunks - h.chunks));
        }
        /* rows past the last are padding with zero gain: a tile always has ROW_TILE rows */
        memset(gain + rows * BLOCK, 0, sizeof(float) * (tiles * ROW_TILE - rows) * BLOCK);
        int64_t first = chunk_first(h.counts, c_begin, chunk_len, h.tokens);
        for (int64_t c = c_begin; c < c_end && first < h.tokens; ++c) {
            const int64_t size = chunk_size(h.counts, c, chunk_len, h.tokens, first);
            for (int64_t block = first; block < first + size; block += BLOCK) {
                const int64_t n = first + size - block < BLOCK ? first + size - block : BLOCK;
                decode_scales(h.scales + 2 * block, h.grid + c * 4, n, a, b);
                for (int64_t r = 0; r < rows; ++r) {
                    const float *wt = wr + r * ld + block;
                    float *g = gain + r * BLOCK, sum_b = 0.f;
                    for (int64_t i = 0; i < n; ++i) { g[i] = wt[i] * a[i]; sum_b += wt[i] * b[i]; }
                    cw[r * chunks + c] += sum_b;
                }
                const uint8_t *cb = h.codes + block * slots;
                for (int64_t tile = 0; tile < tiles; ++tile) {
                    const float *g0 = gain + tile * ROW_TILE * BLOCK;
                    for (int64_t s = 0; s < subs; ++s) {
                        v8 acc0 = {0}, acc1 = {0}, acc2 = {0}, acc3 = {0};
                        for (int64_t i = 0; i < n; ++i) {
                            const uint8_t *ct = cb + i * slots;
                            v8 v = load8(vectors + (int64_t)ct[s] * 8);
                            if (stages == 2) v += beta * load8(vectors + (int64_t)ct[subs + s] * 8);
                            acc0 += g0[i] * v;
                            acc1 += g0[BLOCK + i] * v;
                            acc2 += g0[2 * BLOCK + i] * v;
                            acc3 += g0[3 * BLOCK + i] * v;
                        }
                        const v8 tile_acc[ROW_TILE] = {acc0, acc1, acc2, acc3};
                        for (int64_t k = 0; k < ROW_TILE && tile * ROW_TILE + k < rows; ++k) {
                            float *o = acc + (tile * ROW_TILE + k) * dim + s * 8;
                            store8(o, load8(o) + tile_acc[k]);
                        }
                    }
                }
            }
            first += size;
        }
    }
}

/* KIVI's packing (effllm.kv.quantizers.pack): with n = dim * bits / 8, code j sits in byte
 * j % n at bits (j / n) * bits. */
static inline void unpack_row(const uint8_t *restrict packed, int64_t dim, int64_t bits, float *restrict out) {
    const int64_t n = dim * bits / 8, planes = 8 / bits;
    const uint8_t mask = (uint8_t)((1u << bits) - 1u);
    for (int64_t p = 0; p < planes; ++p) {
        const int shift = (int)(p * bits);
        for (int64_t i = 0; i < n; ++i) out[p * n + i] = (float)((packed[i] >> shift) & mask);
    }
}

/* One head's KIVI block. With `each` NULL, every head's block lies in the arrays passed,
 * `tokens` tokens a head; otherwise (rows of different lengths, each in tensors of its own) head
 * bh's is each[bh * 4 ..] = {codes, scale, minimum (addresses), tokens} (0 tokens: none).
 * `per_token` scale / minimum rows: `tokens` of them a head (values), else tokens / group (keys). */
typedef struct {
    const uint8_t *codes;
    const float *scale, *minimum;
    int64_t tokens;
} kivi_block;

static inline kivi_block kivi_block_at(const int64_t *each, int64_t bh, const uint8_t *codes, const float *scale,
                                       const float *minimum, int64_t tokens, int64_t n, int64_t scale_row,
                                       int64_t group, int per_token) {
    kivi_block b;
    if (each) {
        const int64_t *e = each + bh * 4;
        b.codes = (const uint8_t *)(intptr_t)e[0];
        b.scale = (const float *)(intptr_t)e[1];
        b.minimum = (const float *)(intptr_t)e[2];
        b.tokens = e[3];
    } else {
        const int64_t scale_rows = per_token ? tokens : tokens / group;
        b.codes = codes + bh * tokens * n;
        b.scale = scale + bh * scale_rows * scale_row;
        b.minimum = minimum + bh * scale_rows * scale_row;
        b.tokens = tokens;
    }
    return b;
}

/* KIVI key scores over one block: keys are code * scale[g, d] + minimum[g, d] per channel,
 * group tokens a scale, so q . k = (q * scale[g]) . code + q . minimum[g].
 * rows (bh, R, dim); codes (bh, tokens, dim * bits / 8); scale/minimum (bh, tokens / group, dim);
 * out[bh, r, t] with row stride ld. dim is a multiple of 8. each: see kivi_block (out's first
 * each[bh].tokens columns written). */
void kivi_key_scores(const float *restrict rows_q, const uint8_t *restrict codes, const float *restrict scale,
                     const float *restrict minimum, float *restrict out, int64_t ld, int64_t bh_count,
                     int64_t rows, int64_t tokens, int64_t dim, int64_t bits, int64_t group, int64_t parts,
                     const int64_t *restrict each) {
    const int64_t n = dim * bits / 8;
#pragma omp parallel for schedule(static) num_threads(parts) if (parts > 1)
    for (int64_t item = 0; item < bh_count * parts; ++item) {
        const int64_t bh = item / parts;
        const kivi_block blk = kivi_block_at(each, bh, codes, scale, minimum, tokens, n, dim, group, 0);
        int64_t g_begin, g_end;
        part_range(blk.tokens / group, parts, item % parts, &g_begin, &g_end);
        float folded[MAX_ROWS * MAX_DIM], offset[MAX_ROWS], c[MAX_DIM];
        const float *q = rows_q + bh * rows * dim;
        float *dst = out + bh * rows * ld;
        for (int64_t g = g_begin; g < g_end; ++g) {
            const float *sg = blk.scale + g * dim, *mg = blk.minimum + g * dim;
            for (int64_t r = 0; r < rows; ++r) {
                v8 off = {0};
                for (int64_t d = 0; d < dim; d += 8) {
                    const v8 qv = load8(q + r * dim + d);
                    store8(folded + r * dim + d, qv * load8(sg + d));
                    off += qv * load8(mg + d);
                }
                offset[r] = sum8(off);
            }
            for (int64_t t = g * group; t < (g + 1) * group; ++t) {
                unpack_row(blk.codes + t * n, dim, bits, c);
                for (int64_t r = 0; r < rows; ++r) {
                    v8 acc = {0};
                    for (int64_t d = 0; d < dim; d += 8) acc += load8(folded + r * dim + d) * load8(c + d);
                    dst[r * ld + t] = sum8(acc) + offset[r];
                }
            }
        }
    }
}

/* KIVI values over one block: values are code * scale[t, g] + minimum[t, g] per token, group
 * channels a scale. out[bh, r, :] += sum_t w[bh, r, t] * value_t.
 * w (bh, R, tokens) with row stride ld; codes (bh, tokens, dim * bits / 8);
 * scale/minimum (bh, tokens, dim / group); out (parts, bh, R, dim): each item adds its tokens
 * into its part (the caller adds the parts). group is a multiple of 8. each: see kivi_block
 * (w's first each[bh].tokens columns read). */
void kivi_values(const float *restrict w, int64_t ld, const uint8_t *restrict codes, const float *restrict scale,
                 const float *restrict minimum, float *restrict out, int64_t bh_count, int64_t rows,
                 int64_t tokens, int64_t dim, int64_t bits, int64_t group, int64_t parts,
                 const int64_t *restrict each) {
    const int64_t n = dim * bits / 8, groups = dim / group;
#pragma omp parallel for schedule(static) num_threads(parts) if (parts > 1)
    for (int64_t item = 0; item < bh_count * parts; ++item) {
        const int64_t bh = item / parts, part = item % parts;
        const kivi_block blk = kivi_block_at(each, bh, codes, scale, minimum, tokens, n, groups, group, 1);
        int64_t t_begin, t_end;
        part_range(blk.tokens, parts, part, &t_begin, &t_end);
        float c[MAX_DIM];
        const float *wr = w + bh * rows * ld;
        float *acc = out + (part * bh_count + bh) * rows * dim;
        for (int64_t t = t_begin; t < t_end; ++t) {
            const float *st = blk.scale + t * groups, *mt = blk.minimum + t * groups;
            unpack_row(blk.codes + t * n, dim, bits, c);
            for (int64_t r = 0; r < rows; ++r) {
                const float wt = wr[r * ld + t];
                for (int64_t g = 0; g < groups; ++g) {
                    const float ws = wt * st[g], wm = wt * mt[g];
                    float *o = acc + r * dim + g * group;
                    for (int64_t d = 0; d < group; d += 8) store8(o + d, load8(o + d) + ws * load8(c + g * group + d) + wm);
                }
            }
        }
    }
}

/* NSNQuant encoding of n 8-dim sub-vectors y (n, 8) against the codebook, given transposed
 * (vt: (8, book), book a multiple of 8, so 8 vectors' dot products are 8 fused multiply-adds):
 * stage 1 scores y.c - |c|^2 / 2 (half_norms[k] = |c_k|^2 / 2); one stage: the best. Two
 * stages: for each of the `beam` best stage-1 candidates c1, the best stage-2 score
 * y.c - c1.c - beta |c|^2 / 2 (gram = vectors vectors^T), then the pair with the larger
 * stage-1 + beta * stage-2 score. Exact ties go to the lower index (torch's topk may pick
 * either: the squared error is the same). A sub-vector whose scores are all NaN gets code 0.
 * out (n, stages) int64. The same choices as codebook.encode's torch ops up to the rounding of
 * the dot products (only near-ties can differ). */
#define MAX_BOOK 256
#define MAX_BEAM 8
void nsn_encode(const float *restrict y, const float *restrict vt, const float *restrict half_norms,
                const float *restrict gram, float beta, int64_t n, int64_t book, int64_t stages, int64_t beam,
                int64_t *restrict out) {
    float p[MAX_BOOK], s2[MAX_BOOK];
    const int64_t keep = stages == 1 ? 1 : beam;
    for (int64_t i = 0; i < n; ++i) {
        const float *yi = y + i * 8;
        int64_t top[MAX_BEAM];
        float top_score[MAX_BEAM];
        /* every slot, not just keep's: top[0] is read even where the compiler cannot see keep >= 1 */
        for (int64_t j = 0; j < MAX_BEAM; ++j) { top[j] = -1; top_score[j] = -__builtin_inff(); }
        for (int64_t k = 0; k < book; k += 8) {
            v8 acc = yi[0] * load8(vt + k);
            for (int64_t d = 1; d < 8; ++d) acc += yi[d] * load8(vt + d * book + k);
            store8(p + k, acc);
        }
        for (int64_t k = 0; k < book; ++k) {
            const float s = p[k] - half_norms[k];
            if (s > top_score[keep - 1]) { /* insert, keeping earlier (lower) indices ahead on ties */
                int64_t j = keep - 1;
                while (j > 0 && s > top_score[j - 1]) { top_score[j] = top_score[j - 1]; top[j] = top[j - 1]; --j; }
                top_score[j] = s;
                top[j] = k;
            }
        }
        if (top[0] < 0) { /* NaN scores: nothing compared larger */
            for (int64_t st = 0; st < stages; ++st) out[stages * i + st] = 0;
            continue;
        }
        if (stages == 1) { out[i] = top[0]; continue; }
        int64_t best1 = top[0], best2 = 0;
        float best_total = -__builtin_inff();
        for (int64_t j = 0; j < keep && top[j] >= 0; ++j) {
            const float *g = gram + top[j] * book;
            v8 high = {-__builtin_inff(), -__builtin_inff(), -__builtin_inff(), -__builtin_inff(),
                       -__builtin_inff(), -__builtin_inff(), -__builtin_inff(), -__builtin_inff()};
            for (int64_t k = 0; k < book; k += 8) {
                const v8 s = load8(p + k) - load8(g + k) - beta * load8(half_norms + k);
                store8(s2 + k, s);
                const i8v more = s > high; /* lanes all ones where s is larger */
                high = (v8)((more & (i8v)s) | (~more & (i8v)high));
            }
            float second = high[0];
            for (int l = 1; l < 8; ++l) second = high[l] > second ? high[l] : second;
            int64_t arg = 0;
            while (arg < book - 1 && s2[arg] != second) ++arg; /* the first index holding the maximum */
            const float total = top_score[j] + beta * second;
            if (total > best_total) { best_total = total; best1 = top[j]; best2 = arg; }
        }
        out[2 * i] = best1;
        out[2 * i + 1] = best2;
    }
}

/* ---- full-precision rows of different lengths (kv/ragged.py), read where they lie ---------- */

/* One decode step of `groups` query heads per row over `rows` rows of full-precision keys and
 * values, row r holding lengths[r] tokens (a ragged layer: one (batch row, KV head) a row).
 * Token t of row r lies at k + (blk * slots + off) * dim, where blk = table[r * max_blocks + t /
 * slots] and off = t % slots with a block table (pages of `slots` tokens), else blk = r and
 * off = t (one tensor, rows `slots` apart); v likewise. q (rows, groups, dim) float32;
 * scores (rows, groups, width) float32 scratch, width >= every length rounded up to 8;
 * out (rows, groups, dim); mass (rows, width) or NULL: the probability each token received,
 * summed over the row's query heads, zero past its length. softcap > 0 caps the logits
 * (softcap * tanh(s / softcap)). A row of no tokens gets zeros. dim is a multiple of 8. */
void rows_decode(const float *restrict q, const float *restrict k, const float *restrict v,
                 const int32_t *restrict table, const int32_t *restrict lengths, int64_t rows, int64_t groups,
                 int64_t dim, int64_t slots, int64_t max_blocks, float scale, float softcap,
                 float *restrict scores, int64_t width, float *restrict out, float *restrict mass, int64_t parts) {
#pragma omp parallel for schedule(static) num_threads(parts) if (parts > 1)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = lengths[r];
        const float *qr = q + r * groups * dim;
        float *sr = scores + r * groups * width, *outr = out + r * groups * dim;
        memset(outr, 0, (size_t)(groups * dim) * sizeof(float));
        if (mass != NULL) memset(mass + r * width, 0, (size_t)width * sizeof(float));
        if (n <= 0) continue;
        for (int64_t t = 0; t < n; ++t) {
            const int64_t blk = table != NULL ? table[r * max_blocks + t / slots] : r;
            const float *kt = k + (blk * slots + (table != NULL ? t % slots : t)) * dim;
            for (int64_t g = 0; g < groups; ++g) {
                v8 acc = {0};
                for (int64_t d = 0; d < dim; d += 8) acc += load8(qr + g * dim + d) * load8(kt + d);
                float s = sum8(acc) * scale;
                if (softcap > 0) s = softcap * tanhf(s / softcap);
                sr[g * width + t] = s;
            }
        }
        for (int64_t g = 0; g < groups; ++g) {
            float *sg = sr + g * width;
            float top = -__builtin_inff();
            int broken = 0;
            for (int64_t t = 0; t < n; ++t) {
                top = sg[t] > top ? sg[t] : top;
                broken |= sg[t] != sg[t];
            }
            if (broken || !isfinite(top)) {
                /* a NaN logit, or an infinite largest one: NaN probabilities, so this head's output and the
                 * row's mass are NaN, as torch's softmax makes them */
                for (int64_t t = 0; t < n; ++t) sg[t] = __builtin_nanf("");
                continue;
            }
            const float inv = 1.f / exp_in_place(sg, n, top);
            for (int64_t t = 0; t < n; ++t) sg[t] *= inv;
        }
        for (int64_t t = 0; t < n; ++t) {
            const int64_t blk = table != NULL ? table[r * max_blocks + t / slots] : r;
            const float *vt = v + (blk * slots + (table != NULL ? t % slots : t)) * dim;
            for (int64_t g = 0; g < groups; ++g) {
                const float p = sr[g * width + t];
                float *og = outr + g * dim;
                for (int64_t d = 0; d < dim; d += 8) store8(og + d, load8(og + d) + p * load8(vt + d));
            }
            if (mass != NULL) {
                float m = 0;
                for (int64_t g = 0; g < groups; ++g) m += sr[g * width + t];
                mass[r * width + t] = m;
            }
        }
    }
}

/* Softmax of rows of float32 logits in place, each row over its own range of visible keys, with
 * the per-key statistics the KV scorers take (kernels/scores.py's explicit softmax, on CPU).
 *
 * heads = batch * kv_heads; head i's rows begin at scores + (i / kv_heads) * stride_b
 * + (i % kv_heads) * stride_h, row r at + r * stride_r, `width` logits each. A head's rows are
 * (group g, query q) pairs, r = g * queries + q. Row (b, q) sees keys j with lo <= j < hi
 * (lo/hi: (lo_batch, queries) int32, lo_batch 1 or batch) where key_valid (batch, width) uint8
 * is nonzero (NULL: every key).
 * write: the probabilities replace the logits (0 at keys the row does not see); else the row
 * is left as scratch. lse (heads, rows) float32 or NULL: the natural log-sum-exp.
 * Rows with no visible key: probabilities 0, lse -inf, add nothing. A NaN logit among the
 * visible ones: the row's probabilities and lse NaN, its head's mass and peak NaN. A +inf one (an
 * overflow), as torch's exp(x - lse) gives: lse +inf, probabilities (and mass, peak) NaN at the
 * +inf logits, 0 elsewhere.
 * mass / peak (heads, groups, width) float32 or NULL: each group's sum / largest probability
 * per key over its rows with query_valid (batch, queries) uint8 nonzero (NULL: every row);
 * the caller reduces over the groups. Parallel over (head, group) items. */
void softmax_rows(float *restrict scores, int64_t heads, int64_t kv_heads, int64_t groups, int64_t queries,
                  int64_t width, int64_t stride_b, int64_t stride_h, int64_t stride_r,
                  const int32_t *restrict lo, const int32_t *restrict hi, int64_t lo_batch,
                  const uint8_t *restrict key_valid, const uint8_t *restrict query_valid, int64_t write,
                  float *restrict lse, float *restrict mass, float *restrict peak, int64_t parts) {
    const float ninf = -__builtin_inff();
    const v8 ninf8 = {ninf, ninf, ninf, ninf, ninf, ninf, ninf, ninf};
#pragma omp parallel for schedule(static) num_threads(parts) if (parts > 1)
    for (int64_t item = 0; item < heads * groups; ++item) {
        const int64_t head = item / groups, g = item % groups, b = head / kv_heads;
        float *base = scores + b * stride_b + (head % kv_heads) * stride_h;
        float *pm = mass != NULL ? mass + item * width : NULL, *pk = peak != NULL ? peak + item * width : NULL;
        if (pm != NULL) memset(pm, 0, (size_t)width * sizeof(float));
        if (pk != NULL) memset(pk, 0, (size_t)width * sizeof(float));
        int head_nan = 0;
        for (int64_t q = 0; q < queries; ++q) {
            const int64_t r = g * queries + q, at = (lo_batch > 1 ? b : 0) * queries + q;
            float *s = base + r * stride_r;
            int64_t a = lo[at] > 0 ? lo[at] : 0, z = hi[at] < width ? hi[at] : width;
            if (z < a) z = a;
            const uint8_t *valid = key_valid != NULL ? key_valid + b * width : NULL;
            const int counted = query_valid == NULL || query_valid[b * queries + q];
            /* pass 1: hidden keys to -inf, the largest logit, NaN */
            v8 top8 = ninf8;
            i8v bad8 = {0};
            int64_t j = a;
            for (; j + 8 <= z; j += 8) {
                v8 x = load8(s + j);
                if (valid != NULL) {
                    i8v keep;
                    for (int l = 0; l < 8; ++l) keep[l] = valid[j + l] ? -1 : 0;
                    x = select8(keep, x, ninf8);
                    store8(s + j, x);
                }
                bad8 |= x != x;
                top8 = select8(x > top8, x, top8);
            }
            float top = ninf;
            int bad = 0;
            for (int l = 0; l < 8; ++l) {
                top = top8[l] > top ? top8[l] : top;
                bad |= bad8[l] != 0;
            }
            for (; j < z; ++j) {
                if (valid != NULL && !valid[j]) s[j] = ninf;
                top = s[j] > top ? s[j] : top;
                bad |= s[j] != s[j];
            }
            if (bad) {
                if (write) for (int64_t t = 0; t < width; ++t) s[t] = __builtin_nanf("");
                if (lse != NULL) lse[head * groups * queries + r] = __builtin_nanf("");
                head_nan |= counted;
                continue;
            }
            if (top == __builtin_inff()) { /* as torch's exp(x - lse): NaN at the +inf logits, 0 elsewhere */
                for (int64_t t = a; t < z; ++t) {
                    if (s[t] != top) continue;
                    if (counted && pm != NULL) pm[t] = __builtin_nanf("");
                    if (counted && pk != NULL) pk[t] = __builtin_nanf("");
                }
                if (write) for (int64_t t = 0; t < width; ++t) s[t] = t >= a && t < z && s[t] == top ? __builtin_nanf("") : 0.f;
                if (lse != NULL) lse[head * groups * queries + r] = top;
                continue;
            }
            if (top == ninf) { /* no visible key */
                if (write) memset(s, 0, (size_t)width * sizeof(float));
                if (lse != NULL) lse[head * groups * queries + r] = ninf;
                continue;
            }
            /* pass 2: exp, kept in place, and the total */
            const float sum = exp_in_place(s + a, z - a, top), inv = 1.f / sum;
            if (lse != NULL) lse[head * groups * queries + r] = top + logf(sum);
            /* pass 3: normalise, and the statistics */
            if (counted && pm != NULL) for (j = a; j < z; ++j) pm[j] += s[j] * inv;
            if (counted && pk != NULL) for (j = a; j < z; ++j) { const float p = s[j] * inv; pk[j] = p > pk[j] ? p : pk[j]; }
            if (write) {
                for (j = a; j < z; ++j) s[j] *= inv;
                memset(s, 0, (size_t)a * sizeof(float));
                memset(s + z, 0, (size_t)(width - z) * sizeof(float));
            }
        }
        if (head_nan) {
            for (int64_t t = 0; t < width; ++t) {
                if (pm != NULL) pm[t] = __builtin_nanf("");
                if (pk != NULL) pk[t] = __builtin_nanf("");
            }
        }
    }
}
