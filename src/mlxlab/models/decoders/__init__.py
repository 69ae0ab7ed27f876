"""Language models that read left to right: the presets' own Transformer trained from scratch
(transformer.py), any pretrained decoder through mlx-lm's model code (mlx_lm_decoder.py, with
the architecture lookup it shares at models/mlx_lm_classes.py and its fused CPU kernels in
mlx_lm_fused.py), packed rows (packing.py), a draft cut from its target (draft_layers.py) and a
decoder speaking another vocabulary's ids (remapped.py). A new decoder family (a hybrid with
gated-delta layers from models/layers/) is a file here."""
