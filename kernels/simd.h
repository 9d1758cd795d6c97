// A 16-lane fp32 vector (one panel of 16 weight rows) and the in-register decoders of every packed
// format. On AVX-512 a V is one zmm; on AVX2 it is two ymm, so the kernels above are written once.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "variant.h"

#define MOE_INLINE inline __attribute__((always_inline))

namespace moetier_kernels {
inline namespace MOETIER_NS {

template <class F, int... I>
MOE_INLINE void unroll_impl(F& f, std::integer_sequence<int, I...>) {
    (f(std::integral_constant<int, I>{}), ...);
}
// f(std::integral_constant<int, 0>), ..., f(<N-1>): compile-time indices for shift immediates.
template <int N, class F>
MOE_INLINE void unroll(F&& f) {
    unroll_impl(f, std::make_integer_sequence<int, N>{});
}

// int4 octet layout (packed_format.h): the bit offset of column k+J's nibble in lane r's 32 bits.
template <int J>
constexpr int nibble_shift = 8 * (J % 4) + 4 * (J / 4);

#if defined(__AVX512F__)
constexpr bool kAvx512 = true;

struct V {
    __m512 v;
};
struct R {  // 64 raw packed bytes: 16 lanes of 4 bytes, lane = weight row
    __m512i v;
};
MOE_INLINE V vzero() { return {_mm512_setzero_ps()}; }
MOE_INLINE V vset1(float x) { return {_mm512_set1_ps(x)}; }
MOE_INLINE V vload(const float* p) { return {_mm512_loadu_ps(p)}; }
MOE_INLINE void vstore(float* p, V a) { _mm512_storeu_ps(p, a.v); }
MOE_INLINE V vadd(V a, V b) { return {_mm512_add_ps(a.v, b.v)}; }
MOE_INLINE V vsub(V a, V b) { return {_mm512_sub_ps(a.v, b.v)}; }
MOE_INLINE V vmul(V a, V b) { return {_mm512_mul_ps(a.v, b.v)}; }
MOE_INLINE V vdiv(V a, V b) { return {_mm512_div_ps(a.v, b.v)}; }
MOE_INLINE V vmin(V a, V b) { return {_mm512_min_ps(a.v, b.v)}; }
MOE_INLINE V vmax(V a, V b) { return {_mm512_max_ps(a.v, b.v)}; }
MOE_INLINE V vfma(V a, V b, V c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
MOE_INLINE R rload(const uint8_t* p) { return {_mm512_loadu_si512(p)}; }

// 2^n * p for float n (integral valued)
MOE_INLINE V vscale2(V p, V n) { return {_mm512_scalef_ps(p.v, n.v)}; }
MOE_INLINE V vround(V a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }

// bf16 pair layout: lane r holds (w[r][k], w[r][k+1]); j=0 -> k, j=1 -> k+1.
template <int J>
MOE_INLINE V bf16_get(R r) {
    if constexpr (J == 0) return {_mm512_castsi512_ps(_mm512_slli_epi32(r.v, 16))};
    else return {_mm512_castsi512_ps(_mm512_and_si512(r.v, _mm512_set1_epi32(int(0xFFFF0000u))))};
}
// int8 quad layout: lane r holds w[r][k..k+3] as signed bytes.
template <int J>
MOE_INLINE V i8_get(R r) {
    __m512i t = J == 3 ? _mm512_srai_epi32(r.v, 24) : _mm512_srai_epi32(_mm512_slli_epi32(r.v, 24 - 8 * J), 24);
    return {_mm512_cvtepi32_ps(t)};
}
// int4 octet layout: lane r byte b = (q[k+b]+8) | (q[k+4+b]+8) << 4. vpermps reads only the low 4
// index bits, so a 16-entry table {-8..7} turns each nibble into its float in one instruction.
template <int J>
MOE_INLINE V nibble_lookup(R r, __m512 lut) {
    constexpr int sh = nibble_shift<J>;
    return {_mm512_permutexvar_ps(sh ? _mm512_srli_epi32(r.v, sh) : r.v, lut)};
}
template <int J>
MOE_INLINE V i4_get(R r) {
    return nibble_lookup<J>(r, _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7));
}
// 16 unsigned bytes -> 16 floats.
MOE_INLINE V u8_get(const uint8_t* p) {
    return {_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
}
// 16 signed bytes -> 16 floats.
MOE_INLINE V s8_get(const uint8_t* p) {
    return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
}
// 16 e8m0 bytes -> 2^(e - 128) each; vscalefps is exact down to the subnormals (e = 0, 1).
MOE_INLINE V e8m0_scales(const uint8_t* p) {
    const __m512i e = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm512_scalef_ps(_mm512_set1_ps(1.f), _mm512_cvtepi32_ps(_mm512_sub_epi32(e, _mm512_set1_epi32(128))))};
}
// The same layout holding e2m1 codes (bit 3 the sign): the table holds twice the e2m1 values, integers.
template <int J>
MOE_INLINE V e2m1_get(R r) {
    return nibble_lookup<J>(r, _mm512_setr_ps(0, 1, 2, 3, 4, 6, 8, 12, -0.f, -1, -2, -3, -4, -6, -8, -12));
}
// The same layout holding indices into IQ4's non-linear grid (GGUF iq4_nl / iq4_xs).
template <int J>
MOE_INLINE V iq4_get(R r) {
    return nibble_lookup<J>(r, _mm512_setr_ps(-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113));
}
// 16 e4m3 bytes -> 16 floats / 256. Sign-extending to 16 bits and shifting left by 7 puts the sign in
// bit 15 and exponent|mantissa in bits 13..7: exactly an fp16 (subnormals included) 2^8 smaller than the
// e4m3 value; the 2^8 is folded into the packed scales.
MOE_INLINE V fp8_get(const uint8_t* p) {
    __m256i h = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    h = _mm256_and_si256(_mm256_slli_epi16(h, 7), _mm256_set1_epi16(int16_t(0xBF80)));
    return {_mm512_cvtph_ps(h)};
}
// Two columns (32 bytes) at once: one sign extension, shift and mask for 32 weights.
MOE_INLINE void fp8_get2(const uint8_t* p, V& a, V& b) {
    __m512i h = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    h = _mm512_and_si512(_mm512_slli_epi16(h, 7), _mm512_set1_epi16(int16_t(0xBF80)));
    a = {_mm512_cvtph_ps(_mm512_castsi512_si256(h))};
    b = {_mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1))};
}
MOE_INLINE V f16_get(const uint8_t* p) {
    return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
MOE_INLINE V f32_get(const uint8_t* p) { return {_mm512_loadu_ps(reinterpret_cast<const float*>(p))}; }
// Split K-quant codes (packed_format.h): nibble vector SV of a group (2 l: the low nibbles of its nibble
// line l, 2 l + 1: the high ones) with its HB top bits from the group's high line hb, less OFF: 64 codes,
// one byte each. The 16-bit shifts carry bits across bytes only where the mask drops them.
template <int HB, int SV, int OFF>
MOE_INLINE __m512i split_codes_v(__m512i raw, __m512i hb) {
    constexpr int sh = 4 - HB * SV;
    const __m512i lo4 = _mm512_set1_epi8(0x0F);
    const __m512i nib = SV & 1 ? _mm512_and_si512(_mm512_srli_epi16(raw, 4), lo4) : _mm512_and_si512(raw, lo4);
    __m512i top = hb;
    if constexpr (sh > 0) top = _mm512_slli_epi16(hb, sh);
    else if constexpr (sh < 0) top = _mm512_srli_epi16(hb, -sh);
    __m512i c = _mm512_ternarylogic_epi32(nib, top, _mm512_set1_epi8(char(((1 << HB) - 1) << 4)), 0xF8);  // nib | (top & m)
    if constexpr (OFF != 0) c = _mm512_sub_epi8(c, _mm512_set1_epi8(char(OFF)));
    return c;
}
template <int HB, int SV, int OFF>
MOE_INLINE R split_codes(R raw, R hb) { return {split_codes_v<HB, SV, OFF>(raw.v, hb.v)}; }
// 2-bit code lines (packed_format.h, q2_k / q3_k): field J of a line (bits 2J of every byte: columns 4J..4J+3)
// as 64 code bytes, with HB (q3_k) the third bit from word J of the group's third-bit masks t (bit i = byte i),
// less OFF.
template <int J, int HB, int OFF>
MOE_INLINE __m512i crumb_codes_v(__m512i raw, const uint8_t* t) {
    __m512i c = _mm512_and_si512(J ? _mm512_srli_epi16(raw, 2 * J) : raw, _mm512_set1_epi8(3));
    if constexpr (HB) {
        uint64_t bits;
        std::memcpy(&bits, t + 8 * J, 8);
        c = _mm512_mask_add_epi8(c, _cvtu64_mask64(bits), c, _mm512_set1_epi8(4));
    }
    if constexpr (OFF != 0) c = _mm512_sub_epi8(c, _mm512_set1_epi8(char(OFF)));
    return c;
}
template <int J, int HB, int OFF>
MOE_INLINE R crumb_codes(R raw, const uint8_t* t) { return {crumb_codes_v<J, HB, OFF>(raw.v, t)}; }
// 16 bytes -> their low (HIGH false) or high nibbles as 16 floats (q2_k's sub-scale and min in one byte).
template <bool HIGH>
MOE_INLINE V u4_get(const uint8_t* p) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm512_cvtepi32_ps(HIGH ? _mm512_srli_epi32(b, 4) : _mm512_and_si512(b, _mm512_set1_epi32(15)))};
}

