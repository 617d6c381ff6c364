// clip_guard::prompt_attention forward on CUDA: an online-softmax (flash-style) kernel.
//
// A block takes one (image, head) and 16 queries. It streams tiles of 32 keys through
// shared memory, first the image's own keys, then the block's prompt keys, which every
// image reads from their one [H, b, d] copy; a running max and sum give one softmax over
// both sets without ever storing a score. Accumulation is in float32 for every dtype.
// Only CUDA headers here: nvcc compiles this file without torch (see kernels.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernels.h"

namespace {

constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 4;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
constexpr int kTileKeys = 32;  // one key of a tile per lane
constexpr int kMaxDim = CLIP_GUARD_MAX_HEAD_DIM;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_max(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  }
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    x += __shfl_xor_sync(kFullMask, x, offset);
  }
  return x;
}

// Grid: x = image * heads + head, y = block of kRowsPerBlock queries; kWarps warps a block.
// Each warp owns kRowsPerWarp queries. For the scores a lane owns one key of the tile; for
// the output it owns the columns lane, lane + 32, ... (kColumnsPerLane = ceil(dim / 32)).
template <typename T, int kColumnsPerLane>
__global__ void __launch_bounds__(kWarps * 32)
    prompt_attention_forward_kernel(const clip_guard_prompt_attention_args args) {
  __shared__ float q_tile[kRowsPerBlock][kMaxDim];
  __shared__ float k_tile[kTileKeys][kMaxDim + 1];  // padded: lanes reading one column hit distinct banks
  __shared__ float v_tile[kTileKeys][kMaxDim];

  const int64_t image = blockIdx.x / args.heads;
  const int64_t head = blockIdx.x % args.heads;
  const int64_t first_row = static_cast<int64_t>(blockIdx.y) * kRowsPerBlock;
  const int dim = static_cast<int>(args.dim);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t total_keys = args.keys + args.prompts;

  const T* q = static_cast<const T*>(args.q) + image * args.q_stride[0] + head * args.q_stride[1];
  const T* k = static_cast<const T*>(args.k) + image * args.k_stride[0] + head * args.k_stride[1];
  const T* v = static_cast<const T*>(args.v) + image * args.v_stride[0] + head * args.v_stride[1];
  const T* prompt_k = static_cast<const T*>(args.prompt_k) + head * args.prompts * args.dim;
  const T* prompt_v = static_cast<const T*>(args.prompt_v) + head * args.prompts * args.dim;

  // Scores in base 2: exp(scale * s) = exp2(scale * log2(e) * s), folded into q once.
  const float q_scale = args.scale * kLog2e;
  for (int i = threadIdx.x; i < kRowsPerBlock * dim; i += blockDim.x) {
    const int r = i / dim;
    const int c = i % dim;
    const int64_t row = first_row + r;
    q_tile[r][c] = row < args.queries ? to_float(q[row * args.q_stride[2] + c]) * q_scale : 0.f;
  }

  float row_max[kRowsPerWarp];
  float row_sum[kRowsPerWarp];
  float acc[kRowsPerWarp][kColumnsPerLane];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
#pragma unroll
    for (int j = 0; j < kColumnsPerLane; ++j) {
      acc[r][j] = 0.f;
    }
  }

  for (int64_t tile = 0; tile < total_keys; tile += kTileKeys) {
    __syncthreads();  // q_tile is complete, and every warp is done with the previous tile
    for (int i = threadIdx.x; i < kTileKeys * dim; i += blockDim.x) {
      const int r = i / dim;
      const int c = i % dim;
      const int64_t key = tile + r;
      float key_value = 0.f;
      float value = 0.f;
      if (key < args.keys) {
        key_value = to_float(k[key * args.k_stride[2] + c]);
        value = to_float(v[key * args.v_stride[2] + c]);
      } else if (key < total_keys) {
        const int64_t offset = (key - args.keys) * args.dim + c;
        key_value = to_float(prompt_k[offset]);
        value = to_float(prompt_v[offset]);
      }
      k_tile[r][c] = key_value;
      v_tile[r][c] = value;
    }
    __syncthreads();

    float score[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      score[r] = 0.f;
    }
#pragma unroll 4
    for (int c = 0; c < dim; ++c) {
      const float key_c = k_tile[lane][c];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        score[r] += q_tile[warp * kRowsPerWarp + r][c] * key_c;
      }
    }

    // Online softmax: rescale what was accumulated so far to the new running max.
    const bool valid = tile + lane < total_keys;  // lane 0 always is, so every max below is finite
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const float s = valid ? score[r] : -INFINITY;
      const float new_max = fmaxf(row_max[r], warp_max(s));
      const float correction = exp2f(row_max[r] - new_max);
      const float p = exp2f(s - new_max);
      row_sum[r] = row_sum[r] * correction + warp_sum(p);
      row_max[r] = new_max;
