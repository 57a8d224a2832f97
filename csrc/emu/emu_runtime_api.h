// The subset of the CUDA runtime API that fusedrnn's host code calls, on host memory and the fake
// device of emu::device_config(). Streams are accepted and ignored: every call completes before it
// returns, so the stream-ordered calls are trivially ordered.
#pragma once

#include <cstdlib>
#include <cstring>
#include <utility>

#include "emu_launch.h"

inline cudaError_t cudaGetLastError() {
  const cudaError_t code = emu::detail::last_error;
  emu::detail::last_error = cudaSuccess;
  return code;
}
inline cudaError_t cudaPeekAtLastError() { return emu::detail::last_error; }

inline const char* cudaGetErrorName(cudaError_t code) {
  switch (code) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInitializationError: return "cudaErrorInitializationError";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorLaunchTimeout: return "cudaErrorLaunchTimeout";
    case cudaErrorAssert: return "cudaErrorAssert";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorCooperativeLaunchTooLarge: return "cudaErrorCooperativeLaunchTooLarge";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    default: return "cudaErrorUnknown";
  }
}

// For the code of the last error recorded on this thread, the emulator's detailed message
// (which kernel, which thread, which barrier); otherwise the error's name.
inline const char* cudaGetErrorString(cudaError_t code) {
  if (code != cudaSuccess && code == emu::detail::last_message_code &&
      !emu::detail::last_message.empty()) {
    return emu::detail::last_message.c_str();
  }
  return code == cudaSuccess ? "no error" : cudaGetErrorName(code);
}

// ---------------------------------------------------------------- device queries
inline cudaError_t cudaGetDevice(int* device) {
  if (device == nullptr) return emu::detail::record_error(cudaErrorInvalidValue, "cudaGetDevice: null");
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) {
  if (device != 0) {
    return emu::detail::record_error(cudaErrorInvalidDevice,
                                     "cudaSetDevice: the emulator has only device 0");
  }
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceCount(int* count) {
  if (count == nullptr) return emu::detail::record_error(cudaErrorInvalidValue, "cudaGetDeviceCount: null");
  *count = 1;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (value == nullptr || device != 0) {
    return emu::detail::record_error(cudaErrorInvalidValue,
                                     "cudaDeviceGetAttribute: null value or device != 0");
  }
  const emu::DeviceConfig& c = emu::device_config();
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = c.max_threads_per_block; break;
    case cudaDevAttrMaxBlockDimX: *value = 1024; break;
    case cudaDevAttrMaxBlockDimY: *value = 1024; break;
    case cudaDevAttrMaxBlockDimZ: *value = 64; break;
    case cudaDevAttrMaxGridDimX: *value = 2147483647; break;
    case cudaDevAttrMaxGridDimY: *value = 65535; break;
    case cudaDevAttrMaxGridDimZ: *value = 65535; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = static_cast<int>(c.smem_per_block); break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMaxRegistersPerBlock: *value = c.regs_per_sm; break;
    case cudaDevAttrMultiProcessorCount: *value = c.sm_count; break;
    case cudaDevAttrL2CacheSize: *value = 4 * 1024 * 1024; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = c.max_threads_per_sm; break;
    case cudaDevAttrComputeCapabilityMajor: *value = c.cc_major; break;
    case cudaDevAttrComputeCapabilityMinor: *value = c.cc_minor; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = static_cast<int>(c.smem_per_sm); break;
    case cudaDevAttrMaxRegistersPerMultiprocessor: *value = c.regs_per_sm; break;
    case cudaDevAttrCooperativeLaunch: *value = 1; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(c.smem_per_block_optin()); break;
    case cudaDevAttrMaxBlocksPerMultiprocessor: *value = c.max_blocks_per_sm; break;
    case cudaDevAttrReservedSharedMemoryPerBlock: *value = static_cast<int>(c.smem_reserved_per_block); break;
    default:
      return emu::detail::record_error(cudaErrorInvalidValue,
                                       "cudaDeviceGetAttribute: attribute " +
                                           std::to_string(static_cast<int>(attr)) +
                                           " is not emulated");
  }
  return cudaSuccess;
}

inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (prop == nullptr || device != 0) {
    return emu::detail::record_error(cudaErrorInvalidValue,
                                     "cudaGetDeviceProperties: null prop or device != 0");
  }
  const emu::DeviceConfig& c = emu::device_config();
  std::memset(prop, 0, sizeof(*prop));
  std::strncpy(prop->name, "fusedrnn CPU emulator", sizeof(prop->name) - 1);
  prop->totalGlobalMem = size_t{1} << 34;
  prop->sharedMemPerBlock = c.smem_per_block;
  prop->sharedMemPerBlockOptin = c.smem_per_block_optin();
  prop->sharedMemPerMultiprocessor = c.smem_per_sm;
  prop->reservedSharedMemPerBlock = c.smem_reserved_per_block;
  prop->regsPerBlock = c.regs_per_sm;
  prop->regsPerMultiprocessor = c.regs_per_sm;
  prop->warpSize = 32;
  prop->maxThreadsPerBlock = c.max_threads_per_block;
  prop->maxThreadsDim[0] = 1024;
  prop->maxThreadsDim[1] = 1024;
  prop->maxThreadsDim[2] = 64;
  prop->maxGridSize[0] = 2147483647;
  prop->maxGridSize[1] = 65535;
  prop->maxGridSize[2] = 65535;
  prop->maxThreadsPerMultiProcessor = c.max_threads_per_sm;
  prop->maxBlocksPerMultiProcessor = c.max_blocks_per_sm;
  prop->multiProcessorCount = c.sm_count;
  prop->major = c.cc_major;
  prop->minor = c.cc_minor;
  prop->cooperativeLaunch = 1;
  prop->l2CacheSize = 4 * 1024 * 1024;
  return cudaSuccess;
}

