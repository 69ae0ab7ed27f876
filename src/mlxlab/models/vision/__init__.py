"""Models that read images with their text: any vision-language folder mlx-vlm loads, as an
mlxlab model (vision_language.py), fine-tuned with the decoders' adapters and quantization.
Other modalities stand beside it as rooms of their own (speech models such as Whisper: a
speech/ folder next to this one)."""