// ---- R as 16 int32 lanes: the integer dot kernel (gemm_int8dot) ----
MOE_INLINE V vfnma(V a, V b, V c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }  // c - a * b, one rounding
MOE_INLINE R rzero() { return {_mm512_setzero_si512()}; }
MOE_INLINE R rset1(int32_t x) { return {_mm512_set1_epi32(x)}; }
MOE_INLINE R rset1_8(int8_t x) { return {_mm512_set1_epi8(x)}; }
MOE_INLINE R rlut(__m128i t) { return {_mm512_broadcast_i32x4(t)}; }  // a byte table in every 16-byte lane
MOE_INLINE R radd(R a, R b) { return {_mm512_add_epi32(a.v, b.v)}; }
MOE_INLINE R rmul(R a, R b) { return {_mm512_mullo_epi32(a.v, b.v)}; }
MOE_INLINE R rband(R a, R b) { return {_mm512_and_si512(a.v, b.v)}; }
MOE_INLINE R rxor(R a, R b) { return {_mm512_xor_si512(a.v, b.v)}; }
template <int N>
MOE_INLINE R rsrl16(R a) { return {_mm512_srli_epi16(a.v, N)}; }
template <int N>
MOE_INLINE R rsrl32(R a) { return {_mm512_srli_epi32(a.v, N)}; }
MOE_INLINE R rshuffle(R table, R idx) { return {_mm512_shuffle_epi8(table.v, idx.v)}; }
MOE_INLINE V rfloat(R a) { return {_mm512_cvtepi32_ps(a.v)}; }
MOE_INLINE R ru8(const uint8_t* p) { return {_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
MOE_INLINE R rs8(const uint8_t* p) { return {_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
// acc + per lane the dot product of 4 unsigned bytes u and 4 signed bytes s. VNNI: vpdpbusd. Otherwise
// vpmaddubsw + vpmaddwd, whose pair sums saturate at int16: callers keep u * 127 * 2 < 2^15 (u <= 127).
MOE_INLINE R rdot(R acc, R u, R s) {
#if MOETIER_HAS_VNNI
    return {_mm512_dpbusd_epi32(acc.v, u.v, s.v)};
#else
    return {_mm512_add_epi32(acc.v, _mm512_madd_epi16(_mm512_maddubs_epi16(u.v, s.v), _mm512_set1_epi16(1)))};
#endif
}
// Without VNNI: acc + both products, summed in int16 before one widening (four products per int16:
// u <= 63). With VNNI the kernels call rdot per product (two accumulator chains).
MOE_INLINE R rdot2(R acc, R u0, R s0, R u1, R s1) {
    const __m512i p = _mm512_add_epi16(_mm512_maddubs_epi16(u0.v, s0.v), _mm512_maddubs_epi16(u1.v, s1.v));
    return {_mm512_add_epi32(acc.v, _mm512_madd_epi16(p, _mm512_set1_epi16(1)))};
}
// Without VNNI: acc + the dot product of signed bytes w and s (|s| <= 127): |w| times s with w's sign,
// so no pair sum passes 2 * 128 * 127 < 2^15.
MOE_INLINE R rdot_signed(R acc, R w, R s) {
    const __m512i sv = _mm512_mask_sub_epi8(s.v, _mm512_movepi8_mask(w.v), _mm512_setzero_si512(), s.v);
    return rdot(acc, {_mm512_abs_epi8(w.v)}, {sv});
}
// acc + per lane the products of the int16 halves of a and b, summed (vpdpwssd / vpmaddwd).
MOE_INLINE R rdot16(R acc, R a, R b) {
#if MOETIER_HAS_VNNI
    return {_mm512_dpwssd_epi32(acc.v, a.v, b.v)};
#else
    return {_mm512_add_epi32(acc.v, _mm512_madd_epi16(a.v, b.v))};
#endif
}

#else  // AVX2: a V is two ymm (rows 0-7, rows 8-15)
constexpr bool kAvx512 = false;

struct V {
    __m256 a, b;
};
struct R {
    __m256i a, b;
};
MOE_INLINE V vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
MOE_INLINE V vset1(float x) {
    __m256 s = _mm256_set1_ps(x);
    return {s, s};
}
MOE_INLINE V vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
MOE_INLINE void vstore(float* p, V a) {
    _mm256_storeu_ps(p, a.a);
    _mm256_storeu_ps(p + 8, a.b);
}
#define MOE_V2(name, op) \
    MOE_INLINE V name(V x, V y) { return {op(x.a, y.a), op(x.b, y.b)}; }
MOE_V2(vadd, _mm256_add_ps)
MOE_V2(vsub, _mm256_sub_ps)
MOE_V2(vmul, _mm256_mul_ps)
MOE_V2(vdiv, _mm256_div_ps)
MOE_V2(vmin, _mm256_min_ps)
MOE_V2(vmax, _mm256_max_ps)
#undef MOE_V2
MOE_INLINE V vfma(V x, V y, V z) { return {_mm256_fmadd_ps(x.a, y.a, z.a), _mm256_fmadd_ps(x.b, y.b, z.b)}; }
MOE_INLINE R rload(const uint8_t* p) {
    return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32))};
}
MOE_INLINE __m256 scale2_half(__m256 p, __m256 n) {
    __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
}
MOE_INLINE V vscale2(V p, V n) { return {scale2_half(p.a, n.a), scale2_half(p.b, n.b)}; }
MOE_INLINE V vround(V x) {
    return {_mm256_round_ps(x.a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
            _mm256_round_ps(x.b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
template <int J>
MOE_INLINE V bf16_get(R r) {
    if constexpr (J == 0)
        return {_mm256_castsi256_ps(_mm256_slli_epi32(r.a, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(r.b, 16))};
    else {
        const __m256i m = _mm256_set1_epi32(int(0xFFFF0000u));
        return {_mm256_castsi256_ps(_mm256_and_si256(r.a, m)), _mm256_castsi256_ps(_mm256_and_si256(r.b, m))};
    }
}
template <int J>
MOE_INLINE __m256 i8_half(__m256i x) {
    __m256i t = J == 3 ? _mm256_srai_epi32(x, 24) : _mm256_srai_epi32(_mm256_slli_epi32(x, 24 - 8 * J), 24);
    return _mm256_cvtepi32_ps(t);
}
template <int J>
MOE_INLINE V i8_get(R r) { return {i8_half<J>(r.a), i8_half<J>(r.b)}; }
template <int J>
MOE_INLINE __m256 i4_half(__m256i x) {
    constexpr int sh = nibble_shift<J>;
    __m256i t = _mm256_and_si256(sh ? _mm256_srli_epi32(x, sh) : x, _mm256_set1_epi32(15));
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(t, _mm256_set1_epi32(8)));
}
template <int J>
MOE_INLINE V i4_get(R r) { return {i4_half<J>(r.a), i4_half<J>(r.b)}; }
MOE_INLINE __m256 u8_half(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
MOE_INLINE V u8_get(const uint8_t* p) { return {u8_half(p), u8_half(p + 8)}; }
MOE_INLINE __m256 s8_half(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
MOE_INLINE V s8_get(const uint8_t* p) { return {s8_half(p), s8_half(p + 8)}; }
// 8 e8m0 bytes -> 2^(e - 128): the exponent field e - 1, and for e = 0, 1 the two subnormals.
MOE_INLINE __m256 e8m0_half(const uint8_t* p) {
    const __m256i e = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m256 normal = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_sub_epi32(e, _mm256_set1_epi32(1)), 23));
    const __m256 tiny = _mm256_blendv_ps(_mm256_set1_ps(0x1p-128f), _mm256_set1_ps(0x1p-127f),
                                         _mm256_castsi256_ps(_mm256_cmpeq_epi32(e, _mm256_set1_epi32(1))));
    return _mm256_blendv_ps(normal, tiny, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(2), e)));
}
MOE_INLINE V e8m0_scales(const uint8_t* p) { return {e8m0_half(p), e8m0_half(p + 8)}; }
// e2m1: the magnitude from an 8-entry table (vpermps reads the low 3 index bits), bit 3 the sign.
template <int J>
MOE_INLINE __m256 e2m1_half(__m256i x) {
    constexpr int sh = nibble_shift<J>;
    const __m256i t = sh ? _mm256_srli_epi32(x, sh) : x;
    const __m256 mag = _mm256_permutevar8x32_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 6, 8, 12), t);
    const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(t, _mm256_set1_epi32(8)), 28);
    return _mm256_or_ps(mag, _mm256_castsi256_ps(sign));
}
template <int J>
MOE_INLINE V e2m1_get(R r) { return {e2m1_half<J>(r.a), e2m1_half<J>(r.b)}; }
// iq4: the grid's 16 values from two 8-entry tables, bit 3 of the index picks the table.
template <int J>
MOE_INLINE __m256 iq4_half(__m256i x) {
    constexpr int sh = nibble_shift<J>;
    const __m256i t = sh ? _mm256_srli_epi32(x, sh) : x;
    const __m256 lo = _mm256_permutevar8x32_ps(_mm256_setr_ps(-127, -104, -83, -65, -49, -35, -22, -10), t);
    const __m256 hi = _mm256_permutevar8x32_ps(_mm256_setr_ps(1, 13, 25, 38, 53, 69, 89, 113), t);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(t, 28)));  // bit 3 -> the sign bit
}
template <int J>
MOE_INLINE V iq4_get(R r) { return {iq4_half<J>(r.a), iq4_half<J>(r.b)}; }
MOE_INLINE V fp8_get(const uint8_t* p) {
    __m256i h = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    h = _mm256_and_si256(_mm256_slli_epi16(h, 7), _mm256_set1_epi16(int16_t(0xBF80)));
    return {_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1))};
}
MOE_INLINE void fp8_get2(const uint8_t* p, V& a, V& b) {
    a = fp8_get(p);
    b = fp8_get(p + 16);
}
MOE_INLINE V f16_get(const uint8_t* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)))};
}
MOE_INLINE V f32_get(const uint8_t* p) { return vload(reinterpret_cast<const float*>(p)); }
template <int HB, int SV, int OFF>
MOE_INLINE __m256i split_codes_half(__m256i raw, __m256i hb) {
    constexpr int sh = 4 - HB * SV;
    const __m256i lo4 = _mm256_set1_epi8(0x0F);
    const __m256i nib = SV & 1 ? _mm256_and_si256(_mm256_srli_epi16(raw, 4), lo4) : _mm256_and_si256(raw, lo4);
    __m256i top = hb;
    if constexpr (sh > 0) top = _mm256_slli_epi16(hb, sh);
    else if constexpr (sh < 0) top = _mm256_srli_epi16(hb, -sh);
    __m256i c = _mm256_or_si256(nib, _mm256_and_si256(top, _mm256_set1_epi8(char(((1 << HB) - 1) << 4))));
    if constexpr (OFF != 0) c = _mm256_sub_epi8(c, _mm256_set1_epi8(char(OFF)));
    return c;
}
template <int HB, int SV, int OFF>
MOE_INLINE R split_codes(R raw, R hb) {
    return {split_codes_half<HB, SV, OFF>(raw.a, hb.a), split_codes_half<HB, SV, OFF>(raw.b, hb.b)};
}
// 32 mask bits (bit i = byte i) -> 32 bytes 0xFF / 0: each byte takes its mask byte, then tests its own bit.
MOE_INLINE __m256i bits_to_bytes(uint32_t m) {
    const __m256i pick = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x(int64_t(0x8040201008040201ull));
    const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(int(m)), pick);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}
