// Attention of a few new query tokens over a KV cache: the attention step of decode.
//
// torch's CPU scaled_dot_product_attention is built for long query blocks; for one query token in bf16
// it measured 1.5-2.9 ms per layer at a 576-token context (2 and 1 threads), while the whole layer's
// weights stream in about 1 ms. Here each task takes one key/value head (all the query heads that share
// it, over all new tokens: the rows) and a chunk of the cache, so every cached key and value is read
// once per step whatever the group size, and keys no row may see (the mask's padding, a static cache's
// empty tail, the causal future) are never read. Chunks of one head merge by their softmax maxima
// (log-sum-exp), so a long context spreads over every worker. Everything is accumulated in fp32; the
// order of additions depends on the chunking, which depends on the thread count.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "panel_kernels.h"
#include "thread_pool.h"

namespace moetier_kernels {
inline namespace MOETIER_NS {

// New tokens per call: the rows of a task's score buffer are this times the group size.
constexpr int ATTENTION_MAX_TOKENS = 64;

enum AttentionMask { MASK_NONE = 0, MASK_KEEP = 1, MASK_BIAS = 2 };

struct AttentionArgs {
    int B = 0, Hq = 0, Hkv = 0, T = 0, S = 0, D = 0, Dv = 0;
    bool bf16 = false;  // q, k, v and out: bf16 bits, else fp32
    // Byte strides of batch, head and token (the last dimension is contiguous).
    const uint8_t* q = nullptr;
    int64_t q_sb = 0, q_sh = 0, q_st = 0;
    const uint8_t* k = nullptr;
    int64_t k_sb = 0, k_sh = 0, k_ss = 0;
    const uint8_t* v = nullptr;
    int64_t v_sb = 0, v_sh = 0, v_ss = 0;
    uint8_t* out = nullptr;  // [B, T, Hq, Dv], contiguous: the layout the output projection reads
    float scale = 1.f;
    int mask_kind = MASK_NONE;  // KEEP: bytes, nonzero = attend; BIAS: fp32 added to the scores
    const uint8_t* mask = nullptr;
    int64_t m_sb = 0, m_sh = 0, m_st = 0;  // byte strides (m_sh 0: one mask for every head); keys contiguous
    bool causal = false;                   // new token t sees the keys up to S - T + t
};

namespace attention_detail {

constexpr int MAX_CHUNK = 1024;  // keys per task: bounds the per-task score buffer
constexpr int MIN_CHUNK = 64;    // below this, a chunk's merge costs more than it spreads
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline int round16(int n) { return (n + 15) & ~15; }

// n values (bf16 bits or fp32) -> fp32 dst[round16(n)], zero-padded (dot products run over whole vectors).
MOE_INLINE void load_row(const uint8_t* src, bool bf16, int n, float scale, float* dst) {
    int i = 0;
    if (bf16) {
        const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#if defined(__AVX512F__)
        const __m512 f = _mm512_set1_ps(scale);
        for (; i + 16 <= n; i += 16) {
            const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
            _mm512_storeu_ps(dst + i, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), f));
        }
#else
        const __m256 f = _mm256_set1_ps(scale);
        for (; i + 8 <= n; i += 8) {
            const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
            _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)), f));
        }
#endif
        for (; i < n; ++i) dst[i] = bf16_to_f32(s[i]) * scale;
    } else {
        const float* s = reinterpret_cast<const float*>(src);
        for (; i < n; ++i) dst[i] = s[i] * scale;
    }
    for (; i < round16(n); ++i) dst[i] = 0.f;
}

// exp(s - m), exactly 0 where s is -inf: vexp clamps its argument, and a masked key must weigh nothing,
// not exp(-87).
MOE_INLINE V exp_or_zero(V s, V m) {
    const V e = vexp(vsub(s, m));
#if defined(__AVX512F__)
    const __mmask16 masked = _mm512_cmp_ps_mask(s.v, _mm512_set1_ps(NEG_INF), _CMP_EQ_OQ);
    return {_mm512_maskz_mov_ps(__mmask16(~masked), e.v)};
#else
    const __m256 ninf = _mm256_set1_ps(NEG_INF);
    return {_mm256_andnot_ps(_mm256_cmp_ps(s.a, ninf, _CMP_EQ_OQ), e.a),
            _mm256_andnot_ps(_mm256_cmp_ps(s.b, ninf, _CMP_EQ_OQ), e.b)};
#endif
}

