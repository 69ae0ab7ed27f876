"""Quantized weights: post-training quantization of a classifier's Linear layers (quantize.py),
and training on a 4- or 8-bit base at the float GEMM's speed on the CPU: quantized linear and
embedding layers over one fused product (quantized_cpu.py, quantized_product.py) and mlx-lm's
DoRA on such a base (quantized_dora.py). The layers keep MLX's packed format, so what is saved
and exported is MLX's own."""
