"""mlx-lm's decoder modules through mlxlab's fused CPU kernels (mlxlab.kernels), where they apply.

On MLX's CPU backend mlx-lm's attention (mx.fast.scaled_dot_product_attention with
mask="causal": MLX's scalar, single-threaded softmax), its SwiGLU (silu(gate) * up) and
nn.RMSNorm (mx.fast.rms_norm, composed single-threaded ops) and nn.RoPE cost the Llama LoRA step ~1.6x what
mlxlab's own Transformer pays with the fused kernels (docs/benchmarks.md). Here the
loaded model is routed through the same kernels:

- the model's module-level `scaled_dot_product_attention` and `swiglu` (the names mlx-lm's
  llama, qwen2/3, mistral, ... import from models/base.py and models/activations.py; also
  `precise_swiglu`, the gated norm of Qwen3-Next, Qwen3.5 and OLMo-Hybrid, where it is float32
  throughout) become
  wrappers that call kernels.attention ("causal" passed on: the blocked kernel's flag from
  kernels.ops.BLOCKED_MIN_KEYS keys on, an additive mask below) / kernels.swiglu when
  `kernels.dispatch.fused` takes the call (CPU, float32, kernels on, op not skipped) and there is
  no KV cache, and mlx-lm's own function otherwise: generation, Metal, CUDA, other dtypes and
  fused_kernels=off run exactly mlx-lm's code;
- each exact nn.RMSNorm becomes models.layers.blocks.RMSNorm (the same weight and eps over
  kernels.rms_norm, which is mx.fast.rms_norm wherever the kernel does not apply), each exact
  nn.RoPE (not `traditional`) the RoPE below (kernels.rope, else mx.fast.rope), each exact
  depthwise nn.Conv1d (a hybrid's short convolution: Qwen3.5's and Qwen3-Next's gated-delta
  conv1d, Kimi-Linear's and OLMo-Hybrid's q/k/v convolutions, the Mamba-2, Nemotron-H, Falcon-H1
  and Granite-4 mixers', LFM2's) the DepthwiseConv1d below (kernels.depthwise_conv1d, else
  nn.Conv1d's own call). Its weight and bias stay the same parameters under the same names, so
  checkpoints, adapters, sanitize and the exporters see the tree they saw;
- the SiLU mlx-lm applies after that convolution, `nn.silu(self.conv1d(x))` (and any other
  `nn.silu` call of the same module: OLMo-Hybrid's MLP), goes to kernels.silu: each mlx-lm module
  whose code calls a routed convolution (that of the class holding it, and of its mlx-lm bases)
  gets, under its global name `nn`, ROUTED_NN: mlx.nn attribute for attribute but for `silu`, a
  wrapper like the two above (kernels.silu where `fused` takes the call, mlx.nn.silu otherwise;
  kernels.silu's values are nn.silu's to the bit, so generation on the CPU in float32 computes
  what mlx-lm's code computes). Why the module's `nn`: mlx-lm looks `silu` up through it at each
  call, and it is the one name those calls read; replacing mlx.nn.silu itself would reroute
  every caller in the process (MLX's own layers, mlxlab's fallbacks), and subclasses would copy
  mlx-lm's mixers' __call__ bodies. Where the SiLU's input is the output of the routed
  convolution that ran last, the wrapper computes both at once instead (kernels.depthwise_conv1d
  with silu=True, the same values to the bit: one pass each way, and the backward keeps the
  convolution's input, not its output; the convolution's own result is then never evaluated);

- the gated-delta layers' norms (Qwen3-Next, Qwen3.5, OLMo-Hybrid): `normalize_qk` (q and k
  l2-normalized as mx.fast.rms_norm with no weight, which MLX's CPU runs as composed
  single-threaded ops) becomes a wrapper over kernels.rms_norm with a weight of ones, and the
  gated norm's class (Qwen3NextRMSNormGated, OLMo-Hybrid's RMSNormGated) a subclass whose norm is
  kernels.rms_norm (GatedRMSNorm below);
- a latent attention (Kimi-Linear's KimiMLAAttention, DeepSeek-V3's), which applies its mask
  with mx.where, gets a packed pass's rows mask as the boolean it reads (LatentAttention below;
  no kernel: the rows kept apart);
- Gemma 3's own norms, GELU-gated MLP and attention become subclasses of mlx-lm's classes
  (use_fused_gemma, at the end of this file).

The fused results equal mlx-lm's to float32 rounding (tests/test_mlx_lm_fused.py,
tests/test_kernels_silu.py). The wrappers replace names in mlx-lm's module (process-wide, as
importing a model module is; ORIGINALS records what each wraps, and a name already replaced is
not wrapped again); they call through to the function they replaced whenever the fused path does
not apply, so another mlx-lm model of that type in the process computes what it did.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from types import ModuleType

import mlx.core as mx
import mlx.nn as nn

from mlxlab import kernels
from mlxlab.kernels.dispatch import fused
from mlxlab.models.decoders.packing import count_packed_mask, packed_mask
from mlxlab.models.layers import packed_rows
from mlxlab.models.layers.blocks import RMSNorm

# wrapper -> the mlx-lm function it wraps: a second model of the type never wraps it again
ORIGINALS: dict[Callable, Callable] = {}


def fused_attention(original: Callable) -> Callable:
    """mlx-lm's `scaled_dot_product_attention(q, k, v, cache, scale, mask, sinks=None)` through
    kernels.attention where the fused path takes it: no cache, no sinks, mask None, "causal", an
    additive / boolean (T_q, T_kv) array or an additive (B, 1, T_q, T_kv) one (a packed batch's,
    counted by models/decoders/packing.py on every device)."""

    def attention(queries: mx.array, keys: mx.array, values: mx.array, cache: object,
                  scale: float, mask: mx.array | str | None, sinks: mx.array | None = None
                  ) -> mx.array:
        count_packed_mask(mask)  # a packed batch's rows kept apart (models/decoders/packing.py)
        plain = (mask is None or (isinstance(mask, str) and mask == "causal")
                 or (isinstance(mask, mx.array) and (mask.ndim == 2 or (
                     mask.ndim == 4 and mask.shape[1] == 1 and mask.dtype != mx.bool_))))
        if (cache is not None or sinks is not None or not plain
                or values.shape[-1] != queries.shape[-1]  # (MLA's narrower values: SDPA)
                or fused("attention", queries, keys, values) is None):
            return original(queries, keys, values, cache=cache, scale=scale, mask=mask,
                            sinks=sinks)
        # "causal" as given: kernels.attention decides the blocked kernel's flag or the
        # additive array (the whole-scores path, MLX's bits) once, by itself
        return kernels.attention(queries, keys, values, scale, mask)

    ORIGINALS[attention] = original
    return attention


def segment_masks(original: Callable) -> Callable:
    """mlx-lm's `create_attention_mask(h, cache, ...)`, combined with a packed batch's segment
    mask inside a packed forward pass (models/decoders/packing.py packed_mask) in the dtype of the
    hidden states it is given (`h`, the first argument); mlx-lm's own otherwise."""

    def create_attention_mask(*args, **kwargs):
        h = args[0] if args else kwargs.get("h")
        return packed_mask(original(*args, **kwargs),
                           h.dtype if isinstance(h, mx.array) else None)

    ORIGINALS[create_attention_mask] = original
    return create_attention_mask


