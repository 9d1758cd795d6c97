// The packed weight layout and the repacking of the reference formats (moetier.formats) into it.
//
// A matrix W [N out, K in] becomes ceil(N/16) panels of 16 rows. A panel's data is a sequence of
// 64-byte lines:
//     for each group of G input columns:
//         [1 scale line: 16 fp32 scales, one per row]          (int8, int4, fp8 only)
//         [1 min line: 16 fp32 mins, one per row]              (formats with mins only)
//         (scales as the file has them: 16 fp16 (GGUF q8_0 / q4_0 / q5_0, and q4_1 / q5_1 with their
//          mins likewise; two panels to a line) or 16
//          e8m0 bytes (mxfp4, a bundle of four to a line) instead of fp32; K-quants: 16 sc bytes
//          then 16 m bytes, with the fp16 d and dmin lines of the panels in a header before every
//          8 groups (256 columns))
//         [G x 16 weights in `lines` lines, interleaved per format]
// Float formats have one group spanning all (padded) columns; int8 too (one scale per row), or groups
// of 16 or 32 columns. Rows past N and columns past K are zero weights, so odd sizes need no special
// case in the kernels. Formats with mins (GGUF's K-quants) hold unsigned codes q and mean
// w = scale * q - min per row and group: sum_k x_k w_k = scale * sum_k x_k q_k - min * sum_k x_k, so a
// kernel subtracts min times the group's activation sum instead of dequantizing each weight.
// The 5- and 6-bit codes (q5_0, q5_1, q5_k, q6_k) keep their bits too: int8 panels whose codes are split
// into int4 nibble lines, as int4 lays them out, and one high line per group holding the codes' top bits
// (hbits 1 or 2: 32 x 1 or 16 x 2 bits per row, so a group of 32 or 16 columns ends with one line), 5.5
// and 6.5 bits per weight instead of 8 (the kernels rebuild each code with a shift and a merge per 64).
// Without mins the codes are stored unsigned, q + (8 << hbits): q5_0's q + 16, q6_k's q + 32.
// The 2- and 3-bit codes (q2_k, q3_k; groups of 16) keep theirs likewise (`crumbs`): one line of 2-bit codes
// per group (byte r * 4 + t, bits 2j: row r, column 4j + t) and for q3_k a half line (32 bytes) of third bits
// after the bundle's code lines, four 64-bit words (word j, bit r * 4 + t), codes stored q + 4. q2_k's 4-bit
// sub-scale and min share one byte as in the file, so the panels keep its 2.625 bits per weight (q3_k 3.56,
// the file 3.44: its 6-bit sub-scales take a byte here).
// int4 panels may instead hold e2m1 codes (MXFP4): the nibble indexes twice the e2m1 values (integers
// -12..12, so the vpdpbusd path takes them as bytes too), and the scales stay e8m0 bytes read as
// 2^(e - 128) (the half is in the scale), so the panels keep MXFP4's 4.25 bits per weight. Likewise int4
// panels of GGUF's iq4_nl / iq4_xs hold the file's 4-bit indices into IQ4's non-linear grid of integers
// (-127..113), which the vpdpbusd path shuffles into bytes (grid + 128) and the fp32 path looks up; likewise
// GGUF's q8_0 and q4_0 keep their fp16 scales (8.5 and 4.5 bits, not 9 and 5).
//
// Panels are stored in bundles of up to four, interleaved line by line: in each group, the scale lines
// of the bundle's panels (then their min lines), then line 0 of every panel, line 1 of every panel, ... A decode call
// computes a whole bundle, so it reads one strictly sequential stream, which the hardware prefetchers
// follow at full speed (four separate panel streams, or short runs, lose 10-25% of a core's DRAM rate
// when every byte costs vector work). A kernel that reads fewer panels of a bundle steps over the
// others (line stride n x 64). The layout depends on the matrix alone (never on thread or NUMA count).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "simd.h"

