/* C interface of the clip_guard CUDA kernels.
 *
 * The kernels (prompt_attention.cu, insert_prompts.cu) include only CUDA headers, so
 * nvcc compiles them without torch; register.cpp, built only with a CUDA torch, is the
 * torch-facing side. Launchers run on the given cudaStream_t (passed as void*) and
 * return NULL on success, otherwise a static error message. */
#ifndef CLIP_GUARD_CUDA_KERNELS_H_
#define CLIP_GUARD_CUDA_KERNELS_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum clip_guard_dtype { CLIP_GUARD_FLOAT32 = 0, CLIP_GUARD_FLOAT16 = 1, CLIP_GUARD_BFLOAT16 = 2 };

/* The widest head the attention kernel takes; wider heads use the ATen composite path. */
#define CLIP_GUARD_MAX_HEAD_DIM 128

typedef struct {
  const void* q;         /* [batch, heads, queries, dim], unit stride in dim */
  const void* k;         /* [batch, heads, keys, dim], unit stride in dim */
  const void* v;         /* like k */
  const void* prompt_k;  /* [heads, prompts, dim], contiguous, shared by every image */
  const void* prompt_v;  /* like prompt_k */
  void* out;             /* [batch, heads, queries, dim], contiguous */
  int64_t batch, heads, queries, keys, prompts, dim;
  int64_t q_stride[3]; /* strides of batch, heads and queries, in elements */
  int64_t k_stride[3];
  int64_t v_stride[3];
  float scale; /* usually 1/sqrt(dim) */
} clip_guard_prompt_attention_args;

/* out = softmax(scale q [k ; prompt_k]^T) [v ; prompt_v], one softmax over keys + prompts. */
const char* clip_guard_prompt_attention_forward_cuda(const clip_guard_prompt_attention_args* args, int dtype,
                                                     void* stream);

/* out [batch, 1 + prompts + length - 1, row] from contiguous tokens [batch, length, row] and
 * prompts [prompts, row]; row_bytes = width * element size, so any dtype works. */
const char* clip_guard_insert_prompts_cuda(const void* tokens, const void* prompts, void* out, int64_t batch,
                                           int64_t length, int64_t num_prompts, int64_t row_bytes, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* CLIP_GUARD_CUDA_KERNELS_H_ */
