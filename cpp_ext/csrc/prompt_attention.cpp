// clip_guard::prompt_attention on the CPU, and its device-generic composite forward and backward.
//
// CPU forward: ATen's fused attention kernel per image, on a per-thread staging buffer
// that holds the prompt keys and values once (measured against the alternatives in
// docs/cpp_ext.md). Composite forward (float64, CUDA fallback) and backward: batched
// matmuls in which the prompts are shared by every image, see prompt_attention.h.
#include <cmath>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include "checks.h"
#include "prompt_attention.h"

namespace clip_guard {
namespace {

double softmax_scale(const at::Tensor& q) {
  return 1.0 / std::sqrt(static_cast<double>(q.size(3)));
}

// One softmax over the image keys and the prompt keys, for c images at once.
// q, k, v: [c, H, T, d] in the accumulation type, q already multiplied by 1/sqrt(d);
// prompt_k_t: [H, d, b] and prompt_v: [H, b, d], shared by every image.
// Returns [c, H, Tq, d] in the accumulation type.
at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prompt_k_t,
                  const at::Tensor& prompt_v) {
  const int64_t images = q.size(0), heads = q.size(1), queries = q.size(2), width = q.size(3);
  const int64_t prompts = prompt_k_t.size(2);
  at::Tensor image_scores = at::matmul(q, k.transpose(-1, -2));  // [c, H, Tq, Tk]
  // The batch goes into the rows, so the prompt keys are read once per head, never copied.
  const at::Tensor rows = q.transpose(0, 1).reshape({heads, images * queries, width});  // a view when c == 1
  at::Tensor prompt_scores = at::bmm(rows, prompt_k_t);  // [H, c*Tq, b]
  at::Tensor prompt_scores_by_image = prompt_scores.view({heads, images, queries, prompts}).transpose(0, 1);

  const at::Tensor row_max = at::maximum(image_scores.amax(-1, true), prompt_scores_by_image.amax(-1, true));
  image_scores.sub_(row_max).exp_();
  prompt_scores_by_image.sub_(row_max).exp_();
  const at::Tensor denominator = image_scores.sum(-1, true).add_(prompt_scores_by_image.sum(-1, true));

  at::Tensor out = at::matmul(image_scores, v);  // [c, H, Tq, d]
  out.add_(at::bmm(prompt_scores, prompt_v).view({heads, images, queries, width}).transpose(0, 1));
  return out.div_(denominator);
}

// One image's keys and values followed by the block's prompt keys and values. The prompt
// rows are written once, when the buffer is made; each image then copies only its own
// keys and values in, so the prompts are never expanded over the batch.
class StagingBuffer {
 public:
  StagingBuffer(const at::Tensor& prompt_k, const at::Tensor& prompt_v, int64_t image_keys)
      : image_keys_(image_keys) {
    const int64_t heads = prompt_k.size(0), prompts = prompt_k.size(1), width = prompt_k.size(2);
    keys_ = at::empty({1, heads, image_keys + prompts, width}, prompt_k.options());
    values_ = at::empty_like(keys_);
    keys_.narrow(2, image_keys, prompts).copy_(prompt_k.unsqueeze(0));
    values_.narrow(2, image_keys, prompts).copy_(prompt_v.unsqueeze(0));
  }

  // softmax(q [k ; prompt_k]^T / sqrt(d)) [v ; prompt_v] for one image of the batch.
  at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t image) {
    keys_.narrow(2, 0, image_keys_).copy_(k.narrow(0, image, 1));
    values_.narrow(2, 0, image_keys_).copy_(v.narrow(0, image, 1));
    return at::scaled_dot_product_attention(q.narrow(0, image, 1), keys_, values_);
  }

 private:
  int64_t image_keys_;
  at::Tensor keys_, values_;
};

// ATen's fused CPU attention (flash) kernel on the image's keys followed by the prompts,
// one image at a time per thread; every thread has its own staging buffer.
at::Tensor prompt_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& prompt_k, const at::Tensor& prompt_v) {
  check_prompt_attention_inputs(q, k, v, prompt_k, prompt_v);
  if (q.scalar_type() == at::kDouble) {
    return prompt_attention_composite(q, k, v, prompt_k, prompt_v);  // float64 is for validation: the exact path
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t batch = q.size(0), image_keys = k.size(2);
  if (batch == 1) {
    return StagingBuffer(prompt_k, prompt_v, image_keys).attend(q, k, v, 0).contiguous();  // no copy if contiguous
  }
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (out.numel() == 0) {
    return out;
  }
  if (batch < at::get_num_threads()) {
    // Too few images to share out: one at a time, each call using every thread.
    StagingBuffer buffer(prompt_k, prompt_v, image_keys);
    for (int64_t image = 0; image < batch; ++image) {
      out.narrow(0, image, 1).copy_(buffer.attend(q, k, v, image));
    }
    return out;
  }
  // OpenMP workers do not inherit this thread's autograd and dispatch state: hand it over,
  // or they would record autograd history for the operators they call.
  const at::ThreadLocalState state;
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard state_guard(state);
    StagingBuffer buffer(prompt_k, prompt_v, image_keys);  // one per thread
    for (int64_t image = begin; image < end; ++image) {
      out.narrow(0, image, 1).copy_(buffer.attend(q, k, v, image));
    }
  });
  return out;
}

}  // namespace

