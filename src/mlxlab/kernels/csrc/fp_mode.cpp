// Denormal floats on the thread that runs MLX's CPU ops: flush-to-zero (FTZ: a result below
// float32's smallest normal, 1.2e-38, becomes 0) and denormals-are-zero (DAZ: such an input
// reads as 0), the mode TensorFlow's CPU threads run in and torch.set_flush_denormal sets.
// Why: x86 cores take a microcode assist, ~100x the cost, for each FMA that reads or makes a
// denormal. A peaked attention (probabilities ~1e-30) times a small backward cotangent
// (~1e-6: a mean over thousands of tokens) makes them in the attention's backward, and the
// products that read them ran 5-80x slower (docs/benchmarks.md, LoRA). The mode is per thread:
// the primitive below sets it on the stream's thread (where MLX's CPU ops, OpenBLAS's calling
// thread and the kernels' first part run), and the kernels' pool copies the caller's mode to
// its workers (kernels.cpp), so a kernel computes the same on any thread count.
#include "common.h"
#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace mlxlab {

namespace detail {

#if defined(__x86_64__) || defined(_M_X64)
constexpr uint64_t kFlushBits = 0x8040; // MXCSR: FTZ (bit 15) and DAZ (bit 6)
uint64_t fp_state() {
  return _mm_getcsr();
}
void set_fp_state(uint64_t state) {
  _mm_setcsr(static_cast<unsigned int>(state));
}
#elif defined(__aarch64__)
constexpr uint64_t kFlushBits = uint64_t{1} << 24; // FPCR.FZ: inputs and results flushed
uint64_t fp_state() {
  uint64_t fpcr;
  asm volatile("mrs %0, fpcr" : "=r"(fpcr));
  return fpcr;
}
void set_fp_state(uint64_t state) {
  asm volatile("msr fpcr, %0" : : "r"(state));
}
#else
constexpr uint64_t kFlushBits = 0; // no known control: the mode stays as it is
uint64_t fp_state() {
  return 0;
}
void set_fp_state(uint64_t) {}
#endif

} // namespace detail

using namespace detail;

mx::array flush_denormals(bool on) {
  auto s = mx::to_stream(mx::Device::cpu);
  return mx::array({}, mx::float32, std::make_shared<FlushDenormals>(s, on), {});
}

void FlushDenormals::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream());
  set_arrays(encoder, inputs, outputs);
  // Dispatched: the work runs on the stream's thread, whose mode is the one that counts.
  encoder.dispatch([out = outputs[0].data<float>(), on = on_]() {
    uint64_t state = fp_state();
    *out = kFlushBits != 0 && (state & kFlushBits) == kFlushBits ? 1.0f : 0.0f;
    set_fp_state(on ? state | kFlushBits : state & ~kFlushBits);
  });
}

} // namespace mlxlab
