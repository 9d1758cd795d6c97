// Anonymous memory that starts on a 2 MiB boundary and asks for transparent huge pages: the packed
// experts (moe_layer.h) and the bandwidth probe (bench_probes) stream from it. With 4 KiB pages every
// page boundary costs a TLB miss and stops the hardware prefetcher; a mapping that is not 2 MiB-aligned
// gets few or no huge pages.
#pragma once
#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <new>

namespace moetier_os {

constexpr size_t HUGE_PAGE = size_t(2) << 20;

constexpr size_t SMALL_PAGE = size_t(4) << 10;

inline size_t round_up_huge(size_t bytes) { return (bytes + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE; }
inline size_t round_up_small(size_t bytes) { return (bytes + SMALL_PAGE - 1) / SMALL_PAGE * SMALL_PAGE; }

// `bytes` (a multiple of 4 KiB) at a 2 MiB boundary: over-map by one huge page and trim both ends. The
// whole 2 MiB ranges get huge pages; a tail shorter than one stays in 4 KiB pages (a huge page there
// would make resident memory up to 2 MiB larger than the buffer).
inline uint8_t* map_huge(size_t bytes) {
    const size_t span = bytes + HUGE_PAGE;
    void* p = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    uint8_t* raw = static_cast<uint8_t*>(p);
    uint8_t* aligned = reinterpret_cast<uint8_t*>(round_up_huge(reinterpret_cast<uintptr_t>(raw)));
    if (aligned > raw) munmap(raw, size_t(aligned - raw));
    const size_t tail = size_t(raw + span - (aligned + bytes));
    if (tail) munmap(aligned + bytes, tail);
    madvise(aligned, bytes, MADV_HUGEPAGE);
    return aligned;
}

inline void unmap_huge(uint8_t* p, size_t bytes) { munmap(p, bytes); }

}  // namespace moetier_os
