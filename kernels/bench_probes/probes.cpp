// Machine-limit probes for `moetier bench`: a STREAM-like multi-threaded read of arrays far larger than
// the last-level cache, and register-only peaks of the two dot-product instructions the expert kernels
// are built on (vdpbf16ps for bf16, vpdpbusd for int8).
//
// The module is compiled for baseline x86-64 so it imports on every x86 CPU. Each wide kernel is a
// function with __attribute__((target(...))); Python calls one only when the inventory says the CPU has
// the feature, and each entry point checks again here (an inventory loaded from a file may describe
// another machine), so a missing feature is a Python exception, never SIGILL.
#include <pybind11/pybind11.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "../huge_pages.h"

namespace py = pybind11;

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
    return std::chrono::duration<double>(Clock::now() - t0).count();
}

// A reusable spin barrier: the probes' threads start each timed region together. Waits are short
// (all threads do equal work), so spinning costs nothing measurable.
class SpinBarrier {
  public:
    explicit SpinBarrier(int n) : n_(n) {}
    void wait() {
        const int gen = gen_.load(std::memory_order_acquire);
        if (count_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
            count_.store(0, std::memory_order_relaxed);
            gen_.fetch_add(1, std::memory_order_release);
        } else {
            while (gen_.load(std::memory_order_acquire) == gen) _mm_pause();
        }
    }

  private:
    const int n_;
    std::atomic<int> count_{0};
    std::atomic<int> gen_{0};
};

// Run fn(thread_index) on `threads` threads (the caller is thread 0) and join.
template <class Fn>
void run_on_threads(int threads, Fn fn) {
    std::vector<std::thread> pool;
    pool.reserve(threads - 1);
    for (int t = 1; t < threads; ++t) pool.emplace_back(fn, t);
    fn(0);
    for (auto& th : pool) th.join();
}

// ---- read bandwidth ------------------------------------------------------------------------------

uint64_t read_sse2(const uint8_t* p, size_t n) {
    __m128i a0 = _mm_setzero_si128(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i + 64 <= n; i += 64) {
        a0 = _mm_xor_si128(a0, _mm_load_si128(reinterpret_cast<const __m128i*>(p + i)));
        a1 = _mm_xor_si128(a1, _mm_load_si128(reinterpret_cast<const __m128i*>(p + i + 16)));
        a2 = _mm_xor_si128(a2, _mm_load_si128(reinterpret_cast<const __m128i*>(p + i + 32)));
        a3 = _mm_xor_si128(a3, _mm_load_si128(reinterpret_cast<const __m128i*>(p + i + 48)));
    }
    __m128i a = _mm_xor_si128(_mm_xor_si128(a0, a1), _mm_xor_si128(a2, a3));
    return static_cast<uint64_t>(_mm_cvtsi128_si64(a));
}

__attribute__((target("avx2"))) uint64_t read_avx2(const uint8_t* p, size_t n) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i + 128 <= n; i += 128) {
        a0 = _mm256_xor_si256(a0, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i)));
        a1 = _mm256_xor_si256(a1, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
        a2 = _mm256_xor_si256(a2, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
        a3 = _mm256_xor_si256(a3, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
    }
    __m256i a = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
    return static_cast<uint64_t>(_mm256_extract_epi64(a, 0));
}

__attribute__((target("avx512f"))) uint64_t read_avx512(const uint8_t* p, size_t n) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i + 256 <= n; i += 256) {
        a0 = _mm512_xor_si512(a0, _mm512_load_si512(p + i));
        a1 = _mm512_xor_si512(a1, _mm512_load_si512(p + i + 64));
        a2 = _mm512_xor_si512(a2, _mm512_load_si512(p + i + 128));
        a3 = _mm512_xor_si512(a3, _mm512_load_si512(p + i + 192));
    }
    __m512i a = _mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3));
    return static_cast<uint64_t>(_mm_cvtsi128_si64(_mm512_castsi512_si128(a)));
}

using ReadFn = uint64_t (*)(const uint8_t*, size_t);

