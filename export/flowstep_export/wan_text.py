"""Wan's text encoder (umT5-XXL's encoder) from a user's checkpoint, with DiffSynth-Studio's classes.

Accepts `models_t5_umt5-xxl-enc-bf16.pth` (Wan's release; keys `token_embedding.weight`,
`blocks.N.attn.q.weight`, ...) or the same tensors in a .safetensors file. The sizes (vocabulary,
width, heads, layers) are read from the weights, so a small random encoder loads the same way.
The tokenizer is the `google/umt5-xxl` folder shipped with Wan (any folder that
`transformers.AutoTokenizer` loads), used through DiffSynth's `HuggingfaceTokenizer` with its
`whitespace` cleaning, as `WanVideoPipeline` does.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .wan_vae import read_state_dict


def load_text_encoder(path: Path, dtype: torch.dtype):
    """DiffSynth's `WanTextEncoder` holding the weights of `path`, in eval mode."""
    from diffsynth.models.wan_video_text_encoder import WanTextEncoder

    state = read_state_dict(path)
    try:
        vocab, dim = state["token_embedding.weight"].shape
        dim_attn = state["blocks.0.attn.q.weight"].shape[0]
        dim_ffn = state["blocks.0.ffn.fc1.weight"].shape[0]
        num_buckets, num_heads = state["blocks.0.pos_embedding.embedding.weight"].shape
    except KeyError as e:
        raise ValueError(f"{path}: not a Wan umT5 text-encoder checkpoint (no tensor {e}; keys start {sorted(state)[:3]})") from None
    num_layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    with torch.device("meta"):
        model = WanTextEncoder(vocab=vocab, dim=dim, dim_attn=dim_attn, dim_ffn=dim_ffn, num_heads=num_heads,
                               num_layers=num_layers, num_buckets=num_buckets)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: does not match Wan's text encoder: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in state.items():
        if tuple(v.shape) != expected[k]:
            raise ValueError(f"{path}: tensor `{k}` has shape {list(v.shape)}; expected {list(expected[k])}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    return model.eval().requires_grad_(False)


def load_tokenizer(path: Path, text_len: int):
    """DiffSynth's `HuggingfaceTokenizer` over the tokenizer folder `path`, padded to `text_len`."""
    from diffsynth.models.wan_video_text_encoder import HuggingfaceTokenizer

    if not path.is_dir():
        raise ValueError(f"--tokenizer {path}: expected the tokenizer folder (Wan's google/umt5-xxl)")
    try:
        return HuggingfaceTokenizer(name=str(path), seq_len=text_len, clean="whitespace")
    except (OSError, ValueError) as e:
        raise ValueError(f"--tokenizer {path}: cannot load a tokenizer there ({' '.join(str(e).split())[:200]})") from None


@torch.no_grad()
def encode_prompt(tokenizer, encoder, prompt: str, device: str) -> torch.Tensor:
    """[text_len, dim] embeddings, zero after the prompt's tokens (as DiffSynth's pipeline)."""
    ids, mask = tokenizer(prompt, return_mask=True, add_special_tokens=True)
    ids, mask = ids.to(device), mask.to(device)
    emb = encoder(ids, mask)[0]
    emb[int(mask[0].gt(0).sum()):] = 0
    return emb