#pragma unroll
      for (int j = 0; j < kColumnsPerLane; ++j) {
        acc[r][j] *= correction;
      }
      score[r] = p;
    }

    const int64_t remaining = total_keys - tile;
    const int tile_keys = remaining < kTileKeys ? static_cast<int>(remaining) : kTileKeys;
    for (int key = 0; key < tile_keys; ++key) {
      float p[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        p[r] = __shfl_sync(kFullMask, score[r], key);
      }
#pragma unroll
      for (int j = 0; j < kColumnsPerLane; ++j) {
        const int c = lane + 32 * j;
        const float value = c < dim ? v_tile[key][c] : 0.f;
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          acc[r][j] += p[r] * value;
        }
      }
    }
  }

  T* out = static_cast<T*>(args.out) + (image * args.heads + head) * args.queries * args.dim;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t row = first_row + warp * kRowsPerWarp + r;
    if (row >= args.queries) {
      continue;
    }
    const float inverse_sum = 1.f / row_sum[r];
#pragma unroll
    for (int j = 0; j < kColumnsPerLane; ++j) {
      const int c = lane + 32 * j;
      if (c < dim) {
        out[row * args.dim + c] = from_float<T>(acc[r][j] * inverse_sum);
      }
    }
  }
}

template <typename T>
const char* launch(const clip_guard_prompt_attention_args& args, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(args.batch * args.heads),
                  static_cast<unsigned>((args.queries + kRowsPerBlock - 1) / kRowsPerBlock));
  const dim3 block(kWarps * 32);
  switch ((args.dim + 31) / 32) {
    case 1:
      prompt_attention_forward_kernel<T, 1><<<grid, block, 0, stream>>>(args);
      break;
    case 2:
      prompt_attention_forward_kernel<T, 2><<<grid, block, 0, stream>>>(args);
      break;
    case 3:
      prompt_attention_forward_kernel<T, 3><<<grid, block, 0, stream>>>(args);
      break;
    default:
      prompt_attention_forward_kernel<T, 4><<<grid, block, 0, stream>>>(args);
      break;
  }
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

}  // namespace

extern "C" const char* clip_guard_prompt_attention_forward_cuda(const clip_guard_prompt_attention_args* args,
                                                                int dtype, void* stream) {
  if (args == nullptr) {
    return "clip_guard_prompt_attention_forward_cuda: no arguments";
  }
  if (args->dim < 1 || args->dim > kMaxDim) {
    return "clip_guard_prompt_attention_forward_cuda: the head width must lie in [1, 128]";
  }
  if (args->keys < 1 || args->prompts < 1) {
    return "clip_guard_prompt_attention_forward_cuda: needs at least one key and one prompt";
  }
  if (args->batch == 0 || args->heads == 0 || args->queries == 0) {
    return nullptr;  // empty output: nothing to launch
  }
  if (args->batch * args->heads > INT32_MAX || (args->queries + kRowsPerBlock - 1) / kRowsPerBlock > 65535) {
    return "clip_guard_prompt_attention_forward_cuda: too many images, heads or queries for one launch";
  }
  const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case CLIP_GUARD_FLOAT32:
      return launch<float>(*args, cuda_stream);
    case CLIP_GUARD_FLOAT16:
      return launch<__half>(*args, cuda_stream);
    case CLIP_GUARD_BFLOAT16:
      return launch<__nv_bfloat16>(*args, cuda_stream);
    default:
      return "clip_guard_prompt_attention_forward_cuda: unsupported dtype (float32, float16 and bfloat16 only)";
  }
}
