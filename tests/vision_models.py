"""Vision-language model folders built locally (nothing downloaded): a family's real
architecture at reduced sizes with random weights (transformers builds it from a config and
saves it, as a hub folder holds it), a tiny byte-level BPE with the family's special tokens,
the family's real chat template (tests/chat_templates/, verbatim from the model repositories)
and its processor's files, so mlx-vlm and transformers both load the folder as they would the
real checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from chat_fixtures import TEMPLATES, base_tokenizer

# family: the transformers config (reduced), the tokenizer's special tokens, bos / eos / pad,
# the chat template file and the image token
FAMILIES = {
    # HuggingFaceTB/SmolVLM-256M-Instruct's shape (SigLIP tower, pixel-shuffle connector,
    # SmolLM2 decoder), reduced
    "smolvlm": dict(
        template="smolvlm.jinja", bos="<|im_start|>", eos="<end_of_utterance>",
        pad="<|im_end|>", image_token="<image>",
        tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>",
                "<fake_token_around_image>", "<image>", "<global-img>",
                *[f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]],
    ),
    # Qwen/Qwen2.5-VL-3B-Instruct's shape, reduced
    "qwen2_5_vl": dict(
        template="qwen2_5_vl.jinja", bos=None, eos="<|im_end|>", pad="<|endoftext|>",
        image_token="<|image_pad|>",
        tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    ),
    # google/gemma-3-4b-it's shape, reduced
    "gemma3": dict(
        template="gemma3.jinja", bos="<bos>", eos="<eos>", pad="<pad>",
        image_token="<image_soft_token>",
        tokens=["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>",
                "<start_of_image>", "<end_of_image>", "<image_soft_token>"],
    ),
    # llava-hf/llava-1.5-7b-hf's shape (CLIP tower, two-layer GELU projector, Llama decoder),
    # reduced; its text settings with a rope base other than transformers' default, as
    # transformers 5 writes them (rope_parameters); its chat template's layout (USER: /
    # ASSISTANT:, a turn's images first), written here, not fetched
    "llava": dict(
        template="llava.jinja", bos="<s>", eos="</s>", pad="<pad>", image_token="<image>",
        tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
    ),
    # google/paligemma-3b-pt-224's shape (SigLIP tower, linear projector, Gemma decoder),
    # reduced; no chat template (its processor lays out a prefix)
    "paligemma": dict(
        template=None, bos="<bos>", eos="<eos>", pad="<pad>", image_token="<image>",
        tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<image>"],
    ),
}


def _tokenizer(family: str, folder: Path):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    tok = Tokenizer.from_str(base_tokenizer().to_str())
    tok.add_special_tokens(spec["tokens"])
    template = (TEMPLATES / spec["template"]).read_text(encoding="utf-8") \
        if spec["template"] else None
    specials = {"eos_token": spec["eos"], "pad_token": spec["pad"]}
    if spec["bos"]:
        specials["bos_token"] = spec["bos"]
    extra = {}
    if family == "smolvlm":
        extra = {"extra_special_tokens": {"image_token": "<image>",
                                          "fake_image_token": "<fake_token_around_image>",
                                          "global_image_token": "<global-img>",
                                          "end_of_utterance_token": "<end_of_utterance>"}}
    if family == "gemma3":
        extra = {"extra_special_tokens": {"image_token": "<image_soft_token>",
                                          "boi_token": "<start_of_image>",
                                          "eoi_token": "<end_of_image>"}}
    if family in ("llava", "paligemma"):
        extra = {"extra_special_tokens": {"image_token": "<image>"}}
        specials["unk_token"] = "<unk>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template,
                                   **specials, **extra)
    fast.save_pretrained(folder)
    return fast, tok


def _config(family: str, tok) -> object:
    import transformers as tf

    vocab = tok.get_vocab_size()
    ids = {t: tok.token_to_id(t) for t in FAMILIES[family]["tokens"]}
    eos, pad = ids[FAMILIES[family]["eos"]], ids[FAMILIES[family]["pad"]]
    text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                eos_token_id=eos, pad_token_id=pad)
    if family == "smolvlm":
        return tf.SmolVLMConfig(
            text_config={**text, "model_type": "llama", "rope_theta": 100000.0,
                         "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "head_dim": 16},
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, patch_size=16, image_size=64),
            scale_factor=2, image_token_id=ids["<image>"], tie_word_embeddings=False,
            eos_token_id=eos, pad_token_id=pad)
    if family == "qwen2_5_vl":
        return tf.Qwen2_5_VLConfig(
            text_config={**text, "model_type": "qwen2_5_vl_text", "head_dim": 16,
                         "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                             "mrope_section": [2, 3, 3]},
                         "tie_word_embeddings": True},
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                               out_hidden_size=64, patch_size=14, spatial_merge_size=2,
                               temporal_patch_size=2, window_size=56,
                               fullatt_block_indexes=[1]),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True,
            eos_token_id=eos, pad_token_id=pad)
    if family == "llava":
        return tf.LlavaConfig(
            text_config={**text, "model_type": "llama", "rms_norm_eps": 1e-5,
                         "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
                         "bos_token_id": ids["<s>"]},
            vision_config=dict(model_type="clip_vision_model", hidden_size=32,
                               intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=2, patch_size=16, image_size=64,
                               projection_dim=32),
            image_token_index=ids["<image>"], image_seq_length=16, vision_feature_layer=-2,
            vision_feature_select_strategy="default", projector_hidden_act="gelu",
            pad_token_id=pad)
    if family == "paligemma":
        return tf.PaliGemmaConfig(
            text_config={**text, "model_type": "gemma", "head_dim": 16,
                         "bos_token_id": ids["<bos>"]},
            vision_config=dict(model_type="siglip_vision_model", hidden_size=32,
                               intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, patch_size=16, image_size=64,
                               projection_dim=64, vision_use_head=False),
            projection_dim=64, hidden_size=64, image_token_index=ids["<image>"],
            pad_token_id=pad)
    return tf.Gemma3Config(
        text_config={**text, "model_type": "gemma3_text", "head_dim": 16,
                     "sliding_window": 64, "query_pre_attn_scalar": 16,
                     "layer_types": ["sliding_attention", "full_attention"]},
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, patch_size=16, image_size=64,
                           vision_use_head=False),
        mm_tokens_per_image=4, image_token_index=ids["<image_soft_token>"],
        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        eos_token_id=[eos, ids["<end_of_turn>"]], pad_token_id=pad)


def _processor_files(family: str, folder: Path) -> None:
    """The processor's own files as the real checkpoints hold them (preprocessor_config.json,
    processor_config.json) at the reduced image size."""
    if family == "smolvlm":
        pre = {"image_processor_type": "SmolVLMImageProcessor", "processor_class":
               "SmolVLMProcessor", "do_resize": True, "size": {"longest_edge": 64},
               "max_image_size": {"longest_edge": 64}, "do_image_splitting": False,
               "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
               "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_pad": True,
               "resample": 1, "do_convert_rgb": True}
        proc = {"processor_class": "SmolVLMProcessor", "image_seq_len": 4}
    elif family == "qwen2_5_vl":
        pre = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class":
               "Qwen2_5_VLProcessor", "min_pixels": 56 * 56, "max_pixels": 56 * 56 * 4,
               "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
               "image_mean": [0.48145466, 0.4578275, 0.40821073],
               "image_std": [0.26862954, 0.26130258, 0.27577711], "do_rescale": True,
               "rescale_factor": 1 / 255, "do_normalize": True, "do_resize": True,
               "do_convert_rgb": True, "resample": 3}
        proc = {"processor_class": "Qwen2_5_VLProcessor"}
    elif family == "llava":
        pre = {"image_processor_type": "CLIPImageProcessor", "processor_class":
               "LlavaProcessor", "do_resize": True, "size": {"shortest_edge": 64},
               "do_center_crop": True, "crop_size": {"height": 64, "width": 64},
               "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
               "image_mean": [0.48145466, 0.4578275, 0.40821073],
               "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True,
               "resample": 3}
        proc = {"processor_class": "LlavaProcessor", "patch_size": 16,
                "vision_feature_select_strategy": "default", "image_token": "<image>",
                "num_additional_image_tokens": 1}
    elif family == "paligemma":
        pre = {"image_processor_type": "SiglipImageProcessor", "processor_class":
               "PaliGemmaProcessor", "do_resize": True, "size": {"height": 64, "width": 64},
               "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
               "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
               "image_seq_length": 16, "resample": 3}
        proc = {"processor_class": "PaliGemmaProcessor", "image_seq_length": 16}
    else:
        pre = {"image_processor_type": "Gemma3ImageProcessor", "processor_class":
               "Gemma3Processor", "size": {"height": 64, "width": 64}, "do_resize": True,
               "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
               "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
               "do_convert_rgb": True, "resample": 2, "do_pan_and_scan": False}
        proc = {"processor_class": "Gemma3Processor", "image_seq_length": 4}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=1))
    (folder / "processor_config.json").write_text(json.dumps(proc, indent=1))


def _hub_layout(family: str, path: Path) -> None:
    """config.json as the hub checkpoints spell it (transformers 5 saves another layout that
    mlx-vlm 0.7 does not read): Qwen2.5-VL's text settings at the top with an `mrope`
    rope_scaling; Gemma 3's image token count in its text settings too."""
    config = json.loads(path.read_text())
    if family == "qwen2_5_vl":
        text = config.pop("text_config")
        rope = text.pop("rope_parameters")
        text.update(rope_theta=rope["rope_theta"], rope_scaling={
            "type": "mrope", "rope_type": "default", "mrope_section": rope["mrope_section"]})
        text.pop("model_type")
        config = {**text, **config}
        config["vision_config"]["model_type"] = "qwen2_5_vl"
    if family == "smolvlm":  # the hub's rope base, where mlx-vlm reads it
        config["text_config"]["rope_theta"] = config["text_config"]["rope_parameters"][
            "rope_theta"]
    if family in ("llava", "paligemma"):  # the hub's CLIP / SigLIP tower: vision_model inside
        _rename_tower(path.parent / "model.safetensors")
    if family == "gemma3":
        text = config["text_config"]
        text["mm_tokens_per_image"] = config["mm_tokens_per_image"]
        # the hub's spelling of which layers slide (every 2nd here; the real 4B: every 6th)
        text["sliding_window_pattern"] = text["layer_types"].index("full_attention") + 1
        # the hub's SigLIP tower sits under vision_tower.vision_model
        _rename_tower(path.parent / "model.safetensors")
    path.write_text(json.dumps(config, indent=1))


def _rename_tower(weights: Path) -> None:
    """The vision tower's weights under `vision_tower.vision_model.`, as the hub holds them."""
    from safetensors.numpy import load_file, save_file

    tensors = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v
               for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})


def tiny_vlm(family: str, folder: Path, seed: int = 0) -> Path:
    """A `family` VLM folder at reduced sizes, random weights (float32), loadable by mlx-vlm
    and by transformers' image-text-to-text class."""
    import torch
    import transformers as tf

    folder.mkdir(parents=True, exist_ok=True)
    _, tok = _tokenizer(family, folder)
    config = _config(family, tok)
    torch.manual_seed(seed)
    model = tf.AutoModelForImageTextToText.from_config(config).float().eval()
    with torch.no_grad():  # transformers starts some projections at zero (Gemma 3's image
        for weight in model.parameters():  # projection): random, so every path counts
            if weight.dim() >= 2 and not weight.any():
                weight.normal_(0.0, 0.02)
    model.save_pretrained(folder)
    _hub_layout(family, folder / "config.json")
    _processor_files(family, folder)
    return folder


def picture(seed: int, size: int = 64) -> Image.Image:
    """A random RGB picture."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8), "RGB")
