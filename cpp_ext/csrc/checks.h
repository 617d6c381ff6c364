// Input validation shared by every kernel of the clip_guard operators (CPU and CUDA).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace clip_guard {

inline bool is_supported_float(at::ScalarType type) {
  return type == at::kFloat || type == at::kHalf || type == at::kBFloat16 || type == at::kDouble;
}

// Accumulation type: float32 for float16/bfloat16 (and float32), float64 for float64.
inline at::ScalarType accumulate_type(at::ScalarType type) {
  return type == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_prompt_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const at::Tensor& prompt_k, const at::Tensor& prompt_v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "clip_guard::prompt_attention: q, k and v must be 4-D [N, H, T, d], got ", q.sizes(), ", ", k.sizes(),
              " and ", v.sizes());
  TORCH_CHECK(prompt_k.dim() == 3 && prompt_v.dim() == 3,
              "clip_guard::prompt_attention: prompt_k and prompt_v must be 3-D [H, b, d], got ", prompt_k.sizes(),
              " and ", prompt_v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), "clip_guard::prompt_attention: k and v must have the same shape, got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "clip_guard::prompt_attention: k and v must match q in batch, heads and head width: q is ", q.sizes(),
              ", k is ", k.sizes());
  TORCH_CHECK(prompt_k.sizes() == prompt_v.sizes(),
              "clip_guard::prompt_attention: prompt_k and prompt_v must have the same shape, got ", prompt_k.sizes(),
              " and ", prompt_v.sizes());
  TORCH_CHECK(prompt_k.size(0) == q.size(1),
              "clip_guard::prompt_attention: prompt_k has ", prompt_k.size(0), " heads but q has ", q.size(1));
  TORCH_CHECK(prompt_k.size(2) == q.size(3),
              "clip_guard::prompt_attention: prompt_k has head width ", prompt_k.size(2), " but q has ", q.size(3));
  TORCH_CHECK(q.size(3) >= 1, "clip_guard::prompt_attention: head width must be at least 1, got ", q.sizes());
  TORCH_CHECK(k.size(2) >= 1 && prompt_k.size(1) >= 1,
              "clip_guard::prompt_attention: needs at least one image key and one prompt token, got ", k.size(2),
              " keys and ", prompt_k.size(1), " prompt tokens");
  TORCH_CHECK(is_supported_float(q.scalar_type()),
              "clip_guard::prompt_attention: supports float32, float16, bfloat16 and float64, got ", q.scalar_type());
  for (const at::Tensor* other : {&k, &v, &prompt_k, &prompt_v}) {
    TORCH_CHECK(other->scalar_type() == q.scalar_type(),
                "clip_guard::prompt_attention: all inputs must have one dtype, got ", q.scalar_type(), " and ",
                other->scalar_type(), " (cast the prompt keys and values with .to(q.dtype))");
    TORCH_CHECK(other->device() == q.device(), "clip_guard::prompt_attention: all inputs must be on one device, got ",
                q.device(), " and ", other->device());
  }
}

inline void check_prompt_attention_grad(const at::Tensor& grad, const at::Tensor& q) {
  TORCH_CHECK(grad.sizes() == q.sizes(), "clip_guard::prompt_attention_backward: grad must have q's shape ", q.sizes(),
              ", got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == q.scalar_type() && grad.device() == q.device(),
              "clip_guard::prompt_attention_backward: grad must have q's dtype and device, got ", grad.scalar_type(),
              " on ", grad.device(), " for ", q.scalar_type(), " on ", q.device());
}

inline void check_insert_prompts_inputs(const at::Tensor& tokens, const at::Tensor& prompts) {
  TORCH_CHECK(tokens.dim() == 3, "clip_guard::insert_prompts: tokens must be 3-D [N, 1+T, D], got ", tokens.sizes());
  TORCH_CHECK(prompts.dim() == 2, "clip_guard::insert_prompts: prompts must be 2-D [b, D], got ", prompts.sizes());
  TORCH_CHECK(tokens.size(1) >= 1, "clip_guard::insert_prompts: tokens need a class token, got ", tokens.sizes());
  TORCH_CHECK(prompts.size(1) == tokens.size(2), "clip_guard::insert_prompts: prompts have width ", prompts.size(1),
              " but tokens have width ", tokens.size(2));
  TORCH_CHECK(prompts.scalar_type() == tokens.scalar_type(),
              "clip_guard::insert_prompts: tokens and prompts must have one dtype, got ", tokens.scalar_type(),
              " and ", prompts.scalar_type(), " (cast the prompts with .to(tokens.dtype))");
  TORCH_CHECK(prompts.device() == tokens.device(),
              "clip_guard::insert_prompts: tokens and prompts must be on one device, got ", tokens.device(), " and ",
              prompts.device());
}

}  // namespace clip_guard
