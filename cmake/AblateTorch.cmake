# libtorch comes from the PyPI wheel torch==2.11.0, installed by scripts/setup.sh into a virtual environment
# outside the repository (default ~/.cache/ablate/venv). Its torch/share/cmake folder is a CMake package.

set(ABLATE_VENV "$ENV{HOME}/.cache/ablate/venv" CACHE PATH "Python environment that holds torch==2.11.0")

# The environment's Python also runs the parity and system tests.
find_program(ABLATE_PYTHON NAMES python3 python PATHS ${ABLATE_VENV}/bin NO_DEFAULT_PATH)
if(NOT ABLATE_PYTHON)
  find_program(ABLATE_PYTHON NAMES python3 python)
endif()

if(NOT Torch_DIR)
  execute_process(
    COMMAND ${ABLATE_PYTHON} -c "import torch, os; print(os.path.join(torch.utils.cmake_prefix_path, 'Torch'))"
    OUTPUT_VARIABLE _ablate_torch_dir OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _ablate_rc)
  if(NOT _ablate_rc EQUAL 0)
    message(FATAL_ERROR "ablate: could not import torch with ${ABLATE_PYTHON}; run scripts/setup.sh "
                        "or pass -DTorch_DIR=.../torch/share/cmake/Torch")
  endif()
  set(Torch_DIR "${_ablate_torch_dir}" CACHE PATH "libtorch CMake package" FORCE)
endif()

# The wheel is built against CUDA, so its config runs the CUDA toolkit checks against whatever toolkit is
# installed (here CUDA 13 without a GPU). Two things clash and are settled here rather than on the machine:
#  - with no GPU to probe it prints "Automatic GPU detection failed" and picks a dozen architectures, and it
#    warns that CMAKE_CUDA_ARCHITECTURES is ignored. libtorch's kernels are prebuilt, and our own few
#    (sdk/src/cuda) name their architecture on their target. Naming one here (Hopper, the GPU machine's) keeps
#    the check quiet and fast.
#  - it puts the toolkit's libnvrtc (/usr/local/cuda/lib) on the link line of the `torch` target. We call
#    nothing in it, so --as-needed leaves it out of our binaries; at run time libtorch_cuda.so finds the
#    wheel's own CUDA libraries (nvidia/cu13/lib) through its RPATH, never a second copy from the toolkit.
if(NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST} AND NOT TORCH_CUDA_ARCH_LIST)
  set(TORCH_CUDA_ARCH_LIST "9.0" CACHE STRING "CUDA architectures for torch's CMake checks")
endif()
find_package(Torch 2.11 REQUIRED)

# The version, compiler and C++11-ABI flag go into every plugin's ABI record; the host compares them.
message(STATUS "ablate: libtorch ${Torch_VERSION} from ${Torch_DIR}")
