"""Encoders, and the classifiers on them: BERT with its pooled head (bert.py, its Hugging Face
names in bert_hf.py), the CNN hybrid over BERT features (cnn_hybrid.py), and the other stacks an
embedder's encoder seat holds: ModernBERT through mlx-embeddings (modernbert_encoder.py, its
config checked in modernbert_config.py) and a decoder's stack through mlx-lm
(decoder_encoder.py), with the sizes those share (config_sizes.py). What turns an encoder into
one vector per text is embedders/."""
