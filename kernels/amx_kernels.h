// AMX prefill micro-kernels: up to 32 tokens x 2 weight panels per call, C in four 16 x 16 tiles.
//
// The packed panels hold AMX B tiles: 16 consecutive lines of a bf16 panel are 16 column pairs x 16 rows
// (the vdpbf16ps pair order), of an int8 panel (after its scale line) 16 column quads x 16 rows (the
// vpdpbusd quad order), so a B tile loads straight from the bundle with the bundle's line stride
// (n x 64 bytes). A tiles load the expert's token rows, gathered contiguously (bf16, or int8 codes:
// tdpbssd multiplies signed by signed, so the int32 sums are exact with no offset to remove), with a row
// stride padded to 64 columns and zero there. Rows past the expert's tokens read the next rows of the
// buffer (it is padded by AMX_TOKENS rows) and land in C rows nobody reads.
//
// Tiles: 0-3 C (panel q, token tile t -> tile 2q + t), 4-5 A, 6-7 B.
#pragma once
#include "amx_tiles.h"
#include "packed_format.h"

namespace moetier_kernels {
inline namespace MOETIER_NS {
constexpr int AMX_TOKENS = 32;  // tokens per call (two A tiles)
}  // namespace MOETIER_NS
}  // namespace moetier_kernels

#if MOETIER_HAS_AMX
namespace moetier_kernels {
inline namespace MOETIER_NS {

constexpr int AMX_TILE_BYTES = 1024;
constexpr int AMX_TILE_LINES = 16;

template <bool INT8, int MT, int NP>
void amx_tiles_run(const uint8_t* a, int64_t a_stride, const uint8_t* const* b, int64_t b_stride, int kfull,
                   int tail_lines, void* c_out) {
    using namespace amx;
    zero<0>();
    if constexpr (MT == 2) zero<1>();
    if constexpr (NP == 2) zero<2>();
    if constexpr (MT == 2 && NP == 2) zero<3>();
    auto step = [&](const uint8_t* a_k, const uint8_t* b0, const uint8_t* b1, int64_t bs) {
        load<4>(a_k, a_stride);
        if constexpr (MT == 2) load<5>(a_k + 16 * a_stride, a_stride);
        load<6>(b0, bs);
        if constexpr (NP == 2) load<7>(b1, bs);
        if constexpr (INT8) {
            dp_s8s8<0, 4, 6>();
            if constexpr (MT == 2) dp_s8s8<1, 5, 6>();
            if constexpr (NP == 2) dp_s8s8<2, 4, 7>();
            if constexpr (MT == 2 && NP == 2) dp_s8s8<3, 5, 7>();
        } else {
            dp_bf16<0, 4, 6>();
            if constexpr (MT == 2) dp_bf16<1, 5, 6>();
            if constexpr (NP == 2) dp_bf16<2, 4, 7>();
            if constexpr (MT == 2 && NP == 2) dp_bf16<3, 5, 7>();
        }
    };
    const uint8_t* b1 = NP == 2 ? b[1] : b[0];
    const int64_t kb_bytes = AMX_TILE_LINES * b_stride;
    for (int kb = 0; kb < kfull; ++kb)
        step(a + int64_t(kb) * 64, b[0] + kb * kb_bytes, b1 + kb * kb_bytes, b_stride);
    if (tail_lines) {  // a partial last block (odd sizes): zero-padded copies, never read past the panel
        alignas(64) uint8_t tb[2][AMX_TILE_BYTES];
        for (int q = 0; q < NP; ++q) {
            std::memset(tb[q], 0, AMX_TILE_BYTES);
            for (int l = 0; l < tail_lines; ++l)
                std::memcpy(tb[q] + l * LINE, (q ? b1 : b[0]) + kfull * kb_bytes + l * b_stride, LINE);
        }
        step(a + int64_t(kfull) * 64, tb[0], tb[NP - 1], LINE);
    }
    // C tile (q, t) -> c_out[q][16 t .. 16 t + 15][16]
    uint8_t* c = static_cast<uint8_t*>(c_out);
    constexpr int64_t QB = int64_t(AMX_TOKENS) * PANEL * 4;
    store<0>(c, 64);
    if constexpr (MT == 2) store<1>(c + 16 * 64, 64);
    if constexpr (NP == 2) store<2>(c + QB, 64);
    if constexpr (MT == 2 && NP == 2) store<3>(c + QB + 16 * 64, 64);
}

// out[q][m][16] (fp32, q < np <= 2, m < mb <= AMX_TOKENS) = panels of `pn` x the mb gathered token rows at
// `a`. bf16: bf16 pair panels (the format's own, or dequantized ones). int8: the format's int8 panels
// (one scale group) and int8 activation codes with per-row scales xs; descaled as in gemm_int8dot.
template <bool INT8>
void amx_panels(const Panels& pn, int np, const Geometry& g, const uint8_t* a, int64_t a_stride, int mb,
                const float* xs, float* out) {
    const int total_lines = INT8 ? g.lines : g.Kp / 2;
    const int kfull = total_lines / AMX_TILE_LINES;
    const int tail_lines = total_lines % AMX_TILE_LINES;
    const uint8_t* b[2] = {pn.weights(g, 0, 0), pn.weights(g, 0, np - 1)};
    const int64_t bs = pn.stride();
    alignas(64) int32_t ci[INT8 ? 2 * AMX_TOKENS * PANEL : 1];
    void* c = INT8 ? static_cast<void*>(ci) : static_cast<void*>(out);
    if (mb > 16) {
        if (np == 2) amx_tiles_run<INT8, 2, 2>(a, a_stride, b, bs, kfull, tail_lines, c);
        else amx_tiles_run<INT8, 2, 1>(a, a_stride, b, bs, kfull, tail_lines, c);
    } else {
        if (np == 2) amx_tiles_run<INT8, 1, 2>(a, a_stride, b, bs, kfull, tail_lines, c);
        else amx_tiles_run<INT8, 1, 1>(a, a_stride, b, bs, kfull, tail_lines, c);
    }
    if constexpr (INT8) {
        for (int q = 0; q < np; ++q) {
            const __m512 scl = _mm512_loadu_ps(pn.scales(g, 0, q));
            for (int m = 0; m < mb; ++m) {
                const int64_t o = (int64_t(q) * AMX_TOKENS + m) * PANEL;
                const __m512 v = _mm512_cvtepi32_ps(_mm512_loadu_si512(ci + o));
                _mm512_storeu_ps(out + o, _mm512_mul_ps(_mm512_mul_ps(v, scl), _mm512_set1_ps(xs[m])));
            }
        }
    }
}

}  // namespace MOETIER_NS
}  // namespace moetier_kernels
#endif
