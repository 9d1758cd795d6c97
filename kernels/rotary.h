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

// Simple array loops, so the compiler vectorizes them. The products go to arrays in one loop and are
// summed in the next: torch rounds each product before the sum, so they must not fuse into an FMA.
template <bool BF16>
inline void head(const RotaryArgs& a, int t, int h) {
    using E = std::conditional_t<BF16, uint16_t, float>;
    auto get = [](E e) { if constexpr (BF16) return bf16_to_f32(e); else return e; };
    auto round = [](float v) { if constexpr (BF16) return rb(v); else return v; };
    auto put = [](float v) { if constexpr (BF16) return f32_to_bf16(v); else return v; };
    const E* x = reinterpret_cast<const E*>(a.x + t * a.x_st + h * a.x_sh);
    E* y = reinterpret_cast<E*>(a.out) + (int64_t(t) * a.H + h) * a.D;
    const E* c = reinterpret_cast<const E*>(a.cos + t * a.c_st);
    const E* s = reinterpret_cast<const E*>(a.sin + t * a.c_st);
    const int D = a.D, half = a.R / 2;
    alignas(64) float v[1024], p[1024], q[1024];  // D <= 1024 (checked by the binding)
    const E* src = x;
    if (a.norm_w) {  // the head's norm into y (rms_norm.h's row), read back as the rotation's input
        const RmsNormArgs n{reinterpret_cast<const uint8_t*>(x), 0, a.norm_w, reinterpret_cast<uint8_t*>(y), 0, 1, D,
                            BF16, a.eps};
        rms_detail::row(n, 0);
        src = y;
    }
    for (int i = 0; i < D; ++i) v[i] = get(src[i]);
    for (int i = 0; i < half; ++i) {
        p[i] = round(v[i] * get(c[i]));
        q[i] = round(v[i + half] * get(s[i]));
        p[i + half] = round(v[i + half] * get(c[i + half]));
        q[i + half] = round(v[i] * get(s[i + half]));
    }
    for (int i = 0; i < half; ++i) {
        y[i] = put(p[i] - q[i]);
        y[i + half] = put(p[i + half] + q[i + half]);
    }
    for (int i = a.R; i < D; ++i) y[i] = put(v[i]);
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
