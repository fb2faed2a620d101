// Host interface of the C-Poly LoRA kernels (kernels.cu), bound to Python in
// bindings.cpp.  Tensors cross as raw device addresses (uintptr_t) plus sizes;
// the stream is a cudaStream_t passed as an integer.  No torch headers.
//
// Each launch first makes `device` the current CUDA device, then queues the
// kernel on `stream` (which must belong to that device).
//
// All matrices are row-major and contiguous.  `cu` is int64 [b+1] segment
// offsets on the device: segment s owns rows cu[s]..cu[s+1].
//
//   project_down:  y[N, r] (f32) = alpha * x[n, :] @ w[s(n)]   w: f32 [b, d, padded_rank(r)]
//   project_up:    y[N, d] (T)   = base[n, :] + alpha * v[n, :] @ w[s(n)]
//                                                               v: f32 [N, r], w: f32 [b, r, d]
//   segment_outer: g[b, d, r] (f32) = alpha * sum_{n in s} x[n, :]^T v[n, :]
//                                                               x: T [N, d], v: f32 [N, r]
// T (the dtype argument) is "float32", "float16" or "bfloat16"; accumulation is
// float32; every output element is written exactly once, without atomics.
// Argument errors throw std::invalid_argument, CUDA errors std::runtime_error,
// both naming the kernel.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace cpoly {

struct LaunchShape {
  int64_t blocks;   // 1-D grid
  int threads;      // per block
};

// Ranks each project_down block computes; its w is padded to a multiple of it.
int rank_chunk();
int64_t padded_rank(int64_t r);

// Grid of `kernel` ("project_down", "project_up", "segment_outer") for these
// sizes; blocks == 0 means nothing to launch.  `dtype` fixes the vector width.
LaunchShape launch_shape(const std::string& kernel, const std::string& dtype, int64_t N, int64_t d,
                         int64_t r, int64_t b);

void project_down(const std::string& dtype, uintptr_t x, uintptr_t w, uintptr_t cu, uintptr_t y,
                  int64_t N, int64_t d, int64_t r, int64_t b, double alpha, int device, uintptr_t stream);
void project_up(const std::string& dtype, uintptr_t v, uintptr_t w, uintptr_t cu, uintptr_t base,
                uintptr_t y, int64_t N, int64_t d, int64_t r, int64_t b, double alpha, int device,
                uintptr_t stream);
void segment_outer(const std::string& dtype, uintptr_t x, uintptr_t v, uintptr_t cu, uintptr_t g,
                   int64_t N, int64_t d, int64_t r, int64_t b, double alpha, int device, uintptr_t stream);

// Compute capabilities compiled in (e.g. {80, 90}) and the CUDA runtime version.
std::vector<int> compiled_archs();
int cuda_runtime_version();
// "" when CUDA device `device` can run these kernels, else why not.
std::string device_status(int device);

}  // namespace cpoly
