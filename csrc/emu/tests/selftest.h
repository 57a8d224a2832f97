// A minimal test registry for the emulator's self-tests (no external framework, so that the
// sanitizer builds need nothing but the compiler).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "cuda_emu.h"

namespace selftest {

struct TestCase {
  const char* name;
  std::function<void()> body;
};
inline std::vector<TestCase>& registry() {
  static std::vector<TestCase> tests;
  return tests;
}
struct Registrar {
  Registrar(const char* name, std::function<void()> body) {
    registry().push_back({name, std::move(body)});
  }
};
inline int& failures() {
  static int count = 0;
  return count;
}

}  // namespace selftest

#define SELFTEST_CONCAT2(a, b) a##b
#define SELFTEST_CONCAT(a, b) SELFTEST_CONCAT2(a, b)
#define TEST_CASE(name)                                                              \
  static void name();                                                                \
  static const selftest::Registrar SELFTEST_CONCAT(registrar_, name)(#name, name);   \
  static void name()

#define CHECK(cond)                                                                  \
  do {                                                                               \
    if (!(cond)) {                                                                   \
      std::fprintf(stderr, "  CHECK failed at %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      ++selftest::failures();                                                        \
    }                                                                                \
  } while (0)

#define CHECK_EQ(a, b)                                                               \
  do {                                                                               \
    const auto selftest_a_ = (a);                                                    \
    const auto selftest_b_ = (b);                                                    \
    if (!(selftest_a_ == selftest_b_)) {                                             \
      std::fprintf(stderr, "  CHECK_EQ failed at %s:%d: %s == %s (%s vs %s)\n", __FILE__, \
                   __LINE__, #a, #b, std::to_string(selftest_a_).c_str(),            \
                   std::to_string(selftest_b_).c_str());                             \
      ++selftest::failures();                                                        \
    }                                                                                \
  } while (0)

// Checks that a launch succeeded; prints the emulator's message otherwise.
#define CHECK_LAUNCH_OK(expr)                                                        \
  do {                                                                               \
    const cudaError_t selftest_e_ = (expr);                                          \
    if (selftest_e_ != cudaSuccess) {                                                \
      std::fprintf(stderr, "  launch failed at %s:%d: %s\n", __FILE__, __LINE__,     \
                   cudaGetErrorString(selftest_e_));                                 \
      ++selftest::failures();                                                        \
    }                                                                                \
    (void)cudaGetLastError();                                                        \
  } while (0)

// Checks that a launch failed with `code` and that the message contains `needle`.
#define CHECK_LAUNCH_FAILS(expr, code, needle)                                       \
  do {                                                                               \
    const cudaError_t selftest_e_ = (expr);                                          \
    const std::string selftest_msg_ = cudaGetErrorString(selftest_e_);               \
    if (selftest_e_ != (code) || selftest_msg_.find(needle) == std::string::npos) {  \
      std::fprintf(stderr, "  expected failure %s with '%s' at %s:%d, got %s: %s\n", \
                   cudaGetErrorName(code), needle, __FILE__, __LINE__,               \
                   cudaGetErrorName(selftest_e_), selftest_msg_.c_str());            \
      ++selftest::failures();                                                        \
    }                                                                                \
    (void)cudaGetLastError();                                                        \
  } while (0)