def fused_swiglu(original: Callable) -> Callable:
    """mlx-lm's `swiglu(gate, x)` (silu(gate) * x) through kernels.swiglu where it applies."""

    def swiglu(gate: mx.array, x: mx.array) -> mx.array:
        if gate.shape != x.shape or fused("swiglu", gate, x) is None:
            return original(gate, x)
        return kernels.swiglu(gate, x)

    ORIGINALS[swiglu] = original
    return swiglu


def fused_precise_swiglu(original: Callable) -> Callable:
    """mlx-lm's `precise_swiglu(h, gate, x)` (silu(gate) * x in float32, cast to h's dtype: the
    gated norms of Qwen3-Next, Qwen3.5 and OLMo-Hybrid) through kernels.swiglu where all three
    are float32 already, so the casts change nothing."""

    def precise_swiglu(h: mx.array, gate: mx.array, x: mx.array) -> mx.array:
        if h.dtype != mx.float32 or gate.shape != x.shape or fused("swiglu", gate, x) is None:
            return original(h, gate, x)
        return kernels.swiglu(gate, x)

    ORIGINALS[precise_swiglu] = original
    return precise_swiglu


def fused_normalize_qk(original: Callable) -> Callable:
    """mlx-lm's `normalize_qk(q, k, inv_scale=, eps=)` (q and k each over mx.fast.rms_norm with no
    weight, q scaled by inv_scale^2 and k by inv_scale) with both norms through kernels.rms_norm
    and a weight of ones (x * 1 is x: the same values) where the fused path takes them."""

    def normalize_qk(q: mx.array, k: mx.array, *, inv_scale: float, eps: float
                     ) -> tuple[mx.array, mx.array]:
        if fused("rms_norm", q, k) is None:
            return original(q, k, inv_scale=inv_scale, eps=eps)
        ones = mx.ones((q.shape[-1],), dtype=q.dtype)
        rms_eps = eps * inv_scale**2  # mlx-lm's: its eps is added to sum(x^2), rms_norm's to the mean
        return (inv_scale**2 * kernels.rms_norm(q, ones, rms_eps),
                inv_scale * kernels.rms_norm(k, ones, rms_eps))

    ORIGINALS[normalize_qk] = original
    return normalize_qk


