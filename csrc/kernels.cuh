// Device code of the C-Poly LoRA kernels; the launchers are in kernels.cu.
//
// Rows are visited in tiles of consecutive rows; a tile that crosses segment
// boundaries is processed one segment piece at a time, so segments (empty,
// single-token or huge) need no host-side planning and no synchronisation.
// Row * stride products are int64.  Rows of T are read and written 16 bytes
// at a time when the matrix is 16-byte aligned and its row length allows it,
// element by element otherwise.  Sums run in float32 in a fixed order.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace cpoly {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRankChunk = 8;  // ranks per block in project_down and segment_outer

// project_down: each warp owns whole rows (kDownRowsPerWarp at a time).
constexpr int kDownRowsPerWarp = 4;
constexpr int kDownTile = kWarps * kDownRowsPerWarp;  // rows per block

// project_up: kUpColVecs column vectors x kUpGroups row groups per block.
constexpr int kUpTile = 32;
constexpr int kUpColVecs = 32;
constexpr int kUpGroups = kThreads / kUpColVecs;
constexpr int kUpRows = kUpTile / kUpGroups;  // rows per thread
constexpr int kUpRankStage = 32;              // ranks of v staged in shared memory at a time

// segment_outer: kOuterColVecs column vectors x kOuterLanes token lanes per block.
constexpr int kOuterColVecs = 8;
constexpr int kOuterLanes = kThreads / kOuterColVecs;

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
struct VecWidth {
  static constexpr int value = 16 / sizeof(T);
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Elements [c, c + V) of `row` (length d) as floats, zero past d.
template <typename T>
__device__ __forceinline__ void load_vec(const T* __restrict__ row, int64_t c, int64_t d, bool vec_ok,
                                         float (&out)[VecWidth<T>::value]) {
  constexpr int V = VecWidth<T>::value;
  if (vec_ok && c + V <= d) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + c));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = to_float(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = c + i < d ? to_float(row[c + i]) : 0.f;
  }
}

// Stores elements [c, min(c + V, d)) of `row`.
template <typename T>
__device__ __forceinline__ void store_vec(T* __restrict__ row, int64_t c, int64_t d, bool vec_ok,
                                          const float (&in)[VecWidth<T>::value]) {
  constexpr int V = VecWidth<T>::value;
  if (vec_ok && c + V <= d) {
    alignas(16) T e[V];
#pragma unroll
    for (int i = 0; i < V; ++i) e[i] = from_float<T>(in[i]);
    *reinterpret_cast<uint4*>(row + c) = *reinterpret_cast<const uint4*>(e);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i)
      if (c + i < d) row[c + i] = from_float<T>(in[i]);
  }
}

