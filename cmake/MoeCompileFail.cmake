# moe_add_compile_fail_test(NAME <test> SOURCE <file.cpp> EXPECT <regex> [REJECT <regex>])
#   (positional form also accepted: moe_add_compile_fail_test(<test> <file.cpp> <regex>))
# Registers a ctest test (label `compile_fail`) that passes only if <file.cpp> fails to compile
# with a diagnostic matching the EXPECT regex and no diagnostic matching REJECT (a follow-on error
# that would only confuse the user). It compiles with -fsyntax-only against the same include
# paths as moe::routers, so it checks our static_assert messages, not a link step.
# <regex> must not contain ';' (it would split the ctest argument). GCC/Clang only (-fsyntax-only).
include_guard(GLOBAL)

function(moe_add_compile_fail_test)
  if(ARGV0 STREQUAL "NAME")
    cmake_parse_arguments(PARSE_ARGV 0 arg "" "NAME;SOURCE;EXPECT;REJECT" "")
  else()
    set(arg_NAME "${ARGV0}")
    set(arg_SOURCE "${ARGV1}")
    set(arg_EXPECT "${ARGV2}")
  endif()
  if(NOT arg_NAME OR NOT arg_SOURCE OR NOT arg_EXPECT)
    message(FATAL_ERROR "moe_add_compile_fail_test: NAME, SOURCE and EXPECT are required")
  endif()
  cmake_path(ABSOLUTE_PATH arg_SOURCE BASE_DIRECTORY "${CMAKE_CURRENT_SOURCE_DIR}")

  # Same headers a consumer of moe::routers sees; dependencies as system headers (their warnings
  # are not what the test is about), minus the compiler's implicit dirs: `-isystem /usr/include`
  # would break libstdc++'s #include_next.
  set(flags "-I${moe_routers_SOURCE_DIR}/include")
  foreach(dep Eigen3::Eigen xsimd)
    get_target_property(dirs ${dep} INTERFACE_INCLUDE_DIRECTORIES)
    foreach(dir IN LISTS dirs)
      if(dir AND NOT dir IN_LIST CMAKE_CXX_IMPLICIT_INCLUDE_DIRECTORIES)
        list(APPEND flags -isystem "${dir}")
      endif()
    endforeach()
  endforeach()

  add_test(NAME "${arg_NAME}"
    COMMAND "${CMAKE_COMMAND}"
      "-DCXX=${CMAKE_CXX_COMPILER}"
      "-DFLAGS=${flags}"
      "-DSOURCE=${arg_SOURCE}"
      "-DEXPECT=${arg_EXPECT}"
      "-DREJECT=${arg_REJECT}"
      -P "${CMAKE_CURRENT_FUNCTION_LIST_DIR}/compile_fail.cmake")
  set_tests_properties("${arg_NAME}" PROPERTIES LABELS compile_fail)
endfunction()
