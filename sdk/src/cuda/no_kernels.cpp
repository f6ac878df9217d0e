// Stands in for add_layer_norm.cu where no CUDA compiler was found: max_hidden() is 0, so norms.cpp never
// launches anything and takes torch's ops.
#include "add_layer_norm.hpp"

namespace ablate::sdk::cuda {

std::int64_t max_hidden() { return 0; }
int add_layer_norm_forward(const ForwardArgs&, void*) { return 1; }
int add_layer_norm_backward(const BackwardArgs&, void*) { return 1; }
const char* error_string(int) { return "built without CUDA kernels"; }

}  // namespace ablate::sdk::cuda
