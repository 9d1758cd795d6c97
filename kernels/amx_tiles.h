// The AMX tile operations the kernels use, behind one small interface (namespace amx), so a test build
// can substitute a software tile unit (tests/amx_emulator/amx_emulator.h) on a CPU without AMX.
//
// Tile numbers are template arguments because the instructions take them as immediates. The tile
// configuration is per thread and other code in the same thread (oneDNN inside torch, say) may change or
// release it, so every task that uses tiles configures them first and releases them when done
// (TileSession).
#pragma once
#include <cstdint>
#include <cstring>

#include "variant.h"

#if MOETIER_HAS_AMX
namespace moetier_kernels {
inline namespace MOETIER_NS {
namespace amx {
// The 64-byte operand of ldtilecfg (palette 1).
struct alignas(64) TileConfig {
    uint8_t palette = 1;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg takes 64 bytes");
}  // namespace amx
}  // namespace MOETIER_NS
}  // namespace moetier_kernels

#if defined(MOETIER_AMX_EMULATOR)
#include "amx_emulator.h"
#else
#include <immintrin.h>

namespace moetier_kernels {
inline namespace MOETIER_NS {
namespace amx {

inline void configure(const TileConfig& cfg) { _tile_loadconfig(&cfg); }
inline void release() { _tile_release(); }
template <int T>
void zero();
template <int T>
void load(const void* base, int64_t stride);
template <int T>
void store(void* base, int64_t stride);
// C[m][n] += sum_k A[m][2k..2k+1] . B[k][2n..2n+1] (bf16 pairs, fp32 accumulate)
template <int C, int A, int B>
void dp_bf16();
// C[m][n] += sum_k sum_i s8(A[m][4k+i]) * s8(B[k][4n+i]) (int32 accumulate)
template <int C, int A, int B>
void dp_s8s8();

// The compiler's tile intrinsics paste the tile number into the instruction text, so each tile the
// kernels use gets its own specialization with a literal number.
#define MOETIER_AMX_TILE(N)                                                                  \
    template <>                                                                              \
    inline void zero<N>() { _tile_zero(N); }                                                 \
    template <>                                                                              \
    inline void load<N>(const void* base, int64_t stride) { _tile_loadd(N, base, stride); } \
    template <>                                                                              \
    inline void store<N>(void* base, int64_t stride) { _tile_stored(N, base, stride); }
MOETIER_AMX_TILE(0)
MOETIER_AMX_TILE(1)
MOETIER_AMX_TILE(2)
MOETIER_AMX_TILE(3)
MOETIER_AMX_TILE(4)
MOETIER_AMX_TILE(5)
MOETIER_AMX_TILE(6)
MOETIER_AMX_TILE(7)
#undef MOETIER_AMX_TILE
#define MOETIER_AMX_DOT(C, A, B)                             \
    template <>                                              \
    inline void dp_bf16<C, A, B>() { _tile_dpbf16ps(C, A, B); } \
    template <>                                              \
    inline void dp_s8s8<C, A, B>() { _tile_dpbssd(C, A, B); }
MOETIER_AMX_DOT(0, 4, 6)
MOETIER_AMX_DOT(1, 5, 6)
MOETIER_AMX_DOT(2, 4, 7)
MOETIER_AMX_DOT(3, 5, 7)
#undef MOETIER_AMX_DOT

}  // namespace amx
}  // namespace MOETIER_NS
}  // namespace moetier_kernels
#endif

namespace moetier_kernels {
inline namespace MOETIER_NS {
namespace amx {

// Every tile 16 rows x 64 bytes: C (fp32 or int32) 16 tokens x 16 weight rows; A 16 tokens x 32 bf16
// or 64 u8 columns; B one 1 KiB block of a packed panel (16 column pairs / quads x 16 weight rows).
inline TileConfig full_tiles() {
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    return cfg;
}

// Configures the tiles for the lifetime of one task (on first use) and releases them at its end.
class TileSession {
   public:
    TileSession() = default;
    ~TileSession() {
        if (active_) release();
    }
    TileSession(const TileSession&) = delete;
    TileSession& operator=(const TileSession&) = delete;
    void ensure() {
        if (!active_) {
            static const TileConfig cfg = full_tiles();
            configure(cfg);
            active_ = true;
        }
    }

   private:
    bool active_ = false;
};

}  // namespace amx
}  // namespace MOETIER_NS
}  // namespace moetier_kernels
#endif
