"""QLoRA on the CPU backend (models/quantized/quantized_cpu.py, kernels/csrc/quantized.cpp): a
quantized layer's product through the float GEMM equals MLX's quantized layer (values, gradients in
x and through mlx-lm's LoRA and DoRA adapters, compiled or not) to rounding, the model keeps its
parameters, and a training step's MLX peak memory stays near the packed size, where dequantizing
the weights as ordinary MLX ops holds the float model."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlxlab import kernels
from mlxlab.models.quantized.quantized_cpu import (
    CpuQuantizedEmbedding,
    CpuQuantizedLinear,
    use_fast_cpu_quantized,
)
from mlxlab.runtime.compute import blas

RTOL = 2e-5  # float32 GEMMs summing in another order than MLX's quantized matmul


# Every test here needs the built kernels and leaves their mode as it found it (conftest.py).
pytestmark = pytest.mark.usefixtures("fused_kernels_on")


def close(a: mx.array, b: mx.array, rtol: float = RTOL) -> float:
    """max |a - b| relative to max |b|, asserted under rtol."""
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    err = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
    assert err < rtol, err
    return err


def quantized(in_dims: int, out_dims: int, bits: int, group_size: int = 64, bias: bool = False,
              seed: int = 0) -> nn.QuantizedLinear:
    mx.random.seed(seed)
    layer = nn.QuantizedLinear.from_linear(nn.Linear(in_dims, out_dims, bias=bias), group_size,
                                           bits)
    layer.freeze()
    mx.eval(layer.parameters())
    return layer


def switched_copy(layer: nn.Module) -> nn.Module:
    """A second layer of the same class and parameters, switched to the CPU path."""
    twin = quantized(*_dims(layer), layer.bits, layer.group_size, "bias" in layer)
    twin.update(layer.parameters())
    assert use_fast_cpu_quantized(twin) == 1 and type(twin) is CpuQuantizedLinear
    return twin


def _dims(layer: nn.QuantizedLinear) -> tuple[int, int]:
    return layer.weight.shape[1] * 32 // layer.bits, layer.weight.shape[0]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_dequantize_equals_mlx_to_the_bit(bits, group_size):
    w = mx.random.normal((96, 512), key=mx.random.key(bits)) * 0.05
    packed = mx.quantize(w, group_size=group_size, bits=bits)
    ours = kernels.dequantize(*packed, group_size, bits)
    kernels.set_mode("off")
    mlx = kernels.dequantize(*packed, group_size, bits)
    assert mx.array_equal(ours, mlx).item()


@pytest.mark.parametrize("bits, bias, rows", [(4, False, (3, 17)), (8, True, (2, 5)),
                                              (2, True, (1, 9))])
def test_layer_outputs_and_x_gradients_equal_mlx(bits, bias, rows):
    # 1100 output rows of 4096 inputs: many scratch blocks (1 MB, 64 rows), so the forward writes
    # column blocks and the backward sums over row blocks.
    ref = quantized(4096, 1100, bits, bias=bias)
    fast = switched_copy(ref)
    x = mx.random.normal((*rows, 4096), key=mx.random.key(1))
    g = mx.random.normal((*rows, 1100), key=mx.random.key(2))

    def grad_x(layer):
        return mx.grad(lambda x: (mx.tanh(layer(x)) * g).sum())

    close(fast(x), ref(x))
    want = grad_x(ref)(x)
    close(grad_x(fast)(x), want)
    close(mx.compile(grad_x(fast))(x), want)


def with_scales(layer: nn.QuantizedLinear, dtype: mx.Dtype) -> nn.QuantizedLinear:
    """`layer` with its scales and biases stored as `dtype` (mlx_lm.convert keeps the model's:
    bf16 for most checkpoints)."""
    layer.scales, layer.biases = layer.scales.astype(dtype), layer.biases.astype(dtype)
    mx.eval(layer.parameters())
    return layer


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_half_scales_are_read_as_stored_and_widened_exactly(dtype):
    """bf16 / fp16 scales and biases go to the kernel as stored (no float32 copy in the graph)
    and give, forward and backward, what the same values cast to float32 give, to the bit."""
    half = switched_copy(with_scales(quantized(1024, 300, 4), dtype))
    wide = switched_copy(with_scales(quantized(1024, 300, 4), dtype))
    wide.update({"scales": wide.scales.astype(mx.float32), "biases": wide.biases.astype(mx.float32)})
    x = mx.random.normal((3, 1024), key=mx.random.key(4))
    g = mx.random.normal((3, 300), key=mx.random.key(5))
    grads = [mx.grad(lambda x, layer=layer: (layer(x) * g).sum())(x) for layer in (half, wide)]
    assert mx.array_equal(half(x), wide(x)).item()
    assert mx.array_equal(*grads).item()
    w = half.weight
    assert mx.array_equal(kernels.dequantize(w, half.scales, half.biases, 64, 4),
                          kernels.dequantize(w, wide.scales, wide.biases, 64, 4)).item()


def test_bf16_activations_multiply_in_float32_and_come_back_bf16():
    ref = quantized(256, 64, 4)
    x = mx.random.normal((4, 256), key=mx.random.key(3)).astype(mx.bfloat16)
    out = switched_copy(ref)(x)
    assert out.dtype == mx.bfloat16
    close(out, ref(x.astype(mx.float32)), rtol=1e-2)


def adapter_grads(layer: nn.Module, x: mx.array, compiled: bool) -> dict:
    loss_and_grad = nn.value_and_grad(layer, lambda x: (mx.tanh(layer(x)) ** 2).sum())
    step = mx.compile(loss_and_grad) if compiled else loss_and_grad
    _, grads = step(x)
    return dict(tree_flatten(grads))


@pytest.mark.parametrize("wrapper", [LoRALinear, DoRALinear])
@pytest.mark.parametrize("switch_first", [True, False])
def test_adapter_gradients_through_mlx_lm_wrappers_equal(wrapper, switch_first):
    """mlx-lm's LoRA and DoRA wrappers hold the switched layer as `.linear` (switched before the
    wrapping) or get switched with it (DoRA on a quantized base computes its own product)."""
    x = mx.random.normal((2, 7, 512), key=mx.random.key(4))
    wrapped = []
    for fast in (False, True):
        base = quantized(512, 192, 4, bias=True)
        if fast and switch_first:
            use_fast_cpu_quantized(base)
        adapter = wrapper.from_base(base, r=8, scale=2.0)
        adapter.lora_b = mx.random.normal(adapter.lora_b.shape, key=mx.random.key(5)) * 0.1
        if fast and not switch_first:
            assert use_fast_cpu_quantized(adapter) == (2 if wrapper is DoRALinear else 1)
        wrapped.append(adapter)
    ref, fast = wrapped
    assert type(fast.linear) is CpuQuantizedLinear
    close(fast(x), ref(x))
    want = adapter_grads(ref, x, compiled=False)
    for compiled in (False, True):
        got = adapter_grads(fast, x, compiled)
        assert sorted(got) == sorted(want)
        for name in want:
            close(got[name], want[name])


def tiny_llama() -> llama.Model:
    args = llama.ModelArgs(model_type="llama", hidden_size=128, num_hidden_layers=2,
                           intermediate_size=256, num_attention_heads=4, rms_norm_eps=1e-5,
                           vocab_size=320, num_key_value_heads=2, tie_word_embeddings=True)
    mx.random.seed(0)
    model = llama.Model(args)
    nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    return model


def test_mlx_lm_model_keeps_its_parameters_and_trains_the_same_lora():
    ref, fast = tiny_llama(), tiny_llama()
    before = {k: (v.shape, v.dtype) for k, v in tree_flatten(fast.parameters())}
    # 2 layers x 7 projections, and the tied embedding (its as_linear is the output head)
    assert use_fast_cpu_quantized(fast) == 15
    assert use_fast_cpu_quantized(fast) == 0  # once switched, a layer is not counted again
    assert type(fast.model.embed_tokens) is CpuQuantizedEmbedding
    assert {k: (v.shape, v.dtype) for k, v in tree_flatten(fast.parameters())} == before
    tokens = mx.array([[1, 5, 9, 33, 200, 7, 3, 19]])
    close(fast(tokens), ref(tokens))
    grads = []
    for model in (ref, fast):
        model.freeze()
        mx.random.seed(1)  # the adapters' A drawn alike
        linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
        for _, module in model.named_modules():
            if isinstance(module, LoRALinear):
                module.lora_b = mx.ones(module.lora_b.shape) * 0.01

        def loss(tokens, model=model):
            return nn.losses.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).mean()

        step = mx.compile(nn.value_and_grad(model, loss))
        grads.append(dict(tree_flatten(step(tokens)[1])))
    assert sorted(grads[0]) == sorted(grads[1]) and len(grads[0]) == 2 * 7 * 2  # every projection: A and B
    for name, want in grads[0].items():
        close(grads[1][name], want, rtol=1e-4)


def test_kernels_off_or_odd_bits_take_mlx_own_product():
    """Where the fused path does not run, a switched layer is MLX's quantized layer, to the bit."""
    for bits, mode in ((4, "off"), (3, "on"), (6, "on")):
        kernels.set_mode(mode)
        ref = quantized(256, 48, bits)
        x = mx.random.normal((5, 256), key=mx.random.key(6))
        assert mx.array_equal(switched_copy(ref)(x), ref(x)).item()


