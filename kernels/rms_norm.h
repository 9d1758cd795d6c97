// RMSNorm over rows, as transformers' Llama-family modules compute it: in fp32,
// n = x * (1 / sqrt(mean(x^2) + eps)), rounded to the input's dtype, then y = w * n in that dtype (a bf16
// product rounds once more). A decode step normalizes a few rows of a few thousand values ~33 times; torch
// spends ~25 us on each (six operators), this ~1 us.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "simd.h"
#include "thread_pool.h"

namespace moetier_kernels {
inline namespace MOETIER_NS {

struct RmsNormArgs {
    const uint8_t* x;  // rows of D values (fp32, or bf16 bits), row r at x + r * x_stride bytes
    int64_t x_stride;
    const void* w;  // [D], the rows' dtype
    uint8_t* out;   // rows of D values, the rows' dtype, row r at out + r * out_stride bytes
    int64_t out_stride;
    int64_t rows;
    int D;
    bool bf16;
    float eps;
};

namespace rms_detail {
constexpr int LANES = 16;  // independent partial sums, so the sum of squares vectorizes without -ffast-math

template <class Load>
MOE_INLINE float mean_square(Load load, int D) {
    float part[LANES] = {};
    int i = 0;
    for (; i + LANES <= D; i += LANES)
        for (int l = 0; l < LANES; ++l) {
            const float v = load(i + l);
            part[l] += v * v;
        }
    for (; i < D; ++i) {
        const float v = load(i);
        part[0] += v * v;
    }
    float s = 0.0f;
    for (int l = 0; l < LANES; ++l) s += part[l];
    return s / float(D);
}

inline void row(const RmsNormArgs& a, int64_t r) {
    const int D = a.D;
    if (a.bf16) {
        const uint16_t* x = reinterpret_cast<const uint16_t*>(a.x + r * a.x_stride);
        const uint16_t* w = static_cast<const uint16_t*>(a.w);
        uint16_t* y = reinterpret_cast<uint16_t*>(a.out + r * a.out_stride);
        const float inv = 1.0f / std::sqrt(mean_square([x](int i) { return bf16_to_f32(x[i]); }, D) + a.eps);
        for (int i = 0; i < D; ++i)
            y[i] = f32_to_bf16(bf16_to_f32(w[i]) * bf16_to_f32(f32_to_bf16(bf16_to_f32(x[i]) * inv)));
    } else {
        const float* x = reinterpret_cast<const float*>(a.x + r * a.x_stride);
        const float* w = static_cast<const float*>(a.w);
        float* y = reinterpret_cast<float*>(a.out + r * a.out_stride);
        const float inv = 1.0f / std::sqrt(mean_square([x](int i) { return x[i]; }, D) + a.eps);
        for (int i = 0; i < D; ++i) y[i] = w[i] * (x[i] * inv);
    }
}
}  // namespace rms_detail

// Rows in the calling thread while they are few (a decode step's: waking the pool costs more than the
// work); spread over the pool's workers beyond ROWS_PER_CALLER.
constexpr int64_t RMS_NORM_ROWS_PER_CALLER = 64;

inline void rms_norm(ThreadPool& pool, const RmsNormArgs& a) {
    if (a.rows <= RMS_NORM_ROWS_PER_CALLER || pool.size() == 1) {
        for (int64_t r = 0; r < a.rows; ++r) rms_detail::row(a, r);
        return;
    }
    // Chunks taken from a counter: a worker that joins late finds none left (run's contract).
    constexpr int64_t CHUNK = 16;
    std::atomic<int64_t> next{0};
    pool.run([&](int) {
        for (int64_t r0; (r0 = next.fetch_add(CHUNK)) < a.rows;)
            for (int64_t r = r0; r < std::min(a.rows, r0 + CHUNK); ++r) rms_detail::row(a, r);
    });
}

}  // namespace MOETIER_NS
}  // namespace moetier_kernels