// Elements [c, c + V) of a float32 row (length d), zero past d; 16-byte loads when vec_ok.
template <int V>
__device__ __forceinline__ void load_vec_f32(const float* __restrict__ row, int64_t c, int64_t d,
                                             bool vec_ok, float (&out)[V]) {
  if (vec_ok && c + V <= d) {
#pragma unroll
    for (int i = 0; i < V; i += 4) {
      const float4 q = __ldg(reinterpret_cast<const float4*>(row + c + i));
      out[i] = q.x;
      out[i + 1] = q.y;
      out[i + 2] = q.z;
      out[i + 3] = q.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = c + i < d ? __ldg(row + c + i) : 0.f;
  }
}

// The segment of row m: the largest s in [0, b) with cu[s] <= m.
__device__ __forceinline__ int64_t segment_of(const int64_t* __restrict__ cu, int64_t b, int64_t m) {
  int64_t lo = 0, hi = b - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (__ldg(cu + mid) <= m) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// y[n, j0:j0+kRankChunk] = alpha * x[n, :] @ w[s(n), :, j0:j0+kRankChunk] for the rows of one
// tile.  Each warp reduces whole rows: lanes stride over the row 16 bytes at a
// time (coalesced), then a butterfly shuffle sums the lanes.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    project_down_kernel(const T* __restrict__ x, const float* __restrict__ w, const int64_t* __restrict__ cu,
                        float* __restrict__ y, int64_t N, int64_t d, int64_t r, int64_t rp, int64_t b,
                        float alpha, bool vec_ok) {
  constexpr int V = VecWidth<T>::value;
  const int64_t chunks = rp / kRankChunk;
  const int64_t m0 = (blockIdx.x / chunks) * kDownTile;
  const int64_t m1 = min(N, m0 + kDownTile);
  const int64_t j0 = (blockIdx.x % chunks) * kRankChunk;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  for (int64_t s = segment_of(cu, b, m0); s < b && __ldg(cu + s) < m1; ++s) {
    const int64_t ra = max(m0, __ldg(cu + s)), rb = min(m1, __ldg(cu + s + 1));
    if (ra >= rb) continue;  // an empty segment (uniform across the block)
    const float* __restrict__ ws = w + s * d * rp + j0;
    float acc[kDownRowsPerWarp][kRankChunk] = {};
    for (int64_t c = int64_t(lane) * V; c < d; c += 32 * V) {
      float xv[kDownRowsPerWarp][V];
#pragma unroll
      for (int i = 0; i < kDownRowsPerWarp; ++i) {
        const int64_t n = ra + warp + kWarps * i;
        if (n < rb) {
          load_vec(x + n * d, c, d, vec_ok, xv[i]);
        } else {
#pragma unroll
          for (int e = 0; e < V; ++e) xv[i][e] = 0.f;
        }
      }
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if (c + e < d) {
          const float4* wp = reinterpret_cast<const float4*>(ws + (c + e) * rp);
          const float4 wa = __ldg(wp), wb = __ldg(wp + 1);
          const float wv[kRankChunk] = {wa.x, wa.y, wa.z, wa.w, wb.x, wb.y, wb.z, wb.w};
#pragma unroll
          for (int i = 0; i < kDownRowsPerWarp; ++i)
#pragma unroll
            for (int j = 0; j < kRankChunk; ++j) acc[i][j] = fmaf(xv[i][e], wv[j], acc[i][j]);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kDownRowsPerWarp; ++i) {
#pragma unroll
      for (int j = 0; j < kRankChunk; ++j)
#pragma unroll
        for (int off = 16; off > 0; off /= 2) acc[i][j] += __shfl_xor_sync(kFullMask, acc[i][j], off);
      const int64_t n = ra + warp + kWarps * i;
#pragma unroll
      for (int j = 0; j < kRankChunk; ++j)
        if (lane == j && n < rb && j0 + j < r) y[n * r + j0 + j] = alpha * acc[i][j];
    }
  }
}

// y[n, c:c+V] = base[n, c:c+V] + alpha * v[n, :] @ w[s(n), :, c:c+V] for the rows of one tile
// and one block of columns.  v's rows are staged in shared memory kUpRankStage ranks at a time.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    project_up_kernel(const float* __restrict__ v, const float* __restrict__ w, const int64_t* __restrict__ cu,
                      const T* __restrict__ base, T* __restrict__ y, int64_t N, int64_t d, int64_t r, int64_t b,
                      float alpha, bool vec_ok, bool w_vec_ok) {
  constexpr int V = VecWidth<T>::value;
  __shared__ float vs[kUpTile][kUpRankStage];
  const int64_t col_blocks = (d + kUpColVecs * V - 1) / (kUpColVecs * V);
  const int64_t m0 = (blockIdx.x / col_blocks) * kUpTile;
  const int64_t m1 = min(N, m0 + kUpTile);
  const int group = threadIdx.x / kUpColVecs;
  const int64_t c = ((blockIdx.x % col_blocks) * kUpColVecs + threadIdx.x % kUpColVecs) * V;

  for (int64_t s = segment_of(cu, b, m0); s < b && __ldg(cu + s) < m1; ++s) {
    const int64_t ra = max(m0, __ldg(cu + s)), rb = min(m1, __ldg(cu + s + 1));
    if (ra >= rb) continue;  // an empty segment (uniform across the block, so no barrier is skipped unevenly)
    const float* __restrict__ ws = w + s * r * d;
    float acc[kUpRows][V] = {};
    for (int64_t k0 = 0; k0 < r; k0 += kUpRankStage) {
      const int kn = int(min(int64_t(kUpRankStage), r - k0));
      __syncthreads();  // the previous stage's readers are done
      for (int i = threadIdx.x; i < kUpTile * kUpRankStage; i += kThreads) {
        const int row = i / kUpRankStage, k = i % kUpRankStage;
        const int64_t n = ra + row;
        vs[row][k] = n < rb && k < kn ? __ldg(v + n * r + k0 + k) : 0.f;
      }
      __syncthreads();
      if (c < d) {
        for (int k = 0; k < kn; ++k) {
          float wv[V];
          load_vec_f32<V>(ws + (k0 + k) * d, c, d, w_vec_ok, wv);
#pragma unroll
          for (int i = 0; i < kUpRows; ++i) {
            const float hv = vs[group + kUpGroups * i][k];
#pragma unroll
            for (int e = 0; e < V; ++e) acc[i][e] = fmaf(hv, wv[e], acc[i][e]);
          }
        }
      }
    }
    if (c < d) {
#pragma unroll
      for (int i = 0; i < kUpRows; ++i) {
        const int64_t n = ra + group + kUpGroups * i;
        if (n >= rb) continue;
        float o[V];
        if (base != nullptr) {
          load_vec(base + n * d, c, d, vec_ok, o);
        } else {
#pragma unroll
          for (int e = 0; e < V; ++e) o[e] = 0.f;
        }
#pragma unroll
        for (int e = 0; e < V; ++e) o[e] = fmaf(alpha, acc[i][e], o[e]);
        store_vec(y + n * d, c, d, vec_ok, o);
      }
    }
  }
}

// g[s, c:c+V, j0:j0+kRankChunk] = alpha * sum_{n in segment s} x[n, c:c+V]^T v[n, j0:j0+kRankChunk]
// for one segment, one block of columns and one chunk of ranks.  Token lanes
// stride over the segment; their partial sums are combined by shuffles within
// a warp, then across warps in shared memory, always in the same order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    segment_outer_kernel(const T* __restrict__ x, const float* __restrict__ v, const int64_t* __restrict__ cu,
                         float* __restrict__ g, int64_t N, int64_t d, int64_t r, float alpha, bool vec_ok) {
  constexpr int V = VecWidth<T>::value;
  constexpr int kOut = V * kRankChunk;  // outputs per column vector
  __shared__ float partial[kWarps][kOuterColVecs][kOut];
  const int64_t chunks = (r + kRankChunk - 1) / kRankChunk;
  const int64_t col_blocks = (d + kOuterColVecs * V - 1) / (kOuterColVecs * V);
  const int64_t j0 = (blockIdx.x % chunks) * kRankChunk;
  const int64_t cb = (blockIdx.x / chunks) % col_blocks;
  const int64_t s = blockIdx.x / (chunks * col_blocks);
  const int colvec = threadIdx.x % kOuterColVecs, token_lane = threadIdx.x / kOuterColVecs;
  const int64_t c = (cb * kOuterColVecs + colvec) * V;
  const int64_t t0 = min(N, max(int64_t(0), __ldg(cu + s)));
  const int64_t t1 = min(N, max(t0, __ldg(cu + s + 1)));

  float acc[V][kRankChunk] = {};
  if (c < d) {
    for (int64_t n = t0 + token_lane; n < t1; n += kOuterLanes) {
      float xv[V];
      load_vec(x + n * d, c, d, vec_ok, xv);
      float vv[kRankChunk];
#pragma unroll
      for (int j = 0; j < kRankChunk; ++j) vv[j] = j0 + j < r ? __ldg(v + n * r + j0 + j) : 0.f;
#pragma unroll
      for (int e = 0; e < V; ++e)
#pragma unroll
        for (int j = 0; j < kRankChunk; ++j) acc[e][j] = fmaf(xv[e], vv[j], acc[e][j]);
    }
  }
  // Lanes l, l + 8, l + 16, l + 24 of a warp hold the same column vector.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int e = 0; e < V; ++e)
#pragma unroll
    for (int j = 0; j < kRankChunk; ++j) {
      acc[e][j] += __shfl_xor_sync(kFullMask, acc[e][j], kOuterColVecs);
      acc[e][j] += __shfl_xor_sync(kFullMask, acc[e][j], 2 * kOuterColVecs);
    }
  if (lane < kOuterColVecs) {
#pragma unroll
    for (int e = 0; e < V; ++e)
#pragma unroll
      for (int j = 0; j < kRankChunk; ++j) partial[warp][lane][e * kRankChunk + j] = acc[e][j];
  }
  __syncthreads();
  for (int o = threadIdx.x; o < kOuterColVecs * kOut; o += kThreads) {
    const int cv = o / kOut, e = (o % kOut) / kRankChunk, j = o % kRankChunk;
    const int64_t col = (cb * kOuterColVecs + cv) * V + e;
    if (col < d && j0 + j < r) {
      float sum = 0.f;
#pragma unroll
      for (int wi = 0; wi < kWarps; ++wi) sum += partial[wi][cv][o % kOut];
      g[(s * d + col) * r + j0 + j] = alpha * sum;
    }
  }
}

}  // namespace
}  // namespace cpoly
