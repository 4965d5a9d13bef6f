// Minimal C++ loader for a graphgen build (model.so: a TVM Relax VM executable), runtime-only TVM.
//
//   run_model model.so [input.bin N C H W]
//
// input.bin: raw float32 NCHW (e.g. numpy's x.astype("float32").tofile("input.bin")); without it the
// input is all 0.5. Prints the output shape, a checksum and the top-5 classes. Build: see docs/deploy.md.
// Only TVM-FFI headers are used (the apache-tvm-ffi wheel ships them); link libtvm_ffi and libtvm_runtime.
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <numeric>
#include <vector>

namespace ffi = tvm::ffi;
using ffi::Tensor;

// Host memory for input tensors (TVM kernels assume 64-byte aligned data).
struct CPUAlloc {
  void AllocData(DLTensor* t) {
    size_t bytes = static_cast<size_t>(ffi::GetDataSize(*t));
    t->data = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

int main(int argc, char** argv) {
  if (argc != 2 && argc != 7) {
    std::fprintf(stderr, "usage: %s model.so [input.bin N C H W]\n", argv[0]);
    return 2;
  }
  std::vector<int64_t> shape = {1, 3, 224, 224};
  if (argc == 7) {
    for (int i = 0; i < 4; ++i) shape[i] = std::atoll(argv[3 + i]);
  }
  const int64_t count = std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<int64_t>());
  std::vector<float> data(count, 0.5f);
  if (argc == 7) {
    std::ifstream f(argv[2], std::ios::binary);
    if (!f.read(reinterpret_cast<char*>(data.data()), count * sizeof(float))) {
      std::fprintf(stderr, "cannot read %lld float32 values from %s\n", static_cast<long long>(count), argv[2]);
      return 2;
    }
  }

  // The library holds the kernels and the VM bytecode; the VM runs on the CPU with the pooled allocator
  // (vm_initialization takes device type, device id and allocator kind: 1 naive, 2 pooled).
  ffi::Module lib = ffi::Module::LoadFromFile(argv[1]);
  ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
  ffi::Function main_fn = vm->GetFunction("main").value();

  DLDevice cpu{kDLCPU, 0};
  Tensor input = Tensor::FromNDAlloc(CPUAlloc(), ffi::Shape(shape), DLDataType{kDLFloat, 32, 1}, cpu);
  std::memcpy(input.data_ptr(), data.data(), count * sizeof(float));

  ffi::Any result = main_fn(input);
  // one output comes back as a Tensor, several as an Array of them
  Tensor out = result.as<Tensor>() ? result.cast<Tensor>() : result.cast<ffi::Array<Tensor>>()[0];

  int64_t n = 1;
  std::printf("output shape:");
  for (int i = 0; i < out.ndim(); ++i) {
    std::printf(" %lld", static_cast<long long>(out.shape()[i]));
    n *= out.shape()[i];
  }
  std::vector<float> y(n);
  std::memcpy(y.data(), static_cast<const char*>(out.data_ptr()), n * sizeof(float));
  double sum = 0;
  for (float v : y) sum += v;
  std::printf("\nchecksum (sum): %.6f\n", sum);
  std::vector<int64_t> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  const int64_t k = std::min<int64_t>(5, n);
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int64_t a, int64_t b) { return y[a] > y[b]; });
  std::printf("top-%lld:", static_cast<long long>(k));
  for (int64_t i = 0; i < k; ++i) std::printf(" %lld (%.4f)", static_cast<long long>(idx[i]), y[idx[i]]);
  std::printf("\n");
  return 0;
}