class Dequantized(nn.QuantizedLinear):
    """The naive CPU QLoRA: dequantize with MLX's ops and multiply (autodiff keeps the float)."""

    def __call__(self, x):
        w = mx.dequantize(self.weight, self.scales, self.biases, self.group_size, self.bits)
        return x @ w.T


def step_peak_mb(kind: str, dims: int = 1024, depth: int = 8, group_size: int = 64,
                 scales: mx.Dtype = mx.float32) -> tuple[float, float]:
    """MLX peak memory (MB above the model) of a compiled LoRA training step on a stack of
    `depth` 4-bit dims x dims layers (scales and biases stored as `scales`), and the stack's
    float size in MB. kind: "fast" (the fused product), "naive" (MLX's dequantize + matmul) or
    "mlx" (MLX's own quantized matmul)."""
    layers = []
    for i in range(depth):
        base = with_scales(quantized(dims, dims, 4, group_size, seed=i), scales)
        if kind == "naive":
            base.__class__ = Dequantized
        layers.append(LoRALinear.from_base(base, r=8))
    model = nn.Sequential(*layers)
    if kind == "fast":
        assert use_fast_cpu_quantized(model) == depth
    x = mx.random.normal((32, dims), key=mx.random.key(7))
    mx.eval(model.parameters(), x)
    step = mx.compile(nn.value_and_grad(model, lambda x: (model(x) ** 2).mean()))
    mx.eval(step(x))
    mx.clear_cache()
    mx.reset_peak_memory()
    active = mx.get_active_memory()
    mx.eval(step(x))
    return (mx.get_peak_memory() - active) / 2**20, depth * dims * dims * 4 / 2**20


