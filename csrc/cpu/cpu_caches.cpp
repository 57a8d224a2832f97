#include "cpu_caches.h"

#include <cctype>
#include <cstdio>
#include <cstring>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>  // sysconf
#endif
#if defined(__x86_64__)
#include <cpuid.h>
#endif

namespace fusedrnn::cpu {

namespace {

// "32768K" (sysfs cache sizes) in bytes; 0 when the file is missing or unreadable.
int64_t sysfs_cache_bytes(const char* path) {
  std::FILE* f = std::fopen(path, "r");
  if (f == nullptr) return 0;
  char text[32] = {0};
  const bool read = std::fgets(text, sizeof(text), f) != nullptr;
  std::fclose(f);
  if (!read) return 0;
  int64_t value = 0;
  const char* c = text;
  for (; std::isdigit(static_cast<unsigned char>(*c)); ++c) value = value * 10 + (*c - '0');
  if (*c == 'K') value <<= 10;
  if (*c == 'M') value <<= 20;
  return value;
}

}  // namespace

int64_t l2_bytes() {
  static const int64_t bytes = [] {
    int64_t l2 = 0;
#if defined(_SC_LEVEL2_CACHE_SIZE)
    l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return l2 > 0 ? l2 : int64_t(1) << 20;
  }();
  return bytes;
}

int64_t l3_bytes() {
  static const int64_t bytes = [] {
    // index3 is the L3 on x86 Linux; its level file says so.
    if (sysfs_cache_bytes("/sys/devices/system/cpu/cpu0/cache/index3/level") != 3) return int64_t{0};
    return sysfs_cache_bytes("/sys/devices/system/cpu/cpu0/cache/index3/size");
  }();
  return bytes;
}

bool is_amd() {
  static const bool amd = [] {
#if defined(__x86_64__)
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return false;
    char vendor[13];
    std::memcpy(vendor, &ebx, 4);
    std::memcpy(vendor + 4, &edx, 4);
    std::memcpy(vendor + 8, &ecx, 4);
    vendor[12] = '\0';
    return std::strcmp(vendor, "AuthenticAMD") == 0;
#else
    return false;
#endif
  }();
  return amd;
}

}  // namespace fusedrnn::cpu