// Lanes j of v where vis[j] is nonzero, -inf elsewhere (a select, not an addition: a key this row does not
// see may hold NaN that another row's score read).
MOE_INLINE V visible_or_neg_inf(V v, const uint8_t* vis) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(vis));
#if defined(__AVX512F__)
    const __mmask16 seen = _mm512_test_epi32_mask(_mm512_cvtepu8_epi32(bytes), _mm512_set1_epi32(0xFF));
    return {_mm512_mask_blend_ps(seen, _mm512_set1_ps(NEG_INF), v.v)};
#else
    const __m256 ninf = _mm256_set1_ps(NEG_INF);
    const __m256i zero = _mm256_setzero_si256();
    const __m256 lo = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_cvtepu8_epi32(bytes), zero));
    const __m256 hi = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8)), zero));
    return {_mm256_blendv_ps(v.a, ninf, lo), _mm256_blendv_ps(v.b, ninf, hi)};
#endif
}

// One task's result for each of its rows: the chunk's score maximum, its sum of exp(score - max) and
// the unnormalized weighted sum of values.
struct Partial {
    float* max;
    float* sum;
    float* acc;  // [rows][Dvp]
};

#if defined(__AVX512F__)
// 16 vectors of partial sums -> out[j] = the sum of acc[j]'s lanes: one reduction tree instead of a
// horizontal sum per vector.
MOE_INLINE void reduce16(const __m512* acc, float* out) {
    // Each level halves the vectors: pairs (x, y) -> lanes of x's partial sums beside y's.
    __m512 l1[8], l2[4], l3[2];
    for (int j = 0; j < 8; ++j) {
        const __m512 x = acc[2 * j], y = acc[2 * j + 1];
        l1[j] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
    }  // l1[j]: 128-bit blocks [x x y y]
    for (int j = 0; j < 4; ++j) {
        const __m512 x = l1[2 * j], y = l1[2 * j + 1];
        l2[j] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xDD));
    }  // l2[j]: blocks [k0 k1 k2 k3] of vectors 4j..4j+3, 4 partial sums each
    for (int j = 0; j < 2; ++j) {
        const __m512 x = l2[2 * j], y = l2[2 * j + 1];
        l3[j] = _mm512_add_ps(_mm512_shuffle_ps(x, y, 0x44), _mm512_shuffle_ps(x, y, 0xEE));
    }  // l3[j]: block b holds [x_b x_b y_b y_b] partial pairs
    const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(l3[0], l3[1], 0x88), _mm512_shuffle_ps(l3[0], l3[1], 0xDD));
    // Lane l of r holds vector (l % 4) * 4 + l / 4: a 4x4 transpose, its own inverse.
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_storeu_ps(out, _mm512_permutexvar_ps(order, r));
}
#endif

// Scores of one query row against a block of 16 keys (kblk: 16 rows of Dp floats) into out[16].
MOE_INLINE void scores16(const float* q, const float* kblk, int Dp, float* out) {
#if defined(__AVX512F__)
    __m512 acc[16];
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
    for (int i = 0; i < Dp; i += 16) {
        const __m512 qv = _mm512_loadu_ps(q + i);
        for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(kblk + size_t(j) * Dp + i), acc[j]);
    }
    reduce16(acc, out);
#else
    // Two blocks of 8 keys, one ymm accumulator each, reduced together by two levels of vhaddps (a
    // horizontal sum per key was most of a decode step's attention on AVX2).
    for (int h = 0; h < 2; ++h) {
        const float* kb = kblk + size_t(8 * h) * Dp;
        __m256 acc[8];
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
        for (int i = 0; i < Dp; i += 8) {
            const __m256 qv = _mm256_loadu_ps(q + i);
            for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kb + size_t(j) * Dp + i), acc[j]);
        }
        // Each 128-bit half of u0 holds keys 0-3's partial sums over that half's lanes, u1 keys 4-7's.
        const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
        const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
        _mm256_storeu_ps(out + 8 * h, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                                                    _mm256_permute2f128_ps(u0, u1, 0x31)));
    }
#endif
}

#if MOETIER_HAS_DOT
// The same on bf16 q and keys as they are stored (rows of Dp2 values, a multiple of 32, zero-padded):
// vdpbf16ps multiplies bf16 pairs exactly and accumulates in fp32, as the fp32 path does, without
// widening the keys first. The caller scales the scores.
MOE_INLINE void scores16_bf16(const uint16_t* q, const uint16_t* const* krows, int Dp2, float* out) {
    __m512 acc[16];
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
    for (int i = 0; i < Dp2; i += 32) {
        const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + i);
        for (int j = 0; j < 16; ++j)
            acc[j] = _mm512_dpbf16_ps(acc[j], qv, (__m512bh)_mm512_loadu_si512(krows[j] + i));
    }
    reduce16(acc, out);
}
#endif