ReadFn read_kernel(const std::string& isa) {
    __builtin_cpu_init();
    if (isa == "sse2") return read_sse2;
    if (isa == "avx2") {
        if (!__builtin_cpu_supports("avx2")) throw std::invalid_argument("read probe: this CPU lacks avx2");
        return read_avx2;
    }
    if (isa == "avx512") {
        if (!__builtin_cpu_supports("avx512f")) throw std::invalid_argument("read probe: this CPU lacks avx512f");
        return read_avx512;
    }
    throw std::invalid_argument("read probe: unknown isa '" + isa + "' (sse2, avx2, avx512)");
}

std::atomic<uint64_t> g_sink{0};  // keeps the reads observable so the compiler cannot drop them

// Each thread reads its own contiguous slice (first-touched by that thread, so it lives on its NUMA
// node); returns the rate of every repeat in GB/s (1e9 bytes/s) over the whole array.
py::list read_bandwidth(size_t nbytes, int threads, int repeats, const std::string& isa) {
    if (threads < 1 || threads > 1024) throw std::invalid_argument("read probe: threads must be in [1, 1024]");
    if (repeats < 1) throw std::invalid_argument("read probe: repeats must be >= 1");
    ReadFn fn = read_kernel(isa);
    // 2 MiB-aligned and backed by transparent huge pages, like the kernels' packed experts: with 4 KiB
    // pages every page boundary stops the hardware prefetcher and costs a TLB miss, and the probe
    // would report less than the kernels stream (measured here: 46 vs 54 GB/s on 2 threads).
    const size_t slice = std::max(moetier_os::HUGE_PAGE, moetier_os::round_up_huge(nbytes / threads));
    const size_t total = slice * threads;
    uint8_t* buf = moetier_os::map_huge(total);
    std::vector<double> rates(repeats);
    {
        py::gil_scoped_release nogil;
        SpinBarrier barrier(threads);
        Clock::time_point t0;
        run_on_threads(threads, [&](int t) {
            uint8_t* mine = buf + slice * t;
            std::memset(mine, 0x5a + t, slice);  // first touch by the reading thread
            uint64_t acc = 0;
            for (int r = 0; r < repeats; ++r) {
                barrier.wait();
                if (t == 0) t0 = Clock::now();
                barrier.wait();
                acc ^= fn(mine, slice);
                barrier.wait();
                if (t == 0) rates[r] = static_cast<double>(total) / seconds_since(t0) / 1e9;
            }
            g_sink.fetch_xor(acc, std::memory_order_relaxed);
        });
    }
    moetier_os::unmap_huge(buf, total);
    py::list out;
    for (double r : rates) out.append(r);
    return out;
}

// ---- dot-product peaks ---------------------------------------------------------------------------
// 16 independent accumulators cover the instruction latency (about 6 cycles) at 2 issues per cycle.

__attribute__((target("avx512f,avx512bf16"))) float bf16_dot_loop(uint64_t iters, float seed) {
    const __m512 va = _mm512_set1_ps(seed), vb = _mm512_set1_ps(1.0f / (seed + 3.0f));
    const __m512bh a = _mm512_cvtne2ps_pbh(va, va), b = _mm512_cvtne2ps_pbh(vb, vb);
    __m512 acc[16];
    for (auto& x : acc) x = _mm512_setzero_ps();
    for (uint64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 16
        for (int j = 0; j < 16; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], a, b);
    }
    __m512 s = acc[0];
    for (int j = 1; j < 16; ++j) s = _mm512_add_ps(s, acc[j]);
    return _mm512_reduce_add_ps(s);
}

__attribute__((target("avx512f,avx512vnni"))) int32_t int8_dot_loop(uint64_t iters, int32_t seed) {
    const __m512i a = _mm512_set1_epi32(seed & 0x01010101), b = _mm512_set1_epi32((seed >> 3) & 0x01010101);
    __m512i acc[16];
    for (auto& x : acc) x = _mm512_setzero_si512();
    for (uint64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 16
        for (int j = 0; j < 16; ++j) acc[j] = _mm512_dpbusd_epi32(acc[j], a, b);
    }
    __m512i s = acc[0];
    for (int j = 1; j < 16; ++j) s = _mm512_add_epi32(s, acc[j]);
    return _mm512_reduce_add_epi32(s);
}

