// The packed weight layout and the repacking of the reference formats (moetier.formats) into it.
//
// A matrix W [N out, K in] becomes ceil(N/16) panels of 16 rows. A panel is
//     for each group of G input columns:
//         [16 fp32 scales, one per row]                     (int8, int4, fp8 only)
//         [G x 16 weights, interleaved per format]
// Float formats and int8 have one group spanning all (padded) columns. Rows past N and columns past K
// are zero weights, so odd sizes need no special case in the kernels. The layout depends on the matrix
// alone (never on thread or NUMA count), and each panel is one contiguous stream of bytes.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "simd.h"

namespace moetier_kernels {
inline namespace MOETIER_NS {

enum Fmt : int { F32 = 0, F16 = 1, BF16 = 2, I8 = 3, I4 = 4, FP8 = 5 };

inline const char* fmt_name(int f) {
    static const char* names[] = {"fp32", "fp16", "bf16", "int8", "int4", "fp8_e4m3"};
    return (f >= 0 && f <= 5) ? names[f] : "?";
}

constexpr int PANEL = 16;  // rows per panel: one fp32 vector of 16 lanes
constexpr int FP8_BLOCK = 128;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct Geometry {
    int fmt = F32, N = 0, K = 0;
    int Kp = 0;      // padded input columns
    int G = 0;       // columns per scale group (Kp when the format has one group)
    int panels = 0;  // ceil(N / 16)
    int64_t group_bytes = 0, panel_bytes = 0;
    bool scaled = false;

    Geometry() = default;
    Geometry(int fmt_, int group, int N_, int K_) : fmt(fmt_), N(N_), K(K_) {
        if (N <= 0 || K <= 0) throw std::invalid_argument("matrix sizes must be positive");
        panels = int((N + PANEL - 1) / PANEL);
        int bits = 0;  // bits per weight
        switch (fmt) {
            case F32: bits = 32; Kp = int(round_up(K, 8)); G = Kp; break;
            case F16: bits = 16; Kp = int(round_up(K, 8)); G = Kp; break;
            case BF16: bits = 16; Kp = int(round_up(K, 8)); G = Kp; break;
            case I8: bits = 8; Kp = int(round_up(K, 8)); G = Kp; scaled = true; break;
            case I4:
                if (group != 32 && group != 64 && group != 128)
                    throw std::invalid_argument("int4 group size must be 32, 64 or 128, got " + std::to_string(group));
                bits = 4; Kp = int(round_up(K, group)); G = group; scaled = true; break;
            case FP8: bits = 8; Kp = int(round_up(K, FP8_BLOCK)); G = FP8_BLOCK; scaled = true; break;
            default: throw std::invalid_argument("unknown format code " + std::to_string(fmt));
        }
        group_bytes = (scaled ? 64 : 0) + int64_t(G) * PANEL * bits / 8;
        panel_bytes = int64_t(Kp / G) * group_bytes;
    }
    int64_t bytes() const { return int64_t(panels) * panel_bytes; }
    // Bytes of the source matrix in the reference format (moetier.formats): data, then scales.
    int64_t src_data_bytes() const {
        switch (fmt) {
            case F32: return int64_t(N) * K * 4;
            case F16: case BF16: return int64_t(N) * K * 2;
            case I8: case FP8: return int64_t(N) * K;
            default: return int64_t(N) * ((K + 1) / 2);
        }
    }
    int64_t src_scale_count() const {
        switch (fmt) {
            case I8: return N;
            case I4: return int64_t(N) * ((K + G - 1) / G);
            case FP8: return int64_t((N + FP8_BLOCK - 1) / FP8_BLOCK) * ((K + FP8_BLOCK - 1) / FP8_BLOCK);
            default: return 0;
        }
    }
};

// Repack one matrix. src: the reference storage (row-major [N, K] data; int4: [N, ceil(K/2)] bytes, low
// nibble = even column, stored q+8); scales: fp32 as moetier.formats lays them out (or null).
// The format is a template parameter so the per-element loop has no branches (packing a 600 GB
// checkpoint is bound by how fast this loop runs).
template <int FMT>
void pack_matrix_fmt(const Geometry& g, const uint8_t* src, const float* scales, uint8_t* dst, int64_t stride) {
    const int N = g.N, K = g.K, G = g.G;
    const int ngroups = g.Kp / G;
    const int64_t wbytes = g.group_bytes - (g.scaled ? 64 : 0);
    const int K2 = (K + 1) / 2;
    const int sgroups_in = (K + G - 1) / G;  // int4 scale columns
    const int fp8_cols = (K + FP8_BLOCK - 1) / FP8_BLOCK;
    for (int p = 0; p < g.panels; ++p) {
        uint8_t* panel = dst + int64_t(p) * stride;
        std::memset(panel, 0, size_t(g.panel_bytes));
        for (int gi = 0; gi < ngroups; ++gi) {
            uint8_t* grp = panel + int64_t(gi) * g.group_bytes;
            uint8_t* w = grp + (g.scaled ? 64 : 0);
            if (FMT == I4) std::memset(w, 0x88, size_t(wbytes));  // code 8 = weight 0
            float* sc = reinterpret_cast<float*>(grp);
            const int g0 = gi * G, g1 = std::min(K, (gi + 1) * G);
            const int rows = std::min(PANEL, N - p * PANEL);
            for (int r = 0; r < rows; ++r) {
                const int row = p * PANEL + r;
                float s = 0.f;
                if (FMT == I8) s = scales[row];
                else if (FMT == I4) s = scales[int64_t(row) * sgroups_in + gi];
                else if (FMT == FP8) s = scales[int64_t(row / FP8_BLOCK) * fp8_cols + gi] * 256.0f;
                if (g.scaled) sc[r] = s;
            }
            // 32 columns x 16 rows at a time: the destination block stays in L1, every source row is read
            // sequentially.
            for (int kb = g0; kb < g1; kb += 32)
            for (int r = 0; r < rows; ++r) {
                const int row = p * PANEL + r;
                const int k1 = std::min(g1, kb + 32);
                if constexpr (FMT == F32) {
                    const uint32_t* in = reinterpret_cast<const uint32_t*>(src) + int64_t(row) * K;
                    for (int k = kb; k < k1; ++k) std::memcpy(w + int64_t(k - g0) * 64 + r * 4, in + k, 4);
                } else if constexpr (FMT == F16) {
                    const uint16_t* in = reinterpret_cast<const uint16_t*>(src) + int64_t(row) * K;
                    for (int k = kb; k < k1; ++k) std::memcpy(w + int64_t(k - g0) * 32 + r * 2, in + k, 2);
                } else if constexpr (FMT == BF16) {
                    const uint16_t* in = reinterpret_cast<const uint16_t*>(src) + int64_t(row) * K;
                    for (int k = kb; k < k1; ++k)
                        std::memcpy(w + int64_t((k - g0) / 2) * 64 + r * 4 + ((k - g0) & 1) * 2, in + k, 2);
                } else if constexpr (FMT == FP8) {
                    const uint8_t* in = src + int64_t(row) * K;
                    for (int k = kb; k < k1; ++k) w[int64_t(k - g0) * 16 + r] = in[k];
                } else if constexpr (FMT == I8) {
                    const int8_t* in = reinterpret_cast<const int8_t*>(src) + int64_t(row) * K;
                    for (int k = kb; k < k1; ++k) {
                        w[int64_t((k - g0) / 4) * 64 + r * 4 + ((k - g0) & 3)] = uint8_t(in[k]);
                    }
                } else {  // I4: 8 columns (4 source bytes) per 32-bit lane
                    const uint8_t* in = src + int64_t(row) * K2;
                    for (int k = kb; k < k1; ++k) {
                        const int kk = k - g0;
                        const uint8_t b = in[k / 2];
                        const uint8_t code = (k & 1) ? (b >> 4) : (b & 15);
                        uint8_t& dstb = w[int64_t(kk / 8) * 64 + r * 4 + (kk & 3)];
                        dstb = (kk & 4) ? uint8_t((dstb & 0x0F) | (code << 4)) : uint8_t((dstb & 0xF0) | code);
                    }
                }
            }
        }
    }
}

// stride: bytes from one panel to the next in dst (panel_bytes, or 2x that for interleaved gate/up).
inline void pack_matrix(const Geometry& g, const uint8_t* src, const float* scales, uint8_t* dst, int64_t stride) {
    switch (g.fmt) {
        case F32: pack_matrix_fmt<F32>(g, src, scales, dst, stride); break;
        case F16: pack_matrix_fmt<F16>(g, src, scales, dst, stride); break;
        case BF16: pack_matrix_fmt<BF16>(g, src, scales, dst, stride); break;
        case I8: pack_matrix_fmt<I8>(g, src, scales, dst, stride); break;
        case I4: pack_matrix_fmt<I4>(g, src, scales, dst, stride); break;
        default: pack_matrix_fmt<FP8>(g, src, scales, dst, stride); break;
    }
}

// ---- per-format decoders for the fp32 kernel: one "unit" of UK columns from 64..256 bytes ----------
// fn(J, V w) is called for J = 0..UK-1 with the 16 row weights of column k+J (before group scaling).
struct DecF32 {
    static constexpr int UK = 4, UB = 256;
    template <class Fn>
    static MOE_INLINE void unit(const uint8_t* p, Fn&& fn) {
        unroll<4>([&](auto J) { fn(J, f32_get(p + 64 * J)); });
    }
};
struct DecF16 {
    static constexpr int UK = 4, UB = 128;
    template <class Fn>
    static MOE_INLINE void unit(const uint8_t* p, Fn&& fn) {
        unroll<4>([&](auto J) { fn(J, f16_get(p + 32 * J)); });
    }
};
struct DecBF16 {
    static constexpr int UK = 4, UB = 128;
    template <class Fn>
    static MOE_INLINE void unit(const uint8_t* p, Fn&& fn) {
        R a = rload(p), b = rload(p + 64);
        fn(std::integral_constant<int, 0>{}, bf16_get<0>(a));
        fn(std::integral_constant<int, 1>{}, bf16_get<1>(a));
        fn(std::integral_constant<int, 2>{}, bf16_get<0>(b));
        fn(std::integral_constant<int, 3>{}, bf16_get<1>(b));
    }
};
struct DecFP8 {
    static constexpr int UK = 4, UB = 64;
    template <class Fn>
    static MOE_INLINE void unit(const uint8_t* p, Fn&& fn) {
        V a, b, c, d;
        fp8_get2(p, a, b);
        fp8_get2(p + 32, c, d);
        fn(std::integral_constant<int, 0>{}, a);
        fn(std::integral_constant<int, 1>{}, b);
        fn(std::integral_constant<int, 2>{}, c);
        fn(std::integral_constant<int, 3>{}, d);
    }
};
struct DecI8 {
    static constexpr int UK = 4, UB = 64;
    template <class Fn>
    static MOE_INLINE void unit(const uint8_t* p, Fn&& fn) {
        R r = rload(p);
        unroll<4>([&](auto J) { fn(J, i8_get<decltype(J)::value>(r)); });
    }
};
struct DecI4 {
    static constexpr int UK = 8, UB = 64;
    template <class Fn>
    static MOE_INLINE void unit(const uint8_t* p, Fn&& fn) {
        R r = rload(p);
        unroll<8>([&](auto J) { fn(J, i4_get<decltype(J)::value>(r)); });
    }
};

}  // namespace MOETIER_NS
}  // namespace moetier_kernels