// out[Dvp] (+)= sum_j p[j] vblk[j] over n keys, 128 values at a time in registers.
MOE_INLINE void weighted_values(const float* p, const float* vblk, int n, int Dvp, float* out, bool first) {
    constexpr int W = kAvx512 ? 8 : 4;  // vectors per register block (16 zmm or ymm registers of the 32 or 16)
    for (int d = 0; d < Dvp; d += 16 * W) {
        const int vecs = std::min(W, (Dvp - d) / 16);
        V acc[W];
        for (int i = 0; i < W; ++i) acc[i] = (i < vecs && !first) ? vload(out + d + 16 * i) : vzero();
        for (int j = 0; j < n; ++j) {
            if (p[j] == 0.f) continue;  // a key this row does not see (its value may be anything, even NaN)
            const V w = vset1(p[j]);
            const float* row = vblk + size_t(j) * Dvp + d;
            for (int i = 0; i < W; ++i)
                if (i < vecs) acc[i] = vfma(w, vload(row + 16 * i), acc[i]);
        }
        for (int i = 0; i < vecs; ++i) vstore(out + d + 16 * i, acc[i]);
    }
}

}  // namespace attention_detail

// Scores, softmax and the weighted values of rows (token t, query head g * G + j) over keys [s0, s1) of
// key/value head g of sequence b, into `part`. Keys go in blocks of 16: each block's keys (then values)
// are widened to fp32 once and used by every row.
inline void attention_chunk(const AttentionArgs& a, int b, int g, int s0, int s1, attention_detail::Partial part) {
    using namespace attention_detail;
    constexpr int KB = 16;
    const int G = a.Hq / a.Hkv, R = a.T * G, C = s1 - s0;
    const int Dp = round16(a.D), Dvp = round16(a.Dv);
    // Per-worker scratch, reached through plain pointers below (every access to a thread_local vector
    // in a shared library is a call).
    thread_local std::vector<float> qbuf_, kv_, scores_;
    thread_local std::vector<uint8_t> used_;
    qbuf_.resize(size_t(R) * Dp);
    kv_.resize(size_t(KB) * std::max(Dp, Dvp));
    scores_.resize(size_t(R) * C);
    used_.resize(C);
    float* const qbuf = qbuf_.data();
    float* const blk = kv_.data();
    float* const scores = scores_.data();
    uint8_t* const used = used_.data();
    auto row_head = [&](int r) { return g * G + r % G; };
    auto row_token = [&](int r) { return r / G; };
#if MOETIER_HAS_DOT
    // bf16 scores on vdpbf16ps: q and keys as stored, in rows of Dp2 (keys read in place when D is a
    // multiple of 32, else copied into zero-padded rows).
    const bool pairs = a.bf16;
    const int Dp2 = (a.D + 31) & ~31;
    thread_local std::vector<uint16_t> qraw_, kpad_;
    const uint16_t* krows[KB];
    if (pairs) {
        qraw_.assign(size_t(R) * Dp2, 0);
        kpad_.assign(size_t(KB + 1) * Dp2, 0);  // row KB: the zero key of a block's unseen slots
        for (int r = 0; r < R; ++r)
            std::memcpy(qraw_.data() + size_t(r) * Dp2,
                        a.q + b * a.q_sb + row_head(r) * a.q_sh + row_token(r) * a.q_st, size_t(a.D) * 2);
    }
    uint16_t* const qraw = qraw_.data();
    uint16_t* const kpad = kpad_.data();
#else
    constexpr bool pairs = false;
#endif
    if (!pairs)
        for (int r = 0; r < R; ++r)
            load_row(a.q + b * a.q_sb + row_head(r) * a.q_sh + row_token(r) * a.q_st, a.bf16, a.D, a.scale,
                     qbuf + size_t(r) * Dp);
    const uint8_t* kb = a.k + b * a.k_sb + g * a.k_sh;
    const uint8_t* vb = a.v + b * a.v_sb + g * a.v_sh;
    const bool all_visible = a.mask_kind == MASK_NONE && !a.causal;
    // Whether row r sees key s, and the mask's bias for it.
    auto visible = [&](int r, int s, float& bias) {
        const int t = row_token(r);
        if (a.causal && s > a.S - a.T + t) return false;
        if (a.mask_kind == MASK_NONE) return true;
        const uint8_t* m = a.mask + b * a.m_sb + row_head(r) * a.m_sh + t * a.m_st;
        if (a.mask_kind == MASK_KEEP) return m[s] != 0;
        bias = reinterpret_cast<const float*>(m)[s];
        return bias != NEG_INF;
    };
    // Visibility differs by row only through the token, unless the mask has one row per head: decided once
    // per (token, key) for a block, not once per query head (a GQA group of 8 checked the mask 8 times).
    const bool per_head = a.mask_kind != MASK_NONE && a.m_sh != 0;
    const int VR = per_head ? R : a.T;
    auto vis_row = [&](int r) { return per_head ? r : row_token(r); };
    thread_local std::vector<uint8_t> vis_;
    thread_local std::vector<float> vbias_;
    vis_.resize(size_t(VR) * KB);
    vbias_.resize(size_t(VR) * KB);
    uint8_t* const vis = vis_.data();
    float* const vbias = vbias_.data();
    for (int c0 = 0; c0 < C; c0 += KB) {
        const int n = std::min(KB, C - c0);
        for (int vr = 0; vr < VR; ++vr)
            for (int j = 0; j < n; ++j) {
                float bias = 0.f;
                vis[vr * KB + j] = all_visible || visible(per_head ? vr : vr * G, s0 + c0 + j, bias);
                vbias[vr * KB + j] = bias;
            }
        bool any_key = false;
        for (int j = 0; j < KB; ++j) {
            bool seen = false;
            if (j < n)
                for (int vr = 0; vr < VR && !seen; ++vr) seen = vis[vr * KB + j];
            if (j < n) used[c0 + j] = seen;
            any_key = any_key || seen;
            const uint8_t* key = kb + int64_t(s0 + c0 + j) * a.k_ss;
#if MOETIER_HAS_DOT
            if (pairs) {
                if (!seen) krows[j] = kpad + size_t(KB) * Dp2;
                else if (a.D == Dp2) krows[j] = reinterpret_cast<const uint16_t*>(key);
                else {
                    std::memcpy(kpad + size_t(j) * Dp2, key, size_t(a.D) * 2);
                    krows[j] = kpad + size_t(j) * Dp2;
                }
                continue;
            }
#endif
            float* row = blk + size_t(j) * Dp;
            if (seen) load_row(key, a.bf16, a.D, 1.f, row);
            else std::fill(row, row + Dp, 0.f);
        }
        for (int r = 0; r < R; ++r) {
            float* sr = scores + size_t(r) * C + c0;
            if (!any_key) {
                std::fill(sr, sr + n, NEG_INF);
                continue;
            }
            alignas(64) float dots[KB];
            float dscale = 1.f;  // the fp32 path's q rows carry the scale already
#if MOETIER_HAS_DOT
            if (pairs) {
                scores16_bf16(qraw + size_t(r) * Dp2, krows, Dp2, dots);
                dscale = a.scale;
            } else
#endif
                scores16(qbuf + size_t(r) * Dp, blk, Dp, dots);
            const int vr = vis_row(r);
            if (n == KB) {
                const V sc = vadd(vmul(vload(dots), vset1(dscale)), vload(vbias + vr * KB));
                vstore(sr, visible_or_neg_inf(sc, vis + vr * KB));
            } else {
                for (int j = 0; j < n; ++j) sr[j] = vis[vr * KB + j] ? dots[j] * dscale + vbias[vr * KB + j] : NEG_INF;
            }
        }
    }
    // Softmax numerators in whole vectors (a scalar pass per key and row, with its serial sum, cost as much
    // as the dot products of a 576-key decode step).
    for (int r = 0; r < R; ++r) {
        float* sr = scores + size_t(r) * C;
        const int C16 = C & ~15;
        V vm = vset1(NEG_INF);
        for (int c = 0; c < C16; c += 16) vm = vmax(vm, vload(sr + c));
        alignas(64) float lanes[16];
        vstore(lanes, vm);
        float m = NEG_INF;
        for (int j = 0; j < 16; ++j) m = std::max(m, lanes[j]);
        for (int c = C16; c < C; ++c) m = std::max(m, sr[c]);
        part.max[r] = m;
        float l = 0.f;
        if (m != NEG_INF) {
            const V mv = vset1(m);
            V vl = vzero();
            for (int c = 0; c < C16; c += 16) {
                const V e = exp_or_zero(vload(sr + c), mv);
                vstore(sr + c, e);
                vl = vadd(vl, e);
            }
            l = vhsum(vl);
            for (int c = C16; c < C; ++c) {
                sr[c] = sr[c] == NEG_INF ? 0.f : std::exp(sr[c] - m);
                l += sr[c];
            }
        } else {
            std::fill(sr, sr + C, 0.f);
        }
        part.sum[r] = l;
    }
    for (int c0 = 0; c0 < C; c0 += KB) {
        const int n = std::min(KB, C - c0);
        for (int j = 0; j < n; ++j) {
            float* row = blk + size_t(j) * Dvp;
            if (used[c0 + j]) load_row(vb + int64_t(s0 + c0 + j) * a.v_ss, a.bf16, a.Dv, 1.f, row);
            else std::fill(row, row + Dvp, 0.f);  // no row sees this key: never read from the cache
        }
        for (int r = 0; r < R; ++r)
            weighted_values(scores + size_t(r) * C + c0, blk, n, Dvp, part.acc + size_t(r) * Dvp, c0 == 0);
    }
    if (C == 0)
        for (int r = 0; r < R; ++r) std::fill(part.acc + size_t(r) * Dvp, part.acc + size_t(r + 1) * Dvp, 0.f);
}

