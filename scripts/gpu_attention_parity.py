#!/usr/bin/env python3
"""Writes the cases of tests/cuda_attention_parity.rs on a CUDA machine with PyTorch (device
call 1 of scripts/gpu_bench.sh): per case, bf16 or fp16 q, k, v, dO [1, S, 12, 128] (Wan 1.3B's
heads and head dim, Wan's scale 1/sqrt(128)), PyTorch's flash SDPA forward and backward on
them (`*_sdpa`), and the float32 autograd of plain softmax attention on the same rounded inputs
(`*_ref`, TF32 off), as DIR/CASE.safetensors.
    scripts/gpu_attention_parity.py DIR"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, HEAD_DIM = 12, 128
SCALE = HEAD_DIM ** -0.5
# (name, query tokens, key tokens, dtype): Wan 1.3B self-attention at 1,560 tokens (one 480x832
# frame) and 14,040 (33 frames), cross-attention to the 512 text tokens.
CASES = [
    ("self1560_bf16", 1560, 1560, torch.bfloat16),
    ("self14040_bf16", 14040, 14040, torch.bfloat16),
    ("cross14040x512_bf16", 14040, 512, torch.bfloat16),
    ("self1560_fp16", 1560, 1560, torch.float16),
    ("cross14040x512_fp16", 14040, 512, torch.float16),
]


def case(sq: int, sk: int, dtype: torch.dtype, seed: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    randn = lambda s: torch.randn(1, s, HEADS, HEAD_DIM, generator=g, device="cuda").to(dtype)  # noqa: E731
    q, k, v, do = randn(sq), randn(sk), randn(sk), randn(sq)
    heads = lambda x: x.transpose(1, 2).detach().requires_grad_()  # [B, S, H, D] -> [B, H, S, D]  # noqa: E731
    back = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731
    # PyTorch's flash kernels, as PyTorch trains Wan.
    qh, kh, vh = heads(q), heads(k), heads(v)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        o = F.scaled_dot_product_attention(qh, kh, vh, scale=SCALE)
    o.backward(do.transpose(1, 2))
    sdpa = {"o_sdpa": back(o.detach()), "dq_sdpa": back(qh.grad), "dk_sdpa": back(kh.grad), "dv_sdpa": back(vh.grad)}
    # float32 autograd through an explicit softmax: the reference both are measured against.
    q32, k32, v32 = heads(q.float()), heads(k.float()), heads(v.float())
    s = (q32 @ k32.transpose(-1, -2)) * SCALE
    lse = torch.logsumexp(s, dim=-1)
    o32 = torch.softmax(s, dim=-1) @ v32
    o32.backward(do.float().transpose(1, 2))
    ref = {"o_ref": back(o32.detach()), "lse_ref": lse.detach().contiguous(), "dq_ref": back(q32.grad),
           "dk_ref": back(k32.grad), "dv_ref": back(v32.grad)}
    return {"q": q, "k": k, "v": v, "do": do, **sdpa, **ref}


def main() -> int:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    for seed, (name, sq, sk, dtype) in enumerate(CASES):
        tensors = case(sq, sk, dtype, seed)
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(out / f"{name}.safetensors"))
        print(f"{name}: written", flush=True)
        del tensors
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