namespace moetier_kernels {
inline namespace MOETIER_NS {

enum Fmt : int { F32 = 0, F16 = 1, BF16 = 2, I8 = 3, I4 = 4, FP8 = 5 };

inline const char* fmt_name(int f) {
    static const char* names[] = {"fp32", "fp16", "bf16", "int8", "int4", "fp8_e4m3"};
    return (f >= 0 && f <= 5) ? names[f] : "?";
}

constexpr int PANEL = 16;  // rows per panel: one fp32 vector of 16 lanes
constexpr int LINE = 64;   // bytes per line
constexpr int BUNDLE = 4;  // panels per bundle
constexpr int FP8_BLOCK = 128;
constexpr int E2M1_OFFSET = 12;  // e2m1 codes on the vpdpbusd path: 12 + twice the value, unsigned
constexpr int IQ4_OFFSET = 128;  // iq4 grid values on the vpdpbusd path: 128 + the value, unsigned

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// How a panel stores its per-row scales of a group: fp32 (a line), fp16 (32 bytes), e8m0 (16 bytes) or
// GGUF's K-quant two levels (SCALE_K: scale = d * sc, min = dmin * m with fp16 d, dmin per 256 columns
// and 6-bit sc, m per group of 32 (q4_k, q5_k); without mins, d per 256 and a signed 8-bit sc per group
// of 16 (q6_k): the products are exact in fp32, the values the K-quants define).
enum ScaleKind : int { SCALE_F32 = 0, SCALE_F16 = 1, SCALE_E8M0 = 2, SCALE_K = 3 };
constexpr int K_SUPER = 256;  // columns per K-quant superblock: one d (and dmin) header per 256 / G groups

// The packed format of one matrix: format code, group (int4 32/64/128; int8 0 = one scale per row, 16
// or 32; ignored by the other formats), per-group mins, how the scales are stored (int4 panels with
// e8m0 scales hold e2m1 codes: MXFP4), and for int8 panels of 5- or 6-bit codes the high bits above each
// code's nibble (0: plain int8 lines; 1: 5-bit codes, 0..31 with mins, else q + 16; 2: 6-bit codes, q + 32).
struct MatFormat {
    int fmt = F32, group = 0;
    bool mins = false;
    int scales = SCALE_F32;
    int hbits = 0;
    bool iq4 = false;  // int4 nibbles index IQ4's grid (GGUF iq4_nl: fp16 scales; iq4_xs: K-quant scales)
    bool crumbs = false;  // int8 panels of 2-bit code lines (q2_k; with hbits 1 and third bits: q3_k)
};

struct Geometry {
    int fmt = F32, N = 0, K = 0;
    int Kp = 0;      // padded input columns
    int G = 0;       // columns per scale group (Kp when the format has one group)
    int panels = 0;  // ceil(N / 16)
    int ngroups = 0;
    int cols_per_line = 0;  // input columns in one 64-byte line of a panel
    int lines = 0;          // weight lines per group and panel
    int64_t scale_bytes = 0, group_bytes = 0, panel_bytes = 0;  // per panel (scale_bytes: scale and min lines)
    int scale_kind = SCALE_F32;
    int scale_stride = LINE;  // bytes of one panel's scales in a group (fp16 32, e8m0 and K 16)
    int header_shift = 30;        // SCALE_K: log2 of the groups between two headers (256 / G); else none
    int64_t header_bytes = 0;     // SCALE_K: per panel, its fp16 d (32 bytes) and, with mins, dmin (32)
    bool scaled = false;
    bool row_scales = false;  // int8 with one scale per row (group 0): the AMX int8 tiles' layout
    bool mins = false;        // a min line per group, unsigned codes: w = scale * q - min
    bool e2m1 = false;        // int4 nibbles are e2m1 codes (MXFP4: the panels with e8m0 scales)
    bool fp8_pairs = false;   // fp8 lines in the column-pair order of the VBMI kernels (fp8_vbmi.h)
    int hbits = 0;            // int8 codes as nibble lines plus a high line per group (MatFormat::hbits)
    bool iq4 = false;         // int4 nibbles index IQ4's grid (MatFormat::iq4)
    bool crumbs = false;      // 2-bit code lines (MatFormat::crumbs); with hbits 1 a half line of third bits
    bool k4 = false;          // K-quant 4-bit sub-scale and min in one byte, the min in the high nibble (q2_k)
    int64_t tail_bytes = 0;   // per panel and group after the bundle's weight lines: q3_k's third bits (32)

    Geometry() = default;
    Geometry(MatFormat f, int N_, int K_)
        : fmt(f.fmt), N(N_), K(K_), scale_kind(f.scales), mins(f.mins), e2m1(f.scales == SCALE_E8M0),
          hbits(f.hbits), iq4(f.iq4), crumbs(f.crumbs) {
        const int group = f.group;
        if (N <= 0 || K <= 0) throw std::invalid_argument("matrix sizes must be positive");
        panels = int((N + PANEL - 1) / PANEL);
        switch (fmt) {
            case F32: cols_per_line = 1; Kp = int(round_up(K, 8)); G = Kp; break;
            case F16: cols_per_line = 2; Kp = int(round_up(K, 8)); G = Kp; break;
            case BF16: cols_per_line = 2; Kp = int(round_up(K, 8)); G = Kp; break;
            case I8:
                if (group != 0 && group != 16 && group != 32)
                    throw std::invalid_argument("int8 group size must be 0 (one scale per row), 16 or 32, got " +
                                                std::to_string(group));
                cols_per_line = 4; scaled = true; row_scales = group == 0;
                Kp = int(round_up(K, group ? group : 8)); G = group ? group : Kp;
                break;
            case I4:
                if (group != 32 && group != 64 && group != 128)
                    throw std::invalid_argument("int4 group size must be 32, 64 or 128, got " + std::to_string(group));
                cols_per_line = 8; Kp = int(round_up(K, group)); G = group; scaled = true; break;
            case FP8: cols_per_line = 4; Kp = int(round_up(K, FP8_BLOCK)); G = FP8_BLOCK; scaled = true; break;
            default: throw std::invalid_argument("unknown format code " + std::to_string(fmt));
        }
        if (mins && !(fmt == I4 || (fmt == I8 && !row_scales)))
            throw std::invalid_argument("per-group mins need int4 or grouped int8 weights");
        if (e2m1 && !(fmt == I4 && G == 32 && !mins))
            throw std::invalid_argument("e8m0 scales (e2m1 codes) need int4 panels with groups of 32 and no mins");
        if (scale_kind == SCALE_F16 && !(fmt == I4 || (fmt == I8 && !row_scales)))
            throw std::invalid_argument("fp16 scales need grouped int4 / int8 panels");
        if (iq4 && !(fmt == I4 && G == 32 && !mins && (scale_kind == SCALE_F16 || scale_kind == SCALE_K)))
            throw std::invalid_argument("iq4 grid indices need int4 panels with groups of 32, fp16 or K-quant scales "
                                        "and no mins");
        if (crumbs && !(fmt == I8 && G == 16 && scale_kind == SCALE_K && (mins ? hbits == 0 : hbits == 1)))
            throw std::invalid_argument("2-bit code lines need int8 panels with groups of 16 and K-quant scales: "
                                        "2-bit codes with mins or 3-bit codes without");
        if (scale_kind == SCALE_K &&
            !(((mins && G == 32) || (!mins && fmt == I8 && G == 16) || (iq4 && G == 32) || crumbs) &&
              K % K_SUPER == 0))
            throw std::invalid_argument("K-quant scales need panels with mins and groups of 32, or int8 panels "
                                        "with groups of 16, over whole 256-column superblocks");
        if (hbits != 0 && !crumbs && !(fmt == I8 && G * hbits == 32 &&
                            ((scale_kind == SCALE_K && mins == (hbits == 1)) || (scale_kind == SCALE_F16 && hbits == 1))))
            throw std::invalid_argument("split codes need int8 panels: K-quant 5-bit codes with mins in groups of 32 "
                                        "or 6-bit codes in groups of 16, or 5-bit codes with fp16 scales in groups of 32");
        ngroups = Kp / G;
        lines = G / cols_per_line;
        if (crumbs) {
            cols_per_line = 16;  // one line of 2-bit codes per group
            lines = 1;
            k4 = mins;
            tail_bytes = hbits ? 32 : 0;
        } else if (hbits) {
            cols_per_line = 8;  // the nibble lines, as int4's
            lines = G / 8 + 1;  // and the high line
        }
        scale_stride = scale_kind == SCALE_E8M0 || scale_kind == SCALE_K ? PANEL
                       : scale_kind == SCALE_F16 ? 2 * PANEL : LINE;
        scale_bytes = scaled ? (mins && !k4 ? 2 : 1) * scale_stride : 0;
        group_bytes = scale_bytes + int64_t(lines) * LINE + tail_bytes;
        if (scale_kind == SCALE_K) {
            header_shift = G == 32 ? 3 : 4;  // 256 / G groups
            header_bytes = (mins ? 2 : 1) * 2 * PANEL;
        }
        panel_bytes = int64_t(ngroups) * group_bytes + int64_t(ngroups >> header_shift) * header_bytes;
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
    // fp32 scales of the source (formats with mins: the [N, groups] scales, then the [N, groups] mins;
    // SCALE_K: d [N, superblocks], dmin [N, superblocks], sc [N, groups], m [N, groups], without dmin
    // and m when there are no mins).
    int64_t src_scale_count() const {
        if (scale_kind == SCALE_K) return (mins ? 2 : 1) * int64_t(N) * (K / K_SUPER + K / G);
        switch (fmt) {
            case I8: return row_scales ? N : (mins ? 2 : 1) * int64_t(N) * ((K + G - 1) / G);
            case I4: return (mins ? 2 : 1) * int64_t(N) * ((K + G - 1) / G);
            case FP8: return int64_t((N + FP8_BLOCK - 1) / FP8_BLOCK) * ((K + FP8_BLOCK - 1) / FP8_BLOCK);
            default: return 0;
        }
    }
};

// NP consecutive panels q0 .. q0 + NP - 1 of the bundle at `base`, which holds n panels: what a kernel
// call computes. Group gi of the bundle starts at base + gi * n * group_bytes; in it, panel q's scale
// line is at + q * scale_stride (64; fp16 32; e8m0 16) and its weight line l at + n * scale_bytes + (l * n + q) * 64.
struct Panels {
    const uint8_t* base = nullptr;
    int n = 1, q0 = 0;
    // SCALE_K: each 8 groups follow their header (the bundle's d lines, then its dmin lines).
    MOE_INLINE const uint8_t* group(const Geometry& g, int gi) const {
        // branch-free: formats without headers have header_bytes 0
        return base + int64_t(n) * (gi * g.group_bytes + ((gi >> g.header_shift) + 1) * g.header_bytes);
    }
    MOE_INLINE const uint8_t* header(const Geometry& g, int gi) const {
        const int sb = gi >> g.header_shift;
        return base + int64_t(n) * sb * ((int64_t(1) << g.header_shift) * g.group_bytes + g.header_bytes);
    }
    MOE_INLINE const uint8_t* d_f16(const Geometry& g, int gi, int q) const { return header(g, gi) + (q0 + q) * 2 * PANEL; }
    MOE_INLINE const uint8_t* dmin_f16(const Geometry& g, int gi, int q) const {
        return header(g, gi) + (n + q0 + q) * 2 * PANEL;
    }
    MOE_INLINE const uint8_t* scale_bytes(const Geometry& g, int gi, int q) const {
        return group(g, gi) + int64_t(q0 + q) * g.scale_stride;
    }
    MOE_INLINE const float* scales(const Geometry& g, int gi, int q) const {
        return reinterpret_cast<const float*>(scale_bytes(g, gi, q));
    }
    MOE_INLINE const uint8_t* min_bytes(const Geometry& g, int gi, int q) const {
        return group(g, gi) + int64_t((g.k4 ? 0 : n) + q0 + q) * g.scale_stride;  // k4: in the scale bytes
    }
    MOE_INLINE const float* mins(const Geometry& g, int gi, int q) const {
        return reinterpret_cast<const float*>(min_bytes(g, gi, q));
    }
    // line 0 of panel q in group gi; line l is + l * stride()
    MOE_INLINE const uint8_t* weights(const Geometry& g, int gi, int q) const {
        return group(g, gi) + n * g.scale_bytes + int64_t(q0 + q) * LINE;
    }
    MOE_INLINE int64_t stride() const { return int64_t(n) * LINE; }
    // q3_k's third bits of panel q in group gi (Geometry::tail_bytes): after the bundle's weight lines.
    MOE_INLINE const uint8_t* tail(const Geometry& g, int gi, int q) const {
        return group(g, gi) + n * (g.scale_bytes + int64_t(g.lines) * LINE) + int64_t(q0 + q) * g.tail_bytes;
    }
    Panels sub(int q) const { return {base, n, q0 + q}; }
};

// Bundle b of a sequence of `count` panels packed at `seq`.
inline Panels bundle(const uint8_t* seq, const Geometry& g, int count, int b) {
    return {seq + int64_t(b) * BUNDLE * g.panel_bytes, std::min(BUNDLE, count - b * BUNDLE), 0};
}
inline int bundles(int count) { return (count + BUNDLE - 1) / BUNDLE; }

// Where one panel of a packed sequence comes from: a reference matrix (row-major [N, K] data; int4:
// [N, ceil(K/2)] bytes, low nibble = even column, stored q+8, or q itself with mins), its fp32 scales as
// moetier.formats lays them out (grouped int8 as int4: [N, ceil(K/G)]; with mins, the mins follow in
// the same shape), or null, and which of its panels.
struct PanelSource {
    const uint8_t* data;
    const float* scales;
    int panel;
};

// The e8m0 byte e of an e2m1 panel's scale 2^(e - 128) (half the MXFP4 scale 2^(e - 127)).
inline uint8_t e8m0_of(float s) {
    const int e = std::ilogb(s) + 128;
    if (!(s > 0.f) || e < 0 || e > 254 || std::ldexp(1.f, e - 128) != s)
        throw std::invalid_argument("an mxfp4 panel scale must be 2^(e - 128) with e in 0..254, got " +
                                    std::to_string(s));
    return uint8_t(e);
}

// The fp16 bits of a scale that is an fp16 value (GGUF's d), refused otherwise (no scale is rounded).
inline uint16_t f16_of(float s) {
    const uint16_t h = _cvtss_sh(s, _MM_FROUND_TO_NEAREST_INT);
    if (_cvtsh_ss(h) != s) throw std::invalid_argument("a panel scale stored as fp16 must be an fp16 value, got " + std::to_string(s));
    return h;
}
// A K-quant sub-scale or sub-min as its byte: an integer 0..63 (with mins; q2_k's 0..15) or -128..127 (q6_k).
inline uint8_t k_sub_of(float v, bool is_unsigned, bool four_bits = false) {
    const float lo = is_unsigned ? 0.f : -128.f, hi = four_bits ? 15.f : is_unsigned ? 63.f : 127.f;
    if (!(v >= lo && v <= hi) || v != std::floor(v))
        throw std::invalid_argument("a K-quant sub-block scale must be an integer " + std::to_string(int(lo)) + ".." +
                                    std::to_string(int(hi)) + ", got " + std::to_string(v));
    return uint8_t(int8_t(int(v)));
}
// Code v (the source byte: 0..31 with mins, else signed: q5_0's -16..15, q6_k's -32..31) of row r, group
// column kk, into a split
// group (hbits) at w: its low nibble where int4 keeps column kk, its top bits in the group's high line,
// byte r * 4 + kk % 4, field 2 * (kk / 8) + (kk % 8) / 4 (the nibble vector the kernels build first).
inline void split_code(const Geometry& g, uint8_t* w, int64_t ls, int r, int kk, uint8_t v) {
    const int u = g.mins ? int(v) : int(int8_t(v)) + (8 << g.hbits);
    if (u < 0 || u >= (16 << g.hbits))
        throw std::invalid_argument("a " + std::to_string(4 + g.hbits) + "-bit code must be 0.." +
                                    std::to_string((16 << g.hbits) - 1) + " (stored " + std::to_string(int(int8_t(v))) +
                                    ")");
    const int j = kk % 8, b = r * 4 + (j & 3);
    uint8_t& d = w[int64_t(kk / 8) * ls + b];
    d = (j & 4) ? uint8_t((d & 0x0F) | ((u & 15) << 4)) : uint8_t((d & 0xF0) | (u & 15));
    const int field = 2 * (kk / 8) + (j >> 2);
    w[int64_t(g.lines - 1) * ls + b] |= uint8_t((u >> 4) << (g.hbits * field));
}
// Code v (the source byte: q2_k's 0..3, q3_k's -4..3) of row r, group column kk into a group of 2-bit code
// lines at w (line byte r * 4 + kk % 4, bits 2 (kk / 4)), q3_k's third bit (of q + 4) into its tail t (word
// kk / 4, bit r * 4 + kk % 4).
inline void crumb_code(const Geometry& g, uint8_t* w, uint8_t* t, int r, int kk, uint8_t v) {
    const int u = g.mins ? int(v) : int(int8_t(v)) + 4, top = g.hbits ? 8 : 4;
    if (u < 0 || u >= top)
        throw std::invalid_argument(std::string("a ") + (g.hbits ? "3-bit code must be -4..3" : "2-bit code must be 0..3") +
                                    " (stored " + std::to_string(int(int8_t(v))) + ")");
    const int b = r * 4 + kk % 4, j = kk / 4;
    w[b] |= uint8_t((u & 3) << (2 * j));
    if (g.hbits) t[8 * j + b / 8] |= uint8_t((u >> 2) << (b % 8));
}
inline void store_scale(const Geometry& g, uint8_t* p, int r, float s) {
    if (g.scale_kind == SCALE_E8M0) p[r] = e8m0_of(s);
    else if (g.scale_kind == SCALE_F16) {
        const uint16_t h = f16_of(s);
        std::memcpy(p + 2 * r, &h, 2);
    } else std::memcpy(p + 4 * r, &s, 4);
}

// Row r (matrix row `row`) of panel q's K-quant scales in group gi of bundle bd (writable): the sc (and
// m) bytes, and at the first group of a superblock the header's d (and dmin). src: d, [dmin,] sc, [m]
// (Geometry::src_scale_count).
inline void pack_k_scales(const Geometry& g, const Panels& bd, const float* src, int gi, int q, int r, int row) {
    const int64_t N = g.N, nsb = g.K / K_SUPER, levels = g.mins ? 2 : 1;
    const float* sub = src + levels * N * nsb;
    auto at = [&](const uint8_t* p) { return const_cast<uint8_t*>(p); };
    if ((gi & ((1 << g.header_shift) - 1)) == 0) {
        const int sb = gi >> g.header_shift;
        const uint16_t d = f16_of(src[row * nsb + sb]);
        std::memcpy(at(bd.d_f16(g, gi, q)) + 2 * r, &d, 2);
        if (g.mins) {
            const uint16_t dmin = f16_of(src[(N + row) * nsb + sb]);
            std::memcpy(at(bd.dmin_f16(g, gi, q)) + 2 * r, &dmin, 2);
        }
    }
    if (g.k4) {  // q2_k: sc | m << 4
        at(bd.scale_bytes(g, gi, q))[r] = uint8_t(k_sub_of(sub[row * g.ngroups + gi], true, true) |
                                                  (k_sub_of(sub[(N + row) * g.ngroups + gi], true, true) << 4));
        return;
    }
    at(bd.scale_bytes(g, gi, q))[r] = k_sub_of(sub[row * g.ngroups + gi], g.mins);
    if (g.mins) at(bd.min_bytes(g, gi, q))[r] = k_sub_of(sub[(N + row) * g.ngroups + gi], true);
}

// Pack `count` panels (src[s] for sequence position s) into bundles at dst. The format is a template
// parameter so the per-element loop has no branches (packing a 600 GB checkpoint is bound by how fast
// this loop runs).
template <int FMT>
void pack_panels_fmt(const Geometry& g, int count, const PanelSource* src, uint8_t* dst) {
    const int N = g.N, K = g.K, G = g.G;
    const int K2 = (K + 1) / 2;
    const int sgroups_in = (K + G - 1) / G;  // scale columns (int4, grouped int8)
    const int fp8_cols = (K + FP8_BLOCK - 1) / FP8_BLOCK;
    const int cpl = g.cols_per_line;
    for (int b = 0; b < bundles(count); ++b) {
        const Panels bd = bundle(dst, g, count, b);
        uint8_t* bbase = const_cast<uint8_t*>(bd.base);
        std::memset(bbase, 0, size_t(bd.n * g.panel_bytes));
        // code 8 = weight 0 (int4; an e2m1 / iq4 panel's padding rows have zero scales instead): the weight
        // lines of a group are contiguous for the bundle
        if (FMT == I4 && !g.mins && !g.e2m1 && !g.iq4)
            for (int gi = 0; gi < g.ngroups; ++gi)
                std::memset(bbase + (bd.group(g, gi) - bd.base) + bd.n * g.scale_bytes, 0x88,
                            size_t(bd.n) * g.lines * LINE);
        const int64_t ls = bd.stride();
        for (int q = 0; q < bd.n; ++q) {
            const PanelSource& ps = src[b * BUNDLE + q];
            const int p = ps.panel;
            const int rows = std::min(PANEL, N - p * PANEL);
            for (int gi = 0; gi < g.ngroups; ++gi) {
                uint8_t* w = bbase + (bd.weights(g, gi, q) - bd.base);
                uint8_t* tail = bbase + (bd.tail(g, gi, q) - bd.base);
                uint8_t* sc8 = bbase + (bd.scale_bytes(g, gi, q) - bd.base);
                float* sc = reinterpret_cast<float*>(sc8);
                uint8_t* mn8 = bbase + (bd.min_bytes(g, gi, q) - bd.base);
                const int g0 = gi * G, g1 = std::min(K, (gi + 1) * G);
                for (int r = 0; r < rows; ++r) {
                    const int row = p * PANEL + r;
                    if (g.scale_kind == SCALE_K) pack_k_scales(g, bd, ps.scales, gi, q, r, row);
                    else if ((FMT == I8 && !g.row_scales) || FMT == I4) {
                        store_scale(g, sc8, r, ps.scales[int64_t(row) * sgroups_in + gi]);
                        if (g.mins) store_scale(g, mn8, r, ps.scales[(int64_t(N) + row) * sgroups_in + gi]);
                    } else if (FMT == I8) sc[r] = ps.scales[row];
                    else if (FMT == FP8) sc[r] = ps.scales[int64_t(row / FP8_BLOCK) * fp8_cols + gi] * 256.0f;
                }
                // 32 columns x 16 rows at a time: the destination block stays in L1, every source row is
                // read sequentially. Element (r, kk) lies in line kk / cpl at byte `at(kk % cpl, r)`.
                for (int kb = g0; kb < g1; kb += 32)
                    for (int r = 0; r < rows; ++r) {
                        const int row = p * PANEL + r;
                        const int k1 = std::min(g1, kb + 32);
                        for (int k = kb; k < k1; ++k) {
                            const int kk = k - g0;
                            uint8_t* line = w + int64_t(kk / cpl) * ls;
                            const int j = kk % cpl;
                            if constexpr (FMT == F32) {
                                std::memcpy(line + r * 4, reinterpret_cast<const uint32_t*>(ps.data) + int64_t(row) * K + k, 4);
                            } else if constexpr (FMT == F16) {
                                std::memcpy(line + j * 32 + r * 2, reinterpret_cast<const uint16_t*>(ps.data) + int64_t(row) * K + k, 2);
                            } else if constexpr (FMT == BF16) {  // vdpbf16ps pair order
                                std::memcpy(line + r * 4 + j * 2, reinterpret_cast<const uint16_t*>(ps.data) + int64_t(row) * K + k, 2);
                            } else if constexpr (FMT == FP8) {
                                const int at = g.fp8_pairs ? (r / 4) * 16 + (j / 2) * 8 + (r % 4) * 2 + (j % 2) : j * 16 + r;
                                line[at] = ps.data[int64_t(row) * K + k];
                            } else if constexpr (FMT == I8) {
                                const uint8_t v = ps.data[int64_t(row) * K + k];
                                if (g.crumbs) crumb_code(g, w, tail, r, kk, v);
                                else if (g.hbits) split_code(g, w, ls, r, kk, v);
                                else line[r * 4 + j] = v;  // vpdpbusd quad order
                            } else {  // I4: 8 columns (4 source bytes) per 32-bit lane, low nibble for j < 4
                                const uint8_t sb = ps.data[int64_t(row) * K2 + k / 2];
                                const uint8_t code = (k & 1) ? (sb >> 4) : (sb & 15);
                                uint8_t& d = line[r * 4 + (j & 3)];
                                d = (j & 4) ? uint8_t((d & 0x0F) | (code << 4)) : uint8_t((d & 0xF0) | code);
                            }
                        }
                    }
            }
        }
    }
}

inline void pack_panels(const Geometry& g, int count, const PanelSource* src, uint8_t* dst) {
    switch (g.fmt) {
        case F32: pack_panels_fmt<F32>(g, count, src, dst); break;
        case F16: pack_panels_fmt<F16>(g, count, src, dst); break;
        case BF16: pack_panels_fmt<BF16>(g, count, src, dst); break;
        case I8: pack_panels_fmt<I8>(g, count, src, dst); break;
        case I4: pack_panels_fmt<I4>(g, count, src, dst); break;
        default: pack_panels_fmt<FP8>(g, count, src, dst); break;
    }
}

// ---- per-format decoders for the fp32 kernel: one 64-byte line holds UK columns x 16 rows ---------
// fn(J, V w) is called for J = 0..UK-1 with the 16 row weights of column k+J (before group scaling).
struct DecF32 {
    static constexpr int UK = 1;
    template <class Fn>
    static MOE_INLINE void line(const uint8_t* p, Fn&& fn) { fn(std::integral_constant<int, 0>{}, f32_get(p)); }
};
struct DecF16 {
    static constexpr int UK = 2;
    template <class Fn>
    static MOE_INLINE void line(const uint8_t* p, Fn&& fn) {
        fn(std::integral_constant<int, 0>{}, f16_get(p));
        fn(std::integral_constant<int, 1>{}, f16_get(p + 32));
    }
};
struct DecBF16 {
    static constexpr int UK = 2;
    template <class Fn>
    static MOE_INLINE void line(const uint8_t* p, Fn&& fn) {
        R a = rload(p);
        fn(std::integral_constant<int, 0>{}, bf16_get<0>(a));
        fn(std::integral_constant<int, 1>{}, bf16_get<1>(a));
    }
};
struct DecFP8 {
    static constexpr int UK = 4;
    template <class Fn>
    static MOE_INLINE void line(const uint8_t* p, Fn&& fn) {
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
    static constexpr int UK = 4;
    template <class Fn>
    static MOE_INLINE void line(const uint8_t* p, Fn&& fn) {
        R r = rload(p);
        unroll<4>([&](auto J) { fn(J, i8_get<decltype(J)::value>(r)); });
    }
};
struct DecI4 {
    static constexpr int UK = 8;
    template <class Fn>
    static MOE_INLINE void line(const uint8_t* p, Fn&& fn) {
        R r = rload(p);
        unroll<8>([&](auto J) { fn(J, i4_get<decltype(J)::value>(r)); });
    }
};
// int4 nibbles holding e2m1 codes: twice the e2m1 values (the e8m0 scales hold the half).
struct DecE2M1 {
    static constexpr int UK = 8;
    template <class Fn>
    static MOE_INLINE void line(const uint8_t* p, Fn&& fn) {
        R r = rload(p);
        unroll<8>([&](auto J) { fn(J, e2m1_get<decltype(J)::value>(r)); });
    }
};
// int4 nibbles holding iq4 grid indices: the grid's integers (the scales hold the rest).
struct DecIQ4 {
    static constexpr int UK = 8;
    template <class Fn>
    static MOE_INLINE void line(const uint8_t* p, Fn&& fn) {
        R r = rload(p);
        unroll<8>([&](auto J) { fn(J, iq4_get<decltype(J)::value>(r)); });
    }
};
// Split K-quant codes (Geometry::hbits = HB): one call decodes a whole group, its UK columns from
// LINES lines (the nibble lines, then the high line; `ls` apart), each code less OFF (q5_0's 16, q6_k's
// 32; q5_1 and q5_k have mins and unsigned codes).
template <int HB, int OFF>
struct DecSplit {
    static constexpr int UK = 32 / HB;
    static constexpr int LINES = UK / 8 + 1;
    template <class Fn>
    static MOE_INLINE void line(const uint8_t* p, int64_t ls, Fn&& fn) {
        const R hb = rload(p + (LINES - 1) * ls);
        unroll<LINES - 1>([&](auto L) {
            constexpr int l = decltype(L)::value;
            const R raw = rload(p + l * ls);
            const R lo = split_codes<HB, 2 * l, OFF>(raw, hb), hi = split_codes<HB, 2 * l + 1, OFF>(raw, hb);
            unroll<4>([&](auto J) {
                constexpr int j = decltype(J)::value;
                fn(std::integral_constant<int, 8 * l + j>{}, i8_get<j>(lo));
                fn(std::integral_constant<int, 8 * l + 4 + j>{}, i8_get<j>(hi));
            });
        });
    }
};
// 2-bit code lines (Geometry::crumbs): a group's 16 columns from its one line, with HB (q3_k) the third
// bits from the group's tail t, each code less OFF (q3_k's 4; q2_k has mins and unsigned codes).
template <int HB, int OFF>
struct DecCrumb {
    static constexpr int UK = 16;
    static constexpr bool CRUMBS = true;
    template <class Fn>
    static MOE_INLINE void line(const uint8_t* p, const uint8_t* t, Fn&& fn) {
        const R raw = rload(p);
        unroll<4>([&](auto F) {
            constexpr int f = decltype(F)::value;
            const R c = crumb_codes<f, HB, OFF>(raw, t);
            unroll<4>([&](auto J) {
                constexpr int j = decltype(J)::value;
                fn(std::integral_constant<int, 4 * f + j>{}, i8_get<j>(c));
            });
        });
    }
};
template <class D, class = void>
constexpr bool is_crumbs = false;
template <class D>
constexpr bool is_crumbs<D, std::void_t<decltype(D::CRUMBS)>> = true;
// Lines one decoder call reads: 1, or a split group's.
template <class D, class = void>
constexpr int lines_per_call = 1;
template <class D>
constexpr int lines_per_call<D, std::void_t<decltype(D::LINES)>> = D::LINES;

// int4 with mins: the nibbles are the codes q in 0..15 themselves (i4_get reads them as q - 8).
struct DecU4 {
    static constexpr int UK = 8;
    template <class Fn>
    static MOE_INLINE void line(const uint8_t* p, Fn&& fn) {
        R r = rload(p);
        const V eight = vset1(8.f);
        unroll<8>([&](auto J) { fn(J, vadd(i4_get<decltype(J)::value>(r), eight)); });
    }
};

}  // namespace MOETIER_NS
}  // namespace moetier_kernels
