// Micro-kernels: NP weight panels (16 rows each) times M token rows -> out[NP][M][16] in fp32.
//
// gemm_f32: every format, weights dequantized in registers, fp32 FMA. With M <= 4 it is the decode path:
//   each weight byte is loaded once for all of an expert's tokens. Independent partial sums per column
//   phase (NA) keep enough FMAs in flight when M is 1 or 2.
// gemm_bf16dot: vdpbf16ps on the bf16 pair layout; activations rounded to bf16 (prefill).
// gemm_int8dot: vpdpbusd on int8/int4 with activations quantized per token to int8 (prefill, and decode
//   on model-sized rows).
// Formats with mins (w = scale * q - min per row and group, packed_format.h) take MINS = true: the kernels
// sum x * q per group and subtract min * (the group's activation sum), never dequantizing a weight.
#pragma once
#include "packed_format.h"

namespace moetier_kernels {
inline namespace MOETIER_NS {

// Software prefetch of the weight stream into L2 (prefetcht1), this many bytes ahead of the line being
// read: one prefetch per 64-byte line of every step, the lines of a bundle's other panels included (a
// prefill call that reads two panels of four leaves the other two to the next call, from L2).
// Measured on one Zen 5 core, Qwen3 layer, batch 1 (CPU-time GB/s, no prefetch -> 4 KiB): int4_g64
// 20 -> 30, int8 -> 31.5, bf16 30 -> 32.5, fp8 -> 28.7; 8 and 16 KiB were no better, prefetcht0 the
// same. Without it the hardware prefetchers alone left a prefill call (two of a bundle's four panels)
// 30% slower.
#ifndef MOE_PREFETCH_BYTES
#define MOE_PREFETCH_BYTES 4096
#endif
#ifndef MOE_PF_HINT
#define MOE_PF_HINT _MM_HINT_T1
#endif
constexpr int PREFETCH_BYTES = MOE_PREFETCH_BYTES;
// The int4 panels on the vpdpbusd path (int4, q4_0, q4_k, mxfp4) prefetch twice as far: each of their
// bytes holds two weights, so a core spends longer per byte and a line must be asked for earlier.
// Same-run A/B, one thread, Qwen3 layer (2026-11-30): int4_g64 x1.02-1.03, q4_k x1.05-1.07 at 8 KiB,
// while int8 read x0.97-1.00 there and stays at 4 KiB.
constexpr int PREFETCH_BYTES_INT4 = 2 * MOE_PREFETCH_BYTES;
// The `bytes` of the stream starting at p, DIST bytes ahead (one prefetch per 64-byte line).
template <int DIST = PREFETCH_BYTES>
MOE_INLINE void prefetch_stream(const uint8_t* p, int64_t bytes) {
    if constexpr (DIST > 0)
        for (int64_t i = 0; i < bytes; i += LINE)
            _mm_prefetch(reinterpret_cast<const char*>(p) + DIST + i, MOE_PF_HINT);
}

// A K-quant group's 16 row scales d * sc and mins dmin * m from its super-block's d / dmin (exact; sc
// unsigned with mins (q4_k, q5_k), signed without (q6_k)).
MOE_INLINE V k_scales(V d, const Panels& pn, const Geometry& g, int gi, int q) {
    const uint8_t* p = pn.scale_bytes(g, gi, q);
    return vmul(d, g.k4 ? u4_get<false>(p) : g.mins ? u8_get(p) : s8_get(p));
}
MOE_INLINE V k_mins(V dmin, const Panels& pn, const Geometry& g, int gi, int q) {
    const uint8_t* p = pn.min_bytes(g, gi, q);
    return vmul(dmin, g.k4 ? u4_get<true>(p) : u8_get(p));
}

// Panel q's 16 row scales of group gi as fp32, stored as the ScaleKind SK (g.scale_kind; a template
// parameter, so the kernels' group loops carry no per-group dispatch: it cost int4_g64 decode 6%).
template <int SK>
MOE_INLINE V group_scales(const Panels& pn, const Geometry& g, int gi, int q) {
    const uint8_t* p = pn.scale_bytes(g, gi, q);
    if constexpr (SK == SCALE_E8M0) return e8m0_scales(p);
    else if constexpr (SK == SCALE_F16) return f16_get(p);
    else if constexpr (SK == SCALE_K) return k_scales(f16_get(pn.d_f16(g, gi, q)), pn, g, gi, q);
    else return vload(reinterpret_cast<const float*>(p));
}
// The same for the mins of formats with mins.
template <int SK>
MOE_INLINE V group_mins(const Panels& pn, const Geometry& g, int gi, int q) {
    if constexpr (SK == SCALE_K) return k_mins(f16_get(pn.dmin_f16(g, gi, q)), pn, g, gi, q);
    else if constexpr (SK == SCALE_F16) return f16_get(pn.min_bytes(g, gi, q));  // q4_1, q5_1
    else return vload(pn.mins(g, gi, q));
}

// The sum of a vector's 16 lanes.
MOE_INLINE float vhsum(V a) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps(a.v);
#else
    __m256 s = _mm256_add_ps(a.a, a.b);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
#endif
}

// out[q][m][16] = panels q of `pn` times token rows x[m] (fp32, Kp columns), every format, fp32 math.
template <class D, int M, int NP, bool SCALED, bool MINS = false, int SK = SCALE_F32>
void gemm_f32(const Panels& pn, const Geometry& g, const float* const* x, float* out) {
    constexpr int NA = kAvx512 ? (M == 1 ? 4 : M == 2 ? 2 : 1) : (M == 1 ? 2 : 1);
    constexpr int DL = lines_per_call<D>;  // lines per decoder call (a split group's, else 1)
    constexpr int S = DL > 1 || D::UK >= 4 ? 1 : 4 / D::UK;  // calls per step (a group has a multiple of S)
    const float* xr[M];
    for (int m = 0; m < M; ++m) xr[m] = x[m];
    const int64_t ls = pn.stride();
    V acc[NP][M];
    for (int q = 0; q < NP; ++q)
        for (int m = 0; m < M; ++m) acc[q][m] = vzero();
    for (int gi = 0; gi < g.ngroups; ++gi) {
        V scl[NP];
        const uint8_t* p[NP];
        for (int q = 0; q < NP; ++q) {
            if constexpr (SCALED) scl[q] = group_scales<SK>(pn, g, gi, q);
            p[q] = pn.weights(g, gi, q);
        }
        V t[NA][NP][M];
        for (int a = 0; a < NA; ++a)
            for (int q = 0; q < NP; ++q)
                for (int m = 0; m < M; ++m) t[a][q][m] = vzero();
        const int k0 = gi * g.G;
        for (int l = 0; l < g.lines; l += S * DL) {
            const int k = k0 + l / DL * D::UK;
            prefetch_stream(p[0] - pn.q0 * LINE, S * DL * ls);
            for (int q = 0; q < NP; ++q) {
                unroll<S>([&](auto SI) {
                    constexpr int si = decltype(SI)::value;
                    auto fma = [&](auto J, V w) {
                        constexpr int j = si * D::UK + decltype(J)::value;
                        constexpr int a = j % NA;
                        for (int m = 0; m < M; ++m) t[a][q][m] = vfma(w, vset1(xr[m][k + j]), t[a][q][m]);
                    };
                    if constexpr (is_crumbs<D>) D::line(p[q], pn.tail(g, gi, q), fma);
                    else if constexpr (DL > 1) D::line(p[q] + si * ls, ls, fma);
                    else D::line(p[q] + si * ls, fma);
                });
                p[q] += S * DL * ls;
            }
        }
        float xsum[M];  // MINS: the activations' sum over the group's columns (a multiple of 16)
        if constexpr (MINS)
            for (int m = 0; m < M; ++m) {
                V v = vload(xr[m] + k0);
                for (int j = PANEL; j < g.G; j += PANEL) v = vadd(v, vload(xr[m] + k0 + j));
                xsum[m] = vhsum(v);
            }
        for (int q = 0; q < NP; ++q)
            for (int m = 0; m < M; ++m) {
                V s = t[0][q][m];
                for (int a = 1; a < NA; ++a) s = vadd(s, t[a][q][m]);
                acc[q][m] = SCALED ? vfma(s, scl[q], acc[q][m]) : vadd(acc[q][m], s);
                if constexpr (MINS) acc[q][m] = vfma(vset1(-xsum[m]), group_mins<SK>(pn, g, gi, q), acc[q][m]);
            }
    }
    for (int q = 0; q < NP; ++q)
        for (int m = 0; m < M; ++m) vstore(out + (q * M + m) * PANEL, acc[q][m]);
}

#if MOETIER_HAS_DOT
// xb[m]: bf16 activations, Kp columns (pairs read as one 32-bit broadcast). SPLIT 2: xl[m] holds the low
// parts x - bf16(x) of fp32 activations, a second product per pair, so the sum carries ~16 bits of each
// activation (decode; prefill rounds the activations to bf16).
template <int M, int NP, int SPLIT = 1>
void gemm_bf16dot(const Panels& pn, const Geometry& g, const uint16_t* const* xb, float* out,
                  const uint16_t* const* xl = nullptr) {
    const uint16_t* xr[M];
    const uint16_t* lr[M];
    for (int m = 0; m < M; ++m) {
        xr[m] = xb[m];
        lr[m] = SPLIT == 2 ? xl[m] : nullptr;
    }
    const int64_t ls = pn.stride();
    const uint8_t* p = pn.weights(g, 0, 0);
    __m512 acc[NP][M];
    for (int q = 0; q < NP; ++q)
        for (int m = 0; m < M; ++m) acc[q][m] = _mm512_setzero_ps();
    for (int k = 0; k < g.Kp; k += 2, p += ls) {
        __m512i w[NP];
        prefetch_stream(p - pn.q0 * LINE, ls);
        for (int q = 0; q < NP; ++q) w[q] = _mm512_loadu_si512(p + q * LINE);
        for (int m = 0; m < M; ++m) {
            int32_t pair;
            std::memcpy(&pair, xr[m] + k, 4);
            const __m512i xv = _mm512_set1_epi32(pair);
            for (int q = 0; q < NP; ++q) acc[q][m] = _mm512_dpbf16_ps(acc[q][m], (__m512bh)w[q], (__m512bh)xv);
            if constexpr (SPLIT == 2) {
                std::memcpy(&pair, lr[m] + k, 4);
                const __m512i lv = _mm512_set1_epi32(pair);
                for (int q = 0; q < NP; ++q) acc[q][m] = _mm512_dpbf16_ps(acc[q][m], (__m512bh)w[q], (__m512bh)lv);
            }
        }
    }
    for (int q = 0; q < NP; ++q)
        for (int m = 0; m < M; ++m) _mm512_storeu_ps(out + (q * M + m) * PANEL, acc[q][m]);
}

// Dequantize panel `src` (fp8 or fp16, scales applied) to bf16 pairs, as panel `slot` of a bf16 bundle
// of `n` panels at dst (bf16 geometry: Kp / 2 lines), so a prefill block of tokens runs gemm_bf16dot on
// it from L2. Rounding the scaled weight to bf16 costs ~2^-9 relative per weight, the same as rounding
// the activations.
template <class D, bool SCALED>
void dequant_bf16_pairs(const Panels& src, const Geometry& g, uint8_t* dst, int n, int slot) {
    uint8_t* out = dst + slot * LINE;
    const int64_t ls = src.stride();
    for (int gi = 0; gi < g.ngroups; ++gi) {
        const V scl = SCALED ? vload(src.scales(g, gi, 0)) : vset1(1.f);
        const uint8_t* p = src.weights(g, gi, 0);
        for (int l = 0; l < g.lines; ++l) {
            V w[D::UK];
            D::line(p, [&](auto J, V v) { w[decltype(J)::value] = SCALED ? vmul(v, scl) : v; });
            for (int j = 0; j < D::UK; j += 2) {
                const __m512i a = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(w[j].v));
                const __m512i b = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(w[j + 1].v));
                _mm512_storeu_si512(out, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
                out += int64_t(n) * LINE;
            }
            p += ls;
        }
    }
}

