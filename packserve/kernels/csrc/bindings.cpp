// The Python module of packserve's C++ kernels (packserve/kernels/native.py builds it).
#include <ATen/core/Tensor.h>
// pybind11 with torch's Tensor casters: a fraction of torch/extension.h's compile time.
#include <torch/csrc/utils/pybind.h>

namespace packserve {
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                        const at::Tensor& tables, const at::Tensor& lengths, int64_t block_size,
                        double scale);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale);
at::Tensor row_argmax(const at::Tensor& x);
}  // namespace packserve

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("paged_decode", &packserve::paged_decode, "decode attention over a paged KV pool", no_gil);
  m.def("rms_norm", &packserve::rms_norm, "transformers' Llama RMSNorm in one pass", no_gil);
  m.def("int8_linear", &packserve::int8_linear, "(x @ q^T) * scale, q int8 per channel", no_gil);
  m.def("row_argmax", &packserve::row_argmax, "torch.argmax(x, dim=-1), float32 rows", no_gil);
}
