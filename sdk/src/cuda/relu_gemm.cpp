// cuBLASLt's ReLU epilogues for an MLP's two products (relu_gemm.hpp).
//
// cuBLASLt is called through torch's own copy of the library, looked up with dlopen(RTLD_NOLOAD) among those
// already loaded, rather than linked: a libablate_sdk.so that needed libcublasLt.so.13 would have the loader
// find one by our search path (the toolkit's, here) before torch's, and torch would then run on that copy too.
//
// In cuBLASLt's column-major terms a row-major [rows, cols] matrix is a cols x rows one, so both products are
// D (features x rows) = op(A) @ B:
//  - forward:  A = w1 ([features, in] row-major: in x features), transposed; B = x (in x rows);
//              epilogue RELU_AUX(_BIAS): D = relu(A B + b1), and the mask of D > 0 as bits;
//  - backward: A = w2 ([out, features] row-major: features x out); B = dy (out x rows);
//              epilogue DRELU: D = (A B) * mask; DRELU_BGRAD also writes D summed over its columns (the rows
//              of dpre) to the bias pointer, which is then an output.
// The mask is D's shape in bits, each of D's columns (a row of h) at a stride of features rounded up to 128 bits.
// A NaN before the ReLU comes out as 0 with its bit clear (torch's relu keeps it), as with the RELU_BIAS
// epilogue torch's _addmm_activation already runs for fc1; x's NaN still reaches the loss by the residual.
#include "relu_gemm.hpp"

#include <cublasLt.h>
#include <dlfcn.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace ablate::sdk::cuda {

namespace {

struct Library {
  decltype(&cublasLtCreate) create = nullptr;
  decltype(&cublasLtMatmulDescCreate) desc_create = nullptr;
  decltype(&cublasLtMatmulDescDestroy) desc_destroy = nullptr;
  decltype(&cublasLtMatmulDescSetAttribute) desc_set = nullptr;
  decltype(&cublasLtMatrixLayoutCreate) layout_create = nullptr;
  decltype(&cublasLtMatrixLayoutDestroy) layout_destroy = nullptr;
  decltype(&cublasLtMatmulPreferenceCreate) pref_create = nullptr;
  decltype(&cublasLtMatmulPreferenceDestroy) pref_destroy = nullptr;
  decltype(&cublasLtMatmulPreferenceSetAttribute) pref_set = nullptr;
  decltype(&cublasLtMatmulAlgoGetHeuristic) heuristic = nullptr;
  decltype(&cublasLtMatmul) matmul = nullptr;
  bool ok = false;
};

const Library& lt() {
  static const Library lib = [] {
    Library l;
    // The major version we compiled against: the same as torch's (both CUDA 13).
    const std::string name = "libcublasLt.so." + std::to_string(CUBLAS_VER_MAJOR);
    void* handle = dlopen(name.c_str(), RTLD_NOW | RTLD_NOLOAD);  // never closed: torch holds it for the process
    if (!handle) return l;
    bool all = true;
    const auto get = [&](auto& f, const char* symbol) {
      f = reinterpret_cast<std::remove_reference_t<decltype(f)>>(dlsym(handle, symbol));
      all = all && f != nullptr;
    };
    get(l.create, "cublasLtCreate");
    get(l.desc_create, "cublasLtMatmulDescCreate");
    get(l.desc_destroy, "cublasLtMatmulDescDestroy");
    get(l.desc_set, "cublasLtMatmulDescSetAttribute");
    get(l.layout_create, "cublasLtMatrixLayoutCreate");
    get(l.layout_destroy, "cublasLtMatrixLayoutDestroy");
    get(l.pref_create, "cublasLtMatmulPreferenceCreate");
    get(l.pref_destroy, "cublasLtMatmulPreferenceDestroy");
    get(l.pref_set, "cublasLtMatmulPreferenceSetAttribute");
    get(l.heuristic, "cublasLtMatmulAlgoGetHeuristic");
    get(l.matmul, "cublasLtMatmul");
    l.ok = all;
    return l;
  }();
  return lib;
}

// Descriptors, destroyed with their owner.
struct Described {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  Described() = default;
  Described(const Described&) = delete;
  Described& operator=(const Described&) = delete;
  ~Described() {
    if (op) lt().desc_destroy(op);
    for (auto* l : {a, b, d}) {
      if (l) lt().layout_destroy(l);
    }
  }
};

// One product in cuBLASLt's terms (see the top of the file).
struct Product {
  cublasOperation_t transa;
  std::int64_t m, n, k;  // D is m x n; A is m x k after transa; B is k x n
  std::int64_t lda, ldb;
  cublasLtEpilogue_t epilogue;
  const void* bias;  // null: none (in backward, the bias gradient's output)
  const void* aux;
  cudaDataType_t type;
};

cudaDataType_t data_type(GemmType t) { return t == GemmType::f16 ? CUDA_R_16F : CUDA_R_16BF; }

Product forward_product(const ReluForwardArgs& a) {
  return {CUBLAS_OP_T, a.features, a.rows, a.in, a.in, a.in,
          a.b1 ? CUBLASLT_EPILOGUE_RELU_AUX_BIAS : CUBLASLT_EPILOGUE_RELU_AUX, a.b1, a.mask, data_type(a.type)};
}

Product backward_product(const ReluBackwardArgs& a) {
  return {CUBLAS_OP_N, a.features, a.rows, a.out, a.features, a.out,
          a.db1 ? CUBLASLT_EPILOGUE_DRELU_BGRAD : CUBLASLT_EPILOGUE_DRELU, a.db1, a.mask, data_type(a.type)};
}

// Every attribute of the product, or the status of the first that cuBLASLt refused.
int describe(const Product& p, Described& out) {
  const auto& l = lt();
  // float32 accumulation and scale, as torch's own bf16 and f16 products.
  if (auto s = l.desc_create(&out.op, CUBLAS_COMPUTE_32F, CUDA_R_32F)) return s;
  const auto set = [&](cublasLtMatmulDescAttributes_t attr, const auto& value) {
    return static_cast<int>(l.desc_set(out.op, attr, &value, sizeof value));
  };
  const std::int32_t transa = p.transa, transb = CUBLAS_OP_N;
  const std::uint32_t epilogue = p.epilogue;
  const std::int64_t aux_ld = relu_mask_ld(p.m);
  if (int s = set(CUBLASLT_MATMUL_DESC_TRANSA, transa)) return s;
  if (int s = set(CUBLASLT_MATMUL_DESC_TRANSB, transb)) return s;
  if (int s = set(CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue)) return s;
  if (p.bias) {
    // The bias (and in backward its gradient) is in the products' type, as torch casts it.
    const std::int32_t bias_type = p.type;
    if (int s = set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, p.bias)) return s;
    if (int s = set(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, bias_type)) return s;
  }
  if (int s = set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, p.aux)) return s;
  if (int s = set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, aux_ld)) return s;
  const bool t = p.transa == CUBLAS_OP_T;
  // Layouts describe the matrices as stored: A is k x m when it is transposed.
  if (auto s = l.layout_create(&out.a, p.type, t ? p.k : p.m, t ? p.m : p.k, p.lda)) return s;
  if (auto s = l.layout_create(&out.b, p.type, p.k, p.n, p.ldb)) return s;
  if (auto s = l.layout_create(&out.d, p.type, p.m, p.n, p.m)) return s;
  return 0;
}

