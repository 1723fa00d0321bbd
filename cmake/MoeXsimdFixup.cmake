# Debian's libxsimd-dev 8.1 exports `xsimd` with INTERFACE_LINK_LIBRARIES "xtl", but its config
# never finds xtl, so every executable linking xsimd gets a bogus `-lxtl` and fails to link.
# xtl is header-only and xsimd needs it only with XSIMD_ENABLE_XTL_COMPLEX: drop the dangling name.
# Used by our CMakeLists.txt and installed next to moe_routersConfig.cmake for the same reason.
if(TARGET xsimd AND NOT TARGET xtl)
  get_target_property(_moe_xsimd_libs xsimd INTERFACE_LINK_LIBRARIES)
  if(_moe_xsimd_libs)
    list(REMOVE_ITEM _moe_xsimd_libs xtl)
    set_target_properties(xsimd PROPERTIES INTERFACE_LINK_LIBRARIES "${_moe_xsimd_libs}")
  endif()
  unset(_moe_xsimd_libs)
endif()