class GatedRMSNorm:
    """mlx-lm's gated RMS norm (Qwen3-Next's and Qwen3.5's Qwen3NextRMSNormGated, OLMo-Hybrid's
    RMSNormGated): rms_norm(x, weight, eps), through kernels.rms_norm where the fused path takes
    it, then gated by the module's `precise_swiglu` (the routed one above) as mlx-lm gates it."""

    def __call__(self, x: mx.array, gate: mx.array | None = None) -> mx.array:
        if fused("rms_norm", x) is None:
            return super().__call__(x, gate)
        normed = kernels.rms_norm(x, self.weight, self.eps)
        if gate is None:
            return normed
        return sys.modules[type(self).__module__].precise_swiglu(x, gate, normed)


class LatentAttention:
    """mlx-lm's latent attention (Kimi-Linear's KimiMLAAttention, DeepSeek-V3's): it applies its
    mask with mx.where (True: may attend) to the rotary scores it then hands SDPA as the mask,
    so a packed pass's rows mask (additive: models/decoders/packing.py) reaches it as that
    boolean, counted as this layer's."""

    def __call__(self, x: mx.array, mask: mx.array | None = None, cache: object = None
                 ) -> mx.array:
        if count_packed_mask(mask):
            mask = mask == 0
        return super().__call__(x, mask, cache)


# (mlx-lm module, class name) -> the mixin whose __call__ replaces the class's
MIXINS = {("mlx_lm.models.qwen3_next", "Qwen3NextRMSNormGated"): GatedRMSNorm,
          ("mlx_lm.models.olmo_hybrid", "RMSNormGated"): GatedRMSNorm,
          ("mlx_lm.models.kimi_linear", "KimiMLAAttention"): LatentAttention,
          ("mlx_lm.models.deepseek_v3", "DeepseekV3Attention"): LatentAttention}


class RoPE(nn.RoPE):
    """nn.RoPE (the same dims, base and scale) over kernels.rope where it applies: mlx-lm rotates
    the heads after transposing them to (B, H, T, D); the fused kernel reads them back in the
    projection's (B, T, H, D) layout and writes the rotated heads transposed in one pass, the
    copy the transpose would cost included. Else (an array offset, a partial rotation, another
    dtype or device) mx.fast.rope as nn.RoPE."""

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        if (not isinstance(offset, int) or x.ndim != 4 or self.dims != x.shape[-1]
                or fused("rope", x) is None):
            return super().__call__(x, offset)
        return kernels.rope(x.transpose(0, 2, 1, 3), self.dims, self.base, self.scale, offset)