// The largest power of two (up to 256) that divides the address: cuBLASLt's kernels ask for aligned matrices,
// and the heuristic is told how aligned ours are so that it offers no kernel they would break.
std::uint32_t alignment(const void* p) {
  const auto v = reinterpret_cast<std::uintptr_t>(p);
  std::uint32_t a = 1;
  while (a < 256 && v % (2 * a) == 0) a *= 2;
  return a;
}

std::mutex g_mutex;

int handle_for(int device, cublasLtHandle_t* out) {
  static std::map<int, cublasLtHandle_t> handles;  // one per device, kept for the process
  const std::lock_guard<std::mutex> lock(g_mutex);
  auto it = handles.find(device);
  if (it == handles.end()) {
    cublasLtHandle_t h = nullptr;
    if (auto s = lt().create(&h)) return s;
    it = handles.emplace(device, h).first;
  }
  *out = it->second;
  return 0;
}

// The heuristic's first choice for the product, kept per shape and alignment (it costs tens of microseconds,
// and a training step asks twice per layer).
using AlgoKey = std::tuple<int, std::uint32_t, int, std::int64_t, std::int64_t, std::int64_t, std::uint32_t,
                           std::uint32_t, std::uint32_t, std::uint32_t, std::uint32_t, std::int64_t>;