// out[b, t, h, :] for every row; a row that sees no key at all gets zeros (torch's SDPA would give NaN).
inline void decode_attention(ThreadPool& pool, const AttentionArgs& a) {
    using namespace attention_detail;
    const int G = a.Hq / a.Hkv, R = a.T * G;
    const int Dvp = round16(a.Dv);
    const int heads = a.B * a.Hkv;
    // Enough chunks for every worker to have about two tasks, none shorter than MIN_CHUNK or longer
    // than MAX_CHUNK keys.
    int chunks = std::max(1, std::min((a.S + MIN_CHUNK - 1) / MIN_CHUNK, (2 * pool.size() + heads - 1) / heads));
    chunks = std::max(chunks, (a.S + MAX_CHUNK - 1) / MAX_CHUNK);
    chunks = std::max(1, std::min(chunks, a.S));
    const int span = a.S > 0 ? (a.S + chunks - 1) / chunks : 0;
    const int tasks = heads * chunks;
    std::vector<float> maxes(size_t(tasks) * R), sums(size_t(tasks) * R), accs(size_t(tasks) * R * Dvp);
    std::atomic<int> next{0};
    pool.run([&](int) {
        for (int i = next.fetch_add(1); i < tasks; i = next.fetch_add(1)) {
            const int head = i / chunks, chunk = i % chunks;
            const int s0 = std::min(a.S, chunk * span), s1 = std::min(a.S, s0 + span);
            attention_chunk(a, head / a.Hkv, head % a.Hkv, s0, s1,
                            Partial{maxes.data() + size_t(i) * R, sums.data() + size_t(i) * R,
                                    accs.data() + size_t(i) * R * Dvp});
        }
    });
    // Merge each row's chunks: out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c.
    std::vector<float> row(Dvp);
    for (int head = 0; head < heads; ++head) {
        const int b = head / a.Hkv, g = head % a.Hkv;
        for (int r = 0; r < R; ++r) {
            float M = NEG_INF;
            for (int c = 0; c < chunks; ++c) M = std::max(M, maxes[size_t(head * chunks + c) * R + r]);
            std::fill(row.begin(), row.end(), 0.f);
            float L = 0.f;
            if (M != NEG_INF) {
                for (int c = 0; c < chunks; ++c) {
                    const size_t i = size_t(head * chunks + c) * R + r;
                    if (maxes[i] == NEG_INF) continue;
                    const float w = std::exp(maxes[i] - M);
                    L += w * sums[i];
                    const float* acc = accs.data() + i * Dvp;
                    for (int d = 0; d < a.Dv; ++d) row[d] += w * acc[d];
                }
            }
            const float inv = L > 0.f ? 1.f / L : 0.f;
            const int t = r / G, h = g * G + r % G;
            const size_t o = ((size_t(b) * a.T + t) * a.Hq + h) * a.Dv;
            if (a.bf16) {
                uint16_t* out = reinterpret_cast<uint16_t*>(a.out) + o;
                for (int d = 0; d < a.Dv; ++d) out[d] = f32_to_bf16(row[d] * inv);
            } else {
                float* out = reinterpret_cast<float*>(a.out) + o;
                for (int d = 0; d < a.Dv; ++d) out[d] = row[d] * inv;
            }
        }
    }
}

}  // namespace MOETIER_NS
}  // namespace moetier_kernels
