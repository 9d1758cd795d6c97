// A software AMX tile unit for tests: the amx kernels compiled against it (-DMOETIER_AMX_EMULATOR, this
// folder on the include path) run their real tiling, tail handling and epilogues on a CPU without AMX.
//
// It follows the ISA's definitions (Intel SDM, "Intel AMX instruction set reference", palette 1):
// eight tiles of at most 16 rows x 64 bytes, per-thread configuration from a 64-byte ldtilecfg operand,
// tileloadd/tilestored of `rows` rows of `colsb` bytes (the rest of a loaded tile is zeroed),
// tdpbf16ps with fp32 accumulation of exact bf16 products, denormal inputs treated as zero and
// denormal results flushed, tdpbssd with wrapping int32 accumulation. Misuse that real hardware
// punishes with #UD (a tile instruction without a configuration, shapes that do not agree) aborts
// with a message instead of computing something. Included by kernels/amx_tiles.h, which defines
// TileConfig (the ldtilecfg operand) first.
#pragma once
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace moetier_kernels {
inline namespace MOETIER_NS {
namespace amx {

namespace emu {

struct State {
    bool configured = false;
    int rows[8] = {}, colsb[8] = {};
    alignas(64) uint8_t data[8][16][64] = {};
};
inline State& state() {
    static thread_local State s;
    return s;
}
inline std::atomic<long long>& dot_counter() {
    static std::atomic<long long> n{0};
    return n;
}
[[noreturn]] inline void fault(const char* what) {
    std::fprintf(stderr, "AMX emulator: %s (real hardware raises #UD)\n", what);
    std::abort();
}
inline State& configured(int tile) {
    State& s = state();
    if (!s.configured) fault("tile instruction without a tile configuration");
    if (tile < 0 || tile > 7 || s.rows[tile] == 0) fault("tile not configured");
    return s;
}
inline float daz(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.f, x) : x; }
inline float bf16(const uint8_t* p) {
    uint16_t b;
    std::memcpy(&b, p, 2);
    const uint32_t u = uint32_t(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return daz(f);
}

}  // namespace emu

inline void configure(const TileConfig& cfg) {
    emu::State& s = emu::state();
    if (cfg.palette != 1) emu::fault("only palette 1 is emulated");
    if (cfg.start_row != 0) emu::fault("start_row must be 0");
    for (int t = 0; t < 8; ++t) {
        if (cfg.rows[t] > 16 || cfg.colsb[t] > 64 || (cfg.rows[t] == 0) != (cfg.colsb[t] == 0))
            emu::fault("invalid tile shape in the configuration");
        s.rows[t] = cfg.rows[t];
        s.colsb[t] = cfg.colsb[t];
    }
    std::memset(s.data, 0, sizeof(s.data));
    s.configured = true;
}

inline void release() {
    emu::State& s = emu::state();
    s.configured = false;
    std::memset(s.rows, 0, sizeof(s.rows));
    std::memset(s.colsb, 0, sizeof(s.colsb));
}

template <int T>
inline void zero() {
    std::memset(emu::configured(T).data[T], 0, 16 * 64);
}

template <int T>
inline void load(const void* base, int64_t stride) {
    emu::State& s = emu::configured(T);
    std::memset(s.data[T], 0, 16 * 64);
    for (int r = 0; r < s.rows[T]; ++r)
        std::memcpy(s.data[T][r], static_cast<const uint8_t*>(base) + r * stride, size_t(s.colsb[T]));
}

template <int T>
inline void store(void* base, int64_t stride) {
    emu::State& s = emu::configured(T);
    for (int r = 0; r < s.rows[T]; ++r)
        std::memcpy(static_cast<uint8_t*>(base) + r * stride, s.data[T][r], size_t(s.colsb[T]));
}

// Shapes: C is M x N dwords, A is M x K dwords, B is K x N dwords.
template <int C, int A, int B>
inline void check_dims(emu::State& s) {
    static_assert(C != A && C != B && A != B, "tdp operands must be three different tiles");
    emu::configured(A);
    emu::configured(B);
    if (s.rows[A] != s.rows[C] || s.colsb[A] / 4 != s.rows[B] || s.colsb[B] != s.colsb[C] || s.colsb[A] % 4 ||
        s.colsb[C] % 4)
        emu::fault("tdp operand shapes do not agree");
}

template <int C, int A, int B>
inline void dp_bf16() {
    emu::State& s = emu::configured(C);
    check_dims<C, A, B>(s);
    const int M = s.rows[C], N = s.colsb[C] / 4, K = s.colsb[A] / 4;
    for (int m = 0; m < M; ++m)
        for (int n = 0; n < N; ++n) {
            float acc;
            std::memcpy(&acc, &s.data[C][m][4 * n], 4);
            for (int k = 0; k < K; ++k) {
                for (int i = 0; i < 2; ++i) {
                    acc += emu::bf16(&s.data[A][m][4 * k + 2 * i]) * emu::bf16(&s.data[B][k][4 * n + 2 * i]);
                    acc = emu::daz(acc);  // flush-to-zero of the result
                }
            }
            std::memcpy(&s.data[C][m][4 * n], &acc, 4);
        }
    emu::dot_counter().fetch_add(1, std::memory_order_relaxed);
}

template <int C, int A, int B>
inline void dp_s8s8() {
    emu::State& s = emu::configured(C);
    check_dims<C, A, B>(s);
    const int M = s.rows[C], N = s.colsb[C] / 4, K = s.colsb[A] / 4;
    for (int m = 0; m < M; ++m)
        for (int n = 0; n < N; ++n) {
            uint32_t acc;
            std::memcpy(&acc, &s.data[C][m][4 * n], 4);
            for (int k = 0; k < K; ++k)
                for (int i = 0; i < 4; ++i)
                    acc += uint32_t(int32_t(int8_t(s.data[A][m][4 * k + i])) * int32_t(int8_t(s.data[B][k][4 * n + i])));
            std::memcpy(&s.data[C][m][4 * n], &acc, 4);
        }
    emu::dot_counter().fetch_add(1, std::memory_order_relaxed);
}

// How many tdp instructions this process has emulated (tests check the tile path really ran).
inline long long emulated_dot_count() { return emu::dot_counter().load(); }

}  // namespace amx
}  // namespace MOETIER_NS
}  // namespace moetier_kernels
