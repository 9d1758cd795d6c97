// Which ISA variant this translation unit is being compiled for. setup.py compiles the same sources once
// per variant with its own -m flags and defines MOETIER_VARIANT_<NAME>. Every C++ symbol lives in a
// namespace named after the variant, so two variants loaded into one process never share a type.
#pragma once

#if defined(MOETIER_VARIANT_AMX) && defined(MOETIER_AMX_EMULATOR)
// Test builds only: the amx kernels over a software tile unit (tests/amx_emulator), so their tiling and
// epilogues run on a CPU without AMX. Never part of a wheel.
#define MOETIER_NS v_amx_emulated
#define MOETIER_MODULE _moe_amx_emulated
#elif defined(MOETIER_VARIANT_AMX)
#define MOETIER_NS v_amx
#define MOETIER_MODULE _moe_amx
#elif defined(MOETIER_VARIANT_AVX512_BF16)
#define MOETIER_NS v_avx512_bf16
#define MOETIER_MODULE _moe_avx512_bf16
#elif defined(MOETIER_VARIANT_AVX512)
#define MOETIER_NS v_avx512
#define MOETIER_MODULE _moe_avx512
#elif defined(MOETIER_VARIANT_AVX2)
#define MOETIER_NS v_avx2
#define MOETIER_MODULE _moe_avx2
#else
#error "compile with -DMOETIER_VARIANT_<AVX2|AVX512|AVX512_BF16|AMX>"
#endif

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "every variant needs at least AVX2, FMA and F16C"
#endif
#if (defined(MOETIER_VARIANT_AVX512) || defined(MOETIER_VARIANT_AVX512_BF16) || defined(MOETIER_VARIANT_AMX)) && \
    !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__))
#error "AVX-512 variants need -mavx512f -mavx512bw -mavx512vl -mavx512dq"
#endif

// vdpbf16ps kernels (bf16 products, fp8 / fp16 through bf16): only where the compiler may emit them.
#if defined(__AVX512BF16__) && defined(__AVX512VNNI__)
#define MOETIER_HAS_DOT 1
#else
#define MOETIER_HAS_DOT 0
#endif

// vpdpbusd / vpdpwssd for the integer dot kernel; without them it runs on vpmaddubsw + vpmaddwd (simd.h).
#if defined(__AVX512VNNI__)
#define MOETIER_HAS_VNNI 1
#else
#define MOETIER_HAS_VNNI 0
#endif

// AMX tile kernels (tdpbf16ps / tdpbusd prefill): the amx build, or a test build over the emulator.
#if defined(MOETIER_VARIANT_AMX) && MOETIER_HAS_DOT && \
    ((defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AMX_INT8__)) || defined(MOETIER_AMX_EMULATOR))
#define MOETIER_HAS_AMX 1
#else
#define MOETIER_HAS_AMX 0
#endif