// FLOP (or int OP) per call of one instruction on 512-bit registers: 16 lanes x 2 (bf16) or 4 (int8)
// products, each a multiply and an add.
constexpr double kBf16OpsPerInstr = 16 * 2 * 2;
constexpr double kInt8OpsPerInstr = 16 * 4 * 2;

// Runs `loop` on every thread for about `seconds` (calibrated on one thread first); returns ops/s.
template <class Loop>
py::dict dot_peak(int threads, double seconds, double ops_per_instr, Loop loop) {
    if (threads < 1 || threads > 1024) throw std::invalid_argument("peak probe: threads must be in [1, 1024]");
    if (!(seconds > 0)) throw std::invalid_argument("peak probe: seconds must be positive");
    double elapsed = 0;
    uint64_t iters = 0;
    {
        py::gil_scoped_release nogil;
        uint64_t cal = 1 << 14;
        for (;;) {  // calibrate: grow until one run takes >= 20 ms
            auto t0 = Clock::now();
            g_sink.fetch_add(static_cast<uint64_t>(loop(cal, 3)), std::memory_order_relaxed);
            double dt = seconds_since(t0);
            if (dt >= 0.02 || cal > (uint64_t(1) << 40)) {
                iters = std::max<uint64_t>(1, static_cast<uint64_t>(cal * seconds / dt));
                break;
            }
            cal *= 4;
        }
        SpinBarrier barrier(threads);
        Clock::time_point t0;
        run_on_threads(threads, [&](int t) {
            barrier.wait();
            if (t == 0) t0 = Clock::now();
            barrier.wait();
            auto r = loop(iters, 3 + t);
            barrier.wait();
            if (t == 0) elapsed = seconds_since(t0);
            g_sink.fetch_add(static_cast<uint64_t>(r), std::memory_order_relaxed);
        });
    }
    const double ops = static_cast<double>(iters) * 16 * ops_per_instr * threads;
    py::dict out;
    out["ops_per_s"] = ops / elapsed;
    out["seconds"] = elapsed;
    out["instructions_per_thread"] = static_cast<double>(iters) * 16;
    return out;
}

py::dict bf16_peak(int threads, double seconds) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512bf16"))
        throw std::invalid_argument("bf16 peak probe: this CPU lacks avx512_bf16 (vdpbf16ps)");
    return dot_peak(threads, seconds, kBf16OpsPerInstr,
                    [](uint64_t n, int s) { return bf16_dot_loop(n, 0.001f * static_cast<float>(s)); });
}

py::dict int8_peak(int threads, double seconds) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512vnni"))
        throw std::invalid_argument("int8 peak probe: this CPU lacks avx512_vnni (vpdpbusd)");
    return dot_peak(threads, seconds, kInt8OpsPerInstr, [](uint64_t n, int s) { return int8_dot_loop(n, s); });
}

}  // namespace

PYBIND11_MODULE(_probes, m) {
    m.doc() = "Machine-limit probes for moetier bench: DRAM read bandwidth, bf16 and int8 dot-product peaks.";
    m.def("read_bandwidth", &read_bandwidth, py::arg("nbytes"), py::arg("threads"), py::arg("repeats"),
          py::arg("isa"), "GB/s of each repeat of a multi-threaded read of nbytes (isa: sse2, avx2, avx512).");
    m.def("bf16_peak", &bf16_peak, py::arg("threads"), py::arg("seconds"),
          "vdpbf16ps (512-bit) FLOP/s on `threads` threads: {'ops_per_s', 'seconds', 'instructions_per_thread'}.");
    m.def("int8_peak", &int8_peak, py::arg("threads"), py::arg("seconds"),
          "vpdpbusd (512-bit) int8 OP/s on `threads` threads: {'ops_per_s', 'seconds', 'instructions_per_thread'}.");
}
