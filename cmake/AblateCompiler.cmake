# Compiler set-up shared by every target: ccache and warnings.

if(ABLATE_USE_CCACHE)
  find_program(ABLATE_CCACHE ccache)
  if(ABLATE_CCACHE)
    # The cache lives outside the repository (CI clones afresh and must still hit it). base_dir makes paths
    # relative so that two clones in different folders share entries; the sloppiness settings are what
    # ccache needs to cache compilations that use a precompiled header.
    if(DEFINED ENV{CCACHE_DIR})
      set(_ablate_ccache_dir "$ENV{CCACHE_DIR}")
    else()
      set(_ablate_ccache_dir "$ENV{HOME}/.cache/ablate/ccache")
    endif()
    set(_ablate_launcher
        ${CMAKE_COMMAND} -E env
        CCACHE_DIR=${_ablate_ccache_dir}
        CCACHE_BASEDIR=${CMAKE_SOURCE_DIR}
        CCACHE_NOHASHDIR=1
        CCACHE_MAXSIZE=6G
        CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime
        ${ABLATE_CCACHE})
    set(CMAKE_CXX_COMPILER_LAUNCHER ${_ablate_launcher})
    message(STATUS "ablate: compiling through ccache (${_ablate_ccache_dir})")
  endif()
endif()

# Warnings for our own code; libtorch and the other dependencies come in as system headers.
function(ablate_warnings target)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wno-unused-parameter)
  # GCC 12 (Debian 12's) reports -Warray-bounds inside nlohmann::json's set_parents() under JSON_DIAGNOSTICS: an
  # object's branch inlined where the value was just built as an array, which cannot run. Seventy of those a
  # build would bury a real warning; GCC 13 no longer reports them.
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
    target_compile_options(${target} PRIVATE -Wno-array-bounds)
  endif()
endfunction()

# Settings every executable we link gets:
#  - -fPIC rather than CMake's -fPIE, so that the one precompiled header (built -fPIC for the shared
#    libraries) is valid in executables too; objects built -fPIC link into a PIE executable all the same.
#  - libstdc++ first among its libraries. The torch 2.11 wheel's libtorch.so and libtorch_cpu.so export
#    their own copies of std::filesystem functions, and that remove_all() crashes (a call through a null
#    pointer) when it has a folder to delete. Symbols resolve in the executable's libraries in link order,
#    where libtorch came before libstdc++; naming libstdc++ first makes the C++ runtime's own
#    std::filesystem the one everything calls (libtorch and the plugins included).
function(ablate_executable target)
  set_target_properties(${target} PROPERTIES POSITION_INDEPENDENT_CODE OFF)
  target_compile_options(${target} PRIVATE -fPIC)
  target_link_options(${target} BEFORE PRIVATE "LINKER:--push-state,--no-as-needed" "-lstdc++" "LINKER:--pop-state")
endfunction()
