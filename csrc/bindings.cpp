// Python bindings of the C-Poly LoRA kernels: cpoly_kernels._C.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpoly.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "CUDA kernels of cpoly_kernels (see csrc/cpoly.h). Device tensors are passed as addresses "
      "(tensor.data_ptr()), the stream as torch.cuda.current_stream().cuda_stream.";

  m.def("compiled_archs", &cpoly::compiled_archs, "Compute capabilities compiled in, e.g. [80, 90].");
  m.def("cuda_runtime_version", &cpoly::cuda_runtime_version, "CUDART_VERSION the module was built with.");
  m.def("device_status", &cpoly::device_status, py::arg("device"),
        "'' when CUDA device `device` can run the kernels (makes it current), else why not.");
  m.def("rank_chunk", &cpoly::rank_chunk, "Ranks per project_down block.");
  m.def("padded_rank", &cpoly::padded_rank, py::arg("r"),
        "Rank stride of project_down's w: r rounded up to a multiple of rank_chunk().");
  m.def(
      "launch_shape",
      [](const std::string& kernel, const std::string& dtype, int64_t N, int64_t d, int64_t r, int64_t b) {
        const cpoly::LaunchShape ls = cpoly::launch_shape(kernel, dtype, N, d, r, b);
        return py::make_tuple(ls.blocks, ls.threads);
      },
      py::arg("kernel"), py::arg("dtype"), py::arg("N"), py::arg("d"), py::arg("r"), py::arg("b"),
      "(blocks, threads) of a launch; blocks == 0 means nothing is launched.");
  m.def("project_down", &cpoly::project_down, py::arg("dtype"), py::arg("x"), py::arg("w"), py::arg("cu"),
        py::arg("y"), py::arg("N"), py::arg("d"), py::arg("r"), py::arg("b"), py::arg("alpha"), py::arg("device"),
        py::arg("stream"), "y[N, r] (float32) = alpha * x[n] @ w[segment(n)]; w is float32 [b, d, padded_rank(r)].");
  m.def("project_up", &cpoly::project_up, py::arg("dtype"), py::arg("v"), py::arg("w"), py::arg("cu"),
        py::arg("base"), py::arg("y"), py::arg("N"), py::arg("d"), py::arg("r"), py::arg("b"), py::arg("alpha"),
        py::arg("device"), py::arg("stream"),
        "y[N, d] = base[n] + alpha * v[n] @ w[segment(n)]; v float32 [N, r], w float32 [b, r, d], base 0 for none.");
  m.def("segment_outer", &cpoly::segment_outer, py::arg("dtype"), py::arg("x"), py::arg("v"), py::arg("cu"),
        py::arg("g"), py::arg("N"), py::arg("d"), py::arg("r"), py::arg("b"), py::arg("alpha"), py::arg("device"),
        py::arg("stream"),
        "g[b, d, r] (float32) = alpha * sum over segment s of x[n]^T v[n]; x [N, d], v float32 [N, r].");
}
