// Schemas of the clip_guard operators. Kernels are registered per device in
// prompt_attention.cpp and insert_prompts.cpp (CPU) and cuda/register.cpp (CUDA);
// fake (meta) kernels and autograd formulas in cpp_ext/_registrations.py.
#include <torch/library.h>

TORCH_LIBRARY(clip_guard, m) {
  // softmax(q [k ; prompt_k]^T / sqrt(d)) [v ; prompt_v]; q, k, v [N, H, T, d], prompt_k, prompt_v [H, b, d].
  m.def("prompt_attention(Tensor q, Tensor k, Tensor v, Tensor prompt_k, Tensor prompt_v) -> Tensor");
  m.def(
      "prompt_attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor prompt_k, Tensor prompt_v)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // tokens [N, 1+T, D], prompts [b, D] -> [N, 1+b+T, D], the prompts right after the class token.
  m.def("insert_prompts(Tensor tokens, Tensor prompts) -> Tensor");
}
