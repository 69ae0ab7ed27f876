"""Models that listen: speech recognition models as mlxlab models, beside vision/'s models that
read images. whisper.py is OpenAI's Whisper encoder-decoder in MLX under transformers' parameter
names (a transformers folder's weights load as they are; `--format hf` writes them back);
whisper_folder.py reads a Whisper folder, a transformers one, an mlx-whisper one (renamed on
load) or a CTranslate2 (faster-whisper) one (ctranslate2_folder.py reads its model.bin), and says
in one line what is wrong with a folder that is none of these."""
