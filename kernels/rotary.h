// Rotary position embedding of attention heads, optionally after a per-head RMSNorm (Qwen3's q/k norms),
// with transformers' operations and roundings: norm as rms_norm.h; then over the first R dims (R even;
// the rest pass through), rotate-half: for i < R/2, with x1 = x[i], x2 = x[i + R/2],
//   y[i]       = x1 * cos[i]       - x2 * sin[i]
//   y[i + R/2] = x2 * cos[i + R/2] + x1 * sin[i + R/2]
// each product and the sum rounded to the dtype (bf16 tensors round after every operator).
#pragma once
#include <cstdint>

#include "rms_norm.h"
#include "simd.h"

namespace moetier_kernels {
inline namespace MOETIER_NS {

struct RotaryArgs {
    const uint8_t* x;  // [T, H, D] rows of D values (fp32 or bf16 bits): x + t * x_st + h * x_sh bytes
    int64_t x_st, x_sh;
    uint8_t* out;  // [T, H, D] contiguous, the dtype of x
    const uint8_t* cos;  // [T, R], the dtype of x, row t at cos + t * c_st bytes (sin alike)
    const uint8_t* sin;
    int64_t c_st;
    const void* norm_w;  // [D] or null: no norm
    float eps;
    int T, H, D, R;
    bool bf16;
};

namespace rotary_detail {
MOE_INLINE float rb(float v) { return bf16_to_f32(f32_to_bf16(v)); }
// a * b rounded to fp32: the empty asm keeps the compiler from fusing it into a later add (torch rounds
// each product before the sum; an fp-contract pragma does not survive inlining into other functions).
MOE_INLINE float mul(float a, float b) {
    float r = a * b;
    asm volatile("" : "+x"(r));
    return r;
}

template <bool BF16>
inline void head(const RotaryArgs& a, int t, int h) {
    using E = std::conditional_t<BF16, uint16_t, float>;
    auto get = [](const E* p, int i) { if constexpr (BF16) return bf16_to_f32(p[i]); else return p[i]; };
    auto round = [](float v) { if constexpr (BF16) return rb(v); else return v; };
    auto put = [](E* p, int i, float v) { if constexpr (BF16) p[i] = f32_to_bf16(v); else p[i] = v; };
    const E* x = reinterpret_cast<const E*>(a.x + t * a.x_st + h * a.x_sh);
    E* y = reinterpret_cast<E*>(a.out) + (int64_t(t) * a.H + h) * a.D;
    const E* c = reinterpret_cast<const E*>(a.cos + t * a.c_st);
    const E* s = reinterpret_cast<const E*>(a.sin + t * a.c_st);
    float v[1024];  // the head after the norm (D <= 1024, checked by the binding)
    if (a.norm_w) {
        const E* w = static_cast<const E*>(a.norm_w);
        const float inv = 1.0f / std::sqrt(rms_detail::mean_square([&](int i) { return get(x, i); }, a.D) + a.eps);
        for (int i = 0; i < a.D; ++i) v[i] = round(mul(get(w, i), round(mul(get(x, i), inv))));
    } else {
        for (int i = 0; i < a.D; ++i) v[i] = get(x, i);
    }
    const int half = a.R / 2;
    for (int i = 0; i < half; ++i) {
        const float x1 = v[i], x2 = v[i + half];
        put(y, i, round(mul(x1, get(c, i))) - round(mul(x2, get(s, i))));
        put(y, i + half, round(mul(x2, get(c, i + half))) + round(mul(x1, get(s, i + half))));
    }
    for (int i = a.R; i < a.D; ++i) put(y, i, v[i]);
}
}  // namespace rotary_detail

// A decode step's heads in the calling thread (a few dozen rows of ~128 values).
inline void rotary(const RotaryArgs& a) {
    for (int t = 0; t < a.T; ++t)
        for (int h = 0; h < a.H; ++h) {
            if (a.bf16) rotary_detail::head<true>(a, t, h);
            else rotary_detail::head<false>(a, t, h);
        }
}

}  // namespace MOETIER_NS
}  // namespace moetier_kernels
