// clip_guard::insert_prompts on CUDA: one gather-copy kernel, prompts after the class token.
// It moves raw words (up to 16 bytes), so it serves every dtype. Only CUDA headers here.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;  // a grid-stride loop covers the rest

template <typename Word>
__global__ void insert_prompts_kernel(const Word* tokens, const Word* prompts, Word* out, int64_t length,
                                      int64_t num_prompts, int64_t row_words, int64_t total_words) {
  const int64_t rows_out = length + num_prompts;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total_words; i += stride) {
    const int64_t word = i % row_words;
    const int64_t row = (i / row_words) % rows_out;
    const int64_t image = i / (row_words * rows_out);
    const Word* source;
    if (row == 0) {
      source = tokens + image * length * row_words;  // the class token
    } else if (row <= num_prompts) {
      source = prompts + (row - 1) * row_words;
    } else {
      source = tokens + (image * length + row - num_prompts) * row_words;
    }
    out[i] = source[word];
  }
}

template <typename Word>
const char* launch(const void* tokens, const void* prompts, void* out, int64_t batch, int64_t length,
                   int64_t num_prompts, int64_t row_bytes, cudaStream_t stream) {
  const int64_t row_words = row_bytes / static_cast<int64_t>(sizeof(Word));
  const int64_t total_words = batch * (length + num_prompts) * row_words;
  int64_t blocks = (total_words + kThreads - 1) / kThreads;
  blocks = blocks < kMaxBlocks ? blocks : kMaxBlocks;
  insert_prompts_kernel<Word><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const Word*>(tokens), static_cast<const Word*>(prompts), static_cast<Word*>(out), length,
      num_prompts, row_words, total_words);
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

}  // namespace

extern "C" const char* clip_guard_insert_prompts_cuda(const void* tokens, const void* prompts, void* out,
                                                      int64_t batch, int64_t length, int64_t num_prompts,
                                                      int64_t row_bytes, void* stream) {
  if (length < 1 || num_prompts < 0 || row_bytes < 0 || batch < 0) {
    return "clip_guard_insert_prompts_cuda: needs a class token and non-negative sizes";
  }
  if (batch == 0 || row_bytes == 0) {
    return nullptr;  // empty output: nothing to launch
  }
  const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  // The widest word that divides a row and every pointer's alignment.
  const uintptr_t alignment = reinterpret_cast<uintptr_t>(tokens) | reinterpret_cast<uintptr_t>(prompts) |
                              reinterpret_cast<uintptr_t>(out) | static_cast<uintptr_t>(row_bytes);
  if (alignment % 16 == 0) {
    return launch<uint4>(tokens, prompts, out, batch, length, num_prompts, row_bytes, cuda_stream);
  }
  if (alignment % 8 == 0) {
    return launch<uint2>(tokens, prompts, out, batch, length, num_prompts, row_bytes, cuda_stream);
  }
  if (alignment % 4 == 0) {
    return launch<uint32_t>(tokens, prompts, out, batch, length, num_prompts, row_bytes, cuda_stream);
  }
  if (alignment % 2 == 0) {
    return launch<uint16_t>(tokens, prompts, out, batch, length, num_prompts, row_bytes, cuda_stream);
  }
  return launch<uint8_t>(tokens, prompts, out, batch, length, num_prompts, row_bytes, cuda_stream);
}
