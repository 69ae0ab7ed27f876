"""sentence-transformers models: a text embedder (embedder.py: an encoder from encoders/,
pooling.py, Dense layers, Normalize), read from its folder (sentence_folder.py), fine-tuned as a
run's model (embedder_model.py) and written back as one (sentence_folder_save.py), and the
cross-encoder reranker (cross_encoder.py: a (query, passage) pair in, a score out)."""