template <int J, int HB, int OFF>
MOE_INLINE __m256i crumb_codes_half(__m256i raw, const uint8_t* t) {
    __m256i c = _mm256_and_si256(J ? _mm256_srli_epi16(raw, 2 * J) : raw, _mm256_set1_epi8(3));
    if constexpr (HB) {
        uint32_t bits;
        std::memcpy(&bits, t, 4);
        c = _mm256_or_si256(c, _mm256_and_si256(bits_to_bytes(bits), _mm256_set1_epi8(4)));
    }
    if constexpr (OFF != 0) c = _mm256_sub_epi8(c, _mm256_set1_epi8(char(OFF)));
    return c;
}
template <int J, int HB, int OFF>
MOE_INLINE R crumb_codes(R raw, const uint8_t* t) {
    return {crumb_codes_half<J, HB, OFF>(raw.a, t + 8 * J), crumb_codes_half<J, HB, OFF>(raw.b, t + 8 * J + 4)};
}
template <bool HIGH>
MOE_INLINE __m256 u4_half(const uint8_t* p) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return _mm256_cvtepi32_ps(HIGH ? _mm256_srli_epi32(b, 4) : _mm256_and_si256(b, _mm256_set1_epi32(15)));
}
template <bool HIGH>
MOE_INLINE V u4_get(const uint8_t* p) { return {u4_half<HIGH>(p), u4_half<HIGH>(p + 8)}; }

