"""The Wan DiT (text-to-video, image-to-video, Wan2.2 TI2V), with DiffSynth-Studio's module
and state-dict names.

The computation equals DiffSynth's `model_fn_wan_video` + `WanModel` blocks in the
configuration of each variant (has_image_input, require_vae_embedding,
require_clip_embedding, seperated_timestep + fuse_vae_embedding_in_latents); the forward is
written so that its forward and backward trace to portable ONNX (docs/DESIGN.md §2):
Linear layers on 2-D inputs, the patch embedding as a reshape and matmul, RoPE in real
arithmetic with `unbind(-1)`, attention as explicit matmul/softmax, the sinusoidal time
embedding in float32, and the RoPE grid built inside the graph from the latent size.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from . import pointwise, pointwise_operators
from .attention import flash_attention
from .configs import WanConfig

ROPE_MAX_POSITIONS = 1024  # Wan's `precompute_freqs_cis_3d(head_dim)` default `end`

# How LayerNorm, RMSNorm and GELU are differentiated: "hand-written" is pointwise.py's closed
# forms, which the export traces (fewer graph nodes); "fused" is the same with GELU, RMSNorm,
# LayerNorm's backward and RoPE as the com.flowstep operators of pointwise_operators.py (float32
# fused exports); "stock" is PyTorch's
# own ops, as DiffSynth runs them eagerly (the PyTorch reference trainer, where fused kernels
# are faster).
POINTWISE = "hand-written"


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Apply a Linear (LoRA-wrapped or not) to the last dim of an N-D tensor via a 2-D matmul."""
    shape = x.shape
    y = layer(x.reshape(-1, shape[-1]))
    return y.reshape(*shape[:-1], y.shape[-1])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if POINTWISE == "stock":
            x32 = x.float()
            return (x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight
        if POINTWISE == "fused":
            return pointwise_operators.rms_norm(x, self.weight, self.eps)[0]
        return pointwise.rms_norm(x, self.weight, self.eps)


def layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm computed in float32, result in x's dtype: what PyTorch's bf16 kernel does
    internally, and the form ONNX Runtime's CUDA provider has a bf16-graph kernel for."""
    if POINTWISE == "stock":
        weight = None if norm.weight is None else norm.weight.float()
        bias = None if norm.bias is None else norm.bias.float()
        return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps).to(x.dtype)
    if POINTWISE == "fused":
        return pointwise_operators.layer_norm(x, norm.weight, norm.bias, norm.eps)
    return pointwise.layer_norm(x, norm.weight, norm.bias, norm.eps)


class GELU(nn.Module):
    """nn.GELU(approximate="tanh") with pointwise.py's backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if POINTWISE == "stock":
            return F.gelu(x, approximate="tanh")
        return pointwise_operators.gelu_tanh(x) if POINTWISE == "fused" else pointwise.gelu_tanh(x)


def rope_tables(head_dim: int, end: int = ROPE_MAX_POSITIONS, theta: float = 10000.0):
    """cos/sin tables per axis (frame, row, column), computed in float64 like Wan's
    `precompute_freqs_cis_3d`, stored as float32: [end, d_axis/2] each."""
    dims = (head_dim - 2 * (head_dim // 3), head_dim // 3, head_dim // 3)
    tables = []
    for d in dims:
        freqs = 1.0 / (theta ** (torch.arange(0, d, 2)[: d // 2].double() / d))
        angles = torch.outer(torch.arange(end, dtype=torch.float64), freqs)
        tables.append((torch.cos(angles).float(), torch.sin(angles).float()))
    return tables


def rope_grid(tables, f: int, h: int, w: int):
    """cos and sin for every token of an f×h×w grid: [f·h·w, 1, head_dim/2]."""
    cos_parts, sin_parts = [], []
    for (cos, sin), n, view in zip(tables, (f, h, w), ((f, 1, 1), (1, h, 1), (1, 1, w))):
        d = cos.shape[-1]
        cos_parts.append(cos[:n].reshape(*view, d).expand(f, h, w, d))
        sin_parts.append(sin[:n].reshape(*view, d).expand(f, h, w, d))
    cos = torch.cat(cos_parts, dim=-1).reshape(f * h * w, 1, -1)
    sin = torch.cat(sin_parts, dim=-1).reshape(f * h * w, 1, -1)
    return cos, sin


def rope_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Wan's complex RoPE on interleaved (real, imag) pairs, in real arithmetic.
    x: [b, s, n·d]; cos/sin: [s, 1, d/2]. In float32 (DiffSynth: float64), result in x's dtype."""
    if POINTWISE == "fused":
        return pointwise_operators.rope(x, cos, sin)
    b, s, _ = x.shape
    pairs = x.float().reshape(b, s, num_heads, -1, 2)
    re, im = pairs.unbind(-1)
    out_re = re * cos - im * sin
    out_im = re * sin + im * cos
    return torch.stack([out_re, out_im], dim=-1).reshape(b, s, -1).to(x.dtype)


