# ablate_add_plugin(<name> SOURCES <file>... [LIBRARIES <lib>...] [NO_INSTALL])
#
# Builds one plugin: a shared library loaded by the runner at run time through Boost.DLL. In the source tree
# the library lands in the build's plugins/ folder, where the runner looks by default; out of tree it lands
# in the caller's build folder (point the runner at it with --plugins DIR or ABLATE_PLUGIN_PATH).
function(ablate_add_plugin name)
  cmake_parse_arguments(ARG "NO_INSTALL" "" "SOURCES;LIBRARIES" ${ARGN})
  if(NOT ARG_SOURCES)
    message(FATAL_ERROR "ablate_add_plugin(${name}): SOURCES is required")
  endif()
  set(target ablate_plugin_${name})
  add_library(${target} MODULE ${ARG_SOURCES})
  target_link_libraries(${target} PRIVATE ablate::sdk ${ARG_LIBRARIES})
  set_target_properties(${target} PROPERTIES
    OUTPUT_NAME ablate_${name}
    PREFIX "lib"
    CXX_STANDARD 17
    CXX_STANDARD_REQUIRED ON
    POSITION_INDEPENDENT_CODE ON
    CXX_VISIBILITY_PRESET hidden)
  if(DEFINED ABLATE_PLUGIN_OUTPUT_DIR)
    set_target_properties(${target} PROPERTIES LIBRARY_OUTPUT_DIRECTORY ${ABLATE_PLUGIN_OUTPUT_DIR})
    if(NOT ARG_NO_INSTALL)
      install(TARGETS ${target} LIBRARY DESTINATION ${ABLATE_PLUGIN_INSTALL_DIR})
    endif()
  endif()
  if(TARGET ablate_sdk AND ABLATE_USE_PCH)
    target_precompile_headers(${target} REUSE_FROM ablate_sdk)
  endif()
  if(COMMAND ablate_warnings)
    ablate_warnings(${target})
  endif()
endfunction()