// ---------------------------------------------------------------- kernel attributes and occupancy
template <class T>
inline cudaError_t cudaFuncSetAttribute(T* func, cudaFuncAttribute attr, int value) {
  const void* fn = reinterpret_cast<const void*>(func);
  if (fn == nullptr) {
    return emu::detail::record_error(cudaErrorInvalidDeviceFunction, "cudaFuncSetAttribute: null kernel");
  }
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    const size_t optin = emu::device_config().smem_per_block_optin();
    if (value < 0 || static_cast<size_t>(value) > optin) {
      return emu::detail::record_error(
          cudaErrorInvalidValue, "cudaFuncSetAttribute(MaxDynamicSharedMemorySize=" +
                                     std::to_string(value) + "): must be in [0, " +
                                     std::to_string(optin) + "] on the emulated device");
    }
    std::lock_guard<std::mutex> lock(emu::detail::function_attributes_mutex());
    emu::detail::function_attributes()[fn].max_dynamic_smem = value;
    return cudaSuccess;
  }
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) return cudaSuccess;
  return emu::detail::record_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: unknown attribute");
}

template <class T>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, T* func) {
  if (attributes == nullptr || func == nullptr) {
    return emu::detail::record_error(cudaErrorInvalidValue, "cudaFuncGetAttributes: null argument");
  }
  std::memset(attributes, 0, sizeof(*attributes));
  const emu::DeviceConfig& c = emu::device_config();
  attributes->maxThreadsPerBlock = c.max_threads_per_block;
  attributes->numRegs = 32;  // unknown on the CPU; the real numbers come from ptxas
  attributes->ptxVersion = c.cc_major * 10 + c.cc_minor;
  attributes->binaryVersion = attributes->ptxVersion;
  const size_t limit = emu::detail::dynamic_smem_limit(reinterpret_cast<const void*>(func));
  attributes->maxDynamicSharedSizeBytes = static_cast<int>(limit);
  return cudaSuccess;
}

// Occupancy from threads and dynamic shared memory only (registers and static shared memory are
// unknown to the emulator).
template <class T>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* num_blocks, T* func,
                                                                 int block_size,
                                                                 size_t dynamic_smem) {
  if (num_blocks == nullptr || func == nullptr) {
    return emu::detail::record_error(cudaErrorInvalidValue,
                                     "cudaOccupancyMaxActiveBlocksPerMultiprocessor: null argument");
  }
  *num_blocks = emu::detail::max_active_blocks_per_sm(block_size, dynamic_smem);
  return cudaSuccess;
}
template <class T>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* num_blocks, T* func,
                                                                          int block_size,
                                                                          size_t dynamic_smem,
                                                                          unsigned /*flags*/) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(num_blocks, func, block_size, dynamic_smem);
}

// ---------------------------------------------------------------- launches through the runtime API
// Typed like the runtime's template overloads: pass the kernel itself, not a void*.
template <class... KArgs>
inline cudaError_t cudaLaunchKernel(void (*func)(KArgs...), dim3 grid, dim3 block, void** args,
                                    size_t dynamic_smem = 0, cudaStream_t /*stream*/ = nullptr) {
  return emu::detail::launch_from_pointers(false, func, grid, block, dynamic_smem, args,
                                           std::index_sequence_for<KArgs...>{});
}
template <class... KArgs>
inline cudaError_t cudaLaunchCooperativeKernel(void (*func)(KArgs...), dim3 grid, dim3 block,
                                               void** args, size_t dynamic_smem = 0,
                                               cudaStream_t /*stream*/ = nullptr) {
  return emu::detail::launch_from_pointers(true, func, grid, block, dynamic_smem, args,
                                           std::index_sequence_for<KArgs...>{});
}

// ---------------------------------------------------------------- memory (host memory)
inline cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  if (ptr == nullptr) return emu::detail::record_error(cudaErrorInvalidValue, "cudaMalloc: null");
  *ptr = std::aligned_alloc(256, (bytes + 255) / 256 * 256 + 256);
  return *ptr ? cudaSuccess
              : emu::detail::record_error(cudaErrorMemoryAllocation, "cudaMalloc: out of memory");
}
template <class T>
inline cudaError_t cudaMalloc(T** ptr, size_t bytes) {
  return cudaMalloc(reinterpret_cast<void**>(ptr), bytes);
}
inline cudaError_t cudaFree(void* ptr) {
  std::free(ptr);
  return cudaSuccess;
}
inline cudaError_t cudaMemset(void* ptr, int value, size_t bytes) {
  if (bytes > 0 && ptr == nullptr) return emu::detail::record_error(cudaErrorInvalidValue, "cudaMemset: null");
  if (bytes > 0) std::memset(ptr, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t = nullptr) {
  return cudaMemset(ptr, value, bytes);
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  if (bytes > 0 && (dst == nullptr || src == nullptr)) {
    return emu::detail::record_error(cudaErrorInvalidValue, "cudaMemcpy: null pointer");
  }
  if (bytes > 0) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                                   cudaStream_t = nullptr) {
  return cudaMemcpy(dst, src, bytes, kind);
}
inline cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch,
                                     size_t width, size_t height, cudaMemcpyKind kind,
                                     cudaStream_t = nullptr) {
  for (size_t row = 0; row < height; ++row) {
    const cudaError_t e = cudaMemcpy(static_cast<char*>(dst) + row * dpitch,
                                     static_cast<const char*>(src) + row * spitch, width, kind);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

// ---------------------------------------------------------------- synchronisation (all no-ops)
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
