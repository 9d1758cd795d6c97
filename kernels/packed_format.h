// The packed weight layout and the repacking of the reference formats (moetier.formats) into it.
//
// A matrix W [N out, K in] becomes ceil(N/16) panels of 16 rows. A panel is
//     [head: 16 fp32 VNNI compensation terms]               (int8/int4 only)
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
    int64_t head = 0, group_bytes = 0, panel_bytes = 0;
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
            case I8: bits = 8; Kp = int(round_up(K, 8)); G = Kp; scaled = true; head = 64; break;
            case I4:
                if (group != 32 && group != 64 && group != 128)
                    throw std::invalid_argument("int4 group size must be 32, 64 or 128, got " + std::to_string(group));
                bits = 4; Kp = int(round_up(K, group)); G = group; scaled = true; head = 64; break;
            case FP8: bits = 8; Kp = int(round_up(K, FP8_BLOCK)); G = FP8_BLOCK; scaled = true; break;
            default: throw std::invalid_argument("unknown format code " + std::to_string(fmt));
        }
        group_bytes = (scaled ? 64 : 0) + int64_t(G) * PANEL * bits / 8;
        panel_bytes = head + int64_t(Kp / G) * group_bytes;
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

// Byte offset of weight (row r, column kk within its group) from the group's first weight byte, and,
// for int4, which nibble. Units: bf16 pairs of columns, int8 quads, int4 octets (vpdpbusd/vdpbf16ps order).
inline int64_t weight_offset(int fmt, int r, int kk, int* nibble) {
    switch (fmt) {
        case F32: return int64_t(kk) * 64 + r * 4;
        case F16: return int64_t(kk) * 32 + r * 2;
        case BF16: return int64_t(kk / 2) * 64 + r * 4 + (kk % 2) * 2;
        case FP8: return int64_t(kk) * 16 + r;
        case I8: return int64_t(kk / 4) * 64 + r * 4 + kk % 4;
        default: *nibble = (kk % 8) / 4; return int64_t(kk / 8) * 64 + r * 4 + kk % 4;
    }
}

// Repack one matrix. src: the reference storage (row-major [N, K] data; int4: [N, ceil(K/2)] bytes, low
// nibble = even column, stored q+8); scales: fp32 as moetier.formats lays them out (or null).
inline void pack_matrix(const Geometry& g, const uint8_t* src, const float* scales, uint8_t* dst) {
    const int fmt = g.fmt, N = g.N, K = g.K, G = g.G;
    const int ngroups = g.Kp / G;
    const int64_t wbytes = g.group_bytes - (g.scaled ? 64 : 0);
    const int K2 = (K + 1) / 2;
    const int sgroups_in = (K + G - 1) / G;  // int4 scale columns
    const int fp8_cols = (K + FP8_BLOCK - 1) / FP8_BLOCK;
    for (int p = 0; p < g.panels; ++p) {
        uint8_t* panel = dst + int64_t(p) * g.panel_bytes;
        std::memset(panel, 0, size_t(g.panel_bytes));
        double comp[PANEL] = {0};  // 128 * sum_g scale_g * sum_k q[k]: the u8 activation offset, folded out
        for (int gi = 0; gi < ngroups; ++gi) {
            uint8_t* grp = panel + g.head + int64_t(gi) * g.group_bytes;
            uint8_t* w = grp + (g.scaled ? 64 : 0);
            if (fmt == I4) std::memset(w, 0x88, size_t(wbytes));  // code 8 = weight 0
            float* sc = reinterpret_cast<float*>(grp);
            for (int r = 0; r < PANEL; ++r) {
                const int row = p * PANEL + r;
                if (row >= N) continue;
                float s = 0.f;
                if (fmt == I8) s = scales[row];
                else if (fmt == I4) s = scales[int64_t(row) * sgroups_in + gi];
                else if (fmt == FP8) s = scales[int64_t(row / FP8_BLOCK) * fp8_cols + gi] * 256.0f;
                if (g.scaled) sc[r] = s;
                int64_t qsum = 0;
                const int k_end = std::min(K, (gi + 1) * G);
                for (int k = gi * G; k < k_end; ++k) {
                    int nib = 0;
                    const int64_t off = weight_offset(fmt, r, k - gi * G, &nib);
                    switch (fmt) {
                        case F32: std::memcpy(w + off, src + (int64_t(row) * K + k) * 4, 4); break;
                        case F16: case BF16: std::memcpy(w + off, src + (int64_t(row) * K + k) * 2, 2); break;
                        case FP8: w[off] = src[int64_t(row) * K + k]; break;
                        case I8: {
                            const int8_t q = int8_t(src[int64_t(row) * K + k]);
                            w[off] = uint8_t(q);
                            qsum += q;
                            break;
                        }
                        default: {
                            const uint8_t b = src[int64_t(row) * K2 + k / 2];
                            const uint8_t code = (k & 1) ? (b >> 4) : (b & 15);
                            w[off] = nib ? uint8_t((w[off] & 0x0F) | (code << 4)) : uint8_t((w[off] & 0xF0) | code);
                            qsum += int(code) - 8;
                        }
                    }
                }
                if (fmt == I8 || fmt == I4) comp[r] += 128.0 * double(s) * double(qsum);
            }
        }
        if (g.head) {
            float* c = reinterpret_cast<float*>(panel);
            for (int r = 0; r < PANEL; ++r) c[r] = float(comp[r]);
        }
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
        unroll<4>([&](auto J) { fn(J, fp8_get(p + 16 * J)); });
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
