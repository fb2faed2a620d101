// Launchers of the C-Poly LoRA kernels (device code in kernels.cuh; contract in cpoly.h).
#include "cpoly.h"
#include "kernels.cuh"

#include <climits>
#include <stdexcept>

namespace cpoly {
namespace {

enum class DType { kF32, kF16, kBF16 };

DType parse_dtype(const std::string& kernel, const std::string& dtype) {
  if (dtype == "float32") return DType::kF32;
  if (dtype == "float16") return DType::kF16;
  if (dtype == "bfloat16") return DType::kBF16;
  throw std::invalid_argument("cpoly_kernels._C." + kernel +
                              ": dtype: expected 'float32', 'float16' or 'bfloat16', got '" + dtype + "'");
}

int vec_width(DType t) { return t == DType::kF32 ? 4 : 8; }

[[noreturn]] void fail_arg(const std::string& kernel, const std::string& what) {
  throw std::invalid_argument("cpoly_kernels._C." + kernel + ": " + what);
}

void check_cuda(const std::string& kernel, cudaError_t err) {
  if (err != cudaSuccess) {
    throw std::runtime_error("cpoly_kernels._C." + kernel + ": CUDA error " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Sizes every kernel needs: N >= 0 rows, d >= 1, r >= 1, b >= 1 segments when N > 0.
void check_sizes(const std::string& kernel, int64_t N, int64_t d, int64_t r, int64_t b) {
  if (N < 0) fail_arg(kernel, "N: expected >= 0, got " + std::to_string(N));
  if (d < 1) fail_arg(kernel, "d: expected >= 1, got " + std::to_string(d));
  if (r < 1) fail_arg(kernel, "r: expected >= 1, got " + std::to_string(r));
  if (b < 0 || (N > 0 && b < 1)) {
    fail_arg(kernel, "b: expected >= 1 segments for N = " + std::to_string(N) + " rows, got " + std::to_string(b));
  }
}

void check_ptr(const std::string& kernel, const char* name, uintptr_t p, uintptr_t align) {
  if (p == 0) fail_arg(kernel, std::string(name) + ": expected a device address, got 0");
  if (p % align != 0) {
    fail_arg(kernel, std::string(name) + ": expected a " + std::to_string(align) + "-byte aligned address, got " +
                         std::to_string(p));
  }
}

LaunchShape shape_of(const std::string& kernel, DType t, int64_t N, int64_t d, int64_t r, int64_t b) {
  check_sizes(kernel, N, d, r, b);
  int64_t blocks;
  if (kernel == "project_down") {
    blocks = ceil_div(N, kDownTile) * (padded_rank(r) / kRankChunk);
  } else if (kernel == "project_up") {
    blocks = ceil_div(N, kUpTile) * ceil_div(d, int64_t(kUpColVecs) * vec_width(t));
  } else if (kernel == "segment_outer") {
    blocks = b * ceil_div(d, int64_t(kOuterColVecs) * vec_width(t)) * ceil_div(r, kRankChunk);
  } else {
    throw std::invalid_argument("cpoly_kernels._C.launch_shape: kernel: expected 'project_down', 'project_up' "
                                "or 'segment_outer', got '" + kernel + "'");
  }
  if (blocks > INT_MAX) {
    fail_arg(kernel, "the launch needs " + std::to_string(blocks) + " blocks, more than a CUDA grid holds (" +
                         std::to_string(INT_MAX) + ")");
  }
  return {blocks, kThreads};
}

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

template <typename T>
void launch_down(const LaunchShape& ls, uintptr_t x, uintptr_t w, uintptr_t cu, uintptr_t y, int64_t N, int64_t d,
                 int64_t r, int64_t b, float alpha, uintptr_t stream) {
  const bool vec_ok = x % 16 == 0 && d % VecWidth<T>::value == 0;
  project_down_kernel<T><<<unsigned(ls.blocks), ls.threads, 0, as_stream(stream)>>>(
      reinterpret_cast<const T*>(x), reinterpret_cast<const float*>(w), reinterpret_cast<const int64_t*>(cu),
      reinterpret_cast<float*>(y), N, d, r, padded_rank(r), b, alpha, vec_ok);
}

template <typename T>
void launch_up(const LaunchShape& ls, uintptr_t v, uintptr_t w, uintptr_t cu, uintptr_t base, uintptr_t y, int64_t N,
               int64_t d, int64_t r, int64_t b, float alpha, uintptr_t stream) {
  const bool vec_ok = y % 16 == 0 && base % 16 == 0 && d % VecWidth<T>::value == 0;
  const bool w_vec_ok = w % 16 == 0 && d % 4 == 0;
  project_up_kernel<T><<<unsigned(ls.blocks), ls.threads, 0, as_stream(stream)>>>(
      reinterpret_cast<const float*>(v), reinterpret_cast<const float*>(w), reinterpret_cast<const int64_t*>(cu),
      reinterpret_cast<const T*>(base), reinterpret_cast<T*>(y), N, d, r, b, alpha, vec_ok, w_vec_ok);
}

template <typename T>
void launch_outer(const LaunchShape& ls, uintptr_t x, uintptr_t v, uintptr_t cu, uintptr_t g, int64_t N, int64_t d,
                  int64_t r, float alpha, uintptr_t stream) {
  const bool vec_ok = x % 16 == 0 && d % VecWidth<T>::value == 0;
  segment_outer_kernel<T><<<unsigned(ls.blocks), ls.threads, 0, as_stream(stream)>>>(
      reinterpret_cast<const T*>(x), reinterpret_cast<const float*>(v), reinterpret_cast<const int64_t*>(cu),
      reinterpret_cast<float*>(g), N, d, r, alpha, vec_ok);
}

// Makes `device` current, runs launch<T>() for the dtype, then checks the launch.
template <typename F>
void dispatch(const std::string& kernel, DType t, int device, F&& launch) {
  check_cuda(kernel, cudaSetDevice(device));
  switch (t) {
    case DType::kF32:
      launch(float{});
      break;
    case DType::kF16:
      launch(__half{});
      break;
    case DType::kBF16:
      launch(__nv_bfloat16{});
      break;
  }
  check_cuda(kernel, cudaGetLastError());
}

}  // namespace

int rank_chunk() { return kRankChunk; }

int64_t padded_rank(int64_t r) { return ceil_div(r, kRankChunk) * kRankChunk; }

LaunchShape launch_shape(const std::string& kernel, const std::string& dtype, int64_t N, int64_t d, int64_t r,
                         int64_t b) {
  return shape_of(kernel, parse_dtype(kernel, dtype), N, d, r, b);
}

void check_device(const std::string& kernel, int device) {
  if (device < 0) fail_arg(kernel, "device: expected a CUDA device index >= 0, got " + std::to_string(device));
}

void project_down(const std::string& dtype, uintptr_t x, uintptr_t w, uintptr_t cu, uintptr_t y, int64_t N, int64_t d,
                  int64_t r, int64_t b, double alpha, int device, uintptr_t stream) {
  const std::string kernel = "project_down";
  const DType t = parse_dtype(kernel, dtype);
  const LaunchShape ls = shape_of(kernel, t, N, d, r, b);
  if (ls.blocks == 0) return;
  check_ptr(kernel, "x", x, 1);
  check_ptr(kernel, "w", w, 16);
  check_ptr(kernel, "cu", cu, 8);
  check_ptr(kernel, "y", y, 4);
  check_device(kernel, device);
  dispatch(kernel, t, device, [&](auto tag) {
    launch_down<decltype(tag)>(ls, x, w, cu, y, N, d, r, b, float(alpha), stream);
  });
}

void project_up(const std::string& dtype, uintptr_t v, uintptr_t w, uintptr_t cu, uintptr_t base, uintptr_t y,
                int64_t N, int64_t d, int64_t r, int64_t b, double alpha, int device, uintptr_t stream) {
  const std::string kernel = "project_up";
  const DType t = parse_dtype(kernel, dtype);
  const LaunchShape ls = shape_of(kernel, t, N, d, r, b);
  if (ls.blocks == 0) return;
  check_ptr(kernel, "v", v, 4);
  check_ptr(kernel, "w", w, 4);
  check_ptr(kernel, "cu", cu, 8);
  check_ptr(kernel, "y", y, 1);
  check_device(kernel, device);
  dispatch(kernel, t, device, [&](auto tag) {
    launch_up<decltype(tag)>(ls, v, w, cu, base, y, N, d, r, b, float(alpha), stream);
  });
}

void segment_outer(const std::string& dtype, uintptr_t x, uintptr_t v, uintptr_t cu, uintptr_t g, int64_t N,
                   int64_t d, int64_t r, int64_t b, double alpha, int device, uintptr_t stream) {
  const std::string kernel = "segment_outer";
  const DType t = parse_dtype(kernel, dtype);
  const LaunchShape ls = shape_of(kernel, t, N, d, r, b);
  if (ls.blocks == 0) return;
  check_ptr(kernel, "cu", cu, 8);
  check_ptr(kernel, "g", g, 4);
  if (N > 0) {
    check_ptr(kernel, "x", x, 1);
    check_ptr(kernel, "v", v, 4);
  }
  check_device(kernel, device);
  dispatch(kernel, t, device, [&](auto tag) {
    launch_outer<decltype(tag)>(ls, x, v, cu, g, N, d, r, float(alpha), stream);
  });
}

std::vector<int> compiled_archs() {
  std::vector<int> archs;
#ifdef __CUDA_ARCH_LIST__
  for (int a : {__CUDA_ARCH_LIST__}) archs.push_back(a / 10);  // 800 -> 80
#endif
  return archs;
}

int cuda_runtime_version() { return CUDART_VERSION; }

std::string device_status(int device) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err == cudaSuccess && count == 0) return "no CUDA device";
  if (err == cudaSuccess && (device < 0 || device >= count)) {
    return "no CUDA device " + std::to_string(device) + " (" + std::to_string(count) + " present)";
  }
  if (err == cudaSuccess) err = cudaSetDevice(device);
  if (err == cudaSuccess) {
    cudaFuncAttributes attr;
    err = cudaFuncGetAttributes(&attr, project_down_kernel<float>);
  }
  if (err == cudaSuccess) return "";
  cudaGetLastError();  // clear it: the next launch must not report it
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

}  // namespace cpoly
