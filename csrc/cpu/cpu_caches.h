// What the CPU recurrence's thread split needs to know of the caches it runs on: a core's L2 and
// the L3 its threads share, in bytes, and whether the CPU is AMD's. Read once, from the OS.
#pragma once

#include <cstdint>

namespace fusedrnn::cpu {

// A core's L2 (1 MB when the OS does not say).
int64_t l2_bytes();
// The L3 of CPU 0, which the cores of its complex share, as Linux's sysfs reports it (on AMD one
// core complex's: 16-32 MB); 0 when unknown. Not sysconf(_SC_LEVEL3_CACHE_SIZE): in a VM on
// a Zen 4 host glibc reported 320 MB, the whole socket's, where sysfs and lscpu said 32 MB.
int64_t l3_bytes();
// Whether cpuid says AuthenticAMD.
bool is_amd();

}  // namespace fusedrnn::cpu
