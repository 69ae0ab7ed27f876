// Python module of the fused kernels; NB_DOMAIN mlx (CMakeLists.txt) shares mx.array's type.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>

#include "kernels.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_mlxlab_kernels, m) {
  m.doc() = "mlxlab fused CPU kernels (custom MLX primitives)";
  m.def(
      "cross_entropy",
      [](const mx::array& logits, const mx::array& targets) {
        return mlxlab::cross_entropy(logits, targets);
      },
      "logits"_a,
      "targets"_a,
      "Per-row softmax cross-entropy of (N, V) float32 logits against (N,) targets.");
  m.def(
      "swiglu",
      [](const mx::array& gate, const mx::array& up) { return mlxlab::swiglu(gate, up); },
      "gate"_a,
      "up"_a,
      "silu(gate) * up for float32 arrays of one shape.");
  m.def(
      "softmax",
      [](const mx::array& x, const std::optional<mx::array>& mask) {
        return mlxlab::softmax(x, mask);
      },
      "x"_a,
      "mask"_a = nb::none(),
      "softmax(x + mask) over the last axis; mask an additive (T_q, T_kv) array or None.");
  m.def("set_num_threads", &mlxlab::set_num_threads, "n"_a);
  m.def("num_threads", &mlxlab::num_threads);
}
