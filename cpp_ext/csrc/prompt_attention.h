// Device-generic parts of clip_guard::prompt_attention, written with ATen operators.
//
// The prompt keys and values [H, b, d] are never expanded over the batch: the image-key
// scores are batched over (image, head), the prompt-key scores over heads only, with the
// batch folded into the rows ([H, N*T, d] x [H, d, b]); one softmax spans both key sets.
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

namespace clip_guard {

// Forward on the whole batch, computed in the accumulation type; returns q's dtype, contiguous.
// The float64 path on every device, and the CUDA kernel's fallback for heads wider than it takes.
at::Tensor prompt_attention_composite(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& prompt_k, const at::Tensor& prompt_v);

// Gradients of (q, k, v, prompt_k, prompt_v); recomputes the attention probabilities.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prompt_attention_backward(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& prompt_k, const at::Tensor& prompt_v);

}  // namespace clip_guard
