// Runs the device code of kernels.cuh on the CPU, for tests on machines without
// a GPU (tests/test_cuda_backend.py builds it with g++ and drives it through
// ctypes).  Each launch runs its blocks one after another on 256 std::threads:
// a std::barrier stands in for __syncthreads and a per-warp exchange for the
// shuffles.  It checks the kernels' indexing, segment handling and reductions,
// not timing or the GPU memory model.
//
//   g++ -std=c++20 -O1 -shared -fPIC -w -I<cuda>/include cpu_emulation.cpp -o libcpoly_emu.so -lpthread
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

namespace emu {

constexpr int kThreads = 256;

thread_local uint3 thread_idx, block_idx;
std::barrier<>* block_barrier = nullptr;

struct Warp {
  float lanes[32];
  std::barrier<> sync{32};
};
Warp warps[kThreads / 32];

void syncthreads() { block_barrier->arrive_and_wait(); }

float shfl_xor(float v, int offset) {
  Warp& w = warps[thread_idx.x / 32];
  const int lane = thread_idx.x % 32;
  w.sync.arrive_and_wait();  // the previous exchange has been read
  w.lanes[lane] = v;
  w.sync.arrive_and_wait();
  return w.lanes[lane ^ offset];
}

template <typename T>
T ldg(const T* p) {
  return *p;
}

// Runs kernel() for blocks 0..blocks-1 with 256 threads each.
template <typename F>
void launch(int64_t blocks, F&& kernel) {
  std::barrier<> barrier(kThreads);
  block_barrier = &barrier;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      thread_idx = {unsigned(t), 0, 0};
      for (int64_t b = 0; b < blocks; ++b) {
        block_idx = {unsigned(b), 0, 0};
        kernel();
        barrier.arrive_and_wait();  // the block is done before the next reuses shared memory
      }
    });
  }
  for (auto& t : threads) t.join();
}

}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define __syncthreads emu::syncthreads
#define __shfl_xor_sync(mask, v, offset) emu::shfl_xor(v, offset)
#define __ldg emu::ldg
#undef __global__
#define __global__
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(n)
using std::max;
using std::min;

#include "../kernels.cuh"

namespace {

template <typename T>
bool aligned_rows(const void* p, int64_t d) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && d % (16 / int64_t(sizeof(T))) == 0;
}

template <typename T>
void down(const void* x, const float* w, const int64_t* cu, float* y, int64_t N, int64_t d, int64_t r, int64_t rp,
          int64_t b, float alpha, int64_t blocks) {
  const bool vec_ok = aligned_rows<T>(x, d);
  emu::launch(blocks, [&] {
    cpoly::project_down_kernel<T>(static_cast<const T*>(x), w, cu, y, N, d, r, rp, b, alpha, vec_ok);
  });
}

template <typename T>
void up(const float* v, const float* w, const int64_t* cu, const void* base, void* y, int64_t N, int64_t d, int64_t r,
        int64_t b, float alpha, int64_t blocks) {
  const bool vec_ok = aligned_rows<T>(y, d) && reinterpret_cast<uintptr_t>(base) % 16 == 0;
  const bool w_vec_ok = reinterpret_cast<uintptr_t>(w) % 16 == 0 && d % 4 == 0;
  emu::launch(blocks, [&] {
    cpoly::project_up_kernel<T>(v, w, cu, static_cast<const T*>(base), static_cast<T*>(y), N, d, r, b, alpha, vec_ok,
                                w_vec_ok);
  });
}

template <typename T>
void outer(const void* x, const float* v, const int64_t* cu, float* g, int64_t N, int64_t d, int64_t r, float alpha,
           int64_t blocks) {
  const bool vec_ok = aligned_rows<T>(x, d);
  emu::launch(blocks, [&] {
    cpoly::segment_outer_kernel<T>(static_cast<const T*>(x), v, cu, g, N, d, r, alpha, vec_ok);
  });
}

}  // namespace

// dtype: 0 float32, 1 float16, 2 bfloat16; blocks from cpoly_kernels._C.launch_shape.
extern "C" {

void emu_project_down(int dtype, const void* x, const float* w, const int64_t* cu, float* y, int64_t N, int64_t d,
                      int64_t r, int64_t rp, int64_t b, float alpha, int64_t blocks) {
  if (dtype == 0) down<float>(x, w, cu, y, N, d, r, rp, b, alpha, blocks);
  if (dtype == 1) down<__half>(x, w, cu, y, N, d, r, rp, b, alpha, blocks);
  if (dtype == 2) down<__nv_bfloat16>(x, w, cu, y, N, d, r, rp, b, alpha, blocks);
}

void emu_project_up(int dtype, const float* v, const float* w, const int64_t* cu, const void* base, void* y,
                    int64_t N, int64_t d, int64_t r, int64_t b, float alpha, int64_t blocks) {
  if (dtype == 0) up<float>(v, w, cu, base, y, N, d, r, b, alpha, blocks);
  if (dtype == 1) up<__half>(v, w, cu, base, y, N, d, r, b, alpha, blocks);
  if (dtype == 2) up<__nv_bfloat16>(v, w, cu, base, y, N, d, r, b, alpha, blocks);
}

void emu_segment_outer(int dtype, const void* x, const float* v, const int64_t* cu, float* g, int64_t N, int64_t d,
                       int64_t r, float alpha, int64_t blocks) {
  if (dtype == 0) outer<float>(x, v, cu, g, N, d, r, alpha, blocks);
  if (dtype == 1) outer<__half>(x, v, cu, g, N, d, r, alpha, blocks);
  if (dtype == 2) outer<__nv_bfloat16>(x, v, cu, g, N, d, r, alpha, blocks);
}

}  // extern "C"
