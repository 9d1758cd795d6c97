// CPUID, XCR0 and the AMX permission request, compiled for baseline x86-64 so that it runs on every
// x86 CPU: this module decides which kernel variant may be loaded, so it must never need one itself.
#include <pybind11/pybind11.h>

#include <cpuid.h>

#include <cstdint>
#include <string>

#include "../amx_permission.h"

namespace py = pybind11;

namespace {

py::tuple cpuid(uint32_t leaf, uint32_t subleaf) {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(leaf, subleaf, &a, &b, &c, &d)) {
        // Leaf above the maximum the CPU supports: report zeros, like a CPU without the feature.
        a = b = c = d = 0;
    }
    return py::make_tuple(a, b, c, d);
}

uint32_t max_leaf(uint32_t base) { return __get_cpuid_max(base, nullptr); }

// XCR0 says which register states the OS saves on context switch; a feature whose state the OS does
// not save is unusable even when CPUID reports it. xgetbv is only legal when CPUID.1:ECX.OSXSAVE is set.
uint64_t xcr0() {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return 0;
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (static_cast<uint64_t>(hi) << 32) | lo;
}

std::string vendor() {
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return "";
    char s[13];
    *reinterpret_cast<unsigned*>(s) = b;
    *reinterpret_cast<unsigned*>(s + 4) = d;
    *reinterpret_cast<unsigned*>(s + 8) = c;
    s[12] = 0;
    return s;
}

}  // namespace

PYBIND11_MODULE(_cpuid, m) {
    m.doc() = "Raw CPUID / XCR0 access for moetier's hardware inventory (baseline x86-64 build).";
    m.def("cpuid", &cpuid, py::arg("leaf"), py::arg("subleaf") = 0, "Registers (eax, ebx, ecx, edx).");
    m.def("max_leaf", &max_leaf, py::arg("base") = 0);
    m.def("xcr0", &xcr0, "XCR0 (0 when the OS has not enabled XSAVE).");
    m.def("request_amx_permission", &moetier_os::request_amx_permission,
          "arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): 0 on success, else the errno.");
    m.def("vendor", &vendor);
}
