# MOE_ARCH: the instruction set moe::routers is compiled for in the consumer's own targets.
# The kernels (xsimd) and Eigen pick their SIMD width from the compiler flags of the translation
# unit that includes them, so a consumer compiling without an -march flag gets SSE2 on x86-64:
# about half the speed of the library's own presets. Set MOE_ARCH (e.g. `native`,
# `x86-64-v3`, `skylake-avx512`) before find_package / add_subdirectory / FetchContent, or with
# -DMOE_ARCH=... on the command line, and every target linking moe::routers gets -march=MOE_ARCH
# (GCC, Clang). Empty (the default) adds nothing: the consumer's own flags decide.
# Used by our CMakeLists.txt and installed next to moe_routersConfig.cmake.
include_guard(GLOBAL)
include(CheckCXXCompilerFlag)

# The compile flag for `arch` in `out` ("" when arch is empty); a configure error names an
# architecture the compiler rejects.
function(moe_arch_flag arch out)
  set(${out} "" PARENT_SCOPE)
  if(arch STREQUAL "")
    return()
  endif()
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    message(WARNING "MOE_ARCH=${arch} is applied with -march, which ${CMAKE_CXX_COMPILER_ID} "
                    "does not take: pass your compiler's own architecture flag instead")
    return()
  endif()
  string(MAKE_C_IDENTIFIER "MOE_CXX_ACCEPTS_MARCH_${arch}" check)
  check_cxx_compiler_flag("-march=${arch}" ${check})
  if(NOT ${check})
    message(FATAL_ERROR "MOE_ARCH='${arch}': ${CMAKE_CXX_COMPILER} rejects -march=${arch} "
                        "(use an architecture it knows, e.g. native or x86-64-v3, or leave it empty)")
  endif()
  set(${out} "-march=${arch}" PARENT_SCOPE)
endfunction()