at::Tensor prompt_attention_composite(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& prompt_k, const at::Tensor& prompt_v) {
  check_prompt_attention_inputs(q, k, v, prompt_k, prompt_v);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::ScalarType acc = accumulate_type(q.scalar_type());
  return attend(q.to(acc).mul(softmax_scale(q)), k.to(acc), v.to(acc), prompt_k.to(acc).transpose(1, 2),
                prompt_v.to(acc))
      .to(q.scalar_type())
      .contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prompt_attention_backward(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& prompt_k, const at::Tensor& prompt_v) {
  check_prompt_attention_inputs(q, k, v, prompt_k, prompt_v);
  check_prompt_attention_grad(grad, q);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::ScalarType acc = accumulate_type(q.scalar_type());
  const double scale = softmax_scale(q);
  const int64_t batch = q.size(0), heads = q.size(1), queries = q.size(2), width = q.size(3);

  const at::Tensor q_scaled = q.to(acc).mul(scale);
  const at::Tensor k_acc = k.to(acc), v_acc = v.to(acc), grad_acc = grad.to(acc);
  const at::Tensor prompt_k_acc = prompt_k.to(acc), prompt_v_acc = prompt_v.to(acc);
  // Prompt terms work on [H, N*Tq, .] rows: the sums over the batch become plain matmuls.
  const at::Tensor q_rows = q_scaled.transpose(0, 1).reshape({heads, batch * queries, width});
  const at::Tensor grad_rows = grad_acc.transpose(0, 1).reshape({heads, batch * queries, width});
  auto by_image = [&](const at::Tensor& rows) {
    return rows.view({heads, batch, queries, rows.size(2)}).transpose(0, 1);
  };

  // Recompute the probabilities of the forward pass.
  at::Tensor p_image = at::matmul(q_scaled, k_acc.transpose(-1, -2));  // [N, H, Tq, Tk]
  at::Tensor p_prompt = at::bmm(q_rows, prompt_k_acc.transpose(1, 2));  // [H, N*Tq, b]
  at::Tensor p_prompt_by_image = by_image(p_prompt);
  const at::Tensor row_max = at::maximum(p_image.amax(-1, true), p_prompt_by_image.amax(-1, true));
  p_image.sub_(row_max).exp_();
  p_prompt_by_image.sub_(row_max).exp_();
  const at::Tensor denominator = p_image.sum(-1, true).add_(p_prompt_by_image.sum(-1, true));
  p_image.div_(denominator);
  p_prompt_by_image.div_(denominator);

  // Score gradients dS = P * (dP - rowsum(P * dP)), with dP = grad [v ; prompt_v]^T.
  at::Tensor ds_image = at::matmul(grad_acc, v_acc.transpose(-1, -2));
  at::Tensor ds_prompt = at::bmm(grad_rows, prompt_v_acc.transpose(1, 2));
  at::Tensor ds_prompt_by_image = by_image(ds_prompt);
  const at::Tensor row_dot =
      (p_image * ds_image).sum(-1, true).add_((p_prompt_by_image * ds_prompt_by_image).sum(-1, true));
  ds_image.sub_(row_dot).mul_(p_image);
  ds_prompt_by_image.sub_(row_dot).mul_(p_prompt_by_image);

  at::Tensor grad_q = at::matmul(ds_image, k_acc);
  grad_q.add_(by_image(at::bmm(ds_prompt, prompt_k_acc))).mul_(scale);
  const at::Tensor grad_k = at::matmul(ds_image.transpose(-1, -2), q_scaled);
  const at::Tensor grad_v = at::matmul(p_image.transpose(-1, -2), grad_acc);
  const at::Tensor grad_prompt_k = at::bmm(ds_prompt.transpose(1, 2), q_rows);  // [H, b, d]
  const at::Tensor grad_prompt_v = at::bmm(p_prompt.transpose(1, 2), grad_rows);

  const at::ScalarType dtype = q.scalar_type();
  auto out = [dtype](const at::Tensor& t) { return t.to(dtype).contiguous(); };
  return {out(grad_q), out(grad_k), out(grad_v), out(grad_prompt_k), out(grad_prompt_v)};
}

TORCH_LIBRARY_IMPL(clip_guard, CPU, m) {
  m.impl("prompt_attention", &prompt_attention_cpu);
  m.impl("prompt_attention_backward", &prompt_attention_backward);
}

}  // namespace clip_guard