// ---- R as 16 int32 lanes (two ymm): the integer dot kernel (gemm_int8dot) ----
MOE_INLINE V vfnma(V x, V y, V z) { return {_mm256_fnmadd_ps(x.a, y.a, z.a), _mm256_fnmadd_ps(x.b, y.b, z.b)}; }
MOE_INLINE R rzero() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
MOE_INLINE R rset1(int32_t x) {
    const __m256i s = _mm256_set1_epi32(x);
    return {s, s};
}
MOE_INLINE R rset1_8(int8_t x) {
    const __m256i s = _mm256_set1_epi8(x);
    return {s, s};
}
MOE_INLINE R rlut(__m128i t) {
    const __m256i s = _mm256_broadcastsi128_si256(t);
    return {s, s};
}
#define MOE_R2(name, op) \
    MOE_INLINE R name(R x, R y) { return {op(x.a, y.a), op(x.b, y.b)}; }
MOE_R2(radd, _mm256_add_epi32)
MOE_R2(rmul, _mm256_mullo_epi32)
MOE_R2(rband, _mm256_and_si256)
MOE_R2(rxor, _mm256_xor_si256)
MOE_R2(rshuffle, _mm256_shuffle_epi8)
#undef MOE_R2
template <int N>
MOE_INLINE R rsrl16(R x) { return {_mm256_srli_epi16(x.a, N), _mm256_srli_epi16(x.b, N)}; }
template <int N>
MOE_INLINE R rsrl32(R x) { return {_mm256_srli_epi32(x.a, N), _mm256_srli_epi32(x.b, N)}; }
MOE_INLINE V rfloat(R x) { return {_mm256_cvtepi32_ps(x.a), _mm256_cvtepi32_ps(x.b)}; }
MOE_INLINE R ru8(const uint8_t* p) {
    return {_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))),
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)))};
}
MOE_INLINE R rs8(const uint8_t* p) {
    return {_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))),
            _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)))};
}
// The AVX-512 section's integer dot products, on AVX2's vpmaddubsw + vpmaddwd (same saturation rules).
MOE_INLINE __m256i dot_half(__m256i acc, __m256i p16) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}
MOE_INLINE R rdot(R acc, R u, R s) {
    return {dot_half(acc.a, _mm256_maddubs_epi16(u.a, s.a)), dot_half(acc.b, _mm256_maddubs_epi16(u.b, s.b))};
}
MOE_INLINE R rdot2(R acc, R u0, R s0, R u1, R s1) {
    return {dot_half(acc.a, _mm256_add_epi16(_mm256_maddubs_epi16(u0.a, s0.a), _mm256_maddubs_epi16(u1.a, s1.a))),
            dot_half(acc.b, _mm256_add_epi16(_mm256_maddubs_epi16(u0.b, s0.b), _mm256_maddubs_epi16(u1.b, s1.b)))};
}
MOE_INLINE R rdot_signed(R acc, R w, R s) {
    return {dot_half(acc.a, _mm256_maddubs_epi16(_mm256_abs_epi8(w.a), _mm256_sign_epi8(s.a, w.a))),
            dot_half(acc.b, _mm256_maddubs_epi16(_mm256_abs_epi8(w.b), _mm256_sign_epi8(s.b, w.b)))};
}
MOE_INLINE R rdot16(R acc, R x, R y) {
    return {_mm256_add_epi32(acc.a, _mm256_madd_epi16(x.a, y.a)), _mm256_add_epi32(acc.b, _mm256_madd_epi16(x.b, y.b))};
}
#endif

