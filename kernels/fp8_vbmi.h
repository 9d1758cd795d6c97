// fp8 e4m3 on the VNNI builds, where the CPU also has AVX512-VBMI (every AVX512-BF16 CPU but Cooper
// Lake): each 64-byte line of codes becomes exact bf16 column pairs with two 128-entry byte lookups
// (vpermi2b) and two unpacks, and vdpbf16ps multiplies them. That is 6 instructions per line instead of
// ~14 for e4m3 -> fp16 -> fp32 (vcvtph2ps is the slow step); from L2, one Zen 5 core: 97 GB/s (bf16
// activations) or 70 GB/s (fp32 activations as bf16 hi + lo) against 40 GB/s before.
//
// Line layout (Geometry::fp8_pairs): a line holds columns k0 .. k0 + 3 of 16 rows as two column pairs;
// row r's codes of pair j sit at byte (r / 4) * 16 + j * 8 + (r % 4) * 2 + (column - k0) % 2, so the
// byte unpacks of each 128-bit lane give pair 0 and pair 1 as 16 dwords in row order (vdpbf16ps' pair
// layout). The lookups give bf16(value / 256): the packed scales carry the 256, as for the fp16 path.
//
// Exactness: every e4m3 value (subnormals included) is a bf16, and so are its products with a bf16, so
// the only rounding is the fp32 accumulation. fp32 activations are split into x = hi + lo, both bf16
// (|x - hi - lo| <= 2^-17 |x|); activations that are bf16 already (a bf16 model's hidden states) take
// one product per weight instead of two.
#pragma once
#include <cmath>
#include <limits>

#include "panel_kernels.h"

