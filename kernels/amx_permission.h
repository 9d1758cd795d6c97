// Linux gates the AMX tile data state per process: it must be requested before the first tile
// instruction, otherwise that instruction faults. Used by the CPUID probe (hardware detection) and by
// the amx kernel module when it is imported.
#pragma once
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>

namespace moetier_os {

// arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): 0 on success, else errno (-1: not Linux).
inline int request_amx_permission() {
#if defined(__linux__) && defined(SYS_arch_prctl)
    constexpr int ARCH_REQ_XCOMP_PERM = 0x1023;
    constexpr int XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 0 : errno;
#else
    return -1;
#endif
}

}  // namespace moetier_os