class DepthwiseConv1d(nn.Conv1d):
    """nn.Conv1d (the same weight, bias, stride, padding, dilation and groups) over
    kernels.depthwise_conv1d while it is depthwise and causal as the hybrids' short convolutions
    are (groups == channels in == channels out, stride 1, no padding, no dilation: mlx-lm pads
    the input itself) and the fused path takes the call; else (another dtype or device, kernels
    off, a conv made grouped otherwise after loading) nn.Conv1d's own call."""

    # the last fused call's output, input and module (weak references): fused_silu reads and
    # clears it
    last: tuple | None = None

    @staticmethod
    def takes(conv: nn.Conv1d) -> bool:
        """Whether `conv` is depthwise and causal: weight (C, K, 1) over groups=C, stride 1,
        padding 0, dilation 1 (a tensor-parallel shard of one, C / N of each, is too)."""
        w = conv.weight
        return (w.ndim == 3 and w.shape[2] == 1 and conv.groups == w.shape[0]
                and conv.stride == 1 and conv.padding == 0 and conv.dilation == 1)

    def __call__(self, x: mx.array) -> mx.array:
        bias = self.get("bias")
        arrays = (x, self.weight) if bias is None else (x, self.weight, bias)
        takes = self.takes(self)
        # a packed pass: no output reads a token of the example before its own (packed_rows.py),
        # through kernels.depthwise_conv1d on every device (MLX's ops where the kernel is off)
        rows = packed_rows.positions_for(x.shape[1] - self.weight.shape[1] + 1) if takes else None
        if rows is None and (not takes or fused("depthwise_conv1d", *arrays) is None):
            return super().__call__(x)
        if rows is not None:
            packed_rows.convolution_kept()
        y = kernels.depthwise_conv1d(x, self.weight, bias, **({} if rows is None else
                                                              {"positions": rows}))
        # for the SiLU that may follow; weak: a convolution no SiLU follows holds nothing
        DepthwiseConv1d.last = (weakref.ref(y), weakref.ref(x), weakref.ref(self), rows)
        return y


def fused_silu(original: Callable) -> Callable:
    """mlx.nn's `silu(x)` through kernels.silu where the fused path takes the call."""

    def silu(x: mx.array) -> mx.array:
        if fused("silu", x) is None:
            return original(x)
        last, DepthwiseConv1d.last = DepthwiseConv1d.last, None
        y, conv_input, conv = (ref() for ref in last[:3]) if last is not None else (None,) * 3
        if y is x and conv_input is not None and conv is not None:  # silu(conv(...)): one pass
            rows = {} if last[3] is None else {"positions": last[3]}
            return kernels.depthwise_conv1d(conv_input, conv.weight, conv.get("bias"), silu=True,
                                            **rows)
        return kernels.silu(x)

    ORIGINALS[silu] = original
    return silu


class SiluRoutedNN(ModuleType):
    """mlx.nn as a hybrid's mlx-lm module sees it under its global name `nn`: every attribute is
    mlx.nn's (looked up on each use), except `silu`, fused_silu(mlx.nn.silu). One instance,
    ROUTED_NN, serves every module; a module whose `nn` is it is routed."""

    def __init__(self) -> None:
        super().__init__(nn.__name__, nn.__doc__)
        self.silu = fused_silu(nn.silu)

    def __getattr__(self, name: str) -> object:  # (called for what the instance does not hold)
        return getattr(nn, name)

    def __repr__(self) -> str:
        return "<module 'mlx.nn' with silu through mlxlab.kernels (models/decoders/mlx_lm_fused.py)>"


ROUTED_NN = SiluRoutedNN()


