# Compile-fail check: SOURCE must be rejected by the compiler with a diagnostic matching EXPECT.
#   cmake -DCXX=<compiler> -DFLAGS=<list of flags> -DSOURCE=<file.cpp> -DEXPECT=<regex>
#         [-DREJECT=<regex>] -P compile_fail.cmake
# and no diagnostic may match REJECT (a misleading follow-on error).
# Both conditions matter: exiting non-zero alone would also pass on a typo or a missing include.
foreach(var CXX SOURCE EXPECT)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "compile_fail.cmake: -D${var}=... is required")
  endif()
endforeach()

execute_process(
  COMMAND "${CXX}" -std=c++20 -fsyntax-only -fdiagnostics-color=never ${FLAGS} "${SOURCE}"
  RESULT_VARIABLE result
  OUTPUT_VARIABLE output
  ERROR_VARIABLE output)

if(result EQUAL 0)
  message(FATAL_ERROR "${SOURCE} compiled, but it must fail with a diagnostic matching\n"
                      "  ${EXPECT}\nCompiler output:\n${output}")
endif()
if(NOT output MATCHES "${EXPECT}")
  message(FATAL_ERROR "${SOURCE} failed to compile as expected, but no diagnostic matches\n"
                      "  ${EXPECT}\nCompiler output:\n${output}")
endif()
if(REJECT AND output MATCHES "${REJECT}")
  message(FATAL_ERROR "${SOURCE} failed to compile with the expected diagnostic, but also with one "
                      "matching\n  ${REJECT}\nCompiler output:\n${output}")
endif()