// exp(x) to ~2 ulp: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial, then scale by 2^n.
MOE_INLINE V vexp(V x) {
    x = vmin(vmax(x, vset1(-87.0f)), vset1(88.0f));
    V n = vround(vmul(x, vset1(1.44269504088896341f)));
    V r = vfma(n, vset1(-0.693145751953125f), x);
    r = vfma(n, vset1(-1.428606765330187045e-06f), r);
    V p = vset1(1.0f / 720);
    p = vfma(p, r, vset1(1.0f / 120));
    p = vfma(p, r, vset1(1.0f / 24));
    p = vfma(p, r, vset1(1.0f / 6));
    p = vfma(p, r, vset1(0.5f));
    p = vfma(p, r, vset1(1.0f));
    p = vfma(p, r, vset1(1.0f));
    return vscale2(p, n);
}
MOE_INLINE V vsigmoid(V x) { return vdiv(vset1(1.0f), vadd(vset1(1.0f), vexp(vsub(vzero(), x)))); }

// fp32 -> bf16, round to nearest even (NaN stays NaN). Branch-free, so loops over it vectorize.
MOE_INLINE uint16_t f32_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const uint32_t quiet_nan = (u >> 16) | 0x40u;
    return uint16_t((u & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded);
}
MOE_INLINE float bf16_to_f32(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

}  // namespace MOETIER_NS
}  // namespace moetier_kernels