def use_fused_silu(lm: nn.Module) -> int:
    """Give ROUTED_NN as `nn` to the mlx-lm modules whose code calls a routed depthwise
    convolution: those of the classes holding one (their mlx-lm bases' too, whose methods may
    make the call); returns how many modules of the model see it."""
    modules = dict(lm.named_modules())  # path -> module, the model itself at ""
    names = set()
    for path, m in modules.items():
        if isinstance(m, DepthwiseConv1d):
            while path and (path not in modules or modules[path] is m):  # up to its holder
                path = path.rpartition(".")[0]
            names.update(cls.__module__ for cls in type(modules[path]).__mro__)
    routed = 0
    for name in sorted(n for n in names if n.startswith("mlx_lm.models.")):
        globals_ = vars(sys.modules[name])
        if globals_.get("nn") is nn:  # mlx.nn itself, not a same-named other
            globals_["nn"] = ROUTED_NN
        routed += globals_.get("nn") is ROUTED_NN
    return routed


def _model_modules(lm: nn.Module) -> list[ModuleType]:
    """The mlx-lm Python modules that define the model's layers (llama.py, qwen3.py, ...)."""
    names = {type(m).__module__ for m in lm.modules()}
    return [sys.modules[n] for n in sorted(names) if n.startswith("mlx_lm.models.")]


def wrap_in_modules(lm: nn.Module, name: str, original: Callable,
                    wrap: Callable[[Callable], Callable], originals: dict) -> int:
    """Replace `name` in `lm`'s model modules that call mlx-lm's `original` by `wrap(original)`,
    a wrapper that records itself in `originals` (wrapper -> original), so a module already
    wrapped is not wrapped again; returns how many modules call the wrapper."""
    routed = 0
    for module in _model_modules(lm):
        names = vars(module)
        if names.get(name) is original:
            names[name] = wrap(original)
        if originals.get(names.get(name)) is original:
            routed += 1
    return routed


def use_fused_kernels(lm: nn.Module) -> int:
    """Route `lm` (an mlx-lm model) through the fused CPU kernels as the module docstring says;
    returns how many functions, norms, rotations, convolutions and modules' SiLUs now can take
    the fused path (0: nothing to route)."""
    from mlx_lm.models import activations, base, gated_delta

    routed = 0
    targets = {"scaled_dot_product_attention": (base.scaled_dot_product_attention, fused_attention),
               "create_attention_mask": (base.create_attention_mask, segment_masks),
               "swiglu": (activations.swiglu, fused_swiglu),
               "precise_swiglu": (activations.precise_swiglu, fused_precise_swiglu),
               "normalize_qk": (gated_delta.normalize_qk, fused_normalize_qk)}
    for module in _model_modules(lm):
        for name, (original, wrap) in targets.items():
            names = vars(module)
            if names.get(name) is original:  # mlx-lm's own function, not a same-named other
                names[name] = wrap(original)
            if ORIGINALS.get(names.get(name)) is original:
                routed += 1
    routed += use_fused_gemma(lm)  # before the RoPE swap below: Gemma's rotations are nn.RoPE
    for m in lm.modules():
        if type(m) is nn.RMSNorm:  # exact: Gemma's (1 + weight) subclass is left alone
            m.__class__ = RMSNorm
            routed += 1
        elif type(m) is nn.RoPE and not m.traditional:  # the fused kernel rotates halves
            m.__class__ = RoPE
            routed += 1
        elif type(m) is nn.Conv1d and DepthwiseConv1d.takes(m):
            m.__class__ = DepthwiseConv1d
            routed += 1
        elif isinstance(m, GatedRMSNorm | LatentAttention):  # routed before (a second routing)
            routed += 1
        elif (mixin := MIXINS.get((type(m).__module__, type(m).__name__))) is not None:
            m.__class__ = _subclass(mixin, type(m))
            routed += 1
    return routed + use_fused_silu(lm)  # after the convolutions: it finds them routed