int algorithm(cublasLtHandle_t handle, int device, const Product& p, const Described& d, std::uint32_t align_a,
              std::uint32_t align_b, std::uint32_t align_d, std::int64_t workspace_bytes, cublasLtMatmulAlgo_t* out) {
  static std::map<AlgoKey, cublasLtMatmulAlgo_t> chosen;
  const AlgoKey key{device, p.epilogue, p.type, p.m, p.n, p.k, align_a, align_b, align_d,
                    p.bias ? alignment(p.bias) : 0u, alignment(p.aux), workspace_bytes};
  {
    const std::lock_guard<std::mutex> lock(g_mutex);
    if (auto it = chosen.find(key); it != chosen.end()) {
      *out = it->second;
      return 0;
    }
  }
  const auto& l = lt();
  cublasLtMatmulPreference_t pref = nullptr;
  if (auto s = l.pref_create(&pref)) return s;
  const auto set = [&](cublasLtMatmulPreferenceAttributes_t attr, const auto& value) {
    return static_cast<int>(l.pref_set(pref, attr, &value, sizeof value));
  };
  const std::uint64_t ws = static_cast<std::uint64_t>(workspace_bytes);
  int s = set(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, ws);
  if (!s) s = set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_a);
  if (!s) s = set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_b);
  if (!s) s = set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_d);
  if (!s) s = set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_d);
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  if (!s) s = l.heuristic(handle, d.op, d.a, d.b, d.d, d.d, pref, 1, &result, &found);
  l.pref_destroy(pref);
  if (s) return s;
  if (found < 1 || result.state != CUBLAS_STATUS_SUCCESS) return kNoAlgorithm;
  const std::lock_guard<std::mutex> lock(g_mutex);
  chosen.emplace(key, result.algo);
  *out = result.algo;
  return 0;
}

// A product ready to launch: its descriptors, the device's handle and the heuristic's algorithm, for matrices
// aligned as given.
struct Ready {
  Described desc;
  cublasLtHandle_t handle = nullptr;
  cublasLtMatmulAlgo_t algo{};
};

int prepare(const Product& p, int device, std::uint32_t align_a, std::uint32_t align_b, std::uint32_t align_d,
            std::int64_t workspace_bytes, Ready& r) {
  if (!lt().ok) return kNoLibrary;
  if (int s = describe(p, r.desc)) return s;
  if (int s = handle_for(device, &r.handle)) return s;
  return algorithm(r.handle, device, p, r.desc, align_a, align_b, align_d, workspace_bytes, &r.algo);
}

int run(const Product& p, const void* a, const void* b, void* d, void* workspace, std::int64_t workspace_bytes,
        int device, void* stream) {
  Ready r;
  if (int s = prepare(p, device, alignment(a), alignment(b), alignment(d), workspace_bytes, r)) return s;
  const float alpha = 1.0f, beta = 0.0f;  // beta 0: C (given as D) is not read
  return lt().matmul(r.handle, r.desc.op, &alpha, a, r.desc.a, b, r.desc.b, &beta, d, r.desc.d, d, r.desc.d, &r.algo,
                     workspace, static_cast<std::size_t>(workspace_bytes), static_cast<cudaStream_t>(stream));
}

// An address that is only stored in descriptors, never read: describing and the heuristic dereference no
// pointer (the heuristic reads the bias's and mask's alignment from theirs: 256 here).
void* const kFake = reinterpret_cast<void*>(std::uintptr_t{1} << 20);

}  // namespace

bool relu_gemm_available() { return lt().ok; }

int relu_linear_forward(const ReluForwardArgs& a, void* stream) {
  // Column-major: A = w1 (in x features, transposed), B = x (in x rows), D = h (features x rows).
  return run(forward_product(a), a.w1, a.x, a.h, a.workspace, a.workspace_bytes, a.device, stream);
}

int relu_grad_backward(const ReluBackwardArgs& a, void* stream) {
  // Column-major: A = w2 (features x out), B = dy (out x rows), D = dpre (features x rows).
  return run(backward_product(a), a.w2, a.dy, a.dpre, a.workspace, a.workspace_bytes, a.device, stream);
}

int relu_grad_check(std::int64_t rows, std::int64_t out, std::int64_t features, bool bias, GemmType type,
                    std::int64_t workspace_bytes, int device) {
  const auto p = backward_product({kFake, kFake, kFake, kFake, bias ? kFake : nullptr, rows, out, features, type,
                                   nullptr, 0, 0});
  Ready r;
  return prepare(p, device, 16, 16, 16, workspace_bytes, r);
}

int relu_gemm_describe(std::int64_t rows, std::int64_t in, std::int64_t features, GemmType type) {
  if (!lt().ok) return kNoLibrary;
  for (const bool bias : {true, false}) {
    void* const b = bias ? kFake : nullptr;
    for (const auto& p : {forward_product({kFake, kFake, b, kFake, kFake, rows, in, features, type, nullptr, 0, 0}),
                          backward_product({kFake, kFake, kFake, kFake, b, rows, in, features, type, nullptr, 0, 0})}) {
      Described d;
      if (int s = describe(p, d)) return s;
    }
  }
  return 0;
}

const char* relu_gemm_error(int status) {
  switch (status) {
    case 0: return "success";
    case kNoAlgorithm: return "cuBLASLt has no kernel for this product and epilogue";
    case kNoLibrary: return "torch's libcublasLt is not loaded in this process";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "cuBLASLt error";
  }
}

}  // namespace ablate::sdk::cuda
