// The CUDA kernels of the clip_guard operators, registered with the dispatcher.
//
// Compiled only when torch has CUDA (cpp_ext/_build.py adds it to the sources then). It
// includes no CUDA header: the current stream comes through c10's device-generic API, and
// the kernels through the C interface of kernels.h.
#include <cmath>

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include "../checks.h"
#include "../prompt_attention.h"
#include "kernels.h"

namespace clip_guard {
namespace {

void* current_stream(const at::Device& device) {
  return c10::impl::getDeviceGuardImpl(device.type())->getStream(device).native_handle();
}

int kernel_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return CLIP_GUARD_FLOAT32;
    case at::kHalf:
      return CLIP_GUARD_FLOAT16;
    case at::kBFloat16:
      return CLIP_GUARD_BFLOAT16;
    default:
      return -1;
  }
}

// The kernel takes any strides for images, heads and tokens (a q, k or v sliced from a
// fused qkv projection is not copied), but needs unit stride along the head width.
at::Tensor with_unit_last_stride(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

at::Tensor prompt_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& prompt_k, const at::Tensor& prompt_v) {
  check_prompt_attention_inputs(q, k, v, prompt_k, prompt_v);
  const int dtype = kernel_dtype(q.scalar_type());
  if (dtype < 0 || q.size(3) > CLIP_GUARD_MAX_HEAD_DIM) {
    return prompt_attention_composite(q, k, v, prompt_k, prompt_v);  // float64, or heads wider than the kernel's
  }
  const c10::DeviceGuard device_guard(q.device());
  const at::Tensor q_ = with_unit_last_stride(q), k_ = with_unit_last_stride(k), v_ = with_unit_last_stride(v);
  const at::Tensor prompt_k_ = prompt_k.contiguous(), prompt_v_ = prompt_v.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());

  clip_guard_prompt_attention_args args{};
  args.q = q_.data_ptr();
  args.k = k_.data_ptr();
  args.v = v_.data_ptr();
  args.prompt_k = prompt_k_.data_ptr();
  args.prompt_v = prompt_v_.data_ptr();
  args.out = out.data_ptr();
  args.batch = q.size(0);
  args.heads = q.size(1);
  args.queries = q.size(2);
  args.keys = k.size(2);
  args.prompts = prompt_k.size(1);
  args.dim = q.size(3);
  for (int i = 0; i < 3; ++i) {
    args.q_stride[i] = q_.stride(i);
    args.k_stride[i] = k_.stride(i);
    args.v_stride[i] = v_.stride(i);
  }
  args.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(args.dim)));
  const char* error = clip_guard_prompt_attention_forward_cuda(&args, dtype, current_stream(q.device()));
  TORCH_CHECK(error == nullptr, "clip_guard::prompt_attention: the CUDA kernel failed: ", error);
  return out;
}

at::Tensor insert_prompts_cuda(const at::Tensor& tokens, const at::Tensor& prompts) {
  check_insert_prompts_inputs(tokens, prompts);
  const c10::DeviceGuard device_guard(tokens.device());
  const at::Tensor tokens_ = tokens.contiguous(), prompts_ = prompts.contiguous();
  const int64_t batch = tokens.size(0), length = tokens.size(1), width = tokens.size(2);
  at::Tensor out = at::empty({batch, length + prompts.size(0), width}, tokens.options());
  const char* error =
      clip_guard_insert_prompts_cuda(tokens_.data_ptr(), prompts_.data_ptr(), out.data_ptr(), batch, length,
                                     prompts.size(0), width * tokens.element_size(), current_stream(tokens.device()));
  TORCH_CHECK(error == nullptr, "clip_guard::insert_prompts: the CUDA kernel failed: ", error);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(clip_guard, CUDA, m) {
  m.impl("prompt_attention", &prompt_attention_cuda);
  // The backward is a handful of batched matmuls (cuBLAS) and element-wise operators.
  m.impl("prompt_attention_backward", &prompt_attention_backward);
  m.impl("insert_prompts", &insert_prompts_cuda);
}

}  // namespace clip_guard
