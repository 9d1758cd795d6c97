// Micro-kernels: NP weight panels (16 rows each) times M token rows -> out[NP][M][16] in fp32.
//
// gemm_f32: every format, weights dequantized in registers, fp32 FMA. With M <= 4 it is the decode path:
//   each weight byte is loaded once for all of an expert's tokens. Independent partial sums per column
//   phase (NA) keep enough FMAs in flight when M is 1 or 2.
// gemm_bf16dot: vdpbf16ps on the bf16 pair layout; activations rounded to bf16 (prefill).
// gemm_int8dot: vpdpbusd on int8/int4 with activations quantized per token to int8 (prefill, and decode
//   on model-sized rows).
#pragma once
#include "packed_format.h"

namespace moetier_kernels {
inline namespace MOETIER_NS {

// Software prefetch of the streamed weight panels, 1 KiB ahead, into L2: the hardware prefetcher alone
// leaves a single core short of DRAM bandwidth when the per-byte work is small, and prefetches into L1
// are capped by its few fill buffers (measured on Zen 4, one core, Qwen3 layer: int8 decode 15 GB/s
// with every other line fetched into L1, 19 with every line into L1, 22-24 into L2; bf16 21 -> 22-24).
constexpr int PREFETCH_BYTES = 1024;  // 2 and 4 KiB measured slower (bf16 decode 22 vs 25 GB/s)
#define PF_HINT _MM_HINT_T1

template <class D, int M, int NP, bool SCALED>
void gemm_f32(const uint8_t* const* panels, const Geometry& g, const float* const* x, float* out) {
    constexpr int NA = kAvx512 ? (M == 1 ? 4 : M == 2 ? 2 : 1) : (M == 1 ? 2 : 1);
    const float* xr[M];
    for (int m = 0; m < M; ++m) xr[m] = x[m];
    const uint8_t* p[NP];
    for (int q = 0; q < NP; ++q) p[q] = panels[q];
    V acc[NP][M];
    for (int q = 0; q < NP; ++q)
        for (int m = 0; m < M; ++m) acc[q][m] = vzero();
    const int ngroups = g.Kp / g.G;
    for (int gi = 0; gi < ngroups; ++gi) {
        V scl[NP];
        if constexpr (SCALED) {
            for (int q = 0; q < NP; ++q) {
                scl[q] = vload(reinterpret_cast<const float*>(p[q]));
                p[q] += 64;
            }
        }
        V t[NA][NP][M];
        for (int a = 0; a < NA; ++a)
            for (int q = 0; q < NP; ++q)
                for (int m = 0; m < M; ++m) t[a][q][m] = vzero();
        const int k_end = (gi + 1) * g.G;
        for (int k = gi * g.G; k < k_end; k += D::UK) {
            for (int q = 0; q < NP; ++q) {
                _mm_prefetch(reinterpret_cast<const char*>(p[q]) + PREFETCH_BYTES, PF_HINT);
                if constexpr (D::UB > 64)
                    _mm_prefetch(reinterpret_cast<const char*>(p[q]) + PREFETCH_BYTES + 64, PF_HINT);
                D::unit(p[q], [&](auto J, V w) {
                    constexpr int j = decltype(J)::value;
                    constexpr int a = j % NA;
                    for (int m = 0; m < M; ++m) t[a][q][m] = vfma(w, vset1(xr[m][k + j]), t[a][q][m]);
                });
                p[q] += D::UB;
            }
        }
        for (int q = 0; q < NP; ++q)
            for (int m = 0; m < M; ++m) {
                V s = t[0][q][m];
                for (int a = 1; a < NA; ++a) s = vadd(s, t[a][q][m]);
                acc[q][m] = SCALED ? vfma(s, scl[q], acc[q][m]) : vadd(acc[q][m], s);
            }
    }
    for (int q = 0; q < NP; ++q)
        for (int m = 0; m < M; ++m) vstore(out + (q * M + m) * PANEL, acc[q][m]);
}

#if MOETIER_HAS_DOT
// xb[m]: bf16 activations, Kp columns (pairs read as one 32-bit broadcast).
template <int M, int NP>
void gemm_bf16dot(const uint8_t* const* panels, const Geometry& g, const uint16_t* const* xb, float* out) {
    const uint16_t* xr[M];
    for (int m = 0; m < M; ++m) xr[m] = xb[m];
    const uint8_t* p[NP];
    for (int q = 0; q < NP; ++q) p[q] = panels[q];
    __m512 acc[NP][M];
    for (int q = 0; q < NP; ++q)
        for (int m = 0; m < M; ++m) acc[q][m] = _mm512_setzero_ps();
    for (int k = 0; k < g.Kp; k += 2) {
        __m512i w[NP];
        for (int q = 0; q < NP; ++q) {
            // Weights of a few-token expert come from DRAM: fetch ahead so the dot products overlap them.
            _mm_prefetch(reinterpret_cast<const char*>(p[q] + int64_t(k) * 32) + PREFETCH_BYTES, PF_HINT);
            w[q] = _mm512_loadu_si512(p[q] + int64_t(k) * 32);
        }
        for (int m = 0; m < M; ++m) {
            int32_t pair;
            std::memcpy(&pair, xr[m] + k, 4);
            const __m512i xv = _mm512_set1_epi32(pair);
            for (int q = 0; q < NP; ++q) acc[q][m] = _mm512_dpbf16_ps(acc[q][m], (__m512bh)w[q], (__m512bh)xv);
        }
    }
    for (int q = 0; q < NP; ++q)
        for (int m = 0; m < M; ++m) _mm512_storeu_ps(out + (q * M + m) * PANEL, acc[q][m]);
}

// Dequantize one panel (fp8 or fp16, scales applied) to bf16 in the vdpbf16ps pair layout, so a prefill
// block of tokens runs gemm_bf16dot on it from L2. Rounding the scaled weight to bf16 costs ~2^-9
// relative per weight, the same as rounding the activations.
template <class D, bool SCALED>
void dequant_bf16_pairs(const uint8_t* panel, const Geometry& g, uint8_t* dst) {
    const uint8_t* p = panel;
    uint8_t* out = dst;
    const int ngroups = g.Kp / g.G;
    for (int gi = 0; gi < ngroups; ++gi) {
        V scl = vset1(1.f);
        if constexpr (SCALED) {
            scl = vload(reinterpret_cast<const float*>(p));
            p += 64;
        }
        for (int k = 0; k < g.G; k += D::UK) {
            V w[D::UK];
            D::unit(p, [&](auto J, V v) { w[decltype(J)::value] = SCALED ? vmul(v, scl) : v; });
            for (int j = 0; j < D::UK; j += 2) {
                const __m512i a = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(w[j].v));
                const __m512i b = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(w[j + 1].v));
                _mm512_storeu_si512(out, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
                out += 64;
            }
            p += D::UB;
        }
    }
}

// vpdpbusd multiplies unsigned by signed bytes. The activations are the signed side (xq[m]: int8 codes,
// xs[m]: their per-row scale) and the weights the unsigned one: int4 nibbles are stored as q + 8 and
// int8 weights become q + 128 with one xor. The offset comes back out in integers, per group:
//     sum_k q_x (q_w + c) - c sum_k q_x = sum_k q_x q_w        (c = 8 or 128)
// so every group sum is exact, and a zero activation row (all codes 0, whatever its scale) gives +0.0.
// xcorr[m][gi] = c * sum of the row's codes in group gi (int8: one group), start value -xcorr.
template <bool INT4, int M, int NP>
void gemm_int8dot(const uint8_t* const* panels, const Geometry& g, const int8_t* const* xq,
                  const int32_t* const* xcorr, const float* xs, float* out) {
    // Few tokens: two accumulator sets (int4: low/high nibbles; int8: even/odd quads) so each dpbusd chain
    // has half the length and decode is not bound by the instruction's latency.
    constexpr int NS = M <= 4 ? 2 : 1;
    const int8_t* xr[M];
    for (int m = 0; m < M; ++m) xr[m] = xq[m];
    const uint8_t* p[NP];
    for (int q = 0; q < NP; ++q) p[q] = panels[q];
    __m512 acc[NP][M];
    for (int q = 0; q < NP; ++q)
        for (int m = 0; m < M; ++m) acc[q][m] = _mm512_setzero_ps();
    const int ngroups = g.Kp / g.G;
    const __m512i lo4 = _mm512_set1_epi8(0x0F), sign = _mm512_set1_epi8(int8_t(0x80));
    for (int gi = 0; gi < ngroups; ++gi) {
        __m512 scl[NP];
        for (int q = 0; q < NP; ++q) {
            scl[q] = _mm512_loadu_ps(reinterpret_cast<const float*>(p[q]));
            p[q] += 64;
        }
        __m512i ai[NS][NP][M];
        for (int m = 0; m < M; ++m) {
            const __m512i c0 = _mm512_set1_epi32(-xcorr[m][gi]);
            for (int q = 0; q < NP; ++q) {
                ai[0][q][m] = c0;
                if constexpr (NS == 2) ai[1][q][m] = _mm512_setzero_si512();
            }
        }
        const int k_end = (gi + 1) * g.G;
        if constexpr (!INT4) {
            // Group sizes are multiples of 8 columns: two quads per step.
            for (int k = gi * g.G; k < k_end; k += 8) {
                __m512i w0[NP], w1[NP];
                for (int q = 0; q < NP; ++q) {
                    _mm_prefetch(reinterpret_cast<const char*>(p[q]) + PREFETCH_BYTES, PF_HINT);
                    _mm_prefetch(reinterpret_cast<const char*>(p[q]) + PREFETCH_BYTES + 64, PF_HINT);
                    w0[q] = _mm512_xor_si512(_mm512_loadu_si512(p[q]), sign);
                    w1[q] = _mm512_xor_si512(_mm512_loadu_si512(p[q] + 64), sign);
                    p[q] += 128;
                }
                for (int m = 0; m < M; ++m) {
                    int32_t q0, q1;
                    std::memcpy(&q0, xr[m] + k, 4);
                    std::memcpy(&q1, xr[m] + k + 4, 4);
                    const __m512i x0 = _mm512_set1_epi32(q0), x1 = _mm512_set1_epi32(q1);
                    for (int q = 0; q < NP; ++q) {
                        ai[0][q][m] = _mm512_dpbusd_epi32(ai[0][q][m], w0[q], x0);
                        ai[NS - 1][q][m] = _mm512_dpbusd_epi32(ai[NS - 1][q][m], w1[q], x1);
                    }
                }
            }
        } else {
            for (int k = gi * g.G; k < k_end; k += 8) {
                __m512i wl[NP], wh[NP];
                for (int q = 0; q < NP; ++q) {
                    _mm_prefetch(reinterpret_cast<const char*>(p[q]) + PREFETCH_BYTES, PF_HINT);
                    const __m512i raw = _mm512_loadu_si512(p[q]);
                    wl[q] = _mm512_and_si512(raw, lo4);
                    wh[q] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), lo4);
                    p[q] += 64;
                }
                for (int m = 0; m < M; ++m) {
                    int32_t q0, q1;
                    std::memcpy(&q0, xr[m] + k, 4);
                    std::memcpy(&q1, xr[m] + k + 4, 4);
                    const __m512i x0 = _mm512_set1_epi32(q0), x1 = _mm512_set1_epi32(q1);
                    for (int q = 0; q < NP; ++q) {
                        ai[0][q][m] = _mm512_dpbusd_epi32(ai[0][q][m], wl[q], x0);
                        ai[NS - 1][q][m] = _mm512_dpbusd_epi32(ai[NS - 1][q][m], wh[q], x1);
                    }
                }
            }
        }
        for (int q = 0; q < NP; ++q)
            for (int m = 0; m < M; ++m) {
                __m512i t = ai[0][q][m];
                if constexpr (NS == 2) t = _mm512_add_epi32(t, ai[1][q][m]);
                acc[q][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), scl[q], acc[q][m]);
            }
    }
    for (int q = 0; q < NP; ++q)
        for (int m = 0; m < M; ++m)
            _mm512_storeu_ps(out + (q * M + m) * PANEL, _mm512_mul_ps(acc[q][m], _mm512_set1_ps(xs[m])));
}
#endif

}  // namespace MOETIER_NS
}  // namespace moetier_kernels
