"""Wan's text encoder (umT5-XXL's encoder) from a user's checkpoint, with DiffSynth-Studio's classes.

Accepts `models_t5_umt5-xxl-enc-bf16.pth` (Wan's release; keys `token_embedding.weight`,
`blocks.N.attn.q.weight`, ...), the same tensors in a .safetensors file, or the encoder with
Hugging Face UMT5 names (`encoder.block.N.layer.0.SelfAttention.q.weight`, ComfyUI's
`umt5_xxl_fp16.safetensors`), renamed here; float8 files are refused. The sizes (vocabulary,
width, heads, layers) are read from the weights, so a small random encoder loads the same way.
The tokenizer is the `google/umt5-xxl` folder shipped with Wan (any folder that
`transformers.AutoTokenizer` loads), used through DiffSynth's `HuggingfaceTokenizer` with its
`whitespace` cleaning, as `WanVideoPipeline` does.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..files import require_regular_file
from .wan_vae import read_state_dict

TOKENIZER_FILE_LIMIT = 256 << 20  # umT5's tokenizer.json is 16 MiB


# Hugging Face UMT5 encoder names -> Wan's (the same modules: gated-GELU FFN, a relative
# position bias in every layer, RMS norms without bias).
HF_NAMES = [
    (r"^(?:shared|encoder\.embed_tokens)\.weight$", "token_embedding.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight$", r"blocks.\1.attn.\2.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight$", r"blocks.\1.pos_embedding.embedding.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight$", r"blocks.\1.norm1.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.weight$", r"blocks.\1.ffn.gate.0.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.weight$", r"blocks.\1.ffn.fc1.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.weight$", r"blocks.\1.ffn.fc2.weight"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight$", r"blocks.\1.norm2.weight"),
    (r"^encoder\.final_layer_norm\.weight$", "norm.weight"),
]


def from_hf_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames a Hugging Face UMT5 encoder state dict to Wan's; other keys are kept (and then
    reported as unexpected)."""
    out = {}
    for key, value in state.items():
        for pattern, replacement in HF_NAMES:
            if re.match(pattern, key):
                key = re.sub(pattern, replacement, key)
                break
        out[key] = value
    return out


def load_text_encoder(path: Path, dtype: torch.dtype, label: str | None = None):
    """DiffSynth's `WanTextEncoder` holding the weights of `path`, in eval mode."""
    from diffsynth.models.wan_video_text_encoder import WanTextEncoder

    state = read_state_dict(path, label)
    if any(v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for v in state.values()):
        raise ValueError(f"{path}: a float8 checkpoint; use the bf16/fp16 text encoder (Wan's models_t5_umt5-xxl-enc-bf16.pth)")
    if "encoder.final_layer_norm.weight" in state:
        state = from_hf_names(state)
    try:
        vocab, dim = state["token_embedding.weight"].shape
        dim_attn = state["blocks.0.attn.q.weight"].shape[0]
        dim_ffn = state["blocks.0.ffn.fc1.weight"].shape[0]
        num_buckets, num_heads = state["blocks.0.pos_embedding.embedding.weight"].shape
    except KeyError as e:
        raise ValueError(f"{path}: not a Wan umT5 text-encoder checkpoint (no tensor {e}; keys start {sorted(state)[:3]})") from None
    except (ValueError, IndexError):
        raise ValueError(f"{path}: not a Wan umT5 text-encoder checkpoint (token_embedding.weight has shape "
                         f"{list(state['token_embedding.weight'].shape)}, or another tensor has too few dims)") from None
    # The layer count sizes the model: only indices that hold tensors count.
    layers = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if layers != set(range(len(layers))):
        raise ValueError(f"{path}: text-encoder blocks are not numbered 0..{len(layers) - 1}")
    num_layers = len(layers)
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
    for entry in sorted(path.iterdir()):  # read by transformers: none may hang or be unbounded
        if not entry.is_dir():
            require_regular_file(entry, f"--tokenizer {entry}")
            if entry.stat().st_size > TOKENIZER_FILE_LIMIT:
                raise ValueError(f"--tokenizer {entry}: larger than {TOKENIZER_FILE_LIMIT >> 20} MiB; not a tokenizer file")
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
