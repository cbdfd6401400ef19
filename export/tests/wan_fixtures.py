"""Small random Wan encoders and decoders built with DiffSynth's own classes, a tokenizer built
locally with the `tokenizers` library, and short generated videos: everything the prepare and
VAE tests need, with no download."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

VAE_DIM = 8  # Wan2.1 uses 96; the decoder's widths are 4·dim at the latent side
TEXT_DIM, TEXT_LEN = 64, 16  # the tiny DiT's text_dim and text_len
WORDS = "a red ball rolls left right up down blue square the on over green sky night".split()


def save_random(model: torch.nn.Module, path: Path) -> None:
    """Draws every weight of `model` (DiffSynth zeroes the attention output projection at init,
    which would leave the attention block untested), scaled so activations stay O(1), and saves
    its state dict to `path` (.safetensors or torch)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=p[0].numel() ** -0.5)
            else:
                torch.nn.init.normal_(p, mean=1.0 if "gamma" in name else 0.0, std=0.1)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)


def write_vae(path: Path, seed: int = 0) -> None:
    """A random Wan2.1 VAE (DiffSynth's VideoVAE_ at width 8) saved with the original file's key
    names (`save_random`)."""
    from diffsynth.models.wan_video_vae import VideoVAE_

    torch.manual_seed(seed)
    model = VideoVAE_(dim=VAE_DIM, z_dim=16)
    save_random(model, path)


def reference_vae(path: Path):
    """DiffSynth's WanVideoVAE with the weights of `path`, built here (not by flowstep_export)."""
    from diffsynth.models.wan_video_vae import VideoVAE_, WanVideoVAE
    from safetensors.torch import load_file

    state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    vae = WanVideoVAE(z_dim=16)
    vae.model = VideoVAE_(dim=VAE_DIM, z_dim=16).eval().requires_grad_(False)
    vae.model.load_state_dict(state)
    return vae


def reference_vae22(path: Path):
    """DiffSynth's WanVideoVAE38 with the weights of `path` (encoder and decoder width
    `VAE_DIM`), built here, without initialising, as DiffSynth's own loader does."""
    from diffsynth.core.vram import skip_model_initialization
    from diffsynth.models.wan_video_vae import VideoVAE38_, WanVideoVAE38

    state = torch.load(path, weights_only=True)
    with skip_model_initialization():
        vae = WanVideoVAE38(z_dim=48, dim=VAE_DIM)
        vae.model = VideoVAE38_(dim=VAE_DIM, dec_dim=VAE_DIM, z_dim=48)
    vae.model.load_state_dict(state, assign=True)
    vae.model.eval().requires_grad_(False)
    return vae


def text_encoder_config(vocab: int) -> dict:
    return dict(vocab=vocab, dim=TEXT_DIM, dim_attn=TEXT_DIM, dim_ffn=128, num_heads=2, num_layers=2, num_buckets=32)


def write_text_encoder(path: Path, vocab: int, seed: int = 0) -> None:
    from diffsynth.models.wan_video_text_encoder import WanTextEncoder

    torch.manual_seed(seed)
    torch.save(WanTextEncoder(**text_encoder_config(vocab)).state_dict(), path)


def write_tokenizer(folder: Path) -> int:
    """A word-level tokenizer with T5's special ids (<pad> 0, </s> 1, <unk> 2) that appends </s>,
    saved as a folder transformers' AutoTokenizer loads. Returns the vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(folder))
    return len(vocab)


def write_video(path: Path, frames: int, height: int, width: int, fps: float = 8, codec: str = "libx264") -> None:
    """A square moving across a gradient, encoded by imageio's ffmpeg."""
    import imageio.v2 as iio

    y, x = np.mgrid[0:height, 0:width]
    writer = iio.get_writer(path, fps=fps, codec=codec, macro_block_size=1, output_params=["-loglevel", "error"])
    for f in range(frames):
        img = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 40 * f % 255)], -1).astype(np.uint8)
        img[height // 3:height // 3 + 8, 4 * f % width:4 * f % width + 8] = 255
        writer.append_data(img)
    writer.close()


def write_vae22(path: Path, seed: int = 0) -> None:
    """A random Wan2.2 VAE (DiffSynth's VideoVAE38_, 48 latent channels, encoder and decoder
    width 8) saved with the original file's key names (`save_random`)."""
    from diffsynth.models.wan_video_vae import VideoVAE38_

    torch.manual_seed(seed)
    model = VideoVAE38_(dim=VAE_DIM, dec_dim=VAE_DIM, z_dim=48)
    save_random(model, path)


CLIP_SIZES = dict(vision_layers=2, vision_mlp_ratio=0.5)  # ViT-H/14's width, 224 px and heads; 2 of its 32 blocks


def write_image_encoder(path: Path, seed: int = 0) -> None:
    """A random Wan2.1 CLIP image encoder at ViT-H/14's width (the DiT's img_emb takes 1280) with
    two blocks, saved as Wan's models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth is: the
    whole CLIP's keys (`visual.*`, `log_scale`, and here one stand-in `textual.*` tensor)."""
    from diffsynth.models.wan_video_image_encoder import clip_xlm_roberta_vit_h_14

    torch.manual_seed(seed)
    state = clip_xlm_roberta_vit_h_14(pretrained=False, **CLIP_SIZES).state_dict()
    state["textual.token_embedding.weight"] = torch.randn(8, 4)
    torch.save(state, path)


def reference_image_encoder(path: Path):
    """DiffSynth's WanImageEncoder with the weights of `path` through DiffSynth's own state-dict
    converter, built here (not by flowstep_export); its constructor takes no sizes, so its model
    is replaced by one of CLIP_SIZES as that constructor builds it."""
    from diffsynth.models.wan_video_image_encoder import WanImageEncoder, clip_xlm_roberta_vit_h_14
    from diffsynth.utils.state_dict_converters.wan_video_image_encoder import WanImageEncoderStateDictConverter

    encoder = WanImageEncoder.__new__(WanImageEncoder)
    torch.nn.Module.__init__(encoder)
    encoder.model, encoder.transforms = clip_xlm_roberta_vit_h_14(pretrained=False, return_transforms=True, **CLIP_SIZES)
    encoder.load_state_dict(WanImageEncoderStateDictConverter(torch.load(path, weights_only=True)))
    return encoder.eval().requires_grad_(False)