# How attention is computed: "op" is the flash_attention operator pair that the export traces
# (attention.py); "math" is explicit softmax, the reference the export is validated against;
# "sdpa" is PyTorch's fused kernel, as DiffSynth runs it (the PyTorch reference trainer).
ATTENTION = "op"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """softmax(q kᵀ / √d) v per head; q [b, sq, n·d], k and v [b, sk, n·d]."""
    b, sq, _ = q.shape
    q, k, v = (t.reshape(b, t.shape[1], num_heads, -1) for t in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1])
    if ATTENTION == "op":
        out, _ = flash_attention(q, k, v, scale)
    elif ATTENTION == "sdpa":
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    else:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax((q.float() * scale) @ k.float().transpose(-1, -2), dim=-1)
        out = (weights.to(v.dtype) @ v).transpose(1, 2)
    return out.reshape(b, sq, -1)


def sinusoidal_embedding_1d(dim: int, position: torch.Tensor) -> torch.Tensor:
    """Wan's timestep embedding, [cos, sin] of t·10000^(-i/half), in float32."""
    half = dim // 2
    inv = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64).div(half)).float()
    sinusoid = position.float().reshape(-1, 1) * inv.to(position.device).reshape(1, -1)
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps=eps)
        self.norm_k = RMSNorm(dim, eps=eps)

    def forward(self, x, cos, sin):
        q = rope_apply(self.norm_q(linear(self.q, x)), cos, sin, self.num_heads)
        k = rope_apply(self.norm_k(linear(self.k, x)), cos, sin, self.num_heads)
        v = linear(self.v, x)
        return linear(self.o, attention(q, k, v, self.num_heads))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float, image_input: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps=eps)
        self.norm_k = RMSNorm(dim, eps=eps)
        if image_input:
            # Wan2.1 I2V: the same queries also attend to the CLIP image tokens.
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps=eps)

    def forward(self, x, context, image=None):
        q = self.norm_q(linear(self.q, x))
        k = self.norm_k(linear(self.k, context))
        v = linear(self.v, context)
        out = attention(q, k, v, self.num_heads)
        if image is not None:
            k_img = self.norm_k_img(linear(self.k_img, image))
            out = out + attention(q, k_img, linear(self.v_img, image), self.num_heads)
        return linear(self.o, out)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_dim: int, eps: float, image_input: bool = False):
        super().__init__()
        self.self_attn = SelfAttention(dim, num_heads, eps)
        self.cross_attn = CrossAttention(dim, num_heads, eps, image_input)
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), GELU(), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, context, t_mod, cos, sin, image=None):
        if t_mod.dim() == 4:  # per-token timesteps (TI2V): [1, S, 6, dim]
            mods = [m.squeeze(2) for m in (self.modulation.unsqueeze(1) + t_mod).chunk(6, dim=2)]
        else:
            mods = (self.modulation + t_mod).chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        h = layer_norm(self.norm1, x) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * self.self_attn(h, cos, sin)
        x = x + self.cross_attn(layer_norm(self.norm3, x), context, image)
        h = layer_norm(self.norm2, x) * (1 + scale_mlp) + shift_mlp
        x = x + gate_mlp * linear_sequential(self.ffn, h)
        return x