#endif

// The integer dot kernel: vpdpbusd (VNNI), else vpmaddubsw + vpmaddwd (AVX2 and AVX-512 without VNNI, as
// llama.cpp's AVX2 dot products), both multiplying unsigned by signed bytes. The activations are the
// signed side (xq[m]: int8 codes in -127..127, xs[m]: their per-row scale) and the weights the unsigned
// one: int4 nibbles are stored as q + 8 and int8 weights become q + 128 with one xor. The offset comes
// back out in integers, per group:
//     sum_k q_x (q_w + c) - c sum_k q_x = sum_k q_x q_w        (c = 8 or 128)
// so every group sum is exact, and a zero activation row (all codes 0, whatever its scale) gives +0.0.
// xcorr[m][gi] = c * sum of the row's codes in group gi (int8: one group), start value -xcorr.
// SK: how the panels store their scales (ScaleKind). With e8m0 scales (SCALE_E8M0) the nibbles are e2m1
// codes; one byte shuffle per 64 weights turns each into E2M1_OFFSET plus
// twice its value (0..24), and the offset comes back out as above (c = 12). IQ4: the nibbles index IQ4's
// grid; the shuffle gives IQ4_OFFSET plus the grid value (1..241), c = 128.
// MINS: the codes are unsigned already (int4 0..15, int8 0..127), so there is no offset: the sums start
// at 0, xcorr holds the plain code sums (c = 1), and each group ends with - min * xcorr, again exact
// zero for a zero row. CR: 2-bit code lines (q2_k; with HB 1 q3_k, its codes q + 4, c = 4).
// Without VNNI, vpmaddubsw's int16 pair sums would saturate on unsigned weights past 128: int8 and IQ4
// weights stay signed there (no offset, the sums start at 0) and multiply |w| by the activation with w's
// sign; the codes of every other format are at most 63 (q6_k's q + 32), so two products' four terms
// are summed in int16 before one widening. All of these sums are exact: the paths agree bit for bit.
template <bool INT4, bool MINS, int M, int NP, int SK = SCALE_F32, int HB = 0, bool IQ4 = false, bool CR = false>
void gemm_int8dot(const Panels& pn, const Geometry& g, const int8_t* const* xq, const int32_t* const* xcorr,
                  const float* xs, float* out) {
    constexpr bool VNNI = MOETIER_HAS_VNNI;
    constexpr bool PLAIN_I8 = !INT4 && !MINS && HB == 0 && !CR;  // int8 codes, signed in the file
    constexpr bool SIGNED = !VNNI && (PLAIN_I8 || IQ4);  // weights kept signed (see above)
    constexpr bool SUM16 = !VNNI && !SIGNED && (INT4 || HB > 0 || CR);  // codes <= 63: two products per widening
    // Few tokens and panels (decode): with vpdpbusd two accumulator sets (int4: low/high nibbles; int8:
    // even/odd lines) so each chain has half the length and decode is not bound by the instruction's
    // latency (more would not fit the registers); the emulation's chains run through one vpaddd.
    constexpr bool FEW = M * NP <= 8;
    constexpr int NS = VNNI && FEW ? 2 : 1;
    constexpr int PF = INT4 ? PREFETCH_BYTES_INT4 : PREFETCH_BYTES;  // prefetch distance (see there)
    const int8_t* xr[M];
    for (int m = 0; m < M; ++m) xr[m] = xq[m];
    const int64_t ls = pn.stride();
    V acc[NP][M];
    for (int q = 0; q < NP; ++q)
        for (int m = 0; m < M; ++m) acc[q][m] = vzero();
    const R lo4 = rset1_8(0x0F), sign = rset1_8(int8_t(0x80));
    // nibble -> byte: e2m1 (e8m0 scales) E2M1_OFFSET + twice the value; iq4 IQ4_OFFSET + the grid value
    // (SIGNED: the grid value itself)
    const R lut = IQ4 && SIGNED ? rlut(_mm_setr_epi8(-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113))
                  : IQ4 ? rlut(_mm_setr_epi8(1, 24, 45, 63, 79, 93, 106, 118, char(129), char(141), char(153), char(166),
                                             char(181), char(197), char(217), char(241)))
                        : rlut(_mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
    V kd[NP], kdmin[NP];  // SCALE_K: the current super-block's d and dmin per panel
    for (int q = 0; q < NP; ++q) kd[q] = kdmin[q] = vzero();
    (void)sign;
    // SCALE_K decode (few tokens and panels): the group sums are multiplied by the integer sub-scales (and
    // the activation sums by the integer mins) and summed exactly in int32 over the super-block; d and dmin
    // are applied once per super-block instead of forming a float scale and min per group. |sum| < 2^28
    // for every K-quant (e.g. q6_k: 16 groups x 16 x 32 x 127 x 127).
    constexpr bool SBI = SK == SCALE_K && FEW;
    R sa[NP][M], sb[NP][M];
    for (int q = 0; q < NP; ++q)
        for (int m = 0; m < M; ++m) sa[q][m] = sb[q][m] = rzero();
    (void)sa;
    (void)sb;
    for (int gi = 0; gi < g.ngroups; ++gi) {
        // The steps below prefetch the weight lines ahead; the group's scale (and min) lines lie between
        // them, and with short groups the hardware prefetchers alone leave them to DRAM latency. Measured
        // (one Zen 4 core, Qwen3 layer, batch 1): q4_k x1.74, q5_k x1.27, int4_g32 x1.05-1.10, int4_g64 x1.03-1.05;
        // int8 with groups of 16/32 (q6_k, q8_0) went 5-8% slower with it, so it is left out there (q6_k's
        // split codes too: x0.95-1.00, A/B 2026-11-30).
        // 2-bit code lines: the whole group (1.25 lines a panel, q3_k 1.75); q3_k twice as far ahead (A/B, two
        // runs of 4 rounds, batch 1: x1.06 / x1.01 one thread, x1.08 / x1.06 two; q2_k x1.00 / x0.98: not there)
        if constexpr (CR) prefetch_stream<HB ? PREFETCH_BYTES_INT4 : PREFETCH_BYTES>(pn.group(g, gi), pn.n * g.group_bytes);
        else if constexpr (INT4 || MINS) prefetch_stream<PF>(pn.group(g, gi), pn.n * g.scale_bytes);
        V scl[NP];
        if constexpr (SBI) {
            // (the integer sub-scales are read after the group's dot products)
        } else if constexpr (SK == SCALE_K) {
            // The K-quants' d and dmin are per super-block of 256 values: converted once per header, not per
            // group (q4_k: 8 groups of 32 share them). Same-run A/B, Qwen3 layer, one thread: q4_k x1.05
            // (batches 1 and 16), q5_k x1.02-1.03, q6_k even; two threads x0.99-1.03 (2026-12-01).
            if ((gi & ((1 << g.header_shift) - 1)) == 0)
                for (int q = 0; q < NP; ++q) {
                    kd[q] = f16_get(pn.d_f16(g, gi, q));
                    if constexpr (MINS) kdmin[q] = f16_get(pn.dmin_f16(g, gi, q));
                }
            for (int q = 0; q < NP; ++q) scl[q] = k_scales(kd[q], pn, g, gi, q);
        } else {
            for (int q = 0; q < NP; ++q) scl[q] = group_scales<SK>(pn, g, gi, q);
        }
        const uint8_t* p = pn.weights(g, gi, 0);
        R ai[NS][NP][M];
        for (int m = 0; m < M; ++m) {
            const R c0 = MINS || SIGNED ? rzero() : rset1(-xcorr[m][gi]);
            for (int q = 0; q < NP; ++q) {
                ai[0][q][m] = c0;
                if constexpr (NS == 2) ai[1][q][m] = rzero();
            }
        }
        const int k0 = gi * g.G;
        // Each panel's weights of columns k..k+3 (lo) and k+4..k+7 (hi), 16 rows, times every token's codes.
        auto dot8 = [&](int k, const R* lo, const R* hi) {
            for (int m = 0; m < M; ++m) {
                int32_t q0, q1;
                std::memcpy(&q0, xr[m] + k, 4);
                std::memcpy(&q1, xr[m] + k + 4, 4);
                const R x0 = rset1(q0), x1 = rset1(q1);
                for (int q = 0; q < NP; ++q) {
                    if constexpr (SIGNED) {
                        ai[0][q][m] = rdot_signed(rdot_signed(ai[0][q][m], lo[q], x0), hi[q], x1);
                    } else if constexpr (SUM16) {
                        ai[0][q][m] = rdot2(ai[0][q][m], lo[q], x0, hi[q], x1);
                    } else {
                        ai[0][q][m] = rdot(ai[0][q][m], lo[q], x0);
                        ai[NS - 1][q][m] = rdot(ai[NS - 1][q][m], hi[q], x1);
                    }
                }
            }
        };
        if constexpr (CR) {
            // 2-bit code lines: the group's one line, four fields of four columns (q3_k: plus the third bits)
            R w[4][NP];
            for (int q = 0; q < NP; ++q) {
                const R raw = rload(p + q * LINE);
                const uint8_t* t = pn.tail(g, gi, q);
                w[0][q] = crumb_codes<0, HB, 0>(raw, t);
                w[1][q] = crumb_codes<1, HB, 0>(raw, t);
                w[2][q] = crumb_codes<2, HB, 0>(raw, t);
                w[3][q] = crumb_codes<3, HB, 0>(raw, t);
            }
            dot8(k0, w[0], w[1]);
            dot8(k0 + 8, w[2], w[3]);
        } else if constexpr (HB > 0) {
            // Split codes (q5_k, q6_k): the group's nibble lines, then its high line; each code rebuilt
            // unsigned (q6_k's offset 32 comes back out through xcorr).
            constexpr int NL = 32 / HB / 8;
            prefetch_stream(p - pn.q0 * LINE, (NL + 1) * ls);
            R hb[NP];
            for (int q = 0; q < NP; ++q) hb[q] = rload(p + NL * ls + q * LINE);
            unroll<NL>([&](auto L) {
                constexpr int l = decltype(L)::value;
                const int k = k0 + 8 * l;
                R wl[NP], wh[NP];
                for (int q = 0; q < NP; ++q) {
                    const R raw = rload(p + l * ls + q * LINE);
                    wl[q] = split_codes<HB, 2 * l, 0>(raw, hb[q]);
                    wh[q] = split_codes<HB, 2 * l + 1, 0>(raw, hb[q]);
                }
                dot8(k, wl, wh);
            });
        } else if constexpr (!INT4) {
            // A group has an even number of lines (4 columns each): two lines per step.
            for (int l = 0; l < g.lines; l += 2, p += 2 * ls) {
                const int k = k0 + 4 * l;
                R w0[NP], w1[NP];
                prefetch_stream(p - pn.q0 * LINE, 2 * ls);
                for (int q = 0; q < NP; ++q) {
                    w0[q] = rload(p + q * LINE);
                    w1[q] = rload(p + ls + q * LINE);
                    if constexpr (!MINS && !SIGNED) {
                        w0[q] = rxor(w0[q], sign);
                        w1[q] = rxor(w1[q], sign);
                    }
                }
                dot8(k, w0, w1);
            }
        } else {
            for (int l = 0; l < g.lines; ++l, p += ls) {
                const int k = k0 + 8 * l;
                R wl[NP], wh[NP];
                prefetch_stream<PF>(p - pn.q0 * LINE, ls);
                for (int q = 0; q < NP; ++q) {
                    const R raw = rload(p + q * LINE);
                    wl[q] = rband(raw, lo4);
                    wh[q] = rband(rsrl16<4>(raw), lo4);
                    if constexpr (SK == SCALE_E8M0 || IQ4) {  // e2m1 codes, iq4 grid indices
                        wl[q] = rshuffle(lut, wl[q]);
                        wh[q] = rshuffle(lut, wh[q]);
                    }
                }
                dot8(k, wl, wh);
            }
        }
        if constexpr (SBI) {
            for (int q = 0; q < NP; ++q) {
                R isc = MINS ? ru8(pn.scale_bytes(g, gi, q)) : rs8(pn.scale_bytes(g, gi, q));
                R imn = rzero();
                if constexpr (CR && MINS) {  // q2_k: sc | m << 4 in one byte
                    imn = rsrl32<4>(isc);
                    isc = rband(isc, rset1(15));
                } else if constexpr (MINS)
                    imn = ru8(pn.min_bytes(g, gi, q));
                for (int m = 0; m < M; ++m) {
                    if constexpr (CR) {
                        // 2- and 3-bit groups of 16: |sums| < 2^14 and sc, m < 2^15, so each product is one
                        // int16 multiply-add (the high halves: the sums' sign times 0)
                        sa[q][m] = rdot16(sa[q][m], ai[0][q][m], isc);
                        if constexpr (NS == 2) sa[q][m] = rdot16(sa[q][m], ai[1][q][m], isc);
                        if constexpr (MINS) sb[q][m] = rdot16(sb[q][m], rset1(xcorr[m][gi]), imn);
                        continue;
                    }
                    R t = ai[0][q][m];
                    if constexpr (NS == 2) t = radd(t, ai[1][q][m]);
                    sa[q][m] = radd(sa[q][m], rmul(t, isc));
                    if constexpr (MINS) sb[q][m] = radd(sb[q][m], rmul(rset1(xcorr[m][gi]), imn));
                }
            }
            if (((gi + 1) & ((1 << g.header_shift) - 1)) == 0)  // the super-block's last group (K % 256 == 0)
                for (int q = 0; q < NP; ++q) {
                    const V d = f16_get(pn.d_f16(g, gi, q));
                    V dmin = vzero();
                    if constexpr (MINS) dmin = f16_get(pn.dmin_f16(g, gi, q));
                    for (int m = 0; m < M; ++m) {
                        acc[q][m] = vfma(rfloat(sa[q][m]), d, acc[q][m]);
                        if constexpr (MINS) acc[q][m] = vfnma(rfloat(sb[q][m]), dmin, acc[q][m]);
                        sa[q][m] = sb[q][m] = rzero();
                    }
                }
            continue;
        }
        for (int q = 0; q < NP; ++q) {
            V mn = vzero();
            if constexpr (MINS && SK == SCALE_K) mn = k_mins(kdmin[q], pn, g, gi, q);
            else if constexpr (MINS) mn = group_mins<SK>(pn, g, gi, q);
            for (int m = 0; m < M; ++m) {
                R t = ai[0][q][m];
                if constexpr (NS == 2) t = radd(t, ai[1][q][m]);
                acc[q][m] = vfma(rfloat(t), scl[q], acc[q][m]);
                if constexpr (MINS) acc[q][m] = vfnma(vset1(float(xcorr[m][gi])), mn, acc[q][m]);
            }
        }
    }
    for (int q = 0; q < NP; ++q)
        for (int m = 0; m < M; ++m) vstore(out + (q * M + m) * PANEL, vmul(acc[q][m], vset1(xs[m])));
}

}  // namespace MOETIER_NS
}  // namespace moetier_kernels