def test_training_step_peak_memory_stays_near_the_packed_size():
    fast, float_mb = step_peak_mb("fast")
    naive, _ = step_peak_mb("naive")
    # 32 MB of float weights, 4.5 MB packed: the fused path holds one scratch block (1 MB)
    # and activations; MLX's dequantize + matmul holds every layer's float weight at once.
    assert fast < 0.35 * float_mb, (fast, float_mb)
    assert naive > 0.9 * float_mb, (naive, float_mb)


SCRATCH_MB = 1.0  # kScratchBytes in kernels/csrc/quantized.cpp: the dequantized block of rows


@pytest.mark.parametrize("dims", [1024, 2048])
def test_one_scratch_block_is_alive_at_a_time(dims):
    """Beyond what MLX's own quantized matmul holds, the fused product's step holds its scratch
    block and nothing else: one block at a time (the forward's and the backward's products each
    take theirs and give it back), of at most SCRATCH_MB however wide the weight (here 4 and 16
    times the block). Two blocks alive at once, or a block sized by the weight, fail this; that
    margin is what keeps a 4-bit run's peak at mlx_lm.lora's (docs/benchmarks.md, "QLoRA")."""
    fast, float_mb = step_peak_mb("fast", dims, depth=4)
    own, _ = step_peak_mb("mlx", dims, depth=4)
    assert float_mb / 4 >= 4 * SCRATCH_MB  # each weight's float is at least 4 blocks
    assert fast - own <= SCRATCH_MB, (fast, own)


def test_bf16_scales_add_nothing_to_the_step_peak():
    """A bf16-scaled 4-bit stack (what most folders hold) peaks as the float32-scaled one does:
    were the scales cast to float32 in the graph, the product would hold those copies from the
    forward to the backward, 8 bytes a group of every layer (4 MB here)."""
    dims, depth, group = 2048, 4, 32
    copies_mb = depth * 2 * 4 * dims * dims / group / 2**20
    wide, _ = step_peak_mb("fast", dims, depth, group, mx.float32)
    half, _ = step_peak_mb("fast", dims, depth, group, mx.bfloat16)
    assert half <= wide + copies_mb / 4, (half, wide, copies_mb)


@pytest.mark.gpu
def test_switch_is_a_no_op_off_the_cpu():
    layer = quantized(256, 64, 4)
    assert use_fast_cpu_quantized(layer) == 0 and type(layer) is nn.QuantizedLinear


def test_the_fused_product_calls_the_gemm_mlx_matmul_calls():
    """The sgemm the fused product runs is read from libmlx's own slot: OpenBLAS (or MKL) once
    setup_blas rebound it (runtime/compute/blas.py), through the small-product wrapper where it
    is built (runtime/compute/small_gemm.py), so the float and the 4-bit models share one GEMM."""
    info = blas.setup_blas()
    if not info.fast:
        pytest.skip(f"MLX runs its reference BLAS here ({info.status})")
    assert blas._mapped_file(blas.mlx_gemm_target()) == info.library
