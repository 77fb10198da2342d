// The Python module of packserve's C++ kernels (packserve/kernels/native.py builds it).
#include <torch/extension.h>

namespace packserve {
torch::Tensor paged_decode(const torch::Tensor& q, const torch::Tensor& k_pool,
                           const torch::Tensor& v_pool, const torch::Tensor& tables,
                           const torch::Tensor& lengths, int64_t block_size, double scale);
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& q,
                          const torch::Tensor& scale);
}  // namespace packserve

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("paged_decode", &packserve::paged_decode, "decode attention over a paged KV pool", no_gil);
  m.def("rms_norm", &packserve::rms_norm, "transformers' Llama RMSNorm in one pass", no_gil);
  m.def("int8_linear", &packserve::int8_linear, "(x @ q^T) * scale, q int8 per channel", no_gil);
}
