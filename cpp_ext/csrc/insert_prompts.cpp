// clip_guard::insert_prompts on the CPU: the literal RVPT form, prompts right after the class token.
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include "checks.h"

namespace clip_guard {
namespace {

at::Tensor insert_prompts_cpu(const at::Tensor& tokens, const at::Tensor& prompts) {
  check_insert_prompts_inputs(tokens, prompts);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t batch = tokens.size(0), length = tokens.size(1), width = tokens.size(2);
  const int64_t count = prompts.size(0);
  at::Tensor out = at::empty({batch, length + count, width}, tokens.options());
  // Each copy writes straight into the output; the prompts are broadcast, not expanded first.
  out.narrow(1, 0, 1).copy_(tokens.narrow(1, 0, 1));
  out.narrow(1, 1, count).copy_(prompts.unsqueeze(0).expand({batch, count, width}));
  out.narrow(1, 1 + count, length - 1).copy_(tokens.narrow(1, 1, length - 1));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(clip_guard, CPU, m) {
  m.impl("insert_prompts", &insert_prompts_cpu);
}

}  // namespace clip_guard