def linear_sequential(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    y = seq(x.reshape(-1, shape[-1]))
    return y.reshape(*shape[:-1], y.shape[-1])


class Head(nn.Module):
    def __init__(self, dim: int, out_dim: int, patch_size, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_dim * math.prod(patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x, t):
        if t.dim() == 3:  # per-token timesteps (TI2V): t is [1, S, dim]
            shift, scale = (m.squeeze(2) for m in (self.modulation.unsqueeze(0) + t.unsqueeze(2)).chunk(2, dim=2))
        else:
            shift, scale = (self.modulation + t.unsqueeze(1)).chunk(2, dim=1)
        return linear(self.head, layer_norm(self.norm, x) * (1 + scale) + shift)


class ImageEmbedding(nn.Module):
    """DiffSynth's `MLP` (img_emb.proj): CLIP features [1, N, 1280] -> [1, N, dim]."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, dim),
                                  nn.LayerNorm(dim))

    def forward(self, x):
        norm_in, fc1, act, fc2, norm_out = self.proj
        return layer_norm(norm_out, linear(fc2, act(linear(fc1, layer_norm(norm_in, x)))))


class WanModel(nn.Module):
    """Wan DiT. State-dict keys equal DiffSynth's / Wan's."""

    def __init__(self, config: WanConfig):
        super().__init__()
        config.check()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, kernel_size=config.patch_size, stride=config.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, dim), GELU(), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        image_input = config.image_tokens > 0
        self.blocks = nn.ModuleList(
            DiTBlock(dim, config.num_heads, config.ffn_dim, config.eps, image_input) for _ in range(config.num_layers)
        )
        self.head = Head(dim, config.out_dim, config.patch_size, config.eps)
        if image_input:
            self.img_emb = ImageEmbedding(config.clip_dim, dim)
        self.rope = rope_tables(config.head_dim)
        # DiffSynth's use_gradient_checkpointing: each block's forward is recomputed in backward.
        self.gradient_checkpointing = False

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """The (1,2,2)-strided Conv3d as reshape + matmul: [1, C, F, H, W] -> [1, f·h·w, dim]."""
        pf, ph, pw = self.config.patch_size
        b, c, frames, height, width = x.shape
        f, h, w = frames // pf, height // ph, width // pw
        patches = x.reshape(b, c, f, pf, h, ph, w, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        patches = patches.reshape(b * f * h * w, c * pf * ph * pw)
        weight = self.patch_embedding.weight.reshape(self.config.dim, -1)
        tokens = patches @ weight.t() + self.patch_embedding.bias
        return tokens.reshape(b, f * h * w, self.config.dim)

    def unpatchify(self, x: torch.Tensor, f: int, h: int, w: int) -> torch.Tensor:
        """'b (f h w) (x y z c) -> b c (f x) (h y) (w z)'."""
        pf, ph, pw = self.config.patch_size
        b = x.shape[0]
        c = self.config.out_dim
        x = x.reshape(b, f, h, w, pf, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, c, f * pf, h * ph, w * pw)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, *conditioning: torch.Tensor) -> torch.Tensor:
        """x: [1, out_dim, F, H, W] noisy latents; timestep: [1]; context: [1, L, text_dim];
        `conditioning`: the config's conditioning inputs in order, each with a batch axis
        (i2v: y [1, in_dim - out_dim, F, H, W] and, with image tokens, clip_feature [1, 257, 1280];
        ti2v: first_frame_latents [1, out_dim, 1, H, W]).
        Returns the predicted velocity [1, out_dim, F, H, W] in the weights' dtype; inputs are
        cast to it (float32 or bfloat16)."""
        config = self.config
        dtype = self.patch_embedding.weight.dtype
        cond = {name: c.to(dtype) for (name, _), c in zip(config.conditioning, conditioning, strict=True)}
        x, context = x.to(dtype), context.to(dtype)
        pf, ph, pw = config.patch_size
        f, h, w = x.shape[2] // pf, x.shape[3] // ph, x.shape[4] // pw
        if config.first_frame:
            # DiffSynth's FlowMatchSFTLoss and sampler put the image's latents in frame 0.
            x = torch.cat([cond["first_frame_latents"], x[:, :, 1:]], dim=2)
            t, t_mod = self.first_frame_time(timestep, f, h, w, dtype)
        else:
            t = linear_sequential(self.time_embedding, sinusoidal_embedding_1d(config.freq_dim, timestep).to(dtype))
            t_mod = self.time_projection(t).unflatten(1, (6, config.dim))
        context = linear_sequential(self.text_embedding, context)
        if "y" in cond:
            x = torch.cat([x, cond["y"]], dim=1)
        image = self.img_emb(cond["clip_feature"]) if "clip_feature" in cond else None
        tokens = self.patchify(x)
        cos, sin = (t.to(tokens.device) for t in rope_grid(self.rope, f, h, w))
        for block in self.blocks:
            if self.gradient_checkpointing:
                tokens = torch.utils.checkpoint.checkpoint(block, tokens, context, t_mod, cos, sin, image, use_reentrant=False)
            else:
                tokens = block(tokens, context, t_mod, cos, sin, image)
        return self.unpatchify(self.head(tokens, t), f, h, w)

    def first_frame_time(self, timestep, f: int, h: int, w: int, dtype):
        """TI2V's per-token timesteps (DiffSynth's seperated_timestep with
        fuse_vae_embedding_in_latents): the first frame's tokens at t = 0, the rest at t.
        Both embeddings are computed once and selected per token: [1, S, dim], [1, S, 6, dim]."""
        config = self.config
        both = torch.cat([torch.zeros_like(timestep), timestep])
        t2 = linear_sequential(self.time_embedding, sinusoidal_embedding_1d(config.freq_dim, both).to(dtype))
        t_mod2 = self.time_projection(t2).unflatten(1, (6, config.dim))
        first = (torch.arange(f * h * w, device=timestep.device) < h * w).reshape(-1, 1)
        t = torch.where(first, t2[0], t2[1]).unsqueeze(0)
        t_mod = torch.where(first.unsqueeze(-1), t_mod2[0], t_mod2[1]).unsqueeze(0)
        return t, t_mod


def init_random(model: WanModel, seed: int) -> None:
    """Deterministic random init (PyTorch defaults, then Wan's modulation init)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("modulation"):
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5)
            elif p.dim() >= 2:
                fan_in = p[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=generator))
            elif (name.endswith(("norm_q.weight", "norm_k.weight", "norm_k_img.weight")) or ".norm3." in name
                  or name.startswith(("img_emb.proj.0.", "img_emb.proj.4."))):
                p.fill_(1.0) if name.endswith("weight") else p.zero_()
            else:
                p.copy_(torch.empty(p.shape).uniform_(-0.02, 0.02, generator=generator))
