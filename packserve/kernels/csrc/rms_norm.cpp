// RMSNorm as transformers' Llama-family models compute it, in one pass over each row
// (packserve/kernels/native.py builds it; kernels/norms.py swaps it in): the mean square in
// float32, x * rsqrt(mean + eps) rounded to the input's dtype, then times the weight, rounded
// again. torch runs that as eight operators (two dtype casts among them), each a pass over
// the hidden states; on a CPU step their per-call cost adds up (~37 us per norm at 64 rows).
// Rows are independent: each is computed on one thread in a fixed order, whatever the batch.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>

#include <cmath>

namespace packserve {

namespace {

template <typename T>
void normalize(const T* x, const T* weight, T* out, int64_t rows, int64_t hidden, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * hidden;
      float squares = 0.f;
      for (int64_t i = 0; i < hidden; ++i) squares += float(row[i]) * float(row[i]);
      const float scale = 1.f / std::sqrt(squares / float(hidden) + eps);
      T* o = out + r * hidden;
      for (int64_t i = 0; i < hidden; ++i) o[i] = T(float(weight[i]) * float(T(float(row[i]) * scale)));
    }
  });
}

}  // namespace

// x [..., hidden], weight [hidden] of x's dtype -> [..., hidden]
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(weight.dim() == 1 && x.size(-1) == weight.size(0));
  TORCH_CHECK(x.scalar_type() == weight.scalar_type());
  const auto input = x.contiguous();
  const auto w = weight.contiguous();
  auto out = at::empty_like(input);
  const int64_t hidden = w.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    normalize(input.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
              input.numel() / hidden, hidden, float(eps));
  });
  return out;
}

}  // namespace packserve
