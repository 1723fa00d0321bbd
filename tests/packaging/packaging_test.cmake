# One packaging test, run by ctest as `cmake -D... -P packaging_test.cmake` (see CMakeLists.txt).
# MODE: find_package   install the library into a temporary prefix, consume it from there
#       add_subdirectory consumer does add_subdirectory(<source tree>)
#       fetchcontent     consumer does FetchContent_Declare(SOURCE_DIR <source tree>)
# Everything happens under WORK_DIR, wiped first so every run starts fresh.
cmake_minimum_required(VERSION 3.25)

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

# Toolchain, dependency locations and library options of the outer build. The launcher is passed
# even when empty so the nested library configure does not pick ccache on its own when the outer
# build did not.
set(configure_args -G "${GENERATOR}"
  "-DCMAKE_CXX_COMPILER=${CXX}"
  "-DCMAKE_CXX_COMPILER_LAUNCHER=${LAUNCHER}"
  "-DEigen3_DIR=${Eigen3_DIR}"
  "-Dxsimd_DIR=${xsimd_DIR}"
  "-DMOE_USE_OPENMP=${MOE_USE_OPENMP}"
  "-DMOE_USE_BLAS=${MOE_USE_BLAS}"
  "-DMOE_ARCH=${MOE_ARCH}")
if(MAKE_PROGRAM)
  list(APPEND configure_args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
if(BLA_VENDOR)
  list(APPEND configure_args "-DBLA_VENDOR=${BLA_VENDOR}")
endif()
set(config_args)
set(ctest_config_args)
if(CONFIG)
  list(APPEND configure_args "-DCMAKE_BUILD_TYPE=${CONFIG}")
  set(config_args --config "${CONFIG}")
  set(ctest_config_args -C "${CONFIG}")
endif()

# Runs one step; on failure stops the test with the command and everything it printed.
function(step what)
  execute_process(COMMAND ${ARGN}
    WORKING_DIRECTORY "${WORK_DIR}"
    RESULT_VARIABLE result
    OUTPUT_VARIABLE output
    ERROR_VARIABLE output)
  if(NOT result EQUAL 0)
    list(JOIN ARGN " " command)
    message(FATAL_ERROR "packaging.${MODE}: ${what} failed (${result})\n"
                        "command: ${command}\n${output}")
  endif()
endfunction()

set(consumer_build "${WORK_DIR}/consumer-build")
set(consumer_args "-DMOE_CONSUME=${MODE}")

if(MODE STREQUAL "find_package")
  set(lib_build "${WORK_DIR}/lib-build")
  set(prefix "${WORK_DIR}/prefix")
  step("configuring the library" "${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${lib_build}"
    ${configure_args} "-DCMAKE_INSTALL_PREFIX=${prefix}"
    -DMOE_BUILD_TESTS=OFF -DMOE_BUILD_EXAMPLES=OFF -DMOE_BUILD_BENCHMARKS=OFF)
  step("building the library" "${CMAKE_COMMAND}" --build "${lib_build}" ${config_args})
  step("installing the library" "${CMAKE_COMMAND}" --install "${lib_build}" ${config_args})
  # Only the fresh prefix may satisfy find_package (no user package registry).
  list(APPEND consumer_args "-DCMAKE_PREFIX_PATH=${prefix}"
    -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
elseif(MODE STREQUAL "add_subdirectory" OR MODE STREQUAL "fetchcontent")
  list(APPEND consumer_args "-DMOE_SOURCE_DIR=${SOURCE_DIR}")
else()
  message(FATAL_ERROR "unknown MODE '${MODE}'")
endif()

step("configuring the consumer" "${CMAKE_COMMAND}" -S "${CONSUMER_DIR}" -B "${consumer_build}"
  ${configure_args} ${consumer_args})
if(MODE STREQUAL "find_package")
  # A moe_routers installed elsewhere on the machine must not make this test pass.
  file(STRINGS "${consumer_build}/CMakeCache.txt" found_dir REGEX "^moe_routers_DIR:")
  string(FIND "${found_dir}" "${prefix}/" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "packaging.find_package: consumer found ${found_dir}, not the package "
                        "installed into ${prefix}")
  endif()
endif()
step("building the consumer" "${CMAKE_COMMAND}" --build "${consumer_build}" ${config_args})
step("running the consumer" "${CMAKE_CTEST_COMMAND}" --test-dir "${consumer_build}"
  ${ctest_config_args} --output-on-failure --no-tests=error)

# MOE_ARCH reaches the consumer's own code whichever way it found the library: its kernels are
# compiled for the instruction set of this build (the probe), not the compiler's default.
if(SIMD_PROBE)
  step("running the SIMD probe" "${SIMD_PROBE}")
  execute_process(COMMAND "${SIMD_PROBE}" OUTPUT_VARIABLE expected OUTPUT_STRIP_TRAILING_WHITESPACE)
  execute_process(COMMAND "${consumer_build}/consumer" OUTPUT_VARIABLE output)
  if(NOT output MATCHES "SIMD target ${expected}\n")
    message(FATAL_ERROR "packaging.${MODE}: with MOE_ARCH='${MOE_ARCH}' the consumer should compile "
                        "for '${expected}', but it printed:\n${output}")
  endif()
endif()