# ---- Gemma 3 (mlx-lm's gemma3_text, and gemma3's text model) --------------------------------
# Gemma 3 has its own RMSNorm (weight stored as w - 1: rms_norm(x, 1 + w)), a GELU-gated MLP
# (gelu_approx(gate) * up) and q/k norms between the heads' transpose and the rotation; none of
# them is a name or class the routes above take. Each is swapped here for a subclass computing
# mlx-lm's math: the norms over kernels.rms_norm, the MLP's gate through kernels.gelu_gate,
# whose backward recomputes the GELU from gate and up (what autodiff of nn.gelu_approx keeps
# instead: its tanh and products, several (rows, intermediate) float32 arrays a layer; with the
# rest here, a gemma3_text float LoRA step peaked at 384 MiB, mlx_lm.lora's at 538),
# the attention with the q/k norms over the projection's (B, T, H, D) layout (a norm over D
# commutes with the transpose) so the fused RoPE reads its input without a copy.


def _gemma_route(op: str, x: mx.array) -> bool:
    """Whether a Gemma subclass takes its fused path for `x`: the rule every route here follows
    (CPU, float32, kernels on, `op` not skipped)."""
    return fused(op, x) is not None


def use_fused_gemma(lm: nn.Module) -> int:
    """Swap Gemma 3's norms, MLPs and attentions for the subclasses below; returns how many."""
    if not any(type(m).__module__ == "mlx_lm.models.gemma3_text" for m in lm.modules()):
        return 0
    routed = 0
    for m in lm.modules():
        mixin = GEMMA_MIXINS.get((type(m).__module__, type(m).__name__))
        if mixin is not None:
            if not isinstance(m, mixin):  # (a model routed twice keeps its one subclass)
                m.__class__ = _subclass(mixin, type(m))
            routed += 1
    return routed


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _subclass(mixin: type, original: type) -> type:
    """`original` (mlx-lm's class, its name and module) with `mixin`'s __call__: isinstance
    checks still see mlx-lm's class; built on first use (mlxlab does not import mlx-lm before
    it loads a model)."""
    key = (mixin, original)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(original.__name__, (mixin, original),
                                {"__module__": original.__module__})
    return _SUBCLASSES[key]


class GemmaRMSNorm:
    """mlx-lm's Gemma RMSNorm, rms_norm(x, 1 + weight, eps), through kernels.rms_norm (which is
    mx.fast.rms_norm where the kernel does not apply)."""

    def __call__(self, x: mx.array) -> mx.array:
        return kernels.rms_norm(x, 1.0 + self.weight, self.eps)


class GemmaMLP:
    """mlx-lm's Gemma MLP, down(gelu_approx(gate(x)) * up(x)), its activation through
    kernels.gelu_gate where the route applies."""

    def __call__(self, x: mx.array) -> mx.array:
        if not _gemma_route("gelu_gate", x):
            return super().__call__(x)
        return self.down_proj(kernels.gelu_gate(self.gate_proj(x), self.up_proj(x)))


class GemmaAttention:
    """mlx-lm's Gemma 3 attention with the q/k norms before the heads' transpose (the same
    values: the norm is over each head's D); with a KV cache, or off the route, mlx-lm's own."""

    def __call__(self, x: mx.array, mask: mx.array | str | None = None,
                 cache: object = None) -> mx.array:
        if cache is not None or not _gemma_route("rope", x):
            return super().__call__(x, mask, cache)
        B, L, _ = x.shape
        queries = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, -1))
        keys = self.k_norm(self.k_proj(x).reshape(B, L, self.n_kv_heads, -1))
        values = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        queries = self.rope(queries.transpose(0, 2, 1, 3))
        keys = self.rope(keys.transpose(0, 2, 1, 3))
        attention = sys.modules[type(self).__module__].scaled_dot_product_attention
        output = attention(queries, keys, values, cache=None, scale=self.scale, mask=mask)
        return self.o_proj(kernels.merge_heads(output))


# (mlx-lm module, class name) -> the mixin whose __call__ replaces the class's
GEMMA_MIXINS = {("mlx_lm.models.gemma3_text", "RMSNorm"): GemmaRMSNorm,
                ("mlx_lm.models.gemma3_text", "MLP"): GemmaMLP,
                ("mlx_lm.models.gemma3_text", "Attention"): GemmaAttention}
