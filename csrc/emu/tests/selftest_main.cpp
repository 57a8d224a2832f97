// Runs every registered emulator self-test, or those whose name contains argv[1].
#include <chrono>
#include <cstring>

#include "selftest.h"

int main(int argc, char** argv) {
  const char* filter = argc > 1 ? argv[1] : nullptr;
  int run = 0;
  for (const auto& test : selftest::registry()) {
    if (filter != nullptr && std::strstr(test.name, filter) == nullptr) continue;
    const int before = selftest::failures();
    const auto start = std::chrono::steady_clock::now();
    test.body();
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    std::printf("%-4s %-48s %8.1f ms\n", selftest::failures() == before ? "ok" : "FAIL", test.name,
                ms);
    std::fflush(stdout);
    ++run;
  }
  if (run == 0) {
    std::fprintf(stderr, "no test matches '%s'\n", filter ? filter : "");
    return 2;
  }
  std::printf("%d test(s), %d failed check(s)\n", run, selftest::failures());
  return selftest::failures() == 0 ? 0 : 1;
}