#if MOETIER_HAS_DOT
namespace moetier_kernels {
inline namespace MOETIER_NS {

#define MOE_VBMI __attribute__((target("avx512vbmi")))

inline bool cpu_has_vbmi() { return __builtin_cpu_supports("avx512vbmi"); }

// bf16 bits of (e4m3 magnitude j) / 256 as low and high bytes, j = 0..127 (0x7F is NaN).
struct Fp8Tables {
    alignas(64) uint8_t lo[128], hi[128];
    Fp8Tables() {
        for (int j = 0; j < 128; ++j) {
            const int e = j >> 3, m = j & 7;
            float v = e ? std::ldexp(1.f + m / 8.f, e - 7) : std::ldexp(float(m), -9);
            v = j == 0x7F ? std::numeric_limits<float>::quiet_NaN() : v / 256.f;
            uint32_t u;
            std::memcpy(&u, &v, 4);
            lo[j] = uint8_t(u >> 16);
            hi[j] = uint8_t(u >> 24);
        }
    }
};
inline const Fp8Tables& fp8_tables() {
    static const Fp8Tables t;
    return t;
}

struct Fp8Luts {
    __m512i lo0, lo1, hi0, hi1, sign;
    MOE_VBMI MOE_INLINE Fp8Luts() {
        const Fp8Tables& t = fp8_tables();
        lo0 = _mm512_load_si512(t.lo);
        lo1 = _mm512_load_si512(t.lo + 64);
        hi0 = _mm512_load_si512(t.hi);
        hi1 = _mm512_load_si512(t.hi + 64);
        sign = _mm512_set1_epi8(int8_t(0x80));
    }
    // One line -> pair 0 (columns k0, k0 + 1) and pair 1 (k0 + 2, k0 + 3) as bf16 pairs, rows in order.
    MOE_VBMI MOE_INLINE void pairs(const uint8_t* p, __m512i& a, __m512i& b) const {
        const __m512i c = _mm512_loadu_si512(p);
        const __m512i lo = _mm512_permutex2var_epi8(lo0, c, lo1);
        const __m512i hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(hi0, c, hi1), c, sign, 0xF8);  // | sign
        a = _mm512_unpacklo_epi8(lo, hi);
        b = _mm512_unpackhi_epi8(lo, hi);
    }
};

// out[q][m][16] = panels of `pn` (fp8, pair layout) x token rows. xh[m]: bf16 activations (Kp columns);
// SPLIT 2: xl[m] their low parts (x - hi, as bf16) as well. Per group: t = the unscaled dot products,
// out += t * scale (out is the accumulator: it is zeroed first).
template <int M, int NP, int SPLIT>
MOE_VBMI void gemm_fp8dot(const Panels& pn, const Geometry& g, const uint16_t* const* xh, const uint16_t* const* xl,
                          float* out) {
    constexpr int NC = M == 1 ? 2 : 1;  // chains per (panel, token): pair 0 and pair 1 apart for one token
    const Fp8Luts lut;
    const int64_t ls = pn.stride();
    for (int i = 0; i < NP * M * PANEL; ++i) out[i] = 0.f;
    for (int gi = 0; gi < g.ngroups; ++gi) {
        const uint8_t* p = pn.weights(g, gi, 0);
        __m512 t[NC][NP][M];
        for (int c = 0; c < NC; ++c)
            for (int q = 0; q < NP; ++q)
                for (int m = 0; m < M; ++m) t[c][q][m] = _mm512_setzero_ps();
        const int k0 = gi * g.G;
        for (int l = 0; l < g.lines; ++l, p += ls) {
            const int k = k0 + 4 * l;
            prefetch_stream(p - pn.q0 * LINE, ls);
            for (int q = 0; q < NP; ++q) {
                __m512i a, b;
                lut.pairs(p + q * LINE, a, b);
                for (int m = 0; m < M; ++m) {
                    int32_t h0, h1;
                    std::memcpy(&h0, xh[m] + k, 4);
                    std::memcpy(&h1, xh[m] + k + 2, 4);
                    t[0][q][m] = _mm512_dpbf16_ps(t[0][q][m], (__m512bh)a, (__m512bh)_mm512_set1_epi32(h0));
                    t[NC - 1][q][m] = _mm512_dpbf16_ps(t[NC - 1][q][m], (__m512bh)b, (__m512bh)_mm512_set1_epi32(h1));
                    if constexpr (SPLIT == 2) {
                        int32_t l0, l1;
                        std::memcpy(&l0, xl[m] + k, 4);
                        std::memcpy(&l1, xl[m] + k + 2, 4);
                        t[0][q][m] = _mm512_dpbf16_ps(t[0][q][m], (__m512bh)a, (__m512bh)_mm512_set1_epi32(l0));
                        t[NC - 1][q][m] =
                            _mm512_dpbf16_ps(t[NC - 1][q][m], (__m512bh)b, (__m512bh)_mm512_set1_epi32(l1));
                    }
                }
            }
        }
        for (int q = 0; q < NP; ++q) {
            const __m512 scl = _mm512_loadu_ps(pn.scales(g, gi, q));
            for (int m = 0; m < M; ++m) {
                __m512 s = t[0][q][m];
                if constexpr (NC == 2) s = _mm512_add_ps(s, t[1][q][m]);
                float* o = out + (q * M + m) * PANEL;
                _mm512_storeu_ps(o, _mm512_fmadd_ps(s, scl, _mm512_loadu_ps(o)));
            }
        }
    }
}

// Panel `src` (fp8, pair layout), scales applied, rounded to bf16 pairs as panel `slot` of a bf16 bundle
// of `n` panels at dst: dequant_bf16_pairs for this layout (the amx build's tile prefill).
MOE_VBMI inline void dequant_fp8_pairs(const Panels& src, const Geometry& g, uint8_t* dst, int n, int slot) {
    const Fp8Luts lut;
    uint8_t* out = dst + slot * LINE;
    const int64_t ls = src.stride();
    const __m512i hmask = _mm512_set1_epi32(int(0xFFFF0000u));
    for (int gi = 0; gi < g.ngroups; ++gi) {
        const __m512 scl = _mm512_loadu_ps(src.scales(g, gi, 0));
        const uint8_t* p = src.weights(g, gi, 0);
        for (int l = 0; l < g.lines; ++l, p += ls) {
            __m512i pr[2];
            lut.pairs(p, pr[0], pr[1]);
            for (const __m512i& v : pr) {
                const __m512 w0 = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), scl);
                const __m512 w1 = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(v, hmask)), scl);
                const __m512i a = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(w0));
                const __m512i b = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(w1));
                _mm512_storeu_si512(out, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
                out += int64_t(n) * LINE;
            }
        }
    }
}

}  // namespace MOETIER_NS
}  // namespace moetier_kernels
#endif
