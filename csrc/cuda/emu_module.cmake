# fusedrnn._emu: the CUDA recurrence kernels of this directory compiled by the host compiler against
# the CPU emulator (csrc/emu), with the same binding source as _cuda. Test-only: included from
# csrc/emu/CMakeLists.txt, which exists in the build only with FUSEDRNN_EMU=ON.
set(_fusedrnn_cuda_dir ${PROJECT_SOURCE_DIR}/csrc/cuda)
set(_fusedrnn_emu_kernel_sources
  ${_fusedrnn_cuda_dir}/recurrence_f32.cu
  ${_fusedrnn_cuda_dir}/recurrence_f64.cu
  ${_fusedrnn_cuda_dir}/recurrence_f16.cu
  ${_fusedrnn_cuda_dir}/recurrence_bf16.cu
  ${_fusedrnn_cuda_dir}/recurrence_dispatch.cu)

# The .cu files compile as C++ here, in an object library of their own so that the same files can
# also be nvcc-compiled for _cuda in the same build.
add_library(fusedrnn_emu_kernels OBJECT ${_fusedrnn_emu_kernel_sources})
set_source_files_properties(${_fusedrnn_emu_kernel_sources} TARGET_DIRECTORY fusedrnn_emu_kernels
  PROPERTIES LANGUAGE CXX)
target_compile_options(fusedrnn_emu_kernels PRIVATE -x c++)
target_include_directories(fusedrnn_emu_kernels PUBLIC ${_fusedrnn_cuda_dir})
target_link_libraries(fusedrnn_emu_kernels PUBLIC fusedrnn_emu_headers)
set_target_properties(fusedrnn_emu_kernels PROPERTIES POSITION_INDEPENDENT_CODE ON)

pybind11_add_module(_emu MODULE ${PROJECT_SOURCE_DIR}/csrc/bindings/cuda_module.cpp)
target_include_directories(_emu PRIVATE ${PROJECT_SOURCE_DIR}/csrc/bindings)
target_compile_definitions(_emu PRIVATE FUSEDRNN_MODULE_NAME=_emu)
target_link_libraries(_emu PRIVATE fusedrnn_emu_kernels)
# Kernel names in the emulator's fault messages come from dladdr.
set_target_properties(_emu PROPERTIES ENABLE_EXPORTS ON)
fusedrnn_install_module(_emu)

# A standalone emulated forward + backward for the sanitizer runs (ASan+UBSan, TSan), where a
# Python interpreter would drown the reports: csrc/cuda/tests/emu_recurrence_smoke.cpp.
add_executable(emu_recurrence_smoke ${_fusedrnn_cuda_dir}/tests/emu_recurrence_smoke.cpp)
target_link_libraries(emu_recurrence_smoke PRIVATE fusedrnn_emu_kernels)
set_target_properties(emu_recurrence_smoke PROPERTIES ENABLE_EXPORTS ON)
add_test(NAME emu_recurrence_smoke COMMAND emu_recurrence_smoke)
if(TARGET emu_tests)  # csrc/emu/run_sanitizers.sh builds emu_tests and runs CTest here
  add_dependencies(emu_tests emu_recurrence_smoke)
endif()
